//! smtpstorm: a thread-per-core SMTP sink and load generator.
//!
//! A tour of the layers, top to bottom (data flows down, never back up):
//!
//! - `cli` / `config`: raw flags (clap) and the validated configuration built
//!   from them; every cross-flag check lives in `config`.
//! - `sink`, `blast`, `bench`, `probe`: the roles. Each is a connection
//!   handler (`sink::conn`, `blast::conn`: the per-connection logic, no I/O
//!   type in it) plus a thread-level handler (`*::worker`: schedule,
//!   statistics, stop conditions).
//! - `net`: one pinned thread per CPU, each running one backend
//!   (`net::epoll`, `net::uring`, chosen by `net::driver` from `--io`)
//!   that owns every socket, buffer and timer and drives the handler through
//!   the seam of `net::backend`; TLS is a sans-IO transform
//!   (`net::tls_stream`) inside the backend.
//! - `smtp`: the protocol as sans-IO state machines (bytes and time in,
//!   bytes, events and deadlines out).
//! - `stats`: per-thread histograms and counters, merged once, reported as
//!   text, JSON, .hgrm, .hlog, SVG, HTML, JUnit XML and live metrics.
//! - `shell`: completion scripts and man pages from the clap definitions.

pub mod bench;
pub mod blast;
pub mod cli;
pub mod digest;
pub mod net;
pub mod offline;
pub mod rng;
pub mod shell;
pub mod sink;
pub mod smtp;
pub mod stats;

/// Run the command the flags name; returns the process exit code.
pub fn run(cli: cli::Cli) -> anyhow::Result<u8> {
    match cli.command {
        cli::Command::Sink(a) => sink::run(&a),
        cli::Command::Blast(a) => blast::run(&a),
        cli::Command::Probe(a) => blast::probe::run(&a),
        cli::Command::Bench(a) => bench::run(&a),
        cli::Command::Merge(a) => offline::merge(&a),
        cli::Command::Report(a) => offline::report(&a),
        cli::Command::Completions(a) => Ok(shell::completions(&a)?),
        cli::Command::Man(a) => Ok(shell::man(&a)?),
    }
}
