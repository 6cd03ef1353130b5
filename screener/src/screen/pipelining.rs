//! The pipelining test (postscreen's `postscreen_pipelining_*`): the client
//! sent more input before our reply to a command. The dummy engine never
//! announces PIPELINING, so an SMTP client must wait for each reply; a bot
//! that writes its whole script at once does not.

use super::{Line, LogContext};
use crate::smtp::dialogue;
use crate::smtp::params::Params;
use crate::smtp::text::{escape, Peer};

/// The reply under `drop`.
pub const DROP_REPLY: &str = "521 5.5.1 Protocol error";

/// Whether input followed the line before its reply.
pub fn check(line: &Line<'_>, _p: &Params) -> bool {
    !line.after.is_empty()
}

/// `COMMAND PIPELINING from [addr]:port after VERB: <what followed>`,
/// naming the command the client did not wait for.
pub fn log(line: &Line<'_>, _p: &Params, cx: &LogContext<'_>) {
    tracing::info!(
        client = %Peer(cx.client),
        "COMMAND PIPELINING from {} after {}: {}",
        Peer(cx.client),
        dialogue::parse(line.text).verb.name(),
        escape(line.after)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::screen::TestId;
    use crate::smtp::session::testing::{deep, params, Run};
    use crate::smtp::session::Todo;

    #[test]
    fn input_past_the_line_is_pipelining() {
        let p = params(|_| {});
        let line = |after: &'static [u8]| Line {
            text: b"EHLO bot",
            bare: false,
            after,
        };
        assert!(check(&line(b"MAIL FROM:<a@b>\r\n"), &p));
        assert!(check(&line(b"M"), &p));
        assert!(!check(&line(b""), &p));
    }

    #[tokio::test(start_paused = true)]
    async fn pipelining_enforced() {
        let mut r = Run::start(params(deep), Todo::ALL);
        r.wait(6).await;
        let reply = r.say(b"EHLO bot\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n");
        assert!(reply.ends_with("550 5.5.1 Protocol error\r\n"), "{reply}");
        assert_eq!(r.fails(), [TestId::Pipelining]);
        assert_eq!(r.handoff(), None);
    }
}
