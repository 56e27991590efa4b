//! The kernel's NBD device, configured over the generic-netlink family `nbd`
//! (`include/uapi/linux/nbd-netlink.h`): CONNECT hands it connected sockets already in the
//! transmission phase, RECONFIGURE gives a configured device new sockets (a restarted
//! daemon taking its device back), DISCONNECT releases it.
//!
//! Owns: the family's commands and attributes, the netlink exchange, sysfs facts about
//! /dev/nbdN. Never touches: the sockets' traffic (the NBD server serves the other ends).
//!
//! Messages are built with `netlink-packet-generic` 0.3 (the same netlink-packet-core
//! 0.7 as rtnetlink) over a blocking `netlink-sys` socket: configuration is a handful of
//! one-shot requests.
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkDeserializable, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_packet_utils::nla::{Nla, NlaBuffer, NlasIterator};
use netlink_packet_utils::{DecodeError, Emitable, ParseableParametrized};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};

pub const FAMILY: &str = "nbd";
const VERSION: u8 = 1;

const CMD_CONNECT: u8 = 1;
const CMD_DISCONNECT: u8 = 2;
const CMD_RECONFIGURE: u8 = 3;

const ATTR_INDEX: u16 = 1;
const ATTR_SIZE_BYTES: u16 = 2;
const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const ATTR_SERVER_FLAGS: u16 = 5;
const ATTR_CLIENT_FLAGS: u16 = 6;
const ATTR_SOCKETS: u16 = 7;
const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const ATTR_BACKEND_IDENTIFIER: u16 = 10;
const SOCK_ITEM: u16 = 1;
const SOCK_FD: u16 = 1;
const NLA_F_NESTED: u16 = 1 << 15;

/// The block size given to the kernel: 512 keeps every guest and bootloader happy.
pub const BLOCK_SIZE: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum GenlError {
    #[error(
        "the kernel has no nbd support (generic-netlink family `nbd` not found{modprobe}): \
         needs CONFIG_BLK_DEV_NBD (`modprobe nbd`); without it use --export unix:PATH"
    )]
    NoNbd { modprobe: String },
    #[error("/dev/nbd{index} is busy: {detail}")]
    Busy { index: u32, detail: String },
    #[error("netlink: {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the kernel refused {what} for /dev/nbd{index}: {errno}")]
    Refused {
        what: &'static str,
        index: u32,
        errno: std::io::Error,
    },
    #[error("netlink: malformed answer: {0}")]
    Decode(String),
    #[error("not permitted: configuring /dev/nbdN needs root (CAP_SYS_ADMIN)")]
    NotPermitted,
}

/// One attribute of the family (the subset remus uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attr {
    Index(u32),
    SizeBytes(u64),
    BlockSizeBytes(u64),
    ServerFlags(u64),
    ClientFlags(u64),
    Sockets(Vec<RawFd>),
    DeadConnTimeout(u64),
    BackendIdentifier(String),
    Other(u16, Vec<u8>),
}

struct SockFd(u32);
impl Nla for SockFd {
    fn value_len(&self) -> usize {
        4
    }
    fn kind(&self) -> u16 {
        SOCK_FD
    }
    fn emit_value(&self, b: &mut [u8]) {
        b[..4].copy_from_slice(&self.0.to_ne_bytes());
    }
}

struct SockItem(u32);
impl Nla for SockItem {
    fn value_len(&self) -> usize {
        SockFd(self.0).buffer_len()
    }
    fn kind(&self) -> u16 {
        SOCK_ITEM | NLA_F_NESTED
    }
    fn emit_value(&self, b: &mut [u8]) {
        SockFd(self.0).emit(b);
    }
}

impl Nla for Attr {
    fn value_len(&self) -> usize {
        match self {
            Attr::Index(_) => 4,
            Attr::SizeBytes(_)
            | Attr::BlockSizeBytes(_)
            | Attr::ServerFlags(_)
            | Attr::ClientFlags(_)
            | Attr::DeadConnTimeout(_) => 8,
            Attr::Sockets(fds) => fds.iter().map(|&fd| SockItem(fd as u32).buffer_len()).sum(),
            Attr::BackendIdentifier(s) => s.len() + 1,
            Attr::Other(_, v) => v.len(),
        }
    }
    fn kind(&self) -> u16 {
        match self {
            Attr::Index(_) => ATTR_INDEX,
            Attr::SizeBytes(_) => ATTR_SIZE_BYTES,
            Attr::BlockSizeBytes(_) => ATTR_BLOCK_SIZE_BYTES,
            Attr::ServerFlags(_) => ATTR_SERVER_FLAGS,
            Attr::ClientFlags(_) => ATTR_CLIENT_FLAGS,
            Attr::Sockets(_) => ATTR_SOCKETS | NLA_F_NESTED,
            Attr::DeadConnTimeout(_) => ATTR_DEAD_CONN_TIMEOUT,
            Attr::BackendIdentifier(_) => ATTR_BACKEND_IDENTIFIER,
            Attr::Other(k, _) => *k,
        }
    }
    fn emit_value(&self, b: &mut [u8]) {
        match self {
            Attr::Index(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
            Attr::SizeBytes(v)
            | Attr::BlockSizeBytes(v)
            | Attr::ServerFlags(v)
            | Attr::ClientFlags(v)
            | Attr::DeadConnTimeout(v) => b[..8].copy_from_slice(&v.to_ne_bytes()),
            Attr::Sockets(fds) => {
                let mut at = 0;
                for &fd in fds {
                    let item = SockItem(fd as u32);
                    item.emit(&mut b[at..]);
                    at += item.buffer_len();
                }
            }
            Attr::BackendIdentifier(s) => {
                b[..s.len()].copy_from_slice(s.as_bytes());
                b[s.len()] = 0;
            }
            Attr::Other(_, v) => b[..v.len()].copy_from_slice(v),
        }
    }
}

fn parse_attr(nla: &NlaBuffer<&[u8]>) -> Attr {
    let v = nla.value();
    let u32v = || {
        v.get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
    };
    match (nla.kind() & !NLA_F_NESTED, u32v()) {
        (ATTR_INDEX, Some(i)) => Attr::Index(i),
        (k, _) => Attr::Other(k, v.to_vec()),
    }
}

/// A message of the `nbd` family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdMessage {
    pub cmd: u8,
    pub attrs: Vec<Attr>,
}

impl GenlFamily for NbdMessage {
    fn family_name() -> &'static str {
        FAMILY
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        VERSION
    }
}

impl Emitable for NbdMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, b: &mut [u8]) {
        self.attrs.as_slice().emit(b)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NbdMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let mut attrs = Vec::new();
        for nla in NlasIterator::new(buf) {
            attrs.push(parse_attr(&nla?));
        }
        Ok(NbdMessage {
            cmd: header.cmd,
            attrs,
        })
    }
}

/// What CONNECT configures.
#[derive(Clone, Debug)]
pub struct Config {
    pub index: u32,
    pub size: u64,
    pub server_flags: u64,
    pub dead_conn_timeout: Duration,
    /// Shown in /sys/block/nbdN/backend: lets a restarted daemon recognise its device.
    pub backend: String,
}

/// The messages as bytes (for tests and for sending).
pub fn connect_message(c: &Config, fds: &[RawFd]) -> NbdMessage {
    NbdMessage {
        cmd: CMD_CONNECT,
        attrs: vec![
            Attr::Index(c.index),
            Attr::SizeBytes(c.size),
            Attr::BlockSizeBytes(BLOCK_SIZE),
            Attr::ServerFlags(c.server_flags),
            // Keep the device when the last opener closes it (blkback opens and closes).
            Attr::ClientFlags(0),
            Attr::DeadConnTimeout(c.dead_conn_timeout.as_secs().max(1)),
            Attr::BackendIdentifier(c.backend.clone()),
            Attr::Sockets(fds.to_vec()),
        ],
    }
}

pub fn reconfigure_message(c: &Config, fds: &[RawFd]) -> NbdMessage {
    NbdMessage {
        cmd: CMD_RECONFIGURE,
        attrs: vec![
            Attr::Index(c.index),
            Attr::DeadConnTimeout(c.dead_conn_timeout.as_secs().max(1)),
            Attr::BackendIdentifier(c.backend.clone()),
            Attr::Sockets(fds.to_vec()),
        ],
    }
}

struct Genl {
    sock: Socket,
    family: u16,
    seq: u32,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> GenlError {
    move |source| GenlError::Io { what, source }
}

fn open_socket() -> Result<Socket, GenlError> {
    let mut s = Socket::new(NETLINK_GENERIC).map_err(io("opening a generic-netlink socket"))?;
    s.bind_auto().map_err(io("binding the netlink socket"))?;
    s.connect(&SocketAddr::new(0, 0))
        .map_err(io("connecting the netlink socket"))?;
    Ok(s)
}

/// Sends one request and collects the inner messages of its answer until the ACK.
fn exchange<P>(
    sock: &Socket,
    msg: GenlMessage<P>,
    seq: u32,
) -> Result<Result<Vec<GenlMessage<P>>, i32>, GenlError>
where
    P: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + std::fmt::Debug,
    GenlMessage<P>: NetlinkDeserializable,
{
    let mut nl = NetlinkMessage::from(msg);
    nl.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    nl.header.sequence_number = seq;
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    sock.send(&buf, 0)
        .map_err(io("sending a netlink request"))?;
    let mut out = Vec::new();
    let mut rx = vec![0u8; 64 << 10];
    loop {
        rx.clear();
        rx.resize(64 << 10, 0);
        let n = sock
            .recv(&mut &mut rx[..], 0)
            .map_err(io("receiving the netlink answer"))?;
        let mut at = 0;
        while at < n {
            let m = NetlinkMessage::<GenlMessage<P>>::deserialize(&rx[at..n])
                .map_err(|e| GenlError::Decode(e.to_string()))?;
            let len = m.header.length as usize;
            if len == 0 {
                return Err(GenlError::Decode("zero-length netlink message".into()));
            }
            at += (len + 3) & !3;
            if m.header.sequence_number != seq {
                continue;
            }
            match m.payload {
                NetlinkPayload::InnerMessage(i) => out.push(i),
                NetlinkPayload::Error(e) => {
                    return Ok(match e.code {
                        None => Ok(out),
                        Some(c) => Err(c.get()),
                    });
                }
                NetlinkPayload::Done(_) => return Ok(Ok(out)),
                _ => {}
            }
        }
    }
}

fn resolve(sock: &Socket) -> Result<Option<u16>, GenlError> {
    let msg = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(FAMILY.to_string())],
    });
    match exchange(sock, msg, 1)? {
        Ok(answers) => Ok(answers.into_iter().find_map(|m| {
            m.payload.nlas.iter().find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
        })),
        Err(e) if -e == libc::ENOENT => Ok(None),
        Err(e) => Err(GenlError::Io {
            what: "resolving the nbd family",
            source: std::io::Error::from_raw_os_error(-e),
        }),
    }
}

impl Genl {
    /// Finds the `nbd` family, loading the module once if it is missing.
    fn open() -> Result<Genl, GenlError> {
        let sock = open_socket()?;
        if let Some(family) = resolve(&sock)? {
            return Ok(Genl {
                sock,
                family,
                seq: 2,
            });
        }
        let modprobe = match std::process::Command::new("modprobe")
            .arg("nbd")
            .stdin(std::process::Stdio::null())
            .output()
        {
            Ok(o) if o.status.success() => String::new(),
            Ok(o) => format!(
                "; modprobe nbd: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => format!("; modprobe: {e}"),
        };
        match resolve(&sock)? {
            Some(family) => Ok(Genl {
                sock,
                family,
                seq: 2,
            }),
            None => Err(GenlError::NoNbd { modprobe }),
        }
    }

    fn request(&mut self, m: NbdMessage) -> Result<Result<Vec<NbdMessage>, i32>, GenlError> {
        let mut g = GenlMessage::from_payload(m);
        g.set_resolved_family_id(self.family);
        self.seq += 1;
        Ok(exchange(&self.sock, g, self.seq)?.map(|v| v.into_iter().map(|m| m.payload).collect()))
    }
}

/// Fails early (exit 3) on a kernel without nbd.
pub fn probe() -> Result<(), GenlError> {
    Genl::open().map(|_| ())
}

fn refused(what: &'static str, index: u32, e: i32) -> GenlError {
    match -e {
        libc::EPERM | libc::EACCES => GenlError::NotPermitted,
        libc::EBUSY => GenlError::Busy {
            index,
            detail: "the kernel says it is in use (configured by another server)".into(),
        },
        n => GenlError::Refused {
            what,
            index,
            errno: std::io::Error::from_raw_os_error(n),
        },
    }
}

/// What /sys/block/nbdN says about the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceState {
    /// Not configured: CONNECT.
    Free,
    /// Configured, and the process that connected it is gone: RECONFIGURE takes it back.
    Orphaned { pid: u32, backend: Option<String> },
    /// Configured and served by a live process.
    Served { pid: u32 },
}

pub fn sysfs(index: u32) -> PathBuf {
    PathBuf::from(format!("/sys/block/nbd{index}"))
}

pub fn device_state(index: u32) -> DeviceState {
    let dir = sysfs(index);
    let Some(pid) = std::fs::read_to_string(dir.join("pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return DeviceState::Free;
    };
    let backend = std::fs::read_to_string(dir.join("backend"))
        .ok()
        .map(|s| s.trim().to_string());
    if pid != std::process::id() && crate::netbuf::pid_alive(pid) {
        DeviceState::Served { pid }
    } else {
        DeviceState::Orphaned { pid, backend }
    }
}

/// Configures /dev/nbdN on `fds` (the kernel's ends of connected socket pairs), or takes
/// an orphaned device back with RECONFIGURE. Returns whether it was a takeover.
pub fn attach(c: &Config, fds: &[RawFd]) -> Result<bool, GenlError> {
    let mut g = Genl::open()?;
    match device_state(c.index) {
        DeviceState::Served { pid } => Err(GenlError::Busy {
            index: c.index,
            detail: format!("served by process {pid}"),
        }),
        DeviceState::Orphaned { backend, .. } => {
            if backend
                .as_deref()
                .is_some_and(|b| !b.is_empty() && b != c.backend)
            {
                return Err(GenlError::Busy {
                    index: c.index,
                    detail: format!(
                        "configured for backend {:?}, not {:?}",
                        backend.unwrap_or_default(),
                        c.backend
                    ),
                });
            }
            g.request(reconfigure_message(c, fds))?
                .map_err(|e| refused("RECONFIGURE", c.index, e))?;
            Ok(true)
        }
        DeviceState::Free => {
            g.request(connect_message(c, fds))?
                .map_err(|e| refused("CONNECT", c.index, e))?;
            Ok(false)
        }
    }
}

/// Releases /dev/nbdN (its users get I/O errors from now on).
pub fn disconnect(index: u32) -> Result<(), GenlError> {
    let mut g = Genl::open()?;
    g.request(NbdMessage {
        cmd: CMD_DISCONNECT,
        attrs: vec![Attr::Index(index)],
    })?
    .map_err(|e| refused("DISCONNECT", index, e))?;
    Ok(())
}

/// Parses "/dev/nbd3" (or "nbd3") into 3.
pub fn parse_device(s: &str) -> Option<u32> {
    s.strip_prefix("/dev/")
        .unwrap_or(s)
        .strip_prefix("nbd")
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_carries_every_attribute_with_nested_sockets() {
        let c = Config {
            index: 3,
            size: 1 << 30,
            server_flags: 0x16d,
            dead_conn_timeout: Duration::from_secs(120),
            backend: "remus-disk:web0".into(),
        };
        let m = connect_message(&c, &[7, 9]);
        let mut b = vec![0u8; m.buffer_len()];
        m.emit(&mut b);
        let mut seen = Vec::new();
        for nla in NlasIterator::new(&b[..]) {
            let nla = nla.unwrap();
            seen.push(nla.kind() & !NLA_F_NESTED);
            match nla.kind() & !NLA_F_NESTED {
                ATTR_INDEX => assert_eq!(nla.value(), &3u32.to_ne_bytes()),
                ATTR_SIZE_BYTES => assert_eq!(nla.value(), &(1u64 << 30).to_ne_bytes()),
                ATTR_BLOCK_SIZE_BYTES => assert_eq!(nla.value(), &512u64.to_ne_bytes()),
                ATTR_DEAD_CONN_TIMEOUT => assert_eq!(nla.value(), &120u64.to_ne_bytes()),
                ATTR_BACKEND_IDENTIFIER => assert_eq!(nla.value(), b"remus-disk:web0\0"),
                ATTR_SOCKETS => {
                    assert!(nla.nested_flag(), "sockets are nested");
                    let fds: Vec<u32> = NlasIterator::new(nla.value())
                        .map(|item| {
                            let item = item.unwrap();
                            assert_eq!(item.kind() & !NLA_F_NESTED, SOCK_ITEM);
                            let fd = NlasIterator::new(item.value()).next().unwrap().unwrap();
                            assert_eq!(fd.kind(), SOCK_FD);
                            u32::from_ne_bytes(fd.value().try_into().unwrap())
                        })
                        .collect();
                    assert_eq!(fds, vec![7, 9]);
                }
                _ => {}
            }
        }
        assert_eq!(
            seen,
            vec![
                ATTR_INDEX,
                ATTR_SIZE_BYTES,
                ATTR_BLOCK_SIZE_BYTES,
                ATTR_SERVER_FLAGS,
                ATTR_CLIENT_FLAGS,
                ATTR_DEAD_CONN_TIMEOUT,
                ATTR_BACKEND_IDENTIFIER,
                ATTR_SOCKETS
            ]
        );
    }

    #[test]
    fn the_connect_reply_parses_its_index() {
        let m = NbdMessage {
            cmd: CMD_CONNECT,
            attrs: vec![Attr::Index(5)],
        };
        let mut b = vec![0u8; m.buffer_len()];
        m.emit(&mut b);
        let back = NbdMessage::parse_with_param(
            &b,
            GenlHeader {
                cmd: CMD_CONNECT,
                version: 1,
            },
        )
        .unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn device_names() {
        assert_eq!(parse_device("/dev/nbd0"), Some(0));
        assert_eq!(parse_device("nbd12"), Some(12));
        assert_eq!(parse_device("/dev/sda"), None);
        assert_eq!(parse_device("/dev/nbdx"), None);
    }

    #[test]
    fn a_never_configured_index_is_free() {
        assert_eq!(device_state(999_999), DeviceState::Free);
    }
}
