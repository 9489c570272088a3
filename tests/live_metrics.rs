//! `--metrics-listen ADDR` on `sink` and `blast` (and `bench`, which shares
//! blast's flags): `/metrics` is scraped during a run and parsed by the
//! Prometheus project's own Python parser (Debian's
//! python3-prometheus-client, installed by `scripts/install-peers.sh`);
//! counters only grow; `/stats` lets the test wait for N messages as a CI
//! job would; and once the sink has them all, the last scrape equals the
//! counts of the sink's final JSON report, key by key.
//!
//! Every wait is bounded; all traffic is on 127.0.0.1.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(90);

/// `GET path` on `addr`: (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

fn stats(addr: SocketAddr) -> Value {
    let (status, body) = get(addr, "/stats");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Parses an exposition with `prometheus_client.parser`: sample name with
/// its sorted labels (`name{a="x",b="y"}`) → value.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in fam.samples:
        labels = ",".join('%s="%s"' % kv for kv in sorted(s.labels.items()))
        out[s.name + ("{" + labels + "}" if labels else "")] = s.value
print(json.dumps(out))
"#;

fn scrape(addr: SocketAddr, dir: &Path) -> BTreeMap<String, f64> {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    let file = dir.join(format!("scrape-{}.txt", free_port()));
    std::fs::write(&file, &body).unwrap();
    let out = run(
        "python3 prometheus_client",
        Command::new(PYTHON).arg("-c").arg(PARSE).arg(&file),
        LIMIT,
    );
    assert!(
        out.status.success(),
        "the Prometheus parser refused the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The metric that carries `counts.<key>` of the JSON report.
fn metric_of(key: &str) -> &'static str {
    match key {
        "sessions" => "smtpstorm_sessions_total",
        "tls_sessions" => "smtpstorm_tls_sessions_total",
        "tls_resumed" => "smtpstorm_tls_resumed_total",
        "connections_without_session" => "smtpstorm_connections_without_session_total",
        "messages_attempted" => "smtpstorm_messages_attempted_total",
        "messages_accepted" => "smtpstorm_messages_total{outcome=\"accepted\"}",
        "messages_tempfailed" => "smtpstorm_messages_total{outcome=\"tempfailed\"}",
        "messages_rejected" => "smtpstorm_messages_total{outcome=\"rejected\"}",
        "connection_errors" => "smtpstorm_errors_total{kind=\"connection_error\"}",
        "timeouts" => "smtpstorm_errors_total{kind=\"timeout\"}",
        "protocol_errors" => "smtpstorm_errors_total{kind=\"protocol_error\"}",
        "recipients" => "smtpstorm_recipients_total",
        "bytes" => "smtpstorm_message_bytes_total",
        "verify_ok" => "smtpstorm_verified_total{result=\"ok\"}",
        "verify_corrupt" => "smtpstorm_verified_total{result=\"corrupt\"}",
        other => panic!("counts.{other} has no metric"),
    }
}

/// Waits (bounded) until `/stats` satisfies `done`; returns that document.
#[track_caller]
fn wait_stats(addr: SocketAddr, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v = stats(addr);
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "/stats never got there: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_sink_scraped_during_a_run_ends_with_the_counts_of_its_json_report() {
    const N: u64 = 2400;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let sink_json = dir.path().join("sink.json");
    let mut sink = Proc::spawn(
        "smtpstorm sink",
        Command::new(bin())
            .args([
                "sink",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--threads",
                "2",
            ])
            .args(["--quiet", "--duration", "80s", "--metrics-listen"])
            .arg(metrics.to_string())
            .arg("--json")
            .arg(&sink_json)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(10),
    );
    wait_for_port(metrics, Duration::from_secs(10));
    let before = stats(metrics);
    assert_eq!(before["role"], "sink");
    assert_eq!(before["counts"]["messages_accepted"], 0);

    // 2400 messages at 800/s: three seconds of snapshots to scrape.
    let blast_json = dir.path().join("blast.json");
    let mut blast = Proc::spawn(
        "smtpstorm blast",
        Command::new(bin())
            .args(["blast", &format!("127.0.0.1:{port}"), "--rate", "800", "-n"])
            .arg(N.to_string())
            // The figures matter here, not whether a busy machine kept the
            // schedule.
            .args([
                "-c",
                "8",
                "-k",
                "5",
                "--recipients",
                "2",
                "--quiet",
                "--allow-invalid",
            ])
            .arg("--json")
            .arg(&blast_json)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let mut scrapes = Vec::new();
    let mut seen = 0;
    while scrapes.len() < 2 {
        let v = wait_stats(metrics, Duration::from_secs(30), |v| {
            v["counts"]["messages_accepted"].as_u64().unwrap() > seen
        });
        seen = v["counts"]["messages_accepted"].as_u64().unwrap();
        if seen < N {
            scrapes.push(scrape(metrics, dir.path()));
        } else {
            break;
        }
    }
    let st = blast.wait(LIMIT);
    assert!(st.success(), "blast: {st}");
    let sessions = read_json(&blast_json)["counts"]["sessions"].as_u64();
    // What a CI job does: wait until the sink has every message (and every
    // session has ended: the blaster's, and the readiness probe's), then
    // read the figures.
    let done = wait_stats(metrics, Duration::from_secs(30), |v| {
        v["counts"]["messages_accepted"].as_u64() == Some(N)
            && v["counts"]["sessions"].as_u64() >= sessions
            && v["open_connections"] == 0
    });
    assert_eq!(done["open_connections"], 0, "{done}");
    let last = scrape(metrics, dir.path());
    scrapes.push(last.clone());
    for w in scrapes.windows(2) {
        for (k, v) in &w[0] {
            if k.ends_with("_total") || k.contains("_total{") {
                assert!(w[1].get(k).copied().unwrap_or(0.0) >= *v, "{k} went down");
            }
        }
    }
    assert!(
        scrapes[0][metric_of("messages_accepted")] < N as f64,
        "a scrape was taken during the run"
    );

    sink.terminate();
    let st = sink.wait(LIMIT);
    assert!(st.success(), "sink: {st}");
    let report = read_json(&sink_json);
    let counts = report["counts"].as_object().unwrap();
    for (key, want) in counts {
        let got = last.get(metric_of(key)).copied();
        assert_eq!(
            got,
            Some(want.as_u64().unwrap() as f64),
            "counts.{key} vs {}",
            metric_of(key)
        );
    }
    assert_eq!(last[metric_of("recipients")], (2 * N) as f64);
    assert_eq!(
        last["smtpstorm_replies_total{code=\"250\",command=\"dot\"}"], N as f64,
        "{last:?}"
    );
}

#[test]
fn a_blaster_serves_latency_histograms_during_its_run() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _sink = Proc::spawn(
        "smtpstorm sink",
        Command::new(bin())
            .args([
                "sink",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--threads",
                "1",
            ])
            .args(["--quiet", "--duration", "60s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(10),
    );
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let json = dir.path().join("blast.json");
    let mut blast = Proc::spawn(
        "smtpstorm blast",
        Command::new(bin())
            .args([
                "blast",
                &format!("127.0.0.1:{port}"),
                "--rate",
                "500",
                "--duration",
                "3s",
            ])
            .args(["-c", "4", "--quiet", "--allow-invalid", "--metrics-listen"])
            .arg(metrics.to_string())
            .arg("--json")
            .arg(&json)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for_port(metrics, Duration::from_secs(10));
    wait_stats(metrics, Duration::from_secs(10), |v| {
        v["counts"]["messages_accepted"].as_u64() > Some(0)
    });
    let during = scrape(metrics, dir.path());
    let st = blast.wait(LIMIT);
    assert!(st.success(), "blast: {st}");
    let report = read_json(&json);
    let count = during["smtpstorm_latency_seconds_count{phase=\"message\"}"];
    assert!(count > 0.0, "{during:?}");
    assert!(count <= report["latency"]["message"]["count"].as_u64().unwrap() as f64);
    let mut buckets: Vec<(f64, f64)> = during
        .iter()
        .filter_map(|(k, v)| {
            let le = k
                .strip_prefix("smtpstorm_latency_seconds_bucket{le=\"")?
                .strip_suffix("\",phase=\"message\"}")?;
            Some((le.parse::<f64>().unwrap(), *v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() >= 10, "{during:?}");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "cumulative: {buckets:?}"
    );
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, count));
    assert!(
        during[metric_of("messages_accepted")]
            <= report["counts"]["messages_accepted"].as_u64().unwrap() as f64
    );
}

#[test]
fn a_metrics_address_in_use_is_one_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(
        "smtpstorm sink",
        Command::new(bin()).args([
            "sink",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--metrics-listen",
            &addr,
            "--duration",
            "5s",
            "--quiet",
        ]),
        LIMIT,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("cannot listen for metrics on {addr}")) && err.lines().count() == 1,
        "{err}"
    );
}
