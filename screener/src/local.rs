//! The host's own addresses, permitted by default (`screen.permit_local`).
//!
//! postscreen's default access list is `permit_mynetworks`: the host itself
//! is never screened. Without the same rule a first `telnet localhost 25`
//! that types too early gets 127.0.0.1 blocked in the kernel, and with
//! `xdp.interfaces = ["lo"]` (the example configuration) that cuts the
//! host off from itself. So loopback (127.0.0.0/8, `::1`) and every
//! address on every interface are treated like an access-list `permit`:
//! the gate lets them through as `ALLOWLISTED` without tests, and no
//! verdict ever covers one, nor a prefix containing one (the same rule as
//! for permits, so an escalation to our own /24 or a verdict on our own
//! IPv6 /64 is refused as well).
//!
//! The interface addresses are a fact about the host, not about one
//! configuration, so they live in one process-wide snapshot: read when
//! first needed, and again by [`refresh`] when the daemon starts and on
//! every reload (an address added later is permitted from the next
//! reload on). Reading them is `getifaddrs(3)`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, PoisonError, RwLock};

use ipnet::IpNet;

/// The loopback networks, permitted whatever the interfaces say.
fn loopback() -> [IpNet; 2] {
    [
        IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8).expect("a valid prefix"),
        IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ]
}

/// One reading of the host's addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostAddrs {
    /// Every interface address (canonical: no IPv4-mapped IPv6), sorted,
    /// without duplicates. Loopback is implied, listed or not.
    addrs: Vec<IpAddr>,
}

impl HostAddrs {
    /// A snapshot holding `addrs` besides loopback.
    pub fn from_addrs(addrs: impl IntoIterator<Item = IpAddr>) -> HostAddrs {
        let mut addrs: Vec<IpAddr> = addrs.into_iter().map(|a| a.to_canonical()).collect();
        addrs.sort_unstable();
        addrs.dedup();
        HostAddrs { addrs }
    }

    /// Reads the addresses of every interface; on failure (which
    /// `getifaddrs` only has when out of memory or descriptors) loopback
    /// alone, with a warning.
    pub fn read() -> HostAddrs {
        match interface_addrs() {
            Ok(addrs) => HostAddrs::from_addrs(addrs),
            Err(e) => {
                tracing::warn!(
                    "cannot read the interface addresses ({e}); only loopback is permitted as local"
                );
                HostAddrs::default()
            }
        }
    }

    /// Whether `ip` is loopback or one of the host's addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_loopback() || self.addrs.binary_search(&ip).is_ok()
    }

    /// A local address inside `net`, or the loopback network overlapping
    /// it: what a verdict on `net` would also cover.
    pub fn within(&self, net: &IpNet) -> Option<String> {
        if let Some(lo) = loopback()
            .iter()
            .find(|lo| lo.contains(net) || net.contains(*lo))
        {
            return Some(lo.to_string());
        }
        self.addrs
            .iter()
            .find(|a| net.contains(*a))
            .map(ToString::to_string)
    }

    /// The addresses, for the log.
    pub fn addrs(&self) -> &[IpAddr] {
        &self.addrs
    }
}

/// The process-wide snapshot; `None` until first read.
static CURRENT: RwLock<Option<Arc<HostAddrs>>> = RwLock::new(None);

/// The current snapshot, read on first use.
pub fn current() -> Arc<HostAddrs> {
    if let Some(h) = CURRENT
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
    {
        return Arc::clone(h);
    }
    refresh()
}

/// Reads the interfaces again and makes that the snapshot; logs it.
pub fn refresh() -> Arc<HostAddrs> {
    let fresh = Arc::new(HostAddrs::read());
    let list: Vec<String> = fresh.addrs().iter().map(ToString::to_string).collect();
    tracing::info!(
        "local addresses: 127.0.0.0/8, ::1{}{}",
        if list.is_empty() { "" } else { ", " },
        list.join(", ")
    );
    *CURRENT.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&fresh));
    fresh
}

/// Every address of every interface, by `getifaddrs(3)`.
fn interface_addrs() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut p = head;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned, not yet
        // freed; its `ifa_addr` is null or points to a sockaddr whose
        // family says which struct it is.
        unsafe {
            let ifa = &*p;
            if !ifa.ifa_addr.is_null() {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    // Copied out unaligned: a `sockaddr` promises less
                    // alignment than the struct its family names.
                    libc::AF_INET => {
                        let sin = ifa.ifa_addr.cast::<libc::sockaddr_in>().read_unaligned();
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = ifa.ifa_addr.cast::<libc::sockaddr_in6>().read_unaligned();
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            p = ifa.ifa_next;
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_and_listed_addresses_are_local() {
        let h = HostAddrs::from_addrs([ip("192.0.2.1"), ip("2001:db8:1::1"), ip("192.0.2.1")]);
        assert_eq!(h.addrs().len(), 2);
        for local in [
            "127.0.0.1",
            "127.3.2.1",
            "::1",
            "::ffff:127.0.0.1",
            "192.0.2.1",
            "::ffff:192.0.2.1",
            "2001:db8:1::1",
        ] {
            assert!(h.contains(ip(local)), "{local}");
        }
        for remote in ["192.0.2.2", "2001:db8:1::2", "198.51.100.1", "::2"] {
            assert!(!h.contains(ip(remote)), "{remote}");
        }
    }

    #[test]
    fn a_net_covering_a_local_address_is_named() {
        let h = HostAddrs::from_addrs([ip("192.0.2.1"), ip("2001:db8:1::1")]);
        for (n, why) in [
            ("127.0.0.1/32", Some("127.0.0.0/8")),
            ("127.0.0.0/24", Some("127.0.0.0/8")),
            ("0.0.0.0/0", Some("127.0.0.0/8")),
            ("::1/128", Some("::1/128")),
            ("::/0", Some("::1/128")),
            ("192.0.2.0/24", Some("192.0.2.1")),
            ("192.0.2.1/32", Some("192.0.2.1")),
            ("2001:db8:1::/64", Some("2001:db8:1::1")),
            ("192.0.2.2/32", None),
            ("198.51.100.0/24", None),
            ("2001:db8:2::/64", None),
        ] {
            assert_eq!(h.within(&net(n)).as_deref(), why, "{n}");
        }
    }

    #[test]
    fn the_host_has_its_loopback_address() {
        // Every Linux host, test containers included, has lo up.
        let h = HostAddrs::read();
        assert!(h.addrs().contains(&ip("127.0.0.1")), "{h:?}");
        assert!(h.contains(ip("127.0.0.1")));
    }
}
