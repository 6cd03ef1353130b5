use std::time::Instant;

use super::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn block(n: &str, list: Option<&str>) -> BlockRecord {
    BlockRecord {
        net: net(n),
        reason: "test".into(),
        expires: 0,
        added: 100,
        list: list.map(str::to_owned),
        origin: None,
        offences: 1,
    }
}

/// A store in a fresh temp dir; the dir lives as long as the returned guard.
/// A record's expiries by test, every other test 0, so a record is
/// written without counting positions (and a new test needs no edit here).
fn expiries(by_test: &[(Test, u64)]) -> [u64; Test::COUNT] {
    let mut e = [0; Test::COUNT];
    for &(t, v) in by_test {
        e[t.index()] = v;
    }
    e
}

fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.redb")).unwrap();
    (dir, store)
}

#[test]
fn test_names_and_indexes_agree() {
    for (i, t) in Test::ALL.into_iter().enumerate() {
        assert_eq!(t.index(), i);
        assert_eq!(Test::from_name(t.name()), Some(t));
    }
    assert_eq!(Test::ALL.len(), Test::COUNT);
    assert_eq!(Test::NonSmtpCommand.name(), "non_smtp_command");
    assert_eq!(Test::from_name("greylist"), None);
}

#[test]
fn passed_compares_expiry_with_now() {
    let mut r = ClientRecord::default();
    assert!(!r.passed(Test::Dnsbl, 0));
    r.expires[Test::Dnsbl.index()] = 50;
    assert!(r.passed(Test::Dnsbl, 49));
    assert!(!r.passed(Test::Dnsbl, 50));
    assert!(!r.passed(Test::Pregreet, 10));
    assert_eq!(r.newest_expiry(), 50);
}

#[tokio::test]
async fn client_round_trip_and_delete() {
    let (_dir, s) = temp_store();
    let a = ip("192.0.2.1");
    assert_eq!(s.client(a).await.unwrap(), None);
    let rec = ClientRecord {
        expires: expiries(&[
            (Test::Pregreet, 10),
            (Test::Dnsbl, 20),
            (Test::BareNewline, 30),
        ]),
        first_seen: 5,
        last_seen: 6,
        later: Vec::new(),
    };
    s.put_client(a, rec.clone()).await.unwrap();
    assert_eq!(s.client(a).await.unwrap(), Some(rec.clone()));
    let newer = ClientRecord {
        last_seen: 9,
        ..rec
    };
    s.put_client(a, newer.clone()).await.unwrap();
    assert_eq!(s.clients().await.unwrap(), vec![(a, newer)]);
    assert!(s.delete_client(a).await.unwrap());
    assert!(!s.delete_client(a).await.unwrap());
    assert_eq!(s.client(a).await.unwrap(), None);
}

#[tokio::test]
async fn ipv4_and_ipv6_keys_are_distinct_and_mapped_folds() {
    let (_dir, s) = temp_store();
    let v4 = ip("192.0.2.1");
    // Same low 32 bits as the IPv4 address, to catch a key that drops the family.
    let v6 = ip("2001:db8::c000:201");
    let compat = ip("::c000:201");
    let rec = |n| ClientRecord {
        first_seen: n,
        ..ClientRecord::default()
    };
    s.put_client(v4, rec(4)).await.unwrap();
    s.put_client(v6, rec(6)).await.unwrap();
    s.put_client(compat, rec(7)).await.unwrap();
    assert_eq!(s.client(v4).await.unwrap(), Some(rec(4)));
    assert_eq!(s.client(v6).await.unwrap(), Some(rec(6)));
    assert_eq!(s.client(compat).await.unwrap(), Some(rec(7)));
    // A dual-stack socket's view of the IPv4 client is the same client.
    assert_eq!(
        s.client(ip("::ffff:192.0.2.1")).await.unwrap(),
        Some(rec(4))
    );
    let all = s.clients().await.unwrap();
    assert_eq!(
        all.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        vec![v4, compat, v6],
        "IPv4 first, then IPv6 in address order"
    );

    s.put_block(block("192.0.2.0/24", None)).await.unwrap();
    s.put_block(block("::c000:200/120", None)).await.unwrap();
    assert_eq!(s.blocks().await.unwrap().len(), 2);
}

#[tokio::test]
async fn purge_clients_counts() {
    let (_dir, s) = temp_store();
    for i in 1..=3 {
        s.put_client(IpAddr::from([192, 0, 2, i]), ClientRecord::default())
            .await
            .unwrap();
    }
    assert_eq!(s.purge_clients().await.unwrap(), 3);
    assert!(s.clients().await.unwrap().is_empty());
    assert_eq!(s.purge_clients().await.unwrap(), 0);
}

#[tokio::test]
async fn cleanup_keeps_records_within_retention() {
    let (_dir, s) = temp_store();
    let now = 1_000_000;
    let day = 86_400;
    let retention = Duration::from_secs(7 * day);
    let with = |newest| ClientRecord {
        expires: expiries(&[
            (Test::Pregreet, 1),
            (Test::Dnsbl, newest),
            (Test::BareNewline, 2),
        ]),
        first_seen: 1,
        last_seen: 1,
        later: Vec::new(),
    };
    let live = ip("192.0.2.1"); // pass still valid
    let recent = ip("192.0.2.2"); // expired a day ago: kept
    let edge = ip("192.0.2.3"); // expired exactly at the cutoff: kept
    let old = ip("192.0.2.4"); // expired 8 days ago: removed
    let never = ip("2001:db8::1"); // never passed anything: removed
    s.put_client(live, with(now + 10)).await.unwrap();
    s.put_client(recent, with(now - day)).await.unwrap();
    s.put_client(edge, with(now - 7 * day)).await.unwrap();
    s.put_client(old, with(now - 8 * day)).await.unwrap();
    s.put_client(never, ClientRecord::default()).await.unwrap();

    let lapsed = BlockRecord {
        expires: now - 8 * day,
        ..block("198.51.100.0/24", None)
    };
    let fresh_lapse = BlockRecord {
        expires: now - day,
        ..block("198.51.100.1/32", None)
    };
    let permanent = block("203.0.113.0/24", None);
    for b in [&lapsed, &fresh_lapse, &permanent] {
        s.put_block(b.clone()).await.unwrap();
    }

    assert_eq!(s.cleanup(now, retention).await.unwrap(), 3);
    let left: Vec<IpAddr> = s
        .clients()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(left, vec![live, recent, edge]);
    assert_eq!(s.blocks().await.unwrap(), vec![fresh_lapse, permanent]);
    assert_eq!(s.cleanup(now, retention).await.unwrap(), 0);
}

#[tokio::test]
async fn blocks_are_keyed_by_normalised_net() {
    let (_dir, s) = temp_store();
    s.put_block(block("198.51.100.77/24", None)).await.unwrap();
    let got = s.block(net("198.51.100.0/24")).await.unwrap().unwrap();
    assert_eq!(got.net, net("198.51.100.0/24"));
    assert_eq!(
        s.block(net("198.51.100.1/24")).await.unwrap(),
        Some(got.clone())
    );
    // Prefix length is part of the key; no covering match.
    assert_eq!(s.block(net("198.51.100.0/25")).await.unwrap(), None);
    assert_eq!(s.block(net("198.51.100.5/32")).await.unwrap(), None);

    let replaced = BlockRecord {
        reason: "again".into(),
        offences: 2,
        ..got.clone()
    };
    s.put_block(replaced.clone()).await.unwrap();
    assert_eq!(s.blocks().await.unwrap(), vec![replaced.clone()]);
    assert_eq!(
        s.del_block(net("198.51.100.9/24")).await.unwrap(),
        Some(replaced)
    );
    assert_eq!(s.del_block(net("198.51.100.0/24")).await.unwrap(), None);
    assert!(s.blocks().await.unwrap().is_empty());
}

#[tokio::test]
async fn allow_round_trip() {
    let (_dir, s) = temp_store();
    let a = AllowRecord {
        net: net("2001:db8:1::/48"),
        added: 5,
        comment: Some("partner".into()),
    };
    let b = AllowRecord {
        net: net("192.0.2.0/24"),
        added: 6,
        comment: None,
    };
    s.put_allow(a.clone()).await.unwrap();
    s.put_allow(b.clone()).await.unwrap();
    assert_eq!(s.allows().await.unwrap(), vec![b, a]);
    assert!(s.del_allow(net("2001:db8:1::1/48")).await.unwrap());
    assert!(!s.del_allow(net("2001:db8:1::/48")).await.unwrap());
    assert_eq!(s.allows().await.unwrap().len(), 1);
}

fn list(nets: &[&str], reason: &str, expires: u64) -> ListEntries {
    ListEntries {
        nets: nets.iter().map(|n| net(n)).collect(),
        reason: reason.into(),
        expires,
        added: 500,
    }
}

#[tokio::test]
async fn replace_list_adds_removes_keeps_and_leaves_other_owners() {
    let (_dir, s) = temp_store();
    let manual = block("203.0.113.0/24", None);
    let other = block("198.51.100.0/24", Some("other"));
    s.put_block(manual.clone()).await.unwrap();
    s.put_block(other.clone()).await.unwrap();

    let first = list(
        &["192.0.2.0/28", "192.0.2.16/28", "2001:db8::/32"],
        "import",
        0,
    );
    let c = s.replace_list("drop", first).await.unwrap();
    assert_eq!((c.added, c.removed, c.kept, c.shadowed), (3, 0, 0, 0));
    let stored = s.block(net("192.0.2.16/28")).await.unwrap().unwrap();
    assert_eq!(stored.list.as_deref(), Some("drop"));
    assert_eq!((stored.added, stored.offences), (500, 1));

    let second = list(
        &[
            "192.0.2.5/28", // host bits: same net as 192.0.2.0/28
            "192.0.2.32/28",
            "192.0.2.32/28",   // duplicate collapses
            "203.0.113.0/24",  // held by the manual block
            "198.51.100.0/24", // held by list "other"
        ],
        "new reason",
        999,
    );
    let c = s.replace_list("drop", second).await.unwrap();
    assert_eq!((c.added, c.removed, c.kept, c.shadowed), (1, 2, 1, 2));
    assert_eq!(
        c.removed_nets,
        vec![net("192.0.2.16/28"), net("2001:db8::/32")]
    );
    let kept = s.block(net("192.0.2.0/28")).await.unwrap().unwrap();
    assert_eq!(kept.reason, "new reason");
    assert_eq!(kept.expires, 999);
    assert_eq!(kept.added, 500, "first-added time survives a refresh");
    assert_eq!(kept.offences, 1);
    assert_eq!(c.current, vec![net("192.0.2.0/28"), net("192.0.2.32/28")]);

    assert_eq!(s.block(manual.net).await.unwrap(), Some(manual.clone()));
    assert_eq!(s.block(other.net).await.unwrap(), Some(other.clone()));

    let c = s.replace_list("drop", list(&[], "x", 0)).await.unwrap();
    assert_eq!((c.added, c.removed, c.kept, c.shadowed), (0, 2, 0, 0));
    assert_eq!(s.blocks().await.unwrap(), vec![other, manual]);
}

#[tokio::test]
async fn replace_list_with_100k_entries() {
    let (_dir, s) = temp_store();
    let entries = |offset: u32| ListEntries {
        nets: (0..100_000u32)
            .map(|i| {
                let a = std::net::Ipv6Addr::from((0x2001_0db8_u128 << 96) | u128::from(i + offset));
                IpNet::from(IpAddr::V6(a))
            })
            .collect(),
        reason: "import".into(),
        expires: 0,
        added: 1,
    };
    let t = Instant::now();
    let c = s.replace_list("big", entries(0)).await.unwrap();
    let first = t.elapsed();
    assert_eq!((c.added, c.removed, c.kept), (100_000, 0, 0));

    let t = Instant::now();
    let c = s.replace_list("big", entries(50_000)).await.unwrap();
    let second = t.elapsed();
    assert_eq!((c.added, c.removed, c.kept), (50_000, 50_000, 50_000));
    assert_eq!(s.blocks().await.unwrap().len(), 100_000);
    eprintln!("replace_list 100k: first {first:?}, second {second:?}");
}

#[tokio::test]
async fn data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/deeper/s.redb");
    let rec = ClientRecord {
        expires: std::array::from_fn(|i| i as u64 + 1),
        first_seen: 1,
        last_seen: 2,
        later: Vec::new(),
    };
    {
        let s = Store::open(&path).unwrap();
        s.put_client(ip("2001:db8::5"), rec.clone()).await.unwrap();
        s.put_block(block("192.0.2.0/24", Some("l"))).await.unwrap();
        s.put_allow(AllowRecord {
            net: net("198.51.100.0/24"),
            added: 1,
            comment: None,
        })
        .await
        .unwrap();
    }
    let s = Store::open(&path).unwrap();
    assert_eq!(s.client(ip("2001:db8::5")).await.unwrap(), Some(rec));
    assert_eq!(
        s.blocks().await.unwrap(),
        vec![block("192.0.2.0/24", Some("l"))]
    );
    assert_eq!(s.allows().await.unwrap().len(), 1);
}

#[test]
fn garbage_file_is_a_damaged_store_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.redb");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Damaged { .. }), "{err:?}");
    assert!(err.to_string().contains("junk.redb"), "{err}");
}

#[test]
fn unusable_parent_is_a_create_dir_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let err = Store::open(&file.join("s.redb")).unwrap_err();
    assert!(matches!(err, StoreError::CreateDir { .. }), "{err:?}");
    assert!(err.to_string().contains("plain-file"), "{err}");
}

/// Sets meta `key` of the (closed) store at `path` to `value`, or removes
/// it.
fn set_meta(path: &Path, key: &str, value: Option<u64>) {
    let db = Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut meta = txn.open_table(META).unwrap();
        match value {
            Some(v) => meta.insert(key, v).unwrap(),
            None => meta.remove(key).unwrap(),
        };
    }
    txn.commit().unwrap();
}

/// The layout numbers of the (closed) store at `path`.
fn layouts(path: &Path) -> layout::Found {
    let db = Database::create(path).unwrap();
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(META).unwrap();
    layout::Found::read(|k| Ok(meta.get(k)?.map(|v| v.value()))).unwrap()
}

#[tokio::test]
async fn layouts_this_build_cannot_read_are_refused_naming_file_and_table() {
    use layout::{CLIENTS_KEY, FILE_KEY, VERDICTS_KEY};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let s = Store::open(&path).unwrap();
        s.put_block(block("192.0.2.0/24", None)).await.unwrap();
    }
    let cases = [
        (FILE_KEY, Some(3), "the file", Some(3), 2, true),
        (FILE_KEY, Some(0), "the file", Some(0), 2, false),
        (CLIENTS_KEY, Some(3), "table clients", Some(3), 2, true),
        (CLIENTS_KEY, None, "table clients", None, 2, false),
        (
            VERDICTS_KEY,
            Some(2),
            "tables blocks and allows",
            Some(2),
            1,
            true,
        ),
    ];
    for (key, value, part, found, expected, later) in cases {
        let before = layouts(&path);
        set_meta(&path, key, value);
        let err = Store::open(&path).unwrap_err();
        match &err {
            StoreError::Layout {
                part: p,
                found: f,
                expected: e,
                ..
            } => assert_eq!((*p, *f, *e), (part, found, expected), "{key}={value:?}"),
            other => panic!("{key}={value:?}: expected a layout error, got {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains(part), "{text}");
        assert!(text.contains(&format!("reads layout {expected}")), "{text}");
        assert!(text.contains("move the file away"), "{text}");
        assert_eq!(text.contains("later release"), later, "{text}");
        if let Some(v) = value {
            assert!(text.contains(&format!("has layout {v}")), "{text}");
        }
        // Refused, the file is left as it was.
        let mut after = before;
        match key {
            FILE_KEY => after.file = value,
            CLIENTS_KEY => after.clients = value,
            _ => after.verdicts = value,
        }
        assert_eq!(layouts(&path), after, "{key}={value:?}");
        let report = salvage::check(&path).unwrap();
        assert!(!report.healthy(), "{report}");
        assert_eq!(
            report.problem(),
            Some("of a layout this build cannot read"),
            "{report}"
        );
        let shown = report.to_string();
        assert!(shown.contains("NOT READABLE BY THIS BUILD"), "{shown}");
        assert!(!shown.contains("DAMAGED"), "{shown}");
        assert!(matches!(
            salvage::repair(&path, &salvage::Pinned::default()).unwrap_err(),
            StoreError::Layout { .. }
        ));
        set_meta(&path, key, before_value(before, key));
    }
    let s = Store::open(&path).unwrap();
    assert_eq!(s.blocks().await.unwrap(), vec![block("192.0.2.0/24", None)]);
}

fn before_value(f: layout::Found, key: &str) -> Option<u64> {
    match key {
        layout::FILE_KEY => f.file,
        layout::CLIENTS_KEY => f.clients,
        _ => f.verdicts,
    }
}

/// A cache record as layout 1 wrote it: five expiries, then the times.
fn legacy_client(expires: [u64; 5], first_seen: u64, last_seen: u64) -> Vec<u8> {
    let mut v = vec![codec::LEGACY_CLIENT_FORMAT];
    for e in expires.iter().chain(&[first_seen, last_seen]) {
        v.extend_from_slice(&e.to_le_bytes());
    }
    v
}

/// A layout-1 file as the first releases wrote it: two readable cache
/// records, one that does not decode, a block and an allow entry.
fn layout_1_file(path: &Path) {
    let db = Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(META).unwrap().insert("layout", 1).unwrap();
    {
        let mut t = txn.open_table(CLIENTS).unwrap();
        let a = codec::ip_key(ip("192.0.2.1"));
        t.insert(
            a.as_slice(),
            legacy_client([1, 2, 3, 4, 5], 6, 7).as_slice(),
        )
        .unwrap();
        let b = codec::ip_key(ip("2001:db8::2"));
        t.insert(
            b.as_slice(),
            legacy_client([10, 0, 0, 0, 50], 60, 70).as_slice(),
        )
        .unwrap();
        let c = codec::ip_key(ip("192.0.2.3"));
        t.insert(c.as_slice(), [1u8, 2, 3].as_slice()).unwrap();
    }
    txn.open_table(BLOCKS)
        .unwrap()
        .insert(
            codec::net_key(net("198.51.100.0/24")).as_slice(),
            codec::encode_block(&block("198.51.100.0/24", Some("l"))).as_slice(),
        )
        .unwrap();
    txn.open_table(ALLOWS)
        .unwrap()
        .insert(
            codec::net_key(net("203.0.113.0/24")).as_slice(),
            codec::encode_allow(&AllowRecord {
                net: net("203.0.113.0/24"),
                added: 8,
                comment: Some("c".into()),
            })
            .as_slice(),
        )
        .unwrap();
    txn.commit().unwrap();
}

/// The record [`layout_1_file`] holds for `addr`, read the new way.
fn upgraded(expires: [u64; 5], first_seen: u64, last_seen: u64) -> ClientRecord {
    let mut rec = ClientRecord {
        first_seen,
        last_seen,
        ..ClientRecord::default()
    };
    rec.expires[..5].copy_from_slice(&expires);
    rec
}

#[tokio::test]
async fn a_layout_1_file_is_upgraded_in_place_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    layout_1_file(&path);

    let report = salvage::check(&path).unwrap();
    assert_eq!(report.layouts.reading(), Ok(layout::Reading::Legacy));
    assert_eq!(report.census.readable("clients"), 2, "{report}");
    assert!(
        report.to_string().contains("upgrades it to layout 2"),
        "{report}"
    );

    let (s, census) = Store::open_census(&path).unwrap();
    // The undecodable record is left as it was and named.
    assert_eq!(census.readable("clients"), 2);
    assert_eq!(census.tables[0].unreadable.len(), 1);
    assert_eq!(census.tables[0].unreadable[0].key, "192.0.2.3");
    assert_eq!(
        s.client(ip("192.0.2.1")).await.unwrap(),
        Some(upgraded([1, 2, 3, 4, 5], 6, 7))
    );
    let v6 = s.client(ip("2001:db8::2")).await.unwrap().unwrap();
    assert_eq!(v6, upgraded([10, 0, 0, 0, 50], 60, 70));
    assert!(v6.passed(Test::Pregreet, 9) && !v6.passed(Test::Dnsbl, 0));
    assert_eq!(
        s.blocks().await.unwrap(),
        vec![block("198.51.100.0/24", Some("l"))]
    );
    assert_eq!(s.allows().await.unwrap().len(), 1);
    drop(s);

    assert_eq!(
        layouts(&path),
        layout::Found {
            file: Some(layout::FILE_LAYOUT),
            clients: Some(layout::CLIENTS_LAYOUT),
            verdicts: Some(layout::VERDICTS_LAYOUT),
        }
    );
    {
        // Rewritten on disk: the counted form.
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(CLIENTS).unwrap();
        let v = t
            .get(codec::ip_key(ip("192.0.2.1")).as_slice())
            .unwrap()
            .unwrap();
        assert_eq!(v.value()[0], codec::CLIENT_FORMAT);
    }
    // Opening again reads the same.
    let s = Store::open(&path).unwrap();
    assert_eq!(
        s.client(ip("192.0.2.1")).await.unwrap(),
        Some(upgraded([1, 2, 3, 4, 5], 6, 7))
    );
    drop(s);
    let report = salvage::check(&path).unwrap();
    assert!(
        report.to_string().contains("table clients layout 2"),
        "{report}"
    );

    // Repair drops the record that never decoded and keeps the others.
    let r = salvage::repair(&path, &salvage::Pinned::default()).unwrap();
    assert_eq!(r.salvaged[0], ("clients", 2), "{r}");
    assert!(salvage::check(&path).unwrap().healthy());
}

#[tokio::test]
async fn repair_of_a_layout_1_file_writes_the_cache_records_the_new_way() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    layout_1_file(&path);
    // Not healthy: one cache record does not decode.
    assert!(!salvage::check(&path).unwrap().healthy());
    let r = salvage::repair(&path, &salvage::Pinned::default()).unwrap();
    assert_eq!(
        r.salvaged,
        vec![("clients", 2), ("blocks", 1), ("allows", 1)],
        "{r}"
    );
    assert_eq!(layouts(&path).reading(), Ok(layout::Reading::Current));
    let s = Store::open(&path).unwrap();
    assert_eq!(
        s.clients().await.unwrap(),
        vec![
            (ip("192.0.2.1"), upgraded([1, 2, 3, 4, 5], 6, 7)),
            (ip("2001:db8::2"), upgraded([10, 0, 0, 0, 50], 60, 70)),
        ]
    );
}

#[test]
fn redb_file_of_another_program_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.redb");
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let def: TableDefinition<u64, u64> = TableDefinition::new("something");
        txn.open_table(def).unwrap().insert(1, 2).unwrap();
        txn.commit().unwrap();
    }
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Foreign { .. }), "{err:?}");
}

#[tokio::test]
async fn damaged_record_is_reported_not_misread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    drop(Store::open(&path).unwrap());
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let key = codec::net_key(net("192.0.2.0/24"));
        // A record claiming a future format.
        txn.open_table(BLOCKS)
            .unwrap()
            .insert(key.as_slice(), [codec::VERDICT_FORMAT + 1, 0, 0].as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let s = Store::open(&path).unwrap();
    let err = s.blocks().await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Corrupt {
                table: "blocks",
                op: "blocks",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("record format 2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_share_one_store() {
    let (_dir, s) = temp_store();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..32u8 {
        let s = s.clone();
        tasks.spawn(async move {
            for i in 0..16u8 {
                let a = IpAddr::from([192, 0, 2, t * 8 + i % 8]);
                let mut rec = s.client(a).await.unwrap().unwrap_or_default();
                rec.last_seen += 1;
                s.put_client(a, rec).await.unwrap();
                s.put_block(block(&format!("198.51.100.{t}/32"), None))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let clients = s.clients().await.unwrap();
    assert_eq!(clients.len(), 256);
    // Each address belongs to one task and was updated twice by it.
    assert!(clients.iter().all(|(_, r)| r.last_seen == 2), "{clients:?}");
    assert_eq!(s.blocks().await.unwrap().len(), 32);
}

#[tokio::test]
async fn lenient_reads_skip_and_name_undecodable_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let s = Store::open(&path).unwrap();
        s.apply(vec![
            Change::PutBlock(block("192.0.2.1/32", None)),
            Change::PutBlock(block("192.0.2.2/32", None)),
            Change::PutBlock(block("2001:db8::/64", None)),
            Change::PutAllow(AllowRecord {
                net: net("198.51.100.0/24"),
                added: 1,
                comment: None,
            }),
        ])
        .await
        .unwrap();
    }
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let mut t = txn.open_table(BLOCKS).unwrap();
        let key = codec::net_key(net("192.0.2.2/32"));
        t.insert(key.as_slice(), [codec::VERDICT_FORMAT, 1].as_slice())
            .unwrap();
        t.insert([9u8, 9].as_slice(), [0u8].as_slice()).unwrap();
        drop(t);
        txn.commit().unwrap();
    }
    let s = Store::open(&path).unwrap();
    let got = s.blocks_lenient().await.unwrap();
    assert_eq!(
        got.records,
        vec![block("192.0.2.1/32", None), block("2001:db8::/64", None)]
    );
    let named: Vec<String> = got.unreadable.iter().map(ToString::to_string).collect();
    assert_eq!(
        named,
        vec![
            "table blocks, key 192.0.2.2/32: record truncated".to_owned(),
            "table blocks, key 0909: network key with unknown family".to_owned(),
        ]
    );
    assert_eq!(s.allows_lenient().await.unwrap().records.len(), 1);
    // The strict reader still refuses to guess.
    assert!(matches!(
        s.blocks().await.unwrap_err(),
        StoreError::Corrupt { .. }
    ));
}

#[tokio::test]
async fn apply_writes_a_batch_in_order() {
    let (_dir, s) = temp_store();
    s.apply(vec![
        Change::PutBlock(block("192.0.2.1/32", None)),
        Change::PutBlock(block("192.0.2.9/32", None)),
        Change::DelBlock(net("192.0.2.1/32")),
        Change::PutAllow(AllowRecord {
            net: net("198.51.100.0/24"),
            added: 1,
            comment: None,
        }),
        Change::DelAllow(net("198.51.100.0/24")),
    ])
    .await
    .unwrap();
    assert_eq!(s.blocks().await.unwrap(), vec![block("192.0.2.9/32", None)]);
    assert!(s.allows().await.unwrap().is_empty());
}

/// A store of `n` blocks (reason `r<i>`), closed cleanly, and its path.
async fn filled_store(dir: &Path, n: u32) -> PathBuf {
    let path = dir.join("s.redb");
    let s = Store::open(&path).unwrap();
    let changes = (0..n)
        .map(|i| {
            Change::PutBlock(BlockRecord {
                net: IpNet::from(IpAddr::from(std::net::Ipv6Addr::from(
                    0x2001_0db8_u128 << 96 | u128::from(i),
                ))),
                reason: format!("r{i:05}"),
                expires: 0,
                added: 1,
                list: None,
                origin: None,
                offences: 1,
            })
        })
        .collect();
    s.apply(changes).await.unwrap();
    s.put_client(ip("192.0.2.1"), ClientRecord::default())
        .await
        .unwrap();
    drop(s);
    path
}

/// Overwrites every 4 KiB page holding `needle` with 0xa5 bytes.
fn scribble_pages_holding(path: &Path, needle: &[u8]) -> usize {
    let mut bytes = std::fs::read(path).unwrap();
    let pages: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(at, _)| at & !4095)
        .collect();
    for p in &pages {
        bytes[*p..*p + 4096].fill(0xa5);
    }
    std::fs::write(path, bytes).unwrap();
    pages.len()
}

fn assert_damaged_naming(err: &StoreError, path: &Path) {
    assert!(matches!(err, StoreError::Damaged { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("screener store repair"), "{text}");
    assert!(text.contains("screener store check"), "{text}");
}

#[tokio::test]
async fn a_scribbled_page_is_a_damaged_store_error_and_repair_salvages_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled_store(dir.path(), 2000).await;
    assert!(scribble_pages_holding(&path, b"r01000") >= 1);

    let err = Store::open(&path).unwrap_err();
    assert_damaged_naming(&err, &path);

    let report = salvage::check(&path).unwrap();
    assert!(!report.healthy(), "{report}");
    let blocks = &report.census.tables[1];
    assert_eq!(blocks.name, "blocks");
    assert!(blocks.damage.is_some(), "{report}");
    assert!(
        (1800..2000).contains(&blocks.readable),
        "the walk from both ends should lose one leaf: {report}"
    );
    assert!(report.to_string().contains("store repair"), "{report}");

    // The pinned maps hold the lost block of index 1000.
    let lost = BlockRecord {
        net: net("2001:db8::3e8/128"),
        reason: "pregreet".into(),
        expires: now_unix() + 3600,
        added: 5,
        list: None,
        origin: None,
        offences: 1,
    };
    let pinned = salvage::Pinned {
        blocks: vec![lost.clone()],
        allows: vec![AllowRecord {
            net: net("203.0.113.0/24"),
            added: 5,
            comment: None,
        }],
    };
    let r = salvage::repair(&path, &pinned).unwrap();
    assert_eq!(r.adopted, 2, "{r}");
    let kept = r.kept_as.clone().unwrap();
    assert!(kept.exists());
    assert!(kept
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("s.redb.damaged-"));

    let (s, census) = Store::open_census(&path).unwrap();
    assert_eq!(census.readable("blocks"), blocks.readable + 1);
    assert_eq!(census.readable("clients"), 1);
    assert_eq!(s.block(lost.net).await.unwrap(), Some(lost));
    assert_eq!(s.allows().await.unwrap().len(), 1);
    drop(s);
    assert!(salvage::check(&path).unwrap().healthy());
    // A healthy store is left alone.
    let again = salvage::repair(&path, &salvage::Pinned::default()).unwrap();
    assert!(again.kept_as.is_none(), "{again}");
}

#[tokio::test]
async fn a_truncated_file_is_a_damaged_store_error_and_repair_reads_what_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = filled_store(dir.path(), 2000).await;
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);

    let err = Store::open(&path).unwrap_err();
    assert_damaged_naming(&err, &path);
    let report = salvage::check(&path).unwrap();
    assert_eq!(report.cut_short, Some(len), "{report}");
    assert!(!report.healthy());
    let r = salvage::repair(&path, &salvage::Pinned::default()).unwrap();
    let (_, census) = Store::open_census(&path).unwrap();
    assert_eq!(
        census.readable("blocks"),
        report.census.readable("blocks"),
        "{r}"
    );
}

#[tokio::test]
async fn check_and_repair_refuse_a_store_in_use() {
    let (dir, s) = temp_store();
    let path = dir.path().join("s.redb");
    assert!(matches!(
        salvage::check(&path).unwrap_err(),
        StoreError::InUse { .. }
    ));
    assert!(matches!(
        salvage::repair(&path, &salvage::Pinned::default()).unwrap_err(),
        StoreError::InUse { .. }
    ));
    assert!(matches!(
        Store::open(&path).unwrap_err(),
        StoreError::InUse { .. }
    ));
    drop(s);
    assert!(salvage::check(&path).unwrap().healthy());
}

#[test]
fn store_files_and_their_new_directories_are_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("var/lib/s.redb");
    drop(Store::open(&path).unwrap());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&dir.path().join("var/lib")), 0o700);
    assert_eq!(mode(&dir.path().join("var")), 0o700);
}

#[tokio::test]
async fn lapsed_blocks_are_the_ones_in_the_window_queued_changes_included() {
    let (_dir, s) = temp_store();
    let at = |n: &str, expires: u64| BlockRecord {
        expires,
        ..block(n, None)
    };
    s.apply(vec![
        Change::PutBlock(at("192.0.2.1/32", 50)),
        Change::PutBlock(at("192.0.2.2/32", 150)),
        Change::PutBlock(at("192.0.2.3/32", 0)),
        Change::PutBlock(at("192.0.2.4/32", 500)),
        Change::PutBlock(at("192.0.2.5/32", 120)),
    ])
    .await
    .unwrap();
    let nets = |v: Vec<BlockRecord>| v.into_iter().map(|b| b.net.to_string()).collect::<Vec<_>>();
    assert_eq!(
        nets(s.lapsed_blocks(100, 200).await.unwrap()),
        vec!["192.0.2.2/32", "192.0.2.5/32"]
    );
    // A queued re-block moves one out of the window, a queued lapse in.
    s.inner
        .queue()
        .push(90, Change::PutBlock(at("192.0.2.2/32", 900)));
    s.inner
        .queue()
        .push(91, Change::PutBlock(at("192.0.2.4/32", 180)));
    assert_eq!(
        nets(s.lapsed_blocks(100, 200).await.unwrap()),
        vec!["192.0.2.4/32", "192.0.2.5/32"]
    );
}

#[tokio::test]
async fn upgrading_many_cache_records_rewrites_every_batch() {
    // More than two batches of the upgrade, and keys in both families.
    let n: u32 = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let addr = |i: u32| -> IpAddr {
        if i.is_multiple_of(2) {
            IpAddr::from(std::net::Ipv4Addr::from(0xc000_0000 | i))
        } else {
            IpAddr::from(std::net::Ipv6Addr::from(
                0x2001_0db8_u128 << 96 | u128::from(i),
            ))
        }
    };
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert("layout", 1).unwrap();
        {
            let mut t = txn.open_table(CLIENTS).unwrap();
            for i in 0..n {
                let e = u64::from(i);
                t.insert(
                    codec::ip_key(addr(i)).as_slice(),
                    legacy_client([e, e + 1, 0, 0, e + 4], e, e + 9).as_slice(),
                )
                .unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let t = Instant::now();
    let (s, census) = Store::open_census(&path).unwrap();
    eprintln!("upgrading {n} cache records: {:?}", t.elapsed());
    assert_eq!(census.readable("clients"), u64::from(n));
    assert_eq!(census.unreadable().count(), 0);
    for i in [0, 1, 4095, 4096, 4097, n / 2, n - 1] {
        let e = u64::from(i);
        assert_eq!(
            s.client(addr(i)).await.unwrap(),
            Some(upgraded([e, e + 1, 0, 0, e + 4], e, e + 9)),
            "record {i}"
        );
    }
}
