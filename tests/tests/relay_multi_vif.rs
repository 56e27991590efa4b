//! Several vifs of one guest under one epoch sequence (root): `remus relay send --vif A
//! --vif B` (and `--attached A --attached B`) with the real eBPF buffer on two veth
//! "vifs" on one bridge, a fake backup played by this test (it acknowledges only when
//! told to), and the LAN peer watched with a raw socket.
//!
//! The guest's two NICs are two namespaces (the kit's guest on vif A, a second one on
//! vif B), sending interleaved datagrams in epochs 1..3. Asserted at the peer: in-process
//! (`--vif`, passing until the first checkpoint) epoch 1 of both vifs passes and both are
//! held from checkpoint 1's cut on; attached by remus-net (holding) nothing before ACK(1),
//! and ACK(1) releases epoch 1 of both vifs and nothing later; ACK(3) covers
//! epochs 2 and 3 at once, and every epoch-2 frame of both vifs arrives before any
//! epoch-3 frame (a per-vif commit of "everything <= 3" would send A's epoch 3 ahead of
//! B's epoch 2); the lost backup opens both vifs.
mod relay_common;

use std::net::SocketAddr;

use relay_common::*;
use remus_tests::netns::{Captured, PEER_IP, Topo, send_udp};
use remus_user::stream::writer::WriterConfig;

const KEY: &str = "multi-vif-relay-key-0123456789";
const PORT: u16 = 7400;
/// Datagrams per vif per epoch.
const PER: usize = 8;

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
fn send_epoch(t: &Topo, second: &SecondNic, e: u32) {
    let peer: SocketAddr = format!("{PEER_IP}:{PORT}").parse().unwrap();
    for i in 0..PER {
        for (ns, tag) in [(t.guest.as_str(), 'a'), (second.ns.as_str(), 'b')] {
            send_udp(ns, peer, vec![format!("{tag}e{e}:{i}").into_bytes()]);
        }
    }
}

/// Waits until each vif's holder (in-process or remus-net's: both answer on the vif's
/// control socket) holds at least `n` frames: they left the ring.
fn wait_held_both(t: &Topo, second: &SecondNic, n: u64) {
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
    let second = SecondNic::add(&t, "");
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

    // In-process (`--vif`) the buffers pass until checkpoint 1's cut, which switches every
    // vif of the group to holding; attached by remus-net (holding) they hold from attach.
    let first_passes = !attached;
    send_epoch(&t, &second, 1);
    let held_first = if first_passes {
        sn.wait_for(
            "epoch 1 of both vifs passing before the first suspend",
            |f| of_epoch(&seen(f), 1) == 2 * PER,
        );
        sn.clear();
        0
    } else {
        wait_held_both(&t, &second, PER as u64);
        PER as u64
    };
    tx.write_checkpoint(&st, 1);
    wait_status(&tx.status_sock, "checkpoint 1 parsed", |v| {
        v["last_checkpoint"] == 1
    });
    send_epoch(&t, &second, 2);
    wait_held_both(&t, &second, held_first + PER as u64);
    tx.write_checkpoint(&st, 2);
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
    wait_held_both(&t, &second, held_first + 2 * PER as u64);
    tx.write_checkpoint(&st, 3);
    wait_status(&tx.status_sock, "checkpoint 3 parsed", |v| {
        v["last_checkpoint"] == 3
    });
    assert!(
        seen(&sn.frames()).is_empty(),
        "nothing leaves before an ACK (after the first cut when passing until it)"
    );

    // ACK(1): epoch 1 of both vifs (empty when it passed), nothing later.
    cmd_tx.send(Cmd::Ack(1)).unwrap();
    if first_passes {
        wait_status(&tx.status_sock, "epoch 1 committed", |v| {
            v["committed_epoch"] == 1
        });
        assert!(
            seen(&sn.frames()).is_empty(),
            "ACK(1) released a frame of a later epoch"
        );
    } else {
        let f = sn.wait_for("epoch 1 of both vifs at the peer", |f| {
            of_epoch(&seen(f), 1) == 2 * PER
        });
        let v = seen(&f);
        assert_eq!(v.len(), 2 * PER, "only epoch 1 after ACK(1): {v:?}");
        for tag in ['a', 'b'] {
            let mine: Vec<&String> = v.iter().filter(|p| p.starts_with(tag)).collect();
            assert_eq!(mine.len(), PER, "vif {tag}'s epoch 1: {v:?}");
        }
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
    tx.expect_exit(4);
    sn.wait_for("epoch 4 of both vifs after the loss", |f| {
        of_epoch(&seen(f), 4) == 2 * PER
    });
}
