//! On-disk encoding of store keys and records.
//!
//! Every value starts with a one-byte record format number, so that a
//! record of another format is refused instead of being misread. Integers
//! are little-endian; strings are a `u32` length and UTF-8 bytes. Keys carry
//! a family byte (4 or 6) first, so IPv4 and IPv6 never collide and sort
//! apart, and network keys end with the prefix length.
//!
//! # Client records carry their count of tests
//!
//! A client record (format 2) is `first_seen`, `last_seen`, a one-byte
//! count of pass expiries, then that many expiries in [`Test::index`]
//! order, as postscreen's cache keeps one expiry per test in a fixed order
//! (`postscreen_tests.c`). A record with fewer expiries than this build has
//! tests was written before the missing tests existed: they read as "never
//! passed". A record with more was written by a later release: the tests
//! this build knows keep their expiries, and the others are carried along
//! in [`ClientRecord::later`] and written back, so going back to the later
//! release loses nothing. Adding a test therefore needs no layout change,
//! provided tests are only ever appended: an index is a position on disk,
//! never reordered or reused.
//!
//! The format-1 client record of layout 1 (exactly five expiries, then the
//! two times) is only read, to upgrade a layout-1 file.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{AllowRecord, BlockRecord, ClientRecord, Test};

/// Format byte of block and allow records.
pub(super) const VERDICT_FORMAT: u8 = 1;

/// Format byte of client records: counted expiries.
pub(super) const CLIENT_FORMAT: u8 = 2;

/// Format byte of layout 1's client records: [`LEGACY_TESTS`] expiries.
pub(super) const LEGACY_CLIENT_FORMAT: u8 = 1;

/// The tests of layout 1's client records, in their order on disk.
pub(super) const LEGACY_TESTS: [&str; 5] = [
    "pregreet",
    "dnsbl",
    "pipelining",
    "non_smtp_command",
    "bare_newline",
];

const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;

/// Why a stored key or value could not be read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DecodeError(pub(super) String);

impl DecodeError {
    fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// Key for one client address.
pub(super) fn ip_key(ip: IpAddr) -> Vec<u8> {
    // A dual-stack listener reports IPv4 clients as v4-mapped IPv6; keying
    // them by their IPv4 form keeps one record per client.
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let mut k = Vec::with_capacity(5);
            k.push(FAMILY_V4);
            k.extend_from_slice(&a.octets());
            k
        }
        IpAddr::V6(a) => {
            let mut k = Vec::with_capacity(17);
            k.push(FAMILY_V6);
            k.extend_from_slice(&a.octets());
            k
        }
    }
}

pub(super) fn decode_ip_key(k: &[u8]) -> Result<IpAddr, DecodeError> {
    match k {
        [FAMILY_V4, rest @ ..] => {
            let o: [u8; 4] = rest
                .try_into()
                .map_err(|_| DecodeError::new(format!("IPv4 key of {} bytes", k.len())))?;
            Ok(IpAddr::V4(Ipv4Addr::from(o)))
        }
        [FAMILY_V6, rest @ ..] => {
            let o: [u8; 16] = rest
                .try_into()
                .map_err(|_| DecodeError::new(format!("IPv6 key of {} bytes", k.len())))?;
            Ok(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => Err(DecodeError::new("address key with unknown family")),
    }
}

/// Key for one network; the caller's host bits are cleared first so
/// `192.0.2.7/24` and `192.0.2.0/24` name the same entry.
pub(super) fn net_key(net: IpNet) -> Vec<u8> {
    match net.trunc() {
        IpNet::V4(n) => {
            let mut k = Vec::with_capacity(6);
            k.push(FAMILY_V4);
            k.extend_from_slice(&n.network().octets());
            k.push(n.prefix_len());
            k
        }
        IpNet::V6(n) => {
            let mut k = Vec::with_capacity(18);
            k.push(FAMILY_V6);
            k.extend_from_slice(&n.network().octets());
            k.push(n.prefix_len());
            k
        }
    }
}

pub(super) fn decode_net_key(k: &[u8]) -> Result<IpNet, DecodeError> {
    let bad_len = || DecodeError::new(format!("network key of {} bytes", k.len()));
    match k {
        [FAMILY_V4, rest @ ..] => {
            let (addr, prefix) = rest.split_at_checked(4).ok_or_else(bad_len)?;
            let [prefix] = prefix else {
                return Err(bad_len());
            };
            let o: [u8; 4] = addr.try_into().map_err(|_| bad_len())?;
            Ipv4Net::new(Ipv4Addr::from(o), *prefix)
                .map(IpNet::V4)
                .map_err(|_| DecodeError::new(format!("IPv4 prefix length {prefix}")))
        }
        [FAMILY_V6, rest @ ..] => {
            let (addr, prefix) = rest.split_at_checked(16).ok_or_else(bad_len)?;
            let [prefix] = prefix else {
                return Err(bad_len());
            };
            let o: [u8; 16] = addr.try_into().map_err(|_| bad_len())?;
            Ipv6Net::new(Ipv6Addr::from(o), *prefix)
                .map(IpNet::V6)
                .map_err(|_| DecodeError::new(format!("IPv6 prefix length {prefix}")))
        }
        _ => Err(DecodeError::new("network key with unknown family")),
    }
}

/// `k` in lower-case hex, for naming a key that does not decode.
pub(super) fn hex(k: &[u8]) -> String {
    use std::fmt::Write as _;
    k.iter()
        .fold(String::with_capacity(k.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Appends values to a record buffer.
struct Writer(Vec<u8>);

impl Writer {
    fn new(format: u8) -> Self {
        Self(vec![format])
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        // Reasons and list names are short operator text; cutting at 4 GiB
        // only guards the length field against wrapping.
        let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
        self.u32(len);
        self.0.extend_from_slice(&s.as_bytes()[..len as usize]);
    }
    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.0.push(0),
            Some(s) => {
                self.0.push(1);
                self.str(s);
            }
        }
    }
}

/// Reads values back from a record, checking every length.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// Checks the format byte and positions after it.
    fn new(v: &'a [u8], format: u8) -> Result<Self, DecodeError> {
        match v.split_first() {
            Some((&f, rest)) if f == format => Ok(Self(rest)),
            Some((other, _)) => Err(DecodeError::new(format!(
                "record format {other}, this build reads format {format}"
            ))),
            None => Err(DecodeError::new("empty record")),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let (head, rest) = self
            .0
            .split_at_checked(n)
            .ok_or_else(|| DecodeError::new("record truncated"))?;
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b: [u8; 8] = self.take(8)?.try_into().expect("take returned 8 bytes");
        Ok(u64::from_le_bytes(b))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b: [u8; 4] = self.take(4)?.try_into().expect("take returned 4 bytes");
        Ok(u32::from_le_bytes(b))
    }
    fn str(&mut self) -> Result<String, DecodeError> {
        let len = self.u32()? as usize;
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::new("string is not UTF-8"))
    }
    fn opt_str(&mut self) -> Result<Option<String>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.str().map(Some),
            t => Err(DecodeError::new(format!("bad option tag {t}"))),
        }
    }
    /// Whether every byte was read: a field added later is read only
    /// when the record has it.
    fn at_end(&self) -> bool {
        self.0.is_empty()
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::new(format!(
                "{} trailing bytes after record",
                self.0.len()
            )))
        }
    }
}

/// The most expiries a record can count.
const MAX_TESTS: usize = u8::MAX as usize;

const _: () = assert!(
    Test::COUNT <= MAX_TESTS,
    "a client record counts its tests in one byte"
);

pub(super) fn encode_client(r: &ClientRecord) -> Vec<u8> {
    let mut w = Writer::new(CLIENT_FORMAT);
    w.u64(r.first_seen);
    w.u64(r.last_seen);
    let all: Vec<u64> = r.expires.iter().chain(&r.later).copied().collect();
    // `later` comes from a record counted in one byte; cutting only guards
    // a hand-built record against a count that wraps.
    let n = all.len().min(MAX_TESTS);
    w.u8(u8::try_from(n).unwrap_or(u8::MAX));
    for e in &all[..n] {
        w.u64(*e);
    }
    w.0
}

pub(super) fn decode_client(v: &[u8]) -> Result<ClientRecord, DecodeError> {
    let mut r = Reader::new(v, CLIENT_FORMAT)?;
    let first_seen = r.u64()?;
    let last_seen = r.u64()?;
    let n = r.u8()?;
    let mut expiries = Vec::with_capacity(n.into());
    for _ in 0..n {
        expiries.push(r.u64()?);
    }
    r.finish()?;
    Ok(client(&expiries, first_seen, last_seen))
}

/// Reads a client record of layout 1, for upgrading the file.
pub(super) fn decode_legacy_client(v: &[u8]) -> Result<ClientRecord, DecodeError> {
    let mut r = Reader::new(v, LEGACY_CLIENT_FORMAT)?;
    let mut expiries = [0; LEGACY_TESTS.len()];
    for e in &mut expiries {
        *e = r.u64()?;
    }
    let first_seen = r.u64()?;
    let last_seen = r.u64()?;
    r.finish()?;
    Ok(client(&expiries, first_seen, last_seen))
}

/// A record from expiries in index order: missing ones never passed,
/// ones past [`Test::COUNT`] are kept in [`ClientRecord::later`].
fn client(expiries: &[u64], first_seen: u64, last_seen: u64) -> ClientRecord {
    let mut rec = ClientRecord {
        first_seen,
        last_seen,
        ..ClientRecord::default()
    };
    let known = expiries.len().min(Test::COUNT);
    rec.expires[..known].copy_from_slice(&expiries[..known]);
    rec.later = expiries[known..].to_vec();
    rec
}

/// The network lives in the key, so it is not repeated in the value.
pub(super) fn encode_block(r: &BlockRecord) -> Vec<u8> {
    let mut w = Writer::new(VERDICT_FORMAT);
    w.u64(r.expires);
    w.u64(r.added);
    w.u32(r.offences);
    w.str(&r.reason);
    w.opt_str(r.list.as_deref());
    // Appended only when set, so a record of this node's own is the same
    // bytes as before fleets existed.
    if r.origin.is_some() {
        w.opt_str(r.origin.as_deref());
    }
    w.0
}

pub(super) fn decode_block(net: IpNet, v: &[u8]) -> Result<BlockRecord, DecodeError> {
    let mut r = Reader::new(v, VERDICT_FORMAT)?;
    let rec = BlockRecord {
        net,
        expires: r.u64()?,
        added: r.u64()?,
        offences: r.u32()?,
        reason: r.str()?,
        list: r.opt_str()?,
        origin: if r.at_end() { None } else { r.opt_str()? },
    };
    r.finish()?;
    Ok(rec)
}

pub(super) fn encode_allow(r: &AllowRecord) -> Vec<u8> {
    let mut w = Writer::new(VERDICT_FORMAT);
    w.u64(r.added);
    w.opt_str(r.comment.as_deref());
    w.0
}

pub(super) fn decode_allow(net: IpNet, v: &[u8]) -> Result<AllowRecord, DecodeError> {
    let mut r = Reader::new(v, VERDICT_FORMAT)?;
    let rec = AllowRecord {
        net,
        added: r.u64()?,
        comment: r.opt_str()?,
    };
    r.finish()?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn ip_keys_separate_families_and_fold_mapped_v4() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::c000:201".parse().unwrap();
        assert_eq!(ip_key(v4), ip_key(mapped));
        assert_ne!(ip_key(v4), ip_key(v6));
        assert_eq!(decode_ip_key(&ip_key(v4)).unwrap(), v4);
        assert_eq!(decode_ip_key(&ip_key(v6)).unwrap(), v6);
        assert!(decode_ip_key(&[4, 1, 2, 3]).is_err());
        assert!(decode_ip_key(&[5, 1, 2, 3, 4]).is_err());
    }

    #[test]
    fn net_keys_normalise_host_bits() {
        assert_eq!(net_key(net("192.0.2.7/24")), net_key(net("192.0.2.0/24")));
        assert_ne!(net_key(net("192.0.2.0/24")), net_key(net("192.0.2.0/25")));
        assert_eq!(
            decode_net_key(&net_key(net("2001:db8::1/64"))).unwrap(),
            net("2001:db8::/64")
        );
        assert!(decode_net_key(&[4, 192, 0, 2, 0, 33]).is_err());
        assert!(decode_net_key(&[6, 0]).is_err());
    }

    #[test]
    fn records_round_trip_and_reject_damage() {
        let b = BlockRecord {
            net: net("198.51.100.0/24"),
            reason: "pregreet ✓".into(),
            expires: 7,
            added: 3,
            list: Some("drop".into()),
            origin: None,
            offences: 2,
        };
        let enc = encode_block(&b);
        assert_eq!(decode_block(b.net, &enc).unwrap(), b);
        for cut in 0..enc.len() {
            assert!(decode_block(b.net, &enc[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = enc.clone();
        longer.push(9);
        assert!(decode_block(b.net, &longer).is_err());
        longer.extend_from_slice(&[0, 0]);
        assert!(decode_block(b.net, &longer).is_err());

        // A fleet verdict carries its origin; one without reads as ours.
        let remote = BlockRecord {
            origin: Some("mx2".into()),
            ..b.clone()
        };
        let enc_remote = encode_block(&remote);
        assert_eq!(decode_block(b.net, &enc_remote).unwrap(), remote);
        assert_eq!(enc_remote[..enc.len()], enc[..], "the origin is appended");
        for cut in enc.len() + 1..enc_remote.len() {
            assert!(
                decode_block(b.net, &enc_remote[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut other_format = enc;
        other_format[0] = VERDICT_FORMAT + 1;
        let err = decode_block(b.net, &other_format).unwrap_err();
        assert!(err.0.contains("record format 2"), "{err:?}");

        let a = AllowRecord {
            net: net("2001:db8::/48"),
            added: 9,
            comment: None,
        };
        assert_eq!(decode_allow(a.net, &encode_allow(&a)).unwrap(), a);

        let mut c = ClientRecord {
            first_seen: 6,
            last_seen: 7,
            ..ClientRecord::default()
        };
        for (i, e) in c.expires.iter_mut().enumerate() {
            *e = 100 + i as u64;
        }
        let enc = encode_client(&c);
        assert_eq!(decode_client(&enc).unwrap(), c);
        for cut in 0..enc.len() {
            assert!(decode_client(&enc[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = enc;
        longer.push(0);
        assert!(decode_client(&longer).is_err());
    }

    /// A client record as a release with `expiries.len()` tests writes it.
    fn counted(expiries: &[u64], first_seen: u64, last_seen: u64) -> Vec<u8> {
        let mut v = vec![CLIENT_FORMAT];
        v.extend_from_slice(&first_seen.to_le_bytes());
        v.extend_from_slice(&last_seen.to_le_bytes());
        v.push(u8::try_from(expiries.len()).unwrap());
        for e in expiries {
            v.extend_from_slice(&e.to_le_bytes());
        }
        v
    }

    #[test]
    fn a_record_with_one_test_fewer_reads_the_missing_one_as_never_passed() {
        let older: Vec<u64> = (0..Test::COUNT as u64 - 1).map(|i| 1000 + i).collect();
        let rec = decode_client(&counted(&older, 5, 6)).unwrap();
        let newest = Test::ALL[Test::COUNT - 1];
        assert_eq!(rec.expires[newest.index()], 0);
        assert!(!rec.passed(newest, 0));
        for t in &Test::ALL[..Test::COUNT - 1] {
            assert_eq!(rec.expires[t.index()], older[t.index()], "{t}");
            assert!(rec.passed(*t, 999), "{t}");
        }
        assert_eq!((rec.first_seen, rec.last_seen), (5, 6));
        assert!(rec.later.is_empty());
        // Written back, it counts every test this build knows.
        assert_eq!(
            encode_client(&rec),
            counted(&older.iter().copied().chain([0]).collect::<Vec<_>>(), 5, 6)
        );
        // No tests at all (a client seen, none run yet) is a record too.
        let empty = decode_client(&counted(&[], 1, 2)).unwrap();
        assert_eq!(empty.expires, [0; Test::COUNT]);
    }

    #[test]
    fn a_record_from_a_later_release_keeps_known_passes_and_carries_the_rest() {
        let newer: Vec<u64> = (0..Test::COUNT as u64 + 2).map(|i| 2000 + i).collect();
        let bytes = counted(&newer, 7, 8);
        let rec = decode_client(&bytes).unwrap();
        for t in Test::ALL {
            assert_eq!(rec.expires[t.index()], newer[t.index()], "{t}");
        }
        assert_eq!(rec.later, newer[Test::COUNT..]);
        assert_eq!(rec.newest_expiry(), *newer.last().unwrap());
        // Written back unchanged: the later release finds its passes again.
        assert_eq!(encode_client(&rec), bytes);
    }

    #[test]
    fn legacy_records_read_as_the_first_five_tests() {
        // Indexes are positions on disk: the first five never move.
        for (i, name) in LEGACY_TESTS.iter().enumerate() {
            assert_eq!(Test::ALL[i].name(), *name, "test at index {i}");
            assert_eq!(Test::ALL[i].index(), i);
        }
        let mut v = vec![LEGACY_CLIENT_FORMAT];
        for e in [11u64, 12, 13, 14, 15, 1, 2] {
            v.extend_from_slice(&e.to_le_bytes());
        }
        let rec = decode_legacy_client(&v).unwrap();
        assert_eq!(rec.expires[..5], [11, 12, 13, 14, 15]);
        assert!(rec.expires[5..].iter().all(|e| *e == 0));
        assert_eq!((rec.first_seen, rec.last_seen), (1, 2));
        assert!(decode_legacy_client(&v[..v.len() - 1]).is_err());
        // Neither format is taken for the other.
        assert!(decode_client(&v).is_err());
        assert!(decode_legacy_client(&encode_client(&rec)).is_err());
    }
}
