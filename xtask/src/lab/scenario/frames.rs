//! A frame watcher on the client's tap: every frame to or from the guest's MAC (TCP
//! segments with their sequence numbers, ARP), stamped with the machine's clock, as JSON
//! lines. The failover timeline reads it: the first frame from the backup copy on the
//! client LAN, and the client's retransmissions while the guest is gone (its TCP backoff).
//!
//! Owns: one watcher thread at a time (started and stopped by the steps) and its log
//! `target/lab/client/frames-<run>.jsonl`. Never touches: the client, the tap or the
//! namespace (it only opens a packet socket on the tap, from inside the namespace).
use crate::lab::{
    lan,
    topology::{CLIENT_NETNS, CLIENT_TAP, GUEST_MAC},
    vm,
};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::{
    fs,
    io::Write,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

/// One logged frame.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Frame {
    /// Unix seconds, the machine's clock.
    pub t: f64,
    /// The guest's MAC is the source (true) or the destination (false).
    pub from_guest: bool,
    /// "tcp", "arp", "rarp" (the backup's announcement) or "other".
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<u32>,
    /// TCP payload bytes.
    #[serde(default)]
    pub len: u32,
    /// TCP flags byte.
    #[serde(default)]
    pub flags: u8,
}

struct Watch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

static WATCH: Mutex<Option<Watch>> = Mutex::new(None);

/// The watcher's log for run `name`.
pub fn log(name: &str) -> PathBuf {
    lan::dir().join(format!("frames-{name}.jsonl"))
}

/// Starts the watcher for run `name` (a running one is stopped first).
pub fn start(name: &str) -> Result<()> {
    stop();
    let sock = tap_socket().context("a packet socket on the client's tap")?;
    fs::create_dir_all(lan::dir())?;
    let p = log(name);
    let mut out = fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?;
    let mac = mac_bytes(GUEST_MAC).context("the guest's MAC")?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 1514];
        while !flag.load(Ordering::Relaxed) {
            // SAFETY: recv into our buffer on our socket; it times out every 200 ms.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else { continue };
            if let Some(f) = parse(&buf[..n.min(buf.len())], &mac, vm::unix_now())
                && let Ok(l) = serde_json::to_string(&f)
            {
                let _ = writeln!(out, "{l}");
            }
        }
    });
    if let Ok(mut w) = WATCH.lock() {
        *w = Some(Watch {
            stop,
            thread: Some(thread),
        });
    }
    Ok(())
}

/// Stops the watcher, if one runs.
pub fn stop() {
    let w = WATCH.lock().ok().and_then(|mut w| w.take());
    if let Some(mut w) = w {
        w.stop.store(true, Ordering::Relaxed);
        if let Some(t) = w.thread.take() {
            let _ = t.join();
        }
    }
}

/// The frames logged in `p` (missing file: none).
pub fn frames(p: &Path) -> Vec<Frame> {
    fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn mac_bytes(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).ok())
        .collect::<Option<_>>()?;
    v.try_into().ok()
}

/// A frame to or from `mac`, or None (other hosts' frames, runts).
fn parse(f: &[u8], mac: &[u8; 6], t: f64) -> Option<Frame> {
    let from_guest = f.get(6..12)? == mac;
    if !from_guest && f.get(0..6)? != mac {
        return None;
    }
    let mut fr = Frame {
        t,
        from_guest,
        kind: "other".into(),
        seq: None,
        ack: None,
        len: 0,
        flags: 0,
    };
    match f.get(12..14)? {
        [0x08, 0x06] => fr.kind = "arp".into(),
        // The backup dom0's announcement of the guest's MAC at the cut, not the guest.
        [0x80, 0x35] => fr.kind = "rarp".into(),
        [0x08, 0x00] => {
            let ip = f.get(14..)?;
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            if *ip.get(9)? == 6 {
                let tcp = ip.get(ihl..)?;
                let doff = usize::from(tcp.get(12)? >> 4) * 4;
                let u32_at = |i: usize| -> Option<u32> {
                    Some(u32::from_be_bytes(tcp.get(i..i + 4)?.try_into().ok()?))
                };
                fr.kind = "tcp".into();
                fr.seq = u32_at(4);
                fr.ack = u32_at(8);
                fr.flags = *tcp.get(13)?;
                fr.len = u32::try_from(total.saturating_sub(ihl + doff)).unwrap_or(0);
            }
        }
        _ => {}
    }
    Some(fr)
}

/// A packet socket for every protocol bound to the client's tap, opened inside the
/// client's namespace (on a short-lived thread that enters it).
fn tap_socket() -> Result<OwnedFd> {
    std::thread::spawn(|| -> Result<OwnedFd> {
        let ns = fs::File::open(format!("/run/netns/{CLIENT_NETNS}"))?;
        // SAFETY: setns on this thread only, with a namespace fd we opened.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2); the fd is wrapped at once.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if fd < 0 {
            bail!("socket(AF_PACKET): {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(CLIENT_TAP)?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("{CLIENT_TAP}: {}", std::io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain data; zeroed then filled.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = ifindex as i32;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: bind and setsockopt with correctly sized arguments on our socket.
        let ok = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&raw const sa).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) == 0
                && libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                ) == 0
        };
        if !ok {
            bail!(
                "binding the packet socket: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(sock)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcp_segment_to_the_guest_is_read_with_its_numbers_and_others_are_skipped() {
        let guest = mac_bytes(GUEST_MAC).expect("valid");
        let mut f = guest.to_vec();
        f.extend([2, 0, 0, 0, 0, 1, 0x08, 0x00]);
        // IPv4, ihl 5, total 20 + 20 + 6, TCP.
        f.extend([
            0x45, 0, 0, 46, 0, 0, 0, 0, 64, 6, 0, 0, 169, 254, 0, 10, 169, 254, 0, 2,
        ]);
        f.extend([
            0x9c, 0x40, 0x1b, 0x58, 0, 0, 0, 7, 0, 0, 0, 9, 0x50, 0x18, 0, 0,
        ]);
        f.extend([0, 0, 0, 0]);
        f.extend(b"probe\n");
        let fr = parse(&f, &guest, 1.5).expect("to the guest");
        assert!(!fr.from_guest);
        assert_eq!(
            (fr.kind.as_str(), fr.seq, fr.ack, fr.len, fr.flags),
            ("tcp", Some(7), Some(9), 6, 0x18)
        );
        let mut other = f.clone();
        other[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
        assert!(parse(&other, &guest, 1.5).is_none());
        let mut arp = f[..14].to_vec();
        arp[0..6].copy_from_slice(&[0xff; 6]);
        arp[6..12].copy_from_slice(&guest);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let a = parse(&arp, &guest, 2.0).expect("from the guest");
        assert!(a.from_guest && a.kind == "arp");
        arp[12..14].copy_from_slice(&[0x80, 0x35]);
        assert_eq!(parse(&arp, &guest, 2.0).expect("from the MAC").kind, "rarp");
        assert!(parse(&f[..10], &guest, 1.0).is_none());
    }
}
