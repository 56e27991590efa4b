//! The relay's metrics: values in a `prometheus-client` registry, exposed in the
//! OpenMetrics text format on an opt-in loopback address.
//!
//! Owns: the metric values, their names (`remus_relay_*`, base units, `_total` on
//! counters), the ACK-latency histogram and the per-checkpoint phase histograms with
//! their recent windows, a minimal HTTP responder. Never touches: anything it measures
//! (callers update the values).
//!
//! The registry and the text encoding are the official crate's. The ACK-latency histogram
//! keeps its own atomic buckets (encoded through the crate's `EncodeMetric`), because the
//! crate's histogram does not let `remus relay status` read its buckets back. The HTTP
//! responder is a few lines on tokio: one loopback route, no need for a server crate.
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter as PromCounter;
use prometheus_client::metrics::gauge::Gauge as PromGauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A monotonically increasing count (`inc`, `inc_by`, `get`).
pub type Counter = PromCounter<u64, AtomicU64>;
/// A value that goes up and down (`set`, `get`).
pub type Gauge = PromGauge<u64, AtomicU64>;

/// Upper bounds (seconds) of the latency histogram buckets (a guest pause or a transfer
/// under emulation takes seconds, an ACK over loopback tens of microseconds).
pub const LATENCY_BUCKETS: [f64; 17] = [
    50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 100e-3, 200e-3, 500e-3,
    1.0, 2.0, 5.0, 10.0,
];

/// The exposition's content type (OpenMetrics text, what `prometheus-client` encodes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Default)]
struct HistogramCells {
    /// Per bucket (not cumulative); the last cell is the +Inf overflow.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// A latency histogram with fixed buckets that can be read back (for the status socket).
#[derive(Clone, Debug, Default)]
pub struct Histogram(Arc<HistogramCells>);

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.0.count.fetch_add(1, Ordering::Relaxed);
        self.0
            .sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }
    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }
    /// (upper bound in seconds, cumulative count) per bucket, +Inf excluded.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut cum = 0;
        LATENCY_BUCKETS
            .iter()
            .zip(&self.0.buckets)
            .map(|(&b, c)| {
                cum += c.load(Ordering::Relaxed);
                (b, cum)
            })
            .collect()
    }
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.0.sum_ns.load(Ordering::Relaxed))
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.0.buckets)
            .map(|(b, c)| (b, c.load(Ordering::Relaxed)))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(
            self.sum().as_secs_f64(),
            self.count(),
            &buckets,
            None,
        )
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// How many recent ACK latencies (and phase durations) are kept for exact quantiles.
pub const RECENT_ACKS: usize = 4096;

/// The last [`RECENT_ACKS`] durations in microseconds, for exact quantiles.
#[derive(Debug, Default)]
pub struct Recent(std::sync::Mutex<std::collections::VecDeque<u32>>);

impl Recent {
    pub fn push(&self, d: Duration) {
        if let Ok(mut r) = self.0.lock() {
            if r.len() == RECENT_ACKS {
                r.pop_front();
            }
            r.push_back(d.as_micros().min(u32::MAX as u128) as u32);
        }
    }

    /// Exact quantiles over the window (`None` while it is empty).
    pub fn quantiles(&self) -> Option<Quantiles> {
        let mut v: Vec<u32> = self.0.lock().ok()?.iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let q = |f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
        Some(Quantiles {
            n: v.len(),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: v[v.len() - 1],
        })
    }
}

/// One phase of a checkpoint: a histogram for Prometheus and a recent window for status.
#[derive(Debug, Default)]
pub struct Timed {
    pub histogram: Histogram,
    pub recent: Recent,
}

impl Timed {
    pub fn observe(&self, d: Duration) {
        self.histogram.observe(d);
        self.recent.push(d);
    }
}

/// Where one checkpoint's time goes (Cloud Hypervisor's downtime accounting, per phase),
/// as the relay sees it. On the primary: `pause` from the first byte xl wrote after the
/// suspend to the end of libxc's CHECKPOINT record (the guest resumes right after that
/// write returns), `transfer` from that first byte to the checkpoint's last byte written
/// to the connection, `ack` from there to its ACK, `backup_write` as the backup reported
/// it (writing the checkpoint into its receiver), `release` the buffer's commit. On the
/// backup only `backup_write`.
#[derive(Debug, Default)]
pub struct Phases {
    pub pause: Timed,
    pub transfer: Timed,
    pub backup_write: Timed,
    pub ack: Timed,
    pub release: Timed,
}

/// Exact quantiles of the recent ACK latencies, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Quantiles {
    pub n: usize,
    pub p50: u32,
    pub p90: u32,
    pub p99: u32,
    pub max: u32,
}

/// Every metric of one relay end. `role` ("send" or "receive") labels each series. A
/// field's name is its exposed name without the `remus_relay_` prefix (and is the JSON key
/// of `remus relay status`), so each metric has one name.
#[derive(Debug)]
pub struct Metrics {
    pub role: &'static str,
    /// Checkpoints seen complete in the stream.
    pub checkpoints_total: Counter,
    /// Checkpoints the backup acknowledged (send) or acknowledged itself (receive).
    pub acks_total: Counter,
    /// Stream bytes (as xl wrote them / as written to the receiver).
    pub stream_bytes_total: Counter,
    /// Bytes on the wire, frame headers included.
    pub wire_bytes_total: Counter,
    /// PAGE_DATA record bytes before and after compression.
    pub page_data_raw_bytes_total: Counter,
    pub page_data_wire_bytes_total: Counter,
    /// From the last byte of a checkpoint sent to its ACK.
    pub ack_latency_seconds: Histogram,
    /// The last RECENT_ACKS ACK latencies in microseconds, for exact quantiles.
    recent_acks: Recent,
    /// Per-checkpoint phases (`remus_relay_checkpoint_<phase>_seconds`).
    pub checkpoint: Phases,
    pub epoch_merges_total: Counter,
    pub heartbeats_sent_total: Counter,
    pub heartbeats_missed_total: Counter,
    /// Backup: receiver stdin closed on a lost primary. Primary: backup lost.
    pub failovers_total: Counter,
    /// Protections ended on request without a failover. Backup: copy discarded (receiver
    /// killed). Primary: the backup confirmed it, the buffer was opened.
    pub discards_total: Counter,
    /// Backup: probes answered (a primary checked the key; no session).
    pub probes_total: Counter,
    pub sessions_total: Counter,
    pub auth_failures_total: Counter,
    pub connected: Gauge,
    pub last_checkpoint: Gauge,
    pub last_acked_checkpoint: Gauge,
    pub committed_epoch: Gauge,
    /// Send with `--domain`: from libxl's suspend request to the domain suspended, as
    /// xenstore shows it (xenstore control path only).
    pub suspend_seconds: Histogram,
    /// Send: time xl's pipe spent narrow (µs; `relay status` only, not exported).
    xl_pipe_narrow_us: AtomicU64,
    registry: Registry,
}

impl Metrics {
    pub fn new(role: &'static str) -> Metrics {
        let mut m = Metrics {
            role,
            checkpoints_total: Counter::default(),
            acks_total: Counter::default(),
            stream_bytes_total: Counter::default(),
            wire_bytes_total: Counter::default(),
            page_data_raw_bytes_total: Counter::default(),
            page_data_wire_bytes_total: Counter::default(),
            ack_latency_seconds: Histogram::default(),
            recent_acks: Recent::default(),
            checkpoint: Phases::default(),
            epoch_merges_total: Counter::default(),
            heartbeats_sent_total: Counter::default(),
            heartbeats_missed_total: Counter::default(),
            failovers_total: Counter::default(),
            discards_total: Counter::default(),
            probes_total: Counter::default(),
            sessions_total: Counter::default(),
            auth_failures_total: Counter::default(),
            connected: Gauge::default(),
            last_checkpoint: Gauge::default(),
            last_acked_checkpoint: Gauge::default(),
            committed_epoch: Gauge::default(),
            suspend_seconds: Histogram::default(),
            xl_pipe_narrow_us: AtomicU64::new(0),
            registry: Registry::with_prefix_and_labels(
                "remus_relay",
                [(Cow::Borrowed("role"), Cow::Borrowed(role))].into_iter(),
            ),
        };
        m.register();
        m
    }

    /// Counts `d` more of xl's pipe at one page (the relay's pipe sizing).
    pub fn add_xl_pipe_narrow(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.xl_pipe_narrow_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Time xl's pipe spent narrow so far (periods still open are not counted yet).
    pub fn xl_pipe_narrow(&self) -> Duration {
        Duration::from_micros(self.xl_pipe_narrow_us.load(Ordering::Relaxed))
    }

    /// Puts every value in the registry under its one name.
    fn register(&mut self) {
        self.register_counters();
        self.register_gauges();
        let r = &mut self.registry;
        r.register_with_unit(
            "ack_latency",
            "From the last byte of a checkpoint sent to its ACK",
            Unit::Seconds,
            self.ack_latency_seconds.clone(),
        );
        let p = &self.checkpoint;
        for (name, help, t) in [
            (
                "checkpoint_pause",
                "Guest pause per checkpoint as the relay sees it: first byte after the suspend to the end of libxc's CHECKPOINT record",
                &p.pause,
            ),
            (
                "checkpoint_transfer",
                "First byte after the suspend to the checkpoint's last byte written to the connection",
                &p.transfer,
            ),
            (
                "checkpoint_backup_write",
                "Writing a checkpoint into the backup's receiver (reported by the backup)",
                &p.backup_write,
            ),
            (
                "checkpoint_ack",
                "Checkpoint's last byte written to the connection to its ACK",
                &p.ack,
            ),
            (
                "checkpoint_release",
                "Releasing an acknowledged epoch (the output buffer's commit)",
                &p.release,
            ),
        ] {
            r.register_with_unit(name, help, Unit::Seconds, t.histogram.clone());
        }
        r.register_with_unit(
            "suspend",
            "From libxl's suspend request to the domain suspended (xenstore control path)",
            Unit::Seconds,
            self.suspend_seconds.clone(),
        );
    }

    fn register_counters(&mut self) {
        let r = &mut self.registry;
        for (name, help, c) in [
            (
                "checkpoints",
                "Checkpoints seen complete in the stream",
                &self.checkpoints_total,
            ),
            (
                "acks",
                "Checkpoints acknowledged by the backup",
                &self.acks_total,
            ),
            (
                "epoch_merges",
                "Epochs merged into the next because the cut could not be proven in time",
                &self.epoch_merges_total,
            ),
            (
                "heartbeats_sent",
                "Heartbeats sent",
                &self.heartbeats_sent_total,
            ),
            (
                "heartbeats_missed",
                "Heartbeat intervals that passed without hearing from the peer",
                &self.heartbeats_missed_total,
            ),
            (
                "failovers",
                "Peers lost (backup: receiver's stream closed for failover; primary: backup lost, buffer opened)",
                &self.failovers_total,
            ),
            (
                "discards",
                "Protections ended on request without a failover (backup: copy discarded; primary: the backup confirmed, buffer opened)",
                &self.discards_total,
            ),
            (
                "probes",
                "Probes answered (the key checked, no session started)",
                &self.probes_total,
            ),
            ("sessions", "Authenticated sessions", &self.sessions_total),
            (
                "auth_failures",
                "Connections refused at the handshake",
                &self.auth_failures_total,
            ),
        ] {
            r.register(name, help, c.clone());
        }
        for (name, help, c) in [
            (
                "stream",
                "Migration stream bytes relayed, as xl wrote them",
                &self.stream_bytes_total,
            ),
            (
                "wire",
                "Bytes on the replication connection, framing included",
                &self.wire_bytes_total,
            ),
            (
                "page_data_raw",
                "PAGE_DATA record bytes before compression",
                &self.page_data_raw_bytes_total,
            ),
            (
                "page_data_wire",
                "PAGE_DATA record bytes after compression",
                &self.page_data_wire_bytes_total,
            ),
        ] {
            r.register_with_unit(name, help, Unit::Bytes, c.clone());
        }
    }

    fn register_gauges(&mut self) {
        let r = &mut self.registry;
        for (name, help, g) in [
            (
                "connected",
                "1 while a peer is connected and authenticated",
                &self.connected,
            ),
            (
                "last_checkpoint",
                "Number of the last complete checkpoint",
                &self.last_checkpoint,
            ),
            (
                "last_acked_checkpoint",
                "Number of the last acknowledged checkpoint",
                &self.last_acked_checkpoint,
            ),
            (
                "committed_epoch",
                "Highest epoch released by the output buffer",
                &self.committed_epoch,
            ),
        ] {
            r.register(name, help, g.clone());
        }
    }

    /// Records one ACK latency (histogram and the recent window).
    pub fn observe_ack(&self, d: Duration) {
        self.ack_latency_seconds.observe(d);
        self.recent_acks.push(d);
    }

    /// Exact quantiles over the recent window (`None` before the first ACK).
    pub fn ack_quantiles(&self) -> Option<Quantiles> {
        self.recent_acks.quantiles()
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn render(&self) -> String {
        let mut o = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut o, &self.registry);
        o
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics address {0} is not a loopback address: metrics are served on loopback only")]
    NotLoopback(SocketAddr),
    #[error("binding the metrics address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds `addr` (loopback only) and serves `GET /metrics` (any path, in fact) forever.
pub async fn serve(
    addr: SocketAddr,
    m: Arc<Metrics>,
) -> Result<tokio::task::JoinHandle<()>, MetricsError> {
    if !addr.ip().is_loopback() {
        return Err(MetricsError::NotLoopback(addr));
    }
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(answer(s, m.clone()));
        }
    }))
}

/// One scrape: read the request head (bounded; its content does not matter), answer.
async fn answer(mut s: tokio::net::TcpStream, m: Arc<Metrics>) {
    let mut req = [0u8; 2048];
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut req)).await;
    let body = m.render();
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body.as_bytes()).await;
    let _ = s.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_is_well_formed() {
        let m = Metrics::new("send");
        m.checkpoints_total.inc_by(3);
        m.page_data_raw_bytes_total.inc_by(4096);
        m.committed_epoch.set(7);
        m.ack_latency_seconds.observe(Duration::from_micros(150));
        m.ack_latency_seconds.observe(Duration::from_secs(3));
        m.checkpoint.pause.observe(Duration::from_millis(40));
        let t = m.render();
        for line in [
            "remus_relay_checkpoints_total{role=\"send\"} 3\n",
            "remus_relay_page_data_raw_bytes_total{role=\"send\"} 4096\n",
            "remus_relay_committed_epoch{role=\"send\"} 7\n",
            "remus_relay_ack_latency_seconds_bucket{role=\"send\",le=\"0.0002\"} 1\n",
            "remus_relay_ack_latency_seconds_bucket{role=\"send\",le=\"+Inf\"} 2\n",
            "remus_relay_ack_latency_seconds_count{role=\"send\"} 2\n",
            "# TYPE remus_relay_ack_latency_seconds histogram\n",
            "# TYPE remus_relay_checkpoint_pause_seconds histogram\n",
            "# TYPE remus_relay_checkpoint_transfer_seconds histogram\n",
            "# TYPE remus_relay_checkpoint_backup_write_seconds histogram\n",
            "# TYPE remus_relay_checkpoint_ack_seconds histogram\n",
            "# TYPE remus_relay_checkpoint_release_seconds histogram\n",
            "remus_relay_checkpoint_pause_seconds_count{role=\"send\"} 1\n",
            "# TYPE remus_relay_suspend_seconds histogram\n",
        ] {
            assert!(t.contains(line), "missing {line:?} in\n{t}");
        }
        assert!(t.ends_with("# EOF\n"), "{t}");
        // Every sample line is `name{labels} value`, every name has the one prefix, and
        // each metric is described once.
        let mut described = std::collections::HashSet::new();
        for line in t.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(described.insert(name.to_string()), "{name} twice");
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            assert!(line.starts_with("remus_relay_"), "{line}");
            let (_, v) = line.rsplit_once(' ').expect("value");
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
        // The names are a stable interface (docs/metrics.md): exactly these, no more.
        let expected: std::collections::HashSet<String> = [
            "checkpoints",
            "acks",
            "epoch_merges",
            "heartbeats_sent",
            "heartbeats_missed",
            "failovers",
            "discards",
            "probes",
            "sessions",
            "auth_failures",
            "stream_bytes",
            "wire_bytes",
            "page_data_raw_bytes",
            "page_data_wire_bytes",
            "connected",
            "last_checkpoint",
            "last_acked_checkpoint",
            "committed_epoch",
            "ack_latency_seconds",
            "suspend_seconds",
            "checkpoint_pause_seconds",
            "checkpoint_transfer_seconds",
            "checkpoint_backup_write_seconds",
            "checkpoint_ack_seconds",
            "checkpoint_release_seconds",
        ]
        .iter()
        .map(|n| format!("remus_relay_{n}"))
        .collect();
        assert_eq!(described, expected, "{t}");
    }

    #[test]
    fn ack_quantiles_are_exact_over_the_window() {
        let m = Metrics::new("send");
        assert_eq!(m.ack_quantiles(), None);
        for us in 1..=100u64 {
            m.observe_ack(Duration::from_micros(us));
        }
        let q = m.ack_quantiles().unwrap();
        assert_eq!((q.n, q.p50, q.p99, q.max), (100, 51, 99, 100));
        assert_eq!(m.ack_latency_seconds.count(), 100);
    }

    #[test]
    fn a_phase_feeds_its_histogram_and_its_window() {
        let m = Metrics::new("send");
        assert_eq!(m.checkpoint.pause.recent.quantiles(), None);
        for ms in [10u64, 20, 30] {
            m.checkpoint.pause.observe(Duration::from_millis(ms));
        }
        let q = m.checkpoint.pause.recent.quantiles().unwrap();
        assert_eq!((q.n, q.p50, q.max), (3, 20_000, 30_000));
        assert_eq!(m.checkpoint.pause.histogram.count(), 3);
        assert_eq!(
            m.checkpoint.pause.histogram.sum(),
            Duration::from_millis(60)
        );
        // Seconds-long phases land in the long buckets, not in +Inf.
        m.checkpoint.transfer.observe(Duration::from_secs(4));
        let cum = m.checkpoint.transfer.histogram.cumulative();
        assert_eq!(cum.last(), Some(&(10.0, 1)));
    }

    #[tokio::test]
    async fn non_loopback_is_refused() {
        let m = Arc::new(Metrics::new("send"));
        let e = serve("0.0.0.0:0".parse().unwrap(), m).await.unwrap_err();
        assert!(matches!(e, MetricsError::NotLoopback(_)));
    }

    #[tokio::test]
    async fn serves_over_loopback() {
        let m = Arc::new(Metrics::new("receive"));
        m.failovers_total.inc();
        // Find a free port, then serve on it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let _h = serve(addr, m).await.unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.contains(CONTENT_TYPE), "{out}");
        assert!(
            out.contains("remus_relay_failovers_total{role=\"receive\"} 1"),
            "{out}"
        );
    }
}
