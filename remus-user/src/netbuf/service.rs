//! The holder: the task that owns one vif's capture ring, its per-epoch queues and its
//! helper tap, and answers control requests (from its socket or from `LocalBuffer`).
//! In `remus-net attach` it is the whole daemon process ("the holder process"); in
//! `remus relay send` it runs inside the controller.
//!
//! Owns: draining the ring into `epochs::EpochQueues`, closing epochs (stamping the next
//! one in the control map first), releasing through the tap, fail-open, the vif watch,
//! serving connections, and its own detach. Never touches: attaching (`attach`), the
//! line codec (`control`), the runtime files' format (`files`).
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use remus_common::{CTL_EPOCH, CTL_MODE, FRAME_HDR_LEN, FrameHdr, MODE_HOLD, MODE_PASSTHROUGH};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, unix::AsyncFd},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use super::{
    NetError,
    control::{self, DetachPolicy, DetachReport, Mode, Request, Response, Status},
    files::RunDir,
    io_err,
};
use crate::{
    checkpoint::ports::Released,
    datapath::{self, AttachKind, Loaded, Pins},
    epochs::{self, EpochQueue, EpochQueues, Pushed},
    netlink::{Netlink, NetlinkError},
    tap::Tap,
};

pub(super) enum Cmd {
    Req(Request, oneshot::Sender<Reply>),
}

/// An answer, and for the last one (detach) a way to say it has been written out: the
/// holder waits for that before it ends, so the process cannot exit with the answer
/// still unsent (under load the connection task may not have run yet).
pub(super) struct Reply {
    resp: Response,
    written: Option<oneshot::Sender<()>>,
}

/// Why the holder ended.
#[derive(Debug)]
pub enum HolderEnd {
    Detached(DetachReport),
    VifGone {
        frames: u64,
        bytes: u64,
    },
    /// Asked to stop without releasing (SIGTERM): the program stays attached and keeps
    /// dropping (fail closed) until `remus-net detach`.
    StoppedHolding,
}

/// The holder's state (see the module docs).
pub(super) struct Holder {
    pub iface: String,
    pub ifindex: u32,
    pub loaded: Loaded,
    pub ring: AsyncFd<RingBuf<MapData>>,
    pub tap: Tap,
    pub queues: EpochQueues,
    pub nl: Netlink,
    pub kind: AttachKind,
    pub mode: Mode,
    pub ring_bytes: u32,
    pub release_errors: u64,
    pub unreleasable: u64,
    pub autocommit: Option<Duration>,
    pub run_dir: RunDir,
    pub pins: Pins,
}

impl Holder {
    /// Closes the open epoch and releases it at once (autocommit mode only).
    fn autocommit_now(&mut self) {
        if self.queues.epochs().is_empty() {
            return;
        }
        if let Ok(e) = self.checkpoint() {
            let _ = self.commit(e);
        }
    }

    /// Moves every record out of the ring into the queues; late frames leave at once.
    fn drain(&mut self) {
        let mut late: Vec<(FrameHdr, Vec<u8>)> = Vec::new();
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            // A malformed record cannot come from our program; if one ever does, it is
            // dropped and counted with the frames that could not be released.
            let Some(meta) = FrameHdr::from_bytes(&item) else {
                self.unreleasable += 1;
                continue;
            };
            let end = FRAME_HDR_LEN + meta.len as usize;
            if end > item.len() {
                self.unreleasable += 1;
                continue;
            }
            let bytes = &item[FRAME_HDR_LEN..end];
            if self.queues.push(meta, bytes) == Pushed::Late {
                late.push((meta, bytes.to_vec()));
            }
        }
        for (meta, mut bytes) in late {
            let n = bytes.len() as u64;
            self.send(&meta, &mut bytes);
            self.queues.count_late_release(n);
        }
    }

    fn send(&mut self, meta: &FrameHdr, bytes: &mut [u8]) {
        match epochs::prepare(meta, bytes) {
            Ok(p) => {
                if self
                    .tap
                    .send(&p.vnet.to_bytes(), bytes, p.vlan.as_ref())
                    .is_err()
                {
                    self.release_errors += 1;
                }
            }
            Err(_) => self.unreleasable += 1,
        }
    }

    fn release(&mut self, queues: Vec<EpochQueue>) -> Released {
        let mut r = Released::default();
        for mut q in queues {
            r.epoch = r.epoch.max(q.epoch);
            let frames = std::mem::take(&mut q.frames);
            for f in &frames {
                let end = f.off + f.meta.len as usize;
                let meta = f.meta;
                let (data, _) = q.data.split_at_mut(end);
                self.send(&meta, &mut data[f.off..]);
                r.frames += 1;
                r.bytes += meta.len as u64;
            }
        }
        r
    }

    fn set_mode(&mut self, mode: Mode) -> Result<(), NetError> {
        let v = match mode {
            Mode::Hold => MODE_HOLD,
            Mode::Passthrough => MODE_PASSTHROUGH,
        };
        self.loaded.set_control(CTL_MODE, v)?;
        self.mode = mode;
        Ok(())
    }

    fn checkpoint(&mut self) -> Result<u64, NetError> {
        // Stamp the next epoch first: from here on every frame belongs to it.
        self.loaded
            .set_control(CTL_EPOCH, self.queues.current() + 1)?;
        Ok(self.queues.checkpoint())
    }

    fn commit(&mut self, epoch: u64) -> Result<Released, NetError> {
        // Frames of epochs <= N still in the ring must go out with N.
        self.drain();
        let qs = self.queues.commit(epoch)?;
        let mut r = self.release(qs);
        r.epoch = epoch;
        Ok(r)
    }

    /// Releases everything held, then lets frames pass (backup lost, or detach
    /// --release). Held frames leave before pass-through starts, so order is kept except
    /// for frames in flight in the ring at the switch, which follow right after.
    fn fail_open(&mut self) -> Result<Released, NetError> {
        self.drain();
        let qs = self.queues.take_all();
        let mut r = self.release(qs);
        self.loaded.set_control(CTL_EPOCH, self.queues.current())?;
        self.set_mode(Mode::Passthrough)?;
        self.drain();
        let qs = self.queues.take_all();
        let r2 = self.release(qs);
        r.frames += r2.frames;
        r.bytes += r2.bytes;
        r.epoch = self.queues.committed();
        Ok(r)
    }

    pub fn status(&self) -> Result<Status, NetError> {
        let c = self.queues.counters();
        Ok(Status {
            iface: self.iface.clone(),
            ifindex: self.ifindex,
            mode: self.mode,
            attach_kind: self.kind,
            pid: std::process::id(),
            tap: self.tap.name().to_string(),
            current_epoch: self.queues.current(),
            committed_epoch: self.queues.committed(),
            held_frames: c.held_frames,
            held_bytes: c.held_bytes,
            limit_bytes: self.queues.limit_bytes(),
            ring_bytes: self.ring_bytes,
            epochs: self.queues.epochs(),
            holder: c,
            kernel: self.loaded.stats()?,
            release_errors: self.release_errors,
            unreleasable_frames: self.unreleasable,
            pins: Some(self.pins.clone()),
        })
    }

    async fn detach(&mut self, policy: DetachPolicy) -> Result<DetachReport, NetError> {
        let mut report = DetachReport {
            iface: self.iface.clone(),
            holder_was_alive: true,
            ..Default::default()
        };
        match policy {
            DetachPolicy::Release => {
                let r = self.fail_open()?;
                report.released_frames = r.frames;
                report.released_bytes = r.bytes;
            }
            DetachPolicy::Drop => {
                self.drain();
                let (f, b) = self.queues.drop_all();
                report.dropped_frames = f;
                report.dropped_bytes = b;
            }
        }
        report.notes = self.teardown().await?;
        Ok(report)
    }

    async fn teardown(&mut self) -> Result<Vec<String>, NetError> {
        let present = self.nl.ifindex(&self.iface).await.is_ok();
        let mut notes =
            datapath::teardown(&self.iface, self.loaded.pin_dir(), Some(self.kind), present)?;
        if present {
            notes
                .extend(super::attach::remove_clsact(&self.nl, &self.iface, Some(self.kind)).await);
        }
        self.run_dir.remove(&self.iface);
        notes.push(format!("removed helper tap {}", self.tap.name()));
        Ok(notes)
    }

    async fn handle(&mut self, req: Request) -> (Response, Option<HolderEnd>) {
        let res = match req {
            Request::Checkpoint => self.checkpoint().map(|epoch| Response::Epoch { epoch }),
            Request::Commit { epoch } => self.commit(epoch).map(Response::Released),
            Request::Status => self.status().map(|s| Response::Status(Box::new(s))),
            Request::SetMode { mode } => {
                let r = if mode == Mode::Passthrough {
                    self.fail_open().map(|_| ())
                } else {
                    self.set_mode(mode)
                };
                r.map(|()| Response::Ok)
            }
            Request::FailOpen => self.fail_open().map(Response::Released),
            Request::Detach { policy } => match self.detach(policy).await {
                Ok(rep) => {
                    return (
                        Response::Detached(rep.clone()),
                        Some(HolderEnd::Detached(rep)),
                    );
                }
                Err(e) => Err(e),
            },
        };
        (res.unwrap_or_else(|e| Response::error(&e)), None)
    }

    /// One look at the vif. Gone means: the name no longer resolves to our ifindex, seen
    /// twice in a row (a single odd netlink answer must not tear down a protected vif).
    async fn vif_gone(&mut self, missing_before: &mut bool) -> Option<HolderEnd> {
        let gone_now = match self.nl.ifindex(&self.iface).await {
            Ok(i) => i != self.ifindex,
            Err(NetlinkError::NoSuchInterface(_)) => true,
            Err(_) => false,
        };
        let gone = gone_now && std::mem::replace(missing_before, true);
        if !gone_now {
            *missing_before = false;
        }
        if !gone {
            return None;
        }
        tracing::warn!(iface = %self.iface, ifindex = self.ifindex, "the vif is gone");
        self.drain();
        let (frames, bytes) = self.queues.drop_all();
        let _ = self.teardown().await;
        Some(HolderEnd::VifGone { frames, bytes })
    }

    /// Answers one request; the last answer (detach) is written out before the end.
    async fn on_request(
        &mut self,
        req: Request,
        reply: oneshot::Sender<Reply>,
    ) -> Option<HolderEnd> {
        let (resp, ended) = self.handle(req).await;
        let Some(e) = ended else {
            let _ = reply.send(Reply {
                resp,
                written: None,
            });
            return None;
        };
        let (wtx, wrx) = oneshot::channel();
        let sent = reply.send(Reply {
            resp,
            written: Some(wtx),
        });
        if sent.is_ok() {
            // Err: the requester dropped the sender (in-process): nothing to wait for.
            let _ = tokio::time::timeout(Duration::from_secs(10), wrx).await;
        }
        Some(e)
    }
}

/// The holder's loop: ring, requests, connections, the vif watch, autocommit, SIGTERM.
pub(super) async fn run(
    mut h: Holder,
    mut rx: mpsc::Receiver<Cmd>,
    listener: UnixListener,
    tx: mpsc::Sender<Cmd>,
) -> Result<HolderEnd, NetError> {
    let mut vif_check = tokio::time::interval(Duration::from_millis(200));
    let mut vif_missing = false;
    let every = h.autocommit.filter(|d| !d.is_zero());
    let after_drain = h.autocommit.is_some_and(|d| d.is_zero());
    let mut auto = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
    auto.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io_err("installing the SIGTERM handler"))?;
    loop {
        tokio::select! {
            guard = h.ring.readable_mut() => {
                let mut g = guard.map_err(io_err("waiting on the ring"))?;
                g.clear_ready();
                drop(g);
                h.drain();
                if after_drain {
                    h.autocommit_now();
                }
            }
            Some(Cmd::Req(req, reply)) = rx.recv() => {
                if let Some(e) = h.on_request(req, reply).await {
                    return Ok(e);
                }
            }
            conn = listener.accept() => {
                if let Ok((stream, _)) = conn {
                    tokio::spawn(serve_conn(stream, tx.clone()));
                }
            }
            _ = vif_check.tick() => {
                if let Some(e) = h.vif_gone(&mut vif_missing).await {
                    return Ok(e);
                }
            }
            _ = auto.tick(), if every.is_some() => h.autocommit_now(),
            _ = term.recv() => {
                h.drain();
                return Ok(HolderEnd::StoppedHolding);
            }
        }
    }
}

/// Serves one client connection: a request line in, an answer line out, until it closes.
async fn serve_conn(stream: UnixStream, tx: mpsc::Sender<Cmd>) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match control::decode_request(&line) {
            Ok(req) => {
                let (otx, orx) = oneshot::channel();
                if tx.send(Cmd::Req(req, otx)).await.is_err() {
                    break;
                }
                match orx.await {
                    Ok(r) => r,
                    Err(_) => break,
                }
            }
            Err(resp) => Reply {
                resp,
                written: None,
            },
        };
        let out = control::encode(&reply.resp);
        let ok = w.write_all(out.as_bytes()).await.is_ok() && w.flush().await.is_ok();
        if let Some(done) = reply.written {
            let _ = done.send(());
        }
        if !ok {
            break;
        }
    }
}

/// In-process handle on a running holder (what `remus relay send` and the foreground
/// `remus-net attach` use). Dropping it does not detach.
#[derive(Clone)]
pub struct LocalBuffer {
    pub(super) iface: String,
    pub(super) tx: mpsc::Sender<Cmd>,
}

impl LocalBuffer {
    pub fn iface(&self) -> &str {
        &self.iface
    }

    pub async fn request(&self, req: Request) -> Result<Response, NetError> {
        let (otx, orx) = oneshot::channel();
        self.tx
            .send(Cmd::Req(req, otx))
            .await
            .map_err(|_| NetError::Stopped(self.iface.clone()))?;
        orx.await
            .map(|r| r.resp)
            .map_err(|_| NetError::Stopped(self.iface.clone()))
    }
}

/// The running holder task: await it to learn why it ended.
pub struct Running {
    pub buffer: LocalBuffer,
    pub task: tokio::task::JoinHandle<Result<HolderEnd, NetError>>,
    pub status: Status,
}

/// Starts the holder task on the current runtime.
pub(super) fn spawn(h: Holder, listener: UnixListener) -> Result<Running, NetError> {
    let status = h.status()?;
    let iface = h.iface.clone();
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(run(h, rx, listener, tx.clone()));
    Ok(Running {
        buffer: LocalBuffer { iface, tx },
        task,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake holder end of the channel: answers every request with `answer`.
    fn fake_holder(answer: Response) -> mpsc::Sender<Cmd> {
        let (tx, mut rx) = mpsc::channel::<Cmd>(4);
        tokio::spawn(async move {
            while let Some(Cmd::Req(_, reply)) = rx.recv().await {
                let _ = reply.send(Reply {
                    resp: answer.clone(),
                    written: None,
                });
            }
        });
        tx
    }

    #[tokio::test]
    async fn a_connection_gets_one_answer_per_request_line_and_bad_lines_are_answered() {
        let tx = fake_holder(Response::Epoch { epoch: 9 });
        let (client, server) = UnixStream::pair().expect("socketpair");
        tokio::spawn(serve_conn(server, tx));
        let (r, mut w) = client.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"op\":\"checkpoint\"}\nnonsense\n")
            .await
            .expect("write");
        let first = lines.next_line().await.expect("read").expect("a line");
        let second = lines.next_line().await.expect("read").expect("a line");
        assert!(matches!(
            control::decode_response("v", &first),
            Ok(Response::Epoch { epoch: 9 })
        ));
        match control::decode_response("v", &second) {
            Ok(Response::Error { kind, .. }) => assert_eq!(kind, control::ErrorKind::BadRequest),
            other => panic!("expected a bad-request answer, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_local_buffer_whose_holder_ended_reports_stopped() {
        let (tx, rx) = mpsc::channel::<Cmd>(1);
        drop(rx);
        let lb = LocalBuffer {
            iface: "vif7.0".into(),
            tx,
        };
        match lb.request(Request::Status).await {
            Err(NetError::Stopped(i)) => assert_eq!(i, "vif7.0"),
            other => panic!("expected Stopped, got {other:?}"),
        }
    }
}
