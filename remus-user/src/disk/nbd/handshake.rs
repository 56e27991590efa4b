//! The server side of the fixed-newstyle handshake, for userspace clients (qemu-io,
//! qemu-img, the test and benchmark client). The kernel never sees it: `remus disk`
//! hands the kernel a socket already in the transmission phase.
//!
//! Owns: the option haggling up to transmission. Never touches: requests, the backing.
//!
//! ```text
//!  S: NBDMAGIC IHAVEOPT flags(FIXED_NEWSTYLE|NO_ZEROES)
//!  C: client flags
//!  C: IHAVEOPT option len data     (repeated)
//!  S: OPT_REPLY_MAGIC option type len data
//!  ... until EXPORT_NAME (answered with size + flags) or GO (INFO replies, then ACK)
//! ```
use std::io::{Read, Write};

use zerocopy::{FromBytes, IntoBytes};

use super::*;

/// What the export looks like to a client.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    /// Accepted export names: "" (the default export) and this one.
    pub name: String,
    pub size: u64,
    pub flags: u16,
}

impl ExportInfo {
    fn knows(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

fn reply<S: Write>(s: &mut S, option: u32, kind: u32, data: &[u8]) -> Result<(), NbdError> {
    let h = OptionReply {
        magic: U64::new(OPT_REPLY_MAGIC),
        option: U32::new(option),
        kind: U32::new(kind),
        len: U32::new(data.len() as u32),
    };
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    s.write_all(&out)?;
    Ok(())
}

fn reply_error<S: Write>(s: &mut S, option: u32, kind: u32, msg: &str) -> Result<(), NbdError> {
    reply(s, option, kind, msg.as_bytes())
}

/// The data of an INFO or GO option: the name and the information types asked for.
fn parse_go(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let namelen = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + namelen)?;
    let rest = data.get(4 + namelen..)?;
    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let items = rest.get(2..)?;
    if items.len() != n * 2 {
        return None;
    }
    Some((
        name,
        items
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

/// Runs the handshake. `Ok(())` means the client entered the transmission phase.
pub fn serve<S: Read + Write>(s: &mut S, info: &ExportInfo) -> Result<(), NbdError> {
    let mut greet = Vec::with_capacity(18);
    greet.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greet.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greet.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greet)?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let cflags = u32::from_be_bytes(cf);
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {cflags:#x}"
        )));
    }
    let fixed = cflags & FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    loop {
        let mut hb = [0u8; 16];
        s.read_exact(&mut hb)?;
        let h = OptionHeader::read_from_bytes(&hb)
            .map_err(|_| NbdError::Protocol("short option header".into()))?;
        if h.magic.get() != IHAVEOPT {
            return Err(NbdError::Protocol(format!(
                "option magic {:#x} is not IHAVEOPT",
                h.magic.get()
            )));
        }
        let (option, len) = (h.option.get(), h.len.get());
        if len > MAX_OPTION {
            return Err(NbdError::Protocol(format!(
                "option {option} carries {len} bytes (at most {MAX_OPTION})"
            )));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        if !fixed && option != OPT_EXPORT_NAME {
            return Err(NbdError::Protocol(format!(
                "option {option} from a client without fixed newstyle"
            )));
        }
        match option {
            OPT_EXPORT_NAME => {
                if !info.knows(&data) {
                    // No way to answer an error here: the protocol says hang up.
                    return Err(NbdError::Protocol(format!(
                        "unknown export {:?}",
                        String::from_utf8_lossy(&data)
                    )));
                }
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&info.size.to_be_bytes());
                out.extend_from_slice(&info.flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&out)?;
                return Ok(());
            }
            OPT_ABORT => {
                let _ = reply(s, option, REP_ACK, &[]);
                return Err(NbdError::Aborted("NBD_OPT_ABORT"));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_error(s, option, REP_ERR_INVALID, "LIST takes no data")?;
                    continue;
                }
                let mut d = Vec::new();
                d.extend_from_slice(&(info.name.len() as u32).to_be_bytes());
                d.extend_from_slice(info.name.as_bytes());
                reply(s, option, REP_SERVER, &d)?;
                reply(s, option, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, asked)) = parse_go(&data) else {
                    reply_error(s, option, REP_ERR_INVALID, "malformed INFO/GO request")?;
                    continue;
                };
                if !info.knows(name) {
                    reply_error(s, option, REP_ERR_UNKNOWN, "no such export")?;
                    continue;
                }
                let mut e = Vec::with_capacity(12);
                e.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                e.extend_from_slice(&info.size.to_be_bytes());
                e.extend_from_slice(&info.flags.to_be_bytes());
                reply(s, option, REP_INFO, &e)?;
                if asked.contains(&INFO_BLOCK_SIZE) {
                    // Any alignment works (buffered I/O); 4 KiB is what the page cache likes.
                    let mut b = Vec::with_capacity(14);
                    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    b.extend_from_slice(&1u32.to_be_bytes());
                    b.extend_from_slice(&4096u32.to_be_bytes());
                    b.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    reply(s, option, REP_INFO, &b)?;
                }
                reply(s, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(());
                }
            }
            _ => {
                // Structured replies, TLS, meta contexts: not offered.
                reply_error(s, option, REP_ERR_UNSUP, "not supported by remus disk")?;
            }
        }
    }
}

/// The client side, for tests and benchmarks: GO with the given name (falls back to
/// EXPORT_NAME when the server does not know GO). Returns (size, transmission flags).
pub fn client<S: Read + Write>(s: &mut S, name: &str) -> Result<(u64, u16), NbdError> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    if u64::from_be_bytes(g[0..8].try_into().unwrap_or_default()) != NBDMAGIC
        || u64::from_be_bytes(g[8..16].try_into().unwrap_or_default()) != IHAVEOPT
    {
        return Err(NbdError::Protocol("not a newstyle NBD server".into()));
    }
    let hflags = u16::from_be_bytes([g[16], g[17]]);
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())?;
    let mut data = Vec::new();
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let send_opt = |s: &mut S, option: u32, d: &[u8]| -> Result<(), NbdError> {
        let h = OptionHeader {
            magic: U64::new(IHAVEOPT),
            option: U32::new(option),
            len: U32::new(d.len() as u32),
        };
        s.write_all(h.as_bytes())?;
        s.write_all(d)?;
        Ok(())
    };
    send_opt(s, OPT_GO, &data)?;
    let mut size_flags = None;
    loop {
        let mut rb = [0u8; 20];
        s.read_exact(&mut rb)?;
        let r = OptionReply::read_from_bytes(&rb)
            .map_err(|_| NbdError::Protocol("short option reply".into()))?;
        if r.magic.get() != OPT_REPLY_MAGIC {
            return Err(NbdError::Protocol("bad option reply magic".into()));
        }
        let len = r.len.get();
        if len > MAX_OPTION {
            return Err(NbdError::Protocol("oversized option reply".into()));
        }
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d)?;
        match r.kind.get() {
            REP_INFO if d.len() >= 12 && u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT => {
                let size = u64::from_be_bytes(d[2..10].try_into().unwrap_or_default());
                let flags = u16::from_be_bytes([d[10], d[11]]);
                size_flags = Some((size, flags));
            }
            REP_INFO => {}
            REP_ACK => {
                return size_flags.ok_or_else(|| {
                    NbdError::Protocol("GO acknowledged without INFO_EXPORT".into())
                });
            }
            REP_ERR_UNSUP => {
                send_opt(s, OPT_EXPORT_NAME, name.as_bytes())?;
                let mut e = [0u8; 10];
                s.read_exact(&mut e)?;
                if cflags & FLAG_C_NO_ZEROES == 0 {
                    let mut z = [0u8; 124];
                    s.read_exact(&mut z)?;
                }
                return Ok((
                    u64::from_be_bytes(e[0..8].try_into().unwrap_or_default()),
                    u16::from_be_bytes([e[8], e[9]]),
                ));
            }
            other => {
                return Err(NbdError::Server(format!(
                    "the server refused export {name:?}: reply type {other:#x} {}",
                    String::from_utf8_lossy(&d)
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn info() -> ExportInfo {
        ExportInfo {
            name: "web0".into(),
            size: 1 << 20,
            flags: EXPORT_FLAGS,
        }
    }

    fn opt(c: &mut UnixStream, option: u32, data: &[u8]) {
        let h = OptionHeader {
            magic: U64::new(IHAVEOPT),
            option: U32::new(option),
            len: U32::new(data.len() as u32),
        };
        c.write_all(h.as_bytes()).unwrap();
        c.write_all(data).unwrap();
    }

    fn pair() -> (UnixStream, std::thread::JoinHandle<Result<(), NbdError>>) {
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || serve(&mut b, &info()));
        (a, t)
    }

    #[test]
    fn go_with_the_default_or_the_named_export_enters_transmission() {
        for name in ["", "web0"] {
            let (mut c, t) = pair();
            let (size, flags) = client(&mut c, name).unwrap();
            assert_eq!(size, 1 << 20);
            assert_eq!(flags, EXPORT_FLAGS);
            t.join().unwrap().unwrap();
        }
    }

    #[test]
    fn an_unknown_export_is_refused_and_the_client_may_retry() {
        let (mut c, t) = pair();
        let e = client(&mut c, "nope").unwrap_err();
        assert!(matches!(e, NbdError::Server(_)), "{e:?}");
        // Still in option haggling: a good GO now works.
        let mut data = Vec::new();
        data.extend_from_slice(&0u32.to_be_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        opt(&mut c, OPT_GO, &data);
        let mut seen_ack = false;
        while !seen_ack {
            let mut rb = [0u8; 20];
            c.read_exact(&mut rb).unwrap();
            let r = OptionReply::read_from_bytes(&rb).unwrap();
            let mut d = vec![0u8; r.len.get() as usize];
            c.read_exact(&mut d).unwrap();
            seen_ack = r.kind.get() == REP_ACK;
        }
        t.join().unwrap().unwrap();
    }

    #[test]
    fn export_name_path_and_unsupported_options() {
        let (mut c, t) = pair();
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        c.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        // Structured replies are not offered.
        opt(&mut c, 8, &[]);
        let mut rb = [0u8; 20];
        c.read_exact(&mut rb).unwrap();
        let r = OptionReply::read_from_bytes(&rb).unwrap();
        assert_eq!(r.kind.get(), REP_ERR_UNSUP);
        let mut msg = vec![0u8; r.len.get() as usize];
        c.read_exact(&mut msg).unwrap();
        opt(&mut c, OPT_EXPORT_NAME, b"web0");
        let mut e = [0u8; 134];
        c.read_exact(&mut e).unwrap();
        assert_eq!(u64::from_be_bytes(e[0..8].try_into().unwrap()), 1 << 20);
        assert_eq!(&e[10..], &[0u8; 124][..], "zero padding without NO_ZEROES");
        t.join().unwrap().unwrap();
    }

    #[test]
    fn garbage_and_oversized_options_end_the_handshake() {
        let (mut c, t) = pair();
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        c.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        c.write_all(&[0xAAu8; 16]).unwrap();
        assert!(matches!(t.join().unwrap(), Err(NbdError::Protocol(_))));

        let (mut c, t) = pair();
        c.read_exact(&mut g).unwrap();
        c.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        let h = OptionHeader {
            magic: U64::new(IHAVEOPT),
            option: U32::new(OPT_GO),
            len: U32::new(MAX_OPTION + 1),
        };
        c.write_all(h.as_bytes()).unwrap();
        assert!(matches!(t.join().unwrap(), Err(NbdError::Protocol(_))));

        let (mut c, t) = pair();
        c.read_exact(&mut g).unwrap();
        c.write_all(&0x8000_0000u32.to_be_bytes()).unwrap();
        assert!(matches!(t.join().unwrap(), Err(NbdError::Protocol(_))));
    }

    #[test]
    fn abort_ends_cleanly() {
        let (mut c, t) = pair();
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        c.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        opt(&mut c, OPT_ABORT, &[]);
        assert!(matches!(t.join().unwrap(), Err(NbdError::Aborted(_))));
    }
}
