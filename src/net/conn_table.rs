//! The connection table every backend shares: what a connection is to the
//! [`Handler`] contract whatever carries its bytes, and the half of
//! [`Backend`] that follows from it.
//!
//! A backend keeps only its transport: how bytes arrive and leave (reads
//! and writes, ring entries, smoltcp sockets), how it waits, its accept and
//! connect details and its teardown. Everything else lives here, once:
//!
//! - [`Conn`]: the output bookkeeping ([`AppBytes`]), the TLS part, the
//!   reading and closing flags, whether it is dirty; the transport's own
//!   part is [`Conn::io`] ([`Part`]).
//! - [`Table`]: the connections (a slab: ids are reused after
//!   [`Handler::on_closed`]), their deadlines, the dirty list (connections
//!   with output to flush or reads to resume), the dead list (connections
//!   to end after the current callback, with why), and the transport's
//!   state ([`Table::io`], a [`Transport`]). It implements [`Backend`]:
//!   `write`, `start_tls`, `tls_state`, `tls_info`, `set_reading`, a
//!   graceful close with its TLS close_notify and `set_deadline` are the
//!   same on every backend; the rest asks the transport.
//! - One TLS receive dispatch ([`Table::tls_plaintext`]), one settle/reap
//!   loop ([`settle`], [`reap`]), one flush loop for transports that write
//!   synchronously ([`flush`]) and one deadline pass ([`fire_timers`]),
//!   driven through [`Settle`] by the backend's loop.
//!
//! Invariants: a connection is dirty at most once in the list; the first
//! reason a connection dies wins; a connection the transport calls
//! [`Part::gone`] (io_uring's zombie, waiting for its operations) is
//! invisible to the handler's calls; `on_closed` is called only from
//! [`reap`], never from inside another callback.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use slab::Slab;

use super::backend::{
    AppBytes, Backend, Close, Closed, ConnId, ConnectOpts, Handler, Tick, TlsState,
};
use super::runtime::STOP_POLL_INTERVAL;
use super::timer::Timers;
use super::tls::TlsInfo;
use super::tls_stream::{TlsRead, TlsSide, TlsStream};

/// How long a listener rests after EMFILE/ENFILE (and ENOBUFS/ENOMEM).
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// How long a graceful close may take to flush its last output.
pub const CLOSE_FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// Out of descriptors or memory: accepting again at once would spin on a
/// backlog that stays readable.
pub fn is_fd_exhaustion(errno: Option<i32>) -> bool {
    matches!(
        errno,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The TLS part of a connection (boxed: plaintext connections stay
/// small), with the transport's ciphertext input `input`.
pub struct TlsPart<X> {
    pub stream: TlsStream,
    pub input: X,
}

/// Plaintext waiting for the transport, from `pos`.
#[derive(Default)]
pub struct OutQueue {
    pub buf: Vec<u8>,
    pub pos: usize,
}

impl OutQueue {
    /// Bytes not yet taken by the transport.
    #[inline]
    pub fn len(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    /// The bytes not yet taken.
    #[inline]
    pub fn rest(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Empties the queue, keeping its allocation.
    #[inline]
    pub fn clear(&mut self) {
        self.buf.clear();
        self.pos = 0;
    }

    /// Appends `data`; an emptied queue starts over, and one that has
    /// sent at least `compact_after` bytes is compacted first.
    #[inline]
    pub fn push(&mut self, data: &[u8], compact_after: usize) {
        if self.pos == self.buf.len() {
            self.clear();
        } else if self.pos >= compact_after {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }
}

/// A transport's part of a connection.
pub trait Part {
    /// What the TLS part keeps of the ciphertext received.
    type TlsIn;
    /// A new TLS part's ciphertext input.
    fn tls_in() -> Self::TlsIn;
    /// Bytes queued and not yet written (plaintext, or TLS records).
    fn unsent(&self) -> usize;
    /// A write is still in the kernel's hands.
    fn busy(&self) -> bool {
        false
    }
    /// Queues plaintext (TLS off).
    fn queue(&mut self, data: &[u8]);
    /// Closed for the handler while the transport still holds it.
    fn gone(&self) -> bool {
        false
    }
    /// TLS was switched on: plaintext read and not delivered goes.
    fn tls_started(&mut self) {}
    /// What a close asked as `how` is on this connection.
    fn close_how(&self, how: Close) -> Close {
        how
    }
    /// When a graceful close ends as a flush timeout.
    fn close_deadline(&self) -> Option<Instant>;
    fn set_close_deadline(&mut self, at: Instant);
    /// The handler is to hear of this connection's deadline.
    fn timer_applies(&self) -> bool {
        true
    }
    /// Output may be written (the connection is up).
    fn flushable(&self) -> bool {
        true
    }
}

/// One connection: what every backend keeps, and the transport's part.
pub struct Conn<P: Part> {
    pub tls: Option<Box<TlsPart<P::TlsIn>>>,
    pub app: AppBytes,
    /// The peer's FIN (or close_notify) was seen and reported.
    pub eof: bool,
    /// The handler wants input.
    pub reading: bool,
    pub closing: Option<Close>,
    /// Queued in [`Table::dirty`].
    pub dirty: bool,
    /// Reading was resumed: read without waiting for new data.
    pub read_now: bool,
    pub io: P,
}

impl<P: Part> Conn<P> {
    pub fn new(io: P) -> Self {
        Conn {
            tls: None,
            app: AppBytes::default(),
            eof: false,
            reading: true,
            closing: None,
            dirty: false,
            read_now: false,
            io,
        }
    }

    /// Output not yet written: queued bytes, plus one if TLS has records.
    #[inline]
    pub fn pending(&self) -> usize {
        self.io.unsent() + usize::from(self.tls.as_ref().is_some_and(|t| t.stream.wants_write()))
    }

    /// Updates what counts as sent (see [`AppBytes`]).
    #[inline]
    pub fn note_sent(&mut self) {
        let tls = self.tls.as_ref().map(|t| &t.stream);
        self.app.note_sent(self.io.unsent(), self.io.busy(), tls);
    }
}

/// The transport's state and the part of [`Backend`] only it can answer.
pub trait Transport: Sized {
    type Part: Part;
    fn local_addr(t: &Table<Self>, id: ConnId) -> Option<SocketAddr>;
    fn connect(t: &mut Table<Self>, target: SocketAddr, opts: ConnectOpts) -> io::Result<ConnId>;
    /// A connect to a unix-domain socket (the kernel-socket transports).
    fn connect_unix(
        _t: &mut Table<Self>,
        _path: &std::path::Path,
        _opts: ConnectOpts,
    ) -> io::Result<ConnId> {
        Err(super::backend::unix_unsupported())
    }
    fn open_connections(t: &Table<Self>) -> usize;
    fn stop_listening(t: &mut Table<Self>);
    /// The handler stopped reading `id`.
    fn reading_stopped(_t: &mut Table<Self>, _id: ConnId) {}
}

/// The control surface handlers see: the connections and the transport's
/// state (everything but the loop's buffers).
pub struct Table<T: Transport> {
    pub conns: Slab<Conn<T::Part>>,
    pub timers: Timers,
    /// Connections with output to flush or reads to resume.
    pub dirty: Vec<ConnId>,
    /// Connections to end, with why (after the current callback).
    pub dead: Vec<(ConnId, Closed)>,
    /// Time spent waiting for events.
    pub waited: Duration,
    pub io: T,
}

/// What [`Table::tls_plaintext`] did.
pub enum TlsStep {
    /// Told the handler something: step again.
    Again,
    /// rustls needs ciphertext: the transport feeds it, then steps again.
    Need,
    /// Nothing more for now (the connection may have ended).
    Stop,
}

impl<T: Transport> Table<T> {
    pub fn new(io: T) -> Self {
        Table {
            conns: Slab::with_capacity(1024),
            timers: Timers::with_capacity(1024),
            dirty: Vec::with_capacity(64),
            dead: Vec::with_capacity(64),
            waited: Duration::ZERO,
            io,
        }
    }

    #[inline]
    pub fn mark_dirty(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(id) {
            if !c.dirty && !c.io.gone() {
                c.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    /// Ends `id` after the current callback (the first reason wins; later
    /// ones are dropped).
    pub fn kill(&mut self, id: ConnId, why: Closed) {
        if let Some(c) = self.conns.get_mut(id) {
            if !c.io.gone() && c.closing != Some(Close::Abort) {
                c.closing = Some(Close::Abort);
                self.dead.push((id, why));
            }
        }
    }

    /// The open connection `id` (not one the transport still holds).
    #[inline]
    fn live_mut(&mut self, id: ConnId) -> Option<&mut Conn<T::Part>> {
        self.conns.get_mut(id).filter(|c| !c.io.gone())
    }

    /// When the loop must wake at the latest: the handler's wish, the
    /// next deadline, and the stop poll.
    pub fn wake_at(&mut self, now: Instant, tick: &Tick) -> Instant {
        let mut wake = now + STOP_POLL_INTERVAL;
        if let Some(t) = tick.wake_at {
            wake = wake.min(t);
        }
        if let Some(t) = self.timers.next() {
            wake = wake.min(t);
        }
        wake
    }

    /// Arms the flush limit of a graceful close that could not flush yet.
    pub fn arm_close_deadline(&mut self, id: ConnId, now: Instant) {
        if let Some(c) = self.conns.get_mut(id) {
            if c.io.close_deadline().is_none() {
                let at = now + CLOSE_FLUSH_LIMIT;
                c.io.set_close_deadline(at);
                self.timers.schedule(id, at);
            }
        }
    }

    /// `id`'s TLS input while the handler reads ([`Table::tls_plaintext`]
    /// until it needs more): the connection when rustls wants ciphertext,
    /// `None` when there is nothing more for now.
    pub fn tls_input<H: Handler>(
        &mut self,
        h: &mut H,
        id: ConnId,
        now: Instant,
        buf: &mut [u8],
    ) -> Option<&mut Conn<T::Part>> {
        loop {
            match self.tls_plaintext(h, id, now, buf) {
                TlsStep::Again => {}
                TlsStep::Stop => return None,
                TlsStep::Need => break,
            }
        }
        self.conns.get_mut(id).filter(|c| c.tls.is_some())
    }

    /// One step of `id`'s TLS input while the handler reads: hands out
    /// what rustls decrypted (one chunk per callback, through `buf`), the
    /// end of its handshake (reported exactly once, before any plaintext)
    /// or the end of the stream.
    pub fn tls_plaintext<H: Handler>(
        &mut self,
        h: &mut H,
        id: ConnId,
        now: Instant,
        buf: &mut [u8],
    ) -> TlsStep {
        let Some(c) = self.conns.get_mut(id) else {
            return TlsStep::Stop;
        };
        if c.io.gone() || c.closing.is_some() || c.eof || !c.reading {
            return TlsStep::Stop;
        }
        let Some(t) = c.tls.as_mut() else {
            return TlsStep::Stop;
        };
        match t.stream.read_plaintext(buf) {
            Ok(TlsRead::Data(n)) => {
                h.on_input(self, now, id, &buf[..n]);
                TlsStep::Again
            }
            Ok(TlsRead::HandshakeDone) => {
                h.on_tls_ready(self, now, id);
                TlsStep::Again
            }
            Ok(TlsRead::Closed) => {
                c.eof = true;
                h.on_peer_closed(self, now, id);
                TlsStep::Stop
            }
            Ok(TlsRead::NeedCiphertext) => TlsStep::Need,
            Err(e) => {
                self.kill(id, Closed::Error(e));
                TlsStep::Stop
            }
        }
    }
}

impl<T: Transport> Backend for Table<T> {
    fn write(&mut self, id: ConnId, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let Some(c) = self.live_mut(id) else {
            return;
        };
        c.app.taken += data.len() as u64;
        match &mut c.tls {
            None => c.io.queue(data),
            Some(t) => t.stream.write_plaintext(data),
        }
        self.mark_dirty(id);
    }

    fn pending_output(&self, id: ConnId) -> usize {
        self.conns
            .get(id)
            .filter(|c| !c.io.gone())
            .map_or(0, Conn::pending)
    }

    fn app_bytes_in(&self, id: ConnId) -> u64 {
        self.conns.get(id).map_or(0, |c| c.app.taken)
    }

    fn app_bytes_sent(&self, id: ConnId) -> u64 {
        self.conns.get(id).map_or(0, |c| c.app.sent)
    }

    fn start_tls(&mut self, id: ConnId, side: TlsSide) -> io::Result<()> {
        let Some(c) = self.live_mut(id) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let stream = TlsStream::start(c.tls.is_some(), side)?;
        // Plaintext read and not delivered is dropped (CVE-2011-0411):
        // from here on every byte received is ciphertext.
        c.io.tls_started();
        c.tls = Some(Box::new(TlsPart {
            stream,
            input: T::Part::tls_in(),
        }));
        // A client's ClientHello is queued: flush it.
        self.mark_dirty(id);
        Ok(())
    }

    fn tls_state(&self, id: ConnId) -> TlsState {
        TlsState::of(
            self.conns
                .get(id)
                .and_then(|c| c.tls.as_ref())
                .map(|t| &t.stream),
        )
    }

    fn tls_info(&self, id: ConnId) -> Option<TlsInfo> {
        self.conns.get(id)?.tls.as_ref()?.stream.info()
    }

    fn set_reading(&mut self, id: ConnId, on: bool) {
        let Some(c) = self.live_mut(id) else {
            return;
        };
        if c.reading == on {
            return;
        }
        c.reading = on;
        if on {
            // What arrived meanwhile is read without waiting for more.
            c.read_now = true;
            self.mark_dirty(id);
        } else {
            T::reading_stopped(self, id);
        }
    }

    fn close(&mut self, id: ConnId, how: Close) {
        let Some(c) = self.live_mut(id) else {
            return;
        };
        match c.io.close_how(how) {
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
        if self.conns.get(id).is_none_or(|c| c.io.gone()) {
            return;
        }
        match at {
            Some(t) => self.timers.schedule(id, t),
            None => self.timers.cancel(id),
        }
    }

    fn local_addr(&self, id: ConnId) -> Option<SocketAddr> {
        T::local_addr(self, id)
    }

    fn connect(&mut self, target: SocketAddr, opts: ConnectOpts) -> io::Result<ConnId> {
        T::connect(self, target, opts)
    }

    fn connect_unix(&mut self, path: &std::path::Path, opts: ConnectOpts) -> io::Result<ConnId> {
        T::connect_unix(self, path, opts)
    }

    fn open_connections(&self) -> usize {
        T::open_connections(self)
    }

    fn stop_listening(&mut self) {
        T::stop_listening(self)
    }

    fn waited(&self) -> Duration {
        self.waited
    }
}

// ---- the loop's side ----------------------------------------------------------

/// A backend's loop as the settle/reap loop sees it.
pub trait Settle {
    type T: Transport;
    fn table(&mut self) -> &mut Table<Self::T>;
    /// Before each dirty connection is settled (xdp: listeners to close
    /// and connects to make).
    fn before<H: Handler>(&mut self, _h: &mut H, _now: Instant) {}
    /// Reading `id` was resumed: deliver what waits.
    fn resume<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant);
    /// Whatever else a dirty `id` needs (its output flushed, …).
    fn service<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant);
    /// Ends dead `id`'s transport; true when the handler is owed
    /// `on_closed`.
    fn retire(&mut self, id: ConnId, why: &Closed) -> bool;
}

/// A transport that writes synchronously (see [`flush`]).
pub trait PushOut: Settle {
    /// Writes `id`'s queued output: true once all of it is out.
    fn push_out(&mut self, id: ConnId) -> io::Result<bool>;
}

/// Settles one dirty connection; false when none is left.
#[inline]
fn settle_one<S: Settle, H: Handler>(s: &mut S, h: &mut H, now: Instant) -> bool {
    let Some(id) = s.table().dirty.pop() else {
        return false;
    };
    let Some(c) = s.table().conns.get_mut(id) else {
        return true;
    };
    c.dirty = false;
    if c.io.gone() || c.closing == Some(Close::Abort) {
        return true;
    }
    if std::mem::take(&mut c.read_now) {
        s.resume(h, id, now);
    }
    s.service(h, id, now);
    true
}

/// Settles every dirty connection (telling handlers what left, which may
/// make more dirty), then ends the dead ones.
pub fn settle<S: Settle, H: Handler>(s: &mut S, h: &mut H, now: Instant) {
    loop {
        s.before(h, now);
        if settle_one(s, h, now) {
            continue;
        }
        if s.table().dead.is_empty() {
            return;
        }
        reap(s, h, now);
    }
}

/// Ends the dead connections and tells the handler.
pub fn reap<S: Settle, H: Handler>(s: &mut S, h: &mut H, now: Instant) {
    while let Some((id, why)) = s.table().dead.pop() {
        if s.retire(id, &why) {
            h.on_closed(s.table(), now, id, why);
        }
        // on_closed may queue work on other connections.
        loop {
            s.before(h, now);
            if !settle_one(s, h, now) {
                break;
            }
        }
    }
}

/// The top of a loop's turn: the handler's schedule, then what it did
/// settled; when it says stop, every open connection is ended
/// ([`stop_all`]). Returns the turn's instant and the handler's wish.
pub fn turn<S: Settle, H: Handler>(s: &mut S, h: &mut H) -> (Instant, Tick) {
    let now = Instant::now();
    let tick = h.on_tick(s.table(), now);
    settle(s, h, now);
    if tick.stop {
        stop_all(s, h, now);
    }
    (now, tick)
}

/// Ends every open connection with [`Closed::Stopped`] (the end of a run).
pub fn stop_all<S: Settle, H: Handler>(s: &mut S, h: &mut H, now: Instant) {
    let t = s.table();
    let ids: Vec<ConnId> = t
        .conns
        .iter()
        .filter(|(_, c)| !c.io.gone())
        .map(|(k, _)| k)
        .collect();
    for id in ids {
        t.kill(id, Closed::Stopped);
    }
    reap(s, h, now);
}

/// Deadlines that passed: a graceful close out of time ends as
/// [`Closed::FlushTimeout`]; otherwise the handler hears of it.
pub fn fire_timers<S: Settle, H: Handler>(
    s: &mut S,
    h: &mut H,
    now: Instant,
    expired: &mut Vec<ConnId>,
) {
    expired.clear();
    expired.extend(s.table().timers.expired(now));
    for &id in expired.iter() {
        let t = s.table();
        let Some(c) = t.conns.get(id) else {
            continue;
        };
        if c.io.gone() {
            continue;
        }
        if c.io.close_deadline().is_some_and(|d| now >= d) {
            t.kill(id, Closed::FlushTimeout);
        } else if c.closing.is_none() && c.io.timer_applies() {
            h.on_timer(t, now, id);
        }
        settle(s, h, now);
    }
}

/// Writes `id`'s output and tells the handler what left (which may queue
/// more); ends a graceful close once everything is out, bounded by
/// [`CLOSE_FLUSH_LIMIT`].
pub fn flush<S: PushOut, H: Handler>(s: &mut S, h: &mut H, id: ConnId, now: Instant) {
    loop {
        let Some(c) = s.table().conns.get(id) else {
            return;
        };
        if !c.io.flushable() || c.closing == Some(Close::Abort) {
            return;
        }
        let before = c.app.sent;
        let had = c.pending() > 0;
        let done = match s.push_out(id) {
            Ok(d) => d,
            Err(e) => {
                s.table().kill(id, Closed::Error(e));
                return;
            }
        };
        let t = s.table();
        let c = &t.conns[id];
        let progressed = c.app.sent != before || (had && done);
        let graceful = c.closing == Some(Close::Graceful);
        let before_in = c.app.taken;
        if done && graceful {
            t.kill(id, Closed::Local);
            return;
        }
        if !done && graceful {
            t.arm_close_deadline(id, now);
        }
        // A closing connection is the backend's alone: no callback but
        // on_closed sees it again (the contract; io_uring already held it).
        if !progressed || graceful {
            return;
        }
        h.on_written(t, now, id);
        // More output queued by on_written: flush it too (once it is all
        // out, on_written is not called again without progress).
        match t.conns.get(id) {
            Some(c) if done && c.app.taken != before_in => continue,
            _ => return,
        }
    }
}
