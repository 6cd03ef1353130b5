//! What every configuration key means: one table keyed by `section.key`.
//!
//! `screener config show --describe` prints it under each `name = value`
//! line, and `screener manpages` renders it as screener.toml(5), so the
//! terminal and the manual say the same thing. Defaults are not written
//! here: they come from [`Config::default`], the values the daemon uses.
//! A unit test holds the table and the configuration together: every key
//! `config show -d` lists has an entry, and no entry or text names a key
//! that does not exist.

use std::fmt::Write as _;

use super::Config;

/// One key's description.
pub struct Key {
    /// `section.key`, as `config show` and `config set` name it.
    pub name: &'static str,
    /// The postscreen (or Postfix) parameter that does the same, when one
    /// does: an operator moving from postscreen looks the key up by it.
    pub postscreen: Option<&'static str>,
    /// Shown instead of the default value where that value depends on the
    /// machine the manual is generated on (the host name).
    pub default_note: Option<&'static str>,
    /// What the key does and why one would change it; plain text, one
    /// paragraph.
    pub text: &'static str,
}

/// One section's heading text in the manual.
pub struct Section {
    /// The TOML table name.
    pub name: &'static str,
    /// What the section is about.
    pub text: &'static str,
}

/// The sections, in the order the manual presents them.
pub const SECTIONS: &[Section] = &[
    Section {
        name: "smtp",
        text: "Where clients connect, and the real MTA they are handed to.",
    },
    Section {
        name: "screen",
        text: "The screening tests, their actions and limits. Keys keep \
               postscreen's names without the postscreen_ prefix. Each test's \
               action is one of ignore (log the failure and carry on as if the \
               test had passed, without remembering a pass), enforce (carry on, \
               then answer every RCPT TO with a 550) or drop (answer 521 and \
               close at once).",
    },
    Section {
        name: "dns",
        text: "The resolver for DNSBL and DNSWL queries.",
    },
    Section {
        name: "xdp",
        text: "The XDP program that drops blocked sources' packets at the NIC, \
               and its pinned maps.",
    },
    Section {
        name: "verdict",
        text: "Which failures put a client into the kernel block maps, and for \
               how long.",
    },
    Section {
        name: "store",
        text: "The embedded database holding blocks, allow entries, imported \
               lists and the temporary allowlist.",
    },
    Section {
        name: "admin",
        text: "The socket the admin commands (block, allow, cache, stats, xdp, \
               import) use to reach the running daemon.",
    },
    Section {
        name: "metrics",
        text: "The Prometheus (OpenMetrics text) endpoint: the counters screener \
               stats shows, for scraping.",
    },
    Section {
        name: "import",
        text: "Shared block lists imported at start and again whenever their \
               file changes.",
    },
    Section {
        name: "cluster",
        text: "A fleet of MX hosts sharing verdicts and passes through Redis 7 \
               or Valkey. Off while cluster.redis is empty. Redis is never a \
               reason to reject or delay a client: while it is unreachable each \
               node screens alone and queues what it has to publish.",
    },
    Section {
        name: "daemon",
        text: "Whom the daemon runs as. It starts with the privileges it needs \
               to open the store, load and attach the XDP program and bind its \
               sockets, then switches to daemon.user keeping only CAP_BPF, \
               CAP_PERFMON, CAP_NET_ADMIN and CAP_NET_BIND_SERVICE (a reload may \
               load a new program instance or bind a new port).",
    },
    Section {
        name: "log",
        text: "Where the daemon's lines go and in which shape. Under systemd \
               (its journal stream on standard error) they go to journald as \
               native entries with facility mail; on a terminal they are \
               coloured; elsewhere plain. format = \"postscreen\" writes the \
               screening lines as postscreen(8) and dnsblog(8) write theirs, so \
               pflogsumm, Logwatch and fail2ban's postfix filter read them.",
    },
];

/// Every key. Order within a section is the manual's; `config show` keeps
/// its own (alphabetical) order.
pub const KEYS: &[Key] = &[
    // [smtp]
    Key {
        name: "smtp.listen",
        postscreen: Some("the smtp service address in master.cf"),
        default_note: None,
        text: "Addresses the screener accepts SMTP clients on, as \"address:port\" \
               (IPv6 in brackets). Add the submission ports only if clients \
               there should be screened too.",
    },
    Key {
        name: "smtp.hostname",
        postscreen: Some("myhostname"),
        default_note: Some("this host's name (/proc/sys/kernel/hostname)"),
        text: "The name in replies and in the default greet_banner. Must be one \
               word.",
    },
    Key {
        name: "smtp.greet_banner",
        postscreen: Some("postscreen_greet_banner"),
        default_note: None,
        text: "The text of the \"220-\" teaser that opens the pregreet test; \
               $hostname expands to smtp.hostname. An empty banner turns the \
               pregreet test off.",
    },
    Key {
        name: "smtp.backend",
        postscreen: None,
        default_note: None,
        text: "The real MTA that clients are handed to once they pass, as \
               \"address:port\". On the same host this is a Postfix smtpd \
               listening on 127.0.0.1:10025 with smtpd_upstream_proxy_protocol = \
               haproxy. It must not be one of smtp.listen.",
    },
    Key {
        name: "smtp.backend_proxy_protocol",
        postscreen: None,
        default_note: None,
        text: "The PROXY protocol header sent to the backend so that it logs and \
               judges the real client: none, v1 or v2. Postfix reads both \
               versions with smtpd_upstream_proxy_protocol = haproxy.",
    },
    Key {
        name: "smtp.upstream_proxy_protocol",
        postscreen: Some("postscreen_upstream_proxy_protocol"),
        default_note: None,
        text: "none, or haproxy when the screener sits behind a load balancer \
               that sends a PROXY header (v1 or v2) naming the client.",
    },
    Key {
        name: "smtp.upstream_proxy_trusted",
        postscreen: None,
        default_note: None,
        text: "CIDRs of the load balancers allowed to send a PROXY header; \
               required with upstream_proxy_protocol = haproxy. A connection \
               from anyone else is closed before its header is read, since the \
               header names the client a verdict falls on.",
    },
    Key {
        name: "smtp.upstream_proxy_timeout",
        postscreen: Some("postscreen_upstream_proxy_timeout"),
        default_note: None,
        text: "How long a load balancer has to send its PROXY header.",
    },
    Key {
        name: "smtp.backend_timeout",
        postscreen: None,
        default_note: None,
        text: "How long connecting to the backend and reading its greeting may \
               take before the client is told 421.",
    },
    Key {
        name: "smtp.shutdown_grace",
        postscreen: None,
        default_note: None,
        text: "After SIGTERM, how long hand-offs in flight may run on, and then \
               how long queued failures have to become verdicts, before the \
               daemon exits.",
    },
    // [screen]
    Key {
        name: "screen.access_list",
        postscreen: Some("postscreen_access_list"),
        default_note: None,
        text: "Permanent rules, \"permit CIDR\" or \"reject CIDR\", first match \
               wins. A permitted client goes straight to the backend \
               (ALLOWLISTED); a rejected one is answered 521 and closed \
               (DENYLISTED), and blocked when denylist is in verdict.block_on. \
               Unlike postscreen there is no denylist action: a reject always \
               drops.",
    },
    Key {
        name: "screen.permit_local",
        postscreen: Some("permit_mynetworks in postscreen_access_list"),
        default_note: None,
        text: "Loopback and every address on the host's interfaces are never \
               screened and never blocked, and no verdict covers a prefix \
               containing one.",
    },
    Key {
        name: "screen.greet_wait",
        postscreen: Some("postscreen_greet_wait"),
        default_note: None,
        text: "How long the pregreet test waits after the teaser. Real MTAs wait \
               for the whole greeting; a client that talks first fails. At most \
               1m; under stress screen.stress_greet_wait applies.",
    },
    Key {
        name: "screen.greet_action",
        postscreen: Some("postscreen_greet_action"),
        default_note: None,
        text: "What a pregreet failure does: ignore, enforce or drop.",
    },
    Key {
        name: "screen.greet_ttl",
        postscreen: Some("postscreen_greet_ttl"),
        default_note: None,
        text: "How long a pregreet pass is remembered.",
    },
    Key {
        name: "screen.dnsbl_sites",
        postscreen: Some("postscreen_dnsbl_sites"),
        default_note: None,
        text: "DNS lists to ask about every new client, as \
               \"domain[=filter][*weight]\": the filter restricts which A records \
               count (\"127.0.0.[2..11]\"), the weight (default 1, negative for \
               allowlists) adds to the client's score. Answers that list \
               operators use for errors (127.255.255.0/24, x.x.x.255) never count \
               unless a filter asks for them.",
    },
    Key {
        name: "screen.dnsbl_threshold",
        postscreen: Some("postscreen_dnsbl_threshold"),
        default_note: None,
        text: "The score at which a client fails the DNSBL test. At least 1.",
    },
    Key {
        name: "screen.dnsbl_allowlist_threshold",
        postscreen: Some("postscreen_dnsbl_allowlist_threshold"),
        default_note: None,
        text: "0 (off) or negative: a client scoring at or below it skips every \
               other test.",
    },
    Key {
        name: "screen.dnsbl_action",
        postscreen: Some("postscreen_dnsbl_action"),
        default_note: None,
        text: "What a DNSBL failure does: ignore, enforce or drop.",
    },
    Key {
        name: "screen.dnsbl_timeout",
        postscreen: Some("postscreen_dnsbl_timeout"),
        default_note: None,
        text: "How long to wait for DNS answers; a list that does not answer in \
               time does not count.",
    },
    Key {
        name: "screen.dnsbl_min_ttl",
        postscreen: Some("postscreen_dnsbl_min_ttl"),
        default_note: None,
        text: "The shortest time a DNSBL pass is remembered, whatever the DNS TTL.",
    },
    Key {
        name: "screen.dnsbl_max_ttl",
        postscreen: Some("postscreen_dnsbl_max_ttl"),
        default_note: None,
        text: "The longest time a DNSBL pass is remembered, whatever the DNS TTL.",
    },
    Key {
        name: "screen.dnsbl_reply_map",
        postscreen: Some("postscreen_dnsbl_reply_map"),
        default_note: None,
        text: "Query domain to public name, for replies and logs: hides a paid \
               feed's secret query domain, e.g. { \"key.feed.example\" = \
               \"feed.example\" }.",
    },
    Key {
        name: "screen.dnsbl_health_interval",
        postscreen: None,
        default_note: None,
        text: "How often every list is asked for its RFC 5782 test points. A \
               list that lists 127.0.0.1 (or ::ffff:7f00:1) lists the world and \
               is switched off for that address family until it stops.",
    },
    Key {
        name: "screen.dnsbl_health_skip",
        postscreen: None,
        default_note: None,
        text: "Lists (query domains or dnsbl_reply_map public names) that are \
               never health-checked and never switched off.",
    },
    Key {
        name: "screen.pipelining_enable",
        postscreen: Some("postscreen_pipelining_enable"),
        default_note: None,
        text: "Run the pipelining test: a client that sends a command before the \
               reply to the previous one fails. A deep test, off by default as \
               in postscreen.",
    },
    Key {
        name: "screen.pipelining_action",
        postscreen: Some("postscreen_pipelining_action"),
        default_note: None,
        text: "What a pipelining failure does: ignore, enforce or drop.",
    },
    Key {
        name: "screen.pipelining_ttl",
        postscreen: Some("postscreen_pipelining_ttl"),
        default_note: None,
        text: "How long a pipelining pass is remembered.",
    },
    Key {
        name: "screen.non_smtp_command_enable",
        postscreen: Some("postscreen_non_smtp_command_enable"),
        default_note: None,
        text: "Run the non-SMTP command test: header lines (\"Label:\") and \
               screen.forbidden_commands fail. A deep test.",
    },
    Key {
        name: "screen.non_smtp_command_action",
        postscreen: Some("postscreen_non_smtp_command_action"),
        default_note: None,
        text: "What a non-SMTP command failure does: ignore, enforce or drop.",
    },
    Key {
        name: "screen.non_smtp_command_ttl",
        postscreen: Some("postscreen_non_smtp_command_ttl"),
        default_note: None,
        text: "How long a non-SMTP command pass is remembered.",
    },
    Key {
        name: "screen.bare_newline_enable",
        postscreen: Some("postscreen_bare_newline_enable"),
        default_note: None,
        text: "Run the bare newline test: a line ending in LF without CR fails. \
               A deep test.",
    },
    Key {
        name: "screen.bare_newline_action",
        postscreen: Some("postscreen_bare_newline_action"),
        default_note: None,
        text: "What a bare newline failure does: ignore, enforce or drop.",
    },
    Key {
        name: "screen.bare_newline_ttl",
        postscreen: Some("postscreen_bare_newline_ttl"),
        default_note: None,
        text: "How long a bare newline pass is remembered.",
    },
    Key {
        name: "screen.deep_test_handoff",
        postscreen: None,
        default_note: None,
        text: "What a client that passes the deep tests gets: replay (the \
               dialogue is replayed to the backend and the connection spliced, \
               no reconnect) or reconnect (postscreen's way: 450 4.3.2, the \
               client must come back).",
    },
    Key {
        name: "screen.forbidden_commands",
        postscreen: Some("postscreen_forbidden_commands"),
        default_note: None,
        text: "Commands that fail the non-SMTP command test (open-proxy and \
               cross-protocol probes). An SMTP verb here is refused.",
    },
    Key {
        name: "screen.pre_queue_limit",
        postscreen: Some("postscreen_pre_queue_limit"),
        default_note: None,
        text: "Clients being screened at once; more are told 421. Stress mode \
               begins at 90% of it and ends at 70%.",
    },
    Key {
        name: "screen.post_queue_limit",
        postscreen: Some("postscreen_post_queue_limit"),
        default_note: None,
        text: "Clients handed to the backend at once; more are told 421.",
    },
    Key {
        name: "screen.client_connection_count_limit",
        postscreen: Some("postscreen_client_connection_count_limit"),
        default_note: None,
        text: "Connections one client address may hold open; more are told 421.",
    },
    Key {
        name: "screen.command_count_limit",
        postscreen: Some("postscreen_command_count_limit"),
        default_note: None,
        text: "Commands a client may send in the deep tests' dialogue.",
    },
    Key {
        name: "screen.command_time_limit",
        postscreen: Some("postscreen_command_time_limit"),
        default_note: None,
        text: "How long one whole command line may take to arrive in the deep \
               tests' dialogue; under stress screen.stress_command_time_limit \
               applies.",
    },
    Key {
        name: "screen.line_length_limit",
        postscreen: Some("line_length_limit"),
        default_note: None,
        text: "The longest command line, in bytes; at least 512.",
    },
    Key {
        name: "screen.stress_greet_wait",
        postscreen: Some("postscreen_greet_wait (its stress value)"),
        default_note: None,
        text: "screen.greet_wait while in stress mode, for clients already being \
               screened too.",
    },
    Key {
        name: "screen.stress_command_time_limit",
        postscreen: Some("postscreen_command_time_limit (its stress value)"),
        default_note: None,
        text: "screen.command_time_limit while in stress mode.",
    },
    Key {
        name: "screen.cache_retention_time",
        postscreen: Some("postscreen_cache_retention_time"),
        default_note: None,
        text: "How long an expired temporary allowlist record is kept, so that a \
               returning client is not counted as new.",
    },
    Key {
        name: "screen.cache_cleanup_interval",
        postscreen: Some("postscreen_cache_cleanup_interval"),
        default_note: None,
        text: "How often expired temporary allowlist records are removed.",
    },
    // [dns]
    Key {
        name: "dns.nameservers",
        postscreen: None,
        default_note: None,
        text: "Resolvers for DNSBL queries, as \"address:port\"; empty uses the \
               system's resolver configuration. List operators refuse queries \
               that come through large public resolvers.",
    },
    // [xdp]
    Key {
        name: "xdp.interfaces",
        postscreen: None,
        default_note: None,
        text: "Interfaces the XDP program is attached to: those the SMTP clients \
               arrive on.",
    },
    Key {
        name: "xdp.mode",
        postscreen: None,
        default_note: None,
        text: "auto (driver mode where the NIC driver has it, else skb), driver \
               or skb.",
    },
    Key {
        name: "xdp.ports",
        postscreen: None,
        default_note: None,
        text: "TCP destination ports whose new connections are judged; [\"all\"] \
               judges every IP packet on its source.",
    },
    Key {
        name: "xdp.pin_path",
        postscreen: None,
        default_note: None,
        text: "Where the program, its links and maps are pinned in bpffs. They \
               outlive the daemon: the gate stays closed across restarts and \
               crashes, and screener xdp detach removes them.",
    },
    Key {
        name: "xdp.log_level",
        postscreen: None,
        default_note: None,
        text: "Kernel-side log level: off, error, warn, info, debug or trace. \
               Above warn every drop is logged.",
    },
    Key {
        name: "xdp.max_hosts",
        postscreen: None,
        default_note: None,
        text: "Entries in each exact-host block map (IPv4 hosts, IPv6 prefixes). \
               A full map refuses new blocks rather than evicting one in force. \
               Applies to maps created afresh.",
    },
    Key {
        name: "xdp.max_prefixes",
        postscreen: None,
        default_note: None,
        text: "Entries in each CIDR block trie (imports, escalations, manual \
               CIDRs). Applies to maps created afresh.",
    },
    Key {
        name: "xdp.max_allows",
        postscreen: None,
        default_note: None,
        text: "Entries in each allow trie. Applies to maps created afresh.",
    },
    // [verdict]
    Key {
        name: "verdict.block_on",
        postscreen: None,
        default_note: None,
        text: "Failures that block the client at the NIC: pregreet, dnsbl, \
               pipelining, non_smtp_command, bare_newline, denylist. A failure \
               whose action is ignore never blocks. [] blocks nothing: the tests \
               still run and log what they find.",
    },
    Key {
        name: "verdict.block_ttl",
        postscreen: None,
        default_note: None,
        text: "How long a first block lasts.",
    },
    Key {
        name: "verdict.block_ttl_max",
        postscreen: None,
        default_note: None,
        text: "A repeat offender's block doubles each time, up to this.",
    },
    Key {
        name: "verdict.ipv6_prefix",
        postscreen: None,
        default_note: None,
        text: "IPv6 verdicts cover this prefix, since privacy addresses rotate \
               inside it; 32 to 128. Changing it needs screener xdp detach and \
               a restart.",
    },
    Key {
        name: "verdict.escalate_v4_hosts",
        postscreen: None,
        default_note: None,
        text: "Blocked hosts in one IPv4 /24 that block the whole /24 instead; 0 \
               never escalates.",
    },
    Key {
        name: "verdict.escalate_v6_hosts",
        postscreen: None,
        default_note: None,
        text: "Blocked prefixes in one IPv6 /48 that block the whole /48 instead; \
               0 never escalates.",
    },
    // [store]
    Key {
        name: "store.path",
        postscreen: Some("postscreen_cache_map"),
        default_note: None,
        text: "The redb database file, created mode 0600. Besides the temporary \
               allowlist it holds every block and allow entry, so a reboot (which \
               empties the kernel maps) loses nothing.",
    },
    // [admin]
    Key {
        name: "admin.socket",
        postscreen: None,
        default_note: None,
        text: "The admin commands' Unix socket.",
    },
    // [metrics]
    Key {
        name: "metrics.listen",
        postscreen: None,
        default_note: None,
        text: "Addresses (e.g. [\"127.0.0.1:9325\"]) where GET /metrics answers \
               in the OpenMetrics text format with the counters screener stats \
               shows: connections by outcome, passes and failures per test, DNSBL \
               lookups, errors and latency per list, blocks and unblocks, kernel \
               drops per reason, map fill, stress mode. Empty serves nothing. No \
               authentication: keep it on loopback or behind a firewall. Takes \
               effect on restart.",
    },
    // [daemon]
    Key {
        name: "daemon.user",
        postscreen: Some("mail_owner"),
        default_note: None,
        text: "The account the daemon runs as after its privileged start; the \
               admin socket, the store and the pin directory are handed to it. \
               \"root\" means do not switch (capabilities are still reduced to \
               the four named above). An account that does not exist is an \
               error at start and in config check.",
    },
    Key {
        name: "daemon.admin_group",
        postscreen: None,
        default_note: None,
        text: "The group of the admin socket (mode 0660): its members may run \
               the admin commands. root: only root may.",
    },
    // [import]
    Key {
        name: "import.lists",
        postscreen: None,
        default_note: None,
        text: "Lists to import, each { file = \"...\", format = \"drop\" | \
               \"cidr\", name = \"...\", interval = \"1h\" }: format drop reads \
               Spamhaus DROP style \"CIDR ; SBLnnn\" lines, cidr plain CIDRs; name \
               defaults to the file name; interval is how often the file is \
               checked for changes.",
    },
    // [cluster]
    Key {
        name: "cluster.redis",
        postscreen: Some("postscreen_cache_map = memcache:... (passes only)"),
        default_note: None,
        text: "Redis URLs, \"redis://[user:password@]host:port/db\". At start \
               the first that answers carries commands and is reconnected to \
               when it drops; the stream reader tries the URLs in turn at every \
               reconnect. Empty (the default) leaves this node out of any fleet.",
    },
    Key {
        name: "cluster.node",
        postscreen: None,
        default_note: Some("this host's name"),
        text: "This node's name in the fleet: stored with every verdict it \
               makes, shown by block list and cluster status on every node.",
    },
    Key {
        name: "cluster.prefix",
        postscreen: None,
        default_note: None,
        text: "The prefix of every Redis key, so several fleets can share one \
               Redis.",
    },
    Key {
        name: "cluster.share",
        postscreen: None,
        default_note: None,
        text: "What the fleet shares: \"blocks\" (every block and unblock, \
               applied to every node's kernel maps; offences count across the \
               fleet) and \"passes\" (a client that passed on one node is \
               PASS OLD on every node).",
    },
    Key {
        name: "cluster.pass_timeout",
        postscreen: None,
        default_note: None,
        text: "The longest a new client waits for Redis to say whether another \
               node passed it; past it the client is screened as new. Between \
               1ms and 1s.",
    },
    Key {
        name: "cluster.queue",
        postscreen: None,
        default_note: None,
        text: "Verdicts and passes kept for Redis while it is unreachable; past \
               this the oldest are dropped and counted (the local kernel maps \
               and store have them regardless).",
    },
    Key {
        name: "cluster.stream_length",
        postscreen: None,
        default_note: None,
        text: "The approximate length the shared verdict stream is trimmed to. \
               A node that was away longer than this many verdicts rebuilds its \
               fleet blocks from the snapshot keys instead of replaying.",
    },
    // [log]
    Key {
        name: "log.format",
        postscreen: None,
        default_note: None,
        text: "auto: journald under systemd, otherwise text on standard error \
               with the level and module of each line. postscreen: syslog lines \
               (\"Mon dd hh:mm:ss host identifier[pid]: text\") carrying only \
               the text, screening decisions worded as postscreen words them \
               (CONNECT, PASS NEW, PREGREET, DNSBL rank, NOQUEUE: reject: RCPT \
               ...) and DNSBL answers as dnsblog's \"addr A listed by domain D \
               as R\". Under journald the identifiers below apply either way.",
    },
    Key {
        name: "log.identifier",
        postscreen: Some("syslog_name"),
        default_note: None,
        text: "The syslog identifier of the lines about a client (postscreen's \
               lines); empty means screener, or postfix/postscreen under format \
               = \"postscreen\" (what log parsers look for). The daemon's own \
               lines (start-up, XDP, store, imports) use it too, except under \
               format = \"postscreen\", where they keep screener: postscreen \
               writes no such lines and parsers would count them as unknown. Up \
               to 64 printable characters without '[' or ':'.",
    },
    Key {
        name: "log.dnsblog_identifier",
        postscreen: None,
        default_note: None,
        text: "The syslog identifier of DNSBL answer lines; empty means the same \
               as log.identifier, or postfix/dnsblog under format = \
               \"postscreen\".",
    },
    Key {
        name: "log.respectful_logging",
        postscreen: Some("respectful_logging"),
        default_note: None,
        text: "true writes ALLOWLISTED and DENYLISTED, as Postfix 3.6 and later \
               do; false writes the older WHITELISTED and BLACKLISTED, which log \
               parsers written before 3.6 (Logwatch 7.7) count.",
    },
];

/// The entry for `name` (`section.key`).
pub fn lookup(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

/// Width of the described text in `config show --describe`: fits an
/// 80-column terminal after the indent.
const WIDTH: usize = 72;

/// `config show` lines with each key's description below it, indented,
/// and a blank line after: `config show -d --describe`.
pub fn describe_lines(lines: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for line in lines {
        out.push(line.clone());
        let name = line.split_once(" = ").map_or(line.as_str(), |(n, _)| n);
        if let Some(key) = lookup(name) {
            for l in wrap(key.text, WIDTH) {
                out.push(format!("    {l}"));
            }
            if let Some(p) = key.postscreen {
                out.push(format!("    postscreen: {p}"));
            }
        }
        out.push(String::new());
    }
    out
}

/// Splits `text` into lines of at most `width` characters at spaces (a
/// longer word stands alone).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        if !cur.is_empty() && cur.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

/// Text made safe for roff: backslashes escaped, and a line that would
/// start with a control character (`.` or `'`) guarded.
fn roff(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with(['.', '\'']) {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

/// screener.toml(5): every key with its default and postscreen equivalent.
pub fn man_page(version: &str) -> String {
    let defaults: std::collections::BTreeMap<String, String> =
        Config::default().entries().into_iter().collect();
    let mut m = String::new();
    let _ = writeln!(
        m,
        ".TH SCREENER.TOML 5 \"\" \"screener {}\" \"File Formats\"",
        roff(version)
    );
    m.push_str(".SH NAME\nscreener.toml \\- configuration file of screener(1)\n");
    m.push_str(".SH SYNOPSIS\n/etc/screener/screener.toml\n");
    m.push_str(
        ".SH DESCRIPTION\n\
         A TOML file of sections ([smtp], [screen], ...) holding keys. \
         Commands name a key as section.key:\n\
         .B screener config show\n\
         prints the values in force, \\fB\\-n\\fR those that differ from the defaults, \
         \\fB\\-d\\fR the defaults, and \\fB\\-\\-describe\\fR adds the text of this page;\n\
         .B screener config set\n\
         edits the file in place keeping its comments.\n\
         .PP\n\
         Every key is checked at start-up and by \\fBscreener config check\\fR: an \
         unknown key, a bad value or a value out of range (one that would reject \
         every client, loop back to the screener or overflow) is an error naming \
         the key and the value, and the daemon does not start on it. Values that \
         work but look like mistakes pass with a warning naming the key.\n\
         .PP\n\
         Durations are written as 30s, 10m, 1h, 7d (at most 3650d). Screening \
         parameters keep the names of Postfix's postscreen(8) parameters without \
         the postscreen_ prefix; each key below names the postscreen parameter it \
         corresponds to, where there is one.\n\
         .PP\n\
         SIGHUP (systemctl reload screener) rereads the file; a key that takes \
         effect only after a restart (verdict.ipv6_prefix, xdp.pin_path, \
         store.path, admin.socket, metrics.listen, daemon.user, \
         daemon.admin_group, the log keys, the cluster keys) is named in a \
         warning.\n",
    );
    for section in SECTIONS {
        let _ = writeln!(m, ".SH \"[{}]\"\n{}", section.name, roff(section.text));
        let prefix = format!("{}.", section.name);
        for key in KEYS.iter().filter(|k| k.name.starts_with(&prefix)) {
            let default = key
                .default_note
                .map(str::to_owned)
                .or_else(|| defaults.get(key.name).cloned())
                .unwrap_or_default();
            let _ = writeln!(m, ".TP\n.B {}", roff(key.name));
            let _ = writeln!(m, "{}", roff(key.text));
            let _ = writeln!(m, ".br\nDefault: {}", roff(&default));
            if let Some(p) = key.postscreen {
                let _ = writeln!(m, ".br\npostscreen: {}", roff(p));
            }
        }
    }
    m.push_str(
        ".SH FILES\n\
         .TP\n/etc/screener/screener.toml\nThe file read without \\fB\\-c\\fR.\n\
         .SH \"SEE ALSO\"\n\
         screener(1), postscreen(8), postconf(5)\n",
    );
    m
}

/// The FILES and SEE ALSO sections appended to screener(1), which clap
/// writes from the command-line definition alone.
pub const MAN1_FILES: &str = "\
.SH FILES
.TP
/etc/screener/screener.toml
The configuration read without \\fB\\-c\\fR; every key is described in screener.toml(5).
.TP
/run/screener/admin.sock
The admin socket (admin.socket) the commands reach the daemon through.
.TP
/var/lib/screener/screener.redb
The store (store.path): blocks, allow entries, the temporary allowlist.
.TP
/sys/fs/bpf/screener
The pinned XDP program, links and maps (xdp.pin_path), which outlive the daemon.
.SH \"SEE ALSO\"
screener.toml(5), postscreen(8), bpftool(8), systemctl(1)
";

#[cfg(test)]
mod tests {
    use super::*;

    fn config_keys() -> Vec<String> {
        Config::default()
            .entries()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    #[test]
    fn every_shown_key_is_described() {
        let lines = super::super::show(&Config::default(), super::super::Show::Defaults, &[])
            .expect("config show -d");
        let missing: Vec<&String> = lines
            .iter()
            .map(|l| l.split_once(" = ").expect("name = value").0)
            .zip(&lines)
            .filter(|(name, _)| lookup(name).is_none())
            .map(|(_, l)| l)
            .collect();
        assert!(
            missing.is_empty(),
            "keys without a description: {missing:?}"
        );
    }

    #[test]
    fn no_description_names_a_key_that_does_not_exist() {
        let keys = config_keys();
        let sections: Vec<&str> = SECTIONS.iter().map(|s| s.name).collect();
        let mut seen = std::collections::HashSet::new();
        for key in KEYS {
            assert!(
                keys.iter().any(|k| k == key.name),
                "no such key {}",
                key.name
            );
            assert!(seen.insert(key.name), "{} described twice", key.name);
            let section = key.name.split('.').next().unwrap_or_default();
            assert!(sections.contains(&section), "{}: no section", key.name);
        }
        for section in SECTIONS {
            assert!(
                keys.iter()
                    .any(|k| k.starts_with(&format!("{}.", section.name))),
                "section {} has no keys",
                section.name
            );
        }
        // A `section.key` mentioned in any text must exist too: the
        // manual holds every key's and section's text.
        let page = man_page("0.1.0");
        for text in [page.as_str(), MAN1_FILES] {
            // Paths (/run/screener/admin.sock) are not keys.
            for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || "._/".contains(c))) {
                let word = word.trim_end_matches('.');
                if word.contains('/') {
                    continue;
                }
                let Some((section, _)) = word.split_once('.') else {
                    continue;
                };
                if sections.contains(&section) {
                    assert!(keys.iter().any(|k| k == word), "{word:?} is no key");
                }
            }
        }
    }

    #[test]
    fn describe_puts_the_text_under_each_line() {
        let lines = super::super::show(
            &Config::default(),
            super::super::Show::Defaults,
            &["screen.greet_wait".into(), "xdp.mode".into()],
        )
        .unwrap();
        let out = describe_lines(&lines);
        assert_eq!(out[0], "screen.greet_wait = 6s");
        assert!(
            out[1].starts_with("    How long the pregreet test waits"),
            "{out:?}"
        );
        assert!(out.contains(&"    postscreen: postscreen_greet_wait".to_owned()));
        let xdp = out.iter().position(|l| l == "xdp.mode = auto").unwrap();
        assert!(out[xdp + 1].starts_with("    auto (driver mode"), "{out:?}");
        assert!(out.iter().all(|l| l.len() <= WIDTH + 4), "{out:?}");
    }

    #[test]
    fn man_page_lists_every_key_with_default_and_postscreen_name() {
        let page = man_page("0.1.0");
        assert!(page.starts_with(".TH SCREENER.TOML 5 "));
        for key in KEYS {
            assert!(
                page.contains(&format!(".B {}\n", roff(key.name))),
                "{}",
                key.name
            );
        }
        assert!(page.contains(".B screen.greet_wait\n"));
        assert!(page.contains("Default: 6s\n.br\npostscreen: postscreen_greet_wait\n"));
        // Machine-dependent defaults are described, not printed.
        assert!(page.contains("Default: this host's name"));
        // No text line starts with a roff control character by accident.
        for line in page.lines() {
            assert!(!line.starts_with('\''), "unguarded line {line:?}");
        }
    }

    #[test]
    fn wrap_keeps_words_whole() {
        assert_eq!(wrap("a bb ccc", 4), vec!["a bb", "ccc"]);
        assert_eq!(
            wrap("averyveryverylongword x", 4),
            vec!["averyveryverylongword", "x"]
        );
        assert!(wrap("", 10).is_empty());
    }
}
