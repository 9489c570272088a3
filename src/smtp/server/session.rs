//! The session's cycle: its inputs (`handle_*`, `start`) and outputs
//! (`poll_*` and the getters), the input loop that cuts the input into
//! command lines and bodies, and what every command shares: the fault
//! verdict and how it applies, the reply writers, the greeting, closing.
//!
//! The loop hands each step the input it has not used yet; a step says how
//! much it used and whether the next step may go on ([`Step`]). Nothing
//! here buffers beyond `inbuf`, which holds input only while no step can use
//! it (a partial line, a partial PROXY header, a fault delay).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::super::data::DataScanner;
use super::super::wire;
use super::super::{CommandKind, MAX_COMMAND_LINE};
use super::auth::AuthBuffers;
use super::body::Chunk;
use super::verdict::{enh_of, fault_text};
use super::txn::Txn;
use super::{
    CloseReason, CommandInfo, Flow, Held, Phase, ServerConfig, ServerEvent, ServerHooks,
    ServerSession, Step, Verdict, MAX_ERRORS, MAX_PENDING_INPUT,
};

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
            // Buffers grow on first use: an idle connection (greeted, no
            // transaction yet) holds none of them.
            txn: Txn::default(),
            chunk: Chunk::default(),
            scanner: DataScanner::new(policy),
            inbuf: Vec::new(),
            discarding: false,
            deadline: now,
            delay_until: None,
            held: None,
            skip_verdict: false,
            errors: 0,
            auth: AuthBuffers::default(),
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

    // ---- the input loop ------------------------------------------------

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
            let rest = &data[pos..];
            let step = match self.phase {
                Phase::Closed | Phase::TlsHandshake => return data.len(),
                Phase::Init | Phase::Greeting => return pos,
                Phase::Proxy => self.proxy_input(now, rest, out, hooks),
                Phase::Data => self.data_input(now, rest, out, hooks),
                Phase::Bdat => self.bdat_input(now, rest, out, hooks),
                Phase::Command | Phase::AuthPlain | Phase::AuthLoginUser | Phase::AuthLoginPass => {
                    self.line_input(now, rest, out, hooks)
                }
            };
            match step {
                Step::Go(n) => pos += n,
                Step::Stop(n) => return pos + n,
            }
        }
    }

    /// One command line (or AUTH continuation line) from `rest`, if it holds
    /// a whole one; an overlong line is discarded up to its LF.
    fn line_input<H: ServerHooks>(
        &mut self,
        now: Instant,
        rest: &[u8],
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> Step {
        let Some(lf) = memchr::memchr(b'\n', rest) else {
            if self.discarding {
                return Step::Stop(rest.len());
            }
            if rest.len() >= MAX_COMMAND_LINE {
                self.discarding = true;
                return Step::Stop(rest.len());
            }
            return Step::Stop(0);
        };
        let line_len = lf + 1;
        if self.discarding || line_len > MAX_COMMAND_LINE {
            self.discarding = false;
            if self.phase != Phase::Command {
                self.phase = Phase::Command;
            }
            self.reply(out, CommandKind::Unknown, 500, "5.5.2", "Line too long");
        } else {
            let line = match &rest[..lf] {
                [l @ .., b'\r'] => l,
                l => l,
            };
            if self.command_line(now, line, out, hooks) == Flow::Hold {
                return Step::Stop(0);
            }
        }
        if self.errors >= MAX_ERRORS && self.phase != Phase::Closed {
            self.reply_host(out, CommandKind::Unknown, 421, "4.7.0", b" Error: too many errors");
            self.close(CloseReason::TooManyErrors, hooks);
        }
        Step::Go(line_len)
    }

    // ---- what every command shares ---------------------------------------

    pub(super) fn enh(&self, e: &'static str) -> Option<&'static str> {
        (self.config.ext.enhancedstatuscodes && !e.is_empty()).then_some(e)
    }

    pub(super) fn note_reply(&mut self, kind: CommandKind, code: u16) {
        self.events.push_back(ServerEvent::Reply { command: kind, code });
        if (500..=504).contains(&code) {
            self.errors += 1;
        }
    }

    pub(super) fn reply(
        &mut self,
        out: &mut Vec<u8>,
        kind: CommandKind,
        code: u16,
        enh: &'static str,
        text: &str,
    ) {
        wire::write_reply(out, code, self.enh(enh), text.as_bytes());
        self.note_reply(kind, code);
    }

    /// A reply whose text is the host name followed by `suffix`. Reads the
    /// shared config in place: nothing shared is written per reply (no
    /// `Arc` clone, whose reference count every thread would bounce).
    pub(super) fn reply_host(
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

    pub(super) fn reply_closing(&mut self, out: &mut Vec<u8>, kind: CommandKind) {
        self.reply_host(out, kind, 421, "4.3.2", b" Service not available, closing transmission channel");
    }

    /// The 220 that opens the session (and answers XCLIENT).
    pub(super) fn banner(&self) -> &'static [u8] {
        if self.config.lmtp {
            b" LMTP smtpstorm"
        } else {
            b" ESMTP smtpstorm"
        }
    }

    pub(super) fn close<H: ServerHooks>(&mut self, reason: CloseReason, hooks: &mut H) {
        if self.txn.close_message() {
            hooks.on_message_end(false);
        }
        self.phase = Phase::Closed;
        self.inbuf.clear();
        self.delay_until = None;
        self.held = None;
        self.events.push_back(ServerEvent::Close(reason));
    }

    pub(super) fn verdict<H: ServerHooks>(
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
            None if self.txn.active => Some(&self.txn.mail_from[..]),
            None => None,
        };
        hooks.on_command(kind, &CommandInfo { arg, mail_from, rcpt_to, peer: self.peer })
    }

    /// Apply a verdict for an ordinary command: `Go` = act normally.
    pub(super) fn apply<H: ServerHooks>(
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

    pub(super) fn greet<H: ServerHooks>(&mut self, now: Instant, out: &mut Vec<u8>, hooks: &mut H) {
        let v = self.verdict(hooks, CommandKind::Connect, b"", None, None);
        match v {
            Verdict::Proceed | Verdict::Reply(0..=399) => {
                self.reply_host(out, CommandKind::Connect, 220, "", self.banner());
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
}
