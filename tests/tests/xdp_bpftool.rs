//! bpftool reads the pinned maps with named fields: an operator can see
//! the address, prefix length, reason and expiry of every entry without
//! knowing the layout. Needs root and Debian's `bpftool`.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
};

use integration_tests::{config, ensure_bpffs, entry, packet::syn, Gate, Ports, SMTP_PORTS};
use screener_common::{
    map_names as m, stat, Config, Reason, FLAG_HAS_V4_ALLOW, FLAG_HAS_V4_CIDRS, FLAG_HAS_V4_HOSTS,
    FLAG_HAS_V6_ALLOW, FLAG_HAS_V6_CIDRS, FLAG_HAS_V6_HOSTS, LAYOUT_VERSION, PORT_WORDS,
};
use serde_json::Value;

/// A directory under /sys/fs/bpf holding this test's pins; removed with
/// everything in it on drop, even when the test fails.
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> Self {
        ensure_bpffs().expect("bpffs on /sys/fs/bpf");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/screener-test-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).expect("create the pin directory");
        PinDir(dir)
    }

    fn path(&self, map: &str) -> PathBuf {
        self.0.join(map)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `bpftool -j map dump pinned PATH`, parsed.
fn dump(path: &Path) -> Vec<Value> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run bpftool ({e}): install the Debian package `bpftool`")
        });
    assert!(
        out.status.success(),
        "bpftool map dump {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool printed no JSON array ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn octets_json(bytes: &[u8]) -> Value {
    Value::from(bytes.to_vec())
}

/// The one entry of a dumped map, its `formatted` part.
fn only(dump: &[Value], map: &str) -> Value {
    assert_eq!(dump.len(), 1, "{map}: {dump:?}");
    dump[0]
        .get("formatted")
        .unwrap_or_else(|| panic!("{map}: no `formatted` (no BTF?): {}", dump[0]))
        .clone()
}

/// Checks a dumped `Entry` value by field name.
fn assert_entry(map: &str, value: &Value, reason: u32, expires: u32, hits: u32) {
    for (field, want) in [
        ("reason", reason),
        ("expires", expires),
        ("hits", hits),
        ("flags", 0),
    ] {
        assert_eq!(
            value.get(field).and_then(Value::as_u64),
            Some(u64::from(want)),
            "{map}: field `{field}` in {value}"
        );
    }
}

/// Checks a dumped LPM trie key: named prefix length and address bytes.
fn assert_trie_key(map: &str, key: &Value, prefix: u32, addr: &[u8]) {
    assert_eq!(
        key.get("prefix_len").and_then(Value::as_u64),
        Some(u64::from(prefix)),
        "{map}: key {key}"
    );
    assert_eq!(
        key.get("data"),
        Some(&octets_json(addr)),
        "{map}: key {key}"
    );
}

#[test]
fn pinned_maps_dump_with_named_fields() {
    let mut g = Gate::load().expect("load the XDP program");
    let pins = PinDir::new();
    for name in m::ALL {
        g.ebpf()
            .map(name)
            .unwrap_or_else(|| panic!("no map {name}"))
            .pin(pins.path(name))
            .unwrap_or_else(|e| panic!("pin {name}: {e}"));
    }

    let host4 = Ipv4Addr::new(203, 0, 113, 7);
    let key6: Ipv6Addr = "2001:db8:bad:1::".parse().unwrap();
    let net4 = Ipv4Addr::new(198, 51, 100, 0);
    let net6: Ipv6Addr = "2001:db8:bad::".parse().unwrap();
    let allow4 = Ipv4Addr::new(192, 0, 2, 16);
    let allow6: Ipv6Addr = "2001:db8:600d::".parse().unwrap();
    let flags = FLAG_HAS_V4_HOSTS
        | FLAG_HAS_V6_HOSTS
        | FLAG_HAS_V4_CIDRS
        | FLAG_HAS_V6_CIDRS
        | FLAG_HAS_V4_ALLOW
        | FLAG_HAS_V6_ALLOW;
    let cfg = config(flags, 64, Ports::List(&SMTP_PORTS));
    g.set_config(m::CONFIG, &cfg).unwrap();
    let pregreet = Reason::Pregreet as u32;
    g.put_hash(m::BLOCK_V4, host4.octets(), &entry(pregreet, 4_000_000_000))
        .unwrap();
    g.put_hash(m::BLOCK_V6, key6.octets(), &entry(Reason::Dnsbl as u32, 0))
        .unwrap();
    g.put_trie(
        m::BLOCK_V4_CIDR,
        24,
        net4.octets(),
        &entry(Reason::Escalation as u32, 77),
    )
    .unwrap();
    g.put_trie(
        m::BLOCK_V6_CIDR,
        48,
        net6.octets(),
        &entry(Reason::Import as u32, 0),
    )
    .unwrap();
    g.put_trie(m::ALLOW_V4, 28, allow4.octets(), &entry(0, 0))
        .unwrap();
    g.put_trie(m::ALLOW_V6, 48, allow6.octets(), &entry(0, 0))
        .unwrap();
    // One drop, so a hit and a counter show up in the dumps.
    let action = g.run(&syn(host4.into(), 25).build().bytes).unwrap();
    assert_eq!(action, integration_tests::XDP_DROP);

    let e = only(&dump(&pins.path(m::BLOCK_V4)), m::BLOCK_V4);
    assert_eq!(e["key"], octets_json(&host4.octets()), "block_v4 key: {e}");
    assert_entry(m::BLOCK_V4, &e["value"], pregreet, 4_000_000_000, 1);

    let e = only(&dump(&pins.path(m::BLOCK_V6)), m::BLOCK_V6);
    assert_eq!(e["key"], octets_json(&key6.octets()), "block_v6 key: {e}");
    assert_entry(m::BLOCK_V6, &e["value"], Reason::Dnsbl as u32, 0, 0);

    let e = only(&dump(&pins.path(m::BLOCK_V4_CIDR)), m::BLOCK_V4_CIDR);
    assert_trie_key(m::BLOCK_V4_CIDR, &e["key"], 24, &net4.octets());
    assert_entry(
        m::BLOCK_V4_CIDR,
        &e["value"],
        Reason::Escalation as u32,
        77,
        0,
    );

    let e = only(&dump(&pins.path(m::BLOCK_V6_CIDR)), m::BLOCK_V6_CIDR);
    assert_trie_key(m::BLOCK_V6_CIDR, &e["key"], 48, &net6.octets());
    assert_entry(m::BLOCK_V6_CIDR, &e["value"], Reason::Import as u32, 0, 0);

    let e = only(&dump(&pins.path(m::ALLOW_V4)), m::ALLOW_V4);
    assert_trie_key(m::ALLOW_V4, &e["key"], 28, &allow4.octets());
    assert_entry(m::ALLOW_V4, &e["value"], 0, 0, 0);

    let e = only(&dump(&pins.path(m::ALLOW_V6)), m::ALLOW_V6);
    assert_trie_key(m::ALLOW_V6, &e["key"], 48, &allow6.octets());
    assert_entry(m::ALLOW_V6, &e["value"], 0, 0, 0);

    check_config(&pins, &cfg);
    check_stats(&pins, stat::DROP_BASE + pregreet);
}

/// The settings dump names every field, the port bitmap as words.
fn check_config(pins: &PinDir, cfg: &Config) {
    let e = only(&dump(&pins.path(m::CONFIG)), m::CONFIG);
    let v = &e["value"];
    assert_eq!(
        v["layout"].as_u64(),
        Some(u64::from(LAYOUT_VERSION)),
        "config: {v}"
    );
    assert_eq!(v["ipv6_prefix"].as_u64(), Some(64), "config: {v}");
    assert_eq!(
        v["flags"].as_u64(),
        Some(u64::from(cfg.flags)),
        "config: {v}"
    );
    let ports = v["ports"].as_array().expect("config.ports is an array");
    assert_eq!(ports.len(), PORT_WORDS);
    for p in SMTP_PORTS {
        let word = ports[usize::from(p >> 6)].as_u64().expect("a port word");
        assert_ne!(word & (1 << (p & 63)), 0, "port {p} in config.ports");
    }
    let set: u32 = ports.iter().map(|w| w.as_u64().unwrap().count_ones()).sum();
    assert_eq!(set, 3, "only the SMTP ports are set");
}

/// Per-CPU counters: one row per index, one value per CPU; only `index`
/// counted, once.
fn check_stats(pins: &PinDir, index_hit: u32) {
    let rows = dump(&pins.path(m::STATS));
    assert_eq!(rows.len(), stat::LEN as usize);
    let mut total = 0;
    for r in &rows {
        let f = &r["formatted"];
        let index = f["key"].as_u64().expect("stats key is the index");
        let sum: u64 = f["values"]
            .as_array()
            .unwrap_or_else(|| panic!("stats values per CPU: {f}"))
            .iter()
            .map(|v| {
                assert!(v["cpu"].is_u64(), "per-CPU value names its CPU: {v}");
                v["value"].as_u64().expect("a counter")
            })
            .sum();
        let want = u64::from(index == u64::from(index_hit));
        assert_eq!(sum, want, "stats[{index}]: {f}");
        total += sum;
    }
    assert_eq!(total, 1);
}
