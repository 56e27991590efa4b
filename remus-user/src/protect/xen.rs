//! What `remus protect` learns from Xen: the domain list, libxl's JSON config of one
//! domain (`xl list -l`), and xenstore (vif names, the guest's suspend path).
//!
//! Owns: the `Xen` port (the only way the rest of `protect` reaches xl or xenstore), its
//! real implementation running the Xen tools with a time limit, and the pure parsers of
//! their output (tested on captures from the lab's dom0 under tests/fixtures/xen/).
//! Never touches: the domain itself (read-only queries; `xl remus` is started elsewhere).
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum XenError {
    #[error("`{tool}` is not installed (looked in PATH)")]
    Missing { tool: String },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("`{cmd}` did not answer within {secs} s")]
    Timeout { cmd: String, secs: u64 },
    #[error("`{cmd}` printed something unexpected: {what}")]
    Parse { cmd: String, what: String },
}

/// The port: every question `protect` asks Xen. Fakes in tests answer from captures.
pub trait Xen {
    /// `xl info`: succeeds only when the hypervisor and xenstored are running.
    fn info(&self) -> Result<String, XenError>;
    /// `xl list` (all domains): the table.
    fn list(&self) -> Result<String, XenError>;
    /// `xl list -l DOMAIN`: libxl's JSON of one domain.
    fn list_long(&self, domain: &str) -> Result<String, XenError>;
    /// `xenstore-ls -f PATH`: `path = "value"` lines; Ok(None) when PATH does not exist.
    fn xenstore_ls(&self, path: &str) -> Result<Option<String>, XenError>;
    /// `xl destroy DOMAIN` (only ever a backup's `DOMAIN--incoming` copy).
    fn destroy(&self, domain: &str) -> Result<(), XenError>;
}

/// One row of `xl list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListedDomain {
    pub name: String,
    pub domid: u32,
    /// xl's six state letters, e.g. `-b----` (r running, b blocked, p paused,
    /// s shutdown, c crashed, d dying).
    pub state: String,
}

/// Why a listed domain is not running, from xl's six state columns: r(unning),
/// b(locked), p(aused), s(hutdown), the shutdown reason (s uspend, c rash, r eboot, …),
/// d(ying).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotRunning {
    Paused,
    Suspended,
    Crashed,
    ShutDown,
    Dying,
}

impl NotRunning {
    pub fn words(self) -> &'static str {
        match self {
            NotRunning::Paused => "paused",
            NotRunning::Suspended => "suspended, e.g. by an xl save or migrate in progress",
            NotRunning::Crashed => "crashed",
            NotRunning::ShutDown => "shut down",
            NotRunning::Dying => "dying",
        }
    }

    /// What to do about it, for the message (may be empty).
    pub fn fix(self) -> &'static str {
        match self {
            NotRunning::Paused => " (xl unpause it first)",
            NotRunning::Suspended => " (wait for it to end)",
            _ => "",
        }
    }
}

impl ListedDomain {
    fn col(&self, i: usize) -> Option<char> {
        self.state.chars().nth(i).filter(|c| *c != '-')
    }

    pub fn not_running(&self) -> Option<NotRunning> {
        if self.col(5) == Some('d') {
            Some(NotRunning::Dying)
        } else if self.col(3) == Some('s') {
            Some(match self.col(4) {
                Some('s') => NotRunning::Suspended,
                Some('c') => NotRunning::Crashed,
                _ => NotRunning::ShutDown,
            })
        } else if self.col(2) == Some('p') {
            Some(NotRunning::Paused)
        } else {
            None
        }
    }
}

/// Parses the `xl list` table (header line, then `NAME ID MEM VCPUS STATE TIME`).
pub fn parse_list(out: &str) -> Result<Vec<ListedDomain>, String> {
    let mut v = Vec::new();
    let mut lines = out.lines().filter(|l| !l.trim().is_empty());
    match lines.next() {
        Some(h) if h.starts_with("Name") => {}
        other => return Err(format!("no `Name ID …` header (first line {other:?})")),
    }
    for l in lines {
        // The name is the only field that may hold odd characters, and it comes first:
        // take the five fixed fields from the right.
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 6 {
            return Err(format!("a row with {} fields: {l:?}", f.len()));
        }
        let n = f.len();
        let domid = f[n - 5]
            .parse()
            .map_err(|_| format!("domain id {:?} in {l:?}", f[n - 5]))?;
        v.push(ListedDomain {
            name: f[..n - 5].join(" "),
            domid,
            state: f[n - 2].to_string(),
        });
    }
    Ok(v)
}

/// The guest type libxl reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestType {
    Pv,
    Pvh,
    Hvm,
}

impl GuestType {
    pub fn as_str(self) -> &'static str {
        match self {
            GuestType::Pv => "PV",
            GuestType::Pvh => "PVH",
            GuestType::Hvm => "HVM",
        }
    }
}

/// One NIC of the domain's libxl config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Nic {
    pub devid: u32,
    pub mac: Option<String>,
    pub bridge: Option<String>,
    /// `vifname=` from the config, when the operator named it.
    pub ifname: Option<String>,
    /// `vif_ioemu` (HVM): the guest may use the emulated twin `<vif>-emu` instead.
    pub emulated: bool,
}

/// One disk of the domain's libxl config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Disk {
    pub vdev: String,
    pub target: Option<String>,
    pub backend: Option<String>,
    pub script: Option<String>,
    pub writable: bool,
    pub cdrom: bool,
}

/// What `xl list -l` says about one domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DomainConfig {
    pub domid: u32,
    pub name: String,
    pub guest_type: GuestType,
    pub nics: Vec<Nic>,
    pub disks: Vec<Disk>,
}

fn s(v: &Value, k: &str) -> Option<String> {
    v.get(k)
        .and_then(Value::as_str)
        .filter(|x| !x.is_empty())
        .map(str::to_string)
}

fn truthy(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_u64().is_some_and(|x| x != 0),
        Some(Value::String(s)) => matches!(s.as_str(), "True" | "true" | "1"),
        _ => false,
    }
}

/// Parses `xl list -l DOMAIN` (a JSON array with one `{domid, config}` object).
pub fn parse_list_long(out: &str) -> Result<DomainConfig, String> {
    let v: Value = serde_json::from_str(out).map_err(|e| format!("not JSON: {e}"))?;
    let obj = match &v {
        Value::Array(a) if a.len() == 1 => &a[0],
        Value::Array(a) => return Err(format!("{} domains where one was asked for", a.len())),
        Value::Object(_) => &v,
        _ => return Err("neither an array nor an object".into()),
    };
    let domid = obj
        .get("domid")
        .and_then(Value::as_u64)
        .and_then(|d| u32::try_from(d).ok())
        .ok_or("no numeric `domid`")?;
    let cfg = obj.get("config").ok_or("no `config`")?;
    let c_info = cfg.get("c_info").ok_or("no `config.c_info`")?;
    let name = s(c_info, "name").ok_or("no `config.c_info.name`")?;
    let guest_type = match c_info.get("type").and_then(Value::as_str) {
        Some("pv") => GuestType::Pv,
        Some("pvh") => GuestType::Pvh,
        Some("hvm") => GuestType::Hvm,
        other => return Err(format!("unknown guest type {other:?}")),
    };
    let list = |k: &str| match cfg.get(k) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => Ok(a.clone()),
        Some(_) => Err(format!("`config.{k}` is not a list")),
    };
    let mut nics = Vec::new();
    for (i, n) in list("nics")?.iter().enumerate() {
        let devid = match n.get("devid").and_then(Value::as_u64) {
            Some(d) => u32::try_from(d).map_err(|_| format!("nic {i}: devid {d}"))?,
            // libxl numbers NICs in order when the config gives no devid.
            None => i as u32,
        };
        nics.push(Nic {
            devid,
            mac: s(n, "mac"),
            bridge: s(n, "bridge"),
            ifname: s(n, "ifname"),
            emulated: n.get("nictype").and_then(Value::as_str) == Some("vif_ioemu")
                || (guest_type == GuestType::Hvm && n.get("nictype").is_none()),
        });
    }
    let mut disks = Vec::new();
    for (i, d) in list("disks")?.iter().enumerate() {
        disks.push(Disk {
            vdev: s(d, "vdev").ok_or(format!("disk {i} has no vdev"))?,
            target: s(d, "pdev_path").or_else(|| s(d, "target")),
            backend: s(d, "backend"),
            script: s(d, "script"),
            // libxl's default is writable; only an explicit 0 makes it read-only.
            writable: d.get("readwrite").is_none_or(|v| truthy(Some(v))),
            cdrom: truthy(d.get("is_cdrom")),
        });
    }
    Ok(DomainConfig {
        domid,
        name,
        guest_type,
        nics,
        disks,
    })
}

/// Parses `xenstore-ls -f` output into path → value (values unquoted, escapes kept).
pub fn parse_xenstore_ls(out: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for l in out.lines() {
        let Some((path, rest)) = l.split_once(" = ") else {
            continue;
        };
        let v = rest.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .unwrap_or(v);
        m.insert(path.trim().to_string(), v.to_string());
    }
    m
}

/// The dom0 interface of each NIC: xenstore's `vifname` when the toolstack recorded
/// one (a `vifname=` in the config), else libxl's default `vif<domid>.<devid>`.
pub fn vif_name(domid: u32, nic: &Nic, backend: &BTreeMap<String, String>) -> String {
    let key = format!("/local/domain/0/backend/vif/{domid}/{}/vifname", nic.devid);
    backend
        .get(&key)
        .cloned()
        .or_else(|| nic.ifname.clone())
        .unwrap_or_else(|| format!("vif{domid}.{}", nic.devid))
}

/// How the toolstack can suspend the guest for a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SuspendPath {
    /// The guest published `device/suspend/event-channel` (fast path).
    EventChannel,
    /// The guest's xenbus watches `control/shutdown` and advertises `feature-suspend`.
    ControlNode,
    /// Neither: a PV guest would time out on every suspend (libxl waits 60 s).
    None,
}

pub fn suspend_path(domid: u32, guest: &BTreeMap<String, String>) -> SuspendPath {
    let p = |k: &str| format!("/local/domain/{domid}/{k}");
    if guest
        .get(&p("device/suspend/event-channel"))
        .is_some_and(|v| !v.is_empty())
    {
        SuspendPath::EventChannel
    } else if guest
        .get(&p("control/feature-suspend"))
        .is_some_and(|v| v == "1")
    {
        SuspendPath::ControlNode
    } else {
        SuspendPath::None
    }
}

/// The real Xen tools, each call bounded in time (xl waits on xenstored's lock, which a
/// wedged toolstack can hold forever).
#[derive(Clone, Debug)]
pub struct XlTools {
    pub xl: String,
    pub xenstore_ls: String,
    pub timeout: Duration,
}

impl Default for XlTools {
    fn default() -> Self {
        XlTools {
            xl: "xl".into(),
            xenstore_ls: "xenstore-ls".into(),
            timeout: Duration::from_secs(20),
        }
    }
}

/// The full path of `tool` on PATH (or the path itself if it has a `/`).
pub fn which(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| {
                use std::os::unix::fs::PermissionsExt;
                p.metadata()
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    })
}

/// Runs `argv` with a time limit; returns (success, stdout, stderr).
pub fn run_bounded(argv: &[&str], timeout: Duration) -> Result<(bool, String, String), XenError> {
    let cmd = argv.join(" ");
    let Some(exe) = which(argv[0]) else {
        return Err(XenError::Missing {
            tool: argv[0].to_string(),
        });
    };
    let child = Command::new(exe)
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| XenError::Failed {
            cmd: cmd.clone(),
            status: "not started".into(),
            stderr: e.to_string(),
        })?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    // A thread owns the child and drains both pipes, so a large answer never blocks it.
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(o)) => Ok((
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).trim().to_string(),
        )),
        Ok(Err(e)) => Err(XenError::Failed {
            cmd,
            status: "wait failed".into(),
            stderr: e.to_string(),
        }),
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child, which the thread has not
            // reaped yet (it is still waiting for it).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            Err(XenError::Timeout {
                cmd,
                secs: timeout.as_secs(),
            })
        }
    }
}

impl XlTools {
    fn ok(&self, argv: &[&str]) -> Result<String, XenError> {
        let (ok, out, err) = run_bounded(argv, self.timeout)?;
        if ok {
            Ok(out)
        } else {
            Err(XenError::Failed {
                cmd: argv.join(" "),
                status: "non-zero exit".into(),
                stderr: err,
            })
        }
    }
}

impl Xen for XlTools {
    fn info(&self) -> Result<String, XenError> {
        self.ok(&[&self.xl, "info"])
    }
    fn list(&self) -> Result<String, XenError> {
        self.ok(&[&self.xl, "list"])
    }
    fn list_long(&self, domain: &str) -> Result<String, XenError> {
        self.ok(&[&self.xl, "list", "-l", domain])
    }
    fn xenstore_ls(&self, path: &str) -> Result<Option<String>, XenError> {
        let (ok, out, _) = run_bounded(&[&self.xenstore_ls, "-f", path], self.timeout)?;
        // xenstore-ls fails only for a path that does not exist (the daemon being down
        // was already ruled out by `xl info`).
        Ok(ok.then_some(out))
    }
    fn destroy(&self, domain: &str) -> Result<(), XenError> {
        self.ok(&[&self.xl, "destroy", domain]).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_rows_keep_names_and_states() {
        let t = "Name                                        ID   Mem VCPUs\tState\tTime(s)\n\
                 Domain-0                                     0  1024     2     r-----      20.1\n\
                 guest                                        3    96     1     -b----       1.5\n\
                 odd name                                     4    96     1     --p---       0.1\n";
        let l = parse_list(t).unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[1].name, "guest");
        assert_eq!(l[1].domid, 3);
        assert_eq!(l[1].not_running(), None);
        assert_eq!(l[2].name, "odd name");
        assert_eq!(l[2].not_running(), Some(NotRunning::Paused));
        assert!(parse_list("garbage\n").is_err());
    }

    #[test]
    fn state_columns() {
        let d = |s: &str| ListedDomain {
            name: "x".into(),
            domid: 1,
            state: s.into(),
        };
        // Seen in the lab while xl remus checkpointed the guest.
        assert_eq!(d("---ss-").not_running(), Some(NotRunning::Suspended));
        assert_eq!(d("---sc-").not_running(), Some(NotRunning::Crashed));
        assert_eq!(d("---sr-").not_running(), Some(NotRunning::ShutDown));
        assert_eq!(d("-----d").not_running(), Some(NotRunning::Dying));
        assert_eq!(d("r-----").not_running(), None);
        assert_eq!(d("-b----").not_running(), None);
    }

    #[test]
    fn xenstore_lines() {
        let m = parse_xenstore_ls(
            "/local/domain/0/backend/vif/3/0/vifname = \"web0\"\n/local/domain/0/backend/vif/3/0/mac = \"00:16:3e:00:00:01\"\nnot a line\n",
        );
        assert_eq!(m["/local/domain/0/backend/vif/3/0/vifname"], "web0");
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn vif_names_prefer_xenstore() {
        let nic = Nic {
            devid: 1,
            mac: None,
            bridge: None,
            ifname: None,
            emulated: false,
        };
        let mut m = BTreeMap::new();
        assert_eq!(vif_name(7, &nic, &m), "vif7.1");
        m.insert(
            "/local/domain/0/backend/vif/7/1/vifname".to_string(),
            "lan".to_string(),
        );
        assert_eq!(vif_name(7, &nic, &m), "lan");
    }

    #[test]
    fn bounded_commands_report_missing_tools_and_timeouts() {
        assert!(matches!(
            run_bounded(&["no-such-tool-remus"], Duration::from_secs(1)),
            Err(XenError::Missing { .. })
        ));
        assert!(matches!(
            run_bounded(&["sleep", "5"], Duration::from_millis(100)),
            Err(XenError::Timeout { .. })
        ));
        let (ok, out, _) = run_bounded(&["echo", "hi"], Duration::from_secs(5)).unwrap();
        assert!(ok);
        assert_eq!(out.trim(), "hi");
    }
}
