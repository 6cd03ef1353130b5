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
//! the socket. Deep: the dummy SMTP dialogue ([`dialogue`]), which never
//! takes mail, reads that first; every command line goes through the deep
//! tests of [`crate::screen::DEEP`] before the dialogue answers it, until
//! the client reaches RCPT TO (or STARTTLS). Then the client is
//! handed to the backend, with its early bytes when it goes there straight
//! from the early phase (or, in reconnect mode, told to come back).
//!
//! What each test looks for lives in its file under [`crate::screen`];
//! this file only decides when a test runs and what its outcome does.
//!
//! FAILURE ACTIONS. `drop` answers with the test's 5xx and hangs up;
//! `enforce` lets the dialogue go on and rejects every RCPT TO; `ignore`
//! only logs. Any failure keeps the client off the temporary allowlist.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::dialogue::{self, Dialogue, Step};
use super::params::{Action, Handoff, Params};
use super::text::Peer;
use crate::screen::dnsbl::{self, Judgement};
use crate::screen::{pregreet, Line, LogContext, PerTest, Phase, TestId, DEEP, DEEP_ENFORCE_REPLY};

pub use crate::screen::dnsbl::DnsblScore;

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
        test: TestId,
        /// The configured action for that test.
        action: Action,
    },
    /// The client passed these tests (`PASS NEW`): store the pass
    /// lifetimes; tests with `None` keep their cached expiry.
    Pass(PerTest<Option<Duration>>),
    /// Open the backend connection and follow the plan.
    Handoff(Plan),
}

/// Which tests still have to run for this client: enabled, and without an
/// unexpired pass in the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Todo(pub PerTest<bool>);

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
    pub const ALL: Todo = Todo(PerTest::splat(true));

    /// Just these tests.
    pub fn only(tests: &[TestId]) -> Todo {
        Todo(PerTest::from_fn(|t| tests.contains(&t)))
    }

    /// Whether `t` is to run.
    pub fn has(self, t: TestId) -> bool {
        self.0[t]
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

/// Where the DNSBL test stands.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Dnsbl {
    /// Not to run, or already judged.
    Off,
    /// Asked; the answer counts until the greet wait ends.
    Pending,
    /// Answered in time, judged at the end of the greet wait.
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
    failed: PerTest<bool>,
    /// Pass lifetimes gathered so far.
    passed: PerTest<Option<Duration>>,
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
    /// The dummy SMTP dialogue: what the client said, for the replay.
    dialogue: Dialogue,
    /// Pending outputs.
    out: Vec<Output>,
}

impl Session {
    /// A session for `client` with the tests in `todo` still to run.
    /// A test switched off in `p` is not run, whatever `todo` says.
    pub fn new(p: Arc<Params>, client: SocketAddr, todo: Todo, now: Instant) -> Session {
        let todo = Todo(todo.0.map(|t, &due| due && p.tests[t].enable));
        let command_time_limit = p.command_time_limit;
        let command_deadline = now + command_time_limit;
        Session {
            p,
            client,
            started: now,
            todo,
            state: State::Closed,
            dnsbl: Dnsbl::Off,
            failed: PerTest::default(),
            passed: PerTest::default(),
            reject: None,
            inbuf: Vec::new(),
            early_cut: false,
            commands: 0,
            command_deadline,
            command_time_limit,
            last: "CONNECT",
            dialogue: Dialogue::default(),
            out: Vec::new(),
        }
    }

    /// Starts screening: the teaser, the greet wait, or straight on.
    pub fn start(&mut self, now: Instant) -> Vec<Output> {
        let pregreet = self.todo.has(TestId::Pregreet);
        let dnsbl = self.todo.has(TestId::Dnsbl);
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
        !self.failed.values().any(|&f| f)
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
            let allowlisted = dnsbl::allowlisted(&score, &self.p);
            self.dnsbl = Dnsbl::Done(score);
            // Without a pregreet to watch for, or for a DNSWL-listed client,
            // waiting out the greet wait gains nothing.
            if allowlisted || !self.todo.has(TestId::Pregreet) {
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
            "HANGUP after {} from {} in {}",
            crate::logging::Delta(now.saturating_duration_since(self.started)),
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
    /// The action is the test's own; a failure is never also a pass.
    fn fail(&mut self, test: TestId, drop_reply: &str, enforce_reply: &str) {
        let action = self.p.tests[test].action;
        self.failed[test] = true;
        self.passed[test] = None;
        self.out.push(Output::Fail { test, action });
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
        if !pregreet::check(&self.p, self.failed[TestId::Pregreet]) {
            return;
        }
        pregreet::log(bytes, self.elapsed(now), self.client);
        self.fail(
            TestId::Pregreet,
            pregreet::DROP_REPLY,
            pregreet::ENFORCE_REPLY,
        );
    }

    fn finish_early(&mut self, now: Instant) {
        if self.todo.has(TestId::Pregreet) && !self.failed[TestId::Pregreet] {
            self.passed[TestId::Pregreet] = Some(self.p.tests[TestId::Pregreet].ttl);
        }
        let mut dnswl = false;
        match std::mem::replace(&mut self.dnsbl, Dnsbl::Off) {
            Dnsbl::Done(score) => match dnsbl::judge(&score, self.client.ip(), &self.p) {
                Judgement::Listed {
                    drop_reply,
                    enforce_reply,
                } => {
                    tracing::info!(
                        client = %Peer(self.client),
                        "DNSBL rank {} for {}",
                        score.score,
                        Peer(self.client)
                    );
                    self.fail(TestId::Dnsbl, &drop_reply, &enforce_reply);
                }
                Judgement::Clean { ttl, allowlisted } => {
                    self.passed[TestId::Dnsbl] = Some(ttl);
                    dnswl = allowlisted;
                }
            },
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
        let deep = self
            .todo
            .0
            .iter()
            .any(|(t, &due)| due && t.phase() == Phase::Deep);
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
        if self.clean() && self.passed.values().any(Option::is_some) {
            // Nothing after the client: log parsers match the line whole.
            tracing::info!(client = %Peer(self.client), "PASS NEW {}", Peer(self.client));
            if !note.is_empty() {
                tracing::info!("{}: passed{note}", Peer(self.client));
            }
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
        // Every deep test that is switched on judges every line until it
        // fails once, a cached pass notwithstanding (as in postscreen).
        for test in &DEEP {
            if !self.p.tests[test.id].enable || self.failed[test.id] {
                continue;
            }
            let l = Line {
                text: line,
                bare,
                after: &self.inbuf,
            };
            if (test.check)(&l, &self.p) {
                let cx = LogContext {
                    client: self.client,
                    last: self.last,
                };
                (test.log)(&l, &self.p, &cx);
                self.fail(test.id, test.drop_reply, DEEP_ENFORCE_REPLY);
                if self.state == State::Closed {
                    return;
                }
            }
        }
        self.command(line);
        self.command_deadline = now + self.command_time_limit;
    }

    fn command(&mut self, line: &[u8]) {
        let c = dialogue::parse(line);
        self.last = c.verb.name();
        match self.dialogue.command(&c, line, &self.p) {
            Step::Reply(reply) => self.send(reply),
            Step::Close(reply) => {
                self.send(reply);
                self.close();
            }
            Step::Rcpt => self.rcpt(line),
            Step::StartTls => self.starttls(line),
        }
    }

    /// A valid STARTTLS with the backend offering it: hand the client over
    /// unless a failure under `enforce` must still refuse its RCPTs.
    fn starttls(&mut self, line: &[u8]) {
        if self.reject.is_some() {
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
                ehlo: self.dialogue.helo.clone().unwrap_or_default(),
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
            self.dialogue.noqueue(self.client, &reply, line);
            self.send(format!("{reply}\r\n"));
            return;
        }
        self.deep_passes();
        if self.p.deep_test_handoff == Handoff::Reconnect && self.clean() {
            if self.passed.values().any(Option::is_some) {
                tracing::info!(client = %Peer(self.client), "PASS NEW {}", Peer(self.client));
                self.out.push(Output::Pass(self.passed));
                self.passed = PerTest::default();
            }
            let reply = "450 4.3.2 Service currently unavailable";
            self.dialogue.noqueue(self.client, reply, line);
            self.send(format!("{reply}\r\n"));
            return;
        }
        // Reconnect mode with an ignored failure would never let the client
        // through (it is never allowlisted), so it is replayed as well.
        let plan = Plan::Replay {
            helo: self.dialogue.helo.clone().unwrap_or_default(),
            mail: self.dialogue.mail.clone().unwrap_or_default(),
            rcpt: line.to_vec(),
            rest: std::mem::take(&mut self.inbuf),
        };
        self.pass_and_handoff(plan, "");
    }

    /// Marks every deep test still to do and not failed as passed, with its
    /// lifetime.
    fn deep_passes(&mut self) {
        for test in &DEEP {
            if self.todo.has(test.id) && !self.failed[test.id] {
                self.passed[test.id] = Some(self.p.tests[test.id].ttl);
            }
        }
    }
}

/// A session driven from byte strings with tokio's paused clock, for the
/// unit tests here and in each test's file.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::config::Config;
    use tokio::time::advance;

    const CLIENT: &str = "192.0.2.10:40000";

    /// The default parameters with a teaser and two EHLO keywords, as
    /// `edit` changes them.
    pub(crate) fn params(edit: impl FnOnce(&mut Params)) -> Arc<Params> {
        let mut cfg = Config::default();
        cfg.smtp.hostname = "mx.example".into();
        cfg.smtp.greet_banner = "$hostname ESMTP".into();
        let kw = Arc::new(vec!["SIZE 1000".to_owned(), "8BITMIME".to_owned()]);
        let mut p = Params::from_config(&cfg, false, kw);
        edit(&mut p);
        Arc::new(p)
    }

    /// Switches every deep test on.
    pub(crate) fn deep(p: &mut Params) {
        for t in TestId::ALL {
            if t.phase() == Phase::Deep {
                p.tests[t].enable = true;
            }
        }
    }

    /// A session plus everything it asked for so far.
    pub(crate) struct Run {
        /// The session under test.
        pub(crate) s: Session,
        /// Everything it asked for so far.
        pub(crate) out: Vec<Output>,
    }

    impl Run {
        pub(crate) fn start(p: Arc<Params>, todo: Todo) -> Run {
            let mut s = Session::new(p, CLIENT.parse().unwrap(), todo, Instant::now());
            let out = s.start(Instant::now());
            Run { s, out }
        }

        pub(crate) async fn wait(&mut self, secs: u64) {
            advance(Duration::from_secs(secs)).await;
            if self.s.deadline().is_some_and(|d| d <= Instant::now()) {
                let o = self.s.timeout(Instant::now());
                self.out.extend(o);
            }
        }

        /// Sends `bytes` and returns the text the session wrote back.
        pub(crate) fn say(&mut self, bytes: &[u8]) -> String {
            let o = self.s.input(bytes, Instant::now());
            let text = sent(&o);
            self.out.extend(o);
            text
        }

        pub(crate) fn text(&self) -> String {
            sent(&self.out)
        }

        pub(crate) fn closed(&self) -> bool {
            self.out.contains(&Output::Close)
        }

        pub(crate) fn fails(&self) -> Vec<TestId> {
            self.out
                .iter()
                .filter_map(|o| match o {
                    Output::Fail { test, .. } => Some(*test),
                    _ => None,
                })
                .collect()
        }

        pub(crate) fn pass(&self) -> Option<PerTest<Option<Duration>>> {
            self.out.iter().find_map(|o| match o {
                Output::Pass(t) => Some(*t),
                _ => None,
            })
        }

        pub(crate) fn handoff(&self) -> Option<Plan> {
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
}

#[cfg(test)]
mod tests {
    use super::testing::{deep, params, Run};
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pregreet_ignore_still_hands_off_without_pass() {
        let mut r = Run::start(
            params(|p| p.tests[TestId::Pregreet].action = Action::Ignore),
            Todo::ALL,
        );
        r.say(b"EHLO c");
        r.wait(1).await;
        r.say(b"\r\nMAIL FROM:<a@example.org>\r\n");
        r.wait(5).await;
        assert_eq!(r.fails(), [TestId::Pregreet]);
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
        let mut r = Run::start(
            params(|p| p.tests[TestId::Pregreet].action = Action::Ignore),
            Todo::ALL,
        );
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
        let mut r = Run::start(
            params(|p| p.tests[TestId::Pregreet].action = Action::Ignore),
            Todo::ALL,
        );
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
                p.tests[TestId::Pregreet].enable = false;
                p.tests[TestId::Dnsbl].enable = true;
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
        assert!(pass.values().all(Option::is_some) || pass[TestId::Dnsbl].is_none());
        assert_eq!(
            pass[TestId::NonSmtpCommand],
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

    #[tokio::test(start_paused = true)]
    async fn cached_passes_skip_tests() {
        // Only the deep tests are due: no teaser, straight to the 220.
        let mut r = Run::start(
            params(deep),
            Todo::only(&[
                TestId::Pipelining,
                TestId::NonSmtpCommand,
                TestId::BareNewline,
            ]),
        );
        assert_eq!(r.text(), "220 mx.example ESMTP\r\n");
        r.say(b"HELO c\r\nMAIL FROM:<>\r\n");
        assert_eq!(r.fails(), [TestId::Pipelining]);
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
        assert_eq!(pass[TestId::Pregreet], Some(Duration::from_secs(86_400)));
        for t in [
            TestId::Pipelining,
            TestId::NonSmtpCommand,
            TestId::BareNewline,
        ] {
            assert_eq!(pass[t], Some(Duration::from_secs(30 * 86_400)), "{t:?}");
        }
        assert_eq!(pass[TestId::Dnsbl], None, "no DNSBL configured");
    }

    #[tokio::test(start_paused = true)]
    async fn starttls_after_a_failure_is_not_remembered() {
        let tls = |p: &mut Params| {
            deep(p);
            p.tests[TestId::BareNewline].action = Action::Ignore;
            p.ehlo_keywords = Arc::new(vec!["STARTTLS".into()]);
        };
        let mut r = Run::start(params(tls), Todo::ALL);
        r.wait(6).await;
        r.say(b"EHLO c\n");
        assert_eq!(r.say(b"STARTTLS\r\n"), "");
        assert!(matches!(r.handoff(), Some(Plan::StartTls { .. })));
        assert_eq!(r.fails(), [TestId::BareNewline]);
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
