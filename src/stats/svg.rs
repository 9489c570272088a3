//! SVG charts of a report (`smtpstorm report FILE.json --svg OUT`): the
//! latency percentile spectrum per phase and the throughput over time.
//!
//! Invariants: drawn with plotters' SVG backend and its font-less text
//! (the SVG viewer renders the text), so no font file is needed. The
//! spectrum's x axis is `1/(1-percentile)` on a log scale (labelled 90%,
//! 99%, 99.9%, ...), the standard HdrHistogram plot; the latency axis is
//! logarithmic too (phases range from µs to s), labelled with units.
//! A report without latency or timeline still yields a valid SVG with empty
//! axes.

use std::path::Path;

use plotters::prelude::{
    ChartBuilder, Color, IntoDrawingArea, IntoLogRange, LineSeries, Palette, Palette99,
    PathElement, SVGBackend, SeriesLabelPosition, BLACK, WHITE,
};

use super::recorder::{TimelinePoint, TICKS_PER_HALF_DISTANCE};
use super::report::{LatencySummary, Report};
use super::units::format_us;
use crate::smtp::Phase;

/// Picks one series out of a timeline point.
type PointField = fn(&TimelinePoint) -> u64;

/// Errors of drawing the charts.
#[derive(Debug, thiserror::Error)]
pub enum SvgError {
    #[error("cannot draw {path}: {reason}")]
    Draw { path: String, reason: String },
}

/// `(1/(1-q), latency_ms)` points of one phase's percentile spectrum.
fn spectrum(s: &LatencySummary) -> Vec<(f64, f64)> {
    match &s.histogram {
        Some(h) if !h.is_empty() => h
            .iter_quantiles(TICKS_PER_HALF_DISTANCE)
            .map(|v| (v.quantile_iterated_to(), v.value_iterated_to()))
            .filter(|(q, _)| *q < 1.0)
            .map(|(q, v)| (1.0 / (1.0 - q), v as f64 / 1000.0))
            .collect(),
        _ => [
            (0.0, s.min_us),
            (0.5, s.p50_us),
            (0.9, s.p90_us),
            (0.99, s.p99_us),
            (0.999, s.p999_us),
        ]
        .into_iter()
        .map(|(q, v)| (1.0 / (1.0 - q), v as f64 / 1000.0))
        .collect(),
    }
}

/// Label of a point of the `1/(1-p)` axis: `90%`, `99.9%`.
fn nines_label(x: &f64) -> String {
    let pct = 100.0 * (1.0 - 1.0 / x.max(1.0));
    let s = format!("{pct:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
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

    // Percentile spectrum.
    let series: Vec<(&str, Vec<(f64, f64)>)> = Phase::ALL
        .iter()
        .filter_map(|p| {
            report
                .latency
                .get(p.as_str())
                .map(|s| (p.as_str(), spectrum(s)))
        })
        .filter(|(_, pts)| !pts.is_empty())
        .collect();
    let x_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .fold(10.0_f64, f64::max);
    let x_max = 10f64.powf(x_max.log10().ceil());
    // Latencies span µs to s across phases: a log y axis keeps every phase
    // readable. Bounds are whole decades around the data, at least 1 µs.
    let ys = || series.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y));
    let y_lo = ys().filter(|y| *y > 0.0).fold(f64::INFINITY, f64::min);
    let y_lo = if y_lo.is_finite() {
        10f64.powf(y_lo.log10().floor()).max(0.001)
    } else {
        0.001
    };
    let y_hi = ys().fold(0.0_f64, f64::max).max(y_lo * 10.0);
    let y_max = 10f64.powf(y_hi.log10().ceil());
    let mut chart = ChartBuilder::on(&upper)
        .caption("Latency by percentile", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0_f64..x_max).log_scale(), (y_lo..y_max).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency")
        .x_label_formatter(&nines_label)
        .y_label_formatter(&|ms| format_us(ms * 1000.0))
        .draw()
        .map_err(|x| e(&x))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|&(x, y)| (x, y.max(y_lo))),
                color.stroke_width(2),
            ))
            .map_err(|x| e(&x))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|x| e(&x))?;
    }

    // Throughput over time.
    let tl = &report.timeline;
    let t_max = tl.iter().map(|p| p.t + 1).max().unwrap_or(1).max(1) as f64;
    let m_max = tl
        .iter()
        .map(|p| p.messages.max(p.sessions))
        .max()
        .unwrap_or(0) as f64;
    let m_max = if m_max > 0.0 { m_max * 1.1 } else { 1.0 };
    let mut chart = ChartBuilder::on(&lower)
        .caption("Throughput over time", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0_f64..t_max, 0.0_f64..m_max)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("per second")
        .draw()
        .map_err(|x| e(&x))?;
    if !tl.is_empty() {
        let lines: [(&str, PointField); 3] = [
            ("messages/s", |p| p.messages),
            ("sessions/s", |p| p.sessions),
            ("errors/s", |p| p.errors),
        ];
        for (i, (name, f)) in lines.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    tl.iter().map(|p| (p.t as f64, f(p) as f64)),
                    color.stroke_width(2),
                ))
                .map_err(|x| e(&x))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::report::tests::sample_blast_report;

    #[test]
    fn nines_axis_labels_read_as_percentiles() {
        assert_eq!(nines_label(&1.0), "0%");
        assert_eq!(nines_label(&10.0), "90%");
        assert_eq!(nines_label(&1000.0), "99.9%");
    }

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
