//! Data side of `cargo xtask bench disk` (xtask cannot link remus-user). Prints one line of
//! JSON.
//!
//! ```text
//! disk_bench write TARGET MODE BLOCK QD SECONDS REGION [PRIMARY_SOCK BACKUP_SOCK INTERVAL_MS]
//!     TARGET: file:PATH (pwrite to the backing directly) | nbd:SOCKET (through a daemon)
//!     MODE: seq | rand; with the sockets, a checkpoint loop runs alongside:
//!     cut (primary) -> durable(N) -> commit(N) (backup) every INTERVAL_MS.
//! disk_bench copy SRC DST   # plain copy of a file over loopback TCP (1 MiB chunks, fsync)
//! ```
use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use remus_user::disk::nbd::client::Client;
use serde_json::{Value, json};

fn req(sock: &Path, v: Value) -> Result<Value, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    let mut l = v.to_string();
    l.push('\n');
    s.write_all(l.as_bytes()).map_err(|e| e.to_string())?;
    let mut ans = String::new();
    BufReader::new(s)
        .read_line(&mut ans)
        .map_err(|e| e.to_string())?;
    let a: Value = serde_json::from_str(ans.trim()).map_err(|e| e.to_string())?;
    if a["result"] == "error" {
        return Err(format!("{v} -> {a}"));
    }
    Ok(a)
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i] as f64 / 1e3
}

fn lat_json(mut ns: Vec<u64>) -> Value {
    let mean = if ns.is_empty() {
        0.0
    } else {
        ns.iter().sum::<u64>() as f64 / ns.len() as f64 / 1e3
    };
    json!({
        "p50": pct(&mut ns, 0.5),
        "p90": pct(&mut ns, 0.9),
        "p99": pct(&mut ns, 0.99),
        "max": pct(&mut ns, 1.0),
        "mean": mean,
    })
}

struct Offsets {
    seq: bool,
    block: u64,
    region: u64,
    i: u64,
    x: u64,
}

impl Offsets {
    fn next(&mut self) -> u64 {
        self.i += 1;
        if self.seq {
            (self.i * self.block) % (self.region - self.region % self.block)
        } else {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            (self.x % (self.region / self.block)) * self.block
        }
    }
}

/// cut -> durable -> commit every `interval`, until `stop`; returns timings.
fn checkpoints(
    p: &Path,
    b: &Path,
    interval: Duration,
    stop: Arc<AtomicBool>,
) -> Result<Value, String> {
    let (mut cut, mut dur, mut com) = (Vec::new(), Vec::new(), Vec::new());
    let mut last;
    loop {
        let done = stop.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let n = req(p, json!({"op": "cut"}))?["epoch"].as_u64().unwrap_or(0);
        let t1 = Instant::now();
        req(
            b,
            json!({"op": "durable", "epoch": n, "timeout_ms": 120000}),
        )?;
        let t2 = Instant::now();
        req(b, json!({"op": "commit", "epoch": n}))?;
        let t3 = Instant::now();
        cut.push((t1 - t0).as_nanos() as u64);
        dur.push((t2 - t1).as_nanos() as u64);
        com.push((t3 - t2).as_nanos() as u64);
        last = n;
        if done {
            break;
        }
        std::thread::sleep(interval.saturating_sub(t0.elapsed()));
    }
    let st = req(b, json!({"op": "status"}))?;
    Ok(json!({
        "count": cut.len(),
        "last_epoch": last,
        "cut_us": lat_json(cut),
        "durable_us": lat_json(dur),
        "commit_us": lat_json(com),
        "applied_bytes": st["applied_bytes_total"],
        "apply_seconds": st["apply_seconds_total"],
    }))
}

fn write(a: &[String]) -> Result<Value, String> {
    let num = |i: usize| -> Result<u64, String> {
        a.get(i)
            .ok_or("missing argument")?
            .parse::<u64>()
            .map_err(|e| format!("argument {i}: {e}"))
    };
    let target = a.first().ok_or("TARGET")?;
    let seq = a.get(1).map(String::as_str) == Some("seq");
    let (block, qd, secs, region) = (num(2)?, num(3)?.max(1), num(4)?, num(5)?);
    let ck = match (a.get(6), a.get(7), a.get(8)) {
        (Some(p), Some(b), Some(i)) => Some((
            p.clone(),
            b.clone(),
            Duration::from_millis(i.parse().map_err(|e| format!("INTERVAL_MS: {e}"))?),
        )),
        _ => None,
    };
    let mut data = vec![0u8; (block as usize).max(1 << 20) * 2];
    let mut x = 0x1234_5678_9abc_def1u64;
    for c in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    let mut offs = Offsets {
        seq,
        block,
        region,
        i: 0,
        x: 0x9e37_79b9_7f4a_7c15,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let ckt = ck.map(|(p, b, i)| {
        let stop = stop.clone();
        std::thread::spawn(move || checkpoints(Path::new(&p), Path::new(&b), i, stop))
    });
    let mut lat = Vec::new();
    let mut bytes = 0u64;
    let t = Instant::now();
    let deadline = t + Duration::from_secs(secs);
    let slice = |i: u64| {
        let at = ((i * 4099) % (data.len() as u64 / 2)) as usize;
        &data[at..at + block as usize]
    };
    if let Some(path) = target.strip_prefix("file:") {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| format!("{path}: {e}"))?;
        let mut i = 0;
        while Instant::now() < deadline {
            let off = offs.next();
            let s = Instant::now();
            f.write_all_at(slice(i), off).map_err(|e| e.to_string())?;
            lat.push(s.elapsed().as_nanos() as u64);
            bytes += block;
            i += 1;
        }
    } else if let Some(sock) = target.strip_prefix("nbd:") {
        let mut c = Client::connect(Path::new(sock), "").map_err(|e| e.to_string())?;
        let mut inflight: VecDeque<(u64, Instant)> = VecDeque::new();
        let mut i = 0;
        loop {
            let now = Instant::now();
            while now < deadline && inflight.len() < qd as usize {
                let off = offs.next();
                let s = Instant::now();
                let cookie = c
                    .send(1, 0, off, block as u32, slice(i))
                    .map_err(|e| e.to_string())?;
                inflight.push_back((cookie, s));
                i += 1;
            }
            let Some((cookie, s)) = inflight.pop_front() else {
                break;
            };
            let (got, err) = c.recv(None).map_err(|e| e.to_string())?;
            if got != cookie || err != 0 {
                return Err(format!("reply {got}/{err} for {cookie}"));
            }
            lat.push(s.elapsed().as_nanos() as u64);
            bytes += block;
        }
    } else {
        return Err(format!("TARGET {target}: file:PATH or nbd:SOCKET"));
    }
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let ck = match ckt {
        Some(h) => h.join().map_err(|_| "checkpoint thread")??,
        None => Value::Null,
    };
    let ops = lat.len();
    Ok(json!({
        "ops": ops,
        "bytes": bytes,
        "secs": secs,
        "mb_s": bytes as f64 / secs / 1e6,
        "iops": ops as f64 / secs,
        "lat_us": lat_json(lat),
        "checkpoints": ck,
    }))
}

fn copy(src: &str, dst: &str) -> Result<Value, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let dst = dst.to_string();
    let t = Instant::now();
    let rx = std::thread::spawn(move || -> Result<u64, String> {
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        let f = OpenOptions::new()
            .write(true)
            .open(&dst)
            .map_err(|e| format!("{dst}: {e}"))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        loop {
            let mut n = 0;
            while n < buf.len() {
                match s.read(&mut buf[n..]).map_err(|e| e.to_string())? {
                    0 => break,
                    k => n += k,
                }
            }
            if n == 0 {
                break;
            }
            f.write_all_at(&buf[..n], at).map_err(|e| e.to_string())?;
            at += n as u64;
        }
        f.sync_data().map_err(|e| e.to_string())?;
        Ok(at)
    });
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    let f = std::fs::File::open(src).map_err(|e| format!("{src}: {e}"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = f.read_at(&mut buf, at).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        at += n as u64;
    }
    drop(s);
    let got = rx.join().map_err(|_| "receiver thread")??;
    let secs = t.elapsed().as_secs_f64();
    Ok(json!({"bytes": got, "secs": secs, "mb_s": got as f64 / secs / 1e6}))
}

fn main() -> Result<(), String> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let v = match a.first().map(String::as_str) {
        Some("write") => write(&a[1..])?,
        Some("copy") if a.len() == 3 => copy(&a[1], &a[2])?,
        _ => return Err("usage: disk_bench write … | copy SRC DST (see the source)".into()),
    };
    println!("{v}");
    Ok(())
}
