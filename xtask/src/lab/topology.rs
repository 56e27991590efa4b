//! The lab's two hosts and its two networks: names, addresses, MACs, in one place.
//!
//! ```text
//!  machine ─────────────────────────────────────────────────────────────────────────────
//!   netns remus-lab: counter-client 169.254.0.10 ── tap remuslab0 ─┐
//!                                                                  │
//!   switch QEMU (-machine none, no guest code): hub 0 = client LAN [tap, A, B]
//!                                               hub 1 = replication link [A, B]
//!        127.0.0.1 TCP (QEMU socket netdevs) ▲ lan-a ▲ repl-a    ▲ lan-b ▲ repl-b
//!   host A: QEMU, Xen + dom0                 │       │           │       │
//!     lan0  ── xenbr0 169.254.0.1 ── vifN.0 (guest 169.254.0.2)  │       │
//!     repl0 169.254.200.1 ───────────────────────────── repl0 169.254.200.2
//!   host B: QEMU, Xen + dom0      lan0 ── xenbr0 169.254.0.3 ── (backup copy)
//! ```
//!
//! The second client LAN (two-vif guests): the switch's third hub. The client's namespace
//! has a second tap `remuslab1` at 169.254.1.10/24; each host has a third NIC (MAC
//! `lan2_mac`), which `lab.sh lan2-up` names `lan1` and puts in bridge `xenbr1`
//! (169.254.1.1 on A, .3 on B); the guest's second vif joins `xenbr1`, its eth1 is
//! 169.254.1.2/24 with a counter service of its own on port 7001.
//!
//! Owns: these constants and the `Host` type. Never touches: anything (no I/O).
use clap::ValueEnum;
use serde::Serialize;

/// One of the lab's two Xen hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Host {
    A,
    B,
}

impl Host {
    pub const ALL: [Host; 2] = [Host::A, Host::B];

    pub fn name(self) -> &'static str {
        match self {
            Host::A => "a",
            Host::B => "b",
        }
    }

    /// dom0's address on the client LAN (its bridge `xenbr0`).
    pub fn bridge_ip(self) -> &'static str {
        match self {
            Host::A => "169.254.0.1",
            Host::B => "169.254.0.3",
        }
    }

    /// dom0's address on the replication link (`repl0`, a /24 of its own).
    pub fn repl_ip(self) -> &'static str {
        match self {
            Host::A => "169.254.200.1",
            Host::B => "169.254.200.2",
        }
    }

    /// The MAC of the host's NIC on the client LAN (dom0 names it `lan0`).
    pub fn lan_mac(self) -> &'static str {
        match self {
            Host::A => "52:54:00:4c:00:0a",
            Host::B => "52:54:00:4c:00:0b",
        }
    }

    /// The MAC of the host's NIC on the second client LAN (`lab.sh lan2-up` names it
    /// `lan1`; `52:54:00:4c:01:` is how it finds it).
    pub fn lan2_mac(self) -> &'static str {
        match self {
            Host::A => "52:54:00:4c:01:0a",
            Host::B => "52:54:00:4c:01:0b",
        }
    }

    /// The MAC of the host's NIC on the replication link (dom0 names it `repl0`).
    pub fn repl_mac(self) -> &'static str {
        match self {
            Host::A => "52:54:00:52:00:0a",
            Host::B => "52:54:00:52:00:0b",
        }
    }
}

/// The guest's address and MAC: the backup copy resumes with both.
pub const GUEST_IP: &str = "169.254.0.2";
pub const GUEST_MAC: &str = "00:16:3e:4c:41:42";
/// The guest's counter service.
pub const SERVICE_PORT: u16 = 7000;
/// The client, on the machine, in its own network namespace on the client LAN.
pub const CLIENT_NETNS: &str = "remus-lab";
pub const CLIENT_TAP: &str = "remuslab0";
pub const CLIENT_IP: &str = "169.254.0.10";
/// The backup relay's port on the replication link.
pub const RELAY_PORT: u16 = 7788;

/// The client's tap on the second client LAN, and the client's address there.
pub const CLIENT2_TAP: &str = "remuslab1";
pub const CLIENT2_IP: &str = "169.254.1.10";
/// The guest's second vif: its address (eth1) and the counter service behind it (a
/// process of its own: its own counter).
pub const GUEST2_IP: &str = "169.254.1.2";
pub const SERVICE2_PORT: u16 = 7001;
