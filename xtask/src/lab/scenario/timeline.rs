//! Where a checkpoint's time goes and where a failover's seconds go, for the lab report:
//! `Phases` (per-checkpoint phases of a protected run, stock or relay, and the client's
//! reply latency while protected) and `Timeline` (a power-off's failover, each moment in
//! seconds after the death on the machine's clock).
//!
//! Sources: the relay's own phase quantiles (`remus relay status -j`, sampled into the
//! share); the primary's `xl -vvv remus` log lines stamped with dom0's clock as they
//! appeared (`lab.sh stamp tail`, stamp.py: xl's lines carry no time of their own); the
//! backup's failover stamped the same way (`lab.sh stamp failover`: the relay's state and
//! log, the receiving xl's log, the vif's bridge port and carrier, where the bridge learnt
//! the guest's MAC); the frame watcher on the client's tap (frames.rs); the client's log.
//! dom0's clock is mapped to the machine's through the sync files stamp.py writes into the
//! 9p share (their modification time is the machine's clock).
//!
//! Owns: reading those files and the arithmetic. Never touches: the lab (no dom0 calls);
//! the steps (acts.rs) start the stampers and call this.
use super::{
    client::{self, Kind},
    frames::Frame,
    progress::{Quantiles, RelayView},
};
use serde::{Deserialize, Serialize};
use std::{fs, path::Path};

/// Median and 99th percentile of a set of durations, in milliseconds, with their count.
#[derive(Serialize, Debug, Clone, Default, PartialEq)]
pub struct Spread {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Spread {
    /// Nearest-rank quantiles of `v` (ms); None when empty.
    pub fn of(mut v: Vec<f64>) -> Option<Spread> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Spread {
            n: v.len(),
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            max_ms: v[v.len() - 1],
        })
    }

    /// From the relay's `{n, p50, p99, max}` in microseconds.
    fn from_relay(q: &Quantiles) -> Spread {
        Spread {
            n: q.n as usize,
            p50_ms: q.p50 as f64 / 1e3,
            p99_ms: q.p99 as f64 / 1e3,
            max_ms: q.max as f64 / 1e3,
        }
    }
}

/// Per-checkpoint phases of a protected run, measured over the rate window.
#[derive(Serialize, Debug, Clone, Default)]
pub struct Phases {
    /// Guest pause as xl's log shows it: libxl's suspend request → libxc's last progress
    /// line of the checkpoint's pages (the resume follows at once), from the stamped
    /// `xl -vvv` lines. The same measure for stock and relay (`xl_pauses`).
    pub xl_pause: Option<Spread>,
    /// libxl's suspend request → "guest has suspended" (part of the pause).
    pub xl_suspend: Option<Spread>,
    /// libxc's "Domain now suspended" → its last progress line: the pages written into
    /// xl's stream while the guest is paused (part of the pause).
    pub xl_transfer: Option<Spread>,
    /// The relay's own phases (relay runs): guest pause, transfer, backup write, ACK,
    /// release (see docs/relay.md, "Where a checkpoint's time goes").
    pub relay_pause: Option<Spread>,
    pub relay_transfer: Option<Spread>,
    pub relay_backup_write: Option<Spread>,
    pub relay_ack: Option<Spread>,
    pub relay_release: Option<Spread>,
    /// Checkpoints per second over the window (the run's `checkpoints_per_s`).
    pub checkpoints_per_s: Option<f64>,
    /// The client's reply latency (its rtt) over the window.
    pub client_rtt: Option<Spread>,
    /// The client's longest wait between two replies over the window (ms).
    pub client_max_gap_ms: Option<f64>,
    /// What this run's protection cannot report, and why.
    pub not_reported: Vec<String>,
}

/// One stamped line of a dom0 log (stamp.py tail).
#[derive(Deserialize, Debug, Clone)]
pub struct Stamped {
    pub t: f64,
    pub line: String,
}

/// Reads stamp.py's JSON lines (any shape `T`); missing file: none.
pub fn read_lines<T: for<'de> Deserialize<'de>>(p: &Path) -> Vec<T> {
    fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// From xl's stamped log, per checkpoint in ms: (suspend request → "guest has
/// suspended", libxc's "Domain now suspended" → its "Checkpointed save" progress line at
/// the end of the checkpoint's pages, suspend request → that line). libxl resumes the
/// guest right after libxc's `CHECKPOINT` record, which follows the pages at once, so the
/// last is the guest's pause as xl shows it. A checkpoint counts once all its lines were
/// seen, in order.
pub fn xl_pauses(lines: &[Stamped]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut suspend, mut transfer, mut pause) = (vec![], vec![], vec![]);
    let (mut req, mut suspended, mut now_suspended) = (None::<f64>, None::<f64>, None::<f64>);
    for l in lines {
        if l.line.contains("suspend request via") {
            (req, suspended, now_suspended) = (Some(l.t), None, None);
        } else if l.line.contains("guest has suspended") {
            suspended = req.map(|_| l.t);
        } else if l.line.contains("Domain now suspended") {
            now_suspended = suspended.map(|_| l.t);
        } else if l.line.contains("Checkpointed save") {
            if let (Some(r), Some(s), Some(n)) = (req, suspended, now_suspended) {
                suspend.push((s - r) * 1e3);
                transfer.push((l.t - n) * 1e3);
                pause.push((l.t - r) * 1e3);
            }
            (req, suspended, now_suspended) = (None, None, None);
        }
    }
    (suspend, transfer, pause)
}

/// The client's replies in [from, to] (Unix seconds): their rtt spread and longest gap.
pub fn client_window(ev: &[client::Event], from: f64, to: f64) -> (Option<Spread>, Option<f64>) {
    let r: Vec<&client::Event> = ev
        .iter()
        .filter(|e| e.event == Kind::Reply && e.t >= from && e.t <= to)
        .collect();
    let gap = r
        .windows(2)
        .map(|w| (w[1].t - w[0].t) * 1e3)
        .fold(None, |m: Option<f64>, g| Some(m.map_or(g, |m| m.max(g))));
    (Spread::of(r.iter().filter_map(|e| e.rtt_ms).collect()), gap)
}

/// Phases of a run from what was gathered over its rate window.
pub fn phases(
    relay: Option<&RelayView>,
    xl: &[Stamped],
    client: &[client::Event],
    window: (f64, f64),
    rate: Option<f64>,
) -> Phases {
    let (suspend, transfer, pause) = xl_pauses(xl);
    let (rtt, gap) = client_window(client, window.0, window.1);
    let mut p = Phases {
        xl_pause: Spread::of(pause),
        xl_suspend: Spread::of(suspend),
        xl_transfer: Spread::of(transfer),
        checkpoints_per_s: rate,
        client_rtt: rtt,
        client_max_gap_ms: gap,
        ..Default::default()
    };
    match relay {
        Some(v) => {
            let s = |q: &Option<Quantiles>| q.as_ref().map(Spread::from_relay);
            p.relay_pause = s(&v.pause_recent_us);
            p.relay_transfer = s(&v.transfer_recent_us);
            p.relay_backup_write = s(&v.backup_write_recent_us);
            p.relay_ack = s(&v.ack_recent_us);
            p.relay_release = s(&v.release_recent_us);
        }
        None => p.not_reported = vec![
            "transfer to the backup: libxc writes the pages into ssh's pipe while the guest is paused (xl_transfer); when they reach the backup is not seen".into(),
            "backup write, ACK: stock Remus reads no acknowledgement from the backup (the ssh channel carries the stream one way during checkpoints)".into(),
            "release: `-n` (no output buffering, as the lab runs stock) holds nothing, so nothing is released".into(),
        ],
    }
    p
}

/// One event of the backup's failover as stamp.py wrote it.
#[derive(Deserialize, Debug, Clone)]
pub struct Change {
    pub t: f64,
    pub what: String,
    pub value: serde_json::Value,
}

/// dom0's clock minus the machine's, from stamp.py's sync files next to `out`: each holds
/// dom0's time when written; its modification time is the machine's. The mean of those
/// present, and their spread (drift over the stamper's life).
pub fn clock_offset(out: &Path) -> Option<(f64, f64)> {
    let mut o = vec![];
    for k in 0..2 {
        let p = out.with_file_name(format!("{}.sync{k}", out.file_name()?.to_string_lossy()));
        let Ok(s) = fs::read_to_string(&p) else {
            continue;
        };
        let Ok(dom0) = s.trim().parse::<f64>() else {
            continue;
        };
        let m = fs::metadata(&p).ok()?.modified().ok()?;
        let m = m.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64();
        o.push(dom0 - m);
    }
    let mean = o.iter().sum::<f64>() / o.len().max(1) as f64;
    let spread = o.iter().fold(0.0f64, |a, x| a.max((x - mean).abs()));
    (!o.is_empty()).then_some((mean, spread))
}

/// One moment of the failover.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Mark {
    pub what: String,
    /// Seconds after the death (None: not seen).
    pub at_s: Option<f64>,
    /// Where it was seen.
    pub source: String,
}

/// A power-off's failover, in seconds after the death.
#[derive(Serialize, Debug, Clone, Default)]
pub struct Timeline {
    pub marks: Vec<Mark>,
    /// How long the backup relay said the primary had been silent when it declared it lost.
    pub silence_ms: Option<u64>,
    /// The client's TCP segments with data sent towards the guest after the death
    /// (its retransmissions, and the new requests once answered), seconds after it.
    pub client_segments_s: Vec<f64>,
    /// dom0 B's clock minus the machine's, and how far the sync samples disagree.
    pub clock_offset_s: Option<f64>,
    pub clock_spread_s: Option<f64>,
}

/// The relay's log timestamp (tracing's RFC 3339 UTC, `2026-12-03T13:20:01.123456Z`) at
/// the start of `line`, as Unix seconds (dom0's clock).
pub fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, mi) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let s: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60) as f64 + s)
}

/// The failover timeline: `death` (machine clock), the backup's stamped changes and their
/// clock offset, the frames on the client's tap, and the client's log.
pub fn timeline(
    death: f64,
    backup: &[Change],
    offset: Option<(f64, f64)>,
    frames: &[Frame],
    client: &[client::Event],
) -> Timeline {
    let off = offset.map_or(0.0, |o| o.0);
    let rel = |dom0_t: f64| Some(dom0_t - off - death);
    let after = |c: &&Change| c.t - off > death;
    let log = |needle: &str| -> Option<f64> {
        backup
            .iter()
            .filter(after)
            .filter(|c| c.what == "log")
            .find_map(|c| {
                let l = c.value.as_str()?;
                l.contains(needle)
                    .then(|| log_time(l).unwrap_or(c.t))
                    .and_then(rel)
            })
    };
    let first = |suffix: &str, val: &dyn Fn(&serde_json::Value) -> bool| -> Option<f64> {
        backup
            .iter()
            .filter(after)
            .find(|c| c.what.ends_with(suffix) && val(&c.value))
            .and_then(|c| rel(c.t))
    };
    let truthy = |v: &serde_json::Value| v.as_bool() == Some(true);
    let silence_ms = backup.iter().filter(after).find_map(|c| {
        let l = c.value.as_str()?;
        let (_, rest) = l.split_once("silent for ")?;
        rest.split_whitespace().next()?.parse().ok()
    });
    let failover = log("FAILOVER");
    let from_guest = frames
        .iter()
        .find(|f| f.from_guest && f.t > death && f.kind != "rarp");
    let rarp = frames
        .iter()
        .find(|f| f.from_guest && f.t > death && f.kind == "rarp");
    let seen = client::analyse(client, Some(death));
    let dom0 = "backup dom0 (stamp.py)";
    let mark = |what: &str, at_s: Option<f64>, source: &str| Mark {
        what: what.into(),
        at_s,
        source: source.into(),
    };
    let mut marks = vec![
        mark("the primary's death (power-off)", Some(0.0), "machine"),
        mark(
            "primary last heard by the backup relay",
            failover.zip(silence_ms).map(|(f, s)| f - s as f64 / 1e3),
            "relay log: FAILOVER time - silence",
        ),
        mark(
            "heartbeat timeout; receiver's stream cut (FAILOVER)",
            failover,
            "relay log (its own timestamp)",
        ),
        mark(
            "libxl restored the copy (xl: Remus Failover)",
            log("Failover for domain"),
            dom0,
        ),
        mark(
            "xl renamed, unpaused the domain and exited",
            log("the receiver exited"),
            "relay log (its own timestamp)",
        ),
        mark(
            "the backup's bridge forgot the guest's MAC (the announcement's flush)",
            first("guest_mac_port", &serde_json::Value::is_null),
            dom0,
        ),
        mark(
            "the restored domain's vif appears (netback)",
            first(".bridge_port", &|_| true),
            dom0,
        ),
        mark(
            "a vif on the backup's bridge",
            first(".bridge_port", &truthy),
            dom0,
        ),
        mark(
            "the guest's frontend connected (vif carrier)",
            first(".carrier", &truthy),
            dom0,
        ),
        mark(
            "a frame from the guest on its vif",
            first(".rx_from_guest", &truthy),
            dom0,
        ),
        mark(
            "the backup's bridge learnt the guest's MAC on the vif",
            first("guest_mac_port", &|v| {
                v.as_str().is_some_and(|s| s.starts_with("vif"))
            }),
            dom0,
        ),
        mark(
            "the backup's announcement (RARP) on the client LAN",
            rarp.map(|f| f.t - death),
            "client tap",
        ),
        mark(
            "first frame from the backup guest on the client LAN",
            from_guest.map(|f| f.t - death),
            &format!(
                "client tap ({})",
                from_guest.map_or("none", |f| f.kind.as_str())
            ),
        ),
        mark("first reply", seen.first_reply_after_death_s, "client log"),
        mark(
            "first good reply",
            seen.first_good_reply_after_death_s,
            "client log",
        ),
    ];
    marks.retain(|m| m.at_s.is_some() || !m.source.starts_with("relay log: "));
    Timeline {
        marks,
        silence_ms,
        client_segments_s: frames
            .iter()
            .filter(|f| !f.from_guest && f.t > death && f.kind == "tcp" && f.len > 0)
            .map(|f| f.t - death)
            .take(30)
            .collect(),
        clock_offset_s: offset.map(|o| o.0),
        clock_spread_s: offset.map(|o| o.1),
    }
}

fn ms(s: &Option<Spread>) -> String {
    s.as_ref()
        .map_or("-".into(), |s| format!("{:.0} / {:.0}", s.p50_ms, s.p99_ms))
}

/// The phases side by side, one column per run that has them.
pub fn phases_table(runs: &[(&str, &Phases)]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let mut s = format!("{:<44}", "per checkpoint (ms, p50 / p99)");
    for (n, _) in runs {
        s.push_str(&format!(" {n:>18}"));
    }
    s.push('\n');
    type Row = (&'static str, fn(&Phases) -> String);
    let rows: [Row; 12] = [
        ("checkpoints/s", |p| {
            p.checkpoints_per_s
                .map_or("-".into(), |r| format!("{r:.2}"))
        }),
        ("guest pause, xl log (suspend req. → resume)", |p| {
            ms(&p.xl_pause)
        }),
        ("  of which suspend (req. → suspended)", |p| {
            ms(&p.xl_suspend)
        }),
        ("  of which pages into xl's stream", |p| ms(&p.xl_transfer)),
        ("guest pause, relay", |p| ms(&p.relay_pause)),
        ("transfer, relay", |p| ms(&p.relay_transfer)),
        ("backup write, relay", |p| ms(&p.relay_backup_write)),
        ("ACK, relay", |p| ms(&p.relay_ack)),
        ("release, relay", |p| ms(&p.relay_release)),
        ("client reply latency", |p| ms(&p.client_rtt)),
        ("client longest wait between replies", |p| {
            p.client_max_gap_ms
                .map_or("-".into(), |g| format!("{g:.0}"))
        }),
        ("checkpoints timed in xl's log", |p| {
            p.xl_pause.as_ref().map_or("0".into(), |s| s.n.to_string())
        }),
    ];
    for (name, f) in rows {
        s.push_str(&format!("{name:<44}"));
        for (_, p) in runs {
            s.push_str(&format!(" {:>18}", f(p)));
        }
        s.push('\n');
    }
    s
}

/// The failover timeline as lines.
pub fn timeline_table(name: &str, t: &Timeline) -> String {
    let mut s = format!("failover timeline of `{name}` (seconds after the death)\n");
    for m in &t.marks {
        s.push_str(&format!(
            "  {:>7}  {:<54} {}\n",
            m.at_s.map_or("-".into(), |a| format!("{a:.2}")),
            m.what,
            m.source
        ));
    }
    if !t.client_segments_s.is_empty() {
        let v: Vec<String> = t
            .client_segments_s
            .iter()
            .take(12)
            .map(|x| format!("{x:.2}"))
            .collect();
        s.push_str(&format!(
            "  client's data segments to the guest after the death: {}\n",
            v.join(" ")
        ));
    }
    if let Some(o) = t.clock_offset_s {
        s.push_str(&format!(
            "  dom0 B's clock - the machine's: {o:+.3} s (sync samples within {:.3} s)\n",
            t.clock_spread_s.unwrap_or_default()
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(t: f64, line: &str) -> Stamped {
        Stamped {
            t,
            line: line.into(),
        }
    }

    #[test]
    fn xl_pauses_follow_libxl_and_libxc_through_each_checkpoint() {
        let l = [
            st(0.9, "xc: progress: Checkpointed save: 371/371  100%"),
            st(
                1.0,
                "libxl: debug: Domain 2:issuing PV suspend request via XenBus control node",
            ),
            st(1.1, "libxl: debug: Domain 2:guest has suspended"),
            st(1.15, "xc: progress: Domain now suspended: 0/0    0%"),
            st(1.3, "xc: progress: Checkpointed save: 385/385  100%"),
            st(1.3, "xc: info: All records buffered"),
            // An incomplete checkpoint (the log ends) does not count.
            st(
                1.6,
                "libxl: debug: Domain 2:issuing PV suspend request via XenBus control node",
            ),
            st(1.7, "libxl: debug: Domain 2:guest has suspended"),
        ];
        let (s, t, p) = xl_pauses(&l);
        assert_eq!((s.len(), t.len(), p.len()), (1, 1, 1));
        let near = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert!(near(s[0], 100.0) && near(t[0], 150.0) && near(p[0], 300.0));
    }

    #[test]
    fn spread_takes_nearest_rank_quantiles() {
        let s = Spread::of((1..=100).map(f64::from).collect()).expect("not empty");
        assert_eq!(
            (s.n, s.p50_ms, s.p99_ms, s.max_ms),
            (100, 50.0, 99.0, 100.0)
        );
        assert_eq!(Spread::of(vec![]), None);
    }

    #[test]
    fn log_time_reads_tracing_timestamps() {
        let t = log_time("2026-12-03T13:20:01.250000Z ERROR FAILOVER: primary lost").expect("ts");
        assert!((t - 1_796_304_001.25).abs() < 1e-6, "{t}");
        assert_eq!(
            log_time("migration target: Remus Failover for domain 3"),
            None
        );
    }

    #[test]
    fn the_timeline_maps_dom0_times_to_seconds_after_the_death() {
        let ch = |t: f64, what: &str, v: serde_json::Value| Change {
            t,
            what: what.into(),
            value: v,
        };
        // dom0 runs 2 s ahead of the machine; death at machine 100.
        let b = vec![
            ch(101.0, "vif3.0.carrier", true.into()),
            ch(
                110.5,
                "log",
                "ERROR session: FAILOVER: primary lost: the primary was silent for 8000 ms (heartbeat timeout 8000 ms)".into(),
            ),
            ch(112.0, "log", "migration target: Remus Failover for domain 4".into()),
            ch(112.4, "vif4.0.bridge_port", true.into()),
            ch(112.9, "vif4.0.carrier", true.into()),
            ch(113.0, "guest_mac_port", "vif4.0".into()),
        ];
        let frames = vec![Frame {
            t: 111.2,
            from_guest: true,
            kind: "arp".into(),
            seq: None,
            ack: None,
            len: 0,
            flags: 0,
        }];
        let t = timeline(100.0, &b, Some((2.0, 0.01)), &frames, &[]);
        let at = |w: &str| {
            t.marks
                .iter()
                .find(|m| m.what.starts_with(w))
                .and_then(|m| m.at_s)
        };
        let near = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-6);
        assert!(near(at("heartbeat timeout"), 8.5));
        assert!(near(at("primary last heard"), 0.5));
        assert!(near(at("libxl restored"), 10.0));
        assert!(near(at("a vif on"), 10.4));
        // The carrier seen before the death (dom0 101 = machine 99) is not the backup's.
        assert!(near(at("the guest's frontend"), 10.9));
        assert!(near(at("the backup's bridge learnt"), 11.0));
        assert!(near(at("first frame"), 11.2));
        assert_eq!(t.silence_ms, Some(8000));
        assert_eq!(at("first reply"), None);
    }
}
