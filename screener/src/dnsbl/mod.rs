//! DNSBL/DNSWL scoring.
//!
//! When a client connects, [`Dnsbl::score`] asks every enabled list about it
//! at once, while the greeting wait runs; whatever has arrived by the end of
//! that wait is scored (`answer.rs` explains how, and why operators' error
//! answers are not listings) and the rest is ignored, so
//! scoring costs no more than the slowest list that made it in time.
//!
//! SHARING AND CACHING. A bot opens many connections at once; all of them
//! share one in-flight query per list. Answers are kept, per list and
//! client, for their DNS TTL (an unlisted client's negative TTL from the
//! SOA), so the lists see one query per client per TTL. A lookup keeps going
//! after the caller's deadline so its answer is there for the next
//! connection. Failures are not cached: the next connection asks again.
//!
//! LISTS THAT BREAK. A list that lists the world (an expired domain parked
//! behind a wildcard, a list shut down by answering everything) would
//! reject all mail. [`Dnsbl::spawn_health_checks`] asks each list for the
//! RFC 5782 test points at start-up and every `health_interval`; a list
//! that lists the must-not point of an address family is switched off for
//! that family, logged as an error and shown in the stats, until it stops
//! (see `health.rs`). Nothing else switches a list off.
//!
//! SECRET DOMAINS. `reply_map` gives a list's query domain a public name;
//! replies, logs and stats only ever use the public name. hickory's own
//! debug-level events name the queries they send, so the daemon's log
//! filter must keep the `hickory_proto` and `hickory_resolver` targets at
//! `info` or above.

// TTLs are DNS seconds; `from_secs(3600)` reads better beside them than
// `from_hours(1)`.
#![expect(
    clippy::duration_suboptimal_units,
    reason = "TTLs are counted in seconds"
)]

mod answer;
mod health;
mod lookup;
mod spec;

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod rbldnsd_tests;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::{join_all, FutureExt as _, Shared};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::metrics::{Histogram, HistogramSnapshot};

pub use answer::Score;
pub use spec::{Filter, SiteSpec, SiteSpecError};

use answer::{judge, Answer, Failure, Judgement, Tally};
use lookup::{query_name, Source};

/// How many answers the cache holds at most; beyond that, new answers are
/// not cached until old ones expire.
const CACHE_CAPACITY: usize = 100_000;

/// Engine settings, read from `screen.dnsbl_*` and `dns.nameservers`.
#[derive(Debug, Clone)]
pub struct DnsblOptions {
    /// `dnsbl_sites`, parsed.
    pub sites: Vec<SiteSpec>,
    /// `dns.nameservers`; empty: the system's resolver configuration.
    pub nameservers: Vec<SocketAddr>,
    /// `dnsbl_timeout`: how long one lookup may take in all.
    pub timeout: Duration,
    /// `dnsbl_min_ttl`: the shortest time a result holds.
    pub min_ttl: Duration,
    /// `dnsbl_max_ttl`: the longest time a result holds.
    pub max_ttl: Duration,
    /// `dnsbl_reply_map`: query domain → public name.
    pub reply_map: BTreeMap<String, String>,
    /// `dnsbl_health_interval`: how often the RFC 5782 test points are
    /// checked.
    pub health_interval: Duration,
    /// `dnsbl_health_skip`: lists never checked (query domains or public
    /// names), for private lists whose operator knows better.
    pub health_skip: Vec<String>,
}

impl Default for DnsblOptions {
    fn default() -> Self {
        DnsblOptions {
            // No lists: scoring is off unless configured.
            sites: Vec::new(),
            // The system resolver, like every other program on the host.
            nameservers: Vec::new(),
            // postscreen's dnsbl_timeout.
            timeout: Duration::from_secs(10),
            // postscreen's dnsbl_min_ttl and dnsbl_max_ttl.
            min_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(3600),
            reply_map: BTreeMap::new(),
            // Often enough to notice a list going rogue within the hour,
            // rare enough to be invisible in the list's query volume.
            health_interval: Duration::from_secs(600),
            // Every list is checked.
            health_skip: Vec::new(),
        }
    }
}

/// A DNSBL engine setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum DnsblError {
    /// An option is out of range.
    #[error("{name}: {reason}")]
    BadOption {
        /// The configuration key.
        name: &'static str,
        /// Why the value cannot work.
        reason: String,
    },
    /// The system resolver configuration could not be read.
    #[error("cannot read the system resolver configuration: {0}")]
    SystemResolver(String),
}

/// Counters for the admin socket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DnsblStats {
    /// DNS lookups sent (health checks not included).
    pub queries: u64,
    /// Scores answered from the answer cache, per list.
    pub cache_hits: u64,
    /// Lookups joined while another connection's was in flight.
    pub shared_lookups: u64,
    /// Lookups still unanswered at a caller's deadline.
    pub late_answers: u64,
    /// All lists' error answers together.
    pub error_answers: u64,
    /// All lists' DNS failures together.
    pub dns_failures: u64,
    /// Public names of the lists the health check has switched off for
    /// IPv4 clients, IPv6 clients or both.
    pub disabled_sites: Vec<String>,
    /// All lists' health warnings together.
    pub health_warnings: u64,
    /// Per list, by public name.
    pub sites: BTreeMap<String, SiteStats>,
}

/// One list's counters.
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent flags of one JSON record in `stats`"
)]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SiteStats {
    /// Lookups sent.
    pub queries: u64,
    /// Answers that were operator error codes.
    pub error_answers: u64,
    /// Timeouts, SERVFAILs, transport errors.
    pub dns_failures: u64,
    /// Whether the health check has switched it off for either family.
    pub disabled: bool,
    /// Switched off for IPv4 clients: it lists 127.0.0.1.
    pub disabled_ipv4: bool,
    /// Switched off for IPv6 clients: it lists `::ffff:7f00:1`.
    pub disabled_ipv6: bool,
    /// How many times the health check has switched a family off.
    pub times_disabled: u64,
    /// Health checks that found a family listing the world.
    pub health_failures: u64,
    /// Health checks that found something odd but harmless (a missing
    /// positive test point, an uncounted answer for a must-not one).
    pub health_warnings: u64,
    /// In `dnsbl_health_skip`: never checked.
    pub health_skipped: bool,
    /// Health checks completed (with or without an answer).
    pub health_checks: u64,
    /// Lookup latency (health checks not included).
    pub latency: HistogramSnapshot,
}

/// The DNSBL engine; cheap to clone.
#[derive(Clone)]
pub struct Dnsbl {
    inner: Arc<Inner>,
}

/// One list domain; several entries may share it (one query serves all).
struct Domain {
    /// The query domain, lower case, no trailing dot. May be secret.
    name: String,
    /// What logs, replies and stats call it.
    public: String,
    /// Indices into `Inner::entries` of the entries with this domain.
    entries: Vec<usize>,
    /// Per [`Family`]: cleared by a health check that finds the family
    /// listing the world, set again by one that does not.
    enabled: [AtomicBool; 2],
    /// Per [`Family`]: a health check has seen the positive test point,
    /// so losing it is worth a warning.
    served: [AtomicBool; 2],
    /// In `dnsbl_health_skip`: never checked, never switched off.
    health_skip: bool,
    queries: AtomicU64,
    error_answers: AtomicU64,
    dns_failures: AtomicU64,
    times_disabled: AtomicU64,
    health_failures: AtomicU64,
    /// Checks that found something odd but harmless.
    health_warnings: AtomicU64,
    /// Checks completed, so a test or an operator can tell one has run.
    health_checks: AtomicU64,
    /// How long its lookups took (a timeout counts as the timeout).
    latency: Histogram,
}

/// An address family, judged apart by the health checks: a list may hold
/// one family only, or break for one only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// The family a (canonical) client address is queried in.
    fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Index into the per-family arrays of [`Domain`].
    fn index(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }

    /// As logs say it.
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// An answer being fetched, shared by every caller waiting for it.
type Pending = Shared<oneshot::Receiver<Answer>>;

/// The answer cache and in-flight lookups.
#[derive(Default)]
struct Cache {
    /// Keyed by (domain index, client).
    slots: HashMap<(usize, IpAddr), Slot>,
    /// When expired answers were last swept out; sweeps run only when the
    /// cache is full, at most once a second, so a full cache of live answers
    /// costs no scan per insert.
    last_sweep: Option<Instant>,
}

enum Slot {
    /// In flight.
    Pending(Pending),
    /// Arrived at `at`, good until `expires`.
    Ready {
        answer: Answer,
        at: Instant,
        expires: Instant,
    },
}

struct Inner {
    /// Configuration order; the reply names the largest weight, first wins.
    entries: Vec<SiteSpec>,
    /// Domain index of each entry.
    entry_domain: Vec<usize>,
    domains: Vec<Domain>,
    source: Arc<dyn Source>,
    timeout: Duration,
    min_ttl: Duration,
    max_ttl: Duration,
    health_interval: Duration,
    cache: Mutex<Cache>,
    cache_capacity: usize,
    queries: AtomicU64,
    cache_hits: AtomicU64,
    shared_lookups: AtomicU64,
    late_answers: AtomicU64,
}

impl Dnsbl {
    /// Checks the options and builds the resolver. Needs no runtime; the
    /// lookups do.
    pub fn new(opts: DnsblOptions) -> Result<Dnsbl, DnsblError> {
        let source = lookup::Hickory::new(&opts.nameservers, opts.timeout)
            .map_err(|e| DnsblError::SystemResolver(e.to_string()))?;
        Self::with_source(opts, Arc::new(source), CACHE_CAPACITY)
    }

    fn with_source(
        opts: DnsblOptions,
        source: Arc<dyn Source>,
        cache_capacity: usize,
    ) -> Result<Dnsbl, DnsblError> {
        let bad = |name, reason: &str| DnsblError::BadOption {
            name,
            reason: reason.to_owned(),
        };
        if opts.timeout.is_zero() {
            return Err(bad("dnsbl_timeout", "must be more than 0"));
        }
        if opts.min_ttl > opts.max_ttl {
            return Err(bad("dnsbl_min_ttl", "is larger than dnsbl_max_ttl"));
        }
        if opts.health_interval.is_zero() {
            return Err(bad("dnsbl_health_interval", "must be more than 0"));
        }
        let mut reply_map = BTreeMap::new();
        for (domain, public) in &opts.reply_map {
            let domain = spec::normalize_domain(domain).map_err(|e| DnsblError::BadOption {
                name: "dnsbl_reply_map",
                reason: e,
            })?;
            if public.is_empty() || public.chars().any(char::is_whitespace) {
                // Not naming the key: it is the secret.
                return Err(bad(
                    "dnsbl_reply_map",
                    "a public name is empty or contains white space",
                ));
            }
            if !opts.sites.iter().any(|s| s.domain == domain) {
                // A mistyped key would leave the real secret unmapped, in
                // every reply; the key itself is not echoed for the same
                // reason.
                return Err(bad(
                    "dnsbl_reply_map",
                    &format!("the key for public name \"{public}\" is not a dnsbl_sites domain"),
                ));
            }
            reply_map.insert(domain, public.clone());
        }

        // Skip names may be query domains or public names.
        let mut skip = Vec::new();
        for (i, name) in opts.health_skip.iter().enumerate() {
            let by_public = reply_map
                .iter()
                .find(|(_, public)| public.eq_ignore_ascii_case(name))
                .map(|(domain, _)| domain.clone());
            let domain = by_public.or_else(|| {
                spec::normalize_domain(name)
                    .ok()
                    .filter(|d| opts.sites.iter().any(|s| &s.domain == d))
            });
            let Some(domain) = domain else {
                // Not echoed: a mistyped secret domain must not reach a log.
                return Err(bad(
                    "dnsbl_health_skip",
                    &format!(
                        "entry {} names no dnsbl_sites domain and no dnsbl_reply_map public name",
                        i + 1
                    ),
                ));
            };
            skip.push(domain);
        }

        let mut domains: Vec<Domain> = Vec::new();
        let mut entry_domain = Vec::new();
        for (i, site) in opts.sites.iter().enumerate() {
            let d = if let Some(d) = domains.iter().position(|d| d.name == site.domain) {
                d
            } else {
                domains.push(Domain {
                    name: site.domain.clone(),
                    public: reply_map
                        .get(&site.domain)
                        .cloned()
                        .unwrap_or_else(|| site.domain.clone()),
                    entries: Vec::new(),
                    enabled: [AtomicBool::new(true), AtomicBool::new(true)],
                    served: [AtomicBool::new(false), AtomicBool::new(false)],
                    health_skip: skip.contains(&site.domain),
                    queries: AtomicU64::new(0),
                    error_answers: AtomicU64::new(0),
                    dns_failures: AtomicU64::new(0),
                    times_disabled: AtomicU64::new(0),
                    health_failures: AtomicU64::new(0),
                    health_warnings: AtomicU64::new(0),
                    health_checks: AtomicU64::new(0),
                    latency: Histogram::new(crate::metrics::DNSBL_LATENCY_MS),
                });
                domains.len() - 1
            };
            domains[d].entries.push(i);
            entry_domain.push(d);
        }

        Ok(Dnsbl {
            inner: Arc::new(Inner {
                entries: opts.sites,
                entry_domain,
                domains,
                source,
                timeout: opts.timeout,
                min_ttl: opts.min_ttl,
                max_ttl: opts.max_ttl,
                health_interval: opts.health_interval,
                cache: Mutex::default(),
                cache_capacity,
                queries: AtomicU64::new(0),
                cache_hits: AtomicU64::new(0),
                shared_lookups: AtomicU64::new(0),
                late_answers: AtomicU64::new(0),
            }),
        })
    }

    /// Whether any list is configured at all.
    pub fn is_empty(&self) -> bool {
        self.inner.entries.is_empty()
    }

    /// Queries every enabled list in parallel; answers arriving after
    /// `deadline` don't count. Concurrent calls for the same client share
    /// one lookup per list. Never fails: DNS trouble scores 0.
    pub async fn score(&self, ip: IpAddr, deadline: Instant) -> Score {
        let inner = &self.inner;
        // A dual-stack socket shows IPv4 clients as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        let family = Family::of(ip).index();
        let mut answers: Vec<Option<Answer>> = vec![None; inner.domains.len()];
        let mut waits: Vec<(usize, Pending)> = Vec::new();
        let mut to_start = Vec::new();
        {
            let now = Instant::now();
            let mut cache = inner.lock_cache();
            for (d, domain) in inner.domains.iter().enumerate() {
                if !domain.enabled[family].load(Ordering::Relaxed) {
                    continue;
                }
                match cache.slots.get(&(d, ip)) {
                    Some(Slot::Ready {
                        answer,
                        at,
                        expires,
                    }) if *expires > now => {
                        inner.cache_hits.fetch_add(1, Ordering::Relaxed);
                        answers[d] = Some(answer.aged(now - *at));
                    }
                    Some(Slot::Pending(pending)) => {
                        inner.shared_lookups.fetch_add(1, Ordering::Relaxed);
                        waits.push((d, pending.clone()));
                    }
                    Some(Slot::Ready { .. }) | None => {
                        let (tx, rx) = oneshot::channel();
                        let pending = rx.shared();
                        cache.slots.insert((d, ip), Slot::Pending(pending.clone()));
                        waits.push((d, pending));
                        to_start.push((d, tx));
                    }
                }
            }
        }
        for (d, tx) in to_start {
            let inner = Arc::clone(inner);
            tokio::spawn(async move { inner.lookup(d, ip, tx).await });
        }

        let arrived = join_all(waits.into_iter().map(|(d, pending)| async move {
            (d, tokio::time::timeout_at(deadline, pending).await)
        }))
        .await;
        for (d, result) in arrived {
            match result {
                Ok(Ok(answer)) => answers[d] = Some(answer),
                // The lookup task died (runtime shutting down).
                Ok(Err(_)) => answers[d] = Some(Answer::Failed(Failure::Transport)),
                Err(_) => {
                    inner.late_answers.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        site = %inner.domains[d].public,
                        client = %ip,
                        "DNSBL answer not in time; not counted"
                    );
                }
            }
        }

        let entries: Vec<Tally<'_>> = inner
            .entries
            .iter()
            .zip(&inner.entry_domain)
            .filter(|(_, &d)| inner.domains[d].enabled[family].load(Ordering::Relaxed))
            .map(|(site, &d)| Tally {
                site,
                public: &inner.domains[d].public,
                answer: answers[d].as_ref(),
            })
            .collect();
        answer::tally(&entries, inner.min_ttl, inner.max_ttl)
    }

    /// Starts the RFC 5782 health checks (now and every `health_interval`)
    /// on the current runtime. The task ends when the last `Dnsbl` clone is
    /// dropped.
    pub fn spawn_health_checks(&self) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        let period = self.inner.health_interval;
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                Dnsbl { inner }.check_health().await;
            }
        })
    }

    /// Runs one round of health checks on every list now.
    pub async fn check_health(&self) {
        join_all((0..self.inner.domains.len()).map(|d| health::check(&self.inner, d))).await;
    }

    /// The counters, for the admin socket.
    pub fn stats(&self) -> DnsblStats {
        let inner = &self.inner;
        let mut stats = DnsblStats {
            queries: inner.queries.load(Ordering::Relaxed),
            cache_hits: inner.cache_hits.load(Ordering::Relaxed),
            shared_lookups: inner.shared_lookups.load(Ordering::Relaxed),
            late_answers: inner.late_answers.load(Ordering::Relaxed),
            ..DnsblStats::default()
        };
        for domain in &inner.domains {
            let off = |f: Family| !domain.enabled[f.index()].load(Ordering::Relaxed);
            let (off4, off6) = (off(Family::V4), off(Family::V6));
            let warnings = domain.health_warnings.load(Ordering::Relaxed);
            let site = stats.sites.entry(domain.public.clone()).or_default();
            site.queries += domain.queries.load(Ordering::Relaxed);
            site.error_answers += domain.error_answers.load(Ordering::Relaxed);
            site.dns_failures += domain.dns_failures.load(Ordering::Relaxed);
            site.times_disabled += domain.times_disabled.load(Ordering::Relaxed);
            site.health_failures += domain.health_failures.load(Ordering::Relaxed);
            site.health_warnings += warnings;
            site.health_checks += domain.health_checks.load(Ordering::Relaxed);
            site.latency.merge(&domain.latency.snapshot());
            site.health_skipped |= domain.health_skip;
            site.disabled_ipv4 |= off4;
            site.disabled_ipv6 |= off6;
            site.disabled |= off4 || off6;
            stats.error_answers += domain.error_answers.load(Ordering::Relaxed);
            stats.dns_failures += domain.dns_failures.load(Ordering::Relaxed);
            stats.health_warnings += warnings;
            if (off4 || off6) && !stats.disabled_sites.contains(&domain.public) {
                stats.disabled_sites.push(domain.public.clone());
            }
        }
        stats
    }
}

impl Inner {
    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // The map stays consistent across a panic elsewhere: every update is
        // a single insert or remove.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fetches one list's answer about `ip`, logs and counts it, caches it
    /// and hands it to everyone waiting.
    async fn lookup(&self, d: usize, ip: IpAddr, tx: oneshot::Sender<Answer>) {
        let domain = &self.domains[d];
        self.queries.fetch_add(1, Ordering::Relaxed);
        domain.queries.fetch_add(1, Ordering::Relaxed);
        let name = query_name(ip, &domain.name);
        let sent = Instant::now();
        let answer = tokio::time::timeout(self.timeout, self.source.query(name))
            .await
            .unwrap_or(Answer::Failed(Failure::Timeout));
        domain.latency.observe(sent.elapsed());
        self.note(d, ip, &answer);
        {
            let now = Instant::now();
            let mut cache = self.lock_cache();
            // The in-flight slot goes; the answer takes its place if there
            // is room.
            cache.slots.remove(&(d, ip));
            if let Some(ttl) = answer.cache_ttl() {
                let life = Duration::from_secs(u64::from(ttl)).min(self.max_ttl);
                if cache.slots.len() >= self.cache_capacity
                    && cache
                        .last_sweep
                        .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
                {
                    cache.last_sweep = Some(now);
                    cache.slots.retain(|_, slot| match slot {
                        Slot::Pending(_) => true,
                        Slot::Ready { expires, .. } => *expires > now,
                    });
                }
                if cache.slots.len() < self.cache_capacity {
                    cache.slots.insert(
                        (d, ip),
                        Slot::Ready {
                            answer: answer.clone(),
                            at: now,
                            expires: now + life,
                        },
                    );
                }
            }
        }
        // Nobody waiting any more is fine: the answer is cached.
        let _ = tx.send(answer);
    }

    /// Logs every listing as postscreen's dnsblog does, and logs and
    /// counts error answers and DNS failures, once per answer (not once
    /// per waiting connection).
    fn note(&self, d: usize, ip: IpAddr, answer: &Answer) {
        let domain = &self.domains[d];
        match answer {
            Answer::Listed { addrs, .. } => {
                // One line per A record, as dnsblog(8) writes them (error
                // codes too: which code a list answered is what an
                // operator looks for), under the public name.
                for a in addrs {
                    tracing::info!(
                        target: crate::logging::DNSBLOG_TARGET,
                        site = %domain.public,
                        client = %ip,
                        "addr {ip} listed by domain {} as {a}",
                        domain.public
                    );
                }
                let mut codes: Vec<std::net::Ipv4Addr> = Vec::new();
                for &e in &domain.entries {
                    if let Judgement::Error(errs) = judge(&self.entries[e], addrs) {
                        for code in errs {
                            if !codes.contains(&code) {
                                codes.push(code);
                            }
                        }
                    }
                }
                if !codes.is_empty() {
                    domain.error_answers.fetch_add(1, Ordering::Relaxed);
                    let codes: Vec<String> = codes.iter().map(ToString::to_string).collect();
                    tracing::warn!(
                        site = %domain.public,
                        client = %ip,
                        code = %codes.join(","),
                        "DNSBL error answer from {}: {}; not a listing",
                        domain.public,
                        codes.join(",")
                    );
                }
            }
            Answer::Failed(failure) => {
                domain.dns_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    site = %domain.public,
                    client = %ip,
                    failure = %failure,
                    "DNSBL lookup at {} failed: {failure}; scoring 0",
                    domain.public
                );
            }
            Answer::NotListed { .. } => {}
        }
    }
}
