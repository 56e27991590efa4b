//! Process and thread settings of a daemon that sits in the kernel's writeback path.
//!
//! Owns: `mlockall` and `PR_SET_IO_FLUSHER`. Never touches: anything else.
//!
//! With /dev/nbdN, the kernel may need this daemon to make progress in order to free
//! memory (dirty pages of the device are written back through it). So its memory is
//! locked (`MCL_ONFAULT` too: pages are locked as they are touched, thread stacks are not
//! pre-faulted whole) and its I/O threads are marked as I/O flushers (Linux 5.6+): their
//! allocations never recurse into I/O and their writes are not throttled like ordinary
//! dirtiers.

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("mlockall: {0} (needs root or CAP_IPC_LOCK)")]
    Mlock(std::io::Error),
    #[error("prctl(PR_SET_IO_FLUSHER): {0} (needs Linux 5.6+ and CAP_SYS_RESOURCE)")]
    IoFlusher(std::io::Error),
}

const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Locks current and future memory of the process.
pub fn lock_memory() -> Result<(), SysError> {
    // SAFETY: plain syscall with constant flags.
    let r = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    if r == 0 {
        Ok(())
    } else {
        Err(SysError::Mlock(std::io::Error::last_os_error()))
    }
}

/// Marks the calling thread (and threads it creates later) as an I/O flusher.
pub fn io_flusher() -> Result<(), SysError> {
    // SAFETY: plain prctl with integer arguments.
    let r = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(SysError::IoFlusher(std::io::Error::last_os_error()))
    }
}

/// Whether the calling thread is marked (for status).
pub fn is_io_flusher() -> bool {
    const PR_GET_IO_FLUSHER: libc::c_int = 58;
    // SAFETY: plain prctl.
    unsafe { libc::prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0) == 1 }
}
