//! The embedded database: the screening cache and the kernel verdicts.
//!
//! One redb file (config `store.path`) holds
//! - `clients`: the postscreen-style temporary allowlist, one pass expiry
//!   per [`Test`] for each client address;
//! - `blocks` and `allows`: every verdict entry pushed into the kernel maps,
//!   so a restarted daemon (or a rebooted host, which loses pinned maps) can
//!   put them back;
//! - `meta`: the layout numbers of the file and of its tables.
//!
//! # Versioning
//!
//! `meta` holds a layout number for the file, one for the cache table and
//! one for the verdict tables ([`layout`]), checked on open: a layout this
//! build cannot read is refused with [`StoreError::Layout`] rather than
//! half-read, and a file of the first releases (layout 1) is upgraded in
//! place. Adding a test needs no new layout: a client record counts its
//! tests, and one with fewer reads the missing ones as never passed. Each
//! value also starts with a record format byte, so a record that slipped
//! past the layout check is reported as [`StoreError::Corrupt`] instead of
//! being misread.
//!
//! # Blocking
//!
//! redb transactions do disk I/O and may wait for the single writer lock;
//! every async method therefore runs its transaction on tokio's blocking
//! pool and never on a runtime worker.
//!
//! # Durability
//!
//! Verdict changes are committed with fsync: losing one would reopen the
//! gate for a bot after a crash. Cache writes happen once per connection and
//! are only a convenience (a lost pass means one more test), so they are
//! committed without waiting for the disk.
//!
//! # Damage
//!
//! redb panics on a file it cannot make sense of. Every redb call runs
//! under a guard (`guard`) that turns the panic into
//! [`StoreError::Damaged`], which names the file and says what to do
//! ([`REPAIR_HINT`]); opening walks every table once so damage shows at
//! start, not at the first read that meets it. [`salvage`] has
//! `store check` and `store repair`.
//!
//! # Full disk
//!
//! After one I/O error (ENOSPC) redb refuses every later write until the
//! database is reopened, even once space returns. So:
//! - the first failure starts an episode and is logged once, with its
//!   cause; later failures are counted, not logged (`health`);
//! - verdict changes ([`Store::record`]) that cannot be written are queued
//!   (`queue`), the latest per network, and readers see them as stored; a
//!   background task ([`Store::spawn_retry`]) writes them once it can;
//! - the handle is closed and reopened (with backoff) before the next
//!   operation, so writes work again as soon as space returns;
//! - cache reads and writes are skipped meanwhile (a miss only means one
//!   more screening);
//! - the episode ends, logged, when the queue is written.

mod codec;
mod guard;
mod health;
pub mod layout;
mod overlay;
mod queue;
pub mod salvage;

use std::collections::HashMap;
use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::net::IpAddr;
use std::ops::Deref;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use redb::{
    Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};

use codec::DecodeError;

/// What an operator should do about a damaged store file; part of every
/// error that reports one.
pub const REPAIR_HINT: &str = "the pinned XDP gate keeps dropping meanwhile. \
Run `screener store check` to see what is readable and `screener store repair` to rebuild the file \
from its readable records and the pinned verdicts (the damaged file is kept beside it as \
<file>.damaged-<time>), or move the file away to start with an empty store (the pinned verdicts \
are adopted into it)";

/// redb's page cache. Its default (1 GiB) is sized for a database server;
/// the screener's working set is the allow/block tables and the recent
/// cache records.
const CACHE_BYTES: usize = 64 << 20;

/// How often queued verdict changes are retried.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Layout numbers (see [`layout`]); a table's number changes when its
/// meaning or key/value encoding does.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Meta keys of the fleet stream position this node applied last: the
/// two halves of a stream ID.
const CLUSTER_MS: &str = "cluster.position.ms";
const CLUSTER_SEQ: &str = "cluster.position.seq";
const CLIENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("clients");
const BLOCKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blocks");
const ALLOWS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("allows");

/// The current time in unix seconds (0 if the clock is before 1970).
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A screening test with a cached pass expiry; the list of tests lives in
/// the screening module.
pub use crate::screen::TestId as Test;

/// One client's record: one pass expiry per test (unix seconds, 0 = never
/// passed).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClientRecord {
    /// Pass expiry per test, indexed by [`Test::index`].
    pub expires: [u64; Test::COUNT],
    /// When the client was first screened (unix seconds).
    pub first_seen: u64,
    /// When the client last connected (unix seconds).
    pub last_seen: u64,
    /// Pass expiries of tests this build does not know (a later release
    /// wrote the record), in index order after [`Test::COUNT`]: written back
    /// unchanged so that release finds them again.
    #[serde(skip)]
    pub later: Vec<u64>,
}

impl ClientRecord {
    /// Whether `t` has an unexpired pass at `now`.
    pub fn passed(&self, t: Test, now: u64) -> bool {
        self.expires[t.index()] > now
    }

    /// Latest pass expiry over all tests, later releases' included (0 if
    /// none ever passed); cleanup measures retention from this.
    pub fn newest_expiry(&self) -> u64 {
        self.expires
            .iter()
            .chain(&self.later)
            .copied()
            .max()
            .unwrap_or(0)
    }
}

/// A block verdict as stored; one per (normalised) network.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BlockRecord {
    /// The blocked network; host bits are cleared when stored.
    pub net: IpNet,
    /// Why (test name, "manual", import reason...).
    pub reason: String,
    /// Unix seconds when the block lapses; 0 = never.
    pub expires: u64,
    /// Unix seconds when the block was first added.
    pub added: u64,
    /// The import list that owns this entry, if any (see
    /// [`Store::replace_list`]).
    pub list: Option<String>,
    /// How many times this source has been blocked.
    pub offences: u32,
    /// The fleet node that made the verdict, when another node did (see
    /// `[cluster]`); `None` for this node's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// An allow entry: never dropped, skips all tests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AllowRecord {
    /// The allowed network; host bits are cleared when stored.
    pub net: IpNet,
    /// Unix seconds when the entry was added.
    pub added: u64,
    /// Operator's note.
    pub comment: Option<String>,
}

/// A stored record that could not be decoded. Readers that must not stop at
/// one bad record (restoring the kernel at start, listings) skip it and
/// report it with this, so the operator sees which one was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    /// The table holding it.
    pub table: &'static str,
    /// The key, as a network or address when it decodes, else in hex.
    pub key: String,
    /// What was wrong.
    pub detail: String,
}

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "table {}, key {}: {}", self.table, self.key, self.detail)
    }
}

/// Every record of a table that decoded, and the ones that did not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lenient<T> {
    /// The decoded records, in key order.
    pub records: Vec<T>,
    /// The records skipped because they did not decode.
    pub unreadable: Vec<Unreadable>,
}

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Lenient {
            records: Vec::new(),
            unreadable: Vec::new(),
        }
    }
}

/// One change to the verdict tables; [`Store::apply`] writes a batch of
/// them in one transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Store (replace) a block.
    PutBlock(BlockRecord),
    /// Delete the block on this network.
    DelBlock(IpNet),
    /// Store (replace) an allow entry.
    PutAllow(AllowRecord),
    /// Delete the allow entry on this network.
    DelAllow(IpNet),
}

/// A list for [`Store::replace_list`]: its networks and what every entry
/// of it says. One reason and expiry for the whole list keeps a
/// million-entry import from carrying a million copies of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListEntries {
    /// The networks (host bits are cleared, duplicates collapse).
    pub nets: Vec<IpNet>,
    /// The reason of every entry.
    pub reason: String,
    /// Unix seconds when the entries lapse; 0 = never.
    pub expires: u64,
    /// Unix seconds of the import, for entries new to the list.
    pub added: u64,
}

/// What [`Store::replace_list`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListChange {
    /// Entries new to the list.
    pub added: usize,
    /// Former list entries no longer in it (now deleted from the store).
    pub removed: usize,
    /// Entries already in the list; their reason and expiry are refreshed,
    /// their `added` time and offence count kept.
    pub kept: usize,
    /// Entries whose network is already held by a manual block or by another
    /// list (or by a record that does not decode): that record is left as
    /// it is and stays with its owner.
    pub shadowed: usize,
    /// The deleted entries' networks, in order, for removing their kernel
    /// entries.
    pub removed_nets: Vec<IpNet>,
    /// The list's networks as stored now (added and kept), in order, for
    /// pushing into the kernel with the list's reason and expiry.
    pub current: Vec<IpNet>,
}

/// A store failure; every variant names the file, most the operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory for the database could not be created.
    #[error("cannot create directory {} for the store: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// redb refused to open or create the file (not a redb file, damaged,
    /// already open, unreadable).
    #[error("cannot open store {}: {source}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// What redb said.
        source: Box<redb::DatabaseError>,
    },
    /// The file is damaged: redb panicked on it or reported it corrupt.
    #[error("store {} is damaged ({op}: {detail}); {REPAIR_HINT}", path.display())]
    Damaged {
        /// The database file.
        path: PathBuf,
        /// The operation that met the damage.
        op: &'static str,
        /// What redb said or where it panicked.
        detail: String,
    },
    /// The database is closed after an I/O failure and its reopen has not
    /// succeeded yet (the failure was logged when it happened).
    #[error("store {} is unavailable since its writes failed (logged then); reopening it is retried", path.display())]
    Unavailable {
        /// The database file.
        path: PathBuf,
    },
    /// Another process (a running daemon) has the file open.
    #[error("store {} is in use by another process (a running daemon?); stop it first", path.display())]
    InUse {
        /// The database file.
        path: PathBuf,
    },
    /// The file, or a group of its tables, has a layout this build cannot
    /// read (see [`layout`]).
    #[error(
        "store {}: {part} has {}, this build reads layout {expected}; {}",
        path.display(),
        layout::Refusal::found_text(*found),
        layout::Refusal::advice(*found, *expected)
    )]
    Layout {
        /// The database file.
        path: PathBuf,
        /// Which layout: the file's, or a table's (named).
        part: &'static str,
        /// The layout number found; `None` when it is missing.
        found: Option<u64>,
        /// The number this build reads.
        expected: u64,
    },
    /// The file holds tables but no layout number: it is not a screener
    /// store.
    #[error("store {} is a redb file without a screener layout version", path.display())]
    Foreign {
        /// The database file.
        path: PathBuf,
    },
    /// A transaction failed.
    #[error("store {}: {op} failed: {source}", path.display())]
    Db {
        /// The database file.
        path: PathBuf,
        /// The operation, e.g. `put_block`.
        op: &'static str,
        /// What redb said (boxed: redb's error is large and this travels
        /// through every `Result`).
        source: Box<redb::Error>,
    },
    /// A stored key or value could not be decoded.
    #[error("store {}: {op}: bad entry in table {table}: {detail}", path.display())]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// The operation, e.g. `blocks`.
        op: &'static str,
        /// The table holding the entry.
        table: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The blocking task running the transaction panicked or was cancelled.
    #[error("store {}: {op} did not complete: {detail}", path.display())]
    Task {
        /// The database file.
        path: PathBuf,
        /// The operation.
        op: &'static str,
        /// What tokio said.
        detail: String,
    },
}

impl StoreError {
    /// Whether this is the store failing as a whole (I/O, damage, closed
    /// after a failure), as opposed to one bad record or a refusal: what
    /// starts a failure episode.
    pub fn is_failure(&self) -> bool {
        match self {
            StoreError::Db { source, .. } => matches!(
                **source,
                redb::Error::Io(_)
                    | redb::Error::PreviousIo
                    | redb::Error::Corrupted(_)
                    | redb::Error::LockPoisoned(_)
            ),
            StoreError::Damaged { .. }
            | StoreError::Unavailable { .. }
            | StoreError::Task { .. } => true,
            _ => false,
        }
    }

    /// Whether the database handle must be reopened before it works again:
    /// after an I/O error redb refuses every later write, and after a
    /// panic its state is not to be trusted.
    fn needs_reopen(&self) -> bool {
        match self {
            StoreError::Db { source, .. } => matches!(
                **source,
                redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::LockPoisoned(_)
            ),
            StoreError::Damaged { .. } => true,
            _ => false,
        }
    }
}

/// Where a verdict change went (see [`Store::record`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Written to the file.
    Written,
    /// Queued: the store is failing; it is retried in the background.
    Queued,
}

/// The store's state, for `screener stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreHealth {
    /// Whether no failure episode is under way.
    pub writable: bool,
    /// Seconds since the current episode began.
    pub failing_for_secs: Option<u64>,
    /// Verdict changes waiting to be written.
    pub queued: usize,
    /// Verdict changes dropped because the queue was full (their verdicts
    /// are in the kernel; the next start adopts them).
    pub queue_dropped: u64,
    /// Cache reads and writes skipped while failing.
    pub cache_skipped: u64,
    /// Failed operations since start.
    pub failures: u64,
}

/// Handle to the database; cheap to clone, shared by every task.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// The open redb file; redb serialises writers itself. `None` after a
    /// failed reopen. Every operation holds the read lock while it runs,
    /// so a reopen (the write lock) never closes the file under one.
    db: RwLock<Option<Database>>,
    /// Kept to name the file in every error.
    path: PathBuf,
    /// Failure episodes and reopening.
    health: Mutex<health::Health>,
    /// Verdict changes the store could not take yet.
    queue: Mutex<queue::Queue>,
    /// Order of verdict changes, so a queued change never overtakes a
    /// later one to the same network.
    seq: AtomicU64,
}

/// One operation's view: the store and its open database.
struct Session<'a> {
    /// The store, for errors naming the file.
    inner: &'a Inner,
    /// The database, open for the whole operation.
    db: &'a Database,
}

impl Deref for Session<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        self.inner
    }
}

/// Whether an operation writes: a successful write can end a failure
/// episode, a read cannot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn new(db: Database, path: &Path) -> Inner {
        Inner {
            db: RwLock::new(Some(db)),
            path: path.to_path_buf(),
            health: Mutex::new(health::Health::default()),
            queue: Mutex::new(queue::Queue::default()),
            seq: AtomicU64::new(0),
        }
    }

    /// Maps any redb error of operation `op` to [`StoreError::Db`].
    fn err<E: Into<redb::Error>>(&self, op: &'static str) -> impl FnOnce(E) -> StoreError + '_ {
        move |e| StoreError::Db {
            path: self.path.clone(),
            op,
            source: Box::new(e.into()),
        }
    }

    fn corrupt(&self, op: &'static str, table: &'static str, e: DecodeError) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            op,
            table,
            detail: e.0,
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, health::Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, queue::Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the open database (reopening it first when due),
    /// catching a panic inside redb, and keeps the failure episode.
    fn run<T>(
        &self,
        op: &'static str,
        kind: Kind,
        f: impl FnOnce(&Session<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.reopen_if_due();
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let result = match guard.as_ref() {
            None => Err(StoreError::Unavailable {
                path: self.path.clone(),
            }),
            Some(db) => {
                guard::catching(|| f(&Session { inner: self, db })).unwrap_or_else(|detail| {
                    Err(StoreError::Damaged {
                        path: self.path.clone(),
                        op,
                        detail,
                    })
                })
            }
        };
        drop(guard);
        match &result {
            Err(e) if e.is_failure() => {
                let queued = self.queue().len();
                self.health().failed(&self.path, e, queued);
            }
            Ok(_) if kind == Kind::Write => {
                let queued = self.queue().len();
                self.health().wrote(&self.path, 0, queued);
            }
            _ => {}
        }
        result
    }

    /// Closes and reopens the database after an I/O failure (redb refuses
    /// every write after one until then), at most as often as the backoff
    /// allows.
    fn reopen_if_due(&self) {
        if !self.health().reopen_due() {
            return;
        }
        let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
        let old = db.take();
        // Closing writes redb's allocator state; on a failing disk that
        // fails, which is what the repair at the next open is for.
        let _ = guard::catching(move || drop(old));
        match open_db(&self.path) {
            Ok(new) => {
                *db = Some(new);
                drop(db);
                self.health().reopened(&self.path, Ok(()));
            }
            Err(e) => {
                drop(db);
                self.health().reopened(&self.path, Err(&e));
            }
        }
    }
}

impl Session<'_> {
    /// Runs `f` in one write transaction and commits it.
    fn write<T>(
        &self,
        op: &'static str,
        durability: Durability,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut txn = self.db.begin_write().map_err(self.err(op))?;
        txn.set_durability(durability);
        let out = f(&txn)?;
        txn.commit().map_err(self.err(op))?;
        Ok(out)
    }

    fn read_txn(&self, op: &'static str) -> Result<redb::ReadTransaction, StoreError> {
        self.db.begin_read().map_err(self.err(op))
    }

    /// Checks the layout numbers, writing them into a new file and
    /// upgrading a layout-1 file (see [`layout`]); what the upgrade did,
    /// when there was one.
    fn check_layout(&self) -> Result<Option<layout::Upgrade>, StoreError> {
        let op = "open";
        self.write(op, Durability::Immediate, |txn| {
            let other_tables = txn
                .list_tables()
                .map_err(self.err(op))?
                .any(|t| t.name() != META.name());
            let mut meta = txn.open_table(META).map_err(self.err(op))?;
            let found = layout::Found::read(|k| Ok(meta.get(k)?.map(|v| v.value())))
                .map_err(self.err(op))?;
            let mut upgrade = None;
            match found.reading() {
                Ok(layout::Reading::Current) => {}
                Ok(layout::Reading::Unrecorded) if other_tables => {
                    return Err(StoreError::Foreign {
                        path: self.path.clone(),
                    })
                }
                Ok(layout::Reading::Unrecorded) => {
                    layout::write_current(&mut meta).map_err(self.err(op))?;
                }
                Ok(layout::Reading::Legacy) => {
                    let done = layout::upgrade_clients(txn).map_err(|source| StoreError::Db {
                        path: self.path.clone(),
                        op,
                        source,
                    })?;
                    upgrade = Some(done);
                    layout::write_current(&mut meta).map_err(self.err(op))?;
                }
                Err(r) => {
                    return Err(StoreError::Layout {
                        path: self.path.clone(),
                        part: r.part,
                        found: r.found,
                        expected: r.expected,
                    })
                }
            }
            drop(meta);
            // Created up front so read transactions never meet a missing table.
            for def in [CLIENTS, BLOCKS, ALLOWS] {
                txn.open_table(def).map_err(self.err(op))?;
            }
            Ok(upgrade)
        })
    }
}

impl Store {
    /// Opens the database at `path`, creating it (mode 0600) and its
    /// missing parent directories (0700), checks its layout version and
    /// walks every table once, so a damaged file is reported here, naming
    /// it, rather than by a panic at the first read that meets the damage.
    ///
    /// This blocks (it may repair a file left by a crash): call it at
    /// start-up or from `spawn_blocking`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let (store, _) = Store::open_census(path)?;
        Ok(store)
    }

    /// [`Store::open`], also returning what each table holds. Upgrading a
    /// layout-1 file is logged here (once: the file is then layout 2).
    pub fn open_census(path: &Path) -> Result<(Store, salvage::Census), StoreError> {
        let inner = Inner::new(open_db(path)?, path);
        let checked = guard::catching(|| -> Result<salvage::Census, StoreError> {
            let guard = inner.db.read().unwrap_or_else(PoisonError::into_inner);
            let db = guard.as_ref().expect("just opened");
            if let Some(up) = (Session { inner: &inner, db }).check_layout()? {
                log_upgrade(path, up);
            }
            Ok(salvage::census(db, Ok(layout::Reading::Current)))
        });
        let census = checked.map_err(|detail| StoreError::Damaged {
            path: path.to_path_buf(),
            op: "open",
            detail,
        })??;
        if let Some((table, detail)) = census.damage() {
            return Err(StoreError::Damaged {
                path: path.to_path_buf(),
                op: "open",
                detail: format!("table {table}: {detail}"),
            });
        }
        Ok((
            Store {
                inner: Arc::new(inner),
            },
            census,
        ))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The store's state: failing or not, what is queued.
    pub fn health(&self) -> StoreHealth {
        let (queued, queue_dropped) = {
            let q = self.inner.queue();
            (q.len(), q.dropped)
        };
        let h = self.inner.health();
        StoreHealth {
            writable: !h.failing(),
            failing_for_secs: h.failing_for(),
            queued,
            queue_dropped,
            cache_skipped: h.cache_skipped,
            failures: h.failures,
        }
    }

    /// A cache operation's result while the store fails as a whole: the
    /// failure was logged once when it began, and a cache miss only means
    /// one more screening, so the operation counts as skipped.
    fn cache<T: Default>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        match r {
            Err(e) if e.is_failure() => {
                self.inner.health().cache_skipped += 1;
                Ok(T::default())
            }
            other => other,
        }
    }

    /// The cache record of `ip` (v4-mapped IPv6 is looked up as IPv4);
    /// `None` too while the store fails (see FULL DISK).
    pub async fn client(&self, ip: IpAddr) -> Result<Option<ClientRecord>, StoreError> {
        let r = self.client_file(ip).await;
        self.cache(r)
    }

    /// Stores (replaces) the cache record of `ip`; skipped while the store
    /// fails.
    pub async fn put_client(&self, ip: IpAddr, rec: ClientRecord) -> Result<(), StoreError> {
        let r = self.put_client_file(ip, rec).await;
        self.cache(r)
    }

    /// Deletes the cache record of `ip`; whether there was one (false
    /// while the store fails).
    pub async fn delete_client(&self, ip: IpAddr) -> Result<bool, StoreError> {
        let r = self.delete_client_file(ip).await;
        self.cache(r)
    }

    /// The block on exactly `net` (host bits ignored; no covering lookup),
    /// queued changes included.
    pub async fn block(&self, net: IpNet) -> Result<Option<BlockRecord>, StoreError> {
        if let Some(pending) = self.inner.queue().block(net) {
            return Ok(pending.record());
        }
        self.block_file(net).await
    }

    /// Every block, IPv4 first, in network order (expired ones included
    /// until [`Store::cleanup`] removes them), queued changes included.
    pub async fn blocks(&self) -> Result<Vec<BlockRecord>, StoreError> {
        let stored = self.blocks_file().await?;
        Ok(self.inner.queue().blocks_over(stored))
    }

    /// The blocks that lapsed after `after` and by `now` (unix seconds),
    /// queued changes included; records that do not decode are skipped.
    /// The periodic sweep reads only these, not the whole table.
    pub async fn lapsed_blocks(
        &self,
        after: u64,
        now: u64,
    ) -> Result<Vec<BlockRecord>, StoreError> {
        const OP: &str = "lapsed_blocks";
        let within = move |b: &BlockRecord| b.expires > after && b.expires <= now;
        let stored = self
            .blocking(OP, Kind::Read, move |s| {
                let txn = s.read_txn(OP)?;
                let t = txn.open_table(BLOCKS).map_err(s.err(OP))?;
                let mut out = Vec::new();
                for entry in t.iter().map_err(s.err(OP))? {
                    let (k, v) = entry.map_err(s.err(OP))?;
                    let Ok(rec) = codec::decode_net_key(k.value())
                        .and_then(|net| codec::decode_block(net, v.value()))
                    else {
                        continue;
                    };
                    if within(&rec) {
                        out.push(rec);
                    }
                }
                Ok(out)
            })
            .await?;
        let mut out = self.inner.queue().blocks_over(stored);
        out.retain(within);
        Ok(out)
    }

    /// Every block that decodes, and the records that do not (skipped, not
    /// fatal: one damaged record must not hide the others); queued changes
    /// included.
    pub async fn blocks_lenient(&self) -> Result<Lenient<BlockRecord>, StoreError> {
        let mut l = self
            .lenient_file(BLOCKS, "blocks", codec::decode_block)
            .await?;
        l.records = self.inner.queue().blocks_over(l.records);
        Ok(l)
    }

    /// Every allow entry, IPv4 first, in network order, queued changes
    /// included.
    pub async fn allows(&self) -> Result<Vec<AllowRecord>, StoreError> {
        let stored = self.allows_file().await?;
        Ok(self.inner.queue().allows_over(stored))
    }

    /// Every allow entry that decodes, and the records that do not; queued
    /// changes included.
    pub async fn allows_lenient(&self) -> Result<Lenient<AllowRecord>, StoreError> {
        let mut l = self
            .lenient_file(ALLOWS, "allows", codec::decode_allow)
            .await?;
        l.records = self.inner.queue().allows_over(l.records);
        Ok(l)
    }

    /// Records verdict changes: written now, or, while the store fails (or
    /// earlier changes still wait), queued and written by
    /// [`Store::spawn_retry`] once it works again. Never fails: the caller
    /// has already changed the kernel and must not undo that because the
    /// disk is full.
    pub async fn record(&self, changes: Vec<Change>) -> Recorded {
        let first = self
            .inner
            .seq
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        let queue = |changes: Vec<Change>| {
            let mut q = self.inner.queue();
            for (i, c) in changes.into_iter().enumerate() {
                q.push(first + i as u64, c);
            }
            Recorded::Queued
        };
        if !self.inner.queue().is_empty() {
            // Written in order by the retry, after what waits already.
            return queue(changes);
        }
        match self.apply(changes.clone()).await {
            Ok(()) => Recorded::Written,
            Err(_) => queue(changes),
        }
    }

    /// Writes the queued verdict changes in one transaction; how many.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        const OP: &str = "flush";
        let snapshot = self.inner.queue().snapshot();
        let n = snapshot.changes.len();
        if n == 0 {
            return Ok(0);
        }
        let inner = Arc::clone(&self.inner);
        let snapshot = tokio::task::spawn_blocking(move || {
            // Run as a read: whether this write ends the failure episode
            // depends on the queue after it, so `wrote` is called below.
            inner
                .run(OP, Kind::Read, |s| {
                    s.write(OP, Durability::Immediate, |txn| {
                        apply_changes(s, OP, txn, &snapshot.changes)
                    })
                })
                .map(|()| snapshot)
        })
        .await
        .map_err(|e| StoreError::Task {
            path: self.inner.path.clone(),
            op: OP,
            detail: e.to_string(),
        })??;
        let queued = {
            let mut q = self.inner.queue();
            q.written(&snapshot);
            q.len()
        };
        self.inner.health().wrote(&self.inner.path, n, queued);
        Ok(n)
    }

    /// Retries the queued verdict changes in the background, every second
    /// while any wait; the database is reopened on the way when it needs
    /// to be.
    pub fn spawn_retry(&self) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RETRY_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if store.inner.queue().is_empty() {
                    continue;
                }
                // A failure is already logged (once per episode) and
                // counted; the next tick tries again.
                let _ = store.flush().await;
            }
        })
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T, F>(&self, op: &'static str, kind: Kind, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Session<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.run(op, kind, f))
            .await
            .map_err(|e| StoreError::Task {
                path: self.inner.path.clone(),
                op,
                detail: e.to_string(),
            })?
    }

    /// The cache record of `ip` (v4-mapped IPv6 is looked up as IPv4).
    async fn client_file(&self, ip: IpAddr) -> Result<Option<ClientRecord>, StoreError> {
        const OP: &str = "client";
        self.blocking(OP, Kind::Read, move |s| {
            let txn = s.read_txn(OP)?;
            let t = txn.open_table(CLIENTS).map_err(s.err(OP))?;
            let Some(v) = t.get(codec::ip_key(ip).as_slice()).map_err(s.err(OP))? else {
                return Ok(None);
            };
            codec::decode_client(v.value())
                .map(Some)
                .map_err(|e| s.corrupt(OP, "clients", e))
        })
        .await
    }

    /// Stores (replaces) the cache record of `ip`.
    async fn put_client_file(&self, ip: IpAddr, rec: ClientRecord) -> Result<(), StoreError> {
        const OP: &str = "put_client";
        self.blocking(OP, Kind::Write, move |s| {
            s.write(OP, Durability::Eventual, |txn| {
                let mut t = txn.open_table(CLIENTS).map_err(s.err(OP))?;
                t.insert(
                    codec::ip_key(ip).as_slice(),
                    codec::encode_client(&rec).as_slice(),
                )
                .map_err(s.err(OP))?;
                Ok(())
            })
        })
        .await
    }

    /// Deletes the cache record of `ip`; whether there was one.
    async fn delete_client_file(&self, ip: IpAddr) -> Result<bool, StoreError> {
        const OP: &str = "delete_client";
        self.blocking(OP, Kind::Write, move |s| {
            s.write(OP, Durability::Eventual, |txn| {
                let mut t = txn.open_table(CLIENTS).map_err(s.err(OP))?;
                let old = t.remove(codec::ip_key(ip).as_slice()).map_err(s.err(OP))?;
                Ok(old.is_some())
            })
        })
        .await
    }

    /// Every cache record, IPv4 first, in address order.
    pub async fn clients(&self) -> Result<Vec<(IpAddr, ClientRecord)>, StoreError> {
        const OP: &str = "clients";
        self.blocking(OP, Kind::Read, move |s| {
            let txn = s.read_txn(OP)?;
            let t = txn.open_table(CLIENTS).map_err(s.err(OP))?;
            let mut out = Vec::new();
            for entry in t.iter().map_err(s.err(OP))? {
                let (k, v) = entry.map_err(s.err(OP))?;
                let ip =
                    codec::decode_ip_key(k.value()).map_err(|e| s.corrupt(OP, "clients", e))?;
                let rec =
                    codec::decode_client(v.value()).map_err(|e| s.corrupt(OP, "clients", e))?;
                out.push((ip, rec));
            }
            Ok(out)
        })
        .await
    }

    /// Deletes every cache record; how many there were.
    pub async fn purge_clients(&self) -> Result<usize, StoreError> {
        const OP: &str = "purge_clients";
        self.blocking(OP, Kind::Write, move |s| {
            s.write(OP, Durability::Immediate, |txn| {
                let mut t = txn.open_table(CLIENTS).map_err(s.err(OP))?;
                let n = t.len().map_err(s.err(OP))?;
                t.retain(|_, _| false).map_err(s.err(OP))?;
                Ok(usize::try_from(n).unwrap_or(usize::MAX))
            })
        })
        .await
    }

    /// Removes records whose newest expiry is older than now - retention.
    /// Returns how many.
    ///
    /// Covers cache records (newest pass expiry over all tests; postscreen's
    /// `cache_retention_time`, so a returning client is not seen as new) and
    /// block records that lapsed (so offence counts survive the retention
    /// time). Blocks that never expire and allow entries are kept.
    pub async fn cleanup(&self, now: u64, retention: Duration) -> Result<usize, StoreError> {
        const OP: &str = "cleanup";
        let cutoff = now.saturating_sub(retention.as_secs());
        self.blocking(OP, Kind::Write, move |s| {
            s.write(OP, Durability::Immediate, |txn| {
                let mut removed = 0;

                let mut t = txn.open_table(CLIENTS).map_err(s.err(OP))?;
                let mut stale = Vec::new();
                for entry in t.iter().map_err(s.err(OP))? {
                    let (k, v) = entry.map_err(s.err(OP))?;
                    let rec =
                        codec::decode_client(v.value()).map_err(|e| s.corrupt(OP, "clients", e))?;
                    if rec.newest_expiry() < cutoff {
                        stale.push(k.value().to_vec());
                    }
                }
                for k in &stale {
                    t.remove(k.as_slice()).map_err(s.err(OP))?;
                }
                removed += stale.len();
                drop(t);

                let mut t = txn.open_table(BLOCKS).map_err(s.err(OP))?;
                stale.clear();
                for entry in t.iter().map_err(s.err(OP))? {
                    let (k, v) = entry.map_err(s.err(OP))?;
                    let net =
                        codec::decode_net_key(k.value()).map_err(|e| s.corrupt(OP, "blocks", e))?;
                    let rec = codec::decode_block(net, v.value())
                        .map_err(|e| s.corrupt(OP, "blocks", e))?;
                    if rec.expires != 0 && rec.expires < cutoff {
                        stale.push(k.value().to_vec());
                    }
                }
                for k in &stale {
                    t.remove(k.as_slice()).map_err(s.err(OP))?;
                }
                removed += stale.len();
                Ok(removed)
            })
        })
        .await
    }

    /// Stores (replaces) a block, keyed by its normalised network.
    pub async fn put_block(&self, rec: BlockRecord) -> Result<(), StoreError> {
        const OP: &str = "put_block";
        self.blocking(OP, Kind::Write, move |s| {
            s.write(OP, Durability::Immediate, |txn| {
                let mut t = txn.open_table(BLOCKS).map_err(s.err(OP))?;
                t.insert(
                    codec::net_key(rec.net).as_slice(),
                    codec::encode_block(&rec).as_slice(),
                )
                .map_err(s.err(OP))?;
                Ok(())
            })
        })
        .await
    }

    /// The fleet stream position this node applied last (`ms-seq`), kept
    /// so a restart reads on from there; `None` before the first.
    pub async fn cluster_position(&self) -> Result<Option<String>, StoreError> {
        const OP: &str = "cluster_position";
        self.blocking(OP, Kind::Read, move |s| {
            let txn = s.read_txn(OP)?;
            let meta = txn.open_table(META).map_err(s.err(OP))?;
            let ms = meta.get(CLUSTER_MS).map_err(s.err(OP))?.map(|v| v.value());
            let seq = meta.get(CLUSTER_SEQ).map_err(s.err(OP))?.map(|v| v.value());
            Ok(ms.map(|ms| format!("{ms}-{}", seq.unwrap_or(0))))
        })
        .await
    }

    /// Saves the fleet stream position `id` (`ms-seq`).
    pub async fn set_cluster_position(&self, id: &str) -> Result<(), StoreError> {
        const OP: &str = "set_cluster_position";
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        let (Ok(ms), Ok(seq)) = (ms.parse::<u64>(), seq.parse::<u64>()) else {
            return Ok(());
        };
        self.blocking(OP, Kind::Write, move |s| {
            s.write(OP, Durability::Immediate, |txn| {
                let mut meta = txn.open_table(META).map_err(s.err(OP))?;
                meta.insert(CLUSTER_MS, ms).map_err(s.err(OP))?;
                meta.insert(CLUSTER_SEQ, seq).map_err(s.err(OP))?;
                Ok(())
            })
        })
        .await
    }

    /// Deletes the block on `net` (host bits ignored); the deleted record.
    pub async fn del_block(&self, net: IpNet) -> Result<Option<BlockRecord>, StoreError> {
        const OP: &str = "del_block";
        self.blocking(OP, Kind::Write, move |s| {
            s.write(OP, Durability::Immediate, |txn| {
                let mut t = txn.open_table(BLOCKS).map_err(s.err(OP))?;
                let Some(v) = t
                    .remove(codec::net_key(net).as_slice())
                    .map_err(s.err(OP))?
                else {
                    return Ok(None);
                };
                codec::decode_block(net.trunc(), v.value())
                    .map(Some)
                    .map_err(|e| s.corrupt(OP, "blocks", e))
            })
        })
        .await
    }

    /// The block on exactly `net` (host bits ignored; no covering lookup).
    async fn block_file(&self, net: IpNet) -> Result<Option<BlockRecord>, StoreError> {
        const OP: &str = "block";
        self.blocking(OP, Kind::Read, move |s| {
            let txn = s.read_txn(OP)?;
            let t = txn.open_table(BLOCKS).map_err(s.err(OP))?;
            let Some(v) = t.get(codec::net_key(net).as_slice()).map_err(s.err(OP))? else {
                return Ok(None);
            };
            codec::decode_block(net.trunc(), v.value())
                .map(Some)
                .map_err(|e| s.corrupt(OP, "blocks", e))
        })
        .await
    }

    /// Every block, IPv4 first, in network order (expired ones included
    /// until [`Store::cleanup`] removes them).
    async fn blocks_file(&self) -> Result<Vec<BlockRecord>, StoreError> {
        const OP: &str = "blocks";
        self.blocking(OP, Kind::Read, move |s| {
            let txn = s.read_txn(OP)?;
            let t = txn.open_table(BLOCKS).map_err(s.err(OP))?;
            read_blocks(s, OP, &t)
        })
        .await
    }

    /// Atomically replaces every block whose `list == Some(name)` with
    /// `entries` (one write transaction). See [`ListChange`] for what
    /// happens to entries already present and to networks another owner
    /// holds.
    pub async fn replace_list(
        &self,
        name: &str,
        entries: ListEntries,
    ) -> Result<ListChange, StoreError> {
        const OP: &str = "replace_list";
        let name = name.to_owned();
        self.blocking(OP, Kind::Write, move |s| {
            s.write(OP, Durability::Immediate, |txn| {
                let mut t = txn.open_table(BLOCKS).map_err(s.err(OP))?;
                // The list's members now: first-seen time and offences.
                let mut old: HashMap<IpNet, (u64, u32)> = HashMap::new();
                for entry in t.iter().map_err(s.err(OP))? {
                    let (k, v) = entry.map_err(s.err(OP))?;
                    // A record that does not decode belongs to no list we
                    // can tell; a network of the new list it holds counts
                    // as shadowed below.
                    let Ok(rec) = codec::decode_net_key(k.value())
                        .and_then(|net| codec::decode_block(net, v.value()))
                    else {
                        continue;
                    };
                    if rec.list.as_deref() == Some(name.as_str()) {
                        old.insert(rec.net, (rec.added, rec.offences));
                    }
                }
                let ListEntries {
                    mut nets,
                    reason,
                    expires,
                    added,
                } = entries;
                for n in &mut nets {
                    *n = n.trunc();
                }
                // Sorted inserts keep the B-tree writes local.
                nets.sort_unstable();
                nets.dedup();

                let mut change = ListChange::default();
                let mut rec = BlockRecord {
                    net: IpNet::V4(ipnet::Ipv4Net::default()),
                    reason,
                    expires,
                    added,
                    list: Some(name.clone()),
                    origin: None,
                    offences: 1,
                };
                for net in nets {
                    let key = codec::net_key(net);
                    rec.net = net;
                    if let Some((first, offences)) = old.remove(&net) {
                        rec.added = first;
                        rec.offences = offences;
                        change.kept += 1;
                    } else if t.get(key.as_slice()).map_err(s.err(OP))?.is_some() {
                        change.shadowed += 1;
                        continue;
                    } else {
                        rec.added = added;
                        rec.offences = 1;
                        change.added += 1;
                    }
                    t.insert(key.as_slice(), codec::encode_block(&rec).as_slice())
                        .map_err(s.err(OP))?;
                    change.current.push(net);
                }
                for net in old.into_keys() {
                    t.remove(codec::net_key(net).as_slice())
                        .map_err(s.err(OP))?;
                    change.removed_nets.push(net);
                }
                change.removed = change.removed_nets.len();
                change.removed_nets.sort_unstable();
                Ok(change)
            })
        })
        .await
    }

    /// Every record of a net-keyed `table` (`name`) that decodes, and the
    /// records that do not (skipped, not fatal: one damaged record must not
    /// hide the others).
    async fn lenient_file<T: Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static [u8], &'static [u8]>,
        name: &'static str,
        decode: fn(IpNet, &[u8]) -> Result<T, DecodeError>,
    ) -> Result<Lenient<T>, StoreError> {
        self.blocking(name, Kind::Read, move |s| {
            let txn = s.read_txn(name)?;
            let t = txn.open_table(table).map_err(s.err(name))?;
            let mut out = Lenient::default();
            for entry in t.iter().map_err(s.err(name))? {
                let (k, v) = entry.map_err(s.err(name))?;
                match codec::decode_net_key(k.value()).and_then(|net| decode(net, v.value())) {
                    Ok(rec) => out.records.push(rec),
                    Err(e) => out.unreadable.push(unreadable(name, k.value(), e)),
                }
            }
            Ok(out)
        })
        .await
    }

    /// Writes `changes` in one durable transaction, in order.
    pub async fn apply(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        const OP: &str = "apply";
        if changes.is_empty() {
            return Ok(());
        }
        self.blocking(OP, Kind::Write, move |s| {
            s.write(OP, Durability::Immediate, |txn| {
                apply_changes(s, OP, txn, &changes)
            })
        })
        .await
    }

    /// Stores (replaces) an allow entry, keyed by its normalised network.
    pub async fn put_allow(&self, rec: AllowRecord) -> Result<(), StoreError> {
        const OP: &str = "put_allow";
        self.blocking(OP, Kind::Write, move |s| {
            s.write(OP, Durability::Immediate, |txn| {
                let mut t = txn.open_table(ALLOWS).map_err(s.err(OP))?;
                t.insert(
                    codec::net_key(rec.net).as_slice(),
                    codec::encode_allow(&rec).as_slice(),
                )
                .map_err(s.err(OP))?;
                Ok(())
            })
        })
        .await
    }

    /// Deletes the allow entry on `net` (host bits ignored); whether there
    /// was one.
    pub async fn del_allow(&self, net: IpNet) -> Result<bool, StoreError> {
        const OP: &str = "del_allow";
        self.blocking(OP, Kind::Write, move |s| {
            s.write(OP, Durability::Immediate, |txn| {
                let mut t = txn.open_table(ALLOWS).map_err(s.err(OP))?;
                let old = t
                    .remove(codec::net_key(net).as_slice())
                    .map_err(s.err(OP))?;
                Ok(old.is_some())
            })
        })
        .await
    }

    /// Every allow entry, IPv4 first, in network order.
    async fn allows_file(&self) -> Result<Vec<AllowRecord>, StoreError> {
        const OP: &str = "allows";
        self.blocking(OP, Kind::Read, move |s| {
            let txn = s.read_txn(OP)?;
            let t = txn.open_table(ALLOWS).map_err(s.err(OP))?;
            let mut out = Vec::new();
            for entry in t.iter().map_err(s.err(OP))? {
                let (k, v) = entry.map_err(s.err(OP))?;
                let net =
                    codec::decode_net_key(k.value()).map_err(|e| s.corrupt(OP, "allows", e))?;
                out.push(
                    codec::decode_allow(net, v.value()).map_err(|e| s.corrupt(OP, "allows", e))?,
                );
            }
            Ok(out)
        })
        .await
    }
}

/// Says that the file at `path` was upgraded from layout 1.
fn log_upgrade(path: &Path, up: layout::Upgrade) {
    tracing::info!(
        store = %path.display(),
        "store upgraded from layout {} to layout {}: {} cache records rewritten with their count of tests",
        layout::LEGACY_FILE_LAYOUT,
        layout::FILE_LAYOUT,
        up.rewritten
    );
    if up.unreadable > 0 {
        tracing::warn!(
            store = %path.display(),
            "{} cache records of layout {} do not decode and were left as they were;              `screener store repair` drops them",
            up.unreadable,
            layout::LEGACY_FILE_LAYOUT
        );
    }
}

/// Creates the directories above `path` that are missing, mode 0700: the
/// store names every client and verdict.
fn create_parent(path: &Path) -> Result<(), StoreError> {
    let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(|source| StoreError::CreateDir {
            path: parent.to_path_buf(),
            source,
        })
}

/// Opens (creating, mode 0600) the redb file at `path`; a panic inside
/// redb and a file redb calls corrupt become [`StoreError::Damaged`].
fn open_db(path: &Path) -> Result<Database, StoreError> {
    create_parent(path)?;
    let open_err = |source: std::io::Error| StoreError::Open {
        path: path.to_path_buf(),
        source: Box::new(redb::DatabaseError::Storage(redb::StorageError::Io(source))),
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(open_err)?;
    let opened = guard::catching(move || {
        redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create_file(file)
    });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(open_error(path, e)),
        Err(detail) => Err(StoreError::Damaged {
            path: path.to_path_buf(),
            op: "open",
            detail,
        }),
    }
}

/// Sorts redb's refusal to open a file: in use, damaged, or another
/// problem (permissions, I/O).
fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    use redb::{DatabaseError as D, StorageError as S};
    let path = path.to_path_buf();
    match e {
        D::DatabaseAlreadyOpen => StoreError::InUse { path },
        D::Storage(S::Corrupted(detail)) => StoreError::Damaged {
            path,
            op: "open",
            detail,
        },
        // A header that does not parse, a file shorter than its header.
        D::Storage(S::Io(io))
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            StoreError::Damaged {
                path,
                op: "open",
                detail: io.to_string(),
            }
        }
        other => StoreError::Open {
            path,
            source: Box::new(other),
        },
    }
}

/// Opens `path` for reading without taking it from a running daemon: a
/// shared lock, refused while the daemon holds its exclusive one.
fn open_locked(path: &Path, exclusive: bool) -> Result<File, StoreError> {
    use std::os::fd::AsRawFd as _;
    let file = File::open(path).map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source: Box::new(redb::DatabaseError::Storage(redb::StorageError::Io(source))),
    })?;
    let how = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } != 0 {
        return Err(StoreError::InUse {
            path: path.to_path_buf(),
        });
    }
    Ok(file)
}

/// Writes `changes` in order inside `txn`.
fn apply_changes(
    s: &Session<'_>,
    op: &'static str,
    txn: &redb::WriteTransaction,
    changes: &[Change],
) -> Result<(), StoreError> {
    let mut blocks = txn.open_table(BLOCKS).map_err(s.err(op))?;
    let mut allows = txn.open_table(ALLOWS).map_err(s.err(op))?;
    for c in changes {
        match c {
            Change::PutBlock(rec) => blocks
                .insert(
                    codec::net_key(rec.net).as_slice(),
                    codec::encode_block(rec).as_slice(),
                )
                .map(drop),
            Change::DelBlock(net) => blocks.remove(codec::net_key(*net).as_slice()).map(drop),
            Change::PutAllow(rec) => allows
                .insert(
                    codec::net_key(rec.net).as_slice(),
                    codec::encode_allow(rec).as_slice(),
                )
                .map(drop),
            Change::DelAllow(net) => allows.remove(codec::net_key(*net).as_slice()).map(drop),
        }
        .map_err(s.err(op))?;
    }
    Ok(())
}

/// An [`Unreadable`] for the record under key `k` of `table`.
fn unreadable(table: &'static str, k: &[u8], e: DecodeError) -> Unreadable {
    let key = codec::decode_net_key(k)
        .map(|n| n.to_string())
        .or_else(|_| codec::decode_ip_key(k).map(|a| a.to_string()))
        .unwrap_or_else(|_| codec::hex(k));
    Unreadable {
        table,
        key,
        detail: e.0,
    }
}

/// Decodes the whole `blocks` table.
fn read_blocks(
    s: &Session<'_>,
    op: &'static str,
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
) -> Result<Vec<BlockRecord>, StoreError> {
    let mut out = Vec::new();
    for entry in t.iter().map_err(s.err(op))? {
        let (k, v) = entry.map_err(s.err(op))?;
        let net = codec::decode_net_key(k.value()).map_err(|e| s.corrupt(op, "blocks", e))?;
        out.push(codec::decode_block(net, v.value()).map_err(|e| s.corrupt(op, "blocks", e))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
