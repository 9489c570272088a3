//! One thread's AF_XDP loop: frames from the queue's socket, TCP in
//! smoltcp, and the [`Handler`] contract of [`super::super::backend`] on top.
//!
//! Sharding. smoltcp finds a segment's socket by scanning every socket of a
//! `SocketSet`, and its listeners have no backlog (one listening socket
//! takes one handshake). So a thread's sockets are split into shards of
//! [`SHARD_SOCKETS`], each its own `Interface` + `SocketSet`, behind our own
//! flow table keyed by the 4-tuple (remote address, remote port, local
//! port; the local address is the thread's one). A segment of a known flow
//! goes to its shard; a SYN for a listening port goes to the shard that
//! currently listens, whose listening socket then becomes the connection
//! and is replaced at once by a free socket of that shard. Sockets are made
//! once, with their buffers, and recycled: a closed connection's socket
//! returns to its shard's spare list, out of smoltcp's `SocketSet` (after
//! its RST, if any, went out), so smoltcp's per-socket scans visit only
//! the sockets in use.
//! Segments of no flow go to shard 0, whose smoltcp answers with RST.
//!
//! TCP settings: Nagle off, delayed ACK off, [`SOCKET_BUFFER`] bytes each
//! way, timestamps from the wall clock (so a peer's TIME-WAIT takes a new
//! SYN on a reused 4-tuple). After our FIN, a socket that reaches TIME-WAIT is recycled at once
//! (smoltcp's TIME-WAIT is a fixed 10 s; a late segment of that flow finds
//! no socket and gets an RST), as is one that waited [`CLOSING_LIMIT`] for
//! the peer's FIN.
//!
//! Poll order, every turn: ingress (each frame to its shard), then the
//! application step (handlers see what changed, their output goes into the
//! sockets), then egress of the shards that changed, then one TX kick.
//! Never ingress after the application step: a socket that changed there
//! would not be looked at until the next frame.
//!
//! Below IP: smoltcp sees bare IP packets (medium IP); this module adds the
//! Ethernet header, answers ARP for our address, resolves next hops (frames
//! wait for the ARP reply, bounded), and learns a client's MAC from its SYN.
//!
//! Copies: a received segment's payload is copied once, from the UMEM frame
//! into smoltcp's receive buffer, and handed to the handler from there
//! (plaintext) or to rustls (TLS). Output is copied from the connection's
//! queue into smoltcp's send buffer, and from there into a UMEM frame.
//!
//! Invariants: see [`super::super::backend`]; a connection id is announced
//! (`on_accept` / `on_connected`) only once its handshake completed (or
//! failed, for a connect); every socket is in exactly one place: a
//! listener, a flow, the resetting list or the free list.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use smoltcp::iface::{PollIngressSingleResult, PollResult, SocketHandle};
use smoltcp::socket::tcp;
use smoltcp::wire::{IpAddress, IpEndpoint};
use xdp::Packet;

use super::super::backend::{Close, Closed, ConnId, ConnectOpts, Handler, RunStats, Setup};
use super::super::conn_table::{self, OutQueue, Part, PushOut, Settle, Table, TlsStep, Transport};
use super::super::timer::Timers;
use super::wire::{self, Frame};

mod link;
mod ports;
mod shard;

pub use link::LinkFaults;
use link::{Dev, Fault, Link};
use ports::PortPool;
use shard::{from_smol, smol_now, Shard};

/// Sockets per shard.
pub const SHARD_SOCKETS: usize = 16;
/// Receive and send buffer of each socket.
pub const SOCKET_BUFFER: usize = 16 * 1024;
/// How long a closed connection's socket waits for the peer's FIN.
pub const CLOSING_LIMIT: Duration = Duration::from_secs(10);
/// Frames waiting for an ARP reply, at most.
const ARP_WAITING: usize = 256;
/// Interval between ARP requests for the same address.
const ARP_RETRY: Duration = Duration::from_millis(200);
/// Frames taken from the RX ring per turn before the application runs.
const RX_BUDGET: usize = 256;
const MTU: usize = 1500;

const XSK: Token = Token(0);
const WAKER: Token = Token(1);

/// A flow: (remote address, remote port, local port).
type FlowKey = (u32, u16, u16);

/// FxHash-style hasher for flow keys (a few multiplications, no SipHash).
#[derive(Default)]
struct FlowHasher(u64);

impl Hasher for FlowHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type FlowMap = HashMap<FlowKey, Flow, BuildHasherDefault<FlowHasher>>;

#[derive(Clone, Copy, Debug)]
struct Flow {
    shard: u32,
    handle: SocketHandle,
    /// The connection, while the handler holds it.
    conn: Option<ConnId>,
}

// ---- connections ------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// A SYN arrived on a listener; not yet told to the handler.
    Embryonic {
        implicit_tls: bool,
    },
    /// `connect` was called; its socket is made at the next settle.
    Pending,
    /// SYN sent.
    Connecting,
    Open,
}

/// A connection's smoltcp socket, its flow and its plaintext output.
pub struct Sock {
    phase: Phase,
    shard: u32,
    handle: Option<SocketHandle>,
    key: FlowKey,
    local: SocketAddr,
    peer: SocketAddr,
    abort_close: bool,
    out: OutQueue,
    close_deadline: Option<Instant>,
}

impl Part for Sock {
    /// rustls reads straight from the socket's receive buffer.
    type TlsIn = ();

    fn tls_in() {}

    #[inline]
    fn unsent(&self) -> usize {
        self.out.len()
    }

    #[inline]
    fn queue(&mut self, data: &[u8]) {
        self.out.push(data, usize::MAX);
    }

    fn close_how(&self, how: Close) -> Close {
        if self.abort_close {
            Close::Abort
        } else {
            how
        }
    }

    fn close_deadline(&self) -> Option<Instant> {
        self.close_deadline
    }

    fn set_close_deadline(&mut self, at: Instant) {
        self.close_deadline = Some(at);
    }

    fn timer_applies(&self) -> bool {
        self.announced() && self.phase != Phase::Pending
    }

    #[inline]
    fn flushable(&self) -> bool {
        self.phase == Phase::Open
    }
}

impl Sock {
    fn announced(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::Connecting | Phase::Pending)
    }
}

type Conn = conn_table::Conn<Sock>;

fn new_conn(phase: Phase, key: FlowKey, local: SocketAddr, peer: SocketAddr) -> Conn {
    Conn::new(Sock {
        phase,
        shard: 0,
        handle: None,
        key,
        local,
        peer,
        abort_close: false,
        out: OutQueue::default(),
        close_deadline: None,
    })
}

/// The thread's connects to make, listening state and source ports
/// (the shards and the link stay with the loop, which the read path
/// borrows meanwhile).
pub struct XdpIo {
    /// `connect` calls whose sockets are made at the next settle.
    pending_connects: Vec<ConnId>,
    listening: bool,
    stop_listening: bool,
    ports: PortPool,
    ip: Ipv4Addr,
    /// Connections the handler holds.
    open: usize,
}

/// The control surface handlers see.
pub type Ops = Table<XdpIo>;

impl Transport for XdpIo {
    type Part = Sock;

    fn local_addr(t: &Ops, id: ConnId) -> Option<SocketAddr> {
        Some(t.conns.get(id)?.io.local)
    }

    fn connect(t: &mut Ops, target: SocketAddr, opts: ConnectOpts) -> io::Result<ConnId> {
        let SocketAddr::V4(v4) = target else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "--io xdp connects over IPv4 only",
            ));
        };
        if let Some(src) = opts.source_ip {
            if src != IpAddr::V4(t.io.ip) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("--io xdp sends from {} only, not {src}", t.io.ip),
                ));
            }
        }
        let Some(port) = t.io.ports.take() else {
            return Err(io::Error::from_raw_os_error(libc::EADDRNOTAVAIL));
        };
        let key = (u32::from(*v4.ip()), v4.port(), port);
        let local = SocketAddr::V4(SocketAddrV4::new(t.io.ip, port));
        let mut c = new_conn(Phase::Pending, key, local, target);
        c.io.abort_close = opts.abort_close;
        let id = t.conns.insert(c);
        t.io.pending_connects.push(id);
        t.io.open += 1;
        Ok(id)
    }

    fn open_connections(t: &Ops) -> usize {
        t.io.open
    }

    fn stop_listening(t: &mut Ops) {
        if t.io.listening {
            t.io.listening = false;
            t.io.stop_listening = true;
        }
    }
}

// ---- the loop ---------------------------------------------------------------

/// One thread's AF_XDP backend.
struct Core {
    ops: Ops,
    shards: Vec<Shard>,
    flows: FlowMap,
    link: Link,
    /// The shard that takes new SYNs.
    listen_shard: usize,
    /// The shard new connects try first.
    connect_shard: usize,
    /// Listening ports with implicit TLS.
    listen_ports: Vec<(u16, bool)>,
    /// Kernel listeners kept open: they hold the ports.
    _kernel_listeners: Vec<std::net::TcpListener>,
    read_buf: Box<[u8]>,
    expired: Vec<ConnId>,
    shard_timers: Timers,
    epoch: Instant,
    seed: u64,
    /// The last receive took the whole budget: do not wait.
    rx_more: bool,
    /// A received frame held back by [`LinkFaults`].
    held: Option<Packet>,
    next_sweep: Instant,
    /// Wall-clock milliseconds at `epoch` (the TCP timestamp clock).
    wall_at_epoch: u32,
    /// The last `now` turned into smoltcp's time, and that time (every
    /// frame of a turn has the same `now`).
    smol_memo: (Instant, smoltcp::time::Instant),
}

/// Runs `h` on AF_XDP (the thread's queue from `x`).
pub fn run<H: Handler>(x: super::XdpThread, setup: Setup, h: &mut H) -> io::Result<RunStats> {
    let run = Arc::clone(&x.run);
    let port = run.open_port(x.index)?;
    let fd: RawFd = port.fd();
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut SourceFd(&fd), XSK, Interest::READABLE)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    setup.stop.add_waker(waker);
    let now = Instant::now();
    let mut listen_ports = Vec::new();
    let mut kernel = Vec::new();
    for (l, tls) in setup.listeners {
        let l = l.into_tcp()?;
        let port = l.local_addr()?.port();
        // The kernel socket keeps the port bound but stops listening: a
        // SYN the program passes (no socket on its queue) gets an RST
        // instead of a connection nobody serves.
        let _ = socket2::SockRef::from(&l).shutdown(std::net::Shutdown::Read);
        if !listen_ports.iter().any(|(p, _)| *p == port) {
            listen_ports.push((port, tls));
        }
        kernel.push(l);
    }
    let block = run
        .port_blocks
        .get(x.index)
        .copied()
        .unwrap_or(super::SOURCE_PORTS);
    let mut link = Link {
        port,
        mac: run.mac,
        ip: run.ip,
        run: Arc::clone(&run),
        neighbors: HashMap::new(),
        waiting: Vec::new(),
        asked: Vec::new(),
        scratch: Vec::with_capacity(MTU),
        dropped: 0,
        faults: LinkFaults::new(&run.faults, 0x5eed ^ x.index as u64),
    };
    // Sequence numbers, and where the source ports start.
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let seed = wall ^ (x.index as u64) << 48 ^ u64::from(std::process::id());
    let first = Shard::new(&mut link, seed, now, now);
    let mut core = Core {
        ops: Table::new(XdpIo {
            pending_connects: Vec::new(),
            listening: !listen_ports.is_empty(),
            stop_listening: false,
            ports: PortPool::new(block, seed),
            ip: run.ip,
            open: 0,
        }),
        shards: vec![first],
        flows: FlowMap::default(),
        link,
        listen_shard: 0,
        connect_shard: 0,
        listen_ports,
        _kernel_listeners: kernel,
        read_buf: vec![0; setup.read_buf_bytes.max(1024)].into_boxed_slice(),
        expired: Vec::with_capacity(64),
        shard_timers: Timers::with_capacity(64),
        epoch: now,
        seed,
        rx_more: false,
        held: None,
        next_sweep: now + Duration::from_secs(1),
        wall_at_epoch: shard::wall_ms(),
        smol_memo: (now, smol_now(now, now)),
    };
    shard::set_tsval(core.wall_at_epoch, now, now);
    core.open_listeners(0);
    let mut events = Events::with_capacity(16);
    let r = core.run(h, &mut poll, &mut events);
    // Held and delayed frames go back to the UMEM with the port.
    run.add_counts(
        core.link.port.rx_frames,
        core.link.port.tx_frames,
        core.link.faults.as_ref().map(|f| &f.counts),
    );
    r?;
    Ok(RunStats {
        waited: core.ops.waited,
    })
}

impl Settle for Core {
    type T = XdpIo;

    #[inline]
    fn table(&mut self) -> &mut Ops {
        &mut self.ops
    }

    /// Listeners to close and connects to make come first.
    fn before<H: Handler>(&mut self, h: &mut H, now: Instant) {
        if self.ops.io.stop_listening {
            self.ops.io.stop_listening = false;
            self.close_listeners();
        }
        if !self.ops.io.pending_connects.is_empty() {
            self.make_connects(h, now);
        }
    }

    /// Reading resumes in `service` (the socket keeps what arrived).
    fn resume<H: Handler>(&mut self, _h: &mut H, _id: ConnId, _now: Instant) {}

    fn service<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) {
        self.service_conn(h, id, now);
    }

    fn retire(&mut self, id: ConnId, why: &Closed) -> bool {
        let Some(c) = self.ops.conns.get(id) else {
            return false;
        };
        let graceful = matches!(why, Closed::Local) && c.pending() == 0 && !c.io.abort_close;
        let announced = c.io.announced();
        let port = c.io.local.port();
        self.let_go(id, !graceful);
        self.ops.conns.remove(id);
        self.ops.timers.cancel(id);
        if !graceful {
            // An aborted flow's source port is free at once (its RST
            // ends it at the peer); the sink has no source ports.
            self.ops.io.ports.give(port);
        }
        if announced {
            self.ops.io.open -= 1;
        }
        announced
    }
}

impl PushOut for Core {
    fn push_out(&mut self, id: ConnId) -> io::Result<bool> {
        self.write_out(id)
    }
}

impl Core {
    fn run<H: Handler>(
        &mut self,
        h: &mut H,
        poll: &mut Poll,
        events: &mut Events,
    ) -> io::Result<()> {
        loop {
            let now = Instant::now();
            let tick = h.on_tick(&mut self.ops, now);
            conn_table::settle(self, h, now);
            if tick.stop {
                let ids: Vec<ConnId> = self.ops.conns.iter().map(|(k, _)| k).collect();
                for id in ids {
                    if self.ops.conns[id].io.announced() {
                        self.ops.kill(id, Closed::Stopped);
                    } else {
                        self.drop_silently(id);
                    }
                }
                conn_table::reap(self, h, now);
                self.egress(now);
                return Ok(());
            }
            self.egress(now);
            let mut wake = self.ops.wake_at(now, &tick);
            for t in [self.shard_timers.next(), Some(self.next_sweep)]
                .into_iter()
                .flatten()
            {
                wake = wake.min(t);
            }
            if !self.link.waiting.is_empty() {
                wake = wake.min(now + ARP_RETRY);
            }
            if let Some(at) = self.link.faults.as_ref().and_then(|f| f.next_due()) {
                wake = wake.min(at);
            }
            let before = Instant::now();
            // Frames left in the RX ring (budget spent), or a TX batch the
            // kernel did not take: come straight back.
            let timeout = if self.rx_more || self.link.port.tx_queued() {
                Duration::ZERO
            } else {
                wake.saturating_duration_since(before)
            };
            if let Err(e) = poll.poll(events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            let now = Instant::now();
            self.ops.waited += now.saturating_duration_since(before);
            shard::set_tsval(self.wall_at_epoch, self.epoch, now);
            // 1. Ingress.
            self.ingress(now);
            self.link.port.refill()?;
            // Timers of smoltcp (retransmissions): those shards run egress.
            self.expired.clear();
            self.expired.extend(self.shard_timers.expired(now));
            for &s in &self.expired {
                if let Some(sh) = self.shards.get_mut(s) {
                    sh.dirty = true;
                    sh.poll_at = None;
                }
            }
            if now >= self.next_sweep {
                self.next_sweep = now + Duration::from_secs(1);
                for s in 0..self.shards.len() {
                    self.sweep_closing(s, now, true);
                }
            }
            if !self.link.waiting.is_empty() {
                self.link.retry_arp(now);
            }
            // 2. The application.
            conn_table::settle(self, h, now);
            let mut expired = std::mem::take(&mut self.expired);
            conn_table::fire_timers(self, h, now, &mut expired);
            self.expired = expired;
            // 3. Egress (at the top of the loop, after on_tick).
        }
    }

    // ---- ingress --------------------------------------------------------------

    fn ingress(&mut self, now: Instant) {
        let mut taken = 0;
        self.rx_more = false;
        while taken < RX_BUDGET {
            let n = self.link.port.receive();
            if n == 0 {
                break;
            }
            taken += n;
            while let Some(p) = self.link.port.next_rx() {
                if self.link.faults.is_none() {
                    self.frame(&p, now);
                    self.link.port.release(p);
                    continue;
                }
                self.faulty_rx(p, now);
            }
        }
        if self.link.faults.is_some() {
            if taken == 0 {
                // Nothing followed the held frame this turn: deliver it late.
                if let Some(h) = self.held.take() {
                    self.pass(h, now);
                }
            }
            while let Some(p) = self.link.faults.as_mut().and_then(|f| f.due(now)) {
                self.frame(&p, now);
                self.link.port.release(p);
            }
        }
        self.rx_more = taken >= RX_BUDGET;
    }

    /// A received frame under `--xdp-faults`: lost, held behind the next
    /// one, or passed on.
    fn faulty_rx(&mut self, p: Packet, now: Instant) {
        let Some(f) = self.link.faults.as_mut() else {
            return;
        };
        match f.on_rx(&p) {
            Fault::Drop => {
                self.link.port.release(p);
                return;
            }
            Fault::Hold if self.held.is_none() => {
                f.counts.reordered += 1;
                self.held = Some(p);
                return;
            }
            _ => {}
        }
        self.pass(p, now);
        // A held frame arrives after the one that followed it.
        if let Some(h) = self.held.take() {
            self.pass(h, now);
        }
    }

    /// To TCP now, or after `delay=`.
    fn pass(&mut self, p: Packet, now: Instant) {
        let p = match self.link.faults.as_mut() {
            Some(f) if !f.delay.is_zero() => match f.delay(p, now) {
                Ok(()) => return,
                Err(p) => {
                    self.link.port.release(p);
                    return;
                }
            },
            _ => p,
        };
        self.frame(&p, now);
        self.link.port.release(p);
    }

    fn frame(&mut self, p: &Packet, now: Instant) {
        match wire::classify(p, self.link.ip) {
            Frame::Arp {
                op,
                sender_mac,
                sender_ip,
            } => self.link.on_arp(op, sender_mac, sender_ip),
            Frame::Tcp {
                src_mac,
                src,
                src_port,
                dst_port,
                syn,
                ip_len,
            } => {
                let key = (u32::from(src), src_port, dst_port);
                let flow = self.flows.get(&key).copied();
                let mut new_on: Option<(u16, bool)> = None;
                let shard = match flow {
                    Some(f) => f.shard as usize,
                    None if syn && self.ops.io.listening => {
                        match self.listen_ports.iter().find(|(p, _)| *p == dst_port) {
                            Some(&lp) => {
                                self.link.learn(src, src_mac);
                                new_on = Some(lp);
                                self.ensure_listener(dst_port)
                            }
                            None => 0,
                        }
                    }
                    None => 0,
                };
                let ip = &p[wire::ETH_LEN..wire::ETH_LEN + ip_len];
                self.deliver(shard, ip, now);
                match flow {
                    Some(Flow { conn: Some(id), .. }) => self.ops.mark_dirty(id),
                    Some(Flow {
                        conn: None, handle, ..
                    }) => self.check_closing(shard, handle, key),
                    None => {
                        if let Some((port, tls)) = new_on {
                            self.accepted(shard, port, tls, key, src, now);
                        }
                    }
                }
            }
            Frame::Other => {}
        }
    }

    /// smoltcp's time at `now` (computed once per turn).
    #[inline]
    fn smol_at(&mut self, now: Instant) -> smoltcp::time::Instant {
        if self.smol_memo.0 != now {
            self.smol_memo = (now, smol_now(self.epoch, now));
        }
        self.smol_memo.1
    }

    fn deliver(&mut self, shard: usize, ip: &[u8], now: Instant) {
        let t = self.smol_at(now);
        let sh = &mut self.shards[shard];
        let mut dev = Dev {
            link: &mut self.link,
            rx: Some(ip),
            now,
        };
        let _: PollIngressSingleResult = sh.iface.poll_ingress_single(t, &mut dev, &mut sh.sockets);
        sh.dirty = true;
    }

    /// A SYN was given to `shard`'s listener on `port`: if it took it, it
    /// is an embryonic connection now, and the shard listens anew.
    fn accepted(
        &mut self,
        shard: usize,
        port: u16,
        tls: bool,
        key: FlowKey,
        src: Ipv4Addr,
        _now: Instant,
    ) {
        let sh = &mut self.shards[shard];
        let Some(i) = sh.listeners.iter().position(|(p, _)| *p == port) else {
            return;
        };
        let Some(h) = sh.listeners[i].1 else { return };
        if sh.sock(h).state() == tcp::State::Listen {
            return;
        }
        sh.listeners[i].1 = None;
        let local = SocketAddr::V4(SocketAddrV4::new(self.link.ip, port));
        let peer = SocketAddr::V4(SocketAddrV4::new(src, key.1));
        let mut c = new_conn(Phase::Embryonic { implicit_tls: tls }, key, local, peer);
        c.io.shard = shard as u32;
        c.io.handle = Some(h);
        let id = self.ops.conns.insert(c);
        self.flows.insert(
            key,
            Flow {
                shard: shard as u32,
                handle: h,
                conn: Some(id),
            },
        );
        self.ops.mark_dirty(id);
        self.ensure_listener(port);
    }

    /// The shard that listens on `port` now (a socket is made listening if
    /// the current one has none; a full shard hands over to another).
    fn ensure_listener(&mut self, port: u16) -> usize {
        let s = self.listen_shard;
        if self.shard_listens(s, port) {
            return s;
        }
        let s = self.shard_with_free(s);
        if s != self.listen_shard {
            // The old shard's remaining listeners are of no use now.
            let old = self.listen_shard;
            let handles: Vec<SocketHandle> = self.shards[old]
                .listeners
                .iter_mut()
                .filter_map(|(_, h)| h.take())
                .collect();
            for h in handles {
                self.shards[old].reset(h);
            }
            self.listen_shard = s;
            self.open_listeners(s);
        }
        self.shard_listens(s, port);
        s
    }

    fn shard_listens(&mut self, s: usize, port: u16) -> bool {
        let sh = &mut self.shards[s];
        let slot = match sh.listeners.iter().position(|(p, _)| *p == port) {
            Some(i) => i,
            None => {
                sh.listeners.push((port, None));
                sh.listeners.len() - 1
            }
        };
        if sh.listeners[slot].1.is_none() {
            sh.listeners[slot].1 = sh.listen(port);
        }
        sh.listeners[slot].1.is_some()
    }

    fn open_listeners(&mut self, s: usize) {
        if !self.ops.io.listening {
            return;
        }
        let ports: Vec<u16> = self.listen_ports.iter().map(|(p, _)| *p).collect();
        for p in ports {
            self.shard_listens(s, p);
        }
    }

    /// A shard with a free socket (`prefer` first), made if none has one.
    fn shard_with_free(&mut self, prefer: usize) -> usize {
        if self.shards.get(prefer).is_some_and(|s| s.has_free()) {
            return prefer;
        }
        if let Some(i) = self.shards.iter().position(|s| s.has_free()) {
            return i;
        }
        let now = Instant::now();
        let seed = self
            .seed
            .wrapping_add(self.shards.len() as u64 * 0x9e37_79b9);
        let sh = Shard::new(&mut self.link, seed, now, self.epoch);
        self.shards.push(sh);
        self.shards.len() - 1
    }

    // ---- the application step -------------------------------------------------

    fn close_listeners(&mut self) {
        for sh in &mut self.shards {
            let handles: Vec<SocketHandle> = sh
                .listeners
                .iter_mut()
                .filter_map(|(_, h)| h.take())
                .collect();
            for h in handles {
                sh.reset(h);
            }
        }
        self._kernel_listeners.clear();
    }

    fn make_connects<H: Handler>(&mut self, h: &mut H, now: Instant) {
        let ids = std::mem::take(&mut self.ops.io.pending_connects);
        for id in ids {
            let Some(c) = self.ops.conns.get(id) else {
                continue;
            };
            if c.io.phase != Phase::Pending {
                continue;
            }
            let (key, peer, local) = (c.io.key, c.io.peer, c.io.local);
            let s = self.shard_with_free(self.connect_shard);
            self.connect_shard = s;
            let sh = &mut self.shards[s];
            let Some(handle) = sh.take() else {
                continue;
            };
            let remote = match peer {
                SocketAddr::V4(a) => IpEndpoint::new(IpAddress::Ipv4(*a.ip()), a.port()),
                SocketAddr::V6(_) => unreachable!("connect takes IPv4 only"),
            };
            let local_ep = IpEndpoint::new(IpAddress::Ipv4(self.link.ip), local.port());
            let r = {
                let cx = sh.iface.context();
                let sock = sh.sockets.get_mut::<tcp::Socket>(handle);
                sock.connect(cx, remote, local_ep)
            };
            match r {
                Ok(()) => {
                    sh.dirty = true;
                    let c = &mut self.ops.conns[id];
                    c.io.phase = Phase::Connecting;
                    c.io.shard = s as u32;
                    c.io.handle = Some(handle);
                    self.flows.insert(
                        key,
                        Flow {
                            shard: s as u32,
                            handle,
                            conn: Some(id),
                        },
                    );
                }
                Err(e) => {
                    sh.give_back(handle);
                    self.ops.conns.remove(id);
                    self.ops.timers.cancel(id);
                    self.ops.io.ports.give(local.port());
                    self.ops.io.open -= 1;
                    h.on_connected(
                        &mut self.ops,
                        now,
                        id,
                        Err(io::Error::other(format!("connect: {e}"))),
                    );
                }
            }
        }
    }

    /// Everything a touched connection may need: its handshake's end, reads,
    /// the peer's FIN or RST, and flushing.
    fn service_conn<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) {
        let Some(c) = self.ops.conns.get(id) else {
            return;
        };
        if c.closing == Some(Close::Abort) {
            return;
        }
        if c.closing == Some(Close::Graceful) && c.io.phase != Phase::Open {
            // Closed before the handshake ended: nothing to flush.
            self.ops.kill(id, Closed::Local);
            return;
        }
        let (Some(handle), shard) = (c.io.handle, c.io.shard as usize) else {
            return;
        };
        let state = self.shards[shard].sock(handle).state();
        match c.io.phase {
            Phase::Embryonic { implicit_tls } => match state {
                tcp::State::SynReceived => return,
                tcp::State::Listen | tcp::State::Closed | tcp::State::TimeWait => {
                    // The handshake failed (RST or timeout): never announced.
                    self.drop_silently(id);
                    return;
                }
                _ => {
                    let peer = c.io.peer;
                    self.ops.conns[id].io.phase = Phase::Open;
                    self.ops.io.open += 1;
                    if !h.on_accept(&mut self.ops, now, id, peer, implicit_tls) {
                        // Refused: what it wrote leaves, then FIN; no on_closed.
                        self.ops.io.open -= 1;
                        let _ = self.write_out(id);
                        self.let_go(id, false);
                        self.ops.conns.remove(id);
                        self.ops.timers.cancel(id);
                        return;
                    }
                }
            },
            Phase::Connecting => match state {
                tcp::State::SynSent => return,
                tcp::State::Closed | tcp::State::Listen | tcp::State::TimeWait => {
                    let port = c.io.local.port();
                    self.let_go(id, true);
                    self.ops.conns.remove(id);
                    self.ops.timers.cancel(id);
                    self.ops.io.ports.give(port);
                    self.ops.io.open -= 1;
                    h.on_connected(
                        &mut self.ops,
                        now,
                        id,
                        Err(io::ErrorKind::ConnectionRefused.into()),
                    );
                    return;
                }
                _ => {
                    self.ops.conns[id].io.phase = Phase::Open;
                    h.on_connected(&mut self.ops, now, id, Ok(()));
                }
            },
            Phase::Pending => return,
            Phase::Open => {}
        }
        self.read(h, id, now);
        conn_table::flush(self, h, id, now);
    }

    /// Reads `id` until the socket is empty, the handler stops reading or
    /// closes, or the stream ends.
    fn read<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) {
        loop {
            let Some(c) = self.ops.conns.get(id) else {
                return;
            };
            if c.closing.is_some() || c.eof || !c.reading {
                return;
            }
            let (shard, handle) = (
                c.io.shard as usize,
                c.io.handle.expect("an open connection has a socket"),
            );
            if c.tls.is_some() {
                if !self.read_tls(h, id, now) {
                    return;
                }
                continue;
            }
            let Core { shards, ops, .. } = self;
            let s = shards[shard].sock(handle);
            if s.can_recv() {
                let _ = s.recv(|buf| {
                    h.on_input(ops, now, id, buf);
                    (buf.len(), ())
                });
                continue;
            }
            self.at_end(h, id, now);
            return;
        }
    }

    /// Nothing to read: report the peer's FIN, or its RST.
    fn at_end<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) {
        let Some(c) = self.ops.conns.get(id) else {
            return;
        };
        let s = self.shards[c.io.shard as usize]
            .sock(c.io.handle.expect("an open connection has a socket"));
        let (state, may_recv) = (s.state(), s.may_recv());
        match state {
            tcp::State::Closed | tcp::State::Listen => {
                self.ops
                    .kill(id, Closed::Error(io::ErrorKind::ConnectionReset.into()));
            }
            _ if !may_recv && !c.eof => {
                self.ops.conns[id].eof = true;
                h.on_peer_closed(&mut self.ops, now, id);
            }
            _ => {}
        }
    }

    /// One step of a TLS read; false when there is nothing more for now.
    fn read_tls<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) -> bool {
        match self.ops.tls_plaintext(h, id, now, &mut self.read_buf) {
            TlsStep::Again => return true,
            TlsStep::Stop => return false,
            TlsStep::Need => {}
        }
        let Core { shards, ops, .. } = self;
        // More ciphertext from the socket (no callback in here).
        let c = &mut ops.conns[id];
        let Some(t) = c.tls.as_mut() else {
            return false;
        };
        let s =
            shards[c.io.shard as usize].sock(c.io.handle.expect("an open connection has a socket"));
        if s.can_recv() {
            let r = s.recv(|buf| match t.stream.read_ciphertext(buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match r {
                Ok(Ok(n)) => return n > 0,
                Ok(Err(e)) => {
                    // The alert is queued: send it, then give up.
                    t.stream.write_ciphertext(&mut c.io.out.buf);
                    let _ = s.send_slice(c.io.out.rest());
                    shards[c.io.shard as usize].dirty = true;
                    ops.kill(id, Closed::Error(e));
                    return false;
                }
                Err(_) => {}
            }
        }
        match s.state() {
            tcp::State::Closed | tcp::State::Listen => {
                ops.kill(id, Closed::Error(io::ErrorKind::ConnectionReset.into()));
                false
            }
            _ if !s.may_recv() => {
                // FIN: rustls reports close_notify or truncation as the end.
                t.stream.peer_eof();
                true
            }
            _ => false,
        }
    }

    /// Moves queued output into the socket; true when all of it is in.
    fn write_out(&mut self, id: ConnId) -> io::Result<bool> {
        let Some(c) = self.ops.conns.get_mut(id) else {
            return Ok(true);
        };
        let Some(handle) = c.io.handle else {
            return Ok(true);
        };
        let out = &mut c.io.out;
        if let Some(t) = &mut c.tls {
            if t.stream.wants_write() {
                if out.is_empty() {
                    out.clear();
                }
                t.stream.write_ciphertext(&mut out.buf);
            }
        }
        let sh = &mut self.shards[c.io.shard as usize];
        let s = sh.sockets.get_mut::<tcp::Socket>(handle);
        while !out.is_empty() {
            match s.send_slice(out.rest()) {
                Ok(0) => break,
                Ok(n) => {
                    out.pos += n;
                    sh.dirty = true;
                }
                Err(_) => return Err(io::ErrorKind::BrokenPipe.into()),
            }
        }
        if out.is_empty() {
            out.clear();
        }
        c.note_sent();
        Ok(c.pending() == 0)
    }

    /// Detaches `id`'s socket from the connection: an RST now (`abort`), or
    /// a FIN after the queued output (the socket then waits in the shard's
    /// closing list for the peer).
    fn let_go(&mut self, id: ConnId, abort: bool) {
        let Some(c) = self.ops.conns.get_mut(id) else {
            return;
        };
        let Some(handle) = c.io.handle.take() else {
            if c.io.phase == Phase::Pending {
                self.ops.io.ports.give(c.io.local.port());
            }
            return;
        };
        let key = c.io.key;
        let sh = &mut self.shards[c.io.shard as usize];
        if abort {
            self.flows.remove(&key);
            sh.reset(handle);
        } else {
            sh.sock(handle).close();
            sh.dirty = true;
            sh.closing.push((handle, key, Instant::now()));
            if let Some(f) = self.flows.get_mut(&key) {
                f.conn = None;
            }
        }
    }

    /// Forgets a connection the handler never saw (failed handshake, stop).
    fn drop_silently(&mut self, id: ConnId) {
        let phase = self.ops.conns.get(id).map(|c| c.io.phase);
        self.let_go(id, true);
        if phase == Some(Phase::Pending) || phase == Some(Phase::Connecting) {
            self.ops.io.open -= 1;
        }
        self.ops.conns.remove(id);
        self.ops.timers.cancel(id);
    }

    /// A segment reached a socket the handler let go: recycle it once the
    /// exchange of FINs is over.
    fn check_closing(&mut self, shard: usize, handle: SocketHandle, _key: FlowKey) {
        let st = self.shards[shard].sock(handle).state();
        if matches!(st, tcp::State::TimeWait | tcp::State::Closed) {
            self.sweep_closing(shard, Instant::now(), false);
        }
    }

    /// Recycles the shard's let-go sockets that are done (or too old).
    fn sweep_closing(&mut self, shard: usize, now: Instant, expire: bool) {
        let sh = &mut self.shards[shard];
        let mut i = 0;
        while i < sh.closing.len() {
            let (handle, key, since) = sh.closing[i];
            let st = sh.sock(handle).state();
            let old = expire && now.saturating_duration_since(since) >= CLOSING_LIMIT;
            if matches!(st, tcp::State::TimeWait | tcp::State::Closed) || old {
                sh.closing.swap_remove(i);
                sh.reset(handle);
                self.flows.remove(&key);
                // Our source port (if it was one) is free again.
                if key.2 >= self.ops.io.ports.lo {
                    self.ops.io.ports.give(key.2);
                }
            } else {
                i += 1;
            }
        }
    }

    // ---- egress ---------------------------------------------------------------

    fn egress(&mut self, now: Instant) {
        let t = self.smol_at(now);
        for (i, sh) in self.shards.iter_mut().enumerate() {
            if !sh.dirty {
                continue;
            }
            sh.dirty = false;
            let mut dev = Dev {
                link: &mut self.link,
                rx: None,
                now,
            };
            loop {
                if sh.iface.poll_egress(t, &mut dev, &mut sh.sockets) == PollResult::None {
                    break;
                }
            }
            // Sockets whose RST is out are spare now (out of the set).
            sh.recycle_reset();
            let next = sh
                .iface
                .poll_at(t, &sh.sockets)
                .map(|p| from_smol(self.epoch, p));
            if next != sh.poll_at {
                sh.poll_at = next;
                match next {
                    Some(at) => self
                        .shard_timers
                        .schedule(i, at.max(now + Duration::from_micros(100))),
                    None => self.shard_timers.cancel(i),
                }
            }
        }
        let _ = self.link.port.flush_tx();
    }
}
