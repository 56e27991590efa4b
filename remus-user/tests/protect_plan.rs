//! `remus protect`'s checks and plan, driven through fakes of its ports: `FakeXen` answers
//! from outputs captured in the lab's dom0 (tests/fixtures/xen/, see its README),
//! `FakeHost` and `FakeBackup` say what each test needs. No Xen, no root, no network.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use remus_user::config::Config;
use remus_user::exit::ExitCode;
use remus_user::protect::checks::{
    Backup, CheckFailure, Failures, Host, LeftBuffer, Plan, Request, plan,
};
use remus_user::protect::probe::{ProbeError, ProbeOk};
use remus_user::protect::xen::{GuestType, NotRunning, Xen, XenError};
use remus_user::replication::Key;

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/xen")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Answers like xl and xenstore-ls did in the lab.
struct FakeXen {
    xl_missing: bool,
    xen_down: bool,
    list: String,
    long: BTreeMap<String, String>,
    /// Every `path = "value"` line xenstore held.
    store: String,
    destroyed: RefCell<Vec<String>>,
}

impl FakeXen {
    /// The lab after `lab.sh guest-up 96`: Domain-0 and `guest` (domid 1).
    fn lab() -> FakeXen {
        let mut long = BTreeMap::new();
        long.insert("guest".to_string(), fixture("xl-list-l-guest.txt"));
        long.insert("novif".to_string(), fixture("xl-list-l-novif.txt"));
        FakeXen {
            xl_missing: false,
            xen_down: false,
            list: fixture("xl-list.txt"),
            long,
            store: fixture("xenstore-ls-vif-backend.txt") + &fixture("xenstore-ls-guest.txt"),
            destroyed: RefCell::new(Vec::new()),
        }
    }
}

impl Xen for FakeXen {
    fn info(&self) -> Result<String, XenError> {
        if self.xl_missing {
            return Err(XenError::Missing { tool: "xl".into() });
        }
        if self.xen_down {
            return Err(XenError::Failed {
                cmd: "xl info".into(),
                status: "exit status: 1".into(),
                stderr: "xc: error: Could not obtain handle on privileged command interface".into(),
            });
        }
        Ok("xen_version : 4.17\n".into())
    }
    fn list(&self) -> Result<String, XenError> {
        Ok(self.list.clone())
    }
    fn list_long(&self, domain: &str) -> Result<String, XenError> {
        self.long.get(domain).cloned().ok_or(XenError::Failed {
            cmd: format!("xl list -l {domain}"),
            status: "exit status: 1".into(),
            stderr: format!("{domain} is an invalid domain identifier (rc=-6)"),
        })
    }
    fn xenstore_ls(&self, path: &str) -> Result<Option<String>, XenError> {
        let lines: Vec<&str> = self
            .store
            .lines()
            .filter(|l| l.starts_with(&format!("{path}/")) || l.starts_with(&format!("{path} ")))
            .collect();
        Ok((!lines.is_empty()).then(|| lines.join("\n")))
    }
    fn destroy(&self, domain: &str) -> Result<(), XenError> {
        self.destroyed.borrow_mut().push(domain.to_string());
        Ok(())
    }
}

#[derive(Clone)]
struct FakeHost {
    root: bool,
    ifaces: Vec<String>,
    nbd: bool,
    buffer: LeftBuffer,
    protect: Option<u32>,
    xl_remus: Option<u32>,
}

impl Default for FakeHost {
    fn default() -> Self {
        FakeHost {
            root: true,
            ifaces: vec!["vif1.0".into()],
            nbd: true,
            buffer: LeftBuffer::None,
            protect: None,
            xl_remus: None,
        }
    }
}

impl Host for FakeHost {
    fn is_root(&self) -> bool {
        self.root
    }
    fn iface_exists(&self, name: &str) -> bool {
        self.ifaces.iter().any(|i| i == name)
    }
    fn nbd_available(&self) -> bool {
        self.nbd
    }
    fn buffer_on(&self, _: &str) -> LeftBuffer {
        self.buffer
    }
    fn protect_running(&self, _: &str) -> Option<u32> {
        self.protect
    }
    fn xl_remus_running(&self, _: &str, _: u32) -> Option<u32> {
        self.xl_remus
    }
}

/// A backup that answers the probe as told, and records who asked.
struct FakeBackup {
    answer: fn(&str) -> Result<ProbeOk, ProbeError>,
    asked: RefCell<Vec<String>>,
}

impl FakeBackup {
    fn ok() -> FakeBackup {
        FakeBackup {
            answer: |_| Ok(ProbeOk { version: 2 }),
            asked: RefCell::new(Vec::new()),
        }
    }
    fn with(answer: fn(&str) -> Result<ProbeOk, ProbeError>) -> FakeBackup {
        FakeBackup {
            answer,
            asked: RefCell::new(Vec::new()),
        }
    }
}

impl Backup for FakeBackup {
    async fn probe(&self, addr: &str, _key: &Key) -> Result<ProbeOk, ProbeError> {
        self.asked.borrow_mut().push(addr.to_string());
        (self.answer)(addr)
    }
}

struct Keys {
    _dir: tempfile::TempDir,
    good: PathBuf,
    open: PathBuf,
}

fn keys() -> Keys {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let good = d.path().join("key");
    std::fs::write(&good, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o600)).unwrap();
    let open = d.path().join("open-key");
    std::fs::write(&open, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    Keys {
        _dir: d,
        good,
        open,
    }
}

fn request(domain: &str, toml: &str, key: &Path) -> Request {
    let cfg = Config::parse(toml, None).unwrap();
    let mut settings = cfg.settings(domain);
    settings.key_file = key.to_path_buf();
    Request {
        domain: domain.into(),
        settings,
        origin: "/etc/remus/remus.toml".into(),
    }
}

fn run(req: &Request, xen: &FakeXen, host: &FakeHost, b: &FakeBackup) -> Result<Plan, Failures> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(plan(req, xen, host, b))
}

/// The checks against the lab as captured, a host and a backup with nothing to say.
fn lab_plan(domain: &str, toml: &str, key: &Path) -> Result<Plan, Failures> {
    run(
        &request(domain, toml, key),
        &FakeXen::lab(),
        &FakeHost::default(),
        &FakeBackup::ok(),
    )
}

fn failures(r: Result<Plan, Failures>) -> (ExitCode, Vec<CheckFailure>) {
    match r {
        Ok(p) => panic!("expected failures, got a plan: {p:?}"),
        Err(f) => (f.exit_code(), f.0),
    }
}

/// The failures of a request that must be refused.
fn refusal(
    domain: &str,
    toml: &str,
    key: &Path,
    xen: &FakeXen,
    host: &FakeHost,
    b: &FakeBackup,
) -> (ExitCode, Vec<CheckFailure>) {
    failures(run(&request(domain, toml, key), xen, host, b))
}

/// [`refusal`] on `xen`, with a host and a backup that have nothing to say.
fn refusal_on(
    xen: &FakeXen,
    domain: &str,
    toml: &str,
    key: &Path,
) -> (ExitCode, Vec<CheckFailure>) {
    refusal(
        domain,
        toml,
        key,
        xen,
        &FakeHost::default(),
        &FakeBackup::ok(),
    )
}

const BACKUP: &str = "[defaults]\nbackup = \"backup.example\"\n";

#[test]
fn the_lab_guest_gets_the_exact_xl_remus_command() {
    let k = keys();
    let b = FakeBackup::ok();
    let p = run(
        &request("guest", BACKUP, &k.good),
        &FakeXen::lab(),
        &FakeHost::default(),
        &b,
    )
    .unwrap();
    assert_eq!(p.domid, 1);
    assert_eq!(p.guest_type, GuestType::Pv);
    // No vifname in xenstore: libxl's default name.
    assert_eq!(p.vifs, ["vif1.0"]);
    assert_eq!(p.backup, "backup.example:7788");
    assert!(!p.has_disks);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert_eq!(*b.asked.borrow(), ["backup.example:7788"]);
    let argv = p.xl_argv("xl", Path::new("/usr/sbin/remus"), Path::new("/run/remus"));
    assert_eq!(argv.len(), 10);
    assert_eq!(
        argv[..9],
        ["xl", "remus", "-F", "-n", "-i", "200", "-s", "", "guest"]
    );
    let key = k.good.display().to_string();
    assert_eq!(
        argv[9],
        format!(
            "/usr/sbin/remus __relay-child --exit-file /run/remus/protect-guest.relay-exit -- relay send \
             --backup backup.example:7788 --key-file {key} --vif vif1.0 --heartbeat-interval 200ms \
             --heartbeat-timeout 1000ms --compress lz4 --limit-bytes 268435456 --cache-pages 262144 \
             --status-socket /run/remus/relay-send-vif1.0.sock \
             --control-socket /run/remus/relay-send-vif1.0.ctl"
        )
    );
}

#[test]
fn the_transport_command_survives_sh_quoting() {
    // xl runs the last argument with `sh -c`: odd paths must arrive as one word each.
    let k = keys();
    let p = lab_plan("guest", BACKUP, &k.good).unwrap();
    let odd = Path::new("/opt/my remus/it's");
    let argv = p.relay_argv(odd, Path::new("/run/re mus"));
    let rune = p.xl_argv("xl", odd, Path::new("/run/re mus"))[9].clone();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("printf '%s\\n' {rune}"))
        .output()
        .unwrap();
    let words: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(words, argv);
}

#[test]
fn a_named_vif_comes_from_xenstore() {
    let k = keys();
    let mut xen = FakeXen::lab();
    xen.store
        .push_str("/local/domain/0/backend/vif/1/0/vifname = \"web-lan\"\n");
    let host = FakeHost {
        ifaces: vec!["web-lan".into()],
        ..Default::default()
    };
    let p = run(
        &request("guest", BACKUP, &k.good),
        &xen,
        &host,
        &FakeBackup::ok(),
    )
    .unwrap();
    assert_eq!(p.vifs, ["web-lan"]);
}

#[test]
fn a_domain_can_be_named_by_its_domid() {
    let k = keys();
    let p = lab_plan("1", BACKUP, &k.good).unwrap();
    assert_eq!(p.domain, "guest");
}

#[test]
fn unknown_domain0_in_transit_and_paused_domains_are_refused() {
    let k = keys();
    let b = FakeBackup::ok();
    let host = FakeHost::default();
    let (code, f) = refusal("nosuch", BACKUP, &k.good, &FakeXen::lab(), &host, &b);
    assert_eq!(code, ExitCode::Usage);
    assert!(matches!(&f[0], CheckFailure::UnknownDomain { running, .. } if running == "guest"));

    let (_, f) = refusal("Domain-0", BACKUP, &k.good, &FakeXen::lab(), &host, &b);
    assert!(matches!(f[0], CheckFailure::Dom0));

    // Captured while xl remus ran: the guest suspended mid-checkpoint, its copy incoming.
    let mut during = FakeXen::lab();
    during.list = fixture("xl-list-during-remus.txt");
    let (_, f) = refusal("guest--incoming", BACKUP, &k.good, &during, &host, &b);
    assert!(matches!(f[0], CheckFailure::InTransit { .. }));
    let (_, f) = refusal("guest", BACKUP, &k.good, &during, &host, &b);
    assert!(
        matches!(
            &f[0],
            CheckFailure::NotRunning {
                why: NotRunning::Suspended,
                ..
            }
        ),
        "{f:?}"
    );

    // `xl create -p novif`: paused.
    let mut paused = FakeXen::lab();
    paused.list = fixture("xl-list-novif.txt");
    let (code, f) = refusal("novif", BACKUP, &k.good, &paused, &host, &b);
    assert_eq!(code, ExitCode::Usage);
    assert!(
        matches!(
            &f[0],
            CheckFailure::NotRunning {
                why: NotRunning::Paused,
                ..
            }
        ),
        "{f:?}"
    );
}

#[test]
fn a_domain_without_vif_is_unsupported() {
    let k = keys();
    let mut xen = FakeXen::lab();
    // The captured novif domain, as if it had been unpaused.
    xen.list = fixture("xl-list-novif.txt").replace("--p---", "-b----");
    let (code, f) = refusal_on(&xen, "novif", BACKUP, &k.good);
    assert_eq!(code, ExitCode::Unsupported);
    assert!(matches!(f[0], CheckFailure::NoVif { .. }), "{f:?}");
    // Not booted yet: no suspend path advertised either, said too.
    assert!(
        f.iter()
            .any(|x| matches!(x, CheckFailure::NoSuspendPath { .. })),
        "{f:?}"
    );
}

#[test]
fn already_protected_in_three_ways() {
    let k = keys();
    let b = FakeBackup::ok();
    for host in [
        FakeHost {
            protect: Some(77),
            ..Default::default()
        },
        FakeHost {
            xl_remus: Some(78),
            ..Default::default()
        },
        FakeHost {
            buffer: LeftBuffer::Live { pid: 79 },
            ..Default::default()
        },
    ] {
        let (code, f) = refusal("guest", BACKUP, &k.good, &FakeXen::lab(), &host, &b);
        assert_eq!(code, ExitCode::Usage);
        assert!(
            matches!(f[0], CheckFailure::AlreadyProtected { .. }),
            "{f:?}"
        );
    }
    // Protected by another xl remus: the guest shows up suspended in a checkpoint, which
    // must still read as "already protected", not "not running".
    let mut during = FakeXen::lab();
    during.list = fixture("xl-list-during-remus.txt");
    let host = FakeHost {
        xl_remus: Some(78),
        ..Default::default()
    };
    let (_, f) = refusal("guest", BACKUP, &k.good, &during, &host, &b);
    assert!(
        matches!(f[0], CheckFailure::AlreadyProtected { .. }),
        "{f:?}"
    );
}

#[test]
fn a_buffer_left_holding_refuses_and_one_left_open_is_taken_over() {
    let k = keys();
    let holding = FakeHost {
        buffer: LeftBuffer::Holding,
        ..Default::default()
    };
    let (code, f) = refusal(
        "guest",
        BACKUP,
        &k.good,
        &FakeXen::lab(),
        &holding,
        &FakeBackup::ok(),
    );
    assert_eq!(code, ExitCode::Usage);
    assert!(matches!(f[0], CheckFailure::BufferLeftHolding { .. }));
    let open = FakeHost {
        buffer: LeftBuffer::Passthrough,
        ..Default::default()
    };
    let p = run(
        &request("guest", BACKUP, &k.good),
        &FakeXen::lab(),
        &open,
        &FakeBackup::ok(),
    )
    .unwrap();
    assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
}

/// The lab guest with disks and NICs added to its libxl JSON.
fn with_devices(nics: &str, disks: &str) -> FakeXen {
    let mut xen = FakeXen::lab();
    let long = fixture("xl-list-l-guest.txt").replace(
        "\"on_reboot\": \"restart\"",
        &format!("{nics}{disks}\"on_reboot\": \"restart\""),
    );
    let long = if nics.is_empty() {
        long
    } else {
        // Replace the captured single NIC by the given list.
        let start = long.find("\"nics\": [").unwrap();
        let end = long[start..].find("],").unwrap() + start + 2;
        format!("{}{}", &long[..start], &long[end..])
    };
    xen.long.insert("guest".into(), long);
    xen
}

const TWO_NICS: &str = r#""nics": [ { "devid": 0, "mac": "00:16:3e:4c:41:42", "bridge": "xenbr0", "nictype": "vif" },
                          { "devid": 1, "mac": "00:16:3e:4c:41:44", "bridge": "xenbr0", "ifname": "guest-lan", "nictype": "vif" } ],"#;
const ONE_DISK: &str = r#""disks": [ { "pdev_path": "/dev/vg0/guest", "vdev": "xvda", "backend": "phy", "format": "raw", "readwrite": 1 },
                           { "pdev_path": "/srv/iso/install.iso", "vdev": "xvdc", "format": "raw", "readwrite": 0, "is_cdrom": 1 } ],"#;

#[test]
fn the_captured_two_vif_domain_with_a_disk_is_refused_for_each_reason() {
    // `multi` as captured (paused, never booted), shown running so the device checks run.
    let k = keys();
    let mut xen = FakeXen::lab();
    xen.list = fixture("xl-list-with-multi.txt").replace("--p---", "-b----");
    xen.long
        .insert("multi".into(), fixture("xl-list-l-multi.txt"));
    xen.store =
        fixture("xenstore-ls-vif-backend-multi.txt") + &fixture("xenstore-ls-guest-multi.txt");
    let host = FakeHost {
        ifaces: vec!["vif2.0".into(), "multi-lan".into()],
        ..Default::default()
    };
    let (code, f) = refusal("multi", BACKUP, &k.good, &xen, &host, &FakeBackup::ok());
    assert_eq!(code, ExitCode::Unsupported);
    let kinds: Vec<&str> = f.iter().map(CheckFailure::summary).collect();
    // Its two vifs are fine: both are held.
    assert_eq!(
        kinds,
        [
            "has writable disks that are not replicated",
            "advertises no suspend path"
        ]
    );
    assert!(
        matches!(&f[0], CheckFailure::UnreplicatedDisks { disks, .. } if disks == "xvda: /run/lab/multi-disk.img"),
        "{f:?}"
    );
}

#[test]
fn every_vif_of_a_two_vif_domain_is_held() {
    let k = keys();
    let host = FakeHost {
        ifaces: vec!["vif1.0".into(), "guest-lan".into()],
        ..Default::default()
    };
    let p = run(
        &request("guest", BACKUP, &k.good),
        &with_devices(TWO_NICS, ""),
        &host,
        &FakeBackup::ok(),
    )
    .unwrap();
    assert_eq!(p.vifs, ["vif1.0", "guest-lan"]);
    // The first names the relay's sockets, as `relay send` names them by default.
    assert_eq!(p.vif(), "vif1.0");
    let argv = p.relay_argv(Path::new("/usr/sbin/remus"), Path::new("/run/remus"));
    let vifs: Vec<&str> = argv
        .windows(2)
        .filter(|w| w[0] == "--vif")
        .map(|w| w[1].as_str())
        .collect();
    assert_eq!(vifs, ["vif1.0", "guest-lan"]);
    let rune = p.xl_argv("xl", Path::new("/usr/sbin/remus"), Path::new("/run/remus"))[9].clone();
    assert!(
        rune.contains("--vif vif1.0 --vif guest-lan --heartbeat-interval"),
        "{rune}"
    );
    assert!(
        rune.contains("--status-socket /run/remus/relay-send-vif1.0.sock"),
        "{rune}"
    );
}

#[test]
fn a_two_vif_domain_is_refused_for_its_one_bad_vif() {
    let k = keys();
    // The second vif is missing from dom0: named, and nothing is planned.
    let (code, f) = refusal_on(&with_devices(TWO_NICS, ""), "guest", BACKUP, &k.good);
    assert_eq!(code, ExitCode::Failure);
    assert!(
        matches!(&f[..], [CheckFailure::VifMissing { vif, .. }] if vif == "guest-lan"),
        "{f:?}"
    );
    // The second NIC is an emulated one: refused by its devid.
    let emu = TWO_NICS.replacen(
        r#""ifname": "guest-lan", "nictype": "vif""#,
        r#""ifname": "guest-lan", "nictype": "vif_ioemu""#,
        1,
    );
    let host = FakeHost {
        ifaces: vec!["vif1.0".into(), "guest-lan".into()],
        ..Default::default()
    };
    let (code, f) = refusal(
        "guest",
        BACKUP,
        &k.good,
        &with_devices(&emu, ""),
        &host,
        &FakeBackup::ok(),
    );
    assert_eq!(code, ExitCode::Unsupported);
    assert!(
        matches!(&f[..], [CheckFailure::EmulatedNic { devid: 1, .. }]),
        "{f:?}"
    );
}

#[test]
fn unreplicated_disks_are_refused_unless_the_operator_accepts_them() {
    let k = keys();
    let xen = with_devices("", ONE_DISK);
    let (code, f) = refusal_on(&xen, "guest", BACKUP, &k.good);
    assert_eq!(code, ExitCode::Unsupported);
    match &f[0] {
        // The read-only cdrom is not named: it cannot diverge.
        CheckFailure::UnreplicatedDisks { disks, .. } => assert_eq!(disks, "xvda: /dev/vg0/guest"),
        other => panic!("{other:?}"),
    }
    let mut req = request("guest", BACKUP, &k.good);
    req.settings.unsafe_unreplicated_disks = true;
    let p = run(&req, &xen, &FakeHost::default(), &FakeBackup::ok()).unwrap();
    assert!(p.has_disks);
    assert_eq!(p.unsafe_disks, ["xvda"]);
    assert!(p.warnings[0].starts_with("UNSAFE"), "{:?}", p.warnings);
    let argv = p.xl_argv("xl", Path::new("remus"), Path::new("/run/remus"));
    assert_eq!(argv[..5], ["xl", "remus", "-F", "-n", "-d"]);
}

#[test]
fn replicated_disks_wait_for_the_disk_work_and_name_a_missing_nbd() {
    let k = keys();
    let toml = format!("{BACKUP}[domain.guest.disk.xvda]\nreplicate = true\n");
    let xen = with_devices("", ONE_DISK);
    let no_nbd = FakeHost {
        nbd: false,
        ..Default::default()
    };
    let (code, f) = refusal("guest", &toml, &k.good, &xen, &no_nbd, &FakeBackup::ok());
    assert_eq!(code, ExitCode::Unsupported);
    assert!(matches!(f[0], CheckFailure::NbdMissing), "{f:?}");
    assert!(
        matches!(f[1], CheckFailure::DiskReplicationMissing { .. }),
        "{f:?}"
    );
    let (_, f) = refusal_on(&xen, "guest", &toml, &k.good);
    assert_eq!(f.len(), 1, "{f:?}");
}

#[test]
fn key_backup_and_probe_failures_each_have_their_code() {
    let k = keys();
    let host = FakeHost::default();
    let xen = FakeXen::lab();
    let (code, f) = refusal("guest", BACKUP, &k.open, &xen, &host, &FakeBackup::ok());
    assert_eq!(code, ExitCode::Usage);
    assert!(matches!(&f[0], CheckFailure::Key(_)), "{f:?}");

    let (code, f) = refusal("guest", "", &k.good, &xen, &host, &FakeBackup::ok());
    assert_eq!(code, ExitCode::Usage);
    assert!(matches!(f[0], CheckFailure::NoBackup { .. }));

    let unreachable = FakeBackup::with(|a| {
        Err(ProbeError::Unreachable {
            addr: a.into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        })
    });
    let (code, f) = refusal("guest", BACKUP, &k.good, &xen, &host, &unreachable);
    assert_eq!(code, ExitCode::PeerLost);
    assert!(matches!(f[0], CheckFailure::BackupUnreachable(_)));

    let wrong = FakeBackup::with(|a| Err(ProbeError::WrongKey { addr: a.into() }));
    let (code, f) = refusal("guest", BACKUP, &k.good, &xen, &host, &wrong);
    assert_eq!(code, ExitCode::Failure);
    assert!(matches!(f[0], CheckFailure::WrongKey(_)));
}

#[test]
fn every_missing_thing_is_named_once_and_the_first_decides_the_code() {
    let k = keys();
    let host = FakeHost {
        root: false,
        ..Default::default()
    };
    let (code, f) = refusal(
        "guest",
        "",
        &k.open,
        &FakeXen::lab(),
        &host,
        &FakeBackup::ok(),
    );
    assert_eq!(code, ExitCode::Unsupported);
    let kinds: Vec<&str> = f.iter().map(CheckFailure::summary).collect();
    assert_eq!(
        kinds,
        ["must run as root", "key file", "no backup host for"]
    );
}

#[test]
fn no_xen_tools_or_no_hypervisor_stop_early() {
    let k = keys();
    let mut xen = FakeXen::lab();
    xen.xl_missing = true;
    let (code, f) = refusal_on(&xen, "guest", BACKUP, &k.good);
    assert_eq!(code, ExitCode::Unsupported);
    assert!(matches!(f[0], CheckFailure::NoXenTools { .. }));
    let mut xen = FakeXen::lab();
    xen.xen_down = true;
    let (_, f) = refusal_on(&xen, "guest", BACKUP, &k.good);
    assert!(matches!(f[0], CheckFailure::XenNotRunning { .. }));
}

#[test]
fn every_check_failure_is_in_the_operator_guide() {
    // The troubleshooting table is keyed on each failure's fixed first words.
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operator.md"))
            .unwrap();
    let all = [
        CheckFailure::NotRoot,
        CheckFailure::NoXenTools {
            tool: String::new(),
        },
        CheckFailure::XenNotRunning { why: String::new() },
        CheckFailure::XlOutput { why: String::new() },
        CheckFailure::UnknownDomain {
            domain: String::new(),
            running: String::new(),
        },
        CheckFailure::Dom0,
        CheckFailure::InTransit {
            domain: String::new(),
        },
        CheckFailure::NotRunning {
            domain: String::new(),
            state: String::new(),
            why: NotRunning::Paused,
        },
        CheckFailure::AlreadyProtected {
            domain: String::new(),
            by: String::new(),
        },
        CheckFailure::BufferLeftHolding {
            domain: String::new(),
            vif: String::new(),
        },
        CheckFailure::NoVif {
            domain: String::new(),
        },
        CheckFailure::EmulatedNic {
            domain: String::new(),
            devid: 0,
            vif: String::new(),
        },
        CheckFailure::VifMissing {
            domain: String::new(),
            vif: String::new(),
        },
        CheckFailure::UnreplicatedDisks {
            domain: String::new(),
            disks: String::new(),
        },
        CheckFailure::DiskReplicationMissing {
            domain: String::new(),
            disks: String::new(),
        },
        CheckFailure::NbdMissing,
        CheckFailure::NoSuspendPath {
            domain: String::new(),
        },
        CheckFailure::Key(String::new()),
        CheckFailure::NoBackup {
            domain: String::new(),
            origin: String::new(),
        },
        CheckFailure::BadBackup(String::new()),
        CheckFailure::BadListen(String::new()),
        CheckFailure::BackupUnreachable(ProbeError::Timeout {
            addr: String::new(),
            secs: 1,
        }),
        CheckFailure::WrongKey(ProbeError::WrongKey {
            addr: String::new(),
        }),
        CheckFailure::BackupRefused(ProbeError::Refused {
            addr: String::new(),
            reason: String::new(),
        }),
        CheckFailure::RunsHere {
            domain: String::new(),
            domid: 0,
        },
        CheckFailure::CopyLeft {
            domain: String::new(),
            domid: 0,
        },
    ];
    // Adding a variant without listing it above breaks this match, so the list stays whole.
    for f in &all {
        use CheckFailure::*;
        match f {
            NotRoot
            | NoXenTools { .. }
            | XenNotRunning { .. }
            | XlOutput { .. }
            | UnknownDomain { .. }
            | Dom0
            | InTransit { .. }
            | NotRunning { .. }
            | AlreadyProtected { .. }
            | BufferLeftHolding { .. }
            | NoVif { .. }
            | EmulatedNic { .. }
            | VifMissing { .. }
            | UnreplicatedDisks { .. }
            | DiskReplicationMissing { .. }
            | NbdMissing
            | NoSuspendPath { .. }
            | Key(_)
            | NoBackup { .. }
            | BadBackup(_)
            | BadListen(_)
            | BackupUnreachable(_)
            | WrongKey(_)
            | BackupRefused(_)
            | RunsHere { .. }
            | CopyLeft { .. } => {}
        }
    }
    assert_eq!(all.len(), 26);
    for f in &all {
        assert!(
            f.to_string().contains(f.summary()),
            "{:?}'s message does not contain its summary",
            f.summary()
        );
        assert!(
            doc.contains(f.summary()),
            "docs/operator.md has no row for \"{}\"",
            f.summary()
        );
    }
}
