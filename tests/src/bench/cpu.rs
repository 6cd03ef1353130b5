//! CPU accounting from /proc: the host's softirq and irq time (where the
//! kernel drops or processes packets) and the CPU time of a process tree
//! (the daemon, or a Postfix master and its workers).

use std::{fs, time::Duration};

/// Clock ticks per second of /proc's time fields.
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        #[expect(clippy::cast_precision_loss, reason = "a small constant")]
        let f = t as f64;
        f
    } else {
        100.0
    }
}

fn ticks(n: u64) -> Duration {
    #[expect(
        clippy::cast_precision_loss,
        reason = "tick counts stay far below 2^52"
    )]
    let s = n as f64 / ticks_per_sec();
    Duration::from_secs_f64(s)
}

/// Host-wide CPU time spent in hardware and software interrupt context,
/// summed over all CPUs (the `irq` and `softirq` columns of /proc/stat).
///
/// Packet reception, XDP, nftables hooks and the TCP handshake all run
/// there. The kernel samples it per tick, so short windows are coarse.
pub fn host_interrupt_time() -> Duration {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().find(|l| l.starts_with("cpu ")).unwrap_or("");
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq ...
    ticks(f.get(5).copied().unwrap_or(0) + f.get(6).copied().unwrap_or(0))
}

struct ProcStat {
    ppid: i32,
    comm: String,
    /// utime + stime
    own: u64,
    /// cutime + cstime: exited, reaped children
    children: u64,
}

fn proc_stat(pid: i32) -> Option<ProcStat> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = s.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the comm: state(0) ppid(1) ... utime(11) stime(12)
    // cutime(13) cstime(14).
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    Some(ProcStat {
        ppid: f.get(1)?.parse().ok()?,
        comm,
        own: n(11) + n(12),
        children: n(13) + n(14),
    })
}

/// The live direct children of `pid` and their command names.
pub fn children(pid: i32) -> Vec<(i32, String)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|p| {
            let st = proc_stat(p)?;
            (st.ppid == pid).then_some((p, st.comm))
        })
        .collect()
}

/// CPU time used so far by `pid`, its live direct children, and its exited
/// children it has reaped. The difference of two readings is the tree's
/// CPU in between, including workers that came and went.
pub fn tree_time(pid: i32) -> Duration {
    let Some(root) = proc_stat(pid) else {
        return Duration::ZERO;
    };
    let live: u64 = children(pid)
        .iter()
        .filter_map(|(p, _)| proc_stat(*p).map(|s| s.own))
        .sum();
    ticks(root.own + root.children + live)
}

/// CPU time used so far by `pid` itself (all its threads).
pub fn own_time(pid: i32) -> Duration {
    proc_stat(pid).map_or(Duration::ZERO, |s| ticks(s.own))
}

/// Resident memory (`VmRSS`) of `pid` in bytes.
pub fn rss(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Proportional set size of `pid` in bytes: its resident memory with each
/// shared page divided among the processes mapping it, so the sum over
/// a process tree is what the tree really occupies.
pub fn pss(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// PSS of `pid` plus its live direct children, in bytes.
pub fn tree_pss(pid: i32) -> u64 {
    pss(pid) + children(pid).iter().map(|(p, _)| pss(*p)).sum::<u64>()
}
