//! `cargo xtask bench relay`: the relay pair on loopback against a plain TCP pipe of the
//! same bytes, page compression on incremental checkpoints, and ACK latency against the
//! loopback round trip; the relay's frames are sealed (protocol version 3 always
//! encrypts), and the AEAD candidates' seal/open rates are measured beside it. Each
//! throughput round runs the plain pipe and then at once the relay pair (both fed from a
//! pipe of the default size: the relay sizes its own), so each round gives one paired
//! ratio; the table reports their median and spread (min, max), the merges the relay
//! could not avoid, and the load average before and after (the machine is shared). A
//! table on stdout and target/bench/relay.json.
//!
//! Owns: driving release builds of `remus` and the `relay_bench` and `aead_bench`
//! examples like an operator would (xl's part is played here: a pipe, the banner
//! first). Never touches: the product's internals.
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Map, Value, json};

use super::common::{self, load_average, run_json, verdict};
use crate::util;

const BANNER_LEN: usize = 54;
const FAKE_RECEIVER: &str =
    "printf 'xl migration receiver ready, send binary domain data.\\n'; exec cat > /dev/null";

#[derive(Args)]
pub struct RelayArgs {
    /// Guest pages in the throughput stream (4 KiB each; all sent in checkpoint 1).
    #[arg(long, default_value_t = 32768)]
    pages: usize,
    /// Pages dirtied per later checkpoint.
    #[arg(long, default_value_t = 2048)]
    dirty: usize,
    /// Checkpoints in the throughput stream.
    #[arg(long, default_value_t = 20)]
    checkpoints: u64,
    /// Paired rounds of each throughput case (plain, then the relay at once).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Only the ACK latency part (quick).
    #[arg(long)]
    latency_only: bool,
    /// Checkpoints for the ACK latency run (16 dirty pages each, paced).
    #[arg(long, default_value_t = 200)]
    latency_checkpoints: u64,
    /// MiB sealed and opened per AEAD candidate and frame size.
    #[arg(long, default_value_t = 128)]
    aead_mib: usize,
}

struct Paths {
    remus: PathBuf,
    helper: PathBuf,
    aead: PathBuf,
    work: PathBuf,
}

/// The relay's AEAD (`remus_user::replication::seal::ALGORITHM`, ring's implementation).
const SEALED_WITH: &str = "AES-256-GCM";

/// The captured lab stream (zstd), when the lab has committed it.
const CAPTURED: &str = "remus-user/tests/fixtures/remus-pv-stream.bin.zst";

pub fn run(a: RelayArgs) -> Result<()> {
    let target = common::build_release(&["relay_bench", "aead_bench"])?;
    let work = target.join("bench").join("relay-work");
    std::fs::create_dir_all(&work)?;
    let release = target.join("release");
    let p = Paths {
        remus: release.join("remus"),
        helper: release.join("examples").join("relay_bench"),
        aead: release.join("examples").join("aead_bench"),
        work,
    };
    let mut r = Report::default();
    let load_before = load_average();
    if !a.latency_only {
        aead_part(&p, &a, &mut r)?;
        synthetic_part(&p, &a, &mut r)?;
        captured_part(&p, &a, &mut r);
    }
    latency_part(&p, &a, &mut r)?;
    let load_after = load_average();
    r.out.insert("load_average_1m".into(), json!(load_after));
    r.out
        .insert("load_average_1m_before".into(), json!(load_before));
    common::Table {
        title: "relay benchmark (loopback, one run)",
        column: "value",
        widths: (56, 20),
    }
    .print(
        &r.rows,
        &format!(
            "(1-minute load average {load_before:.1} before, {load_after:.1} after; ratios are paired, plain then relay in each round)"
        ),
    );
    common::write_json(&target, "relay", r.out)?;
    let _ = std::fs::remove_dir_all(&p.work);
    Ok(())
}

/// What a run gathers: the table's rows and relay.json's keys.
#[derive(Default)]
struct Report {
    rows: Vec<(String, String)>,
    out: Map<String, Value>,
}

/// Part 0: the AEAD candidates on relay-sized frames (what chose the relay's cipher).
fn aead_part(p: &Paths, a: &RelayArgs, r: &mut Report) -> Result<()> {
    let aead = run_json(&p.aead, &[&a.aead_mib.to_string()])?;
    aead_rows(&aead, &mut r.rows);
    r.out.insert("aead".into(), aead);
    r.out.insert("sealed_with".into(), json!(SEALED_WITH));
    Ok(())
}

/// Part 1: the synthetic stream (stream::writer): throughput and compression.
fn synthetic_part(p: &Paths, a: &RelayArgs, r: &mut Report) -> Result<()> {
    let stream_file = p.work.join("stream.bin");
    let info = helper(
        p,
        &[
            "stream",
            path_str(&stream_file)?,
            &a.pages.to_string(),
            &a.dirty.to_string(),
            &a.checkpoints.to_string(),
        ],
    )?;
    let stream = std::fs::read(&stream_file)?;
    let _ = std::fs::remove_file(&stream_file);
    eprintln!(
        "synthetic stream: {} bytes, {} checkpoints",
        stream.len(),
        a.checkpoints
    );
    let t = throughput(p, &stream, a.checkpoints, a.repeat)?;
    t.rows("synthetic", stream.len(), &mut r.rows);
    let compression = helper(
        p,
        &[
            "compress",
            &a.pages.to_string(),
            &a.dirty.to_string(),
            "10",
            "262144",
        ],
    )?;
    compression_rows("synthetic", &compression, &mut r.rows);
    r.out.insert(
        "synthetic".into(),
        json!({ "stream": info, "throughput": t.json(), "compression": compression }),
    );
    Ok(())
}

/// Part 2: the real stream captured from `xl remus` in the lab, if present; a failure is a
/// row of the table, not the end of the run.
fn captured_part(p: &Paths, a: &RelayArgs, r: &mut Report) {
    let captured = util::root().join(CAPTURED);
    if !captured.exists() {
        eprintln!("no captured stream at {CAPTURED}: synthetic only");
        return;
    }
    let file = p.work.join("captured.bin");
    let run = || -> Result<(Value, Tput, usize)> {
        let info = helper(
            p,
            &["captured", path_str(&captured)?, path_str(&file)?, "262144"],
        )?;
        let stream = std::fs::read(&file)?;
        let _ = std::fs::remove_file(&file);
        let n = info["ends"].as_array().map_or(0, Vec::len) as u64;
        eprintln!("captured stream: {} bytes, {n} checkpoints", stream.len());
        Ok((info, throughput(p, &stream, n, a.repeat)?, stream.len()))
    };
    match run() {
        Ok((info, t, len)) => {
            t.rows("captured", len, &mut r.rows);
            compression_rows("captured", &info["compression"], &mut r.rows);
            r.out.insert(
                "captured".into(),
                json!({ "stream_bytes": len, "checkpoints": info["ends"].as_array().map(Vec::len),
                    "throughput": t.json(), "compression": info["compression"] }),
            );
        }
        Err(e) => {
            eprintln!("captured stream skipped: {e:#}");
            r.rows
                .push(("captured stream".into(), "unusable (see stderr)".into()));
        }
    }
}

/// Part 3: ACK latency: small paced checkpoints, the sender's own histogram; vs loopback RTT.
fn latency_part(p: &Paths, a: &RelayArgs, r: &mut Report) -> Result<()> {
    let lat_file = p.work.join("latency.bin");
    let lat_info = helper(
        p,
        &[
            "stream",
            path_str(&lat_file)?,
            "4096",
            "16",
            &a.latency_checkpoints.to_string(),
        ],
    )?;
    let lat_stream = std::fs::read(&lat_file)?;
    let ends: Vec<u64> = lat_info["ends"]
        .as_array()
        .context("ends")?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let lat = relay_once(p, &lat_stream, "lz4", Pace::Acked(&ends))?;
    let rtt = loopback_rtt(2000)?;
    let ack = lat.ack.context("no ACK latency measured")?;
    latency_rows(&ack, &rtt, lat.merges, &mut r.rows);
    r.out.insert(
        "ack_latency_us".into(),
        json!({
            "mean": ack.mean_us,
            "p50": ack.p50_us,
            "p90": ack.p90_us,
            "p99": ack.p99_us,
            "max": ack.max_us,
            "count": ack.count,
            "loopback_rtt_median": rtt.median_us,
            "loopback_rtt_mean": rtt.mean_us,
            "median_above_rtt": ack.p50_us - rtt.median_us,
            "target_above_rtt": 200.0,
            "merges": lat.merges,
            "phases": ack.phases.iter().map(|(n, p50, p99)| json!({"phase": n, "p50": p50, "p99": p99})).collect::<Vec<_>>(),
        }),
    );
    Ok(())
}

fn latency_rows(ack: &Ack, rtt: &Rtt, merges: u64, rows: &mut Vec<(String, String)>) {
    let above_rtt_us = ack.p50_us - rtt.median_us;
    rows.push((
        "loopback RTT (median)".into(),
        format!("{:.0} us", rtt.median_us),
    ));
    rows.push((
        "ACK latency median (p90, p99, max)".into(),
        format!(
            "{:.0} us ({:.0}, {:.0}, {:.0})",
            ack.p50_us, ack.p90_us, ack.p99_us, ack.max_us
        ),
    ));
    rows.push(("ACK latency mean".into(), format!("{:.0} us", ack.mean_us)));
    for (name, p50, p99) in &ack.phases {
        rows.push((
            format!("checkpoint phase {name} (latency run), median (p99)"),
            format!("{p50:.0} us ({p99:.0})"),
        ));
    }
    rows.push((
        "epochs merged in the latency run".into(),
        merges.to_string(),
    ));
    rows.push((
        "ACK latency median above RTT (target <= 200 us)".into(),
        format!("{above_rtt_us:.0} us {}", verdict(above_rtt_us <= 200.0)),
    ));
}

/// The throughput rounds of one stream: MB/s per round of each case, and the paired
/// ratios (relay ÷ plain of the same round).
struct Tput {
    plain: Vec<f64>,
    plain_one_page: Vec<f64>,
    none: Vec<f64>,
    lz4: Vec<f64>,
    paired: Vec<f64>,
    /// Epochs the relay merged per round (--compress none, lz4): cuts it could not prove
    /// because the writer (xl's stand-in, writing as fast as the pipe takes) was ahead.
    merges: Vec<u64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn spread(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

impl Tput {
    fn json(&self) -> Value {
        let (lo, hi) = spread(&self.paired);
        json!({
            "sealed_with": SEALED_WITH,
            "plain_tcp_pipe_default_pipe_mb_s": self.plain,
            "plain_tcp_pipe_one_page_mb_s": self.plain_one_page,
            "relay_compress_none_mb_s": self.none,
            "relay_compress_lz4_mb_s": self.lz4,
            "relay_none_over_plain_paired": self.paired,
            "relay_none_over_plain_paired_median": median(&self.paired),
            "relay_none_over_plain_paired_min": lo,
            "relay_none_over_plain_paired_max": hi,
            "relay_merges_per_round": self.merges,
            "target": 0.9,
        })
    }

    fn rows(&self, what: &str, bytes: usize, rows: &mut Vec<(String, String)>) {
        let mb = |v: &[f64]| {
            let (lo, hi) = spread(v);
            format!("{:.0} MB/s ({lo:.0}-{hi:.0})", median(v))
        };
        rows.push((
            format!("{what}: stream size"),
            format!("{:.1} MB", bytes as f64 / 1e6),
        ));
        rows.push((
            format!("{what}: plain TCP pipe, default pipe (median, min-max)"),
            mb(&self.plain),
        ));
        rows.push((
            format!("{what}: plain TCP pipe, one-page pipe (info)"),
            mb(&self.plain_one_page),
        ));
        rows.push((
            format!("{what}: relay pair, sealed, --compress none"),
            mb(&self.none),
        ));
        rows.push((
            format!("{what}: relay pair, sealed, --compress lz4"),
            mb(&self.lz4),
        ));
        let (lo, hi) = spread(&self.paired);
        let med = median(&self.paired);
        rows.push((
            format!("{what}: relay none / plain, paired (target >= 0.9)"),
            format!("{med:.2} ({lo:.2}-{hi:.2}) {}", verdict(lo >= 0.9)),
        ));
        rows.push((
            format!("{what}: epochs merged per round (writer ahead)"),
            format!("{:?}", self.merges),
        ));
    }
}

/// Throughput rounds: each runs the plain pipe and the relay (`none`) back to back, then
/// the relay with lz4 and the plain pipe shrunk to one page (for information).
fn throughput(p: &Paths, stream: &[u8], checkpoints: u64, repeat: usize) -> Result<Tput> {
    let mb = stream.len() as f64 / 1e6;
    let mut t = Tput {
        plain: vec![],
        plain_one_page: vec![],
        none: vec![],
        lz4: vec![],
        paired: vec![],
        merges: vec![],
    };
    for i in 0..repeat {
        eprintln!(
            "throughput round {}/{repeat} (load {:.1})",
            i + 1,
            load_average()
        );
        let plain = plain_pipe(stream, false)?;
        let none = relay_once(p, stream, "none", Pace::Flat(checkpoints))?;
        t.paired.push(plain / none.secs);
        t.plain.push(mb / plain);
        t.none.push(mb / none.secs);
        let lz4 = relay_once(p, stream, "lz4", Pace::Flat(checkpoints))?;
        t.lz4.push(mb / lz4.secs);
        t.merges.push(none.merges);
        t.merges.push(lz4.merges);
        t.plain_one_page.push(mb / plain_pipe(stream, true)?);
    }
    Ok(t)
}

fn compression_rows(what: &str, c: &Value, rows: &mut Vec<(String, String)>) {
    let f = |k: &str| c[k].as_f64().unwrap_or(0.0);
    rows.push((
        format!("{what}: page data XOR+lz4 ratio (incremental)"),
        format!("{:.1}x", f("ratio")),
    ));
    rows.push((
        format!("{what}: page data lz4-only ratio"),
        format!("{:.1}x", f("lz4_only_ratio")),
    ));
    rows.push((
        format!("{what}: page data encode / decode"),
        format!("{:.0} / {:.0} MB/s", f("encode_mb_s"), f("decode_mb_s")),
    ));
    if c["identical"] != true {
        rows.push((
            format!("{what}: page data round trip"),
            "NOT IDENTICAL".into(),
        ));
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

fn helper(p: &Paths, args: &[&str]) -> Result<Value> {
    run_json(&p.helper, args)
}

/// One row per AEAD candidate: seal / open MB/s on 64 KiB frames (the relay's DATA
/// frames) and on 1 MiB frames (page data).
fn aead_rows(v: &Value, rows: &mut Vec<(String, String)>) {
    let cases = &v["frame_bytes"];
    let Some(names) = cases["65536"]
        .as_object()
        .map(|o| o.keys().cloned().collect::<Vec<_>>())
    else {
        return;
    };
    for name in names {
        let f = |size: &str, k: &str| cases[size][&name][k].as_f64().unwrap_or(0.0);
        rows.push((
            format!("AEAD {name}: seal/open 64 KiB, 1 MiB"),
            format!(
                "{:.0}/{:.0}, {:.0}/{:.0} MB/s",
                f("65536", "seal_mb_s"),
                f("65536", "open_mb_s"),
                f("1048576", "seal_mb_s"),
                f("1048576", "open_mb_s")
            ),
        ));
    }
}

/// A pipe; the read end is for a child's stdin, the write end stays here (close-on-exec).
fn pipe(shrink: bool) -> Result<(OwnedFd, File)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    if shrink {
        // SAFETY: fcntl on a fresh fd.
        unsafe { libc::fcntl(fds[0], libc::F_SETPIPE_SZ, 4096) };
    }
    // SAFETY: both fds are fresh and owned here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn status(sock: &Path) -> Option<Value> {
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    serde_json::from_str(out.trim()).ok()
}

fn wait_for(sock: &Path, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    let t = Instant::now();
    loop {
        if let Some(v) = status(sock).filter(|v| pred(v)) {
            return Ok(v);
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("{} did not reach the expected state", sock.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Ack {
    /// Per-checkpoint phases (`*_recent_us` of the sender's status): name, p50, p99.
    phases: Vec<(&'static str, f64, f64)>,
    mean_us: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    max_us: f64,
    count: u64,
}

struct RelayRun {
    secs: f64,
    ack: Option<Ack>,
    /// Epochs the sender merged (cuts it could not prove).
    merges: u64,
}

/// How the stream is written into the sender's pipe.
#[derive(Clone, Copy)]
enum Pace<'a> {
    /// All at once, as fast as the pipe takes it (this many checkpoints in it).
    Flat(u64),
    /// One checkpoint (these ends) every 5 ms, like `xl remus -i 5`.
    Acked(&'a [u64]),
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One relay pair: receive --once with a sink receiver, send --no-buffer fed from a pipe
/// of the default size (the relay sizes it). Paced, it returns the sender's ACK latency.
fn relay_once(p: &Paths, stream: &[u8], codec: &str, pace: Pace) -> Result<RelayRun> {
    let key = p.work.join("key");
    std::fs::write(&key, "bench-key-0123456789abcdef")?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let rsock = p.work.join("relay-receive.sock");
    let ssock = p.work.join("relay-send.sock");
    let (_rx, addr) = start_receiver(p, &key, &rsock)?;
    let (r, mut w) = pipe(false)?;
    let mut tx = start_sender(p, codec, &addr, &key, &ssock, r)?;
    let t = Instant::now();
    let n = write_stream(&mut w, stream, pace)?;
    // Every checkpoint parsed, and acknowledged unless merged (a merged last checkpoint
    // is never acknowledged: wait until the ACKs stop coming).
    wait_for(&ssock, |v| v["last_checkpoint"].as_u64() >= Some(n))?;
    let st = settled(&ssock, n)?;
    let merges = st["epoch_merges_total"].as_u64().unwrap_or(0);
    let ack = matches!(pace, Pace::Acked(_)).then(|| ack_from_status(&st));
    drop(w);
    let code = tx.0.wait()?;
    let secs = t.elapsed().as_secs_f64();
    if !code.success() {
        bail!("relay send exited with {code}");
    }
    Ok(RelayRun { secs, ack, merges })
}

/// `relay receive --once` with a sink receiver, once it waits; it and its address.
fn start_receiver(p: &Paths, key: &Path, rsock: &Path) -> Result<(Kill, String)> {
    let rx = Kill(
        Command::new(&p.remus)
            .args([
                "relay",
                "receive",
                "--once",
                "--listen",
                "127.0.0.1:0",
                "--key-file",
            ])
            .arg(key)
            .args(["--receiver-cmd", FAKE_RECEIVER, "--status-socket"])
            .arg(rsock)
            .env("REMUS_LOG", "off")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?,
    );
    let st = wait_for(rsock, |v| v["state"] == "waiting for primary")?;
    let addr = st["address"]
        .as_str()
        .context("receiver address")?
        .to_string();
    Ok((rx, addr))
}

/// `relay send --no-buffer` reading `stdin`, once it has written xl's banner.
fn start_sender(
    p: &Paths,
    codec: &str,
    addr: &str,
    key: &Path,
    ssock: &Path,
    stdin: OwnedFd,
) -> Result<Kill> {
    let mut tx = Kill(
        Command::new(&p.remus)
            .args([
                "relay",
                "send",
                "--no-buffer",
                "--compress",
                codec,
                "--backup",
                addr,
            ])
            .arg("--key-file")
            .arg(key)
            .arg("--status-socket")
            .arg(ssock)
            .env("REMUS_LOG", "off")
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let mut banner = [0u8; BANNER_LEN];
    tx.0.stdout
        .as_mut()
        .context("sender stdout")?
        .read_exact(&mut banner)?;
    Ok(tx)
}

/// Writes the stream into the sender's pipe as `pace` says; the checkpoints written.
fn write_stream(w: &mut File, stream: &[u8], pace: Pace) -> Result<u64> {
    match pace {
        Pace::Flat(n) => {
            w.write_all(stream)?;
            Ok(n)
        }
        Pace::Acked(ends) => {
            // Paced like `xl remus -i 5`: each ACK is back long before the next
            // checkpoint. The status socket is not polled meanwhile (answering it costs
            // the sender's thread time that would show up as latency).
            let mut start = 0usize;
            for &e in ends {
                w.write_all(&stream[start..e as usize])?;
                start = e as usize;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(ends.len() as u64)
        }
    }
}

/// The sender's status once checkpoint `n` is acknowledged, or once the ACKs have
/// stopped for 200 ms after a merge (a merged checkpoint is never acknowledged).
fn settled(sock: &Path, n: u64) -> Result<Value> {
    let t = Instant::now();
    let mut last = (u64::MAX, Instant::now());
    loop {
        let v = status(sock).context("sender status")?;
        let acked = v["last_acked"].as_u64().unwrap_or(0);
        if acked >= n {
            return Ok(v);
        }
        if acked != last.0 {
            last = (acked, Instant::now());
        } else if v["epoch_merges_total"].as_u64().unwrap_or(0) > 0
            && last.1.elapsed() > Duration::from_millis(200)
        {
            return Ok(v);
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("checkpoint {n} was never acknowledged (last {acked})");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ack_from_status(st: &Value) -> Ack {
    // Exact quantiles over the sender's recent window of ACK latencies.
    let q = &st["ack_latency_recent_us"];
    let f = |k: &str| q[k].as_f64().unwrap_or(f64::NAN);
    let phases = ["pause", "transfer", "backup_write", "ack", "release"]
        .into_iter()
        .map(|p| {
            let q = &st[format!("{p}_recent_us")];
            let g = |k: &str| q[k].as_f64().unwrap_or(f64::NAN);
            (p, g("p50"), g("p99"))
        })
        .collect();
    Ack {
        phases,
        mean_us: st["ack_latency_mean_us"].as_f64().unwrap_or(f64::NAN),
        p50_us: f("p50"),
        p90_us: f("p90"),
        p99_us: f("p99"),
        max_us: f("max"),
        count: st["acks_total"].as_u64().unwrap_or(0),
    }
}

/// The same bytes through a plain TCP forwarder: pipe → TCP → `cat > /dev/null`.
fn plain_pipe(stream: &[u8], shrink: bool) -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let (r, mut w) = pipe(shrink)?;
    let receiver = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = l.accept()?;
        let mut cat = Command::new("sh")
            .args(["-c", "exec cat > /dev/null"])
            .stdin(Stdio::piped())
            .spawn()?;
        let mut stdin = cat.stdin.take().context("cat stdin")?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            stdin.write_all(&buf[..n])?;
        }
        drop(stdin);
        cat.wait()?;
        Ok(())
    });
    let forwarder = std::thread::spawn(move || -> Result<()> {
        let mut input = File::from(r);
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n])?;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    });
    let t = Instant::now();
    w.write_all(stream)?;
    drop(w);
    forwarder
        .join()
        .map_err(|_| anyhow::anyhow!("forwarder panicked"))??;
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(t.elapsed().as_secs_f64())
}

struct Rtt {
    median_us: f64,
    mean_us: f64,
}

/// Round trips of an 8-byte message over loopback TCP (nodelay), like an ACK's.
fn loopback_rtt(n: usize) -> Result<Rtt> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let echo = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 8];
        while s.read_exact(&mut b).is_ok() {
            s.write_all(&b)?;
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut v = Vec::with_capacity(n);
    let mut b = [0u8; 8];
    for i in 0..n {
        let t = Instant::now();
        s.write_all(&(i as u64).to_le_bytes())?;
        s.read_exact(&mut b)?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(s);
    let _ = echo.join();
    v.sort_by(f64::total_cmp);
    Ok(Rtt {
        median_us: v[v.len() / 2],
        mean_us: v.iter().sum::<f64>() / v.len() as f64,
    })
}
