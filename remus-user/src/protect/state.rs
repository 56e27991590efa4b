//! The state files of `remus protect` and `remus backup` under /run/remus/.
//!
//! Owns: their format (JSON, stable keys), their paths, writing them atomically (0600,
//! rename) and reading them back. `remus protect` rewrites its file on every change and
//! every second; `remus status` and `remus unprotect` read it, also after the writer died
//! (its pid then tells). Never touches: the relay's or the buffer's own runtime files.
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::relay::{RUN_DIR, sanitize};

/// Where `remus protect` is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// xl remus started; the relay has not reported yet.
    Starting,
    /// Connected; the first checkpoint (a whole live migration) is not acknowledged yet:
    /// no failover is possible until it is.
    InitialCopy,
    /// At least one checkpoint acknowledged: the backup can take over.
    Protected,
    /// Stopped before protection could be ended cleanly (the relay could not be asked,
    /// e.g. it had not started): xl remus was stopped; if the backup had a checkpoint it
    /// activates its copy, and this copy's output stays held.
    Stopped,
    /// Stopping (SIGTERM/SIGINT, `remus unprotect`): the relay is asking the backup to
    /// discard its copy.
    Ending,
    /// Protection ended on request: the backup discarded its copy (nothing activated),
    /// everything held was released, and the guest runs here, unprotected.
    Unprotected,
    /// Asked to end, the backup did not confirm that it discarded its copy: the vif's
    /// output stays HELD (the backup may still activate its copy).
    EndUnconfirmed,
    /// The backup was lost: the relay released what it held and the guest runs
    /// UNPROTECTED here.
    BackupLost,
    /// The domain ended (shut down or destroyed): xl ended the stream, the backup
    /// activated its copy.
    DomainEnded,
    /// Something failed; `detail` says what, and whether output stays held.
    Failed,
}

impl Phase {
    /// The supervisor is gone or going: nothing more will happen by itself.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::Stopped
                | Phase::Unprotected
                | Phase::EndUnconfirmed
                | Phase::BackupLost
                | Phase::DomainEnded
                | Phase::Failed
        )
    }

    pub fn words(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::InitialCopy => "initial copy",
            Phase::Protected => "protected",
            Phase::Stopped => "stopped",
            Phase::Ending => "ending protection",
            Phase::Unprotected => "unprotected on request",
            Phase::EndUnconfirmed => "end not confirmed: output HELD",
            Phase::BackupLost => "backup lost: UNPROTECTED",
            Phase::DomainEnded => "domain ended",
            Phase::Failed => "failed",
        }
    }
}

/// `/run/remus/protect-DOMAIN.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProtectState {
    pub domain: String,
    pub domid: u32,
    /// The `remus protect` process.
    pub pid: u32,
    pub xl_pid: Option<u32>,
    /// The first vif: it names the relay's sockets (as `relay send` does by default).
    pub vif: String,
    /// Every vif whose output is held (the relay runs with `--vif` for each); empty in a
    /// state file of an earlier remus, which held `vif` alone.
    #[serde(default)]
    pub vifs: Vec<String>,
    pub backup: String,
    pub interval_ms: u64,
    pub phase: Phase,
    /// Words for people (why it ended, what to do).
    pub detail: Option<String>,
    pub started_unix: u64,
    pub since_unix: u64,
    pub last_acked: u64,
    /// Acknowledged checkpoints per second over the last ten seconds.
    pub checkpoints_per_s: Option<f64>,
    pub held_frames: Option<u64>,
    pub held_bytes: Option<u64>,
    /// The relay's status socket (`remus relay status --socket`).
    pub relay_socket: PathBuf,
    /// Disks protected although not replicated (--unsafe-unreplicated-disks).
    pub unsafe_disks: Vec<String>,
    /// How `remus protect` ended (its exit code), once it has.
    pub exit_code: Option<i32>,
    /// Once ended: whether the vif's output is held, open, or unknown.
    #[serde(default)]
    pub output: Option<super::run::Output>,
}

impl ProtectState {
    /// Every vif held: `vifs`, or `vif` alone in an older state file.
    pub fn all_vifs(&self) -> Vec<String> {
        if self.vifs.is_empty() {
            vec![self.vif.clone()]
        } else {
            self.vifs.clone()
        }
    }
}

/// `/run/remus/backup-DOMAIN.json`, written by `remus backup` before it becomes the relay.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackupState {
    pub domain: String,
    /// The relay's pid (`remus backup` execs it, so it keeps the pid).
    pub pid: u32,
    pub listen: String,
    pub relay_socket: PathBuf,
    pub started_unix: u64,
}

pub fn run_dir() -> PathBuf {
    std::env::var_os("REMUS_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(RUN_DIR))
}

pub fn protect_path(dir: &Path, domain: &str) -> PathBuf {
    dir.join(format!("protect-{}.json", sanitize(domain)))
}

/// Where the relay's wrapper leaves the relay's exit status for `remus protect`.
pub fn relay_exit_path(dir: &Path, domain: &str) -> PathBuf {
    dir.join(format!("protect-{}.relay-exit", sanitize(domain)))
}

pub fn backup_path(dir: &Path, domain: &str) -> PathBuf {
    dir.join(format!("backup-{}.json", sanitize(domain)))
}

/// The relay's status socket for `vif` (the same path `relay send` picks by default).
pub fn relay_send_socket(dir: &Path, vif: &str) -> PathBuf {
    dir.join(format!("relay-send-{}.sock", sanitize(vif)))
}

/// The relay's control socket for `vif` (where protection is ended without a failover).
pub fn relay_send_control(dir: &Path, vif: &str) -> PathBuf {
    relay_send_socket(dir, vif).with_extension("ctl")
}

pub fn relay_receive_socket(dir: &Path, domain: &str) -> PathBuf {
    dir.join(format!("relay-receive-{}.sock", sanitize(domain)))
}

/// Creates the run directory root-only (the relay and remus-net do the same).
pub fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Writes `value` as JSON to `path` through a temporary file and a rename, mode 0600, so a
/// reader never sees half a file.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    drop(f);
    std::fs::rename(&tmp, path)
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Every `prefix*.json` state under `dir`, sorted by file name.
pub fn list<T: for<'de> Deserialize<'de>>(dir: &Path, prefix: &str) -> Vec<T> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".json"))
                })
                .collect()
        })
        .unwrap_or_default();
    paths.sort();
    paths.iter().filter_map(|p| read_json(p)).collect()
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The relay's exit as the wrapper records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_round_trip_atomically_and_root_only() {
        let d = tempfile::tempdir().unwrap();
        let p = protect_path(d.path(), "web");
        let s = ProtectState {
            domain: "web".into(),
            domid: 3,
            pid: 10,
            xl_pid: Some(11),
            vif: "vif3.0".into(),
            vifs: vec!["vif3.0".into(), "vif3.1".into()],
            backup: "b:7788".into(),
            interval_ms: 200,
            phase: Phase::Protected,
            detail: None,
            started_unix: 1,
            since_unix: 2,
            last_acked: 9,
            checkpoints_per_s: Some(2.5),
            held_frames: Some(1),
            held_bytes: Some(60),
            relay_socket: relay_send_socket(d.path(), "vif3.0"),
            unsafe_disks: vec![],
            exit_code: None,
            output: None,
        };
        write_json(&p, &s).unwrap();
        assert_eq!(read_json::<ProtectState>(&p), Some(s.clone()));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let all: Vec<ProtectState> = list(d.path(), "protect-");
        assert_eq!(all, vec![s]);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_state_file_without_vifs_holds_its_one_vif() {
        // Written by a remus that held one vif per domain: no `vifs` key.
        let j = r#"{"domain":"web","domid":3,"pid":10,"xl_pid":null,"vif":"vif3.0",
            "backup":"b:7788","interval_ms":200,"phase":"protected","detail":null,
            "started_unix":1,"since_unix":2,"last_acked":9,"checkpoints_per_s":null,
            "held_frames":null,"held_bytes":null,"relay_socket":"/run/remus/x.sock",
            "unsafe_disks":[],"exit_code":null}"#;
        let s: ProtectState = serde_json::from_str(j).unwrap();
        assert_eq!(s.all_vifs(), ["vif3.0"]);
        let two = ProtectState {
            vifs: vec!["vif3.0".into(), "vif3.1".into()],
            ..s
        };
        assert_eq!(two.all_vifs(), ["vif3.0", "vif3.1"]);
    }

    #[test]
    fn odd_domain_names_make_safe_file_names() {
        let p = protect_path(Path::new("/run/remus"), "a/b c");
        assert_eq!(p, Path::new("/run/remus/protect-a_b_c.json"));
    }
}
