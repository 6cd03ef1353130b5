//! The verdict policy: what to block, for how long, and when a /24 (/48)
//! is blocked instead of its hosts. Pure over its inputs (no kernel, no
//! store, no clock), so every rule is unit-tested without root, as the
//! SMTP admission gate is.
//!
//! POLICY for screening failures:
//! - Only outcomes in `verdict.block_on` block.
//! - An IPv6 client is blocked by its `verdict.ipv6_prefix` prefix: hosts
//!   with privacy addresses rotate inside it.
//! - A repeat offender's TTL doubles per offence, up to
//!   `verdict.block_ttl_max`.
//! - When `escalate_v4_hosts` hosts of one IPv4 /24 (or
//!   `escalate_v6_hosts` prefixes of one IPv6 /48) are blocked, the /24
//!   (/48) is blocked instead.
//! - Nothing the access list permits, an allow entry covers, or a DNSWL
//!   allowlisted is ever blocked, nor any prefix containing one of them.
//!
//! ESCALATION counts offences, not map entries: a host whose block the
//! kernel refused (its host map is full) offended all the same, and once
//! the host map is full escalating into the prefix map is the only way
//! left to stop the bots of that /24 (/48). Each offence counts until the
//! block it earned would lapse.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::Duration,
};

use ipnet::IpNet;
use screener_common::Reason;

use crate::{
    config::{AccessAction, AccessRule, BlockOn},
    local::HostAddrs,
    store::BlockRecord,
};

/// The TTL of the `offence`-th block (1-based): doubling, capped.
pub fn ttl_for(offence: u32, base: Duration, max: Duration) -> Duration {
    let factor = 1u32 << offence.saturating_sub(1).min(20);
    base.saturating_mul(factor).min(max)
}

/// The net a verdict on `ip` covers.
pub fn verdict_net(ip: IpAddr, ipv6_prefix: u8) -> IpNet {
    match ip {
        IpAddr::V4(a) => IpNet::from(IpAddr::V4(a)),
        IpAddr::V6(a) => ipnet::Ipv6Net::new(a, ipv6_prefix)
            .expect("prefix checked at start-up")
            .trunc()
            .into(),
    }
}

/// The escalation prefix a blocked net counts towards.
pub fn group_of(net: IpNet) -> Option<IpNet> {
    match net {
        IpNet::V4(n) if n.prefix_len() > 24 => Some(
            ipnet::Ipv4Net::new(n.addr(), 24)
                .expect("24 is valid")
                .trunc()
                .into(),
        ),
        IpNet::V6(n) if n.prefix_len() > 48 => Some(
            ipnet::Ipv6Net::new(n.addr(), 48)
                .expect("48 is valid")
                .trunc()
                .into(),
        ),
        _ => None,
    }
}

/// Whether two nets overlap (one contains the other).
fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// A kernel reason from a stored reason text.
pub fn kernel_reason(text: &str) -> Reason {
    Reason::ALL
        .into_iter()
        .find(|r| r.name() == text)
        .unwrap_or(Reason::Manual)
}

/// The kernel reason of a screening outcome.
pub fn block_on_reason(o: BlockOn) -> Reason {
    o.reason()
}

/// Who must never be blocked, as the caller sees it now.
pub struct Protected<'a> {
    /// The host's own addresses, when `screen.permit_local` is on.
    pub local: Option<&'a HostAddrs>,
    /// The access list: its `permit` rules protect.
    pub access_list: &'a [AccessRule],
    /// The allow entries.
    pub allows: &'a [IpNet],
    /// Clients a DNSWL allowlisted.
    pub dnswl: &'a HashSet<IpAddr>,
}

impl Protected<'_> {
    /// Why `net` must not be blocked, if it must not: it holds, or lies
    /// inside, something protected.
    pub fn why(&self, net: &IpNet) -> Option<String> {
        if let Some(a) = self.local.and_then(|l| l.within(net)) {
            return Some(format!("local address {a} (screen.permit_local)"));
        }
        if let Some(rule) = self
            .access_list
            .iter()
            .find(|r| r.action == AccessAction::Permit && overlaps(&r.net, net))
        {
            return Some(format!("access list permits {}", rule.net));
        }
        if let Some(a) = self.allows.iter().find(|a| overlaps(a, net)) {
            return Some(format!("allow entry {a}"));
        }
        if let Some(ip) = self.dnswl.iter().find(|ip| net.contains(*ip)) {
            return Some(format!("DNSWL allowlisted {ip}"));
        }
        None
    }
}

/// What a screening failure of `net` leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// An imported list holds `net` until `until`: its entry stays with
    /// its owner, the offence still counts towards escalation.
    Listed { until: u64 },
    /// Block it with this record for this long.
    Block { rec: BlockRecord, ttl: Duration },
}

/// The verdict on a failure of `net` at `now`, given the stored block on
/// it (`prev`, lapsed or not): a repeat offence doubles the TTL and keeps
/// the first-seen time.
pub fn on_failure(
    net: IpNet,
    reason: Reason,
    prev: Option<&BlockRecord>,
    now: u64,
    base: Duration,
    max: Duration,
) -> OnFailure {
    if let Some(p) = prev.filter(|p| p.list.is_some() && (p.expires == 0 || p.expires > now)) {
        return OnFailure::Listed { until: p.expires };
    }
    let offences = prev.map_or(1, |p| p.offences + 1);
    let ttl = ttl_for(offences, base, max);
    OnFailure::Block {
        rec: BlockRecord {
            net,
            reason: reason.name().to_owned(),
            expires: now + ttl.as_secs(),
            added: prev.map_or(now, |p| p.added),
            list: None,
            origin: None,
            offences,
        },
        ttl,
    }
}

/// The record of an operator's block on `net` (`label` its reason).
pub fn manual(
    net: IpNet,
    label: &str,
    prev: Option<&BlockRecord>,
    now: u64,
    ttl: Duration,
) -> BlockRecord {
    BlockRecord {
        net: net.trunc(),
        reason: label.to_owned(),
        expires: now + ttl.as_secs().max(1),
        added: prev.map_or(now, |p| p.added),
        list: None,
        origin: None,
        offences: prev.map_or(1, |p| p.offences + 1),
    }
}

/// Whether `offenders` nets with an offence in force make their group
/// blocked: `threshold` of them (0 = never), unless the group is already
/// blocked (`held`).
pub fn escalates(offenders: usize, threshold: u32, held: bool) -> bool {
    threshold != 0 && offenders >= threshold as usize && !held
}

/// The record of an escalation to `group`: the longest TTL at once, since
/// a /24 (/48) full of bots is not a first offence.
pub fn escalation(group: IpNet, now: u64, ttl_max: Duration) -> BlockRecord {
    BlockRecord {
        net: group,
        reason: Reason::Escalation.name().to_owned(),
        expires: now + ttl_max.as_secs(),
        added: now,
        list: None,
        origin: None,
        offences: 1,
    }
}

/// Offences per escalation prefix (/24, /48), each until the time its
/// block would lapse (unix seconds, 0 never): see ESCALATION.
#[derive(Debug, Default)]
pub struct Offenders(HashMap<IpNet, HashMap<IpNet, u64>>);

impl Offenders {
    /// Counts an offence of `net` in its group until `until` (a later
    /// offence of the same net extends it).
    pub fn note(&mut self, net: IpNet, until: u64) {
        let Some(group) = group_of(net) else {
            return;
        };
        let e = self.0.entry(group).or_default().entry(net).or_insert(until);
        if *e != 0 && (until == 0 || until > *e) {
            *e = until;
        }
    }

    /// Nets of `group` with an offence in force at `now`.
    pub fn count(&self, group: IpNet, now: u64) -> usize {
        self.0
            .get(&group)
            .map_or(0, |m| m.values().filter(|u| **u == 0 || **u > now).count())
    }

    /// Forgets `net` (an operator unblocked it).
    pub fn forget(&mut self, net: IpNet) {
        if let Some(group) = group_of(net) {
            if let Some(m) = self.0.get_mut(&group) {
                m.remove(&net);
                if m.is_empty() {
                    self.0.remove(&group);
                }
            }
        }
    }

    /// Forgets `net` if its offence has lapsed at `now`; whether it did.
    pub fn lapse(&mut self, net: IpNet, now: u64) -> bool {
        let Some(group) = group_of(net) else {
            return false;
        };
        let Some(m) = self.0.get_mut(&group) else {
            return false;
        };
        if !m.get(&net).is_some_and(|u| *u != 0 && *u <= now) {
            return false;
        }
        m.remove(&net);
        if m.is_empty() {
            self.0.remove(&group);
        }
        true
    }

    /// Forgets every offence that lapsed at `now`.
    pub fn prune(&mut self, now: u64) {
        self.0.retain(|_, m| {
            m.retain(|_, u| *u == 0 || *u > now);
            !m.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    const H: Duration = Duration::from_secs(3600);
    const D: Duration = Duration::from_secs(86_400);

    #[test]
    fn ttl_doubles_up_to_the_cap() {
        assert_eq!(ttl_for(1, H, D), H);
        assert_eq!(ttl_for(2, H, D), 2 * H);
        assert_eq!(ttl_for(5, H, D), 16 * H);
        assert_eq!(ttl_for(6, H, D), D);
        assert_eq!(ttl_for(u32::MAX, H, D), D);
    }

    #[test]
    fn ipv6_verdicts_cover_the_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::7".parse().unwrap();
        assert_eq!(verdict_net(a, 64), verdict_net(b, 64));
        assert_eq!(verdict_net(a, 64).to_string(), "2001:db8:1:2::/64");
        assert_eq!(
            verdict_net("192.0.2.7".parse().unwrap(), 64).to_string(),
            "192.0.2.7/32"
        );
    }

    #[test]
    fn offences_count_until_they_lapse() {
        let g = n("192.0.2.0/24");
        let mut o = Offenders::default();
        o.note(n("192.0.2.1/32"), 100);
        o.note(n("192.0.2.2/32"), 200);
        o.note(n("192.0.2.2/32"), 150);
        o.note(n("192.0.2.3/32"), 0);
        o.note(n("198.51.100.0/24"), 100);
        assert_eq!(o.count(g, 50), 3);
        assert_eq!(o.count(g, 100), 2);
        assert_eq!(o.count(g, 200), 1, "a later offence keeps the longer lapse");
        assert!(!o.lapse(n("192.0.2.2/32"), 199));
        assert!(o.lapse(n("192.0.2.2/32"), 200));
        o.prune(1_000);
        assert_eq!(o.count(g, 1_000), 1);
        o.forget(n("192.0.2.3/32"));
        assert!(o.0.is_empty());
    }

    #[test]
    fn groups_are_slash_24_and_slash_48() {
        let g = |s: &str| group_of(s.parse().unwrap()).map(|n| n.to_string());
        assert_eq!(g("192.0.2.7/32").as_deref(), Some("192.0.2.0/24"));
        assert_eq!(g("2001:db8:1:2::/64").as_deref(), Some("2001:db8:1::/48"));
        assert_eq!(g("192.0.2.0/24"), None);
    }

    #[test]
    fn protection_covers_what_holds_or_lies_inside_a_protected_net() {
        let local = HostAddrs::from_addrs(["203.0.113.5".parse().unwrap()]);
        let access = ["permit 198.51.100.0/25".parse().unwrap()];
        let allows = [n("192.0.2.128/25")];
        let dnswl: HashSet<IpAddr> = ["2001:db8::1".parse().unwrap()].into();
        let p = Protected {
            local: Some(&local),
            access_list: &access,
            allows: &allows,
            dnswl: &dnswl,
        };
        let why = |s: &str| p.why(&n(s));
        assert!(why("203.0.113.0/24").unwrap().contains("local address"));
        assert!(why("127.0.0.1/32").unwrap().contains("local address"));
        assert!(why("198.51.100.7/32").unwrap().contains("access list"));
        assert!(why("198.51.100.0/24").unwrap().contains("access list"));
        assert!(why("192.0.2.200/32").unwrap().contains("allow entry"));
        assert!(why("2001:db8::/64").unwrap().contains("DNSWL"));
        assert_eq!(why("198.51.100.200/32"), None);
        assert_eq!(why("192.0.2.7/32"), None);
        let off = Protected { local: None, ..p };
        assert_eq!(off.why(&n("203.0.113.5/32")), None, "permit_local off");
    }

    #[test]
    fn a_repeat_failure_doubles_and_a_listed_net_stays_with_its_list() {
        let net = n("192.0.2.7/32");
        let OnFailure::Block { rec, ttl } = on_failure(net, Reason::Pregreet, None, 1000, H, D)
        else {
            panic!("a first failure blocks");
        };
        assert_eq!((ttl, rec.offences, rec.added), (H, 1, 1000));
        assert_eq!(rec.expires, 1000 + 3600);
        assert_eq!(rec.reason, "pregreet");
        // Lapsed and back: the second offence, twice as long, first seen kept.
        let OnFailure::Block { rec: again, ttl } =
            on_failure(net, Reason::Dnsbl, Some(&rec), 9000, H, D)
        else {
            panic!("a repeat failure blocks");
        };
        assert_eq!((ttl, again.offences, again.added), (2 * H, 2, 1000));
        let listed = BlockRecord {
            list: Some("drop".into()),
            origin: None,
            expires: 0,
            ..rec
        };
        assert_eq!(
            on_failure(net, Reason::Pregreet, Some(&listed), 9000, H, D),
            OnFailure::Listed { until: 0 }
        );
    }

    #[test]
    fn escalation_needs_the_threshold_and_no_block_in_force() {
        assert!(!escalates(2, 3, false));
        assert!(escalates(3, 3, false));
        assert!(!escalates(3, 3, true), "already blocked");
        assert!(!escalates(100, 0, false), "0 switches it off");
        let rec = escalation(n("192.0.2.0/24"), 10, D);
        assert_eq!((rec.reason.as_str(), rec.expires), ("escalation", 86_410));
    }
}
