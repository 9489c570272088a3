//! `--csv FILE`: the timeline as CSV, one row per second, for spreadsheets
//! and plotting tools.
//!
//! Columns: `t` (seconds after the warmup), `requested` and `achieved`
//! (open loop: messages the schedule asked for, messages given to a
//! connection; empty in closed loop), `messages` (accepted), `sessions`,
//! `errors`, `failed`, then for each phase with per-second latency, in
//! phase order, `<phase>_p50_us`, `<phase>_p90_us`, `<phase>_p99_us` and
//! `<phase>_max_us` (empty where the second has no value, or where a merged
//! report shares a second between instances and keeps no percentile).
//!
//! Invariants: one header line, then one line per timeline point in order;
//! every line has as many fields as the header; nothing is quoted (no
//! field holds a comma).

use std::io::Write;

use super::report::Report;
use crate::smtp::Phase;

/// Writes `report`'s timeline as CSV.
pub fn write_csv(report: &Report, w: &mut impl Write) -> std::io::Result<()> {
    let phases: Vec<&str> = Phase::ALL
        .iter()
        .map(|p| p.as_str())
        .filter(|p| report.timeline.iter().any(|t| t.latency.contains_key(*p)))
        .collect();
    let mut header = String::from("t,requested,achieved,messages,sessions,errors,failed");
    for p in &phases {
        for s in ["p50_us", "p90_us", "p99_us", "max_us"] {
            header.push_str(&format!(",{p}_{s}"));
        }
    }
    writeln!(w, "{header}")?;
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    for t in &report.timeline {
        let mut line = format!(
            "{},{},{},{},{},{},{}",
            t.t,
            t.requested.map(|r| r.to_string()).unwrap_or_default(),
            opt(t.achieved),
            t.messages,
            t.sessions,
            t.errors,
            t.failed
        );
        for p in &phases {
            match t.latency.get(*p) {
                Some(l) => line.push_str(&format!(
                    ",{},{},{},{}",
                    opt(l.p50_us),
                    opt(l.p90_us),
                    opt(l.p99_us),
                    l.max_us
                )),
                None => line.push_str(",,,,"),
            }
        }
        writeln!(w, "{line}")?;
    }
    Ok(())
}

/// Writes the CSV to `path`.
pub fn write_csv_file(report: &Report, path: &std::path::Path) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    write_csv(report, &mut w)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{IntervalLatency, TimelinePoint};

    #[test]
    fn one_row_per_second_with_as_many_fields_as_the_header() {
        let host = crate::stats::HostInfo {
            cpu_model: String::new(),
            cores: 1,
            kernel: String::new(),
            hostname: String::new(),
        };
        let mut r = Report::build(crate::stats::ReportInput {
            role: crate::stats::Role::Blast,
            config: serde_json::json!({}),
            started_at_unix: 0.0,
            duration_secs: 2.0,
            measurements: Default::default(),
            timeline: Vec::new(),
            invalid_reasons: Vec::new(),
            cpu: Default::default(),
            host: Some(host),
        })
        .unwrap();
        let lat = IntervalLatency {
            count: 3,
            p50_us: Some(10),
            p90_us: Some(20),
            p99_us: Some(30),
            max_us: 40,
        };
        r.timeline = vec![
            TimelinePoint {
                t: 0,
                messages: 5,
                requested: Some(5.5),
                achieved: Some(5),
                latency: [("message".to_string(), lat)].into(),
                ..Default::default()
            },
            TimelinePoint {
                t: 1,
                messages: 2,
                errors: 1,
                failed: 1,
                ..Default::default()
            },
        ];
        let mut out = Vec::new();
        write_csv(&r, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "t,requested,achieved,messages,sessions,errors,failed,message_p50_us,message_p90_us,message_p99_us,message_max_us",
                "0,5.5,5,5,0,0,0,10,20,30,40",
                "1,,,2,0,1,1,,,,",
            ]
        );
    }
}
