//! The sink's `--metrics-listen` endpoint against hostile clients, as the
//! real binary serves it: a header line that never ends, hundreds of
//! half-open connections, request smuggling through `Transfer-Encoding`
//! with `Content-Length`, oversized heads, binary garbage, other methods,
//! clients that send nothing. Each gets 400, 405, 408, 431 or a close;
//! memory (VmRSS) and the thread count of the sink stay bounded; scrapes in
//! the middle of it all are answered; a load run during the attack loses
//! nothing.
//!
//! Every wait is bounded; all traffic is on 127.0.0.1.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(90);
/// The server's read timeout for a request head (src/stats/http.rs).
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Generous: a wait that ends early when the answer comes.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

struct Sink {
    proc: Proc,
    smtp: SocketAddr,
    metrics: SocketAddr,
    json: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn sink() -> Sink {
    let dir = tempfile::tempdir().unwrap();
    let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let json = dir.path().join("sink.json");
    let proc = Proc::spawn(
        "smtpstorm sink",
        Command::new(bin())
            .args(["sink", "--listen", &smtp.to_string(), "--threads", "2"])
            .args(["--quiet", "--duration", "85s", "--metrics-listen"])
            .arg(metrics.to_string())
            .arg("--json")
            .arg(&json)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for_listen(smtp.port(), Duration::from_secs(10));
    wait_for_listen(metrics.port(), Duration::from_secs(10));
    Sink {
        proc,
        smtp,
        metrics,
        json,
        _dir: dir,
    }
}

/// A field of `/proc/PID/status` (`VmRSS` in kB, `Threads`).
fn status_field(pid: u32, name: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A response as read to the end: (status, head, body).
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// Reads until the server closes; `None` if it closed (or reset) without a
/// response.
fn read_reply(s: &mut TcpStream) -> Option<Reply> {
    s.set_read_timeout(Some(ANSWER_WITHIN)).unwrap();
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("no answer and no close within {ANSWER_WITHIN:?}: {e}"),
    }
    if raw.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    Some(Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// Sends `bytes` on a new connection and reads the answer.
fn exchange(addr: SocketAddr, bytes: &[u8]) -> Option<Reply> {
    let mut s = TcpStream::connect_timeout(&addr, ANSWER_WITHIN).unwrap();
    // The server may close before taking everything: that is its right.
    let _ = s.write_all(bytes);
    read_reply(&mut s)
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    exchange(addr, req.as_bytes()).unwrap_or_else(|| panic!("GET {path}: closed unanswered"))
}

/// A scrape of `/stats` that must succeed; returns it and how long it took.
fn scrape(addr: SocketAddr) -> (Value, Duration) {
    let t = Instant::now();
    let r = get(addr, "/stats");
    assert_eq!(r.status, 200, "{r:?}");
    (serde_json::from_str(&r.body).unwrap(), t.elapsed())
}

/// Status or close: what a hostile request may get.
#[track_caller]
fn assert_refused(reply: &Option<Reply>, allowed: &[u16]) {
    if let Some(r) = reply {
        assert!(allowed.contains(&r.status), "{r:?}");
        assert!(r.head.contains("\r\nConnection: close"), "{r:?}");
    }
}

/// Sends a header line that never ends, up to `total` bytes, and reads what
/// comes back. Returns (bytes the server took before it stopped us, reply).
fn endless_header(addr: SocketAddr, total: usize) -> (usize, Option<Reply>) {
    let mut s = TcpStream::connect_timeout(&addr, ANSWER_WITHIN).unwrap();
    s.set_write_timeout(Some(ANSWER_WITHIN)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        .unwrap();
    let chunk = vec![b'a'; 1 << 20];
    let mut sent = 0;
    while sent < total {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // Reset, broken pipe, or a write that waited ANSWER_WITHIN: the
            // server stopped reading.
            Err(_) => break,
        }
    }
    (sent, read_reply(&mut s))
}

#[test]
fn a_sink_under_attack_keeps_its_memory_threads_scrapes_and_message_counts() {
    const N: u64 = 3000;
    const ATTACK: usize = 64 << 20;
    let sink = sink();
    let pid = sink.proc.pid();
    let (first, _) = scrape(sink.metrics);
    assert_eq!(first["counts"]["messages_accepted"], 0);
    let rss0 = status_field(pid, "VmRSS");
    let threads0 = status_field(pid, "Threads");

    // A load run through the whole attack: 3000 messages at 300/s.
    let dir = tempfile::tempdir().unwrap();
    let blast_json = dir.path().join("blast.json");
    let mut blast = Proc::spawn(
        "smtpstorm blast",
        Command::new(bin())
            .args(["blast", &sink.smtp.to_string(), "--rate", "300", "-n"])
            .arg(N.to_string())
            .args(["-c", "8", "-k", "5", "--quiet", "--allow-invalid", "--json"])
            .arg(&blast_json)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );

    let done = AtomicBool::new(false);
    let rss_max = AtomicU64::new(rss0);
    let threads_max = AtomicU64::new(threads0);
    let scrape_max = std::sync::Mutex::new(Duration::ZERO);
    let scrapes = AtomicU64::new(0);
    std::thread::scope(|sc| {
        // Samples the sink while the attacks run.
        sc.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                rss_max.fetch_max(status_field(pid, "VmRSS"), Ordering::Relaxed);
                threads_max.fetch_max(status_field(pid, "Threads"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        // Scrapes all along: each must be answered.
        sc.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let (_, took) = scrape(sink.metrics);
                scrapes.fetch_add(1, Ordering::Relaxed);
                let mut m = scrape_max.lock().unwrap();
                *m = (*m).max(took);
                drop(m);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        // 500 half-open connections, held while the other attacks run.
        let half_open: Vec<TcpStream> = (0..500)
            .map(|i| {
                let mut s = TcpStream::connect_timeout(&sink.metrics, ANSWER_WITHIN).unwrap();
                if i % 2 == 0 {
                    // Half of them start a request and never finish it.
                    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
                }
                s
            })
            .collect();
        let smuggler = sc.spawn(|| {
            let mut out = Vec::new();
            for _ in 0..50 {
                out.push(exchange(
                    sink.metrics,
                    b"GET /stats HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\
                      Content-Length: 40\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                ));
                out.push(exchange(
                    sink.metrics,
                    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\0\0\xff\xfe",
                ));
                out.push(exchange(
                    sink.metrics,
                    b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
                ));
                let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
                big.resize(64 << 10, b'b');
                big.extend_from_slice(b"\r\n\r\n");
                out.push(exchange(sink.metrics, &big));
            }
            out
        });
        let slowloris = sc.spawn(|| {
            let mut s = TcpStream::connect_timeout(&sink.metrics, ANSWER_WITHIN).unwrap();
            read_reply(&mut s)
        });
        let (sent, reply) = endless_header(sink.metrics, ATTACK);
        assert!(sent < ATTACK, "the server took all of {sent} bytes");
        assert_refused(&reply, &[431]);
        for r in smuggler.join().unwrap() {
            assert_refused(&r, &[400, 405, 431]);
            if let Some(r) = r {
                assert_eq!(r.head.matches("HTTP/1.1 ").count(), 1, "{r:?}");
                assert!(!r.body.contains("HTTP/1.1"), "{r:?}");
            }
        }
        assert_refused(&slowloris.join().unwrap(), &[408]);
        let threads_now = status_field(pid, "Threads");
        let st = blast.wait(LIMIT);
        assert!(st.success(), "blast: {st}");
        drop(half_open);
        done.store(true, Ordering::Relaxed);
        assert!(
            threads_now <= threads0,
            "{threads_now} threads, {threads0} before"
        );
    });

    let rss_max = rss_max.into_inner();
    let threads_max = threads_max.into_inner();
    let scrape_max = scrape_max.into_inner().unwrap();
    eprintln!(
        "sink under attack: VmRSS {rss0} kB before, {rss_max} kB at most; threads {threads0} \
         before, {threads_max} at most; {} scrapes, the slowest {scrape_max:?}",
        scrapes.into_inner()
    );
    assert!(
        rss_max < rss0 + 50 * 1024,
        "VmRSS grew from {rss0} kB to {rss_max} kB"
    );
    assert_eq!(threads_max, threads0, "the thread count moved");

    let blast = read_json(&blast_json);
    assert_eq!(get_u64(&blast, "counts.messages_attempted"), N, "{blast}");
    assert_eq!(get_u64(&blast, "counts.messages_accepted"), N, "{blast}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (v, _) = scrape(sink.metrics);
        if v["counts"]["messages_accepted"] == N && v["open_connections"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sink never had them all: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut proc = sink.proc;
    proc.terminate();
    assert!(proc.wait(LIMIT).success());
    let report = read_json(&sink.json);
    assert_eq!(get_u64(&report, "counts.messages_accepted"), N, "{report}");
    for k in ["protocol_errors", "connection_errors", "timeouts"] {
        assert_eq!(get_u64(&report, &format!("counts.{k}")), 0, "{report}");
    }
}

#[test]
fn transfer_encoding_with_content_length_gets_400_and_a_close_and_nothing_after_it_is_parsed() {
    let sink = sink();
    for te in ["chunked, identity", "chunked", "identity", "gzip, chunked"] {
        let req = format!(
            "GET /stats HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {te}\r\nContent-Length: 37\r\n\r\n\
             GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        let r = exchange(sink.metrics, req.as_bytes()).expect("a 400 before the close");
        assert_eq!(r.status, 400, "{te}: {r:?}");
        assert!(r.head.contains("\r\nConnection: close"), "{r:?}");
        assert_eq!(
            r.body, "bad request\n",
            "one response, then the close: {r:?}"
        );
    }
    let r = exchange(
        sink.metrics,
        b"GET /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    )
    .unwrap();
    assert_eq!(r.status, 400, "{r:?}");
}

#[test]
fn a_64_kib_header_gets_431_and_a_line_that_never_ends_is_cut_off() {
    let sink = sink();
    let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.resize(64 << 10, b'b');
    big.extend_from_slice(b"\r\n\r\n");
    let r = exchange(sink.metrics, &big).expect("a 431");
    assert_eq!(r.status, 431, "{r:?}");
    let many: String = (0..200).map(|i| format!("X-{i}: y\r\n")).collect();
    let req = format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert_eq!(exchange(sink.metrics, req.as_bytes()).unwrap().status, 431);

    let rss0 = status_field(sink.proc.pid(), "VmRSS");
    let (sent, reply) = endless_header(sink.metrics, 64 << 20);
    let rss1 = status_field(sink.proc.pid(), "VmRSS");
    assert!(sent < 64 << 20, "the server took all of {sent} bytes");
    assert_refused(&reply, &[431]);
    assert!(rss1 < rss0 + 50 * 1024, "VmRSS {rss0} kB → {rss1} kB");
    assert_eq!(scrape(sink.metrics).0["role"], "sink");
}

#[test]
fn binary_garbage_gets_400_or_a_close() {
    let sink = sink();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for len in [1, 3, 17, 200, 5000, 20000] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let r = exchange(sink.metrics, &bytes);
        // One byte may be the start of a method: then it waits, and 408.
        assert_refused(&r, &[400, 408, 431]);
        if len > 1 {
            // Anything that is not a token in the first bytes is refused at
            // once: 400, not a wait for more.
            assert!(r.as_ref().is_none_or(|r| r.status == 400), "{r:?}");
        }
    }
    let r = exchange(sink.metrics, b"\0\0\0\0GET / HTTP/1.1\r\n\r\n");
    assert_refused(&r, &[400]);
    assert_eq!(scrape(sink.metrics).0["role"], "sink");
}

#[test]
fn methods_other_than_get_and_head_get_405_with_allow() {
    let sink = sink();
    for m in [
        "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "CONNECT", "PATCH", "BREW",
    ] {
        let req = format!("{m} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        let r = exchange(sink.metrics, req.as_bytes()).expect("a 405");
        assert_eq!(r.status, 405, "{m}: {r:?}");
        assert!(r.head.contains("\r\nAllow: GET, HEAD\r\n"), "{r:?}");
    }
}

#[test]
fn a_client_that_sends_nothing_gets_408_or_a_close_after_the_read_timeout() {
    let sink = sink();
    let t = Instant::now();
    let mut silent = TcpStream::connect_timeout(&sink.metrics, ANSWER_WITHIN).unwrap();
    let mut trickle = TcpStream::connect_timeout(&sink.metrics, ANSWER_WITHIN).unwrap();
    // The trickler sends a byte now and then: the deadline is for the whole
    // head, not between bytes.
    std::thread::scope(|sc| {
        let h = sc.spawn(move || {
            for b in b"GET /metrics HTTP/1.1\r\n".iter().cycle().take(40) {
                if trickle.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            read_reply(&mut trickle)
        });
        // Meanwhile scrapes are answered.
        assert_eq!(scrape(sink.metrics).0["role"], "sink");
        let r = read_reply(&mut silent);
        assert!(t.elapsed() >= READ_TIMEOUT, "{:?}", t.elapsed());
        assert_refused(&r, &[408]);
        let r = h.join().unwrap();
        assert_refused(&r, &[408]);
    });
}

#[test]
fn the_routes_answer_as_before_and_nothing_from_the_request_reaches_a_header() {
    let sink = sink();
    let m = get(sink.metrics, "/metrics");
    assert_eq!(m.status, 200);
    assert!(
        m.head
            .contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{m:?}"
    );
    assert!(
        m.body.contains("# TYPE smtpstorm_sessions_total counter\n"),
        "{m:?}"
    );
    let s = get(sink.metrics, "/stats?pretty=1");
    assert!(
        s.head.contains("\r\nContent-Type: application/json\r\n"),
        "{s:?}"
    );
    assert!(s.body.ends_with("}\n"));
    let root = get(sink.metrics, "/");
    assert_eq!(
        root.body,
        "smtpstorm metrics: /metrics (Prometheus text), /stats (JSON)\n"
    );
    let h = exchange(sink.metrics, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(h.status, 200);
    assert!(h.body.is_empty(), "{h:?}");
    assert!(h.head.contains("\r\nContent-Length: "), "{h:?}");
    let n = get(sink.metrics, "/x%0d%0aSet-Cookie:%20a=b\r\nX-Injected: 1");
    assert_eq!(n.status, 400, "a raw CR in the target: {n:?}");
    let n = get(sink.metrics, "/x%0d%0aSet-Cookie:%20a=b");
    assert_eq!(n.status, 404, "{n:?}");
    assert_eq!(n.body, "not found\n");
    assert!(!n.head.to_ascii_lowercase().contains("cookie"), "{n:?}");
}
