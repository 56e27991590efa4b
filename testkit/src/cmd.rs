//! Running commands (on the host, or inside a network namespace through `nsenter`) and
//! keeping what they printed. Owns: nothing but the child processes of one call.
use std::process::{Command, Output, Stdio};

use crate::{KitError, Result, io_err};

/// Result of one finished command.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    fn from(o: Output) -> Out {
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// Itself if the command exited 0, else an error naming `what`.
    pub fn check(self, what: &str) -> Result<Out> {
        if self.success() {
            Ok(self)
        } else {
            Err(KitError::Command {
                what: what.to_string(),
                code: self.code,
                stderr: format!("{}\nstdout: {}", self.stderr.trim(), self.stdout.trim()),
            })
        }
    }
}

/// Runs `program args`, stdin closed, capturing its output.
pub fn run(program: &str, args: &[&str]) -> Result<Out> {
    let o = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("starting {program} {args:?}")))?;
    Ok(Out::from(o))
}

/// `nsenter` arguments that run `program args` in network namespace `ns`, staying in the
/// caller's mount namespace (unlike `ip netns exec`, which gives it a fresh /sys).
pub fn nsenter_args(ns: &str, program: &str, args: &[&str]) -> Vec<String> {
    let mut a = vec![format!("--net=/run/netns/{ns}"), program.to_string()];
    a.extend(args.iter().map(|s| s.to_string()));
    a
}

/// Runs `program args` inside network namespace `ns`.
pub fn run_in(ns: &str, program: &str, args: &[&str]) -> Result<Out> {
    let a = nsenter_args(ns, program, args);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    run("nsenter", &a)
}

/// Runs `program args`, which must succeed; its stdout.
pub fn must(program: &str, args: &[&str]) -> Result<String> {
    Ok(run(program, args)?
        .check(&format!("{program} {args:?}"))?
        .stdout)
}

/// `ip -n ns args…`, which must succeed.
pub fn ip(ns: &str, args: &[&str]) -> Result<String> {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    must("ip", &a)
}

/// Whether process `pid` is alive. A zombie counts as dead: it holds nothing any more.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Whether `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    run("sh", &["-c", &format!("command -v {tool}")])
        .map(|o| !o.stdout.trim().is_empty())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_command_names_the_step_and_keeps_its_stderr() {
        let o = run("sh", &["-c", "echo oops >&2; exit 3"]).expect("sh runs");
        match o.check("the step") {
            Err(KitError::Command { what, code, stderr }) => {
                assert_eq!((what.as_str(), code), ("the step", 3));
                assert!(stderr.starts_with("oops"));
            }
            other => panic!("expected a command error, got {other:?}"),
        }
    }

    #[test]
    fn nsenter_arguments_enter_only_the_network_namespace() {
        assert_eq!(
            nsenter_args("n1", "ip", &["link"]),
            vec!["--net=/run/netns/n1", "ip", "link"]
        );
    }

    #[test]
    fn a_reaped_child_and_a_zombie_are_not_alive() {
        assert!(process_alive(std::process::id()));
        let mut c = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = c.id();
        crate::wait_until(
            "the child to exit",
            std::time::Duration::from_secs(10),
            || !process_alive(pid),
        )
        .expect("a zombie counts as dead");
        c.wait().expect("reap");
        assert!(!process_alive(pid));
    }

    #[test]
    fn a_missing_program_is_an_io_error_not_a_panic() {
        assert!(matches!(
            run("/nonexistent/program", &[]),
            Err(KitError::Io { .. })
        ));
        assert!(!have("surely-not-a-tool-name-here"));
    }
}
