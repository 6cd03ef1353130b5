//! Every task the daemon runs, owned in one place.
//!
//! DRAIN, DON'T ABORT. A task is one of two kinds. Work (a verdict, an
//! import, an admin request, the SMTP server's drain) runs to its end once
//! begun: cutting it would lose a block the kernel or the store was about
//! to get. A chore (a sweep every 30 s, a watcher between two looks at its
//! file) waits on the stop signal between rounds and ends there, never in
//! the middle of a round. Tasks other modules start themselves (the
//! program's log reader, the DNSBL health checks) are adopted: aborted at
//! stop, since nothing they hold is owed to anyone.
//!
//! At stop the owner cancels the one token, closes the tracker and waits
//! for it with a deadline; whatever is still running then is named in the
//! log, so "exited" never hides "not finished".

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The daemon's tasks: a tracker to wait on and a token to stop them.
#[derive(Clone, Default)]
pub struct Tasks {
    /// Every task, so the stop waits for all of them.
    tracker: TaskTracker,
    /// Cancelled once, at stop; chores and listeners watch it.
    stop: CancellationToken,
    /// The names of the tasks still running, for the log at the deadline.
    live: Arc<Mutex<BTreeMap<u64, &'static str>>>,
    /// The key of the next task in `live`.
    next: Arc<AtomicU64>,
}

/// Takes a task's name out of `live` when the task ends, however it ends.
struct Running {
    /// Where the name is.
    live: Arc<Mutex<BTreeMap<u64, &'static str>>>,
    /// Its key there.
    key: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(&self.key);
        }
    }
}

impl Tasks {
    /// The stop signal, for tasks that watch it themselves.
    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    /// Runs `work` to its end, even past the stop signal (within the drain
    /// deadline): it holds something owed to the kernel, the store or a
    /// client.
    pub fn spawn<F>(&self, name: &'static str, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut live) = self.live.lock() {
            live.insert(key, name);
        }
        let running = Running {
            live: Arc::clone(&self.live),
            key,
        };
        self.tracker.spawn(async move {
            work.await;
            drop(running);
        });
    }

    /// Runs `round` again and again, every `every()`, until the stop
    /// signal; a round begun is finished. `every` is read before each wait,
    /// so a reloaded interval applies from the next round.
    pub fn spawn_chore<R, F>(
        &self,
        name: &'static str,
        every: impl Fn() -> Duration + Send + 'static,
        mut round: R,
    ) where
        R: FnMut() -> F + Send + 'static,
        F: Future<Output = ()> + Send,
    {
        let stop = self.stop.clone();
        self.spawn(name, async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every()) => {}
                }
                round().await;
            }
        });
    }

    /// Owns a task another module spawned: aborted at the stop signal, or
    /// ending on its own (the caller may abort it, e.g. when a reload
    /// replaces it).
    pub fn adopt(&self, name: &'static str, mut task: tokio::task::JoinHandle<()>) {
        let stop = self.stop.clone();
        self.spawn(name, async move {
            tokio::select! {
                () = stop.cancelled() => {
                    task.abort();
                    let _ = task.await;
                }
                _ = &mut task => {}
            }
        });
    }

    /// Signals stop and waits up to `deadline` for every task; returns the
    /// names of those still running then (their work is lost).
    pub async fn drain(&self, deadline: Duration) -> Vec<&'static str> {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
        {
            return Vec::new();
        }
        self.live
            .lock()
            .map(|l| l.values().copied().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn work_runs_past_stop_chores_end_at_it_and_the_late_are_named() {
        let tasks = Tasks::default();
        let done = Arc::new(AtomicU64::new(0));
        let d = Arc::clone(&done);
        tasks.spawn("verdicts", async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            d.fetch_add(1, Ordering::Relaxed);
        });
        let rounds = Arc::new(AtomicU64::new(0));
        let r = Arc::clone(&rounds);
        tasks.spawn_chore(
            "sweeper",
            || Duration::from_secs(30),
            move || {
                let r = Arc::clone(&r);
                async move {
                    r.fetch_add(1, Ordering::Relaxed);
                }
            },
        );
        tasks.spawn("stuck", std::future::pending());
        let late = tasks.drain(Duration::from_secs(10)).await;
        assert_eq!(late, vec!["stuck"]);
        assert_eq!(done.load(Ordering::Relaxed), 1, "work was cut at stop");
        assert_eq!(rounds.load(Ordering::Relaxed), 0, "a chore began a round");
    }

    #[tokio::test(start_paused = true)]
    async fn adopted_tasks_are_aborted_at_stop() {
        let tasks = Tasks::default();
        tasks.adopt("logger", tokio::spawn(std::future::pending()));
        assert!(tasks.drain(Duration::from_secs(1)).await.is_empty());
    }
}
