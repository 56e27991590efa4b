//! Output commit end to end (root): `remus relay send --vif` with the real eBPF buffer in
//! a network namespace, a fake backup played by this test (it acknowledges only when told
//! to), and a LAN peer watched with a raw socket. No frame the guest sends in epoch N
//! reaches the peer before the backup's ACK(N); losing the backup releases the rest.
mod relay_common;

use std::net::SocketAddr;

use relay_common::*;
use remus_tests::netns::{Captured, Topo, in_netns, send_udp};
use remus_user::stream::writer::WriterConfig;

const KEY: &str = "netns-relay-key-0123456789";
const PORT: u16 = 7300;

/// Payloads "eN:i" to PORT seen at the peer, in arrival order.
fn seen(frames: &[Captured]) -> Vec<String> {
    udp_payloads(frames, PORT)
}

fn of_epoch(v: &[String], e: u32) -> Vec<String> {
    v.iter()
        .filter(|s| s.starts_with(&format!("e{e}:")))
        .cloned()
        .collect()
}

#[test]
fn root_relay_no_frame_of_epoch_n_reaches_the_peer_before_ack_n() {
    ordering("rn", false);
}

/// The same with a buffer attached beforehand by `remus-net attach` (`--attached`).
#[test]
fn root_relay_attached_buffer_no_frame_of_epoch_n_before_ack_n() {
    ordering("ra", true);
}

fn ordering(tag: &str, attached: bool) {
    let t = Topo::new(tag);
    if attached {
        t.attach(&[]);
    }
    let buffer = if attached {
        ["--attached", t.vif.as_str()]
    } else {
        ["--vif", t.vif.as_str()]
    };
    let sn = t.sniff_peer();
    let run = relay_against_fake_backup(&t.host, &format!("netns-{tag}"), &buffer, KEY);
    let (mut tx, cmd_tx, backup) = (run.tx, run.cmds, run.backup);
    let st = Stream::new(&WriterConfig::pv(3));
    let peer: SocketAddr = format!("10.77.0.2:{PORT}").parse().unwrap();

    // Epoch 1: before the first checkpoint's post-suspend bytes. Held from the start.
    send_udp(&t.guest, peer, epoch_payloads(1));
    t.wait_held(10);
    tx.write(st.checkpoint(1));
    wait_status(&tx.status_sock, "checkpoint 1 parsed", |v| {
        v["last_checkpoint"] == 1
    });
    // Epoch 2, then checkpoint 2; epoch 3.
    send_udp(&t.guest, peer, epoch_payloads(2));
    t.wait_held(20);
    tx.write(st.checkpoint(2));
    let s = wait_status(&tx.status_sock, "checkpoint 2 parsed", |v| {
        v["last_checkpoint"] == 2
    });
    assert_eq!(
        s["epoch_merges_total"], 0,
        "both switches must be proven in time: {s}"
    );
    send_udp(&t.guest, peer, epoch_payloads(3));
    t.wait_held(30);
    assert!(
        seen(&sn.frames()).is_empty(),
        "nothing may leave before any ACK"
    );

    // ACK(1): exactly epoch 1, in order.
    cmd_tx.send(Cmd::Ack(1)).unwrap();
    let f = sn.wait_for("epoch 1 at the peer", |f| of_epoch(&seen(f), 1).len() == 10);
    let v = seen(&f);
    assert_eq!(
        of_epoch(&v, 1),
        (0..10).map(|i| format!("e1:{i}")).collect::<Vec<_>>()
    );
    assert!(
        of_epoch(&v, 2).is_empty() && of_epoch(&v, 3).is_empty(),
        "released early: {v:?}"
    );
    assert_eq!(t.held_frames(), 20);

    // ACK(2): epoch 2; epoch 3 stays held.
    cmd_tx.send(Cmd::Ack(2)).unwrap();
    let f = sn.wait_for("epoch 2 at the peer", |f| of_epoch(&seen(f), 2).len() == 10);
    assert!(
        of_epoch(&seen(&f), 3).is_empty(),
        "epoch 3 released before its ACK"
    );
    assert_eq!(t.held_frames(), 10);

    // The backup is lost: the sender releases everything and exits 4.
    cmd_tx.send(Cmd::Drop).unwrap();
    backup.join().unwrap();
    let code = wait_child(&mut tx.child, "relay send").code();
    assert_eq!(code, Some(4), "sender log:\n{}", tx.log());
    let f = sn.wait_for("epoch 3 after fail-open", |f| {
        of_epoch(&seen(f), 3).len() == 10
    });
    let v = seen(&f);
    assert_eq!(v.len(), 30, "every frame exactly once: {v:?}");
    // The buffer stays open after the relay exited: later frames pass straight through.
    send_udp(&t.guest, peer, epoch_payloads(4));
    sn.wait_for("epoch 4 passing through", |f| {
        of_epoch(&seen(f), 4).len() == 10
    });
}

#[test]
fn root_relay_unreachable_backup_leaves_the_guest_unblocked() {
    let t = Topo::new("ru");
    let sn = t.sniff_peer();
    let dir = Scratch::new("netns-unreach");
    let key = dir.key("key", KEY);
    // A port in the host namespace that nobody listens on.
    let closed = in_netns(&t.host, || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    });
    let mut tx = Sender::start_in(
        Some(&t.host),
        &dir,
        "a",
        &["--vif", &t.vif],
        &closed,
        &key,
        &[],
    );
    let code = wait_child(&mut tx.child, "relay send").code();
    assert_eq!(code, Some(4), "sender log:\n{}", tx.log());
    let log = tx.log();
    assert!(log.contains("connecting to the backup"), "{log}");
    // It did attach (holding) before it tried the backup, then opened the buffer.
    assert!(
        log.contains("attached in-process") && log.contains("released what was held"),
        "{log}"
    );
    // xl resumes the guest unprotected: its output must not stay held by the buffer.
    let peer: SocketAddr = format!("10.77.0.2:{PORT}").parse().unwrap();
    send_udp(&t.guest, peer, epoch_payloads(1));
    sn.wait_for("the guest's frames at the peer", |f| {
        of_epoch(&seen(f), 1).len() == 10
    });
}
