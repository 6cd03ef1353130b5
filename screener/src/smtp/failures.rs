//! The queue from the SMTP sessions to the verdict task: clients that
//! failed a test and are to be blocked.
//!
//! BOUNDED AND COALESCING. A botnet fails tests faster than the store can
//! write blocks, and an unbounded channel would grow without limit. The
//! queue holds at most one entry per address: a second failure of an
//! address already queued joins that entry (the tests it failed are
//! merged), so a bot that keeps reconnecting while its block is pending
//! costs nothing. When `capacity` addresses are waiting, a new one is
//! dropped and counted; it is screened again on its next connection and
//! fails again, so a drop delays a block, it never lets a client through.
//!
//! DRAIN, DON'T ABORT. [`FailureQueue::close`] stops new entries but
//! [`FailureQueue::recv`] still hands out every queued one before it
//! returns `None`, so the daemon lets the verdict task finish what is
//! queued (within `smtp.shutdown_grace`) before it exits.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

use super::locks::lock;
use super::{FailedTest, Failure};

/// Addresses waiting at most, unless the caller says otherwise: at a few
/// dozen bytes each this is well under a megabyte, and far more than the
/// store writes in one shutdown grace period.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// One queued address and every test it failed while it waited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    /// The client's address (IPv4-mapped IPv6 folded to IPv4).
    pub ip: IpAddr,
    /// What it failed, in the order first seen, each once.
    pub tests: Vec<FailedTest>,
}

/// The queue's counters, as `screener stats` shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FailureQueueStats {
    /// Addresses waiting for the verdict task now.
    pub queued: u64,
    /// Failures that joined an entry already queued for their address.
    pub coalesced: u64,
    /// Failures dropped because the queue was full (or closed).
    pub dropped: u64,
}

/// What is waiting, under one lock.
#[derive(Default)]
struct Inner {
    /// Addresses in arrival order.
    order: VecDeque<IpAddr>,
    /// The tests each queued address failed.
    tests: HashMap<IpAddr, Vec<FailedTest>>,
    /// No more entries are taken; the consumer drains what is left.
    closed: bool,
    /// Whether the queue was full at the last push, so a full queue is
    /// logged once per episode, not once per dropped failure.
    full: bool,
}

/// A bounded, per-address coalescing queue with one consumer.
pub struct FailureQueue {
    /// The entries.
    inner: Mutex<Inner>,
    /// Wakes the consumer on a new entry or on close.
    ready: Notify,
    /// Most addresses waiting at once.
    capacity: usize,
    /// Failures merged into an entry already queued.
    coalesced: AtomicU64,
    /// Failures not queued.
    dropped: AtomicU64,
}

impl FailureQueue {
    /// An empty queue holding at most `capacity` addresses (at least one).
    pub fn new(capacity: usize) -> FailureQueue {
        FailureQueue {
            inner: Mutex::new(Inner::default()),
            ready: Notify::new(),
            capacity: capacity.max(1),
            coalesced: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues a failure; returns whether it is (now or already) queued.
    pub fn push(&self, f: Failure) -> bool {
        let ip = f.client.ip().to_canonical();
        let mut inner = lock(&self.inner);
        if inner.closed {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if let Some(tests) = inner.tests.get_mut(&ip) {
            if !tests.contains(&f.test) {
                tests.push(f.test);
            }
            self.coalesced.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if inner.order.len() >= self.capacity {
            if !inner.full {
                inner.full = true;
                tracing::warn!(
                    "verdict queue full ({} addresses): failures are dropped until it drains",
                    self.capacity
                );
            }
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        inner.full = false;
        inner.order.push_back(ip);
        inner.tests.insert(ip, vec![f.test]);
        drop(inner);
        // One consumer: a stored permit wakes it even if it is not yet
        // waiting.
        self.ready.notify_one();
        true
    }

    /// The oldest entry, if any, without waiting.
    pub fn try_recv(&self) -> Option<Queued> {
        let mut inner = lock(&self.inner);
        let ip = inner.order.pop_front()?;
        let tests = inner.tests.remove(&ip).unwrap_or_default();
        Some(Queued { ip, tests })
    }

    /// The oldest entry; `None` once the queue is closed and empty.
    pub async fn recv(&self) -> Option<Queued> {
        loop {
            let ready = self.ready.notified();
            if let Some(q) = self.try_recv() {
                return Some(q);
            }
            if lock(&self.inner).closed {
                return None;
            }
            ready.await;
        }
    }

    /// Takes no more entries; what is queued stays for [`FailureQueue::recv`].
    pub fn close(&self) {
        lock(&self.inner).closed = true;
        self.ready.notify_one();
    }

    /// Current counters.
    pub fn stats(&self) -> FailureQueueStats {
        let queued = lock(&self.inner).order.len();
        FailureQueueStats {
            queued: queued as u64,
            coalesced: self.coalesced.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Default for FailureQueue {
    fn default() -> FailureQueue {
        FailureQueue::new(DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::screen::TestId;
    use std::sync::Arc;
    use std::time::Duration;

    fn failure(client: &str, test: FailedTest) -> Failure {
        Failure {
            client: client.parse().unwrap(),
            test,
        }
    }

    #[test]
    fn one_entry_per_address_with_the_tests_merged() {
        let q = FailureQueue::new(10);
        assert!(q.push(failure(
            "192.0.2.1:1000",
            FailedTest::Test(TestId::Pregreet)
        )));
        assert!(q.push(failure("192.0.2.2:1000", FailedTest::Test(TestId::Dnsbl))));
        // Same address, another port, the same test: coalesced.
        assert!(q.push(failure(
            "192.0.2.1:1001",
            FailedTest::Test(TestId::Pregreet)
        )));
        // The IPv4-mapped form is the same address; a new test joins.
        assert!(q.push(failure(
            "[::ffff:192.0.2.1]:1002",
            FailedTest::Test(TestId::Pipelining)
        )));
        assert_eq!(
            q.stats(),
            FailureQueueStats {
                queued: 2,
                coalesced: 2,
                dropped: 0
            }
        );
        assert_eq!(
            q.try_recv(),
            Some(Queued {
                ip: "192.0.2.1".parse().unwrap(),
                tests: vec![
                    FailedTest::Test(TestId::Pregreet),
                    FailedTest::Test(TestId::Pipelining)
                ],
            })
        );
        // Once handed out, the address queues afresh.
        assert!(q.push(failure(
            "192.0.2.1:1003",
            FailedTest::Test(TestId::Pregreet)
        )));
        assert_eq!(
            q.try_recv().unwrap().ip,
            "192.0.2.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            q.try_recv().unwrap().ip,
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(q.try_recv(), None);
    }

    #[test]
    fn bounded_and_counted() {
        let q = FailureQueue::new(3);
        for i in 1..=5 {
            q.push(failure(
                &format!("198.51.100.{i}:25"),
                FailedTest::Test(TestId::Pregreet),
            ));
        }
        // A queued address still coalesces when the queue is full.
        assert!(q.push(failure("198.51.100.1:26", FailedTest::Test(TestId::Dnsbl))));
        assert_eq!(
            q.stats(),
            FailureQueueStats {
                queued: 3,
                coalesced: 1,
                dropped: 2
            }
        );
        let ips: Vec<String> = std::iter::from_fn(|| q.try_recv())
            .map(|e| e.ip.to_string())
            .collect();
        assert_eq!(ips, ["198.51.100.1", "198.51.100.2", "198.51.100.3"]);
        // Room again.
        assert!(q.push(failure(
            "198.51.100.4:25",
            FailedTest::Test(TestId::Pregreet)
        )));
    }

    #[tokio::test]
    async fn close_drains_what_is_queued() {
        let q = Arc::new(FailureQueue::new(100));
        for i in 1..=50 {
            q.push(failure(
                &format!("203.0.113.{i}:25"),
                FailedTest::Test(TestId::Pregreet),
            ));
        }
        q.close();
        assert!(!q.push(failure(
            "203.0.113.200:25",
            FailedTest::Test(TestId::Pregreet)
        )));
        let mut n = 0;
        while q.recv().await.is_some() {
            n += 1;
        }
        assert_eq!(n, 50);
        assert_eq!(q.stats().dropped, 1);
    }

    #[tokio::test]
    async fn recv_waits_for_a_push_or_the_close() {
        let q = Arc::new(FailureQueue::new(100));
        let consumer = tokio::spawn({
            let q = Arc::clone(&q);
            async move {
                let mut got = Vec::new();
                while let Some(e) = q.recv().await {
                    got.push(e.ip);
                }
                got
            }
        });
        // The consumer runs until it waits (one thread: yielding lets it).
        tokio::task::yield_now().await;
        q.push(failure("192.0.2.9:25", FailedTest::Test(TestId::Pregreet)));
        tokio::task::yield_now().await;
        q.close();
        let got = tokio::time::timeout(Duration::from_secs(5), consumer)
            .await
            .expect("the consumer ends at close")
            .unwrap();
        assert_eq!(got, ["192.0.2.9".parse::<IpAddr>().unwrap()]);
    }
}
