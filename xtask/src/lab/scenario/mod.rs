//! The lab's scenarios as data, and the runner that executes any of them the same way.
//!
//! A scenario (`Scenario`) is a name, its primary and backup host, and a list of steps. A
//! step (`Step`) says where it runs (the primary's or the backup's dom0, or the machine:
//! the client, the failure switches, the logs), its bound, and what it does, asserts and
//! records (`Act`, in acts.rs). The runner here executes the steps in order, records
//! every step the same way (`report::StepRecord`), stops at the first step that fails,
//! always stops the client and cleans the dom0s up afterwards, and keeps the run's logs
//! under its name. Several scenarios run in sequence on one boot (`run_all`): a host an
//! earlier run powered off boots again in the next run's `HostsUp` step. The scenarios
//! themselves are in catalog.rs.
//!
//! Owns: the scenario and step types, a run's context (its clock, the client, what
//! earlier steps learnt: the checkpoint source, the moment of failure, the hosts it took
//! down) and the live view. Never touches: the cache (build.rs); QEMU and the switch only
//! through acts.rs; dom0 only through `dom0::exec` and the `lab.sh` subcommands.
use super::{build::tail_file, dom0, lan, switch, topology::Host, vm};
use anyhow::{Result, bail};
use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

pub mod acts;
pub mod catalog;
pub mod client;
pub mod disk;
pub mod frames;
pub mod guests;
pub mod progress;
pub mod report;
pub mod soak;
pub mod timeline;

pub use acts::Act;
use report::{RunReport, StepRecord};

/// Guest memory (MiB): the smallest the Debian kernel builds a PV domain with here.
pub const GUEST_MEM_MB: u32 = 96;
/// The checkpoint interval every scenario asks `xl remus` for (`-i`).
pub const INTERVAL_MS: u32 = 200;

/// A named list of steps on a primary and a backup host, run in order by `run`.
pub struct Scenario {
    pub name: &'static str,
    pub primary: Host,
    pub backup: Host,
    pub steps: Vec<Step>,
    /// A soak round: where it kills the primary (its report then carries a soak record).
    pub kill: Option<soak::Kill>,
}

impl Scenario {
    /// Whether a step protects with the relay (the lab must then have built `remus`).
    pub fn needs_remus(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s.act, Act::Protect(p) if p.relay()))
    }
}

/// One step: where it runs, its bound, what it does, asserts and records.
pub struct Step {
    pub name: &'static str,
    pub on: On,
    pub bound: Duration,
    pub act: Act,
}

impl Step {
    pub fn new(name: &'static str, on: On, bound_s: u64, act: Act) -> Step {
        Step {
            name,
            on,
            bound: Duration::from_secs(bound_s),
            act,
        }
    }
}

/// Where a step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum On {
    /// In the primary host's dom0, through its request agent (`lab.sh` subcommands).
    Primary,
    /// In the backup host's dom0.
    Backup,
    /// On the machine running the lab: the client, the failure switches, the logs and
    /// the sampled status files in the shares.
    Machine,
}

/// A run's context: shared by its steps, filled in as they go.
pub struct Run {
    pub name: &'static str,
    pub live: bool,
    pub t0: Instant,
    pub primary: Host,
    pub backup: Host,
    /// Whether the scenario protects with the relay (a host booted again needs `remus`).
    pub needs_remus: bool,
    /// Hosts this run powered off or froze: their QEMU may be gone or stopped.
    pub down: Vec<Host>,
    /// The client on the client LAN, and its JSON-lines log.
    pub client: Option<lan::Client>,
    pub log: PathBuf,
    /// The second client, behind the guest's second vif (two-vif guests), and its log.
    pub client2: Option<lan::Client>,
    pub log2: PathBuf,
    /// The ARP watcher on the client's tap, and its log.
    pub arp: Option<lan::ArpWatch>,
    pub arp_log: PathBuf,
    /// Where checkpoint counts come from, and when protection started.
    pub source: Option<progress::Source>,
    pub protected_at: Option<Instant>,
    /// The moment of the failure (a power-off: the primary's death), on the client's
    /// clock (Unix seconds).
    pub death: Option<f64>,
    pub report: RunReport,
}

impl Run {
    fn new(s: &Scenario, live: bool) -> Run {
        let name = s.name;
        Run {
            name,
            live,
            t0: Instant::now(),
            primary: s.primary,
            backup: s.backup,
            needs_remus: s.needs_remus(),
            down: vec![],
            client: None,
            log: lan::dir().join(format!("client-{name}.jsonl")),
            client2: None,
            log2: lan::dir().join(format!("client-{}.jsonl", guests::second_name(name))),
            arp: None,
            arp_log: lan::dir().join(format!("arp-{name}.jsonl")),
            source: None,
            protected_at: None,
            death: None,
            report: RunReport {
                mode: name.into(),
                hosts: vec![s.primary, s.backup],
                soak: s.kill.map(soak::SoakRecord::new),
                ..Default::default()
            },
        }
    }

    /// Where a step runs, as the report names it.
    fn place(&self, on: On) -> &'static str {
        match on {
            On::Primary => self.primary.name(),
            On::Backup => self.backup.name(),
            On::Machine => "machine",
        }
    }

    /// Stops the client(s) and the ARP watcher, if running.
    pub fn stop_client(&mut self) {
        if let Some(mut c) = self.client.take() {
            c.stop();
        }
        if let Some(mut c) = self.client2.take() {
            c.stop();
        }
        self.arp = None;
    }

    pub fn say(&self, msg: &str) {
        eprintln!(
            "[lab {} +{:6.1}s] {msg}",
            self.name,
            self.t0.elapsed().as_secs_f64()
        );
    }

    /// One status line: replication's progress and the client's last reply.
    fn status(&self) -> String {
        let ev = client::events(&self.log);
        let c = match ev.iter().rev().find(|e| e.event == client::Kind::Reply) {
            Some(e) => format!(
                "client: request #{} -> counter {} (rtt {:.0} ms)",
                e.seq.unwrap_or_default(),
                e.value.unwrap_or_default(),
                e.rtt_ms.unwrap_or_default()
            ),
            None => "client: no reply yet".into(),
        };
        match self.source {
            Some(src) => format!(
                "{} | {c}",
                progress::describe(src, self.primary, self.backup)
            ),
            None => c,
        }
    }

    /// Polls `cond` until true or `bound`; prints the live view (every second when live,
    /// every 10 s otherwise). Ok(false) when the bound passed.
    pub fn wait(
        &self,
        what: &str,
        bound: Duration,
        mut cond: impl FnMut() -> Result<bool>,
    ) -> Result<bool> {
        let t = Instant::now();
        let mut last_print = Instant::now();
        let every = Duration::from_secs(if self.live { 1 } else { 10 });
        loop {
            if cond()? {
                return Ok(true);
            }
            if t.elapsed() > bound {
                return Ok(false);
            }
            if last_print.elapsed() >= every {
                self.say(&format!("{what}… {}", self.status()));
                last_print = Instant::now();
            }
            self.check_alive()?;
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Fails if a QEMU of the lab died that this run did not take down.
    fn check_alive(&self) -> Result<()> {
        for h in [self.primary, self.backup] {
            if !self.down.contains(&h) && vm::qemu_pid(h).is_none() {
                bail!(
                    "host {}'s QEMU died; serial console tail:\n{}",
                    h.name(),
                    tail_file(&vm::serial_log(h), 30)
                );
            }
        }
        if switch::pid().is_none() {
            bail!("the switch's QEMU died");
        }
        Ok(())
    }

    /// What the client saw so far, relative to `death`.
    pub fn seen(&self, death: Option<f64>) -> client::Seen {
        client::analyse(&client::events(&self.log), death)
    }

    pub fn replies(&self) -> usize {
        self.seen(None).replies
    }

    pub fn client_ended(&self) -> Option<String> {
        self.seen(None).terminal_event
    }

    /// Checkpoints so far (0 before protection started).
    pub fn checkpoints(&self) -> u64 {
        self.source
            .map_or(0, |src| progress::checkpoints(src, self.primary))
    }
}

/// Runs the scenarios in order on the running lab, one report each.
pub fn run_all(scenarios: &[Scenario], live: bool) -> Vec<RunReport> {
    scenarios.iter().map(|s| run(s, live)).collect()
}

/// Runs one scenario: its steps in order until one fails, then what every run ends with
/// (the client stopped and its view recorded, the dom0s cleaned up, logs kept under the
/// run's name). A failure is recorded in the report with its step, never returned.
pub fn run(s: &Scenario, live: bool) -> RunReport {
    let mut run = Run::new(s, live);
    let mut failed = None;
    for step in &s.steps {
        run.say(step.name);
        let started = run.t0.elapsed();
        let res = acts::execute(step, &mut run);
        run.report.steps.push(StepRecord {
            name: step.name.into(),
            on: run.place(step.on),
            bound_s: step.bound.as_secs_f64(),
            started_s: started.as_secs_f64(),
            took_s: (run.t0.elapsed() - started).as_secs_f64(),
            ok: res.is_ok(),
        });
        if let Err(e) = res {
            failed = Some((step.name, e));
            break;
        }
    }
    finish(&mut run);
    let mut r = run.report;
    match failed {
        None => r.passed = true,
        Some((step, e)) => {
            r.failed_step = Some(step.into());
            r.error = Some(format!("{e:#}"));
            eprintln!("[lab {}] FAILED at step `{step}`: {e:#}", s.name);
            for h in [s.primary, s.backup] {
                eprintln!("{}", vm::consoles(h, 25));
            }
            print_logs(s);
        }
    }
    r
}

/// What every run ends with, passed or not: the client stopped and, if a failure was
/// injected and no step recorded what the client saw, that recorded now; the dom0s that
/// run cleaned up; the logs kept under the run's name.
fn finish(run: &mut Run) {
    if run.client.is_some()
        || run.client2.is_some()
        || (run.death.is_some() && run.report.verdict.is_empty())
    {
        acts::client_stop(run);
    }
    for h in [run.primary, run.backup] {
        if vm::qemu_pid(h).is_some() {
            let _ = vm::thaw(h);
            let _ = dom0::exec(
                h,
                "sh /share/lab/dom0/lab.sh cleanup",
                Duration::from_secs(120),
            );
        }
    }
    let _ = switch::set_repl_link(true);
    for h in [run.primary, run.backup] {
        let dir = vm::share(h).join("run");
        for (from, to) in log_names(run.name) {
            if dir.join(&from).exists() {
                let _ = fs::rename(dir.join(&from), dir.join(to));
            }
        }
    }
}

/// The per-run logs dom0 writes under fixed names, and the names they are kept under.
fn log_names(name: &str) -> Vec<(String, String)> {
    [
        "sender.log",
        "receiver.log",
        "relay-send.json",
        "relay-receive.json",
        "disk-serve.log",
        "disk-receive.log",
    ]
    .iter()
    .map(|f| {
        let (stem, ext) = f.rsplit_once('.').unwrap_or((f, ""));
        (f.to_string(), format!("{stem}-{name}.{ext}"))
    })
    .collect()
}

fn print_logs(s: &Scenario) {
    for (h, f) in [(s.primary, "sender"), (s.backup, "receiver")] {
        let p = vm::share(h).join(format!("run/{f}-{}.log", s.name));
        if p.exists() {
            eprintln!(
                "===== host {}: {f} log ({}) =====\n{}",
                h.name(),
                p.display(),
                tail_file(&p, 25)
            );
        }
    }
}
