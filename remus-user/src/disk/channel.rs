//! The disk stream's sealed channel: after the relay's handshake (`replication::auth`,
//! the same key file) every disk frame travels as the payload of one sealed replication
//! frame of kind DATA: AES-256-GCM with the session's keys and frame counters
//! (`replication::seal`), exactly as the relay's own frames.
//!
//! Owns: the byte layout of a sealed disk frame, building and sealing frames in place,
//! and a blocking reader that opens them. Never touches: what the frames mean (`wire`
//! checks them, `primary` and `backup` act on them), the handshake, sockets beyond the
//! reader or writer it is handed.
//!
//! ```text
//!   0        16                48                       48+len      +16
//!   ┌────────┬─────────────────┬────────────────────────┬───────────┐
//!   │ RMUS   │ disk header     │ payload (write data)    │ GCM tag   │
//!   │ DATA   │ RMDK kind epoch │                         │           │
//!   │ sealed │ offset len CRC  │                         │           │
//!   └────────┴─────────────────┴────────────────────────┴───────────┘
//!   in clear  └──────────── encrypted and authenticated ─┘
//! ```
//!
//! A sender keeps [`ROOM`] bytes in front of every payload (the NBD server reads write
//! data behind that room), so a frame is headed, sealed and sent from the buffer the
//! guest's data arrived in: encryption is the only pass over the data on the way out.
//! The reader reads a frame's body straight into its own vector (after the few bytes it
//! had buffered) and opens it in place; the backup journals that vector as it is.
//! The first frame that does not open (altered, replayed, reordered, dropped, forged)
//! ends the channel: nothing after it is opened.
use std::io::{self, Read, Write};

use zerocopy::{FromBytes, IntoBytes};

use super::wire::{self, Header, Kind, WireError};
use crate::replication::{self, FrameHeader, Opener, Sealer, seal};

/// Room a sender keeps in front of a payload: the replication header, the disk header.
pub const ROOM: usize = replication::HEADER_LEN + wire::HEADER_LEN;
/// Capacity a sender keeps behind a payload: the tag.
pub const TAIL: usize = seal::TAG_LEN;
/// Largest payload of one sealed disk frame (one replication frame holds at most
/// `replication::MAX_PAYLOAD`); larger writes are sent as several WRITE frames.
pub const MAX_DATA: usize = 8 << 20;
const _: () = assert!(ROOM + MAX_DATA + TAIL <= replication::MAX_PAYLOAD as usize);

/// An empty frame buffer for a payload of up to `len` bytes: [`ROOM`] zero bytes, with
/// capacity for the payload and the tag. Append the payload, then [`head`] and [`seal`].
pub fn buffer(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(ROOM + len + TAIL);
    v.resize(ROOM, 0);
    v
}

/// A frame buffer holding `payload` (small frames: control, ZERO lengths).
pub fn frame(kind: Kind, epoch: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = buffer(payload.len());
    v.extend_from_slice(payload);
    head(&mut v, kind, epoch, offset);
    v
}

/// The payload of a frame buffer.
pub fn payload(buf: &[u8]) -> &[u8] {
    &buf[ROOM..]
}

/// Writes the disk header (CRC over it and the payload) into a frame buffer's room.
pub fn head(buf: &mut [u8], kind: Kind, epoch: u64, offset: u64) {
    let h = wire::header(kind, epoch, offset, &buf[ROOM..]);
    buf[replication::HEADER_LEN..ROOM].copy_from_slice(h.as_bytes());
}

/// Seals a headed frame buffer in place (appends the tag): it is then ready to send.
pub fn seal(sealer: &Sealer, buf: &mut Vec<u8>) -> Result<(), WireError> {
    sealer
        .seal_in_place(replication::Kind::Data, buf, 0)
        .map_err(WireError::Channel)
}

/// Builds, seals and writes one small frame.
pub fn send<W: Write>(
    sealer: &Sealer,
    w: &mut W,
    kind: Kind,
    epoch: u64,
    offset: u64,
    payload: &[u8],
) -> Result<(), WireError> {
    let mut f = frame(kind, epoch, offset, payload);
    seal(sealer, &mut f)?;
    w.write_all(&f)?;
    Ok(())
}

/// One opened disk frame: its checked header, and the frame (header, then payload) in
/// the vector it was read into.
#[derive(Debug)]
pub struct Received {
    pub header: Header,
    pub frame: Vec<u8>,
}

impl Received {
    pub fn kind(&self) -> Kind {
        Kind::from_wire(self.header.kind.get())
    }
    pub fn epoch(&self) -> u64 {
        self.header.epoch.get()
    }
    pub fn offset(&self) -> u64 {
        self.header.offset.get()
    }
    pub fn payload(&self) -> &[u8] {
        &self.frame[wire::HEADER_LEN..]
    }
}

/// Bytes read ahead of a frame; bodies beyond it are read straight into their vector.
const READ_AHEAD: usize = 256 << 10;

/// Reads and opens sealed disk frames from a blocking stream (a socket with a read
/// timeout: silence comes back as [`WireError::Io`] with `WouldBlock`/`TimedOut`).
pub struct Reader<R> {
    inner: R,
    opener: Opener,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<R: Read> Reader<R> {
    pub fn new(inner: R, opener: Opener) -> Reader<R> {
        Reader {
            inner,
            opener,
            buf: vec![0u8; READ_AHEAD].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Refills the read-ahead buffer (it is empty). Returns the bytes read.
    fn fill(&mut self) -> io::Result<usize> {
        self.start = 0;
        self.end = 0;
        loop {
            match self.inner.read(&mut self.buf) {
                Ok(n) => {
                    self.end = n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Fills `out` exactly. `at_frame_start`: an end of stream before any byte is a clean
    /// close.
    fn read_into(&mut self, out: &mut [u8], at_frame_start: bool) -> Result<(), WireError> {
        let mut got = 0;
        while got < out.len() {
            if self.start == self.end && self.fill()? == 0 {
                return Err(if at_frame_start && got == 0 {
                    WireError::Closed
                } else {
                    WireError::Io(io::ErrorKind::UnexpectedEof.into())
                });
            }
            let n = (self.end - self.start).min(out.len() - got);
            out[got..got + n].copy_from_slice(&self.buf[self.start..self.start + n]);
            self.start += n;
            got += n;
        }
        Ok(())
    }

    /// Appends exactly `len` bytes to `v`: what is buffered, then the rest straight from
    /// the stream into `v`'s spare capacity (no zero-filling, no second copy).
    fn read_body(&mut self, v: &mut Vec<u8>, len: usize) -> Result<(), WireError> {
        let n = (self.end - self.start).min(len);
        v.extend_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        let mut rest = (len - n) as u64;
        while rest > 0 {
            if rest < (READ_AHEAD / 4) as u64 {
                // Small remainder: through the buffer (one read may bring the next frames).
                if self.fill()? == 0 {
                    return Err(WireError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
                let k = (self.end - self.start).min(rest as usize);
                v.extend_from_slice(&self.buf[self.start..self.start + k]);
                self.start += k;
                rest -= k as u64;
                continue;
            }
            let k = (&mut self.inner).take(rest).read_to_end(v)?;
            if k == 0 {
                return Err(WireError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            rest -= k as u64;
        }
        Ok(())
    }

    /// The next disk frame, opened and checked (kind, flags, sizes). Its CRC is not
    /// checked again: the tag covers every byte of it (the journal checks the CRC
    /// whenever it reads a frame back).
    pub fn recv(&mut self) -> Result<Received, WireError> {
        let mut hb = [0u8; replication::HEADER_LEN];
        self.read_into(&mut hb, true)?;
        let hdr = FrameHeader::read_from_bytes(&hb).map_err(|_| WireError::Closed)?;
        let (kind, len) = replication::check_header(&hdr).map_err(WireError::Channel)?;
        if kind != replication::Kind::Data {
            return Err(WireError::NotDisk(kind));
        }
        let len = len as usize;
        let mut v = Vec::with_capacity(len);
        self.read_body(&mut v, len)?;
        let n = self
            .opener
            .open(&hdr, kind, &mut v)
            .map_err(WireError::Channel)?;
        v.truncate(n);
        let Some(hb) = v.first_chunk::<{ wire::HEADER_LEN }>() else {
            return Err(WireError::Short(n));
        };
        let header = wire::check_header(hb)?;
        if header.len.get() as usize != n - wire::HEADER_LEN {
            return Err(WireError::Short(n));
        }
        Ok(Received { header, frame: v })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::seal::{LIMITS, test_pair};

    #[test]
    fn frames_built_in_place_open_at_the_other_end() {
        let (p, b) = test_pair(LIMITS);
        let mut wire_bytes = Vec::new();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut big = buffer(data.len());
        big.extend_from_slice(&data);
        head(&mut big, Kind::Write, 3, 4096);
        let cap = big.capacity();
        seal(&p.sealer, &mut big).unwrap();
        assert_eq!(big.capacity(), cap, "the tag fits the capacity kept for it");
        wire_bytes.extend_from_slice(&big);
        for i in 0..50u64 {
            let mut f = frame(Kind::Write, 3, i * 512, &[i as u8; 512]);
            seal(&p.sealer, &mut f).unwrap();
            wire_bytes.extend_from_slice(&f);
        }
        send(&p.sealer, &mut wire_bytes, Kind::Cut, 3, 0, &[]).unwrap();
        assert!(
            !wire_bytes.windows(64).any(|w| w == &data[1000..1064]),
            "the data is not on the wire in clear"
        );
        // Delivered in dribbles: the reader reassembles across reads.
        struct Dribble<'a>(&'a [u8]);
        impl Read for Dribble<'_> {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                let n = b.len().min(self.0.len()).min(7777);
                b[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut r = Reader::new(Dribble(&wire_bytes), b.opener.clone());
        let f = r.recv().unwrap();
        assert_eq!((f.kind(), f.epoch(), f.offset()), (Kind::Write, 3, 4096));
        assert!(f.payload() == &data[..]);
        for i in 0..50u64 {
            let f = r.recv().unwrap();
            assert_eq!(f.offset(), i * 512);
            assert_eq!(f.payload(), &[i as u8; 512]);
        }
        assert_eq!(r.recv().unwrap().kind(), Kind::Cut);
        assert!(matches!(r.recv(), Err(WireError::Closed)));
    }

    #[test]
    fn a_flipped_byte_ends_the_channel() {
        let (p, b) = test_pair(LIMITS);
        let mut w = Vec::new();
        for i in 0..3u64 {
            send(&p.sealer, &mut w, Kind::Write, 1, i, &[9; 100]).unwrap();
        }
        let one = w.len() / 3;
        w[one + ROOM + 10] ^= 0x20; // the second frame's data
        let mut r = Reader::new(&w[..], b.opener.clone());
        r.recv().unwrap();
        assert!(matches!(
            r.recv(),
            Err(WireError::Channel(replication::WireError::Forged { .. }))
        ));
        assert!(matches!(
            r.recv(),
            Err(WireError::Channel(replication::WireError::ChannelFailed))
        ));
    }

    #[test]
    fn unsealed_and_foreign_frames_are_refused() {
        let (_, b) = test_pair(LIMITS);
        // A disk frame in clear (what a version 1 primary sent).
        let plain = wire::encode(Kind::Write, 1, 0, &[1; 64]);
        let mut r = Reader::new(&plain[..], b.opener.clone());
        assert!(matches!(
            r.recv(),
            Err(WireError::Channel(replication::WireError::BadMagic { .. }))
        ));
        // A plain relay frame after the handshake.
        let mut relay = Vec::new();
        replication::Message::Data(vec![1; 64]).encode(&mut relay);
        let mut r = Reader::new(&relay[..], b.opener.clone());
        assert!(matches!(
            r.recv(),
            Err(WireError::Channel(replication::WireError::Unsealed { .. }))
        ));
        // A sealed relay frame of another kind (a relay primary on a disk port).
        let (p, b) = test_pair(LIMITS);
        let mut hb = Vec::new();
        p.sealer
            .encode(&replication::Message::Heartbeat { seq: 1 }, &mut hb)
            .unwrap();
        let mut r = Reader::new(&hb[..], b.opener.clone());
        assert!(matches!(r.recv(), Err(WireError::NotDisk(_))));
        // Sealed DATA that is no disk frame (a relay's migration stream).
        let (p, b) = test_pair(LIMITS);
        let mut d = Vec::new();
        p.sealer
            .encode(&replication::Message::Data(vec![0; 64]), &mut d)
            .unwrap();
        let mut r = Reader::new(&d[..], b.opener.clone());
        assert!(matches!(r.recv(), Err(WireError::BadMagic(_))));
    }
}
