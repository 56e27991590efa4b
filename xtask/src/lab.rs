//! `cargo xtask lab …` and `cargo xtask demo`: placeholder until the lab lands.
use anyhow::{Result, bail};
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct DemoArgs {}

#[derive(Subcommand)]
pub enum LabCmd {
    /// Build the dom0 and guest images (cached).
    Build,
    /// Run the failover scenario.
    Test,
}

pub fn run(_c: LabCmd) -> Result<()> {
    bail!("the lab is not written yet")
}

pub fn demo(_a: DemoArgs) -> Result<()> {
    bail!("the lab is not written yet")
}
