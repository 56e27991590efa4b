//! The relay-mode driver with fakes: the pipe proof (the fill read after the cut), sizing
//! xl's pipe, commits in order, merges told to the backup, ACKs that come late or bogus,
//! loss, phase timings, and whole runs over generated streams.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;

use super::*;
use crate::metrics::Metrics;
use crate::stream::Event;

/// What the fake buffer and the fake pipe were asked to do, in one order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    Cut(u64),
    Commit(u64),
    FailOpen,
    /// The pipe's fill was read.
    Fill,
    /// The pipe was resized to this many bytes.
    Resize(u64),
    /// A fake disk cut its epoch: (disk, epoch).
    DiskCut(&'static str, u64),
}

type Log = Arc<Mutex<Vec<Call>>>;

/// A fake output buffer recording every call (state-machine tests only).
#[derive(Default)]
struct FakeBuffer {
    current: u64,
    calls: Vec<Call>,
    log: Log,
    committed: u64,
    open: bool,
    fail_cut: bool,
}

impl FakeBuffer {
    fn with_log(log: Log) -> Self {
        FakeBuffer {
            current: 1,
            log,
            ..Default::default()
        }
    }
    fn call(&mut self, c: Call) {
        self.log.lock().unwrap().push(c.clone());
        self.calls.push(c);
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
        self.call(Call::Cut(e));
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
        self.call(Call::Commit(epoch));
        Ok(Released {
            epoch,
            frames: 1,
            bytes: 60,
        })
    }
    async fn fail_open(&mut self) -> Result<Released, NetBufferError> {
        self.open = true;
        self.call(Call::FailOpen);
        Ok(Released {
            epoch: self.current,
            frames: 3,
            bytes: 180,
        })
    }
}

/// A fake of xl's pipe (tests only): its fill is `before_cut` until the buffer's log
/// shows a cut after the last fill read, then `after_cut`; resizes are granted unless
/// `busy`.
#[derive(Default)]
struct FakePipe {
    log: Log,
    before_cut: u64,
    after_cut: u64,
    busy: bool,
    fail: bool,
}

impl PipeGauge for FakePipe {
    fn fill(&mut self) -> std::io::Result<u64> {
        if self.fail {
            return Err(std::io::Error::from_raw_os_error(libc::EBADF));
        }
        let mut log = self.log.lock().unwrap();
        let last_fill = log.iter().rposition(|c| *c == Call::Fill);
        let cut_since = log
            .iter()
            .enumerate()
            .any(|(i, c)| matches!(c, Call::Cut(_)) && last_fill.is_none_or(|f| i > f));
        log.push(Call::Fill);
        Ok(if cut_since {
            self.after_cut
        } else {
            self.before_cut
        })
    }
    fn resize(&mut self, bytes: u64) -> std::io::Result<u64> {
        if self.busy {
            return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
        }
        self.log.lock().unwrap().push(Call::Resize(bytes));
        Ok(bytes)
    }
}

/// F: what the fake pipe holds after each cut.
const F: u64 = 4096;

type Driver<D = NoDisk> = RelayDriver<FakeBuffer, FakePipe, D>;

fn driver_with(before_cut: u64, after_cut: u64) -> Driver {
    let log = Log::default();
    let pipe = FakePipe {
        log: log.clone(),
        before_cut,
        after_cut,
        ..Default::default()
    };
    RelayDriver::new(
        FakeBuffer::with_log(log),
        pipe,
        4096,
        PipeSizes::default(),
        Arc::new(Metrics::new("test")),
    )
}

fn driver() -> Driver {
    driver_with(F, F)
}

fn log_of<D: DiskBarrier>(d: &Driver<D>) -> Vec<Call> {
    d.buffer().log.lock().unwrap().clone()
}

/// Stream events as the parser reports them, and the pipe position at each.
async fn suspend<D: DiskBarrier>(
    d: &mut Driver<D>,
    n: u64,
    read: u64,
) -> Result<(), CheckpointError> {
    let ev = Event::PostSuspendStart {
        checkpoint: n,
        pos: read,
    };
    d.on_stream_event(&ev, read).await
}

async fn libxc_checkpoint<D: DiskBarrier>(
    d: &mut Driver<D>,
    n: u64,
    end: u64,
) -> Result<(), CheckpointError> {
    let ev = Event::LibxcCheckpoint { checkpoint: n, end };
    d.on_stream_event(&ev, end).await
}

async fn complete<D: DiskBarrier>(d: &mut Driver<D>, n: u64) {
    let ev = Event::CheckpointComplete {
        checkpoint: n,
        end: 0,
    };
    d.on_stream_event(&ev, 0).await.unwrap();
}

async fn ack<D: DiskBarrier>(d: &mut Driver<D>, n: u64) -> Result<(), CheckpointError> {
    d.apply(Input::Ack { checkpoint: n }).await
}

#[tokio::test]
async fn proven_checkpoints_commit_on_their_ack_in_order() {
    let mut d = driver();
    suspend(&mut d, 1, 10_000).await.unwrap();
    libxc_checkpoint(&mut d, 1, 10_000 + F + 1).await.unwrap();
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
    // P == R + F: libxc may have written all of it into the pipe already.
    let mut d = driver();
    suspend(&mut d, 1, 500).await.unwrap();
    libxc_checkpoint(&mut d, 1, 500 + F).await.unwrap();
    assert_eq!(d.merges(), 1);
    assert_eq!(d.take_merged(), [1], "the backup must hear of the merge");
    assert_eq!(d.metrics.epoch_merges_total.get(), 1);
    complete(&mut d, 1).await;
    ack(&mut d, 1).await.unwrap();
    assert!(d.buffer().commits().is_empty());
}

#[tokio::test]
async fn the_fill_is_read_after_the_cut_took_effect() {
    // Before the cut the pipe looks empty; once the cut is made, xl has filled it. A
    // driver that read the fill first would prove this cut; the right order merges it.
    let mut d = driver_with(0, 1 << 20);
    suspend(&mut d, 1, 10_000).await.unwrap();
    libxc_checkpoint(&mut d, 1, 10_000 + 64 * 1024)
        .await
        .unwrap();
    assert_eq!(d.merges(), 1);
    let log = log_of(&d);
    let cut = log.iter().position(|c| *c == Call::Cut(1)).unwrap();
    let fill = log.iter().position(|c| *c == Call::Fill).unwrap();
    assert!(cut < fill, "the fill must be read after the cut: {log:?}");
    // The twin: a full pipe before the cut and an empty one after it proves the cut.
    let mut d = driver_with(1 << 20, 0);
    suspend(&mut d, 1, 10_000).await.unwrap();
    libxc_checkpoint(&mut d, 1, 10_001).await.unwrap();
    assert_eq!(d.merges(), 0);
}

#[tokio::test]
async fn the_bound_is_what_was_read_plus_the_fill() {
    for (fill, end, merged) in [(0, 5001, 0), (0, 5000, 1), (700, 5701, 0), (700, 5700, 1)] {
        let mut d = driver_with(fill, fill);
        suspend(&mut d, 1, 5000).await.unwrap();
        libxc_checkpoint(&mut d, 1, end).await.unwrap();
        assert_eq!(d.merges(), merged, "fill {fill}, end {end}");
    }
}

#[tokio::test]
async fn a_fill_that_cannot_be_read_proves_nothing() {
    let mut d = driver_with(0, 0);
    d.pipe.fail = true;
    suspend(&mut d, 1, 10).await.unwrap();
    libxc_checkpoint(&mut d, 1, 1 << 30).await.unwrap();
    assert_eq!(d.merges(), 1);
}

#[tokio::test]
async fn the_pipe_is_wide_from_a_cut_and_narrow_while_the_relay_waits_for_a_suspend() {
    let sizes = PipeSizes::default();
    let mut d = driver();
    let resizes = |d: &Driver| {
        log_of(d)
            .into_iter()
            .filter_map(|c| match c {
                Call::Resize(b) => Some(b),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let fill = |d: &mut Driver, f: u64| {
        d.pipe.before_cut = f;
        d.pipe.after_cut = f;
    };
    // Narrow (4096) at start. A cut widens it, whatever the pipe holds until the proof.
    suspend(&mut d, 1, 100).await.unwrap();
    assert_eq!(resizes(&d), [sizes.wide]);
    fill(&mut d, 0);
    d.size_pipe(10);
    assert_eq!(
        d.idle_deadline(),
        None,
        "no idle timer between cut and proof"
    );
    d.on_idle();
    assert_eq!(
        d.pipe_capacity(),
        sizes.wide,
        "no narrowing between cut and proof"
    );
    libxc_checkpoint(&mut d, 1, 1 << 20).await.unwrap();
    complete(&mut d, 1).await;
    // A read that empties the pipe only arms the idle timer: a bulk transfer's next
    // read comes first and disarms it, and the pipe stays wide.
    d.size_pipe(8192);
    assert!(d.idle_deadline().is_some());
    assert_eq!(
        d.pipe_capacity(),
        sizes.wide,
        "not narrowed by one empty read"
    );
    d.size_pipe(8192);
    fill(&mut d, 4096);
    d.size_pipe(65536);
    assert_eq!(d.idle_deadline(), None, "bytes left: not idle");
    // Idle (the timer fired, the pipe still empty): narrow for the next suspend.
    fill(&mut d, 0);
    d.size_pipe(100);
    d.on_idle();
    assert_eq!(d.pipe_capacity(), sizes.narrow);
    // Reads that fill the narrow pipe (xl blocked on it) mean a bulk transfer, even
    // though each of them empties it; a read that finds it less than full resets the
    // count, and enough full reads in a row widen it.
    for _ in 1..sizes.widen_after_reads_behind {
        d.size_pipe(sizes.narrow as usize);
    }
    d.size_pipe(100);
    for _ in 1..sizes.widen_after_reads_behind {
        d.size_pipe(sizes.narrow as usize);
    }
    assert_eq!(d.pipe_capacity(), sizes.narrow, "reset by the short read");
    d.size_pipe(sizes.narrow as usize);
    assert_eq!(d.pipe_capacity(), sizes.wide);
    assert_eq!(resizes(&d), [sizes.wide, sizes.narrow, sizes.wide]);
    // A pipe that cannot be narrowed (it holds more than a page) keeps its size.
    d.pipe.busy = true;
    d.size_pipe(100);
    d.on_idle();
    assert_eq!(d.pipe_capacity(), sizes.wide);
}

#[test]
fn the_time_the_pipe_was_narrow_is_counted() {
    let m = crate::metrics::Metrics::new("send");
    m.add_xl_pipe_narrow(std::time::Duration::from_millis(3));
    m.add_xl_pipe_narrow(std::time::Duration::from_micros(500));
    assert_eq!(m.xl_pipe_narrow(), std::time::Duration::from_micros(3500));
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
        libxc_checkpoint(&mut d, n, n * 100_000 + 2 * F)
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
    async fn forward(
        &mut self,
        bytes: BytesMut,
        _events: &[Event],
        _merged: &[u64],
    ) -> Result<(), ReplicatorError> {
        self.sent.extend_from_slice(&bytes);
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
    ) -> Result<Vec<Acked>, ReplicatorError> {
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
/// forwarded, as the backup's cutter would: a checkpoint it was told is merged is not
/// acknowledged (state-machine tests only).
#[derive(Default)]
struct FakeAckingReplicator {
    sent: Vec<u8>,
    acks: VecDeque<u64>,
    merged: Vec<u64>,
    /// Merge notices, each with its place in the stream (the CHECKPOINT record's end).
    notices: Vec<(u64, usize)>,
}

impl Replicator for FakeAckingReplicator {
    async fn forward(
        &mut self,
        bytes: BytesMut,
        events: &[Event],
        merged: &[u64],
    ) -> Result<(), ReplicatorError> {
        let base = self.sent.len() as u64;
        self.sent.extend_from_slice(&bytes);
        for e in events {
            match *e {
                // The notice's place in the stream: its CHECKPOINT record's end.
                Event::LibxcCheckpoint { checkpoint, end } if merged.contains(&checkpoint) => {
                    assert!(
                        end > base,
                        "MERGED({checkpoint}) for a record before this chunk"
                    );
                    self.merged.push(checkpoint);
                    self.notices.push((checkpoint, end as usize));
                }
                Event::CheckpointComplete { checkpoint, .. }
                    if !self.merged.contains(&checkpoint) =>
                {
                    self.acks.push_back(checkpoint);
                }
                _ => {}
            }
        }
        assert_eq!(
            self.notices
                .iter()
                .filter(|(c, _)| merged.contains(c))
                .count(),
            merged.len(),
            "every merge is told with its CHECKPOINT record's chunk"
        );
        Ok(())
    }
    async fn next_event(&mut self) -> BackupEvent {
        match self.acks.pop_front() {
            Some(n) => BackupEvent::Ack(Acked {
                checkpoint: n,
                sent_at: Some(std::time::Instant::now()),
                backup_write: Some(std::time::Duration::from_micros(250)),
            }),
            None => std::future::pending().await,
        }
    }
    async fn finish(&mut self, _: u64, _: bool) -> Result<Vec<Acked>, ReplicatorError> {
        Ok(self.acks.drain(..).map(Acked::bare).collect())
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

/// Feeds `stream` through a one-page "pipe" (reads of at most 4096 bytes) whose fill
/// after every cut is `fill`.
async fn run_stream(stream: Vec<u8>, fill: u64) -> (Driver, FakeAckingReplicator, RunEnd) {
    let (mut w, r) = tokio::io::duplex(4096);
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        w.write_all(&stream).await.unwrap();
    });
    let mut d = driver_with(fill, fill);
    let mut rep = FakeAckingReplicator::default();
    let out = d.run(r, &mut rep).await.unwrap();
    writer.await.unwrap();
    (d, rep, out)
}

#[tokio::test]
async fn run_on_a_stream_cuts_proves_and_commits_each_checkpoint() {
    let w = crate::stream::writer::write(&crate::stream::writer::WriterConfig::pv(4));
    let (d, rep, out) = run_stream(w.bytes.clone(), F).await;
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
    // Every phase was timed: a pause per checkpoint, the rest per ACK and commit.
    let p = &d.metrics.checkpoint;
    assert_eq!(p.pause.histogram.count(), 4);
    assert_eq!(p.transfer.histogram.count(), 4);
    assert_eq!(p.ack.histogram.count(), 4);
    assert_eq!(p.backup_write.histogram.count(), 4);
    assert_eq!(p.release.histogram.count(), 4);
    assert_eq!(p.backup_write.recent.quantiles().unwrap().p50, 250);
}

#[tokio::test]
async fn merges_are_told_to_the_backup_before_their_checkpoints_end() {
    let w = crate::stream::writer::write(&crate::stream::writer::WriterConfig::pv(3));
    let ends: Vec<(u64, u64)> = w
        .events
        .iter()
        .filter_map(|e| match *e {
            Event::CheckpointComplete { checkpoint, end } => Some((checkpoint, end)),
            _ => None,
        })
        .collect();
    let (_, rep, _) = run_stream(w.bytes, 1 << 40).await;
    assert_eq!(rep.notices.len(), 3);
    for (n, forwarded) in rep.notices {
        let (_, end) = ends[n as usize - 1];
        assert!(
            (forwarded as u64) < end,
            "MERGED({n}) after {forwarded} bytes, but checkpoint {n} ends at {end}"
        );
    }
}

#[tokio::test]
async fn run_with_an_unprovable_pipe_merges_and_never_commits() {
    // A pipe so large that libxc could always have finished: nothing is provable, so
    // nothing may ever be released on an ACK.
    let w = crate::stream::writer::write(&crate::stream::writer::WriterConfig::hvm(3));
    let (d, rep, _) = run_stream(w.bytes, 1 << 40).await;
    assert_eq!(d.merges(), 3);
    // No checkpoint is a failover point: the backup acknowledged none of them.
    assert_eq!(d.last_acked(), 0);
    assert_eq!(rep.merged, [1, 2, 3]);
    assert_eq!(d.buffer().calls, [Call::Cut(1), Call::Cut(2), Call::Cut(3)]);
}

/// A fake backup whose ACKs all arrive with its CLOSE answer (tests only).
#[derive(Default)]
struct FakeLateAckReplicator {
    completed: Vec<u64>,
}

impl Replicator for FakeLateAckReplicator {
    async fn forward(
        &mut self,
        _: BytesMut,
        events: &[Event],
        _: &[u64],
    ) -> Result<(), ReplicatorError> {
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
    async fn finish(&mut self, _: u64, _: bool) -> Result<Vec<Acked>, ReplicatorError> {
        Ok(std::mem::take(&mut self.completed)
            .into_iter()
            .map(Acked::bare)
            .collect())
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
fn driver_asked_to_end() -> (Driver, tokio::sync::watch::Sender<bool>) {
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
    let ends = w.checkpoint_ends();
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

/// A fake replicated disk (state-machine tests only): records its cuts in the shared log;
/// it can be told to fail (its backup lost) or to number its epochs out of step.
struct FakeDisk {
    name: &'static str,
    next: u64,
    log: Log,
    lost: bool,
}

impl FakeDisk {
    fn new(name: &'static str, log: &Log) -> FakeDisk {
        FakeDisk {
            name,
            next: 1,
            log: log.clone(),
            lost: false,
        }
    }
}

impl DiskBarrier for FakeDisk {
    async fn wait_in_sync(&mut self, _: std::time::Duration) -> Result<(), DiskBarrierError> {
        Ok(())
    }
    async fn cut(&mut self) -> Result<u64, DiskBarrierError> {
        if self.lost {
            return Err(DiskBarrierError::Lost("fake: connection reset".into()));
        }
        let e = self.next;
        self.next += 1;
        self.log.lock().unwrap().push(Call::DiskCut(self.name, e));
        Ok(e)
    }
}

/// A driver with the fake disks `names`, sharing the buffer's log.
fn driver_with_disks(names: &[&'static str]) -> Driver<FakeDisk> {
    let d = driver();
    let log = d.buffer().log.clone();
    let disks = names
        .iter()
        .map(|n| (n.to_string(), FakeDisk::new(n, &log)))
        .collect();
    d.with_disks(disks)
}

#[tokio::test]
async fn disks_are_cut_after_the_buffer_and_before_the_fill_is_read() {
    let mut d = driver_with_disks(&["xvda", "xvdb"]);
    suspend(&mut d, 1, 1000).await.unwrap();
    let log: Vec<Call> = log_of(&d)
        .into_iter()
        .filter(|c| !matches!(c, Call::Resize(_)))
        .collect();
    assert_eq!(
        log,
        [
            Call::Cut(1),
            Call::DiskCut("xvda", 1),
            Call::DiskCut("xvdb", 1),
            Call::Fill
        ],
        "the proof's fill must be read after every port's cut"
    );
    libxc_checkpoint(&mut d, 1, 1000 + F + 1).await.unwrap();
    complete(&mut d, 1).await;
    ack(&mut d, 1).await.unwrap();
    assert_eq!(d.committed_epoch(), 1);
}

#[tokio::test]
async fn several_disks_are_cut_at_every_checkpoint_merged_ones_too() {
    let mut d = driver_with_disks(&["a", "b", "c"]);
    for n in 1..=3u64 {
        suspend(&mut d, n, n * 10_000).await.unwrap();
        // Checkpoint 2's cut is not proven: the disks were cut all the same (the backup
        // merges their epochs when told), and the numbering stays in step.
        let end = if n == 2 {
            n * 10_000
        } else {
            n * 10_000 + F + 1
        };
        libxc_checkpoint(&mut d, n, end).await.unwrap();
        complete(&mut d, n).await;
    }
    assert_eq!(d.take_merged(), [2]);
    let cuts: Vec<Call> = log_of(&d)
        .into_iter()
        .filter(|c| matches!(c, Call::DiskCut(..)))
        .collect();
    let want: Vec<Call> = (1..=3)
        .flat_map(|n| ["a", "b", "c"].map(|x| Call::DiskCut(x, n)))
        .collect();
    assert_eq!(cuts, want);
    ack(&mut d, 3).await.unwrap();
    assert_eq!(d.buffer().commits(), [3]);
}

#[tokio::test]
async fn a_failed_disk_cut_ends_protection_fail_closed() {
    let mut d = driver_with_disks(&["a", "b"]);
    suspend(&mut d, 1, 1000).await.unwrap();
    libxc_checkpoint(&mut d, 1, 1000 + F + 1).await.unwrap();
    complete(&mut d, 1).await;
    d.disks[1].1.lost = true;
    match suspend(&mut d, 2, 5000).await {
        Err(CheckpointError::Machine(MachineError::CutFailed { checkpoint, why })) => {
            assert_eq!(checkpoint, 2);
            assert!(why.contains("disk b"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(d.state().phase(), Phase::Aborted);
    // The ACK of checkpoint 1 arriving now releases nothing, and nothing fails open.
    assert!(ack(&mut d, 1).await.is_err());
    assert!(d.buffer().commits().is_empty(), "{:?}", d.buffer().calls);
    assert!(!d.buffer().open);
    assert!(!d.buffer().calls.contains(&Call::FailOpen));
    // A lost memory backup afterwards does not open the buffer either.
    assert!(
        d.lost(LossReason::new(LossKind::Silence, "test"))
            .await
            .is_err()
    );
    assert!(!d.buffer().open);
}

#[tokio::test]
async fn a_disk_epoch_out_of_step_with_the_checkpoints_ends_protection_fail_closed() {
    let mut d = driver_with_disks(&["a"]);
    // The daemon served an earlier run: its next epoch is 5, not checkpoint 1's.
    d.disks[0].1.next = 5;
    match suspend(&mut d, 1, 1000).await {
        Err(CheckpointError::Machine(MachineError::CutFailed { checkpoint: 1, why })) => {
            assert!(why.contains("epoch 5"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(d.state().phase(), Phase::Aborted);
    assert!(
        !log_of(&d).contains(&Call::Fill),
        "no proof after a failed cut"
    );
}
