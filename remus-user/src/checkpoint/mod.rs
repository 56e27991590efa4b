//! The primary's checkpoint controller (relay mode): which epoch is closed when, whether
//! the switch was provably in time, which epoch an ACK(N) may release.
//!
//! Owns: the epoch/checkpoint bookkeeping and the read loop over xl's stream. Never
//! touches: sockets, processes or the kernel directly: the output buffer is reached
//! through [`NetBuffer`], the backup through [`Replicator`], so all of this is tested with
//! fakes, without Xen and without root.
//!
//! The rule (DESIGN.md, "Checkpoints and epochs with stock xl remus"): at the first
//! post-suspend byte of checkpoint N the controller closes the buffer's current epoch
//! (call it e(N)) and notes R, the bytes read from the pipe so far. When the libxc
//! CHECKPOINT record of N is seen ending at P, the switch is *proven* in time iff
//! P > R + C (C = pipe capacity): libxc cannot have finished writing, so the guest was
//! still suspended when the epoch switched. A proven checkpoint N maps ACK(N) to
//! `commit(e(N))`. An unproven one is *merged*: ACK(N) releases nothing, and e(N)'s
//! frames go out with the next proven checkpoint's commit (commit releases every epoch
//! <= its argument). Releasing late is safe; releasing early never is.
use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::{Span, debug, info, info_span, warn};

use crate::metrics::Metrics;
pub mod ports;

use crate::stream::{Event, Parser, StreamError};
pub use ports::{BackupEvent, NetBuffer, NetBufferError, Released, Replicator};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("output buffer: {0}")]
    Buffer(#[from] NetBufferError),
    #[error("the migration stream from xl is malformed: {0}")]
    Stream(#[from] StreamError),
    #[error("reading the migration stream from xl: {0}")]
    Input(std::io::Error),
    #[error("stream events out of order: {0}")]
    OutOfOrder(String),
    #[error(
        "the backup acknowledged checkpoint {acked}, but only checkpoints up to {completed} \
         were sent: refusing it and releasing nothing (the guest's output stays held)"
    )]
    BogusAck { acked: u64, completed: u64 },
}

/// The decision taken at the libxc CHECKPOINT record of checkpoint N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// ACK(N) commits `epoch`.
    Proven { epoch: u64 },
    /// The switch may have been late: `epoch` is released with the next proven commit.
    Merged { epoch: u64 },
}

#[derive(Clone, Debug)]
struct Switch {
    checkpoint: u64,
    read_at: u64,
    epoch: u64,
    /// One span per checkpoint: its switch, proof and commit are logged inside it.
    span: Span,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// xl closed the stream (stdin EOF). `finished` = it ended with libxl END.
    StreamEnded { checkpoints: u64, finished: bool },
    /// The backup was lost; the buffer was switched to pass-through.
    PeerLost {
        reason: String,
        released: Released,
        last_acked: u64,
    },
}

/// The controller. See the module docs.
pub struct Controller<B: NetBuffer> {
    buffer: B,
    pipe_capacity: u64,
    metrics: Arc<Metrics>,
    switch: Option<Switch>,
    /// Proven checkpoints not yet acknowledged: checkpoint → (epoch, its span).
    proven: BTreeMap<u64, (u64, Span)>,
    last_acked: u64,
    /// Last checkpoint whose CHECKPOINT_END was parsed (and so forwarded): no ACK may
    /// exceed it.
    completed: u64,
    committed_epoch: u64,
    merges: u64,
}

impl<B: NetBuffer> Controller<B> {
    /// `pipe_capacity` is C, the capacity of xl's pipe as read back after shrinking it.
    pub fn new(buffer: B, pipe_capacity: u64, metrics: Arc<Metrics>) -> Self {
        Controller {
            buffer,
            pipe_capacity,
            metrics,
            switch: None,
            proven: BTreeMap::new(),
            last_acked: 0,
            completed: 0,
            committed_epoch: 0,
            merges: 0,
        }
    }

    /// Checkpoint N's CHECKPOINT_END was parsed: its bytes go to the backup next, so from
    /// now on ACK(N) is legitimate.
    pub fn checkpoint_complete(&mut self, checkpoint: u64) {
        self.completed = self.completed.max(checkpoint);
    }

    pub fn buffer(&self) -> &B {
        &self.buffer
    }

    pub fn merges(&self) -> u64 {
        self.merges
    }

    pub fn last_acked(&self) -> u64 {
        self.last_acked
    }

    pub fn committed_epoch(&self) -> u64 {
        self.committed_epoch
    }

    /// First post-suspend byte of checkpoint N seen, with `read_so_far` bytes read from
    /// the pipe (including that byte). Closes the buffer's epoch.
    pub async fn post_suspend(
        &mut self,
        checkpoint: u64,
        read_so_far: u64,
    ) -> Result<u64, CheckpointError> {
        if let Some(s) = &self.switch {
            return Err(CheckpointError::OutOfOrder(format!(
                "post-suspend start of checkpoint {checkpoint} before the libxc CHECKPOINT of {}",
                s.checkpoint
            )));
        }
        let epoch = self.buffer.checkpoint().await?;
        let span = info_span!("checkpoint", n = checkpoint, epoch);
        span.in_scope(|| debug!(read_so_far, "epoch switched at the first post-suspend byte"));
        self.switch = Some(Switch {
            checkpoint,
            read_at: read_so_far,
            epoch,
            span,
        });
        Ok(epoch)
    }

    /// The libxc CHECKPOINT record of N ends at `end`: prove the switch or merge.
    pub fn libxc_checkpoint(
        &mut self,
        checkpoint: u64,
        end: u64,
    ) -> Result<Decision, CheckpointError> {
        let s = match self.switch.take() {
            Some(s) if s.checkpoint == checkpoint => s,
            other => {
                return Err(CheckpointError::OutOfOrder(format!(
                    "libxc CHECKPOINT of checkpoint {checkpoint} without its post-suspend start (pending: {:?})",
                    other.as_ref().map(|s| s.checkpoint)
                )));
            }
        };
        let bound = s.read_at.saturating_add(self.pipe_capacity);
        let _in_span = s.span.clone().entered();
        if end > bound {
            self.proven.insert(checkpoint, (s.epoch, s.span.clone()));
            debug!(
                checkpoint,
                epoch = s.epoch,
                end,
                bound,
                "switch proven in time"
            );
            Ok(Decision::Proven { epoch: s.epoch })
        } else {
            self.merges += 1;
            self.metrics.epoch_merges_total.inc();
            info!(
                checkpoint,
                epoch = s.epoch,
                end,
                read_at = s.read_at,
                pipe = self.pipe_capacity,
                "cannot prove the epoch switch was before the guest resumed: epoch merged into the next"
            );
            Ok(Decision::Merged { epoch: s.epoch })
        }
    }

    /// ACK(N): commit the epoch of the highest proven checkpoint <= N. Returns what was
    /// released, or `None` when there was nothing to commit (merged or duplicate).
    pub async fn ack(&mut self, checkpoint: u64) -> Result<Option<Released>, CheckpointError> {
        // An ACK for a checkpoint not yet sent would release frames whose state the backup
        // cannot hold: a broken or hostile peer. Fail closed (the caller exits holding).
        if checkpoint > self.completed {
            return Err(CheckpointError::BogusAck {
                acked: checkpoint,
                completed: self.completed,
            });
        }
        if checkpoint <= self.last_acked {
            warn!(
                checkpoint,
                last = self.last_acked,
                "duplicate or stale ACK ignored"
            );
            return Ok(None);
        }
        self.last_acked = checkpoint;
        let Some((epoch, span)) = self
            .proven
            .range(..=checkpoint)
            .next_back()
            .map(|(_, v)| v.clone())
        else {
            return Ok(None);
        };
        // Everything at or below N is now covered.
        self.proven = self.proven.split_off(&checkpoint.saturating_add(1));
        let r = self.buffer.commit(epoch).await?;
        self.committed_epoch = epoch;
        self.metrics.committed_epoch.set(epoch);
        span.in_scope(|| {
            debug!(
                acked = checkpoint,
                frames = r.frames,
                bytes = r.bytes,
                "committed"
            )
        });
        Ok(Some(r))
    }

    /// The backup is lost: release everything, pass everything from now on.
    pub async fn peer_lost(&mut self) -> Result<Released, CheckpointError> {
        self.proven.clear();
        self.switch = None;
        Ok(self.buffer.fail_open().await?)
    }

    /// Handles one parser event.
    pub async fn on_event(&mut self, ev: &Event, read_so_far: u64) -> Result<(), CheckpointError> {
        match *ev {
            Event::PostSuspendStart { checkpoint, .. } => {
                self.post_suspend(checkpoint, read_so_far).await?;
            }
            Event::LibxcCheckpoint { checkpoint, end } => {
                self.libxc_checkpoint(checkpoint, end)?;
            }
            Event::CheckpointComplete { checkpoint, .. } => {
                self.checkpoint_complete(checkpoint);
                self.metrics.checkpoints_total.inc();
                self.metrics.last_checkpoint.set(checkpoint);
            }
            _ => {}
        }
        Ok(())
    }

    /// The read loop: stdin → parser → epoch switches → backup, raced against what the
    /// backup says. `input` should be xl's pipe, already shrunk to `pipe_capacity`.
    pub async fn run<R, P>(&mut self, mut input: R, rep: &mut P) -> Result<Outcome, CheckpointError>
    where
        R: AsyncRead + Unpin + Send,
        P: Replicator,
    {
        let mut parser = Parser::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut events = Vec::new();
        let mut read_total: u64 = 0;
        let mut finished = false;
        loop {
            tokio::select! {
                // The backup first: an ACK that has arrived is committed before more of
                // the stream is read (sooner release; deterministic order at the end).
                biased;
                ev = rep.next_event() => match ev {
                    BackupEvent::Ack(n) => {
                        self.ack(n).await?;
                    }
                    BackupEvent::Lost(reason) => return self.lost(reason).await,
                },
                r = input.read(&mut buf) => {
                    let n = match r {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(CheckpointError::Input(e)),
                    };
                    if n == 0 {
                        let checkpoints = parser.checkpoints_complete();
                        info!(checkpoints, finished, "xl closed the stream");
                        match rep.finish(checkpoints, finished).await {
                            // The backup holds these whole: their output may go.
                            Ok(acks) => {
                                for a in acks {
                                    self.ack(a).await?;
                                }
                            }
                            Err(reason) => warn!(%reason, "the backup did not confirm the orderly close"),
                        }
                        return Ok(Outcome::StreamEnded { checkpoints, finished });
                    }
                    read_total += n as u64;
                    events.clear();
                    parser.feed(&buf[..n], &mut events)?;
                    for ev in &events {
                        if let Event::End { .. } = ev {
                            finished = true;
                        }
                        self.on_event(ev, read_total).await?;
                    }
                    self.metrics.stream_bytes_total.add(n as u64);
                    if let Err(reason) = rep.forward(&buf[..n], &events).await {
                        return self.lost(reason).await;
                    }
                }
            }
        }
    }

    async fn lost(&mut self, reason: String) -> Result<Outcome, CheckpointError> {
        let released = self.peer_lost().await?;
        Ok(Outcome::PeerLost {
            reason,
            released,
            last_acked: self.last_acked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake output buffer recording every call (state-machine tests only).
    #[derive(Default)]
    struct FakeBuffer {
        current: u64,
        calls: Vec<String>,
        committed: u64,
        open: bool,
        fail_checkpoint: bool,
    }

    impl FakeBuffer {
        fn new() -> Self {
            FakeBuffer {
                current: 1,
                ..Default::default()
            }
        }
    }

    impl NetBuffer for FakeBuffer {
        async fn checkpoint(&mut self) -> Result<u64, NetBufferError> {
            if self.fail_checkpoint {
                return Err(NetBufferError::Gone {
                    iface: "fake0".into(),
                    reason: "test".into(),
                });
            }
            let e = self.current;
            self.current += 1;
            self.calls.push(format!("checkpoint->{e}"));
            Ok(e)
        }
        async fn commit(&mut self, epoch: u64) -> Result<Released, NetBufferError> {
            if epoch >= self.current {
                return Err(NetBufferError::EpochNotClosed {
                    epoch,
                    current: self.current,
                });
            }
            assert!(
                epoch > self.committed,
                "commits go forward: {epoch} after {}",
                self.committed
            );
            self.committed = epoch;
            self.calls.push(format!("commit({epoch})"));
            Ok(Released {
                epoch,
                frames: 1,
                bytes: 60,
            })
        }
        async fn fail_open(&mut self) -> Result<Released, NetBufferError> {
            self.open = true;
            self.calls.push("fail_open".into());
            Ok(Released {
                epoch: self.current,
                frames: 3,
                bytes: 180,
            })
        }
    }

    const C: u64 = 4096;

    fn ctl() -> Controller<FakeBuffer> {
        Controller::new(FakeBuffer::new(), C, Arc::new(Metrics::new("test")))
    }

    #[tokio::test]
    async fn proven_checkpoints_commit_on_their_ack_in_order() {
        let mut c = ctl();
        assert_eq!(c.post_suspend(1, 10_000).await.unwrap(), 1);
        assert_eq!(
            c.libxc_checkpoint(1, 10_000 + C + 1).unwrap(),
            Decision::Proven { epoch: 1 }
        );
        assert_eq!(c.post_suspend(2, 20_000).await.unwrap(), 2);
        assert_eq!(
            c.libxc_checkpoint(2, 90_000).unwrap(),
            Decision::Proven { epoch: 2 }
        );
        c.checkpoint_complete(2);
        assert_eq!(c.ack(1).await.unwrap().map(|r| r.epoch), Some(1));
        assert_eq!(c.ack(2).await.unwrap().map(|r| r.epoch), Some(2));
        assert_eq!(
            c.buffer().calls,
            ["checkpoint->1", "checkpoint->2", "commit(1)", "commit(2)"]
        );
        assert_eq!(c.merges(), 0);
    }

    #[tokio::test]
    async fn the_bound_is_strict() {
        // P == R + C: libxc may have written all of it into the pipe already.
        let mut c = ctl();
        c.post_suspend(1, 500).await.unwrap();
        assert_eq!(
            c.libxc_checkpoint(1, 500 + C).unwrap(),
            Decision::Merged { epoch: 1 }
        );
        assert_eq!(c.merges(), 1);
        assert_eq!(c.metrics.epoch_merges_total.get(), 1);
    }

    #[tokio::test]
    async fn unproven_epoch_is_merged_into_the_next_proven_commit() {
        let mut c = ctl();
        c.post_suspend(1, 1000).await.unwrap();
        assert_eq!(
            c.libxc_checkpoint(1, 1200).unwrap(),
            Decision::Merged { epoch: 1 }
        );
        // ACK(1) must release nothing: epoch 1 may hold frames of after the resume.
        c.checkpoint_complete(1);
        assert_eq!(c.ack(1).await.unwrap(), None);
        c.post_suspend(2, 50_000).await.unwrap();
        assert_eq!(
            c.libxc_checkpoint(2, 70_000).unwrap(),
            Decision::Proven { epoch: 2 }
        );
        // ACK(2) commits epoch 2 and with it (commit is cumulative) epoch 1.
        c.checkpoint_complete(2);
        assert_eq!(c.ack(2).await.unwrap().map(|r| r.epoch), Some(2));
        assert_eq!(
            c.buffer().calls,
            ["checkpoint->1", "checkpoint->2", "commit(2)"]
        );
        assert_eq!(c.committed_epoch(), 2);
    }

    #[tokio::test]
    async fn a_later_ack_covers_earlier_checkpoints() {
        let mut c = ctl();
        for n in 1..=3u64 {
            c.post_suspend(n, n * 100_000).await.unwrap();
            c.libxc_checkpoint(n, n * 100_000 + 2 * C).unwrap();
            c.checkpoint_complete(n);
        }
        // ACK(3) alone: one commit of the highest epoch; later ACK(2) is stale.
        assert_eq!(c.ack(3).await.unwrap().map(|r| r.epoch), Some(3));
        assert_eq!(c.ack(2).await.unwrap(), None);
        assert_eq!(
            c.buffer()
                .calls
                .iter()
                .filter(|s| s.starts_with("commit"))
                .count(),
            1
        );
    }

    #[tokio::test]
    async fn merged_then_ack_of_merged_only_releases_nothing() {
        let mut c = ctl();
        c.post_suspend(1, 1000).await.unwrap();
        c.libxc_checkpoint(1, 2000).unwrap();
        c.post_suspend(2, 3000).await.unwrap();
        c.libxc_checkpoint(2, 3500).unwrap();
        c.checkpoint_complete(2);
        assert_eq!(c.ack(2).await.unwrap(), None);
        assert_eq!(c.merges(), 2);
        assert!(c.buffer().calls.iter().all(|s| !s.starts_with("commit")));
    }

    #[tokio::test]
    async fn events_out_of_order_are_errors() {
        let mut c = ctl();
        assert!(matches!(
            c.libxc_checkpoint(1, 10),
            Err(CheckpointError::OutOfOrder(_))
        ));
        c.post_suspend(1, 10).await.unwrap();
        assert!(matches!(
            c.post_suspend(2, 20).await,
            Err(CheckpointError::OutOfOrder(_))
        ));
        assert!(matches!(
            c.libxc_checkpoint(2, 10_000),
            Err(CheckpointError::OutOfOrder(_))
        ));
    }

    #[tokio::test]
    async fn buffer_failure_is_reported() {
        let mut c = ctl();
        c.buffer.fail_checkpoint = true;
        let e = c.post_suspend(1, 10).await.unwrap_err().to_string();
        assert!(e.contains("fake0"), "{e}");
    }

    #[tokio::test]
    async fn loss_fails_open_and_forgets_pending_commits() {
        let mut c = ctl();
        c.post_suspend(1, 1000).await.unwrap();
        c.libxc_checkpoint(1, 100_000).unwrap();
        c.checkpoint_complete(1);
        c.peer_lost().await.unwrap();
        assert!(c.buffer().open);
        assert_eq!(
            c.buffer().calls.last().map(String::as_str),
            Some("fail_open")
        );
        // The pending proven checkpoint was forgotten: a late ACK(1) commits nothing.
        assert_eq!(c.ack(1).await.unwrap(), None);
        assert!(c.buffer().calls.iter().all(|s| !s.starts_with("commit")));
    }

    #[tokio::test]
    async fn an_ack_beyond_what_was_sent_is_refused_and_releases_nothing() {
        let mut c = ctl();
        c.post_suspend(1, 1000).await.unwrap();
        c.libxc_checkpoint(1, 100_000).unwrap();
        // CHECKPOINT_END of 1 not parsed yet: the backup cannot hold checkpoint 1.
        assert!(matches!(
            c.ack(1).await,
            Err(CheckpointError::BogusAck {
                acked: 1,
                completed: 0
            })
        ));
        c.checkpoint_complete(1);
        assert!(matches!(
            c.ack(u64::MAX).await,
            Err(CheckpointError::BogusAck { .. })
        ));
        assert!(c.buffer().calls.iter().all(|s| !s.starts_with("commit")));
        assert!(!c.buffer().open, "a bogus ACK must fail closed, not open");
        assert_eq!(c.ack(1).await.unwrap().map(|r| r.epoch), Some(1));
    }

    /// A fake backup: records what it was sent; answers with scripted events.
    struct FakeReplicator {
        sent: Vec<u8>,
        script: std::collections::VecDeque<BackupEvent>,
        finished: Option<(u64, bool)>,
    }

    impl Replicator for FakeReplicator {
        async fn forward(&mut self, bytes: &[u8], _events: &[Event]) -> Result<(), String> {
            self.sent.extend_from_slice(bytes);
            Ok(())
        }
        async fn next_event(&mut self) -> BackupEvent {
            match self.script.pop_front() {
                Some(e) => e,
                None => std::future::pending().await,
            }
        }
        async fn finish(&mut self, checkpoints: u64, finished: bool) -> Result<Vec<u64>, String> {
            self.finished = Some((checkpoints, finished));
            Ok(Vec::new())
        }
    }

    /// A fake backup that acknowledges every checkpoint as soon as its last byte was
    /// forwarded (state-machine tests only).
    #[derive(Default)]
    struct FakeAckingReplicator {
        sent: Vec<u8>,
        acks: std::collections::VecDeque<u64>,
    }

    impl Replicator for FakeAckingReplicator {
        async fn forward(&mut self, bytes: &[u8], events: &[Event]) -> Result<(), String> {
            self.sent.extend_from_slice(bytes);
            for e in events {
                if let Event::CheckpointComplete { checkpoint, .. } = e {
                    self.acks.push_back(*checkpoint);
                }
            }
            Ok(())
        }
        async fn next_event(&mut self) -> BackupEvent {
            match self.acks.pop_front() {
                Some(n) => BackupEvent::Ack(n),
                None => std::future::pending().await,
            }
        }
        async fn finish(&mut self, _: u64, _: bool) -> Result<Vec<u64>, String> {
            Ok(self.acks.drain(..).collect())
        }
    }

    /// Feeds `stream` through a one-page "pipe" (reads of at most 4096 bytes).
    async fn run_stream(
        stream: Vec<u8>,
        capacity: u64,
    ) -> (Controller<FakeBuffer>, FakeAckingReplicator, Outcome) {
        let (mut w, r) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            w.write_all(&stream).await.unwrap();
        });
        let mut c = Controller::new(FakeBuffer::new(), capacity, Arc::new(Metrics::new("test")));
        let mut rep = FakeAckingReplicator::default();
        let out = c.run(r, &mut rep).await.unwrap();
        writer.await.unwrap();
        (c, rep, out)
    }

    #[tokio::test]
    async fn run_on_a_stream_switches_proves_and_commits_each_checkpoint() {
        let w = crate::stream::writer::write(&crate::stream::writer::WriterConfig::pv(4));
        let (c, rep, out) = run_stream(w.bytes.clone(), C).await;
        assert_eq!(
            out,
            Outcome::StreamEnded {
                checkpoints: 4,
                finished: false
            }
        );
        assert!(
            rep.sent == w.bytes,
            "forwarded bytes differ from the stream"
        );
        assert_eq!(c.merges(), 0);
        // Each epoch closed at its checkpoint's first post-suspend byte, committed on its
        // ACK, in order (the fake asserts commits only go forward).
        let commits: Vec<&String> = c
            .buffer()
            .calls
            .iter()
            .filter(|s| s.starts_with("commit"))
            .collect();
        assert_eq!(
            commits,
            ["commit(1)", "commit(2)", "commit(3)", "commit(4)"]
        );
        assert_eq!(c.committed_epoch(), 4);
        assert_eq!(c.metrics.checkpoints_total.get(), 4);
    }

    #[tokio::test]
    async fn run_with_an_unprovable_pipe_merges_and_never_commits() {
        // A pipe so large that libxc could always have finished: nothing is provable, so
        // nothing may ever be released on an ACK.
        let w = crate::stream::writer::write(&crate::stream::writer::WriterConfig::hvm(3));
        let (c, _, _) = run_stream(w.bytes, 1 << 40).await;
        assert_eq!(c.merges(), 3);
        assert!(
            c.buffer().calls.iter().all(|s| !s.starts_with("commit")),
            "{:?}",
            c.buffer().calls
        );
        assert_eq!(c.last_acked(), 3);
        assert_eq!(
            c.buffer().calls,
            ["checkpoint->1", "checkpoint->2", "checkpoint->3"]
        );
    }

    /// A fake backup whose ACKs all arrive with its CLOSE answer (tests only).
    #[derive(Default)]
    struct FakeLateAckReplicator {
        completed: Vec<u64>,
    }

    impl Replicator for FakeLateAckReplicator {
        async fn forward(&mut self, _: &[u8], events: &[Event]) -> Result<(), String> {
            for e in events {
                if let Event::CheckpointComplete { checkpoint, .. } = e {
                    self.completed.push(*checkpoint);
                }
            }
            Ok(())
        }
        async fn next_event(&mut self) -> BackupEvent {
            std::future::pending().await
        }
        async fn finish(&mut self, _: u64, _: bool) -> Result<Vec<u64>, String> {
            Ok(std::mem::take(&mut self.completed))
        }
    }

    #[tokio::test]
    async fn acks_that_come_with_the_close_answer_still_commit() {
        let w = crate::stream::writer::write(&crate::stream::writer::WriterConfig::pv(3));
        let (mut wr, r) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            wr.write_all(&w.bytes).await.unwrap();
        });
        let mut c = ctl();
        let mut rep = FakeLateAckReplicator::default();
        let out = c.run(r, &mut rep).await.unwrap();
        writer.await.unwrap();
        assert_eq!(
            out,
            Outcome::StreamEnded {
                checkpoints: 3,
                finished: false
            }
        );
        assert_eq!(c.last_acked(), 3);
        assert_eq!(c.committed_epoch(), 3);
    }

    #[tokio::test]
    async fn run_fails_open_when_the_backup_is_lost() {
        let mut c = ctl();
        let mut rep = FakeReplicator {
            sent: Vec::new(),
            script: [BackupEvent::Lost("heartbeat timeout".into())].into(),
            finished: None,
        };
        // Input that never yields: the loss must win.
        let (_keep, input) = tokio::io::duplex(16);
        let out = c.run(input, &mut rep).await.unwrap();
        match out {
            Outcome::PeerLost {
                reason,
                released,
                last_acked,
            } => {
                assert_eq!(reason, "heartbeat timeout");
                assert_eq!(released.frames, 3);
                assert_eq!(last_acked, 0);
            }
            other => panic!("{other:?}"),
        }
        assert!(c.buffer().open);
    }

    #[tokio::test]
    async fn run_on_empty_input_closes_in_order() {
        let mut c = ctl();
        let mut rep = FakeReplicator {
            sent: Vec::new(),
            script: Default::default(),
            finished: None,
        };
        let out = c.run(&b""[..], &mut rep).await.unwrap();
        assert_eq!(
            out,
            Outcome::StreamEnded {
                checkpoints: 0,
                finished: false
            }
        );
        assert_eq!(rep.finished, Some((0, false)));
        assert!(!c.buffer().open);
    }
}
