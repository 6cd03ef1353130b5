//! The SMTP command line as the dummy engine sees it.
//!
//! Parsing never fails: any byte string is some [`Command`], at worst
//! [`Verb::Unknown`], so hostile input gets a protocol reply, never a panic.

/// The verbs the dummy engine knows.
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
    let verb = match word.to_ascii_uppercase().as_slice() {
        b"" => Verb::Empty,
        b"HELO" => Verb::Helo,
        b"EHLO" => Verb::Ehlo,
        b"MAIL" => Verb::Mail,
        b"RCPT" => Verb::Rcpt,
        b"DATA" => Verb::Data,
        b"BDAT" => Verb::Bdat,
        b"RSET" => Verb::Rset,
        b"NOOP" => Verb::Noop,
        b"VRFY" => Verb::Vrfy,
        b"QUIT" => Verb::Quit,
        b"STARTTLS" => Verb::StartTls,
        _ => Verb::Unknown,
    };
    Command { verb, word, args }
}

/// Whether `args` of a MAIL or RCPT command start with the keyword the
/// verb needs (`FROM:` / `TO:`, any case).
pub fn has_path_keyword(verb: Verb, args: &[u8]) -> bool {
    let key: &[u8] = match verb {
        Verb::Mail => b"FROM:",
        Verb::Rcpt => b"TO:",
        _ => return false,
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

/// Why a line is not SMTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonSmtp {
    /// A verb from `forbidden_commands` (HTTP, proxy CONNECT).
    Forbidden,
    /// A mail header such as `Subject: hi`: a client that skipped the
    /// envelope or an open-proxy probe.
    HeaderLike,
    /// A first byte that is no letter: TLS records (the ALPACA cross-protocol
    /// attack), binary junk.
    NotALetter,
}

/// Classifies a command line as non-SMTP, or `None` for a plausible
/// command. Empty lines are plausible (they get a syntax error reply).
pub fn non_smtp(line: &[u8], forbidden: &[String]) -> Option<NonSmtp> {
    let first = *line.first()?;
    if !first.is_ascii_alphabetic() {
        return Some(NonSmtp::NotALetter);
    }
    let word = parse(line).word;
    if forbidden
        .iter()
        .any(|f| f.as_bytes().eq_ignore_ascii_case(word))
    {
        return Some(NonSmtp::Forbidden);
    }
    // A header label runs from the start to a colon with no space inside;
    // `MAIL FROM:` and `RCPT TO:` have a space before the colon.
    if let Some(colon) = line.iter().position(|&b| b == b':') {
        if line[..colon].iter().all(u8::is_ascii_graphic) {
            return Some(NonSmtp::HeaderLike);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn forbidden() -> Vec<String> {
        vec!["CONNECT".into(), "GET".into(), "POST".into()]
    }

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
    fn non_smtp_lines() {
        let f = forbidden();
        assert_eq!(non_smtp(b"GET / HTTP/1.1", &f), Some(NonSmtp::Forbidden));
        assert_eq!(
            non_smtp(b"connect 192.0.2.1:25 HTTP/1.0", &f),
            Some(NonSmtp::Forbidden)
        );
        assert_eq!(non_smtp(b"Subject: hello", &f), Some(NonSmtp::HeaderLike));
        assert_eq!(non_smtp(b"X-Mailer:x", &f), Some(NonSmtp::HeaderLike));
        assert_eq!(
            non_smtp(&[0x16, 0x03, 0x01, 0x02], &f),
            Some(NonSmtp::NotALetter)
        );
        assert_eq!(non_smtp(b"MAIL FROM:<a@b>", &f), None);
        assert_eq!(non_smtp(b"RCPT TO:<a@b>", &f), None);
        assert_eq!(non_smtp(b"EHLO x", &f), None);
        assert_eq!(non_smtp(b"", &f), None);
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
            let _ = non_smtp(&line, &forbidden());
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
