//! What a list answered, and how answers become a score.
//!
//! ERROR ANSWERS ARE NOT LISTINGS. RFC 5782 says any A record means
//! "listed", and list operators use that channel to complain: Spamhaus
//! answers 127.255.255.252–255 to queries through public resolvers or over
//! quota, 127.0.1.255 for a wrong zone, DNSWLs 127.0.0.255 over their limit.
//! Scored as listings, those answers reject (or allowlist) every client. So
//! an answer in 127.255.255.0/24, any x.x.x.255 and anything outside
//! 127.0.0.0/8 is an error for the site, which then scores nothing, unless
//! the site's own filter names that address: the operator asked for it.
//!
//! DNS TROUBLE FAILS OPEN. A timeout, SERVFAIL, refused or malformed reply
//! scores 0 for that site; the client is never rejected because DNS broke.

use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

use hickory_proto::op::ResponseCode;

use super::spec::SiteSpec;

/// One list's answer to one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// A records came back (listing or error codes, see [`judge`]).
    Listed {
        /// Every A record of the answer.
        addrs: Vec<Ipv4Addr>,
        /// The smallest TTL among them, in seconds.
        ttl: u32,
    },
    /// NXDOMAIN or NODATA: the client is not on the list.
    NotListed {
        /// From the SOA in the authority section (RFC 2308); `None` without
        /// one, which makes the answer uncacheable.
        negative_ttl: Option<u32>,
    },
    /// No usable answer.
    Failed(Failure),
}

impl Answer {
    /// The answer as seen `elapsed` after it arrived: TTLs count down.
    pub(crate) fn aged(&self, elapsed: Duration) -> Answer {
        let secs = u32::try_from(elapsed.as_secs()).unwrap_or(u32::MAX);
        match self {
            Answer::Listed { addrs, ttl } => Answer::Listed {
                addrs: addrs.clone(),
                ttl: ttl.saturating_sub(secs),
            },
            Answer::NotListed { negative_ttl } => Answer::NotListed {
                negative_ttl: negative_ttl.map(|t| t.saturating_sub(secs)),
            },
            Answer::Failed(f) => Answer::Failed(*f),
        }
    }

    /// How long the answer may be reused, `None` if not at all.
    pub(crate) fn cache_ttl(&self) -> Option<u32> {
        match self {
            Answer::Listed { ttl, .. } => Some(*ttl),
            Answer::NotListed { negative_ttl } => *negative_ttl,
            Answer::Failed(_) => None,
        }
        .filter(|&t| t > 0)
    }
}

/// Why a query gave no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No reply within `dnsbl_timeout`.
    Timeout,
    /// The server answered with an error code (SERVFAIL, REFUSED, …).
    Rcode(ResponseCode),
    /// A truncated reply that TCP could not complete, an unreadable reply,
    /// a socket error.
    Transport,
    /// The query name could not be built (domain too long for IPv6).
    BadName,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout => f.write_str("timeout"),
            Failure::Rcode(ResponseCode::ServFail) => f.write_str("SERVFAIL"),
            Failure::Rcode(ResponseCode::Refused) => f.write_str("REFUSED"),
            Failure::Rcode(ResponseCode::FormErr) => f.write_str("FORMERR"),
            Failure::Rcode(ResponseCode::NotImp) => f.write_str("NOTIMP"),
            Failure::Rcode(code) => write!(f, "rcode {}", u16::from(*code)),
            Failure::Transport => f.write_str("transport error or malformed reply"),
            Failure::BadName => f.write_str("query name too long"),
        }
    }
}

/// Whether an A answer is one of the operators' error codes rather than a
/// listing (see the module comment).
pub(crate) fn is_error_code(addr: Ipv4Addr) -> bool {
    let [a, b, c, d] = addr.octets();
    a != 127 || (b == 255 && c == 255) || d == 255
}

/// What one site entry makes of one answer's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Judgement {
    /// The entry lists the client.
    Hit,
    /// Answers came, none selected by the filter.
    Miss,
    /// Error codes the filter does not name: the site scores nothing.
    Error(Vec<Ipv4Addr>),
}

/// Judges an A answer for one entry: error codes not named by the filter
/// make it an error; otherwise any address passing the filter (any address
/// at all without one) is a hit.
pub(crate) fn judge(site: &SiteSpec, addrs: &[Ipv4Addr]) -> Judgement {
    let mut errors = Vec::new();
    let mut hit = false;
    for &addr in addrs {
        let selected = site.filter.as_ref().is_none_or(|f| f.matches(addr));
        let named = site.filter.as_ref().is_some_and(|f| f.matches(addr));
        if is_error_code(addr) && !named {
            errors.push(addr);
        } else if selected {
            hit = true;
        }
    }
    if !errors.is_empty() {
        Judgement::Error(errors)
    } else if hit {
        Judgement::Hit
    } else {
        Judgement::Miss
    }
}

/// A client's combined DNSBL/DNSWL result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Score {
    /// Sum of the weights of the entries that list the client.
    pub score: i32,
    /// How long the result holds: the smallest TTL of the answers that
    /// decided it, clamped to `[dnsbl_min_ttl, dnsbl_max_ttl]`.
    pub ttl: Duration,
    /// Public (reply-mapped) name of the listing entry with the largest
    /// weight, for the reject reply.
    pub top_site: Option<String>,
    /// Public names of the listing entries, in configuration order, each
    /// once.
    pub listed_by: Vec<String>,
}

impl Score {
    /// `score >= dnsbl_threshold`: the DNSBL test fails.
    pub fn is_listed(&self, threshold: i32) -> bool {
        self.score >= threshold
    }

    /// The client skips the other tests: `dnsbl_allowlist_threshold` is
    /// negative (0 switches the feature off) and the score is at or below
    /// it.
    pub fn is_allowlisted(&self, allowlist_threshold: i32) -> bool {
        allowlist_threshold < 0 && self.score <= allowlist_threshold
    }

    /// The log text of a failed test, `DNSBL rank N for [a]:p`.
    pub fn rank_message(&self, peer: std::net::SocketAddr) -> String {
        format!(
            "DNSBL rank {} for [{}]:{}",
            self.score,
            peer.ip(),
            peer.port()
        )
    }

    /// The reject reply without CRLF: `code` is 521 (drop) or 550
    /// (enforce), e.g. `550 5.7.1 Service unavailable; client [192.0.2.1]
    /// blocked using zen.example`.
    pub fn reject_reply(&self, code: u16, client: std::net::IpAddr) -> String {
        let site = self.top_site.as_deref().unwrap_or("DNSBL");
        format!("{code} 5.7.1 Service unavailable; client [{client}] blocked using {site}")
    }
}

/// One entry to tally: its spec, its public name, and its domain's answer
/// (`None`: none before the deadline).
pub(crate) struct Tally<'a> {
    pub(crate) site: &'a SiteSpec,
    pub(crate) public: &'a str,
    pub(crate) answer: Option<&'a Answer>,
}

/// Adds up the entries' weights and works out how long the result holds.
///
/// An entry whose answer is missing, failed or an error code caps the TTL at
/// `min_ttl`: the score may be wrong, so it is re-checked soon. A negative
/// answer without SOA counts the same way. With no entries at all the
/// result holds `max_ttl`.
pub(crate) fn tally(entries: &[Tally<'_>], min_ttl: Duration, max_ttl: Duration) -> Score {
    let mut score = 0i32;
    let mut ttl = max_ttl;
    let mut top: Option<(i32, &str)> = None;
    let mut listed_by: Vec<String> = Vec::new();
    for entry in entries {
        let answer_ttl = match entry.answer {
            Some(Answer::Listed { addrs, ttl }) => match judge(entry.site, addrs) {
                Judgement::Hit => {
                    score = score.saturating_add(entry.site.weight);
                    if top.is_none_or(|(w, _)| entry.site.weight > w) {
                        top = Some((entry.site.weight, entry.public));
                    }
                    if !listed_by.iter().any(|p| p == entry.public) {
                        listed_by.push(entry.public.to_owned());
                    }
                    Duration::from_secs(u64::from(*ttl))
                }
                Judgement::Miss => Duration::from_secs(u64::from(*ttl)),
                Judgement::Error(_) => min_ttl,
            },
            Some(Answer::NotListed {
                negative_ttl: Some(t),
            }) => Duration::from_secs(u64::from(*t)),
            Some(Answer::NotListed { negative_ttl: None } | Answer::Failed(_)) | None => min_ttl,
        };
        ttl = ttl.min(answer_ttl);
    }
    Score {
        score,
        ttl: ttl.clamp(min_ttl, max_ttl.max(min_ttl)),
        top_site: top.map(|(_, name)| name.to_owned()),
        listed_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);
    const MAX: Duration = Duration::from_secs(3600);

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn listed(addrs: &[&str], ttl: u32) -> Answer {
        Answer::Listed {
            addrs: addrs.iter().map(|a| ip(a)).collect(),
            ttl,
        }
    }

    fn nx(ttl: u32) -> Answer {
        Answer::NotListed {
            negative_ttl: Some(ttl),
        }
    }

    /// One table row: the sites as configured, each domain's answer (a
    /// domain absent from `answers` gave nothing before the deadline), and
    /// what the score must be.
    struct Case {
        label: &'static str,
        sites: &'static [&'static str],
        answers: Vec<(&'static str, Answer)>,
        score: i32,
        ttl: u64,
        top: Option<&'static str>,
    }

    fn run(case: &Case) -> Score {
        let specs: Vec<SiteSpec> = case
            .sites
            .iter()
            .map(|s| s.parse().unwrap_or_else(|e| panic!("{}: {e}", case.label)))
            .collect();
        let entries: Vec<Tally<'_>> = specs
            .iter()
            .map(|site| Tally {
                site,
                public: &site.domain,
                answer: case
                    .answers
                    .iter()
                    .find(|(d, _)| *d == site.domain)
                    .map(|(_, a)| a),
            })
            .collect();
        tally(&entries, MIN, MAX)
    }

    #[test]
    #[expect(clippy::too_many_lines, reason = "one row per case")]
    fn scoring_table() {
        let cases = [
            Case {
                label: "no sites: nothing listed, longest TTL",
                sites: &[],
                answers: vec![],
                score: 0,
                ttl: 3600,
                top: None,
            },
            Case {
                label: "unfiltered listing scores the default weight",
                sites: &["bl.example"],
                answers: vec![("bl.example", listed(&["127.0.0.2"], 900))],
                score: 1,
                ttl: 900,
                top: Some("bl.example"),
            },
            Case {
                label: "not listed: negative TTL from the SOA",
                sites: &["bl.example"],
                answers: vec![("bl.example", nx(300))],
                score: 0,
                ttl: 300,
                top: None,
            },
            Case {
                label: "several matching addresses add the weight once",
                sites: &["bl.example*3"],
                answers: vec![(
                    "bl.example",
                    listed(&["127.0.0.2", "127.0.0.4", "127.0.0.10"], 900),
                )],
                score: 3,
                ttl: 900,
                top: Some("bl.example"),
            },
            Case {
                label: "filter selects the answer",
                sites: &["zen.example=127.0.0.[10;11]*2"],
                answers: vec![("zen.example", listed(&["127.0.0.2", "127.0.0.11"], 900))],
                score: 2,
                ttl: 900,
                top: Some("zen.example"),
            },
            Case {
                label: "filter rejects the answer: a miss, its TTL still counts",
                sites: &["zen.example=127.0.0.[10;11]*2"],
                answers: vec![("zen.example", listed(&["127.0.0.2"], 120))],
                score: 0,
                ttl: 120,
                top: None,
            },
            Case {
                label: "same domain twice with different filters, both match",
                sites: &[
                    "zen.example=127.0.0.[2..3]*3",
                    "zen.example=127.0.0.[10..11]",
                ],
                answers: vec![("zen.example", listed(&["127.0.0.2", "127.0.0.10"], 900))],
                score: 4,
                ttl: 900,
                top: Some("zen.example"),
            },
            Case {
                label: "same domain twice, one filter matches",
                sites: &[
                    "zen.example=127.0.0.[2..3]*3",
                    "zen.example=127.0.0.[10..11]",
                ],
                answers: vec![("zen.example", listed(&["127.0.0.10"], 900))],
                score: 1,
                ttl: 900,
                top: Some("zen.example"),
            },
            Case {
                label: "allowlist weight is negative",
                sites: &["bl.example*2", "wl.example=127.0.[0..255].[1..3]*-5"],
                answers: vec![
                    ("bl.example", listed(&["127.0.0.2"], 900)),
                    ("wl.example", listed(&["127.0.15.2"], 1800)),
                ],
                score: -3,
                ttl: 900,
                top: Some("bl.example"),
            },
            Case {
                label: "top site is the listing entry with the largest weight",
                sites: &["a.example", "b.example*4", "c.example*2", "d.example*9"],
                answers: vec![
                    ("a.example", listed(&["127.0.0.2"], 900)),
                    ("b.example", listed(&["127.0.0.2"], 900)),
                    ("c.example", listed(&["127.0.0.2"], 900)),
                    ("d.example", nx(900)),
                ],
                score: 7,
                ttl: 900,
                top: Some("b.example"),
            },
            Case {
                label: "Spamhaus public-resolver code is an error, not a listing",
                sites: &["zen.example*3"],
                answers: vec![("zen.example", listed(&["127.255.255.254"], 900))],
                score: 0,
                ttl: 60,
                top: None,
            },
            Case {
                label: "every 127.255.255.0/24 code is an error",
                sites: &["a.example", "b.example", "c.example", "d.example"],
                answers: vec![
                    ("a.example", listed(&["127.255.255.252"], 900)),
                    ("b.example", listed(&["127.255.255.253"], 900)),
                    ("c.example", listed(&["127.255.255.255"], 900)),
                    ("d.example", listed(&["127.255.255.1"], 900)),
                ],
                score: 0,
                ttl: 60,
                top: None,
            },
            Case {
                label: "wrong-zone code 127.0.1.255 is an error",
                sites: &["zen.example"],
                answers: vec![("zen.example", listed(&["127.0.1.255"], 900))],
                score: 0,
                ttl: 60,
                top: None,
            },
            Case {
                label: "DNSWL over-limit 127.0.0.255 is an error, not an allowlisting",
                sites: &["wl.example*-5"],
                answers: vec![("wl.example", listed(&["127.0.0.255"], 900))],
                score: 0,
                ttl: 60,
                top: None,
            },
            Case {
                label: "an answer outside 127/8 is an error",
                sites: &["bl.example"],
                answers: vec![("bl.example", listed(&["192.0.2.1"], 900))],
                score: 0,
                ttl: 60,
                top: None,
            },
            Case {
                label: "an error code beside a listing spoils the whole answer",
                sites: &["bl.example"],
                answers: vec![("bl.example", listed(&["127.0.0.2", "127.255.255.254"], 900))],
                score: 0,
                ttl: 60,
                top: None,
            },
            Case {
                label: "a filter that names an error code makes it a listing",
                sites: &["odd.example=127.0.0.255*2"],
                answers: vec![("odd.example", listed(&["127.0.0.255"], 900))],
                score: 2,
                ttl: 900,
                top: Some("odd.example"),
            },
            Case {
                label: "a filter range that excludes the code leaves it an error",
                sites: &["wl.example=127.0.[0..255].[1..3]*-2"],
                answers: vec![("wl.example", listed(&["127.0.0.255"], 900))],
                score: 0,
                ttl: 60,
                top: None,
            },
            Case {
                label: "a SERVFAIL scores 0 and shortens the TTL",
                sites: &["bl.example", "bl2.example"],
                answers: vec![
                    (
                        "bl.example",
                        Answer::Failed(Failure::Rcode(ResponseCode::ServFail)),
                    ),
                    ("bl2.example", listed(&["127.0.0.2"], 900)),
                ],
                score: 1,
                ttl: 60,
                top: Some("bl2.example"),
            },
            Case {
                label: "no answer before the deadline scores 0",
                sites: &["slow.example*10"],
                answers: vec![],
                score: 0,
                ttl: 60,
                top: None,
            },
            Case {
                label: "timeouts score 0",
                sites: &["bl.example"],
                answers: vec![("bl.example", Answer::Failed(Failure::Timeout))],
                score: 0,
                ttl: 60,
                top: None,
            },
            Case {
                label: "a tiny TTL is clamped up to the minimum",
                sites: &["bl.example"],
                answers: vec![("bl.example", listed(&["127.0.0.2"], 5))],
                score: 1,
                ttl: 60,
                top: Some("bl.example"),
            },
            Case {
                label: "a huge TTL is clamped down to the maximum",
                sites: &["bl.example"],
                answers: vec![("bl.example", nx(86400))],
                score: 0,
                ttl: 3600,
                top: None,
            },
            Case {
                label: "the smallest TTL across sites wins",
                sites: &["a.example", "b.example", "c.example"],
                answers: vec![
                    ("a.example", nx(2000)),
                    ("b.example", listed(&["127.0.0.2"], 700)),
                    ("c.example", nx(400)),
                ],
                score: 1,
                ttl: 400,
                top: Some("b.example"),
            },
            Case {
                label: "not listed without SOA: the minimum TTL",
                sites: &["bl.example"],
                answers: vec![("bl.example", Answer::NotListed { negative_ttl: None })],
                score: 0,
                ttl: 60,
                top: None,
            },
        ];
        for case in &cases {
            let got = run(case);
            assert_eq!(got.score, case.score, "{}: score", case.label);
            assert_eq!(
                got.ttl,
                Duration::from_secs(case.ttl),
                "{}: ttl",
                case.label
            );
            assert_eq!(
                got.top_site.as_deref(),
                case.top,
                "{}: top site",
                case.label
            );
            assert_eq!(
                got.listed_by.is_empty(),
                case.top.is_none(),
                "{}: listed_by {:?}",
                case.label,
                got.listed_by
            );
        }
    }

    #[test]
    fn listed_by_names_each_site_once() {
        let case = Case {
            label: "dup",
            sites: &[
                "zen.example=127.0.0.2",
                "zen.example=127.0.0.[2..11]",
                "b.example",
            ],
            answers: vec![
                ("zen.example", listed(&["127.0.0.2"], 900)),
                ("b.example", listed(&["127.0.0.2"], 900)),
            ],
            score: 3,
            ttl: 900,
            top: None,
        };
        let got = run(&case);
        assert_eq!(got.score, case.score);
        assert_eq!(got.listed_by, ["zen.example", "b.example"]);
    }

    #[test]
    fn error_codes() {
        for (addr, error) in [
            ("127.0.0.2", false),
            ("127.0.0.11", false),
            ("127.0.10.3", false),
            ("127.0.0.255", true),
            ("127.0.1.255", true),
            ("127.255.255.252", true),
            ("127.255.255.254", true),
            ("127.255.255.1", true),
            ("127.255.254.1", false),
            ("10.0.0.2", true),
            ("192.0.2.2", true),
        ] {
            assert_eq!(is_error_code(ip(addr)), error, "{addr}");
        }
    }

    #[test]
    fn thresholds_and_replies() {
        let s = Score {
            score: 3,
            ttl: MIN,
            top_site: Some("zen.example".into()),
            listed_by: vec!["zen.example".into()],
        };
        assert!(s.is_listed(3));
        assert!(!s.is_listed(4));
        assert!(!s.is_allowlisted(0));
        let wl = Score {
            score: -2,
            ..s.clone()
        };
        assert!(wl.is_allowlisted(-2));
        assert!(!wl.is_allowlisted(-3));
        assert!(!Score {
            score: 0,
            ..s.clone()
        }
        .is_allowlisted(0));
        assert_eq!(
            s.rank_message("192.0.2.7:4321".parse().unwrap()),
            "DNSBL rank 3 for [192.0.2.7]:4321"
        );
        assert_eq!(
            s.rank_message("[2001:db8::7]:25".parse().unwrap()),
            "DNSBL rank 3 for [2001:db8::7]:25"
        );
        assert_eq!(
            s.reject_reply(521, "192.0.2.7".parse().unwrap()),
            "521 5.7.1 Service unavailable; client [192.0.2.7] blocked using zen.example"
        );
    }

    #[test]
    fn answers_age() {
        let a = listed(&["127.0.0.2"], 100).aged(Duration::from_secs(40));
        assert_eq!(a, listed(&["127.0.0.2"], 60));
        assert_eq!(nx(10).aged(Duration::from_secs(40)), nx(0));
        assert_eq!(nx(0).cache_ttl(), None);
        assert_eq!(Answer::Failed(Failure::Timeout).cache_ttl(), None);
    }
}
