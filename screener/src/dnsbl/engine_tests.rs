//! Engine tests with scripted answers under paused time: parallelism,
//! deadlines, shared lookups, the TTL cache, health checks, the reply map.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::answer::{Answer, Failure};
use super::lookup::scripted::Scripted;
use super::{Dnsbl, DnsblError, DnsblOptions};

const CLIENT: &str = "192.0.2.10";

fn client() -> IpAddr {
    CLIENT.parse().unwrap()
}

fn listed(last: u8, ttl: u32) -> Answer {
    Answer::Listed {
        addrs: vec![Ipv4Addr::new(127, 0, 0, last)],
        ttl,
    }
}

fn code(addr: [u8; 4], ttl: u32) -> Answer {
    Answer::Listed {
        addrs: vec![Ipv4Addr::from(addr)],
        ttl,
    }
}

fn nx(ttl: u32) -> Answer {
    Answer::NotListed {
        negative_ttl: Some(ttl),
    }
}

fn opts(sites: &[&str]) -> DnsblOptions {
    DnsblOptions {
        sites: sites.iter().map(|s| s.parse().unwrap()).collect(),
        timeout: Duration::from_secs(10),
        min_ttl: Duration::from_secs(10),
        max_ttl: Duration::from_secs(3600),
        health_interval: Duration::from_secs(300),
        ..DnsblOptions::default()
    }
}

fn engine(opts: DnsblOptions, source: &Arc<Scripted>) -> Dnsbl {
    Dnsbl::with_source(opts, Arc::clone(source) as _, 1000).unwrap()
}

/// The query name for [`CLIENT`] under `domain`.
fn qname(domain: &str) -> String {
    format!("10.2.0.192.{domain}.")
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

/// A healthy list: RFC 5782 test points answered properly, `client`
/// answered with `answer`.
fn healthy(name: &str, answer: &Answer) -> Answer {
    if name.starts_with("2.0.0.127.") {
        listed(2, 300)
    } else if name.starts_with("10.2.0.192.") {
        answer.clone()
    } else {
        nx(300)
    }
}

/// Collects formatted log output for the current thread.
///
/// One global subscriber, installed once, writes each event into the
/// buffer of the thread that emitted it. A per-test `set_default` would
/// race with tests on other threads registering the same callsites, and a
/// callsite cached as uninteresting loses its events.
struct Logs(Arc<Mutex<Vec<u8>>>);

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Arc<Mutex<Vec<u8>>>>> =
        const { std::cell::RefCell::new(None) };
}

/// Clears the thread's capture buffer when the test ends.
struct CaptureGuard;

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CAPTURE.with(|c| c.borrow_mut().take());
    }
}

impl Logs {
    fn capture() -> (Logs, CaptureGuard) {
        static INSTALL: std::sync::Once = std::sync::Once::new();
        INSTALL.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(|| LogWriter)
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in the unit tests");
        });
        let buf = Arc::new(Mutex::new(Vec::new()));
        CAPTURE.with(|c| *c.borrow_mut() = Some(Arc::clone(&buf)));
        (Logs(buf), CaptureGuard)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Writes to the emitting thread's capture buffer, if it has one.
struct LogWriter;

impl io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        CAPTURE.with(|c| {
            if let Some(buf) = c.borrow().as_ref() {
                buf.lock().unwrap().extend_from_slice(b);
            }
        });
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn sites_are_queried_in_parallel() {
    let source = Scripted::new(|name| {
        let ms = if name.contains(".a.example") {
            100
        } else if name.contains(".b.example") {
            200
        } else {
            300
        };
        (listed(2, 900), Duration::from_millis(ms))
    });
    let dnsbl = engine(opts(&["a.example", "b.example*2", "c.example*4"]), &source);
    let start = Instant::now();
    let score = dnsbl.score(client(), far()).await;
    // Sequential lookups would take 600 ms.
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    assert_eq!(score.score, 7);
    assert_eq!(score.top_site.as_deref(), Some("c.example"));
    assert_eq!(score.listed_by, ["a.example", "b.example", "c.example"]);
    assert_eq!(score.ttl, Duration::from_secs(900));
}

#[tokio::test(start_paused = true)]
async fn answers_after_the_deadline_do_not_count_but_are_cached() {
    let source = Scripted::new(|name| {
        if name.contains(".slow.example") {
            (listed(2, 900), Duration::from_secs(5))
        } else {
            (listed(2, 900), Duration::from_millis(10))
        }
    });
    let dnsbl = engine(opts(&["fast.example", "slow.example*5"]), &source);
    let start = Instant::now();
    let score = dnsbl.score(client(), start + Duration::from_secs(1)).await;
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(1),
        "waits no longer than the deadline"
    );
    assert_eq!(score.score, 1, "only the fast site counts");
    assert_eq!(
        score.ttl,
        Duration::from_secs(10),
        "a missing answer shortens the TTL"
    );
    assert_eq!(dnsbl.stats().late_answers, 1);

    // The slow lookup finishes in the background; the next connection gets
    // its answer from the cache without asking again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let score = dnsbl.score(client(), Instant::now()).await;
    assert_eq!(score.score, 6);
    assert_eq!(source.count(&qname("slow.example")), 1);
    assert_eq!(source.count(&qname("fast.example")), 1);
    assert_eq!(dnsbl.stats().cache_hits, 2);
}

#[tokio::test(start_paused = true)]
async fn concurrent_connections_share_one_lookup() {
    let source = Scripted::new(|_| (listed(2, 900), Duration::from_millis(500)));
    let dnsbl = engine(opts(&["a.example", "b.example"]), &source);
    let deadline = far();
    let scores = futures::future::join_all((0..50).map(|_| dnsbl.score(client(), deadline))).await;
    assert!(scores.iter().all(|s| s.score == 2), "{scores:?}");
    assert_eq!(source.count(&qname("a.example")), 1);
    assert_eq!(source.count(&qname("b.example")), 1);
    let stats = dnsbl.stats();
    assert_eq!(stats.queries, 2);
    assert_eq!(stats.shared_lookups, 98);
}

#[tokio::test(start_paused = true)]
async fn different_clients_get_their_own_lookups() {
    let source = Scripted::new(|name| {
        let answer = if name.starts_with("10.2.0.192.") {
            listed(2, 900)
        } else {
            nx(900)
        };
        (answer, Duration::from_millis(5))
    });
    let dnsbl = engine(opts(&["a.example"]), &source);
    let other: IpAddr = "192.0.2.11".parse().unwrap();
    let (a, b) = futures::join!(dnsbl.score(client(), far()), dnsbl.score(other, far()));
    assert_eq!((a.score, b.score), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn cached_answers_expire_with_their_ttl() {
    let source = Scripted::new(|_| (nx(120), Duration::ZERO));
    let dnsbl = engine(opts(&["a.example"]), &source);
    assert_eq!(
        dnsbl.score(client(), far()).await.ttl,
        Duration::from_secs(120)
    );

    tokio::time::advance(Duration::from_secs(100)).await;
    let score = dnsbl.score(client(), far()).await;
    assert_eq!(source.count(&qname("a.example")), 1, "still cached");
    assert_eq!(
        score.ttl,
        Duration::from_secs(20),
        "the cached TTL counts down"
    );

    tokio::time::advance(Duration::from_secs(21)).await;
    dnsbl.score(client(), far()).await;
    assert_eq!(source.count(&qname("a.example")), 2, "expired, asked again");
}

#[tokio::test(start_paused = true)]
async fn cache_life_is_capped_at_max_ttl() {
    let source = Scripted::new(|_| (listed(2, 86_400), Duration::ZERO));
    let dnsbl = engine(opts(&["a.example"]), &source);
    assert_eq!(
        dnsbl.score(client(), far()).await.ttl,
        Duration::from_secs(3600)
    );
    tokio::time::advance(Duration::from_secs(3601)).await;
    dnsbl.score(client(), far()).await;
    assert_eq!(source.count(&qname("a.example")), 2);
}

#[tokio::test(start_paused = true)]
async fn a_full_cache_still_scores() {
    let source = Scripted::new(|_| (listed(2, 900), Duration::ZERO));
    let dnsbl = Dnsbl::with_source(opts(&["a.example"]), Arc::clone(&source) as _, 2).unwrap();
    for last in 1..=5u8 {
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, last));
        assert_eq!(dnsbl.score(ip, far()).await.score, 1);
    }
    // The first two were cached; the others did not fit.
    let first = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    let fifth = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 5));
    assert_eq!(dnsbl.score(first, far()).await.score, 1);
    assert_eq!(dnsbl.score(fifth, far()).await.score, 1);
    assert_eq!(source.count("1.2.0.192.a.example."), 1);
    assert_eq!(source.count("5.2.0.192.a.example."), 2);
    // Once the cached ones expire they make room again.
    tokio::time::advance(Duration::from_secs(901)).await;
    dnsbl.score(fifth, far()).await;
    dnsbl.score(fifth, far()).await;
    assert_eq!(source.count("5.2.0.192.a.example."), 3);
}

#[tokio::test(start_paused = true)]
async fn failures_fail_open_and_are_not_cached() {
    let source = Scripted::new(|name| {
        if name.contains(".servfail.example") {
            (
                Answer::Failed(Failure::Rcode(hickory_proto::op::ResponseCode::ServFail)),
                Duration::ZERO,
            )
        } else {
            (listed(2, 900), Duration::from_secs(3600))
        }
    });
    let (logs, _guard) = Logs::capture();
    let dnsbl = engine(opts(&["servfail.example*5", "hang.example*5"]), &source);
    let start = Instant::now();
    let score = dnsbl.score(client(), far()).await;
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(10),
        "dnsbl_timeout bounds the lookup"
    );
    assert_eq!(score.score, 0);
    assert_eq!(score.ttl, Duration::from_secs(10));
    let stats = dnsbl.stats();
    assert_eq!(stats.dns_failures, 2);
    assert_eq!(stats.sites["servfail.example"].dns_failures, 1);
    assert_eq!(stats.sites["hang.example"].dns_failures, 1);
    let text = logs.text();
    assert!(
        text.contains("DNSBL lookup at servfail.example failed: SERVFAIL"),
        "{text}"
    );
    assert!(
        text.contains("DNSBL lookup at hang.example failed: timeout"),
        "{text}"
    );

    dnsbl
        .score(client(), Instant::now() + Duration::from_secs(1))
        .await;
    assert_eq!(
        source.count(&qname("servfail.example")),
        2,
        "failures are asked again"
    );
}

#[tokio::test(start_paused = true)]
async fn error_answers_are_warned_once_and_counted() {
    let source = Scripted::new(|_| (code([127, 255, 255, 254], 60), Duration::from_millis(50)));
    let (logs, _guard) = Logs::capture();
    let dnsbl = engine(
        opts(&["zen.example*3", "zen.example=127.0.0.[2..11]"]),
        &source,
    );
    let deadline = far();
    let scores = futures::future::join_all((0..5).map(|_| dnsbl.score(client(), deadline))).await;
    assert!(
        scores.iter().all(|s| s.score == 0 && s.top_site.is_none()),
        "{scores:?}"
    );
    assert_eq!(dnsbl.stats().error_answers, 1);
    assert_eq!(dnsbl.stats().sites["zen.example"].error_answers, 1);
    let text = logs.text();
    assert_eq!(text.matches("DNSBL error answer").count(), 1, "{text}");
    assert!(text.contains("WARN"), "{text}");
    assert!(text.contains("127.255.255.254"), "{text}");
    assert!(text.contains("site=zen.example"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn listings_are_logged_as_dnsblog_logs_them_once_per_answer() {
    let source = Scripted::new(|_| {
        (
            Answer::Listed {
                addrs: vec![Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 4)],
                ttl: 60,
            },
            Duration::from_millis(50),
        )
    });
    let (logs, _guard) = Logs::capture();
    let dnsbl = engine(opts(&["zen.example*3"]), &source);
    let deadline = far();
    let scores = futures::future::join_all((0..5).map(|_| dnsbl.score(client(), deadline))).await;
    assert!(scores.iter().all(|s| s.score == 3), "{scores:?}");
    let text = logs.text();
    for a in ["127.0.0.2", "127.0.0.4"] {
        let line = format!("addr {CLIENT} listed by domain zen.example as {a}");
        assert_eq!(text.matches(&line).count(), 1, "{line}: {text}");
    }
    // Under their own target, which the postscreen format and journald
    // write under the dnsblog identifier.
    assert_eq!(
        text.lines()
            .filter(|l| l.contains(" listed by domain "))
            .filter(|l| l.contains(&format!(" {}: ", crate::logging::DNSBLOG_TARGET)))
            .count(),
        2,
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn mapped_ipv4_clients_are_queried_as_ipv4() {
    let source = Scripted::new(|_| (listed(2, 900), Duration::ZERO));
    let dnsbl = engine(opts(&["a.example"]), &source);
    let mapped: IpAddr = "::ffff:192.0.2.10".parse().unwrap();
    assert_eq!(dnsbl.score(mapped, far()).await.score, 1);
    assert_eq!(source.count(&qname("a.example")), 1);
}

#[tokio::test(start_paused = true)]
async fn ipv6_clients_are_queried_by_nibbles() {
    let source = Scripted::new(|_| (listed(2, 900), Duration::ZERO));
    let dnsbl = engine(opts(&["a.example"]), &source);
    let v6: IpAddr = "2001:db8::1".parse().unwrap();
    assert_eq!(dnsbl.score(v6, far()).await.score, 1);
    assert_eq!(
        source.count("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.a.example."),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn the_reply_map_hides_the_secret_domain() {
    let secret = "k3y5ecret.feed.example";
    let source = Scripted::new(|name| {
        if name.contains(".other.example") {
            (code([127, 0, 1, 255], 60), Duration::ZERO)
        } else if name.starts_with("1.0.0.127.") {
            // Lists the world: the health check must switch it off.
            (listed(2, 60), Duration::ZERO)
        } else {
            (listed(2, 900), Duration::ZERO)
        }
    });
    let mut o = opts(&[&format!("{secret}*4"), "other.example"]);
    o.reply_map
        .insert(format!("{secret}."), "feed.example".into());
    let (logs, _guard) = Logs::capture();
    let dnsbl = engine(o, &source);
    let score = dnsbl.score(client(), far()).await;
    assert_eq!(score.score, 4);
    assert_eq!(score.top_site.as_deref(), Some("feed.example"));
    assert_eq!(score.listed_by, ["feed.example"]);
    assert!(score
        .reject_reply(550, client())
        .ends_with("blocked using feed.example"));
    assert_eq!(
        source.count(&qname(secret)),
        1,
        "queries use the secret domain"
    );
    dnsbl.check_health().await;
    let stats = dnsbl.stats();
    assert!(stats.sites.contains_key("feed.example"));
    assert!(stats.disabled_sites.contains(&"feed.example".to_owned()));

    let text = logs.text();
    assert!(text.contains("feed.example disabled"), "{text}");
    assert!(!text.contains("k3y5ecret"), "{text}");
    assert!(!serde_json::to_string(&stats).unwrap().contains("k3y5ecret"));
}

#[tokio::test(start_paused = true)]
async fn a_reply_map_key_that_is_no_site_is_an_error_without_the_key() {
    let source = Scripted::new(|_| (nx(60), Duration::ZERO));
    let mut o = opts(&["k3y5ecret.feed.example"]);
    o.reply_map
        .insert("k3y5ecrte.feed.example".into(), "feed.example".into());
    let Err(err) = Dnsbl::with_source(o, source as _, 10) else {
        panic!("mistyped reply map key accepted");
    };
    assert!(matches!(
        err,
        DnsblError::BadOption {
            name: "dnsbl_reply_map",
            ..
        }
    ));
    assert!(!err.to_string().contains("k3y5"), "{err}");
    assert!(err.to_string().contains("feed.example"), "{err}");
}

#[test]
fn bad_options_are_errors_naming_the_option() {
    type Spoil = fn(&mut DnsblOptions);
    let source = Scripted::new(|_| (nx(60), Duration::ZERO));
    let cases: [(&str, Spoil); 3] = [
        ("dnsbl_timeout", |o| o.timeout = Duration::ZERO),
        ("dnsbl_min_ttl", |o| o.min_ttl = Duration::from_secs(7200)),
        ("dnsbl_health_interval", |o| {
            o.health_interval = Duration::ZERO;
        }),
    ];
    for (name, spoil) in cases {
        let mut o = opts(&["a.example"]);
        spoil(&mut o);
        let Err(err) = Dnsbl::with_source(o, Arc::clone(&source) as _, 10) else {
            panic!("{name}: accepted");
        };
        assert!(err.to_string().starts_with(name), "{err}");
    }
}

#[tokio::test(start_paused = true)]
async fn health_checks_switch_a_world_listing_site_off_and_on_again() {
    let source = Scripted::new(|name| {
        if name.ends_with(".world.example.") {
            (listed(2, 60), Duration::ZERO)
        } else {
            (healthy(name, &nx(60)), Duration::ZERO)
        }
    });
    let (logs, _guard) = Logs::capture();
    let dnsbl = engine(opts(&["world.example*5", "good.example"]), &source);
    let task = dnsbl.spawn_health_checks();
    wait_for(|| dnsbl.stats().disabled_sites == ["world.example"]).await;
    assert!(logs.text().contains("ERROR"), "{}", logs.text());
    assert!(
        logs.text().contains("test point 127.0.0.1 is listed"),
        "{}",
        logs.text()
    );
    let stats = dnsbl.stats();
    assert_eq!(stats.sites["world.example"].times_disabled, 1);
    assert!(stats.sites["world.example"].disabled);
    assert!(!stats.sites["good.example"].disabled);

    // Switched off: not asked, not scored.
    let score = dnsbl.score(client(), far()).await;
    assert_eq!(score.score, 0);
    assert_eq!(source.count(&qname("world.example")), 0);

    // The list is fixed; the next periodic check turns it back on.
    source.set(|name| (healthy(name, &listed(2, 60)), Duration::ZERO));
    wait_for(|| dnsbl.stats().disabled_sites.is_empty()).await;
    assert_eq!(dnsbl.score(client(), far()).await.score, 6);
    task.abort();
}

/// Names of the RFC 5782 test points under any domain.
const V4_WORLD: &str = "1.0.0.127.";
const V4_POS: &str = "2.0.0.127.";
/// `::ffff:7f00:1` and `::ffff:7f00:2` by nibbles.
const V6_WORLD: &str = "1.0.0.0.0.0.f.7.f.f.f.f.";
const V6_POS: &str = "2.0.0.0.0.0.f.7.f.f.f.f.";

#[tokio::test(start_paused = true)]
#[expect(clippy::too_many_lines, reason = "one row per case")]
async fn health_verdicts() {
    struct Case {
        label: &'static str,
        site: &'static str,
        answer: fn(&str) -> Answer,
        /// Switched off for IPv4, for IPv6.
        off: (bool, bool),
        /// Health warnings after one check.
        warnings: u64,
    }
    let cases = [
        Case {
            label: "RFC 5782 compliant IPv4 list",
            site: "bl.example",
            answer: |n| healthy(n, &nx(60)),
            off: (false, false),
            warnings: 0,
        },
        Case {
            label: "compliant in both families",
            site: "bl.example",
            answer: |n| {
                if n.starts_with(V4_POS) || n.starts_with(V6_POS) {
                    listed(2, 60)
                } else {
                    nx(60)
                }
            },
            off: (false, false),
            warnings: 0,
        },
        Case {
            label: "private list: no test point at all is a warning, not a switch-off",
            site: "bl.example",
            answer: |_| nx(60),
            off: (false, false),
            warnings: 1,
        },
        Case {
            label: "127.0.0.2 answered with an error code: a warning",
            site: "bl.example",
            answer: |n| {
                if n.starts_with(V4_POS) {
                    code([127, 255, 255, 254], 60)
                } else {
                    nx(60)
                }
            },
            off: (false, false),
            warnings: 1,
        },
        Case {
            label: "an error code named by the filter is usable",
            site: "odd.example=127.0.0.255",
            answer: |n| {
                if n.starts_with(V4_POS) {
                    code([127, 0, 0, 255], 60)
                } else {
                    nx(60)
                }
            },
            off: (false, false),
            warnings: 0,
        },
        Case {
            label: "IPv6-only list: judged on the IPv6 points, no IPv4 point needed",
            site: "bl.example",
            answer: |n| {
                if n.starts_with(V6_POS) {
                    listed(2, 60)
                } else {
                    nx(60)
                }
            },
            off: (false, false),
            warnings: 0,
        },
        Case {
            label: "127.0.0.1 listed: IPv4 off",
            site: "bl.example",
            answer: |n| {
                if n.starts_with(V4_WORLD) || n.starts_with(V4_POS) {
                    listed(2, 60)
                } else {
                    nx(60)
                }
            },
            off: (true, false),
            warnings: 0,
        },
        Case {
            label: "::ffff:7f00:1 listed: IPv6 off, IPv4 still on",
            site: "bl.example",
            answer: |n| {
                if n.starts_with(V4_POS) || n.starts_with(V6_WORLD) || n.starts_with(V6_POS) {
                    listed(2, 60)
                } else {
                    nx(60)
                }
            },
            off: (false, true),
            warnings: 0,
        },
        Case {
            label: "lists everything: both off",
            site: "bl.example",
            answer: |_| listed(2, 60),
            off: (true, true),
            warnings: 0,
        },
        Case {
            label: "127.0.0.1 listed with an answer the filter ignores: a warning",
            site: "bl.example=127.0.0.[2..11]",
            answer: |n| {
                if n.starts_with(V4_WORLD) {
                    listed(100, 60)
                } else if n.starts_with(V4_POS) {
                    listed(2, 60)
                } else {
                    nx(60)
                }
            },
            off: (false, false),
            warnings: 1,
        },
        Case {
            label: "127.0.0.1 listed with an error code: scores nobody, a warning",
            site: "bl.example",
            answer: |n| {
                if n.starts_with(V4_WORLD) {
                    code([127, 255, 255, 254], 60)
                } else if n.starts_with(V4_POS) {
                    listed(2, 60)
                } else {
                    nx(60)
                }
            },
            off: (false, false),
            warnings: 1,
        },
        Case {
            label: "every answer an error code (a public resolver): one warning per check",
            site: "bl.example",
            answer: |_| code([127, 255, 255, 254], 60),
            off: (false, false),
            warnings: 1,
        },
        Case {
            label: "DNS failure proves nothing",
            site: "bl.example",
            answer: |_| Answer::Failed(Failure::Transport),
            off: (false, false),
            warnings: 0,
        },
    ];
    for case in &cases {
        let answer = case.answer;
        let source = Scripted::new(move |n| (answer(n), Duration::ZERO));
        let dnsbl = engine(opts(&[case.site]), &source);
        dnsbl.check_health().await;
        let stats = dnsbl.stats();
        let site = stats.sites.values().next().unwrap();
        assert_eq!(
            (site.disabled_ipv4, site.disabled_ipv6),
            case.off,
            "{}",
            case.label
        );
        assert_eq!(site.disabled, case.off.0 || case.off.1, "{}", case.label);
        assert_eq!(
            stats.disabled_sites.is_empty(),
            !site.disabled,
            "{}",
            case.label
        );
        assert_eq!(site.health_warnings, case.warnings, "{}", case.label);
        assert_eq!(stats.health_warnings, case.warnings, "{}", case.label);
    }
}

#[tokio::test(start_paused = true)]
async fn a_family_switched_off_is_not_asked_the_other_still_is() {
    // The IPv6 side lists the world; the IPv4 side is sane. Both sides
    // list the clients, had they been asked.
    let source = Scripted::new(|n| {
        let lists = n.starts_with(V4_POS)
            || n.starts_with(V6_WORLD)
            || n.starts_with(V6_POS)
            || n.ends_with(".8.b.d.0.1.0.0.2.bl.example.")
            || n == qname("bl.example");
        (if lists { listed(2, 60) } else { nx(60) }, Duration::ZERO)
    });
    let (logs, _guard) = Logs::capture();
    let dnsbl = engine(opts(&["bl.example*3"]), &source);
    dnsbl.check_health().await;
    let text = logs.text();
    assert!(
        text.contains("disabled for IPv6 clients: test point ::ffff:7f00:1 is listed"),
        "{text}"
    );
    assert_eq!(dnsbl.score(client(), far()).await.score, 3);
    let v6: IpAddr = "2001:db8::1".parse().unwrap();
    assert_eq!(dnsbl.score(v6, far()).await.score, 0);
    assert_eq!(
        source.count("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example."),
        0,
        "an IPv6 client is not asked about"
    );
    // An IPv4-mapped client is an IPv4 client.
    let mapped: IpAddr = "::ffff:192.0.2.10".parse().unwrap();
    assert_eq!(dnsbl.score(mapped, far()).await.score, 3);
}

#[tokio::test(start_paused = true)]
async fn a_family_that_loses_its_test_point_is_warned_about_once_per_check() {
    let source = Scripted::new(|n| (healthy(n, &nx(60)), Duration::ZERO));
    let (logs, _guard) = Logs::capture();
    let dnsbl = engine(opts(&["bl.example"]), &source);
    dnsbl.check_health().await;
    assert_eq!(dnsbl.stats().health_warnings, 0);
    // The IPv4 point goes away; the list had it, so that is news.
    source.set(|_| (nx(60), Duration::ZERO));
    dnsbl.check_health().await;
    assert_eq!(dnsbl.stats().health_warnings, 1);
    assert!(dnsbl.stats().disabled_sites.is_empty());
    assert!(
        logs.text().contains("test point 127.0.0.2 is not listed"),
        "{}",
        logs.text()
    );
}

#[tokio::test(start_paused = true)]
async fn skipped_sites_are_never_checked_nor_switched_off() {
    let source = Scripted::new(|_| (listed(2, 60), Duration::ZERO));
    let mut o = opts(&["world.example*2", "k3y.feed.example", "other.example"]);
    o.reply_map
        .insert("k3y.feed.example".into(), "feed.example".into());
    o.health_skip = vec!["WORLD.example.".into(), "feed.example".into()];
    let dnsbl = engine(o, &source);
    dnsbl.check_health().await;
    let stats = dnsbl.stats();
    assert_eq!(stats.disabled_sites, ["other.example"]);
    assert!(stats.sites["world.example"].health_skipped);
    assert!(stats.sites["feed.example"].health_skipped);
    assert!(!stats.sites["other.example"].health_skipped);
    assert_eq!(source.count("1.0.0.127.world.example."), 0);
    assert_eq!(source.count("1.0.0.127.k3y.feed.example."), 0);
    assert_eq!(dnsbl.score(client(), far()).await.score, 3);

    // A skip name that is no site is refused without echoing it.
    let mut o = opts(&["k3y.feed.example"]);
    o.health_skip = vec!["k3y.fed.example".into()];
    let Err(err) = Dnsbl::with_source(o, Arc::clone(&source) as _, 10) else {
        panic!("unknown skip name accepted");
    };
    assert!(err.to_string().starts_with("dnsbl_health_skip"), "{err}");
    assert!(!err.to_string().contains("k3y"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_dns_outage_leaves_a_disabled_site_disabled() {
    let source = Scripted::new(|_| (listed(2, 60), Duration::ZERO));
    let dnsbl = engine(opts(&["bl.example"]), &source);
    dnsbl.check_health().await;
    assert_eq!(dnsbl.stats().disabled_sites, ["bl.example"]);
    source.set(|_| (Answer::Failed(Failure::Timeout), Duration::ZERO));
    dnsbl.check_health().await;
    assert_eq!(dnsbl.stats().disabled_sites, ["bl.example"]);
    assert_eq!(dnsbl.stats().sites["bl.example"].health_failures, 1);
    assert_eq!(dnsbl.stats().sites["bl.example"].times_disabled, 1);
}

#[tokio::test(start_paused = true)]
async fn the_health_task_ends_with_the_engine() {
    let source = Scripted::new(|n| (healthy(n, &nx(60)), Duration::ZERO));
    let dnsbl = engine(opts(&["bl.example"]), &source);
    let task = dnsbl.spawn_health_checks();
    drop(dnsbl);
    tokio::time::timeout(Duration::from_secs(3600), task)
        .await
        .expect("health task still running")
        .unwrap();
}

/// Waits (in paused time) until `cond` holds, failing after a simulated
/// hour.
#[track_caller]
fn wait_for(cond: impl Fn() -> bool) -> impl std::future::Future<Output = ()> {
    let caller = std::panic::Location::caller();
    async move {
        let deadline = Instant::now() + Duration::from_secs(3600);
        while !cond() {
            assert!(Instant::now() < deadline, "condition not met by {caller}");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
