//! Tier 2 (root): the real eBPF object under BPF_PROG_TEST_RUN: frames in, verdicts and
//! map state out. Every test loads its own copy of the object with its own maps, pinned
//! under a private bpffs directory that is removed afterwards.
//!
//! BPF_PROG_TEST_RUN limits skb test data to about one page, so frames larger than ~3.5
//! KiB (GSO super-frames, the oversize limit) are covered by the netns tier instead.
use std::path::PathBuf;

use aya::programs::{TestRun, TestRunOptions};
use remus_common::{
    CTL_EPOCH, CTL_MODE, CTL_VIF_IFINDEX, FRAME_HDR_LEN, FrameHdr, MODE_PASSTHROUGH, RELEASE_MARK,
};
use remus_user::datapath::{KernelStats, Loaded};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const SKB_CTX_LEN: usize = 192;

struct PinDir(PathBuf);
impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load(name: &str, ring_bytes: u32) -> (Loaded, PinDir) {
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/remus-test/{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let guard = PinDir(dir.clone());
    remus_user::datapath::ensure_bpffs().expect("bpffs at /sys/fs/bpf");
    let loaded = Loaded::load(&dir, "test", ring_bytes).expect("loading the real eBPF object");
    (loaded, guard)
}

/// A `struct __sk_buff` for ctx_in: only the fields the kernel lets a test set.
#[derive(Default)]
struct Ctx {
    mark: u32,
    priority: u32,
    gso_segs: u32,
    gso_size: u32,
}

impl Ctx {
    fn bytes(&self) -> [u8; SKB_CTX_LEN] {
        let mut b = [0u8; SKB_CTX_LEN];
        b[8..12].copy_from_slice(&self.mark.to_ne_bytes());
        b[32..36].copy_from_slice(&self.priority.to_ne_bytes());
        b[164..168].copy_from_slice(&self.gso_segs.to_ne_bytes());
        b[176..180].copy_from_slice(&self.gso_size.to_ne_bytes());
        b
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes()); // local experimental ethertype
    f
}

/// Runs `prog` once on `data`; returns (verdict, mark after the run).
fn run_prog(prog: &mut aya::programs::SchedClassifier, data: &[u8], ctx: &Ctx) -> (u32, u32) {
    let ctx_in = ctx.bytes();
    let mut ctx_out = [0u8; SKB_CTX_LEN];
    let mut data_out = vec![0u8; data.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(data),
            data_out: Some(&mut data_out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            repeat: 1,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    let mark = u32::from_ne_bytes([ctx_out[8], ctx_out[9], ctx_out[10], ctx_out[11]]);
    (r.return_value, mark)
}

/// Runs the capture program once; returns (verdict, mark after the run).
fn run_vif(l: &mut Loaded, data: &[u8], ctx: &Ctx) -> (u32, u32) {
    run_prog(l.vif_program().expect("program"), data, ctx)
}

fn records(l: &mut Loaded) -> Vec<(FrameHdr, Vec<u8>)> {
    let mut ring = l.take_ring().expect("ring");
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        let h = FrameHdr::from_bytes(&item).expect("record header");
        out.push((
            h,
            item[FRAME_HDR_LEN..FRAME_HDR_LEN + h.len as usize].to_vec(),
        ));
    }
    out
}

fn stats(l: &Loaded) -> KernelStats {
    l.stats().expect("stats")
}

#[test]
fn root_bpf_frame_is_recorded_with_its_epoch_and_dropped() {
    let (mut l, _g) = load("record", 1 << 20);
    l.set_control(CTL_EPOCH, 7).unwrap();
    let f = frame(98, 1);
    let (verdict, _) = run_vif(&mut l, &f, &Ctx::default());
    assert_eq!(verdict, TC_ACT_SHOT, "the original frame must be dropped");
    let recs = records(&mut l);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].0.epoch, 7);
    assert_eq!(recs[0].0.len, 98);
    assert_eq!(
        recs[0].0.protocol, 0x88b5,
        "skb->protocol comes from the ethertype"
    );
    assert_eq!(recs[0].1, f, "the copy must be byte-identical");
    let s = stats(&l);
    assert_eq!((s.captured_frames, s.captured_bytes), (1, 98));
    assert_eq!(s.passed_released_frames + s.passed_through_frames, 0);
}

#[test]
fn root_bpf_epoch_changes_apply_to_the_next_frame() {
    let (mut l, _g) = load("epochs", 1 << 20);
    for epoch in [1u64, 1, 2, 5] {
        l.set_control(CTL_EPOCH, epoch).unwrap();
        run_vif(&mut l, &frame(60, epoch as u8), &Ctx::default());
    }
    let epochs: Vec<u64> = records(&mut l).iter().map(|r| r.0.epoch).collect();
    assert_eq!(epochs, vec![1, 1, 2, 5], "ring order is capture order");
}

#[test]
fn root_bpf_released_mark_passes_and_is_cleared() {
    let (mut l, _g) = load("mark", 1 << 20);
    let (verdict, mark) = run_vif(
        &mut l,
        &frame(64, 2),
        &Ctx {
            mark: RELEASE_MARK,
            ..Default::default()
        },
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(mark, 0, "the release mark must not leak past the vif");
    assert!(records(&mut l).is_empty());
    assert_eq!(stats(&l).passed_released_frames, 1);
    // Any other mark is guest traffic like the rest: held.
    let (verdict, _) = run_vif(
        &mut l,
        &frame(64, 3),
        &Ctx {
            mark: RELEASE_MARK ^ 1,
            ..Default::default()
        },
    );
    assert_eq!(verdict, TC_ACT_SHOT);
}

#[test]
fn root_bpf_passthrough_mode_passes_everything() {
    let (mut l, _g) = load("pass", 1 << 20);
    l.set_control(CTL_MODE, MODE_PASSTHROUGH).unwrap();
    let (verdict, _) = run_vif(&mut l, &frame(200, 4), &Ctx::default());
    assert_eq!(verdict, TC_ACT_OK);
    assert!(records(&mut l).is_empty());
    assert_eq!(stats(&l).passed_through_frames, 1);
    assert_eq!(stats(&l).captured_frames, 0);
}

#[test]
fn root_bpf_every_size_class_boundary_is_copied_exactly() {
    let (mut l, _g) = load("classes", 4 << 20);
    let h = FRAME_HDR_LEN;
    let sizes = [
        14,
        128 - h,
        128 - h + 1,
        256 - h,
        512 - h,
        512 - h + 1,
        1024 - h,
        1514,
        1600 - h,
        1600 - h + 1,
        2048 - h,
        2048 - h + 1,
        3000,
    ];
    for (i, &n) in sizes.iter().enumerate() {
        run_vif(&mut l, &frame(n, i as u8), &Ctx::default());
    }
    let recs = records(&mut l);
    assert_eq!(recs.len(), sizes.len());
    for ((hdr, bytes), (i, &n)) in recs.iter().zip(sizes.iter().enumerate()) {
        assert_eq!(hdr.len as usize, n);
        assert_eq!(bytes, &frame(n, i as u8), "frame of {n} bytes");
    }
}

#[test]
fn root_bpf_gso_geometry_and_priority_are_recorded() {
    let (mut l, _g) = load("gso", 1 << 20);
    run_vif(
        &mut l,
        &frame(1514, 9),
        &Ctx {
            gso_size: 1448,
            gso_segs: 3,
            priority: 5,
            ..Default::default()
        },
    );
    let recs = records(&mut l);
    assert_eq!(recs.len(), 1);
    let h = recs[0].0;
    assert_eq!((h.gso_size, h.gso_segs, h.priority), (1448, 3, 5));
}

#[test]
fn root_bpf_a_full_ring_drops_and_counts_never_passes() {
    // One page of ring: a handful of 1 KiB records fit, then reservations fail.
    let (mut l, _g) = load("full", 4096);
    let mut verdicts = Vec::new();
    for i in 0..20 {
        verdicts.push(run_vif(&mut l, &frame(900, i), &Ctx::default()).0);
    }
    assert!(verdicts.iter().all(|&v| v == TC_ACT_SHOT), "{verdicts:?}");
    let s = stats(&l);
    assert!(s.dropped_ring_full_frames > 0, "{s:?}");
    assert_eq!(s.captured_frames + s.dropped_ring_full_frames, 20);
    assert_eq!(records(&mut l).len() as u64, s.captured_frames);
}

#[test]
fn root_bpf_release_program_marks_and_redirects_to_the_vif() {
    let (mut l, _g) = load("release", 1 << 20);
    let run = |l: &mut Loaded| {
        let prog = l.release_program().expect("release program");
        run_prog(prog, &frame(64, 1), &Ctx::default())
    };
    // No vif configured: fail closed.
    assert_eq!(run(&mut l).0, TC_ACT_SHOT);
    assert_eq!(stats(&l).redirect_error_frames, 1);
    l.set_control(CTL_VIF_IFINDEX, 1).unwrap();
    let (verdict, mark) = run(&mut l);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(mark, RELEASE_MARK);
    assert_eq!(stats(&l).redirected_frames, 1);
}
