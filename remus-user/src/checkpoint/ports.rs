//! The ports the checkpoint loop drives: the output buffer ([`NetBuffer`]), the backup
//! ([`Replicator`]) and the replicated disks ([`DiskBarrier`], cut at the same instant as
//! the buffer's epoch). They live beside their user so every implementation (the real
//! eBPF buffer, the TCP replicator, the disk daemon's control socket, the fakes of the
//! state-machine tests) conforms to what the checkpoint loop needs, not the other way
//! round. The `Hypervisor` port, with its own rules, is `checkpoint::hypervisor`.
//!
//! Owns: the traits and the types that cross them (including why a peer was lost).
//! Never touches: any implementation.
use bytes::BytesMut;
use serde::{Deserialize, Serialize};

use crate::stream::Event;

/// What a commit (or a release-everything) let out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    /// Highest epoch now released.
    pub epoch: u64,
    pub frames: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NetBufferError {
    #[error("epoch {epoch} is not closed yet (current epoch is {current}): run checkpoint first")]
    EpochNotClosed { epoch: u64, current: u64 },
    #[error("the buffer on {iface} is gone: {reason}")]
    Gone { iface: String, reason: String },
    #[error("buffer operation failed: {0}")]
    Failed(String),
    /// A vif of a group numbers its epochs out of step with the others.
    #[error(
        "the epochs of {iface} drifted from the other vifs' (expected {expected}, got {got}): nothing more is released"
    )]
    Diverged {
        iface: String,
        expected: u64,
        got: u64,
    },
    /// An earlier failure on `iface` stopped the group of vifs: nothing more is released.
    #[error(
        "the output buffer of {iface} failed earlier; the guest's vifs stay held (fail closed)"
    )]
    Stopped { iface: String },
    /// Opening (backup lost) failed on these vifs (`iface: why`); the others are open.
    #[error("could not open the output buffer of {}: they stay blocked", failed.join("; "))]
    NotOpened { failed: Vec<String> },
}

/// The controller's view of an output buffer. Implemented by the real eBPF buffer and by
/// fakes in state-machine tests.
///
/// Before the first cut a buffer either holds (its epoch 1 collects the guest's output)
/// or passes the output through untouched ([`BeforeFirstCut`]); the first
/// [`close_epoch`](NetBuffer::close_epoch) switches a passing buffer to holding at the
/// same instant as it closes epoch 1 (empty then), so every frame that reaches the vif
/// after the cut is held. Why passing until then is safe is argued in `docs/relay.md`
/// ("Before the first checkpoint") and in `crate::output_commit`.
pub trait NetBuffer: Send {
    /// Closes the current epoch (the cut); returns the number of the epoch just closed.
    /// From its return on, every frame the guest sends is held (a buffer passing until
    /// the first cut holds from the first cut on).
    fn close_epoch(
        &mut self,
    ) -> impl std::future::Future<Output = Result<u64, NetBufferError>> + Send;
    /// Releases every held frame of epochs <= `epoch`.
    fn commit(
        &mut self,
        epoch: u64,
    ) -> impl std::future::Future<Output = Result<Released, NetBufferError>> + Send;
    /// The backup is lost: release everything held, then let frames pass unheld.
    fn fail_open(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Released, NetBufferError>> + Send;
}

/// What a buffer does with the guest's output before the first cut.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BeforeFirstCut {
    /// Hold from attach on: epoch 1 collects everything until checkpoint 1's cut.
    #[default]
    Hold,
    /// Let the output pass until the first cut, which switches to holding. Safe because
    /// no failover point exists before checkpoint 1 and every failover point contains
    /// what the guest did before the first cut (see `docs/relay.md`).
    PassThrough,
}

/// How a peer (the backup, seen from the primary, or the primary, seen from the backup)
/// was lost. Code decides on the kind; the detail is for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Nothing heard for the heartbeat timeout.
    Silence,
    /// The connection broke (read or write error, closed under us).
    Connection,
    /// The peer gave up and said so (ABORT).
    Aborted,
    /// The peer ended the session (CLOSE) where that leaves this end alone: the backup
    /// closing unasked, or the primary ending a Remus stream (the backup fails over).
    Closed,
    /// The peer sent a frame kind that has no place here.
    Protocol,
    /// The peer's data could not be used: a corrupt frame, undecodable page data, a
    /// malformed migration stream.
    Corrupt,
    /// This end could not go on: compressing failed (primary), the receiver process
    /// stopped taking data (backup).
    LocalFailure,
    /// The backup discarded its copy at this end's request (protection ended): its
    /// receiver is dead, so no copy can be activated from here on.
    Discarded,
}

/// Why a peer was lost: a kind for code, a detail for people.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct LossReason {
    pub kind: LossKind,
    pub detail: String,
}

impl LossReason {
    pub fn new(kind: LossKind, detail: impl Into<String>) -> LossReason {
        LossReason {
            kind,
            detail: detail.into(),
        }
    }
}

/// An acknowledgement and what is known of its checkpoint's timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acked {
    /// The backup holds this checkpoint completely (and it is a failover point).
    pub checkpoint: u64,
    /// When the checkpoint's last byte was written to the connection (`None` if the
    /// implementation cannot tell).
    pub sent_at: Option<std::time::Instant>,
    /// How long the backup took to write it into its receiver, as the backup reported.
    pub backup_write: Option<std::time::Duration>,
}

impl Acked {
    /// An ACK without timings (fakes, ACKs that came with the CLOSE answer).
    pub fn bare(checkpoint: u64) -> Acked {
        Acked {
            checkpoint,
            sent_at: None,
            backup_write: None,
        }
    }
}

/// What the backup said, as the controller needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackupEvent {
    /// The backup holds checkpoint N completely.
    Ack(Acked),
    /// The backup is gone (connection error, heartbeat timeout, abort).
    Lost(LossReason),
}

/// The backup's word that it discarded its copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardedCopy {
    /// The last checkpoint it had whole when it killed its receiver.
    pub checkpoint: u64,
    /// Its discard command destroyed the incoming domain (or none had been built).
    pub copy_destroyed: bool,
}

/// Why the replicator could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ReplicatorError {
    /// The backup is gone.
    #[error(transparent)]
    Lost(#[from] LossReason),
    /// The orderly close was sent but not answered in time.
    #[error("no CLOSE answer from the backup within {0:?}")]
    NoCloseAnswer(std::time::Duration),
    /// DISCARD was sent but not answered in time.
    #[error("no answer to DISCARD from the backup within {0:?}")]
    NoDiscardAnswer(std::time::Duration),
}

impl ReplicatorError {
    /// The loss this error amounts to (a missing CLOSE answer counts as silence).
    pub fn loss(&self) -> LossReason {
        match self {
            ReplicatorError::Lost(r) => r.clone(),
            e @ (ReplicatorError::NoCloseAnswer(_) | ReplicatorError::NoDiscardAnswer(_)) => {
                LossReason::new(LossKind::Silence, e.to_string())
            }
        }
    }
}

/// The backup as the controller drives it. Implemented over TCP by `relay::send`, and by
/// fakes in tests.
pub trait Replicator: Send {
    /// Sends `bytes` (the next bytes of the stream, in order) to the backup. `events` are
    /// the parser events these bytes completed (absolute offsets), so an implementation
    /// can find record boundaries (e.g. to compress PAGE_DATA). `merged` are checkpoints
    /// whose cut was not proven in time (their libxc CHECKPOINT record is among
    /// `events`): the backup must be told, at that record's end in the stream (after
    /// every byte before it, before any byte of the checkpoint's end), that they must not
    /// become failover points.
    fn forward(
        &mut self,
        bytes: BytesMut,
        events: &[Event],
        merged: &[u64],
    ) -> impl std::future::Future<Output = Result<(), ReplicatorError>> + Send;
    /// The next thing the backup says. Must be cancel-safe (it is raced against stdin).
    fn next_event(&mut self) -> impl std::future::Future<Output = BackupEvent> + Send;
    /// xl's stream ended: tell the backup (orderly close) and wait for its answer.
    /// Returns, in order, the checkpoints it acknowledged meanwhile (not yet returned by
    /// `next_event`), so their epochs can still be committed.
    fn finish(
        &mut self,
        checkpoints: u64,
        finished: bool,
    ) -> impl std::future::Future<Output = Result<Vec<Acked>, ReplicatorError>> + Send;
    /// Protection ends on request: tell the backup to discard its copy (kill its
    /// receiver before its stream can end, destroy the copy) and wait, bounded, for its
    /// word. Only `Ok` means no copy can be activated any more; anything else (no answer,
    /// a refusal, the backup lost meanwhile) leaves that unknown.
    fn discard(
        &mut self,
    ) -> impl std::future::Future<Output = Result<DiscardedCopy, ReplicatorError>> + Send;
}

/// Why a disk barrier operation failed, typed for the state machine and the relay.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiskBarrierError {
    /// The disk's backup is gone. A cut that fails so ends protection fail closed: the
    /// memory backup may still activate its copy, so nothing more is released.
    #[error("disk backup lost: {0}")]
    Lost(String),
    /// The backup's disk is still being synchronised: protection cannot start yet.
    #[error("disk not in sync yet: {0}")]
    NotInSync(String),
    /// The disk daemon itself does not answer (crashed, not started).
    #[error("disk daemon unreachable: {0}")]
    Daemon(String),
    /// The daemon refused (wrong role, wrong state); the message says which.
    #[error("{0}")]
    Refused(String),
}

/// A replicated disk as the checkpoint loop drives it on the primary: its epoch is cut
/// at the same proven suspend instant as the output buffer's ([`Action::CutEpoch`]).
/// Implemented over the disk daemon's control socket by `disk::barrier::PrimaryBarrier`,
/// and by fakes in the state-machine tests.
///
/// [`Action::CutEpoch`]: super::Action::CutEpoch
pub trait DiskBarrier: Send {
    /// Blocks until the backup's disk is in sync (protection must not start before).
    fn wait_in_sync(
        &mut self,
        timeout: std::time::Duration,
    ) -> impl std::future::Future<Output = Result<(), DiskBarrierError>> + Send;
    /// Closes the open disk epoch; returns its number, which must be the checkpoint's
    /// (disk epochs are numbered like checkpoints, from 1).
    fn cut(&mut self) -> impl std::future::Future<Output = Result<u64, DiskBarrierError>> + Send;
}

/// No disk: the type of a driver without replicated disks (it has no values).
#[derive(Debug)]
pub enum NoDisk {}

impl DiskBarrier for NoDisk {
    async fn wait_in_sync(&mut self, _: std::time::Duration) -> Result<(), DiskBarrierError> {
        match *self {}
    }
    async fn cut(&mut self) -> Result<u64, DiskBarrierError> {
        match *self {}
    }
}
