//! Types shared by the eBPF programs (`remus-ebpf`) and userspace (`remus-user`).
//!
//! Owns: the ABI between kernel and userspace: the frame record header written into the
//! ring buffer, the layout of the control and statistics maps, map and program names, the
//! release mark, and the ABI version that guards reuse of pinned objects.
//! Never touches: any I/O, allocation or std. Everything here is `#![no_std]`,
//! `#[repr(C)]` and `Copy`; sizes are asserted at compile time so both sides agree.
#![no_std]

/// Bumped on any change to the layouts or meanings below. Userspace refuses to reuse
/// pinned maps whose `CTL_ABI` slot holds another value.
pub const ABI_VERSION: u64 = 1;

/// `skb->mark` the release program sets on frames it reinjects into the vif's ingress
/// path. The capture program lets frames with this mark pass (and clears it). "REMS".
pub const RELEASE_MARK: u32 = 0x5245_4d53;

/// Largest frame the capture program copies: a 64 KiB GSO super-frame plus room for
/// link-layer headers. Larger frames are dropped and counted (never passed unheld).
pub const MAX_FRAME: u32 = 65536 + 256;

/// Shortest frame the capture program copies (an Ethernet header); shorter ones are
/// dropped and counted.
pub const ETH_HLEN: u32 = 14;

/// Program names as they appear in the object, in `bpftool prog`, and in pins.
pub const PROG_VIF_IN: &str = "remus_vif_in";
pub const PROG_RELEASE: &str = "remus_release";

/// Map names (object symbols; also the pin file names under /sys/fs/bpf/remus/<iface>/).
pub const MAP_CONTROL: &str = "REMUS_CONTROL";
pub const MAP_STATS: &str = "REMUS_STATS";
pub const MAP_RING: &str = "REMUS_RING";

/// Slots of the control array (`BPF_MAP_TYPE_ARRAY` of u64). Each slot is one u64 so
/// that a userspace update of one value is a single aligned 8-byte store.
pub const CTL_ABI: u32 = 0;
/// Epoch stamped into every captured frame. Userspace bumps it at a checkpoint.
pub const CTL_EPOCH: u32 = 1;
/// One of the `MODE_*` values.
pub const CTL_MODE: u32 = 2;
/// ifindex of the vif (the release program redirects to it).
pub const CTL_VIF_IFINDEX: u32 = 3;
pub const CONTROL_LEN: u32 = 8;

/// Hold every frame (default).
pub const MODE_HOLD: u64 = 0;
/// Let frames pass untouched (backup lost, or the operator asked for it).
pub const MODE_PASSTHROUGH: u64 = 1;

/// Slots of the per-CPU statistics array (`BPF_MAP_TYPE_PERCPU_ARRAY` of u64).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Frames copied into the ring and dropped at the vif (held by userspace now).
    Captured = 0,
    CapturedBytes = 1,
    /// Frames that carried `RELEASE_MARK` and were let into the bridge.
    PassedReleased = 2,
    /// Frames let through because the mode is pass-through.
    PassedThrough = 3,
    /// Frames over `MAX_FRAME`: dropped, never passed.
    DropOversize = 4,
    /// The ring had no room: dropped (userspace is behind or gone).
    DropRingFull = 5,
    /// `bpf_skb_load_bytes` failed: dropped.
    DropLoad = 6,
    /// Frames the release program redirected into the vif's ingress path.
    Redirected = 7,
    /// Redirect failed (vif gone, or no vif ifindex configured).
    RedirectErr = 8,
    /// Frames shorter than an Ethernet header: dropped.
    DropRunt = 9,
}
pub const STATS_LEN: u32 = 16;

impl Stat {
    pub const ALL: [Stat; 10] = [
        Stat::Captured,
        Stat::CapturedBytes,
        Stat::PassedReleased,
        Stat::PassedThrough,
        Stat::DropOversize,
        Stat::DropRingFull,
        Stat::DropLoad,
        Stat::Redirected,
        Stat::RedirectErr,
        Stat::DropRunt,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::Captured => "captured_frames",
            Stat::CapturedBytes => "captured_bytes",
            Stat::PassedReleased => "passed_released_frames",
            Stat::PassedThrough => "passed_through_frames",
            Stat::DropOversize => "dropped_oversize_frames",
            Stat::DropRingFull => "dropped_ring_full_frames",
            Stat::DropLoad => "dropped_load_error_frames",
            Stat::Redirected => "redirected_frames",
            Stat::RedirectErr => "redirect_error_frames",
            Stat::DropRunt => "dropped_runt_frames",
        }
    }
}

/// Header of one record in the ring buffer; the frame's bytes follow it immediately
/// (at offset `size_of::<FrameHdr>()`), `len` of them.
///
/// Fields come from `__sk_buff` at capture time: what a byte copy of the frame would lose
/// and the release path has to rebuild (GSO geometry, out-of-band VLAN tag, priority).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameHdr {
    /// Epoch the frame was emitted in (`CTL_EPOCH` when captured).
    pub epoch: u64,
    /// Bytes of frame data following this header.
    pub len: u32,
    /// `skb->gso_size` (0 for a frame that is not GSO).
    pub gso_size: u32,
    /// `skb->gso_segs`.
    pub gso_segs: u32,
    /// `skb->priority`.
    pub priority: u32,
    /// Out-of-band (accelerated) VLAN TCI, valid when `vlan_proto != 0`.
    pub vlan_tci: u16,
    /// TPID of the out-of-band VLAN tag in host order (0x8100, 0x88a8), 0 when none.
    pub vlan_proto: u16,
    /// `skb->protocol` in host order.
    pub protocol: u16,
    /// Reserved, zero.
    pub flags: u16,
}

pub const FRAME_HDR_LEN: usize = core::mem::size_of::<FrameHdr>();
const _: () = assert!(FRAME_HDR_LEN == 32);
const _: () = assert!(core::mem::align_of::<FrameHdr>() == 8);

/// Ring reservations are made in these constant sizes (the verifier needs a constant
/// size per `bpf_ringbuf_reserve` call); a frame goes into the smallest class that holds
/// header + frame. Fine classes keep the waste per small frame low.
pub const SIZE_CLASSES: [u32; 12] = [
    128,
    256,
    512,
    1024,
    1600,
    2048,
    4096,
    8192,
    16384,
    32768,
    49152,
    MAX_FRAME + FRAME_HDR_LEN as u32,
];

#[cfg(feature = "user")]
mod user {
    // SAFETY: FrameHdr is repr(C), Copy, has no padding (asserted size 32 = sum of fields)
    // and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::FrameHdr {}
}

impl FrameHdr {
    /// Parses a header from the start of a ring record (userspace side).
    pub fn from_bytes(b: &[u8]) -> Option<FrameHdr> {
        if b.len() < FRAME_HDR_LEN {
            return None;
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_ne_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_ne_bytes(a)
        };
        let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
        Some(FrameHdr {
            epoch: u64_at(0),
            len: u32_at(8),
            gso_size: u32_at(12),
            gso_segs: u32_at(16),
            priority: u32_at(20),
            vlan_tci: u16_at(24),
            vlan_proto: u16_at(26),
            protocol: u16_at(28),
            flags: u16_at(30),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_are_increasing_and_cover_max_frame() {
        for w in SIZE_CLASSES.windows(2) {
            assert!(w[0] < w[1]);
        }
        assert!(SIZE_CLASSES[SIZE_CLASSES.len() - 1] >= MAX_FRAME + FRAME_HDR_LEN as u32);
        assert!(SIZE_CLASSES[4] >= 1514 + FRAME_HDR_LEN as u32 + 4);
    }

    #[test]
    fn header_round_trips_through_bytes() {
        let h = FrameHdr {
            epoch: 7,
            len: 1514,
            gso_size: 1448,
            gso_segs: 3,
            priority: 5,
            vlan_tci: 0x2064,
            vlan_proto: 0x8100,
            protocol: 0x0800,
            flags: 0,
        };
        // SAFETY: FrameHdr is repr(C) with no padding.
        let bytes: [u8; FRAME_HDR_LEN] = unsafe { core::mem::transmute(h) };
        assert_eq!(FrameHdr::from_bytes(&bytes), Some(h));
        assert_eq!(FrameHdr::from_bytes(&bytes[..31]), None);
    }

    #[test]
    fn stat_names_are_unique_and_fit() {
        for (i, a) in Stat::ALL.iter().enumerate() {
            assert!((*a as u32) < STATS_LEN);
            for b in &Stat::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
