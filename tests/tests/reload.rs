//! SIGHUP applies every key group or names what waits for a restart: DNSBL
//! lists and resolver, listeners, import lists, XDP interfaces; `stats`
//! shows the configuration generation in force.

use std::{
    io::Read as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use integration_tests::{
    daemon::{blocked, ok, set, start, stats, write_config},
    netns::{listen, wait_for, ChildGuard, NetNs, PinDir},
    rbldnsd::Rbldnsd,
    smtp_peers::{free_port, Bot, Postfix, Upstream},
};

const SOA: &str = "$SOA 600 ns.example. hostmaster.example. 1 600 300 86400 120\n";

/// A connection that gets through does so in milliseconds; a dropped SYN
/// is retried by the kernel after a second, so one second tells them apart.
const DROPPED: Duration = Duration::from_secs(1);
const THROUGH: Duration = Duration::from_secs(5);

/// A daemon without XDP on loopback, its config file and directory.
struct Loopback {
    child: ChildGuard,
    cfg: PathBuf,
    dir: tempfile::TempDir,
}

impl Loopback {
    fn start(smtp: &[SocketAddr], extra: &str) -> Loopback {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("screener.toml");
        let listen: Vec<String> = smtp.iter().map(|a| format!("\"{a}\"")).collect();
        // The clients are loopback addresses, which are local: screen them.
        let extra = if extra.contains("[screen]\n") {
            extra.replacen("[screen]\n", "[screen]\npermit_local = false\n", 1)
        } else {
            format!("{extra}\n[screen]\npermit_local = false\n")
        };
        std::fs::write(
            &cfg,
            format!(
                "[smtp]\nlisten = [{listen}]\nhostname = \"mx.example.com\"\n\
                 [store]\npath = \"{d}/s.redb\"\n[admin]\nsocket = \"{d}/admin.sock\"\n[daemon]\nuser = \"root\"\n{extra}",
                listen = listen.join(", "),
                d = dir.path().display()
            ),
        )
        .unwrap();
        let child = integration_tests::daemon::start_no_xdp(&cfg, &dir.path().join("daemon.log"));
        Loopback { child, cfg, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Sends SIGHUP and waits until generation `n` is in force.
    #[track_caller]
    fn reload(&self, n: u64) {
        hup(&self.child);
        wait_until_generation(&self.cfg, n);
    }
}

fn hup(child: &ChildGuard) {
    let pid = i32::try_from(child.0.as_ref().expect("running").id()).unwrap();
    // SAFETY: a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
}

#[track_caller]
fn wait_until_generation(cfg: &Path, n: u64) {
    wait_for(
        &format!("configuration generation {n}"),
        Duration::from_secs(15),
        || stats(cfg)["daemon"]["config_generation"].as_u64() == Some(n),
    );
}

/// A client that waits for the whole greeting, then says EHLO and sends one
/// message; returns every reply it got.
fn deliver(from: [u8; 4], to: SocketAddr) -> String {
    let mut c = Bot::connect(from, to);
    let mut seen = c.read_until("220 ");
    if !seen.contains("220 ") {
        return seen;
    }
    // The backend's greeting line may still be arriving.
    if !seen[seen.rfind("220 ").unwrap()..].contains("\r\n") {
        seen += &c.read_until("\r\n");
    }
    for (line, want) in [
        ("EHLO client.example\r\n", "250 "),
        ("MAIL FROM:<a@client.example>\r\n", "250 "),
        ("RCPT TO:<rcpt@backend.test>\r\n", "\r\n"),
    ] {
        c.send(line.as_bytes());
        let r = c.read_until(want);
        seen += &r;
        if !r.contains(want) || r.starts_with('5') || r.starts_with('4') {
            return seen;
        }
    }
    c.send(b"DATA\r\n");
    seen += &c.read_until("354");
    c.send(b"Subject: reload\r\n\r\nhello\r\n.\r\n");
    seen += &c.read_until("250 ");
    c.send(b"QUIT\r\n");
    seen + &c.read_to_close()
}

#[test]
fn reload_applies_dnsbl_sites_and_resolver() {
    let first = Rbldnsd::start(&[(
        "bl.example:ip4set",
        &format!("{SOA}$TTL 900\n:127.0.0.2:listed\n127.0.0.2\n127.0.0.5\n"),
    )]);
    let second = Rbldnsd::start(&[(
        "bl.example:ip4set",
        &format!("{SOA}$TTL 900\n:127.0.0.2:listed\n127.0.0.2\n127.0.0.6\n"),
    )]);
    let backend = Postfix::start(Upstream::Haproxy, false);
    let smtp = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let d = Loopback::start(
        &[smtp],
        "[screen]\ngreet_wait = \"1s\"\ndnsbl_action = \"drop\"\ndnsbl_timeout = \"1s\"\n",
    );
    set(&d.cfg, "smtp", &format!("backend = \"{}\"", backend.addr));
    d.reload(1);

    // Before the lists: a listed client is not asked about.
    assert!(
        deliver([127, 0, 0, 5], smtp).contains("250 2.0.0 Ok: queued"),
        "{}",
        d.log()
    );

    // Adding the site and its resolver by reload: the listed client is
    // rejected naming the list, a clean one passes once and then is
    // remembered (the test completes instead of waiting forever).
    set(&d.cfg, "screen", "dnsbl_sites = [\"bl.example\"]");
    set(
        &d.cfg,
        "dns",
        &format!("nameservers = [\"{}\"]", first.addr),
    );
    d.reload(2);
    let listed = deliver([127, 0, 0, 5], smtp);
    assert!(
        listed.contains("521") && listed.contains("bl.example"),
        "listed client not rejected: {listed:?}\n{}",
        d.log()
    );
    let clean = deliver([127, 0, 0, 7], smtp);
    assert!(clean.contains("250 2.0.0 Ok: queued"), "{clean:?}");
    assert!(d.log().contains("PASS NEW [127.0.0.7]"), "{}", d.log());
    let again = deliver([127, 0, 0, 7], smtp);
    assert!(again.contains("250 2.0.0 Ok: queued"), "{again:?}");
    wait_for("PASS OLD", Duration::from_secs(5), || {
        d.log().contains("PASS OLD [127.0.0.7]")
    });

    // Another resolver by reload: its answers count now.
    set(
        &d.cfg,
        "dns",
        &format!("nameservers = [\"{}\"]", second.addr),
    );
    d.reload(3);
    let now_listed = deliver([127, 0, 0, 6], smtp);
    assert!(
        now_listed.contains("521") && now_listed.contains("bl.example"),
        "{now_listed:?}"
    );
    assert!(
        deliver([127, 0, 0, 8], smtp).contains("250 2.0.0 Ok: queued"),
        "a client the first resolver did not list either"
    );
    assert_eq!(
        stats(&d.cfg)["dnsbl"]["sites"]
            .as_object()
            .map(serde_json::Map::len),
        Some(1)
    );
}

#[test]
fn reload_binds_new_listeners_and_closes_removed_ones_without_dropping_clients() {
    let old = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let new = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let d = Loopback::start(&[old], "[screen]\ngreet_wait = \"30s\"\n");
    let mut waiting = Bot::connect([127, 0, 0, 2], old);
    assert!(waiting.read_until("\r\n").starts_with("220-"));

    let text = std::fs::read_to_string(&d.cfg)
        .unwrap()
        .replace(&format!("\"{old}\""), &format!("\"{new}\""));
    std::fs::write(&d.cfg, text).unwrap();
    d.reload(1);

    let mut fresh = Bot::connect([127, 0, 0, 3], new);
    assert!(fresh.read_until("\r\n").starts_with("220-"), "{}", d.log());
    assert!(
        std::net::TcpStream::connect_timeout(&old, Duration::from_secs(2)).is_err(),
        "the removed listener still accepts"
    );
    // The client accepted on the removed listener is still in its greet
    // wait: neither dropped nor answered.
    waiting
        .stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    let r = waiting.stream.read(&mut byte);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "the waiting client was dropped or answered: {r:?}"
    );
    assert_eq!(stats(&d.cfg)["smtp"]["screening"].as_u64(), Some(2));

    // An address that cannot be bound is named; the others stay.
    let text = std::fs::read_to_string(&d.cfg).unwrap().replace(
        &format!("\"{new}\""),
        &format!("\"{new}\", \"192.0.2.1:{}\"", new.port()),
    );
    std::fs::write(&d.cfg, text).unwrap();
    d.reload(2);
    assert!(
        d.log()
            .contains(&format!("smtp.listen 192.0.2.1:{}", new.port())),
        "{}",
        d.log()
    );
    let mut still = Bot::connect([127, 0, 0, 4], new);
    assert!(still.read_until("\r\n").starts_with("220-"));
}

#[test]
fn reload_starts_and_stops_import_lists_and_names_restart_keys() {
    let d = Loopback::start(&[SocketAddr::from(([127, 0, 0, 1], free_port()))], "");
    let list = d.dir.path().join("drop.txt");
    std::fs::write(&list, "192.0.2.0/24 ; SBL1\n198.51.100.0/25 ; SBL2\n").unwrap();
    std::fs::write(
        d.cfg.as_path(),
        std::fs::read_to_string(&d.cfg).unwrap()
            + &format!(
                "[import]\nlists = [{{ file = \"{}\", interval = \"1s\" }}]\n",
                list.display()
            ),
    )
    .unwrap();
    d.reload(1);
    wait_for("the list's entries", Duration::from_secs(10), || {
        let b = blocked(&d.cfg);
        b.contains(&"192.0.2.0/24".to_owned()) && b.contains(&"198.51.100.0/25".to_owned())
    });

    // Removed from the configuration: its watcher stops, its entries go.
    let text = std::fs::read_to_string(&d.cfg).unwrap();
    let text = text[..text.find("[import]").unwrap()].to_owned();
    std::fs::write(&d.cfg, &text).unwrap();
    d.reload(2);
    wait_for(
        "the list's entries removed",
        Duration::from_secs(10),
        || blocked(&d.cfg).is_empty(),
    );

    // A key that needs a restart is named, in the log and in stats.
    set(
        &d.cfg,
        "store",
        &format!("path = \"{}/other.redb\"", d.dir.path().display()),
    );
    d.reload(3);
    let pending = stats(&d.cfg)["daemon"]["config_restart_pending"].clone();
    assert_eq!(pending, serde_json::json!(["store.path"]), "{}", d.log());
    assert!(
        d.log()
            .contains("store.path changed but take effect only on restart"),
        "{}",
        d.log()
    );
}

#[test]
fn reload_attaches_and_detaches_interfaces() {
    let one = NetNs::new();
    let two = NetNs::new();
    let pins = PinDir::new(&format!("reload{}", one.n));
    let port = 2700 + u16::try_from(two.n).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &one, &pins, "skb", port);
    let daemon = start(&cfg, dir.path(), 0);
    let to = listen(SocketAddr::new(two.host_v4(), port));
    let bot = two.client_v4();
    ok(&cfg, &["block", "add", &bot.to_string()]);
    assert!(
        two.connects(bot, to, THROUGH),
        "dropped on an interface not configured"
    );

    set(
        &cfg,
        "xdp",
        &format!("interfaces = [\"{}\", \"{}\"]", one.host_if, two.host_if),
    );
    hup(&daemon);
    wait_until_generation(&cfg, 1);
    assert!(
        !two.connects(bot, to, DROPPED),
        "not dropped after the interface was added by reload"
    );
    assert!(two.connects(two.neighbour_v4(), to, THROUGH));

    set(&cfg, "xdp", &format!("interfaces = [\"{}\"]", one.host_if));
    hup(&daemon);
    wait_until_generation(&cfg, 2);
    assert!(
        two.connects(bot, to, THROUGH),
        "still dropped after the interface was removed by reload"
    );
}

/// Drain, don't abort: SIGTERM right after a reload dropped a big import
/// list from the configuration. The list's removal (store, then kernel)
/// is finished before the daemon exits, so the kernel keeps none of its
/// entries and the next start has nothing to adopt. Cut halfway, the
/// store would forget entries the kernel still holds, and the next start
/// would adopt every one of them as a block.
#[test]
fn sigterm_after_a_reload_finishes_removing_the_dropped_list() {
    const LINES: u32 = 100_000;
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("drain{}", ns.n));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &ns, &pins, "skb", 25);
    let list = dir.path().join("drop.txt");
    let mut text = String::with_capacity(LINES as usize * 24);
    for i in 0..LINES {
        text += &format!("2001:db8:{:x}:{:x}::/64\n", i >> 16, i & 0xffff);
    }
    std::fs::write(&list, text).unwrap();
    let without = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "{without}[import]\nlists = [{{ file = \"{}\", interval = \"1h\" }}]\n",
            list.display()
        ),
    )
    .unwrap();
    let log = |n: u32| {
        plain(
            &std::fs::read_to_string(dir.path().join(format!("daemon{n}.log"))).unwrap_or_default(),
        )
    };
    let mut daemon = start(&cfg, dir.path(), 0);
    wait_for("the list imported", Duration::from_secs(120), || {
        log(0).contains("imported list")
    });
    assert!(log(0).contains(&format!("added={LINES}")), "{}", log(0));

    std::fs::write(&cfg, &without).unwrap();
    hup(&daemon);
    wait_for("the reload", Duration::from_secs(15), || {
        log(0).contains("configuration reloaded")
    });
    let child = daemon.0.as_mut().expect("running");
    // SAFETY: a signal to our own child.
    assert_eq!(
        unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) },
        0
    );
    wait_for("the daemon to exit", Duration::from_secs(90), || {
        child.try_wait().unwrap().is_some()
    });
    assert!(child.try_wait().unwrap().unwrap().success(), "{}", log(0));
    assert!(
        log(0).contains(&format!("removed={LINES}")),
        "the removal did not finish before the exit:\n{}",
        log(0)
    );

    let _daemon = start(&cfg, dir.path(), 1);
    let left = blocked(&cfg);
    assert!(
        left.is_empty(),
        "{} entries of the removed list were still in the kernel: {:?}…\n{}",
        left.len(),
        &left[..left.len().min(3)],
        log(1)
    );
    assert!(
        log(1).contains("0 adopted from the kernel into the store"),
        "{}",
        log(1)
    );
}

/// `log` without its ANSI colour sequences, so structured fields read
/// `key=value`.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
