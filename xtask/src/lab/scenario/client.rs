//! What the lab's client saw: its JSON-lines log (`counter-client --log`) read into typed
//! events, and the analysis the scenarios assert on and report (`Seen`).
//!
//! Owns: parsing and analysing the client's log. Never touches: the client process (the
//! steps start and stop it) or anything in dom0; it only reads a file.
use serde::{Deserialize, Serialize};
use std::{fs, path::Path};

/// One line of the client's log (`lab/counter/src/bin/counter-client.rs` writes them).
#[derive(Deserialize, Debug, Clone)]
pub struct Event {
    pub t: f64,
    pub event: Kind,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub value: Option<u64>,
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    #[serde(default)]
    pub local: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
}

/// The client's event kinds; every kind but `Connected`, `Reply` and `Done` ends its one
/// connection.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Connected,
    Reply,
    Done,
    Eof,
    Reset,
    Timeout,
    Error,
    BadReply,
    ConnectFailed,
    /// A kind this reader does not know (a newer client): counted as the connection's end.
    #[serde(other)]
    Unknown,
}

impl Kind {
    /// The name the client writes (for people: the report's `terminal_event`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Connected => "connected",
            Kind::Reply => "reply",
            Kind::Done => "done",
            Kind::Eof => "eof",
            Kind::Reset => "reset",
            Kind::Timeout => "timeout",
            Kind::Error => "error",
            Kind::BadReply => "bad_reply",
            Kind::ConnectFailed => "connect_failed",
            Kind::Unknown => "unknown",
        }
    }
}

/// Reads the client log: every line that parses. Missing file = nothing yet.
pub fn events(p: &Path) -> Vec<Event> {
    let Ok(b) = fs::read(p) else { return vec![] };
    String::from_utf8_lossy(&b)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// What the client saw, from its log.
#[derive(Serialize, Default, Debug, Clone)]
pub struct Seen {
    pub connections: usize,
    pub local_addr: String,
    pub replies: usize,
    pub replies_after_death: usize,
    pub first_value: Option<u64>,
    pub last_value: Option<u64>,
    /// Replies whose value was not the previous one + 1 but not above it (state went back).
    pub repeats_or_regressions: usize,
    /// Replies that jumped forward by more than one (a request answered twice, lost reply).
    pub gaps: usize,
    /// The first bad transition, as "prev -> value at t".
    pub first_anomaly: Option<String>,
    /// eof / reset / timeout / error / bad_reply / connect_failed, if the client ended so.
    pub terminal_event: Option<String>,
    pub max_reply_gap_s: f64,
    pub first_reply_after_death_s: Option<f64>,
    pub first_good_reply_after_death_s: Option<f64>,
}

impl Seen {
    /// What breaks "every value once, in order, on one connection" (empty: nothing).
    pub fn order_problems(&self) -> Vec<String> {
        let mut bad = vec![];
        if self.connections != 1 {
            bad.push(format!("{} connections (must be 1)", self.connections));
        }
        if self.repeats_or_regressions > 0 || self.gaps > 0 {
            bad.push(format!(
                "{} repeats/regressions and {} gaps, first {}",
                self.repeats_or_regressions,
                self.gaps,
                self.first_anomaly.clone().unwrap_or_default()
            ));
        }
        bad
    }
}

/// Analyses the client's events; `death` on the client's clock (Unix seconds).
pub fn analyse(ev: &[Event], death: Option<f64>) -> Seen {
    let mut s = Seen::default();
    let mut prev: Option<(u64, f64)> = None;
    for e in ev {
        let t = e.t;
        match e.event {
            Kind::Connected => {
                s.connections += 1;
                s.local_addr = e.local.clone().unwrap_or_default();
            }
            Kind::Reply => {
                let Some(v) = e.value else { continue };
                reply(&mut s, prev, v, t, death);
                prev = Some((v, t));
            }
            Kind::Done => {}
            k => {
                let detail = e.detail.as_deref().unwrap_or("");
                s.terminal_event = Some(format!("{} at t={t:.3}: {detail}", k.name()));
            }
        }
    }
    s
}

/// Accounts one reply of value `v` at `t` after the previous one.
fn reply(s: &mut Seen, prev: Option<(u64, f64)>, v: u64, t: f64, death: Option<f64>) {
    s.replies += 1;
    s.first_value.get_or_insert(v);
    s.last_value = Some(v);
    let mut good = true;
    if let Some((pv, pt)) = prev {
        s.max_reply_gap_s = s.max_reply_gap_s.max(t - pt);
        if v != pv + 1 {
            good = false;
            if v <= pv {
                s.repeats_or_regressions += 1;
            } else {
                s.gaps += 1;
            }
            s.first_anomaly
                .get_or_insert_with(|| format!("{pv} -> {v} at t={t:.3}"));
        }
    }
    if let Some(d) = death.filter(|d| t > *d) {
        s.replies_after_death += 1;
        s.first_reply_after_death_s.get_or_insert(t - d);
        if good {
            s.first_good_reply_after_death_s.get_or_insert(t - d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_problems_name_a_second_connection_and_each_anomaly() {
        let clean = Seen {
            connections: 1,
            ..Seen::default()
        };
        assert!(clean.order_problems().is_empty());
        let bad = Seen {
            connections: 2,
            gaps: 1,
            first_anomaly: Some("4 -> 6 at 1.0".into()),
            ..Seen::default()
        };
        let p = bad.order_problems();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[1].contains("4 -> 6"), "{p:?}");
        let none = Seen::default();
        assert_eq!(
            none.order_problems().len(),
            1,
            "no connection at all is a problem"
        );
    }

    fn parse(lines: &[&str]) -> Vec<Event> {
        lines
            .iter()
            .map(|l| serde_json::from_str(l).expect("test line parses"))
            .collect()
    }

    fn reply(t: f64, v: u64) -> String {
        format!(r#"{{"t":{t},"event":"reply","seq":{v},"value":{v},"rtt_ms":1.0}}"#)
    }

    #[test]
    fn analyse_counts_repeats_gaps_and_failover_time() {
        let mut l = vec![r#"{"t":0.0,"event":"connected","local":"a:1","peer":"b:2"}"#.into()];
        l.extend([reply(1.0, 5), reply(2.0, 6), reply(3.0, 7)]);
        // death at 3.5; the backup resumed from an older checkpoint: 6 again, then on.
        l.extend([reply(10.0, 6), reply(11.0, 7), reply(12.0, 9)]);
        let l: Vec<&str> = l.iter().map(String::as_str).collect();
        let s = analyse(&parse(&l), Some(3.5));
        assert_eq!(s.connections, 1);
        assert_eq!(s.local_addr, "a:1");
        assert_eq!(s.replies, 6);
        assert_eq!(s.replies_after_death, 3);
        assert_eq!(s.repeats_or_regressions, 1);
        assert_eq!(s.gaps, 1);
        assert_eq!(s.first_reply_after_death_s, Some(6.5));
        assert_eq!(s.first_good_reply_after_death_s, Some(7.5));
        assert_eq!(s.first_anomaly.as_deref(), Some("7 -> 6 at t=10.000"));
    }

    #[test]
    fn analyse_clean_failover_and_terminal_event() {
        let mut l: Vec<String> = (1..=5).map(|v| reply(v as f64, v)).collect();
        l.push(r#"{"t":9.0,"event":"reset","seq":6,"detail":"read: x"}"#.into());
        let l: Vec<&str> = l.iter().map(String::as_str).collect();
        let s = analyse(&parse(&l), Some(4.5));
        assert_eq!(s.repeats_or_regressions + s.gaps, 0);
        assert_eq!(s.first_good_reply_after_death_s, Some(0.5));
        assert_eq!(
            s.terminal_event.as_deref(),
            Some("reset at t=9.000: read: x")
        );
    }

    #[test]
    fn an_unknown_event_ends_the_connection_and_done_does_not() {
        let ev = parse(&[
            r#"{"t":1.0,"event":"done","seq":3}"#,
            r#"{"t":2.0,"event":"from_the_future","seq":3}"#,
        ]);
        assert_eq!(ev[0].event, Kind::Done);
        assert_eq!(ev[1].event, Kind::Unknown);
        let s = analyse(&ev[..1], None);
        assert_eq!(s.terminal_event, None);
        assert!(analyse(&ev, None).terminal_event.is_some());
    }
}
