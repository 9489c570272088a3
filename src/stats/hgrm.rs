//! `.hgrm` writer: the percentile distribution text of HdrHistogram's Java
//! `AbstractHistogram.outputPercentileDistribution`, which the usual
//! plotting tools (HistogramLogAnalyzer, hdrhistogram.github.io's plotter,
//! wrk2-style scripts) read.
//!
//! Invariants: the layout is byte-for-byte Java's plain-text format: header
//! `%12s %14s %10s %14s` plus a blank line, rows `%12.{sigfig}f %2.12f %10d
//! %14.2f` (the 100% row without the last column), then the `#[Mean ...]`,
//! `#[Max ...]` and `#[Buckets ...]` footer. Values are divided by the
//! scaling ratio (1000 turns our µs into ms). An empty histogram prints the
//! header and footer only.

use std::io::{self, Write};

use std::path::Path;

use hdrhistogram::Histogram;

use super::recorder::{new_histogram, TICKS_PER_HALF_DISTANCE};
use super::report::Report;
use crate::smtp::Phase;

/// Divide µs by this to print ms.
pub const US_TO_MS: f64 = 1000.0;

/// Java's `subBucketCount` for a histogram of `sigfig` significant digits
/// (`2 * 10^sigfig` rounded up to a power of two).
fn sub_bucket_count(sigfig: u8) -> u64 {
    (2 * 10u64.pow(u32::from(sigfig))).next_power_of_two()
}

/// Writes the percentile distribution of `h`, values divided by `scale`
/// (use [`US_TO_MS`] for our µs histograms).
pub fn write_hgrm<W: Write>(h: &Histogram<u64>, scale: f64, out: &mut W) -> io::Result<()> {
    let digits = usize::from(h.sigfig());
    write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    if !h.is_empty() {
        let mut total = 0u64;
        for v in h.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
            total += v.count_since_last_iteration();
            let value = v.value_iterated_to() as f64 / scale;
            let q = v.quantile_iterated_to();
            if q < 1.0 {
                writeln!(
                    out,
                    "{:12.digits$} {:2.12} {:10} {:14.2}",
                    value,
                    q,
                    total,
                    1.0 / (1.0 - q)
                )?;
            } else {
                writeln!(out, "{:12.digits$} {:2.12} {:10}", value, q, total)?;
            }
        }
    }
    let (mean, stdev) = if h.is_empty() {
        (0.0, 0.0)
    } else {
        (h.mean() / scale, h.stdev() / scale)
    };
    writeln!(
        out,
        "#[Mean    = {:12.digits$}, StdDeviation   = {:12.digits$}]",
        mean, stdev
    )?;
    writeln!(
        out,
        "#[Max     = {:12.digits$}, Total count    = {:12}]",
        h.max() as f64 / scale,
        h.len()
    )?;
    writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_bucket_count(h.sigfig())
    )?;
    Ok(())
}

/// Writes the `.hgrm` of `phase` of `report` to `path` (values in ms),
/// the file behind `blast --hgrm FILE` (with `Phase::Message`). A phase
/// without data gives a file with the header and footer only.
pub fn write_hgrm_file(report: &Report, phase: Phase, path: &Path) -> io::Result<()> {
    let empty;
    let h = match report.histogram(phase) {
        Some(h) => h,
        None => {
            empty = new_histogram();
            &empty
        }
    };
    let mut out = io::BufWriter::new(std::fs::File::create(path)?);
    write_hgrm(h, US_TO_MS, &mut out)?;
    out.flush()
}

/// The distribution as a `String` (µs histogram printed in ms).
pub fn hgrm_string(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    write_hgrm(h, US_TO_MS, &mut buf).expect("writing to a Vec cannot fail");
    String::from_utf8(buf).expect("the distribution is ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_to_ten_thousand() -> Histogram<u64> {
        let mut h = new_histogram();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn header_rows_and_footer_follow_the_java_layout() {
        let text = hgrm_string(&one_to_ten_thousand());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "       Value     Percentile TotalCount 1/(1-Percentile)"
        );
        assert_eq!(lines[1], "");
        assert_eq!(
            lines[2],
            "       0.001 0.000000000000          1           1.00"
        );
        // Every row: value, percentile with 12 decimals, cumulative count, 1/(1-p).
        let rows: Vec<&str> = lines[2..]
            .iter()
            .copied()
            .take_while(|l| !l.starts_with('#'))
            .collect();
        assert!(rows.len() > 20);
        for r in &rows[..rows.len() - 1] {
            assert_eq!(r.len(), 12 + 1 + 14 + 1 + 10 + 1 + 14, "{r:?}");
        }
        let last = rows[rows.len() - 1];
        assert!(last.ends_with(" 1.000000000000      10000"), "{last:?}");
        assert!(rows
            .iter()
            .any(|r| r.contains(" 0.500000000000 ") && r.ends_with("2.00")));
        let footer: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with('#'))
            .collect();
        assert_eq!(footer.len(), 3);
        // Mean and deviation use each bucket's median-equivalent value, as in Java.
        assert!(
            footer[0].starts_with("#[Mean    =        5.00"),
            "{}",
            footer[0]
        );
        assert!(
            footer[0].contains(", StdDeviation   =        2.88"),
            "{}",
            footer[0]
        );
        assert_eq!(
            footer[1],
            "#[Max     =       10.007, Total count    =        10000]"
        );
        assert!(footer[2].starts_with("#[Buckets = "), "{}", footer[2]);
        assert!(
            footer[2].ends_with("SubBuckets     =         2048]"),
            "{}",
            footer[2]
        );
    }

    #[test]
    fn cumulative_counts_are_monotonic_and_end_at_the_total() {
        let text = hgrm_string(&one_to_ten_thousand());
        let counts: Vec<u64> = text
            .lines()
            .skip(2)
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().nth(2).unwrap().parse().unwrap())
            .collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*counts.last().unwrap(), 10_000);
    }

    #[test]
    fn hgrm_file_of_a_report_phase_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.hgrm");
        let r = crate::stats::report::tests::sample_blast_report();
        write_hgrm_file(&r, Phase::Message, &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("#[Max     =     1000.447, Total count    =         1000]"),
            "{text}"
        );
    }

    #[test]
    fn empty_histogram_prints_header_and_footer_only() {
        let text = hgrm_string(&new_histogram());
        assert_eq!(text.lines().count(), 5);
        assert!(text.contains("Total count    =            0]"));
    }
}
