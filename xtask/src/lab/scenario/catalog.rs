//! The lab's scenarios, as data: which steps, on which host, bounded how.
//!
//! Owns: the step lists of the scenarios `lab test` runs, in order:
//! - `remus`: host A protects the guest with `remus protect` (the relay with the buffer
//!   on the vif) to host B's `remus backup`, from the installed package and
//!   /etc/remus/remus.toml; host A powered off; the backup must take over and the client must see every counter value
//!   exactly once, in order, on the same connection (asserted);
//! - `pvh-2vif`: the same, for a PVH guest with two vifs on two bridges, a client behind
//!   each (the second on the second client LAN): both connections must survive with
//!   every value once, in order (asserted);
//! - `link-cut-remus` and `link-cut-stock`: the replication link goes dark while both
//!   hosts live, then comes back; what each does is measured and reported, not judged
//!   (the baseline for split-brain protection);
//! - `freeze-remus`: host A freezes (its QEMU stopped) for a while, then runs on;
//!   measured, not judged;
//! - `disk`: `remus` with a replicated disk (`remus disk serve|receive`, started before
//!   the guest, which writes each counter value to its disk before replying); after the
//!   power-off, the backup guest's disk must agree with its memory and hold every value
//!   the client received (asserted);
//! - `anchor`: stock `xl remus` over ssh, host A powered off; the comparison, reported and
//!   never asserted on what its client saw (stock Remus has no heartbeat).
//!
//! - the soak's rounds (`soak_round`): the relay, host A powered off at a drawn phase
//!   (scenario/soak.rs judges them).
//!
//! The power-off scenarios come first and last so that host A, off after `remus`, boots
//! again for `pvh-2vif`, again for the link cuts, and stays off after `anchor` (the lab
//! stops then).
//! Never touches: how a step is carried out (acts.rs) or run (mod.rs).
use super::{
    On, Scenario, Step,
    acts::{Act, Failure, Protection, Restore},
    guests::{Guest, Kind, Vif2},
    soak::{Kill, Phase},
};
use crate::lab::topology::Host;

/// How long the anchor's client is watched after the power-off (stock Remus has no
/// heartbeat: it is expected not to fail over).
const ANCHOR_BOUND_S: u64 = 60;
/// Bound on the relay's failover (heartbeat timeout + libxl's activation of the backup).
const REMUS_BOUND_S: u64 = 120;
/// How long checkpoints are counted before the failure.
const MEASURE_S: u64 = 15;
/// How long the live view (the demo) shows both ends' `remus status` (a test run takes
/// one sample, within the bound).
const STATUS_S: u64 = 15;
/// How long the replication link stays dark, then how long it is watched once back.
const LINK_DARK_S: u64 = 30;
const LINK_BACK_S: u64 = 20;
/// How long the frozen primary stays frozen (the backup may take over meanwhile), then
/// how long it is watched once it runs on.
const FROZEN_S: u64 = 30;
const THAWED_S: u64 = 20;

/// The scenario names `lab test --only` accepts, in the order `lab test` runs them.
pub const NAMES: &[&str] = &[
    "remus",
    "pvh-2vif",
    "link-cut-remus",
    "link-cut-stock",
    "freeze-remus",
    "disk",
    "anchor",
];

/// A scenario by name; `relay_no_buffer` runs the relay without output commit.
pub fn by_name(name: &str, relay_no_buffer: bool) -> Option<Scenario> {
    let relay = Protection::Relay {
        no_buffer: relay_no_buffer,
    };
    let (steps, name) = match name {
        // As an operator protects a guest (the package, remus.toml, `remus protect`); the
        // diagnostics without output commit need the hand-composed relay.
        "remus" if relay_no_buffer => (power_off(relay, true), "remus"),
        "remus" => (power_off(Protection::Protect, true), "remus"),
        "pvh-2vif" => (pvh_two_vifs(relay), "pvh-2vif"),
        "anchor" => (power_off(Protection::Stock, false), "anchor"),
        "link-cut-remus" => (link_cut(relay), "link-cut-remus"),
        "link-cut-stock" => (link_cut(Protection::Stock), "link-cut-stock"),
        "freeze-remus" => (freeze(relay), "freeze-remus"),
        "disk" => (disk(relay), "disk"),
        _ => return None,
    };
    Some(Scenario {
        name,
        primary: Host::A,
        backup: Host::B,
        steps,
        kill: None,
    })
}

/// Bound on a soak round's wait for the backup's word and the client's first reply (the
/// client's TCP backs off: its first retransmission after the backup resumed can come
/// tens of seconds later).
const SOAK_BOUND_S: u64 = 180;

/// Soak round `i`: protected by the relay, host A powered off in `kill`'s phase.
pub fn soak_round(i: usize, kill: Kill) -> Scenario {
    use On::{Backup, Machine, Primary};
    let relay = Protection::Relay { no_buffer: false };
    let mut steps: Vec<Step> = protected(relay)
        .into_iter()
        .filter(|s| match s.act {
            Act::MeasureRate => false,
            Act::FirstCheckpoints => kill.phase != Phase::InitialCopy,
            _ => true,
        })
        .collect();
    steps.extend([
        Step::new(
            "d: the sending side stops in the phase",
            Primary,
            400,
            Act::Hold(kill),
        ),
        Step::new(
            "d: the primary host loses power (its QEMU is killed)",
            Machine,
            30,
            Act::Fail(Failure::PowerOff),
        ),
        Step::new(
            "e: the backup's word, then the client's first reply",
            Machine,
            SOAK_BOUND_S,
            Act::AwaitOutcome,
        ),
        Step::new(
            "e: the client carries on after the failover",
            Machine,
            60,
            Act::RepliesAfterFailover(super::soak::REPLIES_AFTER),
        ),
        Step::new(
            "e: the backup host runs the guest",
            Backup,
            30,
            Act::BackupIsGuest,
        ),
        Step::new("e: the client stops", Machine, 30, Act::ClientStop),
        Step::new(
            "e: every value once on one connection, or no failover without a checkpoint",
            Machine,
            0,
            Act::SoakVerdict,
        ),
    ]);
    Scenario {
        name: Box::leak(format!("soak-{i}").into_boxed_str()),
        primary: Host::A,
        backup: Host::B,
        steps,
        kill: Some(kill),
    }
}

/// Up to the moment the guest is protected and measured: the same for every scenario.
fn protected(p: Protection) -> Vec<Step> {
    use On::{Backup, Machine, Primary};
    let mut v = vec![
        Step::new("cleanup before the run", Machine, 120, Act::Cleanup),
        Step::new(
            "both hosts are up (one powered off earlier boots again)",
            Machine,
            900,
            Act::HostsUp,
        ),
        Step::new(
            "a: the guest boots on the primary and its service answers",
            Primary,
            300,
            Act::GuestUp,
        ),
        Step::new(
            "a: the client connects across the client LAN",
            Machine,
            60,
            Act::ClientStart,
        ),
        Step::new(
            "b: the client gets replies on its one connection",
            Machine,
            60,
            Act::Replies(10),
        ),
    ];
    if matches!(p, Protection::Relay { .. }) {
        v.push(Step::new(
            "c: the backup's relay listens on the replication link",
            Backup,
            60,
            Act::BackupListens,
        ));
    }
    if p == Protection::Protect {
        v.push(Step::new(
            "c: the backup listens (remus backup, as its unit runs it)",
            Backup,
            60,
            Act::BackupService,
        ));
    }
    v.extend([
        Step::new(
            "c: protection starts (xl remus, primary to backup)",
            Primary,
            60,
            Act::Protect(p),
        ),
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
    ]);
    if p == Protection::Protect {
        v.push(Step::new(
            "c: remus status on both hosts",
            Machine,
            STATUS_S,
            Act::RemusStatus,
        ));
    }
    v
}

/// The primary host loses power. `judged`: the backup must take over and the client see
/// every value exactly once (remus); otherwise what happens is reported (the anchor).
fn power_off(p: Protection, judged: bool) -> Vec<Step> {
    use On::{Backup, Machine};
    let mut v = protected(p);
    if judged {
        v.push(Step::new(
            "d: the failover watchers start (backup dom0, client tap)",
            Backup,
            60,
            Act::WatchFailover,
        ));
    }
    v.push(Step::new(
        "d: the primary host loses power (its QEMU is killed)",
        Machine,
        30,
        Act::Fail(Failure::PowerOff),
    ));
    if judged {
        v.extend([
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
        ]);
    } else {
        v.push(Step::new(
            "e: does the backup take over? (stock Remus has no heartbeat)",
            Machine,
            ANCHOR_BOUND_S,
            Act::AwaitFailover { required: false },
        ));
    }
    v.extend([
        Step::new(
            "e: the backup host runs the guest",
            Backup,
            30,
            Act::BackupIsGuest,
        ),
        Step::new(
            "e: what each host runs",
            Machine,
            30,
            Act::Snapshot("after the power-off"),
        ),
        Step::new("e: the client stops", Machine, 30, Act::ClientStop),
    ]);
    if judged {
        v.push(Step::new(
            "e: the failover timeline",
            Machine,
            0,
            Act::FailoverTimeline,
        ));
        v.push(Step::new(
            "e: every counter value exactly once, in order, on one connection",
            Machine,
            0,
            Act::ExactlyOnce,
        ));
    }
    v
}

/// `remus` with a replicated disk: the disk daemons start before the guest (backup first,
/// then the primary until the backup is in sync), the guest's disk is checked against its
/// memory while protected (on the primary) and after the failover (on the backup).
fn disk(p: Protection) -> Vec<Step> {
    use On::{Backup, Primary};
    let mut v = power_off(p, true);
    let at = |v: &[Step], f: fn(&Act) -> bool| v.iter().position(|s| f(&s.act));
    let guest = at(&v, |a| matches!(a, Act::GuestUp)).unwrap_or(2);
    v.splice(
        guest..guest,
        [
            Step::new(
                "a: the backup's disk daemon listens on the replication link",
                Backup,
                60,
                Act::DiskListens,
            ),
            Step::new(
                "a: the primary's disk daemon serves /dev/nbd0, the backup gets in sync",
                Primary,
                300,
                Act::DiskServe,
            ),
        ],
    );
    let off = at(&v, |a| matches!(a, Act::Fail(_))).unwrap_or(v.len());
    v.insert(
        off,
        Step::new(
            "c: the guest's disk agrees with its memory while protected",
            Primary,
            60,
            Act::DiskAgrees("protected"),
        ),
    );
    let after = at(&v, |a| matches!(a, Act::RepliesAfterFailover(_))).map_or(v.len(), |i| i + 1);
    v.insert(
        after,
        Step::new(
            "e: the backup guest's disk agrees with its memory and holds every value the client got",
            Backup,
            60,
            Act::DiskAgrees("after failover"),
        ),
    );
    v
}

/// `remus`'s power-off for a PVH guest with two vifs: the second vif's bridge on the
/// backup, a second client behind it, both clients judged.
fn pvh_two_vifs(p: Protection) -> Vec<Step> {
    use On::{Backup, Machine, Primary};
    let mut v = power_off(p, true);
    let after = |v: &mut Vec<Step>, f: fn(&Act) -> bool, s: Step| {
        let i = v.iter().position(|s| f(&s.act)).map_or(v.len(), |i| i + 1);
        v.insert(i, s);
    };
    let g = v
        .iter()
        .position(|s| matches!(s.act, Act::GuestUp))
        .unwrap_or(2);
    v[g] = Step::new(
        "a: the PVH guest with two vifs boots on the primary and both its services answer",
        Primary,
        400,
        Act::Guest(Guest {
            kind: Kind::Pvh,
            vifs: 2,
        }),
    );
    after(
        &mut v,
        |a| matches!(a, Act::Guest(_)),
        Step::new(
            "a: the backup has the second client LAN's bridge",
            Backup,
            60,
            Act::Vif2(Vif2::Lan),
        ),
    );
    after(
        &mut v,
        |a| matches!(a, Act::ClientStart),
        Step::new(
            "a: the second client connects across the second client LAN",
            Machine,
            60,
            Act::Vif2(Vif2::ClientStart),
        ),
    );
    after(
        &mut v,
        |a| matches!(a, Act::Replies(_)),
        Step::new(
            "b: the second client gets replies on its one connection",
            Machine,
            60,
            Act::Vif2(Vif2::Replies(10)),
        ),
    );
    after(
        &mut v,
        |a| matches!(a, Act::AwaitFailover { .. }),
        Step::new(
            "e: the second client's connection carries on too",
            Machine,
            REMUS_BOUND_S,
            Act::Vif2(Vif2::AwaitFailover),
        ),
    );
    after(
        &mut v,
        |a| matches!(a, Act::RepliesAfterFailover(_)),
        Step::new(
            "e: the second client carries on after the failover",
            Machine,
            60,
            Act::Vif2(Vif2::RepliesAfterFailover(20)),
        ),
    );
    v.push(Step::new(
        "e: the second client: every value once, in order, on one connection",
        Machine,
        0,
        Act::Vif2(Vif2::ExactlyOnce),
    ));
    v
}

/// The replication link goes dark while both hosts live, then comes back: measured.
fn link_cut(p: Protection) -> Vec<Step> {
    use On::Machine;
    let mut v = protected(p);
    v.extend([
        Step::new(
            "d: the replication link goes dark (both hosts live)",
            Machine,
            30,
            Act::Fail(Failure::LinkDown),
        ),
        Step::new("d: the link stays dark", Machine, LINK_DARK_S, Act::Watch),
        Step::new(
            "d: what each host runs with the link dark",
            Machine,
            30,
            Act::Snapshot("link dark"),
        ),
        Step::new(
            "e: the replication link comes back",
            Machine,
            30,
            Act::Restore(Restore::LinkUp),
        ),
        Step::new("e: the link stays up", Machine, LINK_BACK_S, Act::Watch),
        Step::new(
            "e: what each host runs with the link back",
            Machine,
            30,
            Act::Snapshot("link back"),
        ),
        Step::new("e: the client stops", Machine, 30, Act::ClientStop),
    ]);
    v
}

/// The primary host freezes while protected, then runs on: measured.
fn freeze(p: Protection) -> Vec<Step> {
    use On::Machine;
    let mut v = protected(p);
    v.extend([
        Step::new(
            "d: the primary host freezes (its QEMU is stopped)",
            Machine,
            30,
            Act::Fail(Failure::Freeze),
        ),
        Step::new("d: the primary stays frozen", Machine, FROZEN_S, Act::Watch),
        Step::new(
            "d: what each host runs with the primary frozen",
            Machine,
            30,
            Act::Snapshot("primary frozen"),
        ),
        Step::new(
            "e: the primary runs on",
            Machine,
            30,
            Act::Restore(Restore::Thaw),
        ),
        Step::new("e: the primary runs", Machine, THAWED_S, Act::Watch),
        Step::new(
            "e: what each host runs with the primary back",
            Machine,
            30,
            Act::Snapshot("primary thawed"),
        ),
        Step::new("e: the client stops", Machine, 30, Act::ClientStop),
    ]);
    v
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
        let asserts = |n: &str| {
            by_name(n, false).expect("exists").steps.iter().any(|s| {
                matches!(
                    s.act,
                    Act::ExactlyOnce | Act::AwaitFailover { required: true }
                )
            })
        };
        assert!(asserts("remus"));
        assert!(asserts("disk"));
        assert!(asserts("pvh-2vif"));
        for n in ["anchor", "link-cut-remus", "link-cut-stock", "freeze-remus"] {
            assert!(!asserts(n), "{n} must not judge its outcome");
        }
    }

    #[test]
    fn a_soak_round_holds_its_phase_before_the_power_off_and_judges_after() {
        for phase in Phase::ALL {
            let s = soak_round(3, Kill { phase, delay_ms: 5 });
            assert_eq!(s.name, "soak-3");
            let at = |f: fn(&Act) -> bool| s.steps.iter().position(|s| f(&s.act));
            let hold = at(|a| matches!(a, Act::Hold(k) if k.delay_ms == 5)).expect("holds");
            let off = at(|a| matches!(a, Act::Fail(Failure::PowerOff))).expect("powers off");
            let verdict = at(|a| matches!(a, Act::SoakVerdict)).expect("judges");
            assert!(hold + 1 == off && off < verdict, "{phase:?}");
            let waits_first = at(|a| matches!(a, Act::FirstCheckpoints)).is_some();
            assert_eq!(waits_first, phase != Phase::InitialCopy, "{phase:?}");
            assert!(at(|a| matches!(a, Act::MeasureRate)).is_none());
        }
    }

    #[test]
    fn the_disk_daemons_start_before_the_guest_and_the_disk_is_judged_after_the_failover() {
        let s = by_name("disk", false).expect("exists");
        let at = |f: fn(&Act) -> bool| s.steps.iter().position(|s| f(&s.act)).expect("step");
        let listens = at(|a| matches!(a, Act::DiskListens));
        let serves = at(|a| matches!(a, Act::DiskServe));
        let guest = at(|a| matches!(a, Act::GuestUp));
        let off = at(|a| matches!(a, Act::Fail(Failure::PowerOff)));
        let before = at(|a| matches!(a, Act::DiskAgrees("protected")));
        let after = at(|a| matches!(a, Act::DiskAgrees("after failover")));
        assert!(
            listens < serves && serves < guest,
            "daemons before the guest"
        );
        assert!(
            before < off && off < after,
            "judged before and after the power-off"
        );
        assert_eq!(s.steps[after].on, On::Backup);
        assert!(s.steps.iter().any(|s| matches!(s.act, Act::ExactlyOnce)));
    }

    #[test]
    fn the_two_vif_run_sets_up_and_judges_its_second_client_around_the_power_off() {
        let s = by_name("pvh-2vif", false).expect("exists");
        let at = |f: &dyn Fn(&Act) -> bool| {
            s.steps
                .iter()
                .position(|s| f(&s.act))
                .expect("the step is there")
        };
        let guest = at(&|a| {
            matches!(
                a,
                Act::Guest(Guest {
                    kind: Kind::Pvh,
                    vifs: 2
                })
            )
        });
        let lan = at(&|a| matches!(a, Act::Vif2(Vif2::Lan)));
        let protect = at(&|a| matches!(a, Act::Protect(_)));
        let start2 = at(&|a| matches!(a, Act::Vif2(Vif2::ClientStart)));
        let off = at(&|a| matches!(a, Act::Fail(Failure::PowerOff)));
        let await2 = at(&|a| matches!(a, Act::Vif2(Vif2::AwaitFailover)));
        let stop = at(&|a| matches!(a, Act::ClientStop));
        let judge2 = at(&|a| matches!(a, Act::Vif2(Vif2::ExactlyOnce)));
        assert!(guest < lan && lan < protect && start2 < protect);
        assert!(off < await2 && await2 < stop && stop < judge2);
        assert_eq!(s.steps[lan].on, On::Backup);
        assert!(!s.steps.iter().any(|s| matches!(s.act, Act::GuestUp)));
        assert!(s.steps.iter().any(|s| matches!(s.act, Act::ExactlyOnce)));
    }

    #[test]
    fn the_remus_run_protects_like_an_operator_and_the_measured_ones_keep_the_relay() {
        let acts = |n: &str, nb: bool| -> Vec<Act> {
            by_name(n, nb)
                .expect("exists")
                .steps
                .iter()
                .map(|s| s.act)
                .collect()
        };
        let at = |v: &[Act], f: fn(&Act) -> bool| v.iter().position(f);
        let remus = acts("remus", false);
        let backup = at(&remus, |a| matches!(a, Act::BackupService)).expect("remus backup");
        let protect =
            at(&remus, |a| matches!(a, Act::Protect(Protection::Protect))).expect("protects");
        let measure = at(&remus, |a| matches!(a, Act::MeasureRate)).expect("measures");
        let status = at(&remus, |a| matches!(a, Act::RemusStatus)).expect("remus status");
        let off = at(&remus, |a| matches!(a, Act::Fail(Failure::PowerOff))).expect("off");
        assert!(backup < protect && protect < measure && measure < status && status < off);
        assert!(at(&remus, |a| matches!(a, Act::BackupListens)).is_none());
        let diag = acts("remus", true);
        assert!(
            at(&diag, |a| matches!(
                a,
                Act::Protect(Protection::Relay { no_buffer: true })
            ))
            .is_some()
        );
        for n in ["link-cut-remus", "freeze-remus"] {
            let v = acts(n, false);
            assert!(
                at(&v, |a| matches!(a, Act::Protect(Protection::Relay { .. }))).is_some(),
                "{n}"
            );
            assert!(at(&v, |a| matches!(a, Act::RemusStatus)).is_none(), "{n}");
        }
        assert!(by_name("remus", false).expect("exists").needs_remus());
    }

    #[test]
    fn every_scenario_boots_its_hosts_and_fails_something() {
        for n in NAMES {
            let s = by_name(n, false).expect("exists");
            assert!(matches!(s.steps[1].act, Act::HostsUp), "{n}");
            assert!(s.steps.iter().any(|s| matches!(s.act, Act::Fail(_))), "{n}");
        }
    }
}
