//! Incremental parser of the stream `xl remus` writes (Xen migration v2, Remus shape).
//!
//! Owns: the byte-level grammar of the stream and the checkpoint events derived from it.
//! Never touches: I/O of any kind (bytes in, events out), the network, the buffer.
//!
//! API CONTRACT (fixed; the relay codes against it):
//! - `Parser::new()`, then `feed(&mut self, data, &mut Vec<Event>)` with the stream in
//!   arbitrary chunks (1 byte at a time must work). Events are appended in stream order.
//! - Every position is an absolute byte offset in the stream (0 = first byte of the xl
//!   header).
//! - `Event::PostSuspendStart { checkpoint: N, pos }` is emitted during the `feed` call
//!   that delivers the byte at `pos`, which is: for N >= 2 the first byte after the libxl
//!   CHECKPOINT_END of checkpoint N-1; for N = 1 the first byte of the first
//!   end-of-checkpoint libxc record (TSC_INFO, SHARED_INFO, X86_PV_VCPU_*, HVM_CONTEXT,
//!   HVM_PARAMS) of the first checkpoint.
//! - `Event::LibxcCheckpoint { checkpoint: N, end }`: the libxc CHECKPOINT record of
//!   checkpoint N ends at `end` (header + body + padding).
//! - `Event::CheckpointComplete { checkpoint: N, end }`: the libxl CHECKPOINT_END record
//!   of checkpoint N ends at `end`: all bytes of checkpoint N are `< end`.
//! - `Event::Record { .. }` for every record of either layer (start offset of the 8-byte
//!   header, type, body length, end offset after padding).
//! - Errors are `StreamError` variants, each with the offset; the parser is dead after
//!   an error.
//!
//! Two precisions on the contract (the implementation is the reference):
//! - For N = 1 the record type is only known once its 4-byte type field has arrived, so
//!   `PostSuspendStart { checkpoint: 1, pos }` is emitted during the `feed` call that
//!   completes the type field of that record (`pos` is still the record's first byte).
//!   If checkpoint 1 carries none of those records, it is emitted at the start of its
//!   libxc CHECKPOINT record, so every `LibxcCheckpoint` is preceded by its
//!   `PostSuspendStart`.
//! - `Record` is emitted when the record is complete (after its padding), so it follows
//!   a `PostSuspendStart` that points at its first byte.
//!
//! Grammar (Xen 4.17, `xl.h`, `libxl_sr_stream_format.h`, `xg_sr_stream_format.h`):
//!
//! ```text
//! xl header (48 bytes, native = little-endian u32s) + optional data (u32 config_len, config)
//! libxl header (16 bytes, big-endian: "LibxlFmt", version 2, options)
//! libxl: LIBXC_CONTEXT                       -> libxc layer
//! libxc: image header (24, big-endian) + domain header (16), once
//! libxc: records ... CHECKPOINT              -> libxl layer (checkpoint N)
//! libxl: [EMULATOR_XENSTORE_DATA] [EMULATOR_CONTEXT] CHECKPOINT_END -> libxc layer, N+1
//! ... or libxc END -> libxl: [emulator records] END (a plain migration)
//! ```
//!
//! Every record is `u32 type, u32 body_length` (little-endian), body, zero padding to 8.
//! Memory is bounded: only headers (at most 48 bytes) are buffered; bodies are skipped
//! by counting.
pub mod error;
mod headers;
mod records;
pub mod writer;

use std::fmt::Write as _;

pub use error::{Field, Part, RecordId, Rule, StreamError};

/// Which framing layer a record belongs to (type numbers collide between them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    Libxl,
    Libxc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The xl header and its JSON config have been read; `end` is the offset after them.
    XlHeader {
        end: u64,
        config_len: u32,
    },
    /// One record of either layer.
    Record {
        layer: Layer,
        rtype: u32,
        start: u64,
        body_len: u32,
        end: u64,
    },
    PostSuspendStart {
        checkpoint: u64,
        pos: u64,
    },
    LibxcCheckpoint {
        checkpoint: u64,
        end: u64,
    },
    CheckpointComplete {
        checkpoint: u64,
        end: u64,
    },
    /// libxl END: a plain (non-Remus) stream finished cleanly.
    End {
        end: u64,
    },
}

impl Event {
    /// For `Record`: the stream range of its body (without header and padding).
    pub fn record_body(&self) -> Option<std::ops::Range<u64>> {
        match *self {
            Event::Record {
                start, body_len, ..
            } => Some(start + 8..start + 8 + u64::from(body_len)),
            _ => None,
        }
    }
}

/// The 32-byte magic at the start of an xl save file / migration stream (`xl.h`).
pub const XL_MAGIC: &[u8; 32] = b"Xen saved domain, xl format\n \0 \r";
/// xl header byte-order marker, written in the domain's (little-endian) byte order.
pub const XL_BYTEORDER: u32 = 0x0102_0304;
/// xl mandatory flag: the config is JSON.
pub const XL_FLAG_JSON: u32 = 1 << 0;
/// xl mandatory flag: the stream is migration v2.
pub const XL_FLAG_STREAMV2: u32 = 1 << 1;
/// Fixed part of the xl header: magic, byteorder, mandatory, optional, optional_data_len.
pub const XL_HEADER_LEN: usize = 48;
/// libxl stream identity, "LibxlFmt" (big-endian u64).
pub const LIBXL_IDENT: u64 = 0x4c69_6278_6c46_6d74;
pub const LIBXL_VERSION: u32 = 2;
pub const LIBXL_HEADER_LEN: usize = 16;
/// libxl header option bits.
pub const LIBXL_OPT_BIG_ENDIAN: u32 = 1 << 0;
pub const LIBXL_OPT_LEGACY: u32 = 1 << 1;
/// libxc image header: marker, "XENF", version 3 (2 also accepted, as Xen does).
pub const LIBXC_MARKER: u64 = u64::MAX;
pub const LIBXC_ID: u32 = 0x5845_4e46;
pub const LIBXC_VERSION: u32 = 3;
pub const LIBXC_IMAGE_HEADER_LEN: usize = 24;
pub const LIBXC_DOMAIN_HEADER_LEN: usize = 16;
/// Image header option bit 0: big-endian records.
pub const LIBXC_OPT_BIG_ENDIAN: u16 = 1;
/// Largest record body either layer accepts (`REC_LENGTH_MAX`).
pub const REC_LENGTH_MAX: u32 = 128 << 20;
/// Records with this bit set in their type are optional (may be ignored by a receiver).
pub const REC_TYPE_OPTIONAL: u32 = 0x8000_0000;
/// Upper bound on the xl header's optional data (the JSON config); xl itself has none,
/// this only catches garbage lengths early.
pub const XL_OPTIONAL_DATA_MAX: u32 = REC_LENGTH_MAX;

/// libxl record types (`libxl_sr_stream_format.h`).
pub mod libxl_type {
    pub const END: u32 = 0;
    pub const LIBXC_CONTEXT: u32 = 1;
    pub const EMULATOR_XENSTORE_DATA: u32 = 2;
    pub const EMULATOR_CONTEXT: u32 = 3;
    pub const CHECKPOINT_END: u32 = 4;
    pub const CHECKPOINT_STATE: u32 = 5;
}

/// libxc record types (`xg_sr_stream_format.h`).
pub mod libxc_type {
    pub const END: u32 = 0;
    pub const PAGE_DATA: u32 = 1;
    pub const X86_PV_INFO: u32 = 2;
    pub const X86_PV_P2M_FRAMES: u32 = 3;
    pub const X86_PV_VCPU_BASIC: u32 = 4;
    pub const X86_PV_VCPU_EXTENDED: u32 = 5;
    pub const X86_PV_VCPU_XSAVE: u32 = 6;
    pub const SHARED_INFO: u32 = 7;
    pub const X86_TSC_INFO: u32 = 8;
    pub const HVM_CONTEXT: u32 = 9;
    pub const HVM_PARAMS: u32 = 0xa;
    pub const TOOLSTACK: u32 = 0xb;
    pub const X86_PV_VCPU_MSRS: u32 = 0xc;
    pub const VERIFY: u32 = 0xd;
    pub const CHECKPOINT: u32 = 0xe;
    pub const CHECKPOINT_DIRTY_PFN_LIST: u32 = 0xf;
    pub const STATIC_DATA_END: u32 = 0x10;
    pub const X86_CPUID_POLICY: u32 = 0x11;
    pub const X86_MSR_POLICY: u32 = 0x12;
}

/// Domain header `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainType {
    X86Pv,
    X86Hvm,
}

/// Human name of a record type in a layer (for errors and logs).
pub fn type_name(layer: Layer, rtype: u32) -> &'static str {
    if rtype & REC_TYPE_OPTIONAL != 0 {
        return "optional";
    }
    match layer {
        Layer::Libxl => match rtype {
            libxl_type::END => "END",
            libxl_type::LIBXC_CONTEXT => "LIBXC_CONTEXT",
            libxl_type::EMULATOR_XENSTORE_DATA => "EMULATOR_XENSTORE_DATA",
            libxl_type::EMULATOR_CONTEXT => "EMULATOR_CONTEXT",
            libxl_type::CHECKPOINT_END => "CHECKPOINT_END",
            libxl_type::CHECKPOINT_STATE => "CHECKPOINT_STATE",
            _ => "unknown mandatory",
        },
        Layer::Libxc => match rtype {
            libxc_type::END => "END",
            libxc_type::PAGE_DATA => "PAGE_DATA",
            libxc_type::X86_PV_INFO => "X86_PV_INFO",
            libxc_type::X86_PV_P2M_FRAMES => "X86_PV_P2M_FRAMES",
            libxc_type::X86_PV_VCPU_BASIC => "X86_PV_VCPU_BASIC",
            libxc_type::X86_PV_VCPU_EXTENDED => "X86_PV_VCPU_EXTENDED",
            libxc_type::X86_PV_VCPU_XSAVE => "X86_PV_VCPU_XSAVE",
            libxc_type::SHARED_INFO => "SHARED_INFO",
            libxc_type::X86_TSC_INFO => "X86_TSC_INFO",
            libxc_type::HVM_CONTEXT => "HVM_CONTEXT",
            libxc_type::HVM_PARAMS => "HVM_PARAMS",
            libxc_type::TOOLSTACK => "TOOLSTACK",
            libxc_type::X86_PV_VCPU_MSRS => "X86_PV_VCPU_MSRS",
            libxc_type::VERIFY => "VERIFY",
            libxc_type::CHECKPOINT => "CHECKPOINT",
            libxc_type::CHECKPOINT_DIRTY_PFN_LIST => "CHECKPOINT_DIRTY_PFN_LIST",
            libxc_type::STATIC_DATA_END => "STATIC_DATA_END",
            libxc_type::X86_CPUID_POLICY => "X86_CPUID_POLICY",
            libxc_type::X86_MSR_POLICY => "X86_MSR_POLICY",
            _ => "unknown mandatory",
        },
    }
}

/// Is this a libxc record written by `end_of_checkpoint` (after the guest is suspended)?
pub fn is_end_of_checkpoint_record(rtype: u32) -> bool {
    use libxc_type::*;
    matches!(
        rtype,
        X86_TSC_INFO
            | SHARED_INFO
            | X86_PV_VCPU_BASIC
            | X86_PV_VCPU_EXTENDED
            | X86_PV_VCPU_XSAVE
            | X86_PV_VCPU_MSRS
            | HVM_CONTEXT
            | HVM_PARAMS
    )
}

/// Where in the layer grammar the parser is (decides which record types are allowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// libxl records before LIBXC_CONTEXT.
    LibxlStart,
    /// libxc records of the current checkpoint.
    Libxc,
    /// libxl records after a libxc CHECKPOINT, until CHECKPOINT_END.
    LibxlCheckpoint,
    /// libxl records after a libxc END (plain migration), until libxl END.
    LibxlTail,
}

/// What the bytes at the current position are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Buffering the 48-byte fixed xl header.
    XlFixed,
    /// Buffering the u32 config length at the start of the optional data.
    XlConfigLen {
        opt_len: u32,
    },
    /// Skipping the config and the rest of the optional data.
    XlSkip {
        left: u64,
        config_len: u32,
    },
    LibxlHeader,
    LibxcImageHeader,
    LibxcDomainHeader,
    /// Buffering an 8-byte record header.
    RecordHeader,
    /// Skipping the body of record `cur`, then checking its padding.
    RecordBody {
        cur: Current,
        body_left: u64,
        pad_left: u8,
    },
    /// After libxl END: nothing may follow.
    Finished,
}

impl State {
    /// Bytes a buffered state needs (0 for counting states).
    fn need(self) -> usize {
        match self {
            State::XlFixed => XL_HEADER_LEN,
            State::XlConfigLen { .. } => 4,
            State::LibxlHeader => LIBXL_HEADER_LEN,
            State::LibxcImageHeader => LIBXC_IMAGE_HEADER_LEN,
            State::LibxcDomainHeader => LIBXC_DOMAIN_HEADER_LEN,
            State::RecordHeader => 8,
            _ => 0,
        }
    }

    /// The fixed-size part a buffering state reads.
    fn part(self) -> Option<Part> {
        Some(match self {
            State::XlFixed => Part::XlHeader,
            State::XlConfigLen { .. } => Part::XlConfigLen,
            State::LibxlHeader => Part::LibxlHeader,
            State::LibxcImageHeader => Part::LibxcImageHeader,
            State::LibxcDomainHeader => Part::LibxcDomainHeader,
            State::RecordHeader => Part::RecordHeader,
            _ => return None,
        })
    }
}

/// The record whose body is being skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Current {
    layer: Layer,
    rtype: u32,
    start: u64,
    body_len: u32,
}

impl Current {
    fn id(&self) -> RecordId {
        RecordId {
            layer: self.layer,
            rtype: self.rtype,
        }
    }
}

/// The incremental parser. See the module docs for the contract.
#[derive(Debug)]
pub struct Parser {
    state: State,
    phase: Phase,
    pos: u64,
    buf: [u8; XL_HEADER_LEN],
    blen: usize,
    /// Start offset of the buffered header.
    bstart: u64,
    domain: Option<DomainType>,
    /// The checkpoint whose bytes are being read (1-based).
    checkpoint: u64,
    complete: u64,
    /// `PostSuspendStart` of `checkpoint` has been emitted.
    post_suspend_sent: bool,
    /// A CHECKPOINT_END was just read: the next byte starts checkpoint `checkpoint`.
    post_suspend_pending: bool,
    dead: Option<StreamError>,
}

impl Default for Parser {
    fn default() -> Self {
        Parser {
            state: State::XlFixed,
            phase: Phase::LibxlStart,
            pos: 0,
            buf: [0; XL_HEADER_LEN],
            blen: 0,
            bstart: 0,
            domain: None,
            checkpoint: 1,
            complete: 0,
            post_suspend_sent: false,
            post_suspend_pending: false,
            dead: None,
        }
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn pad_of(len: u32) -> u8 {
    ((8 - (len % 8)) % 8) as u8
}

impl Parser {
    pub fn new() -> Self {
        Parser::default()
    }

    /// Feeds the next chunk of the stream; appends the events it completes to `events`.
    pub fn feed(&mut self, data: &[u8], events: &mut Vec<Event>) -> Result<(), StreamError> {
        if let Some(e) = &self.dead {
            return Err(e.clone());
        }
        let r = self.feed_inner(data, events);
        if let Err(e) = &r {
            self.dead = Some(e.clone());
        }
        r
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Number of the last complete checkpoint (0 before the first one).
    pub fn checkpoints_complete(&self) -> u64 {
        self.complete
    }

    /// The guest type from the libxc domain header, once read.
    pub fn domain_type(&self) -> Option<DomainType> {
        self.domain
    }

    /// The layer whose records are being read (the xl and libxl headers count as libxl).
    pub fn layer(&self) -> Layer {
        match (self.state, self.phase) {
            (State::LibxcImageHeader | State::LibxcDomainHeader, _) => Layer::Libxc,
            (_, Phase::Libxc) => Layer::Libxc,
            _ => Layer::Libxl,
        }
    }

    /// True once libxl END has been read (a plain stream finished).
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// The error that killed the parser, if any.
    pub fn error(&self) -> Option<&StreamError> {
        self.dead.as_ref()
    }

    /// End-of-input check: `Ok` if the input so far ends on a record boundary (or after
    /// libxl END); an error naming the header or record the input stops inside of.
    /// Ending between records is not an error here: a Remus stream stops wherever the
    /// primary died, and which checkpoints are complete is `checkpoints_complete()`.
    pub fn finish(&self) -> Result<(), StreamError> {
        if let Some(e) = &self.dead {
            return Err(e.clone());
        }
        let pos = self.pos;
        Err(match self.state {
            State::Finished => return Ok(()),
            State::RecordHeader if self.blen == 0 => return Ok(()),
            _ if pos == 0 => StreamError::Empty { pos },
            State::XlSkip { left, .. } => StreamError::TruncatedConfig { pos, left },
            State::RecordBody {
                cur,
                body_left,
                pad_left,
            } => StreamError::TruncatedRecord {
                pos,
                record: cur.id(),
                start: cur.start,
                body_left,
                pad_left,
            },
            s => StreamError::TruncatedPart {
                pos,
                part: s.part().unwrap_or(Part::RecordHeader),
                start: self.bstart,
                have: self.blen,
                need: s.need(),
            },
        })
    }

    fn feed_inner(&mut self, mut data: &[u8], ev: &mut Vec<Event>) -> Result<(), StreamError> {
        while !data.is_empty() {
            if self.post_suspend_pending {
                self.post_suspend_pending = false;
                self.post_suspend_sent = true;
                ev.push(Event::PostSuspendStart {
                    checkpoint: self.checkpoint,
                    pos: self.pos,
                });
            }
            let used = match self.state {
                State::Finished => return Err(StreamError::AfterEnd { pos: self.pos }),
                State::XlSkip { left, config_len } => self.skip_config(data, left, config_len, ev),
                State::RecordBody {
                    cur,
                    body_left,
                    pad_left,
                } => self.skip_body(data, cur, body_left, pad_left, ev)?,
                s => self.buffer(data, s, ev)?,
            };
            data = &data[used..];
        }
        Ok(())
    }

    /// Skips the xl config and the rest of the optional data. Returns the bytes used.
    fn skip_config(
        &mut self,
        data: &[u8],
        left: u64,
        config_len: u32,
        ev: &mut Vec<Event>,
    ) -> usize {
        let n = (data.len() as u64).min(left);
        self.pos += n;
        let left = left - n;
        if left == 0 {
            ev.push(Event::XlHeader {
                end: self.pos,
                config_len,
            });
            self.begin_buffer(State::LibxlHeader);
        } else {
            self.state = State::XlSkip { left, config_len };
        }
        n as usize
    }

    /// Skips a record body by counting, then checks its padding byte by byte.
    fn skip_body(
        &mut self,
        data: &[u8],
        cur: Current,
        body_left: u64,
        pad_left: u8,
        ev: &mut Vec<Event>,
    ) -> Result<usize, StreamError> {
        let (used, body_left, pad_left) = if body_left > 0 {
            let n = (data.len() as u64).min(body_left);
            (n as usize, body_left - n, pad_left)
        } else {
            if data[0] != 0 {
                return Err(StreamError::Padding {
                    pos: self.pos,
                    byte: data[0],
                    record_start: cur.start,
                });
            }
            (1, 0, pad_left - 1)
        };
        self.pos += used as u64;
        self.state = State::RecordBody {
            cur,
            body_left,
            pad_left,
        };
        if body_left == 0 && pad_left == 0 {
            self.record_complete(cur, ev);
        }
        Ok(used)
    }

    /// Buffers the bytes of a fixed-size part; checks it once whole.
    fn buffer(&mut self, data: &[u8], s: State, ev: &mut Vec<Event>) -> Result<usize, StreamError> {
        let need = s.need();
        let before = self.blen;
        let n = (need - self.blen).min(data.len());
        self.buf[self.blen..self.blen + n].copy_from_slice(&data[..n]);
        self.blen += n;
        self.pos += n as u64;
        if s == State::RecordHeader && before < 4 && self.blen >= 4 {
            self.record_type_known(ev);
        }
        if self.blen == need {
            self.header_complete(s, ev)?;
        }
        Ok(n)
    }

    fn begin_buffer(&mut self, s: State) {
        self.state = s;
        self.blen = 0;
        self.bstart = self.pos;
    }

    /// A buffered part is whole: check it and move on.
    fn header_complete(&mut self, s: State, ev: &mut Vec<Event>) -> Result<(), StreamError> {
        let b = self.buf;
        let at = self.bstart;
        match s {
            State::XlFixed => match headers::xl_fixed(&b, at)? {
                0 => self.xl_header_done(0, ev),
                opt_len => self.begin_buffer(State::XlConfigLen { opt_len }),
            },
            State::XlConfigLen { opt_len } => {
                let (config_len, left) = headers::xl_config_len(&b, at, opt_len)?;
                if left == 0 {
                    self.xl_header_done(config_len, ev);
                } else {
                    self.state = State::XlSkip { left, config_len };
                    self.blen = 0;
                }
            }
            State::LibxlHeader => {
                headers::libxl(&b, at)?;
                self.phase = Phase::LibxlStart;
                self.begin_buffer(State::RecordHeader);
            }
            State::LibxcImageHeader => {
                headers::libxc_image(&b, at)?;
                self.begin_buffer(State::LibxcDomainHeader);
            }
            State::LibxcDomainHeader => {
                self.domain = Some(headers::libxc_domain(&b, at)?);
                self.phase = Phase::Libxc;
                self.begin_buffer(State::RecordHeader);
            }
            State::RecordHeader => self.record_header_complete(ev)?,
            State::XlSkip { .. } | State::RecordBody { .. } | State::Finished => {}
        }
        Ok(())
    }

    fn xl_header_done(&mut self, config_len: u32, ev: &mut Vec<Event>) {
        ev.push(Event::XlHeader {
            end: self.pos,
            config_len,
        });
        self.begin_buffer(State::LibxlHeader);
    }

    fn phase_layer(&self) -> Layer {
        if self.phase == Phase::Libxc {
            Layer::Libxc
        } else {
            Layer::Libxl
        }
    }

    /// The 4-byte type field of a record header has arrived.
    fn record_type_known(&mut self, ev: &mut Vec<Event>) {
        let rtype = le32(&self.buf, 0);
        if self.phase == Phase::Libxc
            && !self.post_suspend_sent
            && (is_end_of_checkpoint_record(rtype) || rtype == libxc_type::CHECKPOINT)
        {
            // Only checkpoint 1 gets here: later ones are started by CHECKPOINT_END.
            self.post_suspend_sent = true;
            ev.push(Event::PostSuspendStart {
                checkpoint: self.checkpoint,
                pos: self.bstart,
            });
        }
    }

    fn record_header_complete(&mut self, ev: &mut Vec<Event>) -> Result<(), StreamError> {
        let cur = Current {
            layer: self.phase_layer(),
            rtype: le32(&self.buf, 0),
            start: self.bstart,
            body_len: le32(&self.buf, 4),
        };
        let hvm = self.domain == Some(DomainType::X86Hvm);
        records::check(self.phase, hvm, cur)?;
        self.blen = 0;
        self.state = State::RecordBody {
            cur,
            body_left: u64::from(cur.body_len),
            pad_left: pad_of(cur.body_len),
        };
        if cur.body_len == 0 {
            self.record_complete(cur, ev);
        }
        Ok(())
    }

    fn record_complete(&mut self, c: Current, ev: &mut Vec<Event>) {
        let end = self.pos;
        ev.push(Event::Record {
            layer: c.layer,
            rtype: c.rtype,
            start: c.start,
            body_len: c.body_len,
            end,
        });
        let optional = c.rtype & REC_TYPE_OPTIONAL != 0;
        let mut next = State::RecordHeader;
        if !optional {
            match (self.phase, c.rtype) {
                (Phase::LibxlStart, libxl_type::LIBXC_CONTEXT) => {
                    next = State::LibxcImageHeader;
                }
                (Phase::LibxlCheckpoint, libxl_type::CHECKPOINT_END) => {
                    ev.push(Event::CheckpointComplete {
                        checkpoint: self.checkpoint,
                        end,
                    });
                    self.complete = self.checkpoint;
                    self.checkpoint += 1;
                    self.post_suspend_sent = false;
                    self.post_suspend_pending = true;
                    self.phase = Phase::Libxc;
                }
                (Phase::LibxlTail, libxl_type::END) => {
                    ev.push(Event::End { end });
                    next = State::Finished;
                }
                (Phase::Libxc, libxc_type::CHECKPOINT) => {
                    ev.push(Event::LibxcCheckpoint {
                        checkpoint: self.checkpoint,
                        end,
                    });
                    self.phase = Phase::LibxlCheckpoint;
                }
                (Phase::Libxc, libxc_type::END) => {
                    self.phase = Phase::LibxlTail;
                }
                _ => {}
            }
        }
        self.begin_buffer(next);
    }
}
/// Renders events one per line (for test failure messages and debugging).
pub fn render_events(events: &[Event]) -> String {
    let mut s = String::new();
    for e in events {
        let _ = writeln!(s, "{e:?}");
    }
    s
}

#[cfg(test)]
mod tests;
