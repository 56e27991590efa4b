//! The remus data plane: two TC programs.
//!
//! Owns: what happens to each frame in the kernel. `remus_vif_in` runs on the vif's TC
//! ingress hook (on dom0 the vif's ingress is the guest's egress): it stamps every frame
//! with the current epoch, copies it with its skb metadata into the ring buffer and drops
//! the original; frames carrying `RELEASE_MARK` pass (they are being released), and in
//! pass-through mode everything passes. `remus_release` runs on the helper tap's TC
//! ingress: every frame userspace writes there is marked and redirected into the vif's
//! ingress path, so the bridge sees it arrive from the guest's port.
//! Never touches: frame contents (it copies, never rewrites), other devices, anything
//! but the three maps below. It fails closed: if anything goes wrong a frame is dropped
//! and counted, never passed unheld.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_skb_load_bytes,
    macros::{classifier, map},
    maps::{Array, PerCpuArray, RingBuf},
    programs::TcContext,
};
use remus_common::{
    CONTROL_LEN, CTL_EPOCH, CTL_MODE, CTL_VIF_IFINDEX, ETH_HLEN, FRAME_HDR_LEN, FrameHdr,
    MAX_FRAME, MODE_PASSTHROUGH, RELEASE_MARK, STATS_LEN, Stat,
};

/// Control slots (epoch, mode, vif ifindex, ABI): written by userspace only.
#[map(name = "REMUS_CONTROL")]
static REMUS_CONTROL: Array<u64> = Array::pinned(CONTROL_LEN, 0);

/// Per-CPU counters, summed by userspace.
#[map(name = "REMUS_STATS")]
static REMUS_STATS: PerCpuArray<u64> = PerCpuArray::pinned(STATS_LEN, 0);

/// Captured frames: `FrameHdr` + bytes. Userspace sets the real size at load time.
#[map(name = "REMUS_RING")]
static REMUS_RING: RingBuf = RingBuf::pinned(64 << 20, 0);

#[inline(always)]
fn count(stat: Stat, n: u64) {
    if let Some(p) = REMUS_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, this program is not re-entered on the same CPU.
        unsafe { *p += n };
    }
}

#[inline(always)]
fn control(slot: u32) -> u64 {
    match REMUS_CONTROL.get(slot) {
        Some(v) => *v,
        None => 0,
    }
}

#[classifier]
pub fn remus_vif_in(ctx: TcContext) -> i32 {
    // SAFETY: the classifier context is a valid __sk_buff for the program's lifetime.
    let skb = unsafe { &mut *ctx.skb.skb };
    if skb.mark == RELEASE_MARK {
        // A frame userspace released: let it into the bridge, and do not let the mark
        // leak further into the host.
        skb.mark = 0;
        count(Stat::PassedReleased, 1);
        return TC_ACT_OK as i32;
    }
    if control(CTL_MODE) == MODE_PASSTHROUGH {
        count(Stat::PassedThrough, 1);
        return TC_ACT_OK as i32;
    }
    let len = skb.len;
    // Two separate checks with separate counters, on purpose: the verifier of older
    // kernels (6.1, dom0) cannot learn "len != 0" from `len == 0`, and LLVM would fold a
    // combined range check into arithmetic on a copy of len. Comparing len itself against
    // non-zero bounds gives the verifier len in [ETH_HLEN, MAX_FRAME] for the copy below.
    if len < ETH_HLEN {
        count(Stat::DropRunt, 1);
        return TC_ACT_SHOT as i32;
    }
    if len > MAX_FRAME {
        count(Stat::DropOversize, 1);
        return TC_ACT_SHOT as i32;
    }
    let hdr = FrameHdr {
        epoch: control(CTL_EPOCH),
        len,
        gso_size: skb.gso_size,
        gso_segs: skb.gso_segs,
        priority: skb.priority,
        vlan_tci: if skb.vlan_present != 0 {
            skb.vlan_tci as u16
        } else {
            0
        },
        vlan_proto: if skb.vlan_present != 0 {
            u16::from_be(skb.vlan_proto as u16)
        } else {
            0
        },
        protocol: u16::from_be(skb.protocol as u16),
        flags: 0,
    };
    let ok = capture(&ctx, &hdr, len);
    if ok {
        count(Stat::Captured, 1);
        count(Stat::CapturedBytes, len as u64);
    }
    // Held or not, the original never passes.
    TC_ACT_SHOT as i32
}

/// Reserves the smallest size class that fits, copies header and frame in, submits.
/// The verifier needs a constant size per reservation, hence one arm per class.
#[inline(always)]
fn capture(ctx: &TcContext, hdr: &FrameHdr, len: u32) -> bool {
    let total = len + FRAME_HDR_LEN as u32;
    macro_rules! class {
        ($($n:expr),*) => {
            $(
                if total <= $n {
                    return capture_class::<{ $n }>(ctx, hdr, len);
                }
            )*
        };
    }
    // Keep in step with remus_common::SIZE_CLASSES (a unit test there checks coverage).
    class!(
        128, 256, 512, 1024, 1600, 2048, 4096, 8192, 16384, 32768, 49152
    );
    capture_class::<{ (MAX_FRAME as usize) + FRAME_HDR_LEN }>(ctx, hdr, len)
}

#[inline(always)]
fn capture_class<const N: usize>(ctx: &TcContext, hdr: &FrameHdr, len: u32) -> bool {
    let Some(mut entry) = REMUS_RING.reserve::<[u8; N]>(0) else {
        count(Stat::DropRingFull, 1);
        return false;
    };
    let base = entry.as_mut_ptr() as *mut u8;
    // SAFETY: the reservation is N >= FRAME_HDR_LEN bytes, 8-byte aligned.
    unsafe { core::ptr::write(base as *mut FrameHdr, *hdr) };
    let max = (N - FRAME_HDR_LEN) as u32;
    // `len` is the caller's register, already known to be >= ETH_HLEN.
    if len > max {
        entry.discard(0);
        count(Stat::DropLoad, 1);
        return false;
    }
    // SAFETY: [FRAME_HDR_LEN, FRAME_HDR_LEN + len) lies inside the reservation (len <= max).
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            0,
            base.add(FRAME_HDR_LEN) as *mut _,
            len,
        )
    };
    if ret != 0 {
        entry.discard(0);
        count(Stat::DropLoad, 1);
        return false;
    }
    entry.submit(0);
    true
}

#[classifier]
pub fn remus_release(ctx: TcContext) -> i32 {
    let vif = control(CTL_VIF_IFINDEX) as u32;
    if vif == 0 {
        count(Stat::RedirectErr, 1);
        return TC_ACT_SHOT as i32;
    }
    ctx.set_mark(RELEASE_MARK);
    // SAFETY: plain helper call on the program's own skb.
    let r = unsafe { aya_ebpf::helpers::bpf_redirect(vif, BPF_F_INGRESS as u64) };
    if r == aya_ebpf::bindings::TC_ACT_REDIRECT as i64 {
        count(Stat::Redirected, 1);
    } else {
        count(Stat::RedirectErr, 1);
    }
    r as i32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
