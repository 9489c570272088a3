//! Half-closed and aborted connections against `smtpstorm sink` over real
//! sockets: a client that shuts its write side gets the replies to what it
//! sent and then the sink closes at once (no CLOSE_WAIT until the command
//! timeout), the session counted once; clients that abort mid-DATA free
//! their `--max-connections` slot.
//!
//! The sink's command and data timeouts are minutes here, the waits a few
//! seconds: a socket left open until a timeout fails the test.

mod common;
mod sinkproc;

use std::time::{Duration, Instant};

use common::get_u64;
use sinkproc::{normal_session, Client, Sink};

/// Far beyond every wait of these tests.
const LONG: &str = "10m";
/// How long the sink may take to notice a FIN.
const PROMPT: Duration = Duration::from_secs(3);

#[test]
fn mail_sent_with_a_half_close_is_answered_then_the_sink_closes_at_once() {
    let sink = Sink::start(&[
        "--command-timeout",
        LONG,
        "--data-timeout",
        LONG,
        "--exit-after-sessions",
        "1",
    ]);
    let mut c = Client::greeted(sink.port);
    c.expect(b"EHLO halfclose.test\r\n", 250);
    // The command and the FIN leave together: one edge on the sink's side.
    c.send(b"MAIL FROM:<a@b.c>\r\n");
    c.half_close();
    let t0 = Instant::now();
    let rest = c
        .read_to_eof(PROMPT)
        .unwrap_or_else(|| panic!("the sink kept the half-closed socket open for {PROMPT:?}"));
    assert_eq!(rest, "250 2.1.0 Sender OK\r\n", "after {:?}", t0.elapsed());
    let v = sink.finish();
    assert_eq!(get_u64(&v, "counts.sessions"), 1, "{}", v["counts"]);
    assert_eq!(
        get_u64(&v, "counts.connection_errors"),
        0,
        "{}",
        v["counts"]
    );
    assert_eq!(get_u64(&v, "reply_codes.mail.250"), 1);
}

#[test]
fn pipelined_commands_with_a_half_close_are_all_answered_before_the_close() {
    let sink = Sink::start(&["--command-timeout", LONG, "--exit-after-sessions", "1"]);
    let mut c = Client::greeted(sink.port);
    c.send(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nbody\r\n.\r\n");
    c.half_close();
    let rest = c
        .read_to_eof(PROMPT)
        .unwrap_or_else(|| panic!("the sink kept the half-closed socket open for {PROMPT:?}"));
    let codes: Vec<&str> = rest
        .split("\r\n")
        .filter(|l| l.len() >= 4 && l.as_bytes()[3] == b' ')
        .map(|l| &l[..3])
        .collect();
    assert_eq!(codes, ["250", "250", "250", "354", "250"], "{rest:?}");
    let v = sink.finish();
    assert_eq!(get_u64(&v, "counts.sessions"), 1);
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 1);
    assert_eq!(get_u64(&v, "counts.connection_errors"), 0);
}

#[test]
fn a_reply_held_by_a_delay_fault_still_reaches_a_client_that_half_closed() {
    let sink = Sink::start(&[
        "--command-timeout",
        LONG,
        "--fault",
        "mail:delay=300ms",
        "--exit-after-sessions",
        "1",
    ]);
    let mut c = Client::greeted(sink.port);
    c.expect(b"EHLO x\r\n", 250);
    c.send(b"MAIL FROM:<a@b.c>\r\nRSET\r\n");
    c.half_close();
    let rest = c.read_to_eof(PROMPT).expect("closed after the delay");
    assert_eq!(rest, "250 2.1.0 Sender OK\r\n250 2.0.0 OK\r\n");
    let v = sink.finish();
    assert_eq!(get_u64(&v, "counts.sessions"), 1);
}

/// Opens a transaction, sends part of a body, then aborts: `half` shuts the
/// write side (and checks the sink closes promptly), otherwise drops the
/// socket (a plain close).
fn abort_mid_data(port: u16, half: bool) {
    let mut c = Client::greeted(port);
    c.expect(b"EHLO aborter\r\n", 250);
    c.expect(b"MAIL FROM:<a@b.c>\r\n", 250);
    c.expect(b"RCPT TO:<d@e.f>\r\n", 250);
    c.expect(b"DATA\r\n", 354);
    c.send(b"Subject: never finished\r\n\r\nhalf a bo");
    if half {
        c.half_close();
        assert!(
            c.read_to_eof(PROMPT).is_some(),
            "the sink kept a connection aborted mid-DATA open"
        );
    }
}

#[test]
fn clients_aborting_mid_data_do_not_pin_max_connections_slots() {
    let sink = Sink::start(&[
        "--command-timeout",
        LONG,
        "--data-timeout",
        LONG,
        "--max-connections",
        "2",
    ]);
    abort_mid_data(sink.port, true);
    abort_mid_data(sink.port, false);
    abort_mid_data(sink.port, false);
    // Both slots were taken by aborted sessions; a new client must be served
    // well before any timeout. Retry (bounded) while the sink may not have
    // read the last FIN yet.
    let deadline = Instant::now() + PROMPT;
    let mut refused = 0;
    let mut c = loop {
        let mut c = Client::connect(sink.port);
        let r = c.reply();
        if r.starts_with("220 ") {
            break c;
        }
        assert!(r.starts_with("421 "), "greeting {r:?}");
        refused += 1;
        assert!(
            Instant::now() < deadline,
            "still refused after {PROMPT:?}: aborted sessions pin the slots"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    normal_session(&mut c);
    let v = sink.stop();
    assert_eq!(get_u64(&v, "counts.sessions"), 4, "{}", v["counts"]);
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 1);
    assert_eq!(get_u64(&v, "counts.connection_errors"), 3);
    assert_eq!(
        v["reply_codes"]["connect"]["421"].as_u64().unwrap_or(0),
        refused
    );
}
