//! The validated blaster configuration, built once from `LoadArgs`.
//!
//! Raw flags (`cli`) become a [`BlastConfig`] here, where every cross-flag
//! check lives: the target is resolved, templates are compiled, source
//! addresses are parsed and split for `--instance`, and the stop conditions
//! get their default (10 s when none is given). Workers only ever see this
//! type, so nothing on the hot path re-parses a flag.
//!
//! Invariants: `1 <= threads <= connections` (a thread without a connection
//! could carry no share of the load, so fewer connections than CPUs means
//! fewer threads); `connections >= 1`; without `-c` the closed loop keeps
//! 16 sessions in flight and an open loop caps them at a generous 1000 (a
//! default meant for the closed loop must not throttle it); an explicit `-c`
//! is the number, or the cap, as given; `rate_per_sec`, `connections` and
//! `source_ips` are already this instance's share. The open loop's rate is
//! always in messages per second (`--rate-unit sessions` multiplies by
//! `-k`).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use super::message::SizeRange;
use crate::cli::{AuthMechArg, LoadArgs, PipeliningArg, RateUnit};
use crate::net::driver::IoConfig;
use crate::net::runtime::Cpus;
use crate::smtp::client::{AuthMech, ClientAuth, ClientConfig, PipeliningMode};
use crate::smtp::{ClientTimeouts, Phase};

use super::identity::{Identities, IdentityError};
use super::message::Template;

/// `--proxy`: the PROXY protocol version the blaster sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyVersion {
    V1,
    V2,
}

/// Errors building a [`BlastConfig`].
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot resolve target `{0}`: {1}")]
    Resolve(String, String),
    #[error("invalid --source-ip: {0}")]
    SourceIp(String),
    #[error(
        "--instance {0}/{1}: --source-ip has only {2} addresses, fewer than the {1} instances"
    )]
    SourceSplit(u32, u32, usize),
    #[error("cannot read --body {0}: {1}")]
    Body(String, std::io::Error),
    #[error("invalid --{0} template: {1}")]
    Template(&'static str, String),
    #[error("unknown --hgrm-phase `{0}`; expected one of connect, banner, ehlo, starttls, auth, mail, rcpt, data, message, quit, session")]
    HgrmPhase(String),
    #[error("{0}")]
    Assertion(String),
    #[error("--tls-ca {0}: {1}")]
    Tls(String, String),
    #[error("--start-at {0} is not a valid UNIX time")]
    StartAt(f64),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Corpus(#[from] super::corpus::CorpusError),
}

/// What the run produces once it ends (outputs and checks).
#[derive(Clone, Debug, Default)]
pub struct OutputConfig {
    pub json: Option<PathBuf>,
    pub hgrm: Option<PathBuf>,
    pub hgrm_phase: Option<Phase>,
    pub hlog: Option<PathBuf>,
    /// `--junit`: the checks as JUnit XML.
    pub junit: Option<PathBuf>,
    /// `--metrics-listen`: serve live metrics here during the run.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub asserts: Vec<crate::stats::Assertion>,
    pub baseline: Option<PathBuf>,
    /// Allowed regression in percent (10.0 = 10%).
    pub max_regression_pct: f64,
    pub allow_invalid: bool,
    /// No live line (the summary is still printed).
    pub quiet: bool,
}

/// The load model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LoadModel {
    /// `connections` sessions in flight, each starting the next when it ends.
    Closed,
    /// Messages are due on a fixed schedule of `messages_per_sec` (this
    /// instance's share), each sent at its intended time on a free
    /// connection (at most `connections` open; sessions carry up to `-k`
    /// messages and idle between them).
    Open { messages_per_sec: f64 },
}

/// The validated configuration of one blaster run (this instance's share).
#[derive(Clone, Debug)]
pub struct BlastConfig {
    pub target: SocketAddr,
    /// Host name as given (for TLS SNI).
    pub target_host: String,
    pub cpus: Cpus,
    /// The I/O backend every thread runs, and its options.
    pub io: IoConfig,
    pub connections: u64,
    pub model: LoadModel,
    /// The rate as given (this instance's share), in `rate_unit`.
    pub rate_per_sec: Option<f64>,
    pub rate_unit: RateUnit,
    /// Measured time (after warmup); `None`: no time limit.
    pub duration: Option<Duration>,
    pub warmup: Duration,
    pub max_messages: Option<u64>,
    pub max_sessions: Option<u64>,
    pub messages_per_session: u64,
    pub recipients: u64,
    pub size: SizeRange,
    /// `--body FILE`, LF normalized to CRLF.
    pub body_file: Option<Arc<[u8]>>,
    /// `--data PATH`: the messages, loaded once.
    pub corpus: Option<Arc<super::corpus::Corpus>>,
    pub from: Template,
    pub to: Template,
    pub client: Arc<ClientConfig>,
    pub implicit_tls: bool,
    pub starttls: bool,
    pub tls_ca: Option<PathBuf>,
    pub tls_resume: bool,
    pub proxy: Option<ProxyVersion>,
    /// Per-session PROXY source and XCLIENT claims (`--proxy-source`,
    /// `--xclient`), this instance's share.
    pub identities: Identities,
    pub source_ips: Vec<IpAddr>,
    pub abort_close: bool,
    pub timeout: Duration,
    pub seed: u64,
    /// `(I, N)`: this is instance I of N.
    pub instance: (u32, u32),
    pub start_at_unix: Option<f64>,
    pub output: OutputConfig,
    /// The configuration echoed into the JSON report.
    pub echo: serde_json::Value,
}

/// `host:port`, `[v6]:port`, or `host` (port 25).
pub fn resolve_target(target: &str) -> Result<(SocketAddr, String), ConfigError> {
    let err = |e: String| ConfigError::Resolve(target.to_string(), e);
    if let Ok(a) = target.parse::<SocketAddr>() {
        return Ok((a, a.ip().to_string()));
    }
    if let Ok(ip) = target.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok((SocketAddr::new(ip, 25), ip.to_string()));
    }
    let (host, port) = match target.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (
            h,
            p.parse::<u16>()
                .map_err(|_| err(format!("bad port `{p}`")))?,
        ),
        _ => (target, 25),
    };
    if host.is_empty() {
        return Err(err("empty host".into()));
    }
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address".into()))?;
    Ok((addr, host.to_string()))
}

/// Share `total` of `n` parts, part `i` (the first `total % n` get one more).
pub fn share(total: u64, i: u64, n: u64) -> u64 {
    total / n + u64::from(i < total % n)
}

/// `\n` not preceded by `\r` becomes `\r\n`; a missing final CRLF is added.
pub fn normalize_crlf(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + input.len() / 40 + 2);
    let mut prev = 0u8;
    for &b in input {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

impl BlastConfig {
    /// Validates `load` against `target`.
    pub fn from_args(target: &str, load: &LoadArgs) -> Result<Self, ConfigError> {
        let (addr, target_host) = resolve_target(target)?;
        Self::build(addr, target_host, load)
    }

    /// Validates `load` for an already resolved target (used by `bench`).
    pub fn build(
        target: SocketAddr,
        target_host: String,
        load: &LoadArgs,
    ) -> Result<Self, ConfigError> {
        let (inst, ninst) = load.instance.unwrap_or((0, 1));
        let rate = load.rate.map(|r| r / f64::from(ninst));
        let default_connections = if rate.is_some() { 1000 } else { 16 };
        let connections = share(
            load.connections.unwrap_or(default_connections),
            u64::from(inst),
            u64::from(ninst),
        )
        .max(1);
        // A thread needs at least one connection to carry its share.
        let cpus = match (&load.threads.cpus, load.threads.threads) {
            (Some(list), _) => Cpus::List(list.clone()),
            (None, Some(n)) => Cpus::Count(n),
            (None, None) => Cpus::all(),
        }
        .at_most(connections as usize);
        let model = match rate {
            None => LoadModel::Closed,
            Some(r) => {
                let per_rate_unit = match load.rate_unit {
                    RateUnit::Messages => 1.0,
                    RateUnit::Sessions => load.messages_per_session as f64,
                };
                LoadModel::Open {
                    messages_per_sec: r * per_rate_unit,
                }
            }
        };
        let duration = match (load.duration, load.messages, load.sessions) {
            (None, None, None) => Some(Duration::from_secs(10)),
            (d, _, _) => d,
        };
        let max_messages = load
            .messages
            .map(|n| share(n, u64::from(inst), u64::from(ninst)));
        let max_sessions = load
            .sessions
            .map(|n| share(n, u64::from(inst), u64::from(ninst)));
        let mut source_ips = match &load.source_ip {
            None => Vec::new(),
            Some(r) => crate::net::socket::parse_ip_range(r)
                .map_err(|e| ConfigError::SourceIp(e.to_string()))?,
        };
        if ninst > 1 && !source_ips.is_empty() {
            let all = source_ips.len();
            source_ips = source_ips
                .into_iter()
                .enumerate()
                .filter(|(i, _)| *i as u32 % ninst == inst)
                .map(|(_, ip)| ip)
                .collect();
            if source_ips.is_empty() {
                return Err(ConfigError::SourceSplit(inst, ninst, all));
            }
        }
        if let Some(ip) = source_ips
            .iter()
            .find(|ip| ip.is_ipv4() != target.is_ipv4())
        {
            return Err(ConfigError::SourceIp(format!(
                "{ip} and target {target} are of different IP families"
            )));
        }
        let body_file = match &load.body {
            None => None,
            Some(p) => {
                let raw =
                    std::fs::read(p).map_err(|e| ConfigError::Body(p.display().to_string(), e))?;
                Some(Arc::from(normalize_crlf(&raw)))
            }
        };
        let corpus = match &load.data {
            None => None,
            Some(p) => Some(Arc::new(super::corpus::Corpus::load(
                p,
                load.data_order,
                load.seed,
                load.verify,
            )?)),
        };
        let from = Template::parse(&load.from).map_err(|e| ConfigError::Template("from", e))?;
        let to = Template::parse(&load.to).map_err(|e| ConfigError::Template("to", e))?;
        let hgrm_phase = match &load.hgrm {
            None => None,
            Some(_) => Some(
                Phase::ALL
                    .into_iter()
                    .find(|p| p.as_str() == load.hgrm_phase)
                    .ok_or_else(|| ConfigError::HgrmPhase(load.hgrm_phase.clone()))?,
            ),
        };
        let identities = Identities::new(load.proxy_source, &load.xclient, (inst, ninst))?;
        let asserts = crate::stats::parse_assertions(&load.asserts)
            .map_err(|e| ConfigError::Assertion(format!("--assert: {e}")))?;
        if let Some(t) = load.start_at {
            if !(t.is_finite() && t >= 0.0) {
                return Err(ConfigError::StartAt(t));
            }
        }
        let client = ClientConfig {
            helo_name: load.helo.clone(),
            lmtp: load.lmtp,
            pipelining: match load.pipelining {
                PipeliningArg::Auto => PipeliningMode::Auto,
                PipeliningArg::On => PipeliningMode::On,
                PipeliningArg::Off => PipeliningMode::Off,
            },
            starttls: load.starttls,
            implicit_tls: load.tls,
            auth: load.auth.as_ref().map(|(user, pass)| ClientAuth {
                mech: match load.auth_mech {
                    AuthMechArg::Plain => AuthMech::Plain,
                    AuthMechArg::Login => AuthMech::Login,
                },
                user: user.clone(),
                pass: pass.clone(),
            }),
            bdat: load.bdat,
            bdat_chunk_size: 0,
            timeouts: ClientTimeouts::uniform(load.timeout),
            send_quit: true,
            capture_text: false,
        };
        let io = IoConfig::resolve(load.threads.io.choice(), load.threads.xdp.options())
            .map_err(ConfigError::Io)?;
        if io.xdp.is_some() && !source_ips.is_empty() {
            // The xdp backend sends from the interface's own address.
            return Err(ConfigError::Io(
                "--source-ip does not apply to --io xdp (it sends from the interface's address); drop one of them".into(),
            ));
        }
        let io_echo = io.echo();
        let echo = serde_json::json!({
            "io": io_echo["io"],
            "xdp": io_echo["xdp"],
            "target": target.to_string(),
            "connections": connections,
            "threads": match &cpus { Cpus::Count(n) => *n, Cpus::List(l) => l.len() },
            "rate": rate,
            "rate_unit": match load.rate_unit { RateUnit::Messages => "messages", RateUnit::Sessions => "sessions" },
            "duration_secs": duration.map(|d| d.as_secs_f64()),
            "warmup_secs": load.warmup.map(|d| d.as_secs_f64()).unwrap_or(0.0),
            "messages": max_messages,
            "sessions": max_sessions,
            "messages_per_session": load.messages_per_session,
            "recipients": load.recipients,
            "size_min": load.size.min,
            "size_max": load.size.max,
            "body_file": load.body.as_ref().map(|p| p.display().to_string()),
            "data": load.data.as_ref().map(|p| p.display().to_string()),
            "data_messages": corpus.as_ref().map(|c| c.len()),
            "data_order": load.data.as_ref().map(|_| format!("{:?}", load.data_order).to_lowercase()),
            "verify": load.verify,
            "starttls": load.starttls,
            "tls": load.tls,
            "tls_resume": load.tls_resume,
            "auth": load.auth.is_some(),
            "pipelining": format!("{:?}", load.pipelining).to_lowercase(),
            "bdat": load.bdat,
            "lmtp": load.lmtp,
            "proxy": load.proxy.map(|p| format!("{p:?}").to_lowercase()),
            "proxy_source": load.proxy_source.map(|r| r.to_string()),
            "xclient": load.xclient.iter().map(|a| a.as_str()).collect::<Vec<_>>(),
            "source_ips": source_ips.len(),
            "abort_close": load.abort_close,
            "timeout_secs": load.timeout.as_secs_f64(),
            "seed": load.seed,
            "instance": format!("{inst}/{ninst}"),
        });
        Ok(BlastConfig {
            target,
            target_host,
            cpus,
            io,
            connections,
            model,
            rate_per_sec: rate,
            rate_unit: load.rate_unit,
            duration,
            warmup: load.warmup.unwrap_or_default(),
            max_messages,
            max_sessions,
            messages_per_session: load.messages_per_session,
            recipients: load.recipients,
            size: load.size,
            body_file,
            corpus,
            from,
            to,
            client: Arc::new(client),
            implicit_tls: load.tls,
            starttls: load.starttls,
            tls_ca: if load.tls_verify {
                load.tls_ca
                    .clone()
                    .or_else(|| Some(PathBuf::from("/etc/ssl/certs/ca-certificates.crt")))
            } else {
                None
            },
            tls_resume: load.tls_resume,
            proxy: load.proxy,
            identities,
            source_ips,
            abort_close: load.abort_close,
            timeout: load.timeout,
            seed: load.seed,
            instance: (inst, ninst),
            start_at_unix: load.start_at,
            output: OutputConfig {
                json: load.json.clone(),
                hgrm: load.hgrm.clone(),
                hgrm_phase,
                hlog: load.hlog.clone(),
                junit: load.junit.clone(),
                metrics_listen: load.metrics_listen,
                asserts,
                baseline: load.baseline.clone(),
                max_regression_pct: load.max_regression * 100.0,
                allow_invalid: load.allow_invalid,
                quiet: load.quiet,
            },
            echo,
        })
    }

    /// The message builder of worker `thread` of `threads`.
    pub fn message_builder(&self, thread: usize, threads: usize) -> super::message::MessageBuilder {
        super::message::MessageBuilder::new(
            self.from.clone(),
            self.to.clone(),
            self.recipients,
            self.size,
            self.body_file.clone(),
            self.seed,
            thread,
            threads,
            self.instance,
        )
        .with_corpus(self.corpus.clone())
    }

    /// Number of worker threads this config will run.
    pub fn thread_count(&self) -> usize {
        match &self.cpus {
            Cpus::Count(n) => *n,
            Cpus::List(l) => l.len(),
        }
    }

    /// The bound on the p99 lag of messages sent on a free connection above
    /// which an open-loop run is invalid (the blaster itself fell behind):
    /// `max(10 ms, 10 / rate)`, the rate being this instance's.
    pub fn max_lag_p99(&self) -> Option<Duration> {
        match self.model {
            LoadModel::Closed => None,
            LoadModel::Open { messages_per_sec } => Some(
                Duration::from_millis(10).max(Duration::from_secs_f64(10.0 / messages_per_sec)),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> BlastConfig {
        use clap::Parser;
        let mut argv = vec!["smtpstorm", "blast", "127.0.0.1:2525"];
        argv.extend_from_slice(args);
        let cli = crate::cli::Cli::try_parse_from(argv).unwrap();
        let crate::cli::Command::Blast(b) = cli.command else {
            unreachable!()
        };
        BlastConfig::from_args(&b.target, &b.load).unwrap()
    }

    #[test]
    fn rate_units_instances_and_default_stop() {
        let c = config(&["--rate", "100", "-k", "5"]);
        assert_eq!(
            c.model,
            LoadModel::Open {
                messages_per_sec: 100.0
            },
            "the rate is messages per second whatever -k is"
        );
        assert_eq!(c.duration, Some(Duration::from_secs(10)));
        assert_eq!(c.connections, 1000, "a generous cap in open loop");
        let c = config(&["--rate", "100", "-c", "7"]);
        assert_eq!(c.connections, 7, "an explicit -c caps the open loop");
        assert_eq!(config(&[]).connections, 16, "closed-loop default");
        let c = config(&["--rate", "100", "-k", "5", "--rate-unit", "sessions"]);
        assert_eq!(
            c.model,
            LoadModel::Open {
                messages_per_sec: 500.0
            }
        );
        let c = config(&["--rate", "100", "--instance", "1/2", "-n", "11", "-c", "5"]);
        assert_eq!(
            c.model,
            LoadModel::Open {
                messages_per_sec: 50.0
            }
        );
        assert_eq!((c.max_messages, c.duration), (Some(5), None));
        let c = config(&[
            "-c",
            "5",
            "--instance",
            "0/2",
            "--source-ip",
            "127.0.0.2-127.0.0.5",
        ]);
        assert_eq!(c.connections, 3);
        assert_eq!(
            c.source_ips,
            vec![
                "127.0.0.2".parse::<IpAddr>().unwrap(),
                "127.0.0.4".parse().unwrap()
            ]
        );
        assert_eq!(c.max_lag_p99(), None);
        assert_eq!(
            config(&["--rate", "2"]).max_lag_p99(),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn source_addresses_are_refused_up_front_with_xdp() {
        use clap::Parser;
        let argv = [
            "smtpstorm", "blast", "127.0.0.1:2525", "--io", "xdp", "--xdp-iface", "lo",
            "--source-ip", "127.0.0.2",
        ];
        let cli = crate::cli::Cli::try_parse_from(argv).unwrap();
        let crate::cli::Command::Blast(b) = cli.command else {
            unreachable!()
        };
        let e = BlastConfig::from_args(&b.target, &b.load).unwrap_err().to_string();
        assert!(e.contains("--source-ip") && e.contains("--io xdp"), "{e}");
    }

    #[test]
    fn fewer_connections_than_threads_means_fewer_threads() {
        let c = config(&["--rate", "1000", "-c", "1", "--threads", "2"]);
        assert_eq!(c.thread_count(), 1);
        assert_eq!(config(&["-c", "3", "--threads", "8"]).thread_count(), 3);
        assert_eq!(config(&["-c", "1", "--cpus", "0,1"]).thread_count(), 1);
        assert_eq!(config(&["-c", "8", "--threads", "2"]).thread_count(), 2);
    }

    #[test]
    fn shares_add_up_to_the_total() {
        for n in 1..7 {
            for total in [0u64, 1, 5, 100, 101] {
                assert_eq!((0..n).map(|i| share(total, i, n)).sum::<u64>(), total);
            }
        }
    }

    #[test]
    fn lf_is_normalized_to_crlf_once() {
        assert_eq!(normalize_crlf(b"a\nb\r\nc"), b"a\r\nb\r\nc\r\n");
        assert_eq!(normalize_crlf(b""), b"\r\n");
    }

    #[test]
    fn targets_default_to_port_25() {
        assert_eq!(
            resolve_target("127.0.0.1").unwrap().0,
            "127.0.0.1:25".parse().unwrap()
        );
        assert_eq!(
            resolve_target("127.0.0.1:2525").unwrap().0,
            "127.0.0.1:2525".parse().unwrap()
        );
        assert_eq!(
            resolve_target("[::1]:26").unwrap().0,
            "[::1]:26".parse().unwrap()
        );
        assert_eq!(resolve_target("localhost:26").unwrap().0.port(), 26);
        assert!(resolve_target("127.0.0.1:notaport").is_err());
    }
}
