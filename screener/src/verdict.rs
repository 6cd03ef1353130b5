//! Verdicts: the one place that writes blocks and allows, keeping the store
//! and the kernel maps in step.
//!
//! Every change goes kernel first, then store. A store write that fails
//! never undoes the kernel change: a full or failing disk must not open the
//! gate for a bot. The store queues the change and writes it once it works
//! again (see FULL DISK in the store), and a restart adopts whatever the
//! kernel holds that the store lacks (see RESTORING).
//!
//! POLICY for screening failures:
//! - Only outcomes in `verdict.block_on` block.
//! - An IPv6 client is blocked by its `verdict.ipv6_prefix` prefix: hosts
//!   with privacy addresses rotate inside it.
//! - A repeat offender's TTL doubles per offence, up to
//!   `verdict.block_ttl_max`.
//! - When `escalate_v4_hosts` hosts of one IPv4 /24 (or
//!   `escalate_v6_hosts` prefixes of one IPv6 /48) are blocked, the /24
//!   (/48) is blocked instead.
//!
//! ESCALATION counts offences, not map entries: a host whose block the
//! kernel refused (its host map is full) offended all the same, and once
//! the host map is full escalating into the prefix map is the only way
//! left to stop the bots of that /24 (/48). Each offence counts until the
//! block it earned would lapse.
//! - Nothing the access list permits, an allow entry covers, or a DNSWL
//!   allowlisted is ever blocked, nor any prefix containing one of them.
//!
//! RESTORING. At start the kernel and the store are made to agree without
//! ever taking a verdict out of the kernel because the store lacks it: the
//! store may be new, emptied or partly unreadable, and the pinned maps are
//! then the only record of what is blocked. So: store entries missing from
//! the kernel (after a reboot, all of them) are put in; pinned entries the
//! store does not hold are adopted into it with the kernel's reason and
//! remaining lifetime; records that do not decode are skipped and named.
//! Kernel entries leave only by an operator's unblock or by expiry.
//!
//! MAP FULL. A full map refuses the new entry: the refusal is logged,
//! counted (`blocks_refused_full`), and the client is still rejected at the
//! SMTP level. Entries already in the kernel are never evicted to make
//! room: they are an operator's, a list's, or a verdict still in force,
//! and silently dropping one would reopen the gate for it. Raise
//! `xdp.max_hosts` / `xdp.max_prefixes` instead.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use ipnet::IpNet;
use screener_common::Reason;
use serde::Serialize;

use crate::{
    config::{AccessAction, BlockOn, Config},
    duration,
    store::{now_unix, salvage, AllowRecord, BlockRecord, Change, ListEntries, Store, Unreadable},
    xdp::{
        maps::{boot_now, Listed},
        Gate, XdpError,
    },
};

/// Daemon-side counters of verdicts.
#[derive(Default)]
pub struct Counters {
    pub blocks: AtomicU64,
    pub unblocks: AtomicU64,
    pub blocks_refused_full: AtomicU64,
    pub blocks_skipped_protected: AtomicU64,
    pub escalations: AtomicU64,
}

#[derive(Serialize)]
pub struct CountersSnapshot {
    pub blocks: u64,
    pub unblocks: u64,
    pub blocks_refused_full: u64,
    pub blocks_skipped_protected: u64,
    pub escalations: u64,
}

impl Counters {
    fn snapshot(&self) -> CountersSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CountersSnapshot {
            blocks: g(&self.blocks),
            unblocks: g(&self.unblocks),
            blocks_refused_full: g(&self.blocks_refused_full),
            blocks_skipped_protected: g(&self.blocks_skipped_protected),
            escalations: g(&self.escalations),
        }
    }
}

/// A verdict change that failed.
#[derive(Debug, thiserror::Error)]
pub enum VerdictError {
    #[error(transparent)]
    Kernel(#[from] XdpError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Refused(String),
}

/// The verdict keeper shared by the admin socket and the SMTP server.
pub struct Verdicts {
    cfg: RwLock<Arc<Config>>,
    store: Store,
    /// `None` with `--no-xdp` or after `xdp detach`: the store still
    /// records verdicts, and they reach the kernel at the next start.
    gate: Mutex<Option<Gate>>,
    /// Offenders per escalation prefix (/24, /48): see ESCALATION.
    groups: Mutex<Offenders>,
    /// Unix second up to which lapsed blocks have been swept.
    swept: AtomicU64,
    /// Clients a DNSWL allowlisted since start.
    dnswl: Mutex<HashSet<IpAddr>>,
    /// The allow entries, as the store holds them: consulted on every
    /// verdict, so kept here instead of read from disk each time.
    allows: RwLock<Vec<IpNet>>,
    pub counters: Counters,
}

/// Offences per escalation prefix (/24, /48), each until the time its
/// block would lapse (unix seconds, 0 never): see ESCALATION.
#[derive(Debug, Default)]
struct Offenders(HashMap<IpNet, HashMap<IpNet, u64>>);

impl Offenders {
    /// Counts an offence of `net` in its group until `until` (a later
    /// offence of the same net extends it).
    fn note(&mut self, net: IpNet, until: u64) {
        let Some(group) = group_of(net) else {
            return;
        };
        let e = self.0.entry(group).or_default().entry(net).or_insert(until);
        if *e != 0 && (until == 0 || until > *e) {
            *e = until;
        }
    }

    /// Nets of `group` with an offence in force at `now`.
    fn count(&self, group: IpNet, now: u64) -> usize {
        self.0
            .get(&group)
            .map_or(0, |m| m.values().filter(|u| **u == 0 || **u > now).count())
    }

    /// Forgets `net` (an operator unblocked it).
    fn forget(&mut self, net: IpNet) {
        if let Some(group) = group_of(net) {
            if let Some(m) = self.0.get_mut(&group) {
                m.remove(&net);
                if m.is_empty() {
                    self.0.remove(&group);
                }
            }
        }
    }

    /// Forgets `net` if its offence has lapsed at `now`; whether it did.
    fn lapse(&mut self, net: IpNet, now: u64) -> bool {
        let Some(group) = group_of(net) else {
            return false;
        };
        let Some(m) = self.0.get_mut(&group) else {
            return false;
        };
        if !m.get(&net).is_some_and(|u| *u != 0 && *u <= now) {
            return false;
        }
        m.remove(&net);
        if m.is_empty() {
            self.0.remove(&group);
        }
        true
    }

    /// Forgets every offence that lapsed at `now`.
    fn prune(&mut self, now: u64) {
        self.0.retain(|_, m| {
            m.retain(|_, u| *u == 0 || *u > now);
            !m.is_empty()
        });
    }
}

/// Kernel entries an import pushes per hold of the gate's lock: a few
/// milliseconds of syscalls, the longest a verdict on a bot waits.
const KERNEL_BATCH: usize = 1024;

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

/// The TTL of the `offence`-th block (1-based): doubling, capped.
pub fn ttl_for(offence: u32, base: Duration, max: Duration) -> Duration {
    let factor = 1u32 << offence.saturating_sub(1).min(20);
    base.saturating_mul(factor).min(max)
}

/// The net a verdict on `ip` covers.
pub fn verdict_net(ip: IpAddr, ipv6_prefix: u8) -> IpNet {
    match ip {
        IpAddr::V4(a) => IpNet::from(IpAddr::V4(a)),
        IpAddr::V6(a) => ipnet::Ipv6Net::new(a, ipv6_prefix)
            .expect("prefix checked at start-up")
            .trunc()
            .into(),
    }
}

/// The escalation prefix a blocked net counts towards.
pub fn group_of(net: IpNet) -> Option<IpNet> {
    match net {
        IpNet::V4(n) if n.prefix_len() > 24 => Some(
            ipnet::Ipv4Net::new(n.addr(), 24)
                .expect("24 is valid")
                .trunc()
                .into(),
        ),
        IpNet::V6(n) if n.prefix_len() > 48 => Some(
            ipnet::Ipv6Net::new(n.addr(), 48)
                .expect("48 is valid")
                .trunc()
                .into(),
        ),
        _ => None,
    }
}

/// Whether two nets overlap (one contains the other).
fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// A kernel reason from a stored reason text.
pub fn kernel_reason(text: &str) -> Reason {
    Reason::ALL
        .into_iter()
        .find(|r| r.name() == text)
        .unwrap_or(Reason::Manual)
}

fn block_on_reason(o: BlockOn) -> Reason {
    o.reason()
}

/// The kernel `expires` for a store expiry in unix seconds.
fn kernel_expiry(expires_unix: u64, now_unix: u64) -> u32 {
    if expires_unix == 0 {
        return 0;
    }
    let left = u32::try_from(expires_unix.saturating_sub(now_unix)).unwrap_or(u32::MAX);
    boot_now().saturating_add(left.max(1))
}

impl Verdicts {
    pub fn new(cfg: Arc<Config>, store: Store, gate: Option<Gate>) -> Verdicts {
        Verdicts {
            cfg: RwLock::new(cfg),
            store,
            gate: Mutex::new(gate),
            groups: Mutex::new(Offenders::default()),
            swept: AtomicU64::new(0),
            dnswl: Mutex::new(HashSet::new()),
            allows: RwLock::new(Vec::new()),
            counters: Counters::default(),
        }
    }

    pub fn cfg(&self) -> Arc<Config> {
        self.cfg.read().expect("config lock").clone()
    }

    pub fn set_cfg(&self, cfg: Arc<Config>) {
        *self.cfg.write().expect("config lock") = cfg;
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn counters(&self) -> CountersSnapshot {
        self.counters.snapshot()
    }

    /// Runs `f` on the gate, if loaded.
    pub fn with_gate<T>(&self, f: impl FnOnce(&mut Gate) -> T) -> Option<T> {
        self.gate.lock().expect("gate lock").as_mut().map(f)
    }

    /// Puts a newly loaded gate in place of the current one (a reload
    /// changed the interfaces, mode or log level).
    pub fn replace_gate(&self, gate: Gate) {
        *self.gate.lock().expect("gate lock") = Some(gate);
    }

    /// Drops the gate handle (for `xdp detach`).
    pub fn take_gate(&self) -> Option<Gate> {
        self.gate.lock().expect("gate lock").take()
    }

    /// The allow entries in force.
    pub fn allowed(&self) -> Vec<IpNet> {
        self.allows.read().expect("allows lock").clone()
    }

    /// Records that a DNSWL allowlisted `ip`: it and any prefix holding it
    /// are never blocked.
    pub fn note_dnswl(&self, ip: IpAddr) {
        self.dnswl.lock().expect("dnswl lock").insert(ip);
    }

    /// Counts an offence of `net` towards escalating its /24 (/48).
    fn note_offence(&self, net: IpNet, until: u64) {
        self.groups.lock().expect("groups lock").note(net, until);
    }

    /// Why `net` must not be blocked, if it must not.
    fn protection(&self, net: &IpNet) -> Option<String> {
        let cfg = self.cfg();
        if let Some(why) = crate::local::protects(&cfg, net) {
            return Some(why);
        }
        for rule in &cfg.screen.access_list {
            if rule.action == AccessAction::Permit && overlaps(&rule.net, net) {
                return Some(format!("access list permits {}", rule.net));
            }
        }
        if let Some(a) = self
            .allows
            .read()
            .expect("allows lock")
            .iter()
            .find(|a| overlaps(a, net))
        {
            return Some(format!("allow entry {a}"));
        }
        if let Some(ip) = self
            .dnswl
            .lock()
            .expect("dnswl lock")
            .iter()
            .find(|ip| net.contains(*ip))
        {
            return Some(format!("DNSWL allowlisted {ip}"));
        }
        None
    }

    /// Puts `rec` into the kernel (when loaded) and the store.
    async fn apply_block(&self, rec: BlockRecord) -> Result<(), VerdictError> {
        let reason = kernel_reason(&rec.reason);
        let expires = kernel_expiry(rec.expires, now_unix());
        let net = rec.net;
        if let Some(Err(e)) = self.with_gate(|g| g.maps.block(net, reason, expires)) {
            if matches!(e, XdpError::MapFull { .. }) {
                self.counters
                    .blocks_refused_full
                    .fetch_add(1, Ordering::Relaxed);
            }
            return Err(e.into());
        }
        // Never undone when the store cannot take it: the change waits in
        // the store's queue.
        self.store.record(vec![Change::PutBlock(rec)]).await;
        Ok(())
    }

    /// The stored block on exactly `net`, for offence counts and first-seen
    /// times. A store that cannot be read (its failure is logged once by
    /// the store) must not stop a verdict: it counts as a first offence.
    async fn stored_block(&self, net: IpNet) -> Option<BlockRecord> {
        match self.store.block(net).await {
            Ok(rec) => rec,
            Err(e) => {
                tracing::debug!("reading the block on {net}: {e}");
                None
            }
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
        let label = reason.unwrap_or("manual").to_owned();
        let mut done: Vec<IpNet> = Vec::new();
        for net in nets {
            let prev = self.stored_block(*net).await;
            let rec = BlockRecord {
                net: net.trunc(),
                reason: label.clone(),
                expires: now + ttl.as_secs().max(1),
                added: prev.as_ref().map_or(now, |p| p.added),
                list: None,
                offences: prev.map_or(1, |p| p.offences + 1),
            };
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
            self.note_offence(net.trunc(), until);
            self.counters.blocks.fetch_add(1, Ordering::Relaxed);
            tracing::info!("BLOCK {net} reason={label} ttl={}", duration::Display(ttl));
        }
        Ok(())
    }

    async fn remove_block(&self, net: IpNet) -> Result<(), VerdictError> {
        let net = net.trunc();
        if let Some(r) = self.with_gate(|g| g.maps.unblock(net)) {
            r?;
        }
        self.store.record(vec![Change::DelBlock(net)]).await;
        self.groups.lock().expect("groups lock").forget(net);
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
            self.counters.unblocks.fetch_add(1, Ordering::Relaxed);
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
        let net = verdict_net(ip, cfg.verdict.ipv6_prefix);
        // A block the kernel refused (a full host map) is still an offence
        // in its /24 (/48): escalating is how a full map keeps up.
        if let Err(e) = self.block_verdict(net, block_on_reason(outcome)).await {
            tracing::warn!("BLOCK {net} failed: {e}");
        }
        if let Err(e) = self.escalate(net).await {
            tracing::warn!("escalating {net}: {e}");
        }
    }

    async fn block_verdict(&self, net: IpNet, reason: Reason) -> Result<(), VerdictError> {
        if let Some(why) = self.protection(&net) {
            self.counters
                .blocks_skipped_protected
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!("not blocking {net}: {why}");
            return Ok(());
        }
        let cfg = self.cfg();
        let now = now_unix();
        let prev = self.stored_block(net).await;
        if let Some(p) = prev
            .as_ref()
            .filter(|p| p.list.is_some() && (p.expires == 0 || p.expires > now))
        {
            // An imported list already holds it; leave it with its owner.
            self.note_offence(net, p.expires);
            return Ok(());
        }
        let offences = prev.as_ref().map_or(1, |p| p.offences + 1);
        let ttl = ttl_for(offences, cfg.verdict.block_ttl, cfg.verdict.block_ttl_max);
        self.note_offence(net, now + ttl.as_secs());
        let rec = BlockRecord {
            net,
            reason: reason.name().to_owned(),
            expires: now + ttl.as_secs(),
            added: prev.as_ref().map_or(now, |p| p.added),
            list: None,
            offences,
        };
        self.apply_block(rec).await?;
        self.counters.blocks.fetch_add(1, Ordering::Relaxed);
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
        let Some(group) = group_of(net) else {
            return Ok(());
        };
        let k = match group {
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
        if k == 0 || count < k as usize || held {
            return Ok(());
        }
        if let Some(why) = self.protection(&group) {
            tracing::info!("not escalating to {group}: {why}");
            return Ok(());
        }
        let now = now_unix();
        let ttl = cfg.verdict.block_ttl_max;
        self.apply_block(BlockRecord {
            net: group,
            reason: Reason::Escalation.name().to_owned(),
            expires: now + ttl.as_secs(),
            added: now,
            list: None,
            offences: 1,
        })
        .await?;
        self.counters.escalations.fetch_add(1, Ordering::Relaxed);
        self.counters.blocks.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            "BLOCK {group} reason=escalation ttl={} hosts={count}",
            duration::Display(ttl)
        );
        Ok(())
    }

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
                    kernel_reason(&b.reason),
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
            *groups = Offenders::default();
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

    /// Whether the kernel holds a block entry on exactly `net` (for when the
    /// store cannot be read; this walks the maps).
    fn in_kernel(&self, net: IpNet) -> Result<bool, VerdictError> {
        let net = net.trunc();
        match self.with_gate(|g| g.maps.blocks()) {
            Some(listed) => Ok(listed?.iter().any(|l| l.net == net)),
            None => Ok(false),
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

    /// Replaces the import list `name` with `nets`, kernel and store.
    ///
    /// The kernel part runs on the blocking pool in batches, taking the
    /// gate's lock once per batch: a million-entry list must not stall the
    /// runtime's workers, nor the verdicts on bots arriving meanwhile.
    pub async fn import(
        self: &Arc<Self>,
        name: &str,
        nets: Vec<IpNet>,
        ttl: Option<Duration>,
    ) -> Result<crate::store::ListChange, VerdictError> {
        let now = now_unix();
        let expires = ttl.map_or(0, |t| now + t.as_secs().max(1));
        // Verdicts queued while the store failed go first, so the list is
        // judged against what the store really holds; a store that still
        // fails refuses the import.
        self.store.flush().await?;
        let mut change = self
            .store
            .replace_list(
                name,
                ListEntries {
                    nets,
                    reason: Reason::Import.name().to_owned(),
                    expires,
                    added: now,
                },
            )
            .await?;
        let removed = std::mem::take(&mut change.removed_nets);
        let current = std::mem::take(&mut change.current);
        let v = Arc::clone(self);
        let list = name.to_owned();
        let pushed = tokio::task::spawn_blocking(move || {
            let r = v.push_list(&list, &removed, &current, kernel_expiry(expires, now));
            drop((removed, current));
            crate::daemon::give_back_memory();
            r
        })
        .await
        .map_err(|e| VerdictError::Refused(format!("importing {name}: {e}")))?;
        if let Err(e) = pushed {
            if matches!(e, XdpError::MapFull { .. }) {
                self.counters
                    .blocks_refused_full
                    .fetch_add(1, Ordering::Relaxed);
            }
            // The store holds the list; the kernel gets the rest at the
            // next start once there is room.
            return Err(e.into());
        }
        tracing::info!(
            list = name,
            added = change.added,
            removed = change.removed,
            kept = change.kept,
            shadowed = change.shadowed,
            "imported list"
        );
        Ok(change)
    }

    /// Takes `removed` out of the kernel and puts `current` in, a batch
    /// per hold of the gate's lock. Blocking.
    fn push_list(
        &self,
        list: &str,
        removed: &[IpNet],
        current: &[IpNet],
        expires: u32,
    ) -> Result<(), XdpError> {
        for batch in removed.chunks(KERNEL_BATCH) {
            if let Some(r) =
                self.with_gate(|g| batch.iter().try_for_each(|n| g.maps.unblock(*n).map(drop)))
            {
                r?;
            }
        }
        let total = current.len();
        for (i, batch) in current.chunks(KERNEL_BATCH).enumerate() {
            let pushed = self.with_gate(|g| {
                batch
                    .iter()
                    .try_for_each(|n| g.maps.block(*n, Reason::Import, expires))
            });
            match pushed {
                None => return Ok(()),
                Some(r) => r?,
            }
            let done = (i + 1) * KERNEL_BATCH;
            if done % 25_000 < KERNEL_BATCH && done < total {
                tracing::info!(list, "import: {done} of {total} entries in the kernel");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_doubles_up_to_the_cap() {
        let h = Duration::from_secs(3600);
        let d = Duration::from_secs(86_400);
        assert_eq!(ttl_for(1, h, d), h);
        assert_eq!(ttl_for(2, h, d), 2 * h);
        assert_eq!(ttl_for(5, h, d), 16 * h);
        assert_eq!(ttl_for(6, h, d), d);
        assert_eq!(ttl_for(u32::MAX, h, d), d);
    }

    #[test]
    fn ipv6_verdicts_cover_the_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::7".parse().unwrap();
        assert_eq!(verdict_net(a, 64), verdict_net(b, 64));
        assert_eq!(verdict_net(a, 64).to_string(), "2001:db8:1:2::/64");
        assert_eq!(
            verdict_net("192.0.2.7".parse().unwrap(), 64).to_string(),
            "192.0.2.7/32"
        );
    }

    #[test]
    fn offences_count_until_they_lapse() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let g = n("192.0.2.0/24");
        let mut o = Offenders::default();
        o.note(n("192.0.2.1/32"), 100);
        o.note(n("192.0.2.2/32"), 200);
        o.note(n("192.0.2.2/32"), 150);
        o.note(n("192.0.2.3/32"), 0);
        o.note(n("198.51.100.0/24"), 100);
        assert_eq!(o.count(g, 50), 3);
        assert_eq!(o.count(g, 100), 2);
        assert_eq!(o.count(g, 200), 1, "a later offence keeps the longer lapse");
        assert!(!o.lapse(n("192.0.2.2/32"), 199));
        assert!(o.lapse(n("192.0.2.2/32"), 200));
        o.prune(1_000);
        assert_eq!(o.count(g, 1_000), 1);
        o.forget(n("192.0.2.3/32"));
        assert!(o.0.is_empty());
    }

    #[test]
    fn groups_are_slash_24_and_slash_48() {
        let g = |s: &str| group_of(s.parse().unwrap()).map(|n| n.to_string());
        assert_eq!(g("192.0.2.7/32").as_deref(), Some("192.0.2.0/24"));
        assert_eq!(g("2001:db8:1:2::/64").as_deref(), Some("2001:db8:1::/48"));
        assert_eq!(g("192.0.2.0/24"), None);
    }
}
