//! The disk as the checkpoint controller and the relay see it: [`PrimaryBarrier`], the
//! checkpoint loop's [`DiskBarrier`] port on the primary (cut disk epoch N at the proven
//! suspend point, and do not start before the backup's disk is in sync), [`BackupDisk`]
//! on the backup (durable / merge / commit / failover, called by the relay's receive
//! side).
//!
//! Owns: the typed clients of the daemons' control sockets. Never touches: the daemons'
//! internals; the checkpoint state machine (`checkpoint::ports` owns the trait).
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::checkpoint::ports::{DiskBarrier, DiskBarrierError};

use super::control::{
    ApplyReport, Client, ControlError, ErrorKind, FailoverReport, Request, Response,
};

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

/// The primary daemon's control socket as a [`DiskBarrier`].
pub struct PrimaryBarrier {
    c: Client,
    /// The daemon's `--name` (known after [`PrimaryBarrier::connect_fresh`]).
    name: String,
}

impl PrimaryBarrier {
    pub async fn connect(socket: &Path) -> Result<PrimaryBarrier, DiskBarrierError> {
        Ok(PrimaryBarrier {
            c: Client::connect(socket).await?,
            name: String::new(),
        })
    }

    /// Connects and checks that the daemon can join a checkpoint loop from its start: it
    /// is a primary (`disk serve`), it replicates to a backup, and it has cut no epoch yet
    /// (its epochs must be numbered like the relay's checkpoints, from 1).
    pub async fn connect_fresh(socket: &Path) -> Result<PrimaryBarrier, DiskBarrierError> {
        let mut b = PrimaryBarrier::connect(socket).await?;
        let s = b.c.status().await?;
        let at = socket.display();
        if s.role != "primary" {
            return Err(DiskBarrierError::Refused(format!(
                "{at} is a {} disk daemon (`remus disk receive`): relay send needs the primary's (`remus disk serve`)",
                s.role
            )));
        }
        if s.backup.is_none() {
            return Err(DiskBarrierError::Refused(format!(
                "{at} ({}) replicates to no backup (started without --backup): nothing to protect",
                s.name
            )));
        }
        if let Some(l) = s.lost {
            return Err(DiskBarrierError::Lost(format!("{at} ({}): {l}", s.name)));
        }
        let open = s.epoch.unwrap_or(1);
        if open != 1 {
            return Err(DiskBarrierError::Refused(format!(
                "{at} ({}) has cut {} epochs already (an earlier protection run): its epochs would not match the checkpoints; start both disk daemons again",
                s.name,
                open.saturating_sub(1)
            )));
        }
        b.name = s.name;
        Ok(b)
    }

    pub fn name(&self) -> &str {
        &self.name
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
    /// The daemon's `--name` (known after [`BackupDisk::connect_checked`]).
    name: String,
}

impl BackupDisk {
    pub async fn connect(socket: &Path) -> Result<BackupDisk, DiskBarrierError> {
        Ok(BackupDisk {
            c: Client::connect(socket).await?,
            name: String::new(),
        })
    }

    /// Connects and checks that the daemon is a backup (`disk receive`) that has not
    /// failed over yet.
    pub async fn connect_checked(socket: &Path) -> Result<BackupDisk, DiskBarrierError> {
        let mut b = BackupDisk::connect(socket).await?;
        let s = b.c.status().await?;
        let at = socket.display();
        if s.role != "backup" {
            return Err(DiskBarrierError::Refused(format!(
                "{at} is a {} disk daemon (`remus disk serve`): relay receive needs the backup's (`remus disk receive`)",
                s.role
            )));
        }
        if s.device.is_some() {
            return Err(DiskBarrierError::Refused(format!(
                "{at} ({}) has failed over already (its disk is exported): start it again for a new primary",
                s.name
            )));
        }
        b.name = s.name;
        Ok(b)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The daemon's status.
    pub async fn status(&mut self) -> Result<super::control::DiskStatus, DiskBarrierError> {
        Ok(self.c.status().await?)
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
