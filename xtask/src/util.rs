//! Small helpers shared by the xtask subcommands: paths, running commands loudly.
//! Never touches: the product or the lab; it only locates and runs things.
use anyhow::{Context, Result, bail};
use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// Where project-owned tools and caches live (bpf-linker, lab images).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("REMUS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/remus"))
}

/// PATH with the project's tool directory first (bpf-linker).
pub fn tool_path() -> String {
    format!(
        "{}:{}",
        cache_dir().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// A command with PATH set so the eBPF build finds bpf-linker, run from the root.
pub fn cmd(program: &str) -> Command {
    let mut c = Command::new(program);
    c.current_dir(root()).env("PATH", tool_path());
    c
}

/// Runs a command, inheriting stdio; fails naming the command when it fails.
pub fn run(c: &mut Command) -> Result<()> {
    eprintln!("+ {c:?}");
    let st = c
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("starting {c:?}"))?;
    if !st.success() {
        bail!("{c:?} failed with {st}");
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
