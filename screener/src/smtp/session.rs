//! One client's screening, as a state machine fed with bytes and time.
//!
//! The session never touches a socket or a clock: the connection loop
//! hands it what the client sent ([`Session::input`]), tells it when its
//! [`Session::deadline`] has come ([`Session::timeout`]), passes on the
//! DNSBL score ([`Session::dnsbl`]) and the end of input
//! ([`Session::eof`]), and carries out the [`Output`]s it gets back in
//! order. Unit tests drive it the same way from byte strings, with tokio's
//! paused clock.
//!
//! PHASES. Early: the `220-` teaser goes out and the client must stay
//! silent for `greet_wait` while the DNSBL query runs; whatever it says
//! anyway is kept (bounded) for the next stage, as postscreen leaves it in
//! the socket. Deep: a dummy SMTP engine that never takes mail reads that
//! first, then watches for pipelining, non-SMTP commands and bare newlines
//! until the client reaches RCPT TO (or STARTTLS). Then the client is
//! handed to the backend, with its early bytes when it goes there straight
//! from the early phase (or, in reconnect mode, told to come back).
//!
//! FAILURE ACTIONS. `drop` answers with the test's 5xx and hangs up;
//! `enforce` lets the dialogue go on and rejects every RCPT TO; `ignore`
//! only logs. Any failure keeps the client off the temporary allowlist.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::command::{self, Verb};
use super::params::{Action, DeepTest, Handoff, Params};
use super::text::{escape, Peer};
use super::{FailedTest, Test};

/// The DNSBL outcome the session needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsblScore {
    /// Sum of the weights of the matching sites.
    pub score: i32,
    /// Lifetime of the answers (clamped by the session).
    pub ttl: Duration,
    /// The listing site with the largest weight, for the reject reply.
    pub top_site: Option<String>,
}

/// What the session wants from the backend when it lets a client through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Straight after the early phase: the backend's greeting completes
    /// ours, `early` follows it to the backend, then the two sides are
    /// spliced.
    Greeting {
        /// Whole command lines the client sent before it was greeted, in
        /// order: the backend reads them as the client's first commands.
        early: Vec<u8>,
    },
    /// After the deep tests: replay these command lines (CRLF excluded),
    /// answer the client's RCPT with the backend's reply, send `rest`, splice.
    Replay {
        /// The last HELO/EHLO line.
        helo: Vec<u8>,
        /// The MAIL FROM line, parameters included.
        mail: Vec<u8>,
        /// The RCPT TO line.
        rcpt: Vec<u8>,
        /// Client bytes already read past the RCPT line.
        rest: Vec<u8>,
    },
    /// The client asked for STARTTLS: replay the EHLO, send STARTTLS and
    /// answer the client with the backend's reply, so TLS runs end to end.
    StartTls {
        /// The last EHLO line.
        ehlo: Vec<u8>,
        /// The STARTTLS line as sent.
        starttls: Vec<u8>,
    },
}

/// Something the connection loop must do, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Write these bytes to the client.
    Send(Vec<u8>),
    /// Hang up once everything before has been written.
    Close,
    /// The client failed a test: clear its cache record, and report it
    /// for a kernel block unless the action is `ignore`.
    Fail {
        /// Which test.
        test: FailedTest,
        /// The configured action for that test.
        action: Action,
    },
    /// The client passed these tests (`PASS NEW`): store the pass
    /// lifetimes; tests with `None` keep their cached expiry.
    Pass([Option<Duration>; Test::COUNT]),
    /// Open the backend connection and follow the plan.
    Handoff(Plan),
}

/// Which tests still have to run for this client: enabled, and without an
/// unexpired pass in the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Todo(pub [bool; Test::COUNT]);

impl Plan {
    /// Client bytes the backend gets once the plan is carried out, before
    /// the two sides are spliced.
    pub fn client_bytes(&self) -> &[u8] {
        match self {
            Plan::Greeting { early } => early,
            Plan::Replay { rest, .. } => rest,
            Plan::StartTls { .. } => &[],
        }
    }
}

impl Todo {
    /// Every test (a client never seen before).
    pub const ALL: Todo = Todo([true; Test::COUNT]);

    fn has(self, t: Test) -> bool {
        self.0[t.index()]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting out the greet wait.
    Early { until: Instant },
    /// The dummy SMTP engine.
    Deep,
    /// Handed to the backend; no more client input for the session.
    HandedOff,
    /// Hung up (or about to).
    Closed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Dnsbl {
    Off,
    Pending,
    Done(DnsblScore),
}

/// One client's screening state.
pub struct Session {
    /// Snapshot of the parameters at connect time.
    p: Arc<Params>,
    /// The client, for logs and replies.
    client: SocketAddr,
    /// When the session started, for "after N s" in logs.
    started: Instant,
    /// Tests to run this time.
    todo: Todo,
    /// Where we are.
    state: State,
    /// DNSBL progress.
    dnsbl: Dnsbl,
    /// Tests failed in this session, whatever the action.
    failed: [bool; Test::COUNT],
    /// Pass lifetimes gathered so far.
    passed: [Option<Duration>; Test::COUNT],
    /// Reply to every RCPT TO after an `enforce` failure.
    reject: Option<String>,
    /// Client input not yet consumed as lines: what it sent before the
    /// greeting (bounded), then the deep phase's input.
    inbuf: Vec<u8>,
    /// Input sent before the greeting went past the bound and the excess
    /// was thrown away: only whole lines of what was kept are used.
    early_cut: bool,
    /// Command lines seen in the deep phase.
    commands: u32,
    /// The whole next command line must arrive before this.
    command_deadline: Instant,
    /// Time allowed for one command line: the parameter's, or the stress
    /// value once stress mode reached this session.
    command_time_limit: Duration,
    /// The previous command's verb, for "after X" in logs.
    last: &'static str,
    /// The last HELO/EHLO line, for the replay.
    helo: Option<Vec<u8>>,
    /// Whether that was EHLO.
    esmtp: bool,
    /// The MAIL FROM line of the open transaction.
    mail: Option<Vec<u8>>,
    /// Pending outputs.
    out: Vec<Output>,
}

impl Session {
    /// A session for `client` with the tests in `todo` still to run.
    pub fn new(p: Arc<Params>, client: SocketAddr, mut todo: Todo, now: Instant) -> Session {
        todo.0[Test::Pregreet.index()] &= !p.greet_banner.is_empty();
        todo.0[Test::Dnsbl.index()] &= p.dnsbl_enable;
        todo.0[Test::Pipelining.index()] &= p.pipelining.enable;
        todo.0[Test::NonSmtpCommand.index()] &= p.non_smtp_command.enable;
        todo.0[Test::BareNewline.index()] &= p.bare_newline.enable;
        let command_time_limit = p.command_time_limit;
        let command_deadline = now + command_time_limit;
        Session {
            p,
            client,
            started: now,
            todo,
            state: State::Closed,
            dnsbl: Dnsbl::Off,
            failed: [false; Test::COUNT],
            passed: [None; Test::COUNT],
            reject: None,
            inbuf: Vec::new(),
            early_cut: false,
            commands: 0,
            command_deadline,
            command_time_limit,
            last: "CONNECT",
            helo: None,
            esmtp: false,
            mail: None,
            out: Vec::new(),
        }
    }

    /// Starts screening: the teaser, the greet wait, or straight on.
    pub fn start(&mut self, now: Instant) -> Vec<Output> {
        let pregreet = self.todo.has(Test::Pregreet);
        let dnsbl = self.todo.has(Test::Dnsbl);
        if dnsbl {
            self.dnsbl = Dnsbl::Pending;
        }
        if pregreet || dnsbl {
            if !self.p.greet_banner.is_empty() {
                self.send(format!("220-{}\r\n", self.p.greet_banner));
            }
            self.state = State::Early {
                until: now + self.p.greet_wait,
            };
        } else {
            self.state = State::Early { until: now };
            self.finish_early(now);
        }
        self.take()
    }

    /// Whether the loop should run a DNSBL query now, and until when its
    /// answer counts.
    pub fn dnsbl_deadline(&self) -> Option<Instant> {
        match (&self.dnsbl, self.state) {
            (Dnsbl::Pending, State::Early { until }) => Some(until),
            _ => None,
        }
    }

    /// When the loop must call [`Session::timeout`], if ever.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Early { until } => Some(until),
            State::Deep => Some(self.command_deadline),
            State::HandedOff | State::Closed => None,
        }
    }

    /// Whether the session still wants client input.
    pub fn is_screening(&self) -> bool {
        matches!(self.state, State::Early { .. } | State::Deep)
    }

    /// Whether the client failed no test in this session so far.
    pub fn clean(&self) -> bool {
        !self.failed.iter().any(|&f| f)
    }

    /// Bytes from the client.
    pub fn input(&mut self, bytes: &[u8], now: Instant) -> Vec<Output> {
        match self.state {
            State::Early { .. } => {
                self.keep_early(bytes);
                self.pregreet(bytes, now);
            }
            State::Deep => {
                self.inbuf.extend_from_slice(bytes);
                self.lines(now);
            }
            State::HandedOff | State::Closed => {}
        }
        self.take()
    }

    /// The deadline from [`Session::deadline`] has come.
    pub fn timeout(&mut self, now: Instant) -> Vec<Output> {
        match self.state {
            State::Early { until } if now >= until => self.finish_early(now),
            State::Deep if now >= self.command_deadline => {
                tracing::info!(
                    client = %Peer(self.client),
                    "COMMAND TIME LIMIT from {} after {}",
                    Peer(self.client),
                    self.last
                );
                self.send(format!(
                    "421 4.4.2 {} Error: timeout exceeded\r\n",
                    self.p.hostname
                ));
                self.close();
            }
            _ => {}
        }
        self.take()
    }

    /// Stress mode began: this session gets the stress deadlines too. Its
    /// greet wait ends no later than `stress_greet_wait` from now, and each
    /// command line (the one under way included) gets at most
    /// `stress_command_time_limit`. Leaving stress mode does not lengthen
    /// them again.
    pub fn stress(&mut self, now: Instant) {
        self.command_time_limit = self
            .command_time_limit
            .min(self.p.stress_command_time_limit);
        match &mut self.state {
            State::Early { until } => {
                *until = (*until).min(now + self.p.stress_greet_wait);
            }
            State::Deep => {
                self.command_deadline = self.command_deadline.min(now + self.command_time_limit);
            }
            State::HandedOff | State::Closed => {}
        }
    }

    /// The DNSBL score arrived.
    pub fn dnsbl(&mut self, score: DnsblScore, now: Instant) -> Vec<Output> {
        if self.dnsbl == Dnsbl::Pending && matches!(self.state, State::Early { .. }) {
            let allowlisted = self.p.dnsbl_allowlist_threshold < 0
                && score.score <= self.p.dnsbl_allowlist_threshold;
            self.dnsbl = Dnsbl::Done(score);
            // Without a pregreet to watch for, or for a DNSWL-listed client,
            // waiting out the greet wait gains nothing.
            if allowlisted || !self.todo.has(Test::Pregreet) {
                self.finish_early(now);
            }
        }
        self.take()
    }

    /// The client closed its side.
    pub fn eof(&mut self, now: Instant) -> Vec<Output> {
        let phase = match self.state {
            State::Early { .. } => "tests before SMTP handshake",
            State::Deep => "tests after SMTP handshake",
            State::HandedOff | State::Closed => return self.take(),
        };
        tracing::info!(
            client = %Peer(self.client),
            "HANGUP after {:.2} from {} in {}",
            self.elapsed(now),
            Peer(self.client),
            phase
        );
        self.close();
        self.take()
    }

    fn elapsed(&self, now: Instant) -> f64 {
        now.saturating_duration_since(self.started).as_secs_f64()
    }

    fn take(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    fn send(&mut self, line: String) {
        self.out.push(Output::Send(line.into_bytes()));
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.out.push(Output::Close);
    }

    /// Records a failure and carries out its action.
    fn fail(&mut self, test: Test, action: Action, drop_reply: &str, enforce_reply: &str) {
        self.failed[test.index()] = true;
        self.passed[test.index()] = None;
        self.out.push(Output::Fail {
            test: test.into(),
            action,
        });
        match action {
            Action::Drop => {
                self.send(format!("{drop_reply}\r\n"));
                self.close();
            }
            Action::Enforce => {
                self.reject.get_or_insert_with(|| enforce_reply.to_owned());
            }
            Action::Ignore => {}
        }
    }

    /// Keeps what the client sent before its greeting, as postscreen leaves
    /// it in the socket for the next stage: the dummy engine reads it as the
    /// first commands after our `220 `, or the backend after its own.
    /// Bounded by one longest command line with its CRLF: a client that
    /// talks that much before being greeted is a bot, not a slow sender.
    fn keep_early(&mut self, bytes: &[u8]) {
        let room = (self.p.line_length_limit + 2).saturating_sub(self.inbuf.len());
        if bytes.len() > room {
            self.early_cut = true;
        }
        self.inbuf
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// At the end of the early phase: after a cut only the whole lines
    /// before it are kept, since a line's head would join whatever the
    /// client sends next. When not even one line ended before the cut, the
    /// bytes stay as they are: the dummy engine refuses them as a command
    /// too long, and the backend never gets them.
    fn trim_early(&mut self) {
        if !self.early_cut {
            return;
        }
        let kept = self
            .inbuf
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        tracing::debug!(
            client = %Peer(self.client),
            "early input from {} over {} bytes: {kept} bytes of whole lines kept",
            Peer(self.client),
            self.p.line_length_limit + 2
        );
        if kept > 0 {
            self.inbuf.truncate(kept);
        }
    }

    fn pregreet(&mut self, bytes: &[u8], now: Instant) {
        // No teaser was sent (only the DNSBL is awaited): nothing to judge.
        // Only the first burst is logged and judged.
        if self.p.greet_banner.is_empty() || self.failed[Test::Pregreet.index()] {
            return;
        }
        tracing::info!(
            client = %Peer(self.client),
            "PREGREET {} after {:.2} from {}: {}",
            bytes.len(),
            self.elapsed(now),
            Peer(self.client),
            escape(bytes)
        );
        self.fail(
            Test::Pregreet,
            self.p.greet_action,
            "521 5.5.1 Protocol error",
            "550 5.5.1 Protocol error",
        );
    }

    fn finish_early(&mut self, now: Instant) {
        if self.todo.has(Test::Pregreet) && !self.failed[Test::Pregreet.index()] {
            self.passed[Test::Pregreet.index()] = Some(self.p.greet_ttl);
        }
        let mut dnswl = false;
        match std::mem::replace(&mut self.dnsbl, Dnsbl::Off) {
            Dnsbl::Done(score) if score.score >= self.p.dnsbl_threshold => {
                tracing::info!(
                    client = %Peer(self.client),
                    "DNSBL rank {} for {}",
                    score.score,
                    Peer(self.client)
                );
                let site = score.top_site.as_deref().unwrap_or("a DNS blocklist");
                let text = format!(
                    "5.7.1 Service unavailable; client [{}] blocked using {site}",
                    self.client.ip()
                );
                self.fail(
                    Test::Dnsbl,
                    self.p.dnsbl_action,
                    &format!("521 {text}"),
                    &format!("550 {text}"),
                );
            }
            Dnsbl::Done(score) => {
                let ttl = score.ttl.clamp(self.p.dnsbl_min_ttl, self.p.dnsbl_max_ttl);
                self.passed[Test::Dnsbl.index()] = Some(ttl);
                dnswl = self.p.dnsbl_allowlist_threshold < 0
                    && score.score <= self.p.dnsbl_allowlist_threshold;
            }
            Dnsbl::Pending => {
                // Answers after the greet wait don't count; the test stays
                // to do, so the client is not allowlisted on it.
                tracing::debug!(client = %Peer(self.client), "DNSBL incomplete for {}", Peer(self.client));
            }
            Dnsbl::Off => {}
        }
        if self.state == State::Closed {
            return;
        }
        self.trim_early();
        let deep = self.todo.has(Test::Pipelining)
            || self.todo.has(Test::NonSmtpCommand)
            || self.todo.has(Test::BareNewline);
        if !dnswl && (deep || self.reject.is_some()) {
            self.send(format!("220 {} ESMTP\r\n", self.p.hostname));
            self.state = State::Deep;
            self.command_deadline = now + self.command_time_limit;
            // What the client said before it was greeted comes first.
            self.lines(now);
        } else {
            // After a cut only whole lines go to the backend: the head of
            // one longer than the bound would merge with what follows.
            let mut early = std::mem::take(&mut self.inbuf);
            if self.early_cut && !early.contains(&b'\n') {
                early.clear();
            }
            self.pass_and_handoff(Plan::Greeting { early }, "");
        }
    }

    /// Records the passes (`PASS NEW`, with `note` after the client in the
    /// log line) and hands the client over.
    fn pass_and_handoff(&mut self, plan: Plan, note: &str) {
        if self.clean() && self.passed.iter().any(Option::is_some) {
            tracing::info!(client = %Peer(self.client), "PASS NEW {}{note}", Peer(self.client));
            self.out.push(Output::Pass(self.passed));
        }
        self.state = State::HandedOff;
        self.out.push(Output::Handoff(plan));
    }

    /// Runs every complete command line in the input buffer.
    fn lines(&mut self, now: Instant) {
        while self.state == State::Deep {
            let Some(nl) = self.inbuf.iter().position(|&b| b == b'\n') else {
                if self.inbuf.len() > self.p.line_length_limit {
                    self.length_limit();
                }
                return;
            };
            let bare = nl == 0 || self.inbuf[nl - 1] != b'\r';
            let end = if bare { nl } else { nl - 1 };
            if end > self.p.line_length_limit {
                self.length_limit();
                return;
            }
            let mut line: Vec<u8> = self.inbuf.drain(..=nl).collect();
            line.truncate(end);
            self.line(&line, bare, now);
        }
    }

    fn length_limit(&mut self) {
        tracing::info!(
            client = %Peer(self.client),
            "COMMAND LENGTH LIMIT from {} after {}",
            Peer(self.client),
            self.last
        );
        self.send(format!(
            "421 4.5.0 {} Error: command too long\r\n",
            self.p.hostname
        ));
        self.close();
    }

    fn deep_fail(&mut self, test: Test, t: DeepTest, drop_reply: &str) {
        self.fail(test, t.action, drop_reply, "550 5.5.1 Protocol error");
    }

    fn line(&mut self, line: &[u8], bare: bool, now: Instant) {
        self.commands += 1;
        if self.commands > self.p.command_count_limit {
            tracing::info!(
                client = %Peer(self.client),
                "COMMAND COUNT LIMIT from {} after {}",
                Peer(self.client),
                self.last
            );
            self.send(format!(
                "421 4.7.0 {} Error: too many commands\r\n",
                self.p.hostname
            ));
            self.close();
            return;
        }
        if bare && self.p.bare_newline.enable && !self.failed[Test::BareNewline.index()] {
            tracing::info!(
                client = %Peer(self.client),
                "BARE NEWLINE from {} after {}",
                Peer(self.client),
                self.last
            );
            self.deep_fail(
                Test::BareNewline,
                self.p.bare_newline,
                "521 5.5.1 Protocol error",
            );
            if self.state == State::Closed {
                return;
            }
        }
        if self.p.non_smtp_command.enable && !self.failed[Test::NonSmtpCommand.index()] {
            if let Some(kind) = command::non_smtp(line, &self.p.forbidden_commands) {
                tracing::info!(
                    client = %Peer(self.client),
                    kind = ?kind,
                    "NON-SMTP COMMAND from {} after {}: {}",
                    Peer(self.client),
                    self.last,
                    escape(line)
                );
                self.deep_fail(
                    Test::NonSmtpCommand,
                    self.p.non_smtp_command,
                    "521 5.7.0 Error: I can break rules, too. Goodbye.",
                );
                if self.state == State::Closed {
                    return;
                }
            }
        }
        if !self.inbuf.is_empty()
            && self.p.pipelining.enable
            && !self.failed[Test::Pipelining.index()]
        {
            tracing::info!(
                client = %Peer(self.client),
                "COMMAND PIPELINING from {} after {}: {}",
                Peer(self.client),
                verb_name(command::parse(line).verb),
                escape(&self.inbuf)
            );
            self.deep_fail(
                Test::Pipelining,
                self.p.pipelining,
                "521 5.5.1 Protocol error",
            );
            if self.state == State::Closed {
                return;
            }
        }
        self.command(line);
        self.command_deadline = now + self.command_time_limit;
    }

    fn command(&mut self, line: &[u8]) {
        let c = command::parse(line);
        self.last = verb_name(c.verb);
        match c.verb {
            Verb::Helo | Verb::Ehlo if c.args.is_empty() => {
                self.send(format!("501 5.5.4 Syntax: {} hostname\r\n", self.last));
            }
            Verb::Helo => {
                self.helo = Some(line.to_vec());
                self.esmtp = false;
                self.mail = None;
                self.send(format!("250 {}\r\n", self.p.hostname));
            }
            Verb::Ehlo => {
                self.helo = Some(line.to_vec());
                self.esmtp = true;
                self.mail = None;
                let keywords = Arc::clone(&self.p.ehlo_keywords);
                let mut lines = std::iter::once(self.p.hostname.as_str())
                    .chain(keywords.iter().map(String::as_str))
                    .peekable();
                let mut reply = String::new();
                while let Some(l) = lines.next() {
                    let sep = if lines.peek().is_some() { '-' } else { ' ' };
                    let _ = write!(reply, "250{sep}{l}\r\n");
                }
                self.send(reply);
            }
            Verb::Mail if self.helo.is_none() => {
                self.send("503 5.5.1 Error: send HELO/EHLO first\r\n".into());
            }
            Verb::Mail if self.mail.is_some() => {
                self.send("503 5.5.1 Error: nested MAIL command\r\n".into());
            }
            Verb::Mail if !command::has_path_keyword(c.verb, c.args) => {
                self.send("501 5.5.4 Syntax: MAIL FROM:<address>\r\n".into());
            }
            Verb::Mail => {
                self.mail = Some(line.to_vec());
                self.send("250 2.1.0 Ok\r\n".into());
            }
            Verb::Rcpt if self.mail.is_none() => {
                self.send("503 5.5.1 Error: need MAIL command\r\n".into());
            }
            Verb::Rcpt if !command::has_path_keyword(c.verb, c.args) => {
                self.send("501 5.5.4 Syntax: RCPT TO:<address>\r\n".into());
            }
            Verb::Rcpt => self.rcpt(line),
            Verb::Data | Verb::Bdat => {
                self.send("503 5.5.1 Error: need RCPT command\r\n".into());
            }
            Verb::Rset => {
                self.mail = None;
                self.send("250 2.0.0 Ok\r\n".into());
            }
            Verb::Noop => self.send("250 2.0.0 Ok\r\n".into()),
            Verb::Vrfy => self.send("502 5.5.1 VRFY command is disabled\r\n".into()),
            Verb::Quit => {
                self.send("221 2.0.0 Bye\r\n".into());
                self.close();
            }
            Verb::StartTls => self.starttls(line, c.args),
            Verb::Empty => self.send("500 5.5.2 Error: bad syntax\r\n".into()),
            Verb::Unknown => self.send("502 5.5.2 Error: command not recognized\r\n".into()),
        }
    }

    fn starttls(&mut self, line: &[u8], args: &[u8]) {
        if !self.p.backend_starttls() {
            self.send("502 5.5.1 Error: command not implemented\r\n".into());
        } else if !args.is_empty() {
            self.send("501 5.5.4 Syntax: STARTTLS\r\n".into());
        } else if !self.esmtp {
            self.send("503 5.5.1 Error: send EHLO first\r\n".into());
        } else if self.reject.is_some() {
            self.send("454 4.7.0 TLS not available due to local problem\r\n".into());
        } else {
            // Plaintext sent after STARTTLS and before its reply is the
            // command-injection attack: it never reaches the backend.
            self.inbuf.clear();
            // What follows is encrypted end to end and never seen here, so
            // the deep tests are judged on the plaintext dialogue up to this
            // command (postscreen runs them inside TLS; we leave TLS to the
            // MTA). Without this, a TLS sender would never be remembered and
            // would wait out the greet wait on every connection.
            self.deep_passes();
            let plan = Plan::StartTls {
                ehlo: self.helo.clone().unwrap_or_default(),
                starttls: line.to_vec(),
            };
            self.pass_and_handoff(
                plan,
                " (deep tests on the plaintext dialogue before STARTTLS)",
            );
        }
    }

    fn rcpt(&mut self, line: &[u8]) {
        if let Some(reply) = self.reject.clone() {
            self.noqueue(&reply, line);
            self.send(format!("{reply}\r\n"));
            return;
        }
        self.deep_passes();
        if self.p.deep_test_handoff == Handoff::Reconnect && self.clean() {
            if self.passed.iter().any(Option::is_some) {
                tracing::info!(client = %Peer(self.client), "PASS NEW {}", Peer(self.client));
                self.out.push(Output::Pass(self.passed));
                self.passed = [None; Test::COUNT];
            }
            let reply = "450 4.3.2 Service currently unavailable";
            self.noqueue(reply, line);
            self.send(format!("{reply}\r\n"));
            return;
        }
        // Reconnect mode with an ignored failure would never let the client
        // through (it is never allowlisted), so it is replayed as well.
        let plan = Plan::Replay {
            helo: self.helo.clone().unwrap_or_default(),
            mail: self.mail.clone().unwrap_or_default(),
            rcpt: line.to_vec(),
            rest: std::mem::take(&mut self.inbuf),
        };
        self.pass_and_handoff(plan, "");
    }

    /// Marks every deep test still to do and not failed as passed, with its
    /// lifetime.
    fn deep_passes(&mut self) {
        for (test, t) in [
            (Test::Pipelining, self.p.pipelining),
            (Test::NonSmtpCommand, self.p.non_smtp_command),
            (Test::BareNewline, self.p.bare_newline),
        ] {
            if self.todo.has(test) && !self.failed[test.index()] {
                self.passed[test.index()] = Some(t.ttl);
            }
        }
    }

    fn noqueue(&self, reply: &str, rcpt: &[u8]) {
        let from = self
            .mail
            .as_deref()
            .map(|m| command::path(command::parse(m).args).to_vec())
            .unwrap_or_default();
        let helo = self
            .helo
            .as_deref()
            .map(|h| command::parse(h).args.to_vec())
            .unwrap_or_default();
        tracing::info!(
            client = %Peer(self.client),
            "NOQUEUE: reject: RCPT from {}: {}; from=<{}>, to=<{}>, proto={}, helo=<{}>",
            Peer(self.client),
            reply,
            escape(&from),
            escape(command::path(command::parse(rcpt).args)),
            if self.esmtp { "ESMTP" } else { "SMTP" },
            escape(&helo)
        );
    }
}

fn verb_name(v: Verb) -> &'static str {
    match v {
        Verb::Helo => "HELO",
        Verb::Ehlo => "EHLO",
        Verb::Mail => "MAIL",
        Verb::Rcpt => "RCPT",
        Verb::Data => "DATA",
        Verb::Bdat => "BDAT",
        Verb::Rset => "RSET",
        Verb::Noop => "NOOP",
        Verb::Vrfy => "VRFY",
        Verb::Quit => "QUIT",
        Verb::StartTls => "STARTTLS",
        Verb::Empty => "empty line",
        Verb::Unknown => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use tokio::time::advance;

    const CLIENT: &str = "192.0.2.10:40000";

    fn params(edit: impl FnOnce(&mut Params)) -> Arc<Params> {
        let mut cfg = Config::default();
        cfg.smtp.hostname = "mx.example".into();
        cfg.smtp.greet_banner = "$hostname ESMTP".into();
        let kw = Arc::new(vec!["SIZE 1000".to_owned(), "8BITMIME".to_owned()]);
        let mut p = Params::from_config(&cfg, false, kw);
        edit(&mut p);
        Arc::new(p)
    }

    fn deep(p: &mut Params) {
        p.pipelining.enable = true;
        p.non_smtp_command.enable = true;
        p.bare_newline.enable = true;
    }

    /// A session plus everything it asked for so far.
    struct Run {
        s: Session,
        out: Vec<Output>,
    }

    impl Run {
        fn start(p: Arc<Params>, todo: Todo) -> Run {
            let mut s = Session::new(p, CLIENT.parse().unwrap(), todo, Instant::now());
            let out = s.start(Instant::now());
            Run { s, out }
        }

        async fn wait(&mut self, secs: u64) {
            advance(Duration::from_secs(secs)).await;
            if self.s.deadline().is_some_and(|d| d <= Instant::now()) {
                let o = self.s.timeout(Instant::now());
                self.out.extend(o);
            }
        }

        /// Sends `bytes` and returns the text the session wrote back.
        fn say(&mut self, bytes: &[u8]) -> String {
            let o = self.s.input(bytes, Instant::now());
            let text = sent(&o);
            self.out.extend(o);
            text
        }

        fn text(&self) -> String {
            sent(&self.out)
        }

        fn closed(&self) -> bool {
            self.out.contains(&Output::Close)
        }

        fn fails(&self) -> Vec<FailedTest> {
            self.out
                .iter()
                .filter_map(|o| match o {
                    Output::Fail { test, .. } => Some(*test),
                    _ => None,
                })
                .collect()
        }

        fn pass(&self) -> Option<[Option<Duration>; Test::COUNT]> {
            self.out.iter().find_map(|o| match o {
                Output::Pass(t) => Some(*t),
                _ => None,
            })
        }

        fn handoff(&self) -> Option<Plan> {
            self.out.iter().find_map(|o| match o {
                Output::Handoff(p) => Some(p.clone()),
                _ => None,
            })
        }
    }

    fn sent(out: &[Output]) -> String {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(b) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_passes_after_the_greet_wait() {
        let mut r = Run::start(params(|_| {}), Todo::ALL);
        assert_eq!(r.text(), "220-mx.example ESMTP\r\n");
        r.wait(5).await;
        assert_eq!(r.handoff(), None, "the greet wait is 6 s");
        r.wait(1).await;
        assert_eq!(r.handoff(), Some(Plan::Greeting { early: Vec::new() }));
        let pass = r.pass().expect("PASS NEW");
        assert_eq!(
            pass[Test::Pregreet.index()],
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(pass[Test::Pipelining.index()], None, "deep tests are off");
    }

    #[tokio::test(start_paused = true)]
    async fn pregreet_drop() {
        let mut r = Run::start(params(|p| p.greet_action = Action::Drop), Todo::ALL);
        r.wait(1).await;
        assert_eq!(r.say(b"EHLO bot\r\n"), "521 5.5.1 Protocol error\r\n");
        assert!(r.closed());
        assert_eq!(r.fails(), [FailedTest::Pregreet]);
        assert_eq!(r.s.deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn pregreet_enforce_rejects_at_rcpt() {
        let mut r = Run::start(params(|_| {}), Todo::ALL);
        assert_eq!(r.say(b"HELO bot\r\n"), "", "enforce waits quietly");
        r.wait(6).await;
        // The early bytes are the first command after the 220.
        assert!(
            r.text()
                .ends_with("220 mx.example ESMTP\r\n250 mx.example\r\n"),
            "{}",
            r.text()
        );
        assert!(r.say(b"MAIL FROM:<a@example.org>\r\n").starts_with("250 "));
        assert_eq!(
            r.say(b"RCPT TO:<b@example.net>\r\n"),
            "550 5.5.1 Protocol error\r\n"
        );
        assert_eq!(
            r.say(b"RCPT TO:<c@example.net>\r\n"),
            "550 5.5.1 Protocol error\r\n"
        );
        assert_eq!(r.pass(), None);
        assert_eq!(r.handoff(), None);
        assert_eq!(r.say(b"QUIT\r\n"), "221 2.0.0 Bye\r\n");
        assert!(r.closed());
    }

    #[tokio::test(start_paused = true)]
    async fn pregreet_ignore_still_hands_off_without_pass() {
        let mut r = Run::start(params(|p| p.greet_action = Action::Ignore), Todo::ALL);
        r.say(b"EHLO c");
        r.wait(1).await;
        r.say(b"\r\nMAIL FROM:<a@example.org>\r\n");
        r.wait(5).await;
        assert_eq!(r.fails(), [FailedTest::Pregreet]);
        assert_eq!(r.pass(), None);
        // Every burst is kept, in order, for the backend.
        assert_eq!(
            r.handoff(),
            Some(Plan::Greeting {
                early: b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n".to_vec()
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn early_bytes_are_bounded_to_whole_lines() {
        // Past the bound only the whole lines before the cut are kept.
        let mut r = Run::start(params(|p| p.greet_action = Action::Ignore), Todo::ALL);
        r.say(b"EHLO c\r\n");
        r.say(&[b'A'; 3000]);
        r.wait(6).await;
        assert_eq!(
            r.handoff(),
            Some(Plan::Greeting {
                early: b"EHLO c\r\n".to_vec()
            })
        );

        // One line longer than the bound: nothing for the backend.
        let mut r = Run::start(params(|p| p.greet_action = Action::Ignore), Todo::ALL);
        r.say(&[b'A'; 3000]);
        r.say(b"\r\n");
        r.wait(6).await;
        assert_eq!(r.handoff(), Some(Plan::Greeting { early: Vec::new() }));

        // The dummy engine refuses it as too long, after its 220.
        let mut r = Run::start(params(deep), Todo::ALL);
        r.say(&[b'A'; 3000]);
        r.wait(6).await;
        assert!(
            r.text().ends_with(
                "220 mx.example ESMTP\r\n421 4.5.0 mx.example Error: command too long\r\n"
            ),
            "{}",
            r.text()
        );
        assert!(r.closed());
    }

    #[tokio::test(start_paused = true)]
    async fn early_bytes_before_the_deep_tests() {
        // Without a teaser only the DNSBL is awaited: early bytes are no
        // failure, and the dummy engine answers them after its 220.
        let mut r = Run::start(
            params(|p| {
                deep(p);
                p.greet_banner = String::new();
                p.dnsbl_enable = true;
            }),
            Todo::ALL,
        );
        assert_eq!(r.text(), "");
        r.say(b"EHLO c\r\n");
        r.wait(6).await;
        assert_eq!(r.fails(), []);
        assert_eq!(
            r.text(),
            "220 mx.example ESMTP\r\n250-mx.example\r\n250-SIZE 1000\r\n250 8BITMIME\r\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn good_client_passes_deep_tests_and_is_replayed() {
        let mut r = Run::start(params(deep), Todo::ALL);
        r.wait(6).await;
        assert!(r.text().ends_with("220 mx.example ESMTP\r\n"));
        assert_eq!(
            r.say(b"EHLO client.example\r\n"),
            "250-mx.example\r\n250-SIZE 1000\r\n250 8BITMIME\r\n"
        );
        assert_eq!(
            r.say(b"MAIL FROM:<a@example.org> SIZE=10\r\n"),
            "250 2.1.0 Ok\r\n"
        );
        assert_eq!(
            r.say(b"RCPT TO:<b@example.net>\r\n"),
            "",
            "the backend answers"
        );
        assert_eq!(
            r.handoff(),
            Some(Plan::Replay {
                helo: b"EHLO client.example".to_vec(),
                mail: b"MAIL FROM:<a@example.org> SIZE=10".to_vec(),
                rcpt: b"RCPT TO:<b@example.net>".to_vec(),
                rest: Vec::new(),
            })
        );
        let pass = r.pass().expect("PASS NEW");
        assert!(pass.iter().all(Option::is_some) || pass[Test::Dnsbl.index()].is_none());
        assert_eq!(
            pass[Test::NonSmtpCommand.index()],
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(
            r.say(b"DATA\r\n"),
            "",
            "input after the hand-off is not ours"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reconnect_mode_answers_450() {
        let mut r = Run::start(
            params(|p| {
                deep(p);
                p.deep_test_handoff = Handoff::Reconnect;
            }),
            Todo::ALL,
        );
        r.wait(6).await;
        r.say(b"HELO c\r\n");
        r.say(b"MAIL FROM:<>\r\n");
        assert_eq!(
            r.say(b"RCPT TO:<b@example.net>\r\n"),
            "450 4.3.2 Service currently unavailable\r\n"
        );
        assert!(r.pass().is_some());
        assert_eq!(r.handoff(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn pipelining_enforced() {
        let mut r = Run::start(params(deep), Todo::ALL);
        r.wait(6).await;
        let reply = r.say(b"EHLO bot\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n");
        assert!(reply.ends_with("550 5.5.1 Protocol error\r\n"), "{reply}");
        assert_eq!(r.fails(), [FailedTest::Pipelining]);
        assert_eq!(r.handoff(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn non_smtp_commands_dropped() {
        for line in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"CONNECT 192.0.2.1:25 HTTP/1.0\r\n",
            b"Subject: hello\r\n",
            b"\x16\x03\x01\x00\xa5\r\n",
        ] {
            let mut r = Run::start(params(deep), Todo::ALL);
            r.wait(6).await;
            assert_eq!(
                r.say(line),
                "521 5.7.0 Error: I can break rules, too. Goodbye.\r\n",
                "{line:?}"
            );
            assert!(r.closed());
            assert_eq!(r.fails(), [FailedTest::NonSmtpCommand]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bare_newline_ignored_but_not_allowlisted() {
        let mut r = Run::start(params(deep), Todo::ALL);
        r.wait(6).await;
        r.say(b"HELO c\n");
        r.say(b"MAIL FROM:<>\r\n");
        r.say(b"RCPT TO:<b@example.net>\r\n");
        assert_eq!(r.fails(), [FailedTest::BareNewline]);
        assert_eq!(r.pass(), None);
        assert!(matches!(r.handoff(), Some(Plan::Replay { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn command_time_limit_counts_the_whole_line() {
        let mut r = Run::start(
            params(|p| {
                deep(p);
                p.command_time_limit = Duration::from_secs(10);
            }),
            Todo::ALL,
        );
        r.wait(6).await;
        for b in b"HELO trickle.example" {
            r.say(&[*b]);
            r.wait(1).await;
            if r.closed() {
                break;
            }
        }
        assert!(r.closed(), "ten seconds for one line");
        assert!(r
            .text()
            .ends_with("421 4.4.2 mx.example Error: timeout exceeded\r\n"));
    }

    #[tokio::test(start_paused = true)]
    async fn stress_shortens_the_greet_wait_of_a_running_session() {
        let mut r = Run::start(params(deep), Todo::ALL);
        r.wait(1).await;
        r.s.stress(Instant::now());
        r.wait(1).await;
        assert!(!r.text().contains("220 "), "{}", r.text());
        r.wait(1).await;
        assert!(
            r.text().ends_with("220 mx.example ESMTP\r\n"),
            "1 s waited, then 2 s under stress: {}",
            r.text()
        );
        // A greet wait already shorter than the stress one stays as it is.
        let mut r = Run::start(params(|p| p.greet_wait = Duration::from_secs(1)), Todo::ALL);
        r.s.stress(Instant::now());
        r.wait(1).await;
        assert_eq!(r.handoff(), Some(Plan::Greeting { early: Vec::new() }));
    }

    #[tokio::test(start_paused = true)]
    async fn stress_shortens_the_command_time_limit_of_a_running_session() {
        let mut r = Run::start(params(deep), Todo::ALL);
        r.wait(6).await;
        r.say(b"HELO c\r\n");
        r.wait(100).await;
        r.s.stress(Instant::now());
        r.wait(9).await;
        assert!(!r.closed(), "the line under way gets 10 s from now");
        r.wait(1).await;
        assert!(r
            .text()
            .ends_with("421 4.4.2 mx.example Error: timeout exceeded\r\n"));

        // Later lines get the stress limit too.
        let mut r = Run::start(params(deep), Todo::ALL);
        r.wait(6).await;
        r.s.stress(Instant::now());
        r.say(b"HELO c\r\n");
        r.wait(9).await;
        assert!(!r.closed());
        r.say(b"NOOP\r\n");
        r.wait(10).await;
        assert!(r.closed(), "10 s for the next line, not 300 s");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_client_times_out() {
        let mut r = Run::start(params(deep), Todo::ALL);
        r.wait(6).await;
        r.wait(299).await;
        assert!(!r.closed());
        r.wait(1).await;
        assert!(r.closed());
    }

    #[tokio::test(start_paused = true)]
    async fn command_count_and_length_limits() {
        let mut r = Run::start(params(deep), Todo::ALL);
        r.wait(6).await;
        for _ in 0..20 {
            assert_eq!(r.say(b"NOOP\r\n"), "250 2.0.0 Ok\r\n");
        }
        assert_eq!(
            r.say(b"NOOP\r\n"),
            "421 4.7.0 mx.example Error: too many commands\r\n"
        );
        assert!(r.closed());

        let mut r = Run::start(params(deep), Todo::ALL);
        r.wait(6).await;
        assert_eq!(r.say(&[b'A'; 2048]), "");
        assert_eq!(
            r.say(b"A"),
            "421 4.5.0 mx.example Error: command too long\r\n"
        );
        assert!(r.closed());
    }

    fn score(score: i32) -> DnsblScore {
        DnsblScore {
            score,
            ttl: Duration::from_secs(5),
            top_site: Some("zen.example".into()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn dnsbl_drop_names_the_site() {
        let mut r = Run::start(
            params(|p| {
                p.dnsbl_enable = true;
                p.dnsbl_action = Action::Drop;
            }),
            Todo::ALL,
        );
        assert!(r.s.dnsbl_deadline().is_some());
        r.wait(1).await;
        let o = r.s.dnsbl(score(3), Instant::now());
        assert!(o.is_empty(), "the pregreet wait goes on");
        r.wait(5).await;
        assert!(r.text().ends_with(
            "521 5.7.1 Service unavailable; client [192.0.2.10] blocked using zen.example\r\n"
        ));
        assert_eq!(r.fails(), [FailedTest::Dnsbl]);
    }

    #[tokio::test(start_paused = true)]
    async fn dnsbl_pass_ttl_is_clamped_and_late_answers_do_not_count() {
        let p = params(|p| p.dnsbl_enable = true);
        let mut r = Run::start(Arc::clone(&p), Todo::ALL);
        r.out.extend(r.s.dnsbl(score(0), Instant::now()));
        r.wait(6).await;
        assert_eq!(
            r.pass().unwrap()[Test::Dnsbl.index()],
            Some(Duration::from_secs(60))
        );

        let mut r = Run::start(p, Todo::ALL);
        r.wait(6).await;
        r.out.extend(r.s.dnsbl(score(5), Instant::now()));
        assert_eq!(r.fails(), []);
        assert_eq!(r.pass().unwrap()[Test::Dnsbl.index()], None);
    }

    #[tokio::test(start_paused = true)]
    async fn dnswl_skips_the_wait_and_deep_tests() {
        let mut r = Run::start(
            params(|p| {
                deep(p);
                p.dnsbl_enable = true;
                p.dnsbl_allowlist_threshold = -1;
            }),
            Todo::ALL,
        );
        r.wait(1).await;
        r.out.extend(r.s.dnsbl(score(-2), Instant::now()));
        assert_eq!(r.handoff(), Some(Plan::Greeting { early: Vec::new() }));
    }

    #[tokio::test(start_paused = true)]
    async fn cached_passes_skip_tests() {
        // Only the deep tests are due: no teaser, straight to the 220.
        let mut r = Run::start(params(deep), Todo([false, false, true, true, true]));
        assert_eq!(r.text(), "220 mx.example ESMTP\r\n");
        r.say(b"HELO c\r\nMAIL FROM:<>\r\n");
        assert_eq!(r.fails(), [FailedTest::Pipelining]);
    }

    #[tokio::test(start_paused = true)]
    async fn starttls_hands_off_only_when_the_backend_has_it() {
        let mut r = Run::start(params(deep), Todo::ALL);
        r.wait(6).await;
        r.say(b"EHLO c\r\n");
        assert_eq!(
            r.say(b"STARTTLS\r\n"),
            "502 5.5.1 Error: command not implemented\r\n"
        );

        let mut r = Run::start(
            params(|p| {
                deep(p);
                p.ehlo_keywords = Arc::new(vec!["STARTTLS".into()]);
            }),
            Todo::ALL,
        );
        r.wait(6).await;
        assert_eq!(r.say(b"EHLO c\r\n"), "250-mx.example\r\n250 STARTTLS\r\n");
        assert_eq!(r.say(b"STARTTLS\r\n"), "");
        assert_eq!(
            r.handoff(),
            Some(Plan::StartTls {
                ehlo: b"EHLO c".to_vec(),
                starttls: b"STARTTLS".to_vec()
            })
        );
        // The plaintext dialogue up to STARTTLS is all the deep tests can
        // see: the client is remembered, pregreet and deep tests alike.
        let pass = r.pass().expect("PASS NEW at the STARTTLS hand-off");
        assert_eq!(
            pass[Test::Pregreet.index()],
            Some(Duration::from_secs(86_400))
        );
        for t in [Test::Pipelining, Test::NonSmtpCommand, Test::BareNewline] {
            assert_eq!(
                pass[t.index()],
                Some(Duration::from_secs(30 * 86_400)),
                "{t:?}"
            );
        }
        assert_eq!(pass[Test::Dnsbl.index()], None, "no DNSBL configured");
    }

    #[tokio::test(start_paused = true)]
    async fn starttls_after_a_failure_is_not_remembered() {
        let tls = |p: &mut Params| {
            deep(p);
            p.bare_newline.action = Action::Ignore;
            p.ehlo_keywords = Arc::new(vec!["STARTTLS".into()]);
        };
        let mut r = Run::start(params(tls), Todo::ALL);
        r.wait(6).await;
        r.say(b"EHLO c\n");
        assert_eq!(r.say(b"STARTTLS\r\n"), "");
        assert!(matches!(r.handoff(), Some(Plan::StartTls { .. })));
        assert_eq!(r.fails(), [FailedTest::BareNewline]);
        assert_eq!(r.pass(), None, "an ignored failure is never allowlisted");
    }

    #[tokio::test(start_paused = true)]
    async fn dummy_engine_sequence_errors() {
        let mut r = Run::start(params(deep), Todo::ALL);
        r.wait(6).await;
        assert!(r.say(b"MAIL FROM:<a@b>\r\n").starts_with("503 "));
        assert!(r.say(b"RCPT TO:<a@b>\r\n").starts_with("503 "));
        assert!(r.say(b"EHLO\r\n").starts_with("501 "));
        r.say(b"HELO c\r\n");
        assert!(r.say(b"MAIL TO:<a@b>\r\n").starts_with("501 "));
        assert!(r.say(b"DATA\r\n").starts_with("503 "));
        assert!(r.say(b"\r\n").starts_with("500 "));
        assert!(r.say(b"XYZZY\r\n").starts_with("502 "));
        assert!(r.say(b"RSET\r\n").starts_with("250 "));
        assert!(r.say(b"VRFY x\r\n").starts_with("502 "));
        assert_eq!(r.fails(), []);
    }

    #[tokio::test(start_paused = true)]
    async fn hangup_in_tests() {
        let mut r = Run::start(params(deep), Todo::ALL);
        r.wait(2).await;
        let o = r.s.eof(Instant::now());
        assert_eq!(o, [Output::Close]);
        assert!(!r.s.is_screening());
    }
}
