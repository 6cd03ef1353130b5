//! `cargo xtask bench smtp`: the screener and Postfix's postscreen side by
//! side, each in front of a private Postfix smtpd in the same namespace:
//!
//! 1. fast path: a client on the temporary allowlist, connect → the
//!    backend's 220, p50 and p99;
//! 2. new clients: many concurrent first-time clients through a 1 s greet
//!    wait, completed screenings per second and peak memory;
//! 3. idle horde: 10,000 clients sitting in the greet wait, memory and CPU;
//! 5. DNSBL: scenario 2 scored against rbldnsd with three sites;
//! 6. re-import: scenario 1 for the screener alone, idle and while a
//!    300,000-line list is re-imported over and over (the XDP maps loaded,
//!    attached nowhere), so the baseline is measured in the same run;
//! 7. metrics: scenario 2 for the screener alone, `metrics.listen` off
//!    and on with a scrape every second, the daemon's CPU time and peak
//!    RSS; the two alternate round by round, so drift hits both.
//!
//! (Scenario 4, the flood, is `bench_flood`.) Everything runs in two
//! network namespaces the benchmark creates and removes.
//!
//! Usage: `bench_smtp [--rounds N] [fast] [new] [horde] [dnsbl] [import] [metrics]`

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use integration_tests::bench::{
    cpu,
    net::{self, BenchNet, GOOD_V4, SERVER_V4, SERVER_V6},
    postfix::{Front, Postfix},
    report::{self, cell, Spread, Table},
    screener::Screener,
    sys,
};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

const PORT: u16 = 25;
const BACKEND_PORT: u16 = 10025;
const GREET_WAIT_S: u64 = 1;
/// Greet wait of the idle horde: long enough to hold all of it at once.
const HORDE_WAIT_S: u64 = 60;
const HORDE: u32 = 10_000;
/// New-client scenarios: clients per round and how many at once.
const NEW_CLIENTS: u32 = 2_000;
const NEW_CONCURRENCY: usize = 500;
const FAST_SESSIONS: usize = 300;
/// Lines of the list the re-import scenario imports.
const IMPORT_LINES: u32 = 300_000;
const TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    Screener,
    Postscreen,
}

impl System {
    fn title(self) -> &'static str {
        match self {
            System::Screener => "screener",
            System::Postscreen => "postscreen + smtpd",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    Fast,
    New,
    Horde,
    Dnsbl,
    Import,
    Metrics,
}

/// rbldnsd in the server namespace on 127.0.0.1:53, killed on drop.
struct Rbldnsd {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Rbldnsd {
    const SOA: &'static str = "$SOA 600 ns.example. hostmaster.example. 1 600 300 86400 120\n";

    fn start(ns: &str) -> Result<Rbldnsd> {
        let bin = "/usr/sbin/rbldnsd";
        if !std::path::Path::new(bin).exists() {
            bail!("{bin} is missing: install the Debian package rbldnsd");
        }
        let dir = tempfile::tempdir()?;
        let soa = Self::SOA;
        // Each list answers its RFC 5782 IPv4 test point and lists an IPv6
        // prefix none of the benchmark's clients is in: every client is
        // looked up at all three and listed at none.
        for (name, value) in [
            ("bl1", "127.0.0.2"),
            ("bl2", "127.0.0.2"),
            ("wl", "127.0.10.2"),
        ] {
            std::fs::write(
                dir.path().join(format!("{name}4")),
                format!("{soa}$TTL 900\n:{value}:listed\n127.0.0.2\n"),
            )?;
            std::fs::write(
                dir.path().join(format!("{name}6")),
                format!("{soa}$TTL 900\n:{value}:listed\n2001:db8:dead::/48\n"),
            )?;
        }
        let mut cmd = Command::new(bin);
        cmd.args(["-n", "-e", "-c", "0", "-b", "127.0.0.1/53", "-w"])
            .arg(dir.path())
            .args([
                "bl1.example:ip4set:bl14",
                "bl1.example:ip6trie:bl16",
                "bl2.example:ip4set:bl24",
                "bl2.example:ip6trie:bl26",
                "wl.example:ip4set:wl4",
                "wl.example:ip6trie:wl6",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        sys::in_netns(&mut cmd, ns)?;
        let child = cmd.spawn().context("cannot start rbldnsd")?;
        let r = Rbldnsd { child, _dir: dir };
        let ok = sys::poll_until(Duration::from_secs(10), || {
            net::run(&["ip", "netns", "exec", ns, "ss", "-Hlun", "sport = :53"])
                .is_ok_and(|o| !o.trim().is_empty())
        });
        if !ok {
            bail!("rbldnsd did not start listening on 127.0.0.1:53");
        }
        Ok(r)
    }
}

impl Drop for Rbldnsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server side of one system: dropping it stops everything.
struct Server {
    postfix: Postfix,
    screener: Option<Screener>,
    _rbl: Option<Rbldnsd>,
}

impl Server {
    fn start(
        system: System,
        n: &BenchNet,
        greet_wait: u64,
        limit: u32,
        dnsbl: bool,
        gate: bool,
        metrics: Option<SocketAddr>,
    ) -> Result<Server> {
        let rbl = if dnsbl {
            Some(Rbldnsd::start(&n.server_ns)?)
        } else {
            None
        };
        match system {
            System::Screener => {
                let postfix = Postfix::start(
                    &n.server_ns,
                    &Front::Smtpd {
                        port: BACKEND_PORT,
                        proxy: "haproxy",
                    },
                    "",
                )?;
                let mut cfg = format!(
                    "[smtp]\nlisten = [\"0.0.0.0:{PORT}\", \"[::]:{PORT}\"]\n\
                     hostname = \"mx.example.com\"\n\
                     backend = \"127.0.0.1:{BACKEND_PORT}\"\n\
                     backend_proxy_protocol = \"v2\"\n\n\
                     [screen]\ngreet_wait = \"{greet_wait}s\"\n\
                     stress_greet_wait = \"{greet_wait}s\"\n\
                     pre_queue_limit = {limit}\npost_queue_limit = {limit}\n"
                );
                if dnsbl {
                    cfg.push_str(
                        "dnsbl_sites = [\"bl1.example*2\", \"bl2.example*1\", \"wl.example=127.0.10.[0..255]*-2\"]\n\
                         dnsbl_threshold = 2\n\n[dns]\nnameservers = [\"127.0.0.1:53\"]\n",
                    );
                }
                if let Some(addr) = metrics {
                    cfg.push_str(&format!("\n[metrics]\nlisten = [\"{addr}\"]\n"));
                }
                cfg.push_str("\n[xdp]\npin_path = \"@PINS@\"\n");
                let screener = if gate {
                    // Maps and program loaded, attached to no interface:
                    // imports go through the kernel maps as in production.
                    cfg.push_str("interfaces = []\n");
                    Screener::start_with(&n.server_ns, &cfg, &[])?
                } else {
                    Screener::start_with(&n.server_ns, &cfg, &["--no-xdp"])?
                };
                Ok(Server {
                    postfix,
                    screener: Some(screener),
                    _rbl: rbl,
                })
            }
            System::Postscreen => {
                let mut extra = format!(
                    "postscreen_greet_wait = {greet_wait}s\n\
                     postscreen_pre_queue_limit = {limit}\n\
                     postscreen_post_queue_limit = {limit}\n\
                     postscreen_cache_map = btree:$data_directory/postscreen_cache\n"
                );
                if dnsbl {
                    extra.push_str(
                        "postscreen_dnsbl_sites = bl1.example*2 bl2.example*1 wl.example=127.0.10.[0..255]*-2\n\
                         postscreen_dnsbl_threshold = 2\n\
                         postscreen_dnsbl_action = enforce\n",
                    );
                }
                let postfix = Postfix::start_with_resolver(
                    &n.server_ns,
                    &Front::Postscreen { port: PORT },
                    &extra,
                    dnsbl.then_some(IpAddr::from([127, 0, 0, 1])),
                )?;
                Ok(Server {
                    postfix,
                    screener: None,
                    _rbl: rbl,
                })
            }
        }
    }
}

/// The screening front's processes: the daemon, or postscreen (which the
/// master starts on the first connection).
fn front_pids(master: i32, daemon: Option<i32>) -> Vec<i32> {
    match daemon {
        Some(d) => vec![d],
        None => cpu::children(master)
            .into_iter()
            .filter(|(_, c)| c == "postscreen")
            .map(|(p, _)| p)
            .collect(),
    }
}

/// One SMTP visit: connect (from `src` if given), wait for the final
/// `220 ` line, QUIT. Returns connect → 220.
async fn visit(
    src: Option<IpAddr>,
    dst: SocketAddr,
    quit: bool,
) -> Result<(Duration, Option<tokio::net::TcpStream>)> {
    let t0 = Instant::now();
    let stream = match src {
        Some(ip) => {
            let std = sys::bound_socket(ip)?;
            tokio::net::TcpSocket::from_std_stream(std)
                .connect(dst)
                .await?
        }
        None => tokio::net::TcpStream::connect(dst).await?,
    };
    stream.set_nodelay(true)?;
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            bail!("closed before the 220 greeting");
        }
        if !line.starts_with("220") {
            bail!("wanted 220, got {:?}", line.trim_end());
        }
        if line.as_bytes().get(3) == Some(&b' ') {
            break;
        }
    }
    let greeted = t0.elapsed();
    if !quit {
        return Ok((greeted, Some(r.into_inner())));
    }
    r.get_mut().write_all(b"QUIT\r\n").await?;
    line.clear();
    r.read_line(&mut line).await?;
    if !line.starts_with("221") {
        bail!("wanted 221, got {:?}", line.trim_end());
    }
    Ok((greeted, None))
}

/// Reads the `220-` teaser only, then holds the connection open.
async fn hold(src: IpAddr, dst: SocketAddr) -> Result<tokio::net::TcpStream> {
    let std = sys::bound_socket(src)?;
    let mut stream = tokio::net::TcpSocket::from_std_stream(std)
        .connect(dst)
        .await?;
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(TIMEOUT, stream.read(&mut buf)).await??;
    if n == 0 || !buf.starts_with(b"220") {
        bail!("no 220 teaser");
    }
    Ok(stream)
}

/// Runs `f` on a current-thread tokio runtime inside the clients' namespace.
fn in_clients<T: Send + 'static>(
    n: &BenchNet,
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> Result<T> {
    sys::on_netns_thread(&n.client_ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
    .map_err(Into::into)
}

/// A background sampler of a server's memory and smtpd count.
struct Peak {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(u64, u64, usize)>,
}

impl Peak {
    fn start(server: &Server) -> Peak {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let master = server.postfix.pid();
        let daemon = server.screener.as_ref().map(Screener::pid);
        let handle = std::thread::spawn(move || {
            let (mut all, mut front, mut smtpd) = (0u64, 0u64, 0usize);
            while !s2.load(Ordering::Relaxed) {
                let kids = cpu::children(master);
                let d = daemon.map_or(0, cpu::pss);
                let ps: u64 = kids
                    .iter()
                    .filter(|(_, c)| c == "postscreen")
                    .map(|(p, _)| cpu::pss(*p))
                    .sum();
                all = all.max(cpu::tree_pss(master) + d);
                front = front.max(if daemon.is_some() { d } else { ps });
                smtpd = smtpd.max(kids.iter().filter(|(_, c)| c == "smtpd").count());
                std::thread::sleep(Duration::from_millis(50));
            }
            (all, front, smtpd)
        });
        Peak { stop, handle }
    }

    fn finish(self) -> (u64, u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or((0, 0, 0))
    }
}

/// Fresh client addresses: never used before in this run.
static NEXT_FRESH: AtomicU32 = AtomicU32::new(1);

fn fresh(count: u32) -> Vec<IpAddr> {
    let first = NEXT_FRESH.fetch_add(count, Ordering::Relaxed);
    (first..first + count)
        .map(|k| IpAddr::V6(net::fresh_v6(k)))
        .collect()
}

#[derive(Default)]
struct Row {
    /// Per round, each figure.
    figures: Vec<Vec<f64>>,
    failures: Vec<String>,
}

impl Row {
    fn push(&mut self, figures: Vec<f64>) {
        self.figures.push(figures);
    }
    fn spread(&self, i: usize) -> Option<Spread> {
        Spread::of(&self.figures.iter().map(|f| f[i]).collect::<Vec<_>>())
    }
}

fn mib(b: u64) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "memory sizes for display")]
    let x = b as f64 / 1024.0 / 1024.0;
    x
}

/// Scenario 1: figures p50, p99 (ms), failures.
fn fast_round(n: &BenchNet) -> Result<(Vec<f64>, Vec<String>)> {
    let dst = SocketAddr::new(SERVER_V4.into(), PORT);
    let (lat, errs) = in_clients(n, move || {
        Box::pin(async move {
            let mut lat = Vec::new();
            let mut errs = Vec::new();
            for _ in 0..FAST_SESSIONS {
                match tokio::time::timeout(TIMEOUT, visit(None, dst, true)).await {
                    Ok(Ok((d, _))) => lat.push(d),
                    Ok(Err(e)) => errs.push(format!("{e:#}")),
                    Err(_) => errs.push("timed out".into()),
                }
            }
            (lat, errs)
        })
    })?;
    let q = |x| report::quantile(&lat, x).map_or(f64::NAN, report::ms);
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let failed = errs.len() as f64;
    Ok((vec![q(0.5), q(0.99), failed], errs))
}

/// Scenario 6: figures p50 and p99 (ms) idle, p50 and p99 during
/// re-imports, re-imports completed, failures.
fn import_round(n: &BenchNet, server: &Server) -> Result<(Vec<f64>, Vec<String>)> {
    let screener = server.screener.as_ref().context("the screener runs")?;
    let (idle, mut errs) = fast_round(n)?;
    // Two lists that share half their entries, imported in turn under one
    // name: every import replaces 150,000 entries and keeps 150,000.
    let dir = tempfile::tempdir()?;
    let mut files = Vec::new();
    for shift in [0, IMPORT_LINES / 2] {
        let mut text = String::with_capacity(IMPORT_LINES as usize * 28);
        for i in shift..shift + IMPORT_LINES {
            let _ = writeln!(text, "2001:db8:{:x}:{:x}::/64 ; bench", i >> 16, i & 0xffff);
        }
        let path = dir.path().join(format!("list{shift}.txt"));
        std::fs::write(&path, text)?;
        files.push(path);
    }
    let bin = integration_tests::bench::screener::binary()?;
    let config = screener.config.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::clone(&stop);
    let importer = std::thread::spawn(move || -> Result<u32> {
        // Counted across rounds, so each round's first import is the other
        // list than the last one imported: only the very first import of
        // the run starts from an empty list.
        static IMPORTED: AtomicU32 = AtomicU32::new(0);
        let mut done = 0;
        while !stopping.load(Ordering::Relaxed) {
            let file = &files[IMPORTED.fetch_add(1, Ordering::Relaxed) as usize % 2];
            let out = Command::new(&bin)
                .arg("-c")
                .arg(&config)
                .args(["import", "--reason", "bench"])
                .arg(file)
                .output()?;
            if !out.status.success() {
                bail!("import failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            done += 1;
        }
        Ok(done)
    });
    // The first import is under way before the clients start.
    std::thread::sleep(Duration::from_millis(200));
    let during = fast_round(n);
    stop.store(true, Ordering::Relaxed);
    let imports = importer
        .join()
        .map_err(|_| anyhow::anyhow!("the import thread panicked"))??;
    let (during, more) = during?;
    errs.extend(more);
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let figures = vec![
        idle[0],
        idle[1],
        during[0],
        during[1],
        f64::from(imports),
        errs.len() as f64,
    ];
    Ok((figures, errs))
}

/// Scenarios 2 and 5: figures screenings/s, ok %, peak memory MiB (all),
/// peak front MiB, peak smtpd processes, p50 ms.
fn new_round(n: &BenchNet, server: &Server) -> Result<(Vec<f64>, Vec<String>)> {
    let dst_for = |ip: &IpAddr| {
        if ip.is_ipv4() {
            SocketAddr::new(SERVER_V4.into(), PORT)
        } else {
            SocketAddr::new(SERVER_V6.into(), PORT)
        }
    };
    let clients: Vec<(IpAddr, SocketAddr)> = fresh(NEW_CLIENTS)
        .into_iter()
        .map(|a| (a, dst_for(&a)))
        .collect();
    let peak = Peak::start(server);
    let t0 = Instant::now();
    let (lat, errs) = in_clients(n, move || {
        Box::pin(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(NEW_CONCURRENCY));
            let mut tasks = tokio::task::JoinSet::new();
            for (src, dst) in clients {
                let permit = sem.clone().acquire_owned().await.expect("semaphore");
                tasks.spawn(async move {
                    let r = tokio::time::timeout(TIMEOUT, visit(Some(src), dst, true)).await;
                    drop(permit);
                    match r {
                        Ok(Ok((d, _))) => Ok(d),
                        Ok(Err(e)) => Err(format!("{e:#}")),
                        Err(_) => Err("timed out".into()),
                    }
                });
            }
            let mut lat = Vec::new();
            let mut errs = Vec::new();
            while let Some(r) = tasks.join_next().await {
                match r {
                    Ok(Ok(d)) => lat.push(d),
                    Ok(Err(e)) => errs.push(e),
                    Err(e) => errs.push(e.to_string()),
                }
            }
            (lat, errs)
        })
    })?;
    let elapsed = t0.elapsed().as_secs_f64();
    let (all, front, smtpd) = peak.finish();
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let (ok, total) = (lat.len() as f64, f64::from(NEW_CLIENTS));
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let smtpd = smtpd as f64;
    let p50 = report::quantile(&lat, 0.5).map_or(f64::NAN, report::ms);
    Ok((
        vec![
            ok / elapsed,
            100.0 * ok / total,
            mib(all),
            mib(front),
            smtpd,
            p50,
        ],
        errs,
    ))
}

/// Scenario 3: figures held, front MiB, all MiB, front CPU %/s, all CPU %.
fn horde_round(n: &BenchNet, server: &Server) -> Result<(Vec<f64>, Vec<String>)> {
    let clients = fresh(HORDE);
    let dst = SocketAddr::new(SERVER_V6.into(), PORT);
    let hold_for = Duration::from_secs(5);
    let measure = Arc::new(std::sync::Mutex::new(None::<(u32, u64, u64, f64, f64)>));
    let m2 = measure.clone();
    let master = server.postfix.pid();
    let daemon = server.screener.as_ref().map(Screener::pid);
    let (errs,) = in_clients(n, move || {
        Box::pin(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for (i, src) in clients.into_iter().enumerate() {
                tasks.spawn(async move { hold(src, dst).await.map_err(|e| format!("{e:#}")) });
                // About 2,000 new connections a second, so the listen
                // queue never overflows into SYN cookies.
                if i % 100 == 99 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            let mut held = Vec::new();
            let mut errs = Vec::new();
            while let Some(r) = tasks.join_next().await {
                match r {
                    Ok(Ok(s)) => held.push(s),
                    Ok(Err(e)) => errs.push(e),
                    Err(e) => errs.push(e.to_string()),
                }
            }
            // All connected and in the greet wait: measure while idle.
            let front_pids = front_pids(master, daemon);
            let front_cpu =
                |pids: &[i32]| -> Duration { pids.iter().map(|p| cpu::own_time(*p)).sum() };
            let all_cpu = || cpu::tree_time(master) + daemon.map_or(Duration::ZERO, cpu::tree_time);
            let (f0, a0, t0) = (front_cpu(&front_pids), all_cpu(), Instant::now());
            tokio::time::sleep(hold_for).await;
            let secs = t0.elapsed().as_secs_f64();
            let f = (front_cpu(&front_pids).saturating_sub(f0)).as_secs_f64() / secs * 100.0;
            let a = (all_cpu().saturating_sub(a0)).as_secs_f64() / secs * 100.0;
            let front_mem: u64 = front_pids.iter().map(|p| cpu::pss(*p)).sum();
            let all_mem = cpu::tree_pss(master) + daemon.map_or(0, cpu::pss);
            *m2.lock().expect("lock") = Some((
                u32::try_from(held.len()).unwrap_or(u32::MAX),
                front_mem,
                all_mem,
                f,
                a,
            ));
            drop(held);
            (errs,)
        })
    })?;
    let (held, front, all, fcpu, acpu) = measure
        .lock()
        .expect("lock")
        .context("the horde never measured")?;
    Ok((
        vec![f64::from(held), mib(front), mib(all), fcpu, acpu],
        errs,
    ))
}

struct Opts {
    rounds: usize,
    scenarios: Vec<Scenario>,
}

fn opts() -> Result<Opts> {
    let mut o = Opts {
        rounds: 5,
        scenarios: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => {
                o.rounds = args
                    .next()
                    .and_then(|x| x.parse().ok())
                    .context("--rounds needs a number")?;
            }
            "fast" => o.scenarios.push(Scenario::Fast),
            "new" => o.scenarios.push(Scenario::New),
            "horde" => o.scenarios.push(Scenario::Horde),
            "dnsbl" => o.scenarios.push(Scenario::Dnsbl),
            "import" => o.scenarios.push(Scenario::Import),
            "metrics" => o.scenarios.push(Scenario::Metrics),
            other => bail!("unknown argument {other:?}; usage: bench_smtp [--rounds N] [fast] [new] [horde] [dnsbl] [import] [metrics]"),
        }
    }
    if o.scenarios.is_empty() {
        o.scenarios = vec![
            Scenario::Fast,
            Scenario::New,
            Scenario::Horde,
            Scenario::Dnsbl,
            Scenario::Import,
            Scenario::Metrics,
        ];
    }
    if o.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    Ok(o)
}

fn warm(n: &BenchNet) -> Result<()> {
    // The well-behaved client's first visit takes the greet wait; after
    // that it is on the temporary allowlist.
    let dst = SocketAddr::new(SERVER_V4.into(), PORT);
    in_clients(n, move || {
        Box::pin(async move { visit(None, dst, true).await.map(|_| ()) })
    })?
    .with_context(|| format!("the first visit of {GOOD_V4}"))
}

/// Where the daemon serves its metrics in scenario 7, inside the server
/// namespace.
const METRICS_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 9325);

/// Scrapes timed back to back for the cost of one.
const SCRAPES_TIMED: u32 = 300;

/// Scrapes `addr` inside namespace `ns` once a second until `stop`,
/// parsing each answer strictly; returns (scrapes, failures).
fn scraper(
    ns: &str,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u32, u32)> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        sys::on_netns_thread(&ns, move || {
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let next = Instant::now() + Duration::from_secs(1);
                let (status, _, body) = integration_tests::openmetrics::get(addr, "/metrics");
                let parsed = integration_tests::openmetrics::parse(&body);
                if status.ends_with("200 OK") && parsed.is_ok() {
                    ok += 1;
                } else {
                    failed += 1;
                }
                while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            (ok, failed)
        })
        .join()
        .ok()
        .and_then(Result::ok)
        .unwrap_or((0, 0))
    })
}

/// Scenario 7, one round of one variant: figures screenings/s, completed
/// %, daemon CPU % of one core over the round, daemon peak RSS MiB,
/// scrapes answered, daemon CPU ms per scrape.
fn metrics_round(n: &BenchNet, on: bool) -> Result<(Vec<f64>, Vec<String>)> {
    let addr = SocketAddr::from(METRICS_ADDR);
    // The maps loaded (attached nowhere), as in production: a scrape reads
    // the per-CPU counters and the map fill.
    let server = Server::start(
        System::Screener,
        n,
        GREET_WAIT_S,
        1_000,
        false,
        true,
        on.then_some(addr),
    )?;
    let daemon = server.screener.as_ref().context("no daemon")?.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let rss = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(cpu::rss(daemon));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };
    let scrapes = on.then(|| scraper(&n.server_ns, addr, stop.clone()));
    let (cpu0, t0) = (cpu::tree_time(daemon), Instant::now());
    let (figs, errs) = new_round(n, &server)?;
    let cpu =
        cpu::tree_time(daemon).saturating_sub(cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let peak = rss.join().unwrap_or(0);
    let (ok, failed) = scrapes.map_or((0, 0), |h| h.join().unwrap_or((0, 0)));
    let mut errs = errs;
    if failed > 0 {
        errs.push(format!("{failed} scrapes failed"));
    }
    // The cost of one scrape on its own: back to back, the daemon idle
    // after the round, its maps and counters filled.
    let per_scrape = if on {
        let c0 = cpu::tree_time(daemon);
        sys::on_netns_thread(&n.server_ns, move || {
            for _ in 0..SCRAPES_TIMED {
                let (_, _, body) = integration_tests::openmetrics::get(addr, "/metrics");
                assert!(body.ends_with("# EOF\n"), "a scrape was cut short");
            }
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the scraping thread panicked"))??;
        cpu::tree_time(daemon).saturating_sub(c0).as_secs_f64() * 1000.0 / f64::from(SCRAPES_TIMED)
    } else {
        0.0
    };
    drop(server);
    Ok((
        vec![
            figs[0],
            figs[1],
            100.0 * cpu,
            mib(peak),
            f64::from(ok),
            per_scrape,
        ],
        errs,
    ))
}

/// Scenario 7: metrics off and on, alternating which goes first.
fn metrics_scenario(n: &BenchNet, o: &Opts) -> Result<String> {
    let (mut off, mut on) = (Row::default(), Row::default());
    for i in 0..o.rounds {
        let order = if i % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for variant in order {
            let (figs, errs) = metrics_round(n, variant)?;
            eprintln!(
                "    round {} metrics {}: {figs:?}{}",
                i + 1,
                if variant { "on" } else { "off" },
                errs.first()
                    .map(|e| format!(" ({} failed, e.g. {e})", errs.len()))
                    .unwrap_or_default()
            );
            let row = if variant { &mut on } else { &mut off };
            for e in errs {
                if row.failures.len() < 3 && !row.failures.contains(&e) {
                    row.failures.push(e);
                }
            }
            row.push(figs);
        }
    }
    let cols = [
        "screenings/s",
        "completed %",
        "daemon CPU % (one core)",
        "daemon peak RSS MiB",
        "scrapes",
        "daemon CPU ms per scrape (300 back to back)",
    ];
    let mut head = vec!["metrics"];
    head.extend_from_slice(&cols);
    let mut table = Table::new(&head);
    for (name, row) in [("off", &off), ("on, scraped every 1 s", &on)] {
        let mut cells = vec![name.to_owned()];
        cells.extend((0..cols.len()).map(|i| cell(row.spread(i))));
        table.row(cells);
    }
    let median = |r: &Row, i| r.spread(i).map(|s| s.median);
    let mut cells = vec!["on ÷ off".to_owned()];
    cells.extend(
        (0..cols.len()).map(|i| match (median(&on, i), median(&off, i)) {
            (Some(a), Some(b)) if b != 0.0 => format!("{}×", report::num(a / b)),
            _ => "n/a".into(),
        }),
    );
    table.row(cells);
    let mut out = format!(
        "7. Metrics: scenario 2 for the screener alone ({NEW_CLIENTS} first-time clients, {NEW_CONCURRENCY} at once, XDP maps loaded), metrics.listen off and on with a strict scrape every second; rounds alternate which goes first\n\n{}",
        table.render()
    );
    for (name, row) in [("off", &off), ("on", &on)] {
        if !row.failures.is_empty() {
            let _ = writeln!(
                out,
                "\nFailures with metrics {name}: {}",
                row.failures.join("; ")
            );
        }
    }
    Ok(out)
}

fn run_scenario(n: &BenchNet, sc: Scenario, o: &Opts) -> Result<String> {
    if sc == Scenario::Metrics {
        return metrics_scenario(n, o);
    }
    let mut rows: Vec<(System, Row)> = Vec::new();
    // postscreen has no list import: the re-import scenario's baseline is
    // the screener's own idle fast path, measured in the same round.
    let systems: &[System] = if sc == Scenario::Import {
        &[System::Screener]
    } else {
        &[System::Screener, System::Postscreen]
    };
    for &system in systems {
        let (wait, limit, dnsbl) = match sc {
            Scenario::Horde => (HORDE_WAIT_S, HORDE + 1_000, false),
            Scenario::Dnsbl => (GREET_WAIT_S, 1_000, true),
            _ => (GREET_WAIT_S, 1_000, false),
        };
        eprintln!("==> {sc:?}: {}", system.title());
        let server = Server::start(system, n, wait, limit, dnsbl, sc == Scenario::Import, None)?;
        if matches!(sc, Scenario::Fast | Scenario::Import) {
            warm(n)?;
        }
        let mut row = Row::default();
        for i in 0..o.rounds {
            let (figs, errs) = match sc {
                Scenario::Fast => fast_round(n)?,
                Scenario::New | Scenario::Dnsbl => new_round(n, &server)?,
                Scenario::Horde => horde_round(n, &server)?,
                Scenario::Import => import_round(n, &server)?,
                Scenario::Metrics => unreachable!("run by metrics_scenario"),
            };
            eprintln!(
                "    round {}: {figs:?}{}",
                i + 1,
                errs.first()
                    .map(|e| format!(" ({} failed, e.g. {e})", errs.len()))
                    .unwrap_or_default()
            );
            for e in errs {
                if row.failures.len() < 3 && !row.failures.contains(&e) {
                    row.failures.push(e);
                }
            }
            row.push(figs);
        }
        rows.push((system, row));
        drop(server);
    }
    Ok(render(sc, &rows))
}

fn ratio(rows: &[(System, Row)], i: usize) -> String {
    let m = |s: System| {
        rows.iter()
            .find(|r| r.0 == s)
            .and_then(|r| r.1.spread(i))
            .map(|s| s.median)
    };
    match (m(System::Screener), m(System::Postscreen)) {
        (Some(a), Some(b)) if b != 0.0 => format!("{}×", report::num(a / b)),
        _ => "n/a".into(),
    }
}

fn render(sc: Scenario, rows: &[(System, Row)]) -> String {
    let (title, cols): (String, &[&str]) = match sc {
        Scenario::Metrics => unreachable!("rendered by metrics_scenario"),
        Scenario::Fast => (
            format!("1. Fast path: {FAST_SESSIONS} sequential visits per round by a client on the temporary allowlist, connect → the backend's 220"),
            &["p50 ms", "p99 ms", "failed"],
        ),
        Scenario::New => (
            format!("2. New clients: {NEW_CLIENTS} first-time clients per round, {NEW_CONCURRENCY} at once, greet wait {GREET_WAIT_S} s, each waits for the backend's 220 and quits"),
            &["screenings/s", "completed %", "peak memory MiB (all processes, PSS)", "peak MiB (screening front)", "peak smtpd processes", "p50 connect → 220 ms"],
        ),
        Scenario::Horde => (
            format!("3. Idle horde: {HORDE} concurrent first-time clients in a {HORDE_WAIT_S} s greet wait, measured over 5 s once all are connected"),
            &["clients held", "front MiB (PSS)", "all processes MiB (PSS)", "front CPU %", "all processes CPU %"],
        ),
        Scenario::Dnsbl => (
            "5. DNSBL: scenario 2 with three DNSBL/DNSWL sites served by rbldnsd (threshold 2)".to_owned(),
            &["screenings/s", "completed %", "peak memory MiB (all processes, PSS)", "peak MiB (screening front)", "peak smtpd processes", "p50 connect → 220 ms"],
        ),
        Scenario::Import => (
            format!("6. Re-import: scenario 1 idle, then while a {IMPORT_LINES}-line list is imported in a loop (each import after the run's first replaces half of it; XDP maps loaded)"),
            &["p50 ms idle", "p99 ms idle", "p50 ms during re-import", "p99 ms during re-import", "re-imports", "failed"],
        ),
    };
    let mut head = vec!["system"];
    head.extend_from_slice(cols);
    let mut t = Table::new(&head);
    for (system, row) in rows {
        let mut cells = vec![system.title().to_owned()];
        cells.extend((0..cols.len()).map(|i| cell(row.spread(i))));
        t.row(cells);
    }
    if sc == Scenario::Import {
        let m = |i| rows[0].1.spread(i).map(|s| s.median);
        let r = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b != 0.0 => format!("{}×", report::num(a / b)),
            _ => "n/a".into(),
        };
        t.row(vec![
            "during ÷ idle".to_owned(),
            String::new(),
            String::new(),
            r(m(2), m(0)),
            r(m(3), m(1)),
            String::new(),
            String::new(),
        ]);
    } else {
        let mut cells = vec!["screener ÷ postscreen".to_owned()];
        cells.extend((0..cols.len()).map(|i| ratio(rows, i)));
        t.row(cells);
    }
    let mut out = format!("{title}\n\n{}", t.render());
    for (system, row) in rows {
        if !row.failures.is_empty() {
            let _ = writeln!(
                out,
                "\nFailures under {}: {}",
                system.title(),
                row.failures.join("; ")
            );
        }
    }
    out
}

fn run() -> Result<()> {
    let o = opts()?;
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the SMTP benchmark creates network namespaces: run it as root");
    }
    sys::raise_nofile(400_000)?;
    sys::become_subreaper()?;
    eprintln!("bench smtp: {}", report::machine());
    let n = BenchNet::new().context("creating the benchmark namespaces")?;
    let mut out = format!("Cells: median (min–max) over {} rounds.\n", o.rounds);
    for &sc in &o.scenarios {
        let s = run_scenario(&n, sc, &o)?;
        eprintln!("{s}");
        out.push('\n');
        out.push_str(&s);
    }
    print!("{out}");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench smtp: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
