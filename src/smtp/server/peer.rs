//! What the client says it is: the PROXY protocol header that opens the
//! connection (with `proxy_protocol`), and Postfix's XCLIENT command. Both
//! set the client address the fault hook sees ([`CommandInfo::peer`]).
//!
//! [`CommandInfo::peer`]: super::CommandInfo::peer

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::super::proxy;
use super::super::wire;
use super::super::CommandKind;
use super::{CloseReason, Flow, ServerEvent, ServerHooks, ServerSession, Step};

/// The XCLIENT attributes the server accepts, as its EHLO reply advertises
/// them (Postfix's names). `ADDR` and `PORT` set the client address that
/// faults (greylisting, per-client limits) see; the others are checked for
/// form and otherwise ignored.
pub const XCLIENT_ATTRIBUTES: [&str; 9] =
    ["NAME", "ADDR", "PORT", "PROTO", "HELO", "REVERSE_NAME", "LOGIN", "DESTADDR", "DESTPORT"];

/// The EHLO line for [`XCLIENT_ATTRIBUTES`].
pub(super) const XCLIENT_ADVERTISED: &str =
    "XCLIENT NAME ADDR PORT PROTO HELO REVERSE_NAME LOGIN DESTADDR DESTPORT";

/// What an XCLIENT command claims about the client: `None` = not mentioned,
/// `Some(None)` = `[UNAVAILABLE]` / `[TEMPUNAVAIL]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct XclientClaim {
    addr: Option<Option<IpAddr>>,
    port: Option<Option<u16>>,
}

impl XclientClaim {
    /// The client address after the claim, from the one before it.
    fn apply(self, before: Option<SocketAddr>) -> Option<SocketAddr> {
        let ip = match self.addr {
            None => before.map(|a| a.ip()),
            Some(ip) => ip,
        };
        let port = match self.port {
            None => before.map_or(0, |a| a.port()),
            Some(p) => p.unwrap_or(0),
        };
        ip.map(|ip| SocketAddr::new(ip, port))
    }
}

fn xclient_unavailable(v: &[u8]) -> bool {
    v.eq_ignore_ascii_case(b"[UNAVAILABLE]") || v.eq_ignore_ascii_case(b"[TEMPUNAVAIL]")
}

/// Parses XCLIENT's `NAME=VALUE...`: every name must be one of
/// [`XCLIENT_ATTRIBUTES`] and carry `=`; `ADDR` (IPv4, `IPV6:` or bare
/// IPv6) and `PORT` must be well formed. The error is the 501 reply text.
fn parse_xclient(attrs: &[u8]) -> Result<XclientClaim, &'static str> {
    let mut claim = XclientClaim::default();
    for (k, v) in wire::params(attrs) {
        if !XCLIENT_ATTRIBUTES.iter().any(|a| k.eq_ignore_ascii_case(a.as_bytes())) {
            return Err("Bad XCLIENT attribute name");
        }
        let Some(v) = v else {
            return Err("Bad XCLIENT attribute syntax, expected NAME=VALUE");
        };
        if k.eq_ignore_ascii_case(b"ADDR") {
            claim.addr = Some(if xclient_unavailable(v) {
                None
            } else {
                let v = if v.len() > 5 && v[..5].eq_ignore_ascii_case(b"IPV6:") { &v[5..] } else { v };
                let ip = std::str::from_utf8(v).ok().and_then(|s| s.parse::<IpAddr>().ok());
                Some(ip.ok_or("Bad XCLIENT ADDR syntax")?)
            });
        } else if k.eq_ignore_ascii_case(b"PORT") {
            claim.port = Some(if xclient_unavailable(v) {
                None
            } else {
                let p = wire::parse_u64(v).and_then(|p| u16::try_from(p).ok());
                Some(p.ok_or("Bad XCLIENT PORT syntax")?)
            });
        }
    }
    Ok(claim)
}

impl ServerSession {
    /// The PROXY header from `rest`, once it is whole; then the greeting.
    pub(super) fn proxy_input<H: ServerHooks>(
        &mut self,
        now: Instant,
        rest: &[u8],
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> Step {
        match proxy::parse(rest) {
            Ok(None) => Step::Stop(0),
            Ok(Some((h, n))) => {
                self.peer = h.src;
                self.events.push_back(ServerEvent::Proxy(h));
                self.greet(now, out, hooks);
                Step::Go(n)
            }
            Err(_) => {
                self.close(CloseReason::ProxyError, hooks);
                Step::Stop(rest.len())
            }
        }
    }

    /// XCLIENT: a new client address (if claimed), a new session (220, the
    /// transaction and the hello forgotten).
    pub(super) fn xclient<H: ServerHooks>(
        &mut self,
        now: Instant,
        arg: &[u8],
        attrs: &[u8],
        out: &mut Vec<u8>,
        hooks: &mut H,
    ) -> Flow {
        let kind = CommandKind::Xclient;
        if !self.config.xclient {
            self.reply(out, kind, 502, "5.5.1", "XCLIENT not available");
            return Flow::Done;
        }
        if self.txn.active {
            self.reply(out, kind, 503, "5.5.1", "XCLIENT not allowed in a mail transaction");
            return Flow::Done;
        }
        let claim = match parse_xclient(attrs) {
            Ok(c) => c,
            Err(text) => {
                self.reply(out, kind, 501, "5.5.4", text);
                return Flow::Done;
            }
        };
        gate!(self, hooks, kind, arg, now, out);
        self.peer = claim.apply(self.peer);
        self.reset_txn(hooks);
        self.greeted = false;
        self.reply_host(out, kind, 220, "", self.banner());
        Flow::Done
    }
}
