//! A small blocking NBD client over a unix socket: the test and benchmark driver of
//! `remus disk` exports (qemu-io is the independent one the tests also use).
//!
//! Owns: one connection, its handshake as a client, requests and simple replies. Never
//! touches: anything on the server side.
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use zerocopy::{FromBytes, IntoBytes};

use super::server::write_all_vectored;
use super::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("NBD client: {0}")]
    Io(#[from] io::Error),
    #[error("the server answered errno {0}")]
    Errno(u32),
    #[error("NBD client: {0}")]
    Nbd(#[from] NbdError),
}

impl ClientError {
    /// The errno of an error reply, if that is what this is.
    pub fn errno(&self) -> Option<u32> {
        match self {
            ClientError::Errno(e) => Some(*e),
            _ => None,
        }
    }
}

pub struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
    size: u64,
    flags: u16,
    cookie: u64,
}

impl Client {
    /// Connects to a unix-socket export and runs the handshake (export name "" = default).
    pub fn connect(path: &Path, name: &str) -> Result<Client, ClientError> {
        let mut s = UnixStream::connect(path)?;
        let (size, flags) = handshake::client(&mut s, name)?;
        let mut c = Client::from_stream(s, size);
        c.flags = flags;
        Ok(c)
    }

    /// A connection already in the transmission phase.
    pub fn from_stream(s: UnixStream, size: u64) -> Client {
        let w = s
            .try_clone()
            .unwrap_or_else(|_| unreachable!("dup of a live socket"));
        Client {
            r: BufReader::with_capacity(64 << 10, s),
            w,
            size,
            flags: EXPORT_FLAGS,
            cookie: 0,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Sends one request (with its payload for writes); returns its cookie.
    pub fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<u64, ClientError> {
        self.cookie += 1;
        let mut req = Request::new(Cmd::Read, flags, self.cookie, offset, len);
        req.kind = U16::new(kind);
        write_all_vectored(
            &mut self.w,
            &mut [IoSlice::new(req.as_bytes()), IoSlice::new(payload)],
        )?;
        Ok(self.cookie)
    }

    /// Reads one simple reply; on success with `data`, reads that much data after it.
    pub fn recv(&mut self, data: Option<&mut [u8]>) -> Result<(u64, u32), ClientError> {
        let mut rb = [0u8; 16];
        self.r.read_exact(&mut rb)?;
        let rep =
            Reply::read_from_bytes(&rb).map_err(|_| NbdError::Protocol("short reply".into()))?;
        if rep.magic.get() != SIMPLE_REPLY_MAGIC {
            return Err(NbdError::Protocol(format!("reply magic {:#x}", rep.magic.get())).into());
        }
        let err = rep.error.get();
        if err == 0
            && let Some(d) = data
        {
            self.r.read_exact(d)?;
        }
        Ok((rep.cookie.get(), err))
    }

    fn call(
        &mut self,
        kind: Cmd,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        data: Option<&mut [u8]>,
    ) -> Result<(), ClientError> {
        let c = self.send(kind as u16, flags, offset, len, payload)?;
        let (got, err) = self.recv(data)?;
        if got != c {
            return Err(NbdError::Protocol(format!("reply for cookie {got}, expected {c}")).into());
        }
        if err != 0 {
            return Err(ClientError::Errno(err));
        }
        Ok(())
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let len = buf.len() as u32;
        self.call(Cmd::Read, 0, offset, len, &[], Some(buf))
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.call(Cmd::Write, flags, offset, data.len() as u32, data, None)
    }

    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.call(Cmd::Flush, 0, 0, 0, &[], None)
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.call(Cmd::Trim, 0, offset, len, &[], None)
    }

    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u32,
        may_punch: bool,
    ) -> Result<(), ClientError> {
        let flags = if may_punch { 0 } else { CMD_FLAG_NO_HOLE };
        self.call(Cmd::WriteZeroes, flags, offset, len, &[], None)
    }

    /// Any request type, no payload (tests of unknown commands).
    pub fn raw(&mut self, kind: u16, flags: u16, offset: u64, len: u32) -> Result<(), ClientError> {
        let c = self.send(kind, flags, offset, len, &[])?;
        let (got, err) = self.recv(None)?;
        if got != c {
            return Err(NbdError::Protocol("reply for another cookie".into()).into());
        }
        if err != 0 {
            return Err(ClientError::Errno(err));
        }
        Ok(())
    }

    /// NBD_CMD_DISC: the server ends the connection without a reply.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.send(Cmd::Disc as u16, 0, 0, 0, &[])?;
        self.w.flush()?;
        Ok(())
    }
}
