//! Tests against a real rbldnsd (Debian package `rbldnsd`) serving zones
//! from a temporary directory on 127.0.0.1, plus UDP servers that never
//! answer, answer garbage or answer truncated.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Dnsbl, DnsblOptions};

const RBLDNSD: &str = "/usr/sbin/rbldnsd";

/// A running rbldnsd; killed, and its zone directory removed, on drop.
struct Rbldnsd {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Rbldnsd {
    /// Starts rbldnsd with `zones` (`(zone spec, file name, contents)`) and
    /// waits until it answers.
    #[track_caller]
    fn start(zones: &[(&str, &str, &str)]) -> Rbldnsd {
        assert!(
            Path::new(RBLDNSD).exists(),
            "{RBLDNSD} is missing: install the Debian package rbldnsd \
             (apt-get install rbldnsd)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let mut specs = Vec::new();
        for (spec, file, contents) in zones {
            std::fs::write(dir.path().join(file), contents).expect("write zone");
            specs.push(format!("{spec}:{file}"));
        }
        // Ask the kernel for a free port, then hand it to rbldnsd.
        let port = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("free port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(RBLDNSD)
            .arg("-n") // stay in the foreground, as our child
            .arg("-e") // allow 0/0
            .args(["-c", "0"]) // no zone reload polling
            .args(["-b", &format!("127.0.0.1/{port}")])
            .arg("-w")
            .arg(dir.path())
            .args(&specs)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rbldnsd");
        let mut server = Rbldnsd {
            child,
            addr,
            _dir: dir,
        };
        server.wait_ready();
        server
    }

    /// Polls with a raw query until rbldnsd answers, or fails with its
    /// error output if it exits first.
    #[track_caller]
    fn wait_ready(&mut self) {
        let probe = UdpSocket::bind("127.0.0.1:0").expect("probe socket");
        probe
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("probe timeout");
        // Header (id 1, RD), one question: "version.bind" TXT CH.
        let query = b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\
                      \x07version\x04bind\x00\x00\x10\x00\x03";
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 512];
        loop {
            if let Some(status) = self.child.try_wait().expect("rbldnsd status") {
                let mut err = String::new();
                if let Some(mut stderr) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
                }
                panic!("rbldnsd exited ({status}): {err}");
            }
            let _ = probe.send_to(query, self.addr);
            if probe.recv_from(&mut buf).is_ok() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "rbldnsd not answering on {}",
                self.addr
            );
        }
    }
}

impl Drop for Rbldnsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The zones every test here uses.
///
/// - `bl.example`: a blocklist (IPv4 and IPv6), listed TTL 900, negative
///   TTL 120 from its SOA.
/// - `wl.example`: an allowlist answering DNSWL-style 127.0.x.y.
/// - `err.example`: passes the test points but answers clients with
///   operator error codes.
/// - `world.example`: lists everything, IPv4 and IPv6.
fn standard_zones() -> Rbldnsd {
    const SOA: &str = "$SOA 600 ns.example. hostmaster.example. 1 600 300 86400 120\n";
    let bl4 = format!(
        "{SOA}$TTL 900\n:127.0.0.2:listed\n127.0.0.2\n192.0.2.66\n\
         192.0.2.67 :127.0.0.2:\n192.0.2.67 :127.0.0.10:\n"
    );
    let bl6 = "$TTL 900\n:127.0.0.3:listed\n2001:db8::66\n";
    let wl = format!("{SOA}$TTL 900\n:127.0.10.2:trusted\n127.0.0.2\n192.0.2.80\n");
    let err = format!(
        "{SOA}$TTL 300\n127.0.0.2 :127.0.0.2:\n192.0.2.66 :127.255.255.254:\n\
         192.0.2.67 :127.0.1.255:\n192.0.2.80 :127.0.0.255:\n192.0.2.81 :198.51.100.1:\n"
    );
    let world4 = format!("{SOA}$TTL 900\n:127.0.0.2:\n0/0\n");
    let world6 = "$TTL 900\n:127.0.0.2:\n::/0\n";
    Rbldnsd::start(&[
        ("bl.example:ip4set", "bl4", &bl4),
        ("bl.example:ip6trie", "bl6", bl6),
        ("wl.example:ip4set", "wl", &wl),
        ("err.example:ip4set", "err", &err),
        ("world.example:ip4trie", "world4", &world4),
        ("world.example:ip6trie", "world6", world6),
    ])
}

fn opts(server: SocketAddr, sites: &[&str]) -> DnsblOptions {
    DnsblOptions {
        sites: sites.iter().map(|s| s.parse().unwrap()).collect(),
        nameservers: vec![server],
        timeout: Duration::from_secs(2),
        min_ttl: Duration::from_secs(60),
        max_ttl: Duration::from_secs(3600),
        ..DnsblOptions::default()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

#[tokio::test]
async fn listed_and_unlisted_ipv4_clients() {
    let server = standard_zones();
    let dnsbl = Dnsbl::new(opts(server.addr, &["bl.example*3"])).unwrap();

    let listed = dnsbl.score(ip("192.0.2.66"), soon()).await;
    assert_eq!(listed.score, 3);
    assert_eq!(listed.top_site.as_deref(), Some("bl.example"));
    assert_eq!(listed.ttl, Duration::from_secs(900), "the A record's TTL");

    let clean = dnsbl.score(ip("192.0.2.1"), soon()).await;
    assert_eq!(clean.score, 0);
    assert_eq!(
        clean.ttl,
        Duration::from_secs(120),
        "the SOA's negative TTL"
    );
    assert!(clean.top_site.is_none());
    assert_eq!(dnsbl.stats().dns_failures, 0);
}

#[tokio::test]
async fn ipv6_clients_are_looked_up_by_nibbles() {
    let server = standard_zones();
    let dnsbl = Dnsbl::new(opts(server.addr, &["bl.example=127.0.0.3*2"])).unwrap();
    assert_eq!(dnsbl.score(ip("2001:db8::66"), soon()).await.score, 2);
    assert_eq!(dnsbl.score(ip("2001:db8::67"), soon()).await.score, 0);
}

#[tokio::test]
async fn filters_duplicates_and_allowlists() {
    let server = standard_zones();
    let dnsbl = Dnsbl::new(opts(
        server.addr,
        &[
            "bl.example=127.0.0.2",
            "bl.example=127.0.0.[10;11]*5",
            "wl.example=127.0.[0..255].[1..3]*-4",
        ],
    ))
    .unwrap();
    // Two A records: both entries match, each adds its weight once.
    let both = dnsbl.score(ip("192.0.2.67"), soon()).await;
    assert_eq!(both.score, 6);
    assert_eq!(both.top_site.as_deref(), Some("bl.example"));
    assert_eq!(both.listed_by, ["bl.example"]);
    assert_eq!(dnsbl.score(ip("192.0.2.66"), soon()).await.score, 1);

    let trusted = dnsbl.score(ip("192.0.2.80"), soon()).await;
    assert_eq!(trusted.score, -4);
    assert!(trusted.is_allowlisted(-1));
    assert!(!trusted.is_listed(1));
    // One query per domain per client, however many entries share it.
    assert_eq!(dnsbl.stats().sites["bl.example"].queries, 3);
}

#[tokio::test]
async fn error_answers_score_nothing() {
    let server = standard_zones();
    let dnsbl = Dnsbl::new(opts(server.addr, &["err.example*5", "wl.example*-5"])).unwrap();
    for client in ["192.0.2.66", "192.0.2.67", "192.0.2.80", "192.0.2.81"] {
        let score = dnsbl.score(ip(client), soon()).await;
        assert_eq!(
            score.score,
            if client == "192.0.2.80" { -5 } else { 0 },
            "{client}"
        );
        assert!(
            score.listed_by.iter().all(|s| s != "err.example"),
            "{client}"
        );
        assert_eq!(
            score.ttl,
            Duration::from_secs(60),
            "{client}: errors shorten the TTL"
        );
    }
    let stats = dnsbl.stats();
    assert_eq!(stats.sites["err.example"].error_answers, 4);
    assert_eq!(stats.error_answers, 4);

    // The operator's filter may still ask for an error code explicitly.
    let odd = Dnsbl::new(opts(server.addr, &["err.example=127.0.0.255*2"])).unwrap();
    assert_eq!(odd.score(ip("192.0.2.80"), soon()).await.score, 2);
}

#[tokio::test]
async fn a_world_listing_zone_is_switched_off() {
    let server = standard_zones();
    let dnsbl = Dnsbl::new(opts(
        server.addr,
        &[
            "world.example*10",
            "bl.example",
            "err.example",
            "wl.example*-1",
        ],
    ))
    .unwrap();
    // Before the check, the rogue zone rejects everyone.
    assert_eq!(dnsbl.score(ip("192.0.2.1"), soon()).await.score, 10);
    dnsbl.check_health().await;
    let stats = dnsbl.stats();
    assert_eq!(stats.disabled_sites, ["world.example"]);
    assert_eq!(stats.sites["world.example"].times_disabled, 1);
    let score = dnsbl.score(ip("192.0.2.2"), soon()).await;
    assert_eq!(score.score, 0);
    let score = dnsbl.score(ip("2001:db8::1"), soon()).await;
    assert_eq!(score.score, 0);
}

#[tokio::test]
async fn an_ipv6_world_listing_is_caught_by_the_ipv6_test_points() {
    // rbldnsd answers IPv4-mapped IPv6 queries from its IPv4 data, so a list
    // whose IPv6 side alone lists everything is spelt out record by record.
    const SOA: &str = "$SOA 600 ns.example. hostmaster.example. 1 600 300 86400 120\n";
    let mapped = |last: u8| format!("{last}.0.0.0.0.0.f.7.f.f.f.f{}", ".0".repeat(20));
    let v6world = format!(
        "{SOA}2.0.0.127 A 127.0.0.2\n{} A 127.0.0.2\n{} A 127.0.0.2\n",
        mapped(2),
        mapped(1)
    );
    let v4only = format!("{SOA}2.0.0.127 A 127.0.0.2\n");
    let server = Rbldnsd::start(&[
        ("v6world.example:generic", "v6world", &v6world),
        ("v4only.example:generic", "v4only", &v4only),
    ]);
    let dnsbl = Dnsbl::new(opts(server.addr, &["v6world.example", "v4only.example"])).unwrap();
    dnsbl.check_health().await;
    assert_eq!(dnsbl.stats().disabled_sites, ["v6world.example"]);
}

#[tokio::test]
async fn an_ipv6_only_list_stays_on_and_lists_ipv6_clients() {
    const SOA: &str = "$SOA 600 ns.example. hostmaster.example. 1 600 300 86400 120\n";
    let v6 = format!("{SOA}$TTL 900\n:127.0.0.2:listed\n::ffff:7f00:2\n2001:db8::66\n");
    let server = Rbldnsd::start(&[("v6.example:ip6trie", "v6", &v6)]);
    let dnsbl = Dnsbl::new(opts(server.addr, &["v6.example*2"])).unwrap();
    dnsbl.check_health().await;
    let stats = dnsbl.stats();
    assert!(stats.disabled_sites.is_empty(), "{stats:?}");
    assert_eq!(
        stats.health_warnings, 0,
        "no IPv4 data is no fault: {stats:?}"
    );
    assert_eq!(dnsbl.score(ip("2001:db8::66"), soon()).await.score, 2);
    assert_eq!(dnsbl.score(ip("2001:db8::67"), soon()).await.score, 0);
}

#[tokio::test]
async fn a_private_list_without_test_points_stays_on_with_a_warning() {
    const SOA: &str = "$SOA 600 ns.example. hostmaster.example. 1 600 300 86400 120\n";
    let private = format!("{SOA}$TTL 900\n:127.0.0.2:listed\n192.0.2.66\n");
    let server = Rbldnsd::start(&[("private.example:ip4set", "private", &private)]);
    let dnsbl = Dnsbl::new(opts(server.addr, &["private.example*4"])).unwrap();
    dnsbl.check_health().await;
    let stats = dnsbl.stats();
    assert!(stats.disabled_sites.is_empty(), "{stats:?}");
    assert_eq!(
        stats.sites["private.example"].health_warnings, 1,
        "{stats:?}"
    );
    assert_eq!(dnsbl.score(ip("192.0.2.66"), soon()).await.score, 4);
}

#[tokio::test]
async fn a_list_that_lists_127_0_0_1_is_switched_off() {
    const SOA: &str = "$SOA 600 ns.example. hostmaster.example. 1 600 300 86400 120\n";
    let rogue = format!("{SOA}$TTL 900\n:127.0.0.2:listed\n127.0.0.1\n127.0.0.2\n192.0.2.66\n");
    let server = Rbldnsd::start(&[("rogue.example:ip4set", "rogue", &rogue)]);
    let dnsbl = Dnsbl::new(opts(server.addr, &["rogue.example*4"])).unwrap();
    assert_eq!(dnsbl.score(ip("192.0.2.66"), soon()).await.score, 4);
    dnsbl.check_health().await;
    let stats = dnsbl.stats();
    assert_eq!(stats.disabled_sites, ["rogue.example"]);
    assert!(stats.sites["rogue.example"].disabled_ipv4, "{stats:?}");
    assert_eq!(dnsbl.score(ip("192.0.2.67"), soon()).await.score, 0);
}

#[tokio::test]
async fn a_zone_the_server_does_not_serve_fails_open() {
    let server = standard_zones();
    let dnsbl = Dnsbl::new(opts(server.addr, &["bl.example", "nosuch.example*9"])).unwrap();
    // rbldnsd REFUSES queries outside its zones.
    let score = dnsbl.score(ip("192.0.2.66"), soon()).await;
    assert_eq!(score.score, 1);
    assert_eq!(dnsbl.stats().sites["nosuch.example"].dns_failures, 1);
    // And a health check that gets no answer changes nothing.
    dnsbl.check_health().await;
    assert!(dnsbl.stats().disabled_sites.is_empty());
}

/// A UDP server on 127.0.0.1 that reads queries and replies with
/// `reply(query)`, or never replies if that is `None`. Stops on drop.
struct FakeServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    async fn start(reply: fn(&[u8]) -> Option<Vec<u8>>) -> FakeServer {
        let socket = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = socket.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                if let Some(answer) = reply(&buf[..n]) {
                    let _ = socket.send_to(&answer, peer).await;
                }
            }
        });
        FakeServer { addr, task }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Scores one client against `server` for `bl.example` and checks that DNS
/// trouble cost nothing but a logged failure, within the deadline.
async fn fails_open(server: SocketAddr, timeout: Duration, deadline: Duration) {
    let mut o = opts(server, &["bl.example*5"]);
    o.timeout = timeout;
    let dnsbl = Dnsbl::new(o).unwrap();
    let start = Instant::now();
    let score = dnsbl.score(ip("192.0.2.66"), start + deadline).await;
    let took = start.elapsed();
    assert_eq!(score.score, 0);
    assert!(
        took <= deadline + Duration::from_millis(300),
        "took {took:?}"
    );
    assert_eq!(score.ttl, Duration::from_secs(60));
    // The failure is counted once the lookup gives up.
    let give_up = Instant::now() + timeout + Duration::from_secs(5);
    while dnsbl.stats().dns_failures == 0 {
        assert!(Instant::now() < give_up, "failure never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let server = FakeServer::start(|_| None).await;
    let start = Instant::now();
    fails_open(
        server.addr,
        Duration::from_millis(500),
        Duration::from_secs(3),
    )
    .await;
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "dnsbl_timeout honoured"
    );
}

#[tokio::test]
async fn the_deadline_cuts_a_hanging_lookup_short() {
    let server = FakeServer::start(|_| None).await;
    fails_open(
        server.addr,
        Duration::from_secs(2),
        Duration::from_millis(300),
    )
    .await;
}

#[tokio::test]
async fn servfail_fails_open() {
    let server = FakeServer::start(|q| {
        let mut r = q.to_vec();
        r[2] |= 0x80; // QR
        r[3] = (r[3] & 0xf0) | 2; // SERVFAIL
        Some(r)
    })
    .await;
    fails_open(server.addr, Duration::from_secs(1), Duration::from_secs(3)).await;
}

#[tokio::test]
async fn malformed_replies_fail_open() {
    let server = FakeServer::start(|q| {
        // The query's id, then bytes that are no DNS message.
        let mut r = q[..2].to_vec();
        r.extend_from_slice(b"\x81\x80\x00\x01\x00\x05\xff\xff");
        Some(r)
    })
    .await;
    fails_open(
        server.addr,
        Duration::from_millis(500),
        Duration::from_secs(3),
    )
    .await;
}

#[tokio::test]
async fn truncated_replies_fail_open() {
    // TC set, no answers, and no TCP listener to retry on.
    let server = FakeServer::start(|q| {
        let mut r = q.to_vec();
        r[2] |= 0x82; // QR, TC
        Some(r)
    })
    .await;
    fails_open(
        server.addr,
        Duration::from_millis(500),
        Duration::from_secs(3),
    )
    .await;
}

/// The daemon builds its configuration before the runtime starts.
#[test]
fn the_engine_is_built_without_a_runtime() {
    let dnsbl = Dnsbl::new(opts("127.0.0.1:5353".parse().unwrap(), &["bl.example"])).unwrap();
    assert!(!dnsbl.is_empty());
    assert_eq!(dnsbl.stats().sites["bl.example"].queries, 0);
}
