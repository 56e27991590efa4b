//! Fuzzes `compress::PageDecoder::decode` on arbitrary encodings (must never panic),
//! and checks that whatever the encoder makes of arbitrary input decodes back exactly.
//! Run: `cd fuzz && cargo +nightly fuzz run decompress`
#![no_main]
use libfuzzer_sys::fuzz_target;
use remus_user::compress::{Codec, PageDecoder, PageEncoder};

fuzz_target!(|data: &[u8]| {
    let mut dec = PageDecoder::new(16);
    let _ = dec.decode(data);

    let mut enc = PageEncoder::new(Codec::Lz4, 16);
    let mut dec = PageDecoder::new(16);
    let e = enc.encode(data).expect("input below the record limit");
    assert_eq!(dec.decode(&e).expect("own encoding decodes"), data);
});
