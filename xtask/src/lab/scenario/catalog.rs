//! The lab's scenarios, as data: which steps, where, bounded how.
//!
//! Owns: the step lists of `anchor` (stock `xl remus`, the comparison: what its client saw
//! is reported, never asserted) and `remus` (the relay: the backup must take over and the
//! client must see every counter value exactly once, in order, on the same connection).
//! Never touches: how a step is carried out (acts.rs) or run (mod.rs).
use super::{
    On, Scenario, Step,
    acts::{Act, Failure, Protection},
};

/// How long the anchor's client is watched after the silent death before the frozen
/// sender is killed (stock Remus has no heartbeat: it is expected not to fail over).
const ANCHOR_BOUND_S: u64 = 60;
/// After the anchor's frozen sender is killed (its socket closes), how long to watch.
const ANCHOR_AFTER_KILL_S: u64 = 60;
/// Bound on the relay's failover (heartbeat timeout + libxl's activation of the backup).
const REMUS_BOUND_S: u64 = 120;
/// How long checkpoints are counted before the death.
const MEASURE_S: u64 = 15;

/// The scenario names `lab test --only` accepts, in the order `lab test` runs them.
pub const NAMES: &[&str] = &["anchor", "remus"];

/// A scenario by name; `relay_no_buffer` runs the relay without output commit.
pub fn by_name(name: &str, relay_no_buffer: bool) -> Option<Scenario> {
    match name {
        "anchor" => Some(anchor()),
        "remus" => Some(remus(relay_no_buffer)),
        _ => None,
    }
}

/// Up to the moment the primary is protected and measured: the same for both runs.
fn protected(p: Protection) -> Vec<Step> {
    use On::{Dom0, Machine};
    vec![
        Step::new("cleanup before the run", Dom0, 120, Act::Cleanup),
        Step::new(
            "a: the guest boots and its service answers",
            Dom0,
            300,
            Act::GuestUp,
        ),
        Step::new(
            "a: the client connects from its own netns across the bridge",
            Dom0,
            60,
            Act::ClientStart,
        ),
        Step::new(
            "b: the client gets replies on its one connection",
            Machine,
            60,
            Act::Replies(10),
        ),
        Step::new("c: protection starts (xl remus)", Dom0, 60, Act::Protect(p)),
        Step::new(
            "c: the first checkpoints complete",
            Machine,
            400,
            Act::FirstCheckpoints,
        ),
        Step::new(
            "c: checkpoints keep coming and the client keeps getting replies",
            Machine,
            MEASURE_S,
            Act::MeasureRate,
        ),
        Step::new(
            "d: the primary dies silently (sender frozen, primary destroyed)",
            Dom0,
            60,
            Act::Fail(Failure::FreezeAndDestroy),
        ),
    ]
}

/// Stock `xl remus -F -n` over ssh: the comparison, reported and never asserted on what
/// its client saw (stock Remus has no heartbeat: no failover is expected).
pub fn anchor() -> Scenario {
    use On::{Dom0, Machine};
    let mut steps = protected(Protection::Stock);
    steps.extend([
        Step::new(
            "e: the backup takes over and the client's connection carries on",
            Machine,
            ANCHOR_BOUND_S,
            Act::AwaitFailover { required: false },
        ),
        Step::new(
            "e: without a failover, the frozen sender is killed (its socket closes)",
            Dom0,
            ANCHOR_AFTER_KILL_S,
            Act::KillFrozenSenderIfNoFailover,
        ),
        Step::new("e: the client runs on", Machine, 5, Act::Watch),
        Step::new(
            "e: the backup copy is now the guest",
            Dom0,
            30,
            Act::BackupIsGuest,
        ),
        Step::new("e: the client stops", Dom0, 60, Act::ClientStop),
    ]);
    Scenario {
        name: "anchor",
        steps,
    }
}

/// The relay with the buffer on the vif: the backup must take over and the client must
/// see every value exactly once, in order, on its one connection.
pub fn remus(relay_no_buffer: bool) -> Scenario {
    use On::{Dom0, Machine};
    let mut steps = protected(Protection::Relay {
        no_buffer: relay_no_buffer,
    });
    steps.extend([
        Step::new(
            "e: the backup takes over and the client's connection carries on",
            Machine,
            REMUS_BOUND_S,
            Act::AwaitFailover { required: true },
        ),
        Step::new(
            "e: the client carries on after the failover",
            Machine,
            60,
            Act::RepliesAfterFailover(20),
        ),
        Step::new(
            "e: the backup copy is now the guest",
            Dom0,
            30,
            Act::BackupIsGuest,
        ),
        Step::new("e: the client stops", Dom0, 60, Act::ClientStop),
        Step::new(
            "e: every counter value exactly once, in order, on one connection",
            Machine,
            0,
            Act::ExactlyOnce,
        ),
    ]);
    Scenario {
        name: "remus",
        steps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_has_a_scenario_of_that_name_with_unique_step_names() {
        for n in NAMES {
            let s = by_name(n, false).expect("listed names exist");
            assert_eq!(&s.name, n);
            let mut names: Vec<&str> = s.steps.iter().map(|s| s.name).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), s.steps.len(), "{n}: step names repeat");
        }
        assert!(by_name("nope", false).is_none());
    }

    #[test]
    fn only_the_remus_run_asserts_the_outcome() {
        let asserts = |s: &Scenario| {
            s.steps.iter().any(|s| {
                matches!(
                    s.act,
                    Act::ExactlyOnce | Act::AwaitFailover { required: true }
                )
            })
        };
        assert!(asserts(&remus(false)));
        assert!(!asserts(&anchor()));
    }
}
