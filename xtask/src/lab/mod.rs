//! `cargo xtask lab …` and `cargo xtask demo`: the Xen lab (issue 3).
//!
//! Owns: the lab's command line, the order of things (build, boot, the scenarios in
//! sequence on one boot, `target/lab/report.json`) and the report file. The parts:
//! `build.rs` (the cache), `topology.rs` (the two hosts and two networks: names and
//! addresses), `lock.rs` (one lab per machine), `share.rs` (what each host boots with),
//! `vm.rs` (the hosts' QEMUs and their failure switches), `switch.rs` (the client LAN,
//! the replication link and its switch), `qmp.rs` (QEMU's control socket), `lan.rs` (the
//! client on the machine), `dom0.rs` (commands in a dom0), `scenario/` (the scenarios as
//! data and their runner), `capture.rs` (the stream fixture). The lab's files live in
//! `lab/` (host scripts, dom0 init and helpers, the guest's init, the counter service
//! crate). Never touches: the product's code; it runs the built `remus` and `remus-net`
//! binaries in dom0 like an operator would.
use anyhow::{Result, bail};
use clap::{Args, Subcommand, ValueEnum, builder::PossibleValuesParser};
use serde_json::json;
use std::{fs, time::Duration, time::Instant};

mod build;
mod capture;
mod dom0;
mod lan;
mod lock;
mod qmp;
mod scenario;
mod share;
mod switch;
mod topology;
mod vm;

/// The scenario names `lab test --only` accepts, in the order they run.
pub use scenario::catalog::NAMES as SCENARIOS;
use scenario::{Scenario, catalog, soak};
use topology::Host;

#[derive(Args, Default)]
pub struct DemoArgs {
    /// Leave the lab running afterwards (`cargo xtask lab down` stops it).
    #[arg(long)]
    pub keep: bool,
    /// Diagnostics: run the relay with `--no-buffer` (no output commit).
    #[arg(long)]
    pub relay_no_buffer: bool,
}

#[derive(Args, Default)]
pub struct TestArgs {
    /// Run only this scenario (repeatable; default: all, in order).
    #[arg(long, value_parser = PossibleValuesParser::new(catalog::NAMES))]
    pub only: Vec<String>,
    /// Leave the lab running afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Diagnostics: run the relay with `--no-buffer` (no output commit: the remus run's
    /// client may then see repeats; tests the relay's transport and failover alone).
    #[arg(long)]
    pub relay_no_buffer: bool,
    /// After the scenarios, this many random-kill soak rounds (as `lab soak`).
    #[arg(long, default_value_t = 0)]
    pub soak_rounds: u32,
    /// The soak's seed (default: from the clock; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
}

#[derive(Args)]
pub struct SoakArgs {
    /// Rounds: each protects the guest and powers host A off at a drawn phase.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// The seed the phases and moments are drawn from (default: from the clock; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Draw every round's phase from these only (repeatable; default: all five).
    #[arg(long, value_enum)]
    pub phase: Vec<soak::Phase>,
    /// Leave the lab running afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// A failure switch, thrown by hand (`lab fail`).
#[derive(Clone, Copy, ValueEnum)]
pub enum Switch {
    /// Kill the host's QEMU at once (a power loss).
    PowerOff,
    /// Stop the host's QEMU (SIGSTOP): a frozen host.
    Freeze,
    /// Let a frozen host run on (SIGCONT).
    Thaw,
    /// The replication link goes dark at the switch (no carrier change on the hosts).
    LinkDown,
    /// The replication link comes back.
    LinkUp,
}

#[derive(Subcommand)]
pub enum LabCmd {
    /// Build QEMU, the dom0 image and the guest (cached under $REMUS_CACHE/lab).
    Build,
    /// Boot the switch and both hosts (Xen + dom0 in QEMU) in the background (builds first
    /// if needed).
    Up,
    /// Stop both hosts and the switch.
    Down,
    /// Run a shell command in a host's dom0; prints its output, exits with its status.
    Exec {
        /// The host whose dom0 runs it.
        #[arg(long, value_enum, default_value = "a")]
        host: Host,
        /// Seconds before dom0 kills the command.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// The command (joined with spaces, run by sh in dom0).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Print the tails of the Xen/dom0 serial console and the guest consoles.
    Console {
        /// Only this host (default: both).
        #[arg(long, value_enum)]
        host: Option<Host>,
        #[arg(short = 'n', long, default_value_t = 40)]
        lines: usize,
    },
    /// Throw a failure switch in the running lab (power-off, freeze and thaw take --host).
    Fail {
        #[arg(value_enum)]
        switch: Switch,
        #[arg(long, value_enum, default_value = "a")]
        host: Host,
    },
    /// The scenarios (remus and the stock anchor with a power-off, the link cuts) on two
    /// hosts; report under target/lab/report.json.
    Test(TestArgs),
    /// The random-kill soak: rounds of protect + power-off of the primary at a random
    /// phase of replication; target/lab/soak.json.
    Soak(SoakArgs),
    /// Capture a real Remus stream of a few checkpoints as the stream parser's fixture
    /// (host A alone: it sends to itself).
    CaptureStream {
        /// Checkpoints after the initial copy.
        #[arg(long, default_value_t = 3)]
        checkpoints: u64,
    },
}

pub fn run(c: LabCmd) -> Result<()> {
    match c {
        LabCmd::Build => {
            let _lock = lock::take()?;
            build::build().map(|_| ())
        }
        LabCmd::Up => {
            if vm::up(&Host::ALL, false)?.is_empty() {
                eprintln!("[lab] already up; `cargo xtask lab down` to stop it");
            }
            Ok(())
        }
        LabCmd::Down => vm::down(),
        LabCmd::Exec { host, timeout, cmd } => {
            if vm::qemu_pid(host).is_none() {
                bail!("host {} is not running (cargo xtask lab up)", host.name());
            }
            let o = dom0::exec(host, &cmd.join(" "), Duration::from_secs(timeout))?;
            print!("{}", o.stdout);
            eprint!("{}", o.stderr);
            std::process::exit(o.rc);
        }
        LabCmd::Console { host, lines } => {
            for h in host.map_or(Host::ALL.to_vec(), |h| vec![h]) {
                print!("{}", vm::consoles(h, lines));
            }
            Ok(())
        }
        LabCmd::Fail { switch, host } => fail(switch, host),
        LabCmd::Test(a) => {
            let names: Vec<&str> = if a.only.is_empty() {
                catalog::NAMES.to_vec()
            } else {
                a.only.iter().map(String::as_str).collect()
            };
            let mut list = scenarios(&names, a.relay_no_buffer)?;
            let seed = soak_rounds(&mut list, a.soak_rounds, a.seed, &[]);
            test(&list, seed, false, a.keep)
        }
        LabCmd::Soak(a) => {
            let mut list = vec![];
            let seed = soak_rounds(&mut list, a.rounds, a.seed, &a.phase);
            test(&list, seed, false, a.keep)
        }
        LabCmd::CaptureStream { checkpoints } => {
            let booted = !vm::up(&[Host::A], false)?.is_empty();
            let r = capture::capture(checkpoints);
            if booted {
                vm::down()?;
            }
            r.map(|_| ())
        }
    }
}

/// `lab fail`: throws one failure switch and says when.
fn fail(s: Switch, h: Host) -> Result<()> {
    let (what, t) = match s {
        Switch::PowerOff => ("power-off", vm::power_off(h)?),
        Switch::Freeze => ("freeze", vm::freeze(h)?),
        Switch::Thaw => ("thaw", vm::thaw(h)?),
        Switch::LinkDown => return report_switch("link-down", switch::set_repl_link(false)?),
        Switch::LinkUp => return report_switch("link-up", switch::set_repl_link(true)?),
    };
    report_switch(&format!("{what} of host {}", h.name()), t)
}

fn report_switch(what: &str, t: f64) -> Result<()> {
    println!("{what} at {t:.3}");
    Ok(())
}

/// The named scenarios, in the catalog's order.
fn scenarios(names: &[&str], relay_no_buffer: bool) -> Result<Vec<Scenario>> {
    if let Some(n) = names.iter().find(|n| !SCENARIOS.contains(n)) {
        bail!(
            "no scenario named {n} (there are: {})",
            catalog::NAMES.join(", ")
        );
    }
    catalog::NAMES
        .iter()
        .filter(|n| names.contains(n))
        .map(|n| {
            catalog::by_name(n, relay_no_buffer)
                .ok_or_else(|| anyhow::anyhow!("no scenario named {n}"))
        })
        .collect()
}

/// Appends `rounds` soak rounds drawn from `seed` (or a fresh one, printed); the seed if
/// any round was added.
fn soak_rounds(
    list: &mut Vec<Scenario>,
    rounds: u32,
    seed: Option<u64>,
    phases: &[soak::Phase],
) -> Option<u64> {
    if rounds == 0 {
        return None;
    }
    let seed = seed.unwrap_or_else(soak::fresh_seed);
    let plan = soak::plan(rounds, seed, phases);
    eprintln!("[lab] soak: {rounds} round(s), seed {seed} (`--seed {seed}` replays them)");
    for (i, k) in plan.into_iter().enumerate() {
        eprintln!(
            "[lab] soak-{}: power-off in phase {} ({} ms)",
            i + 1,
            k.phase.arg(),
            k.delay_ms
        );
        list.push(catalog::soak_round(i + 1, k));
    }
    Some(seed)
}

/// Boots if needed, runs the scenarios in sequence on that one boot, writes the report
/// (and, with soak rounds, target/lab/soak.json), stops the lab if it booted it (unless
/// `keep`). Fails if any run failed; the anchor fails only if the lab broke.
fn test(scenarios: &[Scenario], seed: Option<u64>, live: bool, keep: bool) -> Result<()> {
    let t = Instant::now();
    let boots = vm::up(&Host::ALL, scenarios.iter().any(Scenario::needs_remus))?;
    let runs = scenario::run_all(scenarios, live);
    let report = json!({
        "boot_s": boots.iter().map(|b| b.s).reduce(f64::max),
        "boots": boots,
        "total_s": t.elapsed().as_secs_f64(),
        "lock_wait_s": lock::waited().as_secs_f64(),
        "guest_mem_mb": scenario::GUEST_MEM_MB,
        "interval_ms": scenario::INTERVAL_MS,
        "scenarios": runs.iter().map(|r| r.mode.clone()).collect::<Vec<_>>(),
        "runs": runs.iter().map(|r| (r.mode.clone(), serde_json::to_value(r).unwrap_or_default()))
            .collect::<serde_json::Map<_, _>>(),
    });
    let path = vm::run_dir().join("report.json");
    fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    if let Some(seed) = seed {
        let rounds: Vec<_> = runs.iter().filter(|r| r.soak.is_some()).collect();
        let soak = json!({
            "seed": seed,
            "rounds": rounds.iter().map(|r| json!({
                "round": r.mode,
                "passed": r.passed,
                "failed_step": r.failed_step,
                "error": r.error,
                "soak": r.soak,
                "acked_before_death": r.acked_before_death,
                "garp_after_failure_s": r.garp_after_failure_s,
                "client": r.client,
            })).collect::<Vec<_>>(),
            "passed": rounds.iter().filter(|r| r.passed).count(),
            "failed": rounds.iter().filter(|r| !r.passed).count(),
        });
        let sp = vm::run_dir().join("soak.json");
        fs::write(&sp, serde_json::to_string_pretty(&soak)?)?;
        println!("\nsoak, seed {seed}:\n{}", soak::table(&runs));
        println!("soak report: {}", sp.display());
    }
    if !boots.is_empty() && !keep {
        vm::down()?;
    }
    println!("\n{}", scenario::report::table(&runs));
    println!(
        "report: {}  (lab total {:.0} s, of which {:.0} s waiting for another lab)",
        path.display(),
        t.elapsed().as_secs_f64(),
        lock::waited().as_secs_f64()
    );
    let failed: Vec<String> = runs
        .iter()
        .filter(|r| !r.passed)
        .map(|r| {
            format!(
                "{}: step `{}`: {}",
                r.mode,
                r.failed_step.clone().unwrap_or_default(),
                r.error.clone().unwrap_or_default()
            )
        })
        .collect();
    if !failed.is_empty() {
        bail!("lab test failed:\n{}", failed.join("\n"));
    }
    Ok(())
}

/// The main job: build, boot both hosts, protect the guest with the relay, live view,
/// power-off of the primary host, failover, summary.
pub fn demo(a: DemoArgs) -> Result<()> {
    // The README's main-job command installs what it needs itself (idempotent): the
    // project's binaries need bpf-linker and the nightly rust-src to build.
    crate::deps::install()?;
    test(
        &scenarios(&["remus"], a.relay_no_buffer)?,
        None,
        true,
        a.keep,
    )
}
