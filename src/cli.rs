//! Raw command-line flags (clap derive) and the value parsers behind them.
//!
//! This module only parses: every value parser accepts the human forms users
//! type (`10k`, `30s`, `64KiB`, `5%`, `1KiB..4KiB`) and, on bad input, returns
//! an error that states the expected form, so that clap prints one line naming
//! the flag. Cross-flag checks that clap cannot express live in `config`.
//! Exit codes (documented in `--help` and the man page): 0 success, 2 usage
//! or runtime error, 3 invalid run (the blaster could not keep its
//! schedule), 4 failed run (nothing accepted), 99 a failed `--assert` or
//! `--baseline` check.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::blast::identity::{self, AddrRange, XclientAttr};
use crate::smtp::BareLfPolicy;

#[derive(Debug, Parser)]
#[command(
    name = "smtpstorm",
    version,
    about = "Thread-per-core SMTP sink and load generator with honest latency figures",
    after_help = "Exit codes: 0 success, 2 usage or runtime error, 3 invalid run \
                  (the blaster could not keep its schedule; see --allow-invalid), \
                  4 failed run (the target accepted no message), \
                  99 a failed --assert or --baseline check."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Accept SMTP as fast as the machine allows, count (and optionally keep) what arrives.
    Sink(SinkArgs),
    /// Generate SMTP load against TARGET and measure every phase.
    Blast(BlastArgs),
    /// Run one diagnostic session against TARGET and print what the server says.
    Probe(ProbeArgs),
    /// Run a sink and a blaster in one process on loopback and report (the embedded default).
    Bench(BenchArgs),
    /// Add several blast JSON reports (histograms and counts) and re-evaluate assertions.
    Merge(MergeArgs),
    /// Print a JSON report as text, or draw it as SVG or a self-contained HTML page.
    Report(ReportArgs),
    /// Print a shell completion script (e.g. `source <(smtpstorm completions bash)`).
    Completions(CompletionsArgs),
    /// Print the man page (roff), or write one page per command with --out.
    Man(ManArgs),
}

#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// Write smtpstorm.1 and smtpstorm-COMMAND.1 into DIR instead of printing smtpstorm.1.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Threads: a count or an explicit CPU list (mutually exclusive).
#[derive(Debug, Clone, Args, Default)]
pub struct ThreadArgs {
    /// Worker threads, one pinned per CPU [default: all CPUs].
    #[arg(long, value_name = "N", value_parser = parse_threads, conflicts_with = "cpus")]
    pub threads: Option<usize>,
    /// CPUs to run on, one pinned thread each (e.g. `0,2-3`).
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    // `std::vec::Vec` (not `Vec`) so clap stores the parsed list as one value
    // instead of treating the flag as repeatable usize values.
    pub cpus: Option<std::vec::Vec<usize>>,
    /// I/O backend: io_uring where the kernel allows it (auto), epoll, uring, or xdp
    /// (AF_XDP with TCP in user space; needs --xdp-iface and root).
    #[arg(long, value_name = "BACKEND", default_value = "auto", env = "SMTPSTORM_IO")]
    pub io: IoArg,
    #[command(flatten)]
    pub xdp: XdpArgs,
}

/// The `--io xdp` flags.
#[derive(Debug, Clone, Args, Default)]
pub struct XdpArgs {
    /// --io xdp: the interface to take over (its IPv4 address and MAC are ours).
    #[arg(long, value_name = "IFACE")]
    pub xdp_iface: Option<String>,
    /// --io xdp: where the XDP program runs: skb (generic, any interface) or native (in the driver).
    #[arg(long, value_name = "MODE", default_value = "skb")]
    pub xdp_mode: XdpModeArg,
    /// --io xdp: bind the AF_XDP sockets in zero-copy mode (the driver must support it).
    #[arg(long)]
    pub xdp_zerocopy: bool,
    /// --io xdp: the NIC queue of each thread, in thread order (e.g. `0-3`) [default: 0..threads].
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub xdp_queues: Option<std::vec::Vec<usize>>,
}

/// `--xdp-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum XdpModeArg {
    #[default]
    Skb,
    Native,
}

impl XdpArgs {
    /// The validated options when `--io xdp` is chosen.
    pub fn options(&self) -> crate::net::xdp::XdpOptions {
        crate::net::xdp::XdpOptions {
            iface: self.xdp_iface.clone().unwrap_or_default(),
            mode: match self.xdp_mode {
                XdpModeArg::Skb => crate::net::xdp::XdpMode::Skb,
                XdpModeArg::Native => crate::net::xdp::XdpMode::Native,
            },
            zerocopy: self.xdp_zerocopy,
            queues: self
                .xdp_queues
                .as_ref()
                .map(|q| q.iter().map(|&x| x as u32).collect()),
        }
    }
}

/// `--io`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum IoArg {
    #[default]
    Auto,
    Epoll,
    Uring,
    Xdp,
}

impl IoArg {
    /// The runtime's choice.
    pub fn choice(self) -> crate::net::driver::IoChoice {
        use crate::net::driver::IoChoice;
        match self {
            IoArg::Auto => IoChoice::Auto,
            IoArg::Epoll => IoChoice::Epoll,
            IoArg::Uring => IoChoice::Uring,
            IoArg::Xdp => IoChoice::Xdp,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct SinkArgs {
    /// Address to accept plaintext SMTP on (repeatable; STARTTLS offered there).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:2525", value_parser = parse_socket_addr)]
    pub listen: Vec<SocketAddr>,
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
    /// Stop after this many accepted messages.
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
    /// Message size, or a range drawn uniformly (`1KiB`, `512..64KiB`).
    #[arg(short = 's', long, value_name = "S[..S]", default_value = "1KiB", value_parser = parse_size_range)]
    pub size: SizeRange,
    /// Send this file as the message (headers and body as given).
    #[arg(long, value_name = "FILE", conflicts_with = "data")]
    pub body: Option<PathBuf>,
    /// Send real messages: an .eml file, a directory of *.eml, or an mbox; loaded
    /// once, CRLF-normalized, dot-stuffed for DATA (not for BDAT); --size is ignored.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Order of --data messages: round-robin, or shuffle (a new permutation per pass, from --seed).
    #[arg(long, value_name = "ORDER", default_value = "round-robin", requires = "data")]
    pub data_order: crate::blast::corpus::DataOrder,
    /// Messages carry the digest header the sink's --verify checks (generated ones
    /// always do; --data messages get one on top); bench: the embedded sink verifies.
    #[arg(long)]
    pub verify: bool,
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
    /// Implicit TLS from the first byte (465-style).
    #[arg(long)]
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
    #[arg(long, value_name = "PHASE", default_value = "message", requires = "hgrm")]
    pub hgrm_phase: String,
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
    /// host:port of the server under test (port 25 if omitted).
    #[arg(value_name = "TARGET")]
    pub target: String,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Threads given to the sink [default: half the CPUs, at least 1].
    #[arg(long, value_name = "N", value_parser = parse_threads, conflicts_with = "sink_cpus")]
    pub sink_threads: Option<usize>,
    /// CPUs for the sink.
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub sink_cpus: Option<std::vec::Vec<usize>>,
    /// CPUs for the blaster.
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub blast_cpus: Option<std::vec::Vec<usize>>,
    /// Faults for the embedded sink (same forms as `sink --fault`).
    #[arg(long = "sink-fault", value_name = "SPEC", value_parser = parse_fault)]
    pub sink_faults: Vec<FaultSpec>,
}

#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// host:port (port 25 if omitted).
    #[arg(value_name = "TARGET")]
    pub target: String,
    /// Upgrade with STARTTLS.
    #[arg(long, conflicts_with = "tls")]
    pub starttls: bool,
    /// Implicit TLS (465-style).
    #[arg(long)]
    pub tls: bool,
    /// Authenticate as USER:PASS.
    #[arg(long, value_name = "USER:PASS", value_parser = parse_user_pass)]
    pub auth: Option<(String, String)>,
    #[arg(long, value_name = "MECH", default_value = "plain")]
    pub auth_mech: AuthMechArg,
    #[arg(long, value_name = "NAME", default_value = "smtpstorm.localhost")]
    pub helo: String,
    /// Timeout of each step.
    #[arg(long, value_name = "D", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Write the findings as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// Blast JSON reports to add together.
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
    #[arg(long = "assert", value_name = "EXPR")]
    pub asserts: Vec<String>,
    /// Write every --assert check (and the run's validity) as JUnit XML here.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    #[arg(long)]
    pub allow_invalid: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// A JSON report written by blast, bench or merge.
    #[arg(value_name = "FILE.json")]
    pub file: PathBuf,
    /// Draw the latency spectrum and throughput over time as SVG here.
    #[arg(long, value_name = "OUT")]
    pub svg: Option<PathBuf>,
    /// Write a self-contained HTML report here (charts inline, nothing fetched).
    #[arg(long, value_name = "OUT")]
    pub html: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RateUnit {
    Messages,
    Sessions,
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

// The validated types flags parse into live with the roles that use them
// (nothing below the CLI imports from here).
pub use crate::blast::config::ProxyVersion;
pub use crate::blast::message::SizeRange;
pub use crate::sink::config::AuthPolicy;
pub use crate::sink::faults::{FaultAction, FaultPoint, FaultSpec};

// ---------------------------------------------------------------- parsers

fn split_number_suffix(s: &str) -> (&str, &str) {
    let i = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    (&s[..i], s[i..].trim())
}

/// `1000`, `10k`, `2M`, `1_000_000` → count. Errors state the expected form.
pub fn parse_count(s: &str) -> Result<u64, String> {
    let err = || format!("expected a whole number like 1000, 10k or 2M, got `{s}`");
    let (num, suffix) = split_number_suffix(s.trim());
    if num.is_empty() {
        return Err(err());
    }
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" | "K" => 1e3,
        "m" | "M" => 1e6,
        "g" | "G" => 1e9,
        _ => return Err(err()),
    };
    let v: f64 = num.replace('_', "").parse().map_err(|_| err())?;
    let total = v * mult;
    if !total.is_finite() || total < 0.0 || total.fract() != 0.0 || total > u64::MAX as f64 {
        return Err(err());
    }
    Ok(total as u64)
}

fn parse_count_nonzero(s: &str) -> Result<u64, String> {
    match parse_count(s)? {
        0 => Err(format!("expected a number of at least 1, got `{s}`")),
        n => Ok(n),
    }
}

fn parse_threads(s: &str) -> Result<usize, String> {
    match parse_count(s) {
        Ok(n) if (1..=4096).contains(&n) => Ok(n as usize),
        _ => Err(format!("expected a thread count from 1 to 4096, got `{s}`")),
    }
}

/// `1000`, `10k`, `2.5k`, `1000/s` → events per second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let err = || format!("expected a rate per second like 500, 10k or 2.5k/s, got `{s}`");
    let t = s.trim().trim_end_matches("/s");
    let (num, suffix) = split_number_suffix(t);
    let mult = match suffix {
        "" => 1.0,
        "k" | "K" => 1e3,
        "m" | "M" => 1e6,
        _ => return Err(err()),
    };
    let v: f64 = num.parse().map_err(|_| err())?;
    let r = v * mult;
    if !(r.is_finite() && r > 0.0) {
        return Err(err());
    }
    Ok(r)
}

/// `30s`, `200ms`, `1.5s`, `5m`, `1h`, `100us`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("expected a duration like 30s, 200ms, 5m or 1h, got `{s}`");
    let (num, unit) = split_number_suffix(s.trim());
    if num.is_empty() {
        return Err(err());
    }
    let v: f64 = num.parse().map_err(|_| err())?;
    let secs = match unit {
        "" | "s" | "sec" | "secs" => v,
        "ms" => v / 1e3,
        "us" | "µs" => v / 1e6,
        "ns" => v / 1e9,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(err()),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(err());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `1024`, `1k`/`1KB` (1000), `1KiB` (1024), `64MiB`, `1MB`, `2G` → bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err = || format!("expected a size like 1024, 1KB, 64KiB or 10MiB, got `{s}`");
    let (num, unit) = split_number_suffix(s.trim());
    if num.is_empty() {
        return Err(err());
    }
    let v: f64 = num.parse().map_err(|_| err())?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(err()),
    };
    let b = v * mult;
    if !b.is_finite() || b < 0.0 || b > (1u64 << 50) as f64 {
        return Err(err());
    }
    Ok(b.round() as u64)
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

/// `5%` or `0.05` → 0.05.
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let err = || format!("expected a percentage like 5% or 0.5%, got `{s}`");
    let t = s.trim();
    let v = if let Some(p) = t.strip_suffix('%') {
        p.trim().parse::<f64>().map_err(|_| err())? / 100.0
    } else {
        t.parse::<f64>().map_err(|_| err())?
    };
    if !(0.0..=1.0).contains(&v) {
        return Err(err());
    }
    Ok(v)
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

fn parse_user_pass(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((u, p)) if !u.is_empty() => Ok((u.to_string(), p.to_string())),
        _ => Err(format!("expected USER:PASS, got `{s}`")),
    }
}

fn parse_auth_policy(s: &str) -> Result<AuthPolicy, String> {
    if s == "any" {
        return Ok(AuthPolicy::Any);
    }
    parse_user_pass(s)
        .map(|(user, pass)| AuthPolicy::Only { user, pass })
        .map_err(|_| format!("expected `any` or USER:PASS, got `{s}`"))
}

fn parse_bare_lf(s: &str) -> Result<BareLfPolicy, String> {
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

impl FromStr for FaultSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_fault(s)
    }
}

/// Grammar: `POINT:ACTION[:PROBABILITY]` where POINT is one of connect, ehlo
/// (also helo/lhlo), mail, rcpt, data, dot (also bdat), quit and ACTION is a
/// reply code (4xx/5xx), `disconnect`, `disconnect421`, `delay=D` or
/// `delay=D..D`, `greylist[=WINDOW]`, `ratelimit=N`.
pub fn parse_fault(s: &str) -> Result<FaultSpec, String> {
    let form = "expected POINT:ACTION[:PCT] like rcpt:451:5%, data:disconnect:1%, \
                ehlo:delay=200ms, rcpt:greylist or connect:ratelimit=100";
    let err = |why: &str| format!("{why} in `{s}`; {form}");
    let mut parts = s.split(':');
    let point = match parts.next().unwrap_or("").trim().to_ascii_lowercase().as_str() {
        "connect" => FaultPoint::Connect,
        "ehlo" | "helo" | "lhlo" => FaultPoint::Ehlo,
        "mail" => FaultPoint::Mail,
        "rcpt" => FaultPoint::Rcpt,
        "data" => FaultPoint::Data,
        "dot" | "bdat" => FaultPoint::Dot,
        "quit" => FaultPoint::Quit,
        other => return Err(err(&format!("unknown point `{other}`"))),
    };
    let action_s = parts.next().ok_or_else(|| err("missing action"))?.trim();
    let action = if let Some(d) = action_s.strip_prefix("delay=") {
        let (min, max) = match d.split_once("..") {
            Some((a, b)) => (parse_duration(a)?, parse_duration(b)?),
            None => {
                let v = parse_duration(d)?;
                (v, v)
            }
        };
        if min > max {
            return Err(err("delay range MIN..MAX with MIN > MAX"));
        }
        FaultAction::Delay { min, max }
    } else if action_s == "disconnect" {
        FaultAction::Disconnect
    } else if action_s == "disconnect421" {
        FaultAction::Disconnect421
    } else if action_s == "greylist" {
        FaultAction::Greylist { window: Duration::from_secs(1) }
    } else if let Some(w) = action_s.strip_prefix("greylist=") {
        FaultAction::Greylist { window: parse_duration(w)? }
    } else if let Some(n) = action_s.strip_prefix("ratelimit=") {
        let per_sec = parse_count(n)?;
        if point != FaultPoint::Connect {
            return Err(err("ratelimit applies to connect only"));
        }
        FaultAction::RateLimit { per_sec }
    } else if let Ok(code) = action_s.parse::<u16>() {
        if !(400..=599).contains(&code) {
            return Err(err("reply code must be 4xx or 5xx"));
        }
        FaultAction::Reply(code)
    } else {
        return Err(err(&format!("unknown action `{action_s}`")));
    };
    if matches!(action, FaultAction::Greylist { .. }) && point != FaultPoint::Rcpt {
        return Err(err("greylist applies to rcpt only"));
    }
    let probability = match parts.next() {
        None => 1.0,
        Some(p) => parse_percent(p).map_err(|e| err(&e))?,
    };
    if parts.next().is_some() {
        return Err(err("too many fields"));
    }
    Ok(FaultSpec { point, action, probability })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn counts_accept_suffixes() {
        assert_eq!(parse_count("10k"), Ok(10_000));
        assert_eq!(parse_count("2M"), Ok(2_000_000));
        assert_eq!(parse_count("1_000"), Ok(1000));
        assert_eq!(parse_count("1.5k"), Ok(1500));
        assert!(parse_count("1.5").unwrap_err().contains("expected a whole number"));
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
        assert!(parse_duration("5 parsecs").unwrap_err().contains("like 30s"));
    }

    #[test]
    fn sizes_distinguish_si_and_binary() {
        assert_eq!(parse_size("1KB"), Ok(1000));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size_range("512..64KiB"), Ok(SizeRange { min: 512, max: 65536 }));
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
        assert_eq!(parse_socket_addr("2525"), Ok("127.0.0.1:2525".parse().unwrap()));
        assert_eq!(parse_socket_addr("[::1]:25"), Ok("[::1]:25".parse().unwrap()));
        assert_eq!(parse_socket_addr(":25"), Ok("0.0.0.0:25".parse().unwrap()));
        assert!(parse_socket_addr("nowhere").is_err());
    }

    #[test]
    fn fault_specs_from_the_design() {
        let f = parse_fault("rcpt:451:5%").unwrap();
        assert_eq!((f.point, f.action, f.probability), (FaultPoint::Rcpt, FaultAction::Reply(451), 0.05));
        let f = parse_fault("data:disconnect:1%").unwrap();
        assert_eq!(f.action, FaultAction::Disconnect);
        let f = parse_fault("ehlo:delay=200ms").unwrap();
        assert_eq!(f.probability, 1.0);
        assert_eq!(
            f.action,
            FaultAction::Delay { min: Duration::from_millis(200), max: Duration::from_millis(200) }
        );
        let f = parse_fault("rcpt:greylist").unwrap();
        assert!(matches!(f.action, FaultAction::Greylist { .. }));
        let f = parse_fault("connect:ratelimit=100").unwrap();
        assert_eq!(f.action, FaultAction::RateLimit { per_sec: 100 });
        assert!(parse_fault("rcpt:250:5%").unwrap_err().contains("4xx or 5xx"));
        assert!(parse_fault("banana:451").unwrap_err().contains("unknown point"));
        assert!(parse_fault("mail:greylist").is_err());
    }

    #[test]
    fn bad_flag_value_names_the_flag_and_form() {
        let e = Cli::try_parse_from(["smtpstorm", "blast", "127.0.0.1:25", "--rate", "fast"])
            .unwrap_err()
            .to_string();
        let first = e.lines().next().unwrap();
        assert!(first.contains("--rate"), "{first}");
        assert!(first.contains("expected a rate"), "{first}");
    }

    #[test]
    fn starttls_and_tls_conflict() {
        assert!(Cli::try_parse_from(["smtpstorm", "blast", "x:25", "--starttls", "--tls"]).is_err());
        assert!(Cli::try_parse_from(["smtpstorm", "sink", "--threads", "2", "--cpus", "0"]).is_err());
    }
}
