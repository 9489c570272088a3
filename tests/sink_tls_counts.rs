//! `counts.tls_sessions` and `counts.tls_resumed` of `smtpstorm sink`
//! against real TLS clients: raw sockets that send garbage instead of a
//! handshake, `openssl s_client` with a cipher the sink cannot agree to, and
//! `openssl s_client -sess_out` / `-sess_in` resumption. Only completed
//! handshakes are TLS sessions; resumed ones are counted apart.

mod common;
mod sinkproc;

use std::io::Write;
use std::time::Duration;

use common::{free_port, get_u64, openssl_starttls};
use sinkproc::{Client, Sink};

#[test]
fn failed_handshakes_are_not_tls_sessions_and_a_completed_one_is() {
    let tls_port = free_port();
    let tls_listen = format!("127.0.0.1:{tls_port}");
    let sink = Sink::start(&["--tls-listen", &tls_listen, "--command-timeout", "5s"]);

    // Implicit TLS: garbage instead of a ClientHello.
    let mut c = Client::connect(tls_port);
    c.send(b"EHLO this is not TLS\r\n");
    assert!(
        c.read_to_eof(Duration::from_secs(4)).is_some(),
        "the sink kept a failed implicit-TLS handshake open"
    );

    // STARTTLS, then garbage.
    let mut c = Client::greeted(sink.port);
    c.expect(b"EHLO a\r\n", 250);
    c.expect(b"STARTTLS\r\n", 220);
    c.send(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00]);
    assert!(c.read_to_eof(Duration::from_secs(4)).is_some());

    // STARTTLS from openssl offering only a cipher suite rustls lacks
    // (TLS 1.2, RSA key exchange, CBC).
    let (ok, text) = openssl_starttls(&sink.addr(), &["-tls1_2", "-cipher", "AES128-SHA"]);
    assert!(
        !ok || !text.contains("Cipher is AES128-SHA"),
        "the impossible cipher was negotiated: {text}"
    );

    // One handshake that completes.
    let (ok, text) = openssl_starttls(&sink.addr(), &[]);
    assert!(ok && text.contains("221 "), "good session: {text}");

    let v = sink.stop();
    let counts = &v["counts"];
    assert_eq!(get_u64(&v, "counts.sessions"), 4, "{counts}");
    assert_eq!(get_u64(&v, "counts.tls_sessions"), 1, "{counts}");
    assert_eq!(get_u64(&v, "counts.tls_resumed"), 0, "{counts}");
}

#[test]
fn an_openssl_session_resumed_with_sess_in_counts_as_tls_resumed() {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let sess = dir.path().join("session.pem");
    let sess = sess.to_str().unwrap();
    let (ok, first) = openssl_starttls(&sink.addr(), &["-sess_out", sess]);
    assert!(ok && first.contains("New, TLS"), "first session: {first}");
    let (ok, second) = openssl_starttls(&sink.addr(), &["-sess_in", sess]);
    assert!(
        ok && second.contains("Reused, TLS"),
        "second session: {second}"
    );
    let v = sink.stop();
    let counts = &v["counts"];
    assert_eq!(get_u64(&v, "counts.sessions"), 2, "{counts}");
    assert_eq!(get_u64(&v, "counts.tls_sessions"), 2, "{counts}");
    assert_eq!(get_u64(&v, "counts.tls_resumed"), 1, "{counts}");
}

/// Both sides count completed and resumed handshakes the same way: the
/// blaster resumes every session after the first one its thread made.
#[test]
fn the_blaster_and_the_sink_agree_on_tls_and_resumed_sessions() {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (code, v, err) = common::blast(
        dir.path(),
        &[&sink.addr(), "-n", "30", "-c", "1", "--threads", "1", "--starttls", "--tls-resume"],
    );
    assert_eq!(code, 0, "{err}");
    let s = sink.stop();
    for (who, r) in [("blast", &v), ("sink", &s)] {
        assert_eq!(get_u64(r, "counts.sessions"), 30, "{who}: {}", r["counts"]);
        assert_eq!(get_u64(r, "counts.tls_sessions"), 30, "{who}: {}", r["counts"]);
        assert_eq!(get_u64(r, "counts.tls_resumed"), 29, "{who}: {}", r["counts"]);
    }
}

/// A handshake the blaster could not complete is no TLS session.
#[test]
fn a_blaster_handshake_that_fails_is_not_a_tls_session() {
    // A server that answers 220 to STARTTLS, then sends garbage.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming().take(3) {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                use std::io::{BufRead, BufReader};
                let _ = s.write_all(b"220 x ESMTP\r\n");
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                    let up = line.to_ascii_uppercase();
                    let reply: &[u8] = if up.starts_with("EHLO") {
                        b"250-x\r\n250 STARTTLS\r\n"
                    } else if up.starts_with("STARTTLS") {
                        b"220 go\r\nthis is not TLS\r\n"
                    } else {
                        b"250 ok\r\n"
                    };
                    let _ = s.write_all(reply);
                    line.clear();
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (code, v, err) = common::blast(dir.path(), &[&addr, "-n", "3", "-c", "1", "--starttls"]);
    assert_eq!(code, 4, "nothing accepted: {err}");
    assert_eq!(get_u64(&v, "counts.sessions"), 3, "{}", v["counts"]);
    assert_eq!(get_u64(&v, "counts.tls_sessions"), 0, "{}", v["counts"]);
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 0);
}
