//! The XDP gate from userspace: load or adopt the program, attach it to the
//! configured interfaces, pin everything so the gate outlives the daemon.
//!
//! PINNING. Under `xdp.pin_path` live the eight maps (by name), the program
//! (`prog`) and one link per interface (`link_<ifname>`). A link pinned in
//! bpffs keeps the program attached when the daemon dies, so a crash never
//! opens the gate.
//!
//! ADOPTION. A starting daemon that finds a pinned set checks its layout
//! (map key/value sizes and the layout version in `config`) and refuses a
//! set of another layout with a message saying how to remove it. A set of
//! this layout is adopted: the new program instance is built on the pinned
//! maps (so every entry survives) and swapped into each pinned link
//! atomically, so an interface is never attached twice and never left
//! unguarded, even for an instant.

pub mod maps;
pub mod prefilter;

use std::path::{Path, PathBuf};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        Xdp, XdpMode as AyaMode,
    },
    Ebpf, EbpfLoader,
};
use screener_common::map_names as names;
use serde::Serialize;

use crate::config::{self, XdpMode};
pub use maps::Maps;

/// Name of the program in the object and its pin.
const PROGRAM: &str = "screener";
const PROG_PIN: &str = "prog";
const LINK_PREFIX: &str = "link_";

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("map {map}: {source}")]
    Map {
        map: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {map} is full ({key} = {size}); raise {key} or remove entries")]
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
    pub maps: Maps,
    pin_dir: PathBuf,
    /// `(interface, mode)` attached by this process or adopted.
    pub attached: Vec<(String, &'static str)>,
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

/// Whether `dir` holds a pinned set (at least the settings map).
pub fn is_pinned(dir: &Path) -> bool {
    dir.join(names::CONFIG).exists()
}

impl Gate {
    /// Loads the program on the pinned maps (creating and pinning them if
    /// there are none), configures it and attaches it to every interface,
    /// reusing pinned links.
    pub fn open(cfg: &config::Config) -> Result<Gate, XdpError> {
        let x = &cfg.xdp;
        let dir = &x.pin_path;
        ensure_bpffs(dir)?;
        if is_pinned(dir) {
            let pinned = maps::check_pinned_layout(dir)?;
            if pinned != u32::from(cfg.verdict.ipv6_prefix) {
                return Err(XdpError::Ipv6Prefix {
                    dir: dir.clone(),
                    pinned,
                    configured: cfg.verdict.ipv6_prefix,
                });
            }
            tracing::info!(pin_path = %dir.display(), "adopting pinned XDP maps");
        }
        let map_paths: Vec<(&str, PathBuf)> =
            names::ALL.iter().map(|n| (*n, dir.join(n))).collect();
        let log_level = x.log_level.aya_level();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(names::BLOCK_V4, x.max_hosts)
            .map_max_entries(names::BLOCK_V6, x.max_hosts)
            .map_max_entries(names::BLOCK_V4_CIDR, x.max_prefixes)
            .map_max_entries(names::BLOCK_V6_CIDR, x.max_prefixes)
            .map_max_entries(names::ALLOW_V4, x.max_allows)
            .map_max_entries(names::ALLOW_V6, x.max_allows)
            .override_global(aya_log::LEVEL, &log_level, false);
        let mut ebpf = loader.load(crate::ebpf_objects::SCREENER)?;
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
        let prog_pin = dir.join(PROG_PIN);
        if prog_pin.exists() {
            std::fs::remove_file(&prog_pin).map_err(io("replacing", &prog_pin))?;
        }
        prog.pin(&prog_pin).map_err(|e| XdpError::Pinned {
            path: prog_pin.clone(),
            reason: e.to_string(),
        })?;

        let mut attached = Vec::new();
        for iface in &x.interfaces {
            let mode = attach(prog, dir, iface, x.mode)?;
            attached.push((iface.clone(), mode));
        }
        // Links pinned for interfaces no longer configured are removed:
        // the configuration says where the gate stands.
        for (iface, path) in pinned_links(dir) {
            if !x.interfaces.contains(&iface) {
                tracing::info!(interface = %iface, "detaching XDP from an interface no longer configured");
                std::fs::remove_file(&path).map_err(io("removing", &path))?;
            }
        }
        Ok(Gate {
            ebpf,
            maps,
            pin_dir: dir.clone(),
            attached,
        })
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

/// Attaches `prog` to `iface`, or swaps it into the pinned link there.
fn attach(
    prog: &mut Xdp,
    dir: &Path,
    iface: &str,
    mode: XdpMode,
) -> Result<&'static str, XdpError> {
    let link_pin = dir.join(format!("{LINK_PREFIX}{iface}"));
    if link_pin.exists() {
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
        // The link stays pinned; the handle this process holds goes away.
        let link = prog.take_link(id)?;
        drop(link);
        tracing::info!(interface = iface, "adopted pinned XDP link");
        return Ok("adopted");
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
                fd_link.pin(&link_pin).map_err(|e| XdpError::Pinned {
                    path: link_pin.clone(),
                    reason: e.to_string(),
                })?;
                let name = mode_name(*m);
                tracing::info!(interface = iface, mode = name, "XDP attached");
                return Ok(name);
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

/// What `xdp status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_path: PathBuf,
    pub pinned: bool,
    pub layout: Option<String>,
    pub links: Vec<LinkStatus>,
    pub maps: Vec<MapStatus>,
}

#[derive(Debug, Serialize)]
pub struct LinkStatus {
    pub interface: String,
    pub link_id: u32,
    pub program_id: u32,
}

#[derive(Debug, Serialize)]
pub struct MapStatus {
    pub name: &'static str,
    pub id: u32,
    pub max_entries: u32,
    pub entries: Option<usize>,
}

/// Reads the pinned set without a daemon: links, maps, sizes.
pub fn status(dir: &Path) -> Status {
    let pinned = is_pinned(dir);
    let layout = pinned.then(|| match maps::check_pinned_layout(dir) {
        Ok(p) => format!(
            "version {} (IPv6 hosts keyed by /{p})",
            screener_common::LAYOUT_VERSION
        ),
        Err(e) => e.to_string(),
    });
    let mut links = Vec::new();
    for (iface, path) in pinned_links(dir) {
        if let Ok(l) = PinnedLink::from_pin(&path) {
            let fd: FdLink = l.into();
            if let Ok(info) = fd.info() {
                links.push(LinkStatus {
                    interface: iface,
                    link_id: info.id(),
                    program_id: info.program_id(),
                });
            }
        }
    }
    let counts = Maps::from_pins(dir).ok().map(|m| m.counts());
    let mut maps_out = Vec::new();
    for name in names::ALL {
        if let Ok(info) = aya::maps::MapInfo::from_pin(dir.join(name)) {
            maps_out.push(MapStatus {
                name,
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
        links,
        maps: maps_out,
    }
}

/// Removes the pinned links (detaching the program), the program and the
/// maps. Their entries are gone afterwards; the store keeps its records.
pub fn detach(dir: &Path) -> Result<Vec<String>, XdpError> {
    let mut removed = Vec::new();
    for (iface, path) in pinned_links(dir) {
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
    // Only remove the directory if it is now empty: it may hold what
    // someone else pinned.
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}
