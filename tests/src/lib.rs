//! Helpers shared by the integration tests: network namespaces, child
//! processes and pinned objects (each removed by a guard on drop), crafted
//! packets, and the XDP program loaded for `test_run`.

pub mod bench;
pub mod daemon;
pub mod fleet;
pub mod netns;
pub mod openmetrics;
pub mod packet;
pub mod rbldnsd;
pub mod redis;
pub mod smtp_peers;
pub mod store_damage;
pub mod sys;

use std::{net::Ipv4Addr, net::Ipv6Addr, os::fd::AsFd, os::fd::AsRawFd, time::Duration};

use anyhow::{bail, Context as _};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader, Pod,
};
use screener_common::{port_bitmap, Config, Entry, FLAG_ALL_PORTS, FLAG_READY, LAYOUT_VERSION};

/// `XDP_ABORTED`: the program must never return it.
pub const XDP_ABORTED: u32 = 0;
/// `XDP_DROP`.
pub const XDP_DROP: u32 = 1;
/// `XDP_PASS`.
pub const XDP_PASS: u32 = 2;

/// The TCP ports the tests put in scope unless a row says otherwise.
pub const SMTP_PORTS: [u16; 3] = [25, 465, 587];

/// Which destination ports the program judges.
#[derive(Clone, Copy, Debug)]
pub enum Ports<'a> {
    /// Every IP packet (`xdp.ports = ["all"]`).
    All,
    /// TCP segments to these ports.
    List(&'a [u16]),
}

/// A `Config` with `FLAG_READY` and `extra_flags` set.
#[must_use]
pub fn config(extra_flags: u32, ipv6_prefix: u32, ports: Ports<'_>) -> Config {
    let mut cfg = Config {
        layout: LAYOUT_VERSION,
        ipv6_prefix,
        flags: FLAG_READY | extra_flags,
        reserved: 0,
        ports: port_bitmap(match ports {
            Ports::All => &[],
            Ports::List(list) => list,
        }),
    };
    if matches!(ports, Ports::All) {
        cfg.flags |= FLAG_ALL_PORTS;
    }
    cfg
}

/// The current `CLOCK_BOOTTIME` second, the clock entries expire on.
#[must_use]
pub fn boottime_secs() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
    u32::try_from(ts.tv_sec).expect("boot time fits in u32 seconds")
}

/// A block entry for `reason` expiring at `expires` (0 = never).
#[must_use]
pub fn entry(reason: u32, expires: u32) -> Entry {
    Entry {
        reason,
        expires,
        hits: 0,
        flags: 0,
    }
}

/// An IPv6 address with every bit past `prefix` cleared.
#[must_use]
pub fn mask_v6(addr: Ipv6Addr, prefix: u32) -> Ipv6Addr {
    let bits = u128::from(addr);
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix.min(128))
    };
    Ipv6Addr::from(bits & mask)
}

/// An IPv4 address with every bit past `prefix` cleared.
#[must_use]
pub fn mask_v4(addr: Ipv4Addr, prefix: u32) -> Ipv4Addr {
    let bits = u32::from(addr);
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix.min(32))
    };
    Ipv4Addr::from(bits & mask)
}

/// One loaded XDP object with its program ready for `BPF_PROG_TEST_RUN`,
/// and typed access to its maps by name.
pub struct Gate {
    ebpf: Ebpf,
    program: &'static str,
}

impl Gate {
    /// Loads the screener's XDP program with its default map sizes.
    pub fn load() -> anyhow::Result<Self> {
        Self::load_object(
            screener::ebpf_objects::SCREENER,
            "screener",
            &mut EbpfLoader::new(),
        )
    }

    /// Loads `object` with `loader` and the XDP program called `program`.
    pub fn load_object(
        object: &[u8],
        program: &'static str,
        loader: &mut EbpfLoader<'_>,
    ) -> anyhow::Result<Self> {
        require_root()?;
        let mut ebpf = loader
            .load(object)
            .with_context(|| format!("loading the `{program}` eBPF object"))?;
        let prog: &mut Xdp = ebpf
            .program_mut(program)
            .with_context(|| format!("no program `{program}` in the object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the verifier rejected `{program}`"))?;
        Ok(Gate { ebpf, program })
    }

    /// The loaded object, to pin or inspect maps.
    pub fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    fn xdp(&self) -> anyhow::Result<&Xdp> {
        Ok(self
            .ebpf
            .program(self.program)
            .context("program vanished")?
            .try_into()?)
    }

    /// Runs the program once on `frame` and returns its action.
    pub fn run(&self, frame: &[u8]) -> anyhow::Result<u32> {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat: 1,
            ..TestRunOptions::default()
        };
        let res = self
            .xdp()?
            .test_run(opts)
            .with_context(|| format!("BPF_PROG_TEST_RUN on a {}-byte frame", frame.len()))?;
        Ok(res.return_value)
    }

    /// Runs the program `repeat` times on `frame` in the kernel; returns the
    /// action and the kernel's mean time per run.
    pub fn run_timed(&self, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, Duration)> {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        };
        let res = self.xdp()?.test_run(opts)?;
        Ok((res.return_value, res.duration))
    }

    fn map_mut(&mut self, name: &str) -> anyhow::Result<&mut Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("no map `{name}`"))
    }

    fn map(&self, name: &str) -> anyhow::Result<&Map> {
        self.ebpf
            .map(name)
            .with_context(|| format!("no map `{name}`"))
    }

    /// Writes the single entry of the settings array `map`.
    pub fn set_config(&mut self, map: &str, cfg: &Config) -> anyhow::Result<()> {
        let mut a: Array<_, Config> = Array::try_from(self.map_mut(map)?)?;
        a.set(0, cfg, 0)?;
        Ok(())
    }

    /// Inserts into the hash map `map`.
    /// Writes every non-zero word of an array map of `u64`.
    pub fn set_words(&mut self, map: &str, words: &[u64]) -> anyhow::Result<()> {
        let mut a: Array<_, u64> = Array::try_from(self.map_mut(map)?)?;
        for (i, w) in words.iter().enumerate() {
            if *w != 0 {
                a.set(u32::try_from(i)?, *w, 0)?;
            }
        }
        Ok(())
    }

    /// Sets or clears one prefilter bit (`prefilter_v4` / `prefilter_v6`).
    pub fn set_prefilter_bit(&mut self, map: &str, bit: u32, on: bool) -> anyhow::Result<()> {
        let mut a: Array<_, u64> = Array::try_from(self.map_mut(map)?)?;
        let word = a.get(&(bit >> 6), 0)?;
        let mask = 1u64 << (bit & 63);
        a.set(bit >> 6, if on { word | mask } else { word & !mask }, 0)?;
        Ok(())
    }

    pub fn put_hash<K: Pod>(&mut self, map: &str, key: K, e: &Entry) -> anyhow::Result<()> {
        let mut h: HashMap<_, K, Entry> = HashMap::try_from(self.map_mut(map)?)?;
        h.insert(key, e, 0)
            .with_context(|| format!("inserting into `{map}`"))?;
        Ok(())
    }

    /// Reads from the hash map `map`.
    pub fn get_hash<K: Pod>(&self, map: &str, key: K) -> anyhow::Result<Option<Entry>> {
        let h: HashMap<_, K, Entry> = HashMap::try_from(self.map(map)?)?;
        match h.get(&key, 0) {
            Ok(e) => Ok(Some(e)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Inserts `key/prefix` into the LPM trie `map`.
    pub fn put_trie<K: Pod>(
        &mut self,
        map: &str,
        prefix: u32,
        key: K,
        e: &Entry,
    ) -> anyhow::Result<()> {
        let mut t: LpmTrie<_, K, Entry> = LpmTrie::try_from(self.map_mut(map)?)?;
        t.insert(&Key::new(prefix, key), e, 0)
            .with_context(|| format!("inserting /{prefix} into `{map}`"))?;
        Ok(())
    }

    /// Reads the exact entry `key/prefix` of the LPM trie `map` (the kernel
    /// looks up the longest match; the caller compares against what it put).
    pub fn get_trie<K: Pod>(
        &self,
        map: &str,
        prefix: u32,
        key: K,
    ) -> anyhow::Result<Option<Entry>> {
        let t: LpmTrie<_, K, Entry> = LpmTrie::try_from(self.map(map)?)?;
        match t.get(&Key::new(prefix, key), 0) {
            Ok(e) => Ok(Some(e)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes every entry of the hash map `map`.
    pub fn clear_hash<K: Pod>(&mut self, map: &str) -> anyhow::Result<()> {
        let mut h: HashMap<_, K, Entry> = HashMap::try_from(self.map_mut(map)?)?;
        let keys = h.keys().collect::<Result<Vec<_>, _>>()?;
        for k in keys {
            h.remove(&k)?;
        }
        Ok(())
    }

    /// Removes every entry of the LPM trie `map`.
    pub fn clear_trie<K: Pod>(&mut self, map: &str) -> anyhow::Result<()> {
        let mut t: LpmTrie<_, K, Entry> = LpmTrie::try_from(self.map_mut(map)?)?;
        let keys = t.keys().collect::<Result<Vec<_>, _>>()?;
        for k in keys {
            t.remove(&k)?;
        }
        Ok(())
    }

    /// The per-CPU counters of `map`, summed over every CPU.
    pub fn stats(&self, map: &str) -> anyhow::Result<Vec<u64>> {
        let a: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map(map)?)?;
        let mut out = Vec::with_capacity(a.len() as usize);
        for i in 0..a.len() {
            out.push(a.get(&i, 0)?.iter().sum());
        }
        Ok(out)
    }

    /// Kernel memory charged to `map`, from `memlock` in the fdinfo of its
    /// file descriptor.
    pub fn map_memlock(&self, name: &str) -> anyhow::Result<u64> {
        let data: &MapData = match self.map(name)? {
            Map::HashMap(d) | Map::LpmTrie(d) | Map::Array(d) | Map::PerCpuArray(d) => d,
            _ => bail!("map `{name}` is of a kind this helper does not read"),
        };
        let fd = data.fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .with_context(|| format!("no memlock in the fdinfo of `{name}`"))?
            .trim()
            .parse()
            .context("memlock is not a number")
    }
}

/// Fails with a clear message when not running as root (loading BPF
/// programs needs `CAP_BPF` and `CAP_NET_ADMIN`).
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the XDP tests load BPF programs and must run as root");
    }
    Ok(())
}

/// Mounts bpffs on /sys/fs/bpf unless it already is.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .context("running mount")?;
    if !status.success() {
        bail!("mount -t bpf bpf /sys/fs/bpf failed ({status})");
    }
    Ok(())
}
