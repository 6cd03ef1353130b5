//! The pregreet test (postscreen's `postscreen_greet_*`): the client talks
//! before it is greeted. We send the `220-` teaser (a multi-line greeting
//! that is not finished) and wait `greet_wait`; an SMTP client waits for
//! the final `220 `, a bot that writes its script at once shows itself.
//!
//! The session judges only the first burst: later bytes are kept for the
//! next stage but not logged again.

use std::net::SocketAddr;

use crate::smtp::params::Params;
use crate::smtp::text::{escape, Peer};

/// The reply under `drop`.
pub const DROP_REPLY: &str = "521 5.5.1 Protocol error";
/// The reply to every RCPT TO under `enforce`.
pub const ENFORCE_REPLY: &str = "550 5.5.1 Protocol error";

/// Whether input that arrives during the greet wait is a pregreet: only
/// when a teaser was sent (without one only the DNSBL is awaited and there
/// is nothing to judge), and only the first time.
pub fn check(p: &Params, failed_already: bool) -> bool {
    !p.greet_banner.is_empty() && !failed_already
}

/// `PREGREET <bytes> after <seconds> from [addr]:port: <what it said>`.
pub fn log(bytes: &[u8], elapsed: f64, client: SocketAddr) {
    tracing::info!(
        client = %Peer(client),
        "PREGREET {} after {} from {}: {}",
        bytes.len(),
        crate::logging::Delta(std::time::Duration::try_from_secs_f64(elapsed).unwrap_or_default()),
        Peer(client),
        escape(bytes)
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::screen::{Action, TestId};
    use crate::smtp::session::testing::{params, Run};
    use crate::smtp::session::{Plan, Todo};

    #[test]
    fn no_teaser_no_pregreet() {
        assert!(check(&params(|_| {}), false));
        assert!(!check(&params(|_| {}), true), "only the first burst");
        assert!(!check(&params(|p| p.greet_banner = String::new()), false));
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
        assert_eq!(pass[TestId::Pregreet], Some(Duration::from_secs(86_400)));
        assert_eq!(pass[TestId::Pipelining], None, "deep tests are off");
    }

    #[tokio::test(start_paused = true)]
    async fn pregreet_drop() {
        let mut r = Run::start(
            params(|p| p.tests[TestId::Pregreet].action = Action::Drop),
            Todo::ALL,
        );
        r.wait(1).await;
        assert_eq!(r.say(b"EHLO bot\r\n"), "521 5.5.1 Protocol error\r\n");
        assert!(r.closed());
        assert_eq!(r.fails(), [TestId::Pregreet]);
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
}
