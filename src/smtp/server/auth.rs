//! AUTH PLAIN and LOGIN (RFC 4954): the verb, its continuation lines (the
//! `AuthPlain`, `AuthLoginUser` and `AuthLoginPass` phases), the credential
//! check through [`ServerHooks::check_auth`]. Decoding happens in reused
//! buffers: nothing allocates per attempt once they have grown.

use std::time::Instant;

use super::super::auth::{self, AuthError};
use super::super::CommandKind;
use super::{Flow, Phase, ServerEvent, ServerHooks, ServerSession};

/// Reused decoding buffers: nothing allocates per attempt once grown.
#[derive(Debug, Default)]
pub(super) struct AuthBuffers {
    /// What the last base64 line decoded to.
    decoded: Vec<u8>,
    /// AUTH LOGIN's user name, until its password comes.
    login_user: Vec<u8>,
}

impl ServerSession {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn auth<H: ServerHooks>(
        &mut self,
        now: Instant,
        arg: &[u8],
        mechanism: &[u8],
        initial: Option<&[u8]>,
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> Flow {
        let kind = CommandKind::Auth;
        let (enabled, requires_tls) = (self.config.auth_enabled, self.config.auth_requires_tls);
        if !enabled {
            self.reply(out, kind, 502, "5.5.1", "AUTH not available");
            return Flow::Done;
        }
        if !self.greeted || self.authenticated || self.txn.active {
            self.reply(out, kind, 503, "5.5.1", "AUTH not allowed now");
            return Flow::Done;
        }
        if requires_tls && !self.tls {
            self.reply(out, kind, 538, "5.7.11", "Encryption required for requested authentication mechanism");
            return Flow::Done;
        }
        let plain = mechanism.eq_ignore_ascii_case(b"PLAIN");
        if !plain && !mechanism.eq_ignore_ascii_case(b"LOGIN") {
            self.reply(out, kind, 504, "5.5.4", "Unrecognized authentication type");
            return Flow::Done;
        }
        let v = self.verdict(hooks, kind, arg, None, None);
        match self.apply(v, kind, now, out, hooks) {
            Flow::Go => {}
            f => return f,
        }
        match (plain, initial) {
            (true, Some(resp)) => self.finish_plain(resp, out, hooks),
            (true, None) => {
                self.reply(out, kind, 334, "", "");
                self.phase = Phase::AuthPlain;
            }
            (false, Some(user)) => self.login_user(user, out),
            (false, None) => {
                self.reply(out, kind, 334, "", auth::LOGIN_USER_PROMPT);
                self.phase = Phase::AuthLoginUser;
            }
        }
        Flow::Done
    }

    /// A line answering a 334 (the phase says which).
    pub(super) fn auth_line<H: ServerHooks>(&mut self, line: &[u8], out: &mut Vec<u8>, hooks: &mut H) {
        let phase = self.phase;
        self.phase = Phase::Command;
        match phase {
            Phase::AuthPlain => self.finish_plain(line, out, hooks),
            Phase::AuthLoginUser => self.login_user(line, out),
            // AuthLoginPass, the only other phase that gets here.
            _ => {
                let ok = match auth::decode_b64(line, &mut self.auth.decoded) {
                    Ok(p) => hooks.check_auth(b"", &self.auth.login_user, p),
                    Err(e) => return self.auth_error(e, out),
                };
                self.auth_result(ok, out);
            }
        }
    }

    /// AUTH LOGIN's user name (base64): keep it, ask for the password.
    fn login_user(&mut self, user: &[u8], out: &mut Vec<u8>) {
        match auth::decode_b64(user, &mut self.auth.decoded) {
            Ok(u) => {
                self.auth.login_user.clear();
                self.auth.login_user.extend_from_slice(u);
                self.reply(out, CommandKind::Auth, 334, "", auth::LOGIN_PASS_PROMPT);
                self.phase = Phase::AuthLoginPass;
            }
            Err(e) => self.auth_error(e, out),
        }
    }

    fn finish_plain<H: ServerHooks>(&mut self, resp: &[u8], out: &mut Vec<u8>, hooks: &mut H) {
        let ok = match auth::decode_plain(resp, &mut self.auth.decoded) {
            Ok(p) => hooks.check_auth(p.authzid, p.user, p.pass),
            Err(e) => {
                self.auth_error(e, out);
                return;
            }
        };
        self.auth_result(ok, out);
    }

    fn auth_error(&mut self, e: AuthError, out: &mut Vec<u8>) {
        let kind = CommandKind::Auth;
        match e {
            AuthError::Cancelled => self.reply(out, kind, 501, "5.7.0", "Authentication cancelled"),
            AuthError::Base64 | AuthError::Malformed => {
                self.reply(out, kind, 501, "5.5.2", "Invalid authentication data")
            }
        }
    }

    fn auth_result(&mut self, ok: bool, out: &mut Vec<u8>) {
        let kind = CommandKind::Auth;
        if ok {
            self.authenticated = true;
            self.reply(out, kind, 235, "2.7.0", "Authentication successful");
            self.events.push_back(ServerEvent::Authenticated);
        } else {
            self.reply(out, kind, 535, "5.7.8", "Authentication credentials invalid");
        }
    }
}
