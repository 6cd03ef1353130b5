//! A fleet of MX hosts for the cluster tests: one test LAN (a bridge in
//! its own namespace), three MX namespaces each running a daemon with its
//! XDP gate on its own interface, Redis in a namespace of its own, and a
//! client namespace holding a good sender, a bot and an allowlisted host.
//! Addresses are in 198.51.100.0/24. Every namespace (and with it every
//! veth) is deleted on drop, every daemon killed.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use crate::{
    daemon::cli,
    netns::{screener_bin, spawn_logged, wait_for, ChildGuard, PinDir},
    redis::Redis,
};

/// The LAN's /24.
pub const NET: &str = "198.51.100";
/// The good sender.
pub const SENDER: &str = "198.51.100.77";
/// The bot.
pub const BOT: &str = "198.51.100.66";
/// A host that mx2 allowlists.
pub const FRIEND: &str = "198.51.100.55";

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces and the bridge.
pub struct Lan {
    /// Namespace names by role, deleted on drop.
    names: Vec<String>,
    /// Tag making this fleet's names unique on the machine.
    tag: String,
}

impl Lan {
    /// The LAN with `roles` plugged in: each role's namespace gets one
    /// veth to the bridge with `addrs`.
    pub fn new(roles: &[(&str, &[&str])]) -> Lan {
        let tag = format!("f{}x{}", std::process::id() % 100_000, crate::netns::slot());
        let mut lan = Lan {
            names: Vec::new(),
            tag,
        };
        let hub = lan.ns("lan");
        sh(&["ip", "netns", "add", &hub]);
        lan.names.push(hub.clone());
        sh(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &hub, "link", "set", "br0", "up"]);
        for (i, (role, addrs)) in roles.iter().enumerate() {
            let ns = lan.ns(role);
            sh(&["ip", "netns", "add", &ns]);
            lan.names.push(ns.clone());
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            let (a, b) = (format!("{}p{i}", lan.tag), lan.iface(role));
            sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b]);
            sh(&["ip", "link", "set", &a, "netns", &hub]);
            sh(&["ip", "link", "set", &b, "netns", &ns]);
            sh(&["ip", "-n", &hub, "link", "set", &a, "master", "br0", "up"]);
            for addr in *addrs {
                sh(&[
                    "ip",
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    &b,
                ]);
            }
            sh(&["ip", "-n", &ns, "link", "set", &b, "up"]);
        }
        lan
    }

    /// The namespace of `role`.
    pub fn ns(&self, role: &str) -> String {
        format!("{}{role}", self.tag)
    }

    /// The interface of `role` inside its namespace.
    pub fn iface(&self, role: &str) -> String {
        format!("{}{role}", self.tag)
    }

    /// Whether `from` (in the client namespace) opens a TCP connection to
    /// `to` within one second (one SYN: the kernel retries after 1 s).
    pub fn connects(&self, from: &str, to: SocketAddr) -> bool {
        let from: IpAddr = from.parse().unwrap();
        crate::sys::on_netns_thread(&self.ns("client"), move || {
            crate::netns::connect_from(from, to, Duration::from_millis(900))
        })
        .join()
        .unwrap()
        .unwrap()
    }

    /// Runs `swaks` from `from` in the client namespace to `to`; its
    /// success and output.
    pub fn swaks(&self, from: &str, to: SocketAddr) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns("client"), "swaks"])
            .args(["--server", &to.ip().to_string()])
            .args(["--port", &to.port().to_string()])
            .args(["--local-interface", from])
            .args(["--from", "sender@example.org", "--to", "user@example.com"])
            .args(["--timeout", "30"])
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A minimal MTA behind a node: skips the PROXY v2 header, answers a mail
/// transaction, counts the messages it accepted. Runs on a thread inside
/// the node's namespace for the rest of the test process.
pub fn sink(ns: &str, addr: SocketAddr) -> Arc<AtomicUsize> {
    let delivered = Arc::new(AtomicUsize::new(0));
    let d = Arc::clone(&delivered);
    let listener = crate::sys::on_netns_thread(ns, move || TcpListener::bind(addr))
        .join()
        .unwrap()
        .unwrap()
        .unwrap_or_else(|e| panic!("sink bind {addr}: {e}"));
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let d = Arc::clone(&d);
            std::thread::spawn(move || {
                let _ = serve_mail(s, &d);
            });
        }
    });
    delivered
}

fn serve_mail(mut s: std::net::TcpStream, delivered: &AtomicUsize) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    // PROXY v2: 12-byte signature, version/command, family, 2-byte length.
    let mut head = [0u8; 16];
    s.read_exact(&mut head)?;
    let mut rest = vec![0u8; usize::from(u16::from_be_bytes([head[14], head[15]]))];
    s.read_exact(&mut rest)?;
    s.write_all(b"220 sink.example ESMTP\r\n")?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    let mut in_data = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if in_data {
            if line == ".\r\n" {
                in_data = false;
                delivered.fetch_add(1, Ordering::Relaxed);
                s.write_all(b"250 2.0.0 queued\r\n")?;
            }
            continue;
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" | "HELO" => b"250 sink.example\r\n",
            "DATA" => {
                in_data = true;
                b"354 go on\r\n"
            }
            "QUIT" => {
                s.write_all(b"221 bye\r\n")?;
                return Ok(());
            }
            _ => b"250 ok\r\n",
        };
        s.write_all(reply)?;
    }
}

/// One MX node: its daemon, configuration and log.
pub struct Node {
    /// The node's name in the fleet (`mx1`…).
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// Where clients reach it.
    pub smtp: SocketAddr,
    /// Its configuration file.
    pub cfg: PathBuf,
    /// Its files (store, socket, logs).
    dir: tempfile::TempDir,
    /// Its pinned maps.
    pins: PinDir,
    /// The running daemon.
    daemon: ChildGuard,
    /// How many times it was started (log file per start).
    starts: u32,
    /// Messages its backend accepted.
    pub delivered: Arc<AtomicUsize>,
}

impl Node {
    /// Configures node `name` at `addr` in `lan` (role `name`), fleet
    /// Redis at `redis`, with `extra` lines appended to the file.
    pub fn new(lan: &Lan, name: &str, addr: &str, redis: &Redis, extra: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let pins = PinDir::new(&format!("{}{name}", lan.tag));
        let smtp: SocketAddr = format!("{addr}:25").parse().unwrap();
        let backend: SocketAddr = format!("{addr}:10025").parse().unwrap();
        let ns = lan.ns(name);
        let delivered = sink(&ns, backend);
        let cfg = dir.path().join("screener.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"
[smtp]
listen = ["{smtp}"]
hostname = "{name}.example.com"
backend = "{backend}"

[screen]
permit_local = false
greet_wait = "1s"

[xdp]
interfaces = ["{iface}"]
mode = "skb"
ports = [25]
pin_path = "{pins}"

[store]
path = "{dir}/screener.redb"

[admin]
socket = "{dir}/admin.sock"

[daemon]
user = "root"

[cluster]
redis = ["{url}"]
node = "{name}"
prefix = "{prefix}"
{extra}
"#,
                iface = lan.iface(name),
                pins = pins.0.display(),
                dir = dir.path().display(),
                url = redis.url(),
                prefix = lan.tag,
            ),
        )
        .unwrap();
        let mut node = Node {
            name: name.to_owned(),
            ns,
            smtp,
            cfg,
            dir,
            pins,
            daemon: ChildGuard(None),
            starts: 0,
            delivered,
        };
        node.start();
        node
    }

    /// Starts (again) the daemon inside the node's namespace (network
    /// only, so it shares the host's bpffs) and waits for its admin socket.
    pub fn start(&mut self) {
        self.starts += 1;
        let log = self.log_path(self.starts);
        self.daemon = spawn_logged(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.ns))
                .arg(screener_bin())
                .arg("-c")
                .arg(&self.cfg)
                .arg("run"),
            &log,
        );
        let cfg = self.cfg.clone();
        wait_for(
            &format!("{}'s admin socket", self.name),
            Duration::from_secs(30),
            || cli(&cfg, &["stats", "--json"]).0,
        );
    }

    /// Kills the daemon.
    pub fn stop(&mut self) {
        self.daemon.kill9();
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("daemon{n}.log"))
    }

    /// Everything the daemon logged, over all its starts.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|n| std::fs::read_to_string(self.log_path(n)).unwrap_or_default())
            .collect()
    }

    /// `screener ARGS` against this node; asserts success.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        crate::daemon::ok(&self.cfg, args)
    }

    /// `block list --json` as (net, origin) pairs.
    pub fn blocks(&self) -> Vec<(String, Option<String>)> {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["block", "list", "--json"])).unwrap();
        let mut out: Vec<(String, Option<String>)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["net"].as_str().unwrap().to_owned(),
                    e["origin"].as_str().map(str::to_owned),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Whether `net` is in this node's kernel block maps.
    pub fn holds(&self, net: &str) -> bool {
        self.blocks().iter().any(|(n, _)| n == net)
    }

    /// `stats --json`.
    pub fn stats(&self) -> serde_json::Value {
        crate::daemon::stats(&self.cfg)
    }

    /// Its pin directory.
    pub fn pins(&self) -> &Path {
        &self.pins.0
    }

    /// The directory of its files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The addresses of the standard fleet: (role, addresses).
pub fn standard_roles() -> Vec<(&'static str, &'static [&'static str])> {
    vec![
        ("mx1", &["198.51.100.11"][..]),
        ("mx2", &["198.51.100.12"][..]),
        ("mx3", &["198.51.100.13"][..]),
        ("redis", &["198.51.100.20"][..]),
        ("client", &[SENDER, BOT, FRIEND][..]),
    ]
}
