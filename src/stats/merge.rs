//! Merging reports of several instances (`smtpstorm merge`) and comparing
//! a run against a baseline (`--baseline`).
//!
//! Invariants: merging adds counters and histograms (never averages
//! percentiles); rates are recomputed over the longest duration (instances
//! run side by side, aligned by `--start-at`); percentiles are recomputed
//! from the summed histograms; assertions are evaluated again on the merged
//! result. The timeline is realigned on absolute time (each report's
//! `started_at_unix` plus `t`).

use std::collections::BTreeMap;
use std::path::Path;

use super::assert::Assertion;
use super::recorder::{add_histogram, new_histogram, Measurements, TimelinePoint};
use super::report::{load_report, CpuUsage, Report, ReportError, ReportInput};
use crate::smtp::Phase;

/// Errors of merging.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("nothing to merge: no report given")]
    Empty,
    #[error("cannot merge a {0:?} report with a {1:?} report")]
    MixedRoles(super::report::Role, super::report::Role),
    #[error(transparent)]
    Report(#[from] ReportError),
}

/// Loads every file and merges them (see [`merge_reports`]).
pub fn merge_files<P: AsRef<Path>>(
    paths: &[P],
    assertions: &[Assertion],
) -> Result<Report, MergeError> {
    let reports = paths
        .iter()
        .map(|p| load_report(p.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    merge_reports(&reports, assertions)
}

/// Merges reports of the same role: counts, histograms, reply codes,
/// timelines and CPU time are added; rates use the longest duration;
/// `assertions` are evaluated on the result. The host is the first
/// report's; `config` lists every input's config under `configs`.
pub fn merge_reports(reports: &[Report], assertions: &[Assertion]) -> Result<Report, MergeError> {
    let first = reports.first().ok_or(MergeError::Empty)?;
    let mut m = Measurements::default();
    let mut cpu = CpuUsage::default();
    let mut reply_codes: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut invalid_reasons = Vec::new();
    let started = reports
        .iter()
        .map(|r| r.started_at_unix)
        .fold(f64::INFINITY, f64::min);
    let duration = reports.iter().map(|r| r.duration_secs).fold(0.0, f64::max);
    let mut timeline: BTreeMap<u64, TimelinePoint> = BTreeMap::new();
    for (i, r) in reports.iter().enumerate() {
        if r.role != first.role {
            return Err(MergeError::MixedRoles(first.role, r.role));
        }
        m.counts.add(&r.counts);
        m.latency.merge(&r.phase_histograms(false));
        m.latency_uncorrected.merge(&r.phase_histograms(true));
        if let Some(h) = r.schedule_lag.as_ref().and_then(|s| s.histogram.as_ref()) {
            add_histogram(m.schedule_lag.get_or_insert_with(new_histogram), h);
        }
        for (cmd, codes) in &r.reply_codes {
            let dst = reply_codes.entry(cmd.clone()).or_default();
            for (code, n) in codes {
                let e = dst.entry(code.clone()).or_default();
                *e = e.saturating_add(*n);
            }
        }
        let shift = (r.started_at_unix - started).max(0.0).round() as u64;
        for p in &r.timeline {
            let t = p.t + shift;
            let e = timeline.entry(t).or_insert(TimelinePoint {
                t,
                ..Default::default()
            });
            e.messages += p.messages;
            e.sessions += p.sessions;
            e.errors += p.errors;
            for (phase, l) in &p.latency {
                e.latency
                    .entry(phase.clone())
                    .and_modify(|x| x.combine(l))
                    .or_insert(*l);
            }
        }
        cpu.user_secs += r.cpu.user_secs;
        cpu.sys_secs += r.cpu.sys_secs;
        invalid_reasons.extend(
            r.invalid_reasons
                .iter()
                .map(|why| format!("input {}: {why}", i + 1)),
        );
    }
    let mut merged = Report::build(ReportInput {
        role: first.role,
        config: serde_json::json!({
            "merged_from": reports.len(),
            "configs": reports.iter().map(|r| r.config.clone()).collect::<Vec<_>>(),
        }),
        started_at_unix: if started.is_finite() { started } else { 0.0 },
        duration_secs: duration,
        measurements: m,
        timeline: timeline.into_values().collect(),
        invalid_reasons,
        cpu,
        host: Some(first.host.clone()),
    })?;
    merged.reply_codes = reply_codes;
    for r in reports {
        if let Some(o) = &r.open_loop {
            merged
                .open_loop
                .get_or_insert_with(Default::default)
                .merge(o, duration);
        }
    }
    merged.evaluate_assertions(assertions);
    Ok(merged)
}

/// A metric that got worse than allowed against the baseline.
#[derive(Clone, Debug, PartialEq)]
pub struct Regression {
    /// `p99(message)`, `p99(session)` or `rate(messages)`.
    pub metric: String,
    pub baseline: f64,
    pub current: f64,
    /// Worsening in percent (positive: worse).
    pub change_pct: f64,
}

impl std::fmt::Display for Regression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} regressed by {:.1}%: baseline {:.1}, now {:.1}",
            self.metric, self.change_pct, self.baseline, self.current
        )
    }
}

/// One comparison against the baseline, passed or not (a JUnit test case
/// of `--junit`).
#[derive(Clone, Debug, PartialEq)]
pub struct BaselineCheck {
    /// `p99(message)`, `p99(session)` or `rate(messages)`.
    pub metric: String,
    /// µs for latencies, per second for the rate.
    pub baseline: f64,
    pub current: f64,
    /// Worsening in percent (positive: worse).
    pub change_pct: f64,
    /// The allowed worsening (`--max-regression`), percent.
    pub max_regression_pct: f64,
    pub ok: bool,
}

impl BaselineCheck {
    /// `p99(message) no more than 10% worse than the baseline`.
    pub fn name(&self) -> String {
        format!(
            "{} no more than {}% worse than the baseline",
            self.metric, self.max_regression_pct
        )
    }

    /// The check as a [`Regression`] (what a failed one prints).
    pub fn regression(&self) -> Regression {
        Regression {
            metric: self.metric.clone(),
            baseline: self.baseline,
            current: self.current,
            change_pct: self.change_pct,
        }
    }
}

/// Compares `current` against `baseline`: p99 of `message` and `session`
/// may rise, and `rate(messages)` fall, by at most `max_regression_pct`
/// percent. Metrics missing on either side are not compared.
pub fn baseline_checks(
    current: &Report,
    baseline: &Report,
    max_regression_pct: f64,
) -> Vec<BaselineCheck> {
    let mut out = Vec::new();
    let mut check = |metric: String, bv: f64, cv: f64, change_pct: f64| {
        out.push(BaselineCheck {
            metric,
            baseline: bv,
            current: cv,
            change_pct,
            max_regression_pct,
            ok: change_pct <= max_regression_pct,
        })
    };
    for phase in [Phase::Message, Phase::Session] {
        let (Some(b), Some(c)) = (
            baseline.latency.get(phase.as_str()),
            current.latency.get(phase.as_str()),
        ) else {
            continue;
        };
        if b.count == 0 || c.count == 0 || b.p99_us == 0 {
            continue;
        }
        let (bv, cv) = (b.p99_us as f64, c.p99_us as f64);
        check(
            format!("p99({})", phase.as_str()),
            bv,
            cv,
            (cv - bv) / bv * 100.0,
        );
    }
    let (bv, cv) = (
        baseline.rates.messages_per_sec,
        current.rates.messages_per_sec,
    );
    if bv > 0.0 {
        check("rate(messages)".into(), bv, cv, (bv - cv) / bv * 100.0);
    }
    out
}

/// The checks of [`baseline_checks`] that failed, as regressions.
pub fn compare_baseline(
    current: &Report,
    baseline: &Report,
    max_regression_pct: f64,
) -> Vec<Regression> {
    baseline_checks(current, baseline, max_regression_pct)
        .into_iter()
        .filter(|c| !c.ok)
        .map(|c| c.regression())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::assert::parse;
    use crate::stats::report::tests::sample_blast_report;

    #[test]
    fn merged_counts_and_histogram_counts_are_the_sums() {
        let mut a = sample_blast_report();
        let mut b = sample_blast_report();
        b.started_at_unix += 2.0;
        let second = |count, p50, max_us| {
            let l = crate::stats::IntervalLatency {
                count,
                p50_us: Some(p50),
                p90_us: Some(p50),
                p99_us: Some(max_us),
                max_us,
            };
            [("message".to_string(), l)].into_iter().collect()
        };
        a.timeline[5].latency = second(10, 100, 300);
        a.timeline[1].latency = second(10, 100, 300);
        b.timeline[3].latency = second(5, 900, 2000);
        b.duration_secs = 12.0;
        let merged = merge_reports(
            &[a.clone(), b.clone()],
            &[parse("accepted >= 2000").unwrap()],
        )
        .unwrap();
        assert_eq!(
            merged.counts.messages_accepted,
            a.counts.messages_accepted + b.counts.messages_accepted
        );
        assert_eq!(merged.counts.bytes, a.counts.bytes + b.counts.bytes);
        let ha = a.histogram(Phase::Message).unwrap().len();
        assert_eq!(merged.histogram(Phase::Message).unwrap().len(), 2 * ha);
        assert_eq!(merged.latency["message"].count, 2 * ha);
        assert_eq!(merged.latency_uncorrected["message"].count, 2 * ha);
        assert_eq!(merged.schedule_lag.as_ref().unwrap().count, 2000);
        assert_eq!(merged.reply_codes["mail"]["250"], 2000);
        assert_eq!(merged.duration_secs, 12.0);
        assert!((merged.rates.messages_per_sec - 2000.0 / 12.0).abs() < 1e-9);
        assert_eq!(merged.assertions.len(), 1);
        assert!(merged.assertions[0].ok);
        // Timeline realigned: b starts 2 s later, so t = 0..12 exist and t=5 holds both.
        assert_eq!(merged.timeline.len(), 12);
        assert_eq!(merged.timeline[5].messages, 200);
        assert_eq!(merged.timeline[0].messages, 100);
        let shared = merged.timeline[5].latency["message"];
        assert_eq!(
            (shared.count, shared.max_us, shared.p50_us),
            (15, 2000, None)
        );
        let alone = merged.timeline[1].latency["message"];
        assert_eq!((alone.count, alone.p50_us), (10, Some(100)));
        assert_eq!(merged.cpu.user_secs, 2.0);
    }

    #[test]
    fn merged_percentiles_come_from_the_summed_histogram() {
        let a = sample_blast_report();
        let merged = merge_reports(&[a.clone(), a.clone()], &[]).unwrap();
        assert_eq!(
            merged.latency["message"].p99_us,
            a.latency["message"].p99_us
        );
    }

    #[test]
    fn merging_files_round_trips_through_json() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<_> = (0..3)
            .map(|i| dir.path().join(format!("i{i}.json")))
            .collect();
        for p in &paths {
            sample_blast_report().write_json(p).unwrap();
        }
        let merged = merge_files(&paths, &[]).unwrap();
        assert_eq!(merged.histogram(Phase::Message).unwrap().len(), 3000);
        assert_eq!(merged.counts.messages_attempted, 3003);
    }

    #[test]
    fn merging_nothing_or_mixed_roles_is_an_error() {
        assert!(matches!(merge_reports(&[], &[]), Err(MergeError::Empty)));
        let a = sample_blast_report();
        let mut s = a.clone();
        s.role = crate::stats::report::Role::Sink;
        assert!(matches!(
            merge_reports(&[a, s], &[]),
            Err(MergeError::MixedRoles(..))
        ));
    }

    #[test]
    fn baseline_flags_slower_p99_and_lower_rate_only_beyond_the_margin() {
        let base = sample_blast_report();
        assert!(compare_baseline(&base, &base, 5.0).is_empty());
        let mut cur = base.clone();
        cur.latency.get_mut("message").unwrap().p99_us = base.latency["message"].p99_us * 2;
        cur.rates.messages_per_sec = base.rates.messages_per_sec * 0.97;
        let regs = compare_baseline(&cur, &base, 5.0);
        assert_eq!(regs.len(), 1);
        assert_eq!(regs[0].metric, "p99(message)");
        assert!((regs[0].change_pct - 100.0).abs() < 1e-9);
        cur.rates.messages_per_sec = base.rates.messages_per_sec * 0.5;
        let regs = compare_baseline(&cur, &base, 5.0);
        assert_eq!(regs.len(), 2);
        let checks = baseline_checks(&cur, &base, 5.0);
        assert_eq!(checks.len(), 3, "session p99 is compared too, and passes");
        assert!(checks[1].ok && checks[1].metric == "p99(session)");
        assert_eq!(
            checks[0].name(),
            "p99(message) no more than 5% worse than the baseline"
        );
        assert!(regs[1]
            .to_string()
            .starts_with("rate(messages) regressed by 50.0%"));
    }
}
