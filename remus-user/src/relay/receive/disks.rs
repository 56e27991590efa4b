//! The backup's replicated disks (`relay receive --disk SOCKET`), as the feeder drives
//! them around each checkpoint:
//!
//! ```text
//!  cutter: … Write(N) … Ack(N)          session inserts Durable(N) before N's writes
//!  feeder: durable(N) on every disk ──► write N to xl ──► ACK(N) ──► commit(N) on every disk
//!          MERGED(N) from the primary ──► merge(N) on every disk (N is no failover point)
//!  close:  failover(last N written) on every disk ──► only then xl's stdin is closed
//! ```
//!
//! Owns: the clients of the backup disk daemons' control sockets for one session, and
//! each disk's line in the status. Never touches: when those calls happen (the feeder
//! and the session decide), the daemons' internals (`disk`).
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, error, info, warn};

use crate::checkpoint::DiskBarrierError;
use crate::disk::barrier::BackupDisk;
use crate::relay::{DiskState, Shared};

/// The disks of one session.
pub struct BackupDisks {
    disks: Vec<BackupDisk>,
    sockets: Vec<PathBuf>,
    shared: Arc<Shared>,
    /// How long one `durable` may wait.
    timeout: Duration,
}

impl BackupDisks {
    /// Connects to every daemon and checks it is a backup that has not failed over.
    /// The status lists the disks from here on.
    pub async fn connect(
        sockets: &[PathBuf],
        timeout: Duration,
        shared: &Arc<Shared>,
    ) -> Result<BackupDisks, String> {
        let mut disks = Vec::new();
        let mut states = Vec::new();
        for sock in sockets {
            let d = BackupDisk::connect_checked(sock)
                .await
                .map_err(|e| format!("--disk {}: {e}", sock.display()))?;
            states.push(DiskState {
                socket: sock.display().to_string(),
                name: d.name().to_string(),
                ..Default::default()
            });
            disks.push(d);
        }
        shared.set(|s| s.disks = states);
        Ok(BackupDisks {
            disks,
            sockets: sockets.to_vec(),
            shared: shared.clone(),
            timeout,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }

    fn note(&self, i: usize, e: &DiskBarrierError) {
        self.shared.set_disk(i, |d| d.error = Some(e.to_string()));
    }

    /// Every disk holds epoch `n` complete and fsync'ed. The first failure is returned
    /// (naming the disk); checkpoint `n` must then not reach the receiver.
    pub async fn durable(&mut self, n: u64) -> Result<(), String> {
        for i in 0..self.disks.len() {
            // The daemon bounds its own wait; this bounds a daemon that does not answer.
            let grace = self.timeout + Duration::from_secs(5);
            let r = match tokio::time::timeout(grace, self.disks[i].durable(n, self.timeout)).await
            {
                Ok(r) => r,
                Err(_) => Err(DiskBarrierError::Daemon(format!(
                    "no answer to durable({n}) within {grace:?}"
                ))),
            };
            match r {
                Ok(()) => self.shared.set_disk(i, |d| d.last_durable = n),
                Err(e) => {
                    self.note(i, &e);
                    return Err(format!("disk {}: {e}", self.disks[i].name()));
                }
            }
        }
        Ok(())
    }

    /// Checkpoint `n` is a failover point, written and acknowledged: apply the disks'
    /// epochs <= n. A failure is logged: the epochs stay in the journal, and the next
    /// commit or a failover applies them.
    pub async fn commit(&mut self, n: u64) {
        for i in 0..self.disks.len() {
            match self.disks[i].commit(n).await {
                Ok(r) => {
                    debug!(disk = self.disks[i].name(), checkpoint = n, applied = ?r.applied, "disk committed");
                    self.shared.set_disk(i, |d| d.last_committed = n);
                }
                Err(e) => {
                    warn!(disk = self.disks[i].name(), checkpoint = n, error = %e, "disk commit failed; its epochs stay in the journal");
                    self.note(i, &e);
                }
            }
        }
    }

    /// Checkpoint `n` is merged (not a failover point): tell every disk. The relay never
    /// fails over to it anyway (the cutter holds it back); a failure is logged.
    pub async fn merge(&mut self, n: u64) {
        for i in 0..self.disks.len() {
            if let Err(e) = self.disks[i].merge(n).await {
                warn!(disk = self.disks[i].name(), checkpoint = n, error = %e, "telling the disk of a merged checkpoint failed");
                self.note(i, &e);
            }
        }
    }

    /// The receiver holds checkpoints up to `n` whole and its stream is about to close:
    /// every disk applies its epochs <= n, discards the rest and is exported. Only if
    /// every disk did may the stream close (xl then activates the guest on disks at n).
    pub async fn failover(&mut self, n: u64) -> Result<(), String> {
        for i in 0..self.disks.len() {
            // A fresh connection: an earlier request may have been given up on (a late
            // answer would be read as this one's).
            let r = match BackupDisk::connect(&self.sockets[i]).await {
                Ok(mut d) => d.failover(n).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(r) => {
                    info!(disk = self.disks[i].name(), checkpoint = n, applied = ?r.applied, discarded = ?r.discarded, device = ?r.device, "disk failed over");
                    self.shared.set_disk(i, |d| d.failed_over = Some(n));
                }
                Err(e) => {
                    error!(disk = self.disks[i].name(), checkpoint = n, error = %e, "DISK FAILOVER FAILED");
                    self.note(i, &e);
                    return Err(format!("disk {}: {e}", self.disks[i].name()));
                }
            }
        }
        Ok(())
    }
}
