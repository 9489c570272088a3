//! `sink --capture` with a body far over `--max-message-size`: the sink
//! answers 552, stores nothing, and never holds the body in memory (its
//! peak RSS stays flat), while a message within the limit is still captured
//! byte for byte.

mod common;
mod sinkproc;

use std::io::Write;

use common::get_u64;
use sinkproc::{Client, Sink};

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

fn captured(dir: &std::path::Path) -> Vec<Vec<u8>> {
    std::fs::read_dir(dir.join("new"))
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect()
}

#[test]
fn capture_never_buffers_a_body_past_the_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("maildir");
    let sink = Sink::start(&[
        "--capture",
        cap.to_str().unwrap(),
        "--max-message-size",
        "64KiB",
    ]);
    let pid = sink.proc.pid();
    let mut c = Client::greeted(sink.port);
    c.expect(b"EHLO a\r\n", 250);
    c.expect(b"MAIL FROM:<a@example.com>\r\n", 250);
    c.expect(b"RCPT TO:<b@example.com>\r\n", 250);
    c.expect(b"DATA\r\n", 354);
    let peak_before = proc_status_kib(pid, "VmHWM:");
    let mut chunk = Vec::with_capacity(64 * 1024);
    for _ in 0..64 {
        chunk.extend_from_slice(&[b'z'; 998]);
        chunk.extend_from_slice(b"\r\n");
    }
    let body_bytes = 24 * 1024 * 1024;
    let mut sent = 0usize;
    while sent < body_bytes {
        c.s.write_all(&chunk)
            .expect("the sink stopped reading the oversized body");
        sent += chunk.len();
    }
    c.send(b".\r\n");
    let r = c.reply();
    assert!(r.starts_with("552 5.3.4 "), "oversized message: {r:?}");
    let peak_after = proc_status_kib(pid, "VmHWM:");
    assert!(
        peak_after < peak_before + 8 * 1024,
        "peak RSS rose from {peak_before} KiB to {peak_after} KiB for a {} KiB body \
         refused at 64 KiB",
        sent / 1024
    );
    assert!(captured(&cap).is_empty(), "a refused body was captured");

    // A message within the limit is still kept, exactly.
    c.expect(b"MAIL FROM:<a@example.com>\r\n", 250);
    c.expect(b"RCPT TO:<b@example.com>\r\n", 250);
    c.expect(b"DATA\r\n", 354);
    c.expect(b"Subject: kept\r\n\r\n..dot\r\nbody\r\n.\r\n", 250);
    c.expect(b"QUIT\r\n", 221);
    let v = sink.stop();
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 1);
    assert_eq!(get_u64(&v, "counts.messages_rejected"), 1);
    assert_eq!(
        captured(&cap),
        vec![b"Subject: kept\r\n\r\n.dot\r\nbody\r\n".to_vec()]
    );
}
