//! Protocol-D disk replication end to end, on this host: the real `remus disk serve` and
//! `remus disk receive`, a userspace NBD client playing the guest (the kernel's /dev/nbdN
//! is proven in the lab: docs/disk.md). Every test compares whole images byte for byte
//! against a model of the disk taken at each cut.
mod disk_common;
mod relay_common;

use disk_common::*;
use relay_common::Scratch;
use serde_json::json;

const SIZE: u64 = 16 * MIB;

fn pair(
    dir: &Scratch,
    primary_content: Option<&[u8]>,
    backup_content: Option<&[u8]>,
) -> (Daemon, Daemon) {
    daemon_pair(dir, SIZE, primary_content, backup_content)
}

#[test]
fn root_disk_write_cut_commit_failover_is_byte_exact() {
    let dir = Scratch::new("disk-exact");
    let (p, b) = pair(&dir, None, None);
    wait_sync(&p);
    let mut c = connect(&export_path(&dir));
    let mut m = Model::new(vec![0; SIZE as usize]);
    let mut rng = Rng::new(0xd15c);
    for n in 1..=3 {
        random_io(&mut c, &mut m, &mut rng, 60);
        assert_eq!(cut(&p), n);
        m.cut(n);
    }
    durable(&b, 3);
    let st = b.status();
    assert_eq!(st["held_epochs"], json!([1, 2, 3]), "{st}");
    assert_eq!(st["applied"], 0, "nothing applied before a commit");
    assert_same(
        &image(&dir.path().join("b.img")),
        &vec![0; SIZE as usize],
        "backup before commit",
    );

    let r = commit(&b, 2);
    assert_eq!(r["applied"], json!([1, 2]));
    assert_same(
        &image(&dir.path().join("b.img")),
        &m.at_cut[&2],
        "backup after commit(2)",
    );
    assert_eq!(commit(&b, 2)["applied"], json!([]), "commit is idempotent");

    // Epoch 4 is written and never cut: the failover must not show any of it.
    random_io(&mut c, &mut m, &mut rng, 60);
    let r = failover(&b, 3);
    assert_eq!(r["applied"], json!([3]));
    assert_eq!(r["discarded"], json!([4]), "{r}");
    assert_same(
        &image(&dir.path().join("b.img")),
        &m.at_cut[&3],
        "backup after failover(3)",
    );
    // The primary's image holds epoch 4 (the guest kept running there).
    assert_same(&image(&dir.path().join("p.img")), &m.img, "primary");

    // The failed-over disk is served: read it back through NBD.
    let mut f = connect(&failover_path(&dir));
    let mut back = vec![0u8; SIZE as usize];
    for (i, chunk) in back.chunks_mut(MIB as usize).enumerate() {
        f.read(i as u64 * MIB, chunk).unwrap();
    }
    assert_same(&back, &m.at_cut[&3], "failover export");
    assert_eq!(b.status()["state"], "exported");
    // The primary noticed its backup is gone and says so.
    let ps = p.wait("the primary to report the backup lost", |v| {
        v["state"] == "unprotected"
    });
    assert!(ps["lost"].is_string());
}

#[test]
fn root_disk_qemu_io_is_an_independent_client() {
    let qemu_io = std::path::Path::new("/usr/bin/qemu-io");
    assert!(
        qemu_io.exists(),
        "qemu-io is missing: scripts/install-deps.sh installs qemu-utils"
    );
    let dir = Scratch::new("disk-qemu");
    let (p, b) = pair(&dir, None, None);
    wait_sync(&p);
    let url = format!("nbd+unix:///?socket={}", export_path(&dir).display());
    let io = |cmds: &[&str], url: &str| {
        let mut c = std::process::Command::new(qemu_io);
        c.args(["-f", "raw", url]);
        for x in cmds {
            c.args(["-c", x]);
        }
        let o = c.output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success(),
            "qemu-io {cmds:?}: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    };
    io(
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 4M 64k",
            "write -z 8M 1M",
            "flush",
        ],
        &url,
    );
    assert_eq!(cut(&p), 1);
    io(&["write -P 0xee 0 4k"], &url);
    durable(&b, 1);
    failover(&b, 1);
    let furl = format!("nbd+unix:///?socket={}", failover_path(&dir).display());
    // qemu-io's read -P fails (non-zero exit / "Pattern verification failed") on mismatch.
    let out = io(
        &[
            "read -P 0xab 0 1M",
            "read -P 0xcd 4M 64k",
            "read -P 0 8M 1M",
        ],
        &furl,
    );
    assert!(!out.contains("fail"), "{out}");
    let img = image(&dir.path().join("b.img"));
    assert!(
        img[..4096].iter().all(|&x| x == 0xab),
        "epoch 2's write must not be there"
    );
}

#[test]
fn root_disk_initial_sync_with_live_writes_converges() {
    let dir = Scratch::new("disk-sync");
    // The primary has data in places and holes elsewhere; the backup holds garbage
    // everywhere, so every hole must be zeroed on it too.
    let mut rng = Rng::new(7);
    let mut start = vec![0u8; SIZE as usize];
    rng.fill(&mut start[..(3 * MIB) as usize]);
    start[(9 * MIB) as usize..(10 * MIB) as usize].fill(0x5a);
    let garbage = vec![0xffu8; SIZE as usize];
    let (p, b) = pair(&dir, Some(&start), Some(&garbage));
    let mut m = Model::new(start);
    // Write while the copy runs (and after): the live writes ride the same ordered stream.
    // While it runs they stay below 9 MiB, so that the hole from 10 MiB on is still one
    // when the copy reaches it, however the two interleave (a busy machine slows the
    // copy; writes all over the disk then left no chunk of zeroes to send as a range).
    let mut c = connect(&export_path(&dir));
    random_io_below(&mut c, &mut m, &mut rng, 200, 9 * MIB);
    wait_sync(&p);
    random_io(&mut c, &mut m, &mut rng, 50);
    assert_eq!(cut(&p), 1);
    m.cut(1);
    durable(&b, 1);
    failover(&b, 1);
    assert_same(
        &image(&dir.path().join("b.img")),
        &m.at_cut[&1],
        "backup after sync + epoch 1",
    );
    let st = p.status();
    assert_eq!(st["in_sync"], true);
    assert!(
        st["sync_zeroed_bytes"].as_u64().unwrap() > 0,
        "holes are sent as zero ranges: {st}"
    );
}

#[test]
fn root_disk_merged_checkpoint_is_not_a_failover_point() {
    let dir = Scratch::new("disk-merge");
    let (p, b) = pair(&dir, None, None);
    wait_sync(&p);
    let mut c = connect(&export_path(&dir));
    let mut m = Model::new(vec![0; SIZE as usize]);
    let mut rng = Rng::new(11);
    for n in 1..=3 {
        random_io(&mut c, &mut m, &mut rng, 30);
        assert_eq!(cut(&p), n);
        m.cut(n);
    }
    let v = b.request(json!({"op": "merge", "epoch": 2}));
    assert_eq!(v["result"], "ok", "{v}");
    durable(&b, 3);
    commit(&b, 1);
    let v = b.request(json!({"op": "commit", "epoch": 2}));
    assert_eq!(v["kind"], "merged", "{v}");
    let v = b.request(json!({"op": "failover", "epoch": 2}));
    assert_eq!(v["kind"], "merged", "{v}");
    // A refused failover leaves the session alone: the primary keeps its backup.
    assert_eq!(b.status()["state"], "replicating");
    assert_eq!(p.status()["state"], "protected");
    // The CLI says the same with exit 2 (wrong state).
    let sock = b.sock.display().to_string();
    let o = cli(&["commit", "2", "--socket", &sock]);
    assert_eq!(o.status.code(), Some(2));
    assert_same(
        &image(&dir.path().join("b.img")),
        &m.at_cut[&1],
        "nothing of 2 applied",
    );
    // The next failover point applies 2 and 3 together.
    let r = commit(&b, 3);
    assert_eq!(r["applied"], json!([2, 3]));
    assert_same(
        &image(&dir.path().join("b.img")),
        &m.at_cut[&3],
        "after commit(3)",
    );
    assert_eq!(b.status()["merged"], json!([]));
}

#[test]
fn root_disk_several_connections_keep_one_order() {
    let dir = Scratch::new("disk-conns");
    let (p, b) = pair(&dir, None, None);
    wait_sync(&p);
    // Four clients hammer overlapping ranges at once: whatever order the primary applied
    // them in, the backup must apply the same.
    let ex = export_path(&dir);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let ex = ex.clone();
            std::thread::spawn(move || {
                let mut c = connect(&ex);
                let mut rng = Rng::new(100 + t);
                for _ in 0..150 {
                    let off = 4096 * rng.below(64);
                    let mut d = vec![0u8; 4096 * (1 + rng.below(8)) as usize];
                    rng.fill(&mut d);
                    c.write(off, &d, false).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(cut(&p), 1);
    let primary = image(&dir.path().join("p.img"));
    durable(&b, 1);
    failover(&b, 1);
    assert_same(
        &image(&dir.path().join("b.img")),
        &primary,
        "backup vs primary",
    );
}

#[test]
fn root_disk_cut_refused_before_sync_and_backpressure_holds_writes() {
    // Big enough that the copy cannot finish into socket buffers while the backup is
    // frozen (every chunk is data: a non-zero pattern).
    const BIG: u64 = 128 * MIB;
    let dir = Scratch::new("disk-pressure");
    let key = key(&dir);
    let p_img = dir.path().join("p.img");
    let b_img = dir.path().join("b.img");
    let content: Vec<u8> = (0..BIG as usize).map(|i| (i % 251) as u8 | 1).collect();
    disk_file(&p_img, BIG, Some(&content));
    disk_file(&b_img, BIG, None);
    let slow = [
        "--heartbeat-interval",
        "200ms",
        "--heartbeat-timeout",
        "60s",
    ];
    let b = start_backup(&dir, &key, &b_img, &slow, &[]);
    let mut extra = vec!["--queue-bytes", "1MiB"];
    extra.extend_from_slice(&slow);
    let p = start_primary(&dir, &key, &p_img, &backup_addr(&b), &extra);
    // SAFETY: signals to our own child.
    unsafe { libc::kill(b.pid(), libc::SIGSTOP) };
    let st = p.status();
    assert_eq!(st["in_sync"], false, "{st}");
    let v = p.request(json!({"op": "cut"}));
    assert_eq!(v["kind"], "not_in_sync", "{v}");
    let o = cli(&["cut", "--socket", &p.sock.display().to_string()]);
    assert_eq!(o.status.code(), Some(2), "cut before sync: exit 2");
    unsafe { libc::kill(b.pid(), libc::SIGCONT) };
    wait_sync(&p);

    // Freeze the backup with the disk in sync: the 1 MiB queue fills and the guest's
    // writes wait (backpressure) instead of being dropped.
    unsafe { libc::kill(b.pid(), libc::SIGSTOP) };
    let ex = export_path(&dir);
    let mut m = Model::new(content);
    let writer = std::thread::spawn(move || {
        let mut c = connect(&ex);
        let mut rng = Rng::new(6);
        let mut writes = Vec::new();
        for _ in 0..128 {
            let off = 4096 * rng.below(BIG / 4096 - 64);
            let mut d = vec![0u8; 256 << 10];
            rng.fill(&mut d);
            c.write(off, &d, false).unwrap();
            writes.push((off, d));
        }
        writes
    });
    p.wait("writes to wait for queue space", |v| {
        v["backpressure_waits"].as_u64().unwrap_or(0) > 0
    });
    assert!(
        !writer.is_finished(),
        "32 MiB of writes cannot pass a 1 MiB queue to a frozen backup"
    );
    unsafe { libc::kill(b.pid(), libc::SIGCONT) };
    for (off, d) in writer.join().unwrap() {
        m.write(off, &d);
    }
    assert_eq!(cut(&p), 1);
    m.cut(1);
    durable(&b, 1);
    failover(&b, 1);
    assert_same(
        &image(&b_img),
        &m.at_cut[&1],
        "nothing dropped or reordered",
    );
    assert_eq!(
        p.status()["state"],
        "unprotected",
        "after the failover the primary is alone"
    );
}
