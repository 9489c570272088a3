//! Failure semantics a CI gate can trust (issue 20), with the real
//! binaries on 127.0.0.1: a target that dies or was never there fails the
//! run (exit 4) with a line saying why, and costs a bounded number of
//! connects; the report names the most frequent refusals and errors; the
//! sink's `--exit-after-messages` is exact; both roles count by the same
//! definitions (checked by `bench` under faults); a bare connect-and-close
//! is a connection without a session; sending one large message keeps
//! about one copy of it in memory. Every run is bounded in count and time.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

/// A sink process on a free loopback port, with its JSON report and a
/// metrics endpoint.
struct Sink {
    proc: Proc,
    addr: String,
    metrics: String,
    json: std::path::PathBuf,
}

fn sink(dir: &Path, args: &[&str]) -> Sink {
    let addr = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let json = dir.join(format!("sink-{}.json", free_port()));
    let proc = Proc::spawn(
        "smtpstorm sink",
        Command::new(bin())
            .args(["sink", "--listen", &addr, "--threads", "1", "--quiet"])
            .args(["--metrics-listen", &metrics, "--json"])
            .arg(&json)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    // Readiness through the metrics port: no probe connection to the SMTP
    // port is counted.
    wait_for_port(metrics.parse().unwrap(), Duration::from_secs(10));
    wait_for_listen(addr.rsplit(':').next().unwrap().parse().unwrap(), LIMIT);
    Sink {
        proc,
        addr,
        metrics,
        json,
    }
}

impl Sink {
    /// `/stats` of the live metrics.
    fn stats(&self) -> Value {
        let mut s = TcpStream::connect(&self.metrics).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /stats HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("{}");
        serde_json::from_str(body).unwrap_or(Value::Null)
    }

    /// SIGTERM, wait, and the JSON report.
    fn stop(mut self) -> Value {
        self.proc.terminate();
        assert!(self.proc.wait(LIMIT).success());
        read_json(&self.json)
    }
}

/// Starts `smtpstorm ARGS --json FILE` with piped outputs.
fn spawn(args: &[&str], json: &Path) -> Proc {
    Proc::spawn(
        "smtpstorm",
        Command::new(bin())
            .args(args)
            .arg("--json")
            .arg(json)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
}

fn failed_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("smtpstorm: failed run: "))
        .collect()
}

#[test]
fn a_sink_killed_mid_run_fails_the_blast_with_a_line_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), &[]);
    let json = dir.path().join("blast.json");
    let mut blast = spawn(
        &[
            "blast",
            &s.addr,
            "-d",
            "6s",
            "-c",
            "4",
            "--threads",
            "1",
            "--quiet",
        ],
        &json,
    );
    // Kill the sink once it has accepted something.
    let deadline = Instant::now() + LIMIT;
    while s.stats()["counts"]["messages_accepted"]
        .as_u64()
        .unwrap_or(0)
        < 100
    {
        assert!(Instant::now() < deadline, "the sink accepted nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill")
        .args(["-KILL", &s.proc.pid().to_string()])
        .status();
    let out = blast.wait_output(LIMIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    let lines = failed_lines(&stderr);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("failed everything") && l.contains("Connection refused")),
        "{stderr}"
    );
    let v = read_json(&json);
    assert!(
        get_u64(&v, "counts.messages_accepted") >= 100,
        "{}",
        v["counts"]
    );
    assert!(!v["failed_reasons"].as_array().unwrap().is_empty());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("FAILED RUN: "),
        "the summary says so too"
    );
}

#[test]
fn a_dead_target_costs_a_bounded_number_of_connects_and_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there: every connect is refused.
    let addr = format!("127.0.0.1:{}", free_port());
    let (code, v, err) = blast(
        dir.path(),
        &[&addr, "-d", "3s", "-c", "4", "--threads", "1"],
    );
    assert_eq!(code, 4, "{err}");
    let connects = get_u64(&v, "counts.connections_without_session");
    // Per slot: 10 ms doubling to 1 s between refused connects, so about 9
    // in 3 s (without backoff: hundreds of thousands).
    assert!(
        (4..=4 * 15).contains(&connects),
        "{connects} connects: {}",
        v["counts"]
    );
    assert_eq!(get_u64(&v, "counts.connection_errors"), connects);
    assert_eq!(
        get_u64(&v, "counts.messages_attempted"),
        0,
        "{}",
        v["counts"]
    );
    assert_eq!(get_u64(&v, "counts.sessions"), 0);
    assert_eq!(v["failures"][0]["count"].as_u64(), Some(connects));
    let reason = v["failures"][0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("connect: Connection refused"),
        "{reason}"
    );
    let lines = failed_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("accepted none") && lines[0].contains(reason),
        "{err}"
    );
}

#[test]
fn failures_above_max_failed_fail_the_run_and_the_flag_moves_the_bar() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), &["--fault", "rcpt:451:20%", "--seed", "3"]);
    let args = [&s.addr[..], "-n", "400", "-c", "4", "--threads", "1"];
    let (code, v, err) = blast(dir.path(), &args);
    assert_eq!(code, 4, "20% tempfailed is above the default 1%: {err}");
    let lines = failed_lines(&err);
    assert!(
        lines.len() == 1 && lines[0].contains("above --max-failed 1%"),
        "{err}"
    );
    assert!(get_u64(&v, "counts.messages_accepted") > 0);
    let mut loose = args.to_vec();
    loose.extend(["--max-failed", "50%"]);
    let (code, v, err) = blast(dir.path(), &loose);
    assert_eq!(code, 0, "{err}");
    assert!(v.get("failed_reasons").is_none(), "{v}");
    s.stop();
}

#[test]
fn refused_messages_show_their_reply_and_errors_in_text_json_and_html() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(
        dir.path(),
        &[
            "--fault",
            "rcpt:451:20%",
            "--fault",
            "dot:554:20%",
            "--fault",
            "data:disconnect:10%",
            "--seed",
            "5",
        ],
    );
    let json = dir.path().join("blast.json");
    let out = run(
        "blast",
        Command::new(bin())
            .args(["blast", &s.addr, "-n", "300", "-c", "4", "--threads", "1"])
            .args(["--quiet", "--max-failed", "100%", "--json"])
            .arg(&json),
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(0));
    let v = read_json(&json);
    let failures = v["failures"].as_array().unwrap();
    let count = |prefix: &str| -> u64 {
        failures
            .iter()
            .filter(|f| f["reason"].as_str().unwrap().starts_with(prefix))
            .map(|f| f["count"].as_u64().unwrap())
            .sum()
    };
    // Every refusal with its reply, every dropped connection with its error.
    assert_eq!(
        count("rcpt: 451 4."),
        get_u64(&v, "counts.messages_tempfailed"),
        "{failures:?}"
    );
    assert_eq!(
        count("dot: 554 5."),
        get_u64(&v, "counts.messages_rejected"),
        "{failures:?}"
    );
    assert_eq!(
        count("connection closed while waiting for the data reply"),
        get_u64(&v, "counts.connection_errors"),
        "{failures:?}"
    );
    for prefix in ["rcpt: 451", "dot: 554", "connection closed"] {
        assert!(count(prefix) > 0, "{prefix}: {failures:?}");
    }
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("failure (most frequent)"), "{summary}");
    assert!(
        summary.contains("rcpt: 451 4.") && summary.contains("dot: 554 5."),
        "{summary}"
    );
    let html = dir.path().join("r.html");
    let out = run(
        "report",
        Command::new(bin())
            .arg("report")
            .arg(&json)
            .arg("--html")
            .arg(&html),
        LIMIT,
    );
    assert!(out.status.success());
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains("id=\"failures\"") && page.contains("rcpt: 451 4."),
        "the HTML report lists the failures"
    );
    s.stop();
}

#[test]
fn exit_after_messages_accepts_exactly_n_and_refuses_the_rest_with_451() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(
        dir.path(),
        &["--exit-after-messages", "300", "--grace", "2s"],
    );
    let json = dir.path().join("blast.json");
    // Pipelined sessions of 5 messages on 16 connections: many messages are
    // in flight when the 300th is accepted.
    let out = run(
        "blast",
        Command::new(bin())
            .args(["blast", &s.addr, "-d", "4s", "-c", "16", "-k", "5"])
            .args(["--threads", "1", "--quiet", "--max-failed", "100%"])
            .args(["--max-outage", "0", "--json"])
            .arg(&json),
        LIMIT,
    );
    let mut proc = s.proc;
    assert!(proc.wait(LIMIT).success(), "the sink stops by itself");
    let sv = read_json(&s.json);
    let b = read_json(&json);
    assert_eq!(
        get_u64(&sv, "counts.messages_accepted"),
        300,
        "{}",
        sv["counts"]
    );
    assert_eq!(
        get_u64(&b, "counts.messages_accepted"),
        300,
        "{}",
        b["counts"]
    );
    assert!(
        sv["reply_codes"]["dot"]["451"].as_u64().unwrap_or(0) > 0,
        "messages past the limit were in flight and got 451: {}",
        sv["reply_codes"]
    );
    assert!(out.status.code().is_some());
}

/// `bench` checks that both roles count alike; under message faults with
/// one message per session every count must agree.
#[test]
fn bench_under_faults_finds_both_reports_counting_alike() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = run(
        "bench",
        Command::new(bin())
            .args(["bench", "-n", "1500", "-c", "8", "--recipients", "2"])
            .args(["--sink-threads", "1", "--threads", "1", "--quiet"])
            .args([
                "--sink-fault",
                "rcpt:451:10%",
                "--sink-fault",
                "rcpt:550:5%",
            ])
            .args(["--sink-fault", "mail:550:5%", "--sink-fault", "mail:421:2%"])
            .args([
                "--sink-fault",
                "data:disconnect:5%",
                "--sink-fault",
                "dot:disconnect:3%",
            ])
            .args(["--sink-fault", "dot:451:5%", "--seed", "11"])
            .args(["--max-failed", "100%", "--json"])
            .arg(&json),
        LIMIT,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let b = read_json(&json);
    let s = read_json(&dir.path().join("bench.sink.json"));
    for k in [
        "messages_attempted",
        "messages_accepted",
        "messages_tempfailed",
        "messages_rejected",
        "connection_errors",
        "timeouts",
        "protocol_errors",
        "recipients",
        "bytes",
    ] {
        assert_eq!(
            get_u64(&s, &format!("counts.{k}")),
            get_u64(&b, &format!("counts.{k}")),
            "{k}: sink {} blast {}",
            s["counts"],
            b["counts"]
        );
    }
    assert_eq!(get_u64(&b, "counts.messages_attempted"), 1500);
    for k in [
        "messages_tempfailed",
        "messages_rejected",
        "connection_errors",
    ] {
        assert!(
            get_u64(&b, &format!("counts.{k}")) > 0,
            "{k}: {}",
            b["counts"]
        );
    }
}

#[test]
fn a_bare_connect_and_close_is_a_connection_without_a_session() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), &[]);
    for _ in 0..3 {
        drop(TcpStream::connect(&s.addr).unwrap());
    }
    // And one real session after them.
    let (code, _, err) = blast(dir.path(), &[&s.addr, "-n", "1", "-c", "1"]);
    assert_eq!(code, 0, "{err}");
    let v = s.stop();
    assert_eq!(
        get_u64(&v, "counts.connections_without_session"),
        3,
        "{}",
        v["counts"]
    );
    assert_eq!(get_u64(&v, "counts.sessions"), 1, "{}", v["counts"]);
    assert_eq!(
        get_u64(&v, "counts.connection_errors"),
        0,
        "{}",
        v["counts"]
    );
    assert_eq!(
        get_u64(&v, "counts.messages_attempted"),
        1,
        "{}",
        v["counts"]
    );
}

/// `VmHWM` of a process that has exited is gone, so the blaster is watched
/// while it runs: its peak resident set, read from /proc until it exits.
fn peak_rss_kib(p: &mut Proc) -> u64 {
    let pid = p.pid();
    let mut peak = 0;
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            for l in text.lines() {
                if let Some(v) = l.strip_prefix("VmHWM:") {
                    let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                    peak = peak.max(kib);
                }
            }
        }
        if p.child.as_mut().unwrap().try_wait().unwrap().is_some() {
            return peak;
        }
        assert!(Instant::now() < deadline, "blast did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sending_one_50_mb_message_keeps_about_one_copy_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), &["--max-message-size", "64MiB"]);
    let run_peak = |size: &str| {
        let json = dir.path().join(format!("b-{size}.json"));
        let mut p = Proc::spawn(
            "blast",
            Command::new(bin())
                .args(["blast", &s.addr, "-n", "1", "-c", "1", "--threads", "1"])
                .args(["--quiet", "--size", size, "--json"])
                .arg(&json)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let peak = peak_rss_kib(&mut p);
        assert!(p.wait(LIMIT).success(), "blast --size {size}");
        assert_eq!(get_u64(&read_json(&json), "counts.messages_accepted"), 1);
        peak
    };
    let baseline = run_peak("1KiB");
    let big = run_peak("50MiB");
    let copies = (big.saturating_sub(baseline)) as f64 / (50.0 * 1024.0);
    assert!(
        copies < 1.5,
        "peak RSS {big} KiB vs {baseline} KiB for 1 KiB: {copies:.2} copies of the message"
    );
    s.stop();
}
