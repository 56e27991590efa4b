//! `remus protect` after the checks: runs stock `xl remus` with the relay as its
//! transport, watches it, keeps /run/remus/protect-DOMAIN.json current, ends protection
//! on request, and turns how it ended into an exit code and a sentence.
//!
//! Owns: the `xl remus` child (in its own process group, so a terminal's Ctrl-C reaches
//! only this supervisor, which decides), the state file, reading the relay's exit status
//! from its wrapper, asking the relay (its control socket) to end protection when
//! stopped. Never touches: the buffer (the relay owns it: nothing here ever releases,
//! detaches or switches it), the wire, the guest.
//!
//! Stopping (SIGTERM from `systemctl stop` or `remus unprotect`, SIGINT): the relay is
//! asked to end protection; it has the backup discard its copy (no failover), releases
//! what it holds only once the backup confirmed, and exits, so that xl resumes the guest
//! here. Unconfirmed, the output stays held and this ends with exit 5.
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::exit::ExitCode;
use crate::relay::control::{self, ControlError, EndAnswer};

use super::checks::Plan;
use super::state::{self, Phase, ProtectState, RelayExit};

/// How long `xl remus` gets to end after being asked, before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(30);
/// How long the relay gets to end after xl did (it waits up to a few seconds for the
/// backup's answer to its CLOSE).
pub const RELAY_GRACE: Duration = Duration::from_secs(15);
/// How long the relay's answer to "end protection" may take (the relay itself gives the
/// backup 45 s to confirm, then answers "unconfirmed").
pub const END_WAIT: Duration = Duration::from_secs(60);

pub struct RunOptions {
    pub xl: String,
    pub exe: PathBuf,
    pub run_dir: PathBuf,
}

/// Acknowledged checkpoints per second over a sliding window.
#[derive(Default)]
pub struct Rate {
    samples: VecDeque<(Instant, u64)>,
}

impl Rate {
    pub const WINDOW: Duration = Duration::from_secs(10);

    pub fn push(&mut self, at: Instant, total: u64) -> Option<f64> {
        self.samples.push_back((at, total));
        while let Some(&(t, _)) = self.samples.front() {
            if at.duration_since(t) > Self::WINDOW && self.samples.len() > 2 {
                self.samples.pop_front();
            } else {
                break;
            }
        }
        let (t0, n0) = *self.samples.front()?;
        let dt = at.duration_since(t0).as_secs_f64();
        (dt >= 0.5).then(|| total.saturating_sub(n0) as f64 / dt)
    }
}

/// What is true of the vif's output once protection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// Released and passing: the relay opened the buffer (the backup was lost).
    Open,
    /// Still held by the program the dead relay left (fail closed).
    Held,
    /// Depends on where the relay failed (its messages say; `remus-net status` shows it).
    Unknown,
    /// The relay never ran: nothing was attached by this protection.
    Untouched,
}

/// How a protection ended: what `remus protect` exits with, and the facts behind its
/// sentence (the backup's copy, the vif's output).
#[derive(Clone, Debug, PartialEq)]
pub struct Ending {
    pub phase: Phase,
    pub code: ExitCode,
    pub output: Output,
    /// The backup activates (or activated) its copy.
    pub backup_activates: bool,
    /// Letting the held output out is safe: the backup never had a usable copy.
    pub release_safe: bool,
    pub detail: String,
}

/// What happened to a stop: the relay's answer to "end protection", if it gave one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stop {
    pub asked: bool,
    pub answer: Option<EndAnswer>,
}

/// How the protection ended, from xl's exit status, the relay's and what a stop got.
/// Pure: this is the documented behaviour (docs/operator.md).
pub fn outcome(
    domain: &str,
    vifs: &[String],
    xl: Option<i32>,
    relay: Option<RelayExit>,
    stop: &Stop,
    last_acked: u64,
) -> Ending {
    let names = VifNames::new(vifs);
    let f = Facts::new(domain, &names, xl, last_acked);
    match relay {
        Some(RelayExit { code: Some(c), .. }) => f.relay_exited(c, stop),
        Some(RelayExit { signal, .. }) => f.relay_killed(signal, stop.asked),
        None => f.relay_never_ran(stop.asked),
    }
}

/// The held vifs as the sentences name them: `vif` (one, or a list: "vif3.0 and
/// vif3.1"), and the `remus-net` command lines for each (joined by `; `, so one line
/// still runs as it reads).
struct VifNames {
    vif: String,
    detach: String,
    status: String,
}

impl VifNames {
    fn new(vifs: &[String]) -> Self {
        let each = |cmd: &str| {
            vifs.iter()
                .map(|v| format!("remus-net {cmd} {v}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let vif = match vifs {
            [] => "the vif".to_string(),
            [one] => one.clone(),
            [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
        };
        VifNames {
            vif,
            detach: each("detach"),
            status: each("status"),
        }
    }
}

/// What every ending's sentence is made of: the names, whether the backup has a usable
/// copy, and the phrases that say so.
struct Facts<'a> {
    domain: &'a str,
    vif: &'a str,
    detach: &'a str,
    status: &'a str,
    xl: Option<i32>,
    xl_code: String,
    /// Before the first acknowledged checkpoint the backup has no usable copy (it drops a
    /// partial initial copy), so nothing here can be inconsistent with it.
    copy: bool,
    held: String,
    activates: String,
}

impl<'a> Facts<'a> {
    fn new(domain: &'a str, names: &'a VifNames, xl: Option<i32>, last_acked: u64) -> Self {
        let (vif, detach) = (names.vif.as_str(), names.detach.as_str());
        let copy = last_acked > 0;
        let held = if copy {
            format!(
                "{vif}'s output stays held (fail closed): nothing the guest sent after checkpoint {last_acked} leaves this host"
            )
        } else {
            format!(
                "no checkpoint was acknowledged, so the backup has no usable copy to activate; {vif}'s output is still held: `{detach}` lets the guest's traffic out again (what the relay held is gone with it; TCP resends)"
            )
        };
        let activates = if copy {
            format!(
                "the backup activates its copy of `{domain}` (checkpoint {last_acked} or later)"
            )
        } else {
            "the backup has no complete checkpoint and activates nothing".to_string()
        };
        Facts {
            domain,
            vif,
            detach,
            status: &names.status,
            xl,
            xl_code: xl.map_or("unknown".into(), |c| c.to_string()),
            copy,
            held,
            activates,
        }
    }

    fn end(
        &self,
        phase: Phase,
        code: ExitCode,
        output: Output,
        backup_activates: bool,
        detail: String,
    ) -> Ending {
        Ending {
            phase,
            code,
            output,
            backup_activates,
            release_safe: output == Output::Held && !self.copy,
            detail,
        }
    }

    /// The relay exited with code `c` (its wrapper recorded it).
    fn relay_exited(&self, c: i32, stop: &Stop) -> Ending {
        let Facts {
            domain,
            vif,
            detach,
            status,
            copy,
            held,
            activates,
            xl_code,
            ..
        } = self;
        match c {
            0 if matches!(stop.answer, Some(EndAnswer::Discarded { .. })) => {
                self.discarded(stop)
            }
            5 => self.end(
                Phase::EndUnconfirmed,
                ExitCode::Unconfirmed,
                Output::Held,
                *copy,
                format!(
                    "asked to end protection, the backup did not confirm that it discarded its copy (unreachable, or lost meanwhile), so it may still activate it: {vif}'s output stays HELD and `{domain}` runs here isolated. Check the backup (`remus status {domain}` there): if its copy runs, destroy this one (xl destroy {domain}); if it has none, `{detach}` lets this one's traffic out"
                ),
            ),
            4 => self.end(
                Phase::BackupLost,
                ExitCode::PeerLost,
                Output::Open,
                false,
                format!(
                    "the backup was lost: the relay released what it held and `{domain}` runs UNPROTECTED here; find out why (the backup's `remus status`, its journal), then protect again"
                ),
            ),
            0 if stop.asked => self.end(
                Phase::Stopped,
                ExitCode::Ok,
                Output::Held,
                *copy,
                if *copy {
                    format!(
                        "stopped on request: the relay closed the stream, so {activates}; {held}; destroy this copy (xl destroy {domain}) unless you discard the backup's (remus unprotect {domain} on the backup) and then `{detach}`"
                    )
                } else {
                    format!(
                        "stopped on request: the relay closed the stream and {activates}; {held}"
                    )
                },
            ),
            0 if self.xl == Some(0) => self.end(
                Phase::DomainEnded,
                ExitCode::Ok,
                Output::Held,
                *copy,
                format!(
                    "`{domain}` ended here (shut down or destroyed): xl closed the stream and {activates}"
                ),
            ),
            0 => self.end(
                Phase::Failed,
                ExitCode::Failure,
                Output::Held,
                *copy,
                format!(
                    "xl remus failed (exit {xl_code}; its messages are above, e.g. the guest did not suspend) and closed the stream: {activates}; {held}"
                ),
            ),
            c => self.end(
                Phase::Failed,
                if c == 3 {
                    ExitCode::Unsupported
                } else {
                    ExitCode::Failure
                },
                Output::Unknown,
                *copy,
                format!(
                    "the relay failed (exit {c}; its messages are above); if `{status}` still shows it holding, {held}"
                ),
            ),
        }
    }

    /// Ended on request and the backup confirmed that it discarded its copy.
    fn discarded(&self, stop: &Stop) -> Ending {
        let domain = self.domain;
        let destroyed = matches!(
            stop.answer,
            Some(EndAnswer::Discarded {
                copy_destroyed: true,
                ..
            })
        );
        self.end(
            Phase::Unprotected,
            ExitCode::Ok,
            Output::Open,
            false,
            format!(
                "protection ended on request: the backup discarded its copy (nothing was activated there){}, the relay released what it held and `{domain}` runs here, UNPROTECTED, its output passing; `remus protect {domain}` protects it again",
                if destroyed {
                    ""
                } else {
                    " but could not destroy it: remove its paused copy there (`remus unprotect` on the backup)"
                }
            ),
        )
    }

    /// The relay ended by a signal (or its wrapper recorded neither code nor signal).
    fn relay_killed(&self, signal: Option<i32>, stop_asked: bool) -> Ending {
        let Facts {
            copy,
            held,
            activates,
            ..
        } = self;
        match signal {
            Some(s) if stop_asked => self.end(
                Phase::Stopped,
                ExitCode::Ok,
                Output::Held,
                *copy,
                format!("stopped on request (the relay ended by signal {s}): {activates}; {held}"),
            ),
            _ => self.end(
                Phase::Failed,
                ExitCode::Failure,
                Output::Held,
                *copy,
                format!(
                    "the relay was killed (signal {}): {activates}; {held}",
                    signal.map_or("unknown".into(), |s| s.to_string())
                ),
            ),
        }
    }

    /// xl remus ended before it started the relay.
    fn relay_never_ran(&self, stop_asked: bool) -> Ending {
        let domain = self.domain;
        if stop_asked {
            return self.end(
                Phase::Stopped,
                ExitCode::Ok,
                Output::Untouched,
                false,
                format!(
                    "stopped on request before the relay started; `{domain}` was never protected"
                ),
            );
        }
        self.end(
            Phase::Failed,
            ExitCode::Failure,
            Output::Untouched,
            false,
            format!(
                "xl remus ended (exit {}) before it started the relay (its messages are above); `{domain}` was never protected",
                self.xl_code
            ),
        )
    }
}

fn signal_pid(pid: u32, sig: i32) {
    // SAFETY: kill(2) on our own child's pid (not reaped yet: we are its waiter).
    unsafe { libc::kill(pid as i32, sig) };
}

fn signal_group(pid: u32, sig: i32) {
    // SAFETY: kill(2) on the process group we created for our own child.
    unsafe { libc::kill(-(pid as i32), sig) };
}

async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => tokio::select! {
            _ = t.recv() => "SIGTERM",
            _ = i.recv() => "SIGINT",
        },
        _ => std::future::pending().await,
    }
}

/// What one look at the relay and the buffer gives.
struct Sample {
    acked: Option<u64>,
    acks_total: Option<u64>,
    held: Option<(u64, u64)>,
}

async fn sample(relay_socket: &Path, vifs: &[String]) -> Sample {
    let (acked, acks_total) = match crate::relay::status::query(relay_socket).await {
        Ok(s) => (Some(s.last_acked), Some(s.acks_total)),
        Err(_) => (None, None),
    };
    let held = super::status::held_all(vifs).await;
    Sample {
        acked,
        acks_total,
        held,
    }
}

/// Runs and supervises `xl remus` for `plan`; returns when it has ended.
pub async fn run(plan: Plan, o: RunOptions) -> ExitCode {
    if let Err(e) = state::ensure_dir(&o.run_dir) {
        eprintln!(
            "remus protect: {}: cannot create the run directory {}: {e}",
            plan.domain,
            o.run_dir.display()
        );
        return ExitCode::Failure;
    }
    let exit_file = state::relay_exit_path(&o.run_dir, &plan.domain);
    let _ = std::fs::remove_file(&exit_file);
    let argv = plan.xl_argv(&o.xl, &o.exe, &o.run_dir);
    let mut sup = Supervisor::new(&plan, &o);
    info!(command = ?argv, "starting xl remus");
    let child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(false)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "remus protect: {}: cannot start {}: {e}",
                plan.domain, argv[0]
            );
            sup.st.phase = Phase::Failed;
            sup.st.detail = Some(format!("cannot start {}: {e}", argv[0]));
            sup.st.exit_code = Some(ExitCode::Failure.code());
            sup.save();
            return ExitCode::Failure;
        }
    };
    sup.xl_pid = child.id().unwrap_or(0);
    sup.st.xl_pid = Some(sup.xl_pid);
    sup.save();
    let xl_status = sup.supervise(&mut child).await;
    let relay = relay_exit(&exit_file).await;
    let ending = outcome(
        &plan.domain,
        &plan.vifs,
        xl_status,
        relay,
        &sup.stop,
        sup.st.last_acked,
    );
    sup.finish(ending)
}

/// The relay outlives xl by a little: it tells the backup (CLOSE, up to its own timeout)
/// or notices the backup's end before exiting. Its wrapper's record, if it came in time.
async fn relay_exit(exit_file: &Path) -> Option<RelayExit> {
    let mut relay: Option<RelayExit> = state::read_json(exit_file);
    let waited = Instant::now();
    while relay.is_none() && waited.elapsed() < RELAY_GRACE {
        tokio::time::sleep(Duration::from_millis(100)).await;
        relay = state::read_json(exit_file);
    }
    relay
}

/// The supervisor of one `xl remus`: the state file it keeps current, and what a stop
/// request has got so far.
struct Supervisor<'a> {
    plan: &'a Plan,
    run_dir: &'a Path,
    path: PathBuf,
    st: ProtectState,
    xl_pid: u32,
    rate: Rate,
    stop: Stop,
    /// The relay being asked to end protection.
    asking: Option<tokio::task::JoinHandle<Result<EndAnswer, ControlError>>>,
    /// When xl remus is killed if it has not ended after the relay answered.
    stop_deadline: Option<tokio::time::Instant>,
}

impl<'a> Supervisor<'a> {
    fn new(plan: &'a Plan, o: &'a RunOptions) -> Self {
        let started = state::now_unix();
        let st = ProtectState {
            domain: plan.domain.clone(),
            domid: plan.domid,
            pid: std::process::id(),
            xl_pid: None,
            vif: plan.vif().to_string(),
            vifs: plan.vifs.clone(),
            backup: plan.backup.clone(),
            interval_ms: plan.settings.interval_ms,
            phase: Phase::Starting,
            detail: None,
            started_unix: started,
            since_unix: started,
            last_acked: 0,
            checkpoints_per_s: None,
            held_frames: None,
            held_bytes: None,
            relay_socket: state::relay_send_socket(&o.run_dir, plan.vif()),
            unsafe_disks: plan.unsafe_disks.clone(),
            exit_code: None,
            output: None,
        };
        Supervisor {
            plan,
            run_dir: &o.run_dir,
            path: state::protect_path(&o.run_dir, &plan.domain),
            st,
            xl_pid: 0,
            rate: Rate::default(),
            stop: Stop::default(),
            asking: None,
            stop_deadline: None,
        }
    }

    fn save(&self) {
        if let Err(e) = state::write_json(&self.path, &self.st) {
            warn!(path = %self.path.display(), error = %e, "cannot write the state file; `remus status` will not see this protection");
        }
    }

    /// Until xl remus ends: a stop signal asks the relay to end protection, its answer
    /// decides whether xl is stopped too, and each second the state file is refreshed.
    /// Returns xl's exit code.
    async fn supervise(&mut self, child: &mut tokio::process::Child) -> Option<i32> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let stopping = stop_signal();
        tokio::pin!(stopping);
        loop {
            tokio::select! {
                r = child.wait() => return r.ok().and_then(|s| s.code()),
                sig = &mut stopping, if !self.stop.asked => self.on_stop(sig),
                r = async {
                    match self.asking.as_mut() {
                        Some(h) => h.await,
                        None => std::future::pending().await,
                    }
                }, if self.asking.is_some() => self.on_answer(r),
                _ = tick.tick() => self.on_tick().await,
            }
        }
    }

    fn on_stop(&mut self, sig: &'static str) {
        self.stop.asked = true;
        warn!(signal = sig, domain = %self.plan.domain,
            "stop requested: ending protection (the backup discards its copy; the guest stays here, unprotected)");
        self.st.phase = Phase::Ending;
        self.st.since_unix = state::now_unix();
        self.save();
        let ctl = state::relay_send_control(self.run_dir, self.plan.vif());
        self.asking = Some(tokio::spawn(async move {
            control::end_protection(&ctl, END_WAIT).await
        }));
    }

    fn on_answer(&mut self, r: Result<Result<EndAnswer, ControlError>, tokio::task::JoinError>) {
        self.asking = None;
        let r = r.unwrap_or_else(|e| {
            Err(ControlError::Ask {
                path: String::new(),
                source: std::io::Error::other(e),
            })
        });
        if !answered(r, &self.plan.domain, &mut self.stop) {
            signal_pid(self.xl_pid, libc::SIGTERM);
        }
        self.stop_deadline = Some(tokio::time::Instant::now() + STOP_GRACE);
    }

    async fn on_tick(&mut self) {
        if let Some(d) = self.stop_deadline
            && tokio::time::Instant::now() >= d
        {
            warn!(
                "xl remus did not end within {} s; killing it",
                STOP_GRACE.as_secs()
            );
            signal_group(self.xl_pid, libc::SIGKILL);
            self.stop_deadline = None;
        }
        let s = sample(&self.st.relay_socket, &self.plan.vifs).await;
        let st = &mut self.st;
        let before = st.phase;
        if let Some(a) = s.acked {
            st.last_acked = a;
            if !self.stop.asked {
                st.phase = if a >= 1 {
                    Phase::Protected
                } else {
                    Phase::InitialCopy
                };
            }
        }
        if let Some(t) = s.acks_total {
            st.checkpoints_per_s = self.rate.push(Instant::now(), t);
        }
        if let Some((f, b)) = s.held {
            st.held_frames = Some(f);
            st.held_bytes = Some(b);
        }
        if st.phase != before {
            st.since_unix = state::now_unix();
            match st.phase {
                Phase::InitialCopy => {
                    info!(backup = %self.plan.backup, "connected; copying the guest's memory (no failover is possible before checkpoint 1 is acknowledged)")
                }
                Phase::Protected => info!(
                    checkpoint = st.last_acked,
                    "PROTECTED: the backup holds checkpoint {}", st.last_acked
                ),
                _ => {}
            }
        }
        self.save();
    }

    /// Records how it ended in the state file and says so; the exit code.
    fn finish(mut self, ending: Ending) -> ExitCode {
        let Ending {
            phase,
            code,
            output,
            detail,
            ..
        } = ending;
        let st = &mut self.st;
        st.phase = phase;
        st.detail = Some(detail.clone());
        st.output = Some(output);
        st.exit_code = Some(code.code());
        st.since_unix = state::now_unix();
        st.held_frames = None;
        st.held_bytes = None;
        st.checkpoints_per_s = None;
        self.save();
        if code == ExitCode::Ok {
            info!("{detail}");
        } else {
            eprintln!("remus protect: {}: {detail}", self.plan.domain);
        }
        code
    }
}

/// Takes the relay's answer to "end protection"; false if it could not be asked (then xl
/// remus is stopped instead: the relay has not started, or is gone already).
fn answered(r: Result<EndAnswer, ControlError>, domain: &str, stop: &mut Stop) -> bool {
    match r {
        Ok(a @ EndAnswer::Discarded { .. }) => {
            info!(
                domain,
                "the backup discarded its copy and the relay released what it held; xl remus resumes the guest here"
            );
            stop.answer = Some(a);
            true
        }
        Ok(EndAnswer::Unconfirmed { reason }) => {
            error!(domain, %reason, "ending protection was NOT confirmed by the backup: the output stays held");
            stop.answer = Some(EndAnswer::Unconfirmed { reason });
            true
        }
        Ok(a @ EndAnswer::Ended { .. }) => {
            info!(domain, answer = ?a, "the relay's run had ended otherwise before the request");
            stop.answer = Some(a);
            true
        }
        Ok(EndAnswer::BadRequest { message }) => {
            warn!(domain, %message, "the relay did not understand the request to end protection; stopping xl remus instead");
            false
        }
        Err(e) => {
            warn!(domain, error = %e, "could not ask the relay to end protection (not started yet, or gone); stopping xl remus instead: if the backup holds a checkpoint it activates its copy, and this copy's output stays held");
            false
        }
    }
}

/// `remus __relay-child --exit-file F -- ARGS…`: runs `remus ARGS…` (the relay) with
/// this process's stdin and stdout (xl's pipes), then records how it ended in F for
/// `remus protect` and exits the same way.
pub fn relay_child(exe: &Path, exit_file: &Path, args: &[String]) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    // xl's SIGPIPE disposition (ignored) is inherited; the relay expects the same.
    let st = std::process::Command::new(exe).args(args).status();
    let (rec, code) = match st {
        Ok(s) => (
            RelayExit {
                code: s.code(),
                signal: s.signal(),
            },
            s.code().unwrap_or(128 + s.signal().unwrap_or(0)),
        ),
        Err(e) => {
            eprintln!("remus: starting the relay ({}): {e}", exe.display());
            (
                RelayExit {
                    code: Some(1),
                    signal: None,
                },
                1,
            )
        }
    };
    if let Err(e) = state::write_json(exit_file, &rec) {
        eprintln!(
            "remus: recording the relay's exit in {}: {e}",
            exit_file.display()
        );
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one() -> Vec<String> {
        vec!["vif3.0".into()]
    }

    #[test]
    fn every_held_vif_is_named_with_its_own_command() {
        let two = vec!["vif3.0".to_string(), "vif3.1".to_string()];
        let stop = Stop {
            asked: true,
            answer: None,
        };
        let e = outcome("web", &two, Some(1), exit(5), &stop, 7);
        assert!(
            e.detail.contains("vif3.0 and vif3.1's output stays HELD"),
            "{}",
            e.detail
        );
        assert!(
            e.detail
                .contains("`remus-net detach vif3.0; remus-net detach vif3.1`"),
            "{}",
            e.detail
        );
        let e = outcome("web", &two, Some(1), exit(1), &Stop::default(), 7);
        assert!(
            e.detail
                .contains("`remus-net status vif3.0; remus-net status vif3.1`"),
            "{}",
            e.detail
        );
        let e = outcome("web", &one(), Some(1), exit(5), &stop, 7);
        assert!(
            e.detail.contains("`remus-net detach vif3.0` lets"),
            "{}",
            e.detail
        );
    }

    fn exit(code: i32) -> Option<RelayExit> {
        Some(RelayExit {
            code: Some(code),
            signal: None,
        })
    }

    #[test]
    fn each_ending_has_its_phase_code_and_facts() {
        let o = |xl, relay, asked| {
            let stop = Stop {
                asked,
                answer: None,
            };
            let e = outcome("web", &one(), xl, relay, &stop, 7);
            (e.phase, e.code, e.output, e.backup_activates)
        };
        use Output::*;
        assert_eq!(
            o(Some(1), exit(4), false),
            (Phase::BackupLost, ExitCode::PeerLost, Open, false)
        );
        assert_eq!(
            o(Some(0), exit(0), false),
            (Phase::DomainEnded, ExitCode::Ok, Held, true)
        );
        assert_eq!(
            o(Some(1), exit(0), false),
            (Phase::Failed, ExitCode::Failure, Held, true)
        );
        assert_eq!(
            o(None, exit(0), true),
            (Phase::Stopped, ExitCode::Ok, Held, true)
        );
        assert_eq!(
            o(Some(1), exit(1), false),
            (Phase::Failed, ExitCode::Failure, Unknown, true)
        );
        assert_eq!(
            o(Some(1), exit(3), false),
            (Phase::Failed, ExitCode::Unsupported, Unknown, true)
        );
        let killed = Some(RelayExit {
            code: None,
            signal: Some(9),
        });
        assert_eq!(
            o(Some(1), killed, false),
            (Phase::Failed, ExitCode::Failure, Held, true)
        );
        assert_eq!(
            o(Some(1), None, false),
            (Phase::Failed, ExitCode::Failure, Untouched, false)
        );
        // A backup lost during a stop is still a lost backup (the guest runs unprotected).
        assert_eq!(
            o(None, exit(4), true),
            (Phase::BackupLost, ExitCode::PeerLost, Open, false)
        );
    }

    #[test]
    fn a_stop_the_backup_confirmed_ends_unprotected_and_an_unconfirmed_one_holds() {
        let discarded = |copy_destroyed| Stop {
            asked: true,
            answer: Some(EndAnswer::Discarded {
                checkpoint: 7,
                copy_destroyed,
            }),
        };
        // The relay exits 0 after the discard; xl resumed the guest and exits 1.
        for destroyed in [true, false] {
            let e = outcome("web", &one(), Some(1), exit(0), &discarded(destroyed), 7);
            assert_eq!(
                (e.phase, e.code, e.output, e.backup_activates),
                (Phase::Unprotected, ExitCode::Ok, Output::Open, false)
            );
        }
        // Unconfirmed: the relay exits 5 holding, whether or not its answer arrived.
        for answer in [
            None,
            Some(EndAnswer::Unconfirmed {
                reason: "no answer".into(),
            }),
        ] {
            let stop = Stop {
                asked: true,
                answer,
            };
            let e = outcome("web", &one(), Some(1), exit(5), &stop, 7);
            assert_eq!(
                (e.phase, e.code, e.output),
                (Phase::EndUnconfirmed, ExitCode::Unconfirmed, Output::Held)
            );
            assert!(e.backup_activates, "it may: nothing confirmed otherwise");
            assert!(!e.release_safe);
        }
        // A discard answer never makes a failed relay look clean.
        let e = outcome("web", &one(), Some(1), exit(1), &discarded(true), 7);
        assert_eq!(e.phase, Phase::Failed);
    }

    #[test]
    fn before_the_first_ack_nothing_activates_and_releasing_is_safe() {
        let stopped = Stop {
            asked: true,
            answer: None,
        };
        let e = outcome("web", &one(), None, exit(0), &stopped, 0);
        assert_eq!(
            (e.phase, e.code, e.output),
            (Phase::Stopped, ExitCode::Ok, Output::Held)
        );
        assert!(!e.backup_activates);
        assert!(e.release_safe);
        let e = outcome("web", &one(), None, exit(0), &stopped, 5);
        assert!(e.backup_activates);
        assert!(!e.release_safe);
    }

    #[test]
    fn the_rate_is_over_the_window() {
        let mut r = Rate::default();
        let t0 = Instant::now();
        assert_eq!(r.push(t0, 0), None);
        for i in 1..=30u64 {
            let v = r.push(t0 + Duration::from_secs(i), i * 3).unwrap();
            assert!((v - 3.0).abs() < 1e-9, "{v}");
        }
        assert!(r.samples.len() <= 12);
    }

    #[test]
    fn the_relay_wrapper_records_the_exit_and_passes_it_on() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x");
        let code = relay_child(Path::new("sh"), &f, &["-c".into(), "exit 4".into()]);
        assert_eq!(code, 4);
        assert_eq!(state::read_json::<RelayExit>(&f), exit(4));
        let code = relay_child(Path::new("sh"), &f, &["-c".into(), "kill -9 $$".into()]);
        assert_eq!(code, 137);
        assert_eq!(
            state::read_json::<RelayExit>(&f),
            Some(RelayExit {
                code: None,
                signal: Some(9)
            })
        );
    }
}
