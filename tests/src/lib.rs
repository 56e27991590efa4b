//! Shared helpers of the root-only integration tiers (crate `remus-tests`).
//!
//! Owns: test fixtures only (namespaces, devices, sockets that observe traffic). Never
//! touches: product code paths; tests drive the built binaries like an operator.
pub mod netns;
