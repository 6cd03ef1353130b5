//! Big admin operations stay cheap: importing a 300,000-line list and
//! listing it leave the daemon's memory where it was, give or take a
//! bounded working set. A memory assertion, not a timing one.

use std::{path::Path, time::Instant};

use integration_tests::{
    daemon::{daemon, ok},
    netns::{NetNs, PinDir},
};

/// The list: this many IPv6 /64s, one per line.
const LINES: u32 = 300_000;

/// The most resident memory the daemon may hold after importing and
/// listing them (the issue measured 605 MB before listings streamed).
const RSS_LIMIT_KB: u64 = 150 * 1024;

/// The daemon's resident set size in KiB, from /proc.
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in:\n{status}"))
}

fn write_list(path: &Path) {
    let mut text = String::with_capacity(LINES as usize * 24);
    for i in 0..LINES {
        text += &format!("2001:db8:{:x}:{:x}::/64\n", i >> 16, i & 0xffff);
    }
    std::fs::write(path, text).unwrap();
}

#[test]
fn importing_and_listing_300k_entries_keeps_the_daemon_small() {
    let ns = NetNs::new();
    let pins = PinDir::new(&format!("big{}", ns.n));
    let d = daemon(&ns, &pins, "skb", 25);
    let pid = d.child.0.as_ref().unwrap().id();
    let list = d.dir.path().join("list.txt");
    write_list(&list);
    let before = rss_kb(pid);

    let t = Instant::now();
    let out = ok(
        &d.cfg,
        &["import", list.to_str().unwrap(), "--format", "cidr"],
    );
    assert!(out.contains(&format!("added = {LINES}")), "{out}");
    eprintln!("import: {:?}, daemon RSS {} KiB", t.elapsed(), rss_kb(pid));

    let t = Instant::now();
    let json = ok(&d.cfg, &["block", "list", "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), LINES as usize);
    assert_eq!(rows[0]["reason"], "import", "{}", rows[0]);
    let text = ok(&d.cfg, &["block", "list"]);
    assert_eq!(text.lines().count(), LINES as usize);
    eprintln!(
        "listings: {:?}, daemon RSS {} KiB",
        t.elapsed(),
        rss_kb(pid)
    );

    // The same list again: every entry is kept, nothing added.
    let out = ok(
        &d.cfg,
        &["import", list.to_str().unwrap(), "--format", "cidr"],
    );
    assert!(out.contains(&format!("kept = {LINES}")), "{out}");

    let after = rss_kb(pid);
    eprintln!("daemon RSS: {before} KiB at start, {after} KiB after");
    assert!(
        after < RSS_LIMIT_KB,
        "the daemon holds {after} KiB after importing and listing {LINES} entries (limit {RSS_LIMIT_KB} KiB)"
    );
}
