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
use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;
use tracing::{debug, error, info_span};

use super::cutter::Step;
use super::disks::BackupDisks;
use crate::metrics::Metrics;
use crate::relay::connection::write_all_vectored;
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

/// What the feeder hands back when its queue closed or a write failed: the receiver's
/// stdin, still open (the session closes it: after the disks failed over, or never),
/// the last checkpoint written whole, and the disks.
pub struct Fed {
    pub stdin: ChildStdin,
    /// The last checkpoint written whole to the receiver (and acknowledged): what the
    /// receiver fails over to when its stream closes now.
    pub last: u64,
    pub result: Result<(), ReceiverError>,
    pub disks: Option<BackupDisks>,
}

/// Writes steps to the receiver in order; acknowledges a checkpoint once its bytes are
/// written, with the time spent writing them (since the previous ACK). Write steps that
/// are queued together go out in one `writev` (a checkpoint is held as the frames it
/// arrived in). Ends when the queue closes or a write fails, handing the receiver's
/// stdin back ([`Fed`]).
///
/// With `disks`: at `Durable(N)` every disk must hold epoch N durably before anything
/// more is written; if one cannot, the feeder stalls: nothing more reaches the receiver
/// and nothing more is acknowledged (the primary keeps holding the guest's output), so
/// the receiver can only fail over to a checkpoint every disk has. After `Ack(N)` the
/// disks commit N; `Merged(N)` is passed on to them.
pub fn spawn_feeder(
    mut stdin: ChildStdin,
    acks: mpsc::Sender<Message>,
    m: Arc<Metrics>,
    mut disks: Option<BackupDisks>,
) -> (mpsc::Sender<Step>, tokio::task::JoinHandle<Fed>) {
    let (feed_tx, mut feed_rx) = mpsc::channel::<Step>(256);
    let h = tokio::spawn(async move {
        let mut writing = Duration::ZERO;
        let mut batch = VecDeque::new();
        let mut last = 0;
        let mut stalled = false;
        let mut next = feed_rx.recv().await;
        while let Some(step) = next.take() {
            let n = match step {
                Step::Durable(n) => {
                    if let (false, Some(d)) = (stalled, disks.as_mut())
                        && let Err(why) = d.durable(n).await
                    {
                        stalled = true;
                        error!(checkpoint = n, %why, "DISK NOT DURABLE: checkpoint {n} is not written to the receiver and not acknowledged; nothing more is (a failover goes to checkpoint {last}, where every disk is)");
                    }
                    None
                }
                Step::Merged(n) => {
                    if let Some(d) = disks.as_mut() {
                        d.merge(n).await;
                    }
                    None
                }
                Step::Write(b) if stalled => {
                    drop(b);
                    None
                }
                Step::Ack(_) if stalled => None,
                Step::Write(b) => {
                    batch.push_back(b);
                    // Whatever else is queued, up to an ACK, joins this write.
                    while let Ok(s) = feed_rx.try_recv() {
                        match s {
                            Step::Write(b) => batch.push_back(b),
                            ack => {
                                next = Some(ack);
                                break;
                            }
                        }
                    }
                    let t = std::time::Instant::now();
                    let bytes = match write_all_vectored(&mut stdin, &mut batch).await {
                        Ok(b) => b,
                        Err(e) => {
                            return Fed {
                                stdin,
                                last,
                                result: Err(ReceiverError::Write(e)),
                                disks,
                            };
                        }
                    };
                    writing += t.elapsed();
                    m.stream_bytes_total.inc_by(bytes);
                    None
                }
                Step::Ack(n) => Some(n),
            };
            if let Some(n) = n {
                acknowledge(n, std::mem::take(&mut writing), &acks, &m).await;
                last = n;
                if let Some(d) = disks.as_mut() {
                    d.commit(n).await;
                }
            }
            if next.is_none() {
                next = feed_rx.recv().await;
            }
        }
        Fed {
            stdin,
            last,
            result: Ok(()),
            disks,
        }
    });
    (feed_tx, h)
}

/// Checkpoint `n` is written whole (in `writing`): count it and send its ACK.
async fn acknowledge(n: u64, writing: Duration, acks: &mpsc::Sender<Message>, m: &Metrics) {
    m.checkpoints_total.inc();
    m.last_checkpoint.set(n);
    m.last_acked_checkpoint.set(n);
    m.acks_total.inc();
    m.checkpoint.backup_write.observe(writing);
    let write_us = writing.as_micros().min(u64::MAX as u128) as u64;
    info_span!("checkpoint", n)
        .in_scope(|| debug!(write_us, "checkpoint written whole; acknowledging"));
    // A primary that is gone cannot hear it; the receiver still gets the rest.
    let _ = acks
        .send(Message::Ack {
            checkpoint: n,
            write_us,
        })
        .await;
}
