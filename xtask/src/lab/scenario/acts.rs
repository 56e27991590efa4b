//! What a step can do (`Act`): each act runs something in dom0 or watches from the
//! machine, asserts what it says it asserts, and records its results in the run's report.
//! `execute` dispatches a step to its act with the step's bound.
//!
//! Owns: the acts and their assertions. Never touches: the order of steps (catalog.rs
//! holds the scenarios), the report's wording (report.rs), the lab's boot (vm.rs); dom0
//! only through `lab.sh` subcommands.
use super::{INTERVAL_MS, Run, Step, progress};
use crate::lab::{build::tail_file, dom0, vm};
use anyhow::{Context, Result, bail};
use std::time::{Duration, Instant};

/// What a step does. Each variant's doc says what it asserts and what it records.
#[derive(Clone, Copy, Debug)]
pub enum Act {
    /// `lab.sh cleanup`: kills what an earlier run left in dom0, destroys every guest.
    Cleanup,
    /// Creates the PV guest. Asserts: its service answers within the bound. Records:
    /// `guest_ready_s`.
    GuestUp,
    /// Starts the client in its netns behind a veth on the bridge. Asserts: it connected.
    ClientStart,
    /// Asserts: the client has this many replies within the bound.
    Replies(usize),
    /// Starts protection. Asserts: the sender is still running a second later. Sets where
    /// checkpoints are counted.
    Protect(Protection),
    /// Asserts: two checkpoints within the bound, the sender alive meanwhile. Records:
    /// `first_checkpoint_s`.
    FirstCheckpoints,
    /// Counts over the bound. Asserts: checkpoints and replies both keep coming and the
    /// connection stays open. Records: `checkpoints_per_s`, `ms_per_checkpoint`.
    MeasureRate,
    /// Injects a failure. Records: the moment of death, `checkpoints_before_death`,
    /// `acked_before_death` (relay).
    Fail(Failure),
    /// Waits for the client's first reply after the death. Asserts (when `required`): one
    /// within the bound. Records: the bound, for the verdict.
    AwaitFailover { required: bool },
    /// When no failover came: kills the frozen sender (its socket closes, as after a host
    /// reboot) and watches for the bound. Records: `after_kill_first_reply_s`.
    KillFrozenSenderIfNoFailover,
    /// Lets the client run on for the bound. Asserts nothing.
    Watch,
    /// Waits (up to the bound) for this many more replies, or the connection's end.
    /// Asserts nothing (`ExactlyOnce` judges).
    RepliesAfterFailover(usize),
    /// Records: `backup_took_over` (the domain named guest is a new domain) and, for the
    /// relay, the backup relay's `failovers_total`.
    BackupIsGuest,
    /// Stops the client. Records: `client_tcp`, `client` and the verdict.
    ClientStop,
    /// Asserts: one connection that never ended, every counter value exactly once and in
    /// order, 20 replies after the death, and the guest is the backup copy.
    ExactlyOnce,
}

/// How the guest is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// Stock `xl remus -F -n` over ssh (no output commit, no heartbeat).
    Stock,
    /// `xl remus -s ''` through `remus relay send|receive` with the buffer on the vif;
    /// `no_buffer` runs the relay with `--no-buffer` (diagnostics: no output commit).
    Relay { no_buffer: bool },
}

/// How the primary dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// One host: the sending processes are frozen (SIGSTOP), then the primary domain is
    /// destroyed; nothing closes a connection, as after a power loss.
    FreezeAndDestroy,
}

/// Runs one step's act with the step's bound.
pub fn execute(step: &Step, run: &mut Run) -> Result<()> {
    let b = step.bound;
    match step.act {
        Act::Cleanup => dom0::lab("cleanup", "cleanup", b).map(drop),
        Act::GuestUp => guest_up(run, b),
        Act::ClientStart => {
            dom0::lab("client start", &format!("client-start {}", run.name), b).map(drop)
        }
        Act::Replies(n) => replies(run, n, b),
        Act::Protect(p) => protect(run, p, b),
        Act::FirstCheckpoints => first_checkpoints(run, b),
        Act::MeasureRate => measure_rate(run, b),
        Act::Fail(f) => fail(run, f, b),
        Act::AwaitFailover { required } => await_failover(run, required, b),
        Act::KillFrozenSenderIfNoFailover => kill_frozen_sender(run, b),
        Act::Watch => run
            .wait("letting the client run on", b, || Ok(false))
            .map(drop),
        Act::RepliesAfterFailover(n) => {
            let base = run.replies();
            run.wait(&format!("{n} more replies"), b, || {
                Ok(run.replies() >= base + n || run.client_ended().is_some())
            })
            .map(drop)
        }
        Act::BackupIsGuest => backup_is_guest(run, b),
        Act::ClientStop => client_stop(run, b),
        Act::ExactlyOnce => exactly_once(run),
    }
}

/// Reads `key=value` from a `lab.sh` step's output.
fn kv<T: std::str::FromStr>(out: &str, key: &str) -> Option<T> {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn guest_up(run: &mut Run, bound: Duration) -> Result<()> {
    let out = dom0::lab(
        "guest up",
        &format!("guest-up {}", super::GUEST_MEM_MB),
        bound,
    )?;
    run.report.guest_ready_s = kv(&out, "ready_after_s");
    run.say(out.trim());
    Ok(())
}

fn replies(run: &mut Run, n: usize, bound: Duration) -> Result<()> {
    let ok = run.wait(&format!("waiting for {n} replies"), bound, || {
        Ok(run.replies() >= n || run.client_ended().is_some())
    })?;
    if !ok || run.replies() < n {
        bail!(
            "fewer than {n} replies in {} s: {:?}",
            bound.as_secs(),
            run.seen(None)
        );
    }
    Ok(())
}

fn protect(run: &mut Run, p: Protection, bound: Duration) -> Result<()> {
    let (mode, env, source) = match p {
        Protection::Stock => ("anchor", "", progress::Source::XlLog),
        Protection::Relay { no_buffer } => (
            "relay",
            if no_buffer {
                "LAB_RELAY_BUFFER='--no-buffer' "
            } else {
                ""
            },
            progress::Source::Relay,
        ),
    };
    let out = dom0::exec_ok(
        "remus start",
        &format!("{env}LAB_INTERVAL={INTERVAL_MS} sh /share/lab/dom0/lab.sh remus-start {mode}"),
        bound,
    )?;
    run.say(out.trim());
    run.source = Some(source);
    run.protected_at = Some(Instant::now());
    Ok(())
}

fn first_checkpoints(run: &mut Run, bound: Duration) -> Result<()> {
    let mut alive_check = Instant::now();
    let ok = run.wait("waiting for the first checkpoint", bound, || {
        if alive_check.elapsed() > Duration::from_secs(5) {
            alive_check = Instant::now();
            let alive = dom0::exec(
                "sh /share/lab/dom0/lab.sh remus-alive",
                Duration::from_secs(30),
            )?;
            if alive.rc != 0 {
                bail!(
                    "xl remus exited before its first checkpoint:\n{}",
                    tail_file(&vm::share().join("run/sender.log"), 25)
                );
            }
        }
        Ok(run.checkpoints() >= 2)
    })?;
    if !ok {
        bail!(
            "no checkpoint within {} s of starting xl remus",
            bound.as_secs()
        );
    }
    run.report.first_checkpoint_s = run.protected_at.map(|t| t.elapsed().as_secs_f64());
    Ok(())
}

fn measure_rate(run: &mut Run, bound: Duration) -> Result<()> {
    let (n1, t1, rep1) = (run.checkpoints(), Instant::now(), run.replies());
    run.wait("measuring", bound, || Ok(false))?;
    let (n2, dt, rep2) = (run.checkpoints(), t1.elapsed().as_secs_f64(), run.replies());
    if n2 <= n1 {
        bail!("no checkpoint in {dt:.0} s after the first ones ({n1} then {n2})");
    }
    if rep2 <= rep1 {
        bail!(
            "the client got no reply while protected ({rep1} replies before, {rep2} after {dt:.0} s)"
        );
    }
    if let Some(t) = run.client_ended() {
        bail!("the client's connection ended while protected: {t}");
    }
    let rate = (n2 - n1) as f64 / dt;
    run.report.checkpoints_per_s = Some(rate);
    run.report.ms_per_checkpoint = Some(1e3 / rate);
    run.say(&format!(
        "{rate:.2} checkpoints/s ({:.0} ms each)",
        1e3 / rate
    ));
    Ok(())
}

fn fail(run: &mut Run, f: Failure, bound: Duration) -> Result<()> {
    run.report.checkpoints_before_death = Some(run.checkpoints());
    if run.source == Some(progress::Source::Relay) {
        run.report.acked_before_death =
            progress::relay(progress::Role::Receive).map(|v| v.last_acked);
    }
    match f {
        Failure::FreezeAndDestroy => {
            let out = dom0::lab("freeze primary", "freeze-primary", bound)?;
            run.say(out.trim());
            run.death = Some(kv(&out, "death").context("freeze-primary printed no death time")?);
            run.primary = kv(&out, "destroyed_domid").unwrap_or_default();
        }
    }
    Ok(())
}

fn await_failover(run: &mut Run, required: bool, bound: Duration) -> Result<()> {
    run.report.failover_bound_s = Some(bound.as_secs_f64());
    let death = run.death;
    let ok = run.wait("waiting for a reply from the backup", bound, || {
        let s = run.seen(death);
        Ok(s.replies_after_death > 0 || s.terminal_event.is_some())
    })?;
    let seen = run.seen(death);
    run.failover_seen = ok && seen.replies_after_death > 0;
    if required && !run.failover_seen {
        run.report.client_tcp = client_tcp();
        bail!(
            "no reply from the backup within {} s of the primary's death ({}); client TCP: {}",
            bound.as_secs(),
            seen.terminal_event
                .unwrap_or_else(|| "connection still open".into()),
            run.report.client_tcp
        );
    }
    Ok(())
}

fn kill_frozen_sender(run: &mut Run, bound: Duration) -> Result<()> {
    if run.failover_seen {
        run.say("the backup took over: nothing to kill");
        return Ok(());
    }
    run.say(&format!(
        "no failover within {:.0} s (stock Remus has no heartbeat); killing the frozen sender",
        run.report.failover_bound_s.unwrap_or_default()
    ));
    let out = dom0::lab(
        "kill the frozen sender",
        "unfreeze-kill",
        Duration::from_secs(60),
    )?;
    let killed = kv(&out, "killed").or(run.death);
    run.report.sender_killed = true;
    run.wait(
        "waiting for a reply after the sender was killed",
        bound,
        || {
            let s = run.seen(killed);
            Ok(s.replies_after_death > 0 || s.terminal_event.is_some())
        },
    )?;
    run.report.after_kill_first_reply_s = run.seen(killed).first_reply_after_death_s;
    Ok(())
}

fn backup_is_guest(run: &mut Run, bound: Duration) -> Result<()> {
    let backup = dom0::exec_ok(
        "backup domain",
        "xl list | awk '$1==\"guest\" {print $2}'",
        bound,
    )?;
    let backup = backup.trim();
    run.report.backup_took_over = !backup.is_empty() && backup != run.primary;
    if run.source == Some(progress::Source::Relay) {
        run.report.backup_failovers =
            progress::relay(progress::Role::Receive).map(|v| v.failovers_total);
    }
    run.say(&format!(
        "primary domid was {}, the domain named guest is now {backup:?}",
        run.primary
    ));
    Ok(())
}

/// The client's TCP state (`ss -tni`), empty if it cannot be read.
pub fn client_tcp() -> String {
    dom0::lab("client tcp", "client-tcp", Duration::from_secs(30))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn client_stop(run: &mut Run, bound: Duration) -> Result<()> {
    run.report.client_tcp = client_tcp();
    dom0::lab("client stop", "client-stop", bound)?;
    let seen = run.seen(run.death);
    run.report.verdict = super::report::verdict(&seen, &run.report);
    run.report.client = seen;
    run.say(&format!("client saw: {}", run.report.verdict));
    Ok(())
}

fn exactly_once(run: &mut Run) -> Result<()> {
    let seen = &run.report.client;
    let mut bad = vec![];
    if seen.connections != 1 {
        bad.push(format!("{} connections (must be 1)", seen.connections));
    }
    if let Some(t) = &seen.terminal_event {
        bad.push(format!("the connection ended: {t}"));
    }
    if seen.repeats_or_regressions > 0 || seen.gaps > 0 {
        bad.push(format!(
            "{} repeats/regressions and {} gaps, first {}",
            seen.repeats_or_regressions,
            seen.gaps,
            seen.first_anomaly.clone().unwrap_or_default()
        ));
    }
    if seen.replies_after_death < 20 {
        bad.push(format!(
            "only {} replies after the failover",
            seen.replies_after_death
        ));
    }
    if !run.report.backup_took_over {
        bad.push(format!(
            "the guest is not a new domain (primary {})",
            run.primary
        ));
    }
    if !bad.is_empty() {
        bail!("{}", bad.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::kv;

    #[test]
    fn kv_reads_typed_values_and_only_whole_keys() {
        let out = "frozen pid=1: xl\nfrozen_at=10.5 death=11.25 destroyed_domid=3";
        assert_eq!(kv::<f64>(out, "death"), Some(11.25));
        assert_eq!(kv::<u32>(out, "destroyed_domid"), Some(3));
        assert_eq!(kv::<f64>(out, "at"), None);
        assert_eq!(kv::<f64>(out, "pid"), None);
    }
}
