//! Three MX hosts sharing one screener's judgement through a real Redis:
//! each daemon in its own network namespace with its XDP gate on its own
//! interface, Redis in another, the clients in a fourth. Asserts on what
//! the clients see on the wire and what each node's kernel maps hold.

use std::{net::SocketAddr, time::Duration};

use integration_tests::{
    fleet::{standard_roles, Lan, Node, BOT, FRIEND, SENDER},
    netns::wait_for,
    redis::Redis,
};

const PROPAGATION: Duration = Duration::from_secs(10);

fn redis_in(lan: &Lan) -> Redis {
    Redis::start_at(
        "198.51.100.20:6379".parse().unwrap(),
        Some(&lan.ns("redis")),
    )
}

fn fleet(extra: &str) -> (Lan, Redis, Vec<Node>) {
    let lan = Lan::new(&standard_roles());
    let redis = redis_in(&lan);
    let nodes = (1..=3)
        .map(|i| {
            Node::new(
                &lan,
                &format!("mx{i}"),
                &format!("198.51.100.1{i}"),
                &redis,
                extra,
            )
        })
        .collect();
    (lan, redis, nodes)
}

/// `from` talks before the greeting ends at `to`; the bytes it got back.
fn pregreet(lan: &Lan, from: &str, to: SocketAddr) -> String {
    let from: std::net::IpAddr = from.parse().unwrap();
    integration_tests::sys::on_netns_thread(&lan.ns("client"), move || {
        use std::io::{Read as _, Write as _};
        let fd = integration_tests::netns::bound_stream(from, to, Duration::from_secs(5))
            .expect("the bot could not connect");
        let mut s = fd;
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = s.write_all(b"EHLO bot.example\r\n");
        // Under enforce the dialogue goes on: finish it up to RCPT.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        for line in [
            &b"MAIL FROM:<bot@example.net>\r\n"[..],
            b"RCPT TO:<victim@example.com>\r\n",
            b"QUIT\r\n",
        ] {
            std::thread::sleep(Duration::from_millis(300));
            let _ = s.write_all(line);
        }
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    })
    .join()
    .unwrap()
    .unwrap()
}

fn kernel_drops(node: &Node, reason: &str) -> u64 {
    node.stats()["kernel"]["dropped_by_reason"][reason]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn a_verdict_or_a_pass_at_one_node_holds_at_every_node() {
    let (lan, _redis, nodes) = fleet("");
    let [mx1, mx2, mx3] = &nodes[..] else {
        unreachable!()
    };
    for n in &nodes {
        wait_for(&format!("{} joined", n.name), PROPAGATION, || {
            n.stats()["cluster"]["connected"] == true
        });
    }
    let bot = format!("{BOT}/32");

    // The default greet action (enforce): the bot's RCPT is refused, and
    // the verdict reaches every node's kernel.
    assert!(
        lan.connects(BOT, mx2.smtp),
        "mx2 refused the bot before any verdict"
    );
    let reply = pregreet(&lan, BOT, mx1.smtp);
    assert!(reply.contains("550 5.5.1"), "{reply}");
    for n in [mx2, mx3] {
        wait_for(
            &format!("the bot's block at {}", n.name),
            PROPAGATION,
            || n.blocks().contains(&(bot.clone(), Some("mx1".into()))),
        );
    }
    assert_eq!(
        mx1.blocks()
            .iter()
            .find(|b| b.0 == bot)
            .map(|b| b.1.clone()),
        Some(None),
        "mx1's own verdict has no origin"
    );
    let connects_before = mx2.log().matches(&format!("CONNECT from [{BOT}]")).count();
    for n in [mx2, mx3] {
        let before = kernel_drops(n, "pregreet");
        assert!(!lan.connects(BOT, n.smtp), "{} let the bot in", n.name);
        assert!(
            kernel_drops(n, "pregreet") > before,
            "{}'s XDP did not drop it",
            n.name
        );
    }
    assert_eq!(
        mx2.log().matches(&format!("CONNECT from [{BOT}]")).count(),
        connects_before,
        "the bot reached mx2's SMTP server"
    );
    let listing = mx3.ok(&["block", "list"]);
    assert!(listing.contains("from mx1"), "{listing}");

    // A sender screened at mx1 is PASS OLD at mx2 on its first visit.
    let (ok, out) = lan.swaks(SENDER, mx1.smtp);
    assert!(ok, "{out}");
    assert!(
        mx1.log().contains(&format!("PASS NEW [{SENDER}]")),
        "{}",
        mx1.log()
    );
    wait_for("the pass at Redis", PROPAGATION, || {
        mx1.stats()["cluster"]["queued"] == 0
    });
    let (ok, out) = lan.swaks(SENDER, mx2.smtp);
    assert!(ok, "{out}");
    let log2 = mx2.log();
    assert!(log2.contains(&format!("PASS OLD [{SENDER}]")), "{log2}");
    assert!(!log2.contains(&format!("PASS NEW [{SENDER}]")), "{log2}");
    assert_eq!(mx2.delivered.load(std::sync::atomic::Ordering::Relaxed), 1);

    // An unblock at mx3 opens the gate everywhere.
    mx3.ok(&["block", "del", &bot]);
    for n in [mx1, mx2] {
        wait_for(&format!("the unblock at {}", n.name), PROPAGATION, || {
            !n.holds(&bot)
        });
        assert!(lan.connects(BOT, n.smtp), "{} still drops the bot", n.name);
    }

    // Local policy wins: mx2 allowlists a host mx1 then blocks.
    mx2.ok(&["allow", "add", FRIEND]);
    mx1.ok(&["block", "add", FRIEND]);
    let friend = format!("{FRIEND}/32");
    wait_for("the block at mx3", PROPAGATION, || mx3.holds(&friend));
    let declined = integration_tests::sys::poll_until(PROPAGATION, || {
        mx2.stats()["daemon"]["fleet_skipped_protected"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    });
    assert!(
        declined,
        "mx2 never declined mx1's block on its allowlisted host:\n{}",
        mx2.log()
    );
    assert!(!mx2.holds(&friend));
    assert!(
        lan.connects(FRIEND, mx2.smtp),
        "mx2 dropped its allowlisted host"
    );
    assert!(!lan.connects(FRIEND, mx1.smtp), "mx1 let its block through");
    let status = mx2.ok(&["cluster", "status"]);
    for n in ["mx1", "mx2", "mx3"] {
        assert!(status.contains(n), "{status}");
    }
}

#[test]
fn a_redis_outage_delays_no_client_and_loses_no_verdict() {
    let (lan, mut redis, nodes) = fleet("");
    let [mx1, mx2, mx3] = &nodes[..] else {
        unreachable!()
    };
    for n in &nodes {
        wait_for(&format!("{} joined", n.name), PROPAGATION, || {
            n.stats()["cluster"]["connected"] == true
        });
    }
    redis.stop();
    wait_for("mx1 noticing the outage", PROPAGATION, || {
        mx1.stats()["cluster"]["connected"] == false
    });
    // Every node still screens and delivers.
    for n in &nodes {
        let (ok, out) = lan.swaks(SENDER, n.smtp);
        assert!(ok, "{}: {out}", n.name);
    }
    let total: usize = nodes
        .iter()
        .map(|n| n.delivered.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert_eq!(total, 3);
    // A verdict made meanwhile is kept locally and queued.
    let reply = pregreet(&lan, BOT, mx1.smtp);
    assert!(reply.contains("550"), "{reply}");
    let bot = format!("{BOT}/32");
    wait_for("the bot's block at mx1", PROPAGATION, || mx1.holds(&bot));
    assert!(!lan.connects(BOT, mx1.smtp));
    assert!(mx1.stats()["cluster"]["queued"].as_u64().unwrap_or(0) >= 1);
    assert_eq!(
        mx1.log().matches("cluster: Redis unreachable").count(),
        1,
        "the outage is logged once"
    );

    redis.resume();
    for n in [mx2, mx3] {
        wait_for(
            &format!("the queued block at {}", n.name),
            Duration::from_secs(30),
            || n.holds(&bot),
        );
        assert!(!lan.connects(BOT, n.smtp), "{} let the bot in", n.name);
    }
    assert!(
        mx1.log().contains("cluster: Redis reachable"),
        "{}",
        mx1.log()
    );
}

#[test]
fn a_node_that_was_away_catches_up_from_the_stream_or_the_snapshot() {
    let (_lan, _redis, mut nodes) = fleet("stream_length = 1000");
    for n in &nodes {
        wait_for(&format!("{} joined", n.name), PROPAGATION, || {
            n.stats()["cluster"]["connected"] == true
        });
    }
    let nets = |range: std::ops::Range<u32>| -> Vec<String> {
        range
            .map(|i| format!("2001:db8:{:x}:{:x}::/64", 0x100 + i / 0x1000, i % 0x1000))
            .collect()
    };
    let remote = |n: &Node| -> Vec<String> {
        n.blocks()
            .into_iter()
            .filter(|(_, o)| o.is_some())
            .map(|(n, _)| n)
            .collect()
    };
    let add = |n: &Node, list: &[String]| {
        for chunk in list.chunks(500) {
            let mut args = vec!["block", "add"];
            args.extend(chunk.iter().map(String::as_str));
            n.ok(&args);
        }
    };

    // Away for 1,000 verdicts: replayed from the stream.
    nodes[2].stop();
    let first = nets(0..1000);
    add(&nodes[0], &first);
    nodes[2].start();
    let mx3 = &nodes[2];
    wait_for(
        "mx3 replaying 1,000 blocks",
        Duration::from_secs(60),
        || remote(mx3).len() == 1000,
    );
    assert_eq!(mx3.stats()["cluster"]["resyncs"], 0, "{}", mx3.log());

    // Away for 3,000 more and an unblock: the stream no longer reaches
    // back that far, the snapshot does.
    nodes[2].stop();
    nodes[0].ok(&["block", "del", &first[0]]);
    let second = nets(1000..4000);
    add(&nodes[0], &second);
    wait_for("mx1 publishing", Duration::from_secs(60), || {
        nodes[0].stats()["cluster"]["queued"] == 0
    });
    nodes[2].start();
    let mx3 = &nodes[2];
    let mut want: Vec<String> = first[1..].iter().chain(&second).cloned().collect();
    want.sort();
    wait_for("mx3 resynchronised", Duration::from_secs(60), || {
        let mut got = remote(mx3);
        got.sort();
        got == want
    });
    assert_eq!(mx3.stats()["cluster"]["resyncs"], 1, "{}", mx3.log());
    let mut mx2: Vec<String> = remote(&nodes[1]);
    mx2.sort();
    assert_eq!(mx2, want, "mx2 and mx3 disagree");
}
