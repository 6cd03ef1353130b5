//! A well-behaved SMTP client that delivers one message per session and
//! times it: connect → 220, and connect → 221 after QUIT.
//!
//! swaks and smtp-source deliver but do not report per-session latency,
//! and starting a process per session would add its own milliseconds.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

/// The timings of one delivered message.
#[derive(Clone, Copy, Debug)]
pub struct Session {
    /// Connect until the complete 220 greeting.
    pub greeting: Duration,
    /// Connect until the 221 reply to QUIT.
    pub total: Duration,
}

fn reply(r: &mut BufReader<TcpStream>, want: &str) -> Result<(), String> {
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return Err(format!("closed while waiting for {want}")),
            Ok(_) => {}
            Err(e) => return Err(format!("waiting for {want}: {e}")),
        }
        if !line.starts_with(want) {
            return Err(format!("wanted {want}, got {:?}", line.trim_end()));
        }
        // "250-" continues, "250 " ends a reply.
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(());
        }
    }
}

/// Delivers one message to `server` within `timeout` per step.
pub fn deliver(server: SocketAddr, timeout: Duration) -> Result<Session, String> {
    let t0 = Instant::now();
    let s = TcpStream::connect_timeout(&server, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    reply(&mut r, "220")?;
    let greeting = t0.elapsed();
    let mut say = |line: &str, want: &str, r: &mut BufReader<TcpStream>| -> Result<(), String> {
        w.write_all(line.as_bytes())
            .map_err(|e| format!("sending {:?}: {e}", line.trim_end()))?;
        reply(r, want)
    };
    say("EHLO client.example.org\r\n", "250", &mut r)?;
    say("MAIL FROM:<sender@example.org>\r\n", "250", &mut r)?;
    say("RCPT TO:<postmaster@example.com>\r\n", "250", &mut r)?;
    say("DATA\r\n", "354", &mut r)?;
    say(
        "Subject: bench\r\nFrom: sender@example.org\r\nTo: postmaster@example.com\r\n\r\nhello\r\n.\r\n",
        "250",
        &mut r,
    )?;
    say("QUIT\r\n", "221", &mut r)?;
    Ok(Session {
        greeting,
        total: t0.elapsed(),
    })
}

/// What the well-behaved clients saw during one window.
#[derive(Debug, Default)]
pub struct GoodStats {
    /// Delivered sessions.
    pub sessions: Vec<Session>,
    /// Failed sessions, with the first few reasons.
    pub failed: u64,
    /// Up to five distinct failure reasons.
    pub reasons: Vec<String>,
}

impl GoodStats {
    /// Share of sessions that delivered, in percent.
    pub fn success_percent(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "counts are small")]
        let (ok, total) = (
            self.sessions.len() as f64,
            (self.sessions.len() as u64 + self.failed) as f64,
        );
        if total == 0.0 {
            0.0
        } else {
            100.0 * ok / total
        }
    }

    fn merge(&mut self, other: GoodStats) {
        self.sessions.extend(other.sessions);
        self.failed += other.failed;
        for r in other.reasons {
            if self.reasons.len() < 5 && !self.reasons.contains(&r) {
                self.reasons.push(r);
            }
        }
    }
}

/// Paced well-behaved clients running in the background, inside a
/// namespace: each of `threads` threads starts one delivery every `pace`
/// (or right after the previous one if it took longer).
pub struct GoodClients {
    stop: Arc<AtomicBool>,
    handles: Vec<thread::JoinHandle<std::io::Result<GoodStats>>>,
}

impl GoodClients {
    /// Starts the clients in namespace `ns`, delivering to `targets` in turn.
    pub fn start(
        ns: &str,
        targets: &[SocketAddr],
        threads: usize,
        pace: Duration,
        timeout: Duration,
    ) -> GoodClients {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..threads)
            .map(|t| {
                let stop = stop.clone();
                let targets = targets.to_vec();
                crate::sys::on_netns_thread(ns, move || {
                    let mut st = GoodStats::default();
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        let next = Instant::now() + pace;
                        match deliver(targets[i % targets.len()], timeout) {
                            Ok(s) => st.sessions.push(s),
                            Err(e) => {
                                st.failed += 1;
                                if st.reasons.len() < 5 && !st.reasons.contains(&e) {
                                    st.reasons.push(e);
                                }
                            }
                        }
                        i += 1;
                        if let Some(wait) = next.checked_duration_since(Instant::now()) {
                            thread::sleep(wait);
                        }
                    }
                    st
                })
            })
            .collect();
        GoodClients { stop, handles }
    }

    /// Stops the clients and collects what they saw.
    pub fn finish(self) -> GoodStats {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = GoodStats::default();
        for h in self.handles {
            match h.join() {
                Ok(Ok(st)) => all.merge(st),
                Ok(Err(e)) => {
                    all.failed += 1;
                    all.reasons.push(format!("client thread: {e}"));
                }
                Err(_) => {
                    all.failed += 1;
                    all.reasons.push("client thread panicked".into());
                }
            }
        }
        all
    }
}
