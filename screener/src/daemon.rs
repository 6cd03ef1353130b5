//! `screener run`: owns the XDP gate and serves the admin socket.
//!
//! The daemon is the only writer of the kernel maps: every `block` and
//! `allow` change arrives over the admin socket and is applied here, with
//! its `BLOCK` / `UNBLOCK` log line.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::FutureExt as _;
use ipnet::IpNet;
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    admin::{self, Reply, Request, Response},
    config::{self, Config},
    dnsbl::{self, Dnsbl, DnsblOptions, SiteSpec},
    import, smtp,
    store::Store,
    verdict::{self, VerdictError, Verdicts},
    xdp::{self, Gate},
};

mod listing;

use listing::Listing;

/// How often expired kernel entries are swept out.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// State shared by the admin handler and the background tasks.
pub struct Daemon {
    /// Blocks and allows, kernel and store; also holds the configuration.
    verdicts: Arc<Verdicts>,
    /// The SMTP screening server, for its counters and reloads.
    smtp: smtp::Server,
    /// The DNSBL engine, for its counters (`None` without sites); replaced
    /// when a reload changes the lists or the resolver.
    dnsbl: RwLock<Option<Dnsbl>>,
    /// Where the configuration came from, for SIGHUP.
    cfg_path: PathBuf,
    /// Started with `--no-xdp`: block and allow changes only reach the
    /// store, and the CLI says so.
    no_xdp: bool,
    /// For `uptime_secs` in `stats`.
    started: Instant,
    /// The watcher of each configured import list, so a reload starts the
    /// new, stops the removed and leaves the unchanged ones running.
    importers: Mutex<Vec<(config::ImportList, tokio::task::JoinHandle<()>)>>,
    /// Configurations applied since start (0 = the one started with), so
    /// `stats` says which is in force.
    generation: AtomicU64,
    /// Keys whose new values wait for a restart, as the last reload found
    /// them; shown in `stats` so "reloaded" never hides "not applied".
    restart_pending: Mutex<Vec<&'static str>>,
    /// The task draining the program's log ring buffer; replaced with the
    /// program when a reload loads a new instance.
    xdp_logger: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Returns freed heap memory to the system after a large operation:
/// glibc keeps what a listing or an import of a million entries freed,
/// and the daemon would otherwise stay that big.
pub fn give_back_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A TTL from an admin request, bounded as the CLI bounds it: a client
/// other than the CLI must not wrap an expiry around to the past.
fn admin_ttl(ttl: Option<u64>) -> Result<Option<Duration>, String> {
    match ttl.map(Duration::from_secs) {
        Some(t) if t.is_zero() || t > crate::duration::MAX => Err(format!(
            "ttl {}s is outside 1s..={}s",
            t.as_secs(),
            crate::duration::MAX.as_secs()
        )),
        t => Ok(t),
    }
}

/// Parses every CIDR first, so one bad value changes nothing.
pub fn parse_nets(nets: &[String]) -> Result<Vec<IpNet>, String> {
    if nets.is_empty() {
        return Err("no CIDR given".into());
    }
    nets.iter()
        .map(|n| config::parse_net(n).map_err(|e| format!("bad CIDR: {e}")))
        .collect()
}

#[derive(Serialize)]
struct DaemonStats {
    uptime_secs: u64,
    /// True only when every configured interface runs the program now.
    xdp_attached: bool,
    /// Configurations applied since start: 0 until the first reload.
    config_generation: u64,
    /// Keys changed in the file that take effect only on restart.
    config_restart_pending: Vec<&'static str>,
    /// Each configured interface as the kernel sees it (none without XDP).
    xdp_interfaces: Vec<xdp::InterfaceStatus>,
    #[serde(flatten)]
    verdicts: verdict::CountersSnapshot,
}

#[derive(Serialize)]
struct Stats {
    kernel: Option<xdp::maps::KernelStats>,
    daemon: DaemonStats,
    store: crate::store::StoreHealth,
    smtp: smtp::SmtpStats,
    dnsbl: Option<dnsbl::DnsblStats>,
}

/// Where a block/allow change went, so the CLI never says "blocked" when
/// nothing reached a kernel.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum Kernel {
    /// Into the kernel maps and the store.
    Attached,
    /// Into the store only: `xdp detach` removed the gate under the running
    /// daemon; the entries reach the kernel when it is loaded again.
    Detached,
    /// Into the store only: the daemon runs with `--no-xdp`.
    NoXdp,
}

/// The answer to `block add|del`, `allow add|del`.
#[derive(Serialize)]
struct Changed {
    /// The networks changed.
    nets: Vec<String>,
    /// Whether the change reached a kernel.
    kernel: Kernel,
}

#[derive(Serialize)]
struct ImportReport {
    list: String,
    lines_ok: usize,
    lines_bad: usize,
    errors: Vec<String>,
    added: usize,
    removed: usize,
    kept: usize,
    shadowed: usize,
}

impl Daemon {
    fn cfg(&self) -> Arc<Config> {
        self.verdicts.cfg()
    }

    /// Handles one admin request.
    pub async fn handle(self: Arc<Self>, req: Request) -> Reply {
        let listing = match req {
            Request::BlockList => Listing::Blocks,
            Request::AllowList => Listing::Allows,
            Request::CacheList => Listing::Cache,
            other => {
                return Reply::One(match self.dispatch(other).await {
                    Ok(v) => Response::ok(v),
                    Err(e) => Response::err(e),
                })
            }
        };
        Reply::Rows(listing::start(self.verdicts.clone(), listing))
    }

    async fn dispatch(&self, req: Request) -> Result<serde_json::Value, String> {
        let v = &self.verdicts;
        let err = |e: VerdictError| e.to_string();
        match req {
            Request::BlockAdd { nets, ttl, reason } => {
                let parsed = parse_nets(&nets)?;
                v.block_manual(&parsed, admin_ttl(ttl)?, reason.as_deref())
                    .await
                    .map_err(err)?;
                Ok(self.changed(&parsed))
            }
            Request::BlockDel { nets } => {
                let parsed = parse_nets(&nets)?;
                v.unblock(&parsed, "operator").await.map_err(err)?;
                Ok(self.changed(&parsed))
            }
            Request::AllowAdd { nets } => {
                let parsed = parse_nets(&nets)?;
                v.allow(&parsed).await.map_err(err)?;
                self.refresh_smtp(&v.cfg());
                Ok(self.changed(&parsed))
            }
            Request::AllowDel { nets } => {
                let parsed = parse_nets(&nets)?;
                v.unallow(&parsed).await.map_err(err)?;
                self.refresh_smtp(&v.cfg());
                Ok(self.changed(&parsed))
            }
            Request::Stats => Ok(json(self.stats())),
            Request::XdpStatus => {
                let cfg = self.cfg();
                let held = v.with_gate(|g| g.interfaces());
                Ok(json(
                    xdp::status(&cfg.xdp.pin_path, &cfg.xdp.interfaces).seen_by(held),
                ))
            }
            Request::XdpDetach => {
                drop(v.take_gate());
                let removed = xdp::detach(&self.cfg().xdp.pin_path).map_err(|e| e.to_string())?;
                tracing::info!("XDP detached on request: {}", removed.join(", "));
                Ok(json(removed))
            }
            Request::CacheShow { ip } => {
                let ip: IpAddr = ip.parse().map_err(|_| format!("bad address {ip:?}"))?;
                let rec = v.store().client(ip).await.map_err(|e| e.to_string())?;
                rec.map(json)
                    .ok_or_else(|| format!("{ip} is not in the cache"))
            }
            Request::CachePurge { ip } => {
                let n = match ip {
                    Some(ip) => {
                        let ip: IpAddr = ip.parse().map_err(|_| format!("bad address {ip:?}"))?;
                        usize::from(
                            v.store()
                                .delete_client(ip)
                                .await
                                .map_err(|e| e.to_string())?,
                        )
                    }
                    None => v.store().purge_clients().await.map_err(|e| e.to_string())?,
                };
                Ok(json(serde_json::json!({ "purged": n })))
            }
            Request::Import {
                file,
                format,
                ttl,
                reason,
            } => self.import(&file, &format, ttl, reason).await,
            Request::BlockList | Request::AllowList | Request::CacheList => {
                Err("listings are streamed".into())
            }
        }
    }

    /// The answer to a block/allow change: the networks, and whether the
    /// change reached a kernel (see [`Changed`]).
    fn changed(&self, nets: &[IpNet]) -> serde_json::Value {
        let kernel = if self.verdicts.with_gate(|_| ()).is_some() {
            Kernel::Attached
        } else if self.no_xdp {
            Kernel::NoXdp
        } else {
            Kernel::Detached
        };
        json(Changed {
            nets: names(nets),
            kernel,
        })
    }

    async fn import(
        &self,
        file: &std::path::Path,
        format: &str,
        ttl: Option<u64>,
        reason: Option<String>,
    ) -> Result<serde_json::Value, String> {
        let format: import::Format = format.parse()?;
        // Read line by line on the blocking pool: the file is never held
        // whole, and a big one does not occupy a runtime worker.
        let path = file.to_owned();
        let parsed = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&path)?;
            import::parse_reader(std::io::BufReader::new(f), format)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("reading {}: {e}", file.display()))?;
        let list = reason.unwrap_or_else(|| {
            config::ImportList {
                file: file.to_owned(),
                format: String::new(),
                name: None,
                interval: Duration::ZERO,
            }
            .list_name()
        });
        for (line, e) in parsed.errors.iter().take(20) {
            tracing::warn!(list = %list, "{}:{line}: {e}; line skipped", file.display());
        }
        let lines_ok = parsed.nets.len();
        let change = self
            .verdicts
            .import(&list, parsed.nets, admin_ttl(ttl)?)
            .await
            .map_err(|e| e.to_string())?;
        Ok(json(ImportReport {
            list,
            lines_ok,
            lines_bad: parsed.bad,
            errors: parsed
                .errors
                .iter()
                .take(20)
                .map(|(l, e)| format!("line {l}: {e}"))
                .collect(),
            added: change.added,
            removed: change.removed,
            kept: change.kept,
            shadowed: change.shadowed,
        }))
    }

    /// Gives the SMTP server `cfg` with every allow entry as a `permit`
    /// rule ahead of the access list: allowed sources skip all tests.
    fn refresh_smtp(&self, cfg: &Arc<Config>) {
        self.smtp.reload(with_allows(cfg, &self.verdicts));
    }

    /// Imports a configured list at start and again whenever its file
    /// changes.
    async fn watch_list(&self, list: config::ImportList) {
        let mut imported_at = None;
        loop {
            let mtime = tokio::fs::metadata(&list.file)
                .await
                .and_then(|m| m.modified());
            match mtime {
                Ok(m) if imported_at != Some(m) => {
                    let name = list.list_name();
                    match self
                        .import(&list.file, &list.format, None, Some(name.clone()))
                        .await
                    {
                        Ok(_) => imported_at = Some(m),
                        Err(e) => {
                            let file = list.file.display();
                            tracing::warn!(list = %name, "import of {file} failed: {e}");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("import list {}: {e}", list.file.display()),
            }
            tokio::time::sleep(list.interval).await;
        }
    }

    fn stats(&self) -> Stats {
        let kernel = self.verdicts.with_gate(|g| g.maps.stats()).and_then(|r| {
            r.map_err(|e| tracing::warn!("reading kernel counters: {e}"))
                .ok()
        });
        Stats {
            store: self.verdicts.store().health(),
            smtp: self.smtp.stats(),
            dnsbl: self
                .dnsbl
                .read()
                .expect("dnsbl lock")
                .as_ref()
                .map(Dnsbl::stats),
            daemon: DaemonStats {
                uptime_secs: self.started.elapsed().as_secs(),
                xdp_attached: self
                    .verdicts
                    .with_gate(|g| g.attached_everywhere())
                    .unwrap_or(false),
                xdp_interfaces: self
                    .verdicts
                    .with_gate(|g| g.interfaces())
                    .unwrap_or_default(),
                config_generation: self.generation.load(Ordering::Relaxed),
                config_restart_pending: self.restart_pending.lock().expect("restart lock").clone(),
                verdicts: self.verdicts.counters(),
            },
            kernel,
        }
    }

    /// SIGHUP: applies a new configuration. Everything that can fail (the
    /// file, the DNSBL engine) is built first, so a bad file or site changes
    /// nothing; then every group is applied: screening parameters, DNSBL
    /// lists and resolver, import lists, listeners, XDP interfaces, ports
    /// and log level. A key that needs a restart is named in a warning and
    /// in `stats`.
    async fn reload(self: &Arc<Self>) {
        let path = self.cfg_path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
        let new = match loaded {
            Ok(Ok(c)) => Arc::new(c),
            Ok(Err(e)) => {
                tracing::error!("reload refused, keeping the running configuration: {e}");
                return;
            }
            Err(e) => {
                tracing::error!("reload refused: {e}");
                return;
            }
        };
        new.log_warnings();
        crate::local::refresh();
        let old = self.cfg();
        let dnsbl_changed = dnsbl_inputs(&old) != dnsbl_inputs(&new);
        let dnsbl = if dnsbl_changed {
            match build_dnsbl(&new) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::error!("reload refused, keeping the running configuration: {e:#}");
                    return;
                }
            }
        } else {
            None
        };
        let pending = restart_keys(&old, &new);
        if !pending.is_empty() {
            tracing::warn!(
                "reload: {} changed but take effect only on restart; the running values stay",
                pending.join(", ")
            );
        }
        *self.restart_pending.lock().expect("restart lock") = pending;

        self.reload_xdp(&old, &new).await;
        self.verdicts.set_cfg(new.clone());
        if let Some(d) = dnsbl {
            self.swap_dnsbl(d);
        }
        self.refresh_smtp(&new);
        for e in self.smtp.apply_listen(&new.smtp.listen) {
            tracing::error!("reload: {e}; the other listeners are in force");
        }
        self.reload_imports(&new.import.lists);
        let n = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(config = %self.cfg_path.display(), generation = n, "configuration reloaded");
    }

    /// Puts a newly built DNSBL engine in force, for the SMTP sessions and
    /// the counters; the old one's health checks end with it.
    fn swap_dnsbl(&self, dnsbl: Option<Dnsbl>) {
        if let Some(d) = &dnsbl {
            d.spawn_health_checks();
        }
        self.smtp.set_dnsbl(lookup(dnsbl.as_ref(), &self.verdicts));
        let sites = dnsbl.as_ref().map_or(0, |d| d.stats().sites.len());
        *self.dnsbl.write().expect("dnsbl lock") = dnsbl;
        tracing::info!(sites, "DNSBL engine rebuilt");
    }

    /// Applies `xdp.*` changes: ports at once; interfaces, mode and log
    /// level by loading a new program instance on the pinned maps and
    /// swapping it into the links, as a restart does (no gap, no entry
    /// lost). Without a gate (`--no-xdp`, after `xdp detach`) nothing here
    /// applies.
    async fn reload_xdp(&self, old: &Config, new: &Arc<Config>) {
        if self.verdicts.with_gate(|_| ()).is_none() {
            return;
        }
        if new.xdp.ports != old.xdp.ports {
            let ports = match &new.xdp.ports {
                config::Ports::All => None,
                config::Ports::List(p) => Some(p.clone()),
            };
            if let Some(Err(e)) = self
                .verdicts
                .with_gate(|g| g.maps.configure(g.maps.ipv6_prefix(), ports.as_deref()))
            {
                tracing::error!("reload: applying xdp.ports: {e}");
            }
        }
        if new.xdp.interfaces == old.xdp.interfaces
            && new.xdp.mode == old.xdp.mode
            && new.xdp.log_level == old.xdp.log_level
        {
            return;
        }
        let cfg = new.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let mut gate = Gate::reload(&cfg)?;
            gate.attach()?;
            Ok::<_, xdp::XdpError>(gate)
        });
        match opened.await {
            Ok(Ok(mut gate)) => {
                let logger = gate.spawn_logger();
                self.verdicts.replace_gate(gate);
                if let Some(old) =
                    std::mem::replace(&mut *self.xdp_logger.lock().expect("logger lock"), logger)
                {
                    old.abort();
                }
            }
            Ok(Err(e)) => tracing::error!(
                "reload: applying xdp.interfaces/mode/log_level: {e}; the gate stays as it was"
            ),
            Err(e) => tracing::error!("reload: XDP: {e}"),
        }
    }

    /// Starts watchers for new import lists, stops those of lists no
    /// longer configured (their entries leave the kernel and the store),
    /// leaves unchanged ones alone.
    fn reload_imports(self: &Arc<Self>, lists: &[config::ImportList]) {
        let mut running = self.importers.lock().expect("importers lock");
        let mut kept = Vec::new();
        for (list, task) in running.drain(..) {
            if lists.contains(&list) {
                kept.push((list, task));
                continue;
            }
            task.abort();
            let name = list.list_name();
            if !lists.iter().any(|l| l.list_name() == name) {
                let d = Arc::clone(self);
                tokio::spawn(async move {
                    match d.verdicts.import(&name, Vec::new(), None).await {
                        Ok(c) => tracing::info!(
                            list = %name,
                            removed = c.removed,
                            "import list no longer configured: its entries are removed"
                        ),
                        Err(e) => {
                            tracing::warn!(list = %name, "removing an unconfigured import list: {e}");
                        }
                    }
                });
            }
        }
        for list in lists {
            if !kept.iter().any(|(l, _)| l == list) {
                kept.push((list.clone(), self.spawn_importer(list.clone())));
            }
        }
        *running = kept;
    }

    fn spawn_importer(self: &Arc<Self>, list: config::ImportList) -> tokio::task::JoinHandle<()> {
        let d = Arc::clone(self);
        tokio::spawn(async move { d.watch_list(list).await })
    }
}

/// The settings the DNSBL engine is built from: a change in any of them
/// means a new engine.
fn dnsbl_inputs(c: &Config) -> impl PartialEq + '_ {
    let s = &c.screen;
    (
        &s.dnsbl_sites,
        &c.dns.nameservers,
        s.dnsbl_timeout,
        s.dnsbl_min_ttl,
        s.dnsbl_max_ttl,
        &s.dnsbl_reply_map,
        s.dnsbl_health_interval,
        &s.dnsbl_health_skip,
    )
}

/// The keys that differ between `old` and `new` but apply only on restart.
fn restart_keys(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |changed: bool, key: &'static str| {
        if changed {
            keys.push(key);
        }
    };
    check(
        new.verdict.ipv6_prefix != old.verdict.ipv6_prefix,
        "verdict.ipv6_prefix",
    );
    check(new.xdp.pin_path != old.xdp.pin_path, "xdp.pin_path");
    check(new.xdp.max_hosts != old.xdp.max_hosts, "xdp.max_hosts");
    check(
        new.xdp.max_prefixes != old.xdp.max_prefixes,
        "xdp.max_prefixes",
    );
    check(new.xdp.max_allows != old.xdp.max_allows, "xdp.max_allows");
    check(new.store.path != old.store.path, "store.path");
    check(new.admin.socket != old.admin.socket, "admin.socket");
    keys
}

fn names(nets: &[IpNet]) -> Vec<String> {
    nets.iter().map(ToString::to_string).collect()
}

fn json(v: impl Serialize) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Runs the daemon until SIGTERM or SIGINT. The XDP gate stays attached
/// when it exits: only `screener xdp detach` opens it.
pub async fn run(cfg: Config, cfg_path: PathBuf, no_xdp: bool) -> anyhow::Result<()> {
    let store_path = cfg.store.path.clone();
    let (store, census) = tokio::task::spawn_blocking(move || Store::open_census(&store_path))
        .await?
        .context("opening the store")?;
    tracing::info!(store = %store.path().display(), "store opened: {census}");
    let cache_unreadable = census.tables.first().map_or(0, |t| t.unreadable.len());
    if cache_unreadable > 0 {
        tracing::warn!(
            store = %store.path().display(),
            "{cache_unreadable} cache records do not decode; those clients are screened again"
        );
    }
    let mut xdp_logger = None;
    let gate = if no_xdp {
        tracing::info!("running without XDP (--no-xdp)");
        None
    } else {
        // Loaded, not yet attached: the maps are filled from the store first.
        let mut gate = Gate::load(&cfg).context("loading the XDP gate")?;
        xdp_logger = gate.spawn_logger();
        Some(gate)
    };
    let listener = admin::bind(&cfg.admin.socket)
        .await
        .context("opening the admin socket")?;
    let socket = cfg.admin.socket.clone();
    let store_retry = store.spawn_retry();
    let verdicts = Arc::new(Verdicts::new(Arc::new(cfg), store, gate));
    restore(&verdicts).await;
    if let Some(Err(e)) = verdicts.with_gate(Gate::attach) {
        let _ = std::fs::remove_file(&socket);
        return Err(e).context("attaching the XDP gate");
    }
    let cfg = verdicts.cfg();
    cfg.log_warnings();
    crate::local::refresh();
    let dnsbl = build_dnsbl(&cfg)?;
    if let Some(d) = &dnsbl {
        d.spawn_health_checks();
    }
    let failures = Arc::new(smtp::FailureQueue::default());
    let server = smtp::Server::new(
        with_allows(&cfg, &verdicts),
        Some(verdicts.store().clone()),
        lookup(dnsbl.as_ref(), &verdicts),
        Some(failures.clone()),
    );
    let daemon = Arc::new(Daemon {
        verdicts: verdicts.clone(),
        smtp: server.clone(),
        dnsbl: RwLock::new(dnsbl),
        cfg_path,
        no_xdp,
        started: Instant::now(),
        importers: Mutex::new(Vec::new()),
        generation: AtomicU64::new(0),
        restart_pending: Mutex::new(Vec::new()),
        xdp_logger: Mutex::new(xdp_logger),
    });
    let v = verdicts.clone();
    let queue = failures.clone();
    let verdict_task = tokio::spawn(async move {
        while let Some(q) = queue.recv().await {
            for test in q.tests {
                v.on_failure(q.ip, test).await;
            }
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let smtp_task = tokio::spawn(async move {
        let mut stop = stop_rx;
        server
            .run(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    });

    let d = daemon.clone();
    let handler: admin::Handler = Arc::new(move |req| d.clone().handle(req).boxed());
    let admin_task = tokio::spawn(admin::serve(listener, handler));
    tracing::info!(socket = %socket.display(), "admin socket ready");

    let v = verdicts.clone();
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            match v.sweep().await {
                // A failing store is logged once, by the store.
                Err(VerdictError::Store(e)) if e.is_failure() => {}
                Err(e) => tracing::warn!("sweeping expired blocks: {e}"),
                Ok(_) => {}
            }
        }
    });
    let v = verdicts.clone();
    let cleaner = tokio::spawn(async move {
        loop {
            let every = v.cfg().screen.cache_cleanup_interval;
            tokio::time::sleep(every).await;
            match v.cleanup().await {
                Ok(n) => tracing::info!(removed = n, "store cleanup"),
                Err(VerdictError::Store(e)) if e.is_failure() => {}
                Err(e) => tracing::warn!("store cleanup: {e}"),
            }
        }
    });

    let v = verdicts.clone();
    let watchdog = xdp::spawn_watchdog(move || {
        let _ = v.with_gate(Gate::watch);
    });

    daemon.reload_imports(&daemon.cfg().import.lists);

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut smtp_task = smtp_task;
    let keepalive = crate::notify::spawn_watchdog();
    let mut ready = false;
    loop {
        tokio::select! {
            // The gate was attached above: listening is the last step.
            () = daemon.smtp.accepting(), if !ready => {
                ready = true;
                crate::notify::ready("screening");
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            r = &mut smtp_task => {
                // The SMTP server ended on its own: it could not listen.
                admin_task.abort();
                let _ = std::fs::remove_file(&socket);
                return match r {
                    Ok(Ok(())) => Err(anyhow::anyhow!("the SMTP server stopped")),
                    Ok(Err(e)) => Err(e.context("SMTP server")),
                    Err(e) => Err(anyhow::anyhow!("SMTP server task: {e}")),
                };
            }
            _ = hup.recv() => {
                // Before the first READY=1 the reload is part of starting.
                if ready {
                    crate::notify::reloading();
                }
                daemon.reload().await;
                if ready {
                    crate::notify::ready("screening");
                }
            }
        }
    }
    crate::notify::stopping();
    if let Some(k) = keepalive {
        k.abort();
    }
    tracing::info!("shutting down; the XDP gate stays attached");
    let _ = stop_tx.send(true);
    match smtp_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("SMTP server: {e:#}"),
        Err(e) => tracing::warn!("SMTP server task: {e}"),
    }
    // Drain, don't abort: the failures queued until the SMTP server stopped
    // become verdicts, within one more shutdown grace period.
    failures.close();
    let queued = failures.stats().queued;
    if queued > 0 {
        tracing::info!("turning {queued} queued failures into verdicts before exiting");
    }
    let grace = verdicts.cfg().smtp.shutdown_grace;
    if tokio::time::timeout(grace, verdict_task).await.is_err() {
        tracing::warn!(
            "shutdown grace over: {} queued failures not turned into verdicts",
            failures.stats().queued
        );
    }
    admin_task.abort();
    sweeper.abort();
    cleaner.abort();
    watchdog.abort();
    store_retry.abort();
    // What the store could not take yet is still in the kernel; the next
    // start adopts it from there.
    match daemon.verdicts.store().flush().await {
        Ok(0) => {}
        Ok(n) => tracing::info!("{n} queued store changes written at shutdown"),
        Err(e) => tracing::warn!(
            "{} queued store changes not written ({e}); the next start adopts them from the kernel",
            daemon.verdicts.store().health().queued
        ),
    }
    for (_, i) in daemon.importers.lock().expect("importers lock").drain(..) {
        i.abort();
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// How many unreadable store records are named one per line at start;
/// the rest are counted.
const SKIPPED_NAMED: usize = 50;

/// Restores the kernel from the store and adopts what only the kernel
/// holds, saying loudly what happened: an operator must learn at start
/// that the store was empty or damaged, not after the next reboot.
async fn restore(verdicts: &Verdicts) {
    let path = verdicts.store().path().display().to_string();
    let r = match verdicts.reconcile().await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(store = %path, "restoring verdicts at start failed: {e}");
            return;
        }
    };
    for u in r.skipped.iter().take(SKIPPED_NAMED) {
        tracing::error!(store = %path, "unreadable store record skipped: {u}");
    }
    if r.skipped.len() > SKIPPED_NAMED {
        tracing::error!(
            store = %path,
            "{} more unreadable store records skipped",
            r.skipped.len() - SKIPPED_NAMED
        );
    }
    let skipped = r.skipped.len();
    let msg = format!(
        "verdicts at start: {} restored into the kernel, {} already there, {} adopted from the kernel into the store, {} unreadable records skipped, {} expired",
        r.restored, r.kept, r.adopted, skipped, r.expired
    );
    if r.adopted > 0 || skipped > 0 || r.refused_full > 0 {
        tracing::warn!(
            store = %path,
            refused_full = r.refused_full,
            "{msg}; the store was new, emptied or damaged: what the kernel held is kept and now recorded"
        );
    } else {
        tracing::info!(store = %path, "{msg}");
    }
}

/// The DNSBL engine from the `screen.dnsbl_*` and `dns` settings; `None`
/// when no site is configured.
fn build_dnsbl(cfg: &Config) -> anyhow::Result<Option<Dnsbl>> {
    let s = &cfg.screen;
    if s.dnsbl_sites.is_empty() {
        return Ok(None);
    }
    let sites = s
        .dnsbl_sites
        .iter()
        .map(|t| t.parse::<SiteSpec>())
        .collect::<Result<Vec<_>, _>>()
        .context("screen.dnsbl_sites")?;
    let opts = DnsblOptions {
        sites,
        nameservers: cfg.dns.nameservers.clone(),
        timeout: s.dnsbl_timeout,
        min_ttl: s.dnsbl_min_ttl,
        max_ttl: s.dnsbl_max_ttl,
        reply_map: s.dnsbl_reply_map.clone(),
        health_interval: s.dnsbl_health_interval,
        health_skip: s.dnsbl_health_skip.clone(),
    };
    Ok(Some(Dnsbl::new(opts).context("DNSBL settings")?))
}

/// Connects the SMTP sessions to the DNSBL engine, and notes clients a
/// DNSWL allowlisted so no verdict ever covers them.
struct DnsblAdapter {
    dnsbl: Dnsbl,
    verdicts: Arc<Verdicts>,
}

impl smtp::DnsblLookup for DnsblAdapter {
    fn score(&self, ip: IpAddr, deadline: tokio::time::Instant) -> smtp::ScoreFuture {
        let dnsbl = self.dnsbl.clone();
        let verdicts = self.verdicts.clone();
        Box::pin(async move {
            let s = dnsbl.score(ip, deadline).await;
            if s.is_allowlisted(verdicts.cfg().screen.dnsbl_allowlist_threshold) {
                verdicts.note_dnswl(ip);
            }
            Some(smtp::DnsblScore {
                score: s.score,
                ttl: s.ttl,
                top_site: s.top_site,
            })
        })
    }
}

/// The SMTP server's view of `dnsbl`, noting DNSWL-allowlisted clients.
fn lookup(dnsbl: Option<&Dnsbl>, verdicts: &Arc<Verdicts>) -> Option<Arc<dyn smtp::DnsblLookup>> {
    dnsbl.map(|d| {
        Arc::new(DnsblAdapter {
            dnsbl: d.clone(),
            verdicts: verdicts.clone(),
        }) as Arc<dyn smtp::DnsblLookup>
    })
}

/// `cfg` with the allow entries as leading `permit` rules.
fn with_allows(cfg: &Arc<Config>, verdicts: &Verdicts) -> Arc<Config> {
    let allows = verdicts.allowed();
    if allows.is_empty() {
        return cfg.clone();
    }
    let mut c = (**cfg).clone();
    let mut rules: Vec<config::AccessRule> = allows
        .into_iter()
        .map(|net| config::AccessRule {
            action: config::AccessAction::Permit,
            net,
        })
        .collect();
    rules.append(&mut c.screen.access_list);
    c.screen.access_list = rules;
    Arc::new(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_ttls_are_bounded_as_the_cli_bounds_them() {
        assert_eq!(admin_ttl(None), Ok(None));
        assert_eq!(admin_ttl(Some(60)), Ok(Some(Duration::from_secs(60))));
        assert!(admin_ttl(Some(0)).is_err());
        assert!(admin_ttl(Some(u64::MAX)).unwrap_err().contains("outside"));
    }
}
