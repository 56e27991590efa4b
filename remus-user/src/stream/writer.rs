//! A spec-following writer of Remus-shaped streams, for tests and benchmarks only.
//!
//! Owns: synthesising the bytes `xl remus` would write for a PV or HVM guest (xl header,
//! libxl header, libxc headers, records, checkpoints), with guest memory that evolves
//! between checkpoints, and the events the parser must report for them.
//! Never touches: I/O, Xen, the parser's internals (expectations are computed from what
//! is written, independently of `Parser`).
//!
//! Shape (Xen 4.17 `xg_sr_save.c`, `xg_sr_save_x86_{pv,hvm}.c`, `libxl_stream_write.c`):
//! checkpoint 1 is a live migration (static records, every page, then the pages dirtied
//! meanwhile), later checkpoints carry only the pages dirtied during the interval. Each
//! checkpoint ends with the end-of-checkpoint records (PV: TSC_INFO, SHARED_INFO, vCPU
//! records; HVM and PVH: TSC_INFO, HVM_CONTEXT, HVM_PARAMS), libxc CHECKPOINT, then libxl
//! (HVM only: [EMULATOR_XENSTORE_DATA] EMULATOR_CONTEXT) CHECKPOINT_END.
//!
//! PVH and HVM share the libxc side (domain header type 2, `xg_sr_save_x86_hvm.c`); libxl
//! tells them apart (`libxl_stream_write.c`): only an HVM guest has a device model, so
//! only its checkpoints carry the emulator records, at every checkpoint. The xenstore
//! record is written only when QEMU's xenstore subtree (`physmap/…`) has something in
//! it (`WriterConfig::emulator_xenstore`).
//!
//! Page contents mimic a guest: zero pages, text, page tables / counters, and some
//! random pages; between checkpoints a dirty page changes a few words or a short run, so
//! XOR against the previous copy is mostly zeros (what `compress` exploits).
use super::{
    Event, LIBXC_ID, LIBXL_IDENT, Layer, REC_TYPE_OPTIONAL, XL_BYTEORDER, XL_FLAG_JSON,
    XL_FLAG_STREAMV2, XL_MAGIC, is_end_of_checkpoint_record, libxc_type, libxl_type,
};
use std::ops::Range;

pub const PAGE_SIZE: usize = 4096;
/// libxc sends at most this many PFNs per PAGE_DATA record (`MAX_BATCH_SIZE`).
pub const MAX_BATCH: usize = 1024;
/// PFN type field values (bits 63..60 of a PAGE_DATA pfn entry).
pub const PFINFO_NOTAB: u64 = 0x0;
pub const PFINFO_L1TAB: u64 = 0x1;
pub const PFINFO_L3TAB: u64 = 0x3;
pub const PFINFO_L1TAB_PIN: u64 = 0x9;
pub const PFINFO_L4TAB_PIN: u64 = 0xc;
pub const PFINFO_XTAB: u64 = 0xf;

/// Guest kind: decides the domain header and the end-of-checkpoint records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestKind {
    Pv,
    /// HVM with a device model (QEMU upstream): emulator records at every checkpoint.
    Hvm,
    /// PVH: an HVM container without a device model; no emulator records.
    Pvh,
}

impl GuestKind {
    /// Has the libxc HVM records (domain header type 2).
    pub fn is_hvm_container(self) -> bool {
        matches!(self, GuestKind::Hvm | GuestKind::Pvh)
    }

    /// The `type` of the xl config.
    fn config_type(self) -> &'static str {
        match self {
            GuestKind::Pv => "pv",
            GuestKind::Hvm => "hvm",
            GuestKind::Pvh => "pvh",
        }
    }
}

/// What to write.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    pub kind: GuestKind,
    /// Guest memory in pages (all sent in checkpoint 1).
    pub guest_pages: usize,
    /// Number of checkpoints (>= 1). The stream stops after the last CHECKPOINT_END, as
    /// a Remus stream does when the primary dies at a boundary.
    pub checkpoints: u64,
    /// Pages dirtied (and sent) per checkpoint after the first.
    pub dirty_pages: usize,
    pub vcpus: u32,
    /// Seed of the deterministic page-content generator.
    pub seed: u64,
    /// Write a plain migration instead: one pass, libxc END, libxl END (no checkpoints).
    pub plain: bool,
    /// Insert an optional (bit 31) record in both layers, as a future Xen might.
    pub optional_records: bool,
    /// HVM: write EMULATOR_XENSTORE_DATA before EMULATOR_CONTEXT (libxl omits it when
    /// QEMU's xenstore subtree is empty).
    pub emulator_xenstore: bool,
}

impl WriterConfig {
    pub fn pv(checkpoints: u64) -> Self {
        WriterConfig {
            kind: GuestKind::Pv,
            guest_pages: 2048,
            checkpoints,
            dirty_pages: 300,
            vcpus: 2,
            seed: 1,
            plain: false,
            optional_records: false,
            emulator_xenstore: true,
        }
    }

    /// HVM with a device model.
    pub fn hvm(checkpoints: u64) -> Self {
        WriterConfig {
            kind: GuestKind::Hvm,
            ..WriterConfig::pv(checkpoints)
        }
    }

    pub fn pvh(checkpoints: u64) -> Self {
        WriterConfig {
            kind: GuestKind::Pvh,
            ..WriterConfig::pv(checkpoints)
        }
    }
}

/// A written stream and what a correct parser reports for it.
#[derive(Clone, Debug)]
pub struct Written {
    pub bytes: Vec<u8>,
    /// Exactly the events `Parser` must emit for `bytes` fed whole, in order.
    pub events: Vec<Event>,
    /// Every libxc PAGE_DATA record (header + body + padding) with its checkpoint number.
    pub page_records: Vec<(u64, Range<usize>)>,
}

impl Written {
    /// The PAGE_DATA records of one checkpoint, as slices of `bytes`.
    pub fn page_records_of(&self, checkpoint: u64) -> Vec<&[u8]> {
        self.page_records
            .iter()
            .filter(|(c, _)| *c == checkpoint)
            .map(|(_, r)| &self.bytes[r.clone()])
            .collect()
    }
}

/// splitmix64: a tiny deterministic generator (no dependency, stable across versions).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// A guest's memory that evolves between checkpoints.
#[derive(Clone, Debug)]
pub struct GuestMemory {
    pub pages: Vec<Vec<u8>>,
    rng: Rng,
}

const WORDS: &[&str] = &[
    "the ",
    "kernel ",
    "page ",
    "remus ",
    "xen ",
    "checkpoint ",
    "GET /index.html ",
    "HTTP/1.1 200 OK\r\n",
    "Content-Length: ",
    "user ",
    "root ",
    "/usr/lib/",
    "eth0 ",
    "0x",
    "error ",
    "ok\n",
    "{\"id\":",
    "}, ",
    "pid=",
    "tcp ",
];

impl GuestMemory {
    pub fn new(pages: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut v = Vec::with_capacity(pages);
        for pfn in 0..pages {
            let mut p = vec![0u8; PAGE_SIZE];
            match rng.below(10) {
                // Zero pages (free memory, bss).
                0..=2 => {}
                // Text: logs, page cache of text files.
                3..=4 => {
                    let mut off = 0;
                    while off < PAGE_SIZE {
                        let w = WORDS[rng.below(WORDS.len())].as_bytes();
                        let n = w.len().min(PAGE_SIZE - off);
                        p[off..off + n].copy_from_slice(&w[..n]);
                        off += n;
                    }
                }
                // Page tables / struct arrays: 8-byte entries with a common high part.
                5..=7 => {
                    let base = (pfn as u64) << 12 | 0x8000_0000_0000_0067;
                    for (i, c) in p.chunks_exact_mut(8).enumerate() {
                        if rng.below(4) != 0 {
                            let e = base.wrapping_add((i as u64) << 12);
                            c.copy_from_slice(&e.to_le_bytes());
                        }
                    }
                }
                // Incompressible: compressed files, crypto state, heap noise.
                8 => {
                    for c in p.chunks_exact_mut(8) {
                        c.copy_from_slice(&rng.next_u64().to_le_bytes());
                    }
                }
                // Sparse: a few counters in an otherwise zero page.
                _ => {
                    for _ in 0..8 {
                        let i = rng.below(PAGE_SIZE / 8) * 8;
                        p[i..i + 8].copy_from_slice(&rng.next_u64().to_le_bytes());
                    }
                }
            }
            v.push(p);
        }
        GuestMemory { pages: v, rng }
    }

    /// Dirties `n` pages (a hot set favoured), changing each slightly; returns their PFNs
    /// sorted, without duplicates (as the dirty bitmap yields them).
    pub fn dirty(&mut self, n: usize) -> Vec<u64> {
        let total = self.pages.len();
        let hot = (total / 8).max(1);
        let mut set = std::collections::BTreeSet::new();
        let n = n.min(total);
        while set.len() < n {
            let pfn = if self.rng.below(4) != 0 {
                self.rng.below(hot)
            } else {
                self.rng.below(total)
            };
            set.insert(pfn);
        }
        for &pfn in &set {
            let p = &mut self.pages[pfn];
            match self.rng.below(4) {
                // A few counters / pointers bumped.
                0 | 1 => {
                    for _ in 0..1 + self.rng.below(6) {
                        let i = self.rng.below(PAGE_SIZE / 8) * 8;
                        let mut w = [0u8; 8];
                        w.copy_from_slice(&p[i..i + 8]);
                        let v = u64::from_le_bytes(w).wrapping_add(1 + self.rng.below(300) as u64);
                        p[i..i + 8].copy_from_slice(&v.to_le_bytes());
                    }
                }
                // A short run rewritten (a log line, a packet buffer).
                2 => {
                    let len = 16 + self.rng.below(112);
                    let i = self.rng.below(PAGE_SIZE - len);
                    for b in &mut p[i..i + len] {
                        *b = b' ' + (self.rng.below(90) as u8);
                    }
                }
                // A single byte flag.
                _ => {
                    let i = self.rng.below(PAGE_SIZE);
                    p[i] ^= 1 << self.rng.below(8);
                }
            }
        }
        set.into_iter().map(|p| p as u64).collect()
    }
}

/// Builds the stream and its expected events.
struct Out {
    b: Vec<u8>,
    ev: Vec<Event>,
    pages: Vec<(u64, Range<usize>)>,
    checkpoint: u64,
    post_suspend_sent: bool,
}

impl Out {
    fn pos(&self) -> u64 {
        self.b.len() as u64
    }

    fn record(&mut self, layer: Layer, rtype: u32, body: &[&[u8]]) {
        let start = self.pos();
        let len: usize = body.iter().map(|p| p.len()).sum();
        if layer == Layer::Libxc
            && !self.post_suspend_sent
            && (is_end_of_checkpoint_record(rtype) || rtype == libxc_type::CHECKPOINT)
        {
            self.post_suspend_sent = true;
            self.ev.push(Event::PostSuspendStart {
                checkpoint: self.checkpoint,
                pos: start,
            });
        }
        self.b.extend_from_slice(&rtype.to_le_bytes());
        self.b.extend_from_slice(&(len as u32).to_le_bytes());
        for p in body {
            self.b.extend_from_slice(p);
        }
        let pad = (8 - len % 8) % 8;
        self.b.extend(std::iter::repeat_n(0u8, pad));
        let end = self.pos();
        self.ev.push(Event::Record {
            layer,
            rtype,
            start,
            body_len: len as u32,
            end,
        });
        if layer == Layer::Libxc && rtype == libxc_type::PAGE_DATA {
            self.pages
                .push((self.checkpoint, start as usize..end as usize));
        }
    }

    fn libxc(&mut self, rtype: u32, body: &[&[u8]]) {
        self.record(Layer::Libxc, rtype, body);
    }

    fn libxl(&mut self, rtype: u32, body: &[&[u8]]) {
        self.record(Layer::Libxl, rtype, body);
    }
}

fn page_data(out: &mut Out, mem: &GuestMemory, pfns: &[u64], kind: GuestKind, with_xtab: bool) {
    for chunk in pfns.chunks(MAX_BATCH) {
        let mut head = Vec::with_capacity(8 + 8 * (chunk.len() + 1));
        let xtab = with_xtab && chunk.len() < MAX_BATCH;
        let count = chunk.len() + usize::from(xtab);
        head.extend_from_slice(&(count as u32).to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        let mut parts: Vec<&[u8]> = Vec::with_capacity(chunk.len() + 1);
        for &pfn in chunk {
            // PV guests have typed page-table pages; HVM pages are all NOTAB.
            let t = match (kind, pfn % 512) {
                (GuestKind::Hvm | GuestKind::Pvh, _) => PFINFO_NOTAB,
                (GuestKind::Pv, 3) => PFINFO_L4TAB_PIN,
                (GuestKind::Pv, 2 | 66) => PFINFO_L3TAB,
                (GuestKind::Pv, r) if r % 64 == 1 => PFINFO_L1TAB,
                (GuestKind::Pv, r) if r % 128 == 5 => PFINFO_L1TAB_PIN,
                _ => PFINFO_NOTAB,
            };
            head.extend_from_slice(&(t << 60 | pfn).to_le_bytes());
        }
        if xtab {
            // A ballooned-out PFN: typed XTAB, carries no data.
            let pfn = mem.pages.len() as u64 + 7;
            head.extend_from_slice(&(PFINFO_XTAB << 60 | pfn).to_le_bytes());
        }
        parts.push(&head);
        for &pfn in chunk {
            parts.push(&mem.pages[pfn as usize]);
        }
        out.libxc(libxc_type::PAGE_DATA, &parts);
    }
}

fn end_of_checkpoint(out: &mut Out, cfg: &WriterConfig, rng: &mut Rng, n: u64) {
    let mut tsc = Vec::new();
    tsc.extend_from_slice(&0u32.to_le_bytes()); // mode
    tsc.extend_from_slice(&2_400_000u32.to_le_bytes()); // khz
    tsc.extend_from_slice(&(n * 200_000_000).to_le_bytes()); // nsec
    tsc.extend_from_slice(&(n as u32).to_le_bytes()); // incarnation
    tsc.extend_from_slice(&0u32.to_le_bytes());
    out.libxc(libxc_type::X86_TSC_INFO, &[&tsc]);
    let noise = |rng: &mut Rng, len: usize| -> Vec<u8> {
        let mut v = vec![0u8; len];
        for (i, b) in v.iter_mut().enumerate() {
            if i % 8 < 3 {
                *b = rng.next_u64() as u8;
            }
        }
        v
    };
    match cfg.kind {
        GuestKind::Pv => {
            let si = noise(rng, PAGE_SIZE);
            out.libxc(libxc_type::SHARED_INFO, &[&si]);
            for v in 0..cfg.vcpus {
                let mut h = Vec::new();
                h.extend_from_slice(&v.to_le_bytes());
                h.extend_from_slice(&0u32.to_le_bytes());
                // Sizes as in the lab's captured 64-bit PV stream; XSAVE as on a host
                // with AVX (the lab's emulated CPU had none); MSRS is elided when a
                // vCPU has no MSRs to send, as it was there.
                let basic = noise(rng, 5168);
                out.libxc(libxc_type::X86_PV_VCPU_BASIC, &[&h, &basic]);
                let ext = noise(rng, 64);
                out.libxc(libxc_type::X86_PV_VCPU_EXTENDED, &[&h, &ext]);
                let xsave = noise(rng, 16 + 0x340);
                out.libxc(libxc_type::X86_PV_VCPU_XSAVE, &[&h, &xsave]);
            }
        }
        GuestKind::Hvm | GuestKind::Pvh => {
            // Sizes and parameters as in the lab's captured streams (1 vCPU: HVM_CONTEXT
            // of 2504 bytes for PVH, 4112 for HVM with its emulated platform; 8 and 12
            // parameters, the special pages' PFNs among them); more vCPUs add about a
            // CPU record each.
            let per_vcpu = 1024 * (cfg.vcpus.max(1) as usize - 1);
            let ctx_len = match cfg.kind {
                GuestKind::Pvh => 2504 + per_vcpu,
                _ => 4112 + per_vcpu,
            };
            let ctx = noise(rng, ctx_len);
            out.libxc(libxc_type::HVM_CONTEXT, &[&ctx]);
            let mut params = Vec::new();
            let pvh: &[(u64, u64)] = &[
                (1, 1_044_476),
                (5, 1_044_477),
                (6, 1_044_475),
                (27, 1_044_472),
                (28, 1_044_473),
                (29, 1_044_474),
                (17, 1_044_479),
                (12, 4_278_181_888),
            ];
            let hvm: &[(u64, u64)] = &[
                (1, 1_044_476),
                (5, 1_044_477),
                (6, 1_044_475),
                (27, 1_044_472),
                (28, 1_044_473),
                (29, 1_044_474),
                (37, 1_653_496_349_312),
                (17, 1_044_479),
                (19, 1),
                (12, 4_278_181_888),
                (32, 1_044_464),
                (33, 8),
            ];
            let list = if cfg.kind == GuestKind::Pvh { pvh } else { hvm };
            params.extend_from_slice(&(list.len() as u32).to_le_bytes());
            params.extend_from_slice(&0u32.to_le_bytes());
            for (i, v) in list {
                params.extend_from_slice(&i.to_le_bytes());
                params.extend_from_slice(&v.to_le_bytes());
            }
            out.libxc(libxc_type::HVM_PARAMS, &[&params]);
        }
    }
}

/// The libxl records of an HVM guest's device model (none for PV and PVH).
fn emulator_records(out: &mut Out, cfg: &WriterConfig, rng: &mut Rng, n: u64) {
    if cfg.kind != GuestKind::Hvm {
        return;
    }
    let emu: &[u8] = &[2, 0, 0, 0, 0, 0, 0, 0]; // QEMU upstream, index 0
    if cfg.emulator_xenstore {
        let xs = format!("physmap/f0000/start_addr\0f0000\0physmap/f0000/size\0{n:x}\0");
        out.libxl(libxl_type::EMULATOR_XENSTORE_DATA, &[emu, xs.as_bytes()]);
    }
    // QEMU's device state as libxl copies it from QEMU's save file (8066 bytes in the
    // lab's captured HVM stream, in a record of 8074 with the emulator header).
    let mut blob = b"QEVM\0\0\0\x03".to_vec();
    blob.extend((0..8058).map(|i| if i % 5 == 0 { rng.next_u64() as u8 } else { 0 }));
    out.libxl(libxl_type::EMULATOR_CONTEXT, &[emu, &blob]);
}

/// Writes the stream described by `cfg`.
pub fn write(cfg: &WriterConfig) -> Written {
    let mut out = Out {
        b: Vec::new(),
        ev: Vec::new(),
        pages: Vec::new(),
        checkpoint: 1,
        post_suspend_sent: false,
    };
    let mut mem = GuestMemory::new(cfg.guest_pages, cfg.seed);
    let mut rng = Rng::new(cfg.seed ^ 0x5eed);
    write_headers(&mut out, cfg);
    write_static_data(&mut out, cfg);
    // Checkpoint 1: the live pass (every page), then what was dirtied meanwhile.
    let all: Vec<u64> = (0..cfg.guest_pages as u64).collect();
    page_data(&mut out, &mem, &all, cfg.kind, true);
    let dirty = mem.dirty(cfg.dirty_pages);
    page_data(&mut out, &mem, &dirty, cfg.kind, false);
    end_of_checkpoint(&mut out, cfg, &mut rng, 1);

    if cfg.plain {
        write_plain_end(&mut out, cfg, &mut rng);
    } else {
        write_checkpoints(&mut out, cfg, &mut mem, &mut rng);
    }
    Written {
        bytes: out.b,
        events: out.ev,
        page_records: out.pages,
    }
}

/// The xl header with its JSON config, the libxl header, LIBXC_CONTEXT, the libxc image
/// and domain headers.
fn write_headers(out: &mut Out, cfg: &WriterConfig) {
    // xl header + JSON config (NUL-terminated, as xl writes it).
    let config = format!(
        "{{\"c_info\":{{\"type\":\"{}\",\"name\":\"guest{}\",\"uuid\":\"6d3c5f2e-0000-4000-8000-{:012x}\"}},\
         \"b_info\":{{\"max_vcpus\":{},\"max_memkb\":{}}}}}\0",
        cfg.kind.config_type(),
        cfg.seed,
        cfg.seed,
        cfg.vcpus,
        cfg.guest_pages * 4
    );
    out.b.extend_from_slice(XL_MAGIC);
    out.b.extend_from_slice(&XL_BYTEORDER.to_le_bytes());
    out.b
        .extend_from_slice(&(XL_FLAG_STREAMV2 | XL_FLAG_JSON).to_le_bytes());
    out.b.extend_from_slice(&0u32.to_le_bytes());
    out.b
        .extend_from_slice(&(4 + config.len() as u32).to_le_bytes());
    out.b
        .extend_from_slice(&(config.len() as u32).to_le_bytes());
    out.b.extend_from_slice(config.as_bytes());
    out.ev.push(Event::XlHeader {
        end: out.pos(),
        config_len: config.len() as u32,
    });

    // libxl header (big-endian), then LIBXC_CONTEXT.
    out.b.extend_from_slice(&LIBXL_IDENT.to_be_bytes());
    out.b.extend_from_slice(&2u32.to_be_bytes());
    out.b.extend_from_slice(&0u32.to_be_bytes());
    if cfg.optional_records {
        out.libxl(REC_TYPE_OPTIONAL | 0x42, &[b"future libxl data"]);
    }
    out.libxl(libxl_type::LIBXC_CONTEXT, &[]);

    // libxc image header (big-endian) and domain header (little-endian).
    out.b.extend_from_slice(&u64::MAX.to_be_bytes());
    out.b.extend_from_slice(&LIBXC_ID.to_be_bytes());
    out.b.extend_from_slice(&3u32.to_be_bytes());
    out.b.extend_from_slice(&0u16.to_be_bytes());
    out.b.extend_from_slice(&[0u8; 6]);
    let dtype: u32 = if cfg.kind.is_hvm_container() { 2 } else { 1 };
    out.b.extend_from_slice(&dtype.to_le_bytes());
    out.b.extend_from_slice(&12u16.to_le_bytes());
    out.b.extend_from_slice(&0u16.to_le_bytes());
    out.b.extend_from_slice(&4u32.to_le_bytes());
    out.b.extend_from_slice(&17u32.to_le_bytes());
}

/// The libxc static data before the first page.
fn write_static_data(out: &mut Out, cfg: &WriterConfig) {
    // Static data.
    if cfg.kind == GuestKind::Pv {
        out.libxc(libxc_type::X86_PV_INFO, &[&[8, 4, 0, 0, 0, 0, 0, 0]]);
    }
    let cpuid: Vec<u8> = (0..24 * 51).map(|i| (i * 7 % 251) as u8).collect();
    out.libxc(libxc_type::X86_CPUID_POLICY, &[&cpuid]);
    let msr: Vec<u8> = (0..16 * 2).map(|i| (i * 13 % 251) as u8).collect();
    out.libxc(libxc_type::X86_MSR_POLICY, &[&msr]);
    out.libxc(libxc_type::STATIC_DATA_END, &[]);
    if cfg.optional_records {
        out.libxc(REC_TYPE_OPTIONAL | 0x77, &[b"future libxc data!"]);
    }
    if cfg.kind == GuestKind::Pv {
        let frames = cfg.guest_pages.div_ceil(512).max(1);
        let mut p2m = Vec::new();
        p2m.extend_from_slice(&0u32.to_le_bytes());
        p2m.extend_from_slice(&((cfg.guest_pages.max(1) - 1) as u32).to_le_bytes());
        for f in 0..frames {
            p2m.extend_from_slice(&(0x10_0000 + f as u64).to_le_bytes());
        }
        out.libxc(libxc_type::X86_PV_P2M_FRAMES, &[&p2m]);
    }
}

/// A plain migration ends with libxc END, (emulator records,) libxl END.
fn write_plain_end(out: &mut Out, cfg: &WriterConfig, rng: &mut Rng) {
    out.libxc(libxc_type::END, &[]);
    emulator_records(out, cfg, rng, 1);
    if cfg.optional_records {
        out.libxl(REC_TYPE_OPTIONAL | 0x43, &[b"x"]);
    }
    out.libxl(libxl_type::END, &[]);
    let end = out.pos();
    out.ev.push(Event::End { end });
}

/// The CHECKPOINT / CHECKPOINT_END of checkpoint 1, then the later checkpoints whole.
fn write_checkpoints(out: &mut Out, cfg: &WriterConfig, mem: &mut GuestMemory, rng: &mut Rng) {
    for n in 1..=cfg.checkpoints.max(1) {
        if n > 1 {
            // The first byte after CHECKPOINT_END of n-1 is written after the suspend.
            out.checkpoint = n;
            out.post_suspend_sent = true;
            let pos = out.pos();
            out.ev.push(Event::PostSuspendStart { checkpoint: n, pos });
            let dirty = mem.dirty(cfg.dirty_pages);
            page_data(out, mem, &dirty, cfg.kind, false);
            end_of_checkpoint(out, cfg, rng, n);
        }
        out.libxc(libxc_type::CHECKPOINT, &[]);
        let end = out.pos();
        out.ev.push(Event::LibxcCheckpoint { checkpoint: n, end });
        emulator_records(out, cfg, rng, n);
        if cfg.optional_records {
            out.libxl(REC_TYPE_OPTIONAL | 0x44, &[b"opt"]);
        }
        out.libxl(libxl_type::CHECKPOINT_END, &[]);
        let end = out.pos();
        out.ev
            .push(Event::CheckpointComplete { checkpoint: n, end });
    }
}
