//! The DNSBL test (postscreen's `postscreen_dnsbl_*`): the lists in
//! `screen.dnsbl_sites` score the client's address while the teaser waits
//! (the lookups live in `crate::dnsbl`); this file judges the score. At or
//! above `dnsbl_threshold` the client fails; at or below a negative
//! `dnsbl_allowlist_threshold` it is DNSWL-listed and skips every other
//! test; otherwise it passes for the answers' lifetime, clamped.

use std::net::IpAddr;
use std::time::Duration;

use super::TestId;
use crate::smtp::params::Params;

/// The DNSBL outcome the session needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsblScore {
    /// Sum of the weights of the matching sites.
    pub score: i32,
    /// Lifetime of the answers (clamped by the session).
    pub ttl: Duration,
    /// The listing site with the largest weight, for the reject reply.
    pub top_site: Option<String>,
}

/// What a score means for the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// Listed: the test fails with these replies.
    Listed {
        /// The reply under `drop`.
        drop_reply: String,
        /// The reply to every RCPT TO under `enforce`.
        enforce_reply: String,
    },
    /// Not listed: a pass for `ttl`.
    Clean {
        /// The answers' lifetime within `[dnsbl_min_ttl, dnsbl_max_ttl]`.
        ttl: Duration,
        /// DNSWL-listed: every other test is skipped.
        allowlisted: bool,
    },
}

/// Whether the score puts the client on the DNSWL side: only with a
/// negative `dnsbl_allowlist_threshold` (0 turns the allowlist off).
pub fn allowlisted(score: &DnsblScore, p: &Params) -> bool {
    p.dnsbl_allowlist_threshold < 0 && score.score <= p.dnsbl_allowlist_threshold
}

/// Judges the score of `client`.
pub fn judge(score: &DnsblScore, client: IpAddr, p: &Params) -> Judgement {
    if score.score >= p.dnsbl_threshold {
        let site = score.top_site.as_deref().unwrap_or("a DNS blocklist");
        let text = format!("5.7.1 Service unavailable; client [{client}] blocked using {site}");
        Judgement::Listed {
            drop_reply: format!("521 {text}"),
            enforce_reply: format!("550 {text}"),
        }
    } else {
        Judgement::Clean {
            ttl: score.ttl.clamp(p.dnsbl_min_ttl, p.tests[TestId::Dnsbl].ttl),
            allowlisted: allowlisted(score, p),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::time::Instant;

    use super::*;
    use crate::screen::Action;
    use crate::smtp::params::Params;
    use crate::smtp::session::testing::{deep, params, Run};
    use crate::smtp::session::{Plan, Todo};

    fn score(score: i32) -> DnsblScore {
        DnsblScore {
            score,
            ttl: Duration::from_secs(5),
            top_site: Some("zen.example".into()),
        }
    }

    fn dnsbl_on(p: &mut Params) {
        p.tests[TestId::Dnsbl].enable = true;
    }

    #[test]
    fn thresholds_and_clamps() {
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        let p = params(|p| p.dnsbl_allowlist_threshold = -1);
        assert!(matches!(judge(&score(1), ip, &p), Judgement::Listed { .. }));
        assert_eq!(
            judge(&score(0), ip, &p),
            Judgement::Clean {
                ttl: Duration::from_secs(60),
                allowlisted: false
            }
        );
        let long = DnsblScore {
            ttl: Duration::from_secs(86_400),
            ..score(-1)
        };
        assert_eq!(
            judge(&long, ip, &p),
            Judgement::Clean {
                ttl: Duration::from_secs(3600),
                allowlisted: true
            }
        );
        let unnamed = DnsblScore {
            top_site: None,
            ..score(2)
        };
        assert_eq!(
            judge(&unnamed, ip, &p),
            Judgement::Listed {
                drop_reply: "521 5.7.1 Service unavailable; client [192.0.2.10] blocked using a DNS blocklist".into(),
                enforce_reply: "550 5.7.1 Service unavailable; client [192.0.2.10] blocked using a DNS blocklist".into(),
            }
        );
        // A threshold of 0 keeps the allowlist off.
        assert!(!allowlisted(&score(-5), &params(|_| {})));
    }

    #[tokio::test(start_paused = true)]
    async fn dnsbl_drop_names_the_site() {
        let mut r = Run::start(
            params(|p| {
                dnsbl_on(p);
                p.tests[TestId::Dnsbl].action = Action::Drop;
            }),
            Todo::ALL,
        );
        assert!(r.s.dnsbl_deadline().is_some());
        r.wait(1).await;
        let o = r.s.dnsbl(score(3), Instant::now());
        assert!(o.is_empty(), "the pregreet wait goes on");
        r.wait(5).await;
        assert!(r.text().ends_with(
            "521 5.7.1 Service unavailable; client [192.0.2.10] blocked using zen.example\r\n"
        ));
        assert_eq!(r.fails(), [TestId::Dnsbl]);
    }

    #[tokio::test(start_paused = true)]
    async fn dnsbl_pass_ttl_is_clamped_and_late_answers_do_not_count() {
        let p = params(dnsbl_on);
        let mut r = Run::start(Arc::clone(&p), Todo::ALL);
        r.out.extend(r.s.dnsbl(score(0), Instant::now()));
        r.wait(6).await;
        assert_eq!(
            r.pass().unwrap()[TestId::Dnsbl],
            Some(Duration::from_secs(60))
        );

        let mut r = Run::start(p, Todo::ALL);
        r.wait(6).await;
        r.out.extend(r.s.dnsbl(score(5), Instant::now()));
        assert_eq!(r.fails(), []);
        assert_eq!(r.pass().unwrap()[TestId::Dnsbl], None);
    }

    #[tokio::test(start_paused = true)]
    async fn dnswl_skips_the_wait_and_deep_tests() {
        let mut r = Run::start(
            params(|p| {
                deep(p);
                dnsbl_on(p);
                p.dnsbl_allowlist_threshold = -1;
            }),
            Todo::ALL,
        );
        r.wait(1).await;
        r.out.extend(r.s.dnsbl(score(-2), Instant::now()));
        assert_eq!(r.handoff(), Some(Plan::Greeting { early: Vec::new() }));
    }
}
