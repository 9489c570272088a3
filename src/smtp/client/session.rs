//! The session's cycle: its constructors, inputs (`handle_*`) and outputs
//! (`poll_*`, the getters); how it ends (every message gets its one
//! outcome, then `Done`); and the helpers every part uses (expecting a
//! reply, reporting a phase, the deadline).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::super::reply::{Capabilities, ReplyParser};
use super::super::{CommandKind, Outcome, Phase};
use super::expect::{Await, Expect};
use super::outq::OutQueue;
use super::txn::{outcome_of, Txn};
use super::{ClientConfig, ClientError, ClientEvent, ClientSession, Message, State};

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
            last_reply_to: CommandKind::Connect,
            tx: OutQueue::with_spare(1024),
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

    // ---- endings ----------------------------------------------------------


    pub(super) fn finish(&mut self, m: usize, outcome: Outcome, code: u16) {
        let t = &mut self.txns[m];
        if t.finished {
            return;
        }
        t.finished = true;
        self.unfinished -= 1;
        if matches!(outcome, Outcome::TempFailed | Outcome::Rejected) && code >= 400 {
            let line = self.parser.lines().next().unwrap_or_default();
            let reason = format!(
                "{}: {code} {}",
                self.last_reply_to.as_str(),
                String::from_utf8_lossy(line)
            );
            self.events.push_back(ClientEvent::Refused(reason));
        }
        let t = &self.txns[m];
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
    pub(super) fn give_up(&mut self, now: Instant, code: u16, err: ClientError) {
        self.give_up_with(now, outcome_of(code / 100), code, err);
    }

    pub(super) fn give_up_with(&mut self, now: Instant, outcome: Outcome, code: u16, err: ClientError) {
        self.finish_all(outcome, code);
        self.events.push_back(ClientEvent::Error(err.to_string()));
        self.quit(now);
    }

    /// An abnormal end without QUIT: every message still open gets `outcome`.
    pub(super) fn fail(&mut self, outcome: Outcome, code: u16, err: ClientError) {
        if self.state == State::Done {
            return;
        }
        self.finish_all(outcome, code);
        self.events.push_back(ClientEvent::Error(err.to_string()));
        self.finish_session();
    }

    pub(super) fn unexpected(&mut self, exp: Expect, code: u16) {
        let command = exp.what.command().as_str();
        self.fail(Outcome::ProtocolError, 0, ClientError::UnexpectedReply { command, code });
    }

    pub(super) fn finish_session(&mut self) {
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


    pub(super) fn expect(&mut self, what: Await, msg: usize, now: Instant) {
        self.push_expect(what, msg, now, 1);
    }

    /// Expects the reply to the command just queued (it ends at the current
    /// end of the output).
    pub(super) fn push_expect(&mut self, what: Await, msg: usize, now: Instant, remaining: u32) {
        let end = self.tx.queued;
        let written_at = (end <= self.written).then_some(now);
        self.expects.push_back(Expect { what, msg, queued_at: now, end, written_at, remaining });
    }

    /// Reports message `m`'s `body` phase once, ending at `end`.
    pub(super) fn report_body(&mut self, m: usize, end: Instant) {
        let t = &mut self.txns[m];
        if t.body_reported {
            return;
        }
        let Some(start) = t.body_started else { return };
        t.body_reported = true;
        self.push_phase(Phase::Body, start, end, Some(m));
    }

    pub(super) fn write_line(&mut self, parts: &[&[u8]]) {
        for p in parts {
            self.tx.extend_from_slice(p);
        }
        self.tx.extend_from_slice(b"\r\n");
    }

    /// Reports a phase from `since` to `now`; `msg`: the message it belongs
    /// to (corrected from its intended time), else the session's. QUIT is
    /// corrected from its own start: it is not on the schedule (it leaves
    /// when the session's last message ends, whose wait that message's
    /// phases already carry), so from the session's intended start it would
    /// read as the whole session.
    pub(super) fn push_phase(&mut self, phase: Phase, since: Instant, now: Instant, msg: Option<usize>) {
        let latency = now.saturating_duration_since(since);
        let intended = match msg {
            Some(m) => self.txns.get(m).and_then(|t| t.intended),
            None if phase == Phase::Quit => self.intended_start.map(|_| since),
            None => self.intended_start,
        };
        let corrected = intended.map(|i| now.saturating_duration_since(i));
        self.events.push_back(ClientEvent::Phase { phase, latency, corrected });
    }

    pub(super) fn joined_lines(&self, sep: &str) -> String {
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
