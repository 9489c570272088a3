//! The mail transaction: MAIL opens it, RCPT adds recipients, and it ends
//! with its message (`body`), RSET, a new hello, STARTTLS or XCLIENT.
//! Its buffers are cleared, not freed, between transactions: once grown,
//! nothing allocates per command.

use std::time::Instant;

use super::super::wire;
use super::super::CommandKind;
use super::{Flow, ServerHooks, ServerSession};

impl ServerSession {
    /// End the transaction (a message still open ends refused).
    pub(super) fn reset_txn<H: ServerHooks>(&mut self, hooks: &mut H) {
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

    /// The sequence checks shared by DATA and BDAT: `Some(Done)` if refused.
    pub(super) fn need_recipients(&mut self, kind: CommandKind, out: &mut Vec<u8>) -> Option<Flow> {
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
    pub(super) fn mail<H: ServerHooks>(
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

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rcpt<H: ServerHooks>(
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
}
