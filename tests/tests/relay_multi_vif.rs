//! Several vifs of one guest under one epoch sequence (root): `remus relay send --vif A
//! --vif B` (and `--attached A --attached B`) with the real eBPF buffer on two veth
//! "vifs" on one bridge, a fake backup played by this test (it acknowledges only when
//! told to), and the LAN peer watched with a raw socket.
//!
//! The guest's two NICs are two namespaces (the kit's guest on vif A, a second one on
//! vif B), sending interleaved datagrams in epochs 1..3. Asserted at the peer: nothing
//! before ACK(1); ACK(1) releases epoch 1 of both vifs and nothing later; ACK(3) covers
//! epochs 2 and 3 at once, and every epoch-2 frame of both vifs arrives before any
//! epoch-3 frame (a per-vif commit of "everything <= 3" would send A's epoch 3 ahead of
//! B's epoch 2); the lost backup opens both vifs.
mod relay_common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use relay_common::*;
use remus_testkit::frames::mac_str;
use remus_tests::netns::{Captured, PEER_IP, PEER_MAC, Topo, send_udp};
use remus_user::stream::writer::WriterConfig;

const KEY: &str = "multi-vif-relay-key-0123456789";
const PORT: u16 = 7400;
const GUEST2_IP: &str = "10.77.0.3";
const GUEST2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
/// Datagrams per vif per epoch.
const PER: usize = 8;

/// The guest's second NIC: its own namespace on vif B (`<prefix>w`), on the topology's
/// bridge. Removed on drop (with vif B's remus-net files and pins), before the topology.
struct SecondVif {
    ns: String,
    vif: String,
    host: String,
}

impl SecondVif {
    fn add(t: &Topo) -> SecondVif {
        let s = SecondVif {
            ns: format!("{}g2", t.prefix),
            vif: format!("{}w", t.prefix),
            host: t.host.clone(),
        };
        s.remove();
        remus_testkit::ns::create(&s.ns, false).expect("second guest namespace");
        let ip = |ns: &str, args: &[&str]| {
            remus_testkit::cmd::ip(ns, args).unwrap_or_else(|e| panic!("{e}"));
        };
        ip(
            &t.host,
            &[
                "link", "add", &s.vif, "type", "veth", "peer", "name", "eth0", "netns", &s.ns,
            ],
        );
        ip(&t.host, &["link", "set", &s.vif, "master", "br0"]);
        ip(&t.host, &["link", "set", &s.vif, "up"]);
        ip(
            &s.ns,
            &["link", "set", "eth0", "address", &mac_str(&GUEST2_MAC)],
        );
        ip(
            &s.ns,
            &["addr", "add", &format!("{GUEST2_IP}/24"), "dev", "eth0"],
        );
        ip(&s.ns, &["link", "set", "eth0", "up"]);
        ip(
            &s.ns,
            &[
                "neigh",
                "replace",
                PEER_IP,
                "lladdr",
                &mac_str(&PEER_MAC),
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        );
        s
    }

    fn files(&self) -> Vec<PathBuf> {
        ["json", "sock", "log"]
            .iter()
            .map(|x| PathBuf::from(format!("/run/remus/net-{}.{x}", self.vif)))
            .collect()
    }

    fn remove(&self) {
        if Path::new(&format!("/run/netns/{}", self.host)).exists() {
            let bin = remus_tests::netns::remus_net_bin();
            let _ = remus_testkit::cmd::run_in(
                &self.host,
                &bin.to_string_lossy(),
                &["detach", &self.vif, "--drop"],
            );
        }
        remus_testkit::ns::remove(&self.ns);
        for f in self.files() {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/remus/{}", self.vif));
    }
}

impl Drop for SecondVif {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Payloads "<vif>e<epoch>:<i>" to PORT seen at the peer, in arrival order.
fn seen(frames: &[Captured]) -> Vec<String> {
    frames
        .iter()
        .filter_map(|f| f.udp())
        .filter(|(p, _)| *p == PORT)
        .filter_map(|(_, pl)| std::str::from_utf8(pl).ok().map(str::to_string))
        .collect()
}

fn epoch_of(p: &str) -> u32 {
    p[1..]
        .strip_prefix('e')
        .and_then(|r| r.split(':').next())
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("not a test payload: {p}"))
}

fn of_epoch(v: &[String], e: u32) -> usize {
    v.iter().filter(|p| epoch_of(p) == e).count()
}

/// One epoch's datagrams, interleaved across the two NICs: a0 b0 a1 b1 …
fn send_epoch(t: &Topo, second: &SecondVif, e: u32) {
    let peer: SocketAddr = format!("{PEER_IP}:{PORT}").parse().unwrap();
    for i in 0..PER {
        for (ns, tag) in [(t.guest.as_str(), 'a'), (second.ns.as_str(), 'b')] {
            send_udp(ns, peer, vec![format!("{tag}e{e}:{i}").into_bytes()]);
        }
    }
}

/// Waits until each vif's holder (in-process or remus-net's: both answer on the vif's
/// control socket) holds at least `n` frames: they left the ring.
fn wait_held_both(t: &Topo, second: &SecondVif, n: u64) {
    let held = |vif: &str| {
        let o = t.remus(&["status", vif, "-j"]);
        o.json()["status"]["held_frames"].as_u64().unwrap_or(0)
    };
    remus_tests::netns::wait_until(
        &format!("{n} held frames on each vif"),
        std::time::Duration::from_secs(20),
        || held(&t.vif) >= n && held(&second.vif) >= n,
    );
}

#[test]
fn root_relay_two_vifs_release_epoch_by_epoch_across_vifs() {
    two_vifs("mv", false);
}

/// The same with both buffers attached beforehand by `remus-net attach` (`--attached`).
#[test]
fn root_relay_two_attached_vifs_release_epoch_by_epoch_across_vifs() {
    two_vifs("ma", true);
}

fn two_vifs(tag: &str, attached: bool) {
    let t = Topo::new(tag);
    let second = SecondVif::add(&t);
    let flag = if attached {
        t.attach(&[]);
        t.remus(&["attach", &second.vif]).ok("remus-net attach B");
        "--attached"
    } else {
        "--vif"
    };
    let buffer = [flag, t.vif.as_str(), flag, second.vif.as_str()];
    let sn = t.sniff_peer();
    let run = relay_against_fake_backup(&t.host, &format!("multi-{tag}"), &buffer, KEY);
    let (mut tx, cmd_tx, backup) = (run.tx, run.cmds, run.backup);
    let st = Stream::new(&WriterConfig::pv(3));

    send_epoch(&t, &second, 1);
    wait_held_both(&t, &second, PER as u64);
    tx.write(st.checkpoint(1));
    wait_status(&tx.status_sock, "checkpoint 1 parsed", |v| {
        v["last_checkpoint"] == 1
    });
    send_epoch(&t, &second, 2);
    wait_held_both(&t, &second, 2 * PER as u64);
    tx.write(st.checkpoint(2));
    let s = wait_status(&tx.status_sock, "checkpoint 2 parsed", |v| {
        v["last_checkpoint"] == 2
    });
    assert_eq!(s["epoch_merges_total"], 0, "cuts proven in time: {s}");
    assert_eq!(
        s["vifs"],
        serde_json::json!([t.vif, second.vif]),
        "status names every vif: {s}"
    );
    send_epoch(&t, &second, 3);
    wait_held_both(&t, &second, 3 * PER as u64);
    tx.write(st.checkpoint(3));
    wait_status(&tx.status_sock, "checkpoint 3 parsed", |v| {
        v["last_checkpoint"] == 3
    });
    assert!(
        seen(&sn.frames()).is_empty(),
        "nothing leaves before an ACK"
    );

    // ACK(1): epoch 1 of both vifs, nothing later.
    cmd_tx.send(Cmd::Ack(1)).unwrap();
    let f = sn.wait_for("epoch 1 of both vifs at the peer", |f| {
        of_epoch(&seen(f), 1) == 2 * PER
    });
    let v = seen(&f);
    assert_eq!(v.len(), 2 * PER, "only epoch 1 after ACK(1): {v:?}");
    for tag in ['a', 'b'] {
        let mine: Vec<&String> = v.iter().filter(|p| p.starts_with(tag)).collect();
        assert_eq!(mine.len(), PER, "vif {tag}'s epoch 1: {v:?}");
    }

    // ACK(3) covers epochs 2 and 3 at once: every epoch-2 frame first, on both vifs.
    sn.clear();
    cmd_tx.send(Cmd::Ack(3)).unwrap();
    let f = sn.wait_for("epochs 2 and 3 of both vifs at the peer", |f| {
        seen(f).len() == 4 * PER
    });
    let v = seen(&f);
    let epochs: Vec<u32> = v.iter().map(|p| epoch_of(p)).collect();
    let last_two = epochs.iter().rposition(|&e| e == 2).unwrap_or(0);
    let first_three = epochs.iter().position(|&e| e == 3).unwrap_or(usize::MAX);
    assert!(
        last_two < first_three,
        "an epoch-3 frame left before an epoch-2 frame of the other vif: {v:?}"
    );
    // Within a vif, capture order.
    for tag in ['a', 'b'] {
        let mine: Vec<&String> = v.iter().filter(|p| p.starts_with(tag)).collect();
        let want: Vec<String> = (2..=3)
            .flat_map(|e| (0..PER).map(move |i| format!("{tag}e{e}:{i}")))
            .collect();
        assert_eq!(mine, want.iter().collect::<Vec<_>>(), "vif {tag} in order");
    }

    // Epoch 4 is held on both; losing the backup opens both vifs.
    sn.clear();
    send_epoch(&t, &second, 4);
    wait_held_both(&t, &second, PER as u64);
    assert!(
        seen(&sn.frames()).is_empty(),
        "epoch 4 leaked before the loss"
    );
    cmd_tx.send(Cmd::Drop).unwrap();
    backup.join().unwrap();
    let code = wait_child(&mut tx.child, "relay send").code();
    assert_eq!(code, Some(4), "sender log:\n{}", tx.log());
    sn.wait_for("epoch 4 of both vifs after the loss", |f| {
        of_epoch(&seen(f), 4) == 2 * PER
    });
}
