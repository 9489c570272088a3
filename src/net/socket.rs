//! Listening and connecting sockets, built with socket2 and handed to mio.
//!
//! [`listen`] makes a non-blocking listener with `SO_REUSEADDR`, optionally
//! `SO_REUSEPORT` (one listener per worker thread on the same port, the kernel
//! spreading connections), and `IPV6_V6ONLY` for IPv6. [`connect`] starts a
//! non-blocking connect, optionally from a chosen source IP with
//! `IP_BIND_ADDRESS_NO_PORT` (so the kernel picks the port at connect time per
//! 4-tuple, not per source IP at bind time — the difference between ~28k and
//! millions of connections from one address range). Every returned socket is
//! non-blocking; every error is an `io::Error`, and "address not available" is
//! wrapped in a [`SocketError::AddrNotAvailable`] whose message says what to do.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use thiserror::Error;

/// The listen backlog used when callers have no better idea.
pub const DEFAULT_BACKLOG: i32 = 4096;

/// The largest address range [`parse_ip_range`] expands (a /16 of IPv4).
pub const MAX_IP_RANGE: usize = 65_536;

/// Errors from socket setup and address parsing.
#[derive(Debug, Error)]
pub enum SocketError {
    /// `EADDRNOTAVAIL` on connect or bind.
    #[error("cannot connect to {target}{}: address not available (out of ephemeral ports, or source address not local) — use --source-ip 127.0.0.2-127.0.0.40 to spread connections over more source addresses", source_ip.map(|ip| format!(" from {ip}")).unwrap_or_default())]
    AddrNotAvailable {
        /// The address we tried to connect to.
        target: SocketAddr,
        /// The source address we bound, if any.
        source_ip: Option<IpAddr>,
    },
    /// A source-address range that does not parse.
    #[error("invalid address range `{input}`: {reason}; expected an IP or a range like 127.0.0.2-127.0.0.40 or ::1-::9")]
    InvalidRange {
        /// The text as given.
        input: String,
        /// What was wrong with it.
        reason: String,
    },
    /// `/proc/sys/net/ipv4/ip_local_port_range` could not be read or parsed.
    #[error("cannot read the local port range: {0}")]
    PortRange(String),
}

/// True if `err` is (or wraps) "address not available": the client ran out of
/// ephemeral ports for its source address(es), or bound a non-local address.
pub fn is_addr_not_available(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::EADDRNOTAVAIL)
        || err.kind() == io::ErrorKind::AddrNotAvailable
        || err
            .get_ref()
            .and_then(|e| e.downcast_ref::<SocketError>())
            .is_some_and(|e| matches!(e, SocketError::AddrNotAvailable { .. }))
}

fn domain_of(addr: &SocketAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

/// A non-blocking TCP listener on `addr`.
///
/// `reuse_port` sets `SO_REUSEPORT` so each worker thread can own a listener on
/// the same port. `backlog` defaults to [`DEFAULT_BACKLOG`] (the kernel caps it
/// at `net.core.somaxconn`).
pub fn listen(
    addr: SocketAddr,
    reuse_port: bool,
    backlog: Option<i32>,
) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        domain_of(&addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(backlog.unwrap_or(DEFAULT_BACKLOG))?;
    Ok(socket.into())
}

/// A listening unix-domain stream socket at `path` (`--listen unix:/path`),
/// blocking (each backend sets the mode it needs), with the removal of its
/// file when the returned guard is dropped. A socket file already there
/// that nobody listens on (left by a run that was killed) is replaced; a
/// live one, or any other kind of file, is an error. The socket is made
/// readable and writable by every local user (mode 0666), as a TCP port
/// on loopback is open to all of them: an MTA's LMTP client runs as its
/// own user.
pub fn listen_unix(
    path: &std::path::Path,
    backlog: Option<i32>,
) -> io::Result<(std::os::unix::net::UnixListener, UnixSocketFile)> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let stale = meta.file_type().is_socket()
            && matches!(
                std::os::unix::net::UnixStream::connect(path),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
            );
        if !stale {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "the path exists (a socket in use, or not a socket)",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(path)?)?;
    let guard = UnixSocketFile(path.to_path_buf());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    socket.listen(backlog.unwrap_or(DEFAULT_BACKLOG))?;
    Ok((socket.into(), guard))
}

/// A unix socket file made by [`listen_unix`]: removed when dropped.
#[derive(Debug)]
pub struct UnixSocketFile(std::path::PathBuf);

impl UnixSocketFile {
    /// The socket's path.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for UnixSocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Sets `TCP_NODELAY` on an accepted stream (SMTP is request/reply: Nagle
/// would add up to 40 ms to every pipelined reply batch).
pub fn prepare_accepted(stream: &mio::net::TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)
}

/// `IP_BIND_ADDRESS_NO_PORT`: defer the source-port choice to `connect()`.
fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: the fd is a valid open socket owned by `socket` for the duration
    // of the call; the option value points to a live c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The "address not available" error for a connect to `target` (from
/// `source_ip`), with the message that says what to do.
pub fn addr_not_available(target: SocketAddr, source_ip: Option<IpAddr>) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        SocketError::AddrNotAvailable { target, source_ip },
    )
}

/// Starts a non-blocking connect to `target`.
///
/// With `source_ip`, the socket is bound to that address with port 0 and
/// `IP_BIND_ADDRESS_NO_PORT`. `TCP_NODELAY` is always set; `abort_close` sets
/// `SO_LINGER 0` so closing sends RST and leaves no TIME_WAIT (for load tests
/// that churn connections). The connect is usually still in progress on
/// return: register the stream for WRITABLE and call [`connect_finished`] on
/// each writable event. `EADDRNOTAVAIL` comes back as an error for which
/// [`is_addr_not_available`] is true and whose message explains the fix.
pub fn connect(
    target: SocketAddr,
    source_ip: Option<IpAddr>,
    abort_close: bool,
) -> io::Result<mio::net::TcpStream> {
    let socket = client_socket(target, source_ip, abort_close, true)?;
    match socket.connect(&SockAddr::from(target)) {
        Ok(()) => {}
        // EINPROGRESS: the normal case for a non-blocking connect.
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        // EINTR: the connect continues asynchronously, like EINPROGRESS.
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
        Err(e) if is_addr_not_available(&e) => return Err(addr_not_available(target, source_ip)),
        Err(e) => return Err(e),
    }
    Ok(mio::net::TcpStream::from_std(socket.into()))
}

/// A TCP socket ready to connect to `target`, set up as [`connect`]
/// describes (source address, `TCP_NODELAY`, `SO_LINGER 0`), but not yet
/// connected: for a backend that connects by other means (io_uring).
/// `nonblocking`: the descriptor's `O_NONBLOCK`.
pub fn client_socket(
    target: SocketAddr,
    source_ip: Option<IpAddr>,
    abort_close: bool,
    nonblocking: bool,
) -> io::Result<Socket> {
    let ty = if nonblocking {
        Type::STREAM.nonblocking()
    } else {
        Type::STREAM
    };
    let socket = Socket::new(domain_of(&target), ty, Some(Protocol::TCP))?;
    socket.set_tcp_nodelay(true)?;
    if abort_close {
        socket.set_linger(Some(Duration::ZERO))?;
    }
    if let Some(ip) = source_ip {
        if ip.is_ipv4() != target.is_ipv4() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("source address {ip} and target {target} are of different IP families"),
            ));
        }
        // Best effort: without it bind() picks a port per source address and
        // we only lose scale, not correctness.
        let _ = set_bind_address_no_port(&socket);
        if let Err(e) = socket.bind(&SockAddr::from(SocketAddr::new(ip, 0))) {
            return Err(if is_addr_not_available(&e) {
                addr_not_available(target, source_ip)
            } else {
                e
            });
        }
    }
    Ok(socket)
}

/// Checks a connecting stream after a writable (or error) event.
///
/// `Ok(true)`: connected. `Ok(false)`: still in progress (a spurious wakeup;
/// keep waiting). `Err`: the connect failed (refused, unreachable, out of
/// ports...), the stream should be dropped.
pub fn connect_finished(stream: &mio::net::TcpStream) -> io::Result<bool> {
    if let Some(err) = stream.take_error()? {
        return Err(err);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        // ENOTCONN: not connected yet.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(false),
        Err(e) => Err(e),
    }
}

fn range_error(input: &str, reason: impl Into<String>) -> SocketError {
    SocketError::InvalidRange {
        input: input.to_string(),
        reason: reason.into(),
    }
}

/// Expands `127.0.0.2-127.0.0.40` (or a single address, or an IPv6 range such
/// as `::1-::9` or `[fd00::1]-[fd00::9]`) into its addresses, in order.
/// At most [`MAX_IP_RANGE`] addresses.
pub fn parse_ip_range(input: &str) -> Result<Vec<IpAddr>, SocketError> {
    let text = input.trim();
    if text.is_empty() {
        return Err(range_error(input, "it is empty"));
    }
    let parse_one = |s: &str| -> Result<IpAddr, SocketError> {
        let s = s.trim();
        let s = s
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or(s);
        s.parse::<IpAddr>()
            .map_err(|_| range_error(input, format!("`{s}` is not an IP address")))
    };
    let (lo, hi) = match text.split_once('-') {
        Some((a, b)) => (parse_one(a)?, parse_one(b)?),
        None => {
            let ip = parse_one(text)?;
            (ip, ip)
        }
    };
    let (lo, hi, v4): (u128, u128, bool) = match (lo, hi) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a).into(), u32::from(b).into(), true),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), false),
        _ => {
            return Err(range_error(
                input,
                "both ends must be of the same IP family",
            ))
        }
    };
    if lo > hi {
        return Err(range_error(input, "the range is reversed"));
    }
    if hi - lo >= MAX_IP_RANGE as u128 {
        return Err(range_error(
            input,
            format!("more than {MAX_IP_RANGE} addresses"),
        ));
    }
    Ok((lo..=hi)
        .map(|n| {
            if v4 {
                IpAddr::V4(Ipv4Addr::from(n as u32))
            } else {
                IpAddr::V6(Ipv6Addr::from(n))
            }
        })
        .collect())
}

/// The kernel's ephemeral port range `(low, high)`, inclusive, from
/// `/proc/sys/net/ipv4/ip_local_port_range` (also used for IPv6).
pub fn local_port_range() -> Result<(u16, u16), SocketError> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .map_err(|e| SocketError::PortRange(e.to_string()))?;
    parse_port_range(&text)
}

/// Parses the text of `ip_local_port_range` (`"32768\t60999\n"`).
pub fn parse_port_range(text: &str) -> Result<(u16, u16), SocketError> {
    let mut parts = text.split_ascii_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Ok((lo, hi)),
        _ => Err(SocketError::PortRange(format!(
            "unexpected content `{}`",
            text.trim()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_range_expands_inclusively() {
        let ips = parse_ip_range("127.0.0.2-127.0.0.40").unwrap();
        assert_eq!(ips.len(), 39);
        assert_eq!(ips[0], "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(ips[38], "127.0.0.40".parse::<IpAddr>().unwrap());
        let across = parse_ip_range("10.0.0.255-10.0.1.1").unwrap();
        assert_eq!(across.len(), 3);
        assert_eq!(
            parse_ip_range("127.0.0.9").unwrap(),
            vec!["127.0.0.9".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn ipv6_ranges_expand_and_accept_brackets() {
        let ips = parse_ip_range("::1-::3").unwrap();
        assert_eq!(
            ips,
            vec![
                "::1".parse::<IpAddr>().unwrap(),
                "::2".parse().unwrap(),
                "::3".parse().unwrap()
            ]
        );
        assert_eq!(parse_ip_range("[fd00::1]-[fd00::2]").unwrap().len(), 2);
        // A low IPv6 address stays IPv6.
        assert!(parse_ip_range("::").unwrap()[0].is_ipv6());
    }

    #[test]
    fn bad_ranges_name_the_expected_form() {
        for bad in [
            "",
            "x",
            "127.0.0.1-",
            "127.0.0.5-127.0.0.1",
            "127.0.0.1-::1",
            "10.0.0.0-10.255.0.0",
            "1.2.3.4-5",
        ] {
            let err = parse_ip_range(bad).unwrap_err().to_string();
            assert!(err.contains("127.0.0.2-127.0.0.40"), "{bad}: {err}");
        }
    }

    #[test]
    fn port_range_text_parses() {
        assert_eq!(parse_port_range("32768\t60999\n").unwrap(), (32768, 60999));
        assert!(parse_port_range("").is_err());
        assert!(parse_port_range("9 1").is_err());
        let (lo, hi) = local_port_range().unwrap();
        assert!(lo <= hi);
    }

    #[test]
    fn addr_not_available_error_says_what_to_do() {
        let err = addr_not_available(
            "127.0.0.1:25".parse().unwrap(),
            Some("127.0.0.2".parse().unwrap()),
        );
        assert!(is_addr_not_available(&err));
        let text = err.to_string();
        assert!(text.contains("--source-ip 127.0.0.2-127.0.0.40"), "{text}");
        assert!(text.contains("from 127.0.0.2"), "{text}");
    }

    #[test]
    fn binding_a_non_local_source_is_addr_not_available() {
        // 192.0.2.0/24 is TEST-NET-1: never a local address; nothing is sent.
        let err = connect(
            "127.0.0.1:9".parse().unwrap(),
            Some("192.0.2.1".parse().unwrap()),
            false,
        )
        .unwrap_err();
        assert!(is_addr_not_available(&err), "{err}");
    }

    #[test]
    fn reuse_port_listeners_share_a_port_and_accept_connects() {
        let a = listen("127.0.0.1:0".parse().unwrap(), true, None).unwrap();
        let addr = a.local_addr().unwrap();
        let b = listen(addr, true, Some(16)).unwrap();
        assert_eq!(b.local_addr().unwrap(), addr);
        let stream = connect(addr, Some("127.0.0.1".parse().unwrap()), true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !connect_finished(&stream).unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "connect did not finish"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(stream.nodelay().unwrap());
    }

    #[test]
    fn a_unix_listener_replaces_a_stale_socket_refuses_a_live_one_and_removes_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lmtp.sock");
        // A stale socket file: bound, then its listener closed.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (l, guard) = listen_unix(&path, None).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        // A live one is not taken over.
        let e = listen_unix(&path, None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        // Nor is a regular file.
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(listen_unix(&file, None).is_err());
        assert!(file.exists());
        drop(l);
        drop(guard);
        assert!(!path.exists());
    }

    #[test]
    fn ipv6_listener_is_v6_only() {
        // Loopback ::1 may be missing in some containers; skip quietly then.
        if let Ok(l) = listen("[::1]:0".parse().unwrap(), false, None) {
            let sock = socket2::SockRef::from(&l);
            assert!(sock.only_v6().unwrap());
        }
    }
}
