//! The random-kill soak (`cargo xtask lab soak`, issue 10 item 5): each round protects the
//! guest with the relay and powers the primary off at a randomly chosen phase of
//! replication; the round passes if the client saw every value exactly once, in order, on
//! its one connection, or, when the backup held no complete checkpoint (a kill during the
//! initial copy), if no failover happened and nothing the client saw was contradicted.
//!
//! How a phase is hit: `lab.sh hold` (lab/dom0/hold.py) watches the sender's status and
//! the guest's state in the primary's dom0 and stops the whole sending side (SIGSTOP) the
//! moment the phase is there; the host is powered off right after. What the backup held is
//! read from the backup relay's own status afterwards (`last_session`).
//!
//! Owns: the phases, the seeded choice of each round's phase and moment, a round's record
//! and verdict, the soak's table and JSON. Never touches: how steps run (acts.rs, mod.rs),
//! the step lists (catalog.rs), dom0 but through `lab.sh hold`.
use super::{client::Seen, report::RunReport};
use serde::{Deserialize, Serialize};

/// A phase of replication the primary can die in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The initial live copy: no checkpoint complete at the backup yet.
    InitialCopy,
    /// The guest suspended by xl for a checkpoint (after the first).
    Suspended,
    /// A checkpoint complete at the backup, its ACK not yet at the primary.
    AckPending,
    /// ACKs arriving and releasing the output they commit.
    Release,
    /// Every checkpoint acknowledged, the guest running until the next.
    Idle,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::InitialCopy,
        Phase::Suspended,
        Phase::AckPending,
        Phase::Release,
        Phase::Idle,
    ];

    /// The name `lab.sh hold` takes.
    pub fn arg(self) -> &'static str {
        match self {
            Phase::InitialCopy => "initial-copy",
            Phase::Suspended => "suspended",
            Phase::AckPending => "ack-pending",
            Phase::Release => "release",
            Phase::Idle => "idle",
        }
    }

    /// The range (ms) the moment within the phase is drawn from (hold.py says what it
    /// is measured from).
    fn delay_range_ms(self) -> std::ops::Range<u32> {
        match self {
            // After the sender connected: somewhere in the first seconds of the copy.
            Phase::InitialCopy => 0..4000,
            // The first moment xl shows the guest suspended.
            Phase::Suspended => 0..1,
            // An unacked checkpoint, this long after it was seen (it reaches the backup).
            Phase::AckPending => 300..1000,
            // After the held ACKs are let through.
            Phase::Release => 0..50,
            // After every checkpoint was seen acked: the next suspend is due within the
            // 200 ms interval (at 148 ms a round found the guest suspended again).
            Phase::Idle => 0..60,
        }
    }
}

/// Where a round kills the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Kill {
    pub phase: Phase,
    pub delay_ms: u32,
}

/// The rounds' kills, drawn from `seed` (the same seed and phases give the same plan),
/// each in one of `phases` (every phase when empty).
pub fn plan(rounds: u32, seed: u64, phases: &[Phase]) -> Vec<Kill> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let phases = if phases.is_empty() {
        &Phase::ALL[..]
    } else {
        phases
    };
    (0..rounds)
        .map(|_| {
            let phase = phases[rng.usize(..phases.len())];
            Kill {
                phase,
                delay_ms: rng.u32(phase.delay_range_ms()),
            }
        })
        .collect()
}

/// A seed from the clock, for a run that was not given one (it is printed).
pub fn fresh_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// What `lab.sh hold` printed (one JSON line).
#[derive(Deserialize, Serialize, Debug, Clone, Default)]
pub struct Hold {
    /// Whether the sending side stopped inside the phase asked for.
    pub held: bool,
    /// The phase seen when it stopped (for people).
    pub seen: String,
    /// When the sending side stopped (dom0's clock, Unix seconds).
    pub stopped_unix: f64,
    /// The sender's counters when it stopped.
    pub sender: Option<serde_json::Value>,
    /// xl's state letters of the guest after the stop.
    pub guest_state_after: Option<String>,
}

impl Hold {
    /// The sender's (complete checkpoints, last acked) when it stopped.
    pub fn sent_acked(&self) -> Option<(u64, u64)> {
        let s = self.sender.as_ref()?;
        Some((
            s.get("checkpoints_total")?.as_u64()?,
            s.get("last_acked")?.as_u64()?,
        ))
    }
}

/// One round's soak record (in its run report).
#[derive(Serialize, Debug, Clone)]
pub struct SoakRecord {
    pub kill: Kill,
    pub hold: Option<Hold>,
    /// The last complete checkpoint the backup held when the primary was lost (its
    /// relay's `last_session`); 0: none.
    pub backup_checkpoint: Option<u64>,
    /// The backup runs the guest.
    pub failover: bool,
    /// The failure to the client's first reply after it.
    pub failover_s: Option<f64>,
    pub verdict: String,
    pub passed: bool,
}

impl SoakRecord {
    pub fn new(kill: Kill) -> SoakRecord {
        SoakRecord {
            kill,
            hold: None,
            backup_checkpoint: None,
            failover: false,
            failover_s: None,
            verdict: String::new(),
            passed: false,
        }
    }
}

/// Replies the client must get after a failover.
pub const REPLIES_AFTER: usize = 10;

/// A round's verdict: (passed, why). `backup_checkpoint`: what the backup held when the
/// primary was lost (None: it never said); `took_over`: the backup runs the guest.
pub fn judge(seen: &Seen, backup_checkpoint: Option<u64>, took_over: bool) -> (bool, String) {
    let mut bad = seen.order_problems();
    let ok_why = match backup_checkpoint {
        None => {
            bad.push("the backup's relay never said how its session ended".into());
            String::new()
        }
        Some(0) => {
            // No complete checkpoint: no failover, and nothing answers the client.
            if took_over {
                bad.push("the backup runs a guest without a complete checkpoint".into());
            }
            if seen.replies_after_death > 0 {
                bad.push(format!(
                    "{} replies after the kill with no copy to give them",
                    seen.replies_after_death
                ));
            }
            "no complete checkpoint at the backup: no failover, nothing contradicted".into()
        }
        Some(n) => {
            if !took_over {
                bad.push(format!(
                    "the backup held checkpoint {n} but does not run the guest"
                ));
            }
            if let Some(t) = &seen.terminal_event {
                bad.push(format!("the connection ended: {t}"));
            }
            if seen.replies_after_death < REPLIES_AFTER {
                bad.push(format!(
                    "only {} replies after the failover (at least {REPLIES_AFTER})",
                    seen.replies_after_death
                ));
            }
            format!(
                "failover from checkpoint {n}: first reply {:.1} s after the kill, every value once, in order, one connection",
                seen.first_reply_after_death_s.unwrap_or_default()
            )
        }
    };
    if bad.is_empty() {
        (true, ok_why)
    } else {
        (false, bad.join("; "))
    }
}

/// The soak's table: one line per round.
pub fn table(runs: &[RunReport]) -> String {
    let mut s = format!(
        "{:<8} {:<13} {:>6} {:<5} {:>9} {:>8} {:>9} {:>10} {:<6}  {}\n",
        "round",
        "phase",
        "at_ms",
        "held",
        "A sent/ak",
        "B ckpt",
        "failover",
        "failover_s",
        "result",
        "verdict"
    );
    for r in runs {
        let Some(k) = &r.soak else { continue };
        let yn = |b: bool| if b { "yes" } else { "no" };
        let sent = k
            .hold
            .as_ref()
            .and_then(Hold::sent_acked)
            .map_or("-".into(), |(s, a)| format!("{s}/{a}"));
        s.push_str(&format!(
            "{:<8} {:<13} {:>6} {:<5} {:>9} {:>8} {:>9} {:>10} {:<6}  {}\n",
            r.mode,
            k.kill.phase.arg(),
            k.kill.delay_ms,
            k.hold.as_ref().map_or("-", |h| yn(h.held)),
            sent,
            k.backup_checkpoint.map_or("-".into(), |c| c.to_string()),
            yn(k.failover),
            k.failover_s.map_or("-".into(), |t| format!("{t:.1}")),
            if r.passed { "ok" } else { "FAIL" },
            if k.verdict.is_empty() {
                r.failed_step.clone().unwrap_or_default()
            } else {
                k.verdict.clone()
            }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_plan_and_every_phase_comes_up() {
        let a = plan(40, 7, &[]);
        assert_eq!(a, plan(40, 7, &[]));
        assert_ne!(a, plan(40, 8, &[]));
        let only = plan(10, 7, &[Phase::AckPending]);
        assert!(
            only.iter().all(|k| k.phase == Phase::AckPending),
            "{only:?}"
        );
        for p in Phase::ALL {
            assert!(a.iter().any(|k| k.phase == p), "{p:?} never drawn in 40");
        }
        for k in &a {
            assert!(k.phase.delay_range_ms().contains(&k.delay_ms));
        }
    }

    fn clean(after: usize) -> Seen {
        Seen {
            connections: 1,
            replies: 30,
            replies_after_death: after,
            first_reply_after_death_s: (after > 0).then_some(12.0),
            ..Default::default()
        }
    }

    #[test]
    fn a_failover_passes_only_with_every_value_once_on_one_connection() {
        assert!(judge(&clean(20), Some(7), true).0);
        assert!(!judge(&clean(20), Some(7), false).0, "backup runs no guest");
        assert!(!judge(&clean(3), Some(7), true).0, "too few replies after");
        let mut rep = clean(20);
        rep.repeats_or_regressions = 1;
        assert!(!judge(&rep, Some(7), true).0);
        let mut reset = clean(20);
        reset.terminal_event = Some("reset".into());
        assert!(!judge(&reset, Some(7), true).0);
        assert!(!judge(&clean(20), None, true).0, "the backup must say");
    }

    #[test]
    fn without_a_complete_checkpoint_no_failover_and_no_reply_is_right() {
        let (ok, why) = judge(&clean(0), Some(0), false);
        assert!(ok, "{why}");
        assert!(!judge(&clean(0), Some(0), true).0, "a guest from nothing");
        assert!(!judge(&clean(4), Some(0), false).0, "replies from nowhere");
    }
}
