//! The transmission phase on one connection: read a request, do it on the [`Target`],
//! answer. Requests on one connection are handled in order; several connections run in
//! parallel (the kernel's multi-connection mode), each on its own thread.
//!
//! Owns: decoding requests, bounds checks, replies. Never touches: what a write does
//! beyond the target (replication lives behind [`Target::write`]).
use std::io::{self, IoSlice, Read, Write};

use zerocopy::{FromBytes, IntoBytes};

use super::*;

/// A write's data as read from the client, behind `room` spare bytes (and with spare
/// capacity after it) that the target asked for: a target that forwards writes frames
/// them in place, without a copy.
#[derive(Debug)]
pub struct WriteBuf {
    buf: Vec<u8>,
    room: usize,
}

impl WriteBuf {
    /// A buffer without room (tests, clients of a target).
    pub fn from_vec(buf: Vec<u8>) -> WriteBuf {
        WriteBuf { buf, room: 0 }
    }

    pub fn data(&self) -> &[u8] {
        &self.buf[self.room..]
    }

    pub fn len(&self) -> usize {
        self.buf.len() - self.room
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole buffer (room, then data) and the room's size.
    pub fn into_parts(self) -> (Vec<u8>, usize) {
        (self.buf, self.room)
    }

    /// Reads exactly `len` bytes of data behind `room` zero bytes, with `tail` bytes of
    /// capacity kept after them (no zero-filling of the data: up to 32 MiB at memory
    /// speed).
    fn read<R: Read>(r: &mut R, len: usize, (room, tail): (usize, usize)) -> io::Result<WriteBuf> {
        let mut buf = Vec::with_capacity(room + len + tail);
        buf.resize(room, 0);
        r.take(len as u64).read_to_end(&mut buf)?;
        if buf.len() != room + len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(WriteBuf { buf, room })
    }
}

/// What a connection serves. Implemented by the disk export (local write, then the
/// replication hook).
pub trait Target: Send + Sync {
    fn size(&self) -> u64;
    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Bytes of room wanted before a write's data, and of capacity after it.
    fn write_room(&self) -> (usize, usize) {
        (0, 0)
    }
    /// Takes the payload by value: the replicating target frames it for the send queue
    /// in place.
    fn write(&self, data: WriteBuf, offset: u64, fua: bool) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_punch: bool) -> io::Result<()>;
}

/// Why a connection ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client sent NBD_CMD_DISC.
    Disconnect,
    /// The client closed the connection between requests.
    Closed,
}

/// Writes all of `bufs` (a reply header and its data).
pub fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "connection closed",
                ));
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn reply<W: Write>(w: &mut W, error: u32, cookie: u64) -> io::Result<()> {
    w.write_all(Reply::new(error, cookie).as_bytes())
}

/// Reads and drops `len` bytes (the payload of a write that is refused).
fn discard<R: Read>(r: &mut R, len: u64) -> io::Result<()> {
    io::copy(&mut r.take(len), &mut io::sink()).and_then(|n| {
        if n == len {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short payload",
            ))
        }
    })
}

/// Serves requests until the client disconnects. `r` should be buffered (small
/// requests arrive back to back); `w` is the same connection.
pub fn serve<R: Read, W: Write>(mut r: R, mut w: W, t: &dyn Target) -> Result<Ended, NbdError> {
    let size = t.size();
    let mut hb = [0u8; 28];
    loop {
        // EOF exactly between requests is a close; anywhere else it is an error.
        let mut got = 0;
        while got < hb.len() {
            match r.read(&mut hb[got..]) {
                Ok(0) if got == 0 => return Ok(Ended::Closed),
                Ok(0) => return Err(NbdError::Protocol("truncated request header".into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let req = Request::read_from_bytes(&hb)
            .map_err(|_| NbdError::Protocol("short request".into()))?;
        if req.magic.get() != REQUEST_MAGIC {
            return Err(NbdError::Protocol(format!(
                "request magic {:#x}",
                req.magic.get()
            )));
        }
        let (flags, cookie, offset, len) = (
            req.flags.get(),
            req.cookie.get(),
            req.offset.get(),
            req.len.get(),
        );
        let fua = flags & CMD_FLAG_FUA != 0;
        let inside = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size);
        match Cmd::from_wire(req.kind.get()) {
            Some(Cmd::Read) => {
                if !inside || len > MAX_REQUEST {
                    reply(&mut w, EINVAL, cookie)?;
                    continue;
                }
                let mut buf = vec![0u8; len as usize];
                match t.read(&mut buf, offset) {
                    Ok(()) => {
                        let h = Reply::new(0, cookie);
                        write_all_vectored(
                            &mut w,
                            &mut [IoSlice::new(h.as_bytes()), IoSlice::new(&buf)],
                        )?;
                    }
                    Err(e) => reply(&mut w, errno_of(&e), cookie)?,
                }
            }
            Some(Cmd::Write) => {
                if len > MAX_REQUEST {
                    discard(&mut r, len as u64)?;
                    reply(&mut w, EINVAL, cookie)?;
                    continue;
                }
                let data = WriteBuf::read(&mut r, len as usize, t.write_room())?;
                if !inside {
                    reply(&mut w, ENOSPC, cookie)?;
                    continue;
                }
                let err = match t.write(data, offset, fua) {
                    Ok(()) => 0,
                    Err(e) => errno_of(&e),
                };
                reply(&mut w, err, cookie)?;
            }
            Some(Cmd::Flush) => {
                let err = t.flush().err().map_or(0, |e| errno_of(&e));
                reply(&mut w, err, cookie)?;
            }
            Some(Cmd::Trim) => {
                if !inside {
                    reply(&mut w, EINVAL, cookie)?;
                    continue;
                }
                let err = t
                    .trim(offset, len as u64, fua)
                    .err()
                    .map_or(0, |e| errno_of(&e));
                reply(&mut w, err, cookie)?;
            }
            Some(Cmd::WriteZeroes) => {
                if !inside {
                    reply(&mut w, ENOSPC, cookie)?;
                    continue;
                }
                let punch = flags & CMD_FLAG_NO_HOLE == 0;
                let err = t
                    .write_zeroes(offset, len as u64, fua, punch)
                    .err()
                    .map_or(0, |e| errno_of(&e));
                reply(&mut w, err, cookie)?;
            }
            Some(Cmd::Cache) => {
                // A hint only: the page cache decides.
                reply(&mut w, if inside { 0 } else { EINVAL }, cookie)?;
            }
            Some(Cmd::Disc) => return Ok(Ended::Disconnect),
            None => reply(&mut w, EINVAL, cookie)?,
        }
        w.flush()?;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;

    /// A fake target in memory (a fake: named so), recording what it was asked.
    pub(crate) struct MemTarget {
        pub data: Mutex<Vec<u8>>,
        pub log: Mutex<Vec<String>>,
    }

    impl MemTarget {
        pub fn new(size: usize) -> MemTarget {
            MemTarget {
                data: Mutex::new(vec![0; size]),
                log: Mutex::new(Vec::new()),
            }
        }
    }

    impl Target for MemTarget {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_room(&self) -> (usize, usize) {
            (3, 5) // any room: the data arrives behind it
        }
        fn write(&self, data: WriteBuf, offset: u64, fua: bool) -> io::Result<()> {
            if offset == 4096 * 100 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + data.len()].copy_from_slice(data.data());
            self.log
                .lock()
                .unwrap()
                .push(format!("write {offset} {} {fua}", data.len()));
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            self.log.lock().unwrap().push("flush".into());
            Ok(())
        }
        fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
            self.log
                .lock()
                .unwrap()
                .push(format!("trim {offset} {len}"));
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, _fua: bool, punch: bool) -> io::Result<()> {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..(offset + len) as usize].fill(0);
            self.log
                .lock()
                .unwrap()
                .push(format!("zeroes {offset} {len} {punch}"));
            Ok(())
        }
    }

    #[test]
    fn requests_are_served_in_order_with_errors_for_bad_ones() {
        let t = std::sync::Arc::new(MemTarget::new(1 << 20));
        let (a, b) = UnixStream::pair().unwrap();
        let t2 = t.clone();
        let srv = std::thread::spawn(move || serve(io::BufReader::new(&b), &b, &*t2));
        let mut c = super::super::client::Client::from_stream(a, 1 << 20);
        c.write(0, &[5u8; 8192], false).unwrap();
        c.write(8192, &[6u8; 512], true).unwrap();
        let mut r = vec![0u8; 8704];
        c.read(0, &mut r).unwrap();
        assert!(r[..8192].iter().all(|&x| x == 5) && r[8192..].iter().all(|&x| x == 6));
        c.flush().unwrap();
        c.trim(0, 4096).unwrap();
        c.write_zeroes(0, 4096, true).unwrap();
        c.read(0, &mut r[..4096]).unwrap();
        assert!(r[..4096].iter().all(|&x| x == 0));
        // Out of bounds, an unknown command, a failing write: each an error reply, the
        // connection stays usable.
        assert_eq!(
            c.write(1 << 20, &[1u8; 512], false).unwrap_err().errno(),
            Some(ENOSPC)
        );
        assert_eq!(
            c.read(1 << 20, &mut [0u8; 1]).unwrap_err().errno(),
            Some(EINVAL)
        );
        assert_eq!(c.raw(9, 0, 0, 0).unwrap_err().errno(), Some(EINVAL));
        assert_eq!(
            c.write(4096 * 100, &[1u8; 512], false).unwrap_err().errno(),
            Some(ENOSPC)
        );
        c.read(0, &mut r[..512]).unwrap();
        c.disconnect().unwrap();
        assert_eq!(srv.join().unwrap().unwrap(), Ended::Disconnect);
        let log = t.log.lock().unwrap().clone();
        assert_eq!(
            log,
            vec![
                "write 0 8192 false",
                "write 8192 512 true",
                "flush",
                "trim 0 4096",
                "zeroes 0 4096 true"
            ]
        );
    }

    #[test]
    fn bad_magic_and_truncation_end_the_connection() {
        let t = MemTarget::new(4096);
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[0u8; 28]).unwrap();
        assert!(matches!(
            serve(io::BufReader::new(&b), &b, &t),
            Err(NbdError::Protocol(_))
        ));
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[0x25, 0x60]).unwrap();
        drop(a);
        assert!(matches!(
            serve(io::BufReader::new(&b), &b, &t),
            Err(NbdError::Protocol(_))
        ));
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert_eq!(
            serve(io::BufReader::new(&b), &b, &t).unwrap(),
            Ended::Closed
        );
    }
}
