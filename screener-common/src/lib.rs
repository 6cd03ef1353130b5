//! Types shared by the XDP program and the daemon.
//!
//! Every type here is `#[repr(C)]` and is the exact layout of a kernel map's
//! key or value. Changing any of them changes the pinned layout: bump
//! [`LAYOUT_VERSION`] so a daemon refuses to adopt maps of the old shape.
#![no_std]

/// Version of the pinned map layout. Recorded in the `config` map; a daemon
/// finding a pinned set with another version refuses to adopt it instead of
/// reading its entries with another meaning.
pub const LAYOUT_VERSION: u32 = 2;

/// Names of the maps, as pinned under `xdp.pin_path`.
pub mod map_names {
    pub const CONFIG: &str = "config";
    pub const STATS: &str = "stats";
    pub const ALLOW_V4: &str = "allow_v4";
    pub const ALLOW_V6: &str = "allow_v6";
    pub const BLOCK_V4: &str = "block_v4";
    pub const BLOCK_V6: &str = "block_v6";
    pub const BLOCK_V4_CIDR: &str = "block_v4_cidr";
    pub const BLOCK_V6_CIDR: &str = "block_v6_cidr";
    pub const PREFILTER_V4: &str = "prefilter_v4";
    pub const PREFILTER_V6: &str = "prefilter_v6";
    /// Every BTF map, in the order `xdp status` lists them.
    pub const ALL: [&str; 10] = [
        CONFIG,
        STATS,
        ALLOW_V4,
        ALLOW_V6,
        BLOCK_V4,
        BLOCK_V6,
        BLOCK_V4_CIDR,
        BLOCK_V6_CIDR,
        PREFILTER_V4,
        PREFILTER_V6,
    ];
}

/// Why a source is blocked. Stored in every entry and used as the index of
/// the per-reason drop counter.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Added by an operator (`screener block add`).
    Manual = 0,
    Pregreet = 1,
    Dnsbl = 2,
    Pipelining = 3,
    NonSmtpCommand = 4,
    BareNewline = 5,
    /// The permanent access list's `reject`.
    Denylist = 6,
    /// A shared list brought in by `screener import`.
    Import = 7,
    /// Several hosts of one prefix were blocked, so the prefix is.
    Escalation = 8,
}

/// Number of reason slots (and of per-reason drop counters). Fixed so the
/// counter layout does not move when a reason is added.
pub const REASONS: u32 = 16;

impl Reason {
    pub const ALL: [Reason; 9] = [
        Reason::Manual,
        Reason::Pregreet,
        Reason::Dnsbl,
        Reason::Pipelining,
        Reason::NonSmtpCommand,
        Reason::BareNewline,
        Reason::Denylist,
        Reason::Import,
        Reason::Escalation,
    ];

    /// The lower-case name used in the CLI, logs and JSON.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Manual => "manual",
            Reason::Pregreet => "pregreet",
            Reason::Dnsbl => "dnsbl",
            Reason::Pipelining => "pipelining",
            Reason::NonSmtpCommand => "non_smtp_command",
            Reason::BareNewline => "bare_newline",
            Reason::Denylist => "denylist",
            Reason::Import => "import",
            Reason::Escalation => "escalation",
        }
    }

    #[must_use]
    pub const fn from_u32(v: u32) -> Option<Reason> {
        match v {
            0 => Some(Reason::Manual),
            1 => Some(Reason::Pregreet),
            2 => Some(Reason::Dnsbl),
            3 => Some(Reason::Pipelining),
            4 => Some(Reason::NonSmtpCommand),
            5 => Some(Reason::BareNewline),
            6 => Some(Reason::Denylist),
            7 => Some(Reason::Import),
            8 => Some(Reason::Escalation),
            _ => None,
        }
    }
}

/// Value of every block and allow entry.
///
/// All fields are `u32`: an LPM trie with a 4-byte IPv4 key can only hold a
/// value aligned to 4 bytes, and one value type for every map keeps the
/// userspace side simple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// A [`Reason`] as `u32` (for allow entries: 0).
    pub reason: u32,
    /// `CLOCK_BOOTTIME` second at which the entry stops matching; 0 = never.
    /// Boot time, not wall time, so a clock step cannot revive or kill entries.
    pub expires: u32,
    /// Packets this entry dropped (or, for allow entries, let through).
    /// Updated without atomics: a lost increment under contention is
    /// acceptable, a locked instruction on the drop path is not.
    pub hits: u32,
    /// Unused; keeps the value 16 bytes for future fields.
    pub flags: u32,
}

/// Indexes into the per-CPU `stats` array. Packets seen is the sum of all
/// of them, so the program bumps exactly one counter per packet.
pub mod stat {
    /// Passed: not IPv4/IPv6 (ARP, LLDP, ...).
    pub const PASS_NOT_IP: u32 = 0;
    /// Passed: truncated or malformed headers.
    pub const PASS_UNPARSEABLE: u32 = 1;
    /// Passed: not a TCP packet to a protected port.
    pub const PASS_OUT_OF_SCOPE: u32 = 2;
    /// Passed: source in no block map.
    pub const PASS_NO_MATCH: u32 = 3;
    /// Passed: blocked but an allow entry covers the source.
    pub const PASS_ALLOWED: u32 = 4;
    /// Passed: the matching block entry had expired.
    pub const PASS_EXPIRED: u32 = 5;
    /// Passed: the program has not been configured yet.
    pub const PASS_NOT_READY: u32 = 6;
    /// Passed: a TCP segment in scope that cannot open a connection (ACK
    /// set, or SYN clear), whatever its source.
    pub const PASS_NOT_OPENING: u32 = 7;
    /// First of [`super::REASONS`] drop counters, indexed by reason.
    pub const DROP_BASE: u32 = 8;
    /// Size of the stats array.
    pub const LEN: u32 = DROP_BASE + super::REASONS;

    pub const PASS_NAMES: [(u32, &str); 8] = [
        (PASS_NOT_IP, "passed_not_ip"),
        (PASS_UNPARSEABLE, "passed_unparseable"),
        (PASS_OUT_OF_SCOPE, "passed_out_of_scope"),
        (PASS_NO_MATCH, "passed_no_match"),
        (PASS_ALLOWED, "passed_allowed"),
        (PASS_EXPIRED, "passed_expired"),
        (PASS_NOT_READY, "passed_not_ready"),
        (PASS_NOT_OPENING, "passed_not_opening"),
    ];
}

/// Size of the destination-port bitmap (one bit per TCP port).
pub const PORT_WORDS: usize = 65536 / 64;

/// The program's settings, the single entry of the `config` array.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Config {
    /// [`LAYOUT_VERSION`] of the program that created the maps.
    pub layout: u32,
    /// IPv6 prefix length the `block_v6` keys are masked to.
    pub ipv6_prefix: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    pub reserved: u32,
    /// TCP destination ports in scope, one bit each (`xdp.ports`).
    pub ports: [u64; PORT_WORDS],
}

/// Every packet is in scope (`xdp.ports = ["all"]`).
pub const FLAG_ALL_PORTS: u32 = 1;
/// The program has been configured; until then it passes everything.
pub const FLAG_READY: u32 = 2;
/// Set while `block_v4` holds entries: an empty map costs no lookup.
pub const FLAG_HAS_V4_HOSTS: u32 = 1 << 4;
pub const FLAG_HAS_V6_HOSTS: u32 = 1 << 5;
pub const FLAG_HAS_V4_CIDRS: u32 = 1 << 6;
pub const FLAG_HAS_V6_CIDRS: u32 = 1 << 7;
pub const FLAG_HAS_V4_ALLOW: u32 = 1 << 8;
pub const FLAG_HAS_V6_ALLOW: u32 = 1 << 9;
/// The IPv4 prefilter is authoritative: a clear bit means no block entry
/// covers the source, and the block maps are not consulted.
pub const FLAG_PREFILTER_V4: u32 = 1 << 10;
pub const FLAG_PREFILTER_V6: u32 = 1 << 11;

/// The prefilters: one bit per IPv4 /24, one bit per hashed IPv6 /48.
///
/// Most packets come from sources no entry covers. Looking their source up
/// in a hash map and a trie costs 25–100 ns; one bit in an array map (whose
/// lookup the verifier inlines) costs a few. A set bit only means "maybe":
/// the maps decide.
pub mod prefilter {
    /// Bits per prefilter.
    pub const BITS: u32 = 1 << 24;
    /// `u64` words per prefilter array.
    pub const WORDS: usize = (BITS / 64) as usize;
    /// Shortest IPv4 CIDR the prefilter indexes (longer ones set 2^(24-len)
    /// bits); a shorter one switches the IPv4 prefilter off.
    pub const V4_MIN_PREFIX: u8 = 12;
    /// Shortest IPv6 prefix the prefilter indexes (longer ones set the
    /// bits of their 2^(48-len) /48s); a shorter one switches it off.
    pub const V6_MIN_PREFIX: u8 = 32;

    /// The IPv4 bit: the source's /24.
    #[must_use]
    #[inline(always)]
    pub const fn v4_index(addr: [u8; 4]) -> u32 {
        u32::from_be_bytes(addr) >> 8
    }

    /// The IPv6 bit: a multiplicative hash of the source's /48.
    #[must_use]
    #[inline(always)]
    pub const fn v6_index(addr: [u8; 16]) -> u32 {
        v6_index_top([addr[0], addr[1], addr[2], addr[3], addr[4], addr[5]])
    }

    /// [`v6_index`] from the address's first six bytes (its /48).
    #[must_use]
    #[inline(always)]
    pub const fn v6_index_top(top: [u8; 6]) -> u32 {
        let top = u64::from_be_bytes([0, 0, top[0], top[1], top[2], top[3], top[4], top[5]]);
        (top.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as u32
    }
}

/// The destination-port bitmap with `ports` in scope: the one place that
/// knows a port's word and bit, shared by the daemon that writes the
/// settings and the tests that craft them.
#[must_use]
pub fn port_bitmap(ports: &[u16]) -> [u64; PORT_WORDS] {
    let mut words = [0; PORT_WORDS];
    for &p in ports {
        words[usize::from(p >> 6)] |= 1u64 << (p & 63);
    }
    words
}

impl Config {
    #[must_use]
    pub const fn port_enabled(&self, port: u16) -> bool {
        self.ports[(port >> 6) as usize] & (1u64 << (port & 63)) != 0
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C) plain data without padding holes
    // that could leak uninitialised bytes (checked by their layouts above).
    unsafe impl aya::Pod for super::Entry {}
    unsafe impl aya::Pod for super::Config {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_bitmap_sets_each_port_and_only_those() {
        let cfg = Config {
            layout: LAYOUT_VERSION,
            ipv6_prefix: 64,
            flags: FLAG_READY,
            reserved: 0,
            ports: port_bitmap(&[0, 25, 63, 64, 65535]),
        };
        for p in [0, 25, 63, 64, 65535] {
            assert!(cfg.port_enabled(p), "port {p}");
        }
        for p in [1, 24, 26, 62, 65, 65534] {
            assert!(!cfg.port_enabled(p), "port {p}");
        }
        assert_eq!(port_bitmap(&[]), [0; PORT_WORDS]);
    }
}
