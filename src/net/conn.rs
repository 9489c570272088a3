//! One TCP connection, plaintext or TLS, as both the sink and the blaster use it.
//!
//! A [`Conn`] owns a non-blocking `mio::net::TcpStream`, an optional rustls
//! session, a reused read buffer and a write queue. The event loop drives it
//! the way mio's and rustls' examples do:
//!
//! ```text
//! on readable:  loop { match conn.read()? {
//!                   Data => feed conn.plaintext() to the SMTP session,
//!                           then conn.write(replies) / maybe conn.start_tls_*,
//!                   TlsHandshakeDone => tell the session TLS is up,
//!                   WouldBlock => break,   Eof => close } }
//! then always:  conn.flush()?; conn.update_registration(registry, token)?
//! ```
//!
//! A connect still in progress (see `socket::connect`) needs WRITABLE: register
//! it with `Interest::WRITABLE` and wrap it in a `Conn` (or switch to
//! [`Conn::register`]) once `socket::connect_finished` says it is connected.
//!
//! Invariants:
//! - `plaintext()` is valid until the next `read()`; the `Conn` never holds
//!   plaintext beyond that chunk, and a TLS switch (`start_tls_*`) discards it,
//!   so bytes pipelined after `STARTTLS` in the clear can never be mistaken
//!   for data protected by TLS (CVE-2011-0411). The SMTP session must likewise
//!   drop whatever part of the chunk followed the STARTTLS command.
//! - Bytes queued with `write()` before a TLS switch go out in the clear,
//!   before any TLS record (so `220 Ready to start TLS` precedes the
//!   handshake); bytes queued after it are encrypted.
//! - `interest()` is computed from state (readable unless paused outside a
//!   handshake; writable while output is queued or rustls wants to write),
//!   never patched by hand.
//! - I/O is edge-triggered: drain reads until `WouldBlock`, retry on
//!   `Interrupted`, and treat a wakeup with nothing to do as normal.
//! - No method panics on I/O or TLS errors: they come back as `io::Error`
//!   (TLS alerts are queued for the peer before the error is returned).

use std::io::{self, Read, Write};
use std::sync::Arc;

use mio::net::TcpStream;
use mio::Interest;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use super::tls::TlsInfo;

/// Default size of a connection's read buffer (the largest plaintext chunk).
pub const READ_BUF_BYTES: usize = 32 * 1024;

/// Smallest ciphertext buffer: one full TLS record (16 KiB + overhead).
const TLS_IN_MIN_BYTES: usize = 16 * 1024 + 512;

/// Once this many bytes of the write queue have been sent, the queue is
/// compacted even if more is pending.
const COMPACT_AFTER_BYTES: usize = 64 * 1024;

/// What one [`Conn::read`] step produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum ReadResult {
    /// `plaintext()` holds at least one new byte.
    Data,
    /// Nothing more to read now; wait for the next readable event.
    WouldBlock,
    /// The peer closed (TCP FIN, or TLS close_notify). Sticky.
    Eof,
    /// The TLS handshake just completed (reported once per TLS session);
    /// call `read()` again for any data that followed it.
    TlsHandshakeDone,
}

/// A TCP stream with optional TLS, a read buffer and a write queue.
pub struct Conn {
    stream: TcpStream,
    tls: Option<Connection>,
    read_buf: Box<[u8]>,
    plaintext_len: usize,
    /// Bytes for the socket as they are (plaintext, or pre-TLS plaintext).
    write_queue: Vec<u8>,
    write_pos: usize,
    bytes_rx: u64,
    bytes_tx: u64,
    /// Application bytes given to `write()`, and how many of them are known
    /// to have left the socket (see [`Conn::app_bytes_sent`]).
    app_in: u64,
    app_sent: u64,
    socket_eof: bool,
    handshake_reported: bool,
    paused: bool,
    shutdown_requested: bool,
    write_shut: bool,
    /// Ciphertext read from the socket but not yet taken by rustls (empty
    /// until TLS is attached, so no pre-switch byte can ever land here).
    tls_in: Box<[u8]>,
    tls_in_pos: usize,
    tls_in_len: usize,
    /// The interest last given to mio, to skip no-op `epoll_ctl` calls.
    registered: Option<Interest>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.stream.peer_addr().ok())
            .field("tls", &self.tls.is_some())
            .field("bytes_rx", &self.bytes_rx)
            .field("bytes_tx", &self.bytes_tx)
            .field(
                "pending_write_bytes",
                &(self.write_queue.len() - self.write_pos),
            )
            .finish()
    }
}

/// Writes to the stream, counting bytes on the wire.
struct Counted<'a> {
    stream: &'a mut TcpStream,
    count: &'a mut u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.stream.write(buf)?;
        *self.count += n as u64;
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let n = self.stream.write_vectored(bufs)?;
        *self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    match super::tls::own_error_message(&e) {
        Some(text) => io::Error::new(io::ErrorKind::InvalidData, text),
        None => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

impl Conn {
    /// Wraps a connected (or connecting) non-blocking stream, plaintext.
    pub fn new(stream: TcpStream) -> Self {
        Self::with_read_buf(stream, READ_BUF_BYTES)
    }

    /// Like [`Conn::new`] with a read buffer of `read_buf_bytes`; 0 means no
    /// owned buffer: read with [`Conn::read_into`] only (`read()` then fails).
    pub fn with_read_buf(stream: TcpStream, read_buf_bytes: usize) -> Self {
        Self {
            stream,
            tls: None,
            read_buf: vec![0; read_buf_bytes].into_boxed_slice(),
            plaintext_len: 0,
            write_queue: Vec::new(),
            write_pos: 0,
            bytes_rx: 0,
            bytes_tx: 0,
            app_in: 0,
            app_sent: 0,
            socket_eof: false,
            handshake_reported: false,
            paused: false,
            shutdown_requested: false,
            write_shut: false,
            tls_in: Box::default(),
            tls_in_pos: 0,
            tls_in_len: 0,
            registered: None,
        }
    }

    /// The stream, e.g. to register it with a `mio::Registry`.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// The stream, mutably (mio's `register`/`reregister` need `&mut`).
    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Bytes read from the socket (TLS records included).
    pub fn bytes_rx(&self) -> u64 {
        self.bytes_rx
    }

    /// Bytes written to the socket (TLS records included).
    pub fn bytes_tx(&self) -> u64 {
        self.bytes_tx
    }

    /// Application bytes (plaintext given to [`Conn::write`]) known to have
    /// left the socket: exact in plaintext; with TLS, everything written so
    /// far once every record is flushed (the figure does not move while TLS
    /// output is still queued). Phases are timed from this.
    pub fn app_bytes_sent(&self) -> u64 {
        self.app_sent
    }

    /// Application bytes given to [`Conn::write`] so far.
    pub fn app_bytes_in(&self) -> u64 {
        self.app_in
    }

    /// Updates `app_sent` after a flush step.
    fn note_sent(&mut self) {
        let queued = (self.write_queue.len() - self.write_pos) as u64;
        match &self.tls {
            None => self.app_sent = self.app_in - queued,
            Some(t) if queued == 0 && !t.wants_write() && !t.is_handshaking() => {
                self.app_sent = self.app_in
            }
            Some(_) => {}
        }
    }

    /// True once a TLS session is attached (handshake done or not).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// True while a TLS handshake is in progress.
    pub fn is_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    /// True once a TLS handshake has completed on this connection (a
    /// handshake that failed or never finished leaves it false).
    pub fn tls_established(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| !t.is_handshaking())
    }

    /// True if the completed TLS handshake resumed an earlier session.
    pub fn tls_resumed(&self) -> bool {
        self.tls_established()
            && self
                .tls
                .as_ref()
                .is_some_and(|t| t.handshake_kind() == Some(rustls::HandshakeKind::Resumed))
    }

    /// The plaintext produced by the last `read()` that returned `Data`.
    pub fn plaintext(&self) -> &[u8] {
        &self.read_buf[..self.plaintext_len]
    }

    /// Stops asking for readable events (backpressure), except during a TLS
    /// handshake. Readiness is edge-triggered: after unpausing, call `read()`
    /// until `WouldBlock` without waiting for an event.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// True if reading is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// True if output is queued: cleartext not yet written, or TLS records
    /// rustls wants to send.
    pub fn has_pending_output(&self) -> bool {
        self.write_pos < self.write_queue.len()
            || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// The readiness to register for, computed from state. Never empty: when
    /// there is nothing to wait for (paused, nothing to write) it is READABLE,
    /// which at worst costs one spurious wakeup.
    pub fn interest(&self) -> Interest {
        let readable = !self.socket_eof && (!self.paused || self.is_handshaking());
        match (readable, self.has_pending_output()) {
            (_, false) => Interest::READABLE,
            (true, true) => Interest::READABLE | Interest::WRITABLE,
            (false, true) => Interest::WRITABLE,
        }
    }

    /// Registers the stream with `registry` for [`Conn::interest`]. If the
    /// stream is already registered (e.g. for WRITABLE while connecting), this
    /// re-registers it.
    pub fn register(&mut self, registry: &mio::Registry, token: mio::Token) -> io::Result<()> {
        let interest = self.interest();
        if self.registered.is_some() {
            registry.reregister(&mut self.stream, token, interest)?;
        } else {
            registry.register(&mut self.stream, token, interest)?;
        }
        self.registered = Some(interest);
        Ok(())
    }

    /// Marks the stream as registered with `interest` by someone else (e.g.
    /// registered for WRITABLE before it was wrapped), so the next
    /// [`Conn::update_registration`] re-registers instead of registering.
    pub fn assume_registered(&mut self, interest: Interest) {
        self.registered = Some(interest);
    }

    /// Re-registers the stream if [`Conn::interest`] changed since the last
    /// registration (no syscall otherwise); registers it if it never was.
    pub fn update_registration(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
    ) -> io::Result<()> {
        match self.registered {
            Some(current) if current == self.interest() => Ok(()),
            _ => self.register(registry, token),
        }
    }

    /// Removes the stream from `registry` (before dropping the `Conn`, or to
    /// hand the stream to another poll).
    pub fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        self.registered = None;
        registry.deregister(&mut self.stream)
    }

    /// One read step; see [`ReadResult`]. Loop until `WouldBlock` or `Eof`.
    ///
    /// In plaintext mode this is one `read(2)`. With TLS it hands out plaintext
    /// rustls already decrypted, else reads TLS records from the socket and
    /// processes them. A TLS protocol error is returned as `InvalidData` after
    /// the alert is queued (and written if the socket takes it).
    pub fn read(&mut self) -> io::Result<ReadResult> {
        // Taking the box out (an empty box does not allocate) lets the same
        // code read into the owned buffer or a caller's one.
        let mut buf = std::mem::take(&mut self.read_buf);
        let result = self.read_into(&mut buf);
        self.read_buf = buf;
        let (result, n) = result?;
        self.plaintext_len = n;
        Ok(result)
    }

    /// Like [`Conn::read`], but the plaintext goes to `buf[..n]` (returned
    /// with the result; `n > 0` only for `Data`) instead of the connection's
    /// own buffer, and `plaintext()` stays empty. An event loop with many
    /// mostly idle connections uses one buffer per thread this way and
    /// creates its `Conn`s with `with_read_buf(stream, 0)`.
    pub fn read_into(&mut self, buf: &mut [u8]) -> io::Result<(ReadResult, usize)> {
        self.plaintext_len = 0;
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read buffer is empty",
            ));
        }
        let mut n = 0usize;
        self.read_step(buf, &mut n).map(|r| (r, n))
    }

    fn read_step(
        &mut self,
        read_buf: &mut [u8],
        plaintext_len: &mut usize,
    ) -> io::Result<ReadResult> {
        let Self {
            stream,
            tls,
            bytes_rx,
            bytes_tx,
            socket_eof,
            handshake_reported,
            tls_in,
            tls_in_pos,
            tls_in_len,
            ..
        } = self;
        let Some(tls) = tls else {
            if *socket_eof {
                return Ok(ReadResult::Eof);
            }
            loop {
                return match stream.read(read_buf) {
                    // 0 bytes: the peer sent FIN.
                    Ok(0) => {
                        *socket_eof = true;
                        Ok(ReadResult::Eof)
                    }
                    Ok(n) => {
                        *bytes_rx += n as u64;
                        *plaintext_len = n;
                        Ok(ReadResult::Data)
                    }
                    // Nothing buffered in the kernel: wait for readiness.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(ReadResult::WouldBlock),
                    // A signal interrupted the syscall: just retry.
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => Err(e),
                };
            }
        };
        loop {
            // Plaintext cannot precede the end of the handshake (no 0-RTT), so
            // reporting the handshake first keeps the order of events exact.
            if !*handshake_reported && !tls.is_handshaking() {
                *handshake_reported = true;
                return Ok(ReadResult::TlsHandshakeDone);
            }
            match tls.reader().read(read_buf) {
                // Ok(0): the peer sent close_notify.
                Ok(0) => return Ok(ReadResult::Eof),
                Ok(n) => {
                    *plaintext_len = n;
                    return Ok(ReadResult::Data);
                }
                // No plaintext buffered: read more records below.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // TCP FIN without close_notify: common after QUIT; a plain EOF
                // for SMTP (truncation cannot matter after QUIT's reply).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(ReadResult::Eof),
                Err(e) => return Err(e),
            }
            if *tls_in_pos == *tls_in_len {
                if *socket_eof {
                    return Ok(ReadResult::Eof);
                }
                // One large read(2) instead of rustls' 4 KiB per read_tls.
                match stream.read(tls_in) {
                    // FIN: tell rustls (an empty read_tls marks EOF), so the
                    // reader reports close_notify or truncation.
                    Ok(0) => {
                        *socket_eof = true;
                        tls.read_tls(&mut io::empty())?;
                    }
                    Ok(n) => {
                        *bytes_rx += n as u64;
                        *tls_in_pos = 0;
                        *tls_in_len = n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(ReadResult::WouldBlock)
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            if *tls_in_pos < *tls_in_len {
                // Plaintext was fully drained above, so rustls has room; it
                // takes what it can and the rest waits in `tls_in`.
                *tls_in_pos += tls.read_tls(&mut &tls_in[*tls_in_pos..*tls_in_len])?;
            }
            if let Err(e) = tls.process_new_packets() {
                // rustls queued an alert: try to deliver it, then give up.
                let _ = tls.write_tls(&mut Counted {
                    stream,
                    count: bytes_tx,
                });
                return Err(tls_error(e));
            }
        }
    }

    /// Queues `data` to send: in the clear, or encrypted when TLS is active
    /// (before the handshake finishes, rustls holds it until it can). Nothing
    /// is written until [`Conn::flush`].
    pub fn write(&mut self, data: &[u8]) {
        self.app_in += data.len() as u64;
        match &mut self.tls {
            None => {
                if self.write_pos == self.write_queue.len() {
                    self.write_queue.clear();
                    self.write_pos = 0;
                } else if self.write_pos >= COMPACT_AFTER_BYTES {
                    self.write_queue.drain(..self.write_pos);
                    self.write_pos = 0;
                }
                self.write_queue.extend_from_slice(data);
            }
            // The buffer limit is lifted in `attach_tls`, so rustls takes all
            // of it; an error would mean the session is closed, and the next
            // read/flush reports that.
            Some(tls) => {
                let _ = tls.writer().write_all(data);
            }
        }
    }

    /// Writes queued output until done (`Ok(true)`) or the socket is full
    /// (`Ok(false)`: wait for writable). Cleartext queued before a TLS switch
    /// goes first, then TLS records. Completes a requested shutdown.
    pub fn flush(&mut self) -> io::Result<bool> {
        let r = self.flush_inner();
        self.note_sent();
        r
    }

    fn flush_inner(&mut self) -> io::Result<bool> {
        while self.write_pos < self.write_queue.len() {
            match self.stream.write(&self.write_queue[self.write_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.write_pos += n;
                    self.bytes_tx += n as u64;
                }
                // Socket send buffer full: wait for writable.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.write_queue.clear();
        self.write_pos = 0;
        if let Some(tls) = &mut self.tls {
            while tls.wants_write() {
                match tls.write_tls(&mut Counted {
                    stream: &mut self.stream,
                    count: &mut self.bytes_tx,
                }) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if self.shutdown_requested && !self.write_shut {
            self.write_shut = true;
            match self.stream.shutdown(std::net::Shutdown::Write) {
                Ok(()) => {}
                // The peer is already gone: nothing left to shut.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Queues a TLS close_notify (if TLS), then shuts the TCP write side once
    /// everything queued is sent. Returns what [`Conn::flush`] returns; if
    /// `Ok(false)`, keep flushing on writable events.
    pub fn shutdown(&mut self) -> io::Result<bool> {
        if !self.shutdown_requested {
            self.shutdown_requested = true;
            if let Some(tls) = &mut self.tls {
                tls.send_close_notify();
            }
        }
        self.flush()
    }

    fn attach_tls(&mut self, mut tls: Connection) -> io::Result<()> {
        if self.tls.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TLS is already active on this connection",
            ));
        }
        tls.set_buffer_limit(None);
        // CVE-2011-0411: whatever plaintext arrived before the switch is
        // dropped; from now on every byte read from the socket goes to TLS.
        self.plaintext_len = 0;
        self.handshake_reported = false;
        self.tls_in = vec![0; self.read_buf.len().max(TLS_IN_MIN_BYTES)].into_boxed_slice();
        self.tls_in_pos = 0;
        self.tls_in_len = 0;
        self.tls = Some(tls);
        Ok(())
    }

    /// Switches to TLS as the server (after replying `220` to STARTTLS).
    /// Discards the current plaintext chunk; cleartext already queued is sent
    /// before the handshake.
    pub fn start_tls_server(&mut self, config: Arc<ServerConfig>) -> io::Result<()> {
        let tls = ServerConnection::new(config).map_err(tls_error)?;
        self.attach_tls(Connection::Server(tls))
    }

    /// Switches to TLS as the client (after reading the `220` to STARTTLS).
    /// Queues the ClientHello: flush and wait for readable.
    pub fn start_tls_client(
        &mut self,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<()> {
        let tls = ClientConnection::new(config, name).map_err(tls_error)?;
        self.attach_tls(Connection::Client(tls))
    }

    /// Implicit TLS (port 465) from the first byte, server side.
    pub fn set_tls_implicit_server(&mut self, config: Arc<ServerConfig>) -> io::Result<()> {
        self.start_tls_server(config)
    }

    /// Implicit TLS (port 465) from the first byte, client side.
    pub fn set_tls_implicit_client(
        &mut self,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<()> {
        self.start_tls_client(config, name)
    }

    /// The TLS session, if any (for anything [`TlsInfo`] does not cover).
    pub fn tls(&self) -> Option<&Connection> {
        self.tls.as_ref()
    }

    /// What the TLS handshake negotiated; `None` without TLS or before the
    /// handshake is done.
    pub fn tls_info(&self) -> Option<TlsInfo> {
        self.tls.as_ref().and_then(TlsInfo::from_connection)
    }

    /// Gives the stream back (e.g. to deregister it), dropping TLS state.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }
}
