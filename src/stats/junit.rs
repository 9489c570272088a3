//! `--junit FILE` (on `blast`, `bench` and `merge`): the run's checks as
//! JUnit XML, so GitLab, Jenkins and GitHub show them as test results.
//!
//! One `<testsuites>` holding one `<testsuite>` (`name` `smtpstorm.<role>`)
//! with a test case per check: each `--assert` (classname
//! `smtpstorm.assert`, named by its expression), each `--baseline`
//! comparison (`smtpstorm.baseline`), and the run itself
//! (`smtpstorm.run`: valid, and at least one message accepted for a blast
//! run). A failed check carries `<failure type=... message="measured X,
//! threshold Y">`; the measured value and threshold of every check, passed
//! or not, are suite properties (`<name>: measured`, `<name>: threshold`)
//! and lines of `system-out`. Test names stay the same from run to run (the
//! measured value is not in them), so CI tracks each check's history.
//!
//! Invariants: the document follows the Apache Ant JUnit schema (the one
//! CI servers read; `tests/data/junit.xsd`): required attributes always
//! present, `timestamp` in ISO 8601 without a zone (UTC), counts that add
//! up (`tests` = test cases, `failures` = failed ones, `errors` 0). Every
//! text is XML-escaped and characters XML cannot carry are dropped.

use std::fmt::Write as _;
use std::path::Path;

use super::assert::parse as parse_assertion;
use super::merge::BaselineCheck;
use super::report::{Report, Role};
use super::units::{format_rate, format_unix_iso, format_us};

/// Errors of writing the JUnit file.
#[derive(Debug, thiserror::Error)]
pub enum JunitError {
    #[error("cannot write --junit {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// One test case.
struct Case {
    classname: &'static str,
    name: String,
    measured: String,
    threshold: String,
    /// `(type, message)` of a failure.
    failure: Option<(&'static str, String)>,
}

/// `s` escaped for XML text and attributes; characters XML 1.0 cannot
/// hold (most C0 controls) are dropped.
pub fn escape_xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

fn cases(report: &Report, baseline: &[BaselineCheck]) -> Vec<Case> {
    let mut out = Vec::new();
    for a in &report.assertions {
        let parsed = parse_assertion(&a.expr).ok();
        let measured = match (a.value, &parsed) {
            (None, _) => "no data".to_string(),
            (Some(v), Some(p)) => p.format_value(v),
            (Some(v), None) => format!("{v}"),
        };
        let threshold = parsed.map(|p| p.format_threshold()).unwrap_or_default();
        out.push(Case {
            classname: "smtpstorm.assert",
            name: a.expr.clone(),
            failure: (!a.ok).then(|| {
                (
                    "assertion",
                    format!("measured {measured}, threshold {threshold}"),
                )
            }),
            measured,
            threshold,
        });
    }
    for b in baseline {
        let unit = |v: f64| {
            if b.metric.starts_with("rate(") {
                format!("{}/s", format_rate(v))
            } else {
                format_us(v)
            }
        };
        let measured = format!(
            "{} (baseline {}, {:+.1}% worse)",
            unit(b.current),
            unit(b.baseline),
            b.change_pct
        );
        let threshold = format!("at most {}% worse", b.max_regression_pct);
        out.push(Case {
            classname: "smtpstorm.baseline",
            name: b.name(),
            failure: (!b.ok).then(|| {
                (
                    "regression",
                    format!("measured {measured}, threshold {threshold}"),
                )
            }),
            measured,
            threshold,
        });
    }
    out.push(Case {
        classname: "smtpstorm.run",
        name: "the run is valid".into(),
        measured: if report.valid {
            "valid".into()
        } else {
            report.invalid_reasons.join("; ")
        },
        threshold: "valid".into(),
        failure: (!report.valid).then(|| ("invalid", report.invalid_reasons.join("; "))),
    });
    if report.role == Role::Blast {
        let c = &report.counts;
        out.push(Case {
            classname: "smtpstorm.run",
            name: "the target accepted messages".into(),
            measured: format!(
                "{} of {} accepted",
                c.messages_accepted, c.messages_attempted
            ),
            threshold: "at least 1, failures within --max-failed and --max-outage".into(),
            failure: (!report.failed_reasons.is_empty() || c.messages_accepted == 0).then(|| {
                let why = if report.failed_reasons.is_empty() {
                    format!(
                        "the target accepted none of {} messages attempted",
                        c.messages_attempted
                    )
                } else {
                    report.failed_reasons.join("; ")
                };
                let kind = if c.messages_accepted == 0 {
                    "nothing-accepted"
                } else {
                    "failed-run"
                };
                (kind, why)
            }),
        });
    }
    out
}

/// The JUnit document of `report` and its `baseline` comparisons.
pub fn junit_string(report: &Report, baseline: &[BaselineCheck]) -> String {
    let cases = cases(report, baseline);
    let failures = cases.iter().filter(|c| c.failure.is_some()).count();
    let role = match report.role {
        Role::Blast => "blast",
        Role::Sink => "sink",
    };
    let host = if report.host.hostname.trim().is_empty() {
        "localhost"
    } else {
        report.host.hostname.trim()
    };
    let mut o = String::with_capacity(4096);
    let _ = writeln!(o, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    let _ = writeln!(o, "<testsuites>");
    let _ = writeln!(
        o,
        "  <testsuite package=\"smtpstorm\" id=\"0\" name=\"smtpstorm.{role}\" timestamp=\"{}\" hostname=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"0\" time=\"{:.3}\">",
        format_unix_iso(report.started_at_unix),
        escape_xml(host),
        cases.len(),
        report.duration_secs.max(0.0)
    );
    let _ = writeln!(o, "    <properties>");
    let mut prop = |name: &str, value: &str| {
        let _ = writeln!(
            o,
            "      <property name=\"{}\" value=\"{}\"/>",
            escape_xml(name),
            escape_xml(value)
        );
    };
    prop("smtpstorm.version", &report.version);
    prop(
        "target",
        report
            .config
            .get("target")
            .and_then(|t| t.as_str())
            .unwrap_or(""),
    );
    prop(
        "messages_per_sec",
        &format!("{:.1}", report.rates.messages_per_sec),
    );
    for c in &cases {
        prop(&format!("{}: measured", c.name), &c.measured);
        prop(&format!("{}: threshold", c.name), &c.threshold);
    }
    let _ = writeln!(o, "    </properties>");
    for c in &cases {
        let _ = write!(
            o,
            "    <testcase classname=\"{}\" name=\"{}\" time=\"0\"",
            c.classname,
            escape_xml(&c.name)
        );
        match &c.failure {
            None => {
                let _ = writeln!(o, "/>");
            }
            Some((kind, message)) => {
                let _ = writeln!(
                    o,
                    ">\n      <failure type=\"{kind}\" message=\"{}\">{}: {}</failure>\n    </testcase>",
                    escape_xml(message),
                    escape_xml(&c.name),
                    escape_xml(message)
                );
            }
        }
    }
    let mut out_text = String::new();
    for c in &cases {
        let _ = writeln!(
            out_text,
            "{} {}: measured {}, threshold {}",
            if c.failure.is_some() { "FAIL" } else { "ok  " },
            c.name,
            c.measured,
            c.threshold
        );
    }
    let _ = writeln!(o, "    <system-out>{}</system-out>", escape_xml(&out_text));
    let _ = writeln!(o, "    <system-err></system-err>");
    let _ = writeln!(o, "  </testsuite>");
    let _ = writeln!(o, "</testsuites>");
    o
}

/// Writes [`junit_string`] to `path`.
pub fn write_junit(
    report: &Report,
    baseline: &[BaselineCheck],
    path: &Path,
) -> Result<(), JunitError> {
    std::fs::write(path, junit_string(report, baseline)).map_err(|source| JunitError::Write {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::merge::baseline_checks;
    use crate::stats::report::tests::sample_blast_report;

    #[test]
    fn each_assertion_and_baseline_check_is_a_test_case_and_the_counts_add_up() {
        let mut r = sample_blast_report();
        r.evaluate_assertions(
            &crate::stats::parse_assertions(&["errors == 0", "p99(message) < 1ms"]).unwrap(),
        );
        let mut base = r.clone();
        base.rates.messages_per_sec *= 2.0;
        let checks = baseline_checks(&r, &base, 10.0);
        let xml = junit_string(&r, &checks);
        assert!(
            xml.contains("tests=\"7\" failures=\"2\" errors=\"0\""),
            "{xml}"
        );
        assert!(xml.contains(
            "<testcase classname=\"smtpstorm.assert\" name=\"errors == 0\" time=\"0\"/>"
        ));
        assert!(
            xml.contains("name=\"p99(message) &lt; 1ms\""),
            "escaped: {xml}"
        );
        assert!(
            xml.contains("<failure type=\"assertion\" message=\"measured 990"),
            "{xml}"
        );
        assert!(xml.contains("threshold &lt; 1.00ms"), "{xml}");
        assert!(xml.contains("name=\"rate(messages) no more than 10% worse than the baseline\""));
        assert!(xml.contains("<failure type=\"regression\""));
        assert!(xml.contains("<property name=\"errors == 0: measured\" value=\"0\"/>"));
        assert!(xml.contains("timestamp=\"2023-11-14T22:13:20\""), "{xml}");
    }

    #[test]
    fn text_that_xml_cannot_hold_is_dropped_and_markup_escaped() {
        assert_eq!(
            escape_xml("a<b>&\"'\u{1}\u{7}c\n"),
            "a&lt;b&gt;&amp;&quot;&apos;c\n"
        );
    }
}
