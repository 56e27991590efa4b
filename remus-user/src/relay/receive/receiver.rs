//! The receiver process on the backup (`xl migrate-receive -r -e` by default): starting
//! it, its banner, the feeder task that writes whole checkpoints into its stdin and
//! acknowledges each once written, and killing it without ever ending its stream.
//!
//! Owns: the child process (in a process group of its own), its pipes, the feeder task.
//! Never touches: the connection (ACKs are handed to the writer's queue), what is cut
//! where (`cutter`).
//!
//! The receiver runs in its own process group so that its whole tree (`sh -c`, xl, the
//! restore helper libxl forks) can be frozen at once, then killed: none of them may see
//! its stream end first, since libxl activates the copy on that end. (Its own group also
//! keeps a terminal's Ctrl-C, meant for the relay, away from it.)
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;
use tracing::{debug, info_span};

use super::cutter::Step;
use crate::metrics::Metrics;
use crate::replication::{MAX_BANNER, Message};

/// Bytes of the receiver's stdin pipe (the usual maximum, /proc/sys/fs/pipe-max-size):
/// a small checkpoint then fits whole, and is acknowledged without waiting for the
/// receiver to be scheduled.
pub const RECEIVER_PIPE_BYTES: i32 = 1 << 20;

/// Why the receiver did not start.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error("cannot start the receiver `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("the receiver `{cmd}` has no pipes")]
    NoPipes { cmd: String },
    #[error("the receiver `{cmd}` did not start: no banner within {timeout:?}")]
    BannerTimeout { cmd: String, timeout: Duration },
    #[error("the receiver `{cmd}` did not start: reading its banner: {source}")]
    BannerRead { cmd: String, source: std::io::Error },
    #[error("the receiver `{cmd}` did not start: it printed {printed:?} instead of a banner line")]
    NotABanner { cmd: String, printed: String },
    #[error("writing to the receiver: {0}")]
    Write(std::io::Error),
    #[error("the receiver's feeder failed: {0}")]
    Feeder(tokio::task::JoinError),
    #[error("the receiver stopped taking data")]
    Gone,
}

/// A started receiver: the process, its stdin, and the banner it printed.
pub struct Started {
    pub child: Child,
    /// Its process group (its pid, taken at start: the pid is gone once it is reaped).
    pub pgid: u32,
    pub stdin: ChildStdin,
    pub banner: Vec<u8>,
}

/// Starts `cmd` with `sh -c`, grows its stdin pipe, and reads its banner line.
pub async fn start(cmd: &str, banner_timeout: Duration) -> Result<Started, ReceiverError> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| ReceiverError::Spawn {
            cmd: cmd.to_string(),
            source,
        })?;
    let pgid = child.id().unwrap_or(0);
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(ReceiverError::NoPipes {
            cmd: cmd.to_string(),
        });
    };
    grow_pipe(&stdin);
    match read_banner(stdout, cmd, banner_timeout).await {
        Ok(banner) => Ok(Started {
            child,
            pgid,
            stdin,
            banner,
        }),
        Err(e) => {
            drop(stdin);
            let _ = child.kill().await;
            Err(e)
        }
    }
}

/// Freezes the receiver's whole process group `pgid` (SIGSTOP), then kills it
/// (SIGKILL): a frozen process cannot react to another's death or to its stream's end,
/// and a killed one never activates the copy. Call it before its stdin is closed (also
/// when the receiver's first process has exited: what it started may live on in the
/// group, and the group's id stays taken while it does); then reap the child.
pub fn freeze_and_kill(pgid: u32) -> std::io::Result<()> {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    // 0 would be this relay's own group.
    if pgid == 0 {
        return Ok(());
    }
    let group = Pid::from_raw(pgid as i32);
    for sig in [Signal::SIGSTOP, Signal::SIGKILL] {
        match killpg(group, sig) {
            // Nothing left in the group (the receiver ended a moment ago).
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn grow_pipe(stdin: &ChildStdin) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a pipe fd we own, integer argument.
    let r = unsafe { libc::fcntl(stdin.as_raw_fd(), libc::F_SETPIPE_SZ, RECEIVER_PIPE_BYTES) };
    if r < 0 {
        debug!(error = %std::io::Error::last_os_error(), "could not grow the receiver's pipe; keeping its size");
    }
}

/// The banner: one line, before the receiver reads anything. Whatever the receiver
/// prints afterwards is logged, not for the primary (Remus reads no more).
async fn read_banner(
    stdout: ChildStdout,
    cmd: &str,
    timeout: Duration,
) -> Result<Vec<u8>, ReceiverError> {
    let mut out = BufReader::new(stdout);
    let mut banner = Vec::new();
    let got = tokio::time::timeout(
        timeout,
        (&mut out)
            .take(MAX_BANNER as u64)
            .read_until(b'\n', &mut banner),
    )
    .await;
    let cmd = cmd.to_string();
    match got {
        Ok(Ok(n)) if n > 0 && banner.ends_with(b"\n") => {}
        Err(_) => return Err(ReceiverError::BannerTimeout { cmd, timeout }),
        Ok(Err(source)) => return Err(ReceiverError::BannerRead { cmd, source }),
        Ok(Ok(_)) => {
            let printed = String::from_utf8_lossy(&banner).into_owned();
            return Err(ReceiverError::NotABanner { cmd, printed });
        }
    }
    tokio::spawn(async move {
        let mut lines = out.lines();
        while let Ok(Some(l)) = lines.next_line().await {
            debug!(line = %l, "receiver output");
        }
    });
    Ok(banner)
}

/// Writes steps to the receiver in order; acknowledges a checkpoint once its bytes are
/// written. Ends (closing the receiver's stdin) when the queue closes or a write fails.
pub fn spawn_feeder(
    mut stdin: ChildStdin,
    acks: mpsc::Sender<Message>,
    m: Arc<Metrics>,
) -> (
    mpsc::Sender<Step>,
    tokio::task::JoinHandle<Result<(), ReceiverError>>,
) {
    let (feed_tx, mut feed_rx) = mpsc::channel::<Step>(64);
    let h = tokio::spawn(async move {
        while let Some(step) = feed_rx.recv().await {
            match step {
                Step::Write(b) => {
                    stdin.write_all(&b).await.map_err(ReceiverError::Write)?;
                    m.stream_bytes_total.inc_by(b.len() as u64);
                }
                Step::Ack(n) => {
                    m.checkpoints_total.inc();
                    m.last_checkpoint.set(n);
                    m.last_acked_checkpoint.set(n);
                    m.acks_total.inc();
                    info_span!("checkpoint", n)
                        .in_scope(|| debug!("checkpoint written whole; acknowledging"));
                    // A primary that is gone cannot hear it; the receiver still gets the rest.
                    let _ = acks.send(Message::Ack { checkpoint: n }).await;
                }
            }
        }
        drop(stdin);
        Ok(())
    });
    (feed_tx, h)
}
