//! One function per command: [`ServerSession::command_line`] parses a line
//! and hands it to its verb. The verbs of the mail transaction live in
//! `txn` (MAIL, RCPT) and `body` (DATA, BDAT), AUTH in `auth`, XCLIENT in
//! `peer`; the session-level ones are here, with the EHLO reply.
//!
//! Every verb checks its sequence and arguments first (those replies need
//! no verdict), then asks the fault hook (`gate!`), then acts and answers.

use std::time::Instant;

use super::super::wire::{self, Command, WireError};
use super::super::CommandKind;
use super::peer::XCLIENT_ADVERTISED;
use super::{CloseReason, Flow, Phase, ServerEvent, ServerHooks, ServerSession};

impl ServerSession {
    /// One complete line (without its line terminator).
    pub(super) fn command_line<H: ServerHooks>(
        &mut self,
        now: Instant,
        line: &[u8],
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> Flow {
        if matches!(self.phase, Phase::AuthPlain | Phase::AuthLoginUser | Phase::AuthLoginPass) {
            self.auth_line(line, out, hooks);
            return Flow::Done;
        }
        let arg = match memchr::memchr(b' ', line) {
            Some(sp) => &line[sp + 1..],
            None => &line[line.len()..],
        };
        let cmd = match wire::parse_command(line) {
            Ok(c) => c,
            Err(e) => {
                self.wire_error(e, out);
                return Flow::Done;
            }
        };
        let kind = cmd.kind();
        if self.refused && kind != CommandKind::Quit {
            self.reply(out, kind, 503, "5.5.1", "Service refused, send QUIT");
            return Flow::Done;
        }
        match cmd {
            Command::Helo(_) | Command::Ehlo(_) | Command::Lhlo(_) => {
                self.hello(now, kind, arg, out, hooks)
            }
            Command::Mail { path, params } => self.mail(now, arg, path, params, out, hooks),
            Command::Rcpt { path, params } => self.rcpt(now, arg, path, params, out, hooks),
            Command::Data => self.data(now, arg, out, hooks),
            Command::Bdat { size, last } => self.bdat(now, arg, size, last, out, hooks),
            Command::Rset => self.rset(now, arg, out, hooks),
            Command::Noop => self.noop(now, arg, out, hooks),
            Command::Vrfy(_) => self.vrfy(now, arg, out, hooks),
            Command::Expn(_) => self.expn(now, arg, out, hooks),
            Command::Help => self.help(now, arg, out, hooks),
            Command::Quit => self.quit(now, arg, out, hooks),
            Command::StartTls => self.starttls(now, arg, out, hooks),
            Command::Auth { mechanism, initial } => {
                self.auth(now, arg, mechanism, initial, out, hooks)
            }
            Command::Xclient(attrs) => self.xclient(now, arg, attrs, out, hooks),
        }
    }

    fn wire_error(&mut self, e: WireError, out: &mut Vec<u8>) {
        let kind = e.kind();
        match e {
            WireError::Unknown => self.reply(out, kind, 500, "5.5.2", "Command unrecognized"),
            WireError::Syntax(_) => {
                self.reply(out, kind, 501, "5.5.4", "Syntax error in parameters or arguments")
            }
            WireError::PathTooLong(_) => self.reply(out, kind, 501, "5.1.3", "Path too long"),
            WireError::InvalidUtf8(_) => {
                self.reply(out, kind, 501, "5.6.7", "Invalid UTF-8 in address")
            }
        }
    }

    /// HELO, EHLO or LHLO (`kind` says which).
    fn hello<H: ServerHooks>(
        &mut self,
        now: Instant,
        kind: CommandKind,
        arg: &[u8],
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> Flow {
        let lmtp = self.config.lmtp;
        if lmtp != (kind == CommandKind::Lhlo) {
            let text = if lmtp { "Use LHLO in LMTP mode" } else { "Command unrecognized" };
            self.reply(out, kind, 500, "5.5.1", text);
            return Flow::Done;
        }
        gate!(self, hooks, kind, arg, now, out);
        self.reset_txn(hooks);
        self.greeted = true;
        if kind == CommandKind::Helo {
            self.reply_host(out, kind, 250, "", b"");
        } else {
            self.ehlo_reply(out, kind);
        }
        Flow::Done
    }

    fn ehlo_reply(&mut self, out: &mut Vec<u8>, kind: CommandKind) {
        // Borrowed in place (no Arc clone): only `note_reply` below needs
        // `&mut self`, after the last use of `cfg`.
        let cfg = &*self.config;
        let ext = cfg.ext;
        let mut reply = wire::MultiLine::new(250);
        let mut line = |out: &mut Vec<u8>, parts: &[&[u8]]| reply.line(out, parts);
        line(out, &[cfg.hostname.as_bytes()]);
        if ext.pipelining {
            line(out, &[b"PIPELINING"]);
        }
        if ext.size {
            if cfg.max_message_size > 0 {
                let mut nb = [0u8; 20];
                line(out, &[b"SIZE ", wire::fmt_u64(cfg.max_message_size, &mut nb)]);
            } else {
                line(out, &[b"SIZE"]);
            }
        }
        if ext.eightbitmime {
            line(out, &[b"8BITMIME"]);
        }
        if ext.smtputf8 {
            line(out, &[b"SMTPUTF8"]);
        }
        if ext.enhancedstatuscodes {
            line(out, &[b"ENHANCEDSTATUSCODES"]);
        }
        if ext.chunking {
            line(out, &[b"CHUNKING"]);
        }
        if ext.dsn {
            line(out, &[b"DSN"]);
        }
        if cfg.starttls_available && !self.tls {
            line(out, &[b"STARTTLS"]);
        }
        if cfg.auth_enabled && (!cfg.auth_requires_tls || self.tls) {
            line(out, &[b"AUTH PLAIN LOGIN"]);
        }
        if cfg.xclient {
            line(out, &[XCLIENT_ADVERTISED.as_bytes()]);
        }
        reply.finish(out);
        self.note_reply(kind, 250);
    }

    fn rset<H: ServerHooks>(&mut self, now: Instant, arg: &[u8], out: &mut Vec<u8>, hooks: &mut H) -> Flow {
        let kind = CommandKind::Rset;
        gate!(self, hooks, kind, arg, now, out);
        self.reset_txn(hooks);
        self.reply(out, kind, 250, "2.0.0", "OK");
        Flow::Done
    }

    fn noop<H: ServerHooks>(&mut self, now: Instant, arg: &[u8], out: &mut Vec<u8>, hooks: &mut H) -> Flow {
        let kind = CommandKind::Noop;
        gate!(self, hooks, kind, arg, now, out);
        self.reply(out, kind, 250, "2.0.0", "OK");
        Flow::Done
    }

    fn vrfy<H: ServerHooks>(&mut self, now: Instant, arg: &[u8], out: &mut Vec<u8>, hooks: &mut H) -> Flow {
        let kind = CommandKind::Vrfy;
        gate!(self, hooks, kind, arg, now, out);
        let text = "Cannot VRFY user, but will accept message and attempt delivery";
        self.reply(out, kind, 252, "2.5.0", text);
        Flow::Done
    }

    fn expn<H: ServerHooks>(&mut self, now: Instant, arg: &[u8], out: &mut Vec<u8>, hooks: &mut H) -> Flow {
        let kind = CommandKind::Expn;
        gate!(self, hooks, kind, arg, now, out);
        self.reply(out, kind, 502, "5.5.1", "EXPN not supported");
        Flow::Done
    }

    fn help<H: ServerHooks>(&mut self, now: Instant, arg: &[u8], out: &mut Vec<u8>, hooks: &mut H) -> Flow {
        let kind = CommandKind::Help;
        gate!(self, hooks, kind, arg, now, out);
        self.reply(out, kind, 214, "2.0.0", "See RFC 5321 (smtpstorm)");
        Flow::Done
    }

    fn quit<H: ServerHooks>(&mut self, now: Instant, arg: &[u8], out: &mut Vec<u8>, hooks: &mut H) -> Flow {
        let kind = CommandKind::Quit;
        gate!(self, hooks, kind, arg, now, out);
        self.reply_host(out, kind, 221, "2.0.0", b" closing connection");
        self.close(CloseReason::Quit, hooks);
        Flow::Done
    }

    fn starttls<H: ServerHooks>(
        &mut self,
        now: Instant,
        arg: &[u8],
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> Flow {
        let kind = CommandKind::StartTls;
        if !self.config.starttls_available {
            self.reply(out, kind, 502, "5.5.1", "STARTTLS not available");
            return Flow::Done;
        }
        if self.tls {
            self.reply(out, kind, 503, "5.5.1", "TLS already active");
            return Flow::Done;
        }
        gate!(self, hooks, kind, arg, now, out);
        self.reset_txn(hooks);
        self.reply(out, kind, 220, "2.0.0", "Ready to start TLS");
        self.events.push_back(ServerEvent::StartTls);
        self.greeted = false;
        self.phase = Phase::TlsHandshake;
        Flow::Done
    }
}
