//! One blaster thread: its own mio `Poll`, connection slab, timers, message
//! builder and [`Recorder`]; it shares only the stop signal with the others.
//!
//! The loop, once per iteration: fold the warmup away when it ends, hand a
//! snapshot to the main thread once a second, start what is due, poll,
//! drive the ready connections, then fire expired timers. Each connection is
//! a [`Slot`]: a connecting socket, then a [`Conn`] (TLS or not) driving a
//! sans-IO [`ClientSession`].
//!
//! Closed loop: C sessions in flight, each with its `-k` messages given at
//! once; a session that ends is replaced at once.
//!
//! Open loop (`--rate`): messages, not sessions, are scheduled
//! ([`Schedule`]). A message due now goes to a connection that is free: an
//! open session between messages (it idles there), else a new session if
//! fewer than this thread's share of `-c` are open. When none is free it
//! waits in a FIFO backlog, and the next session to become free takes it;
//! the wait is part of its corrected latency. A session carries at most
//! `-k` messages, then quits. When the run ends, idle sessions quit, and
//! messages still waiting are reported as not sent.
//!
//! Who fell short is measured, not guessed: a message that found a free
//! connection records its dispatch lag (how late the blaster itself was)
//! in `schedule_lag`; one that had to wait for a connection counts as
//! waiting on the target ([`OpenLoopCounts`]).
//!
//! Invariants:
//! - Every message given to a session gets exactly one outcome counted,
//!   whether the connect fails, times out, or the session ends; messages of
//!   sessions aborted by the stop (Ctrl-C, end of the grace period) are not
//!   counted at all, so `messages_attempted` always equals the sum of the
//!   outcome counters.
//! - Phases are timed by the session from bytes actually written (the
//!   driver reports every flush with `handle_written`); in open loop each
//!   phase is also recorded corrected, from the intended time.
//! - Bodies are built before the run ([`MessageBuilder::shared_body`]) or
//!   before the session that carries them starts; never inside a phase.
//! - No hot-path lock or atomic beyond the relaxed stop-flag load.

use std::collections::VecDeque;
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
use crate::smtp::client::{ClientEvent, ClientSession, Message};
use crate::smtp::{Outcome, Phase};
use crate::stats::{IntervalSnapshot, Measurements, Recorder};

use super::config::{share, BlastConfig, LoadModel};
use super::identity::Identity;
use super::message::{Body, MessageBuilder};
use super::schedule::Schedule;

const WAKER: Token = Token(usize::MAX);
/// Read buffer per connection.
const READ_BUF_BYTES: usize = 4096;
/// Longest the stop waits for in-flight sessions after `--duration` ends.
const MAX_GRACE: Duration = Duration::from_secs(10);
/// Output taken from a session per write: a large body goes out in pieces,
/// so it is never buffered whole per connection.
const OUT_CHUNK_BYTES: usize = 256 * 1024;

/// Times shared by all workers of one run.
#[derive(Clone, Debug)]
pub struct RunClock {
    /// The run starts (warmup included); the open-loop schedule origin.
    pub start: Instant,
    /// Results count from here (`start + warmup`).
    pub measure_start: Instant,
    /// Nothing starts at or after this (`measure_start + duration`).
    pub end: Option<Instant>,
}

/// One interval snapshot of one thread, for the main thread.
#[derive(Debug)]
pub struct Tick {
    pub thread: usize,
    /// Interval number (second `index` after `measure_start`).
    pub index: u64,
    pub snapshot: IntervalSnapshot,
    /// Connections open when the snapshot was taken (live metrics).
    pub open_connections: usize,
}

/// What the open loop did with its messages (measured window only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenLoopCounts {
    /// Messages intended inside the measured window (until the end, or the
    /// stop).
    pub due: u64,
    /// Of those, messages given to a connection.
    pub sent: u64,
    /// Of those, messages that found no free connection and waited for one.
    pub waited: u64,
    /// Most messages waiting at once.
    pub max_backlog: u64,
    /// Time of the measured window this thread spent outside `epoll_wait`,
    /// and the window's length: a thread busy nearly all the time is
    /// saturated, and its own delays are in the figures.
    pub busy: Duration,
    pub window: Duration,
}

impl OpenLoopCounts {
    pub fn add(&mut self, o: &OpenLoopCounts) {
        self.due += o.due;
        self.sent += o.sent;
        self.waited += o.waited;
        self.max_backlog = self.max_backlog.max(o.max_backlog);
        // The busiest thread decides.
        if o.busy_fraction() > self.busy_fraction() {
            self.busy = o.busy;
            self.window = o.window;
        }
    }

    /// Share of the window the (busiest) thread was busy, 0..=1.
    pub fn busy_fraction(&self) -> f64 {
        if self.window.is_zero() {
            return 0.0;
        }
        (self.busy.as_secs_f64() / self.window.as_secs_f64()).min(1.0)
    }
}

/// What a worker hands back when it ends.
#[derive(Debug, Default)]
pub struct WorkerResult {
    pub measurements: Measurements,
    /// A reason the whole run must fail (e.g. out of ephemeral ports).
    pub fatal: Option<String>,
    /// The first few distinct session errors, for the summary.
    pub errors: Vec<String>,
    /// Closed loop: sessions due and started (unused); open loop: messages.
    pub open_loop: OpenLoopCounts,
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
    /// Messages (and their intended times) waiting for the session to exist
    /// (it starts when TCP, or implicit TLS, is up).
    pending: Vec<(Message, Option<Instant>)>,
    /// Messages given to this slot so far (outcomes are owed for each).
    given: u64,
    /// Open loop: an open session that takes messages one at a time.
    open: bool,
    /// The session's intended start (open loop), else its actual start.
    intended: Instant,
    started: Instant,
    tls_started: Option<Instant>,
    /// Bytes the connection carried before the session's first byte (a
    /// PROXY header): the session's write offsets start after them.
    out_base: u64,
    outcomes: u64,
    /// Listed in `Worker::idle`.
    idle_listed: bool,
    /// What this session claims (`--proxy-source`, `--xclient`).
    identity: Identity,
}

/// What happened to a slot after its session's events were handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    Closed,
    Busy,
    /// An open session between messages.
    Idle,
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
    /// Open loop: intended times of due messages waiting for a connection.
    backlog: VecDeque<Instant>,
    /// Open loop: slots whose session is between messages (may hold stale
    /// keys; checked when taken).
    idle: Vec<usize>,
    /// No more messages will come (end of the run or budget spent).
    draining: bool,
}

/// Runs one worker to the end of the run. `body`: the body shared by every
/// message, built before the run (see [`MessageBuilder::shared_body`]).
pub fn run_worker(
    ctx: WorkerCtx,
    cfg: Arc<BlastConfig>,
    clock: RunClock,
    body: Option<Arc<Body>>,
    ticks: Sender<Tick>,
) -> WorkerResult {
    match Worker::new(&ctx, cfg, clock, body) {
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
    fn new(
        ctx: &WorkerCtx,
        cfg: Arc<BlastConfig>,
        clock: RunClock,
        body: Option<Arc<Body>>,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        ctx.stop.add_waker(waker);
        let (i, n) = (ctx.index as u64, ctx.count as u64);
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
            LoadModel::Open { messages_per_sec } => Some(Schedule::new(
                clock.start,
                messages_per_sec * f64::from(cfg.instance.1.max(1)),
                cfg.connections,
                ctx.index,
                ctx.count,
                cfg.instance,
            )),
        };
        // The open loop's connection share follows its schedule's slots (the
        // same split as `share`).
        let cap = share(cfg.connections, i, n) as usize;
        let mut builder = cfg.message_builder(ctx.index, ctx.count);
        if let Some(b) = body {
            builder.use_shared_body(b);
        }
        let mut messages_left = cfg.max_messages.map(|m| share(m, i, n));
        let mut sessions_left = cfg.max_sessions.map(|s| share(s, i, n));
        if schedule.is_some() {
            // Open loop: messages are scheduled, so a session budget is a
            // message budget of N × k.
            if let Some(s) = sessions_left.take() {
                let m = s.saturating_mul(cfg.messages_per_session);
                messages_left = Some(messages_left.map_or(m, |l| l.min(m)));
            }
        }
        Ok(Worker {
            messages_left,
            sessions_left,
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
            backlog: VecDeque::new(),
            idle: Vec::new(),
            draining: false,
        })
    }

    fn open(&self) -> bool {
        self.schedule.is_some()
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
        // Time spent waiting in epoll_wait during the measured window.
        let mut idle = Duration::ZERO;
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
                    open_connections: self.slots.len(),
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
                if self.open() {
                    self.take_due(now);
                } else {
                    self.start_closed(now);
                }
            } else if !self.draining {
                self.begin_drain(now);
            }
            if past_end && grace_until.is_none() {
                // Past --duration: in-flight sessions get a bounded grace.
                // A spent --messages/--sessions budget waits for them (each
                // phase is bounded by --timeout anyway).
                grace_until = Some(now + self.cfg.timeout.min(MAX_GRACE));
            }
            if self.result.fatal.is_some() {
                break;
            }
            if !starting && self.slots.is_empty() && self.backlog.is_empty() {
                break;
            }
            if grace_until.is_some_and(|g| now >= g) {
                break;
            }
            // How long to sleep: the next timer, message, tick or stop check.
            let mut wake = now + STOP_POLL_INTERVAL;
            if let Some(t) = self.timers.next() {
                wake = wake.min(t);
            }
            if starting {
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
            // The open loop measures how busy the thread is (one more clock
            // read per wakeup); the closed loop has no schedule to judge.
            let before_poll = if self.schedule.is_some() {
                Instant::now()
            } else {
                now
            };
            let timeout = wake.saturating_duration_since(before_poll);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.result.fatal = Some(format!("poll failed: {e}"));
                    break;
                }
            }
            let now = Instant::now();
            if measuring && self.schedule.is_some() {
                idle += now.saturating_duration_since(before_poll.max(self.clock.measure_start));
            }
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
        let window_end = self
            .clock
            .end
            .map_or(Instant::now(), |e| e.min(Instant::now()));
        let window = window_end.saturating_duration_since(self.clock.measure_start);
        self.result.open_loop.window = window;
        self.result.open_loop.busy = window.saturating_sub(idle);
        if let Some(s) = &self.schedule {
            // Due: the messages intended inside the window, until the end
            // (or the stop, or until the --messages budget ended the schedule).
            let last = self
                .clock
                .end
                .map_or(Instant::now(), |e| e.min(Instant::now()));
            self.result.open_loop.due = if self.budget_left() {
                s.due_between(self.clock.measure_start, last)
            } else {
                self.result.open_loop.sent + self.backlog.len() as u64
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
                open_connections: self.slots.len(),
            });
            self.result.intervals = tick_index + 1;
        }
        self.result.measurements = std::mem::take(&mut self.rec).finish();
    }

    /// The run ends (or its budget is spent): idle sessions quit, and no new
    /// message will be scheduled. Messages already waiting keep their place
    /// until the end of the grace period (a `--messages` run has no end).
    fn begin_drain(&mut self, now: Instant) {
        self.draining = true;
        if self.clock.end.is_some_and(|e| now >= e) {
            // A --duration run: what still waits was never sent.
            self.backlog.clear();
        }
        self.serve_backlog(now);
        for key in std::mem::take(&mut self.idle) {
            self.quit_if_idle(key, now);
        }
    }

    fn quit_if_idle(&mut self, key: usize, now: Instant) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        slot.idle_listed = false;
        if let Some(s) = slot.session.as_mut().filter(|s| s.is_idle()) {
            s.handle_no_more_messages(now);
            if self.after_events(key, now) != After::Closed {
                self.flush(key, now);
            }
        }
    }

    // ---- closed loop --------------------------------------------------------

    /// Starts sessions while fewer than the cap are in flight.
    fn start_closed(&mut self, now: Instant) {
        while self.slots.len() < self.cap && self.budget_left() {
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
            // Messages are made before the session's clock starts.
            let pending = (0..n)
                .map(|_| (self.builder.next_message(), None))
                .collect();
            self.connect(pending, false, now, Instant::now());
            if self.result.fatal.is_some() {
                return;
            }
        }
    }

    // ---- open loop ----------------------------------------------------------

    /// Takes every message due by `now` from the schedule and sends it, or
    /// queues it when no connection is free.
    fn take_due(&mut self, now: Instant) {
        loop {
            if !self.budget_left() {
                return;
            }
            let Some(s) = &mut self.schedule else { return };
            let next = s.peek();
            if next > now || self.clock.end.is_some_and(|e| next >= e) {
                return;
            }
            let intended = s.take();
            if let Some(left) = &mut self.messages_left {
                *left -= 1;
            }
            let measured = intended >= self.clock.measure_start;
            // FIFO: a message never overtakes one already waiting.
            if self.backlog.is_empty() && self.dispatch(intended, now) {
                if measured {
                    self.rec
                        .record_schedule_lag(us(now.saturating_duration_since(intended)));
                }
            } else {
                if measured {
                    self.result.open_loop.waited += 1;
                }
                self.backlog.push_back(intended);
                let waiting = self.backlog.len() as u64;
                let max = &mut self.result.open_loop.max_backlog;
                *max = (*max).max(waiting);
            }
            if self.result.fatal.is_some() {
                return;
            }
        }
    }

    /// Gives waiting messages to free connections, oldest first.
    fn serve_backlog(&mut self, now: Instant) {
        while let Some(&intended) = self.backlog.front() {
            if !self.dispatch(intended, now) {
                return;
            }
            self.backlog.pop_front();
        }
    }

    /// Sends the message intended at `intended` on a free connection: an
    /// idle session, else a new one. False if none is free.
    fn dispatch(&mut self, intended: Instant, now: Instant) -> bool {
        while let Some(key) = self.idle.pop() {
            let Some(slot) = self.slots.get_mut(key) else {
                continue;
            };
            if !slot.idle_listed {
                continue;
            }
            slot.idle_listed = false;
            let Some(session) = slot.session.as_mut().filter(|s| s.is_idle()) else {
                continue;
            };
            let msg = self.builder.next_message();
            session.push_message(now, msg, Some(intended));
            slot.given += 1;
            if slot.given >= self.cfg.messages_per_session {
                session.handle_no_more_messages(now);
            }
            self.count_sent(intended);
            self.flush(key, now);
            return true;
        }
        if self.slots.len() >= self.cap {
            return false;
        }
        let msg = self.builder.next_message();
        self.count_sent(intended);
        self.connect(vec![(msg, Some(intended))], true, intended, now);
        true
    }

    fn count_sent(&mut self, intended: Instant) {
        if intended >= self.clock.measure_start {
            self.result.open_loop.sent += 1;
        }
    }

    /// An open session just became free: it takes the oldest waiting
    /// message, or quits when it has carried `-k` or the run is ending, or
    /// waits for the next message.
    fn on_idle(&mut self, key: usize, now: Instant) {
        if !self.backlog.is_empty() {
            self.idle.push(key);
            if let Some(slot) = self.slots.get_mut(key) {
                slot.idle_listed = true;
            }
            self.serve_backlog(now);
            return;
        }
        if self.draining {
            self.quit_if_idle(key, now);
            return;
        }
        if let Some(slot) = self.slots.get_mut(key) {
            if !slot.idle_listed {
                slot.idle_listed = true;
                self.idle.push(key);
            }
        }
    }

    // ---- connections --------------------------------------------------------

    /// Opens a connection for `pending`; `open`: an open-loop session;
    /// `intended`: its intended start; `now`: its actual start.
    fn connect(
        &mut self,
        pending: Vec<(Message, Option<Instant>)>,
        open: bool,
        intended: Instant,
        now: Instant,
    ) {
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
        let given = pending.len() as u64;
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
                    self.count_all(given, Outcome::ConnectionError);
                    return;
                }
                entry.insert(Slot {
                    io: Io::Connecting(stream),
                    session: None,
                    pending,
                    given,
                    open,
                    intended,
                    started: now,
                    tls_started: None,
                    out_base: 0,
                    outcomes: 0,
                    idle_listed: false,
                    identity,
                });
                self.timers.schedule(key, now + self.cfg.timeout);
            }
            Err(e) if socket::is_addr_not_available(&e) => {
                self.count_all(given, Outcome::ConnectionError);
                self.result.fatal = Some(e.to_string());
                self.stop.stop();
            }
            Err(e) => {
                self.note_error(format!("connect: {e}"));
                self.count_all(given, Outcome::ConnectionError);
            }
        }
    }

    fn count_all(&mut self, n: u64, outcome: Outcome) {
        for _ in 0..n {
            self.rec.count_outcome(outcome);
        }
    }

    fn note_error(&mut self, e: String) {
        if self.result.errors.len() < 5 && !self.result.errors.contains(&e) {
            self.result.errors.push(e);
        }
    }

    /// Records a session-level latency measured by the driver: corrected
    /// (from the intended start) and uncorrected in open loop.
    fn record_driver_phase(
        &mut self,
        phase: Phase,
        open: bool,
        intended: Instant,
        started: Instant,
        now: Instant,
    ) {
        if open {
            self.rec
                .record(phase, us(now.saturating_duration_since(intended)));
            self.rec
                .record_uncorrected(phase, us(now.saturating_duration_since(started)));
        } else {
            self.rec
                .record(phase, us(now.saturating_duration_since(started)));
        }
    }

    /// Creates the slot's session once the connection (and implicit TLS) is
    /// up, and hands it the messages waiting for it.
    fn start_session(&mut self, key: usize, now: Instant) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        let pending = std::mem::take(&mut slot.pending);
        let client = Arc::clone(&self.cfg.client);
        let mut session = if slot.open {
            let mut s = ClientSession::open(client, now, Some(slot.intended));
            for (m, intended) in pending {
                s.push_message(now, m, intended);
            }
            if slot.given >= self.cfg.messages_per_session {
                s.handle_no_more_messages(now);
            }
            s
        } else {
            ClientSession::new(client, pending.into_iter().map(|(m, _)| m).collect(), now)
        };
        session.set_xclient(slot.identity.xclient.take());
        if let Io::Ready(conn) = &slot.io {
            slot.out_base = conn.app_bytes_in();
        }
        slot.session = Some(session);
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
            if let Err(e) = done {
                let given = slot.given;
                self.note_error(format!("connect: {e}"));
                self.close(key, now, Some((given, Outcome::ConnectionError)));
                return;
            }
            let (open, intended, started) = (slot.open, slot.intended, slot.started);
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
            let mut tls_failed = None;
            if let Some((config, name)) = &self.tls {
                if self.cfg.implicit_tls {
                    match conn.set_tls_implicit_client(Arc::clone(config), name.clone()) {
                        Ok(()) => slot.tls_started = Some(now),
                        Err(e) => tls_failed = Some(e),
                    }
                }
            }
            slot.io = Io::Ready(conn);
            self.record_driver_phase(Phase::Connect, open, intended, started, now);
            if let Some(e) = tls_failed {
                let given = self.slots.get(key).map_or(0, |s| s.given);
                self.note_error(format!("TLS: {e}"));
                self.close(key, now, Some((given, Outcome::ConnectionError)));
                return;
            }
            if self.slots.get(key).is_some_and(|s| s.tls_started.is_none()) {
                self.start_session(key, now);
            }
        }
        if readable {
            self.pump(key, now, read_closed);
        } else {
            self.flush(key, now);
        }
    }

    /// Reads, feeds the session, writes; closes when done.
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
            let mut tls_up = false;
            match conn.read() {
                Ok(ReadResult::Data) => {
                    // A short plaintext read(2) drained the socket: anything
                    // arriving later raises a new edge, so skip the read that
                    // would only return EAGAIN (one syscall per reply).
                    stop =
                        !read_closed && !conn.is_tls() && conn.plaintext().len() < READ_BUF_BYTES;
                    if let Some(s) = &mut slot.session {
                        s.handle_input(now, conn.plaintext());
                    }
                }
                Ok(ReadResult::TlsHandshakeDone) => {
                    if let Some(s) = &mut slot.session {
                        s.handle_tls_established(now);
                    } else if slot.tls_started.is_some() {
                        tls_up = true;
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
            if tls_up {
                // Implicit TLS is up: the handshake is this session's
                // `starttls` phase, and the session starts now.
                let (open, intended, t0) = (slot.open, slot.intended, slot.tls_started);
                if let Some(t0) = t0 {
                    self.record_driver_phase(Phase::StartTls, open, intended, t0, now);
                }
                self.start_session(key, now);
            }
            if let Some(e) = error {
                self.note_error(e);
            }
            if failure.is_some() {
                break;
            }
            match self.after_events(key, now) {
                After::Closed => return,
                After::Busy | After::Idle => {}
            }
            if stop {
                break;
            }
        }
        if let Some(f) = failure {
            let given = self.slots.get(key).map_or(0, |s| s.given);
            self.note_error(f);
            self.close(key, now, Some((given, Outcome::ConnectionError)));
            return;
        }
        self.flush(key, now);
    }

    /// Handles the session's events, then closes the slot (done) or tells
    /// the open loop that it is free.
    fn after_events(&mut self, key: usize, now: Instant) -> After {
        let after = self.process_events(key, now);
        match after {
            After::Closed => {}
            After::Idle => {
                if !self.slots.get(key).is_some_and(|s| s.idle_listed) {
                    self.flush(key, now);
                    self.on_idle(key, now);
                }
            }
            After::Busy => {}
        }
        after
    }

    /// Drains session events; closes the slot when the session is done.
    fn process_events(&mut self, key: usize, now: Instant) -> After {
        let Some(slot) = self.slots.get_mut(key) else {
            return After::Closed;
        };
        let Some(session) = &mut slot.session else {
            return After::Busy;
        };
        let Io::Ready(conn) = &mut slot.io else {
            return After::Busy;
        };
        let open = slot.open;
        let mut done = false;
        while let Some(ev) = session.poll_event() {
            match ev {
                ClientEvent::Phase {
                    phase,
                    latency,
                    corrected,
                } => match corrected {
                    Some(c) if open => {
                        self.rec.record(phase, us(c));
                        self.rec.record_uncorrected(phase, us(latency));
                    }
                    _ => self.rec.record(phase, us(latency)),
                },
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
                    outcome,
                    recipients_accepted,
                    bytes,
                    ..
                } => {
                    slot.outcomes += 1;
                    self.rec.count_outcome(outcome);
                    self.rec.count_recipients(u64::from(recipients_accepted));
                    if outcome == Outcome::Accepted {
                        self.rec.count_bytes(bytes);
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
                slot.outcomes, slot.given,
                "every message given to a session has one outcome"
            );
            self.close(key, now, None);
            return After::Closed;
        }
        if session.is_idle() {
            After::Idle
        } else {
            After::Busy
        }
    }

    /// Writes what the session has to send (in pieces of at most
    /// `OUT_CHUNK_BYTES`), tells it what left, and re-arms its timer.
    fn flush(&mut self, key: usize, now: Instant) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        let Io::Ready(conn) = &mut slot.io else {
            return;
        };
        let flushed = loop {
            if let Some(session) = &mut slot.session {
                if !conn.has_pending_output() {
                    self.out.clear();
                    session.poll_transmit_max(now, &mut self.out, OUT_CHUNK_BYTES);
                    if !self.out.is_empty() {
                        conn.write(&self.out);
                    }
                }
            }
            // The stream stays registered for READABLE | WRITABLE,
            // edge-triggered, from connect to close: no epoll_ctl per state
            // change. A partial flush set SOCK_NOSPACE, so the kernel reports
            // the writable edge when room frees up.
            let flushed = conn.flush();
            let Some(session) = &mut slot.session else {
                break flushed;
            };
            // Stamp with the time the bytes actually left: writing a large
            // body takes a while within one turn of the loop.
            session.handle_written(Instant::now(), conn.app_bytes_sent() - slot.out_base);
            if !matches!(flushed, Ok(true)) || !session.wants_transmit() {
                break flushed;
            }
        };
        if let Err(e) = flushed {
            self.note_error(format!("I/O: {e}"));
            let Some(slot) = self.slots.get_mut(key) else {
                return;
            };
            match &mut slot.session {
                Some(s) => {
                    s.handle_close(now);
                    let _ = self.after_events(key, now);
                }
                None => {
                    let given = slot.given;
                    self.close(key, now, Some((given, Outcome::ConnectionError)));
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
                if self.after_events(key, now) != After::Closed {
                    self.flush(key, now);
                }
            }
            None => {
                let given = slot.given;
                let what = if matches!(slot.io, Io::Connecting(_)) {
                    "connect"
                } else {
                    "TLS handshake"
                };
                self.note_error(format!("timeout waiting for the {what}"));
                self.close(key, now, Some((given, Outcome::Timeout)));
            }
        }
    }

    /// Ends a slot. `fail`: count this many messages with this outcome (the
    /// session never started). A freed connection serves the backlog.
    fn close(&mut self, key: usize, now: Instant, fail: Option<(u64, Outcome)>) {
        if !self.slots.contains(key) {
            return;
        }
        let slot = self.slots.remove(key);
        self.timers.cancel(key);
        match (fail, &slot.session) {
            // Only for failures before the session existed (connect, TLS):
            // a session counts its own outcomes.
            (Some((n, outcome)), None) => self.count_all(n, outcome),
            (_, Some(_)) => {
                // A TLS session is one whose handshake completed.
                let (tls, resumed) = match &slot.io {
                    Io::Ready(c) => (c.tls_established(), c.tls_resumed()),
                    _ => (false, false),
                };
                self.rec.count_session(tls);
                if resumed {
                    self.rec.count_tls_resumed();
                }
                self.record_driver_phase(
                    Phase::Session,
                    slot.open,
                    slot.intended,
                    slot.started,
                    now,
                );
            }
            (None, None) => {}
        }
        // Dropping the stream closes it (RST with --abort-close); the kernel
        // removes it from the epoll set.
        drop(slot);
        if !self.backlog.is_empty() {
            self.serve_backlog(now);
        }
    }
}
