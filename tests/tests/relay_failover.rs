//! Failover at the backup: a silent primary (SIGSTOP) or a broken connection (SIGKILL)
//! makes `remus relay receive` close the receiver's stdin exactly after the last complete
//! checkpoint, log the failover with its number, and wait for the next primary.
//! A lost backup makes `remus relay send` fail open and exit 4.
mod relay_common;

use relay_common::*;
use remus_user::stream::writer::WriterConfig;

/// Streams checkpoints 1..=3 (acknowledged), then half of checkpoint 4, then `kill`s
/// the sender; the receiver must have exactly checkpoints 1..=3.
fn lose_primary(name: &str, kill: i32) {
    let dir = Scratch::new(name);
    let key = dir.key("key", "failover-key-0123456789");
    let hb = TEST_HEARTBEAT;
    let mut rx = Receiver::start(&dir, &key, true, &hb);
    let mut tx = Sender::start(&dir, "a", &rx.addr, &key, &hb);
    assert_eq!(tx.read_banner(), BANNER);
    let st = Stream::new(&WriterConfig::pv(5));
    feed(&mut tx, &st, 1, 3);
    wait_status(&rx.status_sock, "ACK(3)", |v| v["last_acked"] == 3);
    let cp4 = st.checkpoint(4);
    tx.write(&cp4[..cp4.len() / 2]);
    signal(&tx.child, kill);

    // The receiver notices (silence or a broken connection), closes the receiver's
    // stream and, with --once, exits once the receiver has.
    rx.expect_exit(0);
    let session = dir.only_session();
    assert_eq!(
        session.len() as u64,
        st.ends[2],
        "the receiver must end exactly after checkpoint 3"
    );
    assert!(session == st.through(3));
    let log = rx.log();
    assert!(
        log.contains("FAILOVER") && log.contains("after checkpoint 3"),
        "receiver log:\n{log}"
    );
}

#[test]
fn silent_primary_fails_over_after_the_last_complete_checkpoint() {
    lose_primary("sigstop", libc::SIGSTOP);
}

#[test]
fn broken_connection_fails_over_after_the_last_complete_checkpoint() {
    lose_primary("sigkill", libc::SIGKILL);
}

#[test]
fn silent_primary_is_logged_as_silence_and_backup_waits_for_the_next() {
    let dir = Scratch::new("next");
    let key = dir.key("key", "next-primary-key-0123");
    let hb = TEST_HEARTBEAT;
    let rx = Receiver::start(&dir, &key, false, &hb);
    let st = Stream::new(&WriterConfig::pv(3));
    {
        let mut tx = Sender::start(&dir, "first", &rx.addr, &key, &hb);
        assert_eq!(tx.read_banner(), BANNER);
        feed(&mut tx, &st, 1, 2);
        wait_status(&rx.status_sock, "ACK(2)", |v| v["last_acked"] == 2);
        signal(&tx.child, libc::SIGSTOP);
        wait_status(&rx.status_sock, "the failover", |v| {
            v["failovers_total"] == 1
        });
        // Dropping `tx` kills the stopped sender.
    }
    let s = wait_status(&rx.status_sock, "the next primary", |v| {
        v["state"] == "waiting for primary"
    });
    assert_failed_over_after(&s, 2);
    assert!(rx.log().contains("silent"), "receiver log:\n{}", rx.log());

    // The next primary is served from scratch.
    let mut tx = Sender::start(&dir, "second", &rx.addr, &key, &hb);
    assert_eq!(tx.read_banner(), BANNER);
    feed(&mut tx, &st, 1, 3);
    wait_status(&tx.status_sock, "ACK(3)", |v| v["last_acked"] == 3);
    tx.finish();
    wait_status(&rx.status_sock, "the second session to end", |v| {
        v["state"] == "waiting for primary" && v["acks_total"] == 5
    });
    let sessions = dir.sessions();
    assert_eq!(sessions.len(), 2);
    assert!(sessions[0] == st.through(2));
    assert!(sessions[1] == st.bytes());
}

#[test]
fn lost_backup_fails_open_and_exits_4() {
    let dir = Scratch::new("lostbackup");
    let key = dir.key("key", "lost-backup-key-0123");
    let hb = TEST_HEARTBEAT;
    let rx = Receiver::start(&dir, &key, true, &hb);
    let mut tx = Sender::start(&dir, "a", &rx.addr, &key, &hb);
    assert_eq!(tx.read_banner(), BANNER);
    let st = Stream::new(&WriterConfig::pv(3));
    feed(&mut tx, &st, 1, 2);
    wait_status(&tx.status_sock, "ACK(2)", |v| v["last_acked"] == 2);
    // The backup goes silent: the sender must notice without any stream traffic.
    signal(&rx.child, libc::SIGSTOP);
    tx.expect_exit(4);
    let log = tx.log();
    assert!(log.contains("UNPROTECTED"), "sender log:\n{log}");
    assert!(
        log.contains("no heartbeat from the backup"),
        "sender log:\n{log}"
    );
    signal(&rx.child, libc::SIGCONT);
}
