//! `smtpstorm merge` and `smtpstorm report`: their flags, and the
//! validation of `merge`'s checks into an [`OutputConfig`].

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::parse::parse_duration;
use crate::blast::OutputConfig;
use crate::stats;

#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// Blast JSON reports to add together; with a sink report (`sink --trace`) among
    /// them, the end-to-end accounting of the blaster's run id (`blast --trace`).
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
    /// End to end across two hosts: the sink's clock minus the blaster's, in seconds
    /// (measured by the user, e.g. with chrony or ntpdate -q); subtracted from every
    /// delivery latency. Without it the latency includes the offset.
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    pub clock_offset: Option<f64>,
    /// End to end: deliveries first seen more than D after the blaster's end count as late.
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub drain: Option<Duration>,
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
    #[arg(long = "assert", value_name = "EXPR")]
    pub asserts: Vec<String>,
    /// Write every --assert check (and the run's validity) as JUnit XML here.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    #[arg(long)]
    pub allow_invalid: bool,
    /// Merge even if instances are missing or doubled, of another N or
    /// configuration, or started too far apart (exit 2 otherwise); the
    /// report records what was wrong.
    #[arg(long)]
    pub allow_partial: bool,
    /// Largest difference allowed between the instances' start times.
    #[arg(long, value_name = "D", default_value = "2s", value_parser = parse_duration)]
    pub max_skew: Duration,
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
    /// Write the end-to-end figures (bench --through, merge with a sink report) as
    /// Prometheus text here, for node_exporter's textfile collector.
    #[arg(long, value_name = "OUT")]
    pub prometheus: Option<PathBuf>,
}

/// The outputs and checks of `merge` (its `--assert`s parsed here).
pub fn merge_output(args: &MergeArgs) -> anyhow::Result<OutputConfig> {
    let asserts = stats::parse_assertions(&args.asserts)?;
    Ok(OutputConfig {
        json: args.json.clone(),
        junit: args.junit.clone(),
        asserts,
        allow_invalid: args.allow_invalid,
        ..OutputConfig::default()
    })
}

/// How `merge` judges its inputs as one run (`--max-skew`, `--allow-partial`),
/// and pairs a blaster's with a sink's (`--clock-offset`, `--drain`).
pub fn merge_rules(args: &MergeArgs) -> crate::offline::SetRules {
    crate::offline::SetRules {
        max_skew_secs: args.max_skew.as_secs_f64(),
        allow_partial: args.allow_partial,
        clock_offset_secs: args.clock_offset.unwrap_or(0.0),
        drain_secs: args.drain.map(|d| d.as_secs_f64()),
    }
}
