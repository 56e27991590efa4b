//! Raw AF_PACKET sockets: one bound to an interface (send whole frames, batches with
//! sendmmsg), and a recorder that keeps every frame arriving at an interface with its
//! receive time and out-of-band VLAN tag.
//!
//! Owns: its sockets and the recorder's thread. Never touches: the interfaces' settings.
use std::{
    mem,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{KitError, Result, frames::GUEST_MAC, io_err, ns};

/// A raw AF_PACKET socket (all protocols) bound to one interface of the calling thread's
/// network namespace.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    pub fn open(iface: &str) -> Result<PacketSocket> {
        let what = || format!("packet socket on {iface}");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto as i32,
            )
        };
        if fd < 0 {
            return Err(io_err(what())(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh socket we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(iface)
            .map_err(|_| KitError::Missing(format!("interface name {iface:?}")))?;
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(KitError::Missing(format!("no interface {iface}")));
        }
        // SAFETY: zeroed sockaddr_ll is valid; we fill the fields bind needs.
        let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: sll is a valid sockaddr_ll of the given length.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(io_err(what())(std::io::Error::last_os_error()));
        }
        Ok(PacketSocket { fd, ifindex })
    }

    /// setsockopt with a value of any plain type.
    pub fn setopt<T>(&self, level: i32, opt: i32, v: &T) -> Result<()> {
        // SAFETY: v is a valid T for the duration of the call; the length matches.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                opt,
                v as *const T as *const libc::c_void,
                mem::size_of::<T>() as u32,
            )
        };
        if r != 0 {
            return Err(io_err(format!("setsockopt {level}/{opt}"))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Sends one whole Ethernet frame.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: frame is valid for its length.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io_err("sending a raw frame")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Sends `count` copies of `frame` (0: no limit) in batches of 64 with sendmmsg,
    /// until `until` has passed or `stop()` says so; returns how many were sent.
    pub fn send_copies(
        &self,
        frame: &[u8],
        count: u64,
        until: Instant,
        stop: impl Fn() -> bool,
    ) -> u64 {
        const BATCH: usize = 64;
        let mut iov: Vec<libc::iovec> = (0..BATCH)
            .map(|_| libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            })
            .collect();
        // SAFETY: zeroed mmsghdr is valid; each points at one iovec of the live frame.
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { mem::zeroed() }).collect();
        for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut n = 0u64;
        while (count == 0 || n < count) && Instant::now() < until && !stop() {
            let want = if count == 0 {
                BATCH
            } else {
                BATCH.min((count - n) as usize)
            };
            // SAFETY: msgs and the frame they point at are alive.
            let r =
                unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), want as u32, 0) };
            if r > 0 {
                n += r as u64;
            }
        }
        n
    }

    pub fn ifindex(&self) -> i32 {
        self.ifindex
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Sends raw frames on `iface` of namespace `ns`.
pub fn send_raw(netns: &str, iface: &str, frames: Vec<Vec<u8>>) -> Result<()> {
    let iface = iface.to_string();
    ns::in_netns(netns, move || -> Result<()> {
        let s = PacketSocket::open(&iface)?;
        frames.iter().try_for_each(|f| s.send(f))
    })?
}

/// Sends `payloads` as UDP datagrams from namespace `ns` to `dst` (unconnected socket,
/// so ICMP errors from the peer never fail a later send).
pub fn send_udp(netns: &str, dst: std::net::SocketAddr, payloads: Vec<Vec<u8>>) -> Result<()> {
    ns::in_netns(netns, move || -> Result<()> {
        let bind = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let s = std::net::UdpSocket::bind(bind).map_err(io_err("udp bind"))?;
        for p in &payloads {
            s.send_to(p, dst)
                .map_err(io_err(format!("udp send to {dst}")))?;
        }
        Ok(())
    })?
}

/// Sends `payload` from namespace `ns` to `dst` as one UDP GSO super-frame of `segment`-byte
/// segments (UDP_SEGMENT): the vif sees a single frame of up to 64 KiB.
pub fn send_udp_gso(
    netns: &str,
    dst: std::net::SocketAddr,
    payload: Vec<u8>,
    segment: u16,
) -> Result<()> {
    ns::in_netns(netns, move || -> Result<()> {
        let bind = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let s = std::net::UdpSocket::bind(bind).map_err(io_err("udp bind"))?;
        let seg = segment as libc::c_int;
        // SAFETY: setsockopt(SOL_UDP, UDP_SEGMENT) with an int that outlives the call.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                &seg as *const libc::c_int as *const libc::c_void,
                mem::size_of::<libc::c_int>() as u32,
            )
        };
        if r != 0 {
            return Err(io_err("UDP_SEGMENT")(std::io::Error::last_os_error()));
        }
        s.send_to(&payload, dst).map_err(io_err("gso send"))?;
        Ok(())
    })?
}

/// One frame seen on the recorded interface (not sent by it).
#[derive(Clone, Debug)]
pub struct Captured {
    /// The frame as delivered to packet sockets (an offloaded VLAN tag is NOT in here).
    pub data: Vec<u8>,
    /// Out-of-band VLAN tag (TPID, TCI) reported by the kernel, if any.
    pub vlan: Option<(u16, u16)>,
    pub at: Instant,
}

impl Captured {
    pub fn src_mac(&self) -> &[u8] {
        &self.data[6..12]
    }

    pub fn from_guest(&self) -> bool {
        self.data.len() >= 14 && self.src_mac() == GUEST_MAC
    }

    /// VLAN tag wherever it is (out of band or in the frame): (TPID, TCI).
    pub fn vlan_tag(&self) -> Option<(u16, u16)> {
        if self.vlan.is_some() {
            return self.vlan;
        }
        let et = u16::from_be_bytes([self.data[12], self.data[13]]);
        (et == 0x8100 || et == 0x88a8)
            .then(|| (et, u16::from_be_bytes([self.data[14], self.data[15]])))
    }

    /// Ethertype and the offset of the L3 header, after any in-band VLAN tags.
    pub fn l3(&self) -> Option<(u16, usize)> {
        let mut off = 12;
        loop {
            let et = u16::from_be_bytes([*self.data.get(off)?, *self.data.get(off + 1)?]);
            if et == 0x8100 || et == 0x88a8 {
                off += 4;
                continue;
            }
            return Some((et, off + 2));
        }
    }

    /// (IP protocol, L4 offset) of an IPv4 or IPv6 frame (no extension headers).
    pub fn l4(&self) -> Option<(u8, usize)> {
        let (et, o) = self.l3()?;
        match et {
            0x0800 => Some((
                *self.data.get(o + 9)?,
                o + ((self.data.get(o)? & 0x0f) as usize) * 4,
            )),
            0x86dd => Some((*self.data.get(o + 6)?, o + 40)),
            _ => None,
        }
    }

    /// (destination port, payload) of a UDP frame.
    pub fn udp(&self) -> Option<(u16, &[u8])> {
        let (proto, o) = self.l4()?;
        if proto != 17 {
            return None;
        }
        let port = u16::from_be_bytes([*self.data.get(o + 2)?, *self.data.get(o + 3)?]);
        Some((port, self.data.get(o + 8..)?))
    }

    /// (destination port, flags) of a TCP frame.
    pub fn tcp(&self) -> Option<(u16, u8)> {
        let (proto, o) = self.l4()?;
        if proto != 6 {
            return None;
        }
        let port = u16::from_be_bytes([*self.data.get(o + 2)?, *self.data.get(o + 3)?]);
        Some((port, *self.data.get(o + 13)?))
    }
}

/// `struct tpacket_auxdata` (linux/if_packet.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TpacketAuxdata {
    tp_status: u32,
    tp_len: u32,
    tp_snaplen: u32,
    tp_mac: u16,
    tp_net: u16,
    tp_vlan_tci: u16,
    tp_vlan_tpid: u16,
}
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;

/// A recording socket: auxdata on (VLAN tags), a large buffer, a 50 ms receive timeout
/// (so the recorder notices it should stop).
fn recording_socket(netns: &str, iface: &str) -> Result<PacketSocket> {
    ns::enter_netns(netns)?;
    let s = PacketSocket::open(iface)?;
    s.setopt(libc::SOL_PACKET, libc::PACKET_AUXDATA, &1i32)?;
    s.setopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &(64i32 << 20))?;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    s.setopt(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
    Ok(s)
}

/// The out-of-band VLAN tag in the control messages of `msg`, if any.
///
/// # Safety
/// `msg` must be a msghdr the kernel just filled by recvmsg, its control buffer alive.
unsafe fn vlan_of(msg: &libc::msghdr) -> Option<(u16, u16)> {
    let mut vlan = None;
    // SAFETY: walking the control messages the kernel wrote (caller's promise).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                let a: TpacketAuxdata =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const TpacketAuxdata);
                if a.tp_status & TP_STATUS_VLAN_VALID != 0 {
                    let tpid = if a.tp_status & TP_STATUS_VLAN_TPID_VALID != 0 {
                        a.tp_vlan_tpid
                    } else {
                        0x8100
                    };
                    vlan = Some((tpid, a.tp_vlan_tci));
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    vlan
}

/// Receives one frame into `buf`; None on timeout and for frames the interface sent.
fn recv_one(sock: &PacketSocket, buf: &mut [u8]) -> Option<Captured> {
    let mut cbuf = [0u64; 16];
    // SAFETY: zeroed sockaddr_ll/msghdr are valid; every pointer below points at a live
    // buffer of the stated length.
    let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = &mut sll as *mut _ as *mut libc::c_void;
    msg.msg_namelen = mem::size_of::<libc::sockaddr_ll>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = mem::size_of_val(&cbuf);
    // SAFETY: msg describes valid buffers.
    let n = unsafe { libc::recvmsg(sock.raw_fd(), &mut msg, libc::MSG_TRUNC) };
    if n < 0 || sll.sll_pkttype == libc::PACKET_OUTGOING {
        return None;
    }
    // SAFETY: recvmsg just filled msg and cbuf is alive.
    let vlan = unsafe { vlan_of(&msg) };
    let len = (n as usize).min(buf.len());
    Some(Captured {
        data: buf[..len].to_vec(),
        vlan,
        at: Instant::now(),
    })
}

/// Records frames arriving at one interface of a namespace, on its own thread (frames
/// the interface itself sends are skipped).
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Vec<Captured>>>,
    thread: Option<JoinHandle<()>>,
}

impl Sniffer {
    /// Starts recording; returns once the socket is bound (nothing later is missed).
    pub fn start(netns: &str, iface: &str) -> Result<Sniffer> {
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (netns, iface) = (netns.to_string(), iface.to_string());
        let (stop2, frames2) = (stop.clone(), frames.clone());
        let thread = std::thread::spawn(move || {
            let sock = match recording_socket(&netns, &iface) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut buf = vec![0u8; 70_000];
            while !stop2.load(Ordering::Relaxed) {
                if let Some(cap) = recv_one(&sock, &mut buf)
                    && let Ok(mut f) = frames2.lock()
                {
                    f.push(cap);
                }
            }
        });
        ready_rx
            .recv()
            .map_err(|_| KitError::Missing("the recorder thread died".into()))??;
        Ok(Sniffer {
            stop,
            frames,
            thread: Some(thread),
        })
    }

    /// A copy of every frame recorded so far.
    pub fn frames(&self) -> Vec<Captured> {
        self.frames.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// Frames recorded so far whose source is the guest.
    pub fn from_guest(&self) -> Vec<Captured> {
        self.frames()
            .into_iter()
            .filter(Captured::from_guest)
            .collect()
    }

    /// Waits up to `timeout` until `pred` holds for the recorded frames; returns them.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&[Captured]) -> bool,
    ) -> Result<Vec<Captured>> {
        crate::wait_until(what, timeout, || pred(&self.frames()))?;
        Ok(self.frames())
    }

    pub fn clear(&self) {
        if let Ok(mut f) = self.frames.lock() {
            f.clear();
        }
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::{PEER_MAC, udp_frame, vlan_frame};

    fn cap(data: Vec<u8>) -> Captured {
        Captured {
            data,
            vlan: None,
            at: Instant::now(),
        }
    }

    #[test]
    fn a_captured_udp_frame_is_read_back_through_its_headers() {
        let c = cap(udp_frame(64, 7100));
        assert!(c.from_guest());
        assert_eq!(c.l3(), Some((0x0800, 14)));
        assert_eq!(c.udp(), Some((7100, &[0x5a; 64][..])));
        assert_eq!(c.tcp(), None);
    }

    #[test]
    fn an_in_band_tag_is_found_and_skipped() {
        let inner = crate::frames::ipv4_udp(7200, b"x");
        let c = cap(vlan_frame(PEER_MAC, 3, 42, 0x0800, &inner));
        assert_eq!(c.vlan_tag(), Some((0x8100, (3 << 13) | 42)));
        assert_eq!(c.udp().map(|(p, _)| p), Some(7200));
    }

    #[test]
    fn a_socket_on_a_missing_interface_is_an_error() {
        match PacketSocket::open("remus-no-if") {
            Err(KitError::Missing(_)) => {}
            Err(KitError::Io { source, .. }) if source.raw_os_error() == Some(libc::EPERM) => {
                // Not root: the socket itself is refused, which is an error too.
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened a socket on an interface that does not exist"),
        }
    }
}
