//! The small HTTP/1.1 server behind `--metrics-listen`: one thread, one
//! mio poll over the listener and its connections, request heads parsed by
//! `httparse`.
//!
//! It serves figures to scrapers, nothing else, and assumes every client may
//! be hostile:
//! - GET and HEAD only (others 405 with `Allow: GET, HEAD`);
//! - a request head of at most [`MAX_HEAD`] bytes (431 beyond; more bytes are
//!   never buffered), at most [`MAX_HEADERS`] header lines (431);
//! - the whole head must arrive within [`READ_TIMEOUT`] of the accept (408),
//!   so a client that trickles bytes is cut off as one that sends nothing;
//! - no request body: any `Transfer-Encoding`, or a `Content-Length` other
//!   than 0, is 400 (RFC 9112 §6.1: the framing is not ours to guess);
//! - an HTTP/1.1 request without exactly one `Host` is 400 (RFC 9112 §3.2);
//!   anything `httparse` refuses (binary garbage, bare CR, obs-fold) is 400;
//! - one response per connection (`Connection: close`): the server never
//!   reads a second request, so nothing after a head is ever parsed;
//! - at most [`MAX_CONNECTIONS`] open connections: one more evicts the
//!   oldest that has not yet sent a whole request head (so idle or
//!   trickling clients cannot lock scrapers out); when every slot is busy
//!   answering, the newcomer is closed at once.
//!
//! Invariants: no request byte is ever written into a response header (the
//! handler chooses a status, a `&'static str` content type and a body); the
//! accept loop survives every error (fd exhaustion waits and retries), so
//! the port stays up for the whole run; memory is bounded by
//! `MAX_CONNECTIONS` × (`MAX_HEAD` + the largest response).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

/// The largest request head accepted, request line and headers included.
pub const MAX_HEAD: usize = 8 * 1024;
/// The most header lines in one request head.
pub const MAX_HEADERS: usize = 64;
/// The most connections open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has, from the accept, to send its whole request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take its response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After the response, what is still read (and dropped) before the close,
/// so that a client still sending gets its response rather than a reset.
const DRAIN_BYTES: usize = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_millis(500);
/// Accepts per turn of the loop before the connections get their turn.
const ACCEPT_BATCH: usize = 256;
/// Out of descriptors: wait this long before accepting again.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

/// The statuses this server sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    HeadTooLarge,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::HeadTooLarge => 431,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::RequestTimeout => "Request Timeout",
            Status::HeadTooLarge => "Request Header Fields Too Large",
        }
    }
}

/// A request the handler answers: GET or HEAD of `path` (query removed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub head_only: bool,
    pub path: String,
}

/// What a request head (so far) comes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not complete yet, still within the limit.
    Partial,
    Request(Request),
    /// Answered with this status without the handler; then closed.
    Reject(Status),
}

/// A response: the content type is chosen by the code, never taken from the
/// request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    pub content_type: &'static str,
    pub body: String,
}

const TEXT: &str = "text/plain; charset=utf-8";

impl Response {
    pub fn new(status: Status, content_type: &'static str, body: String) -> Self {
        Self {
            status,
            content_type,
            body,
        }
    }

    /// The server's own answer to a refused request.
    pub fn error(status: Status) -> Self {
        let body = match status {
            Status::Ok => "",
            Status::BadRequest => "bad request\n",
            Status::NotFound => "not found\n",
            Status::MethodNotAllowed => "only GET and HEAD\n",
            Status::RequestTimeout => "request head not received in time\n",
            Status::HeadTooLarge => "request head too large\n",
        };
        Self::new(status, TEXT, body.to_string())
    }

    /// The bytes on the wire; a HEAD response has the headers of the GET
    /// one and no body.
    pub fn to_bytes(&self, head_only: bool) -> Vec<u8> {
        let allow = if self.status == Status::MethodNotAllowed {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.status.code(),
            self.status.reason(),
            self.content_type,
            self.body.len(),
        )
        .into_bytes();
        if !head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

/// Judges a request head: `bytes` are all that arrived so far.
pub fn parse_head(bytes: &[u8]) -> Verdict {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Partial) if bytes.len() >= MAX_HEAD => {
            Verdict::Reject(Status::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => Verdict::Partial,
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => Verdict::Reject(Status::HeadTooLarge),
        Ok(httparse::Status::Complete(_)) => judge(&req),
        Err(httparse::Error::TooManyHeaders) => Verdict::Reject(Status::HeadTooLarge),
        Err(_) => Verdict::Reject(Status::BadRequest),
    }
}

/// A complete head: method, then `Host`, then the framing.
fn judge(req: &httparse::Request) -> Verdict {
    let head_only = match req.method {
        Some("GET") => false,
        Some("HEAD") => true,
        _ => return Verdict::Reject(Status::MethodNotAllowed),
    };
    let is = |h: &&httparse::Header, name: &str| h.name.eq_ignore_ascii_case(name);
    let hosts = req.headers.iter().filter(|h| is(h, "host")).count();
    if hosts > 1 || (hosts == 0 && req.version == Some(1)) {
        return Verdict::Reject(Status::BadRequest);
    }
    let body_framed = req.headers.iter().any(|h| {
        is(&h, "transfer-encoding")
            || (is(&h, "content-length")
                && !(!h.value.is_empty() && h.value.iter().all(|&b| b == b'0')))
    });
    if body_framed {
        return Verdict::Reject(Status::BadRequest);
    }
    let target = req.path.unwrap_or("");
    let path = target.split('?').next().unwrap_or("").to_string();
    Verdict::Request(Request { head_only, path })
}

/// A request head as it arrives, never more than [`MAX_HEAD`] bytes.
#[derive(Debug, Default)]
pub struct HeadBuf {
    buf: Vec<u8>,
}

impl HeadBuf {
    /// Room left under the limit.
    pub fn room(&self) -> usize {
        MAX_HEAD - self.buf.len()
    }

    /// Takes what fits of `data` and judges everything taken so far.
    /// Returns how many bytes were taken.
    pub fn feed(&mut self, data: &[u8]) -> (usize, Verdict) {
        let n = data.len().min(self.room());
        self.buf.extend_from_slice(&data[..n]);
        (n, parse_head(&self.buf))
    }
}

/// Answers one request; called on the server thread.
pub type Handler = Box<dyn Fn(&Request) -> Response + Send>;

/// A bound listener, not yet served.
pub struct Bound {
    listener: TcpListener,
    addr: SocketAddr,
}

/// Binds `addr` (port 0: any free port).
pub fn bind(addr: SocketAddr) -> io::Result<Bound> {
    let listener = TcpListener::bind(addr)?;
    let addr = listener.local_addr()?;
    Ok(Bound { listener, addr })
}

/// The serving thread; stopped (and joined) on drop.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl Bound {
    /// Starts the thread `name` that serves this listener with `handler`.
    pub fn serve(self, name: &str, handler: Handler) -> io::Result<Server> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let mut listener = self.listener;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut looper = Loop {
            poll,
            listener,
            handler,
            conns: Slab::with_capacity(MAX_CONNECTIONS),
            accepted: 0,
            stop: Arc::clone(&stop),
        };
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || looper.run())?;
        Ok(Server {
            addr: self.addr,
            stop,
            waker,
            thread: Some(thread),
        })
    }
}

impl Server {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Phase {
    Reading(HeadBuf),
    Writing { out: Vec<u8>, at: usize },
    Draining { left: usize },
}

struct Conn {
    stream: TcpStream,
    phase: Phase,
    deadline: Instant,
    /// Accept order, for eviction.
    seq: u64,
}

/// What to do with a connection after driving it.
enum Next {
    Keep,
    Close,
}

struct Loop {
    poll: Poll,
    listener: TcpListener,
    handler: Handler,
    conns: Slab<Conn>,
    accepted: u64,
    stop: Arc<AtomicBool>,
}

impl Loop {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        let mut accept_now = false;
        let mut accept_at: Option<Instant> = None;
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if accept_at.is_some_and(|t| t <= now) {
                accept_at = None;
                accept_now = true;
            }
            let timeout = if accept_now {
                Duration::ZERO
            } else {
                let next = self.conns.iter().map(|(_, c)| c.deadline).chain(accept_at);
                next.min()
                    .map_or(Duration::from_secs(1), |t| t.saturating_duration_since(now))
                    .min(Duration::from_secs(1))
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    // Never seen in practice; do not spin, do not give up.
                    std::thread::sleep(ACCEPT_PAUSE);
                }
                continue;
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => accept_now = true,
                    WAKER => {}
                    Token(t) => self.drive(t - FIRST_CONN),
                }
            }
            if accept_now && accept_at.is_none() {
                match self.accept_some() {
                    Accepted::AllPending => accept_now = false,
                    Accepted::More => {}
                    Accepted::OutOfDescriptors => {
                        accept_now = false;
                        accept_at = Some(Instant::now() + ACCEPT_PAUSE);
                    }
                }
            }
            self.expire(Instant::now());
        }
    }

    fn accept_some(&mut self) -> Accepted {
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Accepted::AllPending,
                Err(e) if is_fd_exhaustion(&e) => {
                    // Free a slot's descriptor if an idle client holds one.
                    if !self.evict_oldest_reader() {
                        return Accepted::OutOfDescriptors;
                    }
                }
                // Aborted handshakes and the like: the next one may be fine.
                Err(_) => {}
            }
        }
        Accepted::More
    }

    fn admit(&mut self, mut stream: TcpStream) {
        if self.conns.len() >= MAX_CONNECTIONS && !self.evict_oldest_reader() {
            // Every slot is busy answering: refuse this one at once.
            drop(stream);
            return;
        }
        let entry = self.conns.vacant_entry();
        let token = Token(entry.key() + FIRST_CONN);
        let interest = Interest::READABLE | Interest::WRITABLE;
        if self
            .poll
            .registry()
            .register(&mut stream, token, interest)
            .is_err()
        {
            return;
        }
        self.accepted += 1;
        let key = entry.key();
        entry.insert(Conn {
            stream,
            phase: Phase::Reading(HeadBuf::default()),
            deadline: Instant::now() + READ_TIMEOUT,
            seq: self.accepted,
        });
        // A scraper sends its request with the handshake: answer it now,
        // before a flood of later accepts could evict it.
        self.drive(key);
    }

    /// Closes the oldest connection still reading its head; false if none.
    fn evict_oldest_reader(&mut self) -> bool {
        let oldest = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Reading(_)))
            .min_by_key(|(_, c)| c.seq)
            .map(|(k, _)| k);
        match oldest {
            Some(k) => {
                self.conns.remove(k);
                true
            }
            None => false,
        }
    }

    fn drive(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if let Next::Close = step(conn, &self.handler) {
            self.conns.remove(key);
        }
    }

    /// Past its deadline, a connection still reading gets 408; one writing
    /// or draining is closed.
    fn expire(&mut self, now: Instant) {
        let late: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for key in late {
            let conn = &mut self.conns[key];
            if let Phase::Reading(_) = conn.phase {
                respond(conn, &Response::error(Status::RequestTimeout), false);
                self.drive(key);
            } else {
                self.conns.remove(key);
            }
        }
    }
}

enum Accepted {
    AllPending,
    More,
    OutOfDescriptors,
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

fn respond(conn: &mut Conn, resp: &Response, head_only: bool) {
    conn.phase = Phase::Writing {
        out: resp.to_bytes(head_only),
        at: 0,
    };
    conn.deadline = Instant::now() + WRITE_TIMEOUT;
}

/// Moves one connection as far as its socket allows.
fn step(conn: &mut Conn, handler: &Handler) -> Next {
    let mut scratch = [0u8; 16 * 1024];
    loop {
        match &mut conn.phase {
            Phase::Reading(head) => {
                let room = head.room();
                match conn.stream.read(&mut scratch[..room]) {
                    Ok(0) => return Next::Close,
                    Ok(n) => match head.feed(&scratch[..n]).1 {
                        Verdict::Partial => {}
                        Verdict::Request(req) => {
                            let resp = handler(&req);
                            respond(conn, &resp, req.head_only);
                        }
                        Verdict::Reject(status) => respond(conn, &Response::error(status), false),
                    },
                    Err(e) => return on_error(e),
                }
            }
            Phase::Writing { out, at } => match conn.stream.write(&out[*at..]) {
                Ok(n) => {
                    *at += n;
                    if *at == out.len() {
                        let _ = conn.stream.shutdown(Shutdown::Write);
                        conn.phase = Phase::Draining { left: DRAIN_BYTES };
                        conn.deadline = Instant::now() + DRAIN_TIME;
                    }
                }
                Err(e) => return on_error(e),
            },
            Phase::Draining { left } => match conn.stream.read(&mut scratch) {
                Ok(0) => return Next::Close,
                Ok(n) if n >= *left => return Next::Close,
                Ok(n) => *left -= n,
                Err(e) => return on_error(e),
            },
        }
    }
}

fn on_error(e: io::Error) -> Next {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Next::Keep,
        _ => Next::Close,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Verdict {
        Verdict::Request(Request {
            head_only: false,
            path: path.into(),
        })
    }

    const CASES: &[(&[u8], &str)] = &[
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n", "get /metrics"),
        (b"GET /stats?x=1 HTTP/1.1\r\nHost: a\r\n\r\n", "get /stats"),
        (b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", "head /"),
        (b"GET / HTTP/1.0\r\n\r\n", "get /"),
        (b"GET / HTTP/1.1\nHost: a\n\n", "get /"),
        (b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", "get /"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", "get /"),
        (b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\nGET /x", "get /nope"),
        (b"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc", "405"),
        (b"DELETE / HTTP/1.1\r\nHost: a\r\n\r\n", "405"),
        (b"GET / HTTP/1.1\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\nContent-Length: 5\r\n\r\nGET /stats HTTP/1.1\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: identity\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx", "400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +0\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", "400"),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", "400"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "400"),
        (b"\x00\xff\xfe garbage", "400"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n", "partial"),
        (b"GE", "partial"),
    ];

    fn expected(want: &str) -> Verdict {
        match want {
            "405" => Verdict::Reject(Status::MethodNotAllowed),
            "400" => Verdict::Reject(Status::BadRequest),
            "431" => Verdict::Reject(Status::HeadTooLarge),
            "partial" => Verdict::Partial,
            w => {
                let (m, p) = w.split_once(' ').unwrap();
                Verdict::Request(Request {
                    head_only: m == "head",
                    path: p.into(),
                })
            }
        }
    }

    /// Feeds `chunks` until a verdict other than Partial.
    fn feed_all<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Verdict {
        let mut head = HeadBuf::default();
        let mut v = Verdict::Partial;
        for c in chunks {
            v = head.feed(c).1;
            if v != Verdict::Partial {
                break;
            }
        }
        v
    }

    #[test]
    fn each_head_gets_its_verdict_whole_byte_by_byte_and_cut_anywhere_in_three() {
        for (bytes, want) in CASES {
            let want = expected(want);
            let show = String::from_utf8_lossy(bytes);
            assert_eq!(parse_head(bytes), want, "{show:?}");
            assert_eq!(feed_all(bytes.chunks(1)), want, "byte by byte: {show:?}");
            for i in 0..=bytes.len() {
                for j in i..=bytes.len() {
                    let parts = [&bytes[..i], &bytes[i..j], &bytes[j..]];
                    assert_eq!(feed_all(parts), want, "cut at {i},{j}: {show:?}");
                }
            }
        }
    }

    #[test]
    fn a_head_of_exactly_the_limit_passes_and_one_byte_more_is_431() {
        let start = b"GET / HTTP/1.1\r\nHost: a\r\nX: ";
        let end = b"\r\n\r\n";
        let fill = MAX_HEAD - start.len() - end.len();
        let mut at_limit = start.to_vec();
        at_limit.extend(std::iter::repeat_n(b'v', fill));
        at_limit.extend_from_slice(end);
        assert_eq!(at_limit.len(), MAX_HEAD);
        assert_eq!(parse_head(&at_limit), get("/"));
        for chunk in [1, 7, 4096, MAX_HEAD] {
            assert_eq!(feed_all(at_limit.chunks(chunk)), get("/"), "{chunk}");
        }
        let mut over = start.to_vec();
        over.extend(std::iter::repeat_n(b'v', fill + 1));
        over.extend_from_slice(end);
        for chunk in [1, 7, 4096, MAX_HEAD, over.len()] {
            let mut head = HeadBuf::default();
            let mut taken = 0;
            let mut v = Verdict::Partial;
            for c in over.chunks(chunk) {
                let (n, verdict) = head.feed(c);
                taken += n;
                v = verdict;
                if v != Verdict::Partial {
                    break;
                }
            }
            assert_eq!(v, Verdict::Reject(Status::HeadTooLarge), "{chunk}");
            assert_eq!(taken, MAX_HEAD, "never more than the limit is kept");
        }
    }

    #[test]
    fn a_line_that_never_ends_is_431_at_the_limit() {
        let mut head = HeadBuf::default();
        let (n, v) = head.feed(b"GET / HTTP/1.1\r\nX-Long: ");
        assert!(n > 0 && v == Verdict::Partial);
        let line = vec![b'a'; 1 << 20];
        let (n, v) = head.feed(&line);
        assert_eq!(v, Verdict::Reject(Status::HeadTooLarge));
        assert!(n < line.len());
        assert_eq!(head.room(), 0);
    }

    #[test]
    fn too_many_header_lines_is_431() {
        let mut h = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            h.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        h.extend_from_slice(b"\r\n");
        assert_eq!(parse_head(&h), Verdict::Reject(Status::HeadTooLarge));
    }

    #[test]
    fn responses_close_name_their_length_and_head_has_no_body() {
        let r = Response::new(Status::Ok, "application/json", "{}\n".into());
        assert_eq!(
            r.to_bytes(false),
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 3\r\nConnection: close\r\n\r\n{}\n"
        );
        assert_eq!(
            r.to_bytes(true),
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        );
        let m =
            String::from_utf8(Response::error(Status::MethodNotAllowed).to_bytes(false)).unwrap();
        assert!(m.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{m}");
        assert!(m.contains("\r\nAllow: GET, HEAD\r\n"), "{m}");
    }

    #[test]
    fn request_bytes_never_reach_a_response_header() {
        // A target with an encoded CR/LF: the path is data for the handler,
        // the 404 is the server's own text.
        let v = parse_head(b"GET /x%0d%0aSet-Cookie:%20a HTTP/1.1\r\nHost: a\r\n\r\n");
        let Verdict::Request(req) = v else {
            panic!("{v:?}")
        };
        assert_eq!(req.path, "/x%0d%0aSet-Cookie:%20a");
        let bytes = Response::error(Status::NotFound).to_bytes(false);
        assert!(!String::from_utf8_lossy(&bytes).contains("Set-Cookie"));
        // A raw CR or LF cannot be in a target at all.
        for bad in [
            &b"GET /x\rY HTTP/1.1\r\n\r\n"[..],
            b"GET /x\nY: z HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse_head(bad), Verdict::Reject(Status::BadRequest));
        }
    }

    /// The server over a real socket, in process: the connection cap evicts
    /// idle clients, and a request after them is answered.
    #[test]
    fn past_the_cap_the_oldest_idle_client_makes_room_for_a_scrape() {
        use std::net::TcpStream as Std;
        let bound = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let server = bound
            .serve(
                "test-http",
                Box::new(|r: &Request| Response::new(Status::Ok, TEXT, r.path.clone())),
            )
            .unwrap();
        let addr = server.addr();
        let idle: Vec<Std> = (0..MAX_CONNECTIONS + 10)
            .map(|_| Std::connect(addr).unwrap())
            .collect();
        let mut s = Std::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.ends_with("\r\n\r\n/hello"), "{got}");
        // The first idle clients were closed: they read end of stream.
        let mut first = &idle[0];
        first
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buf = [0u8; 64];
        let r = first.read(&mut buf);
        assert!(
            matches!(r, Ok(0))
                || r.as_ref()
                    .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
        drop(server);
        assert!(
            Std::connect(addr).is_err(),
            "the port closes with the server"
        );
    }
}
