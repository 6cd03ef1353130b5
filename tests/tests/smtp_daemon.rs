//! The SMTP side of `screener run`, seen from clients in a network
//! namespace (documentation addresses, so no address is local to the host):
//! what an early talker gets under the default configuration, and that
//! failures queued right before SIGTERM all become blocks.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use integration_tests::{
    daemon::{blocked, cli, set, stats},
    netns::{screener_bin, spawn_logged, wait_for, ChildGuard, NetNs},
    smtp_peers::{free_port, Bot, Postfix, Upstream},
};

/// A daemon without XDP listening on the namespace's host address, in
/// front of `backend`, with its working directory.
struct Run {
    cfg: PathBuf,
    dir: tempfile::TempDir,
    child: ChildGuard,
    smtp: SocketAddr,
}

impl Run {
    /// Writes the configuration (defaults except the addresses, a 2 s greet
    /// wait and whatever `edit` adds), and starts the daemon listening on
    /// `host` (an address of the namespace's host side).
    #[track_caller]
    fn start(host: IpAddr, backend: SocketAddr, edit: impl FnOnce(&Path)) -> Run {
        Run::start_with(host, backend, edit, |_| {})
    }

    /// Like [`Run::start`], with `pre` applied to the daemon's command.
    #[track_caller]
    fn start_with(
        host: IpAddr,
        backend: SocketAddr,
        edit: impl FnOnce(&Path),
        pre: impl FnOnce(&mut Command),
    ) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let smtp = SocketAddr::new(host, free_port());
        let cfg = dir.path().join("screener.toml");
        std::fs::write(
            &cfg,
            format!(
                "[smtp]\nlisten = [\"{smtp}\"]\nhostname = \"mx.example.com\"\n\
                 backend = \"{backend}\"\n\
                 [screen]\ngreet_wait = \"2s\"\n\
                 [store]\npath = \"{d}/screener.redb\"\n\
                 [admin]\nsocket = \"{d}/admin.sock\"\n\
                 [daemon]\nuser = \"root\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        edit(&cfg);
        let child = launch(&cfg, dir.path(), 0, pre);
        Run {
            cfg,
            dir,
            child,
            smtp,
        }
    }

    /// The log of the `n`-th start.
    fn log(&self, n: u32) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("daemon{n}.log"))).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for a clean exit.
    #[track_caller]
    fn stop(&mut self) {
        let child = self.child.0.as_mut().expect("running");
        let pid = i32::try_from(child.id()).unwrap();
        // SAFETY: a signal to our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        wait_for("the daemon to exit", Duration::from_secs(60), || {
            child.try_wait().unwrap().is_some()
        });
        assert!(child.try_wait().unwrap().unwrap().success());
    }
}

/// Starts `screener run --no-xdp` on `cfg` (log `daemon<n>.log`), with
/// `pre` applied to the command, and waits for its admin socket.
#[track_caller]
fn launch(cfg: &Path, dir: &Path, n: u32, pre: impl FnOnce(&mut Command)) -> ChildGuard {
    let mut cmd = Command::new(screener_bin());
    cmd.arg("-c").arg(cfg).args(["run", "--no-xdp"]);
    pre(&mut cmd);
    let child = spawn_logged(&mut cmd, &dir.join(format!("daemon{n}.log")));
    wait_for("the admin socket", Duration::from_secs(20), || {
        cli(cfg, &["stats", "--json"]).0
    });
    child
}

/// A client in the namespace, from `from`.
#[track_caller]
fn bot(ns: &NetNs, from: IpAddr, to: SocketAddr) -> Bot {
    let stream = ns
        .tcp_from(from, to, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{from} cannot reach {to}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    Bot { stream }
}

/// Under the default `greet_action = "enforce"`, a client that talks before
/// its greeting gets its early EHLO answered after the `220 `, and is
/// refused at RCPT with `550 5.5.1`, logged as `NOQUEUE`.
#[test]
fn early_talker_is_answered_and_refused_at_rcpt() {
    let pf = Postfix::start(Upstream::Haproxy, false);
    let ns = NetNs::new();
    let run = Run::start(ns.host_v4(), pf.addr, |_| {});
    let mut c = bot(&ns, ns.client_v4(), run.smtp);
    c.send(b"EHLO early.example\r\n");
    let got = c.read_reply("250");
    assert!(
        got.starts_with(
            "220-mx.example.com ESMTP\r\n220 mx.example.com ESMTP\r\n250-mx.example.com\r\n"
        ),
        "{got:?}"
    );
    c.send(b"MAIL FROM:<a@example.org>\r\n");
    assert_eq!(c.read_until("\r\n"), "250 2.1.0 Ok\r\n");
    c.send(b"RCPT TO:<b@backend.test>\r\n");
    assert_eq!(c.read_until("\r\n"), "550 5.5.1 Protocol error\r\n");
    c.send(b"QUIT\r\n");
    assert_eq!(c.read_to_close(), "221 2.0.0 Bye\r\n");
    let client = ns.client_v4();
    wait_for("the NOQUEUE line", Duration::from_secs(10), || {
        run.log(0).lines().any(|l| {
            l.contains(&format!("NOQUEUE: reject: RCPT from [{client}]:"))
                && l.contains("550 5.5.1 Protocol error; from=<a@example.org>, to=<b@backend.test>, proto=ESMTP, helo=<early.example>")
        })
    });
    assert!(!pf.log().contains(&client.to_string()), "{}", pf.log());
}

/// Failures queued right before SIGTERM are not lost: the verdict task
/// finishes the queue before the daemon exits, and every bot is blocked
/// when the daemon comes back.
#[test]
fn failures_queued_before_sigterm_all_become_blocks() {
    const BOTS: u32 = 200;
    let ns = NetNs::new();
    // One address per bot, each its own verdict (a /128, no escalation).
    let bots: Vec<IpAddr> = (0..BOTS)
        .map(|i| format!("2001:db8:{}::1:{:x}", ns.n, i + 1).parse().unwrap())
        .collect();
    let mut batch = String::new();
    for a in &bots {
        writeln!(batch, "addr add {a}/64 dev {} nodad", ns.peer_if).unwrap();
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), batch).unwrap();
    integration_tests::netns::sh(&[
        "ip",
        "-n",
        &ns.name,
        "-batch",
        &file.path().display().to_string(),
    ]);
    let mut run = Run::start(ns.host_v6(), ([127, 0, 0, 1], free_port()).into(), |cfg| {
        set(cfg, "screen", "greet_wait = \"60s\"");
        set(cfg, "screen", "pre_queue_limit = 1000");
        set(cfg, "verdict", "ipv6_prefix = 128");
        set(cfg, "verdict", "escalate_v6_hosts = 0");
        set(cfg, "smtp", "shutdown_grace = \"20s\"");
    });
    let mut conns: Vec<Bot> = bots.iter().map(|&a| bot(&ns, a, run.smtp)).collect();
    for c in &mut conns {
        assert_eq!(c.read_until("\r\n"), "220-mx.example.com ESMTP\r\n");
    }
    // All at once, so the failures are still queued when SIGTERM comes.
    for c in &mut conns {
        c.send(b"EHLO bot.example\r\n");
    }
    wait_for("every pregreet counted", Duration::from_secs(20), || {
        stats(&run.cfg)["smtp"]["fails"]["pregreet"] == BOTS
    });
    run.stop();
    let log = run.log(0);
    run.child = launch(&run.cfg, run.dir.path(), 1, |_| {});
    let listed = blocked(&run.cfg);
    let missing: Vec<String> = bots
        .iter()
        .map(|a| format!("{a}/128"))
        .filter(|n| !listed.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {BOTS} bots not blocked after the restart: {missing:?}\n{log}",
        missing.len()
    );
}

/// Makes `cmd` start with the open-file limit `n`, soft and hard, as under
/// systemd's default with nothing to raise it to.
fn limit_nofile(cmd: &mut Command, n: u64) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const r) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// With 1024 descriptors (soft and hard) and 2,000 idle connections the
/// daemon stays reachable: the connections past its budget get `421 4.3.2`
/// at once, the admin socket answers, and an allowlisted client reaches
/// Postfix and delivers.
#[test]
fn descriptor_budget_keeps_the_daemon_reachable() {
    const HORDE: usize = 2000;
    integration_tests::sys::raise_nofile(16_384).expect("raise the test's own limit");
    let pf = Postfix::start(Upstream::Haproxy, false);
    let ns = NetNs::new();
    let run = Run::start_with(
        ns.host_v4(),
        pf.addr,
        |cfg| {
            set(cfg, "screen", "greet_wait = \"60s\"");
            set(cfg, "screen", "pre_queue_limit = 5000");
            set(cfg, "screen", "client_connection_count_limit = 5000");
        },
        |cmd| limit_nofile(cmd, 1024),
    );
    assert!(
        run.log(0)
            .contains("open-file limit: soft 1024 -> 1024, hard 1024"),
        "{}",
        run.log(0)
    );
    let (from, to) = (ns.client_v4(), run.smtp);
    let mut horde: Vec<std::net::TcpStream> = ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        (0..HORDE)
            .map(|i| {
                rt.block_on(async {
                    let s = tokio::net::TcpSocket::new_v4().unwrap();
                    s.bind(SocketAddr::new(from, 0)).unwrap();
                    let c = s
                        .connect(to)
                        .await
                        .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                    let c = c.into_std().unwrap();
                    c.set_nonblocking(false).unwrap();
                    c
                })
            })
            .collect()
    });
    let (mut screened, mut refused) = (0, 0);
    for (i, s) in horde.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = Bot {
            stream: s.try_clone().unwrap(),
        };
        match b.read_until("\r\n").as_str() {
            "220-mx.example.com ESMTP\r\n" => screened += 1,
            "421 4.3.2 Too many open connections, try again later\r\n" => refused += 1,
            other => panic!("connection {i} got {other:?}"),
        }
    }
    assert_eq!(screened + refused, HORDE);
    assert!(
        screened < 1024 && refused > HORDE - 1024,
        "{screened} screened"
    );
    let st = stats(&run.cfg);
    assert_eq!(st["smtp"]["screening"], screened, "{st}");
    assert_eq!(st["smtp"]["descriptors"]["refused"], refused, "{st}");

    // A known-good client still gets through to Postfix.
    let good = ns.neighbour_v4();
    let out = cli(&run.cfg, &["allow", "add", &format!("{good}/32")]);
    assert!(out.0, "{}", out.1);
    let mut c = bot(&ns, good, run.smtp);
    let greeting = c.read_reply("220");
    assert!(
        greeting.starts_with("220 backend.test ESMTP"),
        "{greeting:?}"
    );
    for (line, want) in [
        (&b"EHLO good.example\r\n"[..], "250"),
        (b"MAIL FROM:<a@example.org>\r\n", "250"),
        (b"RCPT TO:<b@backend.test>\r\n", "250"),
        (b"DATA\r\n", "354"),
        (b"Subject: t\r\n\r\nHello.\r\n.\r\n", "250"),
    ] {
        c.send(line);
        let reply = c.read_reply(want);
        assert!(
            reply.lines().last().is_some_and(|l| l.starts_with(want)),
            "{line:?}: {reply:?}"
        );
    }
    c.send(b"QUIT\r\n");
    c.read_to_close();
    pf.wait_log(&["status=sent"]);
    drop(horde);
}
