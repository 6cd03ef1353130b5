//! How clients and client-sent text appear in the logs.

use std::fmt;
use std::net::SocketAddr;

/// A socket address the way postscreen logs it: `[addr]:port`, for IPv4
/// and IPv6 alike, so existing log tooling keeps matching.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]:{}", self.0.ip(), self.0.port())
    }
}

/// Longest stretch of client text a log line carries.
pub const LOG_TEXT_MAX: usize = 100;

/// Client text made safe for a log line: cut to 100 bytes, printable ASCII
/// kept, everything else (CR, LF, controls, 8-bit) escaped, so a client can
/// neither forge log lines nor flood them.
pub fn escape(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(LOG_TEXT_MAX)];
    let mut out = String::with_capacity(cut.len());
    for &b in cut {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                use fmt::Write as _;
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_formats_both_families() {
        assert_eq!(
            Peer("192.0.2.1:25".parse().unwrap()).to_string(),
            "[192.0.2.1]:25"
        );
        assert_eq!(
            Peer("[2001:db8::1]:2525".parse().unwrap()).to_string(),
            "[2001:db8::1]:2525"
        );
    }

    #[test]
    fn escape_cuts_and_escapes() {
        assert_eq!(escape(b"GET / HTTP/1.0\r\n"), "GET / HTTP/1.0\\r\\n");
        assert_eq!(escape(&[0x16, 0x03, 0x01]), "\\x16\\x03\\x01");
        assert_eq!(escape(&[b'a'; 300]).len(), 100);
    }
}
