//! The root-only control socket of a `remus disk` daemon (`/run/remus/disk-NAME.sock`,
//! mode 0600): one JSON object per line each way, like remus-net's. The CLI, the
//! hotplug script and (phase 2) the checkpoint controller and the relay all speak it.
//!
//! Owns: the requests, the answers, the status document, the socket server and the
//! client. Never touches: what a request does (the daemon's [`Handler`] decides).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::exit::ExitCode;

/// Directory of the sockets (shared with remus-net and the relays).
pub const RUN_DIR: &str = "/run/remus";

pub fn socket_path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("disk-{name}.sock"))
}

/// Every disk daemon's socket on this host.
pub fn sockets() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(RUN_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("disk-") && n.ends_with(".sock"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Primary: close the open disk epoch.
    Cut,
    /// Primary: wait until the backup's disk is in sync.
    WaitSync {
        timeout_ms: u64,
    },
    /// Backup: wait until epoch `epoch` is durable in the journal.
    Durable {
        epoch: u64,
        timeout_ms: u64,
    },
    /// Backup: apply every epoch <= `epoch` (a failover point).
    Commit {
        epoch: u64,
    },
    /// Backup: checkpoint `epoch` is not a failover point on its own.
    Merge {
        epoch: u64,
    },
    /// Backup: apply <= `epoch`, discard the rest, export the disk.
    Failover {
        epoch: u64,
    },
    /// Backup: forget a lost session's disk state (a new primary may then sync).
    Discard,
}

/// Why a request failed: typed, so callers never read the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Bad request for this daemon or its state (the message says which).
    Usage,
    /// Asked the primary for a backup operation, or the other way round.
    WrongRole,
    NotInSync,
    NotDurable,
    Merged,
    /// The peer is gone: the primary's backup, or the backup's primary session.
    Lost,
    Timeout,
    Busy,
    /// An operation failed (I/O, journal): the message names the step.
    Failed,
}

impl ErrorKind {
    pub fn exit_code(self) -> ExitCode {
        match self {
            ErrorKind::Usage
            | ErrorKind::WrongRole
            | ErrorKind::NotInSync
            | ErrorKind::NotDurable
            | ErrorKind::Merged => ExitCode::Usage,
            ErrorKind::Lost => ExitCode::PeerLost,
            ErrorKind::Timeout | ErrorKind::Busy | ErrorKind::Failed => ExitCode::Failure,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    /// Everything up to here is on the backup's backing.
    pub epoch: u64,
    /// Epochs applied by this request.
    pub applied: Vec<u64>,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverReport {
    pub epoch: u64,
    pub applied: Vec<u64>,
    pub discarded: Vec<u64>,
    pub bytes: u64,
    /// Where the disk is served now ("/dev/nbdN" or "unix:PATH"), if an export was set.
    pub device: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Epoch { epoch: u64 },
    Status(Box<DiskStatus>),
    InSync,
    Durable { epoch: u64 },
    Applied(ApplyReport),
    FailedOver(FailoverReport),
    Ok,
    Error { kind: ErrorKind, message: String },
}

impl Response {
    pub fn error(kind: ErrorKind, message: impl std::fmt::Display) -> Response {
        Response::Error {
            kind,
            message: message.to_string(),
        }
    }
}

/// What `remus disk status` shows (JSON keys are stable; role-specific ones are null for
/// the other role).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// "primary" (disk serve) or "backup" (disk receive).
    pub role: String,
    pub pid: u32,
    pub name: String,
    /// primary: "syncing", "protected", "unprotected" (backup lost), "standalone" (no
    /// backup); backup: "waiting for primary", "syncing", "replicating", "lost",
    /// "exported".
    pub state: String,
    pub backing: String,
    pub size: u64,
    /// Where the disk is served ("/dev/nbdN" or "unix:PATH"), when it is.
    pub device: Option<String>,
    pub takeover: bool,
    pub connections: u64,
    pub mlocked: bool,
    // primary
    pub backup: Option<String>,
    pub epoch: Option<u64>,
    pub in_sync: Option<bool>,
    pub sync_copied_bytes: Option<u64>,
    pub sync_zeroed_bytes: Option<u64>,
    pub sync_seconds: Option<f64>,
    pub durable_acked: Option<u64>,
    pub queue_bytes: Option<u64>,
    pub queue_cap: Option<u64>,
    pub sent_bytes: Option<u64>,
    pub backpressure_waits: Option<u64>,
    pub backpressure_us: Option<u64>,
    pub lost: Option<String>,
    pub reads: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub io_errors: u64,
    // backup
    pub listen: Option<String>,
    pub peer: Option<String>,
    pub applied: Option<u64>,
    /// Applied and fsync'ed on the backing (a restart replays the journal from here).
    pub flushed: Option<u64>,
    pub committed: Option<u64>,
    pub durable: Option<u64>,
    pub open: Option<u64>,
    pub merged: Vec<u64>,
    pub held_epochs: Vec<u64>,
    pub journal_bytes: Option<u64>,
    pub ram_bytes: Option<u64>,
    pub sessions_total: Option<u64>,
    pub applied_bytes_total: Option<u64>,
    pub apply_seconds_total: Option<f64>,
    pub replayed_epochs: Vec<u64>,
    pub last_error: Option<String>,
    /// Fault injection (tests only): the apply is stalled where it was told to.
    pub fault_stalled: bool,
    pub since_unix: u64,
}

/// The daemon side: answers one request (blocking is fine: it runs off the runtime).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request) -> Response;
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no remus disk daemon at {path} ({detail})")]
    NotRunning { path: String, detail: String },
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{message}")]
    Remote { kind: ErrorKind, message: String },
    #[error("unexpected answer from {path}: {what}")]
    Unexpected { path: String, what: String },
}

impl ControlError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            ControlError::Remote { kind, .. } => kind.exit_code(),
            _ => ExitCode::Failure,
        }
    }
}

/// Removes the socket file when dropped.
pub struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the control socket (0600; refuses to steal one a live daemon answers on) and
/// serves it on the current runtime.
pub fn serve(path: &Path, h: Arc<dyn Handler>) -> Result<SocketGuard, ControlError> {
    use std::os::unix::fs::PermissionsExt;
    let p = path.display().to_string();
    let ioe = |source| ControlError::Io {
        path: p.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(ioe)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::Io {
                path: p.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another remus disk daemon answers on it (use another --name)",
                ),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path).map_err(ioe)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(ioe)?;
    tokio::spawn(async move {
        loop {
            if let Ok((s, _)) = l.accept().await {
                tokio::spawn(conn(s, h.clone()));
            }
        }
    });
    Ok(SocketGuard(path.to_path_buf()))
}

async fn conn(s: UnixStream, h: Arc<dyn Handler>) {
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let h = h.clone();
                tokio::task::spawn_blocking(move || h.handle(req))
                    .await
                    .unwrap_or_else(|e| Response::error(ErrorKind::Failed, format!("handler: {e}")))
            }
            Err(e) => Response::error(ErrorKind::Usage, format!("bad request: {e}")),
        };
        let mut out = serde_json::to_string(&resp).unwrap_or_default();
        out.push('\n');
        if w.write_all(out.as_bytes()).await.is_err() {
            break;
        }
    }
}

/// A client of one daemon's control socket.
pub struct Client {
    path: PathBuf,
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ControlError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|e| ControlError::NotRunning {
                path: path.display().to_string(),
                detail: e.to_string(),
            })?;
        let (r, w) = s.into_split();
        Ok(Client {
            path: path.to_path_buf(),
            lines: BufReader::new(r).lines(),
            w,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends a request; an error answer becomes [`ControlError::Remote`].
    pub async fn request(&mut self, req: &Request) -> Result<Response, ControlError> {
        let p = self.path.display().to_string();
        let mut line = serde_json::to_string(req).unwrap_or_default();
        line.push('\n');
        self.w
            .write_all(line.as_bytes())
            .await
            .map_err(|source| ControlError::Io {
                path: p.clone(),
                source,
            })?;
        let ans = self
            .lines
            .next_line()
            .await
            .map_err(|source| ControlError::Io {
                path: p.clone(),
                source,
            })?
            .ok_or_else(|| ControlError::NotRunning {
                path: p.clone(),
                detail: "the daemon closed the socket".into(),
            })?;
        match serde_json::from_str::<Response>(&ans) {
            Ok(Response::Error { kind, message }) => Err(ControlError::Remote { kind, message }),
            Ok(r) => Ok(r),
            Err(e) => Err(ControlError::Unexpected {
                path: p,
                what: e.to_string(),
            }),
        }
    }

    pub async fn status(&mut self) -> Result<DiskStatus, ControlError> {
        match self.request(&Request::Status).await? {
            Response::Status(s) => Ok(*s),
            other => Err(self.unexpected(&other)),
        }
    }

    pub fn unexpected(&self, r: &Response) -> ControlError {
        ControlError::Unexpected {
            path: self.path.display().to_string(),
            what: format!("{r:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_are_stable_json() {
        let r: Request =
            serde_json::from_str(r#"{"op":"durable","epoch":4,"timeout_ms":100}"#).unwrap();
        assert_eq!(
            r,
            Request::Durable {
                epoch: 4,
                timeout_ms: 100
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Cut).unwrap(),
            r#"{"op":"cut"}"#
        );
        let e = Response::error(ErrorKind::Merged, "x");
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"result":"error","kind":"merged","message":"x"}"#
        );
        assert_eq!(ErrorKind::Lost.exit_code(), ExitCode::PeerLost);
        assert_eq!(ErrorKind::NotDurable.exit_code(), ExitCode::Usage);
    }

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, req: Request) -> Response {
            match req {
                Request::Cut => Response::Epoch { epoch: 7 },
                _ => Response::error(ErrorKind::WrongRole, "not here"),
            }
        }
    }

    #[tokio::test]
    async fn the_socket_serves_requests_and_typed_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk-t.sock");
        let _g = serve(&p, Arc::new(Echo)).unwrap();
        assert!(
            serve(&p, Arc::new(Echo)).is_err(),
            "a live socket is not stolen"
        );
        let mut c = Client::connect(&p).await.unwrap();
        assert_eq!(
            c.request(&Request::Cut).await.unwrap(),
            Response::Epoch { epoch: 7 }
        );
        match c.request(&Request::Discard).await {
            Err(ControlError::Remote { kind, .. }) => assert_eq!(kind, ErrorKind::WrongRole),
            other => panic!("{other:?}"),
        }
    }
}
