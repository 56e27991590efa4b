//! The output buffer as a service, and as the controller sees it.
//!
//! Owns: the `NetBuffer` trait; the holder task (ring reader, per-epoch queues, release
//! through the tap, the vif watch); its root-only control socket and state file under
//! /run/remus/; the in-process (`LocalBuffer`) and socket (`RemoteBuffer`) handles; the
//! attach/detach procedures, including detach from a fresh process after the holder
//! died. Never touches: the wire protocol between hosts, Xen, the migration stream.
//!
//! Epochs: a fresh buffer starts in epoch 1. `checkpoint()` closes the current epoch and
//! returns its number; frames the guest emits afterwards get the next one. `commit(N)`
//! releases every held frame of epochs <= N, epoch by epoch, in capture order.
//! Committing an epoch that is not closed yet is an error and releases nothing.
//!
//! Fail closed: the capture program is pinned (tcx link) or left as a clsact filter, so
//! if the holder dies, frames keep being dropped; nothing held is ever released by
//! accident. `remus-net detach` from a fresh process removes it and says what was lost.
use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use remus_common::{
    CTL_EPOCH, CTL_MODE, CTL_VIF_IFINDEX, FRAME_HDR_LEN, FrameHdr, MODE_HOLD, MODE_PASSTHROUGH,
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, unix::AsyncFd},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::{
    datapath::{self, AttachKind, AttachMode, DatapathError, KernelStats, Loaded},
    exit::{ExitCode, HasExitCode},
    holder::{EpochQueue, EpochSummary, Holder, HolderCounters, HolderError, Pushed},
    netlink::{Netlink, NetlinkError},
    tap::{TAP_PREFIX, Tap, TapError},
};

pub use crate::checkpoint::ports::{NetBuffer, NetBufferError, Released};

/// Runtime files of remus-net (root-only directory).
pub const RUN_DIR: &str = "/run/remus";

pub fn socket_path(iface: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("net-{iface}.sock"))
}
pub fn state_path(iface: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("net-{iface}.json"))
}
pub fn log_path(iface: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("net-{iface}.log"))
}

pub const DEFAULT_LIMIT_BYTES: u64 = 256 << 20;
pub const DEFAULT_RING_BYTES: u32 = 64 << 20;

#[derive(Clone, Debug)]
pub struct AttachOptions {
    pub iface: String,
    /// Held bytes beyond which frames are dropped (and counted), never released.
    pub limit_bytes: u64,
    /// Size of the kernel ring (power of two, multiple of the page size).
    pub ring_bytes: u32,
    pub passthrough: bool,
    pub attach_mode: AttachMode,
    /// UNSAFE, for benchmarks and demos only: close and release epochs by itself, every
    /// this long (zero: after every drain of the ring), as if a backup acknowledged
    /// every checkpoint at once. Never used by the controller.
    pub autocommit: Option<Duration>,
}

impl AttachOptions {
    pub fn new(iface: impl Into<String>) -> Self {
        AttachOptions {
            iface: iface.into(),
            limit_bytes: DEFAULT_LIMIT_BYTES,
            ring_bytes: DEFAULT_RING_BYTES,
            passthrough: false,
            attach_mode: AttachMode::Auto,
            autocommit: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("remus-net must run as root (it loads BPF programs and creates devices)")]
    NotRoot,
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("{iface} is already attached (holder pid {pid}); `remus-net status {iface}` shows it")]
    AlreadyAttached { iface: String, pid: u32 },
    #[error("{iface} is not attached by remus-net (no {path})")]
    NotAttached { iface: String, path: String },
    #[error("--ring-bytes {0} is not a power of two of at least 4096")]
    BadRingSize(u64),
    #[error("--limit-bytes must be at least 64 KiB (got {0})")]
    BadLimit(u64),
    #[error(transparent)]
    Holder(#[from] HolderError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the holder of {iface} answered: {message}")]
    Remote {
        iface: String,
        message: String,
        code: ExitCode,
    },
    #[error(
        "vif {iface} disappeared while attached (guest destroyed?): {frames} held frames ({bytes} bytes) dropped, nothing released"
    )]
    VifGone {
        iface: String,
        frames: u64,
        bytes: u64,
    },
    #[error(
        "the holder of {iface} (pid {pid}) is dead; {iface} stays blocked (fail closed). \
         Run `remus-net detach {iface}` to remove the program and see what was lost"
    )]
    HolderDead { iface: String, pid: u32 },
    #[error("the holder task of {0} has stopped")]
    Stopped(String),
}

impl HasExitCode for NetError {
    fn exit_code(&self) -> ExitCode {
        match self {
            NetError::NotRoot => ExitCode::Unsupported,
            NetError::Netlink(NetlinkError::NoSuchInterface(_) | NetlinkError::BadName(_)) => {
                ExitCode::Usage
            }
            NetError::Datapath(d) if d.is_unsupported() => ExitCode::Unsupported,
            NetError::Tap(TapError::Open(_)) => ExitCode::Unsupported,
            NetError::AlreadyAttached { .. }
            | NetError::NotAttached { .. }
            | NetError::BadRingSize(_)
            | NetError::BadLimit(_)
            | NetError::Holder(_) => ExitCode::Usage,
            NetError::Remote { code, .. } => *code,
            NetError::VifGone { .. } => ExitCode::PeerLost,
            _ => ExitCode::Failure,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Io { what, source }
}

/// Written by the holder at attach, removed at detach.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateFile {
    pub iface: String,
    pub ifindex: u32,
    pub pid: u32,
    pub attach_kind: AttachKind,
    pub tap: String,
    pub ring_bytes: u32,
    pub limit_bytes: u64,
    pub socket: PathBuf,
    pub pins: PathBuf,
    pub started_unix: u64,
}

pub fn read_state(iface: &str) -> Option<StateFile> {
    let text = std::fs::read_to_string(state_path(iface)).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn pid_alive(pid: u32) -> bool {
    pid != 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Hold,
    Passthrough,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetachPolicy {
    /// Drop what is held (default: releasing uncommitted frames breaks output commit).
    Drop,
    /// Send what is held, then detach.
    Release,
}

/// Everything `remus-net status` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub iface: String,
    pub ifindex: u32,
    pub mode: Mode,
    pub attach_kind: AttachKind,
    pub pid: u32,
    pub tap: String,
    pub current_epoch: u64,
    pub committed_epoch: u64,
    pub held_frames: u64,
    pub held_bytes: u64,
    pub limit_bytes: u64,
    pub ring_bytes: u32,
    pub epochs: Vec<EpochSummary>,
    pub holder: HolderCounters,
    pub kernel: KernelStats,
    pub release_errors: u64,
    pub unreleasable_frames: u64,
}

/// What detach reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DetachReport {
    pub iface: String,
    pub released_frames: u64,
    pub released_bytes: u64,
    pub dropped_frames: u64,
    pub dropped_bytes: u64,
    /// Frames captured by a holder that died and never released (upper bound from the
    /// kernel counters; only when the holder was dead).
    pub lost_frames: u64,
    pub holder_was_alive: bool,
    pub notes: Vec<String>,
}

/// Control socket requests (one JSON object per line).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Checkpoint,
    Commit { epoch: u64 },
    Status,
    SetMode { mode: Mode },
    FailOpen,
    Detach { policy: DetachPolicy },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Epoch { epoch: u64 },
    Released(Released),
    Status(Box<Status>),
    Ok,
    Detached(DetachReport),
    Error { message: String, code: ExitCode },
}

enum Cmd {
    Req(Request, oneshot::Sender<Reply>),
}

/// An answer, and for the last one (detach) a way to say it has been written out: the
/// holder waits for that before it ends, so the process cannot exit with the answer
/// still unsent (under load the connection task may not have run yet).
struct Reply {
    resp: Response,
    written: Option<oneshot::Sender<()>>,
}

/// Why the holder task ended.
#[derive(Debug)]
pub enum Ended {
    Detached(DetachReport),
    VifGone {
        frames: u64,
        bytes: u64,
    },
    /// Asked to stop without releasing (SIGTERM): the program stays attached and keeps
    /// dropping (fail closed) until `remus-net detach`.
    StoppedHolding,
}

struct Service {
    iface: String,
    ifindex: u32,
    loaded: Loaded,
    ring: AsyncFd<RingBuf<MapData>>,
    tap: Tap,
    holder: Holder,
    nl: Netlink,
    kind: AttachKind,
    mode: Mode,
    ring_bytes: u32,
    release_errors: u64,
    unreleasable: u64,
    autocommit: Option<Duration>,
}

impl Service {
    /// Closes the open epoch and releases it at once (autocommit mode only).
    fn autocommit_now(&mut self) {
        if self.holder.epochs().is_empty() {
            return;
        }
        if let Ok(e) = self.checkpoint() {
            let _ = self.commit(e);
        }
    }

    /// Moves every record out of the ring into the queues; late frames leave at once.
    fn drain(&mut self) {
        let mut late: Vec<(FrameHdr, Vec<u8>)> = Vec::new();
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            // A malformed record cannot come from our program; if one ever does, it is
            // dropped and counted with the frames that could not be released.
            let Some(meta) = FrameHdr::from_bytes(&item) else {
                self.unreleasable += 1;
                continue;
            };
            let end = FRAME_HDR_LEN + meta.len as usize;
            if end > item.len() {
                self.unreleasable += 1;
                continue;
            }
            let bytes = &item[FRAME_HDR_LEN..end];
            if self.holder.push(meta, bytes) == Pushed::Late {
                late.push((meta, bytes.to_vec()));
            }
        }
        for (meta, mut bytes) in late {
            let n = bytes.len() as u64;
            self.send(&meta, &mut bytes);
            self.holder.count_late_release(n);
        }
    }

    fn send(&mut self, meta: &FrameHdr, bytes: &mut [u8]) {
        match crate::holder::prepare(meta, bytes) {
            Ok(p) => {
                if self
                    .tap
                    .send(&p.vnet.to_bytes(), bytes, p.vlan.as_ref())
                    .is_err()
                {
                    self.release_errors += 1;
                }
            }
            Err(_) => self.unreleasable += 1,
        }
    }

    fn release(&mut self, queues: Vec<EpochQueue>) -> Released {
        let mut r = Released::default();
        for mut q in queues {
            r.epoch = r.epoch.max(q.epoch);
            let frames = std::mem::take(&mut q.frames);
            for f in &frames {
                let end = f.off + f.meta.len as usize;
                let meta = f.meta;
                let (data, _) = q.data.split_at_mut(end);
                self.send(&meta, &mut data[f.off..]);
                r.frames += 1;
                r.bytes += meta.len as u64;
            }
        }
        r
    }

    fn set_mode(&mut self, mode: Mode) -> Result<(), NetError> {
        let v = match mode {
            Mode::Hold => MODE_HOLD,
            Mode::Passthrough => MODE_PASSTHROUGH,
        };
        self.loaded.set_control(CTL_MODE, v)?;
        self.mode = mode;
        Ok(())
    }

    fn checkpoint(&mut self) -> Result<u64, NetError> {
        // Stamp the next epoch first: from here on every frame belongs to it.
        self.loaded
            .set_control(CTL_EPOCH, self.holder.current() + 1)?;
        Ok(self.holder.checkpoint())
    }

    fn commit(&mut self, epoch: u64) -> Result<Released, NetError> {
        // Frames of epochs <= N still in the ring must go out with N.
        self.drain();
        let qs = self.holder.commit(epoch)?;
        let mut r = self.release(qs);
        r.epoch = epoch;
        Ok(r)
    }

    /// Releases everything held, then lets frames pass (backup lost, or detach
    /// --release). Held frames leave before pass-through starts, so order is kept except
    /// for frames in flight in the ring at the switch, which follow right after.
    fn fail_open(&mut self) -> Result<Released, NetError> {
        self.drain();
        let qs = self.holder.take_all();
        let mut r = self.release(qs);
        self.loaded.set_control(CTL_EPOCH, self.holder.current())?;
        self.set_mode(Mode::Passthrough)?;
        self.drain();
        let qs = self.holder.take_all();
        let r2 = self.release(qs);
        r.frames += r2.frames;
        r.bytes += r2.bytes;
        r.epoch = self.holder.committed();
        Ok(r)
    }

    fn status(&self) -> Result<Status, NetError> {
        let c = self.holder.counters();
        Ok(Status {
            iface: self.iface.clone(),
            ifindex: self.ifindex,
            mode: self.mode,
            attach_kind: self.kind,
            pid: std::process::id(),
            tap: self.tap.name().to_string(),
            current_epoch: self.holder.current(),
            committed_epoch: self.holder.committed(),
            held_frames: c.held_frames,
            held_bytes: c.held_bytes,
            limit_bytes: self.holder.limit_bytes(),
            ring_bytes: self.ring_bytes,
            epochs: self.holder.epochs(),
            holder: c,
            kernel: self.loaded.stats()?,
            release_errors: self.release_errors,
            unreleasable_frames: self.unreleasable,
        })
    }

    async fn detach(&mut self, policy: DetachPolicy) -> Result<DetachReport, NetError> {
        let mut report = DetachReport {
            iface: self.iface.clone(),
            holder_was_alive: true,
            ..Default::default()
        };
        match policy {
            DetachPolicy::Release => {
                let r = self.fail_open()?;
                report.released_frames = r.frames;
                report.released_bytes = r.bytes;
            }
            DetachPolicy::Drop => {
                self.drain();
                let (f, b) = self.holder.drop_all();
                report.dropped_frames = f;
                report.dropped_bytes = b;
            }
        }
        report.notes = self.teardown().await?;
        Ok(report)
    }

    async fn teardown(&mut self) -> Result<Vec<String>, NetError> {
        let present = self.nl.ifindex(&self.iface).await.is_ok();
        let mut notes =
            datapath::teardown(&self.iface, self.loaded.pin_dir(), Some(self.kind), present)?;
        if present
            && let AttachKind::Netlink {
                created_clsact: true,
            } = self.kind
        {
            match self.nl.delete_clsact(&self.iface).await {
                Ok(()) => notes.push("removed the clsact qdisc remus-net added".into()),
                Err(e) => notes.push(format!("could not remove the clsact qdisc: {e}")),
            }
        }
        remove_runtime_files(&self.iface);
        notes.push(format!("removed helper tap {}", self.tap.name()));
        Ok(notes)
    }

    async fn handle(&mut self, req: Request) -> (Response, Option<Ended>) {
        let res = match req {
            Request::Checkpoint => self.checkpoint().map(|epoch| Response::Epoch { epoch }),
            Request::Commit { epoch } => self.commit(epoch).map(Response::Released),
            Request::Status => self.status().map(|s| Response::Status(Box::new(s))),
            Request::SetMode { mode } => {
                let r = if mode == Mode::Passthrough {
                    self.fail_open().map(|_| ())
                } else {
                    self.set_mode(mode)
                };
                r.map(|()| Response::Ok)
            }
            Request::FailOpen => self.fail_open().map(Response::Released),
            Request::Detach { policy } => match self.detach(policy).await {
                Ok(rep) => return (Response::Detached(rep.clone()), Some(Ended::Detached(rep))),
                Err(e) => Err(e),
            },
        };
        match res {
            Ok(r) => (r, None),
            Err(e) => (
                Response::Error {
                    message: e.to_string(),
                    code: e.exit_code(),
                },
                None,
            ),
        }
    }
}

fn remove_runtime_files(iface: &str) {
    let _ = std::fs::remove_file(socket_path(iface));
    let _ = std::fs::remove_file(state_path(iface));
}

fn ensure_run_dir() -> Result<(), NetError> {
    std::fs::create_dir_all(RUN_DIR).map_err(io_err(format!("creating {RUN_DIR}")))?;
    std::fs::set_permissions(RUN_DIR, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("chmod 0700 {RUN_DIR}")))
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// In-process handle on a running holder (what `remus relay send` and the foreground
/// `remus-net attach` use). Dropping it does not detach.
#[derive(Clone)]
pub struct LocalBuffer {
    iface: String,
    tx: mpsc::Sender<Cmd>,
}

/// The running holder task: await it to learn why it ended.
pub struct Running {
    pub buffer: LocalBuffer,
    pub task: tokio::task::JoinHandle<Result<Ended, NetError>>,
    pub status: Status,
}

/// Attaches the buffer to `opts.iface` and starts the holder task on the current runtime.
/// Returns once holding is active (every frame from here on is held, or passed in
/// pass-through mode).
pub async fn attach(opts: AttachOptions) -> Result<Running, NetError> {
    if !is_root() {
        return Err(NetError::NotRoot);
    }
    if opts.ring_bytes < 4096 || !opts.ring_bytes.is_power_of_two() {
        return Err(NetError::BadRingSize(opts.ring_bytes as u64));
    }
    if opts.limit_bytes < 65536 {
        return Err(NetError::BadLimit(opts.limit_bytes));
    }
    let nl = Netlink::connect()?;
    let ifindex = nl.ifindex(&opts.iface).await?;
    ensure_run_dir()?;
    if let Some(st) = read_state(&opts.iface)
        && pid_alive(st.pid)
        && st.pid != std::process::id()
    {
        return Err(NetError::AlreadyAttached {
            iface: opts.iface.clone(),
            pid: st.pid,
        });
    }
    let pins = datapath::pin_dir(&opts.iface);
    let mut loaded = Loaded::load(&pins, &opts.iface, opts.ring_bytes)?;
    // A takeover continues the epoch numbering; frames of the dead holder's epochs
    // still in the ring are dropped (their commit will never come).
    let first_epoch = if loaded.reused {
        loaded.control(CTL_EPOCH)? + 1
    } else {
        1
    };
    loaded.set_control(CTL_EPOCH, first_epoch)?;
    loaded.set_control(
        CTL_MODE,
        if opts.passthrough {
            MODE_PASSTHROUGH
        } else {
            MODE_HOLD
        },
    )?;
    loaded.set_control(CTL_VIF_IFINDEX, ifindex as u64)?;
    let ring = loaded.take_ring()?;
    // SAFETY: the AsyncFd owns the RingBuf, which owns the fd: it stays open for as
    // long as it is registered.
    let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| NetError::Io {
            what: "registering the ring buffer with the reactor".into(),
            source: io::Error::other(e.to_string()),
        })?;
    // The helper tap and its redirect program first, so releases work from frame one.
    let tap_name = format!("{TAP_PREFIX}{ifindex}");
    let tap = Tap::create(&tap_name)?;
    let tap_index = nl.ifindex(&tap_name).await?;
    if let Ok(Some(mtu)) = nl.mtu(ifindex).await {
        let _ = nl.set_mtu(tap_index, mtu).await;
    }
    nl.set_up(tap_index).await?;
    loaded.attach_release(&tap_name)?;
    let kind = loaded.attach_vif(&opts.iface, opts.attach_mode)?;
    let state = StateFile {
        iface: opts.iface.clone(),
        ifindex,
        pid: std::process::id(),
        attach_kind: kind,
        tap: tap_name,
        ring_bytes: opts.ring_bytes,
        limit_bytes: opts.limit_bytes,
        socket: socket_path(&opts.iface),
        pins: pins.clone(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let sock = socket_path(&opts.iface);
    let _ = std::fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).map_err(io_err(format!("binding {}", sock.display())))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("chmod 0600 {}", sock.display())))?;
    let state_json = serde_json::to_string_pretty(&state).unwrap_or_default();
    std::fs::write(state_path(&opts.iface), state_json).map_err(io_err(format!(
        "writing {}",
        state_path(&opts.iface).display()
    )))?;
    let svc = Service {
        iface: opts.iface.clone(),
        ifindex,
        loaded,
        ring,
        tap,
        holder: Holder::new(first_epoch, opts.limit_bytes),
        nl,
        kind,
        mode: if opts.passthrough {
            Mode::Passthrough
        } else {
            Mode::Hold
        },
        ring_bytes: opts.ring_bytes,
        release_errors: 0,
        unreleasable: 0,
        autocommit: opts.autocommit,
    };
    let status = svc.status()?;
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(run(svc, rx, listener, tx.clone()));
    Ok(Running {
        buffer: LocalBuffer {
            iface: opts.iface,
            tx,
        },
        task,
        status,
    })
}

async fn run(
    mut svc: Service,
    mut rx: mpsc::Receiver<Cmd>,
    listener: UnixListener,
    tx: mpsc::Sender<Cmd>,
) -> Result<Ended, NetError> {
    let mut vif_check = tokio::time::interval(Duration::from_millis(200));
    let mut vif_missing = false;
    let every = svc.autocommit.filter(|d| !d.is_zero());
    let after_drain = svc.autocommit.is_some_and(|d| d.is_zero());
    let mut auto = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
    auto.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_err("installing the SIGTERM handler"))?;
    loop {
        tokio::select! {
            guard = svc.ring.readable_mut() => {
                match guard {
                    Ok(mut g) => {
                        g.clear_ready();
                        drop(g);
                        svc.drain();
                        if after_drain {
                            svc.autocommit_now();
                        }
                    }
                    Err(e) => return Err(NetError::Io { what: "waiting on the ring".into(), source: e }),
                }
            }
            Some(Cmd::Req(req, reply)) = rx.recv() => {
                let (resp, ended) = svc.handle(req).await;
                if let Some(e) = ended {
                    let (wtx, wrx) = oneshot::channel();
                    if reply.send(Reply { resp, written: Some(wtx) }).is_ok() {
                        // Err: the requester dropped the sender (in-process): nothing to wait for.
                        let _ = tokio::time::timeout(Duration::from_secs(10), wrx).await;
                    }
                    return Ok(e);
                }
                let _ = reply.send(Reply { resp, written: None });
            }
            conn = listener.accept() => {
                if let Ok((stream, _)) = conn {
                    tokio::spawn(serve_conn(stream, tx.clone()));
                }
            }
            _ = vif_check.tick() => {
                // Gone means: the name no longer resolves to our ifindex, seen twice in a
                // row (a single odd netlink answer must not tear down a protected vif).
                let gone_now = match svc.nl.ifindex(&svc.iface).await {
                    Ok(i) => i != svc.ifindex,
                    Err(NetlinkError::NoSuchInterface(_)) => true,
                    Err(_) => false,
                };
                let gone = gone_now && std::mem::replace(&mut vif_missing, true);
                if !gone_now {
                    vif_missing = false;
                }
                if gone {
                    tracing::warn!(iface = %svc.iface, ifindex = svc.ifindex, "the vif is gone");
                    svc.drain();
                    let (frames, bytes) = svc.holder.drop_all();
                    let _ = svc.teardown().await;
                    return Ok(Ended::VifGone { frames, bytes });
                }
            }
            _ = auto.tick(), if every.is_some() => {
                svc.autocommit_now();
            }
            _ = term.recv() => {
                svc.drain();
                return Ok(Ended::StoppedHolding);
            }
        }
    }
}

async fn serve_conn(stream: UnixStream, tx: mpsc::Sender<Cmd>) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let (otx, orx) = oneshot::channel();
                if tx.send(Cmd::Req(req, otx)).await.is_err() {
                    break;
                }
                match orx.await {
                    Ok(r) => r,
                    Err(_) => break,
                }
            }
            Err(e) => Reply {
                resp: Response::Error {
                    message: format!("bad request: {e}"),
                    code: ExitCode::Usage,
                },
                written: None,
            },
        };
        let mut out = serde_json::to_string(&reply.resp).unwrap_or_default();
        out.push('\n');
        let ok = w.write_all(out.as_bytes()).await.is_ok() && w.flush().await.is_ok();
        if let Some(done) = reply.written {
            let _ = done.send(());
        }
        if !ok {
            break;
        }
    }
}

impl LocalBuffer {
    pub fn iface(&self) -> &str {
        &self.iface
    }

    pub async fn request(&self, req: Request) -> Result<Response, NetError> {
        let (otx, orx) = oneshot::channel();
        self.tx
            .send(Cmd::Req(req, otx))
            .await
            .map_err(|_| NetError::Stopped(self.iface.clone()))?;
        orx.await
            .map(|r| r.resp)
            .map_err(|_| NetError::Stopped(self.iface.clone()))
    }
}

/// Client of a holder's control socket (a holder in another process).
pub struct RemoteBuffer {
    iface: String,
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl RemoteBuffer {
    pub async fn connect(iface: &str) -> Result<RemoteBuffer, NetError> {
        let path = socket_path(iface);
        if !path.exists() {
            return Err(NetError::NotAttached {
                iface: iface.to_string(),
                path: path.display().to_string(),
            });
        }
        let s = UnixStream::connect(&path)
            .await
            .map_err(io_err(format!("connecting to {}", path.display())))?;
        let (r, w) = s.into_split();
        Ok(RemoteBuffer {
            iface: iface.to_string(),
            lines: BufReader::new(r).lines(),
            w,
        })
    }

    pub async fn request(&mut self, req: Request) -> Result<Response, NetError> {
        let mut line = serde_json::to_string(&req).unwrap_or_default();
        line.push('\n');
        let gone = |iface: &str| NetError::Stopped(iface.to_string());
        self.w
            .write_all(line.as_bytes())
            .await
            .map_err(|_| gone(&self.iface))?;
        let resp = self
            .lines
            .next_line()
            .await
            .map_err(|_| gone(&self.iface))?
            .ok_or_else(|| gone(&self.iface))?;
        serde_json::from_str(&resp).map_err(|e| NetError::Remote {
            iface: self.iface.clone(),
            message: format!("unparseable answer: {e}"),
            code: ExitCode::Failure,
        })
    }
}

/// Turns an error response into an error.
pub fn check(iface: &str, r: Response) -> Result<Response, NetError> {
    match r {
        Response::Error { message, code } => Err(NetError::Remote {
            iface: iface.to_string(),
            message,
            code,
        }),
        other => Ok(other),
    }
}

fn to_nb(e: NetError) -> NetBufferError {
    match e {
        NetError::Remote { message, .. } if message.contains("not closed") => {
            NetBufferError::Failed(message)
        }
        NetError::Stopped(iface) => NetBufferError::Gone {
            iface,
            reason: "holder stopped".into(),
        },
        other => NetBufferError::Failed(other.to_string()),
    }
}

macro_rules! impl_netbuffer {
    ($t:ty) => {
        impl NetBuffer for $t {
            async fn close_epoch(&mut self) -> Result<u64, NetBufferError> {
                let iface = self.iface.clone();
                match check(
                    &iface,
                    self.request(Request::Checkpoint).await.map_err(to_nb)?,
                )
                .map_err(to_nb)?
                {
                    Response::Epoch { epoch } => Ok(epoch),
                    other => Err(NetBufferError::Failed(format!(
                        "unexpected answer {other:?}"
                    ))),
                }
            }

            async fn commit(&mut self, epoch: u64) -> Result<Released, NetBufferError> {
                let iface = self.iface.clone();
                match check(
                    &iface,
                    self.request(Request::Commit { epoch })
                        .await
                        .map_err(to_nb)?,
                )
                .map_err(to_nb)?
                {
                    Response::Released(r) => Ok(r),
                    other => Err(NetBufferError::Failed(format!(
                        "unexpected answer {other:?}"
                    ))),
                }
            }

            async fn fail_open(&mut self) -> Result<Released, NetBufferError> {
                let iface = self.iface.clone();
                match check(
                    &iface,
                    self.request(Request::FailOpen).await.map_err(to_nb)?,
                )
                .map_err(to_nb)?
                {
                    Response::Released(r) => Ok(r),
                    other => Err(NetBufferError::Failed(format!(
                        "unexpected answer {other:?}"
                    ))),
                }
            }
        }
    };
}

impl_netbuffer!(LocalBuffer);
impl_netbuffer!(RemoteBuffer);

/// Detach when the holder is dead (or never answers): remove program, pins and runtime
/// files from this fresh process, and say what was lost.
pub async fn detach_offline(iface: &str) -> Result<DetachReport, NetError> {
    if !is_root() {
        return Err(NetError::NotRoot);
    }
    datapath::ensure_bpffs()?;
    let state = read_state(iface);
    let pins = datapath::pin_dir(iface);
    let pinned = datapath::read_pinned(&pins)?;
    if state.is_none() && pinned.is_none() {
        return Err(NetError::NotAttached {
            iface: iface.to_string(),
            path: format!("{} or {}", state_path(iface).display(), pins.display()),
        });
    }
    let nl = Netlink::connect()?;
    let present = nl.ifindex(iface).await.is_ok();
    let kind = state.as_ref().map(|s| s.attach_kind);
    let mut report = DetachReport {
        iface: iface.to_string(),
        ..Default::default()
    };
    if let Some(p) = &pinned {
        // Captured but never reinjected: held by the dead holder or left in the ring.
        report.lost_frames = p
            .stats
            .captured_frames
            .saturating_sub(p.stats.redirected_frames);
    }
    report.notes = datapath::teardown(iface, &pins, kind, present)?;
    if present
        && let Some(AttachKind::Netlink {
            created_clsact: true,
        }) = kind
    {
        match nl.delete_clsact(iface).await {
            Ok(()) => report
                .notes
                .push("removed the clsact qdisc remus-net added".into()),
            Err(e) => report
                .notes
                .push(format!("could not remove the clsact qdisc: {e}")),
        }
    }
    remove_runtime_files(iface);
    Ok(report)
}

/// Interfaces with runtime state under /run/remus (for `status` without an interface).
pub fn attached_ifaces() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(RUN_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(i) = name
                .strip_prefix("net-")
                .and_then(|n| n.strip_suffix(".json"))
            {
                out.push(i.to_string());
            }
        }
    }
    out.sort();
    out
}

/// The controller's entry point: attach the buffer to `opts.iface` inside this process
/// (same as `attach`; `Running::buffer` is the `NetBuffer`).
pub async fn attach_in_process(opts: AttachOptions) -> Result<Running, NetError> {
    attach(opts).await
}

/// The controller's entry point for a buffer already attached by `remus-net attach`.
pub async fn connect(iface: &str) -> Result<RemoteBuffer, NetError> {
    RemoteBuffer::connect(iface).await
}
