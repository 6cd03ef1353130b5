//! The benchmark network: a server namespace and a client namespace joined
//! by one veth pair, both created by the benchmark and removed on drop.
//!
//! Nothing is added to the host's own namespace, so concurrent test runs on
//! the same machine cannot collide with it. Addresses are documentation
//! prefixes only: the server is 192.0.2.1 / `2001:db8:1::1`, well-behaved
//! clients are 192.0.2.2 / `2001:db8:1::2`, and the flood sources are
//! 198.51.100.1–250, 203.0.113.1–250 and `2001:db8:bad:N::1` (N = 1..=500),
//! each IPv6 source in its own /64. First-time clients come from
//! `2001:db8:beef::/48`, routed to the client namespace as a local
//! (`AnyIP`) prefix, so any number of fresh addresses can be bound with
//! `IP_FREEBIND` without assigning each one.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// The server's IPv4 address.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The server's IPv6 address.
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// The well-behaved client's IPv4 address.
pub const GOOD_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The well-behaved client's IPv6 address.
pub const GOOD_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);

/// The `k`-th first-time client address, each in its own /64.
pub fn fresh_v6(k: u32) -> Ipv6Addr {
    let hi = u16::try_from(k >> 16).unwrap_or(u16::MAX);
    let lo = u16::try_from(k & 0xffff).unwrap_or(0);
    Ipv6Addr::new(0x2001, 0xdb8, 0xbeef, hi, lo, 0, 0, 1)
}

/// The flood's 1,000 source addresses: 500 IPv4, 500 IPv6.
pub fn flood_sources() -> Vec<IpAddr> {
    let mut v = Vec::with_capacity(1000);
    for i in 1..=250u8 {
        v.push(IpAddr::V4(Ipv4Addr::new(198, 51, 100, i)));
        v.push(IpAddr::V4(Ipv4Addr::new(203, 0, 113, i)));
    }
    for n in 1..=500u16 {
        v.push(IpAddr::V6(Ipv6Addr::new(
            0x2001, 0xdb8, 0xbad, n, 0, 0, 0, 1,
        )));
    }
    v
}

/// Runs a command, failing with its output when it fails.
pub fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Feeds `script` to `ip -batch -` inside namespace `ns`.
fn ip_batch(ns: &str, script: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run ip -batch")?;
    child
        .stdin
        .take()
        .context("ip stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("ip -batch failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The two namespaces and the veth between them.
pub struct BenchNet {
    /// The server's namespace (MTA, screener, nftables).
    pub server_ns: String,
    /// The clients' namespace (well-behaved clients and the flood).
    pub client_ns: String,
    /// The server's end of the veth, where XDP and nftables attach.
    pub server_if: String,
    /// The clients' end of the veth.
    pub client_if: String,
}

impl BenchNet {
    /// Creates both namespaces and the veth, and assigns every address.
    pub fn new() -> Result<BenchNet> {
        let pid = std::process::id();
        let net = BenchNet {
            server_ns: format!("scrbench-s{pid}"),
            client_ns: format!("scrbench-c{pid}"),
            server_if: format!("sbs{pid}"),
            client_if: format!("sbc{pid}"),
        };
        run(&["ip", "netns", "add", &net.server_ns])?;
        // From here on a failure drops `net`, which deletes what exists.
        run(&["ip", "netns", "add", &net.client_ns])?;
        run(&[
            "ip",
            "-n",
            &net.server_ns,
            "link",
            "add",
            &net.server_if,
            "type",
            "veth",
            "peer",
            "name",
            &net.client_if,
            "netns",
            &net.client_ns,
        ])?;
        let s = &net.server_if;
        ip_batch(
            &net.server_ns,
            &format!(
                "link set lo up\n\
                 addr add {SERVER_V4}/24 dev {s}\n\
                 addr add {SERVER_V6}/64 dev {s} nodad\n\
                 link set {s} up\n\
                 route add 198.51.100.0/24 dev {s}\n\
                 route add 203.0.113.0/24 dev {s}\n\
                 route add 2001:db8:bad::/48 dev {s}\n\
                 route add 2001:db8:beef::/48 via {GOOD_V6} dev {s}\n"
            ),
        )?;
        let c = &net.client_if;
        let mut script = format!(
            "link set lo up\n\
             addr add {GOOD_V4}/24 dev {c}\n\
             addr add {GOOD_V6}/64 dev {c} nodad\n"
        );
        for a in flood_sources() {
            match a {
                IpAddr::V4(v4) => writeln!(script, "addr add {v4}/32 dev {c}"),
                IpAddr::V6(v6) => writeln!(script, "addr add {v6}/128 dev {c} nodad"),
            }
            .expect("writing to a String");
        }
        writeln!(script, "link set {c} up").expect("writing to a String");
        writeln!(script, "route add local 2001:db8:beef::/48 dev lo").expect("writing to a String");
        ip_batch(&net.client_ns, &script)?;
        Ok(net)
    }

    /// Runs `args` inside the server namespace.
    pub fn in_server(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["ip", "netns", "exec", &self.server_ns];
        v.extend_from_slice(args);
        run(&v)
    }
}

impl Drop for BenchNet {
    fn drop(&mut self) {
        // Deleting a namespace destroys its veth end, and with it the pair;
        // processes still inside were stopped by their own guards first.
        for ns in [&self.client_ns, &self.server_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
