//! `cargo xtask bench relay`: the relay pair on loopback against a plain TCP pipe of the
//! same bytes, page compression on incremental checkpoints, and ACK latency against the
//! loopback round trip; the relay's frames are sealed (protocol version 3 always
//! encrypts), and the AEAD candidates' seal/open rates are measured beside it. One run,
//! measured side by side; a table on stdout and target/bench/relay.json.
//!
//! Owns: driving release builds of `remus` and the `relay_bench` and `aead_bench`
//! examples like an operator would (xl's part is played here: a pipe shrunk by the relay,
//! the banner first). Never touches: the product's internals.
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

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
    /// Repetitions of each throughput case (the best is kept).
    #[arg(long, default_value_t = 3)]
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
    util::run(util::cmd("cargo").args([
        "build",
        "--release",
        "-p",
        "remus-user",
        "--bin",
        "remus",
        "--example",
        "relay_bench",
        "--example",
        "aead_bench",
    ]))?;
    let target = util::root().join("target");
    let work = target.join("bench").join("relay-work");
    std::fs::create_dir_all(&work)?;
    let p = Paths {
        remus: target.join("release").join("remus"),
        helper: target.join("release").join("examples").join("relay_bench"),
        aead: target.join("release").join("examples").join("aead_bench"),
        work,
    };
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut out = serde_json::Map::new();

    if !a.latency_only {
        // 0. The AEAD candidates on relay-sized frames (what chose the relay's cipher).
        let aead = run_json(&p.aead, &[&a.aead_mib.to_string()])?;
        aead_rows(&aead, &mut rows);
        out.insert("aead".into(), aead);
        out.insert("sealed_with".into(), json!(SEALED_WITH));

        // 1. Synthetic stream (stream::writer): throughput and compression.
        let stream_file = p.work.join("stream.bin");
        let info = helper(
            &p,
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
        let t = throughput(&p, &stream, a.repeat)?;
        t.rows("synthetic", stream.len(), &mut rows);
        out.insert(
            "synthetic".into(),
            json!({ "stream": info, "throughput": t.json(), "compression":
        helper(&p, &["compress", &a.pages.to_string(), &a.dirty.to_string(), "10", "262144"])? }),
        );
        compression_rows("synthetic", &out["synthetic"]["compression"], &mut rows);
        drop(stream);

        // 2. The real stream captured from `xl remus` in the lab, if present.
        let captured = util::root().join(CAPTURED);
        if captured.exists() {
            let file = p.work.join("captured.bin");
            let run = || -> Result<(Value, Tput, usize)> {
                let info = helper(
                    &p,
                    &["captured", path_str(&captured)?, path_str(&file)?, "262144"],
                )?;
                let stream = std::fs::read(&file)?;
                let _ = std::fs::remove_file(&file);
                eprintln!("captured stream: {} bytes", stream.len());
                Ok((info, throughput(&p, &stream, a.repeat)?, stream.len()))
            };
            match run() {
                Ok((info, t, len)) => {
                    t.rows("captured", len, &mut rows);
                    compression_rows("captured", &info["compression"], &mut rows);
                    out.insert(
                    "captured".into(),
                    json!({ "stream_bytes": len, "checkpoints": info["ends"].as_array().map(Vec::len),
                        "throughput": t.json(), "compression": info["compression"] }),
                );
                }
                Err(e) => {
                    eprintln!("captured stream skipped: {e:#}");
                    rows.push(("captured stream".into(), "unusable (see stderr)".into()));
                }
            }
        } else {
            eprintln!("no captured stream at {CAPTURED}: synthetic only");
        }
    }

    // 3. ACK latency: small paced checkpoints, the sender's own histogram; vs loopback RTT.
    let lat_file = p.work.join("latency.bin");
    let lat_info = helper(
        &p,
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
    let lat = relay_once(&p, &lat_stream, "lz4", Some(&ends))?;
    let rtt = loopback_rtt(2000)?;
    let ack = lat.ack.context("no ACK latency measured")?;
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
    rows.push((
        "ACK latency median above RTT (target <= 200 us)".into(),
        format!("{above_rtt_us:.0} us {}", verdict(above_rtt_us <= 200.0)),
    ));
    out.insert(
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
            "median_above_rtt": above_rtt_us,
            "target_above_rtt": 200.0,
        }),
    );
    // SAFETY: getloadavg writes at most 3 doubles.
    let mut load = [0f64; 3];
    unsafe { libc::getloadavg(load.as_mut_ptr(), 3) };
    out.insert("load_average_1m".into(), json!(load[0]));

    println!();
    println!(
        "{:<56} {:>20}",
        "relay benchmark (loopback, one run)", "value"
    );
    println!("{}", "-".repeat(77));
    for (k, v) in &rows {
        println!("{k:<56} {v:>20}");
    }
    println!(
        "(1-minute load average during the run: {:.1}; ratios are side by side)",
        load[0]
    );
    let json_path = target.join("bench").join("relay.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&Value::Object(out))?,
    )?;
    println!("wrote {}", json_path.display());
    let _ = std::fs::remove_dir_all(&p.work);
    Ok(())
}

/// Best-of-N MB/s of each case.
struct Tput {
    plain: f64,
    plain_big: f64,
    none: f64,
    lz4: f64,
    /// Median over the rounds of relay none ÷ plain, each pair run back to back (steadier
    /// than the ratio of the bests on a loaded machine).
    paired: f64,
}

impl Tput {
    fn json(&self) -> Value {
        json!({
            "sealed_with": SEALED_WITH,
            "plain_tcp_pipe_one_page_mb_s": self.plain,
            "plain_tcp_pipe_default_pipe_mb_s": self.plain_big,
            "relay_compress_none_mb_s": self.none,
            "relay_compress_lz4_mb_s": self.lz4,
            "relay_none_over_plain": self.none / self.plain,
            "relay_none_over_plain_paired_median": self.paired,
            "target": 0.9,
        })
    }

    fn rows(&self, what: &str, bytes: usize, rows: &mut Vec<(String, String)>) {
        let r = self.none / self.plain;
        rows.push((
            format!("{what}: stream size"),
            format!("{:.1} MB", bytes as f64 / 1e6),
        ));
        rows.push((
            format!("{what}: plain TCP pipe, one-page stdin"),
            format!("{:.0} MB/s", self.plain),
        ));
        rows.push((
            format!("{what}: plain TCP pipe, default stdin (info)"),
            format!("{:.0} MB/s", self.plain_big),
        ));
        rows.push((
            format!("{what}: relay pair, sealed, --compress none"),
            format!("{:.0} MB/s", self.none),
        ));
        rows.push((
            format!("{what}: relay pair, sealed, --compress lz4"),
            format!("{:.0} MB/s", self.lz4),
        ));
        rows.push((
            format!("{what}: relay sealed none / plain (target >= 0.9)"),
            format!("{r:.2} {}", verdict(r >= 0.9)),
        ));
        rows.push((
            format!("{what}: same, median of paired rounds"),
            format!("{:.2} {}", self.paired, verdict(self.paired >= 0.9)),
        ));
    }
}

/// Throughput cases, interleaved so machine noise hits all of them alike.
fn throughput(p: &Paths, stream: &[u8], repeat: usize) -> Result<Tput> {
    let mut best = [f64::MAX; 4];
    let mut paired = Vec::with_capacity(repeat);
    for i in 0..repeat {
        eprintln!("throughput round {}/{repeat}", i + 1);
        let plain = plain_pipe(stream, true)?;
        let none = relay_once(p, stream, "none", None)?.secs;
        paired.push(plain / none);
        best[0] = best[0].min(plain);
        best[1] = best[1].min(none);
        best[2] = best[2].min(relay_once(p, stream, "lz4", None)?.secs);
        best[3] = best[3].min(plain_pipe(stream, false)?);
    }
    paired.sort_by(f64::total_cmp);
    let mb = stream.len() as f64 / 1e6;
    let [plain, none, lz4, plain_big] = best.map(|s| mb / s);
    Ok(Tput {
        plain,
        plain_big,
        none,
        lz4,
        paired: paired.get(paired.len() / 2).copied().unwrap_or(f64::NAN),
    })
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

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISS" }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

fn helper(p: &Paths, args: &[&str]) -> Result<Value> {
    run_json(&p.helper, args)
}

/// Runs an example that prints one line of JSON.
fn run_json(bin: &Path, args: &[&str]) -> Result<Value> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {args:?} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
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
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One relay pair: receive --once with a sink receiver, send --no-buffer fed from a pipe.
/// With `paced` (checkpoint ends), writes one checkpoint at a time and lets its ACK come
/// back before the next; returns the sender's ACK latency then.
fn relay_once(p: &Paths, stream: &[u8], codec: &str, paced: Option<&[u64]>) -> Result<RelayRun> {
    let key = p.work.join("key");
    std::fs::write(&key, "bench-key-0123456789abcdef")?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let rsock = p.work.join("relay-receive.sock");
    let ssock = p.work.join("relay-send.sock");
    let _rx = Kill(
        Command::new(&p.remus)
            .args([
                "relay",
                "receive",
                "--once",
                "--listen",
                "127.0.0.1:0",
                "--key-file",
            ])
            .arg(&key)
            .args(["--receiver-cmd", FAKE_RECEIVER, "--status-socket"])
            .arg(&rsock)
            .env("REMUS_LOG", "off")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?,
    );
    let st = wait_for(&rsock, |v| v["state"] == "waiting for primary")?;
    let addr = st["address"]
        .as_str()
        .context("receiver address")?
        .to_string();
    let (r, mut w) = pipe(false)?;
    let mut tx = Kill(
        Command::new(&p.remus)
            .args([
                "relay",
                "send",
                "--no-buffer",
                "--compress",
                codec,
                "--backup",
                &addr,
            ])
            .arg("--key-file")
            .arg(&key)
            .arg("--status-socket")
            .arg(&ssock)
            .env("REMUS_LOG", "off")
            .stdin(Stdio::from(r))
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let mut banner = [0u8; BANNER_LEN];
    tx.0.stdout
        .as_mut()
        .context("sender stdout")?
        .read_exact(&mut banner)?;
    let t = Instant::now();
    match paced {
        None => w.write_all(stream)?,
        Some(ends) => {
            // Paced like `xl remus -i 5`: each ACK is back long before the next
            // checkpoint. The status socket is not polled meanwhile (answering it costs
            // the sender's thread time that would show up as latency).
            let mut start = 0usize;
            for &e in ends {
                w.write_all(&stream[start..e as usize])?;
                start = e as usize;
                std::thread::sleep(Duration::from_millis(5));
            }
            let n = ends.len() as u64;
            wait_for(&ssock, |v| v["last_acked"].as_u64() >= Some(n))?;
        }
    }
    let ack = if paced.is_some() {
        let st = status(&ssock).context("sender status")?;
        Some(ack_from_status(&st))
    } else {
        None
    };
    drop(w);
    let code = tx.0.wait()?;
    let secs = t.elapsed().as_secs_f64();
    if !code.success() {
        bail!("relay send exited with {code}");
    }
    Ok(RelayRun { secs, ack })
}

fn ack_from_status(st: &Value) -> Ack {
    // Exact quantiles over the sender's recent window of ACK latencies.
    let q = &st["ack_latency_recent_us"];
    let f = |k: &str| q[k].as_f64().unwrap_or(f64::NAN);
    Ack {
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
