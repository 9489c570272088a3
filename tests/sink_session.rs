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
