//! `remus-net`: the eBPF output buffer on a vif, on its own.
//!
//! Owns: the command line (ip/bpftool-shaped `remus-net VERB IFACE …`), the daemon
//! start-up handshake, human and JSON output, exit codes. Never touches: BPF, netlink or
//! frames directly: everything goes through `remus_user::netbuf` (`AttachMode` is only the
//! option's type).
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    process::{Command, ExitCode as ProcessExit, Stdio},
};

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use remus_user::{
    datapath::AttachMode,
    exit::{ExitCode, HasExitCode},
    netbuf::{
        self, AttachOptions, DetachPolicy, DetachReport, HolderEnd, Mode, NetError, RemoteBuffer,
        Request, Response, Status, control,
    },
};

const ABOUT: &str = "Hold a Xen guest's network output until the backup acknowledges it.";

const LONG_ABOUT: &str = "\
Hold a Xen guest's network output until the backup acknowledges it.

remus-net puts an eBPF program on a vif's TC ingress hook (on dom0 the vif's ingress is
the guest's egress). Every frame the guest sends is stamped with the current epoch,
copied to a holder process and dropped; `commit` releases whole epochs, in order, back
into the vif's ingress path, so the bridge forwards them as if the guest had just sent
them. Every protocol is held (IPv4, IPv6, ARP, anything).

Typical use (the remus controller does this for you, in-process):
  remus-net attach vif5.0              # hold from now on (epoch 1)
  remus-net checkpoint vif5.0          # guest suspended: closes epoch 1, prints 1
  remus-net commit vif5.0 1            # backup has checkpoint 1: release epoch 1
  remus-net status vif5.0 -j
  remus-net detach vif5.0 --release    # stop holding, send what is held

If the holder dies, nothing held is released: the program stays attached and keeps
dropping the guest's frames (fail closed) until `remus-net detach`.

Exit codes: 0 ok; 1 operational or kernel failure; 2 usage (bad arguments, unknown
interface, epoch not closed, not attached); 3 environment unsupported (not root, no BPF,
no tun); 4 the vif disappeared while attached.";

#[derive(Parser)]
#[command(name = "remus-net", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone, Copy)]
struct JsonFlag {
    /// Print JSON (machine-readable) instead of text.
    #[arg(short = 'j', long = "json")]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum AttachHow {
    /// tcx on kernels >= 6.6, a clsact filter otherwise.
    Auto,
    Tcx,
    Netlink,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start holding IFACE's output; returns once holding is active.
    Attach {
        /// The vif (host side of the guest's NIC), e.g. vif5.0.
        iface: String,
        /// Held bytes beyond which new frames are dropped and counted (never released
        /// early). Suffixes K, M, G (powers of 1024).
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        limit_bytes: u64,
        /// Size of the kernel ring between the program and the holder (power of two).
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        ring_bytes: u64,
        /// Start in pass-through mode (nothing held until `remus-net mode IFACE hold`).
        #[arg(long)]
        passthrough: bool,
        /// Keep the queues in this process instead of a background daemon.
        #[arg(long)]
        foreground: bool,
        /// How to attach to the vif's TC ingress.
        #[arg(long, value_enum, default_value = "auto")]
        attach: AttachHow,
        /// UNSAFE, for benchmarks and demos only: release epochs by itself every MS
        /// milliseconds (0: after every drain of the ring), as if a backup acknowledged
        /// every checkpoint at once. Breaks output commit by design.
        #[arg(long, value_name = "MS")]
        autocommit_unsafe: Option<u64>,
        /// Internal: this process is the daemon started by `attach`.
        #[arg(long, hide = true)]
        daemon_child: bool,
        #[command(flatten)]
        j: JsonFlag,
    },
    /// Close the current epoch (the guest was just suspended); prints its number.
    Checkpoint {
        iface: String,
        #[command(flatten)]
        j: JsonFlag,
    },
    /// Release every held frame of epochs <= EPOCH, in order.
    Commit {
        iface: String,
        epoch: u64,
        #[command(flatten)]
        j: JsonFlag,
    },
    /// Show mode, epochs, held/released/dropped counters (all attached vifs without IFACE).
    Status {
        iface: Option<String>,
        #[command(flatten)]
        j: JsonFlag,
    },
    /// Switch between holding and pass-through at run time. Switching to pass-through
    /// releases everything held first.
    Mode {
        iface: String,
        #[arg(value_enum)]
        mode: ModeArg,
        #[command(flatten)]
        j: JsonFlag,
    },
    /// Stop holding: remove the program, helper device, pins and any qdisc remus-net
    /// added. Works without a live holder and reports what was lost.
    Detach {
        iface: String,
        /// Send what is held before detaching (breaks output commit for uncommitted
        /// epochs: use when the backup is gone for good).
        #[arg(long, conflicts_with = "drop")]
        release: bool,
        /// Drop what is held (the default).
        #[arg(long)]
        drop: bool,
        #[command(flatten)]
        j: JsonFlag,
    },
    /// Internal: write man pages and shell completions into DIR (packaging).
    #[command(name = "__generate", hide = true)]
    Generate { dir: std::path::PathBuf },
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Hold,
    Passthrough,
}

/// Man pages and completions from this file's clap definitions (`cargo xtask package`).
fn generate_assets(dir: &std::path::Path) -> ExitCode {
    use clap::CommandFactory;
    match remus_user::assets::generate(Cli::command(), dir) {
        Ok(files) => {
            for f in files {
                println!("{}", dir.join(f).display());
            }
            ExitCode::Ok
        }
        Err(e) => {
            eprintln!("remus-net: writing into {}: {e}", dir.display());
            ExitCode::Failure
        }
    }
}

/// Parses "65536", "64K", "256M", "1G", "256MiB".
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 65536, 64K, 256M, 1G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn main() -> ProcessExit {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Attach { .. }) {
        // Short-lived commands: die quietly on a closed pipe (`remus-net status | head`).
        // The holder keeps Rust's default (ignored) so a vanished client cannot kill it.
        // SAFETY: setting a signal disposition before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("REMUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,netlink_packet_route=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("remus-net: starting the async runtime: {e}");
            return ExitCode::Failure.into();
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code.into(),
        Err(e) => {
            eprintln!("remus-net: {e}");
            e.exit_code().into()
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, NetError> {
    match cli.cmd {
        Cmd::Generate { dir } => Ok(generate_assets(&dir)),
        Cmd::Attach {
            iface,
            limit_bytes,
            ring_bytes,
            passthrough,
            foreground,
            attach,
            autocommit_unsafe,
            daemon_child,
            j,
        } => {
            let opts = AttachOptions {
                iface,
                limit_bytes,
                ring_bytes: u32::try_from(ring_bytes)
                    .map_err(|_| NetError::BadRingSize(ring_bytes))?,
                passthrough,
                attach_mode: match attach {
                    AttachHow::Auto => AttachMode::Auto,
                    AttachHow::Tcx => AttachMode::Tcx,
                    AttachHow::Netlink => AttachMode::Netlink,
                },
                autocommit: autocommit_unsafe.map(std::time::Duration::from_millis),
            };
            if daemon_child {
                daemon_main(opts).await
            } else if foreground {
                foreground_main(opts, j.json).await
            } else {
                spawn_daemon(&opts, j.json)
            }
        }
        Cmd::Checkpoint { iface, j } => checkpoint(&iface, j.json).await,
        Cmd::Commit { iface, epoch, j } => commit(&iface, epoch, j.json).await,
        Cmd::Status { iface, j } => status(iface, j.json).await,
        Cmd::Mode { iface, mode, j } => set_mode(&iface, mode, j.json).await,
        Cmd::Detach {
            iface,
            release,
            drop: _,
            j,
        } => {
            let policy = if release {
                DetachPolicy::Release
            } else {
                DetachPolicy::Drop
            };
            let report = detach(&iface, policy).await?;
            if j.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print_detach(&report);
            }
            Ok(ExitCode::Ok)
        }
    }
}

async fn checkpoint(iface: &str, json: bool) -> Result<ExitCode, NetError> {
    match ask(iface, Request::Checkpoint).await? {
        Response::Epoch { epoch } if json => println!(
            "{}",
            serde_json::json!({"iface": iface, "closed_epoch": epoch})
        ),
        Response::Epoch { epoch } => println!("{epoch}"),
        other => unexpected(iface, other)?,
    }
    Ok(ExitCode::Ok)
}

async fn commit(iface: &str, epoch: u64, json: bool) -> Result<ExitCode, NetError> {
    match ask(iface, Request::Commit { epoch }).await? {
        Response::Released(r) if json => {
            println!("{}", serde_json::json!({"iface": iface, "released": r}))
        }
        Response::Released(r) => println!(
            "released epochs <= {}: {} frames, {} bytes",
            epoch, r.frames, r.bytes
        ),
        other => unexpected(iface, other)?,
    }
    Ok(ExitCode::Ok)
}

async fn set_mode(iface: &str, mode: ModeArg, json: bool) -> Result<ExitCode, NetError> {
    let mode = match mode {
        ModeArg::Hold => Mode::Hold,
        ModeArg::Passthrough => Mode::Passthrough,
    };
    ask(iface, Request::SetMode { mode }).await?;
    if json {
        println!("{}", serde_json::json!({"iface": iface, "mode": mode}));
    } else {
        println!("{iface}: mode {}", mode.name());
    }
    Ok(ExitCode::Ok)
}

fn unexpected(iface: &str, r: Response) -> Result<(), NetError> {
    Err(control::unexpected(iface, &r))
}

/// Sends one request to the holder of `iface`, turning error answers into errors.
async fn ask(iface: &str, req: Request) -> Result<Response, NetError> {
    netbuf::validate_name(iface)?;
    if !netbuf::is_root() {
        return Err(NetError::NotRoot);
    }
    if let Some(st) = netbuf::read_state(iface)
        && !st.holder_alive()
    {
        return Err(NetError::HolderDead {
            iface: iface.to_string(),
            pid: st.pid,
        });
    }
    let mut rb = RemoteBuffer::connect(iface).await?;
    netbuf::check(iface, rb.request(req).await?)
}

async fn detach(iface: &str, policy: DetachPolicy) -> Result<DetachReport, NetError> {
    netbuf::validate_name(iface)?;
    if !netbuf::is_root() {
        return Err(NetError::NotRoot);
    }
    let state = netbuf::read_state(iface);
    let alive = state.as_ref().is_some_and(|s| s.holder_alive());
    if alive && let Ok(mut rb) = RemoteBuffer::connect(iface).await {
        match rb.request(Request::Detach { policy }).await {
            Ok(resp) => match netbuf::check(iface, resp)? {
                Response::Detached(r) => return Ok(r),
                other => unexpected(iface, other)?,
            },
            Err(NetError::Stopped(_)) => {
                // The holder closed the connection without an answer (it died, or ended
                // for another reason). Wait for it to be gone, then clean up from here.
                let pid = state.as_ref().map_or(0, |s| s.pid);
                for _ in 0..50 {
                    if !state.as_ref().is_some_and(|s| s.holder_alive()) {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                eprintln!(
                    "remus-net: the holder of {iface} (pid {pid}) ended without answering; \
                     see {} (cleaning up from this process)",
                    netbuf::log_path(iface).display()
                );
                if netbuf::read_state(iface).is_none() && !netbuf::pins_left(iface) {
                    return Ok(DetachReport {
                        iface: iface.to_string(),
                        notes: vec!["the holder had already removed its program and pins".into()],
                        ..Default::default()
                    });
                }
            }
            Err(e) => return Err(e),
        }
    }
    let mut r = netbuf::detach_offline(iface).await?;
    if policy == DetachPolicy::Release {
        r.notes.push(
            "the holder was dead: its held frames were lost with it and cannot be released".into(),
        );
    }
    Ok(r)
}

fn print_detach(r: &DetachReport) {
    println!("{}: detached", r.iface);
    if r.holder_was_alive {
        println!(
            "  released {} frames ({} bytes), dropped {} frames ({} bytes)",
            r.released_frames, r.released_bytes, r.dropped_frames, r.dropped_bytes
        );
    } else {
        println!(
            "  holder was dead: up to {} captured frames were never released (lost)",
            r.lost_frames
        );
    }
    for n in &r.notes {
        println!("  {n}");
    }
}

/// What `status` knows of one interface: the live holder's answer, or for a dead holder
/// its state file and what its pins (where this process can see them) say.
async fn status_of(i: &str) -> Result<serde_json::Value, NetError> {
    let st = netbuf::read_state(i);
    if st.as_ref().is_some_and(|s| s.holder_alive()) {
        return match ask(i, Request::Status).await? {
            Response::Status(s) => Ok(serde_json::json!({"holder": "alive", "status": s})),
            other => unexpected(i, other).map(|()| serde_json::Value::Null),
        };
    }
    let (pinned, looked_in) = netbuf::pinned_state(i)?;
    if st.is_none() && pinned.is_none() {
        return Err(NetError::NotAttached {
            iface: i.to_string(),
            path: netbuf::state_path(i).display().to_string(),
        });
    }
    Ok(serde_json::json!({
        "holder": "dead",
        "iface": i,
        "state": st,
        "pinned": pinned,
        "pins_looked_up_in": looked_in,
        "hint": format!("fail closed: the vif is blocked; run `remus-net detach {i}`"),
    }))
}

async fn status(iface: Option<String>, json: bool) -> Result<ExitCode, NetError> {
    if !netbuf::is_root() {
        return Err(NetError::NotRoot);
    }
    let ifaces = match iface {
        Some(i) => {
            netbuf::validate_name(&i)?;
            vec![i]
        }
        None => netbuf::attached_ifaces(),
    };
    let mut out = Vec::new();
    for i in &ifaces {
        out.push(status_of(i).await?);
    }
    if json {
        let v = if out.len() == 1 {
            out.remove(0)
        } else {
            serde_json::Value::Array(out)
        };
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(ExitCode::Ok);
    }
    if out.is_empty() {
        println!("no interface is attached");
    }
    for v in &out {
        if let Some(s) = v
            .get("status")
            .and_then(|s| serde_json::from_value::<Status>(s.clone()).ok())
        {
            print_status(&s);
            continue;
        }
        let i = v["iface"].as_str().unwrap_or("?");
        println!("{i}: HOLDER DEAD, vif blocked (fail closed); run `remus-net detach {i}`");
        if let Some(dir) = v["state"]["pins"].as_str() {
            let place = v["state"]["pin_place"].as_str().unwrap_or("unknown");
            println!("  pins: {dir} ({})", place_words(place));
        }
    }
    Ok(ExitCode::Ok)
}

fn place_words(place: &str) -> &'static str {
    match place {
        "host" => "the host's bpffs: they outlive the holder",
        "private" => {
            "private to the holder's mount namespace: the capture program is a netlink \
             filter that needs none"
        }
        _ => "written by an older remus-net",
    }
}

fn print_status(s: &Status) {
    print_status_head(s);
    if let Some(p) = &s.pins {
        let place = serde_json::to_value(p.place).unwrap_or_default();
        println!(
            "  pins: {} ({})",
            p.dir(&s.iface).display(),
            place_words(place.as_str().unwrap_or(""))
        );
    }
}

fn print_status_head(s: &Status) {
    println!(
        "{} (ifindex {}): {}, epoch {} (committed {}), attach {}, holder pid {}, tap {}",
        s.iface,
        s.ifindex,
        s.mode.name(),
        s.current_epoch,
        s.committed_epoch,
        s.attach_kind.name(),
        s.pid,
        s.tap
    );
    println!(
        "  held {} frames, {} bytes (limit {} bytes)",
        s.held_frames, s.held_bytes, s.limit_bytes
    );
    for e in &s.epochs {
        println!(
            "    epoch {}: {} frames, {} bytes",
            e.epoch, e.frames, e.bytes
        );
    }
    let h = &s.holder;
    println!(
        "  released {} frames, {} bytes (late {}); release errors {}, unreleasable {}",
        h.released_frames, h.released_bytes, h.late_frames, s.release_errors, s.unreleasable_frames
    );
    println!(
        "  dropped: limit {}, ring full {}, oversize {}, runt {}, stale {}, detach {}",
        h.dropped_limit_frames,
        s.kernel.dropped_ring_full_frames,
        s.kernel.dropped_oversize_frames,
        s.kernel.dropped_runt_frames,
        h.dropped_stale_frames,
        h.dropped_detach_frames
    );
    println!(
        "  kernel: captured {} frames ({} bytes), reinjected {}, passed through {}",
        s.kernel.captured_frames,
        s.kernel.captured_bytes,
        s.kernel.passed_released_frames,
        s.kernel.passed_through_frames
    );
}

fn print_attached(s: &Status, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(s).unwrap_or_default());
    } else {
        println!(
            "{}: holding ({}), epoch {}, attach {}, holder pid {}",
            s.iface,
            s.mode.name(),
            s.current_epoch,
            s.attach_kind.name(),
            s.pid
        );
    }
}

fn ended_code(
    iface: &str,
    e: Result<Result<HolderEnd, NetError>, tokio::task::JoinError>,
) -> ExitCode {
    match e {
        Ok(Ok(HolderEnd::Detached(_))) => ExitCode::Ok,
        Ok(Ok(HolderEnd::StoppedHolding)) => {
            eprintln!(
                "remus-net: stopped; {iface} stays blocked (fail closed) until `remus-net detach {iface}`"
            );
            ExitCode::Ok
        }
        Ok(Ok(HolderEnd::VifGone { frames, bytes })) => {
            let e = NetError::VifGone {
                iface: iface.to_string(),
                frames,
                bytes,
            };
            eprintln!("remus-net: {e}");
            e.exit_code()
        }
        Ok(Err(e)) => {
            eprintln!("remus-net: {e}");
            e.exit_code()
        }
        Err(e) => {
            eprintln!("remus-net: holder task failed: {e}");
            ExitCode::Failure
        }
    }
}

async fn foreground_main(opts: AttachOptions, json: bool) -> Result<ExitCode, NetError> {
    let iface = opts.iface.clone();
    let running = netbuf::attach(opts).await?;
    print_attached(&running.status, json);
    let _ = std::io::stdout().flush();
    let mut task = running.task;
    tokio::select! {
        r = &mut task => Ok(ended_code(&iface, r)),
        _ = tokio::signal::ctrl_c() => {
            eprintln!("remus-net: interrupted; {iface} stays blocked (fail closed) until `remus-net detach {iface}`");
            Ok(ExitCode::Ok)
        }
    }
}

/// The daemon: attach, tell the parent on stdout, then detach stdout and serve.
async fn daemon_main(opts: AttachOptions) -> Result<ExitCode, NetError> {
    let iface = opts.iface.clone();
    match netbuf::attach(opts).await {
        Ok(running) => {
            let line = serde_json::to_string(&running.status).unwrap_or_default();
            println!("READY {line}");
            let _ = std::io::stdout().flush();
            // Nobody reads stdout any more: point it at /dev/null.
            if let Ok(devnull) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
                let _ = nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&devnull), 1);
            }
            let mut task = running.task;
            let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .map_err(|e| NetError::Io {
                    what: "installing the SIGINT handler".into(),
                    source: e,
                })?;
            let code = tokio::select! {
                r = &mut task => ended_code(&iface, r),
                _ = int.recv() => {
                    eprintln!("remus-net: interrupted; {iface} stays blocked (fail closed)");
                    ExitCode::Ok
                }
            };
            eprintln!(
                "remus-net daemon for {iface} exiting with code {}",
                code.code()
            );
            Ok(code)
        }
        Err(e) => {
            println!("ERROR {} {}", e.exit_code().code(), e);
            let _ = std::io::stdout().flush();
            Err(e)
        }
    }
}

/// The command line of the daemon child for `opts`, its stderr going to `log`.
fn daemon_command(exe: &std::path::Path, opts: &AttachOptions, log: std::fs::File) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("attach")
        .arg(&opts.iface)
        .arg("--limit-bytes")
        .arg(opts.limit_bytes.to_string())
        .arg("--ring-bytes")
        .arg(opts.ring_bytes.to_string())
        .arg("--attach")
        .arg(match opts.attach_mode {
            AttachMode::Auto => "auto",
            AttachMode::Tcx => "tcx",
            AttachMode::Netlink => "netlink",
        })
        .arg("--daemon-child")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    if opts.passthrough {
        cmd.arg("--passthrough");
    }
    if let Some(d) = opts.autocommit {
        cmd.arg("--autocommit-unsafe")
            .arg(d.as_millis().to_string());
    }
    // SAFETY: setsid is async-signal-safe; the daemon leaves our session and terminal.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    cmd
}

/// `attach` without --foreground: start the daemon and wait for its READY line.
fn spawn_daemon(opts: &AttachOptions, json: bool) -> Result<ExitCode, NetError> {
    if !netbuf::is_root() {
        return Err(NetError::NotRoot);
    }
    netbuf::validate_name(&opts.iface)?;
    let io = |what: String| move |source| NetError::Io { what, source };
    let exe = std::env::current_exe().map_err(io("finding my own executable".into()))?;
    std::fs::create_dir_all(netbuf::RUN_DIR)
        .map_err(io(format!("creating {}", netbuf::RUN_DIR)))?;
    let log_path = netbuf::log_path(&opts.iface);
    // A refused attach (unknown interface, bad input) must not leave a log behind; an
    // existing log may belong to a live holder of the same interface: keep that one.
    let log_existed = log_path.exists();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io(format!("opening {}", log_path.display())))?;
    let mut child = daemon_command(&exe, opts, log)
        .spawn()
        .map_err(io("starting the remus-net daemon".into()))?;
    let Some(stdout) = child.stdout.take() else {
        return Err(NetError::Stopped(opts.iface.clone()));
    };
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    if let Some(rest) = line.strip_prefix("READY ") {
        match serde_json::from_str::<Status>(rest.trim()) {
            Ok(s) => print_attached(&s, json),
            Err(_) => println!("{}: holding", opts.iface),
        }
        if !json {
            println!("  daemon log: {}", log_path.display());
        }
        return Ok(ExitCode::Ok);
    }
    let _ = child.wait();
    if let Some(rest) = line.strip_prefix("ERROR ") {
        if !log_existed {
            let _ = std::fs::remove_file(&log_path);
        }
        return Ok(refused(rest));
    }
    let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
    let tail: Vec<&str> = tail.lines().rev().take(10).collect();
    eprintln!(
        "remus-net: the daemon exited before it was ready; last lines of {}:",
        log_path.display()
    );
    for l in tail.iter().rev() {
        eprintln!("  {l}");
    }
    Ok(ExitCode::Failure)
}

/// The daemon's `ERROR <code> <message>` line: prints the message, returns the code.
fn refused(rest: &str) -> ExitCode {
    let (code, msg) = rest.trim().split_once(' ').unwrap_or(("1", rest.trim()));
    let code = match code {
        "2" => ExitCode::Usage,
        "3" => ExitCode::Unsupported,
        "4" => ExitCode::PeerLost,
        _ => ExitCode::Failure,
    };
    eprintln!("remus-net: {msg}");
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes_and_reject_garbage() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
