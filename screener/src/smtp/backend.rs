//! Talking to the real MTA: the PROXY header that tells it who the client
//! is, reading its replies, learning its EHLO keywords, and carrying out a
//! hand-off [`Plan`] before splicing the two connections.
//!
//! Of what a client sent before it was let through, the backend gets only
//! the HELO/EHLO, MAIL and RCPT lines the dummy engine accepted (replay),
//! or, when the client went straight from the greeting to the backend,
//! the whole lines it sent before it was greeted (kept, not judged).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use super::session::Plan;

pub use crate::config::ProxyVersion;
use crate::proxy;

/// Why the backend could not take a client.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Connect, write or read failed.
    #[error("backend {backend}: {call}: {source}")]
    Io {
        /// The backend address.
        backend: SocketAddr,
        /// What was being done.
        call: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The backend did not answer in time.
    #[error("backend {backend}: timeout during {call}")]
    Timeout {
        /// The backend address.
        backend: SocketAddr,
        /// What was being done.
        call: &'static str,
    },
    /// The backend's answer was not SMTP.
    #[error("backend {backend}: malformed reply during {call}")]
    Malformed {
        /// The backend address.
        backend: SocketAddr,
        /// What was being done.
        call: &'static str,
    },
    /// The backend refused the session (non-2xx greeting).
    #[error("backend {backend}: greeting refused: {reply}")]
    Refused {
        /// The backend address.
        backend: SocketAddr,
        /// Its reply, escaped.
        reply: String,
    },
}

/// Builds the PROXY header announcing `client` connected to `server`
/// (nothing for `none`).
pub fn proxy_header(version: ProxyVersion, client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    match version {
        ProxyVersion::None => Vec::new(),
        ProxyVersion::V1 => proxy::encode(proxy::Version::V1, client, server),
        ProxyVersion::V2 => proxy::encode(proxy::Version::V2, client, server),
    }
}

/// How to reach the backend.
#[derive(Clone, Debug)]
pub struct Backend {
    /// The real MTA.
    pub addr: SocketAddr,
    /// Header announcing the real client.
    pub proxy: ProxyVersion,
    /// Connect plus greeting, and each replayed command's reply.
    pub timeout: Duration,
}

/// An open backend connection past its greeting.
pub struct Conn {
    /// The socket.
    pub stream: TcpStream,
    /// Bytes read past the last reply (a backend never sends those
    /// unprompted, but they are kept rather than lost).
    pub extra: Vec<u8>,
    /// The backend's greeting, all lines.
    pub greeting: Vec<u8>,
    backend: SocketAddr,
    timeout: Duration,
}

/// Longest backend reply we accept; an EHLO reply is well under 1 KB.
const REPLY_MAX: usize = 64 * 1024;

impl Backend {
    /// Connects, sends the PROXY header and reads the greeting.
    pub async fn connect(
        &self,
        client: SocketAddr,
        server: SocketAddr,
    ) -> Result<Conn, BackendError> {
        let deadline = Instant::now() + self.timeout;
        let backend = self.addr;
        let mut stream = timeout_at(deadline, TcpStream::connect(backend))
            .await
            .map_err(|_| BackendError::Timeout {
                backend,
                call: "connect",
            })?
            .map_err(|source| BackendError::Io {
                backend,
                call: "connect",
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let header = proxy_header(self.proxy, client, server);
        if !header.is_empty() {
            stream
                .write_all(&header)
                .await
                .map_err(|source| BackendError::Io {
                    backend,
                    call: "PROXY header",
                    source,
                })?;
        }
        let mut conn = Conn {
            stream,
            extra: Vec::new(),
            greeting: Vec::new(),
            backend,
            timeout: self.timeout,
        };
        let greeting = conn.reply_by("greeting", deadline).await?;
        if !greeting.starts_with(b"2") {
            return Err(BackendError::Refused {
                backend,
                reply: super::text::escape(&greeting),
            });
        }
        conn.greeting = greeting;
        Ok(conn)
    }

    /// Learns the backend's EHLO keywords with a short session of our own,
    /// announced as coming from the screener itself.
    pub async fn probe_keywords(&self, hostname: &str) -> Result<Vec<String>, BackendError> {
        let backend = self.addr;
        let local: SocketAddr = if backend.is_ipv4() {
            (std::net::Ipv4Addr::LOCALHOST, 0).into()
        } else {
            (std::net::Ipv6Addr::LOCALHOST, 0).into()
        };
        let mut conn = self.connect(local, backend).await?;
        let reply = conn
            .command(format!("EHLO {hostname}").as_bytes(), "EHLO")
            .await?;
        let _ = conn.command(b"QUIT", "QUIT").await;
        if !reply.starts_with(b"250") {
            return Err(BackendError::Malformed {
                backend,
                call: "EHLO",
            });
        }
        Ok(keywords(&reply))
    }
}

/// The EHLO keywords the dummy engine may announce: the backend's, minus
/// PIPELINING (the pipelining test needs it unannounced) and minus those
/// that need state the dummy engine does not keep (AUTH, XCLIENT, ETRN...).
pub fn keywords(ehlo_reply: &[u8]) -> Vec<String> {
    ehlo_reply
        .split(|&b| b == b'\n')
        .skip(1)
        .filter(|l| l.len() > 4)
        .filter_map(|l| std::str::from_utf8(&l[4..]).ok())
        .map(|l| l.trim_end_matches('\r').trim().to_owned())
        .filter(|kw| {
            let name = kw
                .split([' ', '='])
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            !name.is_empty()
                && !name.starts_with('X')
                && !matches!(
                    name.as_str(),
                    "PIPELINING" | "AUTH" | "ETRN" | "ATRN" | "TURN"
                )
        })
        .collect()
}

/// Whether `buf` holds a complete reply: its last line has a space (or
/// nothing) after the code. Returns the reply's length.
fn complete_reply(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
        let line = &buf[start..start + nl];
        start += nl + 1;
        if line.len() < 4 || line[3] != b'-' {
            return Some(start);
        }
    }
    None
}

impl Conn {
    async fn reply_by(
        &mut self,
        call: &'static str,
        deadline: Instant,
    ) -> Result<Vec<u8>, BackendError> {
        let backend = self.backend;
        let mut buf = std::mem::take(&mut self.extra);
        loop {
            if let Some(n) = complete_reply(&buf) {
                self.extra = buf.split_off(n);
                if buf.len() < 4 || !buf[..3].iter().all(u8::is_ascii_digit) {
                    return Err(BackendError::Malformed { backend, call });
                }
                return Ok(buf);
            }
            if buf.len() > REPLY_MAX {
                return Err(BackendError::Malformed { backend, call });
            }
            let mut chunk = [0u8; 2048];
            let n = timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .map_err(|_| BackendError::Timeout { backend, call })?
                .map_err(|source| BackendError::Io {
                    backend,
                    call,
                    source,
                })?;
            if n == 0 {
                return Err(BackendError::Io {
                    backend,
                    call,
                    source: io::ErrorKind::UnexpectedEof.into(),
                });
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends one command line and reads the reply.
    pub async fn command(
        &mut self,
        line: &[u8],
        call: &'static str,
    ) -> Result<Vec<u8>, BackendError> {
        let backend = self.backend;
        let mut out = line.to_vec();
        out.extend_from_slice(b"\r\n");
        self.stream
            .write_all(&out)
            .await
            .map_err(|source| BackendError::Io {
                backend,
                call,
                source,
            })?;
        self.reply_by(call, Instant::now() + self.timeout).await
    }

    /// Carries out a hand-off plan up to the point where the two sides can
    /// be spliced; returns the bytes to write to the client first.
    pub async fn prepare(&mut self, plan: &Plan) -> Result<Vec<u8>, BackendError> {
        match plan {
            Plan::Greeting { .. } => Ok(self.greeting.clone()),
            Plan::Replay {
                helo, mail, rcpt, ..
            } => {
                let r = self.command(helo, "replayed HELO").await?;
                if !r.starts_with(b"2") {
                    return Ok(r);
                }
                let r = self.command(mail, "replayed MAIL").await?;
                if !r.starts_with(b"2") {
                    // The client thinks its MAIL was taken; the backend's
                    // refusal answers its RCPT instead, which a client
                    // handles like any rejected recipient.
                    return Ok(r);
                }
                self.command(rcpt, "replayed RCPT").await
            }
            Plan::StartTls { ehlo, starttls } => {
                let r = self.command(ehlo, "replayed EHLO").await?;
                if !r.starts_with(b"2") {
                    return Ok(b"454 4.7.0 TLS not available due to local problem\r\n".to_vec());
                }
                self.command(starttls, "STARTTLS").await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_versions() {
        let c: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let s: SocketAddr = "198.51.100.1:25".parse().unwrap();
        assert!(proxy_header(ProxyVersion::None, c, s).is_empty());
        assert!(proxy_header(ProxyVersion::V1, c, s).starts_with(b"PROXY TCP4 192.0.2.7 "));
        assert!(proxy_header(ProxyVersion::V2, c, s).starts_with(b"\r\n\r\n\0\r\nQUIT\n"));
    }

    #[test]
    fn keyword_filter() {
        let reply = b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-AUTH PLAIN\r\n250-XCLIENT NAME\r\n250-ETRN\r\n250-STARTTLS\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n";
        assert_eq!(
            keywords(reply),
            ["SIZE 10240000", "STARTTLS", "8BITMIME", "SMTPUTF8"]
        );
    }

    #[test]
    fn reply_framing() {
        assert_eq!(complete_reply(b"250-a\r\n250-b\r\n"), None);
        assert_eq!(complete_reply(b"250-a\r\n250 b\r\nxx"), Some(14));
        assert_eq!(complete_reply(b"220 hi\r\n"), Some(8));
        assert_eq!(complete_reply(b"220 hi"), None);
    }
}
