//! `stats` as metric families: every figure `screener stats` prints, under
//! a Prometheus name.
//!
//! NAMES. `screener_` first, then the part of the daemon (`smtp`, `dnsbl`,
//! `xdp`, `store`), units spelled out (`_seconds`, `_entries`), counters
//! ending in `_total` (the encoder appends it), one family per figure with
//! the dimension a dashboard splits by as a label (`outcome`, `test`,
//! `reason`, `site`, `map`). A section `stats` shows as `null` (no gate,
//! no DNSBL lists) has no families: an absent series says "not running",
//! a zero would say "nothing happened".

use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet},
    metrics::MetricType,
    registry::{Registry, Unit},
};

use super::HistogramSnapshot;
use crate::daemon::Stats;

/// The collector the endpoint's registry holds: it renders whatever
/// `source` answers at scrape time.
pub struct StatsCollector<F> {
    /// Reads the daemon's counters now; `None` once the daemon is gone.
    source: F,
}

impl<F> fmt::Debug for StatsCollector<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StatsCollector")
    }
}

impl<F: Fn() -> Option<Stats> + Send + Sync + 'static> Collector for StatsCollector<F> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        match (self.source)() {
            Some(stats) => encode(&stats, &mut encoder),
            None => Ok(()),
        }
    }
}

/// The endpoint's registry: one collector over `source`.
pub fn registry(source: impl Fn() -> Option<Stats> + Send + Sync + 'static) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(StatsCollector { source }));
    r
}

/// Writes one family per figure of `s`.
pub fn encode(s: &Stats, e: &mut DescriptorEncoder) -> fmt::Result {
    daemon(s, e)?;
    smtp(s, e)?;
    if let Some(d) = &s.dnsbl {
        dnsbl(d, e)?;
    }
    if let Some(k) = &s.kernel {
        kernel(k, e)?;
    }
    if let Some(c) = &s.cluster {
        cluster(c, e)?;
    }
    store(s, e)
}

/// The fleet link, when `[cluster]` is on.
fn cluster(c: &crate::cluster::Status, e: &mut DescriptorEncoder) -> fmt::Result {
    gauge(
        e,
        "screener_cluster_connected",
        "1 while Redis answers; 0 while this node screens alone.",
        u64::from(c.connected),
    )?;
    gauge(
        e,
        "screener_cluster_lag_entries",
        "Fleet stream entries not yet applied here (counted up to 10000).",
        c.lag,
    )?;
    gauge(
        e,
        "screener_cluster_queued",
        "Verdicts and passes waiting for Redis.",
        c.queued,
    )?;
    counter(
        e,
        "screener_cluster_dropped",
        "Outgoing verdicts and passes dropped because the queue was full.",
        c.dropped,
    )?;
    counter(
        e,
        "screener_cluster_published",
        "Verdicts this node published to the fleet.",
        c.published,
    )?;
    counter(
        e,
        "screener_cluster_applied",
        "Other nodes' verdicts applied here.",
        c.applied,
    )?;
    counter(
        e,
        "screener_cluster_pass_timeouts",
        "Pass lookups that ran out of cluster.pass_timeout.",
        c.pass_timeouts,
    )?;
    counter(
        e,
        "screener_cluster_resyncs",
        "Times this node rebuilt its fleet blocks from the snapshot.",
        c.resyncs,
    )
}

fn daemon(s: &Stats, e: &mut DescriptorEncoder) -> fmt::Result {
    let d = &s.daemon;
    gauge(
        e,
        "screener_uptime_seconds",
        "Seconds since the daemon started.",
        d.uptime_secs,
    )?;
    gauge(
        e,
        "screener_config_generation",
        "Configurations applied since start (0: the one started with; each SIGHUP adds one).",
        d.config_generation,
    )?;
    gauge(
        e,
        "screener_config_restart_pending_keys",
        "Keys changed in the file that take effect only on restart.",
        d.config_restart_pending.len() as u64,
    )?;
    gauge(
        e,
        "screener_xdp_attached",
        "1 when every configured interface runs the program.",
        u64::from(d.xdp_attached),
    )?;
    let ifs: Vec<(&str, u64)> = d
        .xdp_interfaces
        .iter()
        .map(|i| (i.interface.as_str(), u64::from(i.attached)))
        .collect();
    gauges(
        e,
        "screener_xdp_interface_attached",
        "1 when the interface runs the program.",
        "interface",
        ifs,
    )?;
    let v = &d.verdicts;
    counters(
        e,
        "screener_blocks",
        "Blocks made, by reason (screening failures, escalations, operators).",
        "reason",
        v.blocks_by_reason.iter().map(|(r, n)| (*r, *n)),
    )?;
    counters(
        e,
        "screener_unblocks",
        "Blocks removed, by cause (operator, expired).",
        "cause",
        v.unblocks_by_cause.iter().map(|(c, n)| (*c, *n)),
    )?;
    counter(
        e,
        "screener_blocks_refused_full",
        "Blocks a full kernel map refused (raise xdp.max_hosts or xdp.max_prefixes).",
        v.blocks_refused_full,
    )?;
    counter(
        e,
        "screener_blocks_skipped_protected",
        "Verdicts not made because the client is protected (allow entry, access list, DNSWL, local).",
        v.blocks_skipped_protected,
    )?;
    counter(
        e,
        "screener_escalations",
        "Hosts' verdicts that became a /24 (/48) block.",
        v.escalations,
    )
}

fn smtp(s: &Stats, e: &mut DescriptorEncoder) -> fmt::Result {
    let m = &s.smtp;
    counter(
        e,
        "screener_smtp_connections",
        "SMTP connections accepted.",
        m.connections,
    )?;
    counters(
        e,
        "screener_smtp_connection_outcomes",
        "Connections ended, by how: handed_off, backend_error, passed (passed and closed \
         without a hand-off), failed, disconnected, busy, denylisted, descriptors_refused, \
         proxy_untrusted, proxy_error, shutdown. Every accepted connection ends with one.",
        "outcome",
        m.outcomes.iter().map(|(o, n)| (*o, *n)),
    )?;
    counters(
        e,
        "screener_smtp_passes",
        "Clients let through: new (passed their tests now), old (a cached pass).",
        "kind",
        [("new", m.pass_new), ("old", m.pass_old)],
    )?;
    counters(
        e,
        "screener_smtp_test_passes",
        "Screening tests passed, by test.",
        "test",
        m.passes.iter().map(|(t, n)| (t.name(), *n)),
    )?;
    counters(
        e,
        "screener_smtp_test_failures",
        "Screening test failures (any action), by test; denylist counts reject access rules.",
        "test",
        m.fails
            .tests
            .iter()
            .map(|(t, n)| (t.name(), *n))
            .chain([("denylist", m.fails.denylist)]),
    )?;
    counter(
        e,
        "screener_smtp_rejects",
        "Connections and RCPTs turned away (limits, denylist, enforce).",
        m.rejects,
    )?;
    counter(
        e,
        "screener_smtp_handoffs",
        "Clients handed to the backend.",
        m.handoffs,
    )?;
    counter(
        e,
        "screener_smtp_backend_errors",
        "Hand-offs the backend failed (refused, timed out, misbehaved).",
        m.backend_errors,
    )?;
    histogram_value(
        &mut e.encode_descriptor(
            "screener_smtp_screening_duration",
            "Time from the first test to the hand-off, pass, failure or hang-up, for screened clients.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?,
        &m.screening_time,
    )?;
    gauge(
        e,
        "screener_smtp_screening_clients",
        "Clients being screened now.",
        m.screening,
    )?;
    gauge(
        e,
        "screener_smtp_handed_off_clients",
        "Clients connected to the backend through the screener now.",
        m.handed_off,
    )?;
    gauge(
        e,
        "screener_stress_mode",
        "1 while stress mode (shorter deadlines) is on.",
        u64::from(m.stress),
    )?;
    let queue = &m.failure_queue;
    gauge(
        e,
        "screener_smtp_failure_queue_clients",
        "Failed clients waiting for the verdict task.",
        queue.queued,
    )?;
    counter(
        e,
        "screener_smtp_failure_queue_dropped",
        "Failures dropped because the verdict queue was full.",
        queue.dropped,
    )?;
    let fds = &m.descriptors;
    gauge(
        e,
        "screener_smtp_descriptors_held",
        "Client and backend sockets held now.",
        fds.held,
    )?;
    gauge(
        e,
        "screener_smtp_descriptors_cap",
        "Client and backend sockets the budget allows.",
        fds.cap,
    )
}

fn dnsbl(d: &crate::dnsbl::DnsblStats, e: &mut DescriptorEncoder) -> fmt::Result {
    let sites: Vec<(&str, &crate::dnsbl::SiteStats)> =
        d.sites.iter().map(|(n, s)| (n.as_str(), s)).collect();
    counters(
        e,
        "screener_dnsbl_queries",
        "DNS lookups sent, by list (health checks not included).",
        "site",
        sites.iter().map(|(n, s)| (*n, s.queries)),
    )?;
    let mut errors = e.encode_descriptor(
        "screener_dnsbl_errors",
        "Lookups that failed, by list and kind: error_answer (an operator error code), \
         dns_failure (timeout, SERVFAIL, transport error).",
        None,
        MetricType::Counter,
    )?;
    for (site, s) in &sites {
        for (kind, n) in [
            ("error_answer", s.error_answers),
            ("dns_failure", s.dns_failures),
        ] {
            let labels = [("site", *site), ("kind", kind)];
            counter_value(&mut errors.encode_family(&labels)?, n)?;
        }
    }
    let mut latency = e.encode_descriptor(
        "screener_dnsbl_lookup_duration",
        "DNS lookup latency, by list (a timeout counts as the timeout).",
        Some(&Unit::Seconds),
        MetricType::Histogram,
    )?;
    for (site, s) in &sites {
        histogram_value(&mut latency.encode_family(&[("site", *site)])?, &s.latency)?;
    }
    let mut disabled = e.encode_descriptor(
        "screener_dnsbl_site_disabled",
        "1 while the health check has switched the list off for the family \
         (it lists the whole world).",
        None,
        MetricType::Gauge,
    )?;
    for (site, s) in &sites {
        for (family, off) in [("ipv4", s.disabled_ipv4), ("ipv6", s.disabled_ipv6)] {
            let labels = [("site", *site), ("family", family)];
            disabled
                .encode_family(&labels)?
                .encode_gauge(&u64::from(off))?;
        }
    }
    counters(
        e,
        "screener_dnsbl_health_failures",
        "Health checks that found a list listing the world, by list.",
        "site",
        sites.iter().map(|(n, s)| (*n, s.health_failures)),
    )?;
    counter(
        e,
        "screener_dnsbl_cache_hits",
        "Scores answered from the answer cache.",
        d.cache_hits,
    )?;
    counter(
        e,
        "screener_dnsbl_shared_lookups",
        "Lookups joined while another connection's was in flight.",
        d.shared_lookups,
    )?;
    counter(
        e,
        "screener_dnsbl_late_answers",
        "Lookups still unanswered at a caller's deadline.",
        d.late_answers,
    )
}

fn kernel(k: &crate::xdp::maps::KernelStats, e: &mut DescriptorEncoder) -> fmt::Result {
    counters(
        e,
        "screener_xdp_packets_dropped",
        "Packets the XDP program dropped, by the reason of the entry that matched.",
        "reason",
        k.dropped_by_reason.iter().map(|(r, n)| (*r, *n)),
    )?;
    counters(
        e,
        "screener_xdp_packets_passed",
        "Packets the XDP program passed, by cause.",
        "cause",
        k.passed_by_cause.iter().map(|(c, n)| (*c, *n)),
    )?;
    gauges(
        e,
        "screener_xdp_map_entries",
        "Entries in each block and allow map.",
        "map",
        k.maps.iter().map(|m| (m.map, m.entries)),
    )?;
    gauges(
        e,
        "screener_xdp_map_max_entries",
        "Entries each block and allow map can hold (xdp.max_hosts, xdp.max_prefixes, \
         xdp.max_allows).",
        "map",
        k.maps.iter().map(|m| (m.map, m.max_entries)),
    )
}

fn store(s: &Stats, e: &mut DescriptorEncoder) -> fmt::Result {
    let h = &s.store;
    gauge(
        e,
        "screener_store_writable",
        "1 while the store writes; 0 during a failure episode (full or failing disk).",
        u64::from(h.writable),
    )?;
    gauge(
        e,
        "screener_store_queued_changes",
        "Verdict changes waiting to be written to the store.",
        h.queued as u64,
    )?;
    counter(
        e,
        "screener_store_queue_dropped",
        "Verdict changes the store queue dropped (the kernel holds them).",
        h.queue_dropped,
    )?;
    counter(
        e,
        "screener_store_failures",
        "Failed store operations.",
        h.failures,
    )
}

fn counter_value(m: &mut MetricEncoder, v: u64) -> fmt::Result {
    m.encode_counter::<NoLabelSet, u64, u64>(&v, None)
}

#[expect(
    clippy::cast_precision_loss,
    reason = "bucket bounds and a sum of microseconds, far below 2^52"
)]
fn histogram_value(m: &mut MetricEncoder, h: &HistogramSnapshot) -> fmt::Result {
    // The encoder wants per-bucket counts with +Inf last; the snapshot
    // holds cumulative ones.
    let mut below = 0;
    let mut buckets: Vec<(f64, u64)> = h
        .buckets
        .iter()
        .map(|b| {
            let n = b.1.saturating_sub(below);
            below = b.1;
            (b.0 as f64 / 1000.0, n)
        })
        .collect();
    buckets.push((f64::INFINITY, h.count.saturating_sub(below)));
    m.encode_histogram::<NoLabelSet>(h.sum_us as f64 / 1e6, h.count, &buckets, None)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    counter_value(
        &mut e.encode_descriptor(name, help, None, MetricType::Counter)?,
        v,
    )
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

fn counters<'l>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'l str, u64)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (l, v) in values {
        counter_value(&mut m.encode_family(&labelled(label, l))?, v)?;
    }
    Ok(())
}

fn gauges<'l>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'l str, u64)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (l, v) in values {
        m.encode_family(&labelled(label, l))?.encode_gauge(&v)?;
    }
    Ok(())
}

fn labelled<'a>(key: &'a str, value: &'a str) -> impl EncodeLabelSet + 'a {
    [(key, value)]
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::{
        daemon::DaemonStats,
        dnsbl::{DnsblStats, SiteStats},
        metrics::{Histogram, DNSBL_LATENCY_MS},
        xdp::maps::{KernelStats, MapFill},
    };

    /// `stats` with every section present and something counted in each.
    fn sample() -> Stats {
        let latency = Histogram::new(DNSBL_LATENCY_MS);
        latency.observe(std::time::Duration::from_millis(3));
        let site = SiteStats {
            queries: 4,
            dns_failures: 1,
            latency: latency.snapshot(),
            ..SiteStats::default()
        };
        let mut verdicts = crate::verdict::CountersSnapshot::default();
        verdicts.blocks_by_reason.insert("pregreet", 2);
        verdicts.unblocks_by_cause.insert("expired", 1);
        Stats {
            kernel: Some(KernelStats {
                dropped_by_reason: BTreeMap::from([("pregreet", 9)]),
                passed_by_cause: BTreeMap::from([("not_listed", 5)]),
                maps: vec![MapFill {
                    map: "block_v4",
                    entries: 3,
                    max_entries: 1 << 20,
                }],
                ..KernelStats::default()
            }),
            daemon: DaemonStats {
                uptime_secs: 1,
                xdp_attached: true,
                config_generation: 2,
                config_restart_pending: vec![],
                xdp_interfaces: vec![],
                verdicts,
            },
            store: crate::store::StoreHealth::default(),
            smtp: crate::smtp::SmtpStats {
                outcomes: crate::smtp::outcome::Outcome::ALL
                    .into_iter()
                    .map(|o| (o.name(), 1))
                    .collect(),
                ..crate::smtp::SmtpStats::default()
            },
            dnsbl: Some(DnsblStats {
                sites: BTreeMap::from([("zen.example".to_owned(), site)]),
                ..DnsblStats::default()
            }),
            cluster: None,
        }
    }

    fn exposition() -> String {
        let s = std::sync::Mutex::new(Some(sample()));
        super::super::render(&registry(move || s.lock().unwrap().take()))
    }

    /// The sample names of `text`, each checked against the family its
    /// `# TYPE` line declared: the suffixes `OpenMetrics` allows for that
    /// type and nothing else.
    fn sample_names(text: &str) -> BTreeSet<String> {
        let mut families: BTreeMap<String, String> = BTreeMap::new();
        let mut current: Option<(String, String)> = None;
        let mut names = BTreeSet::new();
        let body = text.strip_suffix("# EOF\n").expect("ends with # EOF");
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(
                    families.insert(name.into(), kind.into()).is_none(),
                    "{name} declared twice"
                );
                current = Some((name.into(), kind.into()));
                continue;
            }
            if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected line {line:?}");
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let (family, kind) = current.as_ref().expect("a sample before any TYPE");
            let suffix = name.strip_prefix(family.as_str()).unwrap_or("?");
            let allowed: &[&str] = match kind.as_str() {
                "counter" => &["_total"],
                "gauge" => &[""],
                "histogram" => &["_bucket", "_sum", "_count"],
                k => panic!("type {k}"),
            };
            assert!(allowed.contains(&suffix), "{name} in {kind} {family}");
            let value = line.rsplit(' ').next().expect("a value");
            assert!(value.parse::<f64>().is_ok(), "{line:?}");
            names.insert(name);
        }
        names
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let text = exposition();
        let names = sample_names(&text);
        for n in &names {
            assert!(n.starts_with("screener_"), "{n}");
        }
        assert!(names.contains("screener_blocks_total"));
        assert!(names.contains("screener_dnsbl_lookup_duration_seconds_bucket"));
        assert!(text.contains("screener_blocks_total{reason=\"pregreet\"} 2\n"));
        assert!(text.contains("screener_xdp_packets_dropped_total{reason=\"pregreet\"} 9\n"));
        assert!(text.contains("screener_xdp_map_max_entries{map=\"block_v4\"} 1048576\n"));
        assert!(text.contains(
            "screener_dnsbl_errors_total{site=\"zen.example\",kind=\"dns_failure\"} 1\n"
        ));
        // 3 ms is in the 5 ms bucket and above; +Inf holds every lookup.
        for (le, n) in [("0.002", 0), ("0.005", 1), ("+Inf", 1)] {
            let line = format!(
                "screener_dnsbl_lookup_duration_seconds_bucket{{le=\"{le}\",site=\"zen.example\"}} {n}\n"
            );
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(text
            .contains("screener_dnsbl_lookup_duration_seconds_sum{site=\"zen.example\"} 0.003\n"));
    }

    #[test]
    fn a_daemon_gone_leaves_an_empty_page() {
        assert_eq!(super::super::render(&registry(|| None)), "# EOF\n");
    }

    /// The dashboard the package ships queries only what the endpoint
    /// serves: a renamed family must not leave an empty panel behind.
    #[test]
    fn the_dashboard_parses_and_queries_only_served_metrics() {
        let text = include_str!("../../../dist/share/grafana-dashboard.json");
        let dash: serde_json::Value = serde_json::from_str(text).expect("dashboard JSON");
        let mut exprs = Vec::new();
        collect_exprs(&dash, &mut exprs);
        assert!(exprs.len() >= 10, "{exprs:?}");
        let served = sample_names(&exposition());
        let mut queried = BTreeSet::new();
        for e in &exprs {
            let mut rest = e.as_str();
            while let Some(i) = rest.find("screener_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                queried.insert(name);
            }
        }
        let missing: Vec<&String> = queried.iter().filter(|n| !served.contains(*n)).collect();
        assert!(missing.is_empty(), "queried but not served: {missing:?}");
        let titles: Vec<&str> = dash["panels"]
            .as_array()
            .expect("panels")
            .iter()
            .filter_map(|p| p["title"].as_str())
            .collect();
        for want in [
            "Connections by outcome",
            "Drops per reason at the NIC",
            "Map fill",
            "DNSBL latency per list",
            "DNSBL errors per list",
            "Stress mode",
        ] {
            assert!(titles.contains(&want), "no panel {want:?} in {titles:?}");
        }
    }

    fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone());
                        }
                        _ => collect_exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
            _ => {}
        }
    }
}
