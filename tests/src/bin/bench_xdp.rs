//! Per-packet cost of the XDP program, through `BPF_PROG_TEST_RUN` with a
//! large repeat count, against two references measured in the same run:
//! the floor (a program that only returns `XDP_PASS`) and the one-trie
//! design (every host and prefix in one LPM trie per family).
//!
//! `cargo run --release -p integration-tests --bin bench_xdp [-- --rounds N
//! --repeat N --quick]`. Needs root. `--quick` skips the 1M-host cases.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::{bail, ensure, Context as _};
use aya::EbpfLoader;
use integration_tests::{
    config, entry,
    packet::{segment, syn, tcp},
    Gate, Ports, SMTP_PORTS, XDP_DROP, XDP_PASS,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use screener::{
    ebpf_objects::{FLOOR, NAIVE, SCREENER},
    xdp::prefilter::bits_of,
};
use screener_common::{
    map_names as m, prefilter, stat, Config, Reason, FLAG_HAS_V4_CIDRS, FLAG_HAS_V4_HOSTS,
    FLAG_HAS_V6_CIDRS, FLAG_HAS_V6_HOSTS, FLAG_PREFILTER_V4, FLAG_PREFILTER_V6,
};

/// `AYA_LOG_LEVEL` patched to 0: no log record is even formatted.
static LOG_OFF: u8 = 0;

const HOST_REASON: Reason = Reason::Pregreet;
const PREFIX_REASON: Reason = Reason::Escalation;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// A bijection on u32: spreads consecutive indexes over the address space
/// so hash buckets and trie branches look like real traffic's.
fn scramble32(i: u32) -> u32 {
    i.wrapping_mul(0x9E37_79B1)
}

/// A bijection on 24 bits.
fn scramble24(i: u32) -> u32 {
    i.wrapping_mul(0x9E_3779) & 0xFF_FFFF
}

fn host4(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(scramble32(i))
}

/// A /24.
fn prefix4(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(scramble24(i) << 8)
}

// Map contents only: nothing is sent from these addresses. They spread
// over many /32s as real blocked IPv6 sources do; the probes that miss come
// from 2001:db8::/32.
const HOSTS6: u128 = 0x2400 << 112;
const PREFIXES6: u128 = 0x2600 << 112;

/// A /64, the key of one blocked IPv6 host.
fn host6(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(HOSTS6 | (u128::from(scramble32(i)) << 80))
}

/// A /56.
fn prefix6(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(PREFIXES6 | (u128::from(scramble24(i)) << 80))
}

const V4_PREFIX: u32 = 24;
const V6_PREFIX: u32 = 56;

/// Blocked hosts and prefixes of one family.
#[derive(Clone, Copy)]
struct Setup {
    family: Family,
    hosts: u32,
    prefixes: u32,
}

impl Setup {
    fn label(self) -> String {
        format!(
            "{} hosts / {} prefixes",
            count(self.hosts),
            count(self.prefixes)
        )
    }

    /// The probes: (case, frame, expected action, expected counter).
    fn probes(self) -> Vec<(&'static str, Vec<u8>, u32, u32)> {
        let mut out = Vec::new();
        for (case, src, action, counter) in self.sources() {
            out.push((case, syn(src, 25).build().bytes, action, counter));
        }
        // A segment of an open connection (ACK set) is passed on its
        // flags, blocked source or not, before any lookup: the bulk of a
        // mail server's packets.
        for (case, src, _, _) in self.sources() {
            let case = match case {
                "miss" => "ack",
                "exact hit" => "ack, blocked host",
                _ => continue,
            };
            let frame = segment(src, 25, tcp::ACK | tcp::PSH)
                .payload(100)
                .build()
                .bytes;
            out.push((case, frame, XDP_PASS, stat::PASS_NOT_OPENING));
        }
        out
    }

    /// The probe sources: (case, source, expected action for a SYN,
    /// expected counter).
    fn sources(self) -> Vec<(&'static str, IpAddr, u32, u32)> {
        let mut out = Vec::new();
        let (miss, exact, prefix) = match self.family {
            Family::V4 => (
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                IpAddr::V4(host4(self.hosts / 2)),
                IpAddr::V4(Ipv4Addr::from(u32::from(prefix4(self.prefixes / 2)) | 0x42)),
            ),
            Family::V6 => (
                IpAddr::V6("2001:db8:ffff:ffff::1".parse().unwrap()),
                IpAddr::V6(Ipv6Addr::from(u128::from(host6(self.hosts / 2)) | 0x1234)),
                IpAddr::V6(Ipv6Addr::from(
                    u128::from(prefix6(self.prefixes / 2)) | (0x42 << 64) | 1,
                )),
            ),
        };
        out.push(("miss", miss, XDP_PASS, stat::PASS_NO_MATCH));
        if self.hosts > 0 {
            out.push((
                "exact hit",
                exact,
                XDP_DROP,
                stat::DROP_BASE + HOST_REASON as u32,
            ));
        }
        if self.prefixes > 0 {
            out.push((
                "prefix hit",
                prefix,
                XDP_DROP,
                stat::DROP_BASE + PREFIX_REASON as u32,
            ));
        }
        out
    }
}

fn count(n: u32) -> String {
    match n {
        0 => "0".into(),
        n if n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

fn settings(flags: u32) -> Config {
    config(flags, 64, Ports::List(&SMTP_PORTS))
}

/// The screener's program holding `s`'s entries.
fn load_ours(s: Setup, log: bool) -> anyhow::Result<Gate> {
    let mut loader = EbpfLoader::new();
    if !log {
        loader.override_global("AYA_LOG_LEVEL", &LOG_OFF, true);
    }
    // The defaults (2^20 hosts, 2^17 prefixes) hold every setup; raise
    // them only if a setup outgrows them.
    let (hosts_map, cidr_map) = match s.family {
        Family::V4 => (m::BLOCK_V4, m::BLOCK_V4_CIDR),
        Family::V6 => (m::BLOCK_V6, m::BLOCK_V6_CIDR),
    };
    if s.hosts > 1 << 20 {
        loader.map_max_entries(hosts_map, s.hosts);
    }
    if s.prefixes > 1 << 17 {
        loader.map_max_entries(cidr_map, s.prefixes);
    }
    let mut g = Gate::load_object(SCREENER, "screener", &mut loader)?;
    let e_host = entry(HOST_REASON as u32, 0);
    let e_prefix = entry(PREFIX_REASON as u32, 0);
    let mut flags = 0;
    match s.family {
        Family::V4 => {
            for i in 0..s.hosts {
                g.put_hash(m::BLOCK_V4, host4(i).octets(), &e_host)?;
            }
            for i in 0..s.prefixes {
                g.put_trie(m::BLOCK_V4_CIDR, V4_PREFIX, prefix4(i).octets(), &e_prefix)?;
            }
            if s.hosts > 0 {
                flags |= FLAG_HAS_V4_HOSTS;
            }
            if s.prefixes > 0 {
                flags |= FLAG_HAS_V4_CIDRS;
            }
        }
        Family::V6 => {
            for i in 0..s.hosts {
                g.put_hash(m::BLOCK_V6, host6(i).octets(), &e_host)?;
            }
            for i in 0..s.prefixes {
                g.put_trie(m::BLOCK_V6_CIDR, V6_PREFIX, prefix6(i).octets(), &e_prefix)?;
            }
            if s.hosts > 0 {
                flags |= FLAG_HAS_V6_HOSTS;
            }
            if s.prefixes > 0 {
                flags |= FLAG_HAS_V6_CIDRS;
            }
        }
    }
    // The prefilter bits, as the daemon keeps them.
    let (pre_map, pre_flag) = match s.family {
        Family::V4 => (m::PREFILTER_V4, FLAG_PREFILTER_V4),
        Family::V6 => (m::PREFILTER_V6, FLAG_PREFILTER_V6),
    };
    let mut words = vec![0u64; prefilter::WORDS];
    let nets = (0..s.hosts).map(|i| match s.family {
        Family::V4 => IpNet::from(IpAddr::V4(host4(i))),
        Family::V6 => IpNet::V6(Ipv6Net::new(host6(i), 64).expect("valid")),
    });
    let cidrs = (0..s.prefixes).map(|i| match s.family {
        Family::V4 => IpNet::V4(Ipv4Net::new(prefix4(i), 24).expect("valid")),
        Family::V6 => IpNet::V6(Ipv6Net::new(prefix6(i), 56).expect("valid")),
    });
    for net in nets.chain(cidrs) {
        for b in bits_of(&net).expect("bench entries are narrow enough") {
            words[(b >> 6) as usize] |= 1u64 << (b & 63);
        }
    }
    g.set_words(pre_map, &words)?;
    g.set_config(m::CONFIG, &settings(flags | pre_flag))?;
    Ok(g)
}

/// The one-trie design holding the same entries (IPv6 hosts as /64s).
fn load_naive(s: Setup) -> anyhow::Result<Gate> {
    let mut loader = EbpfLoader::new();
    let size = (s.hosts + s.prefixes).max(1);
    let map = match s.family {
        Family::V4 => "naive_v4",
        Family::V6 => "naive_v6",
    };
    loader.map_max_entries(map, size);
    let mut g = Gate::load_object(NAIVE, "naive", &mut loader)?;
    let e_host = entry(HOST_REASON as u32, 0);
    let e_prefix = entry(PREFIX_REASON as u32, 0);
    match s.family {
        Family::V4 => {
            for i in 0..s.hosts {
                g.put_trie(map, 32, host4(i).octets(), &e_host)?;
            }
            for i in 0..s.prefixes {
                g.put_trie(map, V4_PREFIX, prefix4(i).octets(), &e_prefix)?;
            }
        }
        Family::V6 => {
            for i in 0..s.hosts {
                g.put_trie(map, 64, host6(i).octets(), &e_host)?;
            }
            for i in 0..s.prefixes {
                g.put_trie(map, V6_PREFIX, prefix6(i).octets(), &e_prefix)?;
            }
        }
    }
    g.set_config("naive_config", &settings(0))?;
    Ok(g)
}

/// Runs `frame` once and checks the action and the one counter it bumps.
fn verify(g: &Gate, stats: &str, frame: &[u8], action: u32, counter: u32) -> anyhow::Result<()> {
    let before = g.stats(stats)?;
    let got = g.run(frame)?;
    let after = g.stats(stats)?;
    let moved: Vec<usize> = (0..before.len())
        .filter(|&i| after[i] != before[i])
        .collect();
    ensure!(
        got == action && moved == [counter as usize],
        "{stats}: action {got} counters {moved:?}, want action {action} counter {counter}"
    );
    Ok(())
}

/// Exact hits from many different blocked hosts, one run each: the probe
/// above repeats one packet, so every lookup finds its path in the cache;
/// real floods come from many sources. Each run pays the syscall between
/// runs too, which evicts some of the maps' lines, as other traffic would.
fn many_sources(
    args: &Args,
    s: Setup,
    floor: &Gate,
    ours: &Gate,
    naive: &Gate,
) -> anyhow::Result<Result> {
    const SOURCES: u32 = 4096;
    let frames: Vec<Vec<u8>> = (0..SOURCES)
        .map(|i| {
            let k = i * (s.hosts / SOURCES);
            let src = match s.family {
                Family::V4 => IpAddr::V4(host4(k)),
                Family::V6 => IpAddr::V6(Ipv6Addr::from(u128::from(host6(k)) | 0x1234)),
            };
            syn(src, 25).build().bytes
        })
        .collect();
    let mean = |g: &Gate| -> anyhow::Result<f64> {
        let mut total = 0.0;
        for f in &frames {
            total += time(g, f, 1)?;
        }
        Ok(total / f64::from(SOURCES))
    };
    let (mut f, mut o, mut n) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        f.push(mean(floor)?);
        o.push(mean(ours)?);
        n.push(mean(naive)?);
    }
    Ok(Result {
        family: s.family,
        setup: s.label(),
        case: "hit, 4096 sources",
        floor: spread(f),
        ours: spread(o),
        naive: spread(n),
    })
}

/// The kernel's mean nanoseconds per run over `repeat` runs. The kernel
/// stops its clock while the test yields the CPU, so, unlike a wall clock,
/// this holds on a machine shared with other work; it is whole nanoseconds.
fn time(g: &Gate, frame: &[u8], repeat: u32) -> anyhow::Result<f64> {
    let (_, mean) = g.run_timed(frame, repeat)?;
    let ns = u32::try_from(mean.as_nanos()).context("a mean of over 4 s per run")?;
    Ok(f64::from(ns))
}

/// Median, min and max.
#[derive(Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    Spread {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:4.0} [{:3.0}-{:3.0}]", self.median, self.min, self.max)
    }
}

struct Result {
    family: Family,
    setup: String,
    case: &'static str,
    floor: Spread,
    ours: Spread,
    naive: Spread,
}

struct Args {
    rounds: usize,
    repeat: u32,
    quick: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        rounds: 7,
        repeat: 1_000_000,
        quick: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--rounds" => a.rounds = it.next().context("--rounds N")?.parse()?,
            "--repeat" => a.repeat = it.next().context("--repeat N")?.parse()?,
            "--quick" => a.quick = true,
            other => bail!("unknown argument {other:?} (--rounds N, --repeat N, --quick)"),
        }
    }
    ensure!(a.rounds >= 5, "at least 5 rounds");
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let floor = Gate::load_object(FLOOR, "floor", &mut EbpfLoader::new())?;
    let mut setups = Vec::new();
    for family in [Family::V4, Family::V6] {
        for (hosts, prefixes) in [
            (0, 0),
            (0, 10_000),
            (10_000, 0),
            (10_000, 10_000),
            (1_000_000, 0),
            (1_000_000, 10_000),
            (1_000_000, 100_000),
        ] {
            if args.quick && hosts >= 1_000_000 {
                continue;
            }
            setups.push(Setup {
                family,
                hosts,
                prefixes,
            });
        }
    }
    println!(
        "bench_xdp: {} rounds of {} runs per case; kernel ns per packet, median [min-max]",
        args.rounds, args.repeat
    );
    let mut results = Vec::new();
    let mut memory = Vec::new();
    for s in setups {
        let started = Instant::now();
        let ours = load_ours(s, false)?;
        let naive = load_naive(s)?;
        eprintln!(
            "{} {}: filled both designs in {:.1}s",
            s.family.name(),
            s.label(),
            started.elapsed().as_secs_f64()
        );
        if s.hosts >= 1_000_000 {
            let (hosts_map, cidr_map, naive_map) = match s.family {
                Family::V4 => (m::BLOCK_V4, m::BLOCK_V4_CIDR, "naive_v4"),
                Family::V6 => (m::BLOCK_V6, m::BLOCK_V6_CIDR, "naive_v6"),
            };
            memory.push(format!(
                "{} {}: ours {hosts_map} {} + {cidr_map} {} = {}; one trie {naive_map} {}",
                s.family.name(),
                s.label(),
                mib(ours.map_memlock(hosts_map)?),
                mib(ours.map_memlock(cidr_map)?),
                mib(ours.map_memlock(hosts_map)? + ours.map_memlock(cidr_map)?),
                mib(naive.map_memlock(naive_map)?),
            ));
        }
        for (case, frame, action, counter) in s.probes() {
            verify(&ours, m::STATS, &frame, action, counter)
                .with_context(|| format!("ours, {} {} {case}", s.family.name(), s.label()))?;
            verify(&naive, "naive_stats", &frame, action, counter)
                .with_context(|| format!("one trie, {} {} {case}", s.family.name(), s.label()))?;
            let (mut floor_ns, mut ours_ns, mut naive_ns) = (Vec::new(), Vec::new(), Vec::new());
            // Interleaved so drift on a shared machine hits all three alike.
            for _ in 0..args.rounds {
                floor_ns.push(time(&floor, &frame, args.repeat)?);
                ours_ns.push(time(&ours, &frame, args.repeat)?);
                naive_ns.push(time(&naive, &frame, args.repeat)?);
            }
            let r = Result {
                family: s.family,
                setup: s.label(),
                case,
                floor: spread(floor_ns),
                ours: spread(ours_ns),
                naive: spread(naive_ns),
            };
            print_row(&r);
            results.push(r);
        }
        if s.hosts >= 1_000_000 {
            let r = many_sources(&args, s, &floor, &ours, &naive)?;
            print_row(&r);
            results.push(r);
        }
    }
    log_cost(&args)?;
    println!();
    println!("Kernel memory of the maps (memlock from /proc/self/fdinfo):");
    for line in memory {
        println!("  {line}");
    }
    summary(&results);
    Ok(())
}

fn mib(bytes: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "a display value")]
    let m = bytes as f64 / (1024.0 * 1024.0);
    format!("{m:.1} MiB")
}

fn print_row(r: &Result) {
    println!(
        "{:4} {:22} {:10} floor {} ours {} one-trie {}  ours/floor {:4.2}x  one-trie/ours {:4.2}x",
        r.family.name(),
        r.setup,
        r.case,
        r.floor,
        r.ours,
        r.naive,
        r.ours.median / r.floor.median,
        r.naive.median / r.ours.median,
    );
}

/// What the program's drop-path log line costs when nobody patched
/// `AYA_LOG_LEVEL` (its default enables every level).
fn log_cost(args: &Args) -> anyhow::Result<()> {
    let s = Setup {
        family: Family::V4,
        hosts: 10_000,
        prefixes: 0,
    };
    let quiet = load_ours(s, false)?;
    let loud = load_ours(s, true)?;
    let frame = syn(IpAddr::V4(host4(s.hosts / 2)), 25).build().bytes;
    let (mut q, mut l) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        q.push(time(&quiet, &frame, args.repeat)?);
        l.push(time(&loud, &frame, args.repeat)?);
    }
    let (q, l) = (spread(q), spread(l));
    println!();
    println!(
        "Drop path, IPv4 exact hit, 10k hosts: AYA_LOG_LEVEL=0 {q}, default level {l} ({:.2}x)",
        l.median / q.median
    );
    Ok(())
}

fn summary(results: &[Result]) {
    println!();
    println!("Targets:");
    for r in results.iter().filter(|r| r.case == "miss") {
        let ratio = r.ours.median / r.floor.median;
        println!(
            "  miss within 1.5x of floor: {} {}: {:.2}x ({:.1} vs {:.1} ns, +{:.1} ns) {}",
            r.family.name(),
            r.setup,
            ratio,
            r.ours.median,
            r.floor.median,
            r.ours.median - r.floor.median,
            if ratio <= 1.5 { "MET" } else { "MISSED" }
        );
    }
    for r in results
        .iter()
        .filter(|r| r.case.contains("hit") && r.setup.starts_with("1M"))
    {
        let ratio = r.naive.median / r.ours.median;
        println!(
            "  hit at 1M hosts >= 5x faster than one trie: {} {} {}: {:.2}x {}",
            r.family.name(),
            r.setup,
            r.case,
            ratio,
            if ratio >= 5.0 { "MET" } else { "MISSED" }
        );
    }
}
