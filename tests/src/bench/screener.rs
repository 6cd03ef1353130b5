//! The screener daemon under test, started from the release build inside
//! the server namespace with a config in a temp dir; stopped, detached and
//! unpinned on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use super::{cpu, sys};

/// The `screener` binary next to the running benchmark binary
/// (`target/release/`): `cargo xtask bench` builds both.
pub fn binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .context("benchmark binary has no directory")?
        .join("screener");
    if !bin.exists() {
        bail!(
            "{} is missing: build it first (`cargo build --release -p screener`; `cargo xtask bench` does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A running daemon.
pub struct Screener {
    child: Option<Child>,
    /// Its configuration file.
    pub config: PathBuf,
    pins: PathBuf,
    /// Holds config, store, admin socket and log.
    pub dir: tempfile::TempDir,
}

impl Screener {
    /// Starts the daemon in namespace `ns` with the TOML `sections` (without
    /// `[store]`, `[admin]` and `xdp.pin_path`, which are filled in) and
    /// waits until its admin socket answers.
    pub fn start(ns: &str, sections: &str) -> Result<Screener> {
        Screener::start_with(ns, sections, &[])
    }

    /// As `start`, with extra arguments after `run` (e.g. `--no-xdp`).
    pub fn start_with(ns: &str, sections: &str, run_args: &[&str]) -> Result<Screener> {
        let bin = binary()?;
        let dir = tempfile::Builder::new().prefix("scrbench-d").tempdir()?;
        let pins = PathBuf::from(format!("/sys/fs/bpf/scrbench-{}", std::process::id()));
        let d = dir.path().display();
        let text = sections.replace("@PINS@", &pins.to_string_lossy())
            + &format!(
                "\n[store]\npath = \"{d}/screener.redb\"\n\n[admin]\nsocket = \"{d}/admin.sock\"\n\n[daemon]\nuser = \"root\"\n"
            );
        let config = dir.path().join("screener.toml");
        std::fs::write(&config, text)?;
        let log = std::fs::File::create(dir.path().join("daemon.log"))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&config)
            .arg("run")
            .args(run_args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        sys::in_netns(&mut cmd, ns)?;
        let child = cmd.spawn().context("cannot start the screener daemon")?;
        let s = Screener {
            child: Some(child),
            config,
            pins,
            dir,
        };
        let sock = s.dir.path().join("admin.sock");
        let ok = sys::poll_until(Duration::from_secs(30), || {
            sys::alive(s.pid()) && sock.exists() && s.cli(&["stats", "--json"]).is_ok()
        });
        if !ok {
            bail!(
                "the daemon did not come up: {}",
                std::fs::read_to_string(s.dir.path().join("daemon.log")).unwrap_or_default()
            );
        }
        Ok(s)
    }

    /// Runs an admin command against this daemon.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(binary()?)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "screener {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports `nets` as one named block list.
    pub fn block(&self, nets: &[String]) -> Result<()> {
        let file = self.dir.path().join("blocked.txt");
        std::fs::write(&file, nets.join("\n") + "\n")?;
        self.cli(&[
            "import",
            &file.to_string_lossy(),
            "--format",
            "cidr",
            "--reason",
            "bench",
        ])?;
        Ok(())
    }

    /// The kernel's drop counter.
    pub fn kernel_dropped(&self) -> Result<u64> {
        let v: serde_json::Value = serde_json::from_str(&self.cli(&["stats", "--json"])?)?;
        v["kernel"]["dropped"]
            .as_u64()
            .context("stats --json has no kernel.dropped")
    }

    /// The daemon's process id.
    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .unwrap_or(0)
    }

    /// CPU time used so far by the daemon.
    pub fn cpu(&self) -> Duration {
        cpu::tree_time(self.pid())
    }

    /// The daemon's resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        cpu::rss(self.pid())
    }

    /// Where the daemon logs.
    pub fn log(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Screener {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: plain kill on our own child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                let _ = sys::poll_until(Duration::from_secs(5), || {
                    matches!(child.try_wait(), Ok(Some(_)))
                });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // The gate outlives the daemon by design; the benchmark removes it.
        let _ = screener::xdp::detach(&self.pins);
        let _ = std::fs::remove_dir(&self.pins);
    }
}
