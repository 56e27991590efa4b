//! Guests beyond the scenarios' default (PV, one vif): the guest's kind (PV or PVH) and its
//! number of vifs, and the second client, behind a two-vif guest's second vif on the
//! second client LAN (the switch's third hub, bridge `xenbr1`; see topology.rs), with the acts that
//! start, watch and judge it (`Act::Guest`, `Act::Vif2`).
//!
//! Owns: the second client's process and log (`client-<run>-vif1.jsonl`) through the run,
//! its record in the report (`second_client`) and its judgement. Never touches: the first
//! client (acts.rs), the order of steps (catalog.rs), dom0 except through `lab.sh guest-up`
//! and `lab.sh lan2-up`.
use super::{GUEST_MEM_MB, On, Run, Step, client::Seen, report};
use crate::lab::{
    dom0, lan,
    topology::{GUEST2_IP, Host, SERVICE2_PORT},
};
use anyhow::{Result, bail};
use serde::Serialize;
use std::time::Duration;

/// How the guest is virtualised (`type` in its xl config), beyond the default PV guest
/// (`Act::GuestUp`). It boots the lab's own kernel and initramfs directly, without a
/// device model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pvh,
}

impl Kind {
    pub fn arg(self) -> &'static str {
        match self {
            Kind::Pvh => "pvh",
        }
    }
}

/// A guest: its kind and its vifs (1: the client LAN; 2: also the second client LAN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guest {
    pub kind: Kind,
    pub vifs: u8,
}

/// What a step does with the second vif's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vif2 {
    /// In the step's dom0: the second client LAN's bridge (`lab.sh lan2-up`, idempotent),
    /// so that the backup copy's second vif has a bridge to join. Asserts: it exists.
    Lan,
    /// Starts the second client (to the service behind the second vif). Asserts: it
    /// connected.
    ClientStart,
    /// Asserts: the second client has this many replies within the bound.
    Replies(usize),
    /// Asserts: the second client gets a reply after the failure within the bound.
    AwaitFailover,
    /// Waits (up to the bound) for this many more replies or the connection's end.
    /// Asserts nothing (`ExactlyOnce` judges).
    RepliesAfterFailover(usize),
    /// Asserts: the second client saw one connection that never ended, every value once
    /// and in order, and 20 replies after the failure.
    ExactlyOnce,
}

/// What the second client saw, as the report records it.
#[derive(Serialize, Debug, Clone, Default)]
pub struct SecondClient {
    /// ADDR:PORT it kept its connection to.
    pub target: String,
    pub verdict: String,
    pub seen: Seen,
}

/// The second client's name in files: `client-<this>.jsonl`.
pub fn second_name(run: &str) -> String {
    format!("{run}-vif1")
}

/// The second client's target.
fn target() -> String {
    format!("{GUEST2_IP}:{SERVICE2_PORT}")
}

/// `lab.sh guest-up MEM KIND VIFS` in the primary's dom0.
pub fn guest_up(run: &mut Run, h: Host, g: Guest, bound: Duration) -> Result<()> {
    let out = dom0::lab(
        h,
        "guest up",
        &format!("guest-up {GUEST_MEM_MB} {} {}", g.kind.arg(), g.vifs),
        bound,
    )?;
    run.report.guest_ready_s = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ready_after_s="))
        .and_then(|v| v.parse().ok());
    run.say(out.trim());
    Ok(())
}

/// What the second client saw so far, relative to `death`.
fn seen(run: &Run, death: Option<f64>) -> Seen {
    super::client::analyse(&super::client::events(&run.log2), death)
}

/// Runs one `Act::Vif2` step.
pub fn vif2(run: &mut Run, step: &Step, v: Vif2) -> Result<()> {
    let bound = step.bound;
    match v {
        Vif2::Lan => {
            let h = match step.on {
                On::Primary => run.primary,
                On::Backup => run.backup,
                On::Machine => bail!("step `{}` must run in a dom0", step.name),
            };
            let out = dom0::lab(h, "second LAN", "lan2-up", bound)?;
            run.say(&format!("host {}: {}", h.name(), out.trim()));
            Ok(())
        }
        Vif2::ClientStart => {
            let bin = crate::lab::build::counter_client();
            let c = lan::Client::start_to(&bin, &second_name(run.name), &target(), bound)?;
            run.client2 = Some(c);
            run.say(&format!(
                "second client connected across the second client LAN to {} ({})",
                target(),
                seen(run, None).local_addr
            ));
            Ok(())
        }
        Vif2::Replies(n) => {
            let ok = run.wait(&format!("second client: {n} replies"), bound, || {
                let s = seen(run, None);
                Ok(s.replies >= n || s.terminal_event.is_some())
            })?;
            let s = seen(run, None);
            if !ok || s.replies < n {
                bail!(
                    "the second client got fewer than {n} replies in {} s: {s:?}",
                    bound.as_secs()
                );
            }
            Ok(())
        }
        Vif2::AwaitFailover => {
            let death = run.death;
            let ok = run.wait("second client: a reply from the backup", bound, || {
                let s = seen(run, death);
                Ok(s.replies_after_death > 0 || s.terminal_event.is_some())
            })?;
            let s = seen(run, death);
            if !ok || s.replies_after_death == 0 {
                bail!(
                    "the second client got no reply within {} s of the failure ({})",
                    bound.as_secs(),
                    s.terminal_event
                        .unwrap_or_else(|| "connection still open".into())
                );
            }
            run.say(&format!(
                "second client: first reply {:.1} s after the failure",
                s.first_reply_after_death_s.unwrap_or_default()
            ));
            Ok(())
        }
        Vif2::RepliesAfterFailover(n) => {
            let base = seen(run, None).replies;
            run.wait(&format!("second client: {n} more replies"), bound, || {
                let s = seen(run, None);
                Ok(s.replies >= base + n || s.terminal_event.is_some())
            })
            .map(drop)
        }
        Vif2::ExactlyOnce => {
            let Some(sc) = &run.report.second_client else {
                bail!("no record of the second client (it was never started or stopped)");
            };
            let bad = problems(&sc.seen);
            if !bad.is_empty() {
                bail!("second client ({}): {}", sc.target, bad.join("; "));
            }
            Ok(())
        }
    }
}

/// What breaks the judgement for one client after a failover.
fn problems(s: &Seen) -> Vec<String> {
    let mut bad = s.order_problems();
    if let Some(t) = &s.terminal_event {
        bad.push(format!("the connection ended: {t}"));
    }
    if s.replies_after_death < 20 {
        bad.push(format!(
            "only {} replies after the failover",
            s.replies_after_death
        ));
    }
    bad
}

/// Records what the second client saw (once it is stopped; the run started one).
pub fn record_second(run: &mut Run) {
    let s = seen(run, run.death);
    let verdict = if run.death.is_some() {
        report::verdict(&s, &run.report)
    } else {
        String::new()
    };
    if !verdict.is_empty() {
        run.say(&format!("second client saw: {verdict}"));
    }
    run.report.second_client = Some(SecondClient {
        target: target(),
        verdict,
        seen: s,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_failover_passes_and_each_fault_is_named() {
        let clean = Seen {
            connections: 1,
            replies_after_death: 25,
            ..Default::default()
        };
        assert!(problems(&clean).is_empty());
        let short = Seen {
            replies_after_death: 3,
            terminal_event: Some("reset at t=1".into()),
            ..clean.clone()
        };
        let p = problems(&short);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("reset") && p[1].contains("only 3"), "{p:?}");
    }
}
