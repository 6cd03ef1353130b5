//! Private Postfix instances: own config directory, queue and data
//! directories in a temp dir, `master -d` in the foreground inside the
//! server namespace. Never the system MTA.
//!
//! Every instance discards what it accepts (all transports are `discard`),
//! logs to its own file through postlogd, and is stopped on drop together
//! with all its worker processes.

use std::{
    fmt::Write as _,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use super::{cpu, sys};

const MASTER: &str = "/usr/lib/postfix/sbin/master";

/// The internal services every instance needs; no chroot, so nothing has
/// to be copied into the queue directory.
const SERVICES: &str = "\
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
proxymap  unix - - n - - proxymap
discard   unix - - n - - discard
error     unix - - n - - error
retry     unix - - n - - error
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
dnsblog   unix - - n - 0 dnsblog
";

/// How clients reach the instance: a TCP port on every address of the
/// namespace (IPv4 and IPv6).
pub enum Front {
    /// `smtpd` directly on `port`.
    Smtpd {
        /// Where smtpd listens.
        port: u16,
        /// `smtpd_upstream_proxy_protocol` (`""` or `"haproxy"`).
        proxy: &'static str,
    },
    /// postscreen on `port`, handing passed clients to `smtpd pass`.
    Postscreen {
        /// Where postscreen listens.
        port: u16,
    },
}

/// A running private Postfix.
pub struct Postfix {
    master: Option<Child>,
    /// `/etc/netns/<ns>`, created for the resolver and removed on drop,
    /// and whether `/etc/netns` itself was created for it too.
    netns_etc: Option<(PathBuf, bool)>,
    /// The instance's root (config, queue, data, log).
    pub dir: tempfile::TempDir,
}

impl Postfix {
    /// Writes the configuration and starts `master` in namespace `ns`.
    /// `main_extra` is appended to main.cf (later lines win).
    pub fn start(ns: &str, front: &Front, main_extra: &str) -> Result<Postfix> {
        Postfix::start_with_resolver(ns, front, main_extra, None)
    }

    /// As `start`, with the C resolver of every Postfix process (dnsblog's
    /// DNSBL queries) pointed at `nameserver` on port 53: `ip netns exec`
    /// mounts `/etc/netns/<ns>/resolv.conf` over `/etc/resolv.conf` for the
    /// master and its workers only.
    pub fn start_with_resolver(
        ns: &str,
        front: &Front,
        main_extra: &str,
        nameserver: Option<std::net::IpAddr>,
    ) -> Result<Postfix> {
        if !Path::new(MASTER).exists() {
            bail!("{MASTER} is missing: install the Debian package postfix");
        }
        let dir = tempfile::Builder::new().prefix("scrbench-pf").tempdir()?;
        let root = dir.path().to_owned();
        // The postfix user must traverse the directory to its queue.
        fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        for d in ["etc", "queue", "data"] {
            fs::create_dir(root.join(d))?;
        }
        super::net::run(&["chown", "postfix", &root.join("data").to_string_lossy()])?;
        let r = root.display();
        let mut main = format!(
            "compatibility_level = 3.6
queue_directory = {r}/queue
data_directory = {r}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.example.com
mydomain = example.com
mydestination = example.com
inet_interfaces = all
inet_protocols = all
mynetworks = 127.0.0.0/8 [::1]/128 192.0.2.0/24 [2001:db8:1::]/64
local_transport = discard
default_transport = discard
relay_transport = discard
virtual_transport = discard
local_recipient_maps =
alias_maps =
alias_database =
maillog_file_prefixes = {r}
maillog_file = {r}/maillog
biff = no
smtpd_banner = $myhostname ESMTP
default_process_limit = 1000
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
"
        );
        main.push_str(main_extra);
        main.push('\n');
        let mut master = String::new();
        match front {
            Front::Smtpd { port, proxy } => {
                let _ = writeln!(master, "{port} inet n - n - - smtpd");
                if !proxy.is_empty() {
                    let _ = writeln!(master, "  -o smtpd_upstream_proxy_protocol={proxy}");
                }
            }
            Front::Postscreen { port } => {
                let _ = writeln!(master, "{port} inet n - n - 1 postscreen");
                master.push_str("smtpd pass - - n - - smtpd\n");
            }
        }
        master.push_str(SERVICES);
        fs::write(root.join("etc/main.cf"), main)?;
        fs::write(root.join("etc/master.cf"), master)?;
        let etc = root.join("etc");
        // `postfix check` creates the queue's subdirectories with the right
        // owners; its messages go to syslog, so a failure is reported with
        // the hint to rerun it by hand.
        let st = Command::new("postfix")
            .arg("-c")
            .arg(&etc)
            .arg("check")
            .status()
            .context("cannot run postfix check")?;
        if !st.success() {
            bail!(
                "postfix -c {} check failed; run `script -qc 'postfix -c {} check' /dev/null` to see why",
                etc.display(),
                etc.display()
            );
        }
        let mut netns_etc = None;
        let mut cmd = if let Some(ns_ip) = nameserver {
            let etc_dir = PathBuf::from(format!("/etc/netns/{ns}"));
            if etc_dir.exists() {
                bail!("{} exists already; it is not this run's", etc_dir.display());
            }
            let parent_made = !Path::new("/etc/netns").exists();
            fs::create_dir_all(&etc_dir)?;
            netns_etc = Some((etc_dir.clone(), parent_made));
            fs::write(
                etc_dir.join("resolv.conf"),
                format!("nameserver {ns_ip}\noptions timeout:2 attempts:1\n"),
            )?;
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, MASTER]);
            c
        } else {
            let mut c = Command::new(MASTER);
            sys::in_netns(&mut c, ns)?;
            c
        };
        cmd.arg("-c")
            .arg(&etc)
            .arg("-d")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(root.join("master.err"))?);
        // The guard exists before the spawn, so a failed start still
        // removes the resolver directory.
        let mut pf = Postfix {
            master: None,
            netns_etc,
            dir,
        };
        pf.master = Some(cmd.spawn().context("cannot start the Postfix master")?);
        // Up once its listener is: the first worker for it starts on demand.
        let target = match front {
            Front::Smtpd { port, .. } | Front::Postscreen { port } => *port,
        };
        let pid = pf.pid();
        let ok = sys::poll_until(Duration::from_secs(20), || {
            sys::alive(pid) && listening(ns, target)
        });
        if !ok {
            bail!(
                "Postfix did not start listening on {target}: see {}/maillog and master.err",
                pf.dir.path().display()
            );
        }
        Ok(pf)
    }

    /// The master's process id.
    pub fn pid(&self) -> i32 {
        self.master
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .unwrap_or(0)
    }

    /// CPU time used so far by the master and all its workers.
    pub fn cpu(&self) -> Duration {
        cpu::tree_time(self.pid())
    }

    /// Proportional memory (PSS: shared pages split between their users)
    /// of the master and all its workers, in bytes.
    pub fn pss(&self) -> u64 {
        cpu::tree_pss(self.pid())
    }

    /// How many worker processes named `name` (e.g. `smtpd`) are alive.
    pub fn workers(&self, name: &str) -> usize {
        cpu::children(self.pid())
            .iter()
            .filter(|(_, c)| c == name)
            .count()
    }

    /// The instance's mail log.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("maillog")
    }
}

/// Whether something in namespace `ns` listens on TCP `port`.
pub fn listening(ns: &str, port: u16) -> bool {
    let port = format!("sport = :{port}");
    super::net::run(&["ip", "netns", "exec", ns, "ss", "-Hltn", &port])
        .is_ok_and(|out| !out.trim().is_empty())
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if let Some(mut child) = self.master.take() {
            let pgid = i32::try_from(child.id()).unwrap_or(0);
            if pgid > 0 {
                // master stops its workers on SIGTERM; whatever is left of
                // the group after that is killed.
                sys::kill_group(pgid, libc::SIGTERM);
                let _ = sys::poll_until(Duration::from_secs(5), || {
                    matches!(child.try_wait(), Ok(Some(_)))
                });
                sys::kill_group(pgid, libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
            sys::reap_orphans();
        }
        if let Some((d, parent_made)) = self.netns_etc.take() {
            let _ = fs::remove_dir_all(d);
            if parent_made {
                // Only if still empty: someone else may use it meanwhile.
                let _ = fs::remove_dir("/etc/netns");
            }
        }
    }
}
