//! The open-file limit, and how much of it SMTP clients may take.
//!
//! Every SMTP client holds a descriptor, every hand-off a second one (the
//! backend connection). systemd's default soft limit is 1,024: a flood of
//! idle clients would use them all, and then the admin socket, the store,
//! DNS queries and the backend connections of known-good clients fail with
//! `EMFILE`, so the daemon can neither be inspected nor deliver mail. So:
//!
//! - at start the soft limit is raised to the hard limit (the kernel's
//!   ceiling for an unprivileged raise);
//! - a RESERVE is kept for everything that is not a client about to be
//!   screened: the admin socket and its clients, the store, the kernel
//!   maps, DNS sockets, logs (`max(128, limit / 8)`), plus two descriptors
//!   per allowed hand-off (`screen.post_queue_limit`): the backend
//!   connection, and the client socket of a known-good client let in
//!   beyond the screening budget;
//! - a client to be screened beyond `limit - reserve` open clients is
//!   answered `421 4.3.2` at once and closed, before the daemon runs out;
//!   a known-good one (allowlisted, permitted, `PASS OLD`) still goes to
//!   the backend, up to `screen.post_queue_limit` more; past that nobody
//!   is accepted.

use std::io;

/// The soft and hard `RLIMIT_NOFILE`.
pub fn nofile() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// Raises the soft open-file limit to the hard limit; returns (before,
/// after).
pub fn raise_nofile() -> io::Result<(u64, u64)> {
    let (soft, hard) = nofile()?;
    if soft >= hard {
        return Ok((soft, soft));
    }
    let r = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((soft, hard))
}

/// Descriptors kept for everything but SMTP clients.
pub fn reserve(limit: u64, post_queue_limit: usize) -> u64 {
    (limit / 8).max(128) + 2 * post_queue_limit as u64
}

/// How many SMTP clients may be open at once under `limit`.
pub fn client_budget(limit: u64, post_queue_limit: usize) -> usize {
    usize::try_from(limit.saturating_sub(reserve(limit, post_queue_limit))).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_leaves_room_for_backends_and_the_rest() {
        // systemd's default soft limit with the default post-queue limit.
        assert_eq!(reserve(1024, 100), 328);
        assert_eq!(client_budget(1024, 100), 696);
        assert_eq!(client_budget(1 << 20, 100), (1 << 20) - (1 << 17) - 200);
        // A limit smaller than the reserve admits nobody rather than
        // promising descriptors that are not there.
        assert_eq!(client_budget(100, 100), 0);
    }

    #[test]
    fn raising_never_lowers() {
        let (before, after) = raise_nofile().unwrap();
        assert!(after >= before);
        assert_eq!(nofile().unwrap().0, after);
    }
}
