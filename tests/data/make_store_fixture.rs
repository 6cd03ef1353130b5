//! Writes `store-layout1.redb` and `store-layout1.json` through the store
//! API of the release that defines layout 1 (store layout number 1, client
//! records of exactly five pass expiries). `make-store-fixture.sh` copies
//! this file into that release's source as an example of the
//! `integration-tests` crate and runs it there; it is not built with the
//! current source.
//!
//! Every time is fixed, and every expiry lies in 2036, so the fixture
//! neither ages out nor differs between two runs except in redb's page
//! layout. The JSON lists exactly what was written; `store_upgrade.rs`
//! compares the current reader against it.

use std::{net::IpAddr, path::PathBuf};

use ipnet::IpNet;
use screener::store::{AllowRecord, BlockRecord, ClientRecord, ListEntries, Store, Test};
use serde_json::{json, Value};

/// 2026-09-21, when most entries were "added".
const ADDED: u64 = 1_790_000_000;
/// 2036-01-01T00:00:00Z.
const Y2036: u64 = 2_082_758_400;
const DAY: u64 = 86_400;

fn net(s: &str) -> IpNet {
    s.parse().expect("fixture network")
}

fn block(n: &str, reason: &str, expires: u64, offences: u32) -> BlockRecord {
    BlockRecord {
        net: net(n),
        reason: reason.into(),
        expires,
        added: ADDED,
        list: None,
        offences,
    }
}

/// A client record from (test, expiry) pairs; unnamed tests never passed.
fn client(passes: &[(Test, u64)], first_seen: u64, last_seen: u64) -> ClientRecord {
    let mut rec = ClientRecord {
        first_seen,
        last_seen,
        ..ClientRecord::default()
    };
    for (t, e) in passes {
        rec.expires[t.index()] = *e;
    }
    rec
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(db), Some(listing)) = (args.next(), args.next()) else {
        eprintln!("usage: make_store_fixture <out.redb> <out.json>");
        std::process::exit(2);
    };
    let (db, listing) = (PathBuf::from(db), PathBuf::from(listing));
    let _ = std::fs::remove_file(&db);
    let store = Store::open(&db).expect("open the new store");

    let blocks = [
        // What `screener block add` writes (reason "manual" by default).
        block("192.0.2.1/32", "manual", Y2036, 1),
        block("2001:db8:3::/64", "manual", 0, 1),
        // What a failed test writes: the test's name as reason.
        block("198.51.100.7/32", "pregreet", Y2036 + DAY, 3),
        block("203.0.113.9/32", "dnsbl", Y2036 + 2 * DAY, 1),
        block("2001:db8:1::/64", "pregreet", Y2036 + 3 * DAY, 2),
        block("2001:db8:2::/64", "dnsbl", Y2036 + 4 * DAY, 1),
        block("198.51.100.77/32", "bare_newline", Y2036 + 5 * DAY, 1),
        // Escalation covers a whole /24 of repeat offenders.
        block("203.0.113.0/24", "escalation", Y2036 + 6 * DAY, 1),
    ];
    for b in &blocks {
        store.put_block(b.clone()).await.expect("put_block");
    }
    // An imported list: one reason and expiry for all its entries.
    let change = store
        .replace_list(
            "drop",
            ListEntries {
                nets: vec![net("192.0.2.128/25"), net("2001:db8:ff00::/40")],
                reason: "import".into(),
                expires: Y2036 + 7 * DAY,
                added: ADDED + 60,
            },
        )
        .await
        .expect("replace_list");
    assert_eq!(change.added, 2);

    let allows = [
        AllowRecord {
            net: net("192.0.2.10/32"),
            added: ADDED + 1,
            comment: Some("backup MX".into()),
        },
        AllowRecord {
            net: net("198.51.100.64/26"),
            added: ADDED + 2,
            comment: None,
        },
        AllowRecord {
            net: net("2001:db8:10::/48"),
            added: ADDED + 3,
            comment: Some("partner, ünïcode".into()),
        },
    ];
    for a in &allows {
        store.put_allow(a.clone()).await.expect("put_allow");
    }

    let e = |days: u64| Y2036 + days * DAY;
    let clients: [(&str, ClientRecord); 5] = [
        // Passed every test.
        (
            "192.0.2.20",
            client(
                &[
                    (Test::Pregreet, e(10)),
                    (Test::Dnsbl, e(11)),
                    (Test::Pipelining, e(12)),
                    (Test::NonSmtpCommand, e(13)),
                    (Test::BareNewline, e(14)),
                ],
                ADDED,
                ADDED + 100,
            ),
        ),
        // Passed the early tests only (deep tests off or not reached).
        (
            "192.0.2.21",
            client(
                &[(Test::Pregreet, e(20)), (Test::Dnsbl, e(21))],
                ADDED + 5,
                ADDED + 6,
            ),
        ),
        // IPv6, some deep tests.
        (
            "2001:db8::25",
            client(
                &[
                    (Test::Pregreet, e(30)),
                    (Test::Dnsbl, e(31)),
                    (Test::Pipelining, e(32)),
                    (Test::BareNewline, e(34)),
                ],
                ADDED + 7,
                ADDED + 8,
            ),
        ),
        // Seen, passed nothing yet.
        ("203.0.113.30", client(&[], ADDED + 9, ADDED + 9)),
        // Written as v4-mapped IPv6, stored (and listed) as IPv4.
        (
            "::ffff:198.51.100.9",
            client(&[(Test::Dnsbl, e(40))], ADDED + 10, ADDED + 11),
        ),
    ];
    for (ip, rec) in &clients {
        let ip: IpAddr = ip.parse().expect("fixture address");
        store.put_client(ip, rec.clone()).await.expect("put_client");
    }

    // The listing, read back through the same API, so it is what the
    // file holds and not only what was meant.
    let stored_blocks = store.blocks().await.expect("blocks");
    let stored_allows = store.allows().await.expect("allows");
    let stored_clients = store.clients().await.expect("clients");
    assert_eq!(stored_blocks.len(), blocks.len() + 2);
    assert_eq!(stored_allows.len(), allows.len());
    assert_eq!(stored_clients.len(), clients.len());
    let clients: Vec<Value> = stored_clients
        .iter()
        .map(|(ip, rec)| {
            let passed: serde_json::Map<String, Value> = Test::ALL
                .iter()
                .map(|t| (t.name().to_owned(), json!(rec.expires[t.index()])))
                .collect();
            json!({
                "ip": ip.to_string(),
                "first_seen": rec.first_seen,
                "last_seen": rec.last_seen,
                "expires": passed,
            })
        })
        .collect();
    let out = json!({
        "layout": screener::store::LAYOUT_VERSION,
        "tests": Test::ALL.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "blocks": stored_blocks,
        "allows": stored_allows,
        "clients": clients,
    });
    drop(store);
    let text = serde_json::to_string_pretty(&out).expect("json") + "\n";
    std::fs::write(&listing, text).expect("write the listing");
}
