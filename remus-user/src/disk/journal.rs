//! The backup's journal: one file per disk epoch holding its frames exactly as they
//! arrived (CRC included), fsync'ed when the epoch's CUT arrives, plus a small state file
//! (what was committed, what is on the backing). Replaying it after a crash is
//! idempotent.
//!
//! Owns: the journal directory (epoch files, `state.json`), the RAM copy of held writes
//! up to a cap, applying an epoch's records to the backing. Never touches: the network,
//! the decision of what may be applied (`epochs` says, `backup` asks).
//!
//! Crash rules:
//! - An epoch is durable only after its file (ending in its CUT frame) and the directory
//!   are fsync'ed. A file without its CUT, or with a bad CRC, is incomplete: dropped.
//! - `committed = N` is written (atomically: temporary file, fsync, rename, fsync of the
//!   directory) before anything of N is applied; `applied = N` after the backing is
//!   fsync'ed. At start every epoch in (applied, committed] is applied again, in order:
//!   each record overwrites its whole range, so a replay of any prefix ends the same.
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use zerocopy::IntoBytes;

use super::backing::Backing;
use super::channel::Received;
use super::epochs::Epochs;
use super::wire::{self, HEADER_LEN, Header, Kind};

pub const STATE_FILE: &str = "state.json";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        source: io::Error,
    },
    #[error(
        "journal full: epoch {epoch} would bring the journal to {would} bytes, over \
         --journal-max {max}"
    )]
    Full { epoch: u64, would: u64, max: u64 },
    #[error("journal {path}: the filesystem is full ({source})")]
    DiskFull { path: String, source: io::Error },
    #[error("journal: epoch {0} is needed but missing or incomplete (journal damaged)")]
    Missing(u64),
    #[error("journal {path}: record at {pos} is damaged: {what}")]
    Damaged {
        path: String,
        pos: u64,
        what: String,
    },
    #[error("journal {path} belongs to a backing of {journal} bytes, this backing has {backing}")]
    SizeMismatch {
        path: String,
        journal: u64,
        backing: u64,
    },
    #[error("applying to the backing: {0}")]
    Apply(io::Error),
}

/// What survives a restart.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct State {
    pub format: u32,
    pub size: u64,
    pub in_sync: bool,
    pub applied: u64,
    pub committed: u64,
    pub merged: Vec<u64>,
    /// The primary session the epochs belong to (hex).
    pub session: String,
    /// The backup failed over: it now serves the backing (restarts serve it again).
    pub exported: bool,
}

impl State {
    pub fn from_epochs(e: &Epochs, size: u64, session: &str, exported: bool) -> State {
        State {
            format: FORMAT,
            size,
            in_sync: e.in_sync,
            applied: e.applied,
            committed: e.committed,
            merged: e.merged.iter().copied().collect(),
            session: session.to_string(),
            exported,
        }
    }
}

/// One held record.
#[derive(Debug)]
pub struct Record {
    pub kind: Kind,
    pub offset: u64,
    pub len: u64,
    /// Where its frame starts in the epoch file.
    pub pos: u64,
    /// The whole frame as received (header, then data), while the RAM cap allows.
    pub frame: Option<Vec<u8>>,
}

/// One complete epoch: its file and records.
#[derive(Debug)]
pub struct EpochLog {
    pub epoch: u64,
    pub path: PathBuf,
    pub records: Vec<Record>,
    pub bytes: u64,
    pub ram: u64,
}

/// The byte budget shared by the journal and the session writing into it.
#[derive(Clone, Debug)]
pub struct Budget {
    dir: PathBuf,
    max_bytes: u64,
    ram_cap: u64,
    held: Arc<AtomicU64>,
    ram: Arc<AtomicU64>,
    /// Applied epoch files kept for reuse: overwriting a file whose pages (and blocks) are
    /// already there costs a copy, a fresh file costs page and block allocation too.
    spares: Arc<Mutex<Vec<PathBuf>>>,
    spare_seq: Arc<AtomicU64>,
}

/// At most this many applied epoch files are kept for reuse.
const MAX_SPARES: usize = 16;

/// The epoch being received: owned by the session thread (no lock while it writes and
/// fsyncs); handed to the [`Journal`] when complete.
#[derive(Debug)]
pub struct OpenEpoch {
    log: EpochLog,
    writer: BufWriter<File>,
    budget: Budget,
}

/// An epoch whose CUT is written but not yet fsync'ed.
#[derive(Debug)]
pub struct Closing {
    log: EpochLog,
    file: File,
    budget: Budget,
}

impl Closing {
    pub fn epoch(&self) -> u64 {
        self.log.epoch
    }

    /// fsync of the file, then of the directory (a new or renamed file's name must
    /// survive too): the epoch is durable when this returns.
    pub fn sync(self) -> Result<EpochLog, JournalError> {
        self.file
            .sync_data()
            .map_err(jerr(&self.log.path, "fsync"))?;
        sync_dir(&self.budget.dir)?;
        Ok(self.log)
    }

    /// The session ended before the fsync: the epoch is dropped.
    pub fn abandon(self) {
        self.budget.forget(&self.log);
        let _ = std::fs::remove_file(&self.log.path);
    }
}

/// The complete, held epochs (shared: the session adds, commits and failovers take).
pub struct Journal {
    budget: Budget,
    logs: BTreeMap<u64, EpochLog>,
}

fn jerr<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| {
        if matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT)
        ) {
            JournalError::DiskFull {
                path: path.display().to_string(),
                source,
            }
        } else {
            JournalError::Io {
                path: path.display().to_string(),
                what,
                source,
            }
        }
    }
}

pub fn epoch_path(dir: &Path, epoch: u64) -> PathBuf {
    dir.join(format!("epoch-{epoch:020}.rdj"))
}

fn parse_epoch_name(name: &str) -> Option<u64> {
    name.strip_prefix("epoch-")?
        .strip_suffix(".rdj")?
        .parse()
        .ok()
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(jerr(dir, "fsync of the directory"))
}

/// Reads and checks the frame at `pos` of `f`.
fn read_frame_at(f: &File, path: &Path, pos: u64) -> Result<wire::Frame, JournalError> {
    let damaged = |what: String| JournalError::Damaged {
        path: path.display().to_string(),
        pos,
        what,
    };
    let mut hb = [0u8; HEADER_LEN];
    f.read_exact_at(&mut hb, pos)
        .map_err(|e| damaged(format!("header: {e}")))?;
    let h = wire::check_header(&hb).map_err(|e| damaged(e.to_string()))?;
    let mut payload = vec![0u8; h.len.get() as usize];
    f.read_exact_at(&mut payload, pos + HEADER_LEN as u64)
        .map_err(|e| damaged(format!("payload: {e}")))?;
    wire::finish(&h, payload).map_err(|e| damaged(e.to_string()))
}

impl Budget {
    pub fn held_bytes(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    pub fn ram_bytes(&self) -> u64 {
        self.ram.load(Ordering::Relaxed)
    }

    /// Creates epoch `epoch`'s file, reusing a spare one if there is one. A reused file
    /// keeps its old tail: it holds frames of earlier epochs of this session (spares are
    /// deleted when a session starts), so a scan stops there (wrong epoch) unless this
    /// epoch's CUT came first.
    pub fn begin(&self, epoch: u64) -> Result<OpenEpoch, JournalError> {
        let path = epoch_path(&self.dir, epoch);
        let spare = self.spares.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let reused = spare.and_then(|sp| {
            std::fs::rename(&sp, &path).ok()?;
            OpenOptions::new().write(true).open(&path).ok()
        });
        let f = match reused {
            Some(f) => f,
            None => OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .map_err(jerr(&path, "creating an epoch file"))?,
        };
        Ok(OpenEpoch {
            log: EpochLog {
                epoch,
                path,
                records: Vec::new(),
                bytes: 0,
                ram: 0,
            },
            writer: BufWriter::with_capacity(1 << 20, f),
            budget: self.clone(),
        })
    }
}

impl OpenEpoch {
    pub fn epoch(&self) -> u64 {
        self.log.epoch
    }

    /// Appends a WRITE or ZERO frame (opened and checked by the channel), as received.
    pub fn append(&mut self, f: Received) -> Result<(), JournalError> {
        let b = &self.budget;
        let flen = f.frame.len() as u64;
        let plen = (f.frame.len() - HEADER_LEN) as u64;
        let would = b.held.load(Ordering::Relaxed) + flen;
        if would > b.max_bytes {
            return Err(JournalError::Full {
                epoch: self.log.epoch,
                would,
                max: b.max_bytes,
            });
        }
        let kind = f.kind();
        let keep = kind == Kind::Write && b.ram.load(Ordering::Relaxed) + plen <= b.ram_cap;
        let len = match kind {
            Kind::Zero => wire::zero_len(f.payload()),
            _ => plen,
        };
        let path = &self.log.path;
        if f.frame.len() >= 64 << 10 {
            // Large: written as it is, no copy through the buffer.
            self.writer
                .flush()
                .and_then(|_| self.writer.get_mut().write_all(&f.frame))
                .map_err(jerr(path, "appending"))?;
        } else {
            self.writer
                .write_all(&f.frame)
                .map_err(jerr(path, "appending"))?;
        }
        let pos = self.log.bytes;
        self.log.bytes += flen;
        b.held.fetch_add(flen, Ordering::Relaxed);
        let ram = if keep { plen } else { 0 };
        self.log.ram += ram;
        b.ram.fetch_add(ram, Ordering::Relaxed);
        let offset = f.offset();
        self.log.records.push(Record {
            kind,
            offset,
            len,
            pos,
            frame: keep.then_some(f.frame),
        });
        Ok(())
    }

    /// Appends the CUT frame and makes the epoch durable (file and directory fsync'ed).
    pub fn close(self, h: &Header) -> Result<EpochLog, JournalError> {
        self.finish(h)?.sync()
    }

    /// Appends the CUT frame and hands the file over for its fsync ([`Closing::sync`]),
    /// so the next epoch can be written meanwhile.
    pub fn finish(self, h: &Header) -> Result<Closing, JournalError> {
        let OpenEpoch {
            mut log,
            mut writer,
            budget,
        } = self;
        writer
            .write_all(h.as_bytes())
            .map_err(jerr(&log.path, "appending the cut"))?;
        let file = writer
            .into_inner()
            .map_err(|e| jerr(&log.path, "flushing")(e.into_error()))?;
        log.bytes += HEADER_LEN as u64;
        budget.held.fetch_add(HEADER_LEN as u64, Ordering::Relaxed);
        Ok(Closing { log, file, budget })
    }

    /// The session ended before the CUT: the epoch is dropped.
    pub fn abandon(self) {
        self.budget.forget(&self.log);
        let _ = std::fs::remove_file(&self.log.path);
    }
}

impl Budget {
    /// Keeps an applied epoch's file for reuse (or deletes it past the pool's size).
    fn recycle(&self, log: &EpochLog) {
        self.forget(log);
        let mut sp = self.spares.lock().unwrap_or_else(|p| p.into_inner());
        if sp.len() < MAX_SPARES {
            let n = self.spare_seq.fetch_add(1, Ordering::Relaxed);
            let to = self.dir.join(format!("spare-{n}.rdj"));
            if std::fs::rename(&log.path, &to).is_ok() {
                sp.push(to);
                return;
            }
        }
        let _ = std::fs::remove_file(&log.path);
    }

    /// Deletes the spare files (a new session must never reuse a file holding frames of
    /// an earlier session, whose epoch numbers could repeat).
    fn clear_spares(&self) {
        let mut sp = self.spares.lock().unwrap_or_else(|p| p.into_inner());
        for p in sp.drain(..) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Deletes a complete epoch that must not be kept (its session was ended meanwhile).
    pub fn discard(&self, log: EpochLog) {
        self.forget(&log);
        let _ = std::fs::remove_file(&log.path);
    }

    fn forget(&self, log: &EpochLog) {
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(log.bytes))
            });
        let _ = self
            .ram
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(log.ram))
            });
    }
}

impl Journal {
    /// Opens (creating it, mode 0700) the journal directory and reads its state.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        ram_cap: u64,
    ) -> Result<(Journal, State), JournalError> {
        std::fs::create_dir_all(dir).map_err(jerr(dir, "creating the directory"))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        let sp = dir.join(STATE_FILE);
        let state = match std::fs::read(&sp) {
            Ok(b) => serde_json::from_slice::<State>(&b).map_err(|e| JournalError::Damaged {
                path: sp.display().to_string(),
                pos: 0,
                what: e.to_string(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(jerr(&sp, "reading the state")(e)),
        };
        Ok((
            Journal {
                budget: Budget {
                    dir: dir.to_path_buf(),
                    max_bytes,
                    ram_cap,
                    held: Arc::new(AtomicU64::new(0)),
                    ram: Arc::new(AtomicU64::new(0)),
                    spares: Arc::new(Mutex::new(Vec::new())),
                    spare_seq: Arc::new(AtomicU64::new(0)),
                },
                logs: BTreeMap::new(),
            },
            state,
        ))
    }

    pub fn budget(&self) -> Budget {
        self.budget.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.budget.dir
    }

    pub fn held_bytes(&self) -> u64 {
        self.budget.held_bytes()
    }

    pub fn ram_bytes(&self) -> u64 {
        self.budget.ram_bytes()
    }

    pub fn held_epochs(&self) -> Vec<u64> {
        self.logs.keys().copied().collect()
    }

    /// Writes the state file atomically and durably.
    pub fn save_state(&self, s: &State) -> Result<(), JournalError> {
        let dir = &self.budget.dir;
        let tmp = dir.join("state.json.tmp");
        let fin = dir.join(STATE_FILE);
        let body = serde_json::to_vec_pretty(s).unwrap_or_default();
        {
            let mut f = File::create(&tmp).map_err(jerr(&tmp, "creating the state"))?;
            f.write_all(&body)
                .map_err(jerr(&tmp, "writing the state"))?;
            f.sync_data().map_err(jerr(&tmp, "fsync of the state"))?;
        }
        std::fs::rename(&tmp, &fin).map_err(jerr(&fin, "replacing the state"))?;
        sync_dir(dir)
    }

    /// Scans the epoch files left by a previous run: complete ones are kept (records
    /// without RAM copies), incomplete ones deleted. Returns the complete epochs.
    pub fn recover(&mut self, applied: u64) -> Result<Vec<u64>, JournalError> {
        let dir = self.budget.dir.clone();
        let rd = std::fs::read_dir(&dir).map_err(jerr(&dir, "listing"))?;
        let mut found: Vec<(u64, PathBuf)> = Vec::new();
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = parse_epoch_name(&name) {
                found.push((n, e.path()));
            } else if name.starts_with("spare-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        found.sort();
        let mut complete = Vec::new();
        for (epoch, path) in found {
            if epoch <= applied {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            match scan(epoch, &path) {
                Some(log) => {
                    self.budget.held.fetch_add(log.bytes, Ordering::Relaxed);
                    complete.push(epoch);
                    self.logs.insert(epoch, log);
                }
                None => {
                    tracing::info!(epoch, path = %path.display(), "dropping an incomplete epoch from the journal");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(complete)
    }

    /// A complete epoch joins the held ones.
    pub fn insert(&mut self, log: EpochLog) {
        self.logs.insert(log.epoch, log);
    }

    /// Drops one held epoch (and its file).
    pub fn drop_epoch(&mut self, epoch: u64) {
        if let Some(log) = self.logs.remove(&epoch) {
            self.budget.forget(&log);
            let _ = std::fs::remove_file(&log.path);
        }
    }

    /// Takes epochs `from..=to` out for applying; each must be held.
    pub fn take(&mut self, from: u64, to: u64) -> Result<Vec<EpochLog>, JournalError> {
        if from > to {
            return Ok(Vec::new());
        }
        if let Some(e) = (from..=to).find(|e| !self.logs.contains_key(e)) {
            return Err(JournalError::Missing(e));
        }
        Ok((from..=to).filter_map(|e| self.logs.remove(&e)).collect())
    }

    /// Puts epochs back (an apply failed: they stay for a retry).
    pub fn put_back(&mut self, logs: Vec<EpochLog>) {
        for l in logs {
            self.logs.insert(l.epoch, l);
        }
    }

    /// Forgets applied (and flushed) epochs; their files are kept for reuse.
    pub fn remove(&mut self, logs: &[EpochLog]) {
        for l in logs {
            self.budget.recycle(l);
        }
    }

    /// Deletes every held epoch above `e`; with 0, all of them and the spare files (a
    /// new session starts).
    pub fn discard_above(&mut self, e: u64) -> Vec<u64> {
        let gone: Vec<u64> = self.logs.range(e + 1..).map(|(k, _)| *k).collect();
        for k in &gone {
            self.drop_epoch(*k);
        }
        if e == 0 {
            self.budget.clear_spares();
        }
        gone
    }
}

fn scan(epoch: u64, path: &Path) -> Option<EpochLog> {
    let f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut pos = 0u64;
    let mut records = Vec::new();
    while pos < len {
        let fr = read_frame_at(&f, path, pos).ok()?;
        if fr.epoch != epoch {
            return None;
        }
        let flen = HEADER_LEN as u64 + fr.payload.len() as u64;
        match fr.kind {
            Kind::Write => records.push(Record {
                kind: Kind::Write,
                offset: fr.offset,
                len: fr.payload.len() as u64,
                pos,
                frame: None,
            }),
            Kind::Zero => records.push(Record {
                kind: Kind::Zero,
                offset: fr.offset,
                len: wire::zero_len(&fr.payload),
                pos,
                frame: None,
            }),
            // A reused file may go on with an older epoch's frames: this CUT ends it.
            Kind::Cut => {
                return Some(EpochLog {
                    epoch,
                    path: path.to_path_buf(),
                    records,
                    bytes: pos + flen,
                    ram: 0,
                });
            }
            _ => return None,
        }
        pos += flen;
    }
    None
}

/// Progress of an apply, for fault injection and status.
pub trait ApplyObserver {
    /// Called after each record is on the backing (not yet fsync'ed).
    fn record_applied(&self, epoch: u64, index: usize);
}

/// Applies one complete epoch's records, in order. Returns the bytes written.
pub fn apply(
    log: &EpochLog,
    backing: &Backing,
    obs: &dyn ApplyObserver,
) -> Result<u64, JournalError> {
    let mut file: Option<File> = None;
    let mut bytes = 0u64;
    for (i, r) in log.records.iter().enumerate() {
        match r.kind {
            Kind::Write => {
                let owned;
                let data: &[u8] = match &r.frame {
                    Some(f) => &f[HEADER_LEN..],
                    None => {
                        if file.is_none() {
                            file =
                                Some(File::open(&log.path).map_err(jerr(&log.path, "reopening"))?);
                        }
                        let f = file.as_ref().ok_or(JournalError::Missing(log.epoch))?;
                        owned = read_frame_at(f, &log.path, r.pos)?.payload;
                        &owned
                    }
                };
                backing
                    .write_at(data, r.offset, false)
                    .map_err(JournalError::Apply)?;
                bytes += data.len() as u64;
            }
            Kind::Zero => {
                backing
                    .zero(r.offset, r.len, true)
                    .map_err(JournalError::Apply)?;
            }
            _ => {}
        }
        obs.record_applied(log.epoch, i);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::wire::header;

    /// A frame as the channel hands it over.
    fn rx(kind: Kind, epoch: u64, off: u64, payload: &[u8]) -> Received {
        Received {
            header: header(kind, epoch, off, payload),
            frame: wire::encode(kind, epoch, off, payload),
        }
    }

    struct Quiet;
    impl ApplyObserver for Quiet {
        fn record_applied(&self, _: u64, _: usize) {}
    }

    fn write(o: &mut OpenEpoch, off: u64, byte: u8, len: usize) {
        o.append(rx(Kind::Write, o.epoch(), off, &vec![byte; len]))
            .unwrap();
    }

    fn zero(o: &mut OpenEpoch, off: u64, len: u64) {
        o.append(rx(Kind::Zero, o.epoch(), off, &len.to_le_bytes()))
            .unwrap();
    }

    fn cut(j: &mut Journal, o: OpenEpoch) {
        let e = o.epoch();
        let log = o.close(&header(Kind::Cut, e, 0, &[])).unwrap();
        j.insert(log);
    }

    fn backing(dir: &Path, size: u64) -> Backing {
        let p = dir.join("backing.img");
        File::create(&p).unwrap().set_len(size).unwrap();
        Backing::open(&p).unwrap()
    }

    fn image(b: &Backing) -> Vec<u8> {
        let mut v = vec![0u8; b.size() as usize];
        b.read_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn epochs_are_durable_recoverable_and_apply_in_order() {
        let d = tempfile::tempdir().unwrap();
        let jd = d.path().join("j");
        let (mut j, st) = Journal::open(&jd, 1 << 30, 0).unwrap();
        assert_eq!(st, State::default());
        let mut o = j.budget().begin(1).unwrap();
        write(&mut o, 0, 1, 8192);
        write(&mut o, 4096, 2, 4096);
        cut(&mut j, o);
        let mut o = j.budget().begin(2).unwrap();
        write(&mut o, 0, 3, 512);
        zero(&mut o, 8192, 8192);
        cut(&mut j, o);
        let mut o = j.budget().begin(3).unwrap();
        write(&mut o, 0, 9, 512); // never cut: incomplete
        drop(o);
        drop(j);

        let (mut j, _) = Journal::open(&jd, 1 << 30, 0).unwrap();
        assert_eq!(j.recover(0).unwrap(), vec![1, 2]);
        assert!(
            !epoch_path(&jd, 3).exists(),
            "the incomplete epoch is deleted"
        );
        let b = backing(d.path(), 64 << 10);
        b.write_at(&[0xee; 16384], 0, false).unwrap();
        let logs = j.take(1, 2).unwrap();
        for l in &logs {
            apply(l, &b, &Quiet).unwrap();
        }
        let img = image(&b);
        assert!(img[..512].iter().all(|&x| x == 3));
        assert!(img[512..4096].iter().all(|&x| x == 1));
        assert!(img[4096..8192].iter().all(|&x| x == 2));
        assert!(img[8192..16384].iter().all(|&x| x == 0));
        // Replaying the same epochs again changes nothing.
        for l in &logs {
            apply(l, &b, &Quiet).unwrap();
        }
        assert_eq!(image(&b), img);
        j.remove(&logs);
        assert_eq!(j.held_bytes(), 0);
        assert!(!epoch_path(&jd, 1).exists());
    }

    #[test]
    fn a_damaged_record_makes_the_epoch_incomplete() {
        let d = tempfile::tempdir().unwrap();
        let jd = d.path().join("j");
        let (mut j, _) = Journal::open(&jd, 1 << 30, 1 << 20).unwrap();
        let mut o = j.budget().begin(4).unwrap();
        write(&mut o, 0, 1, 4096);
        cut(&mut j, o);
        drop(j);
        let p = epoch_path(&jd, 4);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0x55], 100).unwrap();
        let (mut j, _) = Journal::open(&jd, 1 << 30, 0).unwrap();
        assert_eq!(j.recover(0).unwrap(), Vec::<u64>::new());
        assert!(matches!(j.take(4, 4), Err(JournalError::Missing(4))));
    }

    #[test]
    fn ram_cap_spills_to_the_file_and_apply_reads_it_back() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(&d.path().join("j"), 1 << 30, 8192).unwrap();
        let mut o = j.budget().begin(1).unwrap();
        write(&mut o, 0, 1, 4096);
        write(&mut o, 4096, 2, 4096);
        write(&mut o, 8192, 3, 4096); // over the cap: file only
        cut(&mut j, o);
        assert_eq!(j.ram_bytes(), 8192);
        let logs = j.take(1, 1).unwrap();
        assert!(logs[0].records[2].frame.is_none());
        let b = backing(d.path(), 16384);
        apply(&logs[0], &b, &Quiet).unwrap();
        let img = image(&b);
        assert!(img[8192..12288].iter().all(|&x| x == 3));
        j.remove(&logs);
        assert_eq!(j.ram_bytes(), 0);
    }

    #[test]
    fn the_journal_cap_is_enforced() {
        let d = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(&d.path().join("j"), 10_000, 0).unwrap();
        let mut o = j.budget().begin(1).unwrap();
        write(&mut o, 0, 1, 4096);
        assert!(matches!(
            o.append(rx(Kind::Write, 1, 0, &[0u8; 8192])),
            Err(JournalError::Full { epoch: 1, .. })
        ));
        o.abandon();
        assert_eq!(j.held_bytes(), 0);
    }

    #[test]
    fn state_is_replaced_atomically() {
        let d = tempfile::tempdir().unwrap();
        let jd = d.path().join("j");
        let (j, _) = Journal::open(&jd, 1 << 30, 0).unwrap();
        let mut e = Epochs::default();
        e.synced(1);
        e.committing(3);
        e.merge(5).unwrap();
        let s = State::from_epochs(&e, 1 << 20, "ab", false);
        j.save_state(&s).unwrap();
        let (_, back) = Journal::open(&jd, 1 << 30, 0).unwrap();
        assert_eq!(back, s);
        assert!(!jd.join("state.json.tmp").exists());
    }

    #[test]
    fn a_reused_file_is_complete_only_up_to_its_own_cut() {
        let d = tempfile::tempdir().unwrap();
        let jd = d.path().join("j");
        let (mut j, _) = Journal::open(&jd, 1 << 30, 0).unwrap();
        let mut o = j.budget().begin(1).unwrap();
        write(&mut o, 0, 1, 64 << 10);
        write(&mut o, 0, 1, 64 << 10);
        cut(&mut j, o);
        let logs = j.take(1, 1).unwrap();
        j.remove(&logs);
        // Epoch 2 reuses epoch 1's file: shorter, so epoch 1's frames follow its CUT.
        let mut o = j.budget().begin(2).unwrap();
        write(&mut o, 512, 2, 4096);
        cut(&mut j, o);
        let mut o = j.budget().begin(3).unwrap();
        write(&mut o, 1024, 3, 4096); // a fresh file; never cut
        drop(o);
        drop(j);
        let (mut j, _) = Journal::open(&jd, 1 << 30, 0).unwrap();
        assert_eq!(j.recover(0).unwrap(), vec![2]);
        let logs = j.take(2, 2).unwrap();
        assert_eq!(
            logs[0].records.len(),
            1,
            "the stale tail is not part of epoch 2"
        );

        // A torn reuse (no CUT yet) is incomplete: the stale frames carry another epoch.
        let (mut j, _) = Journal::open(&d.path().join("k"), 1 << 30, 0).unwrap();
        let mut o = j.budget().begin(5).unwrap();
        write(&mut o, 0, 5, 64 << 10);
        cut(&mut j, o);
        let logs = j.take(5, 5).unwrap();
        j.remove(&logs);
        let mut o = j.budget().begin(6).unwrap();
        write(&mut o, 0, 6, 4096);
        o.writer.flush().unwrap();
        std::mem::forget(o);
        drop(j);
        let (mut j, _) = Journal::open(&d.path().join("k"), 1 << 30, 0).unwrap();
        assert_eq!(j.recover(0).unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn discard_above_drops_later_epochs() {
        let d = tempfile::tempdir().unwrap();
        let jd = d.path().join("j");
        let (mut j, _) = Journal::open(&jd, 1 << 30, 1 << 20).unwrap();
        for e in 1..=3 {
            let mut o = j.budget().begin(e).unwrap();
            write(&mut o, 0, e as u8, 512);
            cut(&mut j, o);
        }
        assert_eq!(j.discard_above(2), vec![3]);
        assert_eq!(j.held_epochs(), vec![1, 2]);
        assert!(!epoch_path(&jd, 3).exists());
    }
}
