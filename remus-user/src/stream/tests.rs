//! Parser tests on streams from `writer`, chunked in many ways, and every bad input.
//! Never touches: files, sockets or the real fixture (remus-user/tests/stream_fixture.rs does).
use super::writer::{self, GuestKind, WriterConfig, Written};
use super::*;
use proptest::prelude::*;

fn parse_chunks(bytes: &[u8], sizes: &mut dyn FnMut() -> usize) -> (Parser, Vec<Event>) {
    let mut p = Parser::new();
    let mut ev = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let n = sizes().max(1).min(bytes.len() - i);
        p.feed(&bytes[i..i + n], &mut ev)
            .unwrap_or_else(|e| panic!("unexpected error {e} after {i} bytes"));
        i += n;
    }
    (p, ev)
}

fn parse_all(bytes: &[u8]) -> Result<(Parser, Vec<Event>), StreamError> {
    let mut p = Parser::new();
    let mut ev = Vec::new();
    p.feed(bytes, &mut ev)?;
    p.finish()?;
    Ok((p, ev))
}

fn err_of(bytes: &[u8]) -> StreamError {
    match parse_all(bytes) {
        Ok((_, ev)) => panic!("expected an error, parsed:\n{}", render_events(&ev)),
        Err(e) => e,
    }
}

/// Small streams shared by the property tests (writing one per case would dominate).
fn cached(kind: GuestKind) -> &'static Written {
    static PV: std::sync::OnceLock<Written> = std::sync::OnceLock::new();
    static HVM: std::sync::OnceLock<Written> = std::sync::OnceLock::new();
    static PVH: std::sync::OnceLock<Written> = std::sync::OnceLock::new();
    let (cell, k) = match kind {
        GuestKind::Pv => (&PV, GuestKind::Pv),
        GuestKind::Hvm => (&HVM, GuestKind::Hvm),
        GuestKind::Pvh => (&PVH, GuestKind::Pvh),
    };
    cell.get_or_init(|| {
        writer::write(&WriterConfig {
            kind: k,
            guest_pages: 40,
            dirty_pages: 8,
            ..WriterConfig::pv(2)
        })
    })
}

fn assert_events(w: &Written, ev: &[Event]) {
    assert_eq!(
        ev,
        &w.events[..],
        "parser events differ from the writer's expectations"
    );
}

/// Start offset of the `nth` record of `layer`/`rtype`.
fn record_start(w: &Written, layer_: Layer, rtype_: u32, nth: usize) -> usize {
    w.events
        .iter()
        .filter_map(|e| match *e {
            Event::Record {
                layer,
                rtype,
                start,
                ..
            } if layer == layer_ && rtype == rtype_ => Some(start as usize),
            _ => None,
        })
        .nth(nth)
        .unwrap_or_else(|| panic!("no record {layer_:?} {rtype_:#x} #{nth}"))
}

fn xl_end(w: &Written) -> usize {
    match w.events[0] {
        Event::XlHeader { end, .. } => end as usize,
        e => panic!("first event is {e:?}"),
    }
}

/// Offset of the libxc image header (right after the LIBXC_CONTEXT record).
fn ihdr(w: &Written) -> usize {
    record_start(w, Layer::Libxl, libxl_type::LIBXC_CONTEXT, 0) + 8
}

fn small(kind: GuestKind, checkpoints: u64) -> Written {
    writer::write(&WriterConfig {
        kind,
        guest_pages: 300,
        dirty_pages: 40,
        ..WriterConfig::pv(checkpoints)
    })
}

#[test]
fn pv_stream_events_match_the_writer() {
    let w = small(GuestKind::Pv, 4);
    let (p, ev) = parse_all(&w.bytes).unwrap();
    assert_events(&w, &ev);
    assert_eq!(p.checkpoints_complete(), 4);
    assert_eq!(p.position(), w.bytes.len() as u64);
    assert_eq!(p.domain_type(), Some(DomainType::X86Pv));
    // The contract's landmarks, spelled out once.
    let ps: Vec<_> = ev
        .iter()
        .filter_map(|e| match *e {
            Event::PostSuspendStart { checkpoint, pos } => Some((checkpoint, pos)),
            _ => None,
        })
        .collect();
    assert_eq!(ps.len(), 4);
    assert_eq!(
        ps[0].1 as usize,
        record_start(&w, Layer::Libxc, libxc_type::X86_TSC_INFO, 0)
    );
    let ends: Vec<_> = ev
        .iter()
        .filter_map(|e| match *e {
            Event::CheckpointComplete { checkpoint, end } => Some((checkpoint, end)),
            _ => None,
        })
        .collect();
    assert_eq!(
        ends.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    for n in 1..4 {
        assert_eq!(ps[n].0, n as u64 + 1);
        assert_eq!(
            ps[n].1,
            ends[n - 1].1,
            "checkpoint {} starts after {}",
            n + 1,
            n
        );
    }
    assert_eq!(ends[3].1, w.bytes.len() as u64);
    // Record bodies: the TSC_INFO body is 24 bytes right after its header.
    let tsc = ev
        .iter()
        .find(|e| {
            matches!(
                e,
                Event::Record {
                    rtype: libxc_type::X86_TSC_INFO,
                    layer: Layer::Libxc,
                    ..
                }
            )
        })
        .and_then(Event::record_body)
        .unwrap();
    assert_eq!(tsc, ps[0].1 + 8..ps[0].1 + 32);
    assert_eq!(ev[0].record_body(), None);
}

#[test]
fn hvm_stream_events_match_the_writer() {
    let w = small(GuestKind::Hvm, 3);
    let (p, ev) = parse_all(&w.bytes).unwrap();
    assert_events(&w, &ev);
    assert_eq!(p.checkpoints_complete(), 3);
    assert_eq!(p.domain_type(), Some(DomainType::X86Hvm));
    let emu = ev
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Record {
                    layer: Layer::Libxl,
                    rtype: libxl_type::EMULATOR_CONTEXT,
                    ..
                }
            )
        })
        .count();
    assert_eq!(emu, 3);
}

/// The libxl records of checkpoint `n`'s tail (between libxc CHECKPOINT and
/// CHECKPOINT_END), by type.
fn tail_records(ev: &[Event], n: u64) -> Vec<u32> {
    let from = ev
        .iter()
        .position(|e| matches!(e, Event::LibxcCheckpoint { checkpoint, .. } if *checkpoint == n))
        .expect("the checkpoint's CHECKPOINT");
    ev[from..]
        .iter()
        .take_while(|e| !matches!(e, Event::CheckpointComplete { .. }))
        .filter_map(|e| match *e {
            Event::Record {
                layer: Layer::Libxl,
                rtype,
                ..
            } => Some(rtype),
            _ => None,
        })
        .collect()
}

#[test]
fn hvm_checkpoints_each_carry_the_device_models_records_before_checkpoint_end() {
    let w = small(GuestKind::Hvm, 3);
    let (_, ev) = parse_all(&w.bytes).unwrap();
    for n in 1..=3 {
        assert_eq!(
            tail_records(&ev, n),
            [
                libxl_type::EMULATOR_XENSTORE_DATA,
                libxl_type::EMULATOR_CONTEXT,
                libxl_type::CHECKPOINT_END
            ],
            "checkpoint {n}"
        );
    }
    // libxl leaves the xenstore record out when QEMU's subtree is empty.
    let w = writer::write(&WriterConfig {
        emulator_xenstore: false,
        guest_pages: 300,
        dirty_pages: 40,
        ..WriterConfig::hvm(2)
    });
    let (p, ev) = parse_all(&w.bytes).unwrap();
    assert_events(&w, &ev);
    assert_eq!(p.checkpoints_complete(), 2);
    for n in 1..=2 {
        assert_eq!(
            tail_records(&ev, n),
            [libxl_type::EMULATOR_CONTEXT, libxl_type::CHECKPOINT_END]
        );
    }
}

#[test]
fn pvh_stream_is_an_hvm_stream_without_a_device_model() {
    let w = small(GuestKind::Pvh, 3);
    let (p, ev) = parse_all(&w.bytes).unwrap();
    assert_events(&w, &ev);
    assert_eq!(p.checkpoints_complete(), 3);
    assert_eq!(p.domain_type(), Some(DomainType::X86Hvm));
    for n in 1..=3 {
        assert_eq!(tail_records(&ev, n), [libxl_type::CHECKPOINT_END]);
    }
    // Every checkpoint's CPU state: HVM_CONTEXT and HVM_PARAMS, no PV records.
    let count = |t: u32| {
        ev.iter()
            .filter(
                |e| matches!(e, Event::Record { layer: Layer::Libxc, rtype, .. } if *rtype == t),
            )
            .count()
    };
    assert_eq!(count(libxc_type::HVM_CONTEXT), 3);
    assert_eq!(count(libxc_type::HVM_PARAMS), 3);
    assert_eq!(count(libxc_type::SHARED_INFO), 0);
    // The first post-suspend byte of checkpoint 1 is its first end-of-checkpoint record.
    let tsc = record_start(&w, Layer::Libxc, libxc_type::X86_TSC_INFO, 0) as u64;
    assert!(ev.contains(&Event::PostSuspendStart {
        checkpoint: 1,
        pos: tsc
    }));
}

#[test]
fn plain_stream_ends_with_end_and_optional_records_pass() {
    for kind in [GuestKind::Pv, GuestKind::Hvm, GuestKind::Pvh] {
        let w = writer::write(&WriterConfig {
            kind,
            guest_pages: 100,
            dirty_pages: 10,
            plain: true,
            optional_records: true,
            ..WriterConfig::pv(1)
        });
        let (p, ev) = parse_all(&w.bytes).unwrap();
        assert_events(&w, &ev);
        assert!(p.is_finished());
        assert_eq!(p.checkpoints_complete(), 0);
        assert!(matches!(ev.last(), Some(Event::End { end }) if *end == w.bytes.len() as u64));
        // Nothing may follow END.
        let mut more = w.bytes.clone();
        more.push(0);
        assert_eq!(
            err_of(&more),
            StreamError::AfterEnd {
                pos: w.bytes.len() as u64
            }
        );
    }
    let w = writer::write(&WriterConfig {
        optional_records: true,
        ..WriterConfig::hvm(2)
    });
    let (_, ev) = parse_all(&w.bytes).unwrap();
    assert_events(&w, &ev);
}

#[test]
fn every_chunking_gives_the_same_events() {
    for w in [
        small(GuestKind::Pv, 3),
        small(GuestKind::Hvm, 3),
        small(GuestKind::Pvh, 3),
    ] {
        for size in [1usize, 2, 3, 5, 7, 8, 9, 13, 64, 4095, 4096, 4097, 65536] {
            let (p, ev) = parse_chunks(&w.bytes, &mut || size);
            assert_events(&w, &ev);
            p.finish().unwrap();
        }
        let mut rng = writer::Rng::new(99);
        for _ in 0..5 {
            let (_, ev) = parse_chunks(&w.bytes, &mut || 1 + rng.below(10_000));
            assert_events(&w, &ev);
        }
    }
}

#[test]
fn events_are_emitted_by_the_feed_that_delivers_their_byte() {
    let w = small(GuestKind::Pv, 3);
    let mut p = Parser::new();
    let mut ev = Vec::new();
    for (i, b) in w.bytes.iter().enumerate() {
        let before = ev.len();
        p.feed(std::slice::from_ref(b), &mut ev).unwrap();
        let delivered = i as u64; // the byte this call delivered
        for e in &ev[before..] {
            match *e {
                Event::PostSuspendStart { checkpoint: 1, pos } => {
                    // Type field known: the 4th byte of that record.
                    assert_eq!(delivered, pos + 3)
                }
                Event::PostSuspendStart { pos, .. } => assert_eq!(delivered, pos),
                Event::LibxcCheckpoint { end, .. }
                | Event::CheckpointComplete { end, .. }
                | Event::Record { end, .. }
                | Event::XlHeader { end, .. } => assert_eq!(delivered + 1, end),
                Event::End { end } => assert_eq!(delivered + 1, end),
            }
        }
    }
    assert_events(&w, &ev);
}

#[test]
fn stream_cut_after_a_checkpoint_has_no_next_post_suspend() {
    let w = small(GuestKind::Pv, 2);
    let (_, ev) = parse_all(&w.bytes).unwrap();
    assert!(
        !ev.iter()
            .any(|e| matches!(e, Event::PostSuspendStart { checkpoint: 3, .. }))
    );
}

#[test]
fn finish_names_where_the_input_stops() {
    let w = small(GuestKind::Hvm, 2);
    assert_eq!(err_of(&w.bytes[..0]), StreamError::Empty { pos: 0 });
    let part = |cut: usize, part, start: usize, need| StreamError::TruncatedPart {
        pos: cut as u64,
        part,
        start: start as u64,
        have: cut - start,
        need,
    };
    let pd = record_start(&w, Layer::Libxc, libxc_type::PAGE_DATA, 0);
    let cases: Vec<(usize, StreamError)> = vec![
        (10, part(10, Part::XlHeader, 0, 48)),
        (49, part(49, Part::XlConfigLen, 48, 4)),
        (
            xl_end(&w) + 3,
            part(xl_end(&w) + 3, Part::LibxlHeader, xl_end(&w), 16),
        ),
        (
            ihdr(&w) + 5,
            part(ihdr(&w) + 5, Part::LibxcImageHeader, ihdr(&w), 24),
        ),
        (
            ihdr(&w) + 30,
            part(ihdr(&w) + 30, Part::LibxcDomainHeader, ihdr(&w) + 24, 16),
        ),
        (pd + 3, part(pd + 3, Part::RecordHeader, pd, 8)),
    ];
    for (cut, want) in cases {
        assert_eq!(err_of(&w.bytes[..cut]), want, "cut at {cut}");
    }
    let opt = u32::from_le_bytes(w.bytes[44..48].try_into().unwrap());
    assert_eq!(
        err_of(&w.bytes[..60]),
        StreamError::TruncatedConfig {
            pos: 60,
            left: u64::from(opt) - 4 - 8
        }
    );
    for (layer, rtype) in [
        (Layer::Libxc, libxc_type::PAGE_DATA),
        (Layer::Libxl, libxl_type::EMULATOR_CONTEXT),
    ] {
        let start = record_start(&w, layer, rtype, 0);
        let len = u32::from_le_bytes(w.bytes[start + 4..start + 8].try_into().unwrap()) as u64;
        let cut = start + 20;
        assert_eq!(
            err_of(&w.bytes[..cut]),
            StreamError::TruncatedRecord {
                pos: cut as u64,
                record: RecordId { layer, rtype },
                start: start as u64,
                body_left: len - 12,
                pad_left: (8 - (len % 8) as u8) % 8,
            }
        );
    }
    // A cut in the padding is inside the record too (the emulator's xenstore record has
    // an odd length; HVM_CONTEXT, as captured, is a multiple of 8).
    let hc = record_start(&w, Layer::Libxl, libxl_type::EMULATOR_XENSTORE_DATA, 0);
    let len = u32::from_le_bytes(w.bytes[hc + 4..hc + 8].try_into().unwrap()) as usize;
    assert_ne!(
        len % 8,
        0,
        "the writer's EMULATOR_XENSTORE_DATA should need padding"
    );
    assert!(matches!(
        err_of(&w.bytes[..hc + 8 + len + 1]),
        StreamError::TruncatedRecord { body_left: 0, pad_left, .. } if pad_left as usize == (8 - len % 8) - 1
    ));
    // At a record boundary the input is fine.
    let b = record_start(&w, Layer::Libxc, libxc_type::PAGE_DATA, 1);
    let (p, _) = parse_all(&w.bytes[..b]).unwrap();
    assert_eq!(p.checkpoints_complete(), 0);
}

fn patched(w: &Written, at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut v = w.bytes.clone();
    v[at..at + bytes.len()].copy_from_slice(bytes);
    v
}

fn expect(bytes: &[u8], want: StreamError) {
    assert_eq!(err_of(bytes), want);
    // The parser is dead afterwards and says so again.
    let mut p = Parser::new();
    let mut ev = Vec::new();
    let first = p.feed(bytes, &mut ev).and_then(|_| p.finish());
    assert!(first.is_err());
    assert_eq!(p.feed(&[0], &mut ev), first);
    assert_eq!(p.error(), first.as_ref().err());
}

fn field(pos: usize, field: Field, found: u64) -> StreamError {
    StreamError::BadField {
        pos: pos as u64,
        field,
        found,
    }
}

fn misplaced(pos: usize, layer: Layer, rtype: u32, rule: Rule) -> StreamError {
    StreamError::Misplaced {
        pos: pos as u64,
        record: RecordId { layer, rtype },
        rule,
    }
}

#[test]
fn bad_xl_header() {
    let w = small(GuestKind::Pv, 1);
    expect(
        &patched(&w, 4, b"X"),
        field(4, Field::XlMagic, u64::from(b'X')),
    );
    expect(
        &patched(&w, 32, &0x0403_0201u32.to_le_bytes()),
        field(32, Field::XlByteOrder, 0x0403_0201),
    );
    expect(
        &patched(&w, 36, &(XL_FLAG_STREAMV2 | 4).to_le_bytes()),
        field(36, Field::XlMandatoryFlags, 4),
    );
    expect(
        &patched(&w, 36, &XL_FLAG_JSON.to_le_bytes()),
        field(36, Field::XlLegacyV1, u64::from(XL_FLAG_JSON)),
    );
    expect(
        &patched(&w, 44, &2u32.to_le_bytes()),
        field(44, Field::XlOptionalDataShort, 2),
    );
    expect(
        &patched(&w, 44, &(REC_LENGTH_MAX + 1).to_le_bytes()),
        field(44, Field::XlOptionalDataLen, u64::from(REC_LENGTH_MAX + 1)),
    );
    let opt = u32::from_le_bytes(w.bytes[44..48].try_into().unwrap());
    expect(
        &patched(&w, 48, &u32::MAX.to_le_bytes()),
        StreamError::ConfigTooLong {
            pos: 48,
            config_len: u32::MAX,
            left: opt - 4,
        },
    );
    // Optional data beyond the config (a newer xl's) is skipped.
    let l = xl_end(&w);
    let opt = u32::from_le_bytes(w.bytes[44..48].try_into().unwrap());
    let mut v = w.bytes[..l].to_vec();
    v[44..48].copy_from_slice(&(opt + 5).to_le_bytes());
    v.extend_from_slice(b"extra");
    v.extend_from_slice(&w.bytes[l..]);
    let (p, ev) = parse_all(&v).unwrap();
    assert_eq!(
        ev[0],
        Event::XlHeader {
            end: l as u64 + 5,
            config_len: opt - 4
        }
    );
    assert_eq!(p.checkpoints_complete(), 1);
    // No optional data at all: straight to the libxl header.
    let mut v = w.bytes[..44].to_vec();
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&w.bytes[xl_end(&w)..]);
    let (_, ev) = parse_all(&v).unwrap();
    assert_eq!(
        ev[0],
        Event::XlHeader {
            end: 48,
            config_len: 0
        }
    );
}

#[test]
fn bad_libxl_and_libxc_headers() {
    let w = small(GuestKind::Pv, 1);
    let l = xl_end(&w);
    expect(
        &patched(&w, l, b"LibxlFm_"),
        field(l, Field::LibxlIdent, u64::from_be_bytes(*b"LibxlFm_")),
    );
    expect(
        &patched(&w, l + 8, &3u32.to_be_bytes()),
        field(l + 8, Field::LibxlVersion, 3),
    );
    expect(
        &patched(&w, l + 12, &1u32.to_be_bytes()),
        field(l + 12, Field::LibxlBigEndian, 1),
    );
    let i = ihdr(&w);
    expect(
        &patched(&w, i + 2, &[0]),
        field(i, Field::LibxcMarker, 0xffff_00ff_ffff_ffff),
    );
    expect(
        &patched(&w, i + 8, b"XENG"),
        field(
            i + 8,
            Field::LibxcId,
            u64::from(u32::from_be_bytes(*b"XENG")),
        ),
    );
    expect(
        &patched(&w, i + 12, &4u32.to_be_bytes()),
        field(i + 12, Field::LibxcVersion, 4),
    );
    expect(
        &patched(&w, i + 16, &1u16.to_be_bytes()),
        field(i + 16, Field::LibxcBigEndian, 1),
    );
    expect(
        &patched(&w, i + 24, &3u32.to_le_bytes()),
        field(i + 24, Field::DomainType, 3),
    );
    expect(
        &patched(&w, i + 28, &16u16.to_le_bytes()),
        field(i + 28, Field::PageShift, 16),
    );
    // Version 2 images are still accepted, as Xen does.
    parse_all(&patched(&w, i + 12, &2u32.to_be_bytes())).unwrap();
}

#[test]
fn bad_records() {
    let pv = small(GuestKind::Pv, 2);
    let hvm = small(GuestKind::Hvm, 2);
    let (xc, xl) = (Layer::Libxc, Layer::Libxl);
    let pd = record_start(&pv, xc, libxc_type::PAGE_DATA, 0);
    expect(
        &patched(&pv, pd + 4, &(REC_LENGTH_MAX + 1).to_le_bytes()),
        StreamError::RecordTooLong {
            pos: pd as u64 + 4,
            record: RecordId {
                layer: xc,
                rtype: libxc_type::PAGE_DATA,
            },
            len: REC_LENGTH_MAX + 1,
        },
    );
    for (rtype, rule) in [
        (0x13, Rule::UnknownLibxc),
        (libxc_type::TOOLSTACK, Rule::Toolstack),
        (libxc_type::CHECKPOINT_DIRTY_PFN_LIST, Rule::DirtyPfnList),
        (libxc_type::HVM_CONTEXT, Rule::HvmInPv),
    ] {
        expect(
            &patched(&pv, pd, &rtype.to_le_bytes()),
            misplaced(pd, xc, rtype, rule),
        );
    }
    let hpd = record_start(&hvm, xc, libxc_type::PAGE_DATA, 0);
    expect(
        &patched(&hvm, hpd, &libxc_type::SHARED_INFO.to_le_bytes()),
        misplaced(hpd, xc, libxc_type::SHARED_INFO, Rule::PvInHvm),
    );
    // Libxl layer: the type numbers mean something else there.
    let lc = record_start(&pv, xl, libxl_type::LIBXC_CONTEXT, 0);
    expect(
        &patched(&pv, lc, &libxl_type::CHECKPOINT_END.to_le_bytes()),
        misplaced(lc, xl, libxl_type::CHECKPOINT_END, Rule::BeforeLibxcContext),
    );
    expect(
        &patched(&pv, lc + 4, &8u32.to_le_bytes()),
        StreamError::MarkerWithBody {
            pos: lc as u64 + 4,
            record: RecordId {
                layer: xl,
                rtype: libxl_type::LIBXC_CONTEXT,
            },
            len: 8,
        },
    );
    let ce = record_start(&pv, xl, libxl_type::CHECKPOINT_END, 0);
    for (rtype, rule) in [
        (libxl_type::END, Rule::EndInsideCheckpoint),
        (libxl_type::LIBXC_CONTEXT, Rule::LibxcContextTwice),
        (libxl_type::CHECKPOINT_STATE, Rule::ColoOnly),
        (9, Rule::UnknownLibxl),
        (libxl_type::EMULATOR_CONTEXT, Rule::EmulatorInPv),
    ] {
        expect(
            &patched(&pv, ce, &rtype.to_le_bytes()),
            misplaced(ce, xl, rtype, rule),
        );
    }
    let ec = record_start(&hvm, xl, libxl_type::EMULATOR_XENSTORE_DATA, 0);
    // A 4-byte body is shorter than the emulator header; the rest fails later anyway.
    expect(
        &patched(&hvm, ec + 4, &4u32.to_le_bytes()),
        StreamError::EmulatorTooShort {
            pos: ec as u64 + 4,
            record: RecordId {
                layer: xl,
                rtype: libxl_type::EMULATOR_XENSTORE_DATA,
            },
            len: 4,
        },
    );
    let ck = record_start(&pv, xc, libxc_type::CHECKPOINT, 0);
    expect(
        &patched(&pv, ck + 4, &16u32.to_le_bytes()),
        StreamError::MarkerWithBody {
            pos: ck as u64 + 4,
            record: RecordId {
                layer: xc,
                rtype: libxc_type::CHECKPOINT,
            },
            len: 16,
        },
    );
    // Non-zero padding (EMULATOR_XENSTORE_DATA has an odd length in the writer).
    let hc = record_start(&hvm, xl, libxl_type::EMULATOR_XENSTORE_DATA, 1);
    let len = u32::from_le_bytes(hvm.bytes[hc + 4..hc + 8].try_into().unwrap()) as usize;
    let padpos = hc + 8 + len;
    assert_ne!(len % 8, 0);
    let padding = |pos: usize, byte, start: usize| StreamError::Padding {
        pos: pos as u64,
        byte,
        record_start: start as u64,
    };
    expect(&patched(&hvm, padpos, &[0xaa]), padding(padpos, 0xaa, hc));
    // The last padding byte of the emulator context too.
    let ec = record_start(&hvm, xl, libxl_type::EMULATOR_CONTEXT, 0);
    let len = u32::from_le_bytes(hvm.bytes[ec + 4..ec + 8].try_into().unwrap()) as usize;
    assert_ne!(len % 8, 0);
    let padpos = ec + 8 + len.next_multiple_of(8) - 1;
    expect(&patched(&hvm, padpos, &[1]), padding(padpos, 1, ec));
    // Optional types are fine anywhere a record may start.
    let v = patched(
        &pv,
        pd,
        &(REC_TYPE_OPTIONAL | libxc_type::PAGE_DATA).to_le_bytes(),
    );
    let (p, _) = parse_all(&v).unwrap();
    assert_eq!(p.checkpoints_complete(), 2);
}

#[test]
fn a_desynchronised_layer_is_caught() {
    // Drop the libxc CHECKPOINT record: the libxl records that follow are then read in
    // the libxc layer, where their type numbers mean something else.
    let w = small(GuestKind::Hvm, 2);
    let ck = record_start(&w, Layer::Libxc, libxc_type::CHECKPOINT, 0);
    let mut v = w.bytes[..ck].to_vec();
    v.extend_from_slice(&w.bytes[ck + 8..]);
    // HVM: the next record is libxl EMULATOR_XENSTORE_DATA (2) = libxc X86_PV_INFO.
    assert_eq!(
        err_of(&v),
        misplaced(ck, Layer::Libxc, libxc_type::X86_PV_INFO, Rule::PvInHvm)
    );
}

#[test]
fn errors_name_their_offset_for_people() {
    let e = misplaced(40, Layer::Libxc, libxc_type::TOOLSTACK, Rule::Toolstack);
    assert_eq!(e.pos(), 40);
    assert_eq!(
        e.to_string(),
        "at byte 40: Libxc TOOLSTACK record (type 0xb) is not allowed here: the deprecated \
         TOOLSTACK record is not accepted by Xen 4.17"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600), split in 0usize..600) {
        let mut p = Parser::new();
        let mut ev = Vec::new();
        let s = split.min(data.len());
        let _ = p.feed(&data[..s], &mut ev).and_then(|_| p.feed(&data[s..], &mut ev));
        let _ = p.finish();
        // Also behind a valid prefix, where the grammar is deeper.
        let w = cached(GuestKind::Hvm);
        let cut = split % w.bytes.len();
        let mut v = w.bytes[..cut].to_vec();
        v.extend_from_slice(&data);
        let mut p = Parser::new();
        let _ = p.feed(&v, &mut ev);
        let _ = p.finish();
    }

    #[test]
    fn mutated_streams_never_panic_and_agree_across_chunkings(
        kind in 0u8..3,
        muts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        chunk in 1usize..5000,
    ) {
        let w = cached([GuestKind::Pv, GuestKind::Hvm, GuestKind::Pvh][kind as usize]);
        let mut v = w.bytes.clone();
        for (i, b) in &muts {
            let at = i.index(v.len());
            v[at] = *b;
        }
        let whole = {
            let mut p = Parser::new();
            let mut ev = Vec::new();
            let r = p.feed(&v, &mut ev);
            (r, ev, p.position())
        };
        let mut p = Parser::new();
        let mut ev = Vec::new();
        let mut r = Ok(());
        for c in v.chunks(chunk) {
            r = p.feed(c, &mut ev);
            if r.is_err() { break; }
        }
        prop_assert_eq!(&r, &whole.0);
        prop_assert_eq!(&ev, &whole.1);
        if r.is_err() {
            prop_assert_eq!(p.position(), whole.2);
        }
    }
}
