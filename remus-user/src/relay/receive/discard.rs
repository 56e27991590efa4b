//! Discarding the backup's copy when the primary ends protection (DISCARD), with no
//! failover: which domain the session built, and the command that destroys it.
//!
//! Owns: reading the domain's name from the stream's xl header (its JSON config), running
//! the discard command with that name, and the command's time bound. Never touches: the
//! receiver process (`receiver` freezes and kills it first), the connection, the cut.
//!
//! Why the receiver is killed and its stream never closed: libxl activates the copy when
//! the receiver's stdin ends (that is the failover). A receiver whose whole process group
//! was frozen, then killed, never sees that end, and the `DOMAIN--incoming` it built stays
//! paused (inert: only the receiving xl would rename and unpause it) until the discard
//! command destroys it.
//!
//! Why the name comes from the stream: `xl migrate-receive` names the domain it builds
//! `<c_info.name>--incoming`, `c_info.name` taken from the config in the stream's xl
//! header. So that name is exactly the copy this session built, whoever started the relay
//! (`remus backup DOMAIN`, or `remus relay receive` by hand for any domain); a name given
//! on the command line could name another domain's copy.
use std::process::Stdio;
use std::time::Duration;

use crate::stream::{XL_FLAG_JSON, XL_HEADER_LEN};

/// Destroys the copy this session built, if it exists (`$REMUS_DOMAIN` is the domain's
/// name from the stream). A receiver killed before it created the domain leaves nothing
/// to destroy: that is success too.
pub const DEFAULT_DISCARD_CMD: &str = "xl domid \"$REMUS_DOMAIN--incoming\" >/dev/null 2>&1 || exit 0; exec xl destroy \"$REMUS_DOMAIN--incoming\"";

/// How long the discard command may take before it is killed (`xl destroy` of a big
/// domain under load takes seconds).
pub const DEFAULT_DISCARD_TIMEOUT: Duration = Duration::from_secs(20);

/// A config larger than this is not read for its name (libxl's are a few KiB).
const MAX_CONFIG: usize = 1 << 20;

/// The domain's name, read from the first bytes of the stream. Pure: bytes in.
#[derive(Debug, Default)]
pub struct DomainName {
    head: Vec<u8>,
    found: Found,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum Found {
    /// The xl header and its config are not whole yet.
    #[default]
    Collecting,
    Name(String),
    /// No JSON config, no `c_info.name` in it, or a config too large to read.
    Unknown,
}

impl DomainName {
    pub fn new() -> Self {
        DomainName::default()
    }

    /// The next bytes of the reconstructed stream, in order.
    pub fn push(&mut self, data: &[u8]) {
        if self.found != Found::Collecting {
            return;
        }
        let want = self.wanted().unwrap_or(XL_HEADER_LEN + 4);
        let take = want.saturating_sub(self.head.len()).min(data.len());
        self.head.extend_from_slice(&data[..take]);
        self.found = self.read();
        if self.found == Found::Collecting && take < data.len() {
            // The length became known with these bytes: take the rest of the config.
            self.push(&data[take..]);
        }
    }

    /// The domain's name, once the stream has carried it.
    pub fn get(&self) -> Option<&str> {
        match &self.found {
            Found::Name(n) => Some(n),
            _ => None,
        }
    }

    /// libxl's JSON config as the stream's xl header carried it (the failover's
    /// announcement reads the guest's NICs in it), once whole.
    pub fn config(&self) -> Option<&[u8]> {
        let len = le32(&self.head, XL_HEADER_LEN)? as usize;
        self.head.get(XL_HEADER_LEN + 4..XL_HEADER_LEN + 4 + len)
    }

    /// Bytes needed: the xl header, the config length, the config (once known).
    fn wanted(&self) -> Option<usize> {
        let len = le32(&self.head, XL_HEADER_LEN)? as usize;
        Some(XL_HEADER_LEN + 4 + len.min(MAX_CONFIG + 1))
    }

    fn read(&self) -> Found {
        // The stream's own parser (the cut) checks the header; here only what the name
        // needs is read, and anything unexpected means "unknown".
        let (Some(mandatory), Some(opt_len)) = (le32(&self.head, 36), le32(&self.head, 44)) else {
            return Found::Collecting;
        };
        if mandatory & XL_FLAG_JSON == 0 || opt_len < 4 {
            return Found::Unknown;
        }
        let Some(len) = le32(&self.head, XL_HEADER_LEN) else {
            return Found::Collecting;
        };
        let len = len as usize;
        if len > MAX_CONFIG || len + 4 > opt_len as usize {
            return Found::Unknown;
        }
        let start = XL_HEADER_LEN + 4;
        let Some(config) = self.head.get(start..start + len) else {
            return Found::Collecting;
        };
        name_of(config).map_or(Found::Unknown, Found::Name)
    }
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// `c_info.name` of libxl's JSON domain config (xl writes it NUL-terminated).
fn name_of(config: &[u8]) -> Option<String> {
    let end = config.iter().position(|&b| b == 0).unwrap_or(config.len());
    let v: serde_json::Value = serde_json::from_slice(&config[..end]).ok()?;
    let name = v.get("c_info")?.get("name")?.as_str()?;
    (!name.is_empty() && !name.chars().any(char::is_control)).then(|| name.to_string())
}

/// Why the discard command did not destroy the copy.
#[derive(Debug, thiserror::Error)]
pub enum DiscardCmdError {
    #[error("cannot start the discard command `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("the discard command `{cmd}` failed ({status})")]
    Failed {
        cmd: String,
        status: std::process::ExitStatus,
    },
    #[error("the discard command `{cmd}` did not finish within {timeout:?}; killed it")]
    Timeout { cmd: String, timeout: Duration },
}

/// Runs `cmd` with `sh -c`, `REMUS_DOMAIN` set to `domain` (in the environment, so no
/// name can change the command's meaning), its output into the relay's stderr.
pub async fn run_discard_cmd(
    cmd: &str,
    domain: &str,
    timeout: Duration,
) -> Result<(), DiscardCmdError> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("REMUS_DOMAIN", domain)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| DiscardCmdError::Spawn {
            cmd: cmd.to_string(),
            source,
        })?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(status)) => Err(DiscardCmdError::Failed {
            cmd: cmd.to_string(),
            status,
        }),
        Ok(Err(source)) => Err(DiscardCmdError::Spawn {
            cmd: cmd.to_string(),
            source,
        }),
        Err(_) => {
            let _ = child.kill().await;
            Err(DiscardCmdError::Timeout {
                cmd: cmd.to_string(),
                timeout,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::writer::{WriterConfig, write};

    fn name_in(stream: &[u8], chunk: usize) -> Option<String> {
        let mut n = DomainName::new();
        for c in stream.chunks(chunk) {
            n.push(c);
        }
        n.get().map(str::to_string)
    }

    #[test]
    fn the_name_comes_from_the_xl_header_in_any_chunking() {
        let mut cfg = WriterConfig::pv(1);
        cfg.seed = 7;
        let w = write(&cfg);
        for chunk in [1, 3, 52, 53, 4096, 1 << 20] {
            assert_eq!(
                name_in(&w.bytes, chunk).as_deref(),
                Some("guest7"),
                "{chunk}"
            );
        }
        // Before the config is whole there is no name.
        assert_eq!(name_in(&w.bytes[..60], 7), None);
    }

    #[test]
    fn a_stream_captured_in_the_lab_names_its_domain() {
        use std::io::Read;
        let zst = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/remus-pv-stream.bin.zst");
        let mut dec =
            ruzstd::decoding::StreamingDecoder::new(std::fs::File::open(zst).unwrap()).unwrap();
        let mut head = vec![0u8; 64 * 1024];
        dec.read_exact(&mut head).unwrap();
        assert_eq!(name_in(&head, 1000).as_deref(), Some("guest"));
    }

    #[test]
    fn no_json_config_or_no_name_is_unknown_not_a_guess() {
        let w = write(&WriterConfig::pv(1));
        let mut b = w.bytes.clone();
        b[36] &= !(XL_FLAG_JSON as u8);
        let mut n = DomainName::new();
        n.push(&b);
        assert_eq!(n.found, Found::Unknown);
        assert_eq!(name_of(b"{\"c_info\":{\"type\":\"pv\"}}\0"), None);
        assert_eq!(name_of(b"{\"c_info\":{\"name\":\"\"}}"), None);
        assert_eq!(name_of(b"not json"), None);
        assert_eq!(
            name_of(b"{\"c_info\":{\"name\":\"web 1\"}}\0\0").as_deref(),
            Some("web 1")
        );
    }

    #[tokio::test]
    async fn the_discard_command_gets_the_name_in_its_environment() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let cmd = format!(
            "printf '%s' \"$REMUS_DOMAIN--incoming\" > {}",
            out.display()
        );
        // A name that would be a command if it were pasted into the line.
        run_discard_cmd(&cmd, "web; touch /nonexistent/x", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "web; touch /nonexistent/x--incoming"
        );
        assert!(matches!(
            run_discard_cmd("exit 3", "web", Duration::from_secs(10)).await,
            Err(DiscardCmdError::Failed { status, .. }) if status.code() == Some(3)
        ));
        assert!(matches!(
            run_discard_cmd("sleep 30", "web", Duration::from_millis(100)).await,
            Err(DiscardCmdError::Timeout { .. })
        ));
    }
}
