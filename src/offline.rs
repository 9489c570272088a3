//! The roles that read reports instead of the network: `merge` adds blast
//! reports from several instances (histograms and counts, never averaged
//! percentiles) and re-evaluates assertions; `report` prints a report and
//! draws it as SVG or a self-contained HTML page. Exit codes follow `blast` (99 failed assertion, 3 an
//! invalid input run unless `--allow-invalid`).

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::blast::{self, BlastRun, OutputConfig};
use crate::stats;

/// `smtpstorm merge FILE... [--json OUT] [--assert EXPR]...`: adds
/// `files` and writes and checks the result as `out` says.
pub fn merge(files: &[PathBuf], out: &OutputConfig) -> anyhow::Result<u8> {
    let report = stats::merge_files(files, &[])?;
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
