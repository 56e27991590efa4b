//! The disk as the checkpoint controller and the relay see it (phase 2 wires these in):
//! [`DiskBarrier`] on the primary (cut disk epoch N at the proven suspend point, and
//! do not start before the backup's disk is in sync), [`BackupDisk`] on the backup
//! (durable / merge / commit / failover, called by the relay's receive side).
//!
//! Owns: the typed clients of the daemons' control sockets. Never touches: the daemons'
//! internals; the checkpoint state machine (`checkpoint/` will own the trait, see the
//! proposal in docs/disk.md).
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::control::{
    ApplyReport, Client, ControlError, ErrorKind, FailoverReport, Request, Response,
};

/// Why a barrier operation failed, typed for the state machine.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiskBarrierError {
    /// The disk backup is gone: fail open (like a lost memory backup).
    #[error("disk backup lost: {0}")]
    Lost(String),
    /// The backup's disk is still being synchronised: protection cannot start yet.
    #[error("disk not in sync yet: {0}")]
    NotInSync(String),
    /// The disk daemon itself does not answer (crashed, not started).
    #[error("disk daemon unreachable: {0}")]
    Daemon(String),
    #[error("{0}")]
    Refused(String),
}

impl From<ControlError> for DiskBarrierError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Remote {
                kind: ErrorKind::Lost,
                message,
            } => DiskBarrierError::Lost(message),
            ControlError::Remote {
                kind: ErrorKind::NotInSync,
                message,
            } => DiskBarrierError::NotInSync(message),
            ControlError::Remote { message, .. } => DiskBarrierError::Refused(message),
            other => DiskBarrierError::Daemon(other.to_string()),
        }
    }
}

/// The port the checkpoint state machine drives on the primary (proposed for
/// `checkpoint/ports.rs`; implemented here by [`PrimaryBarrier`], by fakes in tests).
pub trait DiskBarrier: Send {
    /// Blocks until the backup's disk is in sync (checkpointing must not start before).
    fn wait_in_sync(
        &mut self,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), DiskBarrierError>> + Send;
    /// Closes the open disk epoch at the proven suspend point; returns its number, which
    /// is the checkpoint's. Called exactly where the network epoch is closed.
    fn cut(&mut self) -> impl Future<Output = Result<u64, DiskBarrierError>> + Send;
}

/// The primary daemon's control socket as a [`DiskBarrier`].
pub struct PrimaryBarrier {
    c: Client,
}

impl PrimaryBarrier {
    pub async fn connect(socket: &Path) -> Result<PrimaryBarrier, DiskBarrierError> {
        Ok(PrimaryBarrier {
            c: Client::connect(socket).await?,
        })
    }
}

impl DiskBarrier for PrimaryBarrier {
    async fn wait_in_sync(&mut self, timeout: Duration) -> Result<(), DiskBarrierError> {
        match self
            .c
            .request(&Request::WaitSync {
                timeout_ms: timeout.as_millis() as u64,
            })
            .await?
        {
            Response::InSync => Ok(()),
            other => Err(self.c.unexpected(&other).into()),
        }
    }

    async fn cut(&mut self) -> Result<u64, DiskBarrierError> {
        match self.c.request(&Request::Cut).await? {
            Response::Epoch { epoch } => Ok(epoch),
            other => Err(self.c.unexpected(&other).into()),
        }
    }
}

/// The backup daemon as the relay's receive side drives it.
pub struct BackupDisk {
    c: Client,
}

impl BackupDisk {
    pub async fn connect(socket: &Path) -> Result<BackupDisk, DiskBarrierError> {
        Ok(BackupDisk {
            c: Client::connect(socket).await?,
        })
    }

    /// Epoch `n` complete and fsync'ed in the journal. ACK(N) waits for this.
    pub async fn durable(&mut self, n: u64, timeout: Duration) -> Result<(), DiskBarrierError> {
        match self
            .c
            .request(&Request::Durable {
                epoch: n,
                timeout_ms: timeout.as_millis() as u64,
            })
            .await?
        {
            Response::Durable { .. } => Ok(()),
            other => Err(self.c.unexpected(&other).into()),
        }
    }

    /// Checkpoint `n` is not a failover point (its cut was not proven in time).
    pub async fn merge(&mut self, n: u64) -> Result<(), DiskBarrierError> {
        match self.c.request(&Request::Merge { epoch: n }).await? {
            Response::Ok => Ok(()),
            other => Err(self.c.unexpected(&other).into()),
        }
    }

    /// Memory checkpoint `n` is complete at xl: apply every disk epoch <= n.
    pub async fn commit(&mut self, n: u64) -> Result<ApplyReport, DiskBarrierError> {
        match self.c.request(&Request::Commit { epoch: n }).await? {
            Response::Applied(r) => Ok(r),
            other => Err(self.c.unexpected(&other).into()),
        }
    }

    /// The primary is dead and xl will resume memory checkpoint `n`: apply <= n, discard
    /// the rest, export the disk. Returns once the device is served.
    pub async fn failover(&mut self, n: u64) -> Result<FailoverReport, DiskBarrierError> {
        match self.c.request(&Request::Failover { epoch: n }).await? {
            Response::FailedOver(r) => Ok(r),
            other => Err(self.c.unexpected(&other).into()),
        }
    }
}

/// The socket of the daemon named `name`, or the only one running.
pub fn resolve_socket(name: Option<&str>, socket: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(s) = socket {
        return Ok(s.to_path_buf());
    }
    if let Some(n) = name {
        return Ok(super::control::socket_path(n));
    }
    let all = super::control::sockets();
    match all.len() {
        1 => Ok(all[0].clone()),
        0 => Err(format!(
            "no remus disk daemon is running (no {}/disk-*.sock)",
            super::control::RUN_DIR
        )),
        n => Err(format!(
            "{n} disk daemons are running: say which with --name NAME"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake barrier (a fake, named so): shows the trait is usable by a state machine.
    struct FakeBarrier {
        next: u64,
        lost: bool,
    }

    impl DiskBarrier for FakeBarrier {
        async fn wait_in_sync(&mut self, _t: Duration) -> Result<(), DiskBarrierError> {
            Ok(())
        }
        async fn cut(&mut self) -> Result<u64, DiskBarrierError> {
            if self.lost {
                return Err(DiskBarrierError::Lost("gone".into()));
            }
            self.next += 1;
            Ok(self.next - 1)
        }
    }

    async fn drive<B: DiskBarrier>(b: &mut B) -> Result<Vec<u64>, DiskBarrierError> {
        b.wait_in_sync(Duration::from_secs(1)).await?;
        Ok(vec![b.cut().await?, b.cut().await?])
    }

    #[tokio::test]
    async fn a_state_machine_can_drive_any_barrier() {
        let mut b = FakeBarrier {
            next: 1,
            lost: false,
        };
        assert_eq!(drive(&mut b).await.unwrap(), vec![1, 2]);
        b.lost = true;
        assert!(matches!(
            drive(&mut b).await,
            Err(DiskBarrierError::Lost(_))
        ));
    }

    #[test]
    fn control_errors_map_to_barrier_errors_by_kind() {
        let e: DiskBarrierError = ControlError::Remote {
            kind: ErrorKind::Lost,
            message: "m".into(),
        }
        .into();
        assert_eq!(e, DiskBarrierError::Lost("m".into()));
        let e: DiskBarrierError = ControlError::NotRunning {
            path: "p".into(),
            detail: "d".into(),
        }
        .into();
        assert!(matches!(e, DiskBarrierError::Daemon(_)));
    }
}
