//! `remus relay receive`: the backup end. Long-running; one primary at a time.
//!
//! Owns: the listening socket, refusing unauthenticated or surplus primaries, the
//! receiver process (`xl migrate-receive -r -e` by default) and what is written to it,
//! the cut at checkpoint boundaries, ACKs, failover on silence. Never touches: the wire
//! format (`replication`), the stream grammar (`stream`), Xen itself (the receiver
//! command does that).
//!
//! The cut: checkpoint 1 (the initial copy) is written straight through, since libxc
//! cannot use a partial one anyway; for N >= 2 each checkpoint is kept in memory and
//! written only once its CHECKPOINT_END has arrived, then acknowledged. So whenever the
//! receiver's stdin is closed, it has received exactly whole checkpoints, and libxl
//! fails over from the last one.
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::{Heartbeat, Shared, judge_silence, silence_check};
use crate::compress::PageDecoder;
use crate::exit::{ExitCode, HasExitCode};
use crate::replication::{self, FrameReader, Key, MAX_BANNER, Message, ServerConfig, Session};
use crate::stream::{Event, Parser, StreamError};

pub const DEFAULT_RECEIVER_CMD: &str = "xl migrate-receive -r -e";

#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    pub listen: String,
    pub key: Key,
    /// Run with `sh -c`.
    pub receiver_cmd: String,
    pub heartbeat: Heartbeat,
    pub handshake_timeout: Duration,
    pub banner_timeout: Duration,
    /// Serve one primary, then exit (tests and benchmarks).
    pub once: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

impl HasExitCode for ReceiveError {
    fn exit_code(&self) -> ExitCode {
        ExitCode::Failure
    }
}

/// One step for the receiver.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Write these bytes to the receiver's stdin.
    Write(Vec<u8>),
    /// Checkpoint N is wholly written once the preceding writes are: acknowledge it.
    Ack(u64),
}

/// Decides what reaches the receiver and when (see the module docs). Pure.
#[derive(Debug, Default)]
pub struct Cutter {
    parser: Parser,
    events: Vec<Event>,
    /// Stream offset up to which bytes were handed out for writing.
    written: u64,
    /// Bytes from `written` on, not handed out yet.
    pending: Vec<u8>,
    complete: u64,
    finished: bool,
}

impl Cutter {
    pub fn new() -> Self {
        Cutter::default()
    }

    /// Last checkpoint handed out whole.
    pub fn complete(&self) -> u64 {
        self.complete
    }

    /// The stream ended with libxl END (a plain migration) and all of it was handed out.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Bytes held back (an incomplete checkpoint >= 2).
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    fn take(&mut self, to: u64, steps: &mut Vec<Step>) {
        let n = (to - self.written) as usize;
        if n == 0 {
            return;
        }
        let rest = self.pending.split_off(n);
        steps.push(Step::Write(std::mem::replace(&mut self.pending, rest)));
        self.written = to;
    }

    /// The next reconstructed stream bytes; returns what to do, in order.
    pub fn push(&mut self, data: &[u8], steps: &mut Vec<Step>) -> Result<(), StreamError> {
        self.events.clear();
        self.parser.feed(data, &mut self.events)?;
        self.pending.extend_from_slice(data);
        let events = std::mem::take(&mut self.events);
        for ev in &events {
            match *ev {
                Event::CheckpointComplete { checkpoint, end } => {
                    self.take(end, steps);
                    self.complete = checkpoint;
                    steps.push(Step::Ack(checkpoint));
                }
                Event::End { end } => {
                    self.take(end, steps);
                    self.finished = true;
                }
                _ => {}
            }
        }
        self.events = events;
        // Checkpoint 1 (and a plain migration) goes straight through.
        if self.complete == 0 || self.finished {
            let to = self.written + self.pending.len() as u64;
            self.take(to, steps);
        }
        Ok(())
    }
}

/// Listens and serves primaries, one at a time, until the process is stopped (or after
/// one session with `once`).
pub async fn run(opts: ReceiveOptions, shared: Arc<Shared>) -> Result<(), ReceiveError> {
    let l = TcpListener::bind(&opts.listen)
        .await
        .map_err(|source| ReceiveError::Listen {
            addr: opts.listen.clone(),
            source,
        })?;
    let local = l
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| opts.listen.clone());
    info!(listen = %local, receiver = %opts.receiver_cmd, "waiting for a primary");
    shared.set(|s| {
        s.state = "waiting for primary".into();
        s.address = local.clone();
    });
    let slot = Arc::new(tokio::sync::Mutex::new(()));
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    loop {
        let (sock, peer) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = done_rx.recv() => return Ok(()),
        };
        let _ = sock.set_nodelay(true);
        let opts = opts.clone();
        let shared = shared.clone();
        let slot = slot.clone();
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            if handle(sock, peer.to_string(), &opts, &shared, &slot).await && opts.once {
                let _ = done_tx.send(()).await;
            }
        });
    }
}

/// One incoming connection: authenticate, claim the slot, run the session. Returns
/// whether a session ran.
async fn handle(
    mut sock: TcpStream,
    peer: String,
    opts: &ReceiveOptions,
    shared: &Arc<Shared>,
    slot: &Arc<tokio::sync::Mutex<()>>,
) -> bool {
    let cfg = ServerConfig {
        key: opts.key.clone(),
        timeout: opts.handshake_timeout,
    };
    let session = match replication::server_handshake(&mut sock, &cfg).await {
        Ok(s) => s,
        Err(e) => {
            shared.metrics.auth_failures_total.inc();
            warn!(%peer, error = %e, "refused a primary");
            shared.set(|s| s.last_event = Some(format!("refused {peer}: {e}")));
            return false;
        }
    };
    let Ok(_guard) = slot.clone().try_lock_owned() else {
        warn!(%peer, "refused a primary: another primary is connected");
        let _ = session
            .keys
            .sealer
            .send(
                &mut sock,
                &Message::abort("busy: another primary is being replicated here"),
            )
            .await;
        return false;
    };
    if session
        .keys
        .sealer
        .send(&mut sock, &Message::Welcome)
        .await
        .is_err()
    {
        return false;
    }
    shared.metrics.sessions_total.inc();
    let span = info_span!("session", primary = %peer);
    serve(sock, peer, session, opts, shared)
        .instrument(span)
        .await;
    shared.set(|s| {
        s.state = "waiting for primary".into();
        s.peer = None;
    });
    true
}

enum End {
    /// The primary closed the stream (CLOSE).
    Closed { finished: bool },
    /// Silence, broken connection, bad frame, abort.
    Lost(String),
    /// The receiver command stopped taking data.
    ReceiverFailed(String),
}

fn spawn_receiver(cmd: &str) -> std::io::Result<Child> {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(false)
        .spawn()
}

/// Bytes of the receiver's stdin pipe (the usual maximum, /proc/sys/fs/pipe-max-size):
/// a small checkpoint then fits whole, and is acknowledged without waiting for the
/// receiver to be scheduled.
pub const RECEIVER_PIPE_BYTES: i32 = 1 << 20;

fn grow_pipe(stdin: &tokio::process::ChildStdin) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a pipe fd we own, integer argument.
    let r = unsafe { libc::fcntl(stdin.as_raw_fd(), libc::F_SETPIPE_SZ, RECEIVER_PIPE_BYTES) };
    if r < 0 {
        debug!(error = %std::io::Error::last_os_error(), "could not grow the receiver's pipe; keeping its size");
    }
}

/// Writes steps to the receiver in order; acknowledges a checkpoint once its bytes are
/// written. Ends (closing the receiver's stdin) when the queue closes or a write fails.
fn spawn_feeder(
    mut stdin: tokio::process::ChildStdin,
    acks: mpsc::Sender<Message>,
    m: Arc<crate::metrics::Metrics>,
) -> (
    mpsc::Sender<Step>,
    tokio::task::JoinHandle<Result<(), String>>,
) {
    let (feed_tx, mut feed_rx) = mpsc::channel::<Step>(64);
    let h = tokio::spawn(async move {
        while let Some(step) = feed_rx.recv().await {
            match step {
                Step::Write(b) => {
                    stdin
                        .write_all(&b)
                        .await
                        .map_err(|e| format!("writing to the receiver: {e}"))?;
                    m.stream_bytes_total.add(b.len() as u64);
                }
                Step::Ack(n) => {
                    m.checkpoints_total.inc();
                    m.last_checkpoint.set(n);
                    m.last_acked.set(n);
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

/// Decodes on a blocking thread, so heartbeats keep flowing during a large record.
/// Returns the encoded bytes back (for the metrics) with the decoded ones.
async fn decode_off_thread(
    dec: &mut Option<PageDecoder>,
    e: Vec<u8>,
) -> Result<(Vec<u8>, Vec<u8>), String> {
    let Some(mut d) = dec.take() else {
        return Err("the page decoder was lost after an earlier failure".into());
    };
    // The encoded header carries the original length (u32 LE at offset 8).
    let original = e.get(8..12).map_or(usize::MAX, |b| {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
    });
    let (d, e, r) = if original <= super::INLINE_CODEC_BYTES {
        let r = d.decode(&e);
        (d, e, r)
    } else {
        tokio::task::spawn_blocking(move || {
            let r = d.decode(&e);
            (d, e, r)
        })
        .await
        .map_err(|err| format!("the decompression task failed: {err}"))?
    };
    *dec = Some(d);
    r.map(|out| (e, out)).map_err(|err| err.to_string())
}

async fn serve(
    sock: TcpStream,
    peer: String,
    session: Session,
    opts: &ReceiveOptions,
    shared: &Arc<Shared>,
) {
    let m = shared.metrics.clone();
    let (r, mut w) = sock.into_split();
    info!(
        version = session.version,
        codec = session.codec,
        "primary authenticated; starting the receiver"
    );
    shared.set(|s| {
        s.state = "starting the receiver".into();
        s.peer = Some(peer.clone());
        s.protocol_version = Some(session.version);
        s.compression = Some(if session.codec == 1 {
            "lz4".into()
        } else {
            "none".into()
        });
    });

    let mut child = match spawn_receiver(&opts.receiver_cmd) {
        Ok(c) => c,
        Err(e) => {
            let reason = format!("cannot start the receiver `{}`: {e}", opts.receiver_cmd);
            error!("{reason}");
            let _ = session
                .keys
                .sealer
                .send(&mut w, &Message::abort(reason))
                .await;
            return;
        }
    };
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        let _ = session
            .keys
            .sealer
            .send(&mut w, &Message::abort("the receiver has no pipes"))
            .await;
        return;
    };
    grow_pipe(&stdin);
    // The banner: one line, before the receiver reads anything.
    let mut out = BufReader::new(stdout);
    let mut banner = Vec::new();
    let got = tokio::time::timeout(
        opts.banner_timeout,
        (&mut out)
            .take(MAX_BANNER as u64)
            .read_until(b'\n', &mut banner),
    )
    .await;
    match got {
        Ok(Ok(n)) if n > 0 && banner.ends_with(b"\n") => {}
        other => {
            let why = match other {
                Err(_) => format!("no banner within {:?}", opts.banner_timeout),
                Ok(Err(e)) => format!("reading its banner: {e}"),
                Ok(Ok(_)) => format!(
                    "it printed {:?} instead of a banner line",
                    String::from_utf8_lossy(&banner)
                ),
            };
            let reason = format!("the receiver `{}` did not start: {why}", opts.receiver_cmd);
            error!("{reason}");
            let _ = session
                .keys
                .sealer
                .send(&mut w, &Message::abort(reason))
                .await;
            drop(stdin);
            let _ = child.kill().await;
            return;
        }
    }
    if session
        .keys
        .sealer
        .send(&mut w, &Message::Banner(banner))
        .await
        .is_err()
    {
        drop(stdin);
        let _ = child.kill().await;
        return;
    }
    // Whatever else the receiver prints is not for the primary (Remus reads no more).
    tokio::spawn(async move {
        let mut lines = out.lines();
        while let Ok(Some(l)) = lines.next_line().await {
            debug!(line = %l, "receiver output");
        }
    });

    let (tx, rx) = mpsc::channel::<Message>(1024);
    let (lost_tx, mut lost_rx) = watch::channel::<Option<String>>(None);
    let writer = super::spawn_writer(
        w,
        session.keys.sealer.clone(),
        rx,
        opts.heartbeat.interval,
        m.clone(),
        Arc::new(lost_tx),
    );
    m.connected.set(1);
    shared.set(|s| s.state = "replicating".into());

    // The feeder writes whole checkpoints to the receiver and acknowledges each once
    // written, while this loop keeps reading the next one (and watching for silence).
    let (feed_tx, feeder) = spawn_feeder(stdin, tx.clone(), m.clone());

    let mut reader = FrameReader::new(r, session.keys.opener.clone());
    let mut cutter = Cutter::new();
    let mut decoder = Some(PageDecoder::new(session.cache_pages as usize));
    let mut steps = Vec::new();
    let hb = opts.heartbeat;
    let mut waiting_since = Instant::now();
    let end = 'session: loop {
        let r = tokio::select! {
            // Frames first: a frame already received is never mistaken for silence,
            // however late this task gets to run.
            biased;
            r = reader.next() => r,
            _ = tokio::time::sleep(silence_check(&hb, waiting_since)) => {
                if let Some(silent) = judge_silence(&hb, waiting_since, &m) {
                    break End::Lost(format!(
                        "the primary was silent for {} ms (heartbeat timeout {} ms)",
                        silent.as_millis(), hb.timeout.as_millis()
                    ));
                }
                continue;
            }
            r = lost_rx.wait_for(Option::is_some) => {
                break End::Lost(match r {
                    Ok(v) => v.clone().unwrap_or_default(),
                    Err(_) => "the connection writer ended".into(),
                });
            }
        };
        waiting_since = Instant::now();
        let data = match r {
            Ok(Message::Data(d)) => d,
            Ok(Message::PageData(e)) => match decode_off_thread(&mut decoder, e).await {
                Ok((e, d)) => {
                    m.page_bytes_wire_total.add(e.len() as u64);
                    m.page_bytes_raw_total.add(d.len() as u64);
                    d
                }
                Err(e) => break End::Lost(format!("undecodable page data from the primary: {e}")),
            },
            Ok(Message::Heartbeat { .. }) => continue,
            Ok(Message::Close { finished, .. }) => break End::Closed { finished },
            Ok(Message::Abort { reason }) => {
                break End::Lost(format!("the primary aborted: {reason}"));
            }
            Ok(other) => {
                break End::Lost(format!(
                    "protocol error: unexpected {:?} from the primary",
                    other.kind()
                ));
            }
            Err(e) => break End::Lost(e.to_string()),
        };
        steps.clear();
        if let Err(e) = cutter.push(&data, &mut steps) {
            break End::Lost(format!("the primary sent a malformed stream: {e}"));
        }
        for s in steps.drain(..) {
            if feed_tx.send(s).await.is_err() {
                break 'session End::ReceiverFailed("the receiver stopped taking data".into());
            }
        }
        // Heartbeats resume counting from now: time spent writing to the receiver is
        // not the primary's silence.
        waiting_since = Instant::now();
    };
    m.connected.set(0);

    let n = cutter.complete();
    // The feeder writes what is queued (whole checkpoints only), then closes stdin:
    // the failover signal, or the normal end of a plain migration.
    drop(feed_tx);
    let end = match feeder.await {
        Ok(Ok(())) => end,
        Ok(Err(e)) => End::ReceiverFailed(e),
        Err(e) => End::ReceiverFailed(format!("the receiver's feeder failed: {e}")),
    };
    match &end {
        End::Closed { finished: true } => {
            info!(
                bytes = cutter.written(),
                "the primary finished a plain migration; receiver's stream closed"
            );
            shared.set(|s| {
                s.state = "finished".into();
                s.last_event = Some("plain migration finished".into());
            });
        }
        End::Closed { finished: false } | End::Lost(_) | End::ReceiverFailed(_) => {
            let reason = match &end {
                End::Closed { .. } => "the primary closed the stream".to_string(),
                End::Lost(r) | End::ReceiverFailed(r) => r.clone(),
            };
            m.failovers_total.inc();
            if matches!(end, End::Closed { .. }) {
                warn!(
                    checkpoint = n,
                    held_bytes = cutter.held(),
                    "FAILOVER: the primary ended the stream (xl remus stopped); closed the receiver's stream after checkpoint {n}, the backup resumes from it"
                );
            } else if n == 0 {
                error!(%reason, "FAILOVER IMPOSSIBLE: primary lost before the first complete checkpoint; the receiver's stream is closed and it holds no usable copy");
            } else {
                error!(%reason, checkpoint = n, held_bytes = cutter.held(), "FAILOVER: primary lost; closed the receiver's stream after checkpoint {n}, the backup resumes from it");
            }
            shared.set(|s| {
                s.state = "failed over".into();
                s.last_event = Some(format!("failover after checkpoint {n}: {reason}"));
            });
        }
    }
    // Tell the primary, if it can still hear: CLOSE answers CLOSE, ABORT otherwise.
    let answer = match &end {
        End::Closed { .. } => Message::Close {
            checkpoints: n,
            finished: cutter.finished(),
        },
        End::Lost(r) | End::ReceiverFailed(r) => Message::abort(r.clone()),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), tx.send(answer)).await;
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    shared.set(|s| s.state = "waiting for the receiver to exit".into());
    match child.wait().await {
        Ok(st) => info!(status = %st, "the receiver exited"),
        Err(e) => warn!(error = %e, "waiting for the receiver"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::writer::{WriterConfig, write};

    fn run_cutter(stream: &[u8], chunk: usize) -> (Vec<u8>, Vec<u64>, Cutter) {
        let mut c = Cutter::new();
        let mut steps = Vec::new();
        let mut out = Vec::new();
        let mut acks = Vec::new();
        for piece in stream.chunks(chunk) {
            steps.clear();
            c.push(piece, &mut steps).unwrap();
            for s in steps.drain(..) {
                match s {
                    Step::Write(b) => out.extend_from_slice(&b),
                    Step::Ack(n) => {
                        acks.push(n);
                    }
                }
            }
        }
        (out, acks, c)
    }

    fn complete_ends(w: &crate::stream::writer::Written) -> Vec<(u64, u64)> {
        w.events
            .iter()
            .filter_map(|e| match *e {
                Event::CheckpointComplete { checkpoint, end } => Some((checkpoint, end)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn whole_stream_passes_byte_identical_with_an_ack_per_checkpoint() {
        let w = write(&WriterConfig::pv(4));
        for chunk in [1usize, 7, 4096, 1 << 20] {
            let (out, acks, c) = run_cutter(&w.bytes, chunk);
            assert_eq!(out, w.bytes, "chunk {chunk}");
            assert_eq!(acks, vec![1, 2, 3, 4]);
            assert_eq!(c.complete(), 4);
            assert_eq!(c.held(), 0);
        }
    }

    #[test]
    fn a_truncated_stream_is_cut_at_the_last_complete_checkpoint() {
        let w = write(&WriterConfig::hvm(3));
        let ends = complete_ends(&w);
        let (_, end2) = ends[1];
        let (_, end3) = ends[2];
        // Cut anywhere inside checkpoint 3: exactly checkpoints 1 and 2 come out.
        for cut in [end2 + 1, (end2 + end3) / 2, end3 - 1] {
            let (out, acks, c) = run_cutter(&w.bytes[..cut as usize], 1000);
            assert_eq!(out.len() as u64, end2, "cut {cut}");
            assert_eq!(out, w.bytes[..end2 as usize]);
            assert_eq!(acks, vec![1, 2]);
            assert_eq!(c.held() as u64, cut - end2);
        }
    }

    #[test]
    fn checkpoint_one_streams_through_before_it_completes() {
        let w = write(&WriterConfig::pv(2));
        let (_, end1) = complete_ends(&w)[0];
        let half = (end1 / 2) as usize;
        let (out, acks, _) = run_cutter(&w.bytes[..half], 4096);
        assert_eq!(out, w.bytes[..half]);
        assert!(acks.is_empty());
    }

    #[test]
    fn plain_migration_is_written_whole() {
        let mut cfg = WriterConfig::pv(1);
        cfg.plain = true;
        let w = write(&cfg);
        let (out, acks, c) = run_cutter(&w.bytes, 3000);
        assert_eq!(out, w.bytes);
        assert!(acks.is_empty());
        assert!(c.finished());
    }

    #[test]
    fn garbage_is_an_error() {
        let mut c = Cutter::new();
        let mut steps = Vec::new();
        assert!(c.push(&[0xAB; 200], &mut steps).is_err());
    }
}
