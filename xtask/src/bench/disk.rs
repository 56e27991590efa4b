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

use super::common::{self, run_json as helper, verdict};

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

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
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

/// The built binaries and the files of one run.
struct Setup {
    target: PathBuf,
    remus: PathBuf,
    bench: PathBuf,
    work: PathBuf,
    /// Where the backup keeps its backing and journals.
    bdir: PathBuf,
    direct: PathBuf,
    standalone: PathBuf,
    primary_img: PathBuf,
    backup_img: PathBuf,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Builds the release binaries, lays out the work directory, the key and sparse disks.
fn prepare(a: &DiskArgs) -> Result<Setup> {
    let target = common::build_release(&["disk_bench"])?;
    let work = target.join("bench").join("disk-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let bdir = a.backup_dir.clone().unwrap_or_else(|| work.join("backup"));
    let _ = std::fs::remove_dir_all(bdir.join("journal"));
    std::fs::create_dir_all(&bdir)?;
    let key = work.join("key");
    std::fs::write(&key, "bench-key-0123456789abcdef")?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let setup = Setup {
        remus: target.join("release").join("remus"),
        bench: target.join("release").join("examples").join("disk_bench"),
        direct: work.join("direct.img"),
        standalone: work.join("standalone.img"),
        primary_img: work.join("primary.img"),
        backup_img: bdir.join("backup.img"),
        target,
        work,
        bdir,
    };
    for p in [
        &setup.direct,
        &setup.standalone,
        &setup.primary_img,
        &setup.backup_img,
    ] {
        sparse(p, a.disk_mib)?;
    }
    Ok(setup)
}

/// The three daemons of the write workloads: alone, and the replicating pair.
struct Daemons {
    standalone: Daemon,
    primary: Daemon,
    backup: Daemon,
}

/// Each workload's runs (direct, unreplicated, replicated) and daemon CPU seconds per GB
/// (standalone, primary, backup), averaged over the repetitions.
struct Writes {
    results: Vec<Vec<[Value; 3]>>,
    cpu: Vec<[f64; 3]>,
}

/// Every workload against the backing file, the lone daemon and the pair, interleaved.
fn measure_writes(a: &DiskArgs, st: &Setup, d: &Daemons) -> Result<Writes> {
    let region = (a.disk_mib << 20).to_string();
    let mut w = Writes {
        results: (0..WORKLOADS.len()).map(|_| Vec::new()).collect(),
        cpu: vec![[0.0; 3]; WORKLOADS.len()],
    };
    for r in 0..a.repeat {
        for (wi, wl) in WORKLOADS.iter().enumerate() {
            eprintln!("round {}/{}: {}", r + 1, a.repeat, wl.name);
            let with = |t: String| {
                vec![
                    "write".to_string(),
                    t,
                    wl.mode.into(),
                    wl.block.to_string(),
                    wl.qd.to_string(),
                    a.seconds.to_string(),
                    region.clone(),
                ]
            };
            let direct = if wl.qd == 1 {
                helper(&st.bench, &with(format!("file:{}", s(&st.direct))))?
            } else {
                Value::Null
            };
            let c0 = cpu_secs(d.standalone.child.id());
            let u = helper(
                &st.bench,
                &with(format!("nbd:{}", s(&st.work.join("standalone.nbd")))),
            )?;
            let c1 = cpu_secs(d.standalone.child.id());
            let (p0, b0) = (
                cpu_secs(d.primary.child.id()),
                cpu_secs(d.backup.child.id()),
            );
            let mut args = with(format!("nbd:{}", s(&st.work.join("primary.nbd"))));
            args.extend([
                s(&d.primary.sock),
                s(&d.backup.sock),
                a.interval_ms.to_string(),
            ]);
            let rep = helper(&st.bench, &args)?;
            let (p1, b1) = (
                cpu_secs(d.primary.child.id()),
                cpu_secs(d.backup.child.id()),
            );
            let gb = |v: &Value| v["bytes"].as_f64().unwrap_or(1.0) / 1e9;
            w.cpu[wi][0] += (c1 - c0) / gb(&u) / a.repeat as f64;
            w.cpu[wi][1] += (p1 - p0) / gb(&rep) / a.repeat as f64;
            w.cpu[wi][2] += (b1 - b0) / gb(&rep) / a.repeat as f64;
            w.results[wi].push([direct, u, rep]);
        }
    }
    Ok(w)
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

fn lat(v: &Value, k: &str) -> f64 {
    v["lat_us"][k].as_f64().unwrap_or(f64::NAN)
}

/// One workload's rows (medians over the runs, paired ratios) and its JSON.
fn report_workload(
    w: &Workload,
    runs: &[[Value; 3]],
    cpu: [f64; 3],
    rows: &mut Vec<(String, String)>,
) -> Value {
    let med = |i: usize, g: &dyn Fn(&Value) -> f64| median(runs.iter().map(|r| g(&r[i])).collect());
    let ratio = median(
        runs.iter()
            .map(|r| num(&r[2], "mb_s") / num(&r[1], "mb_s"))
            .collect(),
    );
    let added_p50 = median(
        runs.iter()
            .map(|r| lat(&r[2], "p50") - lat(&r[1], "p50"))
            .collect(),
    );
    let cell = |i: usize| {
        if runs[0][i].is_null() {
            "n/a".to_string()
        } else {
            format!(
                "{:.0} MB/s {:.0} IOPS, p50 {:.1} p99 {:.0} us",
                med(i, &|v| num(v, "mb_s")),
                med(i, &|v| num(v, "iops")),
                med(i, &|v| lat(v, "p50")),
                med(i, &|v| lat(v, "p99"))
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
        format!("{:.2} / {:.2} / {:.2} s", cpu[0], cpu[1], cpu[2]),
    ));
    let ckm = |k: &str| {
        median(
            runs.iter()
                .map(|r| r[2]["checkpoints"][k]["p50"].as_f64().unwrap_or(f64::NAN))
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
    json!({
        "workload": w.name,
        "runs": runs.iter().map(|r| json!({"direct": r[0], "unreplicated": r[1], "replicated": r[2]})).collect::<Vec<_>>(),
        "ratio_replicated_over_unreplicated": ratio,
        "target_ratio": if w.target { json!(0.8) } else { Value::Null },
        "added_latency_p50_us": added_p50,
        "cpu_s_per_gb": {"standalone": cpu[0], "primary": cpu[1], "backup": cpu[2]},
    })
}

/// The backup's commit/apply rate over the whole run.
fn report_apply(bk: &Daemon, rows: &mut Vec<(String, String)>) -> Result<Value> {
    let bs = request(&bk.sock, json!({"op": "status"}))?;
    let apply = bs["applied_bytes_total"].as_f64().unwrap_or(0.0)
        / bs["apply_seconds_total"].as_f64().unwrap_or(f64::NAN)
        / 1e6;
    rows.push((
        "backup: apply rate (commit, page cache)".into(),
        format!("{apply:.0} MB/s"),
    ));
    Ok(
        json!({"applied_bytes": bs["applied_bytes_total"], "apply_seconds": bs["apply_seconds_total"], "apply_mb_s": apply}),
    )
}

/// A file of `mib` MiB with no holes and no zero bytes (so nothing is skipped).
fn write_sync_source(src: &Path, mib: u64) -> Result<()> {
    use std::io::Write;
    let mut fh = std::io::BufWriter::new(std::fs::File::create(src)?);
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..mib {
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = ((i as usize * 31 + j) % 251) as u8 | 1;
        }
        fh.write_all(&chunk)?;
    }
    fh.flush()?;
    Ok(())
}

/// MB/s of each repetition: plain copy, initial sync, and sync / copy of that repetition.
struct Sync {
    copy: Vec<f64>,
    sync: Vec<f64>,
    paired: Vec<f64>,
}

/// Initial synchronisation against a plain copy over the same loopback link.
fn measure_sync(a: &DiskArgs, st: &Setup) -> Result<Sync> {
    let src = st.work.join("sync-src.img");
    write_sync_source(&src, a.sync_mib)?;
    let mut r = Sync {
        copy: Vec::new(),
        sync: Vec::new(),
        paired: Vec::new(),
    };
    for i in 0..a.repeat {
        eprintln!("round {}/{}: initial sync vs plain copy", i + 1, a.repeat);
        let dst = st.bdir.join("copy-dst.img");
        sparse(&dst, a.sync_mib)?;
        let c = helper(&st.bench, &["copy".into(), s(&src), s(&dst)])?;
        let _ = std::fs::remove_file(&dst);
        let b2 = st.bdir.join("sync-backup.img");
        sparse(&b2, a.sync_mib)?;
        let jd = st.bdir.join("sync-journal");
        let _ = std::fs::remove_dir_all(&jd);
        let (bk, addr) = backup(&st.remus, &st.work, &b2, &jd, "sync-b")?;
        let pr = primary(&st.remus, &st.work, &src, Some(&addr), "sync-p")?;
        let secs = request(&pr.sock, json!({"op": "status"}))?["sync_seconds"]
            .as_f64()
            .context("sync_seconds")?;
        drop((pr, bk));
        let _ = std::fs::remove_file(&b2);
        let sync_mb_s = (a.sync_mib << 20) as f64 / secs / 1e6;
        let copy_mb_s = c["mb_s"].as_f64().unwrap_or(f64::NAN);
        r.copy.push(copy_mb_s);
        r.sync.push(sync_mb_s);
        r.paired.push(sync_mb_s / copy_mb_s);
    }
    Ok(r)
}

fn report_sync(a: &DiskArgs, r: &Sync, rows: &mut Vec<(String, String)>) -> Value {
    let (cm, sm, pm) = (
        median(r.copy.clone()),
        median(r.sync.clone()),
        median(r.paired.clone()),
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
    json!({"mib": a.sync_mib, "plain_copy_mb_s": r.copy, "sync_mb_s": r.sync, "ratio": r.paired, "ratio_median": pm, "target": 0.8})
}

pub fn run(a: DiskArgs) -> Result<()> {
    let st = prepare(&a)?;
    let standalone = primary(&st.remus, &st.work, &st.standalone, None, "standalone")?;
    let (backup_d, addr) = backup(
        &st.remus,
        &st.work,
        &st.backup_img,
        &st.bdir.join("journal"),
        "backup",
    )?;
    let primary_d = primary(&st.remus, &st.work, &st.primary_img, Some(&addr), "primary")?;
    let daemons = Daemons {
        standalone,
        primary: primary_d,
        backup: backup_d,
    };
    let writes = measure_writes(&a, &st, &daemons)?;
    let status = request(&daemons.primary.sock, json!({"op": "status"}))?;
    if status["state"] != "protected" {
        bail!("the replicated daemon lost its backup during the run: {status}");
    }
    let mut out = serde_json::Map::new();
    let mut rows: Vec<(String, String)> = Vec::new();
    let wjson = WORKLOADS
        .iter()
        .enumerate()
        .map(|(wi, w)| report_workload(w, &writes.results[wi], writes.cpu[wi], &mut rows))
        .collect();
    out.insert("workloads".into(), Value::Array(wjson));
    out.insert("backup".into(), report_apply(&daemons.backup, &mut rows)?);
    drop(daemons);

    let sync = measure_sync(&a, &st)?;
    out.insert("initial_sync".into(), report_sync(&a, &sync, &mut rows));
    let load = common::load_average();
    out.insert("load_average_1m".into(), json!(load));
    out.insert(
        "config".into(),
        json!({"seconds": a.seconds, "repeat": a.repeat, "disk_mib": a.disk_mib, "interval_ms": a.interval_ms, "backup_dir": s(&st.bdir)}),
    );
    common::Table {
        title: "disk benchmark (loopback, one run)",
        column: "median",
        widths: (66, 44),
    }
    .print(
        &rows,
        &format!("(1-minute load average at the end: {load:.1}; ratios are paired per repetition)"),
    );
    common::write_json(&st.target, "disk", out)?;
    let _ = std::fs::remove_dir_all(&st.work);
    if a.backup_dir.is_some() {
        let _ = std::fs::remove_dir_all(st.bdir.join("journal"));
        let _ = std::fs::remove_file(&st.backup_img);
    }
    Ok(())
}
