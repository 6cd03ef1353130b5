//! Small system calls the tests and benchmarks need and std does not offer:
//! entering a namespace, socket addresses for libc, resource limits, reaping.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    process::Command,
    thread,
    time::{Duration, Instant},
};

/// Makes `cmd` start inside the network namespace `/run/netns/{ns}`.
///
/// Only the network namespace changes, so the child keeps the host's
/// filesystem view (bpffs pins, temp dirs).
pub fn in_netns(cmd: &mut Command, ns: &str) -> io::Result<()> {
    // The closure owns the file, so it stays open as long as the command.
    let file = File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
    Ok(())
}

/// Runs `f` on a thread that has joined the network namespace `ns`.
pub fn on_netns_thread<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<io::Result<T>> {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(&path)?;
        // SAFETY: a valid namespace fd; affects only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(f())
    })
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "address family constants are small"
)]
const AF_INET: libc::sa_family_t = libc::AF_INET as libc::sa_family_t;
#[expect(
    clippy::cast_possible_truncation,
    reason = "address family constants are small"
)]
const AF_INET6: libc::sa_family_t = libc::AF_INET6 as libc::sa_family_t;

/// A `sockaddr_storage` holding `addr`, and its length.
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: AF_INET,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: AF_INET6,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "a sockaddr is a few dozen bytes"
    )]
    (ss, len as libc::socklen_t)
}

/// Raises this process's open-file limit to `want` (or the hard limit, if
/// that is higher): floods and the idle horde hold tens of thousands of
/// sockets. As root the hard limit itself is raised, up to `fs.nr_open`.
pub fn raise_nofile(want: u64) -> io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(r.rlim_max);
    let hard = r.rlim_max;
    let target = want.min(nr_open).max(hard);
    r.rlim_cur = target;
    r.rlim_max = target;
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const r) } == 0 {
        return Ok(target);
    }
    // Without CAP_SYS_RESOURCE the hard limit is as far as it goes.
    r.rlim_cur = hard;
    r.rlim_max = hard;
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(hard)
}

/// Makes this process the reaper of its orphaned descendants, so the
/// worker processes of a Postfix master it stops do not linger as zombies.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps every exited child without blocking.
pub fn reap_orphans() {
    loop {
        // SAFETY: waitpid with a null status pointer is allowed.
        let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
    }
}

/// Sends `sig` to the process group `pgid`.
pub fn kill_group(pgid: i32, sig: i32) {
    // SAFETY: plain kill on a process group this program created.
    unsafe { libc::kill(-pgid, sig) };
}

/// Whether process `pid` still exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next())
        })
        .is_some_and(|state| state != Some('Z'))
}

/// Polls `cond` every 20 ms until it holds; `false` if `deadline` passes.
pub fn poll_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP socket bound to `src` (which need not be assigned: `IP_FREEBIND`)
/// and not yet connected, non-blocking: for a tokio `TcpSocket`.
pub fn bound_socket(src: std::net::IpAddr) -> io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd as _;
    let family = if src.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket call.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own from here on.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let freebind = if src.is_ipv4() {
        (libc::SOL_IP, libc::IP_FREEBIND)
    } else {
        (libc::SOL_IPV6, libc::IPV6_FREEBIND)
    };
    for (level, opt) in [freebind, (libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT)] {
        // SAFETY: valid option pointer and size.
        let rc = unsafe { libc::setsockopt(fd, level, opt, (&raw const one).cast(), INT_LEN) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (ss, len) = sockaddr(SocketAddr::new(src, 0));
    // SAFETY: valid sockaddr of len bytes.
    if unsafe { libc::bind(fd, (&raw const ss).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// The size of an `int` socket option.
#[expect(clippy::cast_possible_truncation, reason = "four bytes")]
pub const INT_LEN: libc::socklen_t = size_of::<libc::c_int>() as libc::socklen_t;
