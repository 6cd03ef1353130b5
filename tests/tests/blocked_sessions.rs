//! A source blocked while it has a connection open: the gate drops only
//! what opens a connection, so the open one runs to its end. A bot's
//! hang-up frees its screening slot at once, the reply its action promises
//! reaches it, a client already handed to the MTA finishes its mail; the
//! next SYN is dropped at the NIC. The default greet action (`enforce`)
//! throughout, a real Postfix as the backend.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use integration_tests::{
    daemon::{blocked, ok, set, start, stats, write_config, Daemon},
    netns::{wait_for, NetNs, PinDir},
    smtp_peers::{require, Bot, Postfix, Upstream},
};

/// A dropped SYN is retried by the kernel after a second, so an attempt
/// that has not connected within one was dropped.
const DROPPED: Duration = Duration::from_secs(1);

/// A daemon screening on `ns`'s host side with the defaults but a 2 s greet
/// wait, XDP on that port, Postfix behind it. Returns the pins first so
/// they outlive the daemon.
fn screener(
    ns: &NetNs,
    tag: &str,
    pf: &Postfix,
    extra: &[(&str, &str)],
) -> (PinDir, Daemon, SocketAddr) {
    let pins = PinDir::new(&format!("{tag}{}", ns.n));
    let port = 2900 + u16::try_from(ns.n).unwrap();
    let to = SocketAddr::new(ns.host_v4(), port);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), ns, &pins, "skb", port);
    set(&cfg, "smtp", &format!("listen = [\"{to}\"]"));
    set(&cfg, "smtp", &format!("backend = \"{}\"", pf.addr));
    set(&cfg, "screen", "greet_wait = \"2s\"");
    for (section, line) in extra {
        set(&cfg, section, line);
    }
    let child = start(&cfg, dir.path(), 0);
    (pins, Daemon { child, cfg, dir }, to)
}

/// A raw SMTP client from `from`, inside the namespace.
#[track_caller]
fn client(ns: &NetNs, from: IpAddr, to: SocketAddr) -> Bot {
    Bot {
        stream: ns
            .tcp_from(from, to, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{from} could not connect to {to}")),
    }
}

/// swaks from `from` inside the namespace, a whole mail to Postfix's
/// domain.
fn swaks_from(ns: &NetNs, from: IpAddr, to: SocketAddr) -> Output {
    let mut cmd = Command::new(require("swaks", "swaks"));
    cmd.args(["--server", &to.ip().to_string()])
        .args(["--port", &to.port().to_string()])
        .args(["--local-interface", &from.to_string()])
        .args(["--from", "sender@example.org", "--to", "rcpt@backend.test"])
        .args(["--helo", "client.example", "--timeout", "30"]);
    integration_tests::sys::in_netns(&mut cmd, &ns.name).unwrap();
    cmd.output().expect("run swaks")
}

fn screening(cfg: &Path) -> u64 {
    stats(cfg)["smtp"]["screening"].as_u64().unwrap()
}

fn dropped_pregreet(cfg: &Path) -> u64 {
    stats(cfg)["kernel"]["dropped_by_reason"]["pregreet"]
        .as_u64()
        .unwrap()
}

/// Sends the bot's early talk and waits until its block is in the kernel.
#[track_caller]
fn pregreet_until_blocked(d: &Daemon, bot: &mut Bot, ip: IpAddr) {
    let teaser = bot.read_until("\r\n");
    assert!(teaser.starts_with("220-"), "{ip}: no teaser: {teaser:?}");
    bot.send(b"EHLO bot.example\r\n");
    wait_for(
        &format!("{ip} in the block list"),
        Duration::from_secs(10),
        || blocked(&d.cfg).contains(&format!("{ip}/32")),
    );
}

/// With `pre_queue_limit = 10`, twelve bots pregreet, get blocked, and
/// hang up: each hang-up reaches the screener and frees the slot at once,
/// so none is refused as busy, nothing is left screening a second after
/// the last one, and a well-behaved client is screened and delivered.
#[test]
fn hang_ups_of_blocked_bots_free_their_slots() {
    let ns = NetNs::new();
    let pf = Postfix::start(Upstream::Haproxy, false);
    let (_pins, d, to) = screener(
        &ns,
        "slots",
        &pf,
        &[
            ("screen", "pre_queue_limit = 10"),
            // Twelve bots of one /24 would escalate to the /24 and take the
            // good client with them; escalation is not what this tests.
            ("verdict", "escalate_v4_hosts = 64"),
        ],
    );
    for i in 4..=14 {
        ns.add_addr(&format!("{}/28", ns.v4(i)));
    }
    let bots: Vec<IpAddr> = (2..=13).map(|i| ns.v4(i)).collect();
    for &ip in &bots {
        let mut bot = client(&ns, ip, to);
        pregreet_until_blocked(&d, &mut bot, ip);
        drop(bot);
    }
    wait_for(
        "no session left screening after the hang-ups",
        Duration::from_secs(1),
        || screening(&d.cfg) == 0,
    );
    let list = blocked(&d.cfg);
    for ip in &bots {
        assert!(
            list.contains(&format!("{ip}/32")),
            "{ip} not blocked: {list:?}"
        );
    }
    let log = d.log(0);
    assert_eq!(log.matches("HANGUP").count(), bots.len(), "{log}");
    assert!(!log.contains("All screening ports are busy"), "{log}");

    let out = swaks_from(&ns, ns.v4(14), to);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("250 2.0.0 Ok: queued"),
        "the good client was not delivered:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pf.wait_log(&["status=sent", "rcpt@backend.test"]);
    assert!(
        d.log(0).contains(&format!("PASS NEW [{}]", ns.v4(14))),
        "{}",
        d.log(0)
    );
}

/// A bot that pregreets under `enforce` and goes on with its dialogue is
/// blocked at once, yet its commands still reach the screener: it gets the
/// promised `550 5.5.1` at RCPT on the wire and the log has `NOQUEUE`. Its
/// next SYN is dropped at the NIC.
#[test]
fn enforced_bot_gets_its_550_and_then_meets_the_gate() {
    let ns = NetNs::new();
    let pf = Postfix::start(Upstream::Haproxy, false);
    let (_pins, d, to) = screener(&ns, "enforce", &pf, &[]);
    let ip = ns.client_v4();
    let mut bot = client(&ns, ip, to);
    pregreet_until_blocked(&d, &mut bot, ip);

    // The early bytes may or may not be answered as commands; the bot says
    // everything again once the greeting is complete.
    let greeting = bot.read_until("220 ");
    assert!(greeting.contains("220 "), "no greeting: {greeting:?}");
    bot.send(b"EHLO bot.example\r\n");
    let ehlo = bot.read_until("250 ");
    assert!(ehlo.contains("250 "), "EHLO not answered: {ehlo:?}");
    bot.send(b"MAIL FROM:<bot@example.org>\r\n");
    let mail = bot.read_until("250 2.1.0");
    assert!(mail.contains("250 2.1.0"), "MAIL not answered: {mail:?}");
    bot.send(b"RCPT TO:<victim@backend.test>\r\n");
    let rcpt = bot.read_until("550 ");
    assert!(
        rcpt.contains("550 5.5.1 Protocol error"),
        "no 550 at RCPT: {rcpt:?}"
    );
    bot.send(b"QUIT\r\n");
    let bye = bot.read_until("221 ");
    assert!(bye.contains("221 "), "QUIT not answered: {bye:?}");
    drop(bot);
    wait_for("NOQUEUE in the log", Duration::from_secs(10), || {
        d.log(0)
            .contains(&format!("NOQUEUE: reject: RCPT from [{ip}]"))
    });

    let before = dropped_pregreet(&d.cfg);
    assert!(
        !ns.connects(ip, to, DROPPED),
        "the blocked bot connected again"
    );
    assert!(
        dropped_pregreet(&d.cfg) > before,
        "XDP did not count the drop"
    );
    assert_eq!(
        d.log(0).matches(&format!("CONNECT from [{ip}]")).count(),
        1,
        "the daemon saw the blocked SYN"
    );
    assert!(
        !pf.log().contains("victim@backend.test"),
        "the bot's mail reached the backend"
    );
}

/// A client already handed off to Postfix falls inside a prefix an
/// operator blocks in the middle of its transaction: it still finishes
/// (its DATA is answered `250`), and its next connection is dropped.
#[test]
fn handed_off_client_finishes_its_mail_when_its_prefix_is_blocked() {
    let ns = NetNs::new();
    let pf = Postfix::start(Upstream::Haproxy, false);
    let (_pins, d, to) = screener(&ns, "handed", &pf, &[]);
    let ip = ns.client_v4();
    let mut c = client(&ns, ip, to);
    let greeting = c.read_until("220 ");
    assert!(
        greeting.starts_with("220-") && greeting.contains("220 backend.test"),
        "not handed to Postfix: {greeting:?}"
    );
    c.send(b"EHLO client.example\r\n");
    let ehlo = c.read_until("250 ");
    assert!(ehlo.contains("250 "), "{ehlo:?}");
    c.send(b"MAIL FROM:<sender@example.org>\r\n");
    assert!(c.read_until("250 2.1.0").contains("250 2.1.0"));
    c.send(b"RCPT TO:<rcpt@backend.test>\r\n");
    assert!(c.read_until("250 2.1.5").contains("250 2.1.5"));

    ok(&d.cfg, &["block", "add", "192.0.2.0/24"]);
    assert!(
        !ns.connects(ns.neighbour_v4(), to, DROPPED),
        "the block is not in force"
    );
    c.send(b"DATA\r\n");
    let data = c.read_until("354 ");
    assert!(data.contains("354 "), "DATA not answered: {data:?}");
    c.send(b"Subject: blocked half-way\r\n\r\nStill delivered.\r\n.\r\n");
    let queued = c.read_until("250 2.0.0 Ok: queued");
    assert!(
        queued.contains("250 2.0.0 Ok: queued"),
        "the message was not accepted: {queued:?}"
    );
    c.send(b"QUIT\r\n");
    assert!(c.read_until("221 ").contains("221 "));
    drop(c);
    pf.wait_log(&["status=sent", "rcpt@backend.test"]);

    assert!(
        !ns.connects(ip, to, DROPPED),
        "the blocked client connected again"
    );
    let st = stats(&d.cfg);
    assert!(
        st["kernel"]["dropped_by_reason"]["manual"]
            .as_u64()
            .unwrap()
            >= 2,
        "{st}"
    );
}
