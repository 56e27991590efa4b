//! Fail closed however the holder was started (root, network namespaces). For each way
//! of starting `remus-net attach` (daemon), the holder is killed with SIGKILL (in the
//! container case: the whole container), then the guest sends IPv4, IPv6, ARP and an
//! unknown ethertype: nothing may reach the peer until `remus-net detach`, which then
//! lets frames through again.
//!
//! Ways of starting it: `ip netns exec` (a private mount namespace with a fresh /sys);
//! `unshare --mount` (a private mount namespace that still has the host's bpffs, as a
//! systemd unit with PrivateTmp=/ProtectSystem= gets); a container (own mount and pid
//! namespaces, no bpffs, /proc of its own). The plain shell (`nsenter --net` only) is
//! `net_failure.rs`.
use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use remus_tests::netns::{
    Captured, PEER_MAC, Topo, arp_request, eth_frame, pid_alive, run, send_raw, send_udp,
    wait_until,
};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

/// `remus-net args…` started the way `how` says (the host network namespace of `t`).
fn remus_via(t: &Topo, how: &str, args: &[&str]) -> remus_tests::netns::Out {
    let bin = remus_tests::netns::remus_net_bin();
    let bin = bin.to_string_lossy();
    let net = format!("--net=/run/netns/{}", t.host);
    let mut a: Vec<&str> = match how {
        "ip-netns-exec" => vec!["netns", "exec", &t.host, &bin],
        "unshare-mount" => vec!["--mount", "--propagation", "private", "nsenter", &net, &bin],
        other => panic!("unknown way {other}"),
    };
    a.extend_from_slice(args);
    let program = if how == "ip-netns-exec" {
        "ip"
    } else {
        "unshare"
    };
    run(program, &a)
}

/// Sends one frame of each kind from the guest and checks, after a pause, that none of
/// them reached the peer.
fn assert_blocked(t: &Topo, sn: &remus_tests::netns::Sniffer, port: u16, what: &str) {
    send_udp(
        &t.guest,
        addr(&format!("10.77.0.2:{port}")),
        vec![b"v4".to_vec()],
    );
    send_udp(
        &t.guest,
        addr(&format!("[fd77::2]:{port}")),
        vec![b"v6".to_vec()],
    );
    let arp = arp_request([10, 77, 0, 2]);
    let raw = eth_frame(PEER_MAC, 0x88b5, b"remus-raw-ethertype");
    send_raw(&t.guest, "eth0", vec![arp, raw]);
    std::thread::sleep(Duration::from_millis(500));
    let leaked: Vec<Captured> = sn.from_guest();
    assert!(
        leaked.is_empty(),
        "{what}: {} guest frames reached the peer while failing closed: {leaked:?}",
        leaked.len()
    );
}

/// After detach, a datagram from the guest reaches the peer again.
fn assert_flows(t: &Topo, sn: &remus_tests::netns::Sniffer, port: u16) {
    sn.clear();
    send_udp(
        &t.guest,
        addr(&format!("10.77.0.2:{port}")),
        vec![b"after".to_vec()],
    );
    sn.wait_for("a frame after detach", |fs| {
        fs.iter()
            .any(|f| f.from_guest() && f.udp().is_some_and(|(p, _)| p == port))
    });
}

fn attach_kill_check_detach(tag: &str, how: &str) {
    let t = Topo::new(tag);
    t.enable_ipv6();
    let o = remus_via(&t, how, &["attach", &t.vif, "-j"]).ok("attach");
    let attached = o.json();
    let sn = t.sniff_peer();
    let o = remus_via(&t, how, &["checkpoint", &t.vif]).ok("checkpoint");
    assert_eq!(o.stdout.trim(), "1");
    let pid = t.kill_holder();
    assert!(!pid_alive(pid));
    assert_blocked(&t, &sn, 7970, how);
    // status from the host says where the pins are and that the holder is dead.
    let st = t.remus(&["status", &t.vif, "-j"]).ok("status").json();
    assert_eq!(st["holder"], "dead", "{st}");
    assert_eq!(
        st["state"]["pin_place"], "host",
        "{st} / at attach: {attached}"
    );
    assert_eq!(attached["pins"]["place"], "host", "{attached}");
    assert!(t.pin_dir().exists(), "no pins in the host's bpffs: {st}");
    // Still blocked after looking.
    assert_blocked(&t, &sn, 7971, how);
    let d = remus_via(&t, how, &["detach", &t.vif, "-j"])
        .ok("detach")
        .json();
    assert_eq!(d["holder_was_alive"], false, "{d}");
    assert!(!t.pin_dir().exists(), "pins left after detach");
    assert_flows(&t, &sn, 7972);
}

/// Under `ip netns exec` the holder sees a fresh /sys without the host's bpffs; its pins
/// must still go where they outlive it.
#[test]
fn root_holder_started_by_ip_netns_exec_fails_closed_after_sigkill() {
    attach_kill_check_detach("ie", "ip-netns-exec");
}

/// A private mount namespace that keeps the host's bpffs mounted (a systemd unit with
/// PrivateTmp= or ProtectSystem= runs like this).
#[test]
fn root_holder_in_a_private_mount_namespace_fails_closed_after_sigkill() {
    attach_kill_check_detach("um", "unshare-mount");
}

/// After a SIGKILL under `ip netns exec`, a second `ip netns exec … attach` takes over
/// the dead holder's pins (numbering continues) and holds and releases new frames.
#[test]
fn root_takeover_under_ip_netns_exec_continues_the_dead_holders_pins() {
    let t = Topo::new("it");
    remus_via(&t, "ip-netns-exec", &["attach", &t.vif]).ok("attach");
    let sn = t.sniff_peer();
    remus_via(&t, "ip-netns-exec", &["checkpoint", &t.vif]).ok("checkpoint");
    t.kill_holder();
    remus_via(&t, "ip-netns-exec", &["attach", &t.vif]).ok("takeover");
    let st = t.status();
    assert!(
        st["current_epoch"].as_u64().unwrap_or(0) >= 3,
        "numbering restarted after takeover: {st}"
    );
    send_udp(&t.guest, addr("10.77.0.2:7975"), vec![b"new".to_vec()]);
    t.wait_held(1);
    let e = remus_via(&t, "ip-netns-exec", &["checkpoint", &t.vif]).ok("checkpoint");
    let e = e.stdout.trim().to_string();
    remus_via(&t, "ip-netns-exec", &["commit", &t.vif, &e]).ok("commit");
    sn.wait_for("the new holder's frame", |fs| {
        fs.iter()
            .any(|f| f.from_guest() && f.udp().is_some_and(|(p, _)| p == 7975))
    });
    remus_via(&t, "ip-netns-exec", &["detach", &t.vif]).ok("detach");
}

/// A container: own mount and pid namespaces, its own /proc, no bpffs. Its holder
/// cannot pin anywhere that outlives the container, so the capture program must be one
/// that needs no pin (the netlink filter); asking for tcx there is refused (exit 3).
/// Killing the whole container leaves the vif blocked until detach from the host.
#[test]
fn root_holder_in_a_container_fails_closed_when_the_container_dies() {
    let t = Topo::new("ct");
    t.enable_ipv6();
    let bin = remus_tests::netns::remus_net_bin();
    let script = |extra: &str| {
        format!(
            "umount -l /sys/fs/bpf 2>/dev/null; \
             nsenter --net=/run/netns/{h} {b} attach {v} {extra} -j; echo \"exit=$?\"; \
             exec sleep 600",
            h = t.host,
            b = bin.display(),
            v = t.vif
        )
    };
    let container = |extra: &str| -> Child {
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--pid", "--fork"])
            .args(["--mount-proc", "--kill-child", "sh", "-c", &script(extra)])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the container")
    };
    let first_line = |c: &mut Child| {
        use std::io::{BufRead, BufReader};
        let mut out = BufReader::new(c.stdout.take().expect("stdout"));
        let mut text = String::new();
        while !text.contains("exit=") {
            let mut l = String::new();
            if out.read_line(&mut l).unwrap_or(0) == 0 {
                break;
            }
            text.push_str(&l);
        }
        text
    };
    // tcx would die with the container's bpffs: refused, exit 3.
    let mut c = container("--attach tcx");
    let text = first_line(&mut c);
    let _ = c.kill();
    let _ = c.wait();
    assert!(
        text.contains("exit=3"),
        "attach --attach tcx in a container: {text}"
    );
    assert!(
        !t.state_file().exists(),
        "a refused attach left a state file"
    );

    let mut c = container("");
    let text = first_line(&mut c);
    assert!(text.contains("exit=0"), "attach in a container: {text}");
    let sn = t.sniff_peer();
    let st = t.remus(&["status", &t.vif, "-j"]).ok("status").json();
    assert_eq!(
        st["status"]["attach_kind"]["netlink"]["created_clsact"], true,
        "{st}"
    );
    assert_eq!(st["status"]["pins"]["place"], "private", "{st}");
    assert_eq!(
        t.holder_pid(),
        None,
        "a container's pid passed for one of ours"
    );
    // The whole container goes: its init, the holder, its mount namespace and bpffs.
    let _ = c.kill();
    let _ = c.wait();
    wait_until(
        "the holder to die with its container",
        Duration::from_secs(10),
        || {
            run("ip", &["netns", "pids", &t.host])
                .stdout
                .trim()
                .is_empty()
        },
    );
    let st = t
        .remus(&["status", &t.vif, "-j"])
        .ok("status of the dead container holder")
        .json();
    assert_eq!(st["holder"], "dead", "{st}");
    assert_eq!(st["state"]["pin_place"], "private", "{st}");
    assert_blocked(&t, &sn, 7980, "container");
    t.detach_dead_holder("detach from the host");
    assert!(
        !t.vif_qdiscs().contains("clsact"),
        "the clsact remus-net added is left: {}",
        t.vif_qdiscs()
    );
    assert_flows(&t, &sn, 7981);
}
