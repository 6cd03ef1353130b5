//! RFC 5782 health checks: is a list still answering sanely?
//!
//! Every list must list the test point 127.0.0.2 and must not list
//! 127.0.0.1 (section 5). A list that lists 127.0.0.1 lists the world; one
//! that does not list 127.0.0.2, or answers it with an error code, is dead,
//! misconfigured or refusing us. Either way it is switched off until a
//! later check passes. For IPv6 the test points are `::FFFF:7F00:2` and
//! `::FFFF:7F00:1`; a list that does not list the former does not serve IPv6,
//! and its IPv6 side is not judged.
//!
//! A check that gets no answer (timeout, SERVFAIL) proves nothing: the list
//! keeps its current state, so a DNS outage never switches lists off or on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::Ordering;

use super::answer::{judge, Answer, Judgement};
use super::{query_name, Inner};

/// What one round of checks found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Pass,
    Fail(String),
    /// No answer that proves anything.
    Unknown(String),
}

/// Checks list `d` and switches it off or on.
pub(super) async fn check(inner: &Inner, d: usize) {
    let domain = &inner.domains[d];
    let v4 = |last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
    let v6 = |last| IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x7f00, last));
    let ask = |ip| async move {
        tokio::time::timeout(
            inner.timeout,
            inner.source.query(query_name(ip, &domain.name)),
        )
        .await
        .unwrap_or(Answer::Failed(super::Failure::Timeout))
    };
    let (must4, mustnt4, must6, mustnt6) =
        futures::join!(ask(v4(2)), ask(v4(1)), ask(v6(2)), ask(v6(1)));

    let usable = |addrs: &[Ipv4Addr]| {
        domain
            .entries
            .iter()
            .any(|&e| !matches!(judge(&inner.entries[e], addrs), Judgement::Error(_)))
    };
    let verdict = match (&must4, &mustnt4) {
        (Answer::Failed(f), _) => Verdict::Unknown(format!("test point 127.0.0.2: {f}")),
        (_, Answer::Failed(f)) => Verdict::Unknown(format!("test point 127.0.0.1: {f}")),
        (Answer::NotListed { .. }, _) => {
            Verdict::Fail("test point 127.0.0.2 is not listed".to_owned())
        }
        (Answer::Listed { addrs, .. }, _) if !usable(addrs) => Verdict::Fail(format!(
            "test point 127.0.0.2 gets error answer {}",
            join(addrs)
        )),
        (_, Answer::Listed { addrs, .. }) => Verdict::Fail(format!(
            "test point 127.0.0.1 is listed ({}): the list lists everything",
            join(addrs)
        )),
        (Answer::Listed { .. }, Answer::NotListed { .. }) => match (&must6, &mustnt6) {
            (Answer::Listed { addrs, .. }, Answer::Listed { addrs: bad, .. }) if usable(addrs) => {
                Verdict::Fail(format!(
                    "test point ::ffff:7f00:1 is listed ({}): the list lists every IPv6 address",
                    join(bad)
                ))
            }
            _ => Verdict::Pass,
        },
    };

    match verdict {
        Verdict::Pass => {
            if domain.enabled.swap(true, Ordering::Relaxed) {
                tracing::debug!(site = %domain.public, "DNSBL site health check passed");
            } else {
                tracing::info!(
                    site = %domain.public,
                    "DNSBL site {} passes its health check again; enabled",
                    domain.public
                );
            }
        }
        Verdict::Fail(reason) => {
            domain.health_failures.fetch_add(1, Ordering::Relaxed);
            if domain.enabled.swap(false, Ordering::Relaxed) {
                domain.times_disabled.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    site = %domain.public,
                    reason = %reason,
                    "DNSBL site {} disabled: {reason}",
                    domain.public
                );
            } else {
                tracing::warn!(
                    site = %domain.public,
                    reason = %reason,
                    "DNSBL site {} still disabled: {reason}",
                    domain.public
                );
            }
        }
        Verdict::Unknown(reason) => {
            tracing::warn!(
                site = %domain.public,
                reason = %reason,
                "DNSBL site {} health check inconclusive: {reason}; state unchanged",
                domain.public
            );
        }
    }
}

fn join(addrs: &[Ipv4Addr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
