//! `cargo xtask`: the project's entry points (build, the test tiers, benchmarks, the lab).
//!
//! Owns: orchestration: installing what the build needs, running cargo, the Xen lab in
//! QEMU, benchmark drivers. Never touches: the product's code paths (it runs the built
//! binaries like an operator would).
use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod deps;
mod lab;
mod package;
mod test;
mod util;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "remus build, tests, benchmarks and the Xen lab"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and tests need (apt packages, nightly rust-src, bpf-linker).
    Deps,
    /// Install deps, then run every test tier: unit, BPF, netns, the Xen lab.
    Test(test::TestArgs),
    /// The main job: the lab demo of a protected VM failing over.
    Demo(lab::DemoArgs),
    /// The Xen lab: build, boot, exec, test.
    #[command(subcommand)]
    Lab(lab::LabCmd),
    /// Benchmarks: print a table and write JSON under target/bench/.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Build the Debian package (target/package/remus.deb); --check also installs it.
    Package(package::PackageArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Deps => deps::install(),
        Cmd::Test(a) => test::run(a),
        Cmd::Demo(a) => lab::demo(a),
        Cmd::Lab(c) => lab::run(c),
        Cmd::Bench(c) => bench::run(c),
        Cmd::Package(a) => package::run(a),
    }
}
