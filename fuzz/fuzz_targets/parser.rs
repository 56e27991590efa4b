//! Fuzzes `stream::Parser`: arbitrary bytes, fed whole and in chunks, must never panic
//! and must give the same result and events either way.
//! Run: `cd fuzz && cargo +nightly fuzz run parser`
#![no_main]
use libfuzzer_sys::fuzz_target;
use remus_user::stream::{Parser, writer};
use std::sync::OnceLock;

/// A valid one-checkpoint stream (PV or HVM), written once.
fn prefix(hvm: bool) -> &'static [u8] {
    static PV: OnceLock<Vec<u8>> = OnceLock::new();
    static HVM: OnceLock<Vec<u8>> = OnceLock::new();
    let cell = if hvm { &HVM } else { &PV };
    cell.get_or_init(|| {
        let base = if hvm {
            writer::WriterConfig::hvm(1)
        } else {
            writer::WriterConfig::pv(1)
        };
        writer::write(&writer::WriterConfig {
            guest_pages: 8,
            dirty_pages: 2,
            ..base
        })
        .bytes
    })
}

fuzz_target!(|data: &[u8]| {
    // First byte picks a chunk size and whether to start behind a valid stream prefix,
    // so the fuzzer reaches the record grammar without rediscovering the headers.
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let mut input = Vec::new();
    if ctl & 0x80 != 0 {
        input.extend_from_slice(prefix(ctl & 0x40 != 0));
    }
    input.extend_from_slice(rest);
    let chunk = usize::from(ctl & 0x3f) + 1;

    let mut whole = Parser::new();
    let mut ev_whole = Vec::new();
    let r_whole = whole.feed(&input, &mut ev_whole);
    let _ = whole.finish();

    let mut p = Parser::new();
    let mut ev = Vec::new();
    let mut r = Ok(());
    for c in input.chunks(chunk) {
        r = p.feed(c, &mut ev);
        if r.is_err() {
            break;
        }
    }
    assert_eq!(r, r_whole);
    assert_eq!(ev, ev_whole);
    assert_eq!(p.position(), whole.position());
});
