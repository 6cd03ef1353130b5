//! A real DNSBL server for tests: rbldnsd on a free loopback port, serving
//! zone files from a temporary directory, killed on drop.

use std::{
    net::{SocketAddr, UdpSocket},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::netns::ChildGuard;

const RBLDNSD: &str = "/usr/sbin/rbldnsd";

pub struct Rbldnsd {
    _child: ChildGuard,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Rbldnsd {
    /// Serves `zones`: `(zone spec such as "bl.example:ip4set", contents)`.
    #[track_caller]
    pub fn start(zones: &[(&str, &str)]) -> Rbldnsd {
        assert!(
            Path::new(RBLDNSD).exists(),
            "{RBLDNSD} is missing: install the Debian package rbldnsd"
        );
        let dir = tempfile::tempdir().unwrap();
        let mut specs = Vec::new();
        for (i, (spec, contents)) in zones.iter().enumerate() {
            let file = format!("zone{i}");
            std::fs::write(dir.path().join(&file), contents).unwrap();
            specs.push(format!("{spec}:{file}"));
        }
        let port = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .unwrap()
            .port();
        let child = Command::new(RBLDNSD)
            .args([
                "-n",
                "-e",
                "-c",
                "0",
                "-b",
                &format!("127.0.0.1/{port}"),
                "-w",
            ])
            .arg(dir.path())
            .args(&specs)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rbldnsd");
        let server = Rbldnsd {
            _child: ChildGuard(Some(child)),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _dir: dir,
        };
        server.wait_ready();
        server
    }

    /// Polls with a `version.bind` query until it answers.
    #[track_caller]
    fn wait_ready(&self) {
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        probe
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let query = b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\
                      \x07version\x04bind\x00\x00\x10\x00\x03";
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            let _ = probe.send_to(query, self.addr);
            if probe.recv_from(&mut buf).is_ok() {
                return;
            }
        }
        panic!("rbldnsd on {} did not answer within 10 s", self.addr);
    }
}
