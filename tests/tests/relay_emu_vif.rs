//! An HVM guest's emulated NIC vanishing while protected (root): `remus relay send --vif
//! A --vif B-emu` with the real eBPF buffer on two veth "vifs" (B named like a device
//! model's tap, `…-emu`), a fake backup played by this test (it acknowledges only when
//! told to), and the LAN peer watched with a raw socket.
//!
//! When the guest's PV drivers take over, Xen's device model unplugs the emulated NIC and
//! its tap leaves dom0. Here B is deleted while both vifs hold epoch 2. Asserted: the
//! relay goes on (the emu vif leaves the group, not a failure: its held frames are dropped
//! with the device); ACK(3) releases vif A's epochs 2 and 3, in order, and no frame of B;
//! the lost backup still opens vif A.
mod relay_common;

use std::net::SocketAddr;

use relay_common::*;
use remus_tests::netns::{Captured, PEER_IP, Topo, send_udp};
use remus_user::stream::writer::WriterConfig;

const KEY: &str = "emu-vif-relay-key-0123456789abcd";
const PORT: u16 = 7410;
/// Datagrams per vif per epoch.
const PER: usize = 6;

/// Payloads "<vif>e<epoch>:<i>" to PORT seen at the peer (from either NIC), in arrival
/// order.
fn seen(frames: &[Captured]) -> Vec<String> {
    frames
        .iter()
        .filter_map(|f| f.udp())
        .filter(|(p, _)| *p == PORT)
        .filter_map(|(_, pl)| std::str::from_utf8(pl).ok().map(str::to_string))
        .collect()
}

/// One epoch's datagrams on vif A (tag a) and, if it is still there, the emu vif (b).
fn send_epoch(t: &Topo, emu: Option<&SecondNic>, e: u32) {
    let peer: SocketAddr = format!("{PEER_IP}:{PORT}").parse().unwrap();
    for i in 0..PER {
        send_udp(&t.guest, peer, vec![format!("ae{e}:{i}").into_bytes()]);
        if let Some(emu) = emu {
            send_udp(&emu.ns, peer, vec![format!("be{e}:{i}").into_bytes()]);
        }
    }
}

fn held(t: &Topo, vif: &str) -> u64 {
    let o = t.remus(&["status", vif, "-j"]);
    o.json()["status"]["held_frames"].as_u64().unwrap_or(0)
}

#[test]
fn root_relay_goes_on_when_an_emulated_nic_vanishes() {
    let t = Topo::new("ev");
    let emu = SecondNic::add(&t, "-emu");
    let buffer = ["--vif", t.vif.as_str(), "--vif", emu.vif.as_str()];
    let sn = t.sniff_peer();
    let run = relay_against_fake_backup(&t.host, "emu-vif", &buffer, KEY);
    let (mut tx, cmd_tx, backup) = (run.tx, run.cmds, run.backup);
    let st = Stream::new(&WriterConfig::pv(4));

    // Passing until checkpoint 1's cut, held on both vifs from then on.
    send_epoch(&t, Some(&emu), 1);
    sn.wait_for(
        "epoch 1 of both vifs passing before the first suspend",
        |f| seen(f).len() == 2 * PER,
    );
    sn.clear();
    tx.write_checkpoint(&st, 1);
    wait_status(&tx.status_sock, "checkpoint 1 parsed", |v| {
        v["last_checkpoint"] == 1
    });
    send_epoch(&t, Some(&emu), 2);
    remus_tests::netns::wait_until(
        "epoch 2 held on both vifs",
        std::time::Duration::from_secs(20),
        || held(&t, &t.vif) >= PER as u64 && held(&t, &emu.vif) >= PER as u64,
    );
    tx.write_checkpoint(&st, 2);
    wait_status(&tx.status_sock, "checkpoint 2 parsed", |v| {
        v["last_checkpoint"] == 2
    });

    // The PV drivers take over: the emulated NIC's tap leaves, its holder sees it go.
    emu.unplug();
    remus_tests::netns::wait_until(
        "the emu vif's holder saw its vif go",
        std::time::Duration::from_secs(20),
        || tx.log().contains("the vif is gone"),
    );
    send_epoch(&t, None, 3);
    remus_tests::netns::wait_until(
        "epoch 3 held on vif A",
        std::time::Duration::from_secs(20),
        || held(&t, &t.vif) >= 2 * PER as u64,
    );
    tx.write_checkpoint(&st, 3);
    wait_status(&tx.status_sock, "checkpoint 3 parsed", |v| {
        v["last_checkpoint"] == 3
    });
    assert!(
        tx.log().contains("it leaves the group"),
        "the group says the emu vif left it:\n{}",
        tx.log()
    );
    assert!(
        seen(&sn.frames()).is_empty(),
        "nothing leaves before an ACK, the vanished vif's frames neither"
    );

    // ACK(3): vif A's epochs 2 and 3, in capture order; nothing of the vanished vif.
    cmd_tx.send(Cmd::Ack(3)).unwrap();
    let f = sn.wait_for("epochs 2 and 3 of vif A at the peer", |f| {
        seen(f).len() >= 2 * PER
    });
    let want: Vec<String> = (2..=3)
        .flat_map(|e| (0..PER).map(move |i| format!("ae{e}:{i}")))
        .collect();
    assert_eq!(seen(&f), want, "vif A's epochs 2 and 3, in order, only");
    wait_status(&tx.status_sock, "epoch 3 committed", |v| {
        v["committed_epoch"] == 3
    });

    // Epoch 4 is held on vif A; losing the backup opens it.
    sn.clear();
    send_epoch(&t, None, 4);
    remus_tests::netns::wait_until(
        "epoch 4 held on vif A",
        std::time::Duration::from_secs(20),
        || held(&t, &t.vif) >= PER as u64,
    );
    assert!(
        seen(&sn.frames()).is_empty(),
        "epoch 4 leaked before the loss"
    );
    cmd_tx.send(Cmd::Drop).unwrap();
    backup.join().unwrap();
    tx.expect_exit(4);
    sn.wait_for("epoch 4 of vif A after the loss", |f| seen(f).len() == PER);
}
