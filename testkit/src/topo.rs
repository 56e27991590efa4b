//! The test topology: a guest namespace whose eth0 is one end of a veth pair, the other
//! end (the "vif") a port of a bridge in the host namespace (dom0), and a peer namespace
//! on the same bridge playing the LAN.
//!
//! ```text
//!  netns <p>g "guest"           netns <p>h "host" (dom0)                netns <p>p "peer"
//!  eth0 02:00:00:00:00:01 ── <vif> ─┐                             ┌─ <p>l ── eth0 02:00:00:00:00:02
//!  10.77.0.1/24  fd77::1/64         └──── br0 (stp off, fd 0) ────┘        10.77.0.2/24 fd77::2/64
//! ```
//!
//! Owns: the three namespaces and their devices (every name carries the prefix) and the
//! processes running inside them (killed when the namespaces are removed). Never
//! touches: any other namespace, remus's runtime files or pins (its callers own those).
use crate::{
    Result,
    cmd::{ip, run_in},
    frames::{GUEST_IP, GUEST_IP6, GUEST_MAC, PEER_IP, PEER_IP6, PEER_MAC, mac_str},
    ns,
};

/// Names of one topology's namespaces and devices.
#[derive(Clone, Debug)]
pub struct Lan {
    pub prefix: String,
    pub host: String,
    pub guest: String,
    pub peer: String,
    /// The vif: host side of the guest's veth, a bridge port.
    pub vif: String,
    /// The peer's bridge port.
    pub lan: String,
}

impl Lan {
    /// The names for `prefix`, the vif called `<prefix><vif_suffix>` (e.g. "v", or
    /// "v.0" for a Xen-like name). Nothing is created yet.
    pub fn named(prefix: &str, vif_suffix: &str) -> Lan {
        Lan {
            prefix: prefix.to_string(),
            host: format!("{prefix}h"),
            guest: format!("{prefix}g"),
            peer: format!("{prefix}p"),
            vif: format!("{prefix}{vif_suffix}"),
            lan: format!("{prefix}l"),
        }
    }

    /// Removes whatever an earlier run left, then creates the topology (IPv6 off).
    pub fn build(&self) -> Result<()> {
        self.remove();
        for n in [&self.host, &self.guest, &self.peer] {
            ns::create(n, false)?;
        }
        let h = self.host.as_str();
        ip(
            h,
            &[
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ],
        )?;
        for (dev, other) in [(&self.vif, &self.guest), (&self.lan, &self.peer)] {
            ip(
                h,
                &[
                    "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", other,
                ],
            )?;
            ip(h, &["link", "set", dev, "master", "br0"])?;
            ip(h, &["link", "set", dev, "up"])?;
        }
        ip(h, &["link", "set", "br0", "up"])?;
        for (n, mac, addr, other_ip, other_mac) in [
            (&self.guest, GUEST_MAC, GUEST_IP, PEER_IP, PEER_MAC),
            (&self.peer, PEER_MAC, PEER_IP, GUEST_IP, GUEST_MAC),
        ] {
            ip(n, &["link", "set", "eth0", "address", &mac_str(&mac)])?;
            ip(n, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip(n, &["link", "set", "eth0", "up"])?;
            // Static neighbours: no ARP in front of test traffic (a held ARP request would
            // make the kernel queue and drop what follows).
            static_neighbour(n, other_ip, &other_mac)?;
        }
        Ok(())
    }

    /// Enables IPv6 on guest and peer (static addresses without DAD, static neighbours).
    pub fn enable_ipv6(&self) -> Result<()> {
        for (n, addr, other_ip, other_mac) in [
            (&self.guest, GUEST_IP6, PEER_IP6, PEER_MAC),
            (&self.peer, PEER_IP6, GUEST_IP6, GUEST_MAC),
        ] {
            for s in [
                "net.ipv6.conf.eth0.accept_ra=0",
                "net.ipv6.conf.eth0.router_solicitations=0",
                "net.ipv6.conf.eth0.disable_ipv6=0",
            ] {
                run_in(n, "sysctl", &["-qw", s])?.check("sysctl")?;
            }
            ip(
                n,
                &["addr", "add", &format!("{addr}/64"), "dev", "eth0", "nodad"],
            )?;
            static_neighbour(n, other_ip, &other_mac)?;
        }
        Ok(())
    }

    /// Kills what runs inside the three namespaces and deletes them (devices go too).
    pub fn remove(&self) {
        for n in [&self.host, &self.guest, &self.peer] {
            ns::remove(n);
        }
    }
}

fn static_neighbour(netns: &str, addr: &str, mac: &[u8; 6]) -> Result<()> {
    let mac = mac_str(mac);
    let args = [
        "neigh",
        "replace",
        addr,
        "lladdr",
        &mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ];
    ip(netns, &args).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix_and_the_vif_suffix() {
        let l = Lan::named("rab12", "v.0");
        assert_eq!(
            [&l.host, &l.guest, &l.peer, &l.vif, &l.lan],
            ["rab12h", "rab12g", "rab12p", "rab12v.0", "rab12l"]
        );
    }
}
