//! Failure episodes of the store and when to reopen it (see FULL DISK in
//! the store's docs).
//!
//! An episode starts at the first failed operation and ends at the first
//! write that succeeds with nothing left queued. Its first error is logged
//! once, with its cause; the failures after it are only counted. A new
//! failure soon after an episode ended is the same trouble coming back
//! (a disk hovering at full): it is logged as such, without the cause
//! again.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use super::StoreError;

/// The first reopen attempt after a failure, doubled per failed attempt
/// up to [`REOPEN_MAX`].
const REOPEN_MIN: Duration = Duration::from_secs(1);
/// The longest wait between reopen attempts.
const REOPEN_MAX: Duration = Duration::from_secs(8);
/// A failure this soon after recovering continues the last episode.
const RELAPSE: Duration = Duration::from_secs(60);

/// One stretch of failing operations.
#[derive(Debug)]
struct Episode {
    /// When the first failure happened.
    since: Instant,
    /// Failures since (the first included).
    failures: u64,
}

/// What the store knows about its own state.
#[derive(Debug)]
pub(super) struct Health {
    /// The failure episode under way.
    episode: Option<Episode>,
    /// When the last episode ended.
    recovered: Option<Instant>,
    /// The database handle met an I/O error (redb then refuses every
    /// write until it is reopened) or panicked: reopen before the next
    /// operation.
    pub(super) needs_reopen: bool,
    /// When a reopen was last tried.
    last_reopen: Option<Instant>,
    /// The wait before the next reopen attempt.
    backoff: Duration,
    /// Cache reads and writes skipped during episodes.
    pub(super) cache_skipped: u64,
    /// Failures over the process's life.
    pub(super) failures: u64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            episode: None,
            recovered: None,
            needs_reopen: false,
            last_reopen: None,
            backoff: REOPEN_MIN,
            cache_skipped: 0,
            failures: 0,
        }
    }
}

impl Health {
    /// Whether an episode is under way.
    pub(super) fn failing(&self) -> bool {
        self.episode.is_some()
    }

    /// Seconds since the episode began.
    pub(super) fn failing_for(&self) -> Option<u64> {
        self.episode.as_ref().map(|e| e.since.elapsed().as_secs())
    }

    /// Records a failed operation; logs it when it starts an episode.
    pub(super) fn failed(&mut self, path: &Path, err: &StoreError, queued: usize) {
        self.failures += 1;
        if err.needs_reopen() {
            self.needs_reopen = true;
        }
        if let Some(e) = &mut self.episode {
            e.failures += 1;
            tracing::debug!(store = %path.display(), "store still failing: {err}");
            return;
        }
        self.episode = Some(Episode {
            since: Instant::now(),
            failures: 1,
        });
        if self.recovered.is_some_and(|r| r.elapsed() < RELAPSE) {
            tracing::error!(
                store = %path.display(),
                queued,
                "store failing again, as just before; verdicts still reach the kernel, their store writes are queued"
            );
            return;
        }
        tracing::error!(
            store = %path.display(),
            queued,
            "store failing: {err}. Verdicts still reach the kernel; their store writes are \
             queued and retried, the database is reopened, and cache updates are skipped \
             until it works again"
        );
    }

    /// Records a write that succeeded; ends the episode when nothing is
    /// left queued. `written` is how many queued changes it carried.
    pub(super) fn wrote(&mut self, path: &Path, written: usize, queued: usize) {
        self.backoff = REOPEN_MIN;
        if queued > 0 {
            return;
        }
        let Some(e) = self.episode.take() else {
            return;
        };
        self.recovered = Some(Instant::now());
        tracing::warn!(
            store = %path.display(),
            failures = e.failures,
            cache_skipped = self.cache_skipped,
            "store works again after {}s: {written} queued verdict changes written",
            e.since.elapsed().as_secs()
        );
    }

    /// Whether a reopen is due now; if so, marks it tried.
    pub(super) fn reopen_due(&mut self) -> bool {
        if !self.needs_reopen || self.last_reopen.is_some_and(|t| t.elapsed() < self.backoff) {
            return false;
        }
        self.last_reopen = Some(Instant::now());
        true
    }

    /// Records how a reopen went.
    pub(super) fn reopened(&mut self, path: &Path, result: Result<(), &StoreError>) {
        match result {
            Ok(()) => {
                self.needs_reopen = false;
                tracing::debug!(store = %path.display(), "store reopened");
            }
            Err(e) => {
                self.backoff = (self.backoff * 2).min(REOPEN_MAX);
                tracing::debug!(store = %path.display(), "reopening the store: {e}");
            }
        }
    }
}
