//! The sans-IO SMTP/LMTP server session (the sink's protocol engine).
//!
//! Bytes and `now` go in (`handle_input`, `handle_timeout`,
//! `handle_tls_established`); replies are appended to a caller-owned `out`,
//! events come out of `poll_event`, the next deadline out of `poll_timeout`.
//!
//! Invariants:
//! - Results do not depend on how the input is split into `handle_input`
//!   calls: one byte at a time and all at once give the same replies, events
//!   and hook calls.
//! - Never panics on any input; never reads a clock.
//! - Buffered input is bounded: a partial command line (< 512 bytes; longer
//!   lines are discarded up to their LF and answered `500 5.5.2`), a partial
//!   PROXY header, or — only while a fault `Delay` holds a reply — whatever
//!   the driver reads before `wants_read()` turns false at 64 KiB.
//! - DATA and BDAT bodies are never buffered: they are scanned in place and
//!   streamed to [`ServerHooks::on_body`] as slices of the input.
//! - After STARTTLS is answered, every plaintext byte until
//!   `handle_tls_established` is dropped (CVE-2011-0411).
//! - Every message transaction that reaches its end (`CRLF.CRLF`, BDAT LAST,
//!   or a DATA refused by a fault verdict) yields exactly one
//!   [`ServerEvent::Message`]; `on_message_start` / `on_message_end` calls
//!   are balanced.
//! - In steady state nothing allocates per command: paths live in reused
//!   buffers, events in a reused queue. Nothing shared is written per
//!   command either: the `Arc<ServerConfig>` is read in place, never cloned
//!   (a clone is an atomic read-modify-write on a line every thread of the
//!   sink shares).
//!
//! Choices the RFCs leave open, documented here: a text line over 1000 bytes
//! inside DATA makes the message end with `500 5.5.2` (the body is still read
//! to its real end); a body over the size limit ends with `552 5.3.4`. BDAT
//! LAST consults the `Dot` verdict for the message outcome, like the end of
//! DATA. The greeting verdict `Reply(5xx)` puts the session in a refusing
//! state (503 to everything but QUIT, RFC 5321 3.1); `Reply(4xx)` closes.
//!
//! Layout: this file holds the types (the configuration, the hooks, the
//! events, and the session's state); `session` its cycle (`handle_*`,
//! `poll_*`, the input loop that cuts input into lines and bodies) and what
//! every command shares (the fault verdict, replies, closing); `verbs` one
//! function per command; `txn` the mail transaction (MAIL, RCPT, the
//! recipients); `body` DATA and BDAT, their bodies and the message's end;
//! `auth` AUTH and its continuation lines; `peer` what the client says it
//! is (the PROXY header, XCLIENT). Every reply goes through
//! [`super::wire`]'s writers.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::data::DataScanner;
use super::proxy::ProxyHeader;
use super::{BareLfPolicy, CommandKind, ServerTimeouts};

/// Ask the fault hook about a command; return early unless it may proceed.
macro_rules! gate {
    ($s:ident, $hooks:ident, $kind:expr, $arg:expr, $now:ident, $out:ident) => {{
        let v = $s.verdict($hooks, $kind, $arg, None, None);
        match $s.apply(v, $kind, $now, $out, $hooks) {
            Flow::Go => {}
            f => return f,
        }
    }};
}

mod auth;
mod body;
mod peer;
mod session;
mod txn;
mod verbs;
mod verdict;

pub use peer::XCLIENT_ATTRIBUTES;

use auth::AuthBuffers;
use body::Chunk;
use txn::Txn;

/// Input held while a fault delay is pending, beyond which `wants_read()`
/// is false.
pub const MAX_PENDING_INPUT: usize = 64 * 1024;
/// Error replies (500..=504) after which the session says 421 and closes.
pub const MAX_ERRORS: u32 = 20;

/// ESMTP extensions the server advertises (and accepts parameters for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extensions {
    pub pipelining: bool,
    pub size: bool,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub enhancedstatuscodes: bool,
    pub chunking: bool,
    pub dsn: bool,
}

impl Default for Extensions {
    fn default() -> Self {
        Self {
            pipelining: true,
            size: true,
            eightbitmime: true,
            smtputf8: true,
            enhancedstatuscodes: true,
            chunking: true,
            dsn: true,
        }
    }
}

/// Server behaviour, shared read-only by every session of a thread.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub hostname: String,
    pub lmtp: bool,
    /// Largest accepted body in bytes; 0 = unlimited.
    pub max_message_size: u64,
    /// Most recipients per message; 0 = unlimited.
    pub max_recipients: usize,
    pub bare_lf: BareLfPolicy,
    pub starttls_available: bool,
    pub require_tls: bool,
    pub auth_enabled: bool,
    pub auth_requires_tls: bool,
    pub proxy_protocol: bool,
    pub xclient: bool,
    pub ext: Extensions,
    pub timeouts: ServerTimeouts,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            hostname: "localhost".to_owned(),
            lmtp: false,
            max_message_size: 0,
            max_recipients: 1000,
            bare_lf: BareLfPolicy::Reject,
            starttls_available: false,
            require_tls: false,
            auth_enabled: false,
            auth_requires_tls: false,
            proxy_protocol: false,
            xclient: false,
            ext: Extensions::default(),
            timeouts: ServerTimeouts::default(),
        }
    }
}

/// What the driver (fault injection) wants done with one command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Proceed,
    /// Answer this code (with a fitting enhanced code) instead of acting.
    /// Codes below 400 mean Proceed; 421 also closes.
    Reply(u16),
    /// Hold the reply and stop consuming input until `now + d`, then proceed.
    Delay(Duration),
    /// Close without a reply.
    Disconnect,
    /// `421 4.3.2` then close.
    Disconnect421,
}

/// What the hook is told about a command.
#[derive(Clone, Copy, Debug)]
pub struct CommandInfo<'a> {
    /// The command's argument (after the verb), or empty.
    pub arg: &'a [u8],
    /// The sender of the transaction (for MAIL: the new sender).
    pub mail_from: Option<&'a [u8]>,
    /// For RCPT: the recipient being added.
    pub rcpt_to: Option<&'a [u8]>,
    /// The client address given by PROXY or XCLIENT.
    pub peer: Option<SocketAddr>,
}

/// Driver callbacks. All have defaults: accept everything.
pub trait ServerHooks {
    fn on_command(&mut self, _cmd: CommandKind, _info: &CommandInfo<'_>) -> Verdict {
        Verdict::Proceed
    }
    fn check_auth(&mut self, _authzid: &[u8], _user: &[u8], _pass: &[u8]) -> bool {
        true
    }
    fn on_message_start(&mut self) {}
    /// Unstuffed body bytes, in order.
    fn on_body(&mut self, _chunk: &[u8]) {}
    fn on_message_end(&mut self, _accepted: bool) {}
}

/// Hooks that accept everything and look at nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHooks;
impl ServerHooks for NoHooks {}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageOutcome {
    Accepted,
    TempFailed,
    Rejected,
}

impl MessageOutcome {
    fn of(code: u16) -> Self {
        match code {
            200..=399 => Self::Accepted,
            400..=499 | 0 => Self::TempFailed,
            _ => Self::Rejected,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    Quit,
    Timeout,
    Fault,
    ProxyError,
    TooManyErrors,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    Proxy(ProxyHeader),
    /// 220 written to `out`: flush it in plaintext, then start the TLS handshake.
    StartTls,
    Authenticated,
    /// One per DATA/BDAT-LAST transaction (code 0 = closed by a fault).
    Message { outcome: MessageOutcome, code: u16, bytes: u64, recipients: u32 },
    /// Every reply written, for tallies.
    Reply { command: CommandKind, code: u16 },
    /// After flushing `out`, close the connection.
    Close(CloseReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Before `start`.
    Init,
    /// Waiting for the PROXY header.
    Proxy,
    /// Greeting held by a fault delay.
    Greeting,
    Command,
    Data,
    Bdat,
    AuthPlain,
    AuthLoginUser,
    AuthLoginPass,
    /// STARTTLS answered; waiting for `handle_tls_established`.
    TlsHandshake,
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Greeting,
    /// The command line at the start of the buffered input.
    Line,
    /// A message end (reply kind Dot or Bdat) with its body size.
    End(CommandKind, u64),
}

/// What a command did with its line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    /// The verdict lets the command act (only between `apply` and the act).
    Go,
    /// The line is consumed.
    Done,
    /// A fault delay holds the line: consume nothing until it ends.
    Hold,
}

/// What one step of the input loop did with the input it was shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Used this many bytes; the next step may use more.
    Go(usize),
    /// Used this many bytes; nothing more until more input, or the end of a
    /// delay.
    Stop(usize),
}

/// A reply decided in advance (code, enhanced code, text).
type Canned = (u16, &'static str, &'static str);

/// One SMTP server session. See the module docs.
pub struct ServerSession {
    config: Arc<ServerConfig>,
    phase: Phase,
    tls: bool,
    /// A hello was accepted (since the start, STARTTLS or XCLIENT).
    greeted: bool,
    authenticated: bool,
    /// The greeting verdict refused the session: 503 to all but QUIT.
    refused: bool,
    /// The client address given by PROXY or XCLIENT.
    peer: Option<SocketAddr>,
    /// The mail transaction (its buffers are reused from one to the next).
    txn: Txn,
    /// The BDAT chunk being read (in `Phase::Bdat`).
    chunk: Chunk,
    /// The DATA body scanner (in `Phase::Data`).
    scanner: DataScanner,
    // Input.
    inbuf: Vec<u8>,
    /// Inside an overlong line: drop input up to its LF.
    discarding: bool,
    // Time.
    deadline: Instant,
    delay_until: Option<Instant>,
    held: Option<Held>,
    /// The held command, released by its delay, does not ask again.
    skip_verdict: bool,
    /// Error replies so far (500..=504), for [`MAX_ERRORS`].
    errors: u32,
    auth: AuthBuffers,
    events: VecDeque<ServerEvent>,
}
