//! `remus relay send|receive|status`: the two ends of the checkpoint transport that makes
//! stock `xl remus` safe (DESIGN.md, "Checkpoints and epochs with stock xl remus").
//!
//! Owns: joining xl's pipes, the replication connection and the output buffer; the
//! backup's receiver process; the status sockets. Never touches: the wire format itself
//! (`replication`), the stream grammar (`stream`), the epoch rules (`checkpoint`), the
//! kernel (`netbuf` does that).
//!
//! ```text
//!  xl remus ─pipe─► relay send ══TCP══► relay receive ─pipe─► xl migrate-receive -r -e
//!     ▲              │  ▲                     │
//!     └── banner ────┘  └──── ACK(N) ◄────────┘  (after all of checkpoint N is written)
//! ```
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::metrics::Metrics;

pub mod receive;
pub mod send;
pub mod status;

/// Directory of the root-only status sockets (shared with remus-net).
pub const RUN_DIR: &str = "/run/remus";
/// What xl migrate-receive prints before it reads anything (54 bytes).
pub const BANNER: &[u8] = b"xl migration receiver ready, send binary domain data.\n";
/// Defaults shared by both ends.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);
pub const MIN_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(100);
/// Page records up to this size are (de)compressed on the runtime thread; bigger ones
/// on a blocking thread, so heartbeats never wait for them.
pub const INLINE_CODEC_BYTES: usize = 256 * 1024;
/// PFN cache for the XOR base of page compression (pages; 4 KiB each, both ends).
pub const DEFAULT_CACHE_PAGES: u32 = 262_144;

#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error("--heartbeat-timeout {0:?} is below the minimum of 100ms")]
    TimeoutTooShort(Duration),
    #[error(
        "--heartbeat-interval {interval:?} must be at most half of --heartbeat-timeout {timeout:?}"
    )]
    IntervalTooLong {
        interval: Duration,
        timeout: Duration,
    },
}

/// Heartbeat settings, checked.
#[derive(Clone, Copy, Debug)]
pub struct Heartbeat {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Heartbeat {
    pub fn new(interval: Duration, timeout: Duration) -> Result<Heartbeat, HeartbeatError> {
        if timeout < MIN_HEARTBEAT_TIMEOUT {
            return Err(HeartbeatError::TimeoutTooShort(timeout));
        }
        if interval.is_zero() || interval * 2 > timeout {
            return Err(HeartbeatError::IntervalTooLong { interval, timeout });
        }
        Ok(Heartbeat { interval, timeout })
    }
}

/// How long to wait for the next frame before looking at the silence again: two
/// heartbeat intervals (one missed heartbeat is counted then), but never past the
/// timeout, so a silent peer is declared lost right when the timeout expires.
pub(crate) fn silence_check(hb: &Heartbeat, since: std::time::Instant) -> Duration {
    (hb.interval * 2)
        .min(hb.timeout.saturating_sub(since.elapsed()))
        .max(Duration::from_millis(1))
}

/// Called when `silence_check` elapsed with no frame: counts a missed heartbeat after two
/// silent intervals, and returns how long the peer has been silent once that reaches the
/// timeout (the peer is lost then). Shared by both relay ends.
pub(crate) fn judge_silence(
    hb: &Heartbeat,
    since: std::time::Instant,
    m: &crate::metrics::Metrics,
) -> Option<Duration> {
    let silent = since.elapsed();
    if silent >= hb.interval * 2 {
        m.heartbeats_missed_total.inc();
    }
    (silent >= hb.timeout).then_some(silent)
}

/// Parses "200ms", "1s", "1.5s", "250" (milliseconds) for the CLI.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1e-3)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 200ms, 1s)"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("`{s}` is not a duration (e.g. 200ms, 1s)"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// What `remus relay status` shows for one end (JSON keys are stable).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct RelayStatus {
    pub role: String,
    pub pid: u32,
    /// "connecting", "replicating", "waiting for primary", "failed over", "backup lost", ...
    pub state: String,
    /// The other end (host:port) when connected.
    pub peer: Option<String>,
    /// Listen address (receive) or backup address (send).
    pub address: String,
    pub vif: Option<String>,
    pub protocol_version: Option<u16>,
    pub compression: Option<String>,
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
    pub auth_failures_total: u64,
    pub ack_latency_mean_us: Option<f64>,
    /// Exact quantiles over the last `metrics::RECENT_ACKS` ACKs.
    pub ack_latency_recent_us: Option<crate::metrics::Quantiles>,
    /// Cumulative ACK latency histogram: `{le_us, count}` per bucket.
    pub ack_latency_buckets_us: Vec<LatencyBucket>,
    pub last_event: Option<String>,
    pub since_unix: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize)]
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
    pub fn new(role: &'static str, address: String, vif: Option<String>) -> Arc<Shared> {
        Arc::new(Shared {
            metrics: Arc::new(Metrics::new(role)),
            info: Mutex::new(RelayStatus {
                role: role.to_string(),
                pid: std::process::id(),
                state: "starting".into(),
                address,
                vif,
                since_unix: now_unix(),
                ..Default::default()
            }),
        })
    }

    /// Updates the state words (and notes the time).
    pub fn set(&self, f: impl FnOnce(&mut RelayStatus)) {
        if let Ok(mut g) = self.info.lock() {
            f(&mut g);
            g.since_unix = now_unix();
        }
    }

    pub fn snapshot(&self) -> RelayStatus {
        let mut s = self.info.lock().map(|g| g.clone()).unwrap_or_default();
        let m = &self.metrics;
        s.last_checkpoint = m.last_checkpoint.get();
        s.last_acked = m.last_acked.get();
        s.committed_epoch = m.committed_epoch.get();
        s.checkpoints_total = m.checkpoints_total.get();
        s.acks_total = m.acks_total.get();
        s.stream_bytes_total = m.stream_bytes_total.get();
        s.wire_bytes_total = m.wire_bytes_total.get();
        s.page_data_raw_bytes_total = m.page_bytes_raw_total.get();
        s.page_data_wire_bytes_total = m.page_bytes_wire_total.get();
        s.epoch_merges_total = m.epoch_merges_total.get();
        s.heartbeats_missed_total = m.heartbeats_missed_total.get();
        s.failovers_total = m.failovers_total.get();
        s.auth_failures_total = m.auth_failures_total.get();
        let n = m.ack_latency.count();
        s.ack_latency_recent_us = m.ack_quantiles();
        s.ack_latency_buckets_us = m
            .ack_latency
            .cumulative()
            .into_iter()
            .map(|(le, count)| LatencyBucket {
                le_us: le * 1e6,
                count,
            })
            .collect();
        s.ack_latency_mean_us = (n > 0).then(|| m.ack_latency.sum().as_secs_f64() * 1e6 / n as f64);
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
    use std::os::unix::fs::PermissionsExt;
    let err = |source| StatusSocketError::Bind {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    // A stale socket of a dead relay: remove it (a live one answers; refuse to steal it).
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another relay is serving this socket; pick another --status-socket",
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = tokio::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
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

/// Turns an address or a name into a safe file-name component.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The write side of a relay connection: frames from `rx` in order, a heartbeat every
/// `interval` (so the peer hears us even while xl or the receiver is slow), each sealed
/// with `sealer`, a flush whenever nothing more is queued. A write error is reported
/// through `lost`.
pub(crate) fn spawn_writer<W>(
    w: W,
    sealer: crate::replication::Sealer,
    mut rx: tokio::sync::mpsc::Receiver<crate::replication::Message>,
    interval: Duration,
    m: Arc<Metrics>,
    lost: Arc<tokio::sync::watch::Sender<Option<String>>>,
) -> tokio::task::JoinHandle<()>
where
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use crate::replication::{HEADER_LEN, Message};
    tokio::spawn(async move {
        let mut w = tokio::io::BufWriter::with_capacity(256 * 1024, w);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        let mut buf = Vec::with_capacity(HEADER_LEN + 64 * 1024);
        loop {
            let msg = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = tick.tick() => {
                    seq += 1;
                    m.heartbeats_sent_total.inc();
                    Message::Heartbeat { seq }
                }
            };
            buf.clear();
            if let Err(e) = sealer.encode(&msg, &mut buf) {
                lost.send_replace(Some(format!("sealing a frame failed: {e}")));
                return;
            }
            m.wire_bytes_total.add(buf.len() as u64);
            let r = async {
                w.write_all(&buf).await?;
                if rx.is_empty() {
                    w.flush().await?;
                }
                Ok::<_, std::io::Error>(())
            }
            .await;
            if let Err(e) = r {
                lost.send_replace(Some(format!("sending to the peer failed: {e}")));
                return;
            }
        }
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn silence_is_checked_every_two_intervals_and_at_the_timeout() {
        let hb = Heartbeat::new(Duration::from_millis(100), Duration::from_millis(1000)).unwrap();
        let now = std::time::Instant::now();
        assert!(silence_check(&hb, now) <= Duration::from_millis(200));
        assert!(silence_check(&hb, now) > Duration::from_millis(150));
        let long_ago = now - Duration::from_millis(900);
        assert!(silence_check(&hb, long_ago) <= Duration::from_millis(100));
        let past = now - Duration::from_secs(5);
        assert_eq!(silence_check(&hb, past), Duration::from_millis(1));
    }

    #[test]
    fn heartbeat_limits() {
        assert!(Heartbeat::new(Duration::from_millis(50), Duration::from_millis(100)).is_ok());
        assert!(matches!(
            Heartbeat::new(Duration::from_millis(20), Duration::from_millis(99)),
            Err(HeartbeatError::TimeoutTooShort(_))
        ));
        assert!(matches!(
            Heartbeat::new(Duration::from_millis(600), Duration::from_secs(1)),
            Err(HeartbeatError::IntervalTooLong { .. })
        ));
    }

    #[tokio::test]
    async fn status_socket_answers_json_and_is_root_only() {
        use std::os::unix::fs::PermissionsExt;
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("relay.sock");
        let shared = Shared::new("receive", "127.0.0.1:7788".into(), None);
        shared.metrics.failovers_total.inc();
        shared.set(|s| s.state = "waiting for primary".into());
        let guard = serve_status(&path, shared.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let st: RelayStatus = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(st.role, "receive");
        assert_eq!(st.state, "waiting for primary");
        assert_eq!(st.failovers_total, 1);
        // A second relay cannot steal a live socket.
        assert!(serve_status(&path, shared).is_err());
        drop(guard);
        assert!(!path.exists());
    }
}
