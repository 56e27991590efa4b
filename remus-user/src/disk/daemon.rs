//! The two long-lived daemons: `remus disk serve` (primary) and `remus disk receive`
//! (backup). Each opens its backing, starts its threads, serves its control socket, and
//! runs until SIGINT/SIGTERM.
//!
//! Owns: start-up order, the connection to the backup (relay authentication, then the
//! sealed disk HELLO), the backup's listener and its handshake, the primary's control
//! handler, exit codes.
//! Never touches: frames, epochs or the journal directly (`primary`, `backup` do).
use std::io::ErrorKind as IoKind;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use tokio::net::{TcpListener, TcpStream};

use super::backing::{Backing, BackingError};
use super::backup::{self, Backup, BackupError};
use super::channel;
use super::control::{self, ControlError, DiskStatus, ErrorKind, Handler, Request, Response};
use super::export::{self, Export, ExportError, ExportSpec};
use super::genl::{self, GenlError};
use super::primary::{CutError, DiskTarget, Replicator};
use super::sys::{self, SysError};
use super::wire::{self, Kind, WireError};
use crate::compress::Codec;
use crate::exit::{ExitCode, HasExitCode};
use crate::relay::Heartbeat;
use crate::replication::{self, ClientConfig, Key, Keys, Message, Sealer, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Backing(#[from] BackingError),
    #[error("the backup {addr} is unreachable: {detail}")]
    Unreachable { addr: String, detail: String },
    #[error("the backup {addr} refused the session: {reason}")]
    Refused { addr: String, reason: String },
    #[error(transparent)]
    Kernel(#[from] GenlError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("{0}")]
    Setup(String),
}

impl HasExitCode for DaemonError {
    fn exit_code(&self) -> ExitCode {
        match self {
            DaemonError::Backing(
                BackingError::NotFound { .. }
                | BackingError::WrongKind { .. }
                | BackingError::Empty { .. },
            ) => ExitCode::Usage,
            DaemonError::Unreachable { .. } => ExitCode::PeerLost,
            DaemonError::Kernel(GenlError::NoNbd { .. } | GenlError::NotPermitted)
            | DaemonError::Export(ExportError::Kernel(
                GenlError::NoNbd { .. } | GenlError::NotPermitted,
            ))
            | DaemonError::Sys(_) => ExitCode::Unsupported,
            _ => ExitCode::Failure,
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The connection to the backup.
#[derive(Clone, Debug)]
pub struct LinkOptions {
    pub backup: String,
    pub key: Key,
    pub heartbeat: Heartbeat,
    pub connect_timeout: Duration,
    pub queue_bytes: usize,
}

pub struct ServeOptions {
    pub backing: PathBuf,
    pub export: ExportSpec,
    pub name: String,
    pub backup: Option<LinkOptions>,
    pub socket: PathBuf,
}

/// An authenticated, greeted connection to the backup's disk daemon.
pub struct Link {
    /// Blocking, in the stream phase.
    pub stream: std::net::TcpStream,
    /// Seals every frame sent from now on.
    pub sealer: Sealer,
    /// Opens the backup's frames (it read the disk WELCOME; the next frame is its).
    pub reader: channel::Reader<std::net::TcpStream>,
}

/// Connects, authenticates (the relay's handshake and key file: from then on every
/// frame is sealed), and greets the backup's disk daemon.
pub async fn connect_backup(o: &LinkOptions, size: u64) -> Result<Link, DaemonError> {
    let unreachable = |detail: String| DaemonError::Unreachable {
        addr: o.backup.clone(),
        detail,
    };
    let refused = |reason: String| DaemonError::Refused {
        addr: o.backup.clone(),
        reason,
    };
    let mut s = tokio::time::timeout(o.connect_timeout, TcpStream::connect(&o.backup))
        .await
        .map_err(|_| unreachable(format!("no connection within {:?}", o.connect_timeout)))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = s.set_nodelay(true);
    let mut cfg = ClientConfig::new(o.key.clone(), Codec::None, 0);
    cfg.timeout = o.connect_timeout;
    let session = replication::client_handshake(&mut s, &cfg)
        .await
        .map_err(|e| refused(format!("authentication: {e}")))?;
    let setup = |e: std::io::Error| DaemonError::Setup(format!("socket hand-over: {e}"));
    let std = s.into_std().map_err(setup)?;
    std.set_nonblocking(false).map_err(setup)?;
    std.set_read_timeout(Some(o.connect_timeout))
        .map_err(setup)?;
    // The disk greeting, on the blocking socket (its reader then keeps its place).
    let mut session_id = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut session_id);
    let hello = wire::hello(&wire::Hello {
        min_version: wire::MIN_VERSION,
        max_version: wire::VERSION,
        size,
        session: session_id,
    });
    let Keys { sealer, opener } = session.keys;
    channel::send(&sealer, &mut &std, Kind::Hello, 0, 0, &hello)
        .map_err(|e| unreachable(e.to_string()))?;
    let mut reader = channel::Reader::new(std.try_clone().map_err(setup)?, opener);
    let f = reader.recv().map_err(|e| match e {
        WireError::Io(e) if matches!(e.kind(), IoKind::WouldBlock | IoKind::TimedOut) => {
            refused("no disk WELCOME in time".into())
        }
        e @ WireError::BadMagic(_) => {
            refused(format!("{e}: is {} a `remus disk receive` port?", o.backup))
        }
        e => refused(e.to_string()),
    })?;
    match f.kind() {
        Kind::Welcome => {
            let (v, bsize) = wire::parse_welcome(f.payload())
                .ok_or_else(|| refused("malformed WELCOME".into()))?;
            if !(wire::MIN_VERSION..=wire::VERSION).contains(&v) || bsize != size {
                return Err(refused(format!("version {v}, size {bsize}: not usable")));
            }
        }
        Kind::Abort => {
            return Err(refused(String::from_utf8_lossy(f.payload()).into_owned()));
        }
        other => return Err(refused(format!("unexpected {other:?}"))),
    }
    Ok(Link {
        stream: std,
        sealer,
        reader,
    })
}

/// SIGINT or SIGTERM.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

struct Primary {
    name: String,
    target: Arc<DiskTarget>,
    export: Export,
    backup: Option<String>,
    mlocked: bool,
    since: u64,
}

impl Primary {
    fn status(&self) -> DiskStatus {
        let t = &self.target;
        let r = t.replicator();
        let lost = r.and_then(|r| r.lost());
        let state = match (r, &lost) {
            (None, _) => "standalone",
            (Some(_), Some(_)) => "unprotected",
            (Some(r), None) if !r.in_sync() => "syncing",
            _ => "protected",
        };
        let c = r.map(|r| &r.counters);
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        DiskStatus {
            role: "primary".into(),
            pid: std::process::id(),
            name: self.name.clone(),
            state: state.into(),
            backing: t.backing().path().display().to_string(),
            size: t.backing().size(),
            device: Some(self.export.device.clone()),
            takeover: self.export.takeover,
            connections: ld(&self.export.connections),
            mlocked: self.mlocked,
            backup: self.backup.clone(),
            epoch: Some(t.epoch()),
            in_sync: r.map(|r| r.in_sync()),
            sync_copied_bytes: c.map(|c| ld(&c.sync_copied)),
            sync_zeroed_bytes: c.map(|c| ld(&c.sync_zeroed)),
            sync_seconds: r.and_then(|r| r.sync_seconds()),
            durable_acked: r.map(|r| r.durable()),
            queue_bytes: r.map(|r| r.queued_bytes() as u64),
            queue_cap: r.map(|r| r.cap() as u64),
            sent_bytes: c.map(|c| ld(&c.sent_bytes)),
            backpressure_waits: c.map(|c| ld(&c.backpressure_waits)),
            backpressure_us: c.map(|c| ld(&c.backpressure_us)),
            lost,
            reads: ld(&t.io.reads),
            writes: ld(&t.io.writes),
            write_bytes: ld(&t.io.write_bytes),
            flushes: ld(&t.io.flushes),
            io_errors: ld(&t.io.errors),
            since_unix: self.since,
            ..Default::default()
        }
    }
}

impl Handler for Primary {
    fn handle(&self, req: Request) -> Response {
        match req {
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Cut => match self.target.cut() {
                Ok(epoch) => Response::Epoch { epoch },
                Err(e @ CutError::Lost(_)) => Response::error(ErrorKind::Lost, e),
                Err(e @ CutError::NotInSync { .. }) => Response::error(ErrorKind::NotInSync, e),
            },
            Request::WaitSync { timeout_ms } => match self.target.replicator() {
                None => Response::error(
                    ErrorKind::Usage,
                    "this primary has no backup (--backup): nothing to sync",
                ),
                Some(r) => match r.wait_sync(Duration::from_millis(timeout_ms)) {
                    Ok(true) => Response::InSync,
                    Ok(false) => Response::error(
                        ErrorKind::Timeout,
                        format!("the backup's disk is not in sync after {timeout_ms} ms"),
                    ),
                    Err(l) => Response::error(ErrorKind::Lost, format!("the backup is lost: {l}")),
                },
            },
            _ => Response::error(
                ErrorKind::WrongRole,
                "this is a primary (disk serve): durable, merge, commit, failover and discard are backup operations",
            ),
        }
    }
}

fn lock_if_kernel(spec: &ExportSpec) -> Result<bool, DaemonError> {
    if matches!(spec, ExportSpec::Kernel { .. }) {
        // In the writeback path of its own device: memory must not be reclaimable.
        sys::lock_memory()?;
        sys::io_flusher()?;
        return Ok(true);
    }
    Ok(false)
}

/// `remus disk serve`: runs until a stop signal.
pub async fn serve(o: ServeOptions) -> Result<(), DaemonError> {
    let backing = Arc::new(Backing::open(&o.backing)?);
    if let ExportSpec::Kernel { .. } = o.export {
        genl::probe()?;
    }
    let mlocked = lock_if_kernel(&o.export)?;
    let repl = match &o.backup {
        Some(l) => {
            let link = connect_backup(l, backing.size()).await?;
            tracing::info!(backup = %l.backup, "authenticated to the backup (sealed channel): initial synchronisation starts");
            let r = Replicator::new(
                link.stream,
                link.sealer,
                link.reader,
                l.backup.clone(),
                l.heartbeat,
                l.queue_bytes,
            );
            r.start().map_err(|e| {
                DaemonError::Setup(format!("starting the replication threads: {e}"))
            })?;
            Some(r)
        }
        None => None,
    };
    let target = DiskTarget::new(backing.clone(), repl);
    if target.replicator().is_some() {
        target
            .start_sync()
            .map_err(|e| DaemonError::Setup(format!("starting the sync thread: {e}")))?;
    } else {
        tracing::warn!("no --backup: the disk is served WITHOUT replication");
    }
    let export = export::start(
        target.clone(),
        &o.export,
        &o.name,
        &format!("remus-disk:{}", o.name),
    )?;
    tracing::info!(device = %export.device, backing = %o.backing.display(), size = backing.size(), takeover = export.takeover, "serving");
    let p = Arc::new(Primary {
        name: o.name.clone(),
        target,
        export,
        backup: o.backup.as_ref().map(|l| l.backup.clone()),
        mlocked,
        since: now_unix(),
    });
    let _guard = control::serve(&o.socket, p.clone())?;
    let sig = stop_signal().await;
    if let ExportSpec::Kernel { index, .. } = o.export {
        tracing::warn!(
            signal = sig,
            "stopping: /dev/nbd{index} stays configured; its I/O waits for a restarted daemon (--dead-conn-timeout), which takes it back"
        );
    } else {
        tracing::warn!(signal = sig, "stopping");
    }
    Ok(())
}

pub struct ReceiveOptions {
    pub listen: String,
    pub backing: PathBuf,
    pub journal: PathBuf,
    pub key: Key,
    pub name: String,
    pub ram_cap: u64,
    pub journal_max: u64,
    pub heartbeat: Heartbeat,
    /// How the disk is served after a failover (none: the operator serves it).
    pub export: Option<ExportSpec>,
    pub socket: PathBuf,
}

async fn accept(stream: TcpStream, peer: SocketAddr, b: Arc<Backup>, key: Key, timeout: Duration) {
    let mut s = stream;
    let _ = s.set_nodelay(true);
    let cfg = ServerConfig { key, timeout };
    let session = match replication::server_handshake(&mut s, &cfg).await {
        Ok(session) => session,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "refused a connection (authentication)");
            return;
        }
    };
    // From here every frame is sealed, the refusal too.
    let sealer = session.keys.sealer.clone();
    if let Some(why) = b.refusal() {
        tracing::warn!(%peer, reason = %why, "refused a primary");
        let _ = sealer.send(&mut s, &Message::abort(why)).await;
        return;
    }
    if sealer.send(&mut s, &Message::Welcome).await.is_err() {
        return;
    }
    let std = match s
        .into_std()
        .and_then(|s| s.set_nonblocking(false).map(|()| s))
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "socket hand-over");
            return;
        }
    };
    let _ = std::thread::Builder::new()
        .name("disk-session".into())
        .spawn(move || {
            let _ = sys::io_flusher();
            b.run_session(std, session.keys, peer.to_string())
        });
}

/// `remus disk receive`: runs until a stop signal.
pub async fn receive(o: ReceiveOptions) -> Result<(), DaemonError> {
    let backing = Backing::open(&o.backing)?;
    if let Some(ExportSpec::Kernel { .. }) = o.export {
        genl::probe()?;
        lock_if_kernel(
            o.export
                .as_ref()
                .unwrap_or(&ExportSpec::Unix(PathBuf::new())),
        )?;
    }
    let listener = TcpListener::bind(&o.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: o.listen.clone(),
            source,
        })?;
    let listen = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| o.listen.clone());
    let t = Instant::now();
    let b = Backup::open(
        backup::Config {
            name: o.name.clone(),
            listen: listen.clone(),
            heartbeat: o.heartbeat,
            export: o.export.clone(),
            fault: backup::Fault::from_env(),
        },
        backing,
        &o.journal,
        o.journal_max,
        o.ram_cap,
    )?;
    tracing::info!(listen = %listen, journal = %o.journal.display(), state = %b.status().state, recovered_in_ms = t.elapsed().as_millis() as u64, "backup disk daemon ready");
    let _guard = control::serve(&o.socket, b.clone())?;
    let hs_timeout = Duration::from_secs(10);
    loop {
        tokio::select! {
            c = listener.accept() => match c {
                Ok((s, peer)) => {
                    tokio::spawn(accept(s, peer, b.clone(), o.key.clone(), hs_timeout));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            sig = stop_signal() => {
                tracing::warn!(signal = sig, "stopping: a connected primary loses its backup; the journal keeps every durable epoch");
                return Ok(());
            }
        }
    }
}
