//! The JSON report of a run (blast or sink), its building from merged
//! [`Measurements`], and its loading back with the histograms decoded.
//!
//! Invariants:
//! - Key names are the contract of `DESIGN.md` and of `schemas/*.json`;
//!   `schema_version` is [`SCHEMA_VERSION`] and changes whenever a key
//!   changes meaning.
//! - Every `latency.<phase>` carries the full histogram (`hist`, base64 of
//!   the V2-deflate serialization), so reports can be merged by adding
//!   histograms; the percentile fields are derived from it and are never
//!   averaged.
//! - A loaded report holds the decoded histograms, so merge, assertions and
//!   baseline comparison see exactly what was recorded.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::recorder::{Counts, Measurements, PhaseHistograms, TimelinePoint};
use super::trace::{NumberSet, TraceRecorder};
use crate::smtp::Phase;

/// Version of the JSON layout.
pub const SCHEMA_VERSION: u32 = 1;
/// Value of the `tool` key.
pub const TOOL: &str = "smtpstorm";

/// Errors of building, writing and loading reports.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a smtpstorm report: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: unsupported schema_version {found} (expected {SCHEMA_VERSION})")]
    SchemaVersion { path: String, found: u32 },
    #[error("{path}: histogram of `{key}` cannot be decoded: {reason}")]
    Histogram {
        path: String,
        key: String,
        reason: String,
    },
    #[error("cannot encode a histogram: {0}")]
    Encode(String),
}

/// Which side wrote the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Blast,
    Sink,
}

/// The machine a report was produced on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub cpu_model: String,
    pub cores: u32,
    pub kernel: String,
    pub hostname: String,
}

impl HostInfo {
    /// Reads `/proc/cpuinfo` and `/proc/sys/kernel/{osrelease,hostname}`
    /// (the same strings `uname` returns). Missing files give empty fields.
    pub fn detect() -> Self {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name" || k.trim() == "Model").then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        Self {
            cpu_model,
            cores,
            kernel: read("/proc/sys/kernel/osrelease"),
            hostname: read("/proc/sys/kernel/hostname"),
        }
    }
}

/// CPU time used by the process and its cost per unit of work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuUsage {
    pub user_secs: f64,
    pub sys_secs: f64,
    pub cpu_us_per_session: f64,
    pub cpu_us_per_message: f64,
}

impl CpuUsage {
    /// CPU time of `user_us` and `sys_us` microseconds (e.g. from
    /// `getrusage`, read by the role), with the per-unit figures left at
    /// zero (see [`CpuUsage::with_work`]).
    pub fn from_us(user_us: u64, sys_us: u64) -> Self {
        Self {
            user_secs: user_us as f64 / 1e6,
            sys_secs: sys_us as f64 / 1e6,
            ..Default::default()
        }
    }

    /// CPU used since `start` (an earlier reading of the same clock).
    pub fn since(&self, start: &CpuUsage) -> Self {
        Self {
            user_secs: (self.user_secs - start.user_secs).max(0.0),
            sys_secs: (self.sys_secs - start.sys_secs).max(0.0),
            ..Default::default()
        }
    }

    /// Fills `cpu_us_per_session` and `cpu_us_per_message` (0 when the
    /// denominator is 0).
    pub fn with_work(mut self, sessions: u64, messages: u64) -> Self {
        let total_us = (self.user_secs + self.sys_secs) * 1e6;
        self.cpu_us_per_session = if sessions > 0 {
            total_us / sessions as f64
        } else {
            0.0
        };
        self.cpu_us_per_message = if messages > 0 {
            total_us / messages as f64
        } else {
            0.0
        };
        self
    }
}

/// Per-second rates over the run duration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    pub sessions_per_sec: f64,
    /// Accepted messages per second.
    pub messages_per_sec: f64,
    pub bytes_per_sec: f64,
}

impl Rates {
    pub fn compute(c: &Counts, duration_secs: f64) -> Self {
        if duration_secs <= 0.0 {
            return Self::default();
        }
        Self {
            sessions_per_sec: c.sessions as f64 / duration_secs,
            messages_per_sec: c.messages_accepted as f64 / duration_secs,
            bytes_per_sec: c.bytes as f64 / duration_secs,
        }
    }
}

/// Who set the pace of an open-loop run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bottleneck {
    /// Every message went out on time on a free connection.
    #[default]
    None,
    /// Messages waited for a free connection: the target could not absorb
    /// the rate (a valid answer: the corrected latencies include the wait).
    Target,
    /// The blaster itself fell behind its schedule (the run is invalid).
    Blaster,
}

/// What an open-loop run did with its schedule (measured window).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OpenLoopReport {
    /// The rate asked for (`--rate`, this instance's share), messages/s.
    pub requested_per_sec: f64,
    /// Messages sent (given to a connection) per second of the window.
    pub achieved_per_sec: f64,
    /// Messages intended inside the window.
    pub messages_due: u64,
    /// Of those, messages given to a connection.
    pub messages_sent: u64,
    /// Due but never sent: still waiting for a connection when the run ended.
    pub messages_unsent: u64,
    /// Messages that found no free connection and waited for one.
    pub messages_waited: u64,
    /// Most messages waiting for a connection at once (the largest of any
    /// thread).
    pub max_backlog: u64,
    /// Share of the window the busiest blaster thread was not waiting for
    /// events, in percent (above 90: saturated, the run is invalid).
    #[serde(default)]
    pub blaster_busy_pct: f64,
    pub bottleneck: Bottleneck,
}

/// The longest stretch of consecutive timeline seconds in which something
/// failed and nothing was accepted: `(first second, length, failures)`.
pub fn longest_outage(timeline: &[TimelinePoint]) -> Option<(u64, u64, u64)> {
    let mut best: Option<(u64, u64, u64)> = None;
    let mut cur: Option<(u64, u64, u64)> = None;
    for p in timeline {
        let down = p.messages == 0 && p.failed > 0;
        cur = match cur {
            Some((from, len, n)) if down && p.t == from + len => {
                Some((from, len + 1, n + p.failed))
            }
            _ if down => Some((p.t, 1, p.failed)),
            _ => None,
        };
        if let Some(c) = cur {
            if best.is_none_or(|b| c.1 > b.1) {
                best = Some(c);
            }
        }
    }
    best
}

impl OpenLoopReport {
    /// Adds another instance's figures (rates recomputed over `duration_secs`).
    pub fn merge(&mut self, o: &OpenLoopReport, duration_secs: f64) {
        self.requested_per_sec += o.requested_per_sec;
        self.messages_due += o.messages_due;
        self.messages_sent += o.messages_sent;
        self.messages_unsent += o.messages_unsent;
        self.messages_waited += o.messages_waited;
        self.max_backlog = self.max_backlog.max(o.max_backlog);
        self.blaster_busy_pct = self.blaster_busy_pct.max(o.blaster_busy_pct);
        self.bottleneck = self.bottleneck.max_by_severity(o.bottleneck);
        self.achieved_per_sec = if duration_secs > 0.0 {
            self.messages_sent as f64 / duration_secs
        } else {
            0.0
        };
    }
}

impl Bottleneck {
    fn max_by_severity(self, o: Bottleneck) -> Bottleneck {
        match (self, o) {
            (Bottleneck::Blaster, _) | (_, Bottleneck::Blaster) => Bottleneck::Blaster,
            (Bottleneck::Target, _) | (_, Bottleneck::Target) => Bottleneck::Target,
            _ => Bottleneck::None,
        }
    }
}

/// What `merge` found about the set of reports it was given (JSON `merge`,
/// merged reports only): a distributed run's instances `0..N-1` each
/// exactly once, of one run configuration, started together.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MergeCheck {
    /// Reports given.
    pub inputs: usize,
    /// Reports added (a doubled instance is added once).
    pub merged: usize,
    /// N of `--instance I/N`, as most inputs say; null when no input is
    /// an instance of a distributed run (N = 1 or no `config.instance`:
    /// independent runs, not checked as a set).
    pub instances: Option<u32>,
    /// Instances of `0..N-1` that no input is.
    pub missing: Vec<u32>,
    /// Instances given more than once (only the first was added).
    pub duplicates: Vec<u32>,
    /// Latest start minus earliest start of the inputs, seconds.
    pub start_skew_secs: f64,
    /// The bound on it (`--max-skew`), seconds.
    pub max_skew_secs: f64,
    /// One line per problem: each instance missing or doubled, another N,
    /// another run configuration, an input that is no instance, the skew.
    pub problems: Vec<String>,
    /// Problems were found and the reports merged anyway (`--allow-partial`).
    pub partial: bool,
}

/// Summary of one latency histogram (microseconds), with the histogram.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min_us: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    /// Base64 of the V2-deflate serialization of the histogram.
    pub hist: String,
    /// The decoded histogram (filled when built or loaded; not in JSON).
    #[serde(skip)]
    pub histogram: Option<Histogram<u64>>,
}

impl LatencySummary {
    /// Summarises `h` and encodes it.
    pub fn from_histogram(h: &Histogram<u64>) -> Result<Self, ReportError> {
        Ok(Self {
            count: h.len(),
            min_us: h.min(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
            hist: encode_histogram(h)?,
            histogram: Some(h.clone()),
        })
    }

    /// Value at percentile `pct` (0..=100): exact from the histogram when
    /// present, else the nearest stored field for the standard ones.
    pub fn value_at_percentile(&self, pct: f64) -> Option<u64> {
        if let Some(h) = &self.histogram {
            return Some(h.value_at_percentile(pct));
        }
        let fields = [
            (50.0, self.p50_us),
            (90.0, self.p90_us),
            (99.0, self.p99_us),
            (99.9, self.p999_us),
            (100.0, self.max_us),
        ];
        fields
            .iter()
            .find(|(p, _)| (p - pct).abs() < 1e-9)
            .map(|(_, v)| *v)
    }
}

/// Base64 of the V2-deflate serialization of `h`.
pub fn encode_histogram(h: &Histogram<u64>) -> Result<String, ReportError> {
    let mut buf = Vec::new();
    V2DeflateSerializer::new()
        .serialize(h, &mut buf)
        .map_err(|e| ReportError::Encode(format!("{e:?}")))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(buf))
}

/// Decodes what [`encode_histogram`] produced (V2 or V2-deflate).
pub fn decode_histogram(b64: &str) -> Result<Histogram<u64>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("bad base64: {e}"))?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| format!("{e:?}"))
}

/// The outcome of one assertion (JSON `assertions[]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AssertionResult {
    pub expr: String,
    pub ok: bool,
    /// The measured value (see the module doc for units); null when the
    /// metric has no data.
    pub value: Option<f64>,
}

/// One report, blast or sink. Field names are the JSON keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub tool: String,
    pub version: String,
    pub role: Role,
    pub host: HostInfo,
    /// The configuration of the run, echoed as given by the caller.
    pub config: serde_json::Value,
    /// Start of the run, seconds since the Unix epoch.
    pub started_at_unix: f64,
    pub duration_secs: f64,
    pub counts: Counts,
    pub rates: Rates,
    /// Per phase (`Phase::as_str`), phases with at least one value only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub latency: BTreeMap<String, LatencySummary>,
    /// Uncorrected latencies (open loop: `message`, `session`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub latency_uncorrected: BTreeMap<String, LatencySummary>,
    /// Open loop: how late the blaster gave messages that found a free
    /// connection to it (its own lag, not the target's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_lag: Option<LatencySummary>,
    /// Open loop: the schedule's outcome (set by the blaster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_loop: Option<OpenLoopReport>,
    /// Merged reports: what the check of the input set found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeCheck>,
    /// `{"mail": {"250": n, ...}, ...}`.
    #[serde(default)]
    pub reply_codes: BTreeMap<String, BTreeMap<String, u64>>,
    #[serde(default)]
    pub timeline: Vec<TimelinePoint>,
    pub valid: bool,
    #[serde(default)]
    pub invalid_reasons: Vec<String>,
    /// Why the run failed (exit 4), as [`Report::judge_failures`] found:
    /// empty when it did not. Absent from passing runs and older reports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_reasons: Vec<String>,
    /// `--abort-on`: the condition that held and stopped the run early
    /// (exit 99), with when and what was measured. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted: Option<String>,
    /// The most frequent reasons messages and connections failed, most
    /// frequent first (at most [`TOP_FAILURES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<FailureCount>,
    #[serde(default)]
    pub assertions: Vec<AssertionResult>,
    pub cpu: CpuUsage,
    /// `--trace`: the blaster's accepted set, or the sink's deliveries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceReport>,
    /// End-to-end accounting (`bench --through`, `merge` of a blaster's
    /// and a sink's report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e2e: Option<E2e>,
    /// `--io xdp`: what the backend counted (frames each way; with
    /// `--xdp-faults`, the faults and the retransmissions). Set by the
    /// role after the run; absent for the other backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xdp: Option<serde_json::Value>,
    /// `--scenario`: each profile's counts and latency, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub profiles: BTreeMap<String, ProfileReport>,
}

/// `--scenario`: one profile's share of a run (the totals hold every
/// profile's).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProfileReport {
    pub counts: Counts,
    /// Per phase, as the report's `latency`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub latency: BTreeMap<String, LatencySummary>,
}

impl ProfileReport {
    /// The report of one profile's merged measurements.
    pub fn of(m: &Measurements) -> Result<Self, ReportError> {
        Ok(ProfileReport {
            counts: m.counts,
            latency: summarize(&m.latency)?,
        })
    }
}

/// `trace` of a report: a blaster's (`run_id`, `accepted`,
/// `accepted_set`) or a sink's (`runs`, `untraced`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TraceReport {
    /// The run id every message's trace header carried (16 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Traced messages the target accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<u64>,
    /// Their numbers (`{n}`): base64 of a Roaring bitmap (64-bit portable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_set: Option<NumberSet>,
    /// Sink: the deliveries of each run id seen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<TraceRun>,
    /// Sink: accepted messages without a well-formed trace header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub untraced: Option<u64>,
}

/// A sink's deliveries of one run id.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TraceRun {
    pub run_id: String,
    /// Deliveries, duplicates included.
    pub messages: u64,
    pub recipients: u64,
    /// Deliveries of a number already delivered.
    pub duplicates: u64,
    /// Distinct numbers delivered.
    pub delivered: u64,
    pub delivered_set: NumberSet,
    /// Send time (from the header) to the last byte read by the sink.
    pub delivery: LatencySummary,
    /// Deliveries that seemed to arrive before they were sent (two hosts'
    /// clocks disagree), recorded as 0.
    pub negative: u64,
    /// `[unix second, first deliveries in it]`, ascending.
    pub per_second: Vec<[u64; 2]>,
}

impl TraceReport {
    /// The sink's `trace` from its threads' merged records.
    pub fn of_sink(rec: &TraceRecorder) -> Result<Self, ReportError> {
        let mut rec = rec.clone();
        rec.settle();
        let runs = rec
            .runs
            .iter()
            .map(|r| {
                Ok(TraceRun {
                    run_id: crate::trace::run_id_hex(r.run),
                    messages: r.messages,
                    recipients: r.recipients,
                    duplicates: r.duplicates,
                    delivered: r.delivered.len(),
                    delivered_set: r.delivered.clone(),
                    delivery: LatencySummary::from_histogram(&r.delivery)?,
                    negative: r.negative,
                    per_second: r.per_second.iter().map(|(s, n)| [*s, *n]).collect(),
                })
            })
            .collect::<Result<Vec<_>, ReportError>>()?;
        Ok(TraceReport {
            runs,
            untraced: Some(rec.untraced),
            ..Default::default()
        })
    }

    /// The blaster's `trace`: run `run`, the numbers accepted.
    pub fn of_blast(run: u64, accepted: NumberSet) -> Self {
        TraceReport {
            run_id: Some(crate::trace::run_id_hex(run)),
            accepted: Some(accepted.len()),
            accepted_set: Some(accepted),
            ..Default::default()
        }
    }
}

/// End-to-end accounting of one run id: what the target accepted (the
/// blaster's set) against what reached the sink (the sink's set).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct E2e {
    pub run_id: String,
    /// Traced messages the server under test accepted.
    pub accepted: u64,
    /// Distinct numbers of this run delivered to the sink (late ones included).
    pub delivered: u64,
    /// Accepted and never delivered.
    pub lost: u64,
    /// Delivered after the drain ended.
    pub late: u64,
    /// Deliveries of a number already delivered.
    pub duplicates: u64,
    /// Delivered but not seen as accepted (a reply lost after the server
    /// had queued the message).
    pub unexpected: u64,
    /// Messages the sink accepted without this run's trace (none, a
    /// malformed one, or another run's).
    pub untraced: u64,
    /// The first lost numbers (at most [`E2E_LISTED`]), ascending.
    #[serde(default)]
    pub lost_numbers: Vec<u64>,
    /// The first unexpected numbers (at most [`E2E_LISTED`]), ascending.
    #[serde(default)]
    pub unexpected_numbers: Vec<u64>,
    /// The wait for deliveries after the load (`--drain`), seconds.
    pub drain_secs: f64,
    /// Both ends read one clock (one process).
    pub one_clock: bool,
    /// The clock offset (sink minus blaster, seconds) subtracted from
    /// every delivery latency (`merge --clock-offset`); 0 with one clock.
    pub clock_offset_secs: f64,
    /// What the delivery latency includes, in words.
    pub clock_note: String,
}

/// Numbers an [`E2e`] lists at most.
pub const E2E_LISTED: usize = 100;

/// Reasons a report lists in `failures`.
pub const TOP_FAILURES: usize = 5;

/// One reason messages or connections failed, and how often.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureCount {
    /// The first line of the refusing reply, prefixed by the command it
    /// answered (`rcpt: 451 4.7.1 …`), or the error that ended a session
    /// or connection (`connect: Connection refused (os error 111)`).
    pub reason: String,
    pub count: u64,
}

/// `--max-failed` when none is given: a run in which more than 1% of the
/// tries (messages attempted, and connections that never got a session)
/// were not accepted has failed.
pub const DEFAULT_MAX_FAILED: f64 = 0.01;
/// `--max-outage` when none is given, in seconds.
pub const DEFAULT_MAX_OUTAGE_SECS: u64 = 3;

/// What the roles pass to [`Report::build`].
#[derive(Clone, Debug)]
pub struct ReportInput {
    pub role: Role,
    /// The configuration to echo (any JSON).
    pub config: serde_json::Value,
    pub started_at_unix: f64,
    pub duration_secs: f64,
    /// Merged measurements of every thread.
    pub measurements: Measurements,
    pub timeline: Vec<TimelinePoint>,
    /// Why the run is not valid (empty: valid). E.g. the blaster could not
    /// keep its schedule.
    pub invalid_reasons: Vec<String>,
    /// CPU used by the run, measured by the role (`stats` reads no clock of
    /// the process); the per-unit figures are filled by `build`.
    pub cpu: CpuUsage,
    /// Host description; `None` detects the current host.
    pub host: Option<HostInfo>,
}

impl Report {
    /// Builds the report of a run. Assertions are evaluated separately
    /// ([`Report::evaluate_assertions`]). A sink report gets no latency.
    pub fn build(input: ReportInput) -> Result<Self, ReportError> {
        let m = &input.measurements;
        let counts = m.counts;
        let (latency, latency_uncorrected, schedule_lag) = if input.role == Role::Blast {
            (
                summarize(&m.latency)?,
                summarize(&m.latency_uncorrected)?,
                match m.schedule_lag.as_ref().filter(|h| !h.is_empty()) {
                    Some(h) => Some(LatencySummary::from_histogram(h)?),
                    None => None,
                },
            )
        } else {
            (BTreeMap::new(), BTreeMap::new(), None)
        };
        let mut timeline = input.timeline;
        if input.role == Role::Sink {
            timeline.iter_mut().for_each(|p| p.latency.clear());
        }
        let mut reply_codes: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (cmd, code, n) in m.reply_codes.iter() {
            *reply_codes
                .entry(cmd.as_str().to_string())
                .or_default()
                .entry(code)
                .or_default() += n;
        }
        Ok(Self {
            schema_version: SCHEMA_VERSION,
            tool: TOOL.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            role: input.role,
            host: input.host.unwrap_or_else(HostInfo::detect),
            config: input.config,
            started_at_unix: input.started_at_unix,
            duration_secs: input.duration_secs,
            rates: Rates::compute(&counts, input.duration_secs),
            cpu: input
                .cpu
                .with_work(counts.sessions, counts.messages_accepted),
            counts,
            latency,
            latency_uncorrected,
            schedule_lag,
            open_loop: None,
            merge: None,
            reply_codes,
            timeline,
            valid: input.invalid_reasons.is_empty(),
            invalid_reasons: input.invalid_reasons,
            failed_reasons: Vec::new(),
            aborted: None,
            failures: m
                .failures
                .top(TOP_FAILURES)
                .into_iter()
                .map(|(reason, count)| FailureCount { reason, count })
                .collect(),
            assertions: Vec::new(),
            trace: None,
            e2e: None,
            xdp: None,
            profiles: BTreeMap::new(),
        })
    }

    /// Judges whether a blast run failed and records why in
    /// `failed_reasons` (empty: it did not). A run fails when
    /// - the target accepted no message at all;
    /// - more than `max_failed` (a share, 0..=1) of its tries failed: a try
    ///   is a message attempted or a connection that never got a session,
    ///   and every try not accepted failed;
    /// - for `max_outage_secs` seconds or more in a row (0: never) every
    ///   second of the timeline had failures and nothing accepted (the
    ///   target went down, or refused everything).
    ///
    /// A sink report is never judged.
    pub fn judge_failures(&mut self, max_failed: f64, max_outage_secs: u64) {
        self.failed_reasons.clear();
        if self.role != Role::Blast {
            return;
        }
        let c = &self.counts;
        let tries = c
            .messages_attempted
            .saturating_add(c.connections_without_session);
        let failed = tries.saturating_sub(c.messages_accepted);
        let top = self
            .failures
            .first()
            .map(|f| format!("; most frequent: {} ({}×)", f.reason, f.count))
            .unwrap_or_default();
        if c.messages_accepted == 0 {
            self.failed_reasons.push(format!(
                "the target accepted none of {} messages attempted ({} connections without a session){top}",
                c.messages_attempted, c.connections_without_session
            ));
            return;
        }
        let share = failed as f64 / tries.max(1) as f64;
        if share > max_failed {
            self.failed_reasons.push(format!(
                "{failed} of {tries} tries failed ({:.2}%, above --max-failed {}%): {} tempfailed, {} rejected, {} connection errors, {} timeouts, {} protocol errors{top}",
                share * 100.0,
                max_failed * 100.0,
                c.messages_tempfailed,
                c.messages_rejected,
                c.connection_errors,
                c.timeouts,
                c.protocol_errors
            ));
        }
        if max_outage_secs > 0 {
            if let Some((from, secs, n)) = longest_outage(&self.timeline) {
                if secs >= max_outage_secs {
                    self.failed_reasons.push(format!(
                        "the target failed everything for {secs}s in a row (from second {from}: nothing accepted, {n} failures; --max-outage {max_outage_secs}s){top}"
                    ));
                }
            }
        }
    }

    /// True if any evaluated assertion failed (exit code 99).
    pub fn assertions_failed(&self) -> bool {
        self.assertions.iter().any(|r| !r.ok)
    }

    /// The decoded latency histogram of `phase`, if any.
    pub fn histogram(&self, phase: Phase) -> Option<&Histogram<u64>> {
        self.latency.get(phase.as_str())?.histogram.as_ref()
    }

    /// The latency histograms as a [`PhaseHistograms`] (for merging).
    pub fn phase_histograms(&self, uncorrected: bool) -> PhaseHistograms {
        let map = if uncorrected {
            &self.latency_uncorrected
        } else {
            &self.latency
        };
        let mut out = PhaseHistograms::default();
        for phase in Phase::ALL {
            if let Some(h) = map.get(phase.as_str()).and_then(|s| s.histogram.as_ref()) {
                out.add(phase, h);
            }
        }
        out
    }

    /// Pretty JSON text of the report.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serializes")
    }

    /// Writes the report as pretty JSON to `path` (`-` is stdout).
    pub fn write_json(&self, path: &Path) -> Result<(), ReportError> {
        let text = self.to_json() + "\n";
        let werr = |source| ReportError::Write {
            path: path.display().to_string(),
            source,
        };
        if path == Path::new("-") {
            std::io::stdout()
                .lock()
                .write_all(text.as_bytes())
                .map_err(werr)
        } else {
            std::fs::write(path, text).map_err(werr)
        }
    }

    /// Parses a report from JSON text and decodes its histograms; `origin`
    /// names the source in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, ReportError> {
        let path = origin.to_string();
        let probe: serde_json::Value =
            serde_json::from_str(text).map_err(|source| ReportError::Parse {
                path: path.clone(),
                source,
            })?;
        let found = probe
            .get("schema_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        if found != u64::from(SCHEMA_VERSION) {
            return Err(ReportError::SchemaVersion {
                path,
                found: found.min(u32::MAX as u64) as u32,
            });
        }
        let mut r: Report = serde_json::from_value(probe).map_err(|source| ReportError::Parse {
            path: path.clone(),
            source,
        })?;
        let decode = |key: String, s: &mut LatencySummary| -> Result<(), ReportError> {
            let h = decode_histogram(&s.hist).map_err(|reason| ReportError::Histogram {
                path: path.clone(),
                key,
                reason,
            })?;
            s.histogram = Some(h);
            Ok(())
        };
        for (k, s) in r.latency.iter_mut() {
            decode(format!("latency.{k}"), s)?;
        }
        for (k, s) in r.latency_uncorrected.iter_mut() {
            decode(format!("latency_uncorrected.{k}"), s)?;
        }
        if let Some(s) = r.schedule_lag.as_mut() {
            decode("schedule_lag".to_string(), s)?;
        }
        if let Some(t) = r.trace.as_mut() {
            for run in t.runs.iter_mut() {
                decode(
                    format!("trace.runs[{}].delivery", run.run_id),
                    &mut run.delivery,
                )?;
            }
        }
        Ok(r)
    }
}

/// Loads a report written by [`Report::write_json`], histograms decoded.
pub fn load_report(path: &Path) -> Result<Report, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Report::from_json(&text, &path.display().to_string())
}

fn summarize(p: &PhaseHistograms) -> Result<BTreeMap<String, LatencySummary>, ReportError> {
    p.iter()
        .map(|(phase, h)| {
            Ok((
                phase.as_str().to_string(),
                LatencySummary::from_histogram(h)?,
            ))
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::smtp::{CommandKind, Outcome};
    use crate::stats::recorder::Recorder;

    /// A blast report with known data: message latencies 1..=1000 ms
    /// (in µs), 1000 accepted messages over 10 s.
    pub(crate) fn sample_blast_report() -> Report {
        let mut r = Recorder::new();
        for i in 1..=1000u64 {
            r.record(Phase::Message, i * 1000);
            r.record_uncorrected(Phase::Message, i * 900);
            r.record(Phase::Mail, 150 + i % 10);
            r.record_schedule_lag(i);
            r.count_outcome(Outcome::Accepted);
            r.count_reply(CommandKind::Mail, 250);
            r.count_recipients(1);
            r.count_bytes(1000);
        }
        for _ in 0..100 {
            r.count_session(true);
            r.record(Phase::Session, 50_000);
        }
        r.count_outcome(Outcome::TempFailed);
        r.count_reply(CommandKind::Rcpt, 451);
        let m = r.finish();
        Report::build(ReportInput {
            role: Role::Blast,
            config: serde_json::json!({"target": "127.0.0.1:2525", "rate": 100}),
            started_at_unix: 1_700_000_000.0,
            duration_secs: 10.0,
            measurements: m,
            timeline: (0..10)
                .map(|t| TimelinePoint {
                    t,
                    messages: 100,
                    sessions: 10,
                    errors: 0,
                    ..Default::default()
                })
                .collect(),
            invalid_reasons: vec![],
            cpu: CpuUsage {
                user_secs: 1.0,
                sys_secs: 0.5,
                ..Default::default()
            },
            host: None,
        })
        .unwrap()
    }

    #[test]
    fn blast_report_has_contract_keys_and_known_percentiles() {
        let r = sample_blast_report();
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["tool"], "smtpstorm");
        assert_eq!(v["role"], "blast");
        assert_eq!(v["counts"]["messages_attempted"], 1001);
        assert_eq!(v["counts"]["messages_tempfailed"], 1);
        assert_eq!(v["rates"]["messages_per_sec"], 100.0);
        let p99 = v["latency"]["message"]["p99_us"].as_u64().unwrap();
        assert!((989_000..=991_000).contains(&p99), "p99 {p99}");
        assert_eq!(v["latency"]["message"]["count"], 1000);
        assert!(
            v["latency"].get("ehlo").is_none(),
            "phases without data are left out"
        );
        assert_eq!(v["latency_uncorrected"]["message"]["count"], 1000);
        assert_eq!(v["schedule_lag"]["count"], 1000);
        assert_eq!(v["reply_codes"]["mail"]["250"], 1000);
        assert_eq!(v["reply_codes"]["rcpt"]["451"], 1);
        assert_eq!(v["cpu"]["cpu_us_per_message"], 1500.0);
        assert_eq!(v["valid"], true);
        assert!(v["host"]["cores"].as_u64().unwrap() >= 1);
    }

    #[test]
    fn json_round_trip_gives_back_the_same_histograms() {
        let r = sample_blast_report();
        let back = Report::from_json(&r.to_json(), "mem").unwrap();
        for phase in [Phase::Message, Phase::Mail, Phase::Session] {
            assert_eq!(back.histogram(phase).unwrap(), r.histogram(phase).unwrap());
        }
        assert_eq!(back.counts, r.counts);
        assert_eq!(
            back.schedule_lag.unwrap().histogram.unwrap(),
            r.schedule_lag.unwrap().histogram.unwrap()
        );
    }

    #[test]
    fn load_report_reads_a_written_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        let r = sample_blast_report();
        r.write_json(&path).unwrap();
        let back = load_report(&path).unwrap();
        assert_eq!(back.histogram(Phase::Message).unwrap().len(), 1000);
    }

    #[test]
    fn loading_rejects_other_schema_versions_and_bad_histograms() {
        let r = sample_blast_report();
        let mut v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        v["schema_version"] = 2.into();
        let e = Report::from_json(&v.to_string(), "x.json").unwrap_err();
        assert!(
            e.to_string().contains("unsupported schema_version 2"),
            "{e}"
        );
        v["schema_version"] = 1.into();
        v["latency"]["message"]["hist"] = "not base64!".into();
        let e = Report::from_json(&v.to_string(), "x.json").unwrap_err();
        assert!(e.to_string().contains("latency.message"), "{e}");
    }

    #[test]
    fn sink_report_has_no_latency_and_attempted_is_the_sum() {
        let mut rec = Recorder::new();
        rec.count_outcome(Outcome::Accepted);
        rec.count_outcome(Outcome::Rejected);
        rec.count_session_error(Outcome::ConnectionError);
        rec.record(Phase::Message, 10);
        let r = Report::build(ReportInput {
            role: Role::Sink,
            config: serde_json::json!({}),
            started_at_unix: 0.0,
            duration_secs: 1.0,
            measurements: rec.finish(),
            timeline: vec![],
            invalid_reasons: vec![],
            cpu: CpuUsage::default(),
            host: Some(HostInfo::default()),
        })
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["role"], "sink");
        assert!(v.get("latency").is_none());
        assert_eq!(v["counts"]["messages_attempted"], 2);
        assert_eq!(v["counts"]["connection_errors"], 1);
    }

    #[test]
    fn cpu_figures_per_unit_of_work() {
        let w = CpuUsage::from_us(1_000_000, 1_000_000).with_work(4, 0);
        assert_eq!((w.user_secs, w.sys_secs), (1.0, 1.0));
        assert_eq!(w.cpu_us_per_session, 500_000.0);
        assert_eq!(w.cpu_us_per_message, 0.0);
        let d = CpuUsage::from_us(3_000_000, 500_000).since(&CpuUsage::from_us(1_000_000, 0));
        assert_eq!((d.user_secs, d.sys_secs), (2.0, 0.5));
    }
}
