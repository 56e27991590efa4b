//! Network-namespace tier (root): what the eBPF output buffer holds and releases, observed
//! at the LAN peer with a raw packet socket. Every test builds its own namespaces (see
//! `remus_tests::netns`) and removes them on drop, even when it fails.
use std::{
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use remus_tests::netns::{
    Captured, PEER_IP, PEER_MAC, Sniffer, Topo, arp_request, eth_frame, in_netns, ipv4_udp, run,
    run_in, send_raw, send_udp, send_udp_gso, vlan_frame,
};

type FramePredicate = fn(&Captured) -> bool;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

/// Numbered UDP payloads "seq:<i>" for i in range.
fn numbered(range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
    range.map(|i| format!("seq:{i}").into_bytes()).collect()
}

/// Sequence numbers of the numbered datagrams to `port` seen at the peer, in arrival order.
fn seqs(frames: &[Captured], port: u16) -> Vec<u32> {
    frames
        .iter()
        .filter(|f| f.from_guest())
        .filter_map(|f| f.udp())
        .filter(|(p, _)| *p == port)
        .filter_map(|(_, pl)| {
            std::str::from_utf8(pl)
                .ok()?
                .strip_prefix("seq:")?
                .parse()
                .ok()
        })
        .collect()
}

/// Commits `epoch` (100 datagrams to port 7100) and checks the peer then has the first
/// `total` datagrams, each once, in capture order.
fn commit_and_see_in_order(t: &Topo, sn: &Sniffer, epoch: u64, total: usize) {
    let r = t.commit(epoch);
    assert_eq!(r["frames"], 100, "commit {epoch} released {r}");
    let f = sn.wait_for(&format!("epoch {epoch} at the peer"), |fs| {
        count_port(fs, 7100) >= total
    });
    assert_eq!(
        seqs(&f, 7100),
        (0..total as u32).collect::<Vec<_>>(),
        "epochs 1..={epoch} in capture order, once"
    );
}

fn count_port(frames: &[Captured], port: u16) -> usize {
    seqs(frames, port).len()
}

/// Held frames of IPv4 ICMP/UDP/TCP, IPv6, ARP and an unknown ethertype never reach the
/// peer before commit, and all of them do after it.
#[test]
fn root_every_protocol_is_held_until_commit_then_released() {
    let t = Topo::new("pr");
    t.enable_ipv6();
    t.attach(&[]);
    let sn = t.sniff_peer();

    // IPv4 ICMP echo (ping waits for its reply, which only comes after the release).
    t.spawn_in(&t.guest, "ping", &["-c", "1", "-W", "30", PEER_IP]);
    // IPv4 UDP, IPv6 UDP.
    send_udp(
        &t.guest,
        addr("10.77.0.2:7001"),
        vec![b"udp4-held".to_vec()],
    );
    send_udp(
        &t.guest,
        addr("[fd77::2]:7003"),
        vec![b"udp6-held".to_vec()],
    );
    // IPv4 TCP: a SYN (nobody listens: the peer answers RST once it gets it).
    let g = t.guest.clone();
    let tcp = std::thread::spawn(move || {
        in_netns(&g, || {
            TcpStream::connect_timeout(&addr("10.77.0.2:7002"), Duration::from_secs(30)).is_ok()
        })
    });
    // ARP and an unknown ethertype (local experimental 0x88b5), raw from the guest.
    send_raw(
        &t.guest,
        "eth0",
        vec![
            arp_request([10, 77, 0, 2]),
            eth_frame(PEER_MAC, 0x88b5, b"remus-unknown-ethertype"),
        ],
    );

    t.wait_held(6);
    let early: Vec<Captured> = sn.from_guest();
    assert!(
        early.is_empty(),
        "{} guest frames reached the peer before any commit: {early:?}",
        early.len()
    );

    assert_eq!(t.checkpoint(), 1);
    let rel = t.commit(1);
    assert!(
        rel["frames"].as_u64().unwrap_or(0) >= 6,
        "commit 1 released {rel}"
    );

    let kinds: [(&str, FramePredicate); 6] = [
        ("IPv4 ICMP echo request", |f| {
            f.l4()
                .is_some_and(|(p, o)| p == 1 && f.data.get(o) == Some(&8))
                && f.l3().is_some_and(|(e, _)| e == 0x0800)
        }),
        ("IPv4 UDP", |f| {
            f.l3().is_some_and(|(e, _)| e == 0x0800)
                && f.udp()
                    .is_some_and(|(p, pl)| p == 7001 && pl == b"udp4-held")
        }),
        ("IPv4 TCP SYN", |f| {
            f.tcp().is_some_and(|(p, fl)| p == 7002 && fl & 0x02 != 0)
        }),
        ("IPv6 UDP", |f| {
            f.l3().is_some_and(|(e, _)| e == 0x86dd)
                && f.udp()
                    .is_some_and(|(p, pl)| p == 7003 && pl == b"udp6-held")
        }),
        ("ARP request", |f| {
            f.l3()
                .is_some_and(|(e, o)| e == 0x0806 && f.data.get(o + 7) == Some(&1))
        }),
        ("unknown ethertype 0x88b5", |f| {
            f.l3().is_some_and(|(e, o)| {
                e == 0x88b5 && f.data[o..].starts_with(b"remus-unknown-ethertype")
            })
        }),
    ];
    let got = sn.wait_for("every protocol at the peer after commit", |fs| {
        kinds
            .iter()
            .all(|(_, k)| fs.iter().any(|f| f.from_guest() && k(f)))
    });
    for (name, k) in &kinds {
        assert!(
            got.iter().any(|f| f.from_guest() && k(f)),
            "{name} never reached the peer"
        );
    }
    // The SYN reached the peer, which refused it: the connect returns.
    let _ = tcp.join();
}

/// `commit N` releases exactly the epochs <= N, epoch by epoch, in capture order; a commit
/// of the open epoch is a usage error (exit 2) and releases nothing.
#[test]
fn root_commit_releases_exactly_closed_epochs_in_capture_order() {
    let t = Topo::new("or");
    t.attach(&[]);
    let sn = t.sniff_peer();
    let dst = addr("10.77.0.2:7100");

    send_udp(&t.guest, dst, numbered(0..100));
    t.wait_held(100);
    assert_eq!(t.checkpoint(), 1);
    send_udp(&t.guest, dst, numbered(100..200));
    t.wait_held(200);
    assert_eq!(t.checkpoint(), 2);
    send_udp(&t.guest, dst, numbered(200..300));
    t.wait_held(300);
    assert_eq!(t.held_frames(), 300, "only the test's datagrams are held");
    let epochs = t.status()["epochs"].clone();
    let per_epoch: Vec<(u64, u64)> = epochs
        .as_array()
        .expect("epochs")
        .iter()
        .map(|e| {
            (
                e["epoch"].as_u64().unwrap_or(0),
                e["frames"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(per_epoch, vec![(1, 100), (2, 100), (3, 100)]);
    assert_eq!(
        count_port(&sn.frames(), 7100),
        0,
        "held datagrams reached the peer"
    );

    // Epoch 3 is open: committing it is an error and releases nothing.
    let o = t.remus(&["commit", &t.vif, "3"]);
    assert_eq!(o.code, 2, "commit of the open epoch: {o:?}");
    assert!(
        o.stderr.contains("not closed"),
        "message names the problem: {}",
        o.stderr
    );
    assert_eq!(t.held_frames(), 300);

    commit_and_see_in_order(&t, &sn, 1, 100);
    assert_eq!(t.held_frames(), 200);
    // Nothing of epochs 2 and 3 follows on its own.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        count_port(&sn.frames(), 7100),
        100,
        "frames of later epochs escaped with commit 1"
    );

    commit_and_see_in_order(&t, &sn, 2, 200);

    let o = t.remus(&["commit", &t.vif, "3"]);
    assert_eq!(o.code, 2, "epoch 3 is still open: {o:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        count_port(&sn.frames(), 7100),
        200,
        "the refused commit released something"
    );

    assert_eq!(t.checkpoint(), 3);
    commit_and_see_in_order(&t, &sn, 3, 300);
    let st = t.status();
    assert_eq!(st["held_frames"], 0);
    assert_eq!(st["release_errors"], 0);
    assert_eq!(st["unreleasable_frames"], 0);
}

fn fdb(t: &Topo) -> Vec<String> {
    let o = run_in(&t.host, "bridge", &["fdb", "show", "br", "br0"]).ok("bridge fdb show");
    o.stdout.lines().map(String::from).collect()
}

/// Released frames enter the bridge from the vif port: the bridge learns the guest MAC on
/// the vif (not on the helper tap). Held frames do not reach the bridge at all.
#[test]
fn root_released_frames_teach_the_bridge_the_guest_mac_on_the_vif_port() {
    let t = Topo::new("fd");
    t.attach(&[]);
    t.ip(
        &t.host,
        &[
            "link",
            "set",
            "dev",
            &t.vif,
            "type",
            "bridge_slave",
            "fdb_flush",
        ],
    );
    let mac = "02:00:00:00:00:01";
    assert!(
        !fdb(&t).iter().any(|l| l.starts_with(mac)),
        "guest MAC still learned after flush: {:?}",
        fdb(&t)
    );
    let sn = t.sniff_peer();
    send_udp(&t.guest, addr("10.77.0.2:7150"), numbered(0..3));
    t.wait_held(3);
    assert!(
        !fdb(&t).iter().any(|l| l.starts_with(mac)),
        "held frames reached the bridge (it learned the guest MAC): {:?}",
        fdb(&t)
    );
    assert_eq!(t.checkpoint(), 1);
    t.commit(1);
    sn.wait_for("released frames at the peer", |fs| {
        count_port(fs, 7150) == 3
    });
    let lines: Vec<String> = fdb(&t).into_iter().filter(|l| l.starts_with(mac)).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("dev {} ", t.vif))
                || l.ends_with(&format!("dev {}", t.vif))),
        "guest MAC not learned on the vif port {}: {lines:?}",
        t.vif
    );
    assert!(
        !lines.iter().any(|l| l.contains("dev rms")),
        "guest MAC learned on the helper tap: {lines:?}"
    );
}

/// VLAN tags and priority survive hold and release. Tagged frames sent raw from the guest
/// (the vif's receive path moves the tag out of band before TC, so this is the
/// out-of-band capture path) arrive at the peer with the same TPID, VID and PCP. Where
/// the kernel has 802.1Q, the same through a VLAN subinterface of the guest (VID 42,
/// priority 5 through the egress QoS map) with TX VLAN offload on and off.
#[test]
fn root_vlan_tag_and_priority_survive_hold_and_release() {
    let t = Topo::new("vl");
    let g = t.guest.as_str();
    t.attach(&[]);
    let sn = t.sniff_peer();
    let tagged_to = |fs: &[Captured], port: u16| -> Option<Captured> {
        fs.iter()
            .find(|f| f.from_guest() && f.udp().is_some_and(|(p, _)| p == port))
            .cloned()
    };
    let check = |f: &Captured, vid: u16, pcp: u16, what: &str| {
        let (tpid, tci) = f
            .vlan_tag()
            .unwrap_or_else(|| panic!("untagged at the peer ({what}): {f:?}"));
        assert_eq!(tpid, 0x8100, "TPID ({what})");
        assert_eq!(tci & 0x0fff, vid, "VID ({what})");
        assert_eq!(tci >> 13, pcp, "PCP ({what})");
    };

    // Raw tagged frames: IPv4/UDP in VID 42 PCP 5, an unknown ethertype in VID 43 PCP 1.
    send_raw(
        g,
        "eth0",
        vec![
            vlan_frame(PEER_MAC, 5, 42, 0x0800, &ipv4_udp(7200, b"tagged udp")),
            vlan_frame(PEER_MAC, 1, 43, 0x88b5, b"tagged unknown ethertype"),
        ],
    );
    t.wait_held(2);
    assert!(
        sn.from_guest().is_empty(),
        "held tagged frames reached the peer"
    );
    let e = t.checkpoint();
    t.commit(e);
    let fs = sn.wait_for("both tagged frames at the peer", |fs| {
        fs.iter().filter(|f| f.from_guest()).count() >= 2
    });
    check(
        &tagged_to(&fs, 7200).expect("tagged UDP frame"),
        42,
        5,
        "raw IPv4/UDP",
    );
    let unk = fs
        .iter()
        .find(|f| f.from_guest() && f.l3().is_some_and(|(et, _)| et == 0x88b5))
        .expect("tagged unknown-ethertype frame");
    check(unk, 43, 1, "raw unknown ethertype");

    let sub = run(
        "ip",
        &[
            "-n",
            g,
            "link",
            "add",
            "link",
            "eth0",
            "name",
            "eth0.42",
            "type",
            "vlan",
            "id",
            "42",
            "egress-qos-map",
            "0:5",
        ],
    );
    if sub.code != 0 {
        // This kernel has no 802.1Q (CONFIG_VLAN_8021Q unset): the raw frames above are
        // the proof here.
        eprintln!(
            "no VLAN subinterfaces on this kernel ({}); raw tagged frames only",
            sub.stderr.trim()
        );
        return;
    }
    t.ip(g, &["addr", "add", "10.78.0.1/24", "dev", "eth0.42"]);
    t.ip(g, &["link", "set", "eth0.42", "up"]);
    t.ip(
        g,
        &[
            "neigh",
            "replace",
            "10.78.0.2",
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "eth0.42",
            "nud",
            "permanent",
        ],
    );
    for (i, txvlan) in ["on", "off"].iter().enumerate() {
        run_in(g, "ethtool", &["-K", "eth0", "txvlan", txvlan]).ok("ethtool txvlan");
        let port = 7210 + i as u16;
        send_udp(
            g,
            addr(&format!("10.78.0.2:{port}")),
            vec![format!("vlan txvlan {txvlan}").into_bytes()],
        );
        t.wait_held(1);
        assert!(
            tagged_to(&sn.frames(), port).is_none(),
            "held tagged frame reached the peer"
        );
        let e = t.checkpoint();
        t.commit(e);
        let fs = sn.wait_for("the tagged frame at the peer", |fs| {
            tagged_to(fs, port).is_some()
        });
        check(
            &tagged_to(&fs, port).expect("frame"),
            42,
            5,
            &format!("subinterface, txvlan {txvlan}"),
        );
    }
}

/// A UDP GSO super-frame of 65,042 bytes (65,000 bytes of payload) is captured as one
/// frame, held, and released whole: every payload byte reaches the peer, in order.
#[test]
fn root_gso_frames_up_to_64k_are_held_and_released() {
    let t = Topo::new("gs");
    t.attach(&[]);
    let sn = t.sniff_peer();
    let payload: Vec<u8> = (0..65_000u32).map(|i| (i % 251) as u8).collect();
    let p2 = payload.clone();
    send_udp_gso(&t.guest, "10.77.0.2:7300".parse().expect("addr"), p2, 1400);
    t.wait_held(1);
    let st = t.status();
    let e = &st["epochs"][0];
    assert_eq!(e["frames"], 1, "the GSO write is one captured frame: {st}");
    assert_eq!(
        e["bytes"],
        14 + 20 + 8 + 65_000,
        "the whole super-frame is held: {st}"
    );
    assert_eq!(st["kernel"]["dropped_oversize_frames"], 0);
    assert!(
        sn.frames()
            .iter()
            .all(|f| f.udp().is_none_or(|(p, _)| p != 7300)),
        "held GSO frame reached the peer"
    );
    assert_eq!(t.checkpoint(), 1);
    let r = t.commit(1);
    assert_eq!(r["bytes"], 65_042, "released {r}");
    let total = |fs: &[Captured]| -> usize {
        fs.iter()
            .filter_map(|f| f.udp())
            .filter(|(p, _)| *p == 7300)
            .map(|(_, pl)| pl.len())
            .sum()
    };
    let fs = sn.wait_for("all 65,000 payload bytes at the peer", |fs| {
        total(fs) >= 65_000
    });
    let got: Vec<u8> = fs
        .iter()
        .filter_map(|f| f.udp())
        .filter(|(p, _)| *p == 7300)
        .flat_map(|(_, pl)| pl.to_vec())
        .collect();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "payload bytes differ after release");
}

/// Past --limit-bytes new frames are dropped and counted (status -j), never released,
/// and what was held before the limit leaves intact and in order at commit.
#[test]
fn root_held_bytes_limit_drops_and_counts_and_never_releases_early() {
    let t = Topo::new("li");
    t.attach(&["--limit-bytes", "64K"]);
    let sn = t.sniff_peer();
    let pl = |i: u32| {
        let mut v = format!("seq:{i}").into_bytes();
        v.resize(1000, b' ');
        v
    };
    // "seq:<i>" padded with spaces: parse the prefix only.
    let seqs_padded = |fs: &[Captured]| -> Vec<u32> {
        fs.iter()
            .filter_map(|f| f.udp())
            .filter(|(p, _)| *p == 7500)
            .filter_map(|(_, pl)| {
                std::str::from_utf8(pl)
                    .ok()?
                    .trim_end()
                    .strip_prefix("seq:")?
                    .parse()
                    .ok()
            })
            .collect()
    };
    send_udp(&t.guest, addr("10.77.0.2:7500"), (0..100).map(pl).collect());
    crate_wait(&t, 100);
    let st = t.status();
    let held = st["held_frames"].as_u64().unwrap_or(0);
    let dropped = st["holder"]["dropped_limit_frames"].as_u64().unwrap_or(0);
    let frame = 14 + 20 + 8 + 1000;
    assert_eq!(held + dropped, 100, "{st}");
    assert!(dropped > 0, "nothing dropped past the limit: {st}");
    assert!(
        st["held_bytes"].as_u64().unwrap_or(u64::MAX) <= 65_536,
        "{st}"
    );
    assert!(
        held * frame <= 65_536 && (held + 1) * frame > 65_536,
        "held {held} frames of {frame} bytes under a 64 KiB limit"
    );
    assert_eq!(st["holder"]["dropped_limit_bytes"], dropped * frame);
    assert!(
        seqs_padded(&sn.frames()).is_empty(),
        "frames reached the peer before commit (limit must not release early)"
    );
    assert_eq!(t.checkpoint(), 1);
    assert_eq!(t.commit(1)["frames"], held);
    let fs = sn.wait_for("the held frames at the peer", |fs| {
        seqs_padded(fs).len() as u64 >= held
    });
    std::thread::sleep(Duration::from_millis(200));
    let got = seqs_padded(&sn.frames());
    assert_eq!(
        got,
        (0..held as u32).collect::<Vec<_>>(),
        "exactly the frames held before the limit, in order ({} seen)",
        fs.len()
    );
    // The limit counts what is held now: after the release there is room again.
    send_udp(
        &t.guest,
        addr("10.77.0.2:7500"),
        (100..110).map(pl).collect(),
    );
    t.wait_held(10);
    let st = t.status();
    assert_eq!(st["held_frames"], 10);
    assert_eq!(st["holder"]["dropped_limit_frames"], dropped);
}

/// Waits until the holder has seen `n` frames (held or dropped at the limit).
fn crate_wait(t: &Topo, n: u64) {
    remus_tests::netns::wait_until(
        "frames held or dropped at the limit",
        Duration::from_secs(20),
        || {
            let st = t.status();
            st["held_frames"].as_u64().unwrap_or(0)
                + st["holder"]["dropped_limit_frames"].as_u64().unwrap_or(0)
                >= n
        },
    );
}

/// `--passthrough` lets frames through unheld; `mode hold` starts holding; `mode
/// passthrough` releases what is held and lets later frames through.
#[test]
fn root_passthrough_at_attach_and_mode_switches_at_run_time() {
    let t = Topo::new("pt");
    let o = t.attach(&["--passthrough", "-j"]);
    assert_eq!(o.json()["mode"], "passthrough");
    let sn = t.sniff_peer();
    let dst = addr("10.77.0.2:7600");
    send_udp(&t.guest, dst, numbered(0..1));
    sn.wait_for("a pass-through frame without any commit", |fs| {
        count_port(fs, 7600) == 1
    });
    let st = t.status();
    assert_eq!(st["mode"], "passthrough");
    assert_eq!(st["held_frames"], 0);
    assert!(
        st["kernel"]["passed_through_frames"].as_u64().unwrap_or(0) >= 1,
        "{st}"
    );

    t.remus(&["mode", &t.vif, "hold"]).ok("mode hold");
    assert_eq!(t.status()["mode"], "hold");
    send_udp(&t.guest, dst, numbered(1..3));
    t.wait_held(2);
    assert_eq!(
        count_port(&sn.frames(), 7600),
        1,
        "frames passed after `mode hold`"
    );

    t.remus(&["mode", &t.vif, "passthrough"])
        .ok("mode passthrough");
    let f = sn.wait_for("held frames released by `mode passthrough`", |fs| {
        count_port(fs, 7600) == 3
    });
    assert_eq!(seqs(&f, 7600), vec![0, 1, 2]);
    send_udp(&t.guest, dst, numbered(3..4));
    let f = sn.wait_for("pass-through after the switch", |fs| {
        count_port(fs, 7600) == 4
    });
    assert_eq!(seqs(&f, 7600), vec![0, 1, 2, 3]);
    let st = t.status();
    assert_eq!(st["mode"], "passthrough");
    assert_eq!(st["held_frames"], 0);
}

/// One hold → checkpoint → commit cycle and a clean detach with the given attach kind.
fn hold_commit_detach(tag: &str, how: &str, xen_name: bool) {
    let t = if xen_name {
        Topo::new_xen_named(tag)
    } else {
        Topo::new(tag)
    };
    let o = t.attach(&["--attach", how, "-j"]);
    let kind = o.json()["attach_kind"].clone();
    let qd = t.vif_qdiscs();
    match how {
        "tcx" => {
            assert_eq!(kind, "tcx");
            assert!(!qd.contains("clsact"), "tcx attach added a qdisc: {qd}");
            assert!(
                t.pin_dir().join("link_vif_in").exists(),
                "tcx link not pinned (fail closed needs it)"
            );
        }
        _ => {
            assert!(kind.get("netlink").is_some(), "attach kind {kind}");
            assert!(qd.contains("clsact"), "no clsact qdisc on the vif: {qd}");
            let f = run_in(&t.host, "tc", &["filter", "show", "dev", &t.vif, "ingress"])
                .ok("tc filter show")
                .stdout;
            assert!(
                f.contains("remus_vif_in"),
                "no remus filter on the vif: {f}"
            );
        }
    }
    let tap = format!("rms{}", t.vif_ifindex());
    assert!(
        t.host_links().contains(&tap),
        "helper tap {tap} missing: {:?}",
        t.host_links()
    );
    let sn = t.sniff_peer();
    let dst = addr("10.77.0.2:7700");
    send_udp(&t.guest, dst, numbered(0..5));
    t.wait_held(5);
    assert_eq!(
        count_port(&sn.frames(), 7700),
        0,
        "held frames reached the peer ({how})"
    );
    assert_eq!(t.checkpoint(), 1);
    assert_eq!(t.commit(1)["frames"], 5);
    let f = sn.wait_for("released frames", |fs| count_port(fs, 7700) == 5);
    assert_eq!(seqs(&f, 7700), (0..5).collect::<Vec<_>>());

    let d = t.remus(&["detach", &t.vif, "-j"]).ok("detach").json();
    assert_eq!(d["holder_was_alive"], true);
    assert!(
        !t.pin_dir().exists(),
        "pins left: {}",
        t.pin_dir().display()
    );
    assert!(
        !t.state_file().exists() && !t.socket_file().exists(),
        "runtime files left"
    );
    assert!(
        !t.vif_qdiscs().contains("clsact"),
        "clsact left on the vif ({how}): {}",
        t.vif_qdiscs()
    );
    remus_tests::netns::wait_until("the helper tap to go", Duration::from_secs(10), || {
        !t.host_links().contains(&tap)
    });
    // Nothing is held any more: frames pass straight away.
    send_udp(&t.guest, dst, numbered(5..6));
    sn.wait_for("an unheld frame after detach", |fs| {
        count_port(fs, 7700) == 6
    });
}

#[test]
fn root_attach_tcx_holds_commits_and_detaches_cleanly() {
    hold_commit_detach("tx", "tcx", false);
}

/// A vif named like Xen's (vif5.0: a dot, which bpffs refuses in pin names).
#[test]
fn root_attach_to_a_xen_named_vif_holds_commits_and_detaches_cleanly() {
    hold_commit_detach("xn", "tcx", true);
}

/// The netlink (clsact + cls_bpf) attach is what dom0's Linux 6.1 uses.
#[test]
fn root_attach_netlink_clsact_holds_commits_and_detaches_cleanly() {
    hold_commit_detach("nl", "netlink", false);
}

/// `detach --drop` (the default) discards held frames and reports them; `detach
/// --release` sends them first (in order) and reports that instead.
#[test]
fn root_detach_drop_discards_and_detach_release_sends_held_frames() {
    let t = Topo::new("dr");
    let sn = t.sniff_peer();
    let dst = addr("10.77.0.2:7650");

    t.attach(&[]);
    send_udp(&t.guest, dst, numbered(0..4));
    t.wait_held(4);
    let d = t
        .remus(&["detach", &t.vif, "--drop", "-j"])
        .ok("detach --drop")
        .json();
    assert_eq!(d["dropped_frames"], 4, "{d}");
    assert_eq!(d["released_frames"], 0, "{d}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        count_port(&sn.frames(), 7650),
        0,
        "detach --drop released frames"
    );

    t.attach(&[]);
    send_udp(&t.guest, dst, numbered(4..8));
    t.wait_held(4);
    let d = t
        .remus(&["detach", &t.vif, "--release", "-j"])
        .ok("detach --release")
        .json();
    assert_eq!(d["released_frames"], 4, "{d}");
    assert_eq!(d["dropped_frames"], 0, "{d}");
    let f = sn.wait_for("frames sent by detach --release", |fs| {
        count_port(fs, 7650) == 4
    });
    assert_eq!(seqs(&f, 7650), vec![4, 5, 6, 7]);
    assert!(
        !t.pin_dir().exists() && !t.state_file().exists(),
        "detach left state"
    );
}

/// Two senders on different CPUs, a checkpoint while both are sending: each sender's
/// datagrams leave in its own order, and commit 1 lets out, per sender, exactly a prefix
/// of what it sent (a frame sent after another never gets an earlier epoch).
#[test]
fn root_concurrent_senders_keep_per_sender_order_across_an_epoch_boundary() {
    const N: u32 = 2000;
    let t = Topo::new("mc");
    t.attach(&[]);
    let sn = t.sniff_peer();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let senders: Vec<_> = (0..2u16)
        .map(|k| {
            let g = t.guest.clone();
            std::thread::spawn(move || {
                in_netns(&g, move || {
                    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
                    unsafe {
                        let mut set: libc::cpu_set_t = std::mem::zeroed();
                        libc::CPU_SET(k as usize % cpus, &mut set);
                        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                    }
                    let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
                    for i in 0..N {
                        s.send_to(format!("seq:{i}").as_bytes(), ("10.77.0.2", 7800 + k))
                            .expect("send");
                        if i % 64 == 0 {
                            std::thread::yield_now();
                        }
                    }
                })
            })
        })
        .collect();
    remus_tests::netns::wait_until("both senders under way", Duration::from_secs(20), || {
        t.held_frames() >= 500
    });
    assert_eq!(t.checkpoint(), 1);
    for s in senders {
        s.join().expect("sender");
    }
    t.wait_held(2 * N as u64);
    assert_eq!(t.checkpoint(), 2);
    let st = t.status();
    let n1 = st["epochs"][0]["frames"].as_u64().expect("epoch 1 frames");
    assert_eq!(st["epochs"][0]["epoch"], 1, "{st}");
    eprintln!(
        "epoch 1: {n1} frames, epoch 2: {} frames",
        2 * N as u64 - n1
    );
    let r = t.commit(1);
    assert_eq!(r["frames"], n1);
    let total = |fs: &[Captured]| count_port(fs, 7800) + count_port(fs, 7801);
    sn.wait_for("epoch 1 at the peer", |fs| total(fs) as u64 >= n1);
    std::thread::sleep(Duration::from_millis(300));
    let f = sn.frames();
    assert_eq!(total(&f) as u64, n1, "more than epoch 1 left with commit 1");
    for port in [7800, 7801] {
        let s = seqs(&f, port);
        assert_eq!(
            s,
            (0..s.len() as u32).collect::<Vec<_>>(),
            "sender {port}: not a prefix in order"
        );
    }
    t.commit(2);
    let f = sn.wait_for("everything at the peer", |fs| total(fs) == 2 * N as usize);
    for port in [7800, 7801] {
        assert_eq!(
            seqs(&f, port),
            (0..N).collect::<Vec<_>>(),
            "sender {port}: order after commit 2"
        );
    }
}

/// A frame that does not fit the kernel ring (a 65,042-byte GSO frame into a 4 KiB ring)
/// is dropped and counted as a ring overflow; it is never passed and never released.
#[test]
fn root_ring_overflow_drops_and_counts_and_releases_nothing() {
    let t = Topo::new("rf");
    t.attach(&["--ring-bytes", "4096"]);
    let sn = t.sniff_peer();
    send_udp_gso(
        &t.guest,
        "10.77.0.2:7310".parse().expect("addr"),
        vec![7u8; 65_000],
        1400,
    );
    remus_tests::netns::wait_until(
        "the ring overflow to be counted",
        Duration::from_secs(20),
        || {
            t.status()["kernel"]["dropped_ring_full_frames"]
                .as_u64()
                .unwrap_or(0)
                >= 1
        },
    );
    // A small frame still fits and is held behind it.
    send_udp(&t.guest, addr("10.77.0.2:7311"), numbered(0..1));
    t.wait_held(1);
    let st = t.status();
    assert_eq!(st["kernel"]["dropped_ring_full_frames"], 1, "{st}");
    assert_eq!(st["held_frames"], 1, "{st}");
    assert_eq!(t.checkpoint(), 1);
    assert_eq!(t.commit(1)["frames"], 1);
    sn.wait_for("the small frame", |fs| count_port(fs, 7311) == 1);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        sn.frames()
            .iter()
            .all(|f| f.udp().is_none_or(|(p, _)| p != 7310)),
        "the dropped frame reached the peer"
    );
}

/// A commit of an epoch that is not closed yet, sent by the controller's `RemoteBuffer`
/// through the holder's real control socket, comes back as the port's typed
/// `EpochNotClosed` (rebuilt from the answer's error kind, not its text) and releases
/// nothing.
#[test]
fn root_remote_commit_of_an_open_epoch_is_epoch_not_closed_and_releases_nothing() {
    use remus_user::netbuf::{NetBuffer, NetBufferError};
    let t = Topo::new("ec");
    t.attach(&[]);
    let sn = t.sniff_peer();
    send_udp(
        &t.guest,
        "10.77.0.2:7410".parse().expect("addr"),
        vec![b"held".to_vec(); 3],
    );
    t.wait_held(3);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (closed, r) = rt.block_on(async {
        let mut rb = remus_user::netbuf::connect(&t.vif).await.expect("connect");
        let closed = rb.close_epoch().await.expect("checkpoint");
        (closed, rb.commit(closed + 1).await)
    });
    assert_eq!(closed, 1);
    match r {
        Err(NetBufferError::EpochNotClosed { epoch, current }) => {
            assert_eq!((epoch, current), (2, 2))
        }
        other => panic!("expected EpochNotClosed, got {other:?}"),
    }
    assert_eq!(t.held_frames(), 3);
    std::thread::sleep(Duration::from_millis(200));
    let escaped = sn
        .frames()
        .iter()
        .filter(|f| f.udp().is_some_and(|(p, _)| p == 7410))
        .count();
    assert_eq!(escaped, 0, "a refused commit released frames");
}
