//! AEAD side of `cargo xtask bench relay`: seal and open throughput of the candidate
//! ciphers for the replication channel on this machine, in place on relay-sized frames
//! (64 KiB DATA, 1 MiB PAGE_DATA-sized, 8-byte ACK), one thread. Prints one line of JSON.
//! Opening includes copying the frame in (as from the socket's buffer).
//!
//! ```text
//! aead_bench [MIB_PER_CASE]     # default 256 MiB sealed and opened per case
//! ```
//!
//! The candidates are measured side by side in one run (the machine is shared and noisy):
//! RustCrypto's `aes-gcm` and `chacha20poly1305`, and `ring`'s two AEADs. The one the
//! relay uses is `remus_user::replication::seal::ALGORITHM`.
use std::time::Instant;

use aes_gcm::aead::{AeadInOut, KeyInit};
use serde_json::{Value, json};

const SIZES: [usize; 3] = [64 * 1024, 1 << 20, 8];

/// Seals `total` bytes in frames of `size` in place (seal rate); then opens as many
/// frames in place, each first copied in from one of 4 sealed originals (open rate,
/// copy included, as a frame read from the socket would be).
fn run(
    total: usize,
    size: usize,
    mut seal: impl FnMut(u64, &mut [u8]) -> [u8; 16],
    mut open: impl FnMut(u64, &mut [u8], &[u8; 16]) -> bool,
) -> Result<(f64, f64), String> {
    let frames = (total / size).max(1);
    let mut bufs: Vec<Vec<u8>> = (0..4)
        .map(|i| (0..size).map(|b| (b * 31 + i) as u8).collect())
        .collect();
    let t = Instant::now();
    for n in 0..frames {
        std::hint::black_box(seal(n as u64, &mut bufs[n % 4]));
    }
    let sealing = t.elapsed().as_secs_f64();
    let sealed: Vec<(Vec<u8>, [u8; 16])> = (0..4u64)
        .map(|i| {
            let mut b = bufs[i as usize].clone();
            let tag = seal(i, &mut b);
            (b, tag)
        })
        .collect();
    let mut work = vec![0u8; size];
    let t = Instant::now();
    for n in 0..frames {
        let (orig, tag) = &sealed[n % 4];
        work.copy_from_slice(orig);
        if !open((n % 4) as u64, &mut work, tag) {
            return Err(format!("frame {n} of {size} bytes did not open"));
        }
    }
    let opening = t.elapsed().as_secs_f64();
    let mb = (frames * size) as f64 / 1e6;
    Ok((mb / sealing, mb / opening))
}

fn nonce12(n: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[4..].copy_from_slice(&n.to_be_bytes());
    b
}

fn rustcrypto<A: AeadInOut + KeyInit>(total: usize, size: usize) -> Result<(f64, f64), String> {
    let key = [0x42u8; 32];
    let a = A::new_from_slice(&key).map_err(|e| e.to_string())?;
    let aad = [0u8; 16];
    let seal = |n: u64, b: &mut [u8]| {
        let nonce = aead_nonce::<A>(n);
        let tag = a
            .encrypt_inout_detached(&nonce, &aad, b.into())
            .unwrap_or_default();
        let mut t = [0u8; 16];
        t.copy_from_slice(tag.as_slice());
        t
    };
    let open = |n: u64, b: &mut [u8], t: &[u8; 16]| {
        let nonce = aead_nonce::<A>(n);
        let Ok(tag) = aes_gcm::aead::Tag::<A>::try_from(&t[..]) else {
            return false;
        };
        a.decrypt_inout_detached(&nonce, &aad, b.into(), &tag)
            .is_ok()
    };
    run(total, size, seal, open)
}

fn aead_nonce<A: AeadInOut>(n: u64) -> aes_gcm::aead::Nonce<A> {
    let mut nonce = aes_gcm::aead::Nonce::<A>::default();
    nonce.copy_from_slice(&nonce12(n));
    nonce
}

fn ring(
    alg: &'static ring::aead::Algorithm,
    total: usize,
    size: usize,
) -> Result<(f64, f64), String> {
    use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey};
    let key = LessSafeKey::new(UnboundKey::new(alg, &[0x42u8; 32]).map_err(|e| e.to_string())?);
    // A failed seal gives a zero tag, which then fails to open (reported).
    let seal = |n: u64, b: &mut [u8]| {
        key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce12(n)),
            Aad::from([0u8; 16]),
            b,
        )
        .map(|t| {
            let mut a = [0u8; 16];
            a.copy_from_slice(t.as_ref());
            a
        })
        .unwrap_or_default()
    };
    let open = |n: u64, b: &mut [u8], t: &[u8; 16]| {
        let Ok(tag) = Tag::try_from(&t[..]) else {
            return false;
        };
        key.open_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce12(n)),
            Aad::from([0u8; 16]),
            tag,
            b,
            0..,
        )
        .is_ok()
    };
    run(total, size, seal, open)
}

fn main() -> Result<(), String> {
    let mib: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|e| format!("MIB_PER_CASE: {e}"))?,
        None => 256,
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpu
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    let mut cases = serde_json::Map::new();
    for size in SIZES {
        // Small frames: fewer bytes (the per-frame cost is what they show).
        let total = if size < 4096 { mib << 14 } else { mib << 20 };
        let mut row = serde_json::Map::new();
        for (name, r) in [
            (
                "aes-gcm AES-256-GCM",
                rustcrypto::<aes_gcm::Aes256Gcm>(total, size),
            ),
            (
                "chacha20poly1305 ChaCha20-Poly1305",
                rustcrypto::<chacha20poly1305::ChaCha20Poly1305>(total, size),
            ),
            (
                "ring AES-256-GCM",
                ring(&ring::aead::AES_256_GCM, total, size),
            ),
            (
                "ring ChaCha20-Poly1305",
                ring(&ring::aead::CHACHA20_POLY1305, total, size),
            ),
        ] {
            let (s, o) = r?;
            row.insert(name.into(), json!({ "seal_mb_s": s, "open_mb_s": o }));
        }
        cases.insert(format!("{size}"), Value::Object(row));
    }
    println!(
        "{}",
        json!({
            "cpu_aes": has("aes"),
            "cpu_pclmulqdq": has("pclmulqdq"),
            "cpu_avx2": has("avx2"),
            "mib_per_case": mib,
            "frame_bytes": cases,
        })
    );
    Ok(())
}
