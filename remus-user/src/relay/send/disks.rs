//! The primary's replicated disks (`relay send --disk SOCKET`): checked and waited for
//! before protection starts, then cut by the checkpoint driver with the output buffer.
//!
//! Owns: connecting to the primary disk daemons' control sockets, refusing a daemon
//! that cannot join this run (absent, a backup's, already cutting, not in sync in time),
//! and showing each disk's last cut in the status. Never touches: when a cut happens
//! (`checkpoint::relay_mode`), the daemons' internals (`disk`).
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use crate::checkpoint::{DiskBarrier, DiskBarrierError};
use crate::disk::barrier::PrimaryBarrier;
use crate::relay::{DiskState, Shared};

/// Why a disk cannot join protection: the daemon's socket and what it said.
#[derive(Debug, thiserror::Error)]
#[error("--disk {socket}: {source}")]
pub struct DiskSetupError {
    pub socket: String,
    pub source: DiskBarrierError,
}

/// A primary disk daemon as the driver's port, showing its cuts in the status.
pub struct StatusDisk {
    inner: PrimaryBarrier,
    shared: Arc<Shared>,
    index: usize,
}

impl DiskBarrier for StatusDisk {
    async fn wait_in_sync(&mut self, timeout: Duration) -> Result<(), DiskBarrierError> {
        self.inner.wait_in_sync(timeout).await
    }

    async fn cut(&mut self) -> Result<u64, DiskBarrierError> {
        let r = self.inner.cut().await;
        self.shared.set_disk(self.index, |d| match &r {
            Ok(e) => d.last_cut = *e,
            Err(e) => d.error = Some(e.to_string()),
        });
        r
    }
}

/// Connects to every disk daemon, checks it can join this run from its first epoch, and
/// waits (at most `sync_timeout` in all) until each backup's disk is in sync. Returns the
/// ports, named for the log, in the order given.
pub async fn connect_all(
    sockets: &[PathBuf],
    sync_timeout: Duration,
    shared: &Arc<Shared>,
) -> Result<Vec<(String, StatusDisk)>, DiskSetupError> {
    let deadline = tokio::time::Instant::now() + sync_timeout;
    let mut out = Vec::new();
    for (index, sock) in sockets.iter().enumerate() {
        let err = |source| DiskSetupError {
            socket: sock.display().to_string(),
            source,
        };
        let mut b = PrimaryBarrier::connect_fresh(sock).await.map_err(err)?;
        let name = b.name().to_string();
        shared.set(|s| {
            s.disks.push(DiskState {
                socket: sock.display().to_string(),
                name: name.clone(),
                ..Default::default()
            })
        });
        info!(disk = %name, socket = %sock.display(), "waiting until the backup's disk is in sync (protection starts only then)");
        shared.set(|s| {
            s.last_event = Some(format!(
                "waiting until disk {name}'s backup is in sync (protection starts only then)"
            ))
        });
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        b.wait_in_sync(left).await.map_err(err)?;
        info!(disk = %name, "the backup's disk is in sync");
        out.push((
            name,
            StatusDisk {
                inner: b,
                shared: shared.clone(),
                index,
            },
        ));
    }
    Ok(out)
}

/// The same socket twice would be cut twice per checkpoint (and fail: its second cut
/// closes the next epoch): refuse it as a typo.
pub fn check_unique(sockets: &[PathBuf]) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::<&Path>::new();
    for s in sockets {
        if !seen.insert(s.as_path()) {
            return Err(format!(
                "--disk {} given twice: name each disk of the guest once",
                s.display()
            ));
        }
    }
    Ok(())
}
