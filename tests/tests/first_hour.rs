//! The first hour with the screener: `cargo xtask run`'s demonstration
//! delivers a test mail through the daemon to a private Postfix, admin
//! commands find the daemon from `SCREENER_CONFIG`, relative paths in a
//! configuration follow the file, and `config set` takes a port list.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use integration_tests::{
    daemon::cli,
    netns::{screener_bin, spawn_logged, wait_for, ChildGuard, NetNs, PinDir},
    smtp_peers::require,
};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `screener ARGS` run from `cwd` with `SCREENER_CONFIG` set to `env`
/// (or unset) and no `-c`.
fn screener_in(cwd: &Path, env: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new(screener_bin());
    c.current_dir(cwd).args(args).env_remove("SCREENER_CONFIG");
    if let Some(cfg) = env {
        c.env("SCREENER_CONFIG", cfg);
    }
    c.output().expect("run screener")
}

/// A daemon (`run --no-xdp`) on `conf/screener.toml` under `root`, whose
/// store and admin socket are given relative to the file, started from
/// `root` so that a path taken relative to the working directory would
/// land elsewhere.
fn relative_daemon(root: &Path) -> (PathBuf, ChildGuard) {
    let conf = root.join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("screener.toml"),
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"mx.example.com\"\n\
         [store]\npath = \"var/screener.redb\"\n\
         [admin]\nsocket = \"./var/admin.sock\"\n\
         [daemon]\nuser = \"root\"\n",
    )
    .unwrap();
    let child = spawn_logged(
        Command::new(screener_bin()).current_dir(root).args([
            "-c",
            "conf/screener.toml",
            "run",
            "--no-xdp",
        ]),
        &root.join("daemon.log"),
    );
    let cfg = conf.join("screener.toml");
    wait_for("the admin socket", Duration::from_secs(20), || {
        cli(&cfg, &["stats", "--json"]).0
    });
    (cfg, child)
}

#[test]
fn relative_paths_in_a_configuration_are_relative_to_the_file() {
    let root = tempfile::tempdir().unwrap();
    let (cfg, _daemon) = relative_daemon(root.path());
    let conf = root.path().join("conf");
    assert!(conf.join("var/admin.sock").exists());
    assert!(conf.join("var/screener.redb").exists());
    assert!(
        !root.path().join("var").exists(),
        "a path followed the working directory"
    );
    // Another working directory, the same file: the same daemon.
    let out = Command::new(screener_bin())
        .current_dir("/")
        .arg("-c")
        .arg(&cfg)
        .args(["block", "add", "203.0.113.9"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = screener_in(&conf, None, &["-c", "screener.toml", "block", "list"]);
    assert!(text(&out).contains("203.0.113.9/32"), "{}", text(&out));
}

#[test]
fn admin_commands_find_the_daemon_from_screener_config() {
    let root = tempfile::tempdir().unwrap();
    let (cfg, _daemon) = relative_daemon(root.path());
    let out = screener_in(
        Path::new("/"),
        Some(&cfg),
        &["block", "add", "198.51.100.7"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = screener_in(Path::new("/"), Some(&cfg), &["block", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("198.51.100.7/32"), "{}", text(&out));
    // `-c` wins over the environment.
    let elsewhere = root.path().join("nothing-here.toml");
    let out = Command::new(screener_bin())
        .current_dir("/")
        .env("SCREENER_CONFIG", &elsewhere)
        .arg("-c")
        .arg(&cfg)
        .args(["stats", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // A SCREENER_CONFIG naming no file is an error naming it, not the
    // defaults' socket.
    let out = screener_in(Path::new("/"), Some(&elsewhere), &["stats"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("nothing-here.toml"), "{}", text(&out));
}

#[test]
fn config_set_takes_a_comma_separated_port_list() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("screener.toml");
    std::fs::write(&cfg, "# ports we guard\n[xdp]\nports = [25]\n").unwrap();
    let (ok, out) = cli(&cfg, &["config", "set", "xdp.ports=25,587"]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&cfg, &["config", "show", "xdp.ports"]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "xdp.ports = [25, 587]");
    let written = std::fs::read_to_string(&cfg).unwrap();
    assert!(written.contains("# ports we guard"), "{written}");
    let (ok, out) = cli(&cfg, &["config", "set", "xdp.ports=25,70000"]);
    assert!(!ok);
    assert!(out.contains("xdp.ports"), "{out}");
}

/// `cargo xtask run`'s own code, on the repository's `screener.toml`
/// (only the pin directory moved), in a network namespace of its own so
/// its loopback ports and XDP on `lo` touch nothing else: swaks through
/// the daemon is delivered to the mailbox file, as `PASS NEW` and then
/// `PASS OLD`; stopping ends both and says how to detach the gate.
#[test]
fn xtask_run_delivers_a_test_mail_pass_new_then_pass_old() {
    require("postfix", "postfix");
    require("swaks", "swaks");
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("demo{}", ns.n));
    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../screener.toml");
    let shipped = std::fs::read_to_string(&repo).unwrap();
    let pin_line = "pin_path = \"/sys/fs/bpf/screener\"";
    assert!(shipped.contains(pin_line), "{shipped}");
    let cfg = dir.path().join("screener.toml");
    std::fs::write(
        &cfg,
        shipped.replace(pin_line, &format!("pin_path = \"{}\"", pins.0.display())),
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let opts = xtask::demo::Options {
        screener: screener_bin(),
        config: cfg.clone(),
        var: dir.path().join("var"),
        log: Some(log.clone()),
        run_args: Vec::new(),
    };
    let mut demo = ns
        .run(move || xtask::demo::Demo::start(opts))
        .expect("starting the demonstration");
    let daemon_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the daemon to listen", Duration::from_secs(30), || {
        daemon_log().contains("smtp listening on 127.0.0.1:2525")
    });

    let send = || {
        ns.run(|| {
            Command::new("swaks")
                .args(["--server", "127.0.0.1:2525", "--to", "user@localhost"])
                .output()
                .expect("run swaks")
        })
    };
    let first = send();
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("250 2.0.0 Ok: queued"),
        "{}",
        text(&first)
    );
    let second = send();
    assert!(second.status.success(), "{}", text(&second));
    assert!(
        text(&second).contains("250 2.0.0 Ok: queued"),
        "{}",
        text(&second)
    );

    let said = daemon_log();
    let new = said
        .find("PASS NEW [127.0.0.1]")
        .unwrap_or_else(|| panic!("{said}"));
    let old = said
        .find("PASS OLD [127.0.0.1]")
        .unwrap_or_else(|| panic!("{said}"));
    assert!(new < old, "{said}");
    let mailbox = demo.mailbox();
    assert_eq!(mailbox, dir.path().join("var/mail/inbox"));
    wait_for("both mails in the mailbox", Duration::from_secs(30), || {
        std::fs::read_to_string(&mailbox)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("From "))
            .count()
            == 2
    });
    let mail = std::fs::read_to_string(&mailbox).unwrap();
    assert!(mail.contains("To: user@localhost"), "{mail}");

    let master = std::fs::read_to_string(dir.path().join("var/postfix/queue/pid/master.pid"))
        .expect("the backend's master.pid");
    let master = Path::new("/proc").join(master.trim());
    assert!(master.exists(), "no Postfix master running");
    let bye = demo.stop();
    assert!(bye.contains("xdp detach"), "{bye}");
    assert!(!master.exists(), "the backend's master still runs");
    assert!(
        ns.run(|| TcpStream::connect("127.0.0.1:10025").is_err()),
        "the backend still listens"
    );
    assert!(
        ns.run(|| TcpStream::connect("127.0.0.1:2525").is_err()),
        "the daemon still listens"
    );
    assert!(daemon_log().contains("shutting down"), "{}", daemon_log());
}
