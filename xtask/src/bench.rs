//! `cargo xtask bench net|relay`: placeholder until the benchmarks land.
use anyhow::{Result, bail};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// The output buffer: throughput, frame rate, release latency, CPU.
    Net,
    /// The relay: throughput, compression, ACK latency.
    Relay,
}

pub fn run(_c: BenchCmd) -> Result<()> {
    bail!("benchmarks are not written yet")
}
