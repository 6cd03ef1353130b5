//! A redb storage backend that reads a database file and never writes it.
//!
//! `store check` and `store repair` must look at a damaged file without
//! changing it: redb writes while it opens (its crash repair, the recovery
//! flag, the allocator state), and a failed repair could damage the file
//! further. This backend reads pages from the file and keeps every write
//! in memory, page by page, so redb can open, repair and read a copy that
//! exists only in this process.
//!
//! It can also present the file longer than it is (reads past its end
//! return zeros): a file cut short fails redb's check that the file is as
//! long as its header says, and padding it back lets redb reach the pages
//! that survived.

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::unix::fs::FileExt,
    sync::{Mutex, PoisonError},
};

use redb::StorageBackend;

/// Granularity of the in-memory copy of written bytes.
const PAGE_BYTES: usize = 4096;
/// [`PAGE_BYTES`] for offset arithmetic.
const PAGE: u64 = PAGE_BYTES as u64;

/// Offset of redb's header flags ("god byte"), after its 9-byte magic.
const GOD_BYTE: u64 = 9;
/// The header flag asking for a full repair on open.
const RECOVERY_REQUIRED: u8 = 2;

/// Reads from a file, writes to memory.
#[derive(Debug)]
pub(super) struct Overlay {
    /// The database file, opened read-only.
    file: File,
    /// Its real length: reads past it return zeros.
    file_len: u64,
    /// The length redb sees (it may grow or shrink it in memory).
    len: Mutex<u64>,
    /// Pages redb wrote, by page number; they shadow the file.
    pages: Mutex<HashMap<u64, Box<[u8]>>>,
}

/// How to present the file's recovery flag to redb.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Recovery {
    /// As the file says.
    AsIs,
    /// Set: redb rebuilds its allocator state from the B-trees, which gets
    /// past a damaged region tracker.
    Force,
    /// Clear: redb reads the tables as they are, without the repair that
    /// refuses a file whose checksums fail.
    Skip,
}

impl Overlay {
    /// An overlay on `file`, presented `len` bytes long (at least the
    /// file's own length), with its recovery flag as `recovery` says.
    pub(super) fn new(file: File, len: u64, recovery: Recovery) -> io::Result<Overlay> {
        let file_len = file.metadata()?.len();
        let o = Overlay {
            file,
            file_len,
            len: Mutex::new(len.max(file_len)),
            pages: Mutex::new(HashMap::new()),
        };
        if recovery != Recovery::AsIs && file_len > GOD_BYTE {
            let mut god = o.read(GOD_BYTE, 1)?;
            match recovery {
                Recovery::Force => god[0] |= RECOVERY_REQUIRED,
                Recovery::Skip => god[0] &= !RECOVERY_REQUIRED,
                Recovery::AsIs => {}
            }
            o.write(GOD_BYTE, &god)?;
        }
        Ok(o)
    }

    /// Page `n` as redb last wrote it, else as the file has it.
    fn page(&self, n: u64) -> io::Result<Box<[u8]>> {
        if let Some(p) = self
            .pages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&n)
        {
            return Ok(p.clone());
        }
        let mut buf = vec![0u8; PAGE_BYTES].into_boxed_slice();
        let start = n * PAGE;
        if start < self.file_len {
            let end = (start + PAGE).min(self.file_len);
            let len = usize::try_from(end - start).expect("at most one page");
            self.file.read_exact_at(&mut buf[..len], start)?;
        }
        Ok(buf)
    }
}

/// `[start, end)` of page `n` that the byte range `[pos, end)` covers, as
/// offsets into the page.
fn span(n: u64, pos: u64, end: u64) -> (usize, usize) {
    let base = n * PAGE;
    let from = usize::try_from(pos - base).expect("within a page");
    let to = usize::try_from(end.min(base + PAGE) - base).expect("within a page");
    (from, to)
}

impl StorageBackend for Overlay {
    fn len(&self) -> io::Result<u64> {
        Ok(*self.len.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let end = offset + len as u64;
        let mut out = Vec::with_capacity(len);
        let mut pos = offset;
        while pos < end {
            let n = pos / PAGE;
            let (from, to) = span(n, pos, end);
            out.extend_from_slice(&self.page(n)?[from..to]);
            pos = n * PAGE + to as u64;
        }
        Ok(out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        *self.len.lock().unwrap_or_else(PoisonError::into_inner) = len;
        Ok(())
    }

    fn sync_data(&self, _eventual: bool) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset + data.len() as u64;
        let mut pos = offset;
        while pos < end {
            let n = pos / PAGE;
            let (from, to) = span(n, pos, end);
            let mut page = self.page(n)?;
            let src = usize::try_from(pos - offset).expect("within the write");
            page[from..to].copy_from_slice(&data[src..src + (to - from)]);
            self.pages
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(n, page);
            pos = n * PAGE + to as u64;
        }
        Ok(())
    }
}

/// The length redb's header says the file has, from the header fields
/// (page size, region header and data pages, full regions, pages of the
/// trailing region); `None` when the header is unreadable.
pub(super) fn header_len(file: &File) -> Option<u64> {
    let mut h = [0u8; 32];
    file.read_exact_at(&mut h, 0).ok()?;
    if &h[..4] != b"redb" {
        return None;
    }
    let field = |at: usize| {
        Some(u64::from(u32::from_le_bytes([
            h[at],
            h[at + 1],
            h[at + 2],
            h[at + 3],
        ])))
    };
    let page = field(12)?;
    let region_header = field(16)?;
    let region_data = field(20)?;
    let full_regions = field(24)?;
    let trailing = field(28)?;
    let regions = full_regions.checked_mul((region_header + region_data).checked_mul(page)?)?;
    let tail = if trailing > 0 {
        (region_header + trailing).checked_mul(page)?
    } else {
        0
    };
    // The super-header takes the first page.
    page.checked_add(regions)?.checked_add(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_stay_in_memory_and_reads_see_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let o = Overlay::new(File::open(&path).unwrap(), 20_000, Recovery::AsIs).unwrap();
        assert_eq!(o.len().unwrap(), 20_000);
        o.write(4090, &[1; 10]).unwrap();
        let r = o.read(4085, 20).unwrap();
        assert_eq!(&r[..5], &[7; 5]);
        assert_eq!(&r[5..15], &[1; 10]);
        assert_eq!(&r[15..], &[7; 5]);
        // Past the end of the file: zeros.
        assert_eq!(o.read(9_998, 4).unwrap(), vec![7, 7, 0, 0]);
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 10_000]);
    }
}
