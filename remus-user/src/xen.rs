//! Xen, as remus asks it today: xenstore, over xenstored's Unix socket or the kernel's
//! xenbus device. The only module that talks to Xen (DESIGN.md, "Boundaries"); it will
//! hold the libxenctrl calls when the native controller needs them.
//!
//! Owns: a minimal xenstore client (the wire format of `xs_wire.h`: READ, DIRECTORY,
//! WATCH and the WATCH_EVENTs they bring), finding a domain by name or id, and
//! [`XenDomain`], the real [`Hypervisor`] port. Never touches: any decision (the port's
//! rules live in `checkpoint::hypervisor`), libxl's state beyond reading it.
//!
//! Why a client of our own: the one xenstore crate (`xenstore-rs`) is GPL-3.0-only, which
//! a GPL-2.0-only program cannot link; the `xenstore-read`/`-watch` tools would cost a
//! process per read and report a watch without the instant it fired. The protocol needs
//! a 16-byte header and NUL-separated strings: a few dozen lines.
//!
//! ```text
//!   client                               xenstored (oxenstored or C xenstored)
//!   {READ, req 1, "/local/domain/3/name\0"} ──►
//!                                        ◄── {READ, req 1, "guest"}      (or ERROR "ENOENT\0")
//!   {WATCH, req 2, "path\0token\0"}     ──►
//!                                        ◄── {WATCH, req 2, "OK\0"}
//!                                        ◄── {WATCH_EVENT, "path\0token\0"}  (once at once, then
//!                                                                           on every write)
//! ```
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::checkpoint::hypervisor::{
    DomainEvent, DomainFacts, GuestType, Hypervisor, HypervisorError,
};

/// Message types (`xs_wire.h`, `enum xsd_sockmsg_type`).
pub mod xs_type {
    pub const DIRECTORY: u32 = 1;
    pub const READ: u32 = 2;
    pub const WATCH: u32 = 4;
    pub const WATCH_EVENT: u32 = 15;
    pub const ERROR: u32 = 16;
}

/// Largest payload xenstored sends or accepts (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: u32 = 4096;
/// Where xenstore is reached from dom0, in order of preference.
pub const ENDPOINTS: [&str; 3] = [
    "/run/xenstored/socket",
    "/var/run/xenstored/socket",
    "/dev/xen/xenbus",
];

/// One message, header fields and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub kind: u32,
    pub req_id: u32,
    pub tx_id: u32,
    pub payload: Vec<u8>,
}

impl Msg {
    /// The bytes on the wire (native byte order: dom0 and xenstored share a host).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16 + self.payload.len());
        for v in [
            self.kind,
            self.req_id,
            self.tx_id,
            self.payload.len() as u32,
        ] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b.extend_from_slice(&self.payload);
        b
    }

    /// Reads one message; `Ok(None)` at a clean end of the stream.
    pub fn read_from(r: &mut impl Read) -> std::io::Result<Option<Msg>> {
        let mut h = [0u8; 16];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let f = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let len = f(12);
        if len > PAYLOAD_MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("xenstore message of {len} bytes (at most {PAYLOAD_MAX})"),
            ));
        }
        let mut payload = vec![0u8; len as usize];
        r.read_exact(&mut payload)?;
        Ok(Some(Msg {
            kind: f(0),
            req_id: f(4),
            tx_id: f(8),
            payload,
        }))
    }

    /// The NUL-separated strings of the payload (a trailing NUL ends the last one).
    pub fn strings(&self) -> Vec<String> {
        let p = self.payload.strip_suffix(&[0]).unwrap_or(&self.payload);
        if p.is_empty() {
            return Vec::new();
        }
        p.split(|&b| b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    }
}

/// A watch event: the path that fired, its token, and when it was read off the wire.
#[derive(Clone, Debug)]
pub struct WatchEvent {
    pub path: String,
    pub token: String,
    pub at: Instant,
}

/// What the reader thread hands over.
enum Incoming {
    Reply(Msg),
    Closed(String),
}

/// A connection to xenstore: one request at a time, watch events on their own channel.
pub struct Xenstore {
    writer: Box<dyn Write + Send>,
    replies: mpsc::UnboundedReceiver<Incoming>,
    events: mpsc::UnboundedReceiver<WatchEvent>,
    next_id: u32,
    endpoint: String,
}

impl Xenstore {
    /// Connects to the first endpoint of [`ENDPOINTS`] that opens.
    pub fn connect() -> Result<Xenstore, HypervisorError> {
        let mut last = None;
        for ep in ENDPOINTS {
            match Xenstore::connect_at(Path::new(ep)) {
                Ok(x) => return Ok(x),
                Err(e) => last = Some(e),
            }
        }
        Err(HypervisorError::Unreachable {
            tried: ENDPOINTS.join(", "),
            source: last.unwrap_or_else(|| std::io::Error::other("no endpoint")),
        })
    }

    /// Connects to a Unix socket, or opens a character device (xenbus), at `path`.
    pub fn connect_at(path: &Path) -> std::io::Result<Xenstore> {
        let (reader, writer): (Box<dyn Read + Send>, Box<dyn Write + Send>) =
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => (Box::new(s.try_clone()?), Box::new(s)),
                Err(_) if !path.to_string_lossy().ends_with("socket") => {
                    let f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(path)?;
                    (Box::new(f.try_clone()?), Box::new(f))
                }
                Err(e) => return Err(e),
            };
        Ok(Xenstore::over(reader, writer, path.display().to_string()))
    }

    /// A client over any byte stream (tests use a socket pair). Starts the reader thread.
    pub fn over(
        mut reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
        endpoint: String,
    ) -> Xenstore {
        let (rtx, replies) = mpsc::unbounded_channel();
        let (etx, events) = mpsc::unbounded_channel();
        // Blocking reads on their own thread: the xenbus device has no async interface,
        // and the instant a watch fires is taken here, as soon as its bytes arrive.
        std::thread::spawn(move || {
            loop {
                let m = match Msg::read_from(&mut reader) {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        let _ = rtx.send(Incoming::Closed("end of stream".into()));
                        return;
                    }
                    Err(e) => {
                        let _ = rtx.send(Incoming::Closed(e.to_string()));
                        return;
                    }
                };
                let at = Instant::now();
                if m.kind == xs_type::WATCH_EVENT {
                    let mut s = m.strings().into_iter();
                    let ev = WatchEvent {
                        path: s.next().unwrap_or_default(),
                        token: s.next().unwrap_or_default(),
                        at,
                    };
                    if etx.send(ev).is_err() {
                        return;
                    }
                } else if rtx.send(Incoming::Reply(m)).is_err() {
                    return;
                }
            }
        });
        Xenstore {
            writer,
            replies,
            events,
            next_id: 1,
            endpoint,
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn request(
        &mut self,
        op: &'static str,
        kind: u32,
        path: &str,
        payload: Vec<u8>,
    ) -> Result<Msg, HypervisorError> {
        let req_id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let m = Msg {
            kind,
            req_id,
            tx_id: 0,
            payload,
        };
        let err = |detail: String| HypervisorError::Request {
            op,
            path: path.to_string(),
            detail,
        };
        self.writer
            .write_all(&m.encode())
            .and_then(|()| self.writer.flush())
            .map_err(|e| err(e.to_string()))?;
        loop {
            match self.replies.recv().await {
                Some(Incoming::Reply(r)) if r.req_id != req_id => continue,
                Some(Incoming::Reply(r)) if r.kind == xs_type::ERROR => {
                    return Err(err(r.strings().join(" ")));
                }
                Some(Incoming::Reply(r)) => return Ok(r),
                Some(Incoming::Closed(why)) => {
                    return Err(err(format!("connection closed: {why}")));
                }
                None => return Err(HypervisorError::Closed),
            }
        }
    }

    fn nul(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    /// The value at `path`; `None` if it does not exist (ENOENT).
    pub async fn read(&mut self, path: &str) -> Result<Option<String>, HypervisorError> {
        match self
            .request("read", xs_type::READ, path, Xenstore::nul(path))
            .await
        {
            Ok(m) => Ok(Some(String::from_utf8_lossy(&m.payload).into_owned())),
            Err(HypervisorError::Request { detail, .. }) if detail == "ENOENT" => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The children of `path` (empty if it does not exist).
    pub async fn directory(&mut self, path: &str) -> Result<Vec<String>, HypervisorError> {
        match self
            .request("directory", xs_type::DIRECTORY, path, Xenstore::nul(path))
            .await
        {
            Ok(m) => Ok(m.strings()),
            Err(HypervisorError::Request { detail, .. }) if detail == "ENOENT" => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Watches `path` (a node, or a special path such as `@releaseDomain`).
    pub async fn watch(&mut self, path: &str, token: &str) -> Result<(), HypervisorError> {
        let mut p = Xenstore::nul(path);
        p.extend(Xenstore::nul(token));
        self.request("watch", xs_type::WATCH, path, p)
            .await
            .map(|_| ())
    }

    /// The next watch event.
    pub async fn next_event(&mut self) -> Result<WatchEvent, HypervisorError> {
        self.events.recv().await.ok_or(HypervisorError::Closed)
    }
}

/// The domain id of `name_or_id`: a number is taken as it is (and must exist), a name is
/// looked up in `/local/domain/*/name`.
pub async fn find_domain(
    xs: &mut Xenstore,
    name_or_id: &str,
) -> Result<(u32, String), HypervisorError> {
    if let Ok(id) = name_or_id.parse::<u32>() {
        return match xs.read(&format!("/local/domain/{id}/name")).await? {
            Some(name) => Ok((id, name)),
            None => Err(HypervisorError::NoSuchDomain(name_or_id.to_string())),
        };
    }
    for d in xs.directory("/local/domain").await? {
        let Ok(id) = d.parse::<u32>() else { continue };
        if xs
            .read(&format!("/local/domain/{id}/name"))
            .await?
            .as_deref()
            == Some(name_or_id)
        {
            return Ok((id, name_or_id.to_string()));
        }
    }
    Err(HypervisorError::NoSuchDomain(name_or_id.to_string()))
}

const TOKEN_CONTROL: &str = "remus-control";
const TOKEN_RELEASE: &str = "remus-release";

/// The protected domain, seen through xenstore: the real [`Hypervisor`].
pub struct XenDomain {
    xs: Xenstore,
    domid: u32,
    name: String,
    watching: bool,
    /// The first event of each watch is xenstored's answer to registering it.
    initial_left: [bool; 2],
}

impl XenDomain {
    /// Connects to xenstore and finds the domain (`NAME` or id).
    pub async fn open(name_or_id: &str) -> Result<XenDomain, HypervisorError> {
        let mut xs = Xenstore::connect()?;
        let (domid, name) = find_domain(&mut xs, name_or_id).await?;
        Ok(XenDomain::over(xs, domid, name))
    }

    /// The domain `domid` through an open connection.
    pub fn over(xs: Xenstore, domid: u32, name: String) -> XenDomain {
        XenDomain {
            xs,
            domid,
            name,
            watching: false,
            initial_left: [true, true],
        }
    }

    pub fn domid(&self) -> u32 {
        self.domid
    }

    pub fn endpoint(&self) -> &str {
        self.xs.endpoint()
    }

    fn control_path(&self) -> String {
        format!("/local/domain/{}/control/shutdown", self.domid)
    }
}

fn guest_type(s: Option<&str>) -> GuestType {
    match s {
        Some("pv") => GuestType::Pv,
        Some("pvh") => GuestType::Pvh,
        Some("hvm") => GuestType::Hvm,
        _ => GuestType::Unknown,
    }
}

impl Hypervisor for XenDomain {
    async fn facts(&mut self) -> Result<DomainFacts, HypervisorError> {
        let d = self.domid;
        let dom = format!("/local/domain/{d}");
        // libxl records the type it built the domain as (libxl_create.c).
        let ty = self.xs.read(&format!("/libxl/{d}/type")).await?;
        let event_channel = self
            .xs
            .read(&format!("{dom}/device/suspend/event-channel"))
            .await?
            .is_some_and(|v| !v.is_empty());
        let feature_suspend = self
            .xs
            .read(&format!("{dom}/control/feature-suspend"))
            .await?
            .is_some_and(|v| v.trim() == "1");
        let device_model = !self
            .xs
            .directory(&format!("/local/domain/0/device-model/{d}"))
            .await?
            .is_empty();
        Ok(DomainFacts {
            name: self.name.clone(),
            domid: d,
            guest_type: guest_type(ty.as_deref()),
            event_channel,
            feature_suspend,
            device_model,
        })
    }

    async fn next_event(&mut self) -> Result<(DomainEvent, Instant), HypervisorError> {
        if !self.watching {
            let control = self.control_path();
            self.xs.watch(&control, TOKEN_CONTROL).await?;
            self.xs.watch("@releaseDomain", TOKEN_RELEASE).await?;
            self.watching = true;
        }
        loop {
            let ev = self.xs.next_event().await?;
            let (i, kind) = match ev.token.as_str() {
                TOKEN_CONTROL => (0, DomainEvent::ControlWritten),
                TOKEN_RELEASE => (1, DomainEvent::Released),
                _ => continue,
            };
            if std::mem::replace(&mut self.initial_left[i], false) {
                continue;
            }
            return Ok((kind, ev.at));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn watch_event(path: &str, token: &str) -> Msg {
        let mut payload = Xenstore::nul(path);
        payload.extend(Xenstore::nul(token));
        Msg {
            kind: xs_type::WATCH_EVENT,
            req_id: 0,
            tx_id: 0,
            payload,
        }
    }

    /// A fake xenstored (test only): answers READ/DIRECTORY from a table, acknowledges
    /// WATCH with "OK" and the initial event, and fires each watch on demand.
    fn fake_xenstored(
        table: Vec<(&'static str, &'static str)>,
    ) -> (Xenstore, std::sync::mpsc::Sender<&'static str>) {
        let (client, mut server) = UnixStream::pair().unwrap();
        let (fire_tx, fire_rx) = std::sync::mpsc::channel::<&'static str>();
        let mut srv_w = server.try_clone().unwrap();
        let watches = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
        let w2 = watches.clone();
        let mut fire_w = server.try_clone().unwrap();
        std::thread::spawn(move || {
            while let Ok(path) = fire_rx.recv() {
                for (p, tok) in w2.lock().unwrap().iter() {
                    if p == path {
                        let _ = fire_w.write_all(&watch_event(p, tok).encode());
                    }
                }
            }
        });
        std::thread::spawn(move || {
            while let Ok(Some(m)) = Msg::read_from(&mut server) {
                let s = m.strings();
                let reply = |kind, payload: Vec<u8>| Msg {
                    kind,
                    req_id: m.req_id,
                    tx_id: 0,
                    payload,
                };
                let out = match m.kind {
                    xs_type::READ => match table.iter().find(|(k, _)| *k == s[0]) {
                        Some((_, v)) => reply(xs_type::READ, v.as_bytes().to_vec()),
                        None => reply(xs_type::ERROR, b"ENOENT\0".to_vec()),
                    },
                    xs_type::DIRECTORY => {
                        let prefix = format!("{}/", s[0]);
                        let mut kids: Vec<&str> = table
                            .iter()
                            .filter_map(|(k, _)| k.strip_prefix(&prefix))
                            .map(|rest| rest.split('/').next().unwrap_or(rest))
                            .collect();
                        kids.dedup();
                        if kids.is_empty() {
                            reply(xs_type::ERROR, b"ENOENT\0".to_vec())
                        } else {
                            let mut p = Vec::new();
                            for k in kids {
                                p.extend(Xenstore::nul(k));
                            }
                            reply(xs_type::DIRECTORY, p)
                        }
                    }
                    xs_type::WATCH => {
                        watches.lock().unwrap().push((s[0].clone(), s[1].clone()));
                        srv_w
                            .write_all(&reply(xs_type::WATCH, b"OK\0".to_vec()).encode())
                            .unwrap();
                        watch_event(&s[0], &s[1])
                    }
                    _ => reply(xs_type::ERROR, b"ENOSYS\0".to_vec()),
                };
                srv_w.write_all(&out.encode()).unwrap();
            }
        });
        let xs = Xenstore::over(
            Box::new(client.try_clone().unwrap()),
            Box::new(client),
            "fake".into(),
        );
        (xs, fire_tx)
    }

    #[test]
    fn messages_round_trip_and_oversized_ones_are_refused() {
        let m = Msg {
            kind: xs_type::READ,
            req_id: 7,
            tx_id: 0,
            payload: b"/a\0".to_vec(),
        };
        let b = m.encode();
        assert_eq!(b.len(), 19);
        assert_eq!(Msg::read_from(&mut &b[..]).unwrap(), Some(m));
        assert_eq!(Msg::read_from(&mut &b[..0]).unwrap(), None);
        let mut big = b.clone();
        big[12..16].copy_from_slice(&(PAYLOAD_MAX + 1).to_ne_bytes());
        assert!(Msg::read_from(&mut &big[..]).is_err());
        let two = Msg {
            kind: 0,
            req_id: 0,
            tx_id: 0,
            payload: b"x\0tok\0".to_vec(),
        };
        assert_eq!(two.strings(), ["x", "tok"]);
    }

    #[tokio::test]
    async fn a_domain_is_found_by_name_or_id_and_its_facts_read() {
        let (mut xs, _fire) = fake_xenstored(vec![
            ("/local/domain/0/name", "Domain-0"),
            ("/local/domain/4/name", "guest"),
            ("/local/domain/4/control/feature-suspend", "1"),
            ("/libxl/4/type", "pvh"),
        ]);
        assert_eq!(
            find_domain(&mut xs, "guest").await.unwrap(),
            (4, "guest".into())
        );
        assert_eq!(
            find_domain(&mut xs, "4").await.unwrap(),
            (4, "guest".into())
        );
        assert!(matches!(
            find_domain(&mut xs, "nobody").await,
            Err(HypervisorError::NoSuchDomain(_))
        ));
        assert!(matches!(
            find_domain(&mut xs, "9").await,
            Err(HypervisorError::NoSuchDomain(_))
        ));
        let mut d = XenDomain::over(xs, 4, "guest".into());
        let f = d.facts().await.unwrap();
        assert_eq!(f.guest_type, GuestType::Pvh);
        assert!(f.feature_suspend && !f.event_channel && !f.device_model);
    }

    #[tokio::test]
    async fn watch_events_skip_the_registration_echo_and_carry_their_kind() {
        let (xs, fire) = fake_xenstored(vec![("/local/domain/4/name", "guest")]);
        let mut d = XenDomain::over(xs, 4, "guest".into());
        let first = tokio::spawn(async move {
            let a = d.next_event().await.unwrap().0;
            let b = d.next_event().await.unwrap().0;
            let c = d.next_event().await.unwrap().0;
            (a, b, c)
        });
        // Give the watches time to register (their echoes must be skipped, not these).
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        fire.send("/local/domain/4/control/shutdown").unwrap();
        fire.send("/local/domain/4/control/shutdown").unwrap();
        fire.send("@releaseDomain").unwrap();
        let (a, b, c) = tokio::time::timeout(std::time::Duration::from_secs(10), first)
            .await
            .expect("events in time")
            .unwrap();
        assert_eq!(
            (a, b, c),
            (
                DomainEvent::ControlWritten,
                DomainEvent::ControlWritten,
                DomainEvent::Released
            )
        );
    }
}
