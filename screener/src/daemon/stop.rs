//! Stopping: drain, don't abort.
//!
//! The stop signal reaches every task at once, and the order follows from
//! what each waits on: the SMTP server stops accepting, tells clients in
//! their tests `421 4.3.2` and gives hand-offs `smtp.shutdown_grace`;
//! only then is the failure queue closed, and the verdict task ends once
//! it has turned every queued failure into a verdict. Admin requests
//! already read are answered, a list being imported or removed is
//! finished, chores end between rounds. Everything gets one deadline:
//! the SMTP grace (plus a second), then one more grace for the rest.
//! Last, the store's queue of unwritten changes is flushed.
//!
//! The XDP gate stays attached: only `screener xdp detach` opens it.

use std::time::Duration;

use super::Daemon;

/// Drains every task (see the module docs), flushes the store, removes
/// the admin socket.
pub(super) async fn stop(daemon: &Daemon) {
    crate::notify::stopping();
    tracing::info!("shutting down; the XDP gate stays attached");
    let grace = daemon.cfg().smtp.shutdown_grace;
    let late = daemon.tasks.drain(grace * 2 + Duration::from_secs(1)).await;
    if !late.is_empty() {
        tracing::warn!(
            "shutdown deadline over; not finished: {} ({} queued failures not turned into verdicts)",
            late.join(", "),
            daemon.smtp.stats().failure_queue.queued
        );
    }
    // What the store could not take yet is still in the kernel; the next
    // start adopts it from there.
    let store = daemon.verdicts.store();
    match store.flush().await {
        Ok(0) => {}
        Ok(n) => tracing::info!("{n} queued store changes written at shutdown"),
        Err(e) => tracing::warn!(
            "{} queued store changes not written ({e}); the next start adopts them from the kernel",
            store.health().queued
        ),
    }
    let _ = std::fs::remove_file(&daemon.admin_socket);
}
