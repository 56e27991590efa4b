//! The command lines of `remus protect|unprotect|status|backup|config` and what each runs.
//!
//! Owns: the clap definitions (the man pages and completions are generated from them),
//! reading the config and applying flags over it, printing each failure on its own line,
//! and the exit codes. Never touches: Xen, the relay or the buffer except through the
//! other `protect` modules.
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::config::{self, Compression, Config, Settings};
use crate::exit::{ExitCode, HasExitCode};
use crate::relay::parse_duration;

use super::checks::{self, Request};
use super::host::{RealBackup, RealHost};
use super::xen::XlTools;
use super::{backup, run, state, status, unprotect};

const PROTECT_LONG: &str = "\
Protect a running Xen domain: checkpoint it to the backup host several times a second and
hold everything it sends until the backup has the checkpoint that produced it.

  backup#  remus backup web                   (or: systemctl start remus-backup@web)
  primary# remus protect web --backup backup.example
           (or: systemctl start remus-protect@web, with backup set in /etc/remus/remus.toml)

First it checks, and names every missing thing on its own line: root, the Xen tools and a
running hypervisor, the domain (running, not Domain-0, not already protected), its vifs
(at least one, each paravirtual, names from xenstore; the relay holds every one), the disks (each writable disk must be replicated, which this
release cannot do yet: see --unsafe-unreplicated-disks), the guest's suspend path, the key
file (0600), and the backup: reachable, speaking the relay protocol, holding the same key.
Nothing is started unless every check passes.

Then it runs stock `xl remus -F -n [-d] -i MS -s '' DOMAIN 'remus relay send …'` in the
foreground, keeps /run/remus/protect-DOMAIN.json current (`remus status`), and ends when xl
remus ends. Settings come from /etc/remus/remus.toml ([defaults], then [domain.DOMAIN]);
flags override them.

Stopping it (SIGTERM, SIGINT, `systemctl stop remus-protect@DOMAIN`, `remus unprotect
DOMAIN`) ends protection without a failover: the relay tells the backup to discard its
copy (its receiver is killed before its stream ends, so nothing is activated there), and
once the backup confirms, it releases what it held and exits; xl resumes the guest here,
unprotected. If the backup does not confirm (unreachable, lost meanwhile), the output
stays HELD and it ends with exit 5: the backup may still activate its copy.
To hand the guest over to the backup instead, destroy it here (`xl destroy DOMAIN`): the
backup resumes from its last checkpoint, as after a crash.

Exit codes: 0 the domain ended, or protection ended on request; 1 operational failure;
2 usage (bad flag or config, unknown or stopped domain, already protected, key file);
3 environment unsupported (not root, no Xen, no vif, unreplicated disks, no
suspend path); 4 the backup is unreachable, or was lost (the guest then runs
UNPROTECTED); 5 ending protection was not confirmed by the backup (output held).";

/// Protect a running domain: check everything, then run `xl remus` with the relay (primary).
#[derive(Args, Debug, Clone)]
#[command(long_about = PROTECT_LONG)]
pub struct ProtectArgs {
    /// The domain to protect: its xl name (or domid).
    pub domain: String,
    /// The backup host's `remus backup` listener, HOST[:PORT] (port 7788 if omitted).
    #[arg(short = 'b', long, value_name = "HOST[:PORT]")]
    pub backup: Option<String>,
    /// Checkpoint interval in milliseconds (as `xl remus -i`; default 200).
    #[arg(short = 'i', long = "interval", value_name = "MS")]
    pub interval: Option<u64>,
    /// Pre-shared key file, the same on both hosts, mode 0600 (default /etc/remus/key).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    #[command(flatten)]
    pub hb: HeartbeatFlags,
    /// Page-data compression on the wire.
    #[arg(long, value_enum)]
    pub compress: Option<Compression>,
    /// Held output (bytes) beyond which frames are dropped and counted, never released.
    #[arg(long, value_name = "BYTES")]
    pub limit_bytes: Option<u64>,
    /// Pages (4 KiB) per side remembered as the XOR base of compression.
    #[arg(long, value_name = "PAGES")]
    pub cache_pages: Option<u32>,
    /// UNSAFE: protect although writable disks are not replicated. After a failover the
    /// backup runs on disks that missed the primary's writes since the copies diverged
    /// (data loss or corruption for the guest). Only for disposable or read-only disks.
    #[arg(long)]
    pub unsafe_unreplicated_disks: bool,
    /// Run every check, print the xl remus command, start nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Configuration file.
    #[arg(short = 'c', long, value_name = "FILE", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
}

/// The heartbeat of both ends (over the config's `heartbeat_*_ms`).
#[derive(Args, Debug, Clone)]
pub struct HeartbeatFlags {
    /// Heartbeat period (e.g. 200ms; at most half the timeout).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Silence after which the other end counts as lost (e.g. 1s; at least 100ms).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub heartbeat_timeout: Option<Duration>,
}

/// End a protection without a failover; the guest keeps running on the primary.
#[derive(Args, Debug, Clone)]
#[command(long_about = "\
End the protection of DOMAIN. The guest keeps running on the primary, unprotected.

On the primary, while protected: stops `remus protect DOMAIN` (as `systemctl stop
remus-protect@DOMAIN` does) and waits for it. Its relay tells the backup to discard its
copy: the backup's receiver is frozen and killed before it can see its stream end (which
would activate the copy), DOMAIN--incoming is destroyed, and the backup confirms; only
then does the relay release what it held. xl resumes the guest here. If the backup does
not confirm (unreachable, or lost meanwhile) the output stays HELD: exit 5.

On the backup host: discards the backup's copy itself (the same freeze, kill and
destroy). The primary then loses its backup: its relay releases what it held and the
guest keeps running there, unprotected (`remus protect` ends with exit 4).

Where protection already ended: removes the state left in /run/remus and says how it
ended, and whether the vif still holds output.

Exit codes: 0 done; 1 a step failed; 2 DOMAIN is not protected here; 3 not root; 4 the
backup was lost meanwhile (the guest runs unprotected); 5 the backup did not confirm
(output held).")]
pub struct UnprotectArgs {
    /// The protected domain (its xl name).
    pub domain: String,
}

/// Both ends of every protection on this host, as a table or JSON.
#[derive(Args, Debug, Clone)]
#[command(long_about = "\
Both ends of every protection on this host: the primary's `remus protect` and the
backup's `remus backup`, with state, the last acknowledged checkpoint, checkpoints per
second, the guest's pause per checkpoint (when the relay reports it; - otherwise), held
output and the other end's address. On a backup the rate is measured over one second.

Exit codes: 0; 2 DOMAIN is not protected or received here.")]
pub struct StatusArgs {
    /// Only this domain.
    pub domain: Option<String>,
    /// Print JSON (an array, one object per end).
    #[arg(short = 'j', long = "json")]
    pub json: bool,
}

/// The backup's listener for one domain (becomes `remus relay receive` as configured).
#[derive(Args, Debug, Clone)]
#[command(long_about = "\
The backup host's end for DOMAIN: checks (root, Xen running, the key file, DOMAIN not
running here, no copy left from an earlier session), then becomes
`remus relay receive --listen ADDR:PORT …` (same pid), which waits for the primary's
`remus protect DOMAIN`, feeds `xl migrate-receive -r -e`, acknowledges checkpoints, and
fails over when the primary goes silent. The listen address comes from [domain.DOMAIN] or
[defaults] `listen` in /etc/remus/remus.toml (default 0.0.0.0:7788): one listener per
protected domain, each on its own port.

Stopping it during a session closes the receiver's stream, which ACTIVATES the copy: to
end protection, run `remus unprotect DOMAIN` (on either host) first; the remus-backup@
unit does that on stop.

Exit codes: 0 stopped; 1 cannot listen; 2 usage (flags, config, key file, DOMAIN runs
here); 3 not root, no Xen.")]
pub struct BackupArgs {
    /// The protected domain (its xl name on the primary).
    pub domain: String,
    /// Where to listen, ADDR:PORT.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// Pre-shared key file, the same on both hosts, mode 0600.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    #[command(flatten)]
    pub hb: HeartbeatFlags,
    /// Run the checks and print the relay command, start nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Configuration file.
    #[arg(short = 'c', long, value_name = "FILE", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
}

/// `remus config …`.
#[derive(Subcommand, Debug, Clone)]
pub enum ConfigCmd {
    /// Check a configuration file; print each error as FILE:LINE:COLUMN: message.
    Check {
        /// The file (default /etc/remus/remus.toml).
        #[arg(default_value = config::DEFAULT_PATH)]
        file: PathBuf,
    },
    /// Print the settings DOMAIN gets (its section over [defaults] over built-ins).
    Show {
        domain: String,
        #[arg(short = 'c', long, value_name = "FILE", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
}

/// `remus __relay-child --exit-file F -- ARGS…` (hidden: xl runs it).
#[derive(Args, Debug, Clone)]
pub struct RelayChildArgs {
    #[arg(long)]
    pub exit_file: PathBuf,
    #[arg(last = true, required = true)]
    pub args: Vec<String>,
}

fn say(cmd: &str, domain: &str, what: impl std::fmt::Display) {
    eprintln!("remus {cmd}: {domain}: {what}");
}

/// The config file: the default path may be missing (built-in defaults), a named one may not.
fn load_config(path: &Path) -> Result<Config, ExitCode> {
    let explicit = path != Path::new(config::DEFAULT_PATH);
    Config::load(path, explicit).map_err(|e| {
        eprintln!("{e}");
        e.exit_code()
    })
}

fn apply_heartbeat(s: &mut Settings, f: &HeartbeatFlags) -> Result<(), String> {
    if let Some(i) = f.heartbeat_interval {
        s.heartbeat_interval = i;
    }
    if let Some(t) = f.heartbeat_timeout {
        s.heartbeat_timeout = t;
    }
    config::check_heartbeat(s.heartbeat_interval, s.heartbeat_timeout)
}

/// The settings `remus protect` runs with: flags over the config.
pub fn protect_settings(a: &ProtectArgs, cfg: &Config) -> Result<Settings, String> {
    let mut s = cfg.settings(&a.domain);
    if let Some(b) = &a.backup {
        s.backup = Some(b.clone());
    }
    if let Some(i) = a.interval {
        if !(1..=config::MAX_INTERVAL_MS).contains(&i) {
            return Err(format!(
                "-i {i}: the interval must be from 1 to {} milliseconds",
                config::MAX_INTERVAL_MS
            ));
        }
        s.interval_ms = i;
    }
    if let Some(k) = &a.key_file {
        s.key_file = k.clone();
    }
    if let Some(c) = a.compress {
        s.compress = c;
    }
    if let Some(l) = a.limit_bytes {
        s.limit_bytes = l;
    }
    if let Some(c) = a.cache_pages {
        s.cache_pages = c;
    }
    if a.unsafe_unreplicated_disks {
        s.unsafe_unreplicated_disks = true;
    }
    apply_heartbeat(&mut s, &a.hb).map_err(|e| format!("heartbeat flags: {e}"))?;
    Ok(s)
}

pub async fn protect(a: ProtectArgs) -> ExitCode {
    let cfg = match load_config(&a.config) {
        Ok(c) => c,
        Err(c) => return c,
    };
    let settings = match protect_settings(&a, &cfg) {
        Ok(s) => s,
        Err(e) => {
            say("protect", &a.domain, e);
            return ExitCode::Usage;
        }
    };
    let req = Request {
        domain: a.domain.clone(),
        settings,
        origin: a.config.display().to_string(),
    };
    let xen = XlTools::default();
    let plan = match checks::plan(
        &req,
        &xen,
        &RealHost,
        &RealBackup {
            timeout: Duration::from_secs(5),
        },
    )
    .await
    {
        Ok(p) => p,
        Err(f) => {
            for e in &f.0 {
                say("protect", &a.domain, e);
            }
            say(
                "protect",
                &a.domain,
                format!(
                    "nothing was started ({} problem{})",
                    f.0.len(),
                    if f.0.len() == 1 { "" } else { "s" }
                ),
            );
            return f.exit_code();
        }
    };
    for w in &plan.warnings {
        say("protect", &plan.domain, format!("warning: {w}"));
    }
    let exe = checks::self_exe();
    let dir = state::run_dir();
    if a.dry_run {
        println!(
            "{}: all checks passed (domid {}, {} guest, vif {}, backup {}, interval {} ms)",
            plan.domain,
            plan.domid,
            plan.guest_type.as_str(),
            plan.vifs.join(" "),
            plan.backup,
            plan.settings.interval_ms
        );
        println!(
            "would run: {}",
            checks::shell_join(&plan.xl_argv(&xen.xl, &exe, &dir))
        );
        return ExitCode::Ok;
    }
    run::run(
        plan,
        run::RunOptions {
            xl: xen.xl.clone(),
            exe,
            run_dir: dir,
        },
    )
    .await
}

pub async fn unprotect(a: UnprotectArgs) -> ExitCode {
    match unprotect::unprotect(&a.domain, &state::run_dir(), &XlTools::default(), &RealHost) {
        Ok(d) => {
            println!("{}: {}", a.domain, d.message);
            ExitCode::Ok
        }
        Err(e) => {
            say("unprotect", &a.domain, &e);
            e.exit_code()
        }
    }
}

pub async fn status(a: StatusArgs) -> ExitCode {
    let rows = status::collect(
        &state::run_dir(),
        a.domain.as_deref(),
        Duration::from_secs(1),
    )
    .await;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".into())
        );
    } else if !rows.is_empty() {
        print!("{}", status::render(&rows));
    }
    match (&a.domain, rows.is_empty()) {
        (Some(d), true) => {
            eprintln!(
                "remus status: {d}: not protected or received on this host (no remus protect or remus backup for it)"
            );
            ExitCode::Usage
        }
        (None, true) if !a.json => {
            println!("nothing is protected or received on this host");
            ExitCode::Ok
        }
        _ => ExitCode::Ok,
    }
}

pub async fn backup(a: BackupArgs) -> ExitCode {
    let cfg = match load_config(&a.config) {
        Ok(c) => c,
        Err(c) => return c,
    };
    let mut s = cfg.settings(&a.domain);
    if let Some(l) = &a.listen {
        s.listen = l.clone();
    }
    if let Some(k) = &a.key_file {
        s.key_file = k.clone();
    }
    if let Err(e) = apply_heartbeat(&mut s, &a.hb) {
        say("backup", &a.domain, format!("heartbeat flags: {e}"));
        return ExitCode::Usage;
    }
    if let Err(e) = config::check_domain_name(&a.domain) {
        say("backup", &a.domain, e);
        return ExitCode::Usage;
    }
    let f = backup::check(&a.domain, &s, &XlTools::default(), &RealHost);
    if !f.0.is_empty() {
        for e in &f.0 {
            say("backup", &a.domain, e);
        }
        say("backup", &a.domain, "nothing was started");
        return f.exit_code();
    }
    let dir = state::run_dir();
    let exe = backup::exe();
    if a.dry_run {
        let mut argv = vec![exe.display().to_string()];
        argv.extend(backup::relay_args(&a.domain, &s, &dir));
        println!("{}: all checks passed", a.domain);
        println!("would run: {}", checks::shell_join(&argv));
        return ExitCode::Ok;
    }
    let e = backup::exec_relay(&a.domain, &s, &exe, &dir);
    say("backup", &a.domain, format!("cannot start the relay: {e}"));
    ExitCode::Failure
}

pub async fn config(c: ConfigCmd) -> ExitCode {
    match c {
        ConfigCmd::Check { file } => match Config::load(&file, true) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} domain section{})",
                    file.display(),
                    cfg.domains.len(),
                    if cfg.domains.len() == 1 { "" } else { "s" }
                );
                ExitCode::Ok
            }
            Err(e) => {
                eprintln!("{e}");
                e.exit_code()
            }
        },
        ConfigCmd::Show { domain, config } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(c) => return c,
            };
            let s = cfg.settings(&domain);
            println!("# {domain}: from {}", cfg.origin());
            println!(
                "backup = {}",
                s.backup
                    .as_deref()
                    .map_or("(none)".to_string(), |b| format!("{b:?}"))
            );
            println!("key_file = {:?}", s.key_file.display().to_string());
            println!("interval_ms = {}", s.interval_ms);
            println!(
                "heartbeat_interval_ms = {}",
                s.heartbeat_interval.as_millis()
            );
            println!("heartbeat_timeout_ms = {}", s.heartbeat_timeout.as_millis());
            println!("compress = {:?}", s.compress.as_str());
            println!("limit_bytes = {}", s.limit_bytes);
            println!("cache_pages = {}", s.cache_pages);
            println!("listen = {:?}", s.listen);
            println!(
                "unsafe_unreplicated_disks = {}",
                s.unsafe_unreplicated_disks
            );
            for (vdev, d) in &s.disks {
                println!("disk.{vdev}.replicate = {}", d.replicate);
            }
            ExitCode::Ok
        }
    }
}

/// The hidden wrapper xl runs; see `run::relay_child`.
pub fn relay_child(a: RelayChildArgs) -> ! {
    let code = run::relay_child(&checks::self_exe(), &a.exit_file, &a.args);
    // The process exit code carries the relay's (4: backup lost, …) to xl unchanged.
    std::process::exit(code)
}
