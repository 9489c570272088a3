//! `smtpstorm blast` against hostile servers: tiny `TcpListener` servers in
//! test threads that never greet, close mid-DATA, send garbage or truncated
//! multi-line replies, answer 421 mid-session, or stop reading. Each run must
//! end within a small multiple of `--timeout 1s`, exit 0 (errors are results,
//! not failures), attribute the message to the right outcome, and keep its
//! totals consistent (attempted == sum of outcomes).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, get_u64, read_json, run};
use serde_json::Value;

const OUTCOMES: [&str; 6] = [
    "messages_accepted",
    "messages_tempfailed",
    "messages_rejected",
    "connection_errors",
    "timeouts",
    "protocol_errors",
];

/// Serves every accepted connection with `script` on its own thread.
fn server(script: fn(TcpStream)) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().take(16).flatten() {
            std::thread::spawn(move || script(s));
        }
    });
    port
}

/// Answers a normal SMTP dialogue until a command starting with `stop`
/// (case-insensitive) arrives; returns the reader positioned after it,
/// or `None` if the client went away.
fn serve_until(s: &TcpStream, stop: &str) -> Option<BufReader<TcpStream>> {
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    w.write_all(b"220 hostile ESMTP\r\n").ok()?;
    let mut line = String::new();
    let mut in_data = false;
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if in_data {
            if line == ".\r\n" {
                in_data = false;
                w.write_all(b"250 ok\r\n").ok()?;
            }
            continue;
        }
        let up = line.to_ascii_uppercase();
        if up.starts_with(stop) {
            return Some(r);
        }
        let reply: &[u8] = if up.starts_with("EHLO") {
            b"250-hostile\r\n250 PIPELINING\r\n"
        } else if up.starts_with("DATA") {
            in_data = true;
            b"354 go\r\n"
        } else if up.starts_with("QUIT") {
            let _ = w.write_all(b"221 bye\r\n");
            return None;
        } else {
            b"250 ok\r\n"
        };
        w.write_all(reply).ok()?;
    }
}

/// Runs `blast` against `port` with the given extra flags; checks the exit
/// code, the time bound and the totals; returns the JSON report.
#[track_caller]
fn blast(port: u16, messages: u64, extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("blast.json");
    let t0 = Instant::now();
    let out = run(
        "blast",
        Command::new(bin())
            .args(["blast", &format!("127.0.0.1:{port}")])
            .args([
                "--messages",
                &messages.to_string(),
                "-c",
                "1",
                "--threads",
                "1",
            ])
            .args(["--timeout", "1s", "--quiet", "--pipelining", "off"])
            .args(extra)
            .arg("--json")
            .arg(&json),
        Duration::from_secs(20),
    );
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "blast took {took:?} with --timeout 1s"
    );
    let v = read_json(&json);
    // A run in which nothing was accepted is a failed run (exit 4).
    let want = if get_u64(&v, "counts.messages_accepted") == 0 { 4 } else { 0 };
    assert_eq!(
        out.status.code(),
        Some(want),
        "blast exit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if want == 4 {
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("accepted none of"),
            "stderr says why: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sum: u64 = OUTCOMES
        .iter()
        .map(|k| get_u64(&v, &format!("counts.{k}")))
        .sum();
    assert_eq!(
        get_u64(&v, "counts.messages_attempted"),
        messages,
        "{}",
        v["counts"]
    );
    assert_eq!(sum, messages, "outcomes do not add up: {}", v["counts"]);
    v
}

fn count(v: &Value, k: &str) -> u64 {
    get_u64(v, &format!("counts.{k}"))
}

#[test]
fn server_that_never_greets_is_a_timeout() {
    let port = server(|s| {
        std::thread::sleep(Duration::from_secs(10));
        drop(s);
    });
    let v = blast(port, 1, &[]);
    assert_eq!(count(&v, "timeouts"), 1, "{}", v["counts"]);
}

#[test]
fn server_closing_mid_data_is_a_connection_error() {
    let port = server(|s| {
        if let Some(mut r) = serve_until(&s, "DATA") {
            let mut w = s.try_clone().unwrap();
            let _ = w.write_all(b"354 go\r\n");
            let mut line = String::new();
            let _ = r.read_line(&mut line);
        }
    });
    let v = blast(port, 1, &["--size", "64KiB"]);
    assert_eq!(count(&v, "connection_errors"), 1, "{}", v["counts"]);
}

#[test]
fn garbage_greeting_is_a_protocol_error() {
    let port = server(|mut s| {
        let _ = s.write_all(b"hello, I am not an SMTP server\r\n");
        std::thread::sleep(Duration::from_secs(3));
    });
    let v = blast(port, 1, &[]);
    assert_eq!(count(&v, "messages_accepted"), 0);
    assert_eq!(count(&v, "protocol_errors"), 1, "{}", v["counts"]);
}

#[test]
fn garbage_reply_mid_session_is_a_protocol_error() {
    let port = server(|s| {
        if serve_until(&s, "MAIL").is_some() {
            let mut w = s.try_clone().unwrap();
            let _ = w.write_all(b"2x0 what\r\n\x00\xff\r\n");
            std::thread::sleep(Duration::from_secs(3));
        }
    });
    let v = blast(port, 1, &[]);
    assert_eq!(count(&v, "protocol_errors"), 1, "{}", v["counts"]);
}

#[test]
fn truncated_multiline_reply_then_close_is_not_accepted() {
    let port = server(|s| {
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let _ = w.write_all(b"220 hostile ESMTP\r\n");
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = w.write_all(b"250-hostile\r\n250-PIPELINING\r\n250-SIZ");
    });
    let v = blast(port, 1, &[]);
    assert_eq!(count(&v, "messages_accepted"), 0);
    // Regression: the last bytes and the FIN arrive in one epoll edge; the
    // blaster used to stop after the short read and wait out the timeout.
    assert_eq!(count(&v, "connection_errors"), 1, "{}", v["counts"]);
}

#[test]
fn reply_421_mid_session_tempfails_every_message_left() {
    let port = server(|s| {
        if serve_until(&s, "RCPT").is_some() {
            let mut w = s.try_clone().unwrap();
            let _ = w.write_all(b"421 4.3.2 shutting down\r\n");
        }
    });
    let v = blast(port, 3, &["-k", "3"]);
    assert_eq!(count(&v, "messages_accepted"), 0);
    assert!(count(&v, "messages_tempfailed") >= 1, "{}", v["counts"]);
}

#[test]
fn server_that_stops_reading_a_big_message_is_a_timeout() {
    let port = server(|s| {
        if serve_until(&s, "DATA").is_some() {
            let mut w = s.try_clone().unwrap();
            let _ = w.write_all(b"354 go\r\n");
            // Never read again; hold the socket open.
            std::thread::sleep(Duration::from_secs(10));
        }
    });
    let v = blast(port, 1, &["--size", "16MiB"]);
    assert_eq!(count(&v, "timeouts"), 1, "{}", v["counts"]);
}
