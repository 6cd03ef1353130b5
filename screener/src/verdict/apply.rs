//! Carrying verdicts out: kernel first, then store.
//!
//! An operator's request is all or nothing: a net the kernel refuses
//! rolls back the ones of the same request already in. A screening
//! verdict is one net: what the kernel refuses is logged and counted.
//!
//! MAP FULL. A full map refuses the new entry: the refusal is logged,
//! counted (`blocks_refused_full`), and the client is still rejected at the
//! SMTP level. Entries already in the kernel are never evicted to make
//! room: they are an operator's, a list's, or a verdict still in force,
//! and silently dropping one would reopen the gate for it. Raise
//! `xdp.max_hosts` / `xdp.max_prefixes` instead.

use std::{net::IpAddr, sync::atomic::Ordering, time::Duration};

use ipnet::IpNet;
use screener_common::Reason;

use super::{policy, VerdictError, Verdicts};
use crate::{
    config::BlockOn,
    duration,
    store::{now_unix, AllowRecord, BlockRecord, Change},
    xdp::maps::boot_now,
};

/// The kernel `expires` for a store expiry in unix seconds.
pub(super) fn kernel_expiry(expires_unix: u64, now_unix: u64) -> u32 {
    if expires_unix == 0 {
        return 0;
    }
    let left = u32::try_from(expires_unix.saturating_sub(now_unix)).unwrap_or(u32::MAX);
    boot_now().saturating_add(left.max(1))
}

impl Verdicts {
    /// Puts `rec` into the kernel (when loaded) and the store.
    async fn apply_block(&self, rec: BlockRecord) -> Result<(), VerdictError> {
        let reason = policy::kernel_reason(&rec.reason);
        let expires = kernel_expiry(rec.expires, now_unix());
        let net = rec.net;
        if let Some(Err(e)) = self.with_gate(|g| g.maps.block(net, reason, expires)) {
            self.counters.refused_if_full(&e);
            return Err(e.into());
        }
        // Never undone when the store cannot take it: the change waits in
        // the store's queue.
        self.store.record(vec![Change::PutBlock(rec)]).await;
        Ok(())
    }

    /// Takes the block on `net` out of the kernel and the store.
    async fn remove_block(&self, net: IpNet) -> Result<(), VerdictError> {
        let net = net.trunc();
        if let Some(r) = self.with_gate(|g| g.maps.unblock(net)) {
            r?;
        }
        self.store.record(vec![Change::DelBlock(net)]).await;
        self.groups.lock().expect("groups lock").forget(net);
        Ok(())
    }

    /// The stored block on exactly `net`, for offence counts and first-seen
    /// times. A store that cannot be read (its failure is logged once by
    /// the store) must not stop a verdict: it counts as a first offence.
    pub(super) async fn stored_block(&self, net: IpNet) -> Option<BlockRecord> {
        match self.store.block(net).await {
            Ok(rec) => rec,
            Err(e) => {
                tracing::debug!("reading the block on {net}: {e}");
                None
            }
        }
    }

    /// A live (unexpired) block record for exactly `net`.
    async fn live_block(&self, net: IpNet) -> Result<Option<BlockRecord>, VerdictError> {
        let now = now_unix();
        Ok(self
            .store
            .block(net.trunc())
            .await?
            .filter(|b| b.expires == 0 || b.expires > now))
    }

    /// Whether the kernel holds a block entry on exactly `net` (for when the
    /// store cannot be read; this walks the maps).
    pub(super) fn in_kernel(&self, net: IpNet) -> Result<bool, VerdictError> {
        let net = net.trunc();
        match self.with_gate(|g| g.maps.blocks()) {
            Some(listed) => Ok(listed?.iter().any(|l| l.net == net)),
            None => Ok(false),
        }
    }

    /// Blocks `nets` as the operator asked: all or nothing.
    pub async fn block_manual(
        &self,
        nets: &[IpNet],
        ttl: Option<Duration>,
        reason: Option<&str>,
    ) -> Result<(), VerdictError> {
        let ttl = ttl.unwrap_or(self.cfg().verdict.block_ttl);
        let now = now_unix();
        let label = reason.unwrap_or("manual");
        let mut done: Vec<IpNet> = Vec::new();
        for net in nets {
            let prev = self.stored_block(*net).await;
            let rec = policy::manual(*net, label, prev.as_ref(), now, ttl);
            if let Err(e) = self.apply_block(rec).await {
                for d in &done {
                    let _ = self.remove_block(*d).await;
                }
                return Err(VerdictError::Refused(format!("{net}: {e}")));
            }
            done.push(*net);
        }
        let until = now + ttl.as_secs().max(1);
        for net in nets {
            if let Ok(Some(rec)) = self.store.block(net.trunc()).await {
                self.publish_block(&rec);
            }
            self.groups
                .lock()
                .expect("groups lock")
                .note(net.trunc(), until);
            self.counters.block(policy::kernel_reason(label));
            tracing::info!("BLOCK {net} reason={label} ttl={}", duration::Display(ttl));
        }
        Ok(())
    }

    /// Removes blocks; every net must be blocked, else nothing changes.
    pub async fn unblock(&self, nets: &[IpNet], why: &str) -> Result<(), VerdictError> {
        for net in nets {
            let blocked = match self.live_block(*net).await {
                Ok(b) => b.is_some(),
                // The store cannot say: the kernel can.
                Err(_) => self.in_kernel(*net)?,
            };
            if !blocked {
                return Err(VerdictError::Refused(format!("{net} is not blocked")));
            }
        }
        for net in nets {
            self.remove_block(*net).await?;
            self.publish_unblock(*net);
            self.counters.unblock(super::Unblock::Operator);
            tracing::info!("UNBLOCK {net} reason={why}");
        }
        Ok(())
    }

    /// Adds allow entries: all or nothing.
    pub async fn allow(&self, nets: &[IpNet]) -> Result<(), VerdictError> {
        let mut done = Vec::new();
        for net in nets {
            if let Some(Err(e)) = self.with_gate(|g| g.maps.allow(*net)) {
                for d in &done {
                    let _ = self.with_gate(|g| g.maps.unallow(*d));
                }
                return Err(VerdictError::Refused(format!("{net}: {e}")));
            }
            done.push(*net);
        }
        for net in nets {
            self.store
                .record(vec![Change::PutAllow(AllowRecord {
                    net: net.trunc(),
                    added: now_unix(),
                    comment: None,
                })])
                .await;
            let mut allows = self.allows.write().expect("allows lock");
            if !allows.contains(&net.trunc()) {
                allows.push(net.trunc());
            }
            drop(allows);
            tracing::info!("ALLOW {net}");
        }
        Ok(())
    }

    /// Removes allow entries; every net must be allowed, else nothing
    /// changes.
    pub async fn unallow(&self, nets: &[IpNet]) -> Result<(), VerdictError> {
        let current = self.allowed();
        for net in nets {
            if !current.contains(&net.trunc()) {
                return Err(VerdictError::Refused(format!("{net} is not allowed")));
            }
        }
        for net in nets {
            if let Some(r) = self.with_gate(|g| g.maps.unallow(*net)) {
                r?;
            }
            self.store.record(vec![Change::DelAllow(net.trunc())]).await;
            self.allows
                .write()
                .expect("allows lock")
                .retain(|a| *a != net.trunc());
            tracing::info!("DISALLOW {net}");
        }
        Ok(())
    }

    /// A client failed `outcome`: block it if the policy says so.
    pub async fn on_failure(&self, ip: IpAddr, outcome: BlockOn) {
        let cfg = self.cfg();
        if !cfg.verdict.block_on.contains(&outcome) {
            return;
        }
        let net = policy::verdict_net(ip, cfg.verdict.ipv6_prefix);
        // A block the kernel refused (a full host map) is still an offence
        // in its /24 (/48): escalating is how a full map keeps up.
        let reason = policy::block_on_reason(outcome);
        if let Err(e) = self.block_verdict(net, reason).await {
            tracing::warn!("BLOCK {net} failed: {e}");
        }
        if let Err(e) = self.escalate(net).await {
            tracing::warn!("escalating {net}: {e}");
        }
    }

    /// Blocks `net` for a screening failure, unless it is protected or an
    /// imported list already holds it.
    async fn block_verdict(&self, net: IpNet, reason: Reason) -> Result<(), VerdictError> {
        if let Some(why) = self.protection(&net) {
            self.counters
                .blocks_skipped_protected
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!("not blocking {net}: {why}");
            return Ok(());
        }
        let v = &self.cfg().verdict;
        let now = now_unix();
        let prev = self.stored_block(net).await;
        let (rec, ttl) = match policy::on_failure(
            net,
            reason,
            prev.as_ref(),
            now,
            v.block_ttl,
            v.block_ttl_max,
        ) {
            policy::OnFailure::Listed { until } => {
                self.groups.lock().expect("groups lock").note(net, until);
                return Ok(());
            }
            policy::OnFailure::Block { rec, ttl } => (rec, ttl),
        };
        let offences = rec.offences;
        self.groups
            .lock()
            .expect("groups lock")
            .note(net, rec.expires);
        let published = rec.clone();
        self.apply_block(rec).await?;
        self.publish_block(&published);
        self.counters.block(reason);
        tracing::info!(
            "BLOCK {net} reason={} ttl={} offences={offences}",
            reason.name(),
            duration::Display(ttl)
        );
        Ok(())
    }

    /// Blocks the /24 (/48) holding `net` once enough of its hosts are.
    async fn escalate(&self, net: IpNet) -> Result<(), VerdictError> {
        let cfg = self.cfg();
        let Some(group) = policy::group_of(net) else {
            return Ok(());
        };
        let threshold = match group {
            IpNet::V4(_) => cfg.verdict.escalate_v4_hosts,
            IpNet::V6(_) => cfg.verdict.escalate_v6_hosts,
        };
        let count = self
            .groups
            .lock()
            .expect("groups lock")
            .count(group, now_unix());
        // A store that cannot be read says nothing here: blocking the group
        // again only refreshes its entry.
        let held = self.live_block(group).await.ok().flatten().is_some();
        if !policy::escalates(count, threshold, held) {
            return Ok(());
        }
        if let Some(why) = self.protection(&group) {
            tracing::info!("not escalating to {group}: {why}");
            return Ok(());
        }
        let ttl = cfg.verdict.block_ttl_max;
        let rec = policy::escalation(group, now_unix(), ttl);
        let published = rec.clone();
        self.apply_block(rec).await?;
        self.publish_block(&published);
        self.counters.escalations.fetch_add(1, Ordering::Relaxed);
        self.counters.block(Reason::Escalation);
        tracing::info!(
            "BLOCK {group} reason=escalation ttl={} hosts={count}",
            duration::Display(ttl)
        );
        Ok(())
    }
}
