//! `remus relay send`: the primary end. xl's stream on stdin, the reverse channel on stdout.
//!
//! Owns: xl's pipe (checked, shrunk to one page), the connection to the backup (connect,
//! handshake, the writer and reader tasks, heartbeats), page compression on the way out,
//! ACK latency. Never touches: the epoch rules (`checkpoint::Controller` decides), the
//! kernel (the `NetBuffer` it is handed does that).
use std::collections::HashMap;
use std::io::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::{Heartbeat, Shared, judge_silence, silence_check};
use crate::checkpoint::{BackupEvent, CheckpointError, Controller, Outcome, Replicator};
use crate::compress::{Codec, PageEncoder};
use crate::exit::{ExitCode, HasExitCode};
use crate::netbuf::{NetBuffer, NetBufferError, Released};
use crate::replication::{
    self, ClientConfig, DATA_CHUNK, FrameReader, Key, Message, Session, WireError,
};
use crate::stream::{Event, Layer, libxc_type};

/// Raw stream bytes are sent once this many are pending (or at a checkpoint's end).
const COALESCE: usize = 64 * 1024;

/// PAGE_DATA records up to this size are compressed (1024 pages + PFNs is ~4 MiB); the
/// encoded form stays well under `replication::MAX_PAYLOAD`.
const MAX_COMPRESSED_RECORD: usize = 8 << 20;

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
    /// Protocol versions announced (tests provoke skew with these).
    pub max_version: u16,
    pub min_version: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(
        "stdin is {0}, not a pipe: run me as the transport of `xl remus -s '' DOMAIN 'remus relay send …'` (the epoch proof needs xl's pipe)"
    )]
    StdinNotPipe(&'static str),
    #[error("inspecting stdin: {0}")]
    Stdin(std::io::Error),
    #[error("shrinking xl's pipe to one page with F_SETPIPE_SZ: {0}")]
    PipeSize(std::io::Error),
    #[error(
        "stdin already holds more than one page: the writer started before the banner (xl waits for it; a test writer must too)"
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
    Banner(String),
    #[error("passing the banner to xl on stdout: {0}")]
    Stdout(std::io::Error),
    #[error(transparent)]
    Controller(#[from] CheckpointError),
    #[error("the backup {addr} was lost: {reason}")]
    PeerLost { addr: String, reason: String },
}

impl HasExitCode for SendError {
    fn exit_code(&self) -> ExitCode {
        match self {
            SendError::StdinNotPipe(_) | SendError::PipeBusy => ExitCode::Usage,
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
                source: WireError::Io(_) | WireError::Closed | WireError::Timeout(_),
                ..
            } => ExitCode::PeerLost,
            _ => ExitCode::Failure,
        }
    }
}

/// xl's pipe, checked and shrunk.
pub struct XlPipe {
    pub fd: OwnedFd,
    /// C: the pipe capacity read back after F_SETPIPE_SZ.
    pub capacity: u64,
}

/// Checks that `fd` (stdin) is a pipe and shrinks it to one page; reads back the real
/// capacity. Must run before xl writes (it waits for the banner), so the pipe is empty.
pub fn prepare_pipe(fd: BorrowedFd<'_>) -> Result<XlPipe, SendError> {
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
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as libc::c_int;
    // SAFETY: fcntl on a valid fd with integer arguments.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, page) };
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
    async fn checkpoint(&mut self) -> Result<u64, NetBufferError> {
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
    let codec = match opts.codec {
        Codec::None => 0,
        Codec::Lz4 => 1,
    };
    let mut cfg = ClientConfig::new(opts.key.clone(), codec, opts.cache_pages);
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

/// The whole primary end: connect, banner to xl, then the controller loop. Returns how
/// the run ended; a lost backup has already failed the buffer open when this returns
/// `Err(SendError::PeerLost)`.
/// Connect, authenticate, pass the banner to xl.
async fn setup(
    opts: &SendOptions,
    shared: &Arc<Shared>,
) -> Result<
    (
        Session,
        FrameReader<tokio::net::tcp::OwnedReadHalf>,
        tokio::net::tcp::OwnedWriteHalf,
        String,
    ),
    SendError,
> {
    shared.set(|s| s.state = "connecting".into());
    let (session, stream) = connect(opts).await?;
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| opts.backup.clone());
    info!(backup = %peer, version = session.version, codec = session.codec, "authenticated to the backup");
    shared.metrics.sessions_total.inc();
    shared.set(|s| {
        s.state = "waiting for the backup's receiver".into();
        s.peer = Some(peer.clone());
        s.protocol_version = Some(session.version);
        s.compression = Some(if session.codec == 1 {
            "lz4".into()
        } else {
            "none".into()
        });
    });
    let (r, w) = stream.into_split();
    let mut reader = FrameReader::new(r, session.keys.opener.clone());
    let banner = match tokio::time::timeout(opts.banner_timeout, reader.next()).await {
        Err(_) => {
            return Err(SendError::Banner(format!(
                "no banner within {:?}",
                opts.banner_timeout
            )));
        }
        Ok(Err(e)) => return Err(SendError::Banner(e.to_string())),
        Ok(Ok(Message::Banner(b))) => b,
        Ok(Ok(Message::Abort { reason })) => {
            return Err(SendError::Banner(format!("the backup gave up: {reason}")));
        }
        Ok(Ok(other)) => {
            return Err(SendError::Banner(format!(
                "expected BANNER, got {:?}",
                other.kind()
            )));
        }
    };
    if banner != super::BANNER {
        warn!(banner = %String::from_utf8_lossy(&banner).trim_end(), "the backup's receiver printed an unexpected banner; passing it on");
    }
    {
        let mut out = std::io::stdout().lock();
        out.write_all(&banner).map_err(SendError::Stdout)?;
        out.flush().map_err(SendError::Stdout)?;
    }
    Ok((session, reader, w, peer))
}

pub async fn run<B: NetBuffer>(
    opts: SendOptions,
    pipe: XlPipe,
    mut buffer: B,
    shared: Arc<Shared>,
) -> Result<Outcome, SendError> {
    let (session, reader, w, peer) = match setup(&opts, &shared).await {
        Ok(x) => x,
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
    shared.set(|s| s.state = "replicating".into());

    let rx_pipe =
        tokio::net::unix::pipe::Receiver::from_owned_fd(pipe.fd).map_err(SendError::Stdin)?;
    let mut rep = TcpReplicator::start(reader, w, &session, &opts, shared.clone());
    let mut ctl = Controller::new(buffer, pipe.capacity, shared.metrics.clone());
    let out = ctl.run(rx_pipe, &mut rep).await?;
    shared.metrics.connected.set(0);
    match &out {
        Outcome::StreamEnded {
            checkpoints,
            finished,
        } => {
            info!(
                checkpoints,
                finished, "xl ended the stream; the backup was told (orderly close)"
            );
            shared.set(|s| s.state = "stream ended".into());
            Ok(out)
        }
        Outcome::PeerLost {
            reason,
            released,
            last_acked,
        } => {
            shared.metrics.failovers_total.inc();
            shared.set(|s| {
                s.state = "backup lost, buffer open".into();
                s.last_event = Some(reason.clone());
            });
            error!(
                backup = %peer, %reason, last_acked, released_frames = released.frames,
                "BACKUP LOST: released everything held and switched the buffer to pass-through; the domain now runs UNPROTECTED"
            );
            Err(SendError::PeerLost {
                addr: peer,
                reason: reason.clone(),
            })
        }
    }
}

/// The backup over TCP: a writer task (frames + heartbeats), a reader task (acks,
/// heartbeats, loss), compression of PAGE_DATA records on the way out.
pub struct TcpReplicator {
    tx: Option<mpsc::Sender<Message>>,
    acks: mpsc::Receiver<u64>,
    lost: watch::Receiver<Option<String>>,
    closed: watch::Receiver<bool>,
    encoder: Option<PageEncoder>,
    /// Unsent stream bytes, starting at absolute offset `pending_at`.
    pending: Vec<u8>,
    pending_at: u64,
    /// Offset up to which bytes may be sent (end of the last complete unit).
    safe_to: u64,
    sent_at: HashMap<u64, Instant>,
    shared: Arc<Shared>,
    finish_timeout: Duration,
}

impl TcpReplicator {
    pub fn start(
        mut reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
        w: tokio::net::tcp::OwnedWriteHalf,
        session: &Session,
        opts: &SendOptions,
        shared: Arc<Shared>,
    ) -> TcpReplicator {
        let (tx, rx) = mpsc::channel::<Message>(64);
        let (ack_tx, acks) = mpsc::channel::<u64>(1024);
        let (lost_tx, lost) = watch::channel::<Option<String>>(None);
        let (closed_tx, closed) = watch::channel(false);
        let lost_tx = Arc::new(lost_tx);
        let hb = opts.heartbeat;

        super::spawn_writer(
            w,
            session.keys.sealer.clone(),
            rx,
            hb.interval,
            shared.metrics.clone(),
            lost_tx.clone(),
        );

        // Reader: acks and heartbeats; silence for the timeout means the backup is lost.
        let m = shared.metrics.clone();
        tokio::spawn(async move {
            let mut waiting_since = Instant::now();
            loop {
                let r = tokio::select! {
                // Frames first: a frame already received is never mistaken for silence,
                // however late this task gets to run.
                biased;
                        r = reader.next() => r,
                        _ = tokio::time::sleep(silence_check(&hb, waiting_since)) => {
                            if let Some(silent) = judge_silence(&hb, waiting_since, &m) {
                                lost_tx.send_replace(Some(format!(
                                    "no heartbeat from the backup for {} ms (timeout {} ms)",
                                    silent.as_millis(), hb.timeout.as_millis()
                                )));
                                return;
                            }
                            continue;
                        }
                    };
                waiting_since = Instant::now();
                match r {
                    Ok(Message::Ack { checkpoint }) => {
                        if ack_tx.send(checkpoint).await.is_err() {
                            return;
                        }
                    }
                    Ok(Message::Heartbeat { .. }) => {}
                    Ok(Message::Close { .. }) => {
                        closed_tx.send_replace(true);
                        return;
                    }
                    Ok(Message::Abort { reason }) => {
                        lost_tx.send_replace(Some(format!("the backup aborted: {reason}")));
                        return;
                    }
                    Ok(other) => {
                        lost_tx.send_replace(Some(format!(
                            "protocol error: unexpected {:?} from the backup",
                            other.kind()
                        )));
                        return;
                    }
                    Err(e) => {
                        lost_tx
                            .send_replace(Some(format!("receiving from the backup failed: {e}")));
                        return;
                    }
                }
            }
        });

        let encoder = (session.codec == 1)
            .then(|| PageEncoder::new(Codec::Lz4, session.cache_pages as usize));
        TcpReplicator {
            tx: Some(tx),
            acks,
            lost,
            closed,
            encoder,
            pending: Vec::new(),
            pending_at: 0,
            safe_to: 0,
            sent_at: HashMap::new(),
            shared,
            finish_timeout: opts.heartbeat.timeout.max(Duration::from_secs(5)),
        }
    }

    /// Metrics of one ACK: latency from the checkpoint's last byte sent.
    fn note_ack(&mut self, n: u64) {
        let m = &self.shared.metrics;
        if let Some(t) = self.sent_at.remove(&n) {
            m.observe_ack(t.elapsed());
        }
        self.sent_at.retain(|&c, _| c > n);
        m.acks_total.inc();
        m.last_acked.set(n);
    }

    async fn push(&mut self, m: Message) -> Result<(), String> {
        let Some(tx) = &self.tx else {
            return Err("the connection is closed".into());
        };
        let mut lost = self.lost.clone();
        tokio::select! {
            r = tx.send(m) => r.map_err(|_| "the connection to the backup is closed".to_string()),
            r = lost.wait_for(Option::is_some) => Err(lost_reason(r)),
        }
    }

    /// Sends pending bytes up to absolute offset `to` as raw data frames.
    async fn send_raw(&mut self, to: u64) -> Result<(), String> {
        while self.pending_at < to {
            let n = ((to - self.pending_at) as usize).min(DATA_CHUNK);
            let rest = self.pending.split_off(n);
            let chunk = std::mem::replace(&mut self.pending, rest);
            self.pending_at += n as u64;
            self.push(Message::Data(chunk)).await?;
        }
        Ok(())
    }

    async fn send_page_record(&mut self, start: u64, end: u64) -> Result<(), String> {
        self.send_raw(start).await?;
        let n = (end - start) as usize;
        let rest = self.pending.split_off(n);
        let record = std::mem::replace(&mut self.pending, rest);
        self.pending_at = end;
        // A record too big for one frame (only a malformed one can be) goes raw; the
        // encoder never sees it, so both page caches stay in step.
        let mut enc = match self.encoder.take() {
            Some(enc) if record.len() <= MAX_COMPRESSED_RECORD => enc,
            other => {
                self.encoder = other;
                for c in record.chunks(DATA_CHUNK) {
                    self.push(Message::Data(c.to_vec())).await?;
                }
                return Ok(());
            }
        };
        // Big records off the runtime thread (heartbeats must not wait for a 4 MiB
        // compression); small ones inline (a thread hop would dominate their latency).
        let (enc, record, encoded) = if record.len() <= super::INLINE_CODEC_BYTES {
            let r = enc.encode(&record);
            (enc, record, r)
        } else {
            tokio::task::spawn_blocking(move || {
                let r = enc.encode(&record);
                (enc, record, r)
            })
            .await
            .map_err(|e| format!("the compression task failed: {e}"))?
        };
        self.encoder = Some(enc);
        let encoded = encoded.map_err(|e| format!("compressing a PAGE_DATA record: {e}"))?;
        let m = &self.shared.metrics;
        m.page_bytes_raw_total.add(record.len() as u64);
        m.page_bytes_wire_total.add(encoded.len() as u64);
        self.push(Message::PageData(encoded)).await
    }
}

fn lost_reason(r: Result<watch::Ref<'_, Option<String>>, watch::error::RecvError>) -> String {
    match r {
        Ok(v) => v.clone().unwrap_or_default(),
        Err(_) => "the connection tasks ended".into(),
    }
}

impl Replicator for TcpReplicator {
    async fn forward(&mut self, bytes: &[u8], events: &[Event]) -> Result<(), String> {
        self.pending.extend_from_slice(bytes);
        let read_to = self.pending_at + self.pending.len() as u64;
        let mut completed = Vec::new();
        let mut urgent = false;
        for ev in events {
            match *ev {
                Event::Record {
                    layer: Layer::Libxc,
                    rtype: libxc_type::PAGE_DATA,
                    start,
                    end,
                    ..
                } if self.encoder.is_some() && start >= self.pending_at => {
                    self.send_page_record(start, end).await?;
                    self.safe_to = end;
                }
                Event::Record { end, .. }
                | Event::XlHeader { end, .. }
                | Event::LibxcCheckpoint { end, .. } => self.safe_to = self.safe_to.max(end),
                Event::End { end } => {
                    self.safe_to = self.safe_to.max(end);
                    urgent = true;
                }
                Event::CheckpointComplete { checkpoint, end } => {
                    self.safe_to = self.safe_to.max(end);
                    completed.push(checkpoint);
                    urgent = true;
                }
                Event::PostSuspendStart { .. } => {}
            }
        }
        // Without compression nothing needs a whole record: send all. With it, hold the
        // tail that may belong to an unfinished PAGE_DATA record.
        let to = if self.encoder.is_some() {
            self.safe_to.min(read_to)
        } else {
            read_to
        };
        // Coalesce raw bytes into frames of COALESCE bytes (xl's pipe gives them a page
        // at a time); the end of a checkpoint goes out at once, its ACK is waited for.
        if urgent || to.saturating_sub(self.pending_at) >= COALESCE as u64 {
            self.send_raw(to).await?;
        }
        let now = Instant::now();
        for c in completed {
            self.sent_at.insert(c, now);
        }
        Ok(())
    }

    async fn next_event(&mut self) -> BackupEvent {
        enum Got {
            Ack(Option<u64>),
            Lost(String),
        }
        let mut lost = self.lost.clone();
        let got = tokio::select! {
            a = self.acks.recv() => Got::Ack(a),
            r = lost.wait_for(Option::is_some) => Got::Lost(lost_reason(r)),
        };
        match got {
            Got::Ack(Some(n)) => {
                self.note_ack(n);
                BackupEvent::Ack(n)
            }
            // The reader ended: on a CLOSE from the backup (we did not ask: `finish` does
            // not come through here), else it set the reason before dropping the channel.
            Got::Ack(None) => {
                if *self.closed.borrow() {
                    return BackupEvent::Lost("the backup closed the session".into());
                }
                let r = lost_reason(lost.wait_for(Option::is_some).await);
                BackupEvent::Lost(r)
            }
            Got::Lost(r) => BackupEvent::Lost(r),
        }
    }

    async fn finish(&mut self, checkpoints: u64, finished: bool) -> Result<Vec<u64>, String> {
        // Whatever is still pending is an incomplete record: the backup drops it anyway,
        // but a finished stream has none.
        let end = self.pending_at + self.pending.len() as u64;
        self.send_raw(end).await?;
        self.push(Message::Close {
            checkpoints,
            finished,
        })
        .await?;
        // Dropping the sender lets the writer flush and shut the write side down.
        self.tx = None;
        let mut closed = self.closed.clone();
        match tokio::time::timeout(self.finish_timeout, closed.wait_for(|c| *c)).await {
            Ok(Ok(_)) => {
                // ACKs sent before the CLOSE answer are queued ahead of it.
                let mut acks = Vec::new();
                while let Ok(n) = self.acks.try_recv() {
                    self.note_ack(n);
                    acks.push(n);
                }
                Ok(acks)
            }
            _ => Err("no CLOSE answer from the backup".into()),
        }
    }
}
