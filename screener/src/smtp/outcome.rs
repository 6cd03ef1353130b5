//! How each connection ended: one outcome per accepted connection, so the
//! outcomes plus the connections still open add up to the connections
//! accepted, and a dashboard's stacked rates show the whole traffic.
//!
//! An [`Ending`] travels with the connection (inside its `Conn` once
//! admission has run) and is told what happened; it counts its outcome
//! when dropped, whichever way the connection task ends. The screening
//! time is measured the same way by a [`Timer`].

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
    sync::Arc,
};

use tokio::time::Instant;

use crate::metrics::Histogram;

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Reached the backend (after a cached pass, an allow entry or the
    /// tests).
    HandedOff,
    /// Was to reach the backend, which failed it (`421` to the client).
    BackendError,
    /// Passed its tests in this connection and was closed without a
    /// hand-off (postscreen's "come back later" after the deep tests).
    Passed,
    /// Failed a test in this connection.
    Failed,
    /// Hung up or timed out while screened, without a failure or a pass.
    Disconnected,
    /// Turned away by a limit (`421`): per-client, pre- or post-queue.
    Busy,
    /// Matched a `reject` access rule.
    Denylisted,
    /// Turned away because the descriptor budget was spent.
    DescriptorsRefused,
    /// Closed: a PROXY-mode peer outside `smtp.upstream_proxy_trusted`.
    ProxyUntrusted,
    /// Closed: its PROXY header was missing, late or malformed.
    ProxyError,
    /// Ended by the daemon's shutdown while screened.
    Shutdown,
}

impl Outcome {
    /// Every outcome, in the order `stats` and the metrics show them.
    pub const ALL: [Outcome; 11] = [
        Outcome::HandedOff,
        Outcome::BackendError,
        Outcome::Passed,
        Outcome::Failed,
        Outcome::Disconnected,
        Outcome::Busy,
        Outcome::Denylisted,
        Outcome::DescriptorsRefused,
        Outcome::ProxyUntrusted,
        Outcome::ProxyError,
        Outcome::Shutdown,
    ];

    /// The label `stats` and the metrics give it.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::HandedOff => "handed_off",
            Outcome::BackendError => "backend_error",
            Outcome::Passed => "passed",
            Outcome::Failed => "failed",
            Outcome::Disconnected => "disconnected",
            Outcome::Busy => "busy",
            Outcome::Denylisted => "denylisted",
            Outcome::DescriptorsRefused => "descriptors_refused",
            Outcome::ProxyUntrusted => "proxy_untrusted",
            Outcome::ProxyError => "proxy_error",
            Outcome::Shutdown => "shutdown",
        }
    }
}

/// The counters of every outcome, and the screening time.
pub struct Outcomes {
    /// Connections ended, per [`Outcome`] (in `Outcome::ALL` order).
    ended: [AtomicU64; Outcome::ALL.len()],
    /// From the start of screening to its end (hand-off, pass, failure,
    /// hang-up), for screened clients only.
    screening: Histogram,
}

impl Default for Outcomes {
    fn default() -> Self {
        Outcomes {
            ended: Default::default(),
            screening: Histogram::new(crate::metrics::SCREENING_MS),
        }
    }
}

impl Outcomes {
    /// Counts one connection ended with `o`.
    pub fn count(&self, o: Outcome) {
        self.ended[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections ended with `o` so far.
    pub fn get(&self, o: Outcome) -> u64 {
        self.ended[o as usize].load(Ordering::Relaxed)
    }

    /// Every outcome's count, by name.
    pub fn by_name(&self) -> BTreeMap<&'static str, u64> {
        Outcome::ALL
            .into_iter()
            .map(|o| (o.name(), self.get(o)))
            .collect()
    }

    /// The screening time histogram.
    pub fn screening_time(&self) -> &Histogram {
        &self.screening
    }
}

/// A connection's outcome so far; counted when dropped.
pub struct Ending {
    /// Where it is counted.
    outcomes: Arc<Outcomes>,
    /// What happened so far (`Disconnected` until something else does).
    outcome: Outcome,
}

impl Ending {
    pub fn new(outcomes: Arc<Outcomes>) -> Ending {
        Ending {
            outcomes,
            outcome: Outcome::Disconnected,
        }
    }

    /// Sets the outcome; a failure in this connection is never overwritten
    /// by a pass or a hang-up that follows it (an `ignore` action carries
    /// on as if the test had passed).
    pub fn set(&mut self, o: Outcome) {
        let after_failure = matches!(o, Outcome::Passed | Outcome::Disconnected);
        if !(self.outcome == Outcome::Failed && after_failure) {
            self.outcome = o;
        }
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.outcomes.count(self.outcome);
    }
}

/// Times the screening of one client; observed once, at `stop` or drop.
pub struct Timer {
    /// Where the time goes.
    outcomes: Arc<Outcomes>,
    /// When screening began; `None` once observed.
    started: Option<Instant>,
}

impl Timer {
    pub fn start(outcomes: Arc<Outcomes>) -> Timer {
        Timer {
            outcomes,
            started: Some(Instant::now()),
        }
    }

    /// Screening is over (the client is handed to the backend).
    pub fn stop(&mut self) {
        if let Some(t) = self.started.take() {
            self.outcomes.screening.observe(t.elapsed());
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ending_counts_once_and_a_failure_sticks() {
        let o = Arc::new(Outcomes::default());
        drop(Ending::new(Arc::clone(&o)));
        let mut e = Ending::new(Arc::clone(&o));
        e.set(Outcome::Failed);
        e.set(Outcome::Passed);
        drop(e);
        let mut e = Ending::new(Arc::clone(&o));
        e.set(Outcome::Failed);
        e.set(Outcome::Shutdown);
        drop(e);
        assert_eq!(o.get(Outcome::Disconnected), 1);
        assert_eq!(o.get(Outcome::Failed), 1);
        assert_eq!(o.get(Outcome::Shutdown), 1);
        assert_eq!(o.by_name().values().sum::<u64>(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_observes_once() {
        let o = Arc::new(Outcomes::default());
        let mut t = Timer::start(Arc::clone(&o));
        tokio::time::advance(std::time::Duration::from_secs(7)).await;
        t.stop();
        drop(t);
        let s = o.screening_time().snapshot();
        assert_eq!(s.count, 1);
        assert_eq!(s.sum_us, 7_000_000);
    }
}
