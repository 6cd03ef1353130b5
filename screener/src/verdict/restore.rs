//! RESTORING. At start the kernel and the store are made to agree without
//! ever taking a verdict out of the kernel because the store lacks it: the
//! store may be new, emptied or partly unreadable, and the pinned maps are
//! then the only record of what is blocked. So: store entries missing from
//! the kernel (after a reboot, all of them) are put in; pinned entries the
//! store does not hold are adopted into it with the kernel's reason and
//! remaining lifetime; records that do not decode are skipped and named.
//! Kernel entries leave only by an operator's unblock or by expiry.
//!
//! EXPIRY. The kernel ignores a lapsed entry already; [`Verdicts::sweep`]
//! takes lapsed blocks out of the maps and logs each, and
//! [`Verdicts::cleanup`] drops store records older than the retention time.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use ipnet::IpNet;

use super::{apply::kernel_expiry, policy, VerdictError, Verdicts};
use crate::{
    store::{now_unix, salvage, AllowRecord, BlockRecord, Change, Unreadable},
    xdp::{maps::Listed, XdpError},
};

/// What [`Verdicts::reconcile`] did.
#[derive(Debug, Default)]
pub struct Restored {
    /// Store entries put into the kernel (after a reboot: all of them).
    pub restored: usize,
    /// Kernel entries that already matched the store.
    pub kept: usize,
    /// Pinned entries the store did not hold (or held as lapsed), written
    /// into it.
    pub adopted: usize,
    /// Kernel entries whose expiry had passed, removed.
    pub expired: usize,
    /// Store entries the kernel refused because a map is full.
    pub refused_full: usize,
    /// Store records that could not be decoded: skipped, each named in an
    /// ERROR line by the caller.
    pub skipped: Vec<Unreadable>,
}

/// The store record for a kernel entry the store does not hold: the
/// kernel's reason and remaining lifetime; `prev` (a lapsed record on the
/// same network) keeps its first-seen time, offence count and owner.
fn adopted(l: Listed, prev: Option<&BlockRecord>, now: u64) -> BlockRecord {
    BlockRecord {
        net: l.net,
        reason: l.reason,
        expires: l.expires_in.map_or(0, |s| now + s),
        added: prev.map_or(now, |p| p.added),
        list: prev.and_then(|p| p.list.clone()),
        offences: prev.map_or(1, |p| p.offences),
    }
}

/// What the maps pinned in `dir` hold, as store records, for
/// `screener store repair` (which runs without the daemon). Lapsed
/// entries are left out.
pub fn pinned_verdicts(dir: &std::path::Path) -> Result<salvage::Pinned, XdpError> {
    crate::xdp::maps::check_pinned_layout(dir)?;
    let maps = crate::xdp::Maps::from_pins(dir)?;
    let now = now_unix();
    let blocks = maps
        .blocks()?
        .into_iter()
        .filter(|l| l.expires_in != Some(0))
        .map(|l| adopted(l, None, now))
        .collect();
    let allows = maps
        .allows()?
        .into_iter()
        .map(|l| AllowRecord {
            net: l.net,
            added: now,
            comment: Some(ADOPTED.into()),
        })
        .collect();
    Ok(salvage::Pinned { blocks, allows })
}

/// The comment of an allow entry adopted from the kernel.
const ADOPTED: &str = "adopted from the kernel";

impl Verdicts {
    /// Puts the store's verdicts into the kernel at start, and the kernel's
    /// into the store: see RESTORING in the module docs.
    pub async fn reconcile(&self) -> Result<Restored, VerdictError> {
        let now = now_unix();
        let blocks = self.store.blocks_lenient().await?;
        let allows = self.store.allows_lenient().await?;
        let mut out = Restored {
            skipped: blocks.unreadable,
            ..Restored::default()
        };
        out.skipped.extend(allows.unreadable);
        let stored: HashMap<IpNet, BlockRecord> =
            blocks.records.into_iter().map(|b| (b.net, b)).collect();
        let stored_allows: HashSet<IpNet> = allows.records.iter().map(|a| a.net).collect();
        let live = |b: &BlockRecord| b.expires == 0 || b.expires > now;

        let mut adopt: Vec<Change> = Vec::new();
        let mut kernel_allows: Vec<IpNet> = Vec::new();
        let kernel = self.with_gate(|g| -> Result<(), XdpError> {
            let mut in_kernel = HashSet::new();
            for l in g.maps.blocks()? {
                if l.expires_in == Some(0) {
                    // Lapsed in the kernel: the program ignores it already.
                    g.maps.unblock(l.net)?;
                    out.expired += 1;
                    continue;
                }
                in_kernel.insert(l.net);
                let prev = stored.get(&l.net);
                if prev.is_some_and(live) {
                    out.kept += 1;
                    continue;
                }
                // The store lacks it (new, emptied or damaged store) or
                // holds a lapsed record: the kernel is right.
                adopt.push(Change::PutBlock(adopted(l, prev, now)));
            }
            for b in stored.values().filter(|b| live(b)) {
                if in_kernel.contains(&b.net) {
                    continue;
                }
                match g.maps.block(
                    b.net,
                    policy::kernel_reason(&b.reason),
                    kernel_expiry(b.expires, now),
                ) {
                    Ok(()) => out.restored += 1,
                    Err(XdpError::MapFull { .. }) => out.refused_full += 1,
                    Err(e) => return Err(e),
                }
            }
            let allowed: HashSet<IpNet> = g.maps.allows()?.into_iter().map(|l| l.net).collect();
            for a in &allowed {
                if stored_allows.contains(a) {
                    out.kept += 1;
                } else {
                    adopt.push(Change::PutAllow(AllowRecord {
                        net: *a,
                        added: now,
                        comment: Some(ADOPTED.into()),
                    }));
                    kernel_allows.push(*a);
                }
            }
            for a in stored_allows.difference(&allowed) {
                match g.maps.allow(*a) {
                    Ok(()) => out.restored += 1,
                    Err(XdpError::MapFull { .. }) => out.refused_full += 1,
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        if let Some(Err(e)) = kernel {
            return Err(e.into());
        }
        if out.refused_full > 0 {
            self.counters
                .blocks_refused_full
                .fetch_add(out.refused_full as u64, Ordering::Relaxed);
        }

        let mut all_allows: Vec<IpNet> = allows.records.iter().map(|a| a.net).collect();
        all_allows.extend(kernel_allows);
        *self.allows.write().expect("allows lock") = all_allows;
        {
            let mut groups = self.groups.lock().expect("groups lock");
            *groups = policy::Offenders::default();
            let adopted = adopt.iter().filter_map(|c| match c {
                Change::PutBlock(b) => Some(b),
                _ => None,
            });
            for b in stored.values().filter(|b| live(b)).chain(adopted) {
                groups.note(b.net, b.expires);
            }
        }
        out.adopted = adopt.len();
        self.store.record(adopt).await;
        Ok(out)
    }

    /// Takes lapsed blocks out of the kernel, logging each. Their store
    /// records stay until `cache_retention_time` has passed (see
    /// `Store::cleanup`), so a repeat offender's count survives.
    pub async fn sweep(&self) -> Result<usize, VerdictError> {
        let now = now_unix();
        let mut n = 0;
        // Only what lapsed since the last sweep: a list of a million
        // entries that all lapsed is swept once, not every 30 s.
        let since = self.swept.load(Ordering::Relaxed);
        for b in self.store.lapsed_blocks(since, now).await? {
            let in_kernel = match self.with_gate(|g| g.maps.unblock(b.net)) {
                Some(r) => r?,
                None => false,
            };
            // Without a kernel the offence record is what says the verdict
            // was in force, so the lapse is logged once.
            let in_group = self.groups.lock().expect("groups lock").lapse(b.net, now);
            if in_kernel || (in_group && self.with_gate(|_| ()).is_none()) {
                self.counters.unblocks.fetch_add(1, Ordering::Relaxed);
                tracing::info!("UNBLOCK {} reason={} expired", b.net, b.reason);
                n += 1;
            }
        }
        self.groups.lock().expect("groups lock").prune(now);
        self.swept.store(now, Ordering::Relaxed);
        Ok(n)
    }

    /// Drops cache records and lapsed blocks older than the retention time.
    pub async fn cleanup(&self) -> Result<usize, VerdictError> {
        let retention = self.cfg().screen.cache_retention_time;
        Ok(self.store.cleanup(now_unix(), retention).await?)
    }
}
