//! The checkpoint loop of the primary: an explicit state machine behind typed ports.
//!
//! ```text
//!                   Suspended(N)              EpochCut(N, e)             Proof(N, in_time)
//!   ┌─────────┐ ────────────────► ┌─────────┐ ──────────────► ┌───────────┐ ──────────────► ┌─────────┐
//!   │ Running │   [CutEpoch N]    │ Cutting │                 │ Suspended │ [Merged N, e]   │ Resumed │
//!   └─────────┘                   └─────────┘                 └───────────┘  if not in time └─────────┘
//!        ▲                                                                                       │
//!        └──────────────────────── Sent(N): N now waits for its ACK ─────────────────────────────┘
//!
//!   in Running / Cutting / Suspended / Resumed:
//!     Ack(M)            → [Commit e]: e = the newest proven cut of a checkpoint <= M
//!                         (stale or duplicate: nothing; M > last sent: error → Aborted)
//!     BackupLost(why)   → [FailOpen] → FailingOpen ── FailedOpen(released) ──► Unprotected
//!     StreamEnded       → Ended(Closed)               Unprotected ── StreamEnded ──► Ended(Lost)
//!   in FailingOpen / Unprotected: ACKs, suspends, cuts, proofs change nothing (no holding)
//!   ending protection on request: the driver asks the backup to discard its copy; only
//!     once it confirmed does it feed BackupLost(Discarded) (→ FailOpen); unconfirmed,
//!     it stops with nothing released
//!   in Cutting: CutFailed (a disk's cut failed) → Aborted
//!   any error (out of order, wrong checkpoint, bogus ACK) → Aborted: nothing more is released
//!
//!   one checkpoint's life in the ledger (`output_commit::Ledger`):
//!     cut decided (proven | merged) → sent whole → acknowledged (commit, or ride on a later one)
//! ```
//!
//! Owns: the phases ([`machine`], pure), the ports they drive ([`ports`]), the hypervisor
//! port and its pure rules ([`hypervisor`]: how the guest is suspended, how long that
//! takes; observed only, never an input of the machine today), and the relay-mode
//! driver ([`relay_mode`]) that feeds the machine from xl's stream today. Never touches:
//! sockets, processes or the kernel directly: the output buffer is reached through
//! [`NetBuffer`], the backup through [`Replicator`], so all of this is tested with fakes,
//! without Xen and without root.
//!
//! A driver tells the machine what happened ([`Input`]), carries out the [`Action`]s it
//! returns on its ports, and feeds back their results. The relay-mode driver learns the
//! suspend instant from the first post-suspend byte of xl's stream and proves the cut with
//! the pipe bound; a native driver (asking Xen through a `Hypervisor` port) can feed the
//! same inputs. Cutting an epoch is one action ([`Action::CutEpoch`]), so every
//! replicated disk ([`DiskBarrier`]) is cut at the same instant as the output buffer, and
//! merged with it; a disk cut that fails ends protection fail closed
//! ([`Input::CutFailed`] → Aborted). The invariant it all serves is described, with where it is enforced, in
//! [`crate::output_commit`].
pub mod hypervisor;
pub mod machine;
pub mod ports;
pub mod relay_mode;

pub use machine::{Action, Input, Machine, MachineError, Phase, RunEnd, State};
pub use ports::{
    Acked, BackupEvent, BeforeFirstCut, DiscardedCopy, DiskBarrier, DiskBarrierError, LossKind,
    LossReason, NetBuffer, NetBufferError, NoDisk, Released, Replicator, ReplicatorError,
};
pub use relay_mode::{PipeGauge, PipeSizes, RelayDriver};

use crate::stream::StreamError;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("output buffer: {0}")]
    Buffer(#[from] NetBufferError),
    #[error("the migration stream from xl is malformed: {0}")]
    Stream(#[from] StreamError),
    #[error("reading the migration stream from xl: {0}")]
    Input(std::io::Error),
    #[error("checkpoint machine: {0}")]
    Machine(#[from] MachineError),
    #[error("the checkpoint loop stopped while {0:?}, not at an end")]
    NotEnded(Phase),
    /// Asked to end protection, the backup did not confirm that it discarded its copy:
    /// nothing was released (it may still activate that copy).
    #[error(
        "the backup did not confirm that it discarded its copy ({0}); the guest's output stays held"
    )]
    EndUnconfirmed(ReplicatorError),
}

#[cfg(test)]
mod tests;
