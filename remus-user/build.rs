//! Builds the eBPF object (`remus-ebpf`) with the nightly toolchain for
//! bpfel-unknown-none and copies it to $OUT_DIR/remus-ebpf, where `datapath` embeds it.
//!
//! Why not `aya_build::build_ebpf`: it always sets CARGO_ENCODED_RUSTFLAGS for the inner
//! build, so `-Ctarget-cpu=v3` (fetch-atomics, alu32) could not reach the object, and it
//! cannot pass `--ignore-rust-version`. This does the same steps with those flags.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    for p in [
        "remus-ebpf/src",
        "remus-ebpf/Cargo.toml",
        "remus-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=REMUS_CACHE");
    let cache = env::var("REMUS_CACHE").unwrap_or_else(|_| "/var/cache/remus".into());
    let tool_bin = Path::new(&cache).join("bin");
    let path = format!(
        "{}:{}",
        tool_bin.display(),
        env::var("PATH").unwrap_or_default()
    );
    if !tool_bin.join("bpf-linker").exists() && which("bpf-linker", &path).is_none() {
        panic!(
            "bpf-linker not found (looked in {} and on PATH). Run `bash scripts/install-deps.sh` \
             or `cargo xtask deps` first: it builds bpf-linker against the nightly's libLLVM.",
            tool_bin.display()
        );
    }
    if let Some(l) = which("bpf-linker", &path) {
        println!("cargo:rerun-if-changed={}", l.display());
    }
    let target_dir = out.join("ebpf-target");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap();
    let flags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        "-Ctarget-cpu=v3".into(),
    ]
    .join("\x1f");
    let status = Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--package",
            "remus-ebpf",
            "--bins",
        ])
        .args([
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Zbuild-std=core",
        ])
        .arg("--ignore-rust-version")
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&root)
        .env("PATH", &path)
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .expect("running `rustup run nightly cargo build` for remus-ebpf");
    assert!(
        status.success(),
        "building the eBPF object failed (see above). It needs the nightly toolchain with \
         rust-src and bpf-linker: `bash scripts/install-deps.sh` installs both."
    );
    let obj = target_dir.join("bpfel-unknown-none/release/remus-ebpf");
    std::fs::copy(&obj, out.join("remus-ebpf"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", obj.display()));
}

fn which(name: &str, path: &str) -> Option<PathBuf> {
    path.split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
