//! Packet parsing shared by the XDP program and its benchmark baseline:
//! Ethernet, up to two VLAN tags, IPv4 with options, IPv6 with its
//! extension headers, the TCP ports and flags. Every field is read through
//! the one pointer `ptr_at` bounds-checked, which is what the verifier can
//! follow.
//!
//! The parser answers two questions: is the packet in scope, and could it
//! open a connection. Only packets that could are judged on their source
//! (see OPENERS in `main.rs`).

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use screener_common::{Config, FLAG_ALL_PORTS};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;
/// The TCP source and destination ports: all a fragment's verdict needs.
const TCP_PORTS: usize = 4;
/// The TCP header up to and including its flags byte: the ports, the
/// sequence and acknowledgment numbers, the data offset, the flags.
const TCP_FLAGS_END: usize = 14;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// IPv4 "more fragments" flag and fragment offset (in the flags word).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
const IPV6_HLEN: usize = 40;
/// IPv6 extension headers followed before giving up (counted unparseable).
const MAX_EXT_HEADERS: usize = 6;

/// What the parser found.
pub(crate) enum Parsed {
    NotIp,
    Unparseable,
    OutOfScope,
    /// A TCP segment that cannot open a connection (ACK set, or SYN
    /// clear): it passes whatever its source.
    NotOpening,
    V4([u8; 4]),
    /// The source address where it sits in the packet (bounds-checked):
    /// copied only when a prefilter bit says it may be blocked.
    V6(*const [u8; 16]),
}

/// A pointer to a `T` at `offset` in the packet, or `None` when the packet
/// is too short. The one place packet bounds are checked.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn be16_at(ctx: &XdpContext, offset: usize) -> Option<u16> {
    // SAFETY: ptr_at checked both bytes are inside the packet.
    ptr_at::<[u8; 2]>(ctx, offset).map(|p| u16::from_be_bytes(unsafe { *p }))
}

#[inline(always)]
pub(crate) fn parse(ctx: &XdpContext, cfg: &Config) -> Parsed {
    let Some(mut proto) = be16_at(ctx, 12) else {
        return Parsed::Unparseable;
    };
    let mut off = ETH_HLEN;
    // Up to two VLAN tags (802.1ad outer, 802.1Q inner), unrolled.
    for _ in 0..2 {
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            let Some(inner) = be16_at(ctx, off + 2) else {
                return Parsed::Unparseable;
            };
            proto = inner;
            off += 4;
        }
    }
    let all_ports = cfg.flags & FLAG_ALL_PORTS != 0;
    match proto {
        ETH_P_IP => parse_v4(ctx, cfg, off, all_ports),
        ETH_P_IPV6 => parse_v6(ctx, cfg, off, all_ports),
        ETH_P_8021Q | ETH_P_8021AD => Parsed::Unparseable,
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, cfg: &Config, off: usize, all_ports: bool) -> Parsed {
    // The fixed 20-byte header must be there even in "all" scope: the source
    // address sits at its end. Every field is read through the one pointer
    // that was bounds-checked, which is what the verifier can follow.
    let Some(ip) = ptr_at::<[u8; 20]>(ctx, off) else {
        return Parsed::Unparseable;
    };
    // SAFETY: ptr_at checked the 20 bytes are inside the packet.
    let ip = unsafe { &*ip };
    let vihl = ip[0];
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Parsed::Unparseable;
    }
    // Make sure the whole header, options included, is in the packet.
    if ptr_at::<u8>(ctx, off + ihl - 1).is_none() {
        return Parsed::Unparseable;
    }
    let src = Parsed::V4([ip[12], ip[13], ip[14], ip[15]]);
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if ip[9] != IPPROTO_TCP || frag & IP_OFFSET != 0 {
        // Not TCP, or a non-first fragment (no TCP header): see FRAGMENTS.
        return not_tcp(all_ports, src);
    }
    let l4 = off + ihl;
    if let Some(tcp) = ptr_at::<[u8; TCP_FLAGS_END]>(ctx, l4) {
        return tcp_segment(cfg, all_ports, tcp, src);
    }
    if frag & IP_MF == 0 {
        // A whole datagram cut inside its TCP header: malformed.
        return Parsed::Unparseable;
    }
    // A first fragment cut inside the TCP header. Linux reassembles it all
    // the same, so it is judged on its ports when it carries them, else on
    // its source alone (see FRAGMENTS).
    match ptr_at::<[u8; TCP_PORTS]>(ctx, l4) {
        // SAFETY: ptr_at checked both ports are inside the packet.
        Some(p) if !all_ports && !port_in_scope(cfg, unsafe { &*p }) => Parsed::OutOfScope,
        _ => src,
    }
}

/// A packet that is not a TCP segment with its header: judged on its
/// source in "all" scope, out of scope otherwise.
#[inline(always)]
fn not_tcp(all_ports: bool, src: Parsed) -> Parsed {
    if all_ports {
        src
    } else {
        Parsed::OutOfScope
    }
}

#[inline(always)]
fn port_in_scope(cfg: &Config, tcp: &[u8]) -> bool {
    cfg.port_enabled(u16::from_be_bytes([tcp[2], tcp[3]]))
}

/// A TCP segment whose header, up to its flags, is in the packet: in scope
/// by its destination port, and judged on its source only when it could
/// open a connection (SYN without ACK).
#[inline(always)]
fn tcp_segment(
    cfg: &Config,
    all_ports: bool,
    tcp: *const [u8; TCP_FLAGS_END],
    src: Parsed,
) -> Parsed {
    // SAFETY: ptr_at checked the bytes are inside the packet.
    let tcp = unsafe { &*tcp };
    if !all_ports && !port_in_scope(cfg, tcp) {
        return Parsed::OutOfScope;
    }
    if tcp[13] & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Parsed::NotOpening;
    }
    src
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, cfg: &Config, off: usize, all_ports: bool) -> Parsed {
    let Some(ip) = ptr_at::<[u8; IPV6_HLEN]>(ctx, off) else {
        return Parsed::Unparseable;
    };
    // SAFETY: ptr_at checked the fixed header is inside the packet.
    let ip = unsafe { &*ip };
    if ip[0] >> 4 != 6 {
        return Parsed::Unparseable;
    }
    let src = Parsed::V6(ip[8..24].as_ptr().cast::<[u8; 16]>());
    let mut next = ip[6];
    let mut l4 = off + IPV6_HLEN;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => return tcp_v6(ctx, cfg, l4, all_ports, src),
            0 | 43 | 60 | 44 | 51 => {}
            // No next header, ESP, ICMPv6, UDP, ...: not TCP.
            _ => return not_tcp(all_ports, src),
        }
        // Every extension header we follow is at least 8 bytes.
        let Some(h) = ptr_at::<[u8; 8]>(ctx, l4) else {
            return Parsed::Unparseable;
        };
        // SAFETY: ptr_at checked the 8 bytes are inside the packet.
        let h = unsafe { &*h };
        let len = match next {
            // Fragment header: a non-first fragment has no TCP header.
            44 => {
                if u16::from_be_bytes([h[2], h[3]]) >> 3 != 0 {
                    return not_tcp(all_ports, src);
                }
                8
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => (usize::from(h[1]) + 2) * 4,
            // Hop-by-hop, routing, destination options: length in 8-octet
            // units, not counting the first.
            _ => (usize::from(h[1]) + 1) * 8,
        };
        next = h[0];
        l4 += len;
    }
    if next == IPPROTO_TCP {
        return tcp_v6(ctx, cfg, l4, all_ports, src);
    }
    // A longer chain than we follow, which Linux does follow: it could hide
    // a SYN, so it is judged on its source (see OPENERS).
    src
}

#[inline(always)]
fn tcp_v6(ctx: &XdpContext, cfg: &Config, l4: usize, all_ports: bool, src: Parsed) -> Parsed {
    // Linux drops an IPv6 first fragment that does not carry the whole TCP
    // header (RFC 7112), so a short one needs no verdict of ours.
    match ptr_at::<[u8; TCP_FLAGS_END]>(ctx, l4) {
        Some(tcp) => tcp_segment(cfg, all_ports, tcp, src),
        None => Parsed::Unparseable,
    }
}
