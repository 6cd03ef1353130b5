//! Screening verdicts reach the NIC: a bot that fails a test on a real veth
//! is blocked, and its next SYN is dropped by XDP before the daemon sees it.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use integration_tests::{
    daemon::{blocked, ok, set, start, stats, write_config, Daemon},
    netns::{wait_for, NetNs, PinDir},
};

const DROPPED: Duration = Duration::from_secs(1);

/// A daemon whose SMTP listener is on `ns`'s host side, with a 1 s greet
/// wait and pregreeting clients rejected at once. The pins come first so a
/// caller's binding drops them after the daemon (which would pin again
/// what it finds removed).
fn screening_daemon(ns: &NetNs, tag: &str, extra: &[(&str, &str)]) -> (PinDir, Daemon, u16) {
    let pins = PinDir::new(&format!("{tag}{}", ns.n));
    let port = 2600 + u16::try_from(ns.n).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), ns, &pins, "skb", port);
    set(
        &cfg,
        "smtp",
        &format!(
            "listen = [\"{}\", \"[{}]:{port}\"]",
            SocketAddr::new(ns.host_v4(), port),
            ns.host_v6()
        ),
    );
    set(&cfg, "smtp", "backend = \"127.0.0.1:9\"");
    set(&cfg, "screen", "greet_wait = \"1s\"");
    set(&cfg, "screen", "greet_action = \"drop\"");
    for (section, line) in extra {
        set(&cfg, section, line);
    }
    let child = start(&cfg, dir.path(), 0);
    let d = Daemon { child, cfg, dir };
    // The admin socket answers before the SMTP listener is bound.
    wait_for("the SMTP listener", Duration::from_secs(10), || {
        d.log(0).contains("smtp listening on")
    });
    (pins, d, port)
}

/// Connects from `from`, talks before the greeting ends, returns the reply.
fn pregreet(ns: &NetNs, from: IpAddr, to: SocketAddr) -> String {
    let mut s = ns
        .tcp_from(from, to, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{from} could not connect to {to}"));
    s.write_all(b"EHLO bot.example\r\n").unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply
}

fn connects_logged(d: &Daemon, ip: IpAddr) -> usize {
    d.log(0).matches(&format!("CONNECT from [{ip}]")).count()
}

#[test]
fn a_pregreeting_bot_is_dropped_at_the_nic_on_its_next_syn() {
    let ns = NetNs::new();
    let (_pins, d, port) = screening_daemon(&ns, "bot", &[]);
    let to = SocketAddr::new(ns.host_v4(), port);
    let bot = ns.client_v4();

    let reply = pregreet(&ns, bot, to);
    assert!(reply.starts_with("220-"), "no teaser: {reply:?}");
    assert!(reply.contains("521"), "pregreet not rejected: {reply:?}");
    wait_for("BLOCK in the log", Duration::from_secs(10), || {
        d.log(0)
            .contains(&format!("BLOCK {bot}/32 reason=pregreet"))
    });
    assert!(d.log(0).contains("PREGREET"), "{}", d.log(0));
    assert_eq!(blocked(&d.cfg), vec![format!("{bot}/32")]);
    assert_eq!(connects_logged(&d, bot), 1);

    let dropped_before = stats(&d.cfg)["kernel"]["dropped_by_reason"]["pregreet"]
        .as_u64()
        .unwrap();
    assert!(
        !ns.connects(bot, to, DROPPED),
        "the blocked bot got through"
    );
    let dropped_after = stats(&d.cfg)["kernel"]["dropped_by_reason"]["pregreet"]
        .as_u64()
        .unwrap();
    assert!(dropped_after > dropped_before, "XDP did not count the drop");
    assert_eq!(
        connects_logged(&d, bot),
        1,
        "the daemon saw the blocked SYN"
    );

    // Its neighbour still reaches the screener.
    let mut s = ns
        .tcp_from(ns.neighbour_v4(), to, Duration::from_secs(5))
        .expect("neighbour connects");
    let mut teaser = [0u8; 4];
    s.read_exact(&mut teaser).unwrap();
    assert_eq!(&teaser, b"220-");
    let st = stats(&d.cfg);
    assert!(st["daemon"]["blocks"].as_u64().unwrap() >= 1, "{st}");
    assert!(
        st["smtp"]["fails"]["pregreet"].as_u64().unwrap() >= 1,
        "{st}"
    );
}

#[test]
fn two_ipv6_bots_in_one_slash_64_make_one_entry() {
    let ns = NetNs::new();
    let (_pins, d, port) = screening_daemon(&ns, "six", &[]);
    let to = SocketAddr::new(ns.host_v6(), port);
    let second: IpAddr = format!("2001:db8:{}::3", ns.n).parse().unwrap();
    ns.add_addr(&format!("{second}/64"));

    assert!(pregreet(&ns, ns.client_v6(), to).contains("521"));
    let prefix = format!("2001:db8:{}::/64", ns.n);
    wait_for("the /64 block", Duration::from_secs(10), || {
        blocked(&d.cfg).contains(&prefix)
    });
    // The second host of that /64 is already covered at the NIC.
    assert!(
        !ns.connects(second, to, DROPPED),
        "the /64 block let its second host through"
    );
    let list = blocked(&d.cfg);
    assert_eq!(list, vec![prefix], "one entry for the /64");
}

#[test]
fn enough_bots_in_a_slash_24_block_the_slash_24() {
    let ns = NetNs::new();
    let (_pins, d, port) = screening_daemon(&ns, "esc", &[("verdict", "escalate_v4_hosts = 3")]);
    let to = SocketAddr::new(ns.host_v4(), port);
    for i in [4, 5, 6] {
        ns.add_addr(&format!("{}/28", ns.v4(i)));
    }
    for i in [2, 3, 4] {
        assert!(pregreet(&ns, ns.v4(i), to).contains("521"));
    }
    wait_for("the /24 escalation", Duration::from_secs(10), || {
        blocked(&d.cfg).contains(&"192.0.2.0/24".to_owned())
    });
    assert!(d.log(0).contains("BLOCK 192.0.2.0/24 reason=escalation"));
    // A host of that /24 that never misbehaved is now dropped too.
    assert!(
        !ns.connects(ns.v4(6), to, DROPPED),
        "the /24 block did not drop"
    );
}

#[test]
fn a_full_host_map_still_escalates_into_the_prefix_map() {
    let ns = NetNs::new();
    let (_pins, d, port) = screening_daemon(
        &ns,
        "full",
        &[
            ("xdp", "max_hosts = 2"),
            ("verdict", "escalate_v4_hosts = 3"),
        ],
    );
    let to = SocketAddr::new(ns.host_v4(), port);
    for i in [4, 5] {
        ns.add_addr(&format!("{}/28", ns.v4(i)));
    }
    for i in [2, 3] {
        assert!(pregreet(&ns, ns.v4(i), to).contains("521"));
    }
    wait_for("two host blocks", Duration::from_secs(10), || {
        blocked(&d.cfg).len() == 2
    });
    // The third bot finds the host map full; its offence still counts.
    assert!(pregreet(&ns, ns.v4(4), to).contains("521"));
    wait_for("the /24 escalation", Duration::from_secs(10), || {
        blocked(&d.cfg).contains(&"192.0.2.0/24".to_owned())
    });
    // The line follows the store write, which follows the kernel entry.
    wait_for(
        "the escalation's BLOCK line",
        Duration::from_secs(10),
        || d.log(0).contains("BLOCK 192.0.2.0/24 reason=escalation"),
    );
    let log = d.log(0);
    assert!(log.contains("map block_v4 is full"), "{log}");
    assert!(
        stats(&d.cfg)["daemon"]["blocks_refused_full"]
            .as_u64()
            .unwrap()
            >= 1,
        "the refusal was not counted"
    );
    // The bot the host map refused, and a host that never misbehaved, are
    // dropped by the /24.
    assert!(
        !ns.connects(ns.v4(4), to, DROPPED),
        "the refused bot got through"
    );
    assert!(
        !ns.connects(ns.v4(5), to, DROPPED),
        "the /24 block did not drop"
    );
}

#[test]
fn allowlisted_clients_are_never_blocked() {
    let ns = NetNs::new();
    let permit = format!("access_list = [\"permit {}/32\"]", ns.neighbour_v4());
    let (_pins, d, port) = screening_daemon(
        &ns,
        "allow",
        &[("screen", &permit), ("verdict", "escalate_v4_hosts = 1")],
    );
    let to = SocketAddr::new(ns.host_v4(), port);
    // An allow entry: skips all tests, so its early talk is not a failure.
    ok(&d.cfg, &["allow", "add", &ns.client_v4().to_string()]);
    let reply = pregreet(&ns, ns.client_v4(), to);
    assert!(
        !reply.contains("521"),
        "allowed client was screened: {reply:?}"
    );
    // The access list's permit: the same.
    let reply = pregreet(&ns, ns.neighbour_v4(), to);
    assert!(
        !reply.contains("521"),
        "permitted client was screened: {reply:?}"
    );
    wait_for("both ALLOWLISTED", Duration::from_secs(10), || {
        d.log(0).matches("ALLOWLISTED").count() >= 2
    });
    // A bot beside them is blocked, but the escalation to their /24 is not.
    ns.add_addr(&format!("{}/28", ns.v4(4)));
    assert!(pregreet(&ns, ns.v4(4), to).contains("521"));
    wait_for("the bot's block", Duration::from_secs(10), || {
        blocked(&d.cfg).contains(&format!("{}/32", ns.v4(4)))
    });
    wait_for("the refused escalation", Duration::from_secs(10), || {
        d.log(0).contains("not escalating to 192.0.2.0/24")
    });
    let list = blocked(&d.cfg);
    assert_eq!(list, vec![format!("{}/32", ns.v4(4))], "{list:?}");
}
