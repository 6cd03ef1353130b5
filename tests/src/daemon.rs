//! Running `screener` for a test: its configuration, the daemon process
//! (killed on drop) and the admin CLI.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::netns::{screener_bin, spawn_logged, wait_for, ChildGuard, NetNs, PinDir};

/// A daemon with its configuration and working directory.
pub struct Daemon {
    pub child: ChildGuard,
    pub cfg: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// The daemon's log so far (of the `n`-th start).
    pub fn log(&self, n: u32) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("daemon{n}.log"))).unwrap_or_default()
    }
}

/// A configuration guarding `ns`'s host veth: XDP on it in `mode` for TCP
/// `port`, pins under `pins`, store and admin socket in `dir`. The SMTP
/// listener is on loopback, port 0, until a test moves it.
pub fn write_config(dir: &Path, ns: &NetNs, pins: &PinDir, mode: &str, port: u16) -> PathBuf {
    let cfg = dir.join("screener.toml");
    let text = format!(
        r#"
[smtp]
listen = ["127.0.0.1:0"]
hostname = "mx.example.com"

# The host side of the veth is a local address, and the clients share its
# /24 and IPv6 /64s: with local addresses permitted no verdict on them
# could be made.
[screen]
permit_local = false

[xdp]
interfaces = ["{iface}"]
mode = "{mode}"
ports = [{port}]
pin_path = "{pins}"

[store]
path = "{dir}/screener.redb"

[admin]
socket = "{dir}/admin.sock"

# Tests run as root; a test that drops privileges sets its own user.
[daemon]
user = "root"
"#,
        iface = ns.host_if,
        pins = pins.0.display(),
        dir = dir.display(),
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// Puts `line` into `[section]` of the file at `cfg` (replacing a line
/// setting the same key), adding the section when missing.
pub fn set(cfg: &Path, section: &str, line: &str) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let key = line.split('=').next().unwrap().trim();
    let header = format!("[{section}]\n");
    let mut out = String::new();
    let mut in_section = false;
    let mut done = false;
    for l in text.lines() {
        if l.starts_with('[') {
            if in_section && !done {
                out += line;
                out += "\n";
                done = true;
            }
            in_section = l == header.trim_end();
        }
        if in_section && l.split('=').next().map(str::trim) == Some(key) {
            if !done {
                out += line;
                out += "\n";
                done = true;
            }
            continue;
        }
        out += l;
        out += "\n";
    }
    if !done {
        if !in_section {
            out += &header;
        }
        out += line;
        out += "\n";
    }
    std::fs::write(cfg, out).unwrap();
}

/// Starts the daemon on `cfg` (log `daemon<n>.log` in `dir`) and waits for
/// its admin socket.
pub fn start(cfg: &Path, dir: &Path, n: u32) -> ChildGuard {
    let log = dir.join(format!("daemon{n}.log"));
    let child = spawn_logged(
        Command::new(screener_bin()).arg("-c").arg(cfg).arg("run"),
        &log,
    );
    let sock = dir.join("admin.sock");
    wait_for("the admin socket", Duration::from_secs(20), || {
        sock.exists() && cli(cfg, &["stats", "--json"]).0
    });
    child
}

/// Starts the daemon on `cfg` without XDP (`run --no-xdp`), logging to
/// `log`, and waits until its admin socket answers.
pub fn start_no_xdp(cfg: &Path, log: &Path) -> ChildGuard {
    let child = spawn_logged(
        Command::new(screener_bin())
            .arg("-c")
            .arg(cfg)
            .args(["run", "--no-xdp"]),
        log,
    );
    wait_for("the admin socket", Duration::from_secs(20), || {
        cli(cfg, &["stats", "--json"]).0
    });
    child
}

/// Writes the default test configuration and starts a daemon on it.
pub fn daemon(ns: &NetNs, pins: &PinDir, mode: &str, port: u16) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), ns, pins, mode, port);
    let child = start(&cfg, dir.path(), 0);
    Daemon { child, cfg, dir }
}

/// Runs `screener -c cfg ARGS`: (success, stdout + stderr).
pub fn cli(cfg: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(screener_bin())
        .arg("-c")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Like [`cli`], panicking when the command fails.
#[track_caller]
pub fn ok(cfg: &Path, args: &[&str]) -> String {
    let (success, out) = cli(cfg, args);
    assert!(success, "screener {args:?} failed: {out}");
    out
}

/// The daemon's `stats --json`.
#[track_caller]
pub fn stats(cfg: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(cfg, &["stats", "--json"])).unwrap()
}

/// The daemon's `block list --json` networks.
#[track_caller]
pub fn blocked(cfg: &Path) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&ok(cfg, &["block", "list", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["net"].as_str().unwrap().to_owned())
        .collect()
}
