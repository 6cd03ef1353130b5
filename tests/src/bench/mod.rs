//! Shared pieces of the side-by-side benchmarks (`cargo xtask bench smtp|flood`):
//! a private two-namespace network, private Postfix instances, the screener
//! daemon, load generators, CPU accounting and the result table.
//!
//! Everything a benchmark starts or creates is owned by a guard that removes
//! it on drop, also when the run fails half-way.

pub mod client;
pub mod cpu;
pub mod flood;
pub mod net;
pub mod postfix;
pub mod report;
pub mod screener;
pub use crate::sys;
