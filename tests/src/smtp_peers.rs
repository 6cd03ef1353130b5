//! Real SMTP peers for the screener's tests: a private Postfix instance as
//! the backend (stopped on drop), swaks as a client, and the screener
//! itself on a loopback port.

use crate::netns::wait_for;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Panics with a clear message when a tool the test needs is missing.
#[track_caller]
pub fn require(tool: &str, package: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return p;
        }
    }
    panic!("{tool} not found: install the Debian package {package}");
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A private Postfix instance: its own config, queue and log in a temp
/// directory, `smtpd` on a loopback port expecting a PROXY header, all
/// mail discarded after acceptance. Stopped on drop.
pub struct Postfix {
    dir: tempfile::TempDir,
    /// Where its smtpd listens.
    pub addr: SocketAddr,
}

/// How the backend smtpd expects the client address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// `smtpd_upstream_proxy_protocol = haproxy`.
    Haproxy,
    /// No PROXY header.
    None,
}

/// The uid and gid of the `postfix` account the Debian package creates.
#[track_caller]
fn postfix_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postfix:"))
        .expect("no postfix user: install the Debian package postfix");
    let f: Vec<&str> = line.split(':').collect();
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

impl Postfix {
    /// Starts an instance; with `tls` it offers STARTTLS with a fresh
    /// self-signed certificate.
    #[track_caller]
    pub fn start(upstream: Upstream, tls: bool) -> Postfix {
        let mut main = String::from(
            "myhostname = backend.test\n\
             mydestination = backend.test\n\
             local_recipient_maps =\n\
             local_transport = discard\n\
             default_transport = discard\n",
        );
        if upstream == Upstream::Haproxy {
            main.push_str("smtpd_upstream_proxy_protocol = haproxy\n");
        }
        Postfix::launch(&main, tls)
    }

    /// Starts a sending MTA: mail its smtpd takes from loopback is relayed
    /// to `relay` (no MX lookup), from the source address `bind`, with
    /// opportunistic TLS (`smtp_tls_security_level = may`), one connection
    /// per message (no connection cache).
    #[track_caller]
    pub fn start_sender(relay: SocketAddr, bind: std::net::Ipv4Addr) -> Postfix {
        let main = format!(
            "myhostname = sender.test\n\
             mydestination =\n\
             relayhost = [{ip}]:{port}\n\
             smtp_bind_address = {bind}\n\
             smtp_host_lookup = native\n\
             smtp_tls_security_level = may\n\
             smtp_tls_loglevel = 1\n\
             smtp_connection_cache_on_demand = no\n",
            ip = relay.ip(),
            port = relay.port(),
        );
        Postfix::launch(&main, false)
    }

    /// Writes `main.cf` (the common settings plus `extra`) and `master.cf`
    /// into a fresh directory and starts the instance.
    #[track_caller]
    fn launch(extra: &str, tls: bool) -> Postfix {
        let postfix = require("postfix", "postfix");
        let dir = tempfile::Builder::new()
            .prefix("screener-postfix")
            .tempdir()
            .expect("temp dir");
        let root = dir.path();
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        std::fs::create_dir_all(root.join("queue")).unwrap();
        std::fs::create_dir_all(root.join("data")).unwrap();
        // Postfix's daemons run as the postfix user: they must reach the
        // queue, and own the data directory.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (uid, gid) = postfix_user();
        std::os::unix::fs::chown(root.join("data"), Some(uid), Some(gid)).expect("chown data");
        let mut main = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {q}\n\
             data_directory = {d}\n\
             maillog_file = {root}/maillog\n\
             maillog_file_prefixes = {root}\n\
             mydomain = test\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             mynetworks = 127.0.0.0/8\n\
             smtpd_client_port_logging = yes\n\
             smtpd_upstream_proxy_timeout = 10s\n\
             alias_maps =\n\
             alias_database =\n\
             {extra}",
            q = root.join("queue").display(),
            d = root.join("data").display(),
            root = root.display(),
        );
        if tls {
            let openssl = require("openssl", "openssl");
            let st = Command::new(openssl)
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                ])
                .args(["-subj", "/CN=backend.test"])
                .arg("-keyout")
                .arg(root.join("key.pem"))
                .arg("-out")
                .arg(root.join("cert.pem"))
                .output()
                .expect("run openssl");
            assert!(
                st.status.success(),
                "openssl: {}",
                String::from_utf8_lossy(&st.stderr)
            );
            let tls_cf = format!(
                "smtpd_tls_security_level = may\n\
                 smtpd_tls_cert_file = {r}/cert.pem\n\
                 smtpd_tls_key_file = {r}/key.pem\n\
                 smtpd_tls_loglevel = 1\n",
                r = root.display()
            );
            main.push_str(&tls_cf);
        }
        std::fs::write(root.join("main.cf"), main).unwrap();
        let master = format!(
            "{addr} inet n - n - - smtpd\n\
             pickup unix n - n 60 1 pickup\n\
             cleanup unix n - n - 0 cleanup\n\
             qmgr unix n - n 300 1 qmgr\n\
             tlsmgr unix - - n 1000? 1 tlsmgr\n\
             rewrite unix - - n - - trivial-rewrite\n\
             bounce unix - - n - 0 bounce\n\
             defer unix - - n - 0 bounce\n\
             trace unix - - n - 0 bounce\n\
             verify unix - - n - 1 verify\n\
             flush unix n - n 1000? 0 flush\n\
             proxymap unix - - n - - proxymap\n\
             smtp unix - - n - - smtp\n\
             showq unix n - n - - showq\n\
             error unix - - n - - error\n\
             retry unix - - n - - error\n\
             discard unix - - n - - discard\n\
             local unix - n n - - local\n\
             anvil unix - - n - 1 anvil\n\
             scache unix - - n - 1 scache\n\
             postlog unix-dgram n - n - 1 postlogd\n"
        );
        std::fs::write(root.join("master.cf"), master).unwrap();
        let pf = Postfix { dir, addr };
        let out = Command::new(&postfix)
            .arg("-c")
            .arg(pf.dir.path())
            .arg("start")
            .output()
            .expect("run postfix");
        assert!(
            out.status.success(),
            "postfix start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        wait_for("postfix smtpd to listen", Duration::from_secs(20), || {
            TcpStream::connect(addr).is_ok()
        });
        pf
    }

    /// Hands one message to this instance with its `sendmail` (the
    /// instance's own configuration directory), for it to deliver or relay.
    #[track_caller]
    pub fn sendmail(&self, from: &str, to: &str, subject: &str) {
        use std::io::Write as _;
        let sendmail = require("sendmail", "postfix");
        let mut child = Command::new(sendmail)
            .arg("-C")
            .arg(self.dir.path())
            .args(["-f", from, to])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run sendmail");
        let msg = format!("From: <{from}>\nTo: <{to}>\nSubject: {subject}\n\nHello.\n");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(msg.as_bytes())
            .expect("write to sendmail");
        let out = child.wait_with_output().expect("wait for sendmail");
        assert!(
            out.status.success(),
            "sendmail: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Everything Postfix logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// Waits until the log has a line containing every one of `words`.
    #[track_caller]
    pub fn wait_log(&self, words: &[&str]) -> String {
        let mut found = String::new();
        wait_for(
            &format!("postfix log line with {words:?}"),
            Duration::from_secs(20),
            || match self
                .log()
                .lines()
                .find(|l| words.iter().all(|w| l.contains(w)))
            {
                Some(l) => {
                    l.clone_into(&mut found);
                    true
                }
                None => false,
            },
        );
        found
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(self.dir.path())
            .arg("stop")
            .output();
        // `stop` returns before master exits; the queue directory must not
        // vanish under a running master.
        let pid = self.dir.path().join("queue/pid/master.pid");
        let end = Instant::now() + Duration::from_secs(10);
        while pid.exists() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Ok(text) = std::fs::read_to_string(&pid) {
            if let Ok(n) = text.trim().parse::<i32>() {
                // SAFETY: plain kill(2) of the master this guard started.
                unsafe { libc::kill(n, libc::SIGKILL) };
            }
        }
    }
}

/// Runs swaks with `args`; panics if swaks is missing.
#[track_caller]
pub fn swaks(args: &[&str]) -> Output {
    let swaks = require("swaks", "swaks");
    Command::new(swaks).args(args).output().expect("run swaks")
}

/// The screener's SMTP server on a loopback port, in its own runtime on a
/// background thread; shut down (and waited for) on drop.
pub struct Screener {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The server, for stats and keywords.
    pub server: std::sync::Arc<screener::smtp::Server>,
    /// Clients reported for blocking.
    pub failures: std::sync::Arc<screener::smtp::FailureQueue>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Screener {
    /// Starts a server with `cfg` (its `smtp.listen` is ignored).
    #[track_caller]
    pub fn start(cfg: screener::config::Config, store: Option<screener::store::Store>) -> Screener {
        let failures = std::sync::Arc::new(screener::smtp::FailureQueue::default());
        let server = std::sync::Arc::new(screener::smtp::Server::new(
            std::sync::Arc::new(cfg),
            store,
            None,
            Some(std::sync::Arc::clone(&failures)),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let srv = std::sync::Arc::clone(&server);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener).expect("listener");
                srv.serve(vec![l], async {
                    let _ = stopped.await;
                })
                .await
                .expect("serve");
            });
        });
        Screener {
            addr,
            server,
            failures,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Clients reported for blocking since the last call, one entry per
    /// address with every test it failed.
    pub fn failures(&self) -> Vec<screener::smtp::Queued> {
        std::iter::from_fn(|| self.failures.try_recv()).collect()
    }

    /// Waits until the server has learned the backend's EHLO keywords.
    #[track_caller]
    pub fn wait_keywords(&self) -> Vec<String> {
        wait_for(
            "the backend's EHLO keywords",
            Duration::from_secs(20),
            || !self.server.ehlo_keywords().is_empty(),
        );
        self.server.ehlo_keywords()
    }

    /// Stops the server and waits for its drain.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Screener {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A screener configuration for tests: loopback backend, short greet wait,
/// deep tests on, quick shutdown.
pub fn test_config(backend: SocketAddr) -> screener::config::Config {
    let mut cfg = screener::config::Config::default();
    cfg.smtp.hostname = "screener.test".into();
    cfg.smtp.greet_banner = "$hostname ESMTP".into();
    cfg.smtp.backend = backend;
    cfg.smtp.shutdown_grace = Duration::from_secs(2);
    cfg.screen.greet_wait = Duration::from_secs(1);
    // The bots are loopback addresses, which are local: screen them.
    cfg.screen.permit_local = false;
    cfg.screen.pipelining_enable = true;
    cfg.screen.non_smtp_command_enable = true;
    cfg.screen.bare_newline_enable = true;
    cfg
}

/// A raw client for scripted bots, with read deadlines.
pub struct Bot {
    /// The socket.
    pub stream: TcpStream,
}

impl Bot {
    /// Connects from `from` (a loopback address) to `to`.
    #[track_caller]
    pub fn connect(from: [u8; 4], to: SocketAddr) -> Bot {
        let stream = bind_connect(from, to);
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Bot { stream }
    }

    /// Writes raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        use std::io::Write as _;
        let _ = self.stream.write_all(bytes);
    }

    /// Reads until `want` appears, the peer closes, or 30 s pass; returns
    /// what was read.
    pub fn read_until(&mut self, want: &str) -> String {
        use std::io::Read as _;
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            if String::from_utf8_lossy(&got).contains(want) {
                break;
            }
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Reads until the last line of a reply with `code` (`"250"`: a line
    /// starting `250 `) has arrived whole; returns everything read.
    pub fn read_reply(&mut self, code: &str) -> String {
        use std::io::Read as _;
        let last = format!("{code} ");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let text = String::from_utf8_lossy(&got);
            let done = text
                .split_inclusive("\r\n")
                .any(|l| l.starts_with(&last) && l.ends_with("\r\n"));
            if done {
                break;
            }
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Reads everything until the peer closes (or 30 s pass).
    pub fn read_to_close(&mut self) -> String {
        self.read_until("\u{0}never")
    }
}

fn bind_connect(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind((std::net::Ipv4Addr::from(from), 0).into())
            .expect("bind source");
        s.connect(to).await.expect("connect").into_std().unwrap()
    })
}
