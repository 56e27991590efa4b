//! `cargo xtask bench net`: placeholder until written by its owner.
use anyhow::{Result, bail};
use clap::Args;

#[derive(Args)]
pub struct NetArgs {}

pub fn run(_a: NetArgs) -> Result<()> {
    bail!("bench net is not written yet")
}
