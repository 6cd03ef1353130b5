//! The screening parameters one session runs with.
//!
//! A session takes a snapshot of these when it starts, so a reload or a
//! change of stress mode never changes the rules under a client that is
//! already being screened.

use std::sync::Arc;
use std::time::Duration;

/// What to do with a client that fails a test (postscreen's
/// `*_action` parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Log the failure and carry on as if the test had passed (but never
    /// allowlist the client).
    Ignore,
    /// Carry on, but reject every RCPT TO with the test's 5xx reply.
    Enforce,
    /// Send the test's 5xx reply and hang up at once.
    Drop,
}

/// How a client that passed the deep tests reaches the real MTA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handoff {
    /// Replay the dialogue to the backend and splice: no reconnect.
    Replay,
    /// postscreen's way: `450 4.3.2` and the client must come back.
    Reconnect,
}

/// Enable flag, action and pass lifetime of one deep protocol test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeepTest {
    /// Whether the test runs at all.
    pub enable: bool,
    /// What a failure leads to.
    pub action: Action,
    /// How long a pass stays in the cache.
    pub ttl: Duration,
}

/// Everything a session needs to screen one client.
#[derive(Clone, Debug)]
pub struct Params {
    /// Our name in the greeting, EHLO reply and limit replies.
    pub hostname: String,
    /// The `220-` teaser text; empty turns the pregreet test off.
    pub greet_banner: String,
    /// How long the client must stay silent after the teaser.
    pub greet_wait: Duration,
    /// What a pregreet leads to.
    pub greet_action: Action,
    /// How long a pregreet pass stays in the cache.
    pub greet_ttl: Duration,
    /// Whether any DNSBL/DNSWL site is configured.
    pub dnsbl_enable: bool,
    /// A combined score at or above this fails.
    pub dnsbl_threshold: i32,
    /// A negative score at or below this passes every other test.
    pub dnsbl_allowlist_threshold: i32,
    /// What a DNSBL failure leads to.
    pub dnsbl_action: Action,
    /// Lower clamp of a DNSBL pass lifetime.
    pub dnsbl_min_ttl: Duration,
    /// Upper clamp of a DNSBL pass lifetime.
    pub dnsbl_max_ttl: Duration,
    /// Input sent before our reply to the previous command.
    pub pipelining: DeepTest,
    /// Header lines, HTTP/proxy verbs, binary junk.
    pub non_smtp_command: DeepTest,
    /// LF without CR.
    pub bare_newline: DeepTest,
    /// Verbs that mark the client as a non-SMTP speaker (upper case).
    pub forbidden_commands: Vec<String>,
    /// How a client that passed the deep tests reaches the backend.
    pub deep_test_handoff: Handoff,
    /// Commands one deep-test session may send.
    pub command_count_limit: u32,
    /// Time allowed for one whole command line.
    pub command_time_limit: Duration,
    /// Longest command line accepted, CRLF excluded.
    pub line_length_limit: usize,
    /// EHLO keywords the backend supports and the dummy engine may
    /// announce (PIPELINING and session-bound ones already removed).
    pub ehlo_keywords: Arc<Vec<String>>,
}

impl Params {
    /// Whether any deep protocol test is switched on.
    pub fn deep_tests_enabled(&self) -> bool {
        self.pipelining.enable || self.non_smtp_command.enable || self.bare_newline.enable
    }

    /// Whether the backend announced `STARTTLS`, so the dummy engine can
    /// offer it and hand the connection over when the client asks.
    pub fn backend_starttls(&self) -> bool {
        self.ehlo_keywords
            .iter()
            .any(|k| k.eq_ignore_ascii_case("STARTTLS"))
    }
}

impl Default for Params {
    /// postscreen's defaults (deep tests off, as in postscreen).
    fn default() -> Self {
        Params {
            hostname: "localhost".into(),
            greet_banner: "localhost ESMTP".into(),
            greet_wait: Duration::from_secs(6),
            greet_action: Action::Enforce,
            greet_ttl: Duration::from_secs(86_400),
            dnsbl_enable: false,
            dnsbl_threshold: 1,
            dnsbl_allowlist_threshold: 0,
            dnsbl_action: Action::Ignore,
            dnsbl_min_ttl: Duration::from_secs(60),
            dnsbl_max_ttl: Duration::from_secs(3600),
            pipelining: DeepTest {
                enable: false,
                action: Action::Enforce,
                ttl: Duration::from_secs(30 * 86_400),
            },
            non_smtp_command: DeepTest {
                enable: false,
                action: Action::Drop,
                ttl: Duration::from_secs(30 * 86_400),
            },
            bare_newline: DeepTest {
                enable: false,
                action: Action::Ignore,
                ttl: Duration::from_secs(30 * 86_400),
            },
            forbidden_commands: vec!["CONNECT".into(), "GET".into(), "POST".into()],
            deep_test_handoff: Handoff::Replay,
            command_count_limit: 20,
            command_time_limit: Duration::from_secs(300),
            line_length_limit: 2048,
            ehlo_keywords: Arc::new(Vec::new()),
        }
    }
}
