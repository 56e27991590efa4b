//! The exit codes of `remus-net` and `remus`, in one place (documented in README.md, in
//! both binaries' `--help`, docs/remus-net.md and docs/relay.md).
//!
//! Owns: the mapping from error kinds to process exit codes. Never touches: I/O.

/// Process exit codes. Stable: scripts depend on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum ExitCode {
    /// Success.
    Ok = 0,
    /// Operational or kernel failure (a step failed; the message names it).
    Failure = 1,
    /// Usage: bad arguments, unknown interface, epoch not closed, wrong state.
    Usage = 2,
    /// Environment unsupported: not root, no BPF / BTF / bpffs, no Xen, no tun.
    Unsupported = 3,
    /// The protected side lost its peer: the backup (relay send) or the vif (remus-net).
    PeerLost = 4,
    /// Ending protection was not confirmed: the backup did not say it discarded its copy
    /// (no answer in time, or it was lost meanwhile), so the guest's output stays held
    /// (`relay send`, `remus protect`, `remus unprotect` on the primary).
    Unconfirmed = 5,
}

impl ExitCode {
    pub fn code(self) -> i32 {
        self as i32
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(c: ExitCode) -> Self {
        std::process::ExitCode::from(c as u8)
    }
}

/// Errors that know which exit code they deserve.
pub trait HasExitCode {
    fn exit_code(&self) -> ExitCode;
}
