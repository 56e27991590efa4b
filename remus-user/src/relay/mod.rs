//! `remus relay send|receive|status`: the two ends of the checkpoint transport that makes
//! stock `xl remus` safe (DESIGN.md, "Checkpoints and epochs with stock xl remus").
//!
//! Owns: joining xl's pipes, the replication connection and the output buffer; the
//! backup's receiver process; the status sockets and the primary's control socket; the
//! CLI's duration syntax. Never touches: the wire format itself (`replication`), the
//! stream grammar (`stream`), the epoch rules (`checkpoint`), the kernel (`netbuf` does
//! that).
//!
//! ```text
//!  xl remus ─pipe─► relay send ══TCP══► relay receive ─pipe─► xl migrate-receive -r -e
//!     ▲              │  ▲                     │
//!     └── banner ────┘  └──── ACK(N) ◄────────┘  (after all of checkpoint N is written)
//! ```
//!
//! Parts: [`heartbeat`] (settings, the judgement of silence), [`connection`] (the writer
//! task both ends share, page (de)compression off the runtime thread), [`send`] (the
//! primary: xl's pipe, the TCP replicator), [`receive`] (the backup: the session state
//! machine, the cut, the receiver process, discarding the copy), [`status`] (the status
//! socket, its JSON and `remus relay status`), [`control`] (the primary's control socket:
//! ending protection without a failover).
use std::time::Duration;

pub mod connection;
pub mod control;
pub mod heartbeat;
pub mod receive;
pub mod send;
pub mod status;

pub use crate::RUN_DIR;
pub use heartbeat::{
    DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TIMEOUT, Heartbeat, HeartbeatError,
    MIN_HEARTBEAT_TIMEOUT,
};
pub use status::{
    DiskState, RelayState, RelayStatus, SessionEnd, Shared, StatusGuard, serve_status,
};

/// What xl migrate-receive prints before it reads anything (54 bytes).
pub const BANNER: &[u8] = b"xl migration receiver ready, send binary domain data.\n";
/// Page records up to this size are (de)compressed on the runtime thread; bigger ones
/// on a blocking thread, so heartbeats never wait for them.
pub const INLINE_CODEC_BYTES: usize = 256 * 1024;
/// PFN cache for the XOR base of page compression (pages; 4 KiB each, both ends).
pub const DEFAULT_CACHE_PAGES: u32 = 262_144;

/// A command-line duration that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("`{text}` is not a duration (e.g. 200ms, 1s, 1.5s, or 250 for milliseconds): {source}")]
pub struct DurationError {
    text: String,
    source: humantime::DurationError,
}

/// Parses a CLI duration with `humantime` ("200ms", "1s", "1.5s", "2m"). A bare number is
/// milliseconds ("250" = 250ms), as `xl remus -i 200` takes its interval.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let bare = !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.');
    let text = if bare {
        format!("{s}ms")
    } else {
        s.to_string()
    };
    humantime::parse_duration(&text).map_err(|source| DurationError {
        text: s.to_string(),
        source,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration(" 250 ").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2.5").unwrap(), Duration::from_micros(2500));
        assert_eq!(parse_duration("100us").unwrap(), Duration::from_micros(100));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        for bad in ["fast", "-1s", "", "1.2.3", "ms"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn sanitized_names_are_file_names() {
        assert_eq!(sanitize("vif5.0"), "vif5.0");
        assert_eq!(sanitize("[::1]:7788"), "___1__7788");
    }
}
