//! Is the backup there, and does it hold our key? Asked before anything is started.
//!
//! Owns: one short connection to the backup's `remus relay receive`: HELLO, then the
//! backup's CHALLENGE, whose proof of the key is checked here, then an ABORT saying it was
//! a probe. The backup never sees our proof, so it never starts a receiver for it (it logs
//! one refused connection, naming the probe). Never touches: a session (no WELCOME, no
//! stream), the relay's code paths.
//!
//! The backup's proof is HMAC-SHA256(key, "remus-relay v3 backup proof" ‖ th), th the
//! handshake transcript (`replication::kdf::transcript`), as in `replication::auth`. The replication module keeps
//! its key and `verify` private, so the proof is recomputed here from the key file; a
//! test runs the real `server_handshake` against this probe (right and wrong key) so the
//! two cannot drift apart silently. (Asked of the relay: a probe flag in HELLO and a
//! public `client_probe`, which would replace this.)
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::net::TcpStream;

use crate::replication::{self, Hello, MIN_VERSION, Message, VERSION, WireError};

const LABEL_SERVER: &[u8] = b"remus-relay v3 backup proof";

/// The reason the backup logs for our ABORT.
pub const PROBE_REASON: &str =
    "probe by remus protect: key and version checked before protecting; no session wanted";

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
    #[error("{addr} does not speak the remus relay protocol ({source})")]
    NotRemus { addr: String, source: WireError },
    #[error("reading the key file {path}: {source}")]
    Key {
        path: String,
        source: std::io::Error,
    },
}

/// What the probe learnt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeOk {
    pub version: u16,
}

/// The key's bytes as `replication::Key::load` takes them (trailing whitespace trimmed).
/// The caller has already checked the file with `Key::load` (mode, emptiness).
pub fn key_bytes(path: &Path) -> Result<Vec<u8>, ProbeError> {
    let mut b = std::fs::read(path).map_err(|source| ProbeError::Key {
        path: path.display().to_string(),
        source,
    })?;
    while b.last().is_some_and(|c| c.is_ascii_whitespace()) {
        b.pop();
    }
    Ok(b)
}

fn backup_proof_ok(key: &[u8], hello: &Hello, version: u16, nb: &[u8; 32], mac: &[u8]) -> bool {
    let Ok(mut m) = <Hmac<Sha256> as Mac>::new_from_slice(key) else {
        return false;
    };
    m.update(LABEL_SERVER);
    m.update(&replication::kdf::transcript(hello, version, nb));
    m.verify_slice(mac).is_ok()
}

/// Connects to `addr` (HOST:PORT), checks the backup's proof of `key`, and leaves.
pub async fn probe(addr: &str, key: &[u8], timeout: Duration) -> Result<ProbeOk, ProbeError> {
    let a = addr.to_string();
    let secs = timeout.as_secs().max(1);
    let tmo = || ProbeError::Timeout {
        addr: a.clone(),
        secs,
    };
    let mut s = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| tmo())?
        .map_err(|source| ProbeError::Unreachable {
            addr: a.clone(),
            source,
        })?;
    let mut nonce = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let hello = Hello {
        max_version: VERSION,
        min_version: MIN_VERSION,
        codec: crate::compress::Codec::None,
        cache_pages: 0,
        nonce,
    };
    let not_remus = |source| ProbeError::NotRemus {
        addr: a.clone(),
        source,
    };
    replication::send(&mut s, &Message::Hello(hello))
        .await
        .map_err(not_remus)?;
    let answer = tokio::time::timeout(timeout, replication::read_message(&mut s))
        .await
        .map_err(|_| tmo())?;
    let r = match answer {
        Ok(Message::Challenge {
            version,
            nonce: nb,
            mac,
        }) => {
            if backup_proof_ok(key, &hello, version, &nb, &mac) {
                Ok(ProbeOk { version })
            } else {
                Err(ProbeError::WrongKey { addr: a.clone() })
            }
        }
        Ok(Message::Abort { reason }) => {
            return Err(ProbeError::Refused {
                addr: a.clone(),
                reason,
            });
        }
        Ok(other) => Err(not_remus(WireError::Unexpected {
            expected: "CHALLENGE",
            got: other.kind(),
        })),
        Err(e) => Err(not_remus(e)),
    };
    // Tell the backup why we leave (its log then says "probe", not a mystery).
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        replication::send(&mut s, &Message::abort(PROBE_REASON)),
    )
    .await;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::{Key, ServerConfig, server_handshake};

    async fn backup(
        key: &'static [u8],
    ) -> (String, tokio::task::JoinHandle<Result<(), WireError>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let cfg = ServerConfig {
                key: Key::from_bytes(key).unwrap(),
                timeout: Duration::from_secs(5),
            };
            server_handshake(&mut s, &cfg).await.map(|_| ())
        });
        (addr, h)
    }

    #[tokio::test]
    async fn the_real_backup_handshake_passes_with_the_right_key() {
        let (addr, h) = backup(b"0123456789abcdef").await;
        let ok = probe(&addr, b"0123456789abcdef", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(ok.version, VERSION);
        // The backup saw an ABORT, not a proof: no session could have started.
        assert!(matches!(h.await.unwrap(), Err(WireError::Refused(_))));
    }

    #[tokio::test]
    async fn a_different_key_is_named() {
        let (addr, _h) = backup(b"0123456789abcdef").await;
        let e = probe(&addr, b"fedcba9876543210", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, ProbeError::WrongKey { .. }), "{e}");
    }

    #[tokio::test]
    async fn nobody_listening_is_unreachable() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let e = probe(&addr, b"k", Duration::from_secs(5))
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
        let e = probe(&addr, b"k", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, ProbeError::Timeout { .. }), "{e}");
        let e = probe(&addr, b"k", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(e, ProbeError::NotRemus { .. }), "{e}");
        h.abort();
    }

    #[test]
    fn key_bytes_trim_like_the_relay() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(&p, "abc \n\n").unwrap();
        assert_eq!(key_bytes(&p).unwrap(), b"abc");
    }
}
