//! Finding a server's capacity (issue 18) with the real binary on
//! 127.0.0.1: `--stages` ramps hold each second's requested rate, `bench`
//! takes stages too, `sink --max-rate R` is a target of known capacity (a
//! queue: its throughput never passes R and past R the wait grows), and
//! `sweep` finds that capacity within 10% (plaintext `-k 1`, STARTTLS
//! `-k 10`), writes JSON that validates against `schemas/sweep.schema.json`
//! and gates on `--assert` (exit 99). Every run is bounded by its duration,
//! its steps, and the harness's timeouts.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

/// These tests measure rates and latencies: one at a time, so they do not
/// compete for the CPU with each other (the harness runs tests in parallel).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A sink process on a free loopback port (one thread), and its report.
struct Sink {
    proc: Proc,
    addr: String,
    json: PathBuf,
}

fn sink(dir: &Path, args: &[&str]) -> Sink {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let json = dir.join(format!("sink-{port}.json"));
    let proc = Proc::spawn(
        "smtpstorm sink",
        Command::new(bin())
            .args([
                "sink",
                "--listen",
                &addr,
                "--threads",
                "1",
                "--quiet",
                "--json",
            ])
            .arg(&json)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for_listen(port, LIMIT);
    Sink { proc, addr, json }
}

impl Sink {
    fn stop(mut self) -> Value {
        self.proc.terminate();
        assert!(self.proc.wait(LIMIT).success());
        read_json(&self.json)
    }
}

fn timeline(v: &Value) -> &Vec<Value> {
    v["timeline"].as_array().expect("a timeline")
}

#[test]
fn a_stage_ramp_achieves_each_second_s_requested_rate_within_five_percent() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), &[]);
    // 400 held, a ramp of 1500, 1600 held: 3500 messages in 7 s.
    let (code, v, err) = blast(
        dir.path(),
        &[
            &s.addr,
            "--stages",
            "2s:200,3s:200..800,2s:800",
            "--threads",
            "1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_outcomes_add_up(&v);
    assert_eq!(v["config"]["stages"], "2s:200,3s:200..800,2s:800");
    assert_eq!(v["duration_secs"].as_f64(), Some(7.0));
    let tl = timeline(&v);
    let requested: f64 = tl.iter().map(|p| p["requested"].as_f64().unwrap()).sum();
    assert!((requested - 3500.0).abs() < 1e-6, "{requested}");
    // The integral of each second: 200, 200, 300, 500, 700, 800, 800.
    for (t, want) in [200.0, 200.0, 300.0, 500.0, 700.0, 800.0, 800.0]
        .into_iter()
        .enumerate()
    {
        assert_eq!(tl[t]["t"], t as u64);
        assert_eq!(tl[t]["requested"].as_f64(), Some(want), "second {t}");
    }
    // After the first second of each stage, the achieved rate holds.
    for t in [1usize, 3, 4, 6] {
        let want = tl[t]["requested"].as_f64().unwrap();
        let got = tl[t]["achieved"].as_u64().unwrap() as f64;
        assert!(
            (got - want).abs() <= 0.05 * want,
            "second {t}: achieved {got}, requested {want}: {tl:?}"
        );
    }
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 3500);
    assert_eq!(get_u64(&v, "open_loop.messages_due"), 3500);
    assert_valid("blast", &v);
    let sv = s.stop();
    assert_eq!(get_u64(&sv, "counts.messages_accepted"), 3500);
}

#[test]
fn bench_takes_stages_too() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = run(
        "smtpstorm bench",
        Command::new(bin())
            .args(["bench", "--stages", "1s:50,1s:50..150", "--quiet", "--json"])
            .arg(&json),
        LIMIT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = read_json(&json);
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 150);
    let tl = timeline(&v);
    assert_eq!(tl[0]["requested"].as_f64(), Some(50.0));
    assert_eq!(tl[1]["requested"].as_f64(), Some(100.0));
}

#[test]
fn a_sink_with_max_rate_accepts_no_more_than_r_a_second_and_queues_the_rest() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), &["--max-rate", "200"]);
    let (code, v, err) = blast(
        dir.path(),
        &[&s.addr, "--rate", "400", "-d", "3s", "--threads", "1"],
    );
    assert_eq!(code, 0, "{err}");
    assert_outcomes_add_up(&v);
    let tl = timeline(&v);
    for p in tl {
        let n = p["messages"].as_u64().unwrap();
        assert!(n <= 210, "more than 200 accepted in a second: {tl:?}");
    }
    // Busy from the start: every whole second carries about R.
    for p in &tl[1..3] {
        assert!(p["messages"].as_u64().unwrap() >= 180, "{tl:?}");
    }
    // Twice the capacity: the queue grows by 200 a second, so the median
    // message waited hundreds of milliseconds (corrected from its intended
    // time).
    assert!(
        get_u64(&v, "latency.message.p50_us") > 200_000,
        "{}",
        v["latency"]["message"]
    );
    let sv = s.stop();
    assert_eq!(
        get_u64(&sv, "counts.messages_accepted"),
        get_u64(&v, "counts.messages_accepted")
    );
    assert_eq!(sv["config"]["max_rate"].as_f64(), Some(200.0));
}

fn schema(name: &str) -> jsonschema::Validator {
    let path = format!("{}/schemas/{name}.schema.json", env!("CARGO_MANIFEST_DIR"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(jsonschema::meta::is_valid(&schema), "{path}");
    jsonschema::draft202012::new(&schema).unwrap()
}

/// Sweeps a sink of capacity `cap`; returns (exit code, JSON, stdout, stderr).
fn sweep_against(cap: u32, extra: &[&str]) -> (i32, Value, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let cap_s = cap.to_string();
    let s = sink(dir.path(), &["--max-rate", &cap_s]);
    let json = dir.path().join("sweep.json");
    let start = (cap * 6 / 10).to_string();
    let out = run(
        "smtpstorm sweep",
        Command::new(bin())
            .args(["sweep", &s.addr, "--slo", "p99(message) < 100ms", "--slo"])
            .args(["errors == 0", "--step", "1s", "--warmup", "500ms"])
            .args(["--precision", "10%"])
            .args(["--start", &start, "--threads", "1", "--json"])
            .arg(&json)
            .args(extra),
        LIMIT,
    );
    let code = out.status.code().unwrap_or(-1);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(json.exists(), "exit {code}: {stderr}");
    let v = read_json(&json);
    assert_valid("sweep", &v);
    s.stop();
    (code, v, stdout, stderr)
}

#[track_caller]
fn assert_valid(name: &str, v: &Value) {
    let errors: Vec<String> = schema(name)
        .iter_errors(v)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(errors.is_empty(), "{name} schema errors: {errors:#?}");
}

#[track_caller]
fn assert_max_rate_near(v: &Value, cap: f64) {
    let max = v["sweep"]["max_rate"].as_f64().expect("a max rate");
    assert!(
        (max - cap).abs() <= 0.10 * cap,
        "max rate {max} not within 10% of {cap}: {:#}",
        v["sweep"]
    );
    let steps = v["sweep"]["steps"].as_array().unwrap();
    assert!(steps.len() >= 3, "doubled, then bisected: {steps:?}");
    for s in steps {
        assert!(s["latency"]["message"]["p99_us"].as_u64().is_some());
        // Never more than the capacity, give or take a boundary.
        assert!(s["achieved"].as_f64().unwrap() <= cap * 1.05 + 2.0, "{s}");
    }
    // A step above the capacity failed.
    assert!(steps
        .iter()
        .any(|s| !s["passed"].as_bool().unwrap() && s["requested"].as_f64().unwrap() > cap));
}

#[test]
fn sweep_finds_the_capacity_of_a_sink_with_max_rate_300_in_plaintext() {
    let _serial = serial();
    let (code, v, stdout, stderr) = sweep_against(
        300,
        &[
            "--assert",
            "max_rate >= 250",
            "--assert",
            "saturation_rate > 100k",
        ],
    );
    assert_max_rate_near(&v, 300.0);
    // One of the two gates failed: exit 99, and it is named.
    assert_eq!(code, 99, "{stderr}");
    assert!(stderr.contains("1 check(s) failed"), "{stderr}");
    assert!(stderr.contains("saturation_rate > 100k"), "{stderr}");
    assert_eq!(v["assertions"][0]["ok"], true);
    assert_eq!(v["assertions"][1]["ok"], false);
    assert!(stdout.contains("Max rate: "), "{stdout}");
    assert!(stdout.contains("requested"), "{stdout}");
}

#[test]
fn sweep_finds_the_capacity_of_a_sink_with_max_rate_1000_with_ten_messages_a_session() {
    let _serial = serial();
    let (code, v, _, stderr) = sweep_against(1000, &["-k", "10"]);
    assert_eq!(code, 0, "{stderr}");
    assert_max_rate_near(&v, 1000.0);
    assert_eq!(v["config"]["messages_per_session"], 10);
}

#[test]
fn sweep_finds_the_capacity_of_a_sink_with_max_rate_300_over_starttls_with_ten_messages_a_session()
{
    let _serial = serial();
    let (code, v, _, stderr) = sweep_against(300, &["--starttls", "-k", "10"]);
    assert_eq!(code, 0, "{stderr}");
    assert_max_rate_near(&v, 300.0);
    assert_eq!(v["config"]["starttls"], true);
}

#[test]
fn csv_has_one_row_per_second_of_the_timeline_with_requested_and_achieved() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), &[]);
    let csv = dir.path().join("run.csv");
    let csv_s = csv.to_str().unwrap();
    let (code, v, err) = blast(
        dir.path(),
        &[
            &s.addr,
            "--rate",
            "100",
            "-d",
            "3s",
            "--threads",
            "1",
            "--csv",
            csv_s,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split(',').collect()).collect();
    let header = &rows[0];
    assert_eq!(
        header[..7],
        [
            "t",
            "requested",
            "achieved",
            "messages",
            "sessions",
            "errors",
            "failed"
        ]
    );
    assert!(header.contains(&"message_p99_us"), "{header:?}");
    let tl = timeline(&v);
    assert_eq!(rows.len(), tl.len() + 1, "{text}");
    for (row, p) in rows[1..].iter().zip(tl) {
        assert_eq!(row.len(), header.len(), "{text}");
        assert_eq!(row[0], p["t"].to_string());
        assert_eq!(row[3], p["messages"].to_string());
        assert_eq!(row[2], p["achieved"].to_string());
    }
    assert_eq!(rows[2][1], "100", "second 1 asked for 100: {text}");
    s.stop();
}

#[test]
fn abort_on_stops_the_run_early_with_exit_99_and_says_why() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = sink(dir.path(), &["--fault", "mail:550"]);
    let started = std::time::Instant::now();
    let (code, v, err) = blast(
        dir.path(),
        &[
            &s.addr,
            "--rate",
            "100",
            "-d",
            "30s",
            "--threads",
            "1",
            "--abort-on",
            "p99(message) > 3000s",
            "--abort-on",
            "rejected > 10",
        ],
    );
    assert_eq!(code, 99, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "stopped early, not at the end of the 30 s"
    );
    assert!(
        err.contains("aborted: --abort-on `rejected > 10` held after"),
        "{err}"
    );
    assert!(!err.contains("interrupted"), "{err}");
    let why = v["aborted"].as_str().expect("the reason in the report");
    assert!(why.contains("rejected > 10"), "{why}");
    assert!(v["duration_secs"].as_f64().unwrap() < 20.0);
    assert_valid("blast", &v);
    s.stop();
}
