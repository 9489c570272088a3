//! The sink's per-connection logic, with no I/O type in it: a
//! [`ServerSession`] driven through [`Hooks`] (faults, `--verify`,
//! `--capture`), its replies handed to whatever backend carries the
//! connection ([`Backend`]), and the decision when the connection ends.
//!
//! Invariants:
//! - A connection ends (gracefully: replies flushed, then FIN) when the
//!   session closes, or when the peer half-closed and no fault delay holds
//!   a reply; an I/O error ends it at once.
//! - Reading stops while the session buffers as much pipelined input as it
//!   takes (a fault delay holds a reply) and resumes when it drains.
//! - Timers are rescheduled lazily: the backend's deadline is moved only
//!   when the session's moves earlier; a timer that fires early is pushed
//!   to the session's current deadline. So a busy connection costs no timer
//!   operation per command.
//! - Every connection that ends counts as one session (a TLS one if a
//!   handshake completed, a resumed one if it resumed), exactly once.
//! - With `--exit-after-messages N` a message is accepted only with one of
//!   the N slots claimed at its end of data ([`MessageLimit`]): past N it
//!   gets 451, so the sink accepts exactly N however many are in flight.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::config::AuthPolicy;
use crate::digest::{self, Verifier};
use crate::net::backend::{Backend, Close, Closed, ConnId};
use crate::net::runtime::StopSignal;
use crate::net::tls_stream::TlsSide;
use crate::smtp::server::{
    CloseReason, CommandInfo, MessageOutcome, ServerConfig, ServerEvent, ServerHooks,
    ServerSession, Verdict,
};
use crate::smtp::{CommandKind, Outcome};
use crate::stats::{Recorder, TraceRecorder};
use crate::trace::Scanner;

use super::capture::{BodyBuffer, Capture};
use super::faults::ThreadFaults;
use super::pacer::Pacer;

/// Where the connection's current message transaction is, from the
/// sink's side (see [`Txn::on_reply`]): what makes one MAIL one message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Txn {
    /// No transaction.
    #[default]
    None,
    /// A MAIL was read and awaits its reply (a fault may close instead).
    MailPending,
    /// MAIL accepted: RCPTs so far (`ok` accepted, `temp` whether a 4xx
    /// refused one, `refused` whether any was refused).
    Open { ok: u32, temp: bool, refused: bool },
}

impl Txn {
    /// The outcome of a transaction whose every recipient was refused:
    /// tempfailed if one got a 4xx, else rejected (the blaster's rule).
    fn all_refused(self) -> Option<Outcome> {
        match self {
            Txn::Open {
                ok: 0,
                temp,
                refused: true,
            } => Some(if temp {
                Outcome::TempFailed
            } else {
                Outcome::Rejected
            }),
            _ => None,
        }
    }

    /// A reply was sent: the message outcome it decides, if any. The
    /// message of a transaction ends with its end-of-data reply
    /// ([`ServerEvent::Message`], counted there), with a refused MAIL, or —
    /// every recipient refused — at whatever ends the transaction (DATA or
    /// BDAT refused, RSET, a new hello, QUIT, the close). A transaction
    /// the client abandons with recipients accepted and no data is no
    /// message.
    fn on_reply(&mut self, command: CommandKind, code: u16) -> Option<Outcome> {
        let class = code / 100;
        let refused = |class| {
            if class == 4 {
                Outcome::TempFailed
            } else {
                Outcome::Rejected
            }
        };
        match (command, *self) {
            (CommandKind::Mail, Txn::None | Txn::MailPending) => {
                if class == 2 {
                    *self = Txn::Open {
                        ok: 0,
                        temp: false,
                        refused: false,
                    };
                    None
                } else {
                    *self = Txn::None;
                    (class >= 4).then(|| refused(class))
                }
            }
            (
                CommandKind::Rcpt,
                Txn::Open {
                    ok,
                    temp,
                    refused: r,
                },
            ) => {
                *self = match class {
                    2 => Txn::Open {
                        ok: ok + 1,
                        temp,
                        refused: r,
                    },
                    4 => Txn::Open {
                        ok,
                        temp: true,
                        refused: true,
                    },
                    _ => Txn::Open {
                        ok,
                        temp,
                        refused: true,
                    },
                };
                None
            }
            (CommandKind::Data | CommandKind::Bdat, t @ Txn::Open { ok: 0, .. }) if class >= 4 => {
                *self = Txn::None;
                t.all_refused()
            }
            (
                CommandKind::Rset
                | CommandKind::Helo
                | CommandKind::Ehlo
                | CommandKind::Lhlo
                | CommandKind::Quit,
                t,
            ) => {
                *self = Txn::None;
                t.all_refused()
            }
            _ => None,
        }
    }
}

/// Per-connection state the hooks change.
#[derive(Default)]
pub struct ConnState {
    txn: Txn,
    /// The body being received (`--capture` only), bounded by the size limit.
    body: Option<BodyBuffer>,
    verifier: Option<Box<Verifier>>,
    /// `--trace`: the header-section scan of the message being received.
    scanner: Option<Box<Scanner>>,
    eof: bool,
    /// The client sent something (a plaintext byte, or a completed TLS
    /// handshake): the connection is a session.
    spoke: bool,
    io_error: bool,
    close_reason: Option<CloseReason>,
    tls_established: bool,
    tls_resumed: bool,
    /// A `dot:stored=CODE` fault refused the message being ended: it still
    /// counts as delivered for `--trace`.
    stored: bool,
    /// The suite and group it negotiated (IANA code points).
    tls_negotiated: (u16, u16),
}

/// `--exit-after-messages N`: the N acceptances every thread claims from.
#[derive(Clone, Debug)]
pub struct MessageLimit {
    pub limit: u64,
    /// Slots claimed so far, by every thread (may pass `limit`).
    pub claimed: Arc<AtomicU64>,
    /// Stopped when the last slot is claimed.
    pub stop: StopSignal,
}

impl MessageLimit {
    /// Claims one acceptance: false past the limit (then refuse the
    /// message). One atomic add per message that would be accepted.
    fn claim(&self) -> bool {
        let n = self.claimed.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.limit && !self.stop.is_stopped() {
            self.stop.stop();
        }
        n <= self.limit
    }
}

/// One sink connection.
pub struct SinkConn {
    session: ServerSession,
    peer_ip: IpAddr,
    /// The deadline last given to the backend.
    timer_at: Option<Instant>,
    st: ConnState,
}

/// What the thread lends a connection (its configs, faults, recorder).
pub struct ThreadCtx {
    /// This thread's own copies of the shared configs: a session clones
    /// these `Arc`s, so the reference counts it bumps live on cache lines
    /// no other thread writes.
    pub server: Arc<ServerConfig>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub auth: Option<AuthPolicy>,
    pub faults: ThreadFaults,
    pub rec: Recorder,
    pub capture: Option<Capture>,
    pub capture_on: bool,
    pub verify: bool,
    /// `--trace`: this thread's deliveries.
    pub trace: Option<TraceRecorder>,
    pub verify_missing: u64,
    pub capture_errors: u64,
    /// `--exit-after-messages`.
    pub message_limit: Option<MessageLimit>,
    /// `--max-rate`: the shared turns of final replies.
    pub pacer: Option<Arc<Pacer>>,
    /// Ended sessions not yet published (only with `--exit-after-sessions`).
    pub local_sessions: u64,
    /// Scratch for the session's output.
    pub out: Vec<u8>,
}

/// The [`ServerHooks`] for one call into a session.
struct Hooks<'a> {
    faults: &'a mut ThreadFaults,
    message_limit: Option<&'a MessageLimit>,
    pacer: Option<&'a Pacer>,
    auth: Option<&'a AuthPolicy>,
    peer_ip: IpAddr,
    now: Instant,
    st: &'a mut ConnState,
    capture: Option<&'a mut Capture>,
    rec: &'a mut Recorder,
    trace: Option<&'a mut TraceRecorder>,
    verify_missing: &'a mut u64,
    capture_errors: &'a mut u64,
}

impl ServerHooks for Hooks<'_> {
    fn on_command(&mut self, cmd: CommandKind, info: &CommandInfo<'_>) -> Verdict {
        if cmd == CommandKind::Mail && self.st.txn == Txn::None {
            self.st.txn = Txn::MailPending;
        }
        let v = if self.faults.is_empty() {
            Verdict::Proceed
        } else {
            let v = self.faults.verdict(cmd, info, self.peer_ip, self.now);
            self.st.stored = self.faults.take_stored();
            v
        };
        // The end of data (or BDAT LAST) of a message about to be accepted
        // (a delay ends in acceptance too) takes one of the limit's slots.
        if let (CommandKind::Dot, Some(limit)) = (cmd, self.message_limit) {
            let accepting = matches!(
                v,
                Verdict::Proceed | Verdict::Reply(0..=399) | Verdict::Delay(_)
            );
            if accepting && !limit.claim() {
                return Verdict::Reply(451);
            }
        }
        // `--max-rate`: the final reply of a message to be accepted waits
        // for its turn (after any fault delay).
        if let (CommandKind::Dot, Some(p)) = (cmd, self.pacer) {
            match v {
                Verdict::Proceed => {
                    let wait = p.claim(self.now);
                    if !wait.is_zero() {
                        return Verdict::Delay(wait);
                    }
                }
                Verdict::Delay(d) => return Verdict::Delay(d + p.claim(self.now + d)),
                _ => {}
            }
        }
        v
    }

    fn check_auth(&mut self, _authzid: &[u8], user: &[u8], pass: &[u8]) -> bool {
        match self.auth {
            None | Some(AuthPolicy::Any) => true,
            Some(AuthPolicy::Only { user: u, pass: p }) => {
                u.as_bytes() == user && p.as_bytes() == pass
            }
        }
    }

    fn on_message_start(&mut self) {
        if let Some(b) = &mut self.st.body {
            b.start();
        }
        if let Some(v) = &mut self.st.verifier {
            v.reset();
        }
        if let Some(s) = &mut self.st.scanner {
            s.reset();
        }
    }

    fn on_body(&mut self, chunk: &[u8]) {
        if let Some(b) = &mut self.st.body {
            b.push(chunk);
        }
        if let Some(v) = &mut self.st.verifier {
            v.feed(chunk);
        }
        if let Some(s) = &mut self.st.scanner {
            if !s.done() {
                s.feed(chunk);
            }
        }
    }

    fn on_message_end(&mut self, accepted: bool) {
        if let (Some(s), Some(t)) = (&mut self.st.scanner, self.trace.as_deref_mut()) {
            let stored = accepted || std::mem::take(&mut self.st.stored);
            match (stored, s.finish()) {
                (false, _) => {}
                (true, None) => t.untraced(),
                (true, Some(tr)) => {
                    let recipients = match self.st.txn {
                        Txn::Open { ok, .. } => ok,
                        _ => 0,
                    };
                    let now_ns = crate::trace::unix_ns(self.now);
                    t.delivered(tr.run, tr.n, recipients, tr.sent_ns, now_ns);
                }
            }
        }
        if let Some(v) = &mut self.st.verifier {
            if accepted {
                match v.finish() {
                    digest::Verdict::Ok => self.rec.count_verify(true),
                    digest::Verdict::Corrupt => self.rec.count_verify(false),
                    digest::Verdict::Missing => *self.verify_missing += 1,
                }
            } else {
                v.reset();
            }
        }
        if let Some(b) = &mut self.st.body {
            // An accepted body is within the size limit, so it is whole.
            if let (true, Some(body), Some(c)) = (accepted, b.body(), &mut self.capture) {
                if c.store(body).is_err() {
                    *self.capture_errors += 1;
                }
            }
            b.release();
        }
    }
}

impl ThreadCtx {
    fn hooks<'a>(&'a mut self, st: &'a mut ConnState, peer_ip: IpAddr, now: Instant) -> Hooks<'a> {
        Hooks {
            faults: &mut self.faults,
            message_limit: self.message_limit.as_ref(),
            pacer: self.pacer.as_deref(),
            auth: self.auth.as_ref(),
            peer_ip,
            now,
            st,
            capture: self.capture.as_mut(),
            rec: &mut self.rec,
            trace: self.trace.as_mut(),
            verify_missing: &mut self.verify_missing,
            capture_errors: &mut self.capture_errors,
        }
    }
}

impl SinkConn {
    /// A new connection from `peer_ip`: greets it (or waits for the PROXY
    /// header). `implicit_tls`: the listener speaks TLS from the first byte.
    /// `None` if TLS cannot start (then refuse the connection).
    pub fn accept<B: Backend>(
        ctx: &mut ThreadCtx,
        be: &mut B,
        id: ConnId,
        peer_ip: IpAddr,
        implicit_tls: bool,
        now: Instant,
    ) -> Option<SinkConn> {
        let mut session = ServerSession::new(Arc::clone(&ctx.server), now);
        if implicit_tls {
            let cfg = ctx.tls.as_ref()?;
            be.start_tls(id, TlsSide::Server(Arc::clone(cfg))).ok()?;
            session.set_tls_active();
        }
        let st = ConnState {
            body: ctx
                .capture_on
                .then(|| BodyBuffer::new(ctx.server.max_message_size)),
            verifier: ctx.verify.then(|| Box::new(Verifier::new())),
            scanner: ctx.trace.is_some().then(|| Box::new(Scanner::new())),
            ..ConnState::default()
        };
        let mut c = SinkConn {
            session,
            peer_ip,
            timer_at: None,
            st,
        };
        let mut out = std::mem::take(&mut ctx.out);
        {
            let mut hooks = ctx.hooks(&mut c.st, c.peer_ip, now);
            c.session.start(now, &mut out, &mut hooks);
        }
        ctx.out = out;
        c.after_session_call(ctx, be, id);
        c.settle(be, id);
        Some(c)
    }

    /// Plaintext arrived.
    pub fn input<B: Backend>(
        &mut self,
        ctx: &mut ThreadCtx,
        be: &mut B,
        id: ConnId,
        now: Instant,
        plain: &[u8],
    ) {
        if self.session.is_closed() {
            return;
        }
        self.st.spoke |= !plain.is_empty();
        let mut out = std::mem::take(&mut ctx.out);
        {
            let mut hooks = ctx.hooks(&mut self.st, self.peer_ip, now);
            self.session.handle_input(now, plain, &mut out, &mut hooks);
        }
        ctx.out = out;
        self.after_session_call(ctx, be, id);
        self.settle(be, id);
    }

    /// The TLS handshake completed.
    pub fn tls_ready<B: Backend>(&mut self, be: &mut B, id: ConnId, now: Instant) {
        let t = be.tls_state(id);
        self.st.tls_established = t.established;
        self.st.tls_resumed = t.resumed;
        self.st.tls_negotiated = (t.suite, t.group);
        self.session.handle_tls_established(now);
        self.settle(be, id);
    }

    /// The peer half-closed.
    pub fn peer_closed<B: Backend>(&mut self, be: &mut B, id: ConnId) {
        self.st.eof = true;
        self.settle(be, id);
    }

    /// The deadline passed: a fault delay ended, or a timeout.
    pub fn timer<B: Backend>(&mut self, ctx: &mut ThreadCtx, be: &mut B, id: ConnId, now: Instant) {
        self.timer_at = None;
        if !self.session.is_closed() {
            let mut out = std::mem::take(&mut ctx.out);
            {
                let mut hooks = ctx.hooks(&mut self.st, self.peer_ip, now);
                self.session.handle_timeout(now, &mut out, &mut hooks);
            }
            ctx.out = out;
            self.after_session_call(ctx, be, id);
        }
        self.settle(be, id);
    }

    /// The connection is gone: counts it. One the client closed (or reset)
    /// without a word — a readiness check — is a connection without a
    /// session, neither a session nor an error.
    pub fn closed(self, ctx: &mut ThreadCtx, why: Closed) {
        // A reset is how some checks close; any other error (a failed TLS
        // handshake) means the client did send something.
        let quiet_close = match &why {
            Closed::Error(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ),
            _ => !self.st.io_error,
        };
        let silent = !self.st.spoke
            && !self.st.tls_established
            && self.st.close_reason.is_none()
            && quiet_close;
        if silent {
            ctx.rec.count_connection_without_session();
            return;
        }
        let io_error = self.st.io_error || matches!(why, Closed::Error(_) | Closed::FlushTimeout);
        // Completed handshakes only: an implicit-TLS or STARTTLS client
        // whose handshake failed is a plaintext session that ended.
        ctx.rec.count_session(self.st.tls_established);
        if self.st.tls_resumed {
            ctx.rec.count_tls_resumed();
        }
        if self.st.tls_established {
            let (suite, group) = self.st.tls_negotiated;
            ctx.rec.count_tls_negotiated(suite, group);
        }
        ctx.local_sessions += 1;
        // A transaction still open is a message the connection ended:
        // every recipient refused decides it; else it is a connection
        // error (a timeout if the sink timed out), and no error outside a
        // message is counted besides.
        // A client that ends cleanly (or by QUIT) a transaction with no
        // recipient accepted yet had nothing to deliver: no message.
        let cut = io_error
            || matches!(
                self.st.close_reason,
                Some(CloseReason::Fault | CloseReason::Timeout)
            );
        let txn = match self.st.txn {
            Txn::MailPending if !cut => Txn::None,
            Txn::Open {
                ok: 0,
                refused: false,
                ..
            } if !cut => Txn::None,
            t => t,
        };
        let in_txn = match txn {
            Txn::None => false,
            t => {
                let outcome = t.all_refused().unwrap_or(match self.st.close_reason {
                    Some(CloseReason::Timeout) => Outcome::Timeout,
                    _ => Outcome::ConnectionError,
                });
                ctx.rec.count_outcome(outcome);
                t.all_refused().is_none()
            }
        };
        if in_txn {
            return;
        }
        match self.st.close_reason {
            Some(CloseReason::Timeout) => ctx.rec.count_session_error(Outcome::Timeout),
            Some(CloseReason::ProxyError | CloseReason::TooManyErrors) => {
                ctx.rec.count_session_error(Outcome::ProtocolError)
            }
            _ => {}
        }
        if io_error && self.st.close_reason.is_none() {
            ctx.rec.count_session_error(Outcome::ConnectionError);
        }
    }

    /// Hands queued replies to the backend and handles session events.
    fn after_session_call<B: Backend>(&mut self, ctx: &mut ThreadCtx, be: &mut B, id: ConnId) {
        if !ctx.out.is_empty() {
            be.write(id, &ctx.out);
            ctx.out.clear();
        }
        while let Some(ev) = self.session.poll_event() {
            match ev {
                ServerEvent::Reply { command, code } => {
                    ctx.rec.count_reply(command, code);
                    if let Some(o) = self.st.txn.on_reply(command, code) {
                        ctx.rec.count_outcome(o);
                    }
                }
                ServerEvent::Message {
                    outcome,
                    code,
                    bytes,
                    recipients,
                } => {
                    self.st.txn = Txn::None;
                    let o = match outcome {
                        MessageOutcome::Accepted => {
                            // Recipients and bytes of accepted messages only.
                            ctx.rec.count_recipients(u64::from(recipients));
                            ctx.rec.count_bytes(bytes);
                            Outcome::Accepted
                        }
                        // Closed by a fault without a reply: what the
                        // client sees is a connection error.
                        _ if code == 0 => Outcome::ConnectionError,
                        MessageOutcome::TempFailed => Outcome::TempFailed,
                        MessageOutcome::Rejected => Outcome::Rejected,
                    };
                    ctx.rec.count_outcome(o);
                }
                ServerEvent::StartTls => {
                    // The 220 is already queued in the clear; the switch
                    // drops any plaintext that followed STARTTLS.
                    let ok = match &ctx.tls {
                        Some(cfg) => be.start_tls(id, TlsSide::Server(Arc::clone(cfg))).is_ok(),
                        None => false,
                    };
                    if !ok {
                        self.st.io_error = true;
                    }
                }
                ServerEvent::Close(reason) => self.st.close_reason = Some(reason),
                ServerEvent::Proxy(_) | ServerEvent::Authenticated => {}
            }
        }
    }

    /// Decides whether the connection ends now; otherwise sets its reading
    /// and its deadline.
    fn settle<B: Backend>(&mut self, be: &mut B, id: ConnId) {
        if self.st.io_error {
            be.close(id, Close::Abort);
            return;
        }
        // A peer that half-closed still gets the replies to what it sent,
        // including one a fault delay holds; then the connection ends.
        let finished = self.st.eof && !self.session.holds_reply();
        if self.session.is_closed() || finished {
            be.close(id, Close::Graceful);
            return;
        }
        be.set_reading(id, self.session.wants_read());
        if let Some(at) = self.session.poll_timeout() {
            if self.timer_at.is_none_or(|t| t > at) {
                be.set_deadline(id, Some(at));
                self.timer_at = Some(at);
            }
        }
    }
}
