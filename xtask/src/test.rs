//! `cargo xtask test`: every tier, in order: install deps, unit + BPF + netns tests
//! (cargo test over the workspace; root-only tests run because CI is root), then the lab.
use crate::util;
use anyhow::{Result, bail};
use clap::Args;

#[derive(Args)]
pub struct TestArgs {
    /// Skip the Xen lab tier (fast local iteration; CI never passes this).
    #[arg(long)]
    pub no_lab: bool,
}

pub fn run(a: TestArgs) -> Result<()> {
    if !util::is_root() {
        bail!("cargo xtask test needs root: the BPF, netns and lab tiers attach programs and create namespaces");
    }
    crate::deps::install()?;
    util::run(util::cmd("cargo").args(["build", "--workspace", "--bins"]))?;
    util::run(util::cmd("cargo").args(["test", "--workspace", "--", "--test-threads=1"]))?;
    if !a.no_lab {
        crate::lab::run(crate::lab::LabCmd::Test(Default::default()))?;
    }
    Ok(())
}
