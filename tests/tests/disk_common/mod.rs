//! Fixtures of the disk tests: the real `remus` binary as `remus disk serve` (primary,
//! unix-socket export) and `remus disk receive` (backup, journal, unix export after
//! failover), a userspace NBD client (the library's, and qemu-io in one test), a model of
//! the disk that remembers its contents at every cut, and a seeded random generator.
//!
//! Owns: test fixtures only. Never touches: the daemons' internals; everything goes
//! through their command line, control sockets and exports, like an operator.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::relay_common::{HANG_GUARD, Scratch, remus_bin};
use remus_user::disk::nbd::client::Client;
use serde_json::{Value, json};

pub const MIB: u64 = 1 << 20;
/// Generous: debug builds share two cores with other tests and builds.
pub const HB: [&str; 4] = ["--heartbeat-interval", "200ms", "--heartbeat-timeout", "3s"];

/// A seeded xorshift64* (no dependency; reproducible from the seed in failure messages).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// The disk as the guest sees it, with a copy at every cut.
pub struct Model {
    pub img: Vec<u8>,
    pub at_cut: BTreeMap<u64, Vec<u8>>,
}

impl Model {
    pub fn new(img: Vec<u8>) -> Model {
        Model {
            img,
            at_cut: BTreeMap::new(),
        }
    }
    pub fn write(&mut self, off: u64, data: &[u8]) {
        self.img[off as usize..off as usize + data.len()].copy_from_slice(data);
    }
    pub fn zero(&mut self, off: u64, len: u64) {
        self.img[off as usize..(off + len) as usize].fill(0);
    }
    pub fn cut(&mut self, epoch: u64) {
        self.at_cut.insert(epoch, self.img.clone());
    }
}

pub fn image(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// Asserts equality, naming the first differing byte instead of dumping megabytes.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: sizes differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (sector {}): got {:#04x}, want {:#04x}",
            i / 512,
            got[i],
            want[i]
        );
    }
}

/// A sparse file of `size` bytes, optionally with content.
pub fn disk_file(p: &Path, size: u64, fill: Option<&[u8]>) {
    let mut f = File::create(p).unwrap();
    if let Some(b) = fill {
        f.write_all(b).unwrap();
    }
    f.set_len(size).unwrap();
}

/// One `remus disk` daemon.
pub struct Daemon {
    pub child: Child,
    pub sock: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// One request on the control socket; the answer as JSON.
    pub fn request(&self, req: Value) -> Value {
        request(&self.sock, req)
    }

    pub fn status(&self) -> Value {
        let v = self.request(json!({"op": "status"}));
        assert_eq!(v["result"], "status", "{v}\nlog:\n{}", self.log());
        v
    }

    /// Polls status until `pred` holds (hang guard only).
    pub fn wait(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            if let Some(v) = try_request(&self.sock, json!({"op": "status"}))
                && pred(&v)
            {
                return v;
            }
            assert!(
                t.elapsed() < HANG_GUARD,
                "gave up waiting for {what}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signals to a child we spawned and have not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGCONT);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn try_request(sock: &Path, req: Value) -> Option<Value> {
    let mut s = UnixStream::connect(sock).ok()?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).ok()?;
    let mut r = BufReader::new(s);
    let mut ans = String::new();
    r.read_line(&mut ans).ok()?;
    serde_json::from_str(ans.trim()).ok()
}

pub fn request(sock: &Path, req: Value) -> Value {
    try_request(sock, req.clone())
        .unwrap_or_else(|| panic!("no answer to {req} on {}", sock.display()))
}

fn spawn(args: &[&str], env: &[(&str, &str)], log: &Path) -> Child {
    let mut c = Command::new(remus_bin());
    c.args(["disk"])
        .args(args)
        .env("REMUS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().expect("starting remus disk")
}

/// `remus disk receive` on an ephemeral loopback port, failover export on a unix socket.
pub fn start_backup(
    dir: &Scratch,
    key: &Path,
    backing: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Daemon {
    let sock = dir.path().join("backup.sock");
    let log = dir.path().join(format!(
        "backup-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let journal = dir.path().join("journal");
    let failover = dir.path().join("failover.sock");
    let mut args: Vec<String> = vec![
        "receive".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--backing".into(),
        backing.display().to_string(),
        "--journal".into(),
        journal.display().to_string(),
        "--key-file".into(),
        key.display().to_string(),
        "--socket".into(),
        sock.display().to_string(),
        "--export".into(),
        format!("unix:{}", failover.display()),
        "--name".into(),
        "bk".into(),
    ];
    if !extra.iter().any(|a| a.starts_with("--heartbeat")) {
        args.extend(HB.iter().map(|s| s.to_string()));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = spawn(&a, env, &log);
    let d = Daemon { child, sock, log };
    d.wait("the backup to answer", |v| v["result"] == "status");
    d
}

pub fn backup_addr(b: &Daemon) -> String {
    b.status()["listen"]
        .as_str()
        .expect("listen address")
        .to_string()
}

/// `remus disk serve` with a unix export, replicating to `addr`.
pub fn start_primary(
    dir: &Scratch,
    key: &Path,
    backing: &Path,
    addr: &str,
    extra: &[&str],
) -> Daemon {
    let sock = dir.path().join("primary.sock");
    let log = dir.path().join("primary.log");
    let export = dir.path().join("export.sock");
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--backing".into(),
        backing.display().to_string(),
        "--export".into(),
        format!("unix:{}", export.display()),
        "--backup".into(),
        addr.into(),
        "--key-file".into(),
        key.display().to_string(),
        "--socket".into(),
        sock.display().to_string(),
        "--name".into(),
        "pr".into(),
    ];
    if !extra.iter().any(|a| a.starts_with("--heartbeat")) {
        args.extend(HB.iter().map(|s| s.to_string()));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = spawn(&a, &[], &log);
    let d = Daemon { child, sock, log };
    d.wait("the primary to answer", |v| v["result"] == "status");
    d
}

pub fn export_path(dir: &Scratch) -> PathBuf {
    dir.path().join("export.sock")
}

pub fn failover_path(dir: &Scratch) -> PathBuf {
    dir.path().join("failover.sock")
}

pub fn connect(p: &Path) -> Client {
    let t = Instant::now();
    loop {
        match Client::connect(p, "") {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    t.elapsed() < HANG_GUARD,
                    "connecting to {}: {e}",
                    p.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `remus disk ARGS…` to completion.
pub fn cli(args: &[&str]) -> Output {
    Command::new(remus_bin())
        .arg("disk")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running remus disk")
}

/// Waits for the primary's initial copy.
pub fn wait_sync(p: &Daemon) {
    let v = p.request(json!({"op": "wait_sync", "timeout_ms": 120000}));
    assert_eq!(v["result"], "in_sync", "{v}\nlog:\n{}", p.log());
}

pub fn cut(p: &Daemon) -> u64 {
    let v = p.request(json!({"op": "cut"}));
    v["epoch"]
        .as_u64()
        .unwrap_or_else(|| panic!("cut: {v}\nlog:\n{}", p.log()))
}

pub fn durable(b: &Daemon, n: u64) {
    let v = b.request(json!({"op": "durable", "epoch": n, "timeout_ms": 60000}));
    assert_eq!(
        v["result"],
        "durable",
        "durable({n}): {v}\nlog:\n{}",
        b.log()
    );
}

pub fn commit(b: &Daemon, n: u64) -> Value {
    let v = b.request(json!({"op": "commit", "epoch": n}));
    assert_eq!(
        v["result"],
        "applied",
        "commit({n}): {v}\nlog:\n{}",
        b.log()
    );
    v
}

pub fn failover(b: &Daemon, n: u64) -> Value {
    let v = b.request(json!({"op": "failover", "epoch": n}));
    assert_eq!(
        v["result"],
        "failed_over",
        "failover({n}): {v}\nlog:\n{}",
        b.log()
    );
    v
}

/// Random guest I/O through `c`, mirrored in `m`: writes of 512 B..256 KiB (sector
/// aligned, like a block layer), some write-zeroes and trims.
pub fn random_io(c: &mut Client, m: &mut Model, rng: &mut Rng, ops: usize) {
    let size = m.img.len() as u64;
    random_io_below(c, m, rng, ops, size);
}

/// [`random_io`] inside the first `size` bytes of the disk only.
pub fn random_io_below(c: &mut Client, m: &mut Model, rng: &mut Rng, ops: usize, size: u64) {
    for _ in 0..ops {
        let len = 512 * (1 + rng.below(512));
        let off = 512 * rng.below((size - len) / 512);
        match rng.below(10) {
            0 => {
                c.write_zeroes(off, len as u32, rng.below(2) == 0).unwrap();
                m.zero(off, len);
            }
            1 => {
                c.trim(off, len as u32).unwrap();
                m.zero(off, len);
            }
            _ => {
                let mut d = vec![0u8; len as usize];
                rng.fill(&mut d);
                c.write(off, &d, rng.below(8) == 0).unwrap();
                m.write(off, &d);
            }
        }
    }
}

/// A key file with mode 0600.
pub fn key(dir: &Scratch) -> PathBuf {
    dir.key("key", "disk-test-key-0123456789abcdef")
}

/// A primary daemon (`p.img`) replicating to a backup daemon (`b.img`), both `size`
/// bytes, filled with the given contents (zeroes otherwise), keyed with [`key`].
pub fn daemon_pair(
    dir: &Scratch,
    size: u64,
    primary_content: Option<&[u8]>,
    backup_content: Option<&[u8]>,
) -> (Daemon, Daemon) {
    let key = key(dir);
    let p_img = dir.path().join("p.img");
    let b_img = dir.path().join("b.img");
    disk_file(&p_img, size, primary_content);
    disk_file(&b_img, size, backup_content);
    let b = start_backup(dir, &key, &b_img, &[], &[]);
    let p = start_primary(dir, &key, &p_img, &backup_addr(&b), &[]);
    (p, b)
}
