//! The relay-mode driver of the checkpoint machine: xl's stream on a pipe is how it learns
//! that the guest was suspended, and the pipe's fill is how it proves the epoch cut came
//! in time.
//!
//! Owns: the read loop over xl's pipe (parser, forwarding to the backup, racing the
//! backup's answers and a request to end protection), the pipe proof, sizing xl's pipe, executing the machine's actions
//! on the ports, the per-checkpoint log span, clock and the controller's metrics. Never
//! touches: the rules (the machine decides), sockets or the kernel (reached through the
//! ports and [`PipeGauge`]).
//!
//! # The pipe proof (DESIGN.md, "Next: proof from Xen")
//!
//! The guest is resumed only after libxc's write of checkpoint N's CHECKPOINT record has
//! returned. In this order, for every checkpoint N:
//!
//! 1. the parser reports the first post-suspend byte of N in the chunk just read; R is
//!    the number of bytes read from the pipe so far (that chunk included);
//! 2. the epoch is cut on every port ([`Action::CutEpoch`]: the output buffer, then
//!    every replicated disk in the order given), and the driver waits until each cut has
//!    taken effect; nothing is read from the pipe meanwhile;
//! 3. only then the pipe's fill F is read (FIONREAD, [`PipeGauge::fill`]). Whatever xl
//!    had written when the cut took effect is at most what it has written now, R + F;
//! 4. when libxc's CHECKPOINT record of N is seen ending at P: if P > R + F, libxc had
//!    not finished writing it at the cut, so the guest was still suspended and the cut is
//!    proven. Otherwise epoch N is merged into the next proven one
//!    ([`Action::Merged`]), and the backup is told that N must not be a failover point
//!    (`Replicator::forward`'s `merged`: at the CHECKPOINT record's end in the stream,
//!    before any byte of N's end).
//!
//! The proof holds for any pipe size (it replaced P > R + C with C the capacity of a
//! pipe shrunk to one page, which made xl write 4 KiB at a time). The fill is read after
//! the cut, never before: a fill read early would miss what xl wrote while the cut was
//! being made. A failed FIONREAD proves nothing (merge).
//!
//! # Sizing xl's pipe
//!
//! The proof fails only if libxc wrote the rest of the checkpoint, CHECKPOINT record
//! included, into the pipe before the cut took effect. With a big pipe that happens
//! whenever a checkpoint (or checkpoint 1's tail after its first post-suspend record) is
//! smaller than the pipe and libxc gets ahead of the relay. So the pipe is made
//! [`PipeSizes::narrow`] (one page) while the stream is idle, which is when the relay
//! waits for a suspend: between checkpoints, and while libxc waits for the guest to
//! suspend at the end of the initial copy. Idle means: the pipe stayed empty for
//! [`PipeSizes::idle`] after a read (an idle timer, armed by a read that empties a wide
//! pipe, disarmed by the next read). It is made [`PipeSizes::wide`] at every cut, and when
//! the relay falls behind while narrow: a read that fills the narrow pipe (xl was blocked
//! on it) or leaves bytes in it, [`PipeSizes::widen_after_reads_behind`] reads in a row,
//! reset by a read that finds it less than full. Narrowing at every read that empties
//! the pipe (the rule before) kept bulk transfers at one page for seconds: through a
//! one-page pipe every read empties it, so "behind" was almost never seen
//! (docs/notes-relay-throughput.md). Narrowing fails (EBUSY) when the pipe holds more
//! than a page: then it stays wide, which only costs proofs, never safety. The time spent
//! narrow is counted for `relay status` (`xl_pipe_narrow_ms`).
//!
//! Several vifs: the cut is one `close_epoch` on the group, which closes every vif's
//! epoch in turn, and F is read after the last one; the proof covers them all.
//!
//! # Disks
//!
//! Each replicated disk ([`DiskBarrier`]) is cut after the output buffer, inside the same
//! action, and F is read after the last disk's cut: the proof covers the disks too, so a
//! proven checkpoint N has its memory, its output epoch and every disk's epoch N cut
//! while the guest was suspended; an unproven one is merged for all of them alike (the
//! backup merges the disk epochs when it is told, `relay::receive`). A disk cut that
//! fails (its backup lost, the daemon gone) or returns an epoch that is not the
//! checkpoint's ends protection fail closed ([`Input::CutFailed`]): the memory backup
//! may still activate its copy, so nothing more may be released.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;
use tracing::{Span, debug, error, info, info_span, warn};

use super::CheckpointError;
use super::machine::{Action, Input, Machine, RunEnd, State};
use super::ports::{
    Acked, BackupEvent, DiskBarrier, LossKind, LossReason, NetBuffer, NoDisk, Replicator,
};
use crate::metrics::Metrics;
use crate::stream::{Event, Parser};

/// xl's pipe as the proof reads it and the driver sizes it. Implemented on the pipe's fd
/// by `relay::send`, and by fakes in tests.
pub trait PipeGauge: Send {
    /// Bytes written into the pipe and not read yet (FIONREAD).
    fn fill(&mut self) -> std::io::Result<u64>;
    /// Asks for a capacity of `bytes`; returns the capacity now in force. Refused (EBUSY)
    /// when the pipe holds more than the new size would.
    fn resize(&mut self, bytes: u64) -> std::io::Result<u64>;
}

/// The two sizes of xl's pipe (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PipeSizes {
    /// While the relay has caught up and waits for a suspend.
    pub narrow: u64,
    /// During bulk transfers and from each cut until the checkpoint's end.
    pub wide: u64,
    /// Reads in a row that fill the narrow pipe (or leave bytes in it) after which it is
    /// widened.
    pub widen_after_reads_behind: u32,
    /// How long the pipe stays empty after a read before it is narrowed (the stream is
    /// idle: the relay waits for a suspend).
    pub idle: Duration,
}

impl Default for PipeSizes {
    fn default() -> Self {
        PipeSizes {
            narrow: 4096,
            wide: 1 << 20,
            widen_after_reads_behind: 64,
            idle: Duration::from_millis(1),
        }
    }
}

/// How many bytes a read of xl's pipe asks for.
const READ_BYTES: usize = 256 * 1024;

/// One read of xl's pipe into `buf` (room for [`READ_BYTES`] made first). Cancel-safe:
/// nothing is read unless it is returned.
async fn read_some<R: AsyncRead + Unpin>(
    input: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    buf.reserve(READ_BYTES);
    input.read_buf(buf).await
}

/// The cut of the checkpoint in progress: where the pipe was when it was asked for, and
/// its fill once the cut had taken effect.
#[derive(Clone, Copy, Debug)]
struct PendingCut {
    checkpoint: u64,
    read_at: u64,
    fill: Option<u64>,
}

/// When the driver saw the moments of one checkpoint.
#[derive(Clone, Copy, Debug)]
struct Clock {
    /// The chunk with the first post-suspend byte was read.
    suspended: Instant,
}

/// Drives the checkpoint machine from xl's stream (see the module docs). `D`: the
/// replicated disks' port (none by default).
pub struct RelayDriver<B: NetBuffer, G: PipeGauge, D: DiskBarrier = NoDisk> {
    pub(super) buffer: B,
    pub(super) pipe: G,
    /// The replicated disks (a name for the log, the port), cut in this order.
    pub(super) disks: Vec<(String, D)>,
    sizes: PipeSizes,
    /// The pipe's capacity as last set (or as found).
    capacity: u64,
    reads_behind: u32,
    /// When the pipe is to be narrowed unless a read comes first (armed by a read that
    /// emptied the wide pipe outside a cut).
    idle_at: Option<Instant>,
    /// Since when the pipe has been narrow (for the time-narrow count).
    narrow_since: Option<Instant>,
    pub(super) metrics: Arc<Metrics>,
    machine: Machine,
    cut: Option<PendingCut>,
    /// Checkpoints merged since the last forward: the backup is told before their end.
    merged_out: Vec<u64>,
    /// One span per checkpoint: its cut, proof and commit are logged inside it.
    spans: BTreeMap<u64, Span>,
    clocks: BTreeMap<u64, Clock>,
    last_acked: u64,
    committed_epoch: u64,
    merges: u64,
    /// Raised when protection is to end on request (the relay's control socket).
    end_request: Option<watch::Receiver<bool>>,
}

impl<B: NetBuffer, G: PipeGauge> RelayDriver<B, G> {
    /// `pipe` is xl's pipe, `capacity` its capacity now (narrow: xl has not written yet).
    pub fn new(buffer: B, pipe: G, capacity: u64, sizes: PipeSizes, metrics: Arc<Metrics>) -> Self {
        RelayDriver {
            buffer,
            pipe,
            disks: Vec::new(),
            sizes,
            capacity,
            reads_behind: 0,
            idle_at: None,
            narrow_since: (capacity < sizes.wide).then(Instant::now),
            metrics,
            machine: Machine::new(),
            cut: None,
            merged_out: Vec::new(),
            spans: BTreeMap::new(),
            clocks: BTreeMap::new(),
            last_acked: 0,
            committed_epoch: 0,
            merges: 0,
            end_request: None,
        }
    }

    /// Cuts these disks at every checkpoint, with the output buffer (see "Disks" in the
    /// module docs). Call before the first checkpoint.
    pub fn with_disks<D: DiskBarrier>(self, disks: Vec<(String, D)>) -> RelayDriver<B, G, D> {
        RelayDriver {
            buffer: self.buffer,
            pipe: self.pipe,
            disks,
            sizes: self.sizes,
            capacity: self.capacity,
            reads_behind: self.reads_behind,
            idle_at: self.idle_at,
            narrow_since: self.narrow_since,
            metrics: self.metrics,
            machine: self.machine,
            cut: self.cut,
            merged_out: self.merged_out,
            spans: self.spans,
            clocks: self.clocks,
            last_acked: self.last_acked,
            committed_epoch: self.committed_epoch,
            merges: self.merges,
            end_request: self.end_request,
        }
    }
}

impl<B: NetBuffer, G: PipeGauge, D: DiskBarrier> RelayDriver<B, G, D> {
    /// Ends protection when `rx` becomes true: the backup is asked to discard its copy,
    /// and only once it confirmed is anything released (see [`Replicator::discard`]).
    pub fn end_on_request(mut self, rx: watch::Receiver<bool>) -> Self {
        self.end_request = Some(rx);
        self
    }

    pub fn buffer(&self) -> &B {
        &self.buffer
    }

    pub fn state(&self) -> &State {
        self.machine.state()
    }

    /// Epochs merged in this run (the machine's count ends with its protected phases).
    pub fn merges(&self) -> u64 {
        self.merges
    }

    pub fn last_acked(&self) -> u64 {
        self.last_acked
    }

    pub fn committed_epoch(&self) -> u64 {
        self.committed_epoch
    }

    /// The pipe's capacity as the driver last set it.
    pub fn pipe_capacity(&self) -> u64 {
        self.capacity
    }

    /// Merged checkpoints the backup has not been told of yet (taken).
    pub(super) fn take_merged(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.merged_out)
    }

    /// Feeds one input to the machine and carries out what it asks, feeding back the
    /// results (the epoch of a cut, what opening the buffer let out).
    pub async fn apply(&mut self, input: Input) -> Result<(), CheckpointError> {
        let mut queue = std::collections::VecDeque::from([input]);
        while let Some(input) = queue.pop_front() {
            let actions = self.machine.apply(input)?;
            self.last_acked = self.last_acked.max(self.machine.state().last_acked());
            for a in actions {
                if let Some(next) = self.execute(a).await? {
                    queue.push_back(next);
                }
            }
        }
        Ok(())
    }

    async fn execute(&mut self, a: Action) -> Result<Option<Input>, CheckpointError> {
        match a {
            Action::CutEpoch { checkpoint } => {
                let epoch = self.buffer.close_epoch().await?;
                if let Err(why) = self.cut_disks(checkpoint).await {
                    error!(checkpoint, %why, "DISK CUT FAILED: protection ends fail closed; the guest's output stays held");
                    return Ok(Some(Input::CutFailed { checkpoint, why }));
                }
                // Every cut has taken effect: only now may the fill be read (step 3).
                self.note_fill(checkpoint);
                let span = info_span!("checkpoint", n = checkpoint, epoch);
                span.in_scope(|| debug!("epoch cut at the first post-suspend byte"));
                self.spans.insert(checkpoint, span);
                Ok(Some(Input::EpochCut { checkpoint, epoch }))
            }
            Action::Merged { checkpoint, epoch } => {
                self.merges += 1;
                self.merged_out.push(checkpoint);
                self.metrics.epoch_merges_total.inc();
                self.in_span(checkpoint, || {
                    info!(
                        checkpoint,
                        epoch,
                        "cannot prove the epoch cut was before the guest resumed: epoch merged into the next, and the checkpoint is no failover point"
                    )
                });
                Ok(None)
            }
            Action::Commit { acked, epoch } => {
                let t = Instant::now();
                let r = self.buffer.commit(epoch).await?;
                self.metrics.checkpoint.release.observe(t.elapsed());
                self.committed_epoch = epoch;
                self.metrics.committed_epoch.set(epoch);
                self.in_span(acked, || {
                    debug!(
                        acked,
                        epoch,
                        frames = r.frames,
                        bytes = r.bytes,
                        "committed"
                    )
                });
                self.spans = self.spans.split_off(&acked.saturating_add(1));
                Ok(None)
            }
            Action::FailOpen => {
                self.spans.clear();
                self.clocks.clear();
                let r = self.buffer.fail_open().await?;
                warn!(
                    released_frames = r.frames,
                    released_bytes = r.bytes,
                    "released everything held; the buffer passes traffic"
                );
                Ok(Some(Input::FailedOpen(r)))
            }
        }
    }

    /// Cuts every disk's epoch in turn; each must close the checkpoint's epoch.
    async fn cut_disks(&mut self, checkpoint: u64) -> Result<(), String> {
        for (name, d) in &mut self.disks {
            match d.cut().await {
                Ok(e) if e == checkpoint => {}
                Ok(e) => {
                    return Err(format!(
                        "disk {name} closed epoch {e}, not checkpoint {checkpoint}'s: its epochs do not match the checkpoints"
                    ));
                }
                Err(e) => return Err(format!("disk {name}: {e}")),
            }
        }
        Ok(())
    }

    /// Step 3 of the proof: F, read after the cut took effect. Then the pipe may be wide
    /// for the rest of the checkpoint.
    fn note_fill(&mut self, checkpoint: u64) {
        let fill = match self.pipe.fill() {
            Ok(f) => Some(f),
            Err(e) => {
                warn!(checkpoint, error = %e, "cannot read the fill of xl's pipe: the cut cannot be proven");
                None
            }
        };
        if let Some(c) = self.cut.as_mut().filter(|c| c.checkpoint == checkpoint) {
            c.fill = fill;
        }
        self.resize(self.sizes.wide);
    }

    fn resize(&mut self, bytes: u64) {
        if self.capacity == bytes {
            return;
        }
        match self.pipe.resize(bytes) {
            Ok(c) => {
                self.capacity = c;
                self.reads_behind = 0;
                self.count_narrow_time();
            }
            // Busy (more in the pipe than the new size): keep the size; only speed or
            // the odds of a proof depend on it.
            Err(e) => debug!(bytes, error = %e, "xl's pipe keeps its size"),
        }
    }

    /// Adds the time the pipe was narrow to the status count when it becomes wide, and
    /// starts counting when it becomes narrow.
    fn count_narrow_time(&mut self) {
        let narrow = self.capacity < self.sizes.wide;
        match (narrow, self.narrow_since) {
            (true, None) => self.narrow_since = Some(Instant::now()),
            (false, Some(t)) => {
                self.narrow_since = None;
                self.metrics.add_xl_pipe_narrow(t.elapsed());
            }
            _ => {}
        }
    }

    /// After a read of `n` bytes (see "Sizing xl's pipe" in the module docs): while
    /// narrow, widen after enough reads in a row that found xl ahead; while wide, arm the
    /// idle timer when the read emptied the pipe. Nothing changes inside a cut.
    pub(super) fn size_pipe(&mut self, n: usize) {
        self.idle_at = None;
        if self.cut.is_some() {
            return;
        }
        let fill = self.pipe.fill();
        if self.capacity < self.sizes.wide {
            let behind = n as u64 >= self.capacity || matches!(fill, Ok(f) if f > 0);
            self.reads_behind = if behind { self.reads_behind + 1 } else { 0 };
            if self.reads_behind >= self.sizes.widen_after_reads_behind {
                self.resize(self.sizes.wide);
            }
        } else if let Ok(0) = fill {
            self.idle_at = Some(Instant::now() + self.sizes.idle);
        }
    }

    /// When the idle timer should fire, if it is armed.
    pub(super) fn idle_deadline(&self) -> Option<Instant> {
        self.idle_at
    }

    /// The idle timer fired: no read for [`PipeSizes::idle`] since one that emptied the
    /// pipe. Narrow it for the next suspend, if it is still empty and no cut is pending.
    pub(super) fn on_idle(&mut self) {
        self.idle_at = None;
        if self.cut.is_none() && matches!(self.pipe.fill(), Ok(0)) {
            self.resize(self.sizes.narrow);
        }
    }

    fn in_span(&self, checkpoint: u64, f: impl FnOnce()) {
        match self.spans.get(&checkpoint) {
            Some(s) => s.in_scope(f),
            None => f(),
        }
    }

    /// One parser event, with `read_total` bytes read from the pipe so far.
    pub(super) async fn on_stream_event(
        &mut self,
        ev: &Event,
        read_total: u64,
    ) -> Result<(), CheckpointError> {
        match *ev {
            Event::PostSuspendStart { checkpoint, .. } => {
                self.cut = Some(PendingCut {
                    checkpoint,
                    read_at: read_total,
                    fill: None,
                });
                self.clocks.insert(
                    checkpoint,
                    Clock {
                        suspended: Instant::now(),
                    },
                );
                self.apply(Input::Suspended { checkpoint }).await
            }
            Event::LibxcCheckpoint { checkpoint, end } => {
                if let Some(c) = self.clocks.get(&checkpoint) {
                    self.metrics.checkpoint.pause.observe(c.suspended.elapsed());
                }
                let in_time = self.prove(checkpoint, end);
                self.apply(Input::Proof {
                    checkpoint,
                    in_time,
                })
                .await
            }
            Event::CheckpointComplete { checkpoint, .. } => {
                self.metrics.checkpoints_total.inc();
                self.metrics.last_checkpoint.set(checkpoint);
                self.apply(Input::Sent { checkpoint }).await
            }
            _ => Ok(()),
        }
    }

    /// The pipe proof: P > R + F. A CHECKPOINT record without its cut, or a cut whose
    /// fill is unknown, proves nothing (the machine refuses the former as out of order).
    fn prove(&mut self, checkpoint: u64, end: u64) -> bool {
        let Some(cut) = self.cut.take().filter(|c| c.checkpoint == checkpoint) else {
            return false;
        };
        let Some(fill) = cut.fill else {
            return false;
        };
        let bound = cut.read_at.saturating_add(fill);
        let in_time = end > bound;
        self.in_span(checkpoint, || {
            debug!(end, read_at = cut.read_at, fill, in_time, "pipe proof")
        });
        in_time
    }

    /// An ACK: the phases of its checkpoint, then the machine.
    async fn on_ack(&mut self, a: Acked) -> Result<(), CheckpointError> {
        let p = &self.metrics.checkpoint;
        if let Some(d) = a.backup_write {
            p.backup_write.observe(d);
        }
        if let Some(sent) = a.sent_at {
            p.ack.observe(sent.elapsed());
            if let Some(c) = self.clocks.get(&a.checkpoint) {
                p.transfer
                    .observe(sent.saturating_duration_since(c.suspended));
            }
        }
        self.clocks = self.clocks.split_off(&a.checkpoint.saturating_add(1));
        self.apply(Input::Ack {
            checkpoint: a.checkpoint,
        })
        .await
    }

    /// The read loop: stdin → parser → epoch cuts → backup, raced against what the
    /// backup says. `input` is xl's pipe (the one `PipeGauge` measures).
    pub async fn run<R, P>(&mut self, mut input: R, rep: &mut P) -> Result<RunEnd, CheckpointError>
    where
        R: AsyncRead + Unpin + Send,
        P: Replicator,
    {
        let mut parser = Parser::new();
        // Each read's bytes are split off this buffer and handed on, not copied.
        let mut buf = BytesMut::with_capacity(READ_BYTES);
        let mut events = Vec::new();
        let mut read_total: u64 = 0;
        let mut finished = false;
        let mut end_request = self.end_request.take();
        loop {
            tokio::select! {
                // The backup first: an ACK that has arrived is committed before more of
                // the stream is read (sooner release; deterministic order at the end).
                biased;
                ev = rep.next_event() => match ev {
                    BackupEvent::Ack(a) => self.on_ack(a).await?,
                    BackupEvent::Lost(reason) => return self.lost(reason).await,
                },
                () = requested(&mut end_request) => return self.end_protection(rep).await,
                r = read_some(&mut input, &mut buf) => {
                    let n = match r {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(CheckpointError::Input(e)),
                    };
                    if n == 0 {
                        return self.stream_closed(parser.checkpoints_complete(), finished, rep).await;
                    }
                    read_total += n as u64;
                    events.clear();
                    let chunk = buf.split();
                    parser.feed(&chunk, &mut events)?;
                    for ev in &events {
                        finished |= matches!(ev, Event::End { .. });
                        self.on_stream_event(ev, read_total).await?;
                    }
                    self.metrics.stream_bytes_total.inc_by(n as u64);
                    // A merge is decided at its CHECKPOINT record, which is in this chunk.
                    let merged = self.take_merged();
                    if let Err(e) = rep.forward(chunk, &events, &merged).await {
                        return self.lost(e.loss()).await;
                    }
                    self.size_pipe(n);
                }
                () = idle_timer(self.idle_deadline()) => self.on_idle(),
            }
        }
    }

    /// xl closed the stream: close in order, commit what the backup acknowledged meanwhile.
    async fn stream_closed<P: Replicator>(
        &mut self,
        checkpoints: u64,
        finished: bool,
        rep: &mut P,
    ) -> Result<RunEnd, CheckpointError> {
        info!(checkpoints, finished, "xl closed the stream");
        match rep.finish(checkpoints, finished).await {
            // The backup holds these whole: their output may go.
            Ok(acks) => {
                for a in acks {
                    self.on_ack(a).await?;
                }
            }
            Err(e) => warn!(reason = %e, "the backup did not confirm the orderly close"),
        }
        self.end(Input::StreamEnded {
            checkpoints,
            finished,
        })
        .await
    }

    /// Ending protection on request: no more of xl's stream is read (xl blocks on its
    /// pipe, then resumes the guest here once the relay exits). The buffer is opened only
    /// once the backup confirmed that its copy is discarded: then there is no copy left
    /// for what the guest sent to contradict, exactly as after a lost backup. Without
    /// that word nothing is released (`EndUnconfirmed`): the backup may still activate.
    async fn end_protection<P: Replicator>(
        &mut self,
        rep: &mut P,
    ) -> Result<RunEnd, CheckpointError> {
        info!("ending protection on request: asking the backup to discard its copy");
        let copy = rep
            .discard()
            .await
            .map_err(CheckpointError::EndUnconfirmed)?;
        let reason = LossReason::new(
            LossKind::Discarded,
            format!(
                "protection ended on request: the backup discarded its copy (it had checkpoint {})",
                copy.checkpoint
            ),
        );
        self.apply(Input::BackupLost(reason)).await?;
        match self.machine.state() {
            State::Unprotected { acked, .. } => Ok(RunEnd::Discarded {
                checkpoint: *acked,
                copy_destroyed: copy.copy_destroyed,
            }),
            s => Err(CheckpointError::NotEnded(s.phase())),
        }
    }

    /// The backup is lost: open the buffer (the machine says so) and end unprotected.
    pub(super) async fn lost(&mut self, reason: LossReason) -> Result<RunEnd, CheckpointError> {
        error!(kind = ?reason.kind, %reason, "the backup is lost");
        self.apply(Input::BackupLost(reason)).await?;
        match self.machine.state() {
            State::Unprotected { reason, acked, .. } => Ok(RunEnd::Lost {
                reason: reason.clone(),
                checkpoint: *acked,
            }),
            s => Err(CheckpointError::NotEnded(s.phase())),
        }
    }

    async fn end(&mut self, input: Input) -> Result<RunEnd, CheckpointError> {
        self.apply(input).await?;
        match self.machine.state() {
            State::Ended(end) => Ok(end.clone()),
            s => Err(CheckpointError::NotEnded(s.phase())),
        }
    }
}

/// Resolves at `deadline`; never without one.
async fn idle_timer(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves once an end of protection was asked for; never without a request (or
/// when nobody can ask any more).
async fn requested(rx: &mut Option<watch::Receiver<bool>>) {
    if let Some(r) = rx
        && r.wait_for(|v| *v).await.is_ok()
    {
        return;
    }
    std::future::pending().await
}
