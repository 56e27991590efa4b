//! Network-namespace tier (root): failures of the output buffer. The holder killed with
//! SIGKILL (fail closed, then a clean detach from a fresh process), the vif vanishing
//! while attached, and every kind of bad input with its exit code.
use std::{net::SocketAddr, time::Duration};

use remus_tests::netns::{Captured, Topo, pid_alive, run_in, send_udp, wait_until};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

fn udp_to(frames: &[Captured], port: u16) -> usize {
    frames
        .iter()
        .filter(|f| f.from_guest())
        .filter(|f| f.udp().is_some_and(|(p, _)| p == port))
        .count()
}

fn datagrams(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("dgram {i}").into_bytes()).collect()
}

/// SIGKILL of the holder: the vif stays blocked (frames captured after the kill do not
/// reach the peer), `status` reports the dead holder, and `detach` from a fresh process
/// removes pins, state files, the tap and any clsact, and reports the lost frames.
fn sigkill_fails_closed(tag: &str, how: &str) {
    // Named like a Xen vif (dot in the name): the pins must survive the holder anyway.
    let t = Topo::new_xen_named(tag);
    t.attach(&["--attach", how]);
    let tap = format!("rms{}", t.vif_ifindex());
    let sn = t.sniff_peer();
    send_udp(&t.guest, addr("10.77.0.2:7800"), datagrams(5));
    t.wait_held(5);
    t.kill_holder();

    // Fail closed: the program is still there and drops what the guest sends.
    send_udp(&t.guest, addr("10.77.0.2:7800"), datagrams(5));
    t.wait_captured_by_dead_holder(10);
    let st = t
        .remus(&["status", &t.vif, "-j"])
        .ok("status of a dead holder")
        .json();
    assert_eq!(st["holder"], "dead", "{st}");
    assert!(
        t.pin_dir().exists(),
        "no pins at {} while failing closed",
        t.pin_dir().display()
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        udp_to(&sn.frames(), 7800),
        0,
        "frames escaped after the holder died"
    );
    let o = t.remus(&["commit", &t.vif, "1"]);
    assert_ne!(o.code, 0, "commit with a dead holder must fail: {o:?}");
    assert!(
        o.stderr.contains("dead"),
        "commit names the dead holder: {}",
        o.stderr
    );
    wait_until(
        "the tap to vanish with its process",
        Duration::from_secs(10),
        || !t.host_links().contains(&tap),
    );

    let d = t.detach_dead_holder("detach from a fresh process");
    assert!(
        d["lost_frames"].as_u64().unwrap_or(0) >= 10,
        "lost frames reported: {d}"
    );
    assert!(
        !t.pin_dir().exists(),
        "pins left in {}",
        t.pin_dir().display()
    );
    assert!(!t.state_file().exists(), "state file left");
    assert!(!t.socket_file().exists(), "socket left");
    assert!(!t.host_links().contains(&tap), "tap left");
    assert!(
        !t.vif_qdiscs().contains("clsact"),
        "clsact left ({how}): {}",
        t.vif_qdiscs()
    );
    // Nothing held, nothing captured any more: frames flow again, and none of the held
    // ones were released by the detach.
    send_udp(&t.guest, addr("10.77.0.2:7801"), datagrams(1));
    sn.wait_for("a frame after detach", |fs| udp_to(fs, 7801) == 1);
    assert_eq!(
        udp_to(&sn.frames(), 7800),
        0,
        "detach released frames of a dead holder"
    );
    let o = t.remus(&["status", &t.vif]);
    assert_eq!(o.code, 2, "status after detach says not attached: {o:?}");
}

#[test]
fn root_sigkill_of_holder_fails_closed_then_detach_cleans_up_tcx() {
    sigkill_fails_closed("kt", "tcx");
}

#[test]
fn root_sigkill_of_holder_fails_closed_then_detach_cleans_up_netlink() {
    sigkill_fails_closed("kn", "netlink");
}

/// The vif disappears (guest destroyed) under a foreground holder: it exits 4 with a
/// message, releases nothing, and leaves no state, pins or tap.
#[test]
fn root_vif_vanishing_foreground_holder_exits_4_and_leaves_nothing() {
    let t = Topo::new("vf");
    let tap = format!("rms{}", t.vif_ifindex());
    let (mut child, _out) = t.attach_foreground(&[]);
    let sn = t.sniff_peer();
    send_udp(&t.guest, addr("10.77.0.2:7900"), datagrams(3));
    t.wait_held(3);
    t.ip(&t.host, &["link", "del", &t.vif]);
    let st = child.wait().expect("waiting for the foreground holder");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert_eq!(
        st.code(),
        Some(4),
        "exit code when the vif vanished; stderr: {err}"
    );
    assert!(err.contains("disappeared"), "message: {err}");
    assert!(err.contains("nothing released"), "message: {err}");
    assert_eq!(udp_to(&sn.frames(), 7900), 0, "held frames were released");
    assert!(!t.pin_dir().exists(), "pins left");
    assert!(
        !t.state_file().exists() && !t.socket_file().exists(),
        "runtime files left"
    );
    assert!(!t.host_links().contains(&tap), "tap left");
}

/// The same with the daemon: it exits 4 and says so in its log; nothing is left.
fn vif_vanishing_daemon(tag: &str, how: &str) {
    let t = Topo::new(tag);
    let tap = format!("rms{}", t.vif_ifindex());
    t.attach(&["--attach", how]);
    let pid = t.holder_pid().expect("holder pid");
    let sn = t.sniff_peer();
    send_udp(&t.guest, addr("10.77.0.2:7901"), datagrams(3));
    t.wait_held(3);
    t.ip(&t.host, &["link", "del", &t.vif]);
    wait_until("the daemon to exit", Duration::from_secs(10), || {
        !pid_alive(pid)
    });
    let log = std::fs::read_to_string(t.log_file()).unwrap_or_default();
    assert!(log.contains("disappeared"), "log: {log}");
    assert!(log.contains("exiting with code 4"), "log: {log}");
    assert_eq!(udp_to(&sn.frames(), 7901), 0, "held frames were released");
    assert!(!t.pin_dir().exists(), "pins left");
    assert!(
        !t.state_file().exists() && !t.socket_file().exists(),
        "runtime files left"
    );
    assert!(!t.host_links().contains(&tap), "tap left");
    let o = t.remus(&["status", &t.vif]);
    assert_eq!(o.code, 2, "nothing attached any more: {o:?}");
}

#[test]
fn root_vif_vanishing_daemon_exits_4_logs_it_and_leaves_nothing_tcx() {
    vif_vanishing_daemon("vd", "tcx");
}

#[test]
fn root_vif_vanishing_daemon_exits_4_logs_it_and_leaves_nothing_netlink() {
    vif_vanishing_daemon("vn", "netlink");
}

/// Bad input: unknown interface, bad sizes, commands on a vif that is not attached,
/// already attached, an open epoch: exit 2. Not root: exit 3. None of it leaves state.
#[test]
fn root_bad_input_gets_its_exit_code_and_leaves_nothing() {
    let t = Topo::new("bi");
    let v = t.vif.as_str();
    let expect = |args: &[&str], code: i32, needle: &str| {
        let o = t.remus(args);
        assert_eq!(o.code, code, "remus-net {args:?}: {o:?}");
        assert!(
            o.stderr.to_lowercase().contains(&needle.to_lowercase()),
            "remus-net {args:?}: message should mention {needle:?}: {}",
            o.stderr
        );
    };
    let missing = format!("{}x", t.prefix);
    expect(&["attach", &missing], 2, &missing);
    for ext in ["json", "sock", "log"] {
        let f = format!("/run/remus/net-{missing}.{ext}");
        assert!(
            !std::path::Path::new(&f).exists(),
            "attach of an unknown interface left {f}"
        );
    }
    assert!(!std::path::Path::new(&format!("/sys/fs/bpf/remus/{missing}")).exists());
    expect(&["attach", v, "--limit-bytes", "1000"], 2, "limit");
    expect(&["attach", v, "--limit-bytes", "lots"], 2, "size");
    expect(&["attach", v, "--ring-bytes", "5000"], 2, "power of two");
    expect(&["attach", "bad/name"], 2, "");
    for args in [
        vec!["commit", v, "1"],
        vec!["checkpoint", v],
        vec!["status", v],
        vec!["mode", v, "hold"],
        vec!["detach", v],
    ] {
        expect(&args, 2, "not attached");
    }
    assert!(
        !t.state_file().exists() && !t.pin_dir().exists(),
        "a failed command left state"
    );

    // Not root: exit 3, before touching anything.
    let bin = remus_tests::netns::remus_net_bin()
        .to_string_lossy()
        .into_owned();
    for args in [
        vec!["attach", v],
        vec!["status", v],
        vec!["checkpoint", v],
        vec!["commit", v, "1"],
        vec!["detach", v],
    ] {
        let mut a = vec![
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin.as_str(),
        ];
        a.extend_from_slice(&args);
        let o = run_in(&t.host, "setpriv", &a);
        assert_eq!(o.code, 3, "as nobody, remus-net {args:?}: {o:?}");
        assert!(
            o.stderr.contains("root"),
            "message says root is needed: {}",
            o.stderr
        );
    }
    assert!(
        !t.state_file().exists() && !t.pin_dir().exists(),
        "a non-root command left state"
    );

    t.attach(&[]);
    expect(&["attach", v], 2, "already attached");
    expect(&["commit", v, "1"], 2, "not closed");
    expect(&["commit", v, "7"], 2, "not closed");
    expect(&["mode", v, "sideways"], 2, "");
    assert_eq!(
        t.checkpoint(),
        1,
        "the failed commands did not move the epoch"
    );
    t.commit(1);
    t.remus(&["detach", v]).ok("detach");
    assert!(!t.state_file().exists() && !t.pin_dir().exists());
}

/// Restart: after SIGKILL of the holder, a new `attach` takes over the pinned program
/// without a gap (the vif stays blocked throughout). The dead holder's frames are never
/// released; numbering continues after the dead holder's epoch; new frames are held and
/// released by the new holder.
#[test]
fn root_attach_after_sigkill_takes_over_and_never_releases_the_dead_holders_frames() {
    let t = Topo::new("ta");
    t.attach(&[]);
    let sn = t.sniff_peer();
    send_udp(&t.guest, addr("10.77.0.2:7950"), datagrams(3));
    t.wait_held(3);
    assert_eq!(t.checkpoint(), 1);
    t.kill_holder();
    // Captured while nobody holds: lost, never released.
    send_udp(&t.guest, addr("10.77.0.2:7950"), datagrams(2));
    t.wait_captured_by_dead_holder(5);

    t.attach(&[]);
    let st = t.status();
    let first = st["current_epoch"].as_u64().unwrap_or(0);
    assert!(
        first > 2,
        "the new holder continues after the dead one's epochs: {st}"
    );
    assert_eq!(
        st["held_frames"], 0,
        "the dead holder's frames came back: {st}"
    );
    send_udp(&t.guest, addr("10.77.0.2:7951"), datagrams(2));
    t.wait_held(2);
    assert_eq!(t.checkpoint(), first);
    let r = t.commit(first);
    assert_eq!(r["frames"], 2, "{r}");
    sn.wait_for("the new holder's frames", |fs| udp_to(fs, 7951) == 2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        udp_to(&sn.frames(), 7950),
        0,
        "frames of the dead holder were released"
    );
    t.remus(&["detach", &t.vif]).ok("detach");
}

/// A clsact qdisc that was on the vif before attach (someone else's) stays after detach,
/// both from a live holder and from a fresh process after SIGKILL; remus-net removes only
/// its own filter.
#[test]
fn root_detach_keeps_a_clsact_qdisc_remus_net_did_not_add() {
    let t = Topo::new("qk");
    run_in(&t.host, "tc", &["qdisc", "add", "dev", &t.vif, "clsact"]).ok("tc qdisc add clsact");
    for kill_first in [false, true] {
        let o = t.attach(&["--attach", "netlink", "-j"]);
        assert_eq!(
            o.json()["attach_kind"]["netlink"]["created_clsact"],
            false,
            "{}",
            o.stdout
        );
        if kill_first {
            let pid = t.holder_pid().expect("holder pid");
            // SAFETY: kill of the holder this test started.
            assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
            wait_until("the holder to die", Duration::from_secs(10), || {
                !pid_alive(pid)
            });
        }
        t.remus(&["detach", &t.vif]).ok("detach");
        assert!(
            t.vif_qdiscs().contains("clsact"),
            "detach removed a clsact it did not add (killed: {kill_first})"
        );
        let f = run_in(&t.host, "tc", &["filter", "show", "dev", &t.vif, "ingress"])
            .ok("tc filter show")
            .stdout;
        assert!(
            !f.contains("remus_vif_in"),
            "remus filter left (killed: {kill_first}): {f}"
        );
        let sn = t.sniff_peer();
        send_udp(&t.guest, addr("10.77.0.2:7960"), datagrams(1));
        sn.wait_for("frames flow after detach", |fs| udp_to(fs, 7960) == 1);
    }
}
