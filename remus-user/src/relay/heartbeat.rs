//! Heartbeats of both relay ends: the checked settings and the one judgement of silence.
//!
//! Owns: the heartbeat limits and when silence counts as a missed heartbeat or a lost
//! peer. Never touches: sockets or timers (the connection tasks call these).
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// Defaults shared by both ends.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);
pub const MIN_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(100);

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

    /// How long to wait for the next frame before looking at the silence again: two
    /// heartbeat intervals (one missed heartbeat is counted then), but never past the
    /// timeout, so a silent peer is declared lost right when the timeout expires.
    pub fn silence_check(&self, since: Instant) -> Duration {
        (self.interval * 2)
            .min(self.timeout.saturating_sub(since.elapsed()))
            .max(Duration::from_millis(1))
    }

    /// Called when `silence_check` elapsed with no frame: counts a missed heartbeat after
    /// two silent intervals, and returns how long the peer has been silent once that
    /// reaches the timeout (the peer is lost then).
    pub fn judge_silence(&self, since: Instant, m: &Metrics) -> Option<Duration> {
        let silent = since.elapsed();
        if silent >= self.interval * 2 {
            m.heartbeats_missed_total.inc();
        }
        (silent >= self.timeout).then_some(silent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_checked_every_two_intervals_and_at_the_timeout() {
        let hb = Heartbeat::new(Duration::from_millis(100), Duration::from_millis(1000)).unwrap();
        let now = Instant::now();
        assert!(hb.silence_check(now) <= Duration::from_millis(200));
        assert!(hb.silence_check(now) > Duration::from_millis(150));
        let long_ago = now - Duration::from_millis(900);
        assert!(hb.silence_check(long_ago) <= Duration::from_millis(100));
        let past = now - Duration::from_secs(5);
        assert_eq!(hb.silence_check(past), Duration::from_millis(1));
    }

    #[test]
    fn silence_counts_missed_heartbeats_then_loses_the_peer() {
        let hb = Heartbeat::new(Duration::from_millis(100), Duration::from_millis(1000)).unwrap();
        let m = Metrics::new("send");
        let now = Instant::now();
        assert_eq!(hb.judge_silence(now, &m), None);
        assert_eq!(m.heartbeats_missed_total.get(), 0);
        assert_eq!(hb.judge_silence(now - Duration::from_millis(300), &m), None);
        assert_eq!(m.heartbeats_missed_total.get(), 1);
        let lost = hb.judge_silence(now - Duration::from_millis(1500), &m);
        assert!(lost.is_some_and(|d| d >= Duration::from_millis(1500)));
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
}
