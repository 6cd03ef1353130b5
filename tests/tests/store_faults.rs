//! The store never erases the kernel, and its faults fail cleanly: a
//! deleted, emptied, partly unreadable, damaged or full store must never
//! let a blocked source through at the NIC, and what the kernel held must
//! end up back in the store.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use integration_tests::{
    daemon::{blocked, cli, ok, set, start, stats, write_config},
    netns::{listen, wait_for, ChildGuard, NetNs, PinDir},
    store_damage,
};

const DROPPED: Duration = Duration::from_secs(1);

/// A namespace with a TCP listener on the host side of its veth, guarded by
/// a daemon's XDP gate on that port.
struct Guarded {
    ns: NetNs,
    pins: PinDir,
    dir: tempfile::TempDir,
    cfg: PathBuf,
    /// The listener the namespace's clients try to reach.
    to: SocketAddr,
}

impl Guarded {
    fn new(tag: &str) -> Guarded {
        let g = Guarded::unserved(tag);
        listen(g.to);
        g
    }

    /// Without a listener at `to`: the caller puts one there.
    fn unserved(tag: &str) -> Guarded {
        let ns = NetNs::new();
        let pins = PinDir::new(&format!("{tag}{}", ns.n));
        let port = 2700 + u16::try_from(ns.n).unwrap();
        let to = SocketAddr::new(ns.host_v4(), port);
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(dir.path(), &ns, &pins, "skb", port);
        Guarded {
            ns,
            pins,
            dir,
            cfg,
            to,
        }
    }

    /// The daemon's SMTP listener at `to`, a 1 s greeting wait, and a
    /// pregreeting client rejected at once.
    fn screening(tag: &str) -> Guarded {
        let g = Guarded::unserved(tag);
        set(&g.cfg, "smtp", &format!("listen = [\"{}\"]", g.to));
        set(&g.cfg, "smtp", "backend = \"127.0.0.1:9\"");
        set(&g.cfg, "screen", "greet_wait = \"1s\"");
        set(&g.cfg, "screen", "greet_action = \"drop\"");
        g
    }

    /// `from` talks before the greeting ends; the reply it gets.
    fn pregreet(&self, from: IpAddr) -> String {
        let mut s = self
            .ns
            .tcp_from(from, self.to, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{from} could not connect to {}", self.to));
        s.write_all(b"EHLO bot.example\r\n").unwrap();
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        reply
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("screener.redb")
    }

    /// The daemon's `stats --json` `store` section.
    fn store_health(&self) -> serde_json::Value {
        stats(&self.cfg)["store"].clone()
    }

    fn start(&self, n: u32) -> ChildGuard {
        start(&self.cfg, self.dir.path(), n)
    }

    fn log(&self, n: u32) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("daemon{n}.log"))).unwrap_or_default()
    }

    fn reaches(&self, from: IpAddr) -> bool {
        self.ns.connects(from, self.to, DROPPED)
    }

    /// What a reboot does to the gate: the pins are gone.
    fn reboot(&self) {
        screener::xdp::detach(&self.pins.0).unwrap();
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[track_caller]
fn assert_contains(log: &str, needle: &str) {
    assert!(log.contains(needle), "no {needle:?} in:\n{log}");
}

#[test]
fn a_deleted_store_adopts_the_pinned_blocks_instead_of_removing_them() {
    let g = Guarded::new("adopt");
    let bot = g.ns.client_v4();
    let mut d = g.start(0);
    ok(&g.cfg, &["block", "add", &bot.to_string(), "--ttl", "2h"]);
    ok(
        &g.cfg,
        &["block", "add", "2001:db8:ffff::/48", "--reason", "spam run"],
    );
    ok(&g.cfg, &["allow", "add", "198.51.100.0/24"]);
    assert!(!g.reaches(bot), "the blocked bot got through");
    d.kill9();

    // The store is lost; the pinned maps are not.
    std::fs::remove_file(g.store()).unwrap();
    let mut d = g.start(1);
    assert!(
        !g.reaches(bot),
        "a restart with an empty store opened the gate"
    );
    assert!(
        g.reaches(g.ns.neighbour_v4()),
        "the neighbour is dropped: {}",
        g.log(1)
    );
    let log = g.log(1);
    assert_contains(&log, "WARN");
    assert_contains(&log, "3 adopted from the kernel into the store");
    assert!(!log.contains("UNBLOCK"), "{log}");
    assert_eq!(
        sorted(blocked(&g.cfg)),
        vec![format!("{bot}/32"), "2001:db8:ffff::/48".to_owned()]
    );
    let list = ok(&g.cfg, &["block", "list"]);
    assert!(list.contains("manual"), "{list}");
    d.kill9();

    // The adopted entries are in the store now: after a reboot (pins gone)
    // they come back from it, with the lifetime the kernel had left.
    g.reboot();
    let _d = g.start(2);
    assert!(!g.reaches(bot), "the adopted block was not stored");
    assert_contains(&g.log(2), "3 restored into the kernel");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&g.cfg, &["block", "list", "--json"])).unwrap();
    let bot_entry = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["net"] == format!("{bot}/32"))
        .unwrap();
    let left = bot_entry["expires_in"].as_u64().unwrap();
    assert!((6000..=7200).contains(&left), "{bot_entry}");
    assert!(ok(&g.cfg, &["allow", "list"]).contains("198.51.100.0/24"));
}

#[test]
fn one_unreadable_record_is_skipped_and_named_the_rest_restored() {
    let g = Guarded::new("skip");
    let bot = g.ns.client_v4();
    let mut d = g.start(0);
    let others: Vec<String> = (1..=20).map(|i| format!("198.51.100.{i}")).collect();
    let mut args = vec!["block", "add"];
    args.extend(others.iter().map(String::as_str));
    ok(&g.cfg, &args);
    ok(&g.cfg, &["block", "add", &bot.to_string()]);
    d.kill9();

    store_damage::scribble_block_record(&g.store(), "198.51.100.7/32");
    g.reboot();
    assert!(g.reaches(bot), "the reboot left the bot blocked");

    let _d = g.start(1);
    assert!(!g.reaches(bot), "the bot's block was not restored");
    let log = g.log(1);
    let error = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("unreadable store record"))
        .unwrap_or_else(|| panic!("no ERROR line naming the record:\n{log}"));
    assert!(
        error.contains("table blocks") && error.contains("198.51.100.7/32"),
        "{error}"
    );
    assert_contains(&log, "20 restored into the kernel");
    assert_contains(&log, "1 unreadable records skipped");
    let mut want: Vec<String> = others
        .iter()
        .filter(|a| *a != "198.51.100.7")
        .map(|a| format!("{a}/32"))
        .collect();
    want.push(format!("{bot}/32"));
    assert_eq!(sorted(blocked(&g.cfg)), sorted(want));
}

/// Runs the daemon on `g` to its exit; (success, output).
fn run_to_exit(g: &Guarded) -> (bool, String) {
    let out = std::process::Command::new(integration_tests::netns::screener_bin())
        .arg("-c")
        .arg(&g.cfg)
        .arg("run")
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

/// A daemon on `g` that blocked the namespace's client (with `reason`) and
/// a few hundred IPv6 prefixes, killed; returns the bot.
fn blocked_then_killed(g: &Guarded, reason: &str) -> IpAddr {
    let bot = g.ns.client_v4();
    let mut d = g.start(0);
    let list = g.dir.path().join("list.txt");
    let lines = (0..600)
        .map(|i| format!("2001:db8:ff:{i:x}::/64"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&list, lines).unwrap();
    ok(
        &g.cfg,
        &["import", list.to_str().unwrap(), "--format", "cidr"],
    );
    ok(
        &g.cfg,
        &["block", "add", &bot.to_string(), "--reason", reason],
    );
    assert!(!g.reaches(bot), "the blocked bot got through");
    d.kill9();
    bot
}

/// The damaged store stops the daemon cleanly; the pinned gate keeps
/// dropping; `store check` says what is wrong; `store repair` rebuilds it
/// and the daemon starts again with every verdict.
fn damaged_store_cycle(g: &Guarded, bot: IpAddr, what_check_says: &str) {
    let (started, out) = run_to_exit(g);
    assert!(!started, "the daemon started on a damaged store: {out}");
    let store = g.store().display().to_string();
    assert_contains(&out, &format!("store {store} is damaged"));
    assert_contains(&out, "screener store repair");
    assert!(
        !out.contains("thread '") && !out.contains("task "),
        "a panic escaped: {out}"
    );
    assert!(
        !g.reaches(bot),
        "the gate opened while the store is damaged"
    );

    let (healthy, report) = cli(&g.cfg, &["store", "check"]);
    assert!(!healthy, "store check passed a damaged store: {report}");
    assert_contains(&report, what_check_says);
    assert_contains(&report, "DAMAGED");

    let repaired = ok(&g.cfg, &["store", "repair"]);
    assert_contains(&repaired, "the damaged file is kept as");
    let kept = std::fs::read_dir(g.dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("screener.redb.damaged-")
        });
    assert!(kept, "{repaired}");
    assert_contains(&ok(&g.cfg, &["store", "check"]), "healthy");

    let mut d = g.start(1);
    assert!(!g.reaches(bot), "the bot got through after the repair");
    let list = blocked(&g.cfg);
    assert!(list.contains(&format!("{bot}/32")), "{list:?}");
    d.kill9();
    // The repaired store holds the bot's verdict itself: a reboot brings
    // it back.
    g.reboot();
    let _d = g.start(2);
    assert!(!g.reaches(bot), "the repaired store lost the bot's block");
}

#[test]
fn a_scribbled_store_fails_cleanly_and_repair_brings_it_back() {
    let g = Guarded::new("scrib");
    let bot = blocked_then_killed(&g, "scribble-here");
    store_damage::settle(&g.store());
    let pages = store_damage::scribble_pages_holding(&g.store(), b"scribble-here");
    assert!(pages >= 1);
    damaged_store_cycle(&g, bot, "damaged");
}

#[test]
fn a_truncated_store_fails_cleanly_and_repair_brings_it_back() {
    let g = Guarded::new("trunc");
    let bot = blocked_then_killed(&g, "manual");
    store_damage::settle(&g.store());
    store_damage::truncate(&g.store(), 0.5);
    damaged_store_cycle(&g, bot, "cut short");
}

#[test]
fn entries_made_while_detached_say_so_and_reach_the_kernel_later() {
    let g = Guarded::new("detached");
    let bot = g.ns.client_v4();
    let mut d = g.start(0);
    ok(&g.cfg, &["xdp", "detach"]);
    let out = ok(&g.cfg, &["block", "add", &bot.to_string()]);
    assert_eq!(
        out.trim(),
        format!("recorded {bot}/32; the XDP gate is detached"),
        "{out}"
    );
    let out = ok(&g.cfg, &["allow", "add", "198.51.100.0/24"]);
    assert_eq!(
        out.trim(),
        "recorded 198.51.100.0/24; the XDP gate is detached"
    );
    // Nothing reached a kernel: the bot still connects.
    assert!(g.reaches(bot), "nothing should drop while detached");
    assert_eq!(blocked(&g.cfg), vec![format!("{bot}/32")]);
    d.kill9();

    // The next start loads the gate and the recorded entry with it.
    let _d = g.start(1);
    assert!(
        !g.reaches(bot),
        "the recorded block did not reach the kernel"
    );
    let out = ok(&g.cfg, &["block", "add", "203.0.113.9"]);
    assert_eq!(out.trim(), "blocked 203.0.113.9/32");
}

#[test]
fn a_full_disk_keeps_verdicts_at_the_nic_and_the_store_catches_up() {
    let g = Guarded::screening("full");
    let disk = store_damage::Tmpfs::new("2m");
    let store = disk.dir.path().join("screener.redb");
    set(&g.cfg, "store", &format!("path = \"{}\"", store.display()));
    let bot = g.ns.client_v4();
    let mut d = g.start(0);
    // The admin socket answers before the SMTP listener is bound.
    wait_for("the SMTP listener", Duration::from_secs(10), || {
        g.log(0).contains("smtp listening on")
    });
    let filler = disk.fill();

    // An operator's block and a bot's verdict, both while the disk is full.
    let manual = g.ns.neighbour_v4();
    assert_eq!(
        ok(&g.cfg, &["block", "add", &manual.to_string()]).trim(),
        format!("blocked {manual}/32")
    );
    assert!(!g.reaches(manual), "the manual block did not reach the NIC");
    let reply = g.pregreet(bot);
    assert!(reply.contains("521"), "pregreet not rejected: {reply:?}");
    wait_for("the bot's BLOCK", Duration::from_secs(10), || {
        g.log(0)
            .contains(&format!("BLOCK {bot}/32 reason=pregreet"))
    });
    assert!(
        !g.reaches(bot),
        "the bot got through while the disk is full"
    );
    let health = g.store_health();
    assert_eq!(health["writable"], false, "{health}");
    assert_eq!(health["queued"], 2, "{health}");

    // Space returns: the queued verdicts reach the file.
    std::fs::remove_file(filler).unwrap();
    wait_for("the store to catch up", Duration::from_secs(30), || {
        let h = g.store_health();
        h["queued"] == 0 && h["writable"] == true
    });
    let log = g.log(0);
    assert_eq!(
        log.matches("No space left on device").count(),
        1,
        "the cause should be logged once:\n{log}"
    );
    assert_contains(&log, "store works again");
    assert_contains(&log, "2 queued verdict changes written");
    d.kill9();

    // They are in the file: after a reboot they come back from it.
    g.reboot();
    let _d = g.start(1);
    assert!(!g.reaches(bot), "the bot's verdict was not stored");
    assert!(!g.reaches(manual), "the manual block was not stored");
    assert_eq!(
        sorted(blocked(&g.cfg)),
        sorted(vec![format!("{bot}/32"), format!("{manual}/32")])
    );
}

/// Sets the meta layout numbers of the (closed) store at `path`.
fn set_layouts(path: &std::path::Path, numbers: &[(&str, u64)]) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let def: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        let mut meta = txn.open_table(def).unwrap();
        for (k, v) in numbers {
            meta.insert(*k, *v).unwrap();
        }
    }
    txn.commit().unwrap();
}

#[test]
fn a_store_of_a_later_layout_is_refused_and_the_pinned_gate_is_left_alone() {
    let g = Guarded::new("later");
    let bot = blocked_then_killed(&g, "manual");
    store_damage::settle(&g.store());
    let pinned = |g: &Guarded| {
        let p = screener::verdict::pinned_verdicts(&g.pins.0).unwrap();
        sorted(p.blocks.iter().map(|b| b.net.to_string()).collect())
    };
    let before = pinned(&g);
    assert_eq!(before.len(), 601, "{before:?}");
    // What a later release with another cache record encoding leaves.
    set_layouts(&g.store(), &[("layout.clients", 9)]);

    let (started, out) = run_to_exit(&g);
    assert!(
        !started,
        "the daemon started on a store it cannot read: {out}"
    );
    assert_contains(
        &out,
        &format!(
            "store {}: table clients has layout 9, this build reads layout 2",
            g.store().display()
        ),
    );
    assert_contains(&out, "later release");
    assert!(!g.reaches(bot), "the gate opened on a refused store");
    assert_eq!(pinned(&g), before, "the refused store changed the kernel");
    let (healthy, report) = cli(&g.cfg, &["store", "check"]);
    assert!(!healthy, "{report}");
    assert_contains(&report, "NOT READABLE BY THIS BUILD");

    // Back to a layout this build reads, nothing was lost.
    set_layouts(&g.store(), &[("layout.clients", 2)]);
    let _d = g.start(1);
    assert!(!g.reaches(bot), "the bot got through");
    assert_eq!(sorted(blocked(&g.cfg)), before);
}
