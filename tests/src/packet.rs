//! Ethernet frames crafted byte by byte for `BPF_PROG_TEST_RUN`.
//!
//! The XDP program sees raw frames, so the tests build them here instead of
//! capturing real traffic: every header the parser walks (VLAN tags, IPv4
//! options, IPv6 extension headers, fragments) can be switched on, and the
//! [`Frame`] records where each header ends so a test can cut the frame at
//! every boundary.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Ethernet type of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// Ethernet type of IPv6.
pub const ETH_P_IPV6: u16 = 0x86DD;
/// Ethernet type of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// Ethernet type of LLDP.
pub const ETH_P_LLDP: u16 = 0x88CC;
/// Tag protocol identifier of an 802.1Q (customer) VLAN tag.
pub const TPID_8021Q: u16 = 0x8100;
/// Tag protocol identifier of an 802.1ad (service, `QinQ` outer) tag.
pub const TPID_8021AD: u16 = 0x88A8;

/// TCP header flag bits (byte 13 of the header).
pub mod tcp {
    /// No more data from the sender.
    pub const FIN: u8 = 0x01;
    /// Synchronise sequence numbers: opens a connection.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push the data to the application.
    pub const PSH: u8 = 0x08;
    /// The acknowledgment number is valid: every segment after the SYN.
    pub const ACK: u8 = 0x10;
    /// ECN-echo (set on a SYN that negotiates ECN).
    pub const ECE: u8 = 0x40;
    /// Congestion window reduced (set on a SYN that negotiates ECN).
    pub const CWR: u8 = 0x80;
}

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_NONE: u8 = 59;

/// What follows the IP header (and the IPv6 extension headers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// A TCP segment from port 40000 to `dport` with these header flags
    /// (see [`tcp`]), 20-byte header.
    Tcp { dport: u16, flags: u8 },
    /// A UDP datagram to `dport` with 4 bytes of payload.
    Udp(u16),
    /// An ICMP (`ICMPv6` over IPv6) echo request.
    Icmp,
    /// An ESP header (SPI and sequence number) followed by 8 opaque bytes.
    Esp,
    /// IPv6 "no next header": nothing follows.
    NoNext,
}

/// An IPv6 extension header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options, `len8` extra 8-octet units (`PadN` filled).
    HopByHop { len8: u8 },
    /// Routing header type 0 style, `len8` extra 8-octet units.
    Routing { len8: u8 },
    /// Destination options, `len8` extra 8-octet units.
    DestOpts { len8: u8 },
    /// Fragment header: offset in 8-octet units and the M flag.
    Fragment { offset: u16, more: bool },
    /// Authentication header with `len4 + 2` 4-octet units in total.
    Ah { len4: u8 },
}

impl Ext {
    const fn number(self) -> u8 {
        match self {
            Ext::HopByHop { .. } => 0,
            Ext::Routing { .. } => 43,
            Ext::DestOpts { .. } => 60,
            Ext::Fragment { .. } => 44,
            Ext::Ah { .. } => 51,
        }
    }

    /// The header's bytes, `next` being the protocol that follows it.
    fn bytes(self, next: u8) -> Vec<u8> {
        // Filler bytes that read as port 25 (0x0019) wherever they land: a
        // parser that gets a header length wrong reads one of these as the
        // TCP destination port and judges a packet it should not, which
        // the tests notice.
        let fill =
            |n: usize| -> Vec<u8> { (0..n).map(|i| if i % 2 == 0 { 0 } else { 25 }).collect() };
        match self {
            Ext::HopByHop { len8 } | Ext::Routing { len8 } | Ext::DestOpts { len8 } => {
                let total = (usize::from(len8) + 1) * 8;
                let mut b = vec![next, len8];
                b.extend(fill(total - 2));
                b
            }
            Ext::Fragment { offset, more } => {
                let off = (offset << 3) | u16::from(more);
                let mut b = vec![next, 0];
                b.extend(off.to_be_bytes());
                b.extend(0x1234_5678u32.to_be_bytes());
                b
            }
            Ext::Ah { len4 } => {
                let total = (usize::from(len4) + 2) * 4;
                let mut b = vec![next, len4, 0, 0];
                b.extend(fill(total - 4));
                b
            }
        }
    }
}

/// A built frame and where its headers end.
#[derive(Clone, Debug)]
pub struct Frame {
    /// The whole frame, Ethernet header first.
    pub bytes: Vec<u8>,
    /// End offset of every header, in order, with its name.
    pub boundaries: Vec<(&'static str, usize)>,
    /// End of the IP header: the fixed IPv6 header or the IPv4 header with
    /// its options. A frame this long is enough to judge in "all" scope.
    pub ip_end: usize,
    /// End of the L4 header (the TCP header for a SYN).
    pub l4_end: usize,
    /// End of the TCP ports: a frame this long is enough to judge a
    /// fragment in a port scope (or `l4_end` when the L4 header is shorter).
    pub ports_end: usize,
    /// End of the TCP flags byte: a whole TCP segment is judged on its
    /// flags, so it needs this much (or `l4_end` when the header is shorter
    /// or not TCP).
    pub flags_end: usize,
}

impl Frame {
    /// The first `len` bytes.
    #[must_use]
    pub fn truncated(&self, len: usize) -> Vec<u8> {
        self.bytes[..len.min(self.bytes.len())].to_vec()
    }
}

/// Builds one frame; every knob defaults to a plain TCP SYN to port 25.
#[derive(Clone, Debug)]
pub struct FrameBuilder {
    src: IpAddr,
    dst: IpAddr,
    vlans: Vec<(u16, u16)>,
    v4_options: Vec<u8>,
    v4_frag: (u16, bool),
    v6_ext: Vec<Ext>,
    l4: L4,
    l4_len: Option<usize>,
    payload: usize,
}

/// A TCP SYN from `src` to port `dport`; the destination is a
/// documentation address of the same family.
#[must_use]
pub fn syn(src: IpAddr, dport: u16) -> FrameBuilder {
    segment(src, dport, tcp::SYN)
}

/// A TCP segment from `src` to port `dport` with header `flags` (see
/// [`tcp`]).
#[must_use]
pub fn segment(src: IpAddr, dport: u16, flags: u8) -> FrameBuilder {
    FrameBuilder::new(src, L4::Tcp { dport, flags })
}

impl FrameBuilder {
    /// A frame from `src` carrying `l4`.
    #[must_use]
    pub fn new(src: IpAddr, l4: L4) -> Self {
        let dst = match src {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        };
        FrameBuilder {
            src,
            dst,
            vlans: Vec::new(),
            v4_options: Vec::new(),
            v4_frag: (0, false),
            v6_ext: Vec::new(),
            l4,
            l4_len: None,
            payload: 0,
        }
    }

    /// Adds a VLAN tag (outermost first) with this TPID and VLAN id.
    #[must_use]
    pub fn vlan(mut self, tpid: u16, vid: u16) -> Self {
        self.vlans.push((tpid, vid));
        self
    }

    /// IPv4 options: `words` 4-byte words (at most 10).
    #[must_use]
    pub fn v4_options(mut self, words: usize) -> Self {
        assert!(words <= 10, "IPv4 has room for 40 bytes of options");
        // NOP NOP, then bytes reading as port 25: see `Ext::bytes`.
        self.v4_options = (0..words).flat_map(|_| [1, 1, 0, 25]).collect();
        self
    }

    /// Makes an IPv4 packet a fragment: offset in 8-octet units, M flag.
    #[must_use]
    pub fn v4_fragment(mut self, offset: u16, more: bool) -> Self {
        self.v4_frag = (offset, more);
        self
    }

    /// Appends an IPv6 extension header.
    #[must_use]
    pub fn ext(mut self, ext: Ext) -> Self {
        self.v6_ext.push(ext);
        self
    }

    /// Keeps only the first `n` bytes of the L4 header (a tiny fragment).
    #[must_use]
    pub fn l4_len(mut self, n: usize) -> Self {
        self.l4_len = Some(n);
        self
    }

    /// Appends `n` bytes of payload after the L4 header.
    #[must_use]
    pub fn payload(mut self, n: usize) -> Self {
        self.payload = n;
        self
    }

    /// Assembles the frame.
    #[must_use]
    pub fn build(&self) -> Frame {
        let mut b = Vec::with_capacity(128);
        let mut boundaries = Vec::new();
        b.extend([0x02, 0, 0, 0, 0, 0x01]); // destination MAC
        b.extend([0x02, 0, 0, 0, 0, 0x02]); // source MAC
        let ethertype = match self.src {
            IpAddr::V4(_) => ETH_P_IP,
            IpAddr::V6(_) => ETH_P_IPV6,
        };
        let outer = self.vlans.first().map_or(ethertype, |(tpid, _)| *tpid);
        b.extend(outer.to_be_bytes());
        boundaries.push(("ethernet", b.len()));
        for (i, (_, vid)) in self.vlans.iter().enumerate() {
            b.extend(vid.to_be_bytes());
            let next = self.vlans.get(i + 1).map_or(ethertype, |(tpid, _)| *tpid);
            b.extend(next.to_be_bytes());
            boundaries.push(("vlan tag", b.len()));
        }

        let l4 = self.l4_bytes();
        let l4_proto = match self.l4 {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp(_) => IPPROTO_UDP,
            L4::Icmp if self.src.is_ipv4() => IPPROTO_ICMP,
            L4::Icmp => IPPROTO_ICMPV6,
            L4::Esp => IPPROTO_ESP,
            L4::NoNext => IPPROTO_NONE,
        };
        let ip_end;
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let hlen = 20 + self.v4_options.len();
                let total = u16::try_from(hlen + l4.len()).expect("frame fits");
                let ihl = u8::try_from(hlen / 4).expect("IHL fits");
                let start = b.len();
                b.extend([0x40 | ihl, 0]);
                b.extend(total.to_be_bytes());
                b.extend(0x4242u16.to_be_bytes());
                let (off, more) = self.v4_frag;
                b.extend((off | if more { 0x2000 } else { 0 }).to_be_bytes());
                b.extend([64, l4_proto, 0, 0]);
                b.extend(s.octets());
                b.extend(d.octets());
                boundaries.push(("ipv4 header", b.len()));
                b.extend(&self.v4_options);
                if !self.v4_options.is_empty() {
                    boundaries.push(("ipv4 options", b.len()));
                }
                let sum = checksum(&b[start..]);
                b[start + 10..start + 12].copy_from_slice(&sum.to_be_bytes());
                ip_end = b.len();
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let ext: Vec<Vec<u8>> = self
                    .v6_ext
                    .iter()
                    .enumerate()
                    .map(|(i, e)| e.bytes(self.v6_ext.get(i + 1).map_or(l4_proto, |n| n.number())))
                    .collect();
                let plen = ext.iter().map(Vec::len).sum::<usize>() + l4.len();
                let first = self.v6_ext.first().map_or(l4_proto, |e| e.number());
                b.extend([0x60, 0, 0, 0]);
                b.extend(u16::try_from(plen).expect("frame fits").to_be_bytes());
                b.extend([first, 64]);
                b.extend(s.octets());
                b.extend(d.octets());
                boundaries.push(("ipv6 header", b.len()));
                ip_end = b.len();
                for e in ext {
                    b.extend(e);
                    boundaries.push(("ipv6 extension header", b.len()));
                }
            }
            _ => unreachable!("source and destination share a family"),
        }
        let ports_end = b.len() + l4.len().min(4);
        if l4.len() > 4 {
            boundaries.push(("tcp ports", ports_end));
        }
        let flags_end = match self.l4 {
            L4::Tcp { .. } => b.len() + l4.len().min(14),
            _ => b.len() + l4.len(),
        };
        if matches!(self.l4, L4::Tcp { .. }) && l4.len() > 14 {
            boundaries.push(("tcp flags", flags_end));
        }
        b.extend(&l4);
        let l4_end = b.len();
        if !l4.is_empty() {
            boundaries.push(("l4 header", l4_end));
        }
        b.extend((0..self.payload).map(|i| u8::try_from(i % 251).expect("below 251")));
        Frame {
            bytes: b,
            boundaries,
            ip_end,
            l4_end,
            ports_end,
            flags_end,
        }
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut l4 = match self.l4 {
            L4::Tcp { dport, flags } => {
                let mut t = Vec::with_capacity(20);
                t.extend(40000u16.to_be_bytes());
                t.extend(dport.to_be_bytes());
                t.extend(1u32.to_be_bytes()); // sequence
                                              // The acknowledgment number, meaningful only with ACK.
                let ack = if flags & tcp::ACK != 0 {
                    0x0100_0001u32
                } else {
                    0
                };
                t.extend(ack.to_be_bytes());
                t.extend([0x50, flags]); // data offset 5, the flags
                t.extend(64240u16.to_be_bytes()); // window
                t.extend([0, 0, 0, 0]); // checksum, urgent pointer
                t
            }
            L4::Udp(dport) => {
                let mut u = Vec::with_capacity(12);
                u.extend(40000u16.to_be_bytes());
                u.extend(dport.to_be_bytes());
                u.extend(12u16.to_be_bytes());
                u.extend([0, 0, b'p', b'i', b'n', b'g']);
                u
            }
            L4::Icmp => vec![
                if self.src.is_ipv4() { 8 } else { 128 },
                0,
                0,
                0,
                0,
                1,
                0,
                1,
            ],
            L4::Esp => {
                let mut e = Vec::with_capacity(16);
                e.extend(0x0000_1000u32.to_be_bytes());
                e.extend(1u32.to_be_bytes());
                e.extend([0; 8]);
                e
            }
            L4::NoNext => Vec::new(),
        };
        if let Some(n) = self.l4_len {
            l4.truncate(n);
        }
        l4
    }
}

/// An ARP request from `sender`, optionally VLAN-tagged.
#[must_use]
pub fn arp(sender: Ipv4Addr, vlan: Option<u16>) -> Vec<u8> {
    let mut b = Vec::with_capacity(46);
    b.extend([0xff; 6]);
    b.extend([0x02, 0, 0, 0, 0, 0x02]);
    if let Some(vid) = vlan {
        b.extend(TPID_8021Q.to_be_bytes());
        b.extend(vid.to_be_bytes());
    }
    b.extend(ETH_P_ARP.to_be_bytes());
    b.extend([0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    b.extend([0x02, 0, 0, 0, 0, 0x02]);
    b.extend(sender.octets());
    b.extend([0; 6]);
    b.extend([192, 0, 2, 1]);
    b
}

/// A frame of another Ethernet type with `len` bytes of payload.
#[must_use]
pub fn ethertype(ethertype: u16, len: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(14 + len);
    b.extend([0x01, 0x80, 0xc2, 0, 0, 0x0e]);
    b.extend([0x02, 0, 0, 0, 0, 0x02]);
    b.extend(ethertype.to_be_bytes());
    b.extend(std::iter::repeat_n(0xa5, len));
    b
}

/// The Internet checksum of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded to 16 bits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let f = syn("203.0.113.7".parse().unwrap(), 25)
            .v4_options(2)
            .build();
        let ip = &f.bytes[14..f.ip_end];
        assert_eq!(checksum(ip), 0, "a correct header sums to zero");
        assert_eq!(f.ip_end, 14 + 28);
        assert_eq!(f.l4_end, f.ip_end + 20);
    }

    #[test]
    fn qinq_tags_chain_their_ethertypes() {
        let f = syn("2001:db8::7".parse().unwrap(), 25)
            .vlan(TPID_8021AD, 100)
            .vlan(TPID_8021Q, 200)
            .build();
        assert_eq!(&f.bytes[12..14], &TPID_8021AD.to_be_bytes());
        assert_eq!(&f.bytes[16..18], &TPID_8021Q.to_be_bytes());
        assert_eq!(&f.bytes[20..22], &ETH_P_IPV6.to_be_bytes());
        assert_eq!(f.ip_end, 22 + 40);
    }

    #[test]
    fn extension_headers_chain_and_have_their_lengths() {
        let f = syn("2001:db8::7".parse().unwrap(), 25)
            .ext(Ext::HopByHop { len8: 1 })
            .ext(Ext::Ah { len4: 4 })
            .ext(Ext::Fragment {
                offset: 0,
                more: true,
            })
            .build();
        assert_eq!(f.bytes[14 + 6], 0, "first next header is hop-by-hop");
        let hbh = 54;
        assert_eq!(f.bytes[hbh], 51);
        let ah = hbh + 16;
        assert_eq!(f.bytes[ah], 44);
        let frag = ah + 24;
        assert_eq!(f.bytes[frag], 6);
        assert_eq!(f.l4_end, frag + 8 + 20);
    }

    #[test]
    fn tcp_flags_sit_in_header_byte_13() {
        let f = segment("203.0.113.7".parse().unwrap(), 25, tcp::ACK | tcp::FIN).build();
        assert_eq!(f.bytes[f.ip_end + 13], 0x11);
        assert_eq!(f.flags_end, f.ip_end + 14);
        assert_eq!(&f.bytes[f.ip_end + 8..f.ip_end + 12], &[1, 0, 0, 1]);
        let s = syn("2001:db8::7".parse().unwrap(), 25).build();
        assert_eq!(s.bytes[s.ip_end + 13], tcp::SYN);
        assert_eq!(
            &s.bytes[s.ip_end + 8..s.ip_end + 12],
            &[0; 4],
            "no ACK number"
        );
    }
}
