//! Dropping privileges between start and serve.
//!
//! [`super::start`] opens everything that needs root; what runs after it
//! parses SMTP from the internet and must not run as root. Here the files
//! the daemon still writes are handed to `daemon.user` (the admin socket,
//! with group `daemon.admin_group` and mode 0660, the store, the pins),
//! then every thread switches to that account and keeps only [`KEPT`].
//!
//! WHICH CAPABILITIES, AND WHY (measured on Linux 6.18 with
//! `kernel.unprivileged_bpf_disabled = 2`). Map lookups, updates and
//! deletes go through map descriptors opened at start and need none; so
//! do opening a pin (`BPF_OBJ_GET`, file permissions only), pinning again
//! (write permission on the pin directory), creating an XDP link from a
//! program descriptor already held (`BPF_LINK_CREATE`: the watchdog's
//! re-attach) and detaching one. What does need them is a reload that
//! changes `xdp.interfaces`, `xdp.mode` or `xdp.log_level`, which loads a
//! new program instance: `BPF_PROG_LOAD` of an XDP program wants
//! `CAP_BPF` and `CAP_NET_ADMIN`, and the verifier refuses the program's
//! packet pointer arithmetic without `CAP_PERFMON` ("pointer arithmetic
//! prohibited for !root"); its log ring buffer is a new map (`CAP_BPF`).
//! A reload that adds an `smtp.listen` port below 1024 binds it
//! (`CAP_NET_BIND_SERVICE`). These four are kept so a reload works as a
//! restart would; everything else is dropped from the effective,
//! permitted, inheritable, ambient and (where allowed) bounding sets.
//! With `--no-xdp` only `CAP_NET_BIND_SERVICE` is kept.
//!
//! EVERY THREAD. Credentials are per thread in Linux and the runtime's
//! threads already run when start is done. glibc's `setresuid` changes
//! every thread but `capset` and `prctl` do not, so the whole switch runs
//! in each thread from a signal handler (as glibc does for `setxid`),
//! with raw system calls only, and is then checked thread by thread in
//! `/proc/self/task`.

use std::{
    ffi::CString,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use crate::config;

/// Capability numbers (linux/capability.h).
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What the daemon keeps after start, with the XDP gate (see the module
/// docs for why each).
pub const KEPT: &[(u32, &str)] = &[
    (CAP_NET_BIND_SERVICE, "cap_net_bind_service"),
    (CAP_NET_ADMIN, "cap_net_admin"),
    (CAP_PERFMON, "cap_perfmon"),
    (CAP_BPF, "cap_bpf"),
];

/// A privilege drop that failed; the daemon does not serve.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("daemon.user = {name:?}: no such user; create it (the package does: adduser --system --group screener) or set daemon.user = \"root\" to run as root")]
    NoUser { name: String },
    #[error("daemon.admin_group = {name:?}: no such group")]
    NoGroup { name: String },
    #[error("{key} = {name:?}: looking it up: {source}")]
    Lookup {
        key: &'static str,
        name: String,
        source: std::io::Error,
    },
    #[error("daemon.user = {name:?} (uid {uid}), but the daemon runs as uid {running} without CAP_SETUID and CAP_SETGID to switch; start it as root (with them) or as {name:?}")]
    CannotSwitch {
        name: String,
        uid: u32,
        running: u32,
    },
    #[error("handing {path} to daemon.user: {source}")]
    Chown {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("daemon.admin_group (gid {gid}): the admin socket cannot be given to it: {source}; start the daemon as root, or make daemon.user a member of the group (systemd SupplementaryGroups=)")]
    AdminGroup { gid: u32, source: std::io::Error },
    #[error("dropping privileges: {call} failed in a thread: {source}")]
    Call {
        call: &'static str,
        source: std::io::Error,
    },
    #[error("dropping privileges: {0}")]
    Check(String),
}

/// The accounts named by `[daemon]`, looked up.
#[derive(Clone, Debug)]
pub struct Account {
    /// `daemon.user`, for messages.
    pub name: String,
    /// Its uid; 0 for root (no switch).
    pub uid: u32,
    /// Its primary group, the daemon's only group after the switch.
    pub gid: u32,
    /// `daemon.admin_group`'s gid: the admin socket's group.
    pub admin_gid: u32,
}

impl Account {
    /// Looks both names up; a missing one is an error naming its key.
    pub fn resolve(cfg: &config::Daemon) -> Result<Account, PrivilegeError> {
        let (uid, gid) = lookup_user(&cfg.user)?.ok_or_else(|| PrivilegeError::NoUser {
            name: cfg.user.clone(),
        })?;
        let admin_gid = lookup_group(&cfg.admin_group)?.ok_or_else(|| PrivilegeError::NoGroup {
            name: cfg.admin_group.clone(),
        })?;
        Ok(Account {
            name: cfg.user.clone(),
            uid,
            gid,
            admin_gid,
        })
    }

    /// `daemon.user = "root"`: nothing is dropped, the daemon keeps
    /// running as root with every capability it was started with.
    pub fn keeps_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether the daemon changes uid to this account.
    fn switches(&self) -> bool {
        // SAFETY: getuid cannot fail.
        self.uid != unsafe { libc::getuid() }
    }
}

/// The capabilities the daemon keeps: [`KEPT`], or only the port binding
/// without XDP.
pub fn kept(no_xdp: bool) -> u64 {
    KEPT.iter()
        .filter(|(c, _)| !no_xdp || *c == CAP_NET_BIND_SERVICE)
        .fold(0, |m, (c, _)| m | 1 << c)
}

/// Names of the capabilities in `mask`, for the log.
pub fn names(mask: u64) -> String {
    let named: Vec<String> = (0..64)
        .filter(|c| mask & (1 << c) != 0)
        .map(|c| {
            KEPT.iter()
                .find(|(k, _)| *k == c)
                .map_or_else(|| format!("cap_{c}"), |(_, n)| (*n).to_owned())
        })
        .collect();
    if named.is_empty() {
        "none".into()
    } else {
        named.join(",")
    }
}

/// What the daemon writes after start, handed to `daemon.user`.
pub struct Owned<'a> {
    /// The admin socket: user and `daemon.admin_group`, 0660.
    pub admin_socket: &'a Path,
    /// Its directory when start created it: user and admin group, 0710,
    /// so the group's members reach the socket.
    pub admin_dir: Option<&'a Path>,
    /// The store file.
    pub store: &'a Path,
    /// `xdp.pin_path` (`None` without XDP): the directory and every pin,
    /// so the watchdog can open and pin again.
    pub pins: Option<&'a Path>,
}

/// Everything between start and serve: opens the admin socket to the
/// admin group, then (unless `daemon.user = "root"`) hands the files over
/// and drops to the account with only the capabilities a reload needs.
pub fn after_start(
    account: &Account,
    owned: &Owned<'_>,
    no_xdp: bool,
) -> Result<(), PrivilegeError> {
    let switch = account.switches() && !account.keeps_root();
    open_admin(account, owned, switch)?;
    if account.keeps_root() {
        tracing::warn!(
            "daemon.user = \"root\": privileges not dropped, the daemon keeps the account and every capability it started with"
        );
        return Ok(());
    }
    if switch {
        hand_over(account, owned)?;
    }
    let dropped = drop_to(account, kept(no_xdp))?;
    tracing::info!(
        user = %account.name,
        uid = dropped.uid,
        kept = %names(dropped.kept),
        "privileges dropped"
    );
    if dropped.bounding_extra != 0 {
        tracing::warn!(
            bounding = %names(dropped.bounding_extra),
            "the capability bounding set still holds more than the daemon keeps (dropping them needs CAP_SETPCAP); bound it from outside (systemd CapabilityBoundingSet=)"
        );
    }
    Ok(())
}

/// The admin socket (and the directory start made for it) to group
/// `daemon.admin_group`, mode 0660; to `daemon.user` too when the daemon
/// switches to it.
fn open_admin(account: &Account, owned: &Owned<'_>, switch: bool) -> Result<(), PrivilegeError> {
    let uid = switch.then_some(account.uid);
    let group = |path: &Path, mode: u32| -> Result<(), PrivilegeError> {
        let err = |source| PrivilegeError::Chown {
            path: path.to_owned(),
            source,
        };
        let had = std::fs::metadata(path).map_err(err)?;
        if uid.is_some_and(|u| u != had.uid()) || had.gid() != account.admin_gid {
            match std::os::unix::fs::chown(path, uid, Some(account.admin_gid)) {
                // A daemon started without root (systemd User=) cannot
                // give its socket to root's group; its own group, which
                // only it is in, keeps the socket to root and itself.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) && account.admin_gid == 0 => {}
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    return Err(PrivilegeError::AdminGroup {
                        gid: account.admin_gid,
                        source: e,
                    })
                }
                r => r.map_err(err)?,
            }
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)
    };
    group(owned.admin_socket, 0o660)?;
    if let Some(dir) = owned.admin_dir {
        group(dir, 0o710)?;
    }
    Ok(())
}

/// Chowns the store and the pins to the account, before the switch (with
/// the privilege to chown).
fn hand_over(account: &Account, owned: &Owned<'_>) -> Result<(), PrivilegeError> {
    let (uid, gid) = (account.uid, account.gid);
    chown(owned.store, uid, gid)?;
    // The store's directory only when it holds nothing but the store's
    // files (/var/lib/screener): a shared one is not the daemon's to take.
    if let Some(dir) = owned.store.parent().filter(|d| dedicated(d, owned.store)) {
        chown(dir, uid, gid)?;
    }
    if let Some(pins) = owned.pins {
        // Never the bpffs root itself: other programs pin there.
        if pins != Path::new("/sys/fs/bpf") {
            chown(pins, uid, gid)?;
        }
        let entries = std::fs::read_dir(pins).map_err(|source| PrivilegeError::Chown {
            path: pins.to_owned(),
            source,
        })?;
        for e in entries.filter_map(Result::ok) {
            chown(&e.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Whether every entry of `dir` belongs to the store at `store`.
fn dedicated(dir: &Path, store: &Path) -> bool {
    let Some(name) = store.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return false;
    };
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(Result::ok)
            .all(|e| e.file_name().to_string_lossy().starts_with(&name))
    })
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), PrivilegeError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| PrivilegeError::Chown {
        path: path.to_owned(),
        source,
    })
}

/// What the switch did, for the start-up log.
#[derive(Debug)]
pub struct Dropped {
    /// The uid every thread now runs as.
    pub uid: u32,
    /// The capabilities every thread kept.
    pub kept: u64,
    /// Capabilities still in the bounding set beyond the kept ones
    /// (dropping them needs `CAP_SETPCAP`, which a non-root start lacks:
    /// systemd's `CapabilityBoundingSet=` bounds it instead).
    pub bounding_extra: u64,
}

/// Switches every thread to `account` keeping `keep` of the capabilities
/// it holds, clears the ambient set and what it may of the bounding set,
/// then checks every thread did.
pub fn drop_to(account: &Account, keep: u64) -> Result<Dropped, PrivilegeError> {
    // SAFETY: getuid cannot fail.
    let running = unsafe { libc::getuid() };
    let switch = account.switches();
    let caps = Caps::of_this_thread()?;
    let may_switch = 1 << CAP_SETUID | 1 << CAP_SETGID;
    if switch && caps.effective & may_switch != may_switch {
        return Err(PrivilegeError::CannotSwitch {
            name: account.name.clone(),
            uid: account.uid,
            running,
        });
    }
    let keep = keep & caps.permitted;
    let plan = Plan {
        switch,
        uid: account.uid,
        gid: account.gid,
        keep,
        drop_bounding: caps.effective & (1 << CAP_SETPCAP) != 0,
        last_cap: last_cap(),
    };
    broadcast(&plan)?;
    verify(&plan)
}

/// The switch one thread makes.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Whether uid and gid change.
    switch: bool,
    /// The uid to switch to.
    uid: u32,
    /// The only group after the switch.
    gid: u32,
    /// Effective and permitted capabilities afterwards.
    keep: u64,
    /// Whether the bounding set can be cut to `keep` (`CAP_SETPCAP`).
    drop_bounding: bool,
    /// The highest capability number the kernel knows.
    last_cap: u32,
}

/// `/proc/sys/kernel/cap_last_cap`, or 40 (`CAP_CHECKPOINT_RESTORE`).
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// The plan, where the signal handler can read it without locking.
static PLAN_UID: AtomicU32 = AtomicU32::new(0);
static PLAN_GID: AtomicU32 = AtomicU32::new(0);
static PLAN_KEEP: AtomicU64 = AtomicU64::new(0);
/// Bit 0: switch, bit 1: drop bounding; bits 8..: `last_cap`.
static PLAN_FLAGS: AtomicU32 = AtomicU32::new(0);
/// Threads that ran the plan since the broadcast began.
static DONE: AtomicUsize = AtomicUsize::new(0);
/// The first failure in any thread: `call index << 16 | errno`, 0 = none.
static FAILED: AtomicI32 = AtomicI32::new(0);
/// One broadcast at a time.
static BROADCAST: Mutex<()> = Mutex::new(());

/// The calls [`apply`] makes, by the index it records on failure.
const CALLS: [&str; 7] = [
    "prctl(PR_SET_KEEPCAPS)",
    "prctl(PR_CAPBSET_DROP)",
    "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
    "setgroups",
    "setresgid",
    "setresuid",
    "capset",
];

/// Runs the published plan in the calling thread with raw system calls
/// only (it runs in a signal handler). Records the first failure.
fn apply() {
    let flags = PLAN_FLAGS.load(Ordering::Acquire);
    let (switch, drop_bounding, last_cap) = (flags & 1 != 0, flags & 2 != 0, flags >> 8);
    let (uid, gid) = (
        PLAN_UID.load(Ordering::Acquire),
        PLAN_GID.load(Ordering::Acquire),
    );
    let keep = PLAN_KEEP.load(Ordering::Acquire);
    let fail = |call: i32| {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let _ = FAILED.compare_exchange(0, call << 16 | errno, Ordering::AcqRel, Ordering::Acquire);
    };
    // SAFETY: plain system calls on this thread's credentials, with
    // arguments built above; no memory is shared but `gid` and `caps`,
    // which live on this stack for the call.
    unsafe {
        if switch && libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            return fail(0);
        }
        if drop_bounding {
            for cap in (0..=last_cap).filter(|c| keep & (1 << c) == 0) {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    return fail(1);
                }
            }
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) != 0
        {
            return fail(2);
        }
        if switch {
            let groups = [gid];
            if libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) != 0 {
                return fail(3);
            }
            if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
                return fail(4);
            }
            if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
                return fail(5);
            }
        }
        let header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let data = CapData::both(keep, keep, 0);
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
            return fail(6);
        }
        if switch {
            // Off again: later uid changes (none are made) get the
            // ordinary rules.
            let _ = libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0);
        }
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    apply();
    DONE.fetch_add(1, Ordering::AcqRel);
}

/// The signal the switch is carried to the other threads with: a
/// real-time one above glibc's own, which nothing else in the daemon uses.
fn signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

/// How long the other threads get to run the plan.
const BROADCAST_DEADLINE: Duration = Duration::from_secs(5);

/// Runs the plan in this thread and in every other thread of the process,
/// until a pass over `/proc/self/task` finds no thread left (a thread
/// created meanwhile by one not yet switched is found by the next pass).
fn broadcast(plan: &Plan) -> Result<(), PrivilegeError> {
    let _one = BROADCAST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    PLAN_UID.store(plan.uid, Ordering::Release);
    PLAN_GID.store(plan.gid, Ordering::Release);
    PLAN_KEEP.store(plan.keep, Ordering::Release);
    PLAN_FLAGS.store(
        u32::from(plan.switch) | u32::from(plan.drop_bounding) << 1 | plan.last_cap << 8,
        Ordering::Release,
    );
    FAILED.store(0, Ordering::Release);
    DONE.store(0, Ordering::Release);
    // SAFETY: installs a handler that only makes system calls and touches
    // atomics; the previous disposition is put back below.
    let old = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&raw mut action.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(signal(), &raw const action, &raw mut old) != 0 {
            return Err(PrivilegeError::Call {
                call: "sigaction",
                source: std::io::Error::last_os_error(),
            });
        }
        old
    };
    let result = signal_all();
    // SAFETY: restores the disposition saved above.
    unsafe {
        libc::sigaction(signal(), &raw const old, std::ptr::null_mut());
    }
    result?;
    match FAILED.load(Ordering::Acquire) {
        0 => Ok(()),
        f => Err(PrivilegeError::Call {
            call: CALLS[usize::try_from(f >> 16).unwrap_or(0).min(CALLS.len() - 1)],
            source: std::io::Error::from_raw_os_error(f & 0xffff),
        }),
    }
}

/// Applies the plan here, then signals every other thread and waits.
fn signal_all() -> Result<(), PrivilegeError> {
    // SAFETY: these return ids and cannot fail.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    apply();
    let mut done = std::collections::HashSet::from([me]);
    let deadline = Instant::now() + BROADCAST_DEADLINE;
    loop {
        let fresh: Vec<i32> = threads()?
            .into_iter()
            .filter(|t| !done.contains(t))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let before = DONE.load(Ordering::Acquire);
        let mut sent = 0;
        for &tid in &fresh {
            // SAFETY: tgkill to a thread of this process; one that ended
            // meanwhile gives ESRCH and is not waited for.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal()) } == 0 {
                sent += 1;
            }
            done.insert(tid);
        }
        while DONE.load(Ordering::Acquire) < before + sent {
            if Instant::now() > deadline {
                return Err(PrivilegeError::Check(format!(
                    "{} of {sent} threads did not switch within {BROADCAST_DEADLINE:?}",
                    before + sent - DONE.load(Ordering::Acquire)
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The ids of this process's threads.
fn threads() -> Result<Vec<i32>, PrivilegeError> {
    let rd = std::fs::read_dir("/proc/self/task")
        .map_err(|e| PrivilegeError::Check(format!("/proc/self/task: {e}")))?;
    Ok(rd
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect())
}

/// Checks every thread's `status`: the uid, and exactly `keep` effective
/// and permitted, nothing inheritable or ambient.
fn verify(plan: &Plan) -> Result<Dropped, PrivilegeError> {
    let mut bounding_extra = 0;
    for tid in threads()? {
        let Ok(status) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
            continue; // ended meanwhile
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_owned()
        };
        let mask = |name: &str| u64::from_str_radix(&field(name), 16).unwrap_or(u64::MAX);
        let uids: Vec<String> = field("Uid:")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let want_uid = plan.uid.to_string();
        if plan.switch && uids.iter().any(|u| *u != want_uid) {
            return Err(PrivilegeError::Check(format!(
                "thread {tid} still runs as uid {}",
                uids.join(" ")
            )));
        }
        for (name, want) in [
            ("CapEff:", plan.keep),
            ("CapPrm:", plan.keep),
            ("CapInh:", 0),
            ("CapAmb:", 0),
        ] {
            let got = mask(name);
            if got != want {
                return Err(PrivilegeError::Check(format!(
                    "thread {tid}: {name} {got:016x}, wanted {want:016x}"
                )));
            }
        }
        bounding_extra |= mask("CapBnd:") & !plan.keep;
    }
    Ok(Dropped {
        uid: plan.uid,
        kept: plan.keep,
        bounding_extra,
    })
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`, one per 32 capabilities.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

impl CapData {
    /// The two words of each 64-bit set.
    fn both(effective: u64, permitted: u64, inheritable: u64) -> [CapData; 2] {
        // The low 32 bits of the shifted mask: the truncation is the point.
        let word = |m: u64, i: u32| u32::try_from((m >> (32 * i)) & 0xffff_ffff).unwrap_or(0);
        [0, 1].map(|i| CapData {
            effective: word(effective, i),
            permitted: word(permitted, i),
            inheritable: word(inheritable, i),
        })
    }
}

/// One thread's capability sets.
struct Caps {
    /// What it may use now.
    effective: u64,
    /// What it may raise.
    permitted: u64,
}

impl Caps {
    fn of_this_thread() -> Result<Caps, PrivilegeError> {
        let header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        // SAFETY: capget fills two CapData for version 3.
        let r = unsafe { libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) };
        if r != 0 {
            return Err(PrivilegeError::Call {
                call: "capget",
                source: std::io::Error::last_os_error(),
            });
        }
        let join = |lo: u32, hi: u32| u64::from(lo) | u64::from(hi) << 32;
        Ok(Caps {
            effective: join(data[0].effective, data[1].effective),
            permitted: join(data[0].permitted, data[1].permitted),
        })
    }
}

/// `(uid, primary gid)` of `name`, `None` when there is no such user.
fn lookup_user(name: &str) -> Result<Option<(u32, u32)>, PrivilegeError> {
    let err = |source| PrivilegeError::Lookup {
        key: "daemon.user",
        name: name.to_owned(),
        source,
    };
    let c = CString::new(name).map_err(|e| err(std::io::Error::other(e)))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: getpwnam_r writes into `pwd` and `buf`, both live for
        // the call; `found` points at `pwd` or is null.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let r = unsafe {
            libc::getpwnam_r(
                c.as_ptr(),
                &raw mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &raw mut found,
            )
        };
        match r {
            0 if found.is_null() => return Ok(None),
            0 => return Ok(Some((pwd.pw_uid, pwd.pw_gid))),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            libc::ENOENT | libc::ESRCH => return Ok(None),
            e => return Err(err(std::io::Error::from_raw_os_error(e))),
        }
    }
}

/// The gid of group `name`, `None` when there is no such group.
fn lookup_group(name: &str) -> Result<Option<u32>, PrivilegeError> {
    let err = |source| PrivilegeError::Lookup {
        key: "daemon.admin_group",
        name: name.to_owned(),
        source,
    };
    let c = CString::new(name).map_err(|e| err(std::io::Error::other(e)))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: as in lookup_user, for getgrnam_r.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        let r = unsafe {
            libc::getgrnam_r(
                c.as_ptr(),
                &raw mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &raw mut found,
            )
        };
        match r {
            0 if found.is_null() => return Ok(None),
            0 => return Ok(Some(grp.gr_gid)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            libc::ENOENT | libc::ESRCH => return Ok(None),
            e => return Err(err(std::io::Error::from_raw_os_error(e))),
        }
    }
}

/// For `config check`: both accounts exist.
pub fn check_accounts(cfg: &config::Daemon) -> Result<(), PrivilegeError> {
    Account::resolve(cfg).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_names_the_four_or_only_the_port() {
        assert_eq!(
            names(kept(false)),
            "cap_net_bind_service,cap_net_admin,cap_perfmon,cap_bpf"
        );
        assert_eq!(names(kept(true)), "cap_net_bind_service");
    }

    #[test]
    fn a_missing_user_names_the_key() {
        let cfg = config::Daemon {
            user: "no-such-user-here".into(),
            admin_group: "root".into(),
        };
        let e = Account::resolve(&cfg).unwrap_err().to_string();
        assert!(e.contains("daemon.user = \"no-such-user-here\""), "{e}");
        let cfg = config::Daemon {
            user: "root".into(),
            admin_group: "no-such-group-here".into(),
        };
        let e = Account::resolve(&cfg).unwrap_err().to_string();
        assert!(e.contains("daemon.admin_group"), "{e}");
    }

    #[test]
    fn root_resolves_to_uid_zero() {
        let cfg = config::Daemon {
            user: "root".into(),
            admin_group: "root".into(),
        };
        let a = Account::resolve(&cfg).unwrap();
        assert_eq!((a.uid, a.gid, a.admin_gid), (0, 0, 0));
        assert!(a.keeps_root());
    }

    #[test]
    fn cap_data_splits_the_words() {
        let d = CapData::both(1 << CAP_BPF | 1 << CAP_NET_ADMIN, 1 << CAP_PERFMON, 0);
        assert_eq!(d[0].effective, 1 << CAP_NET_ADMIN);
        assert_eq!(d[1].effective, 1 << (CAP_BPF - 32));
        assert_eq!(d[1].permitted, 1 << (CAP_PERFMON - 32));
    }
}
