//! The JSON reports validate against the committed JSON Schemas
//! (`schemas/blast.schema.json`, `schemas/sink.schema.json`), and documents
//! that break the contract do not.

use std::time::Duration;

use serde_json::Value;
use smtpstorm::smtp::{CommandKind, Outcome, Phase};
use smtpstorm::stats::{
    merge_reports, parse_assertions, CpuUsage, IntervalMerger, Recorder, Report, ReportInput, Role,
};

fn schema(name: &str) -> jsonschema::Validator {
    let path = format!("{}/schemas/{name}.schema.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let schema: Value = serde_json::from_str(&text).unwrap();
    assert!(
        jsonschema::meta::is_valid(&schema),
        "{path} is no valid JSON Schema"
    );
    jsonschema::draft202012::new(&schema).unwrap()
}

#[track_caller]
fn assert_valid(v: &jsonschema::Validator, doc: &Value) {
    let errors: Vec<String> = v
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(errors.is_empty(), "schema errors: {errors:#?}");
}

/// A blast run with two threads, one-second snapshots, open-loop figures.
fn blast_report() -> Report {
    let mut merger = IntervalMerger::new();
    for thread in 0..2u64 {
        let mut r = Recorder::new();
        for sec in 0..3u64 {
            for i in 0..50u64 {
                r.count_session(i % 2 == 0);
                r.record(Phase::Connect, 80 + i);
                r.record(Phase::Banner, 120 + i);
                r.record(Phase::Ehlo, 150 + thread);
                r.record(Phase::Mail, 100 + i);
                r.record(Phase::Rcpt, 110 + i);
                r.record(Phase::Data, 90 + i);
                r.record(Phase::Message, 1000 + 10 * i);
                r.record_uncorrected(Phase::Message, 900 + 10 * i);
                r.record(Phase::Session, 5000 + i);
                r.record_uncorrected(Phase::Session, 4000 + i);
                r.record_schedule_lag(i);
                r.count_outcome(if i == 7 {
                    Outcome::TempFailed
                } else {
                    Outcome::Accepted
                });
                r.count_recipients(2);
                r.count_bytes(4096);
                r.count_reply(CommandKind::Mail, 250);
                r.count_reply(CommandKind::Rcpt, if i == 7 { 451 } else { 250 });
            }
            merger.absorb(&r.take_interval(Duration::from_secs(sec), Duration::from_secs(1)));
        }
        let _ = r.finish();
    }
    let (measurements, timeline) = merger.into_parts();
    let mut report = Report::build(ReportInput {
        role: Role::Blast,
        config: serde_json::json!({"target": "127.0.0.1:2525", "rate": 100, "connections": 4}),
        started_at_unix: 1_763_800_000.5,
        duration_secs: 3.0,
        measurements,
        timeline,
        invalid_reasons: vec![],
        cpu: CpuUsage::from_us(1_500_000, 250_000),
        host: None,
    })
    .unwrap();
    let asserts = parse_assertions(&[
        "p99(message) < 5ms",
        "errors == 0",
        "tempfailed <= 1%",
        "p99(auth) < 1s",
    ])
    .unwrap();
    report.evaluate_assertions(&asserts);
    report
}

fn sink_report() -> Report {
    let mut r = Recorder::new();
    for i in 0..20 {
        r.count_session(false);
        r.count_outcome(if i < 18 {
            Outcome::Accepted
        } else {
            Outcome::Rejected
        });
        r.count_recipients(1);
        r.count_bytes(1000);
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
        cpu: CpuUsage::from_us(1_500_000, 250_000),
        host: None,
    })
    .unwrap()
}

/// Damages a valid document in one way.
type Breakage = Box<dyn Fn(&mut Value)>;

fn to_value(r: &Report) -> Value {
    serde_json::from_str(&r.to_json()).unwrap()
}

#[test]
fn blast_report_validates_against_its_schema() {
    let doc = to_value(&blast_report());
    assert_eq!(doc["counts"]["messages_attempted"], 300);
    assert_eq!(doc["timeline"][2]["latency"]["message"]["count"], 100);
    assert!(doc["timeline"][2]["latency"]["message"]["p99_us"].as_u64() > Some(1000));
    assert_eq!(
        doc["assertions"][3]["value"],
        Value::Null,
        "a phase without data has a null value"
    );
    assert_valid(&schema("blast"), &doc);
}

#[test]
fn sink_report_validates_against_its_schema() {
    let doc = to_value(&sink_report());
    assert_eq!(doc["counts"]["verify_corrupt"], 1);
    assert_valid(&schema("sink"), &doc);
}

#[test]
fn merged_and_invalid_runs_validate_too() {
    let a = blast_report();
    let mut b = blast_report();
    b.valid = false;
    b.invalid_reasons = vec!["schedule fell behind".into()];
    let merged =
        merge_reports(&[a, b], &parse_assertions(&["rate(messages) > 1"]).unwrap()).unwrap();
    assert!(!merged.valid);
    assert_valid(&schema("blast"), &to_value(&merged));
}

#[test]
fn documents_breaking_the_contract_are_rejected() {
    let blast = schema("blast");
    let good = to_value(&blast_report());
    let breakages: Vec<(&str, Breakage)> = vec![
        (
            "missing counts.sessions",
            Box::new(|v| {
                v["counts"].as_object_mut().unwrap().remove("sessions");
            }),
        ),
        (
            "negative count",
            Box::new(|v| v["counts"]["timeouts"] = (-1).into()),
        ),
        (
            "p99 as a string",
            Box::new(|v| v["latency"]["message"]["p99_us"] = "5ms".into()),
        ),
        (
            "unknown phase",
            Box::new(|v| v["latency"]["teleport"] = v["latency"]["message"].clone()),
        ),
        (
            "wrong schema_version",
            Box::new(|v| v["schema_version"] = 2.into()),
        ),
        ("wrong role", Box::new(|v| v["role"] = "sink".into())),
        ("valid not a bool", Box::new(|v| v["valid"] = "yes".into())),
        (
            "misspelt key",
            Box::new(|v| {
                let c = v["counts"].as_object_mut().unwrap();
                let n = c.remove("messages_accepted").unwrap();
                c.insert("messages_acepted".into(), n);
            }),
        ),
        (
            "hist not base64",
            Box::new(|v| v["latency"]["message"]["hist"] = "%%%".into()),
        ),
    ];
    for (what, breakage) in breakages {
        let mut doc = good.clone();
        breakage(&mut doc);
        assert!(!blast.is_valid(&doc), "{what} should fail validation");
    }
    let mut sink_with_latency = to_value(&sink_report());
    sink_with_latency["latency"] = good["latency"].clone();
    assert!(!schema("sink").is_valid(&sink_with_latency));
}
