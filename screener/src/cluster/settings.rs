//! The `[cluster]` section: which Redis, who we are, what we share.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a node shares with the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Share {
    /// Blocks and unblocks, with their offence counts.
    Blocks,
    /// Passed tests, so a sender screened anywhere is `PASS OLD` everywhere.
    Passes,
}

/// `[cluster]`: present means this node is one of a fleet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// `redis://[user:pass@]host:port/db`. At start the first URL that
    /// answers is used for commands (then reconnected to by itself); the
    /// stream reader tries them in turn at every reconnect.
    pub redis: Vec<String>,
    /// This node's name in the stream and in `block list`; the host name
    /// when empty.
    pub node: String,
    /// Key prefix, so several fleets can share one Redis.
    pub prefix: String,
    /// What this node publishes and applies.
    pub share: Vec<Share>,
    /// The longest a connection waits for Redis on a local cache miss:
    /// a slow Redis must never delay a client more than this.
    #[serde(with = "crate::duration::serde_str")]
    pub pass_timeout: Duration,
    /// Verdicts kept for Redis while it is unreachable; past this the
    /// oldest are dropped and counted (the kernel has them anyway).
    pub queue: usize,
    /// Approximate length the verdict stream is trimmed to; a node that
    /// falls further behind resynchronises from the snapshot keys.
    pub stream_length: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            redis: Vec::new(),
            node: String::new(),
            prefix: "screener".into(),
            share: vec![Share::Blocks, Share::Passes],
            pass_timeout: Duration::from_millis(50),
            queue: 100_000,
            stream_length: 100_000,
        }
    }
}

impl Settings {
    /// Whether `what` is shared.
    pub fn shares(&self, what: Share) -> bool {
        self.share.contains(&what)
    }

    /// The node name: configured, else the host name.
    pub fn node_name(&self) -> String {
        if self.node.is_empty() {
            hostname()
        } else {
            self.node.clone()
        }
    }

    /// Whether this node is part of a fleet: `cluster.redis` names a
    /// server. Without one the daemon behaves exactly as a single host.
    pub fn enabled(&self) -> bool {
        !self.redis.is_empty()
    }

    /// Checks what serde cannot: `Err((key, value, reason))` names the
    /// first bad key. Nothing is checked while the cluster is off.
    pub fn check(&self) -> Result<(), (&'static str, String, String)> {
        if !self.enabled() {
            return Ok(());
        }
        for url in &self.redis {
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(|e| ("cluster.redis", url.clone(), e.to_string()))?;
            if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
                return Err((
                    "cluster.redis",
                    url.clone(),
                    "rediss:// (TLS) is not built in; reach Redis over a private network or a local TLS tunnel (stunnel, spiped)".into(),
                ));
            }
        }
        let bad_name = |s: &str| {
            s.is_empty()
                || s.len() > 64
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if !self.node.is_empty() && bad_name(&self.node) {
            return Err((
                "cluster.node",
                self.node.clone(),
                "1-64 characters of letters, digits, '-', '_' or '.'".into(),
            ));
        }
        if bad_name(&self.prefix) {
            return Err((
                "cluster.prefix",
                self.prefix.clone(),
                "1-64 characters of letters, digits, '-', '_' or '.'".into(),
            ));
        }
        if self.share.is_empty() {
            return Err((
                "cluster.share",
                "[]".into(),
                "share \"blocks\", \"passes\" or both, or set cluster.redis = [] to leave the fleet".into(),
            ));
        }
        if self.pass_timeout.is_zero() || self.pass_timeout > Duration::from_secs(1) {
            return Err((
                "cluster.pass_timeout",
                crate::duration::Display(self.pass_timeout).to_string(),
                "between 1ms and 1s: every first-time client may wait this long".into(),
            ));
        }
        if !(1..=10_000_000).contains(&self.queue) {
            return Err((
                "cluster.queue",
                self.queue.to_string(),
                "between 1 and 10000000 verdicts".into(),
            ));
        }
        if !(1000..=100_000_000).contains(&self.stream_length) {
            return Err((
                "cluster.stream_length",
                self.stream_length.to_string(),
                "between 1000 and 100000000 entries".into(),
            ));
        }
        Ok(())
    }
}

/// This host's name, or `node` when it has none.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname
    // NUL-terminates when the name fits.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if rc == 0 && end > 0 {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "node".into()
    }
}
