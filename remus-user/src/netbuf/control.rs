//! The holder's control protocol: one JSON object per line over a root-only Unix socket
//! (`RunDir::socket`), a request from the client, one answer from the holder.
//!
//! ```text
//! client (remus-net VERB, RemoteBuffer)          holder (netbuf::service)
//!   {"op":"checkpoint"}                 ──────►
//!                                       ◄──────  {"result":"epoch","epoch":3}
//!   {"op":"commit","epoch":4}           ──────►
//!                                       ◄──────  {"result":"error","message":"…","code":"Usage",
//!                                                 "kind":{"kind":"epoch_not_closed","epoch":4,"current":4}}
//!   {"op":"detach","policy":"drop"}     ──────►
//!                                       ◄──────  {"result":"detached",…}   (then the holder ends)
//! ```
//!
//! Owns: the message types, their line codec, the error kind an error answer carries (so
//! a client rebuilds a typed error and never reads the message), and the client side
//! (`RemoteBuffer`). Never touches: the holder's state (`service`), BPF, netlink.
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use super::{NetError, files::RunDir, io_err};
use crate::{
    checkpoint::ports::Released,
    datapath::{AttachKind, KernelStats, Pins},
    epochs::{EpochError, EpochSummary, QueueCounters},
    exit::{ExitCode, HasExitCode},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Hold,
    Passthrough,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Hold => "hold",
            Mode::Passthrough => "passthrough",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetachPolicy {
    /// Drop what is held (default: releasing uncommitted frames breaks output commit).
    Drop,
    /// Send what is held, then detach.
    Release,
}

/// Everything `remus-net status` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub iface: String,
    pub ifindex: u32,
    pub mode: Mode,
    pub attach_kind: AttachKind,
    pub pid: u32,
    pub tap: String,
    pub current_epoch: u64,
    pub committed_epoch: u64,
    pub held_frames: u64,
    pub held_bytes: u64,
    pub limit_bytes: u64,
    pub ring_bytes: u32,
    pub epochs: Vec<EpochSummary>,
    /// The holder's queue counters (the JSON name predates the module's).
    pub holder: QueueCounters,
    pub kernel: KernelStats,
    pub release_errors: u64,
    pub unreleasable_frames: u64,
    /// Where the pins live and whether they outlive the holder (absent from older holders).
    #[serde(default)]
    pub pins: Option<Pins>,
}

/// What detach reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DetachReport {
    pub iface: String,
    pub released_frames: u64,
    pub released_bytes: u64,
    pub dropped_frames: u64,
    pub dropped_bytes: u64,
    /// Frames captured by a holder that died and never released (upper bound from the
    /// kernel counters; only when the holder was dead).
    pub lost_frames: u64,
    pub holder_was_alive: bool,
    pub notes: Vec<String>,
}

/// Control socket requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Checkpoint,
    Commit { epoch: u64 },
    Status,
    SetMode { mode: Mode },
    FailOpen,
    Detach { policy: DetachPolicy },
}

/// What kind of error an error answer reports: the client rebuilds its typed error from
/// this, never from the message (which is for people).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ErrorKind {
    /// `commit` of an epoch that `checkpoint` has not closed yet.
    EpochNotClosed { epoch: u64, current: u64 },
    /// The request line could not be parsed.
    BadRequest,
    /// Anything else (the message and exit code say what).
    #[default]
    Other,
}

impl ErrorKind {
    /// The kind of `e`, as the holder puts it on the wire.
    pub fn of(e: &NetError) -> ErrorKind {
        match e {
            NetError::Holder(EpochError::NotClosed { epoch, current }) => {
                ErrorKind::EpochNotClosed {
                    epoch: *epoch,
                    current: *current,
                }
            }
            NetError::Remote { kind, .. } => kind.clone(),
            _ => ErrorKind::Other,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Epoch {
        epoch: u64,
    },
    Released(Released),
    Status(Box<Status>),
    Ok,
    Detached(DetachReport),
    Error {
        message: String,
        code: ExitCode,
        /// Absent in answers of older holders: then `Other`.
        #[serde(default)]
        kind: ErrorKind,
    },
}

impl Response {
    /// The answer that reports `e`.
    pub fn error(e: &NetError) -> Response {
        Response::Error {
            message: e.to_string(),
            code: e.exit_code(),
            kind: ErrorKind::of(e),
        }
    }
}

/// One message as a line (JSON + '\n').
pub fn encode<T: Serialize>(msg: &T) -> String {
    // Serialising these types cannot fail (no maps with non-string keys, no floats).
    let mut line = serde_json::to_string(msg).unwrap_or_default();
    line.push('\n');
    line
}

/// Parses a request line; a bad one yields the error answer to send back.
pub fn decode_request(line: &str) -> Result<Request, Response> {
    serde_json::from_str(line).map_err(|e| Response::Error {
        message: format!("bad request: {e}"),
        code: ExitCode::Usage,
        kind: ErrorKind::BadRequest,
    })
}

/// Parses an answer line of the holder of `iface`.
pub fn decode_response(iface: &str, line: &str) -> Result<Response, NetError> {
    serde_json::from_str(line).map_err(|e| NetError::Remote {
        iface: iface.to_string(),
        message: format!("unparseable answer: {e}"),
        code: ExitCode::Failure,
        kind: ErrorKind::Other,
    })
}

/// Turns an error answer into an error (its kind kept), any other answer into itself.
pub fn check(iface: &str, r: Response) -> Result<Response, NetError> {
    match r {
        Response::Error {
            message,
            code,
            kind,
        } => Err(NetError::Remote {
            iface: iface.to_string(),
            message,
            code,
            kind,
        }),
        other => Ok(other),
    }
}

/// The error for an answer that does not fit the request.
pub fn unexpected(iface: &str, r: &Response) -> NetError {
    NetError::Remote {
        iface: iface.to_string(),
        message: format!("unexpected answer {r:?}"),
        code: ExitCode::Failure,
        kind: ErrorKind::Other,
    }
}

/// Client of a holder's control socket (a holder in another process).
pub struct RemoteBuffer {
    pub(super) iface: String,
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl RemoteBuffer {
    pub async fn connect(iface: &str) -> Result<RemoteBuffer, NetError> {
        RemoteBuffer::connect_at(iface, &RunDir::default().socket(iface)).await
    }

    /// Connects to the socket at `path` (tests use a scratch directory).
    pub async fn connect_at(iface: &str, path: &Path) -> Result<RemoteBuffer, NetError> {
        if !path.exists() {
            return Err(NetError::NotAttached {
                iface: iface.to_string(),
                path: path.display().to_string(),
            });
        }
        let s = UnixStream::connect(path)
            .await
            .map_err(io_err(format!("connecting to {}", path.display())))?;
        let (r, w) = s.into_split();
        Ok(RemoteBuffer {
            iface: iface.to_string(),
            lines: BufReader::new(r).lines(),
            w,
        })
    }

    pub async fn request(&mut self, req: Request) -> Result<Response, NetError> {
        let gone = |iface: &str| NetError::Stopped(iface.to_string());
        self.w
            .write_all(encode(&req).as_bytes())
            .await
            .map_err(|_| gone(&self.iface))?;
        let resp = self
            .lines
            .next_line()
            .await
            .map_err(|_| gone(&self.iface))?
            .ok_or_else(|| gone(&self.iface))?;
        decode_response(&self.iface, &resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line_each_and_read_back() {
        for req in [
            Request::Checkpoint,
            Request::Commit { epoch: 7 },
            Request::Status,
            Request::SetMode {
                mode: Mode::Passthrough,
            },
            Request::FailOpen,
            Request::Detach {
                policy: DetachPolicy::Release,
            },
        ] {
            let line = encode(&req);
            assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
            assert_eq!(decode_request(line.trim_end()).ok(), Some(req));
        }
    }

    #[test]
    fn the_documented_wire_form_of_a_commit_is_accepted() {
        // xtask bench net and operators' scripts write these by hand.
        let req = decode_request(r#"{"op":"commit","epoch":4}"#).ok();
        assert_eq!(req, Some(Request::Commit { epoch: 4 }));
        let req = decode_request(r#"{"op":"detach","policy":"drop"}"#).ok();
        assert_eq!(
            req,
            Some(Request::Detach {
                policy: DetachPolicy::Drop
            })
        );
    }

    #[test]
    fn a_bad_request_gets_a_usage_answer_of_kind_bad_request() {
        match decode_request(r#"{"op":"launch"}"#) {
            Err(Response::Error { code, kind, .. }) => {
                assert_eq!(code, ExitCode::Usage);
                assert_eq!(kind, ErrorKind::BadRequest);
            }
            other => panic!("expected an error answer, got {other:?}"),
        }
    }

    #[test]
    fn an_unclosed_epoch_crosses_the_codec_as_its_kind() {
        let e = NetError::Holder(EpochError::NotClosed {
            epoch: 4,
            current: 4,
        });
        let line = encode(&Response::error(&e));
        let back = decode_response("vif1.0", line.trim_end()).expect("parses");
        match check("vif1.0", back) {
            Err(NetError::Remote { kind, code, .. }) => {
                assert_eq!(code, ExitCode::Usage);
                assert_eq!(
                    kind,
                    ErrorKind::EpochNotClosed {
                        epoch: 4,
                        current: 4
                    }
                );
            }
            other => panic!("expected a remote error, got {other:?}"),
        }
    }

    #[test]
    fn an_error_answer_without_a_kind_is_other() {
        let line = r#"{"result":"error","message":"m","code":"Failure"}"#;
        match decode_response("v", line) {
            Ok(Response::Error { kind, .. }) => assert_eq!(kind, ErrorKind::Other),
            other => panic!("expected an error answer, got {other:?}"),
        }
    }

    #[test]
    fn garbage_from_the_holder_is_a_failure_not_a_panic() {
        match decode_response("v", "not json") {
            Err(e @ NetError::Remote { .. }) => assert_eq!(e.exit_code(), ExitCode::Failure),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn check_passes_answers_that_are_not_errors() {
        let r = check("v", Response::Epoch { epoch: 3 }).expect("not an error");
        assert!(matches!(r, Response::Epoch { epoch: 3 }));
    }

    #[tokio::test]
    async fn a_remote_buffer_to_a_missing_socket_is_not_attached() {
        let p = std::env::temp_dir().join(format!("remus-ctl-none-{}.sock", std::process::id()));
        match RemoteBuffer::connect_at("vif9.0", &p).await {
            Err(e @ NetError::NotAttached { .. }) => assert_eq!(e.exit_code(), ExitCode::Usage),
            Err(e) => panic!("expected NotAttached, got {e}"),
            Ok(_) => panic!("connected to a socket that does not exist"),
        }
    }
}
