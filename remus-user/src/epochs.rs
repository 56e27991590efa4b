//! Per-epoch queues of held frames, and the rebuild of what a byte copy of a frame lost.
//!
//! Owns: which frames are held in which epoch, the held-bytes limit, the order frames
//! leave in (epoch by epoch, capture order within one), and turning a captured frame back
//! into something the kernel will transmit correctly (virtio-net header with checksum and
//! GSO state, out-of-band VLAN tag put back in band).
//! Never touches: any I/O. The holder (the task in `netbuf::service` that owns one vif's
//! ring; in `remus-net attach`, the holder process) feeds it frames from the ring and
//! writes what it hands back to the helper tap.
//!
//! Names: "the holder" is always that task or process; this module only keeps its queues.
use std::collections::VecDeque;

use remus_common::FrameHdr;
use serde::{Deserialize, Serialize};

/// One held frame: where its bytes are in its epoch's arena, and its capture metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRef {
    pub off: usize,
    pub meta: FrameHdr,
}

/// All held frames of one epoch, bytes packed into one arena (one allocation per epoch,
/// not per frame).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EpochQueue {
    pub epoch: u64,
    pub data: Vec<u8>,
    pub frames: Vec<FrameRef>,
}

impl EpochQueue {
    pub fn bytes(&self) -> u64 {
        self.data.len() as u64
    }

    /// Frames with their bytes, in capture order.
    pub fn iter(&self) -> impl Iterator<Item = (&FrameHdr, &[u8])> {
        self.frames
            .iter()
            .map(|f| (&f.meta, &self.data[f.off..f.off + f.meta.len as usize]))
    }
}

/// What happened to a pushed frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    Held,
    /// Its epoch was already committed (it was in flight in the ring at commit time):
    /// it may leave at once. Safe: its epoch is acknowledged.
    Late,
    /// The held-bytes limit was reached: dropped, counted, never released.
    DroppedLimit,
    /// Captured before this holder took over from a dead one: its epoch's fate is
    /// unknown, so it is dropped.
    DroppedStale,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounters {
    pub held_frames: u64,
    pub held_bytes: u64,
    pub released_frames: u64,
    pub released_bytes: u64,
    pub late_frames: u64,
    pub dropped_limit_frames: u64,
    pub dropped_limit_bytes: u64,
    pub dropped_stale_frames: u64,
    pub dropped_detach_frames: u64,
    pub dropped_detach_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochSummary {
    pub epoch: u64,
    pub frames: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EpochError {
    #[error("epoch {epoch} is not closed yet (current epoch is {current}): run checkpoint first")]
    NotClosed { epoch: u64, current: u64 },
}

/// The per-epoch queues of one vif. Epoch numbers only grow.
#[derive(Debug)]
pub struct EpochQueues {
    queues: VecDeque<EpochQueue>,
    current: u64,
    committed: u64,
    /// Frames stamped below this epoch predate this holder (takeover) and are dropped.
    floor: u64,
    limit_bytes: u64,
    counters: QueueCounters,
}

impl EpochQueues {
    /// Queues whose open epoch is `first_epoch` (1 on a fresh attach).
    pub fn new(first_epoch: u64, limit_bytes: u64) -> EpochQueues {
        EpochQueues {
            queues: VecDeque::new(),
            current: first_epoch,
            committed: first_epoch.saturating_sub(1),
            floor: first_epoch,
            limit_bytes,
            counters: QueueCounters::default(),
        }
    }

    pub fn current(&self) -> u64 {
        self.current
    }

    pub fn committed(&self) -> u64 {
        self.committed
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    pub fn counters(&self) -> QueueCounters {
        self.counters
    }

    pub fn held_bytes(&self) -> u64 {
        self.counters.held_bytes
    }

    pub fn epochs(&self) -> Vec<EpochSummary> {
        self.queues
            .iter()
            .map(|q| EpochSummary {
                epoch: q.epoch,
                frames: q.frames.len() as u64,
                bytes: q.bytes(),
            })
            .collect()
    }

    /// Takes one captured frame. `Late` frames are not stored: the caller releases them.
    pub fn push(&mut self, meta: FrameHdr, bytes: &[u8]) -> Pushed {
        let len = bytes.len() as u64;
        if meta.epoch < self.floor {
            self.counters.dropped_stale_frames += 1;
            return Pushed::DroppedStale;
        }
        if meta.epoch <= self.committed {
            self.counters.late_frames += 1;
            return Pushed::Late;
        }
        if self.counters.held_bytes + len > self.limit_bytes {
            self.counters.dropped_limit_frames += 1;
            self.counters.dropped_limit_bytes += len;
            return Pushed::DroppedLimit;
        }
        // Queues stay sorted by epoch; almost always the frame goes to the last one.
        let idx = match self.queues.iter().rposition(|q| q.epoch <= meta.epoch) {
            Some(i) if self.queues[i].epoch == meta.epoch => i,
            Some(i) => {
                self.queues.insert(
                    i + 1,
                    EpochQueue {
                        epoch: meta.epoch,
                        ..Default::default()
                    },
                );
                i + 1
            }
            None => {
                self.queues.push_front(EpochQueue {
                    epoch: meta.epoch,
                    ..Default::default()
                });
                0
            }
        };
        let q = &mut self.queues[idx];
        let off = q.data.len();
        q.data.extend_from_slice(bytes);
        let mut meta = meta;
        meta.len = bytes.len() as u32;
        q.frames.push(FrameRef { off, meta });
        self.counters.held_frames += 1;
        self.counters.held_bytes += len;
        Pushed::Held
    }

    /// Closes the open epoch; returns its number. The caller must already have told the
    /// data plane to stamp `current() + 1`.
    pub fn checkpoint(&mut self) -> u64 {
        let closed = self.current;
        self.current += 1;
        closed
    }

    /// Removes and returns the queues of epochs <= `epoch`, oldest first.
    pub fn commit(&mut self, epoch: u64) -> Result<Vec<EpochQueue>, EpochError> {
        if epoch >= self.current {
            return Err(EpochError::NotClosed {
                epoch,
                current: self.current,
            });
        }
        self.committed = self.committed.max(epoch);
        Ok(self.take_through(epoch))
    }

    /// Removes and returns every queue, closed or not (backup lost, or detach --release).
    /// Everything held counts as committed afterwards.
    pub fn take_all(&mut self) -> Vec<EpochQueue> {
        self.committed = self.current;
        self.current += 1;
        self.take_through(u64::MAX)
    }

    /// Drops every held frame (detach --drop); returns (frames, bytes) dropped.
    pub fn drop_all(&mut self) -> (u64, u64) {
        let qs = self.take_through(u64::MAX);
        let frames: u64 = qs.iter().map(|q| q.frames.len() as u64).sum();
        let bytes: u64 = qs.iter().map(|q| q.bytes()).sum();
        self.counters.released_frames -= frames;
        self.counters.released_bytes -= bytes;
        self.counters.dropped_detach_frames += frames;
        self.counters.dropped_detach_bytes += bytes;
        (frames, bytes)
    }

    fn take_through(&mut self, epoch: u64) -> Vec<EpochQueue> {
        let mut out = Vec::new();
        while self.queues.front().is_some_and(|q| q.epoch <= epoch) {
            if let Some(q) = self.queues.pop_front() {
                self.counters.held_frames -= q.frames.len() as u64;
                self.counters.held_bytes -= q.bytes();
                self.counters.released_frames += q.frames.len() as u64;
                self.counters.released_bytes += q.bytes();
                out.push(q);
            }
        }
        out
    }

    /// Counts a late frame as released (the caller sent it).
    pub fn count_late_release(&mut self, bytes: u64) {
        self.counters.released_frames += 1;
        self.counters.released_bytes += bytes;
    }
}

/// `struct virtio_net_hdr` (the 10-byte form tun uses with IFF_VNET_HDR), little endian.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

pub const VNET_HDR_LEN: usize = 10;
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

impl VnetHdr {
    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

/// How to put a captured frame back on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prepared {
    pub vnet: VnetHdr,
    /// An out-of-band VLAN tag to insert after the two MAC addresses (TPID, TCI).
    pub vlan: Option<[u8; 4]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    #[error("frame shorter than an Ethernet header")]
    Runt,
    #[error("GSO frame whose L4 protocol cannot be segmented by the release path")]
    UnsupportedGso,
}

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u32) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Rebuilds the transmit state of a captured frame, rewriting its L4 checksum field in
/// place when it asks the kernel to complete the checksum.
///
/// A guest with checksum offload sends TCP/UDP frames whose checksum field holds only the
/// pseudo-header sum (CHECKSUM_PARTIAL); `__sk_buff` does not say which frames those are.
/// So every IPv4/IPv6 TCP/UDP frame gets the pseudo-header sum written into its field and
/// NEEDS_CSUM set: the kernel then computes the full checksum, which is the right value
/// whichever way the guest sent it. GSO super-frames (gso_size set and payload larger than
/// one segment) get their GSO type and size back. IP fragments, IPv4 UDP with a zero
/// checksum, and IPv6 with extension headers are passed as they are.
pub fn prepare(meta: &FrameHdr, frame: &mut [u8]) -> Result<Prepared, PrepareError> {
    if frame.len() < 14 {
        return Err(PrepareError::Runt);
    }
    let vlan = (meta.vlan_proto != 0).then(|| {
        let mut t = [0u8; 4];
        t[0..2].copy_from_slice(&meta.vlan_proto.to_be_bytes());
        t[2..4].copy_from_slice(&meta.vlan_tci.to_be_bytes());
        t
    });
    let shift: usize = if vlan.is_some() { 4 } else { 0 };
    let mut out = Prepared {
        vnet: VnetHdr::default(),
        vlan,
    };
    let is_gso = meta.gso_size > 0;
    // Not TCP/UDP over IP as far as we can parse: leave it, unless it needs segmenting.
    let as_is = |out| {
        if is_gso && meta.gso_segs > 1 {
            Err(PrepareError::UnsupportedGso)
        } else {
            Ok(out)
        }
    };
    let Some(L4 {
        off: l4,
        proto,
        acc,
        v6,
    }) = l4_of(frame)
    else {
        return as_is(out);
    };
    let (csum_off, hdr_len) = match proto {
        6 if frame.len() >= l4 + 20 => (16usize, ((frame[l4 + 12] >> 4) as usize) * 4),
        17 if frame.len() >= l4 + 8 => {
            let cur = u16::from_be_bytes([frame[l4 + 6], frame[l4 + 7]]);
            if !v6 && cur == 0 && !is_gso {
                // IPv4 UDP without a checksum: leave it that way.
                return Ok(out);
            }
            (6usize, 8usize)
        }
        _ => return as_is(out),
    };
    let pseudo = fold(acc);
    frame[l4 + csum_off..l4 + csum_off + 2].copy_from_slice(&pseudo.to_be_bytes());
    out.vnet.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    out.vnet.csum_start = (l4 + shift) as u16;
    out.vnet.csum_offset = csum_off as u16;
    let payload = frame.len().saturating_sub(l4 + hdr_len);
    if is_gso && payload > meta.gso_size as usize {
        out.vnet.gso_size = meta.gso_size.min(u16::MAX as u32) as u16;
        out.vnet.hdr_len = (l4 + hdr_len + shift) as u16;
        out.vnet.gso_type = match (proto, v6) {
            (6, false) => VIRTIO_NET_HDR_GSO_TCPV4,
            (6, true) => VIRTIO_NET_HDR_GSO_TCPV6,
            _ => VIRTIO_NET_HDR_GSO_UDP_L4,
        };
        // TCP CWR on a super-frame: segments must keep ECN semantics.
        if proto == 6 && frame[l4 + 13] & 0x80 != 0 {
            out.vnet.gso_type |= VIRTIO_NET_HDR_GSO_ECN;
        }
    }
    Ok(out)
}

/// Where a frame's L4 header starts, its protocol, the pseudo-header's partial sum.
struct L4 {
    off: usize,
    proto: u8,
    acc: u32,
    v6: bool,
}

/// The L4 header of an unfragmented IPv4 or IPv6 (no extension headers) frame, after up
/// to two in-band VLAN tags (802.1Q, 802.1ad).
fn l4_of(frame: &[u8]) -> Option<L4> {
    let mut l3 = 12;
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    for _ in 0..2 {
        if (ethertype == 0x8100 || ethertype == 0x88a8) && frame.len() >= l3 + 6 {
            l3 += 4;
            ethertype = u16::from_be_bytes([frame[l3], frame[l3 + 1]]);
        }
    }
    l3 += 2;
    match ethertype {
        0x0800 if frame.len() >= l3 + 20 => {
            let ihl = ((frame[l3] & 0x0f) as usize) * 4;
            let tot = u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]) as usize;
            let frag = u16::from_be_bytes([frame[l3 + 6], frame[l3 + 7]]) & 0x3fff;
            let proto = frame[l3 + 9];
            if ihl < 20 || frag != 0 || frame.len() < l3 + ihl || tot < ihl {
                return None;
            }
            // The IP total length of a GSO super-frame may be 0 or stale; the frame's
            // own length is what the pseudo-header must cover.
            let l4len = (frame.len() - l3 - ihl) as u32;
            let acc = sum16(&frame[l3 + 12..l3 + 20], 0) + proto as u32 + l4len;
            Some(L4 {
                off: l3 + ihl,
                proto,
                acc,
                v6: false,
            })
        }
        0x86dd if frame.len() >= l3 + 40 => {
            let nh = frame[l3 + 6];
            let l4len = (frame.len() - l3 - 40) as u32;
            let acc =
                sum16(&frame[l3 + 8..l3 + 40], 0) + (l4len >> 16) + (l4len & 0xffff) + nh as u32;
            Some(L4 {
                off: l3 + 40,
                proto: nh,
                acc,
                v6: true,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(epoch: u64) -> FrameHdr {
        FrameHdr {
            epoch,
            ..Default::default()
        }
    }

    #[test]
    fn commit_releases_only_closed_epochs_in_order() {
        let mut h = EpochQueues::new(1, 1 << 20);
        assert_eq!(h.push(meta(1), b"a1"), Pushed::Held);
        assert_eq!(h.push(meta(1), b"a2"), Pushed::Held);
        assert_eq!(h.checkpoint(), 1);
        assert_eq!(h.push(meta(2), b"b1"), Pushed::Held);
        assert_eq!(h.checkpoint(), 2);
        assert_eq!(h.push(meta(3), b"c1"), Pushed::Held);
        assert_eq!(
            h.commit(3),
            Err(EpochError::NotClosed {
                epoch: 3,
                current: 3
            })
        );
        let out = h.commit(1).unwrap();
        let frames: Vec<&[u8]> = out.iter().flat_map(|q| q.iter().map(|(_, b)| b)).collect();
        assert_eq!(frames, vec![&b"a1"[..], b"a2"]);
        let out = h.commit(2).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].epoch, 2);
        assert_eq!(h.counters().held_frames, 1);
        assert_eq!(h.counters().released_frames, 3);
        assert_eq!(
            h.epochs(),
            vec![EpochSummary {
                epoch: 3,
                frames: 1,
                bytes: 2
            }]
        );
    }

    #[test]
    fn a_frame_stamped_before_the_checkpoint_but_drained_after_keeps_its_epoch() {
        let mut h = EpochQueues::new(1, 1 << 20);
        h.push(meta(1), b"x");
        h.checkpoint();
        h.push(meta(2), b"y");
        // In flight in the ring when the checkpoint happened: stamped 1, arrives now.
        h.push(meta(1), b"z");
        let out = h.commit(1).unwrap();
        let frames: Vec<&[u8]> = out.iter().flat_map(|q| q.iter().map(|(_, b)| b)).collect();
        assert_eq!(frames, vec![&b"x"[..], b"z"]);
    }

    #[test]
    fn frames_of_committed_epochs_are_late_and_stale_ones_dropped() {
        let mut h = EpochQueues::new(5, 1 << 20);
        assert_eq!(h.push(meta(4), b"old"), Pushed::DroppedStale);
        h.push(meta(5), b"a");
        h.checkpoint();
        h.commit(5).unwrap();
        assert_eq!(h.push(meta(5), b"late"), Pushed::Late);
        assert_eq!(h.counters().late_frames, 1);
        assert_eq!(h.counters().dropped_stale_frames, 1);
    }

    #[test]
    fn the_limit_drops_and_counts_and_never_releases() {
        let mut h = EpochQueues::new(1, 10);
        assert_eq!(h.push(meta(1), &[0; 8]), Pushed::Held);
        assert_eq!(h.push(meta(1), &[0; 8]), Pushed::DroppedLimit);
        let c = h.counters();
        assert_eq!((c.dropped_limit_frames, c.dropped_limit_bytes), (1, 8));
        assert_eq!(c.held_bytes, 8);
        h.checkpoint();
        assert_eq!(h.commit(1).unwrap()[0].frames.len(), 1);
    }

    #[test]
    fn take_all_and_drop_all() {
        let mut h = EpochQueues::new(1, 1 << 20);
        h.push(meta(1), b"a");
        h.checkpoint();
        h.push(meta(2), b"bb");
        assert_eq!(h.drop_all(), (2, 3));
        assert_eq!(h.counters().released_frames, 0);
        h.push(meta(2), b"c");
        let all = h.take_all();
        assert_eq!(all.len(), 1);
        assert!(h.commit(2).is_ok());
    }

    /// Full internet checksum of `data` (for checking what the kernel would compute).
    fn csum(data: &[u8], acc: u32) -> u16 {
        !fold(sum16(data, acc))
    }

    fn ipv4_tcp(payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + payload];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        let tot = (20 + 20 + payload) as u16;
        f[16..18].copy_from_slice(&tot.to_be_bytes());
        f[23] = 6;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[34 + 12] = 5 << 4;
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = i as u8;
        }
        f
    }

    #[test]
    fn tcp_gets_pseudo_sum_and_needs_csum_and_the_result_checks() {
        let mut f = ipv4_tcp(100);
        // Garbage in the field, as a CHECKSUM_PARTIAL frame would have it (or anything).
        f[50] = 0xde;
        f[51] = 0xad;
        let p = prepare(&FrameHdr::default(), &mut f).unwrap();
        assert_eq!(p.vnet.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!((p.vnet.csum_start, p.vnet.csum_offset), (34, 16));
        assert_eq!(p.vnet.gso_type, VIRTIO_NET_HDR_GSO_NONE);
        // What the kernel does: checksum from csum_start to the end, stored at the offset.
        let c = csum(&f[34..], 0);
        f[50..52].copy_from_slice(&c.to_be_bytes());
        // Verify like a receiver: pseudo header + segment sums to 0xffff.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&f[26..34]);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&((f.len() - 34) as u16).to_be_bytes());
        assert_eq!(csum(&f[34..], sum16(&pseudo, 0)), 0);
    }

    #[test]
    fn gso_superframes_get_their_type_size_and_header_length() {
        let mut f = ipv4_tcp(3000);
        let mut m = FrameHdr::default();
        (m.gso_size, m.gso_segs) = (1448, 3);
        let p = prepare(&m, &mut f).unwrap();
        assert_eq!(p.vnet.gso_type, VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(p.vnet.gso_size, 1448);
        assert_eq!(p.vnet.hdr_len, 54);
    }

    #[test]
    fn out_of_band_vlan_shifts_offsets_and_is_reinserted() {
        let mut f = ipv4_tcp(10);
        let m = FrameHdr {
            vlan_proto: 0x8100,
            vlan_tci: 0x2005,
            ..Default::default()
        };
        let p = prepare(&m, &mut f).unwrap();
        assert_eq!(p.vlan, Some([0x81, 0x00, 0x20, 0x05]));
        assert_eq!(p.vnet.csum_start, 38);
    }

    #[test]
    fn non_ip_frames_and_fragments_pass_untouched() {
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        let before = arp.clone();
        let p = prepare(&FrameHdr::default(), &mut arp).unwrap();
        assert_eq!(p.vnet, VnetHdr::default());
        assert_eq!(arp, before);
        let mut frag = ipv4_tcp(10);
        frag[20] = 0x20; // MF
        let before = frag.clone();
        prepare(&FrameHdr::default(), &mut frag).unwrap();
        assert_eq!(frag, before);
        assert_eq!(
            prepare(&FrameHdr::default(), &mut [0u8; 6]),
            Err(PrepareError::Runt)
        );
    }

    #[test]
    fn ipv4_udp_without_checksum_stays_without() {
        let mut f = vec![0u8; 14 + 20 + 8 + 4];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&32u16.to_be_bytes());
        f[23] = 17;
        let p = prepare(&FrameHdr::default(), &mut f).unwrap();
        assert_eq!(p.vnet.flags, 0);
    }
}
