//! Per-thread recorders, merge and reports.
//!
//! Data flow: each runtime thread owns a [`Recorder`] (no locks, no
//! atomics) and once per second hands an [`IntervalSnapshot`] to the main
//! thread, which absorbs them in an [`IntervalMerger`] (live line,
//! throughput timeline), an [`HlogWriter`] (`.hlog`) and, with
//! `--metrics-listen`, a [`LiveMetrics`]. At the end the merged
//! [`Measurements`] become a [`Report`] (JSON, with every histogram
//! encoded), which feeds [`write_hgrm`], [`write_summary`], [`write_svg`],
//! [`write_html`], [`write_junit`], assertions ([`Assertion`]),
//! [`compare_baseline`] and [`merge_reports`].
//!
//! Typical use by a role:
//!
//! ```text
//! worker thread:  rec.record(Phase::Message, latency_us); rec.count_outcome(outcome);
//!                 every second: tx.send(rec.take_interval(start_offset, 1s))
//!                 at the end:   tx.send(rec.take_interval(..)); return rec.finish() (the totals)
//! main thread:    per tick, merge the N snapshots of that tick (IntervalSnapshot::merge),
//!                 hlog.write_snapshot(&merged), merger.absorb(&merged)
//!                 at the end: let (m, timeline) = merger.into_parts();
//!                 Report::build(ReportInput { measurements: m, timeline, .. })
//!                 report.evaluate_assertions(&asserts); report.write_json(path);
//!                 write_hgrm_file(&report, Phase::Message, path); write_summary(&report, &mut stderr)
//! ```
//!
//! Layers, each importing only from the layers below it (no cycles):
//!
//! ```text
//! renderers   summary (text)  hgrm  hlog  svg  html  junit  metrics (live)
//!             one output each; charts draws the plots svg and html share
//! checks      assert (--assert)   merge (merge, --baseline)
//! report      report: Report, the JSON document and its loading
//! data        recorder: Counts, histograms, snapshots, merger    units: numbers for people
//! ```
//!
//! Nothing here reads the process's CPU time: the roles measure their CPU
//! and pass it in ([`ReportInput::cpu`]). The only socket is the live
//! metrics endpoint of [`metrics`] (`--metrics-listen`); everything else
//! writes files or text.
//!
//! Invariants: every histogram has the same fixed bounds (1 µs .. 1 hour,
//! 3 significant figures, see [`recorder::new_histogram`]), so histograms
//! from any thread, instance or machine add up exactly; percentiles are
//! always computed from summed histograms, never averaged.

pub mod assert;
pub mod charts;
pub mod e2e;
pub mod csv;
pub mod hgrm;
pub mod hlog;
pub mod html;
pub mod junit;
pub mod merge;
pub mod metrics;
pub mod recorder;
pub mod report;
pub mod summary;
pub mod svg;
pub mod trace;
pub mod units;

pub use assert::{parse as parse_assertion, parse_all as parse_assertions, AssertError, Assertion};
pub use e2e::{account as account_e2e, pair as pair_e2e, E2eError, E2eOptions};
pub use csv::{write_csv, write_csv_file};
pub use hgrm::{hgrm_string, write_hgrm, write_hgrm_file};
pub use hlog::{HlogError, HlogWriter};
pub use html::{html_string, write_html, HtmlError};
pub use junit::{junit_string, write_junit, JunitError};
pub use merge::{
    baseline_checks, check_set, compare_baseline, config_digest, merge_files, merge_reports,
    BaselineCheck, MergeError, Regression, PER_INSTANCE_CONFIG,
};
pub use metrics::{LiveMetrics, MetricsError, MetricsServer};
pub use recorder::{
    new_histogram, Counts, FailureTally, IntervalLatency, IntervalMerger, IntervalSnapshot,
    Measurements, PhaseHistograms, Recorder, ReplyCodes, TimelinePoint,
};
pub use report::{
    load_report, longest_outage, AssertionResult, Bottleneck, CpuUsage, E2e, FailureCount,
    HostInfo, LatencySummary, MergeCheck, OpenLoopReport, Rates, Report, ReportError, ReportInput,
    Role, TraceReport, TraceRun, DEFAULT_MAX_FAILED, DEFAULT_MAX_OUTAGE_SECS, E2E_LISTED,
    TOP_FAILURES,
};
pub use summary::write_summary;
pub use svg::{write_svg, SvgError};
pub use trace::{NumberSet, TraceRecorder};
