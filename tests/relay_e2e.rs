//! End to end through a real mail server (issue 19): a private Postfix
//! smtpd (as `common::PostfixSmtpd` starts it) relays everything to the
//! sink of `smtpstorm bench --through` (its `relayhost` is the sink's
//! `--sink-listen` port), and the report accounts for every message.
//!
//! - N messages at a fixed rate arrive exactly once: delivered = accepted
//!   = N, nothing lost, late, duplicated or unexpected; and `delivery` (send
//!   → relayed message read) takes longer than `message` (the server's 250).
//! - Loss is exact: a `header_checks` DISCARD rule drops the messages whose
//!   Subject (it carries `{n}`) ends in 0 or 5; lost is their count and the
//!   lost numbers are exactly them.
//! - Duplicates are exact: the sink takes some messages whole and answers
//!   451 (`dot:stored=451`), Postfix retries (a short backoff), and the
//!   duplicates equal the faults the sink injected (its `dot` 451 replies).
//! - `merge` of a two-process run (`sink --trace`, `blast --trace`) gives the
//!   same accounting as `bench --through`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, free_port, get_u64, read_json, run, PostfixSmtpd, Proc};

/// Postfix settings that relay every message to `sink_port` and retry soon.
fn relay_to(sink_port: u16, extra: &str) -> String {
    format!(
        "default_transport = smtp\n\
         relay_transport = smtp\n\
         relayhost = [127.0.0.1]:{sink_port}\n\
         smtp_tls_security_level = none\n\
         queue_run_delay = 1s\n\
         minimal_backoff_time = 1s\n\
         maximal_backoff_time = 2s\n\
         {extra}"
    )
}

/// Runs `bench --through` against Postfix; returns (exit code, blast JSON,
/// sink JSON, stderr).
fn bench_through(
    dir: &Path,
    pf: &PostfixSmtpd,
    sink_port: u16,
    args: &[&str],
) -> (i32, serde_json::Value, serde_json::Value, String) {
    let json = dir.join("bench.json");
    let out = run(
        "smtpstorm bench --through",
        Command::new(bin())
            .arg("bench")
            .args(["--through", &pf.addr()])
            .args(["--sink-listen", &format!("127.0.0.1:{sink_port}")])
            .args(args)
            .args(["--quiet", "--json"])
            .arg(&json),
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let code = out.status.code().unwrap_or(-1);
    assert!(json.exists(), "no JSON (exit {code}): {stderr}");
    let sink = read_json(&dir.join("bench.sink.json"));
    (code, read_json(&json), sink, stderr)
}

fn e2e(v: &serde_json::Value, k: &str) -> u64 {
    get_u64(v, &format!("e2e.{k}"))
}

#[test]
fn every_message_relayed_by_postfix_is_delivered_exactly_once_and_later_than_its_250() {
    let dir = tempfile::tempdir().unwrap();
    let sink_port = free_port();
    let pf = PostfixSmtpd::start_with(&relay_to(sink_port, ""));
    let (code, v, sink, stderr) = bench_through(
        dir.path(),
        &pf,
        sink_port,
        &["--rate", "50", "-n", "150", "--drain", "60s"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(e2e(&v, "accepted"), 150, "{}", v["e2e"]);
    assert_eq!(e2e(&v, "delivered"), 150, "{}", v["e2e"]);
    for k in ["lost", "late", "duplicates", "unexpected", "untraced"] {
        assert_eq!(e2e(&v, k), 0, "{k}: {}", v["e2e"]);
    }
    assert!(v["e2e"]["one_clock"].as_bool().unwrap());
    // Open loop: `latency.message` counts from the intended time; the
    // server's own time (last byte → 250) is the uncorrected figure, and
    // the relay comes after that 250.
    let delivery = get_u64(&v, "latency.delivery.p50_us");
    let message = get_u64(&v, "latency_uncorrected.message.p50_us");
    assert!(
        delivery > message,
        "delivery p50 {delivery} µs should exceed the server's 250 (message p50 {message} µs)"
    );
    assert_eq!(get_u64(&v, "latency.delivery.count"), 150);
    // The backlog ends at zero and never goes below it (nothing unexpected).
    let backlog: Vec<i64> = v["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["backlog"].as_i64())
        .collect();
    assert!(!backlog.is_empty(), "{}", v["timeline"]);
    assert_eq!(*backlog.last().unwrap(), 0, "{backlog:?}");
    assert!(backlog.iter().all(|b| *b >= 0), "{backlog:?}");
    // The sink's side: one run, 150 deliveries of 150 numbers.
    let run0 = &sink["trace"]["runs"][0];
    assert_eq!(run0["run_id"], v["trace"]["run_id"]);
    assert_eq!(get_u64(run0, "delivered"), 150);
    assert_eq!(get_u64(run0, "messages"), 150);
}

#[test]
fn messages_a_header_check_discards_are_counted_lost_by_number() {
    let dir = tempfile::tempdir().unwrap();
    let sink_port = free_port();
    // The builder's Subject is `smtpstorm load test message {n}`.
    let checks = dir.path().join("header_checks");
    std::fs::write(
        &checks,
        "/^Subject: smtpstorm load test message [0-9]*[05]$/ DISCARD dropped by the test\n",
    )
    .unwrap();
    let pf = PostfixSmtpd::start_with(&relay_to(
        sink_port,
        &format!("header_checks = regexp:{}\n", checks.display()),
    ));
    let (code, v, _, stderr) = bench_through(
        dir.path(),
        &pf,
        sink_port,
        &["--rate", "50", "-n", "100", "--drain", "15s"],
    );
    assert_eq!(code, 0, "{stderr}");
    let want: Vec<u64> = (0..100).filter(|n| n % 5 == 0).collect();
    assert_eq!(e2e(&v, "accepted"), 100, "{}", v["e2e"]);
    assert_eq!(e2e(&v, "lost"), want.len() as u64, "{}", v["e2e"]);
    assert_eq!(e2e(&v, "delivered"), 100 - want.len() as u64);
    let lost: Vec<u64> = v["e2e"]["lost_numbers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    assert_eq!(lost, want);
    assert_eq!(e2e(&v, "duplicates"), 0);
    assert_eq!(e2e(&v, "unexpected"), 0);
}

#[test]
fn a_sink_that_stores_then_tempfails_makes_postfix_deliver_twice_and_each_is_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let sink_port = free_port();
    let pf = PostfixSmtpd::start_with(&relay_to(sink_port, ""));
    let (code, v, sink, stderr) = bench_through(
        dir.path(),
        &pf,
        sink_port,
        &[
            "--rate",
            "50",
            "-n",
            "100",
            "--drain",
            "60s",
            "--sink-fault",
            "dot:stored=451:20%",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let faults = sink["reply_codes"]["dot"]["451"].as_u64().unwrap_or(0);
    assert!(faults > 0, "the fault never fired: {}", sink["reply_codes"]);
    assert_eq!(e2e(&v, "duplicates"), faults, "{}", v["e2e"]);
    assert_eq!(e2e(&v, "delivered"), 100, "{}", v["e2e"]);
    assert_eq!(e2e(&v, "lost"), 0, "{}", v["e2e"]);
    assert_eq!(e2e(&v, "unexpected"), 0, "{}", v["e2e"]);
}

#[test]
fn merging_the_reports_of_a_two_process_run_gives_the_same_accounting_as_bench_through() {
    let dir = tempfile::tempdir().unwrap();
    let sink_port = free_port();
    let pf = PostfixSmtpd::start_with(&relay_to(sink_port, ""));
    let (code, bench, _, stderr) = bench_through(
        dir.path(),
        &pf,
        sink_port,
        &["--rate", "50", "-n", "60", "--drain", "60s"],
    );
    assert_eq!(code, 0, "{stderr}");

    // The same run as two processes: a sink that stops after 60 deliveries.
    let sink_json = dir.path().join("sink.json");
    let mut sink = Proc::spawn(
        "smtpstorm sink",
        Command::new(bin())
            .arg("sink")
            .args(["--listen", &format!("127.0.0.1:{sink_port}")])
            .args(["--trace", "--quiet", "--exit-after-messages", "60"])
            .args(["--duration", "90s", "--json"])
            .arg(&sink_json)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    common::wait_for_listen(sink_port, Duration::from_secs(10));
    let (bcode, _, berr) = common::blast(
        dir.path(),
        &[&pf.addr(), "--trace", "--rate", "50", "-n", "60"],
    );
    assert_eq!(bcode, 0, "{berr}");
    let st = sink.wait(Duration::from_secs(100));
    assert!(st.success(), "sink exit {st:?}");
    let blast_json = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("blast-")
        })
        .expect("the blast JSON");
    let merged = dir.path().join("merged.json");
    let out = run(
        "smtpstorm merge",
        Command::new(bin())
            .arg("merge")
            .arg(&blast_json)
            .arg(&sink_json)
            .arg("--json")
            .arg(&merged),
        Duration::from_secs(30),
    );
    let merr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{merr}");
    assert!(
        merr.contains("clock"),
        "merge says what the latency includes: {merr}"
    );
    let m = read_json(&merged);
    for k in [
        "accepted",
        "delivered",
        "lost",
        "late",
        "duplicates",
        "unexpected",
        "untraced",
    ] {
        assert_eq!(
            e2e(&m, k),
            e2e(&bench, k),
            "{k}: merge {} bench {}",
            m["e2e"],
            bench["e2e"]
        );
    }
    assert_eq!(e2e(&m, "delivered"), 60);
    assert!(!m["e2e"]["one_clock"].as_bool().unwrap());
    assert_eq!(get_u64(&m, "latency.delivery.count"), 60);
}
