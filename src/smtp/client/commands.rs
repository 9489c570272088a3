//! What to send next, one function per command: the hello, XCLIENT,
//! STARTTLS and AUTH after it, then per message its group (`[RSET] MAIL
//! RCPT… DATA`, or BDAT chunks), then QUIT.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Instant;

use super::super::Outcome;
use super::expect::Await;
use super::{AuthMech, ClientError, ClientSession, PipeliningMode, State};

impl ClientSession {

    pub(super) fn send_hello(&mut self, now: Instant) {
        self.state = State::Hello;
        let (verb, what): (&[u8], _) = if self.config.lmtp { (b"LHLO ", Await::Lhlo) } else { (b"EHLO ", Await::Ehlo) };
        let config = Arc::clone(&self.config);
        self.write_line(&[verb, config.helo_name.as_bytes()]);
        self.expect(what, 0, now);
    }

    pub(super) fn after_hello(&mut self, now: Instant) {
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
                    let b64 = super::super::auth::encode_plain(&auth.user, &auth.pass);
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

    pub(super) fn start_transactions(&mut self, now: Instant) {
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
    pub(super) fn next_txn(&mut self, now: Instant) {
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
            // RSET follows a failed transaction, and the next one waits for
            // its reply even with PIPELINING: a server that refuses it has
            // kept a transaction open that the next RCPT and data would
            // join (BDAT commits it with no 354 to stop at). One round trip,
            // only after a failure.
            self.rset_pending = false;
            self.tx.extend_from_slice(b"RSET\r\n");
            self.expect(Await::Rset, 0, now);
            return;
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
    pub(super) fn send_next_rcpt_or_data(&mut self, m: usize, now: Instant) {
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

    pub(super) fn write_rcpt(&mut self, m: usize, i: usize, now: Instant) {
        self.tx.extend_from_slice(b"RCPT TO:<");
        self.tx.extend_from_slice(self.messages[m].rcpt_to[i].as_bytes());
        self.tx.extend_from_slice(b">\r\n");
        self.expect(Await::Rcpt, m, now);
    }

    /// Write the next BDAT chunk of message `m`; true if it was the LAST.
    pub(super) fn write_bdat_chunk(&mut self, m: usize, now: Instant) -> bool {
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

    pub(super) fn quit(&mut self, now: Instant) {
        self.state = State::Closing;
        if self.config.send_quit {
            self.tx.extend_from_slice(b"QUIT\r\n");
            self.expect(Await::Quit, 0, now);
        } else if self.expects.is_empty() {
            self.finish_session();
        }
    }
}
