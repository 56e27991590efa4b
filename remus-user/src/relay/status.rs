//! `remus relay status`: asks the relays on this host for their state.
//!
//! Owns: finding the relays' status sockets under /run/remus/ and printing what they
//! say. Never touches: the relays themselves (read-only, one line of JSON per socket).
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;

use super::{RUN_DIR, RelayStatus};

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
    let mut o = format!("relay {} (pid {}): {}\n", s.role, s.pid, s.state);
    let line = |o: &mut String, k: &str, v: String| o.push_str(&format!("  {k:<22}{v}\n"));
    line(
        &mut o,
        if s.role == "send" { "backup" } else { "listen" },
        s.address.clone(),
    );
    if let Some(p) = &s.peer {
        line(&mut o, "peer", p.clone());
    }
    if let Some(v) = &s.vif {
        line(&mut o, "vif", v.clone());
    }
    if let (Some(v), Some(c)) = (s.protocol_version, &s.compression) {
        line(&mut o, "protocol", format!("v{v}, compression {c}"));
    }
    line(
        &mut o,
        "checkpoint",
        format!("{} complete, {} acked", s.last_checkpoint, s.last_acked),
    );
    if s.role == "send" {
        line(&mut o, "committed epoch", s.committed_epoch.to_string());
        line(&mut o, "epoch merges", s.epoch_merges_total.to_string());
    }
    line(&mut o, "stream bytes", s.stream_bytes_total.to_string());
    line(&mut o, "wire bytes", s.wire_bytes_total.to_string());
    if s.page_data_wire_bytes_total > 0 {
        line(
            &mut o,
            "page data ratio",
            format!(
                "{:.1}x",
                s.page_data_raw_bytes_total as f64 / s.page_data_wire_bytes_total as f64
            ),
        );
    }
    if let Some(q) = s.ack_latency_recent_us {
        line(
            &mut o,
            "ack latency",
            format!(
                "median {} us, p99 {} us, max {} us (last {})",
                q.p50, q.p99, q.max, q.n
            ),
        );
    }
    line(
        &mut o,
        "heartbeats missed",
        s.heartbeats_missed_total.to_string(),
    );
    line(&mut o, "failovers", s.failovers_total.to_string());
    if s.auth_failures_total > 0 {
        line(
            &mut o,
            "refused connections",
            s.auth_failures_total.to_string(),
        );
    }
    if let Some(e) = &s.last_event {
        line(&mut o, "last event", e.clone());
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

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
            role: "send".into(),
            state: "replicating".into(),
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
    }
}
