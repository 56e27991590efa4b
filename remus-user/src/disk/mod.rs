//! `remus disk`: protocol-D disk replication (DESIGN.md, "Disks").
//!
//! The primary's daemon serves the guest's disk (a file or block device) as /dev/nbdN or
//! as a unix NBD export, writes every request locally at once, answers it, and streams it
//! in order, tagged with its disk epoch, to the backup's daemon. The checkpoint controller
//! cuts the disk epoch at the same proven instant as the network epoch. The backup holds
//! each epoch in a journal and applies it only when a commit names a failover point at or
//! after it; a failover applies up to the last complete checkpoint, discards the rest and
//! serves the disk.
//!
//! ```text
//!  guest ─blkfront═blkback─► /dev/nbdN ─(socket pair)─► remus disk serve ─► backing (local)
//!                                                          │  WRITE{N,off,data}, CUT{N}
//!                                                          ▼  (relay auth, sealed, ordered)
//!                                    remus disk receive ─► journal (epoch files, fsync at CUT)
//!                                          │ commit(N) / failover(N): apply epochs <= N
//!                                          ▼
//!                                       backing (backup) ─► /dev/nbdN after failover
//! ```
//!
//! Modules (each talks to one outside thing):
//! - `nbd`: the NBD protocol (handshake, transmission, a client), `backing`: the local
//!   file or device, `genl`: the kernel's nbd generic-netlink family, `export`: serving a
//!   target as /dev/nbdN or a unix socket, `sys`: mlock and the I/O-flusher flag.
//! - `wire`: the primary↔backup frames, `channel`: those frames sealed with the relay's
//!   keys (AES-256-GCM) on the way, `epochs`: the backup's epoch rules (pure),
//!   `journal`: the backup's epoch files and state.
//! - `primary`: the write path, send queue and initial sync; `backup`: sessions, commits,
//!   failover; `daemon`: the two daemons' start-up; `control`: their control socket;
//!   `barrier`: the typed clients the checkpoint controller and relay use; `cli`:
//!   `remus disk …`.
//!
//! Never touches: Xen, the migration stream, the output buffer.
pub mod backing;
pub mod backup;
pub mod barrier;
pub mod channel;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod epochs;
pub mod export;
pub mod genl;
pub mod journal;
pub mod nbd;
pub mod primary;
pub mod sys;
pub mod wire;
