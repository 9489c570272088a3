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
//! [`PipeliningMode::On`]): `[RSET] MAIL RCPT… DATA` in one write; after 354
//! the dot-stuffed body, `.CRLF` and the next transaction's group (or QUIT)
//! in one write. With BDAT: `[RSET] MAIL RCPT… BDAT n LAST <bytes>` in one
//! write, and the next group after the final reply. Without pipelining every
//! command waits for its reply.
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
//! (no recipient, DATA or a BDAT chunk refused) is followed by RSET.
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

use std::collections::VecDeque;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::reply::{Capabilities, Reply, ReplyError, ReplyParser};
use super::{ClientTimeouts, CommandKind, Outcome, Phase};

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

/// What an outstanding reply answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Await {
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
    fn sent_time(&self) -> Instant {
        self.written_at.unwrap_or(self.queued_at)
    }
}

impl Await {
    fn command(self) -> CommandKind {
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

    fn timeout(self, t: &ClientTimeouts) -> Duration {
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
struct Expect {
    what: Await,
    /// Message index (0 when the command belongs to no message).
    msg: usize,
    /// `now` of the call that produced the command.
    queued_at: Instant,
    /// Output offset just past the command's last byte.
    end: u64,
    /// When that last byte was written (reported by the driver).
    written_at: Option<Instant>,
    /// Replies still expected for this entry (LMTP end of data: one per
    /// accepted recipient); 0 = not yet known (set at the first reply).
    remaining: u32,
}

/// Per-message transaction bookkeeping.
#[derive(Clone, Copy, Debug, Default)]
struct Txn {
    finished: bool,
    mail_ok: bool,
    rcpt_replies: u32,
    rcpt_ok: u32,
    rcpt_temp_code: u16,
    rcpt_perm_code: u16,
    /// A BDAT chunk was refused.
    chunk_failed: bool,
    /// Next RCPT to send (without pipelining).
    next_rcpt: usize,
    /// Offset of the next BDAT chunk in `header ++ body`.
    bdat_off: usize,
    /// Final replies: first 2xx, first 4xx, first 5xx code.
    final_ok_code: u16,
    final_temp_code: u16,
    final_perm_code: u16,
    /// The intended time of the message (open loop), for corrected latency.
    intended: Option<Instant>,
    /// Start of the `body` phase: the 354, or the first BDAT byte written.
    body_started: Option<Instant>,
    /// A BDAT chunk of the message was queued (its first byte's offset is
    /// in `ClientSession::bdat_starts` until written).
    bdat_queued: bool,
    /// The `body` phase was reported.
    body_reported: bool,
}

/// One piece of output: command bytes, or a slice of a shared body.
#[derive(Debug)]
enum Seg {
    Bytes(Vec<u8>),
    Shared { data: Arc<[u8]>, pos: usize, end: usize },
}

/// Shared bodies shorter than this are copied into the command bytes.
const SHARE_MIN_BYTES: usize = 4096;

/// The session's output queue: bytes in order, with stream offsets.
#[derive(Debug, Default)]
struct OutQueue {
    segs: VecDeque<Seg>,
    /// Offset just past the last byte ever queued.
    queued: u64,
    /// Offset of the next byte to hand out.
    handed: u64,
    /// An emptied command buffer kept for reuse (no allocation per command).
    spare: Vec<u8>,
}

impl OutQueue {
    fn extend_from_slice(&mut self, b: &[u8]) {
        if b.is_empty() {
            return;
        }
        self.queued += b.len() as u64;
        if let Some(Seg::Bytes(v)) = self.segs.back_mut() {
            v.extend_from_slice(b);
        } else {
            let mut v = std::mem::take(&mut self.spare);
            v.reserve(b.len().max(256));
            v.extend_from_slice(b);
            self.segs.push_back(Seg::Bytes(v));
        }
    }

    fn push(&mut self, b: u8) {
        self.extend_from_slice(&[b]);
    }

    /// Queues `data[range]` without copying it (small pieces are copied).
    fn push_shared(&mut self, data: &Arc<[u8]>, pos: usize, end: usize) {
        if end - pos < SHARE_MIN_BYTES {
            self.extend_from_slice(&data[pos..end]);
        } else {
            self.queued += (end - pos) as u64;
            self.segs.push_back(Seg::Shared { data: Arc::clone(data), pos, end });
        }
    }

    fn is_empty(&self) -> bool {
        self.handed == self.queued
    }

    fn clear(&mut self) {
        self.segs.clear();
        self.handed = self.queued;
    }

    /// Moves up to `limit` bytes to `out`.
    fn drain_into(&mut self, out: &mut Vec<u8>, limit: usize) {
        let mut room = limit;
        while room > 0 {
            let Some(front) = self.segs.front_mut() else { break };
            let taken = match front {
                Seg::Bytes(v) => {
                    if v.len() <= room {
                        let n = v.len();
                        if out.is_empty() && n > 0 {
                            // Hand the buffer over; keep the caller's for reuse.
                            std::mem::swap(out, v);
                        } else {
                            out.extend_from_slice(v);
                        }
                        if let Some(Seg::Bytes(mut v)) = self.segs.pop_front() {
                            if v.capacity() > self.spare.capacity() {
                                v.clear();
                                self.spare = v;
                            }
                        }
                        n
                    } else {
                        out.extend_from_slice(&v[..room]);
                        v.drain(..room);
                        room
                    }
                }
                Seg::Shared { data, pos, end } => {
                    let n = (*end - *pos).min(room);
                    out.extend_from_slice(&data[*pos..*pos + n]);
                    *pos += n;
                    if *pos == *end {
                        self.segs.pop_front();
                    }
                    n
                }
            };
            self.handed += taken as u64;
            room -= taken;
        }
    }
}

impl std::io::Write for OutQueue {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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

impl ClientSession {
    /// `now` is when the TCP connection was established (or TLS came up with
    /// implicit TLS): the banner latency counts from it.
    pub fn new(config: Arc<ClientConfig>, messages: Vec<Message>, now: Instant) -> Self {
        let n = messages.len();
        let tls_active = config.implicit_tls;
        let mut s = Self {
            config,
            txns: vec![Txn::default(); n],
            messages,
            unfinished: n,
            next_msg: 0,
            msg_base: 0,
            state: State::Greeting,
            expects: VecDeque::with_capacity(16),
            parser: ReplyParser::new(),
            tx: OutQueue { spare: Vec::with_capacity(1024), ..OutQueue::default() },
            written: 0,
            bdat_starts: VecDeque::new(),
            keep_open: false,
            awaiting_message: false,
            intended_start: None,
            events: VecDeque::with_capacity(16),
            caps: Capabilities::default(),
            created: now,
            pipelining: false,
            tls_active,
            authed: false,
            xclient: None,
            rset_pending: false,
            last_progress: now,
            starttls_sent: now,
            tls_wait_since: now,
            auth_started: None,
            deadline: None,
        };
        s.expects.push_back(Expect { what: Await::Greeting, msg: 0, queued_at: now, end: 0, written_at: Some(now), remaining: 1 });
        s.update_deadline();
        s
    }

    /// An open session (see the module doc): no message yet, messages come
    /// with [`Self::push_message`]; it idles between them and quits after
    /// [`Self::handle_no_more_messages`]. `intended_start` (open loop) is the
    /// session's intended start, from which its session phases are also
    /// reported corrected.
    pub fn open(config: Arc<ClientConfig>, now: Instant, intended_start: Option<Instant>) -> Self {
        let mut s = Self::new(config, Vec::new(), now);
        s.keep_open = true;
        s.intended_start = intended_start;
        s
    }

    /// Hands an open session its next message; `intended` (open loop) is the
    /// time it was meant to be sent. It goes out at once if the session is
    /// between messages (or pipelining after a DATA), else when the session
    /// gets there. Ignored after `Done` (the driver sees `Done` first).
    pub fn push_message(&mut self, now: Instant, msg: Message, intended: Option<Instant>) {
        if self.state == State::Done {
            return;
        }
        if self.unfinished == 0 && self.expects.is_empty() && self.next_msg == self.messages.len() {
            // Everything before was decided: forget it (bounded memory for
            // long sessions); indices in events keep counting.
            self.msg_base += self.messages.len();
            self.messages.clear();
            self.txns.clear();
            self.bdat_starts.clear();
            self.next_msg = 0;
        }
        self.messages.push(msg);
        self.txns.push(Txn { intended, ..Txn::default() });
        self.unfinished += 1;
        if self.awaiting_message && (self.pipelining || self.expects.is_empty()) {
            self.awaiting_message = false;
            self.next_txn(now);
            self.update_deadline();
        }
    }

    /// An open session gets no more messages: it quits once the ones it has
    /// are decided (at once if it is between messages).
    pub fn handle_no_more_messages(&mut self, now: Instant) {
        if !self.keep_open || self.state == State::Done {
            return;
        }
        self.keep_open = false;
        if self.awaiting_message {
            self.awaiting_message = false;
            self.quit(now);
            if self.state == State::Closing && self.expects.is_empty() {
                self.finish_session();
            }
            self.update_deadline();
        }
    }

    /// An open session is between messages: every message it was given is
    /// decided and nothing is outstanding.
    pub fn is_idle(&self) -> bool {
        self.keep_open
            && self.awaiting_message
            && self.unfinished == 0
            && self.expects.is_empty()
            && self.state == State::Transactions
    }

    /// Messages handed to this session so far (pushed or given to `new`).
    pub fn messages_given(&self) -> usize {
        self.msg_base + self.messages.len()
    }

    /// The driver wrote the session's output up to offset `written_total`
    /// (bytes of [`Self::poll_transmit`] output, counted from the session's
    /// first byte): commands whose last byte is now out are stamped `now`.
    pub fn handle_written(&mut self, now: Instant, written_total: u64) {
        if written_total <= self.written {
            return;
        }
        self.written = written_total.min(self.tx.handed);
        self.last_progress = now;
        while let Some(&(offset, m)) = self.bdat_starts.front() {
            if offset >= self.written {
                break;
            }
            self.bdat_starts.pop_front();
            if let Some(t) = self.txns.get_mut(m) {
                t.body_started = Some(now);
            }
        }
        // Expects are in output order: stop at the first one not yet out.
        for i in 0..self.expects.len() {
            let e = self.expects[i];
            if e.end > self.written {
                break;
            }
            if e.written_at.is_none() {
                self.expects[i].written_at = Some(now);
                if matches!(e.what, Await::Dot { discard: false } | Await::Bdat { last: true }) {
                    self.report_body(e.msg, now);
                }
            }
        }
        self.update_deadline();
    }

    /// Claim a client identity with XCLIENT: `attributes` is what follows
    /// the verb (`ADDR=192.0.2.7 NAME=mx.example`, values xtext-encoded).
    /// Sent once, after the first EHLO/LHLO reply; a server that does not
    /// advertise XCLIENT fails every message. Call before the first input;
    /// `None` (the default) sends no XCLIENT.
    pub fn set_xclient(&mut self, attributes: Option<Box<[u8]>>) {
        self.xclient = attributes;
    }

    /// Feed bytes received from the server (plaintext, after TLS if any).
    pub fn handle_input(&mut self, now: Instant, input: &[u8]) {
        let mut pos = 0;
        while pos < input.len() && !matches!(self.state, State::Done | State::TlsHandshake) {
            match self.parser.parse(input, &mut pos) {
                Ok(Some(reply)) => {
                    self.last_progress = now;
                    self.on_reply(now, reply);
                }
                Ok(None) => break,
                Err(e) => self.fail(Outcome::ProtocolError, 0, ClientError::Reply(e)),
            }
        }
        // Anything after the STARTTLS 220 is plaintext the peer (or a man in
        // the middle) injected before the handshake: dropped unread.
        self.update_deadline();
    }

    /// Append the bytes to send now to `out`.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>) {
        self.poll_transmit_max(now, out, usize::MAX);
    }

    /// Like [`Self::poll_transmit`], at most `limit` bytes; the rest stays
    /// queued for the next call (a large body goes out in pieces).
    pub fn poll_transmit_max(&mut self, _now: Instant, out: &mut Vec<u8>, limit: usize) {
        self.tx.drain_into(out, limit);
    }

    /// True if output is waiting for [`Self::poll_transmit`].
    pub fn wants_transmit(&self) -> bool {
        !self.tx.is_empty()
    }

    /// The TLS handshake that followed [`ClientEvent::StartTls`] completed.
    pub fn handle_tls_established(&mut self, now: Instant) {
        if self.state != State::TlsHandshake {
            return;
        }
        self.push_phase(Phase::StartTls, self.starttls_sent, now, None);
        self.tls_active = true;
        self.caps = Capabilities::default();
        self.parser.reset();
        self.last_progress = now;
        self.send_hello(now);
        self.update_deadline();
    }

    /// Call when `now` reaches [`Self::poll_timeout`] (earlier calls are no-ops).
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.deadline {
            Some(d) if now >= d && self.state != State::Done => {
                let err = if self.state == State::TlsHandshake {
                    ClientError::TlsTimeout
                } else {
                    ClientError::Timeout(self.waiting_for())
                };
                self.fail(Outcome::Timeout, 0, err);
            }
            _ => {}
        }
    }

    /// The peer closed the connection, or an I/O error ended it.
    pub fn handle_close(&mut self, _now: Instant) {
        if self.state == State::Done {
            return;
        }
        let idle = self.awaiting_message && self.unfinished == 0 && self.expects.is_empty();
        if (self.state == State::Closing && self.unfinished == 0) || idle {
            // After QUIT with everything decided, or a server closing an
            // open session between messages: a normal end.
            self.finish_session();
        } else {
            let err = ClientError::Closed(self.waiting_for());
            self.fail(Outcome::ConnectionError, 0, err);
        }
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The capabilities of the last EHLO/LHLO reply (default before, and
    /// after a HELO fallback).
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// Whether commands are being pipelined (decided after EHLO).
    pub fn is_pipelining(&self) -> bool {
        self.pipelining
    }

    // ---- reply dispatch -------------------------------------------------

    fn on_reply(&mut self, now: Instant, reply: Reply) {
        let code = reply.code;
        let Some(exp) = self.expects.front().copied() else {
            self.fail(Outcome::ProtocolError, 0, ClientError::Unsolicited(code));
            return;
        };
        let command = exp.what.command();
        self.events.push_back(ClientEvent::Reply { command, code });
        if code == 421 && exp.what != Await::Quit {
            self.fail(Outcome::TempFailed, code, ClientError::ServiceClosing(code));
            return;
        }
        let class = reply.class();
        if !matches!(exp.what, Await::Dot { .. } | Await::Bdat { last: true }) {
            self.expects.pop_front();
        }
        if matches!(exp.what, Await::AuthLoginUser | Await::AuthLoginPass | Await::AuthFinal) && self.auth_started.is_none() {
            // The first AUTH line written starts the `auth` phase.
            self.auth_started = Some(exp.sent_time());
        }
        let auth_started = self.auth_started.unwrap_or(now);
        match exp.what {
            Await::Greeting => self.on_greeting(now, code, class),
            Await::Ehlo | Await::Lhlo | Await::Helo => self.on_hello(now, exp, code, class),
            Await::Xclient => match class {
                // The 220 is a new greeting: hello again, capabilities anew.
                2 => self.send_hello(now),
                4 | 5 => self.give_up(now, code, ClientError::Refused { command: "XCLIENT", code }),
                _ => self.unexpected(exp, code),
            },
            Await::StartTls => match class {
                2 => {
                    self.starttls_sent = exp.sent_time();
                    self.tls_wait_since = now;
                    self.state = State::TlsHandshake;
                    self.parser.reset();
                    self.events.push_back(ClientEvent::StartTls);
                }
                4 | 5 => self.give_up(now, code, ClientError::Refused { command: "STARTTLS", code }),
                _ => self.unexpected(exp, code),
            },
            Await::AuthLoginUser | Await::AuthLoginPass => match class {
                3 => {
                    let auth = self.config.auth.clone();
                    let Some(auth) = auth else { return self.unexpected(exp, code) };
                    let (secret, next) = if exp.what == Await::AuthLoginUser {
                        (auth.user.as_str(), Await::AuthLoginPass)
                    } else {
                        (auth.pass.as_str(), Await::AuthFinal)
                    };
                    let b64 = super::auth::encode_login_step(secret);
                    self.tx.extend_from_slice(b64.as_bytes());
                    self.tx.extend_from_slice(b"\r\n");
                    self.expect(next, 0, now);
                }
                4 | 5 => {
                    self.push_phase(Phase::Auth, auth_started, now, None);
                    self.give_up(now, code, ClientError::Refused { command: "AUTH", code });
                }
                _ => self.unexpected(exp, code),
            },
            Await::AuthFinal => match class {
                2 => {
                    self.push_phase(Phase::Auth, auth_started, now, None);
                    self.authed = true;
                    self.start_transactions(now);
                }
                4 | 5 => {
                    self.push_phase(Phase::Auth, auth_started, now, None);
                    self.give_up(now, code, ClientError::Refused { command: "AUTH", code });
                }
                _ => self.unexpected(exp, code),
            },
            Await::Mail => self.on_mail(now, exp, code, class),
            Await::Rcpt => self.on_rcpt(now, exp, code, class),
            Await::Data => self.on_data(now, exp, code, class),
            Await::Dot { discard } => self.on_final(now, exp, code, class, discard),
            Await::Bdat { last: false } => self.on_bdat_chunk(now, exp, code, class),
            Await::Bdat { last: true } => self.on_final(now, exp, code, class, false),
            Await::Rset => match class {
                2 | 4 | 5 => {
                    if !self.pipelining && self.state == State::Transactions {
                        self.next_txn(now);
                    }
                }
                _ => self.unexpected(exp, code),
            },
            Await::Quit => {
                self.push_phase(Phase::Quit, exp.sent_time(), now, None);
            }
        }
        if self.state == State::Closing && self.expects.is_empty() {
            self.finish_session();
        }
    }

    fn on_greeting(&mut self, now: Instant, code: u16, class: u16) {
        self.push_phase(Phase::Banner, self.created, now, None);
        if self.config.capture_text {
            let text = self.joined_lines("\n");
            self.events.push_back(ClientEvent::Banner(text));
        }
        match class {
            2 => self.send_hello(now),
            4 | 5 => self.give_up(now, code, ClientError::Refused { command: "greeting", code }),
            _ => self.fail(
                Outcome::ProtocolError,
                0,
                ClientError::UnexpectedReply { command: "greeting", code },
            ),
        }
    }

    fn on_hello(&mut self, now: Instant, exp: Expect, code: u16, class: u16) {
        self.push_phase(Phase::Ehlo, exp.sent_time(), now, None);
        match class {
            2 => {
                self.caps = if exp.what == Await::Helo {
                    Capabilities::default()
                } else {
                    Capabilities::from_ehlo_lines(self.parser.lines())
                };
                if self.config.capture_text {
                    let lines = self.parser.lines().map(|l| String::from_utf8_lossy(l).into_owned()).collect();
                    self.events.push_back(ClientEvent::Capabilities(lines));
                }
                self.after_hello(now);
            }
            5 if exp.what == Await::Ehlo => {
                let config = Arc::clone(&self.config);
                self.write_line(&[b"HELO ", config.helo_name.as_bytes()]);
                self.expect(Await::Helo, 0, now);
            }
            4 | 5 => {
                let command = exp.what.command().as_str();
                self.give_up(now, code, ClientError::Refused { command, code });
            }
            _ => self.unexpected(exp, code),
        }
    }

    fn on_mail(&mut self, now: Instant, exp: Expect, code: u16, class: u16) {
        self.push_phase(Phase::Mail, exp.sent_time(), now, Some(exp.msg));
        let m = exp.msg;
        match class {
            2 => {
                self.txns[m].mail_ok = true;
                if !self.pipelining {
                    self.send_next_rcpt_or_data(m, now);
                }
            }
            4 | 5 => {
                self.finish(m, outcome_of(class), code);
                if !self.pipelining {
                    self.next_txn(now);
                }
            }
            _ => self.unexpected(exp, code),
        }
    }

    fn on_rcpt(&mut self, now: Instant, exp: Expect, code: u16, class: u16) {
        self.push_phase(Phase::Rcpt, exp.sent_time(), now, Some(exp.msg));
        let m = exp.msg;
        let t = &mut self.txns[m];
        t.rcpt_replies += 1;
        match class {
            2 => t.rcpt_ok += 1,
            4 if t.rcpt_temp_code == 0 => t.rcpt_temp_code = code,
            5 if t.rcpt_perm_code == 0 => t.rcpt_perm_code = code,
            4 | 5 => {}
            _ => return self.unexpected(exp, code),
        }
        let all_answered = t.rcpt_replies as usize >= self.messages[m].rcpt_to.len();
        if all_answered && t.rcpt_ok == 0 {
            let (outcome, code) = if t.rcpt_temp_code != 0 {
                (Outcome::TempFailed, t.rcpt_temp_code)
            } else {
                (Outcome::Rejected, t.rcpt_perm_code)
            };
            self.finish(m, outcome, code);
        }
        if !self.pipelining {
            if self.txns[m].rcpt_ok == 0 && all_answered {
                self.rset_pending = true;
                self.next_txn(now);
            } else {
                self.send_next_rcpt_or_data(m, now);
            }
        }
    }

    fn on_data(&mut self, now: Instant, exp: Expect, code: u16, class: u16) {
        self.push_phase(Phase::Data, exp.sent_time(), now, Some(exp.msg));
        let m = exp.msg;
        let t = self.txns[m];
        match class {
            3 => {
                if t.mail_ok && t.rcpt_ok > 0 && !t.finished {
                    self.txns[m].body_started = Some(now);
                    let msg = &self.messages[m];
                    let at_line_start = msg.header.is_empty() || msg.header.ends_with(b"\r\n");
                    match &msg.data {
                        // The builder stuffed the body once; only the small
                        // per-message header is stuffed here.
                        // The builder's header lines never start with `.`
                        // (see `Message::data`): sent as they are.
                        Some(data) if at_line_start => {
                            let data = Arc::clone(data);
                            let header = std::mem::take(&mut self.messages[m].header);
                            self.tx.extend_from_slice(&header);
                            self.messages[m].header = header;
                            self.tx.push_shared(&data, 0, data.len());
                        }
                        _ => {
                            let mut stuffed = Vec::with_capacity(msg.len() + msg.len() / 64 + 8);
                            dot_stuff(&mut stuffed, &[&msg.header, &msg.body]);
                            let stuffed: Arc<[u8]> = Arc::from(stuffed);
                            self.tx.push_shared(&stuffed, 0, stuffed.len());
                        }
                    }
                    let remaining = if self.config.lmtp { t.rcpt_ok } else { 1 };
                    self.push_expect(Await::Dot { discard: false }, m, now, remaining);
                } else {
                    // 354 although no recipient was accepted: end the empty
                    // DATA at once and ignore its reply.
                    self.tx.extend_from_slice(b".\r\n");
                    self.push_expect(Await::Dot { discard: true }, m, now, 1);
                }
                if self.pipelining {
                    self.next_txn(now);
                }
            }
            4 | 5 => {
                self.finish(m, outcome_of(class), code);
                self.rset_pending = t.mail_ok;
                self.next_txn(now);
            }
            _ => self.unexpected(exp, code),
        }
    }

    fn on_bdat_chunk(&mut self, now: Instant, exp: Expect, code: u16, class: u16) {
        let m = exp.msg;
        match class {
            2 => {
                if !self.pipelining {
                    self.write_bdat_chunk(m, now);
                }
            }
            4 | 5 => {
                // The first refused chunk decides (a no-op if MAIL or every
                // RCPT already did).
                self.txns[m].chunk_failed = true;
                self.finish(m, outcome_of(class), code);
                if !self.pipelining {
                    self.rset_pending = self.txns[m].mail_ok;
                    self.next_txn(now);
                }
            }
            _ => self.unexpected(exp, code),
        }
    }

    /// A final reply after the end of data (`.` or `BDAT … LAST`); several
    /// in LMTP. The FIFO entry stays at the front until the last one.
    fn on_final(&mut self, now: Instant, exp: Expect, code: u16, class: u16, discard: bool) {
        let m = exp.msg;
        let is_bdat = matches!(exp.what, Await::Bdat { .. });
        let t = self.txns[m];
        let live = t.mail_ok && t.rcpt_ok > 0 && !t.chunk_failed && !discard;
        if !matches!(class, 2 | 4 | 5) {
            self.expects.pop_front();
            return self.unexpected(exp, code);
        }
        let Some(front) = self.expects.front_mut() else { return };
        if front.remaining == 0 {
            front.remaining = if live && self.config.lmtp { t.rcpt_ok } else { 1 };
        }
        front.remaining -= 1;
        let last = front.remaining == 0;
        if live {
            let t = &mut self.txns[m];
            let slot = match class {
                2 => &mut t.final_ok_code,
                4 => &mut t.final_temp_code,
                _ => &mut t.final_perm_code,
            };
            if *slot == 0 {
                *slot = code;
            }
        }
        if !last {
            return;
        }
        self.expects.pop_front();
        if live {
            // A driver that never reports writes: the body ends when its last
            // byte was produced.
            self.report_body(m, exp.sent_time());
            self.push_phase(Phase::Message, exp.sent_time(), now, Some(m));
            let t = self.txns[m];
            let (outcome, code) = if t.final_perm_code != 0 {
                (Outcome::Rejected, t.final_perm_code)
            } else if t.final_temp_code != 0 {
                (Outcome::TempFailed, t.final_temp_code)
            } else {
                (Outcome::Accepted, t.final_ok_code)
            };
            self.finish(m, outcome, code);
        } else if !self.txns[m].finished {
            // Only a message with no recipient at all gets here (a 354 or a
            // BDAT reply nothing else decided): its final reply decides.
            let outcome = if class == 2 { Outcome::Accepted } else { outcome_of(class) };
            self.finish(m, outcome, code);
        }
        if is_bdat {
            // The next group waits for the BDAT LAST reply (see module doc).
            self.rset_pending = t.mail_ok && !live;
            self.next_txn(now);
        } else if !self.pipelining {
            self.next_txn(now);
        }
    }

    // ---- what to send next ----------------------------------------------

    fn send_hello(&mut self, now: Instant) {
        self.state = State::Hello;
        let (verb, what): (&[u8], _) = if self.config.lmtp { (b"LHLO ", Await::Lhlo) } else { (b"EHLO ", Await::Ehlo) };
        let config = Arc::clone(&self.config);
        self.write_line(&[verb, config.helo_name.as_bytes()]);
        self.expect(what, 0, now);
    }

    fn after_hello(&mut self, now: Instant) {
        if let Some(attributes) = self.xclient.take() {
            if self.caps.xclient {
                self.state = State::Xclient;
                self.write_line(&[b"XCLIENT ", &attributes]);
                self.expect(Await::Xclient, 0, now);
            } else {
                self.give_up_with(now, Outcome::Rejected, 0, ClientError::XclientNotOffered);
            }
            return;
        }
        if self.config.starttls && !self.tls_active {
            if self.caps.starttls {
                self.state = State::StartTls;
                self.tx.extend_from_slice(b"STARTTLS\r\n");
                self.expect(Await::StartTls, 0, now);
            } else {
                self.give_up_with(now, Outcome::Rejected, 0, ClientError::StartTlsNotOffered);
            }
            return;
        }
        if let (Some(auth), false) = (self.config.auth.clone(), self.authed) {
            self.state = State::Auth;
            match auth.mech {
                AuthMech::Plain => {
                    let b64 = super::auth::encode_plain(&auth.user, &auth.pass);
                    self.write_line(&[b"AUTH PLAIN ", b64.as_bytes()]);
                    self.expect(Await::AuthFinal, 0, now);
                }
                AuthMech::Login => {
                    self.tx.extend_from_slice(b"AUTH LOGIN\r\n");
                    self.expect(Await::AuthLoginUser, 0, now);
                }
            }
            return;
        }
        self.start_transactions(now);
    }

    fn start_transactions(&mut self, now: Instant) {
        if self.config.bdat && !self.caps.chunking {
            self.give_up_with(now, Outcome::Rejected, 0, ClientError::ChunkingNotOffered);
            return;
        }
        self.pipelining = match self.config.pipelining {
            PipeliningMode::Auto => self.caps.pipelining,
            PipeliningMode::On => true,
            PipeliningMode::Off => false,
        };
        self.state = State::Transactions;
        self.next_txn(now);
    }

    /// Start the next transaction (its whole group when pipelining), or QUIT
    /// when every message has been sent.
    fn next_txn(&mut self, now: Instant) {
        if self.next_msg >= self.messages.len() {
            if self.keep_open {
                // An open session between messages: wait for the next one
                // (an owed RSET goes out with it).
                self.awaiting_message = true;
                return;
            }
            self.rset_pending = false;
            self.quit(now);
            return;
        }
        if self.rset_pending {
            self.rset_pending = false;
            self.tx.extend_from_slice(b"RSET\r\n");
            self.expect(Await::Rset, 0, now);
            if !self.pipelining {
                return;
            }
        }
        let m = self.next_msg;
        self.next_msg += 1;
        let msg = &self.messages[m];
        self.tx.extend_from_slice(b"MAIL FROM:<");
        self.tx.extend_from_slice(msg.mail_from.as_bytes());
        self.tx.push(b'>');
        if !msg.mail_params.is_empty() {
            self.tx.push(b' ');
            self.tx.extend_from_slice(msg.mail_params.as_bytes());
        }
        self.tx.extend_from_slice(b"\r\n");
        self.expect(Await::Mail, m, now);
        if self.pipelining {
            for i in 0..self.messages[m].rcpt_to.len() {
                self.write_rcpt(m, i, now);
            }
            self.txns[m].next_rcpt = self.messages[m].rcpt_to.len();
            if self.config.bdat {
                loop {
                    if self.write_bdat_chunk(m, now) {
                        break;
                    }
                }
            } else {
                self.tx.extend_from_slice(b"DATA\r\n");
                self.expect(Await::Data, m, now);
            }
        }
    }

    /// Without pipelining: the next RCPT, or DATA / the first BDAT chunk.
    fn send_next_rcpt_or_data(&mut self, m: usize, now: Instant) {
        let i = self.txns[m].next_rcpt;
        if i < self.messages[m].rcpt_to.len() {
            self.txns[m].next_rcpt += 1;
            self.write_rcpt(m, i, now);
        } else if self.config.bdat {
            self.write_bdat_chunk(m, now);
        } else {
            self.tx.extend_from_slice(b"DATA\r\n");
            self.expect(Await::Data, m, now);
        }
    }

    fn write_rcpt(&mut self, m: usize, i: usize, now: Instant) {
        self.tx.extend_from_slice(b"RCPT TO:<");
        self.tx.extend_from_slice(self.messages[m].rcpt_to[i].as_bytes());
        self.tx.extend_from_slice(b">\r\n");
        self.expect(Await::Rcpt, m, now);
    }

    /// Write the next BDAT chunk of message `m`; true if it was the LAST.
    fn write_bdat_chunk(&mut self, m: usize, now: Instant) -> bool {
        let msg = &self.messages[m];
        let total = msg.header.len() + msg.body.len();
        let off = self.txns[m].bdat_off.min(total);
        let left = total - off;
        let size = match self.config.bdat_chunk_size {
            0 => left,
            max => left.min(max),
        };
        let last = off + size == total;
        if !self.txns[m].bdat_queued {
            self.txns[m].bdat_queued = true;
            self.bdat_starts.push_back((self.tx.queued, m));
        }
        // Writing into the queue cannot fail.
        let _ = write!(self.tx, "BDAT {size}{}\r\n", if last { " LAST" } else { "" });
        let header_len = msg.header.len();
        let end = off + size;
        if off < header_len {
            let header = &self.messages[m].header[off..end.min(header_len)];
            self.tx.extend_from_slice(header);
        }
        if end > header_len {
            let body = Arc::clone(&self.messages[m].body);
            self.tx.push_shared(&body, off.max(header_len) - header_len, end - header_len);
        }
        self.txns[m].bdat_off = end;
        // For LAST the number of replies is known only when they come (LMTP:
        // one per accepted recipient), hence `remaining: 0`.
        let remaining = u32::from(!last);
        self.push_expect(Await::Bdat { last }, m, now, remaining);
        last
    }

    fn quit(&mut self, now: Instant) {
        self.state = State::Closing;
        if self.config.send_quit {
            self.tx.extend_from_slice(b"QUIT\r\n");
            self.expect(Await::Quit, 0, now);
        } else if self.expects.is_empty() {
            self.finish_session();
        }
    }

    // ---- endings ----------------------------------------------------------

    fn finish(&mut self, m: usize, outcome: Outcome, code: u16) {
        let t = &mut self.txns[m];
        if t.finished {
            return;
        }
        t.finished = true;
        self.unfinished -= 1;
        let recipients_accepted = t.rcpt_ok;
        let bytes = self.messages[m].len() as u64;
        self.events.push_back(ClientEvent::Message { index: self.msg_base + m, outcome, code, recipients_accepted, bytes });
    }

    fn finish_all(&mut self, outcome: Outcome, code: u16) {
        for m in 0..self.txns.len() {
            self.finish(m, outcome, code);
        }
    }

    /// A refusal before any transaction: fail every message by the reply
    /// class, then QUIT politely.
    fn give_up(&mut self, now: Instant, code: u16, err: ClientError) {
        self.give_up_with(now, outcome_of(code / 100), code, err);
    }

    fn give_up_with(&mut self, now: Instant, outcome: Outcome, code: u16, err: ClientError) {
        self.finish_all(outcome, code);
        self.events.push_back(ClientEvent::Error(err.to_string()));
        self.quit(now);
    }

    /// An abnormal end without QUIT: every message still open gets `outcome`.
    fn fail(&mut self, outcome: Outcome, code: u16, err: ClientError) {
        if self.state == State::Done {
            return;
        }
        self.finish_all(outcome, code);
        self.events.push_back(ClientEvent::Error(err.to_string()));
        self.finish_session();
    }

    fn unexpected(&mut self, exp: Expect, code: u16) {
        let command = exp.what.command().as_str();
        self.fail(Outcome::ProtocolError, 0, ClientError::UnexpectedReply { command, code });
    }

    fn finish_session(&mut self) {
        if self.state == State::Done {
            return;
        }
        // Every message has its outcome before Done (normally already so).
        self.finish_all(Outcome::ConnectionError, 0);
        self.state = State::Done;
        self.expects.clear();
        self.tx.clear();
        self.bdat_starts.clear();
        self.deadline = None;
        self.events.push_back(ClientEvent::Done);
    }

    // ---- helpers ------------------------------------------------------------

    fn expect(&mut self, what: Await, msg: usize, now: Instant) {
        self.push_expect(what, msg, now, 1);
    }

    /// Expects the reply to the command just queued (it ends at the current
    /// end of the output).
    fn push_expect(&mut self, what: Await, msg: usize, now: Instant, remaining: u32) {
        let end = self.tx.queued;
        let written_at = (end <= self.written).then_some(now);
        self.expects.push_back(Expect { what, msg, queued_at: now, end, written_at, remaining });
    }

    /// Reports message `m`'s `body` phase once, ending at `end`.
    fn report_body(&mut self, m: usize, end: Instant) {
        let t = &mut self.txns[m];
        if t.body_reported {
            return;
        }
        let Some(start) = t.body_started else { return };
        t.body_reported = true;
        self.push_phase(Phase::Body, start, end, Some(m));
    }

    fn write_line(&mut self, parts: &[&[u8]]) {
        for p in parts {
            self.tx.extend_from_slice(p);
        }
        self.tx.extend_from_slice(b"\r\n");
    }

    /// Reports a phase from `since` to `now`; `msg`: the message it belongs
    /// to (corrected from its intended time), else the session's.
    fn push_phase(&mut self, phase: Phase, since: Instant, now: Instant, msg: Option<usize>) {
        let latency = now.saturating_duration_since(since);
        let intended = match msg {
            Some(m) => self.txns.get(m).and_then(|t| t.intended),
            None => self.intended_start,
        };
        let corrected = intended.map(|i| now.saturating_duration_since(i));
        self.events.push_back(ClientEvent::Phase { phase, latency, corrected });
    }

    fn joined_lines(&self, sep: &str) -> String {
        let mut s = String::new();
        for (i, l) in self.parser.lines().enumerate() {
            if i > 0 {
                s.push_str(sep);
            }
            s.push_str(&String::from_utf8_lossy(l));
        }
        s
    }

    fn waiting_for(&self) -> &'static str {
        match (self.state, self.expects.front()) {
            (State::TlsHandshake, _) => "TLS handshake",
            (_, Some(e)) => e.what.command().as_str(),
            (_, None) => "none",
        }
    }

    fn update_deadline(&mut self) {
        self.deadline = match (self.state, self.expects.front()) {
            (State::Done, _) => None,
            (State::TlsHandshake, _) => Some(self.tls_wait_since + self.config.timeouts.command),
            (_, Some(e)) => Some(e.queued_at.max(self.last_progress) + e.what.timeout(&self.config.timeouts)),
            (_, None) => None,
        };
    }
}

fn outcome_of(class: u16) -> Outcome {
    if class == 4 {
        Outcome::TempFailed
    } else {
        Outcome::Rejected
    }
}

/// Append the DATA form of the message `parts` (concatenated) to `out`:
/// every line (CRLF-delimited) starting with `.` gets one more `.`, a
/// missing final CRLF is added, then the terminating `.CRLF`.
pub fn dot_stuff(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let mut st = Stuffer::default();
    for part in parts {
        st.feed(out, part);
    }
    st.finish(out);
}

/// Dot-stuffing state across pieces of one message.
#[derive(Clone, Copy, Debug)]
struct Stuffer {
    at_line_start: bool,
    prev: u8,
}

impl Default for Stuffer {
    fn default() -> Self {
        Self { at_line_start: true, prev: 0 }
    }
}

impl Stuffer {
    /// Appends `part` with every line that starts with `.` stuffed.
    fn feed(&mut self, out: &mut Vec<u8>, part: &[u8]) {
        let mut rest: &[u8] = part;
        while let Some(&first) = rest.first() {
            if self.at_line_start && first == b'.' {
                out.push(b'.');
            }
            match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    let crlf = if i > 0 { rest[i - 1] == b'\r' } else { self.prev == b'\r' };
                    out.extend_from_slice(&rest[..=i]);
                    self.at_line_start = crlf;
                    self.prev = b'\n';
                    rest = &rest[i + 1..];
                }
                None => {
                    out.extend_from_slice(rest);
                    self.at_line_start = false;
                    self.prev = rest[rest.len() - 1];
                    rest = &[];
                }
            }
        }
    }

    /// Ends the data: the missing final CRLF, then `.CRLF`.
    fn finish(self, out: &mut Vec<u8>) {
        if !self.at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stuffed(parts: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        dot_stuff(&mut out, parts);
        out
    }

    #[test]
    fn dot_stuffing_doubles_leading_dots_and_adds_final_crlf() {
        assert_eq!(stuffed(&[b".a\r\n", b"..b\r\nc"]), b"..a\r\n...b\r\nc\r\n.\r\n");
        assert_eq!(stuffed(&[]), b".\r\n");
        assert_eq!(stuffed(&[b"x\r", b"\n.y\n.z\r\n"]), b"x\r\n..y\n.z\r\n.\r\n");
        assert_eq!(stuffed(&[b"a\r\n", b"", b".\r\n"]), b"a\r\n..\r\n.\r\n");
    }
}
