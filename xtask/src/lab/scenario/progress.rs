//! How far replication got: checkpoints and acknowledgements, from stock `xl remus`'s log
//! or from the relay's JSON status.
//!
//! Owns: reading the primary's `run/sender.log` (stock Remus has no status interface: its
//! `-vvv` log is the only record, so it is counted there) and each end's
//! `run/relay-send.json` / `run/relay-receive.json` (what `remus relay status -j`
//! answered, sampled in that host's dom0 by `lab.sh relay-sampler`; read through its typed
//! fields, never its words). Never touches: xl or the relays themselves (it only reads
//! files in the hosts' shares).
use crate::lab::{topology::Host, vm};
use serde::{Deserialize, Serialize};
use std::fs;

/// Where a run's checkpoint counts come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Stock `xl -vvv remus`: libxl logs "guest has suspended" once per checkpoint (the
    /// first ends the initial live copy). xl's "Checkpointed save" progress lines are
    /// rate-limited and undercount.
    XlLog,
    /// The relay's status: the sender's `checkpoints_total` (complete checkpoints it saw
    /// in the stream, the initial copy being checkpoint 1).
    Relay,
}

/// The relay's ends, as their status files are named.
#[derive(Clone, Copy, Debug)]
pub enum End {
    Send,
    Receive,
}

impl End {
    fn file(self) -> &'static str {
        match self {
            End::Send => "run/relay-send.json",
            End::Receive => "run/relay-receive.json",
        }
    }
}

/// The fields of `remus relay status -j` the lab reads (the JSON keys are stable; see
/// docs/relay.md). `state` is shown to people (and kept in the report), never compared.
#[derive(Deserialize, Serialize, Debug, Default, Clone)]
pub struct RelayView {
    #[serde(default)]
    pub state: Option<serde_json::Value>,
    #[serde(default)]
    pub checkpoints_total: u64,
    #[serde(default)]
    pub last_acked: u64,
    #[serde(default)]
    pub failovers_total: u64,
    /// The backup: how its last session ended (absent while none has).
    #[serde(default)]
    pub last_session: Option<SessionView>,
    /// The sender's per-checkpoint phases over its last checkpoints (absent until
    /// measured; docs/relay.md, "Where a checkpoint's time goes").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_recent_us: Option<Quantiles>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_recent_us: Option<Quantiles>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_write_recent_us: Option<Quantiles>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_recent_us: Option<Quantiles>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_recent_us: Option<Quantiles>,
}

/// A phase's quantiles as the relay reports them (`{n, p50, p90, p99, max}`, µs).
#[derive(Deserialize, Serialize, Debug, Default, Clone, PartialEq, Eq)]
pub struct Quantiles {
    #[serde(default)]
    pub n: u64,
    #[serde(default)]
    pub p50: u64,
    #[serde(default)]
    pub p90: u64,
    #[serde(default)]
    pub p99: u64,
    #[serde(default)]
    pub max: u64,
}

/// How a backup's last session ended (`last_session`, tagged by `end`), as far as the lab
/// reads it: the checkpoint the backup was left with.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "end", rename_all = "snake_case")]
pub enum SessionView {
    Finished {},
    /// The receiver's stream was closed after `checkpoint` (0: no usable one).
    FailedOver {
        checkpoint: u64,
    },
    Discarded {
        checkpoint: u64,
    },
    ReceiverEnded {
        checkpoint: u64,
    },
    /// An end this reader does not know (a newer relay).
    #[serde(other)]
    Other,
}

impl SessionView {
    /// The complete checkpoint the backup held when the session ended, if it says.
    pub fn checkpoint(&self) -> Option<u64> {
        match self {
            SessionView::FailedOver { checkpoint }
            | SessionView::Discarded { checkpoint }
            | SessionView::ReceiverEnded { checkpoint } => Some(*checkpoint),
            SessionView::Finished {} | SessionView::Other => None,
        }
    }
}

/// The last status sampled from relay end `end` on host `h`, if any.
pub fn relay(h: Host, end: End) -> Option<RelayView> {
    let b = fs::read(vm::share(h).join(end.file())).ok()?;
    parse_status(&b)
}

/// `remus relay status -j` prints an array, one object per relay asked (here one).
fn parse_status(b: &[u8]) -> Option<RelayView> {
    serde_json::from_slice::<Vec<RelayView>>(b)
        .ok()?
        .into_iter()
        .next()
}

/// Checkpoints so far, from `src` on the primary host.
pub fn checkpoints(src: Source, primary: Host) -> u64 {
    match src {
        Source::XlLog => fs::read(vm::share(primary).join("run/sender.log"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .matches("guest has suspended")
                    .count() as u64
            })
            .unwrap_or(0),
        Source::Relay => relay(primary, End::Send).map_or(0, |v| v.checkpoints_total),
    }
}

/// One line for the live view.
pub fn describe(src: Source, primary: Host, backup: Host) -> String {
    match src {
        Source::XlLog => format!("checkpoints {:4}", checkpoints(src, primary)),
        Source::Relay => {
            let s = relay(primary, End::Send).unwrap_or_default();
            let r = relay(backup, End::Receive).unwrap_or_default();
            let word = |v: &Option<serde_json::Value>| match v {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => "-".into(),
            };
            format!(
                "checkpoints {:4} acked {:4} | send: {} | receive: {}",
                s.checkpoints_total,
                s.last_acked,
                word(&s.state),
                word(&r.state)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_status_is_read_by_its_fields_and_ignores_the_rest() {
        let j = br#"[{"role":"receive","pid":7,"state":"failed over","peer":null,
            "checkpoints_total":12,"last_acked":11,"failovers_total":1,
            "heartbeats_missed_total":3,"some_new_key":{"x":1}}]"#;
        let v = parse_status(j).expect("parses");
        assert_eq!(
            (v.checkpoints_total, v.last_acked, v.failovers_total),
            (12, 11, 1)
        );
        assert_eq!(v.last_session, None);
        let j = br#"[{"checkpoints_total":3,"last_session":{"end":"failed_over","checkpoint":0,
            "reason":"heartbeat"}}]"#;
        let v = parse_status(j).expect("parses");
        assert_eq!(v.last_session.and_then(|s| s.checkpoint()), Some(0));
        let j = br#"[{"last_session":{"end":"from_the_future","x":1}}]"#;
        assert_eq!(
            parse_status(j).expect("parses").last_session,
            Some(SessionView::Other)
        );
        let j = br#"[{"pause_recent_us":{"n":40,"p50":120000,"p90":150000,"p99":180000,"max":190000}}]"#;
        let q = parse_status(j)
            .expect("parses")
            .pause_recent_us
            .expect("phase");
        assert_eq!((q.n, q.p50, q.p99), (40, 120_000, 180_000));
        assert!(parse_status(b"[]").is_none());
        assert!(parse_status(b"not json").is_none());
    }
}
