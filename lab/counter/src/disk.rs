//! The counter's disk log: value N is written to block N of the guest's disk (4 KiB
//! blocks, block 0 never written) with O_DIRECT and made durable (`fdatasync`, a FLUSH to
//! the disk) before the service replies N. So after a failover the backup guest's disk can
//! be compared with its memory: blocks 1..=M hold exactly 1..=M and nothing beyond M is
//! written, M being the counter in memory.
//!
//! Owns: the block format, the per-request check and the whole-disk scan. Never touches:
//! anything but the one disk it was given.
//!
//! Block format (4096 bytes): `b"RCNT"`, the value (u64 LE), its complement (u64 LE),
//! zeros. An all-zero block is empty; anything else is garbage.
use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::Path,
};

/// Block size: the disk's logical block size divides it, so O_DIRECT accepts it.
pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 4] = b"RCNT";
/// `O_DIRECT` on x86_64 Linux (std has no constant for it).
const O_DIRECT: i32 = 0o40000;
/// How many blocks past the memory's value a scan looks at for newer writes.
pub const SCAN_AHEAD: u64 = 64;

/// What a block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    Empty,
    Value(u64),
    Garbage,
}

/// The block that records value `n`.
pub fn encode(n: u64, out: &mut [u8]) {
    out.fill(0);
    out[..4].copy_from_slice(MAGIC);
    out[4..12].copy_from_slice(&n.to_le_bytes());
    out[12..20].copy_from_slice(&(!n).to_le_bytes());
}

/// Reads one block.
pub fn decode(b: &[u8]) -> Block {
    if b.iter().all(|&x| x == 0) {
        return Block::Empty;
    }
    let n = u64::from_le_bytes(b[4..12].try_into().unwrap_or([0; 8]));
    let c = u64::from_le_bytes(b[12..20].try_into().unwrap_or([0; 8]));
    if &b[..4] == MAGIC && c == !n && b[20..].iter().all(|&x| x == 0) {
        Block::Value(n)
    } else {
        Block::Garbage
    }
}

/// A buffer of `blocks` blocks aligned to `BLOCK` (O_DIRECT needs aligned memory).
struct Aligned {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(blocks: usize) -> Aligned {
        let len = blocks * BLOCK;
        let v = vec![0u8; len + BLOCK];
        let off = (BLOCK - (v.as_ptr() as usize % BLOCK)) % BLOCK;
        Aligned { v, off, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }
}

/// What the whole-disk scan found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scan {
    /// The highest H such that blocks 1..=H hold 1..=H.
    pub contiguous: u64,
    /// Written blocks in (mem, mem + SCAN_AHEAD]: values memory never reached.
    pub newer: u64,
    /// The first block that was neither its value nor empty where it had to be, if any.
    pub first_bad: Option<String>,
}

/// The disk log on one device (or, in tests, a file).
pub struct DiskLog {
    f: File,
    blocks: u64,
    one: Aligned,
    pair: Aligned,
}

impl DiskLog {
    /// Opens `path` for the log; `direct`: O_DIRECT (the guest's block device).
    pub fn open(path: &Path, direct: bool) -> io::Result<DiskLog> {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if direct {
            o.custom_flags(O_DIRECT);
        }
        let f = o.open(path)?;
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        // A block device's metadata says 0: seek to its end instead.
        let size = if size == 0 {
            use std::io::Seek;
            let mut g = &f;
            g.seek(io::SeekFrom::End(0))?
        } else {
            size
        };
        Ok(DiskLog {
            f,
            blocks: size / BLOCK as u64,
            one: Aligned::new(1),
            pair: Aligned::new(2),
        })
    }

    /// The number of values the disk can hold.
    pub fn capacity(&self) -> u64 {
        self.blocks.saturating_sub(1)
    }

    /// The check before writing `mem + 1`: block `mem` holds `mem` (block 0 is empty) and
    /// block `mem + 1` is empty. Err(description) if not.
    pub fn check(&mut self, mem: u64) -> io::Result<Result<(), String>> {
        if mem + 1 >= self.blocks {
            return Ok(Err(format!("disk full at {mem}")));
        }
        let buf = self.pair.buf();
        self.f.read_exact_at(buf, mem * BLOCK as u64)?;
        let here = decode(&buf[..BLOCK]);
        let next = decode(&buf[BLOCK..]);
        let want = if mem == 0 {
            Block::Empty
        } else {
            Block::Value(mem)
        };
        if here != want || next != Block::Empty {
            return Ok(Err(format!(
                "memory {mem}: block {mem} is {here:?}, block {} is {next:?}",
                mem + 1
            )));
        }
        Ok(Ok(()))
    }

    /// Writes value `n` to block `n` and makes it durable.
    pub fn write(&mut self, n: u64) -> io::Result<()> {
        let buf = self.one.buf();
        encode(n, buf);
        self.f.write_all_at(buf, n * BLOCK as u64)?;
        self.f.sync_data()
    }

    /// Reads blocks 1..=mem + SCAN_AHEAD (in 1 MiB reads).
    pub fn scan(&mut self, mem: u64) -> io::Result<Scan> {
        let end = (mem + SCAN_AHEAD + 1).min(self.blocks);
        let mut s = Scan {
            contiguous: 0,
            newer: 0,
            first_bad: None,
        };
        let mut big = Aligned::new(256);
        let mut at = 0u64;
        let mut broken = false;
        while at < end {
            let n = (end - at).min(256);
            let buf = &mut big.buf()[..n as usize * BLOCK];
            self.f.read_exact_at(buf, at * BLOCK as u64)?;
            for i in 0..n {
                let b = at + i;
                let blk = decode(&buf[i as usize * BLOCK..(i as usize + 1) * BLOCK]);
                if b == 0 {
                    if blk != Block::Empty && s.first_bad.is_none() {
                        s.first_bad = Some(format!("block 0 is {blk:?}"));
                    }
                    continue;
                }
                if b <= mem {
                    if !broken && blk == Block::Value(b) {
                        s.contiguous = b;
                    } else {
                        broken = true;
                        if blk != Block::Value(b) && s.first_bad.is_none() {
                            s.first_bad = Some(format!("block {b} is {blk:?}"));
                        }
                    }
                } else if blk != Block::Empty {
                    s.newer += 1;
                    if s.first_bad.is_none() {
                        s.first_bad = Some(format!("block {b} is {blk:?} (memory {mem})"));
                    }
                }
            }
            at += n;
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, blocks: u64) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("lab-counter-{}-{name}", std::process::id()));
        let f = File::create(&p).expect("create");
        f.set_len(blocks * BLOCK as u64).expect("size");
        p
    }

    #[test]
    fn blocks_round_trip_and_garbage_is_told_apart() {
        let mut b = vec![0u8; BLOCK];
        assert_eq!(decode(&b), Block::Empty);
        encode(42, &mut b);
        assert_eq!(decode(&b), Block::Value(42));
        b[13] ^= 1;
        assert_eq!(decode(&b), Block::Garbage);
        encode(7, &mut b);
        b[BLOCK - 1] = 1;
        assert_eq!(decode(&b), Block::Garbage);
    }

    #[test]
    fn a_log_written_in_order_checks_and_scans_clean() {
        let p = tmp("clean", 100);
        let mut d = DiskLog::open(&p, false).expect("open");
        assert_eq!(d.capacity(), 99);
        for n in 1..=10 {
            assert_eq!(d.check(n - 1).expect("io"), Ok(()));
            d.write(n).expect("write");
        }
        let s = d.scan(10).expect("scan");
        assert_eq!(
            s,
            Scan {
                contiguous: 10,
                newer: 0,
                first_bad: None
            }
        );
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn a_disk_behind_or_ahead_of_memory_is_found() {
        let p = tmp("skew", 100);
        let mut d = DiskLog::open(&p, false).expect("open");
        for n in 1..=5 {
            d.write(n).expect("write");
        }
        // Memory at 4, disk at 5: newer than memory.
        assert!(d.check(4).expect("io").is_err());
        let s = d.scan(4).expect("scan");
        assert_eq!((s.contiguous, s.newer), (4, 1));
        // Memory at 6, disk at 5: the disk lost a value the client may have seen.
        assert!(d.check(6).expect("io").is_err());
        let s = d.scan(6).expect("scan");
        assert_eq!((s.contiguous, s.newer), (5, 0));
        assert!(s.first_bad.expect("bad").contains("block 6"));
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn a_full_disk_is_reported_not_overrun() {
        let p = tmp("full", 3);
        let mut d = DiskLog::open(&p, false).expect("open");
        assert_eq!(d.check(0).expect("io"), Ok(()));
        d.write(1).expect("write");
        assert_eq!(d.check(1).expect("io"), Ok(()));
        d.write(2).expect("write");
        assert!(d.check(2).expect("io").expect_err("full").contains("full"));
        let _ = std::fs::remove_file(p);
    }
}
