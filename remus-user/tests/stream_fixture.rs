//! The parser and the page codec on a real stream captured from `xl remus` in the lab
//! (`tests/fixtures/remus-pv-stream.bin.zst`, zstd-compressed, committed by the lab).
//!
//! Fed in pipe-sized chunks, as the relay reads it: it must parse without error, with
//! at least two complete checkpoints, each announced in contract order
//! (PostSuspendStart, LibxcCheckpoint, CheckpointComplete); every PAGE_DATA record must
//! round-trip through `compress` byte-identically. Prints the compression ratio of the
//! incremental checkpoints (the figure the relay benchmark targets).
use remus_user::compress::{Codec, PageDecoder, PageEncoder, measure_primed};
use remus_user::stream::{DomainType, Event, Layer, Parser, libxc_type};
use std::io::Read;
use std::path::PathBuf;

const FIXTURE: &str = "tests/fixtures/remus-pv-stream.bin.zst";

#[test]
fn captured_remus_pv_stream_parses_with_complete_checkpoints() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(FIXTURE);
    let file = std::fs::File::open(&path).unwrap_or_else(|e| {
        panic!(
            "fixture missing: {} ({e}); the lab captures it from a real `xl remus` run",
            path.display()
        )
    });
    let mut zst = ruzstd::decoding::StreamingDecoder::new(std::io::BufReader::new(file))
        .unwrap_or_else(|e| panic!("{} is not a zstd stream: {e}", path.display()));

    let mut parser = Parser::new();
    let mut events = Vec::new();
    let mut all = Vec::new();
    // Bytes since `base`, kept until the record that holds them is complete.
    let mut pending: Vec<u8> = Vec::new();
    let mut base = 0u64;
    let mut enc = PageEncoder::new(Codec::Lz4, 1 << 20);
    let mut dec = PageDecoder::new(1 << 20);
    let mut incremental: Vec<Vec<u8>> = Vec::new();
    let mut checkpoint = 1u64;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = zst.read(&mut buf).expect("zstd decoding of the fixture");
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        parser
            .feed(&buf[..n], &mut events)
            .unwrap_or_else(|e| panic!("captured stream rejected: {e}"));
        for e in events.drain(..) {
            match e {
                Event::Record {
                    layer: Layer::Libxc,
                    rtype: libxc_type::PAGE_DATA,
                    start,
                    end,
                    ..
                } => {
                    let rec = &pending[(start - base) as usize..(end - base) as usize];
                    if checkpoint == 1 {
                        let x = enc.encode(rec).expect("encode");
                        assert_eq!(dec.decode(&x).expect("decode"), rec, "PAGE_DATA at {start}");
                    } else {
                        incremental.push(rec.to_vec());
                    }
                }
                Event::CheckpointComplete { checkpoint: c, .. } => checkpoint = c + 1,
                _ => {}
            }
            if let Event::Record { end, .. } = e {
                pending.drain(..(end - base) as usize);
                base = end;
            }
            all.push(e);
        }
    }
    if let Err(e) = parser.finish() {
        // A capture may stop mid-record when the primary was killed; say so.
        eprintln!("note: capture ends inside a record: {e}");
    }
    assert_eq!(parser.domain_type(), Some(DomainType::X86Pv));
    assert!(matches!(all.first(), Some(Event::XlHeader { .. })));
    let complete = parser.checkpoints_complete();
    assert!(
        complete >= 2,
        "only {complete} complete checkpoints in the capture"
    );
    for n in 1..=complete {
        let idx = |f: &dyn Fn(&Event) -> bool| all.iter().position(f);
        let ps =
            idx(&|e| matches!(e, Event::PostSuspendStart { checkpoint, .. } if *checkpoint == n));
        let lc =
            idx(&|e| matches!(e, Event::LibxcCheckpoint { checkpoint, .. } if *checkpoint == n));
        let cc =
            idx(&|e| matches!(e, Event::CheckpointComplete { checkpoint, .. } if *checkpoint == n));
        match (ps, lc, cc) {
            (Some(a), Some(b), Some(c)) => assert!(a < b && b < c, "checkpoint {n} out of order"),
            other => panic!("checkpoint {n} lacks events: {other:?}"),
        }
    }
    let refs: Vec<&[u8]> = incremental.iter().map(|r| r.as_slice()).collect();
    let m = measure_primed(&mut enc, &mut dec, &refs).expect("measure");
    assert!(m.identical, "incremental PAGE_DATA did not round-trip");
    eprintln!(
        "captured stream: {complete} checkpoints, incremental page data {} B in {} records: \
         XOR+lz4 {:.1}x, lz4 alone {:.1}x",
        m.raw_bytes,
        m.records,
        m.ratio(),
        m.lz4_only_ratio()
    );
}
