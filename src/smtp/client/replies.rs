//! One function per kind of reply: [`ClientSession::on_reply`] takes the
//! front of the FIFO of expected replies and hands the reply to what it
//! answers.

use std::sync::Arc;
use std::time::Instant;

use super::super::reply::{Capabilities, Reply};
use super::super::{Outcome, Phase};
use super::stuff::{dot_stuff, Stuffer, STUFF_IN_PLACE_BYTES};
use super::expect::{Await, Expect};
use super::txn::outcome_of;
use super::{ClientError, ClientEvent, ClientSession, State};

impl ClientSession {
    /// One whole reply: attributed to the front of the FIFO, then handled
    /// by what it answers.
    pub(super) fn on_reply(&mut self, now: Instant, reply: Reply) {
        let code = reply.code;
        let Some(exp) = self.expects.front().copied() else {
            self.fail(Outcome::ProtocolError, 0, ClientError::Unsolicited(code));
            return;
        };
        let command = exp.what.command();
        self.last_reply_to = command;
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
            Await::Xclient => self.on_xclient(now, exp, code, class),
            Await::StartTls => self.on_starttls(now, exp, code, class),
            Await::AuthLoginUser | Await::AuthLoginPass | Await::AuthFinal => {
                self.on_auth(now, exp, code, class)
            }
            Await::Mail => self.on_mail(now, exp, code, class),
            Await::Rcpt => self.on_rcpt(now, exp, code, class),
            Await::Data => self.on_data(now, exp, code, class),
            Await::Dot { discard } => self.on_final(now, exp, code, class, discard),
            Await::Bdat { last: false } => self.on_bdat_chunk(now, exp, code, class),
            Await::Bdat { last: true } => self.on_final(now, exp, code, class, false),
            Await::Rset => self.on_rset(now, exp, code, class),
            Await::Quit => self.push_phase(Phase::Quit, exp.sent_time(), now, None),
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

    fn on_xclient(&mut self, now: Instant, exp: Expect, code: u16, class: u16) {
        match class {
            // The 220 is a new greeting: hello again, capabilities anew.
            2 => self.send_hello(now),
            4 | 5 => self.give_up(now, code, ClientError::Refused { command: "XCLIENT", code }),
            _ => self.unexpected(exp, code),
        }
    }

    fn on_starttls(&mut self, now: Instant, exp: Expect, code: u16, class: u16) {
        match class {
            2 => {
                self.starttls_sent = exp.sent_time();
                self.tls_wait_since = now;
                self.state = State::TlsHandshake;
                self.parser.reset();
                self.events.push_back(ClientEvent::StartTls);
            }
            4 | 5 => self.give_up(now, code, ClientError::Refused { command: "STARTTLS", code }),
            _ => self.unexpected(exp, code),
        }
    }

    /// A reply to an AUTH line: 334 asks for the next LOGIN step, the final
    /// reply ends the `auth` phase.
    fn on_auth(&mut self, now: Instant, exp: Expect, code: u16, class: u16) {
        // The first AUTH line written starts the `auth` phase.
        let auth_started = *self.auth_started.get_or_insert(exp.sent_time());
        match (exp.what, class) {
            (Await::AuthLoginUser | Await::AuthLoginPass, 3) => {
                let auth = self.config.auth.clone();
                let Some(auth) = auth else { return self.unexpected(exp, code) };
                let (secret, next) = if exp.what == Await::AuthLoginUser {
                    (auth.user.as_str(), Await::AuthLoginPass)
                } else {
                    (auth.pass.as_str(), Await::AuthFinal)
                };
                let b64 = super::super::auth::encode_login_step(secret);
                self.tx.extend_from_slice(b64.as_bytes());
                self.tx.extend_from_slice(b"\r\n");
                self.expect(next, 0, now);
            }
            (Await::AuthFinal, 2) => {
                self.push_phase(Phase::Auth, auth_started, now, None);
                self.authed = true;
                self.start_transactions(now);
            }
            (_, 4 | 5) => {
                self.push_phase(Phase::Auth, auth_started, now, None);
                self.give_up(now, code, ClientError::Refused { command: "AUTH", code });
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
                        _ if msg.body.len() >= STUFF_IN_PLACE_BYTES => {
                            // A large body is stuffed as it is queued: its
                            // pieces between the lines that start with `.`
                            // are queued from the shared body itself (each
                            // such dot queued twice), so it is never copied.
                            let mut st = Stuffer::default();
                            let mut head = Vec::with_capacity(msg.header.len() + 8);
                            st.feed(&mut head, &msg.header);
                            self.tx.extend_from_slice(&head);
                            let body = Arc::clone(&msg.body);
                            st.feed_shared(&mut self.tx, &body);
                            head.clear();
                            st.finish(&mut head);
                            self.tx.extend_from_slice(&head);
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
                } else if t.mail_ok && t.rcpt_ok == 0 {
                    // 354 although no recipient was accepted: end the empty
                    // DATA at once and ignore its reply.
                    self.tx.extend_from_slice(b".\r\n");
                    self.push_expect(Await::Dot { discard: true }, m, now, 1);
                } else {
                    // 354 for a transaction whose MAIL was refused: the
                    // server has another one open (e.g. one a refused RSET
                    // left behind), with recipients of its own, and ending
                    // the DATA would commit a message nobody here counts.
                    // Close without it: the server drops an unfinished DATA.
                    return self.unexpected(exp, code);
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

    fn on_rset(&mut self, now: Instant, exp: Expect, code: u16, class: u16) {
        match class {
            4 | 5 if self.state == State::Transactions => {
                // The server did not reset: what it has open is unknown, so
                // no further transaction is started on this session.
                self.give_up(now, code, ClientError::Refused { command: "RSET", code });
            }
            2 | 4 | 5 => {
                // The next transaction waited for this reply (see `next_txn`).
                if self.state == State::Transactions {
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
}
