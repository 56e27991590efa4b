//! An attacker on the replication path: a real TCP proxy between `remus relay send` and
//! `remus relay receive` that sees every frame's header (kind and length are in the
//! clear) and flips a byte, replays, reorders, drops or cuts at a chosen frame. Every
//! time the backup refuses at that frame with the reason logged, the receiver ("xl")
//! holds exactly the stream up to the last complete checkpoint before it (never a byte of
//! the altered one), and the primary, having lost its backup, exits 4. A forged or
//! replayed ACK never reaches the primary's controller. With `--compress none`, pages of
//! the guest's memory never appear in the bytes on the wire.
mod relay_common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use relay_common::*;
use remus_user::replication::{HEADER_LEN, Kind};
use remus_user::stream::writer::WriterConfig;

const KEY: &str = "tamper-key-0123456789abcdef";

/// Which way a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    ToBackup,
    ToPrimary,
}

/// What the attacker does to the n-th targeted frame (counted from 1 after arming).
#[derive(Clone, Copy, Debug)]
enum Action {
    /// XOR the byte at this offset of the frame (header included) with this mask.
    Flip(usize, u8),
    /// Forward it, then forward it again.
    Replay,
    /// Hold it back and forward it after the next frame (of any kind).
    Reorder,
    /// Never forward it.
    Drop,
    /// Forward the first half of it, then close both connections (FIN).
    CutInside,
    /// Forward it whole, then close both connections (FIN at a frame boundary: no CLOSE).
    CutAfter,
}

#[derive(Clone, Copy, Debug)]
struct Attack {
    dir: Dir,
    kinds: &'static [Kind],
    nth: usize,
    action: Action,
}

/// A man in the middle on loopback. Forwards whole frames both ways and records every
/// byte it forwarded; attacks once armed.
struct Proxy {
    addr: String,
    armed: Arc<AtomicBool>,
    wire: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut f = vec![0u8; HEADER_LEN];
    s.read_exact(&mut f).ok()?;
    let len = u32::from_le_bytes([f[8], f[9], f[10], f[11]]) as usize;
    f.resize(HEADER_LEN + len, 0);
    s.read_exact(&mut f[HEADER_LEN..]).ok()?;
    Some(f)
}

fn kind_of(f: &[u8]) -> u16 {
    u16::from_le_bytes([f[4], f[5]])
}

/// One direction: frames from `from` to `to`, attacked when `attack` is for this way.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    dir: Dir,
    attack: Option<Attack>,
    armed: Arc<AtomicBool>,
    wire: Arc<Mutex<Vec<u8>>>,
    cut: [TcpStream; 2],
) {
    let attack = attack.filter(|a| a.dir == dir);
    let mut seen = 0usize;
    let mut held: Option<Vec<u8>> = None;
    let send = |to: &mut TcpStream, f: &[u8]| {
        wire.lock().unwrap().extend_from_slice(f);
        to.write_all(f).is_ok()
    };
    while let Some(mut f) = read_frame(&mut from) {
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut close = false;
        let targeted = attack.filter(|a| {
            armed.load(Ordering::SeqCst) && a.kinds.iter().any(|k| *k as u16 == kind_of(&f))
        });
        if targeted.is_some() {
            seen += 1;
        }
        match targeted.filter(|a| a.nth == seen) {
            None => out.push(f),
            Some(a) => match a.action {
                Action::Flip(at, mask) => {
                    let at = at.min(f.len() - 1);
                    f[at] ^= mask;
                    out.push(f);
                }
                Action::Replay => {
                    out.push(f.clone());
                    out.push(f);
                }
                Action::Reorder => held = Some(f),
                Action::Drop => {}
                Action::CutInside => {
                    f.truncate(f.len() / 2);
                    out.push(f);
                    close = true;
                }
                Action::CutAfter => {
                    out.push(f);
                    close = true;
                }
            },
        }
        // A held frame goes out after the next one.
        if held.is_some() && !out.is_empty() {
            out.extend(held.take());
        }
        for f in &out {
            if !send(&mut to, f) {
                return;
            }
        }
        if close {
            for s in &cut {
                let _ = s.shutdown(Shutdown::Both);
            }
            return;
        }
    }
    // The sending side closed: pass the FIN on.
    let _ = to.shutdown(Shutdown::Write);
}

impl Proxy {
    fn start(backup: &str, attack: Option<Attack>) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let backup = backup.to_string();
        let armed = Arc::new(AtomicBool::new(false));
        let wire = Arc::new(Mutex::new(Vec::new()));
        let (a, w) = (armed.clone(), wire.clone());
        let thread = std::thread::spawn(move || {
            let Ok((p, _)) = l.accept() else { return };
            let Ok(b) = TcpStream::connect(&backup) else {
                return;
            };
            let _ = p.set_nodelay(true);
            let _ = b.set_nodelay(true);
            let cut = || [p.try_clone().unwrap(), b.try_clone().unwrap()];
            let (cut1, cut2) = (cut(), cut());
            let (p2, b2) = (p.try_clone().unwrap(), b.try_clone().unwrap());
            let (a2, w2) = (a.clone(), w.clone());
            let back =
                std::thread::spawn(move || pump(b2, p2, Dir::ToPrimary, attack, a2, w2, cut2));
            pump(p, b, Dir::ToBackup, attack, a, w, cut1);
            let _ = back.join();
        });
        Proxy {
            addr,
            armed,
            wire,
            thread: Some(thread),
        }
    }

    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Every byte forwarded, both ways, once the connection is over.
    fn wire(mut self) -> Vec<u8> {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.wire.lock().unwrap())
    }
}

/// `session` must be the stream up to a checkpoint boundary: returns that checkpoint.
fn checkpoint_boundary(session: &[u8], st: &Stream) -> usize {
    let n = st
        .ends
        .iter()
        .position(|&e| e as usize == session.len())
        .unwrap_or_else(|| {
            panic!(
                "the receiver got {} bytes, not a checkpoint boundary ({:?})",
                session.len(),
                st.ends
            )
        });
    assert!(
        session == st.through(n + 1),
        "the receiver's bytes are not the stream's prefix"
    );
    n + 1
}

const TO_BACKUP_DATA: &[Kind] = &[Kind::Data, Kind::PageData];

/// Streams checkpoints 1 and 2 through the proxy, arms it, streams 3 and 4, and returns
/// the receiver's log and the sender's exit code and log once both have ended.
fn attacked_run(
    name: &str,
    compress: &str,
    attack: Attack,
) -> (Vec<u8>, Stream, String, i32, String) {
    let dir = Scratch::new(name);
    let key = dir.key("key", KEY);
    let mut rx = Receiver::start(&dir, &key, true, &[]);
    let proxy = Proxy::start(&rx.addr, Some(attack));
    let mut tx = Sender::start(&dir, "a", &proxy.addr, &key, &["--compress", compress]);
    assert_eq!(tx.read_banner(), BANNER);
    let st = Stream::new(&WriterConfig::pv(4));
    feed(&mut tx, &st, 1, 2);
    wait_status(&rx.status_sock, "ACK(2)", |v| v["last_acked"] == 2);
    wait_status(&tx.status_sock, "ACK(2) at the primary", |v| {
        v["last_acked"] == 2
    });
    proxy.arm();
    // The sender may already have lost its backup and stopped reading: a failed write
    // here is part of the attack's effect.
    for n in 3..=4 {
        if tx
            .stdin
            .as_mut()
            .unwrap()
            .write_all(st.checkpoint(n))
            .is_err()
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let code = wait_child(&mut tx.child, "relay send").code().unwrap_or(-1);
    assert_eq!(
        wait_child(&mut rx.child, "relay receive --once").code(),
        Some(0),
        "{}",
        rx.log()
    );
    let _ = proxy.wire();
    let sessions = dir.sessions();
    assert_eq!(sessions.len(), 1);
    (sessions[0].clone(), st, rx.log(), code, tx.log())
}

/// An attack on the primary's frames of checkpoint 3: refused at that frame, the receiver
/// holds exactly checkpoints 1 and 2, the log names `reason`, the primary exits 4.
fn refused_in_checkpoint_3(name: &str, compress: &str, action: Action, reason: &str) {
    // Without compression checkpoint 3 (300 dirty pages) is ~19 DATA frames of 64 KiB:
    // the third. With lz4 its pages are one PAGE_DATA frame: that one.
    let (kinds, nth): (&'static [Kind], usize) = match compress {
        "none" => (TO_BACKUP_DATA, 3),
        _ => (&[Kind::PageData], 1),
    };
    let attack = Attack {
        dir: Dir::ToBackup,
        kinds,
        nth,
        action,
    };
    let (session, st, rlog, code, slog) = attacked_run(name, compress, attack);
    assert_eq!(
        checkpoint_boundary(&session, &st),
        2,
        "nothing of checkpoint 3 may reach xl; receiver log:\n{rlog}"
    );
    assert!(
        rlog.contains("FAILOVER") && rlog.contains("after checkpoint 2") && rlog.contains(reason),
        "the receiver must log the failover and `{reason}`:\n{rlog}"
    );
    assert_eq!(code, 4, "the primary lost its backup; sender log:\n{slog}");
    assert!(slog.contains("BACKUP LOST"), "{slog}");
}

#[test]
fn a_flipped_payload_byte_is_refused() {
    refused_in_checkpoint_3(
        "flip",
        "lz4",
        Action::Flip(HEADER_LEN + 100, 0x20),
        "failed authentication",
    );
}

#[test]
fn a_flipped_header_byte_is_refused() {
    // The kind field: a DATA frame relabelled PAGE_DATA (the header is authenticated too).
    refused_in_checkpoint_3(
        "fliphdr",
        "none",
        Action::Flip(4, 0x01),
        "failed authentication",
    );
}

#[test]
fn a_replayed_frame_is_refused() {
    refused_in_checkpoint_3("replay", "none", Action::Replay, "replayed");
}

#[test]
fn reordered_frames_are_refused() {
    refused_in_checkpoint_3("reorder", "none", Action::Reorder, "swapped");
}

#[test]
fn a_dropped_frame_is_refused() {
    refused_in_checkpoint_3("drop", "none", Action::Drop, "dropped");
}

#[test]
fn a_stream_cut_inside_a_frame_is_a_lost_primary() {
    refused_in_checkpoint_3("cut", "none", Action::CutInside, "in the middle of a frame");
}

#[test]
fn a_stream_cut_without_a_sealed_close_is_a_lost_primary() {
    // A FIN at a frame boundary is not an orderly end: only a sealed CLOSE is.
    refused_in_checkpoint_3(
        "cutafter",
        "none",
        Action::CutAfter,
        "closed the connection",
    );
}

/// An attack on the backup's ACK of checkpoint 3: the primary refuses the attacked frame
/// (it never reaches the controller: the last ACK taken is `last_acked`) and exits 4.
fn ack_refused(name: &str, action: Action, reason: &str, last_acked: &[u64]) {
    let attack = Attack {
        dir: Dir::ToPrimary,
        kinds: &[Kind::Ack],
        nth: 1,
        action,
    };
    let (session, st, rlog, code, slog) = attacked_run(name, "none", attack);
    assert_eq!(code, 4, "sender log:\n{slog}");
    assert!(
        slog.contains("BACKUP LOST")
            && slog.contains(reason)
            && last_acked.iter().any(|n| slog
                .split_whitespace()
                .any(|field| field == format!("last_acked={n}"))),
        "the primary must refuse the attacked ACK naming `{reason}`, its last ACK one of {last_acked:?}:\n{slog}"
    );
    // The backup did hold checkpoint 3 (its ACK was genuine before the proxy changed it).
    assert!(checkpoint_boundary(&session, &st) >= 3, "{rlog}");
}

#[test]
fn a_forged_ack_is_refused_by_the_primary() {
    // The ACK's payload is the checkpoint number: rewriting it would commit output the
    // backup does not hold. The tag does not verify.
    ack_refused(
        "forgeack",
        Action::Flip(HEADER_LEN, 0x07),
        "failed authentication",
        &[2],
    );
}

#[test]
fn a_replayed_ack_is_refused_by_the_primary() {
    // The genuine ACK(3) is taken once (or not yet, if the refusal of its copy wins the
    // race to the controller); the copy is refused.
    ack_refused("replayack", Action::Replay, "replayed", &[2, 3]);
}

/// Distinct 32-byte windows of non-trivial pages of checkpoint 1's memory.
fn known_pages(st: &Stream) -> Vec<[u8; 32]> {
    let mut v = Vec::new();
    for rec in st.w.page_records_of(1) {
        // record header (8) + count/reserved (8) + PFN entries (8 each) + pages.
        let count = u32::from_le_bytes([rec[8], rec[9], rec[10], rec[11]]) as usize;
        let pages = &rec[16 + 8 * count..];
        for page in pages.chunks_exact(4096) {
            let w: [u8; 32] = page[1024..1056].try_into().unwrap();
            let mut distinct = w.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            if distinct.len() >= 6 && !v.contains(&w) {
                v.push(w);
            }
        }
    }
    v
}

/// Whether any of `needles` occurs in `hay` (one pass, keyed by each needle's first 8 bytes).
fn any_occurs(hay: &[u8], needles: &[[u8; 32]]) -> bool {
    let heads: std::collections::HashSet<[u8; 8]> =
        needles.iter().map(|n| n[..8].try_into().unwrap()).collect();
    hay.windows(32).any(|w| {
        heads.contains(&<[u8; 8]>::try_from(&w[..8]).unwrap())
            && needles.iter().any(|n| n[..] == *w)
    })
}

#[test]
fn guest_memory_never_appears_on_the_wire() {
    let dir = Scratch::new("plaintext");
    let key = dir.key("key", KEY);
    let mut rx = Receiver::start(&dir, &key, true, &[]);
    let proxy = Proxy::start(&rx.addr, None);
    let mut tx = Sender::start(&dir, "a", &proxy.addr, &key, &["--compress", "none"]);
    assert_eq!(tx.read_banner(), BANNER);
    let st = Stream::new(&WriterConfig::pv(3));
    let pages = known_pages(&st);
    assert!(pages.len() >= 100, "{} recognisable pages", pages.len());
    // The check can fail: the plain stream does contain them.
    assert!(any_occurs(st.bytes(), &pages));
    feed(&mut tx, &st, 1, 3);
    wait_status(&tx.status_sock, "ACK(3)", |v| v["last_acked"] == 3);
    tx.close_stdin();
    assert_eq!(
        wait_child(&mut tx.child, "relay send").code(),
        Some(0),
        "{}",
        tx.log()
    );
    assert_eq!(
        wait_child(&mut rx.child, "relay receive").code(),
        Some(0),
        "{}",
        rx.log()
    );
    let wire = proxy.wire();
    assert!(
        wire.len() as f64 > st.bytes().len() as f64 * 0.99,
        "the proxy carried the whole stream ({} of {} bytes)",
        wire.len(),
        st.bytes().len()
    );
    assert!(
        !any_occurs(&wire, &pages),
        "a page of the guest's memory is readable on the wire"
    );
    // What reached "xl" is the stream, byte for byte.
    let sessions = dir.sessions();
    assert!(sessions[0] == st.bytes());
}
