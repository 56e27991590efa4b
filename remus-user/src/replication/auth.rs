//! The pre-shared key and the mutual HMAC-SHA256 challenge/response of the handshake.
//!
//! Owns: loading and checking the key file, nonces, the proofs both ways, version
//! negotiation, and deriving the session's keys at its end (through `kdf`). Never
//! touches: anything after WELCOME (stream data, acks, heartbeats), nor sealing itself
//! (`seal`).
//!
//! Each side proves it holds the key over the transcript (HELLO as the primary sent it,
//! the chosen version, both nonces), with a different label per side so one side's proof
//! can never be replayed as the other's. The backup proves first, but only over a nonce
//! of its own choosing too, so a peer without the key learns nothing it can reuse; a
//! HELLO rewritten on the way (an older version, no compression, a probe made a session
//! or the other way round) makes the proofs fail.
//!
//! A probe ([`client_probe`]) is the same handshake with HELLO's probe flag: the backup
//! answers PROBE_OK (sealed, so it proves the backup derived the same keys) instead of
//! WELCOME, and neither end starts anything.
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::compress::Codec;

use super::kdf;
use super::seal::{Keys, Role};
use super::{
    Hello, KeyProblem, MIN_VERSION, Message, Prover, VERSION, VERSION_COMPRESSION, WireError,
    read_message, read_sealed_or_plain, send,
};

type HmacSha256 = Hmac<Sha256>;

const LABEL_SERVER: &[u8] = b"remus-relay v3 backup proof";
const LABEL_CLIENT: &[u8] = b"remus-relay v3 primary proof";

/// Shorter keys are accepted with a warning.
pub const MIN_RECOMMENDED_KEY: usize = 16;

/// The pre-shared key. Its bytes never appear in Debug output or logs.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

impl Key {
    /// The key from raw bytes (tests, tools). Empty keys are refused.
    pub fn from_bytes(b: &[u8]) -> Result<Key, WireError> {
        if b.is_empty() {
            return Err(WireError::KeyFile {
                path: "<bytes>".into(),
                problem: KeyProblem::Empty,
            });
        }
        Ok(Key(b.to_vec()))
    }

    /// Loads a key file: it must exist, be a regular file, be readable by its owner only
    /// (mode 0600 or stricter: refused otherwise), and hold at least one byte after
    /// trailing whitespace is trimmed (so `openssl rand -hex 32 > key` works on both ends).
    pub fn load(path: &Path) -> Result<Key, WireError> {
        let p = path.display().to_string();
        let err = |problem| WireError::KeyFile {
            path: p.clone(),
            problem,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(KeyProblem::Unreadable(e)))?;
        if !meta.is_file() {
            return Err(err(KeyProblem::NotAFile));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(err(KeyProblem::Readable {
                mode,
                path: p.clone(),
            }));
        }
        let mut bytes = std::fs::read(path).map_err(|e| err(KeyProblem::Unreadable(e)))?;
        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err(err(KeyProblem::Empty));
        }
        if bytes.len() < MIN_RECOMMENDED_KEY {
            tracing::warn!(path = %p, len = bytes.len(), "the key is short; use at least {MIN_RECOMMENDED_KEY} random bytes");
        }
        Ok(Key(bytes))
    }

    fn proof(&self, label: &[u8], transcript: &[u8; 32]) -> HmacSha256 {
        // HMAC takes keys of any length.
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        m.update(label);
        m.update(transcript);
        m
    }

    fn prove(&self, label: &[u8], transcript: &[u8; 32]) -> [u8; 32] {
        self.proof(label, transcript).finalize().into_bytes().into()
    }

    /// Constant-time check of a peer's proof.
    fn verify(&self, label: &[u8], transcript: &[u8; 32], mac: &[u8; 32]) -> bool {
        self.proof(label, transcript).verify_slice(mac).is_ok()
    }

    /// The session's keys for `role` (both ends derive the same pair).
    fn keys(
        &self,
        role: Role,
        nonce_p: &[u8; 32],
        nonce_b: &[u8; 32],
        transcript: &[u8; 32],
    ) -> Keys {
        let (p2b, b2p) = kdf::traffic_secrets(&self.0, nonce_p, nonce_b, transcript);
        Keys::new(role, &p2b, &b2p)
    }
}

/// What the primary asks for.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub key: Key,
    /// Page-data compression asked for (see `compress`).
    pub codec: Codec,
    pub cache_pages: u32,
    /// Version range announced (tests use other ranges to provoke skew).
    pub max_version: u16,
    pub min_version: u16,
    /// Per handshake step.
    pub timeout: Duration,
}

impl ClientConfig {
    pub fn new(key: Key, codec: Codec, cache_pages: u32) -> ClientConfig {
        ClientConfig {
            key,
            codec,
            cache_pages,
            max_version: VERSION,
            min_version: MIN_VERSION,
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub key: Key,
    pub timeout: Duration,
}

/// What both sides agreed on, and the keys of the sealed channel that follows.
#[derive(Clone, Debug)]
pub struct Session {
    pub version: u16,
    /// `Codec::None` when the version does not allow compression.
    pub codec: Codec,
    pub cache_pages: u32,
    /// Seal every frame sent from now on with `keys.sealer`; read with a `FrameReader`
    /// built on `keys.opener`. Clones share their counters.
    pub keys: Keys,
    /// The primary only probed (backup side): answer PROBE_OK, start nothing.
    pub probe: bool,
}

/// What a probe learnt: the backup holds the key, speaks `version`, and whether another
/// primary is being replicated there now (a session would be refused as busy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeAnswer {
    pub version: u16,
    pub busy: bool,
}

fn random_nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

async fn recv<S: AsyncRead + Unpin>(
    s: &mut S,
    t: Duration,
    what: &'static str,
) -> Result<Message, WireError> {
    tokio::time::timeout(t, read_message(s))
        .await
        .map_err(|_| WireError::Timeout(what))?
}

/// Primary side, up to and including WELCOME.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cfg: &ClientConfig,
) -> Result<Session, WireError> {
    let (version, keys) = client_auth(s, cfg, false).await?;
    match first_sealed(s, cfg, &keys, "the backup's welcome").await? {
        Message::Welcome => {}
        other => {
            return Err(WireError::Unexpected {
                expected: "WELCOME",
                got: other.kind(),
            });
        }
    }
    let codec = if version >= VERSION_COMPRESSION {
        cfg.codec
    } else {
        Codec::None
    };
    Ok(Session {
        version,
        codec,
        cache_pages: cfg.cache_pages,
        keys,
        probe: false,
    })
}

/// Primary side of a probe: the whole handshake with HELLO's probe flag, then the
/// backup's sealed PROBE_OK. Nothing is started at the backup; the caller drops the
/// connection. A wrong key is `AuthFailed(Prover::Backup)`, as for a session.
pub async fn client_probe<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cfg: &ClientConfig,
) -> Result<ProbeAnswer, WireError> {
    let (version, keys) = client_auth(s, cfg, true).await?;
    match first_sealed(s, cfg, &keys, "the backup's probe answer").await? {
        Message::ProbeOk { busy } => Ok(ProbeAnswer { version, busy }),
        other => Err(WireError::Unexpected {
            expected: "PROBE_OK",
            got: other.kind(),
        }),
    }
}

/// HELLO, the backup's CHALLENGE checked, AUTH sent: the chosen version and the
/// session's keys.
async fn client_auth<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cfg: &ClientConfig,
    probe: bool,
) -> Result<(u16, Keys), WireError> {
    let nonce_p = random_nonce();
    let hello = Hello {
        max_version: cfg.max_version,
        min_version: cfg.min_version,
        codec: cfg.codec,
        cache_pages: cfg.cache_pages,
        probe,
        nonce: nonce_p,
    };
    send(s, &Message::Hello(hello)).await?;
    let (version, nonce_b, th) = match recv(s, cfg.timeout, "the backup's challenge").await? {
        Message::Challenge {
            version,
            nonce,
            mac,
        } => {
            if version < cfg.min_version || version > cfg.max_version {
                let _ = send(s, &Message::abort("version out of the announced range")).await;
                return Err(WireError::Version {
                    ours_min: cfg.min_version,
                    ours_max: cfg.max_version,
                    theirs_min: version,
                    theirs_max: version,
                });
            }
            let th = kdf::transcript(&hello, version, &nonce);
            if !cfg.key.verify(LABEL_SERVER, &th, &mac) {
                let _ = send(
                    s,
                    &Message::abort("authentication failed: your proof of the key did not verify"),
                )
                .await;
                return Err(WireError::AuthFailed(Prover::Backup));
            }
            (version, nonce, th)
        }
        Message::Abort { reason } => return Err(WireError::Refused(reason)),
        other => {
            return Err(WireError::Unexpected {
                expected: "CHALLENGE",
                got: other.kind(),
            });
        }
    };
    let mac = cfg.key.prove(LABEL_CLIENT, &th);
    send(s, &Message::Auth { mac }).await?;
    Ok((
        version,
        cfg.key.keys(Role::Primary, &nonce_p, &nonce_b, &th),
    ))
}

/// The backup's first sealed frame: opening it proves the backup derived the same keys.
/// A backup that found no key can only refuse in the clear.
async fn first_sealed<S: AsyncRead + Unpin>(
    s: &mut S,
    cfg: &ClientConfig,
    keys: &Keys,
    what: &'static str,
) -> Result<Message, WireError> {
    let m = tokio::time::timeout(cfg.timeout, read_sealed_or_plain(s, &keys.opener))
        .await
        .map_err(|_| WireError::Timeout(what))??;
    match m {
        (Message::Abort { reason }, _) => Err(WireError::Refused(reason)),
        (m, true) => Ok(m),
        (other, false) => Err(WireError::Unsealed { kind: other.kind() }),
    }
}

/// Backup side, up to and including verifying the primary's proof. The caller answers
/// WELCOME (or ABORT, e.g. when another primary is connected), sealed with
/// `session.keys.sealer`. Every refusal here is answered with a plain ABORT naming the
/// reason (no keys exist yet), then returned as an error for the log.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cfg: &ServerConfig,
) -> Result<Session, WireError> {
    let hello = match recv(s, cfg.timeout, "the primary's hello").await {
        Ok(Message::Hello(h)) => h,
        Ok(other) => {
            let e = WireError::Unexpected {
                expected: "HELLO",
                got: other.kind(),
            };
            let _ = send(s, &Message::abort(e.to_string())).await;
            return Err(e);
        }
        Err(
            e @ WireError::Version {
                ours_min,
                ours_max,
                theirs_min,
                theirs_max,
            },
        ) => {
            // Said from the backup's side, so the primary's log reads right.
            let why = format!(
                "protocol version mismatch: this backup speaks {ours_min}..={ours_max}, the primary offered {theirs_min}..={theirs_max}; upgrade one side (version {} seals every frame; unsealed versions are refused)",
                super::VERSION_SEALED
            );
            let _ = send(s, &Message::abort(why)).await;
            return Err(e);
        }
        Err(e) => {
            let _ = send(s, &Message::abort(e.to_string())).await;
            return Err(e);
        }
    };
    // `Message::decode` already refused ranges with nothing in common.
    let version = hello.max_version.min(VERSION);
    // An unknown codec byte was refused when HELLO was decoded (and answered above).
    let codec = if version >= VERSION_COMPRESSION {
        hello.codec
    } else {
        Codec::None
    };
    let nonce_b = random_nonce();
    let th = kdf::transcript(&hello, version, &nonce_b);
    let mac = cfg.key.prove(LABEL_SERVER, &th);
    send(
        s,
        &Message::Challenge {
            version,
            nonce: nonce_b,
            mac,
        },
    )
    .await?;
    match recv(s, cfg.timeout, "the primary's proof").await? {
        Message::Auth { mac } => {
            if !cfg.key.verify(LABEL_CLIENT, &th, &mac) {
                let _ = send(s, &Message::abort("authentication failed: wrong key")).await;
                return Err(WireError::AuthFailed(Prover::Primary));
            }
        }
        Message::Abort { reason } => return Err(WireError::Refused(reason)),
        other => {
            let e = WireError::Unexpected {
                expected: "AUTH",
                got: other.kind(),
            };
            let _ = send(s, &Message::abort(e.to_string())).await;
            return Err(e);
        }
    }
    Ok(Session {
        version,
        codec,
        cache_pages: hello.cache_pages,
        keys: cfg.key.keys(Role::Backup, &hello.nonce, &nonce_b, &th),
        probe: hello.probe,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::Kind;

    async fn pair(
        ckey: &[u8],
        skey: &[u8],
        tweak: impl FnOnce(&mut ClientConfig),
    ) -> (Result<Session, WireError>, Result<Session, WireError>) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let mut c = ClientConfig::new(Key::from_bytes(ckey).unwrap(), Codec::Lz4, 1024);
        tweak(&mut c);
        let s = ServerConfig {
            key: Key::from_bytes(skey).unwrap(),
            timeout: Duration::from_secs(5),
        };
        let server = async move {
            let r = server_handshake(&mut b, &s).await;
            if let Ok(session) = &r {
                session
                    .keys
                    .sealer
                    .send(&mut b, &Message::Welcome)
                    .await
                    .unwrap();
            }
            r
        };
        let client = async move { client_handshake(&mut a, &c).await };
        let (cr, sr) = tokio::join!(client, server);
        (cr, sr)
    }

    /// A primary's and a backup's configuration with the same key.
    fn configs() -> (ClientConfig, ServerConfig) {
        (
            ClientConfig::new(Key::from_bytes(b"k").unwrap(), Codec::Lz4, 1024),
            ServerConfig {
                key: Key::from_bytes(b"k").unwrap(),
                timeout: Duration::from_secs(5),
            },
        )
    }

    /// Seals `m` with `from` and opens it with `to`.
    async fn carry(from: &Session, to: &Session, m: &Message) -> Result<Message, WireError> {
        let mut wire = Vec::new();
        from.keys.sealer.encode(m, &mut wire)?;
        let mut r = &wire[..];
        let (got, sealed) = read_sealed_or_plain(&mut r, &to.keys.opener).await?;
        assert!(sealed);
        Ok(got)
    }

    #[tokio::test]
    async fn same_key_authenticates_both_ways_and_keys_match() {
        let (c, s) = pair(b"0123456789abcdef", b"0123456789abcdef", |_| {}).await;
        let c = c.unwrap();
        let s = s.unwrap();
        assert_eq!(
            (c.version, c.codec, c.cache_pages),
            (s.version, s.codec, s.cache_pages)
        );
        assert_eq!(c.version, VERSION);
        assert_eq!(c.codec, Codec::Lz4);
        assert_eq!(c.cache_pages, 1024);
        // WELCOME was frame 0 backup → primary.
        assert_eq!(c.keys.opener.frames(), 1);
        let m = Message::Data(vec![7; 1000]);
        assert_eq!(carry(&c, &s, &m).await.unwrap(), m);
        let m = Message::Ack { checkpoint: 3 };
        assert_eq!(carry(&s, &c, &m).await.unwrap(), m);
        // Each direction has its own key: a frame sealed by the primary does not open
        // as the backup's (reflection).
        let mut wire = Vec::new();
        c.keys.sealer.encode(&m, &mut wire).unwrap();
        let mut r = &wire[..];
        assert!(matches!(
            read_sealed_or_plain(&mut r, &c.keys.opener).await,
            Err(WireError::Forged { .. } | WireError::OutOfOrder { .. })
        ));
    }

    #[tokio::test]
    async fn two_sessions_never_share_keys() {
        let (c1, s1) = pair(b"k", b"k", |_| {}).await;
        let (_, s2) = pair(b"k", b"k", |_| {}).await;
        let (c1, s1, s2) = (c1.unwrap(), s1.unwrap(), s2.unwrap());
        let m = Message::Heartbeat { seq: 1 };
        assert!(carry(&c1, &s1, &m).await.is_ok());
        // A frame of session 1 replayed into session 2 (same key file, fresh nonces).
        let (c1b, _) = pair(b"k", b"k", |_| {}).await;
        assert!(matches!(
            carry(&c1b.unwrap(), &s2, &m).await,
            Err(WireError::Forged { .. })
        ));
    }

    /// A man in the middle that rewrites the primary's HELLO with `f`, then relays.
    async fn through_mitm(
        f: impl FnOnce(&mut Hello) + Send + 'static,
    ) -> Result<Session, WireError> {
        let (mut a, mut m1) = tokio::io::duplex(4096);
        let (mut m2, mut b) = tokio::io::duplex(4096);
        let c = ClientConfig::new(Key::from_bytes(b"same key").unwrap(), Codec::Lz4, 1024);
        let s = ServerConfig {
            key: Key::from_bytes(b"same key").unwrap(),
            timeout: Duration::from_secs(5),
        };
        tokio::spawn(async move {
            let Ok(Message::Hello(mut h)) = read_message(&mut m1).await else {
                return;
            };
            f(&mut h);
            if send(&mut m2, &Message::Hello(h)).await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut m1, &mut m2).await;
            }
        });
        tokio::spawn(async move {
            if let Ok(session) = server_handshake(&mut b, &s).await {
                let _ = session.keys.sealer.send(&mut b, &Message::Welcome).await;
                // Keep the connection open until the client has read.
                let _ = read_message(&mut b).await;
            }
        });
        client_handshake(&mut a, &c).await
    }

    #[tokio::test]
    async fn a_rewritten_hello_is_refused() {
        // Compression turned off, the cache size or the nonce changed, the version
        // range narrowed: the backup's proof covers what it received, so the primary
        // refuses (and the keys would differ anyway).
        let untouched = through_mitm(|_| {}).await;
        assert!(untouched.is_ok(), "{untouched:?}");
        for r in [
            through_mitm(|h| h.codec = Codec::None).await,
            through_mitm(|h| h.cache_pages = 1).await,
            through_mitm(|h| h.nonce[0] ^= 1).await,
            through_mitm(|h| h.max_version = VERSION + 1).await,
            // A session turned into a probe: the backup would start nothing.
            through_mitm(|h| h.probe = true).await,
        ] {
            assert!(
                matches!(r, Err(WireError::AuthFailed(Prover::Backup))),
                "{r:?}"
            );
        }
    }

    /// A probe against the real backup handshake; the backup answers as `relay receive`
    /// does (PROBE_OK for a probe, WELCOME otherwise). Returns both ends' results.
    async fn probe_pair(
        ckey: &[u8],
        skey: &[u8],
    ) -> (Result<ProbeAnswer, WireError>, Result<Session, WireError>) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let c = ClientConfig::new(Key::from_bytes(ckey).unwrap(), Codec::None, 0);
        let s = ServerConfig {
            key: Key::from_bytes(skey).unwrap(),
            timeout: Duration::from_secs(5),
        };
        let server = async move {
            let r = server_handshake(&mut b, &s).await;
            if let Ok(session) = &r {
                let m = if session.probe {
                    Message::ProbeOk { busy: true }
                } else {
                    Message::Welcome
                };
                session.keys.sealer.send(&mut b, &m).await.unwrap();
            }
            r
        };
        tokio::join!(client_probe(&mut a, &c), server)
    }

    #[tokio::test]
    async fn a_probe_with_the_key_is_answered_sealed_and_is_no_session() {
        let (c, s) = probe_pair(b"0123456789abcdef", b"0123456789abcdef").await;
        assert_eq!(
            c.unwrap(),
            ProbeAnswer {
                version: VERSION,
                busy: true
            }
        );
        assert!(s.unwrap().probe, "the backup knows it was a probe");
        // A session is not a probe.
        let (_, s) = pair(b"k", b"k", |_| {}).await;
        assert!(!s.unwrap().probe);
    }

    #[tokio::test]
    async fn a_probe_with_another_key_is_the_typed_auth_error() {
        let (c, s) = probe_pair(b"the primary key!", b"the backup key!!").await;
        assert!(
            matches!(c, Err(WireError::AuthFailed(Prover::Backup))),
            "{c:?}"
        );
        // The backup hears why (the primary's ABORT) and starts nothing.
        assert!(matches!(s, Err(WireError::Refused(_))), "{s:?}");
    }

    #[tokio::test]
    async fn a_welcome_is_no_answer_to_a_probe() {
        // A backup that starts a session for a probe (not this build): refused, named.
        let (mut a, mut b) = tokio::io::duplex(4096);
        let (c, s) = configs();
        let server = async move {
            let session = server_handshake(&mut b, &s).await.unwrap();
            session
                .keys
                .sealer
                .send(&mut b, &Message::Welcome)
                .await
                .unwrap();
        };
        let (r, ()) = tokio::join!(client_probe(&mut a, &c), server);
        assert!(
            matches!(
                r,
                Err(WireError::Unexpected {
                    expected: "PROBE_OK",
                    got: Kind::Welcome
                })
            ),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn an_unsealed_welcome_is_refused() {
        // A backup (or a man in the middle) answering WELCOME in the clear, as version 2 did.
        let (mut a, mut b) = tokio::io::duplex(4096);
        let (c, s) = configs();
        let server = async move {
            server_handshake(&mut b, &s).await.unwrap();
            send(&mut b, &Message::Welcome).await.unwrap();
        };
        let (r, ()) = tokio::join!(client_handshake(&mut a, &c), server);
        assert!(
            matches!(
                r,
                Err(WireError::Unsealed {
                    kind: Kind::Welcome
                })
            ),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_sealed_refusal_after_the_handshake_reaches_the_primary() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let (c, s) = configs();
        let server = async move {
            let session = server_handshake(&mut b, &s).await.unwrap();
            session
                .keys
                .sealer
                .send(&mut b, &Message::abort("busy: another primary"))
                .await
                .unwrap();
        };
        let (r, ()) = tokio::join!(client_handshake(&mut a, &c), server);
        match r {
            Err(WireError::Refused(reason)) => assert!(reason.contains("busy"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn wrong_key_is_refused_by_both() {
        let (c, s) = pair(b"the primary key!", b"the backup key!!", |_| {}).await;
        // The primary notices first (the backup's proof fails) and tells the backup.
        assert!(
            matches!(c, Err(WireError::AuthFailed(Prover::Backup))),
            "{c:?}"
        );
        assert!(matches!(s, Err(WireError::Refused(_))), "{s:?}");
    }

    #[tokio::test]
    async fn primary_without_the_key_is_refused_by_the_backup() {
        // A primary that skips verifying the backup (a rogue client) still cannot prove.
        let (mut a, mut b) = tokio::io::duplex(4096);
        let s = ServerConfig {
            key: Key::from_bytes(b"real key 0123456").unwrap(),
            timeout: Duration::from_secs(5),
        };
        let server = async move { server_handshake(&mut b, &s).await };
        let client = async move {
            let hello = Hello {
                max_version: VERSION,
                min_version: MIN_VERSION,
                codec: Codec::None,
                cache_pages: 0,
                probe: false,
                nonce: [0; 32],
            };
            send(&mut a, &Message::Hello(hello)).await.unwrap();
            let _challenge = read_message(&mut a).await.unwrap();
            send(&mut a, &Message::Auth { mac: [0x55; 32] })
                .await
                .unwrap();
            read_message(&mut a).await.unwrap()
        };
        let (reply, sr) = tokio::join!(client, server);
        assert!(
            matches!(sr, Err(WireError::AuthFailed(Prover::Primary))),
            "{sr:?}"
        );
        match reply {
            Message::Abort { reason } => {
                assert!(reason.contains("authentication failed"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_unsealed_version_is_refused_naming_both_ranges() {
        // A version 2 primary (range 1..=2, frames in the clear) meets this backup.
        let (c, s) = pair(b"k", b"k", |c| {
            c.max_version = 2;
            c.min_version = 1;
        })
        .await;
        assert!(
            matches!(
                s,
                Err(WireError::Version {
                    ours_min: MIN_VERSION,
                    ours_max: VERSION,
                    theirs_min: 1,
                    theirs_max: 2,
                })
            ),
            "{s:?}"
        );
        // The ABORT's reason is all the primary gets: text written for its log.
        match c {
            Err(WireError::Refused(reason)) => {
                assert!(reason.contains("1..=2"), "{reason}");
                assert!(
                    reason.contains(&format!("{MIN_VERSION}..={VERSION}")),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_challenge_below_the_range_is_refused() {
        // What this primary does if a backup picks an older version than it offered.
        let (mut a, mut b) = tokio::io::duplex(4096);
        let c = ClientConfig::new(Key::from_bytes(b"k").unwrap(), Codec::Lz4, 1024);
        let backup = async move {
            let _hello = read_message(&mut b).await.unwrap();
            send(
                &mut b,
                &Message::Challenge {
                    version: 2,
                    nonce: [0; 32],
                    mac: [0; 32],
                },
            )
            .await
            .unwrap();
        };
        let (r, ()) = tokio::join!(client_handshake(&mut a, &c), backup);
        assert!(
            matches!(
                r,
                Err(WireError::Version {
                    ours_min: MIN_VERSION,
                    ours_max: VERSION,
                    theirs_min: 2,
                    theirs_max: 2,
                })
            ),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn newer_peer_negotiates_down() {
        let (c, _) = pair(b"k", b"k", |c| c.max_version = VERSION + 4).await;
        assert_eq!(c.unwrap().version, VERSION);
    }

    #[tokio::test]
    async fn version_skew_is_refused_with_both_ranges() {
        let (c, s) = pair(b"k", b"k", |c| {
            c.max_version = VERSION + 2;
            c.min_version = VERSION + 1;
        })
        .await;
        assert!(matches!(s, Err(WireError::Version { .. })), "{s:?}");
        match c {
            Err(WireError::Refused(reason)) => assert!(reason.contains("version"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn key_file_checks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        assert!(matches!(
            Key::load(&p),
            Err(WireError::KeyFile {
                problem: KeyProblem::Unreadable(_),
                ..
            })
        ));
        std::fs::write(&p, "\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Key::load(&p),
            Err(WireError::KeyFile {
                problem: KeyProblem::Empty,
                ..
            })
        ));
        std::fs::write(&p, "abcdef0123456789abcdef\n").unwrap();
        assert_eq!(Key::load(&p).unwrap().0, b"abcdef0123456789abcdef");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Key::load(&p),
            Err(WireError::KeyFile {
                problem: KeyProblem::Readable { mode: 0o644, .. },
                ..
            })
        ));
        assert!(matches!(
            Key::load(dir.path()),
            Err(WireError::KeyFile {
                problem: KeyProblem::NotAFile,
                ..
            })
        ));
        assert_eq!(
            format!("{:?}", Key::from_bytes(b"secret").unwrap()),
            "Key(6 bytes)"
        );
    }
}
