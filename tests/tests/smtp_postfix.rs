//! The screener in front of a real Postfix smtpd: well-behaved clients are
//! delivered, with the real client address, in one connection.

use integration_tests::smtp_peers::{swaks, test_config, Postfix, Screener, Upstream};
use screener::screen::TestId;

fn delivered(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "swaks failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A first-time client passes pregreet and every deep test and reaches
/// Postfix in the same connection; Postfix logs its real address (it comes
/// from 127.0.0.2, the screener from 127.0.0.1) and accepts the message.
#[test]
fn first_time_client_is_replayed_to_postfix() {
    let pf = Postfix::start(Upstream::Haproxy, false);
    let scr = Screener::start(test_config(pf.addr), None);
    scr.wait_keywords();
    let out = swaks(&[
        "--server",
        &scr.addr.ip().to_string(),
        "--port",
        &scr.addr.port().to_string(),
        "--local-interface",
        "127.0.0.2",
        "--from",
        "sender@example.org",
        "--to",
        "rcpt@backend.test",
        "--helo",
        "client.example",
        "--timeout",
        "30",
    ]);
    let text = delivered(&out);
    assert!(
        text.contains("220-screener.test ESMTP"),
        "teaser first:\n{text}"
    );
    assert!(text.contains("250 2.0.0 Ok: queued as"), "{text}");
    pf.wait_log(&["connect from", "[127.0.0.2]"]);
    pf.wait_log(&["status=sent", "rcpt@backend.test"]);
    // The keyword probe connects as the screener itself; the message must
    // carry the client's address.
    pf.wait_log(&[": client=", "[127.0.0.2]"]);
    let log = pf.log();
    assert!(
        !log.lines()
            .any(|l| l.contains(": client=") && l.contains("[127.0.0.1]")),
        "a message came in under the screener's address:\n{log}"
    );
    let stats = scr.server.stats();
    assert_eq!(stats.pass_new, 1, "{stats:?}");
    assert!(scr.failures().is_empty());
}

/// Without deep tests the backend's own 220 completes the greeting; v1
/// header this time.
#[test]
fn greeting_handoff_with_proxy_v1() {
    let pf = Postfix::start(Upstream::Haproxy, false);
    let mut cfg = test_config(pf.addr);
    cfg.screen.pipelining_enable = false;
    cfg.screen.non_smtp_command_enable = false;
    cfg.screen.bare_newline_enable = false;
    cfg.smtp.backend_proxy_protocol = screener::config::ProxyVersion::V1;
    let scr = Screener::start(cfg, None);
    let out = swaks(&[
        "--server",
        "127.0.0.1",
        "--port",
        &scr.addr.port().to_string(),
        "--local-interface",
        "127.0.0.3",
        "--from",
        "sender@example.org",
        "--to",
        "rcpt@backend.test",
        "--timeout",
        "30",
    ]);
    let text = delivered(&out);
    assert!(text.contains("220-screener.test ESMTP"), "{text}");
    assert!(
        text.contains("220 backend.test ESMTP"),
        "the backend's 220 completes it:\n{text}"
    );
    pf.wait_log(&["connect from", "[127.0.0.3]"]);
    pf.wait_log(&["status=sent"]);
}

/// STARTTLS goes through to Postfix: TLS runs end to end, the screener
/// holds no certificate.
#[test]
fn starttls_runs_end_to_end() {
    let pf = Postfix::start(Upstream::Haproxy, true);
    let scr = Screener::start(test_config(pf.addr), None);
    let kw = scr.wait_keywords();
    assert!(kw.iter().any(|k| k == "STARTTLS"), "{kw:?}");
    assert!(!kw.iter().any(|k| k == "PIPELINING"), "{kw:?}");
    let out = swaks(&[
        "--server",
        "127.0.0.1",
        "--port",
        &scr.addr.port().to_string(),
        "--local-interface",
        "127.0.0.4",
        "--tls",
        "--from",
        "sender@example.org",
        "--to",
        "rcpt@backend.test",
        "--timeout",
        "30",
    ]);
    let text = delivered(&out);
    assert!(text.contains("TLS started"), "{text}");
    pf.wait_log(&["Anonymous TLS connection established from", "[127.0.0.4]"]);
    pf.wait_log(&["status=sent"]);
}

/// Backend down: a temporary failure, never a 5xx.
#[test]
fn backend_down_is_a_tempfail() {
    let port = integration_tests::smtp_peers::free_port();
    let mut cfg = test_config(([127, 0, 0, 1], port).into());
    cfg.screen.pipelining_enable = false;
    cfg.screen.non_smtp_command_enable = false;
    cfg.screen.bare_newline_enable = false;
    let scr = Screener::start(cfg, None);
    let mut bot = integration_tests::smtp_peers::Bot::connect([127, 0, 0, 5], scr.addr);
    let got = bot.read_to_close();
    assert!(got.starts_with("220-screener.test ESMTP\r\n"), "{got}");
    assert!(
        got.ends_with("421 4.3.2 Service currently unavailable\r\n"),
        "{got}"
    );
}

/// The cache: a first connection passes the tests (PASS NEW, stored in
/// redb), the second goes straight to Postfix (PASS OLD) without the
/// teaser. Postfix's smtp-source is the client.
#[test]
fn returning_client_is_pass_old() {
    let source = integration_tests::smtp_peers::require("smtp-source", "postfix");
    let pf = Postfix::start(Upstream::Haproxy, false);
    let dir = tempfile::tempdir().unwrap();
    let store = screener::store::Store::open(&dir.path().join("cache.redb")).expect("store");
    let scr = Screener::start(test_config(pf.addr), Some(store.clone()));
    scr.wait_keywords();
    let target = format!("127.0.0.1:{}", scr.addr.port());
    let run = || {
        let out = std::process::Command::new(&source)
            .args(["-c", "-s", "1", "-m", "1", "-f", "sender@example.org"])
            .args(["-t", "rcpt@backend.test", &target])
            .output()
            .expect("run smtp-source");
        assert!(
            out.status.success(),
            "smtp-source: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run();
    integration_tests::netns::wait_for(
        "the pass in the cache",
        std::time::Duration::from_secs(10),
        || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(store.client("127.0.0.1".parse().unwrap()))
                .ok()
                .flatten()
                .is_some_and(|r| r.expires.iter().filter(|&&e| e > 0).count() == 4)
        },
    );
    assert_eq!(scr.server.stats().pass_new, 1);
    run();
    assert_eq!(scr.server.stats().pass_old, 1, "{:?}", scr.server.stats());
    integration_tests::netns::wait_for(
        "two deliveries",
        std::time::Duration::from_secs(20),
        || {
            pf.log()
                .lines()
                .filter(|l| l.contains("status=sent"))
                .count()
                == 2
        },
    );
}

/// Behind a load balancer: the screener reads the balancer's PROXY header
/// and passes the real client on to Postfix.
#[test]
fn upstream_proxy_header_reaches_postfix() {
    use std::io::Write as _;
    let pf = Postfix::start(Upstream::Haproxy, false);
    let mut cfg = test_config(pf.addr);
    cfg.smtp.upstream_proxy_protocol = screener::config::Upstream::Haproxy;
    cfg.smtp.upstream_proxy_trusted = vec!["127.0.0.1/32".parse().unwrap()];
    cfg.screen.pipelining_enable = false;
    cfg.screen.non_smtp_command_enable = false;
    cfg.screen.bare_newline_enable = false;
    let scr = Screener::start(cfg, None);
    let mut bot = integration_tests::smtp_peers::Bot::connect([127, 0, 0, 1], scr.addr);
    let real: std::net::SocketAddr = "203.0.113.77:4242".parse().unwrap();
    let header = screener::proxy::encode(screener::proxy::Version::V2, real, scr.addr);
    bot.stream.write_all(&header).unwrap();
    let got = bot.read_until("220 backend.test");
    assert!(got.starts_with("220-screener.test ESMTP\r\n"), "{got:?}");
    bot.send(b"QUIT\r\n");
    bot.read_to_close();
    pf.wait_log(&["connect from", "[203.0.113.77]"]);

    // A connection without the header is dropped, never screened.
    let mut bare = integration_tests::smtp_peers::Bot::connect([127, 0, 0, 1], scr.addr);
    bare.send(b"EHLO x\r\n");
    assert_eq!(bare.read_to_close(), "");
}

/// A client that hands off at STARTTLS is remembered: the plaintext
/// dialogue up to STARTTLS is what the deep tests can judge. The second
/// connection is PASS OLD: no teaser, no greet wait, straight to Postfix.
#[test]
fn starttls_sender_is_remembered_swaks() {
    let pf = Postfix::start(Upstream::Haproxy, true);
    let dir = tempfile::tempdir().unwrap();
    let store = screener::store::Store::open(&dir.path().join("cache.redb")).expect("store");
    let scr = Screener::start(test_config(pf.addr), Some(store.clone()));
    let kw = scr.wait_keywords();
    assert!(kw.iter().any(|k| k == "STARTTLS"), "{kw:?}");
    let send = || {
        delivered(&swaks(&[
            "--server",
            "127.0.0.1",
            "--port",
            &scr.addr.port().to_string(),
            "--local-interface",
            "127.0.0.8",
            "--tls",
            "--from",
            "sender@example.org",
            "--to",
            "rcpt@backend.test",
            "--timeout",
            "30",
        ]))
    };
    let first = send();
    assert!(first.contains("220-screener.test ESMTP"), "{first}");
    assert!(first.contains("TLS started"), "{first}");
    assert_eq!(scr.server.stats().pass_new, 1, "{:?}", scr.server.stats());
    wait_cached(&store, "127.0.0.8", 4);
    let second = send();
    assert!(
        !second.contains("220-screener.test"),
        "a remembered sender gets no teaser:\n{second}"
    );
    assert!(second.contains("220 backend.test ESMTP"), "{second}");
    assert!(second.contains("TLS started"), "{second}");
    assert_eq!(scr.server.stats().pass_old, 1, "{:?}", scr.server.stats());
    wait_sent(&pf, 2);
}

/// A real Postfix sending with `smtp_tls_security_level = may` through the
/// screener to a Postfix backend with TLS: both messages are delivered over
/// TLS, the second connection goes straight through (PASS OLD).
#[test]
fn starttls_postfix_sender_is_remembered() {
    let backend = Postfix::start(Upstream::Haproxy, true);
    let dir = tempfile::tempdir().unwrap();
    let store = screener::store::Store::open(&dir.path().join("cache.redb")).expect("store");
    let scr = Screener::start(test_config(backend.addr), Some(store.clone()));
    scr.wait_keywords();
    let sender = Postfix::start_sender(scr.addr, std::net::Ipv4Addr::new(127, 0, 0, 9));
    sender.sendmail("sender@example.org", "rcpt@backend.test", "first");
    wait_sent(&backend, 1);
    sender.wait_log(&["TLS connection established to", "127.0.0.1"]);
    assert_eq!(scr.server.stats().pass_new, 1, "{:?}", scr.server.stats());
    wait_cached(&store, "127.0.0.9", 4);
    sender.sendmail("sender@example.org", "rcpt@backend.test", "second");
    wait_sent(&backend, 2);
    let stats = scr.server.stats();
    assert_eq!((stats.pass_new, stats.pass_old), (1, 1), "{stats:?}");
    backend.wait_log(&["TLS connection established from", "[127.0.0.9]"]);
    // The sender logs status=sent after the backend took the message:
    // wait for the second line rather than race it.
    let both_sent = integration_tests::sys::poll_until(std::time::Duration::from_secs(20), || {
        sender
            .log()
            .lines()
            .filter(|l| l.contains("status=sent"))
            .count()
            == 2
    });
    assert!(both_sent, "{}", sender.log());
}

/// Waits until the cache holds `n` unexpired passes for `ip`.
#[track_caller]
fn wait_cached(store: &screener::store::Store, ip: &str, n: usize) {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    integration_tests::netns::wait_for(
        "the passes in the cache",
        std::time::Duration::from_secs(10),
        || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(store.client(ip))
                .ok()
                .flatten()
                .is_some_and(|r| r.expires.iter().filter(|&&e| e > 0).count() == n)
        },
    );
}

/// Waits until Postfix has delivered `n` messages.
#[track_caller]
fn wait_sent(pf: &Postfix, n: usize) {
    integration_tests::netns::wait_for(
        &format!("{n} deliveries"),
        std::time::Duration::from_secs(30),
        || {
            pf.log()
                .lines()
                .filter(|l| l.contains("status=sent"))
                .count()
                == n
        },
    );
}

/// Under `greet_action = "ignore"` with no deep test pending, a client that
/// talks before its greeting still delivers: what it said early reaches
/// Postfix after Postfix's own greeting, in order.
#[test]
fn early_talker_delivers_under_ignore() {
    use integration_tests::smtp_peers::Bot;
    let pf = Postfix::start(Upstream::Haproxy, false);
    let mut cfg = test_config(pf.addr);
    cfg.screen.greet_action = screener::config::Action::Ignore;
    cfg.screen.pipelining_enable = false;
    cfg.screen.non_smtp_command_enable = false;
    cfg.screen.bare_newline_enable = false;
    let scr = Screener::start(cfg, None);
    let mut bot = Bot::connect([127, 0, 0, 10], scr.addr);
    bot.send(b"EHLO early.example\r\n");
    let got = bot.read_reply("250");
    assert!(
        got.starts_with("220-screener.test ESMTP\r\n220 backend.test ESMTP"),
        "{got:?}"
    );
    assert!(
        got.contains("\r\n250-backend.test\r\n"),
        "Postfix answered the early EHLO: {got:?}"
    );
    for (line, want) in [
        (&b"MAIL FROM:<sender@example.org>\r\n"[..], "250 "),
        (b"RCPT TO:<rcpt@backend.test>\r\n", "250 "),
        (b"DATA\r\n", "354 "),
        (
            b"Subject: early\r\n\r\nHello.\r\n.\r\n",
            "250 2.0.0 Ok: queued as",
        ),
    ] {
        bot.send(line);
        let reply = bot.read_until("\r\n");
        assert!(reply.starts_with(want), "{line:?}: {reply:?}");
    }
    bot.send(b"QUIT\r\n");
    bot.read_to_close();
    pf.wait_log(&[": client=", "[127.0.0.10]"]);
    wait_sent(&pf, 1);
    assert_eq!(
        scr.failures().len(),
        0,
        "ignore reports nothing for blocking"
    );
    assert_eq!(scr.server.stats().fails.tests[TestId::Pregreet], 1);
}
