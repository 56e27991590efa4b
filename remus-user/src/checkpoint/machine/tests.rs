//! The pure machine: each phase, each input, and the errors that abort it.
use super::*;
use crate::checkpoint::ports::LossKind;

fn run(inputs: impl IntoIterator<Item = Input>) -> (Machine, Vec<Action>) {
    let mut m = Machine::new();
    let mut all = Vec::new();
    for i in inputs {
        all.extend(m.apply(i).expect("valid input"));
    }
    (m, all)
}

fn checkpoint(n: u64, epoch: u64, in_time: bool) -> [Input; 4] {
    [
        Input::Suspended { checkpoint: n },
        Input::EpochCut {
            checkpoint: n,
            epoch,
        },
        Input::Proof {
            checkpoint: n,
            in_time,
        },
        Input::Sent { checkpoint: n },
    ]
}

#[test]
fn one_checkpoint_walks_the_phases() {
    let mut m = Machine::new();
    assert_eq!(m.state().phase(), Phase::Running);
    let [s, c, p, d] = checkpoint(1, 1, true);
    assert_eq!(m.apply(s).unwrap(), [Action::CutEpoch { checkpoint: 1 }]);
    assert_eq!(m.state().phase(), Phase::Cutting);
    assert_eq!(m.apply(c).unwrap(), []);
    assert_eq!(m.state().phase(), Phase::Suspended);
    assert_eq!(m.apply(p).unwrap(), []);
    assert_eq!(m.state().phase(), Phase::Resumed);
    assert_eq!(m.apply(d).unwrap(), []);
    assert_eq!(m.state().phase(), Phase::Running);
    assert_eq!(
        m.apply(Input::Ack { checkpoint: 1 }).unwrap(),
        [Action::Commit { acked: 1, epoch: 1 }]
    );
    assert_eq!(m.state().last_acked(), 1);
    assert_eq!(m.state().committed_epoch(), 1);
}

#[test]
fn an_unproven_cut_is_merged_and_its_ack_commits_nothing() {
    let (mut m, actions) = run(checkpoint(1, 1, false));
    assert_eq!(
        actions,
        [
            Action::CutEpoch { checkpoint: 1 },
            Action::Merged {
                checkpoint: 1,
                epoch: 1
            }
        ]
    );
    assert_eq!(m.apply(Input::Ack { checkpoint: 1 }).unwrap(), []);
    assert_eq!(m.state().merges(), 1);
}

#[test]
fn an_ack_may_arrive_in_any_protected_phase() {
    // ACK(1) while checkpoint 2 is being cut, suspended and resumed.
    for stop in 1..=3 {
        let mut inputs: Vec<Input> = checkpoint(1, 1, true).into();
        inputs.extend(checkpoint(2, 2, true).into_iter().take(stop));
        let (mut m, _) = run(inputs);
        assert_eq!(
            m.apply(Input::Ack { checkpoint: 1 }).unwrap(),
            [Action::Commit { acked: 1, epoch: 1 }],
            "stop {stop}"
        );
    }
}

#[test]
fn inputs_out_of_order_abort_the_machine() {
    let bad: [(Vec<Input>, Input); 5] = [
        (
            vec![],
            Input::EpochCut {
                checkpoint: 1,
                epoch: 1,
            },
        ),
        (
            vec![],
            Input::Proof {
                checkpoint: 1,
                in_time: true,
            },
        ),
        (vec![], Input::Sent { checkpoint: 1 }),
        (
            vec![Input::Suspended { checkpoint: 1 }],
            Input::Suspended { checkpoint: 1 },
        ),
        (vec![], Input::FailedOpen(Released::default())),
    ];
    for (before, input) in bad {
        let (mut m, _) = run(before);
        let kind = input.kind();
        let e = m.apply(input).unwrap_err();
        assert!(
            matches!(e, MachineError::Unexpected { input, .. } if input == kind),
            "{e:?}"
        );
        assert_eq!(m.state(), &State::Aborted(e));
        // Aborted refuses everything, ACKs included: nothing is released any more.
        assert!(m.apply(Input::Ack { checkpoint: 0 }).is_err());
    }
}

#[test]
fn a_skipped_checkpoint_number_is_refused() {
    let mut m = Machine::new();
    assert_eq!(
        m.apply(Input::Suspended { checkpoint: 2 }),
        Err(MachineError::WrongCheckpoint {
            input: InputKind::Suspended,
            expected: 1,
            got: 2
        })
    );
}

#[test]
fn loss_fails_open_once_then_ignores_acks_and_ends_lost() {
    let (mut m, _) = run(checkpoint(1, 1, true));
    let why = LossReason::new(LossKind::Connection, "reset");
    assert_eq!(
        m.apply(Input::BackupLost(why.clone())).unwrap(),
        [Action::FailOpen]
    );
    assert_eq!(m.state().phase(), Phase::FailingOpen);
    // A second report of the loss asks for nothing more.
    assert_eq!(m.apply(Input::BackupLost(why.clone())).unwrap(), []);
    let r = Released {
        epoch: 2,
        frames: 5,
        bytes: 300,
    };
    m.apply(Input::FailedOpen(r)).unwrap();
    assert_eq!(m.state().phase(), Phase::Unprotected);
    assert_eq!(m.apply(Input::Ack { checkpoint: 1 }).unwrap(), []);
    m.apply(Input::StreamEnded {
        checkpoints: 1,
        finished: false,
    })
    .unwrap();
    assert_eq!(
        m.state(),
        &State::Ended(RunEnd::Lost {
            reason: why,
            checkpoint: 0
        })
    );
}

#[test]
fn the_stream_ending_ends_the_run_and_nothing_follows() {
    let (mut m, _) = run(checkpoint(1, 1, true));
    m.apply(Input::StreamEnded {
        checkpoints: 1,
        finished: false,
    })
    .unwrap();
    assert_eq!(
        m.state(),
        &State::Ended(RunEnd::Closed {
            checkpoints: 1,
            finished: false
        })
    );
    assert!(matches!(
        m.apply(Input::Ack { checkpoint: 1 }),
        Err(MachineError::Unexpected {
            phase: Phase::Ended,
            ..
        })
    ));
}

#[test]
fn step_is_pure() {
    let s = State::new();
    let a = s.clone().step(Input::Suspended { checkpoint: 1 }).unwrap();
    let b = s.step(Input::Suspended { checkpoint: 1 }).unwrap();
    assert_eq!(a, b);
}
