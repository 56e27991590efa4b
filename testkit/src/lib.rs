//! Fixtures shared by the root-only integration tiers (`tests/`) and the benchmarks
//! (`xtask bench`): network namespaces, the guest/host/peer topology with a bridge and a
//! veth pair as the vif, packet sockets that send and record frames, test frames, and
//! the built binaries.
//!
//! Owns: what it creates (namespaces and devices carrying the caller's prefix) and
//! nothing else. Never touches: remus's code paths (callers run the built binaries like
//! an operator), namespaces or devices it did not create.
//!
//! Every fixture returns errors that name the failing step instead of panicking (as
//! aya's test helpers do); the tests decide to panic, the benchmarks to stop cleanly.
pub mod bins;
pub mod cmd;
pub mod frames;
pub mod ns;
pub mod packet;
pub mod topo;

/// What a fixture could not do.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed (exit {code}): {stderr}")]
    Command {
        what: String,
        code: i32,
        stderr: String,
    },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        what: String,
        after: std::time::Duration,
    },
    #[error("{0}")]
    Missing(String),
}

pub type Result<T, E = KitError> = std::result::Result<T, E>;

/// Wraps an `io::Error` with the step it failed in.
pub fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KitError {
    let what = what.into();
    move |source| KitError::Io { what, source }
}

/// Polls `cond` every 20 ms until it holds, or fails after `timeout`.
pub fn wait_until(
    what: &str,
    timeout: std::time::Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<()> {
    let t0 = std::time::Instant::now();
    while !cond() {
        if t0.elapsed() >= timeout {
            return Err(KitError::Timeout {
                what: what.to_string(),
                after: timeout,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}
