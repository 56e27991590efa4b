//! The test topology with `remus-net` on its vif: the kit's guest/host/peer namespaces
//! (`remus_testkit::topo::Lan`) plus running the built `remus-net` in the host namespace
//! like an operator, and the runtime files and pins it keeps for the test's vif.
//!
//! Owns: what the kit's `Lan` owns, the children it starts, and remus-net's runtime
//! files and pins of the test's vif (removed on drop, even when the test panics).
//! Never touches: anything it did not create, other namespaces' state.
//!
//! remus-net runs in the host namespace through `nsenter --net=…`, sharing the test's
//! mount namespace (how remus-net behaves under `ip netns exec` has tests of its own).
use std::{
    io::{BufRead, BufReader},
    mem,
    ops::Deref,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use remus_testkit::topo::Lan;

use crate::netns::{Out, Sniffer, remus_net_bin, run, run_in, wait_until};

/// One test's namespaces and devices, and remus-net on its vif; everything is removed on
/// drop.
pub struct Topo {
    lan: Lan,
    bin: PathBuf,
    children: Mutex<Vec<Child>>,
}

impl Deref for Topo {
    type Target = Lan;
    fn deref(&self) -> &Lan {
        &self.lan
    }
}

impl Topo {
    /// Builds the topology with a prefix unique to this test (`tag`: 2-3 characters).
    pub fn new(tag: &str) -> Topo {
        Topo::build_with_vif(tag, "v")
    }

    /// The same with the vif named like Xen's (`<prefix>v.0`, as in vif5.0): names
    /// with a dot cannot be bpffs pin names, remus-net must map them.
    pub fn new_xen_named(tag: &str) -> Topo {
        Topo::build_with_vif(tag, "v.0")
    }

    fn build_with_vif(tag: &str, vif_suffix: &str) -> Topo {
        let prefix = format!("r{}{:04x}", tag, std::process::id() & 0xffff);
        assert!(prefix.len() <= 9, "tag {tag:?} too long");
        let t = Topo {
            lan: Lan::named(&prefix, vif_suffix),
            bin: remus_net_bin(),
            children: Mutex::new(Vec::new()),
        };
        t.cleanup();
        t.lan
            .build()
            .unwrap_or_else(|e| panic!("building the topology: {e}"));
        t
    }

    /// Enables IPv6 on guest and peer (static addresses without DAD, static neighbours).
    pub fn enable_ipv6(&self) {
        self.lan
            .enable_ipv6()
            .unwrap_or_else(|e| panic!("enabling IPv6: {e}"));
    }

    /// `ip -n ns args…`, which must succeed.
    pub fn ip(&self, ns: &str, args: &[&str]) {
        remus_testkit::cmd::ip(ns, args).unwrap_or_else(|e| panic!("{e}"));
    }

    /// `remus-net args…` in the host namespace.
    pub fn remus(&self, args: &[&str]) -> Out {
        let bin = self.bin.to_string_lossy().into_owned();
        run_in(&self.host, &bin, args)
    }

    /// `remus-net attach <vif> extra…`, which must succeed.
    pub fn attach(&self, extra: &[&str]) -> Out {
        let mut a = vec!["attach", self.vif.as_str()];
        a.extend_from_slice(extra);
        self.remus(&a).ok("remus-net attach")
    }

    /// `remus-net status <vif> -j` of a live holder (the `status` object).
    pub fn status(&self) -> serde_json::Value {
        let v = self
            .remus(&["status", &self.vif, "-j"])
            .ok("remus-net status")
            .json();
        v.get("status").cloned().unwrap_or(v)
    }

    pub fn held_frames(&self) -> u64 {
        self.status()["held_frames"].as_u64().unwrap_or(0)
    }

    /// Waits until the holder holds at least `n` frames (they left the ring).
    pub fn wait_held(&self, n: u64) {
        wait_until(
            &format!("{n} held frames on {}", self.vif),
            Duration::from_secs(20),
            || self.held_frames() >= n,
        );
    }

    /// `remus-net checkpoint`: the epoch just closed.
    pub fn checkpoint(&self) -> u64 {
        let o = self
            .remus(&["checkpoint", &self.vif])
            .ok("remus-net checkpoint");
        o.stdout
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("checkpoint printed {:?}", o.stdout))
    }

    /// `remus-net commit <vif> N -j`: the `released` object.
    pub fn commit(&self, epoch: u64) -> serde_json::Value {
        let o = self
            .remus(&["commit", &self.vif, &epoch.to_string(), "-j"])
            .ok("remus-net commit");
        o.json()["released"].clone()
    }

    /// The holder's pid from its state file, if it means a process of this test's pid
    /// namespace (a holder in a container writes its pid there).
    pub fn holder_pid(&self) -> Option<u32> {
        use std::os::unix::fs::MetadataExt;
        let text = std::fs::read_to_string(self.state_file()).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let ours = std::fs::metadata("/proc/self/ns/pid").ok()?.ino();
        if v["pid_ns"].as_u64().is_some_and(|ns| ns != ours) {
            return None;
        }
        v["pid"].as_u64().map(|p| p as u32)
    }

    pub fn state_file(&self) -> PathBuf {
        PathBuf::from(format!("/run/remus/net-{}.json", self.vif))
    }
    pub fn socket_file(&self) -> PathBuf {
        PathBuf::from(format!("/run/remus/net-{}.sock", self.vif))
    }
    pub fn log_file(&self) -> PathBuf {
        PathBuf::from(format!("/run/remus/net-{}.log", self.vif))
    }
    /// remus-net's pin directory of the vif ('.' is not allowed in bpffs names and is
    /// mapped to ':').
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/remus/{}", self.vif.replace('.', ":")))
    }

    /// The vif's ifindex in the host namespace.
    pub fn vif_ifindex(&self) -> u32 {
        let o = run(
            "ip",
            &["-n", &self.host, "-j", "link", "show", "dev", &self.vif],
        )
        .ok("ip link show");
        o.json()[0]["ifindex"].as_u64().expect("ifindex") as u32
    }

    /// Names of every link in the host namespace.
    pub fn host_links(&self) -> Vec<String> {
        let o = run("ip", &["-n", &self.host, "-j", "link", "show"]).ok("ip link show");
        o.json()
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l["ifname"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `tc qdisc show dev <vif>` in the host namespace.
    pub fn vif_qdiscs(&self) -> String {
        run("tc", &["-n", &self.host, "qdisc", "show", "dev", &self.vif])
            .ok("tc qdisc show")
            .stdout
    }

    /// Starts a child inside a namespace; it is killed on drop.
    pub fn spawn_in(&self, ns: &str, program: &str, args: &[&str]) -> u32 {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}"));
        let id = child.id();
        self.children.lock().expect("children").push(child);
        id
    }

    /// `remus-net attach <vif> --foreground extra…` as a child; returns once it printed
    /// that it holds. The caller waits for it (it is not killed on drop if waited).
    pub fn attach_foreground(
        &self,
        extra: &[&str],
    ) -> (Child, BufReader<std::process::ChildStdout>) {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.host))
            .arg(&self.bin)
            .args(["attach", &self.vif, "--foreground"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting remus-net attach --foreground");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("reading the attach line");
        assert!(
            line.contains("holding"),
            "foreground attach printed {line:?}"
        );
        (child, out)
    }

    /// SIGKILLs the holder of the vif and waits until it is gone; its pid.
    pub fn kill_holder(&self) -> u32 {
        let pid = self.holder_pid().expect("holder pid in the state file");
        // SAFETY: kill of the holder this test started.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        wait_until("the holder to die", Duration::from_secs(10), || {
            !remus_testkit::cmd::process_alive(pid)
        });
        pid
    }

    /// Waits until the pinned counters of a dead holder's program show `n` captured
    /// frames (`remus-net status` reads them from the pins).
    pub fn wait_captured_by_dead_holder(&self, n: u64) {
        wait_until(
            &format!("the dead holder's program to capture {n} frames"),
            Duration::from_secs(10),
            || {
                let o = self.remus(&["status", &self.vif, "-j"]);
                o.code == 0
                    && o.json()["pinned"]["stats"]["captured_frames"]
                        .as_u64()
                        .unwrap_or(0)
                        >= n
            },
        );
    }

    /// `remus-net detach <vif> -j` from a fresh process after the holder died: the report,
    /// which must say the holder was dead.
    pub fn detach_dead_holder(&self, what: &str) -> serde_json::Value {
        let d = self.remus(&["detach", &self.vif, "-j"]).ok(what).json();
        assert_eq!(d["holder_was_alive"], false, "{what}: {d}");
        d
    }

    /// Records every frame arriving on the peer's eth0 from now on.
    pub fn sniff_peer(&self) -> Sniffer {
        Sniffer::start(&self.peer, "eth0")
    }

    /// Removes everything this topology may have left (also used before building).
    fn cleanup(&self) {
        if Path::new(&format!("/run/netns/{}", self.host)).exists() {
            let bin = self.bin.to_string_lossy().into_owned();
            let _ = run_in(&self.host, &bin, &["detach", &self.vif, "--drop"]);
        }
        if let Some(pid) = self.holder_pid() {
            // Only a holder of this test's vif (its name carries this test's prefix).
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        for mut c in self
            .children
            .lock()
            .map(|mut c| mem::take(&mut *c))
            .unwrap_or_default()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.lan.remove();
        for f in [self.state_file(), self.socket_file(), self.log_file()] {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_dir_all(self.pin_dir());
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        self.cleanup();
    }
}
