//! `remus`: the checkpoint controller. Today: relay mode (`remus relay send|receive|status`).
//! Durations on the command line take humantime syntax ("200ms", "1.5s"); a bare number
//! is milliseconds, as `xl remus -i 200`.
//!
//! Owns: the command line, logging set-up, choosing the output buffer, exit codes.
//! Never touches: the wire, the stream, the kernel directly: everything goes through
//! `remus_user::{relay, netbuf}`.
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode as ProcessExit;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use remus_user::checkpoint::PipeSizes;
use remus_user::compress::Codec;
use remus_user::exit::{ExitCode, HasExitCode};
use remus_user::netbuf::{
    self, AttachOptions, DetachPolicy, LocalBuffer, Mode, RemoteBuffer, Request, VifGroup,
};
use remus_user::protect::cli as protect_cli;
use remus_user::relay::{
    self, DEFAULT_CACHE_PAGES, Heartbeat, RUN_DIR, Shared, control, parse_duration,
    receive::{self, DEFAULT_DISCARD_CMD, DEFAULT_RECEIVER_CMD, ReceiveOptions},
    send::{self, SendOptions, Unbuffered},
    status::{self, Role},
};
use remus_user::replication::{Key, MIN_VERSION, VERSION};
use remus_user::signal::stop_signal;
use remus_user::xen::XenDomain;

const ABOUT: &str =
    "Remus-style high availability for Xen guests: checkpoint transport and output commit.";

const LONG_ABOUT: &str = "\
Remus-style high availability for Xen guests.

Relay mode makes stock `xl remus` safe: `remus relay send` is the transport command xl
runs on the primary, `remus relay receive` its twin on the backup. Together they add what
stock Remus lacks: the backup acknowledges each checkpoint, the guest's network output is
held until then (eBPF buffer on the vif), heartbeats detect a dead or silent primary in
about a second, page data is compressed, and the link is authenticated with a
pre-shared key and encrypted (AES-256-GCM, every frame after the handshake).

  backup#  remus relay receive --listen 0.0.0.0:7788 --key-file /etc/remus/key
  primary# xl remus -F -n -s '' mydomain \\
             'remus relay send --backup backup:7788 --key-file /etc/remus/key --vif vif5.0'
  either#  remus relay status -j

Exit codes: 0 ok; 1 operational failure; 2 usage (bad arguments, key file, the two key
files differ, stdin not a pipe); 3 environment unsupported (not root, no BPF); 4 peer lost (the backup, for
`relay send`: the guest now runs unprotected); 5 ending protection not confirmed by the
backup (`relay send`, `protect`, `unprotect`: the guest's output stays held).";

#[derive(Parser)]
#[command(name = "remus", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The checkpoint relay for stock `xl remus` (send on the primary, receive on the backup).
    #[command(subcommand)]
    Relay(RelayCmd),
    #[command(flatten)]
    Operator(OperatorCmd),
    /// Protocol-D disk replication: the primary's and the backup's disk daemons.
    #[command(subcommand, long_about = remus_user::disk::cli::DISK_LONG)]
    Disk(remus_user::disk::cli::DiskCmd),
}

/// The operator's commands (issue #12), defined in `remus_user::protect::cli`.
#[derive(Subcommand)]
enum OperatorCmd {
    // (No doc comments here: each Args struct carries its own short and long help, which
    // a variant's doc comment would replace.)
    Protect(protect_cli::ProtectArgs),
    Unprotect(protect_cli::UnprotectArgs),
    Status(protect_cli::StatusArgs),
    Backup(protect_cli::BackupArgs),
    /// Check /etc/remus/remus.toml, or show the settings a domain gets.
    #[command(subcommand)]
    Config(protect_cli::ConfigCmd),
    /// Internal: the wrapper xl runs around `remus relay send` for `remus protect`.
    #[command(name = "__relay-child", hide = true)]
    RelayChild(protect_cli::RelayChildArgs),
    /// Internal: write man pages and shell completions into DIR (packaging).
    #[command(name = "__generate", hide = true)]
    Generate {
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum RelayCmd {
    Send(SendArgs),
    Receive(ReceiveArgs),
    Status(StatusArgs),
}

const SEND_LONG: &str = "\
The primary end: xl's transport command. Do not run it by hand: xl runs it.

  backup#  remus relay receive --listen 0.0.0.0:7788 --key-file /etc/remus/key
  primary# xl remus -F -n -s '' mydomain \\
             'remus relay send --backup backup:7788 --key-file /etc/remus/key --vif vif5.0'

(`-n` turns off xl's own network buffering, which Debian's Xen lacks anyway: the relay
holds the guest's output itself; `-F` is what xl demands for `-n`.)

What it does: stdin is the migration stream, stdout the reverse channel. It refuses a
stdin that is not a pipe, attaches the output buffer to the vif (letting the guest's
output pass until the first checkpoint's suspend, or holding from attach with
--hold-from-attach), connects and authenticates to the backup, and passes the backup's
banner to xl. Then, for every checkpoint N: at the first byte written after the guest
was suspended it closes the buffer's epoch (the first close also starts holding); when
the backup acknowledges checkpoint N it releases that epoch's frames. It proves each
epoch switch happened before the guest resumed from what it had read and what xl's pipe
held right after the switch; if it cannot, the epoch is merged into the next one (later
release, never earlier; counted in `epoch merges`) and the backup is told not to fail
over to that checkpoint.

If the backup is lost (connection error, or silent for --heartbeat-timeout), everything
held is released, the buffer passes traffic from then on, and it exits with code 4, so
xl prints \"Backup failed? resuming domain at primary\": the guest runs UNPROTECTED.

Ending protection without a failover: one JSON line {\"op\":\"end_protection\"} on the
control socket (root-only; `remus unprotect DOMAIN` and `systemctl stop
remus-protect@DOMAIN` send it). The relay stops reading xl's stream and tells the backup
to discard its copy (its receiver is killed before its stream can end, so nothing is
activated; the incoming domain is destroyed). Once the backup confirms, everything held
is released, the buffer passes traffic (with --vif it is detached), the answer is
{\"result\":\"discarded\",…} and it exits 0: xl resumes the guest here, unprotected. If
the backup does not confirm within --discard-timeout (or is lost meanwhile), nothing is
released: the answer is {\"result\":\"unconfirmed\",…} and it exits 5 with the output held
(the backup may still activate its copy).

Exactly one of --vif, --attached, --no-buffer chooses the output buffer. --vif and
--attached may be repeated, one per vif of the guest: every vif's epoch is closed at the
same instant (while the guest is suspended) and ACK(N) releases epoch by epoch across
the vifs, so no frame of a newer epoch leaves on one vif before an older epoch's frames
on another. If any vif's buffer fails, none releases anything more (fail closed).";

#[derive(Args)]
#[command(long_about = SEND_LONG, group(ArgGroup::new("buffer").required(true).args(["vif", "attached", "no_buffer"])))]
/// The primary end: xl's transport command (`xl remus -s '' DOM 'remus relay send …'`).
struct SendArgs {
    /// The backup's `remus relay receive`, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    backup: String,
    /// Pre-shared key file, identical on both hosts, mode 0600 (`openssl rand -hex 32 > FILE`).
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    /// A vif of the guest on this dom0 (e.g. vif5.0): attach the output buffer to it
    /// in-process. Repeat it for every vif of the guest (an HVM guest's emulated NIC
    /// `vif5.0-emu` too): all share one epoch sequence and are released together.
    #[arg(long, value_name = "IFACE")]
    vif: Vec<String>,
    /// Drive a buffer already attached with `remus-net attach IFACE` instead (repeatable,
    /// one per vif, as --vif).
    #[arg(long, value_name = "IFACE")]
    attached: Vec<String>,
    /// The protected domain (name or id), for the operator's report: how libxl suspends
    /// it (event channel, xenstore control node or SHUTDOWN_suspend) and how long a
    /// suspend takes, in `relay status`, the metrics and the log; a PV guest without the
    /// suspend event channel is warned about. xl passes only the stream, so name it here.
    /// Without it there is no suspend report.
    #[arg(long, value_name = "NAME|ID")]
    domain: Option<String>,
    /// UNSAFE, testing only: no output buffer at all (the guest's output is not held, so
    /// a failover can lose what the world has seen). For relay tests and benchmarks.
    #[arg(long)]
    no_buffer: bool,
    /// With --vif: hold the guest's output from attach on, instead of letting it pass
    /// until the first checkpoint's suspend (the default; see "Before the first
    /// checkpoint" in docs/relay.md).
    #[arg(long)]
    hold_from_attach: bool,
    /// Held bytes beyond which the in-process buffer drops (and counts) frames.
    #[arg(long, value_name = "BYTES", default_value_t = netbuf::DEFAULT_LIMIT_BYTES)]
    limit_bytes: u64,
    /// Page-data compression: XOR against the last copy of each page, then lz4; or none.
    #[arg(long, value_name = "CODEC", default_value = "lz4")]
    compress: Codec,
    /// Pages (4 KiB) remembered per side as the XOR base of compression.
    #[arg(long, value_name = "PAGES", default_value_t = DEFAULT_CACHE_PAGES)]
    cache_pages: u32,
    #[command(flatten)]
    hb: HeartbeatArgs,
    #[command(flatten)]
    observe: ObserveArgs,
    /// How long to wait for the backup's TCP connection and handshake.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// How long the backup may take to start its receiver and send xl's banner.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    banner_timeout: Duration,
    /// Capacity of xl's pipe while it carries checkpoint data (the relay narrows it to
    /// one page while it waits for a suspend, so that the epoch switch can be proven).
    #[arg(long, value_name = "BYTES", default_value_t = PipeSizes::default().wide,
          value_parser = clap::value_parser!(u64).range(4096..=1 << 30))]
    xl_pipe_bytes: u64,
    /// Capacity of xl's pipe while the relay waits for a suspend (tests only: anything
    /// above one page makes unprovable cuts, i.e. merged checkpoints, likelier).
    #[arg(long, value_name = "BYTES", hide = true, default_value_t = PipeSizes::default().narrow,
          value_parser = clap::value_parser!(u64).range(4096..=1 << 30))]
    xl_pipe_narrow_bytes: u64,
    /// How long the backup may take to confirm it discarded its copy when protection is
    /// ended on request (it kills its receiver and destroys the copy); past it the
    /// output stays held and the relay exits 5.
    #[arg(long, value_name = "DURATION", default_value = "45s", value_parser = parse_duration)]
    discard_timeout: Duration,
    /// A replicated disk of the guest: the control socket of its primary `remus disk
    /// serve` (e.g. /run/remus/disk-web0.sock). Repeat it for every disk. Each disk's
    /// epoch is cut at every checkpoint with the output buffer; protection starts only
    /// once every backup's disk is in sync. See docs/disk.md.
    #[arg(long, value_name = "SOCKET")]
    disk: Vec<PathBuf>,
    /// How long the disks may take to reach sync (their initial copy) before protection
    /// starts; past it the relay exits 1 without starting.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    disk_sync_timeout: Duration,
    /// Control socket (root-only) that takes the request to end protection. Default:
    /// the status socket's path with the extension .ctl
    /// (/run/remus/relay-send-<vif or pid>.ctl).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
}

#[derive(Args)]
struct ObserveArgs {
    /// Serve metrics (OpenMetrics text) on this loopback address (e.g. 127.0.0.1:9788).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// Status socket (root-only) for `remus relay status`. Default:
    /// /run/remus/relay-send-<vif or pid>.sock, /run/remus/relay-receive-<port>.sock
    #[arg(long, value_name = "PATH")]
    status_socket: Option<PathBuf>,
}

#[derive(Args)]
struct HeartbeatArgs {
    /// Send a heartbeat this often (at most half the timeout).
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// Declare the peer lost after this much silence (minimum 100ms).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    heartbeat_timeout: Duration,
}

const RECEIVE_LONG: &str = "\
The backup end. Long-running: serves one primary at a time, then waits for the next.

  backup#  remus relay receive --listen 0.0.0.0:7788 --key-file /etc/remus/key

For each authenticated primary it starts the receiver command (default
`xl migrate-receive -r -e`, run with sh -c), passes its banner back, and writes the
reconstructed, byte-identical migration stream to it. Checkpoint 1 (the initial copy) is
written straight through; every later checkpoint is kept in memory until its last byte
has arrived, then written whole and acknowledged, so the receiver only ever holds whole
checkpoints.

When the primary is silent for --heartbeat-timeout, the connection breaks, or a frame
fails to open (altered, replayed, reordered, dropped), it closes the receiver's stdin: libxl then fails over and starts the backup copy
from the last complete checkpoint. The failover is logged with that checkpoint's number.
Primaries without the key, with an incompatible protocol version, or arriving while
another is connected are refused and logged; they never disturb the running session.
A probe (`remus protect` checking the key) is answered and starts nothing.

When the primary ends protection (DISCARD), the receiver's whole process group is
frozen and killed before its stream can end (so libxl activates nothing), then
--discard-cmd destroys the copy (run with sh -c; $REMUS_DOMAIN is the domain's name from
the stream's xl header, whose copy xl named \"$REMUS_DOMAIN--incoming\"), and the primary
is told. No failover is counted. A receiver that ends on its own is no failover either:
nothing activates without its stream's end.";

#[derive(Args)]
#[command(long_about = RECEIVE_LONG)]
/// The backup end: accepts a primary, feeds `xl migrate-receive -r -e`, acks checkpoints.
struct ReceiveArgs {
    /// Address to listen on, ADDR:PORT.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: String,
    /// Pre-shared key file, identical on both hosts, mode 0600.
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    /// The command that rebuilds the guest from the stream on its stdin (run with sh -c;
    /// it must print xl's banner line first).
    #[arg(long, value_name = "CMD", default_value = DEFAULT_RECEIVER_CMD)]
    receiver_cmd: String,
    /// The command that destroys a discarded copy (sh -c; $REMUS_DOMAIN is the domain's
    /// name from the stream). The default destroys "$REMUS_DOMAIN--incoming" if it exists.
    #[arg(long, value_name = "CMD", default_value = DEFAULT_DISCARD_CMD)]
    discard_cmd: String,
    /// How long the discard command may take before it is killed.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
    discard_cmd_timeout: Duration,
    #[command(flatten)]
    hb: HeartbeatArgs,
    #[command(flatten)]
    observe: ObserveArgs,
    /// Serve one primary, then exit (tests, benchmarks).
    #[arg(long)]
    once: bool,
    /// A replicated disk: the control socket of its backup `remus disk receive`
    /// (repeatable, one per disk of the guest). Checkpoint N is written to the receiver
    /// and acknowledged only once every disk holds epoch N durably, committed after its
    /// ACK, and on failover every disk fails over to the same checkpoint before the
    /// receiver's stream is closed. See docs/disk.md.
    #[arg(long, value_name = "SOCKET")]
    disk: Vec<PathBuf>,
    /// How long one checkpoint may wait for a disk's epoch to become durable before the
    /// relay stops writing checkpoints to the receiver (no more ACKs; a failover then
    /// goes to the last checkpoint written, with every disk at it).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    disk_timeout: Duration,
}

#[derive(Args)]
/// State of the relays on this host (through their root-only sockets under /run/remus/).
struct StatusArgs {
    /// Print JSON (an array, one object per relay).
    #[arg(short = 'j', long = "json")]
    json: bool,
    /// Ask only this status socket.
    #[arg(long, value_name = "PATH")]
    socket: Vec<PathBuf>,
}

/// Keeps freed memory for reuse instead of returning it to the kernel. The relay passes
/// every byte of the stream through buffers of a few hundred KiB (a checkpoint is held as
/// the frames it arrived in): with glibc's defaults such buffers are mapped fresh and
/// unmapped again (or the heap is trimmed), and every fresh page costs a fault and a
/// clear. `cargo xtask bench relay` measured the backup's page faults going from about one
/// per 4 KiB relayed to one per 60 KiB with this, and its CPU time down by a third. The
/// cost is that the process keeps its peak heap (at most a held checkpoint and the
/// frames in flight).
fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes glibc's allocation parameters; called before any
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

fn main() -> ProcessExit {
    keep_freed_memory();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("REMUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,netlink_packet_route=error"));
    // stdout is xl's reverse channel for `relay send`: logs go to stderr only.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    // One thread: the relay is a chain of hand-offs (pipe, parser, socket, buffer), and
    // cross-thread wake-ups cost more than they parallelise (`cargo xtask bench relay`
    // measured 1.6x the throughput and half the ACK latency of two workers).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("remus: starting the async runtime: {e}");
            return ExitCode::Failure.into();
        }
    };
    let code = rt.block_on(async {
        match cli.cmd {
            Cmd::Relay(RelayCmd::Send(a)) => relay_send(a).await,
            Cmd::Relay(RelayCmd::Receive(a)) => relay_receive(a).await,
            Cmd::Relay(RelayCmd::Status(a)) => relay_status(a).await,
            Cmd::Operator(c) => operator(c).await,
            Cmd::Disk(c) => disk(c).await,
        }
    });
    // Do not wait for lingering tasks (the buffer's holder, sockets).
    rt.shutdown_timeout(Duration::from_millis(200));
    code.into()
}

async fn operator(c: OperatorCmd) -> ExitCode {
    match c {
        OperatorCmd::Protect(a) => protect_cli::protect(a).await,
        OperatorCmd::Unprotect(a) => protect_cli::unprotect(a).await,
        OperatorCmd::Status(a) => protect_cli::status(a).await,
        OperatorCmd::Backup(a) => protect_cli::backup(a).await,
        OperatorCmd::Config(c) => protect_cli::config(c).await,
        OperatorCmd::RelayChild(a) => protect_cli::relay_child(a),
        OperatorCmd::Generate { dir } => {
            use clap::CommandFactory;
            match remus_user::assets::generate(Cli::command(), &dir) {
                Ok(files) => {
                    for f in files {
                        println!("{}", dir.join(f).display());
                    }
                    ExitCode::Ok
                }
                Err(e) => fail(
                    format!("writing into {}: {e}", dir.display()),
                    ExitCode::Failure,
                ),
            }
        }
    }
}

fn fail(what: impl std::fmt::Display, code: ExitCode) -> ExitCode {
    eprintln!("remus: {what}");
    code
}

fn heartbeat(a: &HeartbeatArgs) -> Result<Heartbeat, ExitCode> {
    Heartbeat::new(a.heartbeat_interval, a.heartbeat_timeout).map_err(|e| fail(e, ExitCode::Usage))
}

fn load_key(p: &std::path::Path) -> Result<Key, ExitCode> {
    Key::load(p).map_err(|e| fail(e, ExitCode::Usage))
}

/// The status socket is for observation only: without it the relay still works.
fn status_socket(path: &std::path::Path, shared: &Arc<Shared>) -> Option<relay::StatusGuard> {
    match relay::serve_status(path, shared.clone()) {
        Ok(g) => Some(g),
        Err(e) => {
            tracing::warn!(error = %e, "no status socket; `remus relay status` will not see this relay");
            None
        }
    }
}

async fn start_metrics(addr: Option<SocketAddr>, shared: &Arc<Shared>) -> Result<(), ExitCode> {
    if let Some(a) = addr {
        remus_user::metrics::serve(a, shared.metrics.clone())
            .await
            .map_err(|e| {
                // A non-loopback address is a usage error; a port in use is operational.
                let code = match e {
                    remus_user::metrics::MetricsError::NotLoopback(_) => ExitCode::Usage,
                    _ => ExitCode::Failure,
                };
                fail(e, code)
            })?;
        tracing::info!(addr = %a, "serving Prometheus metrics");
    }
    Ok(())
}

async fn relay_send(a: SendArgs) -> ExitCode {
    match relay_send_inner(a).await {
        Ok(c) | Err(c) => c,
    }
}

async fn relay_send_inner(a: SendArgs) -> Result<ExitCode, ExitCode> {
    let hb = heartbeat(&a.hb)?;
    // The pipe first: refused early, shrunk before xl can write (it waits for the banner).
    let pipe_sizes = PipeSizes {
        narrow: a.xl_pipe_narrow_bytes,
        wide: a.xl_pipe_bytes,
        ..PipeSizes::default()
    };
    let pipe = send::prepare_pipe(std::io::stdin().as_fd(), pipe_sizes.narrow)
        .map_err(|e| fail(&e, e.exit_code()))?;
    let opts = send_options(&a, load_key(&a.key_file)?, hb, pipe_sizes);
    let vifs = if a.vif.is_empty() {
        a.attached.clone()
    } else {
        a.vif.clone()
    };
    check_vifs(&vifs)?;
    send::disks::check_unique(&a.disk).map_err(|e| fail(e, ExitCode::Usage))?;
    let iface = vifs.first().cloned();
    let name = iface
        .clone()
        .unwrap_or_else(|| std::process::id().to_string());
    let sock = a.observe.status_socket.clone().unwrap_or_else(|| {
        PathBuf::from(RUN_DIR).join(format!("relay-send-{}.sock", relay::sanitize(&name)))
    });
    let shared = Shared::new(Role::Send, a.backup.clone(), iface.clone());
    shared.set(|s| s.vifs = vifs.clone());
    let _status = status_socket(&sock, &shared);
    let ctl = a
        .control_socket
        .clone()
        .unwrap_or_else(|| sock.with_extension("ctl"));
    // Without it nobody can end protection cleanly: refuse to start (nothing is held yet).
    let control = control::serve(&ctl).map_err(|e| fail(&e, ExitCode::Failure))?;
    start_metrics(a.observe.metrics, &shared).await?;
    tracing::info!(
        capacity = pipe.capacity,
        "xl's pipe sized for the first suspend"
    );
    // The domain before any buffer: a wrong name leaves nothing attached.
    if let Some(d) = &a.domain {
        watch_domain(d, &shared).await?;
    }
    send_with_buffer(&a, opts, pipe, shared, &control).await
}

/// The sender's options from its flags.
fn send_options(a: &SendArgs, key: Key, heartbeat: Heartbeat, pipe: PipeSizes) -> SendOptions {
    SendOptions {
        backup: a.backup.clone(),
        key,
        codec: a.compress,
        cache_pages: a.cache_pages,
        heartbeat,
        connect_timeout: a.connect_timeout,
        banner_timeout: a.banner_timeout,
        discard_timeout: a.discard_timeout,
        max_version: VERSION,
        min_version: MIN_VERSION,
        pipe,
        disks: a.disk.clone(),
        disk_sync_timeout: a.disk_sync_timeout,
    }
}

/// Opens `--domain` and watches its suspends for the status.
async fn watch_domain(d: &str, shared: &Arc<Shared>) -> Result<(), ExitCode> {
    let dom = XenDomain::open(d)
        .await
        .map_err(|e| fail(format!("--domain {d}: {e}"), e.exit_code()))?;
    tracing::info!(domain = %d, domid = dom.domid(), xenstore = dom.endpoint(), "watching the domain's suspends");
    tokio::spawn(send::suspend::watch(dom, shared.clone()));
    Ok(())
}

/// Runs the sender over its output buffer: attached here (`--vif`), attached by
/// remus-net (`--attached`), or none (`--no-buffer`).
async fn send_with_buffer(
    a: &SendArgs,
    opts: SendOptions,
    pipe: send::XlPipe,
    shared: Arc<Shared>,
    control: &control::EndControl,
) -> Result<ExitCode, ExitCode> {
    // Attached before the banner reaches xl, i.e. before the stream's first byte: passing
    // until checkpoint 1's cut (which switches every vif to holding), or holding from now on.
    if !a.vif.is_empty() {
        let mode = if a.hold_from_attach {
            Mode::Hold
        } else {
            Mode::PassthroughUntilCheckpoint
        };
        let (group, handles) = attach_all(&a.vif, a.limit_bytes, mode).await?;
        let r = send::run(opts, pipe, group, shared, control).await;
        if let Ok(remus_user::checkpoint::RunEnd::Discarded { .. }) = &r {
            // Protection ended for good: nothing is held any more (everything went out
            // when the backup confirmed), so the buffers leave the vifs.
            for (vif, buffer) in &handles {
                detach_after_end(buffer, vif).await;
            }
        }
        finish_send(r)
    } else if !a.attached.is_empty() {
        let mut members = Vec::new();
        for iface in &a.attached {
            let b = RemoteBuffer::connect(iface)
                .await
                .map_err(|e| fail(&e, e.exit_code()))?;
            tracing::info!(iface, "driving the output buffer attached by remus-net");
            members.push((iface.clone(), b));
        }
        finish_send(send::run(opts, pipe, VifGroup::new(members), shared, control).await)
    } else {
        tracing::warn!(
            "--no-buffer: the guest's output is NOT held; this protects nothing (testing only)"
        );
        finish_send(send::run(opts, pipe, Unbuffered::new(), shared, control).await)
    }
}

/// What the in-process buffer does until checkpoint 1's cut, for the log.
fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Hold => "holding from now on",
        Mode::PassthroughUntilCheckpoint => {
            "passing until the first checkpoint's suspend, holding from then on"
        }
        Mode::Passthrough => "passing",
    }
}

/// After protection ended on request: removes the in-process buffer (pass-through by
/// now, holding nothing) from the vif. A failure leaves it passing traffic.
async fn detach_after_end(buffer: &netbuf::LocalBuffer, vif: &str) {
    let req = netbuf::Request::Detach {
        policy: netbuf::DetachPolicy::Release,
    };
    match buffer.request(req).await {
        Ok(netbuf::Response::Detached(r)) => tracing::info!(
            vif,
            released_frames = r.released_frames,
            "the output buffer is detached"
        ),
        Ok(other) => {
            tracing::warn!(vif, answer = ?other, "detaching the buffer: unexpected answer; it stays in pass-through")
        }
        Err(e) => {
            tracing::warn!(vif, error = %e, "detaching the buffer failed; it stays in pass-through (`remus-net detach` removes it)")
        }
    }
}

/// The same vif twice would be cut twice per checkpoint: refuse it as a typo.
fn check_vifs(vifs: &[String]) -> Result<(), ExitCode> {
    let mut seen = std::collections::BTreeSet::new();
    for v in vifs {
        if !seen.insert(v.as_str()) {
            return Err(fail(
                format!("--vif/--attached {v} given twice: name each vif of the guest once"),
                ExitCode::Usage,
            ));
        }
    }
    Ok(())
}

/// The vifs' buffers, attached in-process, as one group, and a handle on each (to
/// detach them after protection ended).
type Attached = (VifGroup<LocalBuffer>, Vec<(String, LocalBuffer)>);

/// Attaches the buffer to every vif in-process, all in `mode` (passing until the first
/// cut, which switches the whole group, or holding from here on). If one cannot be
/// attached, the ones already attached are detached again, releasing what they held
/// (no stream has started: there is no backup state to be inconsistent with).
async fn attach_all(vifs: &[String], limit_bytes: u64, mode: Mode) -> Result<Attached, ExitCode> {
    let mut members: Vec<(String, LocalBuffer)> = Vec::new();
    for vif in vifs {
        let mut o = AttachOptions::new(vif.clone());
        o.limit_bytes = limit_bytes;
        o.mode = mode;
        match netbuf::attach(o).await {
            Ok(running) => {
                tracing::info!(
                    vif,
                    mode = mode_name(mode),
                    "output buffer attached in-process"
                );
                members.push((vif.clone(), running.buffer));
            }
            Err(e) => {
                for (done, b) in &members {
                    let undo = b
                        .request(Request::Detach {
                            policy: DetachPolicy::Release,
                        })
                        .await;
                    if let Err(de) = undo {
                        tracing::error!(vif = %done, error = %de, "could not detach again: run `remus-net detach {done}`");
                    }
                }
                return Err(fail(format!("{vif}: {e}"), e.exit_code()));
            }
        }
    }
    let handles = members.clone();
    Ok((VifGroup::new(members), handles))
}

fn finish_send(
    r: Result<remus_user::checkpoint::RunEnd, send::SendError>,
) -> Result<ExitCode, ExitCode> {
    match r {
        Ok(_) => Ok(ExitCode::Ok),
        Err(e @ send::SendError::PeerLost { .. }) => {
            eprintln!("remus relay send: {e}");
            eprintln!(
                "remus relay send: released everything held and let the guest's traffic pass: the domain runs UNPROTECTED until replication is restarted"
            );
            Err(ExitCode::PeerLost)
        }
        Err(e) => Err(fail(format!("relay send: {e}"), e.exit_code())),
    }
}

async fn relay_receive(a: ReceiveArgs) -> ExitCode {
    let hb = match heartbeat(&a.hb) {
        Ok(h) => h,
        Err(c) => return c,
    };
    let key = match load_key(&a.key_file) {
        Ok(k) => k,
        Err(c) => return c,
    };
    // A malformed --listen is the operator's typo: say so (exit 2) before anything starts.
    if let Err(e) = std::net::ToSocketAddrs::to_socket_addrs(a.listen.as_str()) {
        eprintln!(
            "remus: --listen {}: {e} (expected ADDR:PORT, e.g. 0.0.0.0:7788 or [::]:7788)",
            a.listen
        );
        return ExitCode::Usage;
    }
    let port = a.listen.rsplit(':').next().unwrap_or("0").to_string();
    let sock = a.observe.status_socket.clone().unwrap_or_else(|| {
        PathBuf::from(RUN_DIR).join(format!("relay-receive-{}.sock", relay::sanitize(&port)))
    });
    let shared = Shared::new(Role::Receive, a.listen.clone(), None);
    let _status = status_socket(&sock, &shared);
    if let Err(c) = start_metrics(a.observe.metrics, &shared).await {
        return c;
    }
    let opts = ReceiveOptions {
        listen: a.listen,
        key,
        receiver_cmd: a.receiver_cmd,
        discard_cmd: a.discard_cmd,
        discard_timeout: a.discard_cmd_timeout,
        heartbeat: hb,
        handshake_timeout: Duration::from_secs(10),
        banner_timeout: Duration::from_secs(30),
        once: a.once,
        disks: a.disk,
        disk_timeout: a.disk_timeout,
    };
    tokio::select! {
        r = receive::run(opts, shared) => match r {
            Ok(()) => ExitCode::Ok,
            Err(e) => fail(format!("relay receive: {e}"), e.exit_code()),
        },
        sig = stop_signal() => {
            tracing::warn!(signal = sig, "stopping: a primary being replicated loses its backup and the receiver's stream closes (it fails over, as stock Remus does when its transport dies)");
            ExitCode::Ok
        }
    }
}

async fn relay_status(a: StatusArgs) -> ExitCode {
    let socks = if a.socket.is_empty() {
        status::sockets(std::path::Path::new(RUN_DIR))
    } else {
        a.socket.clone()
    };
    if socks.is_empty() {
        if a.json {
            println!("[]");
            return ExitCode::Ok;
        }
        return fail(status::StatusError::NoneRunning, ExitCode::Failure);
    }
    let mut all = Vec::new();
    let mut code = ExitCode::Ok;
    for p in &socks {
        match status::query(p).await {
            Ok(s) => all.push(s),
            Err(e) => {
                eprintln!("remus: {e}");
                code = ExitCode::Failure;
            }
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&all).unwrap_or_else(|_| "[]".into())
        );
    } else {
        for s in &all {
            print!("{}", status::render(s));
        }
    }
    code
}

/// `remus disk …`: everything lives in `remus_user::disk::cli`.
async fn disk(c: remus_user::disk::cli::DiskCmd) -> ExitCode {
    remus_user::disk::cli::run(c).await
}

#[cfg(test)]
mod operator_cmd_tests {
    use super::Cli;
    use clap::CommandFactory;

    #[test]
    fn the_operator_commands_keep_their_long_help() {
        // A doc comment on the subcommand's variant would replace the long help the Args
        // struct carries (it did once: the man pages lost their description).
        let c = Cli::command();
        for n in ["protect", "unprotect", "status", "backup"] {
            let s = c.find_subcommand(n).expect(n);
            let long = s.get_long_about().map(|l| l.to_string());
            assert!(long.is_some(), "{n} has no long help");
            assert_ne!(long, s.get_about().map(|a| a.to_string()), "{n}");
        }
    }
}
