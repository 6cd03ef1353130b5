//! The service manager's notify protocol (`Type=notify` under systemd):
//! readiness, reloads, shutdown and watchdog keep-alives.
//!
//! Every call is a no-op without `NOTIFY_SOCKET`, so a daemon started by
//! hand or by another supervisor behaves as before. A failed send is
//! logged and otherwise ignored: the service manager, not screening, is
//! what it affects.

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends `states`, logging (not returning) a failure.
fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("notifying the service manager: {e}");
    }
}

/// `READY=1`: the listeners accept and the XDP gate (unless `--no-xdp`) is
/// attached; `status` becomes the unit's status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` with the monotonic time the reload starts at, as
/// `Type=notify-reload` requires and `Type=notify` accepts; [`ready`]
/// follows when the reload is over, whatever its outcome.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading the configuration"),
        ]),
        Err(e) => {
            tracing::warn!("reading CLOCK_MONOTONIC: {e}");
            send(&[NotifyState::Reloading]);
        }
    }
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// Sends `WATCHDOG=1` every half of `WATCHDOG_USEC` when the service
/// manager set it (`WatchdogSec=`); `None` otherwise. The keep-alive comes
/// from a task on the daemon's runtime, so a runtime that stops scheduling
/// stops it and the service manager restarts the daemon.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let period = sd_notify::watchdog_enabled()?;
    // A zero or absurdly small value would spin; systemd's own floor is 1 s.
    let every = (period / 2).max(Duration::from_millis(100));
    tracing::info!(
        "service watchdog: keep-alive every {} ms",
        every.as_millis()
    );
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    }))
}
