//! Network namespaces: entering one on the calling thread (and leaving it again), running
//! a closure on a fresh thread inside one, and removing a namespace with what runs in it.
//!
//! Owns: the calling thread's network namespace while a `NetNsGuard` lives, and the
//! namespaces a caller asks it to remove. Never touches: mount or pid namespaces.
use std::{fs::File, os::fd::AsRawFd, path::Path};

use crate::{KitError, Result, cmd, io_err};

/// The file `ip netns` keeps for namespace `ns`.
pub fn ns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

pub fn exists(ns: &str) -> bool {
    Path::new(&ns_path(ns)).exists()
}

fn setns(f: &File, what: &str) -> Result<()> {
    // SAFETY: setns on a valid fd; CLONE_NEWNET affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io_err(what.to_string())(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Moves the calling thread into network namespace `ns` for good (a thread of its own).
pub fn enter_netns(ns: &str) -> Result<()> {
    let f = File::open(ns_path(ns)).map_err(io_err(format!("opening {}", ns_path(ns))))?;
    setns(&f, &format!("setns into {ns}"))
}

/// The calling thread inside a network namespace until dropped, then back where it was
/// (as aya's test helpers do, but for a namespace that already exists).
pub struct NetNsGuard {
    back: File,
}

impl NetNsGuard {
    pub fn enter(ns: &str) -> Result<NetNsGuard> {
        let back = File::open("/proc/thread-self/ns/net")
            .map_err(io_err("opening this thread's network namespace"))?;
        enter_netns(ns)?;
        Ok(NetNsGuard { back })
    }
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        // Failing to go back would leave this thread in a test's namespace: say so loudly.
        if let Err(e) = setns(&self.back, "returning to the original network namespace") {
            eprintln!("NetNsGuard: {e}");
        }
    }
}

/// Runs `f` on a fresh thread inside network namespace `ns` and returns its result
/// (sockets it creates stay in that namespace). A panic in `f` is passed on.
pub fn in_netns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
    let ns = ns.to_string();
    let h = std::thread::spawn(move || -> Result<R> {
        enter_netns(&ns)?;
        Ok(f())
    });
    h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Kills every process inside namespace `ns` (they belong to whoever made it), then
/// deletes it. Missing namespaces are fine.
pub fn remove(ns: &str) {
    if !exists(ns) {
        return;
    }
    if let Ok(o) = cmd::run("ip", &["netns", "pids", ns]) {
        for p in o
            .stdout
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
    let _ = cmd::run("ip", &["netns", "del", ns]);
}

/// Creates namespace `ns` with loopback up and, unless `ipv6`, IPv6 off (no router
/// solicitations or DAD in front of test traffic).
pub fn create(ns: &str, ipv6: bool) -> Result<()> {
    cmd::must("ip", &["netns", "add", ns])?;
    if !ipv6 {
        for s in [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ] {
            cmd::run_in(ns, "sysctl", &["-qw", s])?.check("sysctl")?;
        }
    }
    cmd::ip(ns, &["link", "set", "lo", "up"]).map(|_| ())
}

/// The error for a namespace that should be there and is not.
pub fn missing(ns: &str) -> KitError {
    KitError::Missing(format!("no network namespace {ns}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entering_a_namespace_that_does_not_exist_is_an_error() {
        assert!(matches!(
            enter_netns("remus-testkit-no-such-ns"),
            Err(KitError::Io { .. })
        ));
        assert!(in_netns("remus-testkit-no-such-ns", || 1).is_err());
        assert!(!exists("remus-testkit-no-such-ns"));
    }
}
