//! The blaster's per-connection logic, with no I/O type in it: one
//! [`ClientSession`] from connect to close, driven through whatever backend
//! carries it ([`Backend`]); `probe` drives the same code for its one
//! session.
//!
//! What it does with the backend: after the connect, a PROXY header (with
//! the source the session claims) and, for implicit TLS, the handshake;
//! then the session's output in pieces of at most [`OUT_CHUNK_BYTES`]
//! (refilled as output leaves, so a large body is never buffered whole),
//! every write reported back to the session so each phase is timed from
//! its command's last byte written; STARTTLS when the session asks; one
//! deadline (the session's, or the connect / TLS handshake bound).
//!
//! What happens is told to an [`Observer`]: the blaster records it, the
//! probe prints it.
//!
//! Invariants: every message given to a session gets exactly one outcome
//! (the session counts its own); a connection that never got a session
//! (the connect failed or timed out, the implicit TLS handshake failed, or
//! it closed before) is told once as [`Observer::no_session`], and its
//! messages were never attempted; a connection that had a session counts
//! as one session when it ends, a TLS one only if a handshake completed.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use super::config::ProxyVersion;
use crate::net::backend::{Backend, Close, Closed, ConnId, TlsState};
use crate::net::tls_stream::TlsSide;
use crate::smtp::client::{ClientConfig, ClientEvent, ClientSession, Message};
use crate::smtp::{CommandKind, Outcome, Phase};

use super::identity::Identity;

/// Output taken from a session per write: a large body goes out in pieces,
/// so it is never buffered whole per connection.
pub const OUT_CHUNK_BYTES: usize = 256 * 1024;

/// What every connection of a run shares.
#[derive(Clone, Debug)]
pub struct ConnConfig {
    pub client: Arc<ClientConfig>,
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    pub implicit_tls: bool,
    pub proxy: Option<ProxyVersion>,
    pub target: SocketAddr,
    /// Bound on the connect and on the TLS handshake of implicit TLS.
    pub timeout: Duration,
    /// Messages a session carries at most (`-k`).
    pub messages_per_session: u64,
}

/// Who is told what happened.
#[allow(unused_variables)]
pub trait Observer {
    /// A phase ended (`latency` from its start; `corrected` from the
    /// intended time, open loop only).
    fn phase(&mut self, phase: Phase, latency: Duration, corrected: Option<Duration>);
    fn reply(&mut self, command: CommandKind, code: u16) {}
    /// A message's one outcome (`bytes`: its size, for accepted ones).
    fn outcome(&mut self, outcome: Outcome, recipients_accepted: u32, bytes: u64);
    /// The connection ended without a session: `outcome` says how
    /// (connection error or timeout); its messages were never attempted.
    fn no_session(&mut self, outcome: Outcome) {}
    fn error(&mut self, e: String);
    /// The reply that refused a message (see `ClientEvent::Refused`).
    fn refused(&mut self, reason: String) {}
    fn banner(&mut self, text: String) {}
    fn capabilities(&mut self, lines: Vec<String>) {}
    /// A connection that had a session ended.
    fn session_end(&mut self, tls: TlsState) {}
    /// A traced message (`--trace`) was accepted: its tag (`{n}`).
    fn accepted(&mut self, tag: u64) {}
}

/// What a call left the connection as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Working: connecting, handshaking, or a message in flight.
    Busy,
    /// An open session between messages.
    Idle,
    /// Closing (the backend reports `on_closed`).
    Done,
}

/// What a call works with: the run's settings, the backend, the
/// observer, and a scratch buffer for the session's output.
pub struct ConnCtx<'a, B, O> {
    pub cfg: &'a ConnConfig,
    pub be: &'a mut B,
    pub obs: &'a mut O,
    pub out: &'a mut Vec<u8>,
}

/// What one session event asks of the driver.
enum Ask {
    Nothing,
    StartTls,
    Done,
}

/// Tells `obs` one session event (`open`: record corrected latencies).
fn tell<O: Observer>(
    obs: &mut O,
    open: bool,
    outcomes: &mut u64,
    tags: &mut Vec<(u64, u64)>,
    ev: ClientEvent,
) -> Ask {
    match ev {
        ClientEvent::Phase {
            phase,
            latency,
            corrected,
        } => obs.phase(phase, latency, corrected.filter(|_| open)),
        ClientEvent::Reply { command, code } => obs.reply(command, code),
        ClientEvent::Message {
            index,
            outcome,
            recipients_accepted,
            bytes,
            ..
        } => {
            *outcomes += 1;
            if !tags.is_empty() {
                if let Some(p) = tags.iter().position(|t| t.0 == index as u64) {
                    let (_, tag) = tags.swap_remove(p);
                    if outcome == Outcome::Accepted {
                        obs.accepted(tag);
                    }
                }
            }
            obs.outcome(outcome, recipients_accepted, bytes);
        }
        ClientEvent::Error(e) => obs.error(e),
        ClientEvent::Refused(r) => obs.refused(r),
        ClientEvent::Banner(b) => obs.banner(b),
        ClientEvent::Capabilities(c) => obs.capabilities(c),
        ClientEvent::StartTls => return Ask::StartTls,
        ClientEvent::Done => return Ask::Done,
    }
    Ask::Nothing
}

/// One blaster connection.
pub struct BlastConn {
    session: Option<ClientSession>,
    /// Messages (with their intended times) waiting for the session to
    /// exist (it starts when TCP, or implicit TLS, is up).
    pending: Vec<(Message, Option<Instant>)>,
    /// Messages given to this connection (an outcome is owed for each).
    pub given: u64,
    outcomes: u64,
    /// Traced messages without an outcome yet: (index in the session, tag).
    tags: Vec<(u64, u64)>,
    /// An open-loop session (messages one at a time).
    pub open: bool,
    /// The session's intended start (open loop), else its actual start.
    pub intended: Instant,
    pub started: Instant,
    tls_started: Option<Instant>,
    /// Bytes the connection carried before the session's first byte (a
    /// PROXY header): the session's write offsets start after them.
    out_base: u64,
    tls: TlsState,
    identity: Identity,
    /// A failure before the session existed was told (once).
    failed: bool,
    closing: bool,
    /// Listed in the open loop's idle list.
    pub idle_listed: bool,
    /// The deadline last given to the backend (moved only earlier; one
    /// that fires early is pushed to the session's current deadline, so a
    /// busy connection costs no timer operation per command).
    timer_at: Option<Instant>,
}

impl BlastConn {
    /// A connection started for `pending` messages (arm its connect
    /// deadline after `Backend::connect`).
    pub fn new(
        pending: Vec<(Message, Option<Instant>)>,
        open: bool,
        intended: Instant,
        started: Instant,
        identity: Identity,
    ) -> Self {
        let tags = pending
            .iter()
            .enumerate()
            .filter(|(_, (m, _))| m.stamp.is_some())
            .map(|(i, (m, _))| (i as u64, m.tag))
            .collect();
        BlastConn {
            tags,
            given: pending.len() as u64,
            pending,
            session: None,
            outcomes: 0,
            open,
            intended,
            started,
            tls_started: None,
            out_base: 0,
            tls: TlsState::default(),
            identity,
            failed: false,
            closing: false,
            idle_listed: false,
            timer_at: None,
        }
    }

    /// Arms the connect deadline (after `Backend::connect`).
    pub fn arm<B: Backend>(&mut self, be: &mut B, id: ConnId, at: Instant) {
        self.timer_at = Some(at);
        be.set_deadline(id, Some(at));
    }

    /// The session, once it exists.
    pub fn session(&self) -> Option<&ClientSession> {
        self.session.as_ref()
    }

    /// Reports a latency the driver measures (connect, implicit TLS,
    /// session): also corrected from the intended start in open loop.
    fn driver_phase<O: Observer>(&self, obs: &mut O, phase: Phase, since: Instant, now: Instant) {
        let latency = now.saturating_duration_since(since);
        let corrected = self
            .open
            .then(|| now.saturating_duration_since(self.intended));
        obs.phase(phase, latency, corrected);
    }

    /// The connect ended: `Ok`, or the error (the id is gone then).
    pub fn connected<B: Backend, O: Observer>(
        &mut self,
        cx: &mut ConnCtx<'_, B, O>,
        id: ConnId,
        now: Instant,
        result: std::io::Result<()>,
    ) -> State {
        if let Err(e) = result {
            cx.obs.error(format!("connect: {e}"));
            self.fail(cx.obs, Outcome::ConnectionError);
            return State::Done;
        }
        self.driver_phase(cx.obs, Phase::Connect, self.started, now);
        if let Some(v) = cx.cfg.proxy {
            let src = self.identity.proxy_source.unwrap_or_else(|| {
                cx.be
                    .local_addr(id)
                    .unwrap_or(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)))
            });
            cx.out.clear();
            match v {
                ProxyVersion::V1 => crate::smtp::proxy::write_v1(src, cx.cfg.target, cx.out),
                ProxyVersion::V2 => crate::smtp::proxy::write_v2(src, cx.cfg.target, cx.out),
            }
            cx.be.write(id, cx.out);
        }
        if cx.cfg.implicit_tls {
            let started = match &cx.cfg.tls {
                Some((c, name)) => cx
                    .be
                    .start_tls(id, TlsSide::Client(Arc::clone(c), name.clone())),
                None => Err(std::io::Error::other("no TLS configuration")),
            };
            if let Err(e) = started {
                cx.obs.error(format!("TLS: {e}"));
                self.fail(cx.obs, Outcome::ConnectionError);
                cx.be.close(id, Close::Abort);
                return State::Done;
            }
            self.tls_started = Some(now);
            self.timer_at = Some(now + cx.cfg.timeout);
            cx.be.set_deadline(id, self.timer_at);
            return State::Busy;
        }
        self.start_session(cx, id, now);
        self.after(cx, id, now)
    }

    fn start_session<B: Backend, O: Observer>(
        &mut self,
        cx: &mut ConnCtx<'_, B, O>,
        id: ConnId,
        now: Instant,
    ) {
        let pending = std::mem::take(&mut self.pending);
        let client = Arc::clone(&cx.cfg.client);
        let mut session = if self.open {
            let mut s = ClientSession::open(client, now, Some(self.intended));
            for (m, intended) in pending {
                s.push_message(now, m, intended);
            }
            if self.given >= cx.cfg.messages_per_session {
                s.handle_no_more_messages(now);
            }
            s
        } else {
            ClientSession::new(client, pending.into_iter().map(|(m, _)| m).collect(), now)
        };
        session.set_xclient(self.identity.xclient.take());
        self.out_base = cx.be.app_bytes_in(id);
        self.session = Some(session);
    }

    /// The TLS handshake completed: STARTTLS's, or implicit TLS's (then
    /// the session starts now).
    pub fn tls_ready<B: Backend, O: Observer>(
        &mut self,
        cx: &mut ConnCtx<'_, B, O>,
        id: ConnId,
        now: Instant,
    ) -> State {
        self.tls = cx.be.tls_state(id);
        match &mut self.session {
            Some(s) => s.handle_tls_established(now),
            None => {
                if let Some(t0) = self.tls_started {
                    // Implicit TLS: the handshake is the `starttls` phase.
                    self.driver_phase(cx.obs, Phase::StartTls, t0, now);
                }
                self.start_session(cx, id, now);
            }
        }
        self.after(cx, id, now)
    }

    /// Plaintext from the server.
    pub fn input<B: Backend, O: Observer>(
        &mut self,
        cx: &mut ConnCtx<'_, B, O>,
        id: ConnId,
        now: Instant,
        plain: &[u8],
    ) -> State {
        if let Some(s) = &mut self.session {
            s.handle_input(now, plain);
        }
        self.after(cx, id, now)
    }

    /// The server closed its side.
    pub fn peer_closed<B: Backend, O: Observer>(
        &mut self,
        cx: &mut ConnCtx<'_, B, O>,
        id: ConnId,
        now: Instant,
    ) -> State {
        match &mut self.session {
            Some(s) => s.handle_close(now),
            None => {
                cx.obs
                    .error("connection closed during the TLS handshake".into());
                self.fail(cx.obs, Outcome::ConnectionError);
                cx.be.close(id, Close::Abort);
                return State::Done;
            }
        }
        self.after(cx, id, now)
    }

    /// Output left: tell the session (stamped with the time it left:
    /// writing a large body takes a while within one turn of the loop),
    /// and queue the next piece.
    pub fn written<B: Backend, O: Observer>(
        &mut self,
        cx: &mut ConnCtx<'_, B, O>,
        id: ConnId,
    ) -> State {
        let Some(s) = &mut self.session else {
            return State::Busy;
        };
        let now = Instant::now();
        s.handle_written(now, cx.be.app_bytes_sent(id) - self.out_base);
        self.after(cx, id, now)
    }

    /// The deadline passed.
    pub fn timer<B: Backend, O: Observer>(
        &mut self,
        cx: &mut ConnCtx<'_, B, O>,
        id: ConnId,
        now: Instant,
    ) -> State {
        self.timer_at = None;
        match &mut self.session {
            Some(s) => s.handle_timeout(now),
            None => {
                let what = if self.tls_started.is_some() {
                    "TLS handshake"
                } else {
                    "connect"
                };
                cx.obs.error(format!("timeout waiting for the {what}"));
                self.fail(cx.obs, Outcome::Timeout);
                cx.be.close(id, Close::Abort);
                return State::Done;
            }
        }
        self.after(cx, id, now)
    }

    /// Gives an idle open session its next message.
    pub fn push<B: Backend, O: Observer>(
        &mut self,
        cx: &mut ConnCtx<'_, B, O>,
        id: ConnId,
        now: Instant,
        msg: Message,
        intended: Instant,
    ) -> State {
        if msg.stamp.is_some() {
            self.tags.push((self.given, msg.tag));
        }
        self.given += 1;
        if let Some(s) = &mut self.session {
            s.push_message(now, msg, Some(intended));
            if self.given >= cx.cfg.messages_per_session {
                s.handle_no_more_messages(now);
            }
        }
        self.after(cx, id, now)
    }

    /// No more messages for an open session: it quits once idle.
    pub fn no_more<B: Backend, O: Observer>(
        &mut self,
        cx: &mut ConnCtx<'_, B, O>,
        id: ConnId,
        now: Instant,
    ) -> State {
        if let Some(s) = &mut self.session {
            s.handle_no_more_messages(now);
        }
        self.after(cx, id, now)
    }

    /// The connection is gone: a session that did not finish ends now (its
    /// messages fail), and a session counts once.
    pub fn closed<O: Observer>(mut self, obs: &mut O, now: Instant, why: Closed) {
        let stopped = matches!(why, Closed::Stopped);
        let io_error = match why {
            Closed::Error(e) => Some(format!("I/O: {e}")),
            Closed::FlushTimeout => Some("I/O: output could not be flushed".to_string()),
            Closed::Local | Closed::Stopped => None,
        };
        match &mut self.session {
            None => {
                if !self.failed && !stopped {
                    if let Some(e) = io_error {
                        obs.error(e);
                    }
                    self.fail(obs, Outcome::ConnectionError);
                }
            }
            Some(s) => {
                if !s.is_done() && !stopped {
                    if let Some(e) = io_error {
                        obs.error(e);
                    }
                    s.handle_close(now);
                    while let Some(ev) = s.poll_event() {
                        let _ = tell(obs, self.open, &mut self.outcomes, &mut self.tags, ev);
                    }
                }
                if s.is_done() {
                    obs.session_end(self.tls);
                    self.driver_phase(obs, Phase::Session, self.started, now);
                }
            }
        }
    }

    /// The connection ends before its session existed: told once, as a
    /// connection without a session (its messages are not attempted).
    fn fail<O: Observer>(&mut self, obs: &mut O, outcome: Outcome) {
        if !self.failed && self.session.is_none() {
            self.failed = true;
            obs.no_session(outcome);
        }
    }

    /// After any input to the session: events, STARTTLS, output, deadline.
    fn after<B: Backend, O: Observer>(
        &mut self,
        cx: &mut ConnCtx<'_, B, O>,
        id: ConnId,
        now: Instant,
    ) -> State {
        if self.closing {
            return State::Done;
        }
        let Some(s) = &mut self.session else {
            return State::Busy;
        };
        let mut done = false;
        while let Some(ev) = s.poll_event() {
            match tell(cx.obs, self.open, &mut self.outcomes, &mut self.tags, ev) {
                Ask::Nothing => {}
                Ask::Done => done = true,
                Ask::StartTls => {
                    // What the session queued before the 220 goes out in
                    // the clear, then the switch.
                    cx.out.clear();
                    s.poll_transmit(now, cx.out);
                    cx.be.write(id, cx.out);
                    let started = match &cx.cfg.tls {
                        Some((c, name)) => cx
                            .be
                            .start_tls(id, TlsSide::Client(Arc::clone(c), name.clone())),
                        None => Err(std::io::Error::other("no TLS configuration")),
                    };
                    if let Err(e) = started {
                        cx.obs.error(format!("STARTTLS: {e}"));
                        s.handle_close(now);
                    }
                }
            }
        }
        if done {
            debug_assert_eq!(
                self.outcomes, self.given,
                "every message given has one outcome"
            );
            self.closing = true;
            // The session is over (QUIT answered, or it failed): drop the
            // connection now (RST with --abort-close).
            cx.be.close(id, Close::Abort);
            return State::Done;
        }
        // Output: one piece at a time, refilled when it has left.
        if cx.be.pending_output(id) == 0 && s.wants_transmit() {
            cx.out.clear();
            s.poll_transmit_max(now, cx.out, OUT_CHUNK_BYTES);
            cx.be.write(id, cx.out);
        }
        if let Some(at) = s.poll_timeout() {
            if self.timer_at.is_none_or(|t| t > at) {
                cx.be.set_deadline(id, Some(at));
                self.timer_at = Some(at);
            }
        }
        if s.is_idle() {
            State::Idle
        } else {
            State::Busy
        }
    }
}
