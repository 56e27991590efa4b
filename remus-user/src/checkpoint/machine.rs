//! The checkpoint state machine: a pure `step(state, input) -> (state, actions)`.
//!
//! Owns: the phases of the checkpoint loop and what each input does in each phase (the
//! diagram is in the module docs of `checkpoint`). Never touches: ports, I/O, clocks,
//! logs: a driver feeds inputs, executes the returned [`Action`]s on its ports, and
//! feeds their results back (e.g. the epoch a cut produced).
use crate::output_commit::{AckOutcome, BogusAck, Ledger};

use super::ports::{LossReason, Released};

/// What a driver tells the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// The guest is suspended for `checkpoint` (relay mode: the first post-suspend byte
    /// of its stream). Answered with [`Action::CutEpoch`].
    Suspended { checkpoint: u64 },
    /// The cut asked for was made: the output buffer closed `epoch`.
    EpochCut { checkpoint: u64, epoch: u64 },
    /// A port could not cut its epoch (a disk whose backup is lost, a disk epoch that is
    /// not the checkpoint's): protection ends fail closed, nothing more is released (the
    /// backup may still activate a copy the port's state no longer matches).
    CutFailed { checkpoint: u64, why: String },
    /// Whether the cut is proven to have happened while the guest was still suspended
    /// (relay mode: the pipe bound P > R + F, F the fill read after the cut; native mode:
    /// Xen's word). A cut that is not proven makes the checkpoint no failover point.
    Proof { checkpoint: u64, in_time: bool },
    /// Every byte of `checkpoint` has gone to the backup.
    Sent { checkpoint: u64 },
    /// The backup holds `checkpoint` completely.
    Ack { checkpoint: u64 },
    /// The backup is gone. Answered with [`Action::FailOpen`].
    BackupLost(LossReason),
    /// The buffer was opened after a loss; this is what it let out.
    FailedOpen(Released),
    /// The stream from the hypervisor ended in order.
    StreamEnded { checkpoints: u64, finished: bool },
}

/// What the driver must do, in order, on its ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Cut the epoch of every port at this instant (the output buffer, then every
    /// replicated disk, all before the proof's fill is read), then report
    /// [`Input::EpochCut`], or [`Input::CutFailed`] if a port could not.
    CutEpoch { checkpoint: u64 },
    /// The cut of `checkpoint` may have come after the guest resumed: `epoch` is merged
    /// into the next proven one (released later, never earlier), and the backup must
    /// not be able to resume from `checkpoint` (the driver tells it before the
    /// checkpoint's end): with an unproven cut, its memory is no consistent failover
    /// point with a disk epoch cut at the same instant, nor with output that passed
    /// before a first cut.
    Merged { checkpoint: u64, epoch: u64 },
    /// Release every held epoch `<= epoch`: ACK(`acked`) covers them.
    Commit { acked: u64, epoch: u64 },
    /// Release everything held and let traffic pass; then report [`Input::FailedOpen`].
    FailOpen,
}

/// How the primary's run ended (the backup's sessions end with `relay::SessionEnd`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// The stream ended in order: xl closed it. `finished`: it ended with libxl END (a
    /// plain migration).
    Closed { checkpoints: u64, finished: bool },
    /// The peer was lost. `checkpoint`: the last one the backup holds (acknowledged).
    Lost { reason: LossReason, checkpoint: u64 },
    /// Protection ended on request: the backup discarded its copy, everything held was
    /// released. `checkpoint`: the last one acknowledged before.
    Discarded {
        checkpoint: u64,
        copy_destroyed: bool,
    },
}

/// Which input arrived (for errors; the input itself may carry a large reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    Suspended,
    EpochCut,
    CutFailed,
    Proof,
    Sent,
    Ack,
    BackupLost,
    FailedOpen,
    StreamEnded,
}

impl Input {
    pub fn kind(&self) -> InputKind {
        match self {
            Input::Suspended { .. } => InputKind::Suspended,
            Input::EpochCut { .. } => InputKind::EpochCut,
            Input::CutFailed { .. } => InputKind::CutFailed,
            Input::Proof { .. } => InputKind::Proof,
            Input::Sent { .. } => InputKind::Sent,
            Input::Ack { .. } => InputKind::Ack,
            Input::BackupLost(_) => InputKind::BackupLost,
            Input::FailedOpen(_) => InputKind::FailedOpen,
            Input::StreamEnded { .. } => InputKind::StreamEnded,
        }
    }
}

/// The phase names, for errors and status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Running,
    Cutting,
    Suspended,
    Resumed,
    FailingOpen,
    Unprotected,
    Ended,
    Aborted,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MachineError {
    #[error("{input:?} cannot happen while {phase:?}")]
    Unexpected { input: InputKind, phase: Phase },
    #[error("{input:?} names checkpoint {got}, but checkpoint {expected} is in progress")]
    WrongCheckpoint {
        input: InputKind,
        expected: u64,
        got: u64,
    },
    #[error(transparent)]
    BogusAck(#[from] BogusAck),
    #[error("the epoch cut of checkpoint {checkpoint} failed: {why}; nothing more is released")]
    CutFailed { checkpoint: u64, why: String },
}

/// What every protected phase carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Protected {
    /// The checkpoint whose suspend comes next (1 = the end of the initial copy).
    pub next: u64,
    pub ledger: Ledger,
    pub merges: u64,
}

/// The phases. Each carries what it needs; see the diagram in `checkpoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// The guest runs; its output goes into the open epoch.
    Running(Protected),
    /// The guest is suspended for `checkpoint`; the epoch cut was asked for.
    Cutting { p: Protected, checkpoint: u64 },
    /// The epoch was cut (`epoch` closed); whether in time is not known yet.
    Suspended {
        p: Protected,
        checkpoint: u64,
        epoch: u64,
    },
    /// The cut is decided; the guest runs again while the rest of `checkpoint` is sent.
    Resumed { p: Protected, checkpoint: u64 },
    /// The backup was lost; the buffer is being opened.
    FailingOpen {
        reason: LossReason,
        acked: u64,
        merges: u64,
    },
    /// The buffer is open: the guest runs unprotected. ACKs and checkpoints change
    /// nothing any more.
    Unprotected {
        reason: LossReason,
        acked: u64,
        merges: u64,
        released: Released,
    },
    /// The run is over.
    Ended(RunEnd),
    /// An error stopped the machine: nothing more is released (fail closed).
    Aborted(MachineError),
}

impl Default for State {
    fn default() -> Self {
        State::new()
    }
}

type Step = Result<(State, Vec<Action>), MachineError>;

impl State {
    pub fn new() -> State {
        State::Running(Protected {
            next: 1,
            ..Protected::default()
        })
    }

    pub fn phase(&self) -> Phase {
        match self {
            State::Running(_) => Phase::Running,
            State::Cutting { .. } => Phase::Cutting,
            State::Suspended { .. } => Phase::Suspended,
            State::Resumed { .. } => Phase::Resumed,
            State::FailingOpen { .. } => Phase::FailingOpen,
            State::Unprotected { .. } => Phase::Unprotected,
            State::Ended(_) => Phase::Ended,
            State::Aborted(_) => Phase::Aborted,
        }
    }

    fn protected(&self) -> Option<&Protected> {
        match self {
            State::Running(p)
            | State::Cutting { p, .. }
            | State::Suspended { p, .. }
            | State::Resumed { p, .. } => Some(p),
            _ => None,
        }
    }

    fn protected_mut(&mut self) -> Option<&mut Protected> {
        match self {
            State::Running(p)
            | State::Cutting { p, .. }
            | State::Suspended { p, .. }
            | State::Resumed { p, .. } => Some(p),
            _ => None,
        }
    }

    /// Last checkpoint the backup acknowledged.
    pub fn last_acked(&self) -> u64 {
        match self {
            State::FailingOpen { acked, .. } | State::Unprotected { acked, .. } => *acked,
            State::Ended(RunEnd::Lost { checkpoint, .. }) => *checkpoint,
            s => s.protected().map_or(0, |p| p.ledger.last_acked()),
        }
    }

    /// Epochs merged so far (cuts not proven in time).
    pub fn merges(&self) -> u64 {
        match self {
            State::FailingOpen { merges, .. } | State::Unprotected { merges, .. } => *merges,
            s => s.protected().map_or(0, |p| p.merges),
        }
    }

    /// Highest epoch committed so far.
    pub fn committed_epoch(&self) -> u64 {
        self.protected().map_or(0, |p| p.ledger.committed_epoch())
    }

    /// One transition. Pure: the same state and input always give the same answer.
    pub fn step(self, input: Input) -> Step {
        let phase = self.phase();
        let unexpected = |input: &Input| MachineError::Unexpected {
            input: input.kind(),
            phase,
        };
        match (self, input) {
            (State::Ended(_) | State::Aborted(_), i) => Err(unexpected(&i)),
            (s, Input::Ack { checkpoint }) => ack(s, checkpoint),
            (s, Input::BackupLost(reason)) => lost(s, reason),
            (
                s,
                Input::StreamEnded {
                    checkpoints,
                    finished,
                },
            ) => Ok((ended(s, checkpoints, finished), vec![])),
            (s, Input::FailedOpen(released)) => failed_open(s, released),
            // Unprotected, the guest's checkpoints go on but nothing is held: no cuts.
            (
                s @ (State::FailingOpen { .. } | State::Unprotected { .. }),
                Input::Suspended { .. }
                | Input::EpochCut { .. }
                | Input::Proof { .. }
                | Input::Sent { .. },
            ) => Ok((s, vec![])),
            (s, i) => cycle(s, i),
        }
    }
}

/// The main cycle: Running → Cutting → Suspended → Resumed → Running.
fn cycle(s: State, input: Input) -> Step {
    match (s, input) {
        (State::Running(p), Input::Suspended { checkpoint }) => {
            expect(InputKind::Suspended, p.next, checkpoint)?;
            Ok((
                State::Cutting { p, checkpoint },
                vec![Action::CutEpoch { checkpoint }],
            ))
        }
        (State::Cutting { checkpoint: c, .. }, Input::CutFailed { checkpoint, why }) => {
            expect(InputKind::CutFailed, c, checkpoint)?;
            Err(MachineError::CutFailed { checkpoint, why })
        }
        (State::Cutting { p, checkpoint: c }, Input::EpochCut { checkpoint, epoch }) => {
            expect(InputKind::EpochCut, c, checkpoint)?;
            Ok((
                State::Suspended {
                    p,
                    checkpoint,
                    epoch,
                },
                vec![],
            ))
        }
        (
            State::Suspended {
                mut p,
                checkpoint: c,
                epoch,
            },
            Input::Proof {
                checkpoint,
                in_time,
            },
        ) => {
            expect(InputKind::Proof, c, checkpoint)?;
            p.ledger.decided(checkpoint, epoch, in_time);
            let mut actions = vec![];
            if !in_time {
                p.merges += 1;
                actions.push(Action::Merged { checkpoint, epoch });
            }
            Ok((State::Resumed { p, checkpoint }, actions))
        }
        (
            State::Resumed {
                mut p,
                checkpoint: c,
            },
            Input::Sent { checkpoint },
        ) => {
            expect(InputKind::Sent, c, checkpoint)?;
            p.ledger.sent(checkpoint);
            p.next = checkpoint + 1;
            Ok((State::Running(p), vec![]))
        }
        (s, i) => Err(MachineError::Unexpected {
            input: i.kind(),
            phase: s.phase(),
        }),
    }
}

fn expect(input: InputKind, expected: u64, got: u64) -> Result<(), MachineError> {
    if expected == got {
        Ok(())
    } else {
        Err(MachineError::WrongCheckpoint {
            input,
            expected,
            got,
        })
    }
}

fn ack(mut s: State, checkpoint: u64) -> Step {
    let Some(p) = s.protected_mut() else {
        // Unprotected (or opening): the buffer is open, an ACK has nothing to release.
        return match s {
            State::FailingOpen { .. } | State::Unprotected { .. } => Ok((s, vec![])),
            s => Err(MachineError::Unexpected {
                input: InputKind::Ack,
                phase: s.phase(),
            }),
        };
    };
    match p.ledger.ack(checkpoint)? {
        AckOutcome::Commit { epoch } => Ok((
            s,
            vec![Action::Commit {
                acked: checkpoint,
                epoch,
            }],
        )),
        AckOutcome::Nothing | AckOutcome::Stale { .. } => Ok((s, vec![])),
    }
}

fn lost(s: State, reason: LossReason) -> Step {
    match s {
        State::FailingOpen { .. } | State::Unprotected { .. } => Ok((s, vec![])),
        s => {
            let (acked, merges) = (s.last_acked(), s.merges());
            Ok((
                State::FailingOpen {
                    reason,
                    acked,
                    merges,
                },
                vec![Action::FailOpen],
            ))
        }
    }
}

fn failed_open(s: State, released: Released) -> Step {
    match s {
        State::FailingOpen {
            reason,
            acked,
            merges,
        } => Ok((
            State::Unprotected {
                reason,
                acked,
                merges,
                released,
            },
            vec![],
        )),
        s => Err(MachineError::Unexpected {
            input: InputKind::FailedOpen,
            phase: s.phase(),
        }),
    }
}

fn ended(s: State, checkpoints: u64, finished: bool) -> State {
    match s {
        State::FailingOpen { reason, acked, .. } | State::Unprotected { reason, acked, .. } => {
            State::Ended(RunEnd::Lost {
                reason,
                checkpoint: acked,
            })
        }
        _ => State::Ended(RunEnd::Closed {
            checkpoints,
            finished,
        }),
    }
}

/// The machine with "any error aborts" built in: a driver holds one of these.
#[derive(Debug, Default)]
pub struct Machine {
    state: State,
}

impl Machine {
    pub fn new() -> Machine {
        Machine::default()
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Applies one input. On error the machine is `Aborted` and stays there.
    pub fn apply(&mut self, input: Input) -> Result<Vec<Action>, MachineError> {
        let s = std::mem::replace(
            &mut self.state,
            State::Ended(RunEnd::Closed {
                checkpoints: 0,
                finished: false,
            }),
        );
        match s.step(input) {
            Ok((next, actions)) => {
                self.state = next;
                Ok(actions)
            }
            Err(e) => {
                self.state = State::Aborted(e.clone());
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests;
