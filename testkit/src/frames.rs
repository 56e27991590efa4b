//! The test topology's addresses and the frames tests and benchmarks send from the guest.
//! Owns: byte layouts only (no I/O).

pub const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const GUEST_IP: &str = "10.77.0.1";
pub const PEER_IP: &str = "10.77.0.2";
pub const GUEST_IP6: &str = "fd77::1";
pub const PEER_IP6: &str = "fd77::2";

/// `02:00:00:00:00:01` form, as `ip link set … address` takes it.
pub fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// An Ethernet frame from the guest's MAC (padded to the 60-byte minimum).
pub fn eth_frame(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len().max(46));
    f.extend_from_slice(&dst);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

/// A broadcast ARP request from the guest asking for `target` (IPv4).
pub fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    p.extend_from_slice(&GUEST_MAC);
    p.extend_from_slice(&[10, 77, 0, 1]);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target);
    eth_frame([0xff; 6], 0x0806, &p)
}

/// An 802.1Q-tagged frame from the guest (tag in the frame): TPID 0x8100, `pcp`, `vid`.
pub fn vlan_frame(
    dst: [u8; 6],
    pcp: u8,
    vid: u16,
    inner_ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + payload.len());
    p.extend_from_slice(&(((pcp as u16) << 13) | (vid & 0x0fff)).to_be_bytes());
    p.extend_from_slice(&inner_ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    eth_frame(dst, 0x8100, &p)
}

/// An IPv4 + UDP packet (no Ethernet header) from 10.77.0.1:40000 to 10.77.0.2, UDP
/// checksum 0 ("none", legal in IPv4), valid IP header checksum.
pub fn ipv4_udp(dport: u16, payload: &[u8]) -> Vec<u8> {
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 77, 0, 1, 10, 77, 0, 2,
    ];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    ip.extend_from_slice(&40000u16.to_be_bytes());
    ip.extend_from_slice(&dport.to_be_bytes());
    ip.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(payload);
    ip
}

/// A whole guest → peer IPv4/UDP frame with `payload` bytes of 0x5a to `dport`
/// (64 bytes: 106 on the wire; 1472 bytes: a 1514-byte MTU frame).
pub fn udp_frame(payload: usize, dport: u16) -> Vec<u8> {
    eth_frame(PEER_MAC, 0x0800, &ipv4_udp(dport, &vec![0x5a; payload]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_udp_frame_has_the_documented_sizes_and_a_valid_ip_checksum() {
        assert_eq!(udp_frame(64, 9).len(), 106);
        assert_eq!(udp_frame(1472, 9).len(), 1514);
        let f = udp_frame(64, 9);
        let sum: u32 = f[14..34]
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
            .sum();
        assert_eq!((sum & 0xffff) + (sum >> 16), 0xffff);
        assert_eq!(&f[6..12], &GUEST_MAC);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 9);
    }

    #[test]
    fn short_frames_are_padded_and_tags_carry_pcp_and_vid() {
        assert_eq!(arp_request([10, 77, 0, 2]).len(), 60);
        let v = vlan_frame(PEER_MAC, 5, 0x123, 0x0800, &[1, 2, 3]);
        assert_eq!(&v[12..14], &[0x81, 0x00]);
        assert_eq!(u16::from_be_bytes([v[14], v[15]]), (5 << 13) | 0x123);
        assert_eq!(mac_str(&GUEST_MAC), "02:00:00:00:00:01");
    }
}
