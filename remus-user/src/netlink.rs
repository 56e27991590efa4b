//! Interface facts and changes through rtnetlink.
//!
//! Owns: resolving interface names to indexes (and back), bringing the helper device
//! up, deleting the clsact qdisc remus-net added, noticing that a vif is gone.
//! Never touches: BPF objects (aya's own tc helpers add clsact and filters in
//! `datapath`), frames, sockets other than its netlink one.
use futures::TryStreamExt;
use netlink_packet_route::{
    link::{LinkAttribute, LinkMessage},
    tc::TcHandle,
};
use rtnetlink::Handle;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("no network interface named {0:?} (see `ip link`)")]
    NoSuchInterface(String),
    #[error("interface name {0:?} is not valid (1 to 15 bytes, no '/', no spaces)")]
    BadName(String),
    #[error("netlink {op}: {source}")]
    Request {
        op: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
}

/// A connection to rtnetlink; the connection task runs on the current tokio runtime.
pub struct Netlink {
    handle: Handle,
}

/// Checks an interface name the way the kernel will (IFNAMSIZ and forbidden bytes), so
/// that a typo is reported as such rather than as an odd kernel error.
pub fn validate_name(name: &str) -> Result<(), NetlinkError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if ok {
        Ok(())
    } else {
        Err(NetlinkError::BadName(name.to_string()))
    }
}

fn is_enodev(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m)
        if m.code.map(|c| -c.get()) == Some(libc::ENODEV))
}

/// A link lookup's answer: ENODEV (no such link) is `None`, not an error.
fn gone_is_none(
    r: Result<Option<LinkMessage>, rtnetlink::Error>,
) -> Result<Option<LinkMessage>, NetlinkError> {
    match r {
        Ok(m) => Ok(m),
        Err(e) if is_enodev(&e) => Ok(None),
        Err(source) => Err(NetlinkError::Request {
            op: "get link",
            source,
        }),
    }
}

impl Netlink {
    pub fn connect() -> Result<Netlink, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        validate_name(name)?;
        let mut req = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        gone_is_none(req.try_next().await)
    }

    /// ifindex of `name`, or `NoSuchInterface`.
    pub async fn ifindex(&self, name: &str) -> Result<u32, NetlinkError> {
        self.link_by_name(name)
            .await?
            .map(|m| m.header.index)
            .ok_or_else(|| NetlinkError::NoSuchInterface(name.to_string()))
    }

    /// The link with `index`, or None if it is gone.
    async fn link_by_index(&self, index: u32) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut req = self.handle.link().get().match_index(index).execute();
        gone_is_none(req.try_next().await)
    }

    /// Name of the interface with `index`, or None if it is gone.
    pub async fn name_of(&self, index: u32) -> Result<Option<String>, NetlinkError> {
        Ok(self.link_by_index(index).await?.and_then(|m| {
            m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
        }))
    }

    /// MTU of `index`.
    pub async fn mtu(&self, index: u32) -> Result<Option<u32>, NetlinkError> {
        Ok(self.link_by_index(index).await?.and_then(|m| {
            m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(n) => Some(*n),
                _ => None,
            })
        }))
    }

    pub async fn set_up(&self, index: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(index)
            .up()
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                op: "set link up",
                source,
            })
    }

    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(index)
            .mtu(mtu)
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                op: "set link mtu",
                source,
            })
    }

    /// Deletes the clsact qdisc of `name` (like `tc qdisc del dev NAME clsact`).
    pub async fn delete_clsact(&self, name: &str) -> Result<(), NetlinkError> {
        let index = self.ifindex(name).await?;
        let mut req = self.handle.qdisc().del(index as i32);
        req.message_mut().header.parent = TcHandle::CLSACT;
        req.message_mut().header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        req.execute().await.map_err(|source| NetlinkError::Request {
            op: "delete clsact qdisc",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_like_the_kernel_does() {
        assert!(validate_name("vif5.0").is_ok());
        assert!(validate_name("a23456789012345").is_ok());
        for bad in ["", "a234567890123456", "a/b", "a b", ".", "..", "eth0:1"] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
