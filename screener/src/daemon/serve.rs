//! Serving: every task started under the one tracker, then signals.
//!
//! Nothing here needs a privilege: the descriptors [`super::start`]
//! opened are all it uses. One owner per chore: the sweep of lapsed
//! kernel entries and the store cleanup run here and nowhere else.

use std::{
    sync::{atomic::AtomicU64, Arc, Mutex, RwLock},
    time::Instant,
};

use futures::FutureExt as _;
use tokio::{
    net::{TcpListener, UnixListener},
    signal::unix::{signal, SignalKind},
    sync::oneshot,
};

use super::{start::Started, tasks::Tasks, Daemon, SWEEP_INTERVAL};
use crate::{
    admin,
    cluster::{Cluster, Incoming},
    metrics,
    smtp::{self, FailureQueue},
    verdict::{VerdictError, Verdicts},
    xdp::{self, Gate},
};

/// Starts every task on what `start` opened and serves until SIGTERM or
/// SIGINT (`Ok`), or until the SMTP server fails (`Err`). Either way the
/// tasks are left running for [`super::stop`] to drain.
pub(super) async fn serve(s: Started) -> (Arc<Daemon>, anyhow::Result<()>) {
    let tasks = Tasks::default();
    let socket = s.verdicts.cfg().admin.socket.clone();
    let daemon = Arc::new(Daemon {
        config: s.config,
        verdicts: Arc::clone(&s.verdicts),
        smtp: s.smtp.clone(),
        dnsbl: RwLock::new(None),
        cfg_path: s.cfg_path,
        admin_socket: socket.clone(),
        no_xdp: s.no_xdp,
        started: Instant::now(),
        tasks: tasks.clone(),
        importers: Mutex::new(Vec::new()),
        generation: AtomicU64::new(0),
        restart_pending: Mutex::new(Vec::new()),
        xdp_logger: Mutex::new(None),
    });
    daemon.set_xdp_logger(s.verdicts.with_gate(Gate::spawn_logger).flatten());
    if let Some(d) = &s.dnsbl {
        tasks.adopt("DNSBL health checks", d.spawn_health_checks());
    }
    *daemon.dnsbl.write().expect("dnsbl lock") = s.dnsbl;
    tasks.adopt("store retry", s.verdicts.store().spawn_retry());
    // Before SMTP starts: its first client may already be a fleet pass.
    let fleet = daemon.cfg().cluster.clone();
    if fleet.enabled() {
        let cluster = Cluster::new(fleet);
        tracing::info!(
            "cluster: node {} sharing {:?} through {} Redis URL(s)",
            cluster.node(),
            daemon.cfg().cluster.share,
            daemon.cfg().cluster.redis.len()
        );
        s.verdicts.set_cluster(cluster.clone());
        if cluster.shares(crate::cluster::Share::Passes) {
            s.smtp.set_cluster(cluster.clone());
        }
        spawn_fleet(&tasks, cluster, Arc::clone(&s.verdicts));
    }
    let smtp_failed = spawn_smtp(&tasks, s.smtp, s.listeners, Arc::clone(&s.failures));
    spawn_verdicts(&tasks, Arc::clone(&s.verdicts), s.failures);
    spawn_admin(&tasks, &daemon, s.admin);
    tracing::info!(socket = %socket.display(), "admin socket ready");
    spawn_metrics(&tasks, &daemon, s.metrics);
    spawn_chores(&tasks, &s.verdicts);
    daemon.reload_imports(&daemon.cfg().import.lists);
    let ended = signals(&daemon, smtp_failed).await;
    (daemon, ended)
}

/// The SMTP server until the stop signal; then it ends its sessions and
/// closes the failure queue behind them, so the verdict task drains what
/// they queued. An early end (a listener failed) is sent on the channel.
fn spawn_smtp(
    tasks: &Tasks,
    server: smtp::Server,
    listeners: smtp::server::Bound,
    failures: Arc<FailureQueue>,
) -> oneshot::Receiver<anyhow::Error> {
    let (failed, rx) = oneshot::channel();
    let stop = tasks.stop().clone();
    tasks.spawn("SMTP server", async move {
        let r = server.run_bound(listeners, stop.cancelled()).await;
        failures.close();
        let queued = failures.stats().queued;
        if queued > 0 {
            tracing::info!("turning {queued} queued failures into verdicts before exiting");
        }
        if let Err(e) = r {
            let _ = failed.send(e.context("SMTP server"));
        } else if !stop.is_cancelled() {
            let _ = failed.send(anyhow::anyhow!("the SMTP server stopped"));
        }
    });
    rx
}

/// Turns queued failures into verdicts until the queue is closed and
/// empty: it ends after the SMTP server, never before.
fn spawn_verdicts(tasks: &Tasks, verdicts: Arc<Verdicts>, failures: Arc<FailureQueue>) {
    tasks.spawn("verdicts", async move {
        while let Some(q) = failures.recv().await {
            for test in q.tests {
                verdicts.on_failure(q.ip, test).await;
            }
        }
    });
}

/// The fleet link, and the task applying what other nodes decided: each
/// batch reaches the kernel and the store before its stream position is
/// saved, so a crash replays rather than skips.
fn spawn_fleet(tasks: &Tasks, cluster: Cluster, verdicts: Arc<Verdicts>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let stop = tasks.stop().clone();
    let (link, v) = (cluster.clone(), Arc::clone(&verdicts));
    tasks.spawn("cluster link", async move {
        let position = v.store().cluster_position().await.unwrap_or_else(|e| {
            tracing::warn!("cluster: cannot read the saved stream position ({e}); resynchronising");
            None
        });
        link.run(position, tx, stop).await;
    });
    tasks.spawn("fleet verdicts", async move {
        while let Some(msg) = rx.recv().await {
            let (position, done) = match msg {
                Incoming::Events {
                    events,
                    last_id,
                    done,
                } => {
                    verdicts.apply_fleet(events).await;
                    (last_id, done)
                }
                Incoming::Snapshot {
                    blocks,
                    last_id,
                    done,
                } => {
                    verdicts.apply_fleet_snapshot(blocks, cluster.node()).await;
                    (last_id, done)
                }
            };
            if let Err(e) = verdicts.store().set_cluster_position(&position).await {
                tracing::warn!("cluster: saving the stream position: {e}");
            }
            let _ = done.send(());
        }
    });
}

/// Accepts admin connections until the stop signal; each connection is a
/// task of its own, and a request already read is answered.
fn spawn_admin(tasks: &Tasks, daemon: &Arc<Daemon>, listener: UnixListener) {
    let d = Arc::clone(daemon);
    let handler: admin::Handler = Arc::new(move |req| Arc::clone(&d).handle(req).boxed());
    let t = tasks.clone();
    tasks.spawn("admin socket", async move {
        loop {
            let stream = tokio::select! {
                () = t.stop().cancelled() => return,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("admin socket accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let stop = t.stop().clone();
            t.spawn(
                "admin request",
                admin::connection(stream, Arc::clone(&handler), async move {
                    stop.cancelled().await;
                }),
            );
        }
    });
}

/// Serves `GET /metrics` on each listener until the stop signal. The
/// registry holds the daemon weakly: the endpoint renders `stats`, it
/// does not keep the daemon alive.
fn spawn_metrics(tasks: &Tasks, daemon: &Arc<Daemon>, listeners: Vec<TcpListener>) {
    if listeners.is_empty() {
        return;
    }
    let weak = Arc::downgrade(daemon);
    let registry = Arc::new(metrics::families::registry(move || {
        weak.upgrade().map(|d| d.stats())
    }));
    for l in listeners {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, "metrics endpoint ready at http://{addr}/metrics");
        }
        tasks.spawn(
            "metrics endpoint",
            metrics::serve(l, Arc::clone(&registry), tasks.stop().clone()),
        );
    }
}

/// The periodic chores: sweeping lapsed kernel entries, cleaning the
/// store, watching the XDP attachments.
fn spawn_chores(tasks: &Tasks, verdicts: &Arc<Verdicts>) {
    let v = Arc::clone(verdicts);
    tasks.spawn_chore(
        "sweeper",
        || SWEEP_INTERVAL,
        move || {
            let v = Arc::clone(&v);
            async move {
                match v.sweep().await {
                    // A failing store is logged once, by the store.
                    Err(VerdictError::Store(e)) if e.is_failure() => {}
                    Err(e) => tracing::warn!("sweeping expired blocks: {e}"),
                    Ok(_) => {}
                }
            }
        },
    );
    let (v, every) = (Arc::clone(verdicts), Arc::clone(verdicts));
    tasks.spawn_chore(
        "store cleanup",
        move || every.cfg().screen.cache_cleanup_interval,
        move || {
            let v = Arc::clone(&v);
            async move {
                match v.cleanup().await {
                    Ok(n) => tracing::info!(removed = n, "store cleanup"),
                    Err(VerdictError::Store(e)) if e.is_failure() => {}
                    Err(e) => tracing::warn!("store cleanup: {e}"),
                }
            }
        },
    );
    let v = Arc::clone(verdicts);
    tasks.adopt(
        "XDP watchdog",
        xdp::spawn_watchdog(move || {
            let _ = v.with_gate(Gate::watch);
        }),
    );
}

/// Answers signals until SIGTERM or SIGINT, or until the SMTP server
/// fails; says READY=1 once the SMTP listeners accept.
async fn signals(
    daemon: &Arc<Daemon>,
    mut smtp_failed: oneshot::Receiver<anyhow::Error>,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    if let Some(k) = crate::notify::spawn_watchdog() {
        daemon.tasks.adopt("systemd watchdog", k);
    }
    let mut ready = false;
    let mut smtp_running = true;
    loop {
        tokio::select! {
            // The gate was attached at start: listening is the last step.
            () = daemon.smtp.accepting(), if !ready => {
                ready = true;
                crate::notify::ready("screening");
            }
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            r = &mut smtp_failed, if smtp_running => match r {
                Ok(e) => return Err(e),
                Err(_) => smtp_running = false,
            },
            _ = hup.recv() => {
                // Before the first READY=1 the reload is part of starting.
                if ready {
                    crate::notify::reloading();
                }
                daemon.reload().await;
                if ready {
                    crate::notify::ready("screening");
                }
            }
        }
    }
}
