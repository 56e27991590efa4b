//! Output commit: the one invariant of remus, and the ledger that applies it to ACKs.
//!
//! Owns: the rule that decides which epoch an acknowledged checkpoint may release
//! ([`Ledger`]), and the property tests of the whole chain (`output_commit_*`). Never
//! touches: the buffer, the wire, the stream: the checkpoint machine feeds the ledger and
//! turns its answers into commits.
//!
//! # The invariant (DESIGN.md, "The one invariant: output commit")
//!
//! A frame the guest emitted in epoch N (after checkpoint N-1 resumed the guest, before
//! the guest was suspended for checkpoint N) leaves the host only after the backup has
//! acknowledged that it holds checkpoint N completely. Releasing late is always safe;
//! releasing early never is: when unsure which epoch a frame belongs to, give it the later
//! one (merge epochs). If the backup is lost, the primary is the only copy: the buffer
//! is opened, but only once the loss has been declared.
//!
//! # Where it is enforced (four places, each necessary)
//!
//! 1. **The epoch stamp**, `remus-ebpf/src/main.rs`, `remus_vif_in`: every frame the
//!    guest sends is stamped with the current epoch (the `CTL_EPOCH` control slot) and
//!    taken out of the datapath; nothing passes unheld unless the mode is pass-through or
//!    the frame carries `RELEASE_MARK` (it is being released). Failing closed: an error
//!    drops and counts, never passes.
//! 2. **The holder's commit**, `remus-user/src/holder.rs`, `Holder::commit` (and
//!    `Holder::push`): only closed epochs can be committed (`HolderError::NotClosed`),
//!    commit releases epochs `<= N` in epoch order, and a frame stamped with an epoch
//!    already committed is counted late, never re-ordered ahead of held ones.
//! 3. **The checkpoint machine's proof / merge / ACK rules**,
//!    `remus-user/src/checkpoint/machine.rs` (`step`) with this module's [`Ledger`]: an
//!    epoch is cut when the guest is suspended; its ACK may commit it only if the cut is
//!    proven to have happened while the guest was still suspended (else it is merged into
//!    the next proven one); an ACK beyond the last checkpoint sent is refused and the
//!    machine aborts holding everything; duplicate and stale ACKs release nothing; the
//!    buffer is opened (`Action::FailOpen`) only on a declared loss of the backup. The
//!    relay-mode driver (`checkpoint/relay_mode.rs`) supplies the proof: P > R + C.
//! 4. **The backup's cut**, `remus-user/src/relay/receive/cutter.rs`, `Cutter`: the
//!    backup acknowledges checkpoint N only once every byte of it was written to its
//!    receiver, and writes later checkpoints only whole, so an ACK never claims more than
//!    the backup can resume from.
use std::collections::BTreeMap;

/// An ACK that claims more than was sent: a broken or hostile peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the backup acknowledged checkpoint {acked}, but only checkpoints up to {sent} were sent: \
     refusing it and releasing nothing (the guest's output stays held)"
)]
pub struct BogusAck {
    pub acked: u64,
    pub sent: u64,
}

/// What a valid ACK allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// Commit every epoch `<= epoch`.
    Commit { epoch: u64 },
    /// Covers only merged checkpoints: their epochs wait for the next proven commit.
    Nothing,
    /// At or below an earlier ACK: ignored.
    Stale { last: u64 },
}

/// The checkpoints whose epoch cut is decided and not yet covered by an ACK, and what an
/// ACK of each may release.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    /// checkpoint -> its epoch if the cut was proven in time, `None` if merged.
    open: BTreeMap<u64, Option<u64>>,
    /// Last checkpoint sent whole to the backup: no valid ACK exceeds it.
    sent: u64,
    acked: u64,
    committed: u64,
}

impl Ledger {
    /// The cut of `checkpoint` (epoch `epoch`) is decided: proven in time or merged.
    pub fn decided(&mut self, checkpoint: u64, epoch: u64, proven: bool) {
        self.open.insert(checkpoint, proven.then_some(epoch));
    }

    /// Every byte of `checkpoint` went to the backup: from now on ACK(checkpoint) is valid.
    pub fn sent(&mut self, checkpoint: u64) {
        self.sent = self.sent.max(checkpoint);
    }

    /// The backup acknowledged `checkpoint`.
    pub fn ack(&mut self, checkpoint: u64) -> Result<AckOutcome, BogusAck> {
        if checkpoint > self.sent {
            return Err(BogusAck {
                acked: checkpoint,
                sent: self.sent,
            });
        }
        if checkpoint <= self.acked {
            return Ok(AckOutcome::Stale { last: self.acked });
        }
        self.acked = checkpoint;
        let covered = self.open.range(..=checkpoint).filter_map(|(_, e)| *e).max();
        // Everything at or below the ACK is settled; merged epochs ride on `covered`.
        self.open = self.open.split_off(&checkpoint.saturating_add(1));
        match covered {
            Some(epoch) => {
                self.committed = epoch;
                Ok(AckOutcome::Commit { epoch })
            }
            None => Ok(AckOutcome::Nothing),
        }
    }

    /// The backup is lost: nothing pending will ever be acknowledged.
    pub fn forget(&mut self) {
        self.open.clear();
    }

    pub fn last_sent(&self) -> u64 {
        self.sent
    }

    pub fn last_acked(&self) -> u64 {
        self.acked
    }

    pub fn committed_epoch(&self) -> u64 {
        self.committed
    }
}

#[cfg(test)]
mod tests;
