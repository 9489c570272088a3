//! Rules of the backend contract (`src/net/backend.rs`), checked on every backend:
//! small handlers, each exercising a rule, driven by `driver::run` on a
//! thread against plain std sockets on loopback. Every test runs once per
//! backend (`mod epoll`, `mod uring` at the end), from the same code.
//!
//! Every wait is bounded: a handler stops itself at a deadline, and clients
//! use read timeouts.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use smtpstorm::net::backend::{Backend, Close, Closed, ConnId, ConnectOpts, Handler, Setup, Tick};
use smtpstorm::net::driver::{self, Io};
use smtpstorm::net::runtime::StopSignal;
use smtpstorm::net::tls;
use smtpstorm::net::tls_stream::TlsSide;

/// The longest any handler runs.
const BOUND: Duration = Duration::from_secs(20);

fn listener() -> (TcpListener, SocketAddr) {
    let l = smtpstorm::net::socket::listen("127.0.0.1:0".parse().unwrap(), true, None).unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// Runs `h` on backend `io` on its own thread with `listeners`.
fn serve<H: Handler + Send + 'static>(
    io: Io,
    listeners: Vec<(TcpListener, bool)>,
    mut h: H,
) -> JoinHandle<H> {
    if io == Io::Uring {
        assert_eq!(
            smtpstorm::net::uring::check(),
            Ok(()),
            "io_uring cannot run here"
        );
    }
    std::thread::spawn(move || {
        let setup = Setup {
            listeners,
            stop: StopSignal::new(),
            read_buf_bytes: 16 * 1024,
            track_waiting: false,
        };
        driver::run(driver::ThreadTransport::kernel(io), setup, &mut h).expect("the loop failed");
        h
    })
}

fn client(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

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

/// What every handler records: callbacks nested in callbacks, opens and
/// closes.
#[derive(Default)]
struct Base {
    depth: u32,
    nested_close: bool,
    accepted: Vec<ConnId>,
    closed: Vec<(ConnId, String)>,
    open: HashMap<ConnId, ()>,
    started: Option<Instant>,
    stop: bool,
}

impl Base {
    fn enter(&mut self) {
        self.depth += 1;
    }
    fn leave(&mut self) {
        self.depth -= 1;
    }
    fn accept(&mut self, id: ConnId) {
        assert!(
            self.open.insert(id, ()).is_none(),
            "id {id} given out while open"
        );
        self.accepted.push(id);
    }
    fn close(&mut self, id: ConnId, why: &Closed) {
        if self.depth > 0 {
            self.nested_close = true;
        }
        assert!(
            self.open.remove(&id).is_some(),
            "on_closed for {id}, which is not open"
        );
        let why = match why {
            Closed::Local => "local".to_string(),
            Closed::Error(e) => format!("error {e}"),
            Closed::FlushTimeout => "flush timeout".to_string(),
            Closed::Stopped => "stopped".to_string(),
        };
        self.closed.push((id, why));
    }
    fn tick(&mut self, now: Instant) -> Tick {
        let t0 = *self.started.get_or_insert(now);
        Tick {
            wake_at: Some(now + Duration::from_millis(20)),
            stop: self.stop || now.duration_since(t0) > BOUND,
        }
    }
}

// ---- writes, graceful close, on_closed -------------------------------------

/// Greets, answers each line with two writes, closes gracefully on `quit`.
#[derive(Default)]
struct Echo {
    base: Base,
    lines: HashMap<ConnId, Vec<u8>>,
}

impl Handler for Echo {
    fn on_accept<B: Backend>(
        &mut self,
        be: &mut B,
        _: Instant,
        id: ConnId,
        _: SocketAddr,
        _: bool,
    ) -> bool {
        self.base.accept(id);
        be.write(id, b"hello\r\n");
        true
    }
    fn on_input<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId, plain: &[u8]) {
        self.base.enter();
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
        self.base.leave();
    }
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, id: ConnId, why: Closed) {
        self.base.close(id, &why);
        if self.base.closed.len() == 3 {
            self.base.stop = true;
        }
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        self.base.tick(now)
    }
}

fn writes_of_one_callback_arrive_in_order_and_a_graceful_close_sends_them_before_the_fin(io: Io) {
    let (l, addr) = listener();
    let server = serve(io, vec![(l, false)], Echo::default());
    for _ in 0..3 {
        let mut c = client(addr);
        // Pipelined: both lines may arrive in one read.
        c.write_all(b"ab\r\nquit\r\n").unwrap();
        assert_eq!(read_to_end(&mut c), b"hello\r\nAAB\r\nAQUIT\r\n");
    }
    let h = server.join().unwrap();
    assert!(
        !h.base.nested_close,
        "on_closed came from inside another callback"
    );
    assert_eq!(h.base.accepted.len(), 3);
    let whys: Vec<&str> = h.base.closed.iter().map(|(_, w)| w.as_str()).collect();
    assert_eq!(
        whys,
        ["local", "local", "local"],
        "each closed once, by the handler"
    );
}

// ---- refused accepts ---------------------------------------------------------

#[derive(Default)]
struct Refuser {
    base: Base,
    refused: usize,
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
        if self.refused == 2 {
            self.base.stop = true;
        }
        // Ids of refused connections are the backend's again.
        let _ = id;
        false
    }
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, id: ConnId, why: Closed) {
        self.base.closed.push((id, format!("{why:?}")));
    }
    fn on_tick<B: Backend>(&mut self, be: &mut B, now: Instant) -> Tick {
        assert_eq!(
            be.open_connections(),
            0,
            "a refused connection counts as open"
        );
        self.base.tick(now)
    }
}

fn a_refused_connection_gets_what_was_written_then_eof_and_no_on_closed(io: Io) {
    let (l, addr) = listener();
    let server = serve(io, vec![(l, false)], Refuser::default());
    for _ in 0..2 {
        let mut c = client(addr);
        assert_eq!(read_to_end(&mut c), b"421 go away\r\n");
    }
    let h = server.join().unwrap();
    assert_eq!(h.refused, 2);
    assert!(
        h.base.closed.is_empty(),
        "on_closed for a refused connection: {:?}",
        h.base.closed
    );
}

// ---- half-close --------------------------------------------------------------

#[derive(Default)]
struct HalfClose {
    base: Base,
    input: Vec<u8>,
    fin_after_input: bool,
}

impl Handler for HalfClose {
    fn on_accept<B: Backend>(
        &mut self,
        _: &mut B,
        _: Instant,
        id: ConnId,
        _: SocketAddr,
        _: bool,
    ) -> bool {
        self.base.accept(id);
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
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, id: ConnId, why: Closed) {
        self.base.close(id, &why);
        self.base.stop = true;
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        self.base.tick(now)
    }
}

fn a_half_closed_peer_gets_replies_written_after_its_fin(io: Io) {
    let (l, addr) = listener();
    let server = serve(io, vec![(l, false)], HalfClose::default());
    let mut c = client(addr);
    c.write_all(b"ping\r\n").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut c), b"pong\r\n");
    let h = server.join().unwrap();
    assert!(
        h.fin_after_input,
        "the FIN came before the data: {:?}",
        h.input
    );
    assert_eq!(h.base.closed.len(), 1);
}

// ---- backpressure ------------------------------------------------------------

/// Pauses reading after the first input until its deadline, then reads the
/// rest; answers `done` when it has `want` bytes.
struct Pause {
    base: Base,
    want: usize,
    got: Vec<u8>,
    paused: bool,
    input_while_paused: usize,
    resumed: bool,
}

impl Handler for Pause {
    fn on_accept<B: Backend>(
        &mut self,
        _: &mut B,
        _: Instant,
        id: ConnId,
        _: SocketAddr,
        _: bool,
    ) -> bool {
        self.base.accept(id);
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
        if self.got.len() == self.want {
            be.write(id, b"done\r\n");
            be.close(id, Close::Graceful);
        }
    }
    fn on_timer<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId) {
        self.paused = false;
        self.resumed = true;
        be.set_reading(id, true);
    }
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, id: ConnId, why: Closed) {
        self.base.close(id, &why);
        self.base.stop = true;
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        self.base.tick(now)
    }
}

fn pattern(seed: u64, from: usize, n: usize) -> Vec<u8> {
    (from..from + n)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) ^ (i as u64 >> 9)) as u8)
        .collect()
}

fn paused_reading_delivers_nothing_until_resumed_then_everything_in_order(io: Io) {
    let (l, addr) = listener();
    let first = b"first\r\n".to_vec();
    let rest = pattern(7, 0, 200_000);
    let h = Pause {
        base: Base::default(),
        want: first.len() + rest.len(),
        got: Vec::new(),
        paused: false,
        input_while_paused: 0,
        resumed: false,
    };
    let server = serve(io, vec![(l, false)], h);
    let mut c = client(addr);
    c.write_all(&first).unwrap();
    assert_eq!(read_exact_n(&mut c, 8), b"paused\r\n");
    c.write_all(&rest).unwrap();
    assert_eq!(read_to_end(&mut c), b"done\r\n");
    let h = server.join().unwrap();
    assert_eq!(
        h.input_while_paused, 0,
        "input delivered while reading was off"
    );
    assert!(h.resumed);
    let mut want = first;
    want.extend_from_slice(&rest);
    assert!(
        h.got == want,
        "bytes lost, doubled or reordered across the pause"
    );
}

// ---- on_written and app_bytes_sent -------------------------------------------

struct Bulk {
    base: Base,
    size: usize,
    samples: Vec<(u64, u64, usize)>,
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
        self.base.accept(id);
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
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, id: ConnId, why: Closed) {
        self.base.close(id, &why);
        self.base.stop = true;
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        self.base.tick(now)
    }
}

fn on_written_reports_exact_plaintext_progress_of_a_large_write(io: Io) {
    let (l, addr) = listener();
    let size = 24 << 20;
    let server = serve(
        io,
        vec![(l, false)],
        Bulk {
            base: Base::default(),
            size,
            samples: Vec::new(),
        },
    );
    let mut c = client(addr);
    let got = read_to_end(&mut c);
    assert_eq!(got.len(), size);
    assert!(got == pattern(3, 0, size), "the bytes differ");
    let h = server.join().unwrap();
    assert!(!h.samples.is_empty(), "no on_written");
    let mut last = 0;
    for &(sent, input, pending) in &h.samples {
        assert_eq!(input, size as u64);
        assert!(sent >= last && sent <= input, "{:?}", h.samples);
        // Plaintext: exact, what is sent and what is pending add up.
        assert_eq!(sent + pending as u64, input, "{:?}", h.samples);
        last = sent;
    }
    assert_eq!(last, size as u64, "not everything reported sent");
    assert_eq!(h.base.closed[0].1, "local");
}

// ---- flush limit ---------------------------------------------------------------

struct Stuck {
    base: Base,
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
        self.base.accept(id);
        // Far more than the socket buffers hold: the peer never reads.
        be.write(id, &vec![b'x'; 64 << 20]);
        be.close(id, Close::Graceful);
        true
    }
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, id: ConnId, why: Closed) {
        self.base.close(id, &why);
        self.base.stop = true;
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        self.base.tick(now)
    }
}

fn a_graceful_close_that_cannot_flush_ends_with_a_flush_timeout(io: Io) {
    let (l, addr) = listener();
    let server = serve(
        io,
        vec![(l, false)],
        Stuck {
            base: Base::default(),
        },
    );
    let c = client(addr);
    let t0 = Instant::now();
    let h = server.join().unwrap();
    let took = t0.elapsed();
    drop(c);
    assert_eq!(h.base.closed.len(), 1);
    assert_eq!(h.base.closed[0].1, "flush timeout");
    assert!(
        took >= smtpstorm::net::epoll::CLOSE_FLUSH_LIMIT - Duration::from_millis(100),
        "ended after {took:?}"
    );
}

// ---- deadlines ----------------------------------------------------------------

#[derive(Default)]
struct Deadlines {
    base: Base,
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
        self.base.accept(id);
        if self.base.accepted.len() == 1 {
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
        self.base.stop = true;
    }
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, id: ConnId, why: Closed) {
        self.base.close(id, &why);
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        self.base.tick(now)
    }
}

fn a_deadline_fires_once_at_its_last_setting_and_a_cleared_one_never(io: Io) {
    let (l, addr) = listener();
    let server = serve(io, vec![(l, false)], Deadlines::default());
    let a = client(addr);
    let b = client(addr);
    let h = server.join().unwrap();
    drop((a, b));
    assert_eq!(h.base.accepted.len(), 2);
    assert_eq!(
        h.fired,
        vec![h.base.accepted[1]],
        "only the second fired, once"
    );
    let closed: Vec<&str> = h.base.closed.iter().map(|(_, w)| w.as_str()).collect();
    assert_eq!(closed, ["stopped", "stopped"], "open ones end as stopped");
}

// ---- outgoing connections, TLS -------------------------------------------------

/// Connects to its own listener (`tls`: implicit TLS both ways) and sends
/// `ping`; the accepted side echoes it back; a connect to `refused` fails.
struct Loop {
    base: Base,
    target: SocketAddr,
    refused: SocketAddr,
    tls: bool,
    started: bool,
    client: Option<ConnId>,
    failed_connect: Option<String>,
    ready: Vec<ConnId>,
    echoed: Vec<u8>,
    tls_both: bool,
}

impl Loop {
    fn new(target: SocketAddr, refused: SocketAddr, tls: bool) -> Self {
        Loop {
            base: Base::default(),
            target,
            refused,
            tls,
            started: false,
            client: None,
            failed_connect: None,
            ready: Vec::new(),
            echoed: Vec::new(),
            tls_both: false,
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
        self.base.accept(id);
        if implicit_tls {
            let cfg = tls::server_config(None).unwrap().config;
            be.start_tls(id, TlsSide::Server(cfg)).unwrap();
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
        if Some(id) != self.client {
            self.failed_connect = Some(match result {
                Ok(()) => "connected".into(),
                Err(e) => format!("{:?}", e.kind()),
            });
            if self.base.closed.len() == 2 {
                self.base.stop = true;
            }
            return;
        }
        result.expect("connect to our own listener");
        self.base.accept(id);
        if self.tls {
            let cfg = tls::client_config(&tls::ClientVerify::Off, 0).unwrap();
            let name = tls::server_name("localhost").unwrap();
            be.start_tls(id, TlsSide::Client(cfg, name)).unwrap();
        } else {
            be.write(id, b"ping\r\n");
        }
    }
    fn on_tls_ready<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId) {
        assert!(be.tls_state(id).established);
        self.ready.push(id);
        if Some(id) == self.client {
            be.write(id, b"ping\r\n");
        }
    }
    fn on_input<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId, plain: &[u8]) {
        if Some(id) == self.client {
            self.echoed.extend_from_slice(plain);
            if self.echoed.ends_with(b"\n") {
                self.tls_both = be.tls_info(id).is_some();
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
        self.base.close(id, &why);
        if self.base.closed.len() == 2 && self.failed_connect.is_some() {
            self.base.stop = true;
        }
    }
    fn on_tick<B: Backend>(&mut self, be: &mut B, now: Instant) -> Tick {
        if !self.started {
            self.started = true;
            self.client = Some(be.connect(self.target, ConnectOpts::default()).unwrap());
            be.connect(self.refused, ConnectOpts::default()).unwrap();
        }
        self.base.tick(now)
    }
}

fn outgoing_connections_connect_fail_and_talk_to_accepted_ones(io: Io, tls: bool) {
    let (l, addr) = listener();
    // A port nothing listens on.
    let refused = {
        let (l, a) = listener();
        drop(l);
        a
    };
    let server = serve(io, vec![(l, tls)], Loop::new(addr, refused, tls));
    let h = server.join().unwrap();
    assert_eq!(h.failed_connect.as_deref(), Some("ConnectionRefused"));
    assert_eq!(h.echoed, b"ping\r\n");
    assert_eq!(
        h.base.accepted.len(),
        2,
        "the outgoing and the accepted side"
    );
    assert_eq!(
        h.base.closed.len(),
        2,
        "one on_closed each, none for the failed connect"
    );
    if tls {
        assert_eq!(h.ready.len(), 2, "both handshakes reported");
        assert!(h.tls_both);
    } else {
        assert!(h.ready.is_empty());
    }
}

fn an_outgoing_connection_fails_or_talks_in_plaintext(io: Io) {
    outgoing_connections_connect_fail_and_talk_to_accepted_ones(io, false);
}

fn an_outgoing_connection_talks_implicit_tls_to_an_accepted_one(io: Io) {
    outgoing_connections_connect_fail_and_talk_to_accepted_ones(io, true);
}

// ---- closing during large receives, under load --------------------------------

/// Each connection sends an 8-byte seed, then `pattern(seed)`; the handler
/// checks every byte it is given. Odd seeds are aborted part way through
/// (while the backend may have a receive in flight); even ones answer `ok`
/// once they have everything.
struct Checker {
    base: Base,
    len: usize,
    conns: HashMap<ConnId, (Option<u64>, Vec<u8>, usize)>,
    mismatches: usize,
    completed: usize,
    aborted: usize,
    /// Stop once this many have closed (every connection a client made
    /// is accepted, even one whose client has long finished).
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
        self.base.accept(id);
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
    fn on_closed<B: Backend>(&mut self, _: &mut B, _: Instant, id: ConnId, why: Closed) {
        self.conns.remove(&id);
        self.base.close(id, &why);
        if self.base.closed.len() == self.expect_sessions {
            self.base.stop = true;
        }
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        self.base.tick(now)
    }
}

fn closing_connections_during_large_receives_under_load_corrupts_no_other(io: Io) {
    let (l, addr) = listener();
    let clients = 12;
    let rounds = 4;
    let len = 1 << 20;
    let h = Checker {
        base: Base::default(),
        len,
        conns: HashMap::new(),
        mismatches: 0,
        completed: 0,
        aborted: 0,
        expect_sessions: clients * rounds,
    };
    let server = serve(io, vec![(l, false)], h);
    let workers: Vec<_> = (0..clients)
        .map(|t| {
            std::thread::spawn(move || {
                let mut ok = 0;
                for r in 0..rounds {
                    let seed = (t * rounds + r) as u64;
                    let mut c = client(addr);
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
    let ok: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let h = server.join().unwrap();
    assert_eq!(
        h.mismatches, 0,
        "a connection was given bytes that are not its own"
    );
    assert_eq!(ok, clients * rounds / 2);
    assert_eq!(h.completed, clients * rounds / 2);
    assert_eq!(
        h.aborted,
        clients * rounds / 2,
        "closes: {:?}",
        h.base.closed
    );
    assert_eq!(
        h.base.closed.len(),
        clients * rounds,
        "each connection closed once"
    );
}

// ---- io_uring: ids outlive their operations -------------------------------------

/// Closes its first connection while a receive is armed on it, and in
/// `on_closed` opens a new one at once.
#[derive(Default)]
struct Reuse {
    base: Base,
    target: Option<SocketAddr>,
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
        self.base.accept(id);
        self.first.get_or_insert(id);
        true
    }
    fn on_input<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId, _: &[u8]) {
        if Some(id) == self.first {
            be.close(id, Close::Abort);
        }
    }
    fn on_closed<B: Backend>(&mut self, be: &mut B, _: Instant, id: ConnId, why: Closed) {
        self.base.close(id, &why);
        if Some(id) == self.first && self.next.is_none() {
            let next = be
                .connect(self.target.unwrap(), ConnectOpts::default())
                .unwrap();
            self.base.accept(next);
            self.next = Some(next);
            self.base.stop = true;
        }
    }
    fn on_tick<B: Backend>(&mut self, _: &mut B, now: Instant) -> Tick {
        self.base.tick(now)
    }
}

#[test]
fn uring_keeps_a_closed_connections_id_until_its_receive_and_close_complete() {
    let (l, addr) = listener();
    let h = Reuse {
        target: Some(addr),
        ..Reuse::default()
    };
    let server = serve(Io::Uring, vec![(l, false)], h);
    let mut c = client(addr);
    c.write_all(b"x").unwrap();
    let h = server.join().unwrap();
    let (first, next) = (h.first.unwrap(), h.next.unwrap());
    // The kernel may still complete the cancelled receive (into a buffer
    // of the ring, never the connection's) and the fixed-slot close: a new
    // connection must not get that id meanwhile.
    assert_ne!(
        first, next,
        "id {first} reused while its operations were in flight"
    );
}

// ---- both backends -------------------------------------------------------------

macro_rules! on_each_backend {
    ($($name:ident),* $(,)?) => {
        mod epoll {
            $( #[test] fn $name() { super::$name(smtpstorm::net::driver::Io::Epoll) } )*
        }
        mod uring {
            $( #[test] fn $name() { super::$name(smtpstorm::net::driver::Io::Uring) } )*
        }
    };
}

on_each_backend!(
    writes_of_one_callback_arrive_in_order_and_a_graceful_close_sends_them_before_the_fin,
    a_refused_connection_gets_what_was_written_then_eof_and_no_on_closed,
    a_half_closed_peer_gets_replies_written_after_its_fin,
    paused_reading_delivers_nothing_until_resumed_then_everything_in_order,
    on_written_reports_exact_plaintext_progress_of_a_large_write,
    a_graceful_close_that_cannot_flush_ends_with_a_flush_timeout,
    a_deadline_fires_once_at_its_last_setting_and_a_cleared_one_never,
    an_outgoing_connection_fails_or_talks_in_plaintext,
    an_outgoing_connection_talks_implicit_tls_to_an_accepted_one,
    closing_connections_during_large_receives_under_load_corrupts_no_other,
);
