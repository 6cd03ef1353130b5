//! What `cargo xtask` does beyond running commands, as a library so the
//! integration tests drive the same code the operator runs.

pub mod demo;
