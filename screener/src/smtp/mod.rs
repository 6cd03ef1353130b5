//! The SMTP screening daemon: postscreen's tests, limits and cache, and the
//! hand-off of good clients to the real MTA without reconnects.
//!
//! Layout, one room per idea: [`command`] parses command lines,
//! [`session`] is the per-client state machine (pure over bytes and time),
//! [`gate`] decides admission before any test, [`backend`] speaks to the
//! real MTA (PROXY header, replay, splice), [`server`] is the thin socket
//! loop with the shared counters, cache and stress mode, [`failures`] the
//! bounded queue of clients to block, [`descriptors`] the open-file budget.

pub mod backend;
pub mod command;
pub mod descriptors;
pub mod failures;
pub mod gate;
pub mod params;
pub mod server;
pub mod session;
pub mod text;

use std::net::SocketAddr;

pub use failures::{FailureQueue, FailureQueueStats, Queued};
pub use params::{Action, Handoff, Params};
pub use server::{DnsblLookup, ScoreFuture, Server, SmtpStats};
pub use session::DnsblScore;

pub use crate::store::Test;

/// Why a client is reported for blocking: the outcomes `verdict.block_on`
/// names, so the daemon passes them on as they are.
pub use crate::config::BlockOn as FailedTest;

impl From<Test> for FailedTest {
    fn from(t: Test) -> FailedTest {
        match t {
            Test::Pregreet => FailedTest::Pregreet,
            Test::Dnsbl => FailedTest::Dnsbl,
            Test::Pipelining => FailedTest::Pipelining,
            Test::NonSmtpCommand => FailedTest::NonSmtpCommand,
            Test::BareNewline => FailedTest::BareNewline,
        }
    }
}

/// A client that failed a test with action `enforce` or `drop`, or matched
/// a `reject` access rule; the daemon turns these into kernel blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The client as it connected (after any upstream PROXY header).
    pub client: SocketAddr,
    /// What it failed.
    pub test: FailedTest,
}
