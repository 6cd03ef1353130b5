//! Starting: everything that needs privileges, and nothing that runs.
//!
//! What needs root (or `CAP_BPF`, `CAP_NET_ADMIN`, `CAP_NET_BIND_SERVICE`) is
//! done here, in this order: the store is opened, the XDP program and its
//! maps are loaded or adopted, the verdicts are restored into the maps
//! before the program is attached (so the gate never opens in between),
//! the admin socket and the SMTP listeners are bound. No task is started:
//! what comes back is a set of open descriptors and the state built on
//! them, which [`super::serve`] puts to work. Last, privileges are dropped
//! ([`super::privileges`]): what serves runs as `daemon.user`.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use tokio::{net::UnixListener, sync::watch};

use super::{
    dnsbl::build_dnsbl,
    privileges::{self, Account, Owned},
};
use crate::{
    admin, config::Config, dnsbl::Dnsbl, smtp, store::Store, verdict::Verdicts, xdp::Gate,
};

/// What [`start`] opened, handed to [`super::serve`].
pub(super) struct Started {
    /// The one holder of the configuration.
    pub config: watch::Sender<Arc<Config>>,
    /// Where the configuration came from, for SIGHUP.
    pub cfg_path: PathBuf,
    /// Started with `--no-xdp`.
    pub no_xdp: bool,
    /// Blocks and allows, restored into the kernel.
    pub verdicts: Arc<Verdicts>,
    /// The admin socket, bound, not yet accepting.
    pub admin: UnixListener,
    /// The SMTP server, built, not yet serving.
    pub smtp: smtp::Server,
    /// Its listeners, bound, not yet accepting.
    pub listeners: smtp::server::Bound,
    /// The queue from the SMTP sessions to the verdicts.
    pub failures: Arc<smtp::FailureQueue>,
    /// The DNSBL engine (`None` without sites); its health checks start
    /// with the serving.
    pub dnsbl: Option<Dnsbl>,
    /// The metrics endpoint's listeners (`metrics.listen`), bound, not yet
    /// accepting.
    pub metrics: Vec<tokio::net::TcpListener>,
}

/// Opens the store and the gate, restores the verdicts, attaches, binds.
/// On error whatever was bound is closed again (the admin socket file is
/// removed); the gate, if attached, stays attached, as at every exit.
pub(super) async fn start(cfg: Config, cfg_path: PathBuf, no_xdp: bool) -> anyhow::Result<Started> {
    // Before anything is opened: a missing account stops the start here.
    let account = Account::resolve(&cfg.daemon)?;
    let store = open_store(&cfg).await?;
    let gate = if no_xdp {
        tracing::info!("running without XDP (--no-xdp)");
        None
    } else {
        // Loaded, not yet attached: the maps are filled from the store first.
        Some(Gate::load(&cfg).context("loading the XDP gate")?)
    };
    let admin::Bound {
        listener: admin,
        created_dir,
    } = admin::bind(&cfg.admin.socket)
        .await
        .context("opening the admin socket")?;
    let socket = cfg.admin.socket.clone();
    let (config, watching) = watch::channel(Arc::new(cfg));
    let verdicts = Arc::new(Verdicts::new(watching, store, gate));
    let built = async {
        restore(&verdicts).await;
        if let Some(Err(e)) = verdicts.with_gate(Gate::attach) {
            return Err(e).context("attaching the XDP gate");
        }
        let cfg = verdicts.cfg();
        cfg.log_warnings();
        crate::local::refresh();
        let bound = bind_smtp(&verdicts, &cfg)?;
        // Bound while privileged, as the SMTP listeners are.
        let metrics = bind_metrics(&cfg).await?;
        let owned = Owned {
            admin_socket: &socket,
            admin_dir: created_dir.as_deref(),
            store: verdicts.store().path(),
            pins: (!no_xdp).then_some(cfg.xdp.pin_path.as_path()),
        };
        privileges::after_start(&account, &owned, no_xdp)?;
        Ok((bound, metrics))
    }
    .await;
    let ((smtp, listeners, failures, dnsbl), metrics) = match built {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
    };
    Ok(Started {
        config,
        cfg_path,
        no_xdp,
        verdicts,
        admin,
        smtp,
        listeners,
        failures,
        dnsbl,
        metrics,
    })
}

/// Binds `metrics.listen` (nothing when it is empty).
async fn bind_metrics(cfg: &Config) -> anyhow::Result<Vec<tokio::net::TcpListener>> {
    let mut out = Vec::new();
    for addr in &cfg.metrics.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics.listen: binding {addr}"))?;
        out.push(l);
    }
    Ok(out)
}

/// The SMTP server with its DNSBL engine and failure queue, its
/// listeners bound.
fn bind_smtp(
    verdicts: &Arc<Verdicts>,
    cfg: &Arc<Config>,
) -> anyhow::Result<(
    smtp::Server,
    smtp::server::Bound,
    Arc<smtp::FailureQueue>,
    Option<Dnsbl>,
)> {
    let dnsbl = build_dnsbl(cfg)?;
    let failures = Arc::new(smtp::FailureQueue::default());
    let server = smtp::Server::new(
        Arc::clone(cfg),
        Some(verdicts.store().clone()),
        super::dnsbl::lookup(dnsbl.as_ref(), verdicts),
        Some(Arc::clone(&failures)),
    );
    server.set_allows(&verdicts.allowed());
    let listeners = server.bind().context("SMTP server")?;
    Ok((server, listeners, failures, dnsbl))
}

/// Opens the store, saying what it holds and what it could not read.
async fn open_store(cfg: &Config) -> anyhow::Result<Store> {
    let path = cfg.store.path.clone();
    let (store, census) = tokio::task::spawn_blocking(move || Store::open_census(&path))
        .await?
        .context("opening the store")?;
    tracing::info!(store = %store.path().display(), "store opened: {census}");
    let cache_unreadable = census.tables.first().map_or(0, |t| t.unreadable.len());
    if cache_unreadable > 0 {
        tracing::warn!(
            store = %store.path().display(),
            "{cache_unreadable} cache records do not decode; those clients are screened again"
        );
    }
    Ok(store)
}

/// How many unreadable store records are named one per line at start;
/// the rest are counted.
const SKIPPED_NAMED: usize = 50;

/// Restores the kernel from the store and adopts what only the kernel
/// holds, saying loudly what happened: an operator must learn at start
/// that the store was empty or damaged, not after the next reboot.
async fn restore(verdicts: &Verdicts) {
    let path = verdicts.store().path().display().to_string();
    let r = match verdicts.reconcile().await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(store = %path, "restoring verdicts at start failed: {e}");
            return;
        }
    };
    for u in r.skipped.iter().take(SKIPPED_NAMED) {
        tracing::error!(store = %path, "unreadable store record skipped: {u}");
    }
    if r.skipped.len() > SKIPPED_NAMED {
        tracing::error!(
            store = %path,
            "{} more unreadable store records skipped",
            r.skipped.len() - SKIPPED_NAMED
        );
    }
    let skipped = r.skipped.len();
    let msg = format!(
        "verdicts at start: {} restored into the kernel, {} already there, {} adopted from the kernel into the store, {} unreadable records skipped, {} expired",
        r.restored, r.kept, r.adopted, skipped, r.expired
    );
    if r.adopted > 0 || skipped > 0 || r.refused_full > 0 {
        tracing::warn!(
            store = %path,
            refused_full = r.refused_full,
            "{msg}; the store was new, emptied or damaged: what the kernel held is kept and now recorded"
        );
    } else {
        tracing::info!(store = %path, "{msg}");
    }
}
