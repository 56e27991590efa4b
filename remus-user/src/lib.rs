//! remus userspace library: the eBPF output buffer and the checkpoint controller.
//!
//! Each module talks to one outside thing (DESIGN.md, "Boundaries"):
//! - `datapath`: aya only (the eBPF object, maps, links, pins in the host's bpffs).
//! - `netlink`: rtnetlink only (ifindex, clsact, link watching).
//! - `tap`: /dev/net/tun only (the release helper device).
//! - `epochs`: pure per-epoch queues and frame normalisation (no I/O).
//! - `netbuf`: the buffer as a service: the holder (the task, or the `remus-net attach`
//!   daemon, that owns a vif's ring), its control socket, attach/detach, runtime files,
//!   and the `NetBuffer` port (defined in `checkpoint`) for the in-process and socket
//!   handles.
//! - `stream`: pure Xen migration-v2 / Remus stream parsing (bytes in, events out).
//! - `compress`: pure page-data compression (XOR against last copy, then lz4).
//! - `replication`: the wire protocol between the two relays (framing, versions, auth).
//! - `checkpoint`: the checkpoint state machine, its ports (traits) and the relay-mode
//!   driver.
//! - `output_commit`: the one invariant, where it is enforced, and the ACK ledger.
//! - `relay`: `remus relay send|receive|status`, joining xl, the wire and the buffer.
//! - `disk`: `remus disk …`, protocol-D disk replication (NBD device, write stream,
//!   the backup's journal).
//! - `metrics`: the relay's metrics (prometheus-client registry, OpenMetrics text).
//! - `xen`: xenstore only (the protected domain's suspend path and suspend events; the
//!   only module that talks to Xen).
//! - `exit`: the one exit-code enum of both binaries.
//! - `config`: /etc/remus/remus.toml (parsing, located errors, merged settings).
//! - `protect`: `remus protect|unprotect|status|backup`: xl, xenstore and the relay's
//!   CLI composed into one command per host.
//! - `assets`: man pages and shell completions from the binaries' clap definitions.
//!
//! The library itself owns no state and touches nothing at load time: the binaries (and
//! the controller) choose what to start.
pub mod assets;
pub mod checkpoint;
pub mod compress;
pub mod config;
pub mod datapath;
pub mod disk;
pub mod epochs;
pub mod exit;
pub mod metrics;
pub mod netbuf;
pub mod netlink;
pub mod output_commit;
pub mod protect;
pub mod relay;
pub mod replication;
pub mod stream;
pub mod tap;
pub mod xen;

/// Directory of the root-only runtime files of both binaries (status and control sockets,
/// state files). The one definition: every module names it through this constant.
pub const RUN_DIR: &str = "/run/remus";
