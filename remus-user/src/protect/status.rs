//! `remus status [DOMAIN] [-j]`: both ends of every protection this host takes part in,
//! as a table or JSON.
//!
//! Owns: gathering rows from the state files of `remus protect` / `remus backup`, the
//! relays' status sockets and the buffer's control socket, and printing them. Never
//! touches: any of them beyond asking (read-only).
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::relay::RelayStatus;

use super::host;
use super::state::{self, BackupState, Phase, ProtectState};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Backup,
}

/// One row (JSON keys are stable).
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub domain: String,
    pub role: Role,
    /// Words: "protected", "initial copy", "backup lost: UNPROTECTED", "replicating", …
    pub state: String,
    /// Primary rows: the supervisor's phase.
    pub phase: Option<Phase>,
    /// The supervising process (`remus protect`) or the relay (`remus backup`) runs.
    pub running: bool,
    pub pid: Option<u32>,
    pub last_acked: Option<u64>,
    pub checkpoints_per_s: Option<f64>,
    /// The guest's pause per checkpoint, as the relay reports it (`guest_pause_ms` of
    /// its status); null while it does not measure it.
    pub pause_ms: Option<f64>,
    pub held_frames: Option<u64>,
    pub held_bytes: Option<u64>,
    pub vif: Option<String>,
    /// Primary rows: the backup's address.
    pub backup: Option<String>,
    /// Backup rows: where it listens, and the primary connected now.
    pub listen: Option<String>,
    pub peer: Option<String>,
    pub detail: Option<String>,
    /// Primary rows, once ended: the vif's output held, open, or unknown.
    pub output: Option<super::run::Output>,
    /// The relay's own status (`remus relay status -j`), when it answered.
    pub relay: Option<RelayStatus>,
}

async fn relay(sock: &Path) -> Option<RelayStatus> {
    crate::relay::status::query(sock).await.ok()
}

/// Frames and bytes the buffer on `vif` holds now (its control socket; None if no answer).
pub async fn held(vif: &str) -> Option<(u64, u64)> {
    tokio::time::timeout(Duration::from_secs(1), async {
        let mut b = crate::netbuf::RemoteBuffer::connect(vif).await.ok()?;
        match b.request(crate::netbuf::Request::Status).await.ok()? {
            crate::netbuf::Response::Status(s) => Some((s.held_frames, s.held_bytes)),
            _ => None,
        }
    })
    .await
    .ok()
    .flatten()
}

/// Frames and bytes held on all of `vifs` together; None if none of them answered.
pub async fn held_all(vifs: &[String]) -> Option<(u64, u64)> {
    let mut total: Option<(u64, u64)> = None;
    for v in vifs {
        if let Some((f, b)) = held(v).await {
            let (tf, tb) = total.unwrap_or((0, 0));
            total = Some((tf + f, tb + b));
        }
    }
    total
}

/// The primary row of one `remus protect` state file, refreshed from the live relay.
pub async fn primary_row(s: ProtectState) -> Row {
    let running = host::protect_pid_matches(s.pid);
    let mut row = Row {
        domain: s.domain.clone(),
        role: Role::Primary,
        state: s.phase.words().to_string(),
        phase: Some(s.phase),
        running,
        pid: Some(s.pid),
        last_acked: Some(s.last_acked),
        checkpoints_per_s: s.checkpoints_per_s,
        pause_ms: None,
        held_frames: s.held_frames,
        held_bytes: s.held_bytes,
        vif: Some(s.all_vifs().join(",")),
        backup: Some(s.backup.clone()),
        listen: None,
        peer: None,
        detail: s.detail.clone(),
        output: s.output,
        relay: None,
    };
    if !running && !s.phase.is_final() {
        let xl = s
            .xl_pid
            .filter(|p| host::pid_alive(*p))
            .map_or("its xl remus is gone too".to_string(), |p| {
                format!("its xl remus (pid {p}) still runs, unsupervised")
            });
        row.state = "supervisor gone".into();
        row.detail = Some(format!(
            "remus protect (pid {}) ended without recording why (killed?); {xl}",
            s.pid
        ));
        row.checkpoints_per_s = None;
    }
    if !s.phase.is_final() {
        if let Some(r) = relay(&s.relay_socket).await {
            row.last_acked = Some(r.last_acked);
            row.pause_ms = r.guest_pause_ms;
            row.relay = Some(r);
        }
        if let Some((f, b)) = held_all(&s.all_vifs()).await {
            row.held_frames = Some(f);
            row.held_bytes = Some(b);
        }
    }
    row
}

/// The backup row of one `remus backup` state file. The rate is measured here, over
/// `sample` (the backup has no supervisor keeping one).
pub async fn backup_row(b: BackupState, sample: Duration) -> Row {
    let running = host::pid_alive(b.pid)
        && host::cmdline(b.pid).is_some_and(|a| a.iter().any(|x| x == "receive"));
    let mut row = Row {
        domain: b.domain.clone(),
        role: Role::Backup,
        state: if running {
            "no answer".into()
        } else {
            "not running".into()
        },
        phase: None,
        running,
        pid: Some(b.pid),
        last_acked: None,
        checkpoints_per_s: None,
        pause_ms: None,
        held_frames: None,
        held_bytes: None,
        vif: None,
        backup: None,
        listen: Some(b.listen.clone()),
        peer: None,
        detail: None,
        output: None,
        relay: None,
    };
    if !running {
        return row;
    }
    let t0 = Instant::now();
    if let Some(r0) = relay(&b.relay_socket).await {
        row.state = r0.state.to_string();
        row.peer = r0.peer.clone();
        row.last_acked = Some(r0.last_acked);
        row.detail = r0.last_event.clone();
        if r0.peer.is_some() && !sample.is_zero() {
            tokio::time::sleep(sample).await;
            if let Some(r1) = relay(&b.relay_socket).await {
                let dt = t0.elapsed().as_secs_f64();
                row.checkpoints_per_s =
                    Some(r1.acks_total.saturating_sub(r0.acks_total) as f64 / dt);
                row.last_acked = Some(r1.last_acked);
                row.relay = Some(r1);
            }
        } else {
            row.relay = Some(r0);
        }
    }
    row
}

/// Every row of this host (of `domain` only, if given).
pub async fn collect(dir: &Path, domain: Option<&str>, sample: Duration) -> Vec<Row> {
    let want = |d: &str| domain.is_none_or(|x| x == d);
    let mut rows = Vec::new();
    for s in state::list::<ProtectState>(dir, "protect-") {
        if want(&s.domain) {
            rows.push(primary_row(s).await);
        }
    }
    let backups: Vec<BackupState> = state::list(dir, "backup-");
    // Sample all backups in parallel: one second in total, not one per domain.
    let futs = backups
        .into_iter()
        .filter(|b| want(&b.domain))
        .map(|b| backup_row(b, sample));
    rows.extend(futures::future::join_all(futs).await);
    rows
}

fn bytes(n: u64) -> String {
    const U: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// The table (`remus status` without -j).
pub fn render(rows: &[Row]) -> String {
    let head = [
        "DOMAIN", "ROLE", "STATE", "ACKED", "CKPT/S", "PAUSE", "HELD", "PEER",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            let dash = || "-".to_string();
            [
                r.domain.clone(),
                match r.role {
                    Role::Primary => "primary".into(),
                    Role::Backup => "backup".into(),
                },
                r.state.clone(),
                r.last_acked.map_or_else(dash, |a| a.to_string()),
                r.checkpoints_per_s.map_or_else(dash, |c| format!("{c:.1}")),
                r.pause_ms.map_or_else(dash, |p| format!("{p:.0} ms")),
                match (r.held_frames, r.held_bytes) {
                    (Some(f), Some(b)) => format!("{f} ({})", bytes(b)),
                    _ => dash(),
                },
                match r.role {
                    Role::Primary => r.backup.clone().unwrap_or_else(dash),
                    Role::Backup => r
                        .peer
                        .clone()
                        .map(|p| {
                            format!("{p} (listening {})", r.listen.clone().unwrap_or_default())
                        })
                        .or_else(|| r.listen.clone().map(|l| format!("listening {l}")))
                        .unwrap_or_else(dash),
                },
            ]
        })
        .collect();
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for c in &cells {
        for (i, s) in c.iter().enumerate() {
            w[i] = w[i].max(s.chars().count());
        }
    }
    let line = |c: &[String]| {
        let mut s = String::new();
        for (i, x) in c.iter().enumerate() {
            if i + 1 == c.len() {
                s.push_str(x);
            } else {
                s.push_str(&format!("{x:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&head.map(String::from));
    for (r, c) in rows.iter().zip(&cells) {
        out.push_str(&line(c));
        if let Some(d) = &r.detail {
            out.push_str(&format!("  {}: {d}\n", r.domain));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary(phase: Phase) -> ProtectState {
        ProtectState {
            domain: "web".into(),
            domid: 3,
            pid: std::process::id(),
            xl_pid: None,
            vif: "vif3.0".into(),
            vifs: vec![],
            backup: "b:7788".into(),
            interval_ms: 200,
            phase,
            detail: None,
            started_unix: 0,
            since_unix: 0,
            last_acked: 42,
            checkpoints_per_s: Some(2.7),
            held_frames: Some(3),
            held_bytes: Some(4096),
            relay_socket: "/nonexistent/relay.sock".into(),
            unsafe_disks: vec![],
            exit_code: None,
            output: None,
        }
    }

    #[tokio::test]
    async fn a_dead_supervisor_is_reported_not_hidden() {
        let mut s = primary(Phase::Protected);
        // A pid whose argv does not say `protect` (this test binary).
        s.pid = std::process::id();
        let r = primary_row(s).await;
        // Not running, yet not ended: the row says so instead of the stale phase's words.
        assert!(!r.running);
        assert_eq!(r.phase, Some(Phase::Protected));
        assert_ne!(r.state, Phase::Protected.words());
        assert!(r.checkpoints_per_s.is_none());
        // A recorded end is shown as it was recorded.
        let mut s = primary(Phase::BackupLost);
        s.detail = Some("lost".into());
        let r = primary_row(s).await;
        assert_eq!(r.phase, Some(Phase::BackupLost));
        assert_eq!(r.detail.as_deref(), Some("lost"));
    }

    #[tokio::test]
    async fn rows_come_from_the_state_files_and_filter_by_domain() {
        let d = tempfile::tempdir().unwrap();
        let mut s = primary(Phase::Protected);
        state::write_json(&state::protect_path(d.path(), "web"), &s).unwrap();
        s.domain = "db".into();
        state::write_json(&state::protect_path(d.path(), "db"), &s).unwrap();
        let b = BackupState {
            domain: "mail".into(),
            pid: u32::MAX - 1,
            listen: "0.0.0.0:7790".into(),
            relay_socket: d.path().join("relay-receive-mail.sock"),
            started_unix: 0,
        };
        state::write_json(&state::backup_path(d.path(), "mail"), &b).unwrap();
        let all = collect(d.path(), None, Duration::ZERO).await;
        let names: Vec<(&str, Role)> = all.iter().map(|r| (r.domain.as_str(), r.role)).collect();
        assert_eq!(
            names,
            [
                ("db", Role::Primary),
                ("web", Role::Primary),
                ("mail", Role::Backup)
            ]
        );
        assert!(!all[2].running);
        let one = collect(d.path(), Some("web"), Duration::ZERO).await;
        assert_eq!(one.len(), 1);
        let t = render(&all);
        assert!(t.starts_with("DOMAIN"), "{t}");
        assert!(t.contains("listening 0.0.0.0:7790"), "{t}");
        assert!(t.contains("3 (4.0 KiB)"), "{t}");
        let j = serde_json::to_value(&all).unwrap();
        assert_eq!(j[0]["role"], "primary");
        assert!(j[0]["pause_ms"].is_null());
    }
}
