//! How verdicts and passes look in Redis. Pure: no connection here, so
//! every form is unit-tested.
//!
//! - `{prefix}:verdicts`, a stream: one entry per block or unblock, fields
//!   `node`, `op` (`block`/`unblock`), `net`, `reason`, `expires` (Unix
//!   seconds, 0 = never).
//! - `{prefix}:block:{net}`: the snapshot of what is blocked now, value
//!   `expires|node|reason`, expiring with the block (`PXAT`). A node that
//!   fell behind the trimmed stream rebuilds its remote set from these.
//! - `{prefix}:pass:{ip}`: `test=expires,…` for a client's passed tests,
//!   expiring with the last of them.
//! - `{prefix}:node:{node}`: a node's heartbeat (JSON), expiring when the
//!   node stops beating.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// What happened to a network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Blocked until `expires` (Unix seconds, 0 = never) for `reason`.
    Block { reason: String, expires: u64 },
    /// Unblocked.
    Unblock,
}

/// One verdict as the fleet sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The network the verdict is about (host bits clear).
    pub net: IpNet,
    /// Block or unblock.
    pub op: Op,
    /// The node that made it.
    pub node: String,
}

/// A stream entry that could not be read; logged and skipped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("unreadable cluster entry: {0}")]
pub struct BadEntry(pub String);

/// The keys of one fleet.
#[derive(Clone, Debug)]
pub struct Keys {
    /// `cluster.prefix`.
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    pub fn stream(&self) -> String {
        format!("{}:verdicts", self.prefix)
    }

    pub fn block(&self, net: IpNet) -> String {
        format!("{}:block:{net}", self.prefix)
    }

    /// The `SCAN MATCH` pattern of every snapshot key.
    pub fn block_pattern(&self) -> String {
        format!("{}:block:*", self.prefix)
    }

    /// The network a snapshot key names.
    pub fn block_net(&self, key: &str) -> Option<IpNet> {
        key.strip_prefix(&self.prefix)?
            .strip_prefix(":block:")?
            .parse()
            .ok()
    }

    pub fn pass(&self, ip: IpAddr) -> String {
        format!("{}:pass:{ip}", self.prefix)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}:node:{node}", self.prefix)
    }

    pub fn node_pattern(&self) -> String {
        format!("{}:node:*", self.prefix)
    }
}

impl Event {
    /// The stream entry's fields.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![("node", self.node.clone()), ("net", self.net.to_string())];
        match &self.op {
            Op::Block { reason, expires } => {
                f.push(("op", "block".into()));
                f.push(("reason", reason.clone()));
                f.push(("expires", expires.to_string()));
            }
            Op::Unblock => f.push(("op", "unblock".into())),
        }
        f
    }

    /// Reads a stream entry's fields back.
    pub fn from_fields<'a>(
        mut get: impl FnMut(&str) -> Option<&'a str>,
    ) -> Result<Event, BadEntry> {
        let need =
            |v: Option<&'a str>, name: &str| v.ok_or_else(|| BadEntry(format!("no field {name}")));
        let node = need(get("node"), "node")?.to_owned();
        let net_text = need(get("net"), "net")?;
        let net: IpNet = net_text
            .parse()
            .map_err(|_| BadEntry(format!("bad net {net_text:?}")))?;
        let op = match need(get("op"), "op")? {
            "block" => {
                let reason = need(get("reason"), "reason")?.to_owned();
                let e = need(get("expires"), "expires")?;
                let expires = e
                    .parse()
                    .map_err(|_| BadEntry(format!("bad expires {e:?}")))?;
                Op::Block { reason, expires }
            }
            "unblock" => Op::Unblock,
            other => return Err(BadEntry(format!("unknown op {other:?}"))),
        };
        Ok(Event {
            net: net.trunc(),
            op,
            node,
        })
    }

    /// The snapshot value of a block; `None` for an unblock.
    pub fn snapshot_value(&self) -> Option<String> {
        match &self.op {
            Op::Block { reason, expires } => Some(format!("{expires}|{}|{reason}", self.node)),
            Op::Unblock => None,
        }
    }

    /// A block read back from its snapshot key and value.
    pub fn from_snapshot(net: IpNet, value: &str) -> Result<Event, BadEntry> {
        let mut parts = value.splitn(3, '|');
        let (Some(e), Some(node), Some(reason)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(BadEntry(format!("bad snapshot value {value:?}")));
        };
        let expires = e
            .parse()
            .map_err(|_| BadEntry(format!("bad expiry in snapshot value {value:?}")))?;
        Ok(Event {
            net: net.trunc(),
            op: Op::Block {
                reason: reason.to_owned(),
                expires,
            },
            node: node.to_owned(),
        })
    }
}

/// A client's passed tests: test name → Unix seconds the pass lapses.
pub fn pass_value(passes: &[(&str, u64)]) -> String {
    passes
        .iter()
        .map(|(t, e)| format!("{t}={e}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads a pass value back; unknown or malformed parts are skipped (a
/// newer node may know tests this one does not).
pub fn parse_pass(value: &str) -> Vec<(String, u64)> {
    value
        .split(',')
        .filter_map(|p| {
            let (t, e) = p.split_once('=')?;
            Some((t.to_owned(), e.parse().ok()?))
        })
        .collect()
}

/// A node's heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The node.
    pub node: String,
    /// When it beat (Unix milliseconds).
    pub at_ms: u64,
    /// Stream entries it had not applied yet.
    pub lag: u64,
    /// Verdicts it holds for Redis.
    pub queued: u64,
}

/// Compares two stream IDs (`ms-seq`); `None` if either is malformed.
pub fn id_cmp(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    let parse = |s: &str| -> Option<(u64, u64)> {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        Some((ms.parse().ok()?, seq.parse().ok()?))
    };
    Some(parse(a)?.cmp(&parse(b)?))
}

#[cfg(test)]
mod tests {
    use std::{cmp::Ordering, collections::HashMap};

    use super::*;

    fn roundtrip(e: &Event) -> Event {
        let map: HashMap<&str, String> = e.fields().into_iter().collect();
        Event::from_fields(|k| map.get(k).map(String::as_str)).unwrap()
    }

    #[test]
    fn events_survive_the_stream() {
        let b = Event {
            net: "2001:db8:1::/48".parse().unwrap(),
            op: Op::Block {
                reason: "pregreet|odd reason".into(),
                expires: 2_000_000_000,
            },
            node: "mx1".into(),
        };
        assert_eq!(roundtrip(&b), b);
        let u = Event {
            net: "192.0.2.7/32".parse().unwrap(),
            op: Op::Unblock,
            node: "mx2".into(),
        };
        assert_eq!(roundtrip(&u), u);
    }

    #[test]
    fn a_bad_entry_is_named_not_applied() {
        let fields = [("node", "mx1"), ("net", "not-a-net"), ("op", "block")];
        let get = |k: &str| fields.iter().find(|f| f.0 == k).map(|f| f.1);
        assert!(Event::from_fields(get).unwrap_err().0.contains("not-a-net"));
        let fields = [("node", "mx1"), ("net", "192.0.2.1/32"), ("op", "nuke")];
        let get = |k: &str| fields.iter().find(|f| f.0 == k).map(|f| f.1);
        assert!(Event::from_fields(get).is_err());
        let fields = [("node", "mx1"), ("net", "192.0.2.1/32"), ("op", "block")];
        let get = |k: &str| fields.iter().find(|f| f.0 == k).map(|f| f.1);
        assert_eq!(
            Event::from_fields(get).unwrap_err(),
            BadEntry("no field reason".into())
        );
    }

    #[test]
    fn host_bits_are_cleared_on_the_way_in() {
        let fields = [
            ("node", "mx1"),
            ("net", "198.51.100.77/24"),
            ("op", "unblock"),
        ];
        let get = |k: &str| fields.iter().find(|f| f.0 == k).map(|f| f.1);
        assert_eq!(
            Event::from_fields(get).unwrap().net,
            "198.51.100.0/24".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn snapshot_values_keep_reasons_with_bars() {
        let net: IpNet = "203.0.113.9/32".parse().unwrap();
        let e = Event {
            net,
            op: Op::Block {
                reason: "import spamhaus|drop".into(),
                expires: 0,
            },
            node: "mx3".into(),
        };
        let v = e.snapshot_value().unwrap();
        assert_eq!(Event::from_snapshot(net, &v).unwrap(), e);
        assert!(Event::from_snapshot(net, "soon|mx1|x").is_err());
        assert!(Event::from_snapshot(net, "12").is_err());
    }

    #[test]
    fn keys_name_their_network() {
        let k = Keys::new("fleet-a");
        let net: IpNet = "2001:db8::/32".parse().unwrap();
        assert_eq!(k.block_net(&k.block(net)), Some(net));
        assert_eq!(Keys::new("fleet-b").block_net(&k.block(net)), None);
    }

    #[test]
    fn passes_skip_what_they_cannot_read() {
        let v = pass_value(&[("pregreet", 10), ("dnsbl", 20)]);
        assert_eq!(v, "pregreet=10,dnsbl=20");
        assert_eq!(
            parse_pass("pregreet=10,bogus,future_test=30,dnsbl=x"),
            vec![("pregreet".into(), 10), ("future_test".into(), 30)]
        );
    }

    #[test]
    fn stream_ids_order_by_time_then_sequence() {
        assert_eq!(id_cmp("5-1", "5-0"), Some(Ordering::Greater));
        assert_eq!(id_cmp("10-0", "9-9"), Some(Ordering::Greater));
        assert_eq!(id_cmp("0", "0-0"), Some(Ordering::Equal));
        assert_eq!(id_cmp("x", "1-0"), None);
    }
}
