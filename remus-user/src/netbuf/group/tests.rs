//! The group of vifs over fake buffers (named fakes: they only log what was asked).
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Close(u64),
    Commit(u64),
    Open,
}

type Log = Arc<Mutex<Vec<(&'static str, Op)>>>;
/// The fake interfaces that no longer exist (shared by the fake vifs and the fake probe).
type GoneSet = Arc<Mutex<HashSet<&'static str>>>;

/// A fake vif buffer: numbers its epochs from `next`, logs every call that succeeded.
struct FakeVif {
    name: &'static str,
    next: u64,
    log: Log,
    fail_close: bool,
    fail_commit_at: Option<u64>,
    fail_open: bool,
    /// Skip this many numbers at the next close (a buffer that drifted).
    skip: u64,
    /// Once its name is in here its device is gone: every call fails as a holder that
    /// ended does.
    gone: GoneSet,
}

impl FakeVif {
    fn new(name: &'static str, first: u64, log: &Log) -> Self {
        FakeVif {
            name,
            next: first,
            log: log.clone(),
            fail_close: false,
            fail_commit_at: None,
            fail_open: false,
            skip: 0,
            gone: GoneSet::default(),
        }
    }

    fn with_gone(mut self, gone: &GoneSet) -> Self {
        self.gone = gone.clone();
        self
    }

    fn check_there(&self) -> Result<(), NetBufferError> {
        if self.gone.lock().unwrap().contains(self.name) {
            return Err(NetBufferError::Gone {
                iface: self.name.into(),
                reason: "holder stopped".into(),
            });
        }
        Ok(())
    }
}

impl NetBuffer for FakeVif {
    async fn close_epoch(&mut self) -> Result<u64, NetBufferError> {
        self.check_there()?;
        if self.fail_close {
            return Err(NetBufferError::Gone {
                iface: self.name.into(),
                reason: "fake".into(),
            });
        }
        self.next += std::mem::take(&mut self.skip);
        let e = self.next;
        self.next += 1;
        self.log.lock().unwrap().push((self.name, Op::Close(e)));
        Ok(e)
    }
    async fn commit(&mut self, epoch: u64) -> Result<Released, NetBufferError> {
        self.check_there()?;
        if epoch >= self.next {
            return Err(NetBufferError::EpochNotClosed {
                epoch,
                current: self.next,
            });
        }
        if self.fail_commit_at == Some(epoch) {
            return Err(NetBufferError::Failed("fake commit failure".into()));
        }
        self.log
            .lock()
            .unwrap()
            .push((self.name, Op::Commit(epoch)));
        Ok(Released {
            epoch,
            frames: 1,
            bytes: 100,
        })
    }
    async fn fail_open(&mut self) -> Result<Released, NetBufferError> {
        self.check_there()?;
        if self.fail_open {
            return Err(NetBufferError::Failed("fake open failure".into()));
        }
        self.log.lock().unwrap().push((self.name, Op::Open));
        Ok(Released {
            epoch: self.next,
            frames: 2,
            bytes: 200,
        })
    }
}

fn group(vifs: Vec<FakeVif>) -> VifGroup<FakeVif> {
    VifGroup::new(vifs.into_iter().map(|v| (v.name.to_string(), v)).collect())
}

/// A group whose probe says an interface exists unless it is in `gone` (a fake probe).
fn group_probed(vifs: Vec<FakeVif>, gone: &GoneSet) -> VifGroup<FakeVif> {
    let g = gone.clone();
    VifGroup::with_probe(
        vifs.into_iter().map(|v| (v.name.to_string(), v)).collect(),
        Box::new(move |i| !g.lock().unwrap().contains(i)),
    )
}

fn taken(log: &Log) -> Vec<(&'static str, Op)> {
    std::mem::take(&mut *log.lock().unwrap())
}

#[tokio::test]
async fn a_commit_releases_epoch_by_epoch_across_vifs_in_each_vifs_numbering() {
    let log = Log::default();
    // vif b took over from a dead holder: its numbers run 4 ahead.
    let mut g = group(vec![FakeVif::new("a", 1, &log), FakeVif::new("b", 5, &log)]);
    for want in 1..=3 {
        assert_eq!(g.close_epoch().await.unwrap(), want);
    }
    taken(&log);
    let r = g.commit(2).await.unwrap();
    assert_eq!((r.epoch, r.frames, r.bytes), (2, 4, 400));
    assert_eq!(
        taken(&log),
        [
            ("a", Op::Commit(1)),
            ("b", Op::Commit(5)),
            ("a", Op::Commit(2)),
            ("b", Op::Commit(6)),
        ]
    );
    // A stale commit releases nothing; the next one only what is new.
    assert_eq!(g.commit(2).await.unwrap().frames, 0);
    g.commit(3).await.unwrap();
    assert_eq!(taken(&log), [("a", Op::Commit(3)), ("b", Op::Commit(7))]);
}

#[tokio::test]
async fn committing_an_epoch_not_closed_on_every_vif_releases_nothing_anywhere() {
    let log = Log::default();
    let mut g = group(vec![FakeVif::new("a", 1, &log), FakeVif::new("b", 1, &log)]);
    assert!(matches!(
        g.commit(1).await,
        Err(NetBufferError::EpochNotClosed { epoch: 1, .. })
    ));
    g.close_epoch().await.unwrap();
    taken(&log);
    match g.commit(2).await {
        Err(NetBufferError::EpochNotClosed { epoch, current }) => {
            assert_eq!((epoch, current), (2, 2))
        }
        other => panic!("expected EpochNotClosed, got {other:?}"),
    }
    assert!(
        taken(&log).is_empty(),
        "epoch 1 must not go out with a refused commit"
    );
    // A refusal is the caller's mistake, not a broken vif: the group goes on.
    g.commit(1).await.unwrap();
}

#[tokio::test]
async fn a_vif_whose_numbers_drift_stops_the_group() {
    let log = Log::default();
    let mut g = group(vec![FakeVif::new("a", 1, &log), FakeVif::new("b", 1, &log)]);
    g.close_epoch().await.unwrap();
    g.members[1].buffer.skip = 1;
    match g.close_epoch().await {
        Err(NetBufferError::Diverged {
            iface,
            expected,
            got,
        }) => assert_eq!((iface.as_str(), expected, got), ("b", 2, 3)),
        other => panic!("expected Diverged, got {other:?}"),
    }
    taken(&log);
    assert!(matches!(
        g.commit(1).await,
        Err(NetBufferError::Stopped { iface }) if iface == "b"
    ));
    assert!(matches!(
        g.close_epoch().await,
        Err(NetBufferError::Stopped { .. })
    ));
    assert!(taken(&log).is_empty(), "a stopped group releases nothing");
    assert_eq!(g.stopped_by(), Some("b"));
}

#[tokio::test]
async fn a_commit_failing_on_one_vif_releases_no_later_epoch_on_any() {
    let log = Log::default();
    let mut b = FakeVif::new("b", 1, &log);
    b.fail_commit_at = Some(2);
    let mut g = group(vec![FakeVif::new("a", 1, &log), b]);
    for _ in 0..3 {
        g.close_epoch().await.unwrap();
    }
    taken(&log);
    assert!(matches!(g.commit(3).await, Err(NetBufferError::Failed(_))));
    // Epoch 1 went out on both, epoch 2 on a only (b failed), epoch 3 nowhere.
    assert_eq!(
        taken(&log),
        [
            ("a", Op::Commit(1)),
            ("b", Op::Commit(1)),
            ("a", Op::Commit(2)),
        ]
    );
    assert!(matches!(
        g.commit(3).await,
        Err(NetBufferError::Stopped { .. })
    ));
    assert!(taken(&log).is_empty());
}

#[tokio::test]
async fn a_cut_failing_on_one_vif_stops_the_group_but_a_lost_backup_still_opens_all() {
    let log = Log::default();
    let mut b = FakeVif::new("b", 1, &log);
    b.fail_close = true;
    let mut g = group(vec![FakeVif::new("a", 1, &log), b]);
    assert!(matches!(
        g.close_epoch().await,
        Err(NetBufferError::Gone { .. })
    ));
    assert!(matches!(
        g.commit(1).await,
        Err(NetBufferError::Stopped { .. })
    ));
    taken(&log);
    g.fail_open().await.unwrap();
    assert_eq!(taken(&log), [("a", Op::Open), ("b", Op::Open)]);
}

#[tokio::test]
async fn opening_releases_closed_epochs_in_order_across_vifs_then_opens_each() {
    let log = Log::default();
    let mut g = group(vec![FakeVif::new("a", 1, &log), FakeVif::new("b", 1, &log)]);
    for _ in 0..3 {
        g.close_epoch().await.unwrap();
    }
    g.commit(1).await.unwrap();
    taken(&log);
    let r = g.fail_open().await.unwrap();
    assert_eq!(
        taken(&log),
        [
            ("a", Op::Commit(2)),
            ("b", Op::Commit(2)),
            ("a", Op::Commit(3)),
            ("b", Op::Commit(3)),
            ("a", Op::Open),
            ("b", Op::Open),
        ]
    );
    assert_eq!((r.frames, r.bytes), (4 + 4, 400 + 400));
}

#[tokio::test]
async fn opening_names_the_vifs_that_stay_blocked_and_opens_the_rest() {
    let log = Log::default();
    let mut a = FakeVif::new("a", 1, &log);
    a.fail_open = true;
    let mut g = group(vec![
        a,
        FakeVif::new("b", 1, &log),
        FakeVif::new("c", 1, &log),
    ]);
    match g.fail_open().await {
        Err(NetBufferError::NotOpened { failed }) => {
            assert_eq!(failed.len(), 1);
            assert!(failed[0].starts_with("a: "), "{failed:?}");
        }
        other => panic!("expected NotOpened, got {other:?}"),
    }
    assert_eq!(taken(&log), [("b", Op::Open), ("c", Op::Open)]);
}

#[tokio::test]
async fn one_vif_is_passed_straight_through() {
    let log = Log::default();
    let mut g = group(vec![FakeVif::new("a", 7, &log)]);
    assert_eq!(g.close_epoch().await.unwrap(), 7);
    assert_eq!(g.close_epoch().await.unwrap(), 8);
    g.commit(8).await.unwrap();
    // One commit call for both epochs, as a single buffer gets it.
    assert_eq!(
        taken(&log),
        [
            ("a", Op::Close(7)),
            ("a", Op::Close(8)),
            ("a", Op::Commit(8))
        ]
    );
    assert!(matches!(
        g.commit(9).await,
        Err(NetBufferError::EpochNotClosed {
            epoch: 9,
            current: 9
        })
    ));
}

#[tokio::test]
async fn an_emu_vif_that_vanishes_at_a_cut_leaves_the_group_and_the_others_go_on() {
    let (log, gone) = (Log::default(), GoneSet::default());
    // The emulated NIC first: the group's numbers must not follow it away.
    let mut g = group_probed(
        vec![
            FakeVif::new("vif3.0-emu", 1, &log).with_gone(&gone),
            FakeVif::new("vif3.0", 4, &log).with_gone(&gone),
        ],
        &gone,
    );
    assert_eq!(g.close_epoch().await.unwrap(), 1);
    gone.lock().unwrap().insert("vif3.0-emu");
    assert_eq!(g.close_epoch().await.unwrap(), 2);
    assert_eq!(g.vanished(), ["vif3.0-emu"]);
    assert_eq!(g.ifaces(), ["vif3.0"]);
    taken(&log);
    let r = g.commit(2).await.unwrap();
    assert_eq!(r.frames, 2, "the PV vif's two epochs");
    assert_eq!(
        taken(&log),
        [("vif3.0", Op::Commit(4)), ("vif3.0", Op::Commit(5))]
    );
    assert_eq!(g.close_epoch().await.unwrap(), 3);
    g.commit(3).await.unwrap();
    assert_eq!(
        taken(&log),
        [("vif3.0", Op::Close(6)), ("vif3.0", Op::Commit(6))]
    );
    assert_eq!(g.stopped_by(), None);
}

#[tokio::test]
async fn an_emu_vif_that_vanishes_during_a_release_loses_only_its_own_frames() {
    let (log, gone) = (Log::default(), GoneSet::default());
    let mut g = group_probed(
        vec![
            FakeVif::new("vif3.0", 1, &log).with_gone(&gone),
            FakeVif::new("vif3.0-emu", 1, &log).with_gone(&gone),
            FakeVif::new("vif3.1", 1, &log).with_gone(&gone),
        ],
        &gone,
    );
    for _ in 0..3 {
        g.close_epoch().await.unwrap();
    }
    g.commit(1).await.unwrap();
    taken(&log);
    gone.lock().unwrap().insert("vif3.0-emu");
    let r = g.commit(3).await.unwrap();
    assert_eq!((r.epoch, r.frames), (3, 4));
    // Epoch by epoch across the vifs that are left, in order.
    assert_eq!(
        taken(&log),
        [
            ("vif3.0", Op::Commit(2)),
            ("vif3.1", Op::Commit(2)),
            ("vif3.0", Op::Commit(3)),
            ("vif3.1", Op::Commit(3)),
        ]
    );
    g.fail_open().await.unwrap();
    assert_eq!(taken(&log), [("vif3.0", Op::Open), ("vif3.1", Op::Open)]);
}

#[tokio::test]
async fn an_emu_vif_that_fails_but_is_still_there_stops_the_group() {
    let (log, gone) = (Log::default(), GoneSet::default());
    let mut emu = FakeVif::new("vif3.0-emu", 1, &log).with_gone(&gone);
    emu.fail_commit_at = Some(1);
    let mut g = group_probed(
        vec![FakeVif::new("vif3.0", 1, &log).with_gone(&gone), emu],
        &gone,
    );
    g.close_epoch().await.unwrap();
    assert!(matches!(g.commit(1).await, Err(NetBufferError::Failed(_))));
    assert_eq!(g.stopped_by(), Some("vif3.0-emu"));
    assert!(g.vanished().is_empty());
    assert!(matches!(
        g.close_epoch().await,
        Err(NetBufferError::Stopped { .. })
    ));
}

#[tokio::test]
async fn a_pv_vif_that_vanishes_stops_the_group_and_a_lone_emu_vif_is_not_tolerated() {
    let (log, gone) = (Log::default(), GoneSet::default());
    let mut g = group_probed(
        vec![
            FakeVif::new("vif3.0", 1, &log).with_gone(&gone),
            FakeVif::new("vif3.0-emu", 1, &log).with_gone(&gone),
        ],
        &gone,
    );
    g.close_epoch().await.unwrap();
    gone.lock().unwrap().insert("vif3.0");
    assert!(matches!(
        g.close_epoch().await,
        Err(NetBufferError::Gone { .. })
    ));
    assert_eq!(g.stopped_by(), Some("vif3.0"));

    let mut lone = group_probed(
        vec![FakeVif::new("vif4.0-emu", 1, &log).with_gone(&gone)],
        &gone,
    );
    gone.lock().unwrap().insert("vif4.0-emu");
    assert!(matches!(
        lone.close_epoch().await,
        Err(NetBufferError::Gone { .. })
    ));
}

#[tokio::test]
async fn when_every_vif_has_vanished_nothing_is_pretended() {
    let (log, gone) = (Log::default(), GoneSet::default());
    let mut g = group_probed(
        vec![
            FakeVif::new("vif3.0-emu", 1, &log).with_gone(&gone),
            FakeVif::new("vif3.1-emu", 1, &log).with_gone(&gone),
        ],
        &gone,
    );
    g.close_epoch().await.unwrap();
    gone.lock().unwrap().extend(["vif3.0-emu", "vif3.1-emu"]);
    assert!(matches!(
        g.close_epoch().await,
        Err(NetBufferError::Failed(m)) if m.contains("every vif")
    ));
}

#[test]
fn only_emulated_nics_may_vanish_and_a_missing_interface_is_not_present() {
    assert!(may_vanish("vif7.0-emu"));
    assert!(!may_vanish("vif7.0"));
    assert!(!may_vanish("emu0"));
    assert!(!iface_present("remus-no-such0"));
    assert!(!iface_present("bad\0name"));
    assert!(iface_present("lo"));
}
