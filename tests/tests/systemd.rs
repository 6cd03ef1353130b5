//! The service manager's notify protocol, driven for real: the test owns
//! the datagram socket `NOTIFY_SOCKET` names, as systemd does for a
//! `Type=notify` unit, and checks what the daemon tells it and when.

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::{set, write_config},
    netns::{screener_bin, spawn_logged, ChildGuard, NetNs, PinDir},
    smtp_peers::free_port,
};

/// Long enough for a debug build to load the XDP program on a busy machine.
const START: Duration = Duration::from_secs(60);
/// A keep-alive comes every half of `WATCHDOG_USEC` (2 s here).
const WATCHDOG_USEC: u64 = 2_000_000;

/// The socket the daemon reports to, and every datagram read from it.
struct Manager {
    sock: UnixDatagram,
    /// Each datagram's `KEY=VALUE` lines, in arrival order.
    seen: Vec<Vec<String>>,
}

impl Manager {
    fn bind(path: &Path) -> Manager {
        let sock = UnixDatagram::bind(path).unwrap();
        Manager {
            sock,
            seen: Vec::new(),
        }
    }

    /// Reads datagrams until one has the line `want`; returns its lines.
    /// Panics naming `want` when `deadline` passes first.
    #[track_caller]
    fn expect(&mut self, want: &str, deadline: Duration) -> Vec<String> {
        let end = Instant::now() + deadline;
        let mut buf = vec![0u8; 4096];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {want} within {deadline:?}; got {:?}",
                self.seen
            );
            self.sock.set_read_timeout(Some(left)).unwrap();
            let n = match self.sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
                Err(e) => panic!("reading the notify socket: {e}"),
            };
            let lines: Vec<String> = String::from_utf8_lossy(&buf[..n])
                .lines()
                .map(str::to_owned)
                .collect();
            self.seen.push(lines.clone());
            if lines.iter().any(|l| l == want) {
                return lines;
            }
        }
    }

    /// The state changes seen so far, keep-alives left out.
    fn states(&self) -> Vec<&str> {
        self.seen
            .iter()
            .flatten()
            .map(String::as_str)
            .filter(|l| matches!(*l, "READY=1" | "RELOADING=1" | "STOPPING=1"))
            .collect()
    }
}

fn monotonic_usec() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    i128::from(ts.tv_sec) * 1_000_000 + i128::from(ts.tv_nsec) / 1_000
}

fn signal(child: &ChildGuard, sig: libc::c_int) {
    let pid = child.0.as_ref().unwrap().id();
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0);
}

/// Starts `screener -c cfg run ARGS` under a notify socket in `dir` and
/// drives it through start, reload, watchdog and stop; `at_ready` checks
/// more of what must hold once READY=1 arrives.
fn drive(cfg: &Path, dir: &Path, args: &[&str], smtp: SocketAddr, at_ready: &dyn Fn()) {
    let mut manager = Manager::bind(&dir.join("notify.sock"));
    let mut child = spawn_logged(
        Command::new(screener_bin())
            .arg("-c")
            .arg(cfg)
            .arg("run")
            .args(args)
            .env("NOTIFY_SOCKET", dir.join("notify.sock"))
            .env("WATCHDOG_USEC", WATCHDOG_USEC.to_string())
            .env_remove("WATCHDOG_PID"),
        &dir.join("daemon.log"),
    );
    let log = || std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();

    manager.expect("READY=1", START);
    // Ready means a client gets its teaser now: one attempt, no retry.
    let conn = TcpStream::connect_timeout(&smtp, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("READY=1 but {smtp} refuses: {e}\n{}", log()));
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut teaser = String::new();
    BufReader::new(&conn).read_line(&mut teaser).unwrap();
    assert!(teaser.starts_with("220-"), "no teaser: {teaser:?}");
    drop(conn);
    at_ready();

    let before = monotonic_usec();
    signal(&child, libc::SIGHUP);
    let reloading = manager.expect("RELOADING=1", Duration::from_secs(10));
    let after = monotonic_usec();
    let stamp: i128 = reloading
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"))
        .parse()
        .unwrap();
    assert!(
        (before..=after).contains(&stamp),
        "MONOTONIC_USEC={stamp} is not between {before} and {after}"
    );
    manager.expect("READY=1", Duration::from_secs(30));
    assert!(
        log().contains("configuration reloaded"),
        "READY=1 after RELOADING=1 but no reload logged:\n{}",
        log()
    );
    // Keep-alives every second: one arrives well within five.
    manager.expect("WATCHDOG=1", Duration::from_secs(5));

    signal(&child, libc::SIGTERM);
    manager.expect("STOPPING=1", Duration::from_secs(10));
    assert_eq!(
        manager.states(),
        ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"],
        "{:?}",
        manager.seen
    );
    let mut c = child.0.take().unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = c.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < end,
            "the daemon did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit after SIGTERM: {status}\n{}", log());
}

/// A configuration on loopback only, for `--no-xdp`.
fn loopback_config(dir: &Path, port: u16) -> std::path::PathBuf {
    let cfg = dir.join("screener.toml");
    std::fs::write(
        &cfg,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:{port}\"]\nbackend = \"127.0.0.1:9\"\n\
             # Loopback clients are local: screen them, so they get the teaser.\n\
             [screen]\npermit_local = false\n\
             [store]\npath = \"{d}/s.redb\"\n[admin]\nsocket = \"{d}/admin.sock\"\n",
            d = dir.display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn notify_protocol_without_xdp() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = loopback_config(dir.path(), port);
    drive(
        &cfg,
        dir.path(),
        &["--no-xdp"],
        SocketAddr::from(([127, 0, 0, 1], port)),
        &|| {},
    );
}

#[test]
fn notify_protocol_with_the_gate_attached() {
    let ns = NetNs::new();
    let pins = PinDir::new("notify");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write_config(dir.path(), &ns, &pins, "skb", port);
    set(&cfg, "smtp", &format!("listen = [\"127.0.0.1:{port}\"]"));
    let smtp = SocketAddr::from(([127, 0, 0, 1], port));
    drive(&cfg, dir.path(), &[], smtp, &|| {
        // READY=1 comes only after the attach: the interface runs the
        // program already.
        let st = screener::xdp::status(&pins.0, std::slice::from_ref(&ns.host_if));
        assert!(
            st.attached,
            "READY=1 before the gate is attached: {:?}",
            st.interfaces[0].state
        );
    });
}
