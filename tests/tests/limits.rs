//! The open-file limit under a flood of idle clients: with systemd's
//! default of 1,024 descriptors and 2,000 idle connections, the daemon
//! refuses the excess with `421` instead of running out, the admin socket
//! answers, and a known-good client is still handed to the backend.

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt as _,
    path::Path,
    process::Command,
    time::Duration,
};

use integration_tests::{
    daemon::{cli, ok, stats},
    netns::{screener_bin, spawn_logged, wait_for},
    smtp_peers::{free_port, Bot, Postfix, Upstream},
    sys::raise_nofile,
};
use tokio::io::AsyncReadExt as _;

const IDLE: usize = 2_000;
const LIMIT: u64 = 1_024;

/// Opens `n` connections from 50 loopback sources (fewer than
/// `client_connection_count_limit` each) and reads what each is told
/// first: the `220-` teaser of a client being screened, or a `421`.
fn flood(to: SocketAddr, n: usize) -> (Vec<tokio::net::TcpStream>, usize, usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut open = Vec::new();
        let (mut teased, mut refused) = (0, 0);
        for i in 0..n {
            let from = Ipv4Addr::new(127, 0, 1, u8::try_from(1 + i % 50).unwrap());
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::new(from.into(), 0)).unwrap();
            let mut c = s.connect(to).await.unwrap();
            let mut first = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut first))
                .await
                .expect("every client is told something at once")
                .expect("read the first reply");
            match &first {
                b"220-" => teased += 1,
                b"421 " => refused += 1,
                other => panic!("unexpected first reply {other:?}"),
            }
            open.push(c);
        }
        (open, teased, refused)
    })
}

fn write_config(dir: &Path, smtp: SocketAddr, backend: SocketAddr) -> std::path::PathBuf {
    let cfg = dir.join("screener.toml");
    std::fs::write(
        &cfg,
        format!(
            "[smtp]\nlisten = [\"{smtp}\"]\nhostname = \"mx.example.com\"\nbackend = \"{backend}\"\n\
             [screen]\ngreet_wait = \"60s\"\npre_queue_limit = 5000\npermit_local = false\n\
             [store]\npath = \"{d}/s.redb\"\n[admin]\nsocket = \"{d}/admin.sock\"\n",
            d = dir.display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn idle_flood_under_1024_descriptors_is_refused_before_the_daemon_runs_out() {
    raise_nofile(8 * IDLE as u64).unwrap();
    let backend = Postfix::start(Upstream::Haproxy, false);
    let dir = tempfile::tempdir().unwrap();
    let smtp = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cfg = write_config(dir.path(), smtp, backend.addr);
    let mut cmd = Command::new(screener_bin());
    cmd.arg("-c").arg(&cfg).args(["run", "--no-xdp"]);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            let r = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const r) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let log = dir.path().join("daemon.log");
    let _daemon = spawn_logged(&mut cmd, &log);
    wait_for("the admin socket", Duration::from_secs(20), || {
        cli(&cfg, &["stats", "--json"]).0
    });
    let budget = stats(&cfg)["smtp"]["client_budget"].as_u64().unwrap();
    assert!(
        budget > 0 && budget < LIMIT,
        "budget {budget} under a limit of {LIMIT}"
    );

    let (idle, teased, refused) = flood(smtp, IDLE);
    assert_eq!(teased as u64, budget, "clients screened");
    assert_eq!(refused, IDLE - teased, "clients refused");

    // The admin socket still answers, with the refusals counted.
    let st = stats(&cfg);
    assert_eq!(
        st["smtp"]["refused_descriptors"].as_u64(),
        Some(refused as u64),
        "{st}"
    );
    assert_eq!(st["smtp"]["screening"].as_u64(), Some(budget), "{st}");

    // A known-good client is handed to the backend and delivers.
    ok(&cfg, &["allow", "add", "127.0.0.99"]);
    let mut good = Bot::connect([127, 0, 0, 99], smtp);
    let greeting = good.read_until("\r\n");
    assert!(
        greeting.starts_with("220 ") && greeting.contains("Postfix"),
        "the allowlisted client got {greeting:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    good.send(b"EHLO good.example\r\n");
    assert!(good.read_until("250 ").contains("250 "));
    good.send(b"MAIL FROM:<a@good.example>\r\nRCPT TO:<rcpt@backend.test>\r\nDATA\r\n");
    assert!(good.read_until("354").contains("354"));
    good.send(b"Subject: limits\r\n\r\nhi\r\n.\r\n");
    let queued = good.read_until("queued");
    assert!(queued.contains("250 2.0.0 Ok: queued"), "{queued:?}");

    // A new unknown client is told 421 at once, not left hanging.
    let mut late = Bot::connect([127, 0, 0, 98], smtp);
    let reply = late.read_until("\r\n");
    assert!(reply.starts_with("421 4.3.2"), "{reply:?}");
    drop(idle);
}
