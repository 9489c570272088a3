//! `smtpstorm sink` under hostile clients: raw `TcpStream` clients over
//! loopback that trickle, stall, send over-long or malformed lines, try
//! smuggling sequences, abuse STARTTLS, PROXY and BDAT, or flood the
//! listener. Each test runs the real binary with small timeouts and is
//! bounded in time; the sink must answer with the right code, keep the
//! session where RFC 5321 allows, close stalled peers at the timeout, and
//! never count one DATA as two messages (unless `--bare-lf accept`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, free_port, get_u64, read_json, wait_for_open_fds, wait_for_port, Proc};
use serde_json::Value;

struct Sink {
    proc: Proc,
    port: u16,
    json: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sink {
    fn start(extra: &[&str]) -> Sink {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("sink.json");
        let port = free_port();
        let mut cmd = Command::new(bin());
        cmd.args(["sink", "--threads", "1", "--quiet", "--grace", "1s"]);
        if !extra.contains(&"--command-timeout") {
            cmd.args(["--command-timeout", "1s"]);
        }
        cmd.args(["--data-timeout", "1s"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--json")
            .arg(&json)
            .args(extra)
            .stdout(Stdio::null());
        let proc = Proc::spawn("smtpstorm sink", &mut cmd);
        wait_for_port(
            format!("127.0.0.1:{port}").parse().unwrap(),
            Duration::from_secs(10),
        );
        Sink {
            proc,
            port,
            json,
            _dir: dir,
        }
    }

    #[track_caller]
    fn stop(mut self) -> Value {
        self.proc.terminate();
        let st = self.proc.wait(Duration::from_secs(10));
        assert!(st.success(), "sink exited with {st:?}");
        read_json(&self.json)
    }
}

struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
        Client { s, buf: Vec::new() }
    }

    fn greeted(port: u16) -> Client {
        let mut c = Client::connect(port);
        assert_eq!(c.code(), 220);
        c
    }

    fn send(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b);
    }

    /// One whole reply (multi-line joined), `EOF` when closed, `TIMEOUT` when silent.
    fn reply(&mut self) -> String {
        let mut out = String::new();
        loop {
            while let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                let line = String::from_utf8_lossy(&line).to_string();
                out.push_str(&line);
                if line.len() < 4 || line.as_bytes()[3] != b'-' {
                    return out;
                }
            }
            let mut tmp = [0u8; 4096];
            match self.s.read(&mut tmp) {
                Ok(0) => return out + "EOF",
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return out + "TIMEOUT"
                }
                Err(_) => return out + "EOF",
            }
        }
    }

    fn code(&mut self) -> u16 {
        let r = self.reply();
        r.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0)
    }

    #[track_caller]
    fn expect(&mut self, cmd: &[u8], code: u16) {
        self.send(cmd);
        let r = self.reply();
        assert!(
            r.starts_with(&code.to_string()),
            "{:?} -> {r:?}, expected {code}",
            String::from_utf8_lossy(cmd)
        );
    }

    /// Sends `cmd`; its reply must be one line starting with `status`
    /// (code and enhanced code, e.g. `500 5.5.2`).
    #[track_caller]
    fn expect_status(&mut self, cmd: &[u8], status: &str) {
        self.send(cmd);
        self.assert_status(status);
    }

    /// The next reply is one line starting with `status` and a space.
    #[track_caller]
    fn assert_status(&mut self, status: &str) {
        let r = self.reply();
        assert!(
            r.starts_with(&format!("{status} "))
                && r.ends_with("\r\n")
                && r.matches("\r\n").count() == 1,
            "got {r:?}, expected one `{status} ...` line"
        );
    }

    /// Waits (bounded) for the server to close; returns how long it took.
    fn closed_within(&mut self, within: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        let mut tmp = [0u8; 4096];
        self.s
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        while t0.elapsed() < within {
            match self.s.read(&mut tmp) {
                Ok(0) => return Some(t0.elapsed()),
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return Some(t0.elapsed()),
            }
        }
        None
    }
}

fn normal_session(port: u16) {
    let mut c = Client::greeted(port);
    c.expect(b"EHLO probe\r\n", 250);
    c.expect(b"MAIL FROM:<a@example.com>\r\n", 250);
    c.expect(b"RCPT TO:<b@example.com>\r\n", 250);
    c.expect(b"DATA\r\n", 354);
    c.expect(b"Subject: ok\r\n\r\nbody\r\n.\r\n", 250);
    c.expect(b"QUIT\r\n", 221);
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &st[st.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn silent_client_is_closed_at_the_command_timeout_while_a_normal_session_completes() {
    let sink = Sink::start(&[]);
    let mut silent = Client::greeted(sink.port);
    let t0 = Instant::now();
    normal_session(sink.port);
    let took = silent
        .closed_within(Duration::from_secs(5))
        .expect("silent client never closed");
    assert!(
        t0.elapsed() >= Duration::from_millis(800),
        "closed too early: {took:?}"
    );
    sink.stop();
}

#[test]
fn slowloris_sending_a_byte_at_a_time_is_closed_near_the_timeout() {
    let sink = Sink::start(&[]);
    let mut slow = Client::greeted(sink.port);
    let t0 = Instant::now();
    let mut closed = false;
    // One byte every 300 ms of a never-ending command line.
    while t0.elapsed() < Duration::from_secs(8) {
        if slow.s.write_all(b"x").is_err() {
            closed = true;
            break;
        }
        normal_session(sink.port);
        std::thread::sleep(Duration::from_millis(300));
        if slow.closed_within(Duration::from_millis(1)).is_some() {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a slowloris client was kept open for {:?}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "closed only after {:?}",
        t0.elapsed()
    );
    sink.stop();
}

#[test]
fn over_long_command_is_500_and_the_session_continues() {
    let sink = Sink::start(&[]);
    let mut c = Client::greeted(sink.port);
    c.expect(b"EHLO a\r\n", 250);
    let mut long = b"NOOP ".to_vec();
    long.extend(std::iter::repeat_n(b'x', 600));
    long.extend_from_slice(b"\r\n");
    c.expect_status(&long, "500 5.5.2");
    c.expect_status(b"NOOP\r\n", "250 2.0.0");
    sink.stop();
}

#[test]
fn a_line_split_across_writes_is_one_command() {
    let sink = Sink::start(&[]);
    let mut c = Client::greeted(sink.port);
    c.send(b"EH");
    std::thread::sleep(Duration::from_millis(100));
    c.send(b"LO a\r");
    std::thread::sleep(Duration::from_millis(100));
    c.expect(b"\n", 250);
    c.expect(b"NOOP\r\n", 250);
    sink.stop();
}

#[test]
fn nul_byte_in_a_command_is_rejected_and_the_session_continues() {
    let sink = Sink::start(&[]);
    let mut c = Client::greeted(sink.port);
    c.expect(b"EHLO a\r\n", 250);
    c.expect_status(b"NO\0OP\r\n", "500 5.5.2");
    c.expect_status(b"NOOP\r\n", "250 2.0.0");
    sink.stop();
}

#[test]
fn eight_bit_path_without_smtputf8_is_553_and_invalid_utf8_with_it_is_501() {
    let sink = Sink::start(&[]);
    let mut c = Client::greeted(sink.port);
    c.expect(b"EHLO a\r\n", 250);
    c.expect(b"MAIL FROM:<\xc3\xa9@example.com>\r\n", 553);
    c.expect(b"MAIL FROM:<\xff\xfe@example.com> SMTPUTF8\r\n", 501);
    c.expect(b"MAIL FROM:<\xc3\xa9@example.com> SMTPUTF8\r\n", 250);
    c.expect(b"RSET\r\n", 250);
    sink.stop();
}

#[test]
fn over_long_text_line_in_data_is_500_5_5_2_and_the_session_continues() {
    let sink = Sink::start(&[]);
    let mut c = Client::greeted(sink.port);
    c.expect(b"EHLO a\r\n", 250);
    c.expect(b"MAIL FROM:<a@example.com>\r\n", 250);
    c.expect(b"RCPT TO:<b@example.com>\r\n", 250);
    c.expect(b"DATA\r\n", 354);
    let mut body = b"Subject: long\r\n\r\n".to_vec();
    body.extend(std::iter::repeat_n(b'a', 2000));
    body.extend_from_slice(b"\r\n.\r\n");
    // DESIGN.md: over-long lines get 500 5.5.2 and the session continues.
    c.expect_status(&body, "500 5.5.2");
    c.expect_status(b"NOOP\r\n", "250 2.0.0");
    // The next transaction is not affected.
    c.expect(b"MAIL FROM:<a@example.com>\r\n", 250);
    c.expect(b"RCPT TO:<b@example.com>\r\n", 250);
    c.expect(b"DATA\r\n", 354);
    let mut ok = b"Subject: ok\r\n\r\n".to_vec();
    ok.extend(std::iter::repeat_n(b'a', 998));
    ok.extend_from_slice(b"\r\n.\r\n");
    c.expect_status(&ok, "250 2.0.0");
    let v = sink.stop();
    assert_eq!(get_u64(&v, "counts.messages_rejected"), 1);
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 1);
}

#[test]
fn oversized_message_is_552_and_the_sink_memory_stays_flat() {
    let sink = Sink::start(&["--max-message-size", "100KB"]);
    let pid = sink.proc.pid();
    let mut c = Client::greeted(sink.port);
    c.expect(b"EHLO a\r\n", 250);
    c.expect(b"MAIL FROM:<a@example.com>\r\n", 250);
    c.expect(b"RCPT TO:<b@example.com>\r\n", 250);
    c.expect(b"DATA\r\n", 354);
    let before = proc_status_kib(pid, "VmRSS:");
    let line = [b'z'; 998];
    let mut sent = 0usize;
    let mut chunk = Vec::with_capacity(64 * 1024);
    while sent < 5 * 1024 * 1024 {
        chunk.clear();
        for _ in 0..64 {
            chunk.extend_from_slice(&line);
            chunk.extend_from_slice(b"\r\n");
        }
        c.s.write_all(&chunk)
            .expect("sink stopped reading the oversized body");
        sent += chunk.len();
    }
    let during = proc_status_kib(pid, "VmRSS:");
    c.send(b".\r\n");
    let code = c.code();
    assert_eq!(code, 552, "oversized message");
    let after = proc_status_kib(pid, "VmRSS:");
    assert!(
        during.max(after) < before + 8 * 1024,
        "RSS grew from {before} KiB to {during}/{after} KiB"
    );
    c.expect(b"NOOP\r\n", 250);
    let v = sink.stop();
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 0);
}

/// Sends one DATA containing a smuggling sequence followed by a pipelined
/// `MAIL FROM` / `RCPT` / `DATA`, then the real end. The replies to it must
/// be exactly `want` (status of each: code and enhanced code), and nothing
/// more: the next reply is the one to a NOOP. Returns messages accepted.
#[track_caller]
fn smuggle(mode: &str, seq: &[u8], want: &[&str]) -> u64 {
    let sink = Sink::start(&["--bare-lf", mode]);
    let mut c = Client::greeted(sink.port);
    c.expect(b"EHLO a\r\n", 250);
    c.expect(b"MAIL FROM:<a@example.com>\r\n", 250);
    c.expect(b"RCPT TO:<b@example.com>\r\n", 250);
    c.expect(b"DATA\r\n", 354);
    let mut body = b"Subject: s\r\n\r\nhello".to_vec();
    body.extend_from_slice(seq);
    body.extend_from_slice(
        b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n",
    );
    c.send(&body);
    let replies: Vec<String> = (0..want.len()).map(|_| c.reply()).collect();
    for (r, w) in replies.iter().zip(want) {
        assert!(
            r.starts_with(&format!("{w} ")) && r.ends_with("\r\n"),
            "--bare-lf {mode}, probe {seq:?}: replies {replies:?}, expected {want:?}"
        );
    }
    c.send(b"NOOP\r\n");
    let next = c.reply();
    assert_eq!(
        next, "250 2.0.0 OK\r\n",
        "--bare-lf {mode}, probe {seq:?}: a reply past {want:?}"
    );
    let v = sink.stop();
    get_u64(&v, "counts.messages_accepted")
}

const PROBES: [&[u8]; 5] = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r\r\n"];

#[test]
fn smuggling_probes_under_reject_are_refused_whole() {
    for seq in PROBES {
        let n = smuggle("reject", seq, &["550 5.5.2"]);
        assert_eq!(n, 0, "reject mode, probe {seq:?}: {n} messages accepted");
    }
}

#[test]
fn smuggling_probes_under_normalize_are_one_message() {
    for seq in PROBES {
        let n = smuggle("normalize", seq, &["250 2.0.0"]);
        assert_eq!(
            n, 1,
            "normalize mode, probe {seq:?}: {n} messages from one DATA"
        );
    }
}

#[test]
fn smuggling_probes_under_accept_split_only_on_lf_dot_lf_and_lf_dot_crlf() {
    for seq in PROBES {
        let splits = seq == b"\n.\n" || seq == b"\n.\r\n";
        let want: &[&str] = if splits {
            &["250 2.0.0", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
        } else {
            &["250 2.0.0"]
        };
        let n = smuggle("accept", seq, want);
        assert_eq!(n, if splits { 2 } else { 1 }, "accept mode, probe {seq:?}");
    }
}

/// One whole reply read from `r` (multi-line joined), `EOF` when closed.
fn read_reply(r: &mut impl Read, buf: &mut Vec<u8>) -> String {
    let mut out = String::new();
    loop {
        while let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = buf.drain(..i + 2).collect();
            let line = String::from_utf8_lossy(&line).to_string();
            out.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return out;
            }
        }
        let mut tmp = [0u8; 4096];
        match r.read(&mut tmp) {
            Ok(0) | Err(_) => return out + "EOF",
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

#[test]
fn starttls_drops_pipelined_plaintext() {
    let sink = Sink::start(&[]);
    let mut c = Client::greeted(sink.port);
    c.expect(b"EHLO a\r\n", 250);
    c.send(b"STARTTLS\r\nMAIL FROM:<a@example.com>\r\nNOOP\r\n");
    // RFC 3207 and DESIGN.md: 220, then the plaintext behind STARTTLS is
    // dropped (CVE-2011-0411), not answered and not fed to TLS.
    c.assert_status("220 2.0.0");
    assert!(c.buf.is_empty(), "plaintext after the 220: {:?}", c.buf);
    c.s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut tmp = [0u8; 64];
    match c.s.read(&mut tmp) {
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("expected silence while the sink awaits a ClientHello, got {other:?}"),
    }
    // The handshake works: the dropped bytes were not taken for TLS.
    c.s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
    let cfg = smtpstorm::net::tls::client_config(&smtpstorm::net::tls::ClientVerify::Off, 0, &Default::default())
        .expect("client config");
    let name = smtpstorm::net::tls::server_name("localhost").unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, c.s);
    let mut buf = Vec::new();
    tls.write_all(b"EHLO b\r\n").unwrap();
    // The first reply over TLS is the EHLO's: no answer to the NOOP waits.
    let ehlo = read_reply(&mut tls, &mut buf);
    assert!(
        ehlo.starts_with("250-") && !ehlo.contains("STARTTLS"),
        "{ehlo:?}"
    );
    // The pipelined MAIL FROM did not open a transaction.
    tls.write_all(b"RCPT TO:<b@example.com>\r\n").unwrap();
    let rcpt = read_reply(&mut tls, &mut buf);
    assert!(rcpt.starts_with("503 5.5.1 "), "{rcpt:?}");
    tls.write_all(b"QUIT\r\n").unwrap();
    let quit = read_reply(&mut tls, &mut buf);
    assert!(quit.starts_with("221 "), "{quit:?}");
    let v = sink.stop();
    assert_eq!(get_u64(&v, "counts.tls_sessions"), 1);
    assert!(
        v["reply_codes"].get("mail").is_none() && v["reply_codes"].get("noop").is_none(),
        "plaintext after STARTTLS was answered: {}",
        v["reply_codes"]
    );
}

#[test]
fn tls_garbage_after_starttls_closes_the_session_and_service_continues() {
    let sink = Sink::start(&[]);
    let mut c = Client::greeted(sink.port);
    c.expect(b"EHLO a\r\n", 250);
    c.expect(b"STARTTLS\r\n", 220);
    c.send(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00]);
    c.send(b"garbage garbage garbage\r\n");
    assert!(
        c.closed_within(Duration::from_secs(4)).is_some(),
        "TLS garbage not closed"
    );
    normal_session(sink.port);
    sink.stop();
}

#[test]
fn tls_client_that_stops_mid_handshake_is_closed_at_the_timeout() {
    let sink = Sink::start(&[]);
    let mut c = Client::greeted(sink.port);
    c.expect(b"EHLO a\r\n", 250);
    c.expect(b"STARTTLS\r\n", 220);
    // A ClientHello record header announcing 512 bytes, then 4 of them.
    c.send(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]);
    let took = c.closed_within(Duration::from_secs(5));
    assert!(took.is_some(), "half-handshake never closed");
    normal_session(sink.port);
    sink.stop();
}

#[test]
fn proxy_headers_that_lie_about_lengths_are_closed_without_a_session() {
    let sink = Sink::start(&["--proxy-protocol"]);
    // v2 header announcing 0xffff bytes of addresses, then only 4.
    let mut c = Client::connect(sink.port);
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff, 1, 2, 3, 4]);
    c.send(&v2);
    let r = c.reply();
    assert_eq!(r, "EOF", "lying v2 header got an answer");
    assert!(
        c.closed_within(Duration::from_secs(4)).is_some(),
        "lying v2 header not closed"
    );
    // v2 header announcing fewer bytes than an IPv4 address block needs.
    let mut c = Client::connect(sink.port);
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[0x21, 0x11, 0x00, 0x02, 1, 2]);
    c.send(&v2);
    let r = c.reply();
    assert_eq!(r, "EOF", "short v2 header got an answer");
    // v1 line longer than 107 bytes without CRLF.
    let mut c = Client::connect(sink.port);
    let mut v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2".to_vec();
    v1.extend(std::iter::repeat_n(b' ', 200));
    c.send(&v1);
    let r = c.reply();
    assert_eq!(r, "EOF", "over-long v1 header got an answer");
    // A good header still works.
    let mut c = Client::connect(sink.port);
    c.send(b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 25\r\n");
    assert_eq!(c.code(), 220);
    c.expect(b"EHLO a\r\n", 250);
    sink.stop();
}

#[test]
fn bdat_with_bad_sizes_mixed_with_data_or_after_a_rejected_chunk_is_refused() {
    let sink = Sink::start(&["--max-message-size", "1000"]);
    let mut c = Client::greeted(sink.port);
    c.expect(b"EHLO a\r\n", 250);
    c.expect(b"MAIL FROM:<a@example.com>\r\n", 250);
    c.expect(b"RCPT TO:<b@example.com>\r\n", 250);
    c.expect_status(b"BDAT abc\r\n", "501 5.5.4");
    c.expect_status(b"BDAT 99999999999999999999999 LAST\r\n", "501 5.5.4");
    // BDAT then DATA in the same transaction.
    c.expect(b"BDAT 5\r\nhello", 250);
    c.expect_status(b"DATA\r\n", "503 5.5.1");
    c.expect(b"BDAT 0 LAST\r\n", 250);
    // A chunk past the size limit, then more chunks.
    c.expect(b"MAIL FROM:<a@example.com>\r\n", 250);
    c.expect(b"RCPT TO:<b@example.com>\r\n", 250);
    let mut big = b"BDAT 2000\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'x', 2000));
    c.expect_status(&big, "552 5.3.4");
    // RFC 3030: the transaction failed; a chunk still in the pipeline is
    // read (its 5 octets are not taken for a command) and refused.
    c.expect_status(b"BDAT 5 LAST\r\nhello", "503 5.5.1");
    c.expect_status(b"RSET\r\n", "250 2.0.0");
    c.expect(b"NOOP\r\n", 250);
    let v = sink.stop();
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 1);
}

#[test]
fn connection_flood_past_max_connections_is_421_without_busy_looping_and_recovers() {
    let sink = Sink::start(&["--max-connections", "20", "--command-timeout", "30s"]);
    let pid = sink.proc.pid();
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(Client::greeted(sink.port));
    }
    let mut refused = 0;
    for _ in 0..30 {
        let mut c = Client::connect(sink.port);
        let r = c.reply();
        if r.starts_with("421") || r.starts_with("EOF") {
            refused += 1;
        }
        held.push(c);
    }
    assert_eq!(refused, 30, "connections past the limit were served");
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - t0;
    // CLK_TCK is 100 on Linux: 20 ticks = 20% of a core over one second.
    assert!(
        used < 20,
        "sink used {used} ticks/s holding 50 idle connections"
    );
    held.clear();
    // The sink frees the slots as it sees the closes: wait (bounded) for a
    // greeting instead of guessing how long that takes.
    let t0 = Instant::now();
    loop {
        let mut c = Client::connect(sink.port);
        let r = c.reply();
        if r.starts_with("220 ") {
            c.expect(b"QUIT\r\n", 221);
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "still {r:?} 10 s after the held connections closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    normal_session(sink.port);
    sink.stop();
}

#[test]
fn fd_exhaustion_does_not_busy_loop_and_service_resumes_when_connections_drop() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("sink.json");
    let port = free_port();
    let script = format!(
        "ulimit -n 32 && exec {} sink --threads 1 --quiet --grace 1s --command-timeout 30s \
         --listen 127.0.0.1:{port} --json {}",
        bin().display(),
        json.display()
    );
    let mut proc = Proc::spawn(
        "sink (ulimit -n 32)",
        Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::null()),
    );
    wait_for_port(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(10),
    );
    let pid = proc.pid();
    // More connections than descriptors: some are served, the rest wait in
    // the backlog or are refused.
    let mut held = Vec::new();
    for _ in 0..48 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            held.push(s);
        }
    }
    // Measure once the sink holds all 32 descriptors.
    wait_for_open_fds(pid, 32, Duration::from_secs(10));
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - t0;
    assert!(used < 20, "sink used {used} ticks/s out of descriptors");
    held.clear();
    // The connection waits in the backlog until descriptors are free; the
    // read timeout bounds that wait.
    let t0 = Instant::now();
    let mut c = Client::connect(port);
    c.s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    assert_eq!(
        c.code(),
        220,
        "no greeting {:?} after descriptors were freed",
        t0.elapsed()
    );
    c.expect(b"QUIT\r\n", 221);
    normal_session(port);
    proc.terminate();
    assert!(proc.wait(Duration::from_secs(10)).success());
}
