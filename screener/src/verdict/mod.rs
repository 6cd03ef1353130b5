//! Verdicts: the one place that writes blocks and allows, keeping the store
//! and the kernel maps in step.
//!
//! One room per idea: [`policy`] decides (who is protected, how long a
//! block lasts, when a /24 (/48) is blocked instead of its hosts) and is
//! pure; [`apply`] carries a decision out, kernel then store, with
//! rollback for an operator's all-or-nothing requests; [`restore`] makes
//! the kernel and the store agree at start and takes lapsed blocks out;
//! [`lists`] replaces an imported list. [`Verdicts`] holds only what those
//! share: the store, the gate, the allow entries, the offences and the
//! counters. The configuration is not a copy held here: it is read from
//! the daemon's one holder each time, so a reload applies to the next
//! verdict.
//!
//! Every change goes kernel first, then store. A store write that fails
//! never undoes the kernel change: a full or failing disk must not open the
//! gate for a bot. The store queues the change and writes it once it works
//! again (see FULL DISK in the store), and a restart adopts whatever the
//! kernel holds that the store lacks (see RESTORING in [`restore`]).

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
};

use ipnet::IpNet;
use screener_common::{Reason, REASONS};
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    config::Config,
    store::Store,
    xdp::{Gate, XdpError},
};

pub mod apply;
pub mod fleet;
pub mod lists;
pub mod policy;
pub mod restore;

pub use policy::{group_of, kernel_reason, ttl_for, verdict_net};
pub use restore::{pinned_verdicts, Restored};

/// Daemon-side counters of verdicts.
#[derive(Default)]
pub struct Counters {
    /// Blocks made (screening, escalation, operator), per kernel reason:
    /// a wave shows as one reason climbing.
    blocks: [AtomicU64; REASONS as usize],
    /// Blocks an operator removed.
    unblocks_operator: AtomicU64,
    /// Blocks removed because they lapsed.
    unblocks_expired: AtomicU64,
    /// Other nodes' blocks and unblocks applied here.
    pub fleet_applied: AtomicU64,
    /// Other nodes' blocks not applied: the net is protected here.
    pub fleet_skipped_protected: AtomicU64,
    /// Blocks a full kernel map refused.
    pub blocks_refused_full: AtomicU64,
    /// Verdicts not made because the net is protected.
    pub blocks_skipped_protected: AtomicU64,
    /// Hosts' verdicts that became a /24 (/48) block.
    pub escalations: AtomicU64,
}

/// [`Counters`] as `stats` shows them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CountersSnapshot {
    /// Every reason's blocks together.
    pub blocks: u64,
    /// Blocks per kernel reason (`manual`, `pregreet`, ..., `escalation`).
    pub blocks_by_reason: BTreeMap<&'static str, u64>,
    /// Other nodes' blocks and unblocks applied here.
    pub fleet_applied: u64,
    /// Other nodes' blocks not applied: the net is protected here.
    pub fleet_skipped_protected: u64,
    /// Every cause's unblocks together.
    pub unblocks: u64,
    /// Unblocks per cause: `operator`, `expired`.
    pub unblocks_by_cause: BTreeMap<&'static str, u64>,
    pub blocks_refused_full: u64,
    pub blocks_skipped_protected: u64,
    pub escalations: u64,
}

/// Why a block was removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unblock {
    /// `screener block del`.
    Operator,
    /// Its TTL ran out.
    Expired,
}

impl Counters {
    /// Counts a block made for `reason`.
    pub fn block(&self, reason: Reason) {
        self.blocks[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a block removed.
    pub fn unblock(&self, why: Unblock) {
        match why {
            Unblock::Operator => &self.unblocks_operator,
            Unblock::Expired => &self.unblocks_expired,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> CountersSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let blocks_by_reason: BTreeMap<&'static str, u64> = Reason::ALL
            .into_iter()
            .map(|r| (r.name(), g(&self.blocks[r as usize])))
            .collect();
        let unblocks_by_cause = BTreeMap::from([
            ("operator", g(&self.unblocks_operator)),
            ("expired", g(&self.unblocks_expired)),
        ]);
        CountersSnapshot {
            blocks: blocks_by_reason.values().sum(),
            blocks_by_reason,
            fleet_applied: g(&self.fleet_applied),
            fleet_skipped_protected: g(&self.fleet_skipped_protected),
            unblocks: unblocks_by_cause.values().sum(),
            unblocks_by_cause,
            blocks_refused_full: g(&self.blocks_refused_full),
            blocks_skipped_protected: g(&self.blocks_skipped_protected),
            escalations: g(&self.escalations),
        }
    }

    /// Counts a refusal when `e` says a map is full.
    fn refused_if_full(&self, e: &XdpError) {
        if matches!(e, XdpError::MapFull { .. }) {
            self.blocks_refused_full.fetch_add(1, Ordering::Relaxed);
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
    /// The configuration in force, from the daemon's one holder.
    cfg: watch::Receiver<Arc<Config>>,
    /// Where verdicts are recorded, to survive a reboot.
    store: Store,
    /// `None` with `--no-xdp` or after `xdp detach`: the store still
    /// records verdicts, and they reach the kernel at the next start.
    gate: Mutex<Option<Gate>>,
    /// Offenders per escalation prefix (/24, /48): see ESCALATION in [`policy`].
    groups: Mutex<policy::Offenders>,
    /// Unix second up to which lapsed blocks have been swept.
    swept: AtomicU64,
    /// Clients a DNSWL allowlisted since start.
    dnswl: Mutex<HashSet<IpAddr>>,
    /// The allow entries, as the store holds them: consulted on every
    /// verdict, so kept here instead of read from disk each time.
    allows: RwLock<Vec<IpNet>>,
    /// The fleet this node publishes its verdicts to, when `[cluster]`
    /// is on; set once, when the daemon starts serving.
    cluster: std::sync::OnceLock<crate::cluster::Cluster>,
    /// What `stats` shows.
    pub counters: Counters,
}

impl Verdicts {
    pub fn new(cfg: watch::Receiver<Arc<Config>>, store: Store, gate: Option<Gate>) -> Verdicts {
        Verdicts {
            cfg,
            store,
            gate: Mutex::new(gate),
            groups: Mutex::new(policy::Offenders::default()),
            swept: AtomicU64::new(0),
            dnswl: Mutex::new(HashSet::new()),
            allows: RwLock::new(Vec::new()),
            cluster: std::sync::OnceLock::new(),
            counters: Counters::default(),
        }
    }

    /// The configuration in force now.
    pub fn cfg(&self) -> Arc<Config> {
        Arc::clone(&self.cfg.borrow())
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

    /// Why `net` must not be blocked, if it must not (see POLICY).
    fn protection(&self, net: &IpNet) -> Option<String> {
        let cfg = self.cfg();
        let local = cfg.screen.permit_local.then(crate::local::current);
        let allows = self.allows.read().expect("allows lock");
        let dnswl = self.dnswl.lock().expect("dnswl lock");
        policy::Protected {
            local: local.as_deref(),
            access_list: &cfg.screen.access_list,
            allows: &allows,
            dnswl: &dnswl,
        }
        .why(net)
    }
}
