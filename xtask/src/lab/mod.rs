//! `cargo xtask lab …` and `cargo xtask demo`: the Xen lab (issue 3).
//!
//! Owns: the lab's command line, the order of things (build, boot, the scenarios in
//! sequence on one boot, `target/lab/report.json`) and the report file. The parts:
//! `build.rs` (the cache), `vm.rs` (QEMU and the share), `dom0.rs` (commands in dom0),
//! `scenario/` (the scenarios as data and their runner), `capture.rs` (the stream fixture).
//! The lab's files live in `lab/` (host scripts, dom0 init and helpers, the guest's init,
//! the counter service crate). Never touches: the product's code; it runs the built
//! `remus` and `remus-net` binaries in dom0 like an operator would.
use anyhow::{Result, bail};
use clap::{Args, Subcommand, builder::PossibleValuesParser};
use serde_json::json;
use std::{fs, time::Duration, time::Instant};

mod build;
mod capture;
mod dom0;
mod scenario;
mod vm;

use scenario::{Scenario, catalog};

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
}

#[derive(Subcommand)]
pub enum LabCmd {
    /// Build QEMU, the dom0 image and the guest (cached under $REMUS_CACHE/lab).
    Build,
    /// Boot Xen + dom0 in QEMU in the background (builds first if needed).
    Up,
    /// Stop the lab's QEMU.
    Down,
    /// Run a shell command in dom0; prints its output, exits with its status.
    Exec {
        /// Seconds before dom0 kills the command.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// The command (joined with spaces, run by sh in dom0).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Print the tails of the Xen/dom0 serial console and the guest consoles.
    Console {
        #[arg(short = 'n', long, default_value_t = 40)]
        lines: usize,
    },
    /// The failover scenario: anchor (stock xl remus) and remus (the relay); report under
    /// target/lab/report.json.
    Test(TestArgs),
    /// Capture a real Remus stream of a few checkpoints as the stream parser's fixture.
    CaptureStream {
        /// Checkpoints after the initial copy.
        #[arg(long, default_value_t = 3)]
        checkpoints: u64,
    },
}

pub fn run(c: LabCmd) -> Result<()> {
    match c {
        LabCmd::Build => {
            let _lock = vm::take_lock()?;
            build::build().map(|_| ())
        }
        LabCmd::Up => vm::up(false).map(|_| ()),
        LabCmd::Down => vm::down(),
        LabCmd::Exec { timeout, cmd } => {
            if vm::qemu_pid().is_none() {
                bail!("the lab is not running (cargo xtask lab up)");
            }
            let o = dom0::exec(&cmd.join(" "), Duration::from_secs(timeout))?;
            print!("{}", o.stdout);
            eprint!("{}", o.stderr);
            std::process::exit(o.rc);
        }
        LabCmd::Console { lines } => {
            print!("{}", vm::consoles(lines));
            Ok(())
        }
        LabCmd::Test(a) => {
            let names: Vec<&str> = if a.only.is_empty() {
                catalog::NAMES.to_vec()
            } else {
                a.only.iter().map(String::as_str).collect()
            };
            test(&scenarios(&names, a.relay_no_buffer)?, false, a.keep)
        }
        LabCmd::CaptureStream { checkpoints } => {
            let booted = vm::up(false)?.is_some();
            let r = capture::capture(checkpoints);
            if booted {
                vm::down()?;
            }
            r.map(|_| ())
        }
    }
}

/// The named scenarios, in the catalog's order.
fn scenarios(names: &[&str], relay_no_buffer: bool) -> Result<Vec<Scenario>> {
    catalog::NAMES
        .iter()
        .filter(|n| names.contains(n))
        .map(|n| {
            catalog::by_name(n, relay_no_buffer)
                .ok_or_else(|| anyhow::anyhow!("no scenario named {n}"))
        })
        .collect()
}

/// Boots if needed, runs the scenarios in sequence on that one boot, writes the report,
/// stops the lab if it booted it (unless `keep`). Fails if any run failed; the anchor
/// fails only if the lab broke.
fn test(scenarios: &[Scenario], live: bool, keep: bool) -> Result<()> {
    let t = Instant::now();
    let boot = vm::up(scenarios.iter().any(Scenario::needs_remus))?;
    let runs = scenario::run_all(scenarios, live);
    let report = json!({
        "boot_s": boot.map(|d| d.as_secs_f64()),
        "total_s": t.elapsed().as_secs_f64(),
        "guest_mem_mb": scenario::GUEST_MEM_MB,
        "interval_ms": scenario::INTERVAL_MS,
        "scenarios": runs.iter().map(|r| r.mode.clone()).collect::<Vec<_>>(),
        "runs": runs.iter().map(|r| (r.mode.clone(), serde_json::to_value(r).unwrap_or_default()))
            .collect::<serde_json::Map<_, _>>(),
    });
    let path = vm::run_dir().join("report.json");
    fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    if boot.is_some() && !keep {
        vm::down()?;
    }
    println!("\n{}", scenario::report::table(&runs));
    println!(
        "report: {}  (lab total {:.0} s)",
        path.display(),
        t.elapsed().as_secs_f64()
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

/// The main job: build, boot, protect the guest with the relay, live view, silent death of
/// the primary, failover, summary.
pub fn demo(a: DemoArgs) -> Result<()> {
    // The README's main-job command installs what it needs itself (idempotent): the
    // project's binaries need bpf-linker and the nightly rust-src to build.
    crate::deps::install()?;
    test(&scenarios(&["remus"], a.relay_no_buffer)?, true, a.keep)
}
