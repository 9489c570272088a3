//! `smtpstorm probe TARGET`: one diagnostic session, what administrators do
//! today with telnet or `openssl s_client`.
//!
//! It connects, prints the banner, the EHLO capabilities, the STARTTLS (or
//! implicit TLS) outcome with protocol, cipher and the certificate's
//! subject, issuer and expiry, the AUTH mechanisms offered and the result
//! of AUTH if asked, and the time of each phase; `--json` writes the same
//! findings. It drives the same sans-IO [`ClientSession`] and [`Conn`] as
//! the blaster, with no message to send. A connect timeout to port 25
//! explains that many providers block outbound port 25.
//!
//! Invariants: every wait is bounded by `--timeout`; nothing is sent but
//! EHLO/HELO, STARTTLS, AUTH and QUIT. Phase times are listed in the order
//! they ended (connect, banner, ehlo, starttls, ehlo again, auth, quit,
//! total); a connection that never opened prints its error alone. The TLS
//! client config is built before the clock starts, so no one-time crypto
//! setup is timed as a phase.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use serde::Serialize;
use thiserror::Error;

use crate::cli::{AuthMechArg, ProbeArgs};
use crate::net::conn::{Conn, ReadResult};
use crate::net::socket;
use crate::net::tls::{self, TlsInfo};
use crate::smtp::client::{
    AuthMech, ClientAuth, ClientConfig, ClientEvent, ClientSession, PipeliningMode,
};
use crate::smtp::{ClientTimeouts, CommandKind, Phase};

use super::config::resolve_target;

/// Why a probe could not run at all.
#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("{0}")]
    Config(#[from] super::config::ConfigError),
    #[error("TLS setup: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("cannot write --json {0}: {1}")]
    Json(String, io::Error),
}

/// The TLS part of the findings.
#[derive(Debug, Default, Serialize)]
pub struct ProbeTls {
    pub protocol: String,
    pub cipher_suite: String,
    pub peer_subject: Option<String>,
    pub peer_issuer: Option<String>,
    pub peer_not_after: Option<String>,
    pub peer_not_after_unix: Option<i64>,
}

impl From<TlsInfo> for ProbeTls {
    fn from(i: TlsInfo) -> Self {
        ProbeTls {
            protocol: i.protocol,
            cipher_suite: i.cipher_suite,
            peer_subject: i.peer_subject,
            peer_issuer: i.peer_issuer,
            peer_not_after: i.peer_not_after,
            peer_not_after_unix: i.peer_not_after_unix,
        }
    }
}

/// One timed phase.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProbePhase {
    pub phase: String,
    pub ms: f64,
}

/// Everything one probe found.
#[derive(Debug, Default, Serialize)]
pub struct ProbeReport {
    pub target: String,
    pub ok: bool,
    pub banner: Option<String>,
    /// EHLO reply lines before TLS.
    pub capabilities: Vec<String>,
    /// EHLO reply lines after STARTTLS.
    pub capabilities_tls: Vec<String>,
    pub starttls_offered: bool,
    pub tls: Option<ProbeTls>,
    pub auth_mechanisms: Vec<String>,
    /// Reply to AUTH, if `--auth` was given.
    pub auth_code: Option<u16>,
    /// Each phase in the order it ended (EHLO appears twice with STARTTLS).
    pub phases: Vec<ProbePhase>,
    /// Phase name → milliseconds (the last of each name: after STARTTLS,
    /// `ehlo` is the EHLO sent over TLS).
    pub phases_ms: std::collections::BTreeMap<String, f64>,
    /// Replies in order: `command code`.
    pub replies: Vec<String>,
    pub error: Option<String>,
    pub hint: Option<String>,
}

const TOKEN: Token = Token(0);

impl ProbeReport {
    /// Records a phase that just ended.
    fn phase(&mut self, name: &str, ms: f64) {
        self.phases.push(ProbePhase {
            phase: name.to_string(),
            ms,
        });
        self.phases_ms.insert(name.to_string(), ms);
    }

    /// True once the TCP connection was established.
    fn connected(&self) -> bool {
        self.phases.iter().any(|p| p.phase == "connect")
    }
}

/// The explanation for a connect timeout to port 25.
pub fn port25_hint(port: u16) -> Option<String> {
    (port == 25).then(|| {
        "many ISPs and cloud providers block outbound port 25; try 587 (submission, STARTTLS + AUTH), \
         465 (implicit TLS) or 2525"
            .to_string()
    })
}

/// `smtpstorm probe`: prints the findings; exit 0 if the session went
/// through, 2 if it failed.
pub fn run(args: &ProbeArgs) -> anyhow::Result<u8> {
    let report = probe(args)?;
    print_report(&report, &mut io::stdout().lock())?;
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&report)? + "\n";
        if p.as_os_str() == "-" {
            print!("{text}");
        } else {
            std::fs::write(p, text).map_err(|e| ProbeError::Json(p.display().to_string(), e))?;
        }
    }
    Ok(if report.ok { 0 } else { 2 })
}

/// Human-readable findings. A connection that never opened prints its
/// error (and hint) alone: there is nothing else to report.
pub fn print_report<W: io::Write>(r: &ProbeReport, out: &mut W) -> io::Result<()> {
    if !r.connected() {
        return print_error(r, out);
    }
    writeln!(out, "target        {}", r.target)?;
    if let Some(b) = &r.banner {
        writeln!(out, "banner        {}", b.replace('\n', "\n              "))?;
    }
    if !r.capabilities.is_empty() {
        writeln!(
            out,
            "capabilities  {}",
            r.capabilities.join("\n              ")
        )?;
    }
    if r.starttls_offered || r.tls.is_some() {
        writeln!(
            out,
            "starttls      {}",
            if r.starttls_offered {
                "offered"
            } else {
                "not offered"
            }
        )?;
    }
    if let Some(t) = &r.tls {
        writeln!(out, "tls           {} {}", t.protocol, t.cipher_suite)?;
        if let Some(s) = &t.peer_subject {
            writeln!(out, "  subject     {s}")?;
        }
        if let Some(s) = &t.peer_issuer {
            writeln!(out, "  issuer      {s}")?;
        }
        if let Some(s) = &t.peer_not_after {
            writeln!(out, "  expires     {s}")?;
        }
    }
    if !r.capabilities_tls.is_empty() {
        writeln!(
            out,
            "after tls     {}",
            r.capabilities_tls.join("\n              ")
        )?;
    }
    // Whether AUTH is offered is only known once EHLO was answered.
    if !r.capabilities.is_empty() || !r.capabilities_tls.is_empty() {
        writeln!(
            out,
            "auth          {}",
            if r.auth_mechanisms.is_empty() {
                "not offered".to_string()
            } else {
                r.auth_mechanisms.join(" ")
            }
        )?;
    }
    if let Some(c) = r.auth_code {
        writeln!(out, "auth result   {c}")?;
    }
    for p in &r.phases {
        writeln!(out, "time {:<9}{:>9.3} ms", p.phase, p.ms)?;
    }
    print_error(r, out)
}

fn print_error<W: io::Write>(r: &ProbeReport, out: &mut W) -> io::Result<()> {
    if let Some(e) = &r.error {
        writeln!(out, "error         {e}")?;
    }
    if let Some(h) = &r.hint {
        writeln!(out, "hint          {h}")?;
    }
    Ok(())
}

fn auth_mechs(lines: &[String]) -> Vec<String> {
    for l in lines {
        let up = l.to_ascii_uppercase();
        let rest = up
            .strip_prefix("AUTH ")
            .or_else(|| up.strip_prefix("AUTH="));
        if let Some(rest) = rest {
            return rest.split_whitespace().map(str::to_string).collect();
        }
    }
    Vec::new()
}

/// Runs one probe session.
pub fn probe(args: &ProbeArgs) -> Result<ProbeReport, ProbeError> {
    let (addr, host) = resolve_target(&args.target)?;
    let mut r = ProbeReport {
        target: addr.to_string(),
        ..Default::default()
    };
    let timeout = args.timeout;
    let tls_cfg = if args.tls || args.starttls {
        Some((
            tls::client_config(&tls::ClientVerify::Off, 0)?,
            tls::server_name(&host)?,
        ))
    } else {
        None
    };
    let config = Arc::new(ClientConfig {
        helo_name: args.helo.clone(),
        pipelining: PipeliningMode::Off,
        starttls: args.starttls,
        implicit_tls: args.tls,
        auth: args.auth.as_ref().map(|(user, pass)| ClientAuth {
            mech: match args.auth_mech {
                AuthMechArg::Plain => AuthMech::Plain,
                AuthMechArg::Login => AuthMech::Login,
            },
            user: user.clone(),
            pass: pass.clone(),
        }),
        timeouts: ClientTimeouts::uniform(timeout),
        capture_text: true,
        ..ClientConfig::default()
    });
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(16);
    let t0 = Instant::now();
    let mut stream = socket::connect(addr, None, false)?;
    poll.registry()
        .register(&mut stream, TOKEN, Interest::READABLE | Interest::WRITABLE)?;
    // Connect, bounded by --timeout.
    let deadline = t0 + timeout;
    loop {
        match socket::connect_finished(&stream) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                r.error = Some(format!("connect to {addr} failed: {e}"));
                return Ok(r);
            }
        }
        let now = Instant::now();
        if now >= deadline {
            r.error = Some(format!("connect to {addr} timed out after {timeout:?}"));
            r.hint = port25_hint(addr.port());
            return Ok(r);
        }
        poll.poll(&mut events, Some(deadline - now))?;
    }
    let connected = Instant::now();
    r.phase("connect", ms(connected - t0));
    let mut conn = Conn::new(stream);
    conn.assume_registered(Interest::READABLE | Interest::WRITABLE);
    let mut session = None;
    // Bytes the connection carried before the session's first byte.
    let mut session_base = 0;
    let mut tls_started = None;
    if args.tls {
        if let Some((c, n)) = &tls_cfg {
            conn.set_tls_implicit_client(Arc::clone(c), n.clone())?;
            tls_started = Some(connected);
        }
    } else {
        session = Some(ClientSession::new(
            Arc::clone(&config),
            Vec::new(),
            connected,
        ));
    }
    let mut out = Vec::new();
    let mut saw_tls = false;
    let mut done = false;
    let mut hard_deadline = connected + timeout * 8;
    while !done {
        let now = Instant::now();
        // Read what is there.
        loop {
            match conn.read() {
                Ok(ReadResult::Data) => {
                    if let Some(s) = &mut session {
                        s.handle_input(now, conn.plaintext());
                    }
                }
                Ok(ReadResult::TlsHandshakeDone) => {
                    r.tls = conn.tls_info().map(ProbeTls::from);
                    if let Some(s) = &mut session {
                        s.handle_tls_established(now);
                    } else if let Some(t) = tls_started {
                        r.phase("tls", ms(now - t));
                        session = Some(ClientSession::new(Arc::clone(&config), Vec::new(), now));
                        session_base = conn.app_bytes_in();
                    }
                }
                Ok(ReadResult::WouldBlock) => break,
                Ok(ReadResult::Eof) => {
                    match &mut session {
                        Some(s) => s.handle_close(now),
                        None => {
                            r.error = Some("connection closed during the TLS handshake".into());
                            done = true;
                        }
                    }
                    break;
                }
                Err(e) => {
                    match &mut session {
                        Some(s) => s.handle_close(now),
                        None => done = true,
                    }
                    r.error.get_or_insert(format!("I/O error: {e}"));
                    break;
                }
            }
        }
        if let Some(s) = &mut session {
            if s.poll_timeout().is_some_and(|d| now >= d) {
                s.handle_timeout(now);
            }
            while let Some(ev) = s.poll_event() {
                match ev {
                    ClientEvent::Banner(b) => r.banner = Some(b),
                    ClientEvent::Capabilities(c) => {
                        if saw_tls || args.tls {
                            r.capabilities_tls = c;
                        } else {
                            r.starttls_offered =
                                c.iter().any(|l| l.eq_ignore_ascii_case("STARTTLS"));
                            r.capabilities = c;
                        }
                        let mechs = auth_mechs(if r.capabilities_tls.is_empty() {
                            &r.capabilities
                        } else {
                            &r.capabilities_tls
                        });
                        if !mechs.is_empty() {
                            r.auth_mechanisms = mechs;
                        }
                    }
                    ClientEvent::Phase { phase, latency, .. } => {
                        let name = if phase == Phase::StartTls {
                            "starttls"
                        } else {
                            phase.as_str()
                        };
                        r.phase(name, ms(latency));
                    }
                    ClientEvent::Reply { command, code } => {
                        r.replies.push(format!("{} {code}", command.as_str()));
                        if command == CommandKind::Auth && code / 100 != 3 {
                            r.auth_code = Some(code);
                        }
                    }
                    ClientEvent::StartTls => {
                        saw_tls = true;
                        out.clear();
                        s.poll_transmit(now, &mut out);
                        conn.write(&out);
                        if let Some((c, n)) = &tls_cfg {
                            conn.start_tls_client(Arc::clone(c), n.clone())?;
                        }
                    }
                    ClientEvent::Error(e) => {
                        r.error.get_or_insert(e);
                    }
                    ClientEvent::Message { .. } => {}
                    ClientEvent::Done => done = true,
                }
            }
            out.clear();
            s.poll_transmit(now, &mut out);
            if !out.is_empty() {
                conn.write(&out);
            }
        }
        let flushed = conn.flush();
        if let Some(s) = &mut session {
            // Phases run from the moment a command's last byte left.
            s.handle_written(Instant::now(), conn.app_bytes_sent() - session_base);
        }
        if let Err(e) = flushed.and_then(|_| conn.update_registration(poll.registry(), TOKEN)) {
            r.error.get_or_insert(format!("I/O error: {e}"));
            break;
        }
        if done {
            break;
        }
        let now = Instant::now();
        if session.is_none() {
            hard_deadline = hard_deadline.min(connected + timeout);
        }
        if now >= hard_deadline {
            r.error.get_or_insert("timed out".into());
            break;
        }
        let wake = session
            .as_ref()
            .and_then(|s| s.poll_timeout())
            .unwrap_or(hard_deadline)
            .min(hard_deadline);
        poll.poll(
            &mut events,
            Some(
                wake.saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
            ),
        )?;
    }
    r.phase("total", ms(t0.elapsed()));
    if args.auth.is_some() && r.auth_code.is_some_and(|c| c / 100 != 2) {
        r.error
            .get_or_insert(format!("AUTH refused ({})", r.auth_code.unwrap_or(0)));
    }
    r.ok = r.error.is_none();
    Ok(r)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_25_timeouts_suggest_other_ports() {
        let h = port25_hint(25).unwrap();
        assert!(h.contains("587") && h.contains("465") && h.contains("2525"));
        assert!(port25_hint(587).is_none());
    }

    #[test]
    fn auth_mechanisms_are_read_from_ehlo_lines() {
        let lines = vec![
            "mx.example".to_string(),
            "PIPELINING".into(),
            "AUTH PLAIN LOGIN".into(),
        ];
        assert_eq!(auth_mechs(&lines), vec!["PLAIN", "LOGIN"]);
        assert!(auth_mechs(&["SIZE 10".to_string()]).is_empty());
    }
}
