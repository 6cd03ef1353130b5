//! `cargo xtask bench cluster`: how fast the fleet shares verdicts, what
//! they cost Redis, and what the fleet costs a client.
//!
//! Two MX daemons (release builds) in their own namespaces with their XDP
//! gates on their own interfaces, Redis in a third, as the fleet tests
//! build them:
//!
//! 1. propagation: a block made at mx1 (admin socket) until the entry is
//!    in mx2's kernel map (read through its pins), one block at a time;
//! 2. burst: 10,000 blocks in one request at mx1 until all are in mx2's
//!    map;
//! 3. catch-up: mx2 stopped, 10,000 blocks made at mx1 while it is away
//!    (`--offline`, default 60 s), mx2 started: time from its start until
//!    all are in its map;
//! 4. Redis memory per shared verdict and per shared pass (`INFO memory`);
//! 5. fast path: connect → the backend's 220 for a `PASS OLD` client at
//!    mx1 with the fleet on, against the same node restarted without it.
//!
//! Usage: `bench_cluster [--rounds N] [--offline SECS]`

#![expect(
    clippy::cast_precision_loss,
    reason = "byte and entry counts far below 2^52 shown as figures"
)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use integration_tests::{
    bench::report::{self, cell, ms, Spread, Table},
    fleet::{Lan, Node, SENDER},
    netns::wait_for,
    redis::Redis,
};
use screener::admin::{self, Request};

fn roles() -> Vec<(&'static str, &'static [&'static str])> {
    vec![
        ("mx1", &["198.51.100.11"][..]),
        ("mx2", &["198.51.100.12"][..]),
        ("redis", &["198.51.100.20"][..]),
        ("client", &[SENDER][..]),
    ]
}

/// The `i`th benchmark source: an IPv6 /64, the unit verdicts block
/// (`verdict.ipv6_prefix`), so it lands in the host hash map.
fn host(round: u32, i: u32) -> String {
    format!("2001:db8:{:x}:{:x}::/64", 0x200 + round, i)
}

fn ask(rt: &tokio::runtime::Runtime, node: &Node, req: &Request) {
    let sock = node.dir().join("admin.sock");
    let r = rt
        .block_on(admin::call(&sock, req))
        .unwrap_or_else(|e| panic!("{}: {e}", node.name));
    assert!(r.ok, "{}: {:?}", node.name, r.error);
}

fn block(rt: &tokio::runtime::Runtime, node: &Node, nets: Vec<String>) {
    ask(
        rt,
        node,
        &Request::BlockAdd {
            nets,
            ttl: None,
            reason: Some("bench".into()),
        },
    );
}

/// Entries in `pins`' IPv6 host block map (keyed by /64).
fn v6_hosts(pins: &Path) -> usize {
    screener::xdp::Maps::from_pins(pins).map_or(0, |m| {
        m.counts()
            .into_iter()
            .find(|(n, _)| *n == screener_common::map_names::BLOCK_V6)
            .map_or(0, |c| c.1)
    })
}

/// Whether `net` is in the block maps at `pins`.
fn holds(pins: &Path, net: &str) -> bool {
    let net: ipnet::IpNet = net.parse().unwrap();
    screener::xdp::Maps::from_pins(pins)
        .and_then(|m| m.blocks())
        .is_ok_and(|l| l.iter().any(|e| e.net == net))
}

fn until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
    t0.elapsed()
}

fn redis_memory(redis: &Redis) -> u64 {
    redis
        .cli(&["INFO", "memory"])
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Connect → the backend's 220 for `visits` visits of the sender at `to`.
fn fast_path(lan: &Lan, to: SocketAddr, visits: usize) -> Vec<Duration> {
    let from: IpAddr = SENDER.parse().unwrap();
    integration_tests::sys::on_netns_thread(&lan.ns("client"), move || {
        let mut out = Vec::with_capacity(visits);
        for _ in 0..visits {
            let t0 = Instant::now();
            let s = integration_tests::netns::bound_stream(from, to, Duration::from_secs(5))
                .expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            loop {
                line.clear();
                assert!(
                    r.read_line(&mut line).unwrap_or(0) != 0,
                    "closed before the backend's 220"
                );
                if line.starts_with("220 sink") {
                    break;
                }
            }
            out.push(t0.elapsed());
            let _ = (&s).write_all(b"QUIT\r\n");
        }
        out
    })
    .join()
    .unwrap()
    .unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = u32::try_from(flag("--rounds", 5)).unwrap_or(5);
    let offline = Duration::from_secs(flag("--offline", 60));
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!("{}", report::machine());

    let lan = Lan::new(&roles());
    let redis = Redis::start_at(
        "198.51.100.20:6379".parse().unwrap(),
        Some(&lan.ns("redis")),
    );
    let mut mx1 = Node::new(&lan, "mx1", "198.51.100.11", &redis, "");
    let mut mx2 = Node::new(&lan, "mx2", "198.51.100.12", &redis, "");
    for n in [&mx1, &mx2] {
        wait_for(
            &format!("{} joined", n.name),
            Duration::from_secs(20),
            || n.stats()["cluster"]["connected"] == true,
        );
    }

    // 1. One at a time.
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    let per_round = 200;
    for r in 0..rounds {
        let mut lat = Vec::new();
        for i in 0..per_round {
            let net = host(r, i);
            let t0 = Instant::now();
            block(&rt, &mx1, vec![net.clone()]);
            until("one block at mx2", Duration::from_secs(10), || {
                holds(mx2.pins(), &net)
            });
            lat.push(t0.elapsed());
        }
        p50.push(ms(report::quantile(&lat, 0.5).unwrap()));
        p99.push(ms(report::quantile(&lat, 0.99).unwrap()));
    }
    let mut t = Table::new(&["figure", "median (min–max) over rounds"]);
    t.row(vec![
        format!("propagation p50, ms ({per_round} blocks per round)"),
        cell(Spread::of(&p50)),
    ]);
    t.row(vec!["propagation p99, ms".into(), cell(Spread::of(&p99))]);

    // 2. A burst of 10,000.
    let mut burst = Vec::new();
    for r in 0..rounds {
        let before = v6_hosts(mx2.pins());
        let nets: Vec<String> = (0..10_000).map(|i| host(100 + r, i)).collect();
        let t0 = Instant::now();
        block(&rt, &mx1, nets);
        until("10,000 blocks at mx2", Duration::from_secs(120), || {
            v6_hosts(mx2.pins()) >= before + 10_000
        });
        burst.push(t0.elapsed().as_secs_f64());
    }
    t.row(vec![
        "10,000-block burst applied at mx2, s".into(),
        cell(Spread::of(&burst)),
    ]);

    // 4. Redis memory per verdict (before the catch-up adds more).
    let held = mx1.blocks().len() as f64;
    let mem = redis_memory(&redis) as f64;
    t.row(vec![
        format!("Redis memory per shared verdict, bytes ({held} held: stream + snapshot key)"),
        report::num(mem / held.max(1.0)),
    ]);

    // 3. Catch-up after `offline`.
    let mut catchup = Vec::new();
    let catch_rounds = rounds.min(3);
    for r in 0..catch_rounds {
        mx2.stop();
        let before = v6_hosts(mx2.pins());
        let t_off = Instant::now();
        let nets: Vec<String> = (0..10_000).map(|i| host(200 + r, i)).collect();
        block(&rt, &mx1, nets);
        wait_for("mx1 published", Duration::from_secs(60), || {
            mx1.stats()["cluster"]["queued"] == 0
        });
        std::thread::sleep(offline.saturating_sub(t_off.elapsed()));
        let t0 = Instant::now();
        mx2.start();
        until("mx2 caught up", Duration::from_secs(300), || {
            v6_hosts(mx2.pins()) >= before + 10_000
        });
        catchup.push(t0.elapsed().as_secs_f64());
    }
    t.row(vec![
        format!(
            "catch-up after {} s away with 10,000 missed, s from restart ({catch_rounds} rounds)",
            offline.as_secs()
        ),
        cell(Spread::of(&catchup)),
    ]);

    // 4b. Passes: a fleet link publishes 10,000 of them, from inside the
    // LAN (Redis is only reachable there).
    let before = redis_memory(&redis);
    let (url, prefix) = (redis.url(), lan.ns("lan"));
    integration_tests::sys::on_netns_thread(&lan.ns("client"), move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let c = screener::cluster::Cluster::new(screener::cluster::Settings {
                redis: vec![url],
                node: "bench".into(),
                prefix,
                ..Default::default()
            });
            let (tx, _rx) = tokio::sync::mpsc::channel(1);
            let stop = tokio_util::sync::CancellationToken::new();
            let run = {
                let c = c.clone();
                let stop = stop.clone();
                tokio::spawn(async move { c.run(Some("0-0".into()), tx, stop).await })
            };
            for i in 0..10_000u32 {
                let ip: IpAddr = format!("2001:db8:ffff::{i:x}").parse().unwrap();
                c.publish_pass(ip, &[("pregreet", 4_000_000_000), ("dnsbl", 4_000_000_000)]);
            }
            let t0 = Instant::now();
            while (c.status().queued > 0 || !c.status().connected)
                && t0.elapsed() < Duration::from_secs(60)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(c.status().queued, 0, "the passes were not published");
            stop.cancel();
            let _ = run.await;
        });
    })
    .join()
    .unwrap()
    .unwrap();
    let per_pass = redis_memory(&redis).saturating_sub(before) as f64 / 10_000.0;
    t.row(vec![
        "Redis memory per shared pass, bytes".into(),
        report::num(per_pass),
    ]);

    // 5. The fast path with and without the fleet.
    let (ok, out) = lan.swaks(SENDER, mx1.smtp);
    assert!(ok, "{out}");
    let mut on = Vec::new();
    let mut off = Vec::new();
    let solo = mx1.cfg.with_extension("solo.toml");
    let text = std::fs::read_to_string(&mx1.cfg).unwrap();
    let cut = text.find("[cluster]").unwrap();
    std::fs::write(&solo, &text[..cut]).unwrap();
    let fleet_cfg = mx1.cfg.clone();
    for _ in 0..rounds {
        for (cfg, out) in [(&fleet_cfg, &mut on), (&solo, &mut off)] {
            mx1.stop();
            mx1.cfg.clone_from(cfg);
            mx1.start();
            let v = fast_path(&lan, mx1.smtp, 300);
            out.push(ms(report::quantile(&v, 0.5).unwrap()));
        }
    }
    t.row(vec![
        "fast path p50 (PASS OLD, connect → backend 220), fleet on, ms".into(),
        cell(Spread::of(&on)),
    ]);
    t.row(vec![
        "fast path p50, same node without [cluster], ms".into(),
        cell(Spread::of(&off)),
    ]);
    let ratio: Vec<f64> = on.iter().zip(&off).map(|(a, b)| a / b).collect();
    t.row(vec![
        "fast path p50 ratio on ÷ off".into(),
        cell(Spread::of(&ratio)),
    ]);
    println!("{}", t.render());
}
