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

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::auth::{self, AuthError};
use super::data::DataScanner;
use super::proxy::{self, ProxyHeader};
use super::wire::{self, Command, WireError};
use super::{BareLfPolicy, CommandKind, ServerTimeouts, MAX_COMMAND_LINE};

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Go,
    Done,
    Hold,
}

/// A reply decided in advance (code, enhanced code, text).
type Canned = (u16, &'static str, &'static str);

/// The XCLIENT attributes the server accepts, as its EHLO reply advertises
/// them (Postfix's names). `ADDR` and `PORT` set the client address that
/// faults (greylisting, per-client limits) see; the others are checked for
/// form and otherwise ignored.
pub const XCLIENT_ATTRIBUTES: [&str; 9] =
    ["NAME", "ADDR", "PORT", "PROTO", "HELO", "REVERSE_NAME", "LOGIN", "DESTADDR", "DESTPORT"];

/// The EHLO line for [`XCLIENT_ATTRIBUTES`].
const XCLIENT_ADVERTISED: &str = "XCLIENT NAME ADDR PORT PROTO HELO REVERSE_NAME LOGIN DESTADDR DESTPORT";

/// What an XCLIENT command claims about the client: `None` = not mentioned,
/// `Some(None)` = `[UNAVAILABLE]` / `[TEMPUNAVAIL]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct XclientClaim {
    addr: Option<Option<IpAddr>>,
    port: Option<Option<u16>>,
}

impl XclientClaim {
    /// The client address after the claim, from the one before it.
    fn apply(self, before: Option<SocketAddr>) -> Option<SocketAddr> {
        let ip = match self.addr {
            None => before.map(|a| a.ip()),
            Some(ip) => ip,
        };
        let port = match self.port {
            None => before.map_or(0, |a| a.port()),
            Some(p) => p.unwrap_or(0),
        };
        ip.map(|ip| SocketAddr::new(ip, port))
    }
}

fn xclient_unavailable(v: &[u8]) -> bool {
    v.eq_ignore_ascii_case(b"[UNAVAILABLE]") || v.eq_ignore_ascii_case(b"[TEMPUNAVAIL]")
}

/// Parses XCLIENT's `NAME=VALUE...`: every name must be one of
/// [`XCLIENT_ATTRIBUTES`] and carry `=`; `ADDR` (IPv4, `IPV6:` or bare
/// IPv6) and `PORT` must be well formed. The error is the 501 reply text.
fn parse_xclient(attrs: &[u8]) -> Result<XclientClaim, &'static str> {
    let mut claim = XclientClaim::default();
    for (k, v) in wire::params(attrs) {
        if !XCLIENT_ATTRIBUTES.iter().any(|a| k.eq_ignore_ascii_case(a.as_bytes())) {
            return Err("Bad XCLIENT attribute name");
        }
        let Some(v) = v else {
            return Err("Bad XCLIENT attribute syntax, expected NAME=VALUE");
        };
        if k.eq_ignore_ascii_case(b"ADDR") {
            claim.addr = Some(if xclient_unavailable(v) {
                None
            } else {
                let v = if v.len() > 5 && v[..5].eq_ignore_ascii_case(b"IPV6:") { &v[5..] } else { v };
                let ip = std::str::from_utf8(v).ok().and_then(|s| s.parse::<IpAddr>().ok());
                Some(ip.ok_or("Bad XCLIENT ADDR syntax")?)
            });
        } else if k.eq_ignore_ascii_case(b"PORT") {
            claim.port = Some(if xclient_unavailable(v) {
                None
            } else {
                let p = wire::parse_u64(v).and_then(|p| u16::try_from(p).ok());
                Some(p.ok_or("Bad XCLIENT PORT syntax")?)
            });
        }
    }
    Ok(claim)
}

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

/// One SMTP server session. See the module docs.
pub struct ServerSession {
    config: Arc<ServerConfig>,
    phase: Phase,
    tls: bool,
    greeted: bool,
    authenticated: bool,
    refused: bool,
    peer: Option<SocketAddr>,
    // Transaction.
    mail_active: bool,
    mail_utf8: bool,
    mail_from: Vec<u8>,
    rcpt_buf: Vec<u8>,
    rcpt_ends: Vec<usize>,
    rcpt_attempts: u32,
    bdat_used: bool,
    bdat_bytes: u64,
    message_open: bool,
    // Current BDAT chunk.
    bdat_remaining: u64,
    bdat_last: bool,
    bdat_error: Option<Canned>,
    /// The chunk error ends the message (it happened inside a transaction).
    bdat_error_ends_message: bool,
    scanner: DataScanner,
    // Input.
    inbuf: Vec<u8>,
    discarding: bool,
    // Time.
    deadline: Instant,
    delay_until: Option<Instant>,
    held: Option<Held>,
    skip_verdict: bool,
    errors: u32,
    auth_scratch: Vec<u8>,
    login_user: Vec<u8>,
    events: VecDeque<ServerEvent>,
}

fn enh_of(code: u16) -> &'static str {
    match code {
        421 => "4.3.2",
        452 => "4.3.1",
        400..=499 => "4.3.0",
        552 => "5.3.4",
        553 => "5.1.3",
        554 => "5.3.0",
        500..=599 => "5.7.1",
        _ => "2.0.0",
    }
}

fn fault_text(code: u16) -> &'static str {
    if code < 500 {
        "Temporary failure, try again later"
    } else {
        "Rejected"
    }
}

impl ServerSession {
    pub fn new(config: Arc<ServerConfig>, now: Instant) -> Self {
        let policy = config.bare_lf;
        Self {
            config,
            phase: Phase::Init,
            tls: false,
            greeted: false,
            authenticated: false,
            refused: false,
            peer: None,
            mail_active: false,
            mail_utf8: false,
            // Buffers grow on first use: an idle connection (greeted, no
            // transaction yet) holds none of them.
            mail_from: Vec::new(),
            rcpt_buf: Vec::new(),
            rcpt_ends: Vec::new(),
            rcpt_attempts: 0,
            bdat_used: false,
            bdat_bytes: 0,
            message_open: false,
            bdat_remaining: 0,
            bdat_last: false,
            bdat_error: None,
            bdat_error_ends_message: false,
            scanner: DataScanner::new(policy),
            inbuf: Vec::new(),
            discarding: false,
            deadline: now,
            delay_until: None,
            held: None,
            skip_verdict: false,
            errors: 0,
            auth_scratch: Vec::new(),
            login_user: Vec::new(),
            events: VecDeque::new(),
        }
    }

    /// Mark the connection as TLS from the start (implicit TLS, port 465).
    pub fn set_tls_active(&mut self) {
        self.tls = true;
    }

    /// Begin the session: greet, or wait for the PROXY header first.
    pub fn start<H: ServerHooks>(&mut self, now: Instant, out: &mut Vec<u8>, hooks: &mut H) {
        if self.phase != Phase::Init {
            return;
        }
        self.touch(now);
        if self.config.proxy_protocol {
            self.phase = Phase::Proxy;
        } else {
            self.greet(now, out, hooks);
        }
        self.run_buffered(now, out, hooks);
    }

    /// Feed bytes read from the client (plaintext, after TLS if any).
    pub fn handle_input<H: ServerHooks>(
        &mut self,
        now: Instant,
        input: &[u8],
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) {
        match self.phase {
            // Plaintext pipelined after STARTTLS is dropped.
            Phase::Closed | Phase::TlsHandshake => return,
            _ => {}
        }
        let (out_before, phase_before) = (out.len(), self.phase);
        if self.inbuf.is_empty() && self.delay_until.is_none() && self.runnable() {
            let n = self.process(now, input, out, hooks);
            if self.keeps_input() {
                self.inbuf.extend_from_slice(&input[n.min(input.len())..]);
            }
        } else {
            self.inbuf.extend_from_slice(input);
            self.run_buffered(now, out, hooks);
        }
        // The command timeout runs from the last complete command, not the
        // last byte: a client trickling a line a byte at a time (slowloris)
        // is closed at the timeout. Body bytes (DATA/BDAT) do count as
        // progress (RFC 5321 4.5.3.2.6: a timeout per data block).
        let progressed = out.len() != out_before
            || self.phase != phase_before
            || matches!(self.phase, Phase::Data | Phase::Bdat);
        if self.delay_until.is_none() && progressed {
            self.touch(now);
        }
    }

    /// Act on deadlines: a fault delay ending, or the command/data timeout.
    pub fn handle_timeout<H: ServerHooks>(
        &mut self,
        now: Instant,
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) {
        if matches!(self.phase, Phase::Closed | Phase::Init) {
            return;
        }
        if let Some(until) = self.delay_until {
            if now < until {
                return;
            }
            self.delay_until = None;
            self.touch(now);
            match self.held.take() {
                Some(Held::Greeting) => {
                    self.skip_verdict = true;
                    self.greet(now, out, hooks);
                }
                Some(Held::Line) => self.skip_verdict = true,
                Some(Held::End(kind, bytes)) => {
                    self.skip_verdict = true;
                    let _ = self.end_message(now, out, hooks, kind, bytes, None);
                }
                None => {}
            }
            self.run_buffered(now, out, hooks);
            if self.delay_until.is_none() {
                self.touch(now);
            }
            return;
        }
        if now < self.deadline {
            return;
        }
        if self.phase != Phase::TlsHandshake {
            self.reply_host(out, CommandKind::Unknown, 421, "4.4.2", b" Error: timeout exceeded");
        }
        self.close(CloseReason::Timeout, hooks);
    }

    /// The TLS handshake after STARTTLS completed: the session restarts at
    /// the post-greeting state (EHLO needed again).
    pub fn handle_tls_established(&mut self, now: Instant) {
        if self.phase != Phase::TlsHandshake {
            return;
        }
        self.tls = true;
        self.phase = Phase::Command;
        self.greeted = false;
        self.authenticated = false;
        self.inbuf.clear();
        self.discarding = false;
        self.touch(now);
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Closed | Phase::Init => None,
            _ => Some(self.delay_until.unwrap_or(self.deadline)),
        }
    }

    /// Whether the driver should read more input now.
    pub fn wants_read(&self) -> bool {
        self.phase != Phase::Closed && self.inbuf.len() < MAX_PENDING_INPUT
    }

    /// No more input will be processed; flush `out` and close.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    pub fn tls_active(&self) -> bool {
        self.tls
    }

    /// True while a fault delay holds a reply (and the input after it):
    /// the next `handle_timeout` at [`Self::poll_timeout`] releases it.
    pub fn holds_reply(&self) -> bool {
        self.delay_until.is_some() && self.phase != Phase::Closed
    }

    /// Bytes of input currently buffered (for invariant checks).
    pub fn buffered_bytes(&self) -> usize {
        self.inbuf.len()
    }

    // ---- internals -------------------------------------------------------

    fn runnable(&self) -> bool {
        !matches!(self.phase, Phase::Init | Phase::Greeting)
    }

    fn keeps_input(&self) -> bool {
        !matches!(self.phase, Phase::Closed | Phase::TlsHandshake)
    }

    fn touch(&mut self, now: Instant) {
        let t = match self.phase {
            Phase::Data | Phase::Bdat => self.config.timeouts.data_block,
            _ => self.config.timeouts.command,
        };
        self.deadline = now + t;
    }

    fn run_buffered<H: ServerHooks>(&mut self, now: Instant, out: &mut Vec<u8>, hooks: &mut H) {
        if self.inbuf.is_empty() || self.delay_until.is_some() || !self.runnable() {
            return;
        }
        let mut buf = std::mem::take(&mut self.inbuf);
        let n = self.process(now, &buf, out, hooks);
        if self.keeps_input() {
            buf.drain(..n.min(buf.len()));
        } else {
            buf.clear();
        }
        self.inbuf = buf;
    }

    fn enh(&self, e: &'static str) -> Option<&'static str> {
        (self.config.ext.enhancedstatuscodes && !e.is_empty()).then_some(e)
    }

    fn note_reply(&mut self, kind: CommandKind, code: u16) {
        self.events.push_back(ServerEvent::Reply { command: kind, code });
        if (500..=504).contains(&code) {
            self.errors += 1;
        }
    }

    fn reply(&mut self, out: &mut Vec<u8>, kind: CommandKind, code: u16, enh: &'static str, text: &str) {
        wire::write_reply(out, code, self.enh(enh), text.as_bytes());
        self.note_reply(kind, code);
    }

    /// A reply whose text is the host name followed by `suffix`. Reads the
    /// shared config in place: nothing shared is written per reply (no
    /// `Arc` clone, whose reference count every thread would bounce).
    fn reply_host(
        &mut self,
        out: &mut Vec<u8>,
        kind: CommandKind,
        code: u16,
        enh: &'static str,
        suffix: &[u8],
    ) {
        wire::write_reply_parts(out, code, self.enh(enh), &[self.config.hostname.as_bytes(), suffix]);
        self.note_reply(kind, code);
    }

    fn close<H: ServerHooks>(&mut self, reason: CloseReason, hooks: &mut H) {
        if self.message_open {
            self.message_open = false;
            hooks.on_message_end(false);
        }
        self.phase = Phase::Closed;
        self.inbuf.clear();
        self.delay_until = None;
        self.held = None;
        self.events.push_back(ServerEvent::Close(reason));
    }

    fn reset_txn<H: ServerHooks>(&mut self, hooks: &mut H) {
        if self.message_open {
            self.message_open = false;
            hooks.on_message_end(false);
        }
        self.mail_active = false;
        self.mail_utf8 = false;
        self.mail_from.clear();
        self.rcpt_buf.clear();
        self.rcpt_ends.clear();
        self.rcpt_attempts = 0;
        self.bdat_used = false;
        self.bdat_bytes = 0;
    }

    fn verdict<H: ServerHooks>(
        &mut self,
        hooks: &mut H,
        kind: CommandKind,
        arg: &[u8],
        mail_from: Option<&[u8]>,
        rcpt_to: Option<&[u8]>,
    ) -> Verdict {
        if std::mem::take(&mut self.skip_verdict) {
            return Verdict::Proceed;
        }
        let mail_from = match mail_from {
            Some(m) => Some(m),
            None if self.mail_active => Some(&self.mail_from[..]),
            None => None,
        };
        hooks.on_command(kind, &CommandInfo { arg, mail_from, rcpt_to, peer: self.peer })
    }

    /// Apply a verdict for an ordinary command: `Go` = act normally.
    fn apply<H: ServerHooks>(
        &mut self,
        v: Verdict,
        kind: CommandKind,
        now: Instant,
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> Flow {
        match v {
            Verdict::Proceed => Flow::Go,
            Verdict::Reply(code) if code < 400 => Flow::Go,
            Verdict::Reply(421) | Verdict::Disconnect421 => {
                self.reply_closing(out, kind);
                self.close(CloseReason::Fault, hooks);
                Flow::Done
            }
            Verdict::Reply(code) => {
                self.reply(out, kind, code, enh_of(code), fault_text(code));
                Flow::Done
            }
            Verdict::Delay(d) => {
                self.delay_until = Some(now + d);
                self.held = Some(Held::Line);
                Flow::Hold
            }
            Verdict::Disconnect => {
                self.close(CloseReason::Fault, hooks);
                Flow::Done
            }
        }
    }

    fn reply_closing(&mut self, out: &mut Vec<u8>, kind: CommandKind) {
        self.reply_host(out, kind, 421, "4.3.2", b" Service not available, closing transmission channel");
    }

    fn greet<H: ServerHooks>(&mut self, now: Instant, out: &mut Vec<u8>, hooks: &mut H) {
        let v = self.verdict(hooks, CommandKind::Connect, b"", None, None);
        let banner: &[u8] = if self.config.lmtp { b" LMTP smtpstorm" } else { b" ESMTP smtpstorm" };
        match v {
            Verdict::Proceed | Verdict::Reply(0..=399) => {
                self.reply_host(out, CommandKind::Connect, 220, "", banner);
                self.phase = Phase::Command;
            }
            Verdict::Delay(d) => {
                self.phase = Phase::Greeting;
                self.delay_until = Some(now + d);
                self.held = Some(Held::Greeting);
            }
            Verdict::Disconnect => self.close(CloseReason::Fault, hooks),
            Verdict::Reply(code @ 500..) => {
                self.reply_host(out, CommandKind::Connect, code, "", b" Service refused");
                self.refused = true;
                self.phase = Phase::Command;
            }
            Verdict::Reply(_) | Verdict::Disconnect421 => {
                self.reply_closing(out, CommandKind::Connect);
                self.close(CloseReason::Fault, hooks);
            }
        }
    }

    /// Consume as much of `data` as the state allows; returns bytes used.
    fn process<H: ServerHooks>(
        &mut self,
        now: Instant,
        data: &[u8],
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> usize {
        let mut pos = 0usize;
        loop {
            if self.delay_until.is_some() {
                return pos;
            }
            match self.phase {
                Phase::Closed | Phase::TlsHandshake => return data.len(),
                Phase::Init | Phase::Greeting => return pos,
                Phase::Proxy => match proxy::parse(&data[pos..]) {
                    Ok(None) => return pos,
                    Ok(Some((h, n))) => {
                        pos += n;
                        self.peer = h.src;
                        self.events.push_back(ServerEvent::Proxy(h));
                        self.greet(now, out, hooks);
                    }
                    Err(_) => {
                        self.close(CloseReason::ProxyError, hooks);
                        return data.len();
                    }
                },
                Phase::Data => {
                    let r = self.scanner.scan(&data[pos..], |s| hooks.on_body(s));
                    pos += r.consumed;
                    if !r.ended {
                        return pos;
                    }
                    self.phase = Phase::Command;
                    self.end_of_data(now, out, hooks);
                }
                Phase::Bdat => {
                    let avail = (data.len() - pos) as u64;
                    let take = self.bdat_remaining.min(avail) as usize;
                    if take > 0 {
                        if self.bdat_error.is_none() {
                            hooks.on_body(&data[pos..pos + take]);
                            self.bdat_bytes += take as u64;
                        }
                        pos += take;
                        self.bdat_remaining -= take as u64;
                    }
                    if self.bdat_remaining > 0 {
                        return pos;
                    }
                    self.phase = Phase::Command;
                    self.end_of_chunk(now, out, hooks);
                }
                Phase::Command | Phase::AuthPlain | Phase::AuthLoginUser | Phase::AuthLoginPass => {
                    let rest = &data[pos..];
                    let Some(lf) = memchr::memchr(b'\n', rest) else {
                        if self.discarding {
                            return data.len();
                        }
                        if rest.len() >= MAX_COMMAND_LINE {
                            self.discarding = true;
                            return data.len();
                        }
                        return pos;
                    };
                    let line_len = lf + 1;
                    if self.discarding || line_len > MAX_COMMAND_LINE {
                        self.discarding = false;
                        pos += line_len;
                        if self.phase != Phase::Command {
                            self.phase = Phase::Command;
                        }
                        self.reply(out, CommandKind::Unknown, 500, "5.5.2", "Line too long");
                    } else {
                        let line = match &rest[..lf] {
                            [l @ .., b'\r'] => l,
                            l => l,
                        };
                        match self.command_line(now, line, out, hooks) {
                            Flow::Hold => return pos,
                            Flow::Go | Flow::Done => pos += line_len,
                        }
                    }
                    if self.errors >= MAX_ERRORS && self.phase != Phase::Closed {
                        self.reply_host(out, CommandKind::Unknown, 421, "4.7.0", b" Error: too many errors");
                        self.close(CloseReason::TooManyErrors, hooks);
                    }
                }
            }
        }
    }

    fn wire_error(&mut self, e: WireError, out: &mut Vec<u8>) {
        let kind = e.kind();
        match e {
            WireError::Unknown => self.reply(out, kind, 500, "5.5.2", "Command unrecognized"),
            WireError::Syntax(_) => {
                self.reply(out, kind, 501, "5.5.4", "Syntax error in parameters or arguments")
            }
            WireError::PathTooLong(_) => self.reply(out, kind, 501, "5.1.3", "Path too long"),
            WireError::InvalidUtf8(_) => {
                self.reply(out, kind, 501, "5.6.7", "Invalid UTF-8 in address")
            }
        }
    }

    fn command_line<H: ServerHooks>(
        &mut self,
        now: Instant,
        line: &[u8],
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> Flow {
        match self.phase {
            Phase::AuthPlain => {
                self.phase = Phase::Command;
                self.finish_plain(line, out, hooks);
                return Flow::Done;
            }
            Phase::AuthLoginUser => {
                self.phase = Phase::Command;
                match auth::decode_b64(line, &mut self.auth_scratch) {
                    Ok(u) => {
                        self.login_user.clear();
                        self.login_user.extend_from_slice(u);
                        self.reply(out, CommandKind::Auth, 334, "", auth::LOGIN_PASS_PROMPT);
                        self.phase = Phase::AuthLoginPass;
                    }
                    Err(e) => self.auth_error(e, out),
                }
                return Flow::Done;
            }
            Phase::AuthLoginPass => {
                self.phase = Phase::Command;
                let ok = match auth::decode_b64(line, &mut self.auth_scratch) {
                    Ok(p) => hooks.check_auth(b"", &self.login_user, p),
                    Err(e) => {
                        self.auth_error(e, out);
                        return Flow::Done;
                    }
                };
                self.auth_result(ok, out);
                return Flow::Done;
            }
            _ => {}
        }
        let arg = match memchr::memchr(b' ', line) {
            Some(sp) => &line[sp + 1..],
            None => &line[line.len()..],
        };
        let cmd = match wire::parse_command(line) {
            Ok(c) => c,
            Err(e) => {
                self.wire_error(e, out);
                return Flow::Done;
            }
        };
        let kind = cmd.kind();
        if self.refused && kind != CommandKind::Quit {
            self.reply(out, kind, 503, "5.5.1", "Service refused, send QUIT");
            return Flow::Done;
        }
        let lmtp = self.config.lmtp;
        match cmd {
            Command::Helo(_) | Command::Ehlo(_) | Command::Lhlo(_) => {
                if lmtp != (kind == CommandKind::Lhlo) {
                    let text = if lmtp { "Use LHLO in LMTP mode" } else { "Command unrecognized" };
                    self.reply(out, kind, 500, "5.5.1", text);
                    return Flow::Done;
                }
                gate!(self, hooks, kind, arg, now, out);
                self.reset_txn(hooks);
                self.greeted = true;
                if kind == CommandKind::Helo {
                    self.reply_host(out, kind, 250, "", b"");
                } else {
                    self.ehlo_reply(out, kind);
                }
                Flow::Done
            }
            Command::Mail { path, params } => self.mail(now, arg, path, params, out, hooks),
            Command::Rcpt { path, params } => self.rcpt(now, arg, path, params, out, hooks),
            Command::Data => {
                if let Some(f) = self.need_recipients(kind, out) {
                    return f;
                }
                if self.bdat_used {
                    self.reply(out, kind, 503, "5.5.1", "DATA not allowed after BDAT");
                    return Flow::Done;
                }
                let v = self.verdict(hooks, kind, arg, None, None);
                if let Verdict::Reply(code @ 400..) = v {
                    if code != 421 {
                        self.reply(out, kind, code, enh_of(code), fault_text(code));
                        let n = self.rcpt_ends.len() as u32;
                        self.events.push_back(ServerEvent::Message {
                            outcome: MessageOutcome::of(code),
                            code,
                            bytes: 0,
                            recipients: n,
                        });
                        self.reset_txn(hooks);
                        return Flow::Done;
                    }
                }
                if matches!(v, Verdict::Disconnect | Verdict::Disconnect421 | Verdict::Reply(421)) {
                    // The DATA refused by a closing fault still ends its
                    // transaction with one Message (code 0 = no reply).
                    let code = if v == Verdict::Disconnect { 0 } else { 421 };
                    self.events.push_back(ServerEvent::Message {
                        outcome: MessageOutcome::TempFailed,
                        code,
                        bytes: 0,
                        recipients: self.rcpt_ends.len() as u32,
                    });
                }
                match self.apply(v, kind, now, out, hooks) {
                    Flow::Go => {}
                    f => return f,
                }
                self.reply(out, kind, 354, "", "End data with <CR><LF>.<CR><LF>");
                hooks.on_message_start();
                self.message_open = true;
                self.scanner.reset(self.config.bare_lf);
                self.phase = Phase::Data;
                Flow::Done
            }
            Command::Bdat { size, last } => self.bdat(now, arg, size, last, out, hooks),
            Command::Rset => {
                gate!(self, hooks, kind, arg, now, out);
                self.reset_txn(hooks);
                self.reply(out, kind, 250, "2.0.0", "OK");
                Flow::Done
            }
            Command::Noop | Command::Vrfy(_) | Command::Expn(_) | Command::Help => {
                gate!(self, hooks, kind, arg, now, out);
                match kind {
                    CommandKind::Noop => self.reply(out, kind, 250, "2.0.0", "OK"),
                    CommandKind::Vrfy => self.reply(
                        out,
                        kind,
                        252,
                        "2.5.0",
                        "Cannot VRFY user, but will accept message and attempt delivery",
                    ),
                    CommandKind::Expn => self.reply(out, kind, 502, "5.5.1", "EXPN not supported"),
                    _ => self.reply(out, kind, 214, "2.0.0", "See RFC 5321 (smtpstorm)"),
                }
                Flow::Done
            }
            Command::Quit => {
                gate!(self, hooks, kind, arg, now, out);
                self.reply_host(out, kind, 221, "2.0.0", b" closing connection");
                self.close(CloseReason::Quit, hooks);
                Flow::Done
            }
            Command::StartTls => {
                if !self.config.starttls_available {
                    self.reply(out, kind, 502, "5.5.1", "STARTTLS not available");
                    return Flow::Done;
                }
                if self.tls {
                    self.reply(out, kind, 503, "5.5.1", "TLS already active");
                    return Flow::Done;
                }
                gate!(self, hooks, kind, arg, now, out);
                self.reset_txn(hooks);
                self.reply(out, kind, 220, "2.0.0", "Ready to start TLS");
                self.events.push_back(ServerEvent::StartTls);
                self.greeted = false;
                self.phase = Phase::TlsHandshake;
                Flow::Done
            }
            Command::Auth { mechanism, initial } => {
                self.auth(now, arg, mechanism, initial, out, hooks)
            }
            Command::Xclient(attrs) => {
                if !self.config.xclient {
                    self.reply(out, kind, 502, "5.5.1", "XCLIENT not available");
                    return Flow::Done;
                }
                if self.mail_active {
                    self.reply(out, kind, 503, "5.5.1", "XCLIENT not allowed in a mail transaction");
                    return Flow::Done;
                }
                let claim = match parse_xclient(attrs) {
                    Ok(c) => c,
                    Err(text) => {
                        self.reply(out, kind, 501, "5.5.4", text);
                        return Flow::Done;
                    }
                };
                gate!(self, hooks, kind, arg, now, out);
                self.peer = claim.apply(self.peer);
                self.reset_txn(hooks);
                self.greeted = false;
                let banner: &[u8] = if lmtp { b" LMTP smtpstorm" } else { b" ESMTP smtpstorm" };
                self.reply_host(out, kind, 220, "", banner);
                Flow::Done
            }
        }
    }

    fn ehlo_reply(&mut self, out: &mut Vec<u8>, kind: CommandKind) {
        // Borrowed in place (no Arc clone): only `note_reply` below needs
        // `&mut self`, after the last use of `cfg`.
        let cfg = &*self.config;
        let ext = cfg.ext;
        let mut reply = wire::MultiLine::new(250);
        let mut line = |out: &mut Vec<u8>, parts: &[&[u8]]| reply.line(out, parts);
        line(out, &[cfg.hostname.as_bytes()]);
        if ext.pipelining {
            line(out, &[b"PIPELINING"]);
        }
        if ext.size {
            if cfg.max_message_size > 0 {
                let mut nb = [0u8; 20];
                line(out, &[b"SIZE ", wire::fmt_u64(cfg.max_message_size, &mut nb)]);
            } else {
                line(out, &[b"SIZE"]);
            }
        }
        if ext.eightbitmime {
            line(out, &[b"8BITMIME"]);
        }
        if ext.smtputf8 {
            line(out, &[b"SMTPUTF8"]);
        }
        if ext.enhancedstatuscodes {
            line(out, &[b"ENHANCEDSTATUSCODES"]);
        }
        if ext.chunking {
            line(out, &[b"CHUNKING"]);
        }
        if ext.dsn {
            line(out, &[b"DSN"]);
        }
        if cfg.starttls_available && !self.tls {
            line(out, &[b"STARTTLS"]);
        }
        if cfg.auth_enabled && (!cfg.auth_requires_tls || self.tls) {
            line(out, &[b"AUTH PLAIN LOGIN"]);
        }
        if cfg.xclient {
            line(out, &[XCLIENT_ADVERTISED.as_bytes()]);
        }
        reply.finish(out);
        self.note_reply(kind, 250);
    }

    /// The sequence checks shared by DATA and BDAT: `Some(Done)` if refused.
    fn need_recipients(&mut self, kind: CommandKind, out: &mut Vec<u8>) -> Option<Flow> {
        if !self.mail_active {
            self.reply(out, kind, 503, "5.5.1", "Need MAIL command");
        } else if self.rcpt_ends.is_empty() {
            if self.rcpt_attempts == 0 {
                self.reply(out, kind, 503, "5.5.1", "Need RCPT command");
            } else {
                self.reply(out, kind, 554, "5.5.1", "No valid recipients");
            }
        } else {
            return None;
        }
        Some(Flow::Done)
    }

    #[allow(clippy::too_many_arguments)]
    fn mail<H: ServerHooks>(
        &mut self,
        now: Instant,
        arg: &[u8],
        path: &[u8],
        params: &[u8],
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> Flow {
        let kind = CommandKind::Mail;
        let (ext, max_size) = (self.config.ext, self.config.max_message_size);
        if !self.greeted {
            self.reply(out, kind, 503, "5.5.1", "Send HELO/EHLO first");
            return Flow::Done;
        }
        if self.mail_active {
            self.reply(out, kind, 503, "5.5.1", "Nested MAIL command");
            return Flow::Done;
        }
        if self.config.require_tls && !self.tls {
            self.reply(out, kind, 530, "5.7.0", "Must issue a STARTTLS command first");
            return Flow::Done;
        }
        let mut utf8 = false;
        for (k, v) in wire::params(params) {
            let ok = if k.eq_ignore_ascii_case(b"SIZE") && ext.size {
                match v.and_then(wire::parse_u64) {
                    Some(n) if max_size > 0 && n > max_size => {
                        self.reply(out, kind, 552, "5.3.4", "Message size exceeds fixed maximum");
                        return Flow::Done;
                    }
                    Some(_) => true,
                    None => false,
                }
            } else if k.eq_ignore_ascii_case(b"BODY") && ext.eightbitmime {
                matches!(v, Some(b) if b.eq_ignore_ascii_case(b"7BIT") || b.eq_ignore_ascii_case(b"8BITMIME"))
            } else if k.eq_ignore_ascii_case(b"SMTPUTF8") && ext.smtputf8 {
                utf8 = true;
                v.is_none()
            } else if k.eq_ignore_ascii_case(b"RET") && ext.dsn {
                matches!(v, Some(b) if b.eq_ignore_ascii_case(b"FULL") || b.eq_ignore_ascii_case(b"HDRS"))
            } else if k.eq_ignore_ascii_case(b"ENVID") && ext.dsn {
                matches!(v, Some(b) if !b.is_empty() && b.len() <= 100)
            } else if k.eq_ignore_ascii_case(b"AUTH") {
                matches!(v, Some(b) if !b.is_empty())
            } else {
                false
            };
            if !ok {
                self.reply(out, kind, 501, "5.5.4", "Invalid MAIL parameter");
                return Flow::Done;
            }
        }
        if !path.is_ascii() && !utf8 {
            self.reply(out, kind, 553, "5.6.7", "Non-ASCII address requires SMTPUTF8");
            return Flow::Done;
        }
        let v = self.verdict(hooks, kind, arg, Some(path), None);
        match self.apply(v, kind, now, out, hooks) {
            Flow::Go => {}
            f => return f,
        }
        self.reset_txn(hooks);
        self.mail_active = true;
        self.mail_utf8 = utf8;
        self.mail_from.extend_from_slice(path);
        self.reply(out, kind, 250, "2.1.0", "Sender OK");
        Flow::Done
    }

    fn rcpt<H: ServerHooks>(
        &mut self,
        now: Instant,
        arg: &[u8],
        path: &[u8],
        params: &[u8],
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> Flow {
        let kind = CommandKind::Rcpt;
        let (dsn, max_recipients) = (self.config.ext.dsn, self.config.max_recipients);
        if !self.mail_active {
            self.reply(out, kind, 503, "5.5.1", "Need MAIL command");
            return Flow::Done;
        }
        self.rcpt_attempts = self.rcpt_attempts.saturating_add(1);
        for (k, v) in wire::params(params) {
            let ok = if k.eq_ignore_ascii_case(b"NOTIFY") && dsn {
                matches!(v, Some(b) if !b.is_empty() && b.split(|&c| c == b',').all(|t| {
                    [&b"NEVER"[..], b"SUCCESS", b"FAILURE", b"DELAY"].iter().any(|w| t.eq_ignore_ascii_case(w))
                }))
            } else if k.eq_ignore_ascii_case(b"ORCPT") && dsn {
                matches!(v, Some(b) if b.contains(&b';'))
            } else {
                false
            };
            if !ok {
                self.reply(out, kind, 501, "5.5.4", "Invalid RCPT parameter");
                return Flow::Done;
            }
        }
        if !path.is_ascii() && !self.mail_utf8 {
            self.reply(out, kind, 553, "5.6.7", "Non-ASCII address requires SMTPUTF8");
            return Flow::Done;
        }
        if max_recipients > 0 && self.rcpt_ends.len() >= max_recipients {
            self.reply(out, kind, 452, "4.5.3", "Too many recipients");
            return Flow::Done;
        }
        let v = self.verdict(hooks, kind, arg, None, Some(path));
        match self.apply(v, kind, now, out, hooks) {
            Flow::Go => {}
            f => return f,
        }
        self.rcpt_buf.extend_from_slice(path);
        self.rcpt_ends.push(self.rcpt_buf.len());
        self.reply(out, kind, 250, "2.1.5", "Recipient OK");
        Flow::Done
    }

    #[allow(clippy::too_many_arguments)]
    fn bdat<H: ServerHooks>(
        &mut self,
        now: Instant,
        arg: &[u8],
        size: u64,
        last: bool,
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> Flow {
        let kind = CommandKind::Bdat;
        let mut error: Option<Canned> = None;
        let mut ends_message = false;
        if !self.config.ext.chunking {
            error = Some((502, "5.5.1", "BDAT not available"));
        } else if !self.mail_active {
            error = Some((503, "5.5.1", "Need MAIL command"));
        } else if self.rcpt_ends.is_empty() {
            error = Some(if self.rcpt_attempts == 0 {
                (503, "5.5.1", "Need RCPT command")
            } else {
                (554, "5.5.1", "No valid recipients")
            });
        } else if self.config.max_message_size > 0
            && self.bdat_bytes.saturating_add(size) > self.config.max_message_size
        {
            // Judged on the declared size, so the outcome never depends on
            // how the chunk arrives; the chunk is still read and dropped.
            error = Some((552, "5.3.4", "Message size exceeds fixed maximum"));
            ends_message = true;
            if !self.bdat_used {
                self.bdat_used = true;
                self.bdat_bytes = 0;
                self.message_open = true;
                hooks.on_message_start();
            }
        } else {
            match self.verdict(hooks, kind, arg, None, None) {
                Verdict::Proceed | Verdict::Reply(0..=399) => {}
                Verdict::Reply(code) => {
                    error = Some((code, enh_of(code), fault_text(code)));
                    ends_message = true;
                }
                Verdict::Delay(d) => {
                    self.delay_until = Some(now + d);
                    self.held = Some(Held::Line);
                    return Flow::Hold;
                }
                Verdict::Disconnect => {
                    self.close(CloseReason::Fault, hooks);
                    return Flow::Done;
                }
                Verdict::Disconnect421 => {
                    self.reply_closing(out, kind);
                    self.close(CloseReason::Fault, hooks);
                    return Flow::Done;
                }
            }
            if !self.bdat_used {
                self.bdat_used = true;
                self.bdat_bytes = 0;
                self.message_open = true;
                hooks.on_message_start();
            }
        }
        self.bdat_remaining = size;
        self.bdat_last = last;
        self.bdat_error = error;
        self.bdat_error_ends_message = ends_message;
        self.phase = Phase::Bdat;
        Flow::Done
    }

    fn end_of_chunk<H: ServerHooks>(&mut self, now: Instant, out: &mut Vec<u8>, hooks: &mut H) {
        let kind = CommandKind::Bdat;
        if let Some((code, enh, text)) = self.bdat_error.take() {
            if self.bdat_error_ends_message {
                let bytes = self.bdat_bytes;
                let _ = self.end_message(now, out, hooks, kind, bytes, Some((code, enh, text)));
            } else {
                if code == 421 {
                    self.reply_closing(out, kind);
                    self.close(CloseReason::Fault, hooks);
                    return;
                }
                self.reply(out, kind, code, enh, text);
            }
            return;
        }
        if self.bdat_last {
            let bytes = self.bdat_bytes;
            let _ = self.end_message(now, out, hooks, kind, bytes, None);
        } else {
            let mut nb = [0u8; 20];
            let n = wire::fmt_u64(self.bdat_bytes, &mut nb);
            wire::write_reply_parts(out, 250, self.enh("2.0.0"), &[n, b" octets received"]);
            self.note_reply(kind, 250);
        }
    }

    fn end_of_data<H: ServerHooks>(&mut self, now: Instant, out: &mut Vec<u8>, hooks: &mut H) {
        let sc = &self.scanner;
        let bytes = sc.body_bytes();
        let max = self.config.max_message_size;
        let pre: Option<Canned> = if self.config.bare_lf == BareLfPolicy::Reject
            && (sc.saw_bare_lf() || sc.saw_bare_cr())
        {
            Some((550, "5.5.2", "Message contains bare LF or bare CR, rejected"))
        } else if sc.saw_long_line() {
            Some((500, "5.5.2", "Message line too long"))
        } else if max > 0 && bytes > max {
            Some((552, "5.3.4", "Message size exceeds fixed maximum"))
        } else {
            None
        };
        let _ = self.end_message(now, out, hooks, CommandKind::Dot, bytes, pre);
    }

    /// Decide and answer a message end (reply kind Dot or Bdat).
    fn end_message<H: ServerHooks>(
        &mut self,
        now: Instant,
        out: &mut Vec<u8>,
        hooks: &mut H,
        kind: CommandKind,
        bytes: u64,
        pre: Option<Canned>,
    ) -> Flow {
        if let Some(c) = pre {
            self.finish_message(out, hooks, kind, c, bytes);
            return Flow::Done;
        }
        match self.verdict(hooks, CommandKind::Dot, b"", None, None) {
            Verdict::Proceed | Verdict::Reply(0..=399) => {
                let text = if self.config.lmtp { "Delivered" } else { "Message accepted" };
                self.finish_message(out, hooks, kind, (250, "2.0.0", text), bytes);
                Flow::Done
            }
            Verdict::Reply(421) | Verdict::Disconnect421 => {
                self.abort_message(hooks, 421, bytes);
                self.reply_closing(out, kind);
                self.close(CloseReason::Fault, hooks);
                Flow::Done
            }
            Verdict::Reply(code) => {
                self.finish_message(out, hooks, kind, (code, enh_of(code), fault_text(code)), bytes);
                Flow::Done
            }
            Verdict::Delay(d) => {
                self.delay_until = Some(now + d);
                self.held = Some(Held::End(kind, bytes));
                Flow::Hold
            }
            Verdict::Disconnect => {
                self.abort_message(hooks, 0, bytes);
                self.close(CloseReason::Fault, hooks);
                Flow::Done
            }
        }
    }

    fn abort_message<H: ServerHooks>(&mut self, hooks: &mut H, code: u16, bytes: u64) {
        if self.message_open {
            self.message_open = false;
            hooks.on_message_end(false);
        }
        let recipients = self.rcpt_ends.len() as u32;
        self.events.push_back(ServerEvent::Message {
            outcome: MessageOutcome::TempFailed,
            code,
            bytes,
            recipients,
        });
        self.reset_txn(hooks);
    }

    fn finish_message<H: ServerHooks>(
        &mut self,
        out: &mut Vec<u8>,
        hooks: &mut H,
        kind: CommandKind,
        (code, enh, text): Canned,
        bytes: u64,
    ) {
        if self.message_open {
            self.message_open = false;
            hooks.on_message_end(code < 300);
        }
        let recipients = self.rcpt_ends.len() as u32;
        if self.config.lmtp {
            let enh = self.enh(enh);
            let mut start = 0;
            for &end in &self.rcpt_ends {
                let path = &self.rcpt_buf[start..end];
                start = end;
                wire::write_reply_parts(out, code, enh, &[b"<", path, b"> ", text.as_bytes()]);
                self.events.push_back(ServerEvent::Reply { command: kind, code });
            }
            if (500..=504).contains(&code) {
                self.errors += 1;
            }
        } else {
            self.reply(out, kind, code, enh, text);
        }
        self.events.push_back(ServerEvent::Message {
            outcome: MessageOutcome::of(code),
            code,
            bytes,
            recipients,
        });
        self.reset_txn(hooks);
    }

    fn auth<H: ServerHooks>(
        &mut self,
        now: Instant,
        arg: &[u8],
        mechanism: &[u8],
        initial: Option<&[u8]>,
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> Flow {
        let kind = CommandKind::Auth;
        let (enabled, requires_tls) = (self.config.auth_enabled, self.config.auth_requires_tls);
        if !enabled {
            self.reply(out, kind, 502, "5.5.1", "AUTH not available");
            return Flow::Done;
        }
        if !self.greeted || self.authenticated || self.mail_active {
            self.reply(out, kind, 503, "5.5.1", "AUTH not allowed now");
            return Flow::Done;
        }
        if requires_tls && !self.tls {
            self.reply(out, kind, 538, "5.7.11", "Encryption required for requested authentication mechanism");
            return Flow::Done;
        }
        let plain = mechanism.eq_ignore_ascii_case(b"PLAIN");
        if !plain && !mechanism.eq_ignore_ascii_case(b"LOGIN") {
            self.reply(out, kind, 504, "5.5.4", "Unrecognized authentication type");
            return Flow::Done;
        }
        let v = self.verdict(hooks, kind, arg, None, None);
        match self.apply(v, kind, now, out, hooks) {
            Flow::Go => {}
            f => return f,
        }
        match (plain, initial) {
            (true, Some(resp)) => self.finish_plain(resp, out, hooks),
            (true, None) => {
                self.reply(out, kind, 334, "", "");
                self.phase = Phase::AuthPlain;
            }
            (false, Some(user)) => match auth::decode_b64(user, &mut self.auth_scratch) {
                Ok(u) => {
                    self.login_user.clear();
                    self.login_user.extend_from_slice(u);
                    self.reply(out, kind, 334, "", auth::LOGIN_PASS_PROMPT);
                    self.phase = Phase::AuthLoginPass;
                }
                Err(e) => self.auth_error(e, out),
            },
            (false, None) => {
                self.reply(out, kind, 334, "", auth::LOGIN_USER_PROMPT);
                self.phase = Phase::AuthLoginUser;
            }
        }
        Flow::Done
    }

    fn finish_plain<H: ServerHooks>(&mut self, resp: &[u8], out: &mut Vec<u8>, hooks: &mut H) {
        let ok = match auth::decode_plain(resp, &mut self.auth_scratch) {
            Ok(p) => hooks.check_auth(p.authzid, p.user, p.pass),
            Err(e) => {
                self.auth_error(e, out);
                return;
            }
        };
        self.auth_result(ok, out);
    }

    fn auth_error(&mut self, e: AuthError, out: &mut Vec<u8>) {
        let kind = CommandKind::Auth;
        match e {
            AuthError::Cancelled => self.reply(out, kind, 501, "5.7.0", "Authentication cancelled"),
            AuthError::Base64 | AuthError::Malformed => {
                self.reply(out, kind, 501, "5.5.2", "Invalid authentication data")
            }
        }
    }

    fn auth_result(&mut self, ok: bool, out: &mut Vec<u8>) {
        let kind = CommandKind::Auth;
        if ok {
            self.authenticated = true;
            self.reply(out, kind, 235, "2.7.0", "Authentication successful");
            self.events.push_back(ServerEvent::Authenticated);
        } else {
            self.reply(out, kind, 535, "5.7.8", "Authentication credentials invalid");
        }
    }
}
