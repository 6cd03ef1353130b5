//! The design the screener's program is measured against: every blocked
//! host and prefix in one LPM trie per family, looked up for every packet
//! in scope.
//!
//! It does the same work around the lookup as the real program (settings
//! lookup, Ethernet/VLAN/IP/TCP parsing, port bitmap, expiry, hit count,
//! one per-CPU counter) so the benchmark isolates the cost of the lookup
//! structure. IPv6 extension headers are not followed: the benchmark's
//! packets have none.
#![no_std]
#![no_main]
#![expect(
    non_upper_case_globals,
    reason = "map names are what bpftool and the pin directory show"
)]

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    btf_maps::{Array, LpmTrie, PerCpuArray},
    helpers::bpf_ktime_get_boot_ns,
    macros::{btf_map, xdp},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use screener_common::{stat, Config, Entry, FLAG_ALL_PORTS, FLAG_READY, REASONS};

/// Sized at load time by the benchmark.
const ENTRIES: usize = 1 << 10;

#[btf_map]
static naive_config: Array<Config, 1> = Array::new();
#[btf_map]
static naive_stats: PerCpuArray<u64, { stat::LEN as usize }> = PerCpuArray::new();
#[btf_map]
static naive_v4: LpmTrie<[u8; 4], Entry, ENTRIES> = LpmTrie::new();
#[btf_map]
static naive_v6: LpmTrie<[u8; 16], Entry, ENTRIES> = LpmTrie::new();

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;

enum Src {
    V4([u8; 4]),
    V6([u8; 16]),
}

#[xdp]
pub fn naive(ctx: XdpContext) -> u32 {
    let (action, counter) = judge(&ctx);
    if let Some(c) = naive_stats.get_ptr_mut(counter) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently.
        unsafe { *c += 1 };
    }
    action
}

#[inline(always)]
fn judge(ctx: &XdpContext) -> (u32, u32) {
    let Some(cfg) = naive_config.get(0) else {
        return (XDP_PASS, stat::PASS_NOT_READY);
    };
    if cfg.flags & FLAG_READY == 0 {
        return (XDP_PASS, stat::PASS_NOT_READY);
    }
    let src = match parse(ctx, cfg) {
        Ok(src) => src,
        Err(counter) => return (XDP_PASS, counter),
    };
    let entry = match src {
        Src::V4(a) => naive_v4.get(&Key::new(32, a)),
        Src::V6(a) => naive_v6.get(&Key::new(128, a)),
    };
    let Some(e) = entry else {
        return (XDP_PASS, stat::PASS_NO_MATCH);
    };
    if e.expires != 0 {
        // SAFETY: a helper without arguments.
        let now = (unsafe { bpf_ktime_get_boot_ns() } / 1_000_000_000) as u32;
        if now >= e.expires {
            return (XDP_PASS, stat::PASS_EXPIRED);
        }
    }
    let e = core::ptr::from_ref(e).cast_mut();
    // SAFETY: a map value pointer from the kernel, valid for this run.
    let reason = unsafe {
        (*e).hits = (*e).hits.wrapping_add(1);
        (*e).reason
    };
    let reason = if reason < REASONS { reason } else { 0 };
    (XDP_DROP, stat::DROP_BASE + reason)
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
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
fn u8_at(ctx: &XdpContext, offset: usize) -> Option<u8> {
    // SAFETY: ptr_at checked the byte is inside the packet.
    ptr_at::<u8>(ctx, offset).map(|p| unsafe { *p })
}

#[inline(always)]
fn parse(ctx: &XdpContext, cfg: &Config) -> Result<Src, u32> {
    let mut proto = be16_at(ctx, 12).ok_or(stat::PASS_UNPARSEABLE)?;
    let mut off = ETH_HLEN;
    for _ in 0..2 {
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            proto = be16_at(ctx, off + 2).ok_or(stat::PASS_UNPARSEABLE)?;
            off += 4;
        }
    }
    let all = cfg.flags & FLAG_ALL_PORTS != 0;
    let (src, l4, protocol) = match proto {
        ETH_P_IP => {
            let vihl = u8_at(ctx, off).ok_or(stat::PASS_UNPARSEABLE)?;
            let src = ptr_at::<[u8; 4]>(ctx, off + 12).ok_or(stat::PASS_UNPARSEABLE)?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return Err(stat::PASS_UNPARSEABLE);
            }
            // SAFETY: checked by ptr_at above.
            let src = Src::V4(unsafe { *src });
            let frag = be16_at(ctx, off + 6).ok_or(stat::PASS_UNPARSEABLE)?;
            if frag & 0x1fff != 0 && !all {
                return Err(stat::PASS_OUT_OF_SCOPE);
            }
            (src, off + ihl, u8_at(ctx, off + 9).ok_or(stat::PASS_UNPARSEABLE)?)
        }
        ETH_P_IPV6 => {
            let src = ptr_at::<[u8; 16]>(ctx, off + 8).ok_or(stat::PASS_UNPARSEABLE)?;
            let next = u8_at(ctx, off + 6).ok_or(stat::PASS_UNPARSEABLE)?;
            ptr_at::<[u8; 40]>(ctx, off).ok_or(stat::PASS_UNPARSEABLE)?;
            // SAFETY: checked by ptr_at above.
            (Src::V6(unsafe { *src }), off + 40, next)
        }
        _ => return Err(stat::PASS_NOT_IP),
    };
    if all {
        return Ok(src);
    }
    if protocol != IPPROTO_TCP {
        return Err(stat::PASS_OUT_OF_SCOPE);
    }
    // The port is read through the checked pointer: the verifier cannot
    // tie a separately derived variable-offset pointer to the check.
    let tcp = ptr_at::<[u8; 20]>(ctx, l4).ok_or(stat::PASS_UNPARSEABLE)?;
    // SAFETY: ptr_at checked the whole TCP header is inside the packet.
    let dport = unsafe { u16::from_be_bytes([(*tcp)[2], (*tcp)[3]]) };
    if cfg.port_enabled(dport) {
        Ok(src)
    } else {
        Err(stat::PASS_OUT_OF_SCOPE)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
