//! The PROXY protocol header (v1 or v2) a load balancer in front of the
//! screener sends, so the screener screens the real client.
//!
//! The header must arrive whole within the timeout; anything read past it
//! is returned, because a bot that pregreets right behind the header has
//! already failed the pregreet test.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// What the header said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The real client; `None` for `UNKNOWN` / `LOCAL` (use the peer).
    pub client: Option<SocketAddr>,
    /// The address the client connected to.
    pub server: Option<SocketAddr>,
    /// Bytes read past the header.
    pub rest: Vec<u8>,
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpstreamError {
    /// Not a PROXY header at all.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// A PROXY header we cannot parse.
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    /// Incomplete when the timeout ran out.
    #[error("timeout waiting for the PROXY header")]
    Timeout,
    /// The connection failed or closed first.
    #[error("connection closed before the PROXY header ended")]
    Closed,
}

/// Reads one header from `stream` within `limit`.
pub async fn read(stream: &mut TcpStream, limit: Duration) -> Result<Header, UpstreamError> {
    let deadline = Instant::now() + limit;
    let mut buf = Vec::with_capacity(256);
    loop {
        match parse(&buf) {
            Ok(Some((mut h, used))) => {
                h.rest = buf.split_off(used);
                return Ok(h);
            }
            Ok(None) => {}
            Err(e) => return Err(e),
        }
        let mut chunk = [0u8; 256];
        let n = timeout_at(deadline, stream.read(&mut chunk))
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(|_| UpstreamError::Closed)?;
        if n == 0 {
            return Err(UpstreamError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Parses a header at the start of `buf`: `Ok(None)` when more bytes are
/// needed, else the header and its length.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, UpstreamError> {
    let n = buf.len().min(V2_SIG.len());
    if buf[..n] == V2_SIG[..n] {
        return if n < V2_SIG.len() {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(6);
    if buf[..n] != b"PROXY "[..n] {
        return Err(UpstreamError::NotProxy);
    }
    parse_v1(buf)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, UpstreamError> {
    // 107 bytes is the longest v1 line the specification allows.
    let Some(end) = buf.iter().take(107).position(|&b| b == b'\n') else {
        return if buf.len() >= 107 {
            Err(UpstreamError::Malformed("v1 line too long"))
        } else {
            Ok(None)
        };
    };
    if end == 0 || buf[end - 1] != b'\r' {
        return Err(UpstreamError::Malformed("v1 line without CRLF"));
    }
    let line = std::str::from_utf8(&buf[..end - 1])
        .map_err(|_| UpstreamError::Malformed("v1 not text"))?;
    let f: Vec<&str> = line.split(' ').collect();
    let h = match f.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Header {
            client: None,
            server: None,
            rest: Vec::new(),
        },
        ["PROXY", fam @ ("TCP4" | "TCP6"), src, dst, sp, dp] => {
            let ip = |s: &str| -> Result<IpAddr, UpstreamError> {
                let ip: IpAddr = s
                    .parse()
                    .map_err(|_| UpstreamError::Malformed("v1 address"))?;
                if ip.is_ipv4() == (*fam == "TCP4") {
                    Ok(ip)
                } else {
                    Err(UpstreamError::Malformed("v1 address family"))
                }
            };
            let port = |s: &str| {
                s.parse::<u16>()
                    .map_err(|_| UpstreamError::Malformed("v1 port"))
            };
            Header {
                client: Some(SocketAddr::new(ip(src)?, port(sp)?)),
                server: Some(SocketAddr::new(ip(dst)?, port(dp)?)),
                rest: Vec::new(),
            }
        }
        _ => return Err(UpstreamError::Malformed("v1 fields")),
    };
    Ok(Some((h, end + 1)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, UpstreamError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(UpstreamError::Malformed("v2 version"));
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = 16 + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[16..total];
    let none = Header {
        client: None,
        server: None,
        rest: Vec::new(),
    };
    let h = match (ver_cmd & 0x0f, buf[13]) {
        // LOCAL (the balancer's own health check) and UDP, Unix sockets or
        // unspecified families: no TCP client address, keep the peer's.
        (0, _) | (1, 0x00 | 0x12 | 0x22 | 0x31 | 0x32) => none,
        (1, 0x11) if body.len() >= 12 => {
            let a = |i: usize| Ipv4Addr::new(body[i], body[i + 1], body[i + 2], body[i + 3]);
            let p = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
            Header {
                client: Some(SocketAddr::new(a(0).into(), p(8))),
                server: Some(SocketAddr::new(a(4).into(), p(10))),
                rest: Vec::new(),
            }
        }
        (1, 0x21) if body.len() >= 36 => {
            let a = |i: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&body[i..i + 16]);
                Ipv6Addr::from(o)
            };
            let p = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
            Header {
                client: Some(SocketAddr::new(a(0).into(), p(32))),
                server: Some(SocketAddr::new(a(16).into(), p(34))),
                rest: Vec::new(),
            }
        }
        (1, 0x11 | 0x21) => return Err(UpstreamError::Malformed("v2 address block too short")),
        (1, _) => return Err(UpstreamError::Malformed("v2 address family")),
        _ => return Err(UpstreamError::Malformed("v2 command")),
    };
    Ok(Some((h, total)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxyVersion;
    use crate::smtp::backend::proxy_header;
    use proptest::prelude::*;

    #[test]
    fn round_trip_with_our_encoder() {
        let c: SocketAddr = "203.0.113.9:5555".parse().unwrap();
        let s: SocketAddr = "198.51.100.2:25".parse().unwrap();
        for v in [ProxyVersion::V1, ProxyVersion::V2] {
            let mut bytes = proxy_header(v, c, s);
            let len = bytes.len();
            bytes.extend_from_slice(b"EHLO x\r\n");
            let (h, used) = parse(&bytes).unwrap().unwrap();
            assert_eq!(used, len);
            assert_eq!(h.client, Some(c));
            assert_eq!(h.server, Some(s));
            // Every proper prefix asks for more.
            for cut in 0..len {
                assert_eq!(parse(&bytes[..cut]).unwrap(), None, "{v:?} cut {cut}");
            }
        }
    }

    #[test]
    fn refusals() {
        assert_eq!(parse(b"EHLO x\r\n"), Err(UpstreamError::NotProxy));
        assert!(parse(b"PROXY TCP4 1.2.3 4.5.6.7 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n").is_err());
        assert!(parse(&[b'P', b'R', b'O', b'X', b'Y', b' ', b'A'].repeat(20)).is_err());
        let (h, _) = parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap();
        assert_eq!(h.client, None);
    }

    proptest! {
        #[test]
        fn any_bytes_no_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
            let mut v2 = V2_SIG.to_vec();
            v2.extend_from_slice(&bytes);
            let _ = parse(&v2);
        }
    }
}
