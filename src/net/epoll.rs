//! The epoll backend (through mio): one `Poll` per pinned thread driving a
//! [`Handler`] over plain and TLS connections, TCP or unix-domain
//! ([`Stream`]; a unix listener's peers are [`UNIX_PEER`]).
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
//!   edge: only the next read sees the EOF). The same holds for TLS once
//!   rustls has taken and decrypted all of a short read.
//! - Backpressure ([`Backend::set_reading`]) stops reading without touching
//!   the registration; resuming reads at once what arrived meanwhile (its
//!   edge was already consumed).
//! - Accept drains the listener until `WouldBlock`; out of descriptors or
//!   memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) pauses the listener for
//!   [`ACCEPT_PAUSE`] instead of spinning on a readable backlog.
//! - A connect completes on its first event: `SO_ERROR` says how (no
//!   `getpeername` per session).
//! - Output is queued per connection and written when the callback that
//!   queued it returns, so replies to one pipelined batch leave in one
//!   `write`. TLS records go straight from rustls to the socket (one
//!   vectored write), plaintext queued before a TLS switch first.
//! - A graceful close sends what is queued (and a TLS close_notify), bounded
//!   by [`super::conn_table::CLOSE_FLUSH_LIMIT`]; dropping the socket removes it from the epoll
//!   set, so no `epoll_ctl(DEL)` per session.
//!
//! What every backend's connection has in common (the output bookkeeping,
//! TLS, the flags, the settle/reap loop, half of [`Backend`]) is in
//! [`super::conn_table`]; this module is the transport.
//!
//! Invariants: see [`super::backend`]; no callback is re-entered; an idle
//! plaintext connection holds no read buffer and no TLS state (the thread
//! has one read buffer; TLS state is boxed per TLS connection).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};

use super::backend::{
    Close, Closed, ConnId, ConnectOpts, Handler, Listener, RunStats, Setup, UNIX_PEER,
};
use super::conn_table::{
    self, is_fd_exhaustion, OutQueue, Part, PushOut, Settle, Table, Transport, ACCEPT_PAUSE,
};
use super::socket;

/// Once this many bytes of a write queue have been sent, the queue is
/// compacted even if more is pending.
const COMPACT_AFTER_BYTES: usize = 64 * 1024;
/// Ciphertext buffer of a connection that reads full TLS records: one
/// record (16 KiB + overhead).
const TLS_IN_BYTES: usize = 16 * 1024 + 512;
/// Its first size: a handshake flight and SMTP's short records fit, and a
/// new TLS connection zeroes 4 KiB instead of 16 (17,600 instructions per
/// session, callgrind); the first read that fills it grows it to
/// [`TLS_IN_BYTES`].
const TLS_IN_FIRST_BYTES: usize = 4 * 1024;

const WAKER: Token = Token(usize::MAX);
const LISTENER_BASE: usize = usize::MAX - 1;

/// Ciphertext read from the socket and not yet taken by rustls.
pub struct CipherIn {
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
}

/// A connection's socket: TCP, or unix-domain (`unix:/path`).
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            Stream::Tcp(s) => s.take_error(),
            Stream::Unix(s) => s.take_error(),
        }
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Stream::Tcp(s) => s.local_addr().ok(),
            Stream::Unix(_) => None,
        }
    }
}

impl Read for Stream {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    #[inline]
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.register(r, t, i),
            Stream::Unix(s) => s.register(r, t, i),
        }
    }

    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.reregister(r, t, i),
            Stream::Unix(s) => s.reregister(r, t, i),
        }
    }

    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.deregister(r),
            Stream::Unix(s) => s.deregister(r),
        }
    }
}

/// A listener of the thread: TCP, or unix-domain.
enum Listen {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listen {
    /// The next connection and its peer ([`UNIX_PEER`] on a unix socket).
    fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
        match self {
            Listen::Tcp(l) => {
                let (s, peer) = l.accept()?;
                let _ = socket::prepare_accepted(&s);
                Ok((Stream::Tcp(s), peer))
            }
            Listen::Unix(l) => l.accept().map(|(s, _)| (Stream::Unix(s), UNIX_PEER)),
        }
    }
}

impl Source for Listen {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listen::Tcp(l) => l.register(r, t, i),
            Listen::Unix(l) => l.register(r, t, i),
        }
    }

    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listen::Tcp(l) => l.reregister(r, t, i),
            Listen::Unix(l) => l.reregister(r, t, i),
        }
    }

    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Listen::Tcp(l) => l.deregister(r),
            Listen::Unix(l) => l.deregister(r),
        }
    }
}

/// A connection's socket and plaintext output.
pub struct Sock {
    stream: Stream,
    connecting: bool,
    /// Plaintext (or pre-TLS plaintext) waiting for the socket.
    out: OutQueue,
    close_deadline: Option<Instant>,
}

impl Part for Sock {
    type TlsIn = CipherIn;

    fn tls_in() -> CipherIn {
        CipherIn {
            buf: vec![0; TLS_IN_FIRST_BYTES].into_boxed_slice(),
            pos: 0,
            len: 0,
        }
    }

    #[inline]
    fn unsent(&self) -> usize {
        self.out.len()
    }

    #[inline]
    fn queue(&mut self, data: &[u8]) {
        self.out.push(data, COMPACT_AFTER_BYTES);
    }

    fn close_deadline(&self) -> Option<Instant> {
        self.close_deadline
    }

    fn set_close_deadline(&mut self, at: Instant) {
        self.close_deadline = Some(at);
    }

    #[inline]
    fn flushable(&self) -> bool {
        !self.connecting
    }
}

type Conn = conn_table::Conn<Sock>;

fn new_conn(stream: Stream, connecting: bool) -> Conn {
    Conn::new(Sock {
        stream,
        connecting,
        out: OutQueue::default(),
        close_deadline: None,
    })
}

/// Writes `c`'s queued output: `Ok(true)` all out, `Ok(false)` the socket
/// is full (a writable edge will come).
fn write_out(c: &mut Conn) -> io::Result<bool> {
    let r = write_queued(c);
    c.note_sent();
    r
}

fn write_queued(c: &mut Conn) -> io::Result<bool> {
    let s = &mut c.io;
    while !s.out.is_empty() {
        match s.stream.write(s.out.rest()) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => s.out.pos += n,
            // Socket send buffer full: wait for writable.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    s.out.clear();
    if let Some(t) = &mut c.tls {
        while t.stream.wants_write() {
            match t.stream.write_ciphertext_to(&mut s.stream) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(true)
}

/// The thread's poll and listeners.
pub struct EpollIo {
    poll: Poll,
    listeners: Vec<(Option<Listen>, bool)>,
    accept_paused_until: Option<Instant>,
}

/// The control surface handlers see (everything but the read buffer).
pub type Ops = Table<EpollIo>;

impl Transport for EpollIo {
    type Part = Sock;

    fn local_addr(t: &Ops, id: ConnId) -> Option<SocketAddr> {
        t.conns.get(id)?.io.stream.local_addr()
    }

    fn connect(t: &mut Ops, target: SocketAddr, opts: ConnectOpts) -> io::Result<ConnId> {
        let stream = socket::connect(target, opts.source_ip, opts.abort_close)?;
        add_connecting(t, Stream::Tcp(stream))
    }

    fn connect_unix(t: &mut Ops, path: &std::path::Path, _opts: ConnectOpts) -> io::Result<ConnId> {
        // A unix connect completes at once or fails (EAGAIN: the
        // listener's backlog is full); its first event says which.
        add_connecting(t, Stream::Unix(UnixStream::connect(path)?))
    }

    fn open_connections(t: &Ops) -> usize {
        t.conns.len()
    }

    fn stop_listening(t: &mut Ops) {
        for (l, _) in t.io.listeners.iter_mut() {
            if let Some(mut l) = l.take() {
                let _ = t.io.poll.registry().deregister(&mut l);
            }
        }
    }
}

/// Registers a connecting `stream` and gives it an id.
fn add_connecting(t: &mut Ops, mut stream: Stream) -> io::Result<ConnId> {
    let entry = t.conns.vacant_entry();
    let id = entry.key();
    t.io.poll.registry().register(
        &mut stream,
        Token(id),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    entry.insert(new_conn(stream, true));
    Ok(id)
}

/// Runs `h` on epoll until its `on_tick` says stop.
pub fn run<H: Handler>(setup: Setup, h: &mut H) -> io::Result<RunStats> {
    let mut b = Epoll::new(setup)?;
    b.run(h)?;
    Ok(RunStats { waited: b.waited() })
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
            let mut l = match l {
                Listener::Tcp(l) => Listen::Tcp(TcpListener::from_std(l)),
                Listener::Unix(l) => Listen::Unix(UnixListener::from_std(l)),
            };
            poll.registry()
                .register(&mut l, Token(LISTENER_BASE - i), Interest::READABLE)?;
            listeners.push((Some(l), tls));
        }
        Ok(Epoll {
            core: Core {
                ops: Table::new(EpollIo {
                    poll,
                    listeners,
                    accept_paused_until: None,
                }),
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

impl Settle for Core {
    type T = EpollIo;

    #[inline]
    fn table(&mut self) -> &mut Ops {
        &mut self.ops
    }

    fn resume<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) {
        self.read(h, id, true, now);
    }

    fn service<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) {
        conn_table::flush(self, h, id, now);
    }

    fn retire(&mut self, id: ConnId, _why: &Closed) -> bool {
        let Some(c) = self.ops.conns.try_remove(id) else {
            return false;
        };
        self.ops.timers.cancel(id);
        // Dropping the stream closes it (RST with abort_close) and removes
        // it from the epoll set.
        drop(c);
        true
    }
}

impl PushOut for Core {
    #[inline]
    fn push_out(&mut self, id: ConnId) -> io::Result<bool> {
        write_out(&mut self.ops.conns[id])
    }
}

impl Core {
    fn run<H: Handler>(&mut self, h: &mut H, events: &mut Events) -> io::Result<()> {
        loop {
            let (now, tick) = conn_table::turn(self, h);
            if tick.stop {
                return Ok(());
            }
            let mut wake = self.ops.wake_at(now, &tick);
            if let Some(t) = self.ops.io.accept_paused_until {
                wake = wake.min(t);
            }
            let before = if self.track_waiting {
                Instant::now()
            } else {
                now
            };
            let timeout = wake.saturating_duration_since(before);
            if let Err(e) = self.ops.io.poll.poll(events, Some(timeout)) {
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
                let n = self.ops.io.listeners.len();
                if token.0 > LISTENER_BASE - n && token.0 <= LISTENER_BASE {
                    self.accept(h, LISTENER_BASE - token.0, now);
                    continue;
                }
                let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                let drain = ev.is_read_closed() || ev.is_error();
                self.on_event(h, token.0, readable, drain, now);
            }
            let mut expired = std::mem::take(&mut self.expired);
            conn_table::fire_timers(self, h, now, &mut expired);
            self.expired = expired;
        }
    }

    fn resume_accepting(&mut self, now: Instant) {
        let io = &mut self.ops.io;
        let Some(t) = io.accept_paused_until else {
            return;
        };
        if now < t {
            return;
        }
        io.accept_paused_until = None;
        for (i, (l, _)) in io.listeners.iter_mut().enumerate() {
            if let Some(l) = l {
                let _ =
                    io.poll
                        .registry()
                        .register(l, Token(LISTENER_BASE - i), Interest::READABLE);
            }
        }
    }

    /// Accepts until `WouldBlock` (or a pause).
    fn accept<H: Handler>(&mut self, h: &mut H, i: usize, now: Instant) {
        loop {
            let (Some(l), implicit_tls) = &self.ops.io.listeners[i] else {
                return;
            };
            let implicit_tls = *implicit_tls;
            match l.accept() {
                Ok((mut stream, peer)) => {
                    let entry = self.ops.conns.vacant_entry();
                    let id = entry.key();
                    if self
                        .ops
                        .io
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
                    entry.insert(new_conn(stream, false));
                    if h.on_accept(&mut self.ops, now, id, peer, implicit_tls) {
                        conn_table::settle(self, h, now);
                    } else {
                        // Refused: best effort for what the handler wrote
                        // (e.g. a 421), then gone, with no on_closed.
                        if let Some(mut c) = self.ops.conns.try_remove(id) {
                            let _ = write_out(&mut c);
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
                Err(e) if is_fd_exhaustion(e.raw_os_error()) => {
                    let io = &mut self.ops.io;
                    if let (Some(l), _) = &mut io.listeners[i] {
                        let _ = io.poll.registry().deregister(l);
                    }
                    io.accept_paused_until = Some(now + ACCEPT_PAUSE);
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
        if c.io.connecting {
            c.io.connecting = false;
            // The first event of a connecting socket: SO_ERROR says how.
            let failed = match c.io.stream.take_error() {
                Ok(None) => None,
                Ok(Some(e)) | Err(e) => Some(e),
            };
            if let Some(e) = failed {
                self.ops.conns.remove(id);
                self.ops.timers.cancel(id);
                h.on_connected(&mut self.ops, now, id, Err(e));
                conn_table::settle(self, h, now);
                return;
            }
            h.on_connected(&mut self.ops, now, id, Ok(()));
        }
        if readable {
            self.read(h, id, drain, now);
        }
        // A writable edge (or output queued by the callbacks): flush.
        self.ops.mark_dirty(id);
        conn_table::settle(self, h, now);
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
                self.read_tls(h, id, drain, now);
                return;
            }
            let n = match c.io.stream.read(&mut self.read_buf) {
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
            // A short read emptied the receive queue (see the module doc);
            // also after a switch to TLS in this chunk: the peer's first
            // record comes after our reply, on a new edge.
            if n < self.read_buf.len() && !drain {
                return;
            }
        }
    }

    /// TLS input until the next edge is needed (or the connection ended).
    /// As for plaintext, a short read emptied the receive queue: once rustls
    /// has taken it all, the read that would only say EAGAIN is skipped
    /// (unless the event reported the peer's close).
    fn read_tls<H: Handler>(&mut self, h: &mut H, id: ConnId, drain: bool, now: Instant) {
        let mut emptied = false;
        // Hand out what rustls already decrypted, one chunk per callback,
        // then feed it more.
        while let Some(c) = self.ops.tls_input(h, id, now, &mut self.read_buf) {
            let Some(t) = c.tls.as_mut() else {
                return;
            };
            // More ciphertext: what is buffered, else one large read(2).
            let cin = &mut t.input;
            if cin.pos == cin.len {
                if c.eof || emptied {
                    return;
                }
                // The last read filled the buffer: records are arriving
                // whole; read them whole (everything buffered was taken).
                if cin.len == cin.buf.len() && cin.buf.len() < TLS_IN_BYTES {
                    cin.buf = vec![0; TLS_IN_BYTES].into_boxed_slice();
                }
                match c.io.stream.read(&mut cin.buf) {
                    Ok(0) => {
                        // FIN: tell rustls, which reports close_notify or
                        // truncation as the end.
                        t.stream.peer_eof();
                        continue;
                    }
                    Ok(n) => {
                        cin.pos = 0;
                        cin.len = n;
                        emptied = n < cin.buf.len() && !drain;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.ops.kill(id, Closed::Error(e));
                        return;
                    }
                }
            }
            match t.stream.read_ciphertext(&cin.buf[cin.pos..cin.len]) {
                Ok(n) => cin.pos += n,
                Err(e) => {
                    // The alert is queued: try to deliver it, then give up.
                    let _ = write_out(c);
                    self.ops.kill(id, Closed::Error(e));
                    return;
                }
            }
        }
    }
}
