//! Where the daemon's log lines go, and in which shape.
//!
//! The output chooses itself: under systemd (its journal stream on our
//! stderr, as `JOURNAL_STREAM` says) events go to journald as native
//! entries with `SYSLOG_IDENTIFIER` and facility mail; on a terminal they
//! are coloured; anywhere else they are plain text. `log.format =
//! "postscreen"` writes every line as postscreen writes its own —
//! identifier `postfix/postscreen` (`postfix/dnsblog` for list answers),
//! the bare text, nothing appended — so pflogsumm, Logwatch and fail2ban's
//! `postfix` filter read them unchanged.
//!
//! THREE PROGRAMS. A Postfix installation logs a client's screening under
//! postscreen, list answers under dnsblog, and its own housekeeping under
//! master and friends. The daemon's lines split the same way: a line
//! about one client (an event with a `client` field) is a postscreen
//! line, a [`DNSBLOG_TARGET`] line a dnsblog line, and anything else
//! (start-up, XDP, the store, imports) the daemon's own, which under
//! `format = "postscreen"` keeps the identifier `screener`: postscreen
//! has no such lines, and a parser that knows postscreen's would count
//! them as unknown.

use std::{
    fmt,
    io::IsTerminal as _,
    sync::atomic::{AtomicBool, Ordering},
};

use serde::{Deserialize, Serialize};
use tracing::{Event, Subscriber};
use tracing_subscriber::{
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields},
    layer::SubscriberExt as _,
    registry::LookupSpan,
    util::SubscriberInitExt as _,
    EnvFilter, Layer as _,
};

/// The target of the `dnsblog`-style list answer lines, which postscreen
/// writes under its own program name.
pub const DNSBLOG_TARGET: &str = "screener::dnsblog";

/// The field that makes an event a line about one client.
pub const CLIENT_FIELD: &str = "client";

/// Syslog facility "mail" (2), as journald's `SYSLOG_FACILITY` wants it.
const FACILITY_MAIL: &str = "2";

/// Which program of a Postfix installation a line stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// A client's screening: postscreen's lines.
    Postscreen,
    /// A DNS list's answer: dnsblog's lines.
    Dnsblog,
    /// The daemon's own housekeeping.
    Daemon,
}

impl Program {
    /// The program `m`'s lines belong to.
    pub fn of(m: &tracing::Metadata<'_>) -> Program {
        if m.target() == DNSBLOG_TARGET {
            Program::Dnsblog
        } else if m.fields().field(CLIENT_FIELD).is_some() {
            Program::Postscreen
        } else {
            Program::Daemon
        }
    }
}

/// `log.format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Journald under systemd, colour on a terminal, plain text otherwise.
    #[default]
    Auto,
    /// postscreen's own lines, for the tools that parse Postfix logs.
    Postscreen,
}

/// `[log]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The shape of the lines.
    pub format: Format,
    /// The syslog identifier of SMTP and daemon lines; empty means
    /// `screener`, or `postfix/postscreen` under `format = "postscreen"`.
    pub identifier: String,
    /// The identifier of DNSBL answer lines; empty means the same as
    /// `identifier`, or `postfix/dnsblog` under `format = "postscreen"`.
    pub dnsblog_identifier: String,
    /// `ALLOWLISTED`/`DENYLISTED` (Postfix 3.6 on) rather than
    /// `WHITELISTED`/`BLACKLISTED`, which older log parsers know.
    pub respectful_logging: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            format: Format::Auto,
            identifier: String::new(),
            dnsblog_identifier: String::new(),
            // As Postfix's own default from compatibility level 3.6.
            respectful_logging: true,
        }
    }
}

impl Settings {
    /// The identifier of ordinary lines.
    pub fn identifier(&self) -> &str {
        match (self.identifier.as_str(), self.format) {
            ("", Format::Postscreen) => "postfix/postscreen",
            ("", Format::Auto) => "screener",
            (id, _) => id,
        }
    }

    /// The identifier of DNSBL answer lines.
    pub fn dnsblog_identifier(&self) -> &str {
        match (self.dnsblog_identifier.as_str(), self.format) {
            ("", Format::Postscreen) => "postfix/dnsblog",
            ("", Format::Auto) => self.identifier(),
            (id, _) => id,
        }
    }

    /// The identifier of the daemon's own lines: `screener` beside
    /// postscreen's, else the same as the others.
    pub fn daemon_identifier(&self) -> &str {
        match self.format {
            Format::Postscreen => "screener",
            Format::Auto => self.identifier(),
        }
    }

    /// The identifier of `program`'s lines.
    pub fn identifier_of(&self, program: Program) -> &str {
        match program {
            Program::Postscreen => self.identifier(),
            Program::Dnsblog => self.dnsblog_identifier(),
            Program::Daemon => self.daemon_identifier(),
        }
    }

    /// Checks what serde cannot; `Err((key, value, reason))`.
    pub fn check(&self) -> Result<(), (&'static str, String, String)> {
        for (key, v) in [
            ("log.identifier", &self.identifier),
            ("log.dnsblog_identifier", &self.dnsblog_identifier),
        ] {
            if v.len() > 64
                || v.bytes()
                    .any(|b| !b.is_ascii_graphic() || b == b'[' || b == b':')
            {
                return Err((
                    key,
                    v.clone(),
                    "up to 64 printable characters without spaces, '[' or ':' (syslog would split the line there)".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Where the lines go, decided from the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    /// journald's native protocol.
    Journald,
    /// stderr, with colour.
    Terminal,
    /// stderr, plain.
    Plain,
}

/// Whether our stderr is the journal stream systemd gave us:
/// `JOURNAL_STREAM` is `device:inode` of that stream, and a redirection
/// of stderr (to a file, a pipe) no longer matches it.
pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fd 2 and a buffer of the right type.
    if unsafe { libc::fstat(2, st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat succeeded and filled it.
    let st = unsafe { st.assume_init() };
    st.st_dev == dev && st.st_ino == ino
}

/// The sink for this process.
pub fn sink() -> Sink {
    if stderr_is_journal() {
        Sink::Journald
    } else if std::io::stderr().is_terminal() {
        Sink::Terminal
    } else {
        Sink::Plain
    }
}

/// The level filter: `RUST_LOG`, else `info`; the resolver's debug events
/// name the queries it sends, which would print a paid DNSBL feed's
/// secret domain.
fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive("hickory_proto=info".parse().expect("valid directive"))
        .add_directive("hickory_resolver=info".parse().expect("valid directive"))
}

/// Installs the global subscriber for `settings`, as `screener run`
/// does once its configuration is loaded. Falls back to stderr, saying
/// so, when journald cannot be reached.
pub fn init(settings: &Settings) {
    RESPECTFUL.store(settings.respectful_logging, Ordering::Relaxed);
    let sink = sink();
    let journald = (sink == Sink::Journald)
        .then(|| {
            let layer = |program: Program| {
                tracing_journald::layer()
                    .map(|l| {
                        l.with_syslog_identifier(settings.identifier_of(program).to_owned())
                            .with_custom_fields([("SYSLOG_FACILITY", FACILITY_MAIL)])
                    })
                    .map_err(|e| e.to_string())
            };
            Ok::<_, String>([
                layer(Program::Postscreen)?,
                layer(Program::Dnsblog)?,
                layer(Program::Daemon)?,
            ])
        })
        .transpose();
    let registry = tracing_subscriber::registry().with(filter());
    match journald {
        Ok(Some([screen, dnsblog, daemon])) => {
            let only = |program: Program| {
                tracing_subscriber::filter::filter_fn(move |m| Program::of(m) == program)
            };
            registry
                .with(screen.with_filter(only(Program::Postscreen)))
                .with(dnsblog.with_filter(only(Program::Dnsblog)))
                .with(daemon.with_filter(only(Program::Daemon)))
                .init();
        }
        other => {
            let fmt = tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(sink == Sink::Terminal);
            match settings.format {
                Format::Postscreen => registry
                    .with(fmt.event_format(Syslog::new(settings)))
                    .init(),
                Format::Auto => registry.with(fmt).init(),
            }
            if let Err(e) = other {
                tracing::warn!("journald unreachable ({e}); logging to stderr");
            }
        }
    }
    // aya-log speaks `log`; carry its records into tracing.
    let _ = tracing_log::LogTracer::init();
}

/// Installs the subscriber of the admin commands: text on stderr,
/// coloured on a terminal. They run beside the daemon, not under it, so
/// neither journald nor the `[log]` section applies.
pub fn init_stderr() {
    tracing_subscriber::registry()
        .with(filter())
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    let _ = tracing_log::LogTracer::init();
}

/// `log.respectful_logging`, for the lines that name the lists.
static RESPECTFUL: AtomicBool = AtomicBool::new(true);

/// The keyword of a client on the permanent allowlist: `ALLOWLISTED`, or
/// `WHITELISTED` for parsers older than Postfix 3.6.
pub fn allowlisted() -> &'static str {
    if RESPECTFUL.load(Ordering::Relaxed) {
        "ALLOWLISTED"
    } else {
        "WHITELISTED"
    }
}

/// The keyword of a client on the permanent denylist: `DENYLISTED`, or
/// `BLACKLISTED` for parsers older than Postfix 3.6.
pub fn denylisted() -> &'static str {
    if RESPECTFUL.load(Ordering::Relaxed) {
        "DENYLISTED"
    } else {
        "BLACKLISTED"
    }
}

/// A time since the connection began as postscreen prints it (Postfix's
/// `format_tv` with two significant digits and at most two decimals):
/// `0.05`, `1.3`, `6`, `12`; trailing zeros left out.
pub struct Delta(pub std::time::Duration);

impl fmt::Display for Delta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MILLION: u64 = 1_000_000;
        // Two significant digits, two decimals at most.
        const WID: u64 = 100;
        let mut sec = self.0.as_secs();
        let mut usec = u64::from(self.0.subsec_micros());
        let mut ures = MILLION / 100;
        if sec > 0 {
            let mut n = 1;
            while sec >= n && n <= WID / 10 {
                n *= 10;
            }
            ures = (MILLION / WID) * n;
        } else {
            while usec >= WID * ures {
                ures *= 10;
            }
        }
        if ures > 1 {
            usec += ures / 2;
            if usec >= MILLION {
                sec += 1;
                usec -= MILLION;
            }
        }
        write!(f, "{sec}")?;
        if usec >= ures {
            f.write_str(".")?;
            let (mut rem, mut n) = (usec, MILLION / 10);
            while rem >= ures && n > 0 {
                write!(f, "{}", rem / n)?;
                rem %= n;
                n /= 10;
            }
        }
        Ok(())
    }
}

/// Lines as syslog writes postscreen's: `Mon dd hh:mm:ss host
/// identifier[pid]: text`, local time, the event's text and nothing else;
/// warnings and errors start `warning: ` and `error: `, as Postfix's own.
pub struct Syslog {
    /// This host's short name, as syslog writes it.
    host: String,
    /// The identifiers of postscreen, dnsblog and daemon lines.
    identifiers: [String; 3],
    /// Ours.
    pid: u32,
}

impl Syslog {
    pub fn new(settings: &Settings) -> Syslog {
        let host = crate::cluster::settings::hostname();
        let host = host.split('.').next().unwrap_or("localhost").to_owned();
        Syslog {
            host,
            identifiers: [Program::Postscreen, Program::Dnsblog, Program::Daemon]
                .map(|p| settings.identifier_of(p).to_owned()),
            pid: std::process::id(),
        }
    }

    /// One line's prefix, for `now` seconds since the epoch.
    fn prefix(&self, now: i64, program: Program, level: tracing::Level) -> String {
        let ident = &self.identifiers[program as usize];
        let severity = match level {
            tracing::Level::ERROR => "error: ",
            tracing::Level::WARN => "warning: ",
            _ => "",
        };
        format!(
            "{} {} {ident}[{}]: {severity}",
            syslog_time(now),
            self.host,
            self.pid
        )
    }
}

/// `Mon dd hh:mm:ss` in local time, day space-padded as syslog pads it.
fn syslog_time(now: i64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut tm = std::mem::MaybeUninit::<libc::tm>::zeroed();
    let t: libc::time_t = now;
    // SAFETY: valid pointers; localtime_r fills `tm`.
    let ok = !unsafe { libc::localtime_r(&raw const t, tm.as_mut_ptr()) }.is_null();
    // SAFETY: zero-initialised, and filled when `ok`.
    let tm = unsafe { tm.assume_init() };
    if !ok {
        return "Jan  1 00:00:00".into();
    }
    let month = usize::try_from(tm.tm_mon).unwrap_or(0).min(11);
    format!(
        "{} {:>2} {:02}:{:02}:{:02}",
        MONTHS[month], tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec
    )
}

/// Collects only an event's message.
struct Message<'a>(&'a mut String);

impl tracing::field::Visit for Message<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            use fmt::Write as _;
            let _ = write!(self.0, "{value:?}");
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }
}

impl<S, N> FormatEvent<S, N> for Syslog
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
        let mut text = String::new();
        event.record(&mut Message(&mut text));
        // One event, one line: a line break inside would start a line a
        // log parser reads as something else.
        let text = text.replace(['\r', '\n'], " ");
        let m = event.metadata();
        writeln!(
            writer,
            "{}{text}",
            self.prefix(now, Program::of(m), *m.level())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postscreen_format_names_postfix_programs() {
        let s = Settings {
            format: Format::Postscreen,
            ..Settings::default()
        };
        assert_eq!(s.identifier(), "postfix/postscreen");
        assert_eq!(s.dnsblog_identifier(), "postfix/dnsblog");
        assert_eq!(s.daemon_identifier(), "screener");
        let auto = Settings::default();
        assert_eq!(auto.identifier(), "screener");
        assert_eq!(auto.dnsblog_identifier(), "screener");
        let named = Settings {
            identifier: "mx-in".into(),
            ..Settings::default()
        };
        for p in [Program::Postscreen, Program::Dnsblog, Program::Daemon] {
            assert_eq!(named.identifier_of(p), "mx-in");
        }
        let own = Settings {
            format: Format::Postscreen,
            identifier: "postfix-in/postscreen".into(),
            dnsblog_identifier: String::new(),
            ..Settings::default()
        };
        assert_eq!(own.identifier(), "postfix-in/postscreen");
    }

    #[test]
    fn identifiers_that_would_split_a_syslog_line_are_refused() {
        for bad in ["post fix", "a[1]", "x:y", &"y".repeat(65)] {
            let s = Settings {
                identifier: bad.into(),
                ..Settings::default()
            };
            assert_eq!(s.check().unwrap_err().0, "log.identifier", "{bad}");
        }
        assert!(Settings::default().check().is_ok());
    }

    #[test]
    fn the_config_file_refuses_bad_log_values_naming_the_key() {
        use crate::config::{Config, ConfigError};
        let key_of = |text: &str| match Config::from_toml(text) {
            Err(ConfigError::Value { key, .. } | ConfigError::UnknownKey { key }) => key,
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(key_of("[log]\nformat = \"json\""), "log.format");
        assert_eq!(key_of("[log]\nidentifier = \"mail in\""), "log.identifier");
        assert_eq!(
            key_of("[log]\ndnsblog_identifier = \"x:y\""),
            "log.dnsblog_identifier"
        );
        assert_eq!(key_of("[log]\ncolour = true"), "log.colour");
        let cfg = Config::from_toml(
            "[log]\nformat = \"postscreen\"\nidentifier = \"postfix-in/postscreen\"\nrespectful_logging = false",
        )
        .expect("a good [log] section");
        assert_eq!(cfg.log.format, Format::Postscreen);
        assert_eq!(cfg.log.identifier(), "postfix-in/postscreen");
        assert_eq!(cfg.log.dnsblog_identifier(), "postfix/dnsblog");
        assert!(!cfg.log.respectful_logging);
    }

    #[test]
    fn delays_print_as_postfix_format_tv_prints_them() {
        // Postfix's own format_tv test cases at 2 significant digits and
        // a 2-digit limit (postscreen's delay_logging_resolution_limit).
        for (ms, want) in [
            (0, "0"),
            (4, "0"),
            (5, "0.01"),
            (50, "0.05"),
            (123, "0.12"),
            (999, "1"),
            (1_260, "1.3"),
            (6_000, "6"),
            (6_040, "6"),
            (12_345, "12"),
            (99_600, "100"),
        ] {
            let got = Delta(std::time::Duration::from_millis(ms)).to_string();
            assert_eq!(got, want, "{ms} ms");
        }
    }

    #[test]
    fn the_prefix_is_syslogs() {
        let s = Syslog {
            host: "mx1".into(),
            identifiers: [
                "postfix/postscreen".into(),
                "postfix/dnsblog".into(),
                "screener".into(),
            ],
            pid: 4242,
        };
        let info = tracing::Level::INFO;
        let p = s.prefix(0, Program::Postscreen, info);
        let re_like = p.split(' ').filter(|w| !w.is_empty()).collect::<Vec<_>>();
        assert_eq!(re_like.len(), 5, "{p:?}");
        assert!(p.ends_with(" mx1 postfix/postscreen[4242]: "), "{p:?}");
        assert!(s
            .prefix(0, Program::Dnsblog, info)
            .ends_with(" mx1 postfix/dnsblog[4242]: "));
        assert!(s
            .prefix(0, Program::Daemon, tracing::Level::WARN)
            .ends_with(" mx1 screener[4242]: warning: "));
        // `Mon dd hh:mm:ss` with a space-padded day.
        let t = syslog_time(1_700_000_000);
        assert_eq!(t.len(), 15, "{t:?}");
        assert_eq!(&t[3..4], " ");
    }
}
