//! What both relay ends do on their connection: the writer task (frames in order,
//! heartbeats, one write per batch of queued frames) and page-data (de)compression that
//! never stalls heartbeats.
//!
//! Owns: the write half of a replication connection once a session runs, and moving big
//! (de)compression jobs to a blocking thread. Never touches: the frame format
//! (`replication`), the page codec itself (`compress`), what the frames mean.
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use crate::checkpoint::{LossKind, LossReason};
use crate::metrics::Metrics;
use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

use crate::replication::seal::TAG_LEN;
use crate::replication::{HEADER_LEN, Kind, Message, Sealer, WireError};

/// Where a connection task reports that the peer is lost (the first report wins).
pub type LossSender = Arc<watch::Sender<Option<LossReason>>>;

/// What the writer task is handed: a frame, raw stream bytes, or a mark.
#[derive(Debug)]
pub enum Outgoing {
    Frame(Message),
    /// Raw stream bytes, sealed as one DATA frame in place (the buffer the stream was
    /// read into) and written as they are: header, ciphertext, tag in one `writev`.
    Data(BytesMut),
    /// Every frame queued before this one has been written to the connection: the
    /// writer reports `Instant::now()` for this checkpoint on its marks channel.
    Sent(u64),
}

impl From<Message> for Outgoing {
    fn from(m: Message) -> Outgoing {
        Outgoing::Frame(m)
    }
}

/// Where the writer reports marks: (checkpoint, when its last byte was written).
pub type Marks = mpsc::UnboundedSender<(u64, Instant)>;

/// Bytes gathered into one write at most (frames queued meanwhile share it).
const WRITE_BATCH: usize = 512 * 1024;

/// The writer task's state: what goes out next, in order. Messages are sealed into a
/// buffer of their own (one copy); DATA frames are sealed where they are (no copy).
struct Writer<W> {
    w: W,
    sealer: Sealer,
    out: VecDeque<Bytes>,
    queued: usize,
    m: Arc<Metrics>,
    seq: u64,
}

impl<W: tokio::io::AsyncWrite + Unpin> Writer<W> {
    /// Seals one item into the batch; a mark is returned, to be reported once written.
    fn add(&mut self, o: Outgoing) -> Result<Option<u64>, LossReason> {
        let sealing = |e: WireError| {
            LossReason::new(
                LossKind::LocalFailure,
                format!("sealing a frame failed: {e}"),
            )
        };
        let before = self.queued;
        match o {
            Outgoing::Frame(msg) => {
                let mut v = Vec::new();
                self.sealer.encode(&msg, &mut v).map_err(sealing)?;
                self.queued += v.len();
                self.out.push_back(Bytes::from(v));
            }
            Outgoing::Data(mut d) => {
                let (head, tag) = self
                    .sealer
                    .seal_in_place(Kind::Data, &mut d)
                    .map_err(sealing)?;
                self.queued += HEADER_LEN + d.len() + TAG_LEN;
                self.out.push_back(Bytes::copy_from_slice(&head));
                self.out.push_back(d.freeze());
                self.out.push_back(Bytes::copy_from_slice(&tag));
            }
            Outgoing::Sent(checkpoint) => return Ok(Some(checkpoint)),
        }
        self.m
            .wire_bytes_total
            .inc_by((self.queued - before) as u64);
        Ok(None)
    }

    fn heartbeat(&mut self) -> Result<Option<u64>, LossReason> {
        self.seq += 1;
        self.m.heartbeats_sent_total.inc();
        self.add(Outgoing::Frame(Message::Heartbeat { seq: self.seq }))
    }

    async fn write(&mut self) -> Result<(), LossReason> {
        let r = write_all_vectored(&mut self.w, &mut self.out).await;
        self.out.clear();
        self.queued = 0;
        r.map(|_| ()).map_err(|e| {
            LossReason::new(
                LossKind::Connection,
                format!("sending to the peer failed: {e}"),
            )
        })
    }
}

/// Writes every buffer of `bufs` in order with as few `writev` calls as the writer
/// takes; returns the bytes written. `bufs` is empty afterwards (on success).
pub async fn write_all_vectored<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    bufs: &mut VecDeque<Bytes>,
) -> std::io::Result<u64> {
    let mut total = 0u64;
    while !bufs.is_empty() {
        let slices: Vec<IoSlice<'_>> = bufs.iter().take(64).map(|b| IoSlice::new(b)).collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        total += n as u64;
        while n > 0 {
            let Some(front) = bufs.front_mut() else {
                break;
            };
            if front.len() <= n {
                n -= front.len();
                bufs.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
    Ok(total)
}

/// The write side of a relay connection: frames from `rx` in order, a heartbeat every
/// `interval` (so the peer hears us even while xl or the receiver is slow), each sealed
/// with `sealer`; what is queued goes out in one `writev`, and a mark is reported on
/// `marks` once what preceded it is written. A write or sealing error is reported
/// through `lost`.
pub fn spawn_writer<W, M>(
    w: W,
    sealer: Sealer,
    mut rx: mpsc::Receiver<M>,
    interval: Duration,
    m: Arc<Metrics>,
    lost: LossSender,
    marks: Option<Marks>,
) -> tokio::task::JoinHandle<()>
where
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    M: Into<Outgoing> + Send + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut wr = Writer {
            w,
            sealer,
            out: VecDeque::new(),
            queued: 0,
            m,
            seq: 0,
        };
        let r: Result<(), LossReason> = async {
            loop {
                let mut mark = tokio::select! {
                    o = rx.recv() => match o {
                        Some(o) => wr.add(o.into())?,
                        None => return Ok(()),
                    },
                    _ = tick.tick() => wr.heartbeat()?,
                };
                // Whatever else is queued joins this write (up to a mark).
                while mark.is_none() && wr.queued < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(o) => mark = wr.add(o.into())?,
                        Err(_) => break,
                    }
                }
                wr.write().await?;
                if let (Some(c), Some(marks)) = (mark, &marks) {
                    let _ = marks.send((c, Instant::now()));
                }
            }
        }
        .await;
        match r {
            Ok(()) => {
                let _ = wr.w.flush().await;
                let _ = wr.w.shutdown().await;
            }
            Err(reason) => {
                lost.send_replace(Some(reason));
            }
        }
    })
}

/// The reason a loss channel holds, once it holds one.
pub fn loss_of(
    r: Result<watch::Ref<'_, Option<LossReason>>, watch::error::RecvError>,
) -> LossReason {
    match r {
        Ok(v) => v
            .clone()
            .unwrap_or_else(|| LossReason::new(LossKind::Connection, "the connection tasks ended")),
        Err(_) => LossReason::new(LossKind::Connection, "the connection tasks ended"),
    }
}

/// A blocking-thread job failed to come back (it panicked or the runtime is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the page {0} task failed: {1}")]
pub struct OffloadError(pub &'static str, pub tokio::task::JoinError);

/// Runs `f(state, input)`, which (de)compresses `size` bytes, on the runtime thread when
/// small, else on a blocking thread (a thread hop would dominate a small record's latency;
/// a 4 MiB record must not hold up heartbeats). `state` (an encoder or decoder) and
/// `input` come back with the result, so both ends keep their page caches.
pub async fn offload<S, I, R>(
    what: &'static str,
    size: usize,
    state: S,
    input: I,
    f: fn(&mut S, &[u8]) -> R,
) -> Result<(S, I, R), OffloadError>
where
    S: Send + 'static,
    I: AsRef<[u8]> + Send + 'static,
    R: Send + 'static,
{
    let run = move || {
        let mut state = state;
        let r = f(&mut state, input.as_ref());
        (state, input, r)
    };
    if size <= super::INLINE_CODEC_BYTES {
        Ok(run())
    } else {
        tokio::task::spawn_blocking(run)
            .await
            .map_err(|e| OffloadError(what, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::seal::{LIMITS, test_pair};
    use crate::replication::{MAX_PAYLOAD, WireError};

    #[tokio::test]
    async fn small_and_big_jobs_both_come_back_with_their_state() {
        fn add(s: &mut u64, i: &[u8]) -> usize {
            *s += i.len() as u64;
            i.len()
        }
        let small = vec![1u8; 10];
        let (s, i, r) = offload("test", small.len(), 5u64, small, add)
            .await
            .unwrap();
        assert_eq!((s, i.len(), r), (15, 10, 10));
        let big = vec![2u8; super::super::INLINE_CODEC_BYTES + 1];
        let n = big.len();
        let (s, i, r) = offload("test", n, 0u64, big, add).await.unwrap();
        assert_eq!((s as usize, i.len(), r), (n, n, n));
    }

    #[tokio::test]
    async fn the_writer_sends_frames_in_order_with_heartbeats_and_reports_a_broken_peer() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (tx, rx) = mpsc::channel(8);
        let (lost_tx, mut lost) = watch::channel(None);
        let m = Arc::new(Metrics::new("send"));
        let (ours, theirs) = test_pair(LIMITS);
        let h = spawn_writer(
            a,
            ours.sealer,
            rx,
            Duration::from_millis(10),
            m.clone(),
            Arc::new(lost_tx),
            None,
        );
        tx.send(Message::ack(1)).await.unwrap();
        tx.send(Message::ack(2)).await.unwrap();
        let mut r = crate::replication::FrameReader::new(b, theirs.opener);
        let mut acks = Vec::new();
        let mut heartbeats = 0;
        while acks.len() < 2 || heartbeats == 0 {
            match r.next().await.unwrap() {
                Message::Ack { checkpoint, .. } => acks.push(checkpoint),
                Message::Heartbeat { .. } => heartbeats += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(acks, [1, 2]);
        assert!(m.heartbeats_sent_total.get() >= 1);
        drop(r);
        let reason = loss_of(lost.wait_for(Option::is_some).await);
        assert_eq!(reason.kind, LossKind::Connection);
        h.await.unwrap();
    }

    #[tokio::test]
    async fn a_mark_is_reported_after_the_frames_before_it_were_written() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (tx, rx) = mpsc::channel::<Outgoing>(8);
        let (lost_tx, _lost) = watch::channel(None);
        let (marks_tx, mut marks) = mpsc::unbounded_channel();
        let (ours, theirs) = test_pair(LIMITS);
        let _h = spawn_writer(
            a,
            ours.sealer,
            rx,
            Duration::from_secs(3600),
            Arc::new(Metrics::new("send")),
            Arc::new(lost_tx),
            Some(marks_tx),
        );
        let before = Instant::now();
        tx.send(Message::Data(vec![5; 300_000]).into())
            .await
            .unwrap();
        tx.send(Outgoing::Sent(9)).await.unwrap();
        let (n, at) = marks.recv().await.unwrap();
        assert_eq!(n, 9);
        assert!(at >= before);
        // The frame is on the connection, not in the writer's buffer, when it is marked.
        let mut r = crate::replication::FrameReader::new(b, theirs.opener);
        loop {
            match r.next().await.unwrap() {
                Message::Heartbeat { .. } => {}
                Message::Data(d) => {
                    assert_eq!(d.len(), 300_000);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_frame_that_cannot_be_sealed_is_a_local_failure_and_nothing_is_sent() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (tx, rx) = mpsc::channel(8);
        let (lost_tx, mut lost) = watch::channel(None);
        let (ours, theirs) = test_pair(LIMITS);
        let h = spawn_writer(
            a,
            ours.sealer,
            rx,
            Duration::from_secs(3600),
            Arc::new(Metrics::new("send")),
            Arc::new(lost_tx),
            None,
        );
        // A payload that leaves no room for the tag within the frame limit.
        tx.send(Message::Data(vec![0; MAX_PAYLOAD as usize]))
            .await
            .unwrap();
        let reason = loss_of(lost.wait_for(Option::is_some).await);
        assert_eq!(reason.kind, LossKind::LocalFailure);
        h.await.unwrap();
        // At most the first tick's heartbeat went out, then the connection ended.
        let mut r = crate::replication::FrameReader::new(b, theirs.opener);
        loop {
            match r.next().await {
                Ok(Message::Heartbeat { .. }) => {}
                Err(WireError::Closed) => break,
                other => panic!("{other:?}"),
            }
        }
    }
}
