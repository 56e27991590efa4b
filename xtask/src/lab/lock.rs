//! The machine-wide lab lock: one lab at a time per machine, whichever checkout boots it
//! (two emulated labs of different checkouts on 2 shared cores starve each other into
//! heartbeat timeouts).
//!
//! Owns: `$REMUS_CACHE/lab.lock` and this process's hold on it. Every QEMU of the lab (the
//! switch, host A, host B) inherits the same open file description of the lock, so the
//! lock lives exactly as long as any of them does and is released by the kernel when the
//! last one dies, however it dies. A host booted again while the lab runs (after a
//! power-off) gets the same description, borrowed from a running lab QEMU with
//! `pidfd_getfd(2)` when this process does not hold it. Never touches: QEMU itself (the
//! callers start it) or any other file.
use crate::util;
use anyhow::{Context, Result, bail};
use std::{
    fs,
    io::{Read, Seek, Write},
    os::fd::{AsRawFd, FromRawFd, RawFd},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// How long a lab waits for another checkout's lab to finish.
const LOCK_WAIT: Duration = Duration::from_secs(3 * 3600);

/// This process's hold on the lock, once taken or borrowed.
static HELD: Mutex<Option<fs::File>> = Mutex::new(None);
/// How long this process waited for another lab (ms), for the report.
static WAITED_MS: AtomicU64 = AtomicU64::new(0);

/// How long this process waited for another checkout's lab to stop.
pub fn waited() -> Duration {
    Duration::from_millis(WAITED_MS.load(Ordering::Relaxed))
}

fn lock_path() -> PathBuf {
    util::cache_dir().join("lab.lock")
}

/// Takes the lock (waiting for another lab to finish) and returns it; it is released when
/// the file is dropped, unless a QEMU inherited it.
pub fn take() -> Result<fs::File> {
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
    WAITED_MS.fetch_add(t.elapsed().as_millis() as u64, Ordering::Relaxed);
    f.set_len(0)?;
    f.rewind()?;
    let _ = write!(f, "{} (pid {})", util::root().display(), std::process::id());
    Ok(f)
}

/// Makes sure this process holds the lab lock before it starts a lab QEMU: borrowed from
/// `running` (pids of this lab's running QEMUs) if any, taken otherwise.
pub fn hold(running: &[i32]) -> Result<()> {
    let mut held = HELD
        .lock()
        .map_err(|_| anyhow::anyhow!("lab lock poisoned"))?;
    if held.is_some() {
        return Ok(());
    }
    for &pid in running {
        if let Some(f) = borrow(pid)? {
            *held = Some(f);
            return Ok(());
        }
    }
    *held = Some(take()?);
    Ok(())
}

/// The lock's open file description, duplicated out of process `pid` if it holds it.
fn borrow(pid: i32) -> Result<Option<fs::File>> {
    let want = lock_path();
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Ok(None);
    };
    for e in rd.flatten() {
        if fs::read_link(e.path()).ok().as_ref() != Some(&want) {
            continue;
        }
        let Some(target) = e.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else {
            continue;
        };
        // SAFETY: plain syscalls on a pid and fd numbers; the results are checked.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
        if pidfd < 0 {
            bail!("pidfd_open({pid}): {}", std::io::Error::last_os_error());
        }
        // SAFETY: as above; pidfd is ours and closed right after.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, target, 0) } as RawFd;
        let err = std::io::Error::last_os_error();
        // SAFETY: closing the pidfd we opened.
        unsafe { libc::close(pidfd) };
        if fd < 0 {
            bail!("pidfd_getfd({pid}, {target}): {err}");
        }
        // SAFETY: pidfd_getfd returned a new fd that nothing else owns.
        return Ok(Some(unsafe { fs::File::from_raw_fd(fd) }));
    }
    Ok(None)
}

/// Lets the QEMU `c` will start inherit the lock (which `hold` must have secured):
/// close-on-exec is cleared in the child only, so no other child keeps the lock alive.
pub fn inherit(c: &mut Command) -> Result<()> {
    let held = HELD
        .lock()
        .map_err(|_| anyhow::anyhow!("lab lock poisoned"))?;
    let fd = held
        .as_ref()
        .context("the lab lock must be held before QEMU starts")?
        .as_raw_fd();
    // SAFETY: fcntl is async-signal-safe; it runs in the forked child before exec.
    unsafe {
        c.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}
