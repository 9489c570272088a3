//! PROXY protocol v1 (text) and v2 (binary) headers: parsed by the sink,
//! written by the blaster.
//!
//! Invariants: [`parse`] never panics, never reads past a bounded prefix
//! (107 bytes for v1, 16 + [`MAX_V2_PAYLOAD`] for v2), returns `Ok(None)`
//! only while the bytes so far are a valid prefix of a header, and an error
//! as soon as they cannot be. `LOCAL` / `UNKNOWN` headers parse with no
//! addresses. TLVs in v2 are skipped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// The v2 signature.
pub const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (spec: 107).
pub const V1_MAX: usize = 107;
/// Largest v2 payload (addresses + TLVs) accepted.
pub const MAX_V2_PAYLOAD: usize = 2048;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    pub src: Option<SocketAddr>,
    pub dst: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY v1 header")]
    BadV1,
    #[error("malformed PROXY v2 header")]
    BadV2,
    #[error("PROXY header too long")]
    TooLong,
}

/// Parse a header at the start of `buf`: `Ok(None)` = need more bytes,
/// `Ok(Some((header, consumed)))`, or an error (close the connection).
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let n = buf.len().min(12);
    if buf[..n] == V2_SIG[..n] {
        return if buf.len() < 16 { Ok(None) } else { parse_v2(buf) };
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return parse_v1(buf);
    }
    Err(ProxyError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = memchr::memchr(b'\n', window) else {
        return if buf.len() >= V1_MAX { Err(ProxyError::TooLong) } else { Ok(None) };
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Err(ProxyError::BadV1);
    }
    let line = std::str::from_utf8(&window[6..lf - 1]).map_err(|_| ProxyError::BadV1)?;
    let mut it = line.split(' ');
    let proto = it.next().ok_or(ProxyError::BadV1)?;
    if proto == "UNKNOWN" {
        return Ok(Some((ProxyHeader { src: None, dst: None }, lf + 1)));
    }
    let (s, d, sp, dp) = (it.next(), it.next(), it.next(), it.next());
    let (Some(s), Some(d), Some(sp), Some(dp), None) = (s, d, sp, dp, it.next()) else {
        return Err(ProxyError::BadV1);
    };
    let ip = |t: &str| -> Result<IpAddr, ProxyError> {
        match proto {
            "TCP4" => t.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| ProxyError::BadV1),
            "TCP6" => t.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| ProxyError::BadV1),
            _ => Err(ProxyError::BadV1),
        }
    };
    let port = |t: &str| -> Result<u16, ProxyError> {
        if t.is_empty() || t.len() > 5 || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ProxyError::BadV1);
        }
        t.parse().map_err(|_| ProxyError::BadV1)
    };
    let src = SocketAddr::new(ip(s)?, port(sp)?);
    let dst = SocketAddr::new(ip(d)?, port(dp)?);
    Ok(Some((ProxyHeader { src: Some(src), dst: Some(dst) }, lf + 1)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let ver_cmd = buf[12];
    let fam = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 || ver_cmd & 0x0f > 1 {
        return Err(ProxyError::BadV2);
    }
    if len > MAX_V2_PAYLOAD {
        return Err(ProxyError::TooLong);
    }
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let p = &buf[16..16 + len];
    let total = 16 + len;
    if ver_cmd & 0x0f == 0 {
        // LOCAL: health check etc.; addresses (if any) are ignored.
        return Ok(Some((ProxyHeader { src: None, dst: None }, total)));
    }
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let hdr = match fam >> 4 {
        1 => {
            if p.len() < 12 {
                return Err(ProxyError::BadV2);
            }
            let s = Ipv4Addr::new(p[0], p[1], p[2], p[3]);
            let d = Ipv4Addr::new(p[4], p[5], p[6], p[7]);
            ProxyHeader {
                src: Some(SocketAddr::new(s.into(), port(&p[8..10]))),
                dst: Some(SocketAddr::new(d.into(), port(&p[10..12]))),
            }
        }
        2 => {
            if p.len() < 36 {
                return Err(ProxyError::BadV2);
            }
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&p[..16]);
            d.copy_from_slice(&p[16..32]);
            ProxyHeader {
                src: Some(SocketAddr::new(Ipv6Addr::from(s).into(), port(&p[32..34]))),
                dst: Some(SocketAddr::new(Ipv6Addr::from(d).into(), port(&p[34..36]))),
            }
        }
        // AF_UNSPEC / AF_UNIX: no IP addresses to report.
        0 | 3 => ProxyHeader { src: None, dst: None },
        _ => return Err(ProxyError::BadV2),
    };
    Ok(Some((hdr, total)))
}

fn same_family(src: SocketAddr, dst: SocketAddr) -> (IpAddr, IpAddr) {
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V6(d)) => (IpAddr::V6(s.to_ipv6_mapped()), IpAddr::V6(d)),
        (IpAddr::V6(s), IpAddr::V4(d)) => (IpAddr::V6(s), IpAddr::V6(d.to_ipv6_mapped())),
        (s, d) => (s, d),
    }
}

/// Append a v1 header for a TCP connection from `src` to `dst`.
pub fn write_v1(src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    use std::io::Write;
    let (s, d) = same_family(src, dst);
    let proto = if s.is_ipv4() { "TCP4" } else { "TCP6" };
    // Writing to a Vec cannot fail.
    let _ = write!(out, "PROXY {proto} {s} {d} {} {}\r\n", src.port(), dst.port());
}

/// Append a v2 header (PROXY command, TCP over IPv4/IPv6, no TLVs).
pub fn write_v2(src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&V2_SIG);
    out.push(0x21);
    match same_family(src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a,
                IpAddr::V4(a) => a.to_ipv6_mapped(),
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> [(SocketAddr, SocketAddr); 2] {
        [
            ("10.0.0.1:1234".parse().unwrap(), "10.0.0.2:25".parse().unwrap()),
            ("[2001:db8::1]:40000".parse().unwrap(), "[::1]:25".parse().unwrap()),
        ]
    }

    #[test]
    fn v1_and_v2_round_trip_at_every_length() {
        for (s, d) in addrs() {
            for v2 in [false, true] {
                let mut buf = Vec::new();
                if v2 { write_v2(s, d, &mut buf) } else { write_v1(s, d, &mut buf) }
                buf.extend_from_slice(b"EHLO x\r\n");
                let hlen = buf.len() - 8;
                for cut in 0..hlen {
                    assert_eq!(parse(&buf[..cut]), Ok(None), "cut {cut}");
                }
                let (h, n) = parse(&buf).unwrap().unwrap();
                assert_eq!(n, hlen);
                assert_eq!(h, ProxyHeader { src: Some(s), dst: Some(d) });
            }
        }
    }

    #[test]
    fn garbage_is_rejected_early() {
        assert_eq!(parse(b"EHLO"), Err(ProxyError::NotProxy));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4 x 1 2\r\n"), Err(ProxyError::BadV1));
        assert_eq!(parse(&[b'P'; 1][..]), Ok(None));
        let mut long = b"PROXY ".to_vec();
        long.extend(std::iter::repeat_n(b'1', 200));
        assert_eq!(parse(&long), Err(ProxyError::TooLong));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Some((ProxyHeader { src: None, dst: None }, 15))));
    }
}
