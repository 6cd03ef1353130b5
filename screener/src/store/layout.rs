//! Layout numbers: what the file and each group of its tables hold,
//! checked at open, and the upgrade of a file from layout 1.
//!
//! # Numbers
//!
//! The `meta` table holds
//! - `layout`, the file's own layout: which tables exist and which meta
//!   keys describe them. 1 is the first releases' file, where this one
//!   number covered everything; 2 adds the numbers below.
//! - `layout.clients`, the encoding of the cache records (2: each record
//!   counts its tests, see `codec`).
//! - `layout.verdicts`, the encoding of the block and allow records (1:
//!   unchanged since layout 1).
//!
//! A number changes only when its tables' encoding changes. Adding a test
//! changes none: a client record carries its count of tests, and a shorter
//! one reads the missing tests as never passed.
//!
//! # Refusal
//!
//! A number this build cannot read (a later release's, or none where one
//! belongs) refuses the file at open, naming the file, the part, the
//! number found and the one expected: it is never half-read. The daemon
//! opens the store before it touches the XDP maps, so a refused file never
//! reaches `reconcile`, and the pinned gate keeps dropping what it holds.
//!
//! # Upgrade from layout 1
//!
//! Done in place at open, in the same write transaction that checks the
//! numbers, so a crash leaves the file at layout 1 and the next open does
//! it again: every cache record is rewritten in the counted form, the
//! per-table numbers are written and `layout` becomes 2. A layout-1 release
//! then refuses the file (it reads layout 1 only) rather than misreading
//! counted records. Verdict records are left as they are: their encoding is
//! the same. A cache record that does not decode is left as it was: it was
//! unreadable before and stays reported as such (`store repair` drops it).

use std::ops::Bound;

use redb::{ReadableTable, Table, WriteTransaction};

use super::{codec, CLIENTS};

/// Meta key of the file's layout.
pub(super) const FILE_KEY: &str = "layout";
/// Meta key of the cache table's layout.
pub(super) const CLIENTS_KEY: &str = "layout.clients";
/// Meta key of the verdict tables' layout.
pub(super) const VERDICTS_KEY: &str = "layout.verdicts";

/// The file layout this build writes.
pub const FILE_LAYOUT: u64 = 2;
/// The file layout of the first releases, which this build upgrades.
pub const LEGACY_FILE_LAYOUT: u64 = 1;
/// The layout of the `clients` table this build reads and writes.
pub const CLIENTS_LAYOUT: u64 = 2;
/// The layout of the `blocks` and `allows` tables this build reads and
/// writes.
pub const VERDICTS_LAYOUT: u64 = 1;

/// What the file's layout is called in messages.
pub const FILE_PART: &str = "the file";
/// What the cache table is called in messages.
pub const CLIENTS_PART: &str = "table clients";
/// What the verdict tables are called in messages.
pub const VERDICTS_PART: &str = "tables blocks and allows";

/// The layout numbers a file's `meta` table holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// `layout`.
    pub file: Option<u64>,
    /// `layout.clients`.
    pub clients: Option<u64>,
    /// `layout.verdicts`.
    pub verdicts: Option<u64>,
}

impl Found {
    /// The numbers under `meta`; a missing key is `None`.
    pub(super) fn read(
        get: impl Fn(&str) -> Result<Option<u64>, redb::StorageError>,
    ) -> Result<Found, redb::StorageError> {
        Ok(Found {
            file: get(FILE_KEY)?,
            clients: get(CLIENTS_KEY)?,
            verdicts: get(VERDICTS_KEY)?,
        })
    }

    /// How this build reads a file with these numbers, or why it cannot.
    pub fn reading(&self) -> Result<Reading, Refusal> {
        match self.file {
            None if self.clients.is_none() && self.verdicts.is_none() => Ok(Reading::Unrecorded),
            Some(LEGACY_FILE_LAYOUT) => Ok(Reading::Legacy),
            Some(FILE_LAYOUT) => {
                if self.clients != Some(CLIENTS_LAYOUT) {
                    return Err(Refusal {
                        part: CLIENTS_PART,
                        found: self.clients,
                        expected: CLIENTS_LAYOUT,
                    });
                }
                if self.verdicts != Some(VERDICTS_LAYOUT) {
                    return Err(Refusal {
                        part: VERDICTS_PART,
                        found: self.verdicts,
                        expected: VERDICTS_LAYOUT,
                    });
                }
                Ok(Reading::Current)
            }
            found => Err(Refusal {
                part: FILE_PART,
                found,
                expected: FILE_LAYOUT,
            }),
        }
    }
}

/// How a file is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reading {
    /// No layout recorded: a new file (or, when it holds tables, not a
    /// screener store).
    Unrecorded,
    /// Layout 1: read, and upgraded at the daemon's next open.
    Legacy,
    /// The layouts this build writes.
    Current,
}

/// A layout this build cannot read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// What has it: [`FILE_PART`], [`CLIENTS_PART`] or [`VERDICTS_PART`].
    pub part: &'static str,
    /// The number found; `None` when the key is missing.
    pub found: Option<u64>,
    /// The number this build reads.
    pub expected: u64,
}

impl Refusal {
    /// The number found, as a phrase.
    pub fn found_text(found: Option<u64>) -> String {
        found.map_or_else(|| "no layout number".to_owned(), |f| format!("layout {f}"))
    }

    /// What the operator can do about a file with `found` where this build
    /// reads `expected`.
    pub fn advice(found: Option<u64>, expected: u64) -> &'static str {
        if found.is_some_and(|f| f > expected) {
            "it was written by a later release of screener: run that release on it, or move \
             the file away to start this one with an empty store (the pinned verdicts are \
             adopted into it; the pinned XDP gate keeps dropping meanwhile)"
        } else {
            "this release cannot read or upgrade it: move the file away to start with an \
             empty store (the pinned verdicts are adopted into it; the pinned XDP gate keeps \
             dropping meanwhile)"
        }
    }
}

/// Writes this build's numbers into `meta`.
pub(super) fn write_current(meta: &mut Table<'_, &str, u64>) -> Result<(), redb::StorageError> {
    meta.insert(FILE_KEY, FILE_LAYOUT)?;
    meta.insert(CLIENTS_KEY, CLIENTS_LAYOUT)?;
    meta.insert(VERDICTS_KEY, VERDICTS_LAYOUT)?;
    Ok(())
}

/// What upgrading a layout-1 file did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Upgrade {
    /// Cache records rewritten in the counted form.
    pub rewritten: u64,
    /// Cache records left as they were because they do not decode.
    pub unreadable: u64,
}

/// Cache records rewritten per batch: the batch is held in memory while its
/// records are written back, not the whole table.
const BATCH: usize = 4096;

/// Rewrites every layout-1 cache record in `txn` in the counted form; see
/// UPGRADE FROM LAYOUT 1. The caller writes the new numbers.
pub(super) fn upgrade_clients(txn: &WriteTransaction) -> Result<Upgrade, Box<redb::Error>> {
    let mut t = txn.open_table(CLIENTS).map_err(boxed)?;
    let mut done = Upgrade::default();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let batch: Vec<(Vec<u8>, Vec<u8>)> = {
            let lower = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            let mut batch = Vec::with_capacity(BATCH);
            for entry in t.range::<&[u8]>((lower, Bound::Unbounded)).map_err(boxed)? {
                let (k, v) = entry.map_err(boxed)?;
                batch.push((k.value().to_vec(), v.value().to_vec()));
                if batch.len() == BATCH {
                    break;
                }
            }
            batch
        };
        let Some((last, _)) = batch.last() else {
            return Ok(done);
        };
        after = Some(last.clone());
        for (k, v) in &batch {
            match codec::decode_legacy_client(v) {
                Ok(rec) => {
                    t.insert(k.as_slice(), codec::encode_client(&rec).as_slice())
                        .map_err(boxed)?;
                    done.rewritten += 1;
                }
                Err(_) => done.unreadable += 1,
            }
        }
    }
}

/// redb's error, boxed: it is large and travels through every `Result`.
fn boxed(e: impl Into<redb::Error>) -> Box<redb::Error> {
    Box::new(e.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(file: Option<u64>, clients: Option<u64>, verdicts: Option<u64>) -> Found {
        Found {
            file,
            clients,
            verdicts,
        }
    }

    #[test]
    fn readings() {
        assert_eq!(found(None, None, None).reading(), Ok(Reading::Unrecorded));
        assert_eq!(found(Some(1), None, None).reading(), Ok(Reading::Legacy));
        assert_eq!(
            found(Some(2), Some(CLIENTS_LAYOUT), Some(VERDICTS_LAYOUT)).reading(),
            Ok(Reading::Current)
        );
        let refused = |f: Found, part, found, expected| {
            assert_eq!(
                f.reading(),
                Err(Refusal {
                    part,
                    found,
                    expected
                }),
                "{f:?}"
            );
        };
        refused(found(Some(3), None, None), FILE_PART, Some(3), FILE_LAYOUT);
        refused(found(Some(0), None, None), FILE_PART, Some(0), FILE_LAYOUT);
        refused(found(None, Some(2), None), FILE_PART, None, FILE_LAYOUT);
        refused(
            found(Some(2), Some(CLIENTS_LAYOUT + 1), Some(VERDICTS_LAYOUT)),
            CLIENTS_PART,
            Some(CLIENTS_LAYOUT + 1),
            CLIENTS_LAYOUT,
        );
        refused(
            found(Some(2), None, Some(VERDICTS_LAYOUT)),
            CLIENTS_PART,
            None,
            CLIENTS_LAYOUT,
        );
        refused(
            found(Some(2), Some(CLIENTS_LAYOUT), Some(VERDICTS_LAYOUT + 1)),
            VERDICTS_PART,
            Some(VERDICTS_LAYOUT + 1),
            VERDICTS_LAYOUT,
        );
    }

    #[test]
    fn advice_depends_on_whether_the_file_is_newer() {
        assert!(Refusal::advice(Some(3), 2).contains("later release"));
        assert!(!Refusal::advice(Some(0), 2).contains("later release"));
        assert!(!Refusal::advice(None, 2).contains("later release"));
        assert_eq!(Refusal::found_text(None), "no layout number");
        assert_eq!(Refusal::found_text(Some(7)), "layout 7");
    }
}
