//! The backend contract (`src/net/backend.rs`), checked on every backend
//! with the same small handlers: plain and TLS bytes cross intact in any
//! size, STARTTLS sends the 220 in the clear and never delivers plaintext
//! injected after it, backpressure holds input (and the FIN) until reading
//! resumes, a graceful close flushes everything before the FIN, a refused
//! connection gets what was written to it and no `on_closed`, a failed
//! connect is reported by `on_connected` alone, deadlines fire once, and
//! `on_closed` comes exactly once per connection.
//!
//! Each handler runs on its own thread through `driver::run`; the peers are
//! blocking std sockets (and rustls streams) on 127.0.0.1 with read
//! timeouts, so nothing can hang. Every run stops by itself.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use smtpstorm::net::backend::{Backend, Close, Closed, ConnId, ConnectOpts, Handler, Setup, Tick};
use smtpstorm::net::driver::{self, Io};
use smtpstorm::net::runtime::StopSignal;
use smtpstorm::net::tls;
use smtpstorm::net::tls_stream::TlsSide;

const LIMIT: Duration = Duration::from_secs(20);

/// The kernel-socket backends (both must pass on this machine: io_uring
/// is not skipped when it cannot run, the test fails).
fn backends() -> Vec<Io> {
    vec![Io::Epoll, Io::Uring]
}

/// What a server handler saw, for the test to assert.
#[derive(Debug, Default)]
struct Log {
    accepted: usize,
    closed: Vec<String>,
    /// Plaintext delivered per connection, in order.
    input: Vec<Vec<u8>>,
    tls_ready: usize,
    peer_closed: usize,
    timers: usize,
    written_calls: usize,
    sent_reached_in: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Echo every byte back.
    Echo,
    /// Answer `STARTTLS\r\n` with `220 go\r\n` and switch; echo after.
    StartTls,
    /// Write `421 full\r\n` and refuse.
    Refuse,
    /// Write `n` bytes, then close gracefully.
    Blast(usize),
    /// Stop reading at the first input; resume 300 ms later (a deadline);
    /// echo everything; close after the peer's FIN.
    Pause,
}

struct Server {
    mode: Mode,
    tls: Option<Arc<rustls::ServerConfig>>,
    implicit: bool,
    log: Arc<Mutex<Log>>,
    stop_after_closed: usize,
    started: Instant,
    in_callback: bool,
    conns: Vec<Option<usize>>,
}

impl Server {
    fn slot(&mut self, id: ConnId) -> usize {
        self.conns[id].expect("a callback for a connection the handler knows")
    }
}

impl Handler for Server {
    fn on_accept<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId, _peer: SocketAddr, implicit_tls: bool) -> bool {
        assert!(!self.in_callback, "callbacks are never nested");
        let mut log = self.log.lock().unwrap();
        log.accepted += 1;
        if self.mode == Mode::Refuse {
            be.write(id, b"421 full\r\n");
            return false;
        }
        if self.conns.len() <= id {
            self.conns.resize(id + 1, None);
        }
        assert!(self.conns[id].is_none(), "an id in use is not handed out again");
        self.conns[id] = Some(log.input.len());
        log.input.push(Vec::new());
        drop(log);
        if implicit_tls || self.implicit {
            be.start_tls(id, TlsSide::Server(Arc::clone(self.tls.as_ref().unwrap()))).unwrap();
        }
        match self.mode {
            Mode::Blast(n) => {
                let chunk = vec![b'z'; 64 * 1024];
                let mut left = n;
                while left > 0 {
                    let k = left.min(chunk.len());
                    be.write(id, &chunk[..k]);
                    left -= k;
                }
                be.close(id, Close::Graceful);
            }
            Mode::Pause => be.set_deadline(id, Some(now + Duration::from_secs(5))),
            _ => {}
        }
        true
    }

    fn on_tls_ready<B: Backend>(&mut self, be: &mut B, _now: Instant, id: ConnId) {
        assert!(be.tls_state(id).established);
        self.log.lock().unwrap().tls_ready += 1;
    }

    fn on_input<B: Backend>(&mut self, be: &mut B, now: Instant, id: ConnId, plain: &[u8]) {
        self.in_callback = true;
        let slot = self.slot(id);
        self.log.lock().unwrap().input[slot].extend_from_slice(plain);
        match self.mode {
            Mode::StartTls if be.tls_state(id) == Default::default() && plain.starts_with(b"STARTTLS\r\n") => {
                be.write(id, b"220 go\r\n");
                be.start_tls(id, TlsSide::Server(Arc::clone(self.tls.as_ref().unwrap()))).unwrap();
            }
            Mode::Pause => {
                let first = self.log.lock().unwrap().input[slot].len() == plain.len();
                if first {
                    be.set_reading(id, false);
                    be.set_deadline(id, Some(now + Duration::from_millis(300)));
                }
                be.write(id, plain);
            }
            _ => be.write(id, plain),
        }
        self.in_callback = false;
    }

    fn on_peer_closed<B: Backend>(&mut self, be: &mut B, _now: Instant, id: ConnId) {
        self.log.lock().unwrap().peer_closed += 1;
        be.close(id, Close::Graceful);
    }

    fn on_written<B: Backend>(&mut self, be: &mut B, _now: Instant, id: ConnId) {
        let mut log = self.log.lock().unwrap();
        log.written_calls += 1;
        if be.pending_output(id) == 0 && be.app_bytes_sent(id) == be.app_bytes_in(id) {
            log.sent_reached_in = true;
        }
    }

    fn on_timer<B: Backend>(&mut self, be: &mut B, _now: Instant, id: ConnId) {
        self.log.lock().unwrap().timers += 1;
        be.set_reading(id, true);
    }

    fn on_closed<B: Backend>(&mut self, _be: &mut B, _now: Instant, id: ConnId, why: Closed) {
        assert!(!self.in_callback, "on_closed is never nested in another callback");
        assert!(self.conns[id].take().is_some(), "on_closed once per connection");
        self.log.lock().unwrap().closed.push(format!("{why:?}"));
    }

    fn on_tick<B: Backend>(&mut self, _be: &mut B, now: Instant) -> Tick {
        let closed = self.log.lock().unwrap().closed.len();
        let refused = self.mode == Mode::Refuse && self.log.lock().unwrap().accepted >= self.stop_after_closed;
        Tick {
            wake_at: Some(now + Duration::from_millis(50)),
            stop: closed >= self.stop_after_closed || refused || self.started.elapsed() > LIMIT,
        }
    }
}

/// Runs a server handler on its own thread; returns its address, its log
/// and the thread.
fn serve(io: Io, mode: Mode, implicit: bool, stop_after_closed: usize) -> (SocketAddr, Arc<Mutex<Log>>, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Log::default()));
    let tls = tls::server_config(None).unwrap().config;
    let mut h = Server {
        mode,
        tls: Some(tls),
        implicit,
        log: Arc::clone(&log),
        stop_after_closed,
        started: Instant::now(),
        in_callback: false,
        conns: Vec::new(),
    };
    let t = thread::spawn(move || {
        let setup = Setup {
            listeners: vec![(l, implicit)],
            stop: StopSignal::new(),
            read_buf_bytes: 16 * 1024,
        track_waiting: false,
        };
        driver::run(driver::ThreadTransport::kernel(io), setup, &mut h).unwrap();
    });
    (addr, log, t)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s
}

fn tls_client(_addr: SocketAddr, sock: TcpStream) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let cfg = tls::client_config(&tls::ClientVerify::Off, 0).unwrap();
    let conn = rustls::ClientConnection::new(cfg, tls::server_name("localhost").unwrap()).unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// Writes `data` and reads back as many bytes, 16 KiB at a time (so
/// neither direction's socket buffer fills).
fn echo_through<S: Read + Write>(mut s: S, data: Vec<u8>) -> (Vec<u8>, S) {
    let n = data.len();
    // A rustls stream cannot be split: write in slices between reads.
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

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[test]
fn a_megabyte_echoes_intact_in_plaintext_and_over_implicit_tls() {
    for io in backends() {
        for implicit in [false, true] {
            let (addr, log, t) = serve(io, Mode::Echo, implicit, 1);
            let data = pattern(1 << 20);
            let sock = connect(addr);
            let got = if implicit {
                let (got, mut s) = echo_through(tls_client(addr, sock), data.clone());
                s.conn.send_close_notify();
                let _ = s.flush();
                got
            } else {
                let (got, s) = echo_through(sock, data.clone());
                drop(s);
                got
            };
            assert!(got == data, "{io:?} tls={implicit}: the echo differs");
            t.join().unwrap();
            let log = log.lock().unwrap();
            assert_eq!(log.closed.len(), 1, "{io:?}: {:?}", log.closed);
            assert_eq!(log.tls_ready, usize::from(implicit));
            assert!(log.written_calls > 0 && log.sent_reached_in, "{io:?}: on_written reports progress");
        }
    }
}

#[test]
fn after_start_tls_plaintext_is_never_input_and_the_220_went_out_in_the_clear() {
    for io in backends() {
        let (addr, log, t) = serve(io, Mode::StartTls, false, 1);
        let mut sock = connect(addr);
        sock.write_all(b"STARTTLS\r\n").unwrap();
        let mut reply = [0u8; 8];
        sock.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"220 go\r\n", "{io:?}: the 220 goes out in the clear");
        // Plaintext after the switch (a man in the middle): it reaches TLS
        // as garbage, never the handler; the connection ends.
        sock.write_all(b"MAIL FROM:<injected@x>\r\n").unwrap();
        let mut rest = Vec::new();
        let _ = sock.read_to_end(&mut rest);
        t.join().unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log.input[0], b"STARTTLS\r\n", "{io:?}");
        assert_eq!(log.tls_ready, 0);
        assert_eq!(log.closed.len(), 1);
        assert!(log.closed[0].starts_with("Error"), "{io:?}: {:?}", log.closed);
    }
}

#[test]
fn starttls_then_a_real_handshake_carries_the_session() {
    for io in backends() {
        let (addr, log, t) = serve(io, Mode::StartTls, false, 1);
        let mut sock = connect(addr);
        sock.write_all(b"STARTTLS\r\n").unwrap();
        let mut reply = [0u8; 8];
        sock.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"220 go\r\n");
        let (got, mut s) = echo_through(tls_client(addr, sock), b"EHLO over tls\r\n".to_vec());
        assert_eq!(got, b"EHLO over tls\r\n", "{io:?}");
        s.conn.send_close_notify();
        let _ = s.flush();
        drop(s);
        t.join().unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log.input[0], b"STARTTLS\r\nEHLO over tls\r\n", "{io:?}");
        assert_eq!(log.tls_ready, 1);
    }
}

#[test]
fn a_graceful_close_flushes_everything_before_the_fin() {
    for io in backends() {
        let n = 3 << 20;
        let (addr, log, t) = serve(io, Mode::Blast(n), false, 1);
        let mut sock = connect(addr);
        let mut got = Vec::new();
        sock.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), n, "{io:?}: every byte before the FIN");
        t.join().unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log.closed, vec!["Local".to_string()], "{io:?}");
    }
}

#[test]
fn a_refused_connection_gets_what_was_written_and_no_on_closed() {
    for io in backends() {
        let (addr, log, t) = serve(io, Mode::Refuse, false, 1);
        let mut sock = connect(addr);
        let mut got = Vec::new();
        sock.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"421 full\r\n", "{io:?}");
        t.join().unwrap();
        let log = log.lock().unwrap();
        assert_eq!((log.accepted, log.closed.len()), (1, 0), "{io:?}");
    }
}

#[test]
fn paused_reading_holds_input_and_the_fin_until_it_resumes() {
    for io in backends() {
        let (addr, log, t) = serve(io, Mode::Pause, false, 1);
        let mut sock = connect(addr);
        sock.write_all(b"first").unwrap();
        // Wait for the echo of the first piece: reading is now paused.
        let mut first = [0u8; 5];
        sock.read_exact(&mut first).unwrap();
        let paused_at = Instant::now();
        sock.write_all(b"second").unwrap();
        sock.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        sock.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"second", "{io:?}: the held input, after resuming");
        assert!(paused_at.elapsed() >= Duration::from_millis(250), "{io:?}: held until the deadline");
        t.join().unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log.input[0], b"firstsecond");
        assert_eq!((log.timers, log.peer_closed, log.closed.len()), (1, 1, 1), "{io:?}");
    }
}

/// A client handler: connects, writes, expects the echo, closes.
struct Dial {
    target: SocketAddr,
    result: Arc<Mutex<Vec<String>>>,
    id: Option<ConnId>,
    got: Vec<u8>,
    done: bool,
    started: Instant,
}

impl Handler for Dial {
    fn on_connected<B: Backend>(&mut self, be: &mut B, _now: Instant, id: ConnId, result: std::io::Result<()>) {
        let mut r = self.result.lock().unwrap();
        match result {
            Ok(()) => {
                r.push("connected".into());
                be.write(id, b"ping");
            }
            Err(e) => {
                r.push(format!("failed: {:?}", e.kind()));
                self.done = true;
            }
        }
    }

    fn on_input<B: Backend>(&mut self, be: &mut B, _now: Instant, id: ConnId, plain: &[u8]) {
        self.got.extend_from_slice(plain);
        if self.got == b"ping" {
            self.result.lock().unwrap().push("echoed".into());
            be.close(id, Close::Graceful);
        }
    }

    fn on_closed<B: Backend>(&mut self, _be: &mut B, _now: Instant, _id: ConnId, why: Closed) {
        self.result.lock().unwrap().push(format!("closed: {why:?}"));
        self.done = true;
    }

    fn on_tick<B: Backend>(&mut self, be: &mut B, now: Instant) -> Tick {
        if self.id.is_none() && !self.done {
            match be.connect(self.target, ConnectOpts::default()) {
                Ok(id) => self.id = Some(id),
                Err(e) => {
                    self.result.lock().unwrap().push(format!("connect error: {e}"));
                    self.done = true;
                }
            }
        }
        Tick {
            wake_at: Some(now + Duration::from_millis(50)),
            stop: self.done || self.started.elapsed() > LIMIT,
        }
    }
}

fn dial(io: Io, target: SocketAddr) -> Vec<String> {
    let result = Arc::new(Mutex::new(Vec::new()));
    let mut h = Dial {
        target,
        result: Arc::clone(&result),
        id: None,
        got: Vec::new(),
        done: false,
        started: Instant::now(),
    };
    let setup = Setup {
        listeners: Vec::new(),
        stop: StopSignal::new(),
        read_buf_bytes: 4096,
        track_waiting: false,
    };
    driver::run(driver::ThreadTransport::kernel(io), setup, &mut h).unwrap();
    let r = result.lock().unwrap().clone();
    r
}

#[test]
fn a_connect_completes_or_fails_through_on_connected_alone() {
    for io in backends() {
        let (addr, _log, t) = serve(io, Mode::Echo, false, 1);
        assert_eq!(dial(io, addr), vec!["connected", "echoed", "closed: Local"], "{io:?}");
        t.join().unwrap();
        // Nothing listens on this port: refused, and no on_closed.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert_eq!(dial(io, port), vec!["failed: ConnectionRefused"], "{io:?}");
    }
}
