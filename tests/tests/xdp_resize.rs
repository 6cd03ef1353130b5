//! Changing `xdp.max_*` and restarting: the pinned maps are migrated into
//! maps of the new size with every entry (the store cannot be where they
//! come from: it is deleted in between), or, when the entries do not fit,
//! the daemon refuses naming the key and leaves the pinned set as it was.

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use integration_tests::{
    daemon::{blocked, ok, set, start, write_config},
    netns::{listen, screener_bin, sh, spawn_logged, wait_for, NetNs, PinDir},
};

/// A dropped SYN is retried after a second: one second tells a dropped
/// connection from one that gets through (milliseconds).
const DROPPED: Duration = Duration::from_secs(1);

/// `max_entries` of each pinned map as `xdp status --json` reports it.
fn sizes(cfg: &Path) -> Vec<(String, u64)> {
    let st: serde_json::Value =
        serde_json::from_str(&ok(cfg, &["xdp", "status", "--json"])).unwrap();
    st["maps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_owned(),
                m["max_entries"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn size_of(cfg: &Path, map: &str) -> u64 {
    sizes(cfg)
        .into_iter()
        .find(|(n, _)| n == map)
        .unwrap_or_else(|| panic!("no map {map}"))
        .1
}

/// `hits` of the block entry for `net`.
fn hits(cfg: &Path, net: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&ok(cfg, &["block", "list", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|e| e["net"] == net)
        .unwrap_or_else(|| panic!("{net} not blocked: {v}"))["hits"]
        .as_u64()
        .unwrap()
}

#[test]
fn raising_max_hosts_and_restarting_migrates_every_entry() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("resize{}", ns.n));
    let port = 2500 + u16::try_from(ns.n).unwrap();
    let v4 = listen(SocketAddr::new(ns.host_v4(), port));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &ns, &pins, "skb", port);
    set(&cfg, "xdp", "max_hosts = 4");
    let mut first = start(&cfg, dir.path(), 0);
    assert_eq!(size_of(&cfg, "block_v4"), 4);

    let client = ns.client_v4().to_string();
    let hosts = [client.as_str(), "203.0.113.1", "203.0.113.2", "203.0.113.3"];
    ok(
        &cfg,
        &["block", "add", hosts[0], hosts[1], hosts[2], hosts[3]],
    );
    ok(
        &cfg,
        &["block", "add", "198.51.100.0/24", "2001:db8:5::/64"],
    );
    ok(&cfg, &["allow", "add", "192.0.2.250"]);
    let (full, out) = integration_tests::daemon::cli(&cfg, &["block", "add", "203.0.113.4"]);
    assert!(!full && out.contains("xdp.max_hosts"), "{out}");
    assert!(!ns.connects(ns.client_v4(), v4, DROPPED));
    let client_net = format!("{client}/32");
    let hits_before = hits(&cfg, &client_net);
    assert!(hits_before >= 1, "the drop was not counted");
    let mut before = blocked(&cfg);
    before.sort();

    // Down, store gone: whatever is there after the restart came from the
    // pinned maps.
    first.kill9();
    std::fs::remove_file(dir.path().join("screener.redb")).unwrap();
    set(&cfg, "xdp", "max_hosts = 8");
    let _second = start(&cfg, dir.path(), 1);
    let log = std::fs::read_to_string(dir.path().join("daemon1.log")).unwrap();
    assert!(log.contains("pinned XDP map resized"), "{log}");

    // The new size is in force, for both host maps, as bpftool sees it.
    assert_eq!(size_of(&cfg, "block_v4"), 8);
    assert_eq!(size_of(&cfg, "block_v6"), 8);
    let shown = sh(&[
        "bpftool",
        "-j",
        "map",
        "show",
        "pinned",
        pins.0.join("block_v4").to_str().unwrap(),
    ]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["max_entries"], 8, "{shown}");
    assert!(
        std::fs::read_dir(&pins.0).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("resize_")),
        "a staging pin was left behind"
    );

    // Every entry moved, with its hits, and the program uses the new maps.
    let mut after = blocked(&cfg);
    after.sort();
    assert_eq!(after, before);
    assert!(hits(&cfg, &client_net) >= hits_before);
    assert!(ok(&cfg, &["allow", "list"]).contains("192.0.2.250/32"));
    assert!(!ns.connects(ns.client_v4(), v4, DROPPED));
    assert!(
        hits(&cfg, &client_net) > hits_before,
        "the new maps are not the ones the program reads"
    );
    ok(&cfg, &["block", "add", "203.0.113.4", "203.0.113.5"]);
    assert_eq!(blocked(&cfg).len(), before.len() + 2);
}

#[test]
fn shrinking_below_the_entries_held_is_refused_naming_the_key() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("shrink{}", ns.n));
    let port = 2500 + u16::try_from(ns.n).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &ns, &pins, "skb", port);
    let mut first = start(&cfg, dir.path(), 0);
    ok(
        &cfg,
        &["block", "add", "203.0.113.1", "203.0.113.2", "203.0.113.3"],
    );
    first.kill9();

    set(&cfg, "xdp", "max_hosts = 2");
    // A daemon that wrongly starts is killed by its guard, not waited on.
    let log = dir.path().join("daemon1.log");
    let mut child = spawn_logged(
        Command::new(screener_bin()).arg("-c").arg(&cfg).arg("run"),
        &log,
    );
    let mut status = None;
    wait_for("the daemon to exit", Duration::from_secs(20), || {
        status = child.0.as_mut().unwrap().try_wait().unwrap();
        status.is_some()
    });
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(!status.unwrap().success(), "{err}");
    assert!(
        err.contains("block_v4 holds 3 entries") && err.contains("xdp.max_hosts = 2"),
        "{err}"
    );
    // Nothing changed: the old maps, their entries, no staging pin.
    assert_eq!(size_of(&cfg, "block_v4"), 1 << 20);
    let st = ok(&cfg, &["xdp", "status"]);
    assert!(st.contains("block_v4") && st.contains("entries 3/"), "{st}");
    assert!(!pins.0.join("resize_block_v4").exists());
}

#[test]
fn a_reload_keeps_the_pinned_sizes_until_the_next_start() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("resizehup{}", ns.n));
    let port = 2500 + u16::try_from(ns.n).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &ns, &pins, "skb", port);
    set(&cfg, "xdp", "max_hosts = 4");
    let running = start(&cfg, dir.path(), 0);
    ok(&cfg, &["block", "add", "203.0.113.1"]);

    // A new log level loads a new program instance on the pinned maps;
    // the new size must not be applied under the running daemon, whose
    // verdicts go into the maps meanwhile.
    set(&cfg, "xdp", "max_hosts = 8");
    set(&cfg, "xdp", "log_level = \"info\"");
    let pid = i32::try_from(running.0.as_ref().unwrap().id()).unwrap();
    // SAFETY: a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    wait_for("the reload", Duration::from_secs(15), || {
        integration_tests::daemon::stats(&cfg)["daemon"]["config_generation"].as_u64() == Some(1)
    });
    let st = integration_tests::daemon::stats(&cfg);
    let pending = st["daemon"]["config_restart_pending"].to_string();
    assert!(pending.contains("xdp.max_hosts"), "{st}");
    assert_eq!(size_of(&cfg, "block_v4"), 4);
    assert_eq!(blocked(&cfg), vec!["203.0.113.1/32".to_owned()]);
    ok(&cfg, &["block", "add", "203.0.113.2"]);
    assert_eq!(blocked(&cfg).len(), 2);
}
