//! Admission of a new connection, before any test: postscreen's order of
//! per-client count, post-queue limit, the host's own addresses, permanent
//! access list, temporary allowlist (cache) and pre-queue limit.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::session::Todo;
use crate::config::{AccessAction, AccessRule};
use crate::local::HostAddrs;
use crate::screen::PerTest;

/// The limits and switches admission looks at.
#[derive(Clone, Debug)]
pub struct GateParams {
    /// Permanent access list, first match wins.
    pub access_list: Vec<AccessRule>,
    /// The host's own addresses, permitted ahead of the access list as
    /// postscreen's `permit_mynetworks`; `None` when `screen.permit_local`
    /// is off.
    pub local: Option<Arc<HostAddrs>>,
    /// Most simultaneous connections from one address.
    pub client_connection_count_limit: usize,
    /// Most clients handed to the backend at once.
    pub post_queue_limit: usize,
    /// Most clients being screened at once.
    pub pre_queue_limit: usize,
    /// Which tests are switched on.
    pub enabled: PerTest<bool>,
}

/// Connection counts at the time a client arrives, this client excluded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Connections from the same address.
    pub client: usize,
    /// Clients being screened.
    pub pre_queue: usize,
    /// Clients handed to the backend.
    pub post_queue: usize,
}

/// What happens to a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Turned away with this reply; `why` completes the `NOQUEUE` log line.
    Busy {
        /// The 421 reply.
        reply: &'static str,
        /// The reason in the log.
        why: &'static str,
    },
    /// Matched a `permit` rule: straight to the backend.
    Allowlisted,
    /// Matched a `reject` rule.
    Denylisted,
    /// Every enabled test has an unexpired pass: straight to the backend.
    PassOld,
    /// Screen the client for these tests.
    Screen(Todo),
}

/// Whether `peer` may send a PROXY header (`smtp.upstream_proxy_trusted`).
/// A header names the client the verdict falls on, so one from anyone else
/// could get any address blocked at the NIC; such a connection is closed
/// before its header is read.
pub fn proxy_trusted(trusted: &[IpNet], peer: IpAddr) -> bool {
    let peer = peer.to_canonical();
    trusted.iter().any(|n| n.contains(&peer))
}

/// Decides what happens to a new connection from `ip`. `expires` is the
/// cached record (pass expiry in unix seconds per test, 0 never passed).
pub fn admit(
    p: &GateParams,
    ip: IpAddr,
    load: Load,
    expires: Option<PerTest<u64>>,
    now_unix: u64,
) -> Admission {
    if load.client >= p.client_connection_count_limit {
        return Admission::Busy {
            reply: "421 4.7.0 Error: too many connections",
            why: "too many connections",
        };
    }
    if load.post_queue >= p.post_queue_limit {
        return Admission::Busy {
            reply: "421 4.3.2 All server ports are busy",
            why: "all server ports busy",
        };
    }
    let ip = ip.to_canonical();
    if p.local.as_ref().is_some_and(|l| l.contains(ip)) {
        return Admission::Allowlisted;
    }
    if let Some(rule) = p.access_list.iter().find(|r| r.net.contains(&ip)) {
        return if rule.action == AccessAction::Permit {
            Admission::Allowlisted
        } else {
            Admission::Denylisted
        };
    }
    let todo = Todo(p.enabled.map(|t, &on| {
        // Due: switched on, and no unexpired pass in the cache.
        let passed = expires.is_some_and(|e| e[t] > now_unix);
        on && !passed
    }));
    if expires.is_some() && todo == Todo::default() {
        return Admission::PassOld;
    }
    if load.pre_queue >= p.pre_queue_limit {
        return Admission::Busy {
            reply: "421 4.3.2 All screening ports are busy",
            why: "all screening ports busy",
        };
    }
    Admission::Screen(todo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::screen::TestId;

    /// Pregreet and pipelining on, the others off.
    fn enabled() -> PerTest<bool> {
        PerTest::from_fn(|t| matches!(t, TestId::Pregreet | TestId::Pipelining))
    }

    /// Expiries for pregreet and pipelining.
    fn expiring(pregreet: u64, pipelining: u64) -> PerTest<u64> {
        let mut e = PerTest::default();
        e[TestId::Pregreet] = pregreet;
        e[TestId::Pipelining] = pipelining;
        e
    }

    fn params() -> GateParams {
        GateParams {
            access_list: vec![
                "permit 192.0.2.0/25".parse().unwrap(),
                "reject 192.0.2.0/24".parse().unwrap(),
            ],
            local: None,
            client_connection_count_limit: 2,
            post_queue_limit: 3,
            pre_queue_limit: 4,
            enabled: enabled(),
        }
    }

    const NOW: u64 = 1_000_000;

    #[test]
    fn order_of_checks() {
        let p = params();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let busy = |load| admit(&p, ip, load, None, NOW);
        assert!(matches!(
            busy(Load {
                client: 2,
                pre_queue: 9,
                post_queue: 9
            }),
            Admission::Busy {
                why: "too many connections",
                ..
            }
        ));
        assert!(matches!(
            busy(Load {
                client: 0,
                pre_queue: 9,
                post_queue: 3
            }),
            Admission::Busy {
                why: "all server ports busy",
                ..
            }
        ));
        // The access list comes before the pre-queue limit.
        assert_eq!(
            busy(Load {
                client: 0,
                pre_queue: 9,
                post_queue: 0
            }),
            Admission::Allowlisted
        );
        let other: IpAddr = "192.0.2.200".parse().unwrap();
        assert_eq!(
            admit(&p, other, Load::default(), None, NOW),
            Admission::Denylisted
        );
        let mapped: IpAddr = "::ffff:192.0.2.200".parse().unwrap();
        assert_eq!(
            admit(&p, mapped, Load::default(), None, NOW),
            Admission::Denylisted
        );
    }

    #[test]
    fn local_addresses_are_permitted_ahead_of_the_access_list() {
        let mut p = params();
        p.access_list.push("reject 0.0.0.0/0".parse().unwrap());
        p.access_list.push("reject ::/0".parse().unwrap());
        let host: IpAddr = "198.51.100.25".parse().unwrap();
        let admit_ =
            |p: &GateParams, ip: &str| admit(p, ip.parse().unwrap(), Load::default(), None, NOW);
        for ip in [
            "127.0.0.1",
            "127.0.1.1",
            "::1",
            "198.51.100.25",
            "::ffff:198.51.100.25",
        ] {
            assert_eq!(
                admit_(&p, ip),
                Admission::Denylisted,
                "{ip} without permit_local"
            );
        }
        p.local = Some(Arc::new(HostAddrs::from_addrs([host])));
        for ip in [
            "127.0.0.1",
            "127.0.1.1",
            "::1",
            "198.51.100.25",
            "::ffff:198.51.100.25",
        ] {
            assert_eq!(admit_(&p, ip), Admission::Allowlisted, "{ip}");
        }
        assert_eq!(admit_(&p, "198.51.100.26"), Admission::Denylisted);
        // The limits still come first.
        assert!(matches!(
            admit(
                &p,
                "127.0.0.1".parse().unwrap(),
                Load {
                    client: 2,
                    ..Load::default()
                },
                None,
                NOW
            ),
            Admission::Busy { .. }
        ));
    }

    #[test]
    fn only_trusted_peers_may_send_a_proxy_header() {
        let trusted: Vec<IpNet> = vec![
            "127.0.0.1/32".parse().unwrap(),
            "2001:db8:5::/64".parse().unwrap(),
        ];
        for (peer, ok) in [
            ("127.0.0.1", true),
            ("::ffff:127.0.0.1", true),
            ("127.0.0.2", false),
            ("2001:db8:5::9", true),
            ("2001:db8:6::9", false),
            ("192.0.2.9", false),
        ] {
            assert_eq!(proxy_trusted(&trusted, peer.parse().unwrap()), ok, "{peer}");
        }
        assert!(!proxy_trusted(&[], "127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn cache_and_pre_queue() {
        let p = params();
        let ip: IpAddr = "203.0.113.5".parse().unwrap();
        let fresh = expiring(NOW + 10, NOW + 10);
        assert_eq!(
            admit(
                &p,
                ip,
                Load {
                    pre_queue: 9,
                    ..Load::default()
                },
                Some(fresh),
                NOW
            ),
            Admission::PassOld
        );
        let stale = expiring(NOW + 10, NOW - 1);
        assert_eq!(
            admit(&p, ip, Load::default(), Some(stale), NOW),
            Admission::Screen(Todo::only(&[TestId::Pipelining]))
        );
        assert!(matches!(
            admit(
                &p,
                ip,
                Load {
                    pre_queue: 4,
                    ..Load::default()
                },
                Some(stale),
                NOW
            ),
            Admission::Busy {
                why: "all screening ports busy",
                ..
            }
        ));
        assert_eq!(
            admit(&p, ip, Load::default(), None, NOW),
            Admission::Screen(Todo::only(&[TestId::Pregreet, TestId::Pipelining]))
        );
    }
}
