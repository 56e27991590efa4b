//! The running lab: QEMU (software emulation) booting Xen 4.17 + dom0, the share it
//! boots with, and the machine-wide lab lock.
//!
//! Owns: `target/lab/` at run time: `share/` (the virtio-9p share, dom0's `/share`:
//! `lab/dom0/*.sh` scripts, `bin/` with the project's binaries, `guest/` kernel + initrd,
//! `req/` the agent's request directory, `run/` dom0's logs and guest consoles),
//! `serial.log` (Xen + dom0 console), `qemu.pid`, `qemu.log`; and the lock file in the
//! cache directory. Never touches: the cache's images (read only here), anything outside
//! `target/lab/`, and dom0's insides (dom0.rs talks to its agent).
use super::build::{Artifacts, tail_file};
use super::dom0;
use crate::util;
use anyhow::{Context, Result, bail};
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// QEMU's memory (MiB), Xen's command line. dom0 gets 1 GiB: the relay's two ends (page
/// caches for compression, the buffer's ring) run there side by side, and with 512 MiB
/// the sender was OOM-killed. `bootscrub=idle`: free memory is scrubbed
/// in the background and before it is handed out, so guests start from zeroed pages
/// (with `bootscrub=false` they got leftovers of the boot modules, which made the
/// migration stream incompressible); boot time is unchanged.
const QEMU_MEM_MB: &str = "2048";
const XEN_ARGS: &str = "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=2 \
    loglvl=all guest_loglvl=all noreboot console_timestamps=boot bootscrub=idle";
const DOM0_ARGS: &str = "console=hvc0 earlyprintk=xen root=/dev/vda rw init=/lab/bin/init";
/// Bound on QEMU start → dom0 ready (measured 40–70 s on 2 shared cores).
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

pub fn run_dir() -> PathBuf {
    util::root().join("target/lab")
}
pub fn share() -> PathBuf {
    run_dir().join("share")
}
pub fn serial_log() -> PathBuf {
    run_dir().join("serial.log")
}
fn pid_file() -> PathBuf {
    run_dir().join("qemu.pid")
}

/// The pid of the lab's QEMU if it is running.
pub fn qemu_pid() -> Option<i32> {
    let pid: i32 = fs::read_to_string(pid_file()).ok()?.trim().parse().ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains("qemu-system")
        .then_some(pid)
}

fn copy_into(src: &Path, dst: &Path) -> Result<()> {
    fs::copy(src, dst)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    Ok(())
}

/// Builds `remus` and `remus-net` (release) for dom0. Returns the error instead of failing
/// so a run that does not need them (the anchor) can go on.
fn build_remus() -> Result<PathBuf> {
    util::run(util::cmd("timeout").args([
        "2400",
        "cargo",
        "build",
        "--release",
        "-p",
        "remus-user",
        "--bins",
    ]))
    .context("cargo build --release -p remus-user failed")?;
    Ok(util::root().join("target/release"))
}

/// Fills the share: dom0 scripts, guest kernel + initrd, the project's binaries (fresh
/// every boot, never in the cached image). `need_remus`: fail if remus cannot be built.
fn stage(a: &Artifacts, need_remus: bool) -> Result<()> {
    let sh = share();
    for d in ["run", "req", "lab"] {
        let p = sh.join(d);
        if p.exists() {
            fs::remove_dir_all(&p).with_context(|| format!("clearing {}", p.display()))?;
        }
    }
    for d in ["bin", "guest", "lab/dom0", "req", "run"] {
        fs::create_dir_all(sh.join(d))?;
    }
    for e in fs::read_dir(super::build::lab_src().join("dom0"))?.flatten() {
        if e.path().is_file() {
            copy_into(&e.path(), &sh.join("lab/dom0").join(e.file_name()))?;
        }
    }
    copy_into(&a.dom0.join("vmlinuz"), &sh.join("guest/vmlinuz"))?;
    copy_into(&a.guest_initrd, &sh.join("guest/initrd.img"))?;
    copy_into(&a.counter_client, &sh.join("bin/counter-client"))?;
    match build_remus() {
        Ok(dir) => {
            for b in ["remus", "remus-net"] {
                copy_into(&dir.join(b), &sh.join("bin").join(b))?;
            }
        }
        Err(e) if !need_remus => {
            eprintln!("[lab] warning: {e:#}; dom0 gets no remus binaries this time");
            for b in ["remus", "remus-net"] {
                let _ = fs::remove_file(sh.join("bin").join(b));
            }
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// The machine-wide lab lock: one lab at a time per machine, whichever checkout boots it
/// (two emulated Xen hosts of different checkouts on 2 shared cores starve each other
/// into heartbeat timeouts). Taken before building or booting; the fd is inherited by
/// QEMU, so the lock lives exactly as long as the lab's QEMU does (and is released by
/// the kernel when it dies, however it dies).
fn lock_path() -> PathBuf {
    util::cache_dir().join("lab.lock")
}

/// How long `up` waits for another checkout's lab to finish.
const LOCK_WAIT: Duration = Duration::from_secs(3 * 3600);

/// Takes the lab lock (waiting for another lab to finish), and returns its fd with
/// close-on-exec cleared, so the QEMU started next inherits it.
pub fn take_lock() -> Result<fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    fs::create_dir_all(util::cache_dir())?;
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock_path())
        .with_context(|| format!("opening {}", lock_path().display()))?;
    let t = Instant::now();
    let mut said = false;
    loop {
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            bail!("locking {}: {e}", lock_path().display());
        }
        if !said {
            let mut owner = String::new();
            let _ = f.read_to_string(&mut owner);
            eprintln!(
                "[lab] another lab is running on this machine ({}); waiting for it to stop",
                owner.trim()
            );
            said = true;
        }
        if t.elapsed() > LOCK_WAIT {
            bail!(
                "another lab held {} for more than {} s",
                lock_path().display(),
                LOCK_WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    f.set_len(0)?;
    f.rewind()?;
    let _ = write!(f, "{} (pid {})", util::root().display(), std::process::id());
    // SAFETY: F_SETFD on an fd we own: clear FD_CLOEXEC so QEMU inherits the lock.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, 0) };
    Ok(f)
}

/// Boots the lab unless it is already up. Returns the boot time (None if it was up).
pub fn up(need_remus: bool) -> Result<Option<Duration>> {
    if let Some(pid) = qemu_pid() {
        eprintln!("[lab] already up (QEMU pid {pid}); `cargo xtask lab down` to stop it");
        return Ok(None);
    }
    // Held until this process exits; QEMU inherits it and holds it while it runs.
    let _lock = take_lock()?;
    let a = super::build::build()?;
    stage(&a, need_remus)?;
    let _ = fs::remove_file(serial_log());
    let _ = fs::remove_file(pid_file());
    let qlog = run_dir().join("qemu.log");
    let mut c = qemu_command(&a);
    let qf = fs::File::create(&qlog).with_context(|| format!("creating {}", qlog.display()))?;
    c.stdout(qf.try_clone()?).stderr(qf);
    let t = Instant::now();
    eprintln!(
        "[lab] booting Xen + dom0 in QEMU (serial console: {})",
        serial_log().display()
    );
    let st = c.status().context("starting QEMU")?;
    if !st.success() {
        bail!("QEMU failed to start ({st}): {}", tail_file(&qlog, 20));
    }
    wait_ready(t, &qlog)?;
    let d = t.elapsed();
    eprintln!("[lab] dom0 ready in {:.1} s", d.as_secs_f64());
    Ok(Some(d))
}

/// QEMU booting Xen with dom0 from the cached image, daemonized with its pid file.
fn qemu_command(a: &Artifacts) -> Command {
    let initrd_arg = format!(
        "{} {DOM0_ARGS},{}",
        a.dom0.join("vmlinuz").display(),
        a.dom0.join("initrd.img").display()
    );
    let mut c = Command::new(a.qemu_bin());
    c.env("QEMU_MODULE_DIR", a.qemu.join("modules"))
        .arg("-L")
        .arg(a.qemu.join("fw"))
        .args(["-machine", "pc", "-accel", "tcg,thread=multi"])
        .args(["-cpu", "qemu64,+svm", "-m", QEMU_MEM_MB, "-smp", "2"])
        .args(["-display", "none", "-nodefaults", "-monitor", "none"])
        .args(["-nic", "none", "-chardev"])
        .arg(format!("file,id=s0,path={}", serial_log().display()))
        .args(["-serial", "chardev:s0", "-drive"])
        // snapshot=on: writes go to a temporary overlay, the cached image never changes.
        .arg(format!(
            "file={},format=raw,if=virtio,cache=unsafe,snapshot=on",
            a.dom0.join("dom0.img").display()
        ))
        .arg("-kernel")
        .arg(a.dom0.join("xen"))
        .args(["-append", XEN_ARGS, "-initrd"])
        .arg(initrd_arg)
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=share,security_model=none,id=share",
            share().display()
        ))
        .arg("-pidfile")
        .arg(pid_file())
        .arg("-daemonize")
        .stdin(Stdio::null());
    c
}

/// Waits for dom0's setup to finish and its agent to answer; stops QEMU if it does not
/// within `BOOT_TIMEOUT` of `t`.
fn wait_ready(t: Instant, qlog: &Path) -> Result<()> {
    let ready = share().join("run/dom0-ready");
    while !ready.exists() {
        if qemu_pid().is_none() {
            bail!(
                "QEMU exited during boot; serial console tail:\n{}\nqemu.log: {}",
                tail_file(&serial_log(), 40),
                tail_file(qlog, 10)
            );
        }
        if t.elapsed() > BOOT_TIMEOUT {
            let _ = down();
            bail!(
                "dom0 was not ready within {} s; serial console tail:\n{}\ndom0 setup log:\n{}",
                BOOT_TIMEOUT.as_secs(),
                tail_file(&serial_log(), 40),
                tail_file(&share().join("run/dom0-setup.log"), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    dom0::exec_ok("agent check", "true", Duration::from_secs(60)).inspect_err(|_| {
        let _ = down();
    })?;
    Ok(())
}

/// Stops QEMU (TERM, then KILL after 10 s). The disk overlay is discarded with it.
pub fn down() -> Result<()> {
    let Some(pid) = qemu_pid() else {
        eprintln!("[lab] not running");
        return Ok(());
    };
    // SAFETY: kill(2) on a pid we read from our own pid file and checked is QEMU.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    for _ in 0..100 {
        if qemu_pid().is_none() {
            let _ = fs::remove_file(pid_file());
            eprintln!("[lab] stopped (QEMU pid {pid})");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = fs::remove_file(pid_file());
    eprintln!("[lab] killed (QEMU pid {pid})");
    Ok(())
}

/// The tails of every console: Xen + dom0 (serial), dom0's setup log, guest consoles.
pub fn consoles(n: usize) -> String {
    let mut s = String::new();
    let mut add = |title: &str, p: &Path| {
        s.push_str(&format!(
            "===== {title} ({}) =====\n{}\n",
            p.display(),
            tail_file(p, n)
        ));
    };
    add("Xen + dom0 serial console", &serial_log());
    add("dom0 setup", &share().join("run/dom0-setup.log"));
    if let Ok(rd) = fs::read_dir(share().join("run/console")) {
        let mut v: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        v.sort();
        for p in v {
            add("guest console", &p);
        }
    }
    s
}
