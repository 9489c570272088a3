//! The sink's validated configuration: what a run needs, built once by the
//! command line (`cli::sink::config`) or by a caller such as `bench`.
//!
//! The protocol part is one [`ServerConfig`] shared by every session; the
//! rest (threads, backend, faults, capture, stop conditions) is the sink's
//! own. Invariant: a `SinkConfig` built by `cli::sink::config` is runnable;
//! only I/O (binding, TLS files) can still fail at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::faults::FaultSpec;
use crate::net::driver::IoConfig;
use crate::net::runtime::Cpus;
use crate::smtp::server::ServerConfig;

/// `--auth` of the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthPolicy {
    Any,
    Only { user: String, pass: String },
}

/// Everything the sink needs to run.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    pub listen: Vec<SocketAddr>,
    /// Unix-domain stream sockets to listen on (`--listen unix:/path`):
    /// made at start (a stale socket file nobody listens on is replaced),
    /// removed when the sink ends.
    pub unix_listen: Vec<PathBuf>,
    pub tls_listen: Vec<SocketAddr>,
    pub cpus: Cpus,
    /// The I/O backend every thread runs, and its options.
    pub io: IoConfig,
    pub tls_cert_key: Option<(PathBuf, PathBuf)>,
    /// `--tls-suites`, `--tls-groups`: what the sink accepts, in its order.
    pub tls_choice: crate::net::tls::TlsChoice,
    /// The protocol engine's settings, shared by every session.
    pub server: ServerConfig,
    pub auth: Option<AuthPolicy>,
    /// Open connections at once, over all threads.
    pub max_connections: u64,
    pub faults: Vec<FaultSpec>,
    pub seed: u64,
    pub capture: Option<PathBuf>,
    pub verify: bool,
    /// `--trace`: find each message's trace header and record deliveries.
    pub trace: bool,
    pub exit_after_messages: Option<u64>,
    /// `--max-rate`: at most this many messages accepted per second, each
    /// final reply held until its turn (`sink::pacer`).
    pub max_rate: Option<f64>,
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
    /// Whether any connection may need a TLS server config.
    pub fn needs_tls(&self) -> bool {
        self.server.starttls_available || !self.tls_listen.is_empty()
    }
}
