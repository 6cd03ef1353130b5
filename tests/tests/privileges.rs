//! The daemon without root: after its privileged start it runs as
//! `daemon.user` with `CAP_BPF`, `CAP_PERFMON`, `CAP_NET_ADMIN` and
//! `CAP_NET_BIND_SERVICE` only, in every thread, and the whole verdict path
//! still works (a pregreeting bot is blocked in the kernel and its next SYN
//! dropped; the admin commands change the kernel maps; the watchdog
//! re-attaches; a reload loads a new program). Started two ways: as a
//! non-root user holding only those capabilities (as systemd's `User=` with
//! `AmbientCapabilities=` does), and as root naming the user.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    process::Command,
    time::Duration,
};

use integration_tests::{
    daemon::{blocked, set, write_config, Daemon},
    netns::{screener_bin, sh, spawn_logged, wait_for, NetNs, PinDir},
};

/// Capability numbers as in linux/capability.h.
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What the daemon keeps after start.
const KEPT: u64 = 1 << CAP_NET_BIND_SERVICE | 1 << CAP_NET_ADMIN | 1 << CAP_PERFMON | 1 << CAP_BPF;

/// The same set as `setpriv` names it.
const KEPT_NAMES: &str = "+net_bind_service,+net_admin,+perfmon,+bpf";

const DROPPED: Duration = Duration::from_secs(1);

/// A system user (with its own group) and an admin group, created for the
/// test and removed on drop.
struct Accounts {
    /// The daemon's account (and its primary group's name).
    user: String,
    /// Its uid.
    uid: u32,
    /// Its primary gid.
    gid: u32,
    /// The admin socket's group.
    admin: String,
    /// Its gid.
    admin_gid: u32,
}

impl Accounts {
    fn new(tag: &str) -> Accounts {
        let id = std::process::id() % 100_000;
        let user = format!("scrp{tag}{id}");
        let admin = format!("scra{tag}{id}");
        let mut a = Accounts {
            user: user.clone(),
            uid: 0,
            gid: 0,
            admin: admin.clone(),
            admin_gid: 0,
        };
        sh(&[
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            &user,
        ]);
        sh(&["groupadd", "--system", &admin]);
        let num = |args: &[&str]| -> u32 { sh(args).trim().parse().unwrap() };
        a.uid = num(&["id", "-u", &user]);
        a.gid = num(&["id", "-g", &user]);
        a.admin_gid = sh(&["getent", "group", &admin])
            .split(':')
            .nth(2)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        a
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for cmd in [
            vec!["userdel", self.user.as_str()],
            vec!["groupdel", self.user.as_str()],
            vec!["groupdel", self.admin.as_str()],
        ] {
            let _ = Command::new(cmd[0]).args(&cmd[1..]).output();
        }
    }
}

/// Runs `screener -c cfg ARGS` as `nobody`, with `groups` as its only
/// supplementary groups: (success, output).
fn cli_as_nobody(cfg: &Path, groups: Option<u32>, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=nobody", "--regid=nogroup"]);
    match groups {
        Some(g) => cmd.arg(format!("--groups={g}")),
        None => cmd.arg("--clear-groups"),
    };
    let out = cmd
        .arg("--")
        .arg(screener_bin())
        .arg("-c")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Runs `screener -c cfg ARGS` as root, panicking when it fails.
#[track_caller]
fn as_root(cfg: &Path, args: &[&str]) -> String {
    let (ok, out) = integration_tests::daemon::cli(cfg, args);
    assert!(ok, "screener {args:?} as root: {out}");
    out
}

/// Every thread of `pid`: its uids and capability sets, as
/// `(tid, [uids], CapInh, CapPrm, CapEff, CapBnd, CapAmb)`.
fn threads(pid: u32) -> Vec<(String, Vec<u32>, [u64; 5])> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap();
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("{name} missing"))
                .trim()
                .to_owned()
        };
        let uids = field("Uid:")
            .split_whitespace()
            .map(|u| u.parse().unwrap())
            .collect();
        let caps = ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"]
            .map(|n| u64::from_str_radix(&field(n), 16).unwrap());
        out.push((t.file_name().to_string_lossy().into_owned(), uids, caps));
    }
    out
}

/// Every thread runs as `uid` with exactly the kept capabilities
/// effective and permitted, none inheritable or ambient, and a bounding
/// set holding nothing else.
#[track_caller]
fn assert_dropped(pid: u32, uid: u32) {
    let threads = threads(pid);
    assert!(threads.len() > 1, "the runtime's threads are there too");
    for (tid, uids, [inh, prm, eff, bnd, amb]) in threads {
        assert!(
            uids.iter().all(|u| *u == uid),
            "thread {tid}: uids {uids:?}"
        );
        assert_eq!(eff, KEPT, "thread {tid}: CapEff {eff:#x}");
        assert_eq!(prm, KEPT, "thread {tid}: CapPrm {prm:#x}");
        assert_eq!(inh, 0, "thread {tid}: CapInh {inh:#x}");
        assert_eq!(amb, 0, "thread {tid}: CapAmb {amb:#x}");
        assert_eq!(bnd & !KEPT, 0, "thread {tid}: CapBnd {bnd:#x}");
    }
}

/// A configuration for the test daemon: XDP on `ns`'s host side, the SMTP
/// listener there with a 1 s greet wait and pregreet dropped, the store in
/// `store` and the admin socket in `socket` (directories), running as
/// `accounts.user` with admin group `accounts.admin`.
fn config(
    dir: &Path,
    (store, socket): (&Path, &Path),
    ns: &NetNs,
    pins: &PinDir,
    accounts: &Accounts,
) -> (std::path::PathBuf, u16) {
    let port = 2700 + u16::try_from(ns.n).unwrap();
    let cfg = write_config(dir, ns, pins, "skb", port);
    set(
        &cfg,
        "smtp",
        &format!("listen = [\"{}\"]", SocketAddr::new(ns.host_v4(), port)),
    );
    set(&cfg, "smtp", "backend = \"127.0.0.1:9\"");
    set(&cfg, "screen", "greet_wait = \"1s\"");
    set(&cfg, "screen", "greet_action = \"drop\"");
    set(
        &cfg,
        "store",
        &format!("path = \"{}/s.redb\"", store.display()),
    );
    set(
        &cfg,
        "admin",
        &format!("socket = \"{}/admin.sock\"", socket.display()),
    );
    set(&cfg, "daemon", &format!("user = \"{}\"", accounts.user));
    set(
        &cfg,
        "daemon",
        &format!("admin_group = \"{}\"", accounts.admin),
    );
    // The daemon (and `nobody` running the CLI) read the file and cross
    // the directory; nobody writes there.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    (cfg, port)
}

/// Starts `cmd` (the daemon) logging to `dir/daemon0.log`, waits for its
/// SMTP listener and for the privilege drop.
fn start(cmd: &mut Command, cfg: &Path, dir: tempfile::TempDir) -> Daemon {
    let child = spawn_logged(cmd, &dir.path().join("daemon0.log"));
    let d = Daemon {
        child,
        cfg: cfg.to_owned(),
        dir,
    };
    wait_for(
        "the privilege drop and the SMTP listener",
        Duration::from_secs(30),
        || {
            let log = d.log(0);
            // The daemon's fatal error line (tracing's targets read
            // `screener::...`).
            assert!(!log.contains("screener: "), "{log}");
            log.contains("privileges dropped") && log.contains("smtp listening on")
        },
    );
    d
}

/// The test's directory, holding the configuration (and here the store).
fn dir_of(d: &Daemon) -> &Path {
    d.dir.path()
}

/// Connects from `from`, talks before the greeting ends, returns the reply.
fn pregreet(ns: &NetNs, from: IpAddr, to: SocketAddr) -> String {
    let mut s = ns
        .tcp_from(from, to, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{from} could not connect to {to}"));
    s.write_all(b"EHLO bot.example\r\n").unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply
}

/// The verdict path as the dropped daemon runs it: a pregreeting bot is
/// blocked and its next SYN dropped at the NIC; `block add` / `block del`
/// through the admin socket change what the kernel drops, from root and
/// from a member of the admin group; anyone else is refused at the socket.
fn verdict_path(ns: &NetNs, d: &Daemon, port: u16, accounts: &Accounts) {
    let to = SocketAddr::new(ns.host_v4(), port);
    let bot = ns.client_v4();
    let reply = pregreet(ns, bot, to);
    assert!(reply.contains("521"), "pregreet not rejected: {reply:?}");
    wait_for("BLOCK in the log", Duration::from_secs(10), || {
        d.log(0)
            .contains(&format!("BLOCK {bot}/32 reason=pregreet"))
    });
    assert!(
        !ns.connects(bot, to, DROPPED),
        "the blocked bot got through"
    );

    // Root and a member of the admin group reach the socket; nobody else.
    let neighbour = ns.neighbour_v4();
    assert!(ns.connects(neighbour, to, Duration::from_secs(5)));
    let (ok, out) = cli_as_nobody(&d.cfg, None, &["block", "add", &neighbour.to_string()]);
    assert!(!ok, "a non-member changed the blocks: {out}");
    assert!(out.contains("Permission denied"), "{out}");
    let (ok, out) = cli_as_nobody(
        &d.cfg,
        Some(accounts.admin_gid),
        &["block", "add", &neighbour.to_string()],
    );
    assert!(ok, "a member of the admin group: {out}");
    assert!(
        !ns.connects(neighbour, to, DROPPED),
        "the member's block did not reach the kernel"
    );
    as_root(&d.cfg, &["block", "del", &neighbour.to_string()]);
    assert!(
        ns.connects(neighbour, to, Duration::from_secs(5)),
        "root's unblock did not reach the kernel"
    );
    as_root(&d.cfg, &["block", "add", &neighbour.to_string()]);
    assert!(!ns.connects(neighbour, to, DROPPED));
    let (ok, out) = cli_as_nobody(
        &d.cfg,
        Some(accounts.admin_gid),
        &["block", "del", &neighbour.to_string()],
    );
    assert!(ok, "{out}");
    assert!(ns.connects(neighbour, to, Duration::from_secs(5)));
    assert_eq!(blocked(&d.cfg), vec![format!("{bot}/32")]);
}

#[test]
fn started_unprivileged_with_only_the_kept_capabilities() {
    let accounts = Accounts::new("u");
    let ns = NetNs::new();
    let pins = PinDir::new("privu");
    let dir = tempfile::tempdir().unwrap();
    // What the package's tmpfiles.d and StateDirectory= prepare: the
    // daemon's directories, owned by its account.
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(accounts.uid), Some(accounts.gid)).unwrap();
    std::fs::create_dir(&pins.0).unwrap();
    std::os::unix::fs::chown(&pins.0, Some(accounts.uid), Some(accounts.gid)).unwrap();
    let (cfg, port) = config(dir.path(), (&state, &state), &ns, &pins, &accounts);

    // As systemd's User= with AmbientCapabilities= and
    // SupplementaryGroups= the admin group (to give the socket to it).
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={}", accounts.uid))
        .arg(format!("--regid={}", accounts.gid))
        .arg(format!("--groups={}", accounts.admin_gid))
        .arg(format!("--inh-caps=-all,{KEPT_NAMES}"))
        .arg(format!("--ambient-caps=-all,{KEPT_NAMES}"))
        .arg(format!("--bounding-set=-all,{KEPT_NAMES}"))
        .arg("--")
        .arg(screener_bin())
        .arg("-c")
        .arg(&cfg)
        .arg("run");
    let d = start(&mut cmd, &cfg, dir);
    let pid = d.child.0.as_ref().unwrap().id();
    assert_dropped(pid, accounts.uid);
    let sock = std::fs::metadata(state.join("admin.sock")).unwrap();
    assert_eq!(sock.gid(), accounts.admin_gid);
    assert_eq!(sock.mode() & 0o777, 0o660);

    verdict_path(&ns, &d, port, &accounts);

    // A reload that loads a new program instance (xdp.log_level) works
    // with what was kept, and the gate still drops.
    set(&cfg, "xdp", "log_level = \"info\"");
    Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    wait_for("the reload", Duration::from_secs(30), || {
        d.log(0).contains("configuration reloaded")
    });
    assert!(!d.log(0).contains("ERROR"), "{}", d.log(0));
    let to = SocketAddr::new(ns.host_v4(), port);
    assert!(!ns.connects(ns.client_v4(), to, DROPPED));
    assert_dropped(pid, accounts.uid);
}

#[test]
fn started_as_root_ends_as_the_user_with_the_kept_capabilities() {
    let accounts = Accounts::new("r");
    let ns = NetNs::new();
    let pins = PinDir::new("privr");
    let dir = tempfile::tempdir().unwrap();
    // The store in a directory only root may write (handed over: the
    // file, not the directory, which holds other things); the socket's
    // directory is created by the start.
    let state = dir.path().join("run");
    let (cfg, port) = config(dir.path(), (dir.path(), &state), &ns, &pins, &accounts);
    let mut cmd = Command::new(screener_bin());
    cmd.arg("-c").arg(&cfg).arg("run");
    let d = start(&mut cmd, &cfg, dir);
    let pid = d.child.0.as_ref().unwrap().id();
    assert_dropped(pid, accounts.uid);
    let bnd = threads(pid)[0].2[3];
    assert_eq!(bnd, KEPT, "root may cut the bounding set: CapBnd {bnd:#x}");

    // The directory start created for the socket: the user's, crossed by
    // the admin group; the socket 0660 to that group.
    let meta = |p: &Path| std::fs::metadata(p).unwrap();
    let st = meta(&state);
    assert_eq!(
        (st.uid(), st.gid(), st.mode() & 0o777),
        (accounts.uid, accounts.admin_gid, 0o710)
    );
    let sock = meta(&state.join("admin.sock"));
    assert_eq!(
        (sock.uid(), sock.gid(), sock.mode() & 0o777),
        (accounts.uid, accounts.admin_gid, 0o660)
    );
    assert_eq!(meta(&dir_of(&d).join("s.redb")).uid(), accounts.uid);
    assert_eq!(
        meta(dir_of(&d)).uid(),
        0,
        "a shared directory is not handed over"
    );
    for e in std::fs::read_dir(&pins.0).unwrap() {
        let e = e.unwrap();
        assert_eq!(e.metadata().unwrap().uid(), accounts.uid, "{:?}", e.path());
    }

    verdict_path(&ns, &d, port, &accounts);

    // The watchdog re-attaches to an interface re-created under the
    // daemon, and the blocks hold again.
    ns.replug();
    wait_for("the re-attach", Duration::from_secs(20), || {
        d.log(0).contains("XDP re-attached")
    });
    let to = SocketAddr::new(ns.host_v4(), port);
    assert!(!ns.connects(ns.client_v4(), to, DROPPED), "{}", d.log(0));
    assert!(ns.connects(ns.neighbour_v4(), to, Duration::from_secs(5)));
}

#[test]
fn a_missing_user_is_an_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("screener.toml");
    let d = dir.path().display();
    std::fs::write(
        &cfg,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[store]\npath = \"{d}/s.redb\"\n\
             [admin]\nsocket = \"{d}/admin.sock\"\n[daemon]\nuser = \"no-such-user-scr\"\n"
        ),
    )
    .unwrap();
    for args in [&["config", "check"][..], &["run", "--no-xdp"]] {
        let out = Command::new(screener_bin())
            .arg("-c")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {text}");
        assert!(
            text.contains("daemon.user = \"no-such-user-scr\": no such user"),
            "{args:?}: {text}"
        );
    }
    // The daemon stopped before opening anything.
    assert!(!dir.path().join("s.redb").exists());
    assert!(!dir.path().join("admin.sock").exists());
}
