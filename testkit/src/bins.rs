//! Finding the workspace's built binaries (and building them when a test runs alone).
//!
//! Owns: a `cargo build` of the named package's binaries when one is missing. Never
//! touches: anything outside the workspace's target directory.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{KitError, Result, io_err};

/// The workspace root (the testkit lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `$CARGO_TARGET_DIR`, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The profile directory of the running test executable (target/<profile>/deps/<test>
/// → target/<profile>).
pub fn profile_dir_of_this_test() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(io_err("finding the test executable"))?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| KitError::Missing(format!("no target/<profile> above {}", exe.display())))
}

/// `cargo build -p remus-user --bin NAME` (release if `release`), bpf-linker on PATH.
pub fn build(name: &str, release: bool) -> Result<()> {
    let path = format!(
        "/var/cache/remus/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root()).env("PATH", path).args([
        "build",
        "-p",
        "remus-user",
        "--bin",
        name,
    ]);
    if release {
        c.arg("--release");
    }
    let st = c
        .status()
        .map_err(io_err(format!("running cargo build for {name}")))?;
    if !st.success() {
        return Err(KitError::Command {
            what: format!("cargo build -p remus-user --bin {name}"),
            code: st.code().unwrap_or(-1),
            stderr: String::new(),
        });
    }
    Ok(())
}

/// The built binary `name` of remus-user for the running test: `$env_var` if set, else
/// next to the test's profile directory, built with cargo if it is not there yet.
pub fn for_this_test(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(p));
    }
    let dir = profile_dir_of_this_test()?;
    let bin = dir.join(name);
    if !bin.exists() {
        build(name, dir.ends_with("release"))?;
    }
    if !bin.exists() {
        return Err(KitError::Missing(format!(
            "{} does not exist (build it: cargo build -p remus-user --bins)",
            bin.display()
        )));
    }
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_binary_wins() {
        // SAFETY: single-threaded use of a variable no other test reads.
        unsafe { std::env::set_var("REMUS_TESTKIT_PROBE_BIN", "/bin/true") };
        let p = for_this_test("remus-probe", "REMUS_TESTKIT_PROBE_BIN").expect("from env");
        assert_eq!(p, Path::new("/bin/true"));
        assert!(workspace_root().join("Cargo.toml").exists());
    }
}
