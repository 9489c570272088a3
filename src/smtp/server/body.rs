//! The message: DATA and BDAT, their bodies as they stream in (scanned or
//! counted in place, handed to [`ServerHooks::on_body`], never buffered),
//! and the message's end: the `Dot` verdict, the reply (one per recipient
//! in LMTP), the one [`ServerEvent::Message`].

use std::time::Instant;

use super::super::wire;
use super::super::{BareLfPolicy, CommandKind};
use super::verdict::{enh_of, fault_text};
use super::txn::Body;
use super::{
    Canned, CloseReason, Flow, Held, MessageOutcome, Phase, ServerEvent, ServerHooks,
    ServerSession, Step, Verdict,
};

/// The BDAT chunk being read: its size is declared up front, its bytes are
/// counted, not scanned.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Chunk {
    /// Bytes of the chunk still to come.
    remaining: u64,
    /// `BDAT n LAST`: the chunk ends the message.
    last: bool,
    /// The chunk is read and dropped, then answered with this.
    error: Option<Canned>,
    /// The error ends the message (it came inside a transaction).
    error_ends_message: bool,
}

impl ServerSession {
    pub(super) fn data<H: ServerHooks>(
        &mut self,
        now: Instant,
        arg: &[u8],
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> Flow {
        let kind = CommandKind::Data;
        if let Some((code, enh, text)) = self.txn.refuse_body() {
            self.reply(out, kind, code, enh, text);
            return Flow::Done;
        }
        if matches!(self.txn.body, Body::Bdat { .. }) {
            self.reply(out, kind, 503, "5.5.1", "DATA not allowed after BDAT");
            return Flow::Done;
        }
        let v = self.verdict(hooks, kind, arg, None, None);
        if let Verdict::Reply(code @ 400..) = v {
            if code != 421 {
                self.reply(out, kind, code, enh_of(code), fault_text(code));
                self.events.push_back(ServerEvent::Message {
                    outcome: MessageOutcome::of(code),
                    code,
                    bytes: 0,
                    recipients: self.txn.recipients(),
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
                recipients: self.txn.recipients(),
            });
        }
        match self.apply(v, kind, now, out, hooks) {
            Flow::Go => {}
            f => return f,
        }
        self.reply(out, kind, 354, "", "End data with <CR><LF>.<CR><LF>");
        hooks.on_message_start();
        self.txn.body = Body::Data;
        self.scanner.reset(self.config.bare_lf);
        self.phase = Phase::Data;
        Flow::Done
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn bdat<H: ServerHooks>(
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
        } else if let Some(refused) = self.txn.refuse_body() {
            error = Some(refused);
        } else if self.config.max_message_size > 0
            && self.txn.bdat_bytes().saturating_add(size) > self.config.max_message_size
        {
            // Judged on the declared size, so the outcome never depends on
            // how the chunk arrives; the chunk is still read and dropped.
            error = Some((552, "5.3.4", "Message size exceeds fixed maximum"));
            ends_message = true;
            self.begin_bdat_message(hooks);
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
            self.begin_bdat_message(hooks);
        }
        self.chunk = Chunk { remaining: size, last, error, error_ends_message: ends_message };
        self.phase = Phase::Bdat;
        Flow::Done
    }

    /// The transaction's first BDAT chunk begins its message.
    fn begin_bdat_message<H: ServerHooks>(&mut self, hooks: &mut H) {
        if !matches!(self.txn.body, Body::Bdat { .. }) {
            self.txn.body = Body::Bdat { bytes: 0 };
            hooks.on_message_start();
        }
    }

    /// DATA body bytes from `rest`, up to and including the end of data.
    pub(super) fn data_input<H: ServerHooks>(
        &mut self,
        now: Instant,
        rest: &[u8],
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> Step {
        let r = self.scanner.scan(rest, |s| hooks.on_body(s));
        if !r.ended {
            return Step::Stop(r.consumed);
        }
        self.phase = Phase::Command;
        self.end_of_data(now, out, hooks);
        Step::Go(r.consumed)
    }

    /// The current BDAT chunk's bytes from `rest`, up to its declared size.
    pub(super) fn bdat_input<H: ServerHooks>(
        &mut self,
        now: Instant,
        rest: &[u8],
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> Step {
        let take = self.chunk.remaining.min(rest.len() as u64) as usize;
        if take > 0 {
            if self.chunk.error.is_none() {
                hooks.on_body(&rest[..take]);
                if let Body::Bdat { bytes } = &mut self.txn.body {
                    *bytes += take as u64;
                }
            }
            self.chunk.remaining -= take as u64;
        }
        if self.chunk.remaining > 0 {
            return Step::Stop(take);
        }
        self.phase = Phase::Command;
        self.end_of_chunk(now, out, hooks);
        Step::Go(take)
    }

    fn end_of_chunk<H: ServerHooks>(&mut self, now: Instant, out: &mut Vec<u8>, hooks: &mut H) {
        let kind = CommandKind::Bdat;
        if let Some((code, enh, text)) = self.chunk.error.take() {
            if self.chunk.error_ends_message {
                let bytes = self.txn.bdat_bytes();
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
        if self.chunk.last {
            let bytes = self.txn.bdat_bytes();
            let _ = self.end_message(now, out, hooks, kind, bytes, None);
        } else {
            let mut nb = [0u8; 20];
            let n = wire::fmt_u64(self.txn.bdat_bytes(), &mut nb);
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
    pub(super) fn end_message<H: ServerHooks>(
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
        if self.txn.close_message() {
            hooks.on_message_end(false);
        }
        let recipients = self.txn.recipients();
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
        if self.txn.close_message() {
            hooks.on_message_end(code < 300);
        }
        let recipients = self.txn.recipients();
        if self.config.lmtp {
            let enh = self.enh(enh);
            for path in self.txn.recipient_paths() {
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
}
