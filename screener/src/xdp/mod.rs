//! The XDP gate from userspace: load or adopt the program, fill its maps,
//! attach it to the configured interfaces, pin everything so the gate
//! outlives the daemon, and keep it attached while the daemon runs.
//!
//! PINNING. Under `xdp.pin_path` live the ten maps of
//! [`screener_common::map_names::ALL`] (by name), the program
//! (`prog`) and one link per interface (`link_<ifname>`). A link pinned in
//! bpffs keeps the program attached when the daemon dies, so a crash never
//! opens the gate.
//!
//! ADOPTION. A starting daemon that finds a pinned set checks its layout
//! (each map's type, key and value sizes, flags and fixed size, and the
//! layout version in `config`) and refuses a set of another layout with a
//! message saying how to remove it. A set of
//! this layout is adopted: the new program instance is built on the pinned
//! maps (so every entry survives) and swapped into each pinned link
//! atomically, so an interface is never attached twice and never left
//! unguarded, even for an instant. A pinned link whose interface was
//! deleted (or deleted and re-created: a new interface of the same name is
//! another device) guards nothing and cannot take a new program; it is
//! replaced by a fresh attachment.
//!
//! RESIZING. The sizes `xdp.max_*` give are not layout. A starting daemon
//! that finds a sized map pinned with another size creates one of the
//! configured size (pinned beside it as `resize_<name>`), copies every
//! entry into it, renames it over the old pin, and loads the new program
//! instance on it; the old instance keeps guarding, on the old maps, until
//! [`Gate::attach`] swaps the new one into the links. Nothing is lost and
//! the gate never opens. A map holding more entries than its new size
//! takes is refused, naming the key. The alternative, refusing every size
//! change until `screener xdp detach`, would open the gate for as long as
//! the restart takes and leave the operator a map-full message they cannot
//! act on without that gap. A reload ([`Gate::reload`]) keeps the pinned
//! sizes: the daemon writes verdicts into the maps meanwhile.
//!
//! FILL BEFORE ATTACH. [`Gate::load`] loads the program on the maps and
//! configures it without attaching it anywhere new; the daemon fills the
//! maps from its store, then [`Gate::attach`] attaches. After a reboot
//! (pins gone) the program thus never runs on an empty set while the store
//! holds verdicts. (With pinned links the old instance keeps guarding with
//! the same maps until the swap.)
//!
//! WATCHING. While it runs, the daemon holds a descriptor of every link and
//! map, and [`Gate::watch`] checks them every [`WATCH_INTERVAL`]: a link
//! whose interface is gone or was re-created is replaced by a fresh
//! attachment once an interface of that name exists; pins removed from
//! under it (one file or the whole directory) are put back from the
//! descriptors it holds, which also keep the program attached meanwhile.
//! Each repair is logged at WARN with the interface and the cause.

pub mod maps;
pub mod prefilter;
mod sys;

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        Xdp, XdpMode as AyaMode,
    },
    Ebpf, EbpfLoader,
};
use screener_common::map_names as names;
use serde::{Deserialize, Serialize};

use crate::config::{self, XdpMode};
pub use maps::Maps;

/// Name of the program in the object and its pin.
const PROGRAM: &str = "screener";
const PROG_PIN: &str = "prog";
const LINK_PREFIX: &str = "link_";
/// How often a running daemon checks its links and pins.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("map {map}: {source}")]
    Map {
        map: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "map {map} is full ({key} = {size}); raise {key} and restart \
         (the pinned entries move into maps of the new size), or remove entries"
    )]
    MapFull {
        map: &'static str,
        size: u32,
        key: &'static str,
    },
    #[error(
        "the maps pinned in {dir} have another layout ({detail}); \
         remove them with `screener xdp detach` (their entries are lost) or point xdp.pin_path elsewhere"
    )]
    Layout { dir: PathBuf, detail: String },
    #[error(
        "map {map} holds {entries} entries, more than {key} = {size} takes; \
         raise {key}, or remove entries first (`screener block del`, `screener allow del`)"
    )]
    ResizeTooSmall {
        map: &'static str,
        key: &'static str,
        size: u32,
        entries: usize,
    },
    #[error("pinned object {path}: {reason}")]
    Pinned { path: PathBuf, reason: String },
    #[error("the pinned maps in {dir} key IPv6 blocks by /{pinned}, the config says verdict.ipv6_prefix = {configured}; detach first (`screener xdp detach`) to change it")]
    Ipv6Prefix {
        dir: PathBuf,
        pinned: u32,
        configured: u8,
    },
    #[error("loading the XDP program: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("attaching to {interface} in {mode} mode: {source}")]
    Attach {
        interface: String,
        mode: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> XdpError + 'a {
    move |source| XdpError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The loaded program: its maps and per-interface links.
pub struct Gate {
    /// Holds the program and the map handles it was built on; dropping it
    /// does not detach anything, the pins keep both alive.
    ebpf: Ebpf,
    /// Typed handles on the maps, for every verdict change.
    pub maps: Maps,
    /// Where everything is pinned (`xdp.pin_path`).
    pin_dir: PathBuf,
    /// The interfaces the configuration names, in its order.
    interfaces: Vec<String>,
    /// The attach mode the configuration asks for.
    mode: XdpMode,
    /// Kernel id of this process's program instance: a link running
    /// another program does not count as ours.
    prog_id: u32,
    /// The link this process holds per interface: it keeps the program
    /// attached even while its pin is missing, and is what gets re-pinned.
    links: BTreeMap<String, HeldLink>,
    /// Per unguarded interface, the last problem logged, so a problem
    /// that lasts is logged once, not every round.
    unguarded: BTreeMap<String, String>,
    /// `(interface, mode)` attached by this process or adopted.
    pub attached: Vec<(String, &'static str)>,
}

/// One XDP link this process holds.
struct HeldLink {
    /// A descriptor of the link: as long as it is open the attachment
    /// lives, pinned or not.
    fd: OwnedFd,
    /// The link's kernel id, to recognise its pin.
    id: u32,
}

/// Whether one configured interface has this program, as `xdp status` and
/// `stats` report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    /// The name in `xdp.interfaces`.
    pub interface: String,
    /// The interface's index now; `None` when there is no such interface.
    pub ifindex: Option<u32>,
    /// True only when the interface really runs the screener's program.
    pub attached: bool,
    /// `attached`, or why not: `no such interface`, `link severed
    /// (interface deleted or re-created)`, `not attached`, ...
    pub state: String,
    /// The link found for it, if any, and the program that link runs.
    pub link_id: Option<u32>,
    /// See `link_id`.
    pub program_id: Option<u32>,
}

/// Whether `iface` (index `ifindex` now, `None` if there is no such
/// interface) is guarded through `link` running `prog_id`.
fn judge_link(
    iface: &str,
    ifindex: Option<u32>,
    link: Option<sys::LinkFacts>,
    prog_id: Option<u32>,
) -> InterfaceStatus {
    let state = match (ifindex, link) {
        (_, Some(l)) if l.ifindex == 0 => "link severed (interface deleted or re-created)".into(),
        (None, _) => "no such interface".into(),
        (_, None) => "not attached".into(),
        (Some(i), Some(l)) if l.ifindex != i => format!(
            "link attached to another device (ifindex {}, the interface is now {i})",
            l.ifindex
        ),
        (_, Some(l)) if prog_id.is_some_and(|p| p != l.prog_id) => {
            format!("link runs another program (id {})", l.prog_id)
        }
        _ => "attached".into(),
    };
    InterfaceStatus {
        interface: iface.to_owned(),
        ifindex,
        attached: state == "attached",
        state,
        link_id: link.map(|l| l.id),
        program_id: link.map(|l| l.prog_id),
    }
}
/// Makes sure a bpf filesystem is mounted where the pins go.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), XdpError> {
    let root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        tracing::info!("mounting bpffs on {}", root.display());
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(root)
            .status()
            .map_err(io("running mount for", root))?;
        if !status.success() {
            return Err(XdpError::Pinned {
                path: root.to_owned(),
                reason: format!("mount -t bpf failed ({status})"),
            });
        }
    }
    std::fs::create_dir_all(pin_dir).map_err(io("creating pin directory", pin_dir))
}

fn is_bpffs(path: &Path) -> bool {
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: valid C string and out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &raw mut st) };
    // BPF_FS_MAGIC
    rc == 0 && st.f_type == 0xcafe_4a11
}

/// Which sizes [`Gate::open`] gives the sized maps.
#[derive(Clone, Copy)]
enum Sizing {
    /// `xdp.max_*`, migrating pinned maps of another size.
    Configured,
    /// The pinned maps' own sizes.
    AsPinned,
}

/// Whether `dir` holds a pinned set (at least the settings map).
pub fn is_pinned(dir: &Path) -> bool {
    dir.join(names::CONFIG).exists()
}

impl Gate {
    /// Loads the program on the pinned maps (creating and pinning them if
    /// there are none) and configures it, without attaching it anywhere
    /// new: the caller fills the maps, then calls [`Gate::attach`]. A
    /// pinned map whose size is not the configured one is migrated into
    /// one that is (see RESIZING).
    pub fn load(cfg: &config::Config) -> Result<Gate, XdpError> {
        Gate::open(cfg, Sizing::Configured)
    }

    /// Like [`Gate::load`], for a daemon that already runs on the pinned
    /// maps: their sizes stay as they are (a migration would copy the
    /// maps under the verdicts being written into them); a new
    /// `xdp.max_*` waits for the next start.
    pub fn reload(cfg: &config::Config) -> Result<Gate, XdpError> {
        Gate::open(cfg, Sizing::AsPinned)
    }

    fn open(cfg: &config::Config, sizing: Sizing) -> Result<Gate, XdpError> {
        let x = &cfg.xdp;
        let dir = &x.pin_path;
        ensure_bpffs(dir)?;
        maps::clear_staging(dir);
        let mut sizes = maps::configured_sizes(x).to_vec();
        let mut resize = Vec::new();
        if is_pinned(dir) {
            let pinned = maps::check_pinned_layout(dir)?;
            if pinned != u32::from(cfg.verdict.ipv6_prefix) {
                return Err(XdpError::Ipv6Prefix {
                    dir: dir.clone(),
                    pinned,
                    configured: cfg.verdict.ipv6_prefix,
                });
            }
            match sizing {
                Sizing::Configured => resize = maps::plan_resize(dir, &sizes)?,
                Sizing::AsPinned => sizes = maps::pinned_sizes(dir)?,
            }
            tracing::info!(pin_path = %dir.display(), "adopting pinned XDP maps");
        }
        let map_paths: Vec<(&str, PathBuf)> = names::ALL
            .iter()
            .map(|n| {
                let path = if resize.iter().any(|r| r.map == *n) {
                    maps::staging_pin(dir, n)
                } else {
                    dir.join(n)
                };
                (*n, path)
            })
            .collect();
        let log_level = x.log_level.aya_level();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        for (name, size) in &sizes {
            loader.map_max_entries(name, *size);
        }
        loader.override_global(aya_log::LEVEL, &log_level, false);
        let mut ebpf = match loader.load(crate::ebpf_objects::SCREENER) {
            Ok(e) => e,
            Err(e) => {
                maps::clear_staging(dir);
                return Err(e.into());
            }
        };
        if !resize.is_empty() {
            if let Err(e) = maps::migrate(dir, &resize) {
                maps::clear_staging(dir);
                return Err(e);
            }
            for r in &resize {
                tracing::info!(
                    map = r.map,
                    key = maps::size_key(r.map),
                    from = r.from,
                    to = r.to,
                    entries = r.entries,
                    "pinned XDP map resized: every entry moved into a map of the configured size"
                );
            }
        }
        let mut maps = Maps::from_pins(dir)?;
        let ports = match &x.ports {
            config::Ports::All => None,
            config::Ports::List(p) => Some(p.as_slice()),
        };
        maps.configure(u32::from(cfg.verdict.ipv6_prefix), ports)?;
        maps.rebuild_prefilters()?;

        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .expect("the object has the screener program")
            .try_into()?;
        prog.load()?;
        let prog_id = prog.info()?.id();
        let prog_pin = dir.join(PROG_PIN);
        if prog_pin.exists() {
            std::fs::remove_file(&prog_pin).map_err(io("replacing", &prog_pin))?;
        }
        prog.pin(&prog_pin).map_err(|e| XdpError::Pinned {
            path: prog_pin.clone(),
            reason: e.to_string(),
        })?;
        Ok(Gate {
            ebpf,
            maps,
            pin_dir: dir.clone(),
            interfaces: x.interfaces.clone(),
            mode: x.mode,
            prog_id,
            links: BTreeMap::new(),
            unguarded: BTreeMap::new(),
            attached: Vec::new(),
        })
    }

    /// Attaches the loaded program to every configured interface (swapping
    /// it into pinned links, replacing severed ones) and removes links
    /// pinned for interfaces no longer configured.
    pub fn attach(&mut self) -> Result<(), XdpError> {
        let dir = self.pin_dir.clone();
        let mode = self.mode;
        for iface in self.interfaces.clone() {
            let (link, mode) = attach(self.program()?, &dir, &iface, mode)?;
            self.links.insert(iface.clone(), link);
            self.attached.push((iface.clone(), mode));
            tracing::info!(interface = %iface, mode, pin_path = %dir.display(), "XDP gate up");
        }
        // Links pinned for interfaces no longer configured are removed:
        // the configuration says where the gate stands.
        for (iface, path) in pinned_links(&dir) {
            if !self.interfaces.contains(&iface) {
                tracing::info!(interface = %iface, "detaching XDP from an interface no longer configured");
                std::fs::remove_file(&path).map_err(io("removing", &path))?;
            }
        }
        Ok(())
    }

    fn program(&mut self) -> Result<&mut Xdp, XdpError> {
        Ok(self
            .ebpf
            .program_mut(PROGRAM)
            .expect("the object has the screener program")
            .try_into()?)
    }

    /// Whether every configured interface runs this program now.
    pub fn attached_everywhere(&self) -> bool {
        let all = self.interfaces();
        !all.is_empty() && all.iter().all(|i| i.attached)
    }

    /// Each configured interface as the kernel sees it now, through the
    /// links this process holds.
    pub fn interfaces(&self) -> Vec<InterfaceStatus> {
        self.interfaces
            .iter()
            .map(|iface| {
                let facts = self
                    .links
                    .get(iface)
                    .and_then(|l| sys::link_facts(l.fd.as_fd()).ok());
                judge_link(iface, sys::ifindex(iface), facts, Some(self.prog_id))
            })
            .collect()
    }

    /// One round of the watchdog: puts back missing pins and re-attaches
    /// where a link lost its interface. Logs every repair; never fails
    /// (what it cannot repair now it tries again next round).
    pub fn watch(&mut self) {
        self.watch_pins();
        for iface in self.interfaces.clone() {
            self.watch_link(&iface);
        }
    }

    fn watch_pins(&mut self) {
        let dir = self.pin_dir.clone();
        if !dir.exists() {
            tracing::warn!(pin_path = %dir.display(), cause = "pin directory removed", "XDP pin directory removed under the running daemon; pinning everything again");
            if let Err(e) = ensure_bpffs(&dir) {
                tracing::error!("recreating the XDP pin directory: {e}");
                return;
            }
        }
        for name in names::ALL {
            let path = dir.join(name);
            let Some(map) = self.ebpf.map(name) else {
                continue;
            };
            let Some(ours) = map_id(map) else {
                continue;
            };
            let pinned = aya::maps::MapInfo::from_pin(&path).ok().map(|i| i.id());
            if pinned == Some(ours) {
                continue;
            }
            if pinned.is_some() {
                tracing::warn!(pin = %path.display(), cause = "pin replaced", "a pinned XDP map is not the one the program uses; pinning ours again");
                let _ = std::fs::remove_file(&path);
            } else {
                tracing::warn!(pin = %path.display(), cause = "pin removed", "XDP map pin removed under the running daemon; pinning it again");
            }
            if let Err(e) = map.pin(&path) {
                tracing::error!(pin = %path.display(), "pinning the map again: {e}");
            }
        }
        let prog_pin = dir.join(PROG_PIN);
        let pinned = aya::programs::ProgramInfo::from_pin(&prog_pin)
            .ok()
            .map(|i| i.id());
        if pinned != Some(self.prog_id) {
            tracing::warn!(pin = %prog_pin.display(), cause = if pinned.is_some() { "pin replaced" } else { "pin removed" }, "XDP program pin missing under the running daemon; pinning it again");
            let _ = std::fs::remove_file(&prog_pin);
            match self.program() {
                Ok(prog) => {
                    if let Err(e) = prog.pin(&prog_pin) {
                        tracing::error!(pin = %prog_pin.display(), "pinning the program again: {e}");
                    }
                }
                Err(e) => tracing::error!("XDP program: {e}"),
            }
        }
    }

    fn watch_link(&mut self, iface: &str) {
        let dir = self.pin_dir.clone();
        let link_pin = dir.join(format!("{LINK_PREFIX}{iface}"));
        let now = sys::ifindex(iface);
        let held = self
            .links
            .get(iface)
            .map(|l| (l.id, sys::link_facts(l.fd.as_fd()).ok()));
        let healthy = matches!(
            (now, held),
            (Some(i), Some((_, Some(f)))) if f.ifindex == i && f.prog_id == self.prog_id
        );
        if healthy {
            self.unguarded.remove(iface);
            // The link guards; make sure its pin is there and is this link.
            let (id, _) = held.expect("healthy implies held");
            let pinned = sys::pinned_link(&link_pin).ok().map(|(_, f)| f.id);
            if pinned != Some(id) {
                let cause = if pinned.is_some() {
                    "pin replaced"
                } else {
                    "pin removed"
                };
                tracing::warn!(interface = iface, pin = %link_pin.display(), cause, "XDP link pin missing under the running daemon; pinning it again");
                let _ = std::fs::remove_file(&link_pin);
                let fd = &self.links.get(iface).expect("held").fd;
                if let Err(e) = sys::obj_pin(fd.as_fd(), &link_pin) {
                    tracing::error!(interface = iface, pin = %link_pin.display(), "pinning the link again: {e}");
                }
            }
            return;
        }
        let cause = match (now, held) {
            (None, _) => "interface gone",
            (_, None) => "not attached",
            (_, Some((_, None))) => "link unreadable",
            (_, Some((_, Some(f)))) if f.ifindex == 0 => {
                "link severed (interface deleted or re-created)"
            }
            (Some(i), Some((_, Some(f)))) if f.ifindex != i => "interface re-created",
            (_, Some(_)) => "link runs another program",
        };
        if self.links.remove(iface).is_some() {
            // A severed link guards nothing and cannot take a program: drop
            // it and its pin so a restart does not trip on it either.
            if sys::pinned_link(&link_pin).is_ok() {
                let _ = std::fs::remove_file(&link_pin);
            }
            self.attached.retain(|(i, _)| i != iface);
            tracing::warn!(
                interface = iface,
                cause,
                "XDP no longer guards the interface"
            );
        }
        if now.is_none() {
            if self.unguarded.get(iface).map(String::as_str) != Some(cause) {
                tracing::warn!(
                    interface = iface,
                    cause,
                    "interface gone; XDP re-attaches when it returns"
                );
                self.unguarded.insert(iface.to_owned(), cause.to_owned());
            }
            return;
        }
        let mode = self.mode;
        let attached = match self.program() {
            Ok(prog) => attach(prog, &dir, iface, mode),
            Err(e) => Err(e),
        };
        match attached {
            Ok((link, mode)) => {
                self.links.insert(iface.to_owned(), link);
                self.attached.push((iface.to_owned(), mode));
                self.unguarded.remove(iface);
                tracing::warn!(interface = iface, mode, cause, "XDP re-attached");
            }
            Err(e) => {
                // Tried again every round; said again only when it changes.
                let said = e.to_string();
                if self.unguarded.get(iface) != Some(&said) {
                    tracing::error!(interface = iface, cause, "re-attaching XDP: {said}");
                    self.unguarded.insert(iface.to_owned(), said);
                }
            }
        }
    }

    /// Starts draining the program's log ring buffer into `tracing`.
    pub fn spawn_logger(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let logger = match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("kernel-side XDP logs unavailable: {e}");
                return None;
            }
        };
        // SAFETY: the logger owns its ring buffer fd for as long as the
        // AsyncFd owns the logger.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("kernel-side XDP logs unavailable: {e}");
                return None;
            }
        };
        Some(tokio::spawn(async move {
            loop {
                let Ok(mut guard) = fd.readable_mut().await else {
                    return;
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }))
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

/// Runs `check` (a [`Gate::watch`] round) every [`WATCH_INTERVAL`] off
/// the runtime's workers, until aborted.
pub fn spawn_watchdog(check: impl Fn() + Send + Sync + 'static) -> tokio::task::JoinHandle<()> {
    let check = std::sync::Arc::new(check);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let check = check.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || check()).await {
                tracing::error!("XDP watchdog round: {e}");
            }
        }
    })
}

/// `(interface, pin path)` of every pinned link in `dir`.
pub fn pinned_links(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix(LINK_PREFIX)
                .map(|i| (i.to_owned(), e.path()))
        })
        .collect();
    out.sort();
    out
}

fn mode_name(m: AyaMode) -> &'static str {
    match m {
        AyaMode::Driver => "driver",
        AyaMode::Skb => "skb",
        AyaMode::Hardware => "hardware",
        AyaMode::Default => "default",
    }
}

/// Opens the link pinned at `path` to hold it.
fn hold(path: &Path) -> Result<HeldLink, XdpError> {
    let (fd, facts) = sys::pinned_link(path).map_err(io("opening the pinned link", path))?;
    Ok(HeldLink { fd, id: facts.id })
}

/// Attaches `prog` to `iface`, or swaps it into the pinned link there when
/// that link still guards the interface; a severed one is replaced.
fn attach(
    prog: &mut Xdp,
    dir: &Path,
    iface: &str,
    mode: XdpMode,
) -> Result<(HeldLink, &'static str), XdpError> {
    let link_pin = dir.join(format!("{LINK_PREFIX}{iface}"));
    if let Ok((_, facts)) = sys::pinned_link(&link_pin) {
        let now = sys::ifindex(iface);
        if facts.ifindex != 0 && now == Some(facts.ifindex) {
            // Swap the new program into the existing attachment.
            let pinned = PinnedLink::from_pin(&link_pin).map_err(|e| XdpError::Pinned {
                path: link_pin.clone(),
                reason: e.to_string(),
            })?;
            let fd_link: FdLink = pinned.into();
            let link = XdpLink::try_from(fd_link).map_err(|e| XdpError::Pinned {
                path: link_pin.clone(),
                reason: e.to_string(),
            })?;
            let id = prog.attach_to_link(link)?;
            // The pin keeps the link; this process holds its own descriptor.
            drop(prog.take_link(id)?);
            tracing::info!(interface = iface, "adopted pinned XDP link");
            return Ok((hold(&link_pin)?, "adopted"));
        }
        let cause = if facts.ifindex == 0 {
            "link severed (interface deleted or re-created)"
        } else {
            "link attached to another device of the same name"
        };
        tracing::warn!(interface = iface, cause, pin = %link_pin.display(), "the pinned XDP link does not guard the interface; replacing it");
        std::fs::remove_file(&link_pin).map_err(io("removing", &link_pin))?;
    }
    let tries: &[AyaMode] = match mode {
        XdpMode::Auto => &[AyaMode::Driver, AyaMode::Skb],
        XdpMode::Driver => &[AyaMode::Driver],
        XdpMode::Skb => &[AyaMode::Skb],
    };
    let mut last = None;
    for m in tries {
        match prog.attach(iface, *m) {
            Ok(id) => {
                let link = prog.take_link(id)?;
                let fd_link = FdLink::try_from(link).map_err(|e| XdpError::Pinned {
                    path: link_pin.clone(),
                    reason: format!("kernel without bpf_link XDP attachments: {e}"),
                })?;
                drop(fd_link.pin(&link_pin).map_err(|e| XdpError::Pinned {
                    path: link_pin.clone(),
                    reason: e.to_string(),
                })?);
                let name = mode_name(*m);
                tracing::info!(interface = iface, mode = name, "XDP attached");
                return Ok((hold(&link_pin)?, name));
            }
            Err(e) => {
                if tries.len() > 1 {
                    tracing::info!(
                        interface = iface,
                        mode = mode_name(*m),
                        "XDP attach failed: {e}"
                    );
                }
                last = Some((mode_name(*m), e));
            }
        }
    }
    let (mode, source) = last.expect("at least one mode tried");
    Err(XdpError::Attach {
        interface: iface.to_owned(),
        mode,
        source,
    })
}

/// The kernel id of a map this process holds.
fn map_id(map: &aya::maps::Map) -> Option<u32> {
    use aya::maps::Map;
    let (Map::Array(data) | Map::HashMap(data) | Map::LpmTrie(data) | Map::PerCpuArray(data)) = map
    else {
        return None;
    };
    data.info().ok().map(|i| i.id())
}

/// What `xdp status` reports.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// `xdp.pin_path`.
    pub pin_path: PathBuf,
    /// Whether a pinned set (at least the settings map) is there.
    pub pinned: bool,
    /// The pinned layout, or why it cannot be adopted.
    pub layout: Option<String>,
    /// True only when every configured interface runs the screener's
    /// program (and at least one is configured).
    pub attached: bool,
    /// Every configured interface and whether it is really guarded.
    pub interfaces: Vec<InterfaceStatus>,
    /// Every pinned link, configured interface or not.
    pub links: Vec<LinkStatus>,
    pub maps: Vec<MapStatus>,
}

impl Status {
    /// This status with the interfaces as a running daemon sees them
    /// through the links it holds (they guard even while a pin is
    /// missing); unchanged when `held` is `None` (no gate loaded).
    #[must_use]
    pub fn seen_by(mut self, held: Option<Vec<InterfaceStatus>>) -> Status {
        if let Some(interfaces) = held {
            self.attached = !interfaces.is_empty() && interfaces.iter().all(|i| i.attached);
            self.interfaces = interfaces;
        }
        self
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LinkStatus {
    /// The interface named in the pin (`link_<interface>`).
    pub interface: String,
    /// The link's kernel id.
    pub link_id: u32,
    /// The program it runs.
    pub program_id: u32,
    /// The interface index the link is attached to; 0 once that interface
    /// is gone (the link is severed and guards nothing).
    pub ifindex: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MapStatus {
    /// The map's name and pin.
    pub name: String,
    /// Its kernel id.
    pub id: u32,
    /// Its size.
    pub max_entries: u32,
    /// Entries it holds, for the block and allow maps.
    pub entries: Option<usize>,
}

/// Reads the pinned set without a daemon: whether each of `interfaces`
/// really runs the pinned program, links, maps, sizes.
pub fn status(dir: &Path, interfaces: &[String]) -> Status {
    let pinned = is_pinned(dir);
    let layout = pinned.then(|| match maps::check_pinned_layout(dir) {
        Ok(p) => format!(
            "version {} (IPv6 hosts keyed by /{p})",
            screener_common::LAYOUT_VERSION
        ),
        Err(e) => e.to_string(),
    });
    let mut links = Vec::new();
    let mut facts = BTreeMap::new();
    for (iface, path) in pinned_links(dir) {
        if let Ok((_, f)) = sys::pinned_link(&path) {
            links.push(LinkStatus {
                interface: iface.clone(),
                link_id: f.id,
                program_id: f.prog_id,
                ifindex: f.ifindex,
            });
            facts.insert(iface, f);
        }
    }
    let prog_id = aya::programs::ProgramInfo::from_pin(dir.join(PROG_PIN))
        .ok()
        .map(|i| i.id());
    let interfaces: Vec<InterfaceStatus> = interfaces
        .iter()
        .map(|i| judge_link(i, sys::ifindex(i), facts.get(i).copied(), prog_id))
        .collect();
    let counts = Maps::from_pins(dir).ok().map(|m| m.counts());
    let mut maps_out = Vec::new();
    for name in names::ALL {
        if let Ok(info) = aya::maps::MapInfo::from_pin(dir.join(name)) {
            maps_out.push(MapStatus {
                name: name.to_owned(),
                id: info.id(),
                max_entries: info.max_entries(),
                entries: counts
                    .as_ref()
                    .and_then(|c| c.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)),
            });
        }
    }
    Status {
        pin_path: dir.to_owned(),
        pinned,
        layout,
        attached: !interfaces.is_empty() && interfaces.iter().all(|i| i.attached),
        interfaces,
        links,
        maps: maps_out,
    }
}

/// Removes the pinned links (detaching the program), the program and the
/// maps. Their entries are gone afterwards; the store keeps its records.
pub fn detach(dir: &Path) -> Result<Vec<String>, XdpError> {
    let mut removed = Vec::new();
    for (iface, path) in pinned_links(dir) {
        // Detach before unpinning: an unpinned link is released later, from
        // a kernel work queue, and until then it still drops traffic.
        // A link that cannot be opened (a stale pin) is only unpinned.
        if let Ok(fd) = sys::obj_get(&path) {
            use std::os::fd::AsFd as _;
            if let Err(e) = sys::link_detach(fd.as_fd()) {
                tracing::warn!("detaching the link on {iface} at once failed ({e}); it goes when the kernel releases it");
            }
        }
        std::fs::remove_file(&path).map_err(io("removing", &path))?;
        removed.push(format!("link {iface}"));
    }
    let prog = dir.join(PROG_PIN);
    if prog.exists() {
        std::fs::remove_file(&prog).map_err(io("removing", &prog))?;
        removed.push("program".into());
    }
    for name in names::ALL {
        let p = dir.join(name);
        if p.exists() {
            std::fs::remove_file(&p).map_err(io("removing", &p))?;
            removed.push(format!("map {name}"));
        }
    }
    maps::clear_staging(dir);
    // Only remove the directory if it is now empty: it may hold what
    // someone else pinned.
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::{judge_link, sys::LinkFacts};

    fn link(ifindex: u32, prog_id: u32) -> LinkFacts {
        LinkFacts {
            link_type: super::sys::BPF_LINK_TYPE_XDP,
            id: 7,
            prog_id,
            ifindex,
        }
    }

    #[test]
    fn an_interface_is_guarded_only_by_a_live_link_running_our_program() {
        let state = |ifindex, l, prog| {
            let s = judge_link("eth0", ifindex, l, prog);
            assert_eq!(s.attached, s.state == "attached", "{s:?}");
            s.state
        };
        assert_eq!(state(Some(3), Some(link(3, 9)), Some(9)), "attached");
        // Without a pinned program to compare with, a live link counts.
        assert_eq!(state(Some(3), Some(link(3, 9)), None), "attached");
        assert_eq!(
            state(Some(4), Some(link(0, 9)), Some(9)),
            "link severed (interface deleted or re-created)"
        );
        assert_eq!(
            state(None, Some(link(0, 9)), Some(9)),
            "link severed (interface deleted or re-created)"
        );
        assert_eq!(state(None, None, Some(9)), "no such interface");
        assert_eq!(state(Some(3), None, Some(9)), "not attached");
        assert!(state(Some(4), Some(link(3, 9)), Some(9))
            .starts_with("link attached to another device"));
        assert!(state(Some(3), Some(link(3, 8)), Some(9)).starts_with("link runs another program"));
    }

    #[test]
    fn interface_indexes_and_missing_pins() {
        assert_eq!(super::sys::ifindex("lo"), Some(1));
        assert_eq!(super::sys::ifindex("no-such-if0"), None);
        let e = super::sys::obj_get(std::path::Path::new("/sys/fs/bpf/no-such-pin-here"))
            .expect_err("nothing pinned there");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
}
