//! The XDP program judged on crafted frames through `BPF_PROG_TEST_RUN`.
//!
//! Every row loads entries into the real kernel maps, runs one frame and
//! checks the action, that exactly one per-CPU counter moved (the right
//! one), and that exactly the entry that decided the verdict counted a hit.
//! Needs root (loading BPF programs).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use integration_tests::{
    boottime_secs, config, entry, mask_v4, mask_v6,
    packet::{self, segment, syn, tcp, Ext, FrameBuilder, L4, TPID_8021AD, TPID_8021Q},
    Gate, Ports, SMTP_PORTS, XDP_ABORTED, XDP_DROP, XDP_PASS,
};
use screener_common::{
    map_names as m, stat, Entry, Reason, FLAG_HAS_V4_ALLOW, FLAG_HAS_V4_CIDRS, FLAG_HAS_V4_HOSTS,
    FLAG_HAS_V6_ALLOW, FLAG_HAS_V6_CIDRS, FLAG_HAS_V6_HOSTS, REASONS,
};

const BAD4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const GOOD4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);
const BAD6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 1, 0, 0, 0, 7);
const GOOD6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x600d, 0, 0, 0, 0, 9);

/// One map entry a row puts in before running its frame.
#[derive(Clone, Copy, Debug)]
enum Put {
    /// `block_v4`: exact host.
    Host4(Ipv4Addr, Entry),
    /// `block_v6`: the key as stored (already masked to the prefix).
    Host6(Ipv6Addr, Entry),
    Cidr4(Ipv4Addr, u32, Entry),
    Cidr6(Ipv6Addr, u32, Entry),
    Allow4(Ipv4Addr, u32, Entry),
    Allow6(Ipv6Addr, u32, Entry),
}

impl Put {
    /// The `FLAG_HAS_*` bit the daemon sets while such an entry exists.
    fn flag(self) -> u32 {
        match self {
            Put::Host4(..) => FLAG_HAS_V4_HOSTS,
            Put::Host6(..) => FLAG_HAS_V6_HOSTS,
            Put::Cidr4(..) => FLAG_HAS_V4_CIDRS,
            Put::Cidr6(..) => FLAG_HAS_V6_CIDRS,
            Put::Allow4(..) => FLAG_HAS_V4_ALLOW,
            Put::Allow6(..) => FLAG_HAS_V6_ALLOW,
        }
    }

    fn apply(self, g: &mut Gate) -> anyhow::Result<()> {
        match self {
            Put::Host4(a, e) => g.put_hash(m::BLOCK_V4, a.octets(), &e),
            Put::Host6(a, e) => g.put_hash(m::BLOCK_V6, a.octets(), &e),
            Put::Cidr4(a, p, e) => g.put_trie(m::BLOCK_V4_CIDR, p, a.octets(), &e),
            Put::Cidr6(a, p, e) => g.put_trie(m::BLOCK_V6_CIDR, p, a.octets(), &e),
            Put::Allow4(a, p, e) => g.put_trie(m::ALLOW_V4, p, a.octets(), &e),
            Put::Allow6(a, p, e) => g.put_trie(m::ALLOW_V6, p, a.octets(), &e),
        }
    }

    fn hits(self, g: &Gate) -> anyhow::Result<u32> {
        let e = match self {
            Put::Host4(a, _) => g.get_hash(m::BLOCK_V4, a.octets())?,
            Put::Host6(a, _) => g.get_hash(m::BLOCK_V6, a.octets())?,
            Put::Cidr4(a, p, _) => g.get_trie(m::BLOCK_V4_CIDR, p, a.octets())?,
            Put::Cidr6(a, p, _) => g.get_trie(m::BLOCK_V6_CIDR, p, a.octets())?,
            Put::Allow4(a, p, _) => g.get_trie(m::ALLOW_V4, p, a.octets())?,
            Put::Allow6(a, p, _) => g.get_trie(m::ALLOW_V6, p, a.octets())?,
        };
        Ok(e.map_or(0, |e| e.hits))
    }
}

/// The maps and settings a row runs against.
#[derive(Clone, Debug)]
struct Setup {
    /// `None`: the "all" scope.
    ports: Option<Vec<u16>>,
    ipv6_prefix: u32,
    puts: Vec<Put>,
    /// `FLAG_HAS_*` bits left out although their map has entries.
    unset: u32,
    ready: bool,
}

impl Setup {
    fn smtp(puts: Vec<Put>) -> Self {
        Setup {
            ports: Some(SMTP_PORTS.to_vec()),
            ipv6_prefix: 64,
            puts,
            unset: 0,
            ready: true,
        }
    }

    fn all(puts: Vec<Put>) -> Self {
        Setup {
            ports: None,
            ..Setup::smtp(puts)
        }
    }

    fn prefix(mut self, p: u32) -> Self {
        self.ipv6_prefix = p;
        self
    }

    fn unset(mut self, flags: u32) -> Self {
        self.unset = flags;
        self
    }

    fn not_ready(mut self) -> Self {
        self.ready = false;
        self
    }

    fn ports(mut self, ports: &[u16]) -> Self {
        self.ports = Some(ports.to_vec());
        self
    }

    /// Empties every map, then writes the settings and the entries.
    fn install(&self, g: &mut Gate) -> anyhow::Result<()> {
        g.clear_hash::<[u8; 4]>(m::BLOCK_V4)?;
        g.clear_hash::<[u8; 16]>(m::BLOCK_V6)?;
        g.clear_trie::<[u8; 4]>(m::BLOCK_V4_CIDR)?;
        g.clear_trie::<[u8; 16]>(m::BLOCK_V6_CIDR)?;
        g.clear_trie::<[u8; 4]>(m::ALLOW_V4)?;
        g.clear_trie::<[u8; 16]>(m::ALLOW_V6)?;
        let flags = self.puts.iter().fold(0, |f, p| f | p.flag()) & !self.unset;
        let ports = match &self.ports {
            Some(list) => Ports::List(list),
            None => Ports::All,
        };
        let mut cfg = config(flags, self.ipv6_prefix, ports);
        if !self.ready {
            cfg.flags = 0;
        }
        g.set_config(m::CONFIG, &cfg)?;
        for p in &self.puts {
            p.apply(g)?;
        }
        Ok(())
    }
}

/// One case: a frame, the maps it meets, and what must happen.
struct Row {
    label: String,
    frame: Vec<u8>,
    setup: Setup,
    action: u32,
    counter: u32,
    /// Index in `setup.puts` of the one entry whose `hits` must rise.
    hit: Option<usize>,
}

fn row(
    label: impl Into<String>,
    frame: impl Into<Vec<u8>>,
    setup: Setup,
    action: u32,
    counter: u32,
    hit: Option<usize>,
) -> Row {
    Row {
        label: label.into(),
        frame: frame.into(),
        setup,
        action,
        counter,
        hit,
    }
}

fn drop_reason(r: Reason) -> u32 {
    stat::DROP_BASE + r as u32
}

fn never() -> Entry {
    entry(Reason::Pregreet as u32, 0)
}

/// Runs `row` on `g`; returns a description of every way it went wrong.
fn check(g: &mut Gate, r: &Row) -> anyhow::Result<Vec<String>> {
    r.setup.install(g)?;
    let before = g.stats(m::STATS)?;
    let hits_before = r
        .setup
        .puts
        .iter()
        .map(|p| p.hits(g))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let action = g.run(&r.frame)?;
    let after = g.stats(m::STATS)?;
    let mut errs = Vec::new();
    if action == XDP_ABORTED {
        errs.push("returned XDP_ABORTED".to_string());
    }
    if action != r.action {
        errs.push(format!("action {} want {}", name(action), name(r.action)));
    }
    let moved: Vec<(usize, u64)> = before
        .iter()
        .zip(&after)
        .enumerate()
        .filter(|(_, (b, a))| a != b)
        .map(|(i, (b, a))| (i, a - b))
        .collect();
    if moved != [(r.counter as usize, 1)] {
        errs.push(format!(
            "counters moved {moved:?} (index, delta), want [({}, 1)]",
            r.counter
        ));
    }
    for (i, p) in r.setup.puts.iter().enumerate() {
        let delta = p.hits(g)? - hits_before[i];
        let want = u32::from(r.hit == Some(i));
        if delta != want {
            errs.push(format!("entry {i} {p:?} hits rose by {delta}, want {want}"));
        }
    }
    Ok(errs)
}

fn name(action: u32) -> String {
    match action {
        XDP_ABORTED => "XDP_ABORTED".into(),
        XDP_DROP => "XDP_DROP".into(),
        XDP_PASS => "XDP_PASS".into(),
        n => format!("action {n}"),
    }
}

fn run_rows(rows: &[Row]) {
    let mut g = Gate::load().expect("load the XDP program");
    let mut failures = Vec::new();
    for r in rows {
        let errs = check(&mut g, r).unwrap_or_else(|e| vec![format!("error: {e:#}")]);
        if !errs.is_empty() {
            failures.push(format!("{}: {}", r.label, errs.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

fn v6(a: Ipv6Addr) -> IpAddr {
    IpAddr::V6(a)
}

fn bytes(b: &FrameBuilder) -> Vec<u8> {
    b.build().bytes
}

/// The frame with one byte replaced.
fn patched(b: &FrameBuilder, at: usize, f: impl Fn(u8) -> u8) -> Vec<u8> {
    let mut bytes = b.build().bytes;
    bytes[at] = f(bytes[at]);
    bytes
}

/// The blocked host of each family, the key it is stored under, and a
/// source that is not blocked.
struct Family {
    name: &'static str,
    bad: IpAddr,
    good: IpAddr,
    host: Put,
}

fn families() -> [Family; 2] {
    [
        Family {
            name: "v4",
            bad: v4(BAD4),
            good: v4(GOOD4),
            host: Put::Host4(BAD4, never()),
        },
        Family {
            name: "v6",
            bad: v6(BAD6),
            good: v6(GOOD6),
            host: Put::Host6(mask_v6(BAD6, 64), never()),
        },
    ]
}

/// Scope, protocols, encapsulations and header parsing.
#[test]
#[rustfmt::skip]
#[expect(clippy::too_many_lines, reason = "a table of cases, one per line")]
fn parsing_and_scope() {
    let pregreet = drop_reason(Reason::Pregreet);
    let mut rows = Vec::new();
    for f in families() {
        let n = f.name;
        let host = || Setup::smtp(vec![f.host]);
        let all = || Setup::all(vec![f.host]);
        rows.push(row(format!("{n} not ready"), bytes(&syn(f.bad, 25)), host().not_ready(), XDP_PASS, stat::PASS_NOT_READY, None));
        for port in SMTP_PORTS {
            rows.push(row(format!("{n} blocked SYN to {port}"), bytes(&syn(f.bad, port)), host(), XDP_DROP, pregreet, Some(0)));
        }
        rows.push(row(format!("{n} unblocked SYN to 25"), bytes(&syn(f.good, 25)), host(), XDP_PASS, stat::PASS_NO_MATCH, None));
        for port in [0, 24, 26, 80, 2525, 65535] {
            rows.push(row(format!("{n} blocked SYN to {port} (out of scope)"), bytes(&syn(f.bad, port)), host(), XDP_PASS, stat::PASS_OUT_OF_SCOPE, None));
        }
        // The ends of the port bitmap.
        for (port, action, counter) in [(0, XDP_DROP, pregreet), (65535, XDP_DROP, pregreet), (1, XDP_PASS, stat::PASS_OUT_OF_SCOPE), (65534, XDP_PASS, stat::PASS_OUT_OF_SCOPE)] {
            rows.push(row(format!("{n} ports [0, 65535], SYN to {port}"), bytes(&syn(f.bad, port)), host().ports(&[0, 65535]), action, counter, (action == XDP_DROP).then_some(0)));
        }
        rows.push(row(format!("{n} empty port list"), bytes(&syn(f.bad, 25)), host().ports(&[]), XDP_PASS, stat::PASS_OUT_OF_SCOPE, None));
        for l4 in [L4::Udp(25), L4::Icmp, L4::Esp] {
            rows.push(row(format!("{n} {l4:?} from blocked, port scope"), bytes(&FrameBuilder::new(f.bad, l4)), host(), XDP_PASS, stat::PASS_OUT_OF_SCOPE, None));
            rows.push(row(format!("{n} {l4:?} from blocked, all scope"), bytes(&FrameBuilder::new(f.bad, l4)), all(), XDP_DROP, pregreet, Some(0)));
            rows.push(row(format!("{n} {l4:?} from unblocked, all scope"), bytes(&FrameBuilder::new(f.good, l4)), all(), XDP_PASS, stat::PASS_NO_MATCH, None));
        }
        rows.push(row(format!("{n} SYN to 80, all scope"), bytes(&syn(f.bad, 80)), all(), XDP_DROP, pregreet, Some(0)));

        // VLANs.
        let tagged = [
            ("802.1Q", vec![(TPID_8021Q, 10)]),
            ("QinQ 802.1ad+802.1Q", vec![(TPID_8021AD, 100), (TPID_8021Q, 10)]),
            ("double 802.1Q", vec![(TPID_8021Q, 100), (TPID_8021Q, 10)]),
            ("double 802.1ad", vec![(TPID_8021AD, 100), (TPID_8021AD, 10)]),
        ];
        for (label, tags) in &tagged {
            let tag = |mut b: FrameBuilder| {
                for &(tpid, vid) in tags {
                    b = b.vlan(tpid, vid);
                }
                b
            };
            rows.push(row(format!("{n} {label} blocked SYN"), bytes(&tag(syn(f.bad, 25))), host(), XDP_DROP, pregreet, Some(0)));
            rows.push(row(format!("{n} {label} SYN to 80"), bytes(&tag(syn(f.bad, 80))), host(), XDP_PASS, stat::PASS_OUT_OF_SCOPE, None));
            rows.push(row(format!("{n} {label} unblocked"), bytes(&tag(syn(f.good, 25))), host(), XDP_PASS, stat::PASS_NO_MATCH, None));
            rows.push(row(format!("{n} {label} UDP, all scope"), bytes(&tag(FrameBuilder::new(f.bad, L4::Udp(53)))), all(), XDP_DROP, pregreet, Some(0)));
        }
        let three = syn(f.bad, 25).vlan(TPID_8021AD, 1).vlan(TPID_8021Q, 2).vlan(TPID_8021Q, 3);
        rows.push(row(format!("{n} three VLAN tags"), bytes(&three), host(), XDP_PASS, stat::PASS_UNPARSEABLE, None));
        rows.push(row(format!("{n} three VLAN tags, all scope"), bytes(&three), all(), XDP_PASS, stat::PASS_UNPARSEABLE, None));

        // Exactly one counter per packet, whatever the reason.
        for r in Reason::ALL {
            let e = entry(r as u32, 0);
            let put = match f.host {
                Put::Host4(a, _) => Put::Host4(a, e),
                Put::Host6(a, _) => Put::Host6(a, e),
                p => p,
            };
            rows.push(row(format!("{n} reason {}", r.name()), bytes(&syn(f.bad, 25)), Setup::smtp(vec![put]), XDP_DROP, drop_reason(r), Some(0)));
        }
        for (reason, slot) in [(REASONS - 1, REASONS - 1), (REASONS, 0), (u32::MAX, 0)] {
            let e = entry(reason, 0);
            let put = match f.host {
                Put::Host4(a, _) => Put::Host4(a, e),
                Put::Host6(a, _) => Put::Host6(a, e),
                p => p,
            };
            rows.push(row(format!("{n} reason number {reason} counts in slot {slot}"), bytes(&syn(f.bad, 25)), Setup::smtp(vec![put]), XDP_DROP, stat::DROP_BASE + slot, Some(0)));
        }
        // The program consults only the maps the daemon flagged as non-empty.
        let hosts_flag = f.host.flag();
        rows.push(row(format!("{n} host entry without its FLAG_HAS bit"), bytes(&syn(f.bad, 25)), host().unset(hosts_flag), XDP_PASS, stat::PASS_NO_MATCH, None));
    }

    // IPv4 specifics.
    let b4 = || Setup::smtp(vec![Put::Host4(BAD4, never())]);
    let a4 = || Setup::all(vec![Put::Host4(BAD4, never())]);
    for words in [1, 5, 10] {
        rows.push(row(format!("v4 {} bytes of options", words * 4), bytes(&syn(v4(BAD4), 25).v4_options(words)), b4(), XDP_DROP, pregreet, Some(0)));
        // The options read as port 25 if the TCP header is looked for at 20.
        rows.push(row(format!("v4 {} bytes of options, SYN to 80", words * 4), bytes(&syn(v4(BAD4), 80).v4_options(words)), b4(), XDP_PASS, stat::PASS_OUT_OF_SCOPE, None));
        rows.push(row(format!("v4 {} bytes of options, all scope", words * 4), bytes(&FrameBuilder::new(v4(BAD4), L4::Icmp).v4_options(words)), a4(), XDP_DROP, pregreet, Some(0)));
    }
    let plain4 = syn(v4(BAD4), 25);
    rows.push(row("v4 version nibble 5", patched(&plain4, 14, |b| 0x50 | (b & 0x0f)), b4(), XDP_PASS, stat::PASS_UNPARSEABLE, None));
    rows.push(row("v4 version nibble 6 behind the IPv4 EtherType", patched(&plain4, 14, |b| 0x60 | (b & 0x0f)), b4(), XDP_PASS, stat::PASS_UNPARSEABLE, None));
    rows.push(row("v4 IHL 4", patched(&plain4, 14, |_| 0x44), b4(), XDP_PASS, stat::PASS_UNPARSEABLE, None));
    rows.push(row("v4 IHL 4, all scope", patched(&plain4, 14, |_| 0x44), a4(), XDP_PASS, stat::PASS_UNPARSEABLE, None));
    rows.push(row("v4 IHL 15 past the end of the frame", patched(&plain4, 14, |_| 0x4f), b4(), XDP_PASS, stat::PASS_UNPARSEABLE, None));
    rows.push(row("v4 DF set", patched(&plain4, 14 + 6, |b| b | 0x40), b4(), XDP_DROP, pregreet, Some(0)));
    rows.push(row("v4 first fragment (MF, offset 0)", bytes(&syn(v4(BAD4), 25).v4_fragment(0, true)), b4(), XDP_DROP, pregreet, Some(0)));
    for (off, more) in [(1, true), (3, true), (185, false), (0x1fff, false)] {
        let frag = syn(v4(BAD4), 25).v4_fragment(off, more);
        rows.push(row(format!("v4 fragment offset {off} MF {more}, port scope"), bytes(&frag), b4(), XDP_PASS, stat::PASS_OUT_OF_SCOPE, None));
        rows.push(row(format!("v4 fragment offset {off} MF {more}, all scope"), bytes(&frag), a4(), XDP_DROP, pregreet, Some(0)));
        rows.push(row(format!("v4 fragment offset {off} from unblocked, all scope"), bytes(&syn(v4(GOOD4), 25).v4_fragment(off, more)), a4(), XDP_PASS, stat::PASS_NO_MATCH, None));
    }

    // IPv6 specifics.
    let b6 = || Setup::smtp(vec![Put::Host6(mask_v6(BAD6, 64), never())]);
    let a6 = || Setup::all(vec![Put::Host6(mask_v6(BAD6, 64), never())]);
    let plain6 = syn(v6(BAD6), 25);
    rows.push(row("v6 version nibble 4 behind the IPv6 EtherType", patched(&plain6, 14, |b| 0x40 | (b & 0x0f)), b6(), XDP_PASS, stat::PASS_UNPARSEABLE, None));
    rows.push(row("v6 version nibble 4, all scope", patched(&plain6, 14, |b| 0x40 | (b & 0x0f)), a6(), XDP_PASS, stat::PASS_UNPARSEABLE, None));
    let singles = [
        Ext::HopByHop { len8: 0 },
        Ext::HopByHop { len8: 3 },
        Ext::Routing { len8: 0 },
        Ext::Routing { len8: 2 },
        Ext::DestOpts { len8: 0 },
        Ext::DestOpts { len8: 1 },
        Ext::Fragment { offset: 0, more: true },
        Ext::Ah { len4: 1 },
        Ext::Ah { len4: 4 },
    ];
    for e in singles {
        rows.push(row(format!("v6 {e:?} then SYN to 25"), bytes(&syn(v6(BAD6), 25).ext(e)), b6(), XDP_DROP, pregreet, Some(0)));
        // The filler of every extension header reads as port 25.
        rows.push(row(format!("v6 {e:?} then SYN to 80"), bytes(&syn(v6(BAD6), 80).ext(e)), b6(), XDP_PASS, stat::PASS_OUT_OF_SCOPE, None));
        rows.push(row(format!("v6 {e:?} then UDP"), bytes(&FrameBuilder::new(v6(BAD6), L4::Udp(25)).ext(e)), b6(), XDP_PASS, stat::PASS_OUT_OF_SCOPE, None));
    }
    let chain = [
        Ext::HopByHop { len8: 1 },
        Ext::DestOpts { len8: 0 },
        Ext::Routing { len8: 2 },
        Ext::Fragment { offset: 0, more: true },
        Ext::Ah { len4: 4 },
        Ext::DestOpts { len8: 1 },
        Ext::DestOpts { len8: 0 },
    ];
    for k in 2..=chain.len() {
        let build = |dport| chain[..k].iter().fold(syn(v6(BAD6), dport), |b, e| b.ext(*e));
        rows.push(row(format!("v6 chain of {k} extension headers"), bytes(&build(25)), b6(), XDP_DROP, pregreet, Some(0)));
        // Past the six headers the parser follows, the chain could hide a
        // SYN that Linux would accept: judged on its source, port unseen.
        let (action, counter, hit) = if k <= 6 { (XDP_PASS, stat::PASS_OUT_OF_SCOPE, None) } else { (XDP_DROP, pregreet, Some(0)) };
        rows.push(row(format!("v6 chain of {k} extension headers, SYN to 80"), bytes(&build(80)), b6(), action, counter, hit));
        rows.push(row(format!("v6 chain of {k} extension headers, SYN to 80 from unblocked"), bytes(&chain[..k].iter().fold(syn(v6(GOOD6), 80), |b, e| b.ext(*e))), b6(), XDP_PASS, if k <= 6 { stat::PASS_OUT_OF_SCOPE } else { stat::PASS_NO_MATCH }, None));
        rows.push(row(format!("v6 chain of {k} extension headers, all scope"), bytes(&build(80)), a6(), XDP_DROP, pregreet, Some(0)));
    }
    rows.push(row("v6 AH then ESP", bytes(&FrameBuilder::new(v6(BAD6), L4::Esp).ext(Ext::Ah { len4: 4 })), b6(), XDP_PASS, stat::PASS_OUT_OF_SCOPE, None));
    rows.push(row("v6 no next header", bytes(&FrameBuilder::new(v6(BAD6), L4::NoNext)), b6(), XDP_PASS, stat::PASS_OUT_OF_SCOPE, None));
    rows.push(row("v6 dest opts then no next header", bytes(&FrameBuilder::new(v6(BAD6), L4::NoNext).ext(Ext::DestOpts { len8: 0 })), b6(), XDP_PASS, stat::PASS_OUT_OF_SCOPE, None));
    for (off, more) in [(1, true), (3, true), (185, false), (0x1fff, false)] {
        let frag = syn(v6(BAD6), 25).ext(Ext::Fragment { offset: off, more });
        rows.push(row(format!("v6 fragment offset {off} MF {more}, port scope"), bytes(&frag), b6(), XDP_PASS, stat::PASS_OUT_OF_SCOPE, None));
        rows.push(row(format!("v6 fragment offset {off} MF {more}, all scope"), bytes(&frag), a6(), XDP_DROP, pregreet, Some(0)));
        let behind = syn(v6(BAD6), 25).ext(Ext::HopByHop { len8: 0 }).ext(Ext::Fragment { offset: off, more });
        rows.push(row(format!("v6 hop-by-hop then fragment offset {off}, port scope"), bytes(&behind), b6(), XDP_PASS, stat::PASS_OUT_OF_SCOPE, None));
    }

    // Not IP.
    rows.push(row("ARP", packet::arp(BAD4, None), b4(), XDP_PASS, stat::PASS_NOT_IP, None));
    rows.push(row("ARP, all scope", packet::arp(BAD4, None), a4(), XDP_PASS, stat::PASS_NOT_IP, None));
    rows.push(row("ARP behind 802.1Q", packet::arp(BAD4, Some(7)), a4(), XDP_PASS, stat::PASS_NOT_IP, None));
    rows.push(row("LLDP", packet::ethertype(packet::ETH_P_LLDP, 46), a4(), XDP_PASS, stat::PASS_NOT_IP, None));
    rows.push(row("ARP, not ready", packet::arp(BAD4, None), b4().not_ready(), XDP_PASS, stat::PASS_NOT_READY, None));

    run_rows(&rows);
}

/// Allow entries, CIDR entries, expiry, and which entry counts the hit.
#[test]
#[rustfmt::skip]
fn verdicts() {
    let now = boottime_secs();
    let past = now.saturating_sub(5).max(1);
    let future = now + 3600;
    let pregreet = drop_reason(Reason::Pregreet);
    let escalation = drop_reason(Reason::Escalation);
    let esc = |expires| entry(Reason::Escalation as u32, expires);
    let pre = |expires| entry(Reason::Pregreet as u32, expires);
    let allow = entry(0, 0);
    let net4 = mask_v4(BAD4, 24);
    let net6 = mask_v6(BAD6, 48);
    let s4 = |bad: IpAddr| bytes(&syn(bad, 25));
    let mut rows = Vec::new();

    for (n, bad, good, host, cidr, allow_host, allow_net, allow_other) in [
        ("v4", v4(BAD4), v4(GOOD4),
            Box::new(|e| Put::Host4(BAD4, e)) as Box<dyn Fn(Entry) -> Put>,
            Box::new(move |e| Put::Cidr4(net4, 24, e)) as Box<dyn Fn(Entry) -> Put>,
            Put::Allow4(BAD4, 32, allow), Put::Allow4(mask_v4(BAD4, 16), 16, allow), Put::Allow4(GOOD4, 32, allow)),
        ("v6", v6(BAD6), v6(GOOD6),
            Box::new(|e| Put::Host6(mask_v6(BAD6, 64), e)) as Box<dyn Fn(Entry) -> Put>,
            Box::new(move |e| Put::Cidr6(net6, 48, e)) as Box<dyn Fn(Entry) -> Put>,
            Put::Allow6(BAD6, 128, allow), Put::Allow6(mask_v6(BAD6, 32), 32, allow), Put::Allow6(GOOD6, 128, allow)),
    ] {
        // CIDR entries.
        rows.push(row(format!("{n} CIDR covers the source"), s4(bad), Setup::smtp(vec![cidr(esc(0))]), XDP_DROP, escalation, Some(0)));
        rows.push(row(format!("{n} CIDR does not cover the source"), s4(good), Setup::smtp(vec![cidr(esc(0))]), XDP_PASS, stat::PASS_NO_MATCH, None));
        rows.push(row(format!("{n} host wins over CIDR (host decides)"), s4(bad), Setup::smtp(vec![host(pre(0)), cidr(esc(0))]), XDP_DROP, pregreet, Some(0)));
        rows.push(row(format!("{n} CIDR without its FLAG_HAS bit"), s4(bad), Setup::smtp(vec![cidr(esc(0))]).unset(cidr(esc(0)).flag()), XDP_PASS, stat::PASS_NO_MATCH, None));

        // Expiry.
        rows.push(row(format!("{n} expired host"), s4(bad), Setup::smtp(vec![host(pre(past))]), XDP_PASS, stat::PASS_EXPIRED, None));
        rows.push(row(format!("{n} host expiring exactly now"), s4(bad), Setup::smtp(vec![host(pre(now))]), XDP_PASS, stat::PASS_EXPIRED, None));
        rows.push(row(format!("{n} host expiring later"), s4(bad), Setup::smtp(vec![host(pre(future))]), XDP_DROP, pregreet, Some(0)));
        rows.push(row(format!("{n} expired host does not shadow a live CIDR"), s4(bad), Setup::smtp(vec![host(pre(past)), cidr(esc(future))]), XDP_DROP, escalation, Some(1)));
        rows.push(row(format!("{n} expired host does not shadow a permanent CIDR"), s4(bad), Setup::smtp(vec![host(pre(past)), cidr(esc(0))]), XDP_DROP, escalation, Some(1)));
        rows.push(row(format!("{n} live host over expired CIDR"), s4(bad), Setup::smtp(vec![host(pre(future)), cidr(esc(past))]), XDP_DROP, pregreet, Some(0)));
        rows.push(row(format!("{n} expired CIDR"), s4(bad), Setup::smtp(vec![cidr(esc(past))]), XDP_PASS, stat::PASS_EXPIRED, None));
        rows.push(row(format!("{n} expired host and expired CIDR"), s4(bad), Setup::smtp(vec![host(pre(past)), cidr(esc(past))]), XDP_PASS, stat::PASS_EXPIRED, None));
        rows.push(row(format!("{n} expired host, unblocked source"), s4(good), Setup::smtp(vec![host(pre(past))]), XDP_PASS, stat::PASS_NO_MATCH, None));

        // Allow over block.
        rows.push(row(format!("{n} allowed host over blocked host"), s4(bad), Setup::smtp(vec![host(pre(0)), allow_host]), XDP_PASS, stat::PASS_ALLOWED, Some(1)));
        rows.push(row(format!("{n} allowed prefix over blocked host"), s4(bad), Setup::smtp(vec![host(pre(0)), allow_net]), XDP_PASS, stat::PASS_ALLOWED, Some(1)));
        rows.push(row(format!("{n} allowed host over blocked CIDR"), s4(bad), Setup::smtp(vec![cidr(esc(0)), allow_host]), XDP_PASS, stat::PASS_ALLOWED, Some(1)));
        rows.push(row(format!("{n} allowed host over host and CIDR"), s4(bad), Setup::smtp(vec![host(pre(0)), cidr(esc(0)), allow_net]), XDP_PASS, stat::PASS_ALLOWED, Some(2)));
        rows.push(row(format!("{n} allow elsewhere does not help"), s4(bad), Setup::smtp(vec![host(pre(0)), allow_other]), XDP_DROP, pregreet, Some(0)));
        rows.push(row(format!("{n} allow without its FLAG_HAS bit"), s4(bad), Setup::smtp(vec![host(pre(0)), allow_host]).unset(allow_host.flag()), XDP_DROP, pregreet, Some(0)));
        rows.push(row(format!("{n} allow alone is not a match"), s4(bad), Setup::smtp(vec![allow_host]), XDP_PASS, stat::PASS_NO_MATCH, None));
        rows.push(row(format!("{n} allow not consulted for an expired block"), s4(bad), Setup::smtp(vec![host(pre(past)), allow_host]), XDP_PASS, stat::PASS_EXPIRED, None));
        rows.push(row(format!("{n} allow over block, all scope"), bytes(&FrameBuilder::new(bad, L4::Icmp)), Setup::all(vec![host(pre(0)), allow_host]), XDP_PASS, stat::PASS_ALLOWED, Some(1)));
    }

    // block_v6 is keyed by the source masked to the configured prefix.
    let p6 = |s: &str| -> IpAddr { IpAddr::V6(s.parse().unwrap()) };
    for (prefix, inside, outside) in [
        (64, "2001:db8:bad:1:ffff:ffff:ffff:ffff", "2001:db8:bad:2::7"),
        (64, "2001:db8:bad:1::", "2001:db8:bad:0:ffff:ffff:ffff:ffff"),
        (48, "2001:db8:bad:ffff::1", "2001:db8:bae::7"),
        (56, "2001:db8:bad:ff::1", "2001:db8:bad:100::1"),
        (128, "2001:db8:bad:1::7", "2001:db8:bad:1::8"),
        (0, "2001:db8:600d::9", "2001:db8:600d::9"),
    ] {
        let setup = Setup::smtp(vec![Put::Host6(mask_v6(BAD6, prefix), never())]).prefix(prefix);
        rows.push(row(format!("v6 keyed /{prefix}: {BAD6} itself"), s4(v6(BAD6)), setup.clone(), XDP_DROP, pregreet, Some(0)));
        rows.push(row(format!("v6 keyed /{prefix}: {inside}"), s4(p6(inside)), setup.clone(), XDP_DROP, pregreet, Some(0)));
        if prefix > 0 {
            rows.push(row(format!("v6 keyed /{prefix}: {outside}"), s4(p6(outside)), setup, XDP_PASS, stat::PASS_NO_MATCH, None));
        }
    }
    // A key stored for one prefix length is not found under another.
    rows.push(row("v6 /64 key with the program set to /48", s4(v6(BAD6)), Setup::smtp(vec![Put::Host6(mask_v6(BAD6, 64), never())]).prefix(48), XDP_PASS, stat::PASS_NO_MATCH, None));

    run_rows(&rows);
}

/// Every CIDR prefix length: an address inside matches, the ones just
/// outside do not.
#[test]
#[rustfmt::skip]
fn cidr_every_prefix_length() {
    let base4 = Ipv4Addr::new(203, 0, 113, 77);
    let base6: Ipv6Addr = "2001:db8:bad:1:2:3:4:5".parse().unwrap();
    let esc = entry(Reason::Escalation as u32, 0);
    let drop = drop_reason(Reason::Escalation);
    let mut rows = Vec::new();
    for p in 0..=32u32 {
        let net = mask_v4(base4, p);
        let last = u32::from(net) | if p == 32 { 0 } else { u32::MAX >> p };
        let setup = Setup::smtp(vec![Put::Cidr4(net, p, esc)]);
        for inside in [net, Ipv4Addr::from(last), base4] {
            rows.push(row(format!("v4 /{p} {net}: {inside} inside"), bytes(&syn(v4(inside), 25)), setup.clone(), XDP_DROP, drop, Some(0)));
        }
        let outside = [u32::from(net).checked_sub(1), last.checked_add(1)];
        for out in outside.into_iter().flatten().filter(|_| p > 0) {
            let out = Ipv4Addr::from(out);
            rows.push(row(format!("v4 /{p} {net}: {out} outside"), bytes(&syn(v4(out), 25)), setup.clone(), XDP_PASS, stat::PASS_NO_MATCH, None));
        }
    }
    for p in 0..=128u32 {
        let net = mask_v6(base6, p);
        let last = u128::from(net) | if p == 128 { 0 } else { u128::MAX >> p };
        let setup = Setup::smtp(vec![Put::Cidr6(net, p, esc)]);
        for inside in [net, Ipv6Addr::from(last), base6] {
            rows.push(row(format!("v6 /{p} {net}: {inside} inside"), bytes(&syn(v6(inside), 25)), setup.clone(), XDP_DROP, drop, Some(0)));
        }
        let outside = [u128::from(net).checked_sub(1), last.checked_add(1)];
        for out in outside.into_iter().flatten().filter(|_| p > 0) {
            let out = Ipv6Addr::from(out);
            rows.push(row(format!("v6 /{p} {net}: {out} outside"), bytes(&syn(v6(out), 25)), setup.clone(), XDP_PASS, stat::PASS_NO_MATCH, None));
        }
    }
    run_rows(&rows);
}

/// Frames cut at every length: nothing is judged until every header the
/// verdict needs is in the frame, and nothing is ever aborted.
#[test]
#[rustfmt::skip]
fn truncated_frames() {
    let mut g = Gate::load().expect("load the XDP program");
    let frames = [
        ("v4 SYN", syn(v4(BAD4), 25)),
        ("v4 SYN with options", syn(v4(BAD4), 25).v4_options(3)),
        ("v4 SYN 802.1Q", syn(v4(BAD4), 25).vlan(TPID_8021Q, 5)),
        ("v4 SYN QinQ", syn(v4(BAD4), 25).vlan(TPID_8021AD, 5).vlan(TPID_8021Q, 6)),
        ("v4 first fragment", syn(v4(BAD4), 25).v4_fragment(0, true).payload(8)),
        ("v6 SYN", syn(v6(BAD6), 25)),
        ("v6 SYN QinQ", syn(v6(BAD6), 25).vlan(TPID_8021AD, 5).vlan(TPID_8021Q, 6)),
        (
            "v6 SYN behind extension headers",
            syn(v6(BAD6), 25)
                .ext(Ext::HopByHop { len8: 1 })
                .ext(Ext::Routing { len8: 0 })
                .ext(Ext::Fragment { offset: 0, more: true })
                .ext(Ext::Ah { len4: 2 })
                .ext(Ext::DestOpts { len8: 0 }),
        ),
    ];
    let puts = vec![
        Put::Host4(BAD4, never()),
        Put::Host6(mask_v6(BAD6, 64), never()),
    ];
    let pregreet = drop_reason(Reason::Pregreet);
    let mut failures = Vec::new();
    let mut runs = 0;
    for (scope, setup) in [("port scope", Setup::smtp(puts.clone())), ("all scope", Setup::all(puts.clone()))] {
        setup.install(&mut g).unwrap();
        for (label, b) in &frames {
            let f = b.build();
            // A whole segment is judged on its flags, so it needs them; an
            // IPv4 first fragment cut short is judged on its source.
            let first_fragment = label.contains("first fragment");
            let needed = if first_fragment { f.ip_end } else { f.flags_end };
            // Every boundary is one of the lengths below, and the cut at
            // `needed` is one of them.
            assert!(f.boundaries.iter().any(|&(_, end)| end == needed), "{label}: {:?}", f.boundaries);
            for len in 14..=f.bytes.len() {
                let frame = f.truncated(len);
                let before = g.stats(m::STATS).unwrap();
                let action = g.run(&frame).unwrap();
                let after = g.stats(m::STATS).unwrap();
                runs += 1;
                let (want, counter) = if len >= needed { (XDP_DROP, pregreet) } else { (XDP_PASS, stat::PASS_UNPARSEABLE) };
                let moved: Vec<_> = (0..before.len()).filter(|&i| after[i] != before[i]).map(|i| (i, after[i] - before[i])).collect();
                if action != want || moved != [(counter as usize, 1)] {
                    let at = f.boundaries.iter().find(|&&(_, e)| e == len).map_or("", |(n, _)| n);
                    failures.push(format!("{scope} {label} cut at {len} {at} (needs {needed}): {} counters {moved:?}, want {} [({counter}, 1)]", name(action), name(want)));
                }
            }
        }
    }
    assert!(runs > 500, "swept {runs} frames");
    assert!(failures.is_empty(), "{} cuts misjudged:\n{}", failures.len(), failures.join("\n"));
}

/// ACK segments from a blocked source cut at every length: never dropped,
/// unparseable until the flags are in the frame, then passed as segments
/// that cannot open a connection.
#[test]
#[rustfmt::skip]
fn truncated_ack_segments_always_pass() {
    let mut g = Gate::load().expect("load the XDP program");
    let frames = [
        ("v4 ACK", segment(v4(BAD4), 25, tcp::ACK)),
        ("v4 ACK with options", segment(v4(BAD4), 25, tcp::ACK | tcp::PSH).v4_options(3)),
        ("v6 FIN ACK QinQ", segment(v6(BAD6), 25, tcp::FIN | tcp::ACK).vlan(TPID_8021AD, 5).vlan(TPID_8021Q, 6)),
        (
            "v6 RST behind extension headers",
            segment(v6(BAD6), 25, tcp::RST)
                .ext(Ext::HopByHop { len8: 1 })
                .ext(Ext::Fragment { offset: 0, more: true })
                .ext(Ext::DestOpts { len8: 0 }),
        ),
    ];
    let puts = vec![
        Put::Host4(BAD4, never()),
        Put::Host6(mask_v6(BAD6, 64), never()),
    ];
    let mut failures = Vec::new();
    for (scope, setup) in [("port scope", Setup::smtp(puts.clone())), ("all scope", Setup::all(puts.clone()))] {
        setup.install(&mut g).unwrap();
        for (label, b) in &frames {
            let f = b.build();
            for len in 14..=f.bytes.len() {
                let before = g.stats(m::STATS).unwrap();
                let action = g.run(&f.truncated(len)).unwrap();
                let after = g.stats(m::STATS).unwrap();
                let counter = if len >= f.flags_end { stat::PASS_NOT_OPENING } else { stat::PASS_UNPARSEABLE };
                let moved: Vec<_> = (0..before.len()).filter(|&i| after[i] != before[i]).map(|i| (i, after[i] - before[i])).collect();
                if action != XDP_PASS || moved != [(counter as usize, 1)] {
                    failures.push(format!("{scope} {label} cut at {len} (flags end at {}): {} counters {moved:?}, want XDP_PASS [({counter}, 1)]", f.flags_end, name(action)));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} cuts misjudged:\n{}", failures.len(), failures.join("\n"));
}

/// Only a segment that can open a connection (SYN without ACK) is judged:
/// every segment of an open connection passes whatever its source, so a
/// blocked client's hang-up, its last replies and a handed-off client's
/// mail still flow. No lookup runs for them (no entry counts a hit).
#[test]
#[rustfmt::skip]
fn only_connection_openers_are_judged() {
    use tcp::{ACK, CWR, ECE, FIN, PSH, RST, SYN};
    let pregreet = drop_reason(Reason::Pregreet);
    let opening = [("SYN", SYN), ("SYN with ECE CWR (ECN setup)", SYN | ECE | CWR), ("SYN FIN", SYN | FIN), ("SYN RST", SYN | RST), ("SYN PSH (fast open data)", SYN | PSH)];
    let not_opening = [
        ("SYN ACK", SYN | ACK), ("ACK", ACK), ("PSH ACK (data)", PSH | ACK), ("FIN ACK", FIN | ACK),
        ("RST", RST), ("RST ACK", RST | ACK), ("FIN without ACK", FIN), ("no flags", 0), ("ACK ECE", ACK | ECE),
    ];
    let mut rows = Vec::new();
    for f in families() {
        let n = f.name;
        let host = || Setup::smtp(vec![f.host]);
        let all = || Setup::all(vec![f.host]);
        for (label, flags) in opening {
            rows.push(row(format!("{n} {label} from blocked"), bytes(&segment(f.bad, 25, flags)), host(), XDP_DROP, pregreet, Some(0)));
            rows.push(row(format!("{n} {label} from blocked, all scope"), bytes(&segment(f.bad, 80, flags)), all(), XDP_DROP, pregreet, Some(0)));
            rows.push(row(format!("{n} {label} from unblocked"), bytes(&segment(f.good, 25, flags)), host(), XDP_PASS, stat::PASS_NO_MATCH, None));
        }
        for (label, flags) in not_opening {
            rows.push(row(format!("{n} {label} from blocked"), bytes(&segment(f.bad, 25, flags)), host(), XDP_PASS, stat::PASS_NOT_OPENING, None));
            rows.push(row(format!("{n} {label} from blocked, all scope"), bytes(&segment(f.bad, 80, flags)), all(), XDP_PASS, stat::PASS_NOT_OPENING, None));
            rows.push(row(format!("{n} {label} from unblocked"), bytes(&segment(f.good, 25, flags)), host(), XDP_PASS, stat::PASS_NOT_OPENING, None));
            rows.push(row(format!("{n} {label} to port 80"), bytes(&segment(f.bad, 80, flags)), host(), XDP_PASS, stat::PASS_OUT_OF_SCOPE, None));
        }
        // A source a CIDR covers, behind VLAN tags, with data.
        let cidr = match f.host {
            Put::Host4(..) => Put::Cidr4(mask_v4(BAD4, 24), 24, never()),
            _ => Put::Cidr6(mask_v6(BAD6, 48), 48, never()),
        };
        let qinq = |flags| segment(f.bad, 587, flags).vlan(TPID_8021AD, 100).vlan(TPID_8021Q, 10).payload(200);
        rows.push(row(format!("{n} QinQ ACK with data from a blocked CIDR"), bytes(&qinq(ACK | PSH)), Setup::smtp(vec![cidr]), XDP_PASS, stat::PASS_NOT_OPENING, None));
        rows.push(row(format!("{n} QinQ SYN from a blocked CIDR"), bytes(&qinq(SYN)), Setup::smtp(vec![cidr]), XDP_DROP, pregreet, Some(0)));
        // Not TCP: judged on its source with the "all" scope, as before.
        rows.push(row(format!("{n} UDP from blocked, all scope"), bytes(&FrameBuilder::new(f.bad, L4::Udp(25))), all(), XDP_DROP, pregreet, Some(0)));
    }
    // IPv4 fragments: a first fragment carrying the flags is judged on them.
    rows.push(row("v4 first fragment, ACK", bytes(&segment(v4(BAD4), 25, ACK).v4_fragment(0, true).payload(8)), Setup::smtp(vec![Put::Host4(BAD4, never())]), XDP_PASS, stat::PASS_NOT_OPENING, None));
    rows.push(row("v4 first fragment, ACK, all scope", bytes(&segment(v4(BAD4), 25, ACK).v4_fragment(0, true).payload(8)), Setup::all(vec![Put::Host4(BAD4, never())]), XDP_PASS, stat::PASS_NOT_OPENING, None));
    rows.push(row("v4 first fragment without the flags, ACK", bytes(&segment(v4(BAD4), 25, ACK).v4_fragment(0, true).l4_len(13)), Setup::smtp(vec![Put::Host4(BAD4, never())]), XDP_DROP, pregreet, Some(0)));
    rows.push(row("v4 first fragment without the flags, to port 80", bytes(&segment(v4(BAD4), 80, ACK).v4_fragment(0, true).l4_len(13)), Setup::smtp(vec![Put::Host4(BAD4, never())]), XDP_PASS, stat::PASS_OUT_OF_SCOPE, None));
    rows.push(row("v4 whole datagram cut inside the TCP header", bytes(&segment(v4(BAD4), 25, SYN).l4_len(13)), Setup::smtp(vec![Put::Host4(BAD4, never())]), XDP_PASS, stat::PASS_UNPARSEABLE, None));
    // IPv6: the flags behind extension headers and a first fragment.
    let b6 = || Setup::smtp(vec![Put::Host6(mask_v6(BAD6, 64), never())]);
    let behind = |flags| segment(v6(BAD6), 25, flags).ext(Ext::HopByHop { len8: 0 }).ext(Ext::Fragment { offset: 0, more: true }).ext(Ext::DestOpts { len8: 1 });
    rows.push(row("v6 ACK behind extension headers", bytes(&behind(ACK)), b6(), XDP_PASS, stat::PASS_NOT_OPENING, None));
    rows.push(row("v6 SYN behind extension headers", bytes(&behind(SYN)), b6(), XDP_DROP, pregreet, Some(0)));
    rows.push(row("v6 ACK behind extension headers, all scope", bytes(&behind(ACK)), Setup::all(vec![Put::Host6(mask_v6(BAD6, 64), never())]), XDP_PASS, stat::PASS_NOT_OPENING, None));
    run_rows(&rows);
}

/// The kernel refuses frames shorter than an Ethernet header, so the
/// program never sees one through `BPF_PROG_TEST_RUN`; the sweep above
/// starts at 14 for that reason.
#[test]
fn frames_shorter_than_ethernet_are_refused_by_the_kernel() {
    let g = Gate::load().expect("load the XDP program");
    let f = syn(v4(BAD4), 25).build();
    for len in 0..14 {
        assert!(
            g.run(&f.truncated(len)).is_err(),
            "a {len}-byte frame was run"
        );
    }
    assert!(g.run(&f.truncated(14)).is_ok());
}

/// Mutated and random frames: never aborted, and exactly one counter per
/// packet whose kind agrees with the action.
#[test]
fn mangled_frames_never_abort() {
    let mut g = Gate::load().expect("load the XDP program");
    Setup::smtp(vec![
        Put::Host4(BAD4, never()),
        Put::Host6(mask_v6(BAD6, 64), never()),
        Put::Cidr4(mask_v4(BAD4, 8), 8, never()),
        Put::Cidr6(mask_v6(BAD6, 16), 16, never()),
    ])
    .install(&mut g)
    .unwrap();
    let seeds = [
        syn(v4(BAD4), 25).v4_options(2).build().bytes,
        syn(v6(BAD6), 25)
            .ext(Ext::HopByHop { len8: 0 })
            .ext(Ext::Ah { len4: 1 })
            .build()
            .bytes,
        syn(v6(BAD6), 25)
            .vlan(TPID_8021AD, 1)
            .vlan(TPID_8021Q, 2)
            .build()
            .bytes,
        packet::arp(BAD4, None),
    ];
    // xorshift64: reproducible without a dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut drops = 0;
    for i in 0..3000 {
        let mut frame = seeds[i % seeds.len()].clone();
        let flips = 1 + next() % 4;
        for _ in 0..flips {
            let at = usize::try_from(next() % frame.len() as u64).unwrap();
            frame[at] = (next() & 0xff) as u8;
        }
        if next() % 3 == 0 {
            let len = 14 + usize::try_from(next() % (frame.len() as u64 - 13)).unwrap();
            frame.truncate(len);
        }
        let before = g.stats(m::STATS).unwrap();
        let action = g.run(&frame).unwrap();
        let after = g.stats(m::STATS).unwrap();
        let moved: Vec<_> = (0..before.len())
            .filter(|&i| after[i] != before[i])
            .collect();
        assert!(
            action == XDP_PASS || action == XDP_DROP,
            "frame {frame:02x?}: {}",
            name(action)
        );
        assert_eq!(moved.len(), 1, "frame {frame:02x?}: counters {moved:?}");
        let dropped_counter = moved[0] >= stat::DROP_BASE as usize;
        assert_eq!(
            dropped_counter,
            action == XDP_DROP,
            "frame {frame:02x?}: counter {} for {}",
            moved[0],
            name(action)
        );
        drops += usize::from(action == XDP_DROP);
    }
    // Most mutations leave the source and port alone: the run is not
    // just a pile of unparseable frames.
    assert!(
        drops > 300,
        "only {drops} of 3000 frames were judged and dropped"
    );
}

/// `repeat` runs count `repeat` packets and `repeat` hits.
#[test]
fn repeated_runs_count_every_packet() {
    let mut g = Gate::load().expect("load the XDP program");
    let put = Put::Cidr6(mask_v6(BAD6, 40), 40, entry(Reason::Dnsbl as u32, 0));
    Setup::smtp(vec![put]).install(&mut g).unwrap();
    let frame = syn(v6(BAD6), 587).build().bytes;
    let (action, _) = g.run_timed(&frame, 1000).unwrap();
    assert_eq!(action, XDP_DROP);
    let stats = g.stats(m::STATS).unwrap();
    assert_eq!(stats[drop_reason(Reason::Dnsbl) as usize], 1000);
    assert_eq!(stats.iter().sum::<u64>(), 1000);
    assert_eq!(put.hits(&g).unwrap(), 1000);
    let (action, _) = g
        .run_timed(&syn(v6(GOOD6), 587).build().bytes, 250)
        .unwrap();
    assert_eq!(action, XDP_PASS);
    let stats = g.stats(m::STATS).unwrap();
    assert_eq!(stats[stat::PASS_NO_MATCH as usize], 250);
    assert_eq!(stats.iter().sum::<u64>(), 1250);
}

/// A first IPv4 fragment that carries the ports but not the whole TCP
/// header must still be judged: the non-first fragments pass as out of
/// scope, so if the first one passes too, Linux reassembles the SYN of a
/// blocked host and it reaches the MTA.
#[test]
fn tiny_first_fragment_of_a_blocked_host_is_dropped() {
    let mut g = Gate::load().expect("load the XDP program");
    Setup::smtp(vec![Put::Host4(BAD4, never())])
        .install(&mut g)
        .unwrap();
    for carried in [4, 8, 13, 16] {
        let first = syn(v4(BAD4), 25)
            .v4_fragment(0, true)
            .l4_len(carried)
            .build();
        let action = g.run(&first.bytes).unwrap();
        assert_eq!(
            action,
            XDP_DROP,
            "first fragment with {carried} bytes of TCP header from a blocked host: {}",
            name(action)
        );
    }
}

/// With the prefilter authoritative, a clear bit passes the source without
/// consulting the block maps, and a set bit lets the maps decide.
#[test]
fn prefilter_gates_the_lookups() {
    use screener_common::{prefilter, FLAG_PREFILTER_V4, FLAG_PREFILTER_V6};
    let mut g = Gate::load().expect("load the XDP program");
    let flags = FLAG_HAS_V4_HOSTS | FLAG_HAS_V6_HOSTS | FLAG_PREFILTER_V4 | FLAG_PREFILTER_V6;
    g.set_config(m::CONFIG, &config(flags, 64, Ports::List(&SMTP_PORTS)))
        .unwrap();
    g.put_hash(m::BLOCK_V4, BAD4.octets(), &never()).unwrap();
    g.put_hash(m::BLOCK_V6, mask_v6(BAD6, 64).octets(), &never())
        .unwrap();
    let f4 = syn(v4(BAD4), 25).build().bytes;
    let f6 = syn(v6(BAD6), 25).build().bytes;
    let b4 = prefilter::v4_index(BAD4.octets());
    let b6 = prefilter::v6_index(BAD6.octets());

    // Bits clear: the entries are not even looked at.
    assert_eq!(g.run(&f4).unwrap(), XDP_PASS);
    assert_eq!(g.run(&f6).unwrap(), XDP_PASS);
    g.set_prefilter_bit(m::PREFILTER_V4, b4, true).unwrap();
    g.set_prefilter_bit(m::PREFILTER_V6, b6, true).unwrap();
    assert_eq!(g.run(&f4).unwrap(), XDP_DROP);
    assert_eq!(g.run(&f6).unwrap(), XDP_DROP);
    // A set bit is only "maybe": a neighbour in the same /24 still passes.
    let near = Ipv4Addr::new(203, 0, 113, 8);
    assert_eq!(prefilter::v4_index(near.octets()), b4);
    assert_eq!(g.run(&syn(v4(near), 25).build().bytes).unwrap(), XDP_PASS);
    // Without the flags the prefilter is ignored.
    g.set_prefilter_bit(m::PREFILTER_V4, b4, false).unwrap();
    g.set_config(
        m::CONFIG,
        &config(FLAG_HAS_V4_HOSTS, 64, Ports::List(&SMTP_PORTS)),
    )
    .unwrap();
    assert_eq!(g.run(&f4).unwrap(), XDP_DROP);
}
