//! The SMTP screening daemon: postscreen's tests, limits and cache, and the
//! hand-off of good clients to the real MTA without reconnects.
//!
//! Layout, one room per idea: the tests themselves live in
//! [`crate::screen`]; [`session`] is the per-client state machine (pure
//! over bytes and time) that runs them phase by phase, [`dialogue`] the
//! dummy SMTP engine of the deep phase, [`gate`] decides admission before
//! any test, [`backend`] speaks to the real MTA (PROXY header, replay,
//! splice), [`server`] is the thin socket loop with the shared counters,
//! cache and stress mode, [`failures`] the bounded queue of clients to
//! block, [`descriptors`] the open-file budget, [`text`] how clients and
//! their text appear in logs, [`outcome`] how each connection ended.

pub mod backend;
pub mod descriptors;
pub mod dialogue;
pub mod failures;
pub mod gate;
mod locks;
pub mod outcome;
pub mod params;
pub mod server;
pub mod session;
pub mod text;

use std::net::SocketAddr;

pub use failures::{FailureQueue, FailureQueueStats, Queued};
pub use params::{Action, Handoff, Params};
pub use server::{DnsblLookup, ScoreFuture, Server, SmtpStats};
pub use session::DnsblScore;

pub use crate::screen::TestId;

/// Why a client is reported for blocking: the outcomes `verdict.block_on`
/// names, so the daemon passes them on as they are.
pub use crate::config::BlockOn as FailedTest;

/// A client that failed a test with action `enforce` or `drop`, or matched
/// a `reject` access rule; the daemon turns these into kernel blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The client as it connected (after any upstream PROXY header).
    pub client: SocketAddr,
    /// What it failed.
    pub test: FailedTest,
}
