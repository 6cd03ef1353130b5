//! Open-file limits: the SMTP server never uses the descriptors the rest
//! of the daemon needs.
//!
//! Every client costs a socket, every hand-off a second one to the
//! backend. Under systemd's default soft limit (1024) a few thousand idle
//! connections would otherwise take the last descriptor: `accept` fails,
//! the admin socket cannot take `screener stats`, the store cannot open a
//! file, a known-good client cannot reach the backend.
//!
//! So at start the soft limit is raised to the hard limit, and the server
//! keeps a budget: the descriptors free at start, minus a reserve (an
//! eighth of the limit, at least 64) for the admin socket, the store, DNS
//! queries in flight and backend probes. A connection that arrives with
//! the budget spent gets `421 4.3.2` and is closed at once, unless it
//! turns out to be known-good (allowlisted, or a cached pass): those may
//! use half of the reserve, so a known sender still reaches the backend
//! while a horde of idle connections holds the rest.

use std::io;

/// The open-file limits around a raise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoFile {
    /// The soft limit found at start.
    pub soft_before: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit (never changed).
    pub hard: u64,
}

/// Raises the soft open-file limit to the hard limit (or to
/// `fs.nr_open` when the hard limit is unlimited).
pub fn raise_soft_limit() -> io::Result<NoFile> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let soft_before = r.rlim_cur;
    let mut target = r.rlim_max;
    if target == libc::RLIM_INFINITY {
        // The kernel refuses more than fs.nr_open descriptors anyway.
        target = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    if target > r.rlim_cur {
        r.rlim_cur = target;
        // SAFETY: a valid pointer to an rlimit; the soft limit stays at or
        // below the hard one.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const r) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(NoFile {
        soft_before,
        soft: r.rlim_cur,
        hard: r.rlim_max,
    })
}

/// The soft open-file limit now.
pub fn soft_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut r) } != 0 {
        return 1024;
    }
    r.rlim_cur
}

/// Descriptors this process has open now.
pub fn in_use() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

/// How many descriptors the SMTP server may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// The soft open-file limit.
    pub limit: u64,
    /// Descriptors kept for everything but SMTP connections.
    pub reserve: usize,
    /// Client and backend sockets any connection may bring the count to.
    pub cap: usize,
    /// The count a known-good client may still bring it to.
    pub known_good_cap: usize,
}

/// What a new connection may do, given the descriptors held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Room {
    /// Within the budget.
    Free,
    /// Past it: only a known-good client goes on.
    KnownGoodOnly,
    /// Past the known-good share too: refused before anything else.
    Full,
}

impl Budget {
    /// The budget under `limit` with `in_use` descriptors already open.
    pub fn new(limit: u64, in_use: usize) -> Budget {
        let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
        let reserve = (limit_usize / 8).max(64);
        let cap = limit_usize.saturating_sub(in_use.saturating_add(reserve));
        Budget {
            limit,
            reserve,
            cap,
            known_good_cap: cap.saturating_add(reserve / 2),
        }
    }

    /// The budget of this process now.
    pub fn current() -> Budget {
        Budget::new(soft_limit(), in_use())
    }

    /// Room for one more connection with `held` descriptors held.
    pub fn room(&self, held: usize) -> Room {
        if held < self.cap {
            Room::Free
        } else if held < self.known_good_cap {
            Room::KnownGoodOnly
        } else {
            Room::Full
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_under_the_default_soft_limit() {
        let b = Budget::new(1024, 20);
        assert_eq!(b.reserve, 128);
        assert_eq!(b.cap, 1024 - 20 - 128);
        assert_eq!(b.known_good_cap, b.cap + 64);
        assert_eq!(b.room(0), Room::Free);
        assert_eq!(b.room(b.cap - 1), Room::Free);
        assert_eq!(b.room(b.cap), Room::KnownGoodOnly);
        assert_eq!(b.room(b.known_good_cap), Room::Full);
    }

    #[test]
    fn reserve_grows_with_the_limit_and_never_underflows() {
        assert_eq!(Budget::new(1 << 20, 50).reserve, 1 << 17);
        assert_eq!(Budget::new(256, 20).reserve, 64);
        let tiny = Budget::new(64, 30);
        assert_eq!(tiny.cap, 0);
        assert_eq!(tiny.room(0), Room::KnownGoodOnly);
        assert_eq!(Budget::new(u64::MAX, 0).room(1 << 30), Room::Free);
    }

    #[test]
    fn raising_reaches_the_hard_limit() {
        let n = raise_soft_limit().expect("getrlimit/setrlimit");
        assert!(n.soft >= n.soft_before);
        assert_eq!(soft_limit(), n.soft);
        assert!(in_use() >= 3);
    }
}
