//! `cargo xtask lab build`: QEMU, the dom0 image and the guest, cached by their inputs.
//!
//! Owns: the lab cache under `$REMUS_CACHE/lab/` (default `/var/cache/remus/lab/`), one
//! set of images both hosts boot:
//! `qemu-<key>/`, `rootfs-<key>/`, `dom0-<key>/`, `guest-<key>.img`, `debs/` (debootstrap's
//! download cache). Each key is a hash of that step's inputs (script, package list, tool
//! versions, the lab files that go into the image, the previous step's key), so a step is
//! redone only when something it depends on changed; once a replacement is complete, the
//! oldest entries of its kind are deleted (the newest three are kept: branches sharing
//! the machine's cache would otherwise delete each other's). Never touches: the project's
//! own binaries (`remus` and `remus-net` go into dom0 fresh on every boot through the 9p
//! share, see `share.rs`; the counter client runs on the machine) and anything outside
//! the cache and `target/`.
//!
//! The heavy lifting is in `lab/host/*.sh` (debootstrap, unpacking QEMU, mkfs); this file
//! decides what to run, bounds every step with `timeout`, and logs each step to
//! `target/lab/logs/<step>.log`, naming the step and the log when one fails.
use crate::util;
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

/// Packages debootstrap installs into dom0 (on top of `--variant=minbase`).
pub const DOM0_PACKAGES: &[&str] = &[
    "xen-utils-4.17",
    "xen-hypervisor-4.17-amd64",
    "linux-image-amd64",
    "openssh-server",
    "openssh-client",
    "bridge-utils",
    "iproute2",
    "iputils-ping",
    "busybox-static",
    "kmod",
    "udev",
    "procps",
    "iptables",
    "ethtool",
    "psmisc",
];

/// Host packages the build needs (checked by command, installed with apt when missing).
const HOST_TOOLS: &[(&str, &str)] = &[
    ("debootstrap", "debootstrap"),
    ("busybox", "busybox-static"),
    ("cpio", "cpio"),
    ("mkfs.ext4", "e2fsprogs"),
    ("zstd", "zstd"),
    ("ssh-keygen", "openssh-client"),
];

/// Everything `up` needs to boot, all inside the cache.
pub struct Artifacts {
    pub qemu: PathBuf,
    pub dom0: PathBuf,
    pub guest_initrd: PathBuf,
}

impl Artifacts {
    pub fn qemu_bin(&self) -> PathBuf {
        self.qemu.join("bin/qemu-system-x86_64")
    }
}

pub fn cache() -> PathBuf {
    util::cache_dir().join("lab")
}

pub fn lab_src() -> PathBuf {
    util::root().join("lab")
}

pub fn logs_dir() -> PathBuf {
    util::root().join("target/lab/logs")
}

/// A cache key: the first 16 hex digits of SHA-256 over the given parts.
struct Key(Sha256);

impl Key {
    fn new(kind: &str) -> Self {
        let mut h = Sha256::new();
        h.update(kind.as_bytes());
        Key(h)
    }
    fn str(mut self, s: &str) -> Self {
        self.0.update((s.len() as u64).to_le_bytes());
        self.0.update(s.as_bytes());
        self
    }
    fn file(self, p: &Path) -> Result<Self> {
        let b =
            fs::read(p).with_context(|| format!("reading {} for the cache key", p.display()))?;
        // The file's name and content, never where the checkout is: every worktree of
        // one commit shares the machine's cache (a path in the key made each checkout
        // build its own dom0 and prune the others').
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        let mut k = self.str(name.as_deref().unwrap_or_default());
        k.0.update((b.len() as u64).to_le_bytes());
        k.0.update(&b);
        Ok(k)
    }
    fn finish(self) -> String {
        let d = self.0.finalize();
        d.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// Runs `argv` under `timeout`, output to `target/lab/logs/<step>.log`. On failure: which
/// step, the log path and its tail.
pub fn step(name: &str, secs: u64, argv: &[&str]) -> Result<()> {
    fs::create_dir_all(logs_dir())?;
    let log = logs_dir().join(format!("{name}.log"));
    let f = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let t = Instant::now();
    eprintln!("[lab build] {name}: running (log {})", log.display());
    let st = Command::new("timeout")
        .args(["-k", "10", &secs.to_string()])
        .args(argv)
        .current_dir(util::root())
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .status()
        .with_context(|| format!("starting step {name}"))?;
    if !st.success() {
        let why = if st.code() == Some(124) {
            format!("timed out after {secs} s")
        } else {
            format!("failed ({st})")
        };
        bail!(
            "lab build step `{name}` {why}; log: {}\n--- last lines ---\n{}",
            log.display(),
            tail_file(&log, 25)
        );
    }
    eprintln!(
        "[lab build] {name}: done in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn tail_file(p: &Path, n: usize) -> String {
    match fs::read(p) {
        Ok(b) => {
            let s = String::from_utf8_lossy(&b);
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", p.display()),
    }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

fn host_tools() -> Result<()> {
    let missing: Vec<&str> = HOST_TOOLS
        .iter()
        .filter(|(c, _)| !have(c))
        .map(|(_, p)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let pk = missing.join(" ");
    step(
        "host-tools",
        900,
        &[
            "sh",
            "-c",
            &format!(
                "export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq --no-install-recommends {pk} \
                 || {{ apt-get update -qq && apt-get install -y -qq --no-install-recommends {pk}; }}"
            ),
        ],
    )
}

fn cmd_output(argv: &[&str]) -> String {
    Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// How many entries of one kind the cache keeps: the newest, plus the few before it, so
/// checkouts of different branches sharing the machine's cache (one lab at a time) do not
/// delete each other's images and rebuild them in turn.
const KEEP: usize = 3;

/// Deletes `<prefix>*` entries in the cache but `keep` (a finished replacement) and the
/// `KEEP - 1` most recently modified others.
fn prune(prefix: &str, keep: &Path) {
    let Ok(rd) = fs::read_dir(cache()) else {
        return;
    };
    let mut others: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(prefix) && e.path() != keep && !name.ends_with(".tmp")
        })
        .map(|e| {
            let t = e.metadata().and_then(|m| m.modified());
            (t.unwrap_or(std::time::UNIX_EPOCH), e.path())
        })
        .collect();
    others.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (_, p) in others.into_iter().skip(KEEP - 1) {
        eprintln!("[lab build] removing the stale cache entry {}", p.display());
        let _ = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
    }
}

fn qemu() -> Result<PathBuf> {
    let script = lab_src().join("host/get-qemu.sh");
    let policy = cmd_output(&["apt-cache", "policy", "qemu-system-x86"]);
    let candidate = policy
        .lines()
        .find(|l| l.trim_start().starts_with("Candidate:"))
        .unwrap_or("")
        .trim()
        .to_string();
    let key = Key::new("qemu").file(&script)?.str(&candidate).finish();
    let dir = cache().join(format!("qemu-{key}"));
    if !dir.join("bin/qemu-system-x86_64").exists() {
        step(
            "qemu",
            900,
            &[&script.to_string_lossy(), &dir.to_string_lossy()],
        )?;
        prune("qemu-", &dir);
    }
    Ok(dir)
}

fn rootfs_key() -> Result<String> {
    let dbs = cmd_output(&["dpkg-query", "-W", "-f=${Version}", "debootstrap"]);
    Ok(Key::new("rootfs")
        .file(&lab_src().join("host/build-rootfs.sh"))?
        .str(&DOM0_PACKAGES.join(","))
        .str(&dbs)
        .finish())
}

fn dom0(rootfs_key: &str) -> Result<PathBuf> {
    let src = lab_src();
    let mut k = Key::new("dom0")
        .str(rootfs_key)
        .file(&src.join("host/build-image.sh"))?;
    let mut files: Vec<PathBuf> = fs::read_dir(src.join("dom0/image"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for f in &files {
        k = k.file(f)?;
    }
    let key = k.finish();
    let dir = cache().join(format!("dom0-{key}"));
    if dir.join("dom0.img").exists() {
        return Ok(dir);
    }
    let rootfs = cache().join(format!("rootfs-{rootfs_key}"));
    if !rootfs.join("usr/sbin/xl").exists() {
        let debs = cache().join("debs");
        step(
            "rootfs",
            2400,
            &[
                &src.join("host/build-rootfs.sh").to_string_lossy(),
                &rootfs.to_string_lossy(),
                &debs.to_string_lossy(),
                &DOM0_PACKAGES.join(","),
            ],
        )?;
        prune("rootfs-", &rootfs);
    }
    step(
        "dom0-image",
        900,
        &[
            &src.join("host/build-image.sh").to_string_lossy(),
            &rootfs.to_string_lossy(),
            &src.to_string_lossy(),
            &dir.to_string_lossy(),
        ],
    )?;
    prune("dom0-", &dir);
    Ok(dir)
}

/// Where the static counter binaries are built (`counter`).
const COUNTER_TARGET: &str = "x86_64-unknown-linux-gnu";

fn counter_dir() -> PathBuf {
    util::root()
        .join("target")
        .join(COUNTER_TARGET)
        .join("release")
}

/// The static counter client (the lab's client runs it on the machine).
pub fn counter_client() -> PathBuf {
    counter_dir().join("counter-client")
}

/// Builds the counter service and client static (the service runs in the busybox guest,
/// the client on the machine).
fn counter() -> Result<PathBuf> {
    fs::create_dir_all(logs_dir())?;
    let target = COUNTER_TARGET;
    util::run(
        util::cmd("timeout")
            .args([
                "1800",
                "cargo",
                "build",
                "--release",
                "-p",
                "lab-counter",
                "--target",
                target,
            ])
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            ),
    )
    .context("lab build step `counter` (cargo build -p lab-counter, static) failed")?;
    Ok(counter_dir())
}

fn guest(dom0_dir: &Path, counter_dir: &Path) -> Result<PathBuf> {
    let src = lab_src();
    let server = counter_dir.join("counter-server");
    let key = Key::new("guest")
        .str(&dom0_dir.to_string_lossy())
        .file(&src.join("host/build-guest.sh"))?
        .file(&src.join("guest/init"))?
        .file(&server)?
        .finish();
    let img = cache().join(format!("guest-{key}.img"));
    if !img.exists() {
        step(
            "guest-initrd",
            300,
            &[
                &src.join("host/build-guest.sh").to_string_lossy(),
                &dom0_dir.join("guest-files").to_string_lossy(),
                &server.to_string_lossy(),
                &src.join("guest/init").to_string_lossy(),
                &img.to_string_lossy(),
            ],
        )?;
        prune("guest-", &img);
    }
    Ok(img)
}

/// Builds (or finds in the cache) everything the lab boots. Idempotent.
pub fn build() -> Result<Artifacts> {
    if !util::is_root() {
        bail!("the lab build needs root (apt, debootstrap, chroot)");
    }
    let t = Instant::now();
    fs::create_dir_all(cache()).with_context(|| format!("creating {}", cache().display()))?;
    host_tools()?;
    let qemu = qemu()?;
    let rk = rootfs_key()?;
    let dom0 = dom0(&rk)?;
    let cdir = counter()?;
    let guest_initrd = guest(&dom0, &cdir)?;
    eprintln!(
        "[lab build] ready in {:.0} s: {} , {}",
        t.elapsed().as_secs_f64(),
        dom0.display(),
        guest_initrd.display()
    );
    Ok(Artifacts {
        qemu,
        dom0,
        guest_initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_files_key_depends_on_its_name_and_content_not_on_the_checkout() {
        let d = std::env::temp_dir().join(format!("remus-key-{}", std::process::id()));
        let (a, b) = (d.join("a"), d.join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        for dir in [&a, &b] {
            fs::write(dir.join("build-rootfs.sh"), "echo one\n").unwrap();
        }
        fs::write(b.join("other.sh"), "echo one\n").unwrap();
        let key = |p: &Path| Key::new("rootfs").file(p).unwrap().finish();
        let in_a = key(&a.join("build-rootfs.sh"));
        assert_eq!(in_a, key(&b.join("build-rootfs.sh")), "another checkout");
        assert_ne!(in_a, key(&b.join("other.sh")), "another file");
        fs::write(b.join("build-rootfs.sh"), "echo two\n").unwrap();
        assert_ne!(in_a, key(&b.join("build-rootfs.sh")), "other content");
        fs::remove_dir_all(&d).unwrap();
    }
}
