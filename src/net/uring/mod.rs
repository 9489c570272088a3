//! The io_uring backend: one ring per pinned thread driving a [`Handler`]
//! over plain and TLS connections, TCP or unix-domain (the ring works on
//! descriptors alike; a unix listener skips `getpeername`: its peers are
//! [`super::backend::UNIX_PEER`]), with the same observable behaviour
//! as [`super::epoll`] (see [`super::backend`] for the contract).
//!
//! How it talks to the kernel:
//! - One ring per thread, made on that thread with `SINGLE_ISSUER` and
//!   `DEFER_TASKRUN` where the kernel has them (completions are then
//!   processed only when the loop asks for them, on this thread). Each
//!   connection's socket is also put in the ring's registered (fixed) file
//!   table at the slot of its [`ConnId`], so operations skip the per-call
//!   descriptor lookup; the ordinary descriptor is kept too (addresses,
//!   `/proc` counts) and both are closed through the ring.
//! - Sink: one multishot accept per listener (the listener has
//!   `TCP_NODELAY`, which accepted sockets inherit; `getpeername` is the
//!   only system call per accept besides the fixed-table update).
//!   Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) rests
//!   the listener for 100 ms, as epoll does.
//! - Receives are multishot, from one provided-buffer ring per thread: the
//!   kernel picks a buffer only when data arrives, so an idle connection
//!   holds no receive buffer. Plaintext is handed to the handler straight
//!   from that buffer, which goes back to the ring after the callback; TLS
//!   ciphertext is copied into the connection's TLS part first. When the
//!   ring runs dry the receive ends (`ENOBUFS`) and is re-armed once
//!   buffers are back: data waits in the socket, nothing is lost.
//! - Sends: output is queued per connection and sent when the turn's
//!   callbacks are done, one send in flight per connection (the next
//!   batch waits in a second buffer), `MSG_WAITALL` so one completion
//!   says the whole batch left. A turn that queued a send on an outgoing
//!   connection submits it before waiting and handles what completed at
//!   once, so the client's `on_written` is stamped when its bytes left, not
//!   when the loop next wakes together with the reply (epoll's writes are
//!   synchronous, so there the question does not arise).
//!   Connect, close and cancel go through the
//!   ring too; the wait carries its own timeout (one per wait, from the
//!   thread's timer wheel), and a stop wakes it through an eventfd read
//!   on the ring.
//!
//! Buffers outlive the operations that use them: a provided buffer belongs
//! to the kernel from when it is put in the ring until a completion hands
//! it back, whichever connection that completion is for (a closed one's is
//! dropped and the buffer returned); a send's buffer is not touched while
//! the send is in flight; a closed connection stays in the table as a
//! zombie, its operations cancelled, until every one of them has completed
//! (and its fixed slot is closed), and only then may its id be reused. At
//! the end of a run everything still in flight is cancelled and waited for
//! before any memory is freed; if the kernel does not answer in time, the
//! memory is leaked rather than freed.
//!
//! What every backend's connection has in common (the output bookkeeping,
//! TLS, the flags, the settle/reap loop, half of [`super::backend::Backend`])
//! is in [`super::conn_table`]; this module is the transport: the ring
//! ([`Uring`]), the kernel probe ([`check`]), the receive buffers
//! (`buf_ring`) and what each completion means (`complete`).
//!
//! Invariants: see [`super::backend`]; no callback is re-entered; every
//! `unsafe` block here has a `// SAFETY:` line (as every one elsewhere in
//! `src/net` does: sockets, `/proc`, the AF_XDP rings and the BPF loader).

use std::fs::File;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::types::{CancelBuilder, Fd, Fixed, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
use socket2::{SockAddr, SockRef};

use super::backend::{
    Close, Closed, ConnId, ConnectOpts, Handler, Listener as Listening, RunStats, Setup,
};
use super::conn_table::{self, Part, Settle, Table, Transport};
use super::socket;

mod buf_ring;
mod complete;
mod probe;

use buf_ring::{BufRing, BGID};
pub use probe::{check, explain_setup_error, kernel_version, Missing};

/// Submission queue entries (the completion queue has 8 times as many;
/// the kernel keeps any overflow, `NODROP`).
const SQ_ENTRIES: u32 = 2048;
/// Provided receive buffers per thread, and their size: 2 MiB in all,
/// all of it touched over time (the kernel takes buffers in ring order).
/// A connection holds one only from its completion to the end of the
/// callback; more connections with data at once than buffers end their
/// receives with `ENOBUFS` and are re-armed on the next turn.
const BUF_COUNT: u16 = 128;
const BUF_BYTES: usize = 16 * 1024;
/// Most fixed-file slots per ring (also bounded by `RLIMIT_NOFILE`).
const MAX_FIXED: u32 = 1 << 17;
/// A send buffer larger than this is freed once empty (an idle connection
/// keeps a small one).
const KEEP_SEND_BYTES: usize = 16 * 1024;
/// How long the end of a run waits for cancelled operations.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// Completions taken from the queue per batch.
const CQE_BATCH: usize = 256;

/// Runs `h` on io_uring until its `on_tick` says stop (see [`check`]).
pub fn run<H: Handler>(setup: Setup, h: &mut H) -> io::Result<RunStats> {
    check().map_err(io::Error::other)?;
    let mut u = Uring::new(setup)?;
    u.run(h)?;
    Ok(RunStats {
        waited: u.ops.waited,
    })
}

// ---- user data ---------------------------------------------------------------

/// What a completion is for (the low byte of its user data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Recv = 1,
    Send = 2,
    Connect = 3,
    /// The close of a fixed-file slot (the slot is free once it completes).
    CloseFixed = 4,
    /// A listener's multishot accept (the id is the listener's index).
    Accept = 5,
    /// The stop eventfd's read.
    Wake = 6,
    /// Anything whose completion needs no bookkeeping (a cancel, the close
    /// of an ordinary descriptor).
    Other = 7,
}

/// User data: op in bits 0..8, id in 8..40, generation in 40..64.
fn user_data(op: Op, id: usize, gen: u32) -> u64 {
    (op as u64) | ((id as u64 & 0xffff_ffff) << 8) | (u64::from(gen & 0xff_ffff) << 40)
}

fn split_user_data(ud: u64) -> (u8, usize, u32) {
    (
        (ud & 0xff) as u8,
        ((ud >> 8) & 0xffff_ffff) as usize,
        (ud >> 40) as u32,
    )
}

/// Builds an entry on a connection's fixed slot, or its descriptor.
macro_rules! on_fd {
    ($fixed:expr, $id:expr, $raw:expr, |$f:ident| $build:expr) => {
        if $fixed {
            let $f = Fixed($id as u32);
            $build
        } else {
            let $f = Fd($raw);
            $build
        }
    };
}

// ---- connections --------------------------------------------------------------

/// Ciphertext received and not yet taken by rustls.
#[derive(Default)]
pub struct CipherIn {
    buf: Vec<u8>,
    pos: usize,
    /// The peer's FIN was handed to rustls.
    fin_fed: bool,
}

/// Where a connect goes (kept until its completion).
struct Dial {
    addr: SockAddr,
    source: Option<IpAddr>,
}

/// The parts of a connection that only some connections need.
#[derive(Default)]
struct Extra {
    /// Where a connect goes (until it completes).
    dial: Option<Dial>,
    /// Plaintext received while the handler was not reading.
    held: Vec<u8>,
    /// A graceful close ends as a flush timeout at this instant.
    close_deadline: Option<Instant>,
    /// A graceful close that ends as this error (a TLS alert to flush).
    close_error: Option<io::Error>,
}

/// A connection's socket, its operations in flight and its output.
pub struct Sock {
    /// The ordinary descriptor (`None` once its close is submitted).
    fd: Option<OwnedFd>,
    /// Also in the fixed-file table at slot `id`.
    fixed: bool,
    gen: u32,
    /// Closed for the handler; waiting for its operations to complete.
    zombie: bool,
    /// Operations in flight.
    recv_armed: bool,
    send_inflight: bool,
    connecting: bool,
    close_inflight: bool,
    /// What only some connections need (boxed: an idle one holds none).
    extra: Option<Box<Extra>>,
    /// Output being sent (untouched while `send_inflight`), from `send_pos`.
    sending: Vec<u8>,
    send_pos: usize,
    /// Output queued since (plaintext, or TLS records).
    queued: Vec<u8>,
    /// The peer's FIN arrived (reported once `held` is delivered).
    peer_fin: bool,
    /// The handler is owed `on_closed` (false for a refused accept).
    notify: bool,
    /// Made by `connect` (its sends are stamped when they leave, see
    /// `UringIo::stamp_sends`).
    outgoing: bool,
}

impl Part for Sock {
    type TlsIn = CipherIn;

    fn tls_in() -> CipherIn {
        CipherIn::default()
    }

    #[inline]
    fn unsent(&self) -> usize {
        self.sending.len() - self.send_pos + self.queued.len()
    }

    #[inline]
    fn busy(&self) -> bool {
        self.send_inflight
    }

    #[inline]
    fn queue(&mut self, data: &[u8]) {
        self.queued.extend_from_slice(data);
    }

    #[inline]
    fn gone(&self) -> bool {
        self.zombie
    }

    fn tls_started(&mut self) {
        if let Some(x) = &mut self.extra {
            x.held = Vec::new();
        }
    }

    fn close_deadline(&self) -> Option<Instant> {
        self.extra.as_ref().and_then(|x| x.close_deadline)
    }

    fn set_close_deadline(&mut self, at: Instant) {
        self.extra.get_or_insert_with(Box::default).close_deadline = Some(at);
    }
}

type Conn = conn_table::Conn<Sock>;

impl Conn {
    fn extra(&mut self) -> &mut Extra {
        self.io.extra.get_or_insert_with(Box::default)
    }

    fn held(&self) -> &[u8] {
        self.io.extra.as_ref().map_or(&[], |x| &x.held)
    }

    fn raw(&self) -> RawFd {
        self.io.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    fn in_flight(&self) -> bool {
        self.io.recv_armed || self.io.send_inflight || self.io.connecting || self.io.close_inflight
    }

    /// Open for the handler (not closing, not gone).
    fn live(&self) -> bool {
        !self.io.zombie && self.closing.is_none()
    }
}

fn new_conn(fd: OwnedFd, fixed: bool, gen: u32) -> Conn {
    Conn::new(Sock {
        fd: Some(fd),
        fixed,
        gen,
        zombie: false,
        recv_armed: false,
        send_inflight: false,
        connecting: false,
        close_inflight: false,
        extra: None,
        sending: Vec::new(),
        send_pos: 0,
        queued: Vec::new(),
        peer_fin: false,
        notify: true,
        outgoing: false,
    })
}

struct Listener {
    sock: Option<Listening>,
    /// A unix-domain listener: its peers have no IP address.
    unix: bool,
    implicit_tls: bool,
    armed: bool,
}

/// The thread's ring and listeners.
pub struct UringIo {
    ring: IoUring,
    /// Connections whose receive is to be armed before the next wait.
    rearm: Vec<ConnId>,
    /// Entries that did not fit in the submission queue (kept in order).
    overflow: Vec<squeue::Entry>,
    listeners: Vec<Listener>,
    accept_paused_until: Option<Instant>,
    /// Connections open for the handler.
    open: usize,
    fixed_slots: u32,
    next_gen: u32,
    /// Operations in flight that point at memory or a slot of ours.
    in_flight: usize,
    /// A send of an outgoing connection was queued this turn: submit it
    /// before waiting and handle what completed at once, so `on_written`
    /// comes when the bytes left and not when the loop next wakes (with
    /// a reply that may have arrived meanwhile: a client times its
    /// phases from the write).
    stamp_sends: bool,
}

/// The control surface handlers see (everything but the buffers).
pub type Ops = Table<UringIo>;

impl Ops {
    /// Queues `e` for the next submission.
    fn push(&mut self, e: squeue::Entry) {
        if self.io.overflow.is_empty() {
            // SAFETY: every entry built in this module points only at memory
            // that outlives the operation: provided buffers (the buffer
            // ring), a send buffer that is not touched until the send
            // completes, a connect address boxed in its connection until the
            // connect completes, the eventfd buffer of the loop; a zombie
            // connection is not dropped while any of these is in flight.
            if unsafe { self.io.ring.submission().push(&e) }.is_ok() {
                return;
            }
            if self.io.ring.submit().is_ok() {
                // SAFETY: as above.
                if unsafe { self.io.ring.submission().push(&e) }.is_ok() {
                    return;
                }
            }
        }
        self.io.overflow.push(e);
    }

    /// Moves entries that did not fit into the submission queue.
    fn push_overflow(&mut self) {
        while !self.io.overflow.is_empty() {
            let mut moved = 0;
            {
                let mut sq = self.io.ring.submission();
                for e in &self.io.overflow {
                    // SAFETY: as in `push`.
                    if unsafe { sq.push(e) }.is_err() {
                        break;
                    }
                    moved += 1;
                }
            }
            self.io.overflow.drain(..moved);
            if self.io.overflow.is_empty() || self.io.ring.submit().is_err() {
                return;
            }
        }
    }

    /// A new connection on `fd` (in the fixed table if there is room).
    fn insert(&mut self, fd: OwnedFd) -> ConnId {
        let entry = self.conns.vacant_entry();
        let id = entry.key();
        let fixed = (id as u64) < u64::from(self.io.fixed_slots)
            && self
                .io
                .ring
                .submitter()
                .register_files_update(id as u32, &[fd.as_raw_fd()])
                .is_ok();
        self.io.next_gen = self.io.next_gen.wrapping_add(1) & 0xff_ffff;
        entry.insert(new_conn(fd, fixed, self.io.next_gen));
        id
    }

    fn arm_recv(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.io.recv_armed || !c.live() || c.io.peer_fin || c.eof || !c.reading || c.io.connecting {
            return;
        }
        c.io.recv_armed = true;
        let e = on_fd!(c.io.fixed, id, c.raw(), |f| opcode::RecvMulti::new(f, BGID)
            .build())
        .user_data(user_data(Op::Recv, id, c.io.gen));
        self.io.in_flight += 1;
        self.push(e);
    }

    fn cancel(&mut self, op: Op, id: ConnId, gen: u32) {
        let e = opcode::AsyncCancel::new(user_data(op, id, gen))
            .build()
            .user_data(user_data(Op::Other, id, gen));
        self.push(e);
    }

    fn arm_accept(&mut self, i: usize) {
        let Some(l) = self.io.listeners.get_mut(i) else {
            return;
        };
        let Some(sock) = &l.sock else { return };
        if l.armed {
            return;
        }
        l.armed = true;
        let e = opcode::AcceptMulti::new(Fd(sock.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(Op::Accept, i, 0));
        self.io.in_flight += 1;
        self.push(e);
    }

    /// Frees a zombie once nothing of it is in flight.
    fn maybe_free(&mut self, id: ConnId) {
        if self
            .conns
            .get(id)
            .is_some_and(|c| c.io.zombie && !c.in_flight())
        {
            self.conns.remove(id);
        }
    }

    /// Turns `id` into a zombie: cancels its operations and closes its
    /// socket through the ring. Returns whether the handler is owed
    /// `on_closed`.
    fn retire(&mut self, id: ConnId) -> bool {
        let Some(c) = self.conns.get_mut(id) else {
            return false;
        };
        if c.io.zombie {
            return false;
        }
        c.io.zombie = true;
        let gen = c.io.gen;
        let (recv, send, connect) = (c.io.recv_armed, c.io.send_inflight, c.io.connecting);
        let fixed = c.io.fixed;
        let fd = c.io.fd.take();
        c.io.close_inflight = fixed;
        c.tls = None;
        c.io.queued = Vec::new();
        match &mut c.io.extra {
            // A connect not yet submitted still reads its address.
            Some(x) if c.io.connecting => {
                x.held = Vec::new();
                x.close_error = None;
            }
            _ => c.io.extra = None,
        }
        let notify = std::mem::take(&mut c.io.notify);
        self.timers.cancel(id);
        if recv {
            self.cancel(Op::Recv, id, gen);
        }
        if send {
            self.cancel(Op::Send, id, gen);
        }
        if connect {
            self.cancel(Op::Connect, id, gen);
        }
        if fixed {
            self.io.in_flight += 1;
            let e = opcode::Close::new(Fixed(id as u32))
                .build()
                .user_data(user_data(Op::CloseFixed, id, gen));
            self.push(e);
        }
        if let Some(fd) = fd {
            let e = opcode::Close::new(Fd(fd.into_raw_fd()))
                .build()
                .user_data(user_data(Op::Other, id, gen));
            self.push(e);
        }
        if notify {
            self.io.open -= 1;
        }
        self.maybe_free(id);
        notify
    }

    /// Starts sending what `id` has queued (one send in flight), and ends
    /// a graceful close once everything left.
    fn flush(&mut self, id: ConnId, now: Instant) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.io.zombie || c.io.connecting || c.closing == Some(Close::Abort) {
            return;
        }
        if let Some(t) = &mut c.tls {
            if t.stream.wants_write() {
                t.stream.write_ciphertext(&mut c.io.queued);
            }
        }
        if !c.io.send_inflight {
            if c.io.send_pos == c.io.sending.len() {
                c.io.sending.clear();
                c.io.send_pos = 0;
                std::mem::swap(&mut c.io.sending, &mut c.io.queued);
            } else if !c.io.queued.is_empty() {
                c.io.sending.drain(..c.io.send_pos);
                c.io.send_pos = 0;
                c.io.sending.extend_from_slice(&c.io.queued);
                c.io.queued.clear();
            }
            if c.io.send_pos < c.io.sending.len() {
                let rest = &c.io.sending[c.io.send_pos..];
                let len = rest.len().min(u32::MAX as usize) as u32;
                let ptr = rest.as_ptr();
                let e = on_fd!(c.io.fixed, id, c.raw(), |f| opcode::Send::new(f, ptr, len)
                    .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
                    .build())
                .user_data(user_data(Op::Send, id, c.io.gen));
                c.io.send_inflight = true;
                self.io.stamp_sends |= c.io.outgoing;
                self.io.in_flight += 1;
                self.push(e);
            }
        }
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        c.note_sent();
        if c.closing == Some(Close::Graceful) {
            if c.pending() == 0 && !c.io.send_inflight {
                let why = match c.io.extra.as_mut().and_then(|x| x.close_error.take()) {
                    Some(e) => Closed::Error(e),
                    None => Closed::Local,
                };
                self.kill(id, why);
            } else {
                self.arm_close_deadline(id, now);
            }
        }
    }

    /// Ends `id` gracefully with `e` once the queued output (a TLS alert)
    /// has left.
    fn fail_after_flush(&mut self, id: ConnId, e: io::Error) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.closing.is_none() {
            c.closing = Some(Close::Graceful);
            c.extra().close_error = Some(e);
            self.mark_dirty(id);
        }
    }
}

impl Transport for UringIo {
    type Part = Sock;

    fn local_addr(t: &Ops, id: ConnId) -> Option<SocketAddr> {
        let fd = t.conns.get(id)?.io.fd.as_ref()?;
        SockRef::from(fd).local_addr().ok()?.as_socket()
    }

    fn connect(t: &mut Ops, target: SocketAddr, opts: ConnectOpts) -> io::Result<ConnId> {
        let sock = socket::client_socket(target, opts.source_ip, opts.abort_close, false)?;
        let dial = Dial {
            addr: SockAddr::from(target),
            source: opts.source_ip,
        };
        Ok(dial_on(t, OwnedFd::from(sock), dial))
    }

    fn connect_unix(t: &mut Ops, path: &std::path::Path, _opts: ConnectOpts) -> io::Result<ConnId> {
        let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
        let dial = Dial {
            addr: SockAddr::unix(path)?,
            source: None,
        };
        Ok(dial_on(t, OwnedFd::from(sock), dial))
    }

    fn open_connections(t: &Ops) -> usize {
        t.io.open
    }

    fn stop_listening(t: &mut Ops) {
        for i in 0..t.io.listeners.len() {
            let l = &mut t.io.listeners[i];
            if l.sock.take().is_some() && l.armed {
                // The accept holds the socket until it is cancelled; then
                // the listener is gone and new connections are refused.
                t.cancel(Op::Accept, i, 0);
            }
        }
        t.io.accept_paused_until = None;
    }

    fn reading_stopped(t: &mut Ops, id: ConnId) {
        if let Some(c) = t.conns.get(id).filter(|c| c.io.recv_armed) {
            // Stop the kernel from filling more buffers for it; what
            // completes before the cancel is held.
            let gen = c.io.gen;
            t.cancel(Op::Recv, id, gen);
        }
    }
}

/// Starts the connect of `fd` to `dial` through the ring.
fn dial_on(t: &mut Ops, fd: OwnedFd, dial: Dial) -> ConnId {
    let id = t.insert(fd);
    let c = &mut t.conns[id];
    // The address lives in the connection's boxed extra part until the
    // connect completes.
    let dial = &*c.extra().dial.insert(dial);
    let (ptr, len) = (dial.addr.as_ptr().cast::<libc::sockaddr>(), dial.addr.len());
    let e = on_fd!(c.io.fixed, id, c.raw(), |f| opcode::Connect::new(
        f, ptr, len
    )
    .build())
    .user_data(user_data(Op::Connect, id, c.io.gen));
    c.io.connecting = true;
    c.io.outgoing = true;
    t.io.in_flight += 1;
    t.io.open += 1;
    t.push(e);
    id
}

/// One thread's io_uring loop.
pub struct Uring {
    ops: Ops,
    bufs: BufRing,
    /// TLS plaintext comes out here.
    read_buf: Box<[u8]>,
    expired: Vec<ConnId>,
    cqes: Vec<(u64, i32, u32)>,
    /// The stop eventfd (the wake hook holds a weak reference) and the
    /// buffer its read on the ring fills.
    wake: Arc<File>,
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    /// The kernel did not finish cancelled operations in time: leak the
    /// memory they may still use instead of freeing it.
    leak: bool,
    drained: bool,
}

fn eventfd() -> io::Result<File> {
    // Blocking: a read on the ring then waits for the counter (on a
    // non-blocking one io_uring would complete at once with EAGAIN).
    // SAFETY: eventfd(2) takes no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

impl Uring {
    pub fn new(setup: Setup) -> io::Result<Self> {
        let mut b = IoUring::builder();
        b.setup_cqsize(SQ_ENTRIES * 8)
            .setup_single_issuer()
            .setup_defer_taskrun();
        let ring = match b.build(SQ_ENTRIES) {
            Ok(r) => r,
            // An older kernel without SINGLE_ISSUER / DEFER_TASKRUN.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
                .setup_cqsize(SQ_ENTRIES * 8)
                .build(SQ_ENTRIES)?,
            Err(e) => return Err(e),
        };
        let nofile = {
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: `r` is a valid rlimit the call fills.
            if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
                r.rlim_cur
            } else {
                1024
            }
        };
        let mut fixed_slots = (nofile.min(u64::from(MAX_FIXED)) as u32).max(1);
        while ring.submitter().register_files_sparse(fixed_slots).is_err() {
            if fixed_slots <= 64 {
                fixed_slots = 0;
                break;
            }
            fixed_slots /= 2;
        }
        let mut bufs = BufRing::new(BUF_COUNT, BUF_BYTES)?;
        bufs.register(&ring)?;
        let wake = Arc::new(eventfd()?);
        let weak = Arc::downgrade(&wake);
        setup.stop.add_wake_fn(move |now| match weak.upgrade() {
            Some(f) => {
                if now {
                    let _ = (&*f).write(&1u64.to_ne_bytes());
                }
                true
            }
            None => false,
        });
        let mut listeners = Vec::with_capacity(setup.listeners.len());
        for (l, implicit_tls) in setup.listeners {
            // The ring waits for connections; accepted sockets are
            // blocking (io_uring retries them itself) and inherit
            // TCP_NODELAY from the listener.
            l.set_nonblocking(false)?;
            let unix = matches!(l, Listening::Unix(_));
            if let Listening::Tcp(t) = &l {
                let _ = SockRef::from(t).set_tcp_nodelay(true);
            }
            listeners.push(Listener {
                sock: Some(l),
                unix,
                implicit_tls,
                armed: false,
            });
        }
        let mut u = Uring {
            ops: Table::new(UringIo {
                ring,
                rearm: Vec::with_capacity(64),
                overflow: Vec::new(),
                listeners,
                accept_paused_until: None,
                open: 0,
                fixed_slots,
                next_gen: 0,
                in_flight: 0,
                stamp_sends: false,
            }),
            bufs,
            read_buf: vec![0; setup.read_buf_bytes.max(1024)].into_boxed_slice(),
            expired: Vec::with_capacity(64),
            cqes: Vec::with_capacity(CQE_BATCH),
            wake,
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
            leak: false,
            drained: false,
        };
        for i in 0..u.ops.io.listeners.len() {
            u.ops.arm_accept(i);
        }
        u.arm_wake();
        Ok(u)
    }

    fn arm_wake(&mut self) {
        if self.wake_armed {
            return;
        }
        self.wake_armed = true;
        let e = opcode::Read::new(Fd(self.wake.as_raw_fd()), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(user_data(Op::Wake, 0, 0));
        self.ops.io.in_flight += 1;
        self.ops.push(e);
    }

    /// Time spent waiting for completions so far.
    pub fn waited(&self) -> Duration {
        self.ops.waited
    }

    /// Runs `h` until its `on_tick` says stop; then every connection still
    /// open is closed ([`Closed::Stopped`]) and the ring is drained.
    pub fn run<H: Handler>(&mut self, h: &mut H) -> io::Result<()> {
        loop {
            let (now, tick) = conn_table::turn(self, h);
            if tick.stop {
                self.drain();
                return Ok(());
            }
            let mut wake = self.ops.wake_at(now, &tick);
            if let Some(t) = self.ops.io.accept_paused_until {
                wake = wake.min(t);
            }
            self.before_wait();
            if std::mem::take(&mut self.ops.io.stamp_sends) {
                self.submit_now(h);
            }
            let before = Instant::now();
            let timeout = wake.saturating_duration_since(before);
            self.wait(timeout)?;
            let now = Instant::now();
            self.ops.waited += now.saturating_duration_since(before);
            self.resume_accepting(now);
            self.dispatch(h, now);
            let mut expired = std::mem::take(&mut self.expired);
            conn_table::fire_timers(self, h, now, &mut expired);
            self.expired = expired;
        }
    }

    /// Re-arms receives (after `ENOBUFS`, a cancel or a resume) and moves
    /// entries that did not fit into the submission queue.
    fn before_wait(&mut self) {
        self.bufs.publish();
        let mut rearm = std::mem::take(&mut self.ops.io.rearm);
        for id in rearm.drain(..) {
            self.ops.arm_recv(id);
        }
        self.ops.io.rearm = rearm;
        self.ops.push_overflow();
    }

    /// Submits what is queued without waiting, and handles what completed
    /// at once (sends that fit in the socket complete during the submit).
    fn submit_now<H: Handler>(&mut self, h: &mut H) {
        match self.ops.io.ring.submit() {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) => {}
            Err(_) => return,
        }
        let now = Instant::now();
        self.dispatch(h, now);
        self.before_wait();
    }

    /// Submits what is queued and waits up to `timeout` for a completion.
    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ts = Timespec::from(timeout);
        let args = SubmitArgs::new().timespec(&ts);
        match self.ops.io.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                // The timeout passed, a signal came, or the completion
                // queue is full (it is drained next).
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => Ok(()),
                _ => Err(e),
            },
        }
    }

    fn resume_accepting(&mut self, now: Instant) {
        let Some(t) = self.ops.io.accept_paused_until else {
            return;
        };
        if now < t {
            return;
        }
        self.ops.io.accept_paused_until = None;
        for i in 0..self.ops.io.listeners.len() {
            self.ops.arm_accept(i);
        }
    }

    /// Handles every completion there is, in batches.
    fn dispatch<H: Handler>(&mut self, h: &mut H, now: Instant) {
        loop {
            self.cqes.clear();
            {
                let cq = self.ops.io.ring.completion();
                self.cqes.extend(
                    cq.take(CQE_BATCH)
                        .map(|e| (e.user_data(), e.result(), e.flags())),
                );
            }
            if self.cqes.is_empty() {
                return;
            }
            for i in 0..self.cqes.len() {
                let (ud, res, flags) = self.cqes[i];
                self.complete(h, ud, res, flags, now);
            }
            self.bufs.publish();
            conn_table::settle(self, h, now);
        }
    }

    fn complete<H: Handler>(&mut self, h: &mut H, ud: u64, res: i32, flags: u32, now: Instant) {
        let (op, id, gen) = split_user_data(ud);
        match op {
            x if x == Op::Recv as u8 => self.on_recv(h, id, gen, res, flags, now),
            x if x == Op::Send as u8 => self.on_send(h, id, gen, res, now),
            x if x == Op::Connect as u8 => self.on_connect(h, id, gen, res, now),
            x if x == Op::CloseFixed as u8 => {
                self.ops.io.in_flight -= 1;
                if let Some(c) = self.ops.conns.get_mut(id).filter(|c| c.io.gen == gen) {
                    c.io.close_inflight = false;
                }
                self.ops.maybe_free(id);
            }
            x if x == Op::Accept as u8 => self.on_accept(h, id, res, flags, now),
            x if x == Op::Wake as u8 => {
                self.ops.io.in_flight -= 1;
                self.wake_armed = false;
                if !self.drained {
                    self.arm_wake();
                }
            }
            _ => {}
        }
    }

    /// Cancels everything still in flight and waits (bounded) until the
    /// kernel has finished with our memory.
    fn drain(&mut self) {
        if self.drained {
            return;
        }
        self.drained = true;
        for l in &mut self.ops.io.listeners {
            l.sock = None;
        }
        let ids: Vec<ConnId> = self.ops.conns.iter().map(|(k, _)| k).collect();
        for id in ids {
            if let Some(c) = self.ops.conns.get_mut(id) {
                c.io.notify = false;
            }
            self.ops.retire(id);
        }
        let any = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(user_data(Op::Other, 0, 0));
        self.ops.push(any);
        let end = Instant::now() + DRAIN_LIMIT;
        while self.ops.io.in_flight > 0 {
            let now = Instant::now();
            if now >= end {
                self.leak = true;
                return;
            }
            self.ops.push_overflow();
            if self.wait(Duration::from_millis(50).min(end - now)).is_err() {
                self.leak = true;
                return;
            }
            loop {
                self.cqes.clear();
                {
                    let cq = self.ops.io.ring.completion();
                    self.cqes.extend(
                        cq.take(CQE_BATCH)
                            .map(|e| (e.user_data(), e.result(), e.flags())),
                    );
                }
                if self.cqes.is_empty() {
                    break;
                }
                for i in 0..self.cqes.len() {
                    let (ud, res, flags) = self.cqes[i];
                    self.retire_completion(ud, res, flags);
                }
            }
            // A multishot receive or accept that is still running.
            if self.ops.io.in_flight > 0 {
                let again = opcode::AsyncCancel2::new(CancelBuilder::any())
                    .build()
                    .user_data(user_data(Op::Other, 0, 0));
                self.ops.push(again);
            }
        }
    }

    /// Bookkeeping of a completion during the drain (no handler).
    fn retire_completion(&mut self, ud: u64, res: i32, flags: u32) {
        let (op, id, gen) = split_user_data(ud);
        if let Some(b) = cqueue::buffer_select(flags) {
            self.bufs.give(b);
        }
        let last = !cqueue::more(flags);
        let c = self.ops.conns.get_mut(id).filter(|c| c.io.gen == gen);
        match op {
            x if x == Op::Recv as u8 && last => {
                self.ops.io.in_flight -= 1;
                if let Some(c) = c {
                    c.io.recv_armed = false;
                }
            }
            x if x == Op::Send as u8 => {
                self.ops.io.in_flight -= 1;
                if let Some(c) = c {
                    c.io.send_inflight = false;
                }
            }
            x if x == Op::Connect as u8 => {
                self.ops.io.in_flight -= 1;
                if let Some(c) = c {
                    c.io.connecting = false;
                    c.io.extra = None;
                }
            }
            x if x == Op::CloseFixed as u8 => {
                self.ops.io.in_flight -= 1;
                if let Some(c) = c {
                    c.io.close_inflight = false;
                }
            }
            x if x == Op::Accept as u8 && last => {
                self.ops.io.in_flight -= 1;
                if res >= 0 {
                    // SAFETY: a successful accept's result is a new
                    // descriptor that nothing else owns (closed here).
                    drop(unsafe { OwnedFd::from_raw_fd(res) });
                }
            }
            x if x == Op::Accept as u8 && res >= 0 => {
                // SAFETY: as above.
                drop(unsafe { OwnedFd::from_raw_fd(res) });
            }
            x if x == Op::Wake as u8 => {
                self.ops.io.in_flight -= 1;
                self.wake_armed = false;
            }
            _ => {}
        }
        self.bufs.publish();
        self.ops.maybe_free(id);
    }
}

impl Settle for Uring {
    type T = UringIo;

    /// A zombie until its operations complete (see the module doc).
    fn retire(&mut self, id: ConnId, _why: &Closed) -> bool {
        self.ops.retire(id)
    }

    /// Starts the send (one in flight), or ends a graceful close.
    fn service<H: Handler>(&mut self, _h: &mut H, id: ConnId, now: Instant) {
        self.ops.flush(id, now);
    }

    fn resume<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) {
        self.resume_read(h, id, now);
    }

    #[inline]
    fn table(&mut self) -> &mut Ops {
        &mut self.ops
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.drain();
        if self.leak {
            // Operations may still use this memory: never free it.
            std::mem::forget(std::mem::replace(&mut self.bufs, BufRing::empty()));
            std::mem::forget(std::mem::take(&mut self.ops.conns));
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new([0; 8])));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips_op_id_and_generation() {
        for (op, id, gen) in [
            (Op::Recv, 0usize, 0u32),
            (Op::Send, 123_456, 0xff_ffff),
            (Op::Accept, 3, 7),
        ] {
            let (o, i, g) = split_user_data(user_data(op, id, gen));
            assert_eq!((o, i, g), (op as u8, id, gen));
        }
    }
}
