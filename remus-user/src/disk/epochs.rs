//! The backup's epoch arithmetic: which disk epochs exist, which are durable, which may
//! be applied, and what a commit or a failover at checkpoint N is allowed to do.
//!
//! Owns: the numbers and the rules (pure, no I/O). Never touches: files, the backing,
//! the network; `backup` asks before it acts and reports what it did.
//!
//! Disk epoch N holds the writes the guest issued between the cuts of checkpoints N-1
//! and N (the cut is taken at the same proven instant as the network epoch switch).
//! - durable(N): all of epoch N is in the journal and fsync'ed (its CUT arrived).
//! - commit(N): apply every epoch <= N to the backing. N must be durable and must be a
//!   failover point, i.e. not merged: a merged checkpoint's cut may lie after the guest
//!   resumed, so its epoch may hold writes memory checkpoint N never saw; it is applied
//!   only together with the next failover point (commit(N+1) applies N and N+1).
//! - failover(N): the same as commit(N), then every later epoch is discarded.
//!
//! Epochs are applied in order and never twice in a way that matters: replaying a
//! prefix again is idempotent (each record overwrites its whole range).
use std::collections::BTreeSet;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EpochError {
    #[error("disk epoch {got} arrived out of order (expected {expected})")]
    OutOfOrder { got: u64, expected: u64 },
    #[error("disk epoch {epoch} is not durable yet (durable up to {durable})")]
    NotDurable { epoch: u64, durable: u64 },
    #[error(
        "checkpoint {0} is merged (its cut was not proven before the guest resumed): it is \
         not a failover point; commit the next checkpoint instead"
    )]
    Merged(u64),
    #[error("checkpoint {epoch} is already committed (committed up to {committed})")]
    AlreadyCommitted { epoch: u64, committed: u64 },
    #[error("the backup's disk already holds epoch {applied}; it cannot go back to {epoch}")]
    BehindApplied { epoch: u64, applied: u64 },
    #[error("checkpoint 0 is not a checkpoint: nothing to fail over to")]
    NoCheckpoint,
    #[error("the backup's disk was never completely synchronised: no checkpoint to fail over to")]
    NotInSync,
}

/// The backup's epoch state. Starts unsynchronised; `synced(E)` marks the disk equal to
/// the primary's just before its epoch E began.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Epochs {
    pub in_sync: bool,
    /// Highest epoch whose writes are on the backing (durably).
    pub applied: u64,
    /// Highest epoch a commit was decided for (>= applied; > applied while applying).
    pub committed: u64,
    /// Highest epoch complete and fsync'ed in the journal (>= committed).
    pub durable: u64,
    /// Highest epoch whose CUT arrived (>= durable: its fsync may still be running).
    pub closed: u64,
    /// The epoch being received, if any of its frames arrived.
    pub open: Option<u64>,
    /// Checkpoints that are not failover points (not yet committed).
    pub merged: BTreeSet<u64>,
}

/// What a commit or failover must apply: epochs `from..=to` (empty when from > to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Apply {
    pub from: u64,
    pub to: u64,
}

impl Apply {
    pub fn is_empty(&self) -> bool {
        self.from > self.to
    }
}

impl Epochs {
    /// The backing now equals the primary's at the start of its epoch `current`.
    pub fn synced(&mut self, current: u64) {
        let base = current.saturating_sub(1);
        *self = Epochs {
            in_sync: true,
            applied: base,
            committed: base,
            durable: base,
            closed: base,
            open: None,
            merged: BTreeSet::new(),
        };
    }

    /// A fresh session starts over (a new initial synchronisation follows).
    pub fn reset(&mut self) {
        *self = Epochs::default();
    }

    fn expected(&self) -> u64 {
        self.open.unwrap_or(self.closed.max(self.durable) + 1)
    }

    /// A WRITE or ZERO of epoch `e` arrived.
    pub fn write(&mut self, e: u64) -> Result<(), EpochError> {
        let expected = self.expected();
        if e != expected {
            return Err(EpochError::OutOfOrder { got: e, expected });
        }
        self.open = Some(e);
        Ok(())
    }

    /// CUT(e) arrived: it must close the open epoch (or an empty one right after the
    /// last closed one). The caller makes it durable, then calls [`Epochs::durable`].
    pub fn cut(&mut self, e: u64) -> Result<(), EpochError> {
        let expected = self.expected();
        if e != expected {
            return Err(EpochError::OutOfOrder { got: e, expected });
        }
        self.closed = e;
        self.open = None;
        Ok(())
    }

    /// Epoch `e` is fsync'ed in the journal.
    pub fn durable(&mut self, e: u64) {
        self.durable = self.durable.max(e);
        self.closed = self.closed.max(e);
    }

    pub fn is_durable(&self, e: u64) -> bool {
        e <= self.durable
    }

    /// The session ended: the open epoch is incomplete and is dropped, and so is any
    /// closed one whose fsync did not finish.
    pub fn drop_open(&mut self) -> Option<u64> {
        self.closed = self.durable;
        self.open.take()
    }

    /// Marks checkpoint `e` as not a failover point on its own.
    pub fn merge(&mut self, e: u64) -> Result<(), EpochError> {
        if e <= self.committed {
            return Err(EpochError::AlreadyCommitted {
                epoch: e,
                committed: self.committed,
            });
        }
        self.merged.insert(e);
        Ok(())
    }

    /// What `commit(e)` must apply; an empty range when `e` is already applied.
    pub fn plan_commit(&self, e: u64) -> Result<Apply, EpochError> {
        if !self.in_sync {
            return Err(EpochError::NotInSync);
        }
        if e <= self.applied {
            return Ok(Apply {
                from: self.applied + 1,
                to: self.applied,
            });
        }
        if e > self.durable {
            return Err(EpochError::NotDurable {
                epoch: e,
                durable: self.durable,
            });
        }
        if self.merged.contains(&e) {
            return Err(EpochError::Merged(e));
        }
        Ok(Apply {
            from: self.applied + 1,
            to: e,
        })
    }

    /// What `failover(e)` must apply (then everything above `e` is discarded).
    pub fn plan_failover(&self, e: u64) -> Result<Apply, EpochError> {
        if e == 0 {
            return Err(EpochError::NoCheckpoint);
        }
        if !self.in_sync {
            return Err(EpochError::NotInSync);
        }
        if e < self.applied {
            return Err(EpochError::BehindApplied {
                epoch: e,
                applied: self.applied,
            });
        }
        // Applied-but-merged cannot happen (commit refuses merged points), so `e ==
        // applied` is always a failover point.
        if e > self.applied && self.merged.contains(&e) {
            return Err(EpochError::Merged(e));
        }
        if e > self.durable {
            return Err(EpochError::NotDurable {
                epoch: e,
                durable: self.durable,
            });
        }
        Ok(Apply {
            from: self.applied + 1,
            to: e,
        })
    }

    /// The decision to apply up to `e` is durable (recorded before applying).
    pub fn committing(&mut self, e: u64) {
        self.committed = self.committed.max(e);
    }

    /// Epochs up to `e` are on the backing.
    pub fn applied(&mut self, e: u64) {
        self.applied = self.applied.max(e);
        self.committed = self.committed.max(e);
        self.merged = self.merged.split_off(&(e + 1));
    }

    /// Everything above `e` is dropped (failover).
    pub fn discard_above(&mut self, e: u64) {
        self.durable = self.durable.min(e);
        self.closed = self.closed.min(e);
        self.open = None;
        self.merged = self.merged.range(..=e).copied().collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synced() -> Epochs {
        let mut e = Epochs::default();
        e.synced(1);
        e
    }

    #[test]
    fn epochs_arrive_in_order_and_become_durable() {
        let mut e = synced();
        e.write(1).unwrap();
        e.write(1).unwrap();
        assert_eq!(
            e.write(2),
            Err(EpochError::OutOfOrder {
                got: 2,
                expected: 1
            })
        );
        e.cut(1).unwrap();
        // The next epoch may arrive while epoch 1's fsync runs.
        e.write(2).unwrap();
        assert!(!e.is_durable(1));
        e.durable(1);
        assert_eq!(e.drop_open(), Some(2));
        // An empty epoch: a cut with no writes.
        assert_eq!(
            e.cut(3),
            Err(EpochError::OutOfOrder {
                got: 3,
                expected: 2
            })
        );
        e.cut(2).unwrap();
        e.durable(2);
        e.write(3).unwrap();
        assert!(e.is_durable(2) && !e.is_durable(3));
        assert_eq!(e.drop_open(), Some(3));
        e.write(3).unwrap();
    }

    #[test]
    fn commit_applies_everything_up_to_a_durable_failover_point() {
        let mut e = synced();
        for n in 1..=4 {
            e.cut(n).unwrap();
            e.durable(n);
        }
        assert_eq!(e.plan_commit(2), Ok(Apply { from: 1, to: 2 }));
        e.committing(2);
        e.applied(2);
        assert!(e.plan_commit(2).unwrap().is_empty(), "idempotent");
        assert!(e.plan_commit(1).unwrap().is_empty());
        assert_eq!(
            e.plan_commit(5),
            Err(EpochError::NotDurable {
                epoch: 5,
                durable: 4
            })
        );
        assert_eq!(e.plan_commit(4), Ok(Apply { from: 3, to: 4 }));
    }

    #[test]
    fn a_merged_checkpoint_is_applied_only_with_the_next_failover_point() {
        let mut e = synced();
        e.merge(2).unwrap();
        for n in 1..=3 {
            e.cut(n).unwrap();
            e.durable(n);
        }
        e.committing(1);
        e.applied(1);
        assert_eq!(e.plan_commit(2), Err(EpochError::Merged(2)));
        assert_eq!(e.plan_failover(2), Err(EpochError::Merged(2)));
        // Failover at the last good point before it is fine.
        assert_eq!(e.plan_failover(1), Ok(Apply { from: 2, to: 1 }));
        assert_eq!(e.plan_commit(3), Ok(Apply { from: 2, to: 3 }));
        e.applied(3);
        assert!(e.merged.is_empty(), "applied merges are forgotten");
        assert_eq!(
            e.merge(3),
            Err(EpochError::AlreadyCommitted {
                epoch: 3,
                committed: 3
            })
        );
    }

    #[test]
    fn failover_rules() {
        let mut e = Epochs::default();
        assert_eq!(e.plan_failover(1), Err(EpochError::NotInSync));
        assert_eq!(e.plan_commit(1), Err(EpochError::NotInSync));
        e.synced(5);
        assert_eq!(e.plan_failover(0), Err(EpochError::NoCheckpoint));
        assert_eq!(e.plan_failover(4), Ok(Apply { from: 5, to: 4 }));
        assert_eq!(
            e.plan_failover(3),
            Err(EpochError::BehindApplied {
                epoch: 3,
                applied: 4
            })
        );
        e.write(5).unwrap();
        e.cut(5).unwrap();
        e.durable(5);
        e.write(6).unwrap();
        assert_eq!(
            e.plan_failover(6),
            Err(EpochError::NotDurable {
                epoch: 6,
                durable: 5
            })
        );
        assert_eq!(e.plan_failover(5), Ok(Apply { from: 5, to: 5 }));
        e.merge(7).unwrap();
        e.discard_above(5);
        assert_eq!(e.open, None);
        assert!(e.merged.is_empty());
    }
}
