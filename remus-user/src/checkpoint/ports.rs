//! The ports the checkpoint loop drives: the output buffer ([`NetBuffer`]) and the
//! backup ([`Replicator`]). They live beside their user so every implementation (the real
//! eBPF buffer, the TCP replicator, the fakes of the state-machine tests) conforms to what
//! the checkpoint loop needs, not the other way round.
//!
//! Owns: the traits and the types that cross them. Never touches: any implementation.
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
}

/// The controller's view of an output buffer. Implemented by the real eBPF buffer and by
/// fakes in state-machine tests.
pub trait NetBuffer: Send {
    /// Closes the current epoch; returns the number of the epoch just closed.
    fn checkpoint(
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

/// What the backup said, as the controller needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackupEvent {
    /// The backup holds checkpoint N completely.
    Ack(u64),
    /// The backup is gone (connection error, heartbeat timeout, abort); the reason is
    /// for the operator.
    Lost(String),
}

/// The backup as the controller drives it. Implemented over TCP by `relay::send`, and by
/// fakes in tests.
pub trait Replicator: Send {
    /// Sends `bytes` (the next bytes of the stream, in order) to the backup. `events` are
    /// the parser events these bytes completed (absolute offsets), so an implementation
    /// can find record boundaries (e.g. to compress PAGE_DATA). `Err` means the backup is
    /// lost (the reason).
    fn forward(
        &mut self,
        bytes: &[u8],
        events: &[Event],
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
    /// The next thing the backup says. Must be cancel-safe (it is raced against stdin).
    fn next_event(&mut self) -> impl std::future::Future<Output = BackupEvent> + Send;
    /// xl's stream ended: tell the backup (orderly close) and wait for its answer.
    /// Returns, in order, the checkpoints it acknowledged meanwhile (not yet returned by
    /// `next_event`), so their epochs can still be committed.
    fn finish(
        &mut self,
        checkpoints: u64,
        finished: bool,
    ) -> impl std::future::Future<Output = Result<Vec<u64>, String>> + Send;
}
