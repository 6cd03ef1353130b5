//! RFC 5782 health checks: switch a list off only when it would do harm.
//!
//! WHAT IS CHECKED. For each list, at start-up and every
//! `screen.dnsbl_health_interval`, unless it is in `screen.dnsbl_health_skip`,
//! four names are asked, two per address family (RFC 5782 section 5):
//!
//! | family | must not be listed | should be listed |
//! |---|---|---|
//! | IPv4 | 127.0.0.1 | 127.0.0.2 |
//! | IPv6 | `::ffff:7f00:1` | `::ffff:7f00:2` |
//!
//! A family whose must-not point is listed with an answer one of the list's
//! `dnsbl_sites` entries would count lists the world: that family is
//! switched off (an ERROR, `disabled_ipv4`/`disabled_ipv6` in the stats)
//! and no client of that family is asked about it until a later check
//! finds the point unlisted again. That is the only switch-off. The two
//! families are judged apart, each on its own test points, so an IPv6-only
//! list (an rbldnsd `ip6trie` zone) is never judged by IPv4 points, and a
//! list whose IPv6 side alone lists the world keeps scoring IPv4 clients.
//!
//! A missing should-be point is not harm: private lists, and lists that
//! only hold one family, legitimately lack one. It is a WARN when the list
//! answers neither family's point (dead, private, or refusing us; a
//! lasting outage shows as failures when clients are scored), or when a
//! family that answered its point before stops answering it. A must-not
//! point listed with an answer no entry counts (an error code, or an
//! address the filters ignore) scores nobody; it is a WARN too. A check
//! with any such WARN counts once in `health_warnings`.
//!
//! A check that gets no answer (timeout, SERVFAIL) proves nothing: that
//! family keeps its current state, so a DNS outage never switches lists
//! off or on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::Ordering;

use super::answer::{judge, Answer, Judgement};
use super::{query_name, Family, Inner};

/// What one family's must-not test point showed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum World {
    /// Not listed: the family is sane.
    Clear,
    /// Listed, but with answers no entry counts: harmless, odd.
    Odd(String),
    /// Listed with an answer an entry counts: the family lists the world.
    Harm(String),
    /// No answer that proves anything.
    Unknown(String),
}

/// What one family's should-be test point showed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Positive {
    Present,
    Missing(String),
    Unknown,
}

/// One RFC 5782 test point: its address and its name as RFC 5782 writes
/// it (Rust would print the IPv6 ones as `::ffff:127.0.0.1`).
#[derive(Clone, Copy)]
struct Point {
    ip: IpAddr,
    name: &'static str,
}

/// The test points of `family`: (must not be listed, should be listed).
fn points(family: Family) -> (Point, Point) {
    match family {
        Family::V4 => (
            Point {
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                name: "127.0.0.1",
            },
            Point {
                ip: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
                name: "127.0.0.2",
            },
        ),
        Family::V6 => (
            Point {
                ip: IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x7f00, 1)),
                name: "::ffff:7f00:1",
            },
            Point {
                ip: IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x7f00, 2)),
                name: "::ffff:7f00:2",
            },
        ),
    }
}

/// Checks list `d` and switches its families off or on.
pub(super) async fn check(inner: &Inner, d: usize) {
    let domain = &inner.domains[d];
    if domain.health_skip {
        return;
    }
    let ask = |point: Point| async move {
        tokio::time::timeout(
            inner.timeout,
            inner.source.query(query_name(point.ip, &domain.name)),
        )
        .await
        .unwrap_or(Answer::Failed(super::Failure::Timeout))
    };
    let (world4, pos4) = points(Family::V4);
    let (world6, pos6) = points(Family::V6);
    let (w4, p4, w6, p6) = futures::join!(ask(world4), ask(pos4), ask(world6), ask(pos6));

    let mut positives = Vec::new();
    let (mut harm, mut switched_off, mut odd) = (false, false, false);
    for (family, world, positive) in [(Family::V4, &w4, &p4), (Family::V6, &w6, &p6)] {
        let (world_point, pos_point) = points(family);
        let world = judge_world(inner, d, family, world_point, world);
        harm |= matches!(world, World::Harm(_));
        odd |= matches!(world, World::Odd(_));
        switched_off |= apply_world(inner, d, family, world);
        positives.push((family, judge_positive(inner, d, pos_point, positive)));
    }
    odd |= warn_missing(inner, d, &positives);
    // Counted per check, not per family or finding: a list that breaks
    // usually does so in both families at once.
    for (happened, counter) in [
        (harm, &domain.health_failures),
        (switched_off, &domain.times_disabled),
        (odd, &domain.health_warnings),
        (true, &domain.health_checks),
    ] {
        if happened {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Judges the must-not test point's answer.
fn judge_world(inner: &Inner, d: usize, family: Family, point: Point, answer: &Answer) -> World {
    let domain = &inner.domains[d];
    match answer {
        Answer::Failed(f) => World::Unknown(format!("test point {}: {f}", point.name)),
        Answer::NotListed { .. } => World::Clear,
        Answer::Listed { addrs, .. } => {
            let counted = domain
                .entries
                .iter()
                .any(|&e| judge(&inner.entries[e], addrs) == Judgement::Hit);
            if counted {
                World::Harm(format!(
                    "test point {} is listed ({}): the list lists every {} address",
                    point.name,
                    join(addrs),
                    family.name()
                ))
            } else {
                World::Odd(format!(
                    "test point {} is listed ({}), an answer no entry counts",
                    point.name,
                    join(addrs)
                ))
            }
        }
    }
}

/// Judges the should-be test point's answer: present when some entry
/// takes the answer for a listing or a miss, not for an error code.
fn judge_positive(inner: &Inner, d: usize, point: Point, answer: &Answer) -> Positive {
    let domain = &inner.domains[d];
    match answer {
        Answer::Failed(_) => Positive::Unknown,
        Answer::NotListed { .. } => {
            Positive::Missing(format!("test point {} is not listed", point.name))
        }
        Answer::Listed { addrs, .. } => {
            let usable = domain
                .entries
                .iter()
                .any(|&e| !matches!(judge(&inner.entries[e], addrs), Judgement::Error(_)));
            if usable {
                Positive::Present
            } else {
                Positive::Missing(format!(
                    "test point {} gets error answer {}",
                    point.name,
                    join(addrs)
                ))
            }
        }
    }
}

/// Switches `family` of list `d` off or on as `world` says; true when it
/// was on and is now off.
fn apply_world(inner: &Inner, d: usize, family: Family, world: World) -> bool {
    let domain = &inner.domains[d];
    let site = &domain.public;
    let enabled = &domain.enabled[family.index()];
    let fam = family.name();
    match world {
        World::Clear | World::Odd(_) => {
            if let World::Odd(reason) = &world {
                tracing::warn!(
                    site = %site,
                    reason = %reason,
                    "DNSBL site {site} {fam}: {reason}; still in use"
                );
            }
            if enabled.swap(true, Ordering::Relaxed) {
                tracing::debug!(site = %site, "DNSBL site {site} {fam} health check passed");
            } else {
                tracing::info!(
                    site = %site,
                    "DNSBL site {site} {fam} passes its health check again; enabled"
                );
            }
            false
        }
        World::Harm(reason) => {
            let was_on = enabled.swap(false, Ordering::Relaxed);
            if was_on {
                tracing::error!(
                    site = %site,
                    reason = %reason,
                    "DNSBL site {site} disabled for {fam} clients: {reason}"
                );
            } else {
                tracing::warn!(
                    site = %site,
                    reason = %reason,
                    "DNSBL site {site} still disabled for {fam} clients: {reason}"
                );
            }
            was_on
        }
        World::Unknown(reason) => {
            tracing::warn!(
                site = %site,
                reason = %reason,
                "DNSBL site {site} {fam} health check inconclusive: {reason}; state unchanged"
            );
            false
        }
    }
}

/// Warns about missing should-be test points: when neither family has
/// its point, or a family that had it lost it (true when it warned). A
/// family that never had it simply holds no data of that family.
fn warn_missing(inner: &Inner, d: usize, positives: &[(Family, Positive)]) -> bool {
    let domain = &inner.domains[d];
    let site = &domain.public;
    let missing: Vec<&String> = positives
        .iter()
        .filter_map(|(_, p)| match p {
            Positive::Missing(reason) => Some(reason),
            _ => None,
        })
        .collect();
    let mut lost = Vec::new();
    for (family, p) in positives {
        let served = &domain.served[family.index()];
        match p {
            Positive::Present => served.store(true, Ordering::Relaxed),
            Positive::Missing(reason) if served.load(Ordering::Relaxed) => lost.push(reason),
            Positive::Missing(_) | Positive::Unknown => {}
        }
    }
    if missing.len() == positives.len() {
        let reasons = join_reasons(&missing);
        tracing::warn!(
            site = %site,
            reason = %reasons,
            "DNSBL site {site}: {reasons}: a dead or private list, or one refusing us; still in use"
        );
        true
    } else if !lost.is_empty() {
        let reasons = join_reasons(&lost);
        tracing::warn!(
            site = %site,
            reason = %reasons,
            "DNSBL site {site} no longer answers its test point: {reasons}; still in use"
        );
        true
    } else {
        if !missing.is_empty() {
            tracing::debug!(
                site = %site,
                "DNSBL site {site}: {}: no data of that family",
                join_reasons(&missing)
            );
        }
        false
    }
}

fn join_reasons(reasons: &[&String]) -> String {
    reasons
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn join(addrs: &[Ipv4Addr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
