//! `cargo xtask bench net|relay|disk`: benchmarks that print a table and write JSON under
//! target/bench/. Ratios are measured side by side in one run (shared, noisy machines).
//! Owns the subcommand dispatch only; never asserts timings (benchmarks report, tests check).
use anyhow::Result;
use clap::Subcommand;

mod disk;
mod net;
mod relay;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// The output buffer: throughput, frame rate, release latency, CPU.
    Net(net::NetArgs),
    /// The relay: throughput, compression, ACK latency.
    Relay(relay::RelayArgs),
    /// Disk replication: write throughput and latency, commit/apply, initial sync.
    Disk(disk::DiskArgs),
}

pub fn run(c: BenchCmd) -> Result<()> {
    match c {
        BenchCmd::Net(a) => net::run(a),
        BenchCmd::Relay(a) => relay::run(a),
        BenchCmd::Disk(a) => disk::run(a),
    }
}
