//! Refusals at the backup: a wrong key, a rogue client, an incompatible protocol
//! version (a future one, or the unsealed versions 1 and 2), a second primary while one
//! is connected: each is refused with a clear error and logged, and the running session
//! carries on untouched. A corrupted sealed frame ends its session with the receiver
//! holding exactly the last complete checkpoint. Bad key files are usage errors (exit 2)
//! at both ends.
mod relay_common;

use std::time::Duration;

use relay_common::*;
use remus_user::compress::Codec;
use remus_user::replication::{
    self, ClientConfig, FrameReader, Hello, Key, MIN_VERSION, Message, VERSION, WireError,
};
use remus_user::stream::writer::WriterConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const KEY: &str = "refusals-key-0123456789abcdef";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Reads until something other than a heartbeat arrives.
async fn next_real<R: tokio::io::AsyncRead + Unpin>(
    r: &mut FrameReader<R>,
) -> Result<Message, WireError> {
    loop {
        match r.next().await? {
            Message::Heartbeat { .. } => continue,
            m => return Ok(m),
        }
    }
}

fn rogue_client(addr: &str) -> Message {
    rt().block_on(async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let hello = Hello {
            max_version: VERSION,
            min_version: MIN_VERSION,
            codec: Codec::None,
            cache_pages: 0,
            probe: false,
            nonce: [9; 32],
        };
        replication::send(&mut s, &Message::Hello(hello))
            .await
            .unwrap();
        let _challenge = replication::read_message(&mut s).await.unwrap();
        replication::send(&mut s, &Message::Auth { mac: [0x42; 32] })
            .await
            .unwrap();
        replication::read_message(&mut s).await.unwrap()
    })
}

fn skewed_client(addr: &str, min: u16, max: u16) -> Result<replication::Session, WireError> {
    rt().block_on(async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut cfg = ClientConfig::new(Key::from_bytes(KEY.as_bytes()).unwrap(), Codec::None, 0);
        cfg.max_version = max;
        cfg.min_version = min;
        replication::client_handshake(&mut s, &cfg).await
    })
}

#[test]
fn refused_peers_do_not_disturb_the_running_session() {
    let dir = Scratch::new("refusals");
    let key = dir.key("key", KEY);
    let bad = dir.key("bad", "not-the-same-key-at-all");
    let rx = Receiver::start(&dir, &key, false, &[]);
    let st = Stream::new(&WriterConfig::pv(5));
    let mut a = Sender::start(&dir, "a", &rx.addr, &key, &[]);
    assert_eq!(a.read_banner(), BANNER);
    feed(&mut a, &st, 1, 3);
    wait_status(&rx.status_sock, "ACK(3)", |v| v["last_acked"] == 3);

    // A primary with another key: refused; it says the keys differ (a usage error: the
    // operator's key files do not match).
    let mut w = Sender::start(&dir, "wrongkey", &rx.addr, &bad, &[]);
    assert_eq!(
        wait_child(&mut w.child, "the wrong-key sender").code(),
        Some(2),
        "{}",
        w.log()
    );
    assert!(w.log().contains("the two key files differ"), "{}", w.log());

    // A client that does not hold the key but pretends: refused by the backup.
    match rogue_client(&rx.addr) {
        Message::Abort { reason } => assert!(reason.contains("authentication failed"), "{reason}"),
        other => panic!("rogue client got {other:?}"),
    }

    // A client from the future: refused, naming both version ranges.
    match skewed_client(&rx.addr, VERSION + 5, VERSION + 7) {
        Err(WireError::Refused(reason)) => assert!(reason.contains("version mismatch"), "{reason}"),
        other => panic!("skewed client got {other:?}"),
    }
    // A version 2 primary (frames in the clear): refused, naming both ranges.
    match skewed_client(&rx.addr, 1, 2) {
        Err(WireError::Refused(reason)) => {
            assert!(reason.contains("version mismatch"), "{reason}");
            assert!(reason.contains("1..=2"), "{reason}");
            assert!(
                reason.contains(&format!("{MIN_VERSION}..={VERSION}")),
                "{reason}"
            );
        }
        other => panic!("version 2 client got {other:?}"),
    }

    // A second legitimate primary while one is connected: refused as busy.
    let mut b = Sender::start(&dir, "b", &rx.addr, &key, &[]);
    assert_eq!(
        wait_child(&mut b.child, "the second sender").code(),
        Some(1)
    );
    assert!(b.log().contains("busy"), "{}", b.log());

    let s = wait_status(&rx.status_sock, "the refusals to be counted", |v| {
        v["auth_failures_total"] == 4
    });
    assert_eq!(s["state"], "replicating");
    let log = rx.log();
    assert!(log.contains("does not hold this key"), "{log}");
    assert!(log.contains("version mismatch"), "{log}");

    // The first session carries on to the end, byte-identical.
    feed(&mut a, &st, 4, 5);
    wait_status(&a.status_sock, "ACK(5)", |v| v["last_acked"] == 5);
    a.close_stdin();
    assert_eq!(
        wait_child(&mut a.child, "relay send").code(),
        Some(0),
        "{}",
        a.log()
    );
    wait_status(&rx.status_sock, "the session to end", |v| {
        v["state"] == "waiting for primary"
    });
    let sessions = dir.sessions();
    assert_eq!(sessions.len(), 1);
    assert!(sessions[0] == st.bytes());
}

#[test]
fn corrupted_frame_ends_the_session_at_the_last_complete_checkpoint() {
    let dir = Scratch::new("corrupt");
    let key = dir.key("key", KEY);
    let rx = Receiver::start(
        &dir,
        &key,
        false,
        &[
            "--heartbeat-interval",
            "200ms",
            "--heartbeat-timeout",
            "10s",
        ],
    );
    let st = Stream::new(&WriterConfig::hvm(4));
    let reason = rt().block_on(async {
        let mut s = TcpStream::connect(&rx.addr).await.unwrap();
        let cfg = ClientConfig::new(Key::from_bytes(KEY.as_bytes()).unwrap(), Codec::None, 0);
        let session = replication::client_handshake(&mut s, &cfg).await.unwrap();
        assert_eq!(session.codec, Codec::None);
        let sealer = session.keys.sealer.clone();
        let (r, mut w) = s.into_split();
        let mut r = FrameReader::new(r, session.keys.opener.clone());
        assert_eq!(
            next_real(&mut r).await.unwrap(),
            Message::Banner(BANNER.to_vec())
        );
        for n in 1..=2 {
            sealer
                .send(&mut w, &Message::Data(st.checkpoint(n).to_vec()))
                .await
                .unwrap();
        }
        for n in 1..=2 {
            assert_eq!(
                next_real(&mut r).await.unwrap(),
                Message::Ack { checkpoint: n }
            );
        }
        // Half of checkpoint 3, then a frame with one bit of its tag flipped.
        let cp3 = st.checkpoint(3);
        sealer
            .send(&mut w, &Message::Data(cp3[..cp3.len() / 2].to_vec()))
            .await
            .unwrap();
        let mut frame = Vec::new();
        sealer
            .encode(&Message::Data(cp3[cp3.len() / 2..].to_vec()), &mut frame)
            .unwrap();
        let last = frame.len() - 1;
        frame[last] ^= 0x01;
        w.write_all(&frame).await.unwrap();
        w.flush().await.unwrap();
        match tokio::time::timeout(Duration::from_secs(60), next_real(&mut r)).await {
            Ok(Ok(Message::Abort { reason })) => reason,
            other => panic!("expected ABORT, got {other:?}"),
        }
    });
    assert!(reason.contains("failed authentication"), "{reason}");
    let s = wait_status(&rx.status_sock, "the session to end", |v| {
        v["state"] == "waiting for primary" && v["failovers_total"] == 1
    });
    assert!(
        s["last_event"]
            .as_str()
            .unwrap()
            .contains("after checkpoint 2"),
        "{s}"
    );
    let sessions = dir.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].len() as u64, st.ends[1]);
    assert!(sessions[0] == st.through(2));
    let log = rx.log();
    assert!(
        log.contains("FAILOVER") && log.contains("failed authentication"),
        "{log}"
    );
}

/// Runs `remus relay send|receive` with `key` and returns (exit code, stderr).
fn with_key(role: &str, key: &std::path::Path, dir: &Scratch) -> (Option<i32>, String) {
    let mut cmd = std::process::Command::new(remus_bin());
    cmd.args(["relay", role, "--key-file"]).arg(key);
    if role == "send" {
        // A pipe on stdin (checked first), nobody listening at the backup address.
        cmd.args(["--no-buffer", "--backup", "127.0.0.1:9"])
            .stdin(std::process::Stdio::piped());
    } else {
        cmd.args(["--listen", "127.0.0.1:0"])
            .stdin(std::process::Stdio::null());
    }
    let out = cmd
        .arg("--status-socket")
        .arg(dir.path().join(format!("{role}.sock")))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.stdout.is_empty(),
        "nothing may reach xl's reverse channel"
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_key_files_are_usage_errors_at_both_ends() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Scratch::new("badkeys");
    let loose = dir.key("loose", "0123456789abcdef0123456789abcdef\n");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o640)).unwrap();
    let world = dir.key("world", "0123456789abcdef0123456789abcdef\n");
    std::fs::set_permissions(&world, std::fs::Permissions::from_mode(0o604)).unwrap();
    let empty = dir.key("empty", "");
    let blank = dir.key("blank", " \n\n");
    let missing = dir.path().join("missing");
    for role in ["send", "receive"] {
        for (key, says) in [
            (&loose, "chmod 600"),
            (&world, "chmod 600"),
            (&empty, "empty"),
            (&blank, "empty"),
            (&missing, "cannot read"),
        ] {
            let (code, err) = with_key(role, key, &dir);
            assert_eq!(code, Some(2), "{role} with {}: {err}", key.display());
            assert!(
                err.contains(&key.display().to_string()) && err.contains(says),
                "{role} with {}: {err}",
                key.display()
            );
        }
    }
}
