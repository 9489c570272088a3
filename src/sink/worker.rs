//! One sink worker: a pinned thread with its own mio `Poll`, its own
//! `SO_REUSEPORT` listeners, a slab of connections, timers and a stats
//! [`Recorder`].
//!
//! Each connection is a [`Conn`] (socket + optional TLS) driving a
//! [`ServerSession`] through [`Hooks`], which apply faults, feed the
//! `--verify` digest check and the `--capture` buffer. Plaintext is read
//! into one buffer per thread (`Conn::read_into`), so an idle connection
//! owns no read buffer; bodies are never copied unless capture is on.
//!
//! Invariants:
//! - Nothing shared is touched per message: the only cross-thread traffic is
//!   the stop flag (one relaxed load per loop iteration), one snapshot per
//!   second on a channel, and — only with `--exit-after-*` — one atomic add
//!   per loop iteration that saw work. The greylist table is locked once per
//!   RCPT, and only when a greylist rule exists. Each thread keeps its own
//!   copy of the server and TLS configs, so the `Arc` a session clones is
//!   never one another core writes.
//! - Accepting drains the listener until `WouldBlock`; EMFILE/ENFILE pause
//!   the listener for 100 ms instead of spinning.
//! - Timers are rescheduled lazily: a connection's timer is moved earlier
//!   when the session's deadline moves earlier, otherwise it fires at the old
//!   time and is pushed to the session's current deadline. So a busy
//!   connection costs no heap operation per command.
//! - Every connection that is dropped counts as one session (a TLS one if
//!   a handshake completed, a resumed one if it resumed), exactly once.
//! - A peer's FIN ends the connection as soon as the replies to what it sent
//!   (including one a fault delay holds) are flushed: a half-closed or
//!   aborted client never holds a socket (or a `--max-connections` slot)
//!   until a timeout. The short-read shortcut is skipped when the event
//!   reports the peer's close, so data and FIN arriving together are both
//!   seen.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::cli::AuthPolicy;
use crate::digest::{self, Verifier};
use crate::net::conn::{Conn, ReadResult};
use crate::net::runtime::{StopSignal, WorkerCtx, STOP_POLL_INTERVAL};
use crate::net::socket;
use crate::net::timer::Timers;
use crate::smtp::server::{
    CloseReason, CommandInfo, MessageOutcome, ServerConfig, ServerEvent, ServerHooks,
    ServerSession, Verdict,
};
use crate::smtp::{CommandKind, Outcome};
use crate::stats::{IntervalSnapshot, Measurements, Recorder};

use super::capture::{BodyBuffer, Capture};
use super::faults::{Greylist, ThreadFaults};

/// Plaintext read buffer of a thread.
const READ_BUF_BYTES: usize = 64 * 1024;
/// How long a listener rests after EMFILE/ENFILE.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// How long a closing connection may take to flush its last replies.
const CLOSE_FLUSH_LIMIT: Duration = Duration::from_secs(5);
/// Interval between snapshots sent to the main thread.
pub const TICK: Duration = Duration::from_secs(1);

const WAKER: Token = Token(usize::MAX);
const LISTENER_BASE: usize = usize::MAX - 1;

/// What every worker shares (read-only, apart from the atomics used only
/// with `--exit-after-*`).
pub struct Shared {
    pub stop: StopSignal,
    pub server: Arc<ServerConfig>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub auth: Option<AuthPolicy>,
    pub faults: Vec<crate::cli::FaultSpec>,
    pub greylist: Arc<Greylist>,
    pub seed: u64,
    pub capture: Option<std::path::PathBuf>,
    pub verify: bool,
    pub max_conns_per_thread: usize,
    pub exit_after_messages: Option<u64>,
    pub exit_after_sessions: Option<u64>,
    pub messages_done: AtomicU64,
    pub sessions_done: AtomicU64,
    pub started: Instant,
    pub duration: Option<Duration>,
    pub grace: Duration,
}

/// One thread's listeners: `(listener, implicit TLS)`.
pub type Listeners = Vec<(TcpListener, bool)>;

/// What a worker sends the main thread once per second (and once at the end).
#[derive(Debug)]
pub struct Tick {
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
    /// When this worker saw the stop request.
    pub stopped_at: Option<Instant>,
}

/// Per-connection state the hooks change.
#[derive(Default)]
struct ConnState {
    in_message: bool,
    /// The body being received (`--capture` only), bounded by the size limit.
    body: Option<BodyBuffer>,
    verifier: Option<Box<Verifier>>,
    eof: bool,
    io_error: bool,
    close_reason: Option<CloseReason>,
    close_deadline: Option<Instant>,
}

struct Connection {
    conn: Conn,
    session: ServerSession,
    peer_ip: IpAddr,
    timer_at: Option<Instant>,
    st: ConnState,
}

/// Thread-level state the hooks and event handling use.
struct Ctx {
    shared: Arc<Shared>,
    /// This thread's own copies of the shared configs: a session clones
    /// these `Arc`s, so the reference counts it bumps live on cache lines
    /// no other thread writes.
    server: Arc<ServerConfig>,
    tls: Option<Arc<rustls::ServerConfig>>,
    faults: ThreadFaults,
    rec: Recorder,
    capture: Option<Capture>,
    verify_missing: u64,
    capture_errors: u64,
    /// Accepted messages / ended sessions not yet added to the shared
    /// atomics (only with `--exit-after-*`).
    local_messages: u64,
    local_sessions: u64,
}

/// The [`ServerHooks`] for one call into a session.
struct Hooks<'a> {
    faults: &'a mut ThreadFaults,
    auth: Option<&'a AuthPolicy>,
    peer_ip: IpAddr,
    now: Instant,
    st: &'a mut ConnState,
    capture: Option<&'a mut Capture>,
    rec: &'a mut Recorder,
    verify_missing: &'a mut u64,
    capture_errors: &'a mut u64,
}

impl ServerHooks for Hooks<'_> {
    fn on_command(&mut self, cmd: CommandKind, info: &CommandInfo<'_>) -> Verdict {
        if self.faults.is_empty() {
            return Verdict::Proceed;
        }
        self.faults.verdict(cmd, info, self.peer_ip, self.now)
    }

    fn check_auth(&mut self, _authzid: &[u8], user: &[u8], pass: &[u8]) -> bool {
        match self.auth {
            None | Some(AuthPolicy::Any) => true,
            Some(AuthPolicy::Only { user: u, pass: p }) => {
                u.as_bytes() == user && p.as_bytes() == pass
            }
        }
    }

    fn on_message_start(&mut self) {
        self.st.in_message = true;
        if let Some(b) = &mut self.st.body {
            b.start();
        }
        if let Some(v) = &mut self.st.verifier {
            v.reset();
        }
    }

    fn on_body(&mut self, chunk: &[u8]) {
        if let Some(b) = &mut self.st.body {
            b.push(chunk);
        }
        if let Some(v) = &mut self.st.verifier {
            v.feed(chunk);
        }
    }

    fn on_message_end(&mut self, accepted: bool) {
        self.st.in_message = false;
        if let Some(v) = &mut self.st.verifier {
            if accepted {
                match v.finish() {
                    digest::Verdict::Ok => self.rec.count_verify(true),
                    digest::Verdict::Corrupt => self.rec.count_verify(false),
                    digest::Verdict::Missing => *self.verify_missing += 1,
                }
            } else {
                v.reset();
            }
        }
        if let Some(b) = &mut self.st.body {
            // An accepted body is within the size limit, so it is whole.
            if let (true, Some(body), Some(c)) = (accepted, b.body(), &mut self.capture) {
                if c.store(body).is_err() {
                    *self.capture_errors += 1;
                }
            }
            b.release();
        }
    }
}

impl Ctx {
    fn hooks<'a>(&'a mut self, st: &'a mut ConnState, peer_ip: IpAddr, now: Instant) -> Hooks<'a> {
        Hooks {
            faults: &mut self.faults,
            auth: self.shared.auth.as_ref(),
            peer_ip,
            now,
            st,
            capture: self.capture.as_mut(),
            rec: &mut self.rec,
            verify_missing: &mut self.verify_missing,
            capture_errors: &mut self.capture_errors,
        }
    }

    /// Hands queued replies to the connection and handles session events.
    fn after_session_call(&mut self, c: &mut Connection, out: &mut Vec<u8>) {
        if !out.is_empty() {
            c.conn.write(out);
            out.clear();
        }
        while let Some(ev) = c.session.poll_event() {
            match ev {
                ServerEvent::Reply { command, code } => self.rec.count_reply(command, code),
                ServerEvent::Message {
                    outcome,
                    bytes,
                    recipients,
                    ..
                } => {
                    self.rec.count_bytes(bytes);
                    let o = match outcome {
                        MessageOutcome::Accepted => {
                            self.rec.count_recipients(u64::from(recipients));
                            self.local_messages += 1;
                            Outcome::Accepted
                        }
                        MessageOutcome::TempFailed => Outcome::TempFailed,
                        MessageOutcome::Rejected => Outcome::Rejected,
                    };
                    self.rec.count_outcome(o);
                }
                ServerEvent::StartTls => {
                    // The 220 is already queued in the clear; the switch
                    // drops any plaintext that followed STARTTLS.
                    let ok = match &self.tls {
                        Some(cfg) => c.conn.start_tls_server(Arc::clone(cfg)).is_ok(),
                        None => false,
                    };
                    if !ok {
                        c.st.io_error = true;
                    }
                }
                ServerEvent::Close(reason) => c.st.close_reason = Some(reason),
                ServerEvent::Proxy(_) | ServerEvent::Authenticated => {}
            }
        }
    }

    /// Reads and feeds the session until `WouldBlock`, EOF, an error, or the
    /// session stops wanting input. `drain`: the event said the peer closed
    /// its side (or the caller cannot know), so a short read must not end
    /// the loop: only the read after it sees the EOF.
    fn read_loop(
        &mut self,
        c: &mut Connection,
        read_buf: &mut [u8],
        out: &mut Vec<u8>,
        now: Instant,
        drain: bool,
    ) {
        loop {
            if c.st.io_error || c.st.eof || c.session.is_closed() {
                return;
            }
            if !c.session.wants_read() {
                c.conn.set_paused(true);
                return;
            }
            if c.conn.is_paused() {
                c.conn.set_paused(false);
            }
            match c.conn.read_into(read_buf) {
                Ok((ReadResult::Data, n)) => {
                    let mut hooks = self.hooks(&mut c.st, c.peer_ip, now);
                    c.session.handle_input(now, &read_buf[..n], out, &mut hooks);
                    self.after_session_call(c, out);
                    // A short plaintext read emptied the socket's receive
                    // queue: with edge-triggered readiness, anything that
                    // arrives later raises a new event, so the read that
                    // would only say EAGAIN is skipped (one syscall less per
                    // command). Not when the event already reported the
                    // peer's FIN (data and FIN together raise one edge, and
                    // no later event would come: the socket would sit in
                    // CLOSE_WAIT until the command timeout). TLS may hold
                    // decrypted data: keep reading.
                    if n < read_buf.len() && !c.conn.is_tls() && !drain {
                        return;
                    }
                }
                Ok((ReadResult::TlsHandshakeDone, _)) => {
                    c.session.handle_tls_established(now);
                }
                Ok((ReadResult::WouldBlock, _)) => return,
                Ok((ReadResult::Eof, _)) => {
                    c.st.eof = true;
                    return;
                }
                Err(_) => {
                    c.st.io_error = true;
                    return;
                }
            }
        }
    }

    /// Flushes, decides whether the connection ends now, and otherwise
    /// updates its registration and timer. Returns true to drop it.
    fn settle(
        &mut self,
        c: &mut Connection,
        key: usize,
        poll: &Poll,
        timers: &mut Timers,
        now: Instant,
    ) -> bool {
        if c.st.io_error {
            return true;
        }
        // A TLS session that ends gets a close_notify before the FIN.
        let ended_tls = c.session.is_closed() && c.conn.is_tls() && !c.conn.is_handshaking();
        let flushed = match if ended_tls {
            c.conn.shutdown()
        } else {
            c.conn.flush()
        } {
            Ok(done) => done,
            Err(_) => {
                c.st.io_error = true;
                return true;
            }
        };
        // A peer that half-closed still gets the replies to what it sent,
        // including one a fault delay holds; then the connection ends.
        let finished = c.st.eof && !c.session.holds_reply();
        if c.session.is_closed() || finished {
            if flushed {
                return true;
            }
            let deadline = *c.st.close_deadline.get_or_insert(now + CLOSE_FLUSH_LIMIT);
            if now >= deadline {
                return true;
            }
            if c.timer_at.is_none_or(|t| t > deadline) {
                timers.schedule(key, deadline);
                c.timer_at = Some(deadline);
            }
        } else if let Some(at) = c.session.poll_timeout() {
            if c.timer_at.is_none_or(|t| t > at) {
                timers.schedule(key, at);
                c.timer_at = Some(at);
            }
        }
        if c.conn
            .update_registration(poll.registry(), Token(key))
            .is_err()
        {
            c.st.io_error = true;
            return true;
        }
        false
    }

    /// Counts a connection that ends.
    fn count_end(&mut self, c: &Connection) {
        // Completed handshakes only: an implicit-TLS or STARTTLS client
        // whose handshake failed is a plaintext session that ended.
        self.rec.count_session(c.conn.tls_established());
        if c.conn.tls_resumed() {
            self.rec.count_tls_resumed();
        }
        self.local_sessions += 1;
        match c.st.close_reason {
            Some(CloseReason::Timeout) => self.rec.count_session_error(Outcome::Timeout),
            Some(CloseReason::ProxyError | CloseReason::TooManyErrors) => {
                self.rec.count_session_error(Outcome::ProtocolError)
            }
            _ => {}
        }
        if c.st.in_message || (c.st.io_error && c.st.close_reason.is_none()) {
            self.rec.count_session_error(Outcome::ConnectionError);
        }
    }
}

/// The worker loop: runs until stopped and drained (or the grace ends).
pub fn run(
    ctx_w: WorkerCtx,
    shared: Arc<Shared>,
    listeners: Listeners,
    ticks: Sender<Tick>,
) -> io::Result<WorkerResult> {
    let mut poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    shared.stop.add_waker(Arc::clone(&waker));
    let mut listeners: Vec<(Option<TcpListener>, bool)> = listeners
        .into_iter()
        .map(|(l, tls)| (Some(l), tls))
        .collect();
    for (i, (l, _)) in listeners.iter_mut().enumerate() {
        if let Some(l) = l {
            poll.registry()
                .register(l, Token(LISTENER_BASE - i), Interest::READABLE)?;
        }
    }
    let capture = shared
        .capture
        .clone()
        .map(|dir| Capture::new(dir, ctx_w.index));
    let mut ctx = Ctx {
        faults: ThreadFaults::new(
            &shared.faults,
            shared.seed,
            ctx_w.index,
            ctx_w.count,
            Arc::clone(&shared.greylist),
        ),
        rec: Recorder::new(),
        capture,
        verify_missing: 0,
        capture_errors: 0,
        local_messages: 0,
        local_sessions: 0,
        server: Arc::new(ServerConfig::clone(&shared.server)),
        tls: shared
            .tls
            .as_ref()
            .map(|c| Arc::new(rustls::ServerConfig::clone(c))),
        shared: Arc::clone(&shared),
    };
    let mut conns: Slab<Connection> = Slab::with_capacity(1024);
    let mut timers = Timers::with_capacity(1024);
    let mut events = Events::with_capacity(1024);
    let mut read_buf = vec![0u8; READ_BUF_BYTES].into_boxed_slice();
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut expired: Vec<usize> = Vec::with_capacity(64);
    let mut to_drop: Vec<usize> = Vec::with_capacity(64);
    let max_conns = shared.max_conns_per_thread.max(1);
    let limits = shared.exit_after_messages.is_some() || shared.exit_after_sessions.is_some();

    let started = shared.started;
    let mut tick_start = Instant::now();
    let mut next_tick = tick_start + TICK;
    let mut accept_paused_until: Option<Instant> = None;
    let mut stopped_at: Option<Instant> = None;
    let mut grace_end = None;

    loop {
        let now = Instant::now();
        if let Some(d) = shared.duration {
            if now.saturating_duration_since(started) >= d && !shared.stop.is_stopped() {
                shared.stop.stop();
            }
        }
        if limits && (ctx.local_messages > 0 || ctx.local_sessions > 0) {
            publish_limits(&shared, &mut ctx);
        }
        if stopped_at.is_none() && shared.stop.is_stopped() {
            stopped_at = Some(now);
            grace_end = Some(now + shared.grace);
            // Stop accepting: closing the listeners refuses new connections.
            for (l, _) in listeners.iter_mut() {
                if let Some(mut l) = l.take() {
                    let _ = poll.registry().deregister(&mut l);
                }
            }
        }
        if let Some(end) = grace_end {
            if conns.is_empty() || now >= end {
                break;
            }
        }
        if now >= next_tick {
            let snap = ctx.rec.take_interval(
                tick_start.saturating_duration_since(started),
                now.saturating_duration_since(tick_start),
            );
            let _ = ticks.send(Tick {
                thread: ctx_w.index,
                snapshot: snap,
                open_connections: conns.len(),
            });
            tick_start = now;
            next_tick = now + TICK;
        }
        if let Some(t) = accept_paused_until {
            if now >= t {
                accept_paused_until = None;
                for (i, (l, _)) in listeners.iter_mut().enumerate() {
                    if let Some(l) = l {
                        let _ = poll.registry().register(
                            l,
                            Token(LISTENER_BASE - i),
                            Interest::READABLE,
                        );
                    }
                }
            }
        }

        let mut timeout = STOP_POLL_INTERVAL.min(next_tick.saturating_duration_since(now));
        if let Some(t) = timers.timeout(now) {
            timeout = timeout.min(t);
        }
        if let Some(t) = accept_paused_until {
            timeout = timeout.min(t.saturating_duration_since(now));
        }
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let now = Instant::now();
        for ev in events.iter() {
            let token = ev.token();
            if token == WAKER {
                continue;
            }
            if token.0 > LISTENER_BASE - listeners.len() && token.0 <= LISTENER_BASE {
                let i = LISTENER_BASE - token.0;
                let paused = accept_loop(
                    &mut listeners,
                    i,
                    &mut conns,
                    max_conns,
                    &mut ctx,
                    &poll,
                    &mut timers,
                    &mut out,
                    now,
                );
                if paused {
                    accept_paused_until = Some(now + ACCEPT_PAUSE);
                }
                continue;
            }
            let key = token.0;
            let Some(c) = conns.get_mut(key) else {
                // A stale event for a connection closed earlier in this batch.
                continue;
            };
            // EPOLLRDHUP (or HUP/ERR) came with this edge: read to the EOF.
            let drain = ev.is_read_closed() || ev.is_error();
            ctx.read_loop(c, &mut read_buf, &mut out, now, drain);
            if ctx.settle(c, key, &poll, &mut timers, now) {
                close(&mut conns, key, &mut ctx, &poll, &mut timers);
            }
        }
        // Deadlines: fault delays, command/data timeouts, close flushes.
        expired.clear();
        expired.extend(timers.expired(now));
        for &key in &expired {
            let Some(c) = conns.get_mut(key) else {
                continue;
            };
            c.timer_at = None;
            if c.st.close_deadline.is_some_and(|d| now >= d) {
                to_drop.push(key);
                continue;
            }
            if !c.session.is_closed() {
                let mut hooks = ctx.hooks(&mut c.st, c.peer_ip, now);
                c.session.handle_timeout(now, &mut out, &mut hooks);
                ctx.after_session_call(c, &mut out);
                // Input held back by a delay may be waiting in the socket,
                // maybe with a FIN whose edge was consumed while paused.
                ctx.read_loop(c, &mut read_buf, &mut out, now, true);
            }
            if ctx.settle(c, key, &poll, &mut timers, now) {
                to_drop.push(key);
            }
        }
        for key in to_drop.drain(..) {
            close(&mut conns, key, &mut ctx, &poll, &mut timers);
        }
    }

    // Grace is over: whatever is still open ends now.
    let keys: Vec<usize> = conns.iter().map(|(k, _)| k).collect();
    for key in keys {
        close(&mut conns, key, &mut ctx, &poll, &mut timers);
    }
    if limits {
        publish_limits(&shared, &mut ctx);
    }
    let now = Instant::now();
    let snap = ctx.rec.take_interval(
        tick_start.saturating_duration_since(started),
        now.saturating_duration_since(tick_start),
    );
    let _ = ticks.send(Tick {
        thread: ctx_w.index,
        snapshot: snap,
        open_connections: 0,
    });
    Ok(WorkerResult {
        totals: ctx.rec.finish(),
        verify_missing: ctx.verify_missing,
        capture_errors: ctx.capture_errors,
        stopped_at,
    })
}

/// Adds this thread's new counts to the shared totals and requests a stop
/// when an `--exit-after-*` limit is reached.
fn publish_limits(shared: &Shared, ctx: &mut Ctx) {
    let m = std::mem::take(&mut ctx.local_messages);
    let s = std::mem::take(&mut ctx.local_sessions);
    let total_m = shared.messages_done.fetch_add(m, Ordering::Relaxed) + m;
    let total_s = shared.sessions_done.fetch_add(s, Ordering::Relaxed) + s;
    let hit_m = shared.exit_after_messages.is_some_and(|n| total_m >= n);
    let hit_s = shared.exit_after_sessions.is_some_and(|n| total_s >= n);
    if (hit_m || hit_s) && !shared.stop.is_stopped() {
        shared.stop.stop();
    }
}

fn close(
    conns: &mut Slab<Connection>,
    key: usize,
    ctx: &mut Ctx,
    _poll: &Poll,
    timers: &mut Timers,
) {
    if let Some(c) = conns.try_remove(key) {
        timers.cancel(key);
        ctx.count_end(&c);
        // Dropping the Conn closes the socket, which also removes it from
        // the epoll set (no other descriptor refers to it), so no explicit
        // deregister: one syscall less per session.
        drop(c);
    }
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accepts until `WouldBlock`. Returns true if accepting must pause (out
/// of file descriptors or memory): the listener is deregistered.
#[allow(clippy::too_many_arguments)]
fn accept_loop(
    listeners: &mut [(Option<TcpListener>, bool)],
    i: usize,
    conns: &mut Slab<Connection>,
    max_conns: usize,
    ctx: &mut Ctx,
    poll: &Poll,
    timers: &mut Timers,
    out: &mut Vec<u8>,
    now: Instant,
) -> bool {
    let (Some(listener), implicit_tls) = &mut listeners[i] else {
        return false;
    };
    let implicit_tls = *implicit_tls;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                if conns.len() >= max_conns {
                    refuse(stream, ctx);
                    continue;
                }
                open(
                    stream,
                    peer,
                    implicit_tls,
                    conns,
                    ctx,
                    poll,
                    timers,
                    out,
                    now,
                );
            }
            // The backlog is empty.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            // A signal interrupted accept(2): retry.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The peer gave up before we accepted: next one.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            // Out of descriptors/memory: the socket stays readable, so
            // retrying now would spin; rest the listener instead.
            Err(e) if is_fd_exhaustion(&e) => {
                let _ = poll.registry().deregister(listener);
                return true;
            }
            Err(_) => {
                ctx.rec.count_session_error(Outcome::ConnectionError);
                return false;
            }
        }
    }
}

/// Over `--max-connections`: say so and close (best effort, never blocks).
fn refuse(mut stream: TcpStream, ctx: &mut Ctx) {
    let _ = stream.write(b"421 4.7.0 Too many connections\r\n");
    ctx.rec.count_reply(CommandKind::Connect, 421);
}

#[allow(clippy::too_many_arguments)]
fn open(
    stream: TcpStream,
    peer: SocketAddr,
    implicit_tls: bool,
    conns: &mut Slab<Connection>,
    ctx: &mut Ctx,
    poll: &Poll,
    timers: &mut Timers,
    out: &mut Vec<u8>,
    now: Instant,
) {
    let _ = socket::prepare_accepted(&stream);
    let mut conn = Conn::with_read_buf(stream, 0);
    let mut session = ServerSession::new(Arc::clone(&ctx.server), now);
    if implicit_tls {
        let Some(cfg) = &ctx.tls else { return };
        if conn.set_tls_implicit_server(Arc::clone(cfg)).is_err() {
            return;
        }
        session.set_tls_active();
    }
    let st = ConnState {
        body: ctx
            .shared
            .capture
            .as_ref()
            .map(|_| BodyBuffer::new(ctx.server.max_message_size)),
        verifier: ctx.shared.verify.then(|| Box::new(Verifier::new())),
        ..ConnState::default()
    };
    let key = conns.insert(Connection {
        conn,
        session,
        peer_ip: peer.ip(),
        timer_at: None,
        st,
    });
    let c = &mut conns[key];
    {
        let mut hooks = ctx.hooks(&mut c.st, c.peer_ip, now);
        c.session.start(now, out, &mut hooks);
    }
    ctx.after_session_call(c, out);
    // `settle` flushes the greeting first, then registers (one epoll_ctl).
    if ctx.settle(c, key, poll, timers, now) {
        close(conns, key, ctx, poll, timers);
    }
}
