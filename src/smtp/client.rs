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
//! Latency: each phase event spans from the `now` of the call that produced
//! the command to the `now` of the input that completed its reply; `ehlo`
//! is reported for every hello reply (so an EHLO refused then HELO counts
//! twice), `auth` from the first AUTH line to the final AUTH reply,
//! `message` once per message at its last final reply (LMTP). The body is
//! copied (dot-stuffed) into the output in one piece.
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
}

/// What the session tells its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// A phase ended; `latency` from its command being produced to its reply.
    Phase { phase: Phase, latency: Duration },
    /// A reply arrived for `command`.
    Reply { command: CommandKind, code: u16 },
    /// STARTTLS got 220: flush output, start the TLS client handshake, then
    /// call [`ClientSession::handle_tls_established`].
    StartTls,
    /// The one outcome of message `index`.
    Message { index: usize, outcome: Outcome, code: u16, recipients_accepted: u32 },
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
    sent_at: Instant,
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
}

/// One client SMTP session (see the module doc).
pub struct ClientSession {
    config: Arc<ClientConfig>,
    messages: Vec<Message>,
    txns: Vec<Txn>,
    unfinished: usize,
    next_msg: usize,
    state: State,
    expects: VecDeque<Expect>,
    parser: ReplyParser,
    tx: Vec<u8>,
    events: VecDeque<ClientEvent>,
    caps: Capabilities,
    created: Instant,
    pipelining: bool,
    tls_active: bool,
    authed: bool,
    /// XCLIENT attributes still to send (taken when sent).
    xclient: Option<Box<[u8]>>,
    rset_pending: bool,
    /// Time of the last reply (or of session creation).
    last_progress: Instant,
    starttls_sent: Instant,
    tls_wait_since: Instant,
    auth_started: Instant,
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
            state: State::Greeting,
            expects: VecDeque::with_capacity(16),
            parser: ReplyParser::new(),
            tx: Vec::with_capacity(1024),
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
            auth_started: now,
            deadline: None,
        };
        s.expects.push_back(Expect { what: Await::Greeting, msg: 0, sent_at: now, remaining: 1 });
        s.update_deadline();
        s
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
    pub fn poll_transmit(&mut self, _now: Instant, out: &mut Vec<u8>) {
        if self.tx.is_empty() {
            return;
        }
        if out.is_empty() {
            std::mem::swap(out, &mut self.tx);
        } else {
            out.extend_from_slice(&self.tx);
            self.tx.clear();
        }
    }

    /// The TLS handshake that followed [`ClientEvent::StartTls`] completed.
    pub fn handle_tls_established(&mut self, now: Instant) {
        if self.state != State::TlsHandshake {
            return;
        }
        self.push_phase(Phase::StartTls, self.starttls_sent, now);
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
        if self.state == State::Closing && self.unfinished == 0 {
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
                    self.starttls_sent = exp.sent_at;
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
                    self.push_phase(Phase::Auth, self.auth_started, now);
                    self.give_up(now, code, ClientError::Refused { command: "AUTH", code });
                }
                _ => self.unexpected(exp, code),
            },
            Await::AuthFinal => match class {
                2 => {
                    self.push_phase(Phase::Auth, self.auth_started, now);
                    self.authed = true;
                    self.start_transactions(now);
                }
                4 | 5 => {
                    self.push_phase(Phase::Auth, self.auth_started, now);
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
                self.push_phase(Phase::Quit, exp.sent_at, now);
            }
        }
        if self.state == State::Closing && self.expects.is_empty() {
            self.finish_session();
        }
    }

    fn on_greeting(&mut self, now: Instant, code: u16, class: u16) {
        self.push_phase(Phase::Banner, self.created, now);
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
        self.push_phase(Phase::Ehlo, exp.sent_at, now);
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
        self.push_phase(Phase::Mail, exp.sent_at, now);
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
        self.push_phase(Phase::Rcpt, exp.sent_at, now);
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
        self.push_phase(Phase::Data, exp.sent_at, now);
        let m = exp.msg;
        let t = self.txns[m];
        match class {
            3 => {
                if t.mail_ok && t.rcpt_ok > 0 && !t.finished {
                    let msg = &self.messages[m];
                    dot_stuff(&mut self.tx, &[&msg.header, &msg.body]);
                    let remaining = if self.config.lmtp { t.rcpt_ok } else { 1 };
                    self.expects.push_back(Expect { what: Await::Dot { discard: false }, msg: m, sent_at: now, remaining });
                } else {
                    // 354 although no recipient was accepted: end the empty
                    // DATA at once and ignore its reply.
                    self.tx.extend_from_slice(b".\r\n");
                    self.expects.push_back(Expect { what: Await::Dot { discard: true }, msg: m, sent_at: now, remaining: 1 });
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
            self.push_phase(Phase::Message, exp.sent_at, now);
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
            self.auth_started = now;
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
        // Writing into a Vec cannot fail.
        let _ = write!(self.tx, "BDAT {size}{}\r\n", if last { " LAST" } else { "" });
        let (header, body) = (&msg.header[..], &msg.body[..]);
        let end = off + size;
        if off < header.len() {
            self.tx.extend_from_slice(&header[off..end.min(header.len())]);
        }
        if end > header.len() {
            self.tx.extend_from_slice(&body[off.max(header.len()) - header.len()..end - header.len()]);
        }
        self.txns[m].bdat_off = end;
        // For LAST the number of replies is known only when they come (LMTP:
        // one per accepted recipient), hence `remaining: 0`.
        let remaining = u32::from(!last);
        self.expects.push_back(Expect { what: Await::Bdat { last }, msg: m, sent_at: now, remaining });
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
        self.events.push_back(ClientEvent::Message { index: m, outcome, code, recipients_accepted });
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
        self.deadline = None;
        self.events.push_back(ClientEvent::Done);
    }

    // ---- helpers ------------------------------------------------------------

    fn expect(&mut self, what: Await, msg: usize, now: Instant) {
        self.expects.push_back(Expect { what, msg, sent_at: now, remaining: 1 });
    }

    fn write_line(&mut self, parts: &[&[u8]]) {
        for p in parts {
            self.tx.extend_from_slice(p);
        }
        self.tx.extend_from_slice(b"\r\n");
    }

    fn push_phase(&mut self, phase: Phase, since: Instant, now: Instant) {
        let latency = now.saturating_duration_since(since);
        self.events.push_back(ClientEvent::Phase { phase, latency });
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
            (_, Some(e)) => Some(e.sent_at.max(self.last_progress) + e.what.timeout(&self.config.timeouts)),
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
    let mut at_line_start = true;
    let mut prev = 0u8;
    for part in parts {
        let mut rest: &[u8] = part;
        while let Some(&first) = rest.first() {
            if at_line_start && first == b'.' {
                out.push(b'.');
            }
            match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    let crlf = if i > 0 { rest[i - 1] == b'\r' } else { prev == b'\r' };
                    out.extend_from_slice(&rest[..=i]);
                    at_line_start = crlf;
                    prev = b'\n';
                    rest = &rest[i + 1..];
                }
                None => {
                    out.extend_from_slice(rest);
                    at_line_start = false;
                    prev = rest[rest.len() - 1];
                    rest = &[];
                }
            }
        }
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
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
