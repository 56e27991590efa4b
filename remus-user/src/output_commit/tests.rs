//! Output commit, tested over the checkpoint machine with a fake buffer and a fake world
//! that knows the truth: which epoch each frame was emitted in, which cuts were proven,
//! which ACKs were legitimate. Random sequences of suspends, proofs (in time or not),
//! completed checkpoints, ACKs (duplicate, stale and bogus ones included), losses and
//! out-of-order inputs; after every step the releases are checked against the invariant.
use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::checkpoint::machine::{Action, Input, Machine, Phase};
use crate::checkpoint::{LossKind, LossReason, Released};

/// One thing that happens, as the generator draws it.
#[derive(Clone, Debug)]
enum Op {
    /// The guest sends a frame (into the open epoch, or straight out once unprotected).
    Frame,
    /// The next input of the main cycle: suspend, proof (`in_time`), checkpoint sent.
    Advance { in_time: bool },
    /// An ACK from the backup, `k` relative to the last checkpoint sent: negative is
    /// stale or duplicate, positive is bogus (beyond what was sent).
    Ack { k: i64 },
    /// The backup is declared lost.
    Lost,
    /// An input out of order (the machine must abort, holding).
    Wild { which: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Frame),
        8 => any::<bool>().prop_map(|b| Op::Advance { in_time: b }),
        4 => (-3i64..=2).prop_map(|k| Op::Ack { k }),
        1 => Just(Op::Lost),
        1 => (0u8..4).prop_map(|which| Op::Wild { which }),
    ]
}

/// A fake output buffer: frames per epoch, what it released, in order (tests only).
#[derive(Debug, Default)]
struct FakeBuffer {
    open_epoch: u64,
    held: Vec<(u64, u64)>,
    released: Vec<u64>,
    passing: bool,
}

/// The fake world around the machine: drives it, executes its actions on the fake
/// buffer, and checks each release against what it knows to be true.
#[derive(Debug)]
struct FakeWorld {
    machine: Machine,
    buf: FakeBuffer,
    next_frame: u64,
    /// checkpoint -> (epoch cut, proven in time), as told to the machine.
    cuts: BTreeMap<u64, (u64, bool)>,
    /// Checkpoints sent whole, and the highest legitimate ACK seen.
    sent: u64,
    valid_ack: u64,
    lost_declared: bool,
    /// Force every proof in time (the "no merges" twin of a run).
    all_in_time: bool,
}

impl FakeWorld {
    fn new(all_in_time: bool) -> FakeWorld {
        FakeWorld {
            machine: Machine::new(),
            buf: FakeBuffer {
                open_epoch: 1,
                ..Default::default()
            },
            next_frame: 0,
            cuts: BTreeMap::new(),
            sent: 0,
            valid_ack: 0,
            lost_declared: false,
            all_in_time,
        }
    }

    fn phase(&self) -> Phase {
        self.machine.state().phase()
    }

    /// The checkpoint the main cycle is at (the one being cut, proven or sent).
    fn current(&self) -> u64 {
        self.sent + 1
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Frame => {
                let id = self.next_frame;
                self.next_frame += 1;
                if self.buf.passing {
                    self.buf.released.push(id);
                } else {
                    self.buf.held.push((id, self.buf.open_epoch));
                }
                Ok(())
            }
            Op::Advance { in_time } => {
                let n = self.current();
                let in_time = in_time || self.all_in_time;
                let input = match self.phase() {
                    Phase::Running => Input::Suspended { checkpoint: n },
                    Phase::Suspended => Input::Proof {
                        checkpoint: n,
                        in_time,
                    },
                    Phase::Resumed => Input::Sent { checkpoint: n },
                    _ => return Ok(()),
                };
                self.feed(input)
            }
            Op::Ack { k } => {
                let n = (self.sent as i64 + k).max(0) as u64;
                self.feed(Input::Ack { checkpoint: n })
            }
            Op::Lost => self.feed(Input::BackupLost(LossReason::new(
                LossKind::Silence,
                "fake",
            ))),
            Op::Wild { which } => {
                let n = self.current();
                let input = match which {
                    0 => Input::Suspended { checkpoint: n + 1 },
                    1 => Input::Proof {
                        checkpoint: n + 1,
                        in_time: true,
                    },
                    2 => Input::Sent { checkpoint: n + 1 },
                    _ => Input::EpochCut {
                        checkpoint: n,
                        epoch: 99,
                    },
                };
                self.feed(input)
            }
        }
    }

    /// Gives the machine one input, runs its actions (feeding results back), checks.
    fn feed(&mut self, input: Input) -> Result<(), TestCaseError> {
        let protected = matches!(
            self.phase(),
            Phase::Running | Phase::Cutting | Phase::Suspended | Phase::Resumed
        );
        match &input {
            Input::Proof {
                checkpoint,
                in_time,
            } => {
                if let Some(c) = self.cuts.get_mut(checkpoint) {
                    c.1 = *in_time;
                }
            }
            Input::Sent { checkpoint } if protected && self.phase() == Phase::Resumed => {
                self.sent = *checkpoint
            }
            Input::Ack { checkpoint } if protected && *checkpoint <= self.sent => {
                self.valid_ack = self.valid_ack.max(*checkpoint)
            }
            Input::BackupLost(_) => self.lost_declared = true,
            _ => {}
        }
        let mut queue = vec![input];
        while let Some(i) = queue.pop() {
            let Ok(actions) = self.machine.apply(i) else {
                prop_assert_eq!(self.phase(), Phase::Aborted);
                return Ok(());
            };
            for a in actions {
                if let Some(next) = self.execute(a)? {
                    queue.push(next);
                }
            }
        }
        Ok(())
    }

    fn execute(&mut self, a: Action) -> Result<Option<Input>, TestCaseError> {
        match a {
            Action::CutEpoch { checkpoint } => {
                let epoch = self.buf.open_epoch;
                self.buf.open_epoch += 1;
                self.cuts.insert(checkpoint, (epoch, false));
                Ok(Some(Input::EpochCut { checkpoint, epoch }))
            }
            Action::Merged { .. } => Ok(None),
            Action::Commit { acked, epoch } => {
                prop_assert!(
                    acked <= self.valid_ack,
                    "commit on ACK({acked}) never legitimately received"
                );
                let (out, keep): (Vec<_>, Vec<_>) =
                    self.buf.held.iter().partition(|(_, e)| *e <= epoch);
                for (id, e) in &out {
                    self.check_covered(*id, *e)?;
                }
                self.buf.held = keep;
                self.buf.released.extend(out.iter().map(|(id, _)| id));
                Ok(None)
            }
            Action::FailOpen => {
                prop_assert!(
                    self.lost_declared,
                    "the buffer opened without a declared loss"
                );
                let frames = self.buf.held.len() as u64;
                self.buf
                    .released
                    .extend(self.buf.held.drain(..).map(|(id, _)| id));
                self.buf.passing = true;
                Ok(Some(Input::FailedOpen(Released {
                    epoch: self.buf.open_epoch,
                    frames,
                    bytes: 0,
                })))
            }
        }
    }

    /// The invariant: a frame of epoch `e` goes out only once a legitimately acknowledged
    /// checkpoint M had its cut proven in time at an epoch >= `e` (the frame was emitted
    /// before a suspend the backup's copy includes).
    fn check_covered(&self, id: u64, e: u64) -> Result<(), TestCaseError> {
        let covered = self
            .cuts
            .range(..=self.valid_ack)
            .any(|(_, &(cut, proven))| proven && cut >= e);
        prop_assert!(
            covered,
            "frame {id} of epoch {e} released without an ACK covering it (cuts {:?}, valid ACK {})",
            self.cuts,
            self.valid_ack
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// No frame of epoch N is released before an ACK covering it; merges only delay;
    /// loss opens the buffer only once declared; an aborted machine releases nothing.
    #[test]
    fn output_commit_holds_over_random_event_sequences(ops in proptest::collection::vec(op(), 0..120)) {
        let mut world = FakeWorld::new(false);
        let mut twin = FakeWorld::new(true);
        for op in &ops {
            let released_before = world.buf.released.len();
            let aborted = world.phase() == Phase::Aborted;
            world.step(op)?;
            twin.step(op)?;
            if aborted && !world.buf.passing {
                prop_assert_eq!(world.buf.released.len(), released_before, "released after an abort");
            }
            // Merges only delay: whatever went out, the all-proven twin let out too.
            for id in &world.buf.released {
                prop_assert!(twin.buf.released.contains(id), "merged run released frame {} first", id);
            }
            // Release keeps emission order (epoch order, frame order within an epoch).
            prop_assert!(world.buf.released.windows(2).all(|w| w[0] < w[1]));
        }
    }
}

#[test]
fn output_commit_acked_frames_are_released_and_unacked_ones_held() {
    let mut w = FakeWorld::new(false);
    let ops = [
        Op::Frame,                     // epoch 1
        Op::Advance { in_time: true }, // suspend 1: cut epoch 1
        Op::Advance { in_time: true }, // proven
        Op::Frame,                     // epoch 2
        Op::Advance { in_time: true }, // sent 1
        Op::Advance { in_time: true }, // suspend 2: cut epoch 2
        Op::Frame,                     // epoch 3
        Op::Ack { k: 0 },              // ACK(1)
    ];
    for op in &ops {
        w.step(op).unwrap();
    }
    assert_eq!(w.buf.released, [0]);
    assert_eq!(w.buf.held.len(), 2);
}

#[test]
fn output_commit_merged_epoch_waits_for_the_next_proven_ack() {
    let mut w = FakeWorld::new(false);
    for op in [
        Op::Frame,
        Op::Advance { in_time: true },
        Op::Advance { in_time: false }, // cut 1 not provable: merged
        Op::Advance { in_time: true },  // sent 1
        Op::Ack { k: 0 },               // ACK(1): nothing may go
    ] {
        w.step(&op).unwrap();
    }
    assert!(w.buf.released.is_empty());
    for op in [
        Op::Frame,
        Op::Advance { in_time: true },
        Op::Advance { in_time: true }, // cut 2 proven
        Op::Advance { in_time: true }, // sent 2
        Op::Ack { k: 0 },              // ACK(2): epochs 1 and 2 go
    ] {
        w.step(&op).unwrap();
    }
    assert_eq!(w.buf.released, [0, 1]);
}

#[test]
fn output_commit_bogus_ack_aborts_holding_everything() {
    let mut w = FakeWorld::new(false);
    for op in [
        Op::Frame,
        Op::Advance { in_time: true },
        Op::Advance { in_time: true },
        Op::Ack { k: 1 }, // ACK(1) before checkpoint 1 was sent
        Op::Advance { in_time: true },
        Op::Ack { k: 0 },
        Op::Lost,
    ] {
        w.step(&op).unwrap();
    }
    assert_eq!(w.phase(), Phase::Aborted);
    assert!(w.buf.released.is_empty());
    assert!(!w.buf.passing, "an aborted machine never opens the buffer");
}

#[test]
fn output_commit_loss_opens_the_buffer_only_when_declared() {
    let mut w = FakeWorld::new(false);
    for op in [Op::Frame, Op::Advance { in_time: true }, Op::Frame] {
        w.step(&op).unwrap();
    }
    assert!(w.buf.released.is_empty());
    w.step(&Op::Lost).unwrap();
    assert_eq!(w.buf.released, [0, 1]);
    assert!(w.buf.passing);
    assert_eq!(w.phase(), Phase::Unprotected);
    w.step(&Op::Frame).unwrap();
    assert_eq!(w.buf.released, [0, 1, 2]);
}

#[test]
fn output_commit_ledger_refuses_acks_beyond_what_was_sent() {
    let mut l = Ledger::default();
    l.decided(1, 1, true);
    assert_eq!(l.ack(1), Err(BogusAck { acked: 1, sent: 0 }));
    l.sent(1);
    assert_eq!(l.ack(1), Ok(AckOutcome::Commit { epoch: 1 }));
    assert_eq!(l.ack(1), Ok(AckOutcome::Stale { last: 1 }));
    assert_eq!(
        l.ack(u64::MAX),
        Err(BogusAck {
            acked: u64::MAX,
            sent: 1
        })
    );
}
