//! Verdict changes the store could not take yet (see FULL DISK in the
//! store's docs): the latest change per table and network, in the order
//! the changes were made, until a write succeeds.
//!
//! Readers of the verdict tables see these changes on top of the file, so
//! a block made while the disk was full counts as stored for every
//! decision (offence counts, listings, sweeps).

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;

use super::{AllowRecord, BlockRecord, Change};

/// The most changes held: about 150 bytes each. A change past it is
/// dropped and counted (its verdict is still in the kernel, and the next
/// start adopts it from there).
const MAX: usize = 1 << 18;

/// Which verdict table, and the network: one pending change per key.
type Key = (Table, IpNet);

/// The table a change belongs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Table {
    Blocks,
    Allows,
}

fn key(c: &Change) -> Key {
    match c {
        Change::PutBlock(b) => (Table::Blocks, b.net.trunc()),
        Change::DelBlock(n) => (Table::Blocks, n.trunc()),
        Change::PutAllow(a) => (Table::Allows, a.net.trunc()),
        Change::DelAllow(n) => (Table::Allows, n.trunc()),
    }
}

/// A pending change of one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Pending {
    /// It will be this.
    Put(BlockRecord),
    /// It will be gone.
    Deleted,
}

impl Pending {
    /// The record it will be.
    pub(super) fn record(self) -> Option<BlockRecord> {
        match self {
            Pending::Put(b) => Some(b),
            Pending::Deleted => None,
        }
    }
}

/// Pending changes.
#[derive(Debug, Default)]
pub(super) struct Queue {
    /// The latest change per key, with its sequence number.
    changes: BTreeMap<Key, (u64, Change)>,
    /// Changes dropped because the queue was full.
    pub(super) dropped: u64,
}

/// What [`Queue::snapshot`] took, to be forgotten once written.
pub(super) struct Snapshot {
    /// Sequence number per key at the time of the snapshot.
    seqs: HashMap<Key, u64>,
    /// The changes, oldest first.
    pub(super) changes: Vec<Change>,
}

impl Queue {
    pub(super) fn len(&self) -> usize {
        self.changes.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Queues `c`, made as the `seq`-th change; a later change to the same
    /// key replaces an earlier one. Returns false when it was dropped.
    pub(super) fn push(&mut self, seq: u64, c: Change) -> bool {
        let k = key(&c);
        if let Some((old, _)) = self.changes.get(&k) {
            if *old > seq {
                // A later change to this key is already queued.
                return true;
            }
        } else if self.changes.len() >= MAX {
            self.dropped += 1;
            return false;
        }
        self.changes.insert(k, (seq, c));
        true
    }

    /// The pending change of the block on `net`, if any.
    pub(super) fn block(&self, net: IpNet) -> Option<Pending> {
        match self.changes.get(&(Table::Blocks, net.trunc())) {
            Some((_, Change::PutBlock(b))) => Some(Pending::Put(b.clone())),
            Some(_) => Some(Pending::Deleted),
            None => None,
        }
    }

    /// `stored` (in network order) with the pending block changes applied.
    pub(super) fn blocks_over(&self, stored: Vec<BlockRecord>) -> Vec<BlockRecord> {
        overlay(
            stored,
            self.pending(Table::Blocks),
            |b| b.net,
            |c| match c {
                Change::PutBlock(b) => Some(b.clone()),
                _ => None,
            },
        )
    }

    /// `stored` (in network order) with the pending allow changes applied.
    pub(super) fn allows_over(&self, stored: Vec<AllowRecord>) -> Vec<AllowRecord> {
        overlay(
            stored,
            self.pending(Table::Allows),
            |a| a.net,
            |c| match c {
                Change::PutAllow(a) => Some(a.clone()),
                _ => None,
            },
        )
    }

    fn pending(&self, table: Table) -> impl Iterator<Item = (IpNet, &Change)> {
        self.changes
            .iter()
            .filter(move |((t, _), _)| *t == table)
            .map(|((_, net), (_, c))| (*net, c))
    }

    /// Every pending change, oldest first.
    pub(super) fn snapshot(&self) -> Snapshot {
        let mut all: Vec<(u64, Key, Change)> = self
            .changes
            .iter()
            .map(|(k, (seq, c))| (*seq, *k, c.clone()))
            .collect();
        all.sort_unstable_by_key(|(seq, _, _)| *seq);
        Snapshot {
            seqs: all.iter().map(|(seq, k, _)| (*k, *seq)).collect(),
            changes: all.into_iter().map(|(_, _, c)| c).collect(),
        }
    }

    /// Forgets what `s` took and is now written; a change made since (a
    /// later sequence number) stays.
    pub(super) fn written(&mut self, s: &Snapshot) {
        self.changes
            .retain(|k, (seq, _)| s.seqs.get(k).is_none_or(|taken| *seq > *taken));
    }
}

/// Merges pending changes into records in network order: a pending put
/// replaces or adds, a pending delete removes.
fn overlay<'a, T>(
    stored: Vec<T>,
    pending: impl Iterator<Item = (IpNet, &'a Change)>,
    net: impl Fn(&T) -> IpNet,
    put: impl Fn(&Change) -> Option<T>,
) -> Vec<T> {
    let pending: BTreeMap<IpNet, &Change> = pending.collect();
    if pending.is_empty() {
        return stored;
    }
    let mut out: Vec<T> = stored
        .into_iter()
        .filter(|r| !pending.contains_key(&net(r)))
        .collect();
    out.extend(pending.values().filter_map(|c| put(c)));
    out.sort_by_key(|r| net(r));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(n: &str, reason: &str) -> BlockRecord {
        BlockRecord {
            net: n.parse().unwrap(),
            reason: reason.into(),
            expires: 0,
            added: 1,
            list: None,
            origin: None,
            offences: 1,
        }
    }

    #[test]
    fn the_latest_change_per_network_wins_and_reads_see_it() {
        let mut q = Queue::default();
        q.push(1, Change::PutBlock(block("192.0.2.1/32", "a")));
        q.push(3, Change::PutBlock(block("192.0.2.1/32", "b")));
        // Made earlier, queued later: the later change stays.
        q.push(2, Change::DelBlock("192.0.2.1/32".parse().unwrap()));
        q.push(4, Change::DelBlock("192.0.2.9/32".parse().unwrap()));
        assert_eq!(q.len(), 2);
        assert_eq!(
            q.block("192.0.2.1/32".parse().unwrap()),
            Some(Pending::Put(block("192.0.2.1/32", "b")))
        );
        assert_eq!(
            q.block("192.0.2.9/32".parse().unwrap()),
            Some(Pending::Deleted)
        );
        assert_eq!(q.block("192.0.2.5/32".parse().unwrap()), None);
        let over = q.blocks_over(vec![
            block("192.0.2.1/32", "old"),
            block("192.0.2.2/32", "kept"),
            block("192.0.2.9/32", "deleted"),
        ]);
        assert_eq!(
            over,
            vec![block("192.0.2.1/32", "b"), block("192.0.2.2/32", "kept")]
        );
    }

    #[test]
    fn written_changes_leave_and_newer_ones_stay() {
        let mut q = Queue::default();
        q.push(1, Change::PutBlock(block("192.0.2.1/32", "a")));
        q.push(2, Change::PutBlock(block("192.0.2.2/32", "a")));
        let s = q.snapshot();
        assert_eq!(s.changes.len(), 2);
        q.push(5, Change::PutBlock(block("192.0.2.2/32", "newer")));
        q.written(&s);
        assert_eq!(q.len(), 1);
        assert_eq!(
            q.block("192.0.2.2/32".parse().unwrap()),
            Some(Pending::Put(block("192.0.2.2/32", "newer")))
        );
    }
}
