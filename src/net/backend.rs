//! The seam between a role and a backend: what a role's connection handler
//! is told ([`Handler`]) and what it may ask of the connections a backend
//! owns ([`Backend`]).
//!
//! A role (sink, blaster, probe) never touches a socket, a ring or a packet.
//! It implements [`Handler`]: it is told when a connection is accepted or
//! connected, when plaintext arrives, when output has left, when its
//! deadline passes and when it is gone, and once per turn of the loop
//! ([`Handler::on_tick`]) it runs its schedule. A backend (epoll through
//! mio, io_uring, AF_XDP with user-space TCP) owns everything that waits on
//! the outside world — sockets, buffers, TLS records, timers — and drives
//! the handler. Connections are named by a [`ConnId`]; the handler keeps
//! its per-connection state itself (e.g. in a `Vec` indexed by id), so it
//! can act on any connection from any callback.
//!
//! Contract (every backend keeps it; `tests/backend_contract.rs` checks it
//! on epoll, io_uring and xdp, each rule under the backend's name):
//! - Static dispatch: `run::<H: Handler>` per backend, every callback
//!   generic over the backend type. No `dyn` call and no allocation per
//!   event.
//! - `plain` in [`Handler::on_input`] is borrowed from the backend's read
//!   buffer, valid only during the call. Output given to
//!   [`Backend::write`] is queued per connection and flushed when the
//!   callback returns (several writes in one callback leave together).
//! - TLS lives in the backend ([`super::tls_stream`]): a handler sees only
//!   plaintext. After [`Backend::start_tls`] every byte read is ciphertext;
//!   what the backend had read in the clear and not yet delivered is
//!   dropped (STARTTLS, CVE-2011-0411); output queued before the call goes
//!   out in the clear first.
//! - [`Handler::on_closed`] comes exactly once per connection that was
//!   accepted or connected, never from inside another callback of the same
//!   handler (it is deferred to the loop), and the id may be reused after
//!   it. A failed connect is reported by [`Handler::on_connected`] with an
//!   error instead, and its id is gone after that call. A connect still
//!   pending when the run stops counts as open from [`Backend::connect`]:
//!   it ends with `on_closed(Closed::Stopped)`, not `on_connected`.
//! - Deadlines are one per connection ([`Backend::set_deadline`]); the
//!   handler's own timing comes from the instant [`Handler::on_tick`]
//!   returns.
//! - Callbacks never see an id that is closed or closing, except
//!   [`Handler::on_closed`] itself.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::Instant;

use super::tls::TlsInfo;
use super::tls_stream::{TlsSide, TlsStream};

/// What a thread's backend starts with.
pub struct Setup {
    /// Listeners of this thread (TCP ones with `SO_REUSEPORT`; a unix one
    /// shared by every thread, each holding a duplicate), each with whether
    /// it speaks TLS from the first byte.
    pub listeners: Vec<(Listener, bool)>,
    /// The run's stop signal: the loop is woken when it is set (the handler
    /// decides what a stop means in `on_tick`).
    pub stop: super::runtime::StopSignal,
    /// The thread's plaintext read buffer.
    pub read_buf_bytes: usize,
    /// Measure the time spent waiting for events ([`Backend::waited`]):
    /// one more clock read per turn, so only when the role uses it.
    pub track_waiting: bool,
}

/// A listening socket of a thread: TCP, or a unix-domain stream socket
/// (`sink --listen unix:/path`; the kernel-socket backends only, xdp
/// refuses it).
#[derive(Debug)]
pub enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// The peer address [`Handler::on_accept`] gets for a connection accepted
/// on a unix-domain socket, which has no IP address: `0.0.0.0:0`.
pub const UNIX_PEER: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));

impl From<std::net::TcpListener> for Listener {
    fn from(l: std::net::TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

impl From<std::os::unix::net::UnixListener> for Listener {
    fn from(l: std::os::unix::net::UnixListener) -> Self {
        Listener::Unix(l)
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }
}

impl Listener {
    /// Sets `O_NONBLOCK` on (or off).
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(on),
            Listener::Unix(l) => l.set_nonblocking(on),
        }
    }

    /// The TCP listener, for a backend that has no unix sockets (xdp): a
    /// unix one is an error that says which backends take it.
    pub fn into_tcp(self) -> io::Result<std::net::TcpListener> {
        match self {
            Listener::Tcp(l) => Ok(l),
            Listener::Unix(_) => Err(unix_unsupported()),
        }
    }
}

/// The error of a backend without unix-domain sockets.
pub fn unix_unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "unix sockets need a kernel-socket backend (--io epoll or uring)",
    )
}

/// What a finished run tells its role.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunStats {
    /// Time the loop spent waiting for events (the rest it was busy).
    pub waited: std::time::Duration,
}

/// A connection of one backend (reused after [`Handler::on_closed`]).
pub type ConnId = usize;

/// How a handler ends a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// Send what is queued (and a TLS close_notify), then FIN; bounded by
    /// a flush limit of the backend.
    Graceful,
    /// Drop it now (RST if the socket was made with `abort_close`).
    Abort,
}

/// Why a connection ended.
#[derive(Debug)]
pub enum Closed {
    /// The handler closed it ([`Backend::close`]).
    Local,
    /// A read or write failed (reset by the peer, TLS error, …).
    Error(io::Error),
    /// Its queued output could not be flushed within the backend's limit.
    FlushTimeout,
    /// The run ended with it still open.
    Stopped,
}

/// Options of an outgoing connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectOpts {
    /// Bind to this source address (port chosen by the kernel at connect).
    pub source_ip: Option<IpAddr>,
    /// Close with RST (`SO_LINGER 0`) instead of FIN.
    pub abort_close: bool,
}

/// What the handler wants after a turn of the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tick {
    /// Call [`Handler::on_tick`] again no later than this (it is also
    /// called after every batch of events).
    pub wake_at: Option<Instant>,
    /// End the run: every open connection is closed with
    /// [`Closed::Stopped`] and `run` returns.
    pub stop: bool,
}

/// What a backend counts of the bytes a handler wrote to a connection:
/// `taken` by [`Backend::write`], `sent` when they left. Plaintext counts as
/// sent once the socket took it; over TLS the plaintext becomes records at
/// once, so it counts as sent only when no record is left to send and the
/// handshake is over.
#[derive(Clone, Copy, Debug, Default)]
pub struct AppBytes {
    pub taken: u64,
    pub sent: u64,
}

impl AppBytes {
    /// After a write left: `unsent` bytes are still queued (plaintext, or
    /// records), `busy` says a send is still in the kernel's hands.
    #[inline]
    pub fn note_sent(&mut self, unsent: usize, busy: bool, tls: Option<&TlsStream>) {
        match tls {
            None => self.sent = self.taken - unsent as u64,
            Some(t) if unsent == 0 && !busy && !t.wants_write() && !t.is_handshaking() => {
                self.sent = self.taken;
            }
            Some(_) => {}
        }
    }
}

/// TLS facts of a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsState {
    /// A handshake completed on it.
    pub established: bool,
    /// That handshake was a resumption.
    pub resumed: bool,
    /// The cipher suite it negotiated (IANA code point; 0 without TLS).
    pub suite: u16,
    /// The key-exchange group it negotiated (IANA code point; 0 if none).
    pub group: u16,
}

impl TlsState {
    /// The facts of a connection's TLS stream, if it has one.
    pub fn of(stream: Option<&TlsStream>) -> Self {
        match stream {
            Some(t) if !t.is_handshaking() => {
                let (suite, group) = t.negotiated();
                Self {
                    established: true,
                    resumed: t.is_resumed(),
                    suite,
                    group,
                }
            }
            _ => Self::default(),
        }
    }
}

/// What a handler may ask of a backend (see the module doc).
pub trait Backend {
    /// Queues plaintext for `id` (encrypted if TLS is on).
    fn write(&mut self, id: ConnId, data: &[u8]);
    /// Bytes queued for `id` and not yet written (with TLS, the records not
    /// yet written; 0 once everything left).
    fn pending_output(&self, id: ConnId) -> usize;
    /// Application bytes given to [`Backend::write`] for `id` so far.
    fn app_bytes_in(&self, id: ConnId) -> u64;
    /// Application bytes known to have left the socket (exact in plaintext;
    /// with TLS, everything once every record is written).
    fn app_bytes_sent(&self, id: ConnId) -> u64;
    /// Switches `id` to TLS (see the module doc).
    fn start_tls(&mut self, id: ConnId, side: TlsSide) -> io::Result<()>;
    /// TLS facts of `id`.
    fn tls_state(&self, id: ConnId) -> TlsState;
    /// What `id`'s handshake negotiated.
    fn tls_info(&self, id: ConnId) -> Option<TlsInfo>;
    /// Stops (`false`) or resumes reading `id` (backpressure). Resuming
    /// reads what arrived meanwhile without waiting for a new event.
    fn set_reading(&mut self, id: ConnId, on: bool);
    /// Ends `id` (see [`Close`]); [`Handler::on_closed`] follows.
    fn close(&mut self, id: ConnId, how: Close);
    /// Arms (or with `None` clears) `id`'s one deadline.
    fn set_deadline(&mut self, id: ConnId, at: Option<Instant>);
    /// The local address of `id`.
    fn local_addr(&self, id: ConnId) -> Option<SocketAddr>;
    /// Starts a connection; [`Handler::on_connected`] follows. Errors are
    /// those of the attempt itself (e.g. `EADDRNOTAVAIL`: out of ports).
    fn connect(&mut self, target: SocketAddr, opts: ConnectOpts) -> io::Result<ConnId>;
    /// Like [`Backend::connect`], to the unix-domain stream socket at
    /// `path` (`opts.source_ip` does not apply). A backend without unix
    /// sockets (xdp) refuses with [`unix_unsupported`].
    fn connect_unix(&mut self, path: &Path, opts: ConnectOpts) -> io::Result<ConnId> {
        let _ = (path, opts);
        Err(unix_unsupported())
    }
    /// Connections open (accepted or connected, and not yet closed).
    fn open_connections(&self) -> usize;
    /// Closes every listener (no more accepts).
    fn stop_listening(&mut self);
    /// Time the loop spent waiting for events so far (the rest of the
    /// wall time it was busy: a thread busy nearly all the time is
    /// saturated).
    fn waited(&self) -> std::time::Duration;
}

/// A role's connection handler (see the module doc). Every method but
/// `on_tick` has a default that does nothing, so a role implements what
/// it uses.
#[allow(unused_variables)]
pub trait Handler {
    /// A listener accepted `id` from `peer` (`implicit_tls`: the listener
    /// is a TLS one; a unix-socket peer is [`UNIX_PEER`]). Return false to refuse it: it is closed at once
    /// (after what was written to it) and no `on_closed` follows.
    fn on_accept<B: Backend>(
        &mut self,
        be: &mut B,
        now: Instant,
        id: ConnId,
        peer: SocketAddr,
        implicit_tls: bool,
    ) -> bool {
        false
    }

    /// An outgoing connection is up (`Ok`) or failed (`Err`: the id is gone
    /// after this call, and no `on_closed` follows).
    fn on_connected<B: Backend>(
        &mut self,
        be: &mut B,
        now: Instant,
        id: ConnId,
        result: io::Result<()>,
    ) {
    }

    /// The TLS handshake of `id` completed.
    fn on_tls_ready<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId) {}

    /// Plaintext arrived on `id`.
    fn on_input<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId, plain: &[u8]) {}

    /// The peer ended its side of `id` (FIN, or TLS close_notify): no more
    /// input; output still works until the handler closes.
    fn on_peer_closed<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId) {}

    /// Some of `id`'s output left (see [`Backend::app_bytes_sent`] and
    /// [`Backend::pending_output`]): time to stamp it or queue more.
    fn on_written<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId) {}

    /// `id`'s deadline passed (it is cleared).
    fn on_timer<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId) {}

    /// `id` is gone.
    fn on_closed<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId, why: Closed) {}

    /// Once per turn of the loop, after the events of that turn (and at
    /// `wake_at`): the role's schedule, statistics and stop conditions.
    fn on_tick<B: Backend>(&mut self, be: &mut B, now: Instant) -> Tick;
}
