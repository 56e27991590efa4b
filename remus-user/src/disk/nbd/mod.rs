//! The NBD protocol as `remus disk` speaks it: the fixed-newstyle handshake (userspace
//! clients only; the kernel skips it), the transmission phase (28-byte requests, 16-byte
//! simple replies), and a small blocking client for tests and benchmarks.
//!
//! Owns: the protocol's constants and byte layouts, the handshake and the request loop
//! over one connection. Never touches: what a write means for replication (the
//! [`server::Target`] it is handed decides), netlink, the backup.
//!
//! The headers are written by hand with zerocopy (big-endian fields, size-asserted):
//! they are two fixed structs of 28 and 16 bytes; no NBD crate on the registry serves
//! both the server side and the kernel's fd hand-over without pulling its own runtime.
//! Facts are from the NBD project's `doc/proto.md` and Linux's `include/uapi/linux/nbd.h`.
use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub mod client;
pub mod handshake;
pub mod server;

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic (server greeting and every client option).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// What every `remus disk` export offers: flush and FUA are honoured locally, trim and
/// write-zeroes are replicated as "this range now reads as zeroes", and several
/// connections are safe because a flush syncs the whole backing.
pub const EXPORT_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN;

/// Command flags (upper half of the request's type word).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Options of the handshake.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

/// Information types of `REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Errors in replies (Linux errno values, as the protocol defines them).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest request payload served (reads and writes). The kernel's nbd sends at most
/// `max_hw_sectors` (32 MiB); qemu defaults to 32 MiB too.
pub const MAX_REQUEST: u32 = 32 << 20;
/// Largest option payload read during the handshake (names are at most 4 KiB).
pub const MAX_OPTION: u32 = 64 << 10;

/// Transmission commands. Anything else is answered with EINVAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Cmd {
    Read = 0,
    Write = 1,
    Disc = 2,
    Flush = 3,
    Trim = 4,
    Cache = 5,
    WriteZeroes = 6,
}

impl Cmd {
    pub fn from_wire(v: u16) -> Option<Cmd> {
        Some(match v {
            0 => Cmd::Read,
            1 => Cmd::Write,
            2 => Cmd::Disc,
            3 => Cmd::Flush,
            4 => Cmd::Trim,
            5 => Cmd::Cache,
            6 => Cmd::WriteZeroes,
            _ => return None,
        })
    }
}

/// A transmission request (28 bytes, big-endian).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Request {
    pub magic: U32,
    pub flags: U16,
    pub kind: U16,
    pub cookie: U64,
    pub offset: U64,
    pub len: U32,
}
const _: () = assert!(std::mem::size_of::<Request>() == 28);

impl Request {
    pub fn new(kind: Cmd, flags: u16, cookie: u64, offset: u64, len: u32) -> Request {
        Request {
            magic: U32::new(REQUEST_MAGIC),
            flags: U16::new(flags),
            kind: U16::new(kind as u16),
            cookie: U64::new(cookie),
            offset: U64::new(offset),
            len: U32::new(len),
        }
    }
}

/// A simple reply (16 bytes, big-endian); read data follows it.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Reply {
    pub magic: U32,
    pub error: U32,
    pub cookie: U64,
}
const _: () = assert!(std::mem::size_of::<Reply>() == 16);

impl Reply {
    pub fn new(error: u32, cookie: u64) -> Reply {
        Reply {
            magic: U32::new(SIMPLE_REPLY_MAGIC),
            error: U32::new(error),
            cookie: U64::new(cookie),
        }
    }
}

/// A client option header (16 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OptionHeader {
    pub magic: U64,
    pub option: U32,
    pub len: U32,
}
const _: () = assert!(std::mem::size_of::<OptionHeader>() == 16);

/// An option reply header (20 bytes).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OptionReply {
    pub magic: U64,
    pub option: U32,
    pub kind: U32,
    pub len: U32,
}
const _: () = assert!(std::mem::size_of::<OptionReply>() == 20);

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD protocol violation by the client: {0}")]
    Protocol(String),
    #[error("the NBD client gave up during the handshake ({0})")]
    Aborted(&'static str),
    #[error("NBD server: {0}")]
    Server(String),
}

/// Maps a local I/O error to the errno sent in a reply.
pub fn errno_of(e: &std::io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ENOSPC,
        Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => EPERM,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::EOPNOTSUPP) => ENOTSUP,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_protocol() {
        let r = Request::new(Cmd::Write, CMD_FLAG_FUA, 0x0102_0304_0506_0708, 4096, 512);
        let b = r.as_bytes();
        assert_eq!(b.len(), 28);
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..6], &[0, 1], "command flags come first");
        assert_eq!(&b[6..8], &[0, 1], "then the type");
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[16..24], &4096u64.to_be_bytes());
        assert_eq!(&b[24..28], &512u32.to_be_bytes());
        let rep = Reply::new(EIO, 7);
        assert_eq!(
            rep.as_bytes(),
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 7]
        );
    }

    #[test]
    fn unknown_commands_do_not_parse() {
        assert_eq!(Cmd::from_wire(1), Some(Cmd::Write));
        assert_eq!(Cmd::from_wire(7), None);
        assert_eq!(Cmd::from_wire(0xffff), None);
    }

    #[test]
    fn io_errors_map_to_protocol_errnos() {
        let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(errno_of(&e), ENOSPC);
        let e = std::io::Error::from_raw_os_error(libc::EBADF);
        assert_eq!(errno_of(&e), EIO);
    }
}
