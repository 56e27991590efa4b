//! What each host boots with besides the cached image: its virtio-9p share (dom0's
//! `/share`).
//!
//! Owns: the contents of `target/lab/<host>/share/`: `lab/dom0/*.sh` (the dom0 scripts),
//! `lab/host.env` (which host this is: its addresses and NIC MACs, from topology.rs),
//! `lab/remus.key` (the relay key, generated per lab and the same in both shares),
//! `pkg/remus.deb` (the project's Debian package, `cargo xtask package`'s, built fresh on
//! every `lab up` and installed by dom0's setup.sh with `dpkg -i`, never baked into the
//! image), `guest/` (kernel + initrd), `req/` (the agent's requests) and `run/` (dom0's
//! logs). Never touches: the cache (read only) or QEMU.
use super::{
    build::{self, Artifacts},
    topology::Host,
    vm,
};
use anyhow::{Context, Result};
use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
};

fn copy_into(src: &Path, dst: &Path) -> Result<()> {
    fs::copy(src, dst)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    Ok(())
}

/// Builds the Debian package (`cargo xtask package`: `remus` and `remus-net` in release,
/// the units, the config, the hotplug script) that dom0 installs. Returns the error
/// instead of failing so a lab that does not need it (the anchor alone, the capture) can
/// go on.
fn build_deb() -> Result<PathBuf> {
    crate::package::build().context("building the Debian package (cargo xtask package) failed")
}

/// A fresh relay key: 32 random bytes, hex, one line.
fn new_key() -> Result<String> {
    let mut b = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom for the relay key")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect::<String>() + "\n")
}

/// `lab/host.env`: sourced by dom0's setup.sh and lab.sh.
fn host_env(h: Host) -> String {
    let peer = match h {
        Host::A => Host::B,
        Host::B => Host::A,
    };
    format!(
        "LAB_HOST={}\nLAB_BRIDGE_IP={}\nLAB_LAN_MAC={}\nLAB_REPL_MAC={}\nLAB_REPL_IP={}\n\
         LAB_PEER_REPL_IP={}\n",
        h.name(),
        h.bridge_ip(),
        h.lan_mac(),
        h.repl_mac(),
        h.repl_ip(),
        peer.repl_ip(),
    )
}

/// Fills both hosts' shares for a fresh lab. `need_remus`: fail if remus cannot be built.
pub fn stage_all(a: &Artifacts, need_remus: bool) -> Result<()> {
    let remus = match build_deb() {
        Ok(deb) => Some(deb),
        Err(e) if !need_remus => {
            eprintln!("[lab] warning: {e:#}; dom0 gets no remus package this time");
            None
        }
        Err(e) => return Err(e),
    };
    let key = new_key()?;
    for h in Host::ALL {
        stage(h, a, remus.as_deref(), &key)?;
    }
    Ok(())
}

fn stage(h: Host, a: &Artifacts, deb: Option<&Path>, key: &str) -> Result<()> {
    let sh = vm::share(h);
    // `bin/`: where earlier labs copied the binaries; gone, so nothing shadows the package.
    for d in ["run", "req", "lab", "bin", "pkg"] {
        let p = sh.join(d);
        if p.exists() {
            fs::remove_dir_all(&p).with_context(|| format!("clearing {}", p.display()))?;
        }
    }
    for d in ["pkg", "guest", "lab/dom0", "req", "run"] {
        fs::create_dir_all(sh.join(d))?;
    }
    for e in fs::read_dir(build::lab_src().join("dom0"))?.flatten() {
        if e.path().is_file() {
            copy_into(&e.path(), &sh.join("lab/dom0").join(e.file_name()))?;
        }
    }
    fs::write(sh.join("lab/host.env"), host_env(h))?;
    fs::write(sh.join("lab/remus.key"), key)?;
    copy_into(&a.dom0.join("vmlinuz"), &sh.join("guest/vmlinuz"))?;
    copy_into(&a.guest_initrd, &sh.join("guest/initrd.img"))?;
    if let Some(deb) = deb {
        copy_into(deb, &sh.join("pkg/remus.deb"))?;
    }
    Ok(())
}

/// Before a host boots again in a running lab (after a power-off): its logs stay, the
/// readiness mark and stale requests go.
pub fn reset_for_boot(h: Host) -> Result<()> {
    let sh = vm::share(h);
    let _ = fs::remove_file(sh.join("run/dom0-ready"));
    let req = sh.join("req");
    if req.exists() {
        fs::remove_dir_all(&req).with_context(|| format!("clearing {}", req.display()))?;
    }
    fs::create_dir_all(&req)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_env_names_the_host_and_its_peer() {
        let a = host_env(Host::A);
        assert!(a.contains("LAB_HOST=a\n"));
        assert!(a.contains("LAB_REPL_IP=169.254.200.1\n"));
        assert!(a.contains("LAB_PEER_REPL_IP=169.254.200.2\n"));
        assert!(host_env(Host::B).contains("LAB_BRIDGE_IP=169.254.0.3\n"));
    }

    #[test]
    fn a_key_is_64_hex_digits_and_a_newline() -> Result<()> {
        let k = new_key()?;
        assert_eq!(k.len(), 65);
        assert!(k.trim_end().chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(k, new_key()?);
        Ok(())
    }
}
