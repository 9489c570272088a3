//! The in-process sink API (`sink::start` / `RunningSink`) as `bench` uses
//! it: port 0 resolved for every thread, max-connections refusal, command
//! timeouts, delay faults, and counts in the summary. Loopback only; every
//! read has a timeout.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use smtpstorm::net::runtime::Cpus;
use smtpstorm::sink;

fn connect(addr: std::net::SocketAddr) -> (BufReader<TcpStream>, TcpStream) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (BufReader::new(s.try_clone().unwrap()), s)
}

#[track_caller]
fn reply(r: &mut BufReader<TcpStream>) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        all.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return all;
        }
    }
}

fn session(addr: std::net::SocketAddr, messages: usize) {
    let (mut r, mut w) = connect(addr);
    assert!(reply(&mut r).starts_with("220 "));
    w.write_all(b"EHLO t\r\n").unwrap();
    assert!(reply(&mut r).contains("250 "));
    for _ in 0..messages {
        w.write_all(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n")
            .unwrap();
        for _ in 0..4 {
            reply(&mut r);
        }
        w.write_all(b"Subject: t\r\n\r\n..dot\r\n.\r\n").unwrap();
        assert!(reply(&mut r).starts_with("250 "));
    }
    w.write_all(b"QUIT\r\n").unwrap();
    assert!(reply(&mut r).starts_with("221 "));
}

#[test]
fn port_zero_is_shared_by_every_thread_and_counts_add_up() {
    let mut cfg = smtpstorm::cli::sink::loopback();
    cfg.cpus = Cpus::Count(2);
    let s = sink::start(cfg).unwrap();
    let addr = s.plain_addrs()[0];
    assert_ne!(addr.port(), 0);
    for _ in 0..10 {
        session(addr, 3);
    }
    s.stop();
    let sum = s.wait().unwrap();
    let c = sum.report.counts;
    assert_eq!(c.sessions, 10);
    assert_eq!(c.messages_accepted, 30);
    assert_eq!(c.messages_attempted, 30);
    assert_eq!(c.recipients, 60);
    // "Subject: t\r\n\r\n.dot\r\n" un-stuffed.
    assert_eq!(c.bytes, 30 * 20);
}

#[test]
fn over_max_connections_gets_421_and_accepting_goes_on() {
    let mut cfg = smtpstorm::cli::sink::loopback();
    cfg.max_connections = 2;
    let s = sink::start(cfg).unwrap();
    let addr = s.plain_addrs()[0];
    let (mut r1, _w1) = connect(addr);
    let (mut r2, _w2) = connect(addr);
    assert!(reply(&mut r1).starts_with("220 "));
    assert!(reply(&mut r2).starts_with("220 "));
    let (mut r3, _w3) = connect(addr);
    assert!(reply(&mut r3).starts_with("421 4.7.0"));
    drop((r1, _w1));
    std::thread::sleep(Duration::from_millis(200));
    session(addr, 1);
    s.stop();
    let sum = s.wait().unwrap();
    assert_eq!(sum.report.reply_codes["connect"]["421"], 1);
    assert_eq!(sum.report.counts.messages_accepted, 1);
}

#[test]
fn idle_session_times_out_with_421_and_is_counted() {
    let mut cfg = smtpstorm::cli::sink::loopback();
    cfg.server.timeouts.command = Duration::from_millis(300);
    let s = sink::start(cfg).unwrap();
    let (mut r, _w) = connect(s.plain_addrs()[0]);
    assert!(reply(&mut r).starts_with("220 "));
    let t0 = Instant::now();
    assert!(reply(&mut r).starts_with("421 4.4.2"));
    assert!(t0.elapsed() >= Duration::from_millis(250));
    s.stop();
    let sum = s.wait().unwrap();
    assert_eq!(sum.report.counts.timeouts, 1);
    assert_eq!(sum.report.counts.sessions, 1);
}

#[test]
fn delay_fault_holds_the_reply_for_its_time() {
    let mut cfg = smtpstorm::cli::sink::loopback();
    cfg.faults = vec![smtpstorm::cli::parse_fault("ehlo:delay=300ms").unwrap()];
    let s = sink::start(cfg).unwrap();
    let (mut r, mut w) = connect(s.plain_addrs()[0]);
    assert!(reply(&mut r).starts_with("220 "));
    let t0 = Instant::now();
    w.write_all(b"EHLO t\r\nNOOP\r\n").unwrap();
    assert!(reply(&mut r).contains("250 "));
    assert!(
        t0.elapsed() >= Duration::from_millis(280),
        "{:?}",
        t0.elapsed()
    );
    assert!(reply(&mut r).starts_with("250 "));
    s.stop();
    s.wait().unwrap();
}

#[test]
fn exit_after_messages_stops_the_sink_by_itself() {
    let mut cfg = smtpstorm::cli::sink::loopback();
    cfg.exit_after_messages = Some(2);
    let s = sink::start(cfg).unwrap();
    session(s.plain_addrs()[0], 2);
    let t0 = Instant::now();
    let sum = s.wait().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(sum.report.counts.messages_accepted, 2);
}

#[test]
fn proxy_header_comes_before_the_greeting() {
    let mut cfg = smtpstorm::cli::sink::loopback();
    cfg.server.proxy_protocol = true;
    let s = sink::start(cfg).unwrap();
    let (mut r, mut w) = connect(s.plain_addrs()[0]);
    w.write_all(b"PROXY TCP4 192.0.2.1 192.0.2.2 40000 25\r\n").unwrap();
    assert!(reply(&mut r).starts_with("220 "));
    w.write_all(b"QUIT\r\n").unwrap();
    assert!(reply(&mut r).starts_with("221 "));
    s.stop();
    assert_eq!(s.wait().unwrap().report.counts.sessions, 1);
}

#[test]
fn lmtp_answers_once_per_recipient_after_data() {
    let mut cfg = smtpstorm::cli::sink::loopback();
    cfg.server.lmtp = true;
    let s = sink::start(cfg).unwrap();
    let (mut r, mut w) = connect(s.plain_addrs()[0]);
    assert!(reply(&mut r).starts_with("220 "));
    w.write_all(b"LHLO t\r\n").unwrap();
    assert!(reply(&mut r).contains("250 "));
    w.write_all(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n").unwrap();
    for _ in 0..4 {
        reply(&mut r);
    }
    w.write_all(b"Subject: t\r\n\r\nx\r\n.\r\n").unwrap();
    assert!(reply(&mut r).starts_with("250 "));
    assert!(reply(&mut r).starts_with("250 "));
    w.write_all(b"QUIT\r\n").unwrap();
    assert!(reply(&mut r).starts_with("221 "));
    s.stop();
    let c = s.wait().unwrap().report.counts;
    assert_eq!(c.messages_accepted, 1);
    assert_eq!(c.recipients, 2);
}
