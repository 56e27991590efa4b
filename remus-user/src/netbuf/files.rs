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

use crate::datapath::{AttachKind, PinPlace};

/// Runtime files of remus-net: the one definition lives in `relay` (shared with the relay's
/// sockets), re-exported here.
pub use crate::RUN_DIR;

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
    /// Whether the pins outlive the holder (absent in files of older versions).
    #[serde(default)]
    pub pin_place: Option<PinPlace>,
    /// The holder's pid namespace (inode of /proc/self/ns/pid): `pid` means something
    /// only there (absent in files of older versions).
    #[serde(default)]
    pub pid_ns: Option<u64>,
    pub started_unix: u64,
}

impl StateFile {
    /// Whether the holder that wrote this file is alive. Its pid is checked where it
    /// means that process; from another pid namespace (a holder in a container) the
    /// control socket is: it accepts connections exactly while the holder runs.
    pub fn holder_alive(&self) -> bool {
        match self.pid_ns {
            Some(ns) if Some(ns) != pid_ns() => {
                std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
            }
            _ => pid_alive(self.pid),
        }
    }
}

/// This process's pid namespace (inode of /proc/self/ns/pid).
pub fn pid_ns() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").map(|m| m.ino()).ok()
}

pub fn read_state(iface: &str) -> Option<StateFile> {
    RunDir::default().read_state(iface)
}

/// Interfaces with runtime state under `RUN_DIR` (for `status` without an interface).
pub fn attached_ifaces() -> Vec<String> {
    RunDir::default().attached()
}

/// Whether process `pid` is alive. A zombie counts as dead: it holds nothing any more
/// (a dead holder nobody has reaped yet must not pass for a live one).
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the command name, which may hold ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
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
            pin_place: Some(PinPlace::Private),
            pid_ns: Some(4026531836),
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
    fn a_holder_in_another_pid_namespace_is_alive_while_its_socket_answers() {
        let s = Scratch::new("ns");
        let mut st = state("vif4.0");
        st.socket = s.0.socket("vif4.0");
        // A pid that would be alive here (ours) must not count: it is not the holder.
        st.pid = std::process::id();
        st.pid_ns = pid_ns().map(|n| n + 1);
        assert!(!st.holder_alive(), "no socket: dead, whatever the pid says");
        let listener = std::os::unix::net::UnixListener::bind(&st.socket).expect("bind");
        assert!(st.holder_alive(), "the socket answers: alive");
        drop(listener);
        let _ = std::fs::remove_file(&st.socket);
        // In our own pid namespace the pid decides.
        st.pid_ns = pid_ns();
        assert!(st.holder_alive());
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
        // Exited but not reaped: a zombie, dead for our purpose.
        let t0 = std::time::Instant::now();
        while pid_alive(pid) {
            assert!(t0.elapsed().as_secs() < 10, "a zombie passed for alive");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("zombie's stat");
        assert!(
            stat.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        );
        c.wait().expect("wait");
        assert!(!pid_alive(pid));
    }

    #[test]
    fn a_state_file_of_an_older_version_without_pin_place_still_reads() {
        let s = Scratch::new("old");
        let mut v = serde_json::to_value(state("vif2.0")).expect("json");
        let o = v.as_object_mut().expect("object");
        o.remove("pin_place");
        o.remove("pid_ns");
        std::fs::write(s.0.state("vif2.0"), v.to_string()).expect("write");
        let st = s.0.read_state("vif2.0").expect("readable");
        assert_eq!(st.pin_place, None);
        assert_eq!(st.pid, 4242);
    }
}
