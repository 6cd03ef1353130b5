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
    /// The daemon's log, shown when an expected message does not come.
    log: std::path::PathBuf,
}

impl Manager {
    fn bind(path: &Path, log: &Path) -> Manager {
        // A previous run's socket file would make the bind fail.
        let _ = std::fs::remove_file(path);
        let sock = UnixDatagram::bind(path).unwrap();
        Manager {
            sock,
            seen: Vec::new(),
            log: log.to_owned(),
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
                "no {want} within {deadline:?}; got {:?}; daemon log:\n{}",
                self.seen,
                std::fs::read_to_string(&self.log).unwrap_or_default()
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
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) },
        0
    );
    i128::from(ts.tv_sec) * 1_000_000 + i128::from(ts.tv_nsec) / 1_000
}

fn signal(child: &ChildGuard, sig: libc::c_int) {
    let pid = child.0.as_ref().unwrap().id();
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(
        unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap(), sig) },
        0
    );
}

/// Starts `screener -c cfg run ARGS` under a notify socket in `dir` and
/// drives it through start, reload, watchdog and stop; `at_ready` checks
/// more of what must hold once READY=1 arrives.
fn drive(
    wrap: &[String],
    cfg: &Path,
    dir: &Path,
    args: &[&str],
    smtp: SocketAddr,
    at_ready: &dyn Fn(u32),
) {
    let mut manager = Manager::bind(&dir.join("notify.sock"), &dir.join("daemon.log"));
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(screener_bin());
            c
        }
        None => Command::new(screener_bin()),
    };
    let mut child = spawn_logged(
        cmd.arg("-c")
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
    at_ready(child.0.as_ref().unwrap().id());

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
             [store]\npath = \"{d}/s.redb\"\n[admin]\nsocket = \"{d}/admin.sock\"\n[daemon]\nuser = \"root\"\n",
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
        &[],
        &cfg,
        dir.path(),
        &["--no-xdp"],
        SocketAddr::from(([127, 0, 0, 1], port)),
        &|_| {},
    );
}

/// The capabilities `dist/screener.service` bounds the daemon to, as
/// `setpriv` names them (`bpf,net_admin,...`).
fn unit_capabilities() -> Vec<String> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/screener.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet=");
    line.split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

/// `CapEff` of `pid` from /proc, as a bit mask.
fn effective_caps(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

/// With XDP, bounded to the unit's capability set, which must be enough
/// to load, pin and attach the gate and bind the listener. (Run as root
/// here; the unit's unprivileged `User=` start is tests/privileges.rs.)
#[test]
fn notify_protocol_with_the_gate_attached() {
    let ns = NetNs::new();
    let pins = PinDir::new("notify");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write_config(dir.path(), &ns, &pins, "skb", port);
    set(&cfg, "smtp", &format!("listen = [\"127.0.0.1:{port}\"]"));
    let caps = unit_capabilities();
    let wrap: Vec<String> = [
        "setpriv".to_owned(),
        format!("--bounding-set=-all,+{}", caps.join(",+")),
        "--".to_owned(),
    ]
    .into();
    let smtp = SocketAddr::from(([127, 0, 0, 1], port));
    let at_ready = |pid: u32| {
        // READY=1 comes only after the attach: the interface runs the
        // program already.
        let st = screener::xdp::status(&pins.0, std::slice::from_ref(&ns.host_if));
        assert!(
            st.attached,
            "READY=1 before the gate is attached: {:?}",
            st.interfaces[0].state
        );
        // And it got there with no capability beyond the unit's.
        let bits = |names: &[String]| {
            names.iter().fold(0u64, |m, n| {
                m | 1
                    << match n.as_str() {
                        "net_bind_service" => 10,
                        "net_admin" => 12,
                        "sys_admin" => 21,
                        "perfmon" => 38,
                        "bpf" => 39,
                        other => panic!("capability {other} unknown to this test"),
                    }
            })
        };
        let eff = effective_caps(pid);
        assert_eq!(eff & !bits(&caps), 0, "CapEff {eff:#x} exceeds {caps:?}");
    };
    drive(&wrap, &cfg, dir.path(), &[], smtp, &at_ready);
    // Again over the pins the first run left, as `Restart=always` does:
    // adopting the pinned gate needs nothing more.
    drive(&wrap, &cfg, dir.path(), &[], smtp, &at_ready);
}
