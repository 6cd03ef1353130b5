//! The first hour: `cargo xtask run` starts a private Postfix instance as
//! the backend and the daemon in front of it, so a test mail sent with
//! swaks to the screener's port is screened (`PASS NEW`, then `PASS OLD`)
//! and delivered to a mailbox file.
//!
//! THE BACKEND. A Postfix instance of its own (`postfix -c var/postfix`):
//! its configuration, queue, data directory and log under `var/postfix/`,
//! smtpd on the configuration's `smtp.backend` (127.0.0.1:10025) with
//! `smtpd_upstream_proxy_protocol = haproxy`, as a production MTA behind
//! the screener is set up. Mail to any `user@localhost` is delivered by
//! Postfix's `virtual` agent into one mbox file, `var/mail/inbox`. No
//! system MTA is touched: nothing is installed in `/etc/postfix` and
//! nothing listens anywhere but on loopback.
//!
//! STOPPING. [`Demo::stop`] (and drop) ends the daemon with SIGTERM, as
//! Ctrl-C does, then the Postfix instance. The XDP gate stays attached,
//! as it does whenever the daemon stops; the message says how to detach it.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// What the demonstration runs and where.
#[derive(Clone, Debug)]
pub struct Options {
    /// The `screener` binary.
    pub screener: PathBuf,
    /// Its configuration file (`./screener.toml`).
    pub config: PathBuf,
    /// Where the Postfix instance and the mailbox go (`./var`).
    pub var: PathBuf,
    /// Where the daemon's output goes; `None`: this process's terminal.
    pub log: Option<PathBuf>,
    /// More arguments for `screener run` (`--no-xdp`).
    pub run_args: Vec<String>,
}

/// A running backend and daemon; both stopped on drop.
pub struct Demo {
    /// How it was started (paths for the messages and for stopping).
    opts: Options,
    /// The Postfix instance's configuration directory, while it runs.
    postfix: Option<PathBuf>,
    /// The daemon, while it runs.
    screener: Option<Child>,
}

/// How long Postfix and the daemon get to come up or go down.
const PATIENCE: Duration = Duration::from_secs(30);

impl Demo {
    /// Starts the backend, then the daemon in front of it, and waits until
    /// the backend accepts connections.
    pub fn start(opts: Options) -> Result<Demo> {
        let backend = backend_of(&opts)?;
        std::fs::create_dir_all(&opts.var)
            .with_context(|| format!("creating {}", opts.var.display()))?;
        let mut demo = Demo {
            opts,
            postfix: None,
            screener: None,
        };
        let dir = demo.write_postfix(backend)?;
        if master_alive(&dir.join("queue/pid/master.pid")) {
            // Left running by a run that was killed before it could stop it.
            say("==> stopping the backend Postfix a previous run left running");
            let _ = Command::new("postfix")
                .arg("-c")
                .arg(&dir)
                .arg("stop")
                .output();
            let end = Instant::now() + PATIENCE;
            while master_alive(&dir.join("queue/pid/master.pid")) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let out = Command::new("postfix")
            .arg("-c")
            .arg(&dir)
            .arg("start")
            .output()
            .context("cannot run postfix (Debian package postfix)")?;
        if !out.status.success() {
            bail!(
                "postfix -c {} start failed: {}{}",
                dir.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        demo.postfix = Some(dir);
        let end = Instant::now() + PATIENCE;
        while TcpStream::connect_timeout(&backend, Duration::from_secs(1)).is_err() {
            if Instant::now() > end {
                bail!(
                    "the backend Postfix does not listen on {backend} after {PATIENCE:?}; see {}",
                    demo.maillog().display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut c = Command::new(&demo.opts.screener);
        c.arg("-c")
            .arg(&demo.opts.config)
            .arg("run")
            .args(&demo.opts.run_args);
        if let Some(log) = &demo.opts.log {
            let f = std::fs::File::create(log)
                .with_context(|| format!("creating {}", log.display()))?;
            c.stdout(Stdio::from(f.try_clone()?)).stderr(Stdio::from(f));
        }
        demo.screener = Some(
            c.spawn()
                .with_context(|| format!("cannot start {}", demo.opts.screener.display()))?,
        );
        Ok(demo)
    }

    /// The mbox file mail to `user@localhost` is delivered to.
    pub fn mailbox(&self) -> PathBuf {
        mailbox(&self.opts.var)
    }

    /// The backend Postfix's log.
    pub fn maillog(&self) -> PathBuf {
        self.opts.var.join("postfix/maillog")
    }

    /// Waits until the daemon exits (its status) or `stop` turns true
    /// (`None`).
    pub fn wait(&mut self, stop: &AtomicBool) -> Result<Option<ExitStatus>> {
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            if let Some(child) = self.screener.as_mut() {
                if let Some(st) = child.try_wait()? {
                    self.screener = None;
                    return Ok(Some(st));
                }
            } else {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the daemon (SIGTERM, as Ctrl-C does, then SIGKILL after
    /// [`PATIENCE`]) and the Postfix instance; returns what to tell the
    /// operator.
    pub fn stop(&mut self) -> String {
        if let Some(mut child) = self.screener.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) on the child this guard started and has
                // not reaped yet, so the pid is still ours.
                unsafe { kill(pid, SIGTERM) };
            }
            let end = Instant::now() + PATIENCE;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = self.postfix.take() {
            let _ = Command::new("postfix")
                .arg("-c")
                .arg(&dir)
                .arg("stop")
                .output();
            // `stop` returns before master exits; wait for its pid file
            // to go so the next start finds no half-stopped instance.
            let pid = dir.join("queue/pid/master.pid");
            let end = Instant::now() + PATIENCE;
            while master_alive(&pid) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        format!(
            "stopped the daemon and the backend Postfix (mail so far: {mailbox}).\n\
             The XDP gate stays attached and keeps dropping what it blocked; remove it with\n    \
             {bin} -c {cfg} xdp detach",
            mailbox = self.mailbox().display(),
            bin = self.opts.screener.display(),
            cfg = self.opts.config.display(),
        )
    }

    /// Writes the instance's `main.cf` and `master.cf` under
    /// `var/postfix` and prepares its directories; returns the directory.
    fn write_postfix(&self, backend: SocketAddr) -> Result<PathBuf> {
        let var = std::fs::canonicalize(&self.opts.var)?;
        reachable_by_postfix(&var)?;
        let root = var.join("postfix");
        let queue = root.join("queue");
        let data = root.join("data");
        let mail = var.join("mail");
        for d in [&root, &queue, &data, &mail] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        // Postfix's daemons run as the postfix user: they must reach the
        // queue, own the data directory, and (delivering as that user)
        // write the mailbox.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
        let (uid, gid) = postfix_user()?;
        for d in [&data, &mail] {
            std::os::unix::fs::chown(d, Some(uid), Some(gid))
                .with_context(|| format!("giving {} to the postfix user", d.display()))?;
        }
        let main = format!(
            "# Written by `cargo xtask run`: the demonstration's backend MTA.\n\
             compatibility_level = 3.6\n\
             queue_directory = {queue}\n\
             data_directory = {data}\n\
             maillog_file = {root}/maillog\n\
             maillog_file_prefixes = {root}\n\
             myhostname = backend.localhost\n\
             mydomain = localhost\n\
             mydestination =\n\
             inet_interfaces = {ip}\n\
             inet_protocols = ipv4\n\
             mynetworks = 127.0.0.0/8\n\
             alias_maps =\n\
             alias_database =\n\
             smtpd_client_port_logging = yes\n\
             # The screener in front sends the real client in a PROXY header.\n\
             smtpd_upstream_proxy_protocol = haproxy\n\
             smtpd_upstream_proxy_timeout = 10s\n\
             # Every user@localhost gets the same mbox file.\n\
             virtual_mailbox_domains = localhost\n\
             virtual_mailbox_base = {mail}\n\
             virtual_mailbox_maps = static:inbox\n\
             virtual_uid_maps = static:{uid}\n\
             virtual_gid_maps = static:{gid}\n\
             virtual_minimum_uid = 1\n",
            queue = queue.display(),
            data = data.display(),
            root = root.display(),
            ip = backend.ip(),
            mail = mail.display(),
        );
        std::fs::write(root.join("main.cf"), main)?;
        let master = format!(
            "{backend} inet n - n - - smtpd\n\
             pickup unix n - n 60 1 pickup\n\
             cleanup unix n - n - 0 cleanup\n\
             qmgr unix n - n 300 1 qmgr\n\
             rewrite unix - - n - - trivial-rewrite\n\
             bounce unix - - n - 0 bounce\n\
             defer unix - - n - 0 bounce\n\
             trace unix - - n - 0 bounce\n\
             verify unix - - n - 1 verify\n\
             flush unix n - n 1000? 0 flush\n\
             proxymap unix - - n - - proxymap\n\
             smtp unix - - n - - smtp\n\
             showq unix n - n - - showq\n\
             error unix - - n - - error\n\
             retry unix - - n - - error\n\
             discard unix - - n - - discard\n\
             virtual unix - n n - - virtual\n\
             anvil unix - - n - 1 anvil\n\
             scache unix - - n - 1 scache\n\
             postlog unix-dgram n - n - 1 postlogd\n"
        );
        std::fs::write(root.join("master.cf"), master)?;
        Ok(root)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The mbox file under `var`.
pub fn mailbox(var: &Path) -> PathBuf {
    var.join("mail/inbox")
}

/// The configuration's `smtp.backend`, as the daemon itself reads it.
fn backend_of(opts: &Options) -> Result<SocketAddr> {
    let out = Command::new(&opts.screener)
        .arg("-c")
        .arg(&opts.config)
        .args(["config", "show", "smtp.backend"])
        .output()
        .with_context(|| format!("cannot run {}", opts.screener.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "reading smtp.backend from {}: {}",
            opts.config.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let value = text
        .trim()
        .strip_prefix("smtp.backend = ")
        .with_context(|| format!("unexpected `config show` output {text:?}"))?;
    let addr: SocketAddr = value
        .parse()
        .with_context(|| format!("smtp.backend = {value}"))?;
    if !addr.ip().is_loopback() {
        bail!("smtp.backend = {addr}: the demonstration's Postfix listens only on loopback");
    }
    Ok(addr)
}

/// Postfix's daemons, running as the postfix user, must be able to enter
/// every directory above the queue; a checkout under `/root` (mode 0700)
/// is the usual reason they cannot, and would fail deep inside Postfix.
fn reachable_by_postfix(dir: &Path) -> Result<()> {
    for d in dir.ancestors() {
        let mode = std::fs::metadata(d)
            .with_context(|| format!("reading {}", d.display()))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            bail!(
                "the postfix user cannot enter {} (mode {:o}), above the demonstration's queue in {}; \
                 `chmod o+x {}` or use a checkout outside it",
                d.display(),
                mode & 0o7777,
                dir.display(),
                d.display()
            );
        }
    }
    Ok(())
}

/// The uid and gid of the `postfix` account the Debian package creates.
fn postfix_user() -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postfix:"))
        .context("no postfix user: install the Debian package postfix")?;
    let f: Vec<&str> = line.split(':').collect();
    match (
        f.get(2).and_then(|u| u.parse().ok()),
        f.get(3).and_then(|g| g.parse().ok()),
    ) {
        (Some(uid), Some(gid)) => Ok((uid, gid)),
        _ => bail!("/etc/passwd: unreadable postfix line {line:?}"),
    }
}

/// Whether the master whose pid file is `pid` still runs.
fn master_alive(pid: &Path) -> bool {
    let Some(n) = std::fs::read_to_string(pid)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
    else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { kill(n, 0) == 0 }
}

/// Set by the SIGINT/SIGTERM handler [`catch_interrupts`] installs.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Makes Ctrl-C (and SIGTERM) set [`INTERRUPTED`] instead of ending this
/// process, so it can stop what it started. A handler, unlike ignoring
/// the signal, is reset in the children at exec: the daemon still gets
/// Ctrl-C itself.
pub fn catch_interrupts() {
    let handler: extern "C" fn(i32) = on_signal;
    // SAFETY: the handler only stores to an atomic, which is
    // async-signal-safe.
    unsafe {
        signal(SIGINT, handler as usize);
        signal(SIGTERM, handler as usize);
    }
}

/// Prints to stderr, ignoring a closed terminal.
pub fn say(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    fn signal(signum: i32, handler: usize) -> usize;
}
