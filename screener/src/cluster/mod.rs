//! A fleet of MX hosts as one screener, through Redis or Valkey.
//!
//! Every block and unblock this node makes goes onto a stream every node
//! reads from the last entry it applied ([`wire`] has the key layout). A
//! node that was away replays what it missed; one whose place in the
//! stream was trimmed away rebuilds its remote set from snapshot keys.
//! Passes are shared as keys read on a local cache miss, with a short
//! timeout.
//!
//! Redis is never a reason to reject or delay a client: while it is
//! unreachable, screening and local verdicts go on as without a cluster,
//! outgoing verdicts wait in a bounded queue, and the outage and the
//! recovery are logged once each.

pub mod settings;
pub mod wire;

use std::{
    collections::VecDeque,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use redis::{aio::ConnectionManager, AsyncCommands as _};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

pub use settings::{Settings, Share};
pub use wire::{Event, Op};

/// How long one Redis command may take before the link counts as down.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a reader's `XREAD` waits for new entries.
const READ_BLOCK: Duration = Duration::from_secs(1);
/// Entries read (and applied) at once.
const READ_BATCH: usize = 1000;
/// Verdicts published in one pipeline.
const PUBLISH_BATCH: usize = 500;
/// How often a node says it is alive.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// A node that has not beaten for this long drops out of `cluster status`.
const HEARTBEAT_TTL: Duration = Duration::from_secs(30);

/// What the reader hands the daemon to apply; the daemon answers on
/// `done` once the entries are in its kernel maps and store and `last_id`
/// is saved, so a crash never skips an entry.
#[derive(Debug)]
pub enum Incoming {
    /// Other nodes' verdicts, oldest first.
    Events {
        /// The verdicts; this node's own are already left out.
        events: Vec<Event>,
        /// The stream position to save once they are applied.
        last_id: String,
        /// Acknowledges the batch.
        done: oneshot::Sender<()>,
    },
    /// The whole fleet-wide block set, after a gap in the stream: apply
    /// every block, and lift the remote blocks that are not in it.
    Snapshot {
        /// Every block the fleet holds now (this node's own included).
        blocks: Vec<Event>,
        /// Where to read on from.
        last_id: String,
        /// Acknowledges the snapshot.
        done: oneshot::Sender<()>,
    },
}

/// Something to write to Redis.
#[derive(Clone, Debug)]
enum Outgoing {
    /// A verdict of this node's.
    Verdict(Event),
    /// A client's passes: key value, and when the last one lapses.
    Pass {
        ip: IpAddr,
        value: String,
        until: u64,
    },
}

/// This node's view of the fleet, for `stats` and `cluster status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    /// This node's name.
    pub node: String,
    /// Whether the last Redis command succeeded.
    pub connected: bool,
    /// Stream entries not yet applied here (as of the last heartbeat).
    pub lag: u64,
    /// Outgoing verdicts and passes waiting for Redis.
    pub queued: u64,
    /// Outgoing items dropped because the queue was full.
    pub dropped: u64,
    /// Verdicts published since start.
    pub published: u64,
    /// Remote verdicts applied since start.
    pub applied: u64,
    /// Pass lookups that ran out of `pass_timeout`.
    pub pass_timeouts: u64,
    /// Times the stream had been trimmed past this node's place.
    pub resyncs: u64,
    /// Nodes that beat recently (empty when Redis is unreachable).
    pub nodes: Vec<wire::Heartbeat>,
}

/// The handle the daemon and the SMTP side hold.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

/// Shared by the handle and the cluster's tasks.
struct Inner {
    /// The `[cluster]` section.
    settings: Settings,
    /// This node's name.
    node: String,
    /// Key names.
    keys: wire::Keys,
    /// The command connection, once one was made; it reconnects itself.
    conn: tokio::sync::RwLock<Option<ConnectionManager>>,
    /// Outgoing items, oldest first, bounded by `settings.queue`.
    outbox: Mutex<VecDeque<Outgoing>>,
    /// Wakes the publisher.
    wake: Notify,
    /// The stream position applied last, for the lag.
    position: Mutex<Option<String>>,
    /// Whether Redis answered last time; flips log once each way.
    up: AtomicBool,
    /// See [`Status`].
    lag: AtomicU64,
    dropped: AtomicU64,
    published: AtomicU64,
    applied: AtomicU64,
    pass_timeouts: AtomicU64,
    resyncs: AtomicU64,
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

impl Cluster {
    /// A handle for `settings` (already checked); nothing connects until
    /// [`Cluster::run`].
    pub fn new(settings: Settings) -> Cluster {
        let node = settings.node_name();
        let keys = wire::Keys::new(&settings.prefix);
        Cluster {
            inner: Arc::new(Inner {
                settings,
                node,
                keys,
                conn: tokio::sync::RwLock::new(None),
                outbox: Mutex::new(VecDeque::new()),
                wake: Notify::new(),
                position: Mutex::new(None),
                up: AtomicBool::new(false),
                lag: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                published: AtomicU64::new(0),
                applied: AtomicU64::new(0),
                pass_timeouts: AtomicU64::new(0),
                resyncs: AtomicU64::new(0),
            }),
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// Whether `what` is shared.
    pub fn shares(&self, what: Share) -> bool {
        self.inner.settings.shares(what)
    }

    /// Connects, publishes, reads and beats until `stop`; remote entries
    /// arrive on `apply`. `last_id` is where this node stopped reading
    /// last time (from its store); `None` starts from a snapshot.
    pub async fn run(
        &self,
        last_id: Option<String>,
        apply: mpsc::Sender<Incoming>,
        stop: CancellationToken,
    ) {
        let reads = self.shares(Share::Blocks);
        tokio::join!(
            self.connect_loop(&stop),
            self.publish_loop(&stop),
            async {
                if reads {
                    self.read_loop(last_id, &apply, &stop).await;
                }
            },
            self.heartbeat_loop(&stop),
        );
    }

    /// Queues a verdict of this node's for the fleet.
    pub fn publish(&self, event: Event) {
        if self.shares(Share::Blocks) {
            self.push(Outgoing::Verdict(event));
        }
    }

    /// Shares a client's passes (`(test name, Unix seconds it lapses)`).
    pub fn publish_pass(&self, ip: IpAddr, passes: &[(&str, u64)]) {
        let until = passes.iter().map(|p| p.1).max().unwrap_or(0);
        if !self.shares(Share::Passes) || until == 0 {
            return;
        }
        self.push(Outgoing::Pass {
            ip,
            value: wire::pass_value(passes),
            until,
        });
    }

    fn push(&self, item: Outgoing) {
        let mut q = self
            .inner
            .outbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if q.len() >= self.inner.settings.queue {
            // The oldest goes: the kernel and the store have it anyway,
            // and the snapshot keys carry blocks to nodes that resync.
            q.pop_front();
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(item);
        drop(q);
        self.inner.wake.notify_one();
    }

    /// The passes the fleet knows for `ip`, or `None` when Redis has none,
    /// is down or does not answer within `cluster.pass_timeout`.
    pub async fn passes(&self, ip: IpAddr) -> Option<Vec<(String, u64)>> {
        if !self.shares(Share::Passes) || !self.inner.up.load(Ordering::Relaxed) {
            return None;
        }
        let mut conn = self.inner.conn.read().await.clone()?;
        let key = self.inner.keys.pass(ip);
        match tokio::time::timeout(
            self.inner.settings.pass_timeout,
            conn.get::<_, Option<String>>(key),
        )
        .await
        {
            Ok(Ok(v)) => v.map(|v| wire::parse_pass(&v)),
            Ok(Err(e)) => {
                self.down("reading a pass", &e);
                None
            }
            Err(_) => {
                self.inner.pass_timeouts.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// The figures for `stats` (no Redis round trip).
    pub fn status(&self) -> Status {
        let i = &self.inner;
        Status {
            node: i.node.clone(),
            connected: i.up.load(Ordering::Relaxed),
            lag: i.lag.load(Ordering::Relaxed),
            queued: self.queued(),
            dropped: i.dropped.load(Ordering::Relaxed),
            published: i.published.load(Ordering::Relaxed),
            applied: i.applied.load(Ordering::Relaxed),
            pass_timeouts: i.pass_timeouts.load(Ordering::Relaxed),
            resyncs: i.resyncs.load(Ordering::Relaxed),
            nodes: Vec::new(),
        }
    }

    /// [`Cluster::status`] with the nodes that beat recently.
    pub async fn status_with_nodes(&self) -> Status {
        let mut s = self.status();
        if let Some(mut conn) = self.inner.conn.read().await.clone() {
            let nodes = tokio::time::timeout(COMMAND_TIMEOUT, self.nodes(&mut conn)).await;
            if let Ok(Ok(n)) = nodes {
                s.nodes = n;
            }
        }
        s
    }

    async fn nodes(
        &self,
        conn: &mut ConnectionManager,
    ) -> redis::RedisResult<Vec<wire::Heartbeat>> {
        let keys = scan(conn, &self.inner.keys.node_pattern()).await?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<String>> = conn.mget(&keys).await?;
        let mut out: Vec<wire::Heartbeat> = values
            .into_iter()
            .flatten()
            .filter_map(|v| serde_json::from_str(&v).ok())
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(out)
    }

    fn queued(&self) -> u64 {
        let q = self
            .inner
            .outbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        q.len() as u64
    }

    /// Notes a failed command; logs the outage once.
    fn down(&self, what: &str, e: &dyn std::fmt::Display) {
        if self.inner.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                "cluster: Redis unreachable ({what}: {e}); screening goes on alone, verdicts are queued for the fleet"
            );
        }
    }

    /// Notes a successful command; logs the recovery once.
    fn up(&self) {
        if !self.inner.up.swap(true, Ordering::Relaxed) {
            tracing::info!(
                "cluster: Redis reachable, node {} in fleet {:?}; {} queued for the fleet",
                self.inner.node,
                self.inner.settings.prefix,
                self.queued()
            );
        }
    }

    /// Makes the command connection, trying each URL in turn until one
    /// answers; the connection manager then reconnects by itself.
    async fn connect_loop(&self, stop: &CancellationToken) {
        let mut logged = false;
        let mut backoff = Backoff::new();
        loop {
            for url in &self.inner.settings.redis {
                let made = async {
                    let client = redis::Client::open(url.as_str())?;
                    let cfg = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(COMMAND_TIMEOUT))
                        .set_response_timeout(Some(COMMAND_TIMEOUT))
                        .set_number_of_retries(2)
                        .set_max_delay(Duration::from_secs(2));
                    let mut conn = client.get_connection_manager_with_config(cfg).await?;
                    redis::cmd("PING").query_async::<()>(&mut conn).await?;
                    redis::RedisResult::Ok(conn)
                };
                let made = tokio::select! {
                    () = stop.cancelled() => return,
                    m = tokio::time::timeout(COMMAND_TIMEOUT * 2, made) => m,
                };
                match made {
                    Ok(Ok(conn)) => {
                        *self.inner.conn.write().await = Some(conn);
                        self.up();
                        self.inner.wake.notify_one();
                        return;
                    }
                    Ok(Err(e)) if !logged => {
                        tracing::warn!("cluster: cannot reach Redis at {}: {e}; screening goes on alone, retrying", redacted(url));
                    }
                    Err(_) if !logged => {
                        tracing::warn!("cluster: Redis at {} does not answer; screening goes on alone, retrying", redacted(url));
                    }
                    _ => {}
                }
            }
            logged = true;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff.next()) => {}
            }
        }
    }

    /// Publishes queued items in batches; each batch is one atomic
    /// pipeline, removed from the queue only once Redis took it.
    async fn publish_loop(&self, stop: &CancellationToken) {
        let mut backoff = Backoff::new();
        loop {
            let batch: Vec<Outgoing> = {
                let q = self
                    .inner
                    .outbox
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                q.iter().take(PUBLISH_BATCH).cloned().collect()
            };
            if batch.is_empty() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = self.inner.wake.notified() => continue,
                }
            }
            let conn = self.inner.conn.read().await.clone();
            let sent = match conn {
                Some(mut conn) => {
                    let pipe = self.pipeline(&batch);
                    match tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async::<()>(&mut conn))
                        .await
                    {
                        Ok(Ok(())) => true,
                        Ok(Err(e)) => {
                            self.down("publishing", &e);
                            false
                        }
                        Err(_) => {
                            self.down("publishing", &"no answer in 2s");
                            false
                        }
                    }
                }
                None => false,
            };
            if sent {
                self.up();
                backoff = Backoff::new();
                let verdicts = batch
                    .iter()
                    .filter(|o| matches!(o, Outgoing::Verdict(_)))
                    .count();
                self.inner
                    .published
                    .fetch_add(verdicts as u64, Ordering::Relaxed);
                let mut q = self
                    .inner
                    .outbox
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                // Items dropped while the batch was in flight shifted the
                // queue; drop only as many as are left of the batch.
                for _ in 0..batch.len().min(q.len()) {
                    q.pop_front();
                }
            } else {
                if stop.is_cancelled() {
                    let left = self.queued();
                    if left > 0 {
                        tracing::warn!("cluster: {left} verdicts and passes not published at shutdown; the fleet learns the blocks from the snapshot when this node returns");
                    }
                    return;
                }
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = tokio::time::sleep(backoff.next()) => {}
                }
            }
            if stop.is_cancelled() && self.queued() == 0 {
                return;
            }
        }
    }

    /// One atomic pipeline for `batch`.
    fn pipeline(&self, batch: &[Outgoing]) -> redis::Pipeline {
        let k = &self.inner.keys;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for item in batch {
            match item {
                Outgoing::Verdict(ev) => {
                    let cmd = pipe
                        .cmd("XADD")
                        .arg(k.stream())
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(self.inner.settings.stream_length)
                        .arg("*");
                    for (name, value) in ev.fields() {
                        cmd.arg(name).arg(value);
                    }
                    cmd.ignore();
                    match (ev.snapshot_value(), &ev.op) {
                        (Some(v), Op::Block { expires, .. }) if *expires > 0 => {
                            pipe.cmd("SET")
                                .arg(k.block(ev.net))
                                .arg(v)
                                .arg("PXAT")
                                .arg(expires.saturating_mul(1000))
                                .ignore();
                        }
                        (Some(v), _) => {
                            pipe.cmd("SET").arg(k.block(ev.net)).arg(v).ignore();
                        }
                        (None, _) => {
                            pipe.cmd("DEL").arg(k.block(ev.net)).ignore();
                        }
                    }
                }
                Outgoing::Pass { ip, value, until } => {
                    pipe.cmd("SET")
                        .arg(k.pass(*ip))
                        .arg(value)
                        .arg("PXAT")
                        .arg(until.saturating_mul(1000))
                        .ignore();
                }
            }
        }
        pipe
    }

    /// Reads the stream from `last_id` on, resynchronising from the
    /// snapshot when the stream no longer holds what this node missed.
    async fn read_loop(
        &self,
        mut last_id: Option<String>,
        apply: &mpsc::Sender<Incoming>,
        stop: &CancellationToken,
    ) {
        let mut backoff = Backoff::new();
        loop {
            let r = tokio::select! {
                () = stop.cancelled() => return,
                r = self.read_session(&mut last_id, apply, stop) => r,
            };
            match r {
                Ok(()) => return,
                Err(e) => self.down("reading the verdict stream", &e),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff.next()) => {}
            }
        }
    }

    /// One connection's worth of reading; returns `Ok` only at `stop`.
    async fn read_session(
        &self,
        last_id: &mut Option<String>,
        apply: &mpsc::Sender<Incoming>,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut conn = self.reader_connection().await?;
        let stream = self.inner.keys.stream();
        let resync = match last_id.as_deref() {
            None => true,
            Some(id) => self.gap_after(&mut conn, &stream, id).await?,
        };
        if resync {
            let id = self.resync(&mut conn, apply).await?;
            self.note_position(&id);
            *last_id = Some(id);
        } else if let Some(id) = last_id.as_deref() {
            self.note_position(id);
        }
        self.up();
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            let from = last_id.clone().unwrap_or_else(|| "0-0".into());
            let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(READ_BATCH)
                .arg("BLOCK")
                .arg(u64::try_from(READ_BLOCK.as_millis()).unwrap_or(1000))
                .arg("STREAMS")
                .arg(&stream)
                .arg(&from)
                .query_async(&mut conn)
                .await?;
            let Some(reply) = reply else { continue };
            let mut events = Vec::new();
            let mut newest = None;
            for key in reply.keys {
                for entry in key.ids {
                    let get = |f: &str| entry.get::<String>(f);
                    let fields: Vec<(String, Option<String>)> =
                        ["node", "net", "op", "reason", "expires"]
                            .iter()
                            .map(|f| ((*f).to_owned(), get(f)))
                            .collect();
                    let lookup = |name: &str| {
                        fields
                            .iter()
                            .find(|(n, _)| n == name)
                            .and_then(|(_, v)| v.as_deref())
                    };
                    match Event::from_fields(lookup) {
                        Ok(ev) if ev.node == self.inner.node => {}
                        Ok(ev) => events.push(ev),
                        Err(e) => {
                            tracing::error!("cluster: stream entry {} skipped: {e}", entry.id);
                        }
                    }
                    newest = Some(entry.id);
                }
            }
            let Some(newest) = newest else { continue };
            let n = events.len() as u64;
            let (done, acked) = oneshot::channel();
            if apply
                .send(Incoming::Events {
                    events,
                    last_id: newest.clone(),
                    done,
                })
                .await
                .is_err()
            {
                return Ok(());
            }
            if acked.await.is_err() {
                // The daemon is going away without applying: read this
                // batch again next time.
                return Ok(());
            }
            self.inner.applied.fetch_add(n, Ordering::Relaxed);
            self.note_position(&newest);
            *last_id = Some(newest);
        }
    }

    async fn reader_connection(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let mut last = None;
        for url in &self.inner.settings.redis {
            let client = redis::Client::open(url.as_str())?;
            let cfg = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(COMMAND_TIMEOUT))
                .set_response_timeout(Some(READ_BLOCK + COMMAND_TIMEOUT));
            match client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await
            {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or_else(|| anyhow::anyhow!("no Redis URL"), Into::into))
    }

    /// Whether entries after `id` were trimmed before this node read them.
    async fn gap_after(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        stream: &str,
        id: &str,
    ) -> anyhow::Result<bool> {
        let info: redis::RedisResult<std::collections::HashMap<String, redis::Value>> =
            redis::cmd("XINFO")
                .arg("STREAM")
                .arg(stream)
                .query_async(conn)
                .await;
        let info = match info {
            Ok(i) => i,
            Err(e)
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) =>
            {
                // No stream at all: nothing was ever published, or Redis
                // lost its data. Remote blocks already here stay until
                // they expire; nothing to replay.
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        let id_field = |name: &str| {
            info.get(name)
                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
        };
        // Trimming removes from the front and moves `recorded-first-entry-id`;
        // XDEL moves `max-deleted-entry-id`. Either beyond our place means
        // entries we never read are gone. (A first entry that is exactly
        // our next one also counts: a needless resync, never a lost entry.)
        let count = |name: &str| {
            info.get(name)
                .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
        };
        // Nothing ever left the stream: whatever came after us is there.
        if let (Some(added), Some(len)) = (count("entries-added"), count("length")) {
            if added == len {
                return Ok(false);
            }
        }
        let after_us = |other: Option<String>| {
            other.is_some_and(|o| wire::id_cmp(id, &o) == Some(std::cmp::Ordering::Less))
        };
        Ok(after_us(id_field("max-deleted-entry-id"))
            || after_us(id_field("recorded-first-entry-id")))
    }

    /// Sends the fleet's whole block set; returns the stream position it
    /// reflects.
    async fn resync(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        apply: &mpsc::Sender<Incoming>,
    ) -> anyhow::Result<String> {
        self.inner.resyncs.fetch_add(1, Ordering::Relaxed);
        let k = &self.inner.keys;
        // The position first: entries added while the keys are read are
        // then read again from the stream, and applying twice is harmless.
        let top: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(k.stream())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(conn)
            .await?;
        let position = top
            .ids
            .first()
            .map_or_else(|| "0-0".to_owned(), |e| e.id.clone());
        let keys = scan(conn, &k.block_pattern()).await?;
        let mut blocks = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(500) {
            let values: Vec<Option<String>> = conn.mget(chunk).await?;
            for (key, value) in chunk.iter().zip(values) {
                let (Some(net), Some(value)) = (k.block_net(key), value) else {
                    continue;
                };
                match Event::from_snapshot(net, &value) {
                    Ok(ev) => blocks.push(ev),
                    Err(e) => tracing::error!("cluster: snapshot key {key} skipped: {e}"),
                }
            }
        }
        tracing::info!(
            "cluster: resynchronising from the snapshot: {} blocks in the fleet",
            blocks.len()
        );
        let (done, acked) = oneshot::channel();
        apply
            .send(Incoming::Snapshot {
                blocks,
                last_id: position.clone(),
                done,
            })
            .await
            .map_err(|_| anyhow::anyhow!("the daemon stopped"))?;
        acked
            .await
            .map_err(|_| anyhow::anyhow!("the daemon stopped"))?;
        Ok(position)
    }

    /// Says this node is alive, and measures its lag.
    async fn heartbeat_loop(&self, stop: &CancellationToken) {
        loop {
            if self.shares(Share::Blocks) {
                let _ = tokio::time::timeout(COMMAND_TIMEOUT, self.measure_lag()).await;
            }
            if let Some(mut conn) = self.inner.conn.read().await.clone() {
                let beat = wire::Heartbeat {
                    node: self.inner.node.clone(),
                    at_ms: now_ms(),
                    lag: self.inner.lag.load(Ordering::Relaxed),
                    queued: self.queued(),
                };
                let json = serde_json::to_string(&beat).unwrap_or_default();
                let key = self.inner.keys.node(&self.inner.node);
                let ttl = u64::try_from(HEARTBEAT_TTL.as_millis()).unwrap_or(30_000);
                let r = tokio::time::timeout(
                    COMMAND_TIMEOUT,
                    redis::cmd("SET")
                        .arg(key)
                        .arg(json)
                        .arg("PX")
                        .arg(ttl)
                        .query_async::<()>(&mut conn),
                )
                .await;
                match r {
                    Ok(Ok(())) => self.up(),
                    Ok(Err(e)) => self.down("heartbeat", &e),
                    Err(_) => self.down("heartbeat", &"no answer in 2s"),
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
    }

    fn note_position(&self, id: &str) {
        *self
            .inner
            .position
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(id.to_owned());
    }

    /// Records how many stream entries are past the position applied
    /// last (counted up to 10,000).
    async fn measure_lag(&self) {
        let Some(mut conn) = self.inner.conn.read().await.clone() else {
            return;
        };
        let applied_id = self
            .inner
            .position
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(applied_id) = applied_id else {
            return;
        };
        let r: redis::RedisResult<redis::streams::StreamRangeReply> = redis::cmd("XRANGE")
            .arg(self.inner.keys.stream())
            .arg(format!("({applied_id}"))
            .arg("+")
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await;
        if let Ok(r) = r {
            self.inner.lag.store(r.ids.len() as u64, Ordering::Relaxed);
        }
    }
}

/// Every key matching `pattern`.
async fn scan<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    pattern: &str,
) -> redis::RedisResult<Vec<String>> {
    let mut cursor = 0u64;
    let mut out = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        out.extend(keys);
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}

/// A Redis URL without its password, for logs.
fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Retry delays: 100 ms doubling to 5 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(Duration::from_millis(100))
    }

    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        d
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            super::redacted("redis://app:s3cret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(super::redacted("redis://h:1"), "redis://h:1");
    }
}
