//! `screener run`: owns the XDP gate and serves the admin socket.
//!
//! The daemon is the only writer of the kernel maps: every `block` and
//! `allow` change arrives over the admin socket and is applied here, with
//! its `BLOCK` / `UNBLOCK` log line.
//!
//! THREE PHASES. [`start`] does everything that needs privileges and
//! nothing else: the store, the XDP program and its maps (loaded or
//! adopted), restoring verdicts into them, attaching, binding the admin
//! socket and the SMTP listeners. [`serve`] starts every task and answers
//! signals; it needs no privilege beyond the descriptors `start` opened,
//! so [`privileges`] drops to `daemon.user` in between. [`stop`] drains: SMTP ends
//! its sessions, the failures they queued become verdicts, admin requests
//! and list changes finish, then the store's queue is written; all within
//! a deadline, naming what did not finish.
//!
//! ONE HOLDER. The configuration lives in one `watch` channel owned by
//! [`Daemon`]; a reload swaps it whole, and every reader (verdicts,
//! chores, the admin handlers) reads the one in force when it needs it.

use std::{
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{self, Config},
    dnsbl::Dnsbl,
    smtp,
    verdict::Verdicts,
};

mod dnsbl;
mod listing;
pub mod privileges;
mod reload;
mod requests;
mod serve;
mod start;
mod stop;
mod tasks;

pub use requests::{DaemonStats, Stats};
use tasks::Tasks;

/// How often expired kernel entries are swept out.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// State shared by the admin handler and the background tasks.
pub struct Daemon {
    /// The configuration in force: its one holder, swapped whole on reload.
    config: watch::Sender<Arc<Config>>,
    /// Blocks and allows, kernel and store.
    verdicts: Arc<Verdicts>,
    /// The SMTP screening server, for its counters and reloads.
    smtp: smtp::Server,
    /// The DNSBL engine, for its counters (`None` without sites); replaced
    /// when a reload changes the lists or the resolver.
    dnsbl: RwLock<Option<Dnsbl>>,
    /// Where the configuration came from, for SIGHUP.
    cfg_path: PathBuf,
    /// The admin socket bound at start, removed at stop (a reload that
    /// changes `admin.socket` applies only on restart).
    admin_socket: PathBuf,
    /// Started with `--no-xdp`: block and allow changes only reach the
    /// store, and the CLI says so.
    no_xdp: bool,
    /// For `uptime_secs` in `stats`.
    started: Instant,
    /// Every task the daemon runs, drained at stop.
    tasks: Tasks,
    /// The watcher of each configured import list with its own stop, so a
    /// reload starts the new, stops the removed and leaves the unchanged
    /// ones running.
    importers: Mutex<Vec<(config::ImportList, CancellationToken)>>,
    /// Configurations applied since start (0 = the one started with), so
    /// `stats` says which is in force.
    generation: AtomicU64,
    /// Keys whose new values wait for a restart, as the last reload found
    /// them; shown in `stats` so "reloaded" never hides "not applied".
    restart_pending: Mutex<Vec<&'static str>>,
    /// The task draining the program's log ring buffer; replaced with the
    /// program when a reload loads a new instance.
    xdp_logger: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Daemon {
    /// The configuration in force.
    fn cfg(&self) -> Arc<Config> {
        Arc::clone(&self.config.borrow())
    }

    /// Hands the SMTP server the allow entries in force: the clients they
    /// cover skip every test.
    fn refresh_allows(&self) {
        self.smtp.set_allows(&self.verdicts.allowed());
    }

    /// Owns the program's log reader, stopping the one it replaces.
    fn set_xdp_logger(&self, logger: Option<tokio::task::JoinHandle<()>>) {
        let abort = logger.as_ref().map(tokio::task::JoinHandle::abort_handle);
        if let Some(task) = logger {
            self.tasks.adopt("XDP log reader", task);
        }
        let old = std::mem::replace(&mut *self.xdp_logger.lock().expect("logger lock"), abort);
        if let Some(old) = old {
            old.abort();
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT. The XDP gate stays attached
/// when it exits: only `screener xdp detach` opens it.
pub async fn run(cfg: Config, cfg_path: PathBuf, no_xdp: bool) -> anyhow::Result<()> {
    let started = start::start(cfg, cfg_path, no_xdp).await?;
    let (daemon, ended) = serve::serve(started).await;
    stop::stop(&daemon).await;
    ended
}

/// Returns freed heap memory to the system after a large operation:
/// glibc keeps what a listing or an import of a million entries freed,
/// and the daemon would otherwise stay that big.
pub fn give_back_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Parses every CIDR first, so one bad value changes nothing.
pub fn parse_nets(nets: &[String]) -> Result<Vec<IpNet>, String> {
    if nets.is_empty() {
        return Err("no CIDR given".into());
    }
    nets.iter()
        .map(|n| config::parse_net(n).map_err(|e| format!("bad CIDR: {e}")))
        .collect()
}
