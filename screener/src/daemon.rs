//! `screener run`: owns the XDP gate and serves the admin socket.
//!
//! The daemon is the only writer of the kernel maps: every `block` and
//! `allow` change arrives over the admin socket and is applied here, with
//! its `BLOCK` / `UNBLOCK` log line.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::FutureExt as _;
use ipnet::IpNet;
use screener_common::Reason;
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    admin::{self, Request, Response},
    config::{self, Config},
    duration,
    xdp::{self, maps::expiry_after, Gate},
};

/// How often expired kernel entries are swept out.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// State shared by the admin handler and the background tasks.
pub struct Daemon {
    /// The configuration in force; replaced as a whole on SIGHUP.
    cfg: RwLock<Arc<Config>>,
    /// Where the configuration came from, for SIGHUP.
    cfg_path: PathBuf,
    /// `None` with `--no-xdp` or after `xdp detach`.
    gate: Mutex<Option<Gate>>,
    started: Instant,
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

/// The kernel reason for an operator's `--reason` text: a known reason
/// name maps to itself, anything else is a manual block.
pub fn reason_from_text(text: Option<&str>) -> Reason {
    text.and_then(|t| Reason::ALL.into_iter().find(|r| r.name() == t))
        .unwrap_or(Reason::Manual)
}

#[derive(Serialize)]
struct DaemonStats {
    uptime_secs: u64,
    xdp_attached: bool,
}

#[derive(Serialize)]
struct Stats {
    kernel: Option<xdp::maps::KernelStats>,
    daemon: DaemonStats,
}

impl Daemon {
    fn cfg(&self) -> Arc<Config> {
        self.cfg.read().expect("config lock").clone()
    }

    fn with_gate<T>(&self, f: impl FnOnce(&mut Gate) -> Result<T, String>) -> Result<T, String> {
        let mut g = self.gate.lock().expect("gate lock");
        match g.as_mut() {
            Some(gate) => f(gate),
            None => Err("XDP is not loaded (started with --no-xdp, or detached)".into()),
        }
    }

    /// Handles one admin request.
    pub fn handle(&self, req: Request) -> Response {
        let result: Result<serde_json::Value, String> = match req {
            Request::BlockAdd { nets, ttl, reason } => {
                self.block_add(&nets, ttl, reason.as_deref())
            }
            Request::BlockDel { nets } => self.block_del(&nets),
            Request::BlockList => self
                .with_gate(|g| g.maps.blocks().map_err(|e| e.to_string()))
                .map(json),
            Request::AllowAdd { nets } => self.allow_add(&nets),
            Request::AllowDel { nets } => self.allow_del(&nets),
            Request::AllowList => self
                .with_gate(|g| g.maps.allows().map_err(|e| e.to_string()))
                .map(json),
            Request::Stats => Ok(json(self.stats())),
            Request::XdpStatus => Ok(json(xdp::status(&self.cfg().xdp.pin_path))),
            Request::XdpDetach => {
                let gate = self.gate.lock().expect("gate lock").take();
                drop(gate);
                xdp::detach(&self.cfg().xdp.pin_path)
                    .map(|removed| {
                        tracing::info!("XDP detached on request: {}", removed.join(", "));
                        json(removed)
                    })
                    .map_err(|e| e.to_string())
            }
            Request::CacheList
            | Request::CacheShow { .. }
            | Request::CachePurge { .. }
            | Request::Import { .. } => Err("not available in this daemon".into()),
        };
        match result {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(e),
        }
    }

    fn block_add(
        &self,
        nets: &[String],
        ttl: Option<u64>,
        reason_text: Option<&str>,
    ) -> Result<serde_json::Value, String> {
        let nets = parse_nets(nets)?;
        let ttl = ttl.unwrap_or_else(|| self.cfg().verdict.block_ttl.as_secs());
        let reason = reason_from_text(reason_text);
        let label = reason_text.unwrap_or(reason.name());
        self.with_gate(|g| {
            let expires = expiry_after(Some(ttl));
            let mut done = Vec::new();
            for net in &nets {
                if let Err(e) = g.maps.block(*net, reason, expires) {
                    // All or nothing: undo this request's earlier inserts.
                    for d in &done {
                        let _ = g.maps.unblock(*d);
                    }
                    return Err(format!("{net}: {e}"));
                }
                done.push(*net);
            }
            for net in &nets {
                tracing::info!(
                    "BLOCK {net} reason={label} ttl={}",
                    duration::Display(Duration::from_secs(ttl))
                );
            }
            Ok(json(
                nets.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ))
        })
    }

    fn block_del(&self, nets: &[String]) -> Result<serde_json::Value, String> {
        let nets = parse_nets(nets)?;
        self.with_gate(|g| {
            let current = g.maps.blocks().map_err(|e| e.to_string())?;
            if let Some(missing) = nets
                .iter()
                .find(|n| !current.iter().any(|c| c.net == n.trunc()))
            {
                return Err(format!("{missing} is not blocked"));
            }
            for net in &nets {
                g.maps.unblock(*net).map_err(|e| format!("{net}: {e}"))?;
                tracing::info!("UNBLOCK {net} reason=operator");
            }
            Ok(json(
                nets.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ))
        })
    }

    fn allow_add(&self, nets: &[String]) -> Result<serde_json::Value, String> {
        let nets = parse_nets(nets)?;
        self.with_gate(|g| {
            let mut done = Vec::new();
            for net in &nets {
                if let Err(e) = g.maps.allow(*net) {
                    for d in &done {
                        let _ = g.maps.unallow(*d);
                    }
                    return Err(format!("{net}: {e}"));
                }
                done.push(*net);
            }
            for net in &nets {
                tracing::info!("ALLOW {net}");
            }
            Ok(json(
                nets.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ))
        })
    }

    fn allow_del(&self, nets: &[String]) -> Result<serde_json::Value, String> {
        let nets = parse_nets(nets)?;
        self.with_gate(|g| {
            let current = g.maps.allows().map_err(|e| e.to_string())?;
            if let Some(missing) = nets
                .iter()
                .find(|n| !current.iter().any(|c| c.net == n.trunc()))
            {
                return Err(format!("{missing} is not allowed"));
            }
            for net in &nets {
                g.maps.unallow(*net).map_err(|e| format!("{net}: {e}"))?;
                tracing::info!("DISALLOW {net}");
            }
            Ok(json(
                nets.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ))
        })
    }

    fn stats(&self) -> Stats {
        let g = self.gate.lock().expect("gate lock");
        let kernel = g.as_ref().and_then(|g| match g.maps.stats() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("reading kernel counters: {e}");
                None
            }
        });
        Stats {
            kernel,
            daemon: DaemonStats {
                uptime_secs: self.started.elapsed().as_secs(),
                xdp_attached: g.is_some(),
            },
        }
    }

    fn sweep(&self) {
        let mut g = self.gate.lock().expect("gate lock");
        if let Some(gate) = g.as_mut() {
            match gate.maps.sweep() {
                Ok(gone) => {
                    for l in gone {
                        tracing::info!("UNBLOCK {} reason={} expired", l.net, l.reason);
                    }
                }
                Err(e) => tracing::warn!("sweeping expired entries: {e}"),
            }
        }
    }

    /// SIGHUP: a new configuration for what can change while running. A bad
    /// file is refused and logged; the old configuration stays.
    fn reload(&self) {
        let new = match Config::load(&self.cfg_path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("reload refused, keeping the running configuration: {e}");
                return;
            }
        };
        let old = self.cfg();
        if new.verdict.ipv6_prefix != old.verdict.ipv6_prefix
            || new.xdp.pin_path != old.xdp.pin_path
            || new.admin.socket != old.admin.socket
        {
            tracing::warn!(
                "verdict.ipv6_prefix, xdp.pin_path and admin.socket change only on restart"
            );
        }
        if let Some(gate) = self.gate.lock().expect("gate lock").as_mut() {
            let ports = match &new.xdp.ports {
                config::Ports::All => None,
                config::Ports::List(p) => Some(p.as_slice()),
            };
            if let Err(e) = gate.maps.configure(gate.maps.ipv6_prefix(), ports) {
                tracing::error!("applying xdp.ports: {e}");
            }
        }
        *self.cfg.write().expect("config lock") = Arc::new(new);
        tracing::info!(config = %self.cfg_path.display(), "configuration reloaded");
    }
}

fn json(v: impl Serialize) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Runs the daemon until SIGTERM or SIGINT. The XDP gate stays attached
/// when it exits: only `screener xdp detach` opens it.
pub async fn run(cfg: Config, cfg_path: PathBuf, no_xdp: bool) -> anyhow::Result<()> {
    let gate = if no_xdp {
        tracing::info!("running without XDP (--no-xdp)");
        None
    } else {
        let mut gate = Gate::open(&cfg).context("starting the XDP gate")?;
        gate.spawn_logger();
        for (iface, mode) in &gate.attached {
            tracing::info!(interface = %iface, mode = %mode, pin_path = %gate.pin_dir().display(), "XDP gate up");
        }
        Some(gate)
    };
    let listener = admin::bind(&cfg.admin.socket)
        .await
        .context("opening the admin socket")?;
    let socket = cfg.admin.socket.clone();
    let daemon = Arc::new(Daemon {
        cfg: RwLock::new(Arc::new(cfg)),
        cfg_path,
        gate: Mutex::new(gate),
        started: Instant::now(),
    });
    daemon.sweep();

    let d = daemon.clone();
    let handler: admin::Handler = Arc::new(move |req| {
        let d = d.clone();
        // Map updates are short syscalls, but a large listing is not:
        // keep them off the runtime's worker threads.
        async move {
            tokio::task::spawn_blocking(move || d.handle(req))
                .await
                .unwrap_or_else(|e| Response::err(format!("internal error: {e}")))
        }
        .boxed()
    });
    let admin_task = tokio::spawn(admin::serve(listener, handler));
    tracing::info!(socket = %socket.display(), "admin socket ready");

    let d = daemon.clone();
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            let d = d.clone();
            let _ = tokio::task::spawn_blocking(move || d.sweep()).await;
        }
    });

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let d = daemon.clone();
                let _ = tokio::task::spawn_blocking(move || d.reload()).await;
            }
        }
    }
    tracing::info!("shutting down; the XDP gate stays attached");
    admin_task.abort();
    sweeper.abort();
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
