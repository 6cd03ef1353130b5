//! The screening tests: what a test is, and one file per test.
//!
//! [`TestId`] is the one list of tests. Everything else that is per test
//! follows from it: its name (in `verdict.block_on`, logs and JSON), its
//! phase, the kernel [`Reason`] its blocks carry, its configuration keys
//! and the [`TestSettings`] read from them. Per-test state is a
//! [`PerTest<T>`], indexed by [`TestId`], never by a position: the session's
//! to-do, failed and passed sets, the admission mask, the failure counters.
//!
//! PHASES. Early tests run while the `220-` teaser waits: [`pregreet`] (the
//! client talks first) and [`dnsbl`] (the lists score the address). Deep
//! tests judge each command line of the dummy SMTP dialogue, from the one
//! table [`DEEP`]: [`bare_newline`], [`non_smtp_command`], [`pipelining`].
//! The session (`smtp::session`) keeps the phases, the dialogue
//! (`smtp::dialogue`) the replies; a test's file holds only its detection,
//! its log line, its replies and its unit tests, as postscreen keeps one
//! file per test.
//!
//! ADDING A DEEP TEST touches exactly these files:
//! 1. `screen/<test>.rs`: `check` (does this line fail?), `log` (its
//!    upper-case log keyword) and `DROP_REPLY`, with unit tests;
//! 2. `screen/mod.rs` (this file): its `pub mod`, a [`TestId`] variant
//!    (last), its entry in [`TestId::ALL`], its arm in each `match` of
//!    `impl TestId` (the compiler points at every one), and its row in
//!    [`DEEP`] (a unit test checks that every deep test has one);
//! 3. `config.rs`: the keys `screen.<test>_enable`, `screen.<test>_action`
//!    and `screen.<test>_ttl` with their defaults;
//! 4. `screener-common`: a kernel [`Reason`] for its blocks (a new number,
//!    in `Reason::ALL`, `name` and `from_u32`);
//! 5. `README.md`: the test in "The tests".
//!
//! Nothing else, and no store layout bump: a client record holds one
//! expiry per test in [`TestId::ALL`] order, and a new test goes last, so
//! an older record keeps its meaning and lacks only the new test (read as
//! "never passed"). `verdict.block_on` accepts any test by its name, the
//! `stats` counters show every test by its name, admission, the session's
//! bookkeeping and the configuration warnings iterate over
//! [`TestId::ALL`].

pub mod bare_newline;
pub mod dnsbl;
pub mod non_smtp_command;
pub mod pipelining;
pub mod pregreet;

use std::fmt;
use std::net::SocketAddr;
use std::ops::{Index, IndexMut};
use std::time::Duration;

use screener_common::Reason;

pub use crate::config::Action;
use crate::config::Config;
use crate::smtp::params::Params;

/// A screening test. The declaration order is the order of
/// [`TestId::ALL`], of a [`PerTest`] and of the cached expiries in a
/// client record: new tests go last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TestId {
    /// The client spoke before the greeting.
    Pregreet,
    /// DNSBL/DNSWL score.
    Dnsbl,
    /// The client sent commands without waiting for replies.
    Pipelining,
    /// The client sent a forbidden or non-SMTP command.
    NonSmtpCommand,
    /// The client ended a line with a bare LF.
    BareNewline,
}

/// When a test runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// While the `220-` teaser waits, before any SMTP.
    Early,
    /// On each command line of the dummy SMTP dialogue.
    Deep,
}

/// Whether a test runs, what its failure does and how long its pass lasts,
/// read from the test's configuration keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestSettings {
    /// Whether the test runs at all.
    pub enable: bool,
    /// What a failure leads to.
    pub action: Action,
    /// How long a pass stays in the cache (for the DNSBL, the upper clamp
    /// of the answer's own lifetime).
    pub ttl: Duration,
}

/// The configuration keys of one test, for messages that name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestKeys {
    /// The key that switches the test on.
    pub enable: &'static str,
    /// The key holding its action.
    pub action: &'static str,
    /// The key holding its pass lifetime; `None` for the DNSBL, whose
    /// lifetime comes from the DNS answer.
    pub ttl: Option<&'static str>,
}

impl TestId {
    /// Every test, in declaration order.
    pub const ALL: [TestId; 5] = [
        TestId::Pregreet,
        TestId::Dnsbl,
        TestId::Pipelining,
        TestId::NonSmtpCommand,
        TestId::BareNewline,
    ];
    /// How many tests there are.
    pub const COUNT: usize = TestId::ALL.len();

    /// Position in [`TestId::ALL`], in a [`PerTest`] and in a stored
    /// client record.
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Stable lower-case name, as used in `verdict.block_on`, logs and
    /// JSON output.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            TestId::Pregreet => "pregreet",
            TestId::Dnsbl => "dnsbl",
            TestId::Pipelining => "pipelining",
            TestId::NonSmtpCommand => "non_smtp_command",
            TestId::BareNewline => "bare_newline",
        }
    }

    /// The test called `name` (see [`TestId::name`]).
    #[must_use]
    pub fn from_name(name: &str) -> Option<TestId> {
        TestId::ALL.into_iter().find(|t| t.name() == name)
    }

    /// When the test runs.
    #[must_use]
    pub const fn phase(self) -> Phase {
        match self {
            TestId::Pregreet | TestId::Dnsbl => Phase::Early,
            TestId::Pipelining | TestId::NonSmtpCommand | TestId::BareNewline => Phase::Deep,
        }
    }

    /// The reason a kernel block for this test carries.
    #[must_use]
    pub const fn reason(self) -> Reason {
        match self {
            TestId::Pregreet => Reason::Pregreet,
            TestId::Dnsbl => Reason::Dnsbl,
            TestId::Pipelining => Reason::Pipelining,
            TestId::NonSmtpCommand => Reason::NonSmtpCommand,
            TestId::BareNewline => Reason::BareNewline,
        }
    }

    /// The configuration keys of the test. The early tests keep
    /// postscreen's names: pregreet is on while `smtp.greet_banner` is not
    /// empty, the DNSBL while `screen.dnsbl_sites` is not.
    #[must_use]
    pub const fn keys(self) -> TestKeys {
        match self {
            TestId::Pregreet => TestKeys {
                enable: "smtp.greet_banner",
                action: "screen.greet_action",
                ttl: Some("screen.greet_ttl"),
            },
            TestId::Dnsbl => TestKeys {
                enable: "screen.dnsbl_sites",
                action: "screen.dnsbl_action",
                ttl: None,
            },
            TestId::Pipelining => TestKeys {
                enable: "screen.pipelining_enable",
                action: "screen.pipelining_action",
                ttl: Some("screen.pipelining_ttl"),
            },
            TestId::NonSmtpCommand => TestKeys {
                enable: "screen.non_smtp_command_enable",
                action: "screen.non_smtp_command_action",
                ttl: Some("screen.non_smtp_command_ttl"),
            },
            TestId::BareNewline => TestKeys {
                enable: "screen.bare_newline_enable",
                action: "screen.bare_newline_action",
                ttl: Some("screen.bare_newline_ttl"),
            },
        }
    }

    /// The test's settings as [`TestId::keys`] name them in `cfg`.
    #[must_use]
    pub fn settings(self, cfg: &Config) -> TestSettings {
        let s = &cfg.screen;
        match self {
            TestId::Pregreet => TestSettings {
                enable: !cfg.smtp.greet_banner.is_empty(),
                action: s.greet_action,
                ttl: s.greet_ttl,
            },
            TestId::Dnsbl => TestSettings {
                enable: !s.dnsbl_sites.is_empty(),
                action: s.dnsbl_action,
                ttl: s.dnsbl_max_ttl,
            },
            TestId::Pipelining => TestSettings {
                enable: s.pipelining_enable,
                action: s.pipelining_action,
                ttl: s.pipelining_ttl,
            },
            TestId::NonSmtpCommand => TestSettings {
                enable: s.non_smtp_command_enable,
                action: s.non_smtp_command_action,
                ttl: s.non_smtp_command_ttl,
            },
            TestId::BareNewline => TestSettings {
                enable: s.bare_newline_enable,
                action: s.bare_newline_action,
                ttl: s.bare_newline_ttl,
            },
        }
    }
}

impl fmt::Display for TestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One value per test, indexed by [`TestId`]: the only way per-test state
/// is kept, so no array is indexed by hand and no order can drift.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PerTest<T>([T; TestId::COUNT]);

impl<T> PerTest<T> {
    /// Every test gets `f(test)`.
    pub fn from_fn(mut f: impl FnMut(TestId) -> T) -> PerTest<T> {
        PerTest(std::array::from_fn(|i| f(TestId::ALL[i])))
    }

    /// Every test gets `v`.
    pub const fn splat(v: T) -> PerTest<T>
    where
        T: Copy,
    {
        PerTest([v; TestId::COUNT])
    }

    /// The tests with their values, in [`TestId::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (TestId, &T)> {
        TestId::ALL.into_iter().zip(self.0.iter())
    }

    /// The values alone, in [`TestId::ALL`] order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter()
    }

    /// A new set with `f(test, value)` for every test.
    pub fn map<U>(&self, mut f: impl FnMut(TestId, &T) -> U) -> PerTest<U> {
        PerTest::from_fn(|t| f(t, &self[t]))
    }
}

impl<T> Index<TestId> for PerTest<T> {
    type Output = T;
    fn index(&self, t: TestId) -> &T {
        &self.0[t.index()]
    }
}

impl<T> IndexMut<TestId> for PerTest<T> {
    fn index_mut(&mut self, t: TestId) -> &mut T {
        &mut self.0[t.index()]
    }
}

/// From the per-test array a stored client record holds (in
/// [`TestId::ALL`] order).
impl<T> From<[T; TestId::COUNT]> for PerTest<T> {
    fn from(a: [T; TestId::COUNT]) -> PerTest<T> {
        PerTest(a)
    }
}

/// To the per-test array a stored client record holds.
impl<T> From<PerTest<T>> for [T; TestId::COUNT] {
    fn from(p: PerTest<T>) -> [T; TestId::COUNT] {
        p.0
    }
}

/// A map from test name to value, as `stats` shows per-test counters.
impl<T: serde::Serialize> serde::Serialize for PerTest<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut m = s.serialize_map(Some(TestId::COUNT))?;
        for (t, v) in self.iter() {
            m.serialize_entry(t.name(), v)?;
        }
        m.end()
    }
}

/// One command line as the deep tests see it.
#[derive(Clone, Copy, Debug)]
pub struct Line<'a> {
    /// The line, its line ending removed.
    pub text: &'a [u8],
    /// It ended in a LF without a CR before it.
    pub bare: bool,
    /// Client input already received past this line: sent before our reply
    /// to this one.
    pub after: &'a [u8],
}

/// What a deep-test log line names besides the test's own evidence.
#[derive(Clone, Copy, Debug)]
pub struct LogContext<'a> {
    /// The client.
    pub client: SocketAddr,
    /// The verb of the previous command (`CONNECT` before the first).
    pub last: &'a str,
}

/// One row of the deep-test table.
#[derive(Clone, Copy)]
pub struct DeepTest {
    /// The test.
    pub id: TestId,
    /// Whether the line fails it; pure, so unit tests call it directly.
    pub check: fn(&Line<'_>, &Params) -> bool,
    /// Logs the failure with the test's keyword.
    pub log: fn(&Line<'_>, &Params, &LogContext<'_>),
    /// The reply under `drop` (under `enforce` every RCPT gets
    /// `550 5.5.1 Protocol error`).
    pub drop_reply: &'static str,
}

/// The deep tests in the order each command line meets them: its ending,
/// then its content, then what the client sent after it. When one line
/// fails several with `drop`, the first decides the reply (as postscreen
/// checks the bare newline while reading the line, before the command).
pub const DEEP: [DeepTest; 3] = [
    DeepTest {
        id: TestId::BareNewline,
        check: bare_newline::check,
        log: bare_newline::log,
        drop_reply: bare_newline::DROP_REPLY,
    },
    DeepTest {
        id: TestId::NonSmtpCommand,
        check: non_smtp_command::check,
        log: non_smtp_command::log,
        drop_reply: non_smtp_command::DROP_REPLY,
    },
    DeepTest {
        id: TestId::Pipelining,
        check: pipelining::check,
        log: pipelining::log,
        drop_reply: pipelining::DROP_REPLY,
    },
];

/// The reply to every RCPT TO after a deep test failed under `enforce`.
pub const DEEP_ENFORCE_REPLY: &str = "550 5.5.1 Protocol error";

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::config::Config;

    #[test]
    fn names_and_indexes_agree() {
        for (i, t) in TestId::ALL.into_iter().enumerate() {
            assert_eq!(t.index(), i, "{t}");
            assert_eq!(TestId::from_name(t.name()), Some(t));
        }
        assert_eq!(TestId::from_name("greylist"), None);
    }

    #[test]
    fn every_test_has_its_own_reason_name_and_keys() {
        let reasons: HashSet<u32> = TestId::ALL.iter().map(|t| t.reason() as u32).collect();
        let names: HashSet<_> = TestId::ALL.iter().map(|t| t.name()).collect();
        let enables: HashSet<_> = TestId::ALL.iter().map(|t| t.keys().enable).collect();
        let actions: HashSet<_> = TestId::ALL.iter().map(|t| t.keys().action).collect();
        for set in [reasons.len(), names.len(), enables.len(), actions.len()] {
            assert_eq!(set, TestId::COUNT);
        }
        for t in TestId::ALL {
            // The kernel reason's name is the test's, so `reason` in
            // `screener list` reads like `verdict.block_on`.
            assert_eq!(t.reason().name(), t.name());
            assert!(!t.name().contains(' ') && t.name() == t.name().to_lowercase());
        }
    }

    #[test]
    fn deep_table_holds_every_deep_test_once() {
        let deep: Vec<TestId> = DEEP.iter().map(|d| d.id).collect();
        let unique: HashSet<TestId> = deep.iter().copied().collect();
        assert_eq!(unique.len(), deep.len(), "no test twice");
        for t in TestId::ALL {
            assert_eq!(
                unique.contains(&t),
                t.phase() == Phase::Deep,
                "{t} is in DEEP exactly when it is a deep test"
            );
        }
    }

    #[test]
    fn settings_follow_the_keys_by_name() {
        let mut cfg = Config::default();
        // Each test its own action and lifetime, so a key read for the wrong
        // test shows.
        cfg.smtp.greet_banner = "$hostname ESMTP".into();
        cfg.screen.greet_action = Action::Drop;
        cfg.screen.greet_ttl = Duration::from_secs(1);
        cfg.screen.dnsbl_sites = vec!["zen.example".into()];
        cfg.screen.dnsbl_action = Action::Enforce;
        cfg.screen.dnsbl_max_ttl = Duration::from_secs(2);
        cfg.screen.pipelining_enable = false;
        cfg.screen.pipelining_action = Action::Ignore;
        cfg.screen.pipelining_ttl = Duration::from_secs(3);
        cfg.screen.non_smtp_command_enable = true;
        cfg.screen.non_smtp_command_action = Action::Enforce;
        cfg.screen.non_smtp_command_ttl = Duration::from_secs(4);
        cfg.screen.bare_newline_enable = false;
        cfg.screen.bare_newline_action = Action::Drop;
        cfg.screen.bare_newline_ttl = Duration::from_secs(5);
        let set = PerTest::from_fn(|t| t.settings(&cfg));
        let want = [
            (TestId::Pregreet, true, Action::Drop, 1),
            (TestId::Dnsbl, true, Action::Enforce, 2),
            (TestId::Pipelining, false, Action::Ignore, 3),
            (TestId::NonSmtpCommand, true, Action::Enforce, 4),
            (TestId::BareNewline, false, Action::Drop, 5),
        ];
        for (t, enable, action, ttl) in want {
            assert_eq!(
                set[t],
                TestSettings {
                    enable,
                    action,
                    ttl: Duration::from_secs(ttl)
                },
                "{t}"
            );
        }
        cfg.smtp.greet_banner = String::new();
        cfg.screen.dnsbl_sites.clear();
        assert!(!TestId::Pregreet.settings(&cfg).enable);
        assert!(!TestId::Dnsbl.settings(&cfg).enable);
    }

    #[test]
    fn per_test_is_indexed_by_test() {
        let mut p: PerTest<u32> = PerTest::default();
        p[TestId::BareNewline] = 7;
        p[TestId::Dnsbl] += 2;
        for (t, &v) in p.iter() {
            let want = match t {
                TestId::Dnsbl => 2,
                TestId::BareNewline => 7,
                _ => 0,
            };
            assert_eq!(v, want, "{t}");
        }
        assert_eq!(p.values().sum::<u32>(), 9);
        assert_eq!(
            p.iter()
                .filter(|(_, &v)| v > 0)
                .map(|(t, _)| t)
                .collect::<Vec<_>>(),
            [TestId::Dnsbl, TestId::BareNewline]
        );
        let doubled = p.map(|_, v| v * 2);
        assert_eq!(doubled[TestId::BareNewline], 14);
        let named = PerTest::from_fn(TestId::name);
        for t in TestId::ALL {
            assert_eq!(named[t], t.name());
        }
        let arr: [u32; TestId::COUNT] = p.into();
        assert_eq!(PerTest::from(arr), p);
        let json = serde_json::to_value(p).unwrap();
        for (t, v) in p.iter() {
            assert_eq!(json[t.name()], serde_json::json!(v), "{t}");
        }
        assert_eq!(
            json.as_object().map(serde_json::Map::len),
            Some(TestId::COUNT)
        );
    }
}
