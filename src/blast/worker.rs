//! One blaster thread: a [`BlastHandler`] driven by the thread's backend
//! (whichever the run's [`driver::ThreadTransport`] names: epoll, io_uring
//! or AF_XDP), with its own connections ([`BlastConn`], the
//! per-connection logic with no I/O type in it), message builder and
//! [`Recorder`]; it shares only the stop signal with the others.
//!
//! Once per turn of the loop ([`Handler::on_tick`]): fold the warmup away
//! when it ends, hand a snapshot to the main thread once a second, start
//! what is due; the backend then delivers the events of the connections.
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
//! A connection that ends without a session (refused, timed out, its
//! implicit TLS handshake failed) is one connection without a session and
//! one connection error (or timeout), and its messages are not attempted;
//! its slot then backs off before connecting again: 10 ms, doubling with
//! every such failure of the slot in a row up to 1 s, back to none once a
//! connection of it gets a session. A slot backing off counts against
//! `-c`, so a dead target costs a bounded number of connects, never a
//! spin.
//!
//! Invariants:
//! - Every message given to a session gets exactly one outcome counted,
//!   whether the session ends, fails or times out; messages of sessions
//!   aborted by the stop (Ctrl-C, end of the grace period) are not counted
//!   at all, so `messages_attempted + connections_without_session` always
//!   equals the sum of the outcome and error counters.
//! - Phases are timed by the session from bytes actually written (every
//!   flush is reported with `handle_written`); in open loop each phase is
//!   also recorded corrected, from the intended time.
//! - Bodies are built before the run ([`MessageBuilder::shared_body`]) or
//!   before the session that carries them starts; never inside a phase.
//! - No hot-path lock or atomic beyond the relaxed stop-flag load.

use std::collections::VecDeque;
use std::io;
use std::net::IpAddr;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::net::backend::Setup;
use crate::net::backend::{Backend, Closed, ConnId, ConnectOpts, Handler, Tick, TlsState};
use crate::net::driver;
use crate::net::runtime::{StopSignal, WorkerCtx};
use crate::net::{socket, tls};
use crate::smtp::client::Message;
use crate::smtp::{CommandKind, Outcome, Phase};
use crate::stats::{IntervalSnapshot, Measurements, NumberSet, Recorder};

use super::config::{share, BlastConfig, LoadModel};
use super::conn::{BlastConn, ConnConfig, ConnCtx, Observer, State};
use super::message::{Body, MessageBuilder};
use super::scenario::ScenarioRun;
use super::schedule::Schedule;

/// The thread's plaintext read buffer (SMTP replies are small).
const READ_BUF_BYTES: usize = 16 * 1024;
/// Longest the stop waits for in-flight sessions after `--duration` ends.
const MAX_GRACE: Duration = Duration::from_secs(10);
/// A connection slot whose connection ended without a session waits this
/// long before its next connect, doubling with every such failure in a
/// row up to [`BACKOFF_MAX`]; a session resets it.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The next wait of a slot whose last wait was `last` (zero: none).
fn next_backoff(last: Duration) -> Duration {
    if last.is_zero() {
        BACKOFF_FIRST
    } else {
        (last * 2).min(BACKOFF_MAX)
    }
}

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
pub struct ThreadSnapshot {
    pub thread: usize,
    /// Interval number (second `index` after `measure_start`).
    pub index: u64,
    pub snapshot: IntervalSnapshot,
    /// Connections open when the snapshot was taken (live metrics).
    pub open_connections: usize,
    /// Open loop: measured messages given to a connection in the interval
    /// (the timeline's achieved rate).
    pub sent: u64,
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
    /// Time of the measured window this thread was not waiting for events,
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
    /// Open loop: what the schedule did.
    pub open_loop: OpenLoopCounts,
    /// Whether the stop came from the signal (Ctrl-C) rather than a limit.
    pub interrupted: bool,
    /// Intervals sent (the last one may be partial).
    pub intervals: u64,
    /// `--trace`: the numbers of the messages accepted.
    pub accepted: NumberSet,
    /// `--scenario`: each profile's measurements (empty without one).
    pub profiles: Vec<Measurements>,
}

fn us(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

/// The blaster's [`Observer`]: the thread's recorder and its first errors.
struct Obs {
    rec: Recorder,
    errors: Vec<String>,
    /// `--trace`: the numbers of the messages accepted.
    accepted: NumberSet,
    /// `--scenario`: one recorder per profile (empty without one), and the
    /// profile of the connection being handled.
    profiles: Vec<Recorder>,
    cur: usize,
}

impl Observer for Obs {
    fn phase(&mut self, phase: Phase, latency: Duration, corrected: Option<Duration>) {
        match corrected {
            Some(c) => {
                self.rec.record(phase, us(c));
                self.rec.record_uncorrected(phase, us(latency));
            }
            None => self.rec.record(phase, us(latency)),
        }
        if let Some(p) = self.profiles.get_mut(self.cur) {
            p.record(phase, us(corrected.unwrap_or(latency)));
        }
    }

    fn reply(&mut self, command: CommandKind, code: u16) {
        self.rec.count_reply(command, code);
    }

    fn outcome(&mut self, outcome: Outcome, recipients_accepted: u32, bytes: u64) {
        self.rec.count_outcome(outcome);
        // Recipients and bytes of accepted messages only (as the sink).
        if outcome == Outcome::Accepted {
            self.rec.count_recipients(u64::from(recipients_accepted));
            self.rec.count_bytes(bytes);
        }
        if let Some(p) = self.profiles.get_mut(self.cur) {
            p.count_outcome(outcome);
            if outcome == Outcome::Accepted {
                p.count_recipients(u64::from(recipients_accepted));
                p.count_bytes(bytes);
            }
        }
    }

    fn no_session(&mut self, outcome: Outcome) {
        self.rec.count_connection_without_session();
        self.rec.count_session_error(outcome);
        if let Some(p) = self.profiles.get_mut(self.cur) {
            p.count_connection_without_session();
            p.count_session_error(outcome);
        }
    }

    fn error(&mut self, e: String) {
        self.rec.count_failure(&e);
        if self.errors.len() < 5 && !self.errors.contains(&e) {
            self.errors.push(e);
        }
    }

    fn refused(&mut self, reason: String) {
        self.rec.count_failure(&reason);
    }

    fn accepted(&mut self, tag: u64) {
        self.accepted.0.insert(tag);
    }

    fn session_end(&mut self, tls: TlsState) {
        // A TLS session is one whose handshake completed.
        self.rec.count_session(tls.established);
        if tls.resumed {
            self.rec.count_tls_resumed();
        }
        if tls.established {
            self.rec.count_tls_negotiated(tls.suite, tls.group);
        }
        if let Some(p) = self.profiles.get_mut(self.cur) {
            p.count_session(tls.established);
        }
    }
}

/// The blaster's handler of one thread (see the module doc).
struct BlastHandler {
    cfg: Arc<BlastConfig>,
    conn_cfg: ConnConfig,
    clock: RunClock,
    index: usize,
    threads: usize,
    stop: StopSignal,
    obs: Obs,
    out: Vec<u8>,
    /// Per connection, indexed by [`ConnId`].
    conns: Vec<Option<BlastConn>>,
    open_conns: usize,
    builder: MessageBuilder,
    /// `--scenario`: the profiles' settings and builders on this thread.
    scen: Option<ScenarioRun>,
    /// The profile of the session `connect` opens next.
    next_profile: usize,
    schedule: Option<Schedule>,
    cap: usize,
    messages_left: Option<u64>,
    sessions_left: Option<u64>,
    connects: u64,
    result: WorkerResult,
    /// Open loop: intended times of due messages waiting for a connection.
    backlog: VecDeque<Instant>,
    /// Open loop: connections between messages (may hold stale ids;
    /// checked when taken).
    idle: Vec<ConnId>,
    /// Per connection (by [`ConnId`]): the backoff its slot last waited
    /// (zero after a session).
    slot_backoff: Vec<Duration>,
    /// Slots backing off after a connection without a session: when each
    /// may connect again, and the wait it served. They count against the
    /// connection cap.
    cooling: Vec<(Instant, Duration)>,
    /// Slots whose backoff ended, with the wait they served (the next
    /// connect takes one, so a slot failing in a row waits longer).
    cooled: Vec<Duration>,
    /// No more messages will come (end of the run or budget spent).
    draining: bool,
    /// Measured messages sent since the last snapshot.
    sent_in_interval: u64,
    measuring: bool,
    tick_index: u64,
    next_tick: Instant,
    grace_until: Option<Instant>,
    /// `Backend::waited` when the measured window began.
    waited_at_start: Duration,
    snapshots: Sender<ThreadSnapshot>,
}

/// Runs one worker to the end of the run. `body`: the body shared by every
/// message, built before the run (see [`MessageBuilder::shared_body`]).
pub fn run_worker(
    ctx: WorkerCtx,
    cfg: Arc<BlastConfig>,
    clock: RunClock,
    body: Option<Arc<Body>>,
    snapshots: Sender<ThreadSnapshot>,
    transport: driver::ThreadTransport,
) -> WorkerResult {
    let fail = |e: String| {
        ctx.stop.stop();
        WorkerResult {
            fatal: Some(format!("worker {}: {e}", ctx.index)),
            ..Default::default()
        }
    };
    let setup = Setup {
        listeners: Vec::new(),
        stop: ctx.stop.clone(),
        read_buf_bytes: READ_BUF_BYTES,
        track_waiting: matches!(cfg.model, LoadModel::Open { .. }),
    };
    let mut h = match BlastHandler::new(&ctx, cfg, clock, body, snapshots) {
        Ok(h) => h,
        Err(e) => return fail(e.to_string()),
    };
    match driver::run(transport, setup, &mut h) {
        Ok(stats) => h.finish(stats.waited),
        Err(e) => {
            h.result
                .fatal
                .get_or_insert(format!("event loop failed: {e}"));
            h.finish(Duration::ZERO)
        }
    }
}

impl BlastHandler {
    fn new(
        ctx: &WorkerCtx,
        cfg: Arc<BlastConfig>,
        clock: RunClock,
        body: Option<Arc<Body>>,
        snapshots: Sender<ThreadSnapshot>,
    ) -> io::Result<Self> {
        let (i, n) = (ctx.index as u64, ctx.count as u64);
        let tls = if cfg.uses_tls() {
            let verify = match &cfg.tls_ca {
                Some(p) => tls::ClientVerify::CaFile(p.clone()),
                None => tls::ClientVerify::Off,
            };
            let resumption = if cfg.tls_resume { 256 } else { 0 };
            let config = tls::client_config(&verify, resumption, &cfg.tls_choice)
                .map_err(io::Error::other)?;
            let name = tls::server_name(&cfg.target_host).map_err(io::Error::other)?;
            Some((config, name))
        } else {
            None
        };
        let schedule = cfg.profile().map(|profile| {
            Schedule::new(
                clock.start,
                profile,
                cfg.connections,
                ctx.index,
                ctx.count,
                cfg.instance,
            )
        });
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
        let conn_cfg = ConnConfig {
            client: Arc::clone(&cfg.client),
            tls,
            implicit_tls: cfg.implicit_tls,
            proxy: cfg.proxy,
            target: cfg.target,
            timeout: cfg.timeout,
            messages_per_session: cfg.messages_per_session,
        };
        let scen = cfg
            .scenario
            .as_ref()
            .map(|s| ScenarioRun::new(&cfg, s, &conn_cfg, ctx.index, ctx.count));
        let profiles = cfg.scenario.as_ref().map_or(0, |s| s.profiles.len());
        Ok(BlastHandler {
            scen,
            next_profile: 0,
            messages_left,
            sessions_left,
            conn_cfg,
            next_tick: clock.measure_start + Duration::from_secs(1),
            clock,
            index: ctx.index,
            threads: ctx.count,
            stop: ctx.stop.clone(),
            obs: Obs {
                rec: Recorder::new(),
                errors: Vec::new(),
                accepted: NumberSet::default(),
                profiles: (0..profiles).map(|_| Recorder::new()).collect(),
                cur: 0,
            },
            out: Vec::with_capacity(4096),
            conns: Vec::with_capacity(cap.min(65_536)),
            open_conns: 0,
            builder,
            schedule,
            cap,
            connects: 0,
            result: WorkerResult::default(),
            backlog: VecDeque::new(),
            idle: Vec::new(),
            slot_backoff: Vec::new(),
            cooling: Vec::new(),
            cooled: Vec::new(),
            draining: false,
            sent_in_interval: 0,
            measuring: false,
            tick_index: 0,
            grace_until: None,
            waited_at_start: Duration::ZERO,
            snapshots,
            cfg,
        })
    }

    fn open(&self) -> bool {
        self.schedule.is_some()
    }

    /// Connection slots taken: open connections and slots backing off.
    fn slots_in_use(&self) -> usize {
        self.open_conns + self.cooling.len()
    }

    /// The connection `id` (gone, or never opened: `id` None) ended
    /// without a session: its slot backs off before the next connect.
    fn back_off(&mut self, id: Option<ConnId>, last: Duration, now: Instant) {
        let last = id
            .and_then(|i| self.slot_backoff.get(i).copied())
            .unwrap_or(last);
        let wait = next_backoff(last);
        self.cooling.push((now + wait, wait));
    }

    /// Slots whose backoff has ended become free.
    fn cool(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.cooling.len() {
            if self.cooling[i].0 <= now {
                let (_, wait) = self.cooling.swap_remove(i);
                self.cooled.push(wait);
            } else {
                i += 1;
            }
        }
    }

    fn budget_left(&self) -> bool {
        self.messages_left != Some(0) && self.sessions_left != Some(0) && self.cap > 0
    }

    /// Runs `f` on connection `id` with what it works with.
    fn with_conn<B: Backend, R>(
        &mut self,
        be: &mut B,
        id: ConnId,
        f: impl FnOnce(&mut BlastConn, &mut ConnCtx<'_, B, Obs>) -> R,
    ) -> Option<R> {
        let c = self.conns.get_mut(id)?.as_mut()?;
        let cfg = match &self.scen {
            None => &self.conn_cfg,
            Some(s) => {
                self.obs.cur = s.profile_of(id);
                &s.conn_cfgs[self.obs.cur]
            }
        };
        let mut cx = ConnCtx {
            cfg,
            be,
            obs: &mut self.obs,
            out: &mut self.out,
        };
        Some(f(c, &mut cx))
    }

    /// What a callback left the connection as.
    fn after<B: Backend>(&mut self, be: &mut B, id: ConnId, state: Option<State>, now: Instant) {
        if state == Some(State::Idle) && !self.conns[id].as_ref().is_some_and(|c| c.idle_listed) {
            self.on_idle(be, id, now);
        }
    }

    /// The measured results, once the loop has ended.
    fn finish(mut self, waited_total: Duration) -> WorkerResult {
        let now = Instant::now();
        if let Some(s) = &self.schedule {
            // Due: the messages intended inside the window, until the end
            // (or the stop, or until the --messages budget ended the schedule).
            let last = self.clock.end.map_or(now, |e| e.min(now));
            self.result.open_loop.due = if self.budget_left() {
                s.due_between(self.clock.measure_start, last)
            } else {
                self.result.open_loop.sent + self.backlog.len() as u64
            };
            let window = last.saturating_duration_since(self.clock.measure_start);
            let waited = waited_total.saturating_sub(self.waited_at_start);
            self.result.open_loop.window = window;
            self.result.open_loop.busy = window.saturating_sub(waited);
        }
        if self.measuring {
            let start_offset = Duration::from_secs(self.tick_index);
            let partial = now.saturating_duration_since(self.next_tick - Duration::from_secs(1));
            let snap = self
                .obs
                .rec
                .take_interval(start_offset, partial.min(Duration::from_secs(1)));
            let _ = self.snapshots.send(ThreadSnapshot {
                thread: self.index,
                index: self.tick_index,
                snapshot: snap,
                open_connections: self.open_conns,
                sent: std::mem::take(&mut self.sent_in_interval),
            });
            self.result.intervals = self.tick_index + 1;
        }
        self.result.errors = std::mem::take(&mut self.obs.errors);
        self.result.accepted = std::mem::take(&mut self.obs.accepted);
        self.result.measurements = std::mem::take(&mut self.obs.rec).finish();
        self.result.profiles = self.obs.profiles.drain(..).map(Recorder::finish).collect();
        self.result
    }

    /// The run ends (or its budget is spent): idle sessions quit, and no new
    /// message will be scheduled. Messages already waiting keep their place
    /// until the end of the grace period (a `--messages` run has no end).
    fn begin_drain<B: Backend>(&mut self, be: &mut B, now: Instant) {
        self.draining = true;
        if self.clock.end.is_some_and(|e| now >= e) {
            // A --duration run: what still waits was never sent.
            self.backlog.clear();
        }
        self.serve_backlog(be, now);
        for id in std::mem::take(&mut self.idle) {
            self.quit_if_idle(be, id, now);
        }
    }

    fn quit_if_idle<B: Backend>(&mut self, be: &mut B, id: ConnId, now: Instant) {
        let Some(Some(c)) = self.conns.get_mut(id) else {
            return;
        };
        c.idle_listed = false;
        if c.session().is_some_and(|s| s.is_idle()) {
            self.with_conn(be, id, |c, io| c.no_more(io, id, now));
        }
    }

    // ---- closed loop --------------------------------------------------------

    /// Starts sessions while fewer than the cap are in flight.
    fn start_closed<B: Backend>(&mut self, be: &mut B) {
        while self.slots_in_use() < self.cap && self.budget_left() {
            let (p, k) = match &mut self.scen {
                None => (0, self.cfg.messages_per_session),
                Some(s) => {
                    let p = s.pick();
                    (p, s.messages_per_session(p))
                }
            };
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
            let pending = (0..n).map(|_| (self.message_for(p), None)).collect();
            self.next_profile = p;
            let now = Instant::now();
            self.connect(be, pending, false, now, now);
            if self.result.fatal.is_some() {
                return;
            }
        }
    }

    // ---- open loop ----------------------------------------------------------

    /// Takes every message due by `now` from the schedule and sends it, or
    /// queues it when no connection is free.
    fn take_due<B: Backend>(&mut self, be: &mut B, now: Instant) {
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
            if self.backlog.is_empty() && self.dispatch(be, intended, now) {
                if measured {
                    self.obs
                        .rec
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
    fn serve_backlog<B: Backend>(&mut self, be: &mut B, now: Instant) {
        while let Some(&intended) = self.backlog.front() {
            if !self.dispatch(be, intended, now) {
                return;
            }
            self.backlog.pop_front();
        }
    }

    /// Sends the message intended at `intended` on a free connection: an
    /// idle session, else a new one. False if none is free.
    fn dispatch<B: Backend>(&mut self, be: &mut B, intended: Instant, now: Instant) -> bool {
        while let Some(id) = self.idle.pop() {
            let Some(Some(c)) = self.conns.get_mut(id) else {
                continue;
            };
            if !c.idle_listed {
                continue;
            }
            c.idle_listed = false;
            if !c.session().is_some_and(|s| s.is_idle()) {
                continue;
            }
            let p = self.scen.as_ref().map_or(0, |s| s.profile_of(id));
            let msg = self.message_for(p);
            self.count_sent(intended);
            let st = self.with_conn(be, id, |c, io| c.push(io, id, now, msg, intended));
            self.after(be, id, st, now);
            return true;
        }
        if self.slots_in_use() >= self.cap {
            return false;
        }
        self.next_profile = self.scen.as_mut().map_or(0, |s| s.pick());
        let msg = self.message_for(self.next_profile);
        self.count_sent(intended);
        self.connect(be, vec![(msg, Some(intended))], true, intended, now);
        true
    }

    /// The next message of a session of profile `p` (0 without a scenario).
    fn message_for(&mut self, p: usize) -> Message {
        match &mut self.scen {
            None => self.builder.next_message(),
            Some(s) => s.next_message(p),
        }
    }

    fn count_sent(&mut self, intended: Instant) {
        if intended >= self.clock.measure_start {
            self.result.open_loop.sent += 1;
            self.sent_in_interval += 1;
        }
    }

    /// An open session just became free: it takes the oldest waiting
    /// message, or quits when the run is ending, or waits for the next one.
    fn on_idle<B: Backend>(&mut self, be: &mut B, id: ConnId, now: Instant) {
        if !self.backlog.is_empty() {
            if let Some(Some(c)) = self.conns.get_mut(id) {
                c.idle_listed = true;
                self.idle.push(id);
            }
            self.serve_backlog(be, now);
            return;
        }
        if self.draining {
            self.quit_if_idle(be, id, now);
            return;
        }
        if let Some(Some(c)) = self.conns.get_mut(id) {
            if !c.idle_listed {
                c.idle_listed = true;
                self.idle.push(id);
            }
        }
    }

    // ---- connections --------------------------------------------------------

    /// Opens a connection for `pending`; `open`: an open-loop session;
    /// `intended`: its intended start; `now`: its actual start.
    fn connect<B: Backend>(
        &mut self,
        be: &mut B,
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
        self.obs.cur = self.next_profile;
        // The slot's backoff so far (zero for a slot that is not failing).
        let last_wait = self.cooled.pop().unwrap_or_default();
        let opts = ConnectOpts {
            source_ip,
            abort_close: self.cfg.abort_close,
        };
        let connected = match &self.cfg.unix {
            Some(path) => be.connect_unix(path, opts),
            None => be.connect(self.cfg.target, opts),
        };
        match connected {
            Ok(id) => {
                if self.conns.len() <= id {
                    self.conns.resize_with(id + 1, || None);
                }
                if self.slot_backoff.len() <= id {
                    self.slot_backoff.resize(id + 1, Duration::ZERO);
                }
                self.slot_backoff[id] = last_wait;
                if let Some(s) = &mut self.scen {
                    s.set_profile(id, self.next_profile);
                }
                let mut c = BlastConn::new(pending, open, intended, now, identity);
                c.arm(be, id, now + self.cfg.timeout);
                self.conns[id] = Some(c);
                self.open_conns += 1;
            }
            Err(e) if socket::is_addr_not_available(&e) => {
                self.obs.no_session(Outcome::ConnectionError);
                self.result.fatal = Some(e.to_string());
                self.stop.stop();
            }
            Err(e) => {
                self.obs.error(format!("connect: {e}"));
                self.obs.no_session(Outcome::ConnectionError);
                self.back_off(None, last_wait, now);
            }
        }
    }

    /// A connection slot is free again (closed, or its connect failed).
    fn freed<B: Backend>(&mut self, be: &mut B, id: ConnId, now: Instant) {
        if let Some(slot) = self.conns.get_mut(id) {
            if slot.take().is_some() {
                self.open_conns -= 1;
            }
        }
        if !self.backlog.is_empty() {
            self.serve_backlog(be, now);
        }
    }
}

impl Handler for BlastHandler {
    fn on_connected<B: Backend>(
        &mut self,
        be: &mut B,
        now: Instant,
        id: ConnId,
        result: io::Result<()>,
    ) {
        let failed = result.is_err();
        if let Err(e) = &result {
            // Out of ports reported by the connect's completion (io_uring
            // connects on the ring) ends the run as it does from `connect`.
            if socket::is_addr_not_available(e) && self.result.fatal.is_none() {
                self.result.fatal = Some(e.to_string());
                self.stop.stop();
            }
        }
        let st = self.with_conn(be, id, |c, io| c.connected(io, id, now, result));
        if failed {
            // The id is gone: no on_closed follows.
            self.back_off(Some(id), Duration::ZERO, now);
            self.freed(be, id, now);
        } else {
            self.after(be, id, st, now);
        }
    }

    fn on_tls_ready<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId) {
        let st = self.with_conn(be, id, |c, io| c.tls_ready(io, id, now));
        self.after(be, id, st, now);
    }

    fn on_input<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId, plain: &[u8]) {
        let st = self.with_conn(be, id, |c, io| c.input(io, id, now, plain));
        self.after(be, id, st, now);
    }

    fn on_peer_closed<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId) {
        let st = self.with_conn(be, id, |c, io| c.peer_closed(io, id, now));
        self.after(be, id, st, now);
    }

    fn on_written<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId) {
        let st = self.with_conn(be, id, |c, io| c.written(io, id));
        self.after(be, id, st, now);
    }

    fn on_timer<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId) {
        let st = self.with_conn(be, id, |c, io| c.timer(io, id, now));
        self.after(be, id, st, now);
    }

    fn on_closed<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId, why: Closed) {
        let stopped = matches!(why, Closed::Stopped);
        if let Some(c) = self.conns.get_mut(id).and_then(Option::take) {
            self.open_conns -= 1;
            if c.session().is_none() && !stopped {
                // No session (implicit TLS failed, or closed before it).
                self.back_off(Some(id), Duration::ZERO, now);
            }
            if let Some(s) = &self.scen {
                self.obs.cur = s.profile_of(id);
            }
            c.closed(&mut self.obs, now, why);
        }
        if !stopped && !self.backlog.is_empty() {
            self.serve_backlog(be, now);
        }
    }

    fn on_tick<B: Backend>(&mut self, be: &mut B, now: Instant) -> Tick {
        if !self.measuring && now >= self.clock.measure_start {
            // Everything before this instant was warmup.
            self.measuring = true;
            self.obs.rec = Recorder::new();
            self.obs
                .profiles
                .iter_mut()
                .for_each(|r| *r = Recorder::new());
            self.waited_at_start = be.waited();
        }
        while self.measuring && now >= self.next_tick {
            let snap = self
                .obs
                .rec
                .take_interval(Duration::from_secs(self.tick_index), Duration::from_secs(1));
            let _ = self.snapshots.send(ThreadSnapshot {
                thread: self.index,
                index: self.tick_index,
                snapshot: snap,
                open_connections: self.open_conns,
                sent: std::mem::take(&mut self.sent_in_interval),
            });
            self.tick_index += 1;
            self.next_tick += Duration::from_secs(1);
        }
        let stop = Tick {
            wake_at: None,
            stop: true,
        };
        if self.stop.is_stopped() {
            self.result.interrupted = self.result.fatal.is_none();
            return stop;
        }
        if !self.cooling.is_empty() {
            self.cool(now);
            if !self.backlog.is_empty() {
                self.serve_backlog(be, now);
            }
        }
        let past_end = self.clock.end.is_some_and(|e| now >= e);
        let starting = !past_end && self.budget_left();
        if starting {
            if self.open() {
                self.take_due(be, now);
            } else {
                self.start_closed(be);
            }
        } else if !self.draining {
            if self.open() && self.budget_left() {
                // A wake-up late past the end: messages intended before it
                // are still taken (late, and their lag says so).
                self.take_due(be, now);
            }
            self.begin_drain(be, now);
        }
        if past_end && self.grace_until.is_none() {
            // Past --duration: in-flight sessions get a bounded grace.
            // A spent --messages/--sessions budget waits for them (each
            // phase is bounded by --timeout anyway).
            self.grace_until = Some(now + self.cfg.timeout.min(MAX_GRACE));
        }
        if self.result.fatal.is_some()
            || (!starting && self.open_conns == 0 && self.backlog.is_empty())
            || self.grace_until.is_some_and(|g| now >= g)
        {
            return stop;
        }
        // When to come back: the next message, tick, end or grace.
        let mut wake = if self.measuring {
            self.next_tick
        } else {
            self.clock.measure_start
        };
        if starting {
            if let Some(s) = &self.schedule {
                wake = wake.min(s.peek());
            }
            // A slot's backoff ends.
            if let Some(&(at, _)) = self.cooling.iter().min_by_key(|c| c.0) {
                wake = wake.min(at);
            }
        }
        if let Some(e) = self.clock.end {
            if now < e {
                wake = wake.min(e);
            }
        }
        if let Some(g) = self.grace_until {
            wake = wake.min(g);
        }
        Tick {
            wake_at: Some(wake),
            stop: false,
        }
    }
}
