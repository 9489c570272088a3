//! The blaster's validated configuration: what one run needs (this
//! instance's share), built once by the command line
//! (`cli::blast::config`, which holds every cross-flag check). Workers only
//! ever see this type, so nothing on the hot path re-parses a flag.
//!
//! Invariants of a built config: `1 <= threads <= connections`;
//! `connections >= 1`; `rate_per_sec`, `connections` and `source_ips` are
//! already this instance's share; the open loop's rate
//! ([`LoadModel::Open`]) is in messages per second whatever `--rate-unit`
//! was.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::identity::Identities;
use super::message::{SizeRange, Template};
use super::profile::RateProfile;
use crate::net::driver::IoConfig;
use crate::net::runtime::Cpus;
use crate::smtp::client::ClientConfig;
use crate::smtp::Phase;

/// `--proxy`: the PROXY protocol version the blaster sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyVersion {
    V1,
    V2,
}

/// `--rate-unit`: what `--rate` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RateUnit {
    Messages,
    Sessions,
}

/// What the run produces once it ends (outputs and checks).
#[derive(Clone, Debug, Default)]
pub struct OutputConfig {
    pub json: Option<PathBuf>,
    pub hgrm: Option<PathBuf>,
    pub hgrm_phase: Option<Phase>,
    pub hlog: Option<PathBuf>,
    /// `--csv`: the timeline, one row per second.
    pub csv: Option<PathBuf>,
    /// `--abort-on`: checked once a second on the totals so far; the first
    /// that holds stops the run (exit 99).
    pub abort_on: Vec<crate::stats::Assertion>,
    /// `--junit`: the checks as JUnit XML.
    pub junit: Option<PathBuf>,
    /// `--metrics-listen`: serve live metrics here during the run.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub asserts: Vec<crate::stats::Assertion>,
    pub baseline: Option<PathBuf>,
    /// Allowed regression in percent (10.0 = 10%).
    pub max_regression_pct: f64,
    pub allow_invalid: bool,
    /// `--max-failed` (a share, 0..=1; `None`: the default 1%).
    pub max_failed: Option<f64>,
    /// `--max-outage` in seconds (`None`: the default 3 s; 0: off).
    pub max_outage_secs: Option<u64>,
    /// No live line (the summary is still printed).
    pub quiet: bool,
    /// Nothing on stderr about the run's verdict either (a sweep's steps:
    /// the sweep says what each step found).
    pub silent: bool,
}

/// The load model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LoadModel {
    /// `connections` sessions in flight, each starting the next when it ends.
    Closed,
    /// Messages are due on a fixed schedule of `messages_per_sec` (this
    /// instance's share; with `--stages`, the mean over the measured
    /// window, the schedule following `BlastConfig::stages`), each sent at its intended time on a free
    /// connection (at most `connections` open; sessions carry up to `-k`
    /// messages and idle between them).
    Open { messages_per_sec: f64 },
}

/// The validated configuration of one blaster run (this instance's share).
#[derive(Clone, Debug)]
pub struct BlastConfig {
    /// `--scenario`: weighted profiles, one per session.
    pub scenario: Option<Arc<super::scenario::Scenario>>,
    pub target: SocketAddr,
    /// `blast unix:/path`: connect to this unix-domain socket instead
    /// (`target` is then `0.0.0.0:0`, which nothing dials).
    pub unix: Option<PathBuf>,
    /// Host name as given (for TLS SNI).
    pub target_host: String,
    pub cpus: Cpus,
    /// The I/O backend every thread runs, and its options.
    pub io: IoConfig,
    pub connections: u64,
    pub model: LoadModel,
    /// The rate as given (this instance's share), in `rate_unit`.
    pub rate_per_sec: Option<f64>,
    /// `--stages`: the open loop's rate over time, in messages per second
    /// of the **whole run** (all instances; the schedule splits it as it
    /// splits `--rate`), from the run's start (warmup included). `None`:
    /// the constant `LoadModel::Open` rate.
    pub stages: Option<Arc<RateProfile>>,
    pub rate_unit: RateUnit,
    /// Measured time (after warmup); `None`: no time limit.
    pub duration: Option<Duration>,
    pub warmup: Duration,
    pub max_messages: Option<u64>,
    pub max_sessions: Option<u64>,
    pub messages_per_session: u64,
    pub recipients: u64,
    pub size: SizeRange,
    /// `--size` given as a distribution (`size` then holds its bounds).
    pub size_dist: Option<Arc<super::size::SizeDist>>,
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
    /// `--tls-suites`, `--tls-groups`: what the client offers.
    pub tls_choice: crate::net::tls::TlsChoice,
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
    /// `--trace`: the run id every message's trace header carries.
    pub trace: Option<u64>,
    pub output: OutputConfig,
    /// The configuration echoed into the JSON report.
    pub echo: serde_json::Value,
}

/// Share `total` of `n` parts, part `i` (the first `total % n` get one more).
pub fn share(total: u64, i: u64, n: u64) -> u64 {
    total / n + u64::from(i < total % n)
}

impl BlastConfig {
    /// Points the run at `target` (`bench`: the embedded sink's port, known
    /// once it listens), in the echo too.
    pub fn retarget(&mut self, target: SocketAddr) {
        self.target = target;
        self.echo["target"] = serde_json::Value::String(target.to_string());
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
        .with_trace(self.trace)
        .with_size_dist(self.size_dist.clone())
    }

    /// The open loop's rate over time, all instances together, from the
    /// run's start (`None`: closed loop).
    pub fn profile(&self) -> Option<Arc<RateProfile>> {
        match self.model {
            LoadModel::Closed => None,
            LoadModel::Open { messages_per_sec } => Some(match &self.stages {
                Some(p) => Arc::clone(p),
                None => Arc::new(RateProfile::constant(
                    messages_per_sec * f64::from(self.instance.1.max(1)),
                )),
            }),
        }
    }

    /// This instance's requested messages in `[from, to)` seconds after the
    /// end of the warmup, within the measured window (`None`: closed loop).
    pub fn requested_between(&self, from: f64, to: f64) -> Option<f64> {
        let profile = self.profile()?;
        let w = self.warmup.as_secs_f64();
        let end = self.duration.map_or(f64::INFINITY, |d| d.as_secs_f64());
        let (from, to) = (from.min(end), to.min(end));
        Some(profile.between(w + from, w + to) / f64::from(self.instance.1.max(1)))
    }

    /// Whether any session may speak TLS (a flag, or a scenario profile).
    pub fn uses_tls(&self) -> bool {
        self.implicit_tls || self.starttls || self.scenario.as_ref().is_some_and(|s| s.uses_tls())
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

    #[test]
    fn shares_add_up_to_the_total() {
        for n in 1..7 {
            for total in [0u64, 1, 5, 100, 101] {
                assert_eq!((0..n).map(|i| share(total, i, n)).sum::<u64>(), total);
            }
        }
    }
}
