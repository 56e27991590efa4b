//! The backup as the checkpoint driver's [`Replicator`] port, over TCP.
//!
//! Owns: a running session's connection on the primary: the writer task (frames and
//! heartbeats), the reader task (ACKs, heartbeats, silence, loss, the answers to CLOSE
//! and DISCARD), coalescing raw stream bytes, compressing PAGE_DATA records on the way
//! out, ACK latency. Never touches: the epoch rules, xl's pipe, the buffer.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::SendOptions;
use crate::checkpoint::{
    BackupEvent, DiscardedCopy, LossKind, LossReason, Replicator, ReplicatorError,
};
use crate::compress::{Codec, CompressError, PageEncoder};
use crate::relay::connection::{LossSender, loss_of, offload, spawn_writer};
use crate::relay::{Heartbeat, Shared};
use crate::replication::{DATA_CHUNK, FrameReader, Message, Session};
use crate::stream::{Event, Layer, libxc_type};

/// Raw stream bytes are sent once this many are pending (or at a checkpoint's end).
const COALESCE: usize = 64 * 1024;

/// PAGE_DATA records up to this size are compressed (1024 pages + PFNs is ~4 MiB); the
/// encoded form stays well under `replication::MAX_PAYLOAD`.
const MAX_COMPRESSED_RECORD: usize = 8 << 20;

type Reader = FrameReader<tokio::net::tcp::OwnedReadHalf>;

/// The backup over TCP: a writer task (frames + heartbeats), a reader task (acks,
/// heartbeats, loss), compression of PAGE_DATA records on the way out.
pub struct TcpReplicator {
    tx: Option<mpsc::Sender<Message>>,
    acks: mpsc::Receiver<u64>,
    lost: watch::Receiver<Option<LossReason>>,
    closed: watch::Receiver<bool>,
    discarded: watch::Receiver<Option<DiscardedCopy>>,
    encoder: Option<PageEncoder>,
    /// Unsent stream bytes, starting at absolute offset `pending_at`.
    pending: Vec<u8>,
    pending_at: u64,
    /// Offset up to which bytes may be sent (end of the last complete unit).
    safe_to: u64,
    sent_at: HashMap<u64, Instant>,
    shared: Arc<Shared>,
    finish_timeout: Duration,
    discard_timeout: Duration,
}

/// What the reader task hands on.
struct ReaderChannels {
    acks: mpsc::Sender<u64>,
    lost: LossSender,
    closed: watch::Sender<bool>,
    discarded: watch::Sender<Option<DiscardedCopy>>,
}

/// Reads what the backup says: ACKs go to `ch.acks`; silence for the timeout, a broken
/// connection, ABORT or a stray frame is a loss; CLOSE and DISCARDED end the session.
async fn read_backup(mut reader: Reader, hb: Heartbeat, shared: Arc<Shared>, ch: ReaderChannels) {
    let m = &shared.metrics;
    let mut waiting_since = Instant::now();
    let loss = loop {
        let r = tokio::select! {
            // Frames first: a frame already received is never mistaken for silence,
            // however late this task gets to run.
            biased;
            r = reader.next() => r,
            _ = tokio::time::sleep(hb.silence_check(waiting_since)) => {
                if let Some(silent) = hb.judge_silence(waiting_since, m) {
                    break LossReason::new(LossKind::Silence, format!(
                        "no heartbeat from the backup for {} ms (timeout {} ms)",
                        silent.as_millis(), hb.timeout.as_millis()
                    ));
                }
                continue;
            }
        };
        waiting_since = Instant::now();
        match r {
            Ok(Message::Ack { checkpoint }) => {
                if ch.acks.send(checkpoint).await.is_err() {
                    return;
                }
            }
            Ok(Message::Heartbeat { .. }) => {}
            Ok(Message::Close { .. }) => {
                ch.closed.send_replace(true);
                return;
            }
            Ok(Message::Discarded {
                checkpoint,
                copy_destroyed,
            }) => {
                ch.discarded.send_replace(Some(DiscardedCopy {
                    checkpoint,
                    copy_destroyed,
                }));
                return;
            }
            Ok(Message::Abort { reason }) => {
                break LossReason::new(LossKind::Aborted, format!("the backup aborted: {reason}"));
            }
            Ok(other) => {
                break LossReason::new(
                    LossKind::Protocol,
                    format!(
                        "protocol error: unexpected {:?} from the backup",
                        other.kind()
                    ),
                );
            }
            Err(e) => {
                break LossReason::new(
                    LossKind::Connection,
                    format!("receiving from the backup failed: {e}"),
                );
            }
        }
    };
    ch.lost.send_replace(Some(loss));
}

impl TcpReplicator {
    pub fn start(
        reader: Reader,
        w: tokio::net::tcp::OwnedWriteHalf,
        session: &Session,
        opts: &SendOptions,
        shared: Arc<Shared>,
    ) -> TcpReplicator {
        let (tx, rx) = mpsc::channel::<Message>(64);
        let (ack_tx, acks) = mpsc::channel::<u64>(1024);
        let (lost_tx, lost) = watch::channel::<Option<LossReason>>(None);
        let (closed_tx, closed) = watch::channel(false);
        let (discarded_tx, discarded) = watch::channel(None);
        let lost_tx = Arc::new(lost_tx);
        let hb = opts.heartbeat;
        spawn_writer(
            w,
            session.keys.sealer.clone(),
            rx,
            hb.interval,
            shared.metrics.clone(),
            lost_tx.clone(),
        );
        let ch = ReaderChannels {
            acks: ack_tx,
            lost: lost_tx,
            closed: closed_tx,
            discarded: discarded_tx,
        };
        tokio::spawn(read_backup(reader, hb, shared.clone(), ch));
        let encoder = (session.codec != Codec::None)
            .then(|| PageEncoder::new(session.codec, session.cache_pages as usize));
        TcpReplicator {
            tx: Some(tx),
            acks,
            lost,
            closed,
            discarded,
            encoder,
            pending: Vec::new(),
            pending_at: 0,
            safe_to: 0,
            sent_at: HashMap::new(),
            shared,
            finish_timeout: opts.heartbeat.timeout.max(Duration::from_secs(5)),
            discard_timeout: opts.discard_timeout,
        }
    }

    /// Metrics of one ACK: latency from the checkpoint's last byte sent.
    fn note_ack(&mut self, n: u64) {
        let m = &self.shared.metrics;
        if let Some(t) = self.sent_at.remove(&n) {
            m.observe_ack(t.elapsed());
        }
        self.sent_at.retain(|&c, _| c > n);
        m.acks_total.inc();
        m.last_acked_checkpoint.set(n);
    }

    async fn push(&mut self, m: Message) -> Result<(), ReplicatorError> {
        let closed = || {
            LossReason::new(
                LossKind::Connection,
                "the connection to the backup is closed",
            )
        };
        let Some(tx) = &self.tx else {
            return Err(closed().into());
        };
        let mut lost = self.lost.clone();
        tokio::select! {
            r = tx.send(m) => r.map_err(|_| closed().into()),
            r = lost.wait_for(Option::is_some) => Err(loss_of(r).into()),
        }
    }

    /// Sends pending bytes up to absolute offset `to` as raw data frames.
    async fn send_raw(&mut self, to: u64) -> Result<(), ReplicatorError> {
        while self.pending_at < to {
            let n = ((to - self.pending_at) as usize).min(DATA_CHUNK);
            let rest = self.pending.split_off(n);
            let chunk = std::mem::replace(&mut self.pending, rest);
            self.pending_at += n as u64;
            self.push(Message::Data(chunk)).await?;
        }
        Ok(())
    }

    async fn send_page_record(&mut self, start: u64, end: u64) -> Result<(), ReplicatorError> {
        self.send_raw(start).await?;
        let n = (end - start) as usize;
        let rest = self.pending.split_off(n);
        let record = std::mem::replace(&mut self.pending, rest);
        self.pending_at = end;
        // A record too big for one frame (only a malformed one can be) goes raw; the
        // encoder never sees it, so both page caches stay in step.
        let enc = match self.encoder.take() {
            Some(enc) if record.len() <= MAX_COMPRESSED_RECORD => enc,
            other => {
                self.encoder = other;
                for c in record.chunks(DATA_CHUNK) {
                    self.push(Message::Data(c.to_vec())).await?;
                }
                return Ok(());
            }
        };
        let encode = |e: &mut PageEncoder, r: &[u8]| e.encode(r);
        let (enc, record, encoded) = offload("compression", record.len(), enc, record, encode)
            .await
            .map_err(|e| local_failure(&e))?;
        self.encoder = Some(enc);
        let encoded = encoded.map_err(|e: CompressError| {
            local_failure(&format!("compressing a PAGE_DATA record: {e}"))
        })?;
        let m = &self.shared.metrics;
        m.page_data_raw_bytes_total.inc_by(record.len() as u64);
        m.page_data_wire_bytes_total.inc_by(encoded.len() as u64);
        self.push(Message::PageData(encoded)).await
    }

    /// Notes what the parser events of the latest bytes complete: PAGE_DATA records are
    /// sent compressed at once; returns the checkpoints completed and whether the bytes
    /// up to now must go out without waiting to coalesce.
    async fn follow(&mut self, events: &[Event]) -> Result<(Vec<u64>, bool), ReplicatorError> {
        let mut completed = Vec::new();
        let mut urgent = false;
        for ev in events {
            match *ev {
                Event::Record {
                    layer: Layer::Libxc,
                    rtype: libxc_type::PAGE_DATA,
                    start,
                    end,
                    ..
                } if self.encoder.is_some() && start >= self.pending_at => {
                    self.send_page_record(start, end).await?;
                    self.safe_to = end;
                }
                Event::Record { end, .. }
                | Event::XlHeader { end, .. }
                | Event::LibxcCheckpoint { end, .. } => self.safe_to = self.safe_to.max(end),
                Event::End { end } => {
                    self.safe_to = self.safe_to.max(end);
                    urgent = true;
                }
                Event::CheckpointComplete { checkpoint, end } => {
                    self.safe_to = self.safe_to.max(end);
                    completed.push(checkpoint);
                    urgent = true;
                }
                Event::PostSuspendStart { .. } => {}
            }
        }
        Ok((completed, urgent))
    }
}

fn local_failure(e: &dyn std::fmt::Display) -> ReplicatorError {
    LossReason::new(LossKind::LocalFailure, e.to_string()).into()
}

impl Replicator for TcpReplicator {
    async fn forward(&mut self, bytes: &[u8], events: &[Event]) -> Result<(), ReplicatorError> {
        self.pending.extend_from_slice(bytes);
        let read_to = self.pending_at + self.pending.len() as u64;
        let (completed, urgent) = self.follow(events).await?;
        // Without compression nothing needs a whole record: send all. With it, hold the
        // tail that may belong to an unfinished PAGE_DATA record.
        let to = if self.encoder.is_some() {
            self.safe_to.min(read_to)
        } else {
            read_to
        };
        // Coalesce raw bytes into frames of COALESCE bytes (xl's pipe gives them a page
        // at a time); the end of a checkpoint goes out at once, its ACK is waited for.
        if urgent || to.saturating_sub(self.pending_at) >= COALESCE as u64 {
            self.send_raw(to).await?;
        }
        let now = Instant::now();
        for c in completed {
            self.sent_at.insert(c, now);
        }
        Ok(())
    }

    async fn next_event(&mut self) -> BackupEvent {
        enum Got {
            Ack(Option<u64>),
            Lost(LossReason),
        }
        let mut lost = self.lost.clone();
        let got = tokio::select! {
            a = self.acks.recv() => Got::Ack(a),
            r = lost.wait_for(Option::is_some) => Got::Lost(loss_of(r)),
        };
        match got {
            Got::Ack(Some(n)) => {
                self.note_ack(n);
                BackupEvent::Ack(n)
            }
            // The reader ended: on a CLOSE or DISCARDED from the backup (we did not ask:
            // `finish` and `discard` do not come through here), else it set the reason
            // before dropping the channel.
            Got::Ack(None) => {
                if *self.closed.borrow() {
                    return BackupEvent::Lost(LossReason::new(
                        LossKind::Closed,
                        "the backup closed the session",
                    ));
                }
                if self.discarded.borrow().is_some() {
                    return BackupEvent::Lost(LossReason::new(
                        LossKind::Protocol,
                        "the backup discarded its copy unasked",
                    ));
                }
                BackupEvent::Lost(loss_of(lost.wait_for(Option::is_some).await))
            }
            Got::Lost(r) => BackupEvent::Lost(r),
        }
    }

    async fn finish(
        &mut self,
        checkpoints: u64,
        finished: bool,
    ) -> Result<Vec<u64>, ReplicatorError> {
        // Whatever is still pending is an incomplete record: the backup drops it anyway,
        // but a finished stream has none.
        let end = self.pending_at + self.pending.len() as u64;
        self.send_raw(end).await?;
        self.push(Message::Close {
            checkpoints,
            finished,
        })
        .await?;
        // Dropping the sender lets the writer flush and shut the write side down.
        self.tx = None;
        let mut closed = self.closed.clone();
        match tokio::time::timeout(self.finish_timeout, closed.wait_for(|c| *c)).await {
            Ok(Ok(_)) => {
                // ACKs sent before the CLOSE answer are queued ahead of it.
                let mut acks = Vec::new();
                while let Ok(n) = self.acks.try_recv() {
                    self.note_ack(n);
                    acks.push(n);
                }
                Ok(acks)
            }
            _ => Err(ReplicatorError::NoCloseAnswer(self.finish_timeout)),
        }
    }

    async fn discard(&mut self) -> Result<DiscardedCopy, ReplicatorError> {
        // Stream bytes still pending here are of an unfinished checkpoint: the backup
        // would drop them anyway. Heartbeats go on while it kills and destroys.
        self.push(Message::Discard).await?;
        let mut discarded = self.discarded.clone();
        let mut lost = self.lost.clone();
        tokio::select! {
            r = discarded.wait_for(Option::is_some) => match r.ok().and_then(|v| *v) {
                Some(copy) => Ok(copy),
                // The reader ended on something else (a CLOSE): no word of a discard.
                None => Err(LossReason::new(
                    LossKind::Protocol,
                    "the backup ended the session without answering DISCARD",
                )
                .into()),
            },
            r = lost.wait_for(Option::is_some) => Err(loss_of(r).into()),
            _ = tokio::time::sleep(self.discard_timeout) => {
                Err(ReplicatorError::NoDiscardAnswer(self.discard_timeout))
            }
        }
    }
}
