//! On-disk encoding of store keys and records.
//!
//! Every value starts with a one-byte record format number so that a record
//! written by a later layout is refused instead of being misread. Integers
//! are little-endian; strings are a `u32` length and UTF-8 bytes. Keys carry
//! a family byte (4 or 6) first, so IPv4 and IPv6 never collide and sort
//! apart, and network keys end with the prefix length.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{AllowRecord, BlockRecord, ClientRecord, Test};

/// Format number written in the first byte of every value.
pub(super) const RECORD_FORMAT: u8 = 1;

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
    fn new() -> Self {
        Self(vec![RECORD_FORMAT])
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
    fn new(v: &'a [u8]) -> Result<Self, DecodeError> {
        match v.split_first() {
            Some((&RECORD_FORMAT, rest)) => Ok(Self(rest)),
            Some((other, _)) => Err(DecodeError::new(format!(
                "record format {other}, this build reads format {RECORD_FORMAT}"
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

pub(super) fn encode_client(r: &ClientRecord) -> Vec<u8> {
    let mut w = Writer::new();
    for e in r.expires {
        w.u64(e);
    }
    w.u64(r.first_seen);
    w.u64(r.last_seen);
    w.0
}

pub(super) fn decode_client(v: &[u8]) -> Result<ClientRecord, DecodeError> {
    let mut r = Reader::new(v)?;
    let mut expires = [0; Test::COUNT];
    for e in &mut expires {
        *e = r.u64()?;
    }
    let rec = ClientRecord {
        expires,
        first_seen: r.u64()?,
        last_seen: r.u64()?,
    };
    r.finish()?;
    Ok(rec)
}

/// The network lives in the key, so it is not repeated in the value.
pub(super) fn encode_block(r: &BlockRecord) -> Vec<u8> {
    let mut w = Writer::new();
    w.u64(r.expires);
    w.u64(r.added);
    w.u32(r.offences);
    w.str(&r.reason);
    w.opt_str(r.list.as_deref());
    w.0
}

pub(super) fn decode_block(net: IpNet, v: &[u8]) -> Result<BlockRecord, DecodeError> {
    let mut r = Reader::new(v)?;
    let rec = BlockRecord {
        net,
        expires: r.u64()?,
        added: r.u64()?,
        offences: r.u32()?,
        reason: r.str()?,
        list: r.opt_str()?,
    };
    r.finish()?;
    Ok(rec)
}

pub(super) fn encode_allow(r: &AllowRecord) -> Vec<u8> {
    let mut w = Writer::new();
    w.u64(r.added);
    w.opt_str(r.comment.as_deref());
    w.0
}

pub(super) fn decode_allow(net: IpNet, v: &[u8]) -> Result<AllowRecord, DecodeError> {
    let mut r = Reader::new(v)?;
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
            offences: 2,
        };
        let enc = encode_block(&b);
        assert_eq!(decode_block(b.net, &enc).unwrap(), b);
        for cut in 0..enc.len() {
            assert!(decode_block(b.net, &enc[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = enc.clone();
        longer.push(0);
        assert!(decode_block(b.net, &longer).is_err());
        let mut other_format = enc;
        other_format[0] = RECORD_FORMAT + 1;
        let err = decode_block(b.net, &other_format).unwrap_err();
        assert!(err.0.contains("record format 2"), "{err:?}");

        let a = AllowRecord {
            net: net("2001:db8::/48"),
            added: 9,
            comment: None,
        };
        assert_eq!(decode_allow(a.net, &encode_allow(&a)).unwrap(), a);

        let c = ClientRecord {
            expires: [1, 2, 3, 4, 5],
            first_seen: 6,
            last_seen: 7,
        };
        assert_eq!(decode_client(&encode_client(&c)).unwrap(), c);
    }
}
