//! `remus backup DOMAIN`: the backup's listener for one protected domain, configured from
//! the same /etc/remus/remus.toml as the primary.
//!
//! Owns: the checks of the backup side (root, Xen, the key, the domain not running here,
//! no copy left from an earlier session), the state file that lets `remus status` and
//! `remus unprotect` find the listener, and the exact `remus relay receive` command line,
//! which it then becomes (exec: same pid, so systemd supervises the relay itself). Never
//! touches: the relay's code paths, a received copy.
use std::path::{Path, PathBuf};

use crate::config::Settings;

use super::checks::{self, CheckFailure, Failures, Host};
use super::state;
use super::xen::Xen;

/// The relay's argv (without the program name).
pub fn relay_args(domain: &str, s: &Settings, run_dir: &Path) -> Vec<String> {
    vec![
        "relay".into(),
        "receive".into(),
        "--listen".into(),
        s.listen.clone(),
        "--key-file".into(),
        s.key_file.display().to_string(),
        "--heartbeat-interval".into(),
        format!("{}ms", s.heartbeat_interval.as_millis()),
        "--heartbeat-timeout".into(),
        format!("{}ms", s.heartbeat_timeout.as_millis()),
        "--status-socket".into(),
        state::relay_receive_socket(run_dir, domain)
            .display()
            .to_string(),
    ]
}

/// Every check of the backup side; all failures, each once.
pub fn check(domain: &str, s: &Settings, xen: &impl Xen, host: &impl Host) -> Failures {
    let mut f = Failures::default();
    if let Some(list) = checks::check_xen(xen, host, &mut f) {
        // A listener on loopback serves a primary on this same host (a test or demo
        // setup, like the lab's): there the domain running here is the primary's.
        if let Some(d) = list.iter().find(|d| d.name == domain && d.domid != 0)
            && !loopback(&s.listen)
        {
            f.0.push(CheckFailure::RunsHere {
                domain: domain.into(),
                domid: d.domid,
            });
        }
        let incoming = format!("{domain}--incoming");
        if let Some(d) = list.iter().find(|d| d.name == incoming) {
            f.0.push(CheckFailure::CopyLeft {
                domain: domain.into(),
                domid: d.domid,
            });
        }
    }
    if let Err(e) = crate::replication::Key::load(&s.key_file) {
        f.0.push(CheckFailure::Key(match e {
            crate::replication::WireError::KeyFile { path, problem } => {
                format!("{path}: {problem}")
            }
            other => other.to_string(),
        }));
    }
    if s.listen.parse::<std::net::SocketAddr>().is_err() {
        f.0.push(CheckFailure::BadListen(format!(
            "`{}` is not ADDR:PORT (e.g. 0.0.0.0:7788)",
            s.listen
        )));
    }
    if let Some(pid) = running_backup(&state::run_dir(), domain) {
        f.0.push(CheckFailure::AlreadyProtected {
            domain: domain.into(),
            by: format!("remus backup, pid {pid}, receives it here"),
        });
    }
    f
}

/// `listen` is a loopback address (127.0.0.0/8, ::1).
pub fn loopback(listen: &str) -> bool {
    listen
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback())
}

/// The pid of a live `remus backup` (relay receive) of `domain`.
pub fn running_backup(dir: &Path, domain: &str) -> Option<u32> {
    let b: state::BackupState = state::read_json(&state::backup_path(dir, domain))?;
    (super::host::pid_alive(b.pid)
        && super::host::cmdline(b.pid).is_some_and(|a| a.iter().any(|x| x == "receive")))
    .then_some(b.pid)
}

/// Records the listener, then becomes `remus relay receive` (returns only on failure).
pub fn exec_relay(domain: &str, s: &Settings, exe: &Path, run_dir: &Path) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    if let Err(e) = state::ensure_dir(run_dir) {
        return e;
    }
    let st = state::BackupState {
        domain: domain.into(),
        pid: std::process::id(),
        listen: s.listen.clone(),
        relay_socket: state::relay_receive_socket(run_dir, domain),
        started_unix: state::now_unix(),
    };
    if let Err(e) = state::write_json(&state::backup_path(run_dir, domain), &st) {
        return e;
    }
    std::process::Command::new(exe)
        .arg0("remus")
        .args(relay_args(domain, s, run_dir))
        .exec()
}

/// The binary to exec (this one).
pub fn exe() -> PathBuf {
    checks::self_exe()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_relay_command_comes_from_the_config() {
        let c = Config::parse(
            "[defaults]\nheartbeat_timeout_ms = 3000\n[domain.web]\nlisten = \"0.0.0.0:7790\"\n",
            None,
        )
        .unwrap();
        let a = relay_args("web", &c.settings("web"), Path::new("/run/remus"));
        assert_eq!(
            a,
            [
                "relay",
                "receive",
                "--listen",
                "0.0.0.0:7790",
                "--key-file",
                "/etc/remus/key",
                "--heartbeat-interval",
                "200ms",
                "--heartbeat-timeout",
                "3000ms",
                "--status-socket",
                "/run/remus/relay-receive-web.sock"
            ]
        );
    }
}
