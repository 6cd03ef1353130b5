//! The dummy SMTP dialogue the deep tests watch: enough of SMTP for a client
//! to reach `RCPT TO` (or `STARTTLS`), never a mail accepted.
//!
//! One table, [`VERBS`], gives each verb its name, the syntax of its
//! arguments and its reply. Parsing never fails: any byte string is some
//! [`Command`], at worst [`Verb::Unknown`], so hostile input gets a
//! protocol reply, never a panic. The two commands that end the dialogue
//! (a valid `RCPT TO`, a valid `STARTTLS`) come back as [`Step`]s for the
//! session to decide: it knows about failures and hand-offs, this file
//! only about SMTP.

use std::fmt::Write as _;
use std::net::SocketAddr;

use super::params::Params;
use super::text::{escape, Peer};

/// The verbs the dummy engine knows, plus the empty line and anything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// `HELO name`
    Helo,
    /// `EHLO name`
    Ehlo,
    /// `MAIL FROM:<a> [params]`
    Mail,
    /// `RCPT TO:<a> [params]`
    Rcpt,
    /// `DATA`
    Data,
    /// `BDAT n [LAST]`
    Bdat,
    /// `RSET`
    Rset,
    /// `NOOP`
    Noop,
    /// `VRFY a`
    Vrfy,
    /// `QUIT`
    Quit,
    /// `STARTTLS`
    StartTls,
    /// An empty line.
    Empty,
    /// Anything else.
    Unknown,
}

/// What the arguments of a verb must look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syntax {
    /// Anything (or nothing).
    Any,
    /// A name is required (`HELO`, `EHLO`).
    Name,
    /// A path after this keyword, any case (`FROM:`, `TO:`).
    Path(&'static [u8]),
    /// Nothing at all (`STARTTLS`).
    Nothing,
}

/// One row of the verb table.
pub struct VerbRow {
    /// The verb.
    pub verb: Verb,
    /// As the client spells it (any case), and as logs name it.
    pub name: &'static str,
    /// What its arguments must look like.
    pub syntax: Syntax,
    /// The reply once the syntax is right.
    reply: fn(&mut Dialogue, &Command<'_>, &[u8], &Params) -> Step,
}

/// Every verb: name, syntax, reply. `Empty` and `Unknown` are never looked
/// up by name (a word has no space, and "UNKNOWN" is unknown anyway).
pub const VERBS: [VerbRow; 13] = [
    VerbRow {
        verb: Verb::Helo,
        name: "HELO",
        syntax: Syntax::Name,
        reply: Dialogue::helo,
    },
    VerbRow {
        verb: Verb::Ehlo,
        name: "EHLO",
        syntax: Syntax::Name,
        reply: Dialogue::ehlo,
    },
    VerbRow {
        verb: Verb::Mail,
        name: "MAIL",
        syntax: Syntax::Path(b"FROM:"),
        reply: Dialogue::mail,
    },
    VerbRow {
        verb: Verb::Rcpt,
        name: "RCPT",
        syntax: Syntax::Path(b"TO:"),
        reply: Dialogue::rcpt,
    },
    VerbRow {
        verb: Verb::Data,
        name: "DATA",
        syntax: Syntax::Any,
        reply: |_, _, _, _| reply("503 5.5.1 Error: need RCPT command"),
    },
    VerbRow {
        verb: Verb::Bdat,
        name: "BDAT",
        syntax: Syntax::Any,
        reply: |_, _, _, _| reply("503 5.5.1 Error: need RCPT command"),
    },
    VerbRow {
        verb: Verb::Rset,
        name: "RSET",
        syntax: Syntax::Any,
        reply: |d, _, _, _| {
            d.mail = None;
            reply("250 2.0.0 Ok")
        },
    },
    VerbRow {
        verb: Verb::Noop,
        name: "NOOP",
        syntax: Syntax::Any,
        reply: |_, _, _, _| reply("250 2.0.0 Ok"),
    },
    VerbRow {
        verb: Verb::Vrfy,
        name: "VRFY",
        syntax: Syntax::Any,
        reply: |_, _, _, _| reply("502 5.5.1 VRFY command is disabled"),
    },
    VerbRow {
        verb: Verb::Quit,
        name: "QUIT",
        syntax: Syntax::Any,
        reply: |_, _, _, _| Step::Close("221 2.0.0 Bye\r\n".into()),
    },
    VerbRow {
        verb: Verb::StartTls,
        name: "STARTTLS",
        syntax: Syntax::Nothing,
        reply: Dialogue::starttls,
    },
    VerbRow {
        verb: Verb::Empty,
        name: "empty line",
        syntax: Syntax::Any,
        reply: |_, _, _, _| reply("500 5.5.2 Error: bad syntax"),
    },
    VerbRow {
        verb: Verb::Unknown,
        name: "UNKNOWN",
        syntax: Syntax::Any,
        reply: |_, _, _, _| reply("502 5.5.2 Error: command not recognized"),
    },
];

impl Verb {
    /// The verb's row in [`VERBS`].
    pub fn row(self) -> &'static VerbRow {
        VERBS
            .iter()
            .find(|r| r.verb == self)
            .unwrap_or(&VERBS[VERBS.len() - 1])
    }

    /// The verb as logs name it (`after EHLO`).
    pub fn name(self) -> &'static str {
        self.row().name
    }
}

/// One command line, CRLF already removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Command<'a> {
    /// The recognised verb.
    pub verb: Verb,
    /// The first word as sent (for logs).
    pub word: &'a [u8],
    /// Everything after the first word and its spaces.
    pub args: &'a [u8],
}

/// Splits a command line into verb and arguments.
pub fn parse(line: &[u8]) -> Command<'_> {
    let start = line.iter().position(|&b| b != b' ').unwrap_or(line.len());
    let line = &line[start..];
    let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let word = &line[..end];
    let rest = &line[end..];
    let args_start = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
    let args = &rest[args_start..];
    let verb = if word.is_empty() {
        Verb::Empty
    } else {
        VERBS
            .iter()
            .find(|r| r.name.as_bytes().eq_ignore_ascii_case(word))
            .map_or(Verb::Unknown, |r| r.verb)
    };
    Command { verb, word, args }
}

/// Whether `args` of a MAIL or RCPT command start with the keyword the
/// verb needs (`FROM:` / `TO:`, any case).
pub fn has_path_keyword(verb: Verb, args: &[u8]) -> bool {
    let Syntax::Path(key) = verb.row().syntax else {
        return false;
    };
    args.len() >= key.len() && args[..key.len()].eq_ignore_ascii_case(key)
}

/// The address between `<` and `>` of a MAIL/RCPT argument, for logs.
pub fn path(args: &[u8]) -> &[u8] {
    let Some(open) = args.iter().position(|&b| b == b'<') else {
        return b"";
    };
    let inner = &args[open + 1..];
    let close = inner.iter().position(|&b| b == b'>').unwrap_or(inner.len());
    &inner[..close]
}

/// What the session does with a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this reply (CRLF included).
    Reply(String),
    /// Send this reply, then hang up.
    Close(String),
    /// A well-formed `RCPT TO` inside a transaction: the session rejects
    /// it, asks the client to come back, or hands the client over.
    Rcpt,
    /// A well-formed `STARTTLS` after EHLO, with the backend offering it:
    /// the session hands the client over, or refuses after a failure.
    StartTls,
}

fn reply(text: &str) -> Step {
    Step::Reply(format!("{text}\r\n"))
}

/// What the client said so far that the replay and the logs need.
#[derive(Clone, Debug, Default)]
pub struct Dialogue {
    /// The last HELO/EHLO line, for the replay.
    pub helo: Option<Vec<u8>>,
    /// Whether that was EHLO.
    pub esmtp: bool,
    /// The MAIL FROM line of the open transaction.
    pub mail: Option<Vec<u8>>,
}

impl Dialogue {
    /// Answers one command line (`c` parsed from `line`).
    pub fn command(&mut self, c: &Command<'_>, line: &[u8], p: &Params) -> Step {
        let row = c.verb.row();
        let bad = match row.syntax {
            Syntax::Name if c.args.is_empty() => Some(format!("Syntax: {} hostname", row.name)),
            // A path or a bare STARTTLS is checked by the verb's reply, after
            // the sequence errors, in Postfix's order.
            Syntax::Any | Syntax::Name | Syntax::Nothing | Syntax::Path(_) => None,
        };
        match bad {
            Some(text) => reply(&format!("501 5.5.4 {text}")),
            None => (row.reply)(self, c, line, p),
        }
    }

    fn helo(&mut self, _c: &Command<'_>, line: &[u8], p: &Params) -> Step {
        self.helo = Some(line.to_vec());
        self.esmtp = false;
        self.mail = None;
        reply(&format!("250 {}", p.hostname))
    }

    fn ehlo(&mut self, _c: &Command<'_>, line: &[u8], p: &Params) -> Step {
        self.helo = Some(line.to_vec());
        self.esmtp = true;
        self.mail = None;
        let mut lines = std::iter::once(p.hostname.as_str())
            .chain(p.ehlo_keywords.iter().map(String::as_str))
            .peekable();
        let mut text = String::new();
        while let Some(l) = lines.next() {
            let sep = if lines.peek().is_some() { '-' } else { ' ' };
            let _ = write!(text, "250{sep}{l}\r\n");
        }
        Step::Reply(text)
    }

    fn mail(&mut self, c: &Command<'_>, line: &[u8], _p: &Params) -> Step {
        if self.helo.is_none() {
            reply("503 5.5.1 Error: send HELO/EHLO first")
        } else if self.mail.is_some() {
            reply("503 5.5.1 Error: nested MAIL command")
        } else if !has_path_keyword(c.verb, c.args) {
            reply("501 5.5.4 Syntax: MAIL FROM:<address>")
        } else {
            self.mail = Some(line.to_vec());
            reply("250 2.1.0 Ok")
        }
    }

    fn rcpt(&mut self, c: &Command<'_>, _line: &[u8], _p: &Params) -> Step {
        if self.mail.is_none() {
            reply("503 5.5.1 Error: need MAIL command")
        } else if !has_path_keyword(c.verb, c.args) {
            reply("501 5.5.4 Syntax: RCPT TO:<address>")
        } else {
            Step::Rcpt
        }
    }

    fn starttls(&mut self, c: &Command<'_>, _line: &[u8], p: &Params) -> Step {
        if !p.backend_starttls() {
            reply("502 5.5.1 Error: command not implemented")
        } else if !c.args.is_empty() {
            reply("501 5.5.4 Syntax: STARTTLS")
        } else if !self.esmtp {
            reply("503 5.5.1 Error: send EHLO first")
        } else {
            Step::StartTls
        }
    }

    /// Logs a refused RCPT as postscreen does (`NOQUEUE: reject: RCPT
    /// from …; from=<…>, to=<…>, proto=…, helo=<…>`).
    pub fn noqueue(&self, client: SocketAddr, reply: &str, rcpt: &[u8]) {
        let from = self
            .mail
            .as_deref()
            .map(|m| path(parse(m).args).to_vec())
            .unwrap_or_default();
        let helo = self
            .helo
            .as_deref()
            .map(|h| parse(h).args.to_vec())
            .unwrap_or_default();
        tracing::info!(
            client = %Peer(client),
            "NOQUEUE: reject: RCPT from {}: {}; from=<{}>, to=<{}>, proto={}, helo=<{}>",
            Peer(client),
            reply,
            escape(&from),
            escape(path(parse(rcpt).args)),
            if self.esmtp { "ESMTP" } else { "SMTP" },
            escape(&helo)
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn verbs_and_args() {
        let c = parse(b"mail FROM:<a@example.org> SIZE=10");
        assert_eq!(c.verb, Verb::Mail);
        assert_eq!(c.args, b"FROM:<a@example.org> SIZE=10");
        assert!(has_path_keyword(c.verb, c.args));
        assert_eq!(path(c.args), b"a@example.org");
        assert_eq!(parse(b"EHLO  client.example").args, b"client.example");
        assert_eq!(parse(b"").verb, Verb::Empty);
        assert_eq!(parse(b"   ").verb, Verb::Empty);
        assert_eq!(parse(b"XYZZY").verb, Verb::Unknown);
        assert_eq!(parse(b"StartTLS").verb, Verb::StartTls);
        assert!(!has_path_keyword(Verb::Rcpt, b"FROM:<x>"));
    }

    #[test]
    fn the_table_has_one_row_per_verb_and_parses_its_names() {
        let verbs: HashSet<_> = VERBS.iter().map(|r| r.name).collect();
        assert_eq!(verbs.len(), VERBS.len(), "names are unique");
        for row in &VERBS {
            assert_eq!(row.verb.row().name, row.name, "{:?} has one row", row.verb);
            if row.verb != Verb::Empty {
                assert_eq!(parse(row.name.as_bytes()).verb, row.verb, "{}", row.name);
                let lower = row.name.to_ascii_lowercase();
                assert_eq!(parse(lower.as_bytes()).verb, row.verb, "{lower}");
            }
        }
        assert_eq!(Verb::Empty.name(), "empty line");
    }

    fn say(d: &mut Dialogue, p: &Params, line: &str) -> Step {
        d.command(&parse(line.as_bytes()), line.as_bytes(), p)
    }

    #[test]
    fn the_dialogue_hands_rcpt_and_starttls_to_the_session() {
        use crate::smtp::session::testing::params;
        let p = params(|_| {});
        let mut d = Dialogue::default();
        assert_eq!(
            say(&mut d, &p, "RCPT TO:<b@example.net>"),
            reply("503 5.5.1 Error: need MAIL command")
        );
        assert_eq!(
            say(&mut d, &p, "HELO"),
            reply("501 5.5.4 Syntax: HELO hostname")
        );
        assert_eq!(say(&mut d, &p, "HELO c.example"), reply("250 mx.example"));
        assert_eq!(
            say(&mut d, &p, "MAIL FROM:<a@example.org>"),
            reply("250 2.1.0 Ok")
        );
        assert_eq!(
            say(&mut d, &p, "MAIL FROM:<a@example.org>"),
            reply("503 5.5.1 Error: nested MAIL command")
        );
        assert_eq!(
            say(&mut d, &p, "RCPT <b@example.net>"),
            reply("501 5.5.4 Syntax: RCPT TO:<address>")
        );
        assert_eq!(say(&mut d, &p, "rcpt to:<b@example.net>"), Step::Rcpt);
        assert_eq!(d.helo.as_deref(), Some(&b"HELO c.example"[..]));
        assert_eq!(d.mail.as_deref(), Some(&b"MAIL FROM:<a@example.org>"[..]));
        assert_eq!(say(&mut d, &p, "RSET"), reply("250 2.0.0 Ok"));
        assert_eq!(d.mail, None);
        assert_eq!(
            say(&mut d, &p, "QUIT"),
            Step::Close("221 2.0.0 Bye\r\n".into())
        );

        // STARTTLS only when the backend offers it, bare, after EHLO.
        let tls = params(|p| p.ehlo_keywords = std::sync::Arc::new(vec!["STARTTLS".into()]));
        let mut d = Dialogue::default();
        assert_eq!(
            say(&mut d, &p, "STARTTLS"),
            reply("502 5.5.1 Error: command not implemented")
        );
        assert_eq!(
            say(&mut d, &tls, "STARTTLS"),
            reply("503 5.5.1 Error: send EHLO first")
        );
        assert_eq!(
            say(&mut d, &tls, "EHLO c"),
            Step::Reply("250-mx.example\r\n250 STARTTLS\r\n".into())
        );
        assert_eq!(
            say(&mut d, &tls, "STARTTLS now"),
            reply("501 5.5.4 Syntax: STARTTLS")
        );
        assert_eq!(say(&mut d, &tls, "STARTTLS"), Step::StartTls);
        assert!(d.esmtp);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

        /// No byte string makes the parser panic, and what it returns are
        /// sub-slices of the input.
        #[test]
        fn parser_takes_any_bytes(line in proptest::collection::vec(any::<u8>(), 0..300)) {
            let c = parse(&line);
            prop_assert!(c.word.len() + c.args.len() <= line.len());
            if c.verb == Verb::Empty {
                prop_assert!(line.iter().all(|&b| b == b' '));
            }
            let _ = path(c.args);
            let _ = has_path_keyword(c.verb, c.args);
        }

        /// Well-formed commands keep their verb whatever the case.
        #[test]
        fn known_verbs_any_case(upper in proptest::bool::ANY, arg in "[a-z0-9.]{0,20}") {
            let verb = if upper { "EHLO" } else { "ehlo" };
            let line = format!("{verb} {arg}");
            let c = parse(line.as_bytes());
            prop_assert_eq!(c.verb, Verb::Ehlo);
            prop_assert_eq!(c.args, arg.as_bytes());
        }
    }
}
