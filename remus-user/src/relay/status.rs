//! The relays' status: the state words and counters behind each relay's root-only
//! status socket, and `remus relay status`, which asks those sockets.
//!
//! Owns: [`RelayState`] and [`RelayStatus`] (the JSON, whose keys and state strings are
//! stable: scripts and the lab read them), the socket that answers with one line of JSON,
//! finding the sockets under /run/remus/ and rendering what they say. Never touches: the
//! relays' work (read-only, one line of JSON per socket).
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::RUN_DIR;
use crate::checkpoint::hypervisor::SuspendReport;
use crate::compress::Codec;
use crate::metrics::{Metrics, Quantiles};

/// What a relay end is doing. The serialised names are the stable `state` strings of
/// `remus relay status -j`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayState {
    #[default]
    #[serde(rename = "starting")]
    Starting,
    /// Primary: connecting and authenticating to the backup.
    #[serde(rename = "connecting")]
    Connecting,
    /// Primary: authenticated, waiting for the backup's receiver to print its banner.
    #[serde(rename = "waiting for the backup's receiver")]
    WaitingForReceiver,
    /// Either end: checkpoints flow.
    #[serde(rename = "replicating")]
    Replicating,
    /// Primary: xl closed the stream and the backup was told.
    #[serde(rename = "stream ended")]
    StreamEnded,
    /// Primary: the backup was lost; the buffer passes traffic, the guest is unprotected.
    #[serde(rename = "backup lost, buffer open")]
    BackupLost,
    /// Backup: listening, no primary connected.
    #[serde(rename = "waiting for primary")]
    WaitingForPrimary,
    /// Backup: a primary authenticated; the receiver command is starting.
    #[serde(rename = "starting the receiver")]
    StartingReceiver,
    /// Backup: the primary finished a plain migration.
    #[serde(rename = "finished")]
    Finished,
    /// Backup: the receiver's stream was closed after the last complete checkpoint.
    #[serde(rename = "failed over")]
    FailedOver,
    /// Backup: the session is over; the receiver process is being waited for.
    #[serde(rename = "waiting for the receiver to exit")]
    WaitingForReceiverExit,
    /// Protection ended on request, no failover. Backup: the receiver was killed before
    /// its stream ended and the copy destroyed. Primary: the backup confirmed that, and
    /// the buffer passes traffic.
    #[serde(rename = "discarded")]
    Discarded,
    /// Primary: asked to end protection; waiting for the backup to discard its copy.
    #[serde(rename = "ending protection")]
    EndingProtection,
}

impl RelayState {
    /// The state as `remus relay status` prints it (the same words as the JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            RelayState::Starting => "starting",
            RelayState::Connecting => "connecting",
            RelayState::WaitingForReceiver => "waiting for the backup's receiver",
            RelayState::Replicating => "replicating",
            RelayState::StreamEnded => "stream ended",
            RelayState::BackupLost => "backup lost, buffer open",
            RelayState::WaitingForPrimary => "waiting for primary",
            RelayState::StartingReceiver => "starting the receiver",
            RelayState::Finished => "finished",
            RelayState::FailedOver => "failed over",
            RelayState::WaitingForReceiverExit => "waiting for the receiver to exit",
            RelayState::Discarded => "discarded",
            RelayState::EndingProtection => "ending protection",
        }
    }
}

impl std::fmt::Display for RelayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which end a relay is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Send,
    Receive,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Send => "send",
            Role::Receive => "receive",
        }
    }
}

/// How the backup's last session ended (typed: code decides on it, `last_event` says it
/// in words).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "end", rename_all = "snake_case")]
pub enum SessionEnd {
    /// A plain migration finished: the receiver got the whole stream.
    Finished { checkpoints: u64 },
    /// The receiver's stream was closed after `checkpoint`: libxl activates the copy
    /// (`checkpoint` 0: it had no usable one).
    FailedOver {
        checkpoint: u64,
        reason: crate::checkpoint::LossKind,
    },
    /// The primary ended protection: the receiver was killed before its stream ended,
    /// so nothing was activated; `copy_destroyed`: the discard command succeeded.
    Discarded {
        checkpoint: u64,
        copy_destroyed: bool,
    },
    /// The receiver exited on its own while its stream was still open: nothing was
    /// activated (libxl activates only on the stream's end), no failover happened.
    ReceiverEnded {
        checkpoint: u64,
        code: Option<i32>,
        signal: Option<i32>,
    },
}

/// What `remus relay status` shows for one end (JSON keys are stable).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RelayStatus {
    pub role: Role,
    pub pid: u32,
    pub state: RelayState,
    /// The other end (host:port) when connected.
    pub peer: Option<String>,
    /// Listen address (receive) or backup address (send).
    pub address: String,
    /// The first protected vif (kept for scripts); `vifs` has them all.
    pub vif: Option<String>,
    /// Every vif whose output is held, in the order they are cut and released.
    #[serde(default)]
    pub vifs: Vec<String>,
    pub protocol_version: Option<u16>,
    pub compression: Option<Codec>,
    pub last_checkpoint: u64,
    pub last_acked: u64,
    pub committed_epoch: u64,
    pub checkpoints_total: u64,
    pub acks_total: u64,
    pub stream_bytes_total: u64,
    pub wire_bytes_total: u64,
    pub page_data_raw_bytes_total: u64,
    pub page_data_wire_bytes_total: u64,
    pub epoch_merges_total: u64,
    pub heartbeats_missed_total: u64,
    pub failovers_total: u64,
    #[serde(default)]
    pub discards_total: u64,
    #[serde(default)]
    pub probes_total: u64,
    pub auth_failures_total: u64,
    pub ack_latency_mean_us: Option<f64>,
    /// Exact quantiles over the last `metrics::RECENT_ACKS` ACKs.
    pub ack_latency_recent_us: Option<Quantiles>,
    /// Cumulative ACK latency histogram: `{le_us, count}` per bucket.
    pub ack_latency_buckets_us: Vec<LatencyBucket>,
    /// Per-checkpoint phases (`metrics::Phases`), exact quantiles over the last
    /// `metrics::RECENT_ACKS` checkpoints: the guest's pause as the relay sees it (first
    /// post-suspend byte to the end of libxc's CHECKPOINT record), the transfer (to the
    /// last byte on the connection), the backup writing it into its receiver, the ACK
    /// (from the last byte on the connection), the release (the buffer's commit). The
    /// backup fills only `backup_write_recent_us`.
    #[serde(default)]
    pub pause_recent_us: Option<Quantiles>,
    #[serde(default)]
    pub transfer_recent_us: Option<Quantiles>,
    #[serde(default)]
    pub backup_write_recent_us: Option<Quantiles>,
    #[serde(default)]
    pub ack_recent_us: Option<Quantiles>,
    #[serde(default)]
    pub release_recent_us: Option<Quantiles>,
    pub last_event: Option<String>,
    /// Backup: how the last session ended.
    #[serde(default)]
    pub last_session: Option<SessionEnd>,
    /// The guest's pause per checkpoint, milliseconds: the median of `pause_recent_us`
    /// (send only; absent until a checkpoint was timed).
    #[serde(default)]
    pub guest_pause_ms: Option<f64>,
    /// Send: how long xl's pipe was kept at one page (waiting for suspends), in all.
    #[serde(default)]
    pub xl_pipe_narrow_ms: f64,
    pub since_unix: u64,
    /// Send with `--domain`: how the guest is suspended and how long that takes.
    #[serde(default)]
    pub suspend: Option<SuspendStatus>,
    /// The replicated disks (`--disk`), in the order they are cut.
    #[serde(default)]
    pub disks: Vec<DiskState>,
}

/// One replicated disk as a relay end drives it (`relay status -j`, key `disks`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    /// The disk daemon's control socket.
    pub socket: String,
    /// The daemon's `--name`.
    pub name: String,
    /// Send: the last epoch cut (= checkpoint).
    pub last_cut: u64,
    /// Receive: the last epoch found durable in the journal before its ACK.
    pub last_durable: u64,
    /// Receive: the last epoch committed (applied) after its ACK.
    pub last_committed: u64,
    /// Receive: the checkpoint the disk failed over to.
    pub failed_over: Option<u64>,
    /// The last failure on this disk, if any.
    pub error: Option<String>,
}

/// The protected domain's suspend path and timings (`relay send --domain`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SuspendStatus {
    /// What xenstore said (domain, domid, guest_type, device_model, path, warning); absent
    /// if it could not be asked (`error` says why).
    pub report: Option<SuspendReport>,
    /// How the timings are measured, or why they cannot be.
    pub timing: String,
    /// Suspends measured from request to suspended.
    pub measured: u64,
    pub last_request_to_suspended_us: Option<u64>,
    pub last_request_to_ack_us: Option<u64>,
    pub mean_request_to_suspended_us: Option<f64>,
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct LatencyBucket {
    pub le_us: f64,
    pub count: u64,
}

/// The live state behind a status socket: metrics plus a few words.
#[derive(Debug)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    info: Mutex<RelayStatus>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Shared {
    pub fn new(role: Role, address: String, vif: Option<String>) -> Arc<Shared> {
        Arc::new(Shared {
            metrics: Arc::new(Metrics::new(role.as_str())),
            info: Mutex::new(RelayStatus {
                role,
                pid: std::process::id(),
                state: RelayState::Starting,
                address,
                vif,
                since_unix: now_unix(),
                ..Default::default()
            }),
        })
    }

    /// Updates the status (and notes the time).
    pub fn set(&self, f: impl FnOnce(&mut RelayStatus)) {
        if let Ok(mut g) = self.info.lock() {
            f(&mut g);
            g.since_unix = now_unix();
        }
    }

    /// Updates counters-like fields without marking a change of state (`since_unix`).
    pub fn set_quietly(&self, f: impl FnOnce(&mut RelayStatus)) {
        if let Ok(mut g) = self.info.lock() {
            f(&mut g);
        }
    }

    /// Updates the state of disk `i` (no-op for an unknown index).
    pub fn set_disk(&self, i: usize, f: impl FnOnce(&mut DiskState)) {
        self.set_quietly(|s| {
            if let Some(d) = s.disks.get_mut(i) {
                f(d)
            }
        });
    }

    /// Moves to `state`.
    pub fn enter(&self, state: RelayState) {
        self.set(|s| s.state = state);
    }

    pub fn state(&self) -> RelayState {
        self.info.lock().map(|g| g.state).unwrap_or_default()
    }

    pub fn snapshot(&self) -> RelayStatus {
        let mut s = self.info.lock().map(|g| g.clone()).unwrap_or_default();
        let m = &self.metrics;
        s.last_checkpoint = m.last_checkpoint.get();
        s.last_acked = m.last_acked_checkpoint.get();
        s.committed_epoch = m.committed_epoch.get();
        s.checkpoints_total = m.checkpoints_total.get();
        s.acks_total = m.acks_total.get();
        s.stream_bytes_total = m.stream_bytes_total.get();
        s.wire_bytes_total = m.wire_bytes_total.get();
        s.page_data_raw_bytes_total = m.page_data_raw_bytes_total.get();
        s.page_data_wire_bytes_total = m.page_data_wire_bytes_total.get();
        s.epoch_merges_total = m.epoch_merges_total.get();
        s.xl_pipe_narrow_ms = m.xl_pipe_narrow().as_secs_f64() * 1e3;
        s.heartbeats_missed_total = m.heartbeats_missed_total.get();
        s.failovers_total = m.failovers_total.get();
        s.discards_total = m.discards_total.get();
        s.probes_total = m.probes_total.get();
        s.auth_failures_total = m.auth_failures_total.get();
        let h = &m.ack_latency_seconds;
        let n = h.count();
        s.ack_latency_recent_us = m.ack_quantiles();
        s.ack_latency_buckets_us = h
            .cumulative()
            .into_iter()
            .map(|(le, count)| LatencyBucket {
                le_us: le * 1e6,
                count,
            })
            .collect();
        s.ack_latency_mean_us = (n > 0).then(|| h.sum().as_secs_f64() * 1e6 / n as f64);
        let p = &m.checkpoint;
        s.pause_recent_us = p.pause.recent.quantiles();
        s.transfer_recent_us = p.transfer.recent.quantiles();
        s.backup_write_recent_us = p.backup_write.recent.quantiles();
        s.ack_recent_us = p.ack.recent.quantiles();
        s.release_recent_us = p.release.recent.quantiles();
        s.guest_pause_ms = s.pause_recent_us.map(|q| f64::from(q.p50) / 1e3);
        if let Some(sus) = &mut s.suspend {
            let h = &m.suspend_seconds;
            let n = h.count();
            sus.measured = n;
            sus.mean_request_to_suspended_us =
                (n > 0).then(|| h.sum().as_secs_f64() * 1e6 / n as f64);
        }
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusSocketError {
    #[error("creating the status socket {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
}

/// Binds a root-only (0600) unix socket at `path` that answers every connection with
/// one line of JSON (the current [`RelayStatus`]). The socket file is removed on drop of
/// the returned guard.
pub fn serve_status(path: &Path, shared: Arc<Shared>) -> Result<StatusGuard, StatusSocketError> {
    let l = bind_root_only(path, "--status-socket").map_err(|source| StatusSocketError::Bind {
        path: path.display().to_string(),
        source,
    })?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let mut line = serde_json::to_string(&shared.snapshot()).unwrap_or_default();
            line.push('\n');
            let _ = s.write_all(line.as_bytes()).await;
        }
    });
    Ok(StatusGuard {
        path: path.to_path_buf(),
        task,
    })
}

/// Binds a root-only (0600) unix socket at `path`, creating its directory (0700) if
/// needed. A stale socket of a dead relay is replaced; a live one (it accepts) is not
/// stolen: the error names `flag`, the option that picks another path.
pub(super) fn bind_root_only(path: &Path, flag: &str) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another relay is serving this socket; pick another {flag}"),
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Removes the status socket when the relay ends.
pub struct StatusGuard {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StatusGuard {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no relay is running on this host (no {RUN_DIR}/relay-*.sock)")]
    NoneRunning,
    #[error("asking {path}: {source}")]
    Query {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} answered something that is not a relay status: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
}

/// The status sockets of running relays (sorted).
pub fn sockets(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("relay-") && n.ends_with(".sock"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Asks one relay.
pub async fn query(path: &Path) -> Result<RelayStatus, StatusError> {
    let p = path.display().to_string();
    let q = |source| StatusError::Query {
        path: p.clone(),
        source,
    };
    let mut s = tokio::net::UnixStream::connect(path).await.map_err(q)?;
    let mut out = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(2),
        s.read_to_string(&mut out),
    )
    .await
    .map_err(|_| {
        q(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer within 2 s",
        ))
    })?
    .map_err(q)?;
    serde_json::from_str(out.trim()).map_err(|source| StatusError::Parse { path: p, source })
}

/// Human-readable form of one status.
pub fn render(s: &RelayStatus) -> String {
    let mut o = format!("relay {} (pid {}): {}\n", s.role.as_str(), s.pid, s.state);
    render_peers(&mut o, s);
    render_progress(&mut o, s);
    render_latencies(&mut o, s);
    render_failures(&mut o, s);
    if let Some(sus) = &s.suspend {
        render_suspend(&mut o, sus);
    }
    for d in &s.disks {
        let mut v = if s.role == Role::Send {
            format!("cut {}", d.last_cut)
        } else {
            format!("durable {}, committed {}", d.last_durable, d.last_committed)
        };
        if let Some(f) = d.failed_over {
            v.push_str(&format!(", failed over to {f}"));
        }
        if let Some(e) = &d.error {
            v.push_str(&format!(" (error: {e})"));
        }
        line(&mut o, &format!("disk {}", d.name), v);
    }
    if let Some(e) = &s.last_event {
        line(&mut o, "last event", e.clone());
    }
    o
}

/// One indented `name value` line of the human view.
fn line(o: &mut String, k: &str, v: String) {
    o.push_str(&format!("  {k:<22}{v}\n"));
}

/// Where the relay talks: its address, its peer, its vifs, the protocol agreed on.
fn render_peers(o: &mut String, s: &RelayStatus) {
    let address = if s.role == Role::Send {
        "backup"
    } else {
        "listen"
    };
    line(o, address, s.address.clone());
    if let Some(p) = &s.peer {
        line(o, "peer", p.clone());
    }
    if s.vifs.len() > 1 {
        line(o, "vifs", s.vifs.join(", "));
    } else if let Some(v) = &s.vif {
        line(o, "vif", v.clone());
    }
    if let (Some(v), Some(c)) = (s.protocol_version, &s.compression) {
        line(o, "protocol", format!("v{v}, compression {c}"));
    }
}

/// How far the stream got: checkpoints, epochs, bytes and the page data ratio.
fn render_progress(o: &mut String, s: &RelayStatus) {
    line(
        o,
        "checkpoint",
        format!("{} complete, {} acked", s.last_checkpoint, s.last_acked),
    );
    if s.role == Role::Send {
        line(o, "committed epoch", s.committed_epoch.to_string());
        line(o, "epoch merges", s.epoch_merges_total.to_string());
    }
    line(o, "stream bytes", s.stream_bytes_total.to_string());
    line(o, "wire bytes", s.wire_bytes_total.to_string());
    if s.page_data_wire_bytes_total > 0 {
        line(
            o,
            "page data ratio",
            format!(
                "{:.1}x",
                s.page_data_raw_bytes_total as f64 / s.page_data_wire_bytes_total as f64
            ),
        );
    }
}

/// The ACK latency and each checkpoint phase over the recent window, where measured.
fn render_latencies(o: &mut String, s: &RelayStatus) {
    for (name, q) in [
        ("ack latency", s.ack_latency_recent_us),
        ("guest pause", s.pause_recent_us),
        ("transfer", s.transfer_recent_us),
        ("backup write", s.backup_write_recent_us),
        ("ack (from wire)", s.ack_recent_us),
        ("release", s.release_recent_us),
    ] {
        if let Some(q) = q {
            line(
                o,
                name,
                format!(
                    "median {} us, p99 {} us, max {} us (last {})",
                    q.p50, q.p99, q.max, q.n
                ),
            );
        }
    }
}

/// What went wrong so far: missed heartbeats, failovers, discards, refusals.
fn render_failures(o: &mut String, s: &RelayStatus) {
    line(
        o,
        "heartbeats missed",
        s.heartbeats_missed_total.to_string(),
    );
    line(o, "failovers", s.failovers_total.to_string());
    if s.discards_total > 0 {
        line(o, "discards", s.discards_total.to_string());
    }
    if s.auth_failures_total > 0 {
        line(o, "refused connections", s.auth_failures_total.to_string());
    }
}

fn render_suspend(o: &mut String, sus: &SuspendStatus) {
    let mut line = |k: &str, v: String| line(o, k, v);
    match &sus.report {
        Some(r) => {
            line(
                "domain",
                format!(
                    "{} (id {}, {:?}{})",
                    r.domain,
                    r.domid,
                    r.guest_type,
                    if r.device_model { ", device model" } else { "" }
                ),
            );
            line("suspend path", r.path.describe().to_string());
            if let Some(w) = &r.warning {
                line("WARNING", w.clone());
            }
        }
        None => line(
            "suspend path",
            format!("unknown: {}", sus.error.as_deref().unwrap_or("not asked")),
        ),
    }
    match (
        sus.mean_request_to_suspended_us,
        sus.last_request_to_suspended_us,
    ) {
        (Some(mean), Some(last)) => line(
            "suspend time",
            format!(
                "mean {:.1} ms, last {:.1} ms over {} suspends (request to suspended)",
                mean / 1e3,
                last as f64 / 1e3,
                sus.measured
            ),
        ),
        _ => line("suspend time", sus.timing.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_strings_are_the_stable_json_words() {
        // Scripts, tests and the benchmark read these exact strings.
        for (state, word) in [
            (RelayState::Starting, "starting"),
            (RelayState::Connecting, "connecting"),
            (
                RelayState::WaitingForReceiver,
                "waiting for the backup's receiver",
            ),
            (RelayState::Replicating, "replicating"),
            (RelayState::StreamEnded, "stream ended"),
            (RelayState::BackupLost, "backup lost, buffer open"),
            (RelayState::WaitingForPrimary, "waiting for primary"),
            (RelayState::StartingReceiver, "starting the receiver"),
            (RelayState::Finished, "finished"),
            (RelayState::FailedOver, "failed over"),
            (
                RelayState::WaitingForReceiverExit,
                "waiting for the receiver to exit",
            ),
            (RelayState::Discarded, "discarded"),
            (RelayState::EndingProtection, "ending protection"),
        ] {
            let json = serde_json::to_value(state).unwrap();
            assert_eq!(json, serde_json::Value::String(word.into()));
            assert_eq!(state.as_str(), word);
            assert_eq!(serde_json::from_value::<RelayState>(json).unwrap(), state);
        }
        assert_eq!(serde_json::to_value(Role::Receive).unwrap(), "receive");
        assert_eq!(serde_json::to_value(Some(Codec::Lz4)).unwrap(), "lz4");
        // How a session ended is tagged by a stable word too.
        let v = serde_json::to_value(SessionEnd::Discarded {
            checkpoint: 3,
            copy_destroyed: true,
        })
        .unwrap();
        assert_eq!(v["end"], "discarded");
        let v = serde_json::to_value(SessionEnd::ReceiverEnded {
            checkpoint: 2,
            code: None,
            signal: Some(9),
        })
        .unwrap();
        assert_eq!(v["end"], "receiver_ended");
    }

    #[tokio::test]
    async fn status_socket_answers_json_and_is_root_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("relay.sock");
        let shared = Shared::new(Role::Receive, "127.0.0.1:7788".into(), None);
        shared.metrics.failovers_total.inc();
        shared.enter(RelayState::WaitingForPrimary);
        let guard = serve_status(&path, shared.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let st = query(&path).await.unwrap();
        assert_eq!(st.role, Role::Receive);
        assert_eq!(st.state, RelayState::WaitingForPrimary);
        assert_eq!(st.failovers_total, 1);
        // The raw line carries the stable words.
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["state"], "waiting for primary");
        assert_eq!(v["role"], "receive");
        // A second relay cannot steal a live socket.
        assert!(serve_status(&path, shared).is_err());
        drop(guard);
        assert!(!path.exists());
    }

    #[test]
    fn finds_only_relay_sockets() {
        let d = tempfile::tempdir().unwrap();
        for n in [
            "relay-send-vif5.0.sock",
            "relay-receive-7788.sock",
            "vif5.0.sock",
            "relay-x.txt",
        ] {
            std::fs::write(d.path().join(n), "").unwrap();
        }
        let names: Vec<String> = sockets(d.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["relay-receive-7788.sock", "relay-send-vif5.0.sock"]);
    }

    #[test]
    fn renders_the_essentials() {
        let s = RelayStatus {
            role: Role::Send,
            state: RelayState::Replicating,
            address: "backup:7788".into(),
            last_checkpoint: 12,
            last_acked: 11,
            epoch_merges_total: 1,
            ..Default::default()
        };
        let t = render(&s);
        assert!(t.contains("replicating"), "{t}");
        assert!(t.contains("12 complete, 11 acked"), "{t}");
        assert!(t.contains("epoch merges"), "{t}");
        assert!(!t.contains("guest pause"), "no pause measured yet: {t}");
    }

    #[test]
    fn the_phases_reach_status_as_quantiles_under_their_stable_keys() {
        let shared = Shared::new(Role::Send, "backup:7788".into(), None);
        let p = &shared.metrics.checkpoint;
        p.pause.observe(std::time::Duration::from_millis(30));
        p.release.observe(std::time::Duration::from_micros(80));
        let v = serde_json::to_value(shared.snapshot()).unwrap();
        assert_eq!(v["pause_recent_us"]["p50"], 30_000);
        assert_eq!(v["pause_recent_us"]["n"], 1);
        assert_eq!(v["release_recent_us"]["max"], 80);
        assert!(v["transfer_recent_us"].is_null());
        assert!(render(&shared.snapshot()).contains("guest pause"));
    }
}
