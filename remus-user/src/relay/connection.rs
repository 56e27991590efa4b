//! What both relay ends do on their connection: the writer task (frames in order,
//! heartbeats, flushes) and page-data (de)compression that never stalls heartbeats.
//!
//! Owns: the write half of a replication connection once a session runs, and moving big
//! (de)compression jobs to a blocking thread. Never touches: the frame format
//! (`replication`), the page codec itself (`compress`), what the frames mean.
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

use crate::checkpoint::{LossKind, LossReason};
use crate::metrics::Metrics;
use crate::replication::{HEADER_LEN, Message, Sealer};

/// Where a connection task reports that the peer is lost (the first report wins).
pub type LossSender = Arc<watch::Sender<Option<LossReason>>>;

/// The write side of a relay connection: frames from `rx` in order, a heartbeat every
/// `interval` (so the peer hears us even while xl or the receiver is slow), each sealed
/// with `sealer`, a flush whenever nothing more is queued. A write or sealing error is
/// reported through `lost`.
pub fn spawn_writer<W>(
    w: W,
    sealer: Sealer,
    mut rx: mpsc::Receiver<Message>,
    interval: Duration,
    m: Arc<Metrics>,
    lost: LossSender,
) -> tokio::task::JoinHandle<()>
where
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut w = tokio::io::BufWriter::with_capacity(256 * 1024, w);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        let mut buf = Vec::with_capacity(HEADER_LEN + 64 * 1024);
        loop {
            let msg = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = tick.tick() => {
                    seq += 1;
                    m.heartbeats_sent_total.inc();
                    Message::Heartbeat { seq }
                }
            };
            buf.clear();
            if let Err(e) = sealer.encode(&msg, &mut buf) {
                lost.send_replace(Some(LossReason::new(
                    LossKind::LocalFailure,
                    format!("sealing a frame failed: {e}"),
                )));
                return;
            }
            m.wire_bytes_total.inc_by(buf.len() as u64);
            let r = async {
                w.write_all(&buf).await?;
                if rx.is_empty() {
                    w.flush().await?;
                }
                Ok::<_, std::io::Error>(())
            }
            .await;
            if let Err(e) = r {
                lost.send_replace(Some(LossReason::new(
                    LossKind::Connection,
                    format!("sending to the peer failed: {e}"),
                )));
                return;
            }
        }
        let _ = w.flush().await;
        let _ = w.shutdown().await;
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
pub async fn offload<S, R>(
    what: &'static str,
    size: usize,
    state: S,
    input: Vec<u8>,
    f: fn(&mut S, &[u8]) -> R,
) -> Result<(S, Vec<u8>, R), OffloadError>
where
    S: Send + 'static,
    R: Send + 'static,
{
    let run = move || {
        let mut state = state;
        let r = f(&mut state, &input);
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
        );
        tx.send(Message::Ack { checkpoint: 1 }).await.unwrap();
        tx.send(Message::Ack { checkpoint: 2 }).await.unwrap();
        let mut r = crate::replication::FrameReader::new(b, theirs.opener);
        let mut acks = Vec::new();
        let mut heartbeats = 0;
        while acks.len() < 2 || heartbeats == 0 {
            match r.next().await.unwrap() {
                Message::Ack { checkpoint } => acks.push(checkpoint),
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
