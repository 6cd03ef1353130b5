//! Test hosts in network namespaces, and guards that remove whatever a test
//! created (namespace, veth, pins, child processes) even when it fails.

use std::{
    fs::File,
    net::{IpAddr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

/// Runs a command, panicking with its output when it fails.
#[track_caller]
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A unique small number per test in this process, for names and subnets.
pub fn slot() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A network namespace joined to the host by a veth pair.
///
/// Addresses (with `n` the slot): the host side has `192.0.2.(16n+1)/28`,
/// `2001:db8:n::1/64` and `2001:db8:n:1::1/64`; the namespace has the
/// client `.16n+2`, its neighbour `.16n+3`, and `2001:db8:n::2`,
/// `2001:db8:n:1::2` (the neighbour's /64 differs from the client's).
pub struct NetNs {
    pub name: String,
    /// The host-side veth, where the XDP program goes.
    pub host_if: String,
    /// Its peer, inside the namespace.
    pub peer_if: String,
    pub n: u32,
    /// The lock that makes `n` ours machine-wide: two test runs at once
    /// (two checkouts) would otherwise put the same /28 on two veths.
    _slot: std::fs::File,
}

/// Takes a namespace slot (1..=15) no other process on this machine holds,
/// waiting up to ten minutes for one to come free.
fn machine_slot() -> (u32, std::fs::File) {
    let dir = std::env::temp_dir().join("screener-test-slots");
    std::fs::create_dir_all(&dir).expect("creating the slot lock directory");
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    // Start from this process's own counter so tests in one run spread
    // over the slots instead of all contending for slot 1.
    let first = slot();
    loop {
        for i in 0..15 {
            let n = (first - 1 + i) % 15 + 1;
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("slot-{n}")))
                .expect("opening a slot lock");
            if f.try_lock().is_ok() {
                return (n, f);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no free namespace slot for ten minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl NetNs {
    #[track_caller]
    #[expect(
        clippy::new_without_default,
        reason = "creating one changes the system"
    )]
    pub fn new() -> NetNs {
        let (n, lock) = machine_slot();
        let name = format!("scr{}-{n}", std::process::id());
        let host_if = format!("scr{n}h{}", std::process::id() % 10000);
        let peer_if = format!("scr{n}c{}", std::process::id() % 10000);
        let ns = NetNs {
            name: name.clone(),
            host_if: host_if.clone(),
            peer_if: peer_if.clone(),
            n,
            _slot: lock,
        };
        sh(&["ip", "netns", "add", &name]);
        ns.inns(&["ip", "link", "set", "lo", "up"]);
        ns.plug();
        ns
    }

    /// Runs `ip ARGS` (or another command) inside the namespace.
    #[track_caller]
    fn inns(&self, args: &[&str]) {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        sh(&v);
    }

    /// Creates the veth pair and gives both ends their addresses (see
    /// [`NetNs`]). Addresses added with [`NetNs::add_addr`] are not
    /// restored.
    #[track_caller]
    pub fn plug(&self) {
        let (host_if, peer_if) = (&self.host_if, &self.peer_if);
        sh(&[
            "ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if,
        ]);
        sh(&["ip", "link", "set", peer_if, "netns", &self.name]);
        let (n, base) = (self.n, 16 * self.n);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("192.0.2.{}/28", base + 1),
            "dev",
            host_if,
        ]);
        for a in [
            format!("2001:db8:{n}::1/64"),
            format!("2001:db8:{n}:1::1/64"),
        ] {
            sh(&["ip", "-6", "addr", "add", &a, "dev", host_if, "nodad"]);
        }
        sh(&["ip", "link", "set", host_if, "up"]);
        for last in [base + 2, base + 3] {
            self.inns(&[
                "ip",
                "addr",
                "add",
                &format!("192.0.2.{last}/28"),
                "dev",
                peer_if,
            ]);
        }
        for a in [
            format!("2001:db8:{n}::2/64"),
            format!("2001:db8:{n}:1::2/64"),
        ] {
            self.inns(&["ip", "-6", "addr", "add", &a, "dev", peer_if, "nodad"]);
        }
        self.inns(&["ip", "link", "set", peer_if, "up"]);
    }

    /// Deletes the veth pair, as a driver reload or a VLAN or bond rebuild
    /// deletes an interface: whatever was attached to the host side goes
    /// with it.
    #[track_caller]
    pub fn unplug(&self) {
        sh(&["ip", "link", "del", &self.host_if]);
    }

    /// [`NetNs::unplug`], then [`NetNs::plug`]: the interface comes back
    /// under the same name as another device (a new index).
    #[track_caller]
    pub fn replug(&self) {
        self.unplug();
        self.plug();
    }

    /// The host-side interface's current index (`None` while unplugged).
    pub fn host_ifindex(&self) -> Option<u32> {
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", self.host_if))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Adds another address (`a/len`) inside the namespace.
    pub fn add_addr(&self, cidr: &str) {
        let mut args = vec!["ip", "netns", "exec", &self.name, "ip", "addr", "add", cidr];
        args.extend(["dev", &self.peer_if]);
        if cidr.contains(':') {
            args.push("nodad");
        }
        sh(&args);
    }

    /// The `i`-th IPv4 address of the namespace's /28 (2 = client,
    /// 3 = neighbour; others need `add_addr`).
    pub fn v4(&self, i: u32) -> IpAddr {
        format!("192.0.2.{}", 16 * self.n + i).parse().unwrap()
    }

    pub fn host_v4(&self) -> IpAddr {
        format!("192.0.2.{}", 16 * self.n + 1).parse().unwrap()
    }
    pub fn client_v4(&self) -> IpAddr {
        format!("192.0.2.{}", 16 * self.n + 2).parse().unwrap()
    }
    pub fn neighbour_v4(&self) -> IpAddr {
        format!("192.0.2.{}", 16 * self.n + 3).parse().unwrap()
    }
    pub fn host_v6(&self) -> IpAddr {
        format!("2001:db8:{}::1", self.n).parse().unwrap()
    }
    pub fn client_v6(&self) -> IpAddr {
        format!("2001:db8:{}::2", self.n).parse().unwrap()
    }
    pub fn neighbour_v6(&self) -> IpAddr {
        format!("2001:db8:{}:1::2", self.n).parse().unwrap()
    }
    pub fn host_v6_neighbour_net(&self) -> IpAddr {
        format!("2001:db8:{}:1::1", self.n).parse().unwrap()
    }

    /// Runs `f` on a thread that has entered this namespace (network only,
    /// so it shares the host's bpffs and files).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        crate::sys::on_netns_thread(&self.name, f)
            .join()
            .expect("namespace thread")
            .unwrap_or_else(|e| panic!("entering namespace {}: {e}", self.name))
    }

    /// A TCP connection from `from` (an address in the namespace) to `to`,
    /// made inside the namespace; `None` if it did not open in `timeout`.
    pub fn tcp_from(
        &self,
        from: IpAddr,
        to: SocketAddr,
        timeout: Duration,
    ) -> Option<std::net::TcpStream> {
        self.run(move || {
            let fd = socket2_like::bind(from);
            if !socket2_like::connect(&fd, to, timeout) {
                return None;
            }
            let s = std::net::TcpStream::from(fd);
            s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
            Some(s)
        })
    }

    /// Whether `from` (an address in the namespace) can open a TCP
    /// connection to `to` within `timeout`.
    pub fn connects(&self, from: IpAddr, to: SocketAddr, timeout: Duration) -> bool {
        self.run(move || socket2_like::connect(&socket2_like::bind(from), to, timeout))
    }

    /// Connection attempts from `from` to `to`, one after another on a
    /// thread inside the namespace, until `stop` is set. Each gives up
    /// after `patience` (below the kernel's one-second SYN retry, so one
    /// attempt is one SYN) and records whether `armed()` held just before
    /// it began and whether it connected (a SYN-ACK came back).
    pub fn hammer(
        &self,
        from: IpAddr,
        to: SocketAddr,
        patience: Duration,
        armed: impl Fn() -> bool + Send + 'static,
        stop: Arc<AtomicBool>,
    ) -> thread::JoinHandle<std::io::Result<Vec<Attempt>>> {
        crate::sys::on_netns_thread(&self.name, move || {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let armed = armed();
                let connected = socket2_like::connect(&socket2_like::bind(from), to, patience);
                out.push(Attempt { armed, connected });
            }
            out
        })
    }
}

/// One connection attempt of [`NetNs::hammer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// The condition the test watches held when the attempt began.
    pub armed: bool,
    /// The attempt connected: the SYN was answered.
    pub connected: bool,
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth end and with it the pair.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Whether a TCP connection from `from` to `to` opens within `timeout`,
/// in the calling thread's network namespace.
pub fn connect_from(from: IpAddr, to: SocketAddr, timeout: Duration) -> bool {
    socket2_like::connect(&socket2_like::bind(from), to, timeout)
}

/// A TCP stream from `from` to `to`, in the calling thread's network
/// namespace; `None` if it did not open within `timeout`.
pub fn bound_stream(
    from: IpAddr,
    to: SocketAddr,
    timeout: Duration,
) -> Option<std::net::TcpStream> {
    let fd = socket2_like::bind(from);
    socket2_like::connect(&fd, to, timeout).then(|| std::net::TcpStream::from(fd))
}

/// Minimal blocking TCP connect from a chosen source address, with a
/// timeout, using libc directly (std cannot bind before connect).
mod socket2_like {
    use std::{
        net::{IpAddr, SocketAddr},
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
        time::Duration,
    };

    pub fn bind(from: IpAddr) -> OwnedFd {
        let family = if from.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket call.
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh socket we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let (ss, len) = crate::sys::sockaddr(SocketAddr::new(from, 0));
        // SAFETY: valid sockaddr of len bytes.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const ss).cast(), len) };
        assert_eq!(rc, 0, "bind {from}: {}", std::io::Error::last_os_error());
        fd
    }

    pub fn connect(fd: &OwnedFd, to: SocketAddr, timeout: Duration) -> bool {
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap(),
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        };
        // SO_SNDTIMEO bounds a blocking connect.
        // SAFETY: valid option pointer and size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&raw const tv).cast(),
                libc::socklen_t::try_from(size_of::<libc::timeval>()).unwrap(),
            );
        }
        let (ss, len) = crate::sys::sockaddr(to);
        // SAFETY: valid sockaddr of len bytes.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const ss).cast(), len) };
        rc == 0
    }
}

/// A TCP listener in the host namespace that accepts and closes, on a
/// thread that lives as long as the process.
pub fn listen(addr: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let local = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            drop(s);
        }
    });
    local
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    /// Kills it now, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A pin directory under /sys/fs/bpf, emptied and removed on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(tag: &str) -> PinDir {
        let p = PathBuf::from(format!(
            "/sys/fs/bpf/screener-test-{}-{tag}",
            std::process::id()
        ));
        PinDir(p)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = screener::xdp::detach(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The `screener` binary built next to the test executables.
#[track_caller]
pub fn screener_bin() -> PathBuf {
    // A test runs from target/<profile>/deps, a benchmark binary from
    // target/<profile>: the daemon is in target/<profile> either way.
    let exe = std::env::current_exe().unwrap();
    let here = exe.parent().unwrap();
    let bin = [
        here.join("screener"),
        here.parent().unwrap().join("screener"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .unwrap_or_else(|| here.join("screener"));
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build -p screener`, which `cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// Polls `cond` until it holds; panics naming `what` when `deadline` passes.
#[track_caller]
pub fn wait_for(what: &str, deadline: Duration, cond: impl FnMut() -> bool) {
    assert!(
        crate::sys::poll_until(deadline, cond),
        "timed out after {deadline:?} waiting for {what}"
    );
}

/// Starts a process with its output captured to `log`.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> ChildGuard {
    let f = File::create(log).unwrap();
    let child = cmd
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    ChildGuard(Some(child))
}
