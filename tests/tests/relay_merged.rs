//! Merged checkpoints (a cut the primary could not prove in time) are no failover points:
//! the backup holds a merged checkpoint, writes it to its receiver only together with the
//! next one, and acknowledges only that one; a primary lost meanwhile leaves the receiver
//! at the checkpoint before. A merge notice that comes after its checkpoint's end is a
//! protocol error. End to end, a sender that cannot prove any cut (its pipe never narrow,
//! the relay stopped while xl writes) tells the backup, which then has no failover point.
mod relay_common;

use relay_common::*;
use remus_user::compress::Codec;
use remus_user::replication::{self, ClientConfig, FrameReader, Key, Message, Sealer};
use remus_user::stream::writer::WriterConfig;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

const KEY: &str = "merged-key-0123456789abcdef";

/// A fake primary, authenticated, past the banner.
struct Primary {
    sealer: Sealer,
    r: FrameReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Primary {
    async fn connect(addr: &str) -> Primary {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let cfg = ClientConfig::new(Key::from_bytes(KEY.as_bytes()).unwrap(), Codec::None, 0);
        let session = replication::client_handshake(&mut s, &cfg).await.unwrap();
        let sealer = session.keys.sealer.clone();
        let (r, w) = s.into_split();
        let mut r = FrameReader::new(r, session.keys.opener.clone());
        assert_eq!(
            next_real(&mut r).await.unwrap(),
            Message::Banner(BANNER.to_vec())
        );
        Primary { sealer, r, w }
    }

    async fn send(&mut self, m: Message) {
        self.sealer.send(&mut self.w, &m).await.unwrap();
    }

    /// The next ACK's checkpoint (anything else fails the test).
    async fn ack(&mut self) -> u64 {
        match tokio::time::timeout(HANG_GUARD, next_real(&mut self.r)).await {
            Ok(Ok(Message::Ack { checkpoint, .. })) => checkpoint,
            other => panic!("expected an ACK, got {other:?}"),
        }
    }
}

fn receiver(dir: &Scratch) -> Receiver {
    let key = dir.key("key", KEY);
    Receiver::start(
        dir,
        &key,
        true,
        &[
            "--heartbeat-interval",
            "200ms",
            "--heartbeat-timeout",
            "10s",
        ],
    )
}

#[test]
fn a_merged_checkpoint_goes_to_the_receiver_with_the_next_and_is_never_acknowledged() {
    let dir = Scratch::new("merged-next");
    let mut rx = receiver(&dir);
    let st = Stream::new(&WriterConfig::pv(4));
    rt().block_on(async {
        let mut p = Primary::connect(&rx.addr).await;
        p.send(Message::Data(st.checkpoint(1).to_vec())).await;
        assert_eq!(p.ack().await, 1);
        // Checkpoint 2 is merged: announced before its end, then sent whole.
        p.send(Message::Merged { checkpoint: 2 }).await;
        p.send(Message::Data(st.checkpoint(2).to_vec())).await;
        p.send(Message::Data(st.checkpoint(3).to_vec())).await;
        // The next ACK is 3's: 2 was written with it, not acknowledged.
        assert_eq!(p.ack().await, 3);
        p.send(Message::Data(st.checkpoint(4).to_vec())).await;
        assert_eq!(p.ack().await, 4);
        p.send(Message::Close {
            checkpoints: 4,
            finished: false,
        })
        .await;
    });
    rx.expect_exit(0);
    let session = dir.only_session();
    assert!(session == st.bytes(), "the receiver's stream differs");
}

#[test]
fn a_primary_lost_while_a_merged_checkpoint_is_held_fails_over_to_the_one_before() {
    let dir = Scratch::new("merged-lost");
    let mut rx = receiver(&dir);
    let st = Stream::new(&WriterConfig::hvm(4));
    rt().block_on(async {
        let mut p = Primary::connect(&rx.addr).await;
        for n in 1..=2 {
            p.send(Message::Data(st.checkpoint(n).to_vec())).await;
            assert_eq!(p.ack().await, n as u64);
        }
        p.send(Message::Merged { checkpoint: 3 }).await;
        p.send(Message::Data(st.checkpoint(3).to_vec())).await;
        let cp4 = st.checkpoint(4);
        p.send(Message::Data(cp4[..cp4.len() / 2].to_vec())).await;
        // Then vanish without a CLOSE (the connection closes with the runtime); the
        // backup reads every frame sent before it sees the end.
    });
    rx.expect_exit(0);
    let session = dir.only_session();
    assert!(
        session == st.through(2),
        "the receiver must end at checkpoint 2 ({} bytes), not at the merged 3: got {}",
        st.ends[1],
        session.len()
    );
    let log = rx.log();
    assert!(
        log.contains("FAILOVER") && log.contains("after checkpoint 2"),
        "{log}"
    );
}

#[test]
fn a_merge_notice_after_its_checkpoints_end_is_refused() {
    let dir = Scratch::new("merged-late");
    let mut rx = receiver(&dir);
    let st = Stream::new(&WriterConfig::pv(3));
    let reason = rt().block_on(async {
        let mut p = Primary::connect(&rx.addr).await;
        for n in 1..=2 {
            p.send(Message::Data(st.checkpoint(n).to_vec())).await;
            assert_eq!(p.ack().await, n as u64);
        }
        p.send(Message::Merged { checkpoint: 2 }).await;
        match tokio::time::timeout(HANG_GUARD, next_real(&mut p.r)).await {
            Ok(Ok(Message::Abort { reason })) => reason,
            other => panic!("expected ABORT, got {other:?}"),
        }
    });
    assert!(reason.contains("merged after its end"), "{reason}");
    assert_eq!(
        wait_child(&mut rx.child, "relay receive --once").code(),
        Some(0)
    );
    let session = dir.only_session();
    assert!(session == st.through(2));
}

/// The real sender, with xl's pipe never narrowed and stopped while the checkpoints are
/// written whole into it: no cut can be proven, every checkpoint is merged, and the
/// backup, told so (in order, although one read of the sender holds all of them),
/// acknowledges none and gives its receiver nothing it could resume from (checkpoint 1
/// stops before its first post-suspend record).
#[test]
fn a_sender_that_proves_no_cut_leaves_the_backup_without_a_failover_point() {
    let dir = Scratch::new("merged-pair");
    let key = dir.key("key", KEY);
    let mut rx = Receiver::start(&dir, &key, true, &[]);
    let pipe = [
        "--xl-pipe-narrow-bytes",
        "1048576",
        "--xl-pipe-bytes",
        "1048576",
    ];
    let mut tx = Sender::start(&dir, "a", &rx.addr, &key, &pipe);
    assert_eq!(tx.read_banner(), BANNER);
    let mut cfg = WriterConfig::pv(3);
    // Every checkpoint fits in one read of the relay and in the pipe.
    cfg.guest_pages = 24;
    cfg.dirty_pages = 8;
    let st = Stream::new(&cfg);
    // All three in one go: one read of the sender, three notices in one chunk.
    signal(&tx.child, libc::SIGSTOP);
    tx.write(st.through(3));
    signal(&tx.child, libc::SIGCONT);
    tx.wait_drained();
    let s = wait_status(&tx.status_sock, "three checkpoints", |v| {
        v["last_checkpoint"] == 3
    });
    assert_eq!(s["epoch_merges_total"], 3, "{s}");
    assert_eq!(s["last_acked"], 0, "{s}");
    tx.finish();
    rx.expect_exit(0);
    let session = dir.only_session();
    assert!(
        session == st.bytes()[..st.first_post_suspend() as usize],
        "the receiver got {} bytes, expected checkpoint 1 up to its tail ({})",
        session.len(),
        st.first_post_suspend()
    );
    let log = rx.log();
    assert!(log.contains("FAILOVER IMPOSSIBLE"), "{log}");
}
