//! `remus relay receive`: the backup end. Long-running; one primary at a time.
//!
//! Owns: the listening socket, answering probes, refusing unauthenticated or surplus
//! primaries, and each session as a state machine (below). Never touches: the wire
//! format (`replication`), the stream grammar (`stream`), what is cut where ([`cutter`]),
//! the receiver process itself ([`receiver`]), Xen (the receiver and discard commands
//! do that, [`discard`]).
//!
//! One session, one state per phase; each step consumes the state and returns the next:
//!
//! ```text
//!   Authenticated ──receiver started, banner passed back──► Replicating ──┐ one frame
//!        │ receiver did not start (ABORT sent)                  ▲  │      │ per step
//!        ▼                                                      └──┘◄─────┘
//!      Done ◄── the receiver exited ◄── Closing(end) ◄── CLOSE │ silence │ broken or
//!                                        │                     corrupt frame │ ABORT │
//!                                        │                     the receiver stopped │
//!                                        │                     DISCARD
//!                                        ├ CLOSE, loss: whole checkpoints written, stdin
//!                                        │   closed (failover), answered: CLOSE | ABORT
//!                                        ├ DISCARD: receiver group frozen and killed with
//!                                        │   its stdin open (nothing activates), the copy
//!                                        │   destroyed, answered: DISCARDED
//!                                        └ the receiver ended on its own: no failover
//!                                            (nothing activates without its stream's
//!                                            end), answered: ABORT
//! ```
//!
//! With replicated disks (`--disk`, [`disks`]) a checkpoint reaches the receiver only once
//! every disk holds its epoch durably, and the receiver's stream is closed for a failover
//! only once every disk failed over to the checkpoint it holds.
//!
//! A probe (HELLO with the probe flag) is answered with PROBE_OK after the usual
//! authentication, and nothing else happens: no session, no receiver, no refusal.
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, error, info, info_span, warn};

use super::connection::{LossSender, loss_of, offload, spawn_writer};
use super::{Heartbeat, RelayState, SessionEnd, Shared};
use crate::checkpoint::{LossKind, LossReason};
use crate::compress::{CompressError, PageDecoder};
use crate::exit::{ExitCode, HasExitCode};
use crate::replication::{self, FrameReader, Incoming, Key, Message, ServerConfig, Session};

pub mod announce;
pub mod cutter;
pub mod discard;
pub mod disks;
pub mod receiver;

pub use cutter::{Cutter, MergeError, Step};
pub use discard::{DEFAULT_DISCARD_CMD, DEFAULT_DISCARD_TIMEOUT, DomainName};
pub use receiver::RECEIVER_PIPE_BYTES;

pub const DEFAULT_RECEIVER_CMD: &str = "xl migrate-receive -r -e";

#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    pub listen: String,
    pub key: Key,
    /// Run with `sh -c`.
    pub receiver_cmd: String,
    /// Destroys the discarded copy (`sh -c`, `$REMUS_DOMAIN` = the stream's domain).
    pub discard_cmd: String,
    /// How long the discard command may take.
    pub discard_timeout: Duration,
    pub heartbeat: Heartbeat,
    pub handshake_timeout: Duration,
    pub banner_timeout: Duration,
    /// Serve one primary, then exit (tests and benchmarks).
    pub once: bool,
    /// The backup disk daemons' control sockets (`--disk`, see [`disks`]).
    pub disks: Vec<std::path::PathBuf>,
    /// How long one checkpoint may wait for a disk's epoch to become durable.
    pub disk_timeout: Duration,
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
        s.state = RelayState::WaitingForPrimary;
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
    if session.probe {
        // Both proofs verified: the primary holds the key. Answer and start nothing.
        let busy = slot.try_lock().is_err();
        let answer = Message::ProbeOk { busy };
        if session.keys.sealer.send(&mut sock, &answer).await.is_ok() {
            shared.metrics.probes_total.inc();
            info!(%peer, busy, "answered a probe (the key is the same; no session)");
        }
        return false;
    }
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
        s.state = RelayState::WaitingForPrimary;
        s.peer = None;
    });
    true
}

/// One session's phases (see the module docs); each carries what it needs.
enum Phase {
    /// The primary authenticated and was welcomed.
    Authenticated {
        reader: OwnedReadHalf,
        writer: OwnedWriteHalf,
    },
    /// Checkpoints flow: each step reads one frame from the primary.
    Replicating(Box<Live>),
    /// The session is over: write what is whole, close the receiver's stdin, answer.
    Closing {
        live: Box<Live>,
        end: Ending,
    },
    Done,
}

/// Why the session is closing.
enum Ending {
    /// The primary said CLOSE.
    Closed {
        finished: bool,
    },
    Lost(LossReason),
    /// The primary said DISCARD: protection ended, no failover.
    Discard,
    /// The receiver's first process exited while its stream was open.
    ReceiverEnded(std::process::ExitStatus),
}

/// What a replicating session holds.
struct Live {
    reader: FrameReader<OwnedReadHalf>,
    /// The writer task's queue (ACKs, the final answer) and its handle.
    tx: mpsc::Sender<Message>,
    writer: tokio::task::JoinHandle<()>,
    lost: watch::Receiver<Option<LossReason>>,
    cutter: Cutter,
    decoder: Option<PageDecoder>,
    feed: mpsc::Sender<Step>,
    feeder: tokio::task::JoinHandle<receiver::Fed>,
    child: tokio::process::Child,
    /// The receiver's process group (frozen and killed as one on DISCARD).
    pgid: u32,
    /// The domain the stream carries (for the discard command).
    name: DomainName,
    waiting_since: Instant,
    steps: Vec<Step>,
    /// Disks are replicated: each checkpoint waits for them ([`disks`]).
    with_disks: bool,
    /// Checkpoints the primary said were merged, not yet passed to the feeder.
    merges: Vec<u64>,
}

/// What the session needs besides its state.
struct Ctx<'a> {
    opts: &'a ReceiveOptions,
    shared: &'a Arc<Shared>,
    session: Session,
}

async fn serve(
    sock: TcpStream,
    peer: String,
    session: Session,
    opts: &ReceiveOptions,
    shared: &Arc<Shared>,
) {
    info!(
        version = session.version,
        codec = %session.codec,
        "primary authenticated; starting the receiver"
    );
    shared.set(|s| {
        s.state = RelayState::StartingReceiver;
        s.peer = Some(peer.clone());
        s.protocol_version = Some(session.version);
        s.compression = Some(session.codec);
    });
    let ctx = Ctx {
        opts,
        shared,
        session,
    };
    let (reader, writer) = sock.into_split();
    let mut phase = Phase::Authenticated { reader, writer };
    loop {
        phase = match phase {
            Phase::Authenticated { reader, writer } => start(reader, writer, &ctx).await,
            Phase::Replicating(live) => replicate(live, &ctx).await,
            Phase::Closing { live, end } => close(*live, end, &ctx).await,
            Phase::Done => return,
        };
    }
}

/// Authenticated → Replicating: start the receiver, pass its banner back, start the
/// writer and feeder tasks. A receiver that does not start is answered with ABORT.
async fn start(reader: OwnedReadHalf, mut w: OwnedWriteHalf, ctx: &Ctx<'_>) -> Phase {
    let m = ctx.shared.metrics.clone();
    // Every frame from here on is sealed, the refusal too.
    let sealer = &ctx.session.keys.sealer;
    // The disks first: without them this backup holds no usable copy.
    let disks = if ctx.opts.disks.is_empty() {
        None
    } else {
        match disks::BackupDisks::connect(&ctx.opts.disks, ctx.opts.disk_timeout, ctx.shared).await
        {
            Ok(d) => Some(d),
            Err(e) => {
                error!("{e}");
                ctx.shared
                    .set(|s| s.last_event = Some(format!("refused a session: {e}")));
                let why = format!("the backup's disk is not usable: {e}");
                let _ = sealer.send(&mut w, &Message::abort(why)).await;
                return Phase::Done;
            }
        }
    };
    let with_disks = disks.is_some();
    let started = match receiver::start(&ctx.opts.receiver_cmd, ctx.opts.banner_timeout).await {
        Ok(s) => s,
        Err(e) => {
            error!("{e}");
            let _ = sealer.send(&mut w, &Message::abort(e.to_string())).await;
            return Phase::Done;
        }
    };
    let mut child = started.child;
    let pgid = started.pgid;
    if sealer
        .send(&mut w, &Message::Banner(started.banner))
        .await
        .is_err()
    {
        // The receiver has read nothing: ending its stream activates nothing.
        drop(started.stdin);
        let _ = child.kill().await;
        return Phase::Done;
    }
    let (tx, rx) = mpsc::channel::<Message>(1024);
    let (lost_tx, lost) = watch::channel::<Option<LossReason>>(None);
    let lost_tx: LossSender = Arc::new(lost_tx);
    let writer = spawn_writer(
        w,
        sealer.clone(),
        rx,
        ctx.opts.heartbeat.interval,
        m.clone(),
        lost_tx,
        None,
    );
    m.connected.set(1);
    ctx.shared.enter(RelayState::Replicating);
    // The feeder writes whole checkpoints to the receiver and acknowledges each once
    // written, while the session keeps reading the next one (and watching for silence).
    let (feed, feeder) = receiver::spawn_feeder(started.stdin, tx.clone(), m, disks);
    Phase::Replicating(Box::new(Live {
        reader: FrameReader::new(reader, ctx.session.keys.opener.clone()),
        tx,
        writer,
        lost,
        cutter: Cutter::new(),
        decoder: Some(PageDecoder::new(ctx.session.cache_pages as usize)),
        feed,
        feeder,
        child,
        pgid,
        name: DomainName::new(),
        waiting_since: Instant::now(),
        steps: Vec::new(),
        with_disks,
        merges: Vec::new(),
    }))
}

/// Replicating → Replicating (one frame handled) or Closing.
async fn replicate(mut live: Box<Live>, ctx: &Ctx<'_>) -> Phase {
    let r = next_stream_bytes(&mut live, ctx).await;
    // A merge notice goes to the disks before any later checkpoint's steps.
    for n in std::mem::take(&mut live.merges) {
        if live.with_disks && live.feed.send(Step::Merged(n)).await.is_err() {
            let gone = receiver::ReceiverError::Gone.to_string();
            let end = Ending::Lost(LossReason::new(LossKind::LocalFailure, gone));
            return Phase::Closing { live, end };
        }
    }
    match r {
        Ok(None) => Phase::Replicating(live),
        Ok(Some(data)) => match cut_and_feed(&mut live, data).await {
            Ok(()) => Phase::Replicating(live),
            Err(end) => Phase::Closing { live, end },
        },
        Err(end) => Phase::Closing { live, end },
    }
}

/// Waits for the next frame: stream bytes (decoded if compressed), `None` for a
/// heartbeat, or how the session ends.
async fn next_stream_bytes(live: &mut Live, ctx: &Ctx<'_>) -> Result<Option<Bytes>, Ending> {
    let Some(r) = next_frame(live, ctx).await? else {
        return Ok(None);
    };
    live.waiting_since = Instant::now();
    match r {
        Ok(Incoming::Data(d)) => Ok(Some(d)),
        Ok(Incoming::PageData(e)) => match decode(&mut live.decoder, e).await {
            Ok((e, d)) => {
                let m = &ctx.shared.metrics;
                m.page_data_wire_bytes_total.inc_by(e.len() as u64);
                m.page_data_raw_bytes_total.inc_by(d.len() as u64);
                Ok(Some(d.into()))
            }
            Err(e) => lost(
                LossKind::Corrupt,
                format!("undecodable page data from the primary: {e}"),
            ),
        },
        Ok(Incoming::Message(m)) => on_message(live, m),
        // A cut inside a frame is a broken connection too; a frame that does not open
        // (forged, replayed, unsealed) is corrupt data like a bad CRC.
        Err(
            e @ (replication::WireError::Io(_)
            | replication::WireError::Closed
            | replication::WireError::Truncated { .. }),
        ) => lost(LossKind::Connection, e.to_string()),
        Err(e) => lost(LossKind::Corrupt, e.to_string()),
    }
}

/// The session lost for `kind`, as `detail` says.
fn lost<T>(kind: LossKind, detail: String) -> Result<T, Ending> {
    Err(Ending::Lost(LossReason::new(kind, detail)))
}

/// The next frame as read, `None` when the heartbeat check found the silence still
/// short, or how the session ends (silence, a lost writer, the receiver's end).
async fn next_frame(
    live: &mut Live,
    ctx: &Ctx<'_>,
) -> Result<Option<Result<Incoming, replication::WireError>>, Ending> {
    let hb = ctx.opts.heartbeat;
    let m = &ctx.shared.metrics;
    tokio::select! {
        // Frames first: a frame already received is never mistaken for silence,
        // however late this task gets to run.
        biased;
        r = live.reader.next_frame() => Ok(Some(r)),
        _ = tokio::time::sleep(hb.silence_check(live.waiting_since)) => {
            match hb.judge_silence(live.waiting_since, m) {
                Some(silent) => lost(LossKind::Silence, format!(
                    "the primary was silent for {} ms (heartbeat timeout {} ms)",
                    silent.as_millis(), hb.timeout.as_millis()
                )),
                None => Ok(None),
            }
        }
        r = live.lost.wait_for(Option::is_some) => Err(Ending::Lost(loss_of(r))),
        // After a plain migration's END the receiver may finish before the CLOSE arrives.
        st = live.child.wait(), if !live.cutter.finished() => Err(match st {
            Ok(st) => Ending::ReceiverEnded(st),
            Err(e) => Ending::Lost(LossReason::new(
                LossKind::LocalFailure,
                format!("waiting for the receiver: {e}"),
            )),
        }),
    }
}

/// A control frame amid the stream: `None` to go on reading, or how the session ends.
fn on_message(live: &mut Live, m: Message) -> Result<Option<Bytes>, Ending> {
    match m {
        Message::Heartbeat { .. } => Ok(None),
        Message::Merged { checkpoint } => match live.cutter.merged(checkpoint) {
            Ok(()) => {
                live.merges.push(checkpoint);
                info!(
                    checkpoint,
                    "the primary could not prove checkpoint {checkpoint}'s cut: it is no failover point and goes to the receiver with the next one"
                );
                Ok(None)
            }
            Err(e) => lost(LossKind::Protocol, format!("protocol error: {e}")),
        },
        Message::Close { finished, .. } => Err(Ending::Closed { finished }),
        Message::Discard => Err(Ending::Discard),
        Message::Abort { reason } => {
            lost(LossKind::Aborted, format!("the primary aborted: {reason}"))
        }
        other => lost(
            LossKind::Protocol,
            format!(
                "protocol error: unexpected {:?} from the primary",
                other.kind()
            ),
        ),
    }
}

/// Hands the bytes to the cut and its steps to the feeder.
async fn cut_and_feed(live: &mut Live, data: Bytes) -> Result<(), Ending> {
    live.name.push(&data);
    live.steps.clear();
    // The frame's own buffer goes on to the receiver: no copy on the way.
    if let Err(e) = live.cutter.push(data, &mut live.steps) {
        return Err(Ending::Lost(LossReason::new(
            LossKind::Corrupt,
            format!("the primary sent a malformed stream: {e}"),
        )));
    }
    if live.with_disks {
        cutter::with_durable(&mut live.steps);
    }
    for s in live.steps.drain(..) {
        if live.feed.send(s).await.is_err() {
            return Err(Ending::Lost(LossReason::new(
                LossKind::LocalFailure,
                receiver::ReceiverError::Gone.to_string(),
            )));
        }
    }
    // Heartbeats resume counting from now: time spent writing to the receiver is
    // not the primary's silence.
    live.waiting_since = Instant::now();
    Ok(())
}

/// Why a PAGE_DATA frame could not be decoded.
#[derive(Debug, thiserror::Error)]
enum DecodeError {
    #[error("the page decoder was lost after an earlier failure")]
    NoDecoder,
    #[error(transparent)]
    Offload(#[from] super::connection::OffloadError),
    #[error(transparent)]
    Compress(#[from] CompressError),
}

/// Decodes a PAGE_DATA frame (off the runtime thread when big, so heartbeats keep
/// flowing). Returns the encoded bytes back (for the metrics) with the decoded ones.
async fn decode(dec: &mut Option<PageDecoder>, e: Bytes) -> Result<(Bytes, Vec<u8>), DecodeError> {
    let Some(d) = dec.take() else {
        return Err(DecodeError::NoDecoder);
    };
    // The encoded header carries the original length (u32 LE at offset 8).
    let original = e.get(8..12).map_or(usize::MAX, |b| {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
    });
    let f = |d: &mut PageDecoder, e: &[u8]| d.decode(e);
    let (d, e, r) = offload("decompression", original, d, e, f).await?;
    *dec = Some(d);
    Ok((e, r?))
}

/// What closing needs once nothing more is read from the primary.
struct Closing {
    cutter: Cutter,
    name: DomainName,
    /// The writer task's queue (the answer) and its handle.
    tx: mpsc::Sender<Message>,
    writer: tokio::task::JoinHandle<()>,
    child: tokio::process::Child,
    pgid: u32,
}

impl Closing {
    /// Sends the primary its answer if it can still hear it, and lets the writer finish.
    async fn answer(self, m: Message) -> (Cutter, DomainName, tokio::process::Child) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tx.send(m)).await;
        drop(self.tx);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.writer).await;
        (self.cutter, self.name, self.child)
    }
}

/// Closing → Done. How the session ended decides what the receiver gets: its stdin
/// closed after whole checkpoints (CLOSE, a lost primary: libxl fails over or finishes),
/// or its process group killed with its stdin still open (DISCARD, or it ended on its
/// own: nothing is activated).
async fn close(live: Live, end: Ending, ctx: &Ctx<'_>) -> Phase {
    ctx.shared.metrics.connected.set(0);
    let Live {
        cutter,
        name,
        feed,
        feeder,
        tx,
        writer,
        child,
        pgid,
        ..
    } = live;
    let c = Closing {
        cutter,
        name,
        tx,
        writer,
        child,
        pgid,
    };
    let end = match end {
        Ending::Discard => return discard(c, feed, feeder, ctx).await,
        Ending::ReceiverEnded(st) => {
            // What it started may live on in its group and still read the stream.
            kill_group(c.pgid);
            drop(feed);
            feeder.abort();
            return receiver_ended(c, Some(st), ctx).await;
        }
        Ending::Closed { finished } => Ok(finished),
        Ending::Lost(reason) => Err(reason),
    };
    // The feeder writes what is queued (whole checkpoints only) and hands the receiver's
    // stdin back; closing it is the failover signal, or the normal end of a plain
    // migration.
    drop(feed);
    let fed = match feeder.await {
        Ok(fed) => fed,
        // The task died with the stdin it held: the stream is closed already.
        Err(e) => {
            let why = receiver::ReceiverError::Feeder(e).to_string();
            return closed(c, Err(LossReason::new(LossKind::LocalFailure, why)), ctx).await;
        }
    };
    let end = match fed.result {
        Ok(()) => end,
        // The receiver closed its stdin itself (it died): it cannot see an end either.
        Err(receiver::ReceiverError::Write(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            drop(fed.stdin);
            return receiver_ended(c, None, ctx).await;
        }
        Err(e) => Err(LossReason::new(LossKind::LocalFailure, e.to_string())),
    };
    // Every disk goes to the checkpoint the receiver holds before its stream closes, so
    // xl activates the guest on disks at exactly that checkpoint; if one cannot, the
    // receiver is killed instead (no guest rather than a guest on the wrong disk).
    if let Some(mut disks) = fed.disks.filter(|d| !d.is_empty())
        && !matches!(end, Ok(true))
        && fed.last > 0
        && let Err(why) = disks.failover(fed.last).await
    {
        kill_group(c.pgid);
        drop(fed.stdin);
        return disk_failover_failed(c, fed.last, why, ctx).await;
    }
    drop(fed.stdin);
    let n = if ctx.opts.disks.is_empty() {
        c.cutter.complete()
    } else {
        fed.last
    };
    closed(c, end.map(|f| (f, n)), ctx).await
}

/// The receiver's stream is closed: answer the primary, report, wait for the receiver.
/// `end`: Ok((finished, checkpoint failed over to)) or why the session was lost.
async fn closed(c: Closing, end: Result<(bool, u64), LossReason>, ctx: &Ctx<'_>) -> Phase {
    // CLOSE answers CLOSE (orderly, even if the backup now fails over), ABORT otherwise.
    let answer = match &end {
        Ok(_) => Message::Close {
            checkpoints: c.cutter.complete(),
            finished: c.cutter.finished(),
        },
        Err(reason) => Message::abort(reason.detail.clone()),
    };
    let n = end.as_ref().map_or(c.cutter.complete(), |(_, n)| *n);
    let failover = !matches!(end, Ok((true, _))) && n > 0;
    report_end(end.map(|(f, _)| f), n, &c.cutter, ctx.shared);
    if failover {
        announce::at_failover(c.name.config());
    }
    let (_, _, mut child) = c.answer(answer).await;
    ctx.shared.enter(RelayState::WaitingForReceiverExit);
    match child.wait().await {
        Ok(st) => info!(status = %st, "the receiver exited"),
        Err(e) => warn!(error = %e, "waiting for the receiver"),
    }
    Phase::Done
}

/// A disk could not fail over to checkpoint `n`: the receiver was killed before its
/// stream could end, so no guest starts on a disk that is not at `n`. No failover.
async fn disk_failover_failed(c: Closing, n: u64, why: String, ctx: &Ctx<'_>) -> Phase {
    error!(
        checkpoint = n,
        %why,
        "NO FAILOVER: a disk could not fail over to checkpoint {n}; the receiver was killed before its stream ended, so the guest is not started on a disk that is not at checkpoint {n}"
    );
    ctx.shared.set(|s| {
        s.last_event = Some(format!(
            "no failover: a disk could not fail over to checkpoint {n} ({why}); the receiver was killed"
        ));
    });
    let (_, _, mut child) = c
        .answer(Message::abort(format!(
            "the backup's disk could not fail over: {why}"
        )))
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    Phase::Done
}

/// Freezes, then kills the receiver's process group (logged if it fails: only a group
/// that is not ours could refuse).
fn kill_group(pgid: u32) -> bool {
    match receiver::freeze_and_kill(pgid) {
        Ok(()) => true,
        Err(e) => {
            error!(pgid, error = %e, "could not kill the receiver's process group");
            false
        }
    }
}

/// DISCARD: the primary ended protection. The receiver is killed before its stdin can
/// close (the feeder holds it), then the copy it built is destroyed; the primary hears
/// DISCARDED once nothing can activate the copy any more.
async fn discard(
    c: Closing,
    feed: mpsc::Sender<Step>,
    feeder: tokio::task::JoinHandle<receiver::Fed>,
    ctx: &Ctx<'_>,
) -> Phase {
    let n = c.cutter.complete();
    info!(
        checkpoint = n,
        "the primary ended protection: discarding the copy (the receiver is killed before its stream can end, so nothing is activated)"
    );
    if !kill_group(c.pgid) {
        // Closing its stdin now would activate the copy: keep it open for good (the
        // feeder waits on a queue that never closes) and let the primary keep holding.
        std::mem::forget(feed);
        let why = "the backup could not kill its receiver; the copy is left as it is (its stream stays open)";
        ctx.shared
            .set(|s| s.last_event = Some(format!("discard failed: {why}")));
        let _ = c.answer(Message::abort(why)).await;
        return Phase::Done;
    }
    drop(feed);
    feeder.abort();
    let mut c = c;
    match tokio::time::timeout(Duration::from_secs(10), c.child.wait()).await {
        Ok(Ok(st)) => info!(status = %st, "the receiver is dead"),
        Ok(Err(e)) => warn!(error = %e, "waiting for the killed receiver"),
        Err(_) => warn!(
            "the killed receiver has not been reaped within 10 s (stuck in the kernel?); it was frozen first and cannot activate anything"
        ),
    }
    let copy_destroyed = match c.name.get() {
        // xl builds the domain from the config in the stream's header: no name yet, no
        // domain yet.
        None => {
            info!(
                "the stream had not named its domain yet: the receiver built none, nothing to destroy"
            );
            true
        }
        Some(d) => {
            match discard::run_discard_cmd(&ctx.opts.discard_cmd, d, ctx.opts.discard_timeout).await
            {
                Ok(()) => {
                    info!(domain = d, "discarded the copy of {d}");
                    true
                }
                Err(e) => {
                    error!(
                        domain = d,
                        "{e}; the copy {d}--incoming may be left paused (inert: nothing activates it): `remus unprotect {d}` or `xl destroy {d}--incoming` removes it"
                    );
                    false
                }
            }
        }
    };
    ctx.shared.metrics.discards_total.inc();
    ctx.shared.set(|s| {
        s.state = RelayState::Discarded;
        s.last_event = Some(format!(
            "protection ended by the primary: copy discarded after checkpoint {n}{}",
            if copy_destroyed {
                ""
            } else {
                " (the discard command failed)"
            }
        ));
        s.last_session = Some(SessionEnd::Discarded {
            checkpoint: n,
            copy_destroyed,
        });
    });
    c.answer(Message::Discarded {
        checkpoint: n,
        copy_destroyed,
    })
    .await;
    Phase::Done
}

/// The receiver ended on its own (crashed, killed, gave up) while its stream was open:
/// libxl activates a copy only at the end of its stream, so nothing was activated and
/// this is no failover. The primary hears ABORT: this backup holds no copy any more.
async fn receiver_ended(
    mut c: Closing,
    status: Option<std::process::ExitStatus>,
    ctx: &Ctx<'_>,
) -> Phase {
    use std::os::unix::process::ExitStatusExt;
    let status = match status {
        Some(st) => Some(st),
        None => match tokio::time::timeout(Duration::from_secs(5), c.child.wait()).await {
            Ok(Ok(st)) => Some(st),
            _ => None,
        },
    };
    let n = c.cutter.complete();
    let how = status.map_or("it closed its stream".to_string(), |st| st.to_string());
    warn!(
        checkpoint = n,
        status = %how,
        "the receiver ended on its own while its stream was open ({how}): nothing was activated, no failover happened; this backup holds no copy now"
    );
    ctx.shared.set(|s| {
        s.last_event = Some(format!(
            "the receiver ended on its own after checkpoint {n} ({how}); no failover"
        ));
        s.last_session = Some(SessionEnd::ReceiverEnded {
            checkpoint: n,
            code: status.and_then(|st| st.code()),
            signal: status.and_then(|st| st.signal()),
        });
    });
    let why = format!("the backup's receiver ended ({how}): the backup holds no copy any more");
    c.answer(Message::abort(why)).await;
    Phase::Done
}

/// Logs and shows how a session whose receiver's stream was closed ended: a finished
/// plain migration (`Ok(true)`), or a failover from the last whole checkpoint.
fn report_end(end: Result<bool, LossReason>, n: u64, cutter: &Cutter, shared: &Shared) {
    let reason = match end {
        Ok(true) => {
            info!(
                bytes = cutter.written(),
                "the primary finished a plain migration; receiver's stream closed"
            );
            shared.set(|s| {
                s.state = RelayState::Finished;
                s.last_event = Some("plain migration finished".into());
                s.last_session = Some(SessionEnd::Finished { checkpoints: n });
            });
            return;
        }
        Ok(false) => LossReason::new(LossKind::Closed, "the primary closed the stream"),
        Err(reason) => reason,
    };
    shared.metrics.failovers_total.inc();
    if n == 0 {
        error!(%reason, held_bytes = cutter.held(), "FAILOVER IMPOSSIBLE: primary lost before the first checkpoint that can be failed over to (checkpoint 1 incomplete, or merged); the receiver's stream is closed and it holds no usable copy");
    } else if reason.kind == LossKind::Closed {
        warn!(
            checkpoint = n,
            held_bytes = cutter.held(),
            "FAILOVER: the primary ended the stream (xl remus stopped); closed the receiver's stream after checkpoint {n}, the backup resumes from it"
        );
    } else {
        error!(%reason, checkpoint = n, held_bytes = cutter.held(), "FAILOVER: primary lost; closed the receiver's stream after checkpoint {n}, the backup resumes from it");
    }
    shared.set(|s| {
        s.state = RelayState::FailedOver;
        s.last_event = Some(format!("failover after checkpoint {n}: {reason}"));
        s.last_session = Some(SessionEnd::FailedOver {
            checkpoint: n,
            reason: reason.kind,
        });
    });
}
