//! The FIFO of expected replies: every command queued pushes what its
//! reply answers ([`Await`]), so each reply, pipelined or not, lands on its
//! command, message and phase whatever the chunking of the input.

use std::time::{Duration, Instant};

use super::super::{ClientTimeouts, CommandKind};

/// What an outstanding reply answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Await {
    Greeting,
    Ehlo,
    Helo,
    Lhlo,
    Xclient,
    StartTls,
    /// `AUTH LOGIN` sent, 334 for the user name expected.
    AuthLoginUser,
    /// User name sent, 334 for the password expected.
    AuthLoginPass,
    /// The final AUTH reply (235 expected).
    AuthFinal,
    Mail,
    Rcpt,
    Data,
    /// End of data; `discard` when it only closes a DATA no recipient wanted.
    Dot { discard: bool },
    Bdat { last: bool },
    Rset,
    Quit,
}

impl Expect {
    /// When the command's last byte was written (or, if the driver never
    /// said, produced).
    pub(super) fn sent_time(&self) -> Instant {
        self.written_at.unwrap_or(self.queued_at)
    }
}

impl Await {
    pub(super) fn command(self) -> CommandKind {
        match self {
            Await::Greeting => CommandKind::Connect,
            Await::Ehlo => CommandKind::Ehlo,
            Await::Helo => CommandKind::Helo,
            Await::Lhlo => CommandKind::Lhlo,
            Await::Xclient => CommandKind::Xclient,
            Await::StartTls => CommandKind::StartTls,
            Await::AuthLoginUser | Await::AuthLoginPass | Await::AuthFinal => CommandKind::Auth,
            Await::Mail => CommandKind::Mail,
            Await::Rcpt => CommandKind::Rcpt,
            Await::Data => CommandKind::Data,
            Await::Dot { .. } => CommandKind::Dot,
            Await::Bdat { .. } => CommandKind::Bdat,
            Await::Rset => CommandKind::Rset,
            Await::Quit => CommandKind::Quit,
        }
    }

    pub(super) fn timeout(self, t: &ClientTimeouts) -> Duration {
        match self {
            Await::Greeting => t.greeting,
            Await::Data => t.data_init,
            Await::Bdat { last: false } => t.data_block,
            Await::Dot { .. } | Await::Bdat { last: true } => t.data_term,
            _ => t.command,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Expect {
    pub(super) what: Await,
    /// Message index (0 when the command belongs to no message).
    pub(super) msg: usize,
    /// `now` of the call that produced the command.
    pub(super) queued_at: Instant,
    /// Output offset just past the command's last byte.
    pub(super) end: u64,
    /// When that last byte was written (reported by the driver).
    pub(super) written_at: Option<Instant>,
    /// Replies still expected for this entry (LMTP end of data: one per
    /// accepted recipient); 0 = not yet known (set at the first reply).
    pub(super) remaining: u32,
}
