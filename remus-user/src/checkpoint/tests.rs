//! The relay-mode driver with fakes: the pipe proof, commits in order, merges, ACKs that
//! come late or bogus, loss, and whole runs over generated streams.
use std::collections::VecDeque;
use std::sync::Arc;

use super::*;
use crate::metrics::Metrics;
use crate::stream::Event;

/// What the fake buffer was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    Cut(u64),
    Commit(u64),
    FailOpen,
}

/// A fake output buffer recording every call (state-machine tests only).
#[derive(Default)]
struct FakeBuffer {
    current: u64,
    calls: Vec<Call>,
    committed: u64,
    open: bool,
    fail_cut: bool,
}

impl FakeBuffer {
    fn new() -> Self {
        FakeBuffer {
            current: 1,
            ..Default::default()
        }
    }
    fn commits(&self) -> Vec<u64> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::Commit(e) => Some(*e),
                _ => None,
            })
            .collect()
    }
}

impl NetBuffer for FakeBuffer {
    async fn close_epoch(&mut self) -> Result<u64, NetBufferError> {
        if self.fail_cut {
            return Err(NetBufferError::Gone {
                iface: "fake0".into(),
                reason: "test".into(),
            });
        }
        let e = self.current;
        self.current += 1;
        self.calls.push(Call::Cut(e));
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
        self.calls.push(Call::Commit(epoch));
        Ok(Released {
            epoch,
            frames: 1,
            bytes: 60,
        })
    }
    async fn fail_open(&mut self) -> Result<Released, NetBufferError> {
        self.open = true;
        self.calls.push(Call::FailOpen);
        Ok(Released {
            epoch: self.current,
            frames: 3,
            bytes: 180,
        })
    }
}

const C: u64 = 4096;

fn driver() -> RelayDriver<FakeBuffer> {
    RelayDriver::new(FakeBuffer::new(), C, Arc::new(Metrics::new("test")))
}

/// Stream events as the parser reports them, and the pipe position at each.
async fn suspend(
    d: &mut RelayDriver<FakeBuffer>,
    n: u64,
    read: u64,
) -> Result<(), CheckpointError> {
    let ev = Event::PostSuspendStart {
        checkpoint: n,
        pos: read,
    };
    d.on_stream_event(&ev, read).await
}

async fn libxc_checkpoint(
    d: &mut RelayDriver<FakeBuffer>,
    n: u64,
    end: u64,
) -> Result<(), CheckpointError> {
    let ev = Event::LibxcCheckpoint { checkpoint: n, end };
    d.on_stream_event(&ev, end).await
}

async fn complete(d: &mut RelayDriver<FakeBuffer>, n: u64) {
    let ev = Event::CheckpointComplete {
        checkpoint: n,
        end: 0,
    };
    d.on_stream_event(&ev, 0).await.unwrap();
}

async fn ack(d: &mut RelayDriver<FakeBuffer>, n: u64) -> Result<(), CheckpointError> {
    d.apply(Input::Ack { checkpoint: n }).await
}

#[tokio::test]
async fn proven_checkpoints_commit_on_their_ack_in_order() {
    let mut d = driver();
    suspend(&mut d, 1, 10_000).await.unwrap();
    libxc_checkpoint(&mut d, 1, 10_000 + C + 1).await.unwrap();
    complete(&mut d, 1).await;
    suspend(&mut d, 2, 20_000).await.unwrap();
    libxc_checkpoint(&mut d, 2, 90_000).await.unwrap();
    complete(&mut d, 2).await;
    ack(&mut d, 1).await.unwrap();
    ack(&mut d, 2).await.unwrap();
    assert_eq!(
        d.buffer().calls,
        [Call::Cut(1), Call::Cut(2), Call::Commit(1), Call::Commit(2)]
    );
    assert_eq!(d.merges(), 0);
    assert_eq!(d.committed_epoch(), 2);
}

#[tokio::test]
async fn the_pipe_bound_is_strict() {
    // P == R + C: libxc may have written all of it into the pipe already.
    let mut d = driver();
    suspend(&mut d, 1, 500).await.unwrap();
    libxc_checkpoint(&mut d, 1, 500 + C).await.unwrap();
    assert_eq!(d.merges(), 1);
    assert_eq!(d.metrics.epoch_merges_total.get(), 1);
    complete(&mut d, 1).await;
    ack(&mut d, 1).await.unwrap();
    assert!(d.buffer().commits().is_empty());
}

#[tokio::test]
async fn unproven_epoch_is_merged_into_the_next_proven_commit() {
    let mut d = driver();
    suspend(&mut d, 1, 1000).await.unwrap();
    libxc_checkpoint(&mut d, 1, 1200).await.unwrap();
    complete(&mut d, 1).await;
    // ACK(1) must release nothing: epoch 1 may hold frames of after the resume.
    ack(&mut d, 1).await.unwrap();
    assert!(d.buffer().commits().is_empty());
    suspend(&mut d, 2, 50_000).await.unwrap();
    libxc_checkpoint(&mut d, 2, 70_000).await.unwrap();
    complete(&mut d, 2).await;
    // ACK(2) commits epoch 2 and with it (commit is cumulative) epoch 1.
    ack(&mut d, 2).await.unwrap();
    assert_eq!(
        d.buffer().calls,
        [Call::Cut(1), Call::Cut(2), Call::Commit(2)]
    );
    assert_eq!(d.committed_epoch(), 2);
}

#[tokio::test]
async fn a_later_ack_covers_earlier_checkpoints_and_stale_acks_release_nothing() {
    let mut d = driver();
    for n in 1..=3u64 {
        suspend(&mut d, n, n * 100_000).await.unwrap();
        libxc_checkpoint(&mut d, n, n * 100_000 + 2 * C)
            .await
            .unwrap();
        complete(&mut d, n).await;
    }
    ack(&mut d, 3).await.unwrap();
    ack(&mut d, 2).await.unwrap();
    ack(&mut d, 3).await.unwrap();
    assert_eq!(d.buffer().commits(), [3]);
    assert_eq!(d.last_acked(), 3);
}

#[tokio::test]
async fn a_checkpoint_record_without_its_cut_aborts_the_machine() {
    let mut d = driver();
    assert!(matches!(
        libxc_checkpoint(&mut d, 1, 10).await,
        Err(CheckpointError::Machine(MachineError::Unexpected {
            input: machine::InputKind::Proof,
            phase: Phase::Running
        }))
    ));
    assert_eq!(d.state().phase(), Phase::Aborted);
    // Aborted stays aborted: nothing more is cut or released.
    assert!(suspend(&mut d, 1, 10).await.is_err());
    assert!(d.buffer().calls.is_empty());
}

#[tokio::test]
async fn a_second_suspend_before_the_proof_is_refused() {
    let mut d = driver();
    suspend(&mut d, 1, 10).await.unwrap();
    assert!(matches!(
        suspend(&mut d, 2, 20).await,
        Err(CheckpointError::Machine(MachineError::Unexpected {
            input: machine::InputKind::Suspended,
            phase: Phase::Suspended
        }))
    ));
}

#[tokio::test]
async fn a_proof_of_another_checkpoint_is_refused() {
    let mut d = driver();
    suspend(&mut d, 1, 10).await.unwrap();
    // The pipe proof has no cut for checkpoint 2, so it proves nothing; the machine
    // names the mismatch.
    assert!(matches!(
        libxc_checkpoint(&mut d, 2, 10_000).await,
        Err(CheckpointError::Machine(MachineError::WrongCheckpoint {
            expected: 1,
            got: 2,
            ..
        }))
    ));
}

#[tokio::test]
async fn buffer_failure_is_reported() {
    let mut d = driver();
    d.buffer.fail_cut = true;
    match suspend(&mut d, 1, 10).await {
        Err(CheckpointError::Buffer(NetBufferError::Gone { iface, .. })) => {
            assert_eq!(iface, "fake0")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn loss_fails_open_and_forgets_pending_commits() {
    let mut d = driver();
    suspend(&mut d, 1, 1000).await.unwrap();
    libxc_checkpoint(&mut d, 1, 100_000).await.unwrap();
    complete(&mut d, 1).await;
    let end = d
        .lost(LossReason::new(LossKind::Silence, "test"))
        .await
        .unwrap();
    assert!(matches!(end, RunEnd::Lost { checkpoint: 0, .. }));
    assert!(d.buffer().open);
    assert_eq!(d.buffer().calls.last(), Some(&Call::FailOpen));
    // The pending proven checkpoint was forgotten: a late ACK(1) commits nothing.
    ack(&mut d, 1).await.unwrap();
    assert!(d.buffer().commits().is_empty());
    assert_eq!(d.state().phase(), Phase::Unprotected);
}

#[tokio::test]
async fn an_ack_beyond_what_was_sent_is_refused_and_releases_nothing() {
    let mut d = driver();
    suspend(&mut d, 1, 1000).await.unwrap();
    libxc_checkpoint(&mut d, 1, 100_000).await.unwrap();
    // CHECKPOINT_END of 1 not parsed yet: the backup cannot hold checkpoint 1.
    assert!(matches!(
        ack(&mut d, 1).await,
        Err(CheckpointError::Machine(MachineError::BogusAck(
            crate::output_commit::BogusAck { acked: 1, sent: 0 }
        )))
    ));
    assert!(d.buffer().commits().is_empty());
    assert!(!d.buffer().open, "a bogus ACK must fail closed, not open");
    assert_eq!(d.state().phase(), Phase::Aborted);
}

#[tokio::test]
async fn an_ack_of_u64_max_is_refused_without_overflow() {
    let mut d = driver();
    suspend(&mut d, 1, 1000).await.unwrap();
    libxc_checkpoint(&mut d, 1, 100_000).await.unwrap();
    complete(&mut d, 1).await;
    assert!(matches!(
        ack(&mut d, u64::MAX).await,
        Err(CheckpointError::Machine(MachineError::BogusAck(_)))
    ));
    assert!(d.buffer().commits().is_empty());
    assert!(!d.buffer().open);
}

/// A fake backup: records what it was sent; answers with scripted events, and DISCARD
/// with `discard` (`None`: never answers, as a backup that is gone).
struct FakeReplicator {
    sent: Vec<u8>,
    script: VecDeque<BackupEvent>,
    finished: Option<(u64, bool)>,
    discard: Option<DiscardedCopy>,
    discard_asked: bool,
}

impl FakeReplicator {
    fn new(script: impl Into<VecDeque<BackupEvent>>) -> Self {
        FakeReplicator {
            sent: Vec::new(),
            script: script.into(),
            finished: None,
            discard: None,
            discard_asked: false,
        }
    }
}

impl Replicator for FakeReplicator {
    async fn forward(&mut self, bytes: &[u8], _events: &[Event]) -> Result<(), ReplicatorError> {
        self.sent.extend_from_slice(bytes);
        Ok(())
    }
    async fn next_event(&mut self) -> BackupEvent {
        match self.script.pop_front() {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }
    async fn finish(
        &mut self,
        checkpoints: u64,
        finished: bool,
    ) -> Result<Vec<u64>, ReplicatorError> {
        self.finished = Some((checkpoints, finished));
        Ok(Vec::new())
    }
    async fn discard(&mut self) -> Result<DiscardedCopy, ReplicatorError> {
        self.discard_asked = true;
        self.discard
            .ok_or(ReplicatorError::NoDiscardAnswer(std::time::Duration::ZERO))
    }
}

/// A fake backup that acknowledges every checkpoint as soon as its last byte was
/// forwarded (state-machine tests only).
#[derive(Default)]
struct FakeAckingReplicator {
    sent: Vec<u8>,
    acks: VecDeque<u64>,
}

impl Replicator for FakeAckingReplicator {
    async fn forward(&mut self, bytes: &[u8], events: &[Event]) -> Result<(), ReplicatorError> {
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
    async fn finish(&mut self, _: u64, _: bool) -> Result<Vec<u64>, ReplicatorError> {
        Ok(self.acks.drain(..).collect())
    }
    async fn discard(&mut self) -> Result<DiscardedCopy, ReplicatorError> {
        // ACKs not yet taken are dropped: the backup killed its receiver.
        let checkpoint = self.acks.drain(..).next_back().unwrap_or(0);
        Ok(DiscardedCopy {
            checkpoint,
            copy_destroyed: true,
        })
    }
}

/// Feeds `stream` through a one-page "pipe" (reads of at most 4096 bytes).
async fn run_stream(
    stream: Vec<u8>,
    capacity: u64,
) -> (RelayDriver<FakeBuffer>, FakeAckingReplicator, RunEnd) {
    let (mut w, r) = tokio::io::duplex(4096);
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        w.write_all(&stream).await.unwrap();
    });
    let mut d = RelayDriver::new(FakeBuffer::new(), capacity, Arc::new(Metrics::new("test")));
    let mut rep = FakeAckingReplicator::default();
    let out = d.run(r, &mut rep).await.unwrap();
    writer.await.unwrap();
    (d, rep, out)
}

#[tokio::test]
async fn run_on_a_stream_cuts_proves_and_commits_each_checkpoint() {
    let w = crate::stream::writer::write(&crate::stream::writer::WriterConfig::pv(4));
    let (d, rep, out) = run_stream(w.bytes.clone(), C).await;
    assert_eq!(
        out,
        RunEnd::Closed {
            checkpoints: 4,
            finished: false
        }
    );
    assert!(
        rep.sent == w.bytes,
        "forwarded bytes differ from the stream"
    );
    assert_eq!(d.merges(), 0);
    // Each epoch cut at its checkpoint's first post-suspend byte, committed on its ACK,
    // in order (the fake asserts commits only go forward).
    assert_eq!(d.buffer().commits(), [1, 2, 3, 4]);
    assert_eq!(d.committed_epoch(), 4);
    assert_eq!(d.metrics.checkpoints_total.get(), 4);
    assert_eq!(d.metrics.committed_epoch.get(), 4);
}

#[tokio::test]
async fn run_with_an_unprovable_pipe_merges_and_never_commits() {
    // A pipe so large that libxc could always have finished: nothing is provable, so
    // nothing may ever be released on an ACK.
    let w = crate::stream::writer::write(&crate::stream::writer::WriterConfig::hvm(3));
    let (d, _, _) = run_stream(w.bytes, 1 << 40).await;
    assert_eq!(d.merges(), 3);
    assert_eq!(d.last_acked(), 3);
    assert_eq!(d.buffer().calls, [Call::Cut(1), Call::Cut(2), Call::Cut(3)]);
}

/// A fake backup whose ACKs all arrive with its CLOSE answer (tests only).
#[derive(Default)]
struct FakeLateAckReplicator {
    completed: Vec<u64>,
}

impl Replicator for FakeLateAckReplicator {
    async fn forward(&mut self, _: &[u8], events: &[Event]) -> Result<(), ReplicatorError> {
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
    async fn finish(&mut self, _: u64, _: bool) -> Result<Vec<u64>, ReplicatorError> {
        Ok(std::mem::take(&mut self.completed))
    }
    async fn discard(&mut self) -> Result<DiscardedCopy, ReplicatorError> {
        Err(ReplicatorError::NoDiscardAnswer(std::time::Duration::ZERO))
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
    let mut d = driver();
    let mut rep = FakeLateAckReplicator::default();
    let out = d.run(r, &mut rep).await.unwrap();
    writer.await.unwrap();
    assert_eq!(
        out,
        RunEnd::Closed {
            checkpoints: 3,
            finished: false
        }
    );
    assert_eq!(d.last_acked(), 3);
    assert_eq!(d.committed_epoch(), 3);
}

#[tokio::test]
async fn run_fails_open_when_the_backup_is_lost() {
    let mut d = driver();
    let mut rep = FakeReplicator::new([BackupEvent::Lost(LossReason::new(
        LossKind::Silence,
        "heartbeat timeout",
    ))]);
    // Input that never yields: the loss must win.
    let (_keep, input) = tokio::io::duplex(16);
    let out = d.run(input, &mut rep).await.unwrap();
    match out {
        RunEnd::Lost { reason, checkpoint } => {
            assert_eq!(reason.kind, LossKind::Silence);
            assert_eq!(checkpoint, 0);
        }
        other => panic!("{other:?}"),
    }
    assert!(d.buffer().open);
    match d.state() {
        State::Unprotected { released, .. } => assert_eq!(released.frames, 3),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn run_on_empty_input_closes_in_order() {
    let mut d = driver();
    let mut rep = FakeReplicator::new([]);
    let out = d.run(&b""[..], &mut rep).await.unwrap();
    assert_eq!(
        out,
        RunEnd::Closed {
            checkpoints: 0,
            finished: false
        }
    );
    assert_eq!(rep.finished, Some((0, false)));
    assert!(!d.buffer().open);
    assert_eq!(d.state().phase(), Phase::Ended);
}

/// A driver whose end of protection is asked for at once.
fn driver_asked_to_end() -> (RelayDriver<FakeBuffer>, tokio::sync::watch::Sender<bool>) {
    let (tx, rx) = tokio::sync::watch::channel(true);
    (driver().end_on_request(rx), tx)
}

#[tokio::test]
async fn ending_protection_releases_once_the_backup_confirmed_the_discard() {
    let (mut d, _tx) = driver_asked_to_end();
    let mut rep = FakeReplicator::new([]);
    rep.discard = Some(DiscardedCopy {
        checkpoint: 0,
        copy_destroyed: true,
    });
    // Input that never yields: the request must be carried out without xl's stream.
    let (_keep, input) = tokio::io::duplex(16);
    let out = d.run(input, &mut rep).await.unwrap();
    assert_eq!(
        out,
        RunEnd::Discarded {
            checkpoint: 0,
            copy_destroyed: true
        }
    );
    assert!(rep.discard_asked);
    assert_eq!(d.buffer().calls, [Call::FailOpen]);
    match d.state() {
        State::Unprotected { reason, .. } => assert_eq!(reason.kind, LossKind::Discarded),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn ending_protection_unconfirmed_releases_nothing() {
    let (mut d, _tx) = driver_asked_to_end();
    let mut rep = FakeReplicator::new([]);
    let (_keep, input) = tokio::io::duplex(16);
    match d.run(input, &mut rep).await {
        Err(CheckpointError::EndUnconfirmed(ReplicatorError::NoDiscardAnswer(_))) => {}
        other => panic!("{other:?}"),
    }
    assert!(rep.discard_asked);
    assert!(
        !d.buffer().open,
        "nothing may be released without the backup's word"
    );
    assert!(d.buffer().calls.is_empty());
    assert_eq!(d.state().phase(), Phase::Running);
}

#[tokio::test]
async fn ending_protection_mid_stream_commits_only_acked_epochs_before_opening() {
    // Checkpoints 1-2 and half of 3 flow, each acknowledged when whole; then the end is
    // asked for. Whatever was committed went in order; the last thing is the opening.
    let w = crate::stream::writer::write(&crate::stream::writer::WriterConfig::pv(3));
    let ends: Vec<u64> = w
        .events
        .iter()
        .filter_map(|e| match *e {
            Event::CheckpointComplete { end, .. } => Some(end),
            _ => None,
        })
        .collect();
    let cut = ((ends[1] + ends[2]) / 2) as usize;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (mut wr, r) = tokio::io::duplex(4096);
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        wr.write_all(&w.bytes[..cut]).await.unwrap();
        tx.send_replace(true);
        // The pipe stays open, as xl's does while it waits.
        std::future::pending::<()>().await;
        drop(wr);
    });
    let mut d = driver().end_on_request(rx);
    let mut rep = FakeAckingReplicator::default();
    let out = d.run(r, &mut rep).await.unwrap();
    writer.abort();
    assert!(matches!(out, RunEnd::Discarded { .. }), "{out:?}");
    let calls = &d.buffer().calls;
    assert_eq!(calls.last(), Some(&Call::FailOpen));
    assert_eq!(calls.iter().filter(|c| **c == Call::FailOpen).count(), 1);
    assert!(d.buffer().commits().iter().all(|e| *e <= 2));
}
