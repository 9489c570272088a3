//! The sans-IO SMTP/LMTP client session (the blaster's protocol engine).
//!
//! A [`ClientSession`] runs one scripted session: greeting, EHLO (HELO on a
//! 5xx, LHLO in LMTP mode), optional STARTTLS and re-EHLO, optional AUTH
//! PLAIN/LOGIN, then one MAIL / RCPT… / DATA (or BDAT) transaction per
//! [`Message`], then QUIT. Bytes and time come in (`handle_*`), bytes,
//! events and the next deadline go out (`poll_*`); it never reads a clock.
//!
//! Invariants:
//! - Every reply is attributed to the command it answers through a FIFO of
//!   expected replies, so pipelined replies (RFC 2920) land on the right
//!   message and phase whatever the chunking of the input.
//! - Every message handed to [`ClientSession::new`] gets exactly one
//!   [`ClientEvent::Message`], whatever happens (refused greeting, protocol
//!   error, timeout, close), and [`ClientEvent::Done`] comes exactly once,
//!   after all of them.
//! - No input from the network makes it panic; memory is bounded by the
//!   reply parser's limits plus the bytes of the commands and bodies queued.
//! - After `Done`, every `handle_*` call is a no-op.
//!
//! Pipelining groups (when advertised, or forced by
//! [`PipeliningMode::On`]): `MAIL RCPT… DATA` in one write; after 354
//! the dot-stuffed body, `.CRLF` and the next transaction's group (or QUIT)
//! in one write. With BDAT: `MAIL RCPT… BDAT n LAST <bytes>` in one
//! write, and the next group after the final reply. A RSET (after a failed
//! transaction) goes alone and the next group waits for its reply: a server
//! that refuses it kept a transaction the next group would join. Without
//! pipelining every command waits for its reply.
//!
//! XCLIENT ([`ClientSession::set_xclient`], Postfix's extension): right
//! after the first EHLO/LHLO reply, before STARTTLS and AUTH, the session
//! sends `XCLIENT <attributes>`; the server answers with a new 220 greeting,
//! and the session says EHLO again (so `ehlo` is reported twice).
//!
//! Endings: a 4xx/5xx greeting, EHLO/HELO, XCLIENT, STARTTLS or AUTH reply
//! fails every message (TempFailed / Rejected by class) and is followed by
//! QUIT; so is a required XCLIENT, STARTTLS or CHUNKING the server did not
//! offer (Rejected, code 0, plus an [`ClientEvent::Error`]). A 421 to any command
//! but QUIT TempFails every open message and ends at once (the server is
//! closing). A malformed or out-of-place reply (ProtocolError), a timeout
//! (Timeout) or a close (ConnectionError) ends at once too; a close after
//! QUIT with every message decided is a normal end. A refused MAIL needs no
//! RSET; a transaction whose MAIL was accepted but which ended without data
//! (no recipient, DATA or a BDAT chunk refused) is followed by RSET, and a
//! refused RSET fails every open message by its class and QUITs; a 354 for a
//! transaction whose MAIL was refused closes at once (ending that DATA would
//! commit a transaction the server kept open).
//!
//! Latency is defined by the bytes on the wire. The driver reports how much
//! of the output has actually left (written to the socket, or for TLS: its
//! records fully flushed) with [`ClientSession::handle_written`]; each
//! command's reply is timed from the moment its last byte was written (a
//! driver that never reports writes gets the time the command was produced).
//! `ehlo` is reported for every hello reply (so an EHLO refused then HELO
//! counts twice); `auth` runs from the first AUTH line written to the final
//! AUTH reply; `body` from the 354 (or the first BDAT byte written) to the
//! last byte of data written; `message` from that last byte (`.CRLF`, or the
//! end of `BDAT … LAST`) to the final reply, once per message (LMTP: the
//! last one). Pipelined commands written together share their start, so
//! replies the server sends in one write give equal `mail`/`rcpt`/`data`.
//! When the driver gives intended times (open loop), every phase event also
//! carries the latency counted from the message's intended time (session
//! phases: from the session's intended start).
//!
//! Output is a queue of command bytes and shared bodies: a body the builder
//! pre-stuffed ([`Message::data`]) is never copied into the queue, and the
//! driver takes output in bounded pieces ([`ClientSession::poll_transmit_max`]),
//! so a large message is never buffered whole per connection.
//!
//! Open sessions ([`ClientSession::open`]): the driver hands messages in one
//! at a time ([`ClientSession::push_message`]); between messages the session
//! idles (no deadline, [`ClientSession::is_idle`]) instead of quitting, until
//! [`ClientSession::handle_no_more_messages`]. A server that closes an idle
//! session ends it normally.
//!
//! LMTP (RFC 2033): after the end of data the server sends one reply per
//! accepted recipient. The message is `Accepted` if every one of them is
//! 2xx; otherwise the worst decides: any 5xx makes it `Rejected`, else any
//! 4xx makes it `TempFailed`; `code` is the first reply of that worst class.
//! `recipients_accepted` always counts RCPTs that got a 2xx.
//!
//! Layout: this file holds the types (the configuration, messages, events,
//! errors, and the session's state); `session` the session's cycle
//! (`handle_*`, `poll_*`), its endings and the helpers every part uses;
//! `replies` one function per kind of reply (the FIFO of `expect` says what
//! each reply answers); `commands` what to send next, one function per
//! command; `txn` the per-message bookkeeping; `outq` the output queue of
//! command bytes and shared bodies; `stuff` dot-stuffing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::reply::{Capabilities, ReplyError, ReplyParser};
use super::{ClientTimeouts, CommandKind, Outcome, Phase};

mod commands;
mod expect;
mod outq;
mod replies;
mod session;
mod stuff;
mod txn;

pub use stuff::{dot_stuff, STUFF_IN_PLACE_BYTES};

use expect::Expect;
use outq::OutQueue;
use txn::Txn;

/// Whether to pipeline commands (RFC 2920).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PipeliningMode {
    /// Pipeline if the server advertises PIPELINING.
    #[default]
    Auto,
    /// Always pipeline.
    On,
    /// Never pipeline.
    Off,
}

/// AUTH mechanism the client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMech {
    /// `AUTH PLAIN <base64(\0user\0pass)>`, 235 expected.
    Plain,
    /// `AUTH LOGIN`, 334, user, 334, password, 235.
    Login,
}

/// Credentials for AUTH.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientAuth {
    pub mech: AuthMech,
    pub user: String,
    pub pass: String,
}

/// What one client session does.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub helo_name: String,
    /// Speak LMTP: LHLO, one final reply per accepted recipient.
    pub lmtp: bool,
    pub pipelining: PipeliningMode,
    /// Require STARTTLS (a server that does not offer it fails every message).
    pub starttls: bool,
    /// The connection is TLS from the start (port 465); no STARTTLS.
    pub implicit_tls: bool,
    pub auth: Option<ClientAuth>,
    /// Send bodies with BDAT (requires CHUNKING).
    pub bdat: bool,
    /// Largest BDAT chunk; 0 = the whole message in one `BDAT n LAST`.
    pub bdat_chunk_size: usize,
    pub timeouts: ClientTimeouts,
    pub send_quit: bool,
    /// Emit [`ClientEvent::Banner`] and [`ClientEvent::Capabilities`] (probe).
    pub capture_text: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            helo_name: "smtpstorm.localhost".to_owned(),
            lmtp: false,
            pipelining: PipeliningMode::Auto,
            starttls: false,
            implicit_tls: false,
            auth: None,
            bdat: false,
            bdat_chunk_size: 0,
            timeouts: ClientTimeouts::default(),
            send_quit: true,
            capture_text: false,
        }
    }
}

/// One message to send. Its bytes on the wire are `header ++ body`.
#[derive(Clone, Debug)]
pub struct Message {
    /// Reverse path without angle brackets (empty for the null sender).
    pub mail_from: String,
    /// MAIL parameters, e.g. `SIZE=1234 BODY=8BITMIME`; may be empty.
    pub mail_params: String,
    pub rcpt_to: Vec<String>,
    pub header: Vec<u8>,
    pub body: Arc<[u8]>,
    /// `body` already dot-stuffed and followed by `.CRLF`, built once by the
    /// message builder and shared; used for DATA when `header` is empty or
    /// ends with CRLF, and then `header` is sent as it is: it must have no
    /// line starting with `.` (the builder's never do). `None`: the session
    /// stuffs `header ++ body` itself.
    pub data: Option<Arc<[u8]>>,
}

impl Message {
    /// Bytes of the message (`header ++ body`), before dot-stuffing.
    pub fn len(&self) -> usize {
        self.header.len() + self.body.len()
    }

    /// True if the message has no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the session tells its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// A phase ended: `latency` from its start (see the module doc) to its
    /// end; `corrected` from the intended time of its message (or of the
    /// session, for session phases) when the driver gave one.
    Phase { phase: Phase, latency: Duration, corrected: Option<Duration> },
    /// A reply arrived for `command`.
    Reply { command: CommandKind, code: u16 },
    /// STARTTLS got 220: flush output, start the TLS client handshake, then
    /// call [`ClientSession::handle_tls_established`].
    StartTls,
    /// The one outcome of message `index` (counted from 0 over the whole
    /// session, pushed messages included); `bytes` is its size (`header ++
    /// body`).
    Message { index: usize, outcome: Outcome, code: u16, recipients_accepted: u32, bytes: u64 },
    /// The greeting's text lines joined by `\n` (only with `capture_text`).
    Banner(String),
    /// The EHLO/LHLO reply lines (only with `capture_text`).
    Capabilities(Vec<String>),
    /// A human-readable reason for an abnormal end.
    Error(String),
    /// The reply that refused a message (4xx or 5xx), as a failure reason:
    /// the command it answered and the reply's first line, e.g.
    /// `dot: 550 5.5.2 Message contains bare LF or bare CR, rejected`.
    /// Comes just before that message's [`ClientEvent::Message`]; made only
    /// for refused messages (nothing is allocated for an accepted one).
    Refused(String),
    /// The session is over: the driver closes the connection.
    Done,
}

/// Why a session ended abnormally (the text of [`ClientEvent::Error`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClientError {
    #[error("malformed reply: {0}")]
    Reply(#[from] ReplyError),
    #[error("unexpected reply {code} to {command}")]
    UnexpectedReply { command: &'static str, code: u16 },
    #[error("reply {0} with no command outstanding")]
    Unsolicited(u16),
    #[error("{command} refused with {code}")]
    Refused { command: &'static str, code: u16 },
    #[error("service closing ({0})")]
    ServiceClosing(u16),
    #[error("STARTTLS required but not offered")]
    StartTlsNotOffered,
    #[error("XCLIENT required but not offered")]
    XclientNotOffered,
    #[error("BDAT required but CHUNKING not offered")]
    ChunkingNotOffered,
    #[error("timeout waiting for the {0} reply")]
    Timeout(&'static str),
    #[error("timeout waiting for the TLS handshake")]
    TlsTimeout,
    #[error("connection closed while waiting for the {0} reply")]
    Closed(&'static str),
}

/// Coarse session state; the FIFO of expected replies holds the details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Greeting,
    Hello,
    /// XCLIENT sent; its 220 (a new greeting) expected.
    Xclient,
    StartTls,
    /// STARTTLS got 220; waiting for `handle_tls_established`.
    TlsHandshake,
    Auth,
    Transactions,
    /// QUIT sent (or no QUIT to send): done once the FIFO drains.
    Closing,
    Done,
}


/// One client SMTP session (see the module doc).
pub struct ClientSession {
    config: Arc<ClientConfig>,
    messages: Vec<Message>,
    txns: Vec<Txn>,
    unfinished: usize,
    next_msg: usize,
    /// Index (in events) of `messages[0]`: open sessions drop the messages
    /// they finished.
    msg_base: usize,
    state: State,
    expects: VecDeque<Expect>,
    parser: ReplyParser,
    /// The command the last reply answered (for [`ClientEvent::Refused`]).
    last_reply_to: CommandKind,
    tx: OutQueue,
    /// Output offset written so far, as reported by the driver.
    written: u64,
    /// `(offset of the first BDAT byte, message)` not yet written: the
    /// message's `body` phase starts when that byte leaves.
    bdat_starts: VecDeque<(u64, usize)>,
    /// Open session: wait for more messages instead of quitting.
    keep_open: bool,
    /// `next_txn` found no message to send (an open session between messages).
    awaiting_message: bool,
    /// The session's intended start (open loop), for corrected latency.
    intended_start: Option<Instant>,
    events: VecDeque<ClientEvent>,
    caps: Capabilities,
    created: Instant,
    pipelining: bool,
    tls_active: bool,
    authed: bool,
    /// XCLIENT attributes still to send (taken when sent).
    xclient: Option<Box<[u8]>>,
    rset_pending: bool,
    /// Time of the last reply or output written (or of session creation).
    last_progress: Instant,
    starttls_sent: Instant,
    tls_wait_since: Instant,
    auth_started: Option<Instant>,
    deadline: Option<Instant>,
}
