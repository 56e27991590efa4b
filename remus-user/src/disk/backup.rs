//! The backup's disk daemon state: one primary session at a time (initial sync straight
//! to the backing, then epochs held in the journal), and the decisions the relay makes at
//! checkpoints: `durable(N)`, `merge(N)`, `commit(N)`, `failover(N)`.
//!
//! Owns: the session thread (frames in, SYNCED/DURABLE/HEARTBEAT out), the journal and
//! epoch bookkeeping behind one lock, applying epochs, the export after failover.
//! Never touches: the relay or xl (phase 2 wires them to this API), memory checkpoints.
//!
//! Invariants:
//! - Nothing of an epoch reaches the backing before a commit or failover names a
//!   failover point at or after it (`epochs` decides).
//! - DURABLE(N) is sent, and `durable(N)` answered, only after epoch N's journal file
//!   and its directory are fsync'ed.
//! - A crash anywhere is recovered from the journal at the next start: committed epochs
//!   are applied again (idempotent), incomplete ones dropped.
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::backing::Backing;
use super::channel::{self, Received};
use super::control::{
    ApplyReport, DiskStatus, ErrorKind, FailoverReport, Handler, Request, Response,
};
use super::epochs::{EpochError, Epochs};
use super::export::{self, Export, ExportSpec};
use super::journal::{
    self, ApplyObserver, Closing, EpochLog, Journal, JournalError, OpenEpoch, State,
};
use super::primary::DiskTarget;
use super::wire::{self, Kind, WireError};
use crate::relay::Heartbeat;
use crate::replication::Keys;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where the backup is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No primary, and no disk state worth keeping: a primary may connect and sync.
    Waiting,
    Syncing,
    Replicating,
    /// The session ended while in sync: the disk (and held epochs) wait for a decision:
    /// failover, or discard. New primaries are refused meanwhile.
    Lost(String),
    /// Failed over: the backing is served (the guest runs here now).
    Exported,
}

impl Phase {
    fn word(&self) -> &'static str {
        match self {
            Phase::Waiting => "waiting for primary",
            Phase::Syncing => "syncing",
            Phase::Replicating => "replicating",
            Phase::Lost(_) => "lost",
            Phase::Exported => "exported",
        }
    }
}

/// Fault injection for tests (`REMUS_DISK_FAULT=stall-apply:K`): the apply stops forever
/// after K records are on the backing, so a test can kill the daemon mid-apply.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fault {
    pub stall_apply_after: Option<u64>,
}

impl Fault {
    pub fn from_env() -> Fault {
        let v = std::env::var("REMUS_DISK_FAULT").unwrap_or_default();
        Fault {
            stall_apply_after: v.strip_prefix("stall-apply:").and_then(|n| n.parse().ok()),
        }
    }
}

pub struct Config {
    pub name: String,
    pub listen: String,
    pub heartbeat: Heartbeat,
    pub export: Option<ExportSpec>,
    pub fault: Fault,
}

/// Seals and writes one frame (kind, epoch, payload) to the primary (shared by the
/// session, syncer and heartbeat threads; sealed under the writer's lock, so the frame
/// counter follows the order on the wire).
type Sender = Arc<dyn Fn(Kind, u64, &[u8]) -> Result<(), String> + Send + Sync>;

struct Session {
    id: u64,
    peer: String,
    stream: TcpStream,
}

struct Inner {
    epochs: Epochs,
    journal: Journal,
    phase: Phase,
    session: Option<Session>,
    session_hex: String,
    next_session: u64,
    sessions_total: u64,
    applied_bytes_total: u64,
    apply_secs_total: f64,
    replayed: Vec<u64>,
    last_error: Option<String>,
    export: Option<Export>,
    target: Option<Arc<DiskTarget>>,
    since: u64,
    /// Highest epoch applied *and* fsync'ed on the backing (what the state file says).
    flushed: u64,
    /// Applied but not yet fsync'ed: their journal files stay until the flusher is done.
    unflushed: Vec<EpochLog>,
    unflushed_bytes: u64,
}

/// The backing is fsync'ed at most this often after commits (and the applied epochs'
/// journal files recycled then), or sooner past [`FLUSH_BYTES`] of applied data.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
const FLUSH_BYTES: u64 = 256 << 20;

pub struct Backup {
    cfg: Config,
    backing: Arc<Backing>,
    inner: Mutex<Inner>,
    changed: Condvar,
    /// One apply (commit, failover, replay) at a time.
    applying: Mutex<()>,
    stalled: AtomicBool,
    records_applied: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Epoch(#[from] EpochError),
    #[error("exporting the disk after failover: {0}")]
    Export(#[from] export::ExportError),
    #[error("flushing the backing: {0}")]
    Flush(std::io::Error),
    #[error("{0}")]
    State(String),
    #[error("epoch {epoch} was not durable within {waited:?}")]
    Timeout { epoch: u64, waited: Duration },
    #[error("the primary session ended before epoch {epoch} was durable ({reason})")]
    Lost { epoch: u64, reason: String },
}

impl BackupError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            BackupError::Epoch(EpochError::NotDurable { .. }) => ErrorKind::NotDurable,
            BackupError::Epoch(EpochError::Merged(_)) => ErrorKind::Merged,
            BackupError::Epoch(EpochError::NotInSync) => ErrorKind::NotInSync,
            BackupError::Epoch(_) | BackupError::State(_) => ErrorKind::Usage,
            BackupError::Timeout { .. } => ErrorKind::Timeout,
            BackupError::Lost { .. } => ErrorKind::Lost,
            _ => ErrorKind::Failed,
        }
    }
}

struct Observer<'a> {
    b: &'a Backup,
}

impl ApplyObserver for Observer<'_> {
    fn record_applied(&self, epoch: u64, index: usize) {
        let n = self.b.records_applied.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(k) = self.b.cfg.fault.stall_apply_after
            && n >= k
        {
            self.b.stalled.store(true, Ordering::SeqCst);
            tracing::warn!(
                epoch,
                record = index,
                applied_records = n,
                "fault injection: the apply stalls here (REMUS_DISK_FAULT)"
            );
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

impl Backup {
    /// Opens the journal, replays what was committed but not applied, and decides the
    /// starting phase (a backup that failed over serves its disk again).
    pub fn open(
        cfg: Config,
        backing: Backing,
        journal_dir: &std::path::Path,
        journal_max: u64,
        ram_cap: u64,
    ) -> Result<Arc<Backup>, BackupError> {
        let (mut journal, state) = Journal::open(journal_dir, journal_max, ram_cap)?;
        if state.size != 0 && state.size != backing.size() {
            return Err(JournalError::SizeMismatch {
                path: journal_dir.display().to_string(),
                journal: state.size,
                backing: backing.size(),
            }
            .into());
        }
        let complete = journal.recover(state.applied)?;
        let mut epochs = Epochs {
            in_sync: state.in_sync,
            applied: state.applied,
            committed: state.committed.max(state.applied),
            durable: state.applied,
            closed: state.applied,
            open: None,
            merged: state.merged.iter().copied().collect(),
        };
        // Durable = the contiguous run of complete epochs after what is applied.
        for e in complete {
            if e == epochs.durable + 1 {
                epochs.durable = e;
                epochs.closed = e;
            } else {
                journal.drop_epoch(e);
            }
        }
        if epochs.committed > epochs.durable {
            return Err(JournalError::Missing(epochs.durable + 1).into());
        }
        let b = Arc::new(Backup {
            cfg,
            backing: Arc::new(backing),
            inner: Mutex::new(Inner {
                epochs,
                journal,
                phase: Phase::Waiting,
                session: None,
                session_hex: state.session.clone(),
                next_session: 1,
                sessions_total: 0,
                applied_bytes_total: 0,
                apply_secs_total: 0.0,
                replayed: Vec::new(),
                last_error: None,
                export: None,
                target: None,
                since: now_unix(),
                flushed: state.applied,
                unflushed: Vec::new(),
                unflushed_bytes: 0,
            }),
            changed: Condvar::new(),
            applying: Mutex::new(()),
            stalled: AtomicBool::new(false),
            records_applied: AtomicU64::new(0),
        });
        // Replay: committed but not (known to be) applied.
        let (from, to) = {
            let i = lock(&b.inner);
            (i.epochs.applied + 1, i.epochs.committed)
        };
        if from <= to {
            tracing::warn!(
                from,
                to,
                "replaying committed epochs from the journal (the last run stopped mid-apply)"
            );
            let _a = lock(&b.applying);
            let r = b.apply_range(from, to, true)?;
            lock(&b.inner).replayed = r.applied;
        }
        {
            let b2 = b.clone();
            std::thread::Builder::new()
                .name("disk-flusher".into())
                .spawn(move || b2.flusher())
                .map_err(|e| BackupError::State(format!("starting the flusher: {e}")))?;
        }
        let exported = state.exported;
        {
            let mut i = lock(&b.inner);
            i.phase = if exported {
                Phase::Exported
            } else if i.epochs.in_sync {
                Phase::Lost(format!(
                    "restarted: holding the disk at checkpoint {} (epochs {:?} durable); fail over or discard",
                    i.epochs.applied,
                    i.journal.held_epochs()
                ))
            } else {
                Phase::Waiting
            };
        }
        if exported {
            b.start_export()?;
        }
        Ok(b)
    }

    pub fn backing(&self) -> &Arc<Backing> {
        &self.backing
    }

    fn save(&self, i: &Inner) -> Result<(), JournalError> {
        let mut st = State::from_epochs(
            &i.epochs,
            self.backing.size(),
            &i.session_hex,
            i.phase == Phase::Exported,
        );
        // What is on the backing *durably*: a restart replays from there.
        st.applied = i.flushed.min(st.applied);
        i.journal.save_state(&st)
    }

    /// Makes applied epochs durable on the backing in the background (commits only write
    /// the page cache), then records it and recycles their journal files.
    fn flusher(self: Arc<Self>) {
        let mut last = Instant::now();
        loop {
            let to = {
                let mut i = lock(&self.inner);
                loop {
                    let due = !i.unflushed.is_empty()
                        && (i.unflushed_bytes >= FLUSH_BYTES || last.elapsed() >= FLUSH_EVERY);
                    if due {
                        break i.epochs.applied;
                    }
                    i = self
                        .changed
                        .wait_timeout(i, FLUSH_EVERY)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            };
            last = Instant::now();
            if let Err(e) = self.backing.flush() {
                let mut i = lock(&self.inner);
                i.last_error = Some(format!("flushing the backing: {e}"));
                tracing::error!(error = %e, "flushing the backing failed; the journal keeps the epochs");
                continue;
            }
            let mut i = lock(&self.inner);
            if i.epochs.applied >= to {
                i.flushed = i.flushed.max(to);
            }
            let (done, keep): (Vec<EpochLog>, Vec<EpochLog>) = std::mem::take(&mut i.unflushed)
                .into_iter()
                .partition(|l| l.epoch <= i.flushed);
            i.unflushed = keep;
            i.unflushed_bytes = i.unflushed.iter().map(|l| l.bytes).sum();
            if let Err(e) = self.save(&i) {
                tracing::error!(error = %e, "recording the flushed epochs");
                i.unflushed.extend(done);
                continue;
            }
            i.journal.remove(&done);
        }
    }

    /// Whether a new primary may start a session now; the reason if not.
    pub fn refusal(&self) -> Option<String> {
        let i = lock(&self.inner);
        match &i.phase {
            Phase::Waiting => None,
            Phase::Syncing | Phase::Replicating => Some(format!(
                "busy: replicating for primary {}",
                i.session.as_ref().map(|s| s.peer.as_str()).unwrap_or("?")
            )),
            Phase::Lost(_) => Some(format!(
                "the backup holds the disk of a lost session (checkpoint {}): fail it over \
                 (`remus disk failover N`) or discard it (`remus disk discard`) first",
                i.epochs.applied
            )),
            Phase::Exported => Some("this backup failed over: it serves the disk itself".into()),
        }
    }

    /// Runs one primary session on an authenticated connection whose sealed WELCOME was
    /// sent (blocking, own thread).
    pub fn run_session(self: &Arc<Self>, stream: TcpStream, keys: Keys, peer: String) {
        let mut id = None;
        let reason = match self.session(stream, keys, &peer, &mut id) {
            Ok(()) => "the primary closed the session".to_string(),
            Err(e) => e,
        };
        let mut i = lock(&self.inner);
        // Only this session's own end changes the state (a refused connection, or one
        // already ended by a failover, leaves it alone).
        if id.is_none() || i.session.as_ref().map(|s| s.id) != id {
            if id.is_none() {
                tracing::warn!(primary = %peer, %reason, "primary refused");
            }
            return;
        }
        i.session = None;
        i.epochs.drop_open();
        i.phase = match i.phase {
            Phase::Exported => Phase::Exported,
            _ if i.epochs.in_sync => {
                tracing::warn!(primary = %peer, %reason, checkpoint = i.epochs.applied, durable = i.epochs.durable, "primary session lost: the disk waits for failover or discard");
                Phase::Lost(reason)
            }
            _ => {
                tracing::warn!(primary = %peer, %reason, "primary session lost before the disk was in sync: FAILOVER IMPOSSIBLE (no consistent disk); waiting for a primary");
                Phase::Waiting
            }
        };
        drop(i);
        self.changed.notify_all();
    }

    fn session(
        self: &Arc<Self>,
        stream: TcpStream,
        keys: Keys,
        peer: &str,
        registered: &mut Option<u64>,
    ) -> Result<(), String> {
        let hb = self.cfg.heartbeat;
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(hb.timeout))
            .map_err(|e| e.to_string())?;
        let writer = Arc::new(Mutex::new(stream.try_clone().map_err(|e| e.to_string())?));
        let send: Sender = {
            let (writer, sealer) = (writer.clone(), keys.sealer);
            Arc::new(move |kind, epoch, payload: &[u8]| -> Result<(), String> {
                let mut w = lock(&writer);
                channel::send(&sealer, &mut *w, kind, epoch, 0, payload)
                    .map_err(|e| format!("writing to the primary: {e}"))
            })
        };
        let abort = |why: &str| {
            let _ = send(Kind::Abort, 0, wire::abort(why));
        };
        let mut r =
            channel::Reader::new(stream.try_clone().map_err(|e| e.to_string())?, keys.opener);
        let hello = match r.recv() {
            Ok(f) if f.kind() == Kind::Hello => {
                wire::parse_hello(f.payload()).ok_or("malformed HELLO")?
            }
            Ok(f) => {
                abort("expected HELLO");
                return Err(format!("expected HELLO, got {:?}", f.kind()));
            }
            Err(e) => return Err(e.to_string()),
        };
        if hello.max_version < wire::MIN_VERSION || hello.min_version > wire::VERSION {
            let why = format!(
                "disk protocol versions {}..={} and {}..={} have nothing in common",
                hello.min_version,
                hello.max_version,
                wire::MIN_VERSION,
                wire::VERSION
            );
            abort(&why);
            return Err(why);
        }
        if hello.size != self.backing.size() {
            let why = format!(
                "size mismatch: the primary's disk has {} bytes, this backup's backing {} has {}",
                hello.size,
                self.backing.path().display(),
                self.backing.size()
            );
            abort(&why);
            return Err(why);
        }
        let id;
        {
            let mut i = lock(&self.inner);
            if i.phase != Phase::Waiting {
                drop(i);
                let why = self.refusal().unwrap_or_else(|| "busy".into());
                abort(&why);
                // Not our session: leave the state alone.
                return Err(format!("refused: {why}"));
            }
            i.epochs.reset();
            i.journal.discard_above(0);
            i.session_hex = hello.session.iter().map(|b| format!("{b:02x}")).collect();
            id = i.next_session;
            i.next_session += 1;
            i.sessions_total += 1;
            i.session = Some(Session {
                id,
                peer: peer.to_string(),
                stream: stream.try_clone().map_err(|e| e.to_string())?,
            });
            i.phase = Phase::Syncing;
            *registered = Some(id);
            self.save(&i).map_err(|e| e.to_string())?;
        }
        self.changed.notify_all();
        tracing::info!(primary = %peer, session = id, size = hello.size, "primary connected: initial synchronisation");
        send(
            Kind::Welcome,
            0,
            &wire::welcome(wire::VERSION, self.backing.size()),
        )?;
        // Heartbeats from a thread of their own (the session thread may sit in an fsync).
        let alive = Arc::new(AtomicBool::new(true));
        {
            let (alive, send) = (alive.clone(), send.clone());
            let _ = std::thread::Builder::new()
                .name("disk-hb".into())
                .spawn(move || {
                    while alive.load(Ordering::Relaxed) {
                        std::thread::sleep(hb.interval);
                        if !alive.load(Ordering::Relaxed) || send(Kind::Heartbeat, 0, &[]).is_err()
                        {
                            break;
                        }
                    }
                });
        }
        let res = self.frames(&mut r, &send, id);
        alive.store(false, Ordering::Relaxed);
        if let Err(e) = &res {
            abort(e);
        }
        let _ = stream.shutdown(Shutdown::Both);
        res
    }

    /// The session's frame loop. Returns Ok on an orderly CLOSE.
    fn frames(
        self: &Arc<Self>,
        r: &mut channel::Reader<TcpStream>,
        send: &Sender,
        id: u64,
    ) -> Result<(), String> {
        let budget = lock(&self.inner).journal.budget();
        let mut open: Option<OpenEpoch> = None;
        let mut in_sync = false;
        // Epochs are fsync'ed in order by one thread, so reading the socket never waits
        // for the disk (a full channel does make it wait: that is the backpressure).
        let failed: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let (syncer, rx) = std::sync::mpsc::sync_channel::<Closing>(4);
        let sync_thread = {
            let (me, failed, send, stream) = (
                self.clone(),
                failed.clone(),
                send.clone(),
                r.get_ref().try_clone().map_err(|e| e.to_string())?,
            );
            std::thread::Builder::new()
                .name("disk-syncer".into())
                .spawn(move || me.sync_epochs(rx, id, &send, &failed, &stream))
                .map_err(|e| e.to_string())?
        };
        let abandon = |open: &mut Option<OpenEpoch>| {
            if let Some(o) = open.take() {
                o.abandon();
            }
        };
        let res = loop {
            let f: Received = match r.recv() {
                Ok(f) => f,
                Err(WireError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break Err(format!(
                        "the primary was silent for {:?}",
                        self.cfg.heartbeat.timeout
                    ));
                }
                Err(WireError::Closed) => break Err("the primary closed the connection".into()),
                Err(e) => break Err(e.to_string()),
            };
            if lock(&self.inner).session.as_ref().map(|s| s.id) != Some(id) {
                break Err("the session was ended here (failover or shutdown)".into());
            }
            let (kind, epoch, offset) = (f.kind(), f.epoch(), f.offset());
            // ZERO and SYNC_ZERO carry their length (8 bytes, checked by the wire layer).
            let zl = if matches!(kind, Kind::Zero | Kind::SyncZero) {
                wire::zero_len(f.payload())
            } else {
                0
            };
            let zlen = || zl;
            let step: Result<(), String> = match kind {
                Kind::Heartbeat => Ok(()),
                Kind::SyncData | Kind::SyncZero | Kind::Write | Kind::Zero if !in_sync => {
                    // Before SYNC_DONE everything goes straight to the backing, in order.
                    let len = if matches!(kind, Kind::SyncZero | Kind::Zero) {
                        zlen()
                    } else {
                        f.payload().len() as u64
                    };
                    if !self.backing.contains(offset, len) {
                        Err(format!(
                            "{kind:?} beyond the end of the disk ({offset}+{len})"
                        ))
                    } else if matches!(kind, Kind::SyncZero | Kind::Zero) {
                        self.backing
                            .zero(offset, len, true)
                            .map_err(|e| format!("writing the backing: {e}"))
                    } else {
                        self.backing
                            .write_at(f.payload(), offset, false)
                            .map_err(|e| format!("writing the backing: {e}"))
                    }
                }
                Kind::SyncDone if !in_sync => (|| {
                    self.backing
                        .flush()
                        .map_err(|e| format!("flushing the backing: {e}"))?;
                    let mut i = lock(&self.inner);
                    i.epochs.synced(epoch);
                    i.phase = Phase::Replicating;
                    self.save(&i).map_err(|e| e.to_string())?;
                    drop(i);
                    self.changed.notify_all();
                    in_sync = true;
                    tracing::info!(
                        first_epoch = epoch,
                        "the disk is in sync: holding epochs from here on"
                    );
                    send(Kind::Synced, 0, &[])
                })(),
                Kind::Write | Kind::Zero => (|| {
                    let len = if kind == Kind::Zero {
                        zlen()
                    } else {
                        f.payload().len() as u64
                    };
                    if !self.backing.contains(offset, len) {
                        return Err(format!("{kind:?} beyond the end of the disk"));
                    }
                    if open.as_ref().map(|o| o.epoch()) != Some(epoch) {
                        let mut i = lock(&self.inner);
                        if i.session.as_ref().map(|s| s.id) != Some(id) {
                            return Err("the session was ended here".into());
                        }
                        i.epochs.write(epoch).map_err(|e| e.to_string())?;
                        drop(i);
                        open = Some(budget.begin(epoch).map_err(|e| e.to_string())?);
                    }
                    match open.as_mut() {
                        Some(o) => o.append(f).map_err(|e| e.to_string()),
                        None => Err("no open epoch".into()),
                    }
                })(),
                Kind::Cut if in_sync => (|| {
                    lock(&self.inner)
                        .epochs
                        .cut(epoch)
                        .map_err(|e| e.to_string())?;
                    let o = match open.take() {
                        Some(o) => o,
                        None => budget.begin(epoch).map_err(|e| e.to_string())?,
                    };
                    let closing = o.finish(&f.header).map_err(|e| e.to_string())?;
                    // The fsync runs on the syncer thread while the next epoch arrives.
                    syncer
                        .send(closing)
                        .map_err(|_| "the journal syncer stopped".to_string())
                })(),
                Kind::Close => break Ok(()),
                Kind::Abort => {
                    break Err(format!(
                        "the primary aborted: {}",
                        String::from_utf8_lossy(f.payload())
                    ));
                }
                other => Err(format!("unexpected {other:?} frame (in sync: {in_sync})")),
            };
            if let Err(e) = step {
                break Err(e);
            }
        };
        abandon(&mut open);
        drop(syncer);
        let _ = sync_thread.join();
        // The syncer's own error is the real reason (it broke the connection to stop us).
        match lock(&failed).take() {
            Some(e) => Err(e),
            None => res,
        }
    }

    /// The syncer: fsyncs each closed epoch in order, makes it durable, answers DURABLE.
    fn sync_epochs(
        &self,
        rx: std::sync::mpsc::Receiver<Closing>,
        id: u64,
        send: &Sender,
        failed: &Mutex<Option<String>>,
        stream: &TcpStream,
    ) {
        let fail = |e: String| {
            *lock(failed) = Some(e);
            let _ = stream.shutdown(Shutdown::Both);
        };
        while let Ok(c) = rx.recv() {
            if lock(failed).is_some() {
                c.abandon();
                continue;
            }
            let epoch = c.epoch();
            let log = match c.sync() {
                Ok(l) => l,
                Err(e) => {
                    fail(e.to_string());
                    continue;
                }
            };
            {
                let mut i = lock(&self.inner);
                if i.session.as_ref().map(|s| s.id) != Some(id) {
                    // Ended (failover) while this epoch was being fsync'ed: it must not
                    // join the held epochs.
                    i.journal.budget().discard(log);
                    continue;
                }
                i.journal.insert(log);
                i.epochs.durable(epoch);
            }
            self.changed.notify_all();
            if let Err(e) = send(Kind::Durable, epoch, &[]) {
                fail(e);
            }
        }
    }

    /// Ends the current session (failover): its thread stops at its next frame and
    /// deletes the open epoch's file. Returns that open epoch, if any.
    fn end_session(&self) -> Option<u64> {
        let mut i = lock(&self.inner);
        let s = i.session.take()?;
        let _ = s.stream.shutdown(Shutdown::Both);
        tracing::info!(primary = %s.peer, "ending the primary's session");
        i.epochs.drop_open()
    }

    /// Blocks until epoch `n` is durable, the session is lost, or `timeout` passes.
    pub fn durable(&self, n: u64, timeout: Duration) -> Result<(), BackupError> {
        let t = Instant::now();
        let mut i = lock(&self.inner);
        loop {
            if i.epochs.in_sync && i.epochs.is_durable(n) {
                return Ok(());
            }
            if !matches!(i.phase, Phase::Syncing | Phase::Replicating) {
                let reason = match &i.phase {
                    Phase::Lost(r) => r.clone(),
                    p => p.word().to_string(),
                };
                return Err(BackupError::Lost { epoch: n, reason });
            }
            let left = timeout.saturating_sub(t.elapsed());
            if left.is_zero() {
                return Err(BackupError::Timeout {
                    epoch: n,
                    waited: timeout,
                });
            }
            i = self
                .changed
                .wait_timeout(i, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn merge(&self, n: u64) -> Result<(), BackupError> {
        let mut i = lock(&self.inner);
        i.epochs.merge(n)?;
        self.save(&i)?;
        Ok(())
    }

    /// Applies epochs `from..=to` (already recorded as committed). Call with `applying`.
    /// With `flush` the backing is fsync'ed and the state recorded before returning
    /// (failover, replay); otherwise the flusher does that soon.
    fn apply_range(&self, from: u64, to: u64, flush: bool) -> Result<ApplyReport, BackupError> {
        let logs = lock(&self.inner).journal.take(from, to)?;
        let t = Instant::now();
        let obs = Observer { b: self };
        let mut bytes = 0;
        let res = (|| -> Result<(), BackupError> {
            for l in &logs {
                bytes += journal::apply(l, &self.backing, &obs)?;
            }
            if flush {
                self.backing.flush().map_err(BackupError::Flush)?;
            }
            Ok(())
        })();
        let mut i = lock(&self.inner);
        if let Err(e) = res {
            // Keep the epochs: a later commit (or a restart) applies them again.
            i.last_error = Some(e.to_string());
            i.journal.put_back(logs);
            tracing::error!(error = %e, from, to, "applying epochs failed; they stay in the journal");
            return Err(e);
        }
        if to > i.epochs.applied {
            i.epochs.applied(to);
        }
        i.applied_bytes_total += bytes;
        i.apply_secs_total += t.elapsed().as_secs_f64();
        let applied: Vec<u64> = logs.iter().map(|l: &EpochLog| l.epoch).collect();
        if flush {
            i.flushed = i.epochs.applied;
            let mut done = std::mem::take(&mut i.unflushed);
            i.unflushed_bytes = 0;
            done.extend(logs);
            self.save(&i)?;
            i.journal.remove(&done);
        } else {
            i.unflushed_bytes += logs.iter().map(|l| l.bytes).sum::<u64>();
            i.unflushed.extend(logs);
            drop(i);
            self.changed.notify_all();
        }
        Ok(ApplyReport {
            epoch: to,
            applied,
            bytes,
        })
    }

    /// commit(N): every epoch <= N onto the backing (N: a durable failover point).
    pub fn commit(&self, n: u64) -> Result<ApplyReport, BackupError> {
        let _a = lock(&self.applying);
        let plan = {
            let mut i = lock(&self.inner);
            if i.phase == Phase::Exported {
                return Err(BackupError::State(
                    "this backup failed over: nothing to commit".into(),
                ));
            }
            let plan = i.epochs.plan_commit(n)?;
            if plan.is_empty() {
                return Ok(ApplyReport {
                    epoch: i.epochs.applied,
                    ..Default::default()
                });
            }
            // The decision is durable before the first byte is applied.
            i.epochs.committing(plan.to);
            self.save(&i)?;
            plan
        };
        self.apply_range(plan.from, plan.to, false)
    }

    /// failover(N): end the session, apply <= N, discard the rest, then export the disk.
    pub fn failover(&self, n: u64) -> Result<FailoverReport, BackupError> {
        let _a = lock(&self.applying);
        {
            // Refuse before touching the session: a refused failover must not cost the
            // primary its backup.
            let i = lock(&self.inner);
            if i.phase == Phase::Exported {
                return Err(BackupError::State("this backup already failed over".into()));
            }
            i.epochs.plan_failover(n)?;
        }
        let open = self.end_session();
        let plan = {
            let mut i = lock(&self.inner);
            let plan = i.epochs.plan_failover(n)?;
            let upto = plan.to.max(i.epochs.applied);
            i.epochs.committing(upto);
            self.save(&i)?;
            plan
        };
        let r = self.apply_range(plan.from, plan.to, true)?;
        let discarded = {
            let mut i = lock(&self.inner);
            let mut gone = i.journal.discard_above(n);
            gone.extend(open.filter(|o| !gone.contains(o)));
            i.epochs.discard_above(n);
            i.phase = Phase::Exported;
            self.save(&i)?;
            gone
        };
        self.changed.notify_all();
        tracing::warn!(checkpoint = n, applied = ?r.applied, discarded = ?discarded, "FAILOVER: the disk is at checkpoint {n}");
        let device = self.start_export()?;
        Ok(FailoverReport {
            epoch: n,
            applied: r.applied,
            discarded,
            bytes: r.bytes,
            device,
        })
    }

    fn start_export(&self) -> Result<Option<String>, BackupError> {
        let Some(spec) = &self.cfg.export else {
            return Ok(None);
        };
        let t = DiskTarget::new(self.backing.clone(), None);
        let e = export::start(
            t.clone(),
            spec,
            &self.cfg.name,
            &format!("remus-disk:{}", self.cfg.name),
        )?;
        let dev = e.device.clone();
        tracing::info!(device = %dev, takeover = e.takeover, "serving the failed-over disk");
        let mut i = lock(&self.inner);
        i.export = Some(e);
        i.target = Some(t);
        Ok(Some(dev))
    }

    /// Forgets a lost session's disk state: the next primary syncs from scratch.
    pub fn discard(&self) -> Result<Vec<u64>, BackupError> {
        let _a = lock(&self.applying);
        let mut i = lock(&self.inner);
        match i.phase {
            Phase::Waiting | Phase::Lost(_) => {}
            ref p => {
                return Err(BackupError::State(format!(
                    "cannot discard while {}",
                    p.word()
                )));
            }
        }
        let gone = i.journal.discard_above(0);
        let stale = std::mem::take(&mut i.unflushed);
        i.journal.remove(&stale);
        i.unflushed_bytes = 0;
        i.flushed = 0;
        i.epochs.reset();
        i.phase = Phase::Waiting;
        self.save(&i)?;
        tracing::info!(discarded = ?gone, "disk state discarded: waiting for a primary (a full sync follows)");
        Ok(gone)
    }

    pub fn status(&self) -> DiskStatus {
        let i = lock(&self.inner);
        let (reads, writes, write_bytes, flushes, errs) =
            i.target.as_ref().map_or((0, 0, 0, 0, 0), |t| {
                (
                    t.io.reads.load(Ordering::Relaxed),
                    t.io.writes.load(Ordering::Relaxed),
                    t.io.write_bytes.load(Ordering::Relaxed),
                    t.io.flushes.load(Ordering::Relaxed),
                    t.io.errors.load(Ordering::Relaxed),
                )
            });
        DiskStatus {
            role: "backup".into(),
            pid: std::process::id(),
            name: self.cfg.name.clone(),
            state: i.phase.word().into(),
            backing: self.backing.path().display().to_string(),
            size: self.backing.size(),
            device: i.export.as_ref().map(|e| e.device.clone()),
            takeover: i.export.as_ref().is_some_and(|e| e.takeover),
            connections: i
                .export
                .as_ref()
                .map_or(0, |e| e.connections.load(Ordering::Relaxed)),
            listen: Some(self.cfg.listen.clone()),
            peer: i.session.as_ref().map(|s| s.peer.clone()),
            in_sync: Some(i.epochs.in_sync),
            applied: Some(i.epochs.applied),
            flushed: Some(i.flushed),
            committed: Some(i.epochs.committed),
            durable: Some(i.epochs.durable),
            open: i.epochs.open,
            merged: i.epochs.merged.iter().copied().collect(),
            held_epochs: i.journal.held_epochs(),
            journal_bytes: Some(i.journal.held_bytes()),
            ram_bytes: Some(i.journal.ram_bytes()),
            sessions_total: Some(i.sessions_total),
            applied_bytes_total: Some(i.applied_bytes_total),
            apply_seconds_total: Some(i.apply_secs_total),
            replayed_epochs: i.replayed.clone(),
            last_error: match &i.phase {
                Phase::Lost(r) => Some(r.clone()),
                _ => i.last_error.clone(),
            },
            fault_stalled: self.stalled.load(Ordering::SeqCst),
            reads,
            writes,
            write_bytes,
            flushes,
            io_errors: errs,
            since_unix: i.since,
            ..Default::default()
        }
    }
}

impl Handler for Backup {
    fn handle(&self, req: Request) -> Response {
        let err = |e: BackupError| Response::error(e.kind(), e);
        match req {
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Durable { epoch, timeout_ms } => {
                match self.durable(epoch, Duration::from_millis(timeout_ms)) {
                    Ok(()) => Response::Durable { epoch },
                    Err(e) => err(e),
                }
            }
            Request::Merge { epoch } => match self.merge(epoch) {
                Ok(()) => Response::Ok,
                Err(e) => err(e),
            },
            Request::Commit { epoch } => match self.commit(epoch) {
                Ok(r) => Response::Applied(r),
                Err(e) => err(e),
            },
            Request::Failover { epoch } => match self.failover(epoch) {
                Ok(r) => Response::FailedOver(r),
                Err(e) => err(e),
            },
            Request::Discard => match self.discard() {
                Ok(_) => Response::Ok,
                Err(e) => err(e),
            },
            Request::Cut | Request::WaitSync { .. } => Response::error(
                ErrorKind::WrongRole,
                "this is a backup (disk receive): cut and wait-sync are primary operations",
            ),
        }
    }
}
