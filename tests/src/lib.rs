//! Shared helpers of the root-only integration tiers (crate `remus-tests`), on top of the
//! workspace's test kit (`remus-testkit`, shared with `xtask bench`).
//!
//! Owns: test fixtures only: `netns` (the kit's fixtures in test form: a failed step
//! fails the test) and `remus_net` (the topology with remus-net on its vif). Never
//! touches: product code paths; tests drive the built binaries like an operator.
pub mod netns;
pub mod remus_net;
