//! `smtpstorm sweep TARGET --slo EXPR...`: its own flags, every blast
//! option beside them, and the checks that turn them into a
//! [`SweepConfig`] (see [`crate::blast::sweep`] for the search).
//!
//! Invariants of a built config: `--step` is at least 1 s; the blast part
//! is an open loop at `--start` whose rate and duration each step
//! replaces; the flags that fix a rate, a length or an output of one run
//! (`--rate`, `--stages`, `-d`, `-n`, `--sessions`, `--instance`,
//! `--baseline`, `--hgrm`, `--hlog`, `--junit`, `--metrics-listen`,
//! `--start-at`) are refused with one line; `--assert` speaks of the sweep
//! (`max_rate`, `saturation_rate`), `--slo` of each step.

use std::time::Duration;

use clap::Args;

use super::blast::{config as blast_config, LoadArgs};
use super::parse::{parse_duration, parse_percent, parse_rate};
use crate::blast::sweep::{SweepAssert, SweepConfig};

#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// host:port of the server under test (port 25 if omitted).
    #[arg(value_name = "TARGET")]
    pub target: String,
    /// A condition every passing step meets (repeatable; the --assert language):
    /// `p99(message) < 200ms`, `errors == 0`, `tempfailed <= 1%`.
    #[arg(long = "slo", value_name = "EXPR")]
    pub slos: Vec<String>,
    /// Length of each step (after its --warmup, default a quarter of it, at most 5s).
    #[arg(long, value_name = "D", default_value = "20s", value_parser = parse_duration)]
    pub step: Duration,
    /// The first step's rate (messages per second); doubled while steps pass.
    #[arg(long, value_name = "R", default_value = "100", value_parser = parse_rate)]
    pub start: f64,
    /// Bisect until the highest passing and lowest failing rates are this close.
    #[arg(long, value_name = "PCT", default_value = "5%", value_parser = parse_percent)]
    pub precision: f64,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// Validates `args` into a sweep.
pub fn config(args: &SweepArgs) -> anyhow::Result<SweepConfig> {
    let l = &args.load;
    let refused = [
        ("--rate", l.rate.is_some()),
        ("--stages", l.stages.is_some()),
        ("--duration", l.duration.is_some()),
        ("--messages", l.messages.is_some()),
        ("--sessions", l.sessions.is_some()),
        ("--instance", l.instance.is_some()),
        ("--baseline", l.baseline.is_some()),
        ("--hgrm", l.hgrm.is_some()),
        ("--hlog", l.hlog.is_some()),
        ("--junit", l.junit.is_some()),
        ("--metrics-listen", l.metrics_listen.is_some()),
        ("--start-at", l.start_at.is_some()),
        ("--csv", l.csv.is_some()),
        ("--abort-on", !l.abort_on.is_empty()),
    ];
    if let Some((flag, _)) = refused.iter().find(|(_, given)| *given) {
        anyhow::bail!(
            "{flag} does not apply to sweep: each step's rate and length come from --start, --step and the search"
        );
    }
    if args.step < Duration::from_secs(1) {
        anyhow::bail!("--step must be at least 1s (a step's achieved rate is counted per second)");
    }
    if args.precision <= 0.0 || args.precision.is_nan() {
        anyhow::bail!("--precision must be above 0%");
    }
    let slos =
        crate::stats::parse_assertions(&args.slos).map_err(|e| anyhow::anyhow!("--slo: {e}"))?;
    let asserts = l
        .asserts
        .iter()
        .map(|a| SweepAssert::parse(a))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--assert: {e}"))?;
    let mut load = l.clone();
    load.rate = Some(args.start);
    load.duration = Some(args.step);
    load.asserts = Vec::new();
    load.json = None;
    load.warmup = Some(
        l.warmup
            .unwrap_or_else(|| (args.step / 4).min(Duration::from_secs(5))),
    );
    let mut blast = blast_config(&args.target, &load)?;
    if let Some(m) = blast.echo.as_object_mut() {
        m.insert("command".into(), "sweep".into());
    }
    Ok(SweepConfig {
        blast,
        slos,
        step: args.step,
        start: args.start,
        precision: args.precision,
        asserts,
        json: l.json.clone(),
        quiet: l.quiet,
    })
}
