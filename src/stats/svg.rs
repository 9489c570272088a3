//! SVG charts of a report (`smtpstorm report FILE.json --svg OUT`): the
//! latency percentile spectrum per phase above the throughput over time,
//! in one 1000×1000 file (the drawing itself is in [`super::charts`]).
//!
//! Invariants: a report without latency or timeline still yields a valid
//! SVG with empty axes.

use std::path::Path;

use plotters::prelude::{IntoDrawingArea, SVGBackend, WHITE};

use super::charts::{draw_spectrum, draw_throughput};
use super::report::Report;

/// Errors of drawing the charts.
#[derive(Debug, thiserror::Error)]
pub enum SvgError {
    #[error("cannot draw {path}: {reason}")]
    Draw { path: String, reason: String },
}

/// Draws both charts of `report` into an SVG file at `path`.
pub fn write_svg(report: &Report, path: &Path) -> Result<(), SvgError> {
    draw(report, path).map_err(|reason| SvgError::Draw {
        path: path.display().to_string(),
        reason,
    })
}

fn draw(report: &Report, path: &Path) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let root = SVGBackend::new(path, (1000, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (upper, lower) = root.split_vertically(500);
    draw_spectrum(&upper, report)?;
    draw_throughput(&lower, report)?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::report::tests::sample_blast_report;

    #[test]
    fn svg_has_both_charts_with_phase_legends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.svg");
        write_svg(&sample_blast_report(), &path).unwrap();
        if let Ok(keep) = std::env::var("SMTPSTORM_KEEP_SVG") {
            std::fs::copy(&path, keep).unwrap();
        }
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        assert!(svg.contains("Latency by percentile"));
        assert!(svg.contains("Throughput over time"));
        assert!(svg.contains(">message\n</text>") || svg.contains(">\nmessage\n</text>"));
        assert!(svg.contains("messages/s\n</text>"));
        assert!(svg.contains("99.9%"));
        assert!(
            svg.matches("<polyline").count() >= 6,
            "3 phases + 3 throughput lines"
        );
    }

    #[test]
    fn report_without_data_still_draws() {
        let mut r = sample_blast_report();
        r.latency.clear();
        r.timeline.clear();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.svg");
        write_svg(&r, &path).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("</svg>"));
    }
}
