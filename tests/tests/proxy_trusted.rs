//! Behind a load balancer, only `smtp.upstream_proxy_trusted` peers may
//! send a PROXY header: a host that reaches the port directly and forges
//! one naming a victim is closed, logged and counted, and the victim is
//! never blocked.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    time::Duration,
};

use integration_tests::{
    daemon::{blocked, stats},
    netns::{wait_for, NetNs},
    smtp_peers::{free_port, Bot},
};

#[test]
fn a_proxy_header_from_an_untrusted_host_is_refused_and_blocks_nobody() {
    let ns = NetNs::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("screener.toml");
    let port = free_port();
    let on_veth = SocketAddr::new(ns.host_v4(), port);
    let on_lo = SocketAddr::from(([127, 0, 0, 1], port));
    std::fs::write(
        &cfg,
        format!(
            "[smtp]\nlisten = [\"{on_lo}\", \"{on_veth}\"]\nhostname = \"mx.example.com\"\n\
             backend = \"127.0.0.1:9\"\n\
             upstream_proxy_protocol = \"haproxy\"\n\
             upstream_proxy_trusted = [\"127.0.0.1\"]\n\
             [screen]\ngreet_wait = \"1s\"\n\
             [store]\npath = \"{d}/s.redb\"\n[admin]\nsocket = \"{d}/admin.sock\"\n[daemon]\nuser = \"root\"\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let _d = integration_tests::daemon::start_no_xdp(&cfg, &log);

    // A host on the network, not the balancer, names a victim and then
    // talks early, which would get the victim blocked.
    let attacker = ns.client_v4();
    let mut s = ns
        .tcp_from(attacker, on_veth, Duration::from_secs(5))
        .expect("the attacker connects");
    let forged = format!("PROXY TCP4 192.0.2.9 {} 4242 {port}\r\n", ns.host_v4());
    s.write_all(forged.as_bytes()).unwrap();
    let _ = s.write_all(b"EHLO bot.example\r\n");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        got.is_empty(),
        "closed without a word: {:?}",
        String::from_utf8_lossy(&got)
    );

    wait_for("the refusal counted", Duration::from_secs(10), || {
        stats(&cfg)["smtp"]["proxy_untrusted"] == 1
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("PROXY header refused: [{attacker}]:"))
            && text.contains("is not in smtp.upstream_proxy_trusted"),
        "{text}"
    );

    // The balancer's header is honoured: the client it names pregreets and
    // is blocked. This proves the refusal above is what saved 192.0.2.9.
    let mut lb = Bot::connect([127, 0, 0, 1], on_lo);
    lb.send(
        format!("PROXY TCP4 192.0.2.10 127.0.0.1 4242 {port}\r\nEHLO bot.example\r\n").as_bytes(),
    );
    wait_for(
        "the block of the balancer's client",
        Duration::from_secs(10),
        || blocked(&cfg).contains(&"192.0.2.10/32".to_owned()),
    );
    drop(lb);

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("CONNECT from [192.0.2.9]"), "{text}");
    assert!(!blocked(&cfg).contains(&"192.0.2.9/32".to_owned()));
    let st = stats(&cfg);
    assert_eq!(st["smtp"]["proxy_untrusted"], 1, "{st}");
    assert_eq!(st["smtp"]["fails"]["pregreet"], 1, "{st}");
}
