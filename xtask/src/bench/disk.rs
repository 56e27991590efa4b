//! `cargo xtask bench disk`: protocol-D replication on this host, side by side in one run:
//! writes straight to the backing file, through `remus disk serve` without a backup, and
//! through the replicating pair with a checkpoint loop (cut -> durable -> commit every
//! interval); the backup's commit/apply rate; the initial synchronisation against a plain
//! copy of the same file over the same loopback link. A table on stdout and
//! target/bench/disk.json.
//!
//! Owns: driving release builds of `remus` and the `disk_bench` example like an operator
//! would. Never touches: the product's internals. Timings are reported, never asserted.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

use crate::util;

#[derive(Args)]
pub struct DiskArgs {
    /// Seconds per measured case.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Repetitions, interleaved (ratios are paired per repetition; medians reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Size of the disks and of the region written (MiB).
    #[arg(long, default_value_t = 1024)]
    disk_mib: u64,
    /// Data on the disk of the initial-sync comparison (MiB, no holes).
    #[arg(long, default_value_t = 512)]
    sync_mib: u64,
    /// Checkpoint interval of the replicated runs (ms).
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Where the backup keeps its backing and journal (default: beside the primary's).
    #[arg(long)]
    backup_dir: Option<PathBuf>,
}

struct Daemon {
    child: Child,
    sock: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn request(sock: &Path, req: Value) -> Result<Value> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("connecting to {}", sock.display()))?;
    let mut l = req.to_string();
    l.push('\n');
    s.write_all(l.as_bytes())?;
    let mut ans = String::new();
    std::io::BufReader::new(s).read_line(&mut ans)?;
    let v: Value = serde_json::from_str(ans.trim())?;
    if v["result"] == "error" {
        bail!("{req} -> {v}");
    }
    Ok(v)
}

fn start(remus: &Path, args: &[String], sock: PathBuf, log: &Path) -> Result<Daemon> {
    let child = Command::new(remus)
        .arg("disk")
        .args(args)
        .arg("--socket")
        .arg(&sock)
        .env("REMUS_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("starting remus disk")?;
    let d = Daemon { child, sock };
    let t = Instant::now();
    while request(&d.sock, json!({"op": "status"})).is_err() {
        if t.elapsed() > Duration::from_secs(60) {
            bail!(
                "remus disk {args:?} did not come up: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(d)
}

fn sparse(p: &Path, mib: u64) -> Result<()> {
    let f = std::fs::File::create(p)?;
    f.set_len(mib << 20)?;
    Ok(())
}

/// `remus disk receive` on an ephemeral loopback port; returns it and its address.
fn backup(
    remus: &Path,
    work: &Path,
    backing: &Path,
    journal: &Path,
    name: &str,
) -> Result<(Daemon, String)> {
    let s = |p: &Path| p.display().to_string();
    let d = start(
        remus,
        &[
            "receive".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--backing".into(),
            s(backing),
            "--journal".into(),
            s(journal),
            "--key-file".into(),
            s(&work.join("key")),
            "--name".into(),
            name.into(),
        ],
        work.join(format!("{name}.ctl")),
        &work.join(format!("{name}.log")),
    )?;
    let addr = request(&d.sock, json!({"op": "status"}))?["listen"]
        .as_str()
        .context("the backup's listen address")?
        .to_string();
    Ok((d, addr))
}

/// `remus disk serve` with a unix export `work/NAME.nbd`, replicating to `backup` if given.
fn primary(
    remus: &Path,
    work: &Path,
    backing: &Path,
    backup: Option<&str>,
    name: &str,
) -> Result<Daemon> {
    let s = |p: &Path| p.display().to_string();
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--backing".into(),
        s(backing),
        "--export".into(),
        format!("unix:{}", s(&work.join(format!("{name}.nbd")))),
        "--name".into(),
        name.into(),
    ];
    if let Some(b) = backup {
        args.extend([
            "--backup".into(),
            b.into(),
            "--key-file".into(),
            s(&work.join("key")),
        ]);
    }
    let d = start(
        remus,
        &args,
        work.join(format!("{name}.ctl")),
        &work.join(format!("{name}.log")),
    )?;
    if backup.is_some() {
        request(&d.sock, json!({"op": "wait_sync", "timeout_ms": 600000}))?;
    }
    Ok(d)
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

fn helper(bin: &Path, args: &[String]) -> Result<Value> {
    let o = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !o.status.success() {
        bail!(
            "{} {args:?}: {}",
            bin.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(serde_json::from_slice(&o.stdout)?)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISS" }
}

struct Workload {
    name: &'static str,
    mode: &'static str,
    block: u64,
    qd: u64,
    /// Whether the ratio target applies to it.
    target: bool,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "4 KiB random, QD1",
        mode: "rand",
        block: 4096,
        qd: 1,
        target: true,
    },
    Workload {
        name: "1 MiB sequential, QD1",
        mode: "seq",
        block: 1 << 20,
        qd: 1,
        target: true,
    },
    Workload {
        name: "4 KiB random, QD16",
        mode: "rand",
        block: 4096,
        qd: 16,
        target: false,
    },
];

pub fn run(a: DiskArgs) -> Result<()> {
    util::run(util::cmd("cargo").args([
        "build",
        "--release",
        "-p",
        "remus-user",
        "--bin",
        "remus",
        "--example",
        "disk_bench",
    ]))?;
    let target = util::root().join("target");
    let remus = target.join("release").join("remus");
    let bench = target.join("release").join("examples").join("disk_bench");
    let work = target.join("bench").join("disk-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let bdir = a.backup_dir.clone().unwrap_or_else(|| work.join("backup"));
    let _ = std::fs::remove_dir_all(bdir.join("journal"));
    std::fs::create_dir_all(&bdir)?;
    let key = work.join("key");
    std::fs::write(&key, "bench-key-0123456789abcdef")?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let s = |p: &Path| p.display().to_string();
    let (direct, standalone, primary_img, backup_img) = (
        work.join("direct.img"),
        work.join("standalone.img"),
        work.join("primary.img"),
        bdir.join("backup.img"),
    );
    for p in [&direct, &standalone, &primary_img, &backup_img] {
        sparse(p, a.disk_mib)?;
    }
    let sd = primary(&remus, &work, &standalone, None, "standalone")?;
    let (bk, addr) = backup(&remus, &work, &backup_img, &bdir.join("journal"), "backup")?;
    let pr = primary(&remus, &work, &primary_img, Some(&addr), "primary")?;

    let region = (a.disk_mib << 20).to_string();
    let mut out = serde_json::Map::new();
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut results: Vec<Vec<[Value; 3]>> = (0..WORKLOADS.len()).map(|_| Vec::new()).collect();
    let mut cpu: Vec<[f64; 3]> = vec![[0.0; 3]; WORKLOADS.len()];
    for r in 0..a.repeat {
        for (wi, w) in WORKLOADS.iter().enumerate() {
            eprintln!("round {}/{}: {}", r + 1, a.repeat, w.name);
            let base = vec![
                "write".to_string(),
                String::new(),
                w.mode.into(),
                w.block.to_string(),
                w.qd.to_string(),
                a.seconds.to_string(),
                region.clone(),
            ];
            let with = |t: String| {
                let mut v = base.clone();
                v[1] = t;
                v
            };
            let d = if w.qd == 1 {
                helper(&bench, &with(format!("file:{}", s(&direct))))?
            } else {
                Value::Null
            };
            let c0 = cpu_secs(sd.child.id());
            let u = helper(
                &bench,
                &with(format!("nbd:{}", s(&work.join("standalone.nbd")))),
            )?;
            let c1 = cpu_secs(sd.child.id());
            let (p0, b0) = (cpu_secs(pr.child.id()), cpu_secs(bk.child.id()));
            let mut args = with(format!("nbd:{}", s(&work.join("primary.nbd"))));
            args.extend([s(&pr.sock), s(&bk.sock), a.interval_ms.to_string()]);
            let rep = helper(&bench, &args)?;
            let (p1, b1) = (cpu_secs(pr.child.id()), cpu_secs(bk.child.id()));
            let gb = |v: &Value| v["bytes"].as_f64().unwrap_or(1.0) / 1e9;
            cpu[wi][0] += (c1 - c0) / gb(&u) / a.repeat as f64;
            cpu[wi][1] += (p1 - p0) / gb(&rep) / a.repeat as f64;
            cpu[wi][2] += (b1 - b0) / gb(&rep) / a.repeat as f64;
            results[wi].push([d, u, rep]);
        }
    }
    let st = request(&pr.sock, json!({"op": "status"}))?;
    if st["state"] != "protected" {
        bail!("the replicated daemon lost its backup during the run: {st}");
    }

    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let l = |v: &Value, k: &str| v["lat_us"][k].as_f64().unwrap_or(f64::NAN);
    let mut wjson = Vec::new();
    for (wi, w) in WORKLOADS.iter().enumerate() {
        let runs = &results[wi];
        let med =
            |i: usize, g: &dyn Fn(&Value) -> f64| median(runs.iter().map(|r| g(&r[i])).collect());
        let ratio = median(
            runs.iter()
                .map(|r| f(&r[2], "mb_s") / f(&r[1], "mb_s"))
                .collect(),
        );
        let added_p50 = median(
            runs.iter()
                .map(|r| l(&r[2], "p50") - l(&r[1], "p50"))
                .collect(),
        );
        let (mbs, iops) = (|v: &Value| f(v, "mb_s"), |v: &Value| f(v, "iops"));
        let p50 = |v: &Value| l(v, "p50");
        let p99 = |v: &Value| l(v, "p99");
        let cell = |i: usize| {
            if runs[0][i].is_null() {
                "n/a".to_string()
            } else {
                format!(
                    "{:.0} MB/s {:.0} IOPS, p50 {:.1} p99 {:.0} us",
                    med(i, &mbs),
                    med(i, &iops),
                    med(i, &p50),
                    med(i, &p99)
                )
            }
        };
        rows.push((format!("{}: backing file directly", w.name), cell(0)));
        rows.push((format!("{}: daemon, no backup", w.name), cell(1)));
        rows.push((format!("{}: daemon, replicated", w.name), cell(2)));
        rows.push((
            format!(
                "{}: replicated / unreplicated{}",
                w.name,
                if w.target { " (target >= 0.8)" } else { "" }
            ),
            if w.target {
                format!("{ratio:.2} {}", verdict(ratio >= 0.8))
            } else {
                format!("{ratio:.2}")
            },
        ));
        if w.qd == 1 {
            rows.push((
                format!("{}: added latency p50 (target <= 50 us)", w.name),
                format!("{added_p50:.1} us {}", verdict(added_p50 <= 50.0)),
            ));
        }
        rows.push((
            format!("{}: daemon CPU per GB: alone / primary / backup", w.name),
            format!(
                "{:.2} / {:.2} / {:.2} s",
                cpu[wi][0], cpu[wi][1], cpu[wi][2]
            ),
        ));
        let ck: Vec<&Value> = runs.iter().map(|r| &r[2]["checkpoints"]).collect();
        let ckm = |k: &str| {
            median(
                ck.iter()
                    .map(|c| c[k]["p50"].as_f64().unwrap_or(f64::NAN))
                    .collect(),
            )
        };
        rows.push((
            format!("{}: checkpoint cut / durable / commit p50", w.name),
            format!(
                "{:.0} / {:.0} / {:.0} us",
                ckm("cut_us"),
                ckm("durable_us"),
                ckm("commit_us")
            ),
        ));
        wjson.push(json!({
            "workload": w.name,
            "runs": runs.iter().map(|r| json!({"direct": r[0], "unreplicated": r[1], "replicated": r[2]})).collect::<Vec<_>>(),
            "ratio_replicated_over_unreplicated": ratio,
            "target_ratio": if w.target { json!(0.8) } else { Value::Null },
            "added_latency_p50_us": added_p50,
            "cpu_s_per_gb": {"standalone": cpu[wi][0], "primary": cpu[wi][1], "backup": cpu[wi][2]},
        }));
    }
    out.insert("workloads".into(), Value::Array(wjson));
    let bs = request(&bk.sock, json!({"op": "status"}))?;
    let apply = bs["applied_bytes_total"].as_f64().unwrap_or(0.0)
        / bs["apply_seconds_total"].as_f64().unwrap_or(f64::NAN)
        / 1e6;
    rows.push((
        "backup: apply rate (commit, page cache)".into(),
        format!("{apply:.0} MB/s"),
    ));
    out.insert(
        "backup".into(),
        json!({"applied_bytes": bs["applied_bytes_total"], "apply_seconds": bs["apply_seconds_total"], "apply_mb_s": apply}),
    );
    drop((pr, bk, sd));

    // Initial synchronisation against a plain copy over the same loopback link.
    let src = work.join("sync-src.img");
    {
        use std::io::Write;
        let mut fh = std::io::BufWriter::new(std::fs::File::create(&src)?);
        let mut chunk = vec![0u8; 1 << 20];
        for i in 0..a.sync_mib {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = ((i as usize * 31 + j) % 251) as u8 | 1;
            }
            fh.write_all(&chunk)?;
        }
        fh.flush()?;
    }
    let (mut copy_r, mut sync_r, mut pair_r) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..a.repeat {
        eprintln!("round {}/{}: initial sync vs plain copy", r + 1, a.repeat);
        let dst = bdir.join("copy-dst.img");
        sparse(&dst, a.sync_mib)?;
        let c = helper(&bench, &["copy".into(), s(&src), s(&dst)])?;
        let _ = std::fs::remove_file(&dst);
        let b2 = bdir.join("sync-backup.img");
        sparse(&b2, a.sync_mib)?;
        let jd = bdir.join("sync-journal");
        let _ = std::fs::remove_dir_all(&jd);
        let (bk, addr) = backup(&remus, &work, &b2, &jd, "sync-b")?;
        let pr = primary(&remus, &work, &src, Some(&addr), "sync-p")?;
        let secs = request(&pr.sock, json!({"op": "status"}))?["sync_seconds"]
            .as_f64()
            .context("sync_seconds")?;
        drop((pr, bk));
        let _ = std::fs::remove_file(&b2);
        let sync_mb_s = (a.sync_mib << 20) as f64 / secs / 1e6;
        let copy_mb_s = c["mb_s"].as_f64().unwrap_or(f64::NAN);
        copy_r.push(copy_mb_s);
        sync_r.push(sync_mb_s);
        pair_r.push(sync_mb_s / copy_mb_s);
    }
    let (cm, sm, pm) = (
        median(copy_r.clone()),
        median(sync_r.clone()),
        median(pair_r.clone()),
    );
    rows.push((
        format!(
            "initial sync of {} MiB: plain copy over loopback TCP",
            a.sync_mib
        ),
        format!("{cm:.0} MB/s"),
    ));
    rows.push((
        format!("initial sync of {} MiB: remus disk sync", a.sync_mib),
        format!("{sm:.0} MB/s"),
    ));
    rows.push((
        "initial sync / plain copy (target >= 0.8)".into(),
        format!("{pm:.2} {}", verdict(pm >= 0.8)),
    ));
    out.insert(
        "initial_sync".into(),
        json!({"mib": a.sync_mib, "plain_copy_mb_s": copy_r, "sync_mb_s": sync_r, "ratio": pair_r, "ratio_median": pm, "target": 0.8}),
    );

    // SAFETY: getloadavg writes at most 3 doubles.
    let mut load = [0f64; 3];
    unsafe { libc::getloadavg(load.as_mut_ptr(), 3) };
    out.insert("load_average_1m".into(), json!(load[0]));
    out.insert(
        "config".into(),
        json!({"seconds": a.seconds, "repeat": a.repeat, "disk_mib": a.disk_mib, "interval_ms": a.interval_ms, "backup_dir": s(&bdir)}),
    );
    println!();
    println!(
        "{:<66} {:>44}",
        "disk benchmark (loopback, one run)", "median"
    );
    println!("{}", "-".repeat(111));
    for (k, v) in &rows {
        println!("{k:<66} {v:>44}");
    }
    println!(
        "(1-minute load average at the end: {:.1}; ratios are paired per repetition)",
        load[0]
    );
    let json_path = target.join("bench").join("disk.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&Value::Object(out))?,
    )?;
    println!("wrote {}", json_path.display());
    let _ = std::fs::remove_dir_all(&work);
    if a.backup_dir.is_some() {
        let _ = std::fs::remove_dir_all(bdir.join("journal"));
        let _ = std::fs::remove_file(&backup_img);
    }
    Ok(())
}
