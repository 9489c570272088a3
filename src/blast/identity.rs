//! Per-session client identities: `--proxy-source RANGE` (the source the
//! PROXY header claims) and `--xclient ATTR=TEMPLATE` (the attributes an
//! XCLIENT command claims), so one machine can present thousands of
//! clients to a server that trusts it (Postfix `smtpd_upstream_proxy_protocol`,
//! `smtpd_authorized_xclient_hosts`; Exim, HAProxy-fronted MTAs).
//!
//! [`Identities::session`] maps a session number to its identity: a pure
//! function of the number, the flags and `--instance`, so runs repeat
//! exactly. Ranges are split across instances like `--source-ip` (instance
//! I of N takes addresses I, I+N, I+2N, …), so instances never claim the
//! same address; `{n}` in a template is the session number made unique
//! across instances (`seq * N + I`).
//!
//! Invariants: an [`AddrRange`] is never empty and never allocates (a /8 or
//! a /64 costs as much as one address); session `seq` of an instance claims
//! address `seq mod count` of its share, and the PROXY source port is
//! `1024 + (seq / count) mod 64512`, so every (address, port) pair is
//! distinct for `count × 64512` sessions. XCLIENT values are xtext-encoded
//! (RFC 3461 4: `+XX` for `+`, `=`, controls, space and non-ASCII);
//! addresses are written as Postfix expects (`IPV6:` before IPv6).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// XCLIENT attribute names a template may set (Postfix's set).
pub const XCLIENT_NAMES: [&str; 9] = [
    "NAME",
    "REVERSE_NAME",
    "ADDR",
    "PORT",
    "PROTO",
    "HELO",
    "LOGIN",
    "DESTADDR",
    "DESTPORT",
];

/// Lowest claimed PROXY source port, and how many ports follow it.
const PROXY_PORT_FIRST: u16 = 1024;
const PROXY_PORT_COUNT: u64 = 65536 - PROXY_PORT_FIRST as u64;

/// Errors of parsing identity flags (each names what it expected).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("`{0}`: expected an IP address, a range A-B or a CIDR block such as 198.51.100.0/24")]
    Range(String),
    #[error(
        "`{0}`: expected ATTR=TEMPLATE with ATTR one of NAME, REVERSE_NAME, ADDR, PORT, \
         PROTO, HELO, LOGIN, DESTADDR, DESTPORT (ADDR takes a range such as 198.51.100.0/24)"
    )]
    Attr(String),
    #[error("`{0}`: unknown placeholder `{{{1}}}`; expected {{n}} or {{instance}}")]
    Placeholder(String, String),
    #[error("--xclient {0} is given twice")]
    Duplicate(String),
    #[error("--instance {1}/{2}: {0} has only {3} addresses, fewer than the {2} instances")]
    Split(&'static str, u32, u32, u128),
}

/// A contiguous range of IP addresses of one family (never empty).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrRange {
    first: u128,
    count: u128,
    v4: bool,
}

impl AddrRange {
    /// `198.51.100.7`, `198.51.100.10-198.51.100.99`, `198.51.100.0/24`,
    /// `2001:db8::/64`, `[2001:db8::1]-[2001:db8::ff]`.
    pub fn parse(input: &str) -> Result<Self, IdentityError> {
        let err = || IdentityError::Range(input.to_string());
        let one = |s: &str| -> Result<IpAddr, IdentityError> {
            let s = s.trim();
            let s = s
                .strip_prefix('[')
                .and_then(|s| s.strip_suffix(']'))
                .unwrap_or(s);
            s.parse::<IpAddr>().map_err(|_| err())
        };
        let bits = |ip: IpAddr| -> (u128, bool) {
            match ip {
                IpAddr::V4(a) => (u128::from(u32::from(a)), true),
                IpAddr::V6(a) => (u128::from(a), false),
            }
        };
        let text = input.trim();
        if let Some((addr, prefix)) = text.split_once('/') {
            let (base, v4) = bits(one(addr)?);
            let width = if v4 { 32 } else { 128 };
            let prefix: u32 = prefix.trim().parse().map_err(|_| err())?;
            if prefix > width {
                return Err(err());
            }
            let host_bits = width - prefix;
            // A /0 of IPv6 holds 2^128 addresses: one short of it is plenty.
            let count = if host_bits >= 128 {
                u128::MAX
            } else {
                1u128 << host_bits
            };
            let first = if host_bits >= 128 {
                0
            } else {
                base & !(count - 1)
            };
            return Ok(Self { first, count, v4 });
        }
        let (lo, hi) = match text.split_once('-') {
            Some((a, b)) => (one(a)?, one(b)?),
            None => {
                let ip = one(text)?;
                (ip, ip)
            }
        };
        let ((lo, v4), (hi, v4b)) = (bits(lo), bits(hi));
        if v4 != v4b || lo > hi {
            return Err(err());
        }
        Ok(Self {
            first: lo,
            count: (hi - lo).saturating_add(1),
            v4,
        })
    }

    /// Number of addresses.
    pub fn len(&self) -> u128 {
        self.count
    }

    /// Never true: a range holds at least one address.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Address `i` (counted from the first, wrapping around).
    pub fn nth(&self, i: u128) -> IpAddr {
        let n = self.first.wrapping_add(i % self.count);
        if self.v4 {
            IpAddr::V4(Ipv4Addr::from(n as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(n))
        }
    }
}

impl std::fmt::Display for AddrRange {
    /// `A` or `A-B`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.count == 1 {
            write!(f, "{}", self.nth(0))
        } else {
            write!(f, "{}-{}", self.nth(0), self.nth(self.count - 1))
        }
    }
}

/// Instance I of N's share of a range: addresses I, I+N, I+2N, …
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Share {
    range: AddrRange,
    offset: u128,
    stride: u128,
    count: u128,
}

impl Share {
    fn new(
        what: &'static str,
        range: AddrRange,
        (inst, ninst): (u32, u32),
    ) -> Result<Self, IdentityError> {
        let (i, n) = (u128::from(inst), u128::from(ninst.max(1)));
        if range.len() <= i {
            return Err(IdentityError::Split(what, inst, ninst, range.len()));
        }
        Ok(Self {
            range,
            offset: i,
            stride: n,
            count: (range.len() - i).div_ceil(n),
        })
    }

    fn get(&self, k: u128) -> IpAddr {
        self.range.nth(self.offset + (k % self.count) * self.stride)
    }
}

/// One piece of a compiled template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Lit(String),
    /// The session number, unique across instances.
    N,
    Instance,
}

/// What an XCLIENT attribute claims per session.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Value {
    /// `ADDR` from a range.
    Range(AddrRange),
    Template(Vec<Piece>),
}

/// One `--xclient ATTR=TEMPLATE`, parsed (the clap value type).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XclientAttr {
    /// Canonical (upper-case) attribute name, one of [`XCLIENT_NAMES`].
    name: &'static str,
    value: Value,
    /// The flag as given (for the config echo).
    given: String,
}

impl XclientAttr {
    /// Parses `ATTR=TEMPLATE`: `ADDR` takes a range (or `[UNAVAILABLE]`),
    /// every other attribute a template with `{n}` and `{instance}`.
    pub fn parse(input: &str) -> Result<Self, IdentityError> {
        let (name, value) = input
            .split_once('=')
            .ok_or_else(|| IdentityError::Attr(input.to_string()))?;
        let name = XCLIENT_NAMES
            .into_iter()
            .find(|n| n.eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| IdentityError::Attr(input.to_string()))?;
        let special = value.eq_ignore_ascii_case("[UNAVAILABLE]")
            || value.eq_ignore_ascii_case("[TEMPUNAVAIL]");
        let value = if name == "ADDR" && !special {
            Value::Range(AddrRange::parse(value)?)
        } else {
            Value::Template(compile(input, value)?)
        };
        Ok(Self {
            name,
            value,
            given: input.to_string(),
        })
    }

    /// The flag as given.
    pub fn as_str(&self) -> &str {
        &self.given
    }
}

fn compile(input: &str, template: &str) -> Result<Vec<Piece>, IdentityError> {
    let mut pieces = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            pieces.push(Piece::Lit(rest[..open].to_string()));
        }
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| IdentityError::Placeholder(input.to_string(), after.to_string()))?;
        pieces.push(match &after[..close] {
            "n" => Piece::N,
            "instance" => Piece::Instance,
            other => {
                return Err(IdentityError::Placeholder(
                    input.to_string(),
                    other.to_string(),
                ))
            }
        });
        rest = &after[close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Lit(rest.to_string()));
    }
    Ok(pieces)
}

/// Appends `value` xtext-encoded (RFC 3461 4).
fn xtext(out: &mut String, value: &str) {
    for b in value.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
}

/// The identity one session claims.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// Source address for the PROXY header (`None`: the real one).
    pub proxy_source: Option<SocketAddr>,
    /// What follows `XCLIENT ` (`None`: no XCLIENT).
    pub xclient: Option<Box<[u8]>>,
}

/// The identity generator of one instance (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct Identities {
    proxy: Option<Share>,
    xclient: Vec<(&'static str, XValue)>,
    instance: (u32, u32),
}

#[derive(Clone, Debug)]
enum XValue {
    Addr(Share),
    Template(Vec<Piece>),
}

impl Identities {
    /// Validates the flags for instance `(I, N)`.
    pub fn new(
        proxy_source: Option<AddrRange>,
        xclient: &[XclientAttr],
        instance: (u32, u32),
    ) -> Result<Self, IdentityError> {
        let proxy = proxy_source
            .map(|r| Share::new("--proxy-source", r, instance))
            .transpose()?;
        let mut attrs: Vec<(&'static str, XValue)> = Vec::new();
        for a in xclient {
            if attrs.iter().any(|(n, _)| *n == a.name) {
                return Err(IdentityError::Duplicate(a.name.to_string()));
            }
            let v = match &a.value {
                Value::Range(r) => XValue::Addr(Share::new("--xclient ADDR", *r, instance)?),
                Value::Template(t) => XValue::Template(t.clone()),
            };
            attrs.push((a.name, v));
        }
        Ok(Self {
            proxy,
            xclient: attrs,
            instance,
        })
    }

    /// True if sessions claim nothing (no flag given).
    pub fn is_empty(&self) -> bool {
        self.proxy.is_none() && self.xclient.is_empty()
    }

    /// The identity of session `seq` (0, 1, 2, … within this instance).
    pub fn session(&self, seq: u64) -> Identity {
        let proxy_source = self.proxy.map(|s| {
            let k = u128::from(seq);
            let round = (k / s.count) as u64;
            let port = PROXY_PORT_FIRST + (round % PROXY_PORT_COUNT) as u16;
            SocketAddr::new(s.get(k), port)
        });
        let xclient = (!self.xclient.is_empty()).then(|| {
            let (inst, ninst) = self.instance;
            let n = seq
                .saturating_mul(u64::from(ninst.max(1)))
                .saturating_add(u64::from(inst));
            let mut line = String::with_capacity(64);
            let mut value = String::with_capacity(32);
            for (name, v) in &self.xclient {
                if !line.is_empty() {
                    line.push(' ');
                }
                line.push_str(name);
                line.push('=');
                value.clear();
                match v {
                    XValue::Addr(s) => match s.get(u128::from(seq)) {
                        IpAddr::V4(a) => {
                            let _ = write!(value, "{a}");
                        }
                        IpAddr::V6(a) => {
                            let _ = write!(value, "IPV6:{a}");
                        }
                    },
                    XValue::Template(pieces) => {
                        for p in pieces {
                            match p {
                                Piece::Lit(s) => value.push_str(s),
                                Piece::N => {
                                    let _ = write!(value, "{n}");
                                }
                                Piece::Instance => {
                                    let _ = write!(value, "{inst}");
                                }
                            }
                        }
                    }
                }
                xtext(&mut line, &value);
            }
            line.into_bytes().into_boxed_slice()
        });
        Identity {
            proxy_source,
            xclient,
        }
    }
}

/// clap value parser for `--proxy-source`.
pub fn parse_proxy_source(s: &str) -> Result<AddrRange, String> {
    AddrRange::parse(s).map_err(|e| e.to_string())
}

/// clap value parser for `--xclient`.
pub fn parse_xclient(s: &str) -> Result<XclientAttr, String> {
    XclientAttr::parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xclient_line(ids: &Identities, seq: u64) -> String {
        String::from_utf8(ids.session(seq).xclient.unwrap().into_vec()).unwrap()
    }

    #[test]
    fn ranges_parse_as_single_addresses_spans_and_cidr_blocks() {
        let r = AddrRange::parse("198.51.100.0/24").unwrap();
        assert_eq!(
            (r.len(), r.nth(0), r.nth(255)),
            (256, ip("198.51.100.0"), ip("198.51.100.255"))
        );
        assert_eq!(r.nth(256), ip("198.51.100.0"), "wraps around");
        let r = AddrRange::parse("198.51.100.77/24").unwrap();
        assert_eq!(r.nth(0), ip("198.51.100.0"), "host bits are masked");
        let r = AddrRange::parse("192.0.2.7").unwrap();
        assert_eq!((r.len(), r.nth(5)), (1, ip("192.0.2.7")));
        let r = AddrRange::parse("192.0.2.250-192.0.3.4").unwrap();
        assert_eq!((r.len(), r.nth(6)), (11, ip("192.0.3.0")));
        let r = AddrRange::parse("[2001:db8::1]-[2001:db8::3]").unwrap();
        assert_eq!((r.len(), r.nth(2)), (3, ip("2001:db8::3")));
        let r = AddrRange::parse("2001:db8::/32").unwrap();
        assert_eq!(r.len(), 1u128 << 96);
        assert_eq!(AddrRange::parse("0.0.0.0/0").unwrap().len(), 1u128 << 32);
        assert_eq!(AddrRange::parse("::/0").unwrap().len(), u128::MAX);
        for bad in [
            "",
            "x",
            "198.51.100.0/33",
            "10.0.0.9-10.0.0.1",
            "10.0.0.1-::1",
            "1.2.3.4/x",
        ] {
            let e = AddrRange::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("expected an IP address, a range A-B or a CIDR block"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn proxy_sources_are_deterministic_distinct_and_split_across_instances() {
        let r = AddrRange::parse("198.51.100.0/30").unwrap();
        let a = Identities::new(Some(r), &[], (0, 1)).unwrap();
        let srcs: Vec<SocketAddr> = (0..8).map(|s| a.session(s).proxy_source.unwrap()).collect();
        assert_eq!(srcs[0], "198.51.100.0:1024".parse().unwrap());
        assert_eq!(srcs[3], "198.51.100.3:1024".parse().unwrap());
        assert_eq!(srcs[4], "198.51.100.0:1025".parse().unwrap());
        let mut uniq = srcs.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), 8);
        assert_eq!(
            a.session(5),
            a.session(5),
            "a pure function of the session number"
        );
        assert_eq!(a.session(3).xclient, None);
        // Two instances: disjoint addresses, together the whole range.
        let i0 = Identities::new(Some(r), &[], (0, 2)).unwrap();
        let i1 = Identities::new(Some(r), &[], (1, 2)).unwrap();
        let ips = |ids: &Identities| -> Vec<IpAddr> {
            (0..2)
                .map(|s| ids.session(s).proxy_source.unwrap().ip())
                .collect()
        };
        assert_eq!(ips(&i0), [ip("198.51.100.0"), ip("198.51.100.2")]);
        assert_eq!(ips(&i1), [ip("198.51.100.1"), ip("198.51.100.3")]);
        let one = AddrRange::parse("192.0.2.1").unwrap();
        let e = Identities::new(Some(one), &[], (1, 2)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--instance 1/2: --proxy-source has only 1 addresses, fewer than the 2 instances"
        );
    }

    #[test]
    fn xclient_attributes_follow_their_templates_xtext_encoded() {
        let attrs: Vec<XclientAttr> = [
            "ADDR=198.51.100.0/24",
            "name=client{n}.example",
            "LOGIN=a b+c=d",
            "PROTO=ESMTP",
        ]
        .iter()
        .map(|s| XclientAttr::parse(s).unwrap())
        .collect();
        let ids = Identities::new(None, &attrs, (0, 1)).unwrap();
        assert_eq!(
            xclient_line(&ids, 7),
            "ADDR=198.51.100.7 NAME=client7.example LOGIN=a+20b+2Bc+3Dd PROTO=ESMTP"
        );
        assert_eq!(ids.session(7).proxy_source, None);
        // Instance 1 of 3: its own addresses, and {n} unique across instances.
        let ids = Identities::new(None, &attrs[..2], (1, 3)).unwrap();
        assert_eq!(
            xclient_line(&ids, 2),
            "ADDR=198.51.100.7 NAME=client7.example"
        );
        let v6 = [XclientAttr::parse("ADDR=2001:db8::/120").unwrap()];
        let ids = Identities::new(None, &v6, (0, 1)).unwrap();
        assert_eq!(xclient_line(&ids, 5), "ADDR=IPV6:2001:db8::5");
        let un = [
            XclientAttr::parse("ADDR=[UNAVAILABLE]").unwrap(),
            XclientAttr::parse("HELO=h{instance}").unwrap(),
        ];
        let ids = Identities::new(None, &un, (2, 4)).unwrap();
        assert_eq!(xclient_line(&ids, 0), "ADDR=[UNAVAILABLE] HELO=h2");
    }

    #[test]
    fn bad_xclient_flags_say_what_was_expected() {
        for (bad, want) in [
            ("ADDR", "expected ATTR=TEMPLATE"),
            ("COLOR=red", "expected ATTR=TEMPLATE with ATTR one of NAME"),
            (
                "ADDR=not-an-ip",
                "expected an IP address, a range A-B or a CIDR block",
            ),
            (
                "NAME=client{i}.example",
                "unknown placeholder `{i}`; expected {n} or {instance}",
            ),
            ("NAME=client{n", "unknown placeholder"),
        ] {
            let e = parse_xclient(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        let twice = [
            XclientAttr::parse("NAME=a").unwrap(),
            XclientAttr::parse("name=b").unwrap(),
        ];
        assert_eq!(
            Identities::new(None, &twice, (0, 1))
                .unwrap_err()
                .to_string(),
            "--xclient NAME is given twice"
        );
    }
}
