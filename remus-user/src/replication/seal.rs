//! The sealed channel: every frame after the handshake is encrypted and authenticated
//! with AES-256-GCM (`ring`), one key per direction, the frame counter as the nonce.
//!
//! Owns: sealing and opening frames, the per-direction counters, rekeying. Never
//! touches: sockets (callers hand it bytes), the handshake's proofs (`auth`), where the
//! secrets come from (`kdf`).
//!
//! A sealed frame is the usual 16-byte header with flag [`FLAG_SEALED`], `len` = the
//! encrypted payload plus the 16-byte tag, and the header's last field holding the low 32
//! bits of the direction's frame counter (where a plain frame has its CRC). The whole
//! header is the AEAD's associated data; the nonce is the direction's IV XOR the full
//! 64-bit counter, which is never sent: each end counts for itself. So:
//!
//! - a flipped bit anywhere (header, payload, tag) fails the tag: [`WireError::Forged`];
//! - a replayed, reordered or dropped frame arrives with a counter other than the one due:
//!   [`WireError::OutOfOrder`] (and if its header is rewritten to the due counter, the
//!   nonce differs from the one it was sealed with, so the tag fails);
//! - a frame reflected back to its sender fails: the other direction has another key;
//! - after the first frame that fails, nothing more is opened ([`WireError::ChannelFailed`]).
//!
//! Rekeying: after [`LIMITS`] (64 GiB or 2^32 frames under one key, far below what
//! AES-GCM bears), both ends step the direction's secret through `kdf::epoch` and drop
//! the old one. Both count the same frames and payload bytes, so they step in lockstep
//! without a message.
use std::sync::{Arc, Mutex, MutexGuard};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use zerocopy::IntoBytes;

use super::kdf::{self, Secret};
use super::{
    FrameHeader, HEADER_LEN, Kind, MAGIC, MAX_PAYLOAD, Message, PayloadProblem, WireError,
};

/// The AEAD of protocol version 3 (chosen by measured throughput: docs/relay.md).
pub const ALGORITHM: &str = "AES-256-GCM";
/// Bytes of the authentication tag appended to every sealed payload.
pub const TAG_LEN: usize = 16;
/// Header flag of a sealed frame (the only flag defined).
pub const FLAG_SEALED: u16 = 1;

/// When a direction rekeys: after this many payload bytes or frames under one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub bytes: u64,
    pub frames: u64,
}

/// The limits of the protocol (both ends must use the same). AES-256-GCM with unique
/// nonces keeps an attacker's advantage below 2^-60 up to ~2^38 blocks per key; 64 GiB
/// is 2^32 blocks.
pub const LIMITS: Limits = Limits {
    bytes: 1 << 36,
    frames: 1 << 32,
};

/// Which end of the connection this is (decides which secret seals, which opens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Backup,
}

/// One direction's state: the current key, its counters, the next epoch's secret.
struct Direction {
    key: LessSafeKey,
    iv: [u8; 12],
    /// The next epoch's secret (the current one is gone).
    next: Secret,
    /// Frames sealed (or opened) in this direction so far, over all epochs.
    counter: u64,
    epoch: u64,
    epoch_frames: u64,
    epoch_bytes: u64,
    limits: Limits,
    /// An opener that met a bad frame opens nothing more.
    failed: bool,
}

impl Direction {
    fn new(secret: &Secret, limits: Limits) -> Direction {
        let (key, iv, next) = kdf::epoch(secret);
        Direction {
            key: aes_key(&key),
            iv,
            next,
            counter: 0,
            epoch: 0,
            epoch_frames: 0,
            epoch_bytes: 0,
            limits,
            failed: false,
        }
    }

    fn nonce(&self) -> Nonce {
        let mut n = self.iv;
        for (b, c) in n[4..].iter_mut().zip(self.counter.to_be_bytes()) {
            *b ^= c;
        }
        Nonce::assume_unique_for_key(n)
    }

    /// One frame of `bytes` payload bytes is done: count it, rekey at the limits.
    fn advance(&mut self, bytes: usize) {
        self.counter += 1;
        self.epoch_frames += 1;
        self.epoch_bytes = self.epoch_bytes.saturating_add(bytes as u64);
        if self.epoch_frames >= self.limits.frames || self.epoch_bytes >= self.limits.bytes {
            let (key, iv, next) = kdf::epoch(&self.next);
            self.key = aes_key(&key);
            self.iv = iv;
            self.next = next;
            self.epoch += 1;
            self.epoch_frames = 0;
            self.epoch_bytes = 0;
        }
    }
}

fn aes_key(k: &[u8; 32]) -> LessSafeKey {
    // A 32-byte key is what AES-256 takes: cannot fail.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k).unwrap_or_else(|_| unreachable!()))
}

fn lock(d: &Mutex<Direction>) -> MutexGuard<'_, Direction> {
    // The state is consistent at every point a panic could leave it (the counter moves
    // only after a frame is complete), so a poisoned lock is still usable.
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// Seals this end's outgoing frames. Clones share one counter, so two handles can never
/// seal under the same nonce.
#[derive(Clone)]
pub struct Sealer(Arc<Mutex<Direction>>);

/// Opens the peer's frames, in order. Clones share one counter.
#[derive(Clone)]
pub struct Opener(Arc<Mutex<Direction>>);

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = lock(&self.0);
        write!(f, "Sealer(frame {}, key epoch {})", d.counter, d.epoch)
    }
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = lock(&self.0);
        write!(f, "Opener(frame {}, key epoch {})", d.counter, d.epoch)
    }
}

/// Both directions of one session.
#[derive(Clone, Debug)]
pub struct Keys {
    pub sealer: Sealer,
    pub opener: Opener,
}

impl Keys {
    /// The keys of `role` from the two traffic secrets (`kdf::traffic_secrets`).
    pub fn new(role: Role, p2b: &Secret, b2p: &Secret) -> Keys {
        Keys::with_limits(role, p2b, b2p, LIMITS)
    }

    /// As [`Keys::new`] with other rekey limits (tests: both ends must agree).
    pub fn with_limits(role: Role, p2b: &Secret, b2p: &Secret, limits: Limits) -> Keys {
        let (out, inn) = match role {
            Role::Primary => (p2b, b2p),
            Role::Backup => (b2p, p2b),
        };
        Keys {
            sealer: Sealer(Arc::new(Mutex::new(Direction::new(out, limits)))),
            opener: Opener(Arc::new(Mutex::new(Direction::new(inn, limits)))),
        }
    }
}

impl Sealer {
    /// Appends `m` as one sealed frame to `out`. The payload is encrypted in place.
    pub fn encode(&self, m: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        m.encode_payload(out);
        self.seal_in_place(m.kind(), out, start)
    }

    /// Seals the frame a caller built at `out[start..]`: [`HEADER_LEN`] bytes of room for
    /// the header, then the payload. Writes the header, encrypts the payload in place and
    /// appends the tag (reserve [`TAG_LEN`] bytes of capacity to avoid a reallocation).
    /// For senders whose payload already sits in a buffer of their own (the disk
    /// stream), so it is sealed without being copied into a [`Message`]. On error
    /// `out` is truncated to `start`.
    pub fn seal_in_place(
        &self,
        kind: Kind,
        out: &mut Vec<u8>,
        start: usize,
    ) -> Result<(), WireError> {
        let Some(body) = out.len().checked_sub(start + HEADER_LEN) else {
            out.truncate(start);
            return Err(WireError::BadPayload {
                kind,
                problem: PayloadProblem::TooShort {
                    got: out.len().saturating_sub(start),
                    min: HEADER_LEN,
                },
            });
        };
        let len = body + TAG_LEN;
        if len > MAX_PAYLOAD as usize {
            out.truncate(start);
            return Err(WireError::Oversize {
                len: u32::try_from(len).unwrap_or(u32::MAX),
                max: MAX_PAYLOAD,
            });
        }
        let mut d = lock(&self.0);
        if d.counter == u64::MAX {
            out.truncate(start);
            return Err(WireError::Exhausted);
        }
        let hdr = FrameHeader {
            magic: MAGIC,
            kind: (kind as u16).into(),
            flags: FLAG_SEALED.into(),
            len: (len as u32).into(),
            crc: (d.counter as u32).into(),
        };
        let (head, payload) = out[start..].split_at_mut(HEADER_LEN);
        head.copy_from_slice(hdr.as_bytes());
        let tag = d
            .key
            .seal_in_place_separate_tag(d.nonce(), Aad::from(hdr.as_bytes()), payload)
            .map_err(|_| WireError::BadPayload {
                kind,
                problem: PayloadProblem::TooLong {
                    got: body,
                    max: MAX_PAYLOAD as usize - TAG_LEN,
                },
            });
        let tag = match tag {
            Ok(t) => t,
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        };
        out.extend_from_slice(tag.as_ref());
        d.advance(body);
        Ok(())
    }

    /// Seals `m`, writes it and flushes.
    pub async fn send<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        w: &mut W,
        m: &Message,
    ) -> Result<(), WireError> {
        use tokio::io::AsyncWriteExt;
        let mut buf = Vec::with_capacity(HEADER_LEN + TAG_LEN + 64);
        self.encode(m, &mut buf)?;
        w.write_all(&buf).await?;
        w.flush().await?;
        Ok(())
    }

    /// Frames sealed so far.
    pub fn frames(&self) -> u64 {
        lock(&self.0).counter
    }

    /// Rekeyings so far.
    pub fn key_epoch(&self) -> u64 {
        lock(&self.0).epoch
    }
}

impl Opener {
    /// Opens the frame with header `hdr` (checked by `check_header`) whose payload and
    /// tag are `body`, in place. Returns the plaintext length (the front of `body`).
    /// Any failure is final: later frames are refused too.
    pub fn open(&self, hdr: &FrameHeader, kind: Kind, body: &mut [u8]) -> Result<usize, WireError> {
        let mut d = lock(&self.0);
        if d.failed {
            return Err(WireError::ChannelFailed);
        }
        let r = Self::open_locked(&mut d, hdr, kind, body);
        if r.is_err() {
            d.failed = true;
        }
        r
    }

    fn open_locked(
        d: &mut Direction,
        hdr: &FrameHeader,
        kind: Kind,
        body: &mut [u8],
    ) -> Result<usize, WireError> {
        if hdr.flags.get() & FLAG_SEALED == 0 {
            return Err(WireError::Unsealed { kind });
        }
        let found = hdr.crc.get();
        let expected = d.counter as u32;
        if found != expected {
            return Err(WireError::OutOfOrder {
                kind,
                found,
                expected,
            });
        }
        let Some(n) = body.len().checked_sub(TAG_LEN) else {
            return Err(WireError::BadPayload {
                kind,
                problem: PayloadProblem::TooShort {
                    got: body.len(),
                    min: TAG_LEN,
                },
            });
        };
        let (payload, tag) = body.split_at_mut(n);
        let tag = Tag::try_from(&tag[..]).map_err(|_| WireError::Forged {
            kind,
            seq: d.counter,
        })?;
        d.key
            .open_in_place_separate_tag(d.nonce(), Aad::from(hdr.as_bytes()), tag, payload, 0..)
            .map_err(|_| WireError::Forged {
                kind,
                seq: d.counter,
            })?;
        d.advance(n);
        Ok(n)
    }

    /// Frames opened so far.
    pub fn frames(&self) -> u64 {
        lock(&self.0).counter
    }

    /// Rekeyings so far.
    pub fn key_epoch(&self) -> u64 {
        lock(&self.0).epoch
    }
}

/// Why a frame with counter `found` is not the one due (named in
/// [`WireError::OutOfOrder`]'s message).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Misorder {
    #[error("an earlier frame again (replayed, or two frames swapped)")]
    Earlier,
    #[error("a later frame (frames dropped, or two frames swapped)")]
    Later,
}

/// Which side of the due counter `found` lies on (32-bit counters wrap).
pub fn misorder(found: u32, expected: u32) -> Misorder {
    if (found.wrapping_sub(expected) as i32) < 0 {
        Misorder::Earlier
    } else {
        Misorder::Later
    }
}

/// The primary's and the backup's keys of one made-up session (unit tests here and in
/// the modules that seal or open frames).
#[cfg(test)]
pub(crate) fn test_pair(limits: Limits) -> (Keys, Keys) {
    let (p2b, b2p) = kdf::traffic_secrets(b"psk", &[1; 32], &[2; 32], &[3; 32]);
    (
        Keys::with_limits(Role::Primary, &p2b, &b2p, limits),
        Keys::with_limits(Role::Backup, &p2b, &b2p, limits),
    )
}

#[cfg(test)]
mod tests {
    use super::test_pair as pair;
    use super::*;
    use crate::replication::{FrameHeader, check_header};
    use zerocopy::FromBytes;

    fn seal(s: &Sealer, m: &Message) -> Vec<u8> {
        let mut v = Vec::new();
        s.encode(m, &mut v).unwrap();
        v
    }

    fn open(o: &Opener, frame: &[u8]) -> Result<Message, WireError> {
        let mut f = frame.to_vec();
        let hdr = FrameHeader::read_from_bytes(&f[..HEADER_LEN]).unwrap();
        let (kind, len) = check_header(&hdr)?;
        // A rewritten length: shorter cuts the frame (the tag fails), longer never
        // completes (a reader waits for bytes that do not come).
        let end = HEADER_LEN + len as usize;
        if end > f.len() {
            return Err(WireError::Truncated {
                have: f.len(),
                want: end,
            });
        }
        let n = o.open(&hdr, kind, &mut f[HEADER_LEN..end])?;
        Message::decode(kind, f[HEADER_LEN..HEADER_LEN + n].to_vec())
    }

    fn msgs() -> Vec<Message> {
        vec![
            Message::Welcome,
            Message::Data((0..=255u8).cycle().take(70_000).collect()),
            Message::Ack { checkpoint: 7 },
            Message::Heartbeat { seq: 3 },
            Message::PageData(vec![0xAB; 4096]),
            Message::Close {
                checkpoints: 9,
                finished: false,
            },
            Message::abort("bye"),
        ]
    }

    #[test]
    fn frames_round_trip_in_both_directions_and_hide_the_payload() {
        let (p, b) = pair(LIMITS);
        for m in msgs() {
            let f = seal(&p.sealer, &m);
            if let Message::Data(d) = &m {
                assert!(
                    !f.windows(64).any(|w| w == &d[1000..1064]),
                    "plaintext visible in a sealed frame"
                );
            }
            assert_eq!(open(&b.opener, &f).unwrap(), m);
            let f = seal(&b.sealer, &m);
            assert_eq!(open(&p.opener, &f).unwrap(), m);
        }
        assert_eq!(p.sealer.frames(), msgs().len() as u64);
        assert_eq!(b.opener.frames(), msgs().len() as u64);
    }

    #[test]
    fn a_frame_sealed_in_place_is_the_encoded_frame() {
        let (p, b) = pair(LIMITS);
        let (q, _) = pair(LIMITS);
        let data = vec![0x5Au8; 3000];
        let mut buf = vec![7u8; 5]; // the frame need not start the buffer
        buf.extend_from_slice(&[0u8; HEADER_LEN]);
        buf.extend_from_slice(&data);
        p.sealer.seal_in_place(Kind::Data, &mut buf, 5).unwrap();
        assert_eq!(buf[..5], [7u8; 5]);
        assert_eq!(buf[5..], seal(&q.sealer, &Message::Data(data.clone()))[..]);
        assert_eq!(open(&b.opener, &buf[5..]).unwrap(), Message::Data(data));
        // No room for a header: refused, the buffer is left as it was before `start`.
        let mut short = vec![1u8; 10];
        assert!(p.sealer.seal_in_place(Kind::Data, &mut short, 0).is_err());
        assert!(short.is_empty());
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let (p, _) = pair(LIMITS);
        let f = seal(&p.sealer, &Message::Data(vec![5; 100]));
        for i in 0..f.len() {
            for bit in [0x01u8, 0x80] {
                let (_, b) = pair(LIMITS);
                let mut g = f.clone();
                g[i] ^= bit;
                assert!(open(&b.opener, &g).is_err(), "byte {i} bit {bit:#x} passed");
            }
        }
    }

    #[test]
    fn nothing_opens_after_a_bad_frame() {
        let (p, b) = pair(LIMITS);
        let f = seal(&p.sealer, &Message::Ack { checkpoint: 1 });
        let mut g = f.clone();
        g[HEADER_LEN] ^= 1;
        assert!(matches!(open(&b.opener, &g), Err(WireError::Forged { .. })));
        assert!(matches!(open(&b.opener, &f), Err(WireError::ChannelFailed)));
    }

    #[test]
    fn payload_and_tag_bits_fail_the_tag() {
        let (p, _) = pair(LIMITS);
        let f = seal(&p.sealer, &Message::Ack { checkpoint: 1 });
        for i in HEADER_LEN..f.len() {
            let (_, b) = pair(LIMITS);
            let mut g = f.clone();
            g[i] ^= 0x04;
            assert!(
                matches!(
                    open(&b.opener, &g),
                    Err(WireError::Forged {
                        kind: Kind::Ack,
                        seq: 0
                    })
                ),
                "byte {i}"
            );
        }
        // The kind in the header is authenticated too: an ACK relabelled as a heartbeat.
        let (_, b) = pair(LIMITS);
        let mut g = f.clone();
        g[4..6].copy_from_slice(&(Kind::Heartbeat as u16).to_le_bytes());
        assert!(matches!(open(&b.opener, &g), Err(WireError::Forged { .. })));
    }

    #[test]
    fn replay_reorder_and_drop_are_refused() {
        let (p, _) = pair(LIMITS);
        let f: Vec<Vec<u8>> = (0..4u64)
            .map(|n| seal(&p.sealer, &Message::Ack { checkpoint: n }))
            .collect();
        // Replay: frame 1 twice.
        let (_, b) = pair(LIMITS);
        open(&b.opener, &f[0]).unwrap();
        open(&b.opener, &f[1]).unwrap();
        assert!(matches!(
            open(&b.opener, &f[1]),
            Err(WireError::OutOfOrder {
                found: 1,
                expected: 2,
                ..
            })
        ));
        assert_eq!(misorder(1, 2), Misorder::Earlier);
        // Reorder: 2 before 1.
        let (_, b) = pair(LIMITS);
        open(&b.opener, &f[0]).unwrap();
        assert!(matches!(
            open(&b.opener, &f[2]),
            Err(WireError::OutOfOrder {
                found: 2,
                expected: 1,
                ..
            })
        ));
        // Drop: 0 then 2.
        let (_, b) = pair(LIMITS);
        open(&b.opener, &f[0]).unwrap();
        assert!(matches!(
            open(&b.opener, &f[2]),
            Err(WireError::OutOfOrder {
                found: 2,
                expected: 1,
                ..
            })
        ));
        assert_eq!(misorder(2, 1), Misorder::Later);
        // A frame relabelled with the due counter: the nonce differs, the tag fails.
        let (_, b) = pair(LIMITS);
        open(&b.opener, &f[0]).unwrap();
        let mut g = f[2].clone();
        g[12..16].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            open(&b.opener, &g),
            Err(WireError::Forged { seq: 1, .. })
        ));
        // Reflection: the primary's own frame handed back to it.
        let (p2, _) = pair(LIMITS);
        assert!(matches!(
            open(&p2.opener, &f[0]),
            Err(WireError::Forged { .. })
        ));
    }

    #[test]
    fn plain_frames_are_refused_once_sealed() {
        let (_, b) = pair(LIMITS);
        let mut f = Vec::new();
        Message::Ack { checkpoint: 1 }.encode(&mut f);
        assert!(matches!(
            open(&b.opener, &f),
            Err(WireError::Unsealed { kind: Kind::Ack })
        ));
    }

    #[test]
    fn both_ends_rekey_in_step_and_old_keys_stop_working() {
        let limits = Limits {
            bytes: 10_000,
            frames: 5,
        };
        let (p, b) = pair(limits);
        let mut frames = Vec::new();
        for n in 0..40u64 {
            let m = if n % 7 == 0 {
                Message::Data(vec![n as u8; 6000])
            } else {
                Message::Heartbeat { seq: n }
            };
            let f = seal(&p.sealer, &m);
            assert_eq!(open(&b.opener, &f).unwrap(), m, "frame {n}");
            frames.push(f);
        }
        assert!(p.sealer.key_epoch() >= 8, "{:?}", p.sealer);
        assert_eq!(p.sealer.key_epoch(), b.opener.key_epoch());
        // An opener that never rekeys (other limits) fails right after the first rekey.
        let (_, stubborn) = pair(LIMITS);
        let first_fail = frames
            .iter()
            .position(|f| open(&stubborn.opener, f).is_err())
            .unwrap();
        assert!(first_fail > 0 && first_fail <= 5, "{first_fail}");
    }

    #[test]
    fn misorder_across_the_wrap() {
        assert_eq!(misorder(1, 2), Misorder::Earlier);
        assert_eq!(misorder(3, 2), Misorder::Later);
        assert_eq!(misorder(u32::MAX, 0), Misorder::Earlier);
        assert_eq!(misorder(0, u32::MAX), Misorder::Later);
    }
}
