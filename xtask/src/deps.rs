//! `cargo xtask deps`: runs scripts/install-deps.sh (idempotent).
use crate::util;
use anyhow::Result;

pub fn install() -> Result<()> {
    util::run(util::cmd("bash").arg(util::root().join("scripts/install-deps.sh")))
}
