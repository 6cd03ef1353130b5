//! The design the screener's program is measured against: every blocked
//! host and prefix in one LPM trie per family, looked up for every packet
//! in scope.
//!
//! It does the same work around the lookup as the real program (settings
//! lookup, the same parser, port bitmap, expiry, hit count, one per-CPU
//! counter) so the benchmark isolates the cost of the lookup structure.
#![no_std]
#![no_main]
#![expect(
    non_upper_case_globals,
    reason = "map names are what bpftool and the pin directory show"
)]

#[path = "../parse.rs"]
mod parse;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    btf_maps::{Array, LpmTrie, PerCpuArray},
    helpers::bpf_ktime_get_boot_ns,
    macros::{btf_map, xdp},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use parse::{parse, Parsed};
use screener_common::{stat, Config, Entry, FLAG_READY, REASONS};

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
    let entry = match parse(ctx, cfg) {
        Parsed::V4(a) => naive_v4.get(&Key::new(32, a)),
        // SAFETY: the parser bounds-checked the address in the packet.
        Parsed::V6(a) => naive_v6.get(&Key::new(128, unsafe { *a })),
        Parsed::NotIp => return (XDP_PASS, stat::PASS_NOT_IP),
        Parsed::Unparseable => return (XDP_PASS, stat::PASS_UNPARSEABLE),
        Parsed::OutOfScope => return (XDP_PASS, stat::PASS_OUT_OF_SCOPE),
        Parsed::NotOpening => return (XDP_PASS, stat::PASS_NOT_OPENING),
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
