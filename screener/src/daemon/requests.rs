//! Admin requests: what each does, and the answers the CLI prints.

use std::{net::IpAddr, sync::atomic::Ordering, sync::Arc, time::Duration};

use ipnet::IpNet;
use serde::Serialize;

use super::{
    listing::{self, Listing},
    parse_nets, Daemon,
};
use crate::{
    admin::{Reply, Request, Response},
    config, dnsbl, import, smtp,
    verdict::{self, VerdictError},
    xdp,
};

/// A TTL from an admin request, bounded as the CLI bounds it: a client
/// other than the CLI must not wrap an expiry around to the past.
fn admin_ttl(ttl: Option<u64>) -> Result<Option<Duration>, String> {
    match ttl.map(Duration::from_secs) {
        Some(t) if t.is_zero() || t > crate::duration::MAX => Err(format!(
            "ttl {}s is outside 1s..={}s",
            t.as_secs(),
            crate::duration::MAX.as_secs()
        )),
        t => Ok(t),
    }
}

/// The daemon's own part of `stats`.
#[derive(Serialize)]
pub struct DaemonStats {
    /// Seconds since start.
    pub uptime_secs: u64,
    /// True only when every configured interface runs the program now.
    pub xdp_attached: bool,
    /// Configurations applied since start: 0 until the first reload.
    pub config_generation: u64,
    /// Keys changed in the file that take effect only on restart.
    pub config_restart_pending: Vec<&'static str>,
    /// Each configured interface as the kernel sees it (none without XDP).
    pub xdp_interfaces: Vec<xdp::InterfaceStatus>,
    /// Blocks, unblocks, refusals, escalations.
    #[serde(flatten)]
    pub verdicts: verdict::CountersSnapshot,
}

/// The answer to `stats`: one section per part of the daemon.
#[derive(Serialize)]
pub struct Stats {
    /// The program's counters and map fill (none without a gate).
    pub kernel: Option<xdp::maps::KernelStats>,
    /// Uptime, configuration, interfaces, verdict counters.
    pub daemon: DaemonStats,
    /// Whether the store works and what waits to be written.
    pub store: crate::store::StoreHealth,
    /// Connections, passes, failures, queues.
    pub smtp: smtp::SmtpStats,
    /// Lookups and site health (none without sites).
    pub dnsbl: Option<dnsbl::DnsblStats>,
    /// The fleet link: connected, lag, queue (none without `[cluster]`).
    pub cluster: Option<crate::cluster::Status>,
}

/// Where a block/allow change went, so the CLI never says "blocked" when
/// nothing reached a kernel.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum Kernel {
    /// Into the kernel maps and the store.
    Attached,
    /// Into the store only: `xdp detach` removed the gate under the running
    /// daemon; the entries reach the kernel when it is loaded again.
    Detached,
    /// Into the store only: the daemon runs with `--no-xdp`.
    NoXdp,
}

/// The answer to `block add|del`, `allow add|del`.
#[derive(Serialize)]
struct Changed {
    /// The networks changed.
    nets: Vec<String>,
    /// Whether the change reached a kernel.
    kernel: Kernel,
}

/// The answer to `import`.
#[derive(Serialize)]
struct ImportReport {
    /// The list's name (its entries' owner in the store).
    list: String,
    /// Lines that gave a network.
    lines_ok: usize,
    /// Lines skipped.
    lines_bad: usize,
    /// The first skipped lines, with why.
    errors: Vec<String>,
    /// Networks new to the list.
    added: usize,
    /// Networks the new version no longer has.
    removed: usize,
    /// Networks in both versions.
    kept: usize,
    /// Networks a manual block or another list already holds.
    shadowed: usize,
}

impl Daemon {
    /// Handles one admin request.
    pub async fn handle(self: Arc<Self>, req: Request) -> Reply {
        let listing = match req {
            Request::BlockList => Listing::Blocks,
            Request::AllowList => Listing::Allows,
            Request::CacheList => Listing::Cache,
            other => {
                return Reply::One(match self.dispatch(other).await {
                    Ok(v) => Response::ok(v),
                    Err(e) => Response::err(e),
                })
            }
        };
        Reply::Rows(listing::start(
            Arc::clone(&self.verdicts),
            listing,
            &self.tasks,
        ))
    }

    async fn dispatch(&self, req: Request) -> Result<serde_json::Value, String> {
        let v = &self.verdicts;
        let err = |e: VerdictError| e.to_string();
        match req {
            Request::BlockAdd { nets, ttl, reason } => {
                let parsed = parse_nets(&nets)?;
                v.block_manual(&parsed, admin_ttl(ttl)?, reason.as_deref())
                    .await
                    .map_err(err)?;
                Ok(self.changed(&parsed))
            }
            Request::BlockDel { nets } => {
                let parsed = parse_nets(&nets)?;
                v.unblock(&parsed, "operator").await.map_err(err)?;
                Ok(self.changed(&parsed))
            }
            Request::AllowAdd { nets } => {
                let parsed = parse_nets(&nets)?;
                v.allow(&parsed).await.map_err(err)?;
                self.refresh_allows();
                Ok(self.changed(&parsed))
            }
            Request::AllowDel { nets } => {
                let parsed = parse_nets(&nets)?;
                v.unallow(&parsed).await.map_err(err)?;
                self.refresh_allows();
                Ok(self.changed(&parsed))
            }
            Request::Stats => Ok(json(self.stats())),
            Request::ClusterStatus => match v.cluster() {
                Some(c) => Ok(json(c.status_with_nodes().await)),
                None => Err("this node is in no fleet: cluster.redis is empty".into()),
            },
            Request::XdpStatus => {
                let cfg = self.cfg();
                let held = v.with_gate(|g| g.interfaces());
                Ok(json(
                    xdp::status(&cfg.xdp.pin_path, &cfg.xdp.interfaces).seen_by(held),
                ))
            }
            Request::XdpDetach => {
                drop(v.take_gate());
                let removed = xdp::detach(&self.cfg().xdp.pin_path).map_err(|e| e.to_string())?;
                tracing::info!("XDP detached on request: {}", removed.join(", "));
                Ok(json(removed))
            }
            Request::CacheShow { ip } => {
                let ip: IpAddr = ip.parse().map_err(|_| format!("bad address {ip:?}"))?;
                let rec = v.store().client(ip).await.map_err(|e| e.to_string())?;
                rec.map(json)
                    .ok_or_else(|| format!("{ip} is not in the cache"))
            }
            Request::CachePurge { ip } => {
                let n = match ip {
                    Some(ip) => {
                        let ip: IpAddr = ip.parse().map_err(|_| format!("bad address {ip:?}"))?;
                        usize::from(
                            v.store()
                                .delete_client(ip)
                                .await
                                .map_err(|e| e.to_string())?,
                        )
                    }
                    None => v.store().purge_clients().await.map_err(|e| e.to_string())?,
                };
                Ok(json(serde_json::json!({ "purged": n })))
            }
            Request::Import {
                file,
                format,
                ttl,
                reason,
            } => self.import(&file, &format, ttl, reason).await,
            Request::BlockList | Request::AllowList | Request::CacheList => {
                Err("listings are streamed".into())
            }
        }
    }

    /// The answer to a block/allow change: the networks, and whether the
    /// change reached a kernel (see [`Changed`]).
    fn changed(&self, nets: &[IpNet]) -> serde_json::Value {
        let kernel = if self.verdicts.with_gate(|_| ()).is_some() {
            Kernel::Attached
        } else if self.no_xdp {
            Kernel::NoXdp
        } else {
            Kernel::Detached
        };
        json(Changed {
            nets: names(nets),
            kernel,
        })
    }

    pub(super) async fn import(
        &self,
        file: &std::path::Path,
        format: &str,
        ttl: Option<u64>,
        reason: Option<String>,
    ) -> Result<serde_json::Value, String> {
        let format: import::Format = format.parse()?;
        // Read line by line on the blocking pool: the file is never held
        // whole, and a big one does not occupy a runtime worker.
        let path = file.to_owned();
        let parsed = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&path)?;
            import::parse_reader(std::io::BufReader::new(f), format)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("reading {}: {e}", file.display()))?;
        let list = reason.unwrap_or_else(|| {
            config::ImportList {
                file: file.to_owned(),
                format: String::new(),
                name: None,
                interval: Duration::ZERO,
            }
            .list_name()
        });
        for (line, e) in parsed.errors.iter().take(20) {
            tracing::warn!(list = %list, "{}:{line}: {e}; line skipped", file.display());
        }
        let lines_ok = parsed.nets.len();
        let change = self
            .verdicts
            .import(&list, parsed.nets, admin_ttl(ttl)?)
            .await
            .map_err(|e| e.to_string())?;
        Ok(json(ImportReport {
            list,
            lines_ok,
            lines_bad: parsed.bad,
            errors: parsed
                .errors
                .iter()
                .take(20)
                .map(|(l, e)| format!("line {l}: {e}"))
                .collect(),
            added: change.added,
            removed: change.removed,
            kept: change.kept,
            shadowed: change.shadowed,
        }))
    }

    /// Every counter, read now: what `stats` prints and what the
    /// metrics endpoint renders.
    pub fn stats(&self) -> Stats {
        let kernel = self.verdicts.with_gate(|g| g.maps.stats()).and_then(|r| {
            r.map_err(|e| tracing::warn!("reading kernel counters: {e}"))
                .ok()
        });
        Stats {
            store: self.verdicts.store().health(),
            smtp: self.smtp.stats(),
            dnsbl: self
                .dnsbl
                .read()
                .expect("dnsbl lock")
                .as_ref()
                .map(dnsbl::Dnsbl::stats),
            daemon: DaemonStats {
                uptime_secs: self.started.elapsed().as_secs(),
                xdp_attached: self
                    .verdicts
                    .with_gate(|g| g.attached_everywhere())
                    .unwrap_or(false),
                xdp_interfaces: self
                    .verdicts
                    .with_gate(|g| g.interfaces())
                    .unwrap_or_default(),
                config_generation: self.generation.load(Ordering::Relaxed),
                config_restart_pending: self.restart_pending.lock().expect("restart lock").clone(),
                verdicts: self.verdicts.counters(),
            },
            kernel,
            cluster: self.verdicts.cluster().map(crate::cluster::Cluster::status),
        }
    }
}

fn names(nets: &[IpNet]) -> Vec<String> {
    nets.iter().map(ToString::to_string).collect()
}

fn json(v: impl Serialize) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_ttls_are_bounded_as_the_cli_bounds_them() {
        assert_eq!(admin_ttl(None), Ok(None));
        assert_eq!(admin_ttl(Some(60)), Ok(Some(Duration::from_secs(60))));
        assert!(admin_ttl(Some(0)).is_err());
        assert!(admin_ttl(Some(u64::MAX)).unwrap_err().contains("outside"));
    }
}
