//! The hypervisor port: what remus asks Xen about the protected domain, and the pure
//! rules that turn the answers into a report (how the guest is suspended, how long a
//! suspend takes). Implemented for real by `crate::xen` (xenstore) and by fakes in tests.
//!
//! Owns: the [`Hypervisor`] trait and the types that cross it, the choice of suspend path
//! ([`suspend_path`], libxl's rule), and the suspend clock ([`SuspendClock`]). Never
//! touches: Xen or xenstore (the implementation does), the checkpoint machine (these are
//! observations; nothing here decides a cut or a release).
//!
//! How libxl suspends a domain (Xen 4.17 `libxl_dom_suspend.c`,
//! `domain_suspend_callback_common`), which the report mirrors:
//!
//! ```text
//!   device/suspend/event-channel published  ──► event channel   (fast: notify, no xenstore)
//!   else HVM (not PVH) without PV drivers     ──► SHUTDOWN_suspend (xc_domain_shutdown: the
//!                                                  hypervisor suspends it, no guest involvement)
//!   else                                      ──► xenstore control node: "suspend" written to
//!                                                  control/shutdown, the guest acknowledges (writes
//!                                                  ""), freezes and suspends; libxl waits on
//!                                                  @releaseDomain for SHUTDOWN_suspend
//! ```
//!
//! (libxl also requires the ACPI S-state to be S0 for the event channel; a guest being
//! protected is running, so S0 is assumed.) Whether an HVM guest has PV drivers, libxl
//! reads from HVM_PARAM_CALLBACK_IRQ through libxenctrl; without libxenctrl the xenstore
//! node `control/feature-suspend` that Linux's PV drivers write is the stand-in.
//!
//! Timing: only the xenstore path is visible from dom0's xenstore: the request is the
//! watch event of libxl's write to `control/shutdown`, the acknowledgement the guest's
//! write after it, and "suspended" the `@releaseDomain` event that follows (xenstored
//! fires it when a domain shuts down, here for SHUTDOWN_suspend). The event-channel
//! notify and the SHUTDOWN_suspend hypercall leave no trace in xenstore, so for those
//! paths no request instant exists to measure from ([`Timing::NotObservable`]).
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The guest's kind, as libxl records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestType {
    Pv,
    Pvh,
    Hvm,
    /// libxl's record is missing (a domain not created by libxl?).
    Unknown,
}

/// How libxl asks the guest to suspend at every checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuspendPath {
    /// The guest published `device/suspend/event-channel`: one notify, no xenstore.
    EventChannel,
    /// "suspend" written to `control/shutdown`, acknowledged by the guest through
    /// xenstore (slow: a xenstore round trip and a process freeze in the guest).
    XenstoreControl,
    /// HVM without PV drivers: the hypervisor suspends it (`SHUTDOWN_suspend`).
    ShutdownSuspend,
}

impl SuspendPath {
    pub fn describe(self) -> &'static str {
        match self {
            SuspendPath::EventChannel => "suspend event channel",
            SuspendPath::XenstoreControl => "xenstore control node (control/shutdown)",
            SuspendPath::ShutdownSuspend => "SHUTDOWN_suspend (HVM without PV drivers)",
        }
    }
}

/// What the domain publishes that decides its suspend path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainFacts {
    pub name: String,
    pub domid: u32,
    pub guest_type: GuestType,
    /// `device/suspend/event-channel` is present.
    pub event_channel: bool,
    /// `control/feature-suspend` is present (the guest's PV drivers handle suspend).
    pub feature_suspend: bool,
    /// A device model serves the domain (`/local/domain/0/device-model/<domid>`).
    pub device_model: bool,
}

/// The decision and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuspendReport {
    pub domain: String,
    pub domid: u32,
    pub guest_type: GuestType,
    pub device_model: bool,
    pub path: SuspendPath,
    /// Set when the path is the slow one a PV guest should not need.
    pub warning: Option<String>,
}

/// libxl's rule (see the module docs), applied to what the domain publishes.
pub fn suspend_path(f: &DomainFacts) -> SuspendReport {
    let path = if f.event_channel {
        SuspendPath::EventChannel
    } else if f.guest_type == GuestType::Hvm && !f.feature_suspend {
        SuspendPath::ShutdownSuspend
    } else {
        SuspendPath::XenstoreControl
    };
    // The xend-era warning (`libcheckpoint.c`) and the wiki's "Remus PV domU requirements".
    let warning =
        (f.guest_type == GuestType::Pv && path == SuspendPath::XenstoreControl).then(|| {
            format!(
                "PV domain {} (id {}) has no suspend event channel: every checkpoint falls back to \
             slow xenstore signalling (the guest kernel would have to publish \
             device/suspend/event-channel; upstream Linux does not)",
                f.name, f.domid
            )
        });
    SuspendReport {
        domain: f.name.clone(),
        domid: f.domid,
        guest_type: f.guest_type,
        device_model: f.device_model,
        path,
        warning,
    }
}

/// Something seen about the domain, with when it was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainEvent {
    /// `control/shutdown` was written (by libxl: the request; by the guest: its ack).
    ControlWritten,
    /// `@releaseDomain`: some domain shut down or died (here: ours suspended).
    Released,
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("no domain named {0} (xenstore has no /local/domain/*/name with it)")]
    NoSuchDomain(String),
    #[error("xenstore is not reachable (tried {tried}): {source}")]
    Unreachable {
        tried: String,
        source: std::io::Error,
    },
    #[error("xenstore {op} {path}: {detail}")]
    Request {
        op: &'static str,
        path: String,
        detail: String,
    },
    #[error("the xenstore connection closed")]
    Closed,
}

impl crate::exit::HasExitCode for HypervisorError {
    fn exit_code(&self) -> crate::exit::ExitCode {
        use crate::exit::ExitCode;
        match self {
            // The operator named a domain that is not there.
            HypervisorError::NoSuchDomain(_) => ExitCode::Usage,
            // Not in a dom0 (no xenstore).
            HypervisorError::Unreachable { .. } => ExitCode::Unsupported,
            _ => ExitCode::Failure,
        }
    }
}

/// What the relay asks Xen. Implemented over xenstore by `crate::xen::XenDomain`, and by
/// fakes in tests.
pub trait Hypervisor: Send {
    /// What the domain publishes now (read once when protection starts).
    fn facts(&mut self) -> impl Future<Output = Result<DomainFacts, HypervisorError>> + Send;
    /// The next event about the domain's suspends (watches set up by the implementation).
    fn next_event(
        &mut self,
    ) -> impl Future<Output = Result<(DomainEvent, Instant), HypervisorError>> + Send;
}

/// One measured suspend (xenstore path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// From libxl's request to the guest's acknowledgement.
    pub request_to_ack: Option<Duration>,
    /// From libxl's request to the domain suspended.
    pub request_to_suspended: Duration,
}

/// Where the clock is between events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    Requested(Instant),
    Acknowledged(Instant, Instant),
}

/// Turns the event sequence of the xenstore path into timings. Pure.
///
/// Per checkpoint xenstore shows: `control/shutdown` written twice (libxl's "suspend",
/// then the guest's ""), then `@releaseDomain`. Values are not read back (the guest's
/// ack can overwrite "suspend" before a read arrives); the order is what counts, and
/// `@releaseDomain` resets it. A write after the ack starts a new request (libxl
/// cancelled one and asks again). The first event of each watch is the one xenstored
/// sends when the watch is registered: the implementation drops it.
#[derive(Clone, Debug)]
pub struct SuspendClock {
    phase: Phase,
}

impl Default for SuspendClock {
    fn default() -> Self {
        SuspendClock { phase: Phase::Idle }
    }
}

impl SuspendClock {
    /// Feeds one event; returns a timing when a suspend completed.
    pub fn on(&mut self, ev: DomainEvent, at: Instant) -> Option<Timing> {
        match (self.phase, ev) {
            (Phase::Idle | Phase::Acknowledged(..), DomainEvent::ControlWritten) => {
                self.phase = Phase::Requested(at);
                None
            }
            (Phase::Requested(t0), DomainEvent::ControlWritten) => {
                self.phase = Phase::Acknowledged(t0, at);
                None
            }
            (Phase::Idle, DomainEvent::Released) => None,
            (Phase::Requested(t0), DomainEvent::Released) => {
                self.phase = Phase::Idle;
                Some(Timing {
                    request_to_ack: None,
                    request_to_suspended: at.saturating_duration_since(t0),
                })
            }
            (Phase::Acknowledged(t0, t1), DomainEvent::Released) => {
                self.phase = Phase::Idle;
                Some(Timing {
                    request_to_ack: Some(t1.saturating_duration_since(t0)),
                    request_to_suspended: at.saturating_duration_since(t0),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(guest_type: GuestType, event_channel: bool, feature_suspend: bool) -> DomainFacts {
        DomainFacts {
            name: "guest".into(),
            domid: 3,
            guest_type,
            event_channel,
            feature_suspend,
            device_model: guest_type == GuestType::Hvm,
        }
    }

    #[test]
    fn the_path_follows_libxls_rule() {
        use GuestType::*;
        use SuspendPath::*;
        for (t, evtchn, feature, want) in [
            (Pv, true, true, EventChannel),
            (Pv, false, true, XenstoreControl),
            (Pv, false, false, XenstoreControl),
            (Pvh, false, true, XenstoreControl),
            // PVH always has PV drivers' xenstore path (no device model to fall back on).
            (Pvh, false, false, XenstoreControl),
            (Pvh, true, true, EventChannel),
            (Hvm, false, true, XenstoreControl),
            (Hvm, false, false, ShutdownSuspend),
            (Hvm, true, false, EventChannel),
        ] {
            assert_eq!(
                suspend_path(&facts(t, evtchn, feature)).path,
                want,
                "{t:?} evtchn={evtchn} feature-suspend={feature}"
            );
        }
    }

    #[test]
    fn only_a_pv_guest_without_the_event_channel_is_warned_about() {
        assert!(
            suspend_path(&facts(GuestType::Pv, false, true))
                .warning
                .is_some()
        );
        for f in [
            facts(GuestType::Pv, true, true),
            facts(GuestType::Pvh, false, true),
            facts(GuestType::Hvm, false, false),
        ] {
            assert_eq!(suspend_path(&f).warning, None, "{f:?}");
        }
    }

    #[test]
    fn a_missing_domain_is_a_usage_error_and_no_xenstore_is_unsupported() {
        use crate::exit::{ExitCode, HasExitCode};
        assert_eq!(
            HypervisorError::NoSuchDomain("x".into()).exit_code(),
            ExitCode::Usage
        );
        let nox = HypervisorError::Unreachable {
            tried: "/run/xenstored/socket".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(nox.exit_code(), ExitCode::Unsupported);
        assert_eq!(HypervisorError::Closed.exit_code(), ExitCode::Failure);
    }

    #[test]
    fn the_clock_times_request_ack_and_suspend() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let mut c = SuspendClock::default();
        assert_eq!(c.on(DomainEvent::Released, ms(0)), None, "idle: nothing");
        assert_eq!(c.on(DomainEvent::ControlWritten, ms(10)), None);
        assert_eq!(c.on(DomainEvent::ControlWritten, ms(14)), None);
        assert_eq!(
            c.on(DomainEvent::Released, ms(40)),
            Some(Timing {
                request_to_ack: Some(Duration::from_millis(4)),
                request_to_suspended: Duration::from_millis(30),
            })
        );
        // The next checkpoint starts afresh.
        c.on(DomainEvent::ControlWritten, ms(300));
        c.on(DomainEvent::ControlWritten, ms(302));
        let t2 = c.on(DomainEvent::Released, ms(320)).unwrap();
        assert_eq!(t2.request_to_suspended, Duration::from_millis(20));
    }

    #[test]
    fn a_cancelled_request_is_followed_by_a_new_one() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let mut c = SuspendClock::default();
        // Request, libxl's cancel (""), no suspend; then a new request and its ack.
        c.on(DomainEvent::ControlWritten, ms(0));
        c.on(DomainEvent::ControlWritten, ms(60_000));
        c.on(DomainEvent::ControlWritten, ms(60_100));
        c.on(DomainEvent::ControlWritten, ms(60_103));
        let r = c.on(DomainEvent::Released, ms(60_150)).unwrap();
        assert_eq!(r.request_to_suspended, Duration::from_millis(50));
        assert_eq!(r.request_to_ack, Some(Duration::from_millis(3)));
    }
}
