//! The real `Host` and `Backup` of the checks: this machine's /proc, /sys, the buffer's
//! runtime files and pins, and a TCP probe of the backup.
//!
//! Owns: reading those facts. Never touches: anything it reads (no signals, no detach,
//! no writes): acting on them is the caller's decision.
use std::path::Path;
use std::time::Duration;

use super::checks::{Backup, Host, LeftBuffer};
use super::probe::{self, ProbeError, ProbeOk};
use super::state::{self, ProtectState};
use crate::replication::Key;

pub struct RealHost;

/// argv of a live process, or None.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    // Every argument ends with a NUL; empty arguments (`-s ''`) are kept.
    let body = raw.strip_suffix(&[0]).unwrap_or(&raw);
    if body.is_empty() {
        return None;
    }
    Some(
        body.split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

pub fn pid_alive(pid: u32) -> bool {
    crate::netbuf::pid_alive(pid)
}

/// `pid` runs `remus protect` (checked through its argv, so a recycled pid is not
/// mistaken for it).
pub fn protect_pid_matches(pid: u32) -> bool {
    cmdline(pid).is_some_and(|a| {
        a.first()
            .and_then(|p| Path::new(p).file_name())
            .is_some_and(|n| n == "remus")
            && a.iter().any(|x| x == "protect")
    })
}

/// The pid of a live `remus protect` of `domain`.
pub fn protect_pid(dir: &Path, domain: &str) -> Option<u32> {
    let s: ProtectState = state::read_json(&state::protect_path(dir, domain))?;
    protect_pid_matches(s.pid).then_some(s.pid)
}

/// The domain an `xl … remus [opts] DOMAIN HOST` argv is about.
pub fn xl_remus_domain(argv: &[String]) -> Option<&str> {
    let prog = argv.first()?;
    if Path::new(prog).file_name()? != "xl" {
        return None;
    }
    let i = argv.iter().position(|a| a == "remus")?;
    let mut it = argv[i + 1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            // Options of `xl remus` that take a value (getopt "Fbundi:s:N:ecp").
            "-i" | "-s" | "-N" => {
                it.next();
            }
            o if o.starts_with('-') && o.len() > 1 => {
                // Bundled flags; a value glued to -i/-s/-N (`-i200`) needs no skip.
            }
            d => return Some(d),
        }
    }
    None
}

impl Host for RealHost {
    fn is_root(&self) -> bool {
        crate::netbuf::is_root()
    }

    fn iface_exists(&self, name: &str) -> bool {
        Path::new("/sys/class/net").join(name).exists()
    }

    fn nbd_available(&self) -> bool {
        if Path::new("/sys/module/nbd").exists() {
            return true;
        }
        // Loadable? `modprobe -n` resolves the module without loading it.
        std::process::Command::new("modprobe")
            .args(["-n", "-q", "nbd"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn buffer_on(&self, iface: &str) -> LeftBuffer {
        if let Some(s) = crate::netbuf::read_state(iface)
            && pid_alive(s.pid)
        {
            return LeftBuffer::Live { pid: s.pid };
        }
        // Where this process finds the pins (the host's bpffs, even from another mount
        // namespace), as the buffer's own `status` and `detach` look for them.
        match crate::netbuf::pinned_state(iface).map(|(p, _)| p) {
            Ok(Some(p)) if p.mode == remus_common::MODE_PASSTHROUGH => LeftBuffer::Passthrough,
            // Unreadable pins are treated like holding ones: never assume it is open.
            Ok(Some(_)) | Err(_) => LeftBuffer::Holding,
            Ok(None) => LeftBuffer::None,
        }
    }

    fn protect_running(&self, domain: &str) -> Option<u32> {
        protect_pid(&state::run_dir(), domain)
    }

    fn xl_remus_running(&self, name: &str, domid: u32) -> Option<u32> {
        let id = domid.to_string();
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                cmdline(*pid)
                    .as_deref()
                    .and_then(xl_remus_domain)
                    .is_some_and(|d| d == name || d == id)
            })
    }
}

pub struct RealBackup {
    pub timeout: Duration,
}

impl Backup for RealBackup {
    async fn probe(&self, addr: &str, key: &Key) -> Result<ProbeOk, ProbeError> {
        probe::probe(addr, key, self.timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn xl_remus_argv_names_its_domain() {
        assert_eq!(
            xl_remus_domain(&v(
                "/usr/lib/xen-4.17/bin/xl -vvv remus -F -n -i 200 -s x guest cmd"
            )),
            Some("guest")
        );
        assert_eq!(xl_remus_domain(&v("xl remus -Fn -i200 7 host")), Some("7"));
        // `-s ''`: the empty value is an argument of its own.
        let mut a = v("xl remus -F -n -s");
        a.extend([
            "".to_string(),
            "web".to_string(),
            "remus relay send".to_string(),
        ]);
        assert_eq!(xl_remus_domain(&a), Some("web"));
        assert_eq!(xl_remus_domain(&v("xl list")), None);
        assert_eq!(xl_remus_domain(&v("sh -c xl remus guest")), None);
    }

    #[test]
    fn this_process_is_alive_and_has_an_argv() {
        let me = std::process::id();
        assert!(pid_alive(me));
        assert!(!cmdline(me).unwrap().is_empty());
    }
}
