//! The backup's word on its LAN when a failover starts: the guest's MACs are announced
//! from the backup's bridge at the cut, before libxl has even restored the copy, as
//! QEMU's and libxl's migration announce a moved guest (`qemu_announce_self`: RARP).
//!
//! Two things, per NIC of the guest (MAC and bridge, from libxl's JSON config in the
//! stream's xl header):
//! - the bridge forgets the ports it learnt the MAC on (its uplink, from the primary's
//!   frames): until then it drops every frame for the guest that arrives on that port,
//!   and the backup copy would be reachable only once it sent a frame itself. The port's
//!   learnt entries are flushed (`brif/PORT/flush`); the bridge floods the guest's frames
//!   until it learns the MAC again, on the vif, from the guest;
//! - a RARP with the MAC as source, broadcast from the bridge (three of them, 0, 100 and
//!   300 ms after the cut): learning switches on the LAN move the MAC to this host's port.
//!
//! Owns: reading the NICs from the config, the bridge's forwarding table (sysfs) and
//! the announcement frames. Never touches: the receiver, Xen, the vif (it does not exist
//! yet at the cut), any MAC but the guest's (a flush forgets a port's learnt MACs, which
//! the bridge learns again from their next frame).
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

/// libxl's default bridge for a vif without `bridge=`.
const DEFAULT_BRIDGE: &str = "xenbr0";

/// One NIC of the guest: its MAC and the bridge its vif joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub mac: [u8; 6],
    pub bridge: String,
}

/// The NICs in libxl's JSON domain config (`nics[].mac`, `nics[].bridge`); NICs without
/// a MAC are skipped (libxl would have made one up; it is not in the config).
pub fn nics_of(config: &[u8]) -> Vec<Nic> {
    let end = config.iter().position(|&b| b == 0).unwrap_or(config.len());
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&config[..end]) else {
        return vec![];
    };
    let Some(nics) = v.get("nics").and_then(|n| n.as_array()) else {
        return vec![];
    };
    nics.iter()
        .filter_map(|n| {
            let mac = parse_mac(n.get("mac")?.as_str()?)?;
            let bridge = n
                .get("bridge")
                .and_then(|b| b.as_str())
                .filter(|b| !b.is_empty() && !b.contains('/') && !b.starts_with('.'))
                .unwrap_or(DEFAULT_BRIDGE);
            Some(Nic {
                mac,
                bridge: bridge.to_string(),
            })
        })
        .collect()
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).ok())
        .collect::<Option<_>>()?;
    let mac: [u8; 6] = v.try_into().ok()?;
    (mac != [0; 6]).then_some(mac)
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The ports of bridge `br` (under `net`, normally /sys/class/net) that learnt `mac`
/// (`brforward`: 16-byte `__fdb_entry`s; local entries are the bridge's own).
pub fn ports_with(net: &Path, br: &str, mac: &[u8; 6]) -> Vec<String> {
    let Ok(table) = std::fs::read(net.join(br).join("brforward")) else {
        return vec![];
    };
    let nos: Vec<u16> = table
        .chunks_exact(16)
        .filter(|e| &e[0..6] == mac && e[7] == 0)
        .map(|e| u16::from(e[6]) | (u16::from(e[12]) << 8))
        .collect();
    let Ok(ports) = std::fs::read_dir(net.join(br).join("brif")) else {
        return vec![];
    };
    ports
        .flatten()
        .filter(|p| {
            std::fs::read_to_string(p.path().join("port_no"))
                .ok()
                .and_then(|s| {
                    let s = s.trim();
                    match s.strip_prefix("0x") {
                        Some(h) => u16::from_str_radix(h, 16).ok(),
                        None => s.parse().ok(),
                    }
                })
                .is_some_and(|n| nos.contains(&n))
        })
        .map(|p| p.file_name().to_string_lossy().into_owned())
        .collect()
}

/// A RARP "reverse request" announcing `mac`, as QEMU's `qemu_announce_self` sends it
/// (broadcast, padded to the 60-byte minimum).
pub fn rarp(mac: &[u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(mac);
    f[12..14].copy_from_slice(&[0x80, 0x35]);
    // htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4, op 3 (reverse request).
    f[14..22].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]);
    f[22..28].copy_from_slice(mac);
    f[32..38].copy_from_slice(mac);
    f
}

/// Announces the guest's NICs (from the stream's config) at a failover's cut: flushes
/// what each bridge learnt on the ports that had the MAC, then sends the RARPs in the
/// background. Failures are logged, never fatal: the guest announces itself too once it
/// runs (a Linux netfront sends a gratuitous ARP when it reconnects).
pub fn at_failover(config: Option<&[u8]>) {
    let nics = config.map(nics_of).unwrap_or_default();
    if nics.is_empty() {
        warn!("no NIC with a MAC in the stream's domain config: nothing announced at the failover");
        return;
    }
    let net = PathBuf::from("/sys/class/net");
    for n in &nics {
        let ports = ports_with(&net, &n.bridge, &n.mac);
        for p in &ports {
            if let Err(e) =
                std::fs::write(net.join(&n.bridge).join("brif").join(p).join("flush"), "1")
            {
                warn!(bridge = %n.bridge, port = %p, error = %e, "could not flush the port's learnt MACs");
            }
        }
        info!(mac = %mac_str(&n.mac), bridge = %n.bridge, flushed = ?ports, "announcing the guest's MAC at the failover");
    }
    tokio::spawn(async move {
        for delay in [0u64, 100, 200] {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            for n in &nics {
                if let Err(e) = send(&n.bridge, &rarp(&n.mac)) {
                    warn!(bridge = %n.bridge, error = %e, "could not send the RARP announcement");
                }
            }
        }
    });
}

/// Sends one frame on interface `dev` through a packet socket.
fn send(dev: &str, frame: &[u8]) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let name = std::ffi::CString::new(dev).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socket(2); the fd is wrapped at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zeroed then filled.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_ifindex = ifindex as i32;
    sa.sll_halen = 6;
    sa.sll_addr[..6].copy_from_slice(&frame[0..6]);
    // SAFETY: sendto with our buffer and a correctly sized address on our socket.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nics_come_from_libxls_config_with_the_default_bridge() {
        let c = br#"{"c_info":{"name":"guest"},"nics":[
            {"devid":0,"mac":"00:16:3e:4c:41:42","bridge":"xenbr1"},
            {"devid":1,"mac":"00:16:3e:00:00:01"},
            {"devid":2},
            {"devid":3,"mac":"00:00:00:00:00:00"},
            {"devid":4,"mac":"00:16:3e:00:00:02","bridge":"../x"}]}"#;
        let mut v = c.to_vec();
        v.push(0);
        let n = nics_of(&v);
        assert_eq!(n.len(), 3, "{n:?}");
        assert_eq!(n[0].mac, [0x00, 0x16, 0x3e, 0x4c, 0x41, 0x42]);
        assert_eq!(n[0].bridge, "xenbr1");
        assert_eq!(n[1].bridge, "xenbr0");
        assert_eq!(
            n[2].bridge, "xenbr0",
            "a bridge name that is a path is not used"
        );
        assert!(nics_of(b"{\"c_info\":{}}").is_empty());
        assert!(nics_of(b"not json").is_empty());
    }

    #[test]
    fn the_ports_that_learnt_the_mac_are_found_in_the_forwarding_table() {
        let d = tempfile::tempdir().expect("tempdir");
        let br = d.path().join("xenbr0");
        for (p, no) in [("lan0", "0x1"), ("vif3.0", "0x2")] {
            std::fs::create_dir_all(br.join("brif").join(p)).expect("mkdir");
            std::fs::write(br.join("brif").join(p).join("port_no"), format!("{no}\n"))
                .expect("write");
        }
        let mac = [0x00, 0x16, 0x3e, 0x4c, 0x41, 0x42];
        let entry = |m: [u8; 6], port: u8, local: u8| {
            let mut e = m.to_vec();
            e.extend([port, local, 0, 0, 0, 0, 0, 0, 0, 0]);
            e
        };
        let mut t = entry(mac, 1, 0);
        t.extend(entry([2, 0, 0, 0, 0, 1], 2, 0));
        t.extend(entry(mac, 2, 1)); // a local entry is the bridge's own, never flushed
        std::fs::write(br.join("brforward"), t).expect("write");
        assert_eq!(
            ports_with(d.path(), "xenbr0", &mac),
            vec!["lan0".to_string()]
        );
        assert!(ports_with(d.path(), "xenbr9", &mac).is_empty());
    }

    #[test]
    fn the_rarp_is_qemus_announcement() {
        let mac = [0x00, 0x16, 0x3e, 0x4c, 0x41, 0x42];
        let f = rarp(&mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!((&f[22..28], &f[32..38]), (&mac[..], &mac[..]));
    }
}
