//! The lab's networks: the switch, a QEMU without a machine (`-machine none`: no CPU, no
//! guest code) whose three hubs are the client LAN (the client's tap, host A, host B),
//! the replication link (host A, host B) and the second client LAN (the client's second
//! tap, host A, host B: two-vif guests); the client's network namespace on the
//! machine; and the link switch (QMP `set_link` on the replication hub's ports).
//!
//! Why a switch of its own: the client must keep one TCP connection to the guest's MAC
//! and address on whichever host runs it, as on a real LAN with two hosts, so the LAN
//! outlives either host's QEMU (power-off kills one QEMU, never the LAN); the replication
//! link is a second hub so that cutting it leaves the clients' LAN alone. A host's QEMU
//! connects to its hub ports over TCP on 127.0.0.1 (QEMU socket netdevs); a port whose
//! host died takes the host back when it boots again. Nothing leaves the machine: the
//! tap lives in its own namespace with a link-local address.
//!
//! Owns: `target/lab/switch/` (`qemu.pid`, `qemu.log`, `qmp.sock`, `ports.json`), the tap
//! `remuslab0`, the second client LAN's tap `remuslab1` and the namespace
//! `remus-lab` (and the processes in it). Never touches: the
//! hosts' QEMUs (vm.rs) or the machine's other interfaces and namespaces.
use super::{
    build::{Artifacts, tail_file},
    lock, qmp,
    topology::{CLIENT_IP, CLIENT_NETNS, CLIENT_TAP, CLIENT2_IP, CLIENT2_TAP, Host},
    vm,
};
use crate::util;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::{
    fs,
    net::TcpListener,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

fn dir() -> PathBuf {
    vm::run_dir().join("switch")
}
fn pid_file() -> PathBuf {
    dir().join("qemu.pid")
}
fn qmp_sock() -> PathBuf {
    dir().join("qmp.sock")
}

/// The switch's TCP ports on 127.0.0.1, one per host and network.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub struct Ports {
    lan_a: u16,
    lan_b: u16,
    repl_a: u16,
    repl_b: u16,
    lan2_a: u16,
    lan2_b: u16,
}

impl Ports {
    pub fn lan(&self, h: Host) -> u16 {
        match h {
            Host::A => self.lan_a,
            Host::B => self.lan_b,
        }
    }
    pub fn repl(&self, h: Host) -> u16 {
        match h {
            Host::A => self.repl_a,
            Host::B => self.repl_b,
        }
    }
    /// The host's port on the second client LAN (hub 2).
    pub fn lan2(&self, h: Host) -> u16 {
        match h {
            Host::A => self.lan2_a,
            Host::B => self.lan2_b,
        }
    }
}

/// The running switch's pid.
pub fn pid() -> Option<i32> {
    vm::qemu_running(&pid_file())
}

/// The ports the running switch listens on.
pub fn ports() -> Result<Ports> {
    let p = dir().join("ports.json");
    let b = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(serde_json::from_slice(&b)?)
}

/// Six free ports on 127.0.0.1 (held together while picked, so they differ).
fn free_ports() -> Result<Ports> {
    let l: Vec<TcpListener> = (0..6)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .context("finding free ports on 127.0.0.1 for the switch")?;
    let p: Vec<u16> = l
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()?;
    Ok(Ports {
        lan_a: p[0],
        lan_b: p[1],
        repl_a: p[2],
        repl_b: p[3],
        lan2_a: p[4],
        lan2_b: p[5],
    })
}

/// `-netdev` arguments: netdev `id` and its port on hub `hub`.
fn port(hub: u8, id: &str, netdev: String) -> [String; 4] {
    [
        "-netdev".into(),
        format!("{netdev},id={id}"),
        "-netdev".into(),
        format!("hubport,id={id}-port,hubid={hub},netdev={id}"),
    ]
}

fn command(a: &Artifacts, p: &Ports) -> Command {
    let listen = |port: u16| format!("socket,listen=127.0.0.1:{port}");
    let mut c = Command::new(a.qemu_bin());
    c.env("QEMU_MODULE_DIR", a.qemu.join("modules"))
        .args(["-machine", "none", "-nodefaults", "-display", "none"])
        .args(["-monitor", "none", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", qmp_sock().display()))
        .args(port(
            0,
            "lan-tap",
            format!("tap,ifname={CLIENT_TAP},script=no,downscript=no"),
        ))
        .args(port(0, "lan-a", listen(p.lan_a)))
        .args(port(0, "lan-b", listen(p.lan_b)))
        .args(port(1, "repl-a", listen(p.repl_a)))
        .args(port(1, "repl-b", listen(p.repl_b)))
        .args(port(
            2,
            "lan2-tap",
            format!("tap,ifname={CLIENT2_TAP},script=no,downscript=no"),
        ))
        .args(port(2, "lan2-a", listen(p.lan2_a)))
        .args(port(2, "lan2-b", listen(p.lan2_b)))
        .arg("-pidfile")
        .arg(pid_file())
        .arg("-daemonize")
        .stdin(Stdio::null());
    c
}

/// Starts the switch (it inherits the lab lock, which the caller holds) and puts its tap
/// into the client's namespace with the client's address.
pub fn up(a: &Artifacts) -> Result<()> {
    fs::create_dir_all(dir())?;
    clear_netns()?;
    let ports = free_ports()?;
    fs::write(dir().join("ports.json"), serde_json::to_string(&ports)?)?;
    let _ = fs::remove_file(qmp_sock());
    let qlog = dir().join("qemu.log");
    let mut c = command(a, &ports);
    lock::inherit(&mut c)?;
    let qf = fs::File::create(&qlog)?;
    c.stdout(qf.try_clone()?).stderr(qf);
    let st = c.status().context("starting the switch's QEMU")?;
    if !st.success() {
        bail!("the switch's QEMU failed ({st}): {}", tail_file(&qlog, 20));
    }
    let ns = ["ip", "-n", CLIENT_NETNS];
    let steps: [&[&str]; 5] = [
        &["ip", "netns", "add", CLIENT_NETNS],
        &["ip", "link", "set", CLIENT_TAP, "netns", CLIENT_NETNS],
        &[
            ns[0],
            ns[1],
            ns[2],
            "addr",
            "add",
            &format!("{CLIENT_IP}/16"),
            "dev",
            CLIENT_TAP,
        ],
        &[ns[0], ns[1], ns[2], "link", "set", CLIENT_TAP, "up"],
        &[ns[0], ns[1], ns[2], "link", "set", "lo", "up"],
    ];
    for argv in steps {
        util::run(Command::new(argv[0]).args(&argv[1..]))
            .context("setting up the client's namespace")?;
    }
    second_lan()?;
    eprintln!(
        "[lab] switch up (pid {}): client LAN and replication link; client namespace {CLIENT_NETNS}",
        pid().unwrap_or_default()
    );
    Ok(())
}

/// The second client LAN's end in the client's namespace: the switch's second tap (hub
/// 2), with the client's second address (two-vif guests; see topology.rs).
fn second_lan() -> Result<()> {
    let addr = format!("{CLIENT2_IP}/24");
    let ns = ["-n", CLIENT_NETNS];
    let steps: [&[&str]; 3] = [
        &["link", "set", CLIENT2_TAP, "netns", CLIENT_NETNS],
        &[ns[0], ns[1], "addr", "add", &addr, "dev", CLIENT2_TAP],
        &[ns[0], ns[1], "link", "set", CLIENT2_TAP, "up"],
    ];
    for argv in steps {
        util::run(Command::new("ip").args(argv))
            .context("setting up the second client LAN in the client's namespace")?;
    }
    Ok(())
}

/// Kills the processes left in the client's namespace (by pid) and deletes it.
fn clear_netns() -> Result<()> {
    if !PathBuf::from("/run/netns").join(CLIENT_NETNS).exists() {
        return Ok(());
    }
    let out = Command::new("ip")
        .args(["netns", "pids", CLIENT_NETNS])
        .output()?;
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2) on a process inside the lab's own namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    util::run(Command::new("ip").args(["netns", "del", CLIENT_NETNS]))
}

/// The replication link goes dark (`up` false) or comes back: both of its hub ports at
/// the switch stop (or resume) passing frames. The hosts' NICs keep their carrier: a dead
/// switch or a cut fibre in between, not a pulled cable. Returns the moment (Unix seconds).
pub fn set_repl_link(up: bool) -> Result<f64> {
    for id in ["repl-a-port", "repl-b-port"] {
        qmp::execute(&qmp_sock(), "set_link", json!({"name": id, "up": up}))?;
    }
    Ok(vm::unix_now())
}

/// Stops the switch (TERM, then KILL) and removes the client's namespace.
pub fn down() -> Result<()> {
    if let Some(pid) = pid() {
        // SAFETY: kill(2) on the pid from our pid file, checked to be QEMU.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        for _ in 0..50 {
            if self::pid().is_none() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if self::pid().is_some() {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = fs::remove_file(pid_file());
        eprintln!("[lab] switch stopped (QEMU pid {pid})");
    }
    clear_netns()
}
