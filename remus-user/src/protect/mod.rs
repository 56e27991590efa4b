//! The operator's commands: `remus protect`, `unprotect`, `status`, `backup`, `config`.
//!
//! `remus protect DOMAIN` (primary) finds the domain's vif and disks (libxl's JSON, xenstore),
//! checks everything it needs and names each missing thing, then runs stock
//! `xl remus -F -n -s '' DOMAIN 'remus relay send …'` and supervises it. `remus backup
//! DOMAIN` is its twin on the backup: it checks, then becomes `remus relay receive`.
//!
//! ```text
//! primary                                            backup
//! remus protect web                                  remus backup web
//!  ├─ checks (xl, xenstore, key, probe) ──HELLO(probe)…PROBE_OK──► relay receive (exec'd)
//!  └─ xl remus -F -n -s '' web '…'                         │
//!      └─ remus __relay-child ─ remus relay send ══TCP══════┘─► xl migrate-receive -r -e
//!  stop / remus unprotect web: {"op":"end_protection"} on the relay's control socket
//!      ─► DISCARD ═══════════════════════════════════════► receiver killed, copy destroyed
//! /run/remus/protect-web.json                        /run/remus/backup-web.json
//! ```
//!
//! Owns: the composition of today's interfaces (xl, the relay's CLI, its status and
//! control sockets and its probe, remus-net's runtime files) into one command per host.
//! Never touches: the relay's, the buffer's or the stream's code paths: it runs them and
//! asks them like an operator would (the probe is the relay's own
//! `replication::client_probe`).
pub mod backup;
pub mod checks;
pub mod cli;
pub mod host;
pub mod probe;
pub mod run;
pub mod state;
pub mod status;
pub mod unprotect;
pub mod xen;
