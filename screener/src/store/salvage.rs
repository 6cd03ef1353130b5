//! Reading a store that may be damaged: the census every open takes,
//! `screener store check` and `screener store repair`.
//!
//! WALKING A DAMAGED TABLE. redb panics on a B-tree page it cannot make
//! sense of, and an iterator that panicked cannot resume. A table is
//! therefore read forward until the end or the damage, then backward from
//! the end until the damage or the last key the forward pass saw: what is
//! lost is what sits in the damaged pages, not everything after them.
//!
//! OPENING A DAMAGED FILE. `check` and `repair` never write the file: they
//! open it through [`Overlay`], which keeps redb's writes in memory. They
//! try, in order: the file as it is (redb's crash repair runs if the file
//! asks for it); a forced full repair (rebuilds redb's allocator state, which
//! gets past a damaged region tracker); no repair at all (reads the tables
//! as they are when the repair itself refuses the file). A file shorter
//! than its header says is padded with zeros so the pages that survived
//! can be read.
//!
//! REPAIR copies every record that decodes into a fresh file, adds the
//! verdicts the pinned maps hold that it lacks (the caller reads them), and
//! puts the fresh file in place, keeping the damaged one beside it as
//! `<file>.damaged-<unix time>`. The new file has this build's layouts: the
//! cache records of a layout-1 file are rewritten in the counted form on the
//! way. It refuses a file of a layout this build cannot read: that is not
//! damage, and another version of screener reads it.

use std::{
    collections::HashSet,
    fmt,
    fs::{File, OpenOptions},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use redb::{Database, Durability, ReadableTable, TableDefinition, TableError};

use super::{
    codec, guard,
    layout::{self, Found, Reading, Refusal},
    now_unix, open_locked,
    overlay::{self, Overlay, Recovery},
    unreadable, AllowRecord, BlockRecord, ClientRecord, StoreError, Unreadable, ALLOWS, BLOCKS,
    CACHE_BYTES, CLIENTS, META,
};

/// A table of records: byte keys, byte values.
type Table = TableDefinition<'static, &'static [u8], &'static [u8]>;

/// The tables holding records, with a decoder that checks one, for a file
/// read as `reading`. The records of a layout this build cannot read are
/// not decoded: judged by another layout, every one would look damaged.
fn tables(reading: Result<Reading, Refusal>) -> [(&'static str, Table, Decode); 3] {
    let clients: Decode = match reading {
        Ok(Reading::Current) => |k, v| client(Reading::Current, k, v).map(drop),
        Ok(Reading::Legacy) => |k, v| client(Reading::Legacy, k, v).map(drop),
        Ok(Reading::Unrecorded) => |k, v| client(Reading::Unrecorded, k, v).map(drop),
        Err(_) => UNDECODED,
    };
    let mut t: [(&'static str, Table, Decode); 3] = [
        ("clients", CLIENTS, clients),
        ("blocks", BLOCKS, decode_block),
        ("allows", ALLOWS, decode_allow),
    ];
    if let Err(r) = reading {
        for (name, _, decode) in &mut t {
            if not_decoded(r, name) {
                *decode = UNDECODED;
            }
        }
    }
    t
}

/// Whether the records of table `name` go undecoded under refusal `r`.
fn not_decoded(r: Refusal, name: &str) -> bool {
    match r.part {
        layout::CLIENTS_PART => name == "clients",
        layout::VERDICTS_PART => name != "clients",
        _ => true,
    }
}

/// Takes any record: see [`tables`].
const UNDECODED: Decode = |_, _| Ok(());

/// Records copied per table, and pinned verdicts added.
type Salvaged = (Vec<(&'static str, u64)>, usize);

/// Checks that one stored key and value decode.
type Decode = fn(&[u8], &[u8]) -> Result<(), codec::DecodeError>;

/// A cache record of a file read as `reading`. Without a recorded layout
/// (a damaged `meta`), the record's own format byte says which form it is.
fn client(reading: Reading, k: &[u8], v: &[u8]) -> Result<ClientRecord, codec::DecodeError> {
    codec::decode_ip_key(k)?;
    match reading {
        Reading::Current => codec::decode_client(v),
        Reading::Legacy => codec::decode_legacy_client(v),
        Reading::Unrecorded => match v.first() {
            Some(&codec::LEGACY_CLIENT_FORMAT) => codec::decode_legacy_client(v),
            _ => codec::decode_client(v),
        },
    }
}

fn decode_block(k: &[u8], v: &[u8]) -> Result<(), codec::DecodeError> {
    codec::decode_block(codec::decode_net_key(k)?, v).map(drop)
}

fn decode_allow(k: &[u8], v: &[u8]) -> Result<(), codec::DecodeError> {
    codec::decode_allow(codec::decode_net_key(k)?, v).map(drop)
}

/// What one table holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableCensus {
    /// The table's name.
    pub name: &'static str,
    /// Records that decode.
    pub readable: u64,
    /// Records that do not decode (named).
    pub unreadable: Vec<Unreadable>,
    /// Damage to the table itself (redb failed or panicked walking it);
    /// the records in the damaged pages are not counted anywhere.
    pub damage: Option<String>,
}

/// What every table of a store holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// One entry per table, in [`TABLES`] order.
    pub tables: Vec<TableCensus>,
}

impl Census {
    /// The first damaged table and its damage.
    pub fn damage(&self) -> Option<(&'static str, &str)> {
        self.tables
            .iter()
            .find_map(|t| t.damage.as_deref().map(|d| (t.name, d)))
    }

    /// Readable records of table `name`.
    pub fn readable(&self, name: &str) -> u64 {
        self.tables
            .iter()
            .find(|t| t.name == name)
            .map_or(0, |t| t.readable)
    }

    /// Every undecodable record.
    pub fn unreadable(&self) -> impl Iterator<Item = &Unreadable> {
        self.tables.iter().flat_map(|t| t.unreadable.iter())
    }
}

impl fmt::Display for Census {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .tables
            .iter()
            .map(|t| format!("{} {}", t.readable, t.name))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// Walks every table of `db`, decoding each record as a file read as
/// `reading` holds it; see WALKING A DAMAGED TABLE.
pub(super) fn census(db: &Database, reading: Result<Reading, Refusal>) -> Census {
    let tables = tables(reading)
        .iter()
        .map(|(name, def, decode)| {
            let mut t = TableCensus {
                name,
                ..TableCensus::default()
            };
            t.damage = walk(db, *def, &mut |k, v| match decode(k, v) {
                Ok(()) => t.readable += 1,
                Err(e) => t.unreadable.push(unreadable(name, k, e)),
            });
            t
        })
        .collect();
    Census { tables }
}

/// Calls `f` on every entry of `def` it can read; returns the damage met,
/// if any.
fn walk(db: &Database, def: Table, f: &mut dyn FnMut(&[u8], &[u8])) -> Option<String> {
    let mut last: Option<Vec<u8>> = None;
    let forward = guard::catching(|| -> Result<(), String> {
        let txn = db.begin_read().map_err(|e| e.to_string())?;
        let t = match txn.open_table(def) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        for entry in t.iter().map_err(|e| e.to_string())? {
            let (k, v) = entry.map_err(|e| e.to_string())?;
            f(k.value(), v.value());
            last = Some(k.value().to_vec());
        }
        Ok(())
    });
    let damage = match forward {
        Ok(Ok(())) => return None,
        Ok(Err(e)) | Err(e) => e,
    };
    // From the other end, up to where the forward pass stopped. Whatever
    // happens here, the damage is already known.
    let _ = guard::catching(|| -> Result<(), String> {
        let txn = db.begin_read().map_err(|e| e.to_string())?;
        let t = txn.open_table(def).map_err(|e| e.to_string())?;
        for entry in t.iter().map_err(|e| e.to_string())?.rev() {
            let (k, v) = entry.map_err(|e| e.to_string())?;
            if last.as_deref().is_some_and(|l| k.value() <= l) {
                break;
            }
            f(k.value(), v.value());
        }
        Ok(())
    });
    Some(damage)
}

/// How a file could be opened for reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opened {
    /// As it is (including redb's ordinary crash repair).
    AsIs,
    /// Only with a forced full repair, in memory.
    ForcedRepair,
    /// Only without redb's repair, reading the tables as they are.
    WithoutRepair,
    /// Not at all; the reason for the last attempt.
    Unreadable(String),
}

/// What `screener store check` found.
#[derive(Clone, Debug)]
pub struct CheckReport {
    /// The database file.
    pub path: PathBuf,
    /// Its length in bytes.
    pub size: u64,
    /// The length its header claims, when longer than the file.
    pub cut_short: Option<u64>,
    /// Why opening it as it is failed, when it did.
    pub open_failure: Option<String>,
    /// How it could be opened.
    pub opened: Opened,
    /// The layout numbers in `meta` (all `None` when it is unreadable).
    pub layouts: Found,
    /// What each table holds (empty when it could not be opened).
    pub census: Census,
}

impl CheckReport {
    /// Whether the file is sound: opened as it is, every table walked to
    /// the end, every record decoded.
    pub fn sound(&self) -> bool {
        self.opened == Opened::AsIs
            && self.cut_short.is_none()
            && self.census.damage().is_none()
            && self.census.unreadable().next().is_none()
    }

    /// Why this build can neither read nor upgrade the file's layouts, if
    /// it cannot.
    pub fn layout_refused(&self) -> Option<Refusal> {
        self.layouts.reading().err()
    }

    /// Whether the file is sound and of a layout this build reads.
    pub fn healthy(&self) -> bool {
        self.sound() && self.layout_refused().is_none()
    }

    /// What is wrong, in a few words (`None` when healthy).
    pub fn problem(&self) -> Option<&'static str> {
        if !self.sound() {
            Some("damaged")
        } else if self.layout_refused().is_some() {
            Some("of a layout this build cannot read")
        } else {
            None
        }
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "store {} ({} bytes)", self.path.display(), self.size)?;
        if let Some(claimed) = self.cut_short {
            writeln!(
                f,
                "damaged: the file is cut short; its header says {claimed} bytes"
            )?;
        }
        if let Some(e) = &self.open_failure {
            writeln!(f, "damaged: it does not open as it is: {e}")?;
        }
        match &self.opened {
            Opened::AsIs => {}
            Opened::ForcedRepair => writeln!(f, "readable after a full repair (in memory)")?,
            Opened::WithoutRepair => {
                writeln!(
                    f,
                    "readable only without redb's repair (its checksums fail)"
                )?;
            }
            Opened::Unreadable(e) => writeln!(f, "unreadable: {e}")?,
        }
        let l = &self.layouts;
        match l.reading() {
            Ok(Reading::Current) => writeln!(
                f,
                "layout {}: table clients layout {}, tables blocks and allows layout {}",
                layout::FILE_LAYOUT,
                layout::CLIENTS_LAYOUT,
                layout::VERDICTS_LAYOUT
            )?,
            Ok(Reading::Legacy) => writeln!(
                f,
                "layout {}: written by an earlier release; the daemon upgrades it to layout {} \
                 in place when it next opens it",
                layout::LEGACY_FILE_LAYOUT,
                layout::FILE_LAYOUT
            )?,
            Ok(Reading::Unrecorded) => writeln!(f, "layout: none recorded")?,
            Err(r) => writeln!(
                f,
                "layout not readable by this build: {} has {}, this build reads layout {}",
                r.part,
                Refusal::found_text(r.found),
                r.expected
            )?,
        }
        let refused = self.layout_refused();
        for t in &self.census.tables {
            write!(f, "table {}: {} records", t.name, t.readable)?;
            if refused.is_some_and(|r| not_decoded(r, t.name)) {
                write!(f, " (not decoded: their layout is not this build's)")?;
            }
            if !t.unreadable.is_empty() {
                write!(f, ", {} unreadable", t.unreadable.len())?;
            }
            match &t.damage {
                Some(d) => writeln!(f, "; damaged, records in the damaged pages are lost: {d}")?,
                None => writeln!(f)?,
            }
            for u in t.unreadable.iter().take(20) {
                writeln!(f, "  unreadable record: {u}")?;
            }
            if t.unreadable.len() > 20 {
                writeln!(f, "  ... and {} more", t.unreadable.len() - 20)?;
            }
        }
        if !self.sound() {
            write!(
                f,
                "DAMAGED: run `screener store repair` (the daemon must be stopped)"
            )
        } else if let Some(r) = self.layout_refused() {
            write!(
                f,
                "NOT READABLE BY THIS BUILD: {}",
                Refusal::advice(r.found, r.expected)
            )
        } else {
            write!(f, "healthy")
        }
    }
}

/// A damaged file opened read-only, with what was learned on the way.
struct ReadOnly {
    /// The database over an [`Overlay`]; `None` when no attempt opened it.
    db: Option<Database>,
    /// What the check found.
    report: CheckReport,
}

/// Opens `path` read-only through [`Overlay`]; see OPENING A DAMAGED FILE.
fn open_read_only(path: &Path, file: &File) -> Result<ReadOnly, StoreError> {
    let io = |source: std::io::Error| StoreError::Open {
        path: path.to_path_buf(),
        source: Box::new(redb::DatabaseError::Storage(redb::StorageError::Io(source))),
    };
    let size = file.metadata().map_err(io)?.len();
    let claimed = overlay::header_len(file);
    let mut report = CheckReport {
        path: path.to_path_buf(),
        size,
        cut_short: claimed.filter(|c| *c > size),
        open_failure: None,
        opened: Opened::Unreadable(String::new()),
        layouts: Found::default(),
        census: Census::default(),
    };
    let len = claimed.unwrap_or(size).max(size);
    let attempts = [
        (Recovery::AsIs, Opened::AsIs),
        (Recovery::Force, Opened::ForcedRepair),
        (Recovery::Skip, Opened::WithoutRepair),
    ];
    let mut db = None;
    for (recovery, how) in attempts {
        let overlay = Overlay::new(file.try_clone().map_err(io)?, len, recovery).map_err(io)?;
        let opened = guard::catching(move || {
            redb::Builder::new()
                .set_cache_size(CACHE_BYTES)
                .create_with_backend(overlay)
        });
        match opened {
            Ok(Ok(d)) => {
                report.opened = how;
                db = Some(d);
                break;
            }
            Ok(Err(e)) => report.opened = Opened::Unreadable(e.to_string()),
            Err(panic) => report.opened = Opened::Unreadable(panic),
        }
        if report.open_failure.is_none() {
            if let Opened::Unreadable(e) = &report.opened {
                report.open_failure = Some(e.clone());
            }
        }
    }
    if let Some(d) = &db {
        report.layouts = guard::catching(|| -> Option<Found> {
            let txn = d.begin_read().ok()?;
            let t = txn.open_table(META).ok()?;
            Found::read(|k| Ok(t.get(k)?.map(|v| v.value()))).ok()
        })
        .ok()
        .flatten()
        .unwrap_or_default();
        report.census = census(d, report.layouts.reading());
    }
    Ok(ReadOnly { db, report })
}

/// `screener store check`: opens `path` read-only (refused while a daemon
/// holds it) and reports what every table holds and what is damaged.
pub fn check(path: &Path) -> Result<CheckReport, StoreError> {
    let file = open_locked(path, false)?;
    Ok(open_read_only(path, &file)?.report)
}

/// Verdicts the pinned maps hold, offered to [`repair`]: each is added
/// when the salvaged store lacks a live record for its network.
#[derive(Clone, Debug, Default)]
pub struct Pinned {
    /// Block entries, as records (reason and expiry from the kernel).
    pub blocks: Vec<BlockRecord>,
    /// Allow entries.
    pub allows: Vec<AllowRecord>,
}

/// What `screener store repair` did.
#[derive(Clone, Debug)]
pub struct RepairReport {
    /// What the check before the repair found.
    pub before: CheckReport,
    /// Where the damaged file went; `None` when it was healthy and left
    /// alone.
    pub kept_as: Option<PathBuf>,
    /// Records copied into the new file, per table.
    pub salvaged: Vec<(&'static str, u64)>,
    /// Pinned verdicts added because the salvage lacked them.
    pub adopted: usize,
}

impl fmt::Display for RepairReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(kept) = &self.kept_as else {
            return write!(
                f,
                "store {} is healthy; nothing to repair",
                self.before.path.display()
            );
        };
        writeln!(f, "{}", self.before)?;
        let parts: Vec<String> = self
            .salvaged
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect();
        writeln!(f, "salvaged: {}", parts.join(", "))?;
        writeln!(
            f,
            "adopted from the pinned maps: {} verdicts the damaged file did not yield",
            self.adopted
        )?;
        writeln!(f, "the damaged file is kept as {}", kept.display())?;
        write!(f, "repaired: {} is a new store", self.before.path.display())
    }
}

/// `screener store repair`; see REPAIR in the module docs. Refused while a
/// daemon holds the file. A healthy file is left alone.
pub fn repair(path: &Path, pinned: &Pinned) -> Result<RepairReport, StoreError> {
    let lock = open_locked(path, true)?;
    let read = open_read_only(path, &lock)?;
    if read.report.healthy() {
        return Ok(RepairReport {
            before: read.report,
            kept_as: None,
            salvaged: Vec::new(),
            adopted: 0,
        });
    }
    let reading = match read.report.layouts.reading() {
        Ok(r) => r,
        Err(r) => {
            return Err(StoreError::Layout {
                path: path.to_path_buf(),
                part: r.part,
                found: r.found,
                expected: r.expected,
            })
        }
    };
    let name = path
        .file_name()
        .map_or_else(|| "store".into(), |n| n.to_string_lossy().into_owned());
    let fresh = path.with_file_name(format!("{name}.repair-{}", std::process::id()));
    let kept = path.with_file_name(format!("{name}.damaged-{}", now_unix()));
    let db_err = |op: &'static str| {
        let path = fresh.clone();
        move |e: redb::Error| StoreError::Db {
            path,
            op,
            source: Box::new(e),
        }
    };
    let result = (|| -> Result<Salvaged, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&fresh)
            .map_err(|source| StoreError::Open {
                path: fresh.clone(),
                source: Box::new(redb::DatabaseError::Storage(redb::StorageError::Io(source))),
            })?;
        let new = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create_file(file)
            .map_err(|e| db_err("repair")(e.into()))?;
        let mut txn = new.begin_write().map_err(|e| db_err("repair")(e.into()))?;
        txn.set_durability(Durability::Immediate);
        let mut salvaged = Vec::new();
        let mut live_blocks: HashSet<Vec<u8>> = HashSet::new();
        let mut allows: HashSet<Vec<u8>> = HashSet::new();
        let now = now_unix();
        {
            let mut meta = txn
                .open_table(META)
                .map_err(|e| db_err("repair")(e.into()))?;
            layout::write_current(&mut meta).map_err(|e| db_err("repair")(e.into()))?;
        }
        for (name, def, decode) in tables(Ok(reading)) {
            let mut t = txn
                .open_table(def)
                .map_err(|e| db_err("repair")(e.into()))?;
            let mut n = 0;
            let mut failed = None;
            if let Some(old) = &read.db {
                walk(old, def, &mut |k, v| {
                    if failed.is_some() || decode(k, v).is_err() {
                        return;
                    }
                    // Cache records are written in this build's form.
                    let recoded = (name == "clients")
                        .then(|| client(reading, k, v).map(|c| codec::encode_client(&c)))
                        .and_then(Result::ok);
                    if let Err(e) = t.insert(k, recoded.as_deref().unwrap_or(v)) {
                        failed = Some(e);
                        return;
                    }
                    n += 1;
                    if name == "blocks" {
                        let live = codec::decode_net_key(k)
                            .and_then(|net| codec::decode_block(net, v))
                            .is_ok_and(|b| b.expires == 0 || b.expires > now);
                        if live {
                            live_blocks.insert(k.to_vec());
                        }
                    } else if name == "allows" {
                        allows.insert(k.to_vec());
                    }
                });
            }
            if let Some(e) = failed {
                return Err(db_err("repair")(e.into()));
            }
            salvaged.push((name, n));
        }
        let mut adopted = 0;
        {
            let mut t = txn
                .open_table(BLOCKS)
                .map_err(|e| db_err("repair")(e.into()))?;
            for b in &pinned.blocks {
                let key = codec::net_key(b.net);
                if live_blocks.contains(&key) {
                    continue;
                }
                t.insert(key.as_slice(), codec::encode_block(b).as_slice())
                    .map_err(|e| db_err("repair")(e.into()))?;
                adopted += 1;
            }
            let mut t = txn
                .open_table(ALLOWS)
                .map_err(|e| db_err("repair")(e.into()))?;
            for a in &pinned.allows {
                let key = codec::net_key(a.net);
                if allows.contains(&key) {
                    continue;
                }
                t.insert(key.as_slice(), codec::encode_allow(a).as_slice())
                    .map_err(|e| db_err("repair")(e.into()))?;
                adopted += 1;
            }
        }
        txn.commit().map_err(|e| db_err("repair")(e.into()))?;
        drop(new);
        Ok((salvaged, adopted))
    })();
    let (salvaged, adopted) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&fresh);
            return Err(e);
        }
    };
    drop(read.db);
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|source| StoreError::Open {
            path: from.to_path_buf(),
            source: Box::new(redb::DatabaseError::Storage(redb::StorageError::Io(source))),
        })
    };
    rename(path, &kept)?;
    rename(&fresh, path)?;
    if let Some(dir) = path.parent() {
        // The renames reach the disk with the directory.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    drop(lock);
    Ok(RepairReport {
        before: read.report,
        kept_as: Some(kept),
        salvaged,
        adopted,
    })
}
