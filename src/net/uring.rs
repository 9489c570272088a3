//! The io_uring backend: one ring per pinned thread driving a [`Handler`]
//! over plain and TLS TCP connections, with the same observable behaviour
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
//! Invariants: see [`super::backend`]; no callback is re-entered; every
//! `unsafe` block has a `// SAFETY:` line and there is no `unsafe` outside
//! this module.

use std::fs::File;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, Fixed, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring, Probe};
use slab::Slab;
use socket2::{SockAddr, SockRef};
use thiserror::Error;

use super::backend::{
    AppBytes, Backend, Close, Closed, ConnId, ConnectOpts, Handler, Setup, TlsState,
};
use super::driver::RunStats;
use super::epoll::CLOSE_FLUSH_LIMIT;
use super::runtime::STOP_POLL_INTERVAL;
use super::socket;
use super::timer::Timers;
use super::tls::TlsInfo;
use super::tls_stream::{TlsRead, TlsSide, TlsStream};

/// How long a listener rests after EMFILE/ENFILE.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
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
/// The buffer group of the receive buffers.
const BGID: u16 = 0;
/// Most fixed-file slots per ring (also bounded by `RLIMIT_NOFILE`).
const MAX_FIXED: u32 = 1 << 17;
/// A send buffer larger than this is freed once empty (an idle connection
/// keeps a small one).
const KEEP_SEND_BYTES: usize = 16 * 1024;
/// How long the end of a run waits for cancelled operations.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// Completions taken from the queue per batch.
const CQE_BATCH: usize = 256;

// ---- what is missing ---------------------------------------------------------

/// Why io_uring cannot run here ([`check`]).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Missing {
    /// `kernel.io_uring_disabled` is 2.
    #[error("io_uring is disabled on this system (kernel.io_uring_disabled=2)")]
    Disabled,
    /// `io_uring_setup` said EPERM.
    #[error("io_uring_setup is not permitted (EPERM: {0})")]
    NotPermitted(&'static str),
    /// `io_uring_setup` said ENOSYS.
    #[error("this kernel has no io_uring (io_uring_setup: ENOSYS)")]
    NoSyscall,
    /// `io_uring_setup` failed otherwise.
    #[error("io_uring_setup failed: {0}")]
    Setup(String),
    /// A feature this backend needs.
    #[error("the kernel's io_uring lacks {0}")]
    Feature(&'static str),
    /// An operation this backend needs.
    #[error("the kernel's io_uring lacks the {0} operation")]
    Opcode(&'static str),
    /// Multishot receive needs Linux 6.0.
    #[error("kernel {0} has no multishot receive (needs Linux 6.0)")]
    Kernel(String),
}

/// What an `io_uring_setup` error means, given `kernel.io_uring_disabled`.
pub fn explain_setup_error(e: &io::Error, disabled: Option<u32>) -> Missing {
    match e.raw_os_error() {
        Some(libc::EPERM) => Missing::NotPermitted(match disabled {
            Some(2) => "kernel.io_uring_disabled=2",
            Some(1) => "kernel.io_uring_disabled=1 and this user is not in kernel.io_uring_group",
            _ => "a seccomp filter or container policy forbids it",
        }),
        Some(libc::ENOSYS) => Missing::NoSyscall,
        _ => Missing::Setup(e.to_string()),
    }
}

fn io_uring_disabled() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `(major, minor)` of a kernel release string (`6.18.4-foo`).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn probe_kernel() -> Result<(), Missing> {
    let disabled = io_uring_disabled();
    if disabled == Some(2) {
        return Err(Missing::Disabled);
    }
    let ring: IoUring = IoUring::new(8).map_err(|e| explain_setup_error(&e, disabled))?;
    let p = ring.params();
    if !p.is_feature_ext_arg() {
        return Err(Missing::Feature("EXT_ARG, a timeout per wait (Linux 5.11)"));
    }
    if !p.is_feature_nodrop() {
        return Err(Missing::Feature("NODROP, no lost completions (Linux 5.5)"));
    }
    if !p.is_feature_fast_poll() {
        return Err(Missing::Feature("FAST_POLL (Linux 5.7)"));
    }
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|_| Missing::Feature("the opcode probe (Linux 5.6)"))?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::Connect::CODE, "connect"),
        (opcode::Close::CODE, "close"),
        (opcode::AsyncCancel::CODE, "async cancel"),
        (opcode::Read::CODE, "read"),
    ] {
        if !probe.is_supported(code) {
            return Err(Missing::Opcode(name));
        }
    }
    ring.submitter()
        .register_files_sparse(1)
        .map_err(|_| Missing::Feature("sparse registered files (Linux 5.19)"))?;
    let mut bufs =
        BufRing::new(2, 4096).map_err(|_| Missing::Feature("memory for a provided-buffer ring"))?;
    bufs.register(&ring)
        .map_err(|_| Missing::Feature("provided-buffer rings (Linux 5.19)"))?;
    let _ = ring.submitter().unregister_buf_ring(BGID);
    drop(bufs);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    match kernel_version(&release) {
        Some(v) if v >= (6, 0) => Ok(()),
        _ => Err(Missing::Kernel(release.trim().to_string())),
    }
}

/// Whether this kernel can run the io_uring backend; `Err` names what is
/// missing. The kernel is probed once per process.
pub fn check() -> Result<(), String> {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| probe_kernel().map_err(|m| m.to_string()))
        .clone()
}

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

// ---- the provided-buffer ring ------------------------------------------------

/// One thread's receive buffers, lent to the kernel through a buffer ring.
struct BufRing {
    /// The ring of entries (page-aligned, `count` entries).
    ring: *mut BufRingEntry,
    ring_bytes: usize,
    /// `count` buffers of `size` bytes.
    bufs: *mut u8,
    bufs_bytes: usize,
    size: usize,
    count: u16,
    /// Our tail (entries added), published to the kernel by `publish`.
    tail: u16,
}

fn mmap_anon(bytes: usize) -> io::Result<*mut libc::c_void> {
    // SAFETY: an anonymous private mapping at an address the kernel picks
    // touches no existing memory; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p)
    }
}

impl BufRing {
    fn new(count: u16, size: usize) -> io::Result<Self> {
        assert!(count.is_power_of_two());
        let ring_bytes = usize::from(count) * std::mem::size_of::<BufRingEntry>();
        let bufs_bytes = usize::from(count) * size;
        let ring = mmap_anon(ring_bytes)?.cast::<BufRingEntry>();
        let bufs = match mmap_anon(bufs_bytes) {
            Ok(p) => p.cast::<u8>(),
            Err(e) => {
                // SAFETY: `ring` was mapped above with this length and is
                // not registered anywhere yet.
                unsafe { libc::munmap(ring.cast(), ring_bytes) };
                return Err(e);
            }
        };
        Ok(BufRing {
            ring,
            ring_bytes,
            bufs,
            bufs_bytes,
            size,
            count,
            tail: 0,
        })
    }

    /// A ring with no memory (what replaces a leaked one).
    fn empty() -> Self {
        BufRing {
            ring: std::ptr::null_mut(),
            ring_bytes: 0,
            bufs: std::ptr::null_mut(),
            bufs_bytes: 0,
            size: 0,
            count: 0,
            tail: 0,
        }
    }

    /// Registers the ring as buffer group [`BGID`] and lends every buffer.
    fn register(&mut self, ring: &IoUring) -> io::Result<()> {
        // SAFETY: the entries live (mapped, page-aligned, `count` of them)
        // until this `BufRing` is dropped, which happens only after the ring
        // has no operation in flight (see the module doc).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(self.ring as u64, self.count, BGID, 0)?;
        }
        for bid in 0..self.count {
            self.give(bid);
        }
        self.publish();
        Ok(())
    }

    /// Puts buffer `bid` back in the ring (seen by the kernel after
    /// [`Self::publish`]).
    fn give(&mut self, bid: u16) {
        if bid >= self.count {
            return;
        }
        let slot = usize::from(self.tail & (self.count - 1));
        // SAFETY: `slot < count`, so the entry is inside the mapping; the
        // kernel reads entries only between its head and our published
        // tail, and this one is past the published tail.
        let entry = unsafe { &mut *self.ring.add(slot) };
        // SAFETY: `bid < count`, so the buffer is inside the mapping.
        let addr = unsafe { self.bufs.add(usize::from(bid) * self.size) };
        entry.set_addr(addr as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the buffers given so far visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail field lives in the first entry of the mapping,
        // which outlives `self`; the kernel reads it atomically, so it is
        // written through an atomic with release ordering (the entries
        // written before become visible first).
        unsafe {
            let tail = BufRingEntry::tail(self.ring) as *mut u16;
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    /// The first `len` bytes of buffer `bid`, which a completion just
    /// handed back.
    fn data(&self, bid: u16, len: usize) -> &[u8] {
        if bid >= self.count {
            return &[];
        }
        let len = len.min(self.size);
        // SAFETY: the buffer is inside the mapping; the kernel wrote it
        // before posting the completion that handed it to us and will not
        // touch it again until we give it back (after this borrow ends).
        unsafe { std::slice::from_raw_parts(self.bufs.add(usize::from(bid) * self.size), len) }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.ring.is_null() {
            return;
        }
        // SAFETY: both mappings were made in `new` with these lengths; by
        // the time a `BufRing` is dropped no operation can use them (the
        // loop drains the ring first, or leaks this struct).
        unsafe {
            libc::munmap(self.ring.cast(), self.ring_bytes);
            libc::munmap(self.bufs.cast(), self.bufs_bytes);
        }
    }
}

// ---- connections --------------------------------------------------------------

/// The TLS part of a connection (boxed: plaintext connections stay small).
struct TlsPart {
    stream: TlsStream,
    /// Ciphertext received and not yet taken by rustls.
    cin: Vec<u8>,
    cin_pos: usize,
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

struct Conn {
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
    tls: Option<Box<TlsPart>>,
    /// Output being sent (untouched while `send_inflight`), from `send_pos`.
    sending: Vec<u8>,
    send_pos: usize,
    /// Output queued since (plaintext, or TLS records).
    queued: Vec<u8>,
    /// The peer's FIN arrived (reported once `held` is delivered).
    peer_fin: bool,
    app: AppBytes,
    /// The peer's end was reported.
    eof: bool,
    /// The handler wants input.
    reading: bool,
    closing: Option<Close>,
    dirty: bool,
    read_now: bool,
    /// The handler is owed `on_closed` (false for a refused accept).
    notify: bool,
    /// Made by `connect` (its sends are stamped when they leave, see
    /// `Ops::stamp_sends`).
    outgoing: bool,
}

impl Conn {
    fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    fn held(&self) -> &[u8] {
        self.extra.as_ref().map_or(&[], |x| &x.held)
    }

    fn close_deadline(&self) -> Option<Instant> {
        self.extra.as_ref().and_then(|x| x.close_deadline)
    }

    fn raw(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    fn new(fd: OwnedFd, fixed: bool, gen: u32) -> Self {
        Conn {
            fd: Some(fd),
            fixed,
            gen,
            zombie: false,
            recv_armed: false,
            send_inflight: false,
            connecting: false,
            close_inflight: false,
            extra: None,
            tls: None,
            sending: Vec::new(),
            send_pos: 0,
            queued: Vec::new(),
            peer_fin: false,
            app: AppBytes::default(),
            eof: false,
            reading: true,
            closing: None,
            dirty: false,
            read_now: false,
            notify: true,
            outgoing: false,
        }
    }

    fn unsent(&self) -> usize {
        self.sending.len() - self.send_pos + self.queued.len()
    }

    fn pending(&self) -> usize {
        self.unsent() + usize::from(self.tls.as_ref().is_some_and(|t| t.stream.wants_write()))
    }

    fn note_sent(&mut self) {
        let tls = self.tls.as_ref().map(|t| &t.stream);
        self.app.note_sent(self.unsent(), self.send_inflight, tls);
    }

    fn in_flight(&self) -> bool {
        self.recv_armed || self.send_inflight || self.connecting || self.close_inflight
    }

    /// Open for the handler (not closing, not gone).
    fn live(&self) -> bool {
        !self.zombie && self.closing.is_none()
    }
}

struct Listener {
    sock: Option<TcpListener>,
    implicit_tls: bool,
    armed: bool,
}

/// The control surface handlers see (everything but the buffers).
pub struct Ops {
    ring: IoUring,
    conns: Slab<Conn>,
    timers: Timers,
    /// Connections with output to flush or reads to resume.
    dirty: Vec<ConnId>,
    /// Connections to close, with why (after the current callback).
    dead: Vec<(ConnId, Closed)>,
    /// Connections whose receive is to be armed before the next wait.
    rearm: Vec<ConnId>,
    /// Entries that did not fit in the submission queue (kept in order).
    overflow: Vec<squeue::Entry>,
    listeners: Vec<Listener>,
    accept_paused_until: Option<Instant>,
    waited: Duration,
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

impl Ops {
    /// Queues `e` for the next submission.
    fn push(&mut self, e: squeue::Entry) {
        if self.overflow.is_empty() {
            // SAFETY: every entry built in this module points only at memory
            // that outlives the operation: provided buffers (the buffer
            // ring), a send buffer that is not touched until the send
            // completes, a connect address boxed in its connection until the
            // connect completes, the eventfd buffer of the loop; a zombie
            // connection is not dropped while any of these is in flight.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
            if self.ring.submit().is_ok() {
                // SAFETY: as above.
                if unsafe { self.ring.submission().push(&e) }.is_ok() {
                    return;
                }
            }
        }
        self.overflow.push(e);
    }

    /// Moves entries that did not fit into the submission queue.
    fn push_overflow(&mut self) {
        while !self.overflow.is_empty() {
            let mut moved = 0;
            {
                let mut sq = self.ring.submission();
                for e in &self.overflow {
                    // SAFETY: as in `push`.
                    if unsafe { sq.push(e) }.is_err() {
                        break;
                    }
                    moved += 1;
                }
            }
            self.overflow.drain(..moved);
            if self.overflow.is_empty() || self.ring.submit().is_err() {
                return;
            }
        }
    }

    fn mark_dirty(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(id) {
            if !c.dirty && !c.zombie {
                c.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    fn kill(&mut self, id: ConnId, why: Closed) {
        // (The first reason wins; later ones are dropped.)
        if let Some(c) = self.conns.get_mut(id) {
            if !c.zombie && c.closing != Some(Close::Abort) {
                c.closing = Some(Close::Abort);
                self.dead.push((id, why));
            }
        }
    }

    /// A new connection on `fd` (in the fixed table if there is room).
    fn insert(&mut self, fd: OwnedFd) -> ConnId {
        let entry = self.conns.vacant_entry();
        let id = entry.key();
        let fixed = (id as u64) < u64::from(self.fixed_slots)
            && self
                .ring
                .submitter()
                .register_files_update(id as u32, &[fd.as_raw_fd()])
                .is_ok();
        self.next_gen = self.next_gen.wrapping_add(1) & 0xff_ffff;
        entry.insert(Conn::new(fd, fixed, self.next_gen));
        id
    }

    fn arm_recv(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.recv_armed || !c.live() || c.peer_fin || c.eof || !c.reading || c.connecting {
            return;
        }
        c.recv_armed = true;
        let e = on_fd!(c.fixed, id, c.raw(), |f| opcode::RecvMulti::new(f, BGID)
            .build())
        .user_data(user_data(Op::Recv, id, c.gen));
        self.in_flight += 1;
        self.push(e);
    }

    fn cancel(&mut self, op: Op, id: ConnId, gen: u32) {
        let e = opcode::AsyncCancel::new(user_data(op, id, gen))
            .build()
            .user_data(user_data(Op::Other, id, gen));
        self.push(e);
    }

    fn arm_accept(&mut self, i: usize) {
        let Some(l) = self.listeners.get_mut(i) else {
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
        self.in_flight += 1;
        self.push(e);
    }

    /// Frees a zombie once nothing of it is in flight.
    fn maybe_free(&mut self, id: ConnId) {
        if self
            .conns
            .get(id)
            .is_some_and(|c| c.zombie && !c.in_flight())
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
        if c.zombie {
            return false;
        }
        c.zombie = true;
        let gen = c.gen;
        let (recv, send, connect) = (c.recv_armed, c.send_inflight, c.connecting);
        let fixed = c.fixed;
        let fd = c.fd.take();
        c.close_inflight = fixed;
        c.tls = None;
        c.queued = Vec::new();
        match &mut c.extra {
            // A connect not yet submitted still reads its address.
            Some(x) if c.connecting => {
                x.held = Vec::new();
                x.close_error = None;
            }
            _ => c.extra = None,
        }
        let notify = std::mem::take(&mut c.notify);
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
            self.in_flight += 1;
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
            self.open -= 1;
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
        if c.zombie || c.connecting || c.closing == Some(Close::Abort) {
            return;
        }
        if let Some(t) = &mut c.tls {
            if t.stream.wants_write() {
                t.stream.write_ciphertext(&mut c.queued);
            }
        }
        if !c.send_inflight {
            if c.send_pos == c.sending.len() {
                c.sending.clear();
                c.send_pos = 0;
                std::mem::swap(&mut c.sending, &mut c.queued);
            } else if !c.queued.is_empty() {
                c.sending.drain(..c.send_pos);
                c.send_pos = 0;
                c.sending.extend_from_slice(&c.queued);
                c.queued.clear();
            }
            if c.send_pos < c.sending.len() {
                let rest = &c.sending[c.send_pos..];
                let len = rest.len().min(u32::MAX as usize) as u32;
                let ptr = rest.as_ptr();
                let e = on_fd!(c.fixed, id, c.raw(), |f| opcode::Send::new(f, ptr, len)
                    .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
                    .build())
                .user_data(user_data(Op::Send, id, c.gen));
                c.send_inflight = true;
                self.stamp_sends |= c.outgoing;
                self.in_flight += 1;
                self.push(e);
            }
        }
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        c.note_sent();
        if c.closing == Some(Close::Graceful) {
            if c.pending() == 0 && !c.send_inflight {
                let why = match c.extra.as_mut().and_then(|x| x.close_error.take()) {
                    Some(e) => Closed::Error(e),
                    None => Closed::Local,
                };
                self.kill(id, why);
            } else if c.close_deadline().is_none() {
                let at = now + CLOSE_FLUSH_LIMIT;
                c.extra().close_deadline = Some(at);
                self.timers.schedule(id, at);
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

impl Backend for Ops {
    fn write(&mut self, id: ConnId, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.zombie {
            return;
        }
        c.app.taken += data.len() as u64;
        match &mut c.tls {
            None => c.queued.extend_from_slice(data),
            Some(t) => t.stream.write_plaintext(data),
        }
        self.mark_dirty(id);
    }

    fn pending_output(&self, id: ConnId) -> usize {
        self.conns
            .get(id)
            .filter(|c| !c.zombie)
            .map_or(0, Conn::pending)
    }

    fn app_bytes_in(&self, id: ConnId) -> u64 {
        self.conns.get(id).map_or(0, |c| c.app.taken)
    }

    fn app_bytes_sent(&self, id: ConnId) -> u64 {
        self.conns.get(id).map_or(0, |c| c.app.sent)
    }

    fn start_tls(&mut self, id: ConnId, side: TlsSide) -> io::Result<()> {
        let Some(c) = self.conns.get_mut(id).filter(|c| !c.zombie) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let stream = TlsStream::start(c.tls.is_some(), side)?;
        // Plaintext read and not delivered is dropped (CVE-2011-0411):
        // from here on every byte received is ciphertext.
        if let Some(x) = &mut c.extra {
            x.held = Vec::new();
        }
        c.tls = Some(Box::new(TlsPart {
            stream,
            cin: Vec::new(),
            cin_pos: 0,
            fin_fed: false,
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
        if c.zombie || c.reading == on {
            return;
        }
        c.reading = on;
        if on {
            // Deliver what arrived meanwhile, then receive again.
            c.read_now = true;
            self.mark_dirty(id);
        } else if c.recv_armed {
            // Stop the kernel from filling more buffers for it; what
            // completes before the cancel is held.
            let gen = c.gen;
            self.cancel(Op::Recv, id, gen);
        }
    }

    fn close(&mut self, id: ConnId, how: Close) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.zombie {
            return;
        }
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
        if self.conns.get(id).is_none_or(|c| c.zombie) {
            return;
        }
        match at {
            Some(t) => self.timers.schedule(id, t),
            None => self.timers.cancel(id),
        }
    }

    fn local_addr(&self, id: ConnId) -> Option<SocketAddr> {
        let fd = self.conns.get(id)?.fd.as_ref()?;
        SockRef::from(fd).local_addr().ok()?.as_socket()
    }

    fn connect(&mut self, target: SocketAddr, opts: ConnectOpts) -> io::Result<ConnId> {
        let sock = socket::client_socket(target, opts.source_ip, opts.abort_close, false)?;
        let id = self.insert(OwnedFd::from(sock));
        let dial = Dial {
            addr: SockAddr::from(target),
            source: opts.source_ip,
        };
        let c = &mut self.conns[id];
        // The address lives in the connection's boxed extra part until the
        // connect completes.
        let dial = &*c.extra().dial.insert(dial);
        let (ptr, len) = (dial.addr.as_ptr().cast::<libc::sockaddr>(), dial.addr.len());
        let e = on_fd!(c.fixed, id, c.raw(), |f| opcode::Connect::new(f, ptr, len)
            .build())
        .user_data(user_data(Op::Connect, id, c.gen));
        c.connecting = true;
        c.outgoing = true;
        self.in_flight += 1;
        self.open += 1;
        self.push(e);
        Ok(id)
    }

    fn open_connections(&self) -> usize {
        self.open
    }

    fn waited(&self) -> Duration {
        self.waited
    }

    fn stop_listening(&mut self) {
        for i in 0..self.listeners.len() {
            let l = &mut self.listeners[i];
            if l.sock.take().is_some() && l.armed {
                // The accept holds the socket until it is cancelled; then
                // the listener is gone and new connections are refused.
                self.cancel(Op::Accept, i, 0);
            }
        }
        self.accept_paused_until = None;
    }
}

fn is_fd_exhaustion(errno: i32) -> bool {
    matches!(
        errno,
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
    )
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
            let _ = SockRef::from(&l).set_tcp_nodelay(true);
            listeners.push(Listener {
                sock: Some(l),
                implicit_tls,
                armed: false,
            });
        }
        let mut u = Uring {
            ops: Ops {
                ring,
                conns: Slab::with_capacity(1024),
                timers: Timers::with_capacity(1024),
                dirty: Vec::with_capacity(64),
                dead: Vec::with_capacity(64),
                rearm: Vec::with_capacity(64),
                overflow: Vec::new(),
                listeners,
                accept_paused_until: None,
                waited: Duration::ZERO,
                open: 0,
                fixed_slots,
                next_gen: 0,
                in_flight: 0,
                stamp_sends: false,
            },
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
        for i in 0..u.ops.listeners.len() {
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
        self.ops.in_flight += 1;
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
            let now = Instant::now();
            let tick = h.on_tick(&mut self.ops, now);
            self.settle(h, now);
            if tick.stop {
                let ids: Vec<ConnId> = self
                    .ops
                    .conns
                    .iter()
                    .filter(|(_, c)| !c.zombie)
                    .map(|(k, _)| k)
                    .collect();
                for id in ids {
                    self.ops.kill(id, Closed::Stopped);
                }
                self.reap(h, now);
                self.drain();
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
            self.before_wait();
            if std::mem::take(&mut self.ops.stamp_sends) {
                self.submit_now(h);
            }
            let before = Instant::now();
            let timeout = wake.saturating_duration_since(before);
            self.wait(timeout)?;
            let now = Instant::now();
            self.ops.waited += now.saturating_duration_since(before);
            self.resume_accepting(now);
            self.dispatch(h, now);
            self.expired.clear();
            self.expired.extend(self.ops.timers.expired(now));
            for i in 0..self.expired.len() {
                let id = self.expired[i];
                let Some(c) = self.ops.conns.get(id) else {
                    continue;
                };
                if c.zombie {
                    continue;
                }
                if c.close_deadline().is_some_and(|d| now >= d) {
                    self.ops.kill(id, Closed::FlushTimeout);
                } else if c.closing.is_none() {
                    h.on_timer(&mut self.ops, now, id);
                }
                self.settle(h, now);
            }
        }
    }

    /// Re-arms receives (after `ENOBUFS`, a cancel or a resume) and moves
    /// entries that did not fit into the submission queue.
    fn before_wait(&mut self) {
        self.bufs.publish();
        let mut rearm = std::mem::take(&mut self.ops.rearm);
        for id in rearm.drain(..) {
            self.ops.arm_recv(id);
        }
        self.ops.rearm = rearm;
        self.ops.push_overflow();
    }

    /// Submits what is queued without waiting, and handles what completed
    /// at once (sends that fit in the socket complete during the submit).
    fn submit_now<H: Handler>(&mut self, h: &mut H) {
        match self.ops.ring.submit() {
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
        match self.ops.ring.submitter().submit_with_args(1, &args) {
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
        let Some(t) = self.ops.accept_paused_until else {
            return;
        };
        if now < t {
            return;
        }
        self.ops.accept_paused_until = None;
        for i in 0..self.ops.listeners.len() {
            self.ops.arm_accept(i);
        }
    }

    /// Handles every completion there is, in batches.
    fn dispatch<H: Handler>(&mut self, h: &mut H, now: Instant) {
        loop {
            self.cqes.clear();
            {
                let cq = self.ops.ring.completion();
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
            self.settle(h, now);
        }
    }

    fn complete<H: Handler>(&mut self, h: &mut H, ud: u64, res: i32, flags: u32, now: Instant) {
        let (op, id, gen) = split_user_data(ud);
        match op {
            x if x == Op::Recv as u8 => self.on_recv(h, id, gen, res, flags, now),
            x if x == Op::Send as u8 => self.on_send(h, id, gen, res, now),
            x if x == Op::Connect as u8 => self.on_connect(h, id, gen, res, now),
            x if x == Op::CloseFixed as u8 => {
                self.ops.in_flight -= 1;
                if let Some(c) = self.ops.conns.get_mut(id).filter(|c| c.gen == gen) {
                    c.close_inflight = false;
                }
                self.ops.maybe_free(id);
            }
            x if x == Op::Accept as u8 => self.on_accept(h, id, res, flags, now),
            x if x == Op::Wake as u8 => {
                self.ops.in_flight -= 1;
                self.wake_armed = false;
                if !self.drained {
                    self.arm_wake();
                }
            }
            _ => {}
        }
    }

    fn on_recv<H: Handler>(
        &mut self,
        h: &mut H,
        id: ConnId,
        gen: u32,
        res: i32,
        flags: u32,
        now: Instant,
    ) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        if !more {
            self.ops.in_flight -= 1;
        }
        let Some(c) = self.ops.conns.get_mut(id).filter(|c| c.gen == gen) else {
            if let Some(b) = bid {
                self.bufs.give(b);
            }
            return;
        };
        if !more {
            c.recv_armed = false;
        }
        if res > 0 {
            if let Some(b) = bid {
                self.deliver(h, id, b, res as usize, now);
                self.bufs.give(b);
            }
        } else if res == 0 {
            c.peer_fin = true;
            self.after_fin(h, id, now);
        } else {
            match -res {
                // Out of buffers (re-armed below), or cancelled by us.
                libc::ENOBUFS | libc::ECANCELED | libc::EINTR | libc::EAGAIN => {}
                errno => self
                    .ops
                    .kill(id, Closed::Error(io::Error::from_raw_os_error(errno))),
            }
        }
        if !more {
            match self.ops.conns.get(id) {
                Some(c) if c.zombie => self.ops.maybe_free(id),
                Some(c) if c.live() && c.reading && !c.peer_fin => self.ops.rearm.push(id),
                _ => {}
            }
        }
    }

    /// `len` bytes arrived on `id` in buffer `bid`.
    fn deliver<H: Handler>(&mut self, h: &mut H, id: ConnId, bid: u16, len: usize, now: Instant) {
        let Some(c) = self.ops.conns.get_mut(id) else {
            return;
        };
        if !c.live() || c.eof {
            return;
        }
        let data = self.bufs.data(bid, len);
        if let Some(t) = c.tls.as_mut() {
            if t.cin_pos == t.cin.len() {
                t.cin.clear();
                t.cin_pos = 0;
            }
            t.cin.extend_from_slice(data);
            self.pump_tls(h, id, now);
        } else if !c.reading || !c.held().is_empty() {
            c.extra().held.extend_from_slice(data);
        } else {
            h.on_input(&mut self.ops, now, id, data);
        }
    }

    /// The peer's FIN: reported once what arrived before it is delivered.
    fn after_fin<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) {
        let Some(c) = self.ops.conns.get_mut(id) else {
            return;
        };
        if !c.live() || c.eof {
            return;
        }
        if c.tls.is_some() {
            self.pump_tls(h, id, now);
        } else if c.reading && c.held().is_empty() {
            c.eof = true;
            h.on_peer_closed(&mut self.ops, now, id);
        }
    }

    /// Reading was resumed: what was held goes first, then receive again.
    fn resume_read<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) {
        let Some(c) = self.ops.conns.get_mut(id) else {
            return;
        };
        if !c.live() || !c.reading {
            return;
        }
        if c.tls.is_some() {
            self.pump_tls(h, id, now);
        } else if !c.held().is_empty() {
            let held = std::mem::take(&mut c.extra().held);
            h.on_input(&mut self.ops, now, id, &held);
            // Keep the allocation if nothing was held meanwhile.
            if let Some(c) = self.ops.conns.get_mut(id) {
                if c.held().is_empty() && held.capacity() <= KEEP_SEND_BYTES {
                    let x = c.extra();
                    x.held = held;
                    x.held.clear();
                }
            }
        }
        let Some(c) = self.ops.conns.get_mut(id) else {
            return;
        };
        if c.peer_fin && c.tls.is_none() {
            self.after_fin(h, id, now);
        } else if c.live() && c.reading && !c.recv_armed {
            self.ops.rearm.push(id);
        }
    }

    /// Feeds `id`'s ciphertext to rustls and hands out what it decrypts,
    /// while the handler reads.
    fn pump_tls<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) {
        loop {
            let Some(c) = self.ops.conns.get_mut(id) else {
                return;
            };
            if !c.live() || c.eof || !c.reading {
                break;
            }
            let Some(t) = c.tls.as_mut() else { break };
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
                    break;
                }
                Ok(TlsRead::NeedCiphertext) => {}
                Err(e) => {
                    self.ops.kill(id, Closed::Error(e));
                    break;
                }
            }
            if t.cin_pos == t.cin.len() {
                if c.peer_fin && !t.fin_fed {
                    // FIN: rustls reports close_notify or truncation.
                    t.fin_fed = true;
                    t.stream.peer_eof();
                    continue;
                }
                break;
            }
            match t.stream.read_ciphertext(&t.cin[t.cin_pos..]) {
                Ok(n) => {
                    t.cin_pos += n;
                    if t.cin_pos == t.cin.len() {
                        t.cin.clear();
                        t.cin_pos = 0;
                    }
                }
                Err(e) => {
                    // The alert is queued: deliver it, then close.
                    self.ops.fail_after_flush(id, e);
                    break;
                }
            }
        }
        // Handshake records (or an alert) to send.
        self.ops.mark_dirty(id);
    }

    fn on_send<H: Handler>(&mut self, h: &mut H, id: ConnId, gen: u32, res: i32, now: Instant) {
        self.ops.in_flight -= 1;
        let Some(c) = self.ops.conns.get_mut(id).filter(|c| c.gen == gen) else {
            return;
        };
        c.send_inflight = false;
        if c.zombie {
            self.ops.maybe_free(id);
            return;
        }
        if res < 0 {
            self.ops
                .kill(id, Closed::Error(io::Error::from_raw_os_error(-res)));
            return;
        }
        let before = c.app.sent;
        let had = c.pending() > 0;
        let n = res as usize;
        if n == 0 && c.send_pos < c.sending.len() {
            self.ops
                .kill(id, Closed::Error(io::ErrorKind::WriteZero.into()));
            return;
        }
        c.send_pos = (c.send_pos + n).min(c.sending.len());
        if c.send_pos == c.sending.len() {
            c.sending.clear();
            c.send_pos = 0;
            if c.sending.capacity() > KEEP_SEND_BYTES {
                c.sending = Vec::new();
            }
        }
        c.note_sent();
        let progressed = c.app.sent != before || (had && c.pending() == 0);
        let closing = c.closing.is_some();
        // More to send, or a graceful close to finish.
        self.ops.mark_dirty(id);
        if progressed && !closing {
            h.on_written(&mut self.ops, now, id);
        }
    }

    fn on_connect<H: Handler>(&mut self, h: &mut H, id: ConnId, gen: u32, res: i32, now: Instant) {
        self.ops.in_flight -= 1;
        let Some(c) = self.ops.conns.get_mut(id).filter(|c| c.gen == gen) else {
            return;
        };
        c.connecting = false;
        let dial = c.extra.as_mut().and_then(|x| x.dial.take());
        if c.extra.as_ref().is_some_and(|x| {
            x.held.is_empty() && x.close_deadline.is_none() && x.close_error.is_none()
        }) {
            c.extra = None;
        }
        if c.zombie {
            self.ops.maybe_free(id);
            return;
        }
        if c.closing.is_some() {
            // Closed while connecting: the close is under way.
            return;
        }
        if res < 0 {
            let e = match (-res, dial) {
                (libc::EADDRNOTAVAIL, Some(d)) => match d.addr.as_socket() {
                    Some(target) => socket::addr_not_available(target, d.source),
                    None => io::Error::from_raw_os_error(-res),
                },
                (errno, _) => io::Error::from_raw_os_error(errno),
            };
            // The id is gone after on_connected: no on_closed follows.
            c.notify = false;
            self.ops.open -= 1;
            self.ops.retire(id);
            h.on_connected(&mut self.ops, now, id, Err(e));
            return;
        }
        h.on_connected(&mut self.ops, now, id, Ok(()));
        self.ops.arm_recv(id);
        self.ops.mark_dirty(id);
    }

    fn on_accept<H: Handler>(&mut self, h: &mut H, i: usize, res: i32, flags: u32, now: Instant) {
        if !cqueue::more(flags) {
            self.ops.in_flight -= 1;
            if let Some(l) = self.ops.listeners.get_mut(i) {
                l.armed = false;
            }
        }
        if res >= 0 {
            // SAFETY: a successful accept completion's result is a new
            // descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(res) };
            let Some(l) = self.ops.listeners.get(i) else {
                return;
            };
            if l.sock.is_none() {
                // Accepted just before the listener was stopped.
                return;
            }
            let implicit_tls = l.implicit_tls;
            let peer = match SockRef::from(&fd)
                .peer_addr()
                .ok()
                .and_then(|a| a.as_socket())
            {
                Some(p) => p,
                // The peer is already gone: next one.
                None => return,
            };
            let id = self.ops.insert(fd);
            self.ops.open += 1;
            if h.on_accept(&mut self.ops, now, id, peer, implicit_tls) {
                self.ops.arm_recv(id);
                self.ops.mark_dirty(id);
            } else {
                // Refused: what the handler wrote (e.g. a 421) goes out,
                // then the socket closes, with no on_closed.
                self.ops.open -= 1;
                if let Some(c) = self.ops.conns.get_mut(id) {
                    c.notify = false;
                    c.reading = false;
                    if c.closing.is_none() {
                        c.closing = Some(Close::Graceful);
                    }
                }
                self.ops.timers.cancel(id);
                self.ops.mark_dirty(id);
            }
        } else if is_fd_exhaustion(-res) {
            // Out of descriptors or memory: the backlog stays, so accepting
            // again now would spin; rest the listener instead.
            self.ops.accept_paused_until = Some(now + ACCEPT_PAUSE);
            return;
        }
        let armed = self.ops.listeners.get(i).is_some_and(|l| l.armed);
        if !armed && self.ops.accept_paused_until.is_none() {
            self.ops.arm_accept(i);
        }
    }

    /// Flushes every dirty connection, resumes reads, then closes dead
    /// connections.
    fn settle<H: Handler>(&mut self, h: &mut H, now: Instant) {
        while let Some(id) = self.ops.dirty.pop() {
            let Some(c) = self.ops.conns.get_mut(id) else {
                continue;
            };
            c.dirty = false;
            if c.zombie || c.closing == Some(Close::Abort) {
                continue;
            }
            if std::mem::take(&mut c.read_now) {
                self.resume_read(h, id, now);
            }
            self.ops.flush(id, now);
        }
        self.reap(h, now);
    }

    /// Closes dead connections and tells the handler.
    fn reap<H: Handler>(&mut self, h: &mut H, now: Instant) {
        while let Some((id, why)) = self.ops.dead.pop() {
            if self.ops.retire(id) {
                h.on_closed(&mut self.ops, now, id, why);
                // on_closed may queue work on other connections.
                while let Some(other) = self.ops.dirty.pop() {
                    let Some(c) = self.ops.conns.get_mut(other) else {
                        continue;
                    };
                    c.dirty = false;
                    if c.zombie || c.closing == Some(Close::Abort) {
                        continue;
                    }
                    if std::mem::take(&mut c.read_now) {
                        self.resume_read(h, other, now);
                    }
                    self.ops.flush(other, now);
                }
            }
        }
    }

    /// Cancels everything still in flight and waits (bounded) until the
    /// kernel has finished with our memory.
    fn drain(&mut self) {
        if self.drained {
            return;
        }
        self.drained = true;
        for l in &mut self.ops.listeners {
            l.sock = None;
        }
        let ids: Vec<ConnId> = self.ops.conns.iter().map(|(k, _)| k).collect();
        for id in ids {
            if let Some(c) = self.ops.conns.get_mut(id) {
                c.notify = false;
            }
            self.ops.retire(id);
        }
        let any = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(user_data(Op::Other, 0, 0));
        self.ops.push(any);
        let end = Instant::now() + DRAIN_LIMIT;
        while self.ops.in_flight > 0 {
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
                    let cq = self.ops.ring.completion();
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
            if self.ops.in_flight > 0 {
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
        let c = self.ops.conns.get_mut(id).filter(|c| c.gen == gen);
        match op {
            x if x == Op::Recv as u8 && last => {
                self.ops.in_flight -= 1;
                if let Some(c) = c {
                    c.recv_armed = false;
                }
            }
            x if x == Op::Send as u8 => {
                self.ops.in_flight -= 1;
                if let Some(c) = c {
                    c.send_inflight = false;
                }
            }
            x if x == Op::Connect as u8 => {
                self.ops.in_flight -= 1;
                if let Some(c) = c {
                    c.connecting = false;
                    c.extra = None;
                }
            }
            x if x == Op::CloseFixed as u8 => {
                self.ops.in_flight -= 1;
                if let Some(c) = c {
                    c.close_inflight = false;
                }
            }
            x if x == Op::Accept as u8 && last => {
                self.ops.in_flight -= 1;
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
                self.ops.in_flight -= 1;
                self.wake_armed = false;
            }
            _ => {}
        }
        self.bufs.publish();
        self.ops.maybe_free(id);
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

    #[test]
    fn kernel_versions_parse_from_release_strings() {
        assert_eq!(kernel_version("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0"), Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn setup_errors_name_what_is_missing() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        assert!(explain_setup_error(&eperm, Some(0))
            .to_string()
            .contains("seccomp"));
        assert!(explain_setup_error(&eperm, Some(2))
            .to_string()
            .contains("kernel.io_uring_disabled=2"));
        assert!(explain_setup_error(&eperm, Some(1))
            .to_string()
            .contains("io_uring_group"));
        let enosys = io::Error::from_raw_os_error(libc::ENOSYS);
        assert_eq!(explain_setup_error(&enosys, None), Missing::NoSyscall);
        assert!(Missing::Disabled
            .to_string()
            .contains("io_uring_disabled=2"));
    }
}
