//! The fleet's verdicts: what this node publishes, and what it applies of
//! the others'.
//!
//! LOCAL POLICY WINS. Another node's block goes through the same
//! protection rule as this node's own: an address this node's access
//! list permits, an allow entry, a DNSWL-allowlisted client or a local
//! network is never blocked here because another node blocked it. Remote
//! blocks carry their origin into the store (`block list` shows it), so a
//! resynchronisation after a gap lifts exactly the remote blocks the
//! fleet no longer holds and never one of this node's own.
//!
//! OFFENCES ACROSS THE FLEET. A remote block lands in this node's store
//! with its offence count raised, and in the escalation counts: a bot
//! blocked at mx1 that fails again at mx2 gets the doubled TTL there, and
//! five hosts of one /24 blocked anywhere in the fleet escalate
//! everywhere.

use std::{collections::HashSet, sync::atomic::Ordering};

use ipnet::IpNet;

use super::{apply::kernel_expiry, policy, Verdicts};
use crate::{
    cluster::{Cluster, Event, Op},
    store::{now_unix, BlockRecord},
};

impl Verdicts {
    /// Publishes this node's verdicts to `cluster` from now on.
    pub fn set_cluster(&self, cluster: Cluster) {
        let _ = self.cluster.set(cluster);
    }

    /// The fleet, when this node is in one.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.get()
    }

    /// Tells the fleet this node blocked `rec.net`.
    pub(super) fn publish_block(&self, rec: &BlockRecord) {
        if let Some(c) = self.cluster.get() {
            c.publish(Event {
                net: rec.net.trunc(),
                op: Op::Block {
                    reason: rec.reason.clone(),
                    expires: rec.expires,
                },
                node: c.node().to_owned(),
            });
        }
    }

    /// Tells the fleet this node lifted the block on `net`.
    pub(super) fn publish_unblock(&self, net: IpNet) {
        if let Some(c) = self.cluster.get() {
            c.publish(Event {
                net: net.trunc(),
                op: Op::Unblock,
                node: c.node().to_owned(),
            });
        }
    }

    /// Applies other nodes' verdicts, oldest first.
    pub async fn apply_fleet(&self, events: Vec<Event>) {
        for ev in events {
            match ev.op {
                Op::Block { reason, expires } => {
                    self.apply_fleet_block(ev.net, reason, expires, ev.node)
                        .await;
                }
                Op::Unblock => self.apply_fleet_unblock(ev.net, &ev.node).await,
            }
        }
    }

    /// Makes the remote blocks here the fleet's `blocks`: applies each,
    /// and lifts the remote blocks the fleet no longer holds (their
    /// unblocks were trimmed from the stream before this node read them).
    pub async fn apply_fleet_snapshot(&self, blocks: Vec<Event>, own_node: &str) {
        let mut held = HashSet::new();
        for ev in blocks {
            if ev.node == own_node {
                continue;
            }
            held.insert(ev.net);
            if let Op::Block { reason, expires } = ev.op {
                self.apply_fleet_block(ev.net, reason, expires, ev.node)
                    .await;
            }
        }
        let stale: Vec<(IpNet, String)> = match self.store.blocks().await {
            Ok(all) => all
                .into_iter()
                .filter(|b| !held.contains(&b.net))
                .filter_map(|b| b.origin.map(|o| (b.net, o)))
                .collect(),
            Err(e) => {
                tracing::warn!("cluster: cannot list the stored blocks to resynchronise: {e}");
                return;
            }
        };
        for (net, origin) in stale {
            self.apply_fleet_unblock(net, &origin).await;
        }
    }

    async fn apply_fleet_block(&self, net: IpNet, reason: String, expires: u64, node: String) {
        let now = now_unix();
        if expires != 0 && expires <= now {
            return;
        }
        if let Some(why) = self.protection(&net) {
            self.counters
                .fleet_skipped_protected
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!("not applying {node}'s block on {net}: {why}");
            return;
        }
        let prev = self.stored_block(net.trunc()).await;
        if let Some(p) = &prev {
            // A block in force that outlasts the remote one stays as it is
            // (this node's own, or the same verdict arriving twice).
            let outlasts = p.expires == 0 || (expires != 0 && p.expires >= expires);
            if outlasts && (p.expires == 0 || p.expires > now) {
                return;
            }
        }
        let rec = BlockRecord {
            net: net.trunc(),
            reason: reason.clone(),
            expires,
            added: prev.as_ref().map_or(now, |p| p.added),
            list: None,
            offences: prev.as_ref().map_or(1, |p| p.offences.saturating_add(1)),
            origin: Some(node.clone()),
        };
        let kernel = policy::kernel_reason(&reason);
        let left = kernel_expiry(expires, now);
        if let Some(Err(e)) = self.with_gate(|g| g.maps.block(net, kernel, left)) {
            self.counters.refused_if_full(&e);
            tracing::warn!("BLOCK {net} from {node} failed: {e}");
            return;
        }
        self.store
            .record(vec![crate::store::Change::PutBlock(rec)])
            .await;
        // The fleet's offences count toward this node's /24 (/48)
        // escalation too.
        self.groups
            .lock()
            .expect("groups lock")
            .note(net.trunc(), if expires == 0 { u64::MAX } else { expires });
        self.counters.fleet_applied.fetch_add(1, Ordering::Relaxed);
        tracing::info!("BLOCK {net} reason={reason} origin={node}");
    }

    async fn apply_fleet_unblock(&self, net: IpNet, node: &str) {
        let net = net.trunc();
        let held = match self.store.block(net).await {
            Ok(b) => b.is_some(),
            Err(_) => self.in_kernel(net).unwrap_or(false),
        };
        if !held {
            return;
        }
        if let Some(Err(e)) = self.with_gate(|g| g.maps.unblock(net)) {
            tracing::warn!("UNBLOCK {net} from {node} failed: {e}");
            return;
        }
        self.store
            .record(vec![crate::store::Change::DelBlock(net)])
            .await;
        self.groups.lock().expect("groups lock").forget(net);
        self.counters.fleet_applied.fetch_add(1, Ordering::Relaxed);
        tracing::info!("UNBLOCK {net} reason=fleet origin={node}");
    }
}
