//! `smtpstorm sink`: its flags and their validation into a [`SinkConfig`].
//!
//! [`config`] does every cross-flag check (unknown `--disable` names, empty
//! listen lists, a zero connection limit, `--require-tls` without TLS) so
//! the event loop never meets a bad combination. The protocol part becomes
//! one shared [`ServerConfig`]; the rest (threads, faults, capture, stop
//! conditions) is the sink's own. Invariant: a `SinkConfig` that exists is
//! runnable; only I/O (binding, TLS files) can still fail at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use thiserror::Error;

use super::parse::{
    parse_auth_policy, parse_bare_lf, parse_count, parse_duration, parse_fault, parse_listen_addr,
    parse_rate, parse_size, parse_socket_addr, ListenAddr,
};
use super::ThreadArgs;
use crate::net::runtime::Cpus;
use crate::sink::config::{AuthPolicy, SinkConfig};
use crate::sink::faults::FaultSpec;
use crate::smtp::server::{Extensions, ServerConfig};
use crate::smtp::{BareLfPolicy, ServerTimeouts};

#[derive(Debug, Clone, Args)]
pub struct SinkArgs {
    /// Address to accept plaintext SMTP on (repeatable; STARTTLS offered there), or
    /// `unix:/path` for a unix-domain socket (--io epoll or uring; removed on exit).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:2525", value_parser = parse_listen_addr)]
    pub listen: Vec<ListenAddr>,
    /// Address to accept implicit TLS on, 465-style (repeatable).
    #[arg(long, value_name = "ADDR", value_parser = parse_socket_addr)]
    pub tls_listen: Vec<SocketAddr>,
    #[command(flatten)]
    pub threads: ThreadArgs,
    /// Certificate chain (PEM); a self-signed certificate is made in memory if absent.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Do not offer STARTTLS.
    #[arg(long)]
    pub no_starttls: bool,
    #[command(flatten)]
    pub tls_choice: super::TlsChoiceArgs,
    /// Connections open at once; past it new ones get `421 4.7.0` and are closed.
    #[arg(long, value_name = "N", default_value = "100000", value_parser = parse_count)]
    pub max_connections: u64,
    /// Largest message accepted (SIZE is advertised); 0 = unlimited.
    #[arg(long, value_name = "BYTES", default_value = "64MiB", value_parser = parse_size)]
    pub max_message_size: u64,
    /// Most recipients per transaction (past it: 452 4.5.3).
    #[arg(long, value_name = "N", default_value = "1000", value_parser = parse_count)]
    pub max_recipients: u64,
    /// Offer AUTH PLAIN/LOGIN: `any` accepts every credential, `USER:PASS` only that one.
    #[arg(long, value_name = "any|USER:PASS", value_parser = parse_auth_policy)]
    pub auth: Option<AuthPolicy>,
    /// Refuse MAIL before TLS (530 5.7.0).
    #[arg(long)]
    pub require_tls: bool,
    /// Speak LMTP (LHLO; one reply per recipient after DATA).
    #[arg(long)]
    pub lmtp: bool,
    /// Bare LF/CR and smuggling sequences in DATA.
    #[arg(long, value_name = "MODE", default_value = "reject", value_parser = parse_bare_lf)]
    pub bare_lf: BareLfPolicy,
    /// Expect a PROXY protocol v1/v2 header before the greeting.
    #[arg(long)]
    pub proxy_protocol: bool,
    /// Offer and accept XCLIENT (Postfix's attributes; reply 220 and reset):
    /// the claimed ADDR is the client address faults such as greylisting see.
    #[arg(long)]
    pub xclient: bool,
    /// Extensions not to advertise, comma-separated
    /// (pipelining,size,8bitmime,smtputf8,enhancedstatuscodes,chunking,dsn,starttls,auth).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub disable: Vec<String>,
    /// Inject a fault (repeatable): `rcpt:451:5%`, `mail:550:1%`, `connect:421:2%`,
    /// `data:disconnect:1%`, `dot:disconnect421:1%`, `ehlo:delay=200ms`,
    /// `mail:delay=10ms..50ms:20%`, `rcpt:greylist[=WINDOW]`, `connect:ratelimit=N` (421 past N sessions/s).
    #[arg(long, value_name = "SPEC", value_parser = parse_fault)]
    pub fault: Vec<FaultSpec>,
    /// Seed for faults and every other random choice (deterministic runs).
    #[arg(long, value_name = "N", default_value = "1")]
    pub seed: u64,
    /// Keep every accepted message as a file in DIR (Maildir layout: DIR/new/*.eml).
    #[arg(long, value_name = "DIR")]
    pub capture: Option<PathBuf>,
    /// Check the body digest header the blaster writes and count verified/corrupt messages.
    #[arg(long)]
    pub verify: bool,
    /// Accept at most R messages per second (all threads): each final reply waits
    /// its turn, 1/R apart, as a queueing server's would (a target of known capacity).
    #[arg(long, value_name = "R", value_parser = parse_rate)]
    pub max_rate: Option<f64>,
    /// Find the X-Smtpstorm-Trace header of `blast --trace` in each accepted message's
    /// header section and record, per run id, deliveries, duplicates, the numbers
    /// delivered and the delivery latency (messages without one count as untraced).
    #[arg(long)]
    pub trace: bool,
    /// Stop after accepting exactly N messages (messages still in flight then get 451).
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub exit_after_messages: Option<u64>,
    /// Stop after this many ended sessions.
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub exit_after_sessions: Option<u64>,
    /// Stop after this long (e.g. 30s, 5m).
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// On stop, time given to open sessions to finish.
    #[arg(long, value_name = "D", default_value = "2s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Waiting for a command (RFC 5321 4.5.3.2.7).
    #[arg(long, value_name = "D", default_value = "5m", value_parser = parse_duration)]
    pub command_timeout: Duration,
    /// Waiting for the next piece of a message body.
    #[arg(long, value_name = "D", default_value = "3m", value_parser = parse_duration)]
    pub data_timeout: Duration,
    /// Host name in the greeting and EHLO reply.
    #[arg(long, value_name = "NAME", default_value = "smtpstorm.localhost")]
    pub hostname: String,
    /// Write the JSON report here on exit.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Serve live metrics over HTTP here: Prometheus text at /metrics, JSON at /stats.
    #[arg(long, value_name = "ADDR", value_parser = parse_socket_addr)]
    pub metrics_listen: Option<SocketAddr>,
    /// No live line and no summary on stdout.
    #[arg(long)]
    pub quiet: bool,
}

/// A flag combination the sink cannot run with.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--disable: unknown extension `{0}` (expected pipelining, size, 8bitmime, smtputf8, enhancedstatuscodes, chunking, dsn, starttls or auth)")]
    UnknownExtension(String),
    #[error("no address to listen on: give --listen or --tls-listen")]
    NoListener,
    #[error("--max-connections must be at least 1")]
    ZeroConnections,
    #[error("--require-tls needs STARTTLS or a --tls-listen address")]
    RequireTlsWithoutTls,
    #[error("{0}")]
    Io(String),
    #[error("--listen {0}: unix sockets need a kernel-socket backend (--io epoll or uring), not --io xdp")]
    UnixOnXdp(String),
}

/// Validates `args` into a configuration.
pub fn config(args: &SinkArgs) -> Result<SinkConfig, ConfigError> {
    let mut ext = Extensions::default();
    let mut starttls = !args.no_starttls;
    let mut auth_on = args.auth.is_some();
    for name in &args.disable {
        match name.trim().to_ascii_lowercase().as_str() {
            "" => {}
            "pipelining" => ext.pipelining = false,
            "size" => ext.size = false,
            "8bitmime" => ext.eightbitmime = false,
            "smtputf8" => ext.smtputf8 = false,
            "enhancedstatuscodes" => ext.enhancedstatuscodes = false,
            "chunking" => ext.chunking = false,
            "dsn" => ext.dsn = false,
            "starttls" => starttls = false,
            "auth" => auth_on = false,
            other => return Err(ConfigError::UnknownExtension(other.to_string())),
        }
    }
    if args.listen.is_empty() && args.tls_listen.is_empty() {
        return Err(ConfigError::NoListener);
    }
    if args.max_connections == 0 {
        return Err(ConfigError::ZeroConnections);
    }
    if args.require_tls && !starttls && args.tls_listen.is_empty() {
        return Err(ConfigError::RequireTlsWithoutTls);
    }
    let server = ServerConfig {
        hostname: args.hostname.clone(),
        lmtp: args.lmtp,
        max_message_size: args.max_message_size,
        max_recipients: usize::try_from(args.max_recipients).unwrap_or(usize::MAX),
        bare_lf: args.bare_lf,
        starttls_available: starttls,
        require_tls: args.require_tls,
        auth_enabled: auth_on,
        auth_requires_tls: false,
        proxy_protocol: args.proxy_protocol,
        xclient: args.xclient,
        ext,
        timeouts: ServerTimeouts {
            command: args.command_timeout,
            data_block: args.data_timeout,
        },
    };
    let cpus = args.threads.cpus();
    let io = args.threads.io_config().map_err(ConfigError::Io)?;
    let (tcp_listen, unix_listen) = split_listen(&args.listen);
    if io.xdp.is_some() {
        if let Some(p) = unix_listen.first() {
            return Err(ConfigError::UnixOnXdp(format!("unix:{}", p.display())));
        }
    }
    let io_echo = io.echo();
    let echo = serde_json::json!({
        "io": io_echo["io"],
        "xdp": io_echo["xdp"],
        "listen": args.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "tls_listen": args.tls_listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "threads": match &cpus { Cpus::Count(n) => *n, Cpus::List(l) => l.len() },
        "cpus": super::blast::planned_cpus(&cpus),
        "max_connections": args.max_connections,
        "max_message_size": args.max_message_size,
        "max_recipients": args.max_recipients,
        "auth": args.auth.as_ref().map(|a| match a { AuthPolicy::Any => "any", AuthPolicy::Only { .. } => "user:pass" }),
        "require_tls": args.require_tls,
        "starttls": starttls,
        "tls_suites": args.tls_choice.echo()["suites"],
        "tls_groups": args.tls_choice.echo()["groups"],
        "lmtp": args.lmtp,
        "bare_lf": format!("{:?}", args.bare_lf).to_ascii_lowercase(),
        "proxy_protocol": args.proxy_protocol,
        "xclient": args.xclient,
        "disable": args.disable,
        "faults": args.fault.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>(),
        "seed": args.seed,
        "capture": args.capture.as_ref().map(|p| p.display().to_string()),
        "verify": args.verify,
        "trace": args.trace,
        "exit_after_messages": args.exit_after_messages,
        "max_rate": args.max_rate,
        "exit_after_sessions": args.exit_after_sessions,
        "duration_secs": args.duration.map(|d| d.as_secs_f64()),
        "grace_secs": args.grace.as_secs_f64(),
    });
    Ok(SinkConfig {
        listen: tcp_listen,
        unix_listen,
        tls_listen: args.tls_listen.clone(),
        cpus,
        io,
        tls_cert_key: args.tls_cert.clone().zip(args.tls_key.clone()),
        tls_choice: args.tls_choice.choice(),
        server,
        auth: args.auth.clone(),
        max_connections: args.max_connections,
        faults: args.fault.clone(),
        seed: args.seed,
        capture: args.capture.clone(),
        verify: args.verify,
        trace: args.trace,
        exit_after_messages: args.exit_after_messages,
        max_rate: args.max_rate,
        exit_after_sessions: args.exit_after_sessions,
        duration: args.duration,
        grace: args.grace,
        quiet: args.quiet,
        json: args.json.clone(),
        metrics_listen: args.metrics_listen,
        echo,
    })
}

/// `--listen` split into TCP addresses and unix socket paths.
fn split_listen(all: &[ListenAddr]) -> (Vec<SocketAddr>, Vec<PathBuf>) {
    let mut tcp = Vec::new();
    let mut unix = Vec::new();
    for a in all {
        match a {
            ListenAddr::Tcp(a) => tcp.push(*a),
            ListenAddr::Unix(p) => unix.push(p.clone()),
        }
    }
    (tcp, unix)
}

/// A loopback sink on an ephemeral port with defaults (for tests and
/// `bench`): one thread, STARTTLS offered, nothing stored.
pub fn loopback() -> SinkConfig {
    let cli = <super::Cli as clap::Parser>::parse_from([
        "smtpstorm",
        "sink",
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--quiet",
    ]);
    match cli.command {
        super::Command::Sink(a) => config(&a).expect("the loopback defaults are valid"),
        _ => unreachable!("parsed a sink command"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> SinkArgs {
        let mut v = vec!["smtpstorm", "sink"];
        v.extend_from_slice(extra);
        match super::super::Cli::parse_from(v).command {
            super::super::Command::Sink(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn disable_turns_extensions_off() {
        let c = config(&args(&["--disable", "pipelining,chunking,starttls"])).unwrap();
        assert!(!c.server.ext.pipelining);
        assert!(!c.server.ext.chunking);
        assert!(c.server.ext.size);
        assert!(!c.server.starttls_available);
    }

    #[test]
    fn unknown_disable_name_is_an_error() {
        let e = config(&args(&["--disable", "bogus"])).unwrap_err();
        assert_eq!(e, ConfigError::UnknownExtension("bogus".into()));
    }

    #[test]
    fn require_tls_without_any_tls_is_an_error() {
        let e = config(&args(&["--require-tls", "--no-starttls"])).unwrap_err();
        assert_eq!(e, ConfigError::RequireTlsWithoutTls);
    }

    #[test]
    fn cpu_list_parses_into_one_worker_per_cpu() {
        let c = config(&args(&["--cpus", "0"])).unwrap();
        assert_eq!(c.cpus, Cpus::List(vec![0]));
    }

    #[test]
    fn loopback_defaults_are_one_thread_on_port_zero() {
        let c = loopback();
        assert_eq!(c.listen[0].port(), 0);
        assert_eq!(c.cpus, Cpus::Count(1));
    }
}
