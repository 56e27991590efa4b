//! A scenario run's record: `RunReport` (one entry of `runs` in target/lab/report.json),
//! the uniform per-step record, the verdict sentence and the side-by-side table.
//!
//! Owns: the report's shape and wording. Never touches: the lab (no dom0 calls, no
//! files); the runner and the steps fill it in.
use super::client::Seen;
use serde::Serialize;

/// One step as it ran: the same for every step of every scenario.
#[derive(Serialize, Debug, Clone)]
pub struct StepRecord {
    pub name: String,
    /// Where it ran: "dom0" or "machine" (the host machine: waits on the client's log).
    pub on: &'static str,
    pub bound_s: f64,
    /// Seconds after the run started.
    pub started_s: f64,
    pub took_s: f64,
    pub ok: bool,
}

#[derive(Serialize, Default, Debug)]
pub struct RunReport {
    pub mode: String,
    pub passed: bool,
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
    /// Failover once the frozen sender was killed (its socket closed), when a step did.
    pub after_kill_first_reply_s: Option<f64>,
    pub verdict: String,
    pub client: Seen,
    /// The client's TCP socket just before it was stopped (`ss -tni`): shows a connection
    /// stuck in retransmission when the backup's TCP state is behind what the client saw.
    pub client_tcp: String,
    /// Every step in order, including the one that failed.
    pub steps: Vec<StepRecord>,
    /// The bound the failover was awaited within (for the verdict).
    #[serde(skip)]
    pub failover_bound_s: Option<f64>,
    /// A step killed the frozen sender because no failover came (for the verdict).
    #[serde(skip)]
    pub sender_killed: bool,
}

/// One sentence on what the client saw after the death.
pub fn verdict(s: &Seen, r: &RunReport) -> String {
    let mut v = vec![];
    match s.first_reply_after_death_s {
        Some(t) => v.push(format!("first reply {t:.1} s after the death")),
        None if r.sender_killed => {
            v.push(format!(
                "no failover within {:.0} s",
                r.failover_bound_s.unwrap_or_default()
            ));
            match r.after_kill_first_reply_s {
                Some(t) => v.push(format!(
                    "after the frozen sender was killed: reply after {t:.1} s"
                )),
                None => v.push("no reply after the sender was killed either".into()),
            }
        }
        None => v.push("no reply after the death".into()),
    }
    if r.backup_took_over
        && s.first_reply_after_death_s.is_none()
        && r.after_kill_first_reply_s.is_none()
    {
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
    v.join("; ")
}

/// The side-by-side table of the runs.
pub fn table(runs: &[RunReport]) -> String {
    let f = |o: Option<f64>, p: usize| o.map_or("-".to_string(), |v| format!("{v:.p$}"));
    let mut s = format!(
        "{:<8} {:<6} {:>8} {:>8} {:>10} {:>9} {:>8}  {}\n",
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
            "{:<8} {:<6} {:>8} {:>8} {:>10} {:>9} {:>8}  {}\n",
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
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_of_a_clean_failover_and_of_a_stuck_anchor() {
        let clean = Seen {
            replies_after_death: 20,
            first_reply_after_death_s: Some(7.25),
            ..Default::default()
        };
        assert_eq!(
            verdict(&clean, &RunReport::default()),
            "first reply 7.2 s after the death; every value once, in order, same connection"
        );
        let stuck = RunReport {
            sender_killed: true,
            failover_bound_s: Some(60.0),
            backup_took_over: true,
            ..Default::default()
        };
        let v = verdict(&Seen::default(), &stuck);
        assert!(v.starts_with(
            "no failover within 60 s; no reply after the sender was killed either; the backup copy did take over"
        ));
    }
}
