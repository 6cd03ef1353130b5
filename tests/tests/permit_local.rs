//! Local addresses are permitted by default (`screen.permit_local`): a
//! client on loopback that talks before the greeting is handed straight to
//! the backend and never blocked; with the switch off it is screened,
//! rejected at RCPT and blocked like any bot.

use std::{path::Path, time::Duration};

use integration_tests::{
    daemon::{blocked, stats},
    netns::{wait_for, ChildGuard},
    smtp_peers::{free_port, Bot, Postfix, Upstream},
};

/// A daemon (no XDP: verdicts go to the store) in front of `backend`, with
/// the default configuration but for `extra` lines in `[screen]`.
fn daemon(dir: &Path, backend: &Postfix, port: u16, extra: &str) -> ChildGuard {
    let cfg = dir.join("screener.toml");
    std::fs::write(
        &cfg,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:{port}\"]\nhostname = \"mx.example.com\"\n\
             backend = \"{backend}\"\n\
             [screen]\ngreet_wait = \"1s\"\n{extra}\n\
             [store]\npath = \"{d}/s.redb\"\n[admin]\nsocket = \"{d}/admin.sock\"\n[daemon]\nuser = \"root\"\n",
            backend = backend.addr,
            d = dir.display()
        ),
    )
    .unwrap();
    integration_tests::daemon::start_no_xdp(&cfg, &dir.join("daemon.log"))
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
}

#[test]
fn a_local_client_that_pregreets_is_permitted_by_default() {
    let backend = Postfix::start(Upstream::Haproxy, false);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("screener.toml");
    let port = free_port();
    let _d = daemon(dir.path(), &backend, port, "");
    let smtp = std::net::SocketAddr::from(([127, 0, 0, 1], port));

    // Talks at once, as a hasty `telnet localhost 25` would.
    let mut client = Bot::connect([127, 0, 0, 1], smtp);
    client.send(b"EHLO local.example\r\n");
    let got = client.read_until("250 ");
    // Straight to the backend: its greeting, no teaser, and its EHLO reply.
    assert!(got.starts_with("220 backend.test"), "{got:?}");
    assert!(got.contains("250-backend.test"), "{got:?}");
    client.send(b"QUIT\r\n");
    client.read_to_close();

    wait_for("the ALLOWLISTED line", Duration::from_secs(10), || {
        log(dir.path()).contains("ALLOWLISTED [127.0.0.1]:")
    });
    let st = stats(&cfg);
    assert_eq!(st["smtp"]["fails"]["pregreet"], 0, "{st}");
    assert!(blocked(&cfg).is_empty());
    backend.wait_log(&["connect from", "[127.0.0.1]"]);
}

#[test]
fn with_permit_local_off_a_local_client_is_screened_and_blocked() {
    let backend = Postfix::start(Upstream::Haproxy, false);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("screener.toml");
    let port = free_port();
    let _d = daemon(dir.path(), &backend, port, "permit_local = false");
    let smtp = std::net::SocketAddr::from(([127, 0, 0, 1], port));

    let mut client = Bot::connect([127, 0, 0, 1], smtp);
    client.send(b"EHLO local.example\r\n");
    let got = client.read_until("220 mx.example.com");
    assert!(got.starts_with("220-mx.example.com"), "{got:?}");
    // The default greet_action is enforce: the dialogue goes on, RCPT is
    // refused.
    client.send(b"HELO local.example\r\n");
    client.read_until("250");
    client.send(b"MAIL FROM:<a@example.org>\r\n");
    client.read_until("250");
    client.send(b"RCPT TO:<b@backend.test>\r\n");
    let reply = client.read_until("550 5.5.1");
    assert!(reply.contains("550 5.5.1 Protocol error"), "{reply:?}");

    wait_for("the block", Duration::from_secs(10), || {
        blocked(&cfg) == ["127.0.0.1/32"]
    });
    let st = stats(&cfg);
    assert_eq!(st["smtp"]["fails"]["pregreet"], 1, "{st}");
    assert!(log(dir.path()).contains("PREGREET"), "{}", log(dir.path()));
}
