//! The command line: raw flags (clap derive), their value parsers, and the
//! code that validates them into each role's configuration.
//!
//! Configuration flows one way: `cli` → the roles' configs
//! ([`crate::sink::SinkConfig`], [`crate::blast::BlastConfig`],
//! [`crate::blast::probe::ProbeConfig`], [`crate::bench::BenchConfig`]) →
//! the roles → `net` / `smtp` / `stats`. Nothing below imports from here:
//! the value types flags parse into (sizes, ranges, fault specs, the auth
//! policy, the data order) live with the role that uses them, and the
//! command line imports them.
//!
//! - this file: the clap definitions shared by several commands ([`Cli`],
//!   [`Command`], [`ThreadArgs`] with `--io` and the `--xdp-*` flags);
//! - [`parse`]: every value parser (`10k`, `30s`, `64KiB`, `5%`,
//!   `1KiB..4KiB`); on bad input each returns an error that states the
//!   expected form, so that clap prints one line naming the flag;
//! - [`sink`], [`blast`], [`probe`], [`bench`], [`offline`]: each command's
//!   flags beside the code that checks them together (what clap cannot
//!   express) and builds its configuration; a configuration that exists is
//!   runnable, only I/O can still fail;
//! - [`shell`]: completion scripts and man pages from these definitions.
//!
//! Exit codes (documented in `--help` and the man page): 0 success, 2 usage
//! or runtime error, 3 invalid run (the blaster could not keep its
//! schedule), 4 failed run (nothing accepted, more than `--max-failed` of
//! the tries failed, or everything failed for `--max-outage`), 99 a failed
//! `--assert` or `--baseline` check; the first in the order 2, 99, 4, 3.

pub mod bench;
pub mod blast;
pub mod offline;
pub mod parse;
pub mod probe;
pub mod scenario;
pub mod shell;
pub mod sink;
pub mod sweep;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::net::driver::IoConfig;
use crate::net::runtime::Cpus;
use parse::parse_threads;

pub use bench::BenchArgs;
pub use blast::{AuthMechArg, BlastArgs, LoadArgs, PipeliningArg};
pub use offline::{MergeArgs, ReportArgs};
pub use parse::*;
pub use probe::ProbeArgs;
pub use shell::{CompletionsArgs, ManArgs};
pub use sink::SinkArgs;
pub use sweep::SweepArgs;

// The validated types flags parse into live with the roles that use them
// (nothing below the CLI imports from here).
pub use crate::blast::config::{ProxyVersion, RateUnit};
pub use crate::blast::message::SizeRange;
pub use crate::sink::config::AuthPolicy;
pub use crate::sink::faults::{FaultAction, FaultPoint, FaultSpec};

#[derive(Debug, Parser)]
#[command(
    name = "smtpstorm",
    version,
    about = "Thread-per-core SMTP sink and load generator with honest latency figures",
    after_help = "Exit codes: 0 success, 2 usage or runtime error, 3 invalid run \
                  (the blaster could not keep its schedule; see --allow-invalid), \
                  4 failed run (nothing accepted, more than --max-failed of the \
                  tries failed, or everything failed for --max-outage), \
                  99 a failed --assert or --baseline check. When several apply, \
                  the first in the order 2, 99, 4, 3."
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
    /// Find the highest open-loop rate TARGET carries while every --slo holds
    /// (steps of --step, the rate doubled then bisected).
    Sweep(SweepArgs),
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
    #[arg(
        long,
        value_name = "BACKEND",
        default_value = "auto",
        env = "SMTPSTORM_IO"
    )]
    pub io: IoArg,
    #[command(flatten)]
    pub xdp: XdpArgs,
}

/// `--tls-suites` and `--tls-groups`, the same for the sink and the
/// blaster (so a sink can mirror the clients it expects, and a blaster the
/// clients it stands for).
#[derive(Debug, Clone, Args, Default)]
pub struct TlsChoiceArgs {
    /// TLS cipher suites, most preferred first, comma-separated (e.g.
    /// TLS13_AES_128_GCM_SHA256,TLS13_AES_256_GCM_SHA384). Sink: the suites it accepts, its
    /// order decides [default: all, cheapest on this CPU first]; blaster: what it offers
    /// [default: rustls' offer].
    #[arg(long, value_name = "LIST", value_parser = parse_tls_suites)]
    // `std::vec::Vec`: one value holding the list (see `ThreadArgs::cpus`).
    pub tls_suites: Option<std::vec::Vec<rustls::SupportedCipherSuite>>,
    /// TLS key-exchange groups, most preferred first, comma-separated (e.g. X25519,secp256r1).
    /// The client's order decides among those both sides have [default: rustls' list].
    #[arg(long, value_name = "LIST", value_parser = parse_tls_groups)]
    pub tls_groups: Option<std::vec::Vec<&'static dyn rustls::crypto::SupportedKxGroup>>,
}

impl TlsChoiceArgs {
    /// The choice as the TLS layer takes it (empty lists: the defaults).
    pub fn choice(&self) -> crate::net::tls::TlsChoice {
        crate::net::tls::TlsChoice {
            suites: self.tls_suites.clone().unwrap_or_default(),
            groups: self.tls_groups.clone().unwrap_or_default(),
        }
    }

    /// The flags as given, for the report's config (`null`: the default).
    pub fn echo(&self) -> serde_json::Value {
        use crate::net::tls::{group_name, suite_name};
        serde_json::json!({
            "suites": self.tls_suites.as_ref().map(|l| l.iter().map(|s| suite_name(*s)).collect::<Vec<_>>()),
            "groups": self.tls_groups.as_ref().map(|l| l.iter().map(|g| group_name(*g)).collect::<Vec<_>>()),
        })
    }
}

fn parse_tls_suites(s: &str) -> Result<std::vec::Vec<rustls::SupportedCipherSuite>, String> {
    crate::net::tls::parse_suites(s)
}

fn parse_tls_groups(
    s: &str,
) -> Result<std::vec::Vec<&'static dyn rustls::crypto::SupportedKxGroup>, String> {
    crate::net::tls::parse_groups(s)
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
    /// --io xdp: inject faults on the AF_XDP path: `loss=1%,reorder=2%,delay=5ms` (any of them;
    /// loss each way, reorder and delay on receive); echoed in the report's config.xdp.faults.
    #[arg(long, value_name = "SPEC", value_parser = crate::net::xdp::XdpFaults::parse)]
    pub xdp_faults: Option<crate::net::xdp::XdpFaults>,
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
            faults: self.xdp_faults.unwrap_or_default(),
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

impl ThreadArgs {
    /// The CPUs the flags name: a list, a count, or every CPU.
    pub fn cpus(&self) -> Cpus {
        match (&self.cpus, self.threads) {
            (Some(list), _) => Cpus::List(list.clone()),
            (None, Some(n)) => Cpus::Count(n),
            (None, None) => Cpus::all(),
        }
    }

    /// The backend (`--io`, resolved on this kernel) and its options.
    pub fn io_config(&self) -> Result<IoConfig, String> {
        IoConfig::resolve(self.io.choice(), self.xdp.options())
    }
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
        assert!(
            Cli::try_parse_from(["smtpstorm", "blast", "x:25", "--starttls", "--tls"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["smtpstorm", "sink", "--threads", "2", "--cpus", "0"]).is_err()
        );
    }
}
