//! The non-SMTP command test (postscreen's `postscreen_non_smtp_command_*`):
//! a line no SMTP client sends. HTTP and proxy verbs (an open-proxy probe
//! or a cross-protocol attack), mail headers (a client that skipped the
//! envelope), and lines that do not start with a letter (TLS records, the
//! ALPACA attack, binary junk).

use super::{Line, LogContext};
use crate::smtp::dialogue;
use crate::smtp::params::Params;
use crate::smtp::text::{escape, Peer};

/// The reply under `drop` (postscreen's own).
pub const DROP_REPLY: &str = "521 5.7.0 Error: I can break rules, too. Goodbye.";

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
/// `forbidden` holds upper-case verbs.
pub fn classify(line: &[u8], forbidden: &[String]) -> Option<NonSmtp> {
    let first = *line.first()?;
    if !first.is_ascii_alphabetic() {
        return Some(NonSmtp::NotALetter);
    }
    let word = dialogue::parse(line).word;
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

/// Whether the line is not SMTP.
pub fn check(line: &Line<'_>, p: &Params) -> bool {
    classify(line.text, &p.forbidden_commands).is_some()
}

/// `NON-SMTP COMMAND from [addr]:port after VERB: <line>`, with the kind.
pub fn log(line: &Line<'_>, p: &Params, cx: &LogContext<'_>) {
    tracing::info!(
        client = %Peer(cx.client),
        kind = ?classify(line.text, &p.forbidden_commands),
        "NON-SMTP COMMAND from {} after {}: {}",
        Peer(cx.client),
        cx.last,
        escape(line.text)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::screen::TestId;
    use crate::smtp::session::testing::{deep, params, Run};
    use crate::smtp::session::Todo;
    use proptest::prelude::*;

    fn forbidden() -> Vec<String> {
        vec!["CONNECT".into(), "GET".into(), "POST".into()]
    }

    #[test]
    fn non_smtp_lines() {
        let f = forbidden();
        assert_eq!(classify(b"GET / HTTP/1.1", &f), Some(NonSmtp::Forbidden));
        assert_eq!(
            classify(b"connect 192.0.2.1:25 HTTP/1.0", &f),
            Some(NonSmtp::Forbidden)
        );
        assert_eq!(classify(b"Subject: hello", &f), Some(NonSmtp::HeaderLike));
        assert_eq!(classify(b"X-Mailer:x", &f), Some(NonSmtp::HeaderLike));
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02], &f),
            Some(NonSmtp::NotALetter)
        );
        assert_eq!(classify(b"MAIL FROM:<a@b>", &f), None);
        assert_eq!(classify(b"RCPT TO:<a@b>", &f), None);
        assert_eq!(classify(b"EHLO x", &f), None);
        assert_eq!(classify(b"", &f), None);
    }

    #[test]
    fn check_uses_the_configured_verbs() {
        let p = params(|p| p.forbidden_commands = vec!["XHTTP".into()]);
        let line = |text: &'static [u8]| Line {
            text,
            bare: false,
            after: b"",
        };
        assert!(check(&line(b"xhttp /"), &p));
        assert!(!check(&line(b"GET /"), &p), "GET is no longer forbidden");
        assert!(check(&line(b"Subject: x"), &p));
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
            assert_eq!(r.fails(), [TestId::NonSmtpCommand]);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

        /// No byte string makes the classifier panic.
        #[test]
        fn classify_takes_any_bytes(line in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = classify(&line, &forbidden());
        }
    }
}
