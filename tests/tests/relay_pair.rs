//! A relay pair on loopback, the real `remus` binary at both ends, between a fake xl and
//! a fake receiver: the receiver gets the stream byte-identical, each checkpoint is
//! acknowledged back to the sender, and an orderly close ends both sides with 0.
//! No output buffer here (`--no-buffer`); the buffer's ordering is tested in netns tests.
mod relay_common;

use relay_common::*;
use remus_user::stream::writer::WriterConfig;

fn pair(compress: &str, cfg: WriterConfig) {
    let dir = Scratch::new(&format!("pair-{compress}"));
    let key = dir.key("key", "0123456789abcdef0123456789abcdef\n");
    let mut rx = Receiver::start(&dir, &key, true, &[]);
    let mut tx = Sender::start(&dir, "a", &rx.addr, &key, &["--compress", compress]);
    assert_eq!(
        tx.read_banner(),
        BANNER,
        "xl must get the receiver's banner first"
    );

    let st = Stream::new(&cfg);
    let n = st.ends.len();
    feed(&mut tx, &st, 1, n);
    // Every checkpoint comes back acknowledged (status of the sender).
    let s = wait_status(&tx.status_sock, "the last ACK", |v| {
        v["last_acked"] == n as u64
    });
    assert_eq!(s["state"], "replicating");
    assert_eq!(s["checkpoints_total"], n as u64);
    // Paced like xl (the relay keeps up): every cut proven, every phase timed. Only
    // checkpoint 1 may lose its race, and only when what xl writes of it after the
    // suspend, up to its CHECKPOINT record, fits in two pages of the narrow pipe (HVM:
    // about 4.4 KiB): the relay may read the first page only after xl wrote the rest
    // (docs/relay.md, "The pipe proof"). A merged checkpoint has no ACK of its own.
    let merges = s["epoch_merges_total"].as_u64().unwrap();
    let may_merge = u64::from(st.first_tail() <= 2 * 4096);
    assert!(
        merges <= may_merge,
        "{merges} merges, checkpoint 1's tail {} bytes: {s}\nsender log:\n{}",
        st.first_tail(),
        tx.log()
    );
    let acked = n as u64 - merges;
    for (phase, count) in [
        ("pause", n as u64),
        ("transfer", acked),
        ("backup_write", acked),
        ("ack", acked),
    ] {
        assert_eq!(s[format!("{phase}_recent_us")]["n"], count, "{phase}: {s}");
    }
    assert_eq!(s["stream_bytes_total"], st.bytes().len() as u64);
    if compress == "lz4" {
        let raw = s["page_data_raw_bytes_total"].as_u64().unwrap();
        let wire = s["page_data_wire_bytes_total"].as_u64().unwrap();
        assert!(
            raw > 0 && wire < raw,
            "page data compressed: {raw} raw, {wire} on the wire"
        );
    } else {
        assert_eq!(s["page_data_raw_bytes_total"], 0);
    }
    let r = rx.status();
    assert_eq!(r["last_acked"], n as u64);
    assert_eq!(r["backup_write_recent_us"]["n"], acked, "{r}");
    // `remus relay status -j` reads both ends through their sockets.
    let out = std::process::Command::new(remus_bin())
        .args(["relay", "status", "-j", "--socket"])
        .arg(&tx.status_sock)
        .arg("--socket")
        .arg(&rx.status_sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all[0]["role"], "send");
    assert_eq!(all[1]["role"], "receive");
    assert_eq!(all[1]["state"], "replicating");
    assert_eq!(all[0]["ack_latency_recent_us"]["n"], acked);

    // xl ends the stream: orderly close on both ends.
    tx.finish();
    rx.expect_exit(0);

    let session = dir.only_session();
    assert_eq!(session.len(), st.bytes().len());
    assert!(
        session == st.bytes(),
        "the receiver's stream differs from what xl wrote"
    );
}

#[test]
fn relay_pair_is_byte_identical_with_lz4() {
    pair("lz4", WriterConfig::pv(6));
}

#[test]
fn relay_pair_is_byte_identical_without_compression() {
    pair("none", WriterConfig::hvm(5));
}

/// The real stream `xl remus` wrote in the lab (remus-user/tests/fixtures, from the lab).
#[test]
fn relay_pair_is_byte_identical_on_the_captured_lab_stream() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../remus-user/tests/fixtures/remus-pv-stream.bin.zst");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut d = ruzstd::decoding::StreamingDecoder::new(std::io::BufReader::new(file)).unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut d, &mut bytes).unwrap();
    let st = Stream::from_bytes(bytes);
    assert!(
        st.ends.len() >= 2,
        "the capture holds at least two checkpoints"
    );

    let dir = Scratch::new("captured");
    let key = dir.key("key", "0123456789abcdef0123456789abcdef\n");
    let mut rx = Receiver::start(&dir, &key, true, &[]);
    let mut tx = Sender::start(&dir, "a", &rx.addr, &key, &[]);
    assert_eq!(tx.read_banner(), BANNER);
    let n = st.ends.len();
    feed(&mut tx, &st, 1, n);
    let s = wait_status(&tx.status_sock, "the last ACK", |v| {
        v["last_acked"] == n as u64
    });
    let raw = s["page_data_raw_bytes_total"].as_u64().unwrap();
    let wire = s["page_data_wire_bytes_total"].as_u64().unwrap();
    assert!(
        wire < raw,
        "real page data compresses: {raw} raw, {wire} on the wire"
    );
    tx.finish();
    rx.expect_exit(0);
    let session = dir.only_session();
    assert!(
        session == st.bytes(),
        "the receiver's stream differs from the captured one"
    );
}

#[test]
fn relay_send_refuses_a_stdin_that_is_not_a_pipe() {
    let dir = Scratch::new("notpipe");
    let key = dir.key("key", "k0123456789abcdef");
    let f = dir.path().join("stream");
    std::fs::write(&f, b"x").unwrap();
    let out = std::process::Command::new(remus_bin())
        .args([
            "relay",
            "send",
            "--no-buffer",
            "--backup",
            "127.0.0.1:9",
            "--key-file",
        ])
        .arg(&key)
        .arg("--status-socket")
        .arg(dir.path().join("s.sock"))
        .stdin(std::fs::File::open(&f).unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a pipe"), "{err}");
    assert!(
        out.stdout.is_empty(),
        "nothing may reach xl's reverse channel"
    );
}

#[test]
fn relay_send_help_teaches_the_usage() {
    let out = std::process::Command::new(remus_bin())
        .args(["relay", "send", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("remus relay receive --listen 0.0.0.0:7788 --key-file /etc/remus/key"),
        "{help}"
    );
    assert!(help.contains("xl remus -F -n -s '' mydomain"), "{help}");
}
