//! Faults of protocol-D disk replication: a daemon killed at random points, a backup
//! killed mid-apply (recovered from its journal), a silent primary, a full journal, a
//! full disk, and bad input with its exit codes. The rule checked everywhere: the
//! backup's disk only ever equals the primary's disk at a checkpoint that was committed,
//! never anything of an epoch that was not.
mod disk_common;
mod relay_common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use disk_common::*;
use relay_common::Scratch;
use serde_json::{Value, json};

const SIZE: u64 = 16 * MIB;

fn files(dir: &Scratch) -> (PathBuf, PathBuf, PathBuf) {
    let key = key(dir);
    let p = dir.path().join("p.img");
    let b = dir.path().join("b.img");
    disk_file(&p, SIZE, None);
    disk_file(&b, SIZE, None);
    (key, p, b)
}

/// After a crash or loss: the backup must hold exactly the model at its applied epoch,
/// and a failover to any durable checkpoint must give exactly that checkpoint.
fn check_backup(b: &Daemon, b_img: &Path, m: &Model, pick: u64) {
    let st = b.status();
    let applied = st["applied"].as_u64().unwrap();
    let dur = st["durable"].as_u64().unwrap();
    assert!(applied <= dur, "{st}");
    let zero = vec![0u8; SIZE as usize];
    let at = |n: u64| if n == 0 { &zero } else { &m.at_cut[&n] };
    assert_same(
        &image(b_img),
        at(applied),
        &format!("backup at applied {applied}"),
    );
    if dur == 0 {
        let v = b.request(json!({"op": "failover", "epoch": 1}));
        assert_eq!(
            v["result"], "error",
            "nothing durable: no failover point {v}"
        );
        return;
    }
    let n = applied.max(1) + pick % (dur - applied.max(1) + 1);
    let v = b.request(json!({"op": "failover", "epoch": n}));
    assert_eq!(
        v["result"],
        "failed_over",
        "failover({n}) with applied {applied}, durable {dur}: {v}\n{}",
        b.log()
    );
    assert_same(&image(b_img), at(n), &format!("backup after failover({n})"));
}

#[test]
fn root_disk_backup_killed_mid_apply_replays_to_the_same_image() {
    let dir = Scratch::new("disk-replay");
    let (key, p_img, b_img) = files(&dir);
    let mut b = start_backup(
        &dir,
        &key,
        &b_img,
        &[],
        &[("REMUS_DISK_FAULT", "stall-apply:40")],
    );
    let p = start_primary(&dir, &key, &p_img, &backup_addr(&b), &[]);
    wait_sync(&p);
    let mut c = connect(&export_path(&dir));
    let mut m = Model::new(vec![0; SIZE as usize]);
    let mut rng = Rng::new(42);
    for n in 1..=2 {
        random_io(&mut c, &mut m, &mut rng, 60);
        assert_eq!(cut(&p), n);
        m.cut(n);
    }
    durable(&b, 2);
    let sock = b.sock.clone();
    std::thread::spawn(move || try_request(&sock, json!({"op": "commit", "epoch": 2})));
    b.wait("the apply to stall (fault injection)", |v| {
        v["fault_stalled"] == true
    });
    let partial = image(&b_img);
    assert_ne!(partial, m.at_cut[&2], "the stall is mid-apply");
    assert_ne!(
        partial,
        vec![0u8; SIZE as usize],
        "some records are on the backing"
    );
    b.kill9();

    let b = start_backup(&dir, &key, &b_img, &[], &[]);
    let st = b.status();
    assert_eq!(st["replayed_epochs"], json!([1, 2]), "{st}");
    assert_eq!(st["applied"], 2);
    assert_eq!(
        st["state"], "lost",
        "restarted with the disk of a lost session"
    );
    assert_same(&image(&b_img), &m.at_cut[&2], "after the replay");
    // A new primary is refused until the operator (or the relay) decides.
    let v = b.request(json!({"op": "commit", "epoch": 2}));
    assert_eq!(v["applied"], json!([]), "idempotent after replay: {v}");
    failover(&b, 2);
    assert_same(&image(&b_img), &m.at_cut[&2], "after failover(2)");
}

#[test]
fn root_disk_primary_killed_or_silent_mid_epoch_loses_only_the_open_epoch() {
    for sig in [libc::SIGKILL, libc::SIGSTOP] {
        let dir = Scratch::new(&format!("disk-primary-{sig}"));
        let (key, p_img, b_img) = files(&dir);
        let b = start_backup(&dir, &key, &b_img, &[], &[]);
        let mut p = start_primary(&dir, &key, &p_img, &backup_addr(&b), &[]);
        wait_sync(&p);
        let mut c = connect(&export_path(&dir));
        let mut m = Model::new(vec![0; SIZE as usize]);
        let mut rng = Rng::new(sig as u64);
        for n in 1..=2 {
            random_io(&mut c, &mut m, &mut rng, 40);
            assert_eq!(cut(&p), n);
            m.cut(n);
        }
        durable(&b, 2);
        random_io(&mut c, &mut m, &mut rng, 40); // epoch 3, never cut
        b.wait("epoch 3 to arrive", |v| v["open"] == 3);
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(p.pid(), sig) };
        let st = b.wait("the backup to notice", |v| v["state"] == "lost");
        assert_eq!(st["open"], Value::Null, "the open epoch is dropped: {st}");
        assert_eq!(st["held_epochs"], json!([1, 2]));
        let r = failover(&b, 2);
        assert_eq!(r["applied"], json!([1, 2]));
        assert_same(&image(&b_img), &m.at_cut[&2], "nothing of epoch 3");
        if sig == libc::SIGSTOP {
            p.kill9();
        }
    }
}

#[test]
fn root_disk_random_kills_never_apply_an_uncommitted_epoch() {
    for seed in 1..=6u64 {
        let dir = Scratch::new(&format!("disk-chaos-{seed}"));
        let (key, p_img, b_img) = files(&dir);
        let mut b = start_backup(&dir, &key, &b_img, &[], &[]);
        let mut p = start_primary(&dir, &key, &p_img, &backup_addr(&b), &[]);
        wait_sync(&p);
        let model = Arc::new(Mutex::new(Model::new(vec![0; SIZE as usize])));
        // The guest: writes and cuts until something breaks.
        let guest = {
            let (ex, psock, model) = (export_path(&dir), p.sock.clone(), model.clone());
            std::thread::spawn(move || {
                let mut c = connect(&ex);
                let mut rng = Rng::new(seed * 1000);
                loop {
                    let mut m = model.lock().unwrap();
                    let mut tmp = Model::new(m.img.clone());
                    drop(m);
                    let ops = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        random_io(&mut c, &mut tmp, &mut rng, 5)
                    }));
                    m = model.lock().unwrap();
                    if ops.is_err() {
                        return;
                    }
                    m.img = tmp.img;
                    let v = try_request(&psock, json!({"op": "cut"}));
                    match v.and_then(|v| v["epoch"].as_u64()) {
                        Some(n) => m.cut(n),
                        None => return,
                    }
                }
            })
        };
        // The relay's part on the backup: commit whatever is durable, now and then.
        let committer = {
            let bsock = b.sock.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    let Some(st) = try_request(&bsock, json!({"op": "status"})) else {
                        return;
                    };
                    let d = st["durable"].as_u64().unwrap_or(0);
                    if d > 0 && try_request(&bsock, json!({"op": "commit", "epoch": d})).is_none() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(7));
                }
            })
        };
        let mut rng = Rng::new(seed);
        std::thread::sleep(Duration::from_millis(100 + rng.below(400)));
        let kill_backup = seed % 2 == 0;
        if kill_backup {
            b.kill9();
        } else {
            p.kill9();
        }
        let _ = guest.join();
        let _ = committer.join();
        let m = model.lock().unwrap();
        assert!(
            !m.at_cut.is_empty(),
            "seed {seed}: the guest cut at least once"
        );
        if kill_backup {
            b = start_backup(&dir, &key, &b_img, &[], &[]);
        } else {
            b.wait("the backup to notice the primary is gone", |v| {
                v["state"] == "lost"
            });
        }
        eprintln!(
            "seed {seed}: killed the {}, cuts up to {:?}, backup {}",
            if kill_backup { "backup" } else { "primary" },
            m.at_cut.keys().last(),
            b.status()
        );
        check_backup(&b, &b_img, &m, rng.next());
    }
}

#[test]
fn root_disk_full_journal_or_full_disk_aborts_and_applies_nothing() {
    // --journal-max too small for one epoch.
    let dir = Scratch::new("disk-jfull");
    let (key, p_img, b_img) = files(&dir);
    let b = start_backup(
        &dir,
        &key,
        &b_img,
        &["--journal-max", "1MiB", "--ram-cap", "256KiB"],
        &[],
    );
    let p = start_primary(&dir, &key, &p_img, &backup_addr(&b), &[]);
    wait_sync(&p);
    let mut c = connect(&export_path(&dir));
    let mut m = Model::new(vec![0; SIZE as usize]);
    assert_eq!(cut(&p), 1);
    m.cut(1);
    durable(&b, 1);
    let mut d = vec![0x77u8; 256 << 10];
    for i in 0..8u64 {
        d[0] = i as u8;
        c.write(i * (256 << 10), &d, false).unwrap();
    }
    p.wait("the primary to lose its backup", |v| {
        v["state"] == "unprotected"
    });
    let st = b.wait("the backup to abort the session", |v| v["state"] == "lost");
    assert_eq!(st["held_epochs"], json!([1]), "{st}");
    assert_same(&image(&b_img), &m.at_cut[&1], "nothing of epoch 2");
    // The guest kept running on the primary (its writes were not refused).
    let v = p.request(json!({"op": "cut"}));
    assert_eq!(v["kind"], "lost", "{v}");
    failover(&b, 1);
    assert_same(&image(&b_img), &m.at_cut[&1], "failover at 1");
}

/// A tmpfs of `size` mounted at `dir` for the test's duration.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs (tests run as root)");
        Tmpfs(dir.to_path_buf())
    }
    fn resize(&self, size: &str) {
        let st = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn root_disk_full_filesystems_stop_replication_or_keep_the_epoch_for_retry() {
    // 1. The journal's filesystem fills up: the session is aborted, nothing applied.
    let dir = Scratch::new("disk-enospc-journal");
    let (key, p_img, b_img) = files(&dir);
    let fs = Tmpfs::mount(&dir.path().join("journal"), "1m");
    let b = start_backup(&dir, &key, &b_img, &[], &[]);
    let p = start_primary(&dir, &key, &p_img, &backup_addr(&b), &[]);
    wait_sync(&p);
    let mut c = connect(&export_path(&dir));
    c.write(0, &vec![0x42u8; 2 << 20], false).unwrap();
    p.wait("the primary to lose its backup", |v| {
        v["state"] == "unprotected"
    });
    let st = b.wait("the backup to abort", |v| v["state"] == "lost");
    assert_eq!(st["applied"], 0);
    assert_same(&image(&b_img), &vec![0u8; SIZE as usize], "nothing applied");
    drop((p, b, fs));

    // 2. The backing's filesystem fills up while applying: the commit fails (exit 1),
    //    the epoch stays in the journal, and a retry after space is freed succeeds.
    let dir = Scratch::new("disk-enospc-backing");
    let key = disk_common::key(&dir);
    let p_img = dir.path().join("p.img");
    disk_file(&p_img, SIZE, None);
    let fs = Tmpfs::mount(&dir.path().join("small"), "2m");
    let b_img = dir.path().join("small").join("b.img");
    disk_file(&b_img, SIZE, None);
    let b = start_backup(&dir, &key, &b_img, &[], &[]);
    let p = start_primary(&dir, &key, &p_img, &backup_addr(&b), &[]);
    wait_sync(&p);
    let mut c = connect(&export_path(&dir));
    let mut m = Model::new(vec![0; SIZE as usize]);
    let mut rng = Rng::new(9);
    let mut d = vec![0u8; 4 << 20];
    rng.fill(&mut d);
    c.write(MIB, &d, false).unwrap();
    m.write(MIB, &d);
    assert_eq!(cut(&p), 1);
    m.cut(1);
    durable(&b, 1);
    let o = cli(&["commit", "1", "--socket", &b.sock.display().to_string()]);
    assert_eq!(o.status.code(), Some(1), "apply on a full disk: exit 1");
    let st = b.status();
    assert_eq!(st["applied"], 0, "{st}");
    assert_eq!(
        st["held_epochs"],
        json!([1]),
        "the epoch is kept for a retry"
    );
    fs.resize("64m");
    let r = commit(&b, 1);
    assert_eq!(r["applied"], json!([1]));
    assert_same(&image(&b_img), &m.at_cut[&1], "after the retry");
}

#[test]
fn root_disk_bad_input_gets_clear_errors_and_exit_codes() {
    let dir = Scratch::new("disk-badinput");
    let (key, p_img, b_img) = files(&dir);
    let ex = format!("unix:{}", dir.path().join("x.sock").display());
    let code = |args: &[&str]| {
        let o = cli(args);
        assert!(
            !o.stderr.is_empty(),
            "{args:?}: an error message is printed"
        );
        o.status.code()
    };
    let p = p_img.display().to_string();
    let k = key.display().to_string();
    // `serve --backing BACKING --export EX` and more.
    let serve = |backing: &str, more: &[&str]| {
        let mut v = vec!["serve", "--backing", backing];
        if !more
            .iter()
            .any(|m| *m == "--device" || m.starts_with("--export"))
        {
            v.extend(["--export", ex.as_str()]);
        }
        v.extend_from_slice(more);
        code(&v)
    };
    // Usage (2): unknown or wrong-kind backing, malformed addresses and exports, bad key.
    assert_eq!(serve("/nonexistent/disk.img", &[]), Some(2));
    assert_eq!(serve(&dir.path().display().to_string(), &[]), Some(2));
    assert_eq!(serve(&p, &["--export", "tcp:1.2.3.4"]), Some(2));
    assert_eq!(serve(&p, &["--device", "/dev/sda"]), Some(2));
    assert_eq!(
        serve(&p, &["--backup", "nohost", "--key-file", &k]),
        Some(2)
    );
    assert_eq!(
        code(&[
            "receive",
            "--listen",
            "nonsense",
            "--backing",
            &p,
            "--journal",
            "/tmp/x",
            "--key-file",
            &k
        ]),
        Some(2)
    );
    let loose = dir.path().join("loose.key");
    std::fs::write(&loose, "0123456789abcdef").unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let loose = loose.display().to_string();
    assert_eq!(
        serve(&p, &["--backup", "127.0.0.1:9", "--key-file", &loose]),
        Some(2)
    );
    // Peer lost (4): nothing listens there.
    assert_eq!(
        serve(
            &p,
            &[
                "--backup",
                "127.0.0.1:9",
                "--key-file",
                &k,
                "--connect-timeout",
                "2s"
            ]
        ),
        Some(4)
    );
    // Environment (3): this host's kernel has no nbd (CI's neither); the lab proves it.
    if Path::new("/sys/module/nbd").exists() {
        eprintln!("this kernel has nbd: the no-nbd exit code is not checked here");
    } else {
        assert_eq!(serve(&p, &["--device", "/dev/nbd0"]), Some(3));
    }
    // Operational (1): the backing is busy (served by another daemon).
    let standalone = {
        let log = dir.path().join("standalone.log");
        let mut c = std::process::Command::new(relay_common::remus_bin());
        c.args([
            "disk",
            "serve",
            "--backing",
            &p,
            "--export",
            &ex,
            "--socket",
        ])
        .arg(dir.path().join("s.sock"))
        .stderr(std::fs::File::create(&log).unwrap());
        Daemon {
            child: c.spawn().unwrap(),
            sock: dir.path().join("s.sock"),
            log,
        }
    };
    standalone.wait("the standalone daemon", |v| v["state"] == "standalone");
    let ex2 = format!("unix:{}", dir.path().join("y.sock").display());
    assert_eq!(serve(&p, &["--export", &ex2]), Some(1));
    drop(standalone);

    // Operational (1): wrong key; size mismatch. The backup is not disturbed by either.
    let b = start_backup(&dir, &key, &b_img, &[], &[]);
    let addr = backup_addr(&b);
    let other = dir.key("other.key", "a-different-key-0123456789");
    let other = other.display().to_string();
    assert_eq!(
        serve(
            &p,
            &["--export", &ex2, "--backup", &addr, "--key-file", &other]
        ),
        Some(1)
    );
    let small = dir.path().join("small.img");
    disk_file(&small, SIZE / 2, None);
    let small = small.display().to_string();
    assert_eq!(
        serve(
            &small,
            &["--export", &ex2, "--backup", &addr, "--key-file", &k]
        ),
        Some(1)
    );
    assert_eq!(b.status()["state"], "waiting for primary");
    // Wrong role and wrong state on the control socket: exit 2.
    let bs = b.sock.display().to_string();
    assert_eq!(code(&["cut", "--socket", &bs]), Some(2));
    assert_eq!(
        code(&["commit", "1", "--socket", &bs]),
        Some(2),
        "never in sync"
    );
    assert_eq!(code(&["failover", "0", "--socket", &bs]), Some(2));
    // No daemon there: exit 1.
    assert_eq!(code(&["cut", "--socket", "/nonexistent.sock"]), Some(1));
}

#[test]
fn root_disk_lost_session_is_kept_until_failover_or_discard() {
    let dir = Scratch::new("disk-discard");
    let (key, p_img, b_img) = files(&dir);
    let b = start_backup(&dir, &key, &b_img, &[], &[]);
    let addr = backup_addr(&b);
    let mut p = start_primary(&dir, &key, &p_img, &addr, &[]);
    wait_sync(&p);
    assert_eq!(cut(&p), 1);
    durable(&b, 1);
    p.kill9();
    b.wait("lost", |v| v["state"] == "lost");
    // A new primary is refused while the lost session's disk waits for a decision.
    let o = cli(&[
        "serve",
        "--backing",
        &p_img.display().to_string(),
        "--export",
        &format!("unix:{}", dir.path().join("z.sock").display()),
        "--backup",
        &addr,
        "--key-file",
        &key.display().to_string(),
        "--socket",
        &dir.path().join("p2.sock").display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(1), "refused while lost");
    let v = b.request(json!({"op": "discard"}));
    assert_eq!(v["result"], "ok", "{v}");
    assert_eq!(b.status()["state"], "waiting for primary");
    let p = start_primary(&dir, &key, &p_img, &addr, &[]);
    wait_sync(&p);
    assert_eq!(b.status()["state"], "replicating");
}
