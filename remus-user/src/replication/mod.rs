//! The wire protocol between `remus relay send` (primary) and `remus relay receive` (backup).
//!
//! Owns: framing, message kinds, protocol versions, the pre-shared-key handshake (`auth`),
//! key derivation (`kdf`) and the sealed channel (`seal`). Never touches: the Xen
//! stream's grammar (`stream`), page compression (`compress`), the output buffer,
//! processes or sockets other than the one stream it is handed.
//!
//! ```text
//!  primary (relay send)                              backup (relay receive)
//!  ───────────────────                               ──────────────────────
//!  HELLO{versions, codec, cache, probe?, nonce_p} ──►            (plain, CRC)
//!                                  ◄──────────────── CHALLENGE{version, nonce_b,
//!                                                              mac_b = H(k, "backup"‖th)}
//!  th = SHA-256(HELLO ‖ version ‖ nonce_b); verify mac_b (else ABORT, exit 2)
//!  AUTH{mac_p = H(k, "primary"‖th)} ────────────────►            (plain, CRC)
//!                                                     verify mac_p (else ABORT, log, drop)
//!  both: keys = HKDF(k, nonce_p‖nonce_b, th), one per direction (`kdf`)
//!  ═══════════════ from here every frame is sealed (AES-256-GCM, counter nonce) ════════
//!                                  ◄──────────────── PROBE_OK{busy}, close   (HELLO said
//!                                                     "probe": no session, no receiver)
//!                                  ◄──────────────── WELCOME   (or ABORT "busy")
//!                                                     start `xl migrate-receive -r -e`
//!                                  ◄──────────────── BANNER("xl migration receiver ready…\n")
//!  banner → xl (stdout)
//!  DATA / PAGE_DATA (checkpoint 1) ─────────────────► write straight through
//!                                  ◄──────────────── ACK(1)   (all of checkpoint 1 written)
//!  DATA / PAGE_DATA (checkpoint N) ─────────────────► buffer; at CHECKPOINT_END write all
//!                                  ◄──────────────── ACK(N)
//!  HEARTBEAT ◄──────────────────────────────────────► HEARTBEAT   (every interval, both ways)
//!  CLOSE{checkpoints, finished}    ─────────────────► xl's stream ended: close receiver's stdin
//!                                  ◄──────────────── CLOSE
//!  DISCARD                         ─────────────────► protection ended: receiver killed before
//!                                                     its stream ends, the copy destroyed
//!                                  ◄──────────────── DISCARDED{checkpoint, copy_destroyed}
//!  ABORT{reason}                   ◄────────────────► either side gives up (reason is logged)
//! ```
//!
//! H is HMAC-SHA256 keyed with the pre-shared key file. Every frame is a 16-byte header
//! (`magic "RMUS"`, kind, flags, payload length, check) followed by the payload. The
//! length is checked against [`MAX_PAYLOAD`] before anything is allocated. The handshake's
//! frames are plain: their check is a CRC-32 of header and payload. Every later frame is
//! sealed (`seal`): flag [`seal::FLAG_SEALED`], the check field holds the frame counter,
//! and the payload is encrypted and authenticated with the header as associated data. A
//! frame that fails to open ends the session: nothing after it is used.
//!
//! Versions: the primary announces the range it speaks in HELLO, the backup picks the
//! highest common one or refuses naming both ranges. Version 3 seals every frame after
//! the handshake; versions 1 (raw data) and 2 (compressed PAGE_DATA) sent frames in the
//! clear and are refused, since accepting them would let a man in the middle downgrade a
//! session to plaintext.
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::compress::Codec;

pub mod auth;
pub mod kdf;
pub mod seal;

pub use auth::{
    ClientConfig, Key, ProbeAnswer, ServerConfig, Session, client_handshake, client_probe,
    server_handshake,
};
pub use seal::{Keys, Opener, Sealer};

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"RMUS";
/// The protocol version this build speaks best.
pub const VERSION: u16 = 3;
/// The oldest version this build accepts: the first sealed one (an unsealed peer is
/// refused, or a man in the middle could downgrade the session to plaintext).
pub const MIN_VERSION: u16 = VERSION_SEALED;
/// First version that allows `PageData` frames.
pub const VERSION_COMPRESSION: u16 = 2;
/// First version whose frames after the handshake are sealed.
pub const VERSION_SEALED: u16 = 3;
/// Largest payload accepted, checked before allocating. A libxc PAGE_DATA record is at
/// most 1024 pages (4 MiB + 8 KiB of PFNs); raw data is sent in chunks of [`DATA_CHUNK`].
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Raw stream bytes are sent in frames of at most this many bytes.
pub const DATA_CHUNK: usize = 1 << 20;
/// The banner is a line; longer is refused.
pub const MAX_BANNER: usize = 256;
/// Abort reasons are truncated to this many bytes.
pub const MAX_REASON: usize = 1024;
/// Size of the frame header.
pub const HEADER_LEN: usize = std::mem::size_of::<FrameHeader>();

/// Frame kinds. `Invalid = 0` so zeroed or unknown bytes never parse as a real kind.
/// New kinds are added at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    Invalid = 0,
    Hello = 1,
    Challenge = 2,
    Auth = 3,
    Welcome = 4,
    Banner = 5,
    Data = 6,
    PageData = 7,
    Ack = 8,
    Heartbeat = 9,
    Close = 10,
    Abort = 11,
    /// Backup → primary, instead of WELCOME when HELLO asked for a probe.
    ProbeOk = 12,
    /// Primary → backup: protection ended, discard the copy (no failover).
    Discard = 13,
    /// Backup → primary: the copy is discarded (its receiver is dead).
    Discarded = 14,
}

impl Kind {
    /// Maps wire bytes to a kind; anything unknown is `Invalid`.
    pub fn from_wire(v: u16) -> Kind {
        match v {
            1 => Kind::Hello,
            2 => Kind::Challenge,
            3 => Kind::Auth,
            4 => Kind::Welcome,
            5 => Kind::Banner,
            6 => Kind::Data,
            7 => Kind::PageData,
            8 => Kind::Ack,
            9 => Kind::Heartbeat,
            10 => Kind::Close,
            11 => Kind::Abort,
            12 => Kind::ProbeOk,
            13 => Kind::Discard,
            14 => Kind::Discarded,
            _ => Kind::Invalid,
        }
    }
}

/// The 16-byte frame header, little-endian.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FrameHeader {
    pub magic: [u8; 4],
    pub kind: U16,
    /// 0 for a plain frame, [`seal::FLAG_SEALED`] for a sealed one; other bits reserved.
    pub flags: U16,
    pub len: U32,
    /// Plain frame: CRC-32 (IEEE) of the header with this field zeroed, then the payload.
    /// Sealed frame: the low 32 bits of the direction's frame counter.
    pub crc: U32,
}
const _: () = assert!(std::mem::size_of::<FrameHeader>() == 16);

/// HELLO payload (primary → backup, first message). The first four bytes (the version
/// range) keep their place in every version so any version can refuse any other clearly.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct HelloWire {
    pub max_version: U16,
    pub min_version: U16,
    /// 0 = none, 1 = lz4 (page data, XOR against the last copy of the page).
    pub codec: u8,
    /// [`HELLO_PROBE`]; other bits are refused.
    pub flags: u8,
    pub reserved: [u8; 2],
    /// PFN cache size both sides must use for the XOR base.
    pub cache_pages: U32,
    pub nonce: [u8; 32],
}

/// HELLO flag: a probe (is the backup there, does it hold the key?): the backup answers
/// PROBE_OK instead of WELCOME and starts nothing.
pub const HELLO_PROBE: u8 = 1;

/// CHALLENGE payload (backup → primary).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ChallengeWire {
    pub version: U16,
    pub reserved: [u8; 6],
    pub nonce: [u8; 32],
    pub mac: [u8; 32],
}

/// CLOSE payload.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CloseWire {
    /// Last checkpoint the sender saw complete.
    pub checkpoints: U64,
    /// 1 if the stream ended with libxl END (a plain migration), 0 otherwise.
    pub finished: u8,
    pub reserved: [u8; 7],
}

/// PROBE_OK payload.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ProbeOkWire {
    /// 1 if another primary is being replicated there now (a session would be refused).
    pub busy: u8,
    pub reserved: [u8; 7],
}

/// DISCARDED payload.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DiscardedWire {
    /// Last checkpoint the backup had whole when it killed the receiver.
    pub checkpoint: U64,
    /// 1 if the incoming domain was destroyed (or none had been built yet).
    pub copy_destroyed: u8,
    pub reserved: [u8; 7],
}

/// One decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Challenge {
        version: u16,
        nonce: [u8; 32],
        mac: [u8; 32],
    },
    Auth {
        mac: [u8; 32],
    },
    Welcome,
    Banner(Vec<u8>),
    /// Raw stream bytes, in order.
    Data(Vec<u8>),
    /// One complete libxc PAGE_DATA record, encoded by `compress::PageEncoder`.
    PageData(Vec<u8>),
    /// The backup holds checkpoint N completely (written to its receiver).
    Ack {
        checkpoint: u64,
    },
    Heartbeat {
        seq: u64,
    },
    /// Orderly end: the primary's stream ended (or the backup answers a CLOSE).
    Close {
        checkpoints: u64,
        finished: bool,
    },
    /// Disorderly end: the sender gives up; `reason` is for the log.
    Abort {
        reason: String,
    },
    /// The answer to a probe: the backup holds the key (its proof verified, ours too).
    ProbeOk {
        busy: bool,
    },
    /// Protection ended: kill the receiver before its stream ends, destroy the copy.
    Discard,
    /// The copy is discarded: its receiver is dead, nothing can activate it.
    Discarded {
        checkpoint: u64,
        copy_destroyed: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub max_version: u16,
    pub min_version: u16,
    pub codec: Codec,
    pub cache_pages: u32,
    /// A probe, not a session ([`HELLO_PROBE`]).
    pub probe: bool,
    pub nonce: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error(
        "not a remus relay frame (magic {found:02x?}, expected \"RMUS\"): is the peer a remus relay?"
    )]
    BadMagic { found: [u8; 4] },
    #[error("unknown frame kind {0} (corrupted stream or a newer peer)")]
    UnknownKind(u16),
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversize { len: u32, max: u32 },
    #[error("corrupted {kind:?} frame: CRC {found:#010x}, expected {expected:#010x}")]
    Crc {
        kind: Kind,
        expected: u32,
        found: u32,
    },
    #[error("malformed {kind:?} frame: {problem}")]
    BadPayload { kind: Kind, problem: PayloadProblem },
    #[error(
        "protocol version mismatch: peer speaks {theirs_min}..={theirs_max}, this build speaks {ours_min}..={ours_max}; upgrade one side"
    )]
    Version {
        ours_min: u16,
        ours_max: u16,
        theirs_min: u16,
        theirs_max: u16,
    },
    #[error("unknown page-data codec {0} in HELLO (this build speaks 0 none, 1 lz4)")]
    UnknownCodec(u8),
    #[error("authentication failed: {0}")]
    AuthFailed(Prover),
    #[error(
        "unsealed {kind:?} frame after the handshake: every frame must be sealed (a frame injected on the way, or a peer that does not seal)"
    )]
    Unsealed { kind: Kind },
    #[error("sealed {kind:?} frame where a plain handshake frame was due")]
    SealedTooEarly { kind: Kind },
    #[error(
        "sealed {kind:?} frame #{found} arrived where #{expected} was due: {}",
        seal::misorder(*found, *expected)
    )]
    OutOfOrder {
        kind: Kind,
        found: u32,
        expected: u32,
    },
    #[error(
        "sealed {kind:?} frame #{seq} failed authentication: altered on the way, or sealed with other keys"
    )]
    Forged { kind: Kind, seq: u64 },
    #[error("the sealed channel failed at an earlier frame; nothing after it is opened")]
    ChannelFailed,
    #[error("the frame counter is exhausted; the session must be restarted")]
    Exhausted,
    #[error("the connection ended in the middle of a frame ({have} of {want} bytes)")]
    Truncated { have: usize, want: usize },
    #[error("refused by the peer: {0}")]
    Refused(String),
    #[error("protocol error: expected {expected}, got {got:?}")]
    Unexpected { expected: &'static str, got: Kind },
    #[error("key file {path}: {problem}")]
    KeyFile { path: String, problem: KeyProblem },
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// Whose proof of the key did not verify (seen from the side that checked it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Prover {
    #[error(
        "the backup's proof of the key did not verify: the two key files differ (or the handshake was altered on the way)"
    )]
    Backup,
    #[error("the primary's proof of the key did not verify: it does not hold this key")]
    Primary,
}

/// What is wrong with a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyProblem {
    #[error("cannot read it: {0}")]
    Unreadable(io::Error),
    #[error("not a regular file")]
    NotAFile,
    #[error("mode {mode:04o} lets group or others read the key; run `chmod 600 {path}`")]
    Readable { mode: u32, path: String },
    #[error("the key file is empty; create one with `openssl rand -hex 32 > FILE`")]
    Empty,
}

/// What is wrong with a frame's payload (or its header's reserved bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayloadProblem {
    #[error("payload is {got} bytes, expected {expected}")]
    Length { got: usize, expected: usize },
    #[error("payload is {got} bytes, too short for a version")]
    NoVersion { got: usize },
    #[error("payload is {got} bytes, expected at least {min}")]
    TooShort { got: usize, min: usize },
    #[error("{got} bytes exceed the limit of {max}")]
    TooLong { got: usize, max: usize },
    #[error("reserved flags {0:#x} set")]
    ReservedFlags(u16),
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Challenge { .. } => Kind::Challenge,
            Message::Auth { .. } => Kind::Auth,
            Message::Welcome => Kind::Welcome,
            Message::Banner(_) => Kind::Banner,
            Message::Data(_) => Kind::Data,
            Message::PageData(_) => Kind::PageData,
            Message::Ack { .. } => Kind::Ack,
            Message::Heartbeat { .. } => Kind::Heartbeat,
            Message::Close { .. } => Kind::Close,
            Message::Abort { .. } => Kind::Abort,
            Message::ProbeOk { .. } => Kind::ProbeOk,
            Message::Discard => Kind::Discard,
            Message::Discarded { .. } => Kind::Discarded,
        }
    }

    /// Named constructor: an ABORT with a reason truncated to [`MAX_REASON`].
    pub fn abort(reason: impl Into<String>) -> Message {
        let mut reason = reason.into();
        if reason.len() > MAX_REASON {
            let mut cut = MAX_REASON;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        Message::Abort { reason }
    }

    /// Appends the framed message (header + payload) to `out` as a plain frame (CRC).
    /// Only the handshake is sent this way; everything after it goes through a
    /// [`Sealer`].
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        self.encode_payload(out);
        let len = (out.len() - start - HEADER_LEN) as u32;
        let mut hdr = FrameHeader {
            magic: MAGIC,
            kind: (self.kind() as u16).into(),
            flags: 0.into(),
            len: len.into(),
            crc: 0.into(),
        };
        let mut h = crc32fast::Hasher::new();
        h.update(hdr.as_bytes());
        h.update(&out[start + HEADER_LEN..]);
        hdr.crc = h.finalize().into();
        out[start..start + HEADER_LEN].copy_from_slice(hdr.as_bytes());
    }

    /// Appends the payload alone (no header) to `out`.
    pub fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello(h) => out.extend_from_slice(
                HelloWire {
                    max_version: h.max_version.into(),
                    min_version: h.min_version.into(),
                    codec: h.codec.to_wire(),
                    flags: if h.probe { HELLO_PROBE } else { 0 },
                    reserved: [0; 2],
                    cache_pages: h.cache_pages.into(),
                    nonce: h.nonce,
                }
                .as_bytes(),
            ),
            Message::Challenge {
                version,
                nonce,
                mac,
            } => out.extend_from_slice(
                ChallengeWire {
                    version: (*version).into(),
                    reserved: [0; 6],
                    nonce: *nonce,
                    mac: *mac,
                }
                .as_bytes(),
            ),
            Message::Auth { mac } => out.extend_from_slice(mac),
            Message::Welcome | Message::Discard => {}
            Message::Banner(b) | Message::Data(b) | Message::PageData(b) => {
                out.extend_from_slice(b)
            }
            Message::Ack { checkpoint } => out.extend_from_slice(&checkpoint.to_le_bytes()),
            Message::Heartbeat { seq } => out.extend_from_slice(&seq.to_le_bytes()),
            Message::Close {
                checkpoints,
                finished,
            } => out.extend_from_slice(
                CloseWire {
                    checkpoints: (*checkpoints).into(),
                    finished: u8::from(*finished),
                    reserved: [0; 7],
                }
                .as_bytes(),
            ),
            Message::Abort { reason } => out.extend_from_slice(reason.as_bytes()),
            Message::ProbeOk { busy } => out.extend_from_slice(
                ProbeOkWire {
                    busy: u8::from(*busy),
                    reserved: [0; 7],
                }
                .as_bytes(),
            ),
            Message::Discarded {
                checkpoint,
                copy_destroyed,
            } => out.extend_from_slice(
                DiscardedWire {
                    checkpoint: (*checkpoint).into(),
                    copy_destroyed: u8::from(*copy_destroyed),
                    reserved: [0; 7],
                }
                .as_bytes(),
            ),
        }
    }

    /// Decodes one payload of a frame whose header has been checked.
    pub fn decode(kind: Kind, payload: Vec<u8>) -> Result<Message, WireError> {
        let bad = |problem| WireError::BadPayload { kind, problem };
        let exact = |expected: usize, p: &[u8]| {
            if p.len() == expected {
                Ok(())
            } else {
                Err(bad(PayloadProblem::Length {
                    got: p.len(),
                    expected,
                }))
            }
        };
        let at_most = |max: usize, p: &[u8]| {
            if p.len() <= max {
                Ok(())
            } else {
                Err(bad(PayloadProblem::TooLong { got: p.len(), max }))
            }
        };
        Ok(match kind {
            Kind::Invalid => return Err(WireError::UnknownKind(0)),
            Kind::Hello => Message::Hello(decode_hello(&payload)?),
            Kind::Challenge => {
                let w: ChallengeWire = fixed(kind, &payload)?;
                Message::Challenge {
                    version: w.version.get(),
                    nonce: w.nonce,
                    mac: w.mac,
                }
            }
            Kind::Auth => {
                exact(32, &payload)?;
                let mut mac = [0u8; 32];
                mac.copy_from_slice(&payload);
                Message::Auth { mac }
            }
            Kind::Welcome => {
                exact(0, &payload)?;
                Message::Welcome
            }
            Kind::Banner => {
                at_most(MAX_BANNER, &payload)?;
                Message::Banner(payload)
            }
            Kind::Data => Message::Data(payload),
            Kind::PageData => Message::PageData(payload),
            Kind::Ack => {
                exact(8, &payload)?;
                Message::Ack {
                    checkpoint: u64_le(&payload),
                }
            }
            Kind::Heartbeat => {
                exact(8, &payload)?;
                Message::Heartbeat {
                    seq: u64_le(&payload),
                }
            }
            Kind::Close => {
                let w: CloseWire = fixed(kind, &payload)?;
                Message::Close {
                    checkpoints: w.checkpoints.get(),
                    finished: w.finished != 0,
                }
            }
            Kind::Abort => {
                at_most(MAX_REASON, &payload)?;
                Message::Abort {
                    reason: String::from_utf8_lossy(&payload).into_owned(),
                }
            }
            Kind::ProbeOk | Kind::Discard | Kind::Discarded => decode_answer(kind, &payload)?,
        })
    }
}

/// The payloads of a probe's answer and of ending protection.
fn decode_answer(kind: Kind, payload: &[u8]) -> Result<Message, WireError> {
    Ok(match kind {
        Kind::ProbeOk => {
            let w: ProbeOkWire = fixed(kind, payload)?;
            Message::ProbeOk { busy: w.busy != 0 }
        }
        Kind::Discarded => {
            let w: DiscardedWire = fixed(kind, payload)?;
            Message::Discarded {
                checkpoint: w.checkpoint.get(),
                copy_destroyed: w.copy_destroyed != 0,
            }
        }
        Kind::Discard => {
            if !payload.is_empty() {
                return Err(WireError::BadPayload {
                    kind,
                    problem: PayloadProblem::Length {
                        got: payload.len(),
                        expected: 0,
                    },
                });
            }
            Message::Discard
        }
        // `Message::decode` hands only the three kinds above to this.
        other => return Err(WireError::UnknownKind(other as u16)),
    })
}

/// A fixed-size payload of `kind`.
fn fixed<T: FromBytes + KnownLayout + Immutable>(kind: Kind, p: &[u8]) -> Result<T, WireError> {
    T::read_from_bytes(p).map_err(|_| WireError::BadPayload {
        kind,
        problem: PayloadProblem::Length {
            got: p.len(),
            expected: size_of::<T>(),
        },
    })
}

/// HELLO: the version range first, so a version mismatch is reported as such; then the
/// rest (a newer peer may append fields: our prefix is read).
fn decode_hello(payload: &[u8]) -> Result<Hello, WireError> {
    let bad = |problem| WireError::BadPayload {
        kind: Kind::Hello,
        problem,
    };
    if payload.len() < 4 {
        return Err(bad(PayloadProblem::NoVersion { got: payload.len() }));
    }
    let max_version = u16::from_le_bytes([payload[0], payload[1]]);
    let min_version = u16::from_le_bytes([payload[2], payload[3]]);
    if max_version < MIN_VERSION || min_version > VERSION || min_version > max_version {
        return Err(WireError::Version {
            ours_min: MIN_VERSION,
            ours_max: VERSION,
            theirs_min: min_version,
            theirs_max: max_version,
        });
    }
    let (w, _) = HelloWire::read_from_prefix(payload).map_err(|_| {
        bad(PayloadProblem::TooShort {
            got: payload.len(),
            min: size_of::<HelloWire>(),
        })
    })?;
    // An unknown flag would change what the primary asks for: refused, not ignored.
    if w.flags & !HELLO_PROBE != 0 {
        return Err(bad(PayloadProblem::ReservedFlags(u16::from(w.flags))));
    }
    Ok(Hello {
        max_version,
        min_version,
        codec: Codec::from_wire(w.codec).ok_or(WireError::UnknownCodec(w.codec))?,
        cache_pages: w.cache_pages.get(),
        probe: w.flags & HELLO_PROBE != 0,
        nonce: w.nonce,
    })
}

/// A header slice of the wrong size (cannot happen: the callers cut exactly HEADER_LEN).
fn short_header(got: usize) -> WireError {
    WireError::BadPayload {
        kind: Kind::Invalid,
        problem: PayloadProblem::Length {
            got,
            expected: HEADER_LEN,
        },
    }
}

fn u64_le(p: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[..8]);
    u64::from_le_bytes(b)
}

/// Checks a header: magic, kind, flags, size limit. Returns the kind and payload length
/// (for a sealed frame: encrypted payload and tag).
pub fn check_header(hdr: &FrameHeader) -> Result<(Kind, u32), WireError> {
    if hdr.magic != MAGIC {
        return Err(WireError::BadMagic { found: hdr.magic });
    }
    let raw = hdr.kind.get();
    let kind = Kind::from_wire(raw);
    if kind == Kind::Invalid {
        return Err(WireError::UnknownKind(raw));
    }
    if hdr.flags.get() & !seal::FLAG_SEALED != 0 {
        return Err(WireError::BadPayload {
            kind,
            problem: PayloadProblem::ReservedFlags(hdr.flags.get()),
        });
    }
    let len = hdr.len.get();
    if len > MAX_PAYLOAD {
        return Err(WireError::Oversize {
            len,
            max: MAX_PAYLOAD,
        });
    }
    Ok((kind, len))
}

/// Reads and checks the header in `bytes` (exactly [`HEADER_LEN`] of them).
fn parse_header(bytes: &[u8]) -> Result<(FrameHeader, Kind, u32), WireError> {
    let hdr = FrameHeader::read_from_bytes(bytes).map_err(|_| short_header(bytes.len()))?;
    let (kind, len) = check_header(&hdr)?;
    Ok((hdr, kind, len))
}

/// Checks a plain frame's CRC (and that it is not a sealed frame).
fn check_crc(hdr: &FrameHeader, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
    if hdr.flags.get() & seal::FLAG_SEALED != 0 {
        return Err(WireError::SealedTooEarly { kind });
    }
    let mut zeroed = *hdr;
    zeroed.crc = 0.into();
    let mut h = crc32fast::Hasher::new();
    h.update(zeroed.as_bytes());
    h.update(payload);
    let found = h.finalize();
    if found != hdr.crc.get() {
        return Err(WireError::Crc {
            kind,
            expected: hdr.crc.get(),
            found,
        });
    }
    Ok(())
}

/// Decodes one plain frame from the front of `buf` (synchronous; for tests and tools).
/// Returns `None` when `buf` holds less than one whole frame, else the message and the
/// number of bytes consumed.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Message, usize)>, WireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let (hdr, kind, len) = parse_header(&buf[..HEADER_LEN])?;
    let total = HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let payload = &buf[HEADER_LEN..total];
    check_crc(&hdr, kind, payload)?;
    Ok(Some((Message::decode(kind, payload.to_vec())?, total)))
}

/// Reads one whole frame: header, checks (size before allocating), payload.
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(FrameHeader, Kind, Vec<u8>), WireError> {
    let mut hb = [0u8; HEADER_LEN];
    read_exact_or(r, &mut hb, 0).await?;
    let (hdr, kind, len) = parse_header(&hb)?;
    let mut payload = vec![0u8; len as usize];
    read_exact_or(r, &mut payload, HEADER_LEN).await?;
    Ok((hdr, kind, payload))
}

/// `read_exact`, with an end of stream named: `Closed` at a frame boundary,
/// `Truncated` inside a frame (`before` bytes of it were read already).
async fn read_exact_or<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    before: usize,
) -> Result<(), WireError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).await {
            Ok(0) if got + before == 0 => return Err(WireError::Closed),
            Ok(0) => {
                return Err(WireError::Truncated {
                    have: before + got,
                    want: before + buf.len(),
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(())
}

/// Reads one plain frame (the handshake): header, checks, payload, CRC, decode.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, WireError> {
    let (hdr, kind, payload) = read_frame(r).await?;
    check_crc(&hdr, kind, &payload)?;
    Message::decode(kind, payload)
}

/// Reads one frame that may be sealed (the end of the handshake, where a refusal from a
/// backup that found no key is plain). Returns the message and whether it was sealed.
pub async fn read_sealed_or_plain<R: AsyncRead + Unpin>(
    r: &mut R,
    opener: &Opener,
) -> Result<(Message, bool), WireError> {
    let (hdr, kind, mut payload) = read_frame(r).await?;
    if hdr.flags.get() & seal::FLAG_SEALED == 0 {
        check_crc(&hdr, kind, &payload)?;
        return Ok((Message::decode(kind, payload)?, false));
    }
    let n = opener.open(&hdr, kind, &mut payload)?;
    payload.truncate(n);
    Ok((Message::decode(kind, payload)?, true))
}

/// A cancel-safe reader of sealed frames: bytes are kept across cancelled `next` calls,
/// so it can be raced against timers (heartbeat checks) without losing its place in the
/// stream. Every frame must open with the peer's key at the next counter; the first that
/// does not ends the reader.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    opener: Opener,
    /// Bytes read from the connection so far.
    pub bytes_read: u64,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, opener: Opener) -> Self {
        FrameReader {
            inner,
            buf: Vec::with_capacity(256 * 1024),
            start: 0,
            opener,
            bytes_read: 0,
        }
    }

    /// Opens the whole sealed frame at the front of the buffer, if there is one. No
    /// `await` between opening (in place) and consuming: cancel-safe.
    fn take_frame(&mut self) -> Result<Option<Message>, WireError> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let (hdr, kind, len) = parse_header(&avail[..HEADER_LEN])?;
        let total = HEADER_LEN + len as usize;
        if avail.len() < total {
            return Ok(None);
        }
        let body = self.start + HEADER_LEN..self.start + total;
        let n = self.opener.open(&hdr, kind, &mut self.buf[body.clone()])?;
        let payload = self.buf[body.start..body.start + n].to_vec();
        self.start += total;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Message::decode(kind, payload).map(Some)
    }

    /// The next message. Cancel-safe.
    pub async fn next(&mut self) -> Result<Message, WireError> {
        loop {
            if let Some(m) = self.take_frame()? {
                return Ok(m);
            }
            // Compact before growing, so a long stream does not grow the buffer.
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            // Reserve what the pending frame needs (its size was checked already).
            let pending = if self.buf.len() >= HEADER_LEN {
                HEADER_LEN
                    + u32::from_le_bytes([self.buf[8], self.buf[9], self.buf[10], self.buf[11]])
                        as usize
            } else {
                HEADER_LEN
            };
            self.buf
                .reserve(pending.saturating_sub(self.buf.len()).max(64 * 1024));
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                // A cut at a frame boundary looks like a closed connection; inside a
                // frame it is named (either way the peer is lost: no sealed CLOSE came).
                if self.buf.is_empty() {
                    return Err(WireError::Closed);
                }
                return Err(WireError::Truncated {
                    have: self.buf.len(),
                    want: pending,
                });
            }
            self.bytes_read += n as u64;
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Writes one plain message (no flush): the handshake only.
pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, m: &Message) -> Result<(), WireError> {
    let mut buf = Vec::with_capacity(HEADER_LEN + 64);
    m.encode(&mut buf);
    w.write_all(&buf).await?;
    Ok(())
}

/// Writes one plain message and flushes: the handshake only.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, m: &Message) -> Result<(), WireError> {
    write_message(w, m).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: Message) {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        let (back, used) = decode_frame(&buf).expect("decodes").expect("complete");
        assert_eq!(used, buf.len());
        assert_eq!(back, m);
    }

    #[test]
    fn every_kind_roundtrips() {
        let hello = Hello {
            max_version: VERSION,
            min_version: MIN_VERSION,
            codec: Codec::Lz4,
            cache_pages: 8192,
            probe: false,
            nonce: [7; 32],
        };
        for m in [
            Message::Hello(hello),
            Message::Hello(Hello {
                probe: true,
                ..hello
            }),
            Message::Challenge {
                version: 2,
                nonce: [1; 32],
                mac: [2; 32],
            },
            Message::Auth { mac: [3; 32] },
            Message::Welcome,
            Message::Banner(b"xl migration receiver ready, send binary domain data.\n".to_vec()),
            Message::Data(vec![1, 2, 3, 4, 5]),
            Message::Data(Vec::new()),
            Message::PageData(vec![9; 5000]),
            Message::Ack { checkpoint: 42 },
            Message::Heartbeat { seq: u64::MAX },
            Message::Close {
                checkpoints: 17,
                finished: true,
            },
            Message::abort("backup disk full"),
            Message::ProbeOk { busy: true },
            Message::ProbeOk { busy: false },
            Message::Discard,
            Message::Discarded {
                checkpoint: 9,
                copy_destroyed: true,
            },
        ] {
            roundtrip(m);
        }
    }

    #[tokio::test]
    async fn async_read_matches_sync_decode() {
        let mut buf = Vec::new();
        Message::Ack { checkpoint: 3 }.encode(&mut buf);
        Message::Data(vec![5; 100]).encode(&mut buf);
        let mut r = &buf[..];
        assert_eq!(
            read_message(&mut r).await.unwrap(),
            Message::Ack { checkpoint: 3 }
        );
        assert_eq!(
            read_message(&mut r).await.unwrap(),
            Message::Data(vec![5; 100])
        );
        assert!(matches!(read_message(&mut r).await, Err(WireError::Closed)));
    }

    /// Both ends' keys of one made-up session.
    fn keys() -> (Keys, Keys) {
        seal::test_pair(seal::LIMITS)
    }

    #[tokio::test]
    async fn frame_reader_survives_cancellation() {
        let (p, b) = keys();
        let mut wire = Vec::new();
        for i in 0..20u64 {
            p.sealer
                .encode(&Message::Ack { checkpoint: i }, &mut wire)
                .unwrap();
            p.sealer
                .encode(&Message::Data(vec![i as u8; 70_000]), &mut wire)
                .unwrap();
        }
        let (mut w, r) = tokio::io::duplex(1000);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for c in wire.chunks(777) {
                w.write_all(c).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut fr = FrameReader::new(r, b.opener);
        let mut got = Vec::new();
        while got.len() < 40 {
            // Race every read against an immediately ready future: cancels often.
            tokio::select! {
                m = fr.next() => got.push(m.unwrap()),
                _ = tokio::task::yield_now() => {}
            }
        }
        writer.await.unwrap();
        for i in 0..20u64 {
            assert_eq!(got[2 * i as usize], Message::Ack { checkpoint: i });
            assert_eq!(
                got[2 * i as usize + 1],
                Message::Data(vec![i as u8; 70_000])
            );
        }
        assert!(matches!(fr.next().await, Err(WireError::Closed)));
    }

    #[tokio::test]
    async fn frame_reader_names_a_cut_inside_a_frame() {
        let (p, b) = keys();
        let mut wire = Vec::new();
        p.sealer
            .encode(&Message::Ack { checkpoint: 1 }, &mut wire)
            .unwrap();
        let one = wire.len();
        p.sealer
            .encode(&Message::Data(vec![1; 500]), &mut wire)
            .unwrap();
        // Cut at the frame boundary: closed. Inside the second frame: truncated.
        let mut fr = FrameReader::new(&wire[..one], b.opener.clone());
        assert_eq!(fr.next().await.unwrap(), Message::Ack { checkpoint: 1 });
        assert!(matches!(fr.next().await, Err(WireError::Closed)));
        let (p, b) = keys();
        let mut wire = Vec::new();
        p.sealer
            .encode(&Message::Ack { checkpoint: 1 }, &mut wire)
            .unwrap();
        p.sealer
            .encode(&Message::Data(vec![1; 500]), &mut wire)
            .unwrap();
        drop(b);
        for cut in [one + 3, one + HEADER_LEN, wire.len() - 1] {
            let (_, fresh) = keys();
            let mut fr = FrameReader::new(&wire[..cut], fresh.opener);
            assert_eq!(fr.next().await.unwrap(), Message::Ack { checkpoint: 1 });
            match fr.next().await {
                Err(WireError::Truncated { have, want }) => {
                    assert_eq!(have, cut - one);
                    assert!(want > have, "{want} > {have}");
                }
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn frame_reader_refuses_plain_frames_and_stops_after_a_bad_one() {
        let (p, b) = keys();
        let mut wire = Vec::new();
        Message::Heartbeat { seq: 1 }.encode(&mut wire);
        let mut fr = FrameReader::new(&wire[..], b.opener);
        assert!(matches!(
            fr.next().await,
            Err(WireError::Unsealed {
                kind: Kind::Heartbeat
            })
        ));
        let (_, b) = keys();
        let mut wire = Vec::new();
        p.sealer
            .encode(&Message::Ack { checkpoint: 1 }, &mut wire)
            .unwrap();
        let good = wire.clone();
        let last = wire.len() - 1;
        wire[last] ^= 0x20;
        wire.extend_from_slice(&good);
        let mut fr = FrameReader::new(&wire[..], b.opener);
        assert!(matches!(fr.next().await, Err(WireError::Forged { .. })));
        assert!(matches!(fr.next().await, Err(WireError::ChannelFailed)));
    }

    #[test]
    fn partial_frame_is_not_a_frame() {
        let mut buf = Vec::new();
        Message::Data(vec![1; 10]).encode(&mut buf);
        for cut in 0..buf.len() {
            assert!(decode_frame(&buf[..cut]).unwrap().is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn invalid_and_unknown_kinds_fail() {
        let mut buf = Vec::new();
        Message::Ack { checkpoint: 1 }.encode(&mut buf);
        for k in [0u16, 15, 0xffff] {
            let mut b = buf.clone();
            b[4..6].copy_from_slice(&k.to_le_bytes());
            match decode_frame(&b) {
                Err(WireError::UnknownKind(found)) => assert_eq!(found, k),
                other => panic!("kind {k}: {other:?}"),
            }
        }
        assert!(matches!(
            Message::decode(Kind::Invalid, vec![]),
            Err(WireError::UnknownKind(0))
        ));
        // All-zero bytes are never a frame.
        assert!(matches!(
            decode_frame(&[0u8; 64]),
            Err(WireError::BadMagic { .. })
        ));
    }

    #[test]
    fn oversize_is_refused_before_allocation() {
        let hdr = FrameHeader {
            magic: MAGIC,
            kind: (Kind::Data as u16).into(),
            flags: 0.into(),
            len: (MAX_PAYLOAD + 1).into(),
            crc: 0.into(),
        };
        // Only the header is present: the size check must fire without the payload.
        match decode_frame(hdr.as_bytes()) {
            Err(WireError::Oversize { len, max }) => {
                assert_eq!(len, MAX_PAYLOAD + 1);
                assert_eq!(max, MAX_PAYLOAD);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn oversize_async_is_refused_without_reading_payload() {
        let hdr = FrameHeader {
            magic: MAGIC,
            kind: (Kind::PageData as u16).into(),
            flags: 0.into(),
            len: u32::MAX.into(),
            crc: 0.into(),
        };
        let mut r = hdr.as_bytes();
        assert!(matches!(
            read_message(&mut r).await,
            Err(WireError::Oversize { .. })
        ));
    }

    #[test]
    fn corrupted_frames_fail_the_crc() {
        let mut buf = Vec::new();
        Message::Data((0..200u8).collect()).encode(&mut buf);
        // Flip one bit in every byte of the payload and of the length-independent header
        // fields that the CRC covers.
        for i in (HEADER_LEN..buf.len()).chain(12..16) {
            let mut b = buf.clone();
            b[i] ^= 0x10;
            assert!(
                matches!(
                    decode_frame(&b),
                    Err(WireError::Crc {
                        kind: Kind::Data,
                        ..
                    })
                ),
                "byte {i}"
            );
        }
        let mut b = buf.clone();
        b[6] = 2; // reserved flags (bit 0 is `seal::FLAG_SEALED`)
        assert!(matches!(
            decode_frame(&b),
            Err(WireError::BadPayload {
                kind: Kind::Data,
                problem: PayloadProblem::ReservedFlags(2)
            })
        ));
        // A sealed frame is not taken for a plain one.
        let mut b = buf.clone();
        b[6] = 1;
        assert!(matches!(
            decode_frame(&b),
            Err(WireError::SealedTooEarly { kind: Kind::Data })
        ));
    }

    #[test]
    fn malformed_payloads_are_named() {
        for (kind, len, expected) in [
            (Kind::Ack, 7, 8),
            (Kind::Heartbeat, 9, 8),
            (Kind::Auth, 31, 32),
            (Kind::Welcome, 1, 0),
            (Kind::Close, 15, 16),
            (Kind::ProbeOk, 7, 8),
            (Kind::Discard, 1, 0),
            (Kind::Discarded, 17, 16),
        ] {
            match Message::decode(kind, vec![0; len]) {
                Err(WireError::BadPayload { kind: k, problem }) => {
                    assert_eq!(k, kind);
                    assert_eq!(problem, PayloadProblem::Length { got: len, expected });
                }
                other => panic!("{kind:?}: {other:?}"),
            }
        }
        assert!(matches!(
            Message::decode(Kind::Banner, vec![b'x'; MAX_BANNER + 1]),
            Err(WireError::BadPayload {
                kind: Kind::Banner,
                problem: PayloadProblem::TooLong { got, max: MAX_BANNER }
            }) if got == MAX_BANNER + 1
        ));
        assert!(matches!(
            Message::decode(Kind::Abort, vec![b'x'; MAX_REASON + 1]),
            Err(WireError::BadPayload {
                kind: Kind::Abort,
                problem: PayloadProblem::TooLong { .. }
            })
        ));
        assert!(matches!(
            Message::decode(Kind::Hello, vec![2, 0]),
            Err(WireError::BadPayload {
                kind: Kind::Hello,
                problem: PayloadProblem::NoVersion { got: 2 }
            })
        ));
    }

    #[test]
    fn an_unknown_codec_in_hello_is_refused() {
        let mut buf = Vec::new();
        Message::Hello(Hello {
            max_version: VERSION,
            min_version: MIN_VERSION,
            codec: Codec::Lz4,
            cache_pages: 0,
            probe: false,
            nonce: [0; 32],
        })
        .encode(&mut buf);
        // The codec byte: header, then max, min (u16 each).
        buf[HEADER_LEN + 4] = 7;
        let crc_of = |b: &[u8]| {
            let mut h = crc32fast::Hasher::new();
            let mut hdr = b[..HEADER_LEN].to_vec();
            hdr[12..16].copy_from_slice(&[0; 4]);
            h.update(&hdr);
            h.update(&b[HEADER_LEN..]);
            h.finalize()
        };
        let crc = crc_of(&buf);
        buf[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode_frame(&buf),
            Err(WireError::UnknownCodec(7))
        ));
    }

    #[test]
    fn hello_carries_the_probe_flag_and_refuses_unknown_flags() {
        let hello = |probe| Hello {
            max_version: VERSION,
            min_version: MIN_VERSION,
            codec: Codec::None,
            cache_pages: 0,
            probe,
            nonce: [3; 32],
        };
        let mut buf = Vec::new();
        Message::Hello(hello(true)).encode(&mut buf);
        // The flags byte: header, max, min (u16 each), codec.
        assert_eq!(buf[HEADER_LEN + 5], HELLO_PROBE);
        match decode_frame(&buf) {
            Ok(Some((Message::Hello(h), _))) => assert!(h.probe),
            other => panic!("{other:?}"),
        }
        let mut buf = Vec::new();
        Message::Hello(hello(false)).encode(&mut buf);
        assert_eq!(buf[HEADER_LEN + 5], 0);
        let mut payload = buf[HEADER_LEN..].to_vec();
        payload[5] = 0x80 | HELLO_PROBE;
        assert!(matches!(
            Message::decode(Kind::Hello, payload),
            Err(WireError::BadPayload {
                kind: Kind::Hello,
                problem: PayloadProblem::ReservedFlags(0x81)
            })
        ));
    }

    #[test]
    fn version_skew_in_hello() {
        let enc = |max: u16, min: u16| {
            let mut buf = Vec::new();
            Message::Hello(Hello {
                max_version: max,
                min_version: min,
                codec: Codec::None,
                cache_pages: 0,
                probe: false,
                nonce: [0; 32],
            })
            .encode(&mut buf);
            decode_frame(&buf)
        };
        // Ours is accepted.
        assert!(enc(VERSION, MIN_VERSION).unwrap().is_some());
        assert!(enc(MIN_VERSION, MIN_VERSION).unwrap().is_some());
        // A future-only peer, the unsealed versions 1 and 2, and garbage are refused,
        // naming both ranges.
        for (max, min) in [(VERSION + 5, VERSION + 1), (2, 1), (2, 2), (1, 1), (0, 0)] {
            match enc(max, min) {
                Err(WireError::Version {
                    ours_min,
                    ours_max,
                    theirs_min,
                    theirs_max,
                }) => {
                    assert_eq!((theirs_min, theirs_max), (min, max));
                    assert_eq!((ours_min, ours_max), (MIN_VERSION, VERSION));
                }
                other => panic!("{max}/{min}: {other:?}"),
            }
        }
        // A future peer that still speaks ours: accepted (the backup picks ours).
        assert!(enc(VERSION + 3, MIN_VERSION).unwrap().is_some());
    }

    #[test]
    fn abort_reason_is_truncated_on_a_char_boundary() {
        let m = Message::abort("é".repeat(MAX_REASON));
        let Message::Abort { reason } = &m else {
            unreachable!()
        };
        assert!(reason.len() <= MAX_REASON);
        roundtrip(m);
    }
}
