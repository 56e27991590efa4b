//! The output buffer as the controller sees it: the `NetBuffer` trait and its errors.
//!
//! Owns: the contract between a checkpoint controller and the eBPF output buffer, and
//! the implementations of it (in-process holder; remote holder through the control
//! socket). Never touches: the wire protocol between hosts, Xen, the stream.
//!
//! Epochs: the buffer starts in epoch E0 (1 on a fresh attach). `checkpoint()` closes the
//! current epoch and returns its number; frames the guest emits afterwards get the next
//! one. `commit(N)` releases every held frame of epochs <= N, epoch by epoch, in capture
//! order. Committing an epoch that is not closed yet is an error and releases nothing.
use serde::{Deserialize, Serialize};

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
    fn checkpoint(&mut self) -> impl std::future::Future<Output = Result<u64, NetBufferError>> + Send;
    /// Releases every held frame of epochs <= `epoch`.
    fn commit(
        &mut self,
        epoch: u64,
    ) -> impl std::future::Future<Output = Result<Released, NetBufferError>> + Send;
    /// The backup is lost: release everything held, then let frames pass unheld.
    fn fail_open(&mut self) -> impl std::future::Future<Output = Result<Released, NetBufferError>> + Send;
}
