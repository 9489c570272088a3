//! The backend contract (`src/net/backend.rs`), checked on every backend
//! from one harness: each rule is a function of a [`Net`] (where handlers
//! run and where their peers are), and the macro at the end makes one test
//! per backend of it, `epoll::RULE`, `uring::RULE`, `xdp::RULE`, so a rule
//! a backend breaks fails under that backend's name.
//!
//! The rules: plain and TLS bytes cross intact in any size; the writes of a
//! callback leave together and in order; STARTTLS sends the 220 in the
//! clear and never delivers plaintext injected after it; a graceful close
//! flushes everything (megabytes too) before the FIN, and one that cannot
//! flush ends with a flush timeout; a half-closed peer still gets replies;
//! paused reading holds input and the FIN until it resumes; `on_written`
//! reports exact plaintext progress; a refused connection gets what was
//! written to it and no `on_closed`; an outgoing connection is reported by
//! `on_connected` alone when it fails, and talks plaintext or implicit TLS
//! to an accepted one when it does not; a deadline fires once, at its last
//! setting; closing connections in the middle of large receives corrupts
//! no other.
//!
//! Every rule runs on every backend. Two differences, both in where things
//! run, not in what is asserted: on xdp the handler side and the peers are
//! in two network namespaces joined by a veth (see [`Net`]; run as root),
//! and the outgoing-connection rules, which on epoll and io_uring connect a
//! backend to its own listener, connect from a second AF_XDP backend in the
//! peers' namespace (an AF_XDP backend cannot reach its own address: its
//! frames go out on the wire). One test is io_uring's alone, because it
//! checks how that backend keeps the contract (an id outlives the
//! operations the kernel still holds on it), not a rule of the contract.
//!
//! Besides each test's own assertions, every handler runs inside [`Run`],
//! which checks the rules that hold for every connection: no callback is
//! nested in another, `on_closed` comes exactly once per accepted or
//! connected connection (never for a refused accept or a failed connect,
//! and for every connection still open when the run stops), an id is not
//! handed out while in use, and no callback but `on_closed` sees an id the
//! handler closed.
//!
//! Each handler runs on its own thread through `driver::run`; the peers are
//! blocking std sockets (and rustls streams) with read timeouts, and every
//! handler stops by itself within [`BOUND`], so nothing can hang.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use smtpstorm::net::backend::{
    Backend, Close, Closed, ConnId, ConnectOpts, Handler, Setup, Tick, TlsState,
};
use smtpstorm::net::driver::{self, Io, IoConfig, ThreadTransport, Transport};
use smtpstorm::net::runtime::StopSignal;
use smtpstorm::net::tls::{self, TlsInfo};
use smtpstorm::net::tls_stream::TlsSide;
use smtpstorm::net::xdp::XdpOptions;

mod common;
use common::netns::{self, NsPair};

/// The longest any handler runs.
const BOUND: Duration = Duration::from_secs(20);

// ---- where handlers and peers run ---------------------------------------------

/// A backend under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Epoll,
    Uring,
    /// AF_XDP with user-space TCP, in a namespace pair (see [`Net`]).
    Xdp,
}

/// Where a test's handlers run and where its peers are: every backend's
/// listening and connecting go through here.
///
/// epoll and io_uring: handlers and peers on 127.0.0.1 of the test's own
/// namespace. xdp: a fresh namespace pair per test (`common::netns`): the
/// handler's thread enters `a` and runs AF_XDP on its veth end `ia`
/// (198.18.0.1), the test's thread (and the peer threads it spawns) enters
/// `b` (198.18.0.2), whose kernel TCP is the peer.
struct Net {
    kind: Kind,
    /// xdp: the test's thread back to its namespace (before the pair goes).
    _in_b: Option<netns::Entered>,
    pair: Option<NsPair>,
}

/// Which side of a [`Net`] a handler runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Where the backend listens (namespace `a` for xdp).
    Serve,
    /// Where the peers are (namespace `b` for xdp).
    Dial,
}

impl Net {
    fn new(kind: Kind) -> Net {
        if kind == Kind::Uring {
            // Not skipped when it cannot run: the test fails.
            assert_eq!(
                smtpstorm::net::uring::check(),
                Ok(()),
                "io_uring cannot run here"
            );
        }
        let pair = (kind == Kind::Xdp).then(NsPair::new);
        let in_b = pair.as_ref().map(|p| netns::enter(&p.b));
        Net {
            kind,
            _in_b: in_b,
            pair,
        }
    }

    /// Whether a backend can connect to its own listener. An AF_XDP one
    /// cannot (its frames go out on the wire to an address that is its
    /// own): on xdp the dialing side runs on a second AF_XDP backend in
    /// the peers' namespace ([`Net::dial`]).
    fn self_connects(&self) -> bool {
        self.kind != Kind::Xdp
    }

    /// Runs the handler `make` builds on its own thread, with one listener
    /// per entry of `implicit_tls` (`make` is given their addresses).
    /// Returns once the backend is ready to accept.
    fn serve<H, F>(&self, implicit_tls: &[bool], make: F) -> Served<H>
    where
        H: Handler + Send + 'static,
        F: FnOnce(&[SocketAddr]) -> H + Send + 'static,
    {
        self.spawn(Side::Serve, implicit_tls, make)
    }

    /// Runs the handler `make` builds on the peers' side, without
    /// listeners (for xdp: on AF_XDP over `ib`, connecting out).
    fn dial<H, F>(&self, make: F) -> Served<H>
    where
        H: Handler + Send + 'static,
        F: FnOnce(&[SocketAddr]) -> H + Send + 'static,
    {
        self.spawn(Side::Dial, &[], make)
    }

    fn spawn<H, F>(&self, side: Side, implicit_tls: &[bool], make: F) -> Served<H>
    where
        H: Handler + Send + 'static,
        F: FnOnce(&[SocketAddr]) -> H + Send + 'static,
    {
        let kind = self.kind;
        let tls = implicit_tls.to_vec();
        let stop = StopSignal::new();
        let (tx, rx) = mpsc::channel();
        let stop_run = stop.clone();
        // xdp: the namespace and interface of this side.
        let place = self.pair.as_ref().map(|p| match side {
            Side::Serve => (p.a.clone(), p.ia.clone(), netns::A_IP),
            Side::Dial => (p.b.clone(), p.ib.clone(), netns::B_IP),
        });
        let thread = thread::spawn(move || {
            let mut ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let mut iface = None;
            if let Some((ns, dev, addr)) = place {
                netns::enter_with_sysfs(&ns);
                ip = IpAddr::V4(addr);
                iface = Some(dev);
            }
            let listeners: Vec<(TcpListener, bool)> = tls
                .iter()
                .map(|&t| {
                    let l = smtpstorm::net::socket::listen(SocketAddr::new(ip, 0), true, None)
                        .expect("listen");
                    (l, t)
                })
                .collect();
            let addrs: Vec<SocketAddr> = listeners
                .iter()
                .map(|(l, _)| l.local_addr().unwrap())
                .collect();
            let mut run = Run::new(make(&addrs), stop_run.clone());
            run.ready = Some((tx, addrs));
            let client = side == Side::Dial;
            run_backend(kind, iface, listeners, client, stop_run, &mut run);
            run.ended()
        });
        let addrs = match rx.recv_timeout(BOUND) {
            Ok(a) => a,
            Err(_) => match thread.join() {
                Err(e) => panic!("{kind:?}: the handler's thread panicked: {}", text(&e)),
                Ok(_) => panic!("{kind:?}: the backend ended before it was ready"),
            },
        };
        Served {
            kind,
            addrs,
            stop,
            thread,
        }
    }

    /// The handler side's address where nothing listens (a connect to it
    /// is refused).
    fn nothing_listens(&self) -> SocketAddr {
        if self.kind == Kind::Xdp {
            // Port 9 of a fresh namespace: its kernel answers with an RST.
            return SocketAddr::new(IpAddr::V4(netns::A_IP), 9);
        }
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    /// A peer's connection to `addr`.
    fn client(&self, addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// How long a graceful close may take to flush (one limit, in the
    /// connection table under every backend).
    fn flush_limit(&self) -> Duration {
        smtpstorm::net::conn_table::CLOSE_FLUSH_LIMIT
    }
}

/// Opens backend `kind` on this thread (xdp: on `iface`, for `listeners`
/// and, if `client`, outgoing connections) and runs `h` until it stops.
fn run_backend<H: Handler>(
    kind: Kind,
    iface: Option<String>,
    listeners: Vec<(TcpListener, bool)>,
    client: bool,
    stop: StopSignal,
    h: &mut H,
) {
    let transport = match kind {
        Kind::Epoll => ThreadTransport::kernel(Io::Epoll),
        Kind::Uring => ThreadTransport::kernel(Io::Uring),
        Kind::Xdp => {
            let cfg = IoConfig {
                io: Io::Xdp,
                xdp: Some(XdpOptions {
                    iface: iface.expect("an interface"),
                    ..XdpOptions::default()
                }),
            };
            let addrs: Vec<SocketAddr> = listeners
                .iter()
                .map(|(l, _)| l.local_addr().unwrap())
                .collect();
            let t = Transport::open(&cfg, 1, &addrs, client)
                .unwrap_or_else(|e| panic!("open --io xdp: {e}"));
            t.thread(0)
        }
    };
    let setup = Setup {
        listeners: listeners
            .into_iter()
            .map(|(l, tls)| (l.into(), tls))
            .collect(),
        stop,
        read_buf_bytes: 16 * 1024,
        track_waiting: false,
    };
    driver::run(transport, setup, h).expect("the loop failed");
}

/// A handler running on its thread.
struct Served<H> {
    kind: Kind,
    addrs: Vec<SocketAddr>,
    /// Ends the run (when the test has seen what it waits for).
    stop: StopSignal,
    thread: JoinHandle<Run<H>>,
}

impl<H> Served<H> {
    fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Waits for the handler to stop; fails on a panic, a broken rule of
    /// [`Run`] or a run that hit [`BOUND`].
    fn join(self) -> Run<H> {
        let kind = self.kind;
        let r = self
            .thread
            .join()
            .unwrap_or_else(|e| panic!("{kind:?}: the handler's thread panicked: {}", text(&e)));
        assert!(
            r.t.broken.is_empty(),
            "{kind:?} broke the contract: {:#?}",
            r.t.broken
        );
        assert!(!r.t.hit_bound, "{kind:?}: the handler ran for {BOUND:?}");
        r
    }

    /// Stops the run and joins it.
    fn stop(self) -> Run<H> {
        self.stop.stop();
        self.join()
    }
}

fn text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

// ---- what every connection must see ------------------------------------------

/// What [`Run`] saw of the connections.
#[derive(Default)]
struct Track {
    depth: u32,
    open: HashSet<ConnId>,
    connecting: HashSet<ConnId>,
    closing: HashSet<ConnId>,
    /// Accepted (not refused) and connected ids, in order.
    accepted: Vec<ConnId>,
    /// `on_closed` calls, in order, with why.
    closed: Vec<(ConnId, String)>,
    /// Broken rules, in words.
    broken: Vec<String>,
    started: Option<Instant>,
    hit_bound: bool,
}

impl Track {
    fn enter(&mut self, what: &str, id: Option<ConnId>) {
        if self.depth > 0 {
            self.broken.push(format!("{what} inside another callback"));
        }
        self.depth += 1;
        if let Some(id) = id {
            if !self.open.contains(&id) {
                self.broken
                    .push(format!("{what} for {id}, which is not open"));
            } else if self.closing.contains(&id) {
                self.broken
                    .push(format!("{what} for {id} after the handler closed it"));
            }
        }
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    fn fresh(&mut self, what: &str, id: ConnId) {
        if self.open.contains(&id) || self.connecting.contains(&id) {
            self.broken
                .push(format!("{what} handed out {id}, which is in use"));
        }
    }
}

/// Runs a test's handler `h` and checks, around every callback, the rules
/// that hold for every connection (see the module doc).
struct Run<H> {
    h: H,
    t: Track,
    /// The test's stop signal: stops the run when set.
    stop: StopSignal,
    /// Told the listening addresses at the first tick (the backend is
    /// ready then).
    ready: Option<(mpsc::Sender<Vec<SocketAddr>>, Vec<SocketAddr>)>,
}

impl<H> Run<H> {
    fn new(h: H, stop: StopSignal) -> Run<H> {
        Run {
            h,
            t: Track::default(),
            stop,
            ready: None,
        }
    }

    /// After the run: every open connection was told it closed.
    fn ended(mut self) -> Self {
        if !self.t.open.is_empty() {
            let mut ids: Vec<_> = self.t.open.iter().collect();
            ids.sort();
            let msg = format!("no on_closed for {ids:?} when the run stopped");
            self.t.broken.push(msg);
        }
        self
    }

    fn whys(&self) -> Vec<&str> {
        self.t.closed.iter().map(|(_, w)| w.as_str()).collect()
    }
}

/// The backend as [`Run`]'s handler sees it: notes closes and connects.
struct Spy<'a, B> {
    be: &'a mut B,
    t: &'a mut Track,
}

impl<B: Backend> Backend for Spy<'_, B> {
    fn write(&mut self, id: ConnId, data: &[u8]) {
        self.be.write(id, data)
    }
    fn pending_output(&self, id: ConnId) -> usize {
        self.be.pending_output(id)
    }
    fn app_bytes_in(&self, id: ConnId) -> u64 {
        self.be.app_bytes_in(id)
    }
    fn app_bytes_sent(&self, id: ConnId) -> u64 {
        self.be.app_bytes_sent(id)
    }
    fn start_tls(&mut self, id: ConnId, side: TlsSide) -> io::Result<()> {
        self.be.start_tls(id, side)
    }
    fn tls_state(&self, id: ConnId) -> TlsState {
        self.be.tls_state(id)
    }
    fn tls_info(&self, id: ConnId) -> Option<TlsInfo> {
        self.be.tls_info(id)
    }
    fn set_reading(&mut self, id: ConnId, on: bool) {
        self.be.set_reading(id, on)
    }
    fn close(&mut self, id: ConnId, how: Close) {
        self.t.closing.insert(id);
        self.be.close(id, how)
    }
    fn set_deadline(&mut self, id: ConnId, at: Option<Instant>) {
        self.be.set_deadline(id, at)
    }
    fn local_addr(&self, id: ConnId) -> Option<SocketAddr> {
        self.be.local_addr(id)
    }
    fn connect(&mut self, target: SocketAddr, opts: ConnectOpts) -> io::Result<ConnId> {
        let id = self.be.connect(target, opts)?;
        self.t.fresh("connect", id);
        self.t.connecting.insert(id);
        Ok(id)
    }
    fn open_connections(&self) -> usize {
        self.be.open_connections()
    }
    fn stop_listening(&mut self) {
        self.be.stop_listening()
    }
    fn waited(&self) -> Duration {
        self.be.waited()
    }
}

macro_rules! spy {
    ($self:ident, $be:ident) => {
        &mut Spy {
            be: $be,
            t: &mut $self.t,
        }
    };
}

impl<H: Handler> Handler for Run<H> {
    fn on_accept<B: Backend>(
        &mut self,
        be: &mut B,
        now: Instant,
        id: ConnId,
        peer: SocketAddr,
        implicit_tls: bool,
    ) -> bool {
        self.t.enter("on_accept", None);
        self.t.fresh("accept", id);
        let keep = self
            .h
            .on_accept(spy!(self, be), now, id, peer, implicit_tls);
        if keep {
            self.t.open.insert(id);
            self.t.accepted.push(id);
        } else {
            // A refused connection's id is the backend's again.
            self.t.closing.remove(&id);
        }
        self.t.leave();
        keep
    }

    fn on_connected<B: Backend>(
        &mut self,
        be: &mut B,
        now: Instant,
        id: ConnId,
        result: io::Result<()>,
    ) {
        self.t.enter("on_connected", None);
        if !self.t.connecting.remove(&id) {
            self.t
                .broken
                .push(format!("on_connected for {id}, which is not connecting"));
        }
        let ok = result.is_ok();
        if ok {
            self.t.open.insert(id);
            self.t.accepted.push(id);
        }
        self.h.on_connected(spy!(self, be), now, id, result);
        if !ok {
            self.t.closing.remove(&id);
        }
        self.t.leave();
    }

    fn on_tls_ready<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId) {
        self.t.enter("on_tls_ready", Some(id));
        self.h.on_tls_ready(spy!(self, be), now, id);
        self.t.leave();
    }

    fn on_input<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId, plain: &[u8]) {
        self.t.enter("on_input", Some(id));
        self.h.on_input(spy!(self, be), now, id, plain);
        self.t.leave();
    }

    fn on_peer_closed<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId) {
        self.t.enter("on_peer_closed", Some(id));
        self.h.on_peer_closed(spy!(self, be), now, id);
        self.t.leave();
    }

    fn on_written<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId) {
        self.t.enter("on_written", Some(id));
        self.h.on_written(spy!(self, be), now, id);
        self.t.leave();
    }

    fn on_timer<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId) {
        self.t.enter("on_timer", Some(id));
        self.h.on_timer(spy!(self, be), now, id);
        self.t.leave();
    }

    fn on_closed<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId, why: Closed) {
        self.t.enter("on_closed", None);
        // A connect still pending when the run stops may end as stopped
        // (the backends count it open from `connect`).
        let pending = matches!(why, Closed::Stopped) && self.t.connecting.remove(&id);
        if !self.t.open.remove(&id) && !pending {
            self.t.broken.push(format!(
                "on_closed for {id}, which is not open (refused, failed, or closed twice)"
            ));
        }
        self.t.closing.remove(&id);
        let w = match &why {
            Closed::Local => "local".to_string(),
            Closed::Error(e) => format!("error {e}"),
            Closed::FlushTimeout => "flush timeout".to_string(),
            Closed::Stopped => "stopped".to_string(),
        };
        self.t.closed.push((id, w));
        self.h.on_closed(spy!(self, be), now, id, why);
        self.t.leave();
    }

    fn on_tick<B: Backend>(&mut self, be: &mut B, now: Instant) -> Tick {
        self.t.enter("on_tick", None);
        if let Some((tx, addrs)) = self.ready.take() {
            let _ = tx.send(addrs);
        }
        let t0 = *self.t.started.get_or_insert(now);
        let mut tick = self.h.on_tick(spy!(self, be), now);
        if now.duration_since(t0) > BOUND {
            self.t.hit_bound = true;
            tick.stop = true;
        }
        tick.stop |= self.stop.is_stopped();
        tick.wake_at = Some(
            tick.wake_at
                .unwrap_or(now + BOUND)
                .min(now + Duration::from_millis(50)),
        );
        self.t.leave();
        tick
    }
}

/// The tick of a handler that stops when `stop` says so.
fn tick(now: Instant, stop: bool) -> Tick {
    Tick {
        wake_at: Some(now + Duration::from_millis(20)),
        stop,
    }
}

// ---- peers ---------------------------------------------------------------------

fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).expect("read until EOF");
    v
}

fn read_exact_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    s.read_exact(&mut v).expect("read");
    v
}

fn tls_client(sock: TcpStream) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let cfg = tls::client_config(&tls::ClientVerify::Off, 0, &tls::TlsChoice::default()).unwrap();
    let conn = rustls::ClientConnection::new(cfg, tls::server_name("localhost").unwrap()).unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// Writes `data` and reads back as many bytes, 16 KiB at a time (so
/// neither direction's buffers fill; a rustls stream cannot be split).
fn echo_through<S: Read + Write>(mut s: S, data: &[u8]) -> (Vec<u8>, S) {
    let n = data.len();
    let mut got = Vec::with_capacity(n);
    let mut sent = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while got.len() < n {
        if sent < n {
            let k = (n - sent).min(16 * 1024);
            s.write_all(&data[sent..sent + k]).unwrap();
            s.flush().unwrap();
            sent += k;
        }
        let m = s.read(&mut buf).unwrap();
        assert!(m > 0, "EOF after {} of {n} bytes", got.len());
        got.extend_from_slice(&buf[..m]);
    }
    (got, s)
}

fn pattern(seed: u64, from: usize, n: usize) -> Vec<u8> {
    (from..from + n)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) ^ (i as u64 >> 9)) as u8)
        .collect()
}

fn server_tls() -> TlsSide {
    TlsSide::Server(tls::server_config(None, &tls::TlsChoice::default()).unwrap().config)
}

// ---- bytes cross intact, on_written reports progress ------------------------------

/// Echoes every byte; TLS from the first byte on a TLS listener.
#[derive(Default)]
struct Echo {
    /// Per connection: implicit TLS, and whether `on_written` saw every
    /// byte it was given sent.
    conns: HashMap<ConnId, (bool, bool)>,
    written_calls: usize,
    tls_ready: usize,
    closed: usize,
}

impl Handler for Echo {
    fn on_accept<B: Backend>(
        &mut self,
        be: &mut B,
        _: Instant,
        id: ConnId,
        _: SocketAddr,
        implicit_tls: bool,
    ) -> bool {
        if implicit_tls {
            be.start_tls(id, server_tls()).unwrap();
        }
        self.conns.insert(id, (implicit_tls, false));
        true
    }
    fn on_tls_ready<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId) {
        assert!(be.tls_state(id).established);
        self.tls_ready += 1;
    }
    fn on_input<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId, plain: &[u8]) {
        be.write(id, plain);
    }
    fn on_written<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId) {
        self.written_calls += 1;
        if be.pending_output(id) == 0 && be.app_bytes_sent(id) == be.app_bytes_in(id) {
            self.conns.get_mut(&id).unwrap().1 = true;
        }
    }
    fn on_peer_closed<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId) {
        be.close(id, Close::Graceful);
    }
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, _: ConnId, _: Closed) {
        self.closed += 1;
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        tick(now, self.closed == 2)
    }
}

fn a_megabyte_echoes_intact_in_plaintext_and_over_implicit_tls(net: &Net) {
    let s = net.serve(&[false, true], |_| Echo::default());
    let data = pattern(1, 0, 1 << 20);
    let (got, plain) = echo_through(net.client(s.addrs[0]), &data);
    drop(plain);
    assert!(got == data, "the plaintext echo differs");
    let (got, mut tls) = echo_through(tls_client(net.client(s.addrs[1])), &data);
    tls.conn.send_close_notify();
    let _ = tls.flush();
    drop(tls);
    assert!(got == data, "the TLS echo differs");
    let r = s.join();
    assert_eq!(r.t.closed.len(), 2, "{:?}", r.t.closed);
    assert_eq!(r.h.tls_ready, 1, "one handshake, on the TLS listener");
    assert!(r.h.written_calls > 0, "no on_written");
    for (id, (tls, all_sent)) in &r.h.conns {
        assert!(
            all_sent,
            "{id} (tls {tls}): on_written never saw everything sent"
        );
    }
}

/// Writes `size` patterned bytes at once; closes when all left.
struct Bulk {
    size: usize,
    samples: Vec<(u64, u64, usize)>,
    closed: bool,
}

impl Handler for Bulk {
    fn on_accept<B: Backend>(
        &mut self,
        be: &mut B,
        _: Instant,
        id: ConnId,
        _: SocketAddr,
        _: bool,
    ) -> bool {
        be.write(id, &pattern(3, 0, self.size));
        true
    }
    fn on_written<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId) {
        self.samples.push((
            be.app_bytes_sent(id),
            be.app_bytes_in(id),
            be.pending_output(id),
        ));
        if be.pending_output(id) == 0 {
            be.close(id, Close::Graceful);
        }
    }
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, _: ConnId, _: Closed) {
        self.closed = true;
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        tick(now, self.closed)
    }
}

fn on_written_reports_exact_plaintext_progress_of_a_large_write(net: &Net) {
    let size = 24 << 20;
    let s = net.serve(&[false], move |_| Bulk {
        size,
        samples: Vec::new(),
        closed: false,
    });
    let mut c = net.client(s.addr());
    let got = read_to_end(&mut c);
    assert_eq!(got.len(), size);
    assert!(got == pattern(3, 0, size), "the bytes differ");
    let r = s.join();
    let samples = &r.h.samples;
    assert!(!samples.is_empty(), "no on_written");
    let mut last = 0;
    for &(sent, input, pending) in samples {
        assert_eq!(input, size as u64);
        assert!(sent >= last && sent <= input, "{samples:?}");
        // Plaintext: exact, what is sent and what is pending add up.
        assert_eq!(sent + pending as u64, input, "{samples:?}");
        last = sent;
    }
    assert_eq!(last, size as u64, "not everything reported sent");
    assert_eq!(r.whys(), ["local"]);
}

// ---- writes, graceful close ------------------------------------------------------

/// Greets, answers each line with three writes, closes gracefully on `quit`.
#[derive(Default)]
struct Lines {
    lines: HashMap<ConnId, Vec<u8>>,
    closed: usize,
}

impl Handler for Lines {
    fn on_accept<B: Backend>(
        &mut self,
        be: &mut B,
        _: Instant,
        id: ConnId,
        _: SocketAddr,
        _: bool,
    ) -> bool {
        be.write(id, b"hello\r\n");
        true
    }
    fn on_input<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId, plain: &[u8]) {
        let buf = self.lines.entry(id).or_default();
        buf.extend_from_slice(plain);
        while let Some(p) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=p).collect();
            be.write(id, b"A");
            be.write(id, &line[..line.len() - 2].to_ascii_uppercase());
            be.write(id, b"\r\n");
            if line == b"quit\r\n" {
                be.close(id, Close::Graceful);
                break;
            }
        }
    }
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, id: ConnId, _: Closed) {
        self.lines.remove(&id);
        self.closed += 1;
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        tick(now, self.closed == 3)
    }
}

fn writes_of_one_callback_arrive_in_order_and_a_graceful_close_sends_them_before_the_fin(
    net: &Net,
) {
    let s = net.serve(&[false], |_| Lines::default());
    for _ in 0..3 {
        let mut c = net.client(s.addr());
        // Pipelined: both lines may arrive in one read.
        c.write_all(b"ab\r\nquit\r\n").unwrap();
        assert_eq!(read_to_end(&mut c), b"hello\r\nAAB\r\nAQUIT\r\n");
    }
    let r = s.join();
    assert_eq!(r.t.accepted.len(), 3);
    assert_eq!(
        r.whys(),
        ["local", "local", "local"],
        "each closed once, by the handler"
    );
}

/// Writes `n` bytes in 64 KiB pieces, then closes gracefully, all in
/// `on_accept`.
struct Blast {
    n: usize,
    closed: bool,
}

impl Handler for Blast {
    fn on_accept<B: Backend>(
        &mut self,
        be: &mut B,
        _: Instant,
        id: ConnId,
        _: SocketAddr,
        _: bool,
    ) -> bool {
        let chunk = vec![b'z'; 64 * 1024];
        let mut left = self.n;
        while left > 0 {
            let k = left.min(chunk.len());
            be.write(id, &chunk[..k]);
            left -= k;
        }
        be.close(id, Close::Graceful);
        true
    }
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, _: ConnId, _: Closed) {
        self.closed = true;
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        tick(now, self.closed)
    }
}

fn a_graceful_close_flushes_megabytes_queued_before_it_then_the_fin(net: &Net) {
    let n = 3 << 20;
    let s = net.serve(&[false], move |_| Blast { n, closed: false });
    let mut c = net.client(s.addr());
    let got = read_to_end(&mut c);
    assert_eq!(got.len(), n, "every byte before the FIN");
    assert!(got.iter().all(|&b| b == b'z'), "the bytes differ");
    let r = s.join();
    assert_eq!(r.whys(), ["local"]);
}

/// Writes far more than the buffers hold to a peer that never reads, and
/// closes gracefully.
#[derive(Default)]
struct Stuck {
    closed: bool,
}

impl Handler for Stuck {
    fn on_accept<B: Backend>(
        &mut self,
        be: &mut B,
        _: Instant,
        id: ConnId,
        _: SocketAddr,
        _: bool,
    ) -> bool {
        be.write(id, &vec![b'x'; 64 << 20]);
        be.close(id, Close::Graceful);
        true
    }
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, _: ConnId, _: Closed) {
        self.closed = true;
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        tick(now, self.closed)
    }
}

fn a_graceful_close_that_cannot_flush_ends_with_a_flush_timeout(net: &Net) {
    let s = net.serve(&[false], |_| Stuck::default());
    let c = net.client(s.addr());
    let t0 = Instant::now();
    let r = s.join();
    let took = t0.elapsed();
    drop(c);
    assert_eq!(r.whys(), ["flush timeout"]);
    assert!(
        took >= net.flush_limit() - Duration::from_millis(100),
        "ended after {took:?}"
    );
}

// ---- STARTTLS ----------------------------------------------------------------------

/// Answers `STARTTLS\r\n` with `220 go\r\n` and switches; echoes after.
#[derive(Default)]
struct StartTls {
    input: Vec<u8>,
    tls_ready: usize,
    closed: bool,
}

impl Handler for StartTls {
    fn on_accept<B: Backend>(
        &mut self,
        _: &mut B,
        _: Instant,
        _: ConnId,
        _: SocketAddr,
        _: bool,
    ) -> bool {
        true
    }
    fn on_tls_ready<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId) {
        assert!(be.tls_state(id).established);
        self.tls_ready += 1;
    }
    fn on_input<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId, plain: &[u8]) {
        self.input.extend_from_slice(plain);
        if be.tls_state(id) == TlsState::default() && plain.starts_with(b"STARTTLS\r\n") {
            be.write(id, b"220 go\r\n");
            be.start_tls(id, server_tls()).unwrap();
        } else {
            be.write(id, plain);
        }
    }
    fn on_peer_closed<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId) {
        be.close(id, Close::Graceful);
    }
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, _: ConnId, _: Closed) {
        self.closed = true;
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        tick(now, self.closed)
    }
}

fn starttls(net: &Net) -> (Served<StartTls>, TcpStream) {
    let s = net.serve(&[false], |_| StartTls::default());
    let mut sock = net.client(s.addr());
    sock.write_all(b"STARTTLS\r\n").unwrap();
    assert_eq!(
        read_exact_n(&mut sock, 8),
        b"220 go\r\n",
        "the 220 goes out in the clear"
    );
    (s, sock)
}

fn after_start_tls_plaintext_is_never_input_and_the_220_went_out_in_the_clear(net: &Net) {
    let (s, mut sock) = starttls(net);
    // Plaintext after the switch (a man in the middle): it reaches TLS as
    // garbage, never the handler; the connection ends.
    sock.write_all(b"MAIL FROM:<injected@x>\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = sock.read_to_end(&mut rest);
    let r = s.join();
    assert_eq!(r.h.input, b"STARTTLS\r\n");
    assert_eq!(r.h.tls_ready, 0);
    assert_eq!(r.t.closed.len(), 1);
    assert!(r.whys()[0].starts_with("error"), "{:?}", r.t.closed);
}

fn starttls_then_a_real_handshake_carries_the_session(net: &Net) {
    let (s, sock) = starttls(net);
    let (got, mut tls) = echo_through(tls_client(sock), b"EHLO over tls\r\n");
    assert_eq!(got, b"EHLO over tls\r\n");
    tls.conn.send_close_notify();
    let _ = tls.flush();
    drop(tls);
    let r = s.join();
    assert_eq!(r.h.input, b"STARTTLS\r\nEHLO over tls\r\n");
    assert_eq!(r.h.tls_ready, 1);
    assert_eq!(r.t.closed.len(), 1);
}

// ---- refused accepts ---------------------------------------------------------------

#[derive(Default)]
struct Refuser {
    refused: usize,
    counted_open: Vec<usize>,
}

impl Handler for Refuser {
    fn on_accept<B: Backend>(
        &mut self,
        be: &mut B,
        _: Instant,
        id: ConnId,
        _: SocketAddr,
        _: bool,
    ) -> bool {
        be.write(id, b"421 go away\r\n");
        self.refused += 1;
        false
    }
    fn on_tick<B: Backend>(&mut self, be: &mut B, now: Instant) -> Tick {
        if be.open_connections() != 0 {
            self.counted_open.push(be.open_connections());
        }
        tick(now, false)
    }
}

fn a_refused_connection_gets_what_was_written_then_eof_and_no_on_closed(net: &Net) {
    let s = net.serve(&[false], |_| Refuser::default());
    for _ in 0..2 {
        let mut c = net.client(s.addr());
        assert_eq!(read_to_end(&mut c), b"421 go away\r\n");
    }
    let r = s.stop();
    assert_eq!(r.h.refused, 2);
    assert!(r.t.closed.is_empty(), "on_closed: {:?}", r.t.closed);
    assert!(
        r.h.counted_open.is_empty(),
        "refused connections counted as open: {:?}",
        r.h.counted_open
    );
}

// ---- half-close, backpressure --------------------------------------------------------

#[derive(Default)]
struct HalfClose {
    input: Vec<u8>,
    fin_after_input: bool,
    closed: bool,
}

impl Handler for HalfClose {
    fn on_accept<B: Backend>(
        &mut self,
        _: &mut B,
        _: Instant,
        _: ConnId,
        _: SocketAddr,
        _: bool,
    ) -> bool {
        true
    }
    fn on_input<B: Backend>(&mut self, _: &mut B, _: Instant, _: ConnId, plain: &[u8]) {
        self.input.extend_from_slice(plain);
    }
    fn on_peer_closed<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId) {
        self.fin_after_input = self.input == b"ping\r\n";
        be.write(id, b"pong\r\n");
        be.close(id, Close::Graceful);
    }
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, _: ConnId, _: Closed) {
        self.closed = true;
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        tick(now, self.closed)
    }
}

fn a_half_closed_peer_gets_replies_written_after_its_fin(net: &Net) {
    let s = net.serve(&[false], |_| HalfClose::default());
    let mut c = net.client(s.addr());
    c.write_all(b"ping\r\n").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut c), b"pong\r\n");
    let r = s.join();
    assert!(
        r.h.fin_after_input,
        "the FIN came before the data: {:?}",
        r.h.input
    );
    assert_eq!(r.whys(), ["local"]);
}

/// Pauses reading at the first input until its deadline (300 ms), then
/// reads the rest; answers `done` at the peer's FIN.
struct Pause {
    want: usize,
    got: Vec<u8>,
    paused: bool,
    resumed: bool,
    input_while_paused: usize,
    timers: usize,
    peer_closed: usize,
    fin_while_paused: bool,
    fin_after_input: bool,
    closed: bool,
}

impl Handler for Pause {
    fn on_accept<B: Backend>(
        &mut self,
        _: &mut B,
        _: Instant,
        _: ConnId,
        _: SocketAddr,
        _: bool,
    ) -> bool {
        true
    }
    fn on_input<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId, plain: &[u8]) {
        if self.paused {
            self.input_while_paused += plain.len();
        }
        self.got.extend_from_slice(plain);
        if !self.resumed && !self.paused {
            self.paused = true;
            be.set_reading(id, false);
            be.write(id, b"paused\r\n");
            be.set_deadline(id, Some(now + Duration::from_millis(300)));
        }
    }
    fn on_timer<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId) {
        self.timers += 1;
        self.paused = false;
        self.resumed = true;
        be.set_reading(id, true);
    }
    fn on_peer_closed<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId) {
        self.peer_closed += 1;
        self.fin_while_paused |= self.paused;
        self.fin_after_input = self.got.len() == self.want;
        be.write(id, b"done\r\n");
        be.close(id, Close::Graceful);
    }
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, _: ConnId, _: Closed) {
        self.closed = true;
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        tick(now, self.closed)
    }
}

fn paused_reading_holds_input_and_the_fin_until_it_resumes_then_delivers_all_in_order(net: &Net) {
    let first = b"first\r\n".to_vec();
    let rest = pattern(7, 0, 200_000);
    let want = first.len() + rest.len();
    let s = net.serve(&[false], move |_| Pause {
        want,
        got: Vec::new(),
        paused: false,
        resumed: false,
        input_while_paused: 0,
        timers: 0,
        peer_closed: 0,
        fin_while_paused: false,
        fin_after_input: false,
        closed: false,
    });
    let mut c = net.client(s.addr());
    c.write_all(&first).unwrap();
    assert_eq!(read_exact_n(&mut c, 8), b"paused\r\n");
    c.write_all(&rest).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut c), b"done\r\n");
    let r = s.join();
    let h = &r.h;
    assert_eq!(
        h.input_while_paused, 0,
        "input delivered while reading was off"
    );
    assert!(
        !h.fin_while_paused,
        "the FIN delivered while reading was off"
    );
    assert!(h.resumed);
    assert!(h.fin_after_input, "the FIN came before the held input");
    assert_eq!((h.timers, h.peer_closed), (1, 1));
    let mut all = first;
    all.extend_from_slice(&rest);
    assert!(
        h.got == all,
        "bytes lost, doubled or reordered across the pause"
    );
    assert_eq!(r.whys(), ["local"]);
}

// ---- deadlines -----------------------------------------------------------------------

#[derive(Default)]
struct Deadlines {
    accepted: usize,
    fired: Vec<ConnId>,
}

impl Handler for Deadlines {
    fn on_accept<B: Backend>(
        &mut self,
        be: &mut B,
        now: Instant,
        id: ConnId,
        _: SocketAddr,
        _: bool,
    ) -> bool {
        self.accepted += 1;
        if self.accepted == 1 {
            // The first: armed, then cleared (it must never fire).
            be.set_deadline(id, Some(now + Duration::from_millis(10)));
            be.set_deadline(id, None);
        } else {
            // The second: re-armed later than the first's would have been.
            be.set_deadline(id, Some(now + Duration::from_millis(5)));
            be.set_deadline(id, Some(now + Duration::from_millis(60)));
        }
        true
    }
    fn on_timer<B: Backend>(&mut self, _: &mut B, _: Instant, id: ConnId) {
        self.fired.push(id);
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        tick(now, !self.fired.is_empty())
    }
}

fn a_deadline_fires_once_at_its_last_setting_and_a_cleared_one_never(net: &Net) {
    let s = net.serve(&[false], |_| Deadlines::default());
    let a = net.client(s.addr());
    let b = net.client(s.addr());
    let r = s.join();
    drop((a, b));
    assert_eq!(r.t.accepted.len(), 2);
    assert_eq!(
        r.h.fired,
        vec![r.t.accepted[1]],
        "only the second fired, once"
    );
    assert_eq!(r.whys(), ["stopped", "stopped"], "open ones end as stopped");
}

// ---- outgoing connections -------------------------------------------------------------

/// Connects to `target` (`tls`: implicit TLS) and sends `ping`, expects the
/// echo and closes; a connect to `refused` fails. What it accepts (TLS on a
/// TLS listener) it echoes, and closes at the peer's FIN.
struct Loop {
    target: Option<SocketAddr>,
    refused: Option<SocketAddr>,
    tls: bool,
    /// Stop after this many `on_closed` (and the refused connect's report).
    expect_closed: usize,
    started: bool,
    client: Option<ConnId>,
    refused_id: Option<ConnId>,
    /// The outgoing connection's callbacks, in order.
    events: Vec<String>,
    /// The refused connect's callbacks.
    failed: Vec<String>,
    ready: usize,
    echoed: Vec<u8>,
    tls_info: bool,
    closed: usize,
}

impl Loop {
    fn new(target: Option<SocketAddr>, refused: Option<SocketAddr>, tls: bool) -> Loop {
        Loop {
            target,
            refused,
            tls,
            expect_closed: 0,
            started: false,
            client: None,
            refused_id: None,
            events: Vec::new(),
            failed: Vec::new(),
            ready: 0,
            echoed: Vec::new(),
            tls_info: false,
            closed: 0,
        }
    }
}

impl Handler for Loop {
    fn on_accept<B: Backend>(
        &mut self,
        be: &mut B,
        _: Instant,
        id: ConnId,
        _: SocketAddr,
        implicit_tls: bool,
    ) -> bool {
        if implicit_tls {
            be.start_tls(id, server_tls()).unwrap();
        }
        true
    }
    fn on_connected<B: Backend>(
        &mut self,
        be: &mut B,
        _: Instant,
        id: ConnId,
        result: io::Result<()>,
    ) {
        let what = match &result {
            Ok(()) => "connected".to_string(),
            Err(e) => format!("failed: {:?}", e.kind()),
        };
        if Some(id) == self.refused_id {
            self.failed.push(what);
            return;
        }
        self.events.push(what);
        if result.is_err() {
            return;
        }
        if self.tls {
            let cfg = tls::client_config(&tls::ClientVerify::Off, 0, &tls::TlsChoice::default()).unwrap();
            let name = tls::server_name("localhost").unwrap();
            be.start_tls(id, TlsSide::Client(cfg, name)).unwrap();
        } else {
            be.write(id, b"ping\r\n");
        }
    }
    fn on_tls_ready<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId) {
        assert!(be.tls_state(id).established);
        self.ready += 1;
        if Some(id) == self.client {
            self.events.push("tls ready".into());
            be.write(id, b"ping\r\n");
        }
    }
    fn on_input<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId, plain: &[u8]) {
        if Some(id) == self.client {
            self.echoed.extend_from_slice(plain);
            if self.echoed.ends_with(b"\n") {
                self.events.push("echoed".into());
                self.tls_info = be.tls_info(id).is_some();
                be.close(id, Close::Graceful);
            }
        } else {
            be.write(id, plain);
        }
    }
    fn on_peer_closed<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId) {
        be.close(id, Close::Graceful);
    }
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, id: ConnId, why: Closed) {
        if Some(id) == self.client {
            self.events.push(format!("closed: {why:?}"));
        }
        self.closed += 1;
    }
    fn on_tick<B: Backend>(&mut self, be: &mut B, now: Instant) -> Tick {
        if !self.started {
            self.started = true;
            if let Some(t) = self.target {
                self.client = Some(be.connect(t, ConnectOpts::default()).unwrap());
            }
            if let Some(t) = self.refused {
                self.refused_id = Some(be.connect(t, ConnectOpts::default()).unwrap());
            }
        }
        let refused_done = self.refused.is_none() || !self.failed.is_empty();
        tick(now, self.closed == self.expect_closed && refused_done)
    }
}

/// What [`Loop`]s saw, over all the backends that ran them.
struct Looped {
    handlers: Vec<Run<Loop>>,
}

fn outgoing(net: &Net, tls: bool) -> Looped {
    let refused = net.nothing_listens();
    if !net.self_connects() {
        let s = net.serve(&[tls], move |_| {
            let mut l = Loop::new(None, None, tls);
            l.expect_closed = 1;
            l
        });
        let target = s.addr();
        let d = net.dial(move |_| {
            let mut l = Loop::new(Some(target), Some(refused), tls);
            l.expect_closed = 1;
            l
        });
        let dialed = d.join();
        return Looped {
            handlers: vec![s.join(), dialed],
        };
    }
    let s = net.serve(&[tls], move |addrs| {
        let mut l = Loop::new(Some(addrs[0]), Some(refused), tls);
        // The outgoing side and the accepted one.
        l.expect_closed = 2;
        l
    });
    Looped {
        handlers: vec![s.join()],
    }
}

fn outgoing_connections_connect_fail_and_talk_to_accepted_ones(net: &Net, tls: bool) {
    let l = outgoing(net, tls);
    let sum = |f: &dyn Fn(&Run<Loop>) -> usize| l.handlers.iter().map(f).sum::<usize>();
    let dialer = l
        .handlers
        .iter()
        .find(|r| r.h.target.is_some())
        .expect("a dialer");
    assert_eq!(
        dialer.h.failed,
        ["failed: ConnectionRefused"],
        "and nothing else"
    );
    let mut events = vec!["connected", "echoed", "closed: Local"];
    if tls {
        events.insert(1, "tls ready");
    }
    assert_eq!(dialer.h.events, events);
    assert_eq!(dialer.h.echoed, b"ping\r\n");
    assert_eq!(
        sum(&|r| r.t.accepted.len()),
        2,
        "the outgoing and the accepted side"
    );
    assert_eq!(
        sum(&|r| r.t.closed.len()),
        2,
        "one on_closed each, none for the failed connect"
    );
    assert_eq!(
        sum(&|r| r.h.ready),
        if tls { 2 } else { 0 },
        "handshakes reported"
    );
    assert_eq!(dialer.h.tls_info, tls);
}

fn an_outgoing_connection_fails_or_talks_in_plaintext(net: &Net) {
    outgoing_connections_connect_fail_and_talk_to_accepted_ones(net, false);
}

fn an_outgoing_connection_talks_implicit_tls_to_an_accepted_one(net: &Net) {
    outgoing_connections_connect_fail_and_talk_to_accepted_ones(net, true);
}

// ---- closing during large receives, under load ------------------------------------------

/// Each connection sends an 8-byte seed, then `pattern(seed)`; the handler
/// checks every byte it is given. Odd seeds are aborted part way through
/// (while the backend may have a receive in flight); even ones answer `ok`
/// once they have everything.
struct Checker {
    len: usize,
    conns: HashMap<ConnId, (Option<u64>, Vec<u8>, usize)>,
    mismatches: usize,
    completed: usize,
    aborted: usize,
    closed: usize,
    /// Stop once this many have closed (every connection a client made is
    /// accepted, even one whose client has long finished).
    expect_sessions: usize,
}

impl Handler for Checker {
    fn on_accept<B: Backend>(
        &mut self,
        _: &mut B,
        _: Instant,
        id: ConnId,
        _: SocketAddr,
        _: bool,
    ) -> bool {
        self.conns.insert(id, (None, Vec::new(), 0));
        true
    }
    fn on_input<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId, plain: &[u8]) {
        let (seed, head, got) = self.conns.get_mut(&id).expect("input for an unknown id");
        let mut data = plain;
        if seed.is_none() {
            let need = 8 - head.len();
            let take = need.min(data.len());
            head.extend_from_slice(&data[..take]);
            data = &data[take..];
            if head.len() == 8 {
                *seed = Some(u64::from_le_bytes(head[..8].try_into().unwrap()));
            }
        }
        let Some(seed) = *seed else { return };
        if data != pattern(seed, *got, data.len()).as_slice() {
            self.mismatches += 1;
        }
        *got += data.len();
        if seed % 2 == 1 && *got >= (seed as usize * 7919) % self.len {
            self.aborted += 1;
            be.close(id, Close::Abort);
        } else if *got == self.len {
            self.completed += 1;
            be.write(id, b"ok");
            be.close(id, Close::Graceful);
        }
    }
    fn on_peer_closed<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId) {
        be.close(id, Close::Abort);
    }
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, id: ConnId, _: Closed) {
        self.conns.remove(&id);
        self.closed += 1;
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        tick(now, self.closed == self.expect_sessions)
    }
}

fn closing_connections_during_large_receives_under_load_corrupts_no_other(net: &Net) {
    let clients = 12;
    let rounds = 4;
    let len = 1 << 20;
    let s = net.serve(&[false], move |_| Checker {
        len,
        conns: HashMap::new(),
        mismatches: 0,
        completed: 0,
        aborted: 0,
        closed: 0,
        expect_sessions: clients * rounds,
    });
    let addr = s.addr();
    let ok: usize = thread::scope(|scope| {
        let workers: Vec<_> = (0..clients)
            .map(|t| {
                scope.spawn(move || {
                    let mut ok = 0;
                    for r in 0..rounds {
                        let seed = (t * rounds + r) as u64;
                        let mut c = net.client(addr);
                        let mut msg = seed.to_le_bytes().to_vec();
                        msg.extend_from_slice(&pattern(seed, 0, len));
                        // An aborted connection fails part way: that is the point.
                        let wrote = c.write_all(&msg).is_ok();
                        if seed.is_multiple_of(2) {
                            assert!(wrote, "a connection that should complete was cut");
                            assert_eq!(read_to_end(&mut c), b"ok", "seed {seed}");
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    let r = s.join();
    let h = &r.h;
    assert_eq!(
        h.mismatches, 0,
        "a connection was given bytes that are not its own"
    );
    assert_eq!(ok, clients * rounds / 2);
    assert_eq!(h.completed, clients * rounds / 2);
    assert_eq!(h.aborted, clients * rounds / 2, "closes: {:?}", r.t.closed);
    assert_eq!(
        r.t.closed.len(),
        clients * rounds,
        "each connection closed once"
    );
}

// ---- io_uring: ids outlive their operations -----------------------------------------------

/// Closes its first connection while a receive is armed on it, and in
/// `on_closed` opens a new one at once.
struct Reuse {
    target: SocketAddr,
    first: Option<ConnId>,
    next: Option<ConnId>,
}

impl Handler for Reuse {
    fn on_accept<B: Backend>(
        &mut self,
        _: &mut B,
        _: Instant,
        id: ConnId,
        _: SocketAddr,
        _: bool,
    ) -> bool {
        self.first.get_or_insert(id);
        true
    }
    fn on_input<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId, _: &[u8]) {
        if Some(id) == self.first {
            be.close(id, Close::Abort);
        }
    }
    fn on_closed<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId, _: Closed) {
        if Some(id) == self.first && self.next.is_none() {
            self.next = Some(be.connect(self.target, ConnectOpts::default()).unwrap());
        }
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        tick(now, self.next.is_some())
    }
}

fn a_closed_connections_id_is_kept_until_its_receive_and_close_complete(net: &Net) {
    let s = net.serve(&[false], |addrs| Reuse {
        target: addrs[0],
        first: None,
        next: None,
    });
    let mut c = net.client(s.addr());
    c.write_all(b"x").unwrap();
    let r = s.join();
    let (first, next) = (r.h.first.unwrap(), r.h.next.unwrap());
    // The kernel may still complete the cancelled receive (into a buffer
    // of the ring, never the connection's) and the fixed-slot close: a new
    // connection must not get that id meanwhile.
    assert_ne!(
        first, next,
        "id {first} reused while its operations were in flight"
    );
}

// ---- every backend --------------------------------------------------------------------------

macro_rules! on_each_backend {
    ($($name:ident),* $(,)? ; uring only: $($u:ident),* $(,)?) => {
        mod epoll {
            $( #[test] fn $name() { super::$name(&super::Net::new(super::Kind::Epoll)) } )*
        }
        mod uring {
            $( #[test] fn $name() { super::$name(&super::Net::new(super::Kind::Uring)) } )*
            $( #[test] fn $u() { super::$u(&super::Net::new(super::Kind::Uring)) } )*
        }
        mod xdp {
            $( #[test] fn $name() { super::$name(&super::Net::new(super::Kind::Xdp)) } )*
        }
    };
}

on_each_backend!(
    a_megabyte_echoes_intact_in_plaintext_and_over_implicit_tls,
    on_written_reports_exact_plaintext_progress_of_a_large_write,
    writes_of_one_callback_arrive_in_order_and_a_graceful_close_sends_them_before_the_fin,
    a_graceful_close_flushes_megabytes_queued_before_it_then_the_fin,
    a_graceful_close_that_cannot_flush_ends_with_a_flush_timeout,
    after_start_tls_plaintext_is_never_input_and_the_220_went_out_in_the_clear,
    starttls_then_a_real_handshake_carries_the_session,
    a_refused_connection_gets_what_was_written_then_eof_and_no_on_closed,
    a_half_closed_peer_gets_replies_written_after_its_fin,
    paused_reading_holds_input_and_the_fin_until_it_resumes_then_delivers_all_in_order,
    a_deadline_fires_once_at_its_last_setting_and_a_cleared_one_never,
    an_outgoing_connection_fails_or_talks_in_plaintext,
    an_outgoing_connection_talks_implicit_tls_to_an_accepted_one,
    closing_connections_during_large_receives_under_load_corrupts_no_other;
    uring only:
    a_closed_connections_id_is_kept_until_its_receive_and_close_complete,
);
