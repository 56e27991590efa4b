//! `remus protect`'s supervisor end to end (root): the real `remus` binary as the relay
//! pair, the real eBPF buffer on a veth standing in for the guest's vif, and `FakeXl`, a
//! shell stand-in for `xl remus … -s '' DOMAIN RUNE` that writes a stream captured in the
//! lab into the transport command (tests/fixtures/remus-pv-stream.bin.zst) and keeps it
//! open for a while, like a guest that stays up. The checks are not run here (they need
//! Xen; tests/protect_plan.rs drives them with fakes): the plan is built by hand.
//!
//! Each test: the state file goes through `protected` with acknowledged checkpoints, and
//! the ending is the documented one (xl ends → domain ended, exit 0; backup killed →
//! backup lost, exit 4, buffer left open; SIGTERM → protection ended cleanly: the
//! backup's receiver killed before its stream ended, no failover, exit 0, the buffer
//! released and gone).
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use remus_user::config::Config;
use remus_user::exit::ExitCode;
use remus_user::protect::checks::{Host, LeftBuffer, Plan};
use remus_user::protect::host::RealHost;
use remus_user::protect::run::{self, RunOptions};
use remus_user::protect::state::{self, Phase, ProtectState};
use remus_user::protect::xen::{GuestType, SuspendPath};

/// One at a time: the SIGTERM test signals this whole process.
static SERIAL: Mutex<()> = Mutex::new(());

const KEY: &str = "0123456789abcdef0123456789abcdef\n";

const FAKE_XL: &str = r#"#!/bin/sh
# FakeXl: `xl remus [opts] DOMAIN RUNE` stand-in. Runs RUNE like xl (sh -c, stdin a pipe),
# writes $FAKE_XL_STREAM into it, keeps the pipe open $FAKE_XL_HOLD seconds, then closes
# it. Exits 1 if the transport failed (xl: "Backup failed? resuming domain at primary"),
# else 0 (xl: the domain was destroyed). On SIGTERM it exits, closing the pipe, as xl does.
for a; do rune=$a; done
fifo=$(mktemp -u)
back=$(mktemp -u)
mkfifo "$fifo" "$back"
sh -c "$rune" <"$fifo" >"$back" &
t=$!
exec 3>"$fifo" 4<"$back"
rm -f "$fifo" "$back"
trap 'exit 143' TERM
# Like xl: nothing is written before the receiver's 54-byte banner has arrived.
head -c 54 <&4 >/dev/null
cat "$FAKE_XL_STREAM" >&3 2>/dev/null
i=0
while [ "$i" -lt "$FAKE_XL_HOLD" ] && kill -0 "$t" 2>/dev/null; do
    sleep 1 3>&-
    i=$((i + 1))
done
exec 3>&-
wait $t
[ $? -eq 0 ] || exit 1
exit 0
"#;

struct Env {
    dir: tempfile::TempDir,
    vif: String,
    peer: String,
    receiver: Child,
    port: u16,
}

impl Env {
    fn new(tag: &str) -> Env {
        assert!(
            RealHost.is_root(),
            "root_protect_* tests need root (the eBPF buffer); CI runs them as root"
        );
        let dir = tempfile::tempdir().unwrap();
        // The stream, decompressed once.
        let zst =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/remus-pv-stream.bin.zst");
        let mut dec =
            ruzstd::decoding::StreamingDecoder::new(std::fs::File::open(zst).unwrap()).unwrap();
        let mut stream = Vec::new();
        dec.read_to_end(&mut stream).unwrap();
        std::fs::write(dir.path().join("stream.bin"), &stream).unwrap();
        std::fs::write(dir.path().join("key"), KEY).unwrap();
        std::fs::set_permissions(
            dir.path().join("key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let xl = dir.path().join("xl");
        std::fs::write(&xl, FAKE_XL).unwrap();
        std::fs::set_permissions(&xl, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The guest's vif: one end of a veth pair (names of at most 15 bytes).
        let id = std::process::id() % 100_000;
        let vif = format!("rp{tag}{id}a");
        let peer = format!("rp{tag}{id}b");
        let ip = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        let _ = Command::new("ip")
            .args(["link", "del", &vif])
            .stderr(Stdio::null())
            .status();
        ip(&["link", "add", &vif, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &vif, "up"]);
        ip(&["link", "set", &peer, "up"]);
        // The backup: the real relay with a receiver that prints xl's banner and keeps the
        // stream.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let receiver = Command::new(env!("CARGO_BIN_EXE_remus"))
            .args([
                "relay",
                "receive",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--key-file",
            ])
            .arg(dir.path().join("key"))
            .args(["--heartbeat-interval", "200ms", "--heartbeat-timeout", "2s"])
            .arg("--status-socket")
            .arg(dir.path().join("relay-receive.sock"))
            .arg("--receiver-cmd")
            .arg(format!(
                "printf 'xl migration receiver ready, send binary domain data.\\n'; cat >{}; : >{}",
                dir.path().join("received.bin").display(),
                dir.path().join("received.eof").display()
            ))
            .arg("--discard-cmd")
            .arg(format!(
                "printf '%s' \"$REMUS_DOMAIN\" >{}",
                dir.path().join("discarded").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        Env {
            dir,
            vif,
            peer,
            receiver,
            port,
        }
    }

    fn plan(&self) -> Plan {
        let mut settings = Config::default().settings("fake");
        settings.key_file = self.dir.path().join("key");
        settings.heartbeat_interval = Duration::from_millis(200);
        settings.heartbeat_timeout = Duration::from_secs(2);
        Plan {
            domain: "fake".into(),
            domid: 99,
            guest_type: GuestType::Pv,
            vifs: vec![self.vif.clone()],
            backup: format!("127.0.0.1:{}", self.port),
            settings,
            unsafe_disks: vec![],
            has_disks: false,
            suspend: SuspendPath::ControlNode,
            warnings: vec![],
        }
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// Runs the supervisor on a thread; returns its handle.
    fn start(&self, hold_s: u32) -> std::thread::JoinHandle<ExitCode> {
        let plan = self.plan();
        let o = RunOptions {
            xl: self.dir.path().join("xl").display().to_string(),
            exe: PathBuf::from(env!("CARGO_BIN_EXE_remus")),
            run_dir: self.run_dir(),
        };
        // SAFETY (env): set before the supervisor's thread starts; read by its children.
        unsafe {
            std::env::set_var("FAKE_XL_STREAM", self.dir.path().join("stream.bin"));
            std::env::set_var("FAKE_XL_HOLD", hold_s.to_string());
        }
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(run::run(plan, o))
        })
    }

    fn state(&self) -> Option<ProtectState> {
        state::read_json(&state::protect_path(&self.run_dir(), "fake"))
    }

    /// Waits until the state file says `protected` with checkpoint `n` acknowledged.
    fn wait_protected(&self, n: u64) -> ProtectState {
        let t = Instant::now();
        loop {
            if let Some(s) = self.state() {
                if s.phase == Phase::Protected && s.last_acked >= n {
                    return s;
                }
                assert!(!s.phase.is_final(), "ended before it was protected: {s:?}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "not protected within 60 s: {:?}",
                self.state()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.receiver.kill();
        let _ = self.receiver.wait();
        let _ = Command::new(env!("CARGO_BIN_EXE_remus-net"))
            .args(["detach", &self.vif])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip").args(["link", "del", &self.vif]).status();
        let _ = &self.peer;
    }
}

/// The fixture's checkpoints after the initial copy (its README: 3).
const CHECKPOINTS: u64 = 3;

#[test]
fn root_protect_supervises_xl_remus_until_the_domain_ends() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("e");
    let h = env.start(4);
    let s = env.wait_protected(CHECKPOINTS);
    assert_eq!(s.vif, env.vif);
    assert!(
        s.held_frames.is_some(),
        "the buffer's status was read: {s:?}"
    );
    assert!(s.checkpoints_per_s.is_some() || s.last_acked >= 1);
    // `remus status` shows it, with the relay's own view.
    let rows = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(remus_user::protect::status::collect(
            &env.run_dir(),
            Some("fake"),
            Duration::ZERO,
        ));
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].phase, Some(Phase::Protected));
    // (Its state words say "supervisor gone": the supervisor is this test process, whose
    // argv is not `remus protect`, which is how a recycled pid is told apart.)
    let relay = rows[0].relay.as_ref().expect("the relay's own status");
    assert_eq!(relay.role, remus_user::relay::status::Role::Send);
    assert!(rows[0].last_acked >= Some(CHECKPOINTS), "{:?}", rows[0]);
    // FakeXl closes the stream: xl remus ended because the domain did.
    assert_eq!(h.join().unwrap(), ExitCode::Ok);
    let s = env.state().unwrap();
    assert_eq!(s.phase, Phase::DomainEnded, "{s:?}");
    assert_eq!(s.exit_code, Some(0));
    // The backup received the stream byte for byte.
    let sent = std::fs::read(env.dir.path().join("stream.bin")).unwrap();
    let got = std::fs::read(env.dir.path().join("received.bin")).unwrap();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent);
    // The relay ended normally and left the buffer holding what came after the last ACK.
    assert_eq!(RealHost.buffer_on(&env.vif), LeftBuffer::Holding);
}

#[test]
fn root_protect_reports_a_lost_backup_and_leaves_the_buffer_open() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut env = Env::new("l");
    let h = env.start(30);
    env.wait_protected(CHECKPOINTS);
    // The backup host dies.
    env.receiver.kill().unwrap();
    env.receiver.wait().unwrap();
    let t = Instant::now();
    let code = h.join().unwrap();
    assert_eq!(code, ExitCode::PeerLost);
    assert!(t.elapsed() < Duration::from_secs(40));
    let s = env.state().unwrap();
    assert_eq!(s.phase, Phase::BackupLost, "{s:?}");
    assert_eq!(s.exit_code, Some(4));
    // The relay released what it held and left the program passing traffic: a new
    // protect may take it over.
    assert_eq!(RealHost.buffer_on(&env.vif), LeftBuffer::Passthrough);
}

#[test]
fn root_protect_stop_ends_protection_without_a_failover_and_opens_the_output() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("s");
    let h = env.start(60);
    env.wait_protected(CHECKPOINTS);
    // What `systemctl stop` and `remus unprotect` do (the supervisor listens for SIGTERM
    // in this process).
    // SAFETY: kill(2) on our own pid.
    unsafe { libc::kill(std::process::id() as i32, libc::SIGTERM) };
    assert_eq!(h.join().unwrap(), ExitCode::Ok);
    let s = env.state().unwrap();
    assert_eq!(s.phase, Phase::Unprotected, "{s:?}");
    assert_eq!(s.exit_code, Some(0));
    assert_eq!(s.output, Some(run::Output::Open));
    // Everything held went out and the relay took its buffer off the vif.
    assert_eq!(RealHost.buffer_on(&env.vif), LeftBuffer::None);
    // The backup: its receiver was killed while its stream was open (it never saw the
    // end that would activate the copy), the discard command got the stream's domain,
    // and no failover was counted.
    assert!(
        !env.dir.path().join("received.eof").exists(),
        "the receiver saw its stream end"
    );
    assert_eq!(
        std::fs::read_to_string(env.dir.path().join("discarded")).unwrap(),
        "guest"
    );
    let b = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(remus_user::relay::status::query(
            &env.dir.path().join("relay-receive.sock"),
        ))
        .unwrap();
    assert_eq!((b.failovers_total, b.discards_total), (0, 1), "{b:?}");
    assert!(
        matches!(
            b.last_session,
            Some(remus_user::relay::SessionEnd::Discarded {
                copy_destroyed: true,
                ..
            })
        ),
        "{b:?}"
    );
}
