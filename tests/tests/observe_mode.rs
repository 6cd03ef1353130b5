//! The observe-first rollout the README describes, on the configuration the
//! package ships (`dist/screener.toml`): every action `ignore` and
//! `verdict.block_on = []`. A bot is logged for what it did, but reaches the
//! MTA as if the screener were not there, and nothing is blocked.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use integration_tests::{
    daemon::{blocked, ok, start_no_xdp, stats},
    netns::wait_for,
    smtp_peers::{free_port, Bot, Postfix, Upstream},
};

/// The shipped file, pointed at a test's loopback port, store and socket,
/// and at `backend`, with `config set` as an operator would.
fn shipped_config(dir: &Path, port: u16, backend: SocketAddr) -> PathBuf {
    let cfg = dir.join("screener.toml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/screener.toml"),
        &cfg,
    )
    .unwrap();
    ok(
        &cfg,
        &[
            "config",
            "set",
            &format!("smtp.listen=127.0.0.1:{port}"),
            &format!("smtp.backend={backend}"),
            "xdp.interfaces=lo",
            // A short wait keeps the test quick; the bot talks at once.
            "screen.greet_wait=1s",
            // The bot is a loopback address, which is local: screen it.
            "screen.permit_local=false",
            &format!("store.path={}/s.redb", dir.display()),
            &format!("admin.socket={}/admin.sock", dir.display()),
            // The package creates the screener account; this machine
            // need not have it.
            "daemon.user=root",
        ],
    );
    cfg
}

#[test]
fn observe_mode_logs_a_pregreet_bot_and_lets_it_through_unblocked() {
    let pf = Postfix::start(Upstream::Haproxy, false);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = shipped_config(dir.path(), port, pf.addr);
    let log = dir.path().join("daemon.log");
    let _d = start_no_xdp(&cfg, &log);

    let to: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut bot = Bot::connect([127, 0, 0, 66], to);
    // Talks before it is greeted: a pregreet failure.
    bot.send(b"EHLO bot.example\r\n");
    let greeting = bot.read_reply("250");
    assert!(
        greeting.contains("220 backend.test"),
        "the MTA's greeting did not arrive: {greeting:?}"
    );
    bot.send(b"MAIL FROM:<bot@bot.example>\r\n");
    let mail = bot.read_reply("250");
    assert!(mail.contains("250 "), "{mail:?}");
    bot.send(b"RCPT TO:<rcpt@backend.test>\r\n");
    let rcpt = bot.read_reply("250");
    // Enforcing would answer 550 5.5.1 here (and block the bot).
    assert!(rcpt.contains("250 2.1.5"), "{rcpt:?}");
    bot.send(b"QUIT\r\n");
    bot.read_to_close();

    wait_for("the PREGREET line", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("PREGREET")
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("[127.0.0.66]"), "{text}");
    assert!(!text.contains("BLOCK "), "{text}");
    assert!(!text.contains("NOQUEUE"), "{text}");
    assert!(blocked(&cfg).is_empty());
    let s = stats(&cfg);
    // Counted as a failure, handed off, never blocked.
    assert_eq!(s["smtp"]["fails"]["pregreet"], 1, "{s}");
    assert_eq!(s["smtp"]["handed_off"], 1, "{s}");
    assert_eq!(s["daemon"]["blocks"], 0, "{s}");
}
