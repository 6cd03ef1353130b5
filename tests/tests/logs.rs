//! The daemon's log lines where operators' tools read them: journald's
//! native protocol under systemd, and with `log.format = "postscreen"`
//! the regular expressions of fail2ban's `postfix` filter, Logwatch's
//! postfix service and pflogsumm, run over what the daemon really wrote
//! while real clients and bots talked to it.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::unix::{fs::MetadataExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use integration_tests::{
    daemon::cli,
    netns::{screener_bin, wait_for, ChildGuard},
    rbldnsd::Rbldnsd,
    smtp_peers::{free_port, require, swaks, Bot, Postfix, Upstream},
};

const SOA: &str = "$SOA 600 ns.example. hostmaster.example. 1 600 300 86400 120\n";

/// Where tracing-journald (and every journald client) sends entries.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// The DNSBL-listed bot.
const LISTED: [u8; 4] = [127, 0, 0, 3];

/// rbldnsd, a Postfix backend and the daemon (`run --no-xdp`) with
/// `log_section` as its `[log]`, its stdout and stderr going to `log`.
struct Setup {
    _dns: Rbldnsd,
    _backend: Postfix,
    _daemon: ChildGuard,
    smtp: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn start(log_section: &str, journal_stream: bool) -> Setup {
        let dns = Rbldnsd::start(&[(
            "bl.example:ip4set",
            &format!("{SOA}$TTL 900\n:127.0.0.2:listed\n127.0.0.2\n127.0.0.3\n"),
        )]);
        let backend = Postfix::start(Upstream::Haproxy, false);
        let dir = tempfile::tempdir().unwrap();
        let smtp = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let cfg = dir.path().join("screener.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"
[smtp]
listen = ["{smtp}"]
hostname = "mx.example.com"
backend = "{backend}"

[screen]
permit_local = false
greet_wait = "2s"
access_list = ["permit 127.0.0.9/32", "reject 127.0.0.8/32"]
dnsbl_sites = ["bl.example*3"]
dnsbl_threshold = 3
dnsbl_action = "enforce"
dnsbl_timeout = "1s"
pipelining_enable = true
non_smtp_command_enable = true
bare_newline_enable = true

[dns]
nameservers = ["{dns}"]

[store]
path = "{dir}/screener.redb"

[admin]
socket = "{dir}/admin.sock"

[daemon]
user = "root"

[log]
{log_section}
"#,
                backend = backend.addr,
                dns = dns.addr,
                dir = dir.path().display(),
            ),
        )
        .unwrap();
        let log = dir.path().join("daemon.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(screener_bin());
        cmd.arg("-c")
            .arg(&cfg)
            .args(["run", "--no-xdp"])
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null());
        if journal_stream {
            // What systemd sets for a unit whose stderr is its journal
            // stream: that stream's device and inode.
            let m = file.metadata().unwrap();
            cmd.env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()));
        }
        let child = cmd
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap();
        let daemon = ChildGuard(Some(child));
        wait_for("the admin socket", Duration::from_secs(30), || {
            cli(&cfg, &["stats", "--json"]).0
        });
        Setup {
            _dns: dns,
            _backend: backend,
            _daemon: daemon,
            smtp,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A client that waits for the greeting; `Bot` with a default source.
fn greeted(from: [u8; 4], smtp: SocketAddr) -> Bot {
    let mut bot = Bot::connect(from, smtp);
    let got = bot.read_reply("220");
    assert!(got.starts_with("220"), "no greeting for {from:?}: {got:?}");
    bot
}

/// Plays every kind of client postscreen logs a decision about, each from
/// its own loopback address; returns when the daemon has said
/// DISCONNECT (or PASS) for all of them.
fn play_clients(s: &Setup, keywords: (&str, &str)) {
    let smtp = s.smtp;
    // Talks before the greeting (enforce: goes on to a 550 at RCPT).
    let mut bot = Bot::connect([127, 0, 0, 2], smtp);
    bot.send(b"EHLO pregreet.example\r\n");
    bot.read_until("250 ");
    bot.send(b"MAIL FROM:<spam@example.org>\r\n");
    bot.read_until("\r\n");
    bot.send(b"RCPT TO:<rcpt@example.net>\r\n");
    let got = bot.read_until("\r\n");
    assert!(got.starts_with("550 "), "pregreet bot: {got:?}");
    drop(bot);
    // On the DNSBL.
    let mut bot = greeted(LISTED, smtp);
    bot.send(b"EHLO listed.example\r\n");
    bot.read_reply("250");
    bot.send(b"MAIL FROM:<spam@example.org>\r\n");
    bot.read_until("\r\n");
    bot.send(b"RCPT TO:<rcpt@example.net>\r\n");
    let got = bot.read_until("\r\n");
    assert!(
        got.starts_with(
            "550 5.7.1 Service unavailable; client [127.0.0.3] blocked using bl.example"
        ),
        "listed bot: {got:?}\n{}",
        s.log()
    );
    drop(bot);
    // Hangs up before the greeting.
    drop(Bot::connect([127, 0, 0, 4], smtp));
    // Pipelines without PIPELINING.
    let mut bot = greeted([127, 0, 0, 5], smtp);
    bot.send(
        b"EHLO pipe.example\r\nMAIL FROM:<spam@example.org>\r\nRCPT TO:<rcpt@example.net>\r\n",
    );
    bot.read_until("550 ");
    drop(bot);
    // Speaks HTTP.
    let mut bot = greeted([127, 0, 0, 6], smtp);
    bot.send(b"CONNECT 192.0.2.1:25 HTTP/1.0\r\n");
    bot.read_to_close();
    // Ends a line with a bare newline.
    let mut bot = greeted([127, 0, 0, 7], smtp);
    bot.send(b"EHLO bare.example\n");
    bot.read_until("\r\n");
    bot.send(b"QUIT\r\n");
    bot.read_to_close();
    // On the access list's reject side.
    let mut bot = Bot::connect([127, 0, 0, 8], smtp);
    bot.read_to_close();
    // Hangs up after EHLO.
    let mut bot = greeted([127, 0, 0, 10], smtp);
    bot.send(b"EHLO gone.example\r\n");
    bot.read_reply("250");
    drop(bot);
    // A real client, twice: deep tests pass the first time (450 at RCPT,
    // as postscreen answers), the second time it is PASS OLD and handed
    // to Postfix. swaks binds its source with --local-interface.
    for _ in 0..2 {
        swaks(&[
            "--server",
            &smtp.to_string(),
            "--local-interface",
            "127.0.0.11",
            "--ehlo",
            "good.example",
            "--from",
            "alice@example.org",
            "--to",
            "bob@example.net",
            "--timeout",
            "30",
        ]);
    }
    // On the access list's permit side.
    swaks(&[
        "--server",
        &smtp.to_string(),
        "--local-interface",
        "127.0.0.9",
        "--ehlo",
        "friend.example",
        "--from",
        "carol@example.org",
        "--to",
        "bob@example.net",
    ]);
    let want = [
        "PREGREET ",
        "DNSBL rank 3 for [127.0.0.3]:",
        "HANGUP after ",
        " in tests before SMTP handshake",
        " in tests after SMTP handshake",
        "COMMAND PIPELINING from [127.0.0.5]:",
        "NON-SMTP COMMAND from [127.0.0.6]:",
        "BARE NEWLINE from [127.0.0.7]:",
        " after EHLO bare.example",
        "PASS NEW [127.0.0.11]:",
        "PASS OLD [127.0.0.11]:",
        "listed by domain bl.example as 127.0.0.2",
    ];
    let (allow, deny) = keywords;
    let allow = format!("{allow} [127.0.0.9]:");
    let deny = format!("{deny} [127.0.0.8]:");
    wait_for("every decision line", Duration::from_secs(60), || {
        let log = s.log();
        want.iter().all(|w| log.contains(w)) && log.contains(&allow) && log.contains(&deny)
    });
}

/// The daemon's lines, as a mail.log: only what it wrote in syslog shape.
fn mail_log(s: &Setup, dir: &Path) -> String {
    let text = s.log();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("]: ")).collect();
    std::fs::write(dir.join("mail.log"), lines.join("\n") + "\n").unwrap();
    lines.join("\n")
}

/// `fail2ban-regex` with the postfix filter in `mode`: the addresses
/// it would ban, with their number of failures.
fn fail2ban(log: &Path, mode: &str) -> BTreeMap<String, u32> {
    let bin = require("fail2ban-regex", "fail2ban");
    let out = Command::new(bin)
        .args(["--out", "ip"])
        .arg(log)
        .arg(format!("/etc/fail2ban/filter.d/postfix.conf[mode={mode}]"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fail2ban-regex failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ips = BTreeMap::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        *ips.entry(l.trim().to_owned()).or_insert(0) += 1;
    }
    ips
}

#[test]
fn postscreen_lines_are_read_by_fail2ban_logwatch_and_pflogsumm() {
    // Logwatch 7.7 knows postscreen's pre-3.6 words for the lists.
    let s = Setup::start("format = \"postscreen\"\nrespectful_logging = false", false);
    play_clients(&s, ("WHITELISTED", "BLACKLISTED"));
    let dir = tempfile::tempdir().unwrap();
    let text = mail_log(&s, dir.path());
    let log = dir.path().join("mail.log");

    // Exactly postscreen's wording, and nothing after it.
    for (prefix, rest_ok) in [
        ("CONNECT from [127.0.0.3]:", " to [127.0.0.1]:"),
        ("DNSBL rank 3 for [127.0.0.3]:", ""),
        ("PASS NEW [127.0.0.11]:", ""),
        ("PASS OLD [127.0.0.11]:", ""),
        ("WHITELISTED [127.0.0.9]:", ""),
        ("BLACKLISTED [127.0.0.8]:", ""),
        ("DISCONNECT [127.0.0.3]:", ""),
    ] {
        let line = text
            .lines()
            .find_map(|l| {
                l.split_once(": ")
                    .map(|(_, t)| t)
                    .filter(|t| t.starts_with(prefix))
            })
            .unwrap_or_else(|| panic!("no {prefix:?} line:\n{text}"));
        let tail = &line[prefix.len()..];
        let port_end = tail
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(tail.len());
        assert!(port_end > 0, "{line:?}");
        let after = &tail[port_end..];
        if rest_ok.is_empty() {
            assert_eq!(after, "", "text after the client in {line:?}");
        } else {
            assert!(after.starts_with(rest_ok), "{line:?}");
        }
    }
    let reject = text
        .lines()
        .find(|l| l.contains("NOQUEUE: reject: RCPT from [127.0.0.3]:"))
        .unwrap_or_else(|| panic!("no RCPT reject for the listed bot:\n{text}"));
    assert!(
        reject.contains(": 550 5.7.1 Service unavailable; client [127.0.0.3] blocked using bl.example; from=<spam@example.org>, to=<rcpt@example.net>, proto=ESMTP, helo=<listed.example>"),
        "{reject}"
    );
    assert!(
        text.contains("postfix/dnsblog[")
            && text.contains("]: addr 127.0.0.3 listed by domain bl.example as 127.0.0.2"),
        "{text}"
    );

    // fail2ban: ddos mode bans the pregreet bot and both hang-ups;
    // aggressive adds the listed bot's RCPT reject. Nobody else.
    let ddos = fail2ban(&log, "ddos");
    for ip in ["127.0.0.2", "127.0.0.4", "127.0.0.10"] {
        assert!(ddos.contains_key(ip), "ddos misses {ip}: {ddos:?}\n{text}");
    }
    let aggressive = fail2ban(&log, "aggressive");
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.10"] {
        assert!(
            aggressive.contains_key(ip),
            "aggressive misses {ip}: {aggressive:?}\n{text}"
        );
    }
    for good in ["127.0.0.9", "127.0.0.11"] {
        assert!(
            !aggressive.contains_key(good),
            "{good} banned: {aggressive:?}"
        );
    }

    // Logwatch's postfix service: every postscreen and dnsblog line
    // counted, none unmatched.
    let lw = require("logwatch", "logwatch");
    let out = Command::new(lw)
        .args(["--service", "postfix", "--range", "all", "--detail", "high"])
        .args(["--output", "stdout", "--logdir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "logwatch: {report}");
    assert!(!report.contains("Unmatched Entries"), "{report}\n{text}");
    for category in [
        "pregreet",
        "hangup",
        "dnsbl",
        "5xx reject",
        "command pipelining",
        "non-smtp command",
        "bare newline",
        "pass new",
        "pass old",
        "whitelisted",
        "blacklisted",
        "connect",
        "disconnect",
        "bl.example",
    ] {
        assert!(
            report.lines().any(|l| l
                .trim_start()
                .split_once("   ")
                .is_some_and(|(_, c)| c.trim() == category)),
            "logwatch has no {category:?}:\n{report}"
        );
    }

    // pflogsumm counts postscreen's RCPT rejects by list and client.
    let pf = require("pflogsumm", "pflogsumm");
    let out = Command::new(pf).arg(&log).output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    let detail = summary
        .split("message reject detail")
        .nth(1)
        .unwrap_or_else(|| panic!("no reject detail:\n{summary}"));
    assert!(
        detail.contains("blocked using bl.example") && detail.contains("127.0.0.3"),
        "{summary}"
    );
}

/// Every entry received so far, in arrival order.
type Entries = std::sync::Arc<std::sync::Mutex<Vec<BTreeMap<String, String>>>>;

/// A datagram socket at journald's address, for as long as the test
/// runs, read at once by a thread as journald reads it (a full socket
/// queue, ten datagrams by default, would stall the daemon's logging).
/// Made only where no journald listens; removed on drop.
struct Journal {
    /// What the reader thread has received.
    entries: Entries,
    /// Tells the reader to stop.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The reader.
    reader: Option<std::thread::JoinHandle<()>>,
    /// The directories this test made for the socket, deepest first.
    made_dirs: Vec<PathBuf>,
}

impl Journal {
    fn bind() -> Option<Journal> {
        let path = Path::new(JOURNAL_SOCKET);
        if path.exists() {
            eprintln!("skipped: {JOURNAL_SOCKET} exists (a real journald listens there)");
            return None;
        }
        let mut made_dirs = Vec::new();
        let mut dir = path.parent();
        while let Some(d) = dir.filter(|d| !d.exists()) {
            made_dirs.push(d.to_owned());
            dir = d.parent();
        }
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let sock = UnixDatagram::bind(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let entries = Entries::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (entries, stop) = (entries.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(n) = sock.recv(&mut buf) {
                        if n > 0 {
                            entries.lock().unwrap().push(parse_entry(&buf[..n]));
                        }
                    }
                }
            })
        };
        Some(Journal {
            entries,
            stop,
            reader: Some(reader),
            made_dirs,
        })
    }

    /// Waits until an entry satisfies `done`; panics naming `what` when
    /// `deadline` passes first. Returns that entry.
    #[track_caller]
    fn until(
        &self,
        what: &str,
        deadline: Duration,
        done: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> BTreeMap<String, String> {
        let mut found = None;
        wait_for(what, deadline, || {
            found = self
                .entries
                .lock()
                .unwrap()
                .iter()
                .find(|e| done(e))
                .cloned();
            found.is_some()
        });
        found.unwrap()
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let _ = std::fs::remove_file(JOURNAL_SOCKET);
        for d in &self.made_dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// One entry of journald's native protocol: `KEY=value\n`, or `KEY\n`,
/// a little-endian 64-bit length, the value and `\n`.
fn parse_entry(mut b: &[u8]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    while !b.is_empty() {
        let nl = b.iter().position(|&c| c == b'\n').unwrap_or(b.len());
        let line = &b[..nl];
        if let Some(eq) = line.iter().position(|&c| c == b'=') {
            out.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            b = &b[(nl + 1).min(b.len())..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &b[nl + 1..];
            let len = usize::try_from(u64::from_le_bytes(rest[..8].try_into().unwrap())).unwrap();
            out.insert(key, String::from_utf8_lossy(&rest[8..8 + len]).into_owned());
            b = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    out
}

#[test]
fn under_systemd_entries_go_to_journald_with_the_mail_facility() {
    let Some(journal) = Journal::bind() else {
        return;
    };
    let s = Setup::start("format = \"postscreen\"", true);
    let ident = |e: &BTreeMap<String, String>| e.get("SYSLOG_IDENTIFIER").cloned();
    // The daemon's own start-up lines come first, under its own name.
    journal.until("a daemon entry", Duration::from_secs(30), |e| {
        ident(e).as_deref() == Some("screener")
    });
    let mut bot = greeted(LISTED, s.smtp);
    let port = bot.stream.local_addr().unwrap().port();
    bot.send(b"QUIT\r\n");
    bot.read_to_close();
    let connect = format!(
        "CONNECT from [127.0.0.3]:{port} to [127.0.0.1]:{}",
        s.smtp.port()
    );
    let listed = "addr 127.0.0.3 listed by domain bl.example as 127.0.0.2";
    let c = journal.until("the CONNECT entry", Duration::from_secs(30), |e| {
        e.get("MESSAGE") == Some(&connect)
    });
    assert_eq!(c["SYSLOG_IDENTIFIER"], "postfix/postscreen", "{c:?}");
    assert_eq!(c["SYSLOG_FACILITY"], "2", "{c:?}");
    // info is syslog's 5 (notice), as tracing-journald maps it.
    assert_eq!(c["PRIORITY"], "5", "{c:?}");
    // Native fields beside the text.
    assert_eq!(c["F_CLIENT"], format!("[127.0.0.3]:{port}"), "{c:?}");
    let d = journal.until("the dnsblog entry", Duration::from_secs(30), |e| {
        e.get("MESSAGE").map(String::as_str) == Some(listed)
    });
    assert_eq!(d["SYSLOG_IDENTIFIER"], "postfix/dnsblog", "{d:?}");
    assert_eq!(d["SYSLOG_FACILITY"], "2", "{d:?}");
    // Every entry carries the facility, a priority and an identifier.
    for e in journal.entries.lock().unwrap().iter() {
        assert_eq!(
            e.get("SYSLOG_FACILITY").map(String::as_str),
            Some("2"),
            "{e:?}"
        );
        assert!(
            e.contains_key("PRIORITY") && e.contains_key("SYSLOG_IDENTIFIER"),
            "{e:?}"
        );
    }
    // Nothing of it went to stderr.
    let stderr = s.log();
    assert!(!stderr.contains("CONNECT from"), "{stderr}");
}
