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
    vif: &str,
    xl: Option<i32>,
    relay: Option<RelayExit>,
    stop: &Stop,
    last_acked: u64,
) -> Ending {
    let stop_asked = stop.asked;
    // Before the first acknowledged checkpoint the backup has no usable copy (it drops a
    // partial initial copy), so nothing here can be inconsistent with it.
    let copy = last_acked > 0;
    let held = if copy {
        format!(
            "{vif}'s output stays held (fail closed): nothing the guest sent after checkpoint {last_acked} leaves this host"
        )
    } else {
        format!(
            "no checkpoint was acknowledged, so the backup has no usable copy to activate; {vif}'s output is still held: `remus-net detach {vif}` lets the guest's traffic out again (what the relay held is gone with it; TCP resends)"
        )
    };
    let activates = if copy {
        format!("the backup activates its copy of `{domain}` (checkpoint {last_acked} or later)")
    } else {
        "the backup has no complete checkpoint and activates nothing".to_string()
    };
    let xl_code = xl.map_or("unknown".into(), |c| c.to_string());
    let end = |phase, code, output, backup_activates, detail: String| Ending {
        phase,
        code,
        output,
        backup_activates,
        release_safe: output == Output::Held && !copy,
        detail,
    };
    match relay {
        Some(RelayExit { code: Some(0), .. })
            if matches!(stop.answer, Some(EndAnswer::Discarded { .. })) =>
        {
            let destroyed = matches!(
                stop.answer,
                Some(EndAnswer::Discarded {
                    copy_destroyed: true,
                    ..
                })
            );
            end(
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
        Some(RelayExit { code: Some(5), .. }) => end(
            Phase::EndUnconfirmed,
            ExitCode::Unconfirmed,
            Output::Held,
            copy,
            format!(
                "asked to end protection, the backup did not confirm that it discarded its copy (unreachable, or lost meanwhile), so it may still activate it: {vif}'s output stays HELD and `{domain}` runs here isolated. Check the backup (`remus status {domain}` there): if its copy runs, destroy this one (xl destroy {domain}); if it has none, `remus-net detach {vif}` lets this one's traffic out"
            ),
        ),
        Some(RelayExit { code: Some(4), .. }) => end(
            Phase::BackupLost,
            ExitCode::PeerLost,
            Output::Open,
            false,
            format!(
                "the backup was lost: the relay released what it held and `{domain}` runs UNPROTECTED here; find out why (the backup's `remus status`, its journal), then protect again"
            ),
        ),
        Some(RelayExit { code: Some(0), .. }) if stop_asked => end(
            Phase::Stopped,
            ExitCode::Ok,
            Output::Held,
            copy,
            if copy {
                format!(
                    "stopped on request: the relay closed the stream, so {activates}; {held}; destroy this copy (xl destroy {domain}) unless you discard the backup's (remus unprotect {domain} on the backup) and then `remus-net detach {vif}`"
                )
            } else {
                format!("stopped on request: the relay closed the stream and {activates}; {held}")
            },
        ),
        Some(RelayExit { code: Some(0), .. }) if xl == Some(0) => end(
            Phase::DomainEnded,
            ExitCode::Ok,
            Output::Held,
            copy,
            format!(
                "`{domain}` ended here (shut down or destroyed): xl closed the stream and {activates}"
            ),
        ),
        Some(RelayExit { code: Some(0), .. }) => end(
            Phase::Failed,
            ExitCode::Failure,
            Output::Held,
            copy,
            format!(
                "xl remus failed (exit {xl_code}; its messages are above, e.g. the guest did not suspend) and closed the stream: {activates}; {held}"
            ),
        ),
        Some(RelayExit { code: Some(c), .. }) => end(
            Phase::Failed,
            if c == 3 {
                ExitCode::Unsupported
            } else {
                ExitCode::Failure
            },
            Output::Unknown,
            copy,
            format!(
                "the relay failed (exit {c}; its messages are above); if `remus-net status {vif}` still shows it holding, {held}"
            ),
        ),
        Some(RelayExit {
            signal: Some(s), ..
        }) if stop_asked => end(
            Phase::Stopped,
            ExitCode::Ok,
            Output::Held,
            copy,
            format!("stopped on request (the relay ended by signal {s}): {activates}; {held}"),
        ),
        Some(RelayExit { signal, .. }) => end(
            Phase::Failed,
            ExitCode::Failure,
            Output::Held,
            copy,
            format!(
                "the relay was killed (signal {}): {activates}; {held}",
                signal.map_or("unknown".into(), |s| s.to_string())
            ),
        ),
        None if stop_asked => end(
            Phase::Stopped,
            ExitCode::Ok,
            Output::Untouched,
            false,
            format!("stopped on request before the relay started; `{domain}` was never protected"),
        ),
        None => end(
            Phase::Failed,
            ExitCode::Failure,
            Output::Untouched,
            false,
            format!(
                "xl remus ended (exit {xl_code}) before it started the relay (its messages are above); `{domain}` was never protected"
            ),
        ),
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

async fn sample(relay_socket: &Path, vif: &str) -> Sample {
    let (acked, acks_total) = match crate::relay::status::query(relay_socket).await {
        Ok(s) => (Some(s.last_acked), Some(s.acks_total)),
        Err(_) => (None, None),
    };
    let held = super::status::held(vif).await;
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
    let path = state::protect_path(&o.run_dir, &plan.domain);
    let argv = plan.xl_argv(&o.xl, &o.exe, &o.run_dir);
    let started = state::now_unix();
    let mut st = ProtectState {
        domain: plan.domain.clone(),
        domid: plan.domid,
        pid: std::process::id(),
        xl_pid: None,
        vif: plan.vif.clone(),
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
        relay_socket: state::relay_send_socket(&o.run_dir, &plan.vif),
        unsafe_disks: plan.unsafe_disks.clone(),
        exit_code: None,
        output: None,
    };
    let save = |st: &ProtectState| {
        if let Err(e) = state::write_json(&path, st) {
            warn!(path = %path.display(), error = %e, "cannot write the state file; `remus status` will not see this protection");
        }
    };
    info!(command = ?argv, "starting xl remus");
    let mut child = match tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "remus protect: {}: cannot start {}: {e}",
                plan.domain, argv[0]
            );
            st.phase = Phase::Failed;
            st.detail = Some(format!("cannot start {}: {e}", argv[0]));
            st.exit_code = Some(ExitCode::Failure.code());
            save(&st);
            return ExitCode::Failure;
        }
    };
    let xl_pid = child.id().unwrap_or(0);
    st.xl_pid = Some(xl_pid);
    save(&st);

    let mut rate = Rate::default();
    let mut stop = Stop::default();
    let mut asking: Option<tokio::task::JoinHandle<Result<EndAnswer, ControlError>>> = None;
    let mut stop_deadline: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let stopping = stop_signal();
    tokio::pin!(stopping);
    let xl_status = loop {
        tokio::select! {
            r = child.wait() => break r.ok().and_then(|s| s.code()),
            sig = &mut stopping, if !stop.asked => {
                stop.asked = true;
                warn!(signal = sig, domain = %plan.domain,
                    "stop requested: ending protection (the backup discards its copy; the guest stays here, unprotected)");
                st.phase = Phase::Ending;
                st.since_unix = state::now_unix();
                save(&st);
                let ctl = state::relay_send_control(&o.run_dir, &plan.vif);
                asking = Some(tokio::spawn(async move { control::end_protection(&ctl, END_WAIT).await }));
            }
            r = async {
                match asking.as_mut() {
                    Some(h) => h.await,
                    None => std::future::pending().await,
                }
            }, if asking.is_some() => {
                asking = None;
                let r = r.unwrap_or_else(|e| Err(ControlError::Ask {
                    path: String::new(),
                    source: std::io::Error::other(e),
                }));
                if !answered(r, &plan.domain, &mut stop) {
                    signal_pid(xl_pid, libc::SIGTERM);
                }
                stop_deadline = Some(tokio::time::Instant::now() + STOP_GRACE);
            }
            _ = tick.tick() => {
                if let Some(d) = stop_deadline && tokio::time::Instant::now() >= d {
                    warn!("xl remus did not end within {} s; killing it", STOP_GRACE.as_secs());
                    signal_group(xl_pid, libc::SIGKILL);
                    stop_deadline = None;
                }
                let s = sample(&st.relay_socket, &plan.vif).await;
                let before = st.phase;
                if let Some(a) = s.acked {
                    st.last_acked = a;
                    if !stop.asked {
                        st.phase = if a >= 1 { Phase::Protected } else { Phase::InitialCopy };
                    }
                }
                if let Some(t) = s.acks_total {
                    st.checkpoints_per_s = rate.push(Instant::now(), t);
                }
                if let Some((f, b)) = s.held {
                    st.held_frames = Some(f);
                    st.held_bytes = Some(b);
                }
                if st.phase != before {
                    st.since_unix = state::now_unix();
                    match st.phase {
                        Phase::InitialCopy => info!(backup = %plan.backup, "connected; copying the guest's memory (no failover is possible before checkpoint 1 is acknowledged)"),
                        Phase::Protected => info!(checkpoint = st.last_acked, "PROTECTED: the backup holds checkpoint {}", st.last_acked),
                        _ => {}
                    }
                }
                save(&st);
            }
        }
    };
    // The relay outlives xl by a little: it tells the backup (CLOSE, up to its own
    // timeout) or notices the backup's end before exiting.
    let mut relay: Option<RelayExit> = state::read_json(&exit_file);
    let waited = Instant::now();
    while relay.is_none() && waited.elapsed() < RELAY_GRACE {
        tokio::time::sleep(Duration::from_millis(100)).await;
        relay = state::read_json(&exit_file);
    }
    let Ending {
        phase,
        code,
        output,
        detail,
        ..
    } = outcome(
        &plan.domain,
        &plan.vif,
        xl_status,
        relay,
        &stop,
        st.last_acked,
    );
    st.phase = phase;
    st.detail = Some(detail.clone());
    st.output = Some(output);
    st.exit_code = Some(code.code());
    st.since_unix = state::now_unix();
    st.held_frames = None;
    st.held_bytes = None;
    st.checkpoints_per_s = None;
    save(&st);
    if code == ExitCode::Ok {
        info!("{detail}");
    } else {
        eprintln!("remus protect: {}: {detail}", plan.domain);
    }
    code
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
            let e = outcome("web", "vif3.0", xl, relay, &stop, 7);
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
            let e = outcome("web", "vif3.0", Some(1), exit(0), &discarded(destroyed), 7);
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
            let e = outcome("web", "vif3.0", Some(1), exit(5), &stop, 7);
            assert_eq!(
                (e.phase, e.code, e.output),
                (Phase::EndUnconfirmed, ExitCode::Unconfirmed, Output::Held)
            );
            assert!(e.backup_activates, "it may: nothing confirmed otherwise");
            assert!(!e.release_safe);
        }
        // A discard answer never makes a failed relay look clean.
        let e = outcome("web", "vif3.0", Some(1), exit(1), &discarded(true), 7);
        assert_eq!(e.phase, Phase::Failed);
    }

    #[test]
    fn before_the_first_ack_nothing_activates_and_releasing_is_safe() {
        let stopped = Stop {
            asked: true,
            answer: None,
        };
        let e = outcome("web", "vif3.0", None, exit(0), &stopped, 0);
        assert_eq!(
            (e.phase, e.code, e.output),
            (Phase::Stopped, ExitCode::Ok, Output::Held)
        );
        assert!(!e.backup_activates);
        assert!(e.release_safe);
        let e = outcome("web", "vif3.0", None, exit(0), &stopped, 5);
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
