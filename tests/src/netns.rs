//! What the test files use of the shared kit (`remus-testkit`), in test form: a fixture
//! that cannot do its step fails the test with the kit's error, naming the step.
//!
//! Owns: that policy only; the fixtures themselves live in the kit, the remus-net driver
//! (`Topo`) in `remus_net`. Never touches: anything the kit or `Topo` does not create.
use std::{ops::Deref, path::PathBuf, time::Duration};

use remus_testkit as kit;

pub use crate::remus_net::Topo;
pub use kit::{
    cmd::process_alive as pid_alive,
    frames::{
        GUEST_IP, GUEST_IP6, GUEST_MAC, PEER_IP, PEER_IP6, PEER_MAC, arp_request, eth_frame,
        ipv4_udp, vlan_frame,
    },
    packet::{Captured, PacketSocket},
};

/// The built `remus-net`: `$REMUS_NET_BIN`, else next to this test executable's profile
/// directory (target/<profile>/remus-net), built with cargo when missing.
pub fn remus_net_bin() -> PathBuf {
    kit::bins::for_this_test("remus-net", "REMUS_NET_BIN").unwrap_or_else(|e| panic!("{e}"))
}

/// Result of one command, with the test's shortcuts.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<kit::cmd::Out> for Out {
    fn from(o: kit::cmd::Out) -> Out {
        Out {
            code: o.code,
            stdout: o.stdout,
            stderr: o.stderr,
        }
    }
}

impl Out {
    /// Panics unless the command exited 0.
    pub fn ok(self, what: &str) -> Out {
        let kit = kit::cmd::Out {
            code: self.code,
            stdout: self.stdout,
            stderr: self.stderr,
        };
        kit.check(what)
            .map(Out::from)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// Runs a command, capturing its output (panics only if it cannot be started).
pub fn run(program: &str, args: &[&str]) -> Out {
    kit::cmd::run(program, args)
        .map(Out::from)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `program args` inside network namespace `ns` (nsenter: same mount namespace).
pub fn run_in(ns: &str, program: &str, args: &[&str]) -> Out {
    kit::cmd::run_in(ns, program, args)
        .map(Out::from)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `cond` until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    kit::wait_until(what, timeout, cond).unwrap_or_else(|e| panic!("{e}"))
}

/// Moves the calling thread into network namespace `ns`.
pub fn enter_netns(ns: &str) -> Result<(), kit::KitError> {
    kit::ns::enter_netns(ns)
}

/// Runs `f` on a fresh thread inside network namespace `ns` and returns its result.
pub fn in_netns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    kit::ns::in_netns(ns, f).unwrap_or_else(|e| panic!("{e}"))
}

/// Sends raw frames on `iface` of namespace `ns`.
pub fn send_raw(ns: &str, iface: &str, frames: Vec<Vec<u8>>) {
    kit::packet::send_raw(ns, iface, frames).unwrap_or_else(|e| panic!("{e}"))
}

/// Sends `payloads` as UDP datagrams from namespace `ns` to `dst`.
pub fn send_udp(ns: &str, dst: std::net::SocketAddr, payloads: Vec<Vec<u8>>) {
    kit::packet::send_udp(ns, dst, payloads).unwrap_or_else(|e| panic!("{e}"))
}

/// Sends `payload` from namespace `ns` to `dst` as one UDP GSO super-frame.
pub fn send_udp_gso(ns: &str, dst: std::net::SocketAddr, payload: Vec<u8>, segment: u16) {
    kit::packet::send_udp_gso(ns, dst, payload, segment).unwrap_or_else(|e| panic!("{e}"))
}

/// The kit's recorder; `wait_for` gives up after 20 s.
pub struct Sniffer(kit::packet::Sniffer);

impl Deref for Sniffer {
    type Target = kit::packet::Sniffer;
    fn deref(&self) -> &kit::packet::Sniffer {
        &self.0
    }
}

impl Sniffer {
    /// Starts recording; returns once the socket is bound (nothing later is missed).
    pub fn start(ns: &str, iface: &str) -> Sniffer {
        Sniffer(kit::packet::Sniffer::start(ns, iface).unwrap_or_else(|e| panic!("sniffer: {e}")))
    }

    /// Waits until `pred` holds for the recorded frames (panics after 20 s).
    pub fn wait_for(&self, what: &str, pred: impl FnMut(&[Captured]) -> bool) -> Vec<Captured> {
        self.0
            .wait_for(what, Duration::from_secs(20), pred)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}
