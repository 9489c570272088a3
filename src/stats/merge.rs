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
use super::report::{load_report, CpuUsage, MergeCheck, Report, ReportError, ReportInput};
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
            e.failed += p.failed;
            for (phase, l) in &p.latency {
                e.latency
                    .entry(phase.clone())
                    .and_modify(|x| x.combine(l))
                    .or_insert(*l);
            }
        }
        for f in &r.failures {
            m.failures.count_n(&f.reason, f.count);
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

/// Keys of a blast report's `config` that differ between the instances of
/// one run by design: the index, each instance's share of connections,
/// messages, sessions and source addresses, and how late it started.
/// Everything else, and `config_digest` (computed over the totals before
/// the split), is the same for every instance of a run.
pub const PER_INSTANCE_CONFIG: &[&str] = &[
    "instance",
    "connections",
    "messages",
    "sessions",
    "source_ips",
    "config_digest",
    "start_late_secs",
];

/// A short digest of a JSON value (16 hex digits, 64-bit FNV-1a over its
/// canonical text: object keys sorted, no spaces), the same on every
/// machine and version. Not cryptographic: it tells runs apart, nothing
/// more.
pub fn config_digest(v: &serde_json::Value) -> String {
    fn canonical(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::String(k.clone()).to_string());
                    out.push(':');
                    canonical(&map[k], out);
                }
                out.push('}');
            }
            serde_json::Value::Array(items) => {
                out.push('[');
                for (i, x) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canonical(x, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let mut text = String::new();
    canonical(v, &mut text);
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// `I/N` of a report's `config.instance`.
fn instance_of(r: &Report) -> Option<(u32, u32)> {
    let (i, n) = r.config.get("instance")?.as_str()?.split_once('/')?;
    Some((i.trim().parse().ok()?, n.trim().parse().ok()?))
}

/// How config `b` differs from `a` outside [`PER_INSTANCE_CONFIG`] (up to
/// four keys, `key A vs B`), or through `config_digest` alone (the totals
/// before the split differ); `None` when they are the same run's.
fn config_difference(a: &serde_json::Value, b: &serde_json::Value) -> Option<String> {
    let (Some(ma), Some(mb)) = (a.as_object(), b.as_object()) else {
        return (a != b).then(|| "the configurations differ".to_string());
    };
    let null = serde_json::Value::Null;
    let mut keys: Vec<&String> = ma.keys().chain(mb.keys()).collect();
    keys.sort();
    keys.dedup();
    let differing: Vec<String> = keys
        .into_iter()
        .filter(|k| !PER_INSTANCE_CONFIG.contains(&k.as_str()))
        .filter(|k| ma.get(*k).unwrap_or(&null) != mb.get(*k).unwrap_or(&null))
        .map(|k| {
            format!(
                "{k} {} vs {}",
                ma.get(k).unwrap_or(&null),
                mb.get(k).unwrap_or(&null)
            )
        })
        .collect();
    if !differing.is_empty() {
        let more = differing.len().saturating_sub(4);
        let mut why = differing.into_iter().take(4).collect::<Vec<_>>().join(", ");
        if more > 0 {
            why.push_str(&format!(" and {more} more"));
        }
        return Some(why);
    }
    match (ma.get("config_digest"), mb.get("config_digest")) {
        (Some(da), Some(db)) if da != db => Some(format!(
            "config_digest {da} vs {db} (the totals before the split differ: connections, messages, sessions or source addresses)"
        )),
        _ => None,
    }
}

/// Checks the reports given to `merge` (`(name, report)` each) as one
/// distributed run: when any input is an instance `I/N` with N > 1, each of
/// `0..N-1` must be there exactly once with the same N; in any case every
/// input must have the same run configuration (see [`PER_INSTANCE_CONFIG`])
/// and have started within `max_skew_secs` of the others. Returns what was
/// found (one line per problem) and the indices of the inputs to add: a
/// doubled instance's first report only, and no input of another N or
/// without an instance. Inputs that are all N = 1 (no `--instance`) are
/// independent runs: no instance is missing or doubled among them.
pub fn check_set(inputs: &[(&str, &Report)], max_skew_secs: f64) -> (MergeCheck, Vec<usize>) {
    let mut check = MergeCheck {
        inputs: inputs.len(),
        max_skew_secs,
        ..MergeCheck::default()
    };
    let ids: Vec<Option<(u32, u32)>> = inputs.iter().map(|(_, r)| instance_of(r)).collect();
    let mut keep: Vec<usize> = (0..inputs.len()).collect();
    if ids.iter().flatten().any(|&(_, n)| n > 1) {
        // N as most inputs say (a tie: the first input's).
        let mut votes: Vec<(u32, usize)> = Vec::new();
        for &(_, n) in ids.iter().flatten() {
            match votes.iter_mut().find(|(v, _)| *v == n) {
                Some(e) => e.1 += 1,
                None => votes.push((n, 1)),
            }
        }
        let n = votes
            .iter()
            .fold(
                (0, 0),
                |best, &(v, c)| if c > best.1 { (v, c) } else { best },
            )
            .0;
        check.instances = Some(n);
        let mut first: BTreeMap<u32, usize> = BTreeMap::new();
        keep.clear();
        for (k, id) in ids.iter().enumerate() {
            let name = inputs[k].0;
            match *id {
                None => check.problems.push(format!(
                    "{name} is no instance of a distributed run (its config has no `instance`: a merged report?); not added"
                )),
                Some((i, m)) if m != n => check.problems.push(format!(
                    "{name} is instance {i}/{m}, but the run has {n} instances; not added"
                )),
                Some((i, _)) => match first.get(&i) {
                    Some(&f) => {
                        check.problems.push(format!(
                            "instance {i}/{n} is given twice: {} and {name}; only {} added",
                            inputs[f].0, inputs[f].0
                        ));
                        if !check.duplicates.contains(&i) {
                            check.duplicates.push(i);
                        }
                    }
                    None => {
                        first.insert(i, k);
                        keep.push(k);
                    }
                },
            }
        }
        for i in (0..n).filter(|i| !first.contains_key(i)) {
            check.missing.push(i);
            check.problems.push(format!("instance {i}/{n} is missing"));
        }
        check.duplicates.sort_unstable();
    }
    if let Some((&k0, rest)) = keep.split_first() {
        let (name0, r0) = inputs[k0];
        for &k in rest {
            let (name, r) = inputs[k];
            if let Some(why) = config_difference(&r0.config, &r.config) {
                check.problems.push(format!(
                    "{name} ran another configuration than {name0}: {why}"
                ));
            }
        }
        let by_start = |a: &&usize, b: &&usize| {
            inputs[**a]
                .1
                .started_at_unix
                .total_cmp(&inputs[**b].1.started_at_unix)
        };
        let (Some(&early), Some(&late)) =
            (keep.iter().min_by(by_start), keep.iter().max_by(by_start))
        else {
            unreachable!("keep is not empty")
        };
        let skew = inputs[late].1.started_at_unix - inputs[early].1.started_at_unix;
        check.start_skew_secs = skew;
        if skew > max_skew_secs {
            check.problems.push(format!(
                "start times differ by {skew:.3} s, more than --max-skew {max_skew_secs} s: {} started {skew:.3} s after {}",
                inputs[late].0, inputs[early].0
            ));
        }
    }
    check.merged = keep.len();
    (check, keep)
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

    /// Instance `i` of `n` of one run: the sample report with the config a
    /// blast of `--instance i/n` echoes (its own share, one digest).
    fn instance(i: u32, n: u32) -> Report {
        let mut r = sample_blast_report();
        r.config = serde_json::json!({
            "instance": format!("{i}/{n}"),
            "connections": 10 / n + u32::from(i < 10 % n),
            "rate": 100.0,
            "config_digest": "00000000000000aa",
        });
        r.started_at_unix = 1_000.0 + f64::from(i) * 0.1;
        r
    }

    fn check(reports: &[Report], max_skew: f64) -> (MergeCheck, Vec<usize>) {
        let names: Vec<String> = (0..reports.len()).map(|k| format!("r{k}.json")).collect();
        let inputs: Vec<(&str, &Report)> = names.iter().map(String::as_str).zip(reports).collect();
        check_set(&inputs, max_skew)
    }

    #[test]
    fn a_complete_set_of_instances_has_no_problem() {
        let set: Vec<Report> = [2, 0, 1].iter().map(|&i| instance(i, 3)).collect();
        let (c, keep) = check(&set, 2.0);
        assert_eq!(c.problems, Vec::<String>::new());
        assert_eq!((c.instances, c.inputs, c.merged), (Some(3), 3, 3));
        assert_eq!(keep, vec![0, 1, 2]);
        assert!(
            (c.start_skew_secs - 0.2).abs() < 1e-9,
            "{}",
            c.start_skew_secs
        );
    }

    #[test]
    fn a_missing_and_a_doubled_instance_are_each_named_in_one_line() {
        let set = [
            instance(0, 4),
            instance(1, 4),
            instance(1, 4),
            instance(3, 4),
        ];
        let (c, keep) = check(&set, 2.0);
        assert_eq!(c.missing, vec![2]);
        assert_eq!(c.duplicates, vec![1]);
        assert_eq!(keep, vec![0, 1, 3], "the second copy of 1 is not added");
        assert_eq!(
            c.problems,
            vec![
                "instance 1/4 is given twice: r1.json and r2.json; only r1.json added".to_string(),
                "instance 2/4 is missing".to_string(),
            ]
        );
    }

    #[test]
    fn another_n_or_a_report_without_instance_is_named_and_left_out() {
        let mut merged = sample_blast_report();
        merged.config = serde_json::json!({"merged_from": 2, "configs": []});
        let set = [instance(0, 2), instance(1, 2), instance(1, 3), merged];
        let (c, keep) = check(&set, 2.0);
        assert_eq!(c.instances, Some(2));
        assert_eq!(keep, vec![0, 1]);
        assert_eq!(c.problems.len(), 2, "{:?}", c.problems);
        assert_eq!(
            c.problems[0],
            "r2.json is instance 1/3, but the run has 2 instances; not added"
        );
        assert!(
            c.problems[1].starts_with("r3.json is no instance of a distributed run"),
            "{:?}",
            c.problems
        );
    }

    #[test]
    fn another_configuration_is_named_by_its_keys_or_its_digest() {
        let mut other = instance(1, 2);
        other.config["rate"] = 50.0.into();
        let (c, _) = check(&[instance(0, 2), other], 2.0);
        assert_eq!(
            c.problems,
            vec!["r1.json ran another configuration than r0.json: rate 100.0 vs 50.0".to_string()]
        );
        // Shares differ by design; only the digest (over the totals) tells.
        let mut other = instance(1, 2);
        other.config["connections"] = 7.into();
        assert!(check(&[instance(0, 2), other.clone()], 2.0)
            .0
            .problems
            .is_empty());
        other.config["config_digest"] = "00000000000000bb".into();
        let (c, _) = check(&[instance(0, 2), other], 2.0);
        assert_eq!(c.problems.len(), 1);
        assert!(
            c.problems[0].contains("config_digest \"00000000000000aa\" vs \"00000000000000bb\""),
            "{:?}",
            c.problems
        );
    }

    #[test]
    fn starts_further_apart_than_the_bound_are_named() {
        let mut late = instance(1, 2);
        late.started_at_unix += 3.0;
        let (c, keep) = check(&[instance(0, 2), late.clone()], 2.0);
        assert_eq!(keep.len(), 2);
        assert!((c.start_skew_secs - 3.1).abs() < 1e-9);
        assert_eq!(
            c.problems,
            vec!["start times differ by 3.100 s, more than --max-skew 2 s: r1.json started 3.100 s after r0.json".to_string()]
        );
        assert!(check(&[instance(0, 2), late], 5.0).0.problems.is_empty());
    }

    #[test]
    fn independent_runs_are_not_checked_as_a_set_of_instances() {
        let a = sample_blast_report();
        let (c, keep) = check(&[a.clone(), a], 2.0);
        assert_eq!((c.instances, c.problems.len(), keep.len()), (None, 0, 2));
    }

    #[test]
    fn the_config_digest_ignores_key_order_and_tells_values_apart() {
        let a = serde_json::json!({"a": 1, "b": [true, null, "x"], "c": {"y": 2.5, "x": 1}});
        let b: serde_json::Value =
            serde_json::from_str(r#"{"c": {"x": 1, "y": 2.5}, "b": [true, null, "x"], "a": 1}"#)
                .unwrap();
        assert_eq!(config_digest(&a), config_digest(&b));
        assert_eq!(config_digest(&a).len(), 16);
        let mut c = a.clone();
        c["c"]["y"] = 2.6.into();
        assert_ne!(config_digest(&a), config_digest(&c));
        // Stable across versions and machines: a fixed value.
        assert_eq!(config_digest(&serde_json::json!({})), "08f44b07b5901a25");
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
