//! `remus disk …`: the command line of the disk daemons and of their control verbs.
//! `bin/remus.rs` only mounts [`DiskCmd`] and calls [`run`].
//!
//! Owns: arguments, their checks (usage errors, exit 2), printing answers. Never
//! touches: the daemons' work (`daemon`), the control protocol's meaning (`control`).
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand};

use super::barrier::resolve_socket;
use super::control::{self, Client, Request, Response};
use super::daemon::{self, LinkOptions, ReceiveOptions, ServeOptions};
use super::export::{ExportSpec, parse_export};
use super::genl::parse_device;
use crate::exit::{ExitCode, HasExitCode};
use crate::relay::{Heartbeat, parse_duration};
use crate::replication::Key;

pub const DISK_LONG: &str = "\
Protocol-D disk replication. The primary writes locally at once and streams every write,
tagged with its disk epoch, to the backup; the backup holds each epoch in a journal and
applies it only when the checkpoint that covers it is committed. On failover the
unfinished epochs are discarded.

  backup#  remus disk receive --listen 0.0.0.0:7789 --backing /dev/vg/web0 \\
             --journal /var/lib/remus/web0 --key-file /etc/remus/key --device /dev/nbd0
  primary# remus disk serve --backing /dev/vg/web0 --device /dev/nbd0 \\
             --backup backup:7789 --key-file /etc/remus/key --name web0
  primary# remus disk wait-sync --name web0
  either#  remus disk status -j

Exit codes: 0 ok; 1 operational failure (busy backing, refused, journal or I/O error);
2 usage (bad arguments, unknown backing, wrong state: not durable, merged); 3 environment
unsupported (no nbd module, not root); 4 peer lost (backup unreachable or lost).";

#[derive(Subcommand)]
pub enum DiskCmd {
    /// Primary: serve a backing as /dev/nbdN (or a unix NBD export), replicating to a backup.
    Serve(ServeArgs),
    /// Backup: receive a primary's disk stream into a journal; commit or fail over on request.
    Receive(ReceiveArgs),
    /// Primary: close the open disk epoch at a checkpoint; prints its number.
    Cut(Which),
    /// Primary: wait until the backup's disk is in sync (protection may start).
    WaitSync(WaitArgs),
    /// Backup: wait until epoch N is durable in the journal.
    Durable(DurableArgs),
    /// Backup: mark checkpoint N as merged (not a failover point on its own).
    Merge(EpochArgs),
    /// Backup: apply every epoch <= N to the backing.
    Commit(EpochArgs),
    /// Backup: apply <= N, discard later epochs, export the disk.
    Failover(EpochArgs),
    /// Backup: forget a lost session's disk state (the next primary syncs from scratch).
    Discard(Which),
    /// State of the disk daemons on this host.
    Status(StatusArgs),
    /// Print the kernel device a daemon serves, waiting for it (the hotplug script's query).
    Device(WaitArgs),
    /// Release a kernel NBD device a stopped daemon left configured (its users get I/O
    /// errors from then on).
    Release(ReleaseArgs),
}

#[derive(Args)]
pub struct ReleaseArgs {
    /// The device, /dev/nbdN.
    #[arg(long, value_name = "/dev/nbdN")]
    device: String,
}

/// Which daemon: by name, by socket, or the only one running.
#[derive(Args, Clone)]
pub struct Which {
    /// The daemon's --name.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Its control socket.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

#[derive(Args)]
pub struct WaitArgs {
    #[command(flatten)]
    which: Which,
    /// Give up after this long (exit 1).
    #[arg(long, value_name = "DURATION", default_value = "3600s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Args)]
pub struct EpochArgs {
    /// The checkpoint / disk epoch number.
    epoch: u64,
    #[command(flatten)]
    which: Which,
}

#[derive(Args)]
pub struct DurableArgs {
    epoch: u64,
    #[command(flatten)]
    which: Which,
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Args)]
pub struct StatusArgs {
    /// JSON (an array, one object per daemon).
    #[arg(short = 'j', long = "json")]
    json: bool,
    #[command(flatten)]
    which: Which,
}

#[derive(Args, Clone)]
pub struct HeartbeatArgs {
    /// Send a heartbeat this often when idle (at most half the timeout).
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// Declare the peer lost after this much silence (minimum 100ms).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    heartbeat_timeout: Duration,
}

#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// Serve the disk as this kernel NBD device (/dev/nbdN), configured over netlink.
    #[arg(long, value_name = "/dev/nbdN")]
    device: Option<String>,
    /// Serve it as a userspace NBD export on a unix socket instead (unix:PATH).
    #[arg(long, value_name = "unix:PATH")]
    export: Option<String>,
    /// Kernel mode: NBD connections (sockets) to the device.
    #[arg(long, value_name = "N", default_value_t = 2)]
    connections: u32,
    /// Kernel mode: how long the kernel keeps I/O waiting for a restarted daemon.
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
    dead_conn_timeout: Duration,
}

const SERVE_LONG: &str = "\
The primary's disk daemon. Serves --backing as /dev/nbdN (--device) or on a unix socket
(--export unix:PATH), writes every request locally at once, and with --backup streams it
to the backup's `remus disk receive`, tagged with its disk epoch. `remus disk cut` closes
the epoch (the checkpoint controller calls it at the proven suspend point).

At start it connects and authenticates to the backup (same key file and handshake as the
relay; every frame after it is encrypted and authenticated, AES-256-GCM), then copies the
whole disk in the background (holes skipped) while the guest runs; writes go on
the same ordered stream. Checkpoints (cuts) are refused until the copy is done:
`remus disk wait-sync` waits for it.

A full send queue (--queue-bytes) slows the guest's writes; nothing is dropped. If the
backup is lost, the queue is released and the guest runs UNPROTECTED (status says so).
SIGTERM stops the daemon; in kernel mode /dev/nbdN stays configured for
--dead-conn-timeout, and a daemon started again with the same --device takes it back.";

#[derive(Args)]
#[command(long_about = SERVE_LONG, group(ArgGroup::new("dev").required(true).args(["device", "export"])))]
pub struct ServeArgs {
    /// The disk: a regular file or a block device (opened exclusively).
    #[arg(long, value_name = "FILE|DEV")]
    backing: PathBuf,
    #[command(flatten)]
    dev: DeviceArgs,
    /// The disk's name (control socket /run/remus/disk-NAME.sock; the hotplug script's
    /// target). Default: the device or export file name.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// The backup's `remus disk receive`, HOST:PORT. Without it: no replication.
    #[arg(long, value_name = "HOST:PORT", requires = "key_file")]
    backup: Option<String>,
    /// Pre-shared key file (the relay's), mode 0600.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Bytes queued for the backup before the guest's writes wait.
    #[arg(long, value_name = "BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    queue_bytes: u64,
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    #[command(flatten)]
    hb: HeartbeatArgs,
    /// Control socket. Default: /run/remus/disk-NAME.sock
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

const RECEIVE_LONG: &str = "\
The backup's disk daemon. Accepts one authenticated primary at a time: first the initial
copy (written straight to --backing), then every epoch held in the journal (--journal;
RAM up to --ram-cap, every frame sealed on the wire and CRC-checked in the journal,
fsync'ed at its cut) and answered DURABLE.

Nothing reaches the backing before `commit N` (apply every epoch <= N) or `failover N`
(apply <= N, discard the rest, then serve the disk as --device or --export). A crash
mid-apply is recovered at the next start: committed epochs are replayed from the journal.
If the primary is lost, the daemon keeps the disk and the durable epochs until `failover`
or `discard`; new primaries are refused meanwhile.";

#[derive(Args)]
#[command(long_about = RECEIVE_LONG)]
pub struct ReceiveArgs {
    /// ADDR:PORT to listen on.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: String,
    /// The backup's copy of the disk (same size as the primary's).
    #[arg(long, value_name = "FILE|DEV")]
    backing: PathBuf,
    /// Journal directory (created 0700).
    #[arg(long, value_name = "DIR")]
    journal: PathBuf,
    /// Pre-shared key file (the relay's), mode 0600.
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    /// The disk's name. Default: the backing's file name.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Held write data kept in RAM (beyond it, apply reads the journal back).
    #[arg(long, value_name = "BYTES", default_value = "256MiB", value_parser = parse_bytes)]
    ram_cap: u64,
    /// Journal size limit: beyond it the session is aborted (journal full).
    #[arg(long, value_name = "BYTES", default_value = "4GiB", value_parser = parse_bytes)]
    journal_max: u64,
    /// After failover, serve the disk (--device /dev/nbdN or --export unix:PATH).
    #[command(flatten)]
    dev: DeviceArgs,
    #[command(flatten)]
    hb: HeartbeatArgs,
    /// Control socket. Default: /run/remus/disk-NAME.sock
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

/// Parses "64MiB", "4G", "1048576" (bytes).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 64MiB, 4G, 1048576)"))?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("`{s}`: unknown unit (use K, M, G, T)")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn usage(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("remus disk: {msg}");
    ExitCode::Usage
}

fn heartbeat(a: &HeartbeatArgs) -> Result<Heartbeat, ExitCode> {
    Heartbeat::new(a.heartbeat_interval, a.heartbeat_timeout).map_err(usage)
}

fn export_spec(d: &DeviceArgs) -> Result<Option<ExportSpec>, ExitCode> {
    match (&d.device, &d.export) {
        (Some(_), Some(_)) => Err(usage("--device and --export exclude each other")),
        (Some(dev), None) => {
            let index = parse_device(dev)
                .ok_or_else(|| usage(format!("--device {dev}: expected /dev/nbdN")))?;
            if d.connections == 0 || d.connections > 16 {
                return Err(usage("--connections must be 1..=16"));
            }
            Ok(Some(ExportSpec::Kernel {
                index,
                connections: d.connections,
                dead_conn_timeout: d.dead_conn_timeout,
            }))
        }
        (None, Some(e)) => parse_export(e)
            .map(|p| Some(ExportSpec::Unix(p)))
            .ok_or_else(|| usage(format!("--export {e}: expected unix:PATH"))),
        (None, None) => Ok(None),
    }
}

fn default_name(spec: Option<&ExportSpec>, backing: &Path) -> String {
    let from_path = |p: &Path| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into())
    };
    match spec {
        Some(ExportSpec::Kernel { index, .. }) => format!("nbd{index}"),
        Some(ExportSpec::Unix(p)) => from_path(p),
        None => from_path(backing),
    }
}

fn check_name(n: &str) -> Result<(), ExitCode> {
    if n.is_empty()
        || n.len() > 64
        || !n
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(usage(format!(
            "--name {n:?}: use 1-64 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

fn key(p: &Path) -> Result<Key, ExitCode> {
    Key::load(p).map_err(usage)
}

/// Runs one `remus disk` command; returns its exit code.
pub async fn run(cmd: DiskCmd) -> ExitCode {
    match run_inner(cmd).await {
        Ok(c) | Err(c) => c,
    }
}

async fn run_inner(cmd: DiskCmd) -> Result<ExitCode, ExitCode> {
    match cmd {
        DiskCmd::Serve(a) => {
            let hb = heartbeat(&a.hb)?;
            let spec =
                export_spec(&a.dev)?.ok_or_else(|| usage("--device or --export is required"))?;
            let name = a
                .name
                .clone()
                .unwrap_or_else(|| default_name(Some(&spec), &a.backing));
            check_name(&name)?;
            let backup = match (&a.backup, &a.key_file) {
                (Some(b), Some(k)) => {
                    if std::net::ToSocketAddrs::to_socket_addrs(b.as_str()).is_err() {
                        return Err(usage(format!("--backup {b}: expected HOST:PORT")));
                    }
                    Some(LinkOptions {
                        backup: b.clone(),
                        key: key(k)?,
                        heartbeat: hb,
                        connect_timeout: a.connect_timeout,
                        queue_bytes: a.queue_bytes as usize,
                    })
                }
                (None, Some(_)) => return Err(usage("--key-file without --backup")),
                _ => None,
            };
            let o = ServeOptions {
                backing: a.backing,
                export: spec,
                socket: a.socket.unwrap_or_else(|| control::socket_path(&name)),
                name,
                backup,
            };
            daemon::serve(o).await.map_err(|e| {
                eprintln!("remus disk serve: {e}");
                e.exit_code()
            })?;
            Ok(ExitCode::Ok)
        }
        DiskCmd::Receive(a) => {
            let hb = heartbeat(&a.hb)?;
            if std::net::ToSocketAddrs::to_socket_addrs(a.listen.as_str()).is_err() {
                return Err(usage(format!(
                    "--listen {}: expected ADDR:PORT (e.g. 0.0.0.0:7789)",
                    a.listen
                )));
            }
            let spec = export_spec(&a.dev)?;
            let name = a
                .name
                .clone()
                .unwrap_or_else(|| default_name(None, &a.backing));
            check_name(&name)?;
            if a.ram_cap > a.journal_max {
                return Err(usage("--ram-cap cannot exceed --journal-max"));
            }
            let o = ReceiveOptions {
                listen: a.listen,
                backing: a.backing,
                journal: a.journal,
                key: key(&a.key_file)?,
                socket: a.socket.unwrap_or_else(|| control::socket_path(&name)),
                name,
                ram_cap: a.ram_cap,
                journal_max: a.journal_max,
                heartbeat: hb,
                export: spec,
            };
            daemon::receive(o).await.map_err(|e| {
                eprintln!("remus disk receive: {e}");
                e.exit_code()
            })?;
            Ok(ExitCode::Ok)
        }
        DiskCmd::Status(a) => status(a).await,
        DiskCmd::Cut(w) => {
            let r = ask(&w, Request::Cut).await?;
            match r {
                Response::Epoch { epoch } => println!("{epoch}"),
                other => print_json(&other),
            }
            Ok(ExitCode::Ok)
        }
        DiskCmd::WaitSync(a) => {
            ask(
                &a.which,
                Request::WaitSync {
                    timeout_ms: a.timeout.as_millis() as u64,
                },
            )
            .await?;
            println!("in sync");
            Ok(ExitCode::Ok)
        }
        DiskCmd::Durable(a) => {
            ask(
                &a.which,
                Request::Durable {
                    epoch: a.epoch,
                    timeout_ms: a.timeout.as_millis() as u64,
                },
            )
            .await?;
            println!("{}", a.epoch);
            Ok(ExitCode::Ok)
        }
        DiskCmd::Merge(a) => {
            ask(&a.which, Request::Merge { epoch: a.epoch }).await?;
            Ok(ExitCode::Ok)
        }
        DiskCmd::Commit(a) => {
            let r = ask(&a.which, Request::Commit { epoch: a.epoch }).await?;
            print_json(&r);
            Ok(ExitCode::Ok)
        }
        DiskCmd::Failover(a) => {
            let r = ask(&a.which, Request::Failover { epoch: a.epoch }).await?;
            print_json(&r);
            Ok(ExitCode::Ok)
        }
        DiskCmd::Discard(w) => {
            ask(&w, Request::Discard).await?;
            Ok(ExitCode::Ok)
        }
        DiskCmd::Device(a) => device(a).await,
        DiskCmd::Release(a) => {
            let index = parse_device(&a.device)
                .ok_or_else(|| usage(format!("--device {}: expected /dev/nbdN", a.device)))?;
            if let super::genl::DeviceState::Served { pid } = super::genl::device_state(index) {
                eprintln!(
                    "remus disk: {} is served by process {pid}: stop it first",
                    a.device
                );
                return Err(ExitCode::Failure);
            }
            super::genl::disconnect(index).map_err(|e| {
                eprintln!("remus disk: {e}");
                match e {
                    super::genl::GenlError::NoNbd { .. } | super::genl::GenlError::NotPermitted => {
                        ExitCode::Unsupported
                    }
                    _ => ExitCode::Failure,
                }
            })?;
            Ok(ExitCode::Ok)
        }
    }
}

/// Waits until the daemon serves a kernel device (a primary does from its start; a
/// backup only after `failover`), then prints it.
async fn device(a: WaitArgs) -> Result<ExitCode, ExitCode> {
    let sock = resolve_socket(a.which.name.as_deref(), a.which.socket.as_deref()).map_err(|e| {
        eprintln!("remus disk: {e}");
        ExitCode::Failure
    })?;
    let t = std::time::Instant::now();
    let mut last = String::from("not running");
    loop {
        if let Ok(mut c) = Client::connect(&sock).await {
            match c.status().await {
                Ok(s) => {
                    if let Some(d) = s.device.as_deref().filter(|d| d.starts_with("/dev/")) {
                        println!("{d}");
                        return Ok(ExitCode::Ok);
                    }
                    last = format!("{} ({})", s.state, s.role);
                }
                Err(e) => last = e.to_string(),
            }
        }
        if t.elapsed() >= a.timeout {
            eprintln!(
                "remus disk: {} serves no kernel device after {:?}: {last}",
                sock.display(),
                a.timeout
            );
            return Err(ExitCode::Failure);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_json(r: &Response) {
    println!("{}", serde_json::to_string(r).unwrap_or_default());
}

async fn ask(w: &Which, req: Request) -> Result<Response, ExitCode> {
    let sock = resolve_socket(w.name.as_deref(), w.socket.as_deref()).map_err(|e| {
        eprintln!("remus disk: {e}");
        ExitCode::Failure
    })?;
    let mut c = Client::connect(&sock).await.map_err(|e| {
        eprintln!("remus disk: {e}");
        e.exit_code()
    })?;
    c.request(&req).await.map_err(|e| {
        eprintln!("remus disk: {e}");
        e.exit_code()
    })
}

async fn status(a: StatusArgs) -> Result<ExitCode, ExitCode> {
    let socks = if a.which.name.is_some() || a.which.socket.is_some() {
        vec![resolve_socket(a.which.name.as_deref(), a.which.socket.as_deref()).map_err(usage)?]
    } else {
        control::sockets()
    };
    let mut all = Vec::new();
    let mut code = ExitCode::Ok;
    for p in &socks {
        let r = async {
            let mut c = Client::connect(p).await?;
            c.status().await
        }
        .await;
        match r {
            Ok(s) => all.push(s),
            Err(e) => {
                eprintln!("remus disk: {e}");
                code = ExitCode::Failure;
            }
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&all).unwrap_or_else(|_| "[]".into())
        );
    } else if all.is_empty() && code == ExitCode::Ok {
        eprintln!("remus disk: no disk daemon is running");
        return Err(ExitCode::Failure);
    } else {
        for s in &all {
            print!("{}", render(s));
        }
    }
    if code == ExitCode::Ok {
        Ok(code)
    } else {
        Err(code)
    }
}

fn render(s: &control::DiskStatus) -> String {
    let mut o = format!(
        "{} ({}, pid {}): {}\n  backing {} ({} bytes)",
        s.name, s.role, s.pid, s.state, s.backing, s.size
    );
    if let Some(d) = &s.device {
        o += &format!(", served as {d}");
    }
    o.push('\n');
    if s.role == "primary" {
        if let Some(b) = &s.backup {
            o += &format!(
                "  backup {b}: in sync {}, epoch {}, durable {}, queued {} of {} bytes\n",
                s.in_sync.unwrap_or(false),
                s.epoch.unwrap_or(0),
                s.durable_acked.unwrap_or(0),
                s.queue_bytes.unwrap_or(0),
                s.queue_cap.unwrap_or(0)
            );
        }
        if let Some(l) = &s.lost {
            o += &format!("  BACKUP LOST: {l}\n");
        }
        o += &format!(
            "  {} writes ({} bytes), {} reads, {} flushes, {} errors\n",
            s.writes, s.write_bytes, s.reads, s.flushes, s.io_errors
        );
    } else {
        o += &format!(
            "  applied {}, committed {}, durable {}, held {:?} ({} bytes), merged {:?}\n",
            s.applied.unwrap_or(0),
            s.committed.unwrap_or(0),
            s.durable.unwrap_or(0),
            s.held_epochs,
            s.journal_bytes.unwrap_or(0),
            s.merged
        );
        if let Some(p) = &s.peer {
            o += &format!("  primary {p}\n");
        }
        if let Some(e) = &s.last_error {
            o += &format!("  note: {e}\n");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Defaults are parsed at run time: a bad one only shows when the flag is omitted
    /// (`wait-sync`'s "1h" did: the duration parser knows ms/us/s only).
    #[test]
    fn every_command_parses_with_its_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(subcommand)]
            c: DiskCmd,
        }
        for args in [
            &["t", "wait-sync"][..],
            &["t", "device", "--name", "x"],
            &["t", "durable", "3"],
            &["t", "cut"],
            &["t", "status", "-j"],
            &["t", "release", "--device", "/dev/nbd3"],
            &["t", "serve", "--backing", "f", "--device", "/dev/nbd0"],
            &[
                "t",
                "serve",
                "--backing",
                "f",
                "--export",
                "unix:/x",
                "--backup",
                "h:1",
                "--key-file",
                "k",
            ],
            &[
                "t",
                "receive",
                "--listen",
                "0.0.0.0:1",
                "--backing",
                "f",
                "--journal",
                "j",
                "--key-file",
                "k",
            ],
        ] {
            if let Err(e) = T::try_parse_from(args) {
                panic!("{args:?}: {e}");
            }
        }
        assert!(
            T::try_parse_from(["t", "serve", "--backing", "f"]).is_err(),
            "a device is required"
        );
        assert!(
            T::try_parse_from([
                "t",
                "serve",
                "--backing",
                "f",
                "--export",
                "unix:/x",
                "--backup",
                "h:1"
            ])
            .is_err(),
            "--backup needs --key-file"
        );
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("4G"), Ok(4 << 30));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert!(parse_bytes("12Q").is_err());
        assert!(parse_bytes("x").is_err());
        assert!(parse_bytes("99999999999T").is_err());
    }

    #[test]
    fn names_default_from_the_device_or_file() {
        let k = ExportSpec::Kernel {
            index: 3,
            connections: 1,
            dead_conn_timeout: Duration::from_secs(1),
        };
        assert_eq!(default_name(Some(&k), Path::new("/x")), "nbd3");
        assert_eq!(
            default_name(
                Some(&ExportSpec::Unix("/run/web0.sock".into())),
                Path::new("/x")
            ),
            "web0"
        );
        assert_eq!(default_name(None, Path::new("/srv/web1.img")), "web1");
        assert!(check_name("web-0_1.a").is_ok());
        assert!(check_name("../x").is_err());
        assert!(check_name("").is_err());
    }
}
