//! `smtpstorm sweep TARGET --slo EXPR...`: the highest open-loop rate at
//! which every SLO holds, found by running steps of one constant rate each.
//!
//! Each step is one whole open-loop run ([`super::execute`]) of `--warmup`
//! then `--step` at a rate: new connections, its own report. The rate
//! starts at `--start`, doubles while steps pass, halves while the first
//! ones fail, then bisects between the highest pass and the lowest failure
//! until they are within `--precision` of each other. A step passes when
//! every SLO holds and the target absorbed the rate (it accepted at least
//! [`ABSORBED`] of the requested rate within the step). A step in which the
//! blaster itself fell behind (the run is invalid) stops the sweep: its
//! figures are the blaster's limit, never reported as the target's.
//!
//! Output: one line per step on stderr as it ends, then a text table on
//! stdout, `--json` ([`SweepReport`], schema in `schemas/sweep.schema.json`)
//! and `--assert` on `max_rate` / `saturation_rate` (exit 99).
//!
//! Invariants: at most [`MAX_STEPS`] steps; `max_rate` is the requested
//! rate of a step that passed (never interpolated); every step is in
//! `steps[]` in the order it ran.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::config::{BlastConfig, LoadModel, RateUnit};
use crate::stats::units::{format_rate, format_us};
use crate::stats::{Assertion, Bottleneck, Report};

/// A step whose target accepted less than this share of the requested rate
/// did not absorb it (the target saturated).
pub const ABSORBED: f64 = 0.95;
/// The most steps one sweep runs.
pub const MAX_STEPS: usize = 40;

/// `--assert` of a sweep: `max_rate >= 5000`, `saturation_rate > 1k`.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepAssert {
    pub expr: String,
    /// `max_rate` or `saturation_rate`.
    pub metric: &'static str,
    pub op: &'static str,
    pub threshold: f64,
}

impl SweepAssert {
    /// Parses `METRIC OP RATE`. Errors name the expected form.
    pub fn parse(expr: &str) -> Result<SweepAssert, String> {
        let err = |why: &str| {
            format!(
                "invalid sweep assertion `{expr}`: {why} (expected e.g. `max_rate >= 5000` or `saturation_rate > 2k`)"
            )
        };
        let ops = ["<=", ">=", "==", "!=", "<", ">"];
        let (at, op) = ops
            .iter()
            .filter_map(|op| expr.find(op).map(|i| (i, *op)))
            .min_by_key(|(i, op)| (*i, std::cmp::Reverse(op.len())))
            .ok_or_else(|| err("no comparison"))?;
        let metric = match expr[..at].trim() {
            "max_rate" => "max_rate",
            "saturation_rate" => "saturation_rate",
            m => return Err(err(&format!("unknown metric `{m}`"))),
        };
        let t = expr[at + op.len()..].trim();
        let threshold = if t.parse::<f64>() == Ok(0.0) {
            0.0
        } else {
            crate::units::parse_rate(t).map_err(|e| err(&e))?
        };
        Ok(SweepAssert {
            expr: expr.trim().to_string(),
            metric,
            op,
            threshold,
        })
    }

    /// Whether it holds for `value` (a missing value never holds).
    pub fn holds(&self, value: Option<f64>) -> bool {
        let Some(v) = value else { return false };
        let t = self.threshold;
        match self.op {
            "<" => v < t,
            "<=" => v <= t,
            ">" => v > t,
            ">=" => v >= t,
            "==" => v == t,
            _ => v != t,
        }
    }
}

/// A sweep as the command line built it.
#[derive(Clone, Debug)]
pub struct SweepConfig {
    /// Every blast option; its rate and duration are each step's.
    pub blast: BlastConfig,
    /// The SLOs, in the `--assert` language.
    pub slos: Vec<Assertion>,
    pub step: Duration,
    pub start: f64,
    /// Bisect until the highest pass and the lowest failure are within this
    /// share of each other (0.05 = 5%).
    pub precision: f64,
    pub asserts: Vec<SweepAssert>,
    pub json: Option<PathBuf>,
    pub quiet: bool,
}

/// One phase's latency in one step (corrected).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepLatency {
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// One step of the sweep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepStep {
    /// The rate asked for, messages per second.
    pub requested: f64,
    /// Messages the target accepted per second of the step.
    pub achieved: f64,
    /// Messages the blaster gave to a connection per second of the step.
    pub sent: f64,
    /// Every SLO held.
    pub slo_ok: bool,
    /// The target accepted at least 95% of the requested rate.
    pub absorbed: bool,
    /// The step passed (SLOs held and the rate was absorbed).
    pub passed: bool,
    /// The SLOs that failed, with what was measured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slo_failed: Vec<String>,
    /// Of the messages attempted and connections without a session, the
    /// share that failed, in percent.
    pub error_pct: f64,
    pub bottleneck: Bottleneck,
    /// The run was valid (the blaster kept its schedule).
    pub valid: bool,
    /// Per phase (`message`, `connect`, ...): the corrected latency.
    pub latency: BTreeMap<String, StepLatency>,
}

/// What a sweep found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepResult {
    /// The highest requested rate of a step that passed (`null`: none did).
    pub max_rate: Option<f64>,
    /// The lowest requested rate the target did not absorb (`null`: it
    /// absorbed every step).
    pub saturation_rate: Option<f64>,
    /// Why the sweep stopped early (the blaster fell behind), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    pub steps: Vec<SweepStep>,
}

/// One `--assert` of the sweep and its outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepAssertResult {
    pub expr: String,
    pub ok: bool,
    pub value: Option<f64>,
}

/// The sweep's JSON document (`--json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepReport {
    pub schema_version: u32,
    pub tool: String,
    pub version: String,
    /// Always `sweep`.
    pub role: String,
    /// The blast configuration of the steps, and the sweep's own settings.
    pub config: serde_json::Value,
    pub sweep: SweepResult,
    pub assertions: Vec<SweepAssertResult>,
}

/// The step at `rate`: `cfg`'s load at that constant rate for the step.
fn step_config(cfg: &SweepConfig, rate: f64) -> BlastConfig {
    let mut b = cfg.blast.clone();
    b.model = LoadModel::Open {
        messages_per_sec: rate,
    };
    b.rate_per_sec = Some(rate);
    b.rate_unit = RateUnit::Messages;
    b.stages = None;
    b.duration = Some(cfg.step);
    b.max_messages = None;
    b.max_sessions = None;
    b.output.quiet = true;
    b.output.silent = true;
    b.echo["rate"] = rate.into();
    b.echo["duration_secs"] = cfg.step.as_secs_f64().into();
    b
}

/// Summarises one step's report.
fn summarize(report: &Report, rate: f64, slos: &[Assertion], step: Duration) -> SweepStep {
    let secs = step.as_secs_f64();
    // Accepted inside the step's whole seconds (not the grace after it).
    let whole = secs.floor().max(1.0);
    let accepted: u64 = report
        .timeline
        .iter()
        .filter(|p| (p.t as f64) < whole)
        .map(|p| p.messages)
        .sum();
    let achieved = accepted as f64 / whole;
    let sent = report
        .open_loop
        .as_ref()
        .map_or(0.0, |o| o.achieved_per_sec);
    let slo_failed: Vec<String> = report
        .assertions
        .iter()
        .zip(slos)
        .filter(|(r, _)| !r.ok)
        .map(|(r, a)| {
            let v = r
                .value
                .map(|v| a.format_value(v))
                .unwrap_or_else(|| "no data".into());
            format!("{} (measured {v})", r.expr)
        })
        .collect();
    let c = &report.counts;
    let tries = c.messages_attempted + c.connections_without_session;
    let failed = c.errors() + c.messages_tempfailed + c.messages_rejected;
    let error_pct = if tries > 0 {
        failed as f64 * 100.0 / tries as f64
    } else {
        0.0
    };
    let slo_ok = slo_failed.is_empty();
    let absorbed = achieved >= ABSORBED * rate;
    SweepStep {
        requested: rate,
        achieved: (achieved * 10.0).round() / 10.0,
        sent: (sent * 10.0).round() / 10.0,
        slo_ok,
        absorbed,
        passed: slo_ok && absorbed && report.valid,
        slo_failed,
        error_pct,
        bottleneck: report
            .open_loop
            .as_ref()
            .map_or(Bottleneck::None, |o| o.bottleneck),
        valid: report.valid,
        latency: report
            .latency
            .iter()
            .map(|(phase, l)| {
                (
                    phase.clone(),
                    StepLatency {
                        p50_us: l.p50_us,
                        p99_us: l.p99_us,
                        p999_us: l.p999_us,
                        max_us: l.max_us,
                    },
                )
            })
            .collect(),
    }
}

/// The next rate to try, or `None` when the search is done.
pub fn next_rate(steps: &[SweepStep], precision: f64) -> Option<f64> {
    let last = steps.last()?;
    let lo = steps
        .iter()
        .filter(|s| s.passed)
        .map(|s| s.requested)
        .fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.max(r))));
    let hi = steps
        .iter()
        .filter(|s| !s.passed && lo.is_none_or(|lo| s.requested > lo))
        .map(|s| s.requested)
        .fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.min(r))));
    match (lo, hi) {
        (Some(lo), None) => Some(lo * 2.0),
        (None, Some(hi)) => {
            // Everything failed so far: halve, down to one message a second.
            let r = hi / 2.0;
            (r >= 1.0 && last.requested >= 1.0).then_some(r)
        }
        (Some(lo), Some(hi)) => {
            if (hi - lo) / lo <= precision {
                None
            } else {
                Some((lo + hi) / 2.0)
            }
        }
        (None, None) => None,
    }
}

/// Runs the sweep; returns the exit code (0, 3 blaster fell behind, 99 a
/// failed `--assert`).
pub fn run(cfg: SweepConfig) -> anyhow::Result<u8> {
    let mut steps: Vec<SweepStep> = Vec::new();
    let mut stopped = None;
    let mut rate = cfg.start;
    let stop =
        crate::net::runtime::StopSignal::process().context("installing the Ctrl-C handler")?;
    while steps.len() < MAX_STEPS {
        let run = super::execute(step_config(&cfg, rate))?;
        let mut report = run.report;
        report.evaluate_assertions(&cfg.slos);
        let s = summarize(&report, rate, &cfg.slos, cfg.step);
        if !cfg.quiet {
            eprintln!("smtpstorm: sweep {}", step_line(steps.len() + 1, &s));
        }
        if !report.valid {
            stopped = Some(format!(
                "the blaster itself fell behind at {} messages/s ({}): give it more --threads or run --instance copies on more machines; a sweep never reports the blaster's limit as the target's",
                format_rate(rate),
                report.invalid_reasons.join("; ")
            ));
            steps.push(s);
            break;
        }
        steps.push(s);
        if run.interrupted || stop.is_stopped() {
            stopped = Some("interrupted".into());
            break;
        }
        match next_rate(&steps, cfg.precision) {
            Some(r) => rate = r,
            None => break,
        }
    }
    let max_rate = steps
        .iter()
        .filter(|s| s.passed)
        .map(|s| s.requested)
        .fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.max(r))));
    let saturation_rate = steps
        .iter()
        .filter(|s| s.valid && !s.absorbed)
        .map(|s| s.requested)
        .fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.min(r))));
    let result = SweepResult {
        max_rate,
        saturation_rate,
        stopped: stopped.clone(),
        steps,
    };
    let assertions: Vec<SweepAssertResult> = cfg
        .asserts
        .iter()
        .map(|a| {
            let value = match a.metric {
                "max_rate" => result.max_rate,
                _ => result.saturation_rate,
            };
            SweepAssertResult {
                expr: a.expr.clone(),
                ok: a.holds(value),
                value,
            }
        })
        .collect();
    let mut config = cfg.blast.echo.clone();
    if let Some(m) = config.as_object_mut() {
        for k in ["rate", "duration_secs", "messages", "sessions", "stages"] {
            m.remove(k);
        }
        m.insert(
            "slo".into(),
            cfg.slos
                .iter()
                .map(|a| a.expr.clone())
                .collect::<Vec<_>>()
                .into(),
        );
        m.insert("step_secs".into(), cfg.step.as_secs_f64().into());
        m.insert("start".into(), cfg.start.into());
        m.insert("precision".into(), cfg.precision.into());
    }
    let report = SweepReport {
        schema_version: 1,
        tool: "smtpstorm".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        role: "sweep".into(),
        config,
        sweep: result,
        assertions,
    };
    let mut text = Vec::new();
    write_table(&report, &mut text)?;
    let json_on_stdout = cfg.json.as_deref() == Some(std::path::Path::new("-"));
    if let Some(p) = &cfg.json {
        let doc = serde_json::to_string_pretty(&report)?;
        if json_on_stdout {
            println!("{doc}");
        } else {
            std::fs::write(p, doc + "\n")
                .with_context(|| format!("cannot write --json {}", p.display()))?;
        }
    }
    if json_on_stdout {
        let _ = std::io::stderr().write_all(&text);
    } else {
        let _ = std::io::stdout().write_all(&text);
    }
    if let Some(why) = &stopped {
        if why != "interrupted" {
            eprintln!("smtpstorm: sweep stopped: {why}");
            return Ok(super::EXIT_INVALID);
        }
    }
    let failed: Vec<&SweepAssertResult> = report.assertions.iter().filter(|a| !a.ok).collect();
    if !failed.is_empty() {
        eprintln!("smtpstorm: {} check(s) failed:", failed.len());
        for a in failed {
            let v = a
                .value
                .map(|v| format!("{} messages/s", format_rate(v)))
                .unwrap_or_else(|| "none".into());
            eprintln!("  FAIL  {:<32} measured {v}", a.expr);
        }
        return Ok(super::EXIT_ASSERT);
    }
    Ok(0)
}

/// One step as a line: `3  requested 400/s  achieved 300/s  p99(message) 1.2s  FAIL: ...`.
fn step_line(n: usize, s: &SweepStep) -> String {
    let p99 = s
        .latency
        .get("message")
        .map_or("-".to_string(), |l| format_us(l.p99_us as f64));
    let verdict = if s.passed {
        "pass".to_string()
    } else if !s.valid {
        "blaster fell behind".to_string()
    } else {
        let mut why: Vec<String> = s.slo_failed.clone();
        if !s.absorbed {
            why.push("not absorbed".into());
        }
        format!("FAIL: {}", why.join(", "))
    };
    format!(
        "step {n}: requested {}/s  achieved {}/s  p99(message) {p99}  {verdict}",
        format_rate(s.requested),
        format_rate(s.achieved)
    )
}

/// The text table: one row per step in the order of the rate, then the
/// answer.
pub fn write_table(r: &SweepReport, w: &mut impl Write) -> std::io::Result<()> {
    let s = &r.sweep;
    writeln!(
        w,
        "Sweep of {} (SLOs: {})",
        r.config["target"].as_str().unwrap_or("?"),
        r.config["slo"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(", "))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "none; the rate must be absorbed".into())
    )?;
    writeln!(
        w,
        "  {:>10}  {:>10}  {:>9}  {:>9}  {:>9}  {:>7}  {:<10}  result",
        "requested", "achieved", "p50", "p99", "p99.9", "errors", "bottleneck"
    )?;
    let mut rows: Vec<&SweepStep> = s.steps.iter().collect();
    rows.sort_by(|a, b| a.requested.total_cmp(&b.requested));
    for st in rows {
        let lat = st.latency.get("message");
        let f = |v: Option<u64>| v.map_or("-".to_string(), |v| format_us(v as f64));
        writeln!(
            w,
            "  {:>10}  {:>10}  {:>9}  {:>9}  {:>9}  {:>6.2}%  {:<10}  {}",
            format_rate(st.requested),
            format_rate(st.achieved),
            f(lat.map(|l| l.p50_us)),
            f(lat.map(|l| l.p99_us)),
            f(lat.map(|l| l.p999_us)),
            st.error_pct,
            format!("{:?}", st.bottleneck).to_lowercase(),
            if st.passed {
                "pass"
            } else if !st.valid {
                "invalid"
            } else if !st.slo_ok {
                "SLO failed"
            } else {
                "not absorbed"
            }
        )?;
    }
    match s.max_rate {
        Some(m) => writeln!(
            w,
            "Max rate: {} messages/s (the highest step at which every SLO held)",
            format_rate(m)
        )?,
        None => writeln!(w, "Max rate: none (no step met every SLO)")?,
    }
    match s.saturation_rate {
        Some(m) => writeln!(
            w,
            "Saturation: {} messages/s (the target accepted less than {:.0}% of it)",
            format_rate(m),
            ABSORBED * 100.0
        )?,
        None => writeln!(w, "Saturation: not reached")?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(requested: f64, passed: bool) -> SweepStep {
        SweepStep {
            requested,
            achieved: requested,
            sent: requested,
            slo_ok: passed,
            absorbed: true,
            passed,
            slo_failed: Vec::new(),
            error_pct: 0.0,
            bottleneck: Bottleneck::None,
            valid: true,
            latency: BTreeMap::new(),
        }
    }

    /// The rates a sweep tries against a target whose capacity is `cap`.
    fn search(start: f64, cap: f64, precision: f64) -> (Vec<f64>, Option<f64>) {
        let mut steps = Vec::new();
        let mut r = start;
        loop {
            steps.push(step(r, r <= cap));
            match next_rate(&steps, precision) {
                Some(n) if steps.len() < MAX_STEPS => r = n,
                _ => break,
            }
        }
        let max = steps
            .iter()
            .filter(|s| s.passed)
            .map(|s| s.requested)
            .reduce(f64::max);
        (steps.iter().map(|s| s.requested).collect(), max)
    }

    #[test]
    fn the_rate_doubles_then_bisects_to_the_precision() {
        let (rates, max) = search(100.0, 1000.0, 0.05);
        assert_eq!(&rates[..5], &[100.0, 200.0, 400.0, 800.0, 1600.0]);
        let max = max.unwrap();
        assert!((1000.0 / 1.05..=1000.0).contains(&max), "{max} {rates:?}");
        let (rates, max) = search(5000.0, 1000.0, 0.05);
        assert_eq!(&rates[..4], &[5000.0, 2500.0, 1250.0, 625.0]);
        assert!(max.unwrap() >= 1000.0 / 1.05, "{rates:?}");
        let (rates, max) = search(10.0, 0.1, 0.05);
        assert_eq!(max, None, "{rates:?}");
        assert!(rates.len() < 10);
    }

    #[test]
    fn sweep_assertions_parse_and_compare() {
        let a = SweepAssert::parse("max_rate >= 5k").unwrap();
        assert_eq!((a.metric, a.op, a.threshold), ("max_rate", ">=", 5000.0));
        assert!(a.holds(Some(5000.0)) && !a.holds(Some(4999.0)) && !a.holds(None));
        let a = SweepAssert::parse("saturation_rate<300").unwrap();
        assert_eq!((a.metric, a.op), ("saturation_rate", "<"));
        for bad in ["p99(message) < 5ms", "max_rate 5", "max_rate >= fast"] {
            let e = SweepAssert::parse(bad).unwrap_err();
            assert!(e.contains("expected e.g. `max_rate >= 5000`"), "{e}");
        }
    }
}
