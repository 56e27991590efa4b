//! Exporting a disk: as /dev/nbdN (the kernel gets connected sockets through generic
//! netlink, no handshake) or as a unix-socket NBD server (newstyle handshake first; for
//! tests, benchmarks and hosts without nbd).
//!
//! Owns: the listening socket or the kernel's socket pairs, one serving thread per
//! connection. Never touches: what the target does with requests.
use std::io::BufReader;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::genl::{self, GenlError};
use super::nbd::handshake::{self, ExportInfo};
use super::nbd::server::{self, Ended, Target};
use super::nbd::{EXPORT_FLAGS, NbdError};

/// How a disk is exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportSpec {
    /// /dev/nbd<index>, with `connections` sockets.
    Kernel {
        index: u32,
        connections: u32,
        dead_conn_timeout: Duration,
    },
    /// A unix socket speaking NBD (newstyle handshake).
    Unix(PathBuf),
}

impl ExportSpec {
    pub fn describe(&self) -> String {
        match self {
            ExportSpec::Kernel { index, .. } => format!("/dev/nbd{index}"),
            ExportSpec::Unix(p) => format!("unix:{}", p.display()),
        }
    }
}

/// Parses `unix:PATH`.
pub fn parse_export(s: &str) -> Option<PathBuf> {
    s.strip_prefix("unix:")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Kernel(#[from] GenlError),
    #[error("export socket {path} is busy: another server answers there")]
    Busy { path: String },
    #[error("export socket {path}: {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error(
        "/dev/nbd{index} needs a size that is a multiple of 512 bytes (the backing has {size})"
    )]
    Unaligned { index: u32, size: u64 },
}

/// A running export.
pub struct Export {
    pub spec: ExportSpec,
    /// "/dev/nbdN" or "unix:PATH".
    pub device: String,
    /// The kernel device was configured by a previous daemon and taken back.
    pub takeover: bool,
    pub connections: Arc<AtomicU64>,
    socket: Option<PathBuf>,
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn serve_conn(
    name: String,
    stream: UnixStream,
    t: Arc<dyn Target>,
    info: Option<ExportInfo>,
    live: Arc<AtomicU64>,
) {
    let _ = super::sys::io_flusher();
    live.fetch_add(1, Ordering::Relaxed);
    let mut s = stream;
    let r = (|| -> Result<Ended, NbdError> {
        if let Some(info) = &info {
            handshake::serve(&mut s, info)?;
        }
        server::serve(BufReader::with_capacity(256 << 10, &s), &s, &*t)
    })();
    live.fetch_sub(1, Ordering::Relaxed);
    match r {
        Ok(e) => tracing::debug!(export = %name, ended = ?e, "NBD connection ended"),
        Err(NbdError::Aborted(_)) => {}
        Err(e) => tracing::warn!(export = %name, error = %e, "NBD connection ended"),
    }
}

/// Starts serving `t` as `spec`. `backend` names the daemon for the kernel (sysfs).
pub fn start(
    t: Arc<dyn Target>,
    spec: &ExportSpec,
    name: &str,
    backend: &str,
) -> Result<Export, ExportError> {
    let live = Arc::new(AtomicU64::new(0));
    match spec {
        ExportSpec::Unix(path) => {
            let p = path.display().to_string();
            let ioe = |what| {
                let p = p.clone();
                move |source| ExportError::Io {
                    path: p,
                    what,
                    source,
                }
            };
            if let Ok(m) = std::fs::symlink_metadata(path) {
                if m.file_type().is_socket() && UnixStream::connect(path).is_ok() {
                    return Err(ExportError::Busy { path: p });
                }
                std::fs::remove_file(path).map_err(ioe("removing a stale socket"))?;
            }
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(ioe("creating its directory"))?;
            }
            let l = UnixListener::bind(path).map_err(ioe("binding"))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(ioe("chmod 0600"))?;
            let info = ExportInfo {
                name: name.to_string(),
                size: t.size(),
                flags: EXPORT_FLAGS,
            };
            let (n, lv) = (name.to_string(), live.clone());
            std::thread::Builder::new()
                .name("disk-accept".into())
                .spawn(move || {
                    for c in l.incoming() {
                        match c {
                            Ok(s) => {
                                let (t, info, n2, lv) =
                                    (t.clone(), info.clone(), n.clone(), lv.clone());
                                let _ = std::thread::Builder::new()
                                    .name("disk-nbd".into())
                                    .spawn(move || serve_conn(n2, s, t, Some(info), lv));
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "accepting an NBD client");
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                    }
                })
                .map_err(ioe("starting the accept thread"))?;
            Ok(Export {
                spec: spec.clone(),
                device: spec.describe(),
                takeover: false,
                connections: live,
                socket: Some(path.clone()),
            })
        }
        ExportSpec::Kernel {
            index,
            connections,
            dead_conn_timeout,
        } => {
            let size = t.size();
            if !size.is_multiple_of(genl::BLOCK_SIZE) {
                return Err(ExportError::Unaligned {
                    index: *index,
                    size,
                });
            }
            let p = format!("/dev/nbd{index}");
            let mut ours = Vec::new();
            let mut theirs = Vec::new();
            for _ in 0..(*connections).max(1) {
                let (a, b) = UnixStream::pair().map_err(|source| ExportError::Io {
                    path: p.clone(),
                    what: "creating a socket pair",
                    source,
                })?;
                ours.push(a);
                theirs.push(b);
            }
            let fds: Vec<i32> = theirs.iter().map(|s| s.as_raw_fd()).collect();
            let cfg = genl::Config {
                index: *index,
                size,
                server_flags: EXPORT_FLAGS as u64,
                dead_conn_timeout: *dead_conn_timeout,
                backend: backend.to_string(),
            };
            let takeover = genl::attach(&cfg, &fds)?;
            // The kernel holds its own references to its ends now.
            drop(theirs);
            for s in ours {
                let (t, n, lv) = (t.clone(), name.to_string(), live.clone());
                std::thread::Builder::new()
                    .name("disk-nbd".into())
                    .spawn(move || serve_conn(n, s, t, None, lv))
                    .map_err(|source| ExportError::Io {
                        path: p.clone(),
                        what: "starting a connection thread",
                        source,
                    })?;
            }
            Ok(Export {
                spec: spec.clone(),
                device: p,
                takeover,
                connections: live,
                socket: None,
            })
        }
    }
}

/// Whether a path names a usable export socket right now (the hotplug script's check).
pub fn answers(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}
