//! Man pages and shell completions, generated from the binaries' own clap definitions.
//!
//! Owns: writing `man/*.1` (clap_mangen: one page per command and subcommand) and
//! `completions/{bash,zsh,fish}/…` (clap_complete) for one `clap::Command` into a
//! directory. Both binaries call it from a hidden `__generate DIR` subcommand, which is
//! how `cargo xtask package` gets pages that can never drift from the real flags (the
//! definitions live in the binaries, and xtask must not link aya). Never touches:
//! anything outside the directory it is given.
use std::path::Path;

use clap::Command;

/// Writes every page and completion of `cmd` under `out`; returns the files written
/// (relative to `out`, sorted).
pub fn generate(cmd: Command, out: &Path) -> std::io::Result<Vec<String>> {
    let name = cmd.get_name().to_string();
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    // One page per visible command: NAME.1, NAME-SUB.1, … (hidden ones are internal).
    clap_mangen::generate_to(cmd.clone(), &man)?;
    // Completions offer what people type: without the hidden (internal) subcommands,
    // which clap_complete would otherwise list.
    let mut cmd = visible(&cmd);
    for (shell, dir, file) in [
        (clap_complete::Shell::Bash, "bash", name.clone()),
        (clap_complete::Shell::Zsh, "zsh", format!("_{name}")),
        (clap_complete::Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let d = out.join("completions").join(dir);
        std::fs::create_dir_all(&d)?;
        let mut f = std::fs::File::create(d.join(&file))?;
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut f);
    }
    let mut written = Vec::new();
    for sub in [
        "man",
        "completions/bash",
        "completions/zsh",
        "completions/fish",
    ] {
        for e in std::fs::read_dir(out.join(sub))?.flatten() {
            written.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
        }
    }
    written.sort();
    Ok(written)
}

/// `cmd` rebuilt without hidden subcommands (names, flags and help are what completion
/// needs).
fn visible(cmd: &Command) -> Command {
    let mut c = Command::new(cmd.get_name().to_string());
    if let Some(a) = cmd.get_about() {
        c = c.about(a.clone());
    }
    c = c
        .args(cmd.get_arguments().filter(|a| !a.is_hide_set()).cloned())
        .groups(cmd.get_groups().cloned());
    c.subcommands(
        cmd.get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(visible),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_completions_for_every_visible_command() {
        let cmd = Command::new("tool")
            .about("a tool")
            .subcommand(
                Command::new("run")
                    .about("runs")
                    .arg(clap::arg!(--fast "go fast")),
            )
            .subcommand(Command::new("secret").hide(true));
        let d = tempfile::tempdir().unwrap();
        let w = generate(cmd, d.path()).unwrap();
        assert_eq!(
            w,
            [
                "completions/bash/tool",
                "completions/fish/tool.fish",
                "completions/zsh/_tool",
                "man/tool-run.1",
                "man/tool.1"
            ]
        );
        let run = std::fs::read_to_string(d.path().join("man/tool-run.1")).unwrap();
        assert!(run.contains("fast"), "{run}");
        let bash = std::fs::read_to_string(d.path().join("completions/bash/tool")).unwrap();
        assert!(bash.contains("run"), "{bash}");
        assert!(!bash.contains("secret"), "{bash}");
    }
}
