//! Ending a protection without a failover, and the backup's other ends that are no
//! failover, with the real `remus` binary at both ends:
//! - a probe (`replication::client_probe`) with the right key is answered and starts
//!   nothing (no session, no refusal counted); with another key it is the typed
//!   authentication error; against a busy backup it says so;
//! - `end_protection` on the sender's control socket: the backup kills its receiver
//!   while the receiver's stream is open (the fake receiver never sees its end), runs
//!   the discard command with the stream's domain, counts no failover; the sender gets
//!   `discarded` and exits 0. Root, with the real eBPF buffer in a network namespace:
//!   what was held is released only then, and later frames pass; with the backup frozen
//!   the answer is `unconfirmed`, the sender exits 5 and the output stays held;
//! - a receiver that dies on its own is a typed end, not a failover.
mod relay_common;

use std::net::SocketAddr;

use relay_common::*;
use remus_tests::netns::{Captured, Sniffer, Topo, send_udp};
use remus_user::compress::Codec;
use remus_user::relay::control::EndAnswer;
use remus_user::replication::{self, ClientConfig, Key, Prover, VERSION, WireError};
use remus_user::stream::writer::WriterConfig;

const KEY: &str = "end-of-protection-key-0123456789";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn probe(addr: &str, key: &str) -> Result<replication::ProbeAnswer, WireError> {
    rt().block_on(async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let cfg = ClientConfig::new(Key::from_bytes(key.as_bytes())?, Codec::None, 0);
        replication::client_probe(&mut s, &cfg).await
    })
}

/// `--discard-cmd` that records the domain it was given in `dir/discarded`.
fn recording_discard(dir: &Scratch) -> String {
    format!(
        "printf '%s' \"$REMUS_DOMAIN\" > {}/discarded",
        dir.path().display()
    )
}

#[test]
fn a_probe_is_answered_with_the_key_starts_nothing_and_counts_no_refusal() {
    let dir = Scratch::new("probe");
    let key = dir.key("key", KEY);
    let rx = Receiver::start(&dir, &key, false, &[]);
    let ok = probe(&rx.addr, KEY).expect("the probe passes");
    assert_eq!((ok.version, ok.busy), (VERSION, false));
    let s = rx.status();
    assert_eq!(s["probes_total"], 1, "{s}");
    assert_eq!(s["auth_failures_total"], 0, "{s}");
    assert_eq!(s["state"], "waiting for primary", "{s}");
    assert!(
        dir.sessions().is_empty(),
        "a receiver was started for a probe"
    );

    // Another key: the typed error, and the backup counts that refusal.
    let e = probe(&rx.addr, "not-the-key-0123456789abcdef").unwrap_err();
    assert!(matches!(e, WireError::AuthFailed(Prover::Backup)), "{e:?}");
    wait_status(&rx.status_sock, "the refusal counted", |v| {
        v["auth_failures_total"] == 1
    });

    // While a primary is replicated, a probe still passes and says the backup is busy.
    let mut tx = Sender::start(&dir, "a", &rx.addr, &key, &[]);
    assert_eq!(tx.read_banner(), BANNER);
    let busy = probe(&rx.addr, KEY).expect("the probe passes");
    assert!(busy.busy);
    let s = rx.status();
    assert_eq!(
        (
            s["probes_total"].as_u64(),
            s["auth_failures_total"].as_u64()
        ),
        (Some(2), Some(1))
    );
    assert_eq!(
        s["state"], "replicating",
        "the session was not disturbed: {s}"
    );
    tx.close_stdin();
    wait_child(&mut tx.child, "relay send");
}

#[test]
fn ending_protection_discards_the_copy_without_a_failover() {
    let dir = Scratch::new("discard");
    let key = dir.key("key", KEY);
    let discard = recording_discard(&dir);
    let rx = Receiver::start_with(
        None,
        &dir,
        &key,
        &eof_marking_receiver_cmd(dir.path()),
        false,
        &["--discard-cmd", &discard],
    );
    let mut tx = Sender::start(&dir, "a", &rx.addr, &key, &[]);
    assert_eq!(tx.read_banner(), BANNER);
    let st = Stream::new(&WriterConfig::pv(5));
    feed(&mut tx, &st, 1, 3);
    wait_status(&tx.status_sock, "ACK(3)", |v| v["last_acked"] == 3);
    // Half of checkpoint 4 is in flight when protection ends.
    let cp4 = st.checkpoint(4);
    tx.write(&cp4[..cp4.len() / 2]);

    let answer = tx.end_protection();
    assert_eq!(
        answer,
        EndAnswer::Discarded {
            checkpoint: 3,
            copy_destroyed: true
        },
        "sender log:\n{}",
        tx.log()
    );
    assert_eq!(
        wait_child(&mut tx.child, "relay send").code(),
        Some(0),
        "{}",
        tx.log()
    );
    let s = wait_status(&rx.status_sock, "the session to end", |v| {
        v["state"] == "waiting for primary" && v["discards_total"] == 1
    });
    assert_eq!(s["failovers_total"], 0, "{s}");
    assert_eq!(s["last_session"]["end"], "discarded", "{s}");
    assert_eq!(s["last_session"]["checkpoint"], 3, "{s}");
    // The receiver had checkpoints 1-3 and was killed with its stream open: it never saw
    // the end that would have activated the copy.
    let sessions = dir.sessions();
    assert_eq!(sessions.len(), 1);
    assert!(sessions[0] == st.through(3));
    assert_eq!(clean_ends(dir.path()), 0, "the receiver saw its stream end");
    // The discard command got the domain named in the stream's xl header.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("discarded")).unwrap(),
        "guest1"
    );
}

#[test]
fn a_receiver_that_dies_on_its_own_is_no_failover() {
    let dir = Scratch::new("rxdies");
    let key = dir.key("key", KEY);
    let rx = Receiver::start(&dir, &key, false, &[]);
    let mut tx = Sender::start(&dir, "a", &rx.addr, &key, &[]);
    assert_eq!(tx.read_banner(), BANNER);
    let st = Stream::new(&WriterConfig::pv(4));
    feed(&mut tx, &st, 1, 2);
    wait_status(&rx.status_sock, "ACK(2)", |v| v["last_acked"] == 2);
    // Kill the receiver as an operator (or a crash) would: its pid names its file.
    let name = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("session."))
        .expect("the receiver's file");
    let pid: i32 = name["session.".len()..].parse().unwrap();
    // SAFETY: kill of the fake receiver this test's relay started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);

    let s = wait_status(&rx.status_sock, "the receiver's end", |v| {
        v["last_session"]["end"] == "receiver_ended"
    });
    assert_eq!(s["failovers_total"], 0, "{s}");
    assert_eq!(s["last_session"]["signal"], libc::SIGKILL, "{s}");
    assert_eq!(s["last_session"]["checkpoint"], 2, "{s}");
    // The backup holds no copy any more: the primary hears it and fails open (exit 4).
    assert_eq!(
        wait_child(&mut tx.child, "relay send").code(),
        Some(4),
        "{}",
        tx.log()
    );
}

const PORT: u16 = 7310;

/// Payloads "eN:i" to PORT seen at the peer, in arrival order.
fn seen(frames: &[Captured]) -> Vec<String> {
    udp_payloads(frames, PORT)
}

fn of_epoch(v: &[String], e: u32) -> usize {
    v.iter()
        .filter(|s| s.starts_with(&format!("e{e}:")))
        .count()
}

/// A relay pair in the topology's host namespace (the sender with the real buffer on
/// the vif), checkpoint 1 acknowledged and its epoch released at the peer, then epochs
/// 2 and 3 held (checkpoint 2 half sent). Returns what the test needs next.
struct Held {
    t: Topo,
    sn: Sniffer,
    dir: Scratch,
    rx: Receiver,
    tx: Sender,
    peer: SocketAddr,
}

fn protected_with_epochs_held(tag: &str, sender_extra: &[&str]) -> Held {
    let t = Topo::new(tag);
    let sn = t.sniff_peer();
    let dir = Scratch::new(&format!("end-{tag}"));
    let key = dir.key("key", KEY);
    let discard = recording_discard(&dir);
    let rx = Receiver::start_with(
        Some(&t.host),
        &dir,
        &key,
        &eof_marking_receiver_cmd(dir.path()),
        false,
        &["--discard-cmd", &discard],
    );
    let mut tx = Sender::start_in(
        Some(&t.host),
        &dir,
        "a",
        &["--vif", t.vif.as_str()],
        &rx.addr,
        &key,
        sender_extra,
    );
    assert_eq!(tx.read_banner(), BANNER, "sender log:\n{}", tx.log());
    let st = Stream::new(&WriterConfig::pv(3));
    let peer: SocketAddr = format!("10.77.0.2:{PORT}").parse().unwrap();
    send_udp(&t.guest, peer, epoch_payloads(1));
    t.wait_held(10);
    tx.write(st.checkpoint(1));
    sn.wait_for("epoch 1 after ACK(1)", |f| of_epoch(&seen(f), 1) == 10);
    send_udp(&t.guest, peer, epoch_payloads(2));
    t.wait_held(10);
    let cp2 = st.checkpoint(2);
    tx.write(&cp2[..cp2.len() / 2]);
    wait_status(&tx.status_sock, "checkpoint 2's cut", |v| {
        v["committed_epoch"] == 1
    });
    send_udp(&t.guest, peer, epoch_payloads(3));
    t.wait_held(20);
    let v = seen(&sn.frames());
    assert_eq!(
        (of_epoch(&v, 2), of_epoch(&v, 3)),
        (0, 0),
        "released before any ACK: {v:?}"
    );
    Held {
        t,
        sn,
        dir,
        rx,
        tx,
        peer,
    }
}

#[test]
fn root_relay_end_protection_releases_only_once_the_backup_discarded_its_copy() {
    let mut h = protected_with_epochs_held("ed", &[]);
    let answer = h.tx.end_protection();
    assert!(
        matches!(answer, EndAnswer::Discarded { checkpoint: 1, .. }),
        "{answer:?}\n{}",
        h.tx.log()
    );
    // Everything held went out, in order, once the backup confirmed.
    let f = h.sn.wait_for("epochs 2 and 3 after the discard", |f| {
        let v = seen(f);
        of_epoch(&v, 2) == 10 && of_epoch(&v, 3) == 10
    });
    assert_eq!(seen(&f).len(), 30, "every frame exactly once");
    assert_eq!(
        wait_child(&mut h.tx.child, "relay send").code(),
        Some(0),
        "{}",
        h.tx.log()
    );
    // The buffer is gone from the vif: the guest's traffic flows.
    send_udp(&h.t.guest, h.peer, epoch_payloads(4));
    h.sn.wait_for("epoch 4 flowing", |f| of_epoch(&seen(f), 4) == 10);
    assert!(!h.t.pin_dir().exists(), "the buffer's pins are left");
    // The backup: no failover, its receiver killed with the stream open.
    let s = wait_status(&h.rx.status_sock, "the discard", |v| {
        v["discards_total"] == 1
    });
    assert_eq!(s["failovers_total"], 0, "{s}");
    assert_eq!(
        clean_ends(h.dir.path()),
        0,
        "the receiver saw its stream end"
    );
    assert_eq!(
        std::fs::read_to_string(h.dir.path().join("discarded")).unwrap(),
        "guest1"
    );
}

#[test]
fn root_relay_end_protection_with_the_backup_unreachable_keeps_holding_and_exits_5() {
    let mut h = protected_with_epochs_held("eu", &["--discard-timeout", "2s"]);
    // The backup host hangs: nothing it could confirm.
    signal(&h.rx.child, libc::SIGSTOP);
    let answer = h.tx.end_protection();
    assert!(
        matches!(answer, EndAnswer::Unconfirmed { .. }),
        "{answer:?}\n{}",
        h.tx.log()
    );
    assert_eq!(
        wait_child(&mut h.tx.child, "relay send").code(),
        Some(5),
        "{}",
        h.tx.log()
    );
    // The relay is gone; its program still holds (fail closed): new frames are captured
    // and dropped, and nothing of epochs 2-4 reaches the peer.
    let pinned =
        h.t.remus(&["status", &h.t.vif, "-j"])
            .ok("remus-net status")
            .json();
    assert_eq!(
        pinned["pinned"]["mode"],
        remus_common::MODE_HOLD,
        "{pinned}"
    );
    let captured = pinned["pinned"]["stats"]["captured_frames"]
        .as_u64()
        .unwrap();
    send_udp(&h.t.guest, h.peer, epoch_payloads(4));
    h.t.wait_captured_by_dead_holder(captured + 10);
    let v = seen(&h.sn.frames());
    assert_eq!(
        (of_epoch(&v, 2), of_epoch(&v, 3), of_epoch(&v, 4)),
        (0, 0, 0),
        "released without the backup's word: {v:?}"
    );
    signal(&h.rx.child, libc::SIGCONT);
}
