//! The disk barrier end to end, on this host: a relay pair (`remus relay send --disk`,
//! `remus relay receive --disk`, the fake receiver recording the stream) driving the real
//! disk daemons (`remus disk serve` with a unix-socket export written by a userspace NBD
//! client playing the guest, `remus disk receive`). The primary's disk is written between
//! checkpoints and remembered at every cut; after the primary's relay dies at a point
//! after cut N, the backup's disk must equal exactly the primary's at the checkpoint the
//! receiver fails over to, byte for byte, never a later epoch.
mod disk_common;
mod relay_common;

use disk_common::*;
use relay_common::*;
use remus_user::stream::Event;
use remus_user::stream::writer::WriterConfig;
use std::io::Write;

const SIZE: u64 = 8 * MIB;

/// Both disk daemons (in sync), both relays (banner passed), the guest's NBD client.
struct Rig {
    dir: Scratch,
    p: Daemon,
    b: Daemon,
    rx: Receiver,
    tx: Sender,
    guest: remus_user::disk::nbd::client::Client,
    m: Model,
    rng: Rng,
    st: Stream,
}

impl Rig {
    fn start(name: &str, seed: u64) -> Rig {
        Rig::start_with(name, seed, &[], WriterConfig::pv(6))
    }

    /// The same with more sender flags and another stream.
    fn start_with(name: &str, seed: u64, tx_extra: &[&str], cfg: WriterConfig) -> Rig {
        let dir = Scratch::new(name);
        let key = key(&dir);
        let (p, b) = daemon_pair(&dir, SIZE, None, None);
        let bsock = b.sock.display().to_string();
        let psock = p.sock.display().to_string();
        let hb = TEST_HEARTBEAT;
        let mut rx_args = vec!["--disk", bsock.as_str()];
        rx_args.extend(hb);
        let rx = Receiver::start(&dir, &key, true, &rx_args);
        let mut tx_args = vec!["--disk", psock.as_str()];
        tx_args.extend(hb);
        tx_args.extend(tx_extra);
        let mut tx = Sender::start(&dir, "a", &rx.addr, &key, &tx_args);
        // The banner comes only once the disk is in sync.
        assert_eq!(tx.read_banner(), BANNER, "sender log:\n{}", tx.log());
        assert_eq!(p.status()["in_sync"], true);
        let guest = connect(&export_path(&dir));
        Rig {
            dir,
            p,
            b,
            rx,
            tx,
            guest,
            m: Model::new(vec![0; SIZE as usize]),
            rng: Rng::new(seed),
            st: Stream::new(&cfg),
        }
    }

    /// The guest writes into the open epoch.
    fn io(&mut self) {
        random_io(&mut self.guest, &mut self.m, &mut self.rng, 40);
    }

    /// The primary disk's open epoch is `e` (the cut of checkpoint e-1 was made).
    fn wait_open_epoch(&self, e: u64) {
        self.p.wait(&format!("the primary disk's epoch {e}"), |v| {
            v["epoch"] == e
        });
    }

    /// Checkpoints `from..=to`, each preceded by guest writes; each acknowledged.
    fn checkpoints(&mut self, from: usize, to: usize) {
        for n in from..=to {
            self.io();
            self.tx.write_checkpoint(&self.st, n);
            self.wait_open_epoch(n as u64 + 1);
            self.m.cut(n as u64);
            wait_status(&self.rx.status_sock, &format!("ACK({n})"), |v| {
                v["last_acked"] == n as u64
            });
        }
    }

    /// Checkpoint `n` up to just past its first post-suspend byte: its cut is made, its
    /// end is not sent.
    fn start_checkpoint(&mut self, n: usize) {
        let start = self.st.ends[n - 2] as usize;
        let post = self
            .st
            .w
            .events
            .iter()
            .find_map(|e| match *e {
                Event::PostSuspendStart { checkpoint, pos } if checkpoint == n as u64 => {
                    Some(pos as usize)
                }
                _ => None,
            })
            .expect("a post-suspend record");
        let end = self.st.ends[n - 1] as usize;
        let upto = (post + 64).max(start + (end - start) / 2).min(end - 1);
        self.tx.wait_drained();
        self.tx.write(&self.st.w.bytes[start..upto]);
    }

    fn backup_image(&self) -> Vec<u8> {
        image(&self.dir.path().join("b.img"))
    }

    /// The receiver failed over after checkpoint `n`: its stream holds exactly 1..=n,
    /// the backup's disk equals the primary's at cut `n`, is exported, and the relay's
    /// status says so.
    fn assert_failed_over_at(&self, n: u64) {
        let session = self.dir.only_session();
        assert!(
            session == self.st.through(n as usize),
            "the receiver must hold exactly checkpoints 1..={n} ({} bytes, want {})\nlog:\n{}",
            session.len(),
            self.st.ends[n as usize - 1],
            self.rx.log()
        );
        let bs = self
            .b
            .wait("the backup disk's export", |v| v["device"].is_string());
        assert_eq!(bs["applied"], n, "{bs}");
        assert_same(
            &self.backup_image(),
            &self.m.at_cut[&n],
            &format!("backup disk after failover at {n}"),
        );
    }
}

#[test]
fn root_relay_disk_killed_after_cut_before_ack_fails_over_to_the_last_acked_checkpoint() {
    let mut r = Rig::start("relay-disk-cut", 0xd15c_0001);
    r.checkpoints(1, 3);
    // Checkpoint 4: its disk epoch is written and cut, its memory only half sent.
    r.io();
    r.start_checkpoint(4);
    r.wait_open_epoch(5);
    r.m.cut(4);
    // Epoch 5 is written too (the guest runs on); then the primary's relay dies.
    r.io();
    let ts = r.tx.status().expect("sender status");
    assert_eq!(ts["disks"][0]["last_cut"], 4, "{ts}");
    assert_ne!(
        r.m.at_cut[&3], r.m.at_cut[&4],
        "epoch 4 must change the disk"
    );
    signal(&r.tx.child, libc::SIGKILL);
    r.rx.expect_exit(0);
    r.assert_failed_over_at(3);
    let log = r.rx.log();
    assert!(
        log.contains("FAILOVER") && log.contains("after checkpoint 3"),
        "receiver log:\n{log}"
    );
    assert!(log.contains("disk failed over"), "receiver log:\n{log}");
    // The primary keeps the guest's disk as it was written (epochs 4 and 5 included).
    assert_same(
        &image(&r.dir.path().join("p.img")),
        &r.m.img,
        "primary disk",
    );
}

#[test]
fn root_relay_disk_checkpoint_waits_for_the_disk_and_fails_over_where_memory_is() {
    let mut r = Rig::start("relay-disk-wait", 0xd15c_0002);
    r.checkpoints(1, 2);
    // The backup's disk daemon freezes: epoch 3 cannot become durable, so checkpoint 3
    // is neither written to the receiver nor acknowledged, though all of it arrived.
    signal(&r.b.child, libc::SIGSTOP);
    r.io();
    r.tx.write_checkpoint(&r.st, 3);
    r.wait_open_epoch(4);
    r.m.cut(3);
    r.tx.wait_drained();
    let s = r.rx.status();
    assert_eq!(s["last_acked"], 2, "ACK(3) before its disk epoch: {s}");
    assert_eq!(s["disks"][0]["last_durable"], 2, "{s}");
    r.io();
    // The primary's relay dies, then the disk daemon comes back: checkpoint 3's epoch
    // becomes durable, memory 3 reaches the receiver, and both fail over at 3.
    signal(&r.tx.child, libc::SIGKILL);
    signal(&r.b.child, libc::SIGCONT);
    r.rx.expect_exit(0);
    let n = r.dir.only_session().len();
    let at =
        r.st.ends
            .iter()
            .position(|e| *e as usize == n)
            .map(|i| i as u64 + 1);
    // Whichever checkpoint the receiver holds (3: the disk came back in time), the disk
    // is at exactly that one.
    let at =
        at.unwrap_or_else(|| panic!("the receiver holds a partial checkpoint\n{}", r.rx.log()));
    assert!(at == 2 || at == 3, "failed over at {at}");
    r.assert_failed_over_at(at);
}

#[test]
fn root_relay_disk_lost_disk_backup_ends_protection_fail_closed() {
    let mut r = Rig::start("relay-disk-lost", 0xd15c_0003);
    r.checkpoints(1, 2);
    // The backup's disk daemon dies: the primary's disk is unprotected.
    r.b.kill9();
    r.p.wait("the primary disk to see its backup lost", |v| {
        v["lost"].is_string()
    });
    r.io();
    r.tx.wait_drained();
    // xl's write fails once the relay stopped reading (as xl sees its transport die).
    let cp3 = r.st.checkpoint(3).to_vec();
    let _ = r.tx.stdin.as_mut().expect("stdin").write_all(&cp3);
    // The cut of checkpoint 3 fails: the relay stops, holding everything (exit 1, not
    // the fail-open exit 4).
    r.tx.expect_exit(1);
    let log = r.tx.log();
    assert!(log.contains("DISK CUT FAILED"), "sender log:\n{log}");
    assert!(!log.contains("UNPROTECTED"), "sender log:\n{log}");
    // The backup cannot put its disk at checkpoint 2 (its daemon is gone): it starts no
    // guest at all rather than one on the wrong disk.
    r.rx.expect_exit(0);
    let log = r.rx.log();
    assert!(log.contains("NO FAILOVER"), "receiver log:\n{log}");
}

#[test]
fn root_relay_disk_refusals_have_their_exit_codes() {
    let dir = Scratch::new("relay-disk-refuse");
    let key = key(&dir);
    let (p, b) = daemon_pair(&dir, SIZE, None, None);
    wait_sync(&p);
    let rx = Receiver::start(&dir, &key, false, &TEST_HEARTBEAT);
    let send = |name: &str, disk: &std::path::Path| {
        let d = disk.display().to_string();
        let mut tx = Sender::start(&dir, name, &rx.addr, &key, &["--disk", &d]);
        let code = wait_child(&mut tx.child, "relay send").code();
        (code, tx.log())
    };
    // No daemon behind the socket: exit 1, nothing started.
    let (code, log) = send("absent", &dir.path().join("nothing.sock"));
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("nothing.sock"), "{log}");
    // The backup's daemon given to the primary's relay: usage, exit 2.
    let (code, log) = send("role", &b.sock);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("relay send needs the primary's"), "{log}");
    // A primary daemon that already cut an epoch: its epochs would not match, exit 2.
    assert_eq!(cut(&p), 1);
    let (code, log) = send("cut", &p.sock);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("has cut 1 epochs already"), "{log}");
    assert_eq!(rx.status()["acks_total"], 0);
}

#[test]
fn root_relay_disk_merged_checkpoints_are_merged_on_the_disk_and_no_failover_point() {
    // xl's pipe wide while the relay waits, and the sender stopped while all three
    // checkpoints are written: no cut can be proven, every one is merged.
    let pipe = [
        "--xl-pipe-narrow-bytes",
        "1048576",
        "--xl-pipe-bytes",
        "1048576",
    ];
    let mut cfg = WriterConfig::pv(3);
    cfg.guest_pages = 24;
    cfg.dirty_pages = 8;
    let mut r = Rig::start_with("relay-disk-merged", 0xd15c_0004, &pipe, cfg);
    r.io();
    signal(&r.tx.child, libc::SIGSTOP);
    let all = r.st.through(3).to_vec();
    r.tx.write(&all);
    signal(&r.tx.child, libc::SIGCONT);
    r.tx.wait_drained();
    let s = wait_status(&r.tx.status_sock, "three checkpoints", |v| {
        v["last_checkpoint"] == 3
    });
    assert_eq!(s["epoch_merges_total"], 3, "{s}");
    assert_eq!(s["disks"][0]["last_cut"], 3, "{s}");
    let bs = r.b.wait("the backup disk to hear of the merges", |v| {
        v["merged"] == serde_json::json!([1, 2, 3])
    });
    assert_eq!(bs["committed"], 0, "{bs}");
    r.tx.finish();
    r.rx.expect_exit(0);
    let log = r.rx.log();
    assert!(log.contains("FAILOVER IMPOSSIBLE"), "{log}");
    // No failover point: the disk is neither failed over nor touched.
    let bs = r.b.status();
    assert!(bs["device"].is_null(), "{bs}");
    assert_eq!(bs["applied"], 0, "{bs}");
    assert_same(&r.backup_image(), &vec![0; SIZE as usize], "backup disk");
}
