//! The value parsers of the flags that are the command line's own: thread
//! counts, CPU lists, addresses, `USER:PASS`, `I/N`, size ranges, the
//! sink's `--auth` and `--bare-lf`. Quantities are read by
//! [`crate::units`] and `--fault` by [`crate::sink::faults`]; both are
//! re-exported here, so every flag's parser is named from one place.
//!
//! Every parser accepts the human forms users type and, on bad input,
//! returns an error that states the expected form, so that clap prints one
//! line naming the flag.

use std::net::SocketAddr;

use crate::blast::message::SizeRange;
use crate::blast::profile::RateProfile;
use crate::sink::config::AuthPolicy;
use crate::smtp::BareLfPolicy;

pub use crate::sink::faults::parse_fault;
pub use crate::units::{parse_count, parse_duration, parse_percent, parse_rate, parse_size};

/// `--stages`: `30s:0..2000,2m:2000,30s:2000..0` (see
/// [`crate::blast::profile`]).
pub fn parse_stages(s: &str) -> Result<RateProfile, String> {
    RateProfile::parse(s)
}

pub(crate) fn parse_count_nonzero(s: &str) -> Result<u64, String> {
    match parse_count(s)? {
        0 => Err(format!("expected a number of at least 1, got `{s}`")),
        n => Ok(n),
    }
}

pub(crate) fn parse_threads(s: &str) -> Result<usize, String> {
    match parse_count(s) {
        Ok(n) if (1..=4096).contains(&n) => Ok(n as usize),
        _ => Err(format!("expected a thread count from 1 to 4096, got `{s}`")),
    }
}

/// `1KiB` or `512..64KiB`.
pub fn parse_size_range(s: &str) -> Result<SizeRange, String> {
    let err = |e: String| format!("{e}; a range is written MIN..MAX like 512..64KiB");
    match s.split_once("..") {
        None => {
            let v = parse_size(s)?;
            Ok(SizeRange { min: v, max: v })
        }
        Some((a, b)) => {
            let min = parse_size(a).map_err(err)?;
            let max = parse_size(b).map_err(err)?;
            if min > max {
                return Err(format!("expected MIN..MAX with MIN <= MAX, got `{s}`"));
            }
            Ok(SizeRange { min, max })
        }
    }
}

/// `0,2-3` → [0, 2, 3] (the one parser lives in `net::affinity`).
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    crate::net::affinity::parse_cpu_list(s).map_err(|e| e.to_string())
}

/// `127.0.0.1:2525`, `[::1]:2525`, `:2525` (all IPv4), `2525` (loopback).
pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    let err = || format!("expected an address like 127.0.0.1:2525 or [::1]:2525, got `{s}`");
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Some(port) = s.strip_prefix(':') {
        let p: u16 = port.parse().map_err(|_| err())?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], p)));
    }
    if let Ok(p) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], p)));
    }
    if let Some((host, port)) = s.rsplit_once(':') {
        if host == "localhost" {
            let p: u16 = port.parse().map_err(|_| err())?;
            return Ok(SocketAddr::from(([127, 0, 0, 1], p)));
        }
    }
    Err(err())
}

/// Where a sink listens: a TCP address or, written `unix:/path`, a
/// unix-domain stream socket (Postfix's `lmtp:unix:` transport, LMTP
/// clients of Dovecot or Cyrus).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => a.fmt(f),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The path of `unix:/path` (`None` for any other form); an empty path is
/// an error that states the form.
pub fn parse_unix(s: &str) -> Option<Result<std::path::PathBuf, String>> {
    let path = s.strip_prefix("unix:")?;
    Some(if path.is_empty() {
        Err(format!("expected unix:/path/to/socket, got `{s}`"))
    } else {
        Ok(std::path::PathBuf::from(path))
    })
}

/// `unix:/path`, or any form of [`parse_socket_addr`].
pub fn parse_listen_addr(s: &str) -> Result<ListenAddr, String> {
    match parse_unix(s) {
        Some(p) => p.map(ListenAddr::Unix),
        None => parse_socket_addr(s)
            .map(ListenAddr::Tcp)
            .map_err(|e| format!("{e}, or unix:/path")),
    }
}

pub(crate) fn parse_user_pass(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((u, p)) if !u.is_empty() => Ok((u.to_string(), p.to_string())),
        _ => Err(format!("expected USER:PASS, got `{s}`")),
    }
}

pub(crate) fn parse_auth_policy(s: &str) -> Result<AuthPolicy, String> {
    if s == "any" {
        return Ok(AuthPolicy::Any);
    }
    parse_user_pass(s)
        .map(|(user, pass)| AuthPolicy::Only { user, pass })
        .map_err(|_| format!("expected `any` or USER:PASS, got `{s}`"))
}

pub(crate) fn parse_bare_lf(s: &str) -> Result<BareLfPolicy, String> {
    s.parse()
}

/// `I/N` with 0 <= I < N.
pub fn parse_instance(s: &str) -> Result<(u32, u32), String> {
    let err = || format!("expected I/N with 0 <= I < N, like 0/4, got `{s}`");
    let (i, n) = s.split_once('/').ok_or_else(err)?;
    let i: u32 = i.trim().parse().map_err(|_| err())?;
    let n: u32 = n.trim().parse().map_err(|_| err())?;
    if n == 0 || i >= n {
        return Err(err());
    }
    Ok((i, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_accept_suffixes() {
        assert_eq!(parse_count("10k"), Ok(10_000));
        assert_eq!(parse_count("2M"), Ok(2_000_000));
        assert_eq!(parse_count("1_000"), Ok(1000));
        assert_eq!(parse_count("1.5k"), Ok(1500));
        assert!(parse_count("1.5")
            .unwrap_err()
            .contains("expected a whole number"));
        assert!(parse_count("ten").is_err());
        assert!(parse_count("-1").is_err());
    }

    #[test]
    fn durations_accept_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5 parsecs")
            .unwrap_err()
            .contains("like 30s"));
    }

    #[test]
    fn sizes_distinguish_si_and_binary() {
        assert_eq!(parse_size("1KB"), Ok(1000));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(
            parse_size_range("512..64KiB"),
            Ok(SizeRange {
                min: 512,
                max: 65536
            })
        );
        assert!(parse_size_range("2KiB..1KiB").is_err());
        assert!(parse_size("12 bananas").is_err());
    }

    #[test]
    fn rates_percentages_and_instances() {
        assert_eq!(parse_rate("10k"), Ok(10_000.0));
        assert_eq!(parse_rate("2.5k/s"), Ok(2500.0));
        assert!(parse_rate("0").is_err());
        assert_eq!(parse_percent("5%"), Ok(0.05));
        assert!(parse_percent("150%").is_err());
        assert_eq!(parse_instance("1/4"), Ok((1, 4)));
        assert!(parse_instance("4/4").is_err());
    }

    #[test]
    fn cpu_lists_and_addresses() {
        assert_eq!(parse_cpu_list("0,2-3"), Ok(vec![0, 2, 3]));
        assert!(parse_cpu_list("3-1").is_err());
        assert_eq!(
            parse_socket_addr("2525"),
            Ok("127.0.0.1:2525".parse().unwrap())
        );
        assert_eq!(
            parse_socket_addr("[::1]:25"),
            Ok("[::1]:25".parse().unwrap())
        );
        assert_eq!(parse_socket_addr(":25"), Ok("0.0.0.0:25".parse().unwrap()));
        assert!(parse_socket_addr("nowhere").is_err());
    }
}
