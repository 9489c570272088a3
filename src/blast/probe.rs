//! `smtpstorm probe TARGET`: one diagnostic session, what administrators do
//! today with telnet or `openssl s_client`.
//!
//! It connects, prints the banner, the EHLO capabilities, the STARTTLS (or
//! implicit TLS) outcome with protocol, cipher and the certificate's
//! subject, issuer and expiry, the AUTH mechanisms offered and the result
//! of AUTH if asked, and the time of each phase; `--json` writes the same
//! findings. It drives the blaster's own per-connection logic
//! ([`BlastConn`]) on the same backend, with no message to send. A connect timeout to port 25
//! explains that many providers block outbound port 25.
//!
//! Invariants: every wait is bounded by `--timeout`; nothing is sent but
//! EHLO/HELO, STARTTLS, AUTH and QUIT. Phase times are listed in the order
//! they ended (connect, banner, ehlo, starttls, ehlo again, auth, quit,
//! total); a connection that never opened prints its error alone. The TLS
//! client config is built before the clock starts, so no one-time crypto
//! setup is timed as a phase.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::net::backend::Setup;
use crate::net::backend::{Backend, Closed, ConnId, ConnectOpts, Handler, Tick};
use crate::net::driver;
use crate::net::runtime::StopSignal;
use crate::net::tls::{self, TlsInfo};
use crate::smtp::client::{ClientAuth, ClientConfig, PipeliningMode};
use crate::smtp::{ClientTimeouts, CommandKind, Outcome, Phase};

use super::conn::{BlastConn, ConnConfig, ConnCtx, Observer};
use super::identity::Identity;

/// What one probe does (`smtpstorm probe`, built by `cli::probe`).
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    pub target: SocketAddr,
    /// `probe unix:/path`: this unix-domain socket instead of `target`.
    pub unix: Option<PathBuf>,
    /// Host name as given (for TLS SNI).
    pub target_host: String,
    /// Upgrade with STARTTLS.
    pub starttls: bool,
    /// Implicit TLS (465-style).
    pub implicit_tls: bool,
    pub helo: String,
    pub auth: Option<ClientAuth>,
    /// Bound of each step (and 8 times it, of the whole session).
    pub timeout: Duration,
    /// `--json`: where the findings go (`-`: stdout).
    pub json: Option<PathBuf>,
}

/// Why a probe could not run at all.
#[derive(Debug, Error)]
pub enum ProbeError {
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
pub fn run(cfg: ProbeConfig) -> anyhow::Result<u8> {
    let report = probe(&cfg)?;
    print_report(&report, &mut io::stdout().lock())?;
    if let Some(p) = &cfg.json {
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
/// The probe's [`Observer`]: fills the report as the session goes.
struct ProbeObs {
    r: ProbeReport,
    implicit_tls: bool,
    /// STARTTLS completed: later capabilities are the ones over TLS.
    tls_up: bool,
}

impl Observer for ProbeObs {
    fn phase(&mut self, phase: Phase, latency: Duration, _corrected: Option<Duration>) {
        let name = match phase {
            // The whole session is printed as `total`, from the first try.
            Phase::Session => return,
            Phase::StartTls if self.implicit_tls => "tls",
            p => p.as_str(),
        };
        self.r.phase(name, ms(latency));
    }

    fn reply(&mut self, command: CommandKind, code: u16) {
        self.r.replies.push(format!("{} {code}", command.as_str()));
        if command == CommandKind::Auth && code / 100 != 3 {
            self.r.auth_code = Some(code);
        }
    }

    fn outcome(&mut self, _outcome: Outcome, _recipients_accepted: u32, _bytes: u64) {}

    fn error(&mut self, e: String) {
        self.r.error.get_or_insert(e);
    }

    fn banner(&mut self, text: String) {
        self.r.banner = Some(text);
    }

    fn capabilities(&mut self, c: Vec<String>) {
        let r = &mut self.r;
        if self.tls_up || self.implicit_tls {
            r.capabilities_tls = c;
        } else {
            r.starttls_offered = c.iter().any(|l| l.eq_ignore_ascii_case("STARTTLS"));
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
}

/// The probe as a [`Handler`]: one connection, then stop.
struct ProbeHandler {
    cfg: ConnConfig,
    obs: ProbeObs,
    out: Vec<u8>,
    conn: Option<(ConnId, BlastConn)>,
    target: std::net::SocketAddr,
    /// `probe unix:/path`: dial this instead of `target`.
    unix: Option<PathBuf>,
    /// The target as messages show it.
    shown: String,
    timeout: Duration,
    t0: Instant,
    /// Bound on the whole session.
    hard_deadline: Instant,
    started: bool,
    done: bool,
}

impl ProbeHandler {
    /// Runs `f` on the connection with what it works with.
    fn with_conn<B: Backend>(
        &mut self,
        be: &mut B,
        f: impl FnOnce(&mut BlastConn, &mut ConnCtx<'_, B, ProbeObs>, ConnId),
    ) {
        if let Some((id, c)) = &mut self.conn {
            let mut cx = ConnCtx {
                cfg: &self.cfg,
                be,
                obs: &mut self.obs,
                out: &mut self.out,
            };
            f(c, &mut cx, *id);
        }
    }
}

impl Handler for ProbeHandler {
    fn on_connected<B: Backend>(
        &mut self,
        be: &mut B,
        now: Instant,
        _id: ConnId,
        result: io::Result<()>,
    ) {
        if let Err(e) = &result {
            self.obs.r.error = Some(format!("connect to {} failed: {e}", self.shown));
            self.conn = None;
            self.done = true;
            return;
        }
        self.with_conn(be, |c, io, id| {
            let _ = c.connected(io, id, now, result);
        });
    }

    fn on_tls_ready<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId) {
        self.obs.r.tls = be.tls_info(id).map(ProbeTls::from);
        self.obs.tls_up = true;
        self.with_conn(be, |c, io, id| {
            let _ = c.tls_ready(io, id, now);
        });
    }

    fn on_input<B: Backend>(&mut self, be: &mut B, now: Instant, _id: ConnId, plain: &[u8]) {
        self.with_conn(be, |c, io, id| {
            let _ = c.input(io, id, now, plain);
        });
    }

    fn on_peer_closed<B: Backend>(&mut self, be: &mut B, now: Instant, _id: ConnId) {
        self.with_conn(be, |c, io, id| {
            let _ = c.peer_closed(io, id, now);
        });
    }

    fn on_written<B: Backend>(&mut self, be: &mut B, _now: Instant, _id: ConnId) {
        self.with_conn(be, |c, io, id| {
            let _ = c.written(io, id);
        });
    }

    fn on_timer<B: Backend>(&mut self, be: &mut B, now: Instant, _id: ConnId) {
        let connecting = self
            .conn
            .as_ref()
            .is_some_and(|(_, c)| c.session().is_none() && !self.obs.r.connected());
        if connecting {
            self.obs.r.error = Some(format!(
                "connect to {} timed out after {:?}",
                self.shown, self.timeout
            ));
            self.obs.r.hint = port25_hint(self.target.port());
        }
        self.with_conn(be, |c, io, id| {
            let _ = c.timer(io, id, now);
        });
    }

    fn on_closed<B: Backend>(&mut self, _be: &mut B, now: Instant, _id: ConnId, why: Closed) {
        if let Some((_, c)) = self.conn.take() {
            if let Closed::Error(e) = &why {
                self.obs.r.error.get_or_insert(format!("I/O error: {e}"));
            }
            c.closed(&mut self.obs, now, why);
        }
        self.done = true;
    }

    fn on_tick<B: Backend>(&mut self, be: &mut B, now: Instant) -> Tick {
        if !self.started {
            self.started = true;
            let connected = match &self.unix {
                Some(path) => be.connect_unix(path, ConnectOpts::default()),
                None => be.connect(self.target, ConnectOpts::default()),
            };
            match connected {
                Ok(id) => {
                    let mut c =
                        BlastConn::new(Vec::new(), false, self.t0, self.t0, Identity::default());
                    c.arm(be, id, self.t0 + self.timeout);
                    self.conn = Some((id, c));
                }
                Err(e) => {
                    self.obs.r.error = Some(format!("connect to {} failed: {e}", self.shown));
                    self.done = true;
                }
            }
        }
        if !self.done && now >= self.hard_deadline {
            self.obs.r.error.get_or_insert("timed out".into());
            self.done = true;
        }
        Tick {
            wake_at: Some(self.hard_deadline),
            stop: self.done,
        }
    }
}

/// Runs one probe session and returns its findings.
pub fn probe(cfg: &ProbeConfig) -> Result<ProbeReport, ProbeError> {
    let addr = cfg.target;
    let shown = match &cfg.unix {
        Some(p) => format!("unix:{}", p.display()),
        None => addr.to_string(),
    };
    let timeout = cfg.timeout;
    let tls_cfg = if cfg.implicit_tls || cfg.starttls {
        Some((
            tls::client_config(&tls::ClientVerify::Off, 0, &tls::TlsChoice::default())?,
            tls::server_name(&cfg.target_host)?,
        ))
    } else {
        None
    };
    let client = Arc::new(ClientConfig {
        helo_name: cfg.helo.clone(),
        pipelining: PipeliningMode::Off,
        starttls: cfg.starttls,
        implicit_tls: cfg.implicit_tls,
        auth: cfg.auth.clone(),
        timeouts: ClientTimeouts::uniform(timeout),
        capture_text: true,
        ..ClientConfig::default()
    });
    let t0 = Instant::now();
    let mut h = ProbeHandler {
        cfg: ConnConfig {
            client,
            tls: tls_cfg,
            implicit_tls: cfg.implicit_tls,
            proxy: None,
            target: addr,
            timeout,
            messages_per_session: 0,
        },
        obs: ProbeObs {
            r: ProbeReport {
                target: shown.clone(),
                ..Default::default()
            },
            implicit_tls: cfg.implicit_tls,
            tls_up: false,
        },
        out: Vec::new(),
        conn: None,
        target: addr,
        unix: cfg.unix.clone(),
        shown,
        timeout,
        t0,
        hard_deadline: t0 + timeout * 8,
        started: false,
        done: false,
    };
    let setup = Setup {
        listeners: Vec::new(),
        stop: StopSignal::new(),
        read_buf_bytes: 16 * 1024,
        track_waiting: false,
    };
    driver::run(
        driver::ThreadTransport::kernel(driver::Io::Epoll),
        setup,
        &mut h,
    )?;
    let mut r = h.obs.r;
    if !r.connected() {
        // A connection that never opened prints its error alone.
        return Ok(r);
    }
    r.phase("total", ms(t0.elapsed()));
    if cfg.auth.is_some() && r.auth_code.is_some_and(|c| c / 100 != 2) {
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
