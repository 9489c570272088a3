//! The SMTP protocol as sans-IO state machines.
//!
//! Nothing in this module touches a socket, a thread or a clock: input is
//! bytes plus a `now: Instant` passed in by the caller, output is bytes
//! appended to a caller-owned buffer, events polled by the caller, and the
//! next deadline (`poll_timeout`). Every I/O backend drives the same
//! [`server::ServerSession`] (the sink) and [`client::ClientSession`] (the
//! blaster), so a test of the protocol here is a test of every backend.
//!
//! Layout: `wire` parses command lines and formats replies, `data` scans a
//! DATA body for its end in place, `server` and `client` are the two session
//! state machines, `auth` decodes AUTH PLAIN/LOGIN, `proxy` parses and writes
//! PROXY protocol v1/v2 headers, `reply` parses replies on the client side.

pub mod auth;
pub mod client;
pub mod data;
pub mod proxy;
pub mod reply;
pub mod server;
pub mod wire;

use std::time::Duration;

/// RFC 5321 4.5.3.1.4: the longest command line, CRLF included.
pub const MAX_COMMAND_LINE: usize = 512;
/// RFC 5321 4.5.3.1.6: the longest text line, CRLF included.
pub const MAX_TEXT_LINE: usize = 1000;
/// RFC 5321 4.5.3.1.3: the longest path, angle brackets included.
pub const MAX_PATH: usize = 256;

/// What to do with bare LF, bare CR and the smuggling sequences
/// (`LF.LF`, `LF.CRLF`, `CR.CR`, `CRLF.LF`, `CR CR LF`) inside DATA.
///
/// Only `CRLF.CRLF` ends a message under `Reject` and `Normalize`; under no
/// policy but `Accept` may one DATA become two messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BareLfPolicy {
    /// Read the message to its real end, then answer `550 5.5.2` (never 250).
    #[default]
    Reject,
    /// Accept the message; bare LF / bare CR in the body are delivered as CRLF.
    Normalize,
    /// Accept the message as it came (the permissive, smuggling-prone mode):
    /// `LF.LF` and `LF.CRLF` also end DATA.
    Accept,
}

impl std::str::FromStr for BareLfPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reject" => Ok(Self::Reject),
            "normalize" => Ok(Self::Normalize),
            "accept" => Ok(Self::Accept),
            _ => Err(format!("expected reject|normalize|accept, got `{s}`")),
        }
    }
}

/// The SMTP commands (and pseudo-commands) a reply can answer. Used for
/// per-command reply tallies and for fault injection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CommandKind {
    /// The connection itself (the greeting answers it).
    Connect,
    Helo,
    Ehlo,
    Lhlo,
    Mail,
    Rcpt,
    Data,
    /// The end of a DATA body (`CRLF.CRLF`); its reply is the message outcome.
    Dot,
    Bdat,
    Rset,
    Noop,
    Vrfy,
    Expn,
    Help,
    Quit,
    StartTls,
    Auth,
    Xclient,
    /// A line that is no known command (500), or too long (500 5.5.2).
    Unknown,
}

impl CommandKind {
    pub const ALL: [CommandKind; 19] = [
        Self::Connect, Self::Helo, Self::Ehlo, Self::Lhlo, Self::Mail, Self::Rcpt, Self::Data,
        Self::Dot, Self::Bdat, Self::Rset, Self::Noop, Self::Vrfy, Self::Expn, Self::Help,
        Self::Quit, Self::StartTls, Self::Auth, Self::Xclient, Self::Unknown,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Helo => "helo",
            Self::Ehlo => "ehlo",
            Self::Lhlo => "lhlo",
            Self::Mail => "mail",
            Self::Rcpt => "rcpt",
            Self::Data => "data",
            Self::Dot => "dot",
            Self::Bdat => "bdat",
            Self::Rset => "rset",
            Self::Noop => "noop",
            Self::Vrfy => "vrfy",
            Self::Expn => "expn",
            Self::Help => "help",
            Self::Quit => "quit",
            Self::StartTls => "starttls",
            Self::Auth => "auth",
            Self::Xclient => "xclient",
            Self::Unknown => "unknown",
        }
    }
}

/// The phases of a client session whose latency the blaster measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// TCP connect (measured by the driver, not the session).
    Connect,
    /// From connection established to the greeting's last line.
    Banner,
    Ehlo,
    /// STARTTLS command to TLS handshake done (or the TLS handshake alone
    /// with implicit TLS).
    StartTls,
    Auth,
    Mail,
    Rcpt,
    /// DATA written to its 354.
    Data,
    /// Upload of the message: the 354 (or the first BDAT byte written) to the
    /// last byte of data written.
    Body,
    /// Last byte of data (`.CRLF`, or the end of BDAT LAST) written to the
    /// final reply.
    Message,
    Quit,
    /// Whole session, connect start to close (measured by the driver).
    Session,
}

impl Phase {
    pub const ALL: [Phase; 12] = [
        Self::Connect, Self::Banner, Self::Ehlo, Self::StartTls, Self::Auth, Self::Mail,
        Self::Rcpt, Self::Data, Self::Body, Self::Message, Self::Quit, Self::Session,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Banner => "banner",
            Self::Ehlo => "ehlo",
            Self::StartTls => "starttls",
            Self::Auth => "auth",
            Self::Mail => "mail",
            Self::Rcpt => "rcpt",
            Self::Data => "data",
            Self::Body => "body",
            Self::Message => "message",
            Self::Quit => "quit",
            Self::Session => "session",
        }
    }
    pub fn index(self) -> usize {
        self as usize
    }
}

/// How one attempted message ended. Every attempted message has exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Final reply 2xx.
    Accepted,
    /// A 4xx reply (to MAIL, every RCPT, DATA or the final dot) ended it.
    TempFailed,
    /// A 5xx reply ended it.
    Rejected,
    /// The connection failed or closed before the final reply.
    ConnectionError,
    /// A timeout expired before the final reply.
    Timeout,
    /// The peer answered with something that is no SMTP reply.
    ProtocolError,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::TempFailed => "tempfailed",
            Self::Rejected => "rejected",
            Self::ConnectionError => "connection_error",
            Self::Timeout => "timeout",
            Self::ProtocolError => "protocol_error",
        }
    }
}

/// Server-side timeouts (RFC 5321 4.5.3.2 defaults).
#[derive(Clone, Copy, Debug)]
pub struct ServerTimeouts {
    /// Waiting for the next command (4.5.3.2.7: at least 5 minutes).
    pub command: Duration,
    /// Waiting for the next chunk of a DATA/BDAT body (data block: 3 minutes).
    pub data_block: Duration,
}

impl Default for ServerTimeouts {
    fn default() -> Self {
        Self { command: Duration::from_secs(300), data_block: Duration::from_secs(180) }
    }
}

/// Client-side timeouts (RFC 5321 4.5.3.2 defaults).
#[derive(Clone, Copy, Debug)]
pub struct ClientTimeouts {
    /// Initial 220 greeting: 5 minutes.
    pub greeting: Duration,
    /// MAIL, RCPT, EHLO and other commands: 5 minutes.
    pub command: Duration,
    /// DATA initiation (waiting for 354): 2 minutes.
    pub data_init: Duration,
    /// Between body chunks being accepted by the peer: 3 minutes.
    pub data_block: Duration,
    /// After the end of data, waiting for the final reply: 10 minutes.
    pub data_term: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        Self {
            greeting: Duration::from_secs(300),
            command: Duration::from_secs(300),
            data_init: Duration::from_secs(120),
            data_block: Duration::from_secs(180),
            data_term: Duration::from_secs(600),
        }
    }
}

impl ClientTimeouts {
    /// Every phase gets the same bound (the blaster's `--timeout D`).
    pub fn uniform(d: Duration) -> Self {
        Self { greeting: d, command: d, data_init: d, data_block: d, data_term: d }
    }
}
