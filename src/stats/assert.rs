//! `--assert` expressions: parsing and evaluation against a [`Report`].
//!
//! Grammar (whitespace between tokens is free):
//!
//! ```text
//! assertion := metric op threshold
//! metric    := pNN(phase) | pNN.N(phase) | min(phase) | max(phase) | mean(phase)
//!            | rate(messages|sessions|bytes)
//!            | errors | accepted | tempfailed | rejected | timeouts | attempted
//!            | connection_errors | protocol_errors | sessions | verify_corrupt
//! op        := < | <= | > | >= | == | !=
//! threshold := NUMBER unit            for latency metrics, unit in us|µs|ms|s
//!            | NUMBER[k|M]            for rates and counts
//!            | NUMBER%                for counts: percent of messages_attempted
//! ```
//!
//! Invariants: parsing never panics; a parse error is one line naming the
//! expression and the expected form. Evaluation yields `{expr, ok, value}`
//! where `value` is in µs for latencies, per second for rates, a count, or a
//! percentage for `%` thresholds; a latency of a phase with no data is
//! `value: null, ok: false`.

use super::report::{AssertionResult, Report};
use super::units::format_us;
use crate::smtp::Phase;

/// Errors of parsing assertions.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AssertError {
    #[error("invalid assertion `{expr}`: {reason} (expected e.g. `p99(message) < 5ms`, `rate(messages) >= 20000`, `errors == 0`, `tempfailed <= 1%`)")]
    Parse { expr: String, reason: String },
}

/// Comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Op {
    /// The operator as written: `<`, `<=`, `>`, `>=`, `==`, `!=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }

    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Lt => a < b,
            Op::Le => a <= b,
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Eq => (a - b).abs() <= f64::EPSILON * a.abs().max(b.abs()).max(1.0),
            Op::Ne => !Op::Eq.holds(a, b),
        }
    }
}

/// Which statistic of a latency histogram.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LatencyStat {
    /// Percentile, 0..=100.
    Percentile(f64),
    Min,
    Max,
    Mean,
}

/// Which rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateKind {
    Messages,
    Sessions,
    Bytes,
}

/// Which counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CountKind {
    /// connection_errors + timeouts + protocol_errors.
    Errors,
    Accepted,
    TempFailed,
    Rejected,
    Timeouts,
    Attempted,
    ConnectionErrors,
    ProtocolErrors,
    Sessions,
    VerifyCorrupt,
}

/// What an assertion measures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Metric {
    Latency { stat: LatencyStat, phase: Phase },
    Rate(RateKind),
    Count(CountKind),
}

/// A parsed assertion.
#[derive(Clone, Debug, PartialEq)]
pub struct Assertion {
    /// The expression as the user wrote it.
    pub expr: String,
    pub metric: Metric,
    pub op: Op,
    /// In µs for latencies, per second for rates, a count, or a percentage
    /// when `percent` is set.
    pub threshold: f64,
    /// The threshold is a percent of `messages_attempted` (counts only).
    pub percent: bool,
}

impl std::str::FromStr for Assertion {
    type Err = AssertError;
    fn from_str(s: &str) -> Result<Self, AssertError> {
        parse(s)
    }
}

/// Parses one assertion expression.
pub fn parse(expr: &str) -> Result<Assertion, AssertError> {
    let err = |reason: String| AssertError::Parse {
        expr: expr.to_string(),
        reason,
    };
    let (lhs, op, rhs) = split_op(expr)
        .ok_or_else(|| err("no comparison operator (<, <=, >, >=, ==, !=)".into()))?;
    let lhs = lhs.trim();
    let rhs = rhs.trim();
    if lhs.is_empty() {
        return Err(err("missing metric before the operator".into()));
    }
    if rhs.is_empty() {
        return Err(err("missing threshold after the operator".into()));
    }
    let metric = parse_metric(lhs).map_err(err)?;
    let (threshold, percent) = parse_threshold(&metric, rhs).map_err(err)?;
    Ok(Assertion {
        expr: expr.trim().to_string(),
        metric,
        op,
        threshold,
        percent,
    })
}

/// Parses several expressions, stopping at the first error.
pub fn parse_all<S: AsRef<str>>(exprs: &[S]) -> Result<Vec<Assertion>, AssertError> {
    exprs.iter().map(|e| parse(e.as_ref())).collect()
}

fn split_op(s: &str) -> Option<(&str, Op, &str)> {
    let i = s.find(['<', '>', '=', '!'])?;
    let rest = &s[i..];
    let (op, len) = if rest.starts_with("<=") {
        (Op::Le, 2)
    } else if rest.starts_with(">=") {
        (Op::Ge, 2)
    } else if rest.starts_with("==") {
        (Op::Eq, 2)
    } else if rest.starts_with("!=") {
        (Op::Ne, 2)
    } else if rest.starts_with('<') {
        (Op::Lt, 1)
    } else if rest.starts_with('>') {
        (Op::Gt, 1)
    } else {
        return None;
    };
    let rhs = &s[i + len..];
    if rhs.contains(['<', '>', '=', '!']) {
        return None;
    }
    Some((&s[..i], op, rhs))
}

fn parse_phase(s: &str) -> Result<Phase, String> {
    let s = s.trim();
    Phase::ALL
        .into_iter()
        .find(|p| p.as_str() == s)
        .ok_or_else(|| {
            let names: Vec<_> = Phase::ALL.iter().map(|p| p.as_str()).collect();
            format!("unknown phase `{s}` (one of {})", names.join(", "))
        })
}

fn parse_metric(s: &str) -> Result<Metric, String> {
    if let Some(open) = s.find('(') {
        let name = s[..open].trim();
        let arg = s[open + 1..]
            .trim_end()
            .strip_suffix(')')
            .ok_or_else(|| format!("missing `)` in `{s}`"))?
            .trim();
        let stat = match name {
            "rate" => {
                return Ok(Metric::Rate(match arg {
                    "messages" => RateKind::Messages,
                    "sessions" => RateKind::Sessions,
                    "bytes" => RateKind::Bytes,
                    _ => {
                        return Err(format!(
                            "unknown rate `{arg}` (one of messages, sessions, bytes)"
                        ))
                    }
                }))
            }
            "min" => LatencyStat::Min,
            "max" => LatencyStat::Max,
            "mean" => LatencyStat::Mean,
            _ => {
                let digits = name
                    .strip_prefix('p')
                    .filter(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit() || c == '.'))
                    .ok_or_else(|| {
                        format!("unknown function `{name}` (pNN, pNN.N, min, max, mean, rate)")
                    })?;
                let pct: f64 = digits
                    .parse()
                    .map_err(|_| format!("bad percentile `{name}`"))?;
                if !(0.0..=100.0).contains(&pct) {
                    return Err(format!("percentile `{name}` is not within p0..p100"));
                }
                LatencyStat::Percentile(pct)
            }
        };
        return Ok(Metric::Latency {
            stat,
            phase: parse_phase(arg)?,
        });
    }
    let kind = match s {
        "errors" => CountKind::Errors,
        "accepted" => CountKind::Accepted,
        "tempfailed" => CountKind::TempFailed,
        "rejected" => CountKind::Rejected,
        "timeouts" => CountKind::Timeouts,
        "attempted" => CountKind::Attempted,
        "connection_errors" => CountKind::ConnectionErrors,
        "protocol_errors" => CountKind::ProtocolErrors,
        "sessions" => CountKind::Sessions,
        "verify_corrupt" => CountKind::VerifyCorrupt,
        _ => {
            return Err(format!(
            "unknown metric `{s}` (errors, accepted, tempfailed, rejected, timeouts, attempted, \
                 connection_errors, protocol_errors, sessions, verify_corrupt, or a function)"
        ))
        }
    };
    Ok(Metric::Count(kind))
}

fn split_number(s: &str) -> Result<(f64, &str), String> {
    let end = s
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_digit() || *c == '.' || *c == '_'))
        .map_or(s.len(), |(i, _)| i);
    let num: String = s[..end].chars().filter(|c| *c != '_').collect();
    let v: f64 = num.parse().map_err(|_| format!("bad number in `{s}`"))?;
    Ok((v, s[end..].trim()))
}

fn parse_threshold(metric: &Metric, s: &str) -> Result<(f64, bool), String> {
    let (v, suffix) = split_number(s)?;
    match metric {
        Metric::Latency { .. } => {
            let scale = match suffix {
                "us" | "µs" => 1.0,
                "ms" => 1e3,
                "s" => 1e6,
                "" => {
                    return Err(format!(
                        "latency threshold `{s}` needs a unit (us, ms or s)"
                    ))
                }
                u => return Err(format!("unknown unit `{u}` (us, ms or s)")),
            };
            Ok((v * scale, false))
        }
        Metric::Rate(_) | Metric::Count(_) => {
            let is_count = matches!(metric, Metric::Count(_));
            match suffix {
                "" => Ok((v, false)),
                "k" => Ok((v * 1e3, false)),
                "M" => Ok((v * 1e6, false)),
                "%" if is_count => Ok((v, true)),
                "%" => Err("a rate cannot be a percentage".into()),
                u => Err(format!(
                    "unknown suffix `{u}` (k, M{})",
                    if is_count { " or %" } else { "" }
                )),
            }
        }
    }
}

impl Assertion {
    /// Measures the metric in `report`.
    pub fn value(&self, report: &Report) -> Option<f64> {
        let c = &report.counts;
        match self.metric {
            Metric::Latency { stat, phase } => {
                let s = report.latency.get(phase.as_str()).filter(|s| s.count > 0)?;
                Some(match stat {
                    LatencyStat::Percentile(p) => s.value_at_percentile(p)? as f64,
                    LatencyStat::Min => s.min_us as f64,
                    LatencyStat::Max => s.max_us as f64,
                    LatencyStat::Mean => s.mean_us,
                })
            }
            Metric::Rate(k) => Some(match k {
                RateKind::Messages => report.rates.messages_per_sec,
                RateKind::Sessions => report.rates.sessions_per_sec,
                RateKind::Bytes => report.rates.bytes_per_sec,
            }),
            Metric::Count(k) => {
                let n = match k {
                    CountKind::Errors => c.errors(),
                    CountKind::Accepted => c.messages_accepted,
                    CountKind::TempFailed => c.messages_tempfailed,
                    CountKind::Rejected => c.messages_rejected,
                    CountKind::Timeouts => c.timeouts,
                    CountKind::Attempted => c.messages_attempted,
                    CountKind::ConnectionErrors => c.connection_errors,
                    CountKind::ProtocolErrors => c.protocol_errors,
                    CountKind::Sessions => c.sessions,
                    CountKind::VerifyCorrupt => c.verify_corrupt,
                } as f64;
                if self.percent {
                    if c.messages_attempted == 0 {
                        Some(0.0)
                    } else {
                        Some(100.0 * n / c.messages_attempted as f64)
                    }
                } else {
                    Some(n)
                }
            }
        }
    }

    /// A measured value of this metric for people: latencies with a unit
    /// (`1.92ms`), rates per second, counts as integers or percentages.
    pub fn format_value(&self, v: f64) -> String {
        match self.metric {
            Metric::Latency { .. } => format_us(v),
            Metric::Rate(_) => format!("{v:.1}/s"),
            Metric::Count(_) if self.percent => format!("{v:.2}%"),
            Metric::Count(_) => format!("{v:.0}"),
        }
    }

    /// The threshold for people, with its operator: `< 5.00ms`, `>= 20000.0/s`.
    pub fn format_threshold(&self) -> String {
        format!("{} {}", self.op.as_str(), self.format_value(self.threshold))
    }

    /// Evaluates the assertion: `{expr, ok, value}`.
    pub fn evaluate(&self, report: &Report) -> AssertionResult {
        let value = self.value(report);
        let ok = value.is_some_and(|v| self.op.holds(v, self.threshold));
        AssertionResult {
            expr: self.expr.clone(),
            ok,
            value,
        }
    }
}

// Defined here, not in `report`, so that the report (data) knows nothing of
// the assertion language above it.
impl Report {
    /// Evaluates `assertions` against this report, stores the results in
    /// `assertions` and returns whether all passed.
    pub fn evaluate_assertions(&mut self, assertions: &[Assertion]) -> bool {
        self.assertions = assertions.iter().map(|a| a.evaluate(self)).collect();
        self.assertions.iter().all(|r| r.ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::report::tests::sample_blast_report;

    #[test]
    fn measured_values_are_formatted_in_the_metric_unit() {
        assert_eq!(
            parse("p50(message) < 1us").unwrap().format_value(1924.0),
            "1.92ms"
        );
        assert_eq!(
            parse("rate(messages) >= 5").unwrap().format_value(12.345),
            "12.3/s"
        );
        assert_eq!(
            parse("tempfailed <= 1%").unwrap().format_value(0.5),
            "0.50%"
        );
        assert_eq!(parse("errors == 0").unwrap().format_value(3.0), "3");
        assert_eq!(
            parse("p99(message) <= 5ms").unwrap().format_threshold(),
            "<= 5.00ms"
        );
        assert_eq!(
            parse("tempfailed != 1%").unwrap().format_threshold(),
            "!= 1.00%"
        );
    }

    #[test]
    fn latency_assertions_parse_with_units() {
        let a = parse("p99(message) < 5ms").unwrap();
        assert_eq!(
            a.metric,
            Metric::Latency {
                stat: LatencyStat::Percentile(99.0),
                phase: Phase::Message
            }
        );
        assert_eq!(a.op, Op::Lt);
        assert_eq!(a.threshold, 5000.0);
        assert_eq!(parse("p50(ehlo) <= 200us").unwrap().threshold, 200.0);
        assert_eq!(parse("max(session) < 1s").unwrap().threshold, 1e6);
        assert_eq!(
            parse("p99.9(rcpt)<2.5ms").unwrap().metric,
            Metric::Latency {
                stat: LatencyStat::Percentile(99.9),
                phase: Phase::Rcpt
            }
        );
        assert!(matches!(
            parse("mean(rcpt) < 2ms").unwrap().metric,
            Metric::Latency {
                stat: LatencyStat::Mean,
                ..
            }
        ));
    }

    #[test]
    fn rate_and_count_assertions_parse() {
        assert_eq!(
            parse("rate(messages) >= 20000").unwrap().metric,
            Metric::Rate(RateKind::Messages)
        );
        assert_eq!(parse("rate(sessions) > 10").unwrap().op, Op::Gt);
        assert_eq!(parse("rate(messages) >= 20k").unwrap().threshold, 20_000.0);
        let t = parse("tempfailed <= 1%").unwrap();
        assert!(t.percent);
        assert_eq!(t.threshold, 1.0);
        assert_eq!(
            parse("errors == 0").unwrap().metric,
            Metric::Count(CountKind::Errors)
        );
        assert_eq!(
            parse("rejected < 5").unwrap().metric,
            Metric::Count(CountKind::Rejected)
        );
        assert_eq!(parse("accepted >= 1000").unwrap().threshold, 1000.0);
        assert_eq!(
            parse("timeouts == 0").unwrap().metric,
            Metric::Count(CountKind::Timeouts)
        );
    }

    #[test]
    fn parse_errors_are_one_line_and_name_the_expression() {
        for bad in [
            "p99(message) < 5",
            "p99(mesage) < 5ms",
            "p101(message) < 5ms",
            "foo == 0",
            "errors 0",
            "rate(messages) >= 5%",
            "p99(message < 5ms",
            "< 5ms",
            "errors ==",
            "p99(message) < 5 parsecs",
            "errors == 0 == 1",
            "",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
            assert!(e.contains("expected e.g."), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn evaluation_against_a_report_gives_expr_ok_and_value() {
        let r = sample_blast_report();
        let eval = |s: &str| parse(s).unwrap().evaluate(&r);
        let p99 = eval("p99(message) < 995ms");
        assert!(p99.ok);
        assert!((989_000.0..=991_000.0).contains(&p99.value.unwrap()));
        assert!(!eval("p99(message) < 5ms").ok);
        assert!(eval("rate(messages) >= 100").ok);
        assert!(!eval("rate(messages) > 100").ok);
        assert!(eval("errors == 0").ok);
        let t = eval("tempfailed <= 1%");
        assert!(t.ok);
        assert!((t.value.unwrap() - 100.0 / 1001.0).abs() < 1e-9);
        assert!(!eval("tempfailed == 0").ok);
        assert!(eval("accepted >= 1000").ok);
        assert!(eval("p99.99(message) <= 1.01s").ok);
        let none = eval("p99(ehlo) < 1s");
        assert_eq!(
            none,
            AssertionResult {
                expr: "p99(ehlo) < 1s".into(),
                ok: false,
                value: None
            }
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_on_any_input(s in "\\PC{0,40}") {
            if let Err(e) = parse(&s) {
                proptest::prop_assert!(!e.to_string().contains('\n') || s.contains('\n'));
            }
        }

        #[test]
        fn parse_never_panics_on_near_misses(
            f in "(p[0-9.]{0,5}|max|min|mean|rate|errors|tempfailed)",
            a in "\\(?(message|mail|messages|x|)\\)?",
            op in "(<|<=|>|>=|==|!=|=|!)",
            n in "[0-9.]{0,6}(us|µs|ms|s|k|M|%|x)?",
        ) {
            let _ = parse(&format!("{f}{a} {op} {n}"));
        }
    }

    #[test]
    fn report_stores_assertion_results() {
        let mut r = sample_blast_report();
        let asserts = parse_all(&["errors == 0", "p50(message) > 1s"]).unwrap();
        assert!(!r.evaluate_assertions(&asserts));
        assert!(r.assertions_failed());
        assert_eq!(r.assertions.len(), 2);
        assert!(r.assertions[0].ok);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["assertions"][1]["expr"], "p50(message) > 1s");
        assert_eq!(v["assertions"][1]["ok"], false);
    }
}
