//! A real Redis for the fleet tests: Debian's redis-server on a free
//! loopback port (or an address given), no persistence, killed on drop.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use crate::netns::{wait_for, ChildGuard};

const REDIS: &str = "/usr/bin/redis-server";

pub struct Redis {
    /// The server; `None` while stopped.
    child: ChildGuard,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its working directory.
    dir: tempfile::TempDir,
    /// Runs the server inside this network namespace, when set.
    netns: Option<String>,
}

impl Redis {
    /// On a free loopback port.
    #[track_caller]
    pub fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .unwrap()
            .port();
        Redis::start_at(SocketAddr::from(([127, 0, 0, 1], port)), None)
    }

    /// At `addr`, inside `netns` when given.
    #[track_caller]
    pub fn start_at(addr: SocketAddr, netns: Option<&str>) -> Redis {
        assert!(
            Path::new(REDIS).exists(),
            "{REDIS} is missing: install the Debian package redis-server"
        );
        let mut r = Redis {
            child: ChildGuard(None),
            addr,
            dir: tempfile::tempdir().unwrap(),
            netns: netns.map(str::to_owned),
        };
        r.resume();
        r
    }

    /// The URL the daemon's `cluster.redis` names.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Kills the server, as an outage would (nothing is kept: the next
    /// start is empty unless `keep` data was dumped first).
    pub fn stop(&mut self) {
        self.child.kill9();
    }

    /// Starts it again on the same address.
    #[track_caller]
    pub fn resume(&mut self) {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, REDIS]);
                c
            }
            None => Command::new(REDIS),
        };
        cmd.args([
            "--port",
            &self.addr.port().to_string(),
            "--bind",
            &self.addr.ip().to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
        ])
        .arg("--dir")
        .arg(self.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        self.child = ChildGuard(Some(cmd.spawn().expect("start redis-server")));
        let addr = self.addr;
        let ns = self.netns.clone();
        wait_for(
            "redis-server to answer",
            Duration::from_secs(10),
            || match &ns {
                None => TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok(),
                Some(_) => self.cli(&["PING"]).is_some_and(|r| r.trim() == "PONG"),
            },
        );
    }

    /// Runs `redis-cli ARGS` against it; its stdout, or `None` on failure.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "redis-cli"]);
                c
            }
            None => Command::new("redis-cli"),
        };
        let out = cmd
            .args(["-h", &self.addr.ip().to_string()])
            .args(["-p", &self.addr.port().to_string()])
            .args(args)
            .output()
            .ok()?;
        (out.status.success() && !String::from_utf8_lossy(&out.stdout).starts_with("ERR"))
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
