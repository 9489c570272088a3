//! Loopback tests of `net::conn::Conn`: plaintext echo, implicit TLS,
//! a STARTTLS switch with pipelined junk (CVE-2011-0411) and session
//! resumption. Both ends run on the test thread around one `mio::Poll`; every
//! loop is bounded by a deadline so a bug fails the test instead of hanging.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use smtpstorm::net::conn::{Conn, ReadResult};
use smtpstorm::net::{socket, tls};

const DEADLINE: Duration = Duration::from_secs(20);

struct Side {
    conn: Conn,
    token: Token,
    rx: Vec<u8>,
    eof: bool,
    handshakes: usize,
    echo: bool,
}

impl Side {
    fn new(poll: &Poll, mut conn: Conn, token: usize) -> Side {
        let token = Token(token);
        conn.register(poll.registry(), token).unwrap();
        Side {
            conn,
            token,
            rx: Vec::new(),
            eof: false,
            handshakes: 0,
            echo: false,
        }
    }

    /// Reads until WouldBlock/Eof, echoing if asked, then flushes and
    /// re-registers if the interest changed.
    fn pump(&mut self, poll: &Poll) -> io::Result<()> {
        while !self.eof {
            match self.conn.read()? {
                ReadResult::Data => {
                    let chunk = self.conn.plaintext().to_vec();
                    assert!(!chunk.is_empty());
                    if self.echo {
                        self.conn.write(&chunk);
                    }
                    self.rx.extend_from_slice(&chunk);
                }
                ReadResult::WouldBlock => break,
                ReadResult::Eof => self.eof = true,
                ReadResult::TlsHandshakeDone => self.handshakes += 1,
            }
        }
        self.conn.flush()?;
        self.reregister(poll);
        Ok(())
    }

    fn reregister(&mut self, poll: &Poll) {
        self.conn
            .update_registration(poll.registry(), self.token)
            .unwrap();
    }
}

/// A connected (server, client) pair of plaintext `Conn`s on 127.0.0.1.
fn pair(poll: &Poll) -> (Side, Side) {
    pair_with_read_buf(poll, smtpstorm::net::conn::READ_BUF_BYTES)
}

/// Like `pair` with read buffers of `read_buf_bytes`.
fn pair_with_read_buf(poll: &Poll, read_buf_bytes: usize) -> (Side, Side) {
    let listener = socket::listen("127.0.0.1:0".parse().unwrap(), false, None).unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let client_stream = socket::connect(addr, None, false).unwrap();
    let started = Instant::now();
    let server_stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(started.elapsed() < DEADLINE, "accept timed out");
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    socket::prepare_accepted(&server_stream).unwrap();
    while !socket::connect_finished(&client_stream).unwrap() {
        assert!(started.elapsed() < DEADLINE, "connect timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
    (
        Side::new(poll, Conn::with_read_buf(server_stream, read_buf_bytes), 0),
        Side::new(poll, Conn::with_read_buf(client_stream, read_buf_bytes), 1),
    )
}

/// Pumps both sides until `done` holds; panics after `DEADLINE`.
#[track_caller]
fn drive(
    poll: &mut Poll,
    server: &mut Side,
    client: &mut Side,
    mut done: impl FnMut(&Side, &Side) -> bool,
) {
    let started = Instant::now();
    let mut events = Events::with_capacity(16);
    loop {
        // Both sides are pumped on every iteration, so a missed or spurious
        // edge-triggered event cannot stall the test.
        server.pump(poll).unwrap();
        client.pump(poll).unwrap();
        if done(server, client) {
            return;
        }
        assert!(started.elapsed() < DEADLINE, "test timed out");
        poll.poll(&mut events, Some(Duration::from_millis(5)))
            .unwrap();
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn one_megabyte_echoes_through_plaintext_conns() {
    let mut poll = Poll::new().unwrap();
    let (mut server, mut client) = pair(&poll);
    server.echo = true;
    let data = pattern(1 << 20);
    client.conn.write(&data);
    drive(&mut poll, &mut server, &mut client, |_, c| {
        c.rx.len() >= data.len()
    });
    assert_eq!(server.rx.len(), data.len());
    assert!(client.rx == data, "echoed bytes differ");
    assert_eq!(client.conn.bytes_tx(), data.len() as u64);
    assert_eq!(client.conn.bytes_rx(), data.len() as u64);
    // Orderly close: the server sees EOF after the client's shutdown.
    let _ = client.conn.shutdown().unwrap();
    drive(&mut poll, &mut server, &mut client, |s, _| s.eof);
}

#[test]
fn one_megabyte_echoes_through_implicit_tls() {
    let mut poll = Poll::new().unwrap();
    let (mut server, mut client) = pair(&poll);
    let server_tls = tls::server_config(None).unwrap();
    assert!(server_tls.self_signed);
    let client_tls = tls::client_config(&tls::ClientVerify::Off, 0).unwrap();
    server
        .conn
        .set_tls_implicit_server(server_tls.config)
        .unwrap();
    client
        .conn
        .set_tls_implicit_client(client_tls, tls::server_name("localhost").unwrap())
        .unwrap();
    assert!(
        client.conn.has_pending_output(),
        "the ClientHello is queued"
    );
    server.echo = true;
    let data = pattern(1 << 20);
    client.conn.write(&data);
    drive(&mut poll, &mut server, &mut client, |_, c| {
        c.rx.len() >= data.len()
    });
    assert!(client.rx == data, "echoed bytes differ");
    assert_eq!((server.handshakes, client.handshakes), (1, 1));
    assert!(
        client.conn.bytes_tx() > data.len() as u64,
        "TLS adds record overhead"
    );
    let info = client.conn.tls_info().unwrap();
    assert_eq!(info.protocol, "TLSv1_3");
    assert!(!info.cipher_suite.is_empty());
    assert!(!info.resumed);
    assert!(
        info.peer_subject.as_deref().unwrap_or("").contains("smtpstorm self-signed"),
        "{info:?}"
    );
    assert!(info.peer_not_after_unix.is_some());
    // close_notify then FIN: the server sees a clean EOF.
    let _ = client.conn.shutdown().unwrap();
    drive(&mut poll, &mut server, &mut client, |s, _| s.eof);
}

#[test]
fn starttls_discards_pipelined_plaintext_and_sends_the_220_in_clear() {
    let mut poll = Poll::new().unwrap();
    let (mut server, mut client) = pair(&poll);
    let server_tls = tls::server_config(None).unwrap();
    let client_tls = tls::client_config(&tls::ClientVerify::Off, 0).unwrap();

    // The attacker-style client pipelines junk after STARTTLS in one write.
    client.conn.write(b"STARTTLS\r\nJUNK");
    assert!(client.conn.flush().unwrap());

    // Server: read until the whole chunk has arrived; the "session" consumes
    // only the STARTTLS line and leaves "JUNK" unread in the chunk.
    let started = Instant::now();
    let mut seen = Vec::new();
    loop {
        assert!(started.elapsed() < DEADLINE, "server read timed out");
        match server.conn.read().unwrap() {
            ReadResult::Data => {
                seen.extend_from_slice(server.conn.plaintext());
                if seen.len() >= 14 {
                    break;
                }
            }
            ReadResult::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, b"STARTTLS\r\nJUNK");
    assert!(
        server.conn.plaintext().ends_with(b"JUNK"),
        "JUNK is still pending in the chunk"
    );
    server.conn.write(b"220 2.0.0 Ready to start TLS\r\n");
    server
        .conn
        .start_tls_server(Arc::clone(&server_tls.config))
        .unwrap();
    assert!(
        server.conn.plaintext().is_empty(),
        "pending plaintext is discarded at the switch"
    );
    server.echo = true;

    // Client: the 220 must arrive in the clear, before any TLS record.
    drive(&mut poll, &mut server, &mut client, |_, c| {
        c.rx.ends_with(b"\r\n")
    });
    assert_eq!(client.rx, b"220 2.0.0 Ready to start TLS\r\n");
    client.rx.clear();
    client
        .conn
        .start_tls_client(client_tls, tls::server_name("127.0.0.1").unwrap())
        .unwrap();
    client.conn.write(b"EHLO secure\r\n");

    drive(&mut poll, &mut server, &mut client, |_, c| c.rx.len() >= 13);
    assert_eq!((server.handshakes, client.handshakes), (1, 1));
    assert_eq!(
        server.rx, b"EHLO secure\r\n",
        "no JUNK reaches the TLS side"
    );
    assert_eq!(client.rx, b"EHLO secure\r\n");
    assert!(server.conn.tls_info().is_some());
    // A second switch is refused.
    let again = server.conn.start_tls_server(server_tls.config);
    assert!(again.is_err());
}

#[test]
fn a_second_connection_with_the_same_client_config_resumes() {
    let mut poll = Poll::new().unwrap();
    let server_tls = tls::server_config(None).unwrap();
    let client_tls = tls::client_config(&tls::ClientVerify::Off, 64).unwrap();
    let mut kinds = Vec::new();
    for round in 0..2 {
        let (mut server, mut client) = pair(&poll);
        server
            .conn
            .set_tls_implicit_server(Arc::clone(&server_tls.config))
            .unwrap();
        client
            .conn
            .set_tls_implicit_client(
                Arc::clone(&client_tls),
                tls::server_name("localhost").unwrap(),
            )
            .unwrap();
        server.echo = true;
        // The echo round trip also delivers the TLS 1.3 session tickets.
        client.conn.write(b"ping");
        drive(&mut poll, &mut server, &mut client, |_, c| c.rx.len() >= 4);
        kinds.push(client.conn.tls_info().unwrap().resumed);
        assert_eq!(server.conn.tls_info().unwrap().resumed, round == 1);
        server.conn.deregister(poll.registry()).unwrap();
        client.conn.deregister(poll.registry()).unwrap();
    }
    assert_eq!(kinds, vec![false, true]);
}

#[test]
fn resumption_can_be_disabled() {
    let mut poll = Poll::new().unwrap();
    let server_tls = tls::server_config(None).unwrap();
    let client_tls = tls::client_config(&tls::ClientVerify::Off, 0).unwrap();
    for _ in 0..2 {
        let (mut server, mut client) = pair(&poll);
        server
            .conn
            .set_tls_implicit_server(Arc::clone(&server_tls.config))
            .unwrap();
        client
            .conn
            .set_tls_implicit_client(
                Arc::clone(&client_tls),
                tls::server_name("localhost").unwrap(),
            )
            .unwrap();
        server.echo = true;
        client.conn.write(b"ping");
        drive(&mut poll, &mut server, &mut client, |_, c| c.rx.len() >= 4);
        assert!(!client.conn.tls_info().unwrap().resumed);
        server.conn.deregister(poll.registry()).unwrap();
        client.conn.deregister(poll.registry()).unwrap();
    }
}

#[test]
fn a_verifying_client_rejects_a_self_signed_server_without_panicking() {
    let mut poll = Poll::new().unwrap();
    let (mut server, mut client) = pair(&poll);
    let server_tls = tls::server_config(None).unwrap();
    // A CA file holding some other self-signed certificate.
    let dir = tempfile::tempdir().unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, other.cert.pem()).unwrap();
    let client_tls = tls::client_config(&tls::ClientVerify::CaFile(ca), 0).unwrap();
    server
        .conn
        .set_tls_implicit_server(server_tls.config)
        .unwrap();
    client
        .conn
        .set_tls_implicit_client(client_tls, tls::server_name("localhost").unwrap())
        .unwrap();
    let started = Instant::now();
    let mut events = Events::with_capacity(16);
    let err = loop {
        let _ = server.pump(&poll);
        if let Err(e) = client.pump(&poll) {
            break e;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no TLS error within the deadline"
        );
        poll.poll(&mut events, Some(Duration::from_millis(5)))
            .unwrap();
    };
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
}

#[test]
fn garbage_instead_of_a_client_hello_is_an_error_not_a_panic() {
    let mut poll = Poll::new().unwrap();
    let (mut server, mut client) = pair(&poll);
    let server_tls = tls::server_config(None).unwrap();
    server
        .conn
        .set_tls_implicit_server(server_tls.config)
        .unwrap();
    client.conn.write(b"EHLO plaintext\r\n");
    let started = Instant::now();
    let mut events = Events::with_capacity(16);
    loop {
        client.pump(&poll).unwrap();
        if let Err(e) = server.pump(&poll) {
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no TLS error within the deadline"
        );
        poll.poll(&mut events, Some(Duration::from_millis(5)))
            .unwrap();
    }
}

#[test]
fn paused_conns_only_ask_for_writable_when_output_is_queued() {
    let poll = Poll::new().unwrap();
    let (mut server, _client) = pair(&poll);
    assert_eq!(server.conn.interest(), Interest::READABLE);
    server.conn.set_paused(true);
    server.conn.write(b"hello");
    assert_eq!(server.conn.interest(), Interest::WRITABLE);
    assert!(server.conn.flush().unwrap());
    assert_eq!(server.conn.interest(), Interest::READABLE, "never empty");
    server.conn.set_paused(false);
    server.conn.write(b"x");
    assert_eq!(
        server.conn.interest(),
        Interest::READABLE | Interest::WRITABLE
    );
}

#[test]
fn tiny_read_buffers_still_echo_everything_through_tls() {
    let mut poll = Poll::new().unwrap();
    let (mut server, mut client) = pair_with_read_buf(&poll, 5);
    let server_tls = tls::server_config(None).unwrap();
    let client_tls = tls::client_config(&tls::ClientVerify::Off, 0).unwrap();
    server
        .conn
        .set_tls_implicit_server(server_tls.config)
        .unwrap();
    client
        .conn
        .set_tls_implicit_client(client_tls, tls::server_name("localhost").unwrap())
        .unwrap();
    server.echo = true;
    let data = pattern(100_000);
    client.conn.write(&data);
    drive(&mut poll, &mut server, &mut client, |_, c| {
        c.rx.len() >= data.len()
    });
    assert!(client.rx == data, "echoed bytes differ");
}
