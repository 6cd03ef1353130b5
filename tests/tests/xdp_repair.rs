//! The gate stays closed when the ground moves under it: an interface
//! deleted and re-created under a running daemon or between two runs, pins
//! removed under a running daemon, and a start after a reboot (pins gone)
//! that must fill the maps before the program sees a packet.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use integration_tests::{
    daemon::{cli, daemon, ok, start, stats},
    netns::{listen, wait_for, NetNs, PinDir},
};

/// A connection that gets through does so in milliseconds; a dropped SYN
/// is retried by the kernel after a second, so one second tells them apart.
const DROPPED: Duration = Duration::from_secs(1);
const THROUGH: Duration = Duration::from_secs(5);
/// How long the daemon may take to notice and repair (it checks every
/// second).
const REPAIR: Duration = Duration::from_secs(10);

fn xdp_status(cfg: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(cfg, &["xdp", "status", "--json"])).unwrap()
}

/// The state `xdp status` and `stats` give for the one interface.
fn states(cfg: &Path) -> (bool, String, bool, String) {
    let st = xdp_status(cfg);
    let s = stats(cfg);
    (
        st["attached"].as_bool().unwrap(),
        st["interfaces"][0]["state"].as_str().unwrap().to_owned(),
        s["daemon"]["xdp_attached"].as_bool().unwrap(),
        s["daemon"]["xdp_interfaces"][0]["state"]
            .as_str()
            .unwrap()
            .to_owned(),
    )
}

fn dropped(cfg: &Path) -> u64 {
    stats(cfg)["kernel"]["dropped"].as_u64().unwrap()
}

/// `ip link del` + re-create of the guarded interface under a running
/// daemon: while it is gone `xdp status` and `stats` say so, and once it is
/// back the daemon attaches again by itself: the blocked source is dropped,
/// its neighbour connects.
#[test]
fn interface_recreated_under_a_running_daemon_is_guarded_again() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("replug{}", ns.n));
    let port = 2800 + u16::try_from(ns.n).unwrap();
    let to = listen(SocketAddr::new(ns.host_v4(), port));
    let d = daemon(&ns, &pins, "skb", port);
    let client = ns.client_v4();
    ok(&d.cfg, &["block", "add", &client.to_string()]);
    assert!(!ns.connects(client, to, DROPPED), "block did not drop");
    let (attached, state, xdp_attached, _) = states(&d.cfg);
    assert!(attached && xdp_attached, "{state}");
    let first = ns.host_ifindex().unwrap();

    ns.unplug();
    wait_for(
        "xdp status and stats to report the interface unguarded",
        REPAIR,
        || {
            let (attached, state, xdp_attached, stats_state) = states(&d.cfg);
            !attached && !xdp_attached && state == stats_state && state == "no such interface"
        },
    );
    ns.plug();
    let second = ns.host_ifindex().unwrap();
    assert_ne!(first, second, "the interface came back as the same device");
    wait_for("the blocked source to be dropped again", REPAIR, || {
        !ns.connects(client, to, DROPPED)
    });
    assert!(
        ns.connects(ns.neighbour_v4(), to, THROUGH),
        "the neighbour was dropped"
    );
    wait_for("status to report the interface guarded", REPAIR, || {
        let (attached, state, xdp_attached, _) = states(&d.cfg);
        attached && xdp_attached && state == "attached"
    });
    let st = xdp_status(&d.cfg);
    assert_eq!(st["interfaces"][0]["ifindex"], second, "{st}");
    let log = d.log(0);
    assert!(
        log.contains("WARN") && log.contains(&ns.host_if) && log.contains("interface gone"),
        "{log}"
    );
    assert!(log.contains("XDP re-attached"), "{log}");
    // The new link is pinned: it guards on after the daemon dies.
    let mut d = d;
    d.child.kill9();
    assert!(
        !ns.connects(client, to, DROPPED),
        "the re-attached gate opened when the daemon died"
    );
    let st = cli(&d.cfg, &["xdp", "status"]).1;
    assert!(
        st.contains(&format!("interface {}: attached", ns.host_if)),
        "{st}"
    );
}

/// The same, faster than the watchdog's interval can see the gap: the
/// interface is deleted and re-created at once. The link the daemon holds
/// is severed; it attaches anew.
#[test]
fn interface_replugged_at_once_is_guarded_again() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("replug2{}", ns.n));
    let port = 2800 + u16::try_from(ns.n).unwrap();
    let to = listen(SocketAddr::new(ns.host_v4(), port));
    let d = daemon(&ns, &pins, "skb", port);
    let client = ns.client_v4();
    ok(&d.cfg, &["block", "add", &client.to_string()]);
    assert!(!ns.connects(client, to, DROPPED));
    ns.replug();
    wait_for("the blocked source to be dropped again", REPAIR, || {
        !ns.connects(client, to, DROPPED)
    });
    assert!(ns.connects(ns.neighbour_v4(), to, THROUGH));
    let (attached, state, xdp_attached, _) = states(&d.cfg);
    assert!(attached && xdp_attached, "{state}");
    assert!(d.log(0).contains("XDP re-attached"), "{}", d.log(0));
}

/// `rm -rf` of the pin directory under a running daemon: the gate stays
/// closed (the daemon holds the link), the pins come back, and they are
/// the live ones: the block holds after the daemon dies, and a new daemon
/// adopts the entries.
#[test]
fn pins_removed_under_a_running_daemon_come_back() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("rmpins{}", ns.n));
    let port = 2800 + u16::try_from(ns.n).unwrap();
    let to = listen(SocketAddr::new(ns.host_v4(), port));
    let mut d = daemon(&ns, &pins, "skb", port);
    let client = ns.client_v4();
    ok(
        &d.cfg,
        &["block", "add", &client.to_string(), "--reason", "pregreet"],
    );
    assert!(!ns.connects(client, to, DROPPED));

    std::fs::remove_dir_all(&pins.0).unwrap();
    assert!(
        !ns.connects(client, to, DROPPED),
        "the gate opened with the pins"
    );
    let link = pins.0.join(format!("link_{}", ns.host_if));
    wait_for("every pin to come back", REPAIR, || {
        link.exists()
            && pins.0.join("prog").exists()
            && screener_common::map_names::ALL
                .iter()
                .all(|m| pins.0.join(m).exists())
    });
    assert!(!ns.connects(client, to, DROPPED));
    assert!(ns.connects(ns.neighbour_v4(), to, THROUGH));
    let log = d.log(0);
    assert!(
        log.contains("WARN") && log.contains("removed under the running daemon"),
        "{log}"
    );

    // The pins are the live objects: without the daemon the link still
    // drops, and the next daemon adopts the entries.
    d.child.kill9();
    let before = {
        let st = xdp_status(&d.cfg);
        assert!(st["attached"].as_bool().unwrap(), "{st}");
        st["links"][0]["link_id"].clone()
    };
    assert!(
        !ns.connects(client, to, DROPPED),
        "the re-pinned link does not guard"
    );
    d.child = start(&d.cfg, d.dir.path(), 1);
    let list = ok(&d.cfg, &["block", "list", "--json"]);
    assert!(list.contains(&format!("{client}/32")), "{list}");
    assert!(!ns.connects(client, to, DROPPED));
    let st = xdp_status(&d.cfg);
    assert_eq!(st["links"][0]["link_id"], before, "not adopted: {st}");
}

/// The daemon is killed, the interface deleted and re-created, the daemon
/// started again: it replaces the severed pinned link instead of failing,
/// and guards.
#[test]
fn start_over_a_severed_pinned_link_replaces_it() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("severed{}", ns.n));
    let port = 2800 + u16::try_from(ns.n).unwrap();
    let to = listen(SocketAddr::new(ns.host_v4(), port));
    let mut d = daemon(&ns, &pins, "skb", port);
    let client = ns.client_v4();
    ok(&d.cfg, &["block", "add", &client.to_string()]);
    assert!(!ns.connects(client, to, DROPPED));
    d.child.kill9();

    ns.replug();
    assert!(
        ns.connects(client, to, THROUGH),
        "the interface came back guarded without a daemon"
    );
    // Without a daemon, status reads the pins and tells the truth.
    let (success, st) = cli(&d.cfg, &["xdp", "status"]);
    assert!(success, "{st}");
    assert!(
        st.contains(&format!(
            "interface {}: NOT GUARDED: link severed",
            ns.host_if
        )),
        "{st}"
    );

    d.child = start(&d.cfg, d.dir.path(), 1);
    assert!(
        !ns.connects(client, to, DROPPED),
        "the restarted daemon does not guard"
    );
    assert!(ns.connects(ns.neighbour_v4(), to, THROUGH));
    let (attached, state, xdp_attached, _) = states(&d.cfg);
    assert!(attached && xdp_attached, "{state}");
    assert!(
        d.log(1)
            .contains("does not guard the interface; replacing it"),
        "{}",
        d.log(1)
    );
}

/// After a reboot (pins gone, store intact) the maps are filled before the
/// program is attached: a blocked source hammering SYNs while the daemon
/// starts never gets a SYN-ACK once the gate is on the interface, and the
/// program never passes one of its SYNs as "no match".
#[test]
fn maps_are_filled_before_the_gate_attaches() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("fill{}", ns.n));
    let port = 2800 + u16::try_from(ns.n).unwrap();
    let to = listen(SocketAddr::new(ns.host_v4(), port));
    let mut d = daemon(&ns, &pins, "skb", port);
    let client = ns.client_v4();
    // Enough verdicts that filling takes a while: the client among
    // thousands of others (map contents only, nothing is sent from them).
    let mut list = format!("{client}\n");
    for i in 0..20_000u32 {
        list += &format!("2001:db8:ff00:{i:x}::/64\n");
    }
    let file = d.dir.path().join("list.cidr");
    std::fs::write(&file, list).unwrap();
    ok(
        &d.cfg,
        &["import", file.to_str().unwrap(), "--format", "cidr"],
    );
    assert!(!ns.connects(client, to, DROPPED));

    // As after a reboot: the daemon gone, every pin gone, the store kept.
    d.child.kill9();
    ok(&d.cfg, &["xdp", "detach"]);
    assert!(ns.connects(client, to, THROUGH), "detach left a gate");

    let link = pins.0.join(format!("link_{}", ns.host_if));
    let stop = Arc::new(AtomicBool::new(false));
    let armed_link = link.clone();
    let hammer = ns.hammer(
        client,
        to,
        Duration::from_millis(200),
        move || armed_link.exists(),
        stop.clone(),
    );
    d.child = start(&d.cfg, d.dir.path(), 1);
    wait_for("SYNs dropped by the new gate", REPAIR, || {
        dropped(&d.cfg) >= 10
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let attempts = hammer.join().unwrap().unwrap();
    let count = |armed: bool, connected: bool| {
        attempts
            .iter()
            .filter(|a| a.armed == armed && a.connected == connected)
            .count()
    };
    let summary = format!(
        "before the link was pinned: {} through, {} dropped; after: {} through, {} dropped",
        count(false, true),
        count(false, false),
        count(true, true),
        count(true, false)
    );
    assert!(
        count(false, true) > 0,
        "never got through before the start: {summary}"
    );
    assert!(count(true, false) >= 5, "{summary}");
    assert_eq!(
        count(true, true),
        0,
        "SYNs got a SYN-ACK after the gate was attached: {summary}"
    );
    let kernel = &stats(&d.cfg)["kernel"];
    assert_eq!(
        kernel["passed_by_cause"]["no_match"], 0,
        "the program passed a SYN it should have dropped: {kernel}"
    );
}
