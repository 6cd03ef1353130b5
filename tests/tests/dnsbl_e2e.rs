//! DNSBL scoring in whole SMTP sessions through the daemon, against a real
//! DNSBL server (rbldnsd) and a real backend (Postfix).

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::{cli, stats},
    netns::{screener_bin, spawn_logged, wait_for, ChildGuard},
    rbldnsd::Rbldnsd,
    smtp_peers::{free_port, Bot, Postfix, Upstream},
};

const SOA: &str = "$SOA 600 ns.example. hostmaster.example. 1 600 300 86400 120\n";

struct Setup {
    _dns: Rbldnsd,
    _backend: Postfix,
    _daemon: ChildGuard,
    cfg: std::path::PathBuf,
    smtp: SocketAddr,
    dir: tempfile::TempDir,
}

/// 127.0.0.2 (also the RFC 5782 test point) is on the blocklist, 127.0.0.3
/// on the allowlist, and the third list answers 127.0.0.4 with Spamhaus's
/// "query via public resolver" error code.
fn setup(action: &str) -> Setup {
    let dns = Rbldnsd::start(&[
        (
            "bl.example:ip4set",
            &format!("{SOA}$TTL 900\n:127.0.0.2:listed\n127.0.0.2\n"),
        ),
        (
            "wl.example:ip4set",
            &format!("{SOA}$TTL 900\n:127.0.10.2:trusted\n127.0.0.2\n127.0.0.3\n"),
        ),
        (
            "err.example:ip4set",
            &format!("{SOA}$TTL 300\n127.0.0.2 :127.0.0.2:\n127.0.0.4 :127.255.255.254:\n"),
        ),
    ]);
    let backend = Postfix::start(Upstream::Haproxy, false);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let smtp = SocketAddr::from(([127, 0, 0, 1], port));
    let cfg = dir.path().join("screener.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[smtp]
listen = ["{smtp}"]
hostname = "mx.example.com"
backend = "{backend}"

[screen]
greet_wait = "3s"
dnsbl_sites = ["bl.example*3", "wl.example=127.0.10.[0..255]*-2", "err.example"]
dnsbl_threshold = 1
dnsbl_allowlist_threshold = -1
dnsbl_action = "{action}"
dnsbl_timeout = "2s"

[dns]
nameservers = ["{dns}"]

[store]
path = "{dir}/screener.redb"

[admin]
socket = "{dir}/admin.sock"
"#,
            backend = backend.addr,
            dns = dns.addr,
            dir = dir.path().display(),
        ),
    )
    .unwrap();
    let daemon = spawn_logged(
        Command::new(screener_bin())
            .arg("-c")
            .arg(&cfg)
            .args(["run", "--no-xdp"]),
        &dir.path().join("daemon0.log"),
    );
    wait_for("the admin socket", Duration::from_secs(20), || {
        cli(&cfg, &["stats", "--json"]).0
    });
    Setup {
        _dns: dns,
        _backend: backend,
        _daemon: daemon,
        cfg,
        smtp,
        dir,
    }
}

#[test]
fn a_listed_client_gets_the_reject_naming_the_site() {
    let s = setup("drop");
    let mut bot = Bot::connect([127, 0, 0, 2], s.smtp);
    let all = bot.read_to_close();
    assert!(
        all.contains("521 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.example"),
        "{all:?}"
    );
    let log = std::fs::read_to_string(s.dir.path().join("daemon0.log")).unwrap();
    // bl.example 3, wl.example -2, err.example (its test point answer) 1.
    assert!(log.contains("DNSBL rank 2 for [127.0.0.2]"), "{log}");
    assert!(stats(&s.cfg)["smtp"]["fails"]["dnsbl"].as_u64().unwrap() >= 1);
}

#[test]
fn a_dnswl_client_skips_the_greet_wait() {
    let s = setup("drop");
    let begin = Instant::now();
    let mut bot = Bot::connect([127, 0, 0, 3], s.smtp);
    let greeting = bot.read_until("220 ");
    let waited = begin.elapsed();
    assert!(greeting.contains("220 "), "{greeting:?}");
    // The greet wait is 3 s; an allowlisted client is handed on as soon as
    // its score is in.
    assert!(
        waited < Duration::from_secs(3),
        "waited {waited:?}: {greeting:?}"
    );
    bot.send(b"QUIT\r\n");
}

#[test]
fn an_error_answering_list_rejects_nobody() {
    let s = setup("drop");
    let mut bot = Bot::connect([127, 0, 0, 4], s.smtp);
    let greeting = bot.read_until("220 ");
    assert!(
        greeting.contains("220 ") && !greeting.contains("521"),
        "{greeting:?}"
    );
    bot.send(b"QUIT\r\n");
    let st = stats(&s.cfg);
    assert!(
        st["dnsbl"]["sites"]["err.example"]["error_answers"]
            .as_u64()
            .unwrap()
            >= 1,
        "{st}"
    );
    assert_eq!(st["smtp"]["fails"]["dnsbl"].as_u64().unwrap(), 0, "{st}");
}
