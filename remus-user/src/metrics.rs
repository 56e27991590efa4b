//! The relay's counters and their Prometheus text exposition (format 0.0.4), served on an
//! opt-in loopback address.
//!
//! Owns: the metric values, their names and base units, a minimal HTTP responder.
//! Never touches: anything it measures (callers update the values).
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 100e-3, 200e-3, 500e-3,
    1.0,
];

/// A latency histogram with fixed buckets (cumulative on output, as Prometheus wants).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| s <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
    /// (upper bound in seconds, cumulative count) per bucket, +Inf excluded.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut cum = 0;
        LATENCY_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(&b, c)| {
                cum += c.load(Ordering::Relaxed);
                (b, cum)
            })
            .collect()
    }
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed))
    }
}

/// How many recent ACK latencies are kept for exact quantiles.
pub const RECENT_ACKS: usize = 4096;

/// Exact quantiles of the recent ACK latencies, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Quantiles {
    pub n: usize,
    pub p50: u32,
    pub p90: u32,
    pub p99: u32,
    pub max: u32,
}

/// Every metric of one relay end. `role` is "send" or "receive" (a label on each line).
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
    pub page_bytes_raw_total: Counter,
    pub page_bytes_wire_total: Counter,
    /// From the last byte of a checkpoint sent to its ACK.
    pub ack_latency: Histogram,
    /// The last RECENT_ACKS ACK latencies in microseconds, for exact quantiles.
    recent_acks: std::sync::Mutex<std::collections::VecDeque<u32>>,
    pub epoch_merges_total: Counter,
    pub heartbeats_sent_total: Counter,
    pub heartbeats_missed_total: Counter,
    /// Backup: receiver stdin closed on a lost primary. Primary: backup lost.
    pub failovers_total: Counter,
    pub sessions_total: Counter,
    pub auth_failures_total: Counter,
    pub connected: Gauge,
    pub last_checkpoint: Gauge,
    pub last_acked: Gauge,
    pub committed_epoch: Gauge,
}

impl Metrics {
    pub fn new(role: &'static str) -> Metrics {
        Metrics {
            role,
            checkpoints_total: Counter::default(),
            acks_total: Counter::default(),
            stream_bytes_total: Counter::default(),
            wire_bytes_total: Counter::default(),
            page_bytes_raw_total: Counter::default(),
            page_bytes_wire_total: Counter::default(),
            ack_latency: Histogram::default(),
            recent_acks: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(
                RECENT_ACKS,
            )),
            epoch_merges_total: Counter::default(),
            heartbeats_sent_total: Counter::default(),
            heartbeats_missed_total: Counter::default(),
            failovers_total: Counter::default(),
            sessions_total: Counter::default(),
            auth_failures_total: Counter::default(),
            connected: Gauge::default(),
            last_checkpoint: Gauge::default(),
            last_acked: Gauge::default(),
            committed_epoch: Gauge::default(),
        }
    }

    /// Records one ACK latency (histogram and the recent window).
    pub fn observe_ack(&self, d: Duration) {
        self.ack_latency.observe(d);
        if let Ok(mut r) = self.recent_acks.lock() {
            if r.len() == RECENT_ACKS {
                r.pop_front();
            }
            r.push_back(d.as_micros().min(u32::MAX as u128) as u32);
        }
    }

    /// Exact quantiles over the recent window (`None` before the first ACK).
    pub fn ack_quantiles(&self) -> Option<Quantiles> {
        let mut v: Vec<u32> = self.recent_acks.lock().ok()?.iter().copied().collect();
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

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let role = self.role;
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{role=\"{role}\"}} {v}"
            );
        };
        one(
            "remus_relay_checkpoints_total",
            "counter",
            "Checkpoints seen complete in the stream.",
            self.checkpoints_total.get(),
        );
        one(
            "remus_relay_acks_total",
            "counter",
            "Checkpoints acknowledged by the backup.",
            self.acks_total.get(),
        );
        one(
            "remus_relay_stream_bytes_total",
            "counter",
            "Migration stream bytes relayed, as xl wrote them.",
            self.stream_bytes_total.get(),
        );
        one(
            "remus_relay_wire_bytes_total",
            "counter",
            "Bytes on the replication connection, framing included.",
            self.wire_bytes_total.get(),
        );
        one(
            "remus_relay_page_data_raw_bytes_total",
            "counter",
            "PAGE_DATA record bytes before compression.",
            self.page_bytes_raw_total.get(),
        );
        one(
            "remus_relay_page_data_wire_bytes_total",
            "counter",
            "PAGE_DATA record bytes after compression.",
            self.page_bytes_wire_total.get(),
        );
        one(
            "remus_relay_epoch_merges_total",
            "counter",
            "Epochs merged into the next because the switch could not be proven in time.",
            self.epoch_merges_total.get(),
        );
        one(
            "remus_relay_heartbeats_sent_total",
            "counter",
            "Heartbeats sent.",
            self.heartbeats_sent_total.get(),
        );
        one(
            "remus_relay_heartbeats_missed_total",
            "counter",
            "Heartbeat intervals that passed without hearing from the peer.",
            self.heartbeats_missed_total.get(),
        );
        one(
            "remus_relay_failovers_total",
            "counter",
            "Peers lost (backup: receiver's stream closed for failover; primary: backup lost, buffer opened).",
            self.failovers_total.get(),
        );
        one(
            "remus_relay_sessions_total",
            "counter",
            "Authenticated sessions.",
            self.sessions_total.get(),
        );
        one(
            "remus_relay_auth_failures_total",
            "counter",
            "Connections refused at the handshake.",
            self.auth_failures_total.get(),
        );
        one(
            "remus_relay_connected",
            "gauge",
            "1 while a peer is connected and authenticated.",
            self.connected.get(),
        );
        one(
            "remus_relay_last_checkpoint",
            "gauge",
            "Number of the last complete checkpoint.",
            self.last_checkpoint.get(),
        );
        one(
            "remus_relay_last_acked_checkpoint",
            "gauge",
            "Number of the last acknowledged checkpoint.",
            self.last_acked.get(),
        );
        one(
            "remus_relay_committed_epoch",
            "gauge",
            "Highest epoch released by the output buffer.",
            self.committed_epoch.get(),
        );
        let name = "remus_relay_ack_latency_seconds";
        let _ = writeln!(
            o,
            "# HELP {name} From the last byte of a checkpoint sent to its ACK.\n# TYPE {name} histogram"
        );
        let mut cum = 0;
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            cum += self.ack_latency.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(o, "{name}_bucket{{role=\"{role}\",le=\"{b}\"}} {cum}");
        }
        let count = self.ack_latency.count();
        let _ = writeln!(o, "{name}_bucket{{role=\"{role}\",le=\"+Inf\"}} {count}");
        let _ = writeln!(
            o,
            "{name}_sum{{role=\"{role}\"}} {}",
            self.ack_latency.sum().as_secs_f64()
        );
        let _ = writeln!(o, "{name}_count{{role=\"{role}\"}} {count}");
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
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let m = m.clone();
            tokio::spawn(async move {
                // Read the request head (bounded); its content does not matter.
                let mut req = [0u8; 2048];
                let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut req)).await;
                let body = m.render();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_is_well_formed() {
        let m = Metrics::new("send");
        m.checkpoints_total.add(3);
        m.ack_latency.observe(Duration::from_micros(150));
        m.ack_latency.observe(Duration::from_secs(3));
        let t = m.render();
        assert!(
            t.contains("remus_relay_checkpoints_total{role=\"send\"} 3\n"),
            "{t}"
        );
        assert!(
            t.contains("remus_relay_ack_latency_seconds_bucket{role=\"send\",le=\"0.0002\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("remus_relay_ack_latency_seconds_bucket{role=\"send\",le=\"+Inf\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("remus_relay_ack_latency_seconds_count{role=\"send\"} 2\n"),
            "{t}"
        );
        // Every sample line is `name{labels} value`.
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').expect("value");
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
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
        assert_eq!(m.ack_latency.count(), 100);
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
        assert!(
            out.contains("remus_relay_failovers_total{role=\"receive\"} 1"),
            "{out}"
        );
    }
}
