//! Everything `remus protect` checks before it starts anything, and the plan it makes.
//!
//! Owns: the order of the checks, one typed failure per missing thing (each with its exit
//! code and a message that says how to fix it), the vifs to hold (every one) and
//! whether the disks allow protection, and the exact `xl remus` command line. Never
//! touches: Xen, the host or the network directly: it asks the `Xen`, `Host` and `Backup`
//! ports, so it is tested with fakes.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::{DiskSection, Settings};
use crate::exit::ExitCode;

use super::probe::{ProbeError, ProbeOk};
use super::state;
use super::xen::{self, DomainConfig, GuestType, ListedDomain, SuspendPath, Xen, XenError};

/// What is left on a vif by an earlier buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeftBuffer {
    None,
    /// A live holder (some relay or `remus-net attach` runs on it).
    Live {
        pid: u32,
    },
    /// The holder is gone and the program passes traffic: nothing is held, a new relay
    /// can take it over (what a relay leaves after losing its backup).
    Passthrough,
    /// The holder is gone and the program still holds: the guest's output is dropped
    /// (fail closed) because a relay died without releasing it.
    Holding,
}

/// The host, as far as the checks need it.
pub trait Host {
    fn is_root(&self) -> bool;
    fn iface_exists(&self, name: &str) -> bool;
    /// The nbd module is loaded or loadable.
    fn nbd_available(&self) -> bool;
    fn buffer_on(&self, iface: &str) -> LeftBuffer;
    /// The pid of a live `remus protect` of `domain` on this host.
    fn protect_running(&self, domain: &str) -> Option<u32>;
    /// The pid of an `xl remus` of this domain (started by anyone).
    fn xl_remus_running(&self, name: &str, domid: u32) -> Option<u32>;
}

/// The backup, as far as the checks need it.
pub trait Backup {
    fn probe(
        &self,
        addr: &str,
        key: &crate::replication::Key,
    ) -> impl std::future::Future<Output = Result<ProbeOk, ProbeError>>;
}

/// One thing that stops `remus protect` (or `remus backup`) from starting. The first
/// words of each message (`summary`) are the troubleshooting table's first column in
/// docs/operator.md; a test keeps the two in step.
#[derive(Debug, thiserror::Error)]
pub enum CheckFailure {
    #[error("must run as root: xl, the eBPF output buffer and /run/remus need it (run with sudo)")]
    NotRoot,
    #[error("the Xen tools are not installed: no `{tool}` on PATH (Debian: apt install xen-utils)")]
    NoXenTools { tool: String },
    #[error(
        "Xen is not running on this host: `xl info` failed ({why}); boot the Xen entry of the boot menu and check that xenstored runs"
    )]
    XenNotRunning { why: String },
    #[error("xl gave an answer remus cannot read: {why}")]
    XlOutput { why: String },
    #[error(
        "no running domain named `{domain}` (running: {running}); xl knows only running domains: start it first (xl create)"
    )]
    UnknownDomain { domain: String, running: String },
    #[error("Domain-0 cannot be protected: it is the host itself")]
    Dom0,
    #[error(
        "`{domain}` is a domain in transit (being received as a backup copy or a migration), not one to protect"
    )]
    InTransit { domain: String },
    #[error(
        "`{domain}` is not running (xl state `{state}`: {}); protect a running domain{}",
        .why.words(), .why.fix()
    )]
    NotRunning {
        domain: String,
        state: String,
        why: xen::NotRunning,
    },
    #[error(
        "`{domain}` is already protected ({by}); `remus status {domain}` shows it, `remus unprotect {domain}` ends it"
    )]
    AlreadyProtected { domain: String, by: String },
    #[error(
        "a buffer left on {vif} still holds the guest's output (fail closed: a relay died without releasing it, and the backup may have activated its copy); check the backup first: if its copy runs, `xl destroy {domain}` here; otherwise `remus-net detach {vif}` (drops what is held), then protect again"
    )]
    BufferLeftHolding { domain: String, vif: String },
    #[error(
        "`{domain}` has no vif: remus holds a guest's network output and needs at least one vif"
    )]
    NoVif { domain: String },
    #[error(
        "`{domain}`'s NIC {devid} is an emulated one (HVM, vif_ioemu): the guest can send through {vif}-emu, which is not held; use a PV NIC (type=vif in the vif= line)"
    )]
    EmulatedNic {
        domain: String,
        devid: u32,
        vif: String,
    },
    #[error(
        "`{domain}`'s vif {vif} does not exist in dom0 (did its hotplug script fail? see /var/log/xen/xen-hotplug.log)"
    )]
    VifMissing { domain: String, vif: String },
    #[error(
        "`{domain}` has writable disks that are not replicated ({disks}): after a failover the backup would run on disks that missed the primary's writes; pass --unsafe-unreplicated-disks only if they are disposable (or set unsafe_unreplicated_disks = true in [domain.{domain}])"
    )]
    UnreplicatedDisks { domain: String, disks: String },
    #[error(
        "`{domain}`: disks {disks} are configured with replicate = true, but this remus has no disk replication yet (issue #9): remove those sections or protect without them"
    )]
    DiskReplicationMissing { domain: String, disks: String },
    #[error(
        "the nbd kernel module is missing (disk replication needs it): `modprobe nbd`, or install this kernel's modules package"
    )]
    NbdMissing,
    #[error(
        "`{domain}` advertises no suspend path (no control/feature-suspend, no device/suspend/event-channel in xenstore): every checkpoint would wait 60 s for the guest; it needs Xen PV drivers (a Linux guest has them once booted)"
    )]
    NoSuspendPath { domain: String },
    #[error("key file {0}")]
    Key(String),
    #[error(
        "no backup host for `{domain}`: pass --backup HOST[:PORT], or set backup in [defaults] or [domain.{domain}] of {origin}"
    )]
    NoBackup { domain: String, origin: String },
    #[error("backup address {0}")]
    BadBackup(String),
    #[error("listen address {0}")]
    BadListen(String),
    #[error(
        "backup unreachable: {0}; is `remus backup` running there (systemctl status remus-backup@DOMAIN)?"
    )]
    BackupUnreachable(ProbeError),
    #[error(
        "wrong key: {0}; copy /etc/remus/key from one host to the other (scp -p) and restart `remus backup`"
    )]
    WrongKey(ProbeError),
    #[error("backup refused: {0}")]
    BackupRefused(ProbeError),
    #[error(
        "`{domain}` runs on this host (domid {domid}): it is the live copy here, so this host is its primary now; run `remus protect {domain}` here and `remus backup {domain}` on the other host"
    )]
    RunsHere { domain: String, domid: u32 },
    #[error(
        "a copy of `{domain}` is left here from an earlier session ({domain}--incoming, domid {domid}, never activated); `remus unprotect {domain}` destroys it"
    )]
    CopyLeft { domain: String, domid: u32 },
}

impl CheckFailure {
    pub fn exit_code(&self) -> ExitCode {
        use CheckFailure::*;
        match self {
            NotRoot
            | NoXenTools { .. }
            | XenNotRunning { .. }
            | NoVif { .. }
            | EmulatedNic { .. }
            | UnreplicatedDisks { .. }
            | DiskReplicationMissing { .. }
            | NbdMissing
            | NoSuspendPath { .. } => ExitCode::Unsupported,
            UnknownDomain { .. }
            | Dom0
            | InTransit { .. }
            | NotRunning { .. }
            | AlreadyProtected { .. }
            | BufferLeftHolding { .. }
            | Key(_)
            | NoBackup { .. }
            | BadBackup(_)
            | BadListen(_)
            | RunsHere { .. }
            | CopyLeft { .. } => ExitCode::Usage,
            BackupUnreachable(_) => ExitCode::PeerLost,
            XlOutput { .. } | VifMissing { .. } | WrongKey(_) | BackupRefused(_) => {
                ExitCode::Failure
            }
        }
    }

    /// The fixed first words of the message (docs/operator.md's table is keyed on them).
    pub fn summary(&self) -> &'static str {
        use CheckFailure::*;
        match self {
            NotRoot => "must run as root",
            NoXenTools { .. } => "the Xen tools are not installed",
            XenNotRunning { .. } => "Xen is not running on this host",
            XlOutput { .. } => "xl gave an answer remus cannot read",
            UnknownDomain { .. } => "no running domain named",
            Dom0 => "Domain-0 cannot be protected",
            InTransit { .. } => "is a domain in transit",
            NotRunning { .. } => "is not running",
            AlreadyProtected { .. } => "is already protected",
            BufferLeftHolding { .. } => "a buffer left on",
            NoVif { .. } => "has no vif",
            EmulatedNic { .. } => "is an emulated one",
            VifMissing { .. } => "does not exist in dom0",
            UnreplicatedDisks { .. } => "has writable disks that are not replicated",
            DiskReplicationMissing { .. } => "are configured with replicate = true",
            NbdMissing => "the nbd kernel module is missing",
            NoSuspendPath { .. } => "advertises no suspend path",
            Key(_) => "key file",
            NoBackup { .. } => "no backup host for",
            BadBackup(_) => "backup address",
            BadListen(_) => "listen address",
            BackupUnreachable(_) => "backup unreachable",
            WrongKey(_) => "wrong key",
            BackupRefused(_) => "backup refused",
            RunsHere { .. } => "runs on this host",
            CopyLeft { .. } => "is left here from an earlier session",
        }
    }
}

/// Everything `remus protect` was asked.
#[derive(Clone, Debug)]
pub struct Request {
    pub domain: String,
    pub settings: Settings,
    /// Where the settings came from, for messages.
    pub origin: String,
}

/// What `remus protect` will run.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub domain: String,
    pub domid: u32,
    pub guest_type: GuestType,
    /// Every vif of the domain, in devid order: the relay holds the output of each
    /// (`--vif` repeated). Never empty.
    pub vifs: Vec<String>,
    /// HOST:PORT.
    pub backup: String,
    pub settings: Settings,
    /// Writable disks protected without replication (--unsafe-unreplicated-disks).
    pub unsafe_disks: Vec<String>,
    /// Every disk of the domain: xl must be told not to replicate them (`-d`).
    pub has_disks: bool,
    pub suspend: SuspendPath,
    /// Said before starting (unsafe disks, an HVM guest's suspend, a buffer taken over).
    pub warnings: Vec<String>,
}

impl Plan {
    /// The first vif: it names the relay's status and control sockets, as `relay send`
    /// names them by default.
    pub fn vif(&self) -> &str {
        self.vifs.first().map_or("", String::as_str)
    }

    /// `remus relay send …` as xl will run it (through `remus __relay-child`, which
    /// records the relay's exit status for `remus protect`).
    pub fn relay_argv(&self, exe: &Path, run_dir: &Path) -> Vec<String> {
        let s = &self.settings;
        let mut argv = vec![
            exe.display().to_string(),
            "__relay-child".into(),
            "--exit-file".into(),
            state::relay_exit_path(run_dir, &self.domain)
                .display()
                .to_string(),
            "--".into(),
            "relay".into(),
            "send".into(),
            "--backup".into(),
            self.backup.clone(),
            "--key-file".into(),
            s.key_file.display().to_string(),
        ];
        for v in &self.vifs {
            argv.extend(["--vif".into(), v.clone()]);
        }
        argv.extend([
            "--heartbeat-interval".into(),
            format!("{}ms", s.heartbeat_interval.as_millis()),
            "--heartbeat-timeout".into(),
            format!("{}ms", s.heartbeat_timeout.as_millis()),
            "--compress".into(),
            s.compress.as_str().into(),
            "--limit-bytes".into(),
            s.limit_bytes.to_string(),
            "--cache-pages".into(),
            s.cache_pages.to_string(),
            "--status-socket".into(),
            state::relay_send_socket(run_dir, self.vif())
                .display()
                .to_string(),
            "--control-socket".into(),
            state::relay_send_control(run_dir, self.vif())
                .display()
                .to_string(),
        ]);
        argv
    }

    /// The `xl remus` argv: `-F -n` (xl's own network buffering is absent on Debian and
    /// replaced by the relay), `-d` when the domain has disks (xl would otherwise look
    /// for DRBD protocol D devices and abort), `-s ''` (the last argument is the
    /// transport command itself).
    pub fn xl_argv(&self, xl: &str, exe: &Path, run_dir: &Path) -> Vec<String> {
        let mut v = vec![xl.to_string(), "remus".into(), "-F".into(), "-n".into()];
        if self.has_disks {
            v.push("-d".into());
        }
        v.extend([
            "-i".into(),
            self.settings.interval_ms.to_string(),
            "-s".into(),
            String::new(),
            self.domain.clone(),
            shell_join(&self.relay_argv(exe, run_dir)),
        ]);
        v
    }
}

/// Quotes one word for `sh -c` (xl runs the transport command through sh).
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:=@%+,-".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

pub fn shell_join(words: &[String]) -> String {
    words
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Collected failures; the exit code is the first one's (the checks run in the order a
/// person would fix things: privileges, Xen, the domain, its devices, key, backup).
#[derive(Debug, Default)]
pub struct Failures(pub Vec<CheckFailure>);

impl Failures {
    pub fn exit_code(&self) -> ExitCode {
        self.0.first().map_or(ExitCode::Ok, CheckFailure::exit_code)
    }
}

/// Finds the domain among the running ones (by name or domid).
fn find<'a>(list: &'a [ListedDomain], domain: &str) -> Option<&'a ListedDomain> {
    list.iter()
        .find(|d| d.name == domain)
        .or_else(|| match domain.parse::<u32>() {
            Ok(id) => list.iter().find(|d| d.domid == id),
            Err(_) => None,
        })
}

fn xl_failure(e: XenError) -> CheckFailure {
    match e {
        XenError::Missing { tool } => CheckFailure::NoXenTools { tool },
        XenError::Parse { what, .. } => CheckFailure::XlOutput { why: what },
        other => CheckFailure::XenNotRunning {
            why: other.to_string(),
        },
    }
}

/// Root and a running Xen: the first two checks of both ends.
pub fn check_xen(xen: &impl Xen, host: &impl Host, f: &mut Failures) -> Option<Vec<ListedDomain>> {
    if !host.is_root() {
        f.0.push(CheckFailure::NotRoot);
    }
    if let Err(e) = xen.info() {
        f.0.push(xl_failure(e));
        return None;
    }
    match xen.list().map_err(xl_failure).and_then(|out| {
        xen::parse_list(&out).map_err(|why| CheckFailure::XlOutput {
            why: format!("xl list: {why}"),
        })
    }) {
        Ok(l) => Some(l),
        Err(e) => {
            f.0.push(e);
            None
        }
    }
}

/// The domain exists, runs, is not Domain-0, not in transit, not protected already.
fn check_domain<'a>(
    list: &'a [ListedDomain],
    domain: &str,
    host: &impl Host,
    f: &mut Failures,
) -> Option<&'a ListedDomain> {
    if domain.ends_with("--incoming") || domain.ends_with("--migratedaway") {
        f.0.push(CheckFailure::InTransit {
            domain: domain.into(),
        });
        return None;
    }
    let Some(d) = find(list, domain) else {
        let running: Vec<&str> = list
            .iter()
            .filter(|d| d.domid != 0)
            .map(|d| d.name.as_str())
            .collect();
        f.0.push(CheckFailure::UnknownDomain {
            domain: domain.into(),
            running: if running.is_empty() {
                "none".into()
            } else {
                running.join(", ")
            },
        });
        return None;
    };
    if d.domid == 0 {
        f.0.push(CheckFailure::Dom0);
        return None;
    }
    if d.name.ends_with("--incoming") || d.name.ends_with("--migratedaway") {
        f.0.push(CheckFailure::InTransit {
            domain: d.name.clone(),
        });
        return None;
    }
    let by = host
        .protect_running(&d.name)
        .map(|p| format!("remus protect, pid {p}"))
        .or_else(|| {
            host.xl_remus_running(&d.name, d.domid)
                .map(|p| format!("xl remus, pid {p}"))
        });
    if let Some(by) = by {
        f.0.push(CheckFailure::AlreadyProtected {
            domain: d.name.clone(),
            by,
        });
        return None;
    }
    if let Some(why) = d.not_running() {
        f.0.push(CheckFailure::NotRunning {
            domain: d.name.clone(),
            state: d.state.clone(),
            why,
        });
        return None;
    }
    Some(d)
}

/// The vifs to hold (all of them) and the writable disks accepted unreplicated.
type Devices = (Vec<String>, Vec<String>);

/// The vifs to hold; the disks' verdict; the suspend path.
#[allow(clippy::too_many_arguments)]
fn check_devices(
    cfg: &DomainConfig,
    vifs_backend: &BTreeMap<String, String>,
    guest_store: &BTreeMap<String, String>,
    settings: &Settings,
    host: &impl Host,
    f: &mut Failures,
    warnings: &mut Vec<String>,
) -> Option<Devices> {
    let vifs = check_vifs(cfg, vifs_backend, host, f, warnings);
    let unsafe_disks = check_disks(cfg, settings, host, f, warnings);
    check_suspend(cfg, guest_store, f, warnings);
    vifs.map(|v| (v, unsafe_disks))
}

/// Every vif of the domain, in devid order: all of them are held (one left out would let
/// its output out unchecked), so each must be paravirtual, present on this host and not
/// held by another buffer. A failure for each vif that is not.
fn check_vifs(
    cfg: &DomainConfig,
    vifs_backend: &BTreeMap<String, String>,
    host: &impl Host,
    f: &mut Failures,
    warnings: &mut Vec<String>,
) -> Option<Vec<String>> {
    if cfg.nics.is_empty() {
        f.0.push(CheckFailure::NoVif {
            domain: cfg.name.clone(),
        });
        return None;
    }
    let mut nics: Vec<&xen::Nic> = cfg.nics.iter().collect();
    nics.sort_by_key(|n| n.devid);
    let before = f.0.len();
    let vifs: Vec<String> = nics
        .into_iter()
        .filter_map(|nic| check_vif(cfg, nic, vifs_backend, host, f, warnings))
        .collect();
    (f.0.len() == before && vifs.len() == cfg.nics.len()).then_some(vifs)
}

/// One paravirtual vif whose output is held, present on this host and not held by
/// another buffer.
fn check_vif(
    cfg: &DomainConfig,
    nic: &xen::Nic,
    vifs_backend: &BTreeMap<String, String>,
    host: &impl Host,
    f: &mut Failures,
    warnings: &mut Vec<String>,
) -> Option<String> {
    let name = &cfg.name;
    let vif = xen::vif_name(cfg.domid, nic, vifs_backend);
    if nic.emulated {
        f.0.push(CheckFailure::EmulatedNic {
            domain: name.clone(),
            devid: nic.devid,
            vif,
        });
        return None;
    }
    if !host.iface_exists(&vif) {
        f.0.push(CheckFailure::VifMissing {
            domain: name.clone(),
            vif,
        });
        return None;
    }
    match host.buffer_on(&vif) {
        LeftBuffer::None => {}
        LeftBuffer::Passthrough => warnings.push(format!(
            "{vif} still carries a buffer in pass-through mode (left by a relay that lost its backup); the new relay takes it over"
        )),
        LeftBuffer::Live { pid } => f.0.push(CheckFailure::AlreadyProtected {
            domain: name.clone(),
            by: format!("an output buffer on {vif} held by pid {pid}"),
        }),
        LeftBuffer::Holding => f.0.push(CheckFailure::BufferLeftHolding {
            domain: name.clone(),
            vif: vif.clone(),
        }),
    }
    Some(vif)
}

/// Disks: a disk the guest cannot write never diverges; the others must be replicated,
/// or explicitly accepted as unreplicated (then they are returned, to be named).
fn check_disks(
    cfg: &DomainConfig,
    settings: &Settings,
    host: &impl Host,
    f: &mut Failures,
    warnings: &mut Vec<String>,
) -> Vec<String> {
    let name = &cfg.name;
    let mut replicated = Vec::new();
    let mut unreplicated = Vec::new();
    for d in cfg.disks.iter().filter(|d| d.writable && !d.cdrom) {
        match settings.disks.get(&d.vdev) {
            Some(DiskSection {
                replicate: true, ..
            }) => replicated.push(d.vdev.clone()),
            _ => unreplicated.push(match &d.target {
                Some(t) => format!("{}: {t}", d.vdev),
                None => d.vdev.clone(),
            }),
        }
    }
    if !replicated.is_empty() {
        if !host.nbd_available() {
            f.0.push(CheckFailure::NbdMissing);
        }
        f.0.push(CheckFailure::DiskReplicationMissing {
            domain: name.clone(),
            disks: replicated.join(", "),
        });
    }
    if unreplicated.is_empty() {
        return Vec::new();
    }
    if !settings.unsafe_unreplicated_disks {
        f.0.push(CheckFailure::UnreplicatedDisks {
            domain: name.clone(),
            disks: unreplicated.join(", "),
        });
        return Vec::new();
    }
    warnings.push(format!(
        "UNSAFE: disks {} are not replicated (--unsafe-unreplicated-disks): after a failover the backup runs on disks that missed the primary's writes",
        unreplicated.join(", ")
    ));
    cfg.disks
        .iter()
        .filter(|d| d.writable && !d.cdrom)
        .map(|d| d.vdev.clone())
        .collect()
}

/// A PV guest must advertise its suspend path; an HVM guest without one is only slower.
fn check_suspend(
    cfg: &DomainConfig,
    guest_store: &BTreeMap<String, String>,
    f: &mut Failures,
    warnings: &mut Vec<String>,
) {
    let name = &cfg.name;
    match xen::suspend_path(cfg.domid, guest_store) {
        SuspendPath::None if cfg.guest_type == GuestType::Hvm => warnings.push(format!(
            "`{name}` advertises no PV suspend path: xl suspends this HVM guest through the hypervisor (slower checkpoints)"
        )),
        SuspendPath::None => f.0.push(CheckFailure::NoSuspendPath {
            domain: name.clone(),
        }),
        _ => {}
    }
}

/// Runs every check; returns the plan, or every failure found.
pub async fn plan(
    req: &Request,
    xen: &impl Xen,
    host: &impl Host,
    backup: &impl Backup,
) -> Result<Plan, Failures> {
    let mut f = Failures::default();
    let mut warnings = Vec::new();
    let found = domain_config(req, xen, host, &mut f);
    let (devices, suspend) = match &found {
        Some(cfg) => devices(cfg, req, xen, host, &mut f, &mut warnings),
        None => (None, SuspendPath::None),
    };
    let key = check_key(&req.settings.key_file, &mut f);
    let addr = check_backup_address(req, &mut f);
    // The backup last (one message per problem, so it is asked even when something
    // here is missing too; a probe costs the backup nothing: it answers and starts
    // nothing, and counts no refusal unless the key is wrong).
    if let (Some(a), Some(k)) = (&addr, &key) {
        match backup.probe(a, k).await {
            Ok(_) => {}
            Err(e @ (ProbeError::Unreachable { .. } | ProbeError::Timeout { .. })) => {
                f.0.push(CheckFailure::BackupUnreachable(e))
            }
            Err(e @ ProbeError::WrongKey { .. }) => f.0.push(CheckFailure::WrongKey(e)),
            Err(e) => f.0.push(CheckFailure::BackupRefused(e)),
        }
    }
    match (f.0.is_empty(), found, devices, addr) {
        (true, Some(cfg), Some((vifs, unsafe_disks)), Some(backup)) => Ok(Plan {
            domain: cfg.name.clone(),
            domid: cfg.domid,
            guest_type: cfg.guest_type,
            vifs,
            backup,
            settings: req.settings.clone(),
            unsafe_disks,
            has_disks: !cfg.disks.is_empty(),
            suspend,
            warnings,
        }),
        _ => Err(f),
    }
}

/// Xen answers, the domain is one to protect: its libxl configuration.
fn domain_config(
    req: &Request,
    xen: &impl Xen,
    host: &impl Host,
    f: &mut Failures,
) -> Option<DomainConfig> {
    let list = check_xen(xen, host, f)?;
    let d = check_domain(&list, &req.domain, host, f)?;
    let parsed = xen.list_long(&d.name).map_err(xl_failure).and_then(|out| {
        xen::parse_list_long(&out).map_err(|why| CheckFailure::XlOutput {
            why: format!("xl list -l {}: {why}", d.name),
        })
    });
    match parsed {
        Ok(cfg) => Some(cfg),
        Err(e) => {
            f.0.push(e);
            None
        }
    }
}

/// The devices' checks over what xenstore says of the domain; its suspend path.
fn devices(
    cfg: &DomainConfig,
    req: &Request,
    xen: &impl Xen,
    host: &impl Host,
    f: &mut Failures,
    warnings: &mut Vec<String>,
) -> (Option<Devices>, SuspendPath) {
    let ls = |p: &str| match xen.xenstore_ls(p) {
        Ok(Some(out)) => Ok(xen::parse_xenstore_ls(&out)),
        Ok(None) => Ok(BTreeMap::new()),
        Err(e) => Err(xl_failure(e)),
    };
    let backend = ls(&format!("/local/domain/0/backend/vif/{}", cfg.domid));
    let guest = ls(&format!("/local/domain/{}", cfg.domid));
    match (backend, guest) {
        (Ok(b), Ok(g)) => {
            let suspend = xen::suspend_path(cfg.domid, &g);
            let devices = check_devices(cfg, &b, &g, &req.settings, host, f, warnings);
            (devices, suspend)
        }
        (Err(e), _) | (_, Err(e)) => {
            f.0.push(e);
            (None, SuspendPath::None)
        }
    }
}

/// The key: the relay's own rules (regular file, 0600, not empty).
fn check_key(path: &Path, f: &mut Failures) -> Option<crate::replication::Key> {
    match crate::replication::Key::load(path) {
        Ok(k) => Some(k),
        Err(crate::replication::WireError::KeyFile { path, problem }) => {
            f.0.push(CheckFailure::Key(format!("{path}: {problem}")));
            None
        }
        Err(e) => {
            f.0.push(CheckFailure::Key(e.to_string()));
            None
        }
    }
}

/// The backup's address, from the settings.
fn check_backup_address(req: &Request, f: &mut Failures) -> Option<String> {
    let Some(b) = &req.settings.backup else {
        f.0.push(CheckFailure::NoBackup {
            domain: req.domain.clone(),
            origin: req.origin.clone(),
        });
        return None;
    };
    match crate::config::backup_address(b) {
        Ok(a) => Some(a),
        Err(why) => {
            f.0.push(CheckFailure::BadBackup(why));
            None
        }
    }
}

/// Where the binary that xl must run lives (the running `remus`, so PATH does not matter).
pub fn self_exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("remus"))
}
