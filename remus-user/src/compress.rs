//! Page-data compression for the relay: XOR each page against the copy last sent for its
//! PFN, drop the all-zero 64-byte blocks of the result, then lz4; the backup
//! reconstructs the byte-identical record.
//!
//! Owns: the encoded form of one stream record (header, codec, checksum), the per-PFN
//! page caches of encoder and decoder, and `measure` for the relay benchmark.
//! Never touches: I/O, the stream grammar beyond one PAGE_DATA record (the relay finds
//! the records with `stream::Parser`), the wire framing (`replication`).
//!
//! Use: the sender calls `PageEncoder::encode(record)` on each complete libxc PAGE_DATA
//! record (8-byte header + body + padding, exactly as in the stream); the receiver calls
//! `PageDecoder::decode(encoded)` on each encoded record, in the same order, and gets the
//! original bytes back. Any other record may also be passed: it is compressed as opaque
//! bytes and leaves the caches alone (so is a PAGE_DATA record whose count, PFN types
//! and length disagree).
//!
//! Encoded form (little-endian), `HEADER_LEN` bytes then the payload:
//!
//! ```text
//! 0  "RX"  magic             4  u8  flags: bit 0 XOR form, bit 1 payload is lz4 (block)
//! 2  u8    version (1)       5  3 reserved bytes, zero
//! 3  u8    codec (0 none, 1 lz4)
//! 8  u32   original length   12 u32 inner length (payload before lz4)
//! 16 u32   payload length    20 u32 crc32 of the original record
//! ```
//!
//! Inner form: opaque records are themselves. In XOR form, the record's 8-byte header,
//! count/reserved and PFN array come first, unchanged (the decoder parses them); then,
//! for each PFN that carries data, in order: a u64 bitmap of which 64-byte blocks of
//! `page ^ reference` are non-zero, and those blocks. The reference is the cached last
//! copy of that PFN, or all zeros if none. (Old Xen's compressor, removed in 2015, did
//! XOR + RLE; dropping zero blocks first keeps lz4 fast on the mostly-zero XOR.)
//!
//! Caches stay in lockstep deterministically: references are looked up as of the start
//! of the record; then each data page of the record, in order, updates its PFN's entry;
//! a PFN not cached yet is inserted only while the cache holds fewer than
//! `max_cached_pages`; once full, new PFNs are XORed against zero and not cached. The
//! decoder verifies the checksum before it touches its cache, so a corrupt record is an
//! error that leaves the decoder as it was; after any error both ends start afresh (new
//! encoder and decoder), as the relay does on a new connection.
use std::collections::HashMap;
use std::time::Instant;

pub const PAGE_SIZE: usize = 4096;
pub const HEADER_LEN: usize = 24;
pub const MAGIC: [u8; 2] = *b"RX";
pub const VERSION: u8 = 1;
const FLAG_XOR: u8 = 1;
const FLAG_LZ4: u8 = 2;
const BLOCK: usize = 64;
const BLOCKS: usize = PAGE_SIZE / BLOCK;
/// Largest record accepted: 8-byte header + 128 MiB body + padding.
pub const MAX_RECORD_LEN: usize = 8 + crate::stream::REC_LENGTH_MAX as usize + 8;
const PFN_MASK: u64 = (1 << 52) - 1;
/// PFN types that carry no page data (BROKEN, XALLOC, XTAB).
const fn has_data(entry: u64) -> bool {
    !matches!(entry >> 60, 0xd..=0xf)
}

/// Compression of page data. Also what the relays agree on in their handshake (the
/// wire carries [`Codec::to_wire`]), and what `remus relay status` shows ("none", "lz4").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Records are sent as they are (no XOR, no compression, caches untouched).
    None,
    /// XOR against the last copy, zero blocks dropped, then lz4 (block format).
    #[default]
    Lz4,
}

impl Codec {
    /// The codec's byte in encoded records and in the relays' HELLO.
    pub fn to_wire(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
        }
    }
    /// The codec a byte names; `None` for a byte no codec has.
    pub fn from_wire(v: u8) -> Option<Self> {
        match v {
            0 => Some(Codec::None),
            1 => Some(Codec::Lz4),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A codec name that is neither "none" nor "lz4".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown codec {0:?} (expected none or lz4)")]
pub struct UnknownCodecName(pub String);

impl std::str::FromStr for Codec {
    type Err = UnknownCodecName;
    fn from_str(s: &str) -> Result<Self, UnknownCodecName> {
        match s {
            "none" => Ok(Codec::None),
            "lz4" => Ok(Codec::Lz4),
            _ => Err(UnknownCodecName(s.to_string())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressError {
    #[error("record of {len} bytes exceeds the {max}-byte limit")]
    RecordTooLarge { len: usize, max: usize },
    #[error("encoded record too short: {len} bytes, the header alone is {HEADER_LEN}")]
    TooShort { len: usize },
    #[error("bad magic {0:02x?} in encoded record (expected \"RX\")")]
    BadMagic([u8; 2]),
    #[error("unsupported encoded-record version {0} (this side speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown codec {0} in encoded record")]
    UnknownCodec(u8),
    #[error("unknown flags {0:#04x} or non-zero reserved bytes in encoded record")]
    BadFlags(u8),
    #[error("length {0} in encoded record exceeds the record limit")]
    TooLarge(u32),
    #[error("payload length {header} in the header, but {actual} bytes follow it")]
    PayloadLength { header: u32, actual: usize },
    #[error("lz4 payload decompresses to {got} bytes, not {expected}")]
    DecompressedLength { expected: u32, got: usize },
    /// `why` is lz4's own message (its error type can be neither cloned nor compared).
    #[error("lz4 payload does not decompress to {expected} bytes: {why}")]
    Decompress { expected: u32, why: String },
    #[error("inner length {inner} does not match the original length {original}")]
    InnerLength { inner: u32, original: u32 },
    #[error("XOR form does not describe a well-formed PAGE_DATA record: {0}")]
    BadXorForm(&'static str),
    #[error("checksum mismatch: original crc32 {expected:#010x}, reconstructed {actual:#010x}")]
    Checksum { expected: u32, actual: u32 },
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The PFNs that carry data in a PAGE_DATA record, from its first `prefix` bytes
/// (header + PFN array), checked against the record's total length `total`.
/// Returns (end of the PFN array, data PFNs).
fn page_layout(prefix: &[u8], total: usize) -> Result<(usize, Vec<u64>), &'static str> {
    if prefix.len() < 16 {
        return Err("shorter than a PAGE_DATA header");
    }
    if le32(prefix, 0) != crate::stream::libxc_type::PAGE_DATA {
        return Err("not a PAGE_DATA record");
    }
    let body = le32(prefix, 4) as usize;
    if !body.is_multiple_of(8) || total != 8 + body {
        return Err("body length disagrees with the record length");
    }
    let count = le32(prefix, 8) as usize;
    let pfns_end = 16 + 8 * count;
    if count == 0 || pfns_end > total || pfns_end > prefix.len() {
        return Err("count is zero or the PFN array overruns the record");
    }
    let pfns: Vec<u64> = (0..count)
        .map(|i| le64(prefix, 16 + 8 * i))
        .filter(|&e| has_data(e))
        .map(|e| e & PFN_MASK)
        .collect();
    if pfns_end + pfns.len() * PAGE_SIZE != total {
        return Err("page count disagrees with the record length");
    }
    Ok((pfns_end, pfns))
}

/// The last copy of each PFN, bounded; identical logic on both ends.
#[derive(Debug)]
struct PageCache {
    pages: HashMap<u64, Box<[u8]>>,
    max: usize,
}

impl PageCache {
    fn new(max: usize) -> Self {
        PageCache {
            pages: HashMap::new(),
            max,
        }
    }

    /// Records the original pages (`data` holds them back to back), in order.
    fn update(&mut self, pfns: &[u64], data: &[u8]) {
        for (&pfn, page) in pfns.iter().zip(data.chunks_exact(PAGE_SIZE)) {
            if let Some(slot) = self.pages.get_mut(&pfn) {
                slot.copy_from_slice(page);
            } else if self.pages.len() < self.max {
                self.pages.insert(pfn, page.into());
            }
        }
    }
}

fn is_zero(b: &[u8]) -> bool {
    b.chunks_exact(8).fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
    }) == 0
}

/// Appends the sparse XOR form of `page` against `reference` to `out`.
fn push_xor_page(out: &mut Vec<u8>, page: &[u8], reference: Option<&[u8]>) {
    let at = out.len();
    out.extend_from_slice(&[0u8; 8]);
    let mut map = 0u64;
    for b in 0..BLOCKS {
        let p = &page[b * BLOCK..(b + 1) * BLOCK];
        match reference {
            Some(r) => {
                let r = &r[b * BLOCK..(b + 1) * BLOCK];
                if p != r {
                    map |= 1 << b;
                    out.extend(p.iter().zip(r).map(|(x, y)| x ^ y));
                }
            }
            None => {
                if !is_zero(p) {
                    map |= 1 << b;
                    out.extend_from_slice(p);
                }
            }
        }
    }
    out[at..at + 8].copy_from_slice(&map.to_le_bytes());
}

/// Sender side.
#[derive(Debug)]
pub struct PageEncoder {
    codec: Codec,
    cache: PageCache,
}

impl PageEncoder {
    pub fn new(codec: Codec, max_cached_pages: usize) -> Self {
        PageEncoder {
            codec,
            cache: PageCache::new(max_cached_pages),
        }
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Pages currently cached.
    pub fn cached_pages(&self) -> usize {
        self.cache.pages.len()
    }

    /// Encodes one complete record (see the module docs).
    pub fn encode(&mut self, record: &[u8]) -> Result<Vec<u8>, CompressError> {
        if record.len() > MAX_RECORD_LEN {
            return Err(CompressError::RecordTooLarge {
                len: record.len(),
                max: MAX_RECORD_LEN,
            });
        }
        let crc = crc32fast::hash(record);
        let mut flags = 0u8;
        let mut xor_inner = None;
        if self.codec == Codec::Lz4
            && let Ok((pfns_end, pfns)) = page_layout(record, record.len())
        {
            let mut inner = Vec::with_capacity(pfns_end + pfns.len() * 72);
            inner.extend_from_slice(&record[..pfns_end]);
            let data = &record[pfns_end..];
            for (pfn, page) in pfns.iter().zip(data.chunks_exact(PAGE_SIZE)) {
                push_xor_page(&mut inner, page, self.cache.pages.get(pfn).map(|b| &b[..]));
            }
            self.cache.update(&pfns, data);
            flags |= FLAG_XOR;
            xor_inner = Some(inner);
        }
        let inner: &[u8] = xor_inner.as_deref().unwrap_or(record);
        let compressed = match self.codec {
            Codec::Lz4 => Some(lz4_flex::block::compress(inner)).filter(|c| c.len() < inner.len()),
            Codec::None => None,
        };
        let payload: &[u8] = match &compressed {
            Some(c) => {
                flags |= FLAG_LZ4;
                c
            }
            None => inner,
        };
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.codec.to_wire());
        out.extend_from_slice(&[flags, 0, 0, 0]);
        out.extend_from_slice(&(record.len() as u32).to_le_bytes());
        out.extend_from_slice(&(inner.len() as u32).to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(payload);
        Ok(out)
    }
}

/// Receiver side.
#[derive(Debug)]
pub struct PageDecoder {
    cache: PageCache,
}

impl PageDecoder {
    pub fn new(max_cached_pages: usize) -> Self {
        PageDecoder {
            cache: PageCache::new(max_cached_pages),
        }
    }

    /// Pages currently cached.
    pub fn cached_pages(&self) -> usize {
        self.cache.pages.len()
    }

    /// Reconstructs the original record; on error the decoder is unchanged.
    pub fn decode(&mut self, encoded: &[u8]) -> Result<Vec<u8>, CompressError> {
        let h = EncodedHeader::parse(encoded)?;
        let payload = &encoded[HEADER_LEN..];
        let decompressed;
        let inner: &[u8] = if h.flags & FLAG_LZ4 != 0 {
            decompressed = h.decompress(payload)?;
            &decompressed
        } else {
            if payload.len() != h.inner_len as usize {
                return Err(CompressError::PayloadLength {
                    header: h.inner_len,
                    actual: payload.len(),
                });
            }
            payload
        };
        let (buf, pfns) = if h.flags & FLAG_XOR != 0 {
            let (b, p) = self.unxor(inner, h.orig_len as usize)?;
            (b, Some(p))
        } else {
            if inner.len() != h.orig_len as usize {
                return Err(CompressError::InnerLength {
                    inner: h.inner_len,
                    original: h.orig_len,
                });
            }
            (inner.to_vec(), None)
        };
        let actual = crc32fast::hash(&buf);
        if actual != h.crc {
            return Err(CompressError::Checksum {
                expected: h.crc,
                actual,
            });
        }
        if let Some((pfns_end, pfns)) = pfns {
            self.cache.update(&pfns, &buf[pfns_end..]);
        }
        Ok(buf)
    }

    /// Rebuilds a PAGE_DATA record from its XOR form (cache read, not written).
    #[allow(clippy::type_complexity)]
    fn unxor(
        &self,
        inner: &[u8],
        orig_len: usize,
    ) -> Result<(Vec<u8>, (usize, Vec<u64>)), CompressError> {
        let (pfns_end, pfns) = page_layout(inner, orig_len).map_err(CompressError::BadXorForm)?;
        let mut out = Vec::with_capacity(orig_len);
        out.extend_from_slice(&inner[..pfns_end]);
        let mut at = pfns_end;
        for pfn in &pfns {
            let map = inner
                .get(at..at + 8)
                .map(|m| le64(m, 0))
                .ok_or(CompressError::BadXorForm("a page bitmap is cut off"))?;
            at += 8;
            let base = out.len();
            match self.cache.pages.get(pfn) {
                Some(r) => out.extend_from_slice(r),
                None => out.resize(base + PAGE_SIZE, 0),
            }
            for b in 0..BLOCKS {
                if map & (1 << b) == 0 {
                    continue;
                }
                let x = inner
                    .get(at..at + BLOCK)
                    .ok_or(CompressError::BadXorForm("a page block is cut off"))?;
                at += BLOCK;
                let dst = &mut out[base + b * BLOCK..base + (b + 1) * BLOCK];
                for (d, s) in dst.iter_mut().zip(x) {
                    *d ^= *s;
                }
            }
        }
        if at != inner.len() {
            return Err(CompressError::BadXorForm(
                "bytes left over after the last page",
            ));
        }
        Ok((out, (pfns_end, pfns)))
    }
}

/// What `measure` found (for `cargo xtask bench relay`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measurement {
    pub records: usize,
    /// Bytes of the measured records as they are in the stream.
    pub raw_bytes: u64,
    /// Bytes after XOR + lz4, including the encoded-record headers.
    pub encoded_bytes: u64,
    /// Bytes with plain lz4 of each record (no XOR), for comparison.
    pub lz4_only_bytes: u64,
    pub encode_secs: f64,
    pub decode_secs: f64,
    /// Every decoded record was byte-identical to its original.
    pub identical: bool,
}

impl Measurement {
    pub fn ratio(&self) -> f64 {
        self.raw_bytes as f64 / (self.encoded_bytes.max(1)) as f64
    }
    pub fn lz4_only_ratio(&self) -> f64 {
        self.raw_bytes as f64 / (self.lz4_only_bytes.max(1)) as f64
    }
    /// Encoder throughput in MB/s (10^6 bytes of raw input per second).
    pub fn encode_mb_s(&self) -> f64 {
        self.raw_bytes as f64 / 1e6 / self.encode_secs.max(1e-9)
    }
    pub fn decode_mb_s(&self) -> f64 {
        self.raw_bytes as f64 / 1e6 / self.decode_secs.max(1e-9)
    }
}

/// Encodes and decodes `prime` (e.g. checkpoint 1's PAGE_DATA, which fills the caches;
/// not measured), then `records` (the incremental checkpoints), timing both sides and
/// checking byte identity. No I/O; the caller prints.
pub fn measure(
    prime: &[&[u8]],
    records: &[&[u8]],
    max_cached_pages: usize,
) -> Result<Measurement, CompressError> {
    let mut enc = PageEncoder::new(Codec::Lz4, max_cached_pages);
    let mut dec = PageDecoder::new(max_cached_pages);
    let mut identical = true;
    for r in prime {
        let e = enc.encode(r)?;
        identical &= dec.decode(&e)? == *r;
    }
    let mut m = measure_primed(&mut enc, &mut dec, records)?;
    m.identical &= identical;
    Ok(m)
}

/// Like `measure`, with an encoder/decoder pair the caller has already primed (e.g.
/// record by record while streaming a large checkpoint 1).
pub fn measure_primed(
    enc: &mut PageEncoder,
    dec: &mut PageDecoder,
    records: &[&[u8]],
) -> Result<Measurement, CompressError> {
    let mut m = Measurement {
        records: records.len(),
        ..Measurement::default()
    };
    let t = Instant::now();
    let mut encoded = Vec::with_capacity(records.len());
    for r in records {
        let e = enc.encode(r)?;
        m.raw_bytes += r.len() as u64;
        m.encoded_bytes += e.len() as u64;
        encoded.push(e);
    }
    m.encode_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut decoded = Vec::with_capacity(records.len());
    for e in &encoded {
        decoded.push(dec.decode(e)?);
    }
    m.decode_secs = t.elapsed().as_secs_f64();
    m.identical =
        decoded.len() == records.len() && decoded.iter().zip(records).all(|(d, r)| d == r);
    m.lz4_only_bytes = records
        .iter()
        .map(|r| lz4_flex::block::compress(r).len().min(r.len()) as u64)
        .sum();
    Ok(m)
}

/// The checked header of an encoded record.
struct EncodedHeader {
    flags: u8,
    orig_len: u32,
    inner_len: u32,
    crc: u32,
}

impl EncodedHeader {
    /// Checks magic, version, codec, flags and every length against the limits and the
    /// bytes that follow, before anything is allocated.
    fn parse(encoded: &[u8]) -> Result<EncodedHeader, CompressError> {
        if encoded.len() < HEADER_LEN {
            return Err(CompressError::TooShort { len: encoded.len() });
        }
        let magic = [encoded[0], encoded[1]];
        if magic != MAGIC {
            return Err(CompressError::BadMagic(magic));
        }
        if encoded[2] != VERSION {
            return Err(CompressError::UnsupportedVersion(encoded[2]));
        }
        let codec = Codec::from_wire(encoded[3]).ok_or(CompressError::UnknownCodec(encoded[3]))?;
        let flags = encoded[4];
        if flags & !(FLAG_XOR | FLAG_LZ4) != 0
            || encoded[5..8] != [0, 0, 0]
            || (codec == Codec::None && flags != 0)
        {
            return Err(CompressError::BadFlags(flags));
        }
        let h = EncodedHeader {
            flags,
            orig_len: le32(encoded, 8),
            inner_len: le32(encoded, 12),
            crc: le32(encoded, 20),
        };
        let payload_len = le32(encoded, 16);
        // XOR form: at most 8 bitmap bytes per page beyond the original.
        let inner_max = h.orig_len as usize + h.orig_len as usize / 512 + 8;
        if h.orig_len as usize > MAX_RECORD_LEN {
            return Err(CompressError::TooLarge(h.orig_len));
        }
        if h.inner_len as usize > inner_max {
            return Err(CompressError::TooLarge(h.inner_len));
        }
        let actual = encoded.len() - HEADER_LEN;
        if actual != payload_len as usize {
            return Err(CompressError::PayloadLength {
                header: payload_len,
                actual,
            });
        }
        Ok(h)
    }

    /// The lz4 payload decompressed to exactly `inner_len` bytes.
    fn decompress(&self, payload: &[u8]) -> Result<Vec<u8>, CompressError> {
        let mut out = vec![0u8; self.inner_len as usize];
        match lz4_flex::block::decompress_into(payload, &mut out) {
            Ok(n) if n == out.len() => Ok(out),
            Ok(n) => Err(CompressError::DecompressedLength {
                expected: self.inner_len,
                got: n,
            }),
            Err(e) => Err(CompressError::Decompress {
                expected: self.inner_len,
                why: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::writer::{self, WriterConfig};
    use proptest::prelude::*;

    fn stream() -> writer::Written {
        writer::write(&WriterConfig {
            guest_pages: 1500,
            dirty_pages: 200,
            ..WriterConfig::pv(4)
        })
    }

    fn all_records(w: &writer::Written) -> Vec<&[u8]> {
        w.page_records
            .iter()
            .map(|(_, r)| &w.bytes[r.clone()])
            .collect()
    }

    #[test]
    fn round_trip_is_byte_identical_for_both_codecs_and_guest_kinds() {
        for w in [
            stream(),
            writer::write(&WriterConfig::hvm(3)),
            writer::write(&WriterConfig::pvh(3)),
        ] {
            for codec in [Codec::Lz4, Codec::None] {
                let mut enc = PageEncoder::new(codec, 1 << 20);
                let mut dec = PageDecoder::new(1 << 20);
                for r in all_records(&w) {
                    let e = enc.encode(r).unwrap();
                    assert_eq!(dec.decode(&e).unwrap(), r);
                }
                if codec == Codec::None {
                    assert_eq!(enc.cached_pages(), 0);
                } else {
                    assert_eq!(enc.cached_pages(), dec.cached_pages());
                    assert!(enc.cached_pages() > 0);
                }
            }
        }
    }

    #[test]
    fn writer_page_records_take_the_xor_path() {
        let w = stream();
        let mut enc = PageEncoder::new(Codec::Lz4, 1 << 20);
        for r in all_records(&w) {
            let e = enc.encode(r).unwrap();
            assert_eq!(e[4] & FLAG_XOR, FLAG_XOR, "PAGE_DATA encoded opaquely");
        }
        // A PAGE_DATA record whose length disagrees with its count is opaque.
        let mut bad = all_records(&w)[0].to_vec();
        bad.truncate(bad.len() - PAGE_SIZE);
        let e = enc.encode(&bad).unwrap();
        assert_eq!(e[4] & FLAG_XOR, 0);
        assert_eq!(PageDecoder::new(4).decode(&e).unwrap(), bad);
    }

    #[test]
    fn non_page_records_pass_through_opaquely() {
        let w = stream();
        let mut enc = PageEncoder::new(Codec::Lz4, 100);
        let mut dec = PageDecoder::new(100);
        // The whole xl header area and some arbitrary slices.
        for r in [
            &w.bytes[..100],
            &w.bytes[5..6],
            &[][..],
            &w.bytes[1000..9000],
        ] {
            let e = enc.encode(r).unwrap();
            assert_eq!(dec.decode(&e).unwrap(), r);
        }
        assert_eq!(enc.cached_pages(), 0);
        assert_eq!(dec.cached_pages(), 0);
    }

    #[test]
    fn a_full_cache_keeps_both_sides_in_lockstep() {
        let w = stream();
        for max in [0usize, 1, 7, 600] {
            let mut enc = PageEncoder::new(Codec::Lz4, max);
            let mut dec = PageDecoder::new(max);
            for r in all_records(&w) {
                let e = enc.encode(r).unwrap();
                assert_eq!(dec.decode(&e).unwrap(), r, "max {max}");
            }
            assert_eq!(enc.cached_pages(), max.min(1500));
            assert_eq!(dec.cached_pages(), enc.cached_pages());
        }
    }

    #[test]
    fn duplicate_pfns_in_one_record_round_trip() {
        // count 2, the same PFN twice with different contents.
        let mut r = Vec::new();
        r.extend_from_slice(&1u32.to_le_bytes());
        r.extend_from_slice(&((8 + 16 + 2 * PAGE_SIZE) as u32).to_le_bytes());
        r.extend_from_slice(&2u32.to_le_bytes());
        r.extend_from_slice(&0u32.to_le_bytes());
        r.extend_from_slice(&5u64.to_le_bytes());
        r.extend_from_slice(&5u64.to_le_bytes());
        r.extend(std::iter::repeat_n(1u8, PAGE_SIZE));
        r.extend(std::iter::repeat_n(2u8, PAGE_SIZE));
        let mut enc = PageEncoder::new(Codec::Lz4, 10);
        let mut dec = PageDecoder::new(10);
        for _ in 0..3 {
            let e = enc.encode(&r).unwrap();
            assert_eq!(dec.decode(&e).unwrap(), r);
        }
    }

    #[test]
    fn corrupt_and_truncated_encodings_are_errors_and_leave_the_decoder_intact() {
        // A small guest: every decode below is of a whole checkpoint-1 record.
        let w = writer::write(&WriterConfig {
            guest_pages: 64,
            dirty_pages: 16,
            ..WriterConfig::pv(3)
        });
        let recs = all_records(&w);
        let mut enc = PageEncoder::new(Codec::Lz4, 1 << 20);
        let mut dec = PageDecoder::new(1 << 20);
        let encoded: Vec<Vec<u8>> = recs.iter().map(|r| enc.encode(r).unwrap()).collect();
        let first = &encoded[0];
        assert!(matches!(
            dec.decode(&first[..10]),
            Err(CompressError::TooShort { len: 10 })
        ));
        assert!(matches!(
            dec.decode(&first[..first.len() - 1]),
            Err(CompressError::PayloadLength { .. })
        ));
        let flip = |at: usize, v: u8| {
            let mut e = first.clone();
            e[at] ^= v;
            e
        };
        assert!(matches!(
            dec.decode(&flip(0, 1)),
            Err(CompressError::BadMagic(_))
        ));
        assert!(matches!(
            dec.decode(&flip(2, 3)),
            Err(CompressError::UnsupportedVersion(2))
        ));
        assert!(matches!(
            dec.decode(&flip(3, 4)),
            Err(CompressError::UnknownCodec(5))
        ));
        assert!(matches!(
            dec.decode(&flip(4, 8)),
            Err(CompressError::BadFlags(_))
        ));
        assert!(matches!(
            dec.decode(&flip(6, 1)),
            Err(CompressError::BadFlags(_))
        ));
        assert!(matches!(
            dec.decode(&flip(11, 0x80)),
            Err(CompressError::TooLarge(_))
        ));
        assert!(matches!(
            dec.decode(&flip(15, 0x80)),
            Err(CompressError::TooLarge(_))
        ));
        assert!(matches!(
            dec.decode(&flip(20, 1)),
            Err(CompressError::Checksum { .. })
        ));
        // A bit flip in the payload is an error, or (when lz4 copies an identical run
        // from elsewhere, e.g. zeros via a changed match offset) still the exact original:
        // never wrong output.
        let mut caught = 0;
        for at in (HEADER_LEN..first.len()).step_by(first.len() / 61 + 1) {
            for bit in [0x01u8, 0x80] {
                match dec.decode(&flip(at, bit)) {
                    Err(_) => caught += 1,
                    Ok(d) => assert_eq!(&d, recs[0], "flip at {at} gave wrong output"),
                }
                dec = PageDecoder::new(1 << 20);
            }
        }
        assert!(caught > 0);
        assert_eq!(dec.cached_pages(), 0, "errors must not touch the cache");
        for (e, r) in encoded.iter().zip(&recs) {
            assert_eq!(&dec.decode(e).unwrap(), r);
        }
    }

    #[test]
    fn incremental_checkpoints_compress_better_than_lz4_alone() {
        // Correctness only; ratios are printed by the benchmark.
        let w = stream();
        let prime = w.page_records_of(1);
        let inc: Vec<&[u8]> = (2..=4).flat_map(|n| w.page_records_of(n)).collect();
        let m = measure(&prime, &inc, 1 << 20).unwrap();
        assert!(m.identical);
        assert_eq!(m.records, inc.len());
        assert!(m.encoded_bytes < m.lz4_only_bytes);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

        #[test]
        fn arbitrary_encodings_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut dec = PageDecoder::new(4);
            let _ = dec.decode(&data);
            let mut d = data.clone();
            if d.len() >= HEADER_LEN {
                d[..4].copy_from_slice(&[b'R', b'X', 1, 1]);
                d[5..8].copy_from_slice(&[0, 0, 0]);
                let n = (d.len() - HEADER_LEN) as u32;
                d[16..20].copy_from_slice(&n.to_le_bytes());
                let _ = dec.decode(&d);
            }
        }

        #[test]
        fn arbitrary_records_round_trip(data in proptest::collection::vec(any::<u8>(), 0..3000), count in 1u32..3) {
            let mut enc = PageEncoder::new(Codec::Lz4, 2);
            let mut dec = PageDecoder::new(2);
            prop_assert_eq!(dec.decode(&enc.encode(&data).unwrap()).unwrap(), data.clone());
            // Shaped like PAGE_DATA, with random pages.
            let mut r = Vec::new();
            r.extend_from_slice(&1u32.to_le_bytes());
            r.extend_from_slice(&(8 + 8 * count + count * PAGE_SIZE as u32).to_le_bytes());
            r.extend_from_slice(&count.to_le_bytes());
            r.extend_from_slice(&0u32.to_le_bytes());
            for i in 0..count { r.extend_from_slice(&u64::from(i * 3).to_le_bytes()); }
            for i in 0..(count as usize * PAGE_SIZE) { r.push(data.get(i % data.len().max(1)).copied().unwrap_or(0)); }
            for _ in 0..2 {
                prop_assert_eq!(dec.decode(&enc.encode(&r).unwrap()).unwrap(), r.clone());
            }
        }
    }
}
