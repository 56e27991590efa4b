//! The backing store of one replicated disk: a regular file or a block device, opened
//! exclusively, read and written at offsets.
//!
//! Owns: opening and locking the backing, its size, positioned I/O, flush/FUA, zeroing
//! ranges, and where the data lies (holes). Never touches: the network, epochs, NBD.
//!
//! I/O is buffered (page cache) and made durable with `fdatasync` on FLUSH and
//! `pwritev2(RWF_DSYNC)` on FUA writes. O_DIRECT is not used: it would need aligned
//! buffers for every client request and gains nothing on loopback files; the daemon
//! instead runs as an I/O flusher (see `sys`) so its own writeback cannot deadlock.
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error("backing {path}: no such file or device")]
    NotFound { path: String },
    #[error("backing {path}: {what} (expected a regular file or a block device)")]
    WrongKind { path: String, what: &'static str },
    #[error("backing {path} is busy: {detail}")]
    Busy { path: String, detail: String },
    #[error("backing {path}: {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("backing {path} is empty (size 0)")]
    Empty { path: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    File,
    BlockDevice,
}

/// An open, exclusively locked backing store.
#[derive(Debug)]
pub struct Backing {
    file: File,
    path: PathBuf,
    size: u64,
    kind: Kind,
}

/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

impl Backing {
    /// Opens `path` read-write. A block device is opened `O_EXCL` (refused while mounted
    /// or claimed); either kind is then `flock`ed, so two `remus disk` daemons never
    /// serve the same backing.
    pub fn open(path: &Path) -> Result<Backing, BackingError> {
        let p = path.display().to_string();
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BackingError::NotFound { path: p });
            }
            Err(source) => {
                return Err(BackingError::Io {
                    path: p,
                    what: "reading its metadata",
                    source,
                });
            }
        };
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            Kind::File
        } else if ft.is_block_device() {
            Kind::BlockDevice
        } else if ft.is_dir() {
            return Err(BackingError::WrongKind {
                path: p,
                what: "a directory",
            });
        } else {
            return Err(BackingError::WrongKind {
                path: p,
                what: "neither a regular file nor a block device",
            });
        };
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if kind == Kind::BlockDevice {
            o.custom_flags(libc::O_EXCL);
        }
        let file = o.open(path).map_err(|source| match source.raw_os_error() {
            Some(libc::EBUSY) => BackingError::Busy {
                path: p.clone(),
                detail: "the block device is in use (mounted or claimed)".into(),
            },
            _ => BackingError::Io {
                path: p.clone(),
                what: "opening it read-write",
                source,
            },
        })?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                BackingError::Busy {
                    path: p,
                    detail: "another process holds its lock (another remus disk daemon?)".into(),
                }
            } else {
                BackingError::Io {
                    path: p,
                    what: "locking it",
                    source: e,
                }
            });
        }
        let size = match kind {
            Kind::File => meta.len(),
            Kind::BlockDevice => {
                let mut sz: u64 = 0;
                // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
                let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut sz) };
                if r != 0 {
                    return Err(BackingError::Io {
                        path: p,
                        what: "reading the device size",
                        source: io::Error::last_os_error(),
                    });
                }
                sz
            }
        };
        if size == 0 {
            return Err(BackingError::Empty { path: p });
        }
        Ok(Backing {
            file,
            path: path.to_path_buf(),
            size,
            kind,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `[offset, offset+len)` lies inside the backing.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `data` at `offset`; with `fua` the data is durable when this returns.
    pub fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if !fua {
            return self.file.write_all_at(data, offset);
        }
        let mut done = 0usize;
        while done < data.len() {
            let iov = libc::iovec {
                iov_base: data[done..].as_ptr() as *mut libc::c_void,
                iov_len: data.len() - done,
            };
            // SAFETY: one iovec over a live slice; the fd is ours.
            let n = unsafe {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + done as u64) as libc::off_t,
                    libc::RWF_DSYNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Kernels or filesystems without per-write flags: write, then sync.
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                        self.file
                            .write_all_at(&data[done..], offset + done as u64)?;
                        return self.flush();
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwritev2 wrote 0 bytes",
                ));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Everything written so far is durable when this returns.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on an fd we own.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Deallocates the range if the backing can (it then reads as zeroes). `Ok(false)`:
    /// not supported here, nothing changed (TRIM is advisory).
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<bool> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(true),
            Err(e) if unsupported(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes the range read as zeroes: a hole if `may_punch`, else allocated zeroes
    /// (falling back to writing zeroes where the backing has no such operation).
    pub fn zero(&self, offset: u64, len: u64, may_punch: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if may_punch {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => return Ok(()),
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(e),
        }
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// The next data extent at or after `from`: `Some((start, end))`, or `None` when only
    /// holes remain. Block devices (no SEEK_DATA) are all data.
    pub fn next_data(&self, from: u64) -> io::Result<Option<(u64, u64)>> {
        if from >= self.size {
            return Ok(None);
        }
        if self.kind == Kind::BlockDevice {
            return Ok(Some((from, self.size)));
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek on an fd we own; positioned I/O elsewhere ignores the offset.
        let start = unsafe { libc::lseek(fd, from as libc::off_t, libc::SEEK_DATA) };
        if start < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some((from, self.size))),
                _ => Err(e),
            };
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some((
            (start as u64).min(self.size),
            (end as u64).min(self.size),
        )))
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.img");
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        (d, p)
    }

    #[test]
    fn open_checks_kind_existence_size_and_exclusivity() {
        let (d, p) = file(1 << 20);
        let b = Backing::open(&p).unwrap();
        assert_eq!(b.size(), 1 << 20);
        assert_eq!(b.kind(), Kind::File);
        assert!(matches!(Backing::open(&p), Err(BackingError::Busy { .. })));
        drop(b);
        Backing::open(&p).unwrap();
        assert!(matches!(
            Backing::open(&d.path().join("missing")),
            Err(BackingError::NotFound { .. })
        ));
        assert!(matches!(
            Backing::open(d.path()),
            Err(BackingError::WrongKind { .. })
        ));
        let (_d2, empty) = file(0);
        assert!(matches!(
            Backing::open(&empty),
            Err(BackingError::Empty { .. })
        ));
    }

    #[test]
    fn writes_zeroes_and_holes() {
        let (_d, p) = file(4 << 20);
        let b = Backing::open(&p).unwrap();
        b.write_at(&[7u8; 8192], 4096, false).unwrap();
        b.write_at(&[9u8; 4096], 1 << 20, true).unwrap();
        let mut r = vec![0u8; 8192];
        b.read_at(&mut r, 4096).unwrap();
        assert!(r.iter().all(|&x| x == 7));
        b.zero(4096, 4096, true).unwrap();
        b.zero(8192, 4096, false).unwrap();
        b.read_at(&mut r, 4096).unwrap();
        assert!(r.iter().all(|&x| x == 0));
        assert!(b.trim(1 << 20, 4096).unwrap());
        let mut r = vec![1u8; 4096];
        b.read_at(&mut r, 1 << 20).unwrap();
        assert!(r.iter().all(|&x| x == 0));
        assert!(b.contains(0, 4 << 20));
        assert!(!b.contains(1, 4 << 20));
        assert!(!b.contains(u64::MAX, 2));
    }

    #[test]
    fn data_extents_skip_holes() {
        let (_d, p) = file(64 << 20);
        let b = Backing::open(&p).unwrap();
        assert_eq!(
            b.next_data(0).unwrap(),
            None,
            "a fresh sparse file is one hole"
        );
        b.write_at(&[1u8; 4096], 32 << 20, false).unwrap();
        let (s, e) = b.next_data(0).unwrap().unwrap();
        assert!(s <= 32 << 20 && e >= (32 << 20) + 4096, "{s} {e}");
        assert!(e - s < 16 << 20, "the extent is small: {s}..{e}");
        assert_eq!(b.next_data(e).unwrap(), None);
    }
}
