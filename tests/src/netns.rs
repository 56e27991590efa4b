//! Network-namespace fixtures for the root-only integration tiers: a guest, a host with a
//! bridge, a LAN peer; running the built `remus-net` inside the host namespace; raw
//! packet sockets to send from the guest and to record what reaches the peer.
//!
//! Owns: namespaces and devices it creates (names carry a per-test prefix), and the
//! runtime files and pins remus-net keeps for the test's vif (removed on drop, even when
//! the test panics). Never touches: anything it did not create, other namespaces' state.
//!
//! These are test fixtures: setup failures panic with a message naming the step.
//!
//! Topology (one `Topo`):
//! ```text
//!  netns <p>g "guest"           netns <p>h "host" (dom0)                netns <p>p "peer"
//!  eth0 02:00:00:00:00:01 ── <p>v (the vif) ─┐                    ┌─ <p>l ── eth0 02:00:00:00:00:02
//!  10.77.0.1/24  fd77::1/64                  └── br0 (stp off) ──┘        10.77.0.2/24 fd77::2/64
//! ```
//! remus-net runs in the host namespace through `nsenter --net=…` (never `ip netns exec`:
//! that gives the process a private bpffs, and its pins would vanish with it).
use std::{
    fs::File,
    io::{self, BufRead, BufReader},
    mem,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const GUEST_IP: &str = "10.77.0.1";
pub const PEER_IP: &str = "10.77.0.2";
pub const GUEST_IP6: &str = "fd77::1";
pub const PEER_IP6: &str = "fd77::2";

/// The built `remus-net`: `$REMUS_NET_BIN`, else next to this test executable's profile
/// directory (target/<profile>/remus-net). `cargo xtask test` builds the binaries before
/// running the tests; when it is missing here, it is built with cargo.
pub fn remus_net_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REMUS_NET_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/remus-net
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("remus-net");
    if !bin.exists() {
        static BUILD: std::sync::Once = std::sync::Once::new();
        BUILD.call_once(|| {
            let release = profile_dir.ends_with("release");
            let root = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace root");
            let path = format!(
                "/var/cache/remus/bin:{}",
                std::env::var("PATH").unwrap_or_default()
            );
            let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            c.current_dir(root)
                .env("PATH", path)
                .args(["build", "-p", "remus-user", "--bins"]);
            if release {
                c.arg("--release");
            }
            let st = c.status().expect("running cargo build for remus-net");
            assert!(
                st.success(),
                "cargo build -p remus-user --bins failed: {st}"
            );
        });
    }
    assert!(
        bin.exists(),
        "{} does not exist (build it: cargo build -p remus-user --bins)",
        bin.display()
    );
    bin
}

/// Result of one command.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    fn from(o: Output) -> Out {
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Panics unless the command exited 0.
    pub fn ok(self, what: &str) -> Out {
        assert_eq!(
            self.code, 0,
            "{what} failed: exit {}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// Runs a command, capturing its output.
pub fn run(program: &str, args: &[&str]) -> Out {
    let o = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("starting {program} {args:?}: {e}"));
    Out::from(o)
}

/// Runs `program args` inside network namespace `ns` (nsenter: same mount namespace).
pub fn run_in(ns: &str, program: &str, args: &[&str]) -> Out {
    let mut a = vec![format!("--net=/run/netns/{ns}"), program.to_string()];
    a.extend(args.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    run("nsenter", &a)
}

/// Polls `cond` until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Moves the calling thread into network namespace `ns`.
pub fn enter_netns(ns: &str) -> io::Result<()> {
    let f = File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns on a valid fd; CLONE_NEWNET affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside network namespace `ns` and returns its result
/// (sockets it creates stay in that namespace).
pub fn in_netns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let ns = ns.to_string();
    let h = std::thread::spawn(move || {
        enter_netns(&ns).unwrap_or_else(|e| panic!("setns into {ns}: {e}"));
        f()
    });
    h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One test's namespaces and devices; everything is removed on drop.
pub struct Topo {
    /// Prefix of every name (≤ 8 characters).
    pub prefix: String,
    pub host: String,
    pub guest: String,
    pub peer: String,
    /// The vif: host side of the guest's veth, a bridge port.
    pub vif: String,
    /// The peer's bridge port.
    pub lan: String,
    bin: PathBuf,
    children: Mutex<Vec<Child>>,
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
            host: format!("{prefix}h"),
            guest: format!("{prefix}g"),
            peer: format!("{prefix}p"),
            vif: format!("{prefix}{vif_suffix}"),
            lan: format!("{prefix}l"),
            prefix,
            bin: remus_net_bin(),
            children: Mutex::new(Vec::new()),
        };
        t.cleanup();
        t.build();
        t
    }

    fn build(&self) {
        for ns in [&self.host, &self.guest, &self.peer] {
            run("ip", &["netns", "add", ns]).ok("ip netns add");
            for s in [
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ] {
                run_in(ns, "sysctl", &["-qw", s]).ok("sysctl");
            }
            self.ip(ns, &["link", "set", "lo", "up"]);
        }
        let h = self.host.as_str();
        self.ip(
            h,
            &[
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ],
        );
        self.ip(
            h,
            &[
                "link",
                "add",
                &self.vif,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &self.guest,
            ],
        );
        self.ip(
            h,
            &[
                "link", "add", &self.lan, "type", "veth", "peer", "name", "eth0", "netns",
                &self.peer,
            ],
        );
        for d in [&self.vif, &self.lan] {
            self.ip(h, &["link", "set", d, "master", "br0"]);
            self.ip(h, &["link", "set", d, "up"]);
        }
        self.ip(h, &["link", "set", "br0", "up"]);
        for (ns, mac, ip, other_ip, other_mac) in [
            (&self.guest, GUEST_MAC, GUEST_IP, PEER_IP, PEER_MAC),
            (&self.peer, PEER_MAC, PEER_IP, GUEST_IP, GUEST_MAC),
        ] {
            self.ip(ns, &["link", "set", "eth0", "address", &mac_str(&mac)]);
            self.ip(ns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            self.ip(ns, &["link", "set", "eth0", "up"]);
            // Static neighbours: no ARP in front of test traffic (a held ARP request would
            // make the kernel queue and drop what follows).
            self.ip(
                ns,
                &[
                    "neigh",
                    "replace",
                    other_ip,
                    "lladdr",
                    &mac_str(&other_mac),
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ],
            );
        }
    }

    /// Enables IPv6 on guest and peer (static addresses without DAD, static neighbours).
    pub fn enable_ipv6(&self) {
        for (ns, ip, other_ip, other_mac) in [
            (&self.guest, GUEST_IP6, PEER_IP6, PEER_MAC),
            (&self.peer, PEER_IP6, GUEST_IP6, GUEST_MAC),
        ] {
            for s in [
                "net.ipv6.conf.eth0.accept_ra=0",
                "net.ipv6.conf.eth0.router_solicitations=0",
                "net.ipv6.conf.eth0.disable_ipv6=0",
            ] {
                run_in(ns, "sysctl", &["-qw", s]).ok("sysctl");
            }
            self.ip(
                ns,
                &["addr", "add", &format!("{ip}/64"), "dev", "eth0", "nodad"],
            );
            self.ip(
                ns,
                &[
                    "neigh",
                    "replace",
                    other_ip,
                    "lladdr",
                    &mac_str(&other_mac),
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ],
            );
        }
    }

    /// `ip -n ns args…`, which must succeed.
    pub fn ip(&self, ns: &str, args: &[&str]) {
        let mut a = vec!["-n", ns];
        a.extend_from_slice(args);
        run("ip", &a).ok(&format!("ip {a:?}"));
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

    /// The holder's pid from its state file.
    pub fn holder_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.state_file()).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
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
        for c in self
            .children
            .lock()
            .map(|mut c| mem::take(&mut *c))
            .unwrap_or_default()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.host, &self.guest, &self.peer] {
            if Path::new(&format!("/run/netns/{ns}")).exists() {
                // Processes this test started inside its own namespaces.
                let pids = run("ip", &["netns", "pids", ns]).stdout;
                for p in pids
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: as above.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                let _ = run("ip", &["netns", "del", ns]);
            }
        }
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

/// A raw AF_PACKET socket bound to one interface of the current thread's namespace.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    pub fn open(iface: &str) -> io::Result<PacketSocket> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto as i32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh socket we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(iface).map_err(io::Error::other)?;
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(io::Error::other(format!("no interface {iface}")));
        }
        // SAFETY: zeroed sockaddr_ll is valid; we fill the fields bind needs.
        let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: sll is a valid sockaddr_ll of the given length.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket { fd, ifindex })
    }

    fn setopt(&self, level: i32, opt: i32, v: i32) -> io::Result<()> {
        // SAFETY: v outlives the call; length matches.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                opt,
                &v as *const i32 as *const libc::c_void,
                4,
            )
        };
        if r != 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Sends one whole Ethernet frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: frame is valid for its length.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn ifindex(&self) -> i32 {
        self.ifindex
    }
}

/// Sends raw frames on `iface` of namespace `ns`.
pub fn send_raw(ns: &str, iface: &str, frames: Vec<Vec<u8>>) {
    let iface = iface.to_string();
    in_netns(ns, move || {
        let s =
            PacketSocket::open(&iface).unwrap_or_else(|e| panic!("packet socket on {iface}: {e}"));
        for f in &frames {
            s.send(f)
                .unwrap_or_else(|e| panic!("sending a raw frame: {e}"));
        }
    });
}

/// Sends `payloads` as UDP datagrams from namespace `ns` to `dst` (unconnected socket,
/// so ICMP errors from the peer never fail a later send).
pub fn send_udp(ns: &str, dst: std::net::SocketAddr, payloads: Vec<Vec<u8>>) {
    in_netns(ns, move || {
        let bind = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let s = std::net::UdpSocket::bind(bind).expect("udp bind");
        for p in &payloads {
            s.send_to(p, dst)
                .unwrap_or_else(|e| panic!("udp send to {dst}: {e}"));
        }
    });
}

/// One frame seen on the sniffed interface (not sent by it).
#[derive(Clone, Debug)]
pub struct Captured {
    /// The frame as delivered to packet sockets (an offloaded VLAN tag is NOT in here).
    pub data: Vec<u8>,
    /// Out-of-band VLAN tag (TPID, TCI) reported by the kernel, if any.
    pub vlan: Option<(u16, u16)>,
    pub at: Instant,
}

impl Captured {
    pub fn src_mac(&self) -> &[u8] {
        &self.data[6..12]
    }

    pub fn from_guest(&self) -> bool {
        self.data.len() >= 14 && self.src_mac() == GUEST_MAC
    }

    /// VLAN tag wherever it is (out of band or in the frame): (TPID, TCI).
    pub fn vlan_tag(&self) -> Option<(u16, u16)> {
        if self.vlan.is_some() {
            return self.vlan;
        }
        let et = u16::from_be_bytes([self.data[12], self.data[13]]);
        (et == 0x8100 || et == 0x88a8)
            .then(|| (et, u16::from_be_bytes([self.data[14], self.data[15]])))
    }

    /// Ethertype and the offset of the L3 header, after any in-band VLAN tags.
    pub fn l3(&self) -> Option<(u16, usize)> {
        let mut off = 12;
        loop {
            let et = u16::from_be_bytes([*self.data.get(off)?, *self.data.get(off + 1)?]);
            if et == 0x8100 || et == 0x88a8 {
                off += 4;
                continue;
            }
            return Some((et, off + 2));
        }
    }

    /// (IP protocol, L4 offset) of an IPv4 or IPv6 frame (no extension headers).
    pub fn l4(&self) -> Option<(u8, usize)> {
        let (et, o) = self.l3()?;
        match et {
            0x0800 => Some((
                *self.data.get(o + 9)?,
                o + ((self.data.get(o)? & 0x0f) as usize) * 4,
            )),
            0x86dd => Some((*self.data.get(o + 6)?, o + 40)),
            _ => None,
        }
    }

    /// (destination port, payload) of a UDP frame.
    pub fn udp(&self) -> Option<(u16, &[u8])> {
        let (proto, o) = self.l4()?;
        if proto != 17 {
            return None;
        }
        let port = u16::from_be_bytes([*self.data.get(o + 2)?, *self.data.get(o + 3)?]);
        Some((port, self.data.get(o + 8..)?))
    }

    /// (destination port, flags) of a TCP frame.
    pub fn tcp(&self) -> Option<(u16, u8)> {
        let (proto, o) = self.l4()?;
        if proto != 6 {
            return None;
        }
        let port = u16::from_be_bytes([*self.data.get(o + 2)?, *self.data.get(o + 3)?]);
        Some((port, *self.data.get(o + 13)?))
    }
}

/// Records frames arriving at one interface of a namespace, on its own thread, through a
/// raw AF_PACKET socket (frames the interface itself sends are skipped).
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Vec<Captured>>>,
    thread: Option<JoinHandle<()>>,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TpacketAuxdata {
    tp_status: u32,
    tp_len: u32,
    tp_snaplen: u32,
    tp_mac: u16,
    tp_net: u16,
    tp_vlan_tci: u16,
    tp_vlan_tpid: u16,
}
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;

impl Sniffer {
    /// Starts recording; returns once the socket is bound (nothing later is missed).
    pub fn start(ns: &str, iface: &str) -> Sniffer {
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (ns, iface) = (ns.to_string(), iface.to_string());
        let (stop2, frames2) = (stop.clone(), frames.clone());
        let thread = std::thread::spawn(move || {
            let sock = enter_netns(&ns)
                .map_err(|e| format!("setns {ns}: {e}"))
                .and_then(|_| {
                    PacketSocket::open(&iface).map_err(|e| format!("packet socket on {iface}: {e}"))
                })
                .and_then(|s| {
                    s.setopt(libc::SOL_PACKET, libc::PACKET_AUXDATA, 1)
                        .and_then(|_| s.setopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 64 << 20))
                        .map_err(|e| format!("setsockopt: {e}"))?;
                    let tv = libc::timeval {
                        tv_sec: 0,
                        tv_usec: 50_000,
                    };
                    // SAFETY: tv outlives the call.
                    unsafe {
                        libc::setsockopt(
                            s.fd.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_RCVTIMEO,
                            &tv as *const _ as *const libc::c_void,
                            mem::size_of::<libc::timeval>() as u32,
                        )
                    };
                    Ok(s)
                });
            let sock = match sock {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut buf = vec![0u8; 70_000];
            let mut cbuf = [0u64; 16];
            while !stop2.load(Ordering::Relaxed) {
                // SAFETY: zeroed sockaddr_ll/msghdr are valid; every pointer below
                // points at a live buffer of the stated length.
                let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
                let mut iov = libc::iovec {
                    iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                    iov_len: buf.len(),
                };
                let mut msg: libc::msghdr = unsafe { mem::zeroed() };
                msg.msg_name = &mut sll as *mut _ as *mut libc::c_void;
                msg.msg_namelen = mem::size_of::<libc::sockaddr_ll>() as u32;
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
                msg.msg_controllen = mem::size_of_val(&cbuf);
                // SAFETY: msg describes valid buffers.
                let n = unsafe { libc::recvmsg(sock.fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
                if n < 0 {
                    continue;
                }
                if sll.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                let mut vlan = None;
                // SAFETY: walking the control messages the kernel wrote into cbuf.
                unsafe {
                    let mut c = libc::CMSG_FIRSTHDR(&msg);
                    while !c.is_null() {
                        if (*c).cmsg_level == libc::SOL_PACKET
                            && (*c).cmsg_type == libc::PACKET_AUXDATA
                        {
                            let a: TpacketAuxdata = std::ptr::read_unaligned(
                                libc::CMSG_DATA(c) as *const TpacketAuxdata
                            );
                            if a.tp_status & TP_STATUS_VLAN_VALID != 0 {
                                let tpid = if a.tp_status & TP_STATUS_VLAN_TPID_VALID != 0 {
                                    a.tp_vlan_tpid
                                } else {
                                    0x8100
                                };
                                vlan = Some((tpid, a.tp_vlan_tci));
                            }
                        }
                        c = libc::CMSG_NXTHDR(&msg, c);
                    }
                }
                let len = (n as usize).min(buf.len());
                let cap = Captured {
                    data: buf[..len].to_vec(),
                    vlan,
                    at: Instant::now(),
                };
                if let Ok(mut f) = frames2.lock() {
                    f.push(cap);
                }
            }
        });
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("sniffer: {e}"),
            Err(_) => panic!("sniffer thread died"),
        }
        Sniffer {
            stop,
            frames,
            thread: Some(thread),
        }
    }

    /// A copy of every frame recorded so far.
    pub fn frames(&self) -> Vec<Captured> {
        self.frames.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// Frames recorded so far whose source is the guest.
    pub fn from_guest(&self) -> Vec<Captured> {
        self.frames()
            .into_iter()
            .filter(Captured::from_guest)
            .collect()
    }

    /// Waits until `pred` holds for the recorded frames (panics after 20 s).
    pub fn wait_for(&self, what: &str, mut pred: impl FnMut(&[Captured]) -> bool) -> Vec<Captured> {
        wait_until(what, Duration::from_secs(20), || pred(&self.frames()));
        self.frames()
    }

    pub fn clear(&self) {
        if let Ok(mut f) = self.frames.lock() {
            f.clear();
        }
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An Ethernet frame from the guest's MAC (padded to the 60-byte minimum).
pub fn eth_frame(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len().max(46));
    f.extend_from_slice(&dst);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

/// A broadcast ARP request from the guest asking for `target` (IPv4).
pub fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    p.extend_from_slice(&GUEST_MAC);
    p.extend_from_slice(&[10, 77, 0, 1]);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target);
    eth_frame([0xff; 6], 0x0806, &p)
}

/// An 802.1Q-tagged frame from the guest (tag in the frame): TPID 0x8100, `pcp`, `vid`.
pub fn vlan_frame(
    dst: [u8; 6],
    pcp: u8,
    vid: u16,
    inner_ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + payload.len());
    p.extend_from_slice(&(((pcp as u16) << 13) | (vid & 0x0fff)).to_be_bytes());
    p.extend_from_slice(&inner_ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    eth_frame(dst, 0x8100, &p)
}

/// An IPv4 + UDP packet (no Ethernet header) from 10.77.0.1 to 10.77.0.2, UDP checksum
/// 0 ("none", legal in IPv4), valid IP header checksum.
pub fn ipv4_udp(dport: u16, payload: &[u8]) -> Vec<u8> {
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 77, 0, 1, 10, 77, 0, 2,
    ];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    ip.extend_from_slice(&40000u16.to_be_bytes());
    ip.extend_from_slice(&dport.to_be_bytes());
    ip.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(payload);
    ip
}
