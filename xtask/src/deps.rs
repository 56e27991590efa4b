//! `cargo xtask deps`: runs scripts/install-deps.sh (idempotent). Owns nothing else;
//! never touches the lab images (`cargo xtask lab build` does).
use crate::util;
use anyhow::Result;

pub fn install() -> Result<()> {
    util::run(util::cmd("bash").arg(util::root().join("scripts/install-deps.sh")))
}
