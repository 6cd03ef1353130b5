//! The PROXY protocol of `HAProxy`, versions 1 and 2.
//!
//! The header carries the original client and server addresses across a
//! proxy: screener writes one to the backend MTA (config
//! `smtp.backend_proxy_protocol`) so Postfix logs and checks the real client,
//! and reads one when it sits behind a load balancer
//! (`smtp.upstream_proxy_protocol = "haproxy"`).
//!
//! [`encode`] and [`parse`] are pure; [`read_header`] reads exactly one header
//! from a stream and never a byte of what follows, so the SMTP session that
//! follows starts at its first byte.
//!
//! # Strictness
//!
//! On input both versions are accepted, told apart by their first bytes.
//! Version 1 lines are checked field by field (single spaces, the address
//! family the protocol names, decimal ports without leading zeros, at most
//! 107 bytes with CRLF). Version 2 TLVs are skipped, but each must fit in the
//! header. Anything else is an error: a peer that does not speak the
//! protocol must not get its bytes taken as addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// Text: `PROXY TCP4 192.0.2.1 198.51.100.1 56324 25\r\n`.
    V1,
    /// Binary, with a 12-byte signature and a length field.
    V2,
}

/// The addresses a PROXY header carries; None for v2 LOCAL / v1 UNKNOWN
/// (use the socket's own addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// `(client, server)`: the connection's source and the address it
    /// reached.
    pub source: Option<(SocketAddr, SocketAddr)>,
}

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    /// The first bytes are neither a v1 nor a v2 header.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// No CRLF within the 107 bytes a v1 line may take.
    #[error("PROXY v1 header too long")]
    V1TooLong,
    /// A v1 line that breaks the grammar.
    #[error("malformed PROXY v1 header: {0}")]
    V1Malformed(&'static str),
    /// The input starts like a v2 header but the 12-byte signature differs.
    #[error("bad v2 signature")]
    V2BadSignature,
    /// The v2 version nibble is not 2.
    #[error("unsupported PROXY v2 version {0}")]
    V2Version(u8),
    /// The v2 command is neither LOCAL nor PROXY.
    #[error("unsupported PROXY v2 command {0}")]
    V2Command(u8),
    /// A v2 PROXY header for something other than TCP over IPv4/IPv6 or
    /// UNSPEC (UNIX sockets, UDP, unknown values).
    #[error("unsupported PROXY v2 address family/protocol {0:#04x}")]
    V2Unsupported(u8),
    /// The v2 length field is shorter than the address block needs.
    #[error("PROXY v2 address block too short: {len} bytes, need {need}")]
    V2TooShort {
        /// The header's length field.
        len: usize,
        /// What the address family needs.
        need: usize,
    },
    /// A v2 TLV runs past the end of the header.
    #[error("PROXY v2 TLV runs past the end of the header")]
    V2BadTlv,
    /// The header did not arrive in time.
    #[error("timed out waiting for the PROXY header")]
    Timeout,
    /// The peer closed the connection mid-header.
    #[error("connection closed before the PROXY header was complete")]
    Closed,
    /// Reading failed.
    #[error("reading the PROXY header failed: {message}")]
    Io {
        /// The error's kind, for callers that tell resets from the rest.
        kind: std::io::ErrorKind,
        /// The error's text.
        message: String,
    },
}

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED: usize = 16;
const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest v1 line, CRLF included (the protocol's limit).
const V1_MAX: usize = 107;
/// Shortest v1 line: `PROXY UNKNOWN\r\n`.
const V1_MIN: usize = 15;

const V2_CMD_LOCAL: u8 = 0x0;
const V2_CMD_PROXY: u8 = 0x1;
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;
const V2_ADDR_LEN4: usize = 12;
const V2_ADDR_LEN6: usize = 36;

/// Encodes a header for a TCP connection from `client` to `server`.
///
/// V4-mapped IPv6 addresses (what a dual-stack listener reports for IPv4
/// clients) are written as IPv4 first. If the two addresses are then of
/// different families, the IPv4 one is written v4-mapped and the header is
/// IPv6 (`TCP6` / `AF_INET6`) in both versions, since a header has one
/// family. v2 headers carry no TLVs.
pub fn encode(version: Version, client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let (c, s) = (client.ip().to_canonical(), server.ip().to_canonical());
    let (c, s) = match (c, s) {
        (IpAddr::V4(c), IpAddr::V4(s)) => (IpAddr::V4(c), IpAddr::V4(s)),
        (c, s) => (IpAddr::V6(to_v6(c)), IpAddr::V6(to_v6(s))),
    };
    match version {
        Version::V1 => {
            let proto = if c.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {proto} {c} {s} {} {}\r\n",
                client.port(),
                server.port()
            )
            .into_bytes()
        }
        Version::V2 => {
            let mut out = Vec::with_capacity(V2_FIXED + V2_ADDR_LEN6);
            out.extend_from_slice(&V2_SIGNATURE);
            out.push(0x20 | V2_CMD_PROXY);
            match (c, s) {
                (IpAddr::V4(c), IpAddr::V4(s)) => {
                    out.push(V2_TCP4);
                    out.extend_from_slice(&u16_len(V2_ADDR_LEN4));
                    out.extend_from_slice(&c.octets());
                    out.extend_from_slice(&s.octets());
                }
                (c, s) => {
                    out.push(V2_TCP6);
                    out.extend_from_slice(&u16_len(V2_ADDR_LEN6));
                    out.extend_from_slice(&to_v6(c).octets());
                    out.extend_from_slice(&to_v6(s).octets());
                }
            }
            out.extend_from_slice(&client.port().to_be_bytes());
            out.extend_from_slice(&server.port().to_be_bytes());
            out
        }
    }
}

/// Encodes a header that carries no addresses (v1 `UNKNOWN`, v2 `LOCAL`),
/// for connections the proxy makes on its own behalf, such as health checks.
pub fn encode_local(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        Version::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            out.extend_from_slice(&[0x20 | V2_CMD_LOCAL, 0x00, 0x00, 0x00]);
            out
        }
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

fn u16_len(n: usize) -> [u8; 2] {
    u16::try_from(n)
        .expect("address block lengths are constants below 64 KiB")
        .to_be_bytes()
}

/// Parses a header at the start of `buf`. Ok(None) = need more bytes;
/// Ok(Some((header, consumed))).
///
/// Errors are reported as soon as the bytes seen rule out a valid header,
/// so a peer that does not speak the protocol is refused without waiting
/// for more input.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    match buf.first() {
        None => Ok(None),
        Some(b'\r') => parse_v2(buf),
        Some(b'P') => parse_v1(buf),
        Some(_) => Err(ProxyError::NotProxy),
    }
}

/// True if `buf` is a prefix of `full` or starts with it.
fn agrees_with(buf: &[u8], full: &[u8]) -> bool {
    let n = buf.len().min(full.len());
    buf[..n] == full[..n]
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    if !agrees_with(buf, V1_PREFIX) {
        return Err(ProxyError::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() >= V1_MAX {
            return Err(ProxyError::V1TooLong);
        }
        // Refuse early what can never become a valid line.
        let body = window.strip_suffix(b"\r").unwrap_or(window);
        check_printable(body)?;
        return Ok(None);
    };
    let line = window[..lf]
        .strip_suffix(b"\r")
        .ok_or(ProxyError::V1Malformed("line ends in a bare LF"))?;
    check_printable(line)?;
    let header = parse_v1_line(&line[V1_PREFIX.len()..])?;
    Ok(Some((header, lf + 1)))
}

fn check_printable(bytes: &[u8]) -> Result<(), ProxyError> {
    if bytes.iter().all(|b| (0x20..0x7f).contains(b)) {
        Ok(())
    } else {
        Err(ProxyError::V1Malformed("control or non-ASCII byte"))
    }
}

/// Parses what follows `PROXY ` (printable ASCII, CRLF removed).
fn parse_v1_line(rest: &[u8]) -> Result<Header, ProxyError> {
    // check_printable ran first, so this is ASCII.
    let rest = std::str::from_utf8(rest).map_err(|_| ProxyError::V1Malformed("not ASCII"))?;
    let mut fields = rest.split(' ');
    let proto = fields.next().unwrap_or_default();
    let v6 = match proto {
        // The protocol lets the sender put anything after UNKNOWN.
        "UNKNOWN" => return Ok(Header { source: None }),
        "TCP4" => false,
        "TCP6" => true,
        _ => {
            return Err(ProxyError::V1Malformed(
                "protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ProxyError::V1Malformed(
            "want four fields after the protocol, separated by single spaces",
        ));
    };
    let addr = |s: &str| -> Result<IpAddr, ProxyError> {
        if v6 {
            s.parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| ProxyError::V1Malformed("bad TCP6 address"))
        } else {
            s.parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| ProxyError::V1Malformed("bad TCP4 address"))
        }
    };
    let client = SocketAddr::new(addr(src)?, v1_port(sport)?);
    let server = SocketAddr::new(addr(dst)?, v1_port(dport)?);
    Ok(Header {
        source: Some((client, server)),
    })
}

fn v1_port(s: &str) -> Result<u16, ProxyError> {
    let bad = ProxyError::V1Malformed("bad port");
    let digits_only = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || (s.len() > 1 && s.starts_with('0')) {
        return Err(bad);
    }
    s.parse().map_err(|_| bad)
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, ProxyError> {
    if !agrees_with(buf, &V2_SIGNATURE) {
        return Err(ProxyError::V2BadSignature);
    }
    if let Some(&ver_cmd) = buf.get(12) {
        let version = ver_cmd >> 4;
        if version != 2 {
            return Err(ProxyError::V2Version(version));
        }
        let cmd = ver_cmd & 0x0f;
        if cmd != V2_CMD_LOCAL && cmd != V2_CMD_PROXY {
            return Err(ProxyError::V2Command(cmd));
        }
    }
    if buf.len() < V2_FIXED {
        return Ok(None);
    }
    let cmd = buf[12] & 0x0f;
    let fam = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = V2_FIXED + len;

    // Judge the fixed part before waiting for the body, so a bad header is
    // refused without reading up to 64 KiB of it.
    let need = match (cmd, fam) {
        // LOCAL: the family byte is to be ignored.
        (V2_CMD_LOCAL, _) => None,
        (_, V2_TCP4) => Some(V2_ADDR_LEN4),
        (_, V2_TCP6) => Some(V2_ADDR_LEN6),
        // AF_UNSPEC: addresses unknown, use the connection's own.
        (_, f) if f >> 4 == 0 => None,
        (_, f) => return Err(ProxyError::V2Unsupported(f)),
    };
    if let Some(need) = need {
        if len < need {
            return Err(ProxyError::V2TooShort { len, need });
        }
    }
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[V2_FIXED..total];
    let Some(need) = need else {
        return Ok(Some((Header { source: None }, total)));
    };
    let (addrs, tlvs) = body.split_at(need);
    check_tlvs(tlvs)?;
    let source = if need == V2_ADDR_LEN4 {
        let ip = |o: usize| {
            IpAddr::V4(Ipv4Addr::new(
                addrs[o],
                addrs[o + 1],
                addrs[o + 2],
                addrs[o + 3],
            ))
        };
        let port = |o: usize| u16::from_be_bytes([addrs[o], addrs[o + 1]]);
        (
            SocketAddr::new(ip(0), port(8)),
            SocketAddr::new(ip(4), port(10)),
        )
    } else {
        let ip = |o: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&addrs[o..o + 16]);
            IpAddr::V6(Ipv6Addr::from(a))
        };
        let port = |o: usize| u16::from_be_bytes([addrs[o], addrs[o + 1]]);
        (
            SocketAddr::new(ip(0), port(32)),
            SocketAddr::new(ip(16), port(34)),
        )
    };
    Ok(Some((
        Header {
            source: Some(source),
        },
        total,
    )))
}

/// Walks the TLVs (type, 16-bit length, value) without interpreting them.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), ProxyError> {
    while !tlvs.is_empty() {
        let [_ty, hi, lo, rest @ ..] = tlvs else {
            return Err(ProxyError::V2BadTlv);
        };
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        tlvs = rest.get(len..).ok_or(ProxyError::V2BadTlv)?;
    }
    Ok(())
}

/// How many bytes can be read next without passing the header's end, given
/// what has arrived (which `parse` found incomplete but valid so far).
fn safe_read_len(buf: &[u8]) -> usize {
    match buf.first() {
        None => V1_MIN,
        Some(b'\r') if buf.len() < V2_FIXED => V2_FIXED - buf.len(),
        Some(b'\r') => V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]])) - buf.len(),
        _ if buf.len() < V1_MIN => V1_MIN - buf.len(),
        // No LF yet: if the last byte is CR only the LF may follow,
        // otherwise the CRLF is at the earliest in the next two bytes.
        _ if buf.last() == Some(&b'\r') => 1,
        _ => 2,
    }
}

/// Reads exactly one header from `r` (never reads past its end: v1 must be
/// read so no byte after CRLF is consumed, v2 by its length field), with a
/// deadline.
///
/// `timeout` bounds the whole header, not each read, so a peer trickling
/// bytes cannot hold the connection longer.
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> Result<Header, ProxyError> {
    tokio::time::timeout(timeout, read_header_inner(r))
        .await
        .map_err(|_| ProxyError::Timeout)?
}

async fn read_header_inner<R: AsyncRead + Unpin>(r: &mut R) -> Result<Header, ProxyError> {
    let mut buf = Vec::with_capacity(V1_MAX);
    loop {
        let start = buf.len();
        buf.resize(start + safe_read_len(&buf), 0);
        let n = r
            .read(&mut buf[start..])
            .await
            .map_err(|e| ProxyError::Io {
                kind: e.kind(),
                message: e.to_string(),
            })?;
        buf.truncate(start + n);
        if n == 0 {
            return Err(ProxyError::Closed);
        }
        if let Some((header, used)) = parse(&buf)? {
            debug_assert_eq!(used, buf.len(), "read past the header");
            return Ok(header);
        }
    }
}

#[cfg(test)]
mod tests;
