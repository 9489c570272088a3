//! One blaster thread: its own mio `Poll`, connection slab, timers, message
//! builder and [`Recorder`]; it shares only the stop signal with the others.
//!
//! The loop, once per iteration: fold the warmup away when it ends, hand a
//! snapshot to the main thread once a second, start the sessions that are
//! due (closed loop: whenever fewer than C are in flight; open loop: each at
//! its intended time, as soon as a slot is free), poll, drive the ready
//! connections, then fire expired timers. Each connection is a [`Slot`]: a
//! connecting socket, then a [`Conn`] (TLS or not) driving a sans-IO
//! [`ClientSession`].
//!
//! Invariants:
//! - Every message planned for a session gets exactly one outcome counted,
//!   whether the connect fails, times out, or the session ends; messages of
//!   sessions aborted by the stop (Ctrl-C, end of the grace period) are not
//!   counted at all, so `messages_attempted` always equals the sum of the
//!   outcome counters.
//! - In open loop, `message` and `session` latencies are recorded from the
//!   intended start (corrected: the session's start lag is added) and, as
//!   uncorrected figures, from the actual start; the lag has its own
//!   histogram.
//! - No hot-path lock or atomic beyond the relaxed stop-flag load.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use rustls::pki_types::ServerName;
use slab::Slab;

use crate::cli::ProxyVersion;
use crate::net::conn::{Conn, ReadResult};
use crate::net::runtime::{StopSignal, WorkerCtx, STOP_POLL_INTERVAL};
use crate::net::timer::Timers;
use crate::net::{socket, tls};
use crate::smtp::client::{ClientEvent, ClientSession};
use crate::smtp::{Outcome, Phase};
use crate::stats::{IntervalSnapshot, Measurements, Recorder};

use super::config::{share, BlastConfig, LoadModel};
use super::identity::Identity;
use super::message::MessageBuilder;
use super::schedule::Schedule;

const WAKER: Token = Token(usize::MAX);
/// Read buffer per connection.
const READ_BUF_BYTES: usize = 4096;
/// Longest the stop waits for in-flight sessions after `--duration` ends.
const MAX_GRACE: Duration = Duration::from_secs(10);

/// Times shared by all workers of one run.
#[derive(Clone, Debug)]
pub struct RunClock {
    /// The run starts (warmup included); the open-loop schedule origin.
    pub start: Instant,
    /// Results count from here (`start + warmup`).
    pub measure_start: Instant,
    /// No session starts at or after this (`measure_start + duration`).
    pub end: Option<Instant>,
}

/// One interval snapshot of one thread, for the main thread.
#[derive(Debug)]
pub struct Tick {
    pub thread: usize,
    /// Interval number (second `index` after `measure_start`).
    pub index: u64,
    pub snapshot: IntervalSnapshot,
}

/// What a worker hands back when it ends.
#[derive(Debug, Default)]
pub struct WorkerResult {
    pub measurements: Measurements,
    /// A reason the whole run must fail (e.g. out of ephemeral ports).
    pub fatal: Option<String>,
    /// The first few distinct session errors, for the summary.
    pub errors: Vec<String>,
    /// Open loop: intended starts inside the measured window, and how many
    /// of them were started before the run ended.
    pub scheduled_due: u64,
    pub scheduled_started: u64,
    /// Whether the stop came from the signal (Ctrl-C) rather than a limit.
    pub interrupted: bool,
    /// Intervals sent (the last one may be partial).
    pub intervals: u64,
}

// Slots live in a slab reused from session to session, so the large
// `Conn` variant costs no allocation; boxing it would cost one per session.
#[allow(clippy::large_enum_variant)]
enum Io {
    Connecting(TcpStream),
    Ready(Conn),
    /// Only while the stream moves from `Connecting` into a `Conn`.
    Moving,
}

struct Slot {
    io: Io,
    session: Option<ClientSession>,
    /// Messages waiting for implicit TLS to come up before the session starts.
    pending: Vec<crate::smtp::client::Message>,
    /// Payload bytes of each message, counted when it is accepted.
    sizes: Vec<u32>,
    planned: usize,
    intended: Instant,
    started: Instant,
    tls_started: Option<Instant>,
    lag_us: u64,
    outcomes: usize,
    /// What this session claims (`--proxy-source`, `--xclient`).
    identity: Identity,
}

struct Worker {
    cfg: Arc<BlastConfig>,
    clock: RunClock,
    index: usize,
    threads: usize,
    stop: StopSignal,
    poll: Poll,
    slots: Slab<Slot>,
    timers: Timers,
    rec: Recorder,
    builder: MessageBuilder,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    schedule: Option<Schedule>,
    cap: usize,
    messages_left: Option<u64>,
    sessions_left: Option<u64>,
    connects: u64,
    out: Vec<u8>,
    result: WorkerResult,
    open: bool,
}

/// Runs one worker to the end of the run.
pub fn run_worker(
    ctx: WorkerCtx,
    cfg: Arc<BlastConfig>,
    clock: RunClock,
    ticks: Sender<Tick>,
) -> WorkerResult {
    match Worker::new(&ctx, cfg, clock) {
        Ok(mut w) => {
            w.run(&ticks);
            w.result
        }
        Err(e) => {
            ctx.stop.stop();
            WorkerResult {
                fatal: Some(format!("worker {}: {e}", ctx.index)),
                ..Default::default()
            }
        }
    }
}

fn us(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

impl Worker {
    fn new(ctx: &WorkerCtx, cfg: Arc<BlastConfig>, clock: RunClock) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        ctx.stop.add_waker(waker);
        let (i, n) = (ctx.index as u64, ctx.count as u64);
        let cap = share(cfg.connections, i, n) as usize;
        let tls = if cfg.implicit_tls || cfg.starttls {
            let verify = match &cfg.tls_ca {
                Some(p) => tls::ClientVerify::CaFile(p.clone()),
                None => tls::ClientVerify::Off,
            };
            let resumption = if cfg.tls_resume { 256 } else { 0 };
            let config = tls::client_config(&verify, resumption).map_err(io::Error::other)?;
            let name = tls::server_name(&cfg.target_host).map_err(io::Error::other)?;
            Some((config, name))
        } else {
            None
        };
        let schedule = match cfg.model {
            LoadModel::Closed => None,
            LoadModel::Open { sessions_per_sec } => Some(Schedule::new(
                clock.start,
                sessions_per_sec,
                ctx.index,
                ctx.count,
            )),
        };
        let builder = MessageBuilder::new(
            cfg.from.clone(),
            cfg.to.clone(),
            cfg.recipients,
            cfg.size,
            cfg.body_file.clone(),
            cfg.seed,
            ctx.index,
            ctx.count,
            cfg.instance,
        );
        Ok(Worker {
            messages_left: cfg.max_messages.map(|m| share(m, i, n)),
            sessions_left: cfg.max_sessions.map(|s| share(s, i, n)),
            open: schedule.is_some(),
            cfg,
            clock,
            index: ctx.index,
            threads: ctx.count,
            stop: ctx.stop.clone(),
            poll,
            slots: Slab::with_capacity(cap.min(65_536)),
            timers: Timers::with_capacity(cap.min(65_536)),
            rec: Recorder::new(),
            builder,
            tls,
            schedule,
            cap,
            connects: 0,
            out: Vec::with_capacity(4096),
            result: WorkerResult::default(),
        })
    }

    fn budget_left(&self) -> bool {
        self.messages_left != Some(0) && self.sessions_left != Some(0) && self.cap > 0
    }

    fn run(&mut self, ticks: &Sender<Tick>) {
        let mut events = Events::with_capacity(1024);
        let mut measuring = false;
        let mut tick_index = 0u64;
        let mut next_tick = self.clock.measure_start + Duration::from_secs(1);
        let mut grace_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if !measuring && now >= self.clock.measure_start {
                // Everything before this instant was warmup.
                measuring = true;
                self.rec = Recorder::new();
            }
            while measuring && now >= next_tick {
                let snap = self
                    .rec
                    .take_interval(Duration::from_secs(tick_index), Duration::from_secs(1));
                let _ = ticks.send(Tick {
                    thread: self.index,
                    index: tick_index,
                    snapshot: snap,
                });
                tick_index += 1;
                next_tick += Duration::from_secs(1);
            }
            if self.stop.is_stopped() {
                self.result.interrupted = self.result.fatal.is_none();
                break;
            }
            let past_end = self.clock.end.is_some_and(|e| now >= e);
            let starting = !past_end && self.budget_left();
            if starting {
                self.start_due(now);
            } else if past_end && grace_until.is_none() {
                // Past --duration: in-flight sessions get a bounded grace.
                // A spent --messages/--sessions budget waits for them (each
                // phase is bounded by --timeout anyway).
                grace_until = Some(now + self.cfg.timeout.min(MAX_GRACE));
            }
            if self.result.fatal.is_some() {
                break;
            }
            if !starting && self.slots.is_empty() {
                break;
            }
            if grace_until.is_some_and(|g| now >= g) {
                break;
            }
            // How long to sleep: the next timer, start, tick or stop check.
            let mut wake = now + STOP_POLL_INTERVAL;
            if let Some(t) = self.timers.next() {
                wake = wake.min(t);
            }
            if starting && self.slots.len() < self.cap {
                if let Some(s) = &self.schedule {
                    wake = wake.min(s.peek());
                }
            }
            if let Some(e) = self.clock.end {
                if now < e {
                    wake = wake.min(e);
                }
            }
            if !measuring {
                wake = wake.min(self.clock.measure_start);
            } else {
                wake = wake.min(next_tick);
            }
            if let Some(g) = grace_until {
                wake = wake.min(g);
            }
            let timeout = wake.saturating_duration_since(now);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.result.fatal = Some(format!("poll failed: {e}"));
                    break;
                }
            }
            let now = Instant::now();
            for ev in events.iter() {
                let token = ev.token();
                if token == WAKER {
                    continue;
                }
                // Only a readable (or closed/error) edge is worth a read(2);
                // a writable edge only needs the queued output flushed.
                let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                // Data and FIN arriving together raise one edge: the short
                // read must not end the pump before it reads the EOF.
                let read_closed = ev.is_read_closed() || ev.is_error();
                self.drive(token.0, now, readable, read_closed);
            }
            let expired: Vec<usize> = self.timers.expired(now).collect();
            for key in expired {
                self.on_timeout(key, now);
            }
        }
        // Whatever is still in flight was aborted by the stop: dropped
        // uncounted (see the module doc).
        self.slots.clear();
        if let Some(s) = &self.schedule {
            self.result.scheduled_due = if self.budget_left() {
                // Stopped by the end of --duration or by Ctrl-C.
                let last = self
                    .clock
                    .end
                    .map_or(Instant::now(), |e| e.min(Instant::now()));
                s.due_between(self.clock.measure_start, last)
            } else {
                // The --messages/--sessions budget ended the schedule early.
                self.result.scheduled_started
            };
        }
        if measuring {
            let start_offset = Duration::from_secs(tick_index);
            let partial =
                Instant::now().saturating_duration_since(next_tick - Duration::from_secs(1));
            let snap = self
                .rec
                .take_interval(start_offset, partial.min(Duration::from_secs(1)));
            let _ = ticks.send(Tick {
                thread: self.index,
                index: tick_index,
                snapshot: snap,
            });
            self.result.intervals = tick_index + 1;
        }
        self.result.measurements = std::mem::take(&mut self.rec).finish();
    }

    /// Starts every session that is due now.
    fn start_due(&mut self, now: Instant) {
        while self.slots.len() < self.cap && self.budget_left() {
            let intended = match &mut self.schedule {
                None => now,
                Some(s) => {
                    if s.peek() > now {
                        return;
                    }
                    s.take()
                }
            };
            if self.open && intended >= self.clock.measure_start {
                self.result.scheduled_started += 1;
            }
            self.start_session(intended, now);
            if self.result.fatal.is_some() {
                return;
            }
        }
    }

    fn start_session(&mut self, intended: Instant, now: Instant) {
        let k = self.cfg.messages_per_session;
        let n = match self.messages_left {
            Some(left) => k.min(left),
            None => k,
        };
        if let Some(left) = &mut self.messages_left {
            *left -= n;
        }
        if let Some(left) = &mut self.sessions_left {
            *left -= 1;
        }
        let lag_us = if self.open {
            let lag = us(now.saturating_duration_since(intended));
            if intended >= self.clock.measure_start || now >= self.clock.measure_start {
                self.rec.record_schedule_lag(lag);
            }
            lag
        } else {
            0
        };
        let mut pending = Vec::with_capacity(n as usize);
        let mut sizes = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let m = self.builder.next_message();
            sizes.push((m.header.len() + m.body.len()).min(u32::MAX as usize) as u32);
            pending.push(m);
        }
        let source_ip: Option<IpAddr> = if self.cfg.source_ips.is_empty() {
            None
        } else {
            let len = self.cfg.source_ips.len() as u64;
            let i = (self.index as u64 + self.connects * self.threads as u64) % len;
            Some(self.cfg.source_ips[i as usize])
        };
        let identity = self
            .cfg
            .identities
            .session(self.index as u64 + self.connects * self.threads as u64);
        self.connects += 1;
        let planned = pending.len();
        match socket::connect(self.cfg.target, source_ip, self.cfg.abort_close) {
            Ok(mut stream) => {
                let entry = self.slots.vacant_entry();
                let key = entry.key();
                if let Err(e) = self.poll.registry().register(
                    &mut stream,
                    Token(key),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    self.note_error(format!("register: {e}"));
                    self.count_all(planned, Outcome::ConnectionError);
                    return;
                }
                entry.insert(Slot {
                    io: Io::Connecting(stream),
                    session: None,
                    pending,
                    sizes,
                    planned,
                    intended,
                    started: now,
                    tls_started: None,
                    lag_us,
                    outcomes: 0,
                    identity,
                });
                self.timers.schedule(key, now + self.cfg.timeout);
            }
            Err(e) if socket::is_addr_not_available(&e) => {
                self.count_all(planned, Outcome::ConnectionError);
                self.result.fatal = Some(e.to_string());
                self.stop.stop();
            }
            Err(e) => {
                self.note_error(format!("connect: {e}"));
                self.count_all(planned, Outcome::ConnectionError);
            }
        }
    }

    fn count_all(&mut self, n: usize, outcome: Outcome) {
        for _ in 0..n {
            self.rec.count_outcome(outcome);
        }
    }

    fn note_error(&mut self, e: String) {
        if self.result.errors.len() < 5 && !self.result.errors.contains(&e) {
            self.result.errors.push(e);
        }
    }

    /// A readiness event (or a call right after connecting) for `key`.
    fn drive(&mut self, key: usize, now: Instant, readable: bool, read_closed: bool) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        if let Io::Connecting(stream) = &slot.io {
            // The first event of a connecting socket means the connect
            // ended: SO_ERROR tells how (no getpeername(2) per session; were
            // it still in progress, the first read would fail and count as a
            // connection error).
            let done = match stream.take_error() {
                Ok(None) => Ok(true),
                Ok(Some(e)) | Err(e) => Err(e),
            };
            match done {
                Ok(_) => {}
                Err(e) => {
                    let planned = slot.planned;
                    self.note_error(format!("connect: {e}"));
                    self.close(key, now, Some((planned, Outcome::ConnectionError)));
                    return;
                }
            }
            self.rec.record(
                Phase::Connect,
                us(now.saturating_duration_since(slot.started)),
            );
            let Io::Connecting(stream) = std::mem::replace(&mut slot.io, Io::Moving) else {
                return;
            };
            // SMTP replies are small: a 4 KiB read buffer (TLS adds its own
            // record buffer) instead of zeroing 32 KiB per session.
            let mut conn = Conn::with_read_buf(stream, READ_BUF_BYTES);
            conn.assume_registered(Interest::READABLE | Interest::WRITABLE);
            if let Some(v) = self.cfg.proxy {
                let src = slot.identity.proxy_source.unwrap_or_else(|| {
                    conn.stream()
                        .local_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
                });
                self.out.clear();
                match v {
                    ProxyVersion::V1 => {
                        crate::smtp::proxy::write_v1(src, self.cfg.target, &mut self.out)
                    }
                    ProxyVersion::V2 => {
                        crate::smtp::proxy::write_v2(src, self.cfg.target, &mut self.out)
                    }
                }
                conn.write(&self.out);
            }
            if let Some((config, name)) = &self.tls {
                if self.cfg.implicit_tls {
                    if let Err(e) = conn.set_tls_implicit_client(Arc::clone(config), name.clone()) {
                        slot.io = Io::Ready(conn);
                        let planned = slot.planned;
                        self.note_error(format!("TLS: {e}"));
                        self.close(key, now, Some((planned, Outcome::ConnectionError)));
                        return;
                    }
                    slot.tls_started = Some(now);
                }
            }
            if slot.tls_started.is_none() {
                let msgs = std::mem::take(&mut slot.pending);
                let mut session = ClientSession::new(Arc::clone(&self.cfg.client), msgs, now);
                session.set_xclient(slot.identity.xclient.take());
                slot.session = Some(session);
            }
            slot.io = Io::Ready(conn);
        }
        if readable {
            self.pump(key, now, read_closed);
        } else {
            self.flush(key, now);
        }
    }

    /// Reads, feeds the session, writes, re-registers; closes when done.
    fn pump(&mut self, key: usize, now: Instant, read_closed: bool) {
        // An error before the session exists (implicit TLS) fails the slot.
        let mut failure: Option<String> = None;
        loop {
            let Some(slot) = self.slots.get_mut(key) else {
                return;
            };
            let Io::Ready(conn) = &mut slot.io else {
                return;
            };
            let mut error = None;
            let mut stop = false;
            match conn.read() {
                Ok(ReadResult::Data) => {
                    // A short plaintext read(2) drained the socket: anything
                    // arriving later raises a new edge, so skip the read that
                    // would only return EAGAIN (one syscall per reply).
                    stop = !read_closed
                        && !conn.is_tls()
                        && conn.plaintext().len() < READ_BUF_BYTES;
                    if let Some(s) = &mut slot.session {
                        s.handle_input(now, conn.plaintext());
                    }
                }
                Ok(ReadResult::TlsHandshakeDone) => {
                    if let Some(s) = &mut slot.session {
                        s.handle_tls_established(now);
                    } else if let Some(t0) = slot.tls_started {
                        self.rec
                            .record(Phase::StartTls, us(now.saturating_duration_since(t0)));
                        let msgs = std::mem::take(&mut slot.pending);
                        let mut session =
                            ClientSession::new(Arc::clone(&self.cfg.client), msgs, now);
                        session.set_xclient(slot.identity.xclient.take());
                        slot.session = Some(session);
                    }
                }
                Ok(ReadResult::WouldBlock) => stop = true,
                Ok(ReadResult::Eof) => {
                    match &mut slot.session {
                        Some(s) => s.handle_close(now),
                        None => failure = Some("connection closed during the TLS handshake".into()),
                    }
                    stop = true;
                }
                Err(e) => {
                    match &mut slot.session {
                        Some(s) => {
                            s.handle_close(now);
                            error = Some(format!("I/O: {e}"));
                        }
                        None => failure = Some(format!("TLS: {e}")),
                    }
                    stop = true;
                }
            }
            if let Some(e) = error {
                self.note_error(e);
            }
            if failure.is_some() || self.process_events(key, now) {
                break;
            }
            if stop {
                break;
            }
        }
        if let Some(f) = failure {
            let planned = self.slots.get(key).map(|s| s.planned).unwrap_or(0);
            self.note_error(f);
            self.close(key, now, Some((planned, Outcome::ConnectionError)));
            return;
        }
        self.flush(key, now);
    }

    /// Drains session events and output; true if the slot was closed.
    fn process_events(&mut self, key: usize, now: Instant) -> bool {
        let Some(slot) = self.slots.get_mut(key) else {
            return true;
        };
        let Some(session) = &mut slot.session else {
            return false;
        };
        let Io::Ready(conn) = &mut slot.io else {
            return false;
        };
        let mut done = false;
        while let Some(ev) = session.poll_event() {
            match ev {
                ClientEvent::Phase { phase, latency } => {
                    let l = us(latency);
                    if phase == Phase::Message && self.open {
                        self.rec.record(phase, l + slot.lag_us);
                        self.rec.record_uncorrected(phase, l);
                    } else {
                        self.rec.record(phase, l);
                    }
                }
                ClientEvent::Reply { command, code } => self.rec.count_reply(command, code),
                ClientEvent::StartTls => {
                    // The 220 was read; no output is queued before the handshake.
                    self.out.clear();
                    session.poll_transmit(now, &mut self.out);
                    conn.write(&self.out);
                    let started = match &self.tls {
                        Some((config, name)) => {
                            conn.start_tls_client(Arc::clone(config), name.clone())
                        }
                        None => Err(io::Error::other("no TLS configuration")),
                    };
                    if let Err(e) = started {
                        if self.result.errors.len() < 5 {
                            self.result.errors.push(format!("STARTTLS: {e}"));
                        }
                        session.handle_close(now);
                    }
                }
                ClientEvent::Message {
                    index,
                    outcome,
                    recipients_accepted,
                    ..
                } => {
                    slot.outcomes += 1;
                    self.rec.count_outcome(outcome);
                    self.rec.count_recipients(u64::from(recipients_accepted));
                    if outcome == Outcome::Accepted {
                        self.rec
                            .count_bytes(u64::from(slot.sizes.get(index).copied().unwrap_or(0)));
                    }
                }
                ClientEvent::Error(e) => {
                    if self.result.errors.len() < 5 && !self.result.errors.contains(&e) {
                        self.result.errors.push(e);
                    }
                }
                ClientEvent::Done => done = true,
                ClientEvent::Banner(_) | ClientEvent::Capabilities(_) => {}
            }
        }
        if done {
            debug_assert_eq!(
                slot.outcomes, slot.planned,
                "every planned message has one outcome"
            );
            self.close(key, now, None);
            return true;
        }
        false
    }

    fn flush(&mut self, key: usize, now: Instant) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        let Io::Ready(conn) = &mut slot.io else {
            return;
        };
        if let Some(session) = &mut slot.session {
            self.out.clear();
            session.poll_transmit(now, &mut self.out);
            if !self.out.is_empty() {
                conn.write(&self.out);
            }
        }
        // The stream stays registered for READABLE | WRITABLE, edge-triggered,
        // from connect to close: no epoll_ctl per state change. A partial
        // flush set SOCK_NOSPACE, so the kernel reports the writable edge
        // when room frees up; other wakeups are harmless.
        let flushed = conn.flush();
        if let Err(e) = flushed {
            self.note_error(format!("I/O: {e}"));
            let Some(slot) = self.slots.get_mut(key) else {
                return;
            };
            match &mut slot.session {
                Some(s) => {
                    s.handle_close(now);
                    let _ = self.process_events(key, now);
                }
                None => {
                    let planned = slot.planned;
                    self.close(key, now, Some((planned, Outcome::ConnectionError)));
                }
            }
            return;
        }
        let Some(slot) = self.slots.get(key) else {
            return;
        };
        let deadline = match &slot.session {
            Some(s) => s.poll_timeout(),
            None => slot.tls_started.map(|t| t + self.cfg.timeout),
        };
        match deadline {
            Some(d) => self.timers.schedule(key, d),
            None => self.timers.cancel(key),
        }
    }

    fn on_timeout(&mut self, key: usize, now: Instant) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        match &mut slot.session {
            Some(s) => {
                s.handle_timeout(now);
                if !self.process_events(key, now) {
                    self.flush(key, now);
                }
            }
            None => {
                let planned = slot.planned;
                let what = if matches!(slot.io, Io::Connecting(_)) {
                    "connect"
                } else {
                    "TLS handshake"
                };
                self.note_error(format!("timeout waiting for the {what}"));
                self.close(key, now, Some((planned, Outcome::Timeout)));
            }
        }
    }

    /// Ends a slot. `fail`: count this many messages with this outcome (the
    /// session never started).
    fn close(&mut self, key: usize, now: Instant, fail: Option<(usize, Outcome)>) {
        if !self.slots.contains(key) {
            return;
        }
        let slot = self.slots.remove(key);
        self.timers.cancel(key);
        if let Some((n, outcome)) = fail {
            // Only for failures before the session existed (connect, TLS):
            // a session counts its own outcomes.
            if slot.session.is_none() {
                self.count_all(n, outcome);
                return;
            }
        }
        if slot.session.is_some() {
            let tls = matches!(&slot.io, Io::Ready(c) if c.is_tls());
            self.rec.count_session(tls);
            if self.open {
                self.rec.record(
                    Phase::Session,
                    us(now.saturating_duration_since(slot.intended)),
                );
                self.rec.record_uncorrected(
                    Phase::Session,
                    us(now.saturating_duration_since(slot.started)),
                );
            } else {
                self.rec.record(
                    Phase::Session,
                    us(now.saturating_duration_since(slot.started)),
                );
            }
        }
        // Dropping the stream closes it (RST with --abort-close); the kernel
        // removes it from the epoll set.
    }
}
