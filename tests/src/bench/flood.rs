//! The connection flood: as many TCP connection attempts per second as one
//! thread can open, from a fixed set of source addresses, round robin.
//!
//! hping3 and trafgen send raw SYNs, which cannot complete a handshake, so
//! they could not show what a userspace screener (postscreen) pays for a
//! connection it has to accept and reject. This generator uses the real TCP
//! stack instead: each attempt is a non-blocking `connect()` from the next
//! source address. When the SYN is dropped (XDP, nftables) the socket is
//! closed after `patience`, well before the kernel's one-second SYN retry,
//! so one attempt is one SYN on the wire. When the server answers, the
//! generator waits for its reply and close, as a bot would, and counts the
//! attempt as answered.

use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    os::fd::RawFd,
    time::{Duration, Instant},
};

use super::sys;

/// What one flood run did.
#[derive(Clone, Copy, Debug, Default)]
pub struct FloodStats {
    /// Connection attempts (SYNs sent).
    pub attempts: u64,
    /// Attempts whose handshake completed.
    pub connected: u64,
    /// Attempts the server answered with data or a close after connecting.
    pub answered: u64,
    /// Attempts refused with a RST.
    pub refused: u64,
    /// Attempts that got no answer within the patience.
    pub unanswered: u64,
    /// `socket`/`bind`/`connect` failures on our side (no SYN sent).
    pub local_errors: u64,
    /// How long the flood ran.
    pub elapsed: Duration,
}

impl FloodStats {
    /// Attempts per second.
    pub fn rate(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "attempt counts stay below 2^52")]
        let n = self.attempts as f64;
        n / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Flood parameters.
pub struct Flood {
    /// Source addresses, used in turn.
    pub sources: Vec<IpAddr>,
    /// The target for IPv4 sources.
    pub target_v4: SocketAddr,
    /// The target for IPv6 sources.
    pub target_v6: SocketAddr,
    /// Attempts in flight at most.
    pub window: usize,
    /// How long an attempt may wait for an answer.
    pub patience: Duration,
}

struct Pending {
    deadline: Instant,
    fd: RawFd,
    generation: u32,
}

/// The size of an `int` socket option.
#[expect(clippy::cast_possible_truncation, reason = "four bytes")]
const INT_LEN: libc::socklen_t = size_of::<libc::c_int>() as libc::socklen_t;

fn close(fd: RawFd) {
    // SAFETY: fd is a socket this generator opened and still owns.
    unsafe { libc::close(fd) };
}

fn open(src: IpAddr, dst: SocketAddr) -> Option<RawFd> {
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
        return None;
    }
    let one: libc::c_int = 1;
    // Choose the source port at connect() from the full 4-tuple, not at
    // bind() per address: cheaper, and the ports never run out.
    // SAFETY: valid option pointer and size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            INT_LEN,
        );
    }
    let (ss, len) = sys::sockaddr(SocketAddr::new(src, 0));
    // SAFETY: valid sockaddr of len bytes.
    if unsafe { libc::bind(fd, (&raw const ss).cast(), len) } != 0 {
        close(fd);
        return None;
    }
    let (ss, len) = sys::sockaddr(dst);
    // SAFETY: valid sockaddr of len bytes.
    let rc = unsafe { libc::connect(fd, (&raw const ss).cast(), len) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
        close(fd);
        return None;
    }
    Some(fd)
}

fn so_error(fd: RawFd) -> i32 {
    let mut err: libc::c_int = 0;
    let mut len = INT_LEN;
    // SAFETY: valid option pointer and length.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut err).cast(),
            &raw mut len,
        );
    }
    err
}

impl Flood {
    /// Floods until `duration` has passed, then closes every socket still
    /// open. Call it on a thread inside the clients' namespace.
    pub fn run(&self, duration: Duration) -> FloodStats {
        let mut st = FloodStats::default();
        // SAFETY: plain epoll_create1.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(
            ep >= 0,
            "epoll_create1: {}",
            std::io::Error::last_os_error()
        );
        // Per fd: the generation of the attempt that owns it (0 = none), so
        // a deadline left over from a closed attempt cannot close a new one.
        let mut owner: Vec<u32> = Vec::new();
        let mut connected_fd: Vec<bool> = Vec::new();
        let mut queue: VecDeque<Pending> = VecDeque::new();
        let mut inflight = 0usize;
        let mut generation = 0u32;
        let mut next_src = 0usize;
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        let start = Instant::now();
        let end = start + duration;
        let finish = |fd: RawFd, owner: &mut Vec<u32>, inflight: &mut usize| {
            close(fd);
            owner[usize::try_from(fd).unwrap_or(0)] = 0;
            *inflight -= 1;
        };
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            // Open new attempts up to the window, a bounded batch at a time
            // so answers and deadlines are still served.
            let mut batch = 0;
            while inflight < self.window && batch < 256 {
                batch += 1;
                let src = self.sources[next_src % self.sources.len()];
                next_src += 1;
                let dst = if src.is_ipv4() {
                    self.target_v4
                } else {
                    self.target_v6
                };
                let Some(fd) = open(src, dst) else {
                    st.local_errors += 1;
                    continue;
                };
                st.attempts += 1;
                generation = generation.wrapping_add(1).max(1);
                let i = usize::try_from(fd).unwrap_or(0);
                if owner.len() <= i {
                    owner.resize(i + 1, 0);
                    connected_fd.resize(i + 1, false);
                }
                owner[i] = generation;
                connected_fd[i] = false;
                let mut ev = libc::epoll_event {
                    events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP) as u32,
                    u64: u64::try_from(fd).unwrap_or(0),
                };
                // SAFETY: valid epoll fd, socket fd and event.
                unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &raw mut ev) };
                queue.push_back(Pending {
                    deadline: now + self.patience,
                    fd,
                    generation,
                });
                inflight += 1;
            }
            // SAFETY: valid buffer of events.len() entries.
            let n = unsafe {
                libc::epoll_wait(
                    ep,
                    events.as_mut_ptr(),
                    i32::try_from(events.len()).unwrap_or(1024),
                    i32::from(inflight >= self.window),
                )
            };
            for ev in events.iter().take(usize::try_from(n).unwrap_or(0)) {
                let fd = RawFd::try_from(ev.u64).unwrap_or(-1);
                let i = usize::try_from(fd).unwrap_or(0);
                if owner.get(i).copied().unwrap_or(0) == 0 {
                    continue;
                }
                let bits = ev.events;
                let err = bits & (libc::EPOLLERR as u32) != 0;
                let readable =
                    bits & ((libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP) as u32) != 0;
                if err {
                    if so_error(fd) == libc::ECONNREFUSED {
                        st.refused += 1;
                    } else {
                        st.unanswered += 1;
                    }
                    finish(fd, &mut owner, &mut inflight);
                } else if readable {
                    if !connected_fd[i] {
                        st.connected += 1;
                    }
                    st.answered += 1;
                    finish(fd, &mut owner, &mut inflight);
                } else if bits & (libc::EPOLLOUT as u32) != 0 && !connected_fd[i] {
                    // Connected; now wait for the server to speak or close.
                    connected_fd[i] = true;
                    st.connected += 1;
                    let mut ev = libc::epoll_event {
                        events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
                        u64: u64::try_from(fd).unwrap_or(0),
                    };
                    // SAFETY: valid epoll fd, registered socket, event.
                    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_MOD, fd, &raw mut ev) };
                }
            }
            let now = Instant::now();
            while queue.front().is_some_and(|p| p.deadline <= now) {
                let p = queue.pop_front().expect("front exists");
                let i = usize::try_from(p.fd).unwrap_or(0);
                if owner[i] == p.generation {
                    st.unanswered += 1;
                    finish(p.fd, &mut owner, &mut inflight);
                }
            }
        }
        st.elapsed = start.elapsed();
        // Attempts still in flight at the end count as unanswered.
        for p in queue {
            let i = usize::try_from(p.fd).unwrap_or(0);
            if owner[i] == p.generation {
                st.unanswered += 1;
                finish(p.fd, &mut owner, &mut inflight);
            }
        }
        close(ep);
        st
    }
}
