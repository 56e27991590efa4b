//! Fuzzes the replication framing: arbitrary bytes through the plain decoder (the
//! handshake's) and through a sealed `FrameReader` (everything after it) must never
//! panic, and the sealed reader must never hand out a message from bytes it did not
//! seal itself: forging a tag is the fuzzer's job here, and it must fail. A genuine
//! sealed frame placed after the fuzzed bytes is never opened once one of them failed.
//! Run: `cd fuzz && cargo +nightly fuzz run frames`
#![no_main]
use libfuzzer_sys::fuzz_target;
use remus_user::replication::seal::{Keys, Role};
use remus_user::replication::{FrameReader, Message, WireError, decode_frame, kdf};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((_, used))) = decode_frame(rest) {
        rest = &rest[used..];
    }

    let (p2b, b2p) = kdf::traffic_secrets(b"fuzz", &[1; 32], &[2; 32], &[3; 32]);
    let primary = Keys::new(Role::Primary, &p2b, &b2p);
    let backup = Keys::new(Role::Backup, &p2b, &b2p);
    let mut wire = data.to_vec();
    primary
        .sealer
        .encode(&Message::Ack { checkpoint: 1 }, &mut wire)
        .expect("an ACK seals");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let mut r = FrameReader::new(&wire[..], backup.opener);
        match r.next().await {
            // Only the genuine frame opens, and only when the fuzzed bytes were empty.
            Ok(m) => {
                assert!(data.is_empty(), "opened a frame nobody sealed: {m:?}");
                assert_eq!(m, Message::Ack { checkpoint: 1 });
            }
            Err(WireError::Io(_)) => unreachable!("a byte slice does not fail to read"),
            Err(_) => assert!(!data.is_empty()),
        }
    });
});
