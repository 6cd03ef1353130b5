//! The bare newline test (postscreen's `postscreen_bare_newline_*`): a
//! command line that ends in LF without CR. RFC 5321 requires CRLF; real
//! MTAs send it, hand-rolled bots often do not. Off by default, and its
//! default action is `ignore`: some legitimate software still gets it wrong.

use super::{Line, LogContext};
use crate::smtp::params::Params;
use crate::smtp::text::Peer;

/// The reply under `drop`.
pub const DROP_REPLY: &str = "521 5.5.1 Protocol error";

/// Whether the line ended in a bare LF.
pub fn check(line: &Line<'_>, _p: &Params) -> bool {
    line.bare
}

/// `BARE NEWLINE from [addr]:port after <the line>`, as postscreen
/// writes it: the line that ended bare, escaped and cut.
pub fn log(line: &Line<'_>, _p: &Params, cx: &LogContext<'_>) {
    tracing::info!(
        client = %Peer(cx.client),
        "BARE NEWLINE from {} after {}",
        Peer(cx.client),
        crate::smtp::text::escape(line.text)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::screen::TestId;
    use crate::smtp::session::testing::{deep, params, Run};
    use crate::smtp::session::{Plan, Todo};

    #[test]
    fn only_a_lf_without_cr_is_bare() {
        let p = params(|_| {});
        let line = |bare| Line {
            text: b"HELO c",
            bare,
            after: b"",
        };
        assert!(check(&line(true), &p));
        assert!(!check(&line(false), &p));
    }

    #[tokio::test(start_paused = true)]
    async fn bare_newline_ignored_but_not_allowlisted() {
        let mut r = Run::start(params(deep), Todo::ALL);
        r.wait(6).await;
        r.say(b"HELO c\n");
        r.say(b"MAIL FROM:<>\r\n");
        r.say(b"RCPT TO:<b@example.net>\r\n");
        assert_eq!(r.fails(), [TestId::BareNewline]);
        assert_eq!(r.pass(), None);
        assert!(matches!(r.handoff(), Some(Plan::Replay { .. })));
    }
}
