//! The lab's two hosts: QEMU (software emulation) booting Xen 4.17 + dom0 as host A and
//! host B, and the failure switches on a host's QEMU (power-off, freeze, thaw).
//!
//! Owns: `target/lab/<host>/` at run time (`share/`, filled by share.rs; `serial.log`,
//! Xen + dom0's console; `qemu.pid`; `qemu.log`). Both hosts boot the one cached image
//! with `snapshot=on`: each gets its own copy-on-write overlay, thrown away when its QEMU
//! stops. Never touches: the cache (read only), the switch and the client LAN
//! (switch.rs), dom0's insides (dom0.rs talks to its agent).
use super::{
    build::{self, Artifacts, tail_file},
    dom0, lock, share, switch,
    topology::Host,
};
use crate::util;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// QEMU's memory (MiB), Xen's command line. dom0 gets 1 GiB (with 512 MiB the relay's
/// sender was OOM-killed when both relay ends ran in one dom0). `bootscrub=idle`: free
/// memory is scrubbed in the background and before it is handed out, so guests start from
/// zeroed pages (with `bootscrub=false` they got leftovers of the boot modules, which made
/// the migration stream incompressible); boot time is unchanged.
const QEMU_MEM_MB: &str = "2048";
const XEN_ARGS: &str = "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=2 \
    loglvl=all guest_loglvl=all noreboot console_timestamps=boot bootscrub=idle";
const DOM0_ARGS: &str = "console=hvc0 earlyprintk=xen root=/dev/vda rw init=/lab/bin/init";
/// Bound on QEMU start → dom0 ready (one host alone 17–72 s, the second beside it ~51 s,
/// on 2 shared cores).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

pub fn run_dir() -> PathBuf {
    util::root().join("target/lab")
}
fn host_dir(h: Host) -> PathBuf {
    run_dir().join(h.name())
}
pub fn share(h: Host) -> PathBuf {
    host_dir(h).join("share")
}
pub fn serial_log(h: Host) -> PathBuf {
    host_dir(h).join("serial.log")
}
fn pid_file(h: Host) -> PathBuf {
    host_dir(h).join("qemu.pid")
}

/// Unix time now, in seconds (the client's clock: failures are stamped with it).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The pid in `pid_file` if that process is alive and is a QEMU.
pub fn qemu_running(pid_file: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(pid_file).ok()?.trim().parse().ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains("qemu-system")
        .then_some(pid)
}

/// The pid of host `h`'s QEMU if it is running.
pub fn qemu_pid(h: Host) -> Option<i32> {
    qemu_running(&pid_file(h))
}

/// The pids of every running QEMU of this lab (hosts and switch).
fn lab_pids() -> Vec<i32> {
    Host::ALL
        .iter()
        .filter_map(|h| qemu_pid(*h))
        .chain(switch::pid())
        .collect()
}

/// One host's boot, as the report records it.
#[derive(Serialize, Debug, Clone)]
pub struct Boot {
    pub host: Host,
    /// QEMU start to dom0's agent answering.
    pub s: f64,
}

/// Boots what of `hosts` is not running (and the switch first, if it is not), in
/// parallel. A fresh lab gets fresh shares; a host booting again in a running lab keeps
/// its logs. Returns each boot it did.
pub fn up(hosts: &[Host], need_remus: bool) -> Result<Vec<Boot>> {
    let down: Vec<Host> = hosts
        .iter()
        .copied()
        .filter(|h| qemu_pid(*h).is_none())
        .collect();
    if down.is_empty() {
        return Ok(vec![]);
    }
    lock::hold(&lab_pids())?;
    let a = build::build()?;
    if switch::pid().is_none() {
        share::stage_all(&a, need_remus)?;
        switch::up(&a)?;
    } else {
        for h in &down {
            share::reset_for_boot(*h)?;
        }
    }
    let t = Instant::now();
    for h in &down {
        start(*h, &a)?;
    }
    let mut boots = vec![];
    let mut waiting = down.clone();
    while !waiting.is_empty() {
        std::thread::sleep(Duration::from_millis(500));
        for h in waiting.clone() {
            if ready(h, t)? {
                let s = t.elapsed().as_secs_f64();
                eprintln!("[lab] host {}: dom0 ready in {s:.1} s", h.name());
                boots.push(Boot { host: h, s });
                waiting.retain(|w| *w != h);
            }
        }
    }
    Ok(boots)
}

/// Starts host `h`'s QEMU (daemonized; it inherits the lab lock).
fn start(h: Host, a: &Artifacts) -> Result<()> {
    let _ = fs::remove_file(serial_log(h));
    let _ = fs::remove_file(pid_file(h));
    let qlog = host_dir(h).join("qemu.log");
    let mut c = qemu_command(h, a, &switch::ports()?);
    lock::inherit(&mut c)?;
    let qf = fs::File::create(&qlog).with_context(|| format!("creating {}", qlog.display()))?;
    c.stdout(qf.try_clone()?).stderr(qf);
    eprintln!(
        "[lab] host {}: booting Xen + dom0 in QEMU (serial console: {})",
        h.name(),
        serial_log(h).display()
    );
    let st = c.status().context("starting QEMU")?;
    if !st.success() {
        bail!(
            "host {}: QEMU failed to start ({st}): {}",
            h.name(),
            tail_file(&qlog, 20)
        );
    }
    Ok(())
}

/// QEMU booting Xen with dom0 from the cached image, its three NICs on the switch's client
/// LAN, replication link and second client LAN, daemonized with its pid file.
fn qemu_command(h: Host, a: &Artifacts, ports: &switch::Ports) -> Command {
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
        .args(nic("lan", ports.lan(h), h.lan_mac()))
        .args(nic("repl", ports.repl(h), h.repl_mac()))
        .args(nic("lan2", ports.lan2(h), h.lan2_mac()))
        .arg("-chardev")
        .arg(format!("file,id=s0,path={}", serial_log(h).display()))
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
            share(h).display()
        ))
        .arg("-pidfile")
        .arg(pid_file(h))
        .arg("-daemonize")
        .stdin(Stdio::null());
    c
}

/// A virtio NIC on a socket netdev connected to the switch's port. `romfile=`: the
/// unpacked QEMU has no `efi-virtio.rom`, and nothing here boots from the network.
fn nic(id: &str, port: u16, mac: &str) -> [String; 4] {
    [
        "-netdev".into(),
        format!("socket,id={id},connect=127.0.0.1:{port}"),
        "-device".into(),
        format!("virtio-net-pci,netdev={id},mac={mac},romfile="),
    ]
}

/// Whether host `h`'s dom0 finished its setup and its agent answers; an error (and the
/// host stopped) if QEMU died or `BOOT_TIMEOUT` passed since `t`.
fn ready(h: Host, t: Instant) -> Result<bool> {
    if qemu_pid(h).is_none() {
        bail!(
            "host {}: QEMU exited during boot; serial console tail:\n{}\nqemu.log: {}",
            h.name(),
            tail_file(&serial_log(h), 40),
            tail_file(&host_dir(h).join("qemu.log"), 10)
        );
    }
    if t.elapsed() > BOOT_TIMEOUT {
        let _ = stop(h);
        bail!(
            "host {}: dom0 was not ready within {} s; serial console tail:\n{}\ndom0 setup log:\n{}",
            h.name(),
            BOOT_TIMEOUT.as_secs(),
            tail_file(&serial_log(h), 40),
            tail_file(&share(h).join("run/dom0-setup.log"), 20)
        );
    }
    if !share(h).join("run/dom0-ready").exists() {
        return Ok(false);
    }
    dom0::exec_ok(h, "agent check", "true", Duration::from_secs(60)).inspect_err(|_| {
        let _ = stop(h);
    })?;
    Ok(true)
}

/// Sends `sig` to host `h`'s QEMU; the error names the host if it is not running.
fn signal(h: Host, sig: i32) -> Result<i32> {
    let pid = qemu_pid(h).with_context(|| format!("host {} is not running", h.name()))?;
    // SAFETY: kill(2) on a pid read from our own pid file and checked to be QEMU.
    if unsafe { libc::kill(pid, sig) } != 0 {
        bail!(
            "signalling host {}'s QEMU (pid {pid}): {}",
            h.name(),
            std::io::Error::last_os_error()
        );
    }
    Ok(pid)
}

/// Power-off: host `h`'s QEMU is killed at once (SIGKILL: the machine stops mid-instruction,
/// nothing is closed cleanly by dom0). Returns the moment of the kill (Unix seconds).
pub fn power_off(h: Host) -> Result<f64> {
    signal(h, libc::SIGKILL)?;
    let t = unix_now();
    let waited = Instant::now();
    while qemu_pid(h).is_some() && waited.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = fs::remove_file(pid_file(h));
    Ok(t)
}

/// A frozen host: its QEMU is stopped (SIGSTOP), every vCPU and device with it; its
/// sockets stay open. Returns the moment (Unix seconds).
pub fn freeze(h: Host) -> Result<f64> {
    signal(h, libc::SIGSTOP)?;
    Ok(unix_now())
}

/// A frozen host runs on (SIGCONT). Returns the moment (Unix seconds).
pub fn thaw(h: Host) -> Result<f64> {
    signal(h, libc::SIGCONT)?;
    Ok(unix_now())
}

/// Stops host `h` (TERM, then KILL after 10 s; a frozen one is thawed first so it can
/// act on TERM). Its disk overlay is discarded with it.
fn stop(h: Host) -> Result<()> {
    let Ok(pid) = signal(h, libc::SIGCONT).and_then(|_| signal(h, libc::SIGTERM)) else {
        return Ok(());
    };
    for _ in 0..100 {
        if qemu_pid(h).is_none() {
            let _ = fs::remove_file(pid_file(h));
            eprintln!("[lab] host {}: stopped (QEMU pid {pid})", h.name());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = signal(h, libc::SIGKILL);
    let _ = fs::remove_file(pid_file(h));
    eprintln!("[lab] host {}: killed (QEMU pid {pid})", h.name());
    Ok(())
}

/// Stops both hosts, then the switch and the client LAN.
pub fn down() -> Result<()> {
    if lab_pids().is_empty() {
        eprintln!("[lab] not running");
    }
    for h in Host::ALL {
        stop(h)?;
    }
    switch::down()
}

/// The tails of host `h`'s consoles: Xen + dom0 (serial), dom0's setup log, guest consoles.
pub fn consoles(h: Host, n: usize) -> String {
    let mut s = String::new();
    let mut add = |title: &str, p: &Path| {
        s.push_str(&format!(
            "===== host {}: {title} ({}) =====\n{}\n",
            h.name(),
            p.display(),
            tail_file(p, n)
        ));
    };
    add("Xen + dom0 serial console", &serial_log(h));
    add("dom0 setup", &share(h).join("run/dom0-setup.log"));
    if let Ok(rd) = fs::read_dir(share(h).join("run/console")) {
        let mut v: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        v.sort();
        for p in v {
            add("guest console", &p);
        }
    }
    s
}
