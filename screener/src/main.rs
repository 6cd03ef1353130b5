//! `screener`: the daemon and its admin commands.
#![expect(
    clippy::doc_markdown,
    reason = "doc comments here are --help text, shown to operators verbatim"
)]

use std::{io::Write, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{bail, Context as _};
use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};
use screener::{
    admin::{self, Request},
    config::{self, Config, Show},
    daemon, duration, store, verdict, xdp,
};

/// SMTP zombie blocker: screens new SMTP clients like postscreen and drops
/// the bad ones' packets at the NIC with XDP.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Configuration file (default /etc/screener/screener.toml); admin
    /// commands find the daemon's admin socket in it.
    #[arg(
        short,
        long,
        global = true,
        value_name = "FILE",
        env = "SCREENER_CONFIG"
    )]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: load and attach the XDP program, serve the admin socket.
    Run {
        /// Do not load the XDP program (screening only).
        #[arg(long)]
        no_xdp: bool,
    },
    /// Check, show or edit the configuration file.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Block sources at the NIC.
    #[command(subcommand)]
    Block(BlockCmd),
    /// Sources that are never dropped and skip every test.
    #[command(subcommand)]
    Allow(AllowCmd),
    /// The temporary allowlist (clients that passed the tests).
    #[command(subcommand)]
    Cache(CacheCmd),
    /// Kernel counters and daemon counters.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// The XDP attachment.
    #[command(subcommand)]
    Xdp(XdpCmd),
    /// The fleet of MX hosts this node shares verdicts with (`[cluster]`).
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Check or repair the store file (store.path); run without the daemon.
    #[command(subcommand)]
    Store(StoreCmd),
    /// Import a shared block list (Spamhaus DROP style or plain CIDRs).
    Import {
        file: PathBuf,
        #[arg(long, default_value = "drop", value_parser = ["drop", "cidr"])]
        format: String,
        /// How long the entries live (30s, 10m, 1h, 7d); default: until re-imported.
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// List name; importing the same name again replaces the list.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Print a shell completion script.
    ///
    /// The package installs them; by hand, e.g. `screener completions bash
    /// > /usr/share/bash-completion/completions/screener`.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
}

/// The shells `completions` writes for.
#[derive(Clone, Copy, ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate the file; non-zero exit and the offending key on error.
    Check,
    /// Print `name = value` lines.
    Show {
        /// Only values that differ from the defaults.
        #[arg(short = 'n', conflicts_with = "defaults")]
        non_default: bool,
        /// The defaults instead of the file's values.
        #[arg(short = 'd')]
        defaults: bool,
        /// Describe each key below its line (as screener.toml(5) does).
        #[arg(long)]
        describe: bool,
        /// Names such as screen.greet_wait (all when none).
        names: Vec<String>,
    },
    /// Edit the file in place (comments kept): NAME=VALUE...
    Set {
        #[arg(required = true, value_name = "NAME=VALUE")]
        assignments: Vec<String>,
    },
}

#[derive(Args)]
struct Nets {
    /// Addresses or CIDRs (192.0.2.1, 198.51.100.0/24, 2001:db8::/64).
    #[arg(required = true, value_name = "CIDR")]
    nets: Vec<String>,
}

impl Nets {
    /// The CIDRs, each checked here first so a bad one is named before the
    /// daemon is asked anything.
    fn checked(self) -> anyhow::Result<Vec<String>> {
        daemon::parse_nets(&self.nets).map_err(anyhow::Error::msg)?;
        Ok(self.nets)
    }
}

#[derive(Subcommand)]
enum BlockCmd {
    /// Drop packets from these sources.
    Add {
        #[command(flatten)]
        nets: Nets,
        /// How long (30s, 10m, 1h, 7d); default verdict.block_ttl.
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// Why (free text; pregreet, dnsbl, ... are counted under their own name).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Remove blocks.
    Del {
        #[command(flatten)]
        nets: Nets,
    },
    /// List blocks.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AllowCmd {
    /// Never drop these sources.
    Add {
        #[command(flatten)]
        nets: Nets,
    },
    /// Remove allow entries.
    Del {
        #[command(flatten)]
        nets: Nets,
    },
    /// List allow entries.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// List cached clients.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one client's record.
    Show { ip: String },
    /// Forget one client, or every client.
    Purge { ip: Option<String> },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Open the store read-only and verify that every table and record
    /// reads; non-zero exit when anything is damaged.
    Check,
    /// Rebuild a damaged store: every readable record, plus the verdicts
    /// the pinned maps hold, go into a new file; the damaged one is kept
    /// as <file>.damaged-<time>.
    Repair,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// This node's link to Redis, its lag and queue, and the nodes that
    /// beat recently.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum XdpCmd {
    /// Show the pinned program, links and maps.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Detach the program and remove its pinned maps.
    Detach,
}

/// A `--ttl`: whole seconds from 1s up to the bound every duration has
/// (ten years), so the daemon's expiry arithmetic can never overflow or
/// wrap, and what is printed is what the kernel gets.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = duration::parse(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) || d.subsec_nanos() != 0 {
        return Err(format!(
            "bad TTL {s:?}: a whole number of seconds, at least 1s"
        ));
    }
    Ok(d)
}

fn main() -> ExitCode {
    // `screener manpages DIR`, for packaging, is no subcommand: completion
    // scripts offer hidden subcommands too, and operators have no use for it.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "manpages") {
        let [_, _, dir] = &args[..] else {
            eprintln!("usage: screener manpages DIR");
            return ExitCode::from(2);
        };
        return match manpages(std::path::Path::new(dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("screener: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    // The daemon logs as its configuration's [log] says, once that is
    // loaded (until then its errors go plainly to stderr); the admin
    // commands log as text on stderr.
    if !matches!(cli.command, Command::Run { .. }) {
        screener::logging::init_stderr();
    }
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("screener: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration file: `-c`, else `SCREENER_CONFIG`, else the default
/// path. Admin commands fall back to the defaults when the default file
/// does not exist.
fn load_config(path: Option<&PathBuf>, required: bool) -> anyhow::Result<(Config, PathBuf)> {
    let p = path
        .cloned()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
    if path.is_none() && !required && !p.exists() {
        return Ok((Config::default(), p));
    }
    let cfg = Config::load(&p).with_context(|| format!("configuration {}", p.display()))?;
    Ok((cfg, p))
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let cpath = cli.config.as_ref();
    match cli.command {
        Command::Run { no_xdp } => {
            let (cfg, path) = load_config(cpath, true)?;
            screener::logging::init(&cfg.log);
            daemon::run(cfg, path, no_xdp).await
        }
        Command::Config(c) => config_cmd(cpath, c),
        Command::Block(b) => {
            let (req, json) = match b {
                BlockCmd::Add { nets, ttl, reason } => (
                    Request::BlockAdd {
                        nets: nets.checked()?,
                        ttl: ttl.map(|d| d.as_secs()),
                        reason,
                    },
                    false,
                ),
                BlockCmd::Del { nets } => (
                    Request::BlockDel {
                        nets: nets.checked()?,
                    },
                    false,
                ),
                BlockCmd::List { json } => (Request::BlockList, json),
            };
            entries(cpath, &req, json).await
        }
        Command::Allow(a) => {
            let (req, json) = match a {
                AllowCmd::Add { nets } => (
                    Request::AllowAdd {
                        nets: nets.checked()?,
                    },
                    false,
                ),
                AllowCmd::Del { nets } => (
                    Request::AllowDel {
                        nets: nets.checked()?,
                    },
                    false,
                ),
                AllowCmd::List { json } => (Request::AllowList, json),
            };
            entries(cpath, &req, json).await
        }
        Command::Cache(c) => {
            let (cfg, _) = load_config(cpath, false)?;
            let (req, json) = match c {
                CacheCmd::List { json } => {
                    return list(&cfg, &Request::CacheList, json, print_cache_row).await;
                }
                CacheCmd::Show { ip } => (Request::CacheShow { ip }, true),
                CacheCmd::Purge { ip } => (Request::CachePurge { ip }, false),
            };
            let data = ask(&cfg, &req).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                println!("{data}");
            }
            Ok(())
        }
        Command::Stats { json } => {
            let (cfg, _) = load_config(cpath, false)?;
            let data = ask(&cfg, &Request::Stats).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                print_flat("", &data);
            }
            Ok(())
        }
        Command::Xdp(x) => {
            let (cfg, _) = load_config(cpath, false)?;
            xdp_cmd(&cfg, x).await
        }
        Command::Cluster(ClusterCmd::Status { json }) => {
            let (cfg, _) = load_config(cpath, false)?;
            let data = ask(&cfg, &Request::ClusterStatus).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                print_cluster(&data);
            }
            Ok(())
        }
        Command::Store(s) => {
            let (cfg, _) = load_config(cpath, false)?;
            tokio::task::spawn_blocking(move || store_cmd(&cfg, &s)).await?
        }
        Command::Import {
            file,
            format,
            ttl,
            reason,
        } => {
            let (cfg, _) = load_config(cpath, false)?;
            let file = std::fs::canonicalize(&file)
                .with_context(|| format!("import file {}", file.display()))?;
            let size = std::fs::metadata(&file).map_or(0, |m| m.len());
            eprintln!(
                "importing {} ({size} bytes); the daemon logs its progress",
                file.display()
            );
            let data = ask(
                &cfg,
                &Request::Import {
                    file,
                    format,
                    ttl: ttl.map(|d| d.as_secs()),
                    reason,
                },
            )
            .await?;
            print_flat("", &data);
            Ok(())
        }
        Command::Completions { shell } => {
            let shell = match shell {
                Shell::Bash => clap_complete::Shell::Bash,
                Shell::Zsh => clap_complete::Shell::Zsh,
                Shell::Fish => clap_complete::Shell::Fish,
            };
            // Into a buffer first: the generator panics on a write error
            // (a closed pipe), which is an ordinary error here.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "screener", &mut script);
            std::io::stdout()
                .write_all(&script)
                .context("writing the completion script")
        }
    }
}

/// Writes screener(1), a page per subcommand and screener.toml(5) into
/// `dir`.
fn manpages(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing the manual pages into {}", dir.display()))?;
    let one = dir.join("screener.1");
    let page =
        std::fs::read_to_string(&one).with_context(|| format!("reading {}", one.display()))?;
    std::fs::write(&one, page + config::describe::MAN1_FILES)
        .with_context(|| format!("writing {}", one.display()))?;
    let five = dir.join("screener.toml.5");
    std::fs::write(&five, config::describe::man_page(env!("CARGO_PKG_VERSION")))
        .with_context(|| format!("writing {}", five.display()))?;
    Ok(())
}

/// A block/allow request to the daemon, its answer printed (listings as
/// they stream).
async fn entries(cpath: Option<&PathBuf>, req: &Request, json: bool) -> anyhow::Result<()> {
    let (cfg, _) = load_config(cpath, false)?;
    if matches!(req, Request::BlockList | Request::AllowList) {
        return list(&cfg, req, json, print_entry).await;
    }
    let data = ask(&cfg, req).await?;
    print_entries(req, &data, json);
    Ok(())
}

/// Prints a streamed listing as its rows arrive: a JSON array with one
/// row per line (`--json`), or `text` per row. Neither the daemon nor
/// this process holds the whole listing.
async fn list(
    cfg: &Config,
    req: &Request,
    json: bool,
    text: fn(&mut dyn Write, &serde_json::Value) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut written: std::io::Result<()> = Ok(());
    let mut first = true;
    if json {
        written = out.write_all(b"[");
    }
    let (resp, rows) = admin::call_rows(&cfg.admin.socket, req, |row| {
        if written.is_err() {
            return;
        }
        written = if json {
            let sep: &[u8] = if first { b"\n" } else { b",\n" };
            out.write_all(sep)
                .and_then(|()| serde_json::to_writer(&mut out, &row).map_err(Into::into))
        } else {
            text(&mut out, &row)
        };
        first = false;
    })
    .await?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_else(|| "refused".into()));
    }
    if json {
        written = written.and_then(|()| out.write_all(if rows == 0 { b"]\n" } else { b"\n]\n" }));
    }
    written
        .and_then(|()| out.flush())
        .context("writing the listing")
}

/// One `block list` / `allow list` row as text.
fn print_entry(out: &mut dyn Write, item: &serde_json::Value) -> std::io::Result<()> {
    let get = |k: &str| item.get(k).cloned().unwrap_or_default();
    let expires = match get("expires_in").as_u64() {
        None => "never".to_owned(),
        Some(0) => "expired".to_owned(),
        Some(s) => format!("in {}", duration::Display(Duration::from_secs(s))),
    };
    let origin = get("origin")
        .as_str()
        .map(|o| format!(" from {o}"))
        .unwrap_or_default();
    writeln!(
        out,
        "{:<43} {:<16} expires {:<12} hits {}{origin}",
        get("net").as_str().unwrap_or(""),
        get("reason").as_str().unwrap_or(""),
        expires,
        get("hits")
    )
}

/// `cluster status` as text.
fn print_cluster(s: &serde_json::Value) {
    let g = |k: &str| s.get(k).cloned().unwrap_or_default();
    let link = if g("connected").as_bool() == Some(true) {
        "connected"
    } else {
        "NOT CONNECTED (screening alone, verdicts queued)"
    };
    println!("node {}: {link}", g("node").as_str().unwrap_or("?"));
    println!(
        "lag {} entries, queued {}, dropped {}, published {}, applied {}, resyncs {}",
        g("lag"),
        g("queued"),
        g("dropped"),
        g("published"),
        g("applied"),
        g("resyncs")
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let nodes = g("nodes");
    let nodes = nodes.as_array().map(Vec::as_slice).unwrap_or_default();
    println!("nodes seen in the last 30s: {}", nodes.len());
    for n in nodes {
        let ng = |k: &str| n.get(k).cloned().unwrap_or_default();
        let age = now_ms.saturating_sub(ng("at_ms").as_u64().unwrap_or(0)) / 1000;
        println!(
            "  {:<24} last heartbeat {age}s ago, lag {}, queued {}",
            ng("node").as_str().unwrap_or("?"),
            ng("lag"),
            ng("queued")
        );
    }
}

/// One `cache list` row as text: the client and its record.
fn print_cache_row(out: &mut dyn Write, item: &serde_json::Value) -> std::io::Result<()> {
    let ip = item.get("ip").and_then(|v| v.as_str()).unwrap_or("");
    let record = item.get("record").cloned().unwrap_or_default();
    writeln!(out, "{ip:<39} {record}")
}

/// Sends a request to the running daemon; a refusal becomes an error.
async fn ask(cfg: &Config, req: &Request) -> anyhow::Result<serde_json::Value> {
    let resp = admin::call(&cfg.admin.socket, req).await?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_else(|| "refused".into()));
    }
    Ok(resp.data)
}

fn print_entries(req: &Request, data: &serde_json::Value, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(data).unwrap_or_default());
        return;
    }
    let verb = match req {
        Request::BlockAdd { .. } => "blocked",
        Request::BlockDel { .. } => "unblocked",
        Request::AllowAdd { .. } => "allowed",
        Request::AllowDel { .. } => "no longer allowed",
        _ => "",
    };
    let Some(nets) = data.get("nets").and_then(|n| n.as_array()) else {
        return;
    };
    // Say whether the change reached a kernel.
    let note = match data.get("kernel").and_then(|k| k.as_str()) {
        Some("detached") => Some("the XDP gate is detached"),
        Some("no_xdp") => Some("the daemon runs without XDP (--no-xdp)"),
        _ => None,
    };
    let adding = matches!(req, Request::BlockAdd { .. } | Request::AllowAdd { .. });
    for net in nets.iter().filter_map(|n| n.as_str()) {
        match note {
            Some(note) if adding => println!("recorded {net}; {note}"),
            _ => println!("{verb} {net}"),
        }
    }
}

/// Prints nested JSON as `a.b = value` lines.
fn print_flat(prefix: &str, v: &serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                print_flat(&p, v);
            }
        }
        serde_json::Value::Null => {}
        other => println!("{prefix} = {other}"),
    }
}

fn config_cmd(path: Option<&PathBuf>, c: ConfigCmd) -> anyhow::Result<()> {
    let p = path
        .cloned()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
    match c {
        ConfigCmd::Check => {
            let cfg = Config::load(&p).with_context(|| format!("configuration {}", p.display()))?;
            daemon::privileges::Account::resolve(&cfg.daemon)
                .with_context(|| format!("configuration {}", p.display()))?;
            for w in cfg.warnings() {
                eprintln!("screener: warning: {w}");
            }
            println!("{}: ok", p.display());
        }
        ConfigCmd::Show {
            non_default,
            defaults,
            describe,
            names,
        } => {
            let cfg = if defaults && !p.exists() {
                Config::default()
            } else {
                Config::load(&p).with_context(|| format!("configuration {}", p.display()))?
            };
            let which = match (non_default, defaults) {
                (true, _) => Show::NonDefault,
                (_, true) => Show::Defaults,
                _ => Show::Effective,
            };
            let mut lines = config::show(&cfg, which, &names)?;
            if describe {
                lines = config::describe::describe_lines(&lines);
            }
            for line in lines {
                println!("{line}");
            }
        }
        ConfigCmd::Set { assignments } => {
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            let new = config::set(&text, &assignments)
                .with_context(|| format!("configuration {}", p.display()))?;
            // Write beside and rename: a crash never leaves half a file.
            let tmp = p.with_extension("toml.new");
            std::fs::write(&tmp, new).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &p).with_context(|| format!("replacing {}", p.display()))?;
        }
    }
    Ok(())
}

/// `store check` / `store repair`: they work on the file directly, so the
/// daemon must not hold it (both say so when it does).
fn store_cmd(cfg: &Config, s: &StoreCmd) -> anyhow::Result<()> {
    let path = &cfg.store.path;
    match s {
        StoreCmd::Check => {
            let report = store::salvage::check(path)?;
            println!("{report}");
            if let Some(problem) = report.problem() {
                bail!("store {} is {problem}", path.display());
            }
        }
        StoreCmd::Repair => {
            let pins = &cfg.xdp.pin_path;
            let pinned = if xdp::is_pinned(pins) {
                match verdict::pinned_verdicts(pins) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("not adopting the pinned verdicts: {e}");
                        store::salvage::Pinned::default()
                    }
                }
            } else {
                store::salvage::Pinned::default()
            };
            println!("{}", store::salvage::repair(path, &pinned)?);
        }
    }
    Ok(())
}

async fn xdp_cmd(cfg: &Config, x: XdpCmd) -> anyhow::Result<()> {
    match x {
        XdpCmd::Status { json } => {
            // From the daemon when it runs (it holds the links, which guard
            // even while a pin is missing), else from the pins alone.
            let asked = match admin::call(&cfg.admin.socket, &Request::XdpStatus).await {
                Ok(resp) if resp.ok => serde_json::from_value(resp.data).map_err(|e| e.to_string()),
                Ok(resp) => Err(resp.error.unwrap_or_default()),
                Err(admin::AdminError::NotRunning { .. }) => Err(String::new()),
                Err(e) => Err(e.to_string()),
            };
            let st = asked.unwrap_or_else(|why| {
                if !why.is_empty() {
                    eprintln!("the daemon gave no status ({why}); reading the pins");
                }
                xdp::status(&cfg.xdp.pin_path, &cfg.xdp.interfaces)
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
                return Ok(());
            }
            println!("pin path: {}", st.pin_path.display());
            if !st.pinned {
                println!("nothing pinned: the XDP gate is not loaded");
            }
            if let Some(l) = &st.layout {
                println!("layout: {l}");
            }
            for i in &st.interfaces {
                if i.attached {
                    println!(
                        "interface {}: attached (ifindex {}, link {}, program {})",
                        i.interface,
                        i.ifindex.unwrap_or(0),
                        i.link_id.unwrap_or(0),
                        i.program_id.unwrap_or(0)
                    );
                } else {
                    println!("interface {}: NOT GUARDED: {}", i.interface, i.state);
                }
            }
            for m in &st.maps {
                let n = m.entries.map_or_else(|| "-".into(), |n| n.to_string());
                println!(
                    "map {:<14} id {:<6} entries {n}/{}",
                    m.name, m.id, m.max_entries
                );
            }
        }
        XdpCmd::Detach => {
            // Through the daemon when it runs (it holds the gate), else
            // directly: a dead daemon must not leave the gate unremovable.
            match admin::call(&cfg.admin.socket, &Request::XdpDetach).await {
                Ok(resp) if resp.ok => println!("detached: {}", resp.data),
                Ok(resp) => bail!("{}", resp.error.unwrap_or_default()),
                Err(admin::AdminError::NotRunning { .. }) => {
                    let removed = xdp::detach(&cfg.xdp.pin_path)?;
                    if removed.is_empty() {
                        println!("nothing pinned under {}", cfg.xdp.pin_path.display());
                    } else {
                        println!("detached: {}", removed.join(", "));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}
