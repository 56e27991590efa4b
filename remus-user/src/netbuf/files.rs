//! The runtime files of remus-net: where they live and what the state file says.
//!
//! Owns: the paths of a vif's control socket, state file and daemon log under `RUN_DIR`
//! (root-only, 0700), writing, reading and removing them, and listing the vifs that have
//! one. Never touches: BPF pins (`datapath`), the socket's protocol (`control`), netlink.
use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::datapath::AttachKind;

/// Runtime files of remus-net: the one definition lives in `relay` (shared with the relay's
/// sockets), re-exported here.
pub use crate::relay::RUN_DIR;

/// One directory of runtime files: `RUN_DIR` in production, a scratch directory in tests.
#[derive(Clone, Debug)]
pub struct RunDir(PathBuf);

impl Default for RunDir {
    fn default() -> Self {
        RunDir(PathBuf::from(RUN_DIR))
    }
}

impl RunDir {
    pub fn at(dir: impl Into<PathBuf>) -> RunDir {
        RunDir(dir.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn socket(&self, iface: &str) -> PathBuf {
        self.0.join(format!("net-{iface}.sock"))
    }

    pub fn state(&self, iface: &str) -> PathBuf {
        self.0.join(format!("net-{iface}.json"))
    }

    pub fn log(&self, iface: &str) -> PathBuf {
        self.0.join(format!("net-{iface}.log"))
    }

    /// Creates the directory, readable by root only.
    pub fn ensure(&self) -> io::Result<()> {
        std::fs::create_dir_all(&self.0)?;
        std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o700))
    }

    /// The state file of `iface`, if there is a readable one.
    pub fn read_state(&self, iface: &str) -> Option<StateFile> {
        let text = std::fs::read_to_string(self.state(iface)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn write_state(&self, state: &StateFile) -> io::Result<()> {
        let json = serde_json::to_string_pretty(state).map_err(io::Error::other)?;
        std::fs::write(self.state(&state.iface), json)
    }

    /// Removes the socket and the state file (the log stays for the operator).
    pub fn remove(&self, iface: &str) {
        let _ = std::fs::remove_file(self.socket(iface));
        let _ = std::fs::remove_file(self.state(iface));
    }

    /// Interfaces with a state file here, sorted.
    pub fn attached(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(&self.0)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.strip_prefix("net-")
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_string)
            })
            .collect();
        out.sort();
        out
    }
}

pub fn socket_path(iface: &str) -> PathBuf {
    RunDir::default().socket(iface)
}
pub fn state_path(iface: &str) -> PathBuf {
    RunDir::default().state(iface)
}
pub fn log_path(iface: &str) -> PathBuf {
    RunDir::default().log(iface)
}

/// Written by the holder at attach, removed at detach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    pub iface: String,
    pub ifindex: u32,
    pub pid: u32,
    pub attach_kind: AttachKind,
    pub tap: String,
    pub ring_bytes: u32,
    pub limit_bytes: u64,
    pub socket: PathBuf,
    pub pins: PathBuf,
    pub started_unix: u64,
}

pub fn read_state(iface: &str) -> Option<StateFile> {
    RunDir::default().read_state(iface)
}

/// Interfaces with runtime state under `RUN_DIR` (for `status` without an interface).
pub fn attached_ifaces() -> Vec<String> {
    RunDir::default().attached()
}

pub fn pid_alive(pid: u32) -> bool {
    pid != 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh scratch directory under the system temp dir, removed on drop.
    struct Scratch(RunDir);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let d = std::env::temp_dir().join(format!("remus-files-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            let rd = RunDir::at(d.join("run"));
            rd.ensure().expect("creating the scratch run dir");
            Scratch(rd)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            if let Some(parent) = self.0.path().parent() {
                let _ = std::fs::remove_dir_all(parent);
            }
        }
    }

    fn state(iface: &str) -> StateFile {
        StateFile {
            iface: iface.into(),
            ifindex: 7,
            pid: 4242,
            attach_kind: AttachKind::Netlink {
                created_clsact: true,
            },
            tap: "rmt7".into(),
            ring_bytes: 1 << 20,
            limit_bytes: 1 << 24,
            socket: PathBuf::from("/run/remus/net-vif5.0.sock"),
            pins: PathBuf::from("/sys/fs/bpf/remus/vif5:0"),
            started_unix: 1,
        }
    }

    #[test]
    fn paths_carry_the_interface_name_and_live_in_the_run_dir() {
        let rd = RunDir::at("/x");
        assert_eq!(rd.socket("vif5.0"), Path::new("/x/net-vif5.0.sock"));
        assert_eq!(rd.state("vif5.0"), Path::new("/x/net-vif5.0.json"));
        assert_eq!(rd.log("vif5.0"), Path::new("/x/net-vif5.0.log"));
        assert_eq!(socket_path("v").parent(), Some(Path::new(RUN_DIR)));
    }

    #[test]
    fn the_run_dir_is_root_only() {
        let s = Scratch::new("mode");
        let mode = std::fs::metadata(s.0.path())
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_state_file_reads_back_as_written_and_lists_its_interface() {
        let s = Scratch::new("rw");
        assert_eq!(s.0.read_state("vif5.0"), None);
        s.0.write_state(&state("vif5.0")).expect("write");
        s.0.write_state(&state("vif1.0")).expect("write");
        std::fs::write(s.0.log("vif9.0"), "a log alone does not count").expect("log");
        assert_eq!(s.0.read_state("vif5.0"), Some(state("vif5.0")));
        assert_eq!(s.0.attached(), vec!["vif1.0".to_string(), "vif5.0".into()]);
        s.0.remove("vif5.0");
        assert_eq!(s.0.read_state("vif5.0"), None);
        assert_eq!(s.0.attached(), vec!["vif1.0".to_string()]);
    }

    #[test]
    fn a_garbled_state_file_reads_as_none() {
        let s = Scratch::new("bad");
        std::fs::write(s.0.state("vif3.0"), "{not json").expect("write");
        assert_eq!(s.0.read_state("vif3.0"), None);
    }

    #[test]
    fn pid_zero_and_a_reaped_child_are_not_alive() {
        assert!(!pid_alive(0));
        assert!(pid_alive(std::process::id()));
        let mut c = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = c.id();
        c.wait().expect("wait");
        assert!(!pid_alive(pid));
    }
}
