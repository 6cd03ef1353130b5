//! The configuration file (TOML).
//!
//! Screening parameters keep postscreen's names without the `postscreen_`
//! prefix. Every key is checked at start-up: an unknown key, a bad value or
//! a value out of range is an error naming the key (`section.key`) and the
//! value, and the daemon does not start on a half-understood file.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::duration::serde_str as dur;
use crate::screen::TestId;

/// What each key means: `config show --describe` and screener.toml(5).
pub mod describe;

/// Where the daemon and the admin commands look without `-c`.
pub const DEFAULT_PATH: &str = "/etc/screener/screener.toml";

/// A configuration that did not load.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Syntax(String),
    #[error("unknown key {key}")]
    UnknownKey { key: String },
    #[error("bad value for {key} = {value}: {reason}")]
    Value {
        key: String,
        value: String,
        reason: String,
    },
}

impl ConfigError {
    fn value(key: &str, value: impl fmt::Display, reason: impl fmt::Display) -> Self {
        ConfigError::Value {
            key: key.to_owned(),
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// A value that works but is probably a mistake; `config check` prints it
/// and the daemon logs it, naming the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigWarning {
    /// `section.key`.
    pub key: String,
    /// What the value does that the operator may not expect.
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// The verbs of RFC 5321 and its common extensions: listing one in
/// `forbidden_commands` would fail every real mail client.
const SMTP_VERBS: [&str; 14] = [
    "HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP",
    "STARTTLS", "AUTH", "BDAT",
];

/// Whether a hand-off to `backend` would reach the listener `listen`: the
/// same address, or a wildcard listener on the backend's port with the
/// backend on loopback.
fn loops_back(listen: SocketAddr, backend: SocketAddr) -> bool {
    let backend_ip = backend.ip().to_canonical();
    listen.port() == backend.port()
        && (listen.ip().to_canonical() == backend_ip
            || (listen.ip().is_unspecified()
                && backend_ip.is_loopback()
                && listen.is_ipv4() == backend_ip.is_ipv4()))
}

/// What a failed test does to the client (postscreen's `*_action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Log and carry on as if the test had passed (without caching a pass).
    Ignore,
    /// Carry on, then reject every RCPT with a 550.
    Enforce,
    /// Reply 521 and close at once.
    Drop,
}

/// The PROXY protocol header sent to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    None,
    V1,
    V2,
}

/// Whether connections arrive with a PROXY header from a load balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Upstream {
    None,
    Haproxy,
}

/// What happens when a client passes the deep protocol tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Handoff {
    /// Replay the dialogue to the backend and splice: no reconnect.
    Replay,
    /// postscreen's way: `450 4.3.2`, the client must come back.
    Reconnect,
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode where the driver has it, else generic (skb).
    Auto,
    Driver,
    Skb,
}

/// Which kernel-side log lines the XDP program emits (through aya-log).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BpfLogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl BpfLogLevel {
    /// The value of aya-log's `AYA_LOG_LEVEL` global: statements above it are
    /// removed by the verifier, so they cost nothing on the drop path.
    pub fn aya_level(self) -> u8 {
        match self {
            BpfLogLevel::Off => 0,
            BpfLogLevel::Error => 1,
            BpfLogLevel::Warn => 2,
            BpfLogLevel::Info => 3,
            BpfLogLevel::Debug => 4,
            BpfLogLevel::Trace => 5,
        }
    }
}

/// TCP destination ports the XDP program protects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ports {
    /// `["all"]`: every IP packet is in scope.
    All,
    List(Vec<u16>),
}

impl Serialize for Ports {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Ports::All => ["all"].serialize(s),
            Ports::List(p) => p.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Ports {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Item {
            Port(i64),
            Word(String),
        }
        let items = Vec::<Item>::deserialize(d)?;
        let mut ports = Vec::new();
        for item in &items {
            match item {
                Item::Word(w) if w == "all" => {
                    if items.len() != 1 {
                        return Err(serde::de::Error::custom("\"all\" must stand alone"));
                    }
                    return Ok(Ports::All);
                }
                Item::Word(w) => {
                    return Err(serde::de::Error::custom(format!(
                        "{w:?} is neither a port number nor \"all\""
                    )))
                }
                Item::Port(p) => match u16::try_from(*p) {
                    Ok(p) if p != 0 => ports.push(p),
                    _ => {
                        return Err(serde::de::Error::custom(format!(
                            "port {p} is outside 1..65535"
                        )))
                    }
                },
            }
        }
        if ports.is_empty() {
            return Err(serde::de::Error::custom(
                "no ports: list ports, or [\"all\"] for every packet",
            ));
        }
        Ok(Ports::List(ports))
    }
}

/// `permit` or `reject` in the permanent access list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessAction {
    Permit,
    Reject,
}

/// One `permit CIDR` / `reject CIDR` line; the first match wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessRule {
    pub action: AccessAction,
    pub net: IpNet,
}

impl FromStr for AccessRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut words = s.split_whitespace();
        let (Some(action), Some(net), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!(
                "{s:?}: expected \"permit CIDR\" or \"reject CIDR\""
            ));
        };
        let action = match action {
            "permit" => AccessAction::Permit,
            "reject" => AccessAction::Reject,
            other => return Err(format!("{other:?} is neither permit nor reject")),
        };
        let net = parse_cidr(net)?;
        Ok(AccessRule { action, net })
    }
}

impl fmt::Display for AccessRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = match self.action {
            AccessAction::Permit => "permit",
            AccessAction::Reject => "reject",
        };
        write!(f, "{a} {}", self.net)
    }
}

impl Serialize for AccessRule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AccessRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Parses a CIDR or a bare address (a host), refusing host bits under the
/// mask: `192.0.2.1/24` is a typo for the network `192.0.2.0/24` or the
/// host `192.0.2.1`, and guessing which would permit, reject or trust the
/// wrong clients. Used for the configuration; the admin commands (which
/// print the network they acted on) and third-party lists go through
/// [`parse_net`].
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!(
                "{s:?} has host bits set: write {} for the network or {} for the host",
                net.trunc(),
                net.addr()
            ));
        }
        return Ok(net);
    }
    parse_net(s)
}

/// Parses a CIDR or a bare address (a host), normalising host bits away.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an address or CIDR"))
}

/// Serde adapter: a list of CIDRs written as strings, host bits refused.
mod cidrs {
    use ipnet::IpNet;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(nets: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(nets.iter().map(ToString::to_string))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|n| super::parse_cidr(n).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// Outcomes that put the client into the kernel block maps, named in
/// `verdict.block_on` by the test's name or `denylist`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockOn {
    /// A screening test failed with action `enforce` or `drop`.
    Test(TestId),
    /// A `reject` rule of `screen.access_list` matched.
    Denylist,
}

impl BlockOn {
    /// The name in `verdict.block_on`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            BlockOn::Test(t) => t.name(),
            BlockOn::Denylist => "denylist",
        }
    }

    /// The reason a kernel block for this outcome carries.
    #[must_use]
    pub const fn reason(self) -> screener_common::Reason {
        match self {
            BlockOn::Test(t) => t.reason(),
            BlockOn::Denylist => screener_common::Reason::Denylist,
        }
    }
}

impl From<TestId> for BlockOn {
    fn from(t: TestId) -> BlockOn {
        BlockOn::Test(t)
    }
}

impl Serialize for BlockOn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for BlockOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        if name == "denylist" {
            return Ok(BlockOn::Denylist);
        }
        TestId::from_name(&name).map(BlockOn::Test).ok_or_else(|| {
            let known: Vec<&str> = TestId::ALL.iter().map(|t| t.name()).collect();
            serde::de::Error::custom(format!(
                "unknown outcome `{name}`, expected one of {}, denylist",
                known.join(", ")
            ))
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub smtp: Smtp,
    pub screen: Screen,
    pub dns: Dns,
    pub xdp: Xdp,
    pub verdict: Verdict,
    pub store: Store,
    pub admin: Admin,
    pub import: Import,
    pub metrics: Metrics,
    /// The fleet this node shares verdicts and passes with; off while
    /// `cluster.redis` is empty.
    pub cluster: crate::cluster::Settings,
    pub daemon: Daemon,
    /// Where the daemon's lines go and in which shape.
    pub log: crate::logging::Settings,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Smtp {
    /// Where clients connect: both families on the SMTP port.
    pub listen: Vec<SocketAddr>,
    /// Our name in replies and in the default banner.
    pub hostname: String,
    /// The `220-` teaser; `$hostname` expands; empty turns pregreet off.
    pub greet_banner: String,
    /// The real MTA.
    pub backend: SocketAddr,
    /// v2 by default: binary, unambiguous, and what Postfix reads.
    pub backend_proxy_protocol: ProxyVersion,
    pub upstream_proxy_protocol: Upstream,
    /// Peers allowed to send a PROXY header (required with `haproxy`):
    /// anyone else who reached the port could name any victim's address
    /// and have it blocked at the NIC.
    #[serde(with = "cidrs")]
    pub upstream_proxy_trusted: Vec<IpNet>,
    /// `postscreen_upstream_proxy_timeout`: a balancer that sends no header
    /// in this time is not one.
    #[serde(with = "dur")]
    pub upstream_proxy_timeout: Duration,
    /// Connecting to the backend and reading its greeting.
    #[serde(with = "dur")]
    pub backend_timeout: Duration,
    /// How long hand-offs in flight may run on after SIGTERM.
    #[serde(with = "dur")]
    pub shutdown_grace: Duration,
}

impl Default for Smtp {
    fn default() -> Self {
        Smtp {
            listen: vec![
                SocketAddr::from(([0, 0, 0, 0], 25)),
                SocketAddr::from(([0u16; 8], 25)),
            ],
            hostname: default_hostname(),
            greet_banner: "$hostname ESMTP".into(),
            backend: SocketAddr::from(([127, 0, 0, 1], 10025)),
            backend_proxy_protocol: ProxyVersion::V2,
            upstream_proxy_protocol: Upstream::None,
            // No balancer: nobody may send a header.
            upstream_proxy_trusted: Vec::new(),
            upstream_proxy_timeout: Duration::from_secs(5),
            backend_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[expect(
    clippy::struct_excessive_bools,
    reason = "postscreen's *_enable switches and permit_local: each a key of its own"
)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Screen {
    pub access_list: Vec<AccessRule>,
    /// Loopback and the host's own addresses are never screened or
    /// blocked, like postscreen's `permit_mynetworks` (see `local.rs`).
    pub permit_local: bool,
    /// postscreen's 6 s: long enough that real MTAs wait, short enough
    /// that bots (which pregreet within a second or two) show themselves.
    #[serde(with = "dur")]
    pub greet_wait: Duration,
    pub greet_action: Action,
    #[serde(with = "dur")]
    pub greet_ttl: Duration,
    pub dnsbl_sites: Vec<String>,
    pub dnsbl_threshold: i32,
    pub dnsbl_allowlist_threshold: i32,
    pub dnsbl_action: Action,
    #[serde(with = "dur")]
    pub dnsbl_timeout: Duration,
    #[serde(with = "dur")]
    pub dnsbl_min_ttl: Duration,
    #[serde(with = "dur")]
    pub dnsbl_max_ttl: Duration,
    /// Query domain → public name shown in replies and logs.
    pub dnsbl_reply_map: BTreeMap<String, String>,
    /// How often every list is asked for its RFC 5782 test points; a list
    /// that starts listing the world is switched off within this time.
    #[serde(with = "dur")]
    pub dnsbl_health_interval: Duration,
    /// Lists (query domains or public names) never health-checked: private
    /// lists whose operator vouches for them.
    pub dnsbl_health_skip: Vec<String>,
    /// Deep tests are off by default, as in postscreen: they cost a
    /// first-time client a dialogue.
    pub pipelining_enable: bool,
    pub pipelining_action: Action,
    #[serde(with = "dur")]
    pub pipelining_ttl: Duration,
    pub non_smtp_command_enable: bool,
    pub non_smtp_command_action: Action,
    #[serde(with = "dur")]
    pub non_smtp_command_ttl: Duration,
    pub bare_newline_enable: bool,
    pub bare_newline_action: Action,
    #[serde(with = "dur")]
    pub bare_newline_ttl: Duration,
    pub deep_test_handoff: Handoff,
    pub forbidden_commands: Vec<String>,
    pub pre_queue_limit: usize,
    pub post_queue_limit: usize,
    pub client_connection_count_limit: usize,
    pub command_count_limit: u32,
    #[serde(with = "dur")]
    pub command_time_limit: Duration,
    pub line_length_limit: usize,
    #[serde(with = "dur")]
    pub stress_greet_wait: Duration,
    #[serde(with = "dur")]
    pub stress_command_time_limit: Duration,
    #[serde(with = "dur")]
    pub cache_retention_time: Duration,
    #[serde(with = "dur")]
    pub cache_cleanup_interval: Duration,
}

const DAY: u64 = 86_400;

/// The longest `greet_wait` / `stress_greet_wait`: real MTAs wait patiently
/// (RFC 5321 gives the greeting 5 minutes), bots show themselves within
/// seconds, and a minute is already far past either.
const GREET_WAIT_MAX: Duration = Duration::from_secs(60);

impl Default for Screen {
    fn default() -> Self {
        Screen {
            access_list: Vec::new(),
            // The host must never lock itself out.
            permit_local: true,
            greet_wait: Duration::from_secs(6),
            greet_action: Action::Enforce,
            greet_ttl: Duration::from_secs(DAY),
            dnsbl_sites: Vec::new(),
            dnsbl_threshold: 1,
            dnsbl_allowlist_threshold: 0,
            dnsbl_action: Action::Ignore,
            dnsbl_timeout: Duration::from_secs(10),
            dnsbl_min_ttl: Duration::from_secs(60),
            dnsbl_max_ttl: Duration::from_secs(3600),
            dnsbl_reply_map: BTreeMap::new(),
            // Often enough to notice a list going rogue within the hour,
            // rare enough to be invisible in the list's query volume.
            dnsbl_health_interval: Duration::from_secs(600),
            dnsbl_health_skip: Vec::new(),
            pipelining_enable: false,
            pipelining_action: Action::Enforce,
            pipelining_ttl: Duration::from_secs(30 * DAY),
            non_smtp_command_enable: false,
            non_smtp_command_action: Action::Drop,
            non_smtp_command_ttl: Duration::from_secs(30 * DAY),
            bare_newline_enable: false,
            bare_newline_action: Action::Ignore,
            bare_newline_ttl: Duration::from_secs(30 * DAY),
            deep_test_handoff: Handoff::Replay,
            forbidden_commands: vec!["CONNECT".into(), "GET".into(), "POST".into()],
            pre_queue_limit: 100,
            post_queue_limit: 100,
            client_connection_count_limit: 50,
            command_count_limit: 20,
            command_time_limit: Duration::from_secs(300),
            line_length_limit: 2048,
            stress_greet_wait: Duration::from_secs(2),
            stress_command_time_limit: Duration::from_secs(10),
            cache_retention_time: Duration::from_secs(7 * DAY),
            cache_cleanup_interval: Duration::from_secs(12 * 3600),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Dns {
    /// Empty: the system's resolver configuration.
    pub nameservers: Vec<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Xdp {
    pub interfaces: Vec<String>,
    pub mode: XdpMode,
    pub ports: Ports,
    pub pin_path: PathBuf,
    /// Kernel-side log level; above `warn` the drop path logs every drop.
    pub log_level: BpfLogLevel,
    /// Size of each exact-host map (`block_v4`, `block_v6`).
    pub max_hosts: u32,
    /// Size of each CIDR trie (`block_v4_cidr`, `block_v6_cidr`).
    pub max_prefixes: u32,
    /// Size of each allow trie.
    pub max_allows: u32,
}

impl Default for Xdp {
    fn default() -> Self {
        Xdp {
            interfaces: vec!["eth0".into()],
            mode: XdpMode::Auto,
            ports: Ports::List(vec![25, 465, 587]),
            pin_path: "/sys/fs/bpf/screener".into(),
            log_level: BpfLogLevel::Warn,
            max_hosts: 1 << 20,
            max_prefixes: 1 << 17,
            max_allows: 1 << 14,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Verdict {
    pub block_on: Vec<BlockOn>,
    #[serde(with = "dur")]
    pub block_ttl: Duration,
    /// Repeat offenders' TTL doubles up to this.
    #[serde(with = "dur")]
    pub block_ttl_max: Duration,
    /// IPv6 verdicts cover this prefix: privacy addresses rotate inside it.
    pub ipv6_prefix: u8,
    /// Blocked hosts in one IPv4 /24 that block the /24 instead (0: never).
    pub escalate_v4_hosts: u32,
    /// Blocked prefixes in one IPv6 /48 that block the /48 instead (0: never).
    pub escalate_v6_hosts: u32,
}

impl Default for Verdict {
    fn default() -> Self {
        Verdict {
            block_on: vec![
                BlockOn::Test(TestId::Pregreet),
                BlockOn::Test(TestId::Dnsbl),
                BlockOn::Test(TestId::NonSmtpCommand),
                BlockOn::Denylist,
            ],
            block_ttl: Duration::from_secs(3600),
            block_ttl_max: Duration::from_secs(DAY),
            ipv6_prefix: 64,
            escalate_v4_hosts: 8,
            escalate_v6_hosts: 8,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Store {
    pub path: PathBuf,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            path: "/var/lib/screener/screener.redb".into(),
        }
    }
}

/// Shared block lists the daemon imports at start and re-imports when
/// their file changes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Import {
    pub lists: Vec<ImportList>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportList {
    /// The list file, as `screener import` reads it.
    pub file: PathBuf,
    /// `drop` (Spamhaus DROP style) or `cidr`.
    #[serde(default = "default_import_format")]
    pub format: String,
    /// The list's name; re-importing replaces it. Default: the file name.
    #[serde(default)]
    pub name: Option<String>,
    /// How often the file is checked for changes.
    #[serde(default = "default_import_interval", with = "dur")]
    pub interval: Duration,
}

fn default_import_format() -> String {
    "drop".into()
}

fn default_import_interval() -> Duration {
    Duration::from_secs(3600)
}

impl ImportList {
    /// The list name used in the store.
    pub fn list_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.file
                .file_name()
                .map_or_else(|| "import".into(), |n| n.to_string_lossy().into_owned())
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admin {
    pub socket: PathBuf,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            socket: "/run/screener/admin.sock".into(),
        }
    }
}

/// `[daemon]`: whom the daemon runs as once its privileged start is done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Daemon {
    /// The account the daemon switches to after binding and attaching, so
    /// SMTP from the internet is never parsed as root; `root` keeps root.
    pub user: String,
    /// The group that owns the admin socket (mode 0660): its members may
    /// run the admin commands.
    pub admin_group: String,
}

impl Default for Daemon {
    fn default() -> Self {
        Daemon {
            // The account the Debian package creates.
            user: "screener".into(),
            // Only root reaches the admin socket until an operator names
            // a group.
            admin_group: "root".into(),
        }
    }
}

impl Daemon {
    /// Both names must be account names; whether the accounts exist is
    /// checked where they are used (`config check`, `run`).
    fn check(&self) -> Result<(), ConfigError> {
        for (key, name) in [
            ("daemon.user", &self.user),
            ("daemon.admin_group", &self.admin_group),
        ] {
            let fine = !name.is_empty()
                && !name.starts_with('-')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'));
            if !fine {
                return Err(ConfigError::value(
                    key,
                    format!("{name:?}"),
                    "not an account name",
                ));
            }
        }
        Ok(())
    }
}

/// The Prometheus endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Metrics {
    /// Where `GET /metrics` is answered; empty (the default) serves
    /// nothing, since the figures say what the screener sees and whom it
    /// blocks.
    pub listen: Vec<SocketAddr>,
}

impl Config {
    /// Reads, parses and checks `path`. Relative paths in it are taken
    /// relative to the file's own directory, not to wherever the command
    /// happens to run: the daemon and every admin command then agree on
    /// the store, the admin socket, the pins and the import lists.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Config::from_toml(&text)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let dir = std::path::absolute(dir).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        cfg.resolve_paths(&dir);
        Ok(cfg)
    }

    /// Makes every relative path absolute under `dir`.
    fn resolve_paths(&mut self, dir: &Path) {
        let paths = [
            &mut self.store.path,
            &mut self.admin.socket,
            &mut self.xdp.pin_path,
        ];
        for p in paths
            .into_iter()
            .chain(self.import.lists.iter_mut().map(|l| &mut l.file))
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }

    /// Parses and checks a configuration. Each key is checked on its own
    /// first so an error names the key, not a line of a merged document.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let file: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax(e.to_string()))?;
        let defaults = Config::default().to_table();
        for (section, body) in &file {
            let Some(default_section) = defaults.get(section).and_then(toml::Value::as_table)
            else {
                return Err(ConfigError::UnknownKey {
                    key: section.clone(),
                });
            };
            let Some(body) = body.as_table() else {
                return Err(ConfigError::value(section, body, "expected a [section]"));
            };
            for (key, value) in body {
                let name = format!("{section}.{key}");
                if !default_section.contains_key(key) {
                    return Err(ConfigError::UnknownKey { key: name });
                }
                let mut probe = defaults.clone();
                probe[section]
                    .as_table_mut()
                    .expect("sections are tables")
                    .insert(key.clone(), value.clone());
                if let Err(e) = Config::deserialize(toml::Value::Table(probe)) {
                    return Err(ConfigError::value(&name, value, e.message()));
                }
            }
        }
        let cfg = Config::deserialize(toml::Value::Table(file))
            .map_err(|e| ConfigError::Syntax(e.message().to_owned()))?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Range and consistency checks serde cannot express.
    fn check(&self) -> Result<(), ConfigError> {
        self.cluster
            .check()
            .map_err(|(key, value, reason)| ConfigError::value(key, value, reason))?;
        self.daemon.check()?;
        let s = &self.screen;
        if self.smtp.listen.is_empty() {
            return Err(ConfigError::value(
                "smtp.listen",
                "[]",
                "nothing to listen on",
            ));
        }
        if let Some(l) = self
            .metrics
            .listen
            .iter()
            .find(|l| self.smtp.listen.contains(l))
        {
            return Err(ConfigError::value(
                "metrics.listen",
                l,
                "is also in smtp.listen",
            ));
        }
        if self.smtp.hostname.is_empty() || self.smtp.hostname.contains(char::is_whitespace) {
            return Err(ConfigError::value(
                "smtp.hostname",
                format!("{:?}", self.smtp.hostname),
                "must be a host name",
            ));
        }
        if self.smtp.upstream_proxy_protocol == Upstream::Haproxy
            && self.smtp.upstream_proxy_trusted.is_empty()
        {
            return Err(ConfigError::value(
                "smtp.upstream_proxy_trusted",
                "[]",
                "list the load balancers' addresses (CIDRs) when upstream_proxy_protocol = \"haproxy\": \
                 a PROXY header from anyone else is refused",
            ));
        }
        for (key, wait) in [
            ("screen.greet_wait", s.greet_wait),
            ("screen.stress_greet_wait", s.stress_greet_wait),
        ] {
            if wait.is_zero() && !self.smtp.greet_banner.is_empty() {
                return Err(ConfigError::value(
                    key,
                    "0s",
                    "must be positive while greet_banner is set (greet_banner = \"\" turns the test off)",
                ));
            }
            if wait > GREET_WAIT_MAX {
                return Err(ConfigError::value(
                    key,
                    crate::duration::Display(wait),
                    "must be at most 1m: clients give up on a greeting after 5 minutes (RFC 5321), \
                     and every waiting client holds a screening slot",
                ));
            }
        }
        for (key, v) in [
            ("screen.pre_queue_limit", s.pre_queue_limit),
            ("screen.post_queue_limit", s.post_queue_limit),
            (
                "screen.client_connection_count_limit",
                s.client_connection_count_limit,
            ),
            ("screen.line_length_limit", s.line_length_limit),
        ] {
            if v == 0 {
                return Err(ConfigError::value(key, 0, "must be at least 1"));
            }
        }
        if s.line_length_limit < 512 {
            return Err(ConfigError::value(
                "screen.line_length_limit",
                s.line_length_limit,
                "must be at least 512 (RFC 5321's command line)",
            ));
        }
        if s.command_count_limit == 0 {
            return Err(ConfigError::value(
                "screen.command_count_limit",
                0,
                "must be at least 1",
            ));
        }
        if s.dnsbl_min_ttl > s.dnsbl_max_ttl {
            return Err(ConfigError::value(
                "screen.dnsbl_min_ttl",
                crate::duration::Display(s.dnsbl_min_ttl),
                "is above screen.dnsbl_max_ttl",
            ));
        }
        let mut domains = Vec::new();
        for site in &s.dnsbl_sites {
            match site.parse::<crate::dnsbl::SiteSpec>() {
                Ok(spec) => domains.push(spec.domain),
                Err(e) => {
                    return Err(ConfigError::value(
                        "screen.dnsbl_sites",
                        format!("{site:?}"),
                        e.reason,
                    ))
                }
            }
        }
        for (i, name) in s.dnsbl_health_skip.iter().enumerate() {
            let lower = name.trim_end_matches('.').to_ascii_lowercase();
            let known = domains.contains(&lower)
                || s.dnsbl_reply_map
                    .values()
                    .any(|public| public.eq_ignore_ascii_case(name));
            if !known {
                // The value is not echoed: it may be a mistyped secret
                // query domain.
                return Err(ConfigError::value(
                    "screen.dnsbl_health_skip",
                    format!("entry {}", i + 1),
                    "names no screen.dnsbl_sites domain and no dnsbl_reply_map public name",
                ));
            }
        }
        if s.dnsbl_allowlist_threshold > 0 {
            return Err(ConfigError::value(
                "screen.dnsbl_allowlist_threshold",
                s.dnsbl_allowlist_threshold,
                "must be 0 (off) or negative",
            ));
        }
        for c in &s.forbidden_commands {
            if c.is_empty() || c.contains(char::is_whitespace) {
                return Err(ConfigError::value(
                    "screen.forbidden_commands",
                    format!("{c:?}"),
                    "each entry is one word",
                ));
            }
        }
        if self.verdict.ipv6_prefix > 128 {
            return Err(ConfigError::value(
                "verdict.ipv6_prefix",
                self.verdict.ipv6_prefix,
                "must be 0..=128",
            ));
        }
        if self.verdict.block_ttl.is_zero() || self.verdict.block_ttl_max < self.verdict.block_ttl {
            return Err(ConfigError::value(
                "verdict.block_ttl_max",
                crate::duration::Display(self.verdict.block_ttl_max),
                "must be at least verdict.block_ttl, which must be positive",
            ));
        }
        for (key, v) in [
            ("xdp.max_hosts", self.xdp.max_hosts),
            ("xdp.max_prefixes", self.xdp.max_prefixes),
            ("xdp.max_allows", self.xdp.max_allows),
        ] {
            if v == 0 {
                return Err(ConfigError::value(key, 0, "must be at least 1"));
            }
        }
        for l in &self.import.lists {
            if l.format != "drop" && l.format != "cidr" {
                return Err(ConfigError::value(
                    "import.lists",
                    format!("format = {:?}", l.format),
                    "format is drop or cidr",
                ));
            }
            if l.interval.is_zero() {
                return Err(ConfigError::value(
                    "import.lists",
                    "interval = 0s",
                    "must be positive",
                ));
            }
        }
        for i in &self.xdp.interfaces {
            if i.is_empty() || i.len() > 15 || i.contains(['/', ' ']) {
                return Err(ConfigError::value(
                    "xdp.interfaces",
                    format!("{i:?}"),
                    "not an interface name",
                ));
            }
        }
        if let Err((key, value, reason)) = self.log.check() {
            return Err(ConfigError::value(key, format!("{value:?}"), reason));
        }
        self.check_rejects_nobody()
    }

    /// Values that parse but would turn every client away, tie the daemon
    /// in a loop, or block far more than one client at the NIC: each is
    /// refused, naming the key and why.
    fn check_rejects_nobody(&self) -> Result<(), ConfigError> {
        let (smtp, s) = (&self.smtp, &self.screen);
        if s.dnsbl_threshold < 1 {
            return Err(ConfigError::value(
                "screen.dnsbl_threshold",
                s.dnsbl_threshold,
                "must be at least 1 (as postscreen's): every client scores at least 0, \
                 so a lower threshold rejects (and blocks) everyone",
            ));
        }
        for (key, d, why) in [
            (
                "screen.command_time_limit",
                s.command_time_limit,
                "every command would time out",
            ),
            (
                "screen.stress_command_time_limit",
                s.stress_command_time_limit,
                "every command would time out under stress",
            ),
            (
                "smtp.backend_timeout",
                smtp.backend_timeout,
                "no hand-off to the backend could succeed",
            ),
            (
                "smtp.upstream_proxy_timeout",
                smtp.upstream_proxy_timeout,
                "no PROXY header could arrive in time",
            ),
            (
                "screen.dnsbl_timeout",
                s.dnsbl_timeout,
                "no DNSBL answer could arrive in time",
            ),
            (
                "screen.cache_cleanup_interval",
                s.cache_cleanup_interval,
                "the cleanup would run without pause",
            ),
            (
                "screen.dnsbl_health_interval",
                s.dnsbl_health_interval,
                "the checks would run without pause; list a site in \
                 screen.dnsbl_health_skip to leave it unchecked",
            ),
        ] {
            if d.is_zero() {
                return Err(ConfigError::value(
                    key,
                    "0s",
                    format!("must be positive: {why}"),
                ));
            }
        }
        if smtp.greet_banner.contains(|c: char| c.is_control()) {
            return Err(ConfigError::value(
                "smtp.greet_banner",
                format!("{:?}", smtp.greet_banner),
                "must be one line of text: a control character would break the greeting",
            ));
        }
        if smtp.hostname.contains(|c: char| c.is_control()) {
            return Err(ConfigError::value(
                "smtp.hostname",
                format!("{:?}", smtp.hostname),
                "must be a host name",
            ));
        }
        if let Some(l) = smtp.listen.iter().find(|l| loops_back(**l, smtp.backend)) {
            return Err(ConfigError::value(
                "smtp.backend",
                smtp.backend,
                format!(
                    "is smtp.listen {l} itself: every hand-off would connect back to the screener"
                ),
            ));
        }
        for c in &s.forbidden_commands {
            if SMTP_VERBS.iter().any(|v| c.eq_ignore_ascii_case(v)) {
                return Err(ConfigError::value(
                    "screen.forbidden_commands",
                    format!("{c:?}"),
                    "is an SMTP command every mail client sends",
                ));
            }
        }
        if self.verdict.ipv6_prefix < 32 {
            return Err(ConfigError::value(
                "verdict.ipv6_prefix",
                self.verdict.ipv6_prefix,
                "must be 32..=128: one bot's verdict would block a whole provider's \
                 (at 0, every) IPv6 client",
            ));
        }
        Ok(())
    }

    /// Values that work but are probably not what the operator meant.
    /// `config check` prints them; the daemon logs them at start and on
    /// reload.
    pub fn warnings(&self) -> Vec<ConfigWarning> {
        let mut out = Vec::new();
        let mut warn = |key: &str, message: String| {
            out.push(ConfigWarning {
                key: key.to_owned(),
                message,
            });
        };
        for rule in &self.screen.access_list {
            if rule.net.prefix_len() == 0 {
                let what = match rule.action {
                    AccessAction::Permit => "permits every client: nobody after it is screened",
                    AccessAction::Reject => {
                        "rejects every client the rules before it do not permit \
                         (and blocks them when denylist is in verdict.block_on)"
                    }
                };
                warn("screen.access_list", format!("\"{rule}\" {what}"));
            }
        }
        if self.smtp.upstream_proxy_protocol == Upstream::None
            && !self.smtp.upstream_proxy_trusted.is_empty()
        {
            warn(
                "smtp.upstream_proxy_trusted",
                "is ignored: smtp.upstream_proxy_protocol is \"none\"".to_owned(),
            );
        }
        for t in TestId::ALL {
            let set = t.settings(self);
            let Some(key) = t.keys().ttl else { continue };
            if set.enable && set.ttl.is_zero() {
                warn(
                    key,
                    "is 0s: a pass is never remembered, every connection is screened again"
                        .to_owned(),
                );
            }
        }
        out
    }

    /// Logs [`Config::warnings`] at WARN.
    pub fn log_warnings(&self) {
        for w in self.warnings() {
            tracing::warn!(key = %w.key, "configuration: {w}");
        }
    }

    /// The `220-` teaser with `$hostname` expanded; empty = pregreet off.
    pub fn greet_banner(&self) -> String {
        self.smtp
            .greet_banner
            .replace("$hostname", &self.smtp.hostname)
    }

    fn to_table(&self) -> toml::Table {
        toml::Table::try_from(self).expect("a config always serializes")
    }

    /// Every `section.key` with its value as TOML text, in file order.
    pub fn entries(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (section, body) in self.to_table() {
            if let toml::Value::Table(body) = body {
                for (key, value) in body {
                    out.push((format!("{section}.{key}"), show_value(&value)));
                }
            }
        }
        out
    }
}

/// A value as `config show` prints it: strings bare, as postconf does.
fn show_value(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Which lines `config show` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Show {
    Effective,
    NonDefault,
    Defaults,
}

/// The `name = value` lines of `config show`. Unknown names are an error.
pub fn show(cfg: &Config, which: Show, names: &[String]) -> Result<Vec<String>, ConfigError> {
    let defaults = Config::default().entries();
    let current = cfg.entries();
    for n in names {
        if !defaults.iter().any(|(k, _)| k == n) {
            return Err(ConfigError::UnknownKey { key: n.clone() });
        }
    }
    let mut lines = Vec::new();
    for ((key, value), (_, default)) in current.iter().zip(&defaults) {
        if !names.is_empty() && !names.contains(key) {
            continue;
        }
        let shown = match which {
            Show::NonDefault if value == default => continue,
            Show::Effective | Show::NonDefault => value,
            Show::Defaults => default,
        };
        lines.push(format!("{key} = {shown}"));
    }
    Ok(lines)
}

/// Applies `NAME=VALUE` assignments to the file's text, keeping comments
/// and layout, and returns the new text. Nothing is written when any
/// assignment or the resulting configuration is bad.
pub fn set(text: &str, assignments: &[String]) -> Result<String, ConfigError> {
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| ConfigError::Syntax(e.to_string()))?;
    let defaults = Config::default().to_table();
    for a in assignments {
        let Some((name, value)) = a.split_once('=') else {
            return Err(ConfigError::Syntax(format!(
                "{a:?}: expected NAME=VALUE, e.g. screen.greet_wait=6s"
            )));
        };
        let name = name.trim();
        let value = value.trim();
        let Some((section, key)) = name.split_once('.') else {
            return Err(ConfigError::UnknownKey {
                key: name.to_owned(),
            });
        };
        let Some(default) = defaults.get(section).and_then(|s| s.get(key)) else {
            return Err(ConfigError::UnknownKey {
                key: name.to_owned(),
            });
        };
        let item = edit_value(value, default);
        if !doc.contains_key(section) {
            doc[section] = toml_edit::table();
        }
        // The file may hold anything under the section's name (`screen =
        // "x"`): that is an error naming it, not a panic.
        let Some(table) = doc
            .get_mut(section)
            .and_then(toml_edit::Item::as_table_like_mut)
        else {
            let found = doc
                .get(section)
                .map(|i| i.to_string().trim().to_owned())
                .unwrap_or_default();
            return Err(ConfigError::value(section, found, "expected a [section]"));
        };
        // Replacing the value in place keeps the comments above its key.
        if let Some(slot) = table.get_mut(key) {
            *slot = toml_edit::value(item);
        } else {
            table.insert(key, toml_edit::value(item));
        }
    }
    let new_text = doc.to_string();
    Config::from_toml(&new_text)?;
    Ok(new_text)
}

/// Turns command-line text into a TOML value of the key's kind: a string
/// key takes the text as it is; others parse it as TOML (`[25, 587]`,
/// `true`, `100`), and a bare word in a list key becomes a one-item list.
fn edit_value(text: &str, default: &toml::Value) -> toml_edit::Value {
    if default.is_str() {
        return text.into();
    }
    if let Ok(v) = text.parse::<toml_edit::Value>() {
        if default.is_array() && !v.is_array() {
            let mut arr = toml_edit::Array::new();
            arr.push(v);
            return arr.into();
        }
        return v;
    }
    if default.is_array() {
        // `25,587` and `a.example,b.example`: each item as TOML when it
        // parses (a number stays a number), else as text.
        let mut arr = toml_edit::Array::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.parse::<toml_edit::Value>() {
                Ok(v) if !v.is_array() && !v.is_inline_table() => arr.push(v),
                _ => arr.push(part),
            }
        }
        return arr.into();
    }
    text.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_postscreens() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.screen.greet_wait, Duration::from_secs(6));
        assert_eq!(c.screen.greet_action, Action::Enforce);
        assert_eq!(c.screen.command_count_limit, 20);
        assert_eq!(c.screen.pre_queue_limit, 100);
        assert_eq!(c.xdp.ports, Ports::List(vec![25, 465, 587]));
        assert_eq!(c.verdict.ipv6_prefix, 64);
    }

    #[test]
    fn spec_example_parses() {
        let c = Config::from_toml(
            r#"
[smtp]
listen = ["0.0.0.0:25", "[::]:25"]
hostname = "mx.example.com"
greet_banner = "$hostname ESMTP"
backend = "127.0.0.1:10025"
backend_proxy_protocol = "v2"
upstream_proxy_protocol = "none"
[screen]
access_list = ["permit 192.0.2.0/24", "reject 198.51.100.0/24"]
greet_wait = "6s"
dnsbl_sites = ["zen.example=127.0.0.[2..11]*3", "wl.example=127.0.[0..255].[1..3]*-2"]
deep_test_handoff = "replay"
[xdp]
ports = ["all"]
"#,
        )
        .unwrap();
        assert_eq!(c.greet_banner(), "mx.example.com ESMTP");
        assert_eq!(c.screen.access_list[1].action, AccessAction::Reject);
        assert_eq!(c.xdp.ports, Ports::All);
    }

    #[test]
    fn errors_name_the_key_and_value() {
        let cases = [
            ("[screen]\ngreet_wait = \"6x\"", "screen.greet_wait", "6x"),
            ("[screen]\ngret_wait = \"6s\"", "screen.gret_wait", ""),
            ("[nope]\na = 1", "nope", ""),
            (
                "[screen]\ngreet_action = \"maybe\"",
                "screen.greet_action",
                "maybe",
            ),
            (
                "[screen]\naccess_list = [\"permit 192.0.2.0/33\"]",
                "screen.access_list",
                "192.0.2.0/33",
            ),
            ("[xdp]\nports = [0]", "xdp.ports", "0"),
            ("[xdp]\nports = [\"all\", 25]", "xdp.ports", "all"),
            ("[verdict]\nipv6_prefix = 129", "verdict.ipv6_prefix", "129"),
            ("[smtp]\nbackend = \"nowhere\"", "smtp.backend", "nowhere"),
            (
                "[verdict]\nblock_on = [\"pregreet\", \"greylist\"]",
                "verdict.block_on",
                "greylist",
            ),
        ];
        for (text, key, value) in cases {
            let msg = Config::from_toml(text).unwrap_err().to_string();
            assert!(msg.contains(key), "{text:?}: {msg}");
            assert!(msg.contains(value), "{text:?}: {msg}");
        }
    }

    #[test]
    fn block_on_names_every_test_and_denylist() {
        let names: Vec<String> = TestId::ALL.iter().map(|t| format!("\"{t}\"")).collect();
        let text = names.join(", ");
        let c =
            Config::from_toml(&format!("[verdict]\nblock_on = [{text}, \"denylist\"]")).unwrap();
        let mut want: Vec<BlockOn> = TestId::ALL.into_iter().map(BlockOn::Test).collect();
        want.push(BlockOn::Denylist);
        assert_eq!(c.verdict.block_on, want);
        // The default is written back as the names it was read from.
        let shown = toml::to_string(&Config::default().verdict).unwrap();
        assert!(
            shown.contains(r#"block_on = ["pregreet", "dnsbl", "non_smtp_command", "denylist"]"#),
            "{shown}"
        );
        assert_eq!(
            BlockOn::Denylist.reason(),
            screener_common::Reason::Denylist
        );
        for t in TestId::ALL {
            assert_eq!(BlockOn::from(t).reason(), t.reason());
        }
    }

    /// One case per key whose value would reject everyone, loop, or block
    /// far more than a client: each is refused naming the key.
    #[test]
    fn values_that_reject_everyone_are_refused_naming_the_key() {
        let cases = [
            ("[screen]\ndnsbl_threshold = 0", "screen.dnsbl_threshold"),
            ("[screen]\ndnsbl_threshold = -3", "screen.dnsbl_threshold"),
            ("[screen]\npre_queue_limit = 0", "screen.pre_queue_limit"),
            ("[screen]\npost_queue_limit = 0", "screen.post_queue_limit"),
            (
                "[screen]\nclient_connection_count_limit = 0",
                "screen.client_connection_count_limit",
            ),
            (
                "[screen]\ncommand_count_limit = 0",
                "screen.command_count_limit",
            ),
            (
                "[screen]\ncommand_time_limit = \"0s\"",
                "screen.command_time_limit",
            ),
            (
                "[screen]\nstress_command_time_limit = \"0s\"",
                "screen.stress_command_time_limit",
            ),
            ("[screen]\ngreet_wait = \"0s\"", "screen.greet_wait"),
            (
                "[screen]\nstress_greet_wait = \"0s\"",
                "screen.stress_greet_wait",
            ),
            (
                "[screen]\nline_length_limit = 100",
                "screen.line_length_limit",
            ),
            ("[screen]\ndnsbl_timeout = \"0s\"", "screen.dnsbl_timeout"),
            (
                "[screen]\ndnsbl_health_interval = \"0s\"",
                "screen.dnsbl_health_interval",
            ),
            (
                "[screen]\ndnsbl_sites = [\"bl.example\"]\ndnsbl_health_skip = [\"bl.exmaple\"]",
                "screen.dnsbl_health_skip",
            ),
            (
                "[screen]\ncache_cleanup_interval = \"0s\"",
                "screen.cache_cleanup_interval",
            ),
            (
                "[screen]\nforbidden_commands = [\"CONNECT\", \"ehlo\"]",
                "screen.forbidden_commands",
            ),
            ("[smtp]\nhostname = \"\"", "smtp.hostname"),
            ("[smtp]\nhostname = \"mx\\u0000\"", "smtp.hostname"),
            ("[smtp]\nlisten = []", "smtp.listen"),
            (
                "[smtp]\nlisten = [\"127.0.0.1:2525\"]\n[metrics]\nlisten = [\"127.0.0.1:2525\"]",
                "metrics.listen",
            ),
            ("[metrics]\nlisten = [\"localhost:9325\"]", "metrics.listen"),
            (
                "[smtp]\ngreet_banner = \"hi\\r\\n250 ok\"",
                "smtp.greet_banner",
            ),
            ("[smtp]\nbackend_timeout = \"0s\"", "smtp.backend_timeout"),
            (
                "[smtp]\nupstream_proxy_timeout = \"0s\"",
                "smtp.upstream_proxy_timeout",
            ),
            (
                "[smtp]\nlisten = [\"0.0.0.0:25\"]\nbackend = \"127.0.0.1:25\"",
                "smtp.backend",
            ),
            (
                "[smtp]\nlisten = [\"[::]:2525\"]\nbackend = \"[::1]:2525\"",
                "smtp.backend",
            ),
            (
                "[smtp]\nlisten = [\"192.0.2.1:25\"]\nbackend = \"192.0.2.1:25\"",
                "smtp.backend",
            ),
            ("[verdict]\nipv6_prefix = 0", "verdict.ipv6_prefix"),
            ("[verdict]\nipv6_prefix = 31", "verdict.ipv6_prefix"),
            ("[verdict]\nblock_ttl = \"0s\"", "verdict.block_ttl_max"),
            ("[xdp]\nmax_hosts = 0", "xdp.max_hosts"),
            (
                "[screen]\naccess_list = [\"reject 192.0.2.7/8\"]",
                "screen.access_list",
            ),
        ];
        for (text, key) in cases {
            let msg = Config::from_toml(text).unwrap_err().to_string();
            assert!(msg.contains(key), "{text:?}: {msg}");
        }
        // Neighbours of the refused values are fine.
        for text in [
            "[screen]\ndnsbl_threshold = 1",
            "[smtp]\nlisten = [\"0.0.0.0:25\"]\nbackend = \"127.0.0.1:10025\"",
            "[smtp]\nlisten = [\"0.0.0.0:25\"]\nbackend = \"[::1]:25\"",
            "[smtp]\nlisten = [\"0.0.0.0:25\"]\nbackend = \"198.51.100.25:25\"",
            "[smtp]\ngreet_banner = \"\"\n[screen]\ngreet_wait = \"0s\"",
            "[verdict]\nipv6_prefix = 32",
            "[screen]\ndnsbl_sites = [\"BL.example=127.0.0.2\", \"k3y.feed.example\"]\n\
             dnsbl_reply_map = { \"k3y.feed.example\" = \"feed.example\" }\n\
             dnsbl_health_skip = [\"bl.example.\", \"feed.example\"]",
            "[screen]\nforbidden_commands = []",
        ] {
            assert!(Config::from_toml(text).is_ok(), "{text}");
        }
    }

    #[test]
    fn suspicious_values_are_warnings_naming_the_key() {
        let c = Config::from_toml(
            "[smtp]\nupstream_proxy_trusted = [\"127.0.0.1\"]\n\
             [screen]\naccess_list = [\"permit 192.0.2.0/24\", \"reject 0.0.0.0/0\"]\n\
             greet_ttl = \"0s\"\n",
        )
        .unwrap();
        let w: Vec<String> = c.warnings().iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].starts_with("screen.access_list: \"reject 0.0.0.0/0\" rejects every client"));
        assert!(w[1].starts_with("smtp.upstream_proxy_trusted: is ignored"));
        assert!(w[2].starts_with("screen.greet_ttl: is 0s"));
        assert!(Config::default().warnings().is_empty());
    }

    #[test]
    fn haproxy_mode_needs_trusted_proxies() {
        let e = Config::from_toml("[smtp]\nupstream_proxy_protocol = \"haproxy\"").unwrap_err();
        assert!(e.to_string().contains("smtp.upstream_proxy_trusted"), "{e}");
        let c = Config::from_toml(
            "[smtp]\nupstream_proxy_protocol = \"haproxy\"\n\
             upstream_proxy_trusted = [\"192.0.2.0/28\", \"2001:db8::7\"]",
        )
        .unwrap();
        assert_eq!(
            c.smtp.upstream_proxy_trusted,
            vec![
                "192.0.2.0/28".parse::<IpNet>().unwrap(),
                "2001:db8::7/128".parse().unwrap()
            ]
        );
        let shown = show(&c, Show::Effective, &["smtp.upstream_proxy_trusted".into()]).unwrap();
        assert_eq!(
            shown,
            ["smtp.upstream_proxy_trusted = [\"192.0.2.0/28\", \"2001:db8::7/128\"]"]
        );
    }

    #[test]
    fn cidrs_with_host_bits_are_refused_naming_the_key() {
        for (text, key) in [
            (
                "[screen]\naccess_list = [\"permit 192.0.2.1/24\"]",
                "screen.access_list",
            ),
            (
                "[smtp]\nupstream_proxy_trusted = [\"2001:db8::1/64\"]",
                "smtp.upstream_proxy_trusted",
            ),
        ] {
            let msg = Config::from_toml(text).unwrap_err().to_string();
            assert!(msg.contains(key), "{msg}");
            assert!(msg.contains("host bits"), "{msg}");
        }
        assert_eq!(
            parse_cidr("192.0.2.1/24").unwrap_err(),
            "\"192.0.2.1/24\" has host bits set: write 192.0.2.0/24 for the network \
             or 192.0.2.1 for the host"
        );
        assert_eq!(parse_cidr("192.0.2.1").unwrap().to_string(), "192.0.2.1/32");
        // Third-party lists keep the lenient reading.
        assert_eq!(
            parse_net("192.0.2.1/24").unwrap().to_string(),
            "192.0.2.0/24"
        );
    }

    #[test]
    fn show_lists_effective_nondefault_and_defaults() {
        let c = Config::from_toml("[screen]\ngreet_wait = \"2s\"").unwrap();
        let nd = show(&c, Show::NonDefault, &[]).unwrap();
        assert_eq!(nd, vec!["screen.greet_wait = 2s"]);
        let one = show(&c, Show::Effective, &["screen.greet_wait".into()]).unwrap();
        assert_eq!(one, vec!["screen.greet_wait = 2s"]);
        let d = show(&c, Show::Defaults, &["screen.greet_wait".into()]).unwrap();
        assert_eq!(d, vec!["screen.greet_wait = 6s"]);
        assert!(show(&c, Show::Effective, &["screen.nope".into()]).is_err());
        let all = show(&c, Show::Effective, &[]).unwrap();
        assert!(all.contains(&"xdp.ports = [25, 465, 587]".to_owned()));
    }

    #[test]
    fn set_keeps_comments_and_validates() {
        let text = "# top comment\n[screen]\n# why six\ngreet_wait = \"6s\" # inline\n";
        let out = set(
            text,
            &[
                "screen.greet_wait=3s".into(),
                "xdp.ports=all".into(),
                "screen.pre_queue_limit=50".into(),
            ],
        )
        .unwrap();
        assert!(out.contains("# top comment"));
        assert!(out.contains("# why six"));
        let c = Config::from_toml(&out).unwrap();
        assert_eq!(c.screen.greet_wait, Duration::from_secs(3));
        assert_eq!(c.xdp.ports, Ports::All);
        assert_eq!(c.screen.pre_queue_limit, 50);
        let e = set(text, &["screen.greet_wait=soon".into()]).unwrap_err();
        assert!(e.to_string().contains("screen.greet_wait"), "{e}");
        assert!(set(text, &["screen.nope=1".into()]).is_err());
    }

    #[test]
    fn set_takes_comma_separated_lists_of_numbers_and_words() {
        let out = set("", &["xdp.ports=25,587".into()]).unwrap();
        let c = Config::from_toml(&out).unwrap();
        assert_eq!(c.xdp.ports, Ports::List(vec![25, 587]));
        let out = set(
            "",
            &["xdp.interfaces=eth0, eth1".into(), "xdp.ports=25".into()],
        )
        .unwrap();
        let c = Config::from_toml(&out).unwrap();
        assert_eq!(c.xdp.interfaces, vec!["eth0", "eth1"]);
        assert_eq!(c.xdp.ports, Ports::List(vec![25]));
        let e = set("", &["xdp.ports=25,0".into()]).unwrap_err();
        assert!(e.to_string().contains("xdp.ports"), "{e}");
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        std::fs::write(
            &file,
            "[store]\npath = \"var/s.redb\"\n[admin]\nsocket = \"./a.sock\"\n\
             [xdp]\npin_path = \"/sys/fs/bpf/x\"\n\
             [import]\nlists = [{ file = \"../drop.txt\" }]\n",
        )
        .unwrap();
        let c = Config::load(&file).unwrap();
        assert_eq!(c.store.path, dir.path().join("var/s.redb"));
        assert_eq!(c.admin.socket, dir.path().join("./a.sock"));
        assert_eq!(c.xdp.pin_path, Path::new("/sys/fs/bpf/x"));
        assert_eq!(c.import.lists[0].file, dir.path().join("../drop.txt"));
    }

    #[test]
    fn set_on_a_section_that_is_no_table_is_an_error() {
        for text in ["screen = \"x\"\n", "screen = 5\n", "screen = [1]\n"] {
            let e = set(text, &["screen.greet_wait=2s".into()]).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("bad value for screen = "), "{text:?}: {msg}");
            assert!(msg.contains("expected a [section]"), "{text:?}: {msg}");
        }
        // An inline table is a section.
        let out = set(
            "screen = { greet_wait = \"6s\" }\n",
            &["screen.greet_wait=2s".into()],
        )
        .unwrap();
        let c = Config::from_toml(&out).unwrap();
        assert_eq!(c.screen.greet_wait, Duration::from_secs(2));
    }

    #[test]
    fn durations_are_bounded_naming_the_key_and_the_bound() {
        for (text, key, bound) in [
            (
                "[screen]\ngreet_wait = \"18446744073709551615s\"",
                "screen.greet_wait",
                "at most 3650d",
            ),
            (
                "[verdict]\nblock_ttl = \"99999999999999999999d\"",
                "verdict.block_ttl",
                "at most 3650d",
            ),
            (
                "[screen]\ngreet_wait = \"61s\"",
                "screen.greet_wait",
                "at most 1m",
            ),
            (
                "[screen]\nstress_greet_wait = \"3650d\"",
                "screen.stress_greet_wait",
                "at most 1m",
            ),
            (
                "[screen]\ncache_retention_time = \"3651d\"",
                "screen.cache_retention_time",
                "at most 3650d",
            ),
        ] {
            let msg = Config::from_toml(text).unwrap_err().to_string();
            assert!(msg.contains(key), "{text}: {msg}");
            assert!(msg.contains(bound), "{text}: {msg}");
        }
        let e = set("", &["screen.greet_wait=18446744073709551615s".into()]).unwrap_err();
        assert!(e.to_string().contains("at most 3650d"), "{e}");
        assert!(Config::from_toml("[screen]\ngreet_wait = \"1m\"").is_ok());
        assert!(Config::from_toml("[verdict]\nblock_ttl_max = \"3650d\"").is_ok());
    }
}
