//! The XDP gate on a real veth: a host in a network namespace connects over
//! TCP; once blocked it cannot, its neighbour still can; unblocking and
//! expiry restore it; the block survives `kill -9` of the daemon, and a
//! restarted daemon adopts the pinned gate.

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use integration_tests::netns::{
    listen, screener_bin, spawn_logged, wait_for, ChildGuard, NetNs, PinDir,
};

/// A connection that gets through does so in milliseconds; a dropped SYN
/// is retried by the kernel after a second, so one second tells them apart.
const DROPPED: Duration = Duration::from_secs(1);
const THROUGH: Duration = Duration::from_secs(5);

struct Daemon {
    child: ChildGuard,
    cfg: std::path::PathBuf,
    dir: tempfile::TempDir,
}

fn write_config(
    dir: &Path,
    ns: &NetNs,
    pins: &PinDir,
    mode: &str,
    port: u16,
) -> std::path::PathBuf {
    let cfg = dir.join("screener.toml");
    let text = format!(
        r#"
[smtp]
listen = ["127.0.0.1:0"]
hostname = "mx.example.com"

[xdp]
interfaces = ["{iface}"]
mode = "{mode}"
ports = [{port}]
pin_path = "{pins}"

[store]
path = "{dir}/screener.redb"

[admin]
socket = "{dir}/admin.sock"
"#,
        iface = ns.host_if,
        pins = pins.0.display(),
        dir = dir.display(),
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn start(cfg: &Path, dir: &Path, n: u32) -> ChildGuard {
    let log = dir.join(format!("daemon{n}.log"));
    let child = spawn_logged(
        Command::new(screener_bin())
            .args(["-c"])
            .arg(cfg)
            .arg("run"),
        &log,
    );
    let sock = dir.join("admin.sock");
    wait_for("the admin socket", Duration::from_secs(20), || {
        if !sock.exists() {
            return false;
        }
        cli(cfg, &["stats", "--json"]).0
    });
    child
}

fn cli(cfg: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(screener_bin())
        .arg("-c")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[track_caller]
fn ok(cfg: &Path, args: &[&str]) -> String {
    let (success, out) = cli(cfg, args);
    assert!(success, "screener {args:?} failed: {out}");
    out
}

fn daemon(ns: &NetNs, pins: &PinDir, mode: &str, port: u16) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), ns, pins, mode, port);
    let child = start(&cfg, dir.path(), 0);
    Daemon { child, cfg, dir }
}

fn kernel_dropped(cfg: &Path) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&ok(cfg, &["stats", "--json"])).unwrap();
    v["kernel"]["dropped"].as_u64().unwrap()
}

fn block_then_unblock(mode: &str) {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("{mode}{}", ns.n));
    let port = 2500 + u16::try_from(ns.n).unwrap();
    let v4 = listen(SocketAddr::new(ns.host_v4(), port));
    let v6 = listen(SocketAddr::new(ns.host_v6(), port));
    let v6b = listen(SocketAddr::new(ns.host_v6_neighbour_net(), port));
    let d = daemon(&ns, &pins, mode, port);
    let cfg = &d.cfg;

    assert!(
        ns.connects(ns.client_v4(), v4, THROUGH),
        "client before any block"
    );
    assert!(
        ns.connects(ns.client_v6(), v6, THROUGH),
        "v6 client before any block"
    );

    ok(
        cfg,
        &[
            "block",
            "add",
            &ns.client_v4().to_string(),
            &format!("{}/64", ns.client_v6()),
        ],
    );
    assert!(
        !ns.connects(ns.client_v4(), v4, DROPPED),
        "blocked v4 client got through"
    );
    assert!(
        !ns.connects(ns.client_v6(), v6, DROPPED),
        "blocked v6 client got through"
    );
    assert!(
        ns.connects(ns.neighbour_v4(), v4, THROUGH),
        "v4 neighbour was blocked too"
    );
    assert!(
        ns.connects(ns.neighbour_v6(), v6b, THROUGH),
        "v6 neighbour in another /64 was blocked"
    );
    assert!(kernel_dropped(cfg) >= 2, "drops not counted");

    // Unrelated port: out of scope, passes.
    let other = listen(SocketAddr::new(ns.host_v4(), port + 100));
    assert!(
        ns.connects(ns.client_v4(), other, THROUGH),
        "out-of-scope port was blocked"
    );

    ok(
        cfg,
        &[
            "block",
            "del",
            &ns.client_v4().to_string(),
            &format!("{}/64", ns.client_v6()),
        ],
    );
    assert!(
        ns.connects(ns.client_v4(), v4, THROUGH),
        "unblocked v4 client still dropped"
    );
    assert!(
        ns.connects(ns.client_v6(), v6, THROUGH),
        "unblocked v6 client still dropped"
    );

    // Expiry restores by itself.
    ok(
        cfg,
        &["block", "add", &ns.client_v4().to_string(), "--ttl", "2s"],
    );
    assert!(
        !ns.connects(ns.client_v4(), v4, DROPPED),
        "short block did not drop"
    );
    wait_for("the 2s block to expire", Duration::from_secs(15), || {
        ns.connects(ns.client_v4(), v4, DROPPED)
    });

    // Allow wins over block.
    ok(cfg, &["block", "add", "192.0.2.0/24"]);
    assert!(
        !ns.connects(ns.client_v4(), v4, DROPPED),
        "prefix block did not drop"
    );
    ok(cfg, &["allow", "add", &ns.client_v4().to_string()]);
    assert!(
        ns.connects(ns.client_v4(), v4, THROUGH),
        "allow did not win over block"
    );
    assert!(
        !ns.connects(ns.neighbour_v4(), v4, DROPPED),
        "allow leaked to the neighbour"
    );
    drop(d);
}

#[test]
fn block_and_unblock_skb_mode() {
    block_then_unblock("skb");
}

#[test]
fn block_and_unblock_driver_mode() {
    block_then_unblock("driver");
}

#[test]
fn block_survives_kill_9_and_restart_adopts() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("adopt{}", ns.n));
    let port = 2500 + u16::try_from(ns.n).unwrap();
    let v4 = listen(SocketAddr::new(ns.host_v4(), port));
    let mut d = daemon(&ns, &pins, "auto", port);
    let client = ns.client_v4().to_string();
    ok(&d.cfg, &["block", "add", &client, "--reason", "pregreet"]);
    assert!(!ns.connects(ns.client_v4(), v4, DROPPED));

    d.child.kill9();
    assert!(
        !ns.connects(ns.client_v4(), v4, DROPPED),
        "the gate opened when the daemon died"
    );
    assert!(ns.connects(ns.neighbour_v4(), v4, THROUGH));
    // Without a daemon, status still reads the pins.
    let st = ok(&d.cfg, &["xdp", "status"]);
    assert!(st.contains(&format!("attached: {}", ns.host_if)), "{st}");

    let mut again = start(&d.cfg, d.dir.path(), 1);
    let list = ok(&d.cfg, &["block", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let entries = v.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{list}");
    assert_eq!(entries[0]["net"], format!("{client}/32"));
    assert_eq!(entries[0]["reason"], "pregreet");
    assert!(
        entries[0]["hits"].as_u64().unwrap() >= 2,
        "hits not counted: {list}"
    );
    let st: serde_json::Value =
        serde_json::from_str(&ok(&d.cfg, &["xdp", "status", "--json"])).unwrap();
    assert_eq!(
        st["links"].as_array().unwrap().len(),
        1,
        "attached twice: {st}"
    );
    assert!(!ns.connects(ns.client_v4(), v4, DROPPED));
    ok(&d.cfg, &["block", "del", &client]);
    assert!(ns.connects(ns.client_v4(), v4, THROUGH));

    // Detach removes the gate and its pins.
    ok(&d.cfg, &["xdp", "detach"]);
    assert!(!pins.0.join("config").exists());
    again.kill9();
}

#[test]
fn bad_input_changes_nothing() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("bad{}", ns.n));
    let d = daemon(&ns, &pins, "skb", 2500 + u16::try_from(ns.n).unwrap());
    let cfg = &d.cfg;
    for (args, want) in [
        (
            vec!["block", "add", "192.0.2.9", "192.0.2.300"],
            "192.0.2.300",
        ),
        (vec!["block", "add", "192.0.2.9", "--ttl", "soon"], "soon"),
        (vec!["block", "add", "2001:db8::/129"], "2001:db8::/129"),
        (vec!["block", "del", "198.51.100.7"], "198.51.100.7"),
    ] {
        let (success, out) = cli(cfg, &args);
        assert!(!success, "{args:?} succeeded: {out}");
        assert!(
            out.contains(want),
            "{args:?}: error does not name {want}: {out}"
        );
    }
    let list = ok(cfg, &["block", "list", "--json"]);
    assert_eq!(list.trim(), "[]", "a refused command changed the maps");
}

#[test]
fn map_full_is_a_clear_error() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("full{}", ns.n));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &ns, &pins, "skb", 2599);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text = text.replace("[xdp]\n", "[xdp]\nmax_hosts = 2\n");
    std::fs::write(&cfg, text).unwrap();
    let _child = start(&cfg, dir.path(), 0);
    ok(&cfg, &["block", "add", "203.0.113.1", "203.0.113.2"]);
    let (success, out) = cli(&cfg, &["block", "add", "203.0.113.3", "203.0.113.4"]);
    assert!(!success);
    assert!(
        out.contains("block_v4") && out.contains("xdp.max_hosts"),
        "{out}"
    );
    let list = ok(&cfg, &["block", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{list}");
}

#[test]
fn daemon_not_running_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("s.toml");
    std::fs::write(
        &cfg,
        format!(
            "[admin]\nsocket = \"{}/admin.sock\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let (success, out) = cli(&cfg, &["block", "list"]);
    assert!(!success);
    assert!(out.contains("not running"), "{out}");
}
