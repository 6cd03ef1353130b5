//! A store written by an earlier release opens in this one with every
//! block, allow entry and cache record intact. The fixture
//! `tests/data/store-layout1.redb` was written by the layout-1 release;
//! `tests/data/store-layout1.json` lists exactly what it holds (see
//! `tests/data/README.md`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use integration_tests::{
    daemon::{cli, ok, start_no_xdp},
    netns::ChildGuard,
    smtp_peers::free_port,
};
use serde_json::Value;

/// The committed fixture.
fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/store-layout1.redb")
}

/// What the fixture holds, as the release that wrote it read it back.
fn listing() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/store-layout1.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A copy of the fixture in a fresh directory (opening upgrades the file,
/// and the committed one must stay as the old release wrote it).
fn copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("screener.redb");
    std::fs::copy(fixture(), &path).unwrap();
    (dir, path)
}

/// The fixture's cache records as `(ip, first_seen, last_seen, expiries in
/// index order)`. Indexes are positions on disk and tests are only
/// appended, so the fixture's test list gives the first positions.
fn expected_clients(l: &Value) -> Vec<(String, u64, u64, Vec<u64>)> {
    let tests: Vec<&str> = l["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    l["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["ip"].as_str().unwrap().to_owned(),
                c["first_seen"].as_u64().unwrap(),
                c["last_seen"].as_u64().unwrap(),
                tests
                    .iter()
                    .map(|t| c["expires"][t].as_u64().unwrap())
                    .collect(),
            )
        })
        .collect()
}

/// `expires` as read now against the fixture's: the tests it knew keep
/// their expiry; tests added since read as never passed.
#[track_caller]
fn assert_expiries(ip: &str, now: &[u64], then: &[u64]) {
    assert!(
        now.len() >= then.len(),
        "{ip}: {now:?} lost tests of {then:?}"
    );
    assert_eq!(&now[..then.len()], then, "{ip}");
    assert!(
        now[then.len()..].iter().all(|e| *e == 0),
        "{ip}: a test the old release did not have reads as passed: {now:?}"
    );
}

#[tokio::test]
async fn the_layout_1_fixture_opens_with_every_record_intact() {
    let l = listing();
    assert_eq!(l["layout"], 1, "the fixture is a layout-1 store");
    let (_dir, path) = copy();
    let (store, census) = screener::store::Store::open_census(&path).unwrap();
    assert_eq!(
        census.to_string(),
        "5 clients, 10 blocks, 3 allows",
        "{census:?}"
    );
    assert_eq!(census.unreadable().count(), 0, "{census:?}");

    // Every field of every verdict, as the old release listed it.
    let blocks = serde_json::to_value(store.blocks().await.unwrap()).unwrap();
    assert_eq!(blocks, l["blocks"]);
    let allows = serde_json::to_value(store.allows().await.unwrap()).unwrap();
    assert_eq!(allows, l["allows"]);

    let clients = store.clients().await.unwrap();
    let want = expected_clients(&l);
    assert_eq!(clients.len(), want.len());
    for ((ip, rec), (wip, first, last, expires)) in clients.iter().zip(&want) {
        assert_eq!(&ip.to_string(), wip);
        assert_eq!((rec.first_seen, rec.last_seen), (*first, *last), "{ip}");
        assert_expiries(wip, &rec.expires, expires);
        assert!(rec.later.is_empty(), "{ip}: {rec:?}");
        // A single lookup reads the same record.
        assert_eq!(store.client(*ip).await.unwrap().as_ref(), Some(rec));
    }
    drop(store);

    // Upgraded in place: a second open reads the same, now as layout 2.
    let report = screener::store::salvage::check(&path).unwrap();
    assert!(report.healthy(), "{report}");
    assert_eq!(
        report.layouts.reading(),
        Ok(screener::store::layout::Reading::Current),
        "{report}"
    );
    let store = screener::store::Store::open(&path).unwrap();
    assert_eq!(
        serde_json::to_value(store.blocks().await.unwrap()).unwrap(),
        l["blocks"]
    );
    assert_eq!(store.clients().await.unwrap(), clients);
}

/// A daemon without XDP on the store at `path`, logging to `daemon<n>.log`.
fn daemon(dir: &Path, cfg: &Path, n: u32) -> ChildGuard {
    start_no_xdp(cfg, &dir.join(format!("daemon{n}.log")))
}

fn log(dir: &Path, n: u32) -> String {
    std::fs::read_to_string(dir.join(format!("daemon{n}.log"))).unwrap_or_default()
}

/// `LIST list --json` rows.
#[track_caller]
fn rows(cfg: &Path, list: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(&ok(cfg, &[list, "list", "--json"])).unwrap();
    v.as_array().unwrap().clone()
}

const UPGRADED: &str = "store upgraded from layout 1 to layout 2: 5 cache records rewritten";

#[test]
fn the_daemon_upgrades_the_fixture_once_and_lists_every_record() {
    let l = listing();
    let (dir, path) = copy();
    let cfg = dir.path().join("screener.toml");
    std::fs::write(
        &cfg,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:{}\"]\n[store]\npath = \"{}\"\n[admin]\nsocket = \"{}/admin.sock\"\n[daemon]\nuser = \"root\"\n",
            free_port(),
            path.display(),
            dir.path().display()
        ),
    )
    .unwrap();

    // `store check` reads the old layout and says what will happen to it.
    let before = ok(&cfg, &["store", "check"]);
    assert!(
        before.contains(
            "layout 1: written by an earlier release; the daemon upgrades it to layout 2"
        ),
        "{before}"
    );
    assert!(before.contains("table clients: 5 records"), "{before}");
    assert!(before.trim_end().ends_with("healthy"), "{before}");

    let mut d = daemon(dir.path(), &cfg, 0);
    let first = log(dir.path(), 0);
    assert_eq!(first.matches(UPGRADED).count(), 1, "{first}");

    let net_reason = |rows: &[Value]| -> Vec<(String, String)> {
        rows.iter()
            .map(|r| {
                (
                    r["net"].as_str().unwrap().to_owned(),
                    r["reason"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let want_blocks: Vec<(String, String)> = l["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["net"].as_str().unwrap().to_owned(),
                b["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let blocks = rows(&cfg, "block");
    assert_eq!(net_reason(&blocks), want_blocks);
    for (b, w) in blocks.iter().zip(l["blocks"].as_array().unwrap()) {
        // Every fixture expiry is in 2036 or never.
        assert_eq!(b["expires_in"].is_null(), w["expires"] == 0, "{b} {w}");
    }
    let allows: Vec<String> = rows(&cfg, "allow")
        .iter()
        .map(|r| r["net"].as_str().unwrap().to_owned())
        .collect();
    let want_allows: Vec<String> = l["allows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["net"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(allows, want_allows);

    let cache = rows(&cfg, "cache");
    let want = expected_clients(&l);
    assert_eq!(cache.len(), want.len(), "{cache:?}");
    for (row, (ip, first_seen, last_seen, expires)) in cache.iter().zip(&want) {
        assert_eq!(row["ip"].as_str().unwrap(), ip);
        let rec = &row["record"];
        assert_eq!(rec["first_seen"].as_u64().unwrap(), *first_seen, "{row}");
        assert_eq!(rec["last_seen"].as_u64().unwrap(), *last_seen, "{row}");
        let now: Vec<u64> = rec["expires"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_u64().unwrap())
            .collect();
        assert_expiries(ip, &now, expires);
    }

    d.kill9();
    let after = ok(&cfg, &["store", "check"]);
    assert!(
        after.contains("layout 2: table clients layout 2"),
        "{after}"
    );
    assert!(after.trim_end().ends_with("healthy"), "{after}");

    // Logged once: the second start finds layout 2.
    let _d = daemon(dir.path(), &cfg, 1);
    let second = log(dir.path(), 1);
    assert!(
        second.contains("store opened: 5 clients, 10 blocks, 3 allows"),
        "{second}"
    );
    assert!(!second.contains("store upgraded"), "{second}");
    assert_eq!(rows(&cfg, "cache").len(), want.len());
}

#[test]
fn a_store_of_a_later_clients_layout_is_refused_naming_file_and_table() {
    let (dir, path) = copy();
    {
        // What a later release with another client record encoding leaves.
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
            let mut meta = txn.open_table(def).unwrap();
            meta.insert("layout", 2).unwrap();
            meta.insert("layout.clients", 9).unwrap();
            meta.insert("layout.verdicts", 1).unwrap();
        }
        txn.commit().unwrap();
    }
    let cfg = dir.path().join("screener.toml");
    std::fs::write(
        &cfg,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:{}\"]\n[store]\npath = \"{}\"\n[admin]\nsocket = \"{}/admin.sock\"\n[daemon]\nuser = \"root\"\n",
            free_port(),
            path.display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(integration_tests::netns::screener_bin())
        .arg("-c")
        .arg(&cfg)
        .args(["run", "--no-xdp"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "the daemon started: {text}");
    assert!(
        text.contains(&format!(
            "store {}: table clients has layout 9, this build reads layout 2",
            path.display()
        )),
        "{text}"
    );
    assert!(text.contains("later release"), "{text}");
    let (healthy, check) = cli(&cfg, &["store", "check"]);
    assert!(!healthy, "{check}");
    assert!(check.contains("NOT READABLE BY THIS BUILD"), "{check}");
    assert!(
        check.contains("table clients: 5 records (not decoded"),
        "{check}"
    );
    assert!(!check.contains("DAMAGED"), "{check}");
    assert!(
        check.contains("is of a layout this build cannot read"),
        "{check}"
    );
}
