//! The disk stream between `remus disk serve` (primary) and `remus disk receive`
//! (backup): typed frames after the relay's authentication, each carried sealed by the
//! relay's channel (`channel`).
//!
//! Owns: the frame layout, kinds, the version, CRC checks, size limits. Never touches:
//! sockets beyond the reader/writer it is handed, sealing (`channel`), the backing,
//! epochs' meaning.
//!
//! ```text
//!  primary (disk serve)                          backup (disk receive)
//!  TCP connect ─────────────────────────────────► (relay handshake: HELLO CHALLENGE
//!  ◄──────────── replication::auth ────────────►   AUTH, sealed WELCOME; the same key
//!  ═════ from here every frame below travels sealed (`channel`: AES-256-GCM) ═════
//!  D_HELLO{versions, size, session} ────────────►  size must match its backing
//!                              ◄──────────────── D_WELCOME{version, size}
//!  SYNC_DATA{off,data} / SYNC_ZERO{off,len} ────►  written straight to the backing
//!  WRITE{epoch,off,data} / ZERO{epoch,off,len} ─►  (before SYNC_DONE: straight through)
//!  SYNC_DONE ───────────────────────────────────►  flush the backing
//!                              ◄──────────────── SYNCED
//!  WRITE{N,off,data} / ZERO{N,off,len} ─────────►  journal of epoch N (held, not applied)
//!  CUT{N} ──────────────────────────────────────►  journal fsync'ed: epoch N durable
//!                              ◄──────────────── DURABLE{N}
//!  HEARTBEAT ◄──────────────────────────────────► HEARTBEAT (both ways, when idle)
//!  CLOSE / ABORT{reason} ◄──────────────────────► either side ends the session
//! ```
//!
//! Every frame is a 32-byte little-endian header (`"RMDK"`, kind, flags = 0, payload
//! length, CRC-32 of the header with the CRC field zeroed and then the payload, epoch,
//! offset) and the payload, at most [`MAX_PAYLOAD`] bytes, checked before anything is
//! allocated. Kind 0 is `Invalid`, so zeroed or unknown bytes never parse. The backup's
//! journal stores WRITE, ZERO and CUT frames exactly as received, CRC included: on the
//! wire the seal protects them, in the journal the CRC does.
use std::io::{self, Read};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const MAGIC: [u8; 4] = *b"RMDK";
/// The disk stream version this build speaks (independent of the relay's). Version 2
/// travels sealed (relay protocol 3); version 1 sent its frames in clear and is refused
/// already by the relay's handshake.
pub const VERSION: u16 = 2;
pub const MIN_VERSION: u16 = 2;
/// Largest payload of one frame (a larger NBD write is sent as several WRITE frames of
/// the same epoch: one sealed replication frame holds at most 16 MiB).
pub const MAX_PAYLOAD: u32 = 8 << 20;
pub const MAX_REASON: usize = 1024;
pub const HEADER_LEN: usize = std::mem::size_of::<Header>();

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[repr(u16)]
pub enum Kind {
    Invalid = 0,
    Hello = 1,
    Welcome = 2,
    Write = 3,
    Zero = 4,
    Cut = 5,
    SyncData = 6,
    SyncZero = 7,
    SyncDone = 8,
    Synced = 9,
    Durable = 10,
    Heartbeat = 11,
    Abort = 12,
    Close = 13,
}

impl Kind {
    pub fn from_wire(v: u16) -> Kind {
        match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Write,
            4 => Kind::Zero,
            5 => Kind::Cut,
            6 => Kind::SyncData,
            7 => Kind::SyncZero,
            8 => Kind::SyncDone,
            9 => Kind::Synced,
            10 => Kind::Durable,
            11 => Kind::Heartbeat,
            12 => Kind::Abort,
            13 => Kind::Close,
            _ => Kind::Invalid,
        }
    }

    /// The payload length this kind must carry (`None`: variable).
    fn fixed_len(self) -> Option<u32> {
        match self {
            Kind::Hello => Some(HELLO_LEN as u32),
            Kind::Welcome => Some(WELCOME_LEN as u32),
            Kind::Zero | Kind::SyncZero => Some(8),
            Kind::Cut
            | Kind::SyncDone
            | Kind::Synced
            | Kind::Durable
            | Kind::Heartbeat
            | Kind::Close => Some(0),
            Kind::Write | Kind::SyncData | Kind::Abort | Kind::Invalid => None,
        }
    }
}

/// The 32-byte frame header, little-endian.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Header {
    pub magic: [u8; 4],
    pub kind: U16,
    /// Reserved, zero.
    pub flags: U16,
    pub len: U32,
    pub crc: U32,
    pub epoch: U64,
    pub offset: U64,
}
const _: () = assert!(std::mem::size_of::<Header>() == 32);

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct HelloWire {
    min_version: U16,
    max_version: U16,
    reserved: [u8; 4],
    size: U64,
    session: [u8; 16],
}
const HELLO_LEN: usize = std::mem::size_of::<HelloWire>();

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct WelcomeWire {
    version: U16,
    reserved: [u8; 6],
    size: U64,
}
const WELCOME_LEN: usize = std::mem::size_of::<WelcomeWire>();

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("disk stream: {0}")]
    Io(#[from] io::Error),
    #[error("disk stream: bad magic {0:02x?} (not a remus disk peer: a relay port, or garbage?)")]
    BadMagic([u8; 4]),
    #[error("disk stream: unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("disk stream: reserved flags {0:#x} set")]
    Flags(u16),
    #[error("disk stream: {kind:?} frame of {len} bytes (limit {limit})")]
    Size { kind: Kind, len: u32, limit: u32 },
    #[error("disk stream: CRC mismatch on a {0:?} frame (corrupted in transit or on disk)")]
    Crc(Kind),
    #[error("disk stream: the peer closed the connection")]
    Closed,
    #[error("disk stream: {0}")]
    Channel(crate::replication::WireError),
    #[error(
        "disk stream: a sealed {0:?} frame where disk frames travel as DATA (a relay on a disk port?)"
    )]
    NotDisk(crate::replication::Kind),
    #[error("disk stream: a sealed frame of {0} bytes does not hold one whole disk frame")]
    Short(usize),
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub epoch: u64,
    pub offset: u64,
    pub payload: Vec<u8>,
}

/// The primary's opening.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub size: u64,
    /// Random per primary session (logs, the journal's state file).
    pub session: [u8; 16],
}

fn crc(h: &Header, payload: &[u8]) -> u32 {
    let mut z = *h;
    z.crc = U32::new(0);
    let mut c = crc32fast::Hasher::new();
    c.update(z.as_bytes());
    c.update(payload);
    c.finalize()
}

/// The header for a frame (CRC computed over it and `payload`).
pub fn header(kind: Kind, epoch: u64, offset: u64, payload: &[u8]) -> Header {
    let mut h = Header {
        magic: MAGIC,
        kind: U16::new(kind as u16),
        flags: U16::new(0),
        len: U32::new(payload.len() as u32),
        crc: U32::new(0),
        epoch: U64::new(epoch),
        offset: U64::new(offset),
    };
    h.crc = U32::new(crc(&h, payload));
    h
}

/// A whole frame as bytes (small frames; data frames are sent as header + slice).
pub fn encode(kind: Kind, epoch: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    let h = header(kind, epoch, offset, payload);
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(h.as_bytes());
    v.extend_from_slice(payload);
    v
}

/// HELLO's payload.
pub fn hello(h: &Hello) -> Vec<u8> {
    let w = HelloWire {
        min_version: U16::new(h.min_version),
        max_version: U16::new(h.max_version),
        reserved: [0; 4],
        size: U64::new(h.size),
        session: h.session,
    };
    w.as_bytes().to_vec()
}

pub fn parse_hello(payload: &[u8]) -> Option<Hello> {
    let w = HelloWire::read_from_bytes(payload).ok()?;
    Some(Hello {
        min_version: w.min_version.get(),
        max_version: w.max_version.get(),
        size: w.size.get(),
        session: w.session,
    })
}

/// WELCOME's payload.
pub fn welcome(version: u16, size: u64) -> Vec<u8> {
    let w = WelcomeWire {
        version: U16::new(version),
        reserved: [0; 6],
        size: U64::new(size),
    };
    w.as_bytes().to_vec()
}

/// (version, size)
pub fn parse_welcome(payload: &[u8]) -> Option<(u16, u64)> {
    let w = WelcomeWire::read_from_bytes(payload).ok()?;
    Some((w.version.get(), w.size.get()))
}

/// ABORT's payload: the reason, truncated to [`MAX_REASON`] bytes.
pub fn abort(reason: &str) -> &[u8] {
    let r = reason.as_bytes();
    &r[..r.len().min(MAX_REASON)]
}

/// The length carried by ZERO and SYNC_ZERO frames (their payload, 8 bytes, checked by
/// [`check_header`]).
pub fn zero_len(payload: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&payload[..8]);
    u64::from_le_bytes(b)
}

/// Checks a header before its payload is read: magic, kind, flags, length limits.
pub fn check_header(b: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
    let h = Header::read_from_bytes(b).map_err(|_| WireError::Closed)?;
    if h.magic != MAGIC {
        return Err(WireError::BadMagic(h.magic));
    }
    let kind = Kind::from_wire(h.kind.get());
    if kind == Kind::Invalid {
        return Err(WireError::UnknownKind(h.kind.get()));
    }
    if h.flags.get() != 0 {
        return Err(WireError::Flags(h.flags.get()));
    }
    let len = h.len.get();
    let limit = match kind.fixed_len() {
        Some(n) => n,
        None if kind == Kind::Abort => MAX_REASON as u32,
        None => MAX_PAYLOAD,
    };
    let bad = match kind.fixed_len() {
        Some(n) => len != n,
        None => len > limit,
    };
    if bad {
        return Err(WireError::Size { kind, len, limit });
    }
    Ok(h)
}

/// Verifies a checked header against its payload.
pub fn finish(h: &Header, payload: Vec<u8>) -> Result<Frame, WireError> {
    let kind = Kind::from_wire(h.kind.get());
    if crc(h, &payload) != h.crc.get() {
        return Err(WireError::Crc(kind));
    }
    Ok(Frame {
        kind,
        epoch: h.epoch.get(),
        offset: h.offset.get(),
        payload,
    })
}

/// Reads exactly `len` bytes into a new vector (without zero-filling it first: payloads
/// are up to 32 MiB and arrive at memory speed).
pub fn read_exactly<R: Read>(r: &mut R, len: usize) -> io::Result<Vec<u8>> {
    let mut v = Vec::with_capacity(len);
    r.take(len as u64).read_to_end(&mut v)?;
    if v.len() != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(v)
}

/// Reads one frame, CRC-checked, with its header as received (the backup journals both
/// verbatim). A clean EOF before the first header byte is [`WireError::Closed`].
pub fn read_raw<R: Read>(r: &mut R) -> Result<(Header, Vec<u8>), WireError> {
    let mut hb = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut hb[got..]) {
            Ok(0) if got == 0 => return Err(WireError::Closed),
            Ok(0) => return Err(WireError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let h = check_header(&hb)?;
    let payload = read_exactly(r, h.len.get() as usize)?;
    if crc(&h, &payload) != h.crc.get() {
        return Err(WireError::Crc(Kind::from_wire(h.kind.get())));
    }
    Ok((h, payload))
}

/// Reads one frame. A clean EOF before the first header byte is [`WireError::Closed`].
pub fn read_frame<R: Read>(r: &mut R) -> Result<Frame, WireError> {
    let (h, payload) = read_raw(r)?;
    Ok(Frame {
        kind: Kind::from_wire(h.kind.get()),
        epoch: h.epoch.get(),
        offset: h.offset.get(),
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let data = vec![0xabu8; 4096];
        let b = encode(Kind::Write, 7, 8192, &data);
        assert_eq!(b.len(), HEADER_LEN + 4096);
        let f = read_frame(&mut &b[..]).unwrap();
        assert_eq!(
            f,
            Frame {
                kind: Kind::Write,
                epoch: 7,
                offset: 8192,
                payload: data
            }
        );
        let z = encode(Kind::Zero, 3, 0, &(1u64 << 33).to_le_bytes());
        assert_eq!(zero_len(&read_frame(&mut &z[..]).unwrap().payload), 1 << 33);
        let h = Hello {
            min_version: 1,
            max_version: 1,
            size: 1 << 30,
            session: [9; 16],
        };
        assert_eq!(parse_hello(&hello(&h)), Some(h));
        assert_eq!(parse_welcome(&welcome(1, 42)), Some((1, 42)));
    }

    #[test]
    fn corruption_and_garbage_are_refused() {
        let mut b = encode(Kind::Write, 1, 0, &[1, 2, 3, 4]);
        b[HEADER_LEN + 2] ^= 1;
        assert!(matches!(
            read_frame(&mut &b[..]),
            Err(WireError::Crc(Kind::Write))
        ));
        let mut b = encode(Kind::Cut, 1, 0, &[]);
        b[24] ^= 1; // the epoch is covered by the CRC too
        assert!(matches!(
            read_frame(&mut &b[..]),
            Err(WireError::Crc(Kind::Cut))
        ));
        assert!(matches!(
            read_frame(&mut &[0u8; 32][..]),
            Err(WireError::BadMagic(_))
        ));
        let mut b = encode(Kind::Cut, 1, 0, &[]);
        b[4] = 0;
        b[5] = 0;
        assert!(matches!(
            read_frame(&mut &b[..]),
            Err(WireError::UnknownKind(0))
        ));
        let mut b = encode(Kind::Cut, 1, 0, &[]);
        b[4] = 99;
        assert!(matches!(
            read_frame(&mut &b[..]),
            Err(WireError::UnknownKind(99))
        ));
        // A relay frame ("RMUS") on a disk port says so.
        let mut b = encode(Kind::Cut, 1, 0, &[]);
        b[..4].copy_from_slice(b"RMUS");
        assert!(matches!(
            read_frame(&mut &b[..]),
            Err(WireError::BadMagic(_))
        ));
        assert!(matches!(read_frame(&mut &[][..]), Err(WireError::Closed)));
        assert!(matches!(read_frame(&mut &b[..10]), Err(WireError::Io(_))));
    }

    #[test]
    fn sizes_are_checked_before_allocating() {
        let mut h = header(Kind::Write, 1, 0, &[]);
        h.len = U32::new(MAX_PAYLOAD + 1);
        let b: [u8; HEADER_LEN] = h.as_bytes().try_into().unwrap();
        assert!(matches!(check_header(&b), Err(WireError::Size { .. })));
        let mut h = header(Kind::Cut, 1, 0, &[]);
        h.len = U32::new(1);
        let b: [u8; HEADER_LEN] = h.as_bytes().try_into().unwrap();
        assert!(matches!(check_header(&b), Err(WireError::Size { .. })));
        let mut h = header(Kind::Abort, 0, 0, &[]);
        h.len = U32::new(MAX_REASON as u32 + 1);
        let b: [u8; HEADER_LEN] = h.as_bytes().try_into().unwrap();
        assert!(matches!(check_header(&b), Err(WireError::Size { .. })));
        let mut h = header(Kind::Cut, 1, 0, &[]);
        h.flags = U16::new(2);
        let b: [u8; HEADER_LEN] = h.as_bytes().try_into().unwrap();
        assert!(matches!(check_header(&b), Err(WireError::Flags(2))));
        let long = "x".repeat(5000);
        assert_eq!(abort(&long).len(), MAX_REASON);
    }
}
