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
}

/// `smtpstorm merge FILE... [--json OUT] [--assert EXPR]...`: checks the
/// set ([`stats::check_set`]), names each problem on stderr (exit 2 unless
/// `rules.allow_partial`), adds the reports and writes and checks the
/// result as `out` says; the report records the check (`merge`).
pub fn merge(files: &[PathBuf], rules: SetRules, out: &OutputConfig) -> anyhow::Result<u8> {
    let loaded = files
        .iter()
        .map(|p| stats::load_report(p))
        .collect::<Result<Vec<_>, _>>()?;
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
    let mut report = stats::merge_reports(&chosen, &[])?;
    report.merge = Some(check);
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

/// `smtpstorm report FILE.json [--svg OUT] [--html OUT]`
pub fn report(file: &Path, svg: Option<&Path>, html: Option<&Path>) -> anyhow::Result<u8> {
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
    Ok(0)
}
