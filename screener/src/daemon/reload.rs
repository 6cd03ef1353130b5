//! SIGHUP: a new configuration, applied group by group, or refused whole.

use std::sync::{atomic::Ordering, Arc};

use tokio_util::sync::CancellationToken;

use super::{
    dnsbl::{build_dnsbl, lookup},
    Daemon,
};
use crate::{
    config::{self, Config},
    dnsbl::Dnsbl,
    xdp::{self, Gate},
};

impl Daemon {
    /// SIGHUP: applies a new configuration. Everything that can fail (the
    /// file, the DNSBL engine) is built first, so a bad file or site changes
    /// nothing; then every group is applied: screening parameters, DNSBL
    /// lists and resolver, import lists, listeners, XDP interfaces, ports
    /// and log level. A key that needs a restart is named in a warning and
    /// in `stats`.
    pub(super) async fn reload(self: &Arc<Self>) {
        let path = self.cfg_path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
        let new = match loaded {
            Ok(Ok(c)) => Arc::new(c),
            Ok(Err(e)) => {
                tracing::error!("reload refused, keeping the running configuration: {e}");
                return;
            }
            Err(e) => {
                tracing::error!("reload refused: {e}");
                return;
            }
        };
        new.log_warnings();
        crate::local::refresh();
        let old = self.cfg();
        let dnsbl_changed = dnsbl_inputs(&old) != dnsbl_inputs(&new);
        let dnsbl = if dnsbl_changed {
            match build_dnsbl(&new) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::error!("reload refused, keeping the running configuration: {e:#}");
                    return;
                }
            }
        } else {
            None
        };
        let pending = restart_keys(&old, &new);
        if !pending.is_empty() {
            tracing::warn!(
                "reload: {} changed but take effect only on restart; the running values stay",
                pending.join(", ")
            );
        }
        *self.restart_pending.lock().expect("restart lock") = pending;

        self.reload_xdp(&old, &new).await;
        // The one swap: verdicts, chores and admin requests read the new
        // configuration from here on.
        self.config.send_replace(Arc::clone(&new));
        if let Some(d) = dnsbl {
            self.swap_dnsbl(d);
        }
        self.smtp.reload(Arc::clone(&new));
        for e in self.smtp.apply_listen(&new.smtp.listen) {
            tracing::error!("reload: {e}; the other listeners are in force");
        }
        self.reload_imports(&new.import.lists);
        let n = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(config = %self.cfg_path.display(), generation = n, "configuration reloaded");
    }

    /// Puts a newly built DNSBL engine in force, for the SMTP sessions and
    /// the counters; the old one's health checks end with it.
    fn swap_dnsbl(&self, dnsbl: Option<Dnsbl>) {
        if let Some(d) = &dnsbl {
            self.tasks
                .adopt("DNSBL health checks", d.spawn_health_checks());
        }
        self.smtp.set_dnsbl(lookup(dnsbl.as_ref(), &self.verdicts));
        let sites = dnsbl.as_ref().map_or(0, |d| d.stats().sites.len());
        *self.dnsbl.write().expect("dnsbl lock") = dnsbl;
        tracing::info!(sites, "DNSBL engine rebuilt");
    }

    /// Applies `xdp.*` changes: ports at once; interfaces, mode and log
    /// level by loading a new program instance on the pinned maps and
    /// swapping it into the links, as a restart does (no gap, no entry
    /// lost). Without a gate (`--no-xdp`, after `xdp detach`) nothing here
    /// applies.
    async fn reload_xdp(&self, old: &Config, new: &Arc<Config>) {
        if self.verdicts.with_gate(|_| ()).is_none() {
            return;
        }
        if new.xdp.ports != old.xdp.ports {
            let ports = match &new.xdp.ports {
                config::Ports::All => None,
                config::Ports::List(p) => Some(p.clone()),
            };
            if let Some(Err(e)) = self
                .verdicts
                .with_gate(|g| g.maps.configure(g.maps.ipv6_prefix(), ports.as_deref()))
            {
                tracing::error!("reload: applying xdp.ports: {e}");
            }
        }
        if new.xdp.interfaces == old.xdp.interfaces
            && new.xdp.mode == old.xdp.mode
            && new.xdp.log_level == old.xdp.log_level
        {
            return;
        }
        let cfg = new.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let mut gate = Gate::reload(&cfg)?;
            gate.attach()?;
            Ok::<_, xdp::XdpError>(gate)
        });
        match opened.await {
            Ok(Ok(mut gate)) => {
                let logger = gate.spawn_logger();
                self.verdicts.replace_gate(gate);
                self.set_xdp_logger(logger);
            }
            Ok(Err(e)) => tracing::error!(
                "reload: applying xdp.interfaces/mode/log_level: {e}; the gate stays as it was"
            ),
            Err(e) => tracing::error!("reload: XDP: {e}"),
        }
    }

    /// Starts watchers for new import lists, stops those of lists no
    /// longer configured (their entries leave the kernel and the store),
    /// leaves unchanged ones alone. Removing a list is work the stop
    /// waits for: cut halfway, the store would forget entries the kernel
    /// still holds, and the next start would adopt them as blocks.
    pub(super) fn reload_imports(self: &Arc<Self>, lists: &[config::ImportList]) {
        let mut running = self.importers.lock().expect("importers lock");
        let mut kept = Vec::new();
        for (list, stop) in running.drain(..) {
            if lists.contains(&list) {
                kept.push((list, stop));
                continue;
            }
            stop.cancel();
            let name = list.list_name();
            if !lists.iter().any(|l| l.list_name() == name) {
                let d = Arc::clone(self);
                self.tasks.spawn("import list removal", async move {
                    match d.verdicts.import(&name, Vec::new(), None).await {
                        Ok(c) => tracing::info!(
                            list = %name,
                            removed = c.removed,
                            "import list no longer configured: its entries are removed"
                        ),
                        Err(e) => {
                            tracing::warn!(list = %name, "removing an unconfigured import list: {e}");
                        }
                    }
                });
            }
        }
        for list in lists {
            if !kept.iter().any(|(l, _)| l == list) {
                let stop = self.tasks.stop().child_token();
                let d = Arc::clone(self);
                let (l, s) = (list.clone(), stop.clone());
                self.tasks.spawn(
                    "import list watcher",
                    async move { d.watch_list(l, s).await },
                );
                kept.push((list.clone(), stop));
            }
        }
        *running = kept;
    }

    /// Imports a configured list at start and again whenever its file
    /// changes.
    /// An import begun is finished; `stop` (a reload removed the list, or
    /// the daemon stops) ends the watch between two looks.
    async fn watch_list(&self, list: config::ImportList, stop: CancellationToken) {
        let mut imported_at = None;
        loop {
            let mtime = tokio::fs::metadata(&list.file)
                .await
                .and_then(|m| m.modified());
            match mtime {
                Ok(m) if imported_at != Some(m) => {
                    let name = list.list_name();
                    match self
                        .import(&list.file, &list.format, None, Some(name.clone()))
                        .await
                    {
                        Ok(_) => imported_at = Some(m),
                        Err(e) => {
                            let file = list.file.display();
                            tracing::warn!(list = %name, "import of {file} failed: {e}");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("import list {}: {e}", list.file.display()),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(list.interval) => {}
            }
        }
    }
}

/// The settings the DNSBL engine is built from: a change in any of them
/// means a new engine.
fn dnsbl_inputs(c: &Config) -> impl PartialEq + '_ {
    let s = &c.screen;
    (
        &s.dnsbl_sites,
        &c.dns.nameservers,
        s.dnsbl_timeout,
        s.dnsbl_min_ttl,
        s.dnsbl_max_ttl,
        &s.dnsbl_reply_map,
        s.dnsbl_health_interval,
        &s.dnsbl_health_skip,
    )
}

/// The keys that differ between `old` and `new` but apply only on restart.
fn restart_keys(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |changed: bool, key: &'static str| {
        if changed {
            keys.push(key);
        }
    };
    check(
        new.verdict.ipv6_prefix != old.verdict.ipv6_prefix,
        "verdict.ipv6_prefix",
    );
    check(new.xdp.pin_path != old.xdp.pin_path, "xdp.pin_path");
    check(new.xdp.max_hosts != old.xdp.max_hosts, "xdp.max_hosts");
    check(
        new.xdp.max_prefixes != old.xdp.max_prefixes,
        "xdp.max_prefixes",
    );
    check(new.xdp.max_allows != old.xdp.max_allows, "xdp.max_allows");
    check(new.store.path != old.store.path, "store.path");
    check(new.admin.socket != old.admin.socket, "admin.socket");
    check(new.metrics.listen != old.metrics.listen, "metrics.listen");
    // The fleet link is made once, at start.
    check(new.cluster != old.cluster, "cluster");
    check(new.daemon.user != old.daemon.user, "daemon.user");
    check(
        new.daemon.admin_group != old.daemon.admin_group,
        "daemon.admin_group",
    );
    // The subscriber is installed once, at start.
    let (l, o) = (&new.log, &old.log);
    check(l.format != o.format, "log.format");
    check(l.identifier != o.identifier, "log.identifier");
    check(
        l.dnsblog_identifier != o.dnsblog_identifier,
        "log.dnsblog_identifier",
    );
    check(
        l.respectful_logging != o.respectful_logging,
        "log.respectful_logging",
    );
    keys
}
