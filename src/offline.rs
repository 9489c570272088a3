//! The roles that read reports instead of the network: `merge` adds blast
//! reports from several instances (histograms and counts, never averaged
//! percentiles) and re-evaluates assertions; `report` prints a report and
//! draws it as SVG or a self-contained HTML page. Exit codes follow `blast` (99 failed assertion, 3 an
//! invalid input run unless `--allow-invalid`).

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::blast::{self, BlastRun, OutputConfig};
use crate::stats;

/// Exit code of `merge`: the inputs are not one complete run (an instance
/// missing or doubled, another N or configuration, starts too far apart)
/// and `--allow-partial` was not given.
pub const EXIT_INCOMPLETE_SET: u8 = 2;

/// How `merge` judges the set of reports it is given.
#[derive(Clone, Copy, Debug)]
pub struct SetRules {
    /// Largest difference of the inputs' start times (`--max-skew`).
    pub max_skew_secs: f64,
    /// Merge even if the set is not one complete run (`--allow-partial`).
    pub allow_partial: bool,
    /// End to end: the sink's clock minus the blaster's (`--clock-offset`).
    pub clock_offset_secs: f64,
    /// End to end: the drain after the blaster's end (`--drain`); `None`:
    /// nothing is late.
    pub drain_secs: Option<f64>,
}

/// `smtpstorm merge FILE... [--json OUT] [--assert EXPR]...`: checks the
/// set ([`stats::check_set`]), names each problem on stderr (exit 2 unless
/// `rules.allow_partial`), adds the reports and writes and checks the
/// result as `out` says; the report records the check (`merge`).
pub fn merge(files: &[PathBuf], rules: SetRules, out: &OutputConfig) -> anyhow::Result<u8> {
    let all = files
        .iter()
        .map(|p| stats::load_report(p))
        .collect::<Result<Vec<_>, _>>()?;
    let (sinks, blasts): (Vec<_>, Vec<_>) = all
        .into_iter()
        .enumerate()
        .partition(|(_, r)| r.role == stats::Role::Sink);
    if sinks.len() > 1 {
        anyhow::bail!(
            "merge takes at most one sink report (the end-to-end pairing); got {}",
            sinks.len()
        );
    }
    if blasts.is_empty() {
        anyhow::bail!("merge needs at least one blast report");
    }
    let sink = sinks.into_iter().next().map(|(_, r)| r);
    let files: Vec<&PathBuf> = blasts.iter().map(|(i, _)| &files[*i]).collect();
    let loaded: Vec<stats::Report> = blasts.into_iter().map(|(_, r)| r).collect();
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    let inputs: Vec<(&str, &stats::Report)> =
        names.iter().map(String::as_str).zip(&loaded).collect();
    let (mut check, keep) = stats::check_set(&inputs, rules.max_skew_secs);
    for p in &check.problems {
        eprintln!("smtpstorm: merge: {p}");
    }
    if !check.problems.is_empty() && !rules.allow_partial {
        eprintln!("smtpstorm: merge: not one complete run; nothing written (--allow-partial merges anyway)");
        return Ok(EXIT_INCOMPLETE_SET);
    }
    check.partial = !check.problems.is_empty();
    let chosen: Vec<stats::Report> = loaded
        .into_iter()
        .enumerate()
        .filter(|(k, _)| keep.contains(k))
        .map(|(_, r)| r)
        .collect();
    let trace = merged_trace(&chosen)?;
    let mut report = stats::merge_reports(&chosen, &[])?;
    report.merge = Some(check);
    if let Some(sink) = &sink {
        report.trace = trace;
        let end = report.started_at_unix + report.duration_secs;
        stats::account_e2e(
            &mut report,
            sink,
            &stats::E2eOptions {
                drain_secs: rules.drain_secs.unwrap_or(0.0),
                drain_end_unix: rules.drain_secs.map(|d| end + d),
                one_clock: false,
                clock_offset_secs: rules.clock_offset_secs,
            },
        )?;
        if let Some(e) = &report.e2e {
            eprintln!("smtpstorm: merge: {}", e.clock_note);
        }
    }
    for r in &report.invalid_reasons {
        eprintln!("smtpstorm: invalid run: {r}");
    }
    blast::finish(
        BlastRun {
            report,
            errors: Vec::new(),
            interrupted: false,
        },
        out,
    )
}

/// The blasters' `trace` sections as one: the union of their accepted
/// sets, which must share one run id (`None` if none has a trace).
fn merged_trace(blasts: &[stats::Report]) -> anyhow::Result<Option<stats::TraceReport>> {
    let mut run: Option<String> = None;
    let mut set = stats::NumberSet::default();
    for t in blasts.iter().filter_map(|r| r.trace.as_ref()) {
        let id = t.run_id.clone().unwrap_or_default();
        if run.as_ref().is_some_and(|r| *r != id) {
            anyhow::bail!(
                "the blast reports carry different run ids ({} and {id})",
                run.unwrap_or_default()
            );
        }
        run = Some(id);
        if let Some(s) = &t.accepted_set {
            set.0 |= &s.0;
        }
    }
    Ok(run.map(|id| stats::TraceReport {
        run_id: Some(id),
        accepted: Some(set.len()),
        accepted_set: Some(set),
        ..Default::default()
    }))
}

/// `smtpstorm report FILE.json [--svg OUT] [--html OUT] [--prometheus OUT]`
pub fn report(
    file: &Path,
    svg: Option<&Path>,
    html: Option<&Path>,
    prometheus: Option<&Path>,
) -> anyhow::Result<u8> {
    let report = stats::load_report(file)?;
    let mut out = std::io::stdout().lock();
    if let Err(e) = stats::write_summary(&report, &mut out) {
        // A closed pipe (`| head`) is not an error.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
    }
    if let Some(svg) = svg {
        stats::write_svg(&report, svg).with_context(|| format!("drawing {}", svg.display()))?;
    }
    if let Some(html) = html {
        stats::write_html(&report, html)?;
    }
    if let Some(p) = prometheus {
        if report.e2e.is_none() {
            anyhow::bail!(
                "{}: no end-to-end figures (bench --through, or merge with a sink report)",
                file.display()
            );
        }
        std::fs::write(p, stats::metrics::e2e_prometheus_text(&report))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(0)
}
