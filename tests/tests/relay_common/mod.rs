//! Fixtures of the relay tests: the real `remus` binary as both relays, the test process
//! as a fake `xl remus` (it writes a Remus-shaped stream from `stream::writer` into a pipe
//! that is the sender's stdin, after reading the banner from the sender's stdout), and a
//! fake receiver (`--receiver-cmd`: a shell line that prints xl's banner and records its
//! stdin to a file per session).
//!
//! Finding the binary: `CARGO_BIN_EXE_remus` only exists inside the remus-user crate, so
//! these tests use `$REMUS_BIN` if set, else `target/<profile>/remus` next to the test
//! executable, and build it with `cargo build -p remus-user --bin remus` when it is not
//! there (CI's `cargo test --workspace` builds it anyway).
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use remus_user::relay::BANNER;
use remus_user::replication::{self, FrameReader, Key, Message, ServerConfig, WireError};
use remus_user::stream::Event;
use remus_user::stream::writer::{WriterConfig, Written, write};

/// Heartbeats of the tests unless a test sets its own: generous, because debug builds
/// share two cores with parallel tests (and other builds); only detection waits on it.
pub const TEST_HEARTBEAT: [&str; 4] =
    ["--heartbeat-interval", "100ms", "--heartbeat-timeout", "3s"];

fn with_heartbeat<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = extra.to_vec();
    if !extra.iter().any(|a| a.starts_with("--heartbeat")) {
        v.extend_from_slice(&TEST_HEARTBEAT);
    }
    v
}

/// Guards against hangs only: no test asserts on time.
pub const HANG_GUARD: Duration = Duration::from_secs(120);

/// `remus` inside network namespace `netns` (through `nsenter`, which execs: the child is
/// `remus` itself, and its BPF pins stay in the real bpffs), or in ours.
pub fn remus_command(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}"))
                .arg("--")
                .arg(remus_bin());
            c
        }
        None => Command::new(remus_bin()),
    }
}

/// Payloads the guest sent to UDP `port`, as seen at the peer, in arrival order.
pub fn udp_payloads(frames: &[remus_tests::netns::Captured], port: u16) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f.from_guest())
        .filter_map(|f| f.udp())
        .filter(|(p, _)| *p == port)
        .filter_map(|(_, pl)| std::str::from_utf8(pl).ok().map(str::to_string))
        .collect()
}

/// Ten payloads "eN:0" … "eN:9": what the guest sends in epoch `e`.
pub fn epoch_payloads(e: u32) -> Vec<Vec<u8>> {
    (0..10).map(|i| format!("e{e}:{i}").into_bytes()).collect()
}

pub fn remus_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        remus_testkit::bins::for_this_test("remus", "REMUS_BIN").unwrap_or_else(|e| panic!("{e}"))
    })
    .clone()
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("remus-relay-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// A key file with mode 0600.
    pub fn key(&self, name: &str, content: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }
    /// The one session the receiver recorded (asserts there was exactly one).
    pub fn only_session(&self) -> Vec<u8> {
        let mut sessions = self.sessions();
        assert_eq!(sessions.len(), 1, "receiver sessions");
        sessions.remove(0)
    }
    /// What each receiver session recorded, in session order (pid order is start order
    /// only by accident, so sort by modification time).
    pub fn sessions(&self) -> Vec<Vec<u8>> {
        let mut v: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&self.0)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("session.")
            })
            .map(|p| {
                (
                    std::fs::metadata(&p)
                        .unwrap()
                        .created()
                        .unwrap_or(std::time::UNIX_EPOCH),
                    p,
                )
            })
            .collect();
        v.sort();
        v.into_iter()
            .map(|(_, p)| std::fs::read(p).unwrap())
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The fake receiver: prints the banner, then records stdin until it is closed.
pub fn fake_receiver_cmd(dir: &Path) -> String {
    format!(
        "printf 'xl migration receiver ready, send binary domain data.\\n'; exec cat > {}/session.$$",
        dir.display()
    )
}

/// The fake receiver that also says whether its stream ended cleanly: it records stdin,
/// and only once `cat` saw the end does it create `eof.$$` (a receiver killed while its
/// stream is open never does).
pub fn eof_marking_receiver_cmd(dir: &Path) -> String {
    format!(
        "printf 'xl migration receiver ready, send binary domain data.\\n'; cat > {d}/session.$$; : > {d}/eof.$$",
        d = dir.display()
    )
}

/// How many receivers saw their stream end (`eof.*` files of `eof_marking_receiver_cmd`).
pub fn clean_ends(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("eof."))
        .count()
}

pub fn status(sock: &Path) -> Option<serde_json::Value> {
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    serde_json::from_str(out.trim()).ok()
}

/// Polls `sock` until `pred` holds (hang guard only).
pub fn wait_status(
    sock: &Path,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = Instant::now();
    loop {
        if let Some(v) = status(sock).filter(|v| pred(v)) {
            return v;
        }
        assert!(
            t.elapsed() < HANG_GUARD,
            "gave up waiting for {what} on {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A receiver's status whose last event is the failover after checkpoint `n`.
pub fn assert_failed_over_after(s: &serde_json::Value, n: u64) {
    let event = s["last_event"].as_str().expect("a last event");
    assert!(event.contains(&format!("after checkpoint {n}")), "{s}");
}

pub fn wait_child(c: &mut Child, what: &str) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st;
        }
        assert!(
            t.elapsed() < HANG_GUARD,
            "gave up waiting for {what} to exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn signal(c: &Child, sig: i32) {
    // SAFETY: kill on a child we spawned and have not reaped.
    unsafe {
        libc::kill(c.id() as i32, sig);
    }
}

pub struct Receiver {
    pub child: Child,
    pub status_sock: PathBuf,
    pub addr: String,
    pub log: PathBuf,
}

impl Receiver {
    /// Starts `remus relay receive` on an ephemeral loopback port with the fake receiver.
    pub fn start(dir: &Scratch, key: &Path, once: bool, extra: &[&str]) -> Receiver {
        Receiver::start_with(None, dir, key, &fake_receiver_cmd(dir.path()), once, extra)
    }

    /// The same with receiver command `receiver`, inside network namespace `netns` (through
    /// `nsenter`, which execs: the child is the relay itself) or in ours.
    pub fn start_with(
        netns: Option<&str>,
        dir: &Scratch,
        key: &Path,
        receiver: &str,
        once: bool,
        extra: &[&str],
    ) -> Receiver {
        let status_sock = dir.path().join("relay-receive.sock");
        let log = dir.path().join("receive.log");
        let mut cmd = remus_command(netns);
        cmd.args(["relay", "receive", "--listen", "127.0.0.1:0", "--key-file"])
            .arg(key)
            .arg("--receiver-cmd")
            .arg(receiver)
            .arg("--status-socket")
            .arg(&status_sock)
            .args(with_heartbeat(extra))
            .env("REMUS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        if once {
            cmd.arg("--once");
        }
        let child = cmd.spawn().expect("starting remus relay receive");
        let st = wait_status(&status_sock, "the receiver to listen", |v| {
            v["state"] == "waiting for primary"
        });
        let addr = st["address"].as_str().unwrap().to_string();
        Receiver {
            child,
            status_sock,
            addr,
            log,
        }
    }

    pub fn status(&self) -> serde_json::Value {
        status(&self.status_sock).expect("receiver status")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for it to exit and asserts its exit code (its log otherwise).
    pub fn expect_exit(&mut self, code: i32) {
        let got = wait_child(&mut self.child, "relay receive").code();
        assert_eq!(got, Some(code), "receiver log:\n{}", self.log());
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pipe whose read end becomes the sender's stdin (as xl's pipe does).
fn pipe() -> (OwnedFd, File) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds on success.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2");
    // SAFETY: both fds are fresh and owned here.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

pub struct Sender {
    pub child: Child,
    pub stdin: Option<File>,
    pub stdout: ChildStdout,
    pub status_sock: PathBuf,
    pub log: PathBuf,
    /// Whether the relay narrows xl's pipe to one page once it caught up (it does unless
    /// told otherwise with `--xl-pipe-narrow-bytes`).
    narrows: bool,
}

impl Sender {
    /// Starts `remus relay send --no-buffer` (the buffer is tested elsewhere) as xl would.
    pub fn start(dir: &Scratch, name: &str, addr: &str, key: &Path, extra: &[&str]) -> Sender {
        Sender::start_in(None, dir, name, &["--no-buffer"], addr, key, extra)
    }

    /// Starts `remus relay send BUFFER…` inside network namespace `netns` (through
    /// `nsenter`, so its BPF pins stay in the real bpffs), or in ours.
    pub fn start_in(
        netns: Option<&str>,
        dir: &Scratch,
        name: &str,
        buffer: &[&str],
        addr: &str,
        key: &Path,
        extra: &[&str],
    ) -> Sender {
        let (r, w) = pipe();
        let status_sock = dir.path().join(format!("relay-send-{name}.sock"));
        let log = dir.path().join(format!("send-{name}.log"));
        let child = remus_command(netns)
            .args(["relay", "send"])
            .args(buffer)
            .args(["--backup", addr, "--key-file"])
            .arg(key)
            .arg("--status-socket")
            .arg(&status_sock)
            .args(with_heartbeat(extra))
            .env(
                "REMUS_LOG",
                std::env::var("TEST_SEND_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::from(r))
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("starting remus relay send");
        let mut child = child;
        let stdout = child.stdout.take().unwrap();
        Sender {
            child,
            stdin: Some(w),
            stdout,
            status_sock,
            log,
            narrows: !extra.contains(&"--xl-pipe-narrow-bytes"),
        }
    }

    /// What xl does first: wait for the banner.
    pub fn read_banner(&mut self) -> Vec<u8> {
        let mut b = vec![0u8; BANNER.len()];
        self.stdout
            .read_exact(&mut b)
            .expect("the banner on the sender's stdout");
        b
    }

    /// Writes stream bytes, paced per checkpoint as libxl would (checkpoint then pause).
    pub fn write(&mut self, bytes: &[u8]) {
        self.stdin
            .as_mut()
            .expect("stdin open")
            .write_all(bytes)
            .expect("writing the stream into xl's pipe");
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        status(&self.status_sock)
    }

    /// Its control socket (the status socket's path with `.ctl`, the relay's default).
    pub fn control_sock(&self) -> PathBuf {
        self.status_sock.with_extension("ctl")
    }

    /// Asks it to end protection (`remus unprotect` on a primary comes down to this).
    pub fn end_protection(&self) -> remus_user::relay::control::EndAnswer {
        let sock = self.control_sock();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(remus_user::relay::control::end_protection(
                &sock, HANG_GUARD,
            ))
            .unwrap_or_else(|e| panic!("asking the sender to end protection: {e}\n{}", self.log()))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for it to exit and asserts its exit code (its log otherwise).
    pub fn expect_exit(&mut self, code: i32) {
        let got = wait_child(&mut self.child, "relay send").code();
        assert_eq!(got, Some(code), "sender log:\n{}", self.log());
    }

    /// Closes xl's end of the pipe and expects the sender to end cleanly (exit 0).
    pub fn finish(&mut self) {
        self.close_stdin();
        self.expect_exit(0);
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = self.child.kill();
        signal(&self.child, libc::SIGCONT);
        let _ = self.child.wait();
    }
}

/// A stream and the offsets where each checkpoint ends (index 0 = checkpoint 1).
pub struct Stream {
    pub w: Written,
    pub ends: Vec<u64>,
}

impl Stream {
    pub fn new(cfg: &WriterConfig) -> Stream {
        let w = write(cfg);
        let ends = w.checkpoint_ends();
        Stream { w, ends }
    }

    /// A stream from its bytes (e.g. a captured one); the parser finds the ends.
    pub fn from_bytes(bytes: Vec<u8>) -> Stream {
        let mut events = Vec::new();
        remus_user::stream::Parser::new()
            .feed(&bytes, &mut events)
            .expect("the stream parses");
        let w = Written {
            bytes,
            events,
            page_records: Vec::new(),
        };
        let ends = w.checkpoint_ends();
        Stream { w, ends }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.w.bytes
    }

    /// Bytes of checkpoint `n` (1-based): from the end of n-1 to the end of n.
    pub fn checkpoint(&self, n: usize) -> &[u8] {
        let start = if n == 1 { 0 } else { self.ends[n - 2] as usize };
        &self.w.bytes[start..self.ends[n - 1] as usize]
    }

    pub fn through(&self, n: usize) -> &[u8] {
        &self.w.bytes[..self.ends[n - 1] as usize]
    }
}

impl Sender {
    /// Writes checkpoint `n` as libxc does: once the relay caught up (libxl suspends the
    /// guest only after its interval, by which time a relay that keeps up has read
    /// everything), checkpoint 1's live copy, a pause while the guest is being suspended
    /// (the relay catches up meanwhile), then its end.
    pub fn write_checkpoint(&mut self, st: &Stream, n: usize) {
        self.wait_drained();
        let cp = st.checkpoint(n);
        if n == 1 {
            let (live, tail) = cp.split_at(st.first_post_suspend() as usize);
            self.write(live);
            self.wait_drained();
            self.write(tail);
        } else {
            self.write(cp);
        }
    }

    /// Waits until the relay has read everything written so far and narrowed its pipe
    /// again (as libxl's suspend or interval lets it when it keeps up): the relay then
    /// waits for the next suspend ready to prove its cut. A relay told to keep its pipe
    /// wide is waited for 50 ms after it has read everything. (Not a timed wait for a
    /// relay that narrows: on a loaded machine it may narrow well after it emptied the
    /// pipe, and a checkpoint written into the wide pipe meanwhile would be merged.)
    pub fn wait_drained(&mut self) {
        let Some(w) = self.stdin.as_ref() else {
            return;
        };
        let fd = w.as_raw_fd();
        let t = Instant::now();
        let mut empty_since: Option<Instant> = None;
        loop {
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD on our end of the pipe writes one int; F_GETPIPE_SZ reads
            // the capacity of the pipe (shared by both ends).
            let (r, size) = unsafe {
                (
                    libc::ioctl(fd, libc::FIONREAD, &mut n),
                    libc::fcntl(fd, libc::F_GETPIPE_SZ),
                )
            };
            if r < 0 || t.elapsed() > HANG_GUARD {
                return;
            }
            if n == 0 {
                let since = *empty_since.get_or_insert_with(Instant::now);
                if size == 4096 || (!self.narrows && since.elapsed() > Duration::from_millis(50)) {
                    return;
                }
            } else {
                empty_since = None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Stream {
    /// The first post-suspend byte of checkpoint 1.
    pub fn first_post_suspend(&self) -> u64 {
        self.w
            .events
            .iter()
            .find_map(|e| match *e {
                Event::PostSuspendStart { checkpoint: 1, pos } => Some(pos),
                _ => None,
            })
            .expect("checkpoint 1 has a post-suspend record")
    }

    /// Bytes xl writes of checkpoint 1 from its first post-suspend byte up to the end of
    /// libxc's CHECKPOINT record: what the pipe proof of checkpoint 1 has to work with.
    pub fn first_tail(&self) -> u64 {
        let end = self
            .w
            .events
            .iter()
            .find_map(|e| match *e {
                Event::LibxcCheckpoint { checkpoint: 1, end } => Some(end),
                _ => None,
            })
            .expect("checkpoint 1 has a CHECKPOINT record");
        end - self.first_post_suspend()
    }
}

/// Writes checkpoints `from..=to` into the sender, pausing between them as the interval
/// of `xl remus` does.
pub fn feed(s: &mut Sender, st: &Stream, from: usize, to: usize) {
    for n in from..=to {
        s.write_checkpoint(st, n);
        s.wait_drained();
    }
}

/// A runtime for a test that speaks the protocol itself (a fake primary or backup).
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Reads until something other than a heartbeat arrives.
pub async fn next_real<R: tokio::io::AsyncRead + Unpin>(
    r: &mut FrameReader<R>,
) -> Result<Message, WireError> {
    loop {
        match r.next().await? {
            Message::Heartbeat { .. } => continue,
            m => return Ok(m),
        }
    }
}

/// What the fake backup of `fake_backup` is told to do.
pub enum Cmd {
    Ack(u64),
    Drop,
}

/// A backup that authenticates, sends the banner, swallows the stream, heartbeats, and
/// sends ACK(N) only on command. Runs on its own thread; `listener` is bound in the
/// sender's namespace.
pub fn fake_backup(
    listener: std::net::TcpListener,
    mut cmds: tokio::sync::mpsc::UnboundedReceiver<Cmd>,
    key: &'static str,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            let (mut s, _) = l.accept().await.unwrap();
            let cfg = ServerConfig { key: Key::from_bytes(key.as_bytes()).unwrap(), timeout: Duration::from_secs(30) };
            let session = replication::server_handshake(&mut s, &cfg).await.expect("the sender authenticates");
            let sealer = session.keys.sealer.clone();
            sealer.send(&mut s, &Message::Welcome).await.unwrap();
            sealer.send(&mut s, &Message::Banner(BANNER.to_vec())).await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = FrameReader::new(r, session.keys.opener.clone());
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    m = r.next() => if m.is_err() { return },
                    _ = tick.tick() => {
                        if sealer.send(&mut w, &Message::Heartbeat { seq: 0 }).await.is_err() { return }
                    }
                    c = cmds.recv() => match c {
                        Some(Cmd::Ack(n)) => sealer.send(&mut w, &Message::ack(n)).await.unwrap(),
                        // Dropping both halves resets the connection: the backup is gone.
                        Some(Cmd::Drop) | None => return,
                    },
                }
            }
        });
    })
}

/// `remus relay send BUFFER…` started in network namespace `host` against a
/// [`fake_backup`] listening there, past the banner. The heartbeat timeout is long: the
/// ACKs are withheld on purpose, the heartbeats are not.
pub struct FakeBackupRun {
    pub dir: Scratch,
    pub tx: Sender,
    pub cmds: tokio::sync::mpsc::UnboundedSender<Cmd>,
    pub backup: std::thread::JoinHandle<()>,
}

pub fn relay_against_fake_backup(
    host: &str,
    scratch: &str,
    buffer: &[&str],
    key: &'static str,
) -> FakeBackupRun {
    let dir = Scratch::new(scratch);
    let key_file = dir.key("key", key);
    let listener =
        remus_tests::netns::in_netns(host, || std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let addr = listener.local_addr().unwrap().to_string();
    let (cmds, cmd_rx) = tokio::sync::mpsc::unbounded_channel();
    let backup = fake_backup(listener, cmd_rx, key);
    let hb = [
        "--heartbeat-interval",
        "100ms",
        "--heartbeat-timeout",
        "30s",
    ];
    let mut tx = Sender::start_in(Some(host), &dir, "a", buffer, &addr, &key_file, &hb);
    assert_eq!(tx.read_banner(), BANNER, "sender log:\n{}", tx.log());
    FakeBackupRun {
        dir,
        tx,
        cmds,
        backup,
    }
}

/// The address and MAC of a guest's second NIC ([`SecondNic`]).
pub const GUEST2_IP: &str = "10.77.0.3";
pub const GUEST2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];

/// A guest's second NIC: its own namespace (`<prefix>g2`) behind a vif of its own on the
/// topology's bridge (`<prefix>w<suffix>`: `-emu` plays an HVM guest's emulated NIC).
/// Removed on drop (with the vif's remus-net files and pins), before the topology.
pub struct SecondNic {
    pub ns: String,
    pub vif: String,
    host: String,
}

impl SecondNic {
    pub fn add(t: &remus_tests::netns::Topo, suffix: &str) -> SecondNic {
        use remus_testkit::frames::mac_str;
        let s = SecondNic {
            ns: format!("{}g2", t.prefix),
            vif: format!("{}w{suffix}", t.prefix),
            host: t.host.clone(),
        };
        s.remove();
        remus_testkit::ns::create(&s.ns, false).expect("the second NIC's namespace");
        let ip = |ns: &str, args: &[&str]| {
            remus_testkit::cmd::ip(ns, args).unwrap_or_else(|e| panic!("{e}"));
        };
        let veth = [
            "link", "add", &s.vif, "type", "veth", "peer", "name", "eth0", "netns", &s.ns,
        ];
        ip(&t.host, &veth);
        ip(&t.host, &["link", "set", &s.vif, "master", "br0"]);
        ip(&t.host, &["link", "set", &s.vif, "up"]);
        let mac = mac_str(&GUEST2_MAC);
        ip(&s.ns, &["link", "set", "eth0", "address", &mac]);
        let addr = format!("{GUEST2_IP}/24");
        ip(&s.ns, &["addr", "add", &addr, "dev", "eth0"]);
        ip(&s.ns, &["link", "set", "eth0", "up"]);
        let peer_mac = mac_str(&remus_tests::netns::PEER_MAC);
        let neigh = [
            "neigh",
            "replace",
            remus_tests::netns::PEER_IP,
            "lladdr",
            &peer_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ];
        ip(&s.ns, &neigh);
        s
    }

    /// The device model unplugs the NIC: its vif leaves the host (the veth pair goes).
    pub fn unplug(&self) {
        remus_testkit::cmd::ip(&self.host, &["link", "del", &self.vif])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn files(&self) -> Vec<PathBuf> {
        ["json", "sock", "log"]
            .iter()
            .map(|x| PathBuf::from(format!("/run/remus/net-{}.{x}", self.vif)))
            .collect()
    }

    fn remove(&self) {
        if Path::new(&format!("/run/netns/{}", self.host)).exists() {
            let bin = remus_tests::netns::remus_net_bin();
            let _ = remus_testkit::cmd::run_in(
                &self.host,
                &bin.to_string_lossy(),
                &["detach", &self.vif, "--drop"],
            );
            let _ = remus_testkit::cmd::ip(&self.host, &["link", "del", &self.vif]);
        }
        remus_testkit::ns::remove(&self.ns);
        for f in self.files() {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/remus/{}", self.vif));
    }
}

impl Drop for SecondNic {
    fn drop(&mut self) {
        self.remove();
    }
}
