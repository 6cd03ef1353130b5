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
    xdp::{maps::Listed, Gate, XdpError},
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
        origin: None,
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
        let stored = Stored {
            blocks: blocks.records.into_iter().map(|b| (b.net, b)).collect(),
            allows: allows.records.iter().map(|a| a.net).collect(),
            now,
        };
        let mut found = FromKernel::default();
        let kernel = self.with_gate(|g| {
            agree_blocks(g, &stored, &mut out, &mut found)?;
            agree_allows(g, &stored, &mut out, &mut found)
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
        all_allows.extend(found.allows);
        *self.allows.write().expect("allows lock") = all_allows;
        {
            let mut groups = self.groups.lock().expect("groups lock");
            *groups = policy::Offenders::default();
            let adopted = found.adopt.iter().filter_map(|c| match c {
                Change::PutBlock(b) => Some(b),
                _ => None,
            });
            for b in stored.live().chain(adopted) {
                groups.note(b.net, b.expires);
            }
        }
        out.adopted = found.adopt.len();
        self.store.record(found.adopt).await;
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
                self.counters.unblock(super::Unblock::Expired);
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

/// What the store held at start, as [`Verdicts::reconcile`] compares it
/// with the kernel.
struct Stored {
    /// Block records by network, lapsed ones included.
    blocks: HashMap<IpNet, BlockRecord>,
    /// Allow entries.
    allows: HashSet<IpNet>,
    /// The unix second of the comparison.
    now: u64,
}

impl Stored {
    /// The block records still in force.
    fn live(&self) -> impl Iterator<Item = &BlockRecord> {
        self.blocks
            .values()
            .filter(|b| b.expires == 0 || b.expires > self.now)
    }
}

/// What the kernel holds that the store lacks, to be written into it.
#[derive(Default)]
struct FromKernel {
    /// Store changes adopting kernel entries.
    adopt: Vec<Change>,
    /// Allow entries only the kernel had.
    allows: Vec<IpNet>,
}

/// Block entries: lapsed kernel entries removed, kernel entries the store
/// lacks adopted, store entries the kernel lacks put in.
fn agree_blocks(
    g: &mut Gate,
    stored: &Stored,
    out: &mut Restored,
    found: &mut FromKernel,
) -> Result<(), XdpError> {
    let now = stored.now;
    let mut in_kernel = HashSet::new();
    for l in g.maps.blocks()? {
        if l.expires_in == Some(0) {
            // Lapsed in the kernel: the program ignores it already.
            g.maps.unblock(l.net)?;
            out.expired += 1;
            continue;
        }
        in_kernel.insert(l.net);
        let prev = stored.blocks.get(&l.net);
        if prev.is_some_and(|b| b.expires == 0 || b.expires > now) {
            out.kept += 1;
            continue;
        }
        // The store lacks it (new, emptied or damaged store) or holds a
        // lapsed record: the kernel is right.
        found.adopt.push(Change::PutBlock(adopted(l, prev, now)));
    }
    for b in stored.live().filter(|b| !in_kernel.contains(&b.net)) {
        let reason = policy::kernel_reason(&b.reason);
        match g.maps.block(b.net, reason, kernel_expiry(b.expires, now)) {
            Ok(()) => out.restored += 1,
            Err(XdpError::MapFull { .. }) => out.refused_full += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Allow entries: kernel entries the store lacks adopted, store entries
/// the kernel lacks put in.
fn agree_allows(
    g: &mut Gate,
    stored: &Stored,
    out: &mut Restored,
    found: &mut FromKernel,
) -> Result<(), XdpError> {
    let allowed: HashSet<IpNet> = g.maps.allows()?.into_iter().map(|l| l.net).collect();
    for a in &allowed {
        if stored.allows.contains(a) {
            out.kept += 1;
        } else {
            found.adopt.push(Change::PutAllow(AllowRecord {
                net: *a,
                added: stored.now,
                comment: Some(ADOPTED.into()),
            }));
            found.allows.push(*a);
        }
    }
    for a in stored.allows.difference(&allowed) {
        match g.maps.allow(*a) {
            Ok(()) => out.restored += 1,
            Err(XdpError::MapFull { .. }) => out.refused_full += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
