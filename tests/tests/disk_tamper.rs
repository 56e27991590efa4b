//! An attacker between `remus disk serve` and `remus disk receive`: a TCP proxy that
//! records every byte it forwards and, once armed, flips one byte inside the sealed
//! payload of one frame. The disk's contents (the initial copy and the guest's writes)
//! never appear on the wire in clear; a flipped byte in either direction ends the
//! session (the backup holds the disk for a decision, the primary runs unprotected) and
//! nothing reaches the backup's disk that was not committed: the image stays at the last
//! commit, and a failover yields exactly the last durable epoch.
mod disk_common;
mod relay_common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use disk_common::*;
use relay_common::Scratch;
use remus_user::replication::HEADER_LEN;
use serde_json::json;

const SIZE: u64 = 16 * MIB;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    ToBackup,
    ToPrimary,
}

/// The man in the middle: whole frames both ways (their 16-byte headers are in clear),
/// every byte recorded; when armed, the first frame going `way` whose payload is at
/// least `min_len` bytes gets one bit flipped inside its payload.
struct Tap {
    addr: String,
    armed: Arc<AtomicBool>,
    flipped: Arc<AtomicBool>,
    wire: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

struct Pump {
    way: Way,
    target: Way,
    min_len: usize,
    armed: Arc<AtomicBool>,
    flipped: Arc<AtomicBool>,
    wire: Arc<Mutex<Vec<u8>>>,
}

impl Pump {
    fn run(self, mut from: TcpStream, mut to: TcpStream) {
        loop {
            let mut f = vec![0u8; HEADER_LEN];
            if from.read_exact(&mut f).is_err() {
                break;
            }
            let len = u32::from_le_bytes([f[8], f[9], f[10], f[11]]) as usize;
            f.resize(HEADER_LEN + len, 0);
            if from.read_exact(&mut f[HEADER_LEN..]).is_err() {
                break;
            }
            if self.way == self.target
                && len >= self.min_len
                && self.armed.load(Ordering::SeqCst)
                && !self.flipped.swap(true, Ordering::SeqCst)
            {
                // Inside the ciphertext, past the sealed disk header.
                f[HEADER_LEN + 40] ^= 0x10;
            }
            self.wire.lock().unwrap().extend_from_slice(&f);
            if to.write_all(&f).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    }
}

impl Tap {
    fn start(upstream: &str, target: Way, min_len: usize) -> Tap {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let upstream = upstream.to_string();
        let armed = Arc::new(AtomicBool::new(false));
        let flipped = Arc::new(AtomicBool::new(false));
        let wire = Arc::new(Mutex::new(Vec::new()));
        let pump = |way| Pump {
            way,
            target,
            min_len,
            armed: armed.clone(),
            flipped: flipped.clone(),
            wire: wire.clone(),
        };
        let (up, down) = (pump(Way::ToBackup), pump(Way::ToPrimary));
        let thread = std::thread::spawn(move || {
            let Ok((p, _)) = l.accept() else { return };
            let Ok(b) = TcpStream::connect(&upstream) else {
                return;
            };
            let (p2, b2) = (p.try_clone().unwrap(), b.try_clone().unwrap());
            let back = std::thread::spawn(move || down.run(b2, p2));
            up.run(p, b);
            let _ = back.join();
        });
        Tap {
            addr,
            armed,
            flipped,
            wire,
            thread: Some(thread),
        }
    }

    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn flipped(&self) -> bool {
        self.flipped.load(Ordering::SeqCst)
    }

    /// Every byte forwarded both ways, once both directions are closed.
    fn wire(mut self) -> Vec<u8> {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.wire.lock().unwrap())
    }
}

/// Where in `secret` a 64-byte piece (one every 4 KiB) that is also in `wire` starts.
fn leaked(wire: &[u8], secret: &[u8]) -> Option<usize> {
    let pieces: HashMap<&[u8], usize> = (0..secret.len().saturating_sub(64))
        .step_by(4096)
        .map(|at| (&secret[at..at + 16], at))
        .collect();
    wire.windows(64).find_map(|w| {
        let at = *pieces.get(&w[..16])?;
        (w == &secret[at..at + 64]).then_some(at)
    })
}

struct Setup {
    dir: Scratch,
    p: Daemon,
    b: Daemon,
    tap: Tap,
    /// The primary's initial contents (sent by the initial copy).
    initial: Vec<u8>,
}

/// A pair talking through a tap that will attack `way`.
fn setup(name: &str, way: Way, min_len: usize) -> Setup {
    let dir = Scratch::new(name);
    let key = key(&dir);
    let (p_img, b_img) = (dir.path().join("p.img"), dir.path().join("b.img"));
    let mut initial = vec![0u8; MIB as usize];
    Rng::new(0x5ea1).fill(&mut initial);
    disk_file(&p_img, SIZE, Some(&initial));
    disk_file(&b_img, SIZE, None);
    let b = start_backup(&dir, &key, &b_img, &[], &[]);
    let tap = Tap::start(&backup_addr(&b), way, min_len);
    let p = start_primary(&dir, &key, &p_img, &tap.addr, &[]);
    Setup {
        dir,
        p,
        b,
        tap,
        initial,
    }
}

/// Epoch 1 committed, epoch 2 durable; returns the model and the data of a known write.
fn two_epochs(s: &Setup, c: &mut remus_user::disk::nbd::client::Client) -> (Model, Vec<u8>) {
    let mut img = s.initial.clone();
    img.resize(SIZE as usize, 0);
    let mut m = Model::new(img);
    let mut rng = Rng::new(0x7a3);
    let mut known = vec![0u8; 256 << 10];
    rng.fill(&mut known);
    c.write(2 * MIB, &known, false).unwrap();
    m.write(2 * MIB, &known);
    random_io(c, &mut m, &mut rng, 40);
    assert_eq!(cut(&s.p), 1);
    m.cut(1);
    random_io(c, &mut m, &mut rng, 40);
    assert_eq!(cut(&s.p), 2);
    m.cut(2);
    durable(&s.b, 2);
    commit(&s.b, 1);
    (m, known)
}

/// The backup lost the session, applied exactly epoch 1, and fails over to exactly 2.
fn check_backup(s: &Setup, m: &Model) {
    let st =
        s.b.wait("the backup to lose the session", |v| v["state"] == "lost");
    assert_eq!(st["applied"], 1, "{st}");
    assert_eq!(st["committed"], 1, "{st}");
    assert_eq!(st["held_epochs"], json!([2]), "{st}");
    let b_img = s.dir.path().join("b.img");
    assert_same(&image(&b_img), &m.at_cut[&1], "backup after the attack");
    failover(&s.b, 2);
    assert_same(&image(&b_img), &m.at_cut[&2], "backup after failover(2)");
}

#[test]
fn root_disk_stream_is_sealed_and_a_flipped_byte_applies_nothing_uncommitted() {
    let s = setup("disk-tamper-up", Way::ToBackup, 1024);
    wait_sync(&s.p);
    let mut c = connect(&export_path(&s.dir));
    let (mut m, known) = two_epochs(&s, &mut c);
    // Epoch 3: the first frame of it that carries data is altered on the way.
    s.tap.arm();
    let mut rng = Rng::new(0xbad);
    random_io(&mut c, &mut m, &mut rng, 40);
    assert!(s.tap.flipped(), "the attack happened");
    check_backup(&s, &m);
    s.p.wait("the primary to run unprotected", |v| {
        v["state"] == "unprotected"
    });
    // Nothing of the disk was on the wire in clear: not the initial copy, not a write.
    drop(c);
    let Setup {
        p, b, tap, initial, ..
    } = s;
    drop((p, b));
    let wire = tap.wire();
    assert!(wire.len() > 2 * MIB as usize, "the tap saw the stream");
    let planted = [&wire[..1000], &known[8192..8192 + 64], &wire[1000..2000]].concat();
    assert_eq!(
        leaked(&planted, &known),
        Some(8192),
        "the search finds a piece"
    );
    assert_eq!(leaked(&wire, &known), None, "a write's data in clear");
    assert_eq!(leaked(&wire, &initial), None, "the initial copy in clear");
}

#[test]
fn root_disk_a_flipped_byte_towards_the_primary_ends_the_session() {
    // The backup's frames are small (DURABLE, SYNCED, heartbeats): any one will do.
    let s = setup("disk-tamper-down", Way::ToPrimary, 0);
    wait_sync(&s.p);
    let mut c = connect(&export_path(&s.dir));
    let (m, _) = two_epochs(&s, &mut c);
    s.tap.arm();
    let st = s.p.wait("the primary to lose its backup", |v| {
        v["state"] == "unprotected"
    });
    assert!(s.tap.flipped(), "the attack happened: {st}");
    check_backup(&s, &m);
}
