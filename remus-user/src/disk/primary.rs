//! The primary's write path (protocol D): every write goes to the local backing at once,
//! is answered to the kernel, and is streamed in order, tagged with its disk epoch, to the
//! backup. `cut()` closes the epoch at the checkpoint's proven suspend point.
//!
//! Owns: the export's [`DiskTarget`] (local I/O plus the order lock that makes the local
//! order, the stream order and the epoch boundaries one order), the bounded send queue
//! and its backpressure, the sender and the backup-reader threads, the initial
//! synchronisation. Never touches: the NBD protocol (the server calls the target), the
//! control socket, netlink.
//!
//! ```text
//!  NBD conn ─► reserve(len)  (blocks while the queue is over its cap: backpressure)
//!           ─► lock(order) { pwrite local; push WRITE{epoch,off,data} } ─► reply
//!  cut()    ─► lock(order) { push CUT{epoch}; epoch += 1 }           (returns the closed N)
//!  sync     ─► read a chunk unlocked; lock(order) { if no write touched it: push SYNC_DATA }
//!  sender   ─► pops in order, heads and seals each frame in place, writev to the backup
//!  reader   ─► SYNCED, DURABLE{N}, HEARTBEAT, ABORT; silence past the timeout = lost
//! ```
//!
//! A full queue slows the guest; nothing is ever dropped or reordered while the backup is
//! there. When it is lost (error, ABORT, silence), the queue is emptied, writers are
//! released, `cut()` fails with [`CutError::Lost`], and the guest runs unprotected.
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::backing::Backing;
use super::channel::{self, ROOM};
use super::nbd::server::{Target, WriteBuf, write_all_vectored};
use super::wire::{Kind, WireError};
use crate::relay::Heartbeat;
use crate::replication::Sealer;

/// Bytes of one initial-synchronisation read.
pub const SYNC_CHUNK: usize = 1 << 20;
/// Largest batch the sender writes in one go.
const MAX_BATCH_BYTES: usize = 8 << 20;
/// iovecs per writev (IOV_MAX is 1024).
const MAX_IOV: usize = 512;
/// Small writes are gathered for up to this long before being sent (a guest's 4 KiB
/// writes would otherwise cost a wake-up and a send each). The guest never waits for
/// it; a CUT is sent at once.
const LINGER: Duration = Duration::from_micros(250);
const LINGER_BYTES: usize = 256 << 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CutError {
    #[error("the backup is lost ({0}): the guest runs unprotected; nothing to cut")]
    Lost(String),
    #[error(
        "the backup's disk is not in sync yet ({copied} of {total} bytes copied): \
         checkpoints cannot start before it is"
    )]
    NotInSync { copied: u64, total: u64 },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One frame waiting to be sent: a `channel` buffer (room, then the payload); the
/// sender heads and seals it in place.
struct Item {
    kind: Kind,
    epoch: u64,
    offset: u64,
    frame: Vec<u8>,
}

/// A `channel` buffer holding a copy of `payload` (small payloads; rare large ones).
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut v = channel::buffer(payload.len());
    v.extend_from_slice(payload);
    v
}

struct Queue {
    items: VecDeque<Item>,
    bytes: usize,
    lost: Option<String>,
    /// A CUT or SYNC_DONE is queued: send without lingering.
    urgent: bool,
    /// The sender is lingering for more small writes (pushes need not wake it).
    lingering: bool,
}

/// What the backup told us.
#[derive(Default)]
struct Progress {
    in_sync: bool,
    durable: u64,
    lost: Option<String>,
}

/// Counters shown by `status`.
#[derive(Default)]
pub struct Counters {
    pub sync_copied: AtomicU64,
    pub sync_zeroed: AtomicU64,
    pub sent_frames: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub backpressure_waits: AtomicU64,
    pub backpressure_us: AtomicU64,
}

/// The stream to the backup: queue, threads, what the backup acknowledged.
pub struct Replicator {
    q: Mutex<Queue>,
    more: Condvar,
    space: Condvar,
    cap: usize,
    progress: Mutex<Progress>,
    changed: Condvar,
    stream: TcpStream,
    /// Seals every frame to the backup (only the sender thread sends).
    sealer: Sealer,
    /// The backup's frames, opened (taken by the reader thread at start).
    reader: Mutex<Option<channel::Reader<TcpStream>>>,
    heartbeat: Heartbeat,
    pub peer: String,
    pub counters: Counters,
    sync_started: Mutex<Option<Instant>>,
    sync_secs: Mutex<Option<f64>>,
}

impl Replicator {
    /// Wraps an authenticated, greeted connection: its socket, the session's sealer and
    /// the reader that opened the backup's frames so far. Threads start with
    /// [`Replicator::start`].
    pub fn new(
        stream: TcpStream,
        sealer: Sealer,
        reader: channel::Reader<TcpStream>,
        peer: String,
        heartbeat: Heartbeat,
        cap: usize,
    ) -> Arc<Replicator> {
        Arc::new(Replicator {
            q: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                lost: None,
                urgent: false,
                lingering: false,
            }),
            more: Condvar::new(),
            space: Condvar::new(),
            cap: cap.max(1 << 20),
            progress: Mutex::new(Progress::default()),
            changed: Condvar::new(),
            stream,
            sealer,
            reader: Mutex::new(Some(reader)),
            heartbeat,
            peer,
            counters: Counters::default(),
            sync_started: Mutex::new(None),
            sync_secs: Mutex::new(None),
        })
    }

    /// Blocks while the queue holds more than the cap (the sync uses half of it, so guest
    /// writes always find room first). Returns at once when the backup is lost.
    fn reserve(&self, len: usize, sync: bool) {
        let cap = if sync { self.cap / 2 } else { self.cap };
        let mut q = lock(&self.q);
        if q.lost.is_some() || q.bytes == 0 || q.bytes + len <= cap {
            return;
        }
        let t = Instant::now();
        while q.lost.is_none() && q.bytes > 0 && q.bytes + len > cap {
            q = self.space.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        self.counters
            .backpressure_waits
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .backpressure_us
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// Queues a frame, `frame` being a `channel` buffer (call with the order lock held).
    /// Dropped when the backup is lost.
    fn push(&self, kind: Kind, epoch: u64, offset: u64, frame: Vec<u8>) {
        let mut q = lock(&self.q);
        if q.lost.is_some() {
            return;
        }
        q.bytes += frame.len() - ROOM;
        let urgent = matches!(kind, Kind::Cut | Kind::SyncDone);
        q.urgent |= urgent;
        let wake = if q.lingering {
            urgent || q.bytes >= LINGER_BYTES
        } else {
            q.items.is_empty()
        };
        q.items.push_back(Item {
            kind,
            epoch,
            offset,
            frame,
        });
        drop(q);
        if wake {
            self.more.notify_one();
        }
    }

    /// The backup is gone: release everything, stop the threads.
    pub fn lose(&self, reason: String) {
        {
            let mut q = lock(&self.q);
            if q.lost.is_some() {
                return;
            }
            q.lost = Some(reason.clone());
            q.items.clear();
            q.bytes = 0;
        }
        self.more.notify_all();
        self.space.notify_all();
        {
            let mut p = lock(&self.progress);
            p.lost = Some(reason.clone());
        }
        self.changed.notify_all();
        let _ = self.stream.shutdown(Shutdown::Both);
        tracing::error!(backup = %self.peer, %reason, "BACKUP LOST: disk replication stopped, the guest's disk is UNPROTECTED");
    }

    pub fn lost(&self) -> Option<String> {
        lock(&self.q).lost.clone()
    }

    pub fn in_sync(&self) -> bool {
        lock(&self.progress).in_sync
    }

    pub fn durable(&self) -> u64 {
        lock(&self.progress).durable
    }

    pub fn queued_bytes(&self) -> usize {
        lock(&self.q).bytes
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    pub fn sync_seconds(&self) -> Option<f64> {
        *lock(&self.sync_secs)
    }

    /// Blocks until `done` holds for what the backup said (Ok(true)), the timeout passes
    /// (Ok(false)) or the backup is lost (Err: the reason).
    fn wait_progress(
        &self,
        timeout: Duration,
        done: impl Fn(&Progress) -> bool,
    ) -> Result<bool, String> {
        let end = Instant::now() + timeout;
        let mut p = lock(&self.progress);
        loop {
            if done(&p) {
                return Ok(true);
            }
            if let Some(l) = &p.lost {
                return Err(l.clone());
            }
            let now = Instant::now();
            if now >= end {
                return Ok(false);
            }
            p = self
                .changed
                .wait_timeout(p, end - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Blocks until the backup's disk is in sync (Ok(true)), the timeout passes
    /// (Ok(false)) or the backup is lost (Err).
    pub fn wait_sync(&self, timeout: Duration) -> Result<bool, String> {
        self.wait_progress(timeout, |p| p.in_sync && p.lost.is_none())
    }

    /// Blocks until the backup reported epoch `n` durable (Ok(true)), the timeout passed
    /// (Ok(false)) or the backup is lost.
    pub fn wait_durable(&self, n: u64, timeout: Duration) -> Result<bool, String> {
        self.wait_progress(timeout, |p| p.durable >= n)
    }

    /// Starts the sender and the backup reader.
    pub fn start(self: &Arc<Self>) -> io::Result<()> {
        let reader = lock(&self.reader).take().ok_or_else(|| {
            io::Error::new(io::ErrorKind::AlreadyExists, "the replicator was started")
        })?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("disk-sender".into())
            .spawn(move || me.send_loop())?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("disk-acks".into())
            .spawn(move || me.read_loop(reader))?;
        Ok(())
    }

    fn send_loop(self: Arc<Self>) {
        let _ = super::sys::io_flusher();
        let mut w = &self.stream;
        loop {
            let mut batch: Vec<Item> = {
                let mut q = lock(&self.q);
                loop {
                    if q.lost.is_some() {
                        return;
                    }
                    if !q.items.is_empty() {
                        break;
                    }
                    let (g, t) = self
                        .more
                        .wait_timeout(q, self.heartbeat.interval)
                        .unwrap_or_else(|e| e.into_inner());
                    q = g;
                    if t.timed_out() && q.items.is_empty() && q.lost.is_none() {
                        break;
                    }
                }
                // Linger briefly while only a few small writes are queued.
                if !q.items.is_empty() && !q.urgent && q.bytes < LINGER_BYTES {
                    let until = Instant::now() + LINGER;
                    q.lingering = true;
                    while q.lost.is_none() && !q.urgent && q.bytes < LINGER_BYTES {
                        let now = Instant::now();
                        if now >= until {
                            break;
                        }
                        q = self
                            .more
                            .wait_timeout(q, until - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    q.lingering = false;
                }
                let mut out = Vec::new();
                let mut bytes = 0usize;
                while let Some(it) = q.items.pop_front() {
                    bytes += it.frame.len() - ROOM;
                    out.push(it);
                    if bytes >= MAX_BATCH_BYTES || out.len() >= MAX_IOV {
                        break;
                    }
                }
                q.urgent = q
                    .items
                    .iter()
                    .any(|i| matches!(i.kind, Kind::Cut | Kind::SyncDone));
                out
            };
            if batch.is_empty() {
                if let Err(e) = channel::send(&self.sealer, &mut w, Kind::Heartbeat, 0, 0, &[]) {
                    self.lose(format!("sending a heartbeat: {e}"));
                    return;
                }
                continue;
            }
            // Head and seal in place (the encryption is the one pass over the data).
            let (mut bytes, mut wire_bytes) = (0usize, 0usize);
            for it in &mut batch {
                bytes += it.frame.len() - ROOM;
                channel::head(&mut it.frame, it.kind, it.epoch, it.offset);
                if let Err(e) = channel::seal(&self.sealer, &mut it.frame) {
                    self.lose(format!("sealing a frame: {e}"));
                    return;
                }
                wire_bytes += it.frame.len();
            }
            let mut iov: Vec<IoSlice<'_>> =
                batch.iter().map(|it| IoSlice::new(&it.frame)).collect();
            if let Err(e) = write_all_vectored(&mut w, &mut iov) {
                self.lose(format!("sending to the backup: {e}"));
                return;
            }
            self.counters
                .sent_frames
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            self.counters
                .sent_bytes
                .fetch_add(wire_bytes as u64, Ordering::Relaxed);
            {
                let mut q = lock(&self.q);
                q.bytes = q.bytes.saturating_sub(bytes);
            }
            self.space.notify_all();
        }
    }

    fn read_loop(self: Arc<Self>, mut r: channel::Reader<TcpStream>) {
        if let Err(e) = r.get_ref().set_read_timeout(Some(self.heartbeat.timeout)) {
            self.lose(format!("setting the read timeout: {e}"));
            return;
        }
        loop {
            match r.recv() {
                Ok(f) => match f.kind() {
                    Kind::Heartbeat => {}
                    Kind::Synced => {
                        if let Some(t) = *lock(&self.sync_started) {
                            *lock(&self.sync_secs) = Some(t.elapsed().as_secs_f64());
                        }
                        lock(&self.progress).in_sync = true;
                        self.changed.notify_all();
                        tracing::info!(backup = %self.peer, "the backup's disk is in sync: checkpoints may start");
                    }
                    Kind::Durable => {
                        let mut p = lock(&self.progress);
                        p.durable = p.durable.max(f.epoch());
                        drop(p);
                        self.changed.notify_all();
                    }
                    Kind::Abort => {
                        self.lose(format!(
                            "the backup aborted: {}",
                            String::from_utf8_lossy(f.payload())
                        ));
                        return;
                    }
                    Kind::Close => {
                        self.lose("the backup closed the session".into());
                        return;
                    }
                    other => {
                        self.lose(format!("unexpected {other:?} frame from the backup"));
                        return;
                    }
                },
                Err(WireError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    self.lose(format!(
                        "the backup was silent for {:?}",
                        self.heartbeat.timeout
                    ));
                    return;
                }
                Err(WireError::Closed) => {
                    self.lose("the backup closed the connection".into());
                    return;
                }
                Err(e) => {
                    self.lose(e.to_string());
                    return;
                }
            }
        }
    }
}

/// The order lock's state: the open epoch and the initial sync's current window.
struct Order {
    epoch: u64,
    window: Option<(u64, u64)>,
    dirty: bool,
}

impl Order {
    fn touch(&mut self, offset: u64, len: u64) {
        if let Some((s, e)) = self.window
            && offset < e
            && offset + len > s
        {
            self.dirty = true;
        }
    }
}

/// Counters of the export.
#[derive(Default)]
pub struct IoCounters {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub zeroes: AtomicU64,
    pub errors: AtomicU64,
}

/// What the NBD connections serve: the backing, and the backup if there is one.
pub struct DiskTarget {
    backing: Arc<Backing>,
    order: Mutex<Order>,
    repl: Option<Arc<Replicator>>,
    pub io: IoCounters,
    syncing: AtomicBool,
}

impl DiskTarget {
    pub fn new(backing: Arc<Backing>, repl: Option<Arc<Replicator>>) -> Arc<DiskTarget> {
        Arc::new(DiskTarget {
            backing,
            order: Mutex::new(Order {
                epoch: 1,
                window: None,
                dirty: false,
            }),
            repl,
            io: IoCounters::default(),
            syncing: AtomicBool::new(false),
        })
    }

    pub fn backing(&self) -> &Arc<Backing> {
        &self.backing
    }

    pub fn replicator(&self) -> Option<&Arc<Replicator>> {
        self.repl.as_ref()
    }

    /// The open disk epoch.
    pub fn epoch(&self) -> u64 {
        lock(&self.order).epoch
    }

    pub fn syncing(&self) -> bool {
        self.syncing.load(Ordering::Relaxed)
    }

    /// Closes the open epoch; returns its number. Fails (nothing cut) when the backup is
    /// lost or not in sync yet. Without a backup it only counts.
    pub fn cut(&self) -> Result<u64, CutError> {
        let mut o = lock(&self.order);
        if let Some(r) = &self.repl {
            if let Some(l) = r.lost() {
                return Err(CutError::Lost(l));
            }
            if !r.in_sync() {
                return Err(CutError::NotInSync {
                    copied: r.counters.sync_copied.load(Ordering::Relaxed)
                        + r.counters.sync_zeroed.load(Ordering::Relaxed),
                    total: self.backing.size(),
                });
            }
            r.push(Kind::Cut, o.epoch, 0, channel::buffer(0));
        }
        let closed = o.epoch;
        o.epoch += 1;
        Ok(closed)
    }

    /// Queues a write's data as WRITE frames: in place when it arrived behind the
    /// channel's room and fits one frame, else copied into frames of at most
    /// `channel::MAX_DATA` bytes (all in the same epoch, in order).
    fn push_write(r: &Replicator, epoch: u64, offset: u64, data: WriteBuf) {
        let (buf, room) = data.into_parts();
        if room == ROOM && buf.len() - room <= channel::MAX_DATA {
            r.push(Kind::Write, epoch, offset, buf);
            return;
        }
        for (i, c) in buf[room..].chunks(channel::MAX_DATA).enumerate() {
            let at = offset + (i * channel::MAX_DATA) as u64;
            r.push(Kind::Write, epoch, at, framed(c));
        }
    }

    /// A local write failed: stream what the range holds now, so both sides stay equal.
    fn push_readback(&self, r: &Replicator, epoch: u64, offset: u64, len: usize) {
        let mut cur = vec![0u8; len];
        match self.backing.read_at(&mut cur, offset) {
            Ok(()) => Self::push_write(r, epoch, offset, WriteBuf::from_vec(cur)),
            Err(e) => r.lose(format!(
                "local I/O error at offset {offset} and its range cannot be read back ({e}): \
                 the backup could differ"
            )),
        }
    }

    /// The initial synchronisation: every data extent in chunks, holes as zero ranges,
    /// interleaved with live writes on the same ordered stream; then SYNC_DONE.
    pub fn start_sync(self: &Arc<Self>) -> io::Result<()> {
        let me = self.clone();
        self.syncing.store(true, Ordering::Relaxed);
        std::thread::Builder::new()
            .name("disk-sync".into())
            .spawn(move || {
                let _ = super::sys::io_flusher();
                if let Some(r) = me.repl.clone() {
                    *lock(&r.sync_started) = Some(Instant::now());
                    if let Err(e) = me.sync(&r) {
                        r.lose(format!("initial synchronisation: reading the backing: {e}"));
                    }
                }
                me.syncing.store(false, Ordering::Relaxed);
            })?;
        Ok(())
    }

    fn sync(&self, r: &Replicator) -> io::Result<()> {
        let size = self.backing.size();
        let mut pos = 0u64;
        while pos < size {
            if r.lost().is_some() {
                return Ok(());
            }
            // Where the next data lies is decided under the order lock, and the hole
            // before it is queued under the same lock: a guest write into the hole is
            // then queued after it, never before.
            let (start, end) = {
                let _o = lock(&self.order);
                let (start, end) = self.backing.next_data(pos)?.unwrap_or((size, size));
                if start > pos {
                    r.push(Kind::SyncZero, 0, pos, framed(&(start - pos).to_le_bytes()));
                    r.counters
                        .sync_zeroed
                        .fetch_add(start - pos, Ordering::Relaxed);
                }
                (start, end)
            };
            let mut at = start;
            while at < end {
                let n = ((end - at) as usize).min(SYNC_CHUNK);
                r.reserve(n, true);
                // Read behind the channel's room: the chunk is sent from this buffer.
                let mut buf = channel::buffer(n);
                buf.resize(ROOM + n, 0);
                let mut tries = 0;
                loop {
                    if r.lost().is_some() {
                        return Ok(());
                    }
                    tries += 1;
                    {
                        let mut o = lock(&self.order);
                        o.window = Some((at, at + n as u64));
                        o.dirty = false;
                        if tries > 3 {
                            // A hot range: read it under the lock this time.
                            self.backing.read_at(&mut buf[ROOM..], at)?;
                            self.push_sync(r, &mut o, at, buf);
                            break;
                        }
                    }
                    self.backing.read_at(&mut buf[ROOM..], at)?;
                    let mut o = lock(&self.order);
                    if !o.dirty {
                        self.push_sync(r, &mut o, at, buf);
                        break;
                    }
                }
                at += n as u64;
            }
            pos = end.max(pos + 1);
        }
        let o = lock(&self.order);
        r.push(Kind::SyncDone, o.epoch, 0, channel::buffer(0));
        Ok(())
    }

    /// Queues one chunk read at `at` (`frame`: a `channel` buffer): as SYNC_ZERO if it
    /// reads zeroes, else as SYNC_DATA from the buffer it was read into.
    fn push_sync(&self, r: &Replicator, o: &mut MutexGuard<'_, Order>, at: u64, frame: Vec<u8>) {
        o.window = None;
        let n = (frame.len() - ROOM) as u64;
        if channel::payload(&frame).iter().all(|&b| b == 0) {
            r.push(Kind::SyncZero, 0, at, framed(&n.to_le_bytes()));
            r.counters.sync_zeroed.fetch_add(n, Ordering::Relaxed);
        } else {
            r.push(Kind::SyncData, 0, at, frame);
            r.counters.sync_copied.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn zero_like(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        trim: bool,
        may_punch: bool,
    ) -> io::Result<()> {
        let res = {
            let mut o = lock(&self.order);
            let res = if trim {
                self.backing.trim(offset, len)
            } else {
                self.backing.zero(offset, len, may_punch).map(|()| true)
            };
            o.touch(offset, len);
            if let Some(r) = &self.repl {
                match &res {
                    Ok(true) => r.push(Kind::Zero, o.epoch, offset, framed(&len.to_le_bytes())),
                    Ok(false) => {}
                    Err(_) => {
                        if len <= super::nbd::MAX_REQUEST as u64 {
                            self.push_readback(r, o.epoch, offset, len as usize)
                        } else {
                            r.lose(format!("local error zeroing {len} bytes at {offset}"))
                        }
                    }
                }
            }
            res
        };
        self.io.zeroes.fetch_add(1, Ordering::Relaxed);
        res?;
        if fua {
            self.backing.flush()?;
        }
        Ok(())
    }
}

impl Target for DiskTarget {
    fn size(&self) -> u64 {
        self.backing.size()
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.io.reads.fetch_add(1, Ordering::Relaxed);
        self.io
            .read_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.backing.read_at(buf, offset)
    }

    fn write_room(&self) -> (usize, usize) {
        match self.repl {
            Some(_) => (ROOM, channel::TAIL),
            None => (0, 0),
        }
    }

    fn write(&self, data: WriteBuf, offset: u64, fua: bool) -> io::Result<()> {
        let len = data.len();
        if let Some(r) = &self.repl {
            r.reserve(len, false);
        }
        let res = {
            let mut o = lock(&self.order);
            let res = self.backing.write_at(data.data(), offset, false);
            o.touch(offset, len as u64);
            if let Some(r) = &self.repl {
                match &res {
                    Ok(()) => Self::push_write(r, o.epoch, offset, data),
                    Err(_) => self.push_readback(r, o.epoch, offset, len),
                }
            }
            res
        };
        self.io.writes.fetch_add(1, Ordering::Relaxed);
        self.io.write_bytes.fetch_add(len as u64, Ordering::Relaxed);
        if res.is_err() {
            self.io.errors.fetch_add(1, Ordering::Relaxed);
        }
        res?;
        if fua {
            self.backing.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.io.flushes.fetch_add(1, Ordering::Relaxed);
        self.backing.flush()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.zero_like(offset, len, fua, true, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_punch: bool) -> io::Result<()> {
        self.zero_like(offset, len, fua, false, may_punch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn hb() -> Heartbeat {
        Heartbeat::new(Duration::from_millis(100), Duration::from_secs(5)).unwrap()
    }

    /// The backup's end of the sealed channel, played by the test (a fake backup, named
    /// so: it only reads frames and answers SYNCED).
    struct FakeBackup {
        r: channel::Reader<TcpStream>,
        w: TcpStream,
        sealer: Sealer,
    }

    impl FakeBackup {
        fn next(&mut self) -> channel::Received {
            self.r.recv().unwrap()
        }

        /// Reads frames until SYNC_DONE, answers SYNCED; returns the frames read.
        fn sync(&mut self) -> Vec<channel::Received> {
            let mut got = Vec::new();
            loop {
                let f = self.next();
                let done = f.kind() == Kind::SyncDone;
                got.push(f);
                if done {
                    channel::send(&self.sealer, &mut self.w, Kind::Synced, 0, 0, &[]).unwrap();
                    return got;
                }
            }
        }
    }

    /// A primary target on a temp file, replicating to a socket the test plays the
    /// backup on.
    fn setup(size: u64, cap: usize) -> (tempfile::TempDir, Arc<DiskTarget>, FakeBackup) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p.img");
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let (pk, bk) = crate::replication::seal::test_pair(crate::replication::seal::LIMITS);
        let reader = channel::Reader::new(c.try_clone().unwrap(), pk.opener);
        let r = Replicator::new(c, pk.sealer, reader, "fake".into(), hb(), cap);
        r.start().unwrap();
        let t = DiskTarget::new(Arc::new(Backing::open(&p).unwrap()), Some(r));
        let fake = FakeBackup {
            r: channel::Reader::new(b.try_clone().unwrap(), bk.opener),
            w: b,
            sealer: bk.sealer,
        };
        (d, t, fake)
    }

    fn write(t: &DiskTarget, data: Vec<u8>, offset: u64) {
        t.write(WriteBuf::from_vec(data), offset, false).unwrap();
    }

    #[test]
    fn the_stream_carries_writes_in_local_order_between_cuts() {
        let (_d, t, mut b) = setup(1 << 20, 8 << 20);
        assert!(matches!(t.cut(), Err(CutError::NotInSync { .. })));
        t.start_sync().unwrap();
        b.sync();
        let r = t.replicator().unwrap().clone();
        assert!(r.wait_sync(Duration::from_secs(10)).unwrap());
        // Two writers on overlapping ranges, cuts in between.
        let threads: Vec<_> = (0..2u8)
            .map(|k| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..50u64 {
                        write(&t, vec![k * 100 + (i % 100) as u8; 4096], (i % 8) * 2048);
                    }
                })
            })
            .collect();
        let mut cuts = Vec::new();
        for _ in 0..3 {
            cuts.push(t.cut().unwrap());
            std::thread::sleep(Duration::from_millis(2));
        }
        for th in threads {
            th.join().unwrap();
        }
        cuts.push(t.cut().unwrap());
        assert_eq!(cuts, vec![1, 2, 3, 4]);
        // Replaying the stream gives the primary's image, and every write sits in the
        // epoch of the cut that follows it.
        let mut img = vec![0u8; 1 << 20];
        let mut epoch = 1;
        loop {
            let f = b.next();
            match f.kind() {
                Kind::Write => {
                    assert_eq!(f.epoch(), epoch);
                    let at = f.offset() as usize;
                    img[at..at + f.payload().len()].copy_from_slice(f.payload());
                }
                Kind::Cut => {
                    assert_eq!(f.epoch(), epoch);
                    if epoch == 4 {
                        break;
                    }
                    epoch += 1;
                }
                Kind::Heartbeat => {}
                other => panic!("{other:?}"),
            }
        }
        let mut local = vec![0u8; 1 << 20];
        t.backing().read_at(&mut local, 0).unwrap();
        assert!(img == local, "the stream replays to the local image");
    }

    #[test]
    fn a_full_queue_holds_writers_until_the_backup_is_lost() {
        let (_d, t, mut b) = setup(64 << 20, 1 << 20);
        t.start_sync().unwrap();
        b.sync();
        let r = t.replicator().unwrap().clone();
        r.wait_sync(Duration::from_secs(10)).unwrap();
        // The fake backup stops reading: socket buffers fill, then the 1 MiB queue.
        let writer = {
            let t = t.clone();
            std::thread::spawn(move || {
                for i in 0..256u64 {
                    write(&t, vec![7u8; 1 << 20], (i % 64) << 20);
                }
            })
        };
        let t0 = Instant::now();
        while r.counters.backpressure_waits.load(Ordering::Relaxed) == 0
            && t0.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!writer.is_finished(), "writes wait for queue space");
        assert!(
            r.queued_bytes() <= 2 << 20,
            "the cap holds: {}",
            r.queued_bytes()
        );
        r.lose("test: backup gone".into());
        writer.join().unwrap();
        assert!(matches!(t.cut(), Err(CutError::Lost(_))));
        assert_eq!(r.queued_bytes(), 0, "the queue is released");
        drop(b);
    }

    #[test]
    fn a_write_larger_than_one_sealed_frame_goes_as_several_in_its_epoch() {
        let (_d, t, mut b) = setup(32 << 20, 64 << 20);
        t.start_sync().unwrap();
        b.sync();
        let r = t.replicator().unwrap().clone();
        assert!(r.wait_sync(Duration::from_secs(10)).unwrap());
        let big: Vec<u8> = (0..channel::MAX_DATA * 2 + 4096)
            .map(|i| (i % 253) as u8)
            .collect();
        write(&t, big.clone(), 4096);
        assert_eq!(t.cut().unwrap(), 1);
        let mut got = Vec::new();
        loop {
            let f = b.next();
            match f.kind() {
                Kind::Write => {
                    assert_eq!(f.epoch(), 1);
                    assert_eq!(f.offset(), 4096 + got.len() as u64);
                    assert!(f.payload().len() <= channel::MAX_DATA);
                    got.extend_from_slice(f.payload());
                }
                Kind::Cut => break,
                Kind::Heartbeat => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(got == big, "the frames carry the write, in order");
    }
}
