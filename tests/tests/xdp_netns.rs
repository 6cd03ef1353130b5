//! The XDP gate on a real veth: a host in a network namespace connects over
//! TCP; once blocked it cannot, its neighbour still can; unblocking and
//! expiry restore it; the block survives `kill -9` of the daemon, and a
//! restarted daemon adopts the pinned gate.

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use integration_tests::{
    daemon::{cli, daemon, ok, start, write_config},
    netns::{listen, screener_bin, spawn_logged, wait_for, NetNs, PinDir},
};

/// A connection that gets through does so in milliseconds; a dropped SYN
/// is retried by the kernel after a second, so one second tells them apart.
const DROPPED: Duration = Duration::from_secs(1);
const THROUGH: Duration = Duration::from_secs(5);

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
    assert!(
        st.contains(&format!("interface {}: attached", ns.host_if)),
        "{st}"
    );

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

#[test]
fn blocks_come_back_after_restart_and_wiped_pins() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("wipe{}", ns.n));
    let port = 2500 + u16::try_from(ns.n).unwrap();
    let v4 = listen(SocketAddr::new(ns.host_v4(), port));
    let mut d = daemon(&ns, &pins, "skb", port);
    let client = ns.client_v4().to_string();
    ok(
        &d.cfg,
        &["block", "add", &client, "203.0.113.0/24", "--ttl", "1d"],
    );
    ok(&d.cfg, &["allow", "add", "198.51.100.0/24"]);
    assert!(!ns.connects(ns.client_v4(), v4, DROPPED));

    // A plain restart.
    d.child.kill9();
    d.child = start(&d.cfg, d.dir.path(), 1);
    assert!(
        !ns.connects(ns.client_v4(), v4, DROPPED),
        "block lost across restart"
    );

    // As after a reboot: every pin gone, the store remains.
    d.child.kill9();
    ok(&d.cfg, &["xdp", "detach"]);
    assert!(
        ns.connects(ns.client_v4(), v4, THROUGH),
        "detach left the gate closed"
    );
    d.child = start(&d.cfg, d.dir.path(), 2);
    assert!(
        !ns.connects(ns.client_v4(), v4, DROPPED),
        "block lost with the pins"
    );
    let list: serde_json::Value =
        serde_json::from_str(&ok(&d.cfg, &["block", "list", "--json"])).unwrap();
    let nets: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["net"].as_str().unwrap())
        .collect();
    assert!(nets.contains(&format!("{client}/32").as_str()), "{nets:?}");
    assert!(nets.contains(&"203.0.113.0/24"), "{nets:?}");
    let allows = ok(&d.cfg, &["allow", "list", "--json"]);
    assert!(allows.contains("198.51.100.0/24"), "{allows}");
}

#[test]
fn import_large_drop_list_and_replace_it() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("import{}", ns.n));
    let port = 2500 + u16::try_from(ns.n).unwrap();
    let v4 = listen(SocketAddr::new(ns.host_v4(), port));
    let d = daemon(&ns, &pins, "skb", port);
    let client = ns.client_v4();

    // 100k entries: the client itself, then /30s elsewhere.
    let mut text = String::from("; DROP-style list for the test\n");
    text += &format!("{client}/32 ; SBL000000\n");
    for i in 0..99_999u32 {
        let a = 0x0a00_0000 + i * 4;
        text += &format!(
            "{}.{}.{}.{}/30 ; SBL{i:06}\n",
            a >> 24,
            (a >> 16) & 255,
            (a >> 8) & 255,
            a & 255
        );
    }
    text += "garbage line ; SBL999999\n";
    let file = d.dir.path().join("drop.txt");
    std::fs::write(&file, &text).unwrap();
    let out = ok(
        &d.cfg,
        &[
            "import",
            file.to_str().unwrap(),
            "--format",
            "drop",
            "--reason",
            "drop",
        ],
    );
    assert!(out.contains("added = 100000"), "{out}");
    assert!(out.contains("lines_bad = 1"), "{out}");
    assert!(
        out.contains("line 100002"),
        "bad line not reported with its number: {out}"
    );
    assert!(
        !ns.connects(client, v4, DROPPED),
        "imported entry does not drop"
    );
    let st: serde_json::Value =
        serde_json::from_str(&ok(&d.cfg, &["xdp", "status", "--json"])).unwrap();
    let cidrs = st["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "block_v4_cidr")
        .unwrap()["entries"]
        .as_u64()
        .unwrap();
    assert_eq!(cidrs, 99_999);

    // The list changes: the client and 999 others leave, 5 arrive.
    let mut lines: Vec<&str> = text.lines().collect();
    lines.drain(1..1001);
    let mut changed = lines.join("\n");
    for i in 0..5 {
        changed += &format!("\n172.16.{i}.0/24 ; SBLNEW{i}");
    }
    std::fs::write(&file, changed).unwrap();
    let out = ok(
        &d.cfg,
        &["import", file.to_str().unwrap(), "--reason", "drop"],
    );
    assert!(out.contains("removed = 1000"), "{out}");
    assert!(out.contains("added = 5"), "{out}");
    assert!(
        ns.connects(client, v4, THROUGH),
        "entry gone from the list still drops"
    );
}

#[test]
fn kernel_drop_logs_reach_the_daemon_log_when_enabled() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("log{}", ns.n));
    let port = 2500 + u16::try_from(ns.n).unwrap();
    let v4 = listen(SocketAddr::new(ns.host_v4(), port));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &ns, &pins, "skb", port);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("[xdp]\n", "[xdp]\nlog_level = \"debug\"\n"),
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let _child = spawn_logged(
        Command::new(screener_bin())
            .env("RUST_LOG", "debug")
            .arg("-c")
            .arg(&cfg)
            .arg("run"),
        &log,
    );
    wait_for("the admin socket", Duration::from_secs(20), || {
        cli(&cfg, &["stats", "--json"]).0
    });
    let client = ns.client_v4().to_string();
    ok(&cfg, &["block", "add", &client]);
    assert!(!ns.connects(ns.client_v4(), v4, DROPPED));
    wait_for(
        "the kernel's drop log line",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&format!("drop {client} reason 0"))
        },
    );
}

#[test]
fn configured_lists_are_imported_and_follow_their_file() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("watch{}", ns.n));
    let port = 2500 + u16::try_from(ns.n).unwrap();
    let v4 = listen(SocketAddr::new(ns.host_v4(), port));
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("local.cidr");
    std::fs::write(
        &list,
        format!("# local list\n{}\n203.0.113.0/24\n", ns.client_v4()),
    )
    .unwrap();
    let cfg = write_config(dir.path(), &ns, &pins, "skb", port);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text += &format!(
        "\n[import]\nlists = [{{ file = \"{}\", format = \"cidr\", interval = \"1s\" }}]\n",
        list.display()
    );
    std::fs::write(&cfg, text).unwrap();
    let _child = start(&cfg, dir.path(), 0);
    wait_for(
        "the configured list to block the client",
        Duration::from_secs(15),
        || !ns.connects(ns.client_v4(), v4, DROPPED),
    );
    std::fs::write(&list, "203.0.113.0/24\n").unwrap();
    wait_for(
        "the changed list to release the client",
        Duration::from_secs(15),
        || ns.connects(ns.client_v4(), v4, DROPPED),
    );
    let out = ok(&cfg, &["block", "list", "--json"]);
    assert!(out.contains("203.0.113.0/24"), "{out}");
}

#[test]
fn pinned_set_of_another_layout_is_refused() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("layout{}", ns.n));
    let mut d = daemon(&ns, &pins, "skb", 2500 + u16::try_from(ns.n).unwrap());
    d.child.kill9();
    let run = |cfg: &Path| {
        Command::new(screener_bin())
            .arg("-c")
            .arg(cfg)
            .arg("run")
            .output()
            .unwrap()
    };

    // Another IPv6 prefix would read the block_v6 keys with another meaning.
    let text = std::fs::read_to_string(&d.cfg).unwrap();
    std::fs::write(
        &d.cfg,
        text.replace("[xdp]\n", "[verdict]\nipv6_prefix = 48\n\n[xdp]\n"),
    )
    .unwrap();
    let out = run(&d.cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("verdict.ipv6_prefix") && err.contains("/64"),
        "{err}"
    );
    std::fs::write(&d.cfg, text).unwrap();

    // A map of another shape where block_v4 should be.
    let map = pins.0.join("block_v4");
    std::fs::remove_file(&map).unwrap();
    integration_tests::netns::sh(&[
        "bpftool",
        "map",
        "create",
        map.to_str().unwrap(),
        "type",
        "hash",
        "key",
        "8",
        "value",
        "16",
        "entries",
        "16",
        "name",
        "block_v4",
    ]);
    let out = run(&d.cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("another layout") && err.contains("block_v4") && err.contains("xdp detach"),
        "{err}"
    );
}
