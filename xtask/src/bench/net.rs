//! `cargo xtask bench net`: the eBPF output buffer (`remus-net`) measured side by side on
//! one network-namespace topology, like an operator would: the release binaries, iperf3,
//! raw packet sockets. Prints a table and writes target/bench/net.json.
//!
//! Owns: the benchmark's namespaces (`rbn*`, removed on exit, on error and on Ctrl-C; a
//! run killed hard is cleaned up by the next one), the measurements and their report.
//! Never touches: remus-user's code (it runs the built `remus-net` and speaks its
//! documented control socket only to time a commit without process start-up).
//!
//! Topology (as in the netns test tier):
//! ```text
//! rbng: eth0 10.77.0.1 ── rbnv (vif) ─ br0 (netns rbnh) ─ rbnl ── eth0 10.77.0.2 :rbnp
//! ```
//! Measured:
//! - bulk TCP guest→peer, offloads on (iperf3 -J): no buffer; attached with
//!   `--autocommit-unsafe 0` (release after every drain of the ring) and epochs of 5 and
//!   25 ms; median of the repeats, retransmits, the holder's CPU (utime+stime);
//! - 64-byte frames (106 on the wire): iperf3 -u -l 64 -b 0 received pps without and
//!   with the buffer (epoch 0), and raw AF_PACKET injection (sendmmsg from the guest,
//!   counted at the peer's rx counter) without and with the buffer;
//! - release latency: an epoch of 1k / 10k MTU frames held, commit sent on the control
//!   socket, time until the last frame is seen at the peer (kernel receive timestamps,
//!   read from a TPACKET_V3 ring so that measuring does not wake a thread per frame).
//!
//! Configurations are interleaved per repeat; a ratio is the median of the per-repeat
//! ratios against the unbuffered run of the same repeat.
use std::{
    io::{BufRead, BufReader, Write},
    mem,
    ops::Deref,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

use remus_testkit::{
    cmd::{self as kit, nsenter_args},
    frames::{GUEST_MAC, udp_frame},
    ns::enter_netns,
    packet::PacketSocket,
    topo::Lan,
};

use crate::util;

#[derive(Args)]
pub struct NetArgs {
    /// Seconds per iperf3 / injection run.
    #[arg(long, default_value_t = 4)]
    secs: u32,
    /// Runs per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Do not build first (use target/release/remus-net as it is).
    #[arg(long)]
    no_build: bool,
    /// Run only these parts (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
}

impl NetArgs {
    fn wants(&self, p: Part) -> bool {
        self.only.is_empty() || self.only.contains(&p)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// Bulk TCP.
    Tcp,
    /// 64-byte frame rate.
    Small,
    /// Release latency.
    Latency,
}

const PFX: &str = "rbn";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// A finished command (the kit's).
type Out = kit::Out;

fn sh(program: &str, args: &[&str]) -> Result<Out> {
    Ok(kit::run(program, args)?)
}

fn must(program: &str, args: &[&str]) -> Result<String> {
    Ok(kit::must(program, args)?)
}

/// The benchmark's namespaces and processes; all removed on drop.
struct Bench {
    bin: PathBuf,
    /// Where the holder logs of every attach are kept (the runtime log is removed).
    keep_log: PathBuf,
    lan: Lan,
    children: Vec<Child>,
}

impl Deref for Bench {
    type Target = Lan;
    fn deref(&self) -> &Lan {
        &self.lan
    }
}

impl Bench {
    fn new(bin: PathBuf, keep_log: PathBuf) -> Result<Bench> {
        let _ = std::fs::remove_file(&keep_log);
        let b = Bench {
            bin,
            keep_log,
            lan: Lan::named(PFX, "v"),
            children: Vec::new(),
        };
        b.cleanup();
        b.lan.build()?;
        Ok(b)
    }

    fn remus(&self, args: &[&str]) -> Result<Out> {
        let bin = self.bin.to_string_lossy().into_owned();
        Ok(kit::run_in(&self.host, &bin, args)?)
    }

    /// Attaches the buffer; returns the holder's pid.
    fn attach(&self, extra: &[&str]) -> Result<u32> {
        let mut a = vec!["attach", self.vif.as_str(), "-j"];
        a.extend_from_slice(extra);
        let o = self.remus(&a)?;
        if !o.success() {
            bail!("remus-net attach {extra:?} failed: {}", o.stderr.trim());
        }
        let v: Value = serde_json::from_str(&o.stdout).context("attach -j output")?;
        v["pid"]
            .as_u64()
            .map(|p| p as u32)
            .context("attach -j gave no pid")
    }

    fn detach(&self) -> Result<()> {
        let r = self.detach_inner();
        self.keep_holder_log();
        r
    }

    fn detach_inner(&self) -> Result<()> {
        // --release: the last frames of a finished run (iperf3's closing handshake) must
        // reach the peer, or its server stays busy with a half-closed test.
        let o = self.remus(&["detach", &self.vif, "--release"])?;
        if !o.success() {
            bail!("remus-net detach failed: {}", o.stderr.trim());
        }
        Ok(())
    }

    fn spawn_in(&mut self, ns: &str, program: &str, args: &[&str]) -> Result<()> {
        let c = Command::new("nsenter")
            .args(nsenter_args(ns, program, args))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        self.children.push(c);
        Ok(())
    }

    /// Appends the holder's runtime log to `keep_log` and empties it.
    fn keep_holder_log(&self) {
        let log = format!("/run/remus/net-{}.log", self.vif);
        if let Ok(text) = std::fs::read_to_string(&log)
            && !text.is_empty()
            && let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.keep_log)
        {
            let _ = f.write_all(text.as_bytes());
            let _ = std::fs::write(&log, "");
        }
    }

    fn socket(&self) -> PathBuf {
        PathBuf::from(format!("/run/remus/net-{}.sock", self.vif))
    }

    fn cleanup(&self) {
        if remus_testkit::ns::exists(&self.host) {
            let _ = self.remus(&["detach", &self.vif, "--drop"]);
        }
        // Processes in the benchmark's own namespaces (iperf3, a holder) go with them.
        self.lan.remove();
        self.keep_holder_log();
        for ext in ["json", "sock", "log"] {
            let _ = std::fs::remove_file(format!("/run/remus/net-{}.{ext}", self.vif));
        }
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/remus/{}", self.vif));
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.cleanup();
    }
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name: state is field 3, utime 14, stime 15.
    let rest: Vec<&str> = s
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let f = |i: usize| {
        rest.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (f(14) + f(15)) as f64 / tck
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Sends `count` copies of `frame` (0: until `until`) from the guest's eth0 with
/// sendmmsg; returns how many were sent.
fn inject(guest: String, frame: Vec<u8>, count: u64, until: Duration) -> Result<u64> {
    std::thread::spawn(move || -> Result<u64> {
        enter_netns(&guest)?;
        let sock = PacketSocket::open("eth0")?;
        let stop = || INTERRUPTED.load(Ordering::Relaxed);
        Ok(sock.send_copies(&frame, count, Instant::now() + until, stop))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("injector thread panicked"))?
    .context("raw injection from the guest")
}

fn peer_rx_packets(b: &Bench) -> Result<u64> {
    let o = must(
        "ip",
        &["-n", &b.peer, "-s", "-j", "link", "show", "dev", "eth0"],
    )?;
    let v: Value = serde_json::from_str(&o)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("rx packets of the peer")
}

/// Raw AF_PACKET injection from the guest for `secs`: (sent pps, received pps at the peer).
fn raw_inject(b: &Bench, secs: u32) -> Result<(f64, f64)> {
    let rx0 = peer_rx_packets(b)?;
    let t0 = Instant::now();
    let sent = inject(
        b.guest.clone(),
        udp_frame(64, 9),
        0,
        Duration::from_secs(secs as u64),
    )?;
    let wall = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let rx = peer_rx_packets(b)?.saturating_sub(rx0);
    Ok((sent as f64 / wall, rx as f64 / wall))
}

/// Baseline for the release latency: `n` MTU frames injected raw from the guest without
/// the buffer; ms from the first send to the last frame seen at the peer, and how many
/// arrived.
fn raw_burst(b: &Bench, n: u64, port: u16) -> Result<(f64, f64)> {
    let stamps = Stamps::start(&b.peer, port)?;
    let t0 = now_ns();
    let sent = inject(
        b.guest.clone(),
        udp_frame(1472, port),
        n,
        Duration::from_secs(30),
    )?;
    let t1 = Instant::now();
    while stamps.count.load(Ordering::Relaxed) < sent && t1.elapsed() < Duration::from_secs(2) {
        check_interrupt()?;
        std::thread::sleep(Duration::from_millis(5));
    }
    let got = stamps.count.load(Ordering::Relaxed);
    let last = stamps.last_ns.load(Ordering::Relaxed);
    Ok((last.saturating_sub(t0) as f64 / 1e6, got as f64))
}

fn iperf(b: &Bench, args: &[&str]) -> Result<Value> {
    let mut a = vec!["-c", "10.77.0.2", "-J"];
    a.extend_from_slice(args);
    let argv = nsenter_args(&b.guest, "iperf3", &a);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    loop {
        let o = sh("nsenter", &argv)?;
        check_interrupt()?;
        let v: Value = serde_json::from_str(&o.stdout)
            .with_context(|| format!("iperf3 -J output: {} {}", o.stdout, o.stderr))?;
        match v["error"].as_str() {
            // The server is still closing the previous test.
            Some(e) if e.contains("busy") && t0.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(500));
            }
            Some(e) => bail!("iperf3 {args:?}: {e}"),
            None => return Ok(v),
        }
    }
}

/// (Gbit/s received, retransmits).
fn iperf_tcp(b: &Bench, secs: u32) -> Result<(f64, u64)> {
    let v = iperf(b, &["-t", &secs.to_string()])?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 TCP result")?;
    Ok((
        bps / 1e9,
        v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    ))
}

/// (sent pps, received pps) of 64-byte UDP datagrams.
fn iperf_udp64(b: &Bench, secs: u32) -> Result<(f64, f64)> {
    let v = iperf(b, &["-u", "-l", "64", "-b", "0", "-t", &secs.to_string()])?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 UDP: {e}");
    }
    let (rs, ss) = (&v["end"]["sum_received"], &v["end"]["sum_sent"]);
    let recv_bytes = rs["bytes"]
        .as_f64()
        .with_context(|| format!("iperf3 UDP result: {}", v["end"]))?;
    let rsecs = rs["seconds"]
        .as_f64()
        .filter(|s| *s > 0.0)
        .unwrap_or(secs as f64);
    let sent = ss["packets"].as_f64().unwrap_or(0.0);
    let ssecs = ss["seconds"]
        .as_f64()
        .filter(|s| *s > 0.0)
        .unwrap_or(secs as f64);
    Ok((sent / ssecs, recv_bytes / 64.0 / rsecs))
}

/// One configuration's repeated results.
#[derive(Default)]
struct Series {
    vals: Vec<f64>,
    extra: Vec<f64>,
    cpu: f64,
    wall: f64,
}

impl Series {
    fn med(&self) -> f64 {
        median(&mut self.vals.clone())
    }
    fn med_extra(&self) -> f64 {
        median(&mut self.extra.clone())
    }
    fn cpu_pct(&self) -> Option<f64> {
        (self.wall > 0.0).then(|| self.cpu / self.wall * 100.0)
    }
    /// Median of the per-repeat ratios to `base`: each pair ran back to back, so a drift
    /// of the shared machine's speed between repeats cancels out of every ratio.
    fn paired_ratio(&self, base: &Series) -> f64 {
        let mut r: Vec<f64> = self
            .vals
            .iter()
            .zip(&base.vals)
            .filter(|(_, b)| **b > 0.0)
            .map(|(v, b)| v / b)
            .collect();
        median(&mut r)
    }
}

/// The 1-minute load average, recorded next to the numbers it disturbs.
fn load_average() -> f64 {
    let mut load = [0f64; 3];
    // SAFETY: getloadavg writes at most 3 doubles into the array.
    unsafe { libc::getloadavg(load.as_mut_ptr(), 3) };
    load[0]
}

/// Runs `f` once under configuration `attach` (None: no buffer), adding the holder's CPU.
fn with_config(
    b: &Bench,
    attach: Option<&[&str]>,
    s: &mut Series,
    f: impl FnOnce() -> Result<(f64, f64)>,
) -> Result<()> {
    check_interrupt()?;
    let pid = match attach {
        Some(a) => Some(b.attach(a)?),
        None => None,
    };
    let c0 = pid.map(cpu_secs).unwrap_or(0.0);
    let t0 = Instant::now();
    let r = f();
    if let Some(p) = pid {
        s.cpu += cpu_secs(p) - c0;
        s.wall += t0.elapsed().as_secs_f64();
        b.detach()?;
    }
    let (v, e) = r?;
    s.vals.push(v);
    s.extra.push(e);
    Ok(())
}

/// Control-socket client (one JSON request per line).
struct Ctl {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Ctl {
    fn connect(path: &Path) -> Result<Ctl> {
        let s = UnixStream::connect(path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        Ok(Ctl {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }
    fn ask(&mut self, req: Value) -> Result<Value> {
        let mut line = req.to_string();
        line.push('\n');
        self.w.write_all(line.as_bytes())?;
        let mut resp = String::new();
        self.r.read_line(&mut resp)?;
        let v: Value = serde_json::from_str(&resp).context("control socket answer")?;
        if v["result"] == "error" {
            bail!("holder answered: {}", v["message"]);
        }
        Ok(v)
    }
}

/// Records kernel receive timestamps of UDP frames to `port` at the peer.
///
/// It reads a `TPACKET_V3` receive ring: the kernel stores each frame with its receive
/// time in blocks and wakes the reader once per block (full, or 1 ms old), not once per
/// frame. A per-frame wake-up is a cross-CPU IPI, a VM exit on this host; with a plain
/// packet socket the measuring socket's wake-ups were the largest single cost inside
/// the path being measured (perf: `packet_rcv` → `sock_def_readable`).
struct Stamps {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    last_ns: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const RING_BLOCK: usize = 4 << 20;
const RING_BLOCKS: usize = 8;

/// A mapped `TPACKET_V3` receive ring on a bound packet socket.
struct RxRing {
    sock: PacketSocket,
    map: *mut u8,
}

impl RxRing {
    fn open(iface: &str) -> Result<RxRing> {
        let sock = PacketSocket::open(iface)?;
        let version = libc::tpacket_versions::TPACKET_V3 as i32;
        sock.setopt(libc::SOL_PACKET, libc::PACKET_VERSION, &version)?;
        let req = libc::tpacket_req3 {
            tp_block_size: RING_BLOCK as u32,
            tp_block_nr: RING_BLOCKS as u32,
            tp_frame_size: 2048,
            tp_frame_nr: (RING_BLOCK * RING_BLOCKS / 2048) as u32,
            tp_retire_blk_tov: 1,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        sock.setopt(libc::SOL_PACKET, libc::PACKET_RX_RING, &req)?;
        // SAFETY: mapping the ring the kernel just allocated for this socket.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RING_BLOCK * RING_BLOCKS,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                sock.raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping the TPACKET_V3 ring");
        }
        Ok(RxRing {
            sock,
            map: map as *mut u8,
        })
    }

    /// Calls `f(frame, receive time in ns)` for every frame of block `i` if the kernel
    /// has handed it to us, gives the block back and returns true; false if not ready.
    fn take_block(&self, i: usize, mut f: impl FnMut(&[u8], u64)) -> bool {
        // SAFETY: block i lies inside the mapping; the kernel hands a block over by
        // setting TP_STATUS_USER in its status word and does not touch it again until
        // we store TP_STATUS_KERNEL; frames lie inside their block (offsets from the
        // kernel, bounded by the block size).
        unsafe {
            let bd = self.map.add(i * RING_BLOCK) as *mut libc::tpacket_block_desc;
            let status = std::ptr::addr_of_mut!((*bd).hdr.bh1.block_status);
            if std::ptr::read_volatile(status) & libc::TP_STATUS_USER == 0 {
                return false;
            }
            std::sync::atomic::fence(Ordering::Acquire);
            let n = (*bd).hdr.bh1.num_pkts;
            let mut off = (*bd).hdr.bh1.offset_to_first_pkt as usize;
            for _ in 0..n {
                if off + mem::size_of::<libc::tpacket3_hdr>() > RING_BLOCK {
                    break;
                }
                let h = (bd as *const u8).add(off) as *const libc::tpacket3_hdr;
                let start = off + (*h).tp_mac as usize;
                let len = (*h).tp_snaplen as usize;
                if start + len <= RING_BLOCK {
                    let frame = std::slice::from_raw_parts((bd as *const u8).add(start), len);
                    f(
                        frame,
                        (*h).tp_sec as u64 * 1_000_000_000 + (*h).tp_nsec as u64,
                    );
                }
                if (*h).tp_next_offset == 0 {
                    break;
                }
                off += (*h).tp_next_offset as usize;
            }
            std::sync::atomic::fence(Ordering::Release);
            std::ptr::write_volatile(status, libc::TP_STATUS_KERNEL);
        }
        true
    }

    /// Waits up to `ms` for the kernel to hand over a block.
    fn wait(&self, ms: i32) {
        let mut p = libc::pollfd {
            fd: self.sock.raw_fd(),
            events: libc::POLLIN | libc::POLLERR,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, ms) };
    }
}

impl Drop for RxRing {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what open() mapped.
        unsafe { libc::munmap(self.map as *mut libc::c_void, RING_BLOCK * RING_BLOCKS) };
    }
}

impl Stamps {
    fn start(ns: &str, port: u16) -> Result<Stamps> {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let last_ns = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        let (ns, s2, c2, l2) = (ns.to_string(), stop.clone(), count.clone(), last_ns.clone());
        let thread = std::thread::spawn(move || {
            // The UDP socket nobody reads is the frames' sink: without a listener the
            // peer would answer every frame with an ICMP port-unreachable, work a LAN
            // peer would do on its own CPU, not on the host being measured.
            let opened = (|| -> Result<_> {
                enter_netns(&ns)?;
                Ok((
                    RxRing::open("eth0")?,
                    std::net::UdpSocket::bind(("10.77.0.2", port))?,
                ))
            })();
            let (ring, _sink) = match opened {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(()));
            let mut block = 0;
            while !s2.load(Ordering::Relaxed) {
                let took = ring.take_block(block, |f, t| {
                    let is_ours = f.len() >= 42
                        && f[6..12] == GUEST_MAC
                        && f[12..14] == [0x08, 0x00]
                        && f[23] == 17
                        && u16::from_be_bytes([f[36], f[37]]) == port;
                    if is_ours {
                        l2.fetch_max(t, Ordering::Relaxed);
                        c2.fetch_add(1, Ordering::Relaxed);
                    }
                });
                if took {
                    block = (block + 1) % RING_BLOCKS;
                } else {
                    ring.wait(50);
                }
            }
        });
        rx.recv()
            .context("timestamp thread")?
            .context("peer capture ring")?;
        Ok(Stamps {
            stop,
            count,
            last_ns,
            thread: Some(thread),
        })
    }
}

impl Drop for Stamps {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Holds an epoch of `n` MTU frames, commits it on the control socket, and returns
/// (ms from commit sent to the last frame seen at the peer, ms until the commit answer).
fn release_latency(b: &Bench, n: u64, port: u16) -> Result<(f64, f64)> {
    b.attach(&[])?;
    let stamps = Stamps::start(&b.peer, port)?;
    let guest = b.guest.clone();
    std::thread::spawn(move || -> Result<()> {
        enter_netns(&guest)?;
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        let payload = vec![0x5au8; 1472];
        for _ in 0..n {
            s.send_to(&payload, ("10.77.0.2", port))?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let mut ctl = Ctl::connect(&b.socket())?;
    let t0 = Instant::now();
    loop {
        check_interrupt()?;
        let st = ctl.ask(json!({"op": "status"}))?;
        let held = st["held_frames"].as_u64().unwrap_or(0);
        if held >= n {
            break;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("only {held} of {n} frames held after 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let e = ctl.ask(json!({"op": "checkpoint"}))?["epoch"]
        .as_u64()
        .context("checkpoint answer")?;
    if stamps.count.load(Ordering::Relaxed) != 0 {
        bail!("held frames reached the peer before the commit");
    }
    let sent_ns = now_ns();
    let sent = Instant::now();
    let r = ctl.ask(json!({"op": "commit", "epoch": e}))?;
    let answer_ms = sent.elapsed().as_secs_f64() * 1e3;
    if r["frames"].as_u64() != Some(n) {
        bail!("commit released {r} instead of {n} frames");
    }
    let t1 = Instant::now();
    while stamps.count.load(Ordering::Relaxed) < n {
        check_interrupt()?;
        if t1.elapsed() > Duration::from_secs(10) {
            bail!(
                "only {} of {n} released frames reached the peer",
                stamps.count.load(Ordering::Relaxed)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let last = stamps.last_ns.load(Ordering::Relaxed);
    drop(stamps);
    drop(ctl);
    b.detach()?;
    Ok((last.saturating_sub(sent_ns) as f64 / 1e6, answer_ms))
}

/// Bulk TCP configurations: name, `remus-net attach` options (None: no buffer).
const TCP_CFGS: [(&str, Option<&[&str]>); 4] = [
    ("no buffer", None),
    (
        "epoch 0 (commit after every drain)",
        Some(&["--autocommit-unsafe", "0"]),
    ),
    ("epoch 5 ms", Some(&["--autocommit-unsafe", "5"])),
    ("epoch 25 ms", Some(&["--autocommit-unsafe", "25"])),
];

/// 64-byte configurations: name, attach options, raw injection (else iperf3 UDP).
const SMALL_CFGS: [(&str, Option<&[&str]>, bool); 4] = [
    ("iperf3 UDP 64 B, no buffer", None, false),
    (
        "iperf3 UDP 64 B, hold+release (epoch 0)",
        Some(&["--autocommit-unsafe", "0"]),
        false,
    ),
    ("raw AF_PACKET injection, no buffer", None, true),
    (
        "raw AF_PACKET injection, hold+release (epoch 0)",
        Some(&["--autocommit-unsafe", "0"]),
        true,
    ),
];

/// Checks the tools, builds unless told not to; the release binary and the target dir.
fn prepare(a: &NetArgs) -> Result<(PathBuf, PathBuf)> {
    if !util::is_root() {
        bail!("bench net needs root: it creates network namespaces and attaches BPF programs");
    }
    for tool in ["iperf3", "nsenter", "ip"] {
        if !kit::have(tool) {
            bail!("{tool} is not installed (cargo xtask deps installs it)");
        }
    }
    if !a.no_build {
        util::run(util::cmd("cargo").args(["build", "--release", "-p", "remus-user", "--bins"]))?;
    }
    let target = remus_testkit::bins::target_dir();
    let bin = target.join("release/remus-net");
    if !bin.exists() {
        bail!(
            "{} is missing (cargo build --release -p remus-user --bins)",
            bin.display()
        );
    }
    Ok((bin, target))
}

/// Bulk TCP, every configuration once per repeat.
fn measure_tcp(b: &Bench, a: &NetArgs) -> Result<Vec<Series>> {
    eprintln!(
        "bench net: TCP bulk, offloads on ({} s x {})",
        a.secs, a.repeats
    );
    let mut tcp: Vec<Series> = TCP_CFGS.iter().map(|_| Series::default()).collect();
    for _ in 0..a.repeats * a.wants(Part::Tcp) as usize {
        for (i, (_, cfg)) in TCP_CFGS.iter().enumerate() {
            with_config(b, *cfg, &mut tcp[i], || {
                iperf_tcp(b, a.secs).map(|(g, r)| (g, r as f64))
            })?;
        }
    }
    Ok(tcp)
}

/// 64-byte frame rates, every configuration once per repeat.
fn measure_small(b: &Bench, a: &NetArgs) -> Result<Vec<Series>> {
    eprintln!("bench net: 64-byte frames");
    let mut small: Vec<Series> = SMALL_CFGS.iter().map(|_| Series::default()).collect();
    for _ in 0..a.repeats * a.wants(Part::Small) as usize {
        for (i, (_, cfg, raw)) in SMALL_CFGS.iter().enumerate() {
            with_config(b, *cfg, &mut small[i], || {
                // Series value: received pps; extra: sent pps.
                let (s, r) = if *raw {
                    raw_inject(b, a.secs)?
                } else {
                    iperf_udp64(b, a.secs)?
                };
                Ok((r, s))
            })?;
        }
    }
    Ok(small)
}

/// Release latency with the buffer and the raw-burst baseline, 1k and 10k frames.
type Latencies = (Vec<(u64, Series)>, Vec<(u64, Series)>);

fn measure_latency(b: &Bench, a: &NetArgs) -> Result<Latencies> {
    eprintln!("bench net: release latency");
    let mut lat: Vec<(u64, Series)> = vec![(1000, Series::default()), (10_000, Series::default())];
    let mut burst: Vec<(u64, Series)> =
        vec![(1000, Series::default()), (10_000, Series::default())];
    for _ in 0..a.repeats * a.wants(Part::Latency) as usize {
        for ((n, s), (_, raw)) in lat.iter_mut().zip(burst.iter_mut()) {
            check_interrupt()?;
            let (ms, answer) = release_latency(b, *n, 5999)?;
            s.vals.push(ms);
            s.extra.push(answer);
            let (ms, got) = raw_burst(b, *n, 5998)?;
            raw.vals.push(ms);
            raw.extra.push(got);
        }
    }
    Ok((lat, burst))
}

fn cpu_cell(s: &Series) -> String {
    s.cpu_pct()
        .map(|c| format!("{c:.0}%"))
        .unwrap_or_else(|| "–".into())
}

fn report_tcp(tcp: &[Series], rows: &mut Vec<Value>) {
    for (i, (name, _)) in TCP_CFGS.iter().enumerate() {
        let s = &tcp[i];
        if s.vals.is_empty() {
            continue;
        }
        let runs: Vec<String> = s.vals.iter().map(|v| format!("{v:.2}")).collect();
        println!(
            "| TCP, {name} | {:.2} Gbit/s (retr {:.0}) | {} | {:.2} of no buffer | {} |",
            s.med(),
            s.med_extra(),
            runs.join(" / "),
            s.paired_ratio(&tcp[0]),
            cpu_cell(s)
        );
        rows.push(
            json!({"kind": "tcp", "config": name, "gbps_median": s.med(), "gbps_runs": s.vals,
            "retransmits_median": s.med_extra(), "ratio_to_no_buffer": s.paired_ratio(&tcp[0]),
            "ratio_of_medians": s.med() / tcp[0].med(), "holder_cpu_pct": s.cpu_pct()}),
        );
    }
}

fn report_small(small: &[Series], rows: &mut Vec<Value>) {
    for (i, (name, _, _)) in SMALL_CFGS.iter().enumerate() {
        let s = &small[i];
        if s.vals.is_empty() {
            continue;
        }
        let runs: Vec<String> = s.vals.iter().map(|v| format!("{:.0}k", v / 1e3)).collect();
        println!(
            "| {name} | {:.0}k pps recv (sent {:.0}k) | {} | {:.2} of raw injection | {} |",
            s.med() / 1e3,
            s.med_extra() / 1e3,
            runs.join(" / "),
            s.paired_ratio(&small[2]),
            cpu_cell(s)
        );
        rows.push(json!({"kind": "small_frames", "config": name, "recv_pps_median": s.med(), "recv_pps_runs": s.vals,
            "sent_pps_median": s.med_extra(), "ratio_to_raw_injection": s.paired_ratio(&small[2]),
            "ratio_of_medians": s.med() / small[2].med(), "holder_cpu_pct": s.cpu_pct()}));
    }
}

/// One table row and one JSON row per frame count: `what(n, s)` is the row's first two
/// cells, `extra` names the JSON field of the series' second value.
fn report_ms(
    list: &[(u64, Series)],
    kind: &str,
    extra: &str,
    what: impl Fn(u64, &Series) -> String,
    rows: &mut Vec<Value>,
) {
    for (n, s) in list.iter().filter(|(_, s)| !s.vals.is_empty()) {
        let runs: Vec<String> = s.vals.iter().map(|v| format!("{v:.2}")).collect();
        println!("| {} | {} | – | – |", what(*n, s), runs.join(" / "));
        let mut row = json!({"kind": kind, "frames": n, "ms_median": s.med(), "ms_runs": s.vals});
        row[extra] = json!(s.med_extra());
        rows.push(row);
    }
}

fn report_latency((lat, burst): &Latencies, rows: &mut Vec<Value>) {
    report_ms(
        lat,
        "release_latency",
        "commit_answer_ms_median",
        |n, s| {
            format!(
                "release latency, {n} MTU frames | {:.2} ms to the last frame (commit answered in {:.2} ms)",
                s.med(),
                s.med_extra()
            )
        },
        rows,
    );
    report_ms(
        burst,
        "raw_burst_baseline",
        "arrived_median",
        |n, s| {
            format!(
                "baseline: {n} MTU frames injected raw, no buffer | {:.2} ms first send to last frame ({:.0} arrived)",
                s.med(),
                s.med_extra()
            )
        },
        rows,
    );
}

/// Prints the targets (reported, never asserted); returns them for the JSON.
fn report_targets(tcp: &[Series], small: &[Series], lat: &[(u64, Series)], load: f64) -> Value {
    let e0 = tcp[1].paired_ratio(&tcp[0]);
    let l10k = lat[1].1.med();
    // Same load generator with and without the buffer: raw injection through
    // capture + hold + release vs raw injection alone.
    let hr = small[3].paired_ratio(&small[2]);
    let verdict = |v: f64, ok: bool| {
        if v.is_nan() {
            "not measured"
        } else if ok {
            "met"
        } else {
            "NOT met"
        }
    };
    println!();
    println!(
        "ratios: median of per-repeat ratios, each pair measured back to back; \
         load average (1 min) at the end: {load:.2}"
    );
    println!("targets (reported, not asserted):");
    println!(
        "  epoch-0 TCP >= 0.9 of no buffer: {e0:.2} {}",
        verdict(e0, e0 >= 0.9)
    );
    println!(
        "  10k MTU frames released <= 5 ms after commit: {l10k:.2} ms {}",
        verdict(l10k, l10k <= 5.0)
    );
    println!(
        "  64-byte hold+release >= 0.8 of raw injection: {hr:.2} {}",
        verdict(hr, hr >= 0.8)
    );
    json!({"epoch0_tcp_ratio": e0, "release_10k_ms": l10k, "small_frames_ratio_to_raw": hr})
}

pub fn run(a: NetArgs) -> Result<()> {
    let (bin, target) = prepare(&a)?;
    // Ctrl-C / SIGTERM: stop at the next step and clean up through Drop.
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut b = Bench::new(bin.clone(), dir.join("net-holder.log"))?;
    let peer = b.peer.clone();
    b.spawn_in(&peer, "iperf3", &["-s", "-B", "10.77.0.2"])?;
    std::thread::sleep(Duration::from_millis(500));
    let tcp = measure_tcp(&b, &a)?;
    let small = measure_small(&b, &a)?;
    let lat = measure_latency(&b, &a)?;
    drop(b);

    // Report. Ratios are paired (see Series::paired_ratio).
    let load = load_average();
    let mut rows = Vec::new();
    println!();
    println!("| measurement | median | runs | ratio | holder CPU (% of one core) |");
    println!("|---|---|---|---|---|");
    report_tcp(&tcp, &mut rows);
    report_small(&small, &mut rows);
    report_latency(&lat, &mut rows);
    let targets = report_targets(&tcp, &small, &lat.0, load);
    let out = json!({
        "bench": "net",
        "unix_time": now_ns() / 1_000_000_000,
        "secs_per_run": a.secs,
        "repeats": a.repeats,
        "kernel": must("uname", &["-r"]).unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "load_average_1m": load,
        "binary": bin.display().to_string(),
        "rows": rows,
        "targets": targets,
    });
    let path = dir.join("net.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\nwrote {}", path.display());
    Ok(())
}
