//! The Prometheus endpoint: `GET /metrics` on `metrics.listen`, in the
//! `OpenMetrics` text format, built on `prometheus-client`.
//!
//! ONE SOURCE. The endpoint keeps no counter of its own. Its registry holds
//! one collector that, at each scrape, asks the daemon for the very
//! [`Stats`](crate::daemon::Stats) value `screener stats` prints and
//! renders it as metric families ([`families`]). The two views cannot
//! disagree, and a counter added to `stats` is one line away from the
//! endpoint. The kernel's per-CPU counters are summed at scrape time, as
//! `stats` sums them; nothing is polled between scrapes.
//!
//! The only values made here are the [`Histogram`]s: durations that
//! `stats` had no way to show (DNSBL latency per list, screening time).
//! They are lock-free fixed-bucket counters, observed where the time is
//! measured and read by both views.
//!
//! THE SERVER. A scrape is one short request from one scraper; a full
//! HTTP stack would be most of the code size for that. What is served:
//! `GET`/`HEAD /metrics` (any query string), `404` elsewhere, `405` for
//! other methods, each connection closed after one answer. A request head
//! must arrive within [`READ_TIMEOUT`] and fit in [`MAX_HEAD`]; at most
//! [`MAX_CONNECTIONS`] are served at once and the rest wait in the
//! kernel's backlog, so a stuck client costs one slot, not the daemon.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

pub mod families;

/// The content type of the `OpenMetrics` text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a client may take to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest request head read; Prometheus sends a few hundred bytes.
pub const MAX_HEAD: usize = 8 * 1024;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 8;

/// DNSBL lookup latency bounds, in milliseconds: from a local rbldnsd
/// (under a millisecond) to `screen.dnsbl_timeout`'s usual 10 s.
pub const DNSBL_LATENCY_MS: &[u64] = &[1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

/// Screening time bounds, in milliseconds: a cached pass takes
/// milliseconds, the greeting wait 6 s, the deep tests a whole dialogue.
pub const SCREENING_MS: &[u64] = &[
    10, 100, 500, 1000, 2000, 4000, 6000, 8000, 10000, 15000, 30000, 60000, 120_000, 300_000,
];

/// A lock-free histogram of durations with fixed bucket bounds.
pub struct Histogram {
    /// Upper bounds in milliseconds, ascending; `+Inf` follows implicitly.
    bounds_ms: &'static [u64],
    /// Observations per bucket, not cumulative; the last is `+Inf`.
    counts: Box<[AtomicU64]>,
    /// Sum of every observation, in microseconds (584 000 years fit).
    sum_us: AtomicU64,
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

impl Histogram {
    /// An empty histogram with `bounds_ms` (ascending) as bucket bounds.
    pub fn new(bounds_ms: &'static [u64]) -> Histogram {
        debug_assert!(bounds_ms.windows(2).all(|w| w[0] < w[1]));
        Histogram {
            bounds_ms,
            counts: (0..=bounds_ms.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Counts one duration.
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        // The first bucket whose bound is at least `d` (`le` semantics).
        let i = self
            .bounds_ms
            .partition_point(|&b| b.saturating_mul(1000) < us);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The current counts. Buckets are read one after another while
    /// others may count, so `count` and `sum` can be one observation
    /// apart; every bucket is monotonic all the same.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let per_bucket: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let mut cumulative = 0;
        let buckets = self
            .bounds_ms
            .iter()
            .zip(&per_bucket)
            .map(|(&le_ms, n)| {
                cumulative += n;
                Bucket(le_ms, cumulative)
            })
            .collect();
        HistogramSnapshot {
            count: per_bucket.iter().sum(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
            buckets,
        }
    }
}

/// A [`Histogram`] as `stats` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HistogramSnapshot {
    /// Observations.
    pub count: u64,
    /// Their sum, in microseconds.
    pub sum_us: u64,
    /// Cumulative counts up to each bound, `[le_ms, count]` (`+Inf` is
    /// `count`).
    pub buckets: Vec<Bucket>,
}

/// One cumulative bucket, shown as `[le_ms, count]` so that `stats`
/// prints a histogram on one line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Bucket(
    /// The upper bound, in milliseconds.
    pub u64,
    /// Observations at or below it.
    pub u64,
);

impl HistogramSnapshot {
    /// Adds `other`'s counts (same bounds) to these.
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        if self.buckets.is_empty() {
            *self = other.clone();
            return;
        }
        self.count += other.count;
        self.sum_us += other.sum_us;
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            a.1 += b.1;
        }
    }
}

/// The whole exposition of `registry`, `# EOF` included.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; a collector's error would be a bug
    // in `families`, and a partial page is still worth serving.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!("encoding the metrics: {e}");
    }
    out
}

/// Serves `registry` on `listener` until `stop` is cancelled; connections
/// in progress then end with the task.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, stop: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        // Reap finished connections so the set stays small.
        while conns.try_join_next().is_some() {}
        if conns.len() >= MAX_CONNECTIONS {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = conns.join_next() => continue,
            }
        }
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("metrics accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        conns.spawn(answer(stream, Arc::clone(&registry)));
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    /// `GET /metrics`: the exposition.
    Metrics,
    /// `HEAD /metrics`: its headers only.
    Head,
    /// Another path.
    NotFound,
    /// Another method.
    BadMethod,
    /// Not an HTTP request line.
    Malformed,
}

/// Reads the request line of `head`.
fn parse_request(head: &[u8]) -> Asked {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else {
        return Asked::Malformed;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Asked::Malformed;
    };
    if !version.starts_with("HTTP/1.") {
        return Asked::Malformed;
    }
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => Asked::Metrics,
        ("HEAD", "/metrics") => Asked::Head,
        ("GET" | "HEAD", _) => Asked::NotFound,
        _ => Asked::BadMethod,
    }
}

/// Answers one connection.
async fn answer(mut stream: TcpStream, registry: Arc<Registry>) {
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    let asked = match read {
        Ok(true) => parse_request(&head),
        // Timed out or gone: nothing to answer.
        _ => return,
    };
    let (status, ctype, body) = match asked {
        // Rendered on the worker, as the admin socket's `stats` is: a few
        // dozen map reads (the allow tries are walked, the big maps are
        // counted as they change), well under a millisecond. A blocking
        // thread would cost more: its own stack and malloc arena, which
        // showed as resident memory in the benchmark.
        Asked::Metrics | Asked::Head => ("200 OK", CONTENT_TYPE, render(&registry)),
        Asked::NotFound => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "screener serves its metrics at /metrics\n".to_owned(),
        ),
        Asked::BadMethod => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "GET or HEAD only\n".to_owned(),
        ),
        Asked::Malformed => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "not an HTTP/1 request\n".to_owned(),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if asked != Asked::Head {
        out.push_str(&body);
    }
    let _ = tokio::time::timeout(READ_TIMEOUT, async {
        let _ = stream.write_all(out.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_observation_lands_in_the_first_bucket_at_or_above_it() {
        let h = Histogram::new(&[1, 10, 100]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_millis(2));
        h.observe(Duration::from_secs(1));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.sum_us, 500 + 1000 + 2000 + 1_000_000);
        let counts: Vec<(u64, u64)> = s.buckets.iter().map(|b| (b.0, b.1)).collect();
        // Cumulative; the one-second observation is only in +Inf.
        assert_eq!(counts, vec![(1, 2), (10, 3), (100, 3)]);
    }

    #[test]
    fn merged_snapshots_add_up() {
        let (a, b) = (Histogram::new(&[1, 10]), Histogram::new(&[1, 10]));
        a.observe(Duration::from_millis(1));
        b.observe(Duration::from_millis(5));
        let mut m = HistogramSnapshot::default();
        m.merge(&a.snapshot());
        m.merge(&b.snapshot());
        assert_eq!(m.count, 2);
        assert_eq!(m.buckets, vec![Bucket(1, 1), Bucket(10, 2)]);
    }

    #[test]
    fn requests_are_read_from_their_request_line() {
        let cases: &[(&[u8], Asked)] = &[
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", Asked::Metrics),
            (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", Asked::Metrics),
            (b"HEAD /metrics HTTP/1.1\r\n\r\n", Asked::Head),
            (b"GET / HTTP/1.1\r\n\r\n", Asked::NotFound),
            (b"POST /metrics HTTP/1.1\r\n\r\n", Asked::BadMethod),
            (b"GET /metrics\r\n\r\n", Asked::Malformed),
            (b"GET /metrics SMTP/1.1\r\n\r\n", Asked::Malformed),
            (b"\xff\xfe\r\n\r\n", Asked::Malformed),
        ];
        for (head, want) in cases {
            assert_eq!(
                &parse_request(head),
                want,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[tokio::test]
    async fn a_scrape_gets_the_exposition_and_other_paths_a_404() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut registry = Registry::default();
        let c = prometheus_client::metrics::counter::Counter::<u64>::default();
        c.inc_by(7);
        registry.register("screener_test", "A test counter", c);
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, Arc::new(registry), stop.clone()));
        let get = |req: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE), "{ok}");
        assert!(
            ok.contains("\r\n\r\n# HELP screener_test A test counter.\n"),
            "{ok}"
        );
        assert!(ok.contains("\nscreener_test_total 7\n"), "{ok}");
        assert!(ok.ends_with("# EOF\n"), "{ok}");
        let head = get("HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"));
        let missing = get("GET /stats HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        stop.cancel();
        server.await.unwrap();
    }
}
