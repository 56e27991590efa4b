//! Incremental parser of the stream `xl remus` writes (Xen migration v2, Remus shape).
//!
//! Owns: the byte-level grammar of the stream and the checkpoint events derived from it.
//! Never touches: I/O of any kind (bytes in, events out), the network, the buffer.
//!
//! API CONTRACT (fixed; the relay codes against it):
//! - `Parser::new()`, then `feed(&mut self, data, &mut Vec<Event>)` with the stream in
//!   arbitrary chunks (1 byte at a time must work). Events are appended in stream order.
//! - Every position is an absolute byte offset in the stream (0 = first byte of the xl
//!   header).
//! - `Event::PostSuspendStart { checkpoint: N, pos }` is emitted during the `feed` call
//!   that delivers the byte at `pos`, which is: for N >= 2 the first byte after the libxl
//!   CHECKPOINT_END of checkpoint N-1; for N = 1 the first byte of the first
//!   end-of-checkpoint libxc record (TSC_INFO, SHARED_INFO, X86_PV_VCPU_*, HVM_CONTEXT,
//!   HVM_PARAMS) of the first checkpoint.
//! - `Event::LibxcCheckpoint { checkpoint: N, end }`: the libxc CHECKPOINT record of
//!   checkpoint N ends at `end` (header + body + padding).
//! - `Event::CheckpointComplete { checkpoint: N, end }`: the libxl CHECKPOINT_END record
//!   of checkpoint N ends at `end`: all bytes of checkpoint N are `< end`.
//! - `Event::Record { .. }` for every record of either layer (start offset of the 8-byte
//!   header, type, body length, end offset after padding).
//! - Errors are `StreamError` with the offset; the parser is dead after an error.
pub mod writer;

/// Which framing layer a record belongs to (type numbers collide between them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    Libxl,
    Libxc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The xl header and its JSON config have been read; `end` is the offset after them.
    XlHeader { end: u64, config_len: u32 },
    /// One record of either layer.
    Record {
        layer: Layer,
        rtype: u32,
        start: u64,
        body_len: u32,
        end: u64,
    },
    PostSuspendStart { checkpoint: u64, pos: u64 },
    LibxcCheckpoint { checkpoint: u64, end: u64 },
    CheckpointComplete { checkpoint: u64, end: u64 },
    /// libxl END: a plain (non-Remus) stream finished cleanly.
    End { end: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("at byte {pos}: {what}")]
    Invalid { pos: u64, what: String },
}

/// The incremental parser. See the module docs for the contract.
#[derive(Debug, Default)]
pub struct Parser {
    _todo: (),
}

impl Parser {
    pub fn new() -> Self {
        Parser::default()
    }

    /// Feeds the next chunk of the stream; appends the events it completes to `events`.
    pub fn feed(&mut self, _data: &[u8], _events: &mut Vec<Event>) -> Result<(), StreamError> {
        unimplemented!("stream parser")
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        0
    }

    /// Number of the last complete checkpoint (0 before the first one).
    pub fn checkpoints_complete(&self) -> u64 {
        0
    }
}
