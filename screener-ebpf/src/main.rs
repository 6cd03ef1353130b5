//! The XDP gate: drops the connection attempts of blocked sources before
//! the network stack sees them.
//!
//! Contract:
//! - It never returns `XDP_ABORTED`. Whatever it cannot parse (truncated
//!   frames, unknown IP versions, more than two VLAN tags) passes and is
//!   counted as unparseable. One exception: an IPv6 packet with more
//!   extension headers than the six it follows is judged on its source,
//!   since Linux follows them and they could hide a SYN.
//! - A packet is in scope when it is a TCP segment to a port in
//!   `xdp.ports`, or, when the scope is "all", any IP packet.
//! - A packet in scope is judged on its source only when it could open a
//!   connection (see OPENERS). It is dropped when a live block entry
//!   covers the source (exact IPv4 host, IPv6 host prefix, or any CIDR)
//!   and no allow entry does.
//!
//! OPENERS. What the gate keeps out is new connections: a TCP segment with
//! SYN set and ACK clear. Every other TCP segment (ACK set: the handshake's
//! last step, data, FIN, RST; or neither SYN nor ACK) passes whatever its
//! source, so a connection that was open when its source got blocked runs
//! to its end: the screener sees a blocked bot hang up (its slot is freed
//! at once instead of at the command time limit), the reply its action
//! promises (550 at RCPT, 521) reaches it, and a client already handed to
//! the MTA that falls inside a newly blocked prefix finishes its mail. Its
//! next SYN is dropped. With the "all" scope, everything that is not a TCP
//! segment (UDP, ICMP, ESP, non-first fragments) is judged on its source as
//! before: it cannot be shown to belong to a connection. With a port list,
//! only TCP is in scope, as before.
//!
//! THE COST OF AN ACK FLOOD. A blocked source may now send segments with
//! ACK set and they reach the stack, where they meet what an ACK from any
//! other address meets: no socket matches, so the listener (or the closed
//! port) answers with one RST, or, while SYN cookies are in use, the ACK is
//! checked as a cookie (one hash) and then answered the same way. Nothing
//! reaches the daemon: an ACK cannot create a connection, a session or a
//! screening slot, which are what a blocked bot would cost. Dropping its
//! ACKs would not help against floods either: a stateless flood is free to
//! forge any source, so a list of the sources that misbehaved in SMTP does
//! not stop it; that is the job of SYN cookies, `rp_filter`, conntrack
//! (`ct state invalid drop`) or an upstream scrubber. What the block list
//! buys, keeping a known bot's connection attempts (and its retries every
//! few seconds) away from the listener and the daemon, is unchanged.
//!
//! FRAGMENTS. A non-first fragment carries no TCP header, so it has no port
//! and no flags: with a port scope it passes as out of scope. That opens
//! nothing: the first fragment, which carries the header, is judged like
//! any segment, and the datagram cannot be reassembled without it. An
//! IPv4 first fragment too short to carry the flags is judged on its ports
//! if it has them, else on its source, since Linux reassembles it all the
//! same. (Linux drops an IPv6 first fragment without the whole TCP header,
//! RFC 7112.) With the "all" scope non-first fragments are judged on their
//! source.
//!
//! COST. The miss path is what every good packet pays: one array lookup for
//! the settings and one bit in the prefilter array (both inlined by the
//! verifier); only when that bit is set do the hash and trie lookups run,
//! and only for maps that hold entries (the daemon keeps the `FLAG_HAS_*`
//! and `FLAG_PREFILTER_*` bits current). A segment of an open connection,
//! the bulk of a mail server's traffic, skips even the prefilter: its flags
//! sit in the same bounds-checked read as its ports. The allow tries are
//! consulted only after a block entry matched, so allowing costs nothing on
//! the miss path. Exactly one per-CPU counter is bumped per packet.
#![no_std]
#![no_main]
#![expect(
    non_upper_case_globals,
    reason = "map names are what bpftool and the pin directory show"
)]

mod parse;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray},
    helpers::bpf_ktime_get_boot_ns,
    macros::{btf_map, xdp},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use parse::{parse, Parsed};
use screener_common::{
    prefilter, stat, Config, Entry, FLAG_HAS_V4_ALLOW, FLAG_HAS_V4_CIDRS, FLAG_HAS_V4_HOSTS,
    FLAG_HAS_V6_ALLOW, FLAG_HAS_V6_CIDRS, FLAG_HAS_V6_HOSTS, FLAG_PREFILTER_V4, FLAG_PREFILTER_V6,
    FLAG_READY, REASONS,
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
/// One bit per hashed IPv6 /48 that some block entry covers.
#[btf_map]
static prefilter_v6: Array<u64, { prefilter::WORDS }> = Array::new();

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
        Parsed::NotOpening => (XDP_PASS, stat::PASS_NOT_OPENING),
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
    let key = Key::new(32, src);
    match decide(
        || when(flags, FLAG_HAS_V4_HOSTS, || block_v4.get_ptr_mut(src)),
        || {
            when(flags, FLAG_HAS_V4_CIDRS, || {
                block_v4_cidr.get(&key).map(trie_ptr)
            })
        },
        || {
            when(flags, FLAG_HAS_V4_ALLOW, || {
                allow_v4.get(&key).map(trie_ptr)
            })
        },
    ) {
        Ok(reason) => {
            debug!(ctx, "drop {:i} reason {}", src, reason);
            (XDP_DROP, stat::DROP_BASE + reason)
        }
        Err(counter) => (XDP_PASS, counter),
    }
}

#[inline(always)]
fn judge_v6(ctx: &XdpContext, cfg: &Config, src: *const [u8; 16]) -> (u32, u32) {
    let flags = cfg.flags;
    // SAFETY: `src` points into the packet, bounds-checked by the parser.
    let top = unsafe {
        [
            (*src)[0],
            (*src)[1],
            (*src)[2],
            (*src)[3],
            (*src)[4],
            (*src)[5],
        ]
    };
    if flags & FLAG_PREFILTER_V6 != 0 && !maybe_blocked(&prefilter_v6, prefilter::v6_index_top(top))
    {
        return (XDP_PASS, stat::PASS_NO_MATCH);
    }
    // SAFETY: as above.
    let src = unsafe { *src };
    let key = Key::new(128, src);
    match decide(
        || {
            when(flags, FLAG_HAS_V6_HOSTS, || {
                block_v6.get_ptr_mut(mask_v6(src, cfg.ipv6_prefix))
            })
        },
        || {
            when(flags, FLAG_HAS_V6_CIDRS, || {
                block_v6_cidr.get(&key).map(trie_ptr)
            })
        },
        || {
            when(flags, FLAG_HAS_V6_ALLOW, || {
                allow_v6.get(&key).map(trie_ptr)
            })
        },
    ) {
        Ok(reason) => {
            debug!(ctx, "drop {:i} reason {}", src, reason);
            (XDP_DROP, stat::DROP_BASE + reason)
        }
        Err(counter) => (XDP_PASS, counter),
    }
}

/// `lookup()` when the map behind it holds entries (`flag` set).
#[inline(always)]
fn when(flags: u32, flag: u32, lookup: impl FnOnce() -> Option<*mut Entry>) -> Option<*mut Entry> {
    if flags & flag != 0 {
        lookup()
    } else {
        None
    }
}

/// The verdict of one family's maps: the host entry, else the CIDR entry
/// (an expired host entry must not shadow a live CIDR), then allow over
/// block. `Ok(reason)` drops; `Err(counter)` passes.
#[inline(always)]
fn decide(
    host: impl FnOnce() -> Option<*mut Entry>,
    cidr: impl FnOnce() -> Option<*mut Entry>,
    allow: impl FnOnce() -> Option<*mut Entry>,
) -> Result<u32, u32> {
    let mut now = 0;
    let mut hit = classify(host(), &mut now);
    if !matches!(hit, Hit::Live(_)) {
        let more = classify(cidr(), &mut now);
        if !matches!(more, Hit::None) {
            hit = more;
        }
    }
    let entry = match hit {
        Hit::None => return Err(stat::PASS_NO_MATCH),
        Hit::Expired => return Err(stat::PASS_EXPIRED),
        Hit::Live(e) => e,
    };
    if let Some(a) = allow() {
        bump_hits(a);
        return Err(stat::PASS_ALLOWED);
    }
    Ok(bump_hits(entry))
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
