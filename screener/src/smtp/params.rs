//! The screening parameters one session runs with.
//!
//! A session takes a snapshot of these when it starts, so a reload never
//! changes the rules under a client that is already being screened. Stress
//! mode is the exception: it shortens the deadlines of running sessions too
//! (the stress values travel in the snapshot for that), since the sessions
//! holding the screening slots are what stress mode is about.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
pub use crate::config::{Action, Handoff};
use crate::screen::{PerTest, Phase, TestSettings};

/// Everything a session needs to screen one client.
#[derive(Clone, Debug)]
pub struct Params {
    /// Our name in the greeting, EHLO reply and limit replies.
    pub hostname: String,
    /// The `220-` teaser text; empty turns the pregreet test off.
    pub greet_banner: String,
    /// How long the client must stay silent after the teaser.
    pub greet_wait: Duration,
    /// Each test's switch, action and pass lifetime.
    pub tests: PerTest<TestSettings>,
    /// A combined score at or above this fails.
    pub dnsbl_threshold: i32,
    /// A negative score at or below this passes every other test.
    pub dnsbl_allowlist_threshold: i32,
    /// Lower clamp of a DNSBL pass lifetime (the upper one is the DNSBL
    /// test's `ttl`).
    pub dnsbl_min_ttl: Duration,
    /// Verbs that mark the client as a non-SMTP speaker (upper case).
    pub forbidden_commands: Vec<String>,
    /// How a client that passed the deep tests reaches the backend.
    pub deep_test_handoff: Handoff,
    /// Commands one deep-test session may send.
    pub command_count_limit: u32,
    /// Time allowed for one whole command line.
    pub command_time_limit: Duration,
    /// Greet wait under stress mode: a session already waiting when stress
    /// mode begins waits at most this much longer.
    pub stress_greet_wait: Duration,
    /// Command time limit under stress mode, for sessions already running
    /// when it begins.
    pub stress_command_time_limit: Duration,
    /// Longest command line accepted, CRLF excluded.
    pub line_length_limit: usize,
    /// EHLO keywords the backend supports and the dummy engine may
    /// announce (PIPELINING and session-bound ones already removed).
    pub ehlo_keywords: Arc<Vec<String>>,
}

impl Params {
    /// Whether any deep protocol test is switched on.
    pub fn deep_tests_enabled(&self) -> bool {
        self.tests
            .iter()
            .any(|(t, s)| t.phase() == Phase::Deep && s.enable)
    }

    /// Whether the backend announced `STARTTLS`, so the dummy engine can
    /// offer it and hand the connection over when the client asks.
    pub fn backend_starttls(&self) -> bool {
        self.ehlo_keywords
            .iter()
            .any(|k| k.eq_ignore_ascii_case("STARTTLS"))
    }
}

impl Params {
    /// The parameters from a configuration, with the stress-mode greet wait
    /// and command time limit when `stress` is set, and the EHLO keywords
    /// learned from the backend.
    pub fn from_config(cfg: &Config, stress: bool, ehlo_keywords: Arc<Vec<String>>) -> Params {
        let s = &cfg.screen;
        Params {
            hostname: cfg.smtp.hostname.clone(),
            greet_banner: cfg.greet_banner(),
            greet_wait: if stress {
                s.stress_greet_wait
            } else {
                s.greet_wait
            },
            tests: PerTest::from_fn(|t| t.settings(cfg)),
            dnsbl_threshold: s.dnsbl_threshold,
            dnsbl_allowlist_threshold: s.dnsbl_allowlist_threshold,
            dnsbl_min_ttl: s.dnsbl_min_ttl,
            forbidden_commands: s
                .forbidden_commands
                .iter()
                .map(|c| c.to_ascii_uppercase())
                .collect(),
            deep_test_handoff: s.deep_test_handoff,
            command_count_limit: s.command_count_limit,
            command_time_limit: if stress {
                s.stress_command_time_limit
            } else {
                s.command_time_limit
            },
            stress_greet_wait: s.stress_greet_wait,
            stress_command_time_limit: s.stress_command_time_limit,
            line_length_limit: s.line_length_limit,
            ehlo_keywords,
        }
    }
}
