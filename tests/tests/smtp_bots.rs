//! Scripted bots, one per misbehaviour, against the screener in front of a
//! real Postfix: each gets postscreen's outcome, is reported for blocking
//! where the action says so, and never reaches the backend.

use std::time::Duration;

use integration_tests::smtp_peers::{test_config, Bot, Postfix, Screener, Upstream};
use screener::config::Action;
use screener::smtp::{FailedTest, TestId};

fn screener(pf: &Postfix) -> Screener {
    let mut cfg = test_config(pf.addr);
    cfg.screen.command_time_limit = Duration::from_secs(3);
    cfg.screen.bare_newline_action = Action::Enforce;
    Screener::start(cfg, None)
}

/// Reads the greeting up to our own `220 ` line (the deep tests start).
fn greeted(bot: &mut Bot) {
    let got = bot.read_until("220 screener.test ESMTP\r\n");
    assert!(got.starts_with("220-screener.test ESMTP\r\n"), "{got:?}");
    assert!(got.ends_with("220 screener.test ESMTP\r\n"), "{got:?}");
}

#[track_caller]
fn reported(scr: &Screener, ip: [u8; 4], test: FailedTest) {
    let f = scr.failures();
    assert!(
        f.iter()
            .any(|f| f.tests.contains(&test) && f.ip == std::net::IpAddr::from(ip)),
        "{test:?} from {ip:?} not reported: {f:?}"
    );
}

#[test]
fn misbehaving_clients_get_postscreens_outcome() {
    let pf = Postfix::start(Upstream::Haproxy, false);
    let scr = screener(&pf);

    // Pregreet (enforce): talks first; what it said is its first command
    // after the 220, then it is refused at RCPT.
    let mut bot = Bot::connect([127, 0, 1, 1], scr.addr);
    bot.send(b"HELO bot.example\r\n");
    let got = bot.read_until("250 screener.test\r\n");
    assert_eq!(
        got,
        "220-screener.test ESMTP\r\n220 screener.test ESMTP\r\n250 screener.test\r\n"
    );
    bot.send(b"MAIL FROM:<spam@example.org>\r\n");
    assert_eq!(bot.read_until("\r\n"), "250 2.1.0 Ok\r\n");
    bot.send(b"RCPT TO:<rcpt@backend.test>\r\n");
    assert_eq!(bot.read_until("\r\n"), "550 5.5.1 Protocol error\r\n");
    reported(&scr, [127, 0, 1, 1], FailedTest::Test(TestId::Pregreet));

    // Pipelining without PIPELINING (enforce).
    let mut bot = Bot::connect([127, 0, 1, 2], scr.addr);
    greeted(&mut bot);
    bot.send(
        b"EHLO bot.example\r\nMAIL FROM:<spam@example.org>\r\nRCPT TO:<rcpt@backend.test>\r\n",
    );
    let got = bot.read_until("550 5.5.1 Protocol error\r\n");
    assert!(got.ends_with("550 5.5.1 Protocol error\r\n"), "{got:?}");
    reported(&scr, [127, 0, 1, 2], FailedTest::Test(TestId::Pipelining));

    // Non-SMTP commands (drop): HTTP, proxy CONNECT, a header line.
    for (i, line) in [
        &b"GET / HTTP/1.1\r\n"[..],
        b"CONNECT 192.0.2.1:25 HTTP/1.0\r\n",
        b"Subject: cheap pills\r\n",
    ]
    .into_iter()
    .enumerate()
    {
        let ip = [127, 0, 1, 3 + u8::try_from(i).unwrap()];
        let mut bot = Bot::connect(ip, scr.addr);
        greeted(&mut bot);
        bot.send(line);
        let got = bot.read_to_close();
        assert_eq!(got, "521 5.7.0 Error: I can break rules, too. Goodbye.\r\n");
        reported(&scr, ip, FailedTest::Test(TestId::NonSmtpCommand));
    }

    // Bare LF (enforce in this test).
    let mut bot = Bot::connect([127, 0, 1, 7], scr.addr);
    greeted(&mut bot);
    bot.send(b"HELO bot.example\n");
    bot.read_until("\r\n");
    bot.send(b"MAIL FROM:<spam@example.org>\r\n");
    bot.read_until("\r\n");
    bot.send(b"RCPT TO:<rcpt@backend.test>\r\n");
    assert_eq!(bot.read_until("\r\n"), "550 5.5.1 Protocol error\r\n");
    reported(&scr, [127, 0, 1, 7], FailedTest::Test(TestId::BareNewline));

    // One byte a second: the whole line must arrive within 3 s.
    let mut bot = Bot::connect([127, 0, 1, 8], scr.addr);
    greeted(&mut bot);
    let start = std::time::Instant::now();
    let mut got = String::new();
    for b in b"HELO slow.example\r\n" {
        bot.send(&[*b]);
        std::thread::sleep(Duration::from_secs(1));
        bot.stream.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 256];
        if let Ok(n) = std::io::Read::read(&mut bot.stream, &mut buf) {
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        bot.stream.set_nonblocking(false).unwrap();
        if !got.is_empty() {
            break;
        }
    }
    assert_eq!(got, "421 4.4.2 screener.test Error: timeout exceeded\r\n");
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );

    // Nothing any bot sent reached Postfix: it only ever saw the probe.
    let log = pf.log();
    assert!(
        !log.contains("[127.0.1."),
        "a bot reached the backend:\n{log}"
    );
    let stats = scr.server.stats();
    assert_eq!(stats.pass_new, 0, "{stats:?}");
    assert_eq!(stats.fails.tests[TestId::NonSmtpCommand], 3, "{stats:?}");
}

/// 1000 idle connections: each gets the teaser, then the 220, then is
/// timed out; stress mode comes and goes.
#[test]
fn thousand_idle_connections() {
    let pf = Postfix::start(Upstream::Haproxy, false);
    let mut cfg = test_config(pf.addr);
    cfg.screen.command_time_limit = Duration::from_secs(5);
    cfg.screen.stress_command_time_limit = Duration::from_secs(5);
    cfg.screen.pre_queue_limit = 1050;
    cfg.screen.post_queue_limit = 10;
    let scr = Screener::start(cfg, None);
    let mut bots: Vec<Bot> = (0..1000u32)
        .map(|i| {
            // 50 connections per address, the per-client limit.
            let ip = [127, 0, 2, u8::try_from(1 + i / 50).unwrap()];
            Bot::connect(ip, scr.addr)
        })
        .collect();
    integration_tests::netns::wait_for("1000 clients screened", Duration::from_secs(20), || {
        scr.server.stats().screening == 1000
    });
    assert!(scr.server.stats().stress, "950 of 1050 is past 0.9");
    for bot in &mut bots {
        let got = bot.read_to_close();
        assert!(got.starts_with("220-screener.test ESMTP\r\n"), "{got:?}");
        assert!(
            got.ends_with("421 4.4.2 screener.test Error: timeout exceeded\r\n"),
            "{got:?}"
        );
    }
    integration_tests::netns::wait_for("all sessions over", Duration::from_secs(10), || {
        scr.server.stats().screening == 0
    });
    assert!(!scr.server.stats().stress);
    // A 51st connection from one address is refused while 50 are open.
    let held: Vec<Bot> = (0..50)
        .map(|_| Bot::connect([127, 0, 3, 1], scr.addr))
        .collect();
    integration_tests::netns::wait_for("50 screened", Duration::from_secs(10), || {
        scr.server.stats().screening == 50
    });
    let mut extra = Bot::connect([127, 0, 3, 1], scr.addr);
    assert_eq!(
        extra.read_to_close(),
        "421 4.7.0 Error: too many connections\r\n"
    );
    drop(held);
}

/// SIGTERM: clients still in tests are told the service is shutting down.
#[test]
fn shutdown_tells_clients_in_tests() {
    let pf = Postfix::start(Upstream::Haproxy, false);
    let scr = screener(&pf);
    let mut bot = Bot::connect([127, 0, 4, 1], scr.addr);
    greeted(&mut bot);
    let stopper = std::thread::spawn(move || scr.stop());
    assert_eq!(bot.read_to_close(), "421 4.3.2 Service shutting down\r\n");
    stopper.join().unwrap();
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Kills a child process this test started, on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One runtime holds 10,000 clients in the greet wait at a small fixed
/// cost per connection. The clients live in a perl process (perl comes
/// with swaks) so the descriptors of both ends don't share one limit.
#[test]
fn ten_thousand_clients_in_the_greet_wait() {
    integration_tests::smtp_peers::require("perl", "perl");
    let port = integration_tests::smtp_peers::free_port();
    let mut cfg = test_config(([127, 0, 0, 1], port).into());
    cfg.screen.greet_wait = Duration::from_secs(120);
    cfg.screen.stress_greet_wait = Duration::from_secs(120);
    cfg.screen.pre_queue_limit = 20_000;
    cfg.screen.client_connection_count_limit = 20_000;
    let scr = Screener::start(cfg, None);
    // Let the runtime and allocator settle before the baseline.
    let mut warm: Vec<Bot> = (0..100)
        .map(|_| Bot::connect([127, 0, 0, 1], scr.addr))
        .collect();
    integration_tests::netns::wait_for("warm-up", Duration::from_secs(10), || {
        scr.server.stats().screening == 100
    });
    warm.clear();
    integration_tests::netns::wait_for("warm-up over", Duration::from_secs(10), || {
        scr.server.stats().screening == 0
    });
    let before = rss_kib();
    let script = format!(
        "use IO::Socket::INET; my @s; for my $i (1..10000) {{ \
         push @s, IO::Socket::INET->new(PeerAddr => '{}', Proto => 'tcp') \
         or die \"connection $i: $!\"; }} <STDIN>;",
        scr.addr
    );
    let _clients = Child(
        std::process::Command::new("perl")
            .args(["-e", &script])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run perl"),
    );
    let end = std::time::Instant::now() + Duration::from_secs(60);
    let mut peak = 0;
    while std::time::Instant::now() < end && peak < 10_000 {
        peak = peak.max(scr.server.stats().screening);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        peak >= 10_000,
        "only {peak} clients at once: {:?}",
        scr.server.stats()
    );
    let per_conn = (rss_kib().saturating_sub(before)) * 1024 / 10_000;
    eprintln!("{per_conn} bytes per connection in the greet wait");
    assert!(per_conn < 16 * 1024, "{per_conn} bytes per connection");
}

/// A reload changes what new connections get; an open one keeps its rules.
#[test]
fn reload_applies_to_new_connections_only() {
    let pf = Postfix::start(Upstream::Haproxy, false);
    let scr = screener(&pf);
    let mut old = Bot::connect([127, 0, 5, 1], scr.addr);
    greeted(&mut old);
    let mut cfg = test_config(pf.addr);
    cfg.smtp.greet_banner = "reloaded $hostname".into();
    scr.server.reload(std::sync::Arc::new(cfg));
    let mut new = Bot::connect([127, 0, 5, 2], scr.addr);
    let got = new.read_until("220 screener.test ESMTP\r\n");
    assert!(got.starts_with("220-reloaded screener.test\r\n"), "{got:?}");
    old.send(b"NOOP\r\n");
    assert_eq!(old.read_until("\r\n"), "250 2.0.0 Ok\r\n");
}

/// 200 connections from one address, opened one after the other while the
/// earlier ones stay open, with a limit of 50: exactly the 51st and later
/// are refused, the first 50 are screened. The cache lookup (an await
/// before admission) must not reorder them.
#[test]
fn per_client_limit_in_arrival_order() {
    let port = integration_tests::smtp_peers::free_port();
    let mut cfg = test_config(([127, 0, 0, 1], port).into());
    cfg.screen.greet_wait = Duration::from_secs(120);
    cfg.screen.client_connection_count_limit = 50;
    let dir = tempfile::tempdir().unwrap();
    let store = screener::store::Store::open(&dir.path().join("cache.redb")).expect("store");
    let scr = Screener::start(cfg, Some(store));
    let mut bots: Vec<Bot> = (0..200)
        .map(|_| Bot::connect([127, 0, 6, 1], scr.addr))
        .collect();
    let firsts: Vec<String> = bots.iter_mut().map(|b| b.read_until("\r\n")).collect();
    let refused: Vec<usize> = firsts
        .iter()
        .enumerate()
        .filter(|(_, f)| f.as_str() == "421 4.7.0 Error: too many connections\r\n")
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(refused, (51..=200).collect::<Vec<_>>(), "{firsts:?}");
    for f in &firsts[..50] {
        assert_eq!(f, "220-screener.test ESMTP\r\n");
    }
    assert_eq!(scr.server.stats().screening, 50);
}

/// Stress mode shortens the greet wait of clients already waiting: with a
/// 120 s greet wait and `pre_queue_limit = 10`, the 9th client brings
/// stress mode, and every waiting client gets its `220 ` within the 2 s
/// stress greet wait instead of two minutes later.
#[test]
fn stress_reaches_running_sessions() {
    let port = integration_tests::smtp_peers::free_port();
    let mut cfg = test_config(([127, 0, 0, 1], port).into());
    cfg.screen.greet_wait = Duration::from_secs(120);
    cfg.screen.stress_greet_wait = Duration::from_secs(2);
    cfg.screen.pre_queue_limit = 10;
    let scr = Screener::start(cfg, None);
    let mut early: Vec<Bot> = (0..8)
        .map(|i| Bot::connect([127, 0, 7, 1 + i], scr.addr))
        .collect();
    for b in &mut early {
        assert_eq!(b.read_until("\r\n"), "220-screener.test ESMTP\r\n");
    }
    assert!(!scr.server.stats().stress);
    let mut ninth = Bot::connect([127, 0, 7, 9], scr.addr);
    integration_tests::netns::wait_for("stress mode", Duration::from_secs(10), || {
        scr.server.stats().stress
    });
    for b in early.iter_mut().chain(std::iter::once(&mut ninth)) {
        b.stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let got = b.read_until("220 screener.test ESMTP\r\n");
        assert!(
            got.ends_with("220 screener.test ESMTP\r\n"),
            "no greeting within 20 s of stress mode: {got:?}"
        );
    }
}
