//! A scenario run's record: `RunReport` (one entry of `runs` in target/lab/report.json),
//! the uniform per-step record, the verdict sentence and the side-by-side table.
//!
//! Owns: the report's shape and wording. Never touches: the lab (no dom0 calls, no
//! files); the runner and the steps fill it in.
use super::{
    client::Seen,
    progress::RelayView,
    soak::SoakRecord,
    timeline::{self, Phases, Timeline},
};
use crate::lab::{topology::Host, vm::Boot};
use serde::Serialize;
use std::collections::BTreeMap;

/// One step as it ran: the same for every step of every scenario.
#[derive(Serialize, Debug, Clone)]
pub struct StepRecord {
    pub name: String,
    /// Where it ran: "a" or "b" (that host's dom0), or "machine" (the machine running the
    /// lab: the client, the failure switches, waits on the logs).
    pub on: &'static str,
    pub bound_s: f64,
    /// Seconds after the run started.
    pub started_s: f64,
    pub took_s: f64,
    pub ok: bool,
}

/// A failure injected or undone, stamped on the client's clock.
#[derive(Serialize, Debug, Clone)]
pub struct Event {
    /// "power-off", "freeze", "thaw", "link-down", "link-up".
    pub what: &'static str,
    /// The host it hit (none for the replication link).
    pub host: Option<Host>,
    /// Seconds after the run started, and Unix seconds.
    pub at_s: f64,
    pub unix: f64,
}

/// What the lab looked like at one moment (the link-cut scenarios take these).
#[derive(Serialize, Debug, Clone, Default)]
pub struct Snapshot {
    pub label: String,
    pub at_s: f64,
    /// Per host: the domains it runs (Domain-0 left out), or null if its QEMU is off.
    pub domains: BTreeMap<&'static str, Option<Vec<String>>>,
    /// Hosts running a domain named `guest`: live copies of the guest (the backup's
    /// paused copy is `guest--incoming`).
    pub live_copies: usize,
    pub relay_send: Option<RelayView>,
    pub relay_receive: Option<RelayView>,
    pub client_replies: usize,
    pub client_replies_after_failure: usize,
    pub client_ended: Option<String>,
}

#[derive(Serialize, Default, Debug)]
pub struct RunReport {
    pub mode: String,
    pub passed: bool,
    /// Primary and backup host.
    pub hosts: Vec<Host>,
    /// The failure injected (e.g. "power-off of host a"), empty if none was.
    pub failure: String,
    /// The step that failed and why (lab broke, or an asserted outcome was not met).
    pub failed_step: Option<String>,
    pub error: Option<String>,
    pub guest_ready_s: Option<f64>,
    pub first_checkpoint_s: Option<f64>,
    pub checkpoints_per_s: Option<f64>,
    pub ms_per_checkpoint: Option<f64>,
    pub checkpoints_before_death: Option<u64>,
    /// Relay runs: the last checkpoint the backup acknowledged before the death.
    pub acked_before_death: Option<u64>,
    pub backup_took_over: bool,
    /// Relay runs: the backup relay's `failovers_total` once the backup copy is the guest.
    pub backup_failovers: Option<u64>,
    /// `remus protect` runs: one `remus status -j` per host while protected (by host).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub remus_status: BTreeMap<&'static str, serde_json::Value>,
    /// The first gratuitous ARP for the guest's address, from the guest's MAC, seen on
    /// the client LAN after the failure (the backup copy announcing itself).
    pub garp_after_failure_s: Option<f64>,
    pub verdict: String,
    pub client: Seen,
    /// The client's TCP socket just before it was stopped (`ss -tni`): shows a connection
    /// stuck in retransmission when the backup's TCP state is behind what the client saw.
    pub client_tcp: String,
    /// Two-vif guests: what the second client (behind the second vif) saw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub second_client: Option<super::guests::SecondClient>,
    /// Every step in order, including the one that failed.
    pub steps: Vec<StepRecord>,
    /// Failures injected and undone, in order.
    pub events: Vec<Event>,
    /// Hosts (re)booted by this run (a host powered off by an earlier run boots again).
    pub boots: Vec<Boot>,
    pub snapshots: Vec<Snapshot>,
    /// Per-checkpoint phases over the rate window and the client's reply latency then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<Phases>,
    /// A power-off's failover, each moment in seconds after the death (relay runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover_timeline: Option<Timeline>,
    /// A soak round: where it killed the primary and its verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soak: Option<SoakRecord>,
    /// The scenario `disk`: the guest's word on its disk vs its memory, per check.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disk: Vec<super::disk::DiskCheck>,
    /// The bound the failover was awaited within (for the verdict).
    #[serde(skip)]
    pub failover_bound_s: Option<f64>,
}

/// One sentence on what the client saw after the death.
pub fn verdict(s: &Seen, r: &RunReport) -> String {
    let mut v = vec![];
    match (s.first_reply_after_death_s, r.failover_bound_s) {
        (Some(t), _) => v.push(format!("first reply {t:.1} s after the failure")),
        (None, Some(b)) => v.push(format!("no reply within {b:.0} s of the failure")),
        (None, None) => v.push("no reply after the failure".into()),
    }
    if r.backup_took_over && s.first_reply_after_death_s.is_none() {
        v.push(
            "the backup copy did take over, but the client's connection never answered again, most likely because \
             without output commit the client had acknowledged replies that the backup's older TCP state never sent (see client_tcp)"
                .into(),
        );
    }
    if s.repeats_or_regressions > 0 {
        v.push(format!(
            "{} repeated/regressed counter values (first {})",
            s.repeats_or_regressions,
            s.first_anomaly.clone().unwrap_or_default()
        ));
    }
    if s.gaps > 0 {
        v.push(format!("{} gaps", s.gaps));
    }
    if let Some(t) = &s.terminal_event {
        v.push(format!("connection ended: {t}"));
    }
    if s.repeats_or_regressions == 0
        && s.gaps == 0
        && s.terminal_event.is_none()
        && s.replies_after_death > 0
    {
        v.push("every value once, in order, same connection".into());
    }
    if let Some(n) = r.snapshots.last().map(|s| s.live_copies).filter(|n| *n > 1) {
        v.push(format!("{n} live copies of the guest"));
    }
    v.join("; ")
}

/// The side-by-side table of the runs.
pub fn table(runs: &[RunReport]) -> String {
    let f = |o: Option<f64>, p: usize| o.map_or("-".to_string(), |v| format!("{v:.p$}"));
    let mut s = format!(
        "{:<15} {:<6} {:>8} {:>8} {:>10} {:>9} {:>8}  {}\n",
        "run",
        "result",
        "ckpt/s",
        "ms/ckpt",
        "failover_s",
        "replies",
        "repeats",
        "what the client saw"
    );
    for r in runs {
        let res = if r.passed { "ok" } else { "FAIL" };
        let fo = r
            .client
            .first_good_reply_after_death_s
            .or(r.client.first_reply_after_death_s);
        s.push_str(&format!(
            "{:<15} {:<6} {:>8} {:>8} {:>10} {:>9} {:>8}  {}\n",
            r.mode,
            res,
            f(r.checkpoints_per_s, 2),
            f(r.ms_per_checkpoint, 0),
            f(fo, 1),
            r.client.replies,
            r.client.repeats_or_regressions,
            if r.verdict.is_empty() {
                r.failed_step.clone().unwrap_or_default()
            } else {
                r.verdict.clone()
            }
        ));
    }
    let with: Vec<(&str, &Phases)> = runs
        .iter()
        .filter_map(|r| Some((r.mode.as_str(), r.phases.as_ref()?)))
        .collect();
    if !with.is_empty() {
        s.push('\n');
        s.push_str(&timeline::phases_table(&with));
    }
    for r in runs {
        if let Some(t) = &r.failover_timeline {
            s.push('\n');
            s.push_str(&timeline::timeline_table(&r.mode, t));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_of_a_clean_failover_of_a_stock_backup_and_of_two_live_copies() {
        let clean = Seen {
            replies_after_death: 20,
            first_reply_after_death_s: Some(7.25),
            ..Default::default()
        };
        assert_eq!(
            verdict(&clean, &RunReport::default()),
            "first reply 7.2 s after the failure; every value once, in order, same connection"
        );
        let stuck = RunReport {
            failover_bound_s: Some(60.0),
            ..Default::default()
        };
        assert_eq!(
            verdict(&Seen::default(), &stuck),
            "no reply within 60 s of the failure"
        );
        let split = RunReport {
            snapshots: vec![Snapshot {
                live_copies: 2,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(verdict(&clean, &split).ends_with("; 2 live copies of the guest"));
    }
}
