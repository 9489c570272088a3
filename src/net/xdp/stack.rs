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
//! returns to its shard's free list (after its RST, if any, went out).
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
use slab::Slab;
use smoltcp::iface::{
    Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use xdp::Packet;

use super::super::backend::{
    AppBytes, Backend, Close, Closed, ConnId, ConnectOpts, Handler, Setup, TlsState,
};
use super::super::driver::RunStats;
use super::super::runtime::STOP_POLL_INTERVAL;
use super::super::timer::Timers;
use super::super::tls::TlsInfo;
use super::super::tls_stream::{TlsRead, TlsSide, TlsStream};
use super::port::Port;
use super::wire::{self, Frame, Mac};
use super::XdpRun;

/// Sockets per shard.
pub const SHARD_SOCKETS: usize = 16;
/// Receive and send buffer of each socket.
pub const SOCKET_BUFFER: usize = 16 * 1024;
/// How long a closed connection's socket waits for the peer's FIN.
pub const CLOSING_LIMIT: Duration = Duration::from_secs(10);
/// How long a graceful close may take to flush its last output.
pub const CLOSE_FLUSH_LIMIT: Duration = Duration::from_secs(5);
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

// ---- below IP ---------------------------------------------------------------

/// Everything of the thread below IP: the AF_XDP port, neighbours, ARP.
struct Link {
    port: Port,
    run: Arc<XdpRun>,
    mac: Mac,
    ip: Ipv4Addr,
    neighbors: HashMap<Ipv4Addr, Mac>,
    /// Frames waiting for their next hop's MAC.
    waiting: Vec<(Ipv4Addr, Packet)>,
    /// When each unresolved next hop was last asked for.
    asked: Vec<(Ipv4Addr, Instant)>,
    /// Where smoltcp writes when no UMEM frame is free (the frame is lost;
    /// TCP retransmits it).
    scratch: Vec<u8>,
    /// Frames dropped for want of a frame or of a neighbour.
    pub dropped: u64,
    /// Loss and reordering injected for tests (see [`LinkFaults`]).
    faults: Option<LinkFaults>,
}

/// What [`LinkFaults`] does to a received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Deliver,
    Drop,
    /// Deliver it after the next frame.
    Hold,
}

/// Loss and reordering on the link, for tests where `tc netem` is not
/// available (and it could not act on AF_XDP frames anyway: copy-mode TX
/// bypasses the qdisc): `SMTPSTORM_XDP_LOSS=PCT` drops that share of
/// frames each way, `SMTPSTORM_XDP_REORDER=PCT` delays that share of
/// received frames behind the next one. A fixed-seed xorshift, so a run
/// is repeatable in what it draws.
#[derive(Clone, Debug)]
pub struct LinkFaults {
    state: u64,
    loss_ppm: u64,
    reorder_ppm: u64,
}

impl LinkFaults {
    /// From the environment (`None` when neither variable is set).
    pub fn from_env(seed: u64) -> Option<LinkFaults> {
        let pct = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim_end_matches('%').parse::<f64>().ok())
                .map(|p| (p.clamp(0.0, 100.0) * 10_000.0) as u64)
        };
        let (loss, reorder) = (pct("SMTPSTORM_XDP_LOSS"), pct("SMTPSTORM_XDP_REORDER"));
        if loss.is_none() && reorder.is_none() {
            return None;
        }
        Some(LinkFaults {
            state: seed | 1,
            loss_ppm: loss.unwrap_or(0),
            reorder_ppm: reorder.unwrap_or(0),
        })
    }

    fn draw(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state % 1_000_000
    }

    fn on_rx(&mut self) -> Fault {
        let d = self.draw();
        if d < self.loss_ppm {
            Fault::Drop
        } else if d < self.loss_ppm + self.reorder_ppm {
            Fault::Hold
        } else {
            Fault::Deliver
        }
    }

    fn on_tx(&mut self) -> bool {
        self.draw() < self.loss_ppm
    }
}

impl Link {
    fn next_hop(&self, dst: Ipv4Addr) -> Ipv4Addr {
        match self.run.gateway {
            Some(gw) if !self.run.on_link(dst) => gw,
            _ => dst,
        }
    }

    fn learn(&mut self, ip: Ipv4Addr, mac: Mac) {
        if self.neighbors.get(&ip) != Some(&mac) {
            self.neighbors.insert(ip, mac);
        }
    }

    /// Sends a frame whose IP packet starts at byte 14.
    fn send_ip(&mut self, mut p: Packet, now: Instant) {
        let lost = self.faults.as_mut().is_some_and(|f| f.on_tx());
        let Some(dst) = wire::ipv4_dst(&p[wire::ETH_LEN..]).filter(|_| !lost) else {
            self.port.release(p);
            return;
        };
        let hop = self.next_hop(dst);
        if let Some(mac) = self
            .neighbors
            .get(&hop)
            .copied()
            .or_else(|| self.shared_neighbor(hop))
        {
            wire::put_eth(&mut p, mac, self.mac, wire::ETHERTYPE_IPV4);
            self.port.queue_tx(p);
            return;
        }
        if self.waiting.len() >= ARP_WAITING {
            self.dropped += 1;
            self.port.release(p);
        } else {
            self.waiting.push((hop, p));
        }
        self.ask(hop, now);
    }

    /// Looks `ip` up in the run's table (filled by whichever thread got the
    /// ARP reply) and keeps it.
    fn shared_neighbor(&mut self, ip: Ipv4Addr) -> Option<Mac> {
        let mac = self.run.neighbors.lock().ok()?.get(&ip).copied()?;
        self.neighbors.insert(ip, mac);
        Some(mac)
    }

    /// Sends an ARP request for `ip` unless one went out recently.
    fn ask(&mut self, ip: Ipv4Addr, now: Instant) {
        if let Some((_, at)) = self.asked.iter().find(|(a, _)| *a == ip) {
            if now.saturating_duration_since(*at) < ARP_RETRY {
                return;
            }
        }
        self.asked.retain(|(a, _)| *a != ip);
        self.asked.push((ip, now));
        self.arp(1, [0; 6], ip);
    }

    fn arp(&mut self, op: u16, their_mac: Mac, their_ip: Ipv4Addr) {
        let Some(mut p) = self.port.alloc(wire::ARP_FRAME_LEN) else {
            self.dropped += 1;
            return;
        };
        wire::put_arp(&mut p, op, self.mac, self.ip, their_mac, their_ip);
        self.port.queue_tx(p);
    }

    /// An ARP frame for our address: answer a request, learn the sender,
    /// release what waited for it.
    fn on_arp(&mut self, op: u16, mac: Mac, ip: Ipv4Addr) {
        self.learn(ip, mac);
        if let Ok(mut t) = self.run.neighbors.lock() {
            t.insert(ip, mac);
        }
        if op == 1 {
            self.arp(2, mac, ip);
        }
        self.release_waiting();
    }

    /// Sends the waiting frames whose next hop is now known; asks again
    /// for the others when due.
    fn release_waiting(&mut self) {
        if self.waiting.is_empty() {
            self.asked.clear();
            return;
        }
        let mut i = 0;
        while i < self.waiting.len() {
            let hop = self.waiting[i].0;
            if let Some(mac) = self
                .neighbors
                .get(&hop)
                .copied()
                .or_else(|| self.shared_neighbor(hop))
            {
                let (_, mut p) = self.waiting.swap_remove(i);
                wire::put_eth(&mut p, mac, self.mac, wire::ETHERTYPE_IPV4);
                self.port.queue_tx(p);
            } else {
                i += 1;
            }
        }
    }

    /// Asks again for next hops whose frames still wait.
    fn retry_arp(&mut self, now: Instant) {
        self.release_waiting();
        let hops: Vec<Ipv4Addr> = self.waiting.iter().map(|(h, _)| *h).collect();
        for h in hops {
            self.ask(h, now);
        }
    }
}

/// smoltcp's view of the link: one received IP packet at a time, and TX
/// frames built straight into the UMEM.
struct Dev<'a> {
    link: &'a mut Link,
    rx: Option<&'a [u8]>,
    now: Instant,
}

struct Rx<'a>(&'a [u8]);
struct Tx<'a, 'b> {
    link: &'b mut Link,
    now: Instant,
    _p: std::marker::PhantomData<&'a ()>,
}

impl RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl TxToken for Tx<'_, '_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        match self.link.port.alloc(wire::ETH_LEN + len) {
            Some(mut p) => {
                let r = f(&mut p[wire::ETH_LEN..]);
                self.link.send_ip(p, self.now);
                r
            }
            None => {
                self.link.dropped += 1;
                self.link.scratch.resize(len, 0);
                f(&mut self.link.scratch[..len])
            }
        }
    }
}

fn caps() -> DeviceCapabilities {
    let mut c = DeviceCapabilities::default();
    c.medium = Medium::Ip;
    c.max_transmission_unit = MTU;
    // Received checksums are checked in `wire::classify` (which accepts a
    // peer's unfinished TX offload); smoltcp fills in ours.
    c.checksum.ipv4 = Checksum::Tx;
    c.checksum.tcp = Checksum::Tx;
    c
}

impl Device for Dev<'_> {
    type RxToken<'b>
        = Rx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b, 'b>
    where
        Self: 'b;

    fn receive(&mut self, _t: SInstant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let rx = self.rx.take()?;
        Some((
            Rx(rx),
            Tx {
                link: &mut *self.link,
                now: self.now,
                _p: std::marker::PhantomData,
            },
        ))
    }

    fn transmit(&mut self, _t: SInstant) -> Option<Self::TxToken<'_>> {
        Some(Tx {
            link: &mut *self.link,
            now: self.now,
            _p: std::marker::PhantomData,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        caps()
    }
}

// ---- shards -----------------------------------------------------------------

struct Shard {
    iface: Interface,
    sockets: SocketSet<'static>,
    /// Closed sockets ready for a connection or a listener.
    free: Vec<SocketHandle>,
    /// Aborted sockets whose RST goes out at the next egress.
    resetting: Vec<SocketHandle>,
    /// The listening socket of each listening port.
    listeners: Vec<(u16, Option<SocketHandle>)>,
    /// Sockets the handler let go, until TIME-WAIT: (handle, flow, since).
    closing: Vec<(SocketHandle, FlowKey, Instant)>,
    /// Something changed: run egress.
    dirty: bool,
    /// smoltcp's next timer (retransmission), as our instant.
    poll_at: Option<Instant>,
}

fn new_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
    );
    s.set_nagle_enabled(false);
    s.set_ack_delay(None);
    // Timestamps from the wall clock (milliseconds), so they grow across
    // runs: a peer holding one of our 4-tuples in TIME-WAIT takes a new
    // SYN on it only if it is newer (PAWS) or its sequence number is
    // (smoltcp's is random). Without them, a blaster reusing its source
    // ports within a minute of the last run stalls on RSTs and 1 s SYN
    // retransmissions.
    s.set_tsval_generator(Some(tsval));
    // Bounds retransmission (a vanished peer); idle connections never
    // time out here (the handlers' deadlines do that).
    s.set_timeout(Some(smoltcp::time::Duration::from_secs(60)));
    s
}

impl Shard {
    fn new(link: &mut Link, seed: u64, now: Instant, epoch: Instant) -> Shard {
        let mut cfg = Config::new(HardwareAddress::Ip);
        cfg.random_seed = seed;
        let mut dev = Dev {
            link,
            rx: None,
            now,
        };
        let mut iface = Interface::new(cfg, &mut dev, smol_now(epoch, now));
        let ip = dev.link.ip;
        iface.update_ip_addrs(|a| {
            // Every destination is "on link" for smoltcp: next hops are ours.
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip), 0));
        });
        let mut sockets = SocketSet::new(Vec::with_capacity(SHARD_SOCKETS));
        let free = (0..SHARD_SOCKETS)
            .map(|_| sockets.add(new_socket()))
            .collect();
        Shard {
            iface,
            sockets,
            free,
            resetting: Vec::new(),
            listeners: Vec::new(),
            closing: Vec::new(),
            dirty: false,
            poll_at: None,
        }
    }

    fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// Aborts `h` (an RST if it was connected); free after the next egress.
    fn reset(&mut self, h: SocketHandle) {
        self.sock(h).abort();
        self.resetting.push(h);
        self.dirty = true;
    }

    /// A free socket listening on `port`, if the shard has one to spare.
    fn listen(&mut self, port: u16) -> Option<SocketHandle> {
        let h = self.free.pop()?;
        if self.sock(h).listen(port).is_err() {
            self.free.push(h);
            return None;
        }
        Some(h)
    }
}

/// TCP timestamp value: wall-clock milliseconds (wrapping).
fn tsval() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u32)
        .unwrap_or(0)
}

fn smol_now(epoch: Instant, now: Instant) -> SInstant {
    SInstant::from_micros(now.saturating_duration_since(epoch).as_micros() as i64)
}

fn from_smol(epoch: Instant, t: SInstant) -> Instant {
    epoch + Duration::from_micros(t.total_micros().max(0) as u64)
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

struct TlsPart {
    stream: TlsStream,
}

struct Conn {
    phase: Phase,
    shard: u32,
    handle: Option<SocketHandle>,
    key: FlowKey,
    local: SocketAddr,
    peer: SocketAddr,
    abort_close: bool,
    tls: Option<Box<TlsPart>>,
    out: Vec<u8>,
    out_pos: usize,
    app: AppBytes,
    eof: bool,
    reading: bool,
    closing: Option<Close>,
    close_deadline: Option<Instant>,
    /// Queued in `Ops::touched`.
    touched: bool,
}

impl Conn {
    fn new(phase: Phase, key: FlowKey, local: SocketAddr, peer: SocketAddr) -> Conn {
        Conn {
            phase,
            shard: 0,
            handle: None,
            key,
            local,
            peer,
            abort_close: false,
            tls: None,
            out: Vec::new(),
            out_pos: 0,
            app: AppBytes::default(),
            eof: false,
            reading: true,
            closing: None,
            close_deadline: None,
            touched: false,
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

    fn queue(&mut self, data: &[u8]) {
        self.app.taken += data.len() as u64;
        match &mut self.tls {
            None => {
                if self.out_pos == self.out.len() {
                    self.out.clear();
                    self.out_pos = 0;
                }
                self.out.extend_from_slice(data);
            }
            Some(t) => t.stream.write_plaintext(data),
        }
    }

    fn announced(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::Connecting | Phase::Pending)
    }
}

/// Source ports of this thread's outgoing connections.
struct PortPool {
    lo: u16,
    used: Vec<bool>,
    next: usize,
}

impl PortPool {
    /// The ports `lo..=hi`, first given from a point set by `seed` (so
    /// runs in a row do not start on the same 4-tuples).
    fn new((lo, hi): (u16, u16), seed: u64) -> PortPool {
        let n = if hi >= lo {
            usize::from(hi - lo) + 1
        } else {
            0
        };
        PortPool {
            lo,
            used: vec![false; n],
            next: if n == 0 {
                0
            } else {
                (seed % n as u64) as usize
            },
        }
    }

    /// The next free port after the last one given (oldest reuse first).
    fn take(&mut self) -> Option<u16> {
        let n = self.used.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            if !self.used[i] {
                self.used[i] = true;
                self.next = (i + 1) % n;
                return Some(self.lo + i as u16);
            }
        }
        None
    }

    fn give(&mut self, port: u16) {
        if let Some(u) = port
            .checked_sub(self.lo)
            .and_then(|i| self.used.get_mut(usize::from(i)))
        {
            *u = false;
        }
    }
}

/// The control surface handlers see (everything but the shards and the
/// link, which the read path borrows meanwhile).
pub struct Ops {
    conns: Slab<Conn>,
    timers: Timers,
    touched: Vec<ConnId>,
    dead: Vec<(ConnId, Closed)>,
    /// `connect` calls whose sockets are made at the next settle.
    pending_connects: Vec<ConnId>,
    listening: bool,
    stop_listening: bool,
    ports: PortPool,
    ip: Ipv4Addr,
    /// Connections the handler holds.
    open: usize,
    waited: Duration,
}

impl Ops {
    fn touch(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(id) {
            if !c.touched {
                c.touched = true;
                self.touched.push(id);
            }
        }
    }

    fn kill(&mut self, id: ConnId, why: Closed) {
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
            self.touch(id);
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
        }));
        self.touch(id);
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
        if c.reading != on {
            c.reading = on;
            if on {
                self.touch(id);
            }
        }
    }

    fn close(&mut self, id: ConnId, how: Close) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let how = if c.abort_close { Close::Abort } else { how };
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
                    self.touch(id);
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
        Some(self.conns.get(id)?.local)
    }

    fn connect(&mut self, target: SocketAddr, opts: ConnectOpts) -> io::Result<ConnId> {
        let SocketAddr::V4(t) = target else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "--io xdp connects over IPv4 only",
            ));
        };
        if let Some(src) = opts.source_ip {
            if src != IpAddr::V4(self.ip) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("--io xdp sends from {} only, not {src}", self.ip),
                ));
            }
        }
        let Some(port) = self.ports.take() else {
            return Err(io::Error::from_raw_os_error(libc::EADDRNOTAVAIL));
        };
        let key = (u32::from(*t.ip()), t.port(), port);
        let local = SocketAddr::V4(SocketAddrV4::new(self.ip, port));
        let mut c = Conn::new(Phase::Pending, key, local, target);
        c.abort_close = opts.abort_close;
        let id = self.conns.insert(c);
        self.pending_connects.push(id);
        self.open += 1;
        Ok(id)
    }

    fn open_connections(&self) -> usize {
        self.open
    }

    fn stop_listening(&mut self) {
        if self.listening {
            self.listening = false;
            self.stop_listening = true;
        }
    }

    fn waited(&self) -> Duration {
        self.waited
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
        faults: LinkFaults::from_env(0x5eed ^ x.index as u64),
    };
    // Sequence numbers, and where the source ports start.
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let seed = wall ^ (x.index as u64) << 48 ^ u64::from(std::process::id());
    let first = Shard::new(&mut link, seed, now, now);
    let mut core = Core {
        ops: Ops {
            conns: Slab::with_capacity(1024),
            timers: Timers::with_capacity(1024),
            touched: Vec::with_capacity(64),
            dead: Vec::with_capacity(64),
            pending_connects: Vec::new(),
            listening: !listen_ports.is_empty(),
            stop_listening: false,
            ports: PortPool::new(block, seed),
            ip: run.ip,
            open: 0,
            waited: Duration::ZERO,
        },
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
    };
    core.open_listeners(0);
    let mut events = Events::with_capacity(16);
    core.run(h, &mut poll, &mut events)?;
    Ok(RunStats {
        waited: core.ops.waited,
    })
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
            self.settle(h, now);
            if tick.stop {
                let ids: Vec<ConnId> = self.ops.conns.iter().map(|(k, _)| k).collect();
                for id in ids {
                    if self.ops.conns[id].announced() {
                        self.ops.kill(id, Closed::Stopped);
                    } else {
                        self.drop_silently(id);
                    }
                }
                self.reap(h, now);
                self.egress(now);
                return Ok(());
            }
            self.egress(now);
            let mut wake = now + STOP_POLL_INTERVAL;
            for t in [
                tick.wake_at,
                self.ops.timers.next(),
                self.shard_timers.next(),
                Some(self.next_sweep),
            ]
            .into_iter()
            .flatten()
            {
                wake = wake.min(t);
            }
            if !self.link.waiting.is_empty() {
                wake = wake.min(now + ARP_RETRY);
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
            self.settle(h, now);
            self.expired.clear();
            self.expired.extend(self.ops.timers.expired(now));
            for i in 0..self.expired.len() {
                let id = self.expired[i];
                let Some(c) = self.ops.conns.get(id) else {
                    continue;
                };
                if c.close_deadline.is_some_and(|d| now >= d) {
                    self.ops.kill(id, Closed::FlushTimeout);
                } else if c.closing.is_none() && c.announced() && c.phase != Phase::Pending {
                    h.on_timer(&mut self.ops, now, id);
                }
                self.settle(h, now);
            }
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
                match self.link.faults.as_mut().map(|f| f.on_rx()) {
                    Some(Fault::Drop) => {
                        self.link.port.release(p);
                        continue;
                    }
                    Some(Fault::Hold) if self.held.is_none() => {
                        self.held = Some(p);
                        continue;
                    }
                    _ => {}
                }
                self.frame(&p, now);
                self.link.port.release(p);
                // A held frame arrives after the one that followed it.
                if let Some(h) = self.held.take() {
                    self.frame(&h, now);
                    self.link.port.release(h);
                }
            }
        }
        if taken == 0 {
            // Nothing followed the held frame this turn: deliver it late.
            if let Some(h) = self.held.take() {
                self.frame(&h, now);
                self.link.port.release(h);
            }
        }
        self.rx_more = taken >= RX_BUDGET;
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
                    None if syn && self.ops.listening => {
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
                    Some(Flow { conn: Some(id), .. }) => self.ops.touch(id),
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

    fn deliver(&mut self, shard: usize, ip: &[u8], now: Instant) {
        let t = smol_now(self.epoch, now);
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
        let mut c = Conn::new(Phase::Embryonic { implicit_tls: tls }, key, local, peer);
        c.shard = shard as u32;
        c.handle = Some(h);
        let id = self.ops.conns.insert(c);
        self.flows.insert(
            key,
            Flow {
                shard: shard as u32,
                handle: h,
                conn: Some(id),
            },
        );
        self.ops.touch(id);
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
        if !self.ops.listening {
            return;
        }
        let ports: Vec<u16> = self.listen_ports.iter().map(|(p, _)| *p).collect();
        for p in ports {
            self.shard_listens(s, p);
        }
    }

    /// A shard with a free socket (`prefer` first), made if none has one.
    fn shard_with_free(&mut self, prefer: usize) -> usize {
        if self.shards.get(prefer).is_some_and(|s| !s.free.is_empty()) {
            return prefer;
        }
        if let Some(i) = self.shards.iter().position(|s| !s.free.is_empty()) {
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

    /// Makes pending connects, services every touched connection (which may
    /// touch more), then ends the dead ones.
    fn settle<H: Handler>(&mut self, h: &mut H, now: Instant) {
        loop {
            if self.ops.stop_listening {
                self.ops.stop_listening = false;
                self.close_listeners();
            }
            if !self.ops.pending_connects.is_empty() {
                self.make_connects(h, now);
            }
            let Some(id) = self.ops.touched.pop() else {
                if self.ops.dead.is_empty() {
                    return;
                }
                self.reap(h, now);
                continue;
            };
            let Some(c) = self.ops.conns.get_mut(id) else {
                continue;
            };
            c.touched = false;
            self.service(h, id, now);
        }
    }

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
        let ids = std::mem::take(&mut self.ops.pending_connects);
        for id in ids {
            let Some(c) = self.ops.conns.get(id) else {
                continue;
            };
            if c.phase != Phase::Pending {
                continue;
            }
            let (key, peer, local) = (c.key, c.peer, c.local);
            let s = self.shard_with_free(self.connect_shard);
            self.connect_shard = s;
            let sh = &mut self.shards[s];
            let Some(handle) = sh.free.pop() else {
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
                    c.phase = Phase::Connecting;
                    c.shard = s as u32;
                    c.handle = Some(handle);
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
                    sh.free.push(handle);
                    self.ops.conns.remove(id);
                    self.ops.timers.cancel(id);
                    self.ops.ports.give(local.port());
                    self.ops.open -= 1;
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
    fn service<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) {
        let Some(c) = self.ops.conns.get(id) else {
            return;
        };
        if c.closing == Some(Close::Abort) {
            return;
        }
        if c.closing == Some(Close::Graceful) && c.phase != Phase::Open {
            // Closed before the handshake ended: nothing to flush.
            self.ops.kill(id, Closed::Local);
            return;
        }
        let (Some(handle), shard) = (c.handle, c.shard as usize) else {
            return;
        };
        let state = self.shards[shard].sock(handle).state();
        match c.phase {
            Phase::Embryonic { implicit_tls } => match state {
                tcp::State::SynReceived => return,
                tcp::State::Listen | tcp::State::Closed | tcp::State::TimeWait => {
                    // The handshake failed (RST or timeout): never announced.
                    self.drop_silently(id);
                    return;
                }
                _ => {
                    let peer = c.peer;
                    self.ops.conns[id].phase = Phase::Open;
                    self.ops.open += 1;
                    if !h.on_accept(&mut self.ops, now, id, peer, implicit_tls) {
                        // Refused: what it wrote leaves, then FIN; no on_closed.
                        self.ops.open -= 1;
                        let _ = self.push_out(id);
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
                    let port = c.local.port();
                    self.let_go(id, true);
                    self.ops.conns.remove(id);
                    self.ops.timers.cancel(id);
                    self.ops.ports.give(port);
                    self.ops.open -= 1;
                    h.on_connected(
                        &mut self.ops,
                        now,
                        id,
                        Err(io::ErrorKind::ConnectionRefused.into()),
                    );
                    return;
                }
                _ => {
                    self.ops.conns[id].phase = Phase::Open;
                    h.on_connected(&mut self.ops, now, id, Ok(()));
                }
            },
            Phase::Pending => return,
            Phase::Open => {}
        }
        self.read(h, id, now);
        self.flush(h, id, now);
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
                c.shard as usize,
                c.handle.expect("an open connection has a socket"),
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
        let s =
            self.shards[c.shard as usize].sock(c.handle.expect("an open connection has a socket"));
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
        enum Step {
            Ready,
            Data(usize),
            End,
            Fail(io::Error),
            Need,
        }
        let Core {
            shards,
            ops,
            read_buf,
            ..
        } = self;
        let step = {
            let Some(t) = ops.conns.get_mut(id).and_then(|c| c.tls.as_mut()) else {
                return false;
            };
            // The stream reports HandshakeDone exactly once, before any
            // plaintext.
            match t.stream.read_plaintext(read_buf) {
                Ok(TlsRead::Data(n)) => Step::Data(n),
                Ok(TlsRead::HandshakeDone) => Step::Ready,
                Ok(TlsRead::Closed) => Step::End,
                Ok(TlsRead::NeedCiphertext) => Step::Need,
                Err(e) => Step::Fail(e),
            }
        };
        match step {
            Step::Ready => {
                h.on_tls_ready(ops, now, id);
                return true;
            }
            Step::Data(n) => {
                h.on_input(ops, now, id, &read_buf[..n]);
                return true;
            }
            Step::End => {
                ops.conns[id].eof = true;
                h.on_peer_closed(ops, now, id);
                return false;
            }
            Step::Fail(e) => {
                ops.kill(id, Closed::Error(e));
                return false;
            }
            Step::Need => {}
        }
        // More ciphertext from the socket (no callback in here).
        let c = &mut ops.conns[id];
        let Some(t) = c.tls.as_mut() else {
            return false;
        };
        let s = shards[c.shard as usize].sock(c.handle.expect("an open connection has a socket"));
        if s.can_recv() {
            let r = s.recv(|buf| match t.stream.read_ciphertext(buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match r {
                Ok(Ok(n)) => return n > 0,
                Ok(Err(e)) => {
                    // The alert is queued: send it, then give up.
                    t.stream.write_ciphertext(&mut c.out);
                    let _ = s.send_slice(&c.out[c.out_pos..]);
                    shards[c.shard as usize].dirty = true;
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
    fn push_out(&mut self, id: ConnId) -> io::Result<bool> {
        let Some(c) = self.ops.conns.get_mut(id) else {
            return Ok(true);
        };
        let Some(handle) = c.handle else {
            return Ok(true);
        };
        if let Some(t) = &mut c.tls {
            if t.stream.wants_write() {
                if c.out_pos == c.out.len() {
                    c.out.clear();
                    c.out_pos = 0;
                }
                t.stream.write_ciphertext(&mut c.out);
            }
        }
        let sh = &mut self.shards[c.shard as usize];
        let s = sh.sockets.get_mut::<tcp::Socket>(handle);
        while c.out_pos < c.out.len() {
            match s.send_slice(&c.out[c.out_pos..]) {
                Ok(0) => break,
                Ok(n) => {
                    c.out_pos += n;
                    sh.dirty = true;
                }
                Err(_) => return Err(io::ErrorKind::BrokenPipe.into()),
            }
        }
        if c.out_pos == c.out.len() {
            c.out.clear();
            c.out_pos = 0;
        }
        c.note_sent();
        Ok(c.pending() == 0)
    }

    fn flush<H: Handler>(&mut self, h: &mut H, id: ConnId, now: Instant) {
        loop {
            let Some(c) = self.ops.conns.get(id) else {
                return;
            };
            if c.phase != Phase::Open || c.closing == Some(Close::Abort) {
                return;
            }
            let before = c.app.sent;
            let had = c.pending() > 0;
            let done = match self.push_out(id) {
                Ok(d) => d,
                Err(e) => {
                    self.ops.kill(id, Closed::Error(e));
                    return;
                }
            };
            let c = &mut self.ops.conns[id];
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
            match self.ops.conns.get(id) {
                Some(c) if done && c.app.taken != before_in => continue,
                _ => return,
            }
        }
    }

    /// Ends every dead connection and tells the handler.
    fn reap<H: Handler>(&mut self, h: &mut H, now: Instant) {
        while let Some((id, why)) = self.ops.dead.pop() {
            let Some(c) = self.ops.conns.get(id) else {
                continue;
            };
            let graceful = matches!(why, Closed::Local) && c.pending() == 0 && !c.abort_close;
            let announced = c.announced();
            let port = c.local.port();
            self.let_go(id, !graceful);
            self.ops.conns.remove(id);
            self.ops.timers.cancel(id);
            if !graceful {
                // An aborted flow's source port is free at once (its RST
                // ends it at the peer); the sink has no source ports.
                self.ops.ports.give(port);
            }
            if announced {
                self.ops.open -= 1;
                h.on_closed(&mut self.ops, now, id, why);
            }
            // on_closed may have queued work.
            self.settle_touched(h, now);
        }
    }

    fn settle_touched<H: Handler>(&mut self, h: &mut H, now: Instant) {
        if !self.ops.pending_connects.is_empty() {
            self.make_connects(h, now);
        }
        while let Some(id) = self.ops.touched.pop() {
            let Some(c) = self.ops.conns.get_mut(id) else {
                continue;
            };
            c.touched = false;
            self.service(h, id, now);
        }
    }

    /// Detaches `id`'s socket from the connection: an RST now (`abort`), or
    /// a FIN after the queued output (the socket then waits in the shard's
    /// closing list for the peer).
    fn let_go(&mut self, id: ConnId, abort: bool) {
        let Some(c) = self.ops.conns.get_mut(id) else {
            return;
        };
        let Some(handle) = c.handle.take() else {
            if c.phase == Phase::Pending {
                self.ops.ports.give(c.local.port());
            }
            return;
        };
        let key = c.key;
        let sh = &mut self.shards[c.shard as usize];
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
        let phase = self.ops.conns.get(id).map(|c| c.phase);
        self.let_go(id, true);
        if phase == Some(Phase::Pending) || phase == Some(Phase::Connecting) {
            self.ops.open -= 1;
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
                if key.2 >= self.ops.ports.lo {
                    self.ops.ports.give(key.2);
                }
            } else {
                i += 1;
            }
        }
    }

    // ---- egress ---------------------------------------------------------------

    fn egress(&mut self, now: Instant) {
        let t = smol_now(self.epoch, now);
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
            // Sockets whose RST is out are free now.
            let Shard {
                resetting, free, ..
            } = sh;
            free.append(resetting);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_loss_and_reordering_hit_the_shares_asked_for() {
        let mut f = LinkFaults {
            state: 0x5eed | 1,
            loss_ppm: 10_000,
            reorder_ppm: 20_000,
        };
        let n = 1_000_000;
        let (mut drop, mut hold, mut lost_tx) = (0, 0, 0);
        for _ in 0..n {
            match f.on_rx() {
                Fault::Drop => drop += 1,
                Fault::Hold => hold += 1,
                Fault::Deliver => {}
            }
            lost_tx += u32::from(f.on_tx());
        }
        for (got, want) in [(drop, 10_000), (hold, 20_000), (lost_tx, 10_000)] {
            assert!(
                (want * 9 / 10..want * 11 / 10).contains(&got),
                "{got} not near {want}"
            );
        }
    }

    #[test]
    fn source_ports_are_reused_oldest_first_and_run_out_cleanly() {
        let mut p = PortPool::new((10, 12), 3);
        assert_eq!(
            (p.take(), p.take(), p.take(), p.take()),
            (Some(10), Some(11), Some(12), None)
        );
        p.give(11);
        p.give(10);
        // The cursor wrapped after 12: 10 first, then 11.
        assert_eq!(p.take(), Some(10));
        assert_eq!(p.take(), Some(11));
        assert_eq!(p.take(), None);
        // A port outside the block is ignored.
        p.give(9);
        p.give(13);
        assert_eq!(p.take(), None);
    }
}
