//! smtpstorm: a thread-per-core SMTP sink and load generator.
//!
//! A tour of the layers, top to bottom (data flows down, never back up):
//!
//! - `cli`: raw flags (clap), their value parsers, and the code that checks
//!   them together and builds each role's configuration (`SinkConfig`,
//!   `BlastConfig`, `ProbeConfig`, `BenchConfig`); every cross-flag check
//!   lives there. Completion scripts and man pages (`cli::shell`) come from
//!   the same definitions.
//! - `sink`, `blast`, `bench`, `blast::probe`, `offline`: the roles, each
//!   run from its built configuration (`*::config` holds the type; the
//!   value types flags parse into live with the role that uses them). A
//!   network role is a connection handler (`sink::conn`, `blast::conn`: the
//!   per-connection logic, no I/O type in it) plus a thread-level handler
//!   (`*::worker`: schedule, statistics, stop conditions).
//! - `net`: one pinned thread per CPU, each running one backend
//!   (`net::epoll`, `net::uring`, `net::xdp`; chosen, opened once per run
//!   and run by `net::driver`, so a role names none) that owns every
//!   socket, buffer and timer and drives the handler through the seam of
//!   `net::backend`; TLS is a sans-IO transform (`net::tls_stream`) inside
//!   the backend.
//! - `smtp`: the protocol as sans-IO state machines (bytes and time in,
//!   bytes, events and deadlines out).
//! - `stats`: per-thread histograms and counters, merged once, reported as
//!   text, JSON, .hgrm, .hlog, SVG, HTML, JUnit XML and live metrics.
//! - `units`: reading quantities as people type them (`10k`, `30s`,
//!   `64KiB`, `5%`), for the command line and the roles' own grammars.

// The blaster's config echo is one `serde_json::json!` with every flag.
#![recursion_limit = "256"]

pub mod bench;
pub mod blast;
pub mod cli;
pub mod digest;
pub mod net;
pub mod offline;
pub mod rng;
pub mod sink;
pub mod smtp;
pub mod stats;
pub mod trace;
pub mod units;

/// Run the command the flags name; returns the process exit code. Each
/// command's flags become its configuration (`cli::*::config`), which the
/// role then runs.
pub fn run(cli: cli::Cli) -> anyhow::Result<u8> {
    use cli::Command;
    match cli.command {
        Command::Sink(a) => sink::run(cli::sink::config(&a)?),
        Command::Blast(a) => blast::run(cli::blast::config(&a.target, &a.load)?),
        Command::Sweep(a) => blast::sweep::run(cli::sweep::config(&a)?),
        Command::Probe(a) => blast::probe::run(cli::probe::config(&a)?),
        Command::Bench(a) => bench::run(cli::bench::config(&a)?),
        Command::Merge(a) => offline::merge(
            &a.files,
            cli::offline::merge_rules(&a),
            &cli::offline::merge_output(&a)?,
        ),
        Command::Report(a) => offline::report(
            &a.file,
            a.svg.as_deref(),
            a.html.as_deref(),
            a.prometheus.as_deref(),
        ),
        Command::Completions(a) => Ok(cli::shell::completions(&a)?),
        Command::Man(a) => Ok(cli::shell::man(&a)?),
    }
}
