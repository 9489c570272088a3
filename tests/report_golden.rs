//! The JSON report is a contract: the same measurements give the same bytes.
//! A report built from fixed measurements (every field the roles fill:
//! latency, uncorrected latency, schedule lag, open loop, reply codes,
//! timeline, assertions, invalid reasons, a merge of two instances, and a
//! sink report) is compared byte for byte with `tests/data/report-golden.json`,
//! written once by the code before `src/stats` was reorganised.
//!
//! `SMTPSTORM_BLESS=1` rewrites the file (only when the JSON layout is meant
//! to change, which also changes `schema_version` and `schemas/*.json`).

use std::time::Duration;

use smtpstorm::smtp::{CommandKind, Outcome, Phase};
use smtpstorm::stats::{
    merge_reports, parse_assertions, Bottleneck, CpuUsage, HostInfo, IntervalMerger,
    OpenLoopReport, Recorder, Report, ReportInput, Role,
};

fn host() -> HostInfo {
    HostInfo {
        cpu_model: "Test CPU @ 1.00GHz".into(),
        cores: 2,
        kernel: "6.1.0-test".into(),
        hostname: "golden".into(),
    }
}

fn cpu(user_secs: f64, sys_secs: f64) -> CpuUsage {
    CpuUsage {
        user_secs,
        sys_secs,
        ..Default::default()
    }
}

/// Two threads, three one-second intervals, every phase and counter.
fn blast_report(seed: u64) -> Report {
    let mut merger = IntervalMerger::new();
    for thread in 0..2u64 {
        let mut r = Recorder::new();
        for sec in 0..3u64 {
            for i in 0..40u64 {
                let x = (i * 37 + sec * 11 + thread * 5 + seed) % 97;
                r.count_session(i % 3 == 0);
                if i % 9 == 0 {
                    r.count_tls_resumed();
                }
                for (k, phase) in Phase::ALL.into_iter().enumerate() {
                    r.record(phase, 50 + x * (k as u64 + 1) * 13);
                }
                r.record_uncorrected(Phase::Message, 40 + x * 90);
                r.record_uncorrected(Phase::Session, 400 + x * 100);
                r.record_schedule_lag(x * 3);
                r.count_outcome(match i % 13 {
                    7 => Outcome::TempFailed,
                    11 => Outcome::Rejected,
                    12 if sec == 2 => Outcome::Timeout,
                    _ => Outcome::Accepted,
                });
                r.count_recipients(2);
                r.count_bytes(4096 + x);
                r.count_reply(CommandKind::Mail, 250);
                r.count_reply(CommandKind::Rcpt, if i % 13 == 7 { 451 } else { 250 });
                r.count_reply(CommandKind::Quit, 221);
            }
            r.count_session_error(Outcome::ConnectionError);
            merger.absorb(&r.take_interval(Duration::from_secs(sec), Duration::from_secs(1)));
        }
        let _ = r.finish();
    }
    let (measurements, timeline) = merger.into_parts();
    let mut report = Report::build(ReportInput {
        role: Role::Blast,
        config: serde_json::json!({"target": "127.0.0.1:2525", "rate": 80.0, "connections": 4}),
        started_at_unix: 1_763_800_000.25 + seed as f64,
        duration_secs: 3.0,
        measurements,
        timeline,
        invalid_reasons: if seed == 0 {
            vec![]
        } else {
            vec!["the blaster was saturated".into()]
        },
        cpu: cpu(1.25, 0.5),
        host: Some(host()),
    })
    .unwrap();
    report.open_loop = Some(OpenLoopReport {
        requested_per_sec: 80.0,
        achieved_per_sec: 79.5,
        messages_due: 240,
        messages_sent: 239,
        messages_unsent: 1,
        messages_waited: 3,
        max_backlog: 2,
        blaster_busy_pct: 12.5,
        bottleneck: Bottleneck::Target,
    });
    report.evaluate_assertions(
        &parse_assertions(&[
            "p99(message) < 5ms",
            "errors == 0",
            "tempfailed <= 10%",
            "p99(auth) < 1s",
            "rate(messages) >= 50",
        ])
        .unwrap(),
    );
    report
}

fn sink_report() -> Report {
    let mut r = Recorder::new();
    for i in 0..20 {
        r.count_session(i % 4 == 0);
        r.count_outcome(if i < 18 {
            Outcome::Accepted
        } else {
            Outcome::Rejected
        });
        r.count_recipients(1);
        r.count_bytes(1000 + i);
        r.count_verify(i != 3);
        r.count_reply(CommandKind::Dot, if i < 18 { 250 } else { 550 });
    }
    r.count_session_error(Outcome::ConnectionError);
    Report::build(ReportInput {
        role: Role::Sink,
        config: serde_json::json!({"listen": ["127.0.0.1:2525"]}),
        started_at_unix: 1_763_800_000.0,
        duration_secs: 2.0,
        measurements: r.finish(),
        timeline: vec![],
        invalid_reasons: vec![],
        cpu: cpu(0.25, 0.125),
        host: Some(host()),
    })
    .unwrap()
}

/// The three documents, one after the other.
fn golden_text() -> String {
    let a = blast_report(0);
    let merged = merge_reports(
        &[a.clone(), blast_report(1)],
        &parse_assertions(&["accepted >= 100", "p50(ehlo) < 1ms"]).unwrap(),
    )
    .unwrap();
    [a, merged, sink_report()]
        .iter()
        .map(|r| r.to_json() + "\n")
        .collect()
}

#[test]
fn a_report_of_fixed_measurements_is_byte_identical_to_the_golden_file() {
    let path = format!(
        "{}/tests/data/report-golden.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = golden_text();
    if std::env::var_os("SMTPSTORM_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap();
    assert!(text.len() > 10_000, "the documents carry histograms");
    if text != want {
        let line = text
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        panic!(
            "the JSON differs from {path} at line {}: got {:?}, want {:?}",
            line + 1,
            text.lines().nth(line),
            want.lines().nth(line)
        );
    }
}
