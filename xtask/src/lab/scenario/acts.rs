//! What a step can do (`Act`): each act runs something in a dom0 or on the machine,
//! asserts what it says it asserts, and records its results in the run's report.
//! `execute` dispatches a step to its act, with the step's bound and host.
//!
//! Owns: the acts and their assertions. Never touches: the order of steps (catalog.rs
//! holds the scenarios), the report's wording (report.rs), QEMU and the switch except
//! through their failure switches (vm.rs, switch.rs); dom0 only through `lab.sh`
//! subcommands.
use super::{
    GUEST_MEM_MB, INTERVAL_MS, On, Run, Step, client, disk, frames, guests, progress, report, soak,
    timeline,
};
use crate::lab::{
    build::tail_file,
    dom0, lan, switch,
    topology::{GUEST_IP, GUEST_MAC, Host, RELAY_PORT},
    vm,
};
use anyhow::{Context, Result, bail};
use std::time::{Duration, Instant};

/// What a step does. Each variant's doc says what it asserts and what it records. Acts
/// that run in a dom0 run in the step's host (`On`).
#[derive(Clone, Copy, Debug)]
pub enum Act {
    /// On the machine: the link is up, no host frozen, the client stopped, then
    /// `lab.sh cleanup` in every running dom0 (kills what an earlier run left, destroys
    /// every guest).
    Cleanup,
    /// Boots the scenario's hosts that are off (powered off by an earlier run). Records:
    /// `boots`.
    HostsUp,
    /// Creates the PV guest. Asserts: its service answers within the bound. Records:
    /// `guest_ready_s`.
    GuestUp,
    /// Creates a guest of this kind with this many vifs (`guests.rs`). Asserts: every
    /// vif's service answers within the bound. Records: `guest_ready_s`.
    Guest(guests::Guest),
    /// The second vif's client and its judgement (`guests.rs` says what each asserts).
    Vif2(guests::Vif2),
    /// Starts the client on the client LAN and the ARP watcher. Asserts: it connected.
    ClientStart,
    /// Asserts: the client has this many replies within the bound.
    Replies(usize),
    /// Starts the backup's relay (`remus relay receive` on the replication link).
    /// Asserts: it runs a second later.
    BackupListens,
    /// Starts the backup as the package runs it: `remus backup guest` (the command line
    /// of its remus-backup@guest unit), configured by dom0's /etc/remus/remus.toml.
    /// Asserts: it runs a second later.
    BackupService,
    /// Starts protection towards the backup host. Asserts: the sender runs a second
    /// later. Sets where checkpoints are counted.
    Protect(Protection),
    /// `remus status` in both dom0s while protected, for the bound: each end's table
    /// printed (every few seconds in the live view, once otherwise). Asserts: both
    /// answer. Records: `remus_status`, the last `remus status -j` of each host.
    RemusStatus,
    /// Asserts: two checkpoints within the bound, the sender alive meanwhile. Records:
    /// `first_checkpoint_s`.
    FirstCheckpoints,
    /// Counts over the bound. Asserts: checkpoints and replies both keep coming and the
    /// connection stays open. Records: `checkpoints_per_s`, `ms_per_checkpoint`.
    MeasureRate,
    /// Injects a failure. Records: the moment (the run's moment of failure),
    /// `checkpoints_before_death`, `acked_before_death` (relay), the event.
    Fail(Failure),
    /// Undoes a failure. Records: the event.
    Restore(Restore),
    /// Waits for the client's first reply after the failure. Asserts (when `required`):
    /// one within the bound. Records: the bound, for the verdict.
    AwaitFailover { required: bool },
    /// Lets the client run on for the bound. Asserts nothing.
    Watch,
    /// Waits (up to the bound) for this many more replies, or the connection's end; at
    /// once in a soak round whose backup held no checkpoint. Asserts nothing
    /// (`ExactlyOnce`, `SoakVerdict` judge).
    RepliesAfterFailover(usize),
    /// Records: `backup_took_over` (the step's host runs a domain named guest) and, for
    /// the relay, the backup relay's `failovers_total`.
    BackupIsGuest,
    /// Records a `Snapshot` with this label: each host's domains, the relays' counters,
    /// the client's replies.
    Snapshot(&'static str),
    /// Stops the client and the ARP watcher. Records: `client_tcp`, `client`,
    /// `garp_after_failure_s` and the verdict.
    ClientStop,
    /// Asserts: one connection that never ended, every counter value exactly once and in
    /// order, 20 replies after the failure, and the backup runs the guest.
    ExactlyOnce,
    /// The soak: waits in the primary's dom0 for the phase and stops the sending side in
    /// it (`lab.sh hold`). Asserts: the hold returned. Records: the round's `soak` record
    /// with the kill and what the hold saw.
    Hold(soak::Kill),
    /// The soak, after the power-off: waits (up to the bound) for the backup relay to say
    /// how its session ended, then, if it held a complete checkpoint, for the client's
    /// first reply. Asserts nothing (`SoakVerdict` judges). Records: the checkpoint.
    AwaitOutcome,
    /// The soak's verdict (`soak::judge`). Asserts it; records it in the round's record.
    SoakVerdict,
    /// The scenario `disk`, on the backup: `remus disk receive` of the replicated disk
    /// listens on the replication link (`lab.sh disk-receive`). Asserts: it answers on
    /// its control socket.
    DiskListens,
    /// The scenario `disk`, on the primary, before the guest boots: `remus disk serve`
    /// exports the disk as /dev/nbd0 replicating to the backup's daemon (`lab.sh
    /// disk-serve`). Asserts: the backup's disk is in sync within the bound.
    DiskServe,
    /// The scenario `disk`: asks the guest's service, from the step's host, how its disk
    /// compares with its memory (`lab.sh disk-check`; `disk::problems`). Asserts: every
    /// request found the disk exactly at memory's value, the disk holds 1..=memory and
    /// nothing newer, and every value the client received is on it. Records: a
    /// `disk::DiskCheck` labelled so in the report's `disk`.
    DiskAgrees(&'static str),
    /// Before a power-off: starts stamp.py's failover watcher in the step's host (the
    /// backup) and the frame watcher on the client's tap. Asserts: the watcher wrote its
    /// first sync file within the bound.
    WatchFailover,
    /// After the client stopped: stops the frame watcher. Records: `failover_timeline`
    /// (asserts nothing).
    FailoverTimeline,
}

/// How the guest is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// Stock `xl remus -F -n` over ssh (no output commit, no heartbeat).
    Stock,
    /// `xl remus -s ''` through `remus relay send|receive` with the buffer on the vif;
    /// `no_buffer` runs the relay with `--no-buffer` (diagnostics: no output commit).
    Relay { no_buffer: bool },
    /// As the operator does it, from the installed package: `remus protect guest` on the
    /// primary, `remus backup guest` on the backup (`Act::BackupService`), both from
    /// /etc/remus/remus.toml. The same relay underneath, with the buffer on every vif.
    Protect,
}

impl Protection {
    /// Whether the relay replicates (its status is sampled, the backup listens first).
    pub fn relay(self) -> bool {
        matches!(self, Protection::Relay { .. } | Protection::Protect)
    }
}

/// A failure the scenarios inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The primary host loses power: its QEMU is killed at once (SIGKILL).
    PowerOff,
    /// The primary host freezes: its QEMU is stopped (SIGSTOP), sockets open, nothing
    /// runs.
    Freeze,
    /// The replication link goes dark at the switch; both hosts live, the client LAN too.
    LinkDown,
}

/// A failure undone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restore {
    /// The frozen primary runs on.
    Thaw,
    /// The replication link comes back.
    LinkUp,
}

/// Runs one step's act with the step's bound.
pub fn execute(step: &Step, run: &mut Run) -> Result<()> {
    let b = step.bound;
    match step.act {
        Act::Cleanup => cleanup(run, b),
        Act::HostsUp => {
            let boots = vm::up(&[run.primary, run.backup], run.needs_remus)?;
            run.report.boots.extend(boots);
            Ok(())
        }
        Act::GuestUp => guest_up(run, run.dom0(step)?, b),
        Act::Guest(g) => guests::guest_up(run, run.dom0(step)?, g, b),
        Act::Vif2(v) => guests::vif2(run, step, v),
        Act::ClientStart => client_start(run, b),
        Act::Replies(n) => replies(run, n, b),
        Act::BackupListens => backup_listens(run.dom0(step)?, b),
        Act::BackupService => backup_service(run.dom0(step)?, b),
        Act::Protect(p) => protect(run, run.dom0(step)?, p, b),
        Act::RemusStatus => remus_status(run, b),
        Act::FirstCheckpoints => first_checkpoints(run, b),
        Act::MeasureRate => measure_rate(run, b),
        Act::Fail(f) => fail(run, f),
        Act::Restore(r) => restore(run, r),
        Act::AwaitFailover { required } => await_failover(run, required, b),
        Act::Watch => run.wait("watching", b, || Ok(false)).map(drop),
        Act::RepliesAfterFailover(_) if no_checkpoint_at_backup(run) => Ok(()),
        Act::RepliesAfterFailover(n) => {
            let base = run.replies();
            run.wait(&format!("{n} more replies"), b, || {
                Ok(run.replies() >= base + n || run.client_ended().is_some())
            })
            .map(drop)
        }
        Act::BackupIsGuest => backup_is_guest(run, run.dom0(step)?, b),
        Act::Snapshot(label) => {
            let s = snapshot(run, label, b);
            run.report.snapshots.push(s);
            Ok(())
        }
        Act::ClientStop => {
            client_stop(run);
            Ok(())
        }
        Act::ExactlyOnce => exactly_once(run),
        Act::Hold(k) => hold(run, run.dom0(step)?, k, b),
        Act::AwaitOutcome => await_outcome(run, b),
        Act::SoakVerdict => soak_verdict(run),
        Act::DiskListens => {
            let h = run.dom0(step)?;
            let out = dom0::lab(
                h,
                "disk receive",
                &format!("disk-receive {}:{}", h.repl_ip(), disk::DISK_PORT),
                b,
            )?;
            run.say(out.trim());
            Ok(())
        }
        Act::DiskServe => {
            let out = dom0::lab(
                run.dom0(step)?,
                "disk serve",
                &format!("disk-serve {}:{}", run.backup.repl_ip(), disk::DISK_PORT),
                b,
            )?;
            run.say(out.trim());
            Ok(())
        }
        Act::DiskAgrees(when) => disk_agrees(run, run.dom0(step)?, when, b),
        Act::WatchFailover => watch_failover(run, run.dom0(step)?, b),
        Act::FailoverTimeline => {
            failover_timeline(run);
            Ok(())
        }
    }
}

/// Reads `key=value` from a `lab.sh` step's output.
fn kv<T: std::str::FromStr>(out: &str, key: &str) -> Option<T> {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn cleanup(run: &mut Run, bound: Duration) -> Result<()> {
    run.stop_client();
    switch::set_repl_link(true).context("bringing the replication link up")?;
    for h in Host::ALL {
        if vm::qemu_pid(h).is_some() {
            let _ = vm::thaw(h);
            dom0::lab(h, "cleanup", "cleanup", bound)?;
        }
    }
    Ok(())
}

fn guest_up(run: &mut Run, h: Host, bound: Duration) -> Result<()> {
    let out = dom0::lab(h, "guest up", &format!("guest-up {GUEST_MEM_MB}"), bound)?;
    run.report.guest_ready_s = kv(&out, "ready_after_s");
    run.say(out.trim());
    Ok(())
}

fn client_start(run: &mut Run, bound: Duration) -> Result<()> {
    let bin = crate::lab::build::counter_client();
    run.arp = Some(lan::ArpWatch::start(run.arp_log.clone())?);
    let c = lan::Client::start(&bin, run.name, bound)?;
    run.say(&format!(
        "client connected from the client LAN ({})",
        run.seen(None).local_addr
    ));
    run.client = Some(c);
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

fn backup_listens(h: Host, bound: Duration) -> Result<()> {
    let out = dom0::lab(
        h,
        "relay receive",
        &format!("relay-receive {}:{RELAY_PORT}", h.repl_ip()),
        bound,
    )?;
    eprintln!("[lab] host {}: {}", h.name(), out.trim());
    Ok(())
}

fn backup_service(h: Host, bound: Duration) -> Result<()> {
    let out = dom0::lab(h, "remus backup", "backup-start", bound)?;
    eprintln!("[lab] host {}: {}", h.name(), out.trim());
    Ok(())
}

/// `remus status` (the table) and `remus status -j` of host `h`.
fn status_of(h: Host) -> Result<(String, serde_json::Value)> {
    let out = dom0::exec_ok(
        h,
        "remus status",
        "remus status; echo '-- json --'; remus status -j",
        Duration::from_secs(30),
    )?;
    let (table, json) = out
        .split_once("-- json --\n")
        .with_context(|| format!("remus status printed something else: {out}"))?;
    let v = serde_json::from_str(json)
        .with_context(|| format!("remus status -j is not JSON: {json}"))?;
    Ok((table.trim_end().to_string(), v))
}

/// Both ends' `remus status` while protected: live, every few seconds for the bound; in
/// a test run once (each sample costs both emulated dom0s a few processes).
fn remus_status(run: &mut Run, bound: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        for h in [run.primary, run.backup] {
            let (table, json) = status_of(h)?;
            let role = if h == run.primary {
                "primary"
            } else {
                "backup"
            };
            run.say(&format!(
                "remus status on host {} ({role}):\n{table}",
                h.name()
            ));
            run.report.remus_status.insert(h.name(), json);
        }
        if !run.live || t.elapsed() + Duration::from_secs(3) > bound {
            return Ok(());
        }
        run.wait("protected", Duration::from_secs(3), || Ok(false))?;
    }
}

fn protect(run: &mut Run, h: Host, p: Protection, bound: Duration) -> Result<()> {
    let backup = run.backup.repl_ip();
    let (args, env, source) = match p {
        Protection::Stock => (format!("anchor {backup}"), "", progress::Source::XlLog),
        Protection::Relay { no_buffer } => (
            format!("relay {backup}:{RELAY_PORT}"),
            if no_buffer {
                "LAB_RELAY_BUFFER='--no-buffer' "
            } else {
                ""
            },
            progress::Source::Relay,
        ),
        Protection::Protect => ("protect".into(), "", progress::Source::Relay),
    };
    let out = dom0::exec_ok(
        h,
        "remus start",
        &format!("{env}LAB_INTERVAL={INTERVAL_MS} sh /share/lab/dom0/lab.sh remus-start {args}"),
        bound,
    )?;
    run.say(out.trim());
    run.source = Some(source);
    run.protected_at = Some(Instant::now());
    Ok(())
}

fn first_checkpoints(run: &mut Run, bound: Duration) -> Result<()> {
    let mut alive_check = Instant::now();
    let primary = run.primary;
    let ok = run.wait("waiting for the first checkpoint", bound, || {
        if alive_check.elapsed() > Duration::from_secs(5) {
            alive_check = Instant::now();
            let alive = dom0::exec(
                primary,
                "sh /share/lab/dom0/lab.sh remus-alive",
                Duration::from_secs(30),
            )?;
            if alive.rc != 0 {
                bail!(
                    "xl remus exited before its first checkpoint:\n{}",
                    tail_file(&vm::share(primary).join("run/sender.log"), 25)
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

/// The primary's xl log stamped over the rate window (stamp.py tail), for the phases.
fn stamp_tail(run: &Run) -> std::path::PathBuf {
    vm::share(run.primary).join(format!("run/stamp-tail-{}.jsonl", run.name))
}

fn measure_rate(run: &mut Run, bound: Duration) -> Result<()> {
    let stamp = format!(
        "stamp tail /share/run/stamp-tail-{}.jsonl {} /share/run/sender.log",
        run.name,
        bound.as_secs() + 5
    );
    if let Err(e) = dom0::lab(run.primary, "stamp", &stamp, Duration::from_secs(30)) {
        run.say(&format!("xl's log is not stamped (no xl phases): {e:#}"));
    }
    let (n1, t1, rep1) = (run.checkpoints(), Instant::now(), run.replies());
    let u1 = vm::unix_now();
    run.wait("measuring", bound, || Ok(false))?;
    let (n2, dt, rep2) = (run.checkpoints(), t1.elapsed().as_secs_f64(), run.replies());
    let u2 = vm::unix_now();
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
    let relay = (run.source == Some(progress::Source::Relay))
        .then(|| progress::relay(run.primary, progress::End::Send))
        .flatten();
    let p = timeline::phases(
        relay.as_ref(),
        &timeline::read_lines(&stamp_tail(run)),
        &client::events(&run.log),
        (u1, u2),
        Some(rate),
    );
    run.say(&format!(
        "phases (ms, p50/p99): xl pause {:?}, relay pause {:?}, client rtt {:?}",
        p.xl_pause.as_ref().map(|s| (s.p50_ms, s.p99_ms)),
        p.relay_pause.as_ref().map(|s| (s.p50_ms, s.p99_ms)),
        p.client_rtt.as_ref().map(|s| (s.p50_ms, s.p99_ms))
    ));
    run.report.phases = Some(p);
    run.say(&format!(
        "{rate:.2} checkpoints/s ({:.0} ms each)",
        1e3 / rate
    ));
    Ok(())
}

fn fail(run: &mut Run, f: Failure) -> Result<()> {
    run.report.checkpoints_before_death = Some(run.checkpoints());
    if run.source == Some(progress::Source::Relay) {
        run.report.acked_before_death =
            progress::relay(run.backup, progress::End::Receive).map(|v| v.last_acked);
    }
    let (what, host, t) = match f {
        Failure::PowerOff => {
            let h = run.primary;
            run.down.push(h);
            ("power-off", Some(h), vm::power_off(h)?)
        }
        Failure::Freeze => {
            let h = run.primary;
            run.down.push(h);
            ("freeze", Some(h), vm::freeze(h)?)
        }
        Failure::LinkDown => ("link-down", None, switch::set_repl_link(false)?),
    };
    run.report.failure = match host {
        Some(h) => format!("{what} of host {}", h.name()),
        None => "the replication link goes dark".into(),
    };
    run.death = Some(t);
    run.event(what, host, t);
    Ok(())
}

fn restore(run: &mut Run, r: Restore) -> Result<()> {
    let (what, host, t) = match r {
        Restore::Thaw => {
            let h = run.primary;
            run.down.retain(|d| *d != h);
            ("thaw", Some(h), vm::thaw(h)?)
        }
        Restore::LinkUp => ("link-up", None, switch::set_repl_link(true)?),
    };
    run.event(what, host, t);
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
    let failover_seen = ok && seen.replies_after_death > 0;
    if required && !failover_seen {
        run.report.client_tcp = lan::client_tcp();
        bail!(
            "no reply from the backup within {} s of the failure ({}); client TCP: {}",
            bound.as_secs(),
            seen.terminal_event
                .unwrap_or_else(|| "connection still open".into()),
            run.report.client_tcp
        );
    }
    Ok(())
}

/// The domains host `h` runs (names, Domain-0 left out).
fn domains(h: Host, bound: Duration) -> Result<Vec<String>> {
    let out = dom0::lab(h, "domains", "domains", bound)?;
    Ok(out.lines().map(str::to_string).collect())
}

fn backup_is_guest(run: &mut Run, h: Host, bound: Duration) -> Result<()> {
    let d = domains(h, bound)?;
    run.report.backup_took_over = d.iter().any(|n| n == "guest");
    if run.source == Some(progress::Source::Relay) {
        run.report.backup_failovers =
            progress::relay(h, progress::End::Receive).map(|v| v.failovers_total);
    }
    run.say(&format!("host {} runs {d:?}", h.name()));
    Ok(())
}

fn snapshot(run: &Run, label: &str, bound: Duration) -> report::Snapshot {
    let mut s = report::Snapshot {
        label: label.into(),
        at_s: run.t0.elapsed().as_secs_f64(),
        ..Default::default()
    };
    for h in Host::ALL {
        let d = vm::qemu_pid(h)
            .filter(|_| !run.down.contains(&h))
            .and_then(|_| domains(h, bound).ok());
        s.live_copies += d.as_ref().is_some_and(|d| d.iter().any(|n| n == "guest")) as usize;
        s.domains.insert(h.name(), d);
    }
    s.relay_send = progress::relay(run.primary, progress::End::Send);
    s.relay_receive = progress::relay(run.backup, progress::End::Receive);
    let seen = run.seen(run.death);
    s.client_replies = seen.replies;
    s.client_replies_after_failure = seen.replies_after_death;
    s.client_ended = seen.terminal_event;
    run.say(&format!(
        "{label}: {:?}, {} live copies, client {} replies ({} after the failure)",
        s.domains, s.live_copies, s.client_replies, s.client_replies_after_failure
    ));
    s
}

/// Stops the client and the ARP watcher, and records what the client saw.
pub fn client_stop(run: &mut Run) {
    if run.client.is_some() {
        run.report.client_tcp = lan::client_tcp();
    }
    let second = run.client2.is_some();
    run.stop_client();
    if second {
        guests::record_second(run);
    }
    let seen = run.seen(run.death);
    run.report.garp_after_failure_s = run.death.and_then(|d| {
        lan::arps(&run.arp_log)
            .iter()
            .find(|a| {
                a.t > d
                    && a.sender_mac == GUEST_MAC
                    && a.sender_ip == GUEST_IP
                    && a.target_ip == GUEST_IP
            })
            .map(|a| a.t - d)
    });
    if run.death.is_some() {
        run.report.verdict = report::verdict(&seen, &run.report);
        run.say(&format!("client saw: {}", run.report.verdict));
    }
    run.report.client = seen;
}

fn exactly_once(run: &mut Run) -> Result<()> {
    let seen = &run.report.client;
    let mut bad = seen.order_problems();
    if let Some(t) = &seen.terminal_event {
        bad.push(format!("the connection ended: {t}"));
    }
    if seen.replies_after_death < 20 {
        bad.push(format!(
            "only {} replies after the failover",
            seen.replies_after_death
        ));
    }
    if !run.report.backup_took_over {
        bad.push(format!("host {} does not run the guest", run.backup.name()));
    }
    if !bad.is_empty() {
        bail!("{}", bad.join("; "));
    }
    Ok(())
}

/// `lab.sh hold PHASE MS BACKUP_IP` in the primary's dom0: returns once the sending side
/// is stopped in the phase (or bails if the phase never came).
fn hold(run: &mut Run, h: Host, k: soak::Kill, bound: Duration) -> Result<()> {
    let out = dom0::lab(
        h,
        "hold",
        &format!(
            "hold {} {} {}",
            k.phase.arg(),
            k.delay_ms,
            run.backup.repl_ip()
        ),
        bound,
    )?;
    let line = out.lines().last().unwrap_or_default();
    let held: soak::Hold = serde_json::from_str(line)
        .with_context(|| format!("lab.sh hold printed something else: {out}"))?;
    run.say(&format!(
        "sending side stopped in {} (asked {}, {} ms)",
        held.seen,
        k.phase.arg(),
        k.delay_ms
    ));
    run.report
        .soak
        .get_or_insert_with(|| soak::SoakRecord::new(k))
        .hold = Some(held);
    Ok(())
}

/// How the backup's session ended: the checkpoint it held (0: none), once it says.
fn backup_checkpoint(run: &Run) -> Option<u64> {
    progress::relay(run.backup, progress::End::Receive)
        .and_then(|v| v.last_session)
        .and_then(|s| s.checkpoint())
}

/// A soak round whose backup said it held no complete checkpoint: nothing can fail over.
fn no_checkpoint_at_backup(run: &Run) -> bool {
    run.report.soak.as_ref().and_then(|r| r.backup_checkpoint) == Some(0)
}

fn await_outcome(run: &mut Run, bound: Duration) -> Result<()> {
    let death = run.death;
    let mut settled: Option<Instant> = None;
    run.wait(
        "waiting for the backup's word and the client",
        bound,
        || {
            let s = run.seen(death);
            if s.replies_after_death > 0 || s.terminal_event.is_some() {
                return Ok(true);
            }
            // Without a complete checkpoint nothing can answer: give the backup a little
            // while to show it does not start a guest anyway, then stop waiting.
            if backup_checkpoint(run) == Some(0) {
                let t = *settled.get_or_insert_with(Instant::now);
                return Ok(t.elapsed() > Duration::from_secs(15));
            }
            Ok(false)
        },
    )?;
    // What the verdict calls the wait: how long after the failure it really ended.
    run.report.failover_bound_s = death.map(|d| vm::unix_now() - d);
    let c = backup_checkpoint(run);
    if let Some(rec) = run.report.soak.as_mut() {
        rec.backup_checkpoint = c;
    }
    Ok(())
}

/// `lab.sh disk-check` in `h`'s dom0; the client's highest value is taken before asking,
/// so the guest's memory at the answer is at least that.
fn disk_agrees(run: &mut Run, h: Host, when: &'static str, bound: Duration) -> Result<()> {
    let client_max = run.seen(None).last_value;
    let out = dom0::lab(h, "disk check", "disk-check", bound)?;
    let c = disk::parse(&out, when, client_max).map_err(|e| anyhow::anyhow!(e))?;
    run.say(&format!(
        "{when}: guest memory {} , disk holds 1..={} , {} newer, {}/{} requests found the disk \
         elsewhere, client had {:?}",
        c.mem, c.contiguous, c.newer, c.mismatches, c.checks, c.client_max
    ));
    let bad = disk::problems(&c);
    run.report.disk.push(c);
    if !bad.is_empty() {
        bail!("{when}: {}", bad.join("; "));
    }
    Ok(())
}

fn soak_verdict(run: &mut Run) -> Result<()> {
    let seen = run.report.client.clone();
    let took_over = run.report.backup_took_over;
    let Some(rec) = run.report.soak.as_mut() else {
        bail!("no soak record: the round did not hold a phase");
    };
    // An ACK is pending only if the backup did get the checkpoint the primary saw unacked.
    let sent = rec
        .hold
        .as_ref()
        .and_then(soak::Hold::sent_acked)
        .map(|(s, _)| s);
    if rec.kill.phase == soak::Phase::AckPending
        && let (Some(h), Some(s), Some(b)) = (rec.hold.as_mut(), sent, rec.backup_checkpoint)
        && b < s
    {
        h.held = false;
        h.seen = format!("in flight (the backup held {b}, not the unacked {s})");
    }
    let (ok, why) = soak::judge(&seen, rec.backup_checkpoint, took_over);
    rec.failover = took_over;
    rec.failover_s = seen.first_reply_after_death_s;
    rec.passed = ok;
    rec.verdict = why.clone();
    if !ok {
        bail!("{why}");
    }
    Ok(())
}

/// stamp.py's failover record on the backup, for run `name`.
fn stamp_failover(h: Host, name: &str) -> std::path::PathBuf {
    vm::share(h).join(format!("run/stamp-failover-{name}.jsonl"))
}

fn watch_failover(run: &mut Run, h: Host, bound: Duration) -> Result<()> {
    let out = stamp_failover(h, run.name);
    let sync0 = out.with_file_name(format!("stamp-failover-{}.jsonl.sync0", run.name));
    let _ = std::fs::remove_file(&sync0);
    dom0::lab(
        h,
        "failover watcher",
        &format!(
            "stamp failover /share/run/stamp-failover-{}.jsonl 150",
            run.name
        ),
        bound,
    )?;
    frames::start(run.name)?;
    if !run.wait("the failover watcher starts", bound, || Ok(sync0.exists()))? {
        bail!("stamp.py wrote no sync file within {} s", bound.as_secs());
    }
    Ok(())
}

fn failover_timeline(run: &mut Run) {
    frames::stop();
    let Some(death) = run.death else { return };
    let out = stamp_failover(run.backup, run.name);
    let t = timeline::timeline(
        death,
        &timeline::read_lines(&out),
        timeline::clock_offset(&out),
        &frames::frames(&frames::log(run.name)),
        &client::events(&run.log),
    );
    eprintln!("{}", timeline::timeline_table(run.name, &t));
    run.report.failover_timeline = Some(t);
}

impl Run {
    /// The host a step runs in; an error if the step is not placed in a dom0.
    fn dom0(&self, step: &Step) -> Result<Host> {
        match step.on {
            On::Primary => Ok(self.primary),
            On::Backup => Ok(self.backup),
            On::Machine => bail!("step `{}` must run in a dom0", step.name),
        }
    }

    fn event(&mut self, what: &'static str, host: Option<Host>, unix: f64) {
        let at_s = self.t0.elapsed().as_secs_f64();
        self.say(&format!(
            "{what}{} at {unix:.3}",
            host.map(|h| format!(" of host {}", h.name()))
                .unwrap_or_default()
        ));
        self.report.events.push(report::Event {
            what,
            host,
            at_s,
            unix,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::kv;
    use crate::lab::scenario::{
        Run, catalog,
        soak::{Kill, Phase},
    };

    #[test]
    fn a_round_without_a_checkpoint_at_the_backup_waits_for_no_replies() {
        let k = Kill {
            phase: Phase::InitialCopy,
            delay_ms: 0,
        };
        let mut run = Run::new(&catalog::soak_round(1, k), false);
        assert!(!super::no_checkpoint_at_backup(&run), "not yet known");
        let rec = run.report.soak.as_mut().expect("a soak round has a record");
        rec.backup_checkpoint = Some(3);
        assert!(!super::no_checkpoint_at_backup(&run));
        run.report.soak.as_mut().expect("still").backup_checkpoint = Some(0);
        assert!(super::no_checkpoint_at_backup(&run));
        let plain = Run::new(&catalog::by_name("remus", false).expect("exists"), false);
        assert!(!super::no_checkpoint_at_backup(&plain));
    }

    #[test]
    fn kv_reads_typed_values_and_only_whole_keys() {
        let out = "guest domid=1 ready_after_s=14.5\nprimary domid=3 started=11.25";
        assert_eq!(kv::<f64>(out, "ready_after_s"), Some(14.5));
        assert_eq!(kv::<u32>(out, "domid"), Some(1));
        assert_eq!(kv::<f64>(out, "after_s"), None);
        assert_eq!(kv::<f64>(out, "started"), Some(11.25));
    }
}
