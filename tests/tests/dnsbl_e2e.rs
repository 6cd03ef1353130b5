//! DNSBL scoring in whole SMTP sessions through the daemon, against a real
//! DNSBL server (rbldnsd) and a real backend (Postfix).

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
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
    /// The same port on `[::1]`.
    smtp6: SocketAddr,
    dir: tempfile::TempDir,
}

impl Setup {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon0.log")).unwrap_or_default()
    }

    /// Waits until every list has had its first health check.
    #[track_caller]
    fn health_checked(&self, sites: &[&str]) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        wait_for("the first health checks", Duration::from_secs(20), || {
            last = stats(&self.cfg);
            sites
                .iter()
                .all(|s| last["dnsbl"]["sites"][s]["health_checks"].as_u64() >= Some(1))
        });
        last
    }
}

/// 127.0.0.2 (also the RFC 5782 test point) is on the blocklist, 127.0.0.3
/// on the allowlist, and the third list answers 127.0.0.4 with Spamhaus's
/// "query via public resolver" error code.
fn setup(action: &str) -> Setup {
    setup_with(
        &[
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
        ],
        &[
            "bl.example*3",
            "wl.example=127.0.10.[0..255]*-2",
            "err.example",
        ],
        action,
    )
}

/// rbldnsd serving `zones`, a Postfix backend, and the daemon scoring
/// `sites` with `dnsbl_action = action`, listening on 127.0.0.1 and `::1`.
/// The clients are loopback addresses, so `permit_local` is off.
fn setup_with(zones: &[(&str, &str)], sites: &[&str], action: &str) -> Setup {
    let dns = Rbldnsd::start(zones);
    let backend = Postfix::start(Upstream::Haproxy, false);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let smtp = SocketAddr::from(([127, 0, 0, 1], port));
    let smtp6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    let cfg = dir.path().join("screener.toml");
    let sites: Vec<String> = sites.iter().map(|s| format!("{s:?}")).collect();
    std::fs::write(
        &cfg,
        format!(
            r#"
[smtp]
listen = ["{smtp}", "{smtp6}"]
hostname = "mx.example.com"
backend = "{backend}"

[screen]
permit_local = false
greet_wait = "3s"
dnsbl_sites = [{sites}]
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

[daemon]
user = "root"
"#,
            backend = backend.addr,
            dns = dns.addr,
            dir = dir.path().display(),
            sites = sites.join(", "),
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
        smtp6,
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
    let log = s.log();
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

/// Reads from `stream` until it closes or 30 s pass.
fn read_all(mut stream: TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut all = Vec::new();
    let _ = stream.read_to_end(&mut all);
    String::from_utf8_lossy(&all).into_owned()
}

#[test]
fn an_ipv6_only_list_stays_on_and_lists_an_ipv6_client() {
    // An rbldnsd ip6trie zone answers only IPv6 (nibble) queries: it holds
    // the IPv6 positive test point and the client ::1, nothing for IPv4.
    let s = setup_with(
        &[(
            "v6.example:ip6trie",
            &format!("{SOA}$TTL 900\n:127.0.0.2:listed\n::ffff:7f00:2\n::1\n"),
        )],
        &["v6.example*2"],
        "drop",
    );
    let st = s.health_checked(&["v6.example"]);
    let site = &st["dnsbl"]["sites"]["v6.example"];
    assert_eq!(site["disabled"], false, "{st}");
    assert_eq!(site["health_warnings"], 0, "{st}");

    let all = read_all(TcpStream::connect(s.smtp6).unwrap());
    assert!(
        all.contains("521 5.7.1 Service unavailable; client [::1] blocked using v6.example"),
        "{all:?}"
    );
    assert!(s.log().contains("DNSBL rank 2 for [::1]"), "{}", s.log());
}

#[test]
fn a_private_list_without_the_test_point_stays_on_with_a_warning() {
    // A private list: its one entry, no RFC 5782 test points.
    let s = setup_with(
        &[(
            "private.example:ip4set",
            &format!("{SOA}$TTL 900\n:127.0.0.2:listed\n127.0.0.5\n"),
        )],
        &["private.example*2"],
        "drop",
    );
    let st = s.health_checked(&["private.example"]);
    let site = &st["dnsbl"]["sites"]["private.example"];
    assert_eq!(site["disabled"], false, "{st}");
    assert!(site["health_warnings"].as_u64() >= Some(1), "{st}");
    let log = s.log();
    assert!(
        log.contains("WARN") && log.contains("test point 127.0.0.2 is not listed"),
        "{log}"
    );

    let mut bot = Bot::connect([127, 0, 0, 5], s.smtp);
    let all = bot.read_to_close();
    assert!(
        all.contains(
            "521 5.7.1 Service unavailable; client [127.0.0.5] blocked using private.example"
        ),
        "{all:?}"
    );
}

#[test]
fn a_list_that_lists_127_0_0_1_is_switched_off() {
    // Lists the must-not test point: it would reject everyone.
    let s = setup_with(
        &[(
            "rogue.example:ip4set",
            &format!("{SOA}$TTL 900\n:127.0.0.2:listed\n127.0.0.1\n127.0.0.2\n127.0.0.6\n"),
        )],
        &["rogue.example*2"],
        "drop",
    );
    wait_for("the switch-off", Duration::from_secs(20), || {
        stats(&s.cfg)["dnsbl"]["disabled_sites"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "rogue.example"))
    });
    let log = s.log();
    assert!(
        log.contains("ERROR")
            && log.contains("DNSBL site rogue.example disabled for IPv4 clients: test point 127.0.0.1 is listed"),
        "{log}"
    );
    // A client the list names gets through to the backend.
    let mut bot = Bot::connect([127, 0, 0, 6], s.smtp);
    let greeting = bot.read_until("220 ");
    assert!(
        greeting.contains("220 ") && !greeting.contains("521"),
        "{greeting:?}"
    );
    bot.send(b"QUIT\r\n");
    assert_eq!(stats(&s.cfg)["smtp"]["fails"]["dnsbl"], 0);
}
