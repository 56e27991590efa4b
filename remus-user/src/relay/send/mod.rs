//! `remus relay send`: the primary end. xl's stream on stdin, the reverse channel on stdout.
//!
//! Owns: xl's pipe (checked, shrunk to one page before xl writes, then measured and
//! sized for the driver: [`PipeFd`]), setting up the connection to the backup (connect,
//! handshake, banner), running the relay-mode checkpoint driver over them, and
//! answering a request to end protection with how the run ended. Never touches: the
//! epoch rules (`checkpoint` decides), the connection once it runs ([`replicator`]), the
//! kernel (the `NetBuffer` it is handed does that), the control socket itself
//! (`relay::control`), Xen (the suspend report of `--domain`, [`suspend`], asks it
//! through the `Hypervisor` port).
use std::io::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::{error, info, warn};

use super::control::{EndAnswer, EndControl};
use super::{Heartbeat, RelayState, Shared};
use crate::checkpoint::{
    CheckpointError, DiskBarrierError, LossReason, NetBuffer, NetBufferError, PipeGauge, PipeSizes,
    RelayDriver, Released, RunEnd,
};
use crate::compress::Codec;
use crate::exit::{ExitCode, HasExitCode};
use crate::replication::{self, ClientConfig, FrameReader, Key, Message, Session, WireError};

pub mod disks;
pub mod replicator;
pub mod suspend;

pub use replicator::TcpReplicator;

/// Everything `remus relay send` needs besides the buffer.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// HOST:PORT of `remus relay receive`.
    pub backup: String,
    pub key: Key,
    pub codec: Codec,
    pub cache_pages: u32,
    pub heartbeat: Heartbeat,
    pub connect_timeout: Duration,
    /// How long the backup may take to start its receiver and send the banner.
    pub banner_timeout: Duration,
    /// How long the backup may take to answer DISCARD (kill its receiver, destroy the
    /// copy) when protection is ended on request; past it, the output stays held.
    pub discard_timeout: Duration,
    /// Protocol versions announced (tests provoke skew with these).
    pub max_version: u16,
    pub min_version: u16,
    /// The sizes of xl's pipe (`checkpoint::relay_mode`, "Sizing xl's pipe").
    pub pipe: PipeSizes,
    /// The primary disk daemons' control sockets (`--disk`): cut at every checkpoint.
    pub disks: Vec<std::path::PathBuf>,
    /// How long the disks may take to be in sync before protection starts.
    pub disk_sync_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(
        "stdin is {0}, not a pipe: run me as the transport of `xl remus -s '' DOMAIN 'remus relay send …'` (the epoch proof needs xl's pipe)"
    )]
    StdinNotPipe(&'static str),
    #[error("inspecting stdin: {0}")]
    Stdin(std::io::Error),
    #[error("sizing xl's pipe with F_SETPIPE_SZ: {0}")]
    PipeSize(std::io::Error),
    #[error(
        "stdin already holds more than the pipe's first size: the writer started before the banner (xl waits for it; a test writer must too)"
    )]
    PipeBusy,
    #[error("connecting to the backup {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to the backup {0}: timed out")]
    ConnectTimeout(String),
    #[error("handshake with the backup {addr}: {source}")]
    Handshake { addr: String, source: WireError },
    #[error("waiting for the backup's banner: {0}")]
    Banner(#[from] BannerError),
    #[error("passing the banner to xl on stdout: {0}")]
    Stdout(std::io::Error),
    #[error(transparent)]
    Controller(#[from] CheckpointError),
    /// A disk cannot join protection (before anything was replicated).
    #[error(transparent)]
    Disk(#[from] disks::DiskSetupError),
    #[error("the backup {addr} was lost: {reason}")]
    PeerLost { addr: String, reason: LossReason },
}

/// Why the backup's banner did not arrive.
#[derive(Debug, thiserror::Error)]
pub enum BannerError {
    #[error("no banner within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the backup gave up: {0}")]
    Aborted(String),
    #[error("expected BANNER, got {0:?}")]
    Unexpected(replication::Kind),
}

impl HasExitCode for SendError {
    fn exit_code(&self) -> ExitCode {
        match self {
            // Ending protection was not confirmed: output held, its own code.
            SendError::Controller(CheckpointError::EndUnconfirmed(_)) => ExitCode::Unconfirmed,
            SendError::StdinNotPipe(_) | SendError::PipeBusy => ExitCode::Usage,
            // A backup's daemon, one that cut epochs already: the operator's to fix.
            SendError::Disk(e) if matches!(e.source, DiskBarrierError::Refused(_)) => {
                ExitCode::Usage
            }
            // The disk's backup is gone before protection started.
            SendError::Disk(e) if matches!(e.source, DiskBarrierError::Lost(_)) => {
                ExitCode::PeerLost
            }
            // The two key files differ: the operator's to fix, like a bad key file.
            SendError::Handshake {
                source: WireError::AuthFailed(_),
                ..
            } => ExitCode::Usage,
            SendError::Connect { .. }
            | SendError::ConnectTimeout(_)
            | SendError::Banner(_)
            | SendError::PeerLost { .. } => ExitCode::PeerLost,
            SendError::Handshake {
                source:
                    WireError::Io(_)
                    | WireError::Closed
                    | WireError::Truncated { .. }
                    | WireError::Timeout(_),
                ..
            } => ExitCode::PeerLost,
            _ => ExitCode::Failure,
        }
    }
}

/// xl's pipe, checked and shrunk.
pub struct XlPipe {
    pub fd: OwnedFd,
    /// The pipe capacity read back after F_SETPIPE_SZ (one page).
    pub capacity: u64,
}

/// xl's pipe as the driver's [`PipeGauge`]: FIONREAD and F_SETPIPE_SZ on a duplicate of
/// its read end (same pipe, so the fill and size are the reader's).
pub struct PipeFd(OwnedFd);

impl PipeFd {
    pub fn new(fd: &OwnedFd) -> std::io::Result<PipeFd> {
        fd.try_clone().map(PipeFd)
    }
}

impl PipeGauge for PipeFd {
    fn fill(&mut self) -> std::io::Result<u64> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD on a pipe fd we own writes one int.
        let r = unsafe { libc::ioctl(self.0.as_raw_fd(), libc::FIONREAD, &mut n) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n.max(0) as u64)
    }

    fn resize(&mut self, bytes: u64) -> std::io::Result<u64> {
        let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: fcntl on a pipe fd we own, integer argument.
        let r = unsafe { libc::fcntl(self.0.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(r as u64)
    }
}

/// Checks that `fd` (stdin) is a pipe and sizes it to `narrow` bytes (one page unless a
/// test says otherwise: the driver waits for the first suspend with it narrow); reads
/// back the real capacity. Must run before xl writes (it waits for the banner), so the
/// pipe is empty.
pub fn prepare_pipe(fd: BorrowedFd<'_>, narrow: u64) -> Result<XlPipe, SendError> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| SendError::Stdin(e.into()))?;
    let fmt = st.st_mode & libc::S_IFMT;
    if fmt != libc::S_IFIFO {
        return Err(SendError::StdinNotPipe(match fmt {
            libc::S_IFREG => "a regular file",
            libc::S_IFCHR => "a character device (a terminal?)",
            libc::S_IFSOCK => "a socket",
            libc::S_IFBLK => "a block device",
            libc::S_IFDIR => "a directory",
            _ => "not a pipe",
        }));
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let size = libc::c_int::try_from(narrow.max(page)).unwrap_or(libc::c_int::MAX);
    // SAFETY: fcntl on a valid fd with integer arguments.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Err(SendError::PipeBusy);
        }
        return Err(SendError::PipeSize(e));
    }
    // SAFETY: as above.
    let cap = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if cap < 0 {
        return Err(SendError::PipeSize(std::io::Error::last_os_error()));
    }
    let fd = fd.try_clone_to_owned().map_err(SendError::Stdin)?;
    Ok(XlPipe {
        fd,
        capacity: cap as u64,
    })
}

/// No output buffer at all. UNSAFE: the guest's output is not held, so this protects
/// nothing; it exists to test and benchmark the relay without a vif (`--no-buffer`).
#[derive(Debug, Default)]
pub struct Unbuffered {
    epoch: u64,
}

impl Unbuffered {
    pub fn new() -> Self {
        Unbuffered { epoch: 1 }
    }
}

impl NetBuffer for Unbuffered {
    async fn close_epoch(&mut self) -> Result<u64, NetBufferError> {
        let e = self.epoch;
        self.epoch += 1;
        Ok(e)
    }
    async fn commit(&mut self, epoch: u64) -> Result<Released, NetBufferError> {
        Ok(Released {
            epoch,
            frames: 0,
            bytes: 0,
        })
    }
    async fn fail_open(&mut self) -> Result<Released, NetBufferError> {
        Ok(Released {
            epoch: self.epoch,
            frames: 0,
            bytes: 0,
        })
    }
}

/// Connects and authenticates; returns the session and the connection.
pub async fn connect(opts: &SendOptions) -> Result<(Session, TcpStream), SendError> {
    let addr = opts.backup.clone();
    let mut s = tokio::time::timeout(opts.connect_timeout, TcpStream::connect(&addr))
        .await
        .map_err(|_| SendError::ConnectTimeout(addr.clone()))?
        .map_err(|source| SendError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let _ = s.set_nodelay(true);
    let mut cfg = ClientConfig::new(opts.key.clone(), opts.codec, opts.cache_pages);
    cfg.max_version = opts.max_version;
    cfg.min_version = opts.min_version;
    cfg.timeout = opts.connect_timeout;
    let session = replication::client_handshake(&mut s, &cfg)
        .await
        .map_err(|source| SendError::Handshake {
            addr: addr.clone(),
            source,
        })?;
    Ok((session, s))
}

/// The connection, authenticated, after the banner went to xl.
struct Connected {
    session: Session,
    reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    peer: String,
}

/// Connect, authenticate, pass the banner to xl.
async fn setup(opts: &SendOptions, shared: &Arc<Shared>) -> Result<Connected, SendError> {
    shared.enter(RelayState::Connecting);
    let (session, stream) = connect(opts).await?;
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| opts.backup.clone());
    info!(backup = %peer, version = session.version, codec = %session.codec, "authenticated to the backup");
    shared.metrics.sessions_total.inc();
    shared.set(|s| {
        s.state = RelayState::WaitingForReceiver;
        s.peer = Some(peer.clone());
        s.protocol_version = Some(session.version);
        s.compression = Some(session.codec);
    });
    let (r, writer) = stream.into_split();
    let mut reader = FrameReader::new(r, session.keys.opener.clone());
    let banner = read_banner(&mut reader, opts.banner_timeout).await?;
    if banner != super::BANNER {
        warn!(banner = %String::from_utf8_lossy(&banner).trim_end(), "the backup's receiver printed an unexpected banner; passing it on");
    }
    {
        let mut out = std::io::stdout().lock();
        out.write_all(&banner).map_err(SendError::Stdout)?;
        out.flush().map_err(SendError::Stdout)?;
    }
    Ok(Connected {
        session,
        reader,
        writer,
        peer,
    })
}

async fn read_banner(
    reader: &mut FrameReader<tokio::net::tcp::OwnedReadHalf>,
    timeout: Duration,
) -> Result<Vec<u8>, BannerError> {
    match tokio::time::timeout(timeout, reader.next()).await {
        Err(_) => Err(BannerError::Timeout(timeout)),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(Message::Banner(b))) => Ok(b),
        Ok(Ok(Message::Abort { reason })) => Err(BannerError::Aborted(reason)),
        Ok(Ok(other)) => Err(BannerError::Unexpected(other.kind())),
    }
}

/// The whole primary end: connect, banner to xl, then the checkpoint driver. Returns how
/// the run ended; a lost backup has already failed the buffer open when this returns
/// `Err(SendError::PeerLost)`, and so has a failure to set up. Whoever asked through
/// `control` to end protection hears how the run ended before this returns.
pub async fn run<B: NetBuffer>(
    opts: SendOptions,
    pipe: XlPipe,
    buffer: B,
    shared: Arc<Shared>,
    control: &EndControl,
) -> Result<RunEnd, SendError> {
    let r = run_inner(opts, pipe, buffer, &shared, control).await;
    let answer = match &r {
        Ok(RunEnd::Discarded {
            checkpoint,
            copy_destroyed,
        }) => EndAnswer::Discarded {
            checkpoint: *checkpoint,
            copy_destroyed: *copy_destroyed,
        },
        Err(e @ SendError::Controller(CheckpointError::EndUnconfirmed(_))) => {
            EndAnswer::Unconfirmed {
                reason: e.to_string(),
            }
        }
        _ => EndAnswer::Ended {
            state: shared.state(),
        },
    };
    control.answer(answer, Duration::from_secs(2)).await;
    r
}

async fn run_inner<B: NetBuffer>(
    opts: SendOptions,
    pipe: XlPipe,
    mut buffer: B,
    shared: &Arc<Shared>,
    control: &EndControl,
) -> Result<RunEnd, SendError> {
    let disks = disks::connect_all(&opts.disks, opts.disk_sync_timeout, shared).await;
    let c = match disks.map_err(SendError::from) {
        Ok(disks) => setup(&opts, shared).await.map(|c| (c, disks)),
        Err(e) => Err(e),
    };
    let (c, disks) = match c {
        Ok(c) => c,
        Err(e) => {
            // Nothing was replicated, and xl resumes the guest when we exit: what the
            // buffer held since attach must not stay blocked.
            match buffer.fail_open().await {
                Ok(r) => warn!(
                    released_frames = r.frames,
                    "no backup: released what was held; the buffer passes traffic"
                ),
                Err(fe) => error!(error = %fe, "no backup, and opening the buffer failed too"),
            }
            return Err(e);
        }
    };
    shared.metrics.connected.set(1);
    shared.enter(RelayState::Replicating);

    let gauge = PipeFd::new(&pipe.fd).map_err(SendError::Stdin)?;
    let rx_pipe =
        tokio::net::unix::pipe::Receiver::from_owned_fd(pipe.fd).map_err(SendError::Stdin)?;
    let mut rep = TcpReplicator::start(c.reader, c.writer, &c.session, &opts, shared.clone());
    let mut driver = RelayDriver::new(
        buffer,
        gauge,
        pipe.capacity,
        opts.pipe,
        shared.metrics.clone(),
    )
    .end_on_request(control.requested())
    .with_disks(disks);
    // Only shows the state while the driver carries a request out.
    let show = {
        let shared = shared.clone();
        let mut ending = control.requested();
        tokio::spawn(async move {
            if ending.wait_for(|v| *v).await.is_ok() {
                shared.enter(RelayState::EndingProtection);
            }
        })
    };
    let end = driver.run(rx_pipe, &mut rep).await;
    show.abort();
    shared.metrics.connected.set(0);
    if let Err(CheckpointError::EndUnconfirmed(e)) = &end {
        shared.set(|s| {
            s.state = RelayState::Replicating;
            s.last_event = Some(format!("ending protection was not confirmed: {e}"));
        });
        error!(
            backup = %c.peer, reason = %e,
            "ENDING PROTECTION NOT CONFIRMED: the backup did not say it discarded its copy, so it may still activate it; the guest's output stays HELD (fail closed). Find out on the backup (`remus status`), then `remus-net detach` here only once its copy is gone"
        );
    }
    report_end(end?, c.peer, shared)
}

/// Status and log of how the run ended.
fn report_end(end: RunEnd, peer: String, shared: &Shared) -> Result<RunEnd, SendError> {
    match end {
        RunEnd::Closed {
            checkpoints,
            finished,
        } => {
            info!(
                checkpoints,
                finished, "xl ended the stream; the backup was told (orderly close)"
            );
            shared.enter(RelayState::StreamEnded);
            Ok(end)
        }
        RunEnd::Discarded {
            checkpoint,
            copy_destroyed,
        } => {
            shared.metrics.discards_total.inc();
            shared.set(|s| {
                s.state = RelayState::Discarded;
                s.last_event = Some(format!(
                    "protection ended on request: the backup discarded its copy (last acknowledged checkpoint {checkpoint})"
                ));
            });
            info!(
                backup = %peer, last_acked = checkpoint,
                "PROTECTION ENDED on request: the backup discarded its copy; released everything held and switched the buffer to pass-through; xl resumes the guest here, unprotected"
            );
            if !copy_destroyed {
                warn!(backup = %peer, "the backup could not destroy its (inert, never activated) copy: remove it there (`remus unprotect DOMAIN` or `xl destroy DOMAIN--incoming`)");
            }
            Ok(end)
        }
        RunEnd::Lost { reason, checkpoint } => {
            shared.metrics.failovers_total.inc();
            shared.set(|s| {
                s.state = RelayState::BackupLost;
                s.last_event = Some(reason.detail.clone());
            });
            error!(
                backup = %peer, %reason, last_acked = checkpoint,
                "BACKUP LOST: released everything held and switched the buffer to pass-through; the domain now runs UNPROTECTED"
            );
            Err(SendError::PeerLost { addr: peer, reason })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::Prover;
    use std::os::fd::{AsFd, FromRawFd};

    /// A fresh pipe: (read end, write end).
    fn pipe() -> (OwnedFd, std::fs::File) {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 fills two fds on success.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are fresh and owned here.
        unsafe {
            (
                OwnedFd::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    }

    #[test]
    fn the_gauge_reads_the_fill_and_sizes_the_pipe_of_its_reader() {
        use std::io::{Read, Write};
        let (r, mut w) = pipe();
        let xl = prepare_pipe(r.as_fd(), 4096).unwrap();
        assert_eq!(xl.capacity, 4096);
        let mut g = PipeFd::new(&xl.fd).unwrap();
        assert_eq!(g.fill().unwrap(), 0);
        assert_eq!(g.resize(1 << 20).unwrap(), 1 << 20);
        w.write_all(&[7u8; 10_000]).unwrap();
        assert_eq!(g.fill().unwrap(), 10_000);
        // Holding more than a page, it cannot be narrowed: the driver keeps it wide.
        let busy = g.resize(4096).unwrap_err();
        assert_eq!(busy.raw_os_error(), Some(libc::EBUSY));
        let mut buf = vec![0u8; 10_000];
        std::fs::File::from(xl.fd).read_exact(&mut buf).unwrap();
        assert_eq!(g.fill().unwrap(), 0);
        assert_eq!(g.resize(4096).unwrap(), 4096);
    }

    #[test]
    fn a_pipe_written_before_the_banner_is_refused() {
        use std::io::Write;
        let (r, mut w) = pipe();
        w.write_all(&[1u8; 9000]).unwrap();
        assert!(matches!(
            prepare_pipe(r.as_fd(), 4096),
            Err(SendError::PipeBusy)
        ));
    }

    #[test]
    fn handshake_failures_have_their_documented_exit_codes() {
        let code = |source| {
            SendError::Handshake {
                addr: "backup:7788".into(),
                source,
            }
            .exit_code()
        };
        // The two key files differ: the operator's to fix.
        assert_eq!(code(WireError::AuthFailed(Prover::Backup)), ExitCode::Usage);
        // The backup went away during the handshake, at or inside a frame.
        assert_eq!(code(WireError::Closed), ExitCode::PeerLost);
        assert_eq!(
            code(WireError::Truncated { have: 20, want: 60 }),
            ExitCode::PeerLost
        );
        assert_eq!(
            code(WireError::Timeout("the backup's challenge")),
            ExitCode::PeerLost
        );
        // Refusals (version, busy) are operational failures.
        assert_eq!(code(WireError::Refused("busy".into())), ExitCode::Failure);
        assert_eq!(
            code(WireError::Version {
                ours_min: 3,
                ours_max: 3,
                theirs_min: 1,
                theirs_max: 2,
            }),
            ExitCode::Failure
        );
    }
}
