//! The charts of a report, drawn with plotters on any backend: the latency
//! percentile spectrum per phase, the throughput over time, the latency
//! percentiles of one phase over time, and the outcomes. `svg` puts the
//! first two in one SVG file; `html` inlines each chart as its own `<svg>`.
//!
//! Invariants: no font file is needed (plotters' SVG text is rendered by
//! the viewer). The spectrum's x axis is `1/(1-percentile)` on a log scale
//! (labelled 90%, 99%, 99.9%, ...), the standard HdrHistogram plot; the
//! latency axis is logarithmic too (phases range from µs to s), labelled
//! with units. A report without latency or timeline still draws valid,
//! empty axes; drawing never panics.

use plotters::coord::ranged1d::{IntoSegmentedCoord, SegmentValue};
use plotters::coord::Shift;
use plotters::prelude::{
    ChartBuilder, Color, DrawingArea, DrawingBackend, IntoLogRange, LineSeries, Palette, Palette99,
    PathElement, Rectangle, SeriesLabelPosition, BLACK, WHITE,
};

use super::recorder::{TimelinePoint, TICKS_PER_HALF_DISTANCE};
use super::report::{LatencySummary, Report};
use super::units::format_us;
use crate::smtp::Phase;

/// Picks one series out of a timeline point.
type PointField = fn(&TimelinePoint) -> u64;
/// Picks an open-loop rate out of a timeline point (absent in closed loop).
type RateField = fn(&TimelinePoint) -> Option<f64>;

/// `(1/(1-q), latency_ms)` points of one phase's percentile spectrum.
pub fn spectrum(s: &LatencySummary) -> Vec<(f64, f64)> {
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
pub fn nines_label(x: &f64) -> String {
    let pct = 100.0 * (1.0 - 1.0 / x.max(1.0));
    let s = format!("{pct:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

/// Draws the latency percentile spectrum of every phase with data.
pub fn draw_spectrum<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    report: &Report,
) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
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
    let mut chart = ChartBuilder::on(area)
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

    Ok(())
}

/// Draws messages, sessions and errors per second over the run (and, in
/// open loop, the requested and achieved rates of each second).
pub fn draw_throughput<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    report: &Report,
) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    // Throughput over time.
    let tl = &report.timeline;
    let t_max = tl.iter().map(|p| p.t + 1).max().unwrap_or(1).max(1) as f64;
    let m_max = tl
        .iter()
        .map(|p| {
            p.messages
                .max(p.sessions)
                .max(p.achieved.unwrap_or(0))
                .max(p.requested.unwrap_or(0.0).ceil() as u64)
        })
        .max()
        .unwrap_or(0) as f64;
    let m_max = if m_max > 0.0 { m_max * 1.1 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
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
        // Open loop: what the schedule asked for, and what was sent.
        let rates: [(&str, RateField); 2] = [
            ("requested/s", |p| p.requested),
            ("achieved/s", |p| p.achieved.map(|a| a as f64)),
        ];
        for (i, (name, f)) in rates.into_iter().enumerate() {
            if tl.iter().all(|p| f(p).is_none()) {
                continue;
            }
            let color = Palette99::pick(3 + i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    tl.iter().filter_map(|p| f(p).map(|v| (p.t as f64, v))),
                    color.stroke_width(1),
                ))
                .map_err(|x| e(&x))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
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
    Ok(())
}

/// End to end: the backlog (accepted so far minus delivered so far) of
/// each second that has one; the number of series drawn (0 or 1).
pub fn draw_backlog<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    report: &Report,
) -> Result<usize, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let pts: Vec<(f64, f64)> = report
        .timeline
        .iter()
        .filter_map(|p| p.backlog.map(|b| (p.t as f64, b as f64)))
        .collect();
    let t_max = pts.iter().map(|p| p.0 + 1.0).fold(1.0, f64::max);
    let hi = pts.iter().map(|p| p.1).fold(0.0, f64::max);
    let lo = pts.iter().map(|p| p.1).fold(0.0, f64::min);
    let hi = if hi > lo { hi * 1.1 } else { lo + 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption("Backlog: accepted minus delivered", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0_f64..t_max, lo.min(0.0)..hi)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("messages")
        .draw()
        .map_err(|x| e(&x))?;
    if pts.is_empty() {
        return Ok(0);
    }
    let color = Palette99::pick(0).to_rgba();
    chart
        .draw_series(LineSeries::new(pts, color.stroke_width(2)))
        .map_err(|x| e(&x))?;
    Ok(1)
}

/// The series of [`draw_latency_over_time`]: name and field.
type LatencyField = fn(&super::recorder::IntervalLatency) -> Option<u64>;

/// The percentile lines drawn per phase over time, in drawing order.
pub const OVER_TIME_SERIES: [(&str, LatencyField); 4] = [
    ("p50", |l| l.p50_us),
    ("p90", |l| l.p90_us),
    ("p99", |l| l.p99_us),
    ("max", |l| Some(l.max_us)),
];

/// Phases with per-second latency in the timeline, in `Phase::ALL` order.
pub fn phases_over_time(report: &Report) -> Vec<Phase> {
    Phase::ALL
        .into_iter()
        .filter(|p| {
            report
                .timeline
                .iter()
                .any(|t| t.latency.contains_key(p.as_str()))
        })
        .collect()
}

/// `(t, value_ms)` points of one series of `phase` (seconds without a
/// value, e.g. percentiles of a second merged from several instances, are
/// left out).
pub fn over_time_points(report: &Report, phase: Phase, field: LatencyField) -> Vec<(f64, f64)> {
    report
        .timeline
        .iter()
        .filter_map(|p| {
            let l = p.latency.get(phase.as_str())?;
            Some((p.t as f64 + 0.5, field(l)? as f64 / 1000.0))
        })
        .collect()
}

/// Draws p50, p90, p99 and max of `phase` per second (log latency axis);
/// returns how many series had points.
pub fn draw_latency_over_time<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    report: &Report,
    phase: Phase,
) -> Result<usize, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let series: Vec<(&str, Vec<(f64, f64)>)> = OVER_TIME_SERIES
        .iter()
        .map(|(name, f)| (*name, over_time_points(report, phase, *f)))
        .filter(|(_, pts)| !pts.is_empty())
        .collect();
    let t_max = report.timeline.iter().map(|p| p.t + 1).max().unwrap_or(1) as f64;
    let ys = || series.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y));
    let y_lo = ys().filter(|y| *y > 0.0).fold(f64::INFINITY, f64::min);
    let y_lo = if y_lo.is_finite() {
        10f64.powf(y_lo.log10().floor()).max(0.001)
    } else {
        0.001
    };
    let y_max = 10f64.powf(ys().fold(0.0_f64, f64::max).max(y_lo * 10.0).log10().ceil());
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{} latency over time", phase.as_str()),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0_f64..t_max, (y_lo..y_max).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
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
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|x| e(&x))?;
    }
    Ok(series.len())
}

/// `(name, count)` of every message outcome, in the summary's order.
pub fn outcome_bars(report: &Report) -> [(&'static str, u64); 6] {
    let c = &report.counts;
    [
        ("accepted", c.messages_accepted),
        ("tempfailed", c.messages_tempfailed),
        ("rejected", c.messages_rejected),
        ("connection errors", c.connection_errors),
        ("timeouts", c.timeouts),
        ("protocol errors", c.protocol_errors),
    ]
}

/// Draws one bar per outcome (count, linear axis); returns how many bars
/// are non-empty.
pub fn draw_outcomes<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    report: &Report,
) -> Result<usize, String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let bars = outcome_bars(report);
    let top = bars.iter().map(|b| b.1).max().unwrap_or(0).max(1) as f64 * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption("Outcomes of attempted messages", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d((0..bars.len()).into_segmented(), 0.0_f64..top)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) if *i < bars.len() => {
                bars[*i].0.to_string()
            }
            _ => String::new(),
        })
        .y_desc("messages")
        .draw()
        .map_err(|x| e(&x))?;
    let drawn = bars.iter().filter(|b| b.1 > 0).count();
    chart
        .draw_series(
            bars.iter()
                .enumerate()
                .filter(|(_, b)| b.1 > 0)
                .map(|(i, b)| {
                    let color = if i == 0 {
                        Palette99::pick(2).to_rgba()
                    } else {
                        Palette99::pick(0).to_rgba()
                    };
                    let mut bar = Rectangle::new(
                        [
                            (SegmentValue::Exact(i), 0.0),
                            (SegmentValue::Exact(i + 1), b.1 as f64),
                        ],
                        color.filled(),
                    );
                    bar.set_margin(0, 0, 12, 12);
                    bar
                }),
        )
        .map_err(|x| e(&x))?;
    Ok(drawn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_axis_labels_read_as_percentiles() {
        assert_eq!(nines_label(&1.0), "0%");
        assert_eq!(nines_label(&10.0), "90%");
        assert_eq!(nines_label(&1000.0), "99.9%");
    }
}
