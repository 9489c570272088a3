//! The `Pair` harness (quinn-proto style): a [`ClientSession`] and a
//! [`ServerSession`] wired together in memory, driven by a virtual clock.
//!
//! Invariants the harness keeps (and the tests rely on):
//! - Time never comes from the OS during a run: `now = t0 + elapsed`, and
//!   `elapsed` only moves forward when neither side can make progress, to the
//!   earliest deadline either session reports. So latencies are exact.
//! - Bytes move both ways over "wires" (`c2s`, `s2c`), in random-size chunks
//!   when a seed is given. Everything ever put on a wire is logged
//!   (`wire_c2s`, `wire_s2c`) so tests can prove what an eavesdropper saw.
//! - On `StartTls` (either side) the harness flushes that side's plaintext,
//!   then switches it to a real TLS session through the same sans-IO
//!   transform the backends use (`net::tls_stream`), pumped in memory:
//!   from then on that side's session bytes only reach the wire as TLS
//!   records.
//! - A server `Close` is delivered to the client (`handle_close`) only after
//!   the server's last bytes reached it, as a socket would.
//! - The run ends when the client reports `Done`; a stall with no deadline
//!   left, or a runaway loop, fails the test instead of hanging.
//! - With a link model ([`Pair::with_link`]) the client's plaintext goes
//!   through a socket send buffer of fixed size: the client hands over only
//!   what fits and is told what was written (`handle_written`), and every
//!   server read takes what is buffered and a fixed slice of virtual time.
//!   So a body larger than the buffer takes several reads, as on a socket.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smtpstorm::net::tls;
use smtpstorm::net::tls_stream::{TlsRead, TlsSide, TlsStream};
use smtpstorm::smtp::client::{ClientConfig, ClientEvent, ClientSession, Message};
use smtpstorm::smtp::server::{
    CommandInfo, ServerConfig, ServerEvent, ServerHooks, ServerSession, Verdict,
};
use smtpstorm::smtp::{CommandKind, Outcome, Phase};

/// splitmix64: small, seedable, good enough to pick chunk sizes and bodies.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi` (`hi >= lo`).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % ((hi - lo) as u64 + 1)) as usize
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// The fault policy: called for every command the server sees.
pub type FaultFn = Box<dyn FnMut(CommandKind, &CommandInfo<'_>) -> Verdict>;

/// Server hooks that record what the server delivered.
#[derive(Default)]
pub struct Recorder {
    /// The body of every message that ended, in order (unstuffed bytes).
    pub bodies: Vec<Vec<u8>>,
    /// `on_message_end(accepted)` of every message, in order.
    pub ends: Vec<bool>,
    /// Body bytes of a message that started but has not ended.
    pub open_body: Option<Vec<u8>>,
    /// Every command seen: kind, argument, peer (PROXY/XCLIENT).
    pub commands: Vec<(CommandKind, Vec<u8>, Option<SocketAddr>)>,
    /// Every RCPT path in the order the server saw them.
    pub rcpts: Vec<Vec<u8>>,
    /// `Some((user, pass))`: only these credentials pass; `None`: any.
    pub creds: Option<(Vec<u8>, Vec<u8>)>,
    pub auth_attempts: u32,
    pub fault: Option<FaultFn>,
}

impl Recorder {
    /// Bodies of the messages the server accepted.
    pub fn accepted_bodies(&self) -> Vec<&[u8]> {
        self.bodies
            .iter()
            .zip(&self.ends)
            .filter(|(_, &ok)| ok)
            .map(|(b, _)| &b[..])
            .collect()
    }
    pub fn count(&self, kind: CommandKind) -> usize {
        self.commands.iter().filter(|(k, _, _)| *k == kind).count()
    }
}

impl ServerHooks for Recorder {
    fn on_command(&mut self, cmd: CommandKind, info: &CommandInfo<'_>) -> Verdict {
        self.commands.push((cmd, info.arg.to_vec(), info.peer));
        if let (CommandKind::Rcpt, Some(r)) = (cmd, info.rcpt_to) {
            self.rcpts.push(r.to_vec());
        }
        match self.fault.as_mut() {
            Some(f) => f(cmd, info),
            None => Verdict::Proceed,
        }
    }
    fn check_auth(&mut self, _authzid: &[u8], user: &[u8], pass: &[u8]) -> bool {
        self.auth_attempts += 1;
        match &self.creds {
            None => true,
            Some((u, p)) => u == user && p == pass,
        }
    }
    fn on_message_start(&mut self) {
        assert!(self.open_body.is_none(), "on_message_start twice");
        self.open_body = Some(Vec::new());
    }
    fn on_body(&mut self, chunk: &[u8]) {
        self.open_body
            .get_or_insert_with(Vec::new)
            .extend_from_slice(chunk);
    }
    fn on_message_end(&mut self, accepted: bool) {
        let body = self.open_body.take().expect("on_message_end without start");
        self.bodies.push(body);
        self.ends.push(accepted);
    }
}

/// Both sessions, both wires, both TLS layers and the virtual clock.
pub struct Pair {
    pub t0: Instant,
    pub elapsed: Duration,
    pub client: ClientSession,
    pub server: ServerSession,
    pub hooks: Recorder,
    pub client_events: Vec<ClientEvent>,
    pub server_events: Vec<ServerEvent>,
    /// Chunking of wire deliveries: `None` = deliver everything at once.
    pub chunk_rng: Option<Rng>,
    pub max_chunk: usize,
    /// Bytes in flight.
    c2s: Vec<u8>,
    s2c: Vec<u8>,
    /// Everything ever put on each wire (ciphertext once TLS is up).
    pub wire_c2s: Vec<u8>,
    pub wire_s2c: Vec<u8>,
    /// Offsets in `wire_c2s` / `wire_s2c` where each side switched to TLS.
    pub tls_from_c2s: Option<usize>,
    pub tls_from_s2c: Option<usize>,
    /// Every non-empty `poll_transmit` output of the client (plaintext).
    pub client_writes: Vec<Vec<u8>>,
    /// Every plaintext byte fed to the server session / client session.
    pub server_rx_plain: Vec<u8>,
    pub client_rx_plain: Vec<u8>,
    /// Man in the middle: after a plaintext write containing `.0`, put `.1`
    /// on the same wire right behind it (once).
    pub inject_c2s: Option<(Vec<u8>, Vec<u8>)>,
    pub inject_s2c: Option<(Vec<u8>, Vec<u8>)>,
    srv_out: Vec<u8>,
    client_tls: Option<TlsStream>,
    server_tls: Option<TlsStream>,
    client_tls_up: bool,
    server_tls_up: bool,
    server_tls_cfg: Option<Arc<rustls::ServerConfig>>,
    client_tls_cfg: Option<Arc<rustls::ClientConfig>>,
    server_closed: bool,
    close_delivered: bool,
    started: bool,
    steps: u64,
    /// `(send buffer bytes, virtual time per server read)`.
    link: Option<(usize, Duration)>,
    /// Client plaintext bytes written into the link so far.
    client_written: u64,
}

impl Pair {
    pub fn new(server_cfg: ServerConfig, client_cfg: ClientConfig, messages: Vec<Message>) -> Self {
        let t0 = Instant::now();
        let needs_tls = server_cfg.starttls_available || client_cfg.starttls;
        let (server_tls_cfg, client_tls_cfg) = if needs_tls {
            let s = tls::server_config(None).expect("self-signed server config");
            let c = tls::client_config(&tls::ClientVerify::Off, 0).expect("client config");
            (Some(s.config), Some(c))
        } else {
            (None, None)
        };
        Self {
            t0,
            elapsed: Duration::ZERO,
            client: ClientSession::new(Arc::new(client_cfg), messages, t0),
            server: ServerSession::new(Arc::new(server_cfg), t0),
            hooks: Recorder::default(),
            client_events: Vec::new(),
            server_events: Vec::new(),
            chunk_rng: None,
            max_chunk: usize::MAX,
            c2s: Vec::new(),
            s2c: Vec::new(),
            wire_c2s: Vec::new(),
            wire_s2c: Vec::new(),
            tls_from_c2s: None,
            tls_from_s2c: None,
            client_writes: Vec::new(),
            server_rx_plain: Vec::new(),
            client_rx_plain: Vec::new(),
            inject_c2s: None,
            inject_s2c: None,
            srv_out: Vec::new(),
            client_tls: None,
            server_tls: None,
            client_tls_up: false,
            server_tls_up: false,
            server_tls_cfg,
            client_tls_cfg,
            server_closed: false,
            close_delivered: false,
            started: false,
            steps: 0,
            link: None,
            client_written: 0,
        }
    }

    /// The client writes through a send buffer of `send_buffer` bytes, and
    /// each server read of it takes `per_read` (see the module doc).
    pub fn with_link(mut self, send_buffer: usize, per_read: Duration) -> Self {
        self.link = Some((send_buffer.max(1), per_read));
        self
    }

    /// Deliver wire bytes in random chunks of `1..=max_chunk`.
    pub fn with_chunking(mut self, seed: u64, max_chunk: usize) -> Self {
        self.chunk_rng = Some(Rng(seed));
        self.max_chunk = max_chunk.max(1);
        self
    }

    pub fn with_hooks(mut self, hooks: Recorder) -> Self {
        self.hooks = hooks;
        self
    }

    /// Put raw bytes on the client-to-server wire (e.g. a PROXY header).
    pub fn client_raw_write(&mut self, bytes: &[u8]) {
        self.c2s.extend_from_slice(bytes);
        self.wire_c2s.extend_from_slice(bytes);
    }

    pub fn now(&self) -> Instant {
        self.t0 + self.elapsed
    }

    /// Run until the client is done. Panics on a stall or a runaway loop.
    pub fn drive(&mut self) {
        if !self.started {
            self.started = true;
            let now = self.now();
            self.server.start(now, &mut self.srv_out, &mut self.hooks);
            self.after_server();
        }
        while !self.client.is_done() {
            self.steps += 1;
            assert!(self.steps < 2_000_000, "runaway pair loop");
            if self.step() {
                continue;
            }
            // Nothing moves: jump the clock to the earliest deadline.
            let server_deadline = if self.server_closed {
                None
            } else {
                self.server.poll_timeout()
            };
            let next = match (self.client.poll_timeout(), server_deadline) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or_else(|| {
                    panic!("pair stalled with no deadline at {:?}", self.elapsed)
                }),
            };
            if next > self.now() {
                self.elapsed = next - self.t0;
            }
            let now = self.now();
            self.client.handle_timeout(now);
            self.after_client();
            if !self.server_closed {
                self.server
                    .handle_timeout(now, &mut self.srv_out, &mut self.hooks);
                self.after_server();
            }
        }
        // Whatever the client wrote last (QUIT after a failure) still flows.
        self.after_client();
        assert!(self.client.poll_event().is_none());
    }

    /// One round of moving bytes; true if anything happened.
    fn step(&mut self) -> bool {
        let mut progressed = self.after_client();
        progressed |= self.after_server();
        let now = self.now();

        // Client -> server.
        if !self.c2s.is_empty() {
            if self.server_closed {
                self.c2s.clear(); // the socket is gone
                progressed = true;
            } else if self.server.wants_read() {
                let n = match self.link {
                    Some(_) => self.c2s.len(),
                    None => self.chunk_len(self.c2s.len()),
                };
                let bytes: Vec<u8> = self.c2s.drain(..n).collect();
                // The read completes after its transmission time.
                let now = match self.link {
                    Some((_, per_read)) => {
                        self.elapsed += per_read;
                        self.now()
                    }
                    None => now,
                };
                self.server_receive(now, &bytes);
                self.after_server();
                progressed = true;
            }
        }
        // Server -> client (a link read above may have moved the clock).
        let now = self.now();
        if !self.s2c.is_empty() && !self.client.is_done() {
            let n = self.chunk_len(self.s2c.len());
            let bytes: Vec<u8> = self.s2c.drain(..n).collect();
            self.client_receive(now, &bytes);
            self.after_client();
            progressed = true;
        }
        if self.server_closed
            && self.s2c.is_empty()
            && !self.close_delivered
            && !self.client.is_done()
        {
            self.close_delivered = true;
            self.client.handle_close(now);
            self.after_client();
            progressed = true;
        }
        progressed
    }

    fn chunk_len(&mut self, avail: usize) -> usize {
        match self.chunk_rng.as_mut() {
            None => avail,
            Some(r) => r.range(1, self.max_chunk.min(avail)),
        }
    }

    fn server_receive(&mut self, now: Instant, bytes: &[u8]) {
        let Some(tls) = self.server_tls.as_mut() else {
            self.server_rx_plain.extend_from_slice(bytes);
            self.server
                .handle_input(now, bytes, &mut self.srv_out, &mut self.hooks);
            return;
        };
        let mut rd: &[u8] = bytes;
        while !rd.is_empty() {
            let n = tls.read_ciphertext(rd).expect("server TLS error");
            rd = &rd[n..];
            let (plain, ready) = drain_plaintext(tls);
            if ready {
                self.server_tls_up = true;
                self.server.handle_tls_established(now);
            }
            if !plain.is_empty() {
                assert!(
                    self.server_tls_up,
                    "application data before the handshake ended"
                );
                self.server_rx_plain.extend_from_slice(&plain);
                self.server
                    .handle_input(now, &plain, &mut self.srv_out, &mut self.hooks);
            }
        }
    }

    fn client_receive(&mut self, now: Instant, bytes: &[u8]) {
        let Some(tls) = self.client_tls.as_mut() else {
            self.client_rx_plain.extend_from_slice(bytes);
            self.client.handle_input(now, bytes);
            return;
        };
        let mut rd: &[u8] = bytes;
        while !rd.is_empty() {
            let n = tls.read_ciphertext(rd).expect("client TLS error");
            rd = &rd[n..];
            let (plain, ready) = drain_plaintext(tls);
            if ready {
                self.client_tls_up = true;
                self.client.handle_tls_established(now);
            }
            if !plain.is_empty() {
                self.client_rx_plain.extend_from_slice(&plain);
                self.client.handle_input(now, &plain);
            }
        }
    }

    /// Flush the client's output onto the wire (through TLS if up), then
    /// handle its events. True if anything happened.
    fn after_client(&mut self) -> bool {
        let now = self.now();
        let mut progressed = false;
        let mut out = Vec::new();
        match self.link {
            Some((send_buffer, _)) if self.client_tls.is_none() => {
                let room = send_buffer.saturating_sub(self.c2s.len());
                self.client.poll_transmit_max(now, &mut out, room);
                if !out.is_empty() {
                    self.client_written += out.len() as u64;
                    self.client.handle_written(now, self.client_written);
                }
            }
            _ => self.client.poll_transmit(now, &mut out),
        }
        if !out.is_empty() {
            progressed = true;
            self.client_writes.push(out.clone());
            match self.client_tls.as_mut() {
                Some(tls) => tls.write_plaintext(&out),
                None => {
                    self.c2s.extend_from_slice(&out);
                    self.wire_c2s.extend_from_slice(&out);
                    if self
                        .inject_c2s
                        .as_ref()
                        .is_some_and(|(t, _)| contains(&out, t))
                    {
                        let (_, payload) = self.inject_c2s.take().unwrap();
                        self.client_raw_write(&payload);
                    }
                }
            }
        }
        if let Some(tls) = self.client_tls.as_mut() {
            let n = pump_tls_out(tls, &mut self.c2s, &mut self.wire_c2s);
            progressed |= n > 0;
        }
        while let Some(ev) = self.client.poll_event() {
            progressed = true;
            if ev == ClientEvent::StartTls {
                assert!(self.client_tls.is_none(), "client StartTls twice");
                let cfg = self.client_tls_cfg.clone().expect("client TLS config");
                let name = tls::server_name("localhost").unwrap();
                let mut conn = TlsStream::new(TlsSide::Client(cfg, name)).expect("client TLS");
                self.tls_from_c2s = Some(self.wire_c2s.len());
                pump_tls_out(&mut conn, &mut self.c2s, &mut self.wire_c2s);
                self.client_tls = Some(conn);
            }
            self.client_events.push(ev);
        }
        progressed
    }

    /// Flush the server's output onto the wire (through TLS if up), then
    /// handle its events. True if anything happened.
    fn after_server(&mut self) -> bool {
        let mut progressed = false;
        if !self.srv_out.is_empty() {
            progressed = true;
            let out = std::mem::take(&mut self.srv_out);
            match self.server_tls.as_mut() {
                Some(tls) => {
                    assert!(
                        self.server_tls_up,
                        "server replied during the TLS handshake"
                    );
                    tls.write_plaintext(&out);
                }
                None if self.server_closed => {}
                None => {
                    self.s2c.extend_from_slice(&out);
                    self.wire_s2c.extend_from_slice(&out);
                    if self
                        .inject_s2c
                        .as_ref()
                        .is_some_and(|(t, _)| contains(&out, t))
                    {
                        let (_, payload) = self.inject_s2c.take().unwrap();
                        self.s2c.extend_from_slice(&payload);
                        self.wire_s2c.extend_from_slice(&payload);
                    }
                }
            }
        }
        if let Some(tls) = self.server_tls.as_mut() {
            let n = pump_tls_out(tls, &mut self.s2c, &mut self.wire_s2c);
            progressed |= n > 0;
        }
        while let Some(ev) = self.server.poll_event() {
            progressed = true;
            match ev {
                ServerEvent::StartTls => {
                    assert!(self.server_tls.is_none(), "server StartTls twice");
                    let cfg = self.server_tls_cfg.clone().expect("server TLS config");
                    self.tls_from_s2c = Some(self.wire_s2c.len());
                    self.server_tls = Some(TlsStream::new(TlsSide::Server(cfg)).expect("server TLS"));
                }
                ServerEvent::Close(_) => self.server_closed = true,
                _ => {}
            }
            self.server_events.push(ev);
        }
        progressed
    }

    // ---- what tests assert on -------------------------------------------

    /// `(index, outcome, code, recipients_accepted)` of every client Message
    /// event, in event order.
    pub fn client_messages(&self) -> Vec<(usize, Outcome, u16, u32)> {
        self.client_events
            .iter()
            .filter_map(|e| match *e {
                ClientEvent::Message {
                    index,
                    outcome,
                    code,
                    recipients_accepted,
                    ..
                } => Some((index, outcome, code, recipients_accepted)),
                _ => None,
            })
            .collect()
    }

    /// Client outcomes indexed by message.
    pub fn client_outcomes(&self, n: usize) -> Vec<(Outcome, u16, u32)> {
        let mut v = vec![None; n];
        for (i, o, c, r) in self.client_messages() {
            assert!(v[i].is_none(), "message {i} got two outcomes");
            v[i] = Some((o, c, r));
        }
        v.into_iter()
            .enumerate()
            .map(|(i, o)| o.unwrap_or_else(|| panic!("message {i} has no outcome")))
            .collect()
    }

    /// `(outcome, code, bytes, recipients)` of every server Message event.
    pub fn server_messages(&self) -> Vec<(smtpstorm::smtp::server::MessageOutcome, u16, u64, u32)> {
        self.server_events
            .iter()
            .filter_map(|e| match *e {
                ServerEvent::Message {
                    outcome,
                    code,
                    bytes,
                    recipients,
                } => Some((outcome, code, bytes, recipients)),
                _ => None,
            })
            .collect()
    }

    pub fn client_replies(&self, command: CommandKind) -> Vec<u16> {
        self.client_events
            .iter()
            .filter_map(|e| match *e {
                ClientEvent::Reply { command: c, code } if c == command => Some(code),
                _ => None,
            })
            .collect()
    }

    pub fn server_replies(&self, command: CommandKind) -> Vec<u16> {
        self.server_events
            .iter()
            .filter_map(|e| match *e {
                ServerEvent::Reply { command: c, code } if c == command => Some(code),
                _ => None,
            })
            .collect()
    }

    pub fn phase_latencies(&self, phase: Phase) -> Vec<Duration> {
        self.client_events
            .iter()
            .filter_map(|e| match *e {
                ClientEvent::Phase {
                    phase: p, latency, ..
                } if p == phase => Some(latency),
                _ => None,
            })
            .collect()
    }

    /// The session ended the way every session must: `Done` exactly once
    /// and last, one Message per message.
    #[track_caller]
    pub fn assert_client_invariants(&self, n: usize) {
        let done: Vec<usize> = self
            .client_events
            .iter()
            .enumerate()
            .filter(|(_, e)| **e == ClientEvent::Done)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            done,
            vec![self.client_events.len() - 1],
            "Done exactly once and last"
        );
        let _ = self.client_outcomes(n);
        assert_eq!(self.client_messages().len(), n);
    }

    pub fn client_errors(&self) -> Vec<&str> {
        self.client_events
            .iter()
            .filter_map(|e| match e {
                ClientEvent::Error(s) => Some(s.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// Moves every TLS record `tls` has to send onto the wire (and its log).
fn pump_tls_out(tls: &mut TlsStream, wire: &mut Vec<u8>, log: &mut Vec<u8>) -> usize {
    let before = wire.len();
    let n = tls.write_ciphertext(wire);
    log.extend_from_slice(&wire[before..]);
    n
}

/// All plaintext the TLS stream has decrypted so far, and whether the
/// handshake completed in this step.
fn drain_plaintext(tls: &mut TlsStream) -> (Vec<u8>, bool) {
    let mut plain = Vec::new();
    let mut ready = false;
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tls.read_plaintext(&mut buf).expect("TLS read") {
            TlsRead::Data(n) => plain.extend_from_slice(&buf[..n]),
            TlsRead::HandshakeDone => ready = true,
            TlsRead::NeedCiphertext | TlsRead::Closed => break,
        }
    }
    (plain, ready)
}

/// What the server must hand to `on_body` for a message sent with DATA:
/// `header ++ body`, with the CRLF dot-stuffing adds if the last line is
/// unterminated.
pub fn expected_data_body(m: &Message) -> Vec<u8> {
    let mut v = m.header.clone();
    v.extend_from_slice(&m.body);
    if !v.is_empty() && !v.ends_with(b"\r\n") {
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// What the server must hand to `on_body` for a message sent with BDAT.
pub fn expected_bdat_body(m: &Message) -> Vec<u8> {
    let mut v = m.header.clone();
    v.extend_from_slice(&m.body);
    v
}

pub fn message(from: &str, rcpts: &[&str], header: &[u8], body: &[u8]) -> Message {
    Message {
        mail_from: from.to_owned(),
        mail_params: String::new(),
        rcpt_to: rcpts.iter().map(|s| (*s).to_owned()).collect(),
        header: header.to_vec(),
        body: Arc::from(body),
        data: None,
    }
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

pub fn count(hay: &[u8], needle: &[u8]) -> usize {
    memchr::memmem::find_iter(hay, needle).count()
}
