//! `cargo xtask bench relay`: placeholder until written by its owner.
use anyhow::{Result, bail};
use clap::Args;

#[derive(Args)]
pub struct RelayArgs {}

pub fn run(_a: RelayArgs) -> Result<()> {
    bail!("bench relay is not written yet")
}
