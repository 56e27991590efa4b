//! remus userspace library: the eBPF output buffer and the checkpoint controller.
//!
//! Each module talks to one outside thing (DESIGN.md, "Boundaries"):
//! - `datapath`: aya only (the eBPF object, maps, links, pins under /sys/fs/bpf/remus/).
//! - `netlink`: rtnetlink only (ifindex, clsact, link watching).
//! - `tap`: /dev/net/tun only (the release helper device).
//! - `holder`: pure per-epoch queues and frame normalisation (no I/O).
//! - `netbuf`: the buffer as a service: the holder task, its control socket, the
//!   `NetBuffer` trait the controller drives (in-process or through the socket).
//! - `stream`: pure Xen migration-v2 / Remus stream parsing (bytes in, events out).
//! - `compress`: pure page-data compression (XOR against last copy, then lz4).
//! - `replication`: the wire protocol between the two relays (framing, versions, auth).
//! - `checkpoint`: the controller state machine, driven through traits.
//! - `relay`: `remus relay send|receive|status`, joining xl, the wire and the buffer.
//! - `disk`: `remus disk …`, protocol-D disk replication (NBD device, write stream,
//!   the backup's journal).
//! - `metrics`: Prometheus text exposition.
//! - `exit`: the one exit-code enum of both binaries.
//!
//! The library itself owns no state and touches nothing at load time: the binaries (and
//! the controller) choose what to start.
pub mod checkpoint;
pub mod compress;
pub mod datapath;
pub mod disk;
pub mod exit;
pub mod holder;
pub mod metrics;
pub mod netbuf;
pub mod netlink;
pub mod relay;
pub mod replication;
pub mod stream;
pub mod tap;
