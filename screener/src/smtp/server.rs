//! The socket side: listeners, per-connection tasks, shared counters,
//! stress mode, the cache, the descriptor budget and the queue of clients
//! to block. Everything that decides lives in [`gate`] and
//! [`session`](super::session); this loop only moves bytes, time and
//! results between them and the world.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::{sleep_until, timeout, Instant};

use super::backend::{Backend, BackendError};
use super::descriptors::{self, Budget, Room};
use super::failures::{FailureQueue, FailureQueueStats};
use super::gate::{self, Admission, GateParams, Load};
use super::locks::{lock, read, write};
use super::outcome::{Ending, Outcome, Outcomes, Timer};
use super::params::{Action, Params};
use super::session::{DnsblScore, Output, Plan, Session, Todo};
use super::text::{escape, Peer};
use super::{FailedTest, Failure};
use crate::config::{AccessAction, AccessRule, Config, Upstream};
use crate::metrics::HistogramSnapshot;
use crate::proxy;
use crate::screen::PerTest;
use crate::store::{now_unix as unix_now, ClientRecord, Store};

/// A future DNSBL score.
pub type ScoreFuture = Pin<Box<dyn Future<Output = Option<DnsblScore>> + Send>>;

/// DNSBL scoring as the server uses it.
pub trait DnsblLookup: Send + Sync + 'static {
    /// Scores `ip`; answers after `deadline` don't count.
    fn score(&self, ip: IpAddr, deadline: Instant) -> ScoreFuture;
}

/// Daemon counters, as `screener stats` shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SmtpStats {
    /// Connections accepted.
    pub connections: u64,
    /// Clients that passed their tests in this connection.
    pub pass_new: u64,
    /// Clients let through on a cached pass.
    pub pass_old: u64,
    /// Failures per test (any action).
    pub fails: FailCounts,
    /// Connections turned away: limits, denylist, and RCPTs refused.
    pub rejects: u64,
    /// Clients being screened now.
    pub screening: u64,
    /// Clients handed to the backend now.
    pub handed_off: u64,
    /// Whether stress mode is on.
    pub stress: bool,
    /// Connections closed in haproxy mode because the peer is not in
    /// `smtp.upstream_proxy_trusted`.
    pub proxy_untrusted: u64,
    /// The queue of clients to block, towards the verdict task.
    pub failure_queue: FailureQueueStats,
    /// Open-file budget and what it refused.
    pub descriptors: DescriptorStats,
    /// How connections ended, one outcome each (see [`Outcome`]).
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Tests passed, per test (a pass is a test's verdict in this
    /// connection, not a cached one).
    pub passes: PerTest<u64>,
    /// Clients handed to the backend since start.
    pub handoffs: u64,
    /// Hand-offs the backend failed (refused, timed out, misbehaved).
    pub backend_errors: u64,
    /// How long screening took, for screened clients: from the first
    /// test to the hand-off, pass, failure or hang-up.
    pub screening_time: HistogramSnapshot,
}

/// The open-file budget of the SMTP server.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DescriptorStats {
    /// The soft open-file limit.
    pub limit: u64,
    /// Client and backend sockets any client may bring the count to.
    pub cap: u64,
    /// Client and backend sockets held now.
    pub held: u64,
    /// Connections refused with `421 4.3.2` because the budget was spent.
    pub refused: u64,
}

/// Failures per test, and `reject` access rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FailCounts {
    /// Failures of each test (any action), shown under the test's name.
    #[serde(flatten)]
    pub tests: PerTest<u64>,
    /// `reject` access rules.
    pub denylist: u64,
}

/// The counters `stats` shows, updated without a lock.
#[derive(Default)]
struct Counters {
    /// Connections accepted.
    connections: AtomicU64,
    /// `PASS NEW`.
    pass_new: AtomicU64,
    /// `PASS OLD`.
    pass_old: AtomicU64,
    /// Failures per test (any action).
    fails: PerTest<AtomicU64>,
    /// `reject` access rules matched.
    denylist: AtomicU64,
    /// Connections and RCPTs turned away.
    rejects: AtomicU64,
    /// PROXY-mode connections from peers outside the trusted list.
    proxy_untrusted: AtomicU64,
    /// Connections refused for want of descriptors.
    fd_refused: AtomicU64,
    /// Tests passed (not cached), per test.
    passes: PerTest<AtomicU64>,
    /// How connections ended, and the screening time.
    outcomes: Arc<Outcomes>,
    /// Hand-offs the backend accepted.
    handoffs: AtomicU64,
    /// Hand-offs the backend failed.
    backend_errors: AtomicU64,
}

/// What a connection reads from the configuration, rebuilt on reload and
/// when the backend's EHLO keywords change.
struct Settings {
    /// The configuration itself, for the keys read at the point of use
    /// (listeners, PROXY, shutdown grace, cache cleanup).
    cfg: Arc<Config>,
    /// What a session starts with.
    normal: Arc<Params>,
    /// What a session starts with in stress mode (shorter deadlines).
    stress: Arc<Params>,
    /// What admission looks at.
    gate: GateParams,
    /// Where and how good clients are handed over.
    backend: Backend,
}

impl Settings {
    fn new(cfg: Arc<Config>, keywords: Arc<Vec<String>>, allows: &[IpNet]) -> Settings {
        let s = &cfg.screen;
        let normal = Arc::new(Params::from_config(&cfg, false, Arc::clone(&keywords)));
        let gate = GateParams {
            // An allow entry skips every test, as a `permit` rule ahead of
            // the access list would.
            access_list: allows
                .iter()
                .map(|&net| AccessRule {
                    action: AccessAction::Permit,
                    net,
                })
                .chain(s.access_list.iter().copied())
                .collect(),
            local: s.permit_local.then(crate::local::current),
            client_connection_count_limit: s.client_connection_count_limit,
            post_queue_limit: s.post_queue_limit,
            pre_queue_limit: s.pre_queue_limit,
            enabled: normal.tests.map(|_, t| t.enable),
        };
        Settings {
            stress: Arc::new(Params::from_config(&cfg, true, keywords)),
            normal,
            gate,
            backend: Backend {
                addr: cfg.smtp.backend,
                proxy: cfg.smtp.backend_proxy_protocol,
                timeout: cfg.smtp.backend_timeout,
            },
            cfg,
        }
    }
}

/// The connection counts admission and stress mode look at, under one
/// lock (the counts one client sees on arrival are [`gate::Load`]).
#[derive(Default)]
struct Occupancy {
    /// Open connections per client address, for the per-client limit.
    per_client: HashMap<IpAddr, usize>,
    /// Clients being screened.
    pre_queue: usize,
    /// Clients handed to the backend.
    post_queue: usize,
}

/// What every connection task and background loop shares.
struct Shared {
    /// Parameters for new connections.
    settings: RwLock<Arc<Settings>>,
    /// The backend's EHLO keywords, kept across reloads.
    keywords: RwLock<Arc<Vec<String>>>,
    /// The allow entries (`screener allow add`), kept across reloads.
    allows: RwLock<Arc<[IpNet]>>,
    /// Connection counts.
    load: Mutex<Occupancy>,
    /// What `stats` shows.
    counters: Counters,
    /// Whether stress mode is on: changed only under the `load` lock, by
    /// [`stress_check`]; watched by running sessions so they get the
    /// stress deadlines when it begins.
    stress: watch::Sender<bool>,
    /// The temporary allowlist (`None` in tests without a store).
    cache: Option<Store>,
    /// The DNSBL scorer; swapped when a reload changes the lists or the
    /// resolver, so a newly listed site is scored, never awaited forever.
    dnsbl: RwLock<Option<Arc<dyn DnsblLookup>>>,
    /// Clients to block, towards the verdict task.
    verdicts: Option<Arc<FailureQueue>>,
    /// Tasks alive, for the drain at shutdown.
    tasks: AtomicU64,
    /// How many client and backend sockets may be open.
    budget: RwLock<Budget>,
    /// Client and backend sockets open now.
    held: AtomicUsize,
    /// Woken when the last task ends.
    idle: Notify,
    /// Tells accept loops and connections that shutdown has begun; accept
    /// loops started by a reload subscribe to the same signal.
    stop: watch::Sender<bool>,
    /// The accept loops by the address `smtp.listen` names, so a reload
    /// binds only what is new and closes only what was removed.
    listeners: Mutex<HashMap<SocketAddr, AcceptLoop>>,
    /// Set once every listener of the start is accepting, so the daemon
    /// reports readiness only when a client can already connect.
    listening: watch::Sender<bool>,
    /// The fleet, when `[cluster]` shares passes: asked on a cache miss,
    /// told of every PASS NEW.
    cluster: std::sync::OnceLock<crate::cluster::Cluster>,
}

/// Listeners bound by [`Server::bind`], each under the address
/// `smtp.listen` names (a reload compares against those, port 0 included).
pub struct Bound(Vec<(SocketAddr, TcpListener)>);

/// One listening socket's accept loop.
struct AcceptLoop {
    /// The address actually bound (differs from the key for port 0).
    local: SocketAddr,
    /// Aborting it closes the listener; connections already accepted run
    /// in tasks of their own and are not affected.
    task: tokio::task::JoinHandle<()>,
}

/// The SMTP screening server; clones share one server.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// A server with the given cache (`store.path`), DNSBL scorer and
    /// queue of clients to block; each may be absent.
    pub fn new(
        cfg: Arc<Config>,
        cache: Option<Store>,
        dnsbl: Option<Arc<dyn DnsblLookup>>,
        verdicts: Option<Arc<FailureQueue>>,
    ) -> Server {
        let keywords = Arc::new(Vec::new());
        Server {
            shared: Arc::new(Shared {
                settings: RwLock::new(Arc::new(Settings::new(cfg, Arc::clone(&keywords), &[]))),
                keywords: RwLock::new(keywords),
                allows: RwLock::new(Arc::from([])),
                load: Mutex::new(Occupancy::default()),
                counters: Counters::default(),
                stress: watch::Sender::new(false),
                cache,
                dnsbl: RwLock::new(dnsbl),
                verdicts,
                tasks: AtomicU64::new(0),
                budget: RwLock::new(Budget::current()),
                held: AtomicUsize::new(0),
                idle: Notify::new(),
                stop: watch::channel(false).0,
                listeners: Mutex::new(HashMap::new()),
                listening: watch::Sender::new(false),
                cluster: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Swaps the parameters for new connections; connections already open
    /// keep the ones they started with.
    pub fn reload(&self, cfg: Arc<Config>) {
        self.rebuild(cfg);
        tracing::info!("smtp parameters reloaded");
    }

    /// Shares passes with `cluster` from now on.
    pub fn set_cluster(&self, cluster: crate::cluster::Cluster) {
        let _ = self.shared.cluster.set(cluster);
    }

    /// Sets the allow entries: clients they cover skip every test, from
    /// the next connection on.
    pub fn set_allows(&self, allows: &[IpNet]) {
        *write(&self.shared.allows) = Arc::from(allows);
        self.rebuild(Arc::clone(&self.settings().cfg));
    }

    /// New parameters from `cfg`, the backend's keywords and the allow
    /// entries.
    fn rebuild(&self, cfg: Arc<Config>) {
        let keywords = Arc::clone(&read(&self.shared.keywords));
        let allows = Arc::clone(&read(&self.shared.allows));
        *write(&self.shared.settings) = Arc::new(Settings::new(cfg, keywords, &allows));
    }

    /// The EHLO keywords learned from the backend and offered to clients
    /// (empty until the first probe succeeds).
    pub fn ehlo_keywords(&self) -> Vec<String> {
        read(&self.shared.keywords).to_vec()
    }

    /// Current counters.
    pub fn stats(&self) -> SmtpStats {
        let c = &self.shared.counters;
        let load = lock(&self.shared.load);
        SmtpStats {
            connections: c.connections.load(Ordering::Relaxed),
            pass_new: c.pass_new.load(Ordering::Relaxed),
            pass_old: c.pass_old.load(Ordering::Relaxed),
            fails: FailCounts {
                tests: c.fails.map(|_, n| n.load(Ordering::Relaxed)),
                denylist: c.denylist.load(Ordering::Relaxed),
            },
            rejects: c.rejects.load(Ordering::Relaxed),
            screening: load.pre_queue as u64,
            handed_off: load.post_queue as u64,
            stress: *self.shared.stress.borrow(),
            proxy_untrusted: c.proxy_untrusted.load(Ordering::Relaxed),
            failure_queue: self
                .shared
                .verdicts
                .as_ref()
                .map(|q| q.stats())
                .unwrap_or_default(),
            descriptors: {
                let b = *read(&self.shared.budget);
                DescriptorStats {
                    limit: b.limit,
                    cap: b.cap as u64,
                    held: self.shared.held.load(Ordering::Relaxed) as u64,
                    refused: c.fd_refused.load(Ordering::Relaxed),
                }
            },
            outcomes: c.outcomes.by_name(),
            passes: c.passes.map(|_, n| n.load(Ordering::Relaxed)),
            handoffs: c.handoffs.load(Ordering::Relaxed),
            backend_errors: c.backend_errors.load(Ordering::Relaxed),
            screening_time: c.outcomes.screening_time().snapshot(),
        }
    }

    /// Binds `smtp.listen` and serves until `shutdown` resolves; then stops
    /// accepting, ends the screening sessions with `421 4.3.2 Service
    /// shutting down`, and gives hand-offs in flight `smtp.shutdown_grace`.
    /// Raises the soft open-file limit to the hard limit first.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let bound = self.bind()?;
        self.run_bound(bound, shutdown).await
    }

    /// The first half of [`Server::run`]: raises the open-file limit and
    /// binds `smtp.listen`, so a daemon can bind while privileged and
    /// serve after.
    pub fn bind(&self) -> anyhow::Result<Bound> {
        match descriptors::raise_soft_limit() {
            Ok(n) => tracing::info!(
                "open-file limit: soft {} -> {}, hard {}",
                n.soft_before,
                n.soft,
                n.hard
            ),
            Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
        }
        let settings = self.settings();
        let mut listeners = Vec::new();
        for addr in &settings.cfg.smtp.listen {
            listeners.push((
                *addr,
                bind(*addr).with_context(|| format!("smtp.listen {addr}"))?,
            ));
        }
        Ok(Bound(listeners))
    }

    /// The second half of [`Server::run`]: serves on what
    /// [`Server::bind`] bound until `shutdown` resolves.
    pub async fn run_bound(
        &self,
        bound: Bound,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        self.serve_keyed(bound.0, shutdown).await
    }

    /// Resolves once [`Server::run`] (or [`Server::serve`]) has every
    /// listener accepting; pending forever if it never gets there.
    pub async fn accepting(&self) {
        let mut rx = self.shared.listening.subscribe();
        let _ = rx.wait_for(|up| *up).await;
    }

    /// Like [`Server::run`] on listeners bound by the caller (tests bind
    /// port 0 and read the port back).
    pub async fn serve(
        &self,
        listeners: Vec<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let keyed = listeners
            .into_iter()
            .map(|l| Ok((l.local_addr()?, l)))
            .collect::<std::io::Result<Vec<_>>>()?;
        self.serve_keyed(keyed, shutdown).await
    }

    async fn serve_keyed(
        &self,
        listeners: Vec<(SocketAddr, TcpListener)>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let budget = Budget::current();
        tracing::info!(
            "open-file limit {}: up to {} client and backend sockets, {} kept in reserve",
            budget.limit,
            budget.cap,
            budget.reserve
        );
        *write(&self.shared.budget) = budget;
        let mut background = tokio::task::JoinSet::new();
        background.spawn(probe_loop(
            Arc::clone(&self.shared),
            self.shared.stop.subscribe(),
        ));
        for (key, l) in listeners {
            self.start_accepting(key, l)?;
        }
        self.shared.listening.send_replace(true);
        shutdown.await;
        let _ = self.shared.stop.send(true);
        // Listeners close when their loops see the signal.
        let loops: Vec<AcceptLoop> = lock(&self.shared.listeners)
            .drain()
            .map(|(_, l)| l)
            .collect();
        for l in loops {
            let _ = l.task.await;
        }
        let grace = self.settings().cfg.smtp.shutdown_grace;
        let drained = timeout(grace + Duration::from_secs(1), async {
            loop {
                let idle = self.shared.idle.notified();
                if self.shared.tasks.load(Ordering::Acquire) == 0 {
                    break;
                }
                idle.await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "smtp shutdown: {} connections still open after the grace period",
                self.shared.tasks.load(Ordering::Acquire)
            );
        }
        background.shutdown().await;
        Ok(())
    }

    fn start_accepting(&self, key: SocketAddr, listener: TcpListener) -> std::io::Result<()> {
        let local = listener.local_addr()?;
        tracing::info!("smtp listening on {local}");
        let task = tokio::spawn(accept_loop(
            Arc::clone(&self.shared),
            listener,
            self.shared.stop.subscribe(),
        ));
        lock(&self.shared.listeners).insert(key, AcceptLoop { local, task });
        Ok(())
    }

    /// Makes the listeners match `addrs` (a reload of `smtp.listen`): binds
    /// the new addresses, closes the removed ones, leaves the others (and
    /// every open connection) alone. Returns one message per address that
    /// could not be bound; the rest is applied regardless.
    pub fn apply_listen(&self, addrs: &[SocketAddr]) -> Vec<String> {
        let removed: Vec<(SocketAddr, AcceptLoop)> = {
            let mut map = lock(&self.shared.listeners);
            let gone: Vec<SocketAddr> =
                map.keys().filter(|k| !addrs.contains(k)).copied().collect();
            gone.into_iter()
                .filter_map(|k| map.remove(&k).map(|l| (k, l)))
                .collect()
        };
        for (key, l) in removed {
            l.task.abort();
            tracing::info!(
                "smtp no longer listening on {} (removed from smtp.listen as {key})",
                l.local
            );
        }
        let mut errors = Vec::new();
        for addr in addrs {
            if lock(&self.shared.listeners).contains_key(addr) {
                continue;
            }
            match bind(*addr).and_then(|l| self.start_accepting(*addr, l)) {
                Ok(()) => {}
                Err(e) => errors.push(format!("smtp.listen {addr}: {e}")),
            }
        }
        errors
    }

    /// The addresses the server listens on now.
    pub fn listening(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = lock(&self.shared.listeners)
            .values()
            .map(|l| l.local)
            .collect();
        v.sort();
        v
    }

    /// Replaces the DNSBL scorer (a reload changed the lists or resolver).
    pub fn set_dnsbl(&self, dnsbl: Option<Arc<dyn DnsblLookup>>) {
        *write(&self.shared.dnsbl) = dnsbl;
    }

    fn settings(&self) -> Arc<Settings> {
        Arc::clone(&read(&self.shared.settings))
    }
}

/// Binds one listener; IPv6 sockets are IPv6-only so `0.0.0.0:25` and
/// `[::]:25` can both be listed.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        let s = TcpSocket::new_v6()?;
        set_v6only(&s)?;
        s
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn set_v6only(s: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            std::ptr::from_ref(&one).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).expect("c_int size fits"),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(5);
    loop {
        tokio::select! {
            () = stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    accepted(&shared, stream, peer, &stop);
                }
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin.
                    tracing::warn!("smtp accept: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            },
        }
    }
}

/// Takes a new connection: counts its socket and, unless its PROXY header
/// must be read first, its client, all before any await: connection tasks
/// reach admission in no set order, the accept queue is FIFO, and the
/// per-client limit must judge arrival order. Refuses it at once when the
/// descriptor budget is spent; else its task runs.
fn accepted(
    shared: &Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    stop: &watch::Receiver<bool>,
) {
    let (fd, held) = Descriptor::take(shared);
    let room = read(&shared.budget).room(held);
    if room == Room::Full {
        // No task, so no `Ending`: counted here.
        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
        shared.counters.outcomes.count(Outcome::DescriptorsRefused);
        refuse_for_descriptors(shared, &stream, peer);
        return;
    }
    let local = stream.local_addr().unwrap_or(peer);
    let upstream = read(&shared.settings).cfg.smtp.upstream_proxy_protocol;
    let slot = (upstream == Upstream::None).then(|| Slot::claim(shared, peer.ip().to_canonical()));
    shared.tasks.fetch_add(1, Ordering::AcqRel);
    let shared = Arc::clone(shared);
    let stop = stop.clone();
    tokio::spawn(async move {
        let known_good_only = room == Room::KnownGoodOnly;
        connection(&shared, stream, peer, local, slot, known_good_only, stop).await;
        drop(fd);
        if shared.tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
            shared.idle.notify_waiters();
        }
    });
}

/// Runs `work` as a task the shutdown drain waits for.
fn spawn_counted(shared: &Arc<Shared>, work: impl Future<Output = ()> + Send + 'static) {
    shared.tasks.fetch_add(1, Ordering::AcqRel);
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        work.await;
        if shared.tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
            shared.idle.notify_waiters();
        }
    });
}

/// One client or backend socket, counted against the descriptor budget
/// while it lives.
struct Descriptor(Arc<Shared>);

impl Descriptor {
    /// Counts one more socket; returns it and how many were held before.
    fn take(shared: &Arc<Shared>) -> (Descriptor, usize) {
        let before = shared.held.fetch_add(1, Ordering::AcqRel);
        (Descriptor(Arc::clone(shared)), before)
    }
}

impl Drop for Descriptor {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The reply to a client turned away for want of descriptors.
const NO_DESCRIPTORS: &[u8] = b"421 4.3.2 Too many open connections, try again later\r\n";

/// Turns a client away at once for want of descriptors: no task, no wait
/// (a fresh socket's send buffer takes the reply).
fn refuse_for_descriptors(shared: &Shared, stream: &TcpStream, peer: SocketAddr) {
    shared.counters.fd_refused.fetch_add(1, Ordering::Relaxed);
    shared.counters.rejects.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        client = %Peer(peer),
        "NOQUEUE: reject: CONNECT from {}: too many open connections",
        Peer(peer)
    );
    let _ = stream.try_write(NO_DESCRIPTORS);
}

/// Refreshes the backend's EHLO keywords now and every few minutes.
async fn probe_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let settings = Arc::clone(&read(&shared.settings));
        let next = match settings
            .backend
            .probe_keywords(&settings.cfg.smtp.hostname)
            .await
        {
            Ok(kw) => {
                let changed = **read(&shared.keywords) != kw;
                if changed {
                    tracing::info!(
                        "backend {} EHLO keywords: {}",
                        settings.backend.addr,
                        kw.join(", ")
                    );
                    let kw = Arc::new(kw);
                    *write(&shared.keywords) = Arc::clone(&kw);
                    let cfg = Arc::clone(&read(&shared.settings).cfg);
                    let allows = Arc::clone(&read(&shared.allows));
                    *write(&shared.settings) = Arc::new(Settings::new(cfg, kw, &allows));
                }
                Duration::from_secs(300)
            }
            Err(e) => {
                tracing::warn!("cannot learn the backend's EHLO keywords: {e}");
                Duration::from_secs(10)
            }
        };
        tokio::select! {
            () = stopped(&mut stop) => return,
            () = tokio::time::sleep(next) => {}
        }
    }
}

/// Which queue a connection counts in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Queue {
    None,
    Pre,
    Post,
}

/// A connection's place in the counters; dropping it gives the place back.
struct Slot {
    /// Where the counters live.
    shared: Arc<Shared>,
    /// The client, counted in `per_client`.
    ip: IpAddr,
    /// Connections from the same address already open when this one was
    /// counted: the per-client limit judges arrival order, not the order in
    /// which connection tasks happen to reach admission.
    earlier: usize,
    /// The queue it counts in now.
    queue: Queue,
}

impl Slot {
    /// Counts a new connection from `ip`.
    fn claim(shared: &Arc<Shared>, ip: IpAddr) -> Slot {
        let mut load = lock(&shared.load);
        let n = load.per_client.entry(ip).or_insert(0);
        let earlier = *n;
        *n += 1;
        Slot {
            shared: Arc::clone(shared),
            ip,
            earlier,
            queue: Queue::None,
        }
    }

    fn move_to(&mut self, queue: Queue) {
        let mut load = lock(&self.shared.load);
        let pre_limit = read(&self.shared.settings).gate.pre_queue_limit;
        leave(&mut load, self.queue);
        match queue {
            Queue::Pre => load.pre_queue += 1,
            Queue::Post => load.post_queue += 1,
            Queue::None => {}
        }
        self.queue = queue;
        stress_check(&self.shared, &load, pre_limit);
    }
}

fn leave(load: &mut Occupancy, queue: Queue) {
    match queue {
        Queue::Pre => load.pre_queue -= 1,
        Queue::Post => load.post_queue -= 1,
        Queue::None => {}
    }
}

/// Enters stress mode at 0.9 × `pre_queue_limit` clients being screened and
/// leaves it at 0.7 ×, as postscreen does; the gap keeps it from flapping.
fn stress_check(shared: &Shared, load: &Occupancy, pre_limit: usize) {
    let n = load.pre_queue;
    shared.stress.send_if_modified(|stress| {
        if !*stress && n * 10 >= pre_limit * 9 && n > 0 {
            tracing::warn!("entering STRESS mode with {n} connections");
            *stress = true;
            true
        } else if *stress && n * 10 <= pre_limit * 7 {
            tracing::info!("leaving STRESS mode with {n} connections");
            *stress = false;
            true
        } else {
            false
        }
    });
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.move_to(Queue::None);
        let mut load = lock(&self.shared.load);
        if let Some(n) = load.per_client.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                load.per_client.remove(&self.ip);
            }
        }
    }
}

/// Records passes: tests with a lifetime get `now + ttl`, the others keep
/// their cached expiry.
/// What the fleet knows of `ip`'s passes, on a local cache miss; `None`
/// when no node passed it or Redis does not answer within
/// `cluster.pass_timeout`.
async fn fleet_passes(fleet: &crate::cluster::Cluster, ip: IpAddr) -> Option<PerTest<u64>> {
    let passes = fleet.passes(ip).await?;
    let mut out = PerTest::splat(0);
    let mut any = false;
    for (name, expires) in passes {
        // A test this release does not know is one it never asks for.
        if let Some(t) = crate::screen::TestId::from_name(&name) {
            out[t] = expires;
            any = true;
        }
    }
    any.then_some(out)
}

async fn store_pass(
    cache: Store,
    fleet: Option<crate::cluster::Cluster>,
    ip: IpAddr,
    ttl: PerTest<Option<Duration>>,
) {
    let now = unix_now();
    let mut rec = match cache.client(ip).await {
        Ok(r) => r.unwrap_or(ClientRecord {
            first_seen: now,
            ..ClientRecord::default()
        }),
        Err(e) => {
            tracing::warn!("cache: {e}");
            return;
        }
    };
    let expires = PerTest::from(rec.expires).map(|t, &exp| match ttl[t] {
        Some(ttl) => now + ttl.as_secs(),
        None => exp,
    });
    if let Some(fleet) = fleet {
        let passes: Vec<(&str, u64)> = expires
            .iter()
            .filter(|(_, &e)| e > now)
            .map(|(t, &e)| (t.name(), e))
            .collect();
        fleet.publish_pass(ip, &passes);
    }
    rec.expires = expires.into();
    rec.last_seen = now;
    if let Err(e) = cache.put_client(ip, rec).await {
        tracing::warn!("cache: {e}");
    }
}

/// Resolves once shutdown is signalled (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn post_queue_full(shared: &Shared, limit: usize) -> bool {
    lock(&shared.load).post_queue >= limit
}

fn record_failure(shared: &Shared, client: SocketAddr, test: FailedTest, action: Action) {
    let counter = match test {
        FailedTest::Test(t) => &shared.counters.fails[t],
        FailedTest::Denylist => &shared.counters.denylist,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if let Some(cache) = shared.cache.clone() {
        // A failure clears the record: a failed client is never allowlisted.
        let ip = client.ip().to_canonical();
        tokio::spawn(async move {
            if let Err(e) = cache.delete_client(ip).await {
                tracing::warn!("cache: {e}");
            }
        });
    }
    if action != Action::Ignore {
        if let Some(v) = &shared.verdicts {
            v.push(Failure { client, test });
        }
    }
}

/// One client connection past its PROXY header and admission: what the
/// screening and the hand-off both need.
struct Conn {
    /// Counters, cache, failure queue and signals of the whole server.
    shared: Arc<Shared>,
    /// The settings in force when the client arrived, kept for the whole
    /// connection so a reload never changes the rules under it.
    settings: Arc<Settings>,
    /// The client's socket.
    stream: TcpStream,
    /// The client as it connected (after any upstream PROXY header): the
    /// address the verdict and the backend's PROXY header name.
    client: SocketAddr,
    /// The address the client connected to, for the backend's PROXY header.
    server: SocketAddr,
    /// The connection's place in the counts; dropping it gives it back.
    slot: Slot,
    /// Shutdown: screening ends with a 421, a hand-off gets the grace period.
    stop: watch::Receiver<bool>,
    /// How it ended, counted when it is dropped.
    ending: Ending,
}

impl Conn {
    /// Writes a last reply, giving up after 10 s: a client that does not
    /// read it is not waited for.
    async fn reply(&mut self, text: &str) {
        let _ = timeout(
            Duration::from_secs(10),
            self.stream.write_all(text.as_bytes()),
        )
        .await;
    }
}

async fn connection(
    shared: &Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    slot: Option<Slot>,
    known_good_only: bool,
    stop: watch::Receiver<bool>,
) {
    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
    let mut ending = Ending::new(Arc::clone(&shared.counters.outcomes));
    let settings = Arc::clone(&read(&shared.settings));
    let (client, server) = if settings.cfg.smtp.upstream_proxy_protocol == Upstream::Haproxy {
        if !gate::proxy_trusted(&settings.cfg.smtp.upstream_proxy_trusted, peer.ip()) {
            shared
                .counters
                .proxy_untrusted
                .fetch_add(1, Ordering::Relaxed);
            ending.set(Outcome::ProxyUntrusted);
            tracing::warn!(client = %Peer(peer), "PROXY header refused: {} is not in smtp.upstream_proxy_trusted; closed", Peer(peer));
            return;
        }
        // The reader stops exactly at the header's end, so a bot that
        // pregreets right behind it is still caught by the pregreet test.
        match proxy::read_header(&mut stream, settings.cfg.smtp.upstream_proxy_timeout).await {
            Ok(h) => h.source.unwrap_or((peer, local)),
            Err(e) => {
                ending.set(Outcome::ProxyError);
                tracing::info!("PROXY header from {}: {e}", Peer(peer));
                return;
            }
        }
    } else {
        (peer, local)
    };
    tracing::info!(client = %Peer(client), "CONNECT from {} to {}", Peer(client), Peer(server));
    let ip = client.ip().to_canonical();
    let slot = slot.unwrap_or_else(|| Slot::claim(shared, ip));
    let expiries = match &shared.cache {
        Some(cache) => match cache.client(ip).await {
            Ok(rec) => rec.map(|r| PerTest::from(r.expires)),
            Err(e) => {
                // A broken cache screens everyone afresh rather than failing.
                tracing::warn!("cache: {e}");
                None
            }
        },
        None => None,
    };
    let expiries = match (expiries, shared.cluster.get()) {
        (None, Some(fleet)) => fleet_passes(fleet, ip).await,
        (known, _) => known,
    };
    let (admission, stress) = admit(shared, &settings, &slot, expiries);
    let mut conn = Conn {
        shared: Arc::clone(shared),
        settings,
        stream,
        client,
        server,
        slot,
        stop,
        ending,
    };
    let todo = match admission {
        Admission::Busy { reply, why } => {
            conn.ending.set(Outcome::Busy);
            shared.counters.rejects.fetch_add(1, Ordering::Relaxed);
            // postscreen's own wording for each: the screening-slot case
            // is its one reject logged without the queue ID.
            if why == "all screening ports busy" {
                tracing::info!(client = %Peer(client), "reject: connect from {}: {why}", Peer(client));
            } else {
                tracing::info!(client = %Peer(client), "NOQUEUE: reject: CONNECT from {}: {why}", Peer(client));
            }
            conn.reply(&format!("{reply}\r\n")).await;
            return;
        }
        Admission::Denylisted => {
            conn.ending.set(Outcome::Denylisted);
            shared.counters.rejects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(client = %Peer(client), "{} {}", crate::logging::denylisted(), Peer(client));
            record_failure(shared, client, FailedTest::Denylist, Action::Drop);
            let reply = format!(
                "521 5.3.2 {} Service currently unavailable\r\n",
                conn.settings.cfg.smtp.hostname
            );
            conn.reply(&reply).await;
            // As postscreen ends a dropped session's lines.
            tracing::info!(client = %Peer(client), "DISCONNECT {}", Peer(client));
            return;
        }
        Admission::Allowlisted | Admission::PassOld => {
            if matches!(admission, Admission::PassOld) {
                shared.counters.pass_old.fetch_add(1, Ordering::Relaxed);
                tracing::info!(client = %Peer(client), "PASS OLD {}", Peer(client));
            } else {
                tracing::info!(client = %Peer(client), "{} {}", crate::logging::allowlisted(), Peer(client));
            }
            // Boxed: a client still in the tests need not carry the relay's
            // state (and buffers) inside its own future.
            Box::pin(hand_off(conn, Plan::Greeting { early: Vec::new() })).await;
            return;
        }
        Admission::Screen(_) if known_good_only => {
            // Past the descriptor budget only known-good clients go on;
            // screening this one could take what the daemon itself needs.
            conn.ending.set(Outcome::DescriptorsRefused);
            refuse_for_descriptors(shared, &conn.stream, client);
            return;
        }
        Admission::Screen(todo) => todo,
    };
    conn.slot.move_to(Queue::Pre);
    let params = Arc::clone(if stress {
        &conn.settings.stress
    } else {
        &conn.settings.normal
    });
    screen(conn, params, todo).await;
}

/// Runs admission for the connection counted in `slot`; the per-client
/// count is the one it found on arrival.
fn admit(
    shared: &Shared,
    settings: &Settings,
    slot: &Slot,
    expiries: Option<PerTest<u64>>,
) -> (Admission, bool) {
    let load = lock(&shared.load);
    let l = Load {
        client: slot.earlier,
        pre_queue: load.pre_queue,
        post_queue: load.post_queue,
    };
    // Read under the lock: stress mode changes only under it.
    let stress = *shared.stress.borrow();
    drop(load);
    let admission = gate::admit(&settings.gate, slot.ip, l, expiries, unix_now());
    (admission, stress)
}

/// Screens the client: runs its session, carrying out each output, until
/// it is handed off, hangs up or is hung up on.
async fn screen(mut conn: Conn, params: Arc<Params>, todo: Todo) {
    let (shared, client) = (Arc::clone(&conn.shared), conn.client);
    let mut timer = Timer::start(Arc::clone(&shared.counters.outcomes));
    let mut stop = conn.stop.clone();
    let mut stress = shared.stress.subscribe();
    let write_limit = params.command_time_limit;
    let mut session = Session::new(params, client, todo, Instant::now());
    let mut outputs = session.start(Instant::now());
    // Stress mode may have begun since admission picked the parameters.
    if *stress.borrow_and_update() {
        session.stress(Instant::now());
    }
    let lookup = read(&shared.dnsbl).clone();
    let mut dnsbl: Option<ScoreFuture> = match (session.dnsbl_deadline(), lookup) {
        (Some(deadline), Some(d)) => Some(d.score(client.ip().to_canonical(), deadline)),
        _ => None,
    };
    loop {
        for out in outputs.drain(..) {
            match out {
                Output::Send(bytes) => {
                    if timeout(write_limit, conn.stream.write_all(&bytes))
                        .await
                        .map_or(true, |r| r.is_err())
                    {
                        return;
                    }
                }
                Output::Close => {
                    tracing::info!(client = %Peer(client), "DISCONNECT {}", Peer(client));
                    return;
                }
                Output::Fail { test, action } => {
                    conn.ending.set(Outcome::Failed);
                    record_failure(&shared, client, test.into(), action);
                }
                Output::Pass(ttl) => {
                    conn.ending.set(Outcome::Passed);
                    for (t, passed) in ttl.iter() {
                        if passed.is_some() {
                            shared.counters.passes[t].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    shared.counters.pass_new.fetch_add(1, Ordering::Relaxed);
                    if let Some(cache) = shared.cache.clone() {
                        // Off the client's path (a store write may wait on
                        // the disk), but counted: the drain at shutdown
                        // waits for it like for a connection.
                        spawn_counted(
                            &shared,
                            store_pass(
                                cache,
                                shared.cluster.get().cloned(),
                                client.ip().to_canonical(),
                                ttl,
                            ),
                        );
                    }
                }
                Output::Handoff(plan) => {
                    timer.stop();
                    // Boxed: a client still in the tests need not carry the relay's
                    // state (and buffers) inside its own future.
                    Box::pin(hand_off(conn, plan)).await;
                    return;
                }
            }
        }
        if !session.is_screening() {
            return;
        }
        let deadline = session
            .deadline()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = conn.stream.readable() => {
                // The buffer lives only between readiness and parsing, not
                // across an await: it costs the 10,000 idle clients nothing.
                let mut buf = [0u8; 1024];
                let now = Instant::now();
                outputs = match r.and_then(|()| conn.stream.try_read(&mut buf)) {
                    Ok(0) => session.eof(now),
                    Ok(n) => session.input(&buf[..n], now),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Vec::new(),
                    Err(_) => session.eof(now),
                };
            }
            () = sleep_until(deadline) => outputs = session.timeout(Instant::now()),
            score = async { dnsbl.as_mut().expect("guarded").await }, if dnsbl.is_some() => {
                dnsbl = None;
                outputs = match score {
                    Some(score) => session.dnsbl(score, Instant::now()),
                    None => Vec::new(),
                };
            }
            Ok(()) = stress.changed() => {
                if *stress.borrow_and_update() {
                    session.stress(Instant::now());
                }
                outputs = Vec::new();
            }
            () = stopped(&mut stop) => {
                conn.ending.set(Outcome::Shutdown);
                let _ = timeout(Duration::from_secs(2), conn.stream.write_all(b"421 4.3.2 Service shutting down\r\n")).await;
                tracing::info!(client = %Peer(client), "DISCONNECT {}", Peer(client));
                return;
            }
        }
    }
}

/// Hands the client to the backend and follows `plan`, then relays both
/// ways until either side closes or the shutdown grace is over.
async fn hand_off(mut conn: Conn, plan: Plan) {
    let (shared, settings, client) = (
        Arc::clone(&conn.shared),
        Arc::clone(&conn.settings),
        conn.client,
    );
    if post_queue_full(&shared, settings.gate.post_queue_limit) {
        conn.ending.set(Outcome::Busy);
        shared.counters.rejects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(client = %Peer(client), "NOQUEUE: reject: CONNECT from {}: all server ports busy", Peer(client));
        conn.reply("421 4.3.2 All server ports are busy\r\n").await;
        return;
    }
    conn.slot.move_to(Queue::Post);
    let _backend_fd = Descriptor::take(&shared).0;
    let ready = async {
        let mut backend = settings.backend.connect(client, conn.server).await?;
        let first = backend.prepare(&plan).await?;
        Ok::<_, BackendError>((backend, first))
    };
    let (mut backend, first) = match ready.await {
        Ok(x) => x,
        Err(e) => {
            conn.ending.set(Outcome::BackendError);
            shared
                .counters
                .backend_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %Peer(client), "backend unavailable for {}: {e}", Peer(client));
            conn.reply("421 4.3.2 Service currently unavailable\r\n")
                .await;
            return;
        }
    };
    conn.ending.set(Outcome::HandedOff);
    shared.counters.handoffs.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(client = %Peer(client), "handed {} to {}: {}", Peer(client), settings.backend.addr, escape(&first));
    let mut to_client = first;
    to_client.extend_from_slice(&backend.extra);
    if conn.stream.write_all(&to_client).await.is_err() {
        return;
    }
    // What the client sent before it was greeted, or past its RCPT line,
    // follows the backend's reply in the order it was sent.
    let rest = plan.client_bytes();
    if !rest.is_empty() && backend.stream.write_all(rest).await.is_err() {
        return;
    }
    let grace = settings.cfg.smtp.shutdown_grace;
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut conn.stream, &mut backend.stream) => {}
        () = async {
            stopped(&mut conn.stop).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::info!(client = %Peer(client), "shutdown grace over, closing hand-off of {}", Peer(client));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::screen::TestId;

    #[test]
    fn the_enabled_mask_follows_the_config_by_name() {
        let mut cfg = Config::default();
        cfg.screen.permit_local = false;
        cfg.smtp.greet_banner = String::new();
        cfg.screen.dnsbl_sites = vec!["zen.example".into()];
        cfg.screen.bare_newline_enable = true;
        let s = Settings::new(Arc::new(cfg), Arc::new(Vec::new()), &[]);
        for t in TestId::ALL {
            assert_eq!(
                s.gate.enabled[t],
                matches!(t, TestId::Dnsbl | TestId::BareNewline),
                "{t}"
            );
        }

        let mut cfg = Config::default();
        cfg.screen.permit_local = false;
        cfg.screen.pipelining_enable = true;
        let s = Settings::new(Arc::new(cfg), Arc::new(Vec::new()), &[]);
        for t in TestId::ALL {
            assert_eq!(
                s.gate.enabled[t],
                matches!(t, TestId::Pregreet | TestId::Pipelining),
                "{t}"
            );
        }
    }

    #[test]
    fn fail_counts_show_each_test_by_name() {
        let mut c = FailCounts::default();
        c.tests[TestId::NonSmtpCommand] = 3;
        c.denylist = 1;
        let mut want = serde_json::Map::new();
        for t in TestId::ALL {
            let n = if t == TestId::NonSmtpCommand { 3 } else { 0 };
            want.insert(t.name().into(), n.into());
        }
        want.insert("denylist".into(), 1.into());
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::Value::Object(want)
        );
    }
}
