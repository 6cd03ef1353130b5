//! `screener run --no-xdp`: screening only. Verdicts still go to the store
//! (and reach the kernel at the next start with XDP).

use std::{process::Command, time::Duration};

use integration_tests::{
    daemon::{blocked, cli, ok},
    netns::{screener_bin, spawn_logged, wait_for},
    smtp_peers::free_port,
};

#[test]
fn blocks_are_recorded_without_xdp() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("screener.toml");
    std::fs::write(
        &cfg,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:{}\"]\n[store]\npath = \"{d}/s.redb\"\n[admin]\nsocket = \"{d}/admin.sock\"\n[daemon]\nuser = \"root\"\n",
            free_port(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    let start = |n: u32| {
        let child = spawn_logged(
            Command::new(screener_bin())
                .arg("-c")
                .arg(&cfg)
                .args(["run", "--no-xdp"]),
            &dir.path().join(format!("daemon{n}.log")),
        );
        wait_for("the admin socket", Duration::from_secs(20), || {
            cli(&cfg, &["stats", "--json"]).0
        });
        child
    };
    let mut d = start(0);
    let out = ok(&cfg, &["block", "add", "203.0.113.9", "2001:db8:9::/48"]);
    assert!(
        out.contains("recorded 203.0.113.9/32; the daemon runs without XDP"),
        "{out}"
    );
    ok(&cfg, &["allow", "add", "198.51.100.0/24"]);
    d.kill9();
    let _d = start(1);
    let mut list = blocked(&cfg);
    list.sort();
    assert_eq!(list, vec!["2001:db8:9::/48", "203.0.113.9/32"]);
    assert!(ok(&cfg, &["allow", "list"]).contains("198.51.100.0/24"));
}

#[test]
fn cache_commands_go_through_the_daemon() {
    use integration_tests::smtp_peers::Bot;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("screener.toml");
    let port = free_port();
    std::fs::write(
        &cfg,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:{port}\"]\nbackend = \"127.0.0.1:9\"\n\
             [screen]\ngreet_wait = \"1s\"\npermit_local = false\n\
             [store]\npath = \"{d}/s.redb\"\n[admin]\nsocket = \"{d}/admin.sock\"\n[daemon]\nuser = \"root\"\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let _d = spawn_logged(
        Command::new(screener_bin())
            .arg("-c")
            .arg(&cfg)
            .args(["run", "--no-xdp"]),
        &dir.path().join("daemon.log"),
    );
    wait_for("the admin socket", Duration::from_secs(20), || {
        cli(&cfg, &["stats", "--json"]).0
    });
    // A client that waits out the greeting passes the pregreet test.
    let mut bot = Bot::connect(
        [127, 0, 0, 5],
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
    );
    let _ = bot.read_to_close();
    wait_for("the pass in the cache", Duration::from_secs(10), || {
        ok(&cfg, &["cache", "list", "--json"]).contains("127.0.0.5")
    });
    let shown = ok(&cfg, &["cache", "show", "127.0.0.5"]);
    assert!(shown.contains("expires"), "{shown}");
    ok(&cfg, &["cache", "purge", "127.0.0.5"]);
    let (found, out) = cli(&cfg, &["cache", "show", "127.0.0.5"]);
    assert!(!found && out.contains("not in the cache"), "{out}");
    let (bad, out) = cli(&cfg, &["cache", "show", "not-an-ip"]);
    assert!(!bad && out.contains("not-an-ip"), "{out}");
}
