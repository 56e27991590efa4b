//! `remus`: the checkpoint controller (relay mode today). Placeholder until its owner fills it in.
fn main() {}
