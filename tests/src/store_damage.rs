//! Damaged store files for the fault tests, made deterministically from a
//! real store: one record scribbled through redb (the file stays a valid
//! database, the record does not decode), a data page overwritten in place
//! (redb's own structures are damaged), and a file cut short.
//!
//! The key encoding mirrors the store's (family byte, address bytes, prefix
//! length): a change there shows up here as a test that cannot find its
//! record.

use std::{
    io::{Seek, SeekFrom, Write},
    net::IpAddr,
    path::Path,
};

use ipnet::IpNet;
use redb::{Database, ReadableTable, TableDefinition};

const BLOCKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blocks");

/// The store's key for `net` (host bits cleared).
#[must_use]
pub fn net_key(net: IpNet) -> Vec<u8> {
    let net = net.trunc();
    let mut k = Vec::new();
    match net.addr() {
        IpAddr::V4(a) => {
            k.push(4);
            k.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            k.push(6);
            k.extend_from_slice(&a.octets());
        }
    }
    k.push(net.prefix_len());
    k
}

/// Overwrites the value of the block record on `net` with bytes of the
/// store's record format that end too early: the database stays sound, the
/// record does not decode. The daemon must not be running.
#[track_caller]
pub fn scribble_block_record(store: &Path, net: &str) {
    let net: IpNet = net.parse().unwrap();
    let db = Database::create(store).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(BLOCKS).unwrap();
        let key = net_key(net);
        assert!(
            t.get(key.as_slice()).unwrap().is_some(),
            "no block record on {net} to scribble"
        );
        // Format byte 1, then two bytes of an eight-byte expiry.
        t.insert(key.as_slice(), [1u8, 0xff, 0xff].as_slice())
            .unwrap();
    }
    txn.commit().unwrap();
}

/// Opens and closes the store once with redb, so a file left by a killed
/// daemon is recovered and closed cleanly: the damage a test makes next is
/// then the only thing wrong with it.
#[track_caller]
pub fn settle(store: &Path) {
    drop(Database::create(store).unwrap());
}

/// Overwrites, in place, every 4 KiB page of `store` holding `needle` with
/// 0xa5 bytes, as a failing disk or a stray write would. Returns how many
/// pages.
#[track_caller]
pub fn scribble_pages_holding(store: &Path, needle: &[u8]) -> usize {
    let mut bytes = std::fs::read(store).unwrap();
    let mut pages: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(at, _)| at & !4095)
        .collect();
    pages.dedup();
    assert!(
        !pages.is_empty(),
        "{needle:?} is not in {}",
        store.display()
    );
    for p in &pages {
        bytes[*p..*p + 4096].fill(0xa5);
    }
    let mut f = std::fs::OpenOptions::new().write(true).open(store).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&bytes).unwrap();
    f.sync_all().unwrap();
    pages.len()
}

/// Cuts `store` to `keep` of its length (a copy interrupted, a disk that
/// lost the tail).
#[track_caller]
pub fn truncate(store: &Path, keep: f64) {
    let len = std::fs::metadata(store).unwrap().len();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a fraction of a file length"
    )]
    let cut = ((len as f64) * keep) as u64;
    let f = std::fs::OpenOptions::new().write(true).open(store).unwrap();
    f.set_len(cut).unwrap();
    f.sync_all().unwrap();
}

/// Whether the blocks table of the (closed) store at `store` has a record
/// on `net`, read with redb directly.
#[must_use]
pub fn has_block_record(store: &Path, net: &str) -> bool {
    let net: IpNet = net.parse().unwrap();
    let db = Database::create(store).unwrap();
    let txn = db.begin_read().unwrap();
    let t = txn.open_table(BLOCKS).unwrap();
    t.get(net_key(net).as_slice()).unwrap().is_some()
}

/// A tmpfs mounted on a fresh directory, unmounted and removed on drop: a
/// small disk a test can fill.
pub struct Tmpfs {
    /// The mount point.
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it, e.g. `2m`).
    #[track_caller]
    #[must_use]
    pub fn new(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        crate::netns::sh(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0700"),
            "tmpfs",
            dir.path().to_str().unwrap(),
        ]);
        Tmpfs { dir }
    }

    /// Writes a file until the tmpfs is full; returns its path.
    #[track_caller]
    #[must_use]
    pub fn fill(&self) -> std::path::PathBuf {
        let path = self.dir.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = [0u8; 4096];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        // Whatever is left is less than a page: small writes still fit.
        let _ = f.write_all(&chunk[..1024]);
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l"])
            .arg(self.dir.path())
            .output();
    }
}
