//! Key derivation of the sealed channel: the handshake transcript, the two per-direction
//! traffic secrets, and the ratchet that rekeys a direction.
//!
//! Owns: HKDF-SHA256 over the pre-shared key, both nonces and the transcript. Never
//! touches: frames, sockets, the proofs of the handshake (`auth`), sealing (`seal`).
//!
//! ```text
//! th         = SHA-256("remus-relay v3 transcript" ‖ HELLO payload ‖ version ‖ nonce_b)
//! prk        = HKDF-Extract(salt = nonce_p ‖ nonce_b, ikm = pre-shared key)
//! secret_p2b = HKDF-Expand(prk, "remus-relay v3 primary to backup" ‖ th, 32)
//! secret_b2p = HKDF-Expand(prk, "remus-relay v3 backup to primary" ‖ th, 32)
//! per key epoch of a direction (epoch 0 from the secret above):
//!   key  = HKDF-Expand(secret, "key", 32)     AES-256-GCM key
//!   iv   = HKDF-Expand(secret, "iv", 12)      nonce = iv XOR frame counter (64-bit, big-endian)
//!   next = HKDF-Expand(secret, "next", 32)    the secret of the next epoch (old one dropped)
//! ```
//!
//! Binding the transcript (versions, codec, cache size, the probe flag, both nonces) into the secrets
//! means a man in the middle who rewrites HELLO ends with keys that do not match: the
//! first sealed frame (WELCOME) fails to open. The proofs of `auth` cover the same
//! transcript, so such a rewrite is already refused one step earlier.
use hkdf::Hkdf;
use sha2::{Digest, Sha256};

use super::{Hello, Message};

const LABEL_TRANSCRIPT: &[u8] = b"remus-relay v3 transcript";
const LABEL_P2B: &[u8] = b"remus-relay v3 primary to backup";
const LABEL_B2P: &[u8] = b"remus-relay v3 backup to primary";

/// A 32-byte secret. Its bytes never appear in Debug output.
#[derive(Clone)]
pub struct Secret(pub(crate) [u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The HELLO payload exactly as this build encodes it (both ends hash the same bytes:
/// the fields they understood, reserved bytes zero).
fn hello_payload(h: &Hello) -> Vec<u8> {
    let mut frame = Vec::with_capacity(64);
    Message::Hello(*h).encode(&mut frame);
    frame.split_off(super::HEADER_LEN)
}

/// The transcript hash: what the primary asked for and what the backup answered.
pub fn transcript(hello: &Hello, version: u16, nonce_b: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(LABEL_TRANSCRIPT);
    h.update(hello_payload(hello));
    h.update(version.to_le_bytes());
    h.update(nonce_b);
    h.finalize().into()
}

/// The two traffic secrets: (primary → backup, backup → primary).
pub fn traffic_secrets(
    psk: &[u8],
    nonce_p: &[u8; 32],
    nonce_b: &[u8; 32],
    th: &[u8; 32],
) -> (Secret, Secret) {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(nonce_p);
    salt[32..].copy_from_slice(nonce_b);
    let hk = Hkdf::<Sha256>::new(Some(&salt), psk);
    let expand = |label: &[u8]| {
        let mut out = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's limit of 8160: cannot fail.
        hk.expand_multi_info(&[label, th], &mut out)
            .unwrap_or_else(|_| unreachable!());
        Secret(out)
    };
    (expand(LABEL_P2B), expand(LABEL_B2P))
}

/// Key material of one epoch of a direction: (AES-256 key, IV, next epoch's secret).
pub fn epoch(secret: &Secret) -> ([u8; 32], [u8; 12], Secret) {
    // A 32-byte secret is a valid PRK for SHA-256.
    let hk = Hkdf::<Sha256>::from_prk(&secret.0).unwrap_or_else(|_| unreachable!());
    let mut key = [0u8; 32];
    let mut iv = [0u8; 12];
    let mut next = [0u8; 32];
    for (label, out) in [
        (&b"key"[..], &mut key[..]),
        (b"iv", &mut iv[..]),
        (b"next", &mut next[..]),
    ] {
        hk.expand(label, out).unwrap_or_else(|_| unreachable!());
    }
    (key, iv, Secret(next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::Codec;

    fn hello() -> Hello {
        Hello {
            max_version: 3,
            min_version: 3,
            codec: Codec::Lz4,
            cache_pages: 1024,
            probe: false,
            nonce: [1; 32],
        }
    }

    #[test]
    fn every_field_of_the_transcript_changes_the_secrets() {
        let nb = [2u8; 32];
        let base = transcript(&hello(), 3, &nb);
        let mut variants = vec![
            transcript(
                &Hello {
                    max_version: 4,
                    ..hello()
                },
                3,
                &nb,
            ),
            transcript(
                &Hello {
                    min_version: 2,
                    ..hello()
                },
                3,
                &nb,
            ),
            transcript(
                &Hello {
                    codec: Codec::None,
                    ..hello()
                },
                3,
                &nb,
            ),
            transcript(
                &Hello {
                    cache_pages: 1023,
                    ..hello()
                },
                3,
                &nb,
            ),
            transcript(
                &Hello {
                    nonce: [9; 32],
                    ..hello()
                },
                3,
                &nb,
            ),
            transcript(
                &Hello {
                    probe: true,
                    ..hello()
                },
                3,
                &nb,
            ),
            transcript(&hello(), 2, &nb),
            transcript(&hello(), 3, &[3; 32]),
        ];
        variants.push(base);
        let mut sorted = variants.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), variants.len(), "all transcripts differ");

        let (p2b, b2p) = traffic_secrets(b"key", &[1; 32], &nb, &base);
        assert_ne!(p2b.0, b2p.0, "the two directions have different secrets");
        for th in &variants[..variants.len() - 1] {
            let (a, b) = traffic_secrets(b"key", &[1; 32], &nb, th);
            assert_ne!(a.0, p2b.0);
            assert_ne!(b.0, b2p.0);
        }
        let (a, _) = traffic_secrets(b"other key", &[1; 32], &nb, &base);
        assert_ne!(a.0, p2b.0, "the pre-shared key matters");
        let (a, _) = traffic_secrets(b"key", &[1; 32], &[7; 32], &base);
        assert_ne!(a.0, p2b.0, "the backup's nonce matters");
    }

    #[test]
    fn the_ratchet_moves_forward() {
        let (s, _) = traffic_secrets(b"key", &[1; 32], &[2; 32], &[3; 32]);
        let (k0, iv0, s1) = epoch(&s);
        let (k1, iv1, s2) = epoch(&s1);
        assert_ne!(k0, k1);
        assert_ne!(iv0, iv1);
        assert_ne!(s1.0, s2.0);
        assert_ne!(s1.0, s.0);
        // Deterministic: both ends derive the same.
        assert_eq!(epoch(&s).0, k0);
        assert_eq!(format!("{s:?}"), "Secret(..)");
    }
}
