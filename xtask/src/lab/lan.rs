//! The client side of the lab's LAN, on the machine: the counter client in the namespace
//! `remus-lab` (one TCP connection to the guest's address, whichever host runs it), its
//! TCP state, and an ARP watcher that logs every ARP frame on the client's tap (whether
//! the guest announces itself after a failover).
//!
//! Owns: the client process this lab started (`Client`), its log, stop file and stderr
//! under `target/lab/client/`, and the watcher's log there. Never touches: the namespace
//! itself (switch.rs creates and removes it) or any other process or interface.
use super::topology::{CLIENT_NETNS, CLIENT_TAP, GUEST_IP, SERVICE_PORT};
use super::{scenario::client, vm};
use anyhow::{Context, Result, bail};
use std::{
    fs,
    io::Write,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub fn dir() -> PathBuf {
    vm::run_dir().join("client")
}

/// The counter client, running in the client's namespace.
pub struct Client {
    child: Child,
    stop: PathBuf,
    pub log: PathBuf,
    stderr: PathBuf,
}

impl Client {
    /// Starts the client (`bin`, the static counter-client) for run `name`; waits up to
    /// `bound` for it to connect (its log says so), or fails with what it said.
    pub fn start(bin: &Path, name: &str, bound: Duration) -> Result<Client> {
        Client::start_to(bin, name, &format!("{GUEST_IP}:{SERVICE_PORT}"), bound)
    }

    /// As `start`, to `target` (ADDR:PORT), with its files named `client-{name}.*`
    /// (a second client: the service behind a guest's second vif).
    pub fn start_to(bin: &Path, name: &str, target: &str, bound: Duration) -> Result<Client> {
        fs::create_dir_all(dir())?;
        let p = |ext: &str| dir().join(format!("client-{name}.{ext}"));
        let (log, stop, stderr) = (p("jsonl"), p("stop"), p("stderr"));
        for f in [&log, &stop] {
            let _ = fs::remove_file(f);
        }
        let child = Command::new("ip")
            .args(["netns", "exec", CLIENT_NETNS])
            .arg(bin)
            .args(["--connect", target])
            .args(["--interval-ms", "100", "--timeout-s", "600"])
            .arg("--stop-file")
            .arg(&stop)
            .arg("--log")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr)?)
            .spawn()
            .context("starting the counter client")?;
        let mut c = Client {
            child,
            stop,
            log,
            stderr,
        };
        let t = Instant::now();
        loop {
            let ev = client::events(&c.log);
            if ev.iter().any(|e| e.event == client::Kind::Connected) {
                return Ok(c);
            }
            if c.child.try_wait()?.is_some() || t.elapsed() > bound {
                let said = fs::read_to_string(&c.log).unwrap_or_default()
                    + &fs::read_to_string(&c.stderr).unwrap_or_default();
                c.stop();
                bail!("the client did not connect to {target}: {said}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Asks the client to finish (its stop file), waits up to 10 s, then kills it.
    pub fn stop(&mut self) {
        let _ = fs::write(&self.stop, b"");
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// The client's established TCP sockets (`ss -tni`: retransmits, backoff, rto), one line.
pub fn client_tcp() -> String {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            CLIENT_NETNS,
            "ss",
            "-tni",
            "state",
            "established",
        ])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .skip(1)
                .collect::<Vec<_>>()
                .join(" ")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Logs every ARP frame seen on the client's tap as a JSON line
/// (`{"t", "op", "sender_mac", "sender_ip", "target_ip"}`) until dropped.
pub struct ArpWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ArpWatch {
    /// Starts the watcher thread in the client's namespace, writing to `log`.
    pub fn start(log: PathBuf) -> Result<ArpWatch> {
        let sock = arp_socket().context("an ARP socket on the client's tap")?;
        fs::create_dir_all(dir())?;
        let mut out =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1514];
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: recv into our buffer on our socket; it times out every 200 ms.
                let n =
                    unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if let Some(line) = usize::try_from(n).ok().and_then(|n| arp_line(&buf[..n])) {
                    let _ = writeln!(out, "{line}");
                }
            }
        });
        Ok(ArpWatch {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ArpWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A packet socket for ARP bound to the client's tap, opened inside the client's
/// namespace (on a short-lived thread that enters it, so this process stays where it is).
fn arp_socket() -> Result<OwnedFd> {
    std::thread::spawn(|| -> Result<OwnedFd> {
        let ns = fs::File::open(format!("/run/netns/{CLIENT_NETNS}"))?;
        // SAFETY: setns on this thread only, with a namespace fd we opened.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let proto = (libc::ETH_P_ARP as u16).to_be();
        // SAFETY: socket(2); the fd is wrapped at once.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if fd < 0 {
            bail!("socket(AF_PACKET): {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(CLIENT_TAP)?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("{CLIENT_TAP}: {}", std::io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain data; zeroed then filled.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = ifindex as i32;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: bind and setsockopt with correctly sized arguments on our socket.
        let ok = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&raw const sa).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) == 0
                && libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                ) == 0
        };
        if !ok {
            bail!(
                "binding the ARP socket: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(sock)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
}

/// One ARP frame (Ethernet + ARP for IPv4 over Ethernet) as a JSON line, or None.
fn arp_line(f: &[u8]) -> Option<String> {
    let a = f.get(14..42)?;
    if f.get(12..14)? != [0x08, 0x06] || a[0..6] != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    let mac = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let ip = |b: &[u8]| format!("{}.{}.{}.{}", b[0], b[1], b[2], b[3]);
    Some(
        serde_json::json!({
            "t": vm::unix_now(),
            "op": u16::from_be_bytes([a[6], a[7]]),
            "sender_mac": mac(&a[8..14]),
            "sender_ip": ip(&a[14..18]),
            "target_ip": ip(&a[24..28]),
        })
        .to_string(),
    )
}

/// A logged ARP frame.
#[derive(serde::Deserialize, Debug)]
pub struct Arp {
    pub t: f64,
    pub sender_mac: String,
    pub sender_ip: String,
    pub target_ip: String,
}

/// The ARP frames logged in `log`.
pub fn arps(log: &Path) -> Vec<Arp> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gratuitous_arp_frame_is_logged_with_its_addresses() {
        let mut f = vec![0xff; 6];
        f.extend([0x00, 0x16, 0x3e, 0x4c, 0x41, 0x42, 0x08, 0x06]);
        f.extend([0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend([0x00, 0x16, 0x3e, 0x4c, 0x41, 0x42, 169, 254, 0, 2]);
        f.extend([0, 0, 0, 0, 0, 0, 169, 254, 0, 2]);
        let line = arp_line(&f).expect("an ARP frame");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["op"], 1);
        let a: Arp = serde_json::from_str(&line).expect("json");
        assert_eq!(a.sender_mac, "00:16:3e:4c:41:42");
        assert_eq!(
            (a.sender_ip.as_str(), a.target_ip.as_str()),
            ("169.254.0.2", "169.254.0.2")
        );
        f[13] = 0x00; // IPv4, not ARP
        assert!(arp_line(&f).is_none());
        assert!(arp_line(&f[..20]).is_none());
    }
}
