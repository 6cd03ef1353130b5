//! A typed layer over the pinned kernel maps: insert, remove, list and
//! expire block and allow entries by CIDR.
//!
//! Where an entry goes: an IPv4 /32 into the `block_v4` hash, an IPv6 net of
//! exactly `ipv6_prefix` bits into the `block_v6` hash (keyed by the masked
//! prefix), every other prefix into the CIDR tries. Hash lookups cost the
//! same at a million entries as at ten; the tries hold the (few) prefixes.
//!
//! This layer also keeps the `FLAG_HAS_*` bits of the `config` entry true,
//! so the program skips the lookups of empty maps.
//!
//! ADOPTING A PINNED SET. Every pinned map is checked against this
//! program's [`MapSpec`] (type, key and value sizes, flags, and the size
//! of the fixed maps), as cilium/ebpf's `MapSpec.Compatible` does: a
//! mismatch is another layout and is refused. The sizes `xdp.max_*` give
//! are not layout: a map of another size is migrated ([`plan_resize`],
//! [`migrate`]) into a map of the configured size holding every entry.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::maps::{
    lpm_trie::Key, Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, MapInfo,
    PerCpuArray,
};
use ipnet::IpNet;
use screener_common::{
    map_names as names, stat, Config as KConfig, Entry, Reason, FLAG_HAS_V4_ALLOW,
    FLAG_HAS_V4_CIDRS, FLAG_HAS_V4_HOSTS, FLAG_HAS_V6_ALLOW, FLAG_HAS_V6_CIDRS, FLAG_HAS_V6_HOSTS,
    FLAG_PREFILTER_V4, FLAG_PREFILTER_V6, LAYOUT_VERSION, REASONS,
};
use serde::Serialize;

use super::{prefilter::Prefilter, XdpError};

/// The config key that sizes each map, for "map full" messages.
pub fn size_key(map: &str) -> &'static str {
    match map {
        names::BLOCK_V4 | names::BLOCK_V6 => "xdp.max_hosts",
        names::BLOCK_V4_CIDR | names::BLOCK_V6_CIDR => "xdp.max_prefixes",
        _ => "xdp.max_allows",
    }
}

/// Handles on every map of one program instance.
pub struct Maps {
    config: Array<MapData, KConfig>,
    stats: PerCpuArray<MapData, u64>,
    allow_v4: LpmTrie<MapData, [u8; 4], Entry>,
    allow_v6: LpmTrie<MapData, [u8; 16], Entry>,
    block_v4: HashMap<MapData, [u8; 4], Entry>,
    block_v6: HashMap<MapData, [u8; 16], Entry>,
    block_v4_cidr: LpmTrie<MapData, [u8; 4], Entry>,
    block_v6_cidr: LpmTrie<MapData, [u8; 16], Entry>,
    pre_v4: Prefilter,
    pre_v6: Prefilter,
    /// The CIDR tries' keys (filled by `rebuild_prefilters`).
    cidrs: std::collections::HashSet<IpNet>,
    /// Entries in `block_v4` and `block_v6`, counted by
    /// `rebuild_prefilters` and kept by `block`/`unblock`: the fill level
    /// is read on every scrape, and walking a million keys each time is
    /// what a wave can least afford. `None` until the first count.
    hosts: Option<[usize; 2]>,
    /// Copy of the `config` entry; this process is its only writer.
    settings: KConfig,
}

/// One entry as `block list` / `allow list` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listed {
    pub net: IpNet,
    pub reason: String,
    /// Seconds until it expires; `None` = never; 0 = expired, not yet swept.
    pub expires_in: Option<u64>,
    pub hits: u32,
    /// The kernel map holding it.
    pub map: &'static str,
    /// The fleet node whose verdict it is, when another node's (filled in
    /// from the store by `block list`; never known to the kernel).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// Kernel counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelStats {
    pub seen: u64,
    pub passed: u64,
    pub dropped: u64,
    pub passed_by_cause: std::collections::BTreeMap<&'static str, u64>,
    pub dropped_by_reason: std::collections::BTreeMap<&'static str, u64>,
    /// How full each block and allow map is: a full map refuses verdicts.
    pub maps: Vec<MapFill>,
}

/// One map's fill level.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapFill {
    /// The map's pinned name.
    pub map: &'static str,
    /// Entries in it now.
    pub entries: u64,
    /// Entries it can hold (the `xdp.max_*` key that sizes it).
    pub max_entries: u64,
}

/// Current `CLOCK_BOOTTIME` second: the clock the program expires on.
pub fn boot_now() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) };
    assert_eq!(rc, 0, "CLOCK_BOOTTIME is always available on Linux");
    u32::try_from(ts.tv_sec).unwrap_or(u32::MAX)
}

/// The `expires` field for an entry living `ttl` seconds (`None`: forever).
pub fn expiry_after(ttl: Option<u64>) -> u32 {
    match ttl {
        None => 0,
        Some(t) => {
            let t = u32::try_from(t).unwrap_or(u32::MAX);
            boot_now().saturating_add(t.max(1))
        }
    }
}

fn take<T>(map: Map, name: &str) -> Result<T, XdpError>
where
    T: TryFrom<Map, Error = MapError>,
{
    T::try_from(map).map_err(|source| XdpError::Map {
        map: name.to_owned(),
        source,
    })
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> XdpError {
    move |source| XdpError::Map {
        map: map.to_owned(),
        source,
    }
}

/// Turns a failed insert into "map full" when that is what the kernel said.
fn insert_err(map: &'static str, max: u32) -> impl Fn(MapError) -> XdpError {
    move |source| {
        if let MapError::SyscallError(ref e) = source {
            if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) {
                return XdpError::MapFull {
                    map,
                    size: max,
                    key: size_key(map),
                };
            }
        }
        XdpError::Map {
            map: map.to_owned(),
            source,
        }
    }
}

/// What a pinned map must be for this program to use it, as cilium/ebpf's
/// `MapSpec.Compatible` checks before reusing a pin: aya reuses any pinned
/// descriptor of the right name unchecked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// `BPF_MAP_TYPE_*`: a hash read as a trie would be nonsense.
    pub map_type: u32,
    /// Key bytes: the address family and the key layout.
    pub key_size: u32,
    /// Value bytes: the [`Entry`] / [`KConfig`] layout.
    pub value_size: u32,
    /// `BPF_F_*` creation flags (preallocation changes memory and
    /// behaviour when full).
    pub flags: u32,
    /// Fixed sizes only (`config`, `stats`, the prefilters); `None` for the
    /// maps `xdp.max_*` size, which are migrated when the size changes.
    pub max_entries: Option<u32>,
}

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
const BPF_F_NO_PREALLOC: u32 = 1;

/// The spec of the map `name` in this program's object.
#[expect(
    clippy::cast_possible_truncation,
    reason = "map values are a few KiB at most"
)]
pub fn spec(name: &str) -> Option<MapSpec> {
    let entry = size_of::<Entry>() as u32;
    let (map_type, key_size, value_size, flags, max_entries) = match name {
        names::CONFIG => (
            BPF_MAP_TYPE_ARRAY,
            4,
            size_of::<KConfig>() as u32,
            0,
            Some(1),
        ),
        // Counters and prefilter words are u64 slots of an array.
        names::STATS => (BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 0, Some(stat::LEN)),
        names::PREFILTER_V4 | names::PREFILTER_V6 => (
            BPF_MAP_TYPE_ARRAY,
            4,
            8,
            0,
            Some(screener_common::prefilter::WORDS as u32),
        ),
        // An LPM key is a u32 prefix length and the address bytes.
        names::ALLOW_V4 | names::BLOCK_V4_CIDR => {
            (BPF_MAP_TYPE_LPM_TRIE, 8, entry, BPF_F_NO_PREALLOC, None)
        }
        names::ALLOW_V6 | names::BLOCK_V6_CIDR => {
            (BPF_MAP_TYPE_LPM_TRIE, 20, entry, BPF_F_NO_PREALLOC, None)
        }
        names::BLOCK_V4 => (BPF_MAP_TYPE_HASH, 4, entry, BPF_F_NO_PREALLOC, None),
        names::BLOCK_V6 => (BPF_MAP_TYPE_HASH, 16, entry, BPF_F_NO_PREALLOC, None),
        _ => return None,
    };
    Some(MapSpec {
        map_type,
        key_size,
        value_size,
        flags,
        max_entries,
    })
}

/// The size `xdp.*` gives each map it sizes (the others are fixed).
pub fn configured_sizes(x: &crate::config::Xdp) -> [(&'static str, u32); 6] {
    [
        (names::BLOCK_V4, x.max_hosts),
        (names::BLOCK_V6, x.max_hosts),
        (names::BLOCK_V4_CIDR, x.max_prefixes),
        (names::BLOCK_V6_CIDR, x.max_prefixes),
        (names::ALLOW_V4, x.max_allows),
        (names::ALLOW_V6, x.max_allows),
    ]
}

/// The first way `info` differs from `want`, as text for the refusal.
fn incompatibility(info: &MapInfo, want: &MapSpec) -> Option<String> {
    let kind = info.map_type().map_or(u32::MAX, |t| t as u32);
    let fields = [
        ("type", kind, want.map_type),
        ("key size", info.key_size(), want.key_size),
        ("value size", info.value_size(), want.value_size),
        ("flags", info.map_flags(), want.flags),
        (
            "max_entries",
            info.max_entries(),
            want.max_entries.unwrap_or(info.max_entries()),
        ),
    ];
    fields
        .iter()
        .find(|(_, got, want)| got != want)
        .map(|(what, got, want)| format!("{what} {got}, this version uses {want}"))
}

/// Checks that a pinned set of maps has this program's layout (type,
/// key and value sizes, flags, fixed sizes, and the layout version in
/// `config`), so entries are never read with another meaning. The sizes
/// `xdp.max_*` set are not part of the layout: [`plan_resize`] handles
/// them. Returns the pinned IPv6 prefix.
pub fn check_pinned_layout(dir: &Path) -> Result<u32, XdpError> {
    for name in names::ALL {
        let path = dir.join(name);
        let info = MapInfo::from_pin(&path).map_err(|source| XdpError::Pinned {
            path: path.clone(),
            reason: format!("cannot open: {source}"),
        })?;
        let want = spec(name).expect("every map has a spec");
        if let Some(detail) = incompatibility(&info, &want) {
            return Err(XdpError::Layout {
                dir: dir.to_owned(),
                detail: format!("map {name} has {detail}"),
            });
        }
    }
    let data = MapData::from_pin(dir.join(names::CONFIG)).map_err(map_err(names::CONFIG))?;
    let config: Array<MapData, KConfig> = take(Map::Array(data), names::CONFIG)?;
    let current = config.get(&0, 0).map_err(map_err(names::CONFIG))?;
    if current.layout != LAYOUT_VERSION {
        return Err(XdpError::Layout {
            dir: dir.to_owned(),
            detail: format!(
                "pinned layout version {}, this version uses {LAYOUT_VERSION}",
                current.layout
            ),
        });
    }
    Ok(current.ipv6_prefix)
}

/// One pinned map whose size differs from the configured one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resize {
    /// The map's name and pin.
    pub map: &'static str,
    /// Its pinned size.
    pub from: u32,
    /// The size the configuration asks for.
    pub to: u32,
    /// Entries it holds now, all of which move.
    pub entries: usize,
}

/// The size of every sized map in the pinned set (a set already checked
/// by [`check_pinned_layout`]).
pub fn pinned_sizes(dir: &Path) -> Result<Vec<(&'static str, u32)>, XdpError> {
    configured_sizes(&crate::config::Xdp::default())
        .iter()
        .map(|(name, _)| {
            let info = MapInfo::from_pin(dir.join(name)).map_err(map_err(name))?;
            Ok((*name, info.max_entries()))
        })
        .collect()
}

/// The pinned maps whose size differs from `wanted`. A map holding more
/// entries than its new size takes is refused, naming the key: migrating
/// it would drop verdicts in force.
pub fn plan_resize(dir: &Path, wanted: &[(&'static str, u32)]) -> Result<Vec<Resize>, XdpError> {
    let mut out = Vec::new();
    for &(map, to) in wanted {
        let data = MapData::from_pin(dir.join(map)).map_err(map_err(map))?;
        let from = data.info().map_err(map_err(map))?.max_entries();
        if from == to {
            continue;
        }
        let entries = count_keys(data, map)?;
        if entries > to as usize {
            return Err(XdpError::ResizeTooSmall {
                map,
                key: size_key(map),
                size: to,
                entries,
            });
        }
        out.push(Resize {
            map,
            from,
            to,
            entries,
        });
    }
    Ok(out)
}

/// Entries in the block or allow map `name`.
fn count_keys(data: MapData, name: &'static str) -> Result<usize, XdpError> {
    Ok(match name {
        names::BLOCK_V4 => {
            let m: HashMap<MapData, [u8; 4], Entry> = take(Map::HashMap(data), name)?;
            m.keys().count()
        }
        names::BLOCK_V6 => {
            let m: HashMap<MapData, [u8; 16], Entry> = take(Map::HashMap(data), name)?;
            m.keys().count()
        }
        names::ALLOW_V4 | names::BLOCK_V4_CIDR => {
            let m: LpmTrie<MapData, [u8; 4], Entry> = take(Map::LpmTrie(data), name)?;
            m.keys().count()
        }
        _ => {
            let m: LpmTrie<MapData, [u8; 16], Entry> = take(Map::LpmTrie(data), name)?;
            m.keys().count()
        }
    })
}

/// Where the resized copy of `name` is pinned while it is filled (bpffs
/// refuses a `.` in a name, hence a prefix). A
/// copy left by a start that died half-way is removed by
/// [`clear_staging`] and made again.
pub fn staging_pin(dir: &Path, name: &str) -> std::path::PathBuf {
    dir.join(format!("resize_{name}"))
}

/// Removes every staging pin in `dir`.
pub fn clear_staging(dir: &Path) {
    for name in names::ALL {
        let _ = std::fs::remove_file(staging_pin(dir, name));
    }
}

/// Copies every entry of each pinned map in `plan` into its resized copy
/// (already created at [`staging_pin`]), then renames each copy over the
/// old pin. The old maps stay in use by the program already attached
/// until the new instance is swapped into the links, so the gate never
/// opens; a failure before the renames leaves the pinned set as it was.
pub fn migrate(dir: &Path, plan: &[Resize]) -> Result<(), XdpError> {
    for r in plan {
        let old = MapData::from_pin(dir.join(r.map)).map_err(map_err(r.map))?;
        let new = MapData::from_pin(staging_pin(dir, r.map)).map_err(map_err(r.map))?;
        let size = r.to;
        match r.map {
            names::BLOCK_V4 => copy_hash::<[u8; 4]>(old, new, r.map, size)?,
            names::BLOCK_V6 => copy_hash::<[u8; 16]>(old, new, r.map, size)?,
            names::ALLOW_V4 | names::BLOCK_V4_CIDR => copy_trie::<[u8; 4]>(old, new, r.map, size)?,
            _ => copy_trie::<[u8; 16]>(old, new, r.map, size)?,
        }
    }
    for r in plan {
        let from = staging_pin(dir, r.map);
        let to = dir.join(r.map);
        // A rename in bpffs replaces the pin in one step: `to` names the
        // old map or the new one, never nothing.
        std::fs::rename(&from, &to).map_err(|source| XdpError::Io {
            what: "replacing the pin",
            path: to.clone(),
            source,
        })?;
    }
    Ok(())
}

fn copy_hash<K: aya::Pod>(
    old: MapData,
    new: MapData,
    name: &'static str,
    size: u32,
) -> Result<(), XdpError> {
    let old: HashMap<MapData, K, Entry> = take(Map::HashMap(old), name)?;
    let mut new: HashMap<MapData, K, Entry> = take(Map::HashMap(new), name)?;
    for item in &old {
        let (k, v) = item.map_err(map_err(name))?;
        new.insert(k, v, 0).map_err(insert_err(name, size))?;
    }
    Ok(())
}

fn copy_trie<K: aya::Pod>(
    old: MapData,
    new: MapData,
    name: &'static str,
    size: u32,
) -> Result<(), XdpError> {
    let old: LpmTrie<MapData, K, Entry> = take(Map::LpmTrie(old), name)?;
    let mut new: LpmTrie<MapData, K, Entry> = take(Map::LpmTrie(new), name)?;
    for item in &old {
        let (k, v) = item.map_err(map_err(name))?;
        new.insert(&k, v, 0).map_err(insert_err(name, size))?;
    }
    Ok(())
}

impl Maps {
    /// Opens the maps pinned in `dir`.
    pub fn from_pins(dir: &Path) -> Result<Maps, XdpError> {
        let open = |name: &str| -> Result<MapData, XdpError> {
            MapData::from_pin(dir.join(name)).map_err(|source| XdpError::Map {
                map: name.to_owned(),
                source,
            })
        };
        let config: Array<MapData, KConfig> =
            take(Map::Array(open(names::CONFIG)?), names::CONFIG)?;
        let settings = config.get(&0, 0).map_err(map_err(names::CONFIG))?;
        Ok(Maps {
            config,
            stats: take(Map::PerCpuArray(open(names::STATS)?), names::STATS)?,
            allow_v4: take(Map::LpmTrie(open(names::ALLOW_V4)?), names::ALLOW_V4)?,
            allow_v6: take(Map::LpmTrie(open(names::ALLOW_V6)?), names::ALLOW_V6)?,
            block_v4: take(Map::HashMap(open(names::BLOCK_V4)?), names::BLOCK_V4)?,
            block_v6: take(Map::HashMap(open(names::BLOCK_V6)?), names::BLOCK_V6)?,
            block_v4_cidr: take(
                Map::LpmTrie(open(names::BLOCK_V4_CIDR)?),
                names::BLOCK_V4_CIDR,
            )?,
            block_v6_cidr: take(
                Map::LpmTrie(open(names::BLOCK_V6_CIDR)?),
                names::BLOCK_V6_CIDR,
            )?,
            cidrs: std::collections::HashSet::new(),
            hosts: None,
            pre_v4: Prefilter::new(
                take(Map::Array(open(names::PREFILTER_V4)?), names::PREFILTER_V4)?,
                names::PREFILTER_V4,
            ),
            pre_v6: Prefilter::new(
                take(Map::Array(open(names::PREFILTER_V6)?), names::PREFILTER_V6)?,
                names::PREFILTER_V6,
            ),
            settings,
        })
    }

    /// Recomputes both prefilters from the block maps (at start, and the
    /// first time this handle changes an entry).
    pub fn rebuild_prefilters(&mut self) -> Result<(), XdpError> {
        let listed = self.blocks()?;
        self.cidrs = listed
            .iter()
            .filter(|l| l.map == names::BLOCK_V4_CIDR || l.map == names::BLOCK_V6_CIDR)
            .map(|l| l.net)
            .collect();
        let hosts = |map: &str| listed.iter().filter(|l| l.map == map).count();
        self.hosts = Some([hosts(names::BLOCK_V4), hosts(names::BLOCK_V6)]);
        let nets: Vec<IpNet> = listed.into_iter().map(|l| l.net).collect();
        self.pre_v4
            .rebuild(nets.iter().filter(|n| matches!(n, IpNet::V4(_))))?;
        self.pre_v6
            .rebuild(nets.iter().filter(|n| matches!(n, IpNet::V6(_))))?;
        self.refresh_flags()
    }

    fn ensure_prefilters(&mut self) -> Result<(), XdpError> {
        if self.pre_v4.is_built() && self.pre_v6.is_built() {
            return Ok(());
        }
        self.rebuild_prefilters()
    }

    fn prefilter_of(&mut self, net: &IpNet) -> &mut Prefilter {
        match net {
            IpNet::V4(_) => &mut self.pre_v4,
            IpNet::V6(_) => &mut self.pre_v6,
        }
    }

    /// Writes the program's settings and marks it ready. Keeps the
    /// `FLAG_HAS_*` bits as the maps' contents say.
    pub fn configure(&mut self, ipv6_prefix: u32, ports: Option<&[u16]>) -> Result<(), XdpError> {
        let mut s = KConfig {
            layout: LAYOUT_VERSION,
            ipv6_prefix,
            flags: screener_common::FLAG_READY,
            reserved: 0,
            ports: screener_common::port_bitmap(ports.unwrap_or_default()),
        };
        if ports.is_none() {
            s.flags |= screener_common::FLAG_ALL_PORTS;
        }
        self.settings = s;
        self.refresh_flags()
    }

    /// Recomputes which maps hold entries and writes the settings.
    pub fn refresh_flags(&mut self) -> Result<(), XdpError> {
        let mut flags = self.settings.flags
            & !(FLAG_HAS_V4_HOSTS
                | FLAG_HAS_V6_HOSTS
                | FLAG_HAS_V4_CIDRS
                | FLAG_HAS_V6_CIDRS
                | FLAG_HAS_V4_ALLOW
                | FLAG_HAS_V6_ALLOW
                | FLAG_PREFILTER_V4
                | FLAG_PREFILTER_V6);
        if self.pre_v4.authoritative() {
            flags |= FLAG_PREFILTER_V4;
        }
        if self.pre_v6.authoritative() {
            flags |= FLAG_PREFILTER_V6;
        }
        let nonempty = |it: &mut dyn Iterator<Item = bool>| it.next().unwrap_or(false);
        if nonempty(&mut self.block_v4.keys().map(|k| k.is_ok())) {
            flags |= FLAG_HAS_V4_HOSTS;
        }
        if nonempty(&mut self.block_v6.keys().map(|k| k.is_ok())) {
            flags |= FLAG_HAS_V6_HOSTS;
        }
        if nonempty(&mut self.block_v4_cidr.keys().map(|k| k.is_ok())) {
            flags |= FLAG_HAS_V4_CIDRS;
        }
        if nonempty(&mut self.block_v6_cidr.keys().map(|k| k.is_ok())) {
            flags |= FLAG_HAS_V6_CIDRS;
        }
        if nonempty(&mut self.allow_v4.keys().map(|k| k.is_ok())) {
            flags |= FLAG_HAS_V4_ALLOW;
        }
        if nonempty(&mut self.allow_v6.keys().map(|k| k.is_ok())) {
            flags |= FLAG_HAS_V6_ALLOW;
        }
        self.set_flags(flags)
    }

    fn set_flags(&mut self, flags: u32) -> Result<(), XdpError> {
        self.settings.flags = flags;
        self.config
            .set(0, self.settings, 0)
            .map_err(map_err(names::CONFIG))
    }

    fn drop_flag_if(&mut self, flag: u32, empty: bool) -> Result<(), XdpError> {
        if !empty || self.settings.flags & flag == 0 {
            return Ok(());
        }
        self.set_flags(self.settings.flags & !flag)
    }

    fn add_flag(&mut self, flag: u32) -> Result<(), XdpError> {
        if self.settings.flags & flag == flag {
            return Ok(());
        }
        self.set_flags(self.settings.flags | flag)
    }

    /// The IPv6 prefix the `block_v6` keys are masked to.
    pub fn ipv6_prefix(&self) -> u32 {
        self.settings.ipv6_prefix
    }

    /// Whether `net` is stored in a host hash rather than a trie.
    fn is_host_entry(&self, net: &IpNet) -> bool {
        match net {
            IpNet::V4(n) => n.prefix_len() == 32,
            IpNet::V6(n) => u32::from(n.prefix_len()) == self.settings.ipv6_prefix,
        }
    }

    /// Adds or replaces a block entry for `net` (host bits ignored).
    pub fn block(&mut self, net: IpNet, reason: Reason, expires: u32) -> Result<(), XdpError> {
        let net = net.trunc();
        let value = Entry {
            reason: reason as u32,
            expires,
            hits: 0,
            flags: 0,
        };
        self.ensure_prefilters()?;
        let host = self.is_host_entry(&net);
        let existed = match (net, host) {
            (IpNet::V4(n), true) => self.block_v4.get(&n.addr().octets(), 0).is_ok(),
            (IpNet::V6(n), true) => self.block_v6.get(&n.addr().octets(), 0).is_ok(),
            // A trie lookup answers the longest match, not "is this
            // exact prefix there": the tries' keys are mirrored here.
            (_, false) => self.cidrs.contains(&net),
        };
        if !existed {
            // The bit goes in before the entry: a clear bit must never hide one.
            self.prefilter_of(&net).add(&net)?;
            let authoritative = self.prefilter_of(&net).authoritative();
            let flag = if net.addr().is_ipv4() {
                FLAG_PREFILTER_V4
            } else {
                FLAG_PREFILTER_V6
            };
            if !authoritative && self.settings.flags & flag != 0 {
                self.set_flags(self.settings.flags & !flag)?;
            }
        }
        let result = self.insert_block(net, host, value);
        if result.is_err() && !existed {
            let _ = self.prefilter_of(&net).remove(&net);
        }
        if result.is_ok() && !host {
            self.cidrs.insert(net);
        }
        if result.is_ok() && host && !existed {
            self.count_host(&net, true);
        }
        result
    }

    fn insert_block(&mut self, net: IpNet, host: bool, value: Entry) -> Result<(), XdpError> {
        match (net, host) {
            (IpNet::V4(n), true) => {
                let size = max_of(&self.block_v4);
                self.block_v4
                    .insert(n.addr().octets(), value, 0)
                    .map_err(insert_err(names::BLOCK_V4, size))?;
                self.add_flag(FLAG_HAS_V4_HOSTS)
            }
            (IpNet::V6(n), true) => {
                let size = max_of(&self.block_v6);
                self.block_v6
                    .insert(n.addr().octets(), value, 0)
                    .map_err(insert_err(names::BLOCK_V6, size))?;
                self.add_flag(FLAG_HAS_V6_HOSTS)
            }
            (IpNet::V4(n), false) => {
                let size = max_of(&self.block_v4_cidr);
                self.block_v4_cidr
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.addr().octets()),
                        value,
                        0,
                    )
                    .map_err(insert_err(names::BLOCK_V4_CIDR, size))?;
                self.add_flag(FLAG_HAS_V4_CIDRS)
            }
            (IpNet::V6(n), false) => {
                let size = max_of(&self.block_v6_cidr);
                self.block_v6_cidr
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.addr().octets()),
                        value,
                        0,
                    )
                    .map_err(insert_err(names::BLOCK_V6_CIDR, size))?;
                self.add_flag(FLAG_HAS_V6_CIDRS)
            }
        }
    }

    /// Removes the block entry for exactly `net`. Returns whether there was one.
    pub fn unblock(&mut self, net: IpNet) -> Result<bool, XdpError> {
        let net = net.trunc();
        self.ensure_prefilters()?;
        let host = self.is_host_entry(&net);
        let removed = match (net, host) {
            (IpNet::V4(n), true) => {
                gone(self.block_v4.remove(&n.addr().octets()), names::BLOCK_V4)?
            }
            (IpNet::V6(n), true) => {
                gone(self.block_v6.remove(&n.addr().octets()), names::BLOCK_V6)?
            }
            (IpNet::V4(n), false) => gone(
                self.block_v4_cidr
                    .remove(&Key::new(u32::from(n.prefix_len()), n.addr().octets())),
                names::BLOCK_V4_CIDR,
            )?,
            (IpNet::V6(n), false) => gone(
                self.block_v6_cidr
                    .remove(&Key::new(u32::from(n.prefix_len()), n.addr().octets())),
                names::BLOCK_V6_CIDR,
            )?,
        };
        if removed && host {
            self.count_host(&net, false);
        }
        if removed {
            self.cidrs.remove(&net);
            self.prefilter_of(&net).remove(&net)?;
            // Only the map that lost an entry can have become empty.
            let (flag, empty) = match (net, host) {
                (IpNet::V4(_), true) => (FLAG_HAS_V4_HOSTS, self.block_v4.keys().next().is_none()),
                (IpNet::V6(_), true) => (FLAG_HAS_V6_HOSTS, self.block_v6.keys().next().is_none()),
                (IpNet::V4(_), false) => (
                    FLAG_HAS_V4_CIDRS,
                    self.block_v4_cidr.keys().next().is_none(),
                ),
                (IpNet::V6(_), false) => (
                    FLAG_HAS_V6_CIDRS,
                    self.block_v6_cidr.keys().next().is_none(),
                ),
            };
            self.drop_flag_if(flag, empty)?;
        }
        Ok(removed)
    }

    /// Keeps the host maps' entry count as `block`/`unblock` change them.
    fn count_host(&mut self, net: &IpNet, added: bool) {
        let i = usize::from(net.addr().is_ipv6());
        if let Some(hosts) = &mut self.hosts {
            hosts[i] = if added {
                hosts[i] + 1
            } else {
                hosts[i].saturating_sub(1)
            };
        }
    }

    /// Entries and size of every block and allow map. The host maps'
    /// counts are kept as entries change and the tries' keys are mirrored
    /// (see `hosts`, `cidrs`), so only the small allow tries are walked.
    pub fn fill(&self) -> Vec<MapFill> {
        let (hosts, cidrs) = match self.hosts {
            Some(h) => {
                let v4 = self.cidrs.iter().filter(|n| n.addr().is_ipv4()).count();
                (h, [v4, self.cidrs.len() - v4])
            }
            // Nothing counted yet: walk them this once.
            None => (
                [self.block_v4.keys().count(), self.block_v6.keys().count()],
                [
                    self.block_v4_cidr.keys().count(),
                    self.block_v6_cidr.keys().count(),
                ],
            ),
        };
        let fill = |map, entries, max_entries| MapFill {
            map,
            entries: entries as u64,
            max_entries: u64::from(max_entries),
        };
        vec![
            fill(
                names::ALLOW_V4,
                self.allow_v4.keys().count(),
                max_of(&self.allow_v4),
            ),
            fill(
                names::ALLOW_V6,
                self.allow_v6.keys().count(),
                max_of(&self.allow_v6),
            ),
            fill(names::BLOCK_V4, hosts[0], max_of(&self.block_v4)),
            fill(names::BLOCK_V6, hosts[1], max_of(&self.block_v6)),
            fill(names::BLOCK_V4_CIDR, cidrs[0], max_of(&self.block_v4_cidr)),
            fill(names::BLOCK_V6_CIDR, cidrs[1], max_of(&self.block_v6_cidr)),
        ]
    }

    /// Adds an allow entry: never dropped.
    pub fn allow(&mut self, net: IpNet) -> Result<(), XdpError> {
        let net = net.trunc();
        let value = Entry::default();
        match net {
            IpNet::V4(n) => {
                let size = max_of(&self.allow_v4);
                self.allow_v4
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.addr().octets()),
                        value,
                        0,
                    )
                    .map_err(insert_err(names::ALLOW_V4, size))?;
                self.add_flag(FLAG_HAS_V4_ALLOW)
            }
            IpNet::V6(n) => {
                let size = max_of(&self.allow_v6);
                self.allow_v6
                    .insert(
                        &Key::new(u32::from(n.prefix_len()), n.addr().octets()),
                        value,
                        0,
                    )
                    .map_err(insert_err(names::ALLOW_V6, size))?;
                self.add_flag(FLAG_HAS_V6_ALLOW)
            }
        }
    }

    pub fn unallow(&mut self, net: IpNet) -> Result<bool, XdpError> {
        let net = net.trunc();
        let removed = match net {
            IpNet::V4(n) => gone(
                self.allow_v4
                    .remove(&Key::new(u32::from(n.prefix_len()), n.addr().octets())),
                names::ALLOW_V4,
            )?,
            IpNet::V6(n) => gone(
                self.allow_v6
                    .remove(&Key::new(u32::from(n.prefix_len()), n.addr().octets())),
                names::ALLOW_V6,
            )?,
        };
        if removed {
            let (flag, empty) = match net {
                IpNet::V4(_) => (FLAG_HAS_V4_ALLOW, self.allow_v4.keys().next().is_none()),
                IpNet::V6(_) => (FLAG_HAS_V6_ALLOW, self.allow_v6.keys().next().is_none()),
            };
            self.drop_flag_if(flag, empty)?;
        }
        Ok(removed)
    }

    /// Every block entry.
    pub fn blocks(&self) -> Result<Vec<Listed>, XdpError> {
        let now = boot_now();
        let mut out = Vec::new();
        let v6p = u8::try_from(self.settings.ipv6_prefix).unwrap_or(128);
        for item in &self.block_v4 {
            let (k, v) = item.map_err(map_err(names::BLOCK_V4))?;
            out.push(listed(
                IpNet::from(IpAddr::from(Ipv4Addr::from(k))),
                v,
                now,
                names::BLOCK_V4,
            ));
        }
        for item in &self.block_v6 {
            let (k, v) = item.map_err(map_err(names::BLOCK_V6))?;
            let net = ipnet::Ipv6Net::new(Ipv6Addr::from(k), v6p).expect("prefix checked");
            out.push(listed(net.into(), v, now, names::BLOCK_V6));
        }
        for item in &self.block_v4_cidr {
            let (k, v) = item.map_err(map_err(names::BLOCK_V4_CIDR))?;
            let net = ipnet::Ipv4Net::new(Ipv4Addr::from(k.data()), prefix(k.prefix_len()))
                .expect("kernel prefix");
            out.push(listed(net.into(), v, now, names::BLOCK_V4_CIDR));
        }
        for item in &self.block_v6_cidr {
            let (k, v) = item.map_err(map_err(names::BLOCK_V6_CIDR))?;
            let net = ipnet::Ipv6Net::new(Ipv6Addr::from(k.data()), prefix(k.prefix_len()))
                .expect("kernel prefix");
            out.push(listed(net.into(), v, now, names::BLOCK_V6_CIDR));
        }
        Ok(out)
    }

    /// Every allow entry.
    pub fn allows(&self) -> Result<Vec<Listed>, XdpError> {
        let now = boot_now();
        let mut out = Vec::new();
        for item in &self.allow_v4 {
            let (k, v) = item.map_err(map_err(names::ALLOW_V4))?;
            let net = ipnet::Ipv4Net::new(Ipv4Addr::from(k.data()), prefix(k.prefix_len()))
                .expect("kernel prefix");
            out.push(listed(net.into(), v, now, names::ALLOW_V4));
        }
        for item in &self.allow_v6 {
            let (k, v) = item.map_err(map_err(names::ALLOW_V6))?;
            let net = ipnet::Ipv6Net::new(Ipv6Addr::from(k.data()), prefix(k.prefix_len()))
                .expect("kernel prefix");
            out.push(listed(net.into(), v, now, names::ALLOW_V6));
        }
        for l in &mut out {
            "allow".clone_into(&mut l.reason);
        }
        Ok(out)
    }

    /// Removes every expired block entry; returns what it removed. The
    /// program already ignores them; this frees their slots.
    pub fn sweep(&mut self) -> Result<Vec<Listed>, XdpError> {
        let expired: Vec<Listed> = self
            .blocks()?
            .into_iter()
            .filter(|l| l.expires_in == Some(0))
            .collect();
        for l in &expired {
            self.unblock(l.net)?;
        }
        Ok(expired)
    }

    /// Entries per map, for `xdp status`.
    pub fn counts(&self) -> Vec<(&'static str, usize)> {
        vec![
            (names::ALLOW_V4, self.allow_v4.keys().count()),
            (names::ALLOW_V6, self.allow_v6.keys().count()),
            (names::BLOCK_V4, self.block_v4.keys().count()),
            (names::BLOCK_V6, self.block_v6.keys().count()),
            (names::BLOCK_V4_CIDR, self.block_v4_cidr.keys().count()),
            (names::BLOCK_V6_CIDR, self.block_v6_cidr.keys().count()),
        ]
    }

    /// Kernel counters summed over CPUs.
    pub fn stats(&self) -> Result<KernelStats, XdpError> {
        let mut out = KernelStats::default();
        let read = |i: u32| -> Result<u64, XdpError> {
            let v = self.stats.get(&i, 0).map_err(map_err(names::STATS))?;
            Ok(v.iter().sum())
        };
        for (i, name) in stat::PASS_NAMES {
            let n = read(i)?;
            out.passed += n;
            out.passed_by_cause
                .insert(name.strip_prefix("passed_").unwrap_or(name), n);
        }
        for r in 0..REASONS {
            let n = read(stat::DROP_BASE + r)?;
            out.dropped += n;
            if let Some(reason) = Reason::from_u32(r) {
                out.dropped_by_reason.insert(reason.name(), n);
            } else if n > 0 {
                out.dropped_by_reason.insert("other", n);
            }
        }
        out.seen = out.passed + out.dropped;
        out.maps = self.fill();
        Ok(out)
    }
}

/// A map's size, for "map full" messages.
fn max_of<M: IterableMap<K, V>, K: aya::Pod, V>(m: &M) -> u32 {
    m.map().info().map_or(0, |i| i.max_entries())
}

fn prefix(p: u32) -> u8 {
    u8::try_from(p).unwrap_or(u8::MAX)
}

fn gone(r: Result<(), MapError>, map: &'static str) -> Result<bool, XdpError> {
    match r {
        Ok(()) => Ok(true),
        Err(MapError::KeyNotFound) => Ok(false),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(false)
        }
        Err(source) => Err(XdpError::Map {
            map: map.to_owned(),
            source,
        }),
    }
}

fn listed(net: IpNet, v: Entry, now: u32, map: &'static str) -> Listed {
    Listed {
        net,
        reason: Reason::from_u32(v.reason)
            .map_or_else(|| format!("reason {}", v.reason), |r| r.name().to_owned()),
        expires_in: (v.expires != 0).then(|| u64::from(v.expires.saturating_sub(now))),
        hits: v.hits,
        map,
        origin: None,
    }
}

#[cfg(test)]
mod tests {
    use aya::{maps::Map, EbpfLoader};
    use screener_common::map_names as names;

    use super::{incompatibility, spec, MapSpec};

    /// The specs are written by hand; the object is the truth. Loading it
    /// (unpinned, at its default sizes) and comparing every map keeps the
    /// two from drifting apart.
    #[test]
    fn every_map_of_the_object_matches_its_spec() {
        let ebpf = EbpfLoader::new()
            .load(crate::ebpf_objects::SCREENER)
            .expect("loading the object (as root)");
        let defaults = crate::config::Xdp::default();
        for name in names::ALL {
            let map = ebpf.map(name).unwrap_or_else(|| panic!("no map {name}"));
            let (Map::Array(d) | Map::HashMap(d) | Map::LpmTrie(d) | Map::PerCpuArray(d)) = map
            else {
                panic!("map {name} is of an unexpected kind");
            };
            let info = d.info().expect("map info");
            let want = spec(name).unwrap_or_else(|| panic!("no spec for {name}"));
            assert_eq!(incompatibility(&info, &want), None, "map {name}");
            let sized = super::configured_sizes(&defaults)
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, s)| *s);
            assert_eq!(
                want.max_entries.or(sized),
                Some(info.max_entries()),
                "map {name}: a fixed size, or the configured default"
            );
        }
    }

    #[test]
    fn any_difference_but_a_configured_size_is_named() {
        let ebpf = EbpfLoader::new()
            .load(crate::ebpf_objects::SCREENER)
            .expect("loading the object (as root)");
        let info = |name| {
            let (Map::HashMap(d) | Map::Array(d)) = ebpf.map(name).expect("map") else {
                panic!("{name}: unexpected kind");
            };
            d.info().expect("map info")
        };
        let hosts = spec(names::BLOCK_V4).unwrap();
        let cases: [(&str, MapSpec, &str); 5] = [
            (
                names::BLOCK_V4,
                MapSpec {
                    map_type: 11,
                    ..hosts
                },
                "type 1, this version uses 11",
            ),
            (
                names::BLOCK_V4,
                MapSpec {
                    key_size: 16,
                    ..hosts
                },
                "key size 4",
            ),
            (
                names::BLOCK_V4,
                MapSpec {
                    value_size: 8,
                    ..hosts
                },
                "value size 16",
            ),
            (
                names::BLOCK_V4,
                MapSpec { flags: 0, ..hosts },
                "flags 1, this version uses 0",
            ),
            (
                names::CONFIG,
                MapSpec {
                    max_entries: Some(2),
                    ..spec(names::CONFIG).unwrap()
                },
                "max_entries 1, this version uses 2",
            ),
        ];
        for (name, want, said) in cases {
            let got = incompatibility(&info(name), &want).unwrap_or_default();
            assert!(got.starts_with(said), "{name}: {got:?}");
        }
        // Only the fixed maps' size is layout.
        assert_eq!(incompatibility(&info(names::BLOCK_V4), &hosts), None);
    }
}
