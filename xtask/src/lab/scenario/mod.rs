//! The lab's scenarios as data, and the runner that executes any of them the same way.
//!
//! A scenario (`Scenario`) is a name and a list of steps. A step (`Step`) says where it
//! runs (dom0, or the host machine watching the client's log), its bound, and what it
//! does, asserts and records (`Act`, in acts.rs). The runner here executes the steps in
//! order, records every step the same way (`report::StepRecord`), stops at the first step
//! that fails, always cleans dom0 up afterwards and keeps the run's logs under its name.
//! Several scenarios run in sequence on one boot (`run_all`); the scenarios themselves
//! are in catalog.rs.
//!
//! Owns: the scenario and step types, a run's context (its clock, the client's log, what
//! earlier steps learnt: the checkpoint source, the moment of death, the primary's domid)
//! and the live view. Never touches: the lab's boot (vm.rs) or the cache (build.rs); dom0
//! only through `dom0::exec` and the `lab.sh` subcommands.
use super::{build::tail_file, dom0, vm};
use anyhow::{Result, bail};
use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

pub mod acts;
pub mod catalog;
pub mod client;
pub mod progress;
pub mod report;

pub use acts::Act;
use report::{RunReport, StepRecord};

/// Guest memory (MiB): the smallest the Debian kernel builds a PV domain with here.
pub const GUEST_MEM_MB: u32 = 96;
/// The checkpoint interval every scenario asks `xl remus` for (`-i`).
pub const INTERVAL_MS: u32 = 200;

/// A named list of steps, run in order by `run`.
pub struct Scenario {
    pub name: &'static str,
    pub steps: Vec<Step>,
}

impl Scenario {
    /// Whether a step protects with the relay (the lab must then have built `remus`).
    pub fn needs_remus(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s.act, Act::Protect(acts::Protection::Relay { .. })))
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
    /// In dom0, through the request agent (`lab.sh` subcommands).
    Dom0,
    /// On the machine running the lab: it watches the client's log and the sampled
    /// status files in the share.
    Machine,
}

impl On {
    fn name(self) -> &'static str {
        match self {
            On::Dom0 => "dom0",
            On::Machine => "machine",
        }
    }
}

/// A run's context: shared by its steps, filled in as they go.
pub struct Run {
    pub name: &'static str,
    pub live: bool,
    pub t0: Instant,
    /// The client's JSON-lines log.
    pub log: PathBuf,
    /// Where checkpoint counts come from, and when protection started.
    pub source: Option<progress::Source>,
    pub protected_at: Option<Instant>,
    /// The moment of the primary's death, on the client's clock (Unix seconds).
    pub death: Option<f64>,
    /// The primary's domid, as destroyed.
    pub primary: String,
    /// A reply came after the death within the failover step's bound.
    pub failover_seen: bool,
    pub report: RunReport,
}

impl Run {
    fn new(name: &'static str, live: bool) -> Run {
        Run {
            name,
            live,
            t0: Instant::now(),
            log: vm::share().join(format!("run/client-{name}.jsonl")),
            source: None,
            protected_at: None,
            death: None,
            primary: String::new(),
            failover_seen: false,
            report: RunReport {
                mode: name.into(),
                ..Default::default()
            },
        }
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
            Some(src) => format!("{} | {c}", progress::describe(src)),
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
            if vm::qemu_pid().is_none() {
                bail!("QEMU died");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
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
        self.source.map_or(0, progress::checkpoints)
    }
}

/// Runs the scenarios in order on the running lab, one report each.
pub fn run_all(scenarios: &[Scenario], live: bool) -> Vec<RunReport> {
    scenarios.iter().map(|s| run(s, live)).collect()
}

/// Runs one scenario: its steps in order until one fails, then what every run ends with
/// (the client's view if a death happened, dom0 cleaned up, logs kept under the run's
/// name). A failure is recorded in the report with its step, never returned.
pub fn run(s: &Scenario, live: bool) -> RunReport {
    let mut run = Run::new(s.name, live);
    let mut failed = None;
    for step in &s.steps {
        run.say(step.name);
        let started = run.t0.elapsed();
        let res = acts::execute(step, &mut run);
        run.report.steps.push(StepRecord {
            name: step.name.into(),
            on: step.on.name(),
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
            eprintln!(
                "[lab {}] FAILED at step `{step}`: {e:#}\n{}",
                s.name,
                vm::consoles(25)
            );
            print_logs(s.name);
        }
    }
    r
}

/// What every run ends with, passed or not: if the primary died and no step recorded
/// what the client saw, record it now; then clean dom0 up and keep the logs.
fn finish(run: &mut Run) {
    if run.death.is_some() && run.report.verdict.is_empty() {
        if run.report.client_tcp.is_empty() {
            run.report.client_tcp = acts::client_tcp();
        }
        let seen = run.seen(run.death);
        run.report.verdict = report::verdict(&seen, &run.report);
        run.report.client = seen;
    }
    let _ = dom0::exec(
        "sh /share/lab/dom0/lab.sh cleanup",
        Duration::from_secs(120),
    );
    let dir = vm::share().join("run");
    for (from, to) in log_names(run.name) {
        let _ = fs::rename(dir.join(from), dir.join(to));
    }
}

/// The per-run logs dom0 writes under fixed names, and the names they are kept under.
fn log_names(name: &str) -> Vec<(String, String)> {
    [
        "sender.log",
        "receiver.log",
        "relay-send.json",
        "relay-receive.json",
    ]
    .iter()
    .map(|f| {
        let (stem, ext) = f.rsplit_once('.').unwrap_or((f, ""));
        (f.to_string(), format!("{stem}-{name}.{ext}"))
    })
    .collect()
}

fn print_logs(name: &str) {
    for f in ["sender", "receiver"] {
        let p = vm::share().join(format!("run/{f}-{name}.log"));
        if p.exists() {
            eprintln!(
                "===== {f} log ({}) =====\n{}",
                p.display(),
                tail_file(&p, 25)
            );
        }
    }
}
