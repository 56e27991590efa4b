//! Is the backup there, and does it hold our key? Asked before anything is started.
//!
//! Owns: one short connection to the backup's `remus relay receive`, running the relay's
//! own probe (`replication::client_probe`: the whole handshake with HELLO's probe flag,
//! both proofs of the key checked, the backup's sealed PROBE_OK), and turning its result
//! into what `remus protect` reports. Never touches: a session (the backup starts no
//! receiver for a probe, counts no refusal), the relay's code paths.
use std::time::Duration;

use tokio::net::TcpStream;

use crate::compress::Codec;
use crate::replication::{self, ClientConfig, Key, WireError};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot reach the backup at {addr}: {source}")]
    Unreachable {
        addr: String,
        source: std::io::Error,
    },
    #[error("the backup at {addr} did not answer within {secs} s")]
    Timeout { addr: String, secs: u64 },
    #[error("the backup at {addr} holds a different key: its proof of the key did not verify")]
    WrongKey { addr: String },
    #[error("the backup at {addr} refused: {reason}")]
    Refused { addr: String, reason: String },
    #[error(
        "the backup at {addr} is replicating another primary now (a session would be refused as busy)"
    )]
    Busy { addr: String },
    #[error("{addr} does not speak the remus relay protocol ({source})")]
    NotRemus { addr: String, source: WireError },
}

/// What the probe learnt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeOk {
    pub version: u16,
}

/// Connects to `addr` (HOST:PORT), runs the relay's probe with `key`, and leaves.
pub async fn probe(addr: &str, key: &Key, timeout: Duration) -> Result<ProbeOk, ProbeError> {
    let a = addr.to_string();
    let tmo = || ProbeError::Timeout {
        addr: a.clone(),
        secs: timeout.as_secs().max(1),
    };
    let mut s = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| tmo())?
        .map_err(|source| ProbeError::Unreachable {
            addr: a.clone(),
            source,
        })?;
    let mut cfg = ClientConfig::new(key.clone(), Codec::None, 0);
    cfg.timeout = timeout;
    match replication::client_probe(&mut s, &cfg).await {
        Ok(p) if p.busy => Err(ProbeError::Busy { addr: a }),
        Ok(p) => Ok(ProbeOk { version: p.version }),
        Err(WireError::AuthFailed(_)) => Err(ProbeError::WrongKey { addr: a }),
        Err(WireError::Refused(reason)) => Err(ProbeError::Refused { addr: a, reason }),
        Err(WireError::Timeout(_)) => Err(tmo()),
        Err(source) => Err(ProbeError::NotRemus { addr: a, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::{Message, ServerConfig, server_handshake};

    /// One backup connection served by the relay's own handshake, answering a probe as
    /// `relay receive` does. Returns what the backup's handshake saw.
    async fn backup(
        key: &'static [u8],
    ) -> (
        String,
        tokio::task::JoinHandle<Result<replication::Session, WireError>>,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let cfg = ServerConfig {
                key: Key::from_bytes(key).unwrap(),
                timeout: Duration::from_secs(5),
            };
            let session = server_handshake(&mut s, &cfg).await?;
            if session.probe {
                let m = Message::ProbeOk { busy: false };
                session.keys.sealer.send(&mut s, &m).await?;
            }
            Ok(session)
        });
        (addr, h)
    }

    fn key(k: &[u8]) -> Key {
        Key::from_bytes(k).unwrap()
    }

    #[tokio::test]
    async fn the_real_backup_handshake_passes_with_the_right_key() {
        let (addr, h) = backup(b"0123456789abcdef").await;
        let ok = probe(&addr, &key(b"0123456789abcdef"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(ok.version, replication::VERSION);
        // The backup knew it was a probe: it starts no session for it.
        assert!(h.await.unwrap().unwrap().probe);
    }

    #[tokio::test]
    async fn a_different_key_is_named() {
        let (addr, h) = backup(b"0123456789abcdef").await;
        let e = probe(&addr, &key(b"fedcba9876543210"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, ProbeError::WrongKey { .. }), "{e}");
        assert!(matches!(h.await.unwrap(), Err(WireError::Refused(_))));
    }

    #[tokio::test]
    async fn nobody_listening_is_unreachable() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let e = probe(&addr, &key(b"k"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, ProbeError::Unreachable { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_and_a_stranger_is_not_remus() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = tokio::spawn(async move {
            let (s1, _) = l.accept().await.unwrap();
            let (mut s2, _) = l.accept().await.unwrap();
            use tokio::io::AsyncWriteExt;
            let _ = s2
                .write_all(b"SSH-2.0-OpenSSH_9.2\r\n0000000000000000")
                .await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(s1);
        });
        let e = probe(&addr, &key(b"k"), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, ProbeError::Timeout { .. }), "{e}");
        let e = probe(&addr, &key(b"k"), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(e, ProbeError::NotRemus { .. }), "{e}");
        h.abort();
    }
}
