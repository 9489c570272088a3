//! The mail transaction: MAIL opens it, RCPT adds recipients, and it ends
//! with its message (`body`), RSET, a new hello, STARTTLS or XCLIENT.
//! Its buffers are cleared, not freed, between transactions: once grown,
//! nothing allocates per command.

use std::time::Instant;

use super::super::wire;
use super::super::CommandKind;
use super::{Canned, Flow, ServerHooks, ServerSession};

/// The state of one mail transaction. Between transactions it is cleared
/// (`active` false, no recipient, no body), its buffers kept.
#[derive(Debug, Default)]
pub(super) struct Txn {
    /// MAIL was accepted and the transaction has not ended.
    pub(super) active: bool,
    /// MAIL carried SMTPUTF8: non-ASCII recipient paths are allowed.
    utf8: bool,
    /// The reverse path (empty for the null sender).
    pub(super) mail_from: Vec<u8>,
    /// The accepted recipients' paths end to end; `rcpt_ends[i]` ends the
    /// i-th.
    rcpt_buf: Vec<u8>,
    rcpt_ends: Vec<usize>,
    /// RCPT commands tried, accepted or not (503 or 554 for DATA without
    /// recipients).
    rcpt_attempts: u32,
    /// The message under way.
    pub(super) body: Body,
}

/// How far the transaction's message has come.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Body {
    /// No message begun: DATA or BDAT may begin one.
    #[default]
    None,
    /// DATA was answered 354: `on_message_start` was called.
    Data,
    /// A BDAT chunk was taken: `on_message_start` was called; `bytes` is
    /// the body so far.
    Bdat { bytes: u64 },
}

impl Txn {
    pub(super) fn recipients(&self) -> u32 {
        self.rcpt_ends.len() as u32
    }

    /// The accepted recipients' paths, in order.
    pub(super) fn recipient_paths(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut start = 0;
        self.rcpt_ends.iter().map(move |&end| {
            let path = &self.rcpt_buf[start..end];
            start = end;
            path
        })
    }

    /// DATA or BDAT refused for want of MAIL or recipients: the canned
    /// reply, or `None` if the transaction may have a body.
    pub(super) fn refuse_body(&self) -> Option<Canned> {
        if !self.active {
            Some((503, "5.5.1", "Need MAIL command"))
        } else if self.rcpt_ends.is_empty() {
            Some(if self.rcpt_attempts == 0 {
                (503, "5.5.1", "Need RCPT command")
            } else {
                (554, "5.5.1", "No valid recipients")
            })
        } else {
            None
        }
    }

    /// The body bytes BDAT took so far (0 without BDAT).
    pub(super) fn bdat_bytes(&self) -> u64 {
        match self.body {
            Body::Bdat { bytes } => bytes,
            _ => 0,
        }
    }

    /// Ends the message if one is open; true if it was (its
    /// `on_message_end` is then owed).
    pub(super) fn close_message(&mut self) -> bool {
        std::mem::take(&mut self.body) != Body::None
    }

    fn clear(&mut self) {
        self.active = false;
        self.utf8 = false;
        self.mail_from.clear();
        self.rcpt_buf.clear();
        self.rcpt_ends.clear();
        self.rcpt_attempts = 0;
        self.body = Body::None;
    }
}

impl ServerSession {
    /// End the transaction (a message still open ends refused).
    pub(super) fn reset_txn<H: ServerHooks>(&mut self, hooks: &mut H) {
        if self.txn.close_message() {
            hooks.on_message_end(false);
        }
        self.txn.clear();
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
        if self.txn.active {
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
        self.txn.active = true;
        self.txn.utf8 = utf8;
        self.txn.mail_from.extend_from_slice(path);
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
        if !self.txn.active {
            self.reply(out, kind, 503, "5.5.1", "Need MAIL command");
            return Flow::Done;
        }
        self.txn.rcpt_attempts = self.txn.rcpt_attempts.saturating_add(1);
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
        if !path.is_ascii() && !self.txn.utf8 {
            self.reply(out, kind, 553, "5.6.7", "Non-ASCII address requires SMTPUTF8");
            return Flow::Done;
        }
        if max_recipients > 0 && self.txn.rcpt_ends.len() >= max_recipients {
            self.reply(out, kind, 452, "4.5.3", "Too many recipients");
            return Flow::Done;
        }
        let v = self.verdict(hooks, kind, arg, None, Some(path));
        match self.apply(v, kind, now, out, hooks) {
            Flow::Go => {}
            f => return f,
        }
        self.txn.rcpt_buf.extend_from_slice(path);
        self.txn.rcpt_ends.push(self.txn.rcpt_buf.len());
        self.reply(out, kind, 250, "2.1.5", "Recipient OK");
        Flow::Done
    }
}
