//! The relay-mode driver of the checkpoint machine: xl's stream on a pipe is how it learns
//! that the guest was suspended, and the pipe's capacity is how it proves the epoch cut
//! came in time.
//!
//! Owns: the read loop over xl's pipe (parser, forwarding to the backup, racing the
//! backup's answers and a request to end protection), the pipe proof, executing the
//! machine's actions on the ports, the per-checkpoint log span and the controller's
//! metrics. Never touches: the rules (the machine decides), sockets or the kernel
//! (reached through the ports).
//!
//! The pipe proof (DESIGN.md, "Checkpoints and epochs with stock xl remus"): at the first
//! post-suspend byte of checkpoint N the driver has read R bytes from the pipe and asks
//! for the cut. When libxc's CHECKPOINT record of N is seen ending at P, the cut is proven
//! in time iff P > R + C (C = pipe capacity): libxc cannot have finished writing it, so
//! the guest, resumed only after that write returns, was still suspended at the cut.
//!
//! Several vifs (`netbuf::VifGroup`): the cut is one `close_epoch` on the group, which
//! closes every vif's epoch in turn. R is noted before the first vif is cut, and nothing
//! is read from the pipe until the last vif's cut has returned (the read loop awaits the
//! cut), so at every instant of the cutting xl had written at most R + C bytes. P > R + C
//! therefore proves the *last* cut, and with it every earlier one, came while the guest
//! was suspended: one proof covers all the vifs, and a failed proof merges the epoch on
//! all of them (the group's epoch is one number).
use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;
use tracing::{Span, debug, error, info, info_span, warn};

use super::CheckpointError;
use super::machine::{Action, Input, Machine, RunEnd, State};
use super::ports::{BackupEvent, LossKind, LossReason, NetBuffer, Replicator};
use crate::metrics::Metrics;
use crate::stream::{Event, Parser};

/// The cut of the checkpoint in progress: where the pipe was when it was asked for.
#[derive(Clone, Copy, Debug)]
struct PendingCut {
    checkpoint: u64,
    read_at: u64,
}

/// Drives the checkpoint machine from xl's stream (see the module docs).
pub struct RelayDriver<B: NetBuffer> {
    pub(super) buffer: B,
    pipe_capacity: u64,
    pub(super) metrics: Arc<Metrics>,
    machine: Machine,
    cut: Option<PendingCut>,
    /// One span per checkpoint: its cut, proof and commit are logged inside it.
    spans: BTreeMap<u64, Span>,
    last_acked: u64,
    committed_epoch: u64,
    merges: u64,
    /// Raised when protection is to end on request (the relay's control socket).
    end_request: Option<watch::Receiver<bool>>,
}

impl<B: NetBuffer> RelayDriver<B> {
    /// `pipe_capacity` is C, the capacity of xl's pipe as read back after shrinking it.
    pub fn new(buffer: B, pipe_capacity: u64, metrics: Arc<Metrics>) -> Self {
        RelayDriver {
            buffer,
            pipe_capacity,
            metrics,
            machine: Machine::new(),
            cut: None,
            spans: BTreeMap::new(),
            last_acked: 0,
            committed_epoch: 0,
            merges: 0,
            end_request: None,
        }
    }

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
                let span = info_span!("checkpoint", n = checkpoint, epoch);
                span.in_scope(|| debug!("epoch cut at the first post-suspend byte"));
                self.spans.insert(checkpoint, span);
                Ok(Some(Input::EpochCut { checkpoint, epoch }))
            }
            Action::Merged { checkpoint, epoch } => {
                self.merges += 1;
                self.metrics.epoch_merges_total.inc();
                self.in_span(checkpoint, || {
                    info!(
                        checkpoint,
                        epoch,
                        "cannot prove the epoch cut was before the guest resumed: epoch merged into the next"
                    )
                });
                Ok(None)
            }
            Action::Commit { acked, epoch } => {
                let r = self.buffer.commit(epoch).await?;
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
                });
                self.apply(Input::Suspended { checkpoint }).await
            }
            Event::LibxcCheckpoint { checkpoint, end } => {
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

    /// The pipe proof: P > R + C. A CHECKPOINT record without its cut proves nothing (the
    /// machine refuses it as out of order).
    fn prove(&mut self, checkpoint: u64, end: u64) -> bool {
        let Some(cut) = self.cut.take().filter(|c| c.checkpoint == checkpoint) else {
            return false;
        };
        let bound = cut.read_at.saturating_add(self.pipe_capacity);
        let in_time = end > bound;
        self.in_span(checkpoint, || {
            debug!(
                end,
                read_at = cut.read_at,
                pipe = self.pipe_capacity,
                in_time,
                "pipe proof"
            )
        });
        in_time
    }

    /// The read loop: stdin → parser → epoch cuts → backup, raced against what the
    /// backup says. `input` should be xl's pipe, already shrunk to `pipe_capacity`.
    pub async fn run<R, P>(&mut self, mut input: R, rep: &mut P) -> Result<RunEnd, CheckpointError>
    where
        R: AsyncRead + Unpin + Send,
        P: Replicator,
    {
        let mut parser = Parser::new();
        let mut buf = vec![0u8; 64 * 1024];
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
                    BackupEvent::Ack(n) => self.apply(Input::Ack { checkpoint: n }).await?,
                    BackupEvent::Lost(reason) => return self.lost(reason).await,
                },
                () = requested(&mut end_request) => return self.end_protection(rep).await,
                r = input.read(&mut buf) => {
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
                    parser.feed(&buf[..n], &mut events)?;
                    for ev in &events {
                        finished |= matches!(ev, Event::End { .. });
                        self.on_stream_event(ev, read_total).await?;
                    }
                    self.metrics.stream_bytes_total.inc_by(n as u64);
                    if let Err(e) = rep.forward(&buf[..n], &events).await {
                        return self.lost(e.loss()).await;
                    }
                }
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
                    self.apply(Input::Ack { checkpoint: a }).await?;
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
