//! One sink worker: a pinned thread whose backend (whichever the run's
//! [`driver::Transport`] opened: epoll, io_uring or AF_XDP) owns its
//! `SO_REUSEPORT` listeners and connections and drives a
//! [`SinkHandler`]: per connection a [`SinkConn`] (the role logic, with no
//! I/O type in it), per thread the statistics, the stop conditions and the
//! once-a-second snapshot for the main thread.
//!
//! Invariants:
//! - Nothing shared is touched per message: the only cross-thread traffic is
//!   the stop flag (one relaxed load per loop iteration), one snapshot per
//!   second on a channel, and only with `--exit-after-sessions` one atomic
//!   add per loop iteration that saw work, with `--exit-after-messages` one
//!   per message about to be accepted (so the limit is exact). The greylist table is locked once per
//!   RCPT, and only when a greylist rule exists. Each thread keeps its own
//!   copy of the server and TLS configs.
//! - Over `--max-connections` a connection gets `421` and is closed at once.
//! - On stop the listeners close at once; connections still open after the
//!   grace period end then, each counted once.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::AuthPolicy;
use crate::net::backend::Setup;
use crate::net::backend::{Backend, Closed, ConnId, Handler, Tick};
use crate::net::driver;
use crate::net::runtime::{StopSignal, WorkerCtx};
use crate::smtp::server::ServerConfig;
use crate::smtp::CommandKind;
use crate::stats::{IntervalSnapshot, Measurements, Recorder, TraceRecorder};

use super::capture::Capture;
use super::conn::{MessageLimit, SinkConn, ThreadCtx};
use super::faults::{Greylist, ThreadFaults};

/// Plaintext read buffer of a thread.
const READ_BUF_BYTES: usize = 64 * 1024;
/// Interval between snapshots sent to the main thread.
pub const TICK: Duration = Duration::from_secs(1);

/// What every worker shares (read-only, apart from the atomics used only
/// with `--exit-after-*`).
pub struct Shared {
    pub stop: StopSignal,
    pub server: Arc<ServerConfig>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub auth: Option<AuthPolicy>,
    pub faults: Vec<super::faults::FaultSpec>,
    pub greylist: Arc<Greylist>,
    pub seed: u64,
    pub capture: Option<std::path::PathBuf>,
    pub verify: bool,
    pub trace: bool,
    pub max_conns_per_thread: usize,
    pub exit_after_messages: Option<u64>,
    /// `--max-rate`: the turns every thread's final replies wait for.
    pub pacer: Option<Arc<super::pacer::Pacer>>,
    pub exit_after_sessions: Option<u64>,
    /// `--exit-after-messages` slots claimed (see `conn::MessageLimit`).
    pub messages_done: Arc<AtomicU64>,
    pub sessions_done: AtomicU64,
    pub started: Instant,
    pub duration: Option<Duration>,
    pub grace: Duration,
    /// The run's backend, opened once for every thread.
    pub transport: driver::Transport,
}

/// One thread's listeners: `(listener, implicit TLS)`.
pub type Listeners = Vec<(crate::net::backend::Listener, bool)>;

/// What a worker sends the main thread once per second (and once at the end).
#[derive(Debug)]
pub struct ThreadSnapshot {
    pub thread: usize,
    pub snapshot: IntervalSnapshot,
    pub open_connections: usize,
}

/// What a worker returns when it ends.
#[derive(Debug)]
pub struct WorkerResult {
    pub totals: Measurements,
    /// Accepted messages without a digest header (with `--verify`).
    pub verify_missing: u64,
    pub capture_errors: u64,
    /// `--trace`: this thread's deliveries.
    pub trace: Option<TraceRecorder>,
    /// When this worker saw the stop request.
    pub stopped_at: Option<Instant>,
}

/// The sink's handler of one thread.
struct SinkHandler {
    ctx: ThreadCtx,
    shared: Arc<Shared>,
    /// Per connection, indexed by [`ConnId`].
    conns: Vec<Option<SinkConn>>,
    thread: usize,
    snapshots: Sender<ThreadSnapshot>,
    tick_start: Instant,
    next_tick: Instant,
    stopped_at: Option<Instant>,
    grace_end: Option<Instant>,
    limits: bool,
    max_conns: usize,
}

impl SinkHandler {
    fn conn(&mut self, id: ConnId) -> Option<&mut SinkConn> {
        self.conns.get_mut(id).and_then(Option::as_mut)
    }

    fn send_snapshot(&mut self, now: Instant, open: usize) {
        let started = self.shared.started;
        let snap = self.ctx.rec.take_interval(
            self.tick_start.saturating_duration_since(started),
            now.saturating_duration_since(self.tick_start),
        );
        let _ = self.snapshots.send(ThreadSnapshot {
            thread: self.thread,
            snapshot: snap,
            open_connections: open,
        });
        self.tick_start = now;
        self.next_tick = now + TICK;
    }
}

impl Handler for SinkHandler {
    fn on_accept<B: Backend>(
        &mut self,
        be: &mut B,
        now: Instant,
        id: ConnId,
        peer: std::net::SocketAddr,
        implicit_tls: bool,
    ) -> bool {
        if be.open_connections() > self.max_conns {
            // Over --max-connections: say so and close.
            be.write(id, b"421 4.7.0 Too many connections\r\n");
            self.ctx.rec.count_reply(CommandKind::Connect, 421);
            return false;
        }
        let Some(c) = SinkConn::accept(&mut self.ctx, be, id, peer.ip(), implicit_tls, now) else {
            return false;
        };
        if self.conns.len() <= id {
            self.conns.resize_with(id + 1, || None);
        }
        self.conns[id] = Some(c);
        true
    }

    fn on_tls_ready<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId) {
        if let Some(c) = self.conn(id) {
            c.tls_ready(be, id, now);
        }
    }

    fn on_input<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId, plain: &[u8]) {
        if let Some(Some(c)) = self.conns.get_mut(id) {
            c.input(&mut self.ctx, be, id, now, plain);
        }
    }

    fn on_peer_closed<B: Backend>(&mut self, be: &mut B, _now: Instant, id: ConnId) {
        if let Some(c) = self.conn(id) {
            c.peer_closed(be, id);
        }
    }

    fn on_timer<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId) {
        if let Some(Some(c)) = self.conns.get_mut(id) {
            c.timer(&mut self.ctx, be, id, now);
        }
    }

    fn on_closed<B: Backend>(&mut self, _be: &mut B, _now: Instant, id: ConnId, why: Closed) {
        if let Some(c) = self.conns.get_mut(id).and_then(Option::take) {
            c.closed(&mut self.ctx, why);
        }
    }

    fn on_tick<B: Backend>(&mut self, be: &mut B, now: Instant) -> Tick {
        let shared = &*self.shared;
        if let Some(d) = shared.duration {
            if now.saturating_duration_since(shared.started) >= d && !shared.stop.is_stopped() {
                shared.stop.stop();
            }
        }
        if self.limits && self.ctx.local_sessions > 0 {
            publish_limits(shared, &mut self.ctx);
        }
        if self.stopped_at.is_none() && shared.stop.is_stopped() {
            self.stopped_at = Some(now);
            self.grace_end = Some(now + shared.grace);
            // Stop accepting: closing the listeners refuses new connections.
            be.stop_listening();
        }
        if let Some(end) = self.grace_end {
            if be.open_connections() == 0 || now >= end {
                return Tick {
                    wake_at: None,
                    stop: true,
                };
            }
        }
        if now >= self.next_tick {
            self.send_snapshot(now, be.open_connections());
        }
        let mut wake = self.next_tick;
        if let Some(end) = self.grace_end {
            wake = wake.min(end);
        }
        if let Some(d) = self.shared.duration {
            wake = wake.min(self.shared.started + d);
        }
        Tick {
            wake_at: Some(wake),
            stop: false,
        }
    }
}

/// The worker: runs until stopped and drained (or the grace ends).
pub fn run(
    ctx_w: WorkerCtx,
    shared: Arc<Shared>,
    listeners: Listeners,
    snapshots: Sender<ThreadSnapshot>,
) -> io::Result<WorkerResult> {
    let capture = shared
        .capture
        .clone()
        .map(|dir| Capture::new(dir, ctx_w.index));
    let server = Arc::new(ServerConfig::clone(&shared.server));
    let now = Instant::now();
    let mut h = SinkHandler {
        ctx: ThreadCtx {
            faults: ThreadFaults::new(
                &shared.faults,
                shared.seed,
                ctx_w.index,
                ctx_w.count,
                Arc::clone(&shared.greylist),
            ),
            rec: Recorder::new(),
            capture,
            capture_on: shared.capture.is_some(),
            verify: shared.verify,
            trace: shared.trace.then(TraceRecorder::default),
            verify_missing: 0,
            capture_errors: 0,
            message_limit: shared.exit_after_messages.map(|limit| MessageLimit {
                limit,
                claimed: Arc::clone(&shared.messages_done),
                stop: shared.stop.clone(),
            }),
            pacer: shared.pacer.clone(),
            local_sessions: 0,
            server,
            tls: shared
                .tls
                .as_ref()
                .map(|c| Arc::new(rustls::ServerConfig::clone(c))),
            auth: shared.auth.clone(),
            out: Vec::with_capacity(4096),
        },
        conns: Vec::with_capacity(1024),
        thread: ctx_w.index,
        snapshots,
        tick_start: now,
        next_tick: now + TICK,
        stopped_at: None,
        grace_end: None,
        limits: shared.exit_after_sessions.is_some(),
        max_conns: shared.max_conns_per_thread.max(1),
        shared: Arc::clone(&shared),
    };
    let setup = Setup {
        listeners,
        stop: shared.stop.clone(),
        read_buf_bytes: READ_BUF_BYTES,
        track_waiting: false,
    };
    driver::run(shared.transport.thread(ctx_w.index), setup, &mut h)?;
    if h.limits {
        publish_limits(&shared, &mut h.ctx);
    }
    h.send_snapshot(Instant::now(), 0);
    Ok(WorkerResult {
        totals: h.ctx.rec.finish(),
        verify_missing: h.ctx.verify_missing,
        capture_errors: h.ctx.capture_errors,
        trace: h.ctx.trace.take(),
        stopped_at: h.stopped_at,
    })
}

/// Adds this thread's ended sessions to the shared total and requests a
/// stop when `--exit-after-sessions` is reached (`--exit-after-messages`
/// is claimed per message: `conn::MessageLimit`).
fn publish_limits(shared: &Shared, ctx: &mut ThreadCtx) {
    let s = std::mem::take(&mut ctx.local_sessions);
    let total_s = shared.sessions_done.fetch_add(s, Ordering::Relaxed) + s;
    if shared.exit_after_sessions.is_some_and(|n| total_s >= n) && !shared.stop.is_stopped() {
        shared.stop.stop();
    }
}
