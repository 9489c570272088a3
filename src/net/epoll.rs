//! The epoll backend (through mio): one `Poll` per pinned thread driving a
//! [`Handler`] over plain and TLS TCP connections.
//!
//! What it keeps to itself (each detail learnt the hard way):
//! - Every socket is registered once, for READABLE | WRITABLE,
//!   edge-triggered, from accept (or connect) to close: no `epoll_ctl` per
//!   state change. A writable edge after a partial write (SOCK_NOSPACE)
//!   resumes the flush; other wakeups are harmless.
//! - Reads drain until `WouldBlock`, retry on `Interrupted`, and report EOF.
//!   A short plaintext read emptied the receive queue, so the read that
//!   would only say EAGAIN is skipped (one syscall per command) — unless
//!   the event reported the peer's close (data and FIN together raise one
//!   edge: only the next read sees the EOF), or TLS may hold decrypted
//!   bytes.
//! - Backpressure ([`Backend::set_reading`]) stops reading without touching
//!   the registration; resuming reads at once what arrived meanwhile (its
//!   edge was already consumed).
//! - Accept drains the listener until `WouldBlock`; out of descriptors or
//!   memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) pauses the listener for
//!   100 ms instead of spinning on a readable backlog.
//! - A connect completes on its first event: `SO_ERROR` says how (no
//!   `getpeername` per session).
//! - Output is queued per connection and written when the callback that
//!   queued it returns, so replies to one pipelined batch leave in one
//!   `write`. TLS records go straight from rustls to the socket (one
//!   vectored write), plaintext queued before a TLS switch first.
//! - A graceful close sends what is queued (and a TLS close_notify), bounded
//!   by [`CLOSE_FLUSH_LIMIT`]; dropping the socket removes it from the epoll
//!   set, so no `epoll_ctl(DEL)` per session.
//!
//! Invariants: see [`super::backend`]; no callback is re-entered; an idle
//! plaintext connection holds no read buffer and no TLS state (the thread
//! has one read buffer; TLS state is boxed per TLS connection).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::backend::{
    AppBytes, Backend, Close, Closed, ConnId, ConnectOpts, Handler, Setup, TlsState,
};
use super::runtime::STOP_POLL_INTERVAL;
use super::socket;
use super::timer::Timers;
use super::tls::TlsInfo;
use super::tls_stream::{TlsRead, TlsSide, TlsStream};

/// How long a listener rests after EMFILE/ENFILE.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// How long a graceful close may take to flush its last output.
pub const CLOSE_FLUSH_LIMIT: Duration = Duration::from_secs(5);
/// Once this many bytes of a write queue have been sent, the queue is
/// compacted even if more is pending.
const COMPACT_AFTER_BYTES: usize = 64 * 1024;
/// Smallest ciphertext buffer: one full TLS record (16 KiB + overhead).
const TLS_IN_BYTES: usize = 16 * 1024 + 512;

const WAKER: Token = Token(usize::MAX);
const LISTENER_BASE: usize = usize::MAX - 1;

/// The TLS part of a connection (boxed: plaintext connections stay small).
struct TlsPart {
    stream: TlsStream,
    /// Ciphertext read from the socket and not yet taken by rustls.
    cin: Box<[u8]>,
    cin_pos: usize,
    cin_len: usize,
}

struct Conn {
    stream: TcpStream,
    connecting: bool,
    tls: Option<Box<TlsPart>>,
    /// Plaintext (or pre-TLS plaintext) waiting for the socket.
    out: Vec<u8>,
    out_pos: usize,
    app: AppBytes,
    /// The peer's FIN (or close_notify) was seen and reported.
    eof: bool,
    /// The handler wants input.
    reading: bool,
    closing: Option<Close>,
    close_deadline: Option<Instant>,
    /// Queued in `Ops::dirty` (output to flush or reads to resume).
    dirty: bool,
    /// Reading was resumed: read without waiting for an edge.
    read_now: bool,
}

impl Conn {
    fn new(stream: TcpStream, connecting: bool) -> Self {
        Conn {
            stream,
            connecting,
            tls: None,
            out: Vec::new(),
            out_pos: 0,
            app: AppBytes::default(),
            eof: false,
            reading: true,
            closing: None,
            close_deadline: None,
            dirty: false,
            read_now: false,
        }
    }

    fn queued_plain(&self) -> usize {
        self.out.len() - self.out_pos
    }

    fn pending(&self) -> usize {
        self.queued_plain() + usize::from(self.tls.as_ref().is_some_and(|t| t.stream.wants_write()))
    }

    fn note_sent(&mut self) {
        let tls = self.tls.as_ref().map(|t| &t.stream);
        self.app.note_sent(self.queued_plain(), false, tls);
    }

    /// Writes queued output: `Ok(true)` all out, `Ok(false)` the socket is
    /// full (a writable edge will come).
    fn flush(&mut self) -> io::Result<bool> {
        let r = self.flush_inner();
        self.note_sent();
        r
    }

    fn flush_inner(&mut self) -> io::Result<bool> {
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                // Socket send buffer full: wait for writable.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        if let Some(t) = &mut self.tls {
            while t.stream.wants_write() {
                match t.stream.write_ciphertext_to(&mut self.stream) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(true)
    }

    fn queue(&mut self, data: &[u8]) {
        self.app.taken += data.len() as u64;
        match &mut self.tls {
            None => {
                if self.out_pos == self.out.len() {
                    self.out.clear();
                    self.out_pos = 0;
                } else if self.out_pos >= COMPACT_AFTER_BYTES {
                    self.out.drain(..self.out_pos);
                    self.out_pos = 0;
                }
                self.out.extend_from_slice(data);
            }
            Some(t) => t.stream.write_plaintext(data),
        }
    }
}

/// The control surface handlers see (everything but the read buffer).
pub struct Ops {
    poll: Poll,
    conns: Slab<Conn>,
    timers: Timers,
    /// Connections with output to flush or reads to resume.
    dirty: Vec<ConnId>,
    /// Connections to drop, with why (after the current callback).
    dead: Vec<(ConnId, Closed)>,
    listeners: Vec<(Option<TcpListener>, bool)>,
    accept_paused_until: Option<Instant>,
    /// Time spent in `epoll_wait`.
    waited: Duration,
}

impl Ops {
    fn mark_dirty(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(id) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    fn kill(&mut self, id: ConnId, why: Closed) {
        // (The first reason wins; later ones are dropped.)
        if let Some(c) = self.conns.get_mut(id) {
            if c.closing != Some(Close::Abort) {
                c.closing = Some(Close::Abort);
                self.dead.push((id, why));
            }
        }
    }
}

impl Backend for Ops {
    fn write(&mut self, id: ConnId, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if let Some(c) = self.conns.get_mut(id) {
            c.queue(data);
            self.mark_dirty(id);
        }
    }

    fn pending_output(&self, id: ConnId) -> usize {
        self.conns.get(id).map_or(0, Conn::pending)
    }

    fn app_bytes_in(&self, id: ConnId) -> u64 {
        self.conns.get(id).map_or(0, |c| c.app.taken)
    }

    fn app_bytes_sent(&self, id: ConnId) -> u64 {
        self.conns.get(id).map_or(0, |c| c.app.sent)
    }

    fn start_tls(&mut self, id: ConnId, side: TlsSide) -> io::Result<()> {
        let Some(c) = self.conns.get_mut(id) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let stream = TlsStream::start(c.tls.is_some(), side)?;
        c.tls = Some(Box::new(TlsPart {
            stream,
            cin: vec![0; TLS_IN_BYTES].into_boxed_slice(),
            cin_pos: 0,
            cin_len: 0,
        }));
        // A client's ClientHello is queued: flush it.
        self.mark_dirty(id);
        Ok(())
    }

    fn tls_state(&self, id: ConnId) -> TlsState {
        TlsState::of(self.conns.get(id).and_then(|c| c.tls.as_ref()).map(|t| &t.stream))
    }

    fn tls_info(&self, id: ConnId) -> Option<TlsInfo> {
        self.conns.get(id)?.tls.as_ref()?.stream.info()
    }

    fn set_reading(&mut self, id: ConnId, on: bool) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.reading == on {
            return;
        }
        c.reading = on;
        if on {
            // The edge for what arrived meanwhile was consumed: read now.
            c.read_now = true;
            self.mark_dirty(id);
        }
    }

    fn close(&mut self, id: ConnId, how: Close) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        match how {
            Close::Abort => self.kill(id, Closed::Local),
            Close::Graceful => {
                if c.closing.is_none() {
                    c.closing = Some(Close::Graceful);
                    if let Some(t) = &mut c.tls {
                        if !t.stream.is_handshaking() {
                            t.stream.send_close_notify();
                        }
                    }
                    self.mark_dirty(id);
                }
            }
        }
    }

    fn set_deadline(&mut self, id: ConnId, at: Option<Instant>) {
        match at {
            Some(t) => self.timers.schedule(id, t),
            None => self.timers.cancel(id),
        }
    }

    fn local_addr(&self, id: ConnId) -> Option<SocketAddr> {
        self.conns.get(id)?.stream.local_addr().ok()
    }

    fn connect(&mut self, target: SocketAddr, opts: ConnectOpts) -> io::Result<ConnId> {
        let mut stream = socket::connect(target, opts.source_ip, opts.abort_close)?;
        let entry = self.conns.vacant_entry();
        let id = entry.key();
        self.poll.registry().register(
            &mut stream,
            Token(id),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        entry.insert(Conn::new(stream, true));
        Ok(id)
    }

    fn open_connections(&self) -> usize {
        self.conns.len()
    }

    fn waited(&self) -> Duration {
        self.waited
    }

    fn stop_listening(&mut self) {
        for (l, _) in self.listeners.iter_mut() {
            if let Some(mut l) = l.take() {
                let _ = self.poll.registry().deregister(&mut l);
            }
        }
    }
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// One thread's epoll loop.
pub struct Epoll {
    core: Core,
    events: Events,
}

/// Everything the dispatch needs but the event list (borrowed apart).
struct Core {
    ops: Ops,
    read_buf: Box<[u8]>,
    expired: Vec<ConnId>,
    track_waiting: bool,
}

impl Epoll {
    pub fn new(setup: Setup) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        setup.stop.add_waker(waker);
        let mut listeners = Vec::with_capacity(setup.listeners.len());
        for (i, (l, tls)) in setup.listeners.into_iter().enumerate() {
            l.set_nonblocking(true)?;
            let mut l = TcpListener::from_std(l);
            poll.registry()
                .register(&mut l, Token(LISTENER_BASE - i), Interest::READABLE)?;
            listeners.push((Some(l), tls));
        }
        Ok(Epoll {
            core: Core {
                ops: Ops {
                    poll,
                    conns: Slab::with_capacity(1024),
                    timers: Timers::with_capacity(1024),
                    dirty: Vec::with_capacity(64),
                    dead: Vec::with_capacity(64),
                    listeners,
                    accept_paused_until: None,
                    waited: Duration::ZERO,
                },
                read_buf: vec![0; setup.read_buf_bytes.max(1024)].into_boxed_slice(),
                expired: Vec::with_capacity(64),
                track_waiting: setup.track_waiting,
            },
            events: Events::with_capacity(1024),
        })
    }

    /// Runs `h` until its `on_tick` says stop; then every connection still
    /// open is closed ([`Closed::Stopped`]).
    pub fn run<H: Handler>(&mut self, h: &mut H) -> io::Result<()> {
        self.core.run(h, &mut self.events)
    }

    /// Time spent waiting for events so far.
    pub fn waited(&self) -> Duration {
        self.core.ops.waited
    }
}

impl Core {
    fn run<H: Handler>(&mut self, h: &mut H, events: &mut Events) -> io::Result<()> {
        loop {
            let now = Instant::now();
            let tick = h.on_tick(&mut self.ops, now);
            self.settle(h, now);
            if tick.stop {
                let ids: Vec<ConnId> = self.ops.conns.iter().map(|(k, _)| k).collect();
                for id in ids {
                    self.ops.kill(id, Closed::Stopped);
                }
                self.reap(h, now);
                return Ok(());
            }
            let mut wake = now + STOP_POLL_INTERVAL;
            if let Some(t) = tick.wake_at {
                wake = wake.min(t);
            }
            if let Some(t) = self.ops.timers.next() {
                wake = wake.min(t);
            }
            if let Some(t) = self.ops.accept_paused_until {
                wake = wake.min(t);
            }
            let before = if self.track_waiting { Instant::now() } else { now };
            let timeout = wake.saturating_duration_since(before);
            if let Err(e) = self.ops.poll.poll(events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            let now = Instant::now();
            if self.track_waiting {
                self.ops.waited += now.saturating_duration_since(before);
            }
            self.resume_accepting(now);
            for ev in events.iter() {
                let token = ev.token();
                if token == WAKER {
                    continue;
                }
                let n = self.ops.listeners.len();
                if token.0 > LISTENER_BASE - n && token.0 <= LISTENER_BASE {
                    self.accept(h, LISTENER_BASE - token.0, now);
                    continue;
                }
                let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                let drain = ev.is_read_closed() || ev.is_error();
                self.on_event(h, token.0, readable, drain, now);
            }
            self.expired.clear();
            self.expired.extend(self.ops.timers.expired(now));
            for i in 0..self.expired.len() {
                let id = self.expired[i];
                let Some(c) = self.ops.conns.get(id) else {
                    continue;
                };
                if c.close_deadline.is_some_and(|d| now >= d) {
                    self.ops.kill(id, Closed::FlushTimeout);
                } else if c.closing.is_none() {
                    h.on_timer(&mut self.ops, now, id);
                }
                self.settle(h, now);
            }
        }
    }

    fn resume_accepting(&mut self, now: Instant) {
        let Some(t) = self.ops.accept_paused_until else {
            return;
        };
        if now < t {
            return;
        }
        self.ops.accept_paused_until = None;
        for (i, (l, _)) in self.ops.listeners.iter_mut().enumerate() {
            if let Some(l) = l {
                let _ = self.ops.poll.registry().register(
                    l,
                    Token(LISTENER_BASE - i),
                    Interest::READABLE,
                );
            }
        }
    }

    /// Accepts until `WouldBlock` (or a pause).
    fn accept<H: Handler>(&mut self, h: &mut H, i: usize, now: Instant) {
        loop {
            let (Some(l), implicit_tls) = &self.ops.listeners[i] else {
                return;
            };
            let implicit_tls = *implicit_tls;
            match l.accept() {
                Ok((mut stream, peer)) => {
                    let _ = socket::prepare_accepted(&stream);
                    let entry = self.ops.conns.vacant_entry();
                    let id = entry.key();
                    if self
                        .ops
                        .poll
                        .registry()
                        .register(
                            &mut stream,
                            Token(id),
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .is_err()
                    {
                        continue;
                    }
                    entry.insert(Conn::new(stream, false));
                    if h.on_accept(&mut self.ops, now, id, peer, implicit_tls) {
                        self.settle(h, now);
                    } else {
                        // Refused: best effort for what the handler wrote
                        // (e.g. a 421), then gone, with no on_closed.
                        if let Some(mut c) = self.ops.conns.try_remove(id) {
                            let _ = c.flush();
                        }
                        self.ops.timers.cancel(id);
                    }
                }
                // The backlog is empty.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // A signal interrupted accept(2): retry.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The peer gave up before we accepted: next one.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                // Out of descriptors/memory: the socket stays readable, so
                // retrying now would spin; rest the listener instead.
                Err(e) if is_fd_exhaustion(&e) => {
                    if let (Some(l), _) = &mut self.ops.listeners[i] {
                        let _ = self.ops.poll.registry().deregister(l);
                    }
                    self.ops.accept_paused_until = Some(now + ACCEPT_PAUSE);
                    return;
                }
                Err(_) => return,
            }
        }
    }

    /// A readiness event for connection `id`.
    fn on_event<H: Handler>(
        &mut self,
        h: &mut H,
        id: ConnId,
        readable: bool,
        drain: bool,
        now: Instant,
    ) {
        let Some(c) = self.ops.conns.get_mut(id) else {
            // A stale event for a connection closed earlier in this batch.
            return;
        };
        if c.closing == Some(Close::Abort) {
            return;
        }
        if c.connecting {
            c.connecting = false;
            // The first event of a connecting socket: SO_ERROR says how.
            let failed = match c.stream.take_error() {
                Ok(None) => None,
                Ok(Some(e)) | Err(e) => Some(e),
            };
            if let Some(e) = failed {
                self.ops.conns.remove(id);
                self.ops.timers.cancel(id);
                h.on_connected(&mut self.ops, now, id, Err(e));
                self.settle(h, now);
                return;
            }
            h.on_connected(&mut self.ops, now, id, Ok(()));
        }
        if readable {
            self.read(h, id, drain, now);
        }
        // A writable edge (or output queued by the callbacks): flush.
        self.ops.mark_dirty(id);
        self.settle(h, now);
    }

    /// Reads `id` until `WouldBlock`, EOF, an error, or the handler stops
    /// reading or closes it.
    fn read<H: Handler>(&mut self, h: &mut H, id: ConnId, drain: bool, now: Instant) {
        loop {
            let Some(c) = self.ops.conns.get_mut(id) else {
                return;
            };
            if c.closing.is_some() || c.eof || !c.reading {
                return;
            }
            if c.tls.is_some() {
                match self.read_tls(h, id, now) {
                    Some(true) => continue,
                    _ => return,
                }
            }
            let n = match c.stream.read(&mut self.read_buf) {
                // 0 bytes: the peer sent FIN.
                Ok(0) => {
                    c.eof = true;
                    h.on_peer_closed(&mut self.ops, now, id);
                    return;
                }
                Ok(n) => n,
                // Nothing buffered in the kernel: wait for readiness.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // A signal interrupted the syscall: just retry.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.ops.kill(id, Closed::Error(e));
                    return;
                }
            };
            h.on_input(&mut self.ops, now, id, &self.read_buf[..n]);
            // A short read emptied the receive queue (see the module doc).
            if n < self.read_buf.len() && !drain {
                let tls_now = self.ops.conns.get(id).is_some_and(|c| c.tls.is_some());
                if !tls_now {
                    return;
                }
            }
        }
    }

    /// One step of a TLS read: `Some(true)` read again, `Some(false)` wait
    /// for the next edge, `None` the connection ended.
    fn read_tls<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) -> Option<bool> {
        // Hand out what rustls already decrypted, one chunk per callback.
        loop {
            let c = self.ops.conns.get_mut(id)?;
            if c.closing.is_some() || c.eof || !c.reading {
                return Some(false);
            }
            let t = c.tls.as_mut()?;
            // The stream reports HandshakeDone exactly once, before any
            // plaintext.
            match t.stream.read_plaintext(&mut self.read_buf) {
                Ok(TlsRead::Data(n)) => {
                    h.on_input(&mut self.ops, now, id, &self.read_buf[..n]);
                    continue;
                }
                Ok(TlsRead::HandshakeDone) => {
                    h.on_tls_ready(&mut self.ops, now, id);
                    continue;
                }
                Ok(TlsRead::Closed) => {
                    c.eof = true;
                    h.on_peer_closed(&mut self.ops, now, id);
                    return None;
                }
                Ok(TlsRead::NeedCiphertext) => {}
                Err(e) => {
                    self.ops.kill(id, Closed::Error(e));
                    return None;
                }
            }
            // More ciphertext: what is buffered, else one large read(2).
            if t.cin_pos == t.cin_len {
                if c.eof {
                    return None;
                }
                match c.stream.read(&mut t.cin) {
                    Ok(0) => {
                        // FIN: tell rustls, which reports close_notify or
                        // truncation as the end.
                        t.stream.peer_eof();
                        continue;
                    }
                    Ok(n) => {
                        t.cin_pos = 0;
                        t.cin_len = n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.ops.kill(id, Closed::Error(e));
                        return None;
                    }
                }
            }
            match t.stream.read_ciphertext(&t.cin[t.cin_pos..t.cin_len]) {
                Ok(n) => t.cin_pos += n,
                Err(e) => {
                    // The alert is queued: try to deliver it, then give up.
                    let _ = c.flush();
                    self.ops.kill(id, Closed::Error(e));
                    return None;
                }
            }
        }
    }

    /// Flushes every dirty connection (telling handlers what left, which
    /// may queue more), resumes reads, then drops dead connections.
    fn settle<H: Handler>(&mut self, h: &mut H, now: Instant) {
        while let Some(id) = self.ops.dirty.pop() {
            let Some(c) = self.ops.conns.get_mut(id) else {
                continue;
            };
            c.dirty = false;
            if c.closing == Some(Close::Abort) {
                continue;
            }
            if std::mem::take(&mut c.read_now) {
                self.read(h, id, true, now);
            }
            self.flush_conn(h, id, now);
        }
        self.reap(h, now);
    }

    fn flush_conn<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) {
        loop {
            let Some(c) = self.ops.conns.get_mut(id) else {
                return;
            };
            if c.connecting || c.closing == Some(Close::Abort) {
                return;
            }
            let before = c.app.sent;
            let had = c.pending() > 0;
            let done = match c.flush() {
                Ok(d) => d,
                Err(e) => {
                    self.ops.kill(id, Closed::Error(e));
                    return;
                }
            };
            let progressed = c.app.sent != before || (had && done);
            if done && c.closing == Some(Close::Graceful) {
                self.ops.kill(id, Closed::Local);
                return;
            }
            if !done && c.closing == Some(Close::Graceful) && c.close_deadline.is_none() {
                let at = now + CLOSE_FLUSH_LIMIT;
                c.close_deadline = Some(at);
                self.ops.timers.schedule(id, at);
            }
            if !progressed {
                return;
            }
            let before_in = c.app.taken;
            h.on_written(&mut self.ops, now, id);
            // More output queued by on_written: flush it too (once it is
            // all out, on_written is not called again without progress).
            match self.ops.conns.get(id) {
                Some(c) if done && c.app.taken != before_in => continue,
                _ => return,
            }
        }
    }

    /// Drops dead connections and tells the handler.
    fn reap<H: Handler>(&mut self, h: &mut H, now: Instant) {
        while let Some((id, why)) = self.ops.dead.pop() {
            if let Some(c) = self.ops.conns.try_remove(id) {
                self.ops.timers.cancel(id);
                // Dropping the stream closes it (RST with abort_close) and
                // removes it from the epoll set.
                drop(c);
                h.on_closed(&mut self.ops, now, id, why);
                // on_closed may queue work on other connections.
                while let Some(other) = self.ops.dirty.pop() {
                    let Some(c) = self.ops.conns.get_mut(other) else {
                        continue;
                    };
                    c.dirty = false;
                    if std::mem::take(&mut c.read_now) {
                        self.read(h, other, true, now);
                    }
                    self.flush_conn(h, other, now);
                }
            }
        }
    }
}
