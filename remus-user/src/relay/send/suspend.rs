//! `relay send --domain`: how the protected guest is suspended at every checkpoint, and
//! how long a suspend takes, for the operator (status, metrics, logs). Observation only:
//! nothing here touches the checkpoint loop, and a failure here never stops protection.
//!
//! Owns: driving a [`Hypervisor`] port once for the domain's facts and then for its
//! suspend events, and putting what it learns into the relay's status and metrics.
//! Never touches: Xen (the port does), the buffer, the stream.
use std::sync::Arc;

use tracing::{info, warn};

use super::super::Shared;
use super::super::status::SuspendStatus;
use crate::checkpoint::hypervisor::{Hypervisor, SuspendClock, SuspendPath, suspend_path};

/// What the timings say for each path.
fn timing_note(path: SuspendPath) -> &'static str {
    match path {
        SuspendPath::XenstoreControl => {
            "measured from xenstore watches: libxl's write to control/shutdown, the guest's \
             acknowledgement, @releaseDomain"
        }
        SuspendPath::EventChannel => {
            "not measurable from xenstore: libxl's request is an event-channel notify; the \
             relay sees the first byte written after the suspend"
        }
        SuspendPath::ShutdownSuspend => {
            "not measurable from xenstore: libxl's request is a SHUTDOWN_suspend hypercall; \
             the relay sees the first byte written after the suspend"
        }
    }
}

/// Reads the domain's facts, reports its suspend path, then times its suspends for as
/// long as the relay runs (xenstore path) or returns (other paths: nothing to time).
pub async fn watch<H: Hypervisor>(mut h: H, shared: Arc<Shared>) {
    let facts = match h.facts().await {
        Ok(f) => f,
        Err(e) => {
            warn!(error = %e, "cannot tell how the domain is suspended");
            shared.set(|s| {
                s.suspend = Some(SuspendStatus {
                    error: Some(e.to_string()),
                    timing: "unknown".into(),
                    ..Default::default()
                })
            });
            return;
        }
    };
    let report = suspend_path(&facts);
    info!(
        domain = %report.domain,
        domid = report.domid,
        guest_type = ?report.guest_type,
        device_model = report.device_model,
        path = report.path.describe(),
        "how libxl suspends the protected domain at every checkpoint"
    );
    if let Some(w) = &report.warning {
        warn!("{w}");
    }
    let path = report.path;
    shared.set(|s| {
        s.suspend = Some(SuspendStatus {
            report: Some(report),
            timing: timing_note(path).into(),
            ..Default::default()
        })
    });
    if path != SuspendPath::XenstoreControl {
        return;
    }
    let mut clock = SuspendClock::default();
    loop {
        let (ev, at) = match h.next_event().await {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "suspend timing stopped");
                shared.set(|s| {
                    if let Some(sus) = &mut s.suspend {
                        sus.error = Some(e.to_string());
                    }
                });
                return;
            }
        };
        let Some(t) = clock.on(ev, at) else { continue };
        shared
            .metrics
            .suspend_seconds
            .observe(t.request_to_suspended);
        tracing::debug!(
            request_to_suspended_us = t.request_to_suspended.as_micros() as u64,
            request_to_ack_us = t.request_to_ack.map(|d| d.as_micros() as u64),
            "guest suspended"
        );
        shared.set_quietly(|s| {
            if let Some(sus) = &mut s.suspend {
                sus.last_request_to_suspended_us = Some(t.request_to_suspended.as_micros() as u64);
                sus.last_request_to_ack_us = t.request_to_ack.map(|d| d.as_micros() as u64);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::checkpoint::hypervisor::{DomainEvent, DomainFacts, GuestType, HypervisorError};
    use crate::relay::status::Role;

    /// A fake hypervisor (test only): fixed facts, then a scripted list of events.
    struct FakeXen {
        facts: Option<DomainFacts>,
        events: VecDeque<(DomainEvent, Instant)>,
    }

    impl Hypervisor for FakeXen {
        async fn facts(&mut self) -> Result<DomainFacts, HypervisorError> {
            self.facts
                .clone()
                .ok_or_else(|| HypervisorError::NoSuchDomain("guest".into()))
        }
        async fn next_event(&mut self) -> Result<(DomainEvent, Instant), HypervisorError> {
            self.events.pop_front().ok_or(HypervisorError::Closed)
        }
    }

    fn facts(guest_type: GuestType, event_channel: bool) -> DomainFacts {
        DomainFacts {
            name: "guest".into(),
            domid: 5,
            guest_type,
            event_channel,
            feature_suspend: true,
            device_model: false,
        }
    }

    fn checkpoints(n: u64) -> VecDeque<(DomainEvent, Instant)> {
        let t = Instant::now();
        let ms = |x: u64| t + Duration::from_millis(x);
        (0..n)
            .flat_map(|i| {
                let b = i * 200;
                [
                    (DomainEvent::ControlWritten, ms(b)),
                    (DomainEvent::ControlWritten, ms(b + 2)),
                    (DomainEvent::Released, ms(b + 10 + i)),
                ]
            })
            .collect()
    }

    #[tokio::test]
    async fn a_pv_guest_on_the_xenstore_path_is_timed_and_warned_about() {
        let shared = Shared::new(Role::Send, "b:1".into(), None);
        let x = FakeXen {
            facts: Some(facts(GuestType::Pv, false)),
            events: checkpoints(3),
        };
        watch(x, shared.clone()).await;
        let st = shared.snapshot();
        let sus = st.suspend.expect("a suspend report");
        let r = sus.report.expect("facts");
        assert_eq!(r.path, SuspendPath::XenstoreControl);
        assert!(r.warning.is_some());
        assert_eq!(sus.measured, 3);
        assert_eq!(sus.last_request_to_suspended_us, Some(12_000));
        assert_eq!(sus.last_request_to_ack_us, Some(2_000));
        let mean = sus.mean_request_to_suspended_us.unwrap();
        assert!((mean - 11_000.0).abs() < 1.0, "{mean}");
        // The connection closing ended the timing, and said so.
        assert!(sus.error.is_some());
        let text = crate::relay::status::render(&shared.snapshot());
        assert!(
            text.contains("WARNING") && text.contains("over 3 suspends"),
            "{text}"
        );
        let v = serde_json::to_value(shared.snapshot()).unwrap();
        assert_eq!(v["suspend"]["report"]["path"], "xenstore_control");
        assert_eq!(v["suspend"]["report"]["guest_type"], "pv");
    }

    #[tokio::test]
    async fn an_event_channel_guest_is_reported_without_timings() {
        let shared = Shared::new(Role::Send, "b:1".into(), None);
        let x = FakeXen {
            facts: Some(facts(GuestType::Pv, true)),
            events: checkpoints(2),
        };
        watch(x, shared.clone()).await;
        let sus = shared.snapshot().suspend.unwrap();
        assert_eq!(sus.report.unwrap().path, SuspendPath::EventChannel);
        assert_eq!(sus.measured, 0);
        assert!(sus.timing.contains("not measurable"));
    }

    #[tokio::test]
    async fn an_unreadable_domain_is_reported_as_unknown() {
        let shared = Shared::new(Role::Send, "b:1".into(), None);
        let x = FakeXen {
            facts: None,
            events: VecDeque::new(),
        };
        watch(x, shared.clone()).await;
        let sus = shared.snapshot().suspend.unwrap();
        assert!(sus.report.is_none() && sus.error.is_some());
    }
}
