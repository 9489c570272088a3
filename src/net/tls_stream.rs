//! TLS as a sans-IO byte transform over rustls, the same for every backend.
//!
//! A [`TlsStream`] sits between a backend's socket and a role's session:
//! ciphertext from the socket goes in ([`TlsStream::read_ciphertext`]),
//! plaintext comes out ([`TlsStream::read_plaintext`]); the session's
//! plaintext goes in ([`TlsStream::write_plaintext`]) and records come out
//! ([`TlsStream::write_ciphertext`] into a buffer the backend owns, e.g. an
//! io_uring send buffer, or [`TlsStream::write_ciphertext_to`] straight into
//! a socket). It never touches a socket or a clock.
//!
//! The cycle, as rustls documents it, with every case handled:
//!
//! ```text
//! bytes from the socket:  while !rest.is_empty() {
//!                             n = tls.read_ciphertext(rest)?   // Err: alert queued; flush it, then close
//!                             rest = &rest[n..]
//!                             loop { match tls.read_plaintext(buf)? {
//!                                 Data(k)       => session gets buf[..k],
//!                                 HandshakeDone => session learns TLS is up (once),
//!                                 Closed        => the peer ended (close_notify, or FIN),
//!                                 NeedCiphertext => break } } }
//! then:                   while tls.wants_write() { tls.write_ciphertext(&mut out) }
//! ```
//!
//! STARTTLS (CVE-2011-0411): a connection switches to TLS by creating a
//! `TlsStream` after the `220` (server) or after reading it (client). Every
//! byte read from the socket afterwards is ciphertext; whatever plaintext
//! the connection had read before the switch and not yet handed to the
//! session must be dropped by the backend, and the session drops what
//! followed the STARTTLS command in its own chunk, so no byte injected in the
//! clear is ever taken as protected.
//!
//! Invariants: no method panics on any input; after an error the stream
//! only flushes the queued alert; `HandshakeDone` is reported exactly once,
//! before any plaintext (there is no 0-RTT); rustls' buffer limit is lifted,
//! so `write_plaintext` always takes everything (backends bound what they
//! queue themselves).

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use super::tls::TlsInfo;

/// Which end of the handshake this stream is.
#[derive(Clone, Debug)]
pub enum TlsSide {
    Server(Arc<ServerConfig>),
    Client(Arc<ClientConfig>, ServerName<'static>),
}

/// One step of [`TlsStream::read_plaintext`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum TlsRead {
    /// `buf[..n]` holds plaintext (`n > 0`).
    Data(usize),
    /// The handshake just completed (reported once).
    HandshakeDone,
    /// Nothing more until more ciphertext arrives.
    NeedCiphertext,
    /// The peer ended the stream: close_notify, or a FIN without one (a
    /// plain end for SMTP, where a truncation cannot matter after QUIT).
    Closed,
}

/// A TLS session as a byte transform (see the module doc).
pub struct TlsStream {
    conn: Connection,
    handshake_reported: bool,
    peer_eof: bool,
    failed: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("handshaking", &self.conn.is_handshaking())
            .field("peer_eof", &self.peer_eof)
            .field("failed", &self.failed)
            .finish()
    }
}

/// A rustls error as an `io::Error`, with this project's own wording
/// where it has one (e.g. why an X.509 v1 certificate cannot be verified).
pub fn tls_error(e: rustls::Error) -> io::Error {
    match super::tls::own_error_message(&e) {
        Some(text) => io::Error::new(io::ErrorKind::InvalidData, text),
        None => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

impl TlsStream {
    /// What a backend's `start_tls` does before it stores the stream: a
    /// connection that already has TLS (`active`) is refused, a rustls
    /// error gets this project's wording.
    pub fn start(active: bool, side: TlsSide) -> io::Result<Self> {
        if active {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TLS is already active on this connection",
            ));
        }
        Self::new(side).map_err(tls_error)
    }

    /// A new session; a client queues its ClientHello at once.
    pub fn new(side: TlsSide) -> Result<Self, rustls::Error> {
        let mut conn = match side {
            TlsSide::Server(cfg) => Connection::Server(ServerConnection::new(cfg)?),
            TlsSide::Client(cfg, name) => Connection::Client(ClientConnection::new(cfg, name)?),
        };
        conn.set_buffer_limit(None);
        Ok(Self {
            conn,
            handshake_reported: false,
            peer_eof: false,
            failed: false,
        })
    }

    /// Takes ciphertext read from the socket and processes the records it
    /// completes. Returns how many bytes were taken: rustls takes at most
    /// one buffer's worth at a time, so offer the rest again after draining
    /// [`Self::read_plaintext`]. An error means the peer's TLS is broken: the
    /// alert is queued (flush it with `write_ciphertext*`), then close.
    pub fn read_ciphertext(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.failed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS already failed",
            ));
        }
        let mut taken = 0;
        while taken < data.len() {
            let mut rd = &data[taken..];
            match self.conn.read_tls(&mut rd) {
                Ok(0) => break,
                Ok(n) => taken += n,
                // rustls' incoming buffer is full: process, then continue.
                Err(e) if e.kind() == io::ErrorKind::Other && taken > 0 => break,
                Err(e) => return Err(e),
            }
            if let Err(e) = self.conn.process_new_packets() {
                self.failed = true;
                return Err(tls_error(e));
            }
            if self.plaintext_pending() {
                // Let the caller drain plaintext before more records.
                break;
            }
        }
        Ok(taken)
    }

    fn plaintext_pending(&mut self) -> bool {
        self.conn
            .process_new_packets()
            .map(|s| s.plaintext_bytes_to_read() > 0)
            .unwrap_or(false)
    }

    /// The socket reported end of stream (FIN).
    pub fn peer_eof(&mut self) {
        if !self.peer_eof {
            self.peer_eof = true;
            // An empty read marks EOF inside rustls.
            let _ = self.conn.read_tls(&mut io::empty());
        }
    }

    /// The next plaintext step (see [`TlsRead`]).
    pub fn read_plaintext(&mut self, buf: &mut [u8]) -> io::Result<TlsRead> {
        if !self.handshake_reported && !self.conn.is_handshaking() {
            self.handshake_reported = true;
            return Ok(TlsRead::HandshakeDone);
        }
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty plaintext buffer",
            ));
        }
        match self.conn.reader().read(buf) {
            Ok(0) => Ok(TlsRead::Closed),
            Ok(n) => Ok(TlsRead::Data(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if self.peer_eof {
                    Ok(TlsRead::Closed)
                } else {
                    Ok(TlsRead::NeedCiphertext)
                }
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(TlsRead::Closed),
            Err(e) => Err(e),
        }
    }

    /// Queues the session's plaintext for encryption (rustls holds it until
    /// the handshake is done).
    pub fn write_plaintext(&mut self, data: &[u8]) {
        // The buffer limit is lifted, so this takes everything; an error
        // means the session is closed, which the next read reports.
        let _ = self.conn.writer().write_all(data);
    }

    /// True if records are waiting to be sent.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Appends every pending record to `out` (a buffer the backend owns);
    /// returns the bytes appended.
    pub fn write_ciphertext(&mut self, out: &mut Vec<u8>) -> usize {
        let before = out.len();
        while self.conn.wants_write() {
            // Writing into a Vec cannot fail.
            if self.conn.write_tls(out).is_err() {
                break;
            }
        }
        out.len() - before
    }

    /// Writes pending records straight to `w` (one vectored write per call;
    /// `WouldBlock` leaves the rest queued). Returns the bytes written.
    pub fn write_ciphertext_to(&mut self, w: &mut dyn Write) -> io::Result<usize> {
        let mut total = 0;
        while self.conn.wants_write() {
            match self.conn.write_tls(w) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && total > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }

    /// Queues a close_notify alert.
    pub fn send_close_notify(&mut self) {
        self.conn.send_close_notify();
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// True once the handshake completed as a resumption.
    pub fn is_resumed(&self) -> bool {
        !self.conn.is_handshaking()
            && matches!(
                self.conn.handshake_kind(),
                Some(rustls::HandshakeKind::Resumed)
            )
    }

    /// The IANA code points of the negotiated cipher suite and key-exchange
    /// group (0 for what is not known yet).
    pub fn negotiated(&self) -> (u16, u16) {
        let suite = self
            .conn
            .negotiated_cipher_suite()
            .map_or(0, |s| u16::from(s.suite()));
        let group = self
            .conn
            .negotiated_key_exchange_group()
            .map_or(0, |g| u16::from(g.name()));
        (suite, group)
    }

    /// What the handshake negotiated (`None` before it is done).
    pub fn info(&self) -> Option<TlsInfo> {
        TlsInfo::from_connection(&self.conn)
    }

    /// The rustls session, for anything else.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::tls;

    fn pair() -> (TlsStream, TlsStream) {
        tls::install_crypto_provider();
        let s = tls::server_config(None, &tls::TlsChoice::default())
            .unwrap()
            .config;
        let c = tls::client_config(&tls::ClientVerify::Off, 0, &tls::TlsChoice::default()).unwrap();
        let name = tls::server_name("localhost").unwrap();
        (
            TlsStream::new(TlsSide::Server(s)).unwrap(),
            TlsStream::new(TlsSide::Client(c, name)).unwrap(),
        )
    }

    /// Moves every record from `a` to `b` in pieces of at most `chunk`
    /// bytes, collecting `b`'s plaintext and events.
    fn pump(
        a: &mut TlsStream,
        b: &mut TlsStream,
        chunk: usize,
        plain: &mut Vec<u8>,
        events: &mut Vec<TlsRead>,
    ) {
        let mut wire = Vec::new();
        a.write_ciphertext(&mut wire);
        let mut buf = [0u8; 1000];
        for piece in wire.chunks(chunk.max(1)) {
            let mut rest = piece;
            while !rest.is_empty() {
                let n = b.read_ciphertext(rest).expect("ciphertext");
                rest = &rest[n..];
                loop {
                    match b.read_plaintext(&mut buf).unwrap() {
                        TlsRead::Data(k) => plain.extend_from_slice(&buf[..k]),
                        TlsRead::NeedCiphertext => break,
                        TlsRead::Closed => {
                            events.push(TlsRead::Closed);
                            break;
                        }
                        TlsRead::HandshakeDone => events.push(TlsRead::HandshakeDone),
                    }
                }
                if n == 0 && !rest.is_empty() {
                    panic!("no progress");
                }
            }
        }
    }

    #[test]
    fn a_handshake_and_plaintext_cross_in_any_chunking() {
        for chunk in [1usize, 7, 100, 16 * 1024 + 5, usize::MAX] {
            let (mut s, mut c) = pair();
            let (mut sp, mut cp, mut se, mut ce) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            c.write_plaintext(b"EHLO client\r\n");
            for _ in 0..4 {
                pump(&mut c, &mut s, chunk, &mut sp, &mut se);
                pump(&mut s, &mut c, chunk, &mut cp, &mut ce);
            }
            assert_eq!(se, vec![TlsRead::HandshakeDone], "chunk {chunk}");
            assert_eq!(ce, vec![TlsRead::HandshakeDone], "chunk {chunk}");
            assert_eq!(sp, b"EHLO client\r\n", "chunk {chunk}");
            let big = vec![b'x'; 100_000];
            s.write_plaintext(&big);
            pump(&mut s, &mut c, chunk, &mut cp, &mut ce);
            assert_eq!(cp, big, "chunk {chunk}");
            assert!(s.info().is_some() && c.info().is_some());
        }
    }

    /// A handshake between a client offering `client` and a server
    /// accepting `server`: the negotiated (suite, group) names.
    fn negotiate(client: &tls::TlsChoice, server: &tls::TlsChoice) -> (String, String) {
        tls::install_crypto_provider();
        let s = tls::server_config(None, server).unwrap().config;
        let c = tls::client_config(&tls::ClientVerify::Off, 0, client).unwrap();
        let name = tls::server_name("localhost").unwrap();
        let mut s = TlsStream::new(TlsSide::Server(s)).unwrap();
        let mut c = TlsStream::new(TlsSide::Client(c, name)).unwrap();
        let (mut sp, mut cp, mut se, mut ce) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..4 {
            pump(&mut c, &mut s, usize::MAX, &mut sp, &mut se);
            pump(&mut s, &mut c, usize::MAX, &mut cp, &mut ce);
        }
        assert_eq!(s.negotiated(), c.negotiated(), "both ends agree");
        let (suite, group) = s.negotiated();
        (
            rustls::CipherSuite::from(suite)
                .as_str()
                .unwrap()
                .to_string(),
            rustls::NamedGroup::from(group)
                .as_str()
                .unwrap()
                .to_string(),
        )
    }

    #[test]
    fn the_server_picks_its_cheapest_suite_among_the_clients_offer() {
        let default = tls::TlsChoice::default();
        // rustls' client offers TLS13_AES_256_GCM_SHA384 first.
        let (suite, group) = negotiate(&default, &default);
        assert_eq!(suite, tls::suite_name(tls::server_suite_order()[0]));
        assert!(suite.ends_with("SHA256"), "{suite}");
        assert_eq!(group, "X25519");
        // A client that offers only one suite and one group gets them.
        let only = tls::TlsChoice {
            suites: tls::parse_suites("TLS13_AES_256_GCM_SHA384").unwrap(),
            groups: tls::parse_groups("secp256r1").unwrap(),
        };
        assert_eq!(
            negotiate(&only, &default),
            ("TLS13_AES_256_GCM_SHA384".into(), "secp256r1".into())
        );
        // A server limited to ChaCha20 gets it from a default client.
        let chacha = tls::TlsChoice {
            suites: tls::parse_suites("TLS13_CHACHA20_POLY1305_SHA256").unwrap(),
            groups: Vec::new(),
        };
        assert_eq!(
            negotiate(&default, &chacha).0,
            "TLS13_CHACHA20_POLY1305_SHA256"
        );
    }

    #[test]
    fn close_notify_and_a_bare_fin_both_end_the_stream() {
        let (mut s, mut c) = pair();
        let (mut sp, mut cp, mut se, mut ce) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            pump(&mut c, &mut s, usize::MAX, &mut sp, &mut se);
            pump(&mut s, &mut c, usize::MAX, &mut cp, &mut ce);
        }
        s.send_close_notify();
        pump(&mut s, &mut c, usize::MAX, &mut cp, &mut ce);
        assert_eq!(ce.last(), Some(&TlsRead::Closed));
        // A FIN without close_notify: the server sees a plain end.
        s.peer_eof();
        let mut buf = [0u8; 16];
        assert_eq!(s.read_plaintext(&mut buf).unwrap(), TlsRead::Closed);
    }

    #[test]
    fn garbage_instead_of_a_client_hello_is_an_error_with_an_alert_to_send() {
        let (mut s, _) = pair();
        // Plaintext injected after STARTTLS lands here as "ciphertext".
        let e = s.read_ciphertext(b"MAIL FROM:<evil@x>\r\n").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let mut out = Vec::new();
        assert!(s.write_ciphertext(&mut out) > 0, "an alert is queued");
        assert!(s.read_ciphertext(b"more").is_err(), "stays failed");
    }
}
