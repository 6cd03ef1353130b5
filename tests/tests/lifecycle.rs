//! The daemon's signals: SIGHUP reloads the configuration without dropping
//! connections (and refuses a bad file), SIGTERM tells clients still in the
//! tests `421 4.3.2` and exits.

use std::{io::Read, path::Path, time::Duration};

use integration_tests::{
    netns::{wait_for, ChildGuard},
    smtp_peers::{free_port, Bot},
};

fn config(dir: &Path, port: u16, banner: &str) -> String {
    format!(
        "[smtp]\nlisten = [\"127.0.0.1:{port}\"]\ngreet_banner = \"{banner}\"\n\
         [screen]\ngreet_wait = \"30s\"\npermit_local = false\n\
         [store]\npath = \"{d}/s.redb\"\n[admin]\nsocket = \"{d}/admin.sock\"\n[daemon]\nuser = \"root\"\n",
        d = dir.display()
    )
}

fn start(dir: &Path, cfg: &Path) -> ChildGuard {
    integration_tests::daemon::start_no_xdp(cfg, &dir.join("daemon.log"))
}

fn signal(child: &ChildGuard, sig: i32) {
    let pid = i32::try_from(child.0.as_ref().expect("running").id()).unwrap();
    // SAFETY: a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
}

#[test]
fn sighup_reloads_without_dropping_and_refuses_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("screener.toml");
    let port = free_port();
    let smtp = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    std::fs::write(&cfg, config(dir.path(), port, "first banner")).unwrap();
    let daemon = start(dir.path(), &cfg);

    let mut waiting = Bot::connect([127, 0, 0, 2], smtp);
    assert!(waiting.read_until("\r\n").contains("220-first banner"));

    std::fs::write(&cfg, config(dir.path(), port, "second banner")).unwrap();
    signal(&daemon, libc::SIGHUP);
    wait_for("the reload", Duration::from_secs(10), || {
        log(dir.path()).contains("configuration reloaded")
    });
    let mut fresh = Bot::connect([127, 0, 0, 3], smtp);
    assert!(fresh.read_until("\r\n").contains("220-second banner"));

    std::fs::write(&cfg, "[screen]\ngreet_wait = \"soon\"\n").unwrap();
    signal(&daemon, libc::SIGHUP);
    wait_for("the refusal", Duration::from_secs(10), || {
        log(dir.path()).contains("reload refused")
    });
    assert!(
        log(dir.path()).contains("screen.greet_wait"),
        "{}",
        log(dir.path())
    );
    let mut after = Bot::connect([127, 0, 0, 4], smtp);
    assert!(after.read_until("\r\n").contains("220-second banner"));

    // The client connected before both reloads is still in its greet wait.
    waiting
        .stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    let r = waiting.stream.read(&mut byte);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "the waiting client was dropped or answered: {r:?}"
    );
}

#[test]
fn sigterm_tells_clients_in_the_tests_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("screener.toml");
    let port = free_port();
    std::fs::write(&cfg, config(dir.path(), port, "mx")).unwrap();
    let mut daemon = start(dir.path(), &cfg);
    let mut bot = Bot::connect(
        [127, 0, 0, 2],
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
    );
    assert!(bot.read_until("\r\n").starts_with("220-"));
    signal(&daemon, libc::SIGTERM);
    let rest = bot.read_to_close();
    assert!(rest.contains("421 4.3.2 Service shutting down"), "{rest:?}");
    let child = daemon.0.as_mut().unwrap();
    wait_for("the daemon to exit", Duration::from_secs(40), || {
        child.try_wait().unwrap().is_some()
    });
    assert!(child.try_wait().unwrap().unwrap().success());
    assert!(
        !dir.path().join("admin.sock").exists(),
        "admin socket left behind"
    );
}
