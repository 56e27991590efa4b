//! The output buffer as a service, and as the controller sees it.
//!
//! Owns, one concern per submodule:
//! - `service`: the holder, i.e. the task (in `remus-net attach`: the daemon process)
//!   that owns one vif's ring, its per-epoch queues (`crate::epochs`), the release tap
//!   and the vif watch, and answers requests; `LocalBuffer`, its in-process handle;
//! - `control`: the control protocol over the holder's root-only socket (requests,
//!   answers, the error kind an answer carries) and `RemoteBuffer`, its client;
//! - `attach`: attaching (and taking over from a dead holder), and detach from a fresh
//!   process after the holder died;
//! - `files`: the runtime files under `RUN_DIR` (socket, state file, log);
//! - `group`: several vifs' buffers behind one `NetBuffer` (`VifGroup`), one epoch
//!   sequence for all the vifs of a guest.
//!
//! This module adds the options, the error type, and the `NetBuffer` port for both
//! handles. Never touches: the wire protocol between hosts, Xen, the migration stream.
//!
//! Epochs: a fresh buffer starts in epoch 1. `checkpoint()` closes the current epoch and
//! returns its number; frames the guest emits afterwards get the next one. `commit(N)`
//! releases every held frame of epochs <= N, epoch by epoch, in capture order.
//! Committing an epoch that is not closed yet is an error and releases nothing.
//!
//! Fail closed: the capture program is pinned (tcx link) or left as a clsact filter, so
//! if the holder dies, frames keep being dropped; nothing held is ever released by
//! accident. `remus-net detach` from a fresh process removes it and says what was lost.
use std::{io, time::Duration};

use crate::{
    datapath::{AttachMode, DatapathError},
    epochs::EpochError,
    exit::{ExitCode, HasExitCode},
    netlink::NetlinkError,
    tap::TapError,
};

mod attach;
pub mod control;
pub mod files;
mod group;
mod service;

pub use crate::checkpoint::ports::{NetBuffer, NetBufferError, Released};
pub use crate::netlink::validate_name;
pub use attach::{attach, detach_offline, pinned_state, pins_left};
pub use control::{
    DetachPolicy, DetachReport, ErrorKind, Mode, RemoteBuffer, Request, Response, Status, check,
};
pub use files::{
    RUN_DIR, StateFile, attached_ifaces, is_root, log_path, pid_alive, read_state, socket_path,
    state_path,
};
pub use group::VifGroup;
pub use service::{HolderEnd, LocalBuffer, Running};

pub const DEFAULT_LIMIT_BYTES: u64 = 256 << 20;
pub const DEFAULT_RING_BYTES: u32 = 64 << 20;

#[derive(Clone, Debug)]
pub struct AttachOptions {
    pub iface: String,
    /// Held bytes beyond which frames are dropped (and counted), never released.
    pub limit_bytes: u64,
    /// Size of the kernel ring (power of two, multiple of the page size).
    pub ring_bytes: u32,
    pub passthrough: bool,
    pub attach_mode: AttachMode,
    /// UNSAFE, for benchmarks and demos only: close and release epochs by itself, every
    /// this long (zero: after every drain of the ring), as if a backup acknowledged
    /// every checkpoint at once. Never used by the controller.
    pub autocommit: Option<Duration>,
}

impl AttachOptions {
    pub fn new(iface: impl Into<String>) -> Self {
        AttachOptions {
            iface: iface.into(),
            limit_bytes: DEFAULT_LIMIT_BYTES,
            ring_bytes: DEFAULT_RING_BYTES,
            passthrough: false,
            attach_mode: AttachMode::Auto,
            autocommit: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("remus-net must run as root (it loads BPF programs and creates devices)")]
    NotRoot,
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("{iface} is already attached (holder pid {pid}); `remus-net status {iface}` shows it")]
    AlreadyAttached { iface: String, pid: u32 },
    #[error("--ring-bytes {0} is not a power of two of at least 4096")]
    BadRingSize(u64),
    #[error("{iface} is not attached by remus-net (no {path})")]
    NotAttached { iface: String, path: String },
    #[error("--limit-bytes must be at least 64 KiB (got {0})")]
    BadLimit(u64),
    #[error(transparent)]
    Holder(#[from] EpochError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the holder of {iface} answered: {message}")]
    Remote {
        iface: String,
        message: String,
        code: ExitCode,
        kind: ErrorKind,
    },
    #[error(
        "vif {iface} disappeared while attached (guest destroyed?): {frames} held frames ({bytes} bytes) dropped, nothing released"
    )]
    VifGone {
        iface: String,
        frames: u64,
        bytes: u64,
    },
    #[error(
        "the holder of {iface} (pid {pid}) is dead; {iface} stays blocked (fail closed). \
         Run `remus-net detach {iface}` to remove the program and see what was lost"
    )]
    HolderDead { iface: String, pid: u32 },
    #[error("the holder task of {0} has stopped")]
    Stopped(String),
    #[error(
        "the pins of {iface} ({dir}) are in the host's bpffs, which this mount namespace \
         cannot see (a container?): run `remus-net detach {iface}` from the host"
    )]
    PinsUnreachable { iface: String, dir: String },
}

impl HasExitCode for NetError {
    fn exit_code(&self) -> ExitCode {
        match self {
            NetError::NotRoot | NetError::PinsUnreachable { .. } => ExitCode::Unsupported,
            NetError::Netlink(NetlinkError::NoSuchInterface(_) | NetlinkError::BadName(_)) => {
                ExitCode::Usage
            }
            NetError::Datapath(d) if d.is_unsupported() => ExitCode::Unsupported,
            NetError::Tap(TapError::Open(_)) => ExitCode::Unsupported,
            NetError::AlreadyAttached { .. }
            | NetError::NotAttached { .. }
            | NetError::BadRingSize(_)
            | NetError::BadLimit(_)
            | NetError::Holder(_) => ExitCode::Usage,
            NetError::Remote { code, .. } => *code,
            NetError::VifGone { .. } => ExitCode::PeerLost,
            _ => ExitCode::Failure,
        }
    }
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Io { what, source }
}

/// The port's error for `e`, by variant (an answer's kind, never its text).
pub fn to_nb(e: NetError) -> NetBufferError {
    match e {
        NetError::Holder(EpochError::NotClosed { epoch, current })
        | NetError::Remote {
            kind: ErrorKind::EpochNotClosed { epoch, current },
            ..
        } => NetBufferError::EpochNotClosed { epoch, current },
        NetError::Stopped(iface) => NetBufferError::Gone {
            iface,
            reason: "holder stopped".into(),
        },
        other => NetBufferError::Failed(other.to_string()),
    }
}

/// What either handle's answer means for the port (an error answer becomes its error).
fn ask_port(iface: &str, sent: Result<Response, NetError>) -> Result<Response, NetBufferError> {
    check(iface, sent.map_err(to_nb)?).map_err(to_nb)
}

fn epoch_of(iface: &str, r: Response) -> Result<u64, NetBufferError> {
    match r {
        Response::Epoch { epoch } => Ok(epoch),
        other => Err(to_nb(control::unexpected(iface, &other))),
    }
}

fn released_of(iface: &str, r: Response) -> Result<Released, NetBufferError> {
    match r {
        Response::Released(r) => Ok(r),
        other => Err(to_nb(control::unexpected(iface, &other))),
    }
}

/// The port on a handle whose `request(&mut self or &self, Request)` answers a Response.
macro_rules! impl_netbuffer {
    ($t:ty) => {
        impl NetBuffer for $t {
            async fn close_epoch(&mut self) -> Result<u64, NetBufferError> {
                let sent = self.request(Request::Checkpoint).await;
                epoch_of(&self.iface, ask_port(&self.iface, sent)?)
            }

            async fn commit(&mut self, epoch: u64) -> Result<Released, NetBufferError> {
                let sent = self.request(Request::Commit { epoch }).await;
                released_of(&self.iface, ask_port(&self.iface, sent)?)
            }

            async fn fail_open(&mut self) -> Result<Released, NetBufferError> {
                let sent = self.request(Request::FailOpen).await;
                released_of(&self.iface, ask_port(&self.iface, sent)?)
            }
        }
    };
}

impl_netbuffer!(LocalBuffer);
impl_netbuffer!(RemoteBuffer);

/// The controller's entry point: attach the buffer to `opts.iface` inside this process
/// (same as `attach`; `Running::buffer` is the `NetBuffer`).
pub async fn attach_in_process(opts: AttachOptions) -> Result<Running, NetError> {
    attach(opts).await
}

/// The controller's entry point for a buffer already attached by `remus-net attach`.
pub async fn connect(iface: &str) -> Result<RemoteBuffer, NetError> {
    RemoteBuffer::connect(iface).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unclosed_epoch_maps_to_the_ports_variant_locally_and_remotely() {
        let local = NetError::Holder(EpochError::NotClosed {
            epoch: 5,
            current: 5,
        });
        let remote = NetError::Remote {
            iface: "v".into(),
            message: "anything at all: the text is not read".into(),
            code: ExitCode::Usage,
            kind: ErrorKind::EpochNotClosed {
                epoch: 6,
                current: 4,
            },
        };
        assert!(matches!(
            to_nb(local),
            NetBufferError::EpochNotClosed {
                epoch: 5,
                current: 5
            }
        ));
        assert!(matches!(
            to_nb(remote),
            NetBufferError::EpochNotClosed {
                epoch: 6,
                current: 4
            }
        ));
    }

    #[test]
    fn a_message_that_mentions_not_closed_is_still_a_failure_without_the_kind() {
        let e = NetError::Remote {
            iface: "v".into(),
            message: "epoch 3 is not closed yet".into(),
            code: ExitCode::Usage,
            kind: ErrorKind::Other,
        };
        assert!(matches!(to_nb(e), NetBufferError::Failed(_)));
    }

    #[test]
    fn a_stopped_holder_is_gone_and_other_errors_fail() {
        assert!(matches!(
            to_nb(NetError::Stopped("vif1.0".into())),
            NetBufferError::Gone { iface, .. } if iface == "vif1.0"
        ));
        assert!(matches!(
            to_nb(NetError::BadLimit(1)),
            NetBufferError::Failed(_)
        ));
    }

    #[test]
    fn exit_codes_follow_the_documented_table() {
        let usage = [
            NetError::BadLimit(1),
            NetError::BadRingSize(3),
            NetError::Holder(EpochError::NotClosed {
                epoch: 1,
                current: 1,
            }),
            NetError::Netlink(NetlinkError::NoSuchInterface("x".into())),
        ];
        for e in usage {
            assert_eq!(e.exit_code(), ExitCode::Usage, "{e}");
        }
        assert_eq!(NetError::NotRoot.exit_code(), ExitCode::Unsupported);
        let gone = NetError::VifGone {
            iface: "v".into(),
            frames: 0,
            bytes: 0,
        };
        assert_eq!(gone.exit_code(), ExitCode::PeerLost);
        assert_eq!(NetError::Stopped("v".into()).exit_code(), ExitCode::Failure);
    }

    #[test]
    fn the_port_rebuilds_epoch_not_closed_from_an_answer_of_a_holder() {
        // What a RemoteBuffer does with the line the holder wrote.
        let e = NetError::Holder(EpochError::NotClosed {
            epoch: 2,
            current: 2,
        });
        let line = control::encode(&Response::error(&e));
        let answer = control::decode_response("v", line.trim_end());
        match ask_port("v", answer) {
            Err(NetBufferError::EpochNotClosed { epoch, current }) => {
                assert_eq!((epoch, current), (2, 2))
            }
            other => panic!("expected EpochNotClosed, got {other:?}"),
        }
    }
}
