//! `smtpstorm blast` (and the load flags `bench` shares): the flags and
//! their validation into a [`BlastConfig`].
//!
//! Every cross-flag check lives here: the target is resolved, templates are
//! compiled, source addresses are parsed and split for `--instance`, and
//! the stop conditions get their default (10 s when none is given). Workers
//! only ever see the built config, so nothing on the hot path re-parses a
//! flag.
//!
//! Invariants of a built config: `1 <= threads <= connections` (a thread
//! without a connection could carry no share of the load, so fewer
//! connections than CPUs means fewer threads); `connections >= 1`; without
//! `-c` the closed loop keeps 16 sessions in flight and an open loop caps
//! them at a generous 1000 (a default meant for the closed loop must not
//! throttle it); an explicit `-c` is the number, or the cap, as given;
//! `rate_per_sec`, `connections` and `source_ips` are already this
//! instance's share. The open loop's rate is always in messages per second
//! (`--rate-unit sessions` multiplies by `-k`).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use thiserror::Error;

use super::parse::{
    parse_count, parse_count_nonzero, parse_duration, parse_instance, parse_percent, parse_rate,
    parse_socket_addr, parse_stages, parse_user_pass,
};
use super::ThreadArgs;
use crate::blast::config::{share, BlastConfig, LoadModel, OutputConfig, ProxyVersion, RateUnit};
use crate::blast::corpus::{Corpus, CorpusError, DataOrder};
use crate::blast::identity::{self, AddrRange, Identities, IdentityError, XclientAttr};
use crate::blast::message::{normalize_crlf, Template};
use crate::blast::profile::RateProfile;
use crate::net::driver::IoConfig;
use crate::net::runtime::Cpus;
use crate::smtp::client::{AuthMech, ClientAuth, ClientConfig, PipeliningMode};
use crate::smtp::{ClientTimeouts, Phase};

/// The load shape and measurement options shared by `blast` and `bench`.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Sessions in flight at once (closed loop), or the cap on them with --rate
    /// [default: 16; with --rate 1000].
    #[arg(short = 'c', long, value_name = "C", value_parser = parse_count)]
    pub connections: Option<u64>,
    /// Open loop: send R messages per second, message i intended at start + i/R
    /// (across threads and instances), each on a free connection; sessions
    /// carry up to -k messages and idle between them.
    #[arg(short = 'r', long, value_name = "R", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Open loop whose rate moves: stages `DURATION:RATE` (held) or
    /// `DURATION:FROM..TO` (a linear ramp), e.g. `30s:0..2000,2m:2000,30s:2000..0`;
    /// message i is intended where the rate's integral reaches i. The run lasts the
    /// stages (--warmup is their first part).
    #[arg(long, value_name = "STAGES", value_parser = parse_stages, conflicts_with_all = ["rate", "duration"])]
    pub stages: Option<RateProfile>,
    /// What --rate counts: messages, or sessions (then R × k messages per second).
    #[arg(long, value_name = "UNIT", default_value = "messages")]
    pub rate_unit: RateUnit,
    /// Stop after this long [default: 10s when no other stop is given].
    #[arg(short = 'd', long, value_name = "D", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many messages.
    #[arg(short = 'n', long, value_name = "N", value_parser = parse_count)]
    pub messages: Option<u64>,
    /// Stop after this many sessions (open loop: after N × k messages).
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub sessions: Option<u64>,
    /// Leading time excluded from the results.
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// Messages sent in each session.
    #[arg(short = 'k', long, value_name = "K", default_value = "1", value_parser = parse_count_nonzero)]
    pub messages_per_session: u64,
    /// Recipients per message.
    #[arg(long, value_name = "R", default_value = "1", value_parser = parse_count_nonzero)]
    pub recipients: u64,
    /// Message size, a range drawn uniformly (`1KiB`, `512..64KiB`), or a
    /// distribution drawn by weight (`1KiB:50%,16KiB:35%,256KiB:12%,4MiB:3%`).
    #[arg(short = 's', long, value_name = "S[..S]|S:W%,...", default_value = "1KiB", value_parser = crate::blast::size::parse_size_spec)]
    pub size: crate::blast::size::SizeSpec,
    /// Send this file as the message (headers and body as given).
    #[arg(long, value_name = "FILE", conflicts_with = "data")]
    pub body: Option<PathBuf>,
    /// Send real messages: an .eml file, a directory of *.eml, or an mbox; loaded
    /// once, CRLF-normalized, dot-stuffed for DATA (not for BDAT); --size is ignored.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Order of --data messages: round-robin, or shuffle (a new permutation per pass, from --seed).
    #[arg(
        long,
        value_name = "ORDER",
        default_value = "round-robin",
        requires = "data"
    )]
    pub data_order: DataOrder,
    /// Messages carry the digest header the sink's --verify checks (generated ones
    /// always do; --data messages get one on top); bench: the embedded sink verifies.
    #[arg(long)]
    pub verify: bool,
    /// Every message carries `X-Smtpstorm-Trace: <run id> <n> <send time ns>` (first in
    /// its header) and the report lists the numbers the target accepted, for end-to-end
    /// accounting against a `sink --trace` (`merge BLAST.json SINK.json`).
    #[arg(long)]
    pub trace: bool,
    /// The run id --trace writes (16 hex digits) [default: random; with --instance,
    /// derived from the run's configuration and --start-at, so its instances agree].
    #[arg(long, value_name = "HEX", requires = "trace", value_parser = parse_run_id)]
    pub run_id: Option<u64>,
    /// Envelope sender template: {n} global sequence, {thread}, {rand}, {instance}.
    #[arg(long, value_name = "T", default_value = "sender{n}@smtpstorm.test")]
    pub from: String,
    /// Recipient template (same placeholders, plus {r} the recipient index).
    #[arg(long, value_name = "T", default_value = "rcpt{n}.{r}@smtpstorm.test")]
    pub to: String,
    /// Name sent in EHLO/HELO/LHLO.
    #[arg(long, value_name = "NAME", default_value = "smtpstorm.localhost")]
    pub helo: String,
    /// Upgrade with STARTTLS after EHLO.
    #[arg(long, conflicts_with = "tls")]
    pub starttls: bool,
    /// Implicit TLS from the first byte (465-style; swaks calls it --tls-on-connect).
    #[arg(long, visible_alias = "tls-on-connect")]
    pub tls: bool,
    /// Verify the server certificate (off by default: test targets use self-signed certificates).
    #[arg(long)]
    pub tls_verify: bool,
    /// CA certificates (PEM) to verify against with --tls-verify.
    #[arg(long, value_name = "PEM", requires = "tls_verify")]
    pub tls_ca: Option<PathBuf>,
    /// Resume TLS sessions (measures resumed handshakes).
    #[arg(long)]
    pub tls_resume: bool,
    #[command(flatten)]
    pub tls_choice: super::TlsChoiceArgs,
    /// Authenticate as USER:PASS.
    #[arg(long, value_name = "USER:PASS", value_parser = parse_user_pass)]
    pub auth: Option<(String, String)>,
    /// AUTH mechanism.
    #[arg(long, value_name = "MECH", default_value = "plain")]
    pub auth_mech: AuthMechArg,
    /// Pipeline commands (RFC 2920): auto = when advertised.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub pipelining: PipeliningArg,
    /// Send bodies with BDAT (CHUNKING) instead of DATA.
    #[arg(long)]
    pub bdat: bool,
    /// Mixed traffic: weighted profiles (size, recipients, -k, TLS, BDAT),
    /// one chosen per session (README: "Mixed traffic").
    #[arg(long, value_name = "FILE.toml")]
    pub scenario: Option<PathBuf>,
    /// Speak LMTP (LHLO, one reply per recipient).
    #[arg(long)]
    pub lmtp: bool,
    /// Spread connections over these source addresses (`127.0.0.2-127.0.0.40`).
    #[arg(long, value_name = "RANGE")]
    pub source_ip: Option<String>,
    /// Close connections with RST instead of FIN (no TIME_WAIT).
    #[arg(long)]
    pub abort_close: bool,
    /// Send a PROXY protocol header first.
    #[arg(long, value_name = "VERSION")]
    pub proxy: Option<ProxyVersion>,
    /// With --proxy: the header claims a source address from RANGE, one per
    /// session (`198.51.100.0/24`, `A-B`; ports from 1024 up), not the real one.
    #[arg(long, value_name = "RANGE", requires = "proxy", value_parser = identity::parse_proxy_source)]
    pub proxy_source: Option<AddrRange>,
    /// Claim a client identity with XCLIENT after EHLO (repeatable):
    /// `ADDR=198.51.100.0/24` (one address per session), `NAME=client{n}.example`;
    /// a server that does not advertise XCLIENT fails the session's messages.
    #[arg(long, value_name = "ATTR=TEMPLATE", value_parser = identity::parse_xclient)]
    pub xclient: Vec<XclientAttr>,
    #[command(flatten)]
    pub threads: ThreadArgs,
    /// Timeout of every phase (connect, each reply).
    #[arg(long, value_name = "D", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Seed for sizes and {rand} (deterministic runs).
    #[arg(long, value_name = "N", default_value = "1")]
    pub seed: u64,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the HdrHistogram percentile distribution (.hgrm) of --hgrm-phase here.
    #[arg(long, value_name = "FILE")]
    pub hgrm: Option<PathBuf>,
    /// Phase written to --hgrm.
    #[arg(
        long,
        value_name = "PHASE",
        default_value = "message",
        requires = "hgrm"
    )]
    pub hgrm_phase: String,
    /// Write the timeline as CSV here: one row per second (requested and achieved
    /// rates, messages, sessions, errors, failed, per-phase p50/p90/p99/max).
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Stop the run early, exit 99, when this holds (repeatable; the --assert language,
    /// checked once a second on the totals so far): `errors > 100`, `p99(message) > 2s`.
    #[arg(long = "abort-on", value_name = "EXPR")]
    pub abort_on: Vec<String>,
    /// Write an HdrHistogram interval log (one tagged line per phase per second) here.
    #[arg(long, value_name = "FILE")]
    pub hlog: Option<PathBuf>,
    /// Serve live metrics over HTTP here: Prometheus text at /metrics, JSON at /stats
    /// (bench: the blaster's figures).
    #[arg(long, value_name = "ADDR", value_parser = parse_socket_addr)]
    pub metrics_listen: Option<SocketAddr>,
    /// A condition the run must meet (repeatable): `p99(message) < 5ms`, `rate(messages) >= 20000`, `errors == 0`.
    #[arg(long = "assert", value_name = "EXPR")]
    pub asserts: Vec<String>,
    /// Write every --assert and --baseline check (and the run's validity) as JUnit XML here.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Fail (exit 99) if the run regressed against this earlier JSON report.
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<PathBuf>,
    /// Allowed regression against --baseline.
    #[arg(long, value_name = "PCT", default_value = "10%", value_parser = parse_percent, requires = "baseline")]
    pub max_regression: f64,
    /// Exit 0 even if the run could not keep its schedule.
    #[arg(long)]
    pub allow_invalid: bool,
    /// Fail the run (exit 4) when more than this share of its tries failed: messages
    /// not accepted, and connections that never got a session (100% = never).
    #[arg(long, value_name = "PCT", default_value = "1%", value_parser = parse_percent)]
    pub max_failed: f64,
    /// Fail the run (exit 4) when for this long every second had failures and nothing
    /// accepted (the target went down, or refused everything); 0 = never.
    #[arg(long, value_name = "D", default_value = "3s", value_parser = parse_duration)]
    pub max_outage: Duration,
    /// This is instance I of N (0-based): rate, connections, sources and {n} are split.
    #[arg(long, value_name = "I/N", value_parser = parse_instance)]
    pub instance: Option<(u32, u32)>,
    /// Start at this UNIX time (aligns instances).
    #[arg(long, value_name = "UNIX_SECONDS")]
    pub start_at: Option<f64>,
    /// No live line; summary only.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct BlastArgs {
    /// host:port of the server under test (port 25 if omitted), or unix:/path for a
    /// unix-domain socket (--io epoll or uring).
    #[arg(value_name = "TARGET")]
    pub target: String,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMechArg {
    Plain,
    Login,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PipeliningArg {
    Auto,
    On,
    Off,
}

impl AuthMechArg {
    /// The protocol engine's mechanism.
    pub fn mech(self) -> AuthMech {
        match self {
            AuthMechArg::Plain => AuthMech::Plain,
            AuthMechArg::Login => AuthMech::Login,
        }
    }
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
    #[error("--warmup {0}s must be shorter than the --stages, which last {1}s")]
    StagesWarmup(f64, f64),
    #[error("--start-at {0} is not a valid UNIX time")]
    StartAt(f64),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Corpus(#[from] CorpusError),
    #[error("{0}")]
    Scenario(String),
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

/// A target of `unix:/path` (the blaster and the probe): the path, the
/// placeholder address the configuration carries beside it (`0.0.0.0:0`,
/// which nothing dials) and the TLS server name (`localhost`).
pub fn unix_target(target: &str) -> Option<Result<(PathBuf, SocketAddr, String), ConfigError>> {
    let path = super::parse::parse_unix(target)?;
    Some(
        path.map(|p| (p, crate::net::backend::UNIX_PEER, "localhost".to_string()))
            .map_err(|e| ConfigError::Resolve(target.to_string(), e)),
    )
}

/// Validates `load` against `target` (resolved here; `unix:/path` is a
/// unix-domain socket).
pub fn config(target: &str, load: &LoadArgs) -> Result<BlastConfig, ConfigError> {
    let Some(unix) = unix_target(target) else {
        let (addr, target_host) = resolve_target(target)?;
        return config_for(addr, target_host, load);
    };
    let (path, addr, target_host) = unix?;
    let mut cfg = config_for(addr, target_host, load)?;
    if cfg.io.xdp.is_some() {
        return Err(ConfigError::Io(format!(
            "{target}: unix sockets need a kernel-socket backend (--io epoll or uring), not --io xdp"
        )));
    }
    if !cfg.source_ips.is_empty() {
        return Err(ConfigError::SourceIp(format!(
            "{target} is a unix socket: a source address does not apply"
        )));
    }
    cfg.echo["target"] = serde_json::Value::String(target.to_string());
    cfg.echo = with_config_digest(std::mem::take(&mut cfg.echo), load, cfg.instance.1);
    cfg.unix = Some(path);
    Ok(cfg)
}

/// Validates `load` for an already resolved target (used by `bench`). The
/// checks run in a fixed order (load shape, sources, message content,
/// outputs, client, backend), so a command line with several mistakes
/// always reports the same one.
pub fn config_for(
    target: SocketAddr,
    target_host: String,
    load: &LoadArgs,
) -> Result<BlastConfig, ConfigError> {
    let instance = load.instance.unwrap_or((0, 1));
    if let Some(p) = &load.stages {
        let w = load.warmup.unwrap_or_default().as_secs_f64();
        if w >= p.duration_secs() {
            return Err(ConfigError::StagesWarmup(w, p.duration_secs()));
        }
    }
    let shape = Shape::of(load, instance);
    let source_ips = source_ips(load, instance, target)?;
    let content = Content::of(load)?;
    let hgrm_phase = hgrm_phase(load)?;
    let identities = Identities::new(load.proxy_source, &load.xclient, instance)?;
    let output = output(load, hgrm_phase)?;
    if let Some(t) = load.start_at {
        if !(t.is_finite() && t >= 0.0) {
            return Err(ConfigError::StartAt(t));
        }
    }
    let scenario = super::scenario::load(load).map_err(ConfigError::Scenario)?;
    let mut client = client(load);
    if load.trace {
        client.wall_anchor = Some(crate::trace::anchor());
    }
    let io = load.threads.io_config().map_err(ConfigError::Io)?;
    if io.xdp.is_some() && !source_ips.is_empty() {
        // The xdp backend sends from the interface's own address.
        return Err(ConfigError::Io(
            "--source-ip does not apply to --io xdp (it sends from the interface's address); drop one of them".into(),
        ));
    }
    let mut echo = echo(
        load,
        target,
        &shape,
        &content,
        source_ips.len(),
        &io,
        instance,
    );
    if let Some(s) = &scenario {
        echo["scenario"] = s.echo();
        echo = with_config_digest(echo, load, instance.1);
    }
    let trace = load.trace.then(|| run_id(load, &echo, instance));
    if let (Some(run), Some(m)) = (trace, echo.as_object_mut()) {
        m.insert("run_id".into(), crate::trace::run_id_hex(run).into());
    }
    let cfg = BlastConfig {
        scenario,
        target,
        unix: None,
        target_host,
        cpus: shape.cpus,
        io,
        connections: shape.connections,
        model: shape.model,
        rate_per_sec: shape.rate,
        stages: shape.stages.clone(),
        rate_unit: load.rate_unit,
        duration: shape.duration,
        warmup: load.warmup.unwrap_or_default(),
        max_messages: shape.max_messages,
        max_sessions: shape.max_sessions,
        messages_per_session: load.messages_per_session,
        recipients: load.recipients,
        size: load.size.range,
        size_dist: load.size.dist.clone(),
        body_file: content.body_file,
        corpus: content.corpus,
        from: content.from,
        to: content.to,
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
        tls_choice: load.tls_choice.choice(),
        proxy: load.proxy,
        identities,
        source_ips,
        abort_close: load.abort_close,
        timeout: load.timeout,
        seed: load.seed,
        instance,
        start_at_unix: load.start_at,
        trace,
        output,
        echo,
    };
    if let Some(w) = size_warning(&cfg, load) {
        eprintln!("smtpstorm: warning: {w}");
    }
    Ok(cfg)
}

/// A `--size` below the message's own header: the messages come out
/// larger than asked. Often `-s N` meant smtp-source's `-s` (a session
/// count), so the warning says where that is here.
pub fn size_warning(cfg: &BlastConfig, load: &LoadArgs) -> Option<String> {
    if load.body.is_some() || load.data.is_some() {
        return None;
    }
    let smallest = cfg.message_builder(0, 1).smallest_message();
    (cfg.size.min < smallest).then(|| {
        format!(
            "--size {} is below the message's own header: every message will be at least {smallest} bytes \
             (-s is the message size here; smtp-source's -s, a session count, is --connections)",
            cfg.size.min
        )
    })
}

/// `--run-id`: 16 hex digits.
fn parse_run_id(s: &str) -> Result<u64, String> {
    crate::trace::parse_run_id(s).ok_or_else(|| format!("expected 16 hex digits, got `{s}`"))
}

/// The run id of `--trace`: `--run-id`; with `--instance`, one every
/// instance derives alike (from the configuration digest, which leaves the
/// instance index out, and `--start-at`); else random.
fn run_id(load: &LoadArgs, echo: &serde_json::Value, (_, ninst): (u32, u32)) -> u64 {
    if let Some(r) = load.run_id {
        return r;
    }
    let mix = |mut z: u64| {
        // splitmix64's finalizer.
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    if ninst > 1 {
        let digest = echo["config_digest"].as_str().unwrap_or_default();
        let start = load.start_at.map_or(0, f64::to_bits);
        return digest
            .bytes()
            .fold(mix(start), |h, b| mix(h ^ u64::from(b)));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    mix(now ^ (u64::from(std::process::id()) << 32))
}

/// How much load, on how many threads, for how long: this instance's
/// share of it.
struct Shape {
    /// The rate as given, this instance's share (with `--stages`: the mean
    /// of the measured window).
    rate: Option<f64>,
    /// `--stages` in messages per second (all instances).
    stages: Option<Arc<RateProfile>>,
    connections: u64,
    cpus: Cpus,
    model: LoadModel,
    duration: Option<Duration>,
    max_messages: Option<u64>,
    max_sessions: Option<u64>,
}

impl Shape {
    fn of(load: &LoadArgs, (inst, ninst): (u32, u32)) -> Shape {
        let per_rate_unit = match load.rate_unit {
            RateUnit::Messages => 1.0,
            RateUnit::Sessions => load.messages_per_session as f64,
        };
        let warmup = load.warmup.unwrap_or_default().as_secs_f64();
        let stages = load
            .stages
            .as_ref()
            .map(|p| Arc::new(p.scaled(per_rate_unit)));
        // With stages, the run lasts them; the warmup is their first part.
        let stages_duration = load
            .stages
            .as_ref()
            .map(|p| Duration::from_secs_f64((p.duration_secs() - warmup).max(0.0)));
        let rate = match &load.stages {
            Some(p) => Some(p.mean_rate(warmup, p.duration_secs())),
            None => load.rate,
        }
        .map(|r| r / f64::from(ninst));
        let default_connections = if rate.is_some() { 1000 } else { 16 };
        let connections = share(
            load.connections.unwrap_or(default_connections),
            u64::from(inst),
            u64::from(ninst),
        )
        .max(1);
        // A thread needs at least one connection to carry its share.
        let cpus = load.threads.cpus().at_most(connections as usize);
        let model = match rate {
            None => LoadModel::Closed,
            Some(r) => LoadModel::Open {
                messages_per_sec: r * per_rate_unit,
            },
        };
        let duration = match (stages_duration, load.duration, load.messages, load.sessions) {
            (Some(d), ..) => Some(d),
            (None, None, None, None) => Some(Duration::from_secs(10)),
            (None, d, _, _) => d,
        };
        let max_messages = load
            .messages
            .map(|n| share(n, u64::from(inst), u64::from(ninst)));
        let max_sessions = load
            .sessions
            .map(|n| share(n, u64::from(inst), u64::from(ninst)));
        Shape {
            rate,
            stages,
            connections,
            cpus,
            model,
            duration,
            max_messages,
            max_sessions,
        }
    }
}

/// `--source-ip`, this instance's share, all of the target's IP family.
fn source_ips(
    load: &LoadArgs,
    (inst, ninst): (u32, u32),
    target: SocketAddr,
) -> Result<Vec<IpAddr>, ConfigError> {
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
    Ok(source_ips)
}

/// What the messages carry: `--body`, `--data`, the envelope templates.
struct Content {
    body_file: Option<Arc<[u8]>>,
    corpus: Option<Arc<Corpus>>,
    from: Template,
    to: Template,
}

impl Content {
    fn of(load: &LoadArgs) -> Result<Content, ConfigError> {
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
            Some(p) => Some(Arc::new(Corpus::load(
                p,
                load.data_order,
                load.seed,
                load.verify,
            )?)),
        };
        let from = Template::parse(&load.from).map_err(|e| ConfigError::Template("from", e))?;
        let to = Template::parse(&load.to).map_err(|e| ConfigError::Template("to", e))?;
        Ok(Content {
            body_file,
            corpus,
            from,
            to,
        })
    }
}

/// `--hgrm-phase`, when `--hgrm` is given.
fn hgrm_phase(load: &LoadArgs) -> Result<Option<Phase>, ConfigError> {
    match &load.hgrm {
        None => Ok(None),
        Some(_) => Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == load.hgrm_phase)
            .map(Some)
            .ok_or_else(|| ConfigError::HgrmPhase(load.hgrm_phase.clone())),
    }
}

/// What the run writes and checks once it ends.
fn output(load: &LoadArgs, hgrm_phase: Option<Phase>) -> Result<OutputConfig, ConfigError> {
    let asserts = crate::stats::parse_assertions(&load.asserts)
        .map_err(|e| ConfigError::Assertion(format!("--assert: {e}")))?;
    let abort_on = crate::stats::parse_assertions(&load.abort_on)
        .map_err(|e| ConfigError::Assertion(format!("--abort-on: {e}")))?;
    Ok(OutputConfig {
        json: load.json.clone(),
        csv: load.csv.clone(),
        abort_on,
        hgrm: load.hgrm.clone(),
        hgrm_phase,
        hlog: load.hlog.clone(),
        junit: load.junit.clone(),
        metrics_listen: load.metrics_listen,
        asserts,
        baseline: load.baseline.clone(),
        max_regression_pct: load.max_regression * 100.0,
        allow_invalid: load.allow_invalid,
        max_failed: Some(load.max_failed),
        max_outage_secs: Some(load.max_outage.as_secs_f64().ceil() as u64),
        quiet: load.quiet,
        silent: false,
    })
}

/// The protocol engine's settings, shared by every session.
fn client(load: &LoadArgs) -> ClientConfig {
    ClientConfig {
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
            mech: load.auth_mech.mech(),
            user: user.clone(),
            pass: pass.clone(),
        }),
        bdat: load.bdat,
        bdat_chunk_size: 0,
        timeouts: ClientTimeouts::uniform(load.timeout),
        send_quit: true,
        capture_text: false,
        wall_anchor: None,
    }
}

/// The configuration as the JSON report echoes it (`config`).
fn echo(
    load: &LoadArgs,
    target: SocketAddr,
    shape: &Shape,
    content: &Content,
    source_ips: usize,
    io: &IoConfig,
    (inst, ninst): (u32, u32),
) -> serde_json::Value {
    let io_echo = io.echo();
    let echo = serde_json::json!({
        "io": io_echo["io"],
        "xdp": io_echo["xdp"],
        "target": target.to_string(),
        "connections": shape.connections,
        "threads": match &shape.cpus { Cpus::Count(n) => *n, Cpus::List(l) => l.len() },
        "cpus": planned_cpus(&shape.cpus),
        "rate": shape.rate,
        "stages": load.stages.as_ref().map(|p| p.to_string()),
        "rate_unit": match load.rate_unit { RateUnit::Messages => "messages", RateUnit::Sessions => "sessions" },
        "duration_secs": shape.duration.map(|d| d.as_secs_f64()),
        "warmup_secs": load.warmup.map(|d| d.as_secs_f64()).unwrap_or(0.0),
        "messages": shape.max_messages,
        "sessions": shape.max_sessions,
        "messages_per_session": load.messages_per_session,
        "recipients": load.recipients,
        "size_min": load.size.range.min,
        "size_max": load.size.range.max,
        "size": load.size.echo(),
        "body_file": load.body.as_ref().map(|p| p.display().to_string()),
        "data": load.data.as_ref().map(|p| p.display().to_string()),
        "data_messages": content.corpus.as_ref().map(|c| c.len()),
        "data_order": load.data.as_ref().map(|_| format!("{:?}", load.data_order).to_lowercase()),
        "verify": load.verify,
        "trace": load.trace,
        "starttls": load.starttls,
        "tls": load.tls,
        "tls_resume": load.tls_resume,
        "tls_suites": load.tls_choice.echo()["suites"],
        "tls_groups": load.tls_choice.echo()["groups"],
        "auth": load.auth.is_some(),
        "pipelining": format!("{:?}", load.pipelining).to_lowercase(),
        "bdat": load.bdat,
        "lmtp": load.lmtp,
        "proxy": load.proxy.map(|p| format!("{p:?}").to_lowercase()),
        "proxy_source": load.proxy_source.map(|r| r.to_string()),
        "xclient": load.xclient.iter().map(|a| a.as_str()).collect::<Vec<_>>(),
        "source_ips": source_ips,
        "abort_close": load.abort_close,
        "timeout_secs": load.timeout.as_secs_f64(),
        "seed": load.seed,
        "instance": format!("{inst}/{ninst}"),
        "start_at_unix": load.start_at,
    });
    with_config_digest(echo, load, ninst)
}

/// The CPUs the threads will be pinned to (the runtime's plan on this
/// machine), for the report; `null` when the plan cannot be made (the run
/// then fails at start and says why).
pub fn planned_cpus(cpus: &Cpus) -> serde_json::Value {
    match cpus.plan() {
        Ok(plan) if plan.iter().all(Option::is_some) => {
            plan.into_iter().flatten().collect::<Vec<_>>().into()
        }
        _ => serde_json::Value::Null,
    }
}

/// `echo` with `config_digest`: the digest of the run's configuration as
/// every instance of it sees it (the echo with the split figures replaced
/// by the run's totals, the index dropped and N kept), so `merge` can tell
/// whether its inputs are instances of one run.
fn with_config_digest(
    mut echo: serde_json::Value,
    load: &LoadArgs,
    ninst: u32,
) -> serde_json::Value {
    let whole = Shape::of(load, (0, 1));
    let mut run = echo.clone();
    if let Some(m) = run.as_object_mut() {
        m.remove("instance");
        // Where each instance's threads were pinned is its machine's
        // business; a digest made before (a retarget) is not an input.
        m.remove("cpus");
        m.remove("config_digest");
        m.insert("instances".into(), ninst.into());
        m.insert("connections".into(), whole.connections.into());
        m.insert("messages".into(), whole.max_messages.into());
        m.insert("sessions".into(), whole.max_sessions.into());
        m.insert("source_ips".into(), load.source_ip.clone().into());
    }
    let digest = crate::stats::config_digest(&run);
    if let Some(m) = echo.as_object_mut() {
        m.insert("config_digest".into(), digest.into());
    }
    echo
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blast(args: &[&str]) -> BlastConfig {
        use clap::Parser;
        let mut argv = vec!["smtpstorm", "blast", "127.0.0.1:2525"];
        argv.extend_from_slice(args);
        let cli = super::super::Cli::try_parse_from(argv).unwrap();
        let super::super::Command::Blast(b) = cli.command else {
            unreachable!()
        };
        config(&b.target, &b.load).unwrap()
    }

    #[test]
    fn rate_units_instances_and_default_stop() {
        let c = blast(&["--rate", "100", "-k", "5"]);
        assert_eq!(
            c.model,
            LoadModel::Open {
                messages_per_sec: 100.0
            },
            "the rate is messages per second whatever -k is"
        );
        assert_eq!(c.duration, Some(Duration::from_secs(10)));
        assert_eq!(c.connections, 1000, "a generous cap in open loop");
        let c = blast(&["--rate", "100", "-c", "7"]);
        assert_eq!(c.connections, 7, "an explicit -c caps the open loop");
        assert_eq!(blast(&[]).connections, 16, "closed-loop default");
        let c = blast(&["--rate", "100", "-k", "5", "--rate-unit", "sessions"]);
        assert_eq!(
            c.model,
            LoadModel::Open {
                messages_per_sec: 500.0
            }
        );
        let c = blast(&["--rate", "100", "--instance", "1/2", "-n", "11", "-c", "5"]);
        assert_eq!(
            c.model,
            LoadModel::Open {
                messages_per_sec: 50.0
            }
        );
        assert_eq!((c.max_messages, c.duration), (Some(5), None));
        let c = blast(&[
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
            blast(&["--rate", "2"]).max_lag_p99(),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn stages_set_the_duration_the_mean_rate_and_each_second_s_request() {
        let c = blast(&["--stages", "2s:0..100,3s:100", "--warmup", "1s"]);
        assert_eq!(c.duration, Some(Duration::from_secs(4)));
        // Measured window 1..5 s: 75 + 300 messages over 4 s.
        assert_eq!(
            c.model,
            LoadModel::Open {
                messages_per_sec: 93.75
            }
        );
        assert_eq!(c.requested_between(0.0, 1.0), Some(75.0));
        assert_eq!(c.requested_between(1.0, 2.0), Some(100.0));
        assert_eq!(c.requested_between(4.0, 5.0), Some(0.0), "past the end");
        let c = blast(&["--stages", "2s:0..100,3s:100", "--instance", "1/2"]);
        assert_eq!(
            c.requested_between(2.0, 3.0),
            Some(50.0),
            "an instance's share"
        );
        let c = blast(&["--stages", "1s:10", "-k", "4", "--rate-unit", "sessions"]);
        assert_eq!(c.requested_between(0.0, 1.0), Some(40.0));
        let constant = blast(&["--rate", "100", "-d", "2s"]);
        assert_eq!(constant.requested_between(1.5, 2.5), Some(50.0));
        use clap::Parser;
        for (argv, want) in [
            (&["--stages", "2s:10", "--warmup", "2s"][..], "--warmup"),
            (
                &["--stages", "2s:10", "--rate", "5"][..],
                "cannot be used with",
            ),
            (
                &["--stages", "2s:10", "-d", "5s"][..],
                "cannot be used with",
            ),
            (&["--stages", "2s"][..], "expected stages like"),
        ] {
            let mut v = vec!["smtpstorm", "blast", "127.0.0.1:2525"];
            v.extend_from_slice(argv);
            let e = match super::super::Cli::try_parse_from(v) {
                Err(e) => e.to_string(),
                Ok(cli) => {
                    let super::super::Command::Blast(b) = cli.command else {
                        unreachable!()
                    };
                    config(&b.target, &b.load).unwrap_err().to_string()
                }
            };
            assert!(e.contains(want), "{argv:?}: {e}");
        }
    }

    #[test]
    fn source_addresses_are_refused_up_front_with_xdp() {
        use clap::Parser;
        let argv = [
            "smtpstorm",
            "blast",
            "127.0.0.1:2525",
            "--io",
            "xdp",
            "--xdp-iface",
            "lo",
            "--source-ip",
            "127.0.0.2",
        ];
        let cli = super::super::Cli::try_parse_from(argv).unwrap();
        let super::super::Command::Blast(b) = cli.command else {
            unreachable!()
        };
        let e = super::config(&b.target, &b.load).unwrap_err().to_string();
        assert!(e.contains("--source-ip") && e.contains("--io xdp"), "{e}");
    }

    #[test]
    fn fewer_connections_than_threads_means_fewer_threads() {
        let c = blast(&["--rate", "1000", "-c", "1", "--threads", "2"]);
        assert_eq!(c.thread_count(), 1);
        assert_eq!(blast(&["-c", "3", "--threads", "8"]).thread_count(), 3);
        assert_eq!(blast(&["-c", "1", "--cpus", "0,1"]).thread_count(), 1);
        assert_eq!(blast(&["-c", "8", "--threads", "2"]).thread_count(), 2);
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

    #[test]
    fn a_size_below_the_header_warns_and_names_smtp_sources_s() {
        use clap::Parser;
        let b = |args: &[&str]| {
            let mut argv = vec!["smtpstorm", "blast", "127.0.0.1:25"];
            argv.extend_from_slice(args);
            let cli = super::super::Cli::try_parse_from(argv).unwrap();
            let super::super::Command::Blast(b) = cli.command else {
                unreachable!()
            };
            (config(&b.target, &b.load).unwrap(), b.load)
        };
        let (c, l) = b(&["-s", "16"]);
        let w = size_warning(&c, &l).expect("a warning");
        assert!(
            w.contains("--size 16") && w.contains("--connections"),
            "{w}"
        );
        let (c, l) = b(&["-s", "100..2KiB"]);
        assert!(size_warning(&c, &l).is_some(), "the range's low end counts");
        let (c, l) = b(&[]);
        assert_eq!(
            size_warning(&c, &l),
            None,
            "the default 1KiB is above the header"
        );
    }

    #[test]
    fn tls_on_connect_is_a_second_name_for_tls_and_unix_targets_parse() {
        use clap::Parser;
        let cli =
            super::super::Cli::try_parse_from(["smtpstorm", "blast", "x:25", "--tls-on-connect"])
                .unwrap();
        let super::super::Command::Blast(b) = cli.command else {
            unreachable!()
        };
        assert!(b.load.tls);
        let cli =
            super::super::Cli::try_parse_from(["smtpstorm", "blast", "unix:/run/x.sock"]).unwrap();
        let super::super::Command::Blast(b) = cli.command else {
            unreachable!()
        };
        let c = config(&b.target, &b.load).unwrap();
        assert_eq!(c.unix.as_deref(), Some(std::path::Path::new("/run/x.sock")));
        assert_eq!(c.echo["target"], "unix:/run/x.sock");
        assert!(config("unix:", &b.load).is_err());
    }
}
