//! The end-to-end accounting (`stats::account_e2e`) on reports built in
//! memory: each figure by its definition (lost and unexpected by number,
//! duplicates across sink threads, untraced including another run's, late
//! after the drain, the backlog per second through the drain, the clock
//! offset taken from every delivery latency), and the reports that carry
//! it validate against the committed schemas.

use std::time::Duration;

use serde_json::Value;
use smtpstorm::smtp::Outcome;
use smtpstorm::stats::{
    account_e2e, CpuUsage, E2eOptions, IntervalMerger, NumberSet, Recorder, Report, ReportInput,
    Role, TraceRecorder, TraceReport,
};

const START: f64 = 1_800_000_000.0;
const RUN: u64 = 0xfeed;

fn schema(name: &str) -> jsonschema::Validator {
    let path = format!("{}/schemas/{name}.schema.json", env!("CARGO_MANIFEST_DIR"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    jsonschema::draft202012::new(&schema).unwrap()
}

#[track_caller]
fn assert_valid(name: &str, r: &Report) {
    let doc: Value = serde_json::from_str(&r.to_json()).unwrap();
    let v = schema(name);
    let errors: Vec<String> = v
        .iter_errors(&doc)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(errors.is_empty(), "{name}: {errors:#?}");
}

/// A blaster that had numbers 0..10 accepted, 5 in each of its 2 seconds.
fn blast() -> Report {
    let mut merger = IntervalMerger::new();
    for sec in 0..2 {
        let mut r = Recorder::new();
        for _ in 0..5 {
            r.count_outcome(Outcome::Accepted);
        }
        merger.absorb(&r.take_interval(Duration::from_secs(sec), Duration::from_secs(1)));
    }
    let (measurements, timeline) = merger.into_parts();
    let mut r = Report::build(ReportInput {
        role: Role::Blast,
        config: serde_json::json!({}),
        started_at_unix: START,
        duration_secs: 2.0,
        measurements,
        timeline,
        invalid_reasons: vec![],
        cpu: CpuUsage::default(),
        host: None,
    })
    .unwrap();
    let mut set = NumberSet::default();
    (0..10).for_each(|n| {
        set.0.insert(n);
    });
    r.trace = Some(TraceReport::of_blast(RUN, set));
    r
}

/// Two sink threads: numbers 0..8 but 3 (lost), 4 twice (other thread),
/// 42 (unexpected), one of another run, two untraced; 9 late (second 5).
fn sink() -> Report {
    let s = |sec: f64| (sec * 1e9) as u64 + (START * 1e9) as u64;
    let sent = s(0.0);
    let mut a = TraceRecorder::default();
    let mut b = TraceRecorder::default();
    for n in [0u64, 1, 2, 4, 5, 6, 7, 8] {
        a.delivered(RUN, n, 1, sent, s(1.5));
    }
    b.delivered(RUN, 4, 1, sent, s(2.5));
    b.delivered(RUN, 42, 1, sent, s(2.5));
    b.delivered(RUN, 9, 1, sent, s(5.5));
    b.delivered(7, 1, 1, sent, s(1.0));
    b.untraced();
    b.untraced();
    a.merge(&b);
    let mut r = Report::build(ReportInput {
        role: Role::Sink,
        config: serde_json::json!({}),
        started_at_unix: START,
        duration_secs: 6.0,
        measurements: Default::default(),
        timeline: vec![],
        invalid_reasons: vec![],
        cpu: CpuUsage::default(),
        host: None,
    })
    .unwrap();
    r.trace = Some(TraceReport::of_sink(&a).unwrap());
    r
}

#[test]
fn each_figure_follows_its_definition() {
    let mut b = blast();
    let s = sink();
    // The drain ended at second 4: the delivery of second 5 is late.
    let o = E2eOptions {
        drain_secs: 2.0,
        drain_end_unix: Some(START + 4.0),
        one_clock: true,
        clock_offset_secs: 0.0,
    };
    account_e2e(&mut b, &s, &o).unwrap();
    let e = b.e2e.clone().unwrap();
    assert_eq!(e.run_id, format!("{RUN:016x}"));
    assert_eq!((e.accepted, e.delivered), (10, 10), "{e:?}");
    assert_eq!((e.lost, e.lost_numbers.clone()), (1, vec![3]));
    assert_eq!((e.unexpected, e.unexpected_numbers.clone()), (1, vec![42]));
    assert_eq!(e.duplicates, 1);
    assert_eq!(e.untraced, 3, "two without a trace, one of another run");
    assert_eq!(e.late, 1);
    let d = &b.latency["delivery"];
    assert_eq!(d.count, 11);
    assert!(
        d.p50_us >= 1_490_000 && d.p50_us <= 1_510_000,
        "{}",
        d.p50_us
    );
    // Backlog: 5 accepted in second 0, 10 by second 1; 8 first deliveries
    // in second 1, 2 more in second 2, the late one in second 5.
    let backlog: Vec<(u64, Option<i64>)> = b.timeline.iter().map(|p| (p.t, p.backlog)).collect();
    assert_eq!(
        backlog,
        vec![
            (0, Some(5)),
            (1, Some(2)),
            (2, Some(0)),
            (3, Some(0)),
            (4, Some(0)),
            (5, Some(-1)),
        ]
    );
    assert_valid("blast", &b);
    assert_valid("sink", &s);
    // And back from JSON: the histogram of `delivery` decodes.
    let back = Report::from_json(&b.to_json(), "test").unwrap();
    assert_eq!(
        back.latency["delivery"].histogram.as_ref().unwrap().len(),
        11
    );
    assert_eq!(back.e2e, b.e2e);
}

#[test]
fn a_measured_clock_offset_is_taken_from_every_delivery_latency() {
    let mut b = blast();
    let o = E2eOptions {
        clock_offset_secs: 1.0,
        ..Default::default()
    };
    account_e2e(&mut b, &sink(), &o).unwrap();
    let e = b.e2e.as_ref().unwrap();
    assert!(
        !e.one_clock && e.clock_note.contains("--clock-offset"),
        "{}",
        e.clock_note
    );
    assert_eq!(e.late, 0, "no drain given: nothing is late");
    let p50 = b.latency["delivery"].p50_us;
    assert!((490_000..=510_000).contains(&p50), "{p50}");
}

#[test]
fn a_blast_report_without_trace_cannot_be_paired() {
    let mut b = blast();
    b.trace = None;
    let err = account_e2e(&mut b, &sink(), &E2eOptions::default()).unwrap_err();
    assert!(err.to_string().contains("--trace"), "{err}");
}
