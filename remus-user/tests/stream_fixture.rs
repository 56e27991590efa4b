//! The parser and the page codec on real streams captured from `xl remus` in the lab
//! (`tests/fixtures/remus-pv-stream.bin.zst` of a PV guest, `remus-pvh-stream.bin.zst` of
//! a PVH guest: an HVM stream without a device model, `remus-hvm-stream.bin.zst` of an
//! HVM guest with Debian 12's QEMU; zstd-compressed; their READMEs say how each was
//! captured).
//!
//! Fed in pipe-sized chunks, as the relay reads it: it must parse without error, with
//! at least two complete checkpoints, each announced in contract order
//! (PostSuspendStart, LibxcCheckpoint, CheckpointComplete); every PAGE_DATA record must
//! round-trip through `compress` byte-identically. Prints the compression ratio of the
//! incremental checkpoints (the figure the relay benchmark targets).
use remus_user::compress::{Codec, PageDecoder, PageEncoder, measure_primed};
use remus_user::stream::{DomainType, Event, Layer, Parser, libxc_type, libxl_type};
use std::io::Read;
use std::path::PathBuf;

/// What one fixture must show besides complete checkpoints in order.
struct Expect {
    file: &'static str,
    domain: DomainType,
    /// libxc records every checkpoint must carry (its CPU state).
    per_checkpoint: &'static [u32],
    /// Exactly the libxl records of every checkpoint's tail (after libxc CHECKPOINT).
    tail: &'static [u32],
    /// libxc records that must never appear.
    never: &'static [u32],
}

#[test]
fn captured_remus_pv_stream_parses_with_complete_checkpoints() {
    check(Expect {
        file: "tests/fixtures/remus-pv-stream.bin.zst",
        domain: DomainType::X86Pv,
        per_checkpoint: &[libxc_type::SHARED_INFO, libxc_type::X86_PV_VCPU_BASIC],
        tail: &[libxl_type::CHECKPOINT_END],
        never: &[libxc_type::HVM_CONTEXT],
    });
}

/// PVH: the libxc side of an HVM guest (HVM_CONTEXT, HVM_PARAMS at every checkpoint),
/// no device model, so no emulator records in libxl's part of a checkpoint.
#[test]
fn captured_remus_pvh_stream_parses_as_hvm_without_emulator_records() {
    check(Expect {
        file: "tests/fixtures/remus-pvh-stream.bin.zst",
        domain: DomainType::X86Hvm,
        per_checkpoint: &[libxc_type::HVM_CONTEXT, libxc_type::HVM_PARAMS],
        tail: &[libxl_type::CHECKPOINT_END],
        never: &[libxc_type::SHARED_INFO, libxc_type::X86_PV_VCPU_BASIC],
    });
}

/// HVM with Debian 12's device model (QEMU upstream): the device model's state,
/// EMULATOR_CONTEXT, at every checkpoint before CHECKPOINT_END (its xenstore subtree was
/// empty, so libxl wrote no EMULATOR_XENSTORE_DATA).
#[test]
fn captured_remus_hvm_stream_carries_the_device_model_at_every_checkpoint() {
    check(Expect {
        file: "tests/fixtures/remus-hvm-stream.bin.zst",
        domain: DomainType::X86Hvm,
        per_checkpoint: &[libxc_type::HVM_CONTEXT, libxc_type::HVM_PARAMS],
        tail: &[libxl_type::EMULATOR_CONTEXT, libxl_type::CHECKPOINT_END],
        never: &[libxc_type::SHARED_INFO, libxc_type::X86_PV_VCPU_BASIC],
    });
}

fn check(x: Expect) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(x.file);
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
    assert_eq!(parser.domain_type(), Some(x.domain));
    for rtype in x.never {
        assert!(
            !all.iter().any(
                |e| matches!(e, Event::Record { layer: Layer::Libxc, rtype: t, .. } if t == rtype)
            ),
            "libxc record {rtype:#x} in {}",
            x.file
        );
    }
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
        // Its CPU state, between its suspend and its CHECKPOINT; then libxl's records.
        let (a, b, c) = (ps.unwrap_or(0), lc.unwrap_or(0), cc.unwrap_or(0));
        let tail: Vec<u32> = all[b..c]
            .iter()
            .filter_map(|e| match *e {
                Event::Record {
                    layer: Layer::Libxl,
                    rtype,
                    ..
                } => Some(rtype),
                _ => None,
            })
            .collect();
        assert_eq!(
            tail, x.tail,
            "libxl records of checkpoint {n} of {}",
            x.file
        );
        for want in x.per_checkpoint {
            assert!(
                all[a..b].iter().any(|e| matches!(e, Event::Record { layer: Layer::Libxc, rtype, .. } if rtype == want)),
                "checkpoint {n} of {} lacks libxc record {want:#x}",
                x.file
            );
        }
    }
    let refs: Vec<&[u8]> = incremental.iter().map(|r| r.as_slice()).collect();
    let m = measure_primed(&mut enc, &mut dec, &refs).expect("measure");
    assert!(m.identical, "incremental PAGE_DATA did not round-trip");
    eprintln!(
        "{}: {complete} checkpoints, incremental page data {} B in {} records: \
         XOR+lz4 {:.1}x, lz4 alone {:.1}x",
        x.file,
        m.raw_bytes,
        m.records,
        m.ratio(),
        m.lz4_only_ratio()
    );
}
