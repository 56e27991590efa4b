//! `remus unprotect`'s decisions with real processes standing in for the relay's
//! receiver and for `remus protect` (a copy of /bin/sh named `remus`, so its argv reads
//! like one, which records its end when stopped), a `FakeXen` answering from the lab's
//! captures, and a `FakeHost`.
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use remus_user::exit::ExitCode;
use remus_user::protect::checks::{Host, LeftBuffer};
use remus_user::protect::state::{self, BackupState, Phase, ProtectState};
use remus_user::protect::unprotect::{Done, UnprotectError, unprotect};
use remus_user::protect::xen::{Xen, XenError};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/xen")
            .join(name),
    )
    .unwrap()
}

struct FakeXen {
    list: String,
    destroyed: RefCell<Vec<String>>,
}

impl Xen for FakeXen {
    fn info(&self) -> Result<String, XenError> {
        Ok(String::new())
    }
    fn list(&self) -> Result<String, XenError> {
        Ok(self.list.clone())
    }
    fn list_long(&self, _: &str) -> Result<String, XenError> {
        unreachable!("unprotect needs no libxl JSON")
    }
    fn xenstore_ls(&self, _: &str) -> Result<Option<String>, XenError> {
        Ok(None)
    }
    fn destroy(&self, domain: &str) -> Result<(), XenError> {
        self.destroyed.borrow_mut().push(domain.into());
        Ok(())
    }
}

struct FakeHost {
    buffer: LeftBuffer,
}

impl Host for FakeHost {
    fn is_root(&self) -> bool {
        true
    }
    fn iface_exists(&self, _: &str) -> bool {
        true
    }
    fn nbd_available(&self) -> bool {
        true
    }
    fn buffer_on(&self, _: &str) -> LeftBuffer {
        self.buffer
    }
    fn protect_running(&self, _: &str) -> Option<u32> {
        None
    }
    fn xl_remus_running(&self, _: &str, _: u32) -> Option<u32> {
        None
    }
}

/// A `FakeXen` whose `xl list` answers with the named capture.
fn listing(capture: &str) -> FakeXen {
    FakeXen {
        list: fixture(capture),
        destroyed: RefCell::new(vec![]),
    }
}

/// `remus unprotect guest` against `xen` on a host whose vif buffer is in `buffer`.
fn unprotect_guest(dir: &Path, xen: &FakeXen, buffer: LeftBuffer) -> Result<Done, UnprotectError> {
    unprotect("guest", dir, xen, &FakeHost { buffer })
}

fn grandchildren(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn protect_state(pid: u32, phase: Phase) -> ProtectState {
    ProtectState {
        domain: "guest".into(),
        domid: 1,
        pid,
        xl_pid: None,
        vif: "vif1.0".into(),
        vifs: vec![],
        backup: "backup.example:7788".into(),
        interval_ms: 200,
        phase,
        detail: Some("the backup was lost".into()),
        started_unix: 0,
        since_unix: 0,
        last_acked: 12,
        checkpoints_per_s: None,
        held_frames: None,
        held_bytes: None,
        relay_socket: PathBuf::from("/nonexistent"),
        unsafe_disks: vec![],
        exit_code: Some(4),
        output: None,
    }
}

#[test]
fn on_the_backup_the_receiver_is_killed_before_it_can_activate_and_the_copy_destroyed() {
    let d = tempfile::tempdir().unwrap();
    // The relay stand-in, with a receiver tree under it (sh → sleep, as `sh -c xl …`).
    let mut relay = Command::new("sh")
        .arg("-c")
        .arg("sh -c 'sleep 300; :' & sleep 300 & wait; exec sleep 300")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let b = BackupState {
        domain: "guest".into(),
        pid: relay.id(),
        listen: "127.0.0.1:7788".into(),
        relay_socket: d.path().join("relay-receive-guest.sock"),
        started_unix: 0,
    };
    state::write_json(&state::backup_path(d.path(), "guest"), &b).unwrap();
    // Captured in the lab while xl remus ran: guest and guest--incoming.
    let xen = listing("xl-list-during-remus.txt");
    let t0 = Instant::now();
    let children = loop {
        let c = grandchildren(relay.id());
        if c.len() == 2 || t0.elapsed() > Duration::from_secs(10) {
            break c;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(children.len(), 2);
    // The whole receiver tree: the inner sh and its sleep, and the other sleep (waited
    // for: the inner sh may not have started its sleep yet on a busy machine).
    let t0 = Instant::now();
    let tree = loop {
        let mut tree = children.clone();
        tree.extend(children.iter().flat_map(|c| grandchildren(*c)));
        tree.sort();
        if tree.len() == 3 || t0.elapsed() > Duration::from_secs(10) {
            break tree;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(tree.len(), 3, "{tree:?}");
    let done = unprotect_guest(d.path(), &xen, LeftBuffer::None).unwrap();
    // guest--incoming is domid 4 in the capture.
    assert_eq!(done.destroyed, Some(4));
    let mut killed = done.killed.clone();
    killed.sort();
    assert_eq!(killed, tree);
    assert_eq!(*xen.destroyed.borrow(), ["guest--incoming"]);
    let t = Instant::now();
    while children.iter().any(|p| alive(*p)) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        children.iter().all(|p| !alive(*p)),
        "the receiver tree survived"
    );
    // The relay itself keeps listening for the next primary.
    assert!(alive(relay.id()));
    relay.kill().unwrap();
    relay.wait().unwrap();
}

/// A `remus protect guest` stand-in: on SIGTERM it records `ended` as its state file (as
/// the real one does once its relay answered) and exits.
fn fake_protect(dir: &Path, ended: Phase) -> Child {
    let after = dir.join("ended.json");
    state::write_json(&after, &protect_state(0, ended)).unwrap();
    let exe = dir.join("remus");
    if !exe.exists() {
        std::fs::copy("/bin/sh", &exe).unwrap();
    }
    let ready = dir.join("ready");
    let script = format!(
        "trap 'mv {} {}; exit 0' TERM; : > {}; while :; do sleep 0.05; done",
        after.display(),
        state::protect_path(dir, "guest").display(),
        ready.display()
    );
    let c = Command::new(&exe)
        .arg("-c")
        .arg(script)
        .args(["protect", "guest"])
        .spawn()
        .unwrap();
    state::write_json(
        &state::protect_path(dir, "guest"),
        &protect_state(c.id(), Phase::Protected),
    )
    .unwrap();
    // Its argv must read `remus … protect …`, and its trap be set, before it is stopped.
    let t = Instant::now();
    while !remus_user::protect::host::protect_pid_matches(c.id()) || !ready.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the stand-in did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c
}

#[test]
fn on_a_protecting_primary_it_stops_remus_protect_and_reports_the_clean_end() {
    let d = tempfile::tempdir().unwrap();
    let mut p = fake_protect(d.path(), Phase::Unprotected);
    let xen = listing("xl-list.txt");
    let done = unprotect_guest(d.path(), &xen, LeftBuffer::None).unwrap();
    assert_eq!(done.ended, Some((Phase::Unprotected, LeftBuffer::None)));
    // It signalled `remus protect`, which ended; nothing was killed or destroyed here.
    assert!(p.wait().unwrap().success());
    assert!(done.killed.is_empty());
    assert!(xen.destroyed.borrow().is_empty());
}

#[test]
fn on_a_primary_an_unconfirmed_end_is_exit_5_and_says_the_output_is_held() {
    let d = tempfile::tempdir().unwrap();
    let mut p = fake_protect(d.path(), Phase::EndUnconfirmed);
    let xen = listing("xl-list.txt");
    let e = unprotect_guest(d.path(), &xen, LeftBuffer::Holding).unwrap_err();
    assert!(matches!(e, UnprotectError::Unconfirmed { .. }), "{e}");
    assert_eq!(e.exit_code(), ExitCode::Unconfirmed);
    assert!(p.wait().unwrap().success());
}

#[test]
fn where_protection_ended_it_cleans_up_and_says_what_is_left() {
    let d = tempfile::tempdir().unwrap();
    // A recorded end; its supervisor is gone (pid of an exited process).
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    state::write_json(
        &state::protect_path(d.path(), "guest"),
        &protect_state(gone.id(), Phase::BackupLost),
    )
    .unwrap();
    std::fs::write(state::relay_exit_path(d.path(), "guest"), "{}").unwrap();
    let xen = listing("xl-list.txt");
    let done = unprotect_guest(d.path(), &xen, LeftBuffer::Passthrough).unwrap();
    assert_eq!(
        done.ended,
        Some((Phase::BackupLost, LeftBuffer::Passthrough))
    );
    assert!(done.killed.is_empty() && done.destroyed.is_none());
    assert!(!state::protect_path(d.path(), "guest").exists());
    assert!(!state::relay_exit_path(d.path(), "guest").exists());
    // Twice: nothing is left, so it is not protected here.
    let e = unprotect_guest(d.path(), &xen, LeftBuffer::None).unwrap_err();
    assert!(matches!(e, UnprotectError::NotProtected { .. }), "{e}");
    assert_eq!(e.exit_code(), ExitCode::Usage);
}
