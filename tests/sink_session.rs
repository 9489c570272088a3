//! Protocol-engine behaviour the sink's counters rely on, checked on the
//! sans-IO session directly (no sockets).

use std::sync::Arc;
use std::time::Instant;

use smtpstorm::smtp::server::{
    CommandInfo, MessageOutcome, ServerConfig, ServerEvent, ServerHooks, ServerSession, Verdict,
};
use smtpstorm::smtp::CommandKind;

struct DataFault(Verdict);

impl ServerHooks for DataFault {
    fn on_command(&mut self, cmd: CommandKind, _info: &CommandInfo<'_>) -> Verdict {
        if cmd == CommandKind::Data {
            self.0
        } else {
            Verdict::Proceed
        }
    }
}

fn messages_after_data_fault(v: Verdict) -> Vec<(MessageOutcome, u16, u32)> {
    let now = Instant::now();
    let mut s = ServerSession::new(Arc::new(ServerConfig::default()), now);
    let mut out = Vec::new();
    let mut hooks = DataFault(v);
    s.start(now, &mut out, &mut hooks);
    s.handle_input(
        now,
        b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n",
        &mut out,
        &mut hooks,
    );
    assert!(s.is_closed());
    std::iter::from_fn(|| s.poll_event())
        .filter_map(|e| match e {
            ServerEvent::Message {
                outcome,
                code,
                recipients,
                ..
            } => Some((outcome, code, recipients)),
            _ => None,
        })
        .collect()
}

#[test]
fn data_refused_by_a_disconnect_fault_still_ends_one_message() {
    assert_eq!(
        messages_after_data_fault(Verdict::Disconnect),
        vec![(MessageOutcome::TempFailed, 0, 1)]
    );
    assert_eq!(
        messages_after_data_fault(Verdict::Disconnect421),
        vec![(MessageOutcome::TempFailed, 421, 1)]
    );
    assert_eq!(
        messages_after_data_fault(Verdict::Reply(421)),
        vec![(MessageOutcome::TempFailed, 421, 1)]
    );
}

/// Hooks that watch the config's reference count whenever the session
/// calls out, holding only a `Weak` (which does not count).
struct CountWatch {
    config: std::sync::Weak<ServerConfig>,
    max_strong: usize,
    calls: usize,
}

impl CountWatch {
    fn look(&mut self) {
        self.calls += 1;
        self.max_strong = self.max_strong.max(self.config.strong_count());
    }
}

impl ServerHooks for CountWatch {
    fn on_command(&mut self, _cmd: CommandKind, _info: &CommandInfo<'_>) -> Verdict {
        self.look();
        Verdict::Proceed
    }
    fn check_auth(&mut self, _authzid: &[u8], _user: &[u8], _pass: &[u8]) -> bool {
        self.look();
        true
    }
    fn on_message_start(&mut self) {
        self.look();
    }
    fn on_body(&mut self, _chunk: &[u8]) {
        self.look();
    }
    fn on_message_end(&mut self, _accepted: bool) {
        self.look();
    }
}

#[test]
fn no_command_clones_the_shared_config() {
    let cfg = Arc::new(ServerConfig {
        auth_enabled: true,
        starttls_available: true,
        xclient: true,
        max_message_size: 10_000,
        ..ServerConfig::default()
    });
    let now = Instant::now();
    let mut s = ServerSession::new(Arc::clone(&cfg), now);
    // Ours and the session's: every other reference would be a clone made
    // (and dropped) on the way through a command.
    assert_eq!(Arc::strong_count(&cfg), 2);
    let mut hooks = CountWatch {
        config: Arc::downgrade(&cfg),
        max_strong: 0,
        calls: 0,
    };
    let mut out = Vec::new();
    s.start(now, &mut out, &mut hooks);
    s.handle_input(
        now,
        b"EHLO a\r\nHELO a\r\nEHLO a\r\nAUTH PLAIN AGEAYg==\r\nNOOP\r\nVRFY x\r\nRSET\r\n\
          XCLIENT ADDR=192.0.2.1\r\nEHLO a\r\n\
          MAIL FROM:<a@b> SIZE=10 BODY=8BITMIME\r\nRCPT TO:<c@d> NOTIFY=NEVER\r\nDATA\r\n\
          body\r\n.\r\n\
          MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 4 LAST\r\nbody\
          MAIL FROM:<a@b> SIZE=99999\r\nBOGUS\r\nQUIT\r\n",
        &mut out,
        &mut hooks,
    );
    assert!(s.is_closed(), "{}", String::from_utf8_lossy(&out));
    assert!(
        hooks.calls > 20,
        "the hooks saw the commands: {}",
        hooks.calls
    );
    assert_eq!(
        hooks.max_strong, 2,
        "a command cloned the shared Arc<ServerConfig>"
    );
    drop(s);
    assert_eq!(Arc::strong_count(&cfg), 1);
}
