//! The XDP gate: drops packets from blocked sources before the network stack
//! sees them.
//!
//! Contract:
//! - It never returns `XDP_ABORTED`. Whatever it cannot parse (truncated
//!   frames, unknown IP versions, more IPv6 extension headers than it
//!   follows) passes and is counted as unparseable.
//! - A packet is judged only when it is in scope: a TCP segment to a port in
//!   `xdp.ports`, or every IP packet when the scope is "all".
//! - A source is dropped when a live block entry covers it (exact IPv4 host,
//!   IPv6 host prefix, or any CIDR) and no allow entry does.
//!
//! FRAGMENTS. A non-first fragment carries no TCP header, so it has no port:
//! with a port scope it passes as out of scope. That opens nothing: the first
//! fragment, which carries the ports, is judged and dropped, and the
//! datagram cannot be reassembled without it. An IPv4 first fragment too
//! short to carry the ports is judged on its source alone, since Linux
//! reassembles it all the same. With the "all" scope every fragment is
//! judged on its source address.
//!
//! COST. The miss path is what every good packet pays: one array lookup for
//! the settings and one bit in the prefilter array (both inlined by the
//! verifier); only when that bit is set do the hash and trie lookups run,
//! and only for maps that hold entries (the daemon keeps the `FLAG_HAS_*`
//! and `FLAG_PREFILTER_*` bits current). The allow tries are consulted only
//! after a block entry matched, so allowing costs nothing on the miss path.
//! Exactly one per-CPU counter is bumped per packet.
#![no_std]
#![no_main]
#![expect(
    non_upper_case_globals,
    reason = "map names are what bpftool and the pin directory show"
)]

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray},
    helpers::bpf_ktime_get_boot_ns,
    macros::{btf_map, xdp},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use screener_common::{
    prefilter, stat, Config, Entry, FLAG_ALL_PORTS, FLAG_HAS_V4_ALLOW, FLAG_HAS_V4_CIDRS,
    FLAG_HAS_V4_HOSTS, FLAG_HAS_V6_ALLOW, FLAG_HAS_V6_CIDRS, FLAG_HAS_V6_HOSTS,
    FLAG_PREFILTER_V4, FLAG_PREFILTER_V6, FLAG_READY, REASONS,
};

/// Default sizes; the daemon overrides them from its config at load time.
const HOSTS: usize = 1 << 20;
const CIDRS: usize = 1 << 17;
const ALLOWS: usize = 1 << 14;
/// Hash maps grow as entries arrive instead of reserving a million slots.
const NO_PREALLOC: usize = aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize;

#[btf_map]
static config: Array<Config, 1> = Array::new();
#[btf_map]
static stats: PerCpuArray<u64, { stat::LEN as usize }> = PerCpuArray::new();
#[btf_map]
static allow_v4: LpmTrie<[u8; 4], Entry, ALLOWS> = LpmTrie::new();
#[btf_map]
static allow_v6: LpmTrie<[u8; 16], Entry, ALLOWS> = LpmTrie::new();
#[btf_map]
static block_v4: HashMap<[u8; 4], Entry, HOSTS, NO_PREALLOC> = HashMap::new();
/// Keyed by the source masked to `ipv6_prefix` bits.
#[btf_map]
static block_v6: HashMap<[u8; 16], Entry, HOSTS, NO_PREALLOC> = HashMap::new();
#[btf_map]
static block_v4_cidr: LpmTrie<[u8; 4], Entry, CIDRS> = LpmTrie::new();
#[btf_map]
static block_v6_cidr: LpmTrie<[u8; 16], Entry, CIDRS> = LpmTrie::new();
/// One bit per IPv4 /24 that some block entry covers (see `prefilter`).
#[btf_map]
static prefilter_v4: Array<u64, { prefilter::WORDS }> = Array::new();
/// One bit per hashed IPv6 /32 that some block entry covers.
#[btf_map]
static prefilter_v6: Array<u64, { prefilter::WORDS }> = Array::new();

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;
/// The TCP source and destination ports: all the program reads of TCP.
const TCP_PORTS: usize = 4;
const IPV6_HLEN: usize = 40;
/// IPv6 extension headers followed before giving up (counted unparseable).
const MAX_EXT_HEADERS: usize = 6;

/// What the parser found.
enum Parsed {
    NotIp,
    Unparseable,
    OutOfScope,
    V4([u8; 4]),
    V6([u8; 16]),
}

#[xdp]
pub fn screener(ctx: XdpContext) -> u32 {
    let (action, counter) = judge(&ctx);
    count(counter);
    action
}

#[inline(always)]
fn judge(ctx: &XdpContext) -> (u32, u32) {
    let Some(cfg) = config.get(0) else {
        return (XDP_PASS, stat::PASS_NOT_READY);
    };
    if cfg.flags & FLAG_READY == 0 {
        return (XDP_PASS, stat::PASS_NOT_READY);
    }
    match parse(ctx, cfg) {
        Parsed::NotIp => (XDP_PASS, stat::PASS_NOT_IP),
        Parsed::Unparseable => (XDP_PASS, stat::PASS_UNPARSEABLE),
        Parsed::OutOfScope => (XDP_PASS, stat::PASS_OUT_OF_SCOPE),
        Parsed::V4(src) => judge_v4(ctx, cfg.flags, src),
        Parsed::V6(src) => judge_v6(ctx, cfg, src),
    }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = stats.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently.
        unsafe { *c += 1 };
    }
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
fn parse(ctx: &XdpContext, cfg: &Config) -> Parsed {
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
    let src = [ip[12], ip[13], ip[14], ip[15]];
    if all_ports {
        return Parsed::V4(src);
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if ip[9] != IPPROTO_TCP || frag & 0x1fff != 0 {
        // Not TCP, or a non-first fragment (no ports): see FRAGMENTS.
        return Parsed::OutOfScope;
    }
    if frag & 0x2000 != 0 && ptr_at::<[u8; TCP_PORTS]>(ctx, off + ihl).is_none() {
        // A first fragment too short to carry the ports: Linux would still
        // reassemble it, so it is judged on its source (see FRAGMENTS).
        return Parsed::V4(src);
    }
    tcp_in_scope(ctx, cfg, off + ihl, Parsed::V4(src))
}

#[inline(always)]
fn tcp_in_scope(ctx: &XdpContext, cfg: &Config, l4: usize, src: Parsed) -> Parsed {
    let Some(tcp) = ptr_at::<[u8; TCP_PORTS]>(ctx, l4) else {
        return Parsed::Unparseable;
    };
    // SAFETY: ptr_at checked both ports are inside the packet.
    let tcp = unsafe { &*tcp };
    if cfg.port_enabled(u16::from_be_bytes([tcp[2], tcp[3]])) {
        src
    } else {
        Parsed::OutOfScope
    }
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
    let mut src = [0u8; 16];
    src.copy_from_slice(&ip[8..24]);
    if all_ports {
        return Parsed::V6(src);
    }
    let mut next = ip[6];
    let mut l4 = off + IPV6_HLEN;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => return tcp_in_scope(ctx, cfg, l4, Parsed::V6(src)),
            0 | 43 | 60 | 44 | 51 => {}
            // No next header, ESP, ICMPv6, UDP, ...: not TCP.
            _ => return Parsed::OutOfScope,
        }
        // Every extension header we follow is at least 8 bytes.
        let Some(h) = ptr_at::<[u8; 8]>(ctx, l4) else {
            return Parsed::Unparseable;
        };
        // SAFETY: ptr_at checked the 8 bytes are inside the packet.
        let h = unsafe { &*h };
        let len = match next {
            // Fragment header: a non-first fragment has no ports.
            44 => {
                if u16::from_be_bytes([h[2], h[3]]) >> 3 != 0 {
                    return Parsed::OutOfScope;
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
        return tcp_in_scope(ctx, cfg, l4, Parsed::V6(src));
    }
    Parsed::Unparseable
}

/// Current `CLOCK_BOOTTIME` second, the clock entries expire on.
#[inline(always)]
fn now_secs() -> u32 {
    // SAFETY: a helper without arguments.
    (unsafe { bpf_ktime_get_boot_ns() } / 1_000_000_000) as u32
}

/// A matching entry, live or expired.
enum Hit {
    None,
    Expired,
    Live(*mut Entry),
}

#[inline(always)]
fn classify(entry: Option<*mut Entry>, now: &mut u32) -> Hit {
    let Some(e) = entry else {
        return Hit::None;
    };
    // SAFETY: a map value pointer from the kernel, valid for this run.
    let expires = unsafe { (*e).expires };
    if expires != 0 {
        if *now == 0 {
            *now = now_secs();
        }
        if *now >= expires {
            return Hit::Expired;
        }
    }
    Hit::Live(e)
}

/// A trie value as a mutable pointer, for the hit counter. The value lives
/// in kernel map memory, not in anything Rust owns; the program writes only
/// the `hits` field, which nothing in the program reads back.
#[inline(always)]
fn trie_ptr(e: &Entry) -> *mut Entry {
    core::ptr::from_ref(e).cast_mut()
}

#[inline(always)]
fn judge_v4(ctx: &XdpContext, flags: u32, src: [u8; 4]) -> (u32, u32) {
    if flags & FLAG_PREFILTER_V4 != 0 && !maybe_blocked(&prefilter_v4, prefilter::v4_index(src)) {
        return (XDP_PASS, stat::PASS_NO_MATCH);
    }
    let mut now = 0;
    let mut hit = Hit::None;
    if flags & FLAG_HAS_V4_HOSTS != 0 {
        hit = classify(block_v4.get_ptr_mut(src), &mut now);
    }
    if !matches!(hit, Hit::Live(_)) && flags & FLAG_HAS_V4_CIDRS != 0 {
        let more = classify(
            block_v4_cidr.get(&Key::new(32, src)).map(trie_ptr),
            &mut now,
        );
        if !matches!(more, Hit::None) {
            hit = more;
        }
    }
    let entry = match hit {
        Hit::None => return (XDP_PASS, stat::PASS_NO_MATCH),
        Hit::Expired => return (XDP_PASS, stat::PASS_EXPIRED),
        Hit::Live(e) => e,
    };
    if flags & FLAG_HAS_V4_ALLOW != 0 {
        if let Some(a) = allow_v4.get(&Key::new(32, src)) {
            bump_hits(trie_ptr(a));
            return (XDP_PASS, stat::PASS_ALLOWED);
        }
    }
    let reason = bump_hits(entry);
    debug!(ctx, "drop {:i} reason {}", src, reason);
    (XDP_DROP, stat::DROP_BASE + reason)
}

#[inline(always)]
fn judge_v6(ctx: &XdpContext, cfg: &Config, src: [u8; 16]) -> (u32, u32) {
    let flags = cfg.flags;
    if flags & FLAG_PREFILTER_V6 != 0 && !maybe_blocked(&prefilter_v6, prefilter::v6_index(src)) {
        return (XDP_PASS, stat::PASS_NO_MATCH);
    }
    let mut now = 0;
    let mut hit = Hit::None;
    if flags & FLAG_HAS_V6_HOSTS != 0 {
        let key = mask_v6(src, cfg.ipv6_prefix);
        hit = classify(block_v6.get_ptr_mut(key), &mut now);
    }
    if !matches!(hit, Hit::Live(_)) && flags & FLAG_HAS_V6_CIDRS != 0 {
        let more = classify(
            block_v6_cidr.get(&Key::new(128, src)).map(trie_ptr),
            &mut now,
        );
        if !matches!(more, Hit::None) {
            hit = more;
        }
    }
    let entry = match hit {
        Hit::None => return (XDP_PASS, stat::PASS_NO_MATCH),
        Hit::Expired => return (XDP_PASS, stat::PASS_EXPIRED),
        Hit::Live(e) => e,
    };
    if flags & FLAG_HAS_V6_ALLOW != 0 {
        if let Some(a) = allow_v6.get(&Key::new(128, src)) {
            bump_hits(trie_ptr(a));
            return (XDP_PASS, stat::PASS_ALLOWED);
        }
    }
    let reason = bump_hits(entry);
    debug!(ctx, "drop {:i} reason {}", src, reason);
    (XDP_DROP, stat::DROP_BASE + reason)
}

/// Whether the prefilter bit `index` is set.
#[inline(always)]
fn maybe_blocked(bits: &Array<u64, { prefilter::WORDS }>, index: u32) -> bool {
    match bits.get(index >> 6) {
        Some(word) => *word & (1u64 << (index & 63)) != 0,
        // Unreachable for an index below BITS; fail towards the full lookup.
        None => true,
    }
}

/// Counts a hit on `e` and returns its reason, clamped to a counter slot.
#[inline(always)]
fn bump_hits(e: *mut Entry) -> u32 {
    // SAFETY: a map value pointer from the kernel, valid for this run. The
    // increment is not atomic on purpose (see `Entry::hits`).
    unsafe {
        (*e).hits = (*e).hits.wrapping_add(1);
        let reason = (*e).reason;
        if reason < REASONS {
            reason
        } else {
            0
        }
    }
}

/// `src` with every bit past `prefix` cleared: the key of `block_v6`.
#[inline(always)]
fn mask_v6(src: [u8; 16], prefix: u32) -> [u8; 16] {
    let mut hi = u64::from_be_bytes([
        src[0], src[1], src[2], src[3], src[4], src[5], src[6], src[7],
    ]);
    let mut lo = u64::from_be_bytes([
        src[8], src[9], src[10], src[11], src[12], src[13], src[14], src[15],
    ]);
    if prefix == 0 {
        hi = 0;
        lo = 0;
    } else if prefix < 64 {
        hi &= !0u64 << (64 - prefix);
        lo = 0;
    } else if prefix == 64 {
        lo = 0;
    } else if prefix < 128 {
        lo &= !0u64 << (128 - prefix);
    }
    let (h, l) = (hi.to_be_bytes(), lo.to_be_bytes());
    [
        h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], l[0], l[1], l[2], l[3], l[4], l[5], l[6],
        l[7],
    ]
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
