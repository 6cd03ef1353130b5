//! The Prometheus endpoint of a real daemon: after a pregreet bot, a good
//! client (swaks through to a Postfix backend) and a DNSBL lookup each,
//! `/metrics` parses strictly and says what `screener stats` says.

use std::{net::SocketAddr, process::Command, time::Duration};

use integration_tests::{
    daemon::{blocked, set, start, stats, write_config, Daemon},
    netns::{wait_for, NetNs, PinDir},
    openmetrics::{get, scrape, Exposition},
    rbldnsd::Rbldnsd,
    smtp_peers::{free_port, require, Bot, Postfix, Upstream},
};

const SOA: &str = "$SOA 600 ns.example. hostmaster.example. 1 600 300 86400 120\n";

/// A daemon guarding `ns`'s veth with XDP, scoring one DNSBL list served
/// by rbldnsd, handing good clients to Postfix, with metrics on loopback.
struct Setup {
    ns: NetNs,
    _pins: PinDir,
    d: Daemon,
    _dns: Rbldnsd,
    _backend: Postfix,
    smtp: SocketAddr,
    metrics: SocketAddr,
}

fn setup() -> Setup {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("met{}", ns.n));
    let dns = Rbldnsd::start(&[(
        "bl.example:ip4set",
        &format!("{SOA}$TTL 900\n:127.0.0.2:listed\n127.0.0.2\n"),
    )]);
    let backend = Postfix::start(Upstream::Haproxy, false);
    let port = 2700 + u16::try_from(ns.n).unwrap();
    let smtp = SocketAddr::new(ns.host_v4(), port);
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &ns, &pins, "skb", port);
    set(&cfg, "smtp", &format!("listen = [\"{smtp}\"]"));
    set(&cfg, "smtp", &format!("backend = \"{}\"", backend.addr));
    set(&cfg, "screen", "greet_wait = \"1s\"");
    set(&cfg, "screen", "dnsbl_sites = [\"bl.example\"]");
    set(&cfg, "screen", "dnsbl_timeout = \"2s\"");
    set(&cfg, "dns", &format!("nameservers = [\"{}\"]", dns.addr));
    set(&cfg, "metrics", &format!("listen = [\"{metrics}\"]"));
    let child = start(&cfg, dir.path(), 0);
    let d = Daemon { child, cfg, dir };
    wait_for("the SMTP listener", Duration::from_secs(10), || {
        d.log(0).contains("smtp listening on")
    });
    Setup {
        ns,
        _pins: pins,
        d,
        _dns: dns,
        _backend: backend,
        smtp,
        metrics,
    }
}

impl Setup {
    /// A scrape taken between two `stats` answers: every counter's
    /// sample lies between the two (counters only grow).
    fn between(&self) -> (serde_json::Value, Exposition, serde_json::Value) {
        let before = stats(&self.d.cfg);
        let exp = scrape(self.metrics);
        let after = stats(&self.d.cfg);
        (before, exp, after)
    }
}

/// Asserts that the sample lies between the two `stats` values at `path`.
#[track_caller]
fn agrees(
    (before, exp, after): &(serde_json::Value, Exposition, serde_json::Value),
    sample: &str,
    labels: &[(&str, &str)],
    path: &[&str],
) -> u64 {
    let at = |v: &serde_json::Value| {
        let mut v = v;
        for p in path {
            v = &v[*p];
        }
        v.as_u64()
            .unwrap_or_else(|| panic!("stats has no number at {path:?}: {v}"))
    };
    let got = exp.count(sample, labels);
    assert!(
        at(before) <= got && got <= at(after),
        "{sample}{labels:?} = {got}, stats {path:?} went {} -> {}",
        at(before),
        at(after)
    );
    got
}

/// A bot that talks before the greeting, from `from`, under the default
/// `greet_action = enforce`: the dialogue goes on and its RCPT is refused.
/// Returns what it was told.
fn pregreet(ns: &NetNs, from: std::net::IpAddr, to: SocketAddr) -> String {
    let stream = ns
        .tcp_from(from, to, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{from} could not connect to {to}"));
    let mut bot = Bot { stream };
    bot.send(b"EHLO bot.example\r\n");
    let mut said = bot.read_reply("250");
    bot.send(b"MAIL FROM:<bot@example.net>\r\n");
    said += &bot.read_reply("250");
    bot.send(b"RCPT TO:<bob@backend.test>\r\n");
    said += &bot.read_until("\r\n");
    bot.send(b"QUIT\r\n");
    said + &bot.read_to_close()
}

#[test]
fn the_endpoint_says_what_stats_says_after_a_bot_and_a_good_client() {
    let s = setup();
    let swaks = require("swaks", "swaks");

    // Before any client: every part of the daemon is there, at zero.
    let exp = scrape(s.metrics);
    assert_eq!(exp.count("screener_smtp_connections_total", &[]), 0);
    assert_eq!(exp.count("screener_xdp_attached", &[]), 1);
    assert_eq!(exp.count("screener_stress_mode", &[]), 0);
    assert_eq!(exp.count("screener_config_generation", &[]), 0);
    assert_eq!(
        exp.count("screener_xdp_map_entries", &[("map", "block_v4")]),
        0
    );
    assert_eq!(
        exp.count("screener_xdp_map_max_entries", &[("map", "block_v4")]),
        1 << 20
    );
    assert_eq!(
        exp.count(
            "screener_dnsbl_lookup_duration_seconds_count",
            &[("site", "bl.example")]
        ),
        0
    );

    // A pregreet bot: failed, blocked, its next SYN dropped at the NIC.
    let bot = s.ns.client_v4();
    let reply = pregreet(&s.ns, bot, s.smtp);
    assert!(reply.starts_with("220-"), "no teaser: {reply:?}");
    assert!(reply.contains("\r\n550 "), "RCPT not refused: {reply:?}");
    wait_for("the bot's block", Duration::from_secs(10), || {
        blocked(&s.d.cfg) == vec![format!("{bot}/32")]
    });
    assert!(
        !s.ns.connects(bot, s.smtp, Duration::from_secs(1)),
        "the blocked bot got through"
    );

    // A good client: swaks from the neighbour, through to Postfix.
    let out = Command::new("ip")
        .args(["netns", "exec", &s.ns.name])
        .arg(&swaks)
        .args(["--server", &s.smtp.ip().to_string()])
        .args(["--port", &s.smtp.port().to_string()])
        .args(["--local-interface", &s.ns.neighbour_v4().to_string()])
        .args(["--from", "alice@example.org", "--to", "bob@backend.test"])
        .args(["--timeout", "20"])
        .output()
        .expect("run swaks");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "swaks failed: {said}");
    assert!(said.contains("<-  250 2.0.0 Ok: queued"), "{said}");
    // Its connection ends after QUIT; the outcome is counted then.
    wait_for("the good client's outcome", Duration::from_secs(10), || {
        stats(&s.d.cfg)["smtp"]["outcomes"]["handed_off"].as_u64() == Some(1)
    });

    let three = s.between();
    let exp = &three.1;
    // Connections by outcome: the bot failed, the client was handed off,
    // the dropped SYN never reached the daemon.
    let conns = agrees(
        &three,
        "screener_smtp_connections_total",
        &[],
        &["smtp", "connections"],
    );
    assert_eq!(conns, 2);
    for (outcome, want) in [("failed", 1), ("handed_off", 1), ("disconnected", 0)] {
        let got = agrees(
            &three,
            "screener_smtp_connection_outcomes_total",
            &[("outcome", outcome)],
            &["smtp", "outcomes", outcome],
        );
        assert_eq!(got, want, "outcome {outcome}");
    }
    assert_eq!(
        exp.count("screener_smtp_connection_outcomes_total", &[]),
        conns,
        "every accepted connection ended with one outcome"
    );
    // Passes and failures per test.
    let f = agrees(
        &three,
        "screener_smtp_test_failures_total",
        &[("test", "pregreet")],
        &["smtp", "fails", "pregreet"],
    );
    assert_eq!(f, 1);
    for test in ["pregreet", "dnsbl"] {
        let p = agrees(
            &three,
            "screener_smtp_test_passes_total",
            &[("test", test)],
            &["smtp", "passes", test],
        );
        assert_eq!(p, 1, "{test} passes");
    }
    assert_eq!(
        agrees(
            &three,
            "screener_smtp_passes_total",
            &[("kind", "new")],
            &["smtp", "pass_new"]
        ),
        1
    );
    assert_eq!(
        agrees(
            &three,
            "screener_smtp_handoffs_total",
            &[],
            &["smtp", "handoffs"]
        ),
        1
    );
    agrees(
        &three,
        "screener_smtp_backend_errors_total",
        &[],
        &["smtp", "backend_errors"],
    );
    // Both were screened, and both for longer than the 1 s greeting
    // wait: the client until its hand-off, the bot (enforce) until it quit.
    let screened = agrees(
        &three,
        "screener_smtp_screening_duration_seconds_count",
        &[],
        &["smtp", "screening_time", "count"],
    );
    assert_eq!(screened, 2);
    assert_eq!(
        exp.count(
            "screener_smtp_screening_duration_seconds_bucket",
            &[("le", "1.0")],
        ),
        0,
        "a screening shorter than the greeting wait"
    );
    // DNSBL: one lookup per client, each with its latency.
    let q = agrees(
        &three,
        "screener_dnsbl_queries_total",
        &[("site", "bl.example")],
        &["dnsbl", "sites", "bl.example", "queries"],
    );
    assert_eq!(q, 2);
    assert_eq!(
        agrees(
            &three,
            "screener_dnsbl_lookup_duration_seconds_count",
            &[("site", "bl.example")],
            &["dnsbl", "sites", "bl.example", "latency", "count"],
        ),
        q
    );
    assert_eq!(
        exp.count(
            "screener_dnsbl_errors_total",
            &[("site", "bl.example"), ("kind", "dns_failure")]
        ),
        0
    );
    // Verdicts and the kernel, read from the per-CPU map at scrape time.
    assert_eq!(
        agrees(
            &three,
            "screener_blocks_total",
            &[("reason", "pregreet")],
            &["daemon", "blocks_by_reason", "pregreet"],
        ),
        1
    );
    agrees(
        &three,
        "screener_blocks_refused_full_total",
        &[],
        &["daemon", "blocks_refused_full"],
    );
    let dropped = agrees(
        &three,
        "screener_xdp_packets_dropped_total",
        &[("reason", "pregreet")],
        &["kernel", "dropped_by_reason", "pregreet"],
    );
    assert!(dropped >= 1, "the bot's SYN was not counted as dropped");
    assert_eq!(
        exp.count("screener_xdp_map_entries", &[("map", "block_v4")]),
        1
    );

    // An operator's unblock and a reload move theirs.
    integration_tests::daemon::ok(&s.d.cfg, &["block", "del", &format!("{bot}/32")]);
    let pid = s.d.child.0.as_ref().expect("daemon running").id();
    signal(pid, "-HUP");
    wait_for("the reload", Duration::from_secs(10), || {
        stats(&s.d.cfg)["daemon"]["config_generation"].as_u64() == Some(1)
    });
    let three = s.between();
    assert_eq!(
        agrees(
            &three,
            "screener_unblocks_total",
            &[("cause", "operator")],
            &["daemon", "unblocks_by_cause", "operator"],
        ),
        1
    );
    assert_eq!(
        three
            .1
            .count("screener_xdp_map_entries", &[("map", "block_v4")]),
        0
    );
    assert_eq!(three.1.count("screener_config_generation", &[]), 1);

    // Only /metrics is served.
    let (status, _, _) = get(s.metrics, "/");
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");

    // A scraper that connected and said nothing does not hold up the stop.
    let idle = std::net::TcpStream::connect(s.metrics).expect("idle scraper");
    let mut d = s.d;
    signal(pid, "-TERM");
    let child = d.child.0.as_mut().expect("daemon running");
    wait_for("the daemon to stop", Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    drop(idle);
    let log = d.log(0);
    assert!(!log.contains("not finished"), "{log}");
}

/// Sends `sig` (`-HUP`, `-TERM`) to `pid` through kill(1).
fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[test]
fn without_metrics_listen_nothing_listens_and_a_clash_is_refused() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("mo{}", ns.n));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &ns, &pins, "skb", 2750);
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // Off by default: the daemon starts and the port stays closed.
    let d = Daemon {
        child: start(&cfg, dir.path(), 0),
        cfg: cfg.clone(),
        dir,
    };
    assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
    assert!(!d.log(0).contains("metrics endpoint ready"), "{}", d.log(0));
    // The same address for SMTP and metrics is refused, naming the key.
    set(&cfg, "smtp", &format!("listen = [\"{addr}\"]"));
    set(&cfg, "metrics", &format!("listen = [\"{addr}\"]"));
    let (ok, out) = integration_tests::daemon::cli(&cfg, &["config", "check"]);
    assert!(!ok && out.contains("metrics.listen"), "{out}");
}
