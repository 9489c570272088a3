//! The sink's validated configuration, built once from the raw flags.
//!
//! [`SinkConfig::from_args`] does every cross-flag check (unknown `--disable`
//! names, empty listen lists, a zero connection limit) so the event loop
//! never meets a bad combination. The protocol part becomes one shared
//! [`smtp::server::ServerConfig`]; the rest (threads, faults, capture,
//! stop conditions) stays here. Invariant: a `SinkConfig` that exists is
//! runnable; only I/O (binding, TLS files) can still fail at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use super::faults::FaultSpec;
use crate::cli::SinkArgs;
use crate::net::driver::IoConfig;
use crate::net::runtime::Cpus;
use crate::smtp::server::{Extensions, ServerConfig};
use crate::smtp::ServerTimeouts;

/// `--auth` of the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthPolicy {
    Any,
    Only { user: String, pass: String },
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
}

/// Everything the sink needs to run.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    pub listen: Vec<SocketAddr>,
    pub tls_listen: Vec<SocketAddr>,
    pub cpus: Cpus,
    /// The I/O backend every thread runs, and its options.
    pub io: IoConfig,
    pub tls_cert_key: Option<(PathBuf, PathBuf)>,
    /// The protocol engine's settings, shared by every session.
    pub server: ServerConfig,
    pub auth: Option<AuthPolicy>,
    /// Open connections at once, over all threads.
    pub max_connections: u64,
    pub faults: Vec<FaultSpec>,
    pub seed: u64,
    pub capture: Option<PathBuf>,
    pub verify: bool,
    pub exit_after_messages: Option<u64>,
    pub exit_after_sessions: Option<u64>,
    pub duration: Option<Duration>,
    pub grace: Duration,
    pub quiet: bool,
    pub json: Option<PathBuf>,
    /// `--metrics-listen`: serve live metrics here.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The flags as given, echoed in the JSON report.
    pub echo: serde_json::Value,
}

impl SinkConfig {
    /// Validates `args` into a configuration.
    pub fn from_args(args: &SinkArgs) -> Result<Self, ConfigError> {
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
        let cpus = match (&args.threads.cpus, args.threads.threads) {
            (Some(list), _) => Cpus::List(list.clone()),
            (None, Some(n)) => Cpus::Count(n),
            (None, None) => Cpus::all(),
        };
        let io = IoConfig::resolve(args.threads.io.choice(), args.threads.xdp.options())
            .map_err(ConfigError::Io)?;
        let io_echo = io.echo();
        let echo = serde_json::json!({
            "io": io_echo["io"],
            "xdp": io_echo["xdp"],
            "listen": args.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "tls_listen": args.tls_listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "threads": match &cpus { Cpus::Count(n) => *n, Cpus::List(l) => l.len() },
            "max_connections": args.max_connections,
            "max_message_size": args.max_message_size,
            "max_recipients": args.max_recipients,
            "auth": args.auth.as_ref().map(|a| match a { AuthPolicy::Any => "any", AuthPolicy::Only { .. } => "user:pass" }),
            "require_tls": args.require_tls,
            "starttls": starttls,
            "lmtp": args.lmtp,
            "bare_lf": format!("{:?}", args.bare_lf).to_ascii_lowercase(),
            "proxy_protocol": args.proxy_protocol,
            "xclient": args.xclient,
            "disable": args.disable,
            "faults": args.fault.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>(),
            "seed": args.seed,
            "capture": args.capture.as_ref().map(|p| p.display().to_string()),
            "verify": args.verify,
            "exit_after_messages": args.exit_after_messages,
            "exit_after_sessions": args.exit_after_sessions,
            "duration_secs": args.duration.map(|d| d.as_secs_f64()),
            "grace_secs": args.grace.as_secs_f64(),
        });
        Ok(Self {
            listen: args.listen.clone(),
            tls_listen: args.tls_listen.clone(),
            cpus,
            io,
            tls_cert_key: args.tls_cert.clone().zip(args.tls_key.clone()),
            server,
            auth: args.auth.clone(),
            max_connections: args.max_connections,
            faults: args.fault.clone(),
            seed: args.seed,
            capture: args.capture.clone(),
            verify: args.verify,
            exit_after_messages: args.exit_after_messages,
            exit_after_sessions: args.exit_after_sessions,
            duration: args.duration,
            grace: args.grace,
            quiet: args.quiet,
            json: args.json.clone(),
            metrics_listen: args.metrics_listen,
            echo,
        })
    }

    /// A loopback sink on an ephemeral port with defaults (for tests and
    /// `bench`): one thread, STARTTLS offered, nothing stored.
    pub fn loopback() -> Self {
        let cli = <crate::cli::Cli as clap::Parser>::parse_from([
            "smtpstorm",
            "sink",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--quiet",
        ]);
        match cli.command {
            crate::cli::Command::Sink(a) => {
                Self::from_args(&a).expect("the loopback defaults are valid")
            }
            _ => unreachable!("parsed a sink command"),
        }
    }

    /// Whether any connection may need a TLS server config.
    pub fn needs_tls(&self) -> bool {
        self.server.starttls_available || !self.tls_listen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> SinkArgs {
        let mut v = vec!["smtpstorm", "sink"];
        v.extend_from_slice(extra);
        match crate::cli::Cli::parse_from(v).command {
            crate::cli::Command::Sink(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn disable_turns_extensions_off() {
        let c =
            SinkConfig::from_args(&args(&["--disable", "pipelining,chunking,starttls"])).unwrap();
        assert!(!c.server.ext.pipelining);
        assert!(!c.server.ext.chunking);
        assert!(c.server.ext.size);
        assert!(!c.server.starttls_available);
    }

    #[test]
    fn unknown_disable_name_is_an_error() {
        let e = SinkConfig::from_args(&args(&["--disable", "bogus"])).unwrap_err();
        assert_eq!(e, ConfigError::UnknownExtension("bogus".into()));
    }

    #[test]
    fn require_tls_without_any_tls_is_an_error() {
        let e = SinkConfig::from_args(&args(&["--require-tls", "--no-starttls"])).unwrap_err();
        assert_eq!(e, ConfigError::RequireTlsWithoutTls);
    }

    #[test]
    fn cpu_list_parses_into_one_worker_per_cpu() {
        let c = SinkConfig::from_args(&args(&["--cpus", "0"])).unwrap();
        assert_eq!(c.cpus, Cpus::List(vec![0]));
    }

    #[test]
    fn loopback_defaults_are_one_thread_on_port_zero() {
        let c = SinkConfig::loopback();
        assert_eq!(c.listen[0].port(), 0);
        assert_eq!(c.cpus, Cpus::Count(1));
    }
}
