//! Running commands in a host's dom0 through its request agent: nothing is ever typed
//! into a console.
//!
//! Owns: the machine's side of the agent protocol (see `lab/dom0/agent.sh`): it writes
//! `req/ID.sh`, then `req/ID.cmd` by rename, into the host's share; dom0 runs it and writes
//! `ID.out`, `ID.err`, and last `ID.rc` by rename. Never touches: QEMU (vm.rs boots and
//! stops it) or anything in the share but its own request files.
use super::{build::tail_file, topology::Host, vm};
use anyhow::{Context, Result, bail};
use std::{
    fs,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// What a command run in dom0 returned.
pub struct Output {
    pub rc: i32,
    pub stdout: String,
    pub stderr: String,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Runs a shell script in host `h`'s dom0 through the agent, bounded by `timeout` in dom0
/// (and a little more on the machine). rc 124 means dom0's `timeout` killed it.
pub fn exec(h: Host, script: &str, timeout: Duration) -> Result<Output> {
    let req = vm::share(h).join("req");
    fs::create_dir_all(&req)?;
    let id = format!(
        "h{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let p = |ext: &str| req.join(format!("{id}.{ext}"));
    fs::write(p("sh"), script).context("writing the request script")?;
    fs::write(
        p("tmp"),
        format!(
            "exec timeout -k 5 {} sh /share/req/{id}.sh\n",
            timeout.as_secs().max(1)
        ),
    )?;
    fs::rename(p("tmp"), p("cmd"))?;
    let deadline = Instant::now() + timeout + Duration::from_secs(30);
    let mut n = 0u32;
    while !p("rc").exists() {
        if Instant::now() > deadline {
            bail!(
                "host {}: dom0 did not answer request {id} within {} s (agent dead?): {script}",
                h.name(),
                timeout.as_secs() + 30
            );
        }
        n += 1;
        if n.is_multiple_of(20) && vm::qemu_pid(h).is_none() {
            bail!(
                "host {}: QEMU died while running `{script}` in dom0; serial console tail:\n{}",
                h.name(),
                tail_file(&vm::serial_log(h), 30)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let rc = fs::read_to_string(p("rc"))?.trim().parse().unwrap_or(-1);
    let o = Output {
        rc,
        stdout: fs::read_to_string(p("out")).unwrap_or_default(),
        stderr: fs::read_to_string(p("err")).unwrap_or_default(),
    };
    for ext in ["sh", "taken", "out", "err", "rc"] {
        let _ = fs::remove_file(p(ext));
    }
    Ok(o)
}

/// Like `exec`, but a non-zero status is an error naming `what`, with both outputs.
pub fn exec_ok(h: Host, what: &str, script: &str, timeout: Duration) -> Result<String> {
    let o = exec(h, script, timeout)?;
    if o.rc != 0 {
        let why = if o.rc == 124 {
            format!("timed out after {} s", timeout.as_secs())
        } else {
            format!("exit status {}", o.rc)
        };
        bail!(
            "{what}: `{}` in host {}'s dom0: {why}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            script.trim(),
            h.name(),
            o.stdout.trim_end(),
            o.stderr.trim_end()
        );
    }
    Ok(o.stdout)
}

/// Runs a `lab.sh` subcommand (`lab/dom0/lab.sh`) in host `h`'s dom0; a failure names
/// `what`.
pub fn lab(h: Host, what: &str, args: &str, timeout: Duration) -> Result<String> {
    exec_ok(
        h,
        what,
        &format!("sh /share/lab/dom0/lab.sh {args}"),
        timeout,
    )
}
