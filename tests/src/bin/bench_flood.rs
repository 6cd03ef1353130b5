//! `cargo xtask bench flood`: a connection flood from 1,000 blocked source
//! addresses while well-behaved clients keep delivering mail, against
//! (a) the screener's XDP gate, (b) an nftables set dropping the same
//! addresses, (c) postscreen rejecting them from its access list.
//!
//! Everything runs on this machine in two network namespaces the benchmark
//! creates and removes; nothing leaves them.
//!
//! Usage: `bench_flood [--rounds N] [--seconds S] [xdp] [xdp-skb] [nft] [nft-input] [postscreen]`

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use integration_tests::bench::{
    client::{GoodClients, GoodStats},
    cpu,
    flood::{Flood, FloodStats},
    net::{self, BenchNet, SERVER_V4, SERVER_V6},
    postfix::{Front, Postfix},
    report::{self, cell, Spread, Table},
    screener::Screener,
    sys,
};

const PORT: u16 = 25;
/// Where Postfix's smtpd listens behind the screener.
const BACKEND_PORT: u16 = 10025;
/// The greet wait of both screeners, for the well-behaved clients' first
/// visit (afterwards they are on the temporary allowlist).
const GREET_WAIT_S: u64 = 1;

/// Well-behaved load: threads × one delivery per pace.
const GOOD_THREADS: usize = 4;
const GOOD_PACE: Duration = Duration::from_millis(50);
const GOOD_TIMEOUT: Duration = Duration::from_secs(5);

/// Flood sockets in flight at most (less if the open-file limit is lower)
/// and how long each waits for an answer (below the kernel's one-second
/// SYN retry, so an attempt is one SYN).
const FLOOD_WINDOW: usize = 50_000;
const FLOOD_PATIENCE: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    Xdp,
    XdpSkb,
    Nft,
    NftInput,
    Postscreen,
}

impl System {
    fn title(self) -> &'static str {
        match self {
            System::Xdp => "(a) screener, XDP driver mode",
            System::XdpSkb => "(a') screener, XDP skb mode",
            System::Nft => "(b) nftables set, netdev ingress",
            System::NftInput => "(b') nftables set, inet input after conntrack",
            System::Postscreen => "(c) postscreen access list",
        }
    }
}

struct Opts {
    rounds: usize,
    window: usize,
    flood: Duration,
    baseline: Duration,
    systems: Vec<System>,
}

fn opts() -> Result<Opts> {
    let mut o = Opts {
        rounds: 5,
        window: FLOOD_WINDOW,
        flood: Duration::from_secs(10),
        baseline: Duration::from_secs(5),
        systems: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => {
                o.rounds = args
                    .next()
                    .context("--rounds needs a number")?
                    .parse()
                    .context("--rounds needs a number")?;
            }
            "--seconds" => {
                let s: u64 = args
                    .next()
                    .context("--seconds needs a number")?
                    .parse()
                    .context("--seconds needs a number")?;
                o.flood = Duration::from_secs(s);
                o.baseline = Duration::from_secs(s.div_ceil(2));
            }
            "xdp" => o.systems.push(System::Xdp),
            "xdp-skb" => o.systems.push(System::XdpSkb),
            "nft" => o.systems.push(System::Nft),
            "nft-input" => o.systems.push(System::NftInput),
            "postscreen" => o.systems.push(System::Postscreen),
            other => bail!(
                "unknown argument {other:?}; usage: bench_flood [--rounds N] [--seconds S] [xdp] [nft] [nft-input] [postscreen]"
            ),
        }
    }
    if o.systems.is_empty() {
        o.systems = vec![
            System::Xdp,
            System::XdpSkb,
            System::Nft,
            System::NftInput,
            System::Postscreen,
        ];
    }
    if o.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    Ok(o)
}

/// The blocked sources as host prefixes.
fn blocked() -> Vec<String> {
    net::flood_sources()
        .iter()
        .map(|a| match a {
            IpAddr::V4(v4) => format!("{v4}/32"),
            IpAddr::V6(v6) => format!("{v6}/128"),
        })
        .collect()
}

/// An nftables table in the server namespace, deleted on drop.
struct NftTable {
    ns: String,
    family: &'static str,
    chain: &'static str,
}

impl NftTable {
    /// Hash sets of the blocked addresses and a drop rule per family.
    ///
    /// `ingress`: the strongest plain nftables setup, matched at the
    /// earliest hook (netdev ingress on the veth) before IP processing.
    /// Otherwise: a typical stateful host firewall, the sets matched in the
    /// inet input chain after `ct state established,related accept`, so
    /// every attempt also passes connection tracking.
    fn create(n: &BenchNet, ingress: bool) -> Result<NftTable> {
        let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) =
            net::flood_sources().into_iter().partition(IpAddr::is_ipv4);
        let join = |v: &[IpAddr]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (family, chain, hook) = if ingress {
            (
                "netdev",
                "ingress",
                format!(
                    "type filter hook ingress device \"{}\" priority -500; policy accept;",
                    n.server_if
                ),
            )
        } else {
            (
                "inet",
                "input",
                "type filter hook input priority 0; policy accept;\n    ct state established,related accept".to_owned(),
            )
        };
        let rules = format!(
            "table {family} scrbench {{
  set blocked4 {{ type ipv4_addr; elements = {{ {} }} }}
  set blocked6 {{ type ipv6_addr; elements = {{ {} }} }}
  chain {chain} {{
    {hook}
    ip saddr @blocked4 tcp dport {PORT} counter drop
    ip6 saddr @blocked6 tcp dport {PORT} counter drop
  }}
}}
",
            join(&v4),
            join(&v6),
        );
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("bench.nft");
        std::fs::write(&file, rules)?;
        n.in_server(&["nft", "-f", &file.to_string_lossy()])?;
        Ok(NftTable {
            ns: n.server_ns.clone(),
            family,
            chain,
        })
    }

    /// Packets the two drop rules have counted.
    fn dropped(&self) -> Result<u64> {
        let out = net::run(&[
            "ip",
            "netns",
            "exec",
            &self.ns,
            "nft",
            "list",
            "chain",
            self.family,
            "scrbench",
            self.chain,
        ])?;
        Ok(out
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "packets")
            .filter_map(|w| w[1].parse::<u64>().ok())
            .sum())
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = net::run(&[
            "ip",
            "netns",
            "exec",
            &self.ns,
            "nft",
            "delete",
            "table",
            self.family,
            "scrbench",
        ]);
    }
}

/// What runs on the server for one system; dropping it stops everything.
struct Setup {
    postfix: Postfix,
    screener: Option<Screener>,
    nft: Option<NftTable>,
    _files: Option<tempfile::TempDir>,
}

impl Setup {
    fn start(system: System, n: &BenchNet) -> Result<Setup> {
        let smtpd = Front::Smtpd {
            port: PORT,
            proxy: "",
        };
        match system {
            System::Xdp | System::XdpSkb => {
                // The screener takes the SMTP port and hands clients that
                // pass to Postfix's smtpd with a PROXY v2 header.
                let postfix = Postfix::start(
                    &n.server_ns,
                    &Front::Smtpd {
                        port: BACKEND_PORT,
                        proxy: "haproxy",
                    },
                    "",
                )?;
                let mode = if system == System::Xdp {
                    "driver"
                } else {
                    "skb"
                };
                let screener = Screener::start(
                    &n.server_ns,
                    &format!(
                        "[smtp]\nlisten = [\"0.0.0.0:{PORT}\", \"[::]:{PORT}\"]\n\
                         hostname = \"mx.example.com\"\n\
                         backend = \"127.0.0.1:{BACKEND_PORT}\"\n\
                         backend_proxy_protocol = \"v2\"\n\n\
                         [screen]\ngreet_wait = \"{GREET_WAIT_S}s\"\n\n\
                         [xdp]\ninterfaces = [\"{}\"]\nmode = \"{mode}\"\nports = [{PORT}]\npin_path = \"@PINS@\"\n",
                        n.server_if
                    ),
                )?;
                screener.block(&blocked())?;
                Ok(Setup {
                    postfix,
                    screener: Some(screener),
                    nft: None,
                    _files: None,
                })
            }
            System::Nft | System::NftInput => {
                let postfix = Postfix::start(&n.server_ns, &smtpd, "")?;
                let nft = NftTable::create(n, system == System::Nft)?;
                Ok(Setup {
                    postfix,
                    screener: None,
                    nft: Some(nft),
                    _files: None,
                })
            }
            System::Postscreen => {
                let files = tempfile::Builder::new().prefix("scrbench-ps").tempdir()?;
                std::fs::set_permissions(
                    files.path(),
                    std::os::unix::fs::PermissionsExt::from_mode(0o755),
                )?;
                let access = files.path().join("access.cidr");
                let mut text = String::new();
                for b in blocked() {
                    let _ = writeln!(text, "{b} reject");
                }
                std::fs::write(&access, text)?;
                let postfix = Postfix::start(
                    &n.server_ns,
                    &Front::Postscreen { port: PORT },
                    &format!(
                        "postscreen_access_list = cidr:{}\n\
                         postscreen_denylist_action = drop\n\
                         postscreen_greet_wait = {GREET_WAIT_S}s\n\
                         postscreen_cache_map = btree:$data_directory/postscreen_cache\n",
                        access.display()
                    ),
                )?;
                Ok(Setup {
                    postfix,
                    screener: None,
                    nft: None,
                    _files: Some(files),
                })
            }
        }
    }

    /// CPU used so far by the server processes a flood can reach: the
    /// screener daemon, or Postfix's master and every worker except the
    /// delivery pipeline of the well-behaved clients (postscreen, its
    /// logging through postlogd, anvil). Behind the kernel filters only
    /// the backend smtpd sees clients, and the flood never reaches it.
    fn server_cpu(&self) -> Duration {
        const DELIVERY: [&str; 5] = ["smtpd", "cleanup", "qmgr", "discard", "trivial-rewrite"];
        if let Some(s) = &self.screener {
            return s.cpu();
        }
        if self.nft.is_some() {
            return Duration::ZERO;
        }
        let master = self.postfix.pid();
        cpu::own_time(master)
            + cpu::children(master)
                .iter()
                .filter(|(_, name)| !DELIVERY.contains(&name.as_str()))
                .map(|(pid, _)| cpu::own_time(*pid))
                .sum::<Duration>()
    }

    /// Attempts the server side says it dropped or rejected.
    fn server_count(&self) -> Result<Option<u64>> {
        if let Some(s) = &self.screener {
            return s.kernel_dropped().map(Some);
        }
        if let Some(t) = &self.nft {
            return t.dropped().map(Some);
        }
        Ok(None)
    }
}

/// One round's measurements.
struct Round {
    good: GoodStats,
    flood: FloodStats,
    /// Host interrupt time per attempt beyond the baseline, seconds.
    irq_per_attempt: f64,
    /// Server process CPU per attempt beyond the well-behaved clients' share, seconds.
    srv_per_attempt: f64,
    /// Interrupt and server seconds: baseline window, then flood window.
    raw: [f64; 4],
    server_count: Option<u64>,
    baseline_good: GoodStats,
}

fn good_targets() -> Vec<SocketAddr> {
    vec![
        SocketAddr::new(SERVER_V4.into(), PORT),
        SocketAddr::new(SERVER_V6.into(), PORT),
    ]
}

/// Host interrupt time and server process CPU used so far.
fn cost(setup: &Setup) -> (Duration, Duration) {
    (cpu::host_interrupt_time(), setup.server_cpu())
}

fn delta(a: (Duration, Duration), b: (Duration, Duration)) -> (f64, f64) {
    (
        b.0.saturating_sub(a.0).as_secs_f64(),
        b.1.saturating_sub(a.1).as_secs_f64(),
    )
}

fn round(n: &BenchNet, setup: &Setup, o: &Opts) -> Result<Round> {
    let targets = good_targets();
    // Baseline: the same well-behaved load, no flood.
    let c0 = cost(setup);
    let t0 = Instant::now();
    let good = GoodClients::start(
        &n.client_ns,
        &targets,
        GOOD_THREADS,
        GOOD_PACE,
        GOOD_TIMEOUT,
    );
    std::thread::sleep(o.baseline);
    let baseline_good = good.finish();
    let (base_irq, base_srv) = delta(c0, cost(setup));
    let base_len = t0.elapsed().as_secs_f64();

    let before = setup.server_count()?;
    let c1 = cost(setup);
    let good = GoodClients::start(
        &n.client_ns,
        &targets,
        GOOD_THREADS,
        GOOD_PACE,
        GOOD_TIMEOUT,
    );
    let flood = Flood {
        sources: net::flood_sources(),
        target_v4: SocketAddr::new(SERVER_V4.into(), PORT),
        target_v6: SocketAddr::new(SERVER_V6.into(), PORT),
        window: o.window,
        patience: FLOOD_PATIENCE,
    };
    let dur = o.flood;
    let fl = sys::on_netns_thread(&n.client_ns, move || flood.run(dur))
        .join()
        .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
    let good = good.finish();
    let (flood_irq, flood_srv) = delta(c1, cost(setup));
    let after = setup.server_count()?;
    // Interrupt time not caused by the flood (other work on the host, the
    // well-behaved clients' few packets) goes on at the baseline's rate per
    // second; the server processes' CPU for the well-behaved clients goes
    // at the baseline's rate per delivered session.
    let irq_extra = flood_irq - base_irq * fl.elapsed.as_secs_f64() / base_len;
    #[expect(clippy::cast_precision_loss, reason = "session counts are small")]
    let per_session = base_srv / baseline_good.sessions.len().max(1) as f64;
    #[expect(clippy::cast_precision_loss, reason = "session counts are small")]
    let srv_extra = flood_srv - per_session * good.sessions.len() as f64;
    #[expect(clippy::cast_precision_loss, reason = "attempt counts stay below 2^52")]
    let attempts = fl.attempts.max(1) as f64;
    Ok(Round {
        good,
        flood: fl,
        irq_per_attempt: irq_extra / attempts,
        srv_per_attempt: srv_extra / attempts,
        raw: [base_irq, base_srv, flood_irq, flood_srv],
        server_count: before.zip(after).map(|(b, a)| a.saturating_sub(b)),
        baseline_good,
    })
}

impl Round {
    /// Host CPU per attempt, in microseconds. The server-process share is
    /// an estimate that can come out slightly negative when the flood
    /// causes none (the kernel filters); it is counted as zero then, so
    /// noise never makes a system look cheaper than its kernel cost.
    fn cpu_us(&self) -> f64 {
        (self.irq_per_attempt + self.srv_per_attempt.max(0.0)) * 1e6
    }
}

struct Result1 {
    system: System,
    rounds: Vec<Round>,
}

fn spread(rounds: &[Round], f: impl Fn(&Round) -> f64) -> Option<Spread> {
    Spread::of(&rounds.iter().map(f).collect::<Vec<_>>())
}

fn p(r: &Round, q: f64) -> f64 {
    let v: Vec<Duration> = r.good.sessions.iter().map(|s| s.total).collect();
    report::quantile(&v, q).map_or(f64::NAN, report::ms)
}

fn render(results: &[Result1], o: &Opts) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Flood: 1,000 blocked sources (500 IPv4, 500 IPv6) → port {PORT}, {} s per round, {} rounds; \
         well-behaved clients: {GOOD_THREADS} × one delivery per {} ms (IPv4 and IPv6 in turn).\n\
         Cells: median (min–max) over the rounds.\n",
        o.flood.as_secs(),
        o.rounds,
        GOOD_PACE.as_millis()
    );
    let mut t = Table::new(&[
        "system",
        "good delivered %",
        "good session p50 ms",
        "good session p99 ms",
        "attempts/s",
        "kernel irq+softirq µs/attempt",
        "server processes µs/attempt",
        "host CPU µs/attempt",
        "server count/attempt",
        "answered/attempt",
    ]);
    #[expect(clippy::cast_precision_loss, reason = "counts stay below 2^52")]
    for r in results {
        let rs = &r.rounds;
        t.row(vec![
            r.system.title().into(),
            cell(spread(rs, |x| x.good.success_percent())),
            cell(spread(rs, |x| p(x, 0.5))),
            cell(spread(rs, |x| p(x, 0.99))),
            cell(spread(rs, |x| {
                x.flood.attempts as f64 / x.flood.elapsed.as_secs_f64()
            })),
            cell(spread(rs, |x| x.irq_per_attempt * 1e6)),
            cell(spread(rs, |x| x.srv_per_attempt * 1e6)),
            cell(spread(rs, Round::cpu_us)),
            cell(spread(rs, |x| {
                x.server_count
                    .map_or(f64::NAN, |c| c as f64 / x.flood.attempts.max(1) as f64)
            })),
            cell(spread(rs, |x| {
                x.flood.answered as f64 / x.flood.attempts.max(1) as f64
            })),
        ]);
    }
    out.push_str(&t.render());
    let med = |s: System| {
        results
            .iter()
            .find(|r| r.system == s)
            .and_then(|r| spread(&r.rounds, Round::cpu_us))
            .map(|s| s.median)
    };
    for xdp in [System::Xdp, System::XdpSkb] {
        let Some(x) = med(xdp) else { continue };
        for other in [System::Nft, System::NftInput, System::Postscreen] {
            if let Some(y) = med(other) {
                let _ = writeln!(
                    out,
                    "\nCPU per attempt, {} ÷ {}: {}×",
                    other.title(),
                    xdp.title(),
                    report::num(y / x)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\nBaseline windows (no flood), good delivered % and p50 ms:"
    );
    for r in results {
        let rs = &r.rounds;
        let _ = writeln!(
            out,
            "- {}: {} %, p50 {} ms",
            r.system.title(),
            cell(spread(rs, |x| x.baseline_good.success_percent())),
            cell(spread(rs, |x| {
                let v: Vec<Duration> = x.baseline_good.sessions.iter().map(|s| s.total).collect();
                report::quantile(&v, 0.5).map_or(f64::NAN, report::ms)
            }))
        );
    }
    for r in results {
        let mut reasons: Vec<&String> = r.rounds.iter().flat_map(|x| &x.good.reasons).collect();
        reasons.dedup();
        if !reasons.is_empty() {
            let _ = writeln!(out, "\nGood-client failures under {}:", r.system.title());
            for x in reasons.iter().take(5) {
                let _ = writeln!(out, "- {x}");
            }
        }
    }
    out
}

fn preflight() -> Result<()> {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the flood benchmark creates namespaces and attaches XDP: run it as root");
    }
    for (tool, pkg) in [
        ("/usr/sbin/nft", "nftables"),
        ("/usr/lib/postfix/sbin/master", "postfix"),
        ("/usr/bin/ss", "iproute2"),
        ("/usr/bin/ip", "iproute2"),
    ] {
        if !std::path::Path::new(tool).exists()
            && !std::path::Path::new(&tool.replace("/usr", "")).exists()
        {
            bail!("{tool} is missing: install the Debian package {pkg}");
        }
    }
    Ok(())
}

fn run() -> Result<()> {
    let mut o = opts()?;
    preflight()?;
    let nofile = sys::raise_nofile(400_000)?;
    // Leave room for the well-behaved clients and the admin commands.
    let window = FLOOD_WINDOW.min(usize::try_from(nofile).unwrap_or(0).saturating_sub(2_000));
    if window < 1_000 {
        bail!("the open-file limit ({nofile}) is too low for the flood");
    }
    o.window = window;
    sys::become_subreaper()?;
    eprintln!("bench flood: {}", report::machine());
    let n = BenchNet::new().context("creating the benchmark namespaces")?;
    let mut results = Vec::new();
    for &system in &o.systems {
        eprintln!("==> {}: starting", system.title());
        let setup = Setup::start(system, &n)?;
        // Warm-up: first-time clients go through postscreen's greet wait
        // once and are then cached, as regular senders are.
        let warm = GoodClients::start(
            &n.client_ns,
            &good_targets(),
            GOOD_THREADS,
            GOOD_PACE,
            GOOD_TIMEOUT,
        );
        std::thread::sleep(Duration::from_secs(3));
        let w = warm.finish();
        if w.sessions.is_empty() {
            bail!(
                "{}: no well-behaved delivery got through before the flood: {:?}",
                system.title(),
                w.reasons
            );
        }
        let mut rounds = Vec::new();
        for i in 0..o.rounds {
            let r = round(&n, &setup, &o)?;
            eprintln!(
                "    round {}: {} attempts ({:.0}/s), good {:.2}% of {}, {:.3} µs/attempt, server count {:?}, answered {}, raw irq/srv base {:.3}/{:.3} flood {:.3}/{:.3} s",
                i + 1,
                r.flood.attempts,
                r.flood.rate(),
                r.good.success_percent(),
                r.good.sessions.len() + usize::try_from(r.good.failed).unwrap_or(0),
                r.cpu_us(),
                r.server_count,
                r.flood.answered,
                r.raw[0],
                r.raw[1],
                r.raw[2],
                r.raw[3],
            );
            rounds.push(r);
        }
        results.push(Result1 { system, rounds });
        drop(setup);
    }
    print!("{}", render(&results, &o));
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench flood: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
