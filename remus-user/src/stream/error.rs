//! What can be wrong with a stream: one variant per kind, each with the offset it refers
//! to. Code and tests match the variants; the messages are for people.
//!
//! Owns: [`StreamError`] and the enums naming header fields ([`Field`]), record rules
//! ([`Rule`]) and header parts ([`Part`]). Never touches: parsing itself.
use super::{
    LIBXC_ID, LIBXL_IDENT, LIBXL_VERSION, Layer, XL_BYTEORDER, XL_MAGIC, XL_OPTIONAL_DATA_MAX,
    type_name,
};

/// A header field that holds a value the stream may not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// `found`: the first byte that differs from the magic.
    XlMagic,
    XlByteOrder,
    /// `found`: the unknown bits.
    XlMandatoryFlags,
    /// `found`: the mandatory flags, which lack STREAMv2.
    XlLegacyV1,
    /// `found`: the optional data length, above the limit.
    XlOptionalDataLen,
    /// `found`: the optional data length, too short for the config length.
    XlOptionalDataShort,
    LibxlIdent,
    LibxlVersion,
    /// `found`: the options (big-endian bit set).
    LibxlBigEndian,
    LibxcMarker,
    LibxcId,
    LibxcVersion,
    /// `found`: the options (big-endian bit set).
    LibxcBigEndian,
    DomainType,
    PageShift,
}

impl Field {
    fn describe(self, found: u64) -> String {
        match self {
            Field::XlMagic => format!(
                "wrong xl magic: byte {found:#04x} where {:?} was expected",
                String::from_utf8_lossy(XL_MAGIC)
            ),
            Field::XlByteOrder => format!(
                "wrong xl byte-order marker {found:#010x} (expected {XL_BYTEORDER:#010x}, little-endian)"
            ),
            Field::XlMandatoryFlags => format!("unknown xl mandatory flags {found:#x}"),
            Field::XlLegacyV1 => format!(
                "xl mandatory flags {found:#x} lack STREAMv2: a legacy (v1) stream is not supported"
            ),
            Field::XlOptionalDataLen => {
                format!("xl optional data length {found} exceeds {XL_OPTIONAL_DATA_MAX}")
            }
            Field::XlOptionalDataShort => {
                format!("xl optional data length {found} is too short for the u32 config length")
            }
            Field::LibxlIdent => format!(
                "wrong libxl ident {found:#018x} (expected {LIBXL_IDENT:#018x}, \"LibxlFmt\")"
            ),
            Field::LibxlVersion => {
                format!("unsupported libxl stream version {found} (expected {LIBXL_VERSION})")
            }
            Field::LibxlBigEndian => format!(
                "libxl options {found:#x}: big-endian libxl streams are not supported (libxl refuses them too)"
            ),
            Field::LibxcMarker => {
                format!("wrong libxc image marker {found:#018x} (expected all ones)")
            }
            Field::LibxcId => {
                format!("wrong libxc image id {found:#010x} (expected {LIBXC_ID:#010x}, \"XENF\")")
            }
            Field::LibxcVersion => {
                format!("unsupported libxc image version {found} (expected 2 or 3)")
            }
            Field::LibxcBigEndian => format!(
                "libxc options {found:#x}: big-endian libxc images are not supported (libxc refuses them too)"
            ),
            Field::DomainType => {
                format!("unsupported libxc domain type {found} (expected 1 x86 PV or 2 x86 HVM)")
            }
            Field::PageShift => {
                format!("libxc page shift {found} is not 12 (x86 has 4 KiB pages)")
            }
        }
    }
}

/// Why a record type may not appear where it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    BeforeLibxcContext,
    EmulatorInPv,
    CheckpointEndAfterEnd,
    EndInsideCheckpoint,
    LibxcContextTwice,
    ColoOnly,
    UnknownLibxl,
    PvInHvm,
    HvmInPv,
    Toolstack,
    DirtyPfnList,
    UnknownLibxc,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Rule::BeforeLibxcContext => {
                "before LIBXC_CONTEXT only LIBXC_CONTEXT and optional records may appear"
            }
            Rule::EmulatorInPv => "emulator records belong to HVM guests, this is a PV stream",
            Rule::CheckpointEndAfterEnd => "CHECKPOINT_END after a libxc END (plain stream)",
            Rule::EndInsideCheckpoint => "END inside a checkpoint (libxc ended it with CHECKPOINT)",
            Rule::LibxcContextTwice => "LIBXC_CONTEXT appears only once, at the start",
            Rule::ColoOnly => "CHECKPOINT_STATE is COLO-only",
            Rule::UnknownLibxl => "unknown mandatory libxl record type",
            Rule::PvInHvm => "a PV record in an HVM stream",
            Rule::HvmInPv => "an HVM record in a PV stream",
            Rule::Toolstack => "the deprecated TOOLSTACK record is not accepted by Xen 4.17",
            Rule::DirtyPfnList => "CHECKPOINT_DIRTY_PFN_LIST only travels backup to primary (COLO)",
            Rule::UnknownLibxc => "unknown mandatory libxc record type",
        })
    }
}

/// A fixed-size part of the stream that is read whole before it is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    XlHeader,
    XlConfigLen,
    LibxlHeader,
    LibxcImageHeader,
    LibxcDomainHeader,
    RecordHeader,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Part::XlHeader => "the xl header",
            Part::XlConfigLen => "the xl config length",
            Part::LibxlHeader => "the libxl header",
            Part::LibxcImageHeader => "the libxc image header",
            Part::LibxcDomainHeader => "the libxc domain header",
            Part::RecordHeader => "a record header",
        })
    }
}

/// A record as errors name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordId {
    pub layer: Layer,
    pub rtype: u32,
}

impl std::fmt::Display for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} {} record (type {:#x})",
            self.layer,
            type_name(self.layer, self.rtype),
            self.rtype
        )
    }
}

/// What is wrong with the stream, and at which byte (`pos`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("at byte {pos}: {}", field.describe(*found))]
    BadField { pos: u64, field: Field, found: u64 },
    #[error(
        "at byte {pos}: xl config length {config_len} exceeds the {left} bytes of optional data left"
    )]
    ConfigTooLong {
        pos: u64,
        config_len: u32,
        left: u32,
    },
    #[error("at byte {pos}: {record} is not allowed here: {rule}")]
    Misplaced {
        pos: u64,
        record: RecordId,
        rule: Rule,
    },
    #[error("at byte {pos}: {record} body length {len} exceeds the 128 MiB limit")]
    RecordTooLong {
        pos: u64,
        record: RecordId,
        len: u32,
    },
    #[error("at byte {pos}: {record} must have body length 0, has {len}")]
    MarkerWithBody {
        pos: u64,
        record: RecordId,
        len: u32,
    },
    #[error("at byte {pos}: {record} body length {len} is shorter than its 8-byte emulator header")]
    EmulatorTooShort {
        pos: u64,
        record: RecordId,
        len: u32,
    },
    #[error("at byte {pos}: padding byte is {byte:#04x}, not zero (record at byte {record_start})")]
    Padding {
        pos: u64,
        byte: u8,
        record_start: u64,
    },
    #[error("at byte {pos}: data after the libxl END record")]
    AfterEnd { pos: u64 },
    #[error("at byte {pos}: empty stream: the xl header is missing")]
    Empty { pos: u64 },
    #[error(
        "at byte {pos}: truncated inside {part} that starts at byte {start}: {have} of {need} bytes read"
    )]
    TruncatedPart {
        pos: u64,
        part: Part,
        start: u64,
        have: usize,
        need: usize,
    },
    #[error(
        "at byte {pos}: truncated inside the xl config: {left} more bytes of optional data expected"
    )]
    TruncatedConfig { pos: u64, left: u64 },
    #[error(
        "at byte {pos}: truncated inside the {record} that starts at byte {start}: \
         {body_left} more body bytes and {pad_left} padding bytes expected"
    )]
    TruncatedRecord {
        pos: u64,
        record: RecordId,
        start: u64,
        body_left: u64,
        pad_left: u8,
    },
}

impl StreamError {
    /// The stream offset the error refers to.
    pub fn pos(&self) -> u64 {
        match *self {
            StreamError::BadField { pos, .. }
            | StreamError::ConfigTooLong { pos, .. }
            | StreamError::Misplaced { pos, .. }
            | StreamError::RecordTooLong { pos, .. }
            | StreamError::MarkerWithBody { pos, .. }
            | StreamError::EmulatorTooShort { pos, .. }
            | StreamError::Padding { pos, .. }
            | StreamError::AfterEnd { pos }
            | StreamError::Empty { pos }
            | StreamError::TruncatedPart { pos, .. }
            | StreamError::TruncatedConfig { pos, .. }
            | StreamError::TruncatedRecord { pos, .. } => pos,
        }
    }

    pub(super) fn field(pos: u64, field: Field, found: impl Into<u64>) -> StreamError {
        StreamError::BadField {
            pos,
            field,
            found: found.into(),
        }
    }
}
