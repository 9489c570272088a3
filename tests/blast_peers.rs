//! `smtpstorm blast` against real peers on loopback: Postfix `smtp-sink`
//! (plain, LMTP, soft and hard rejections), a real Postfix `smtpd`
//! discarding mail, and Python `aiosmtpd` with STARTTLS and AUTH. Counts in
//! our JSON must equal what the peer saw; the JSON must match the schema.
//! Every run is bounded in messages and time.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn schema() -> jsonschema::Validator {
    let path = format!("{}/schemas/blast.schema.json", env!("CARGO_MANIFEST_DIR"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    jsonschema::draft202012::new(&schema).unwrap()
}

#[track_caller]
fn assert_schema_valid(doc: &Value) {
    let v = schema();
    let errors: Vec<String> = v
        .iter_errors(doc)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(errors.is_empty(), "schema errors: {errors:#?}");
}

fn smtp_sink(extra: &[&str]) -> (Proc, String) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let p = Proc::spawn(
        "smtp-sink",
        Command::new(SMTP_SINK)
            .args(["-u", "nobody"])
            .args(extra)
            .arg(&addr)
            .arg("1000"),
    );
    wait_for_port(addr.parse().unwrap(), Duration::from_secs(10));
    (p, addr)
}

#[test]
fn smtp_sink_accepts_exactly_what_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = smtp_sink(&[]);
    let (code, v, err) = blast(
        dir.path(),
        &[
            &addr,
            "-n",
            "300",
            "-c",
            "6",
            "-k",
            "3",
            "--recipients",
            "2",
            "--threads",
            "2",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_schema_valid(&v);
    assert_outcomes_add_up(&v);
    assert_eq!(get_u64(&v, "counts.messages_attempted"), 300);
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 300);
    assert_eq!(get_u64(&v, "counts.sessions"), 100);
    assert_eq!(get_u64(&v, "counts.recipients"), 600);
    assert_eq!(get_u64(&v, "counts.bytes"), 300 * 1024);
    assert_eq!(get_u64(&v, "reply_codes.dot.250"), 300);
    assert_eq!(get_u64(&v, "reply_codes.rcpt.250"), 600);
    assert_eq!(get_u64(&v, "latency.message.count"), 300);
    assert_eq!(get_u64(&v, "latency.session.count"), 100);
    assert_eq!(v["valid"], Value::Bool(true));
}

#[test]
fn smtp_sink_in_lmtp_mode_accepts_every_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = smtp_sink(&["-L"]);
    let (code, v, err) = blast(
        dir.path(),
        &[
            &addr,
            "--lmtp",
            "-n",
            "100",
            "-c",
            "4",
            "-k",
            "2",
            "--recipients",
            "3",
            "--threads",
            "1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_outcomes_add_up(&v);
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 100);
    // LMTP: one final reply per recipient.
    assert_eq!(get_u64(&v, "reply_codes.dot.250"), 300);
    assert_eq!(get_u64(&v, "reply_codes.lhlo.250"), 50);
}

#[test]
fn smtp_sink_soft_rejections_are_tempfailed_with_their_code() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = smtp_sink(&["-r", "RCPT", "-b", "451 4.7.1 Try again later"]);
    let (code, v, err) = blast(
        dir.path(),
        &[&addr, "-n", "40", "-c", "4", "-k", "2", "--threads", "1"],
    );
    // Nothing accepted is a failed run (exit 4), whatever the reason.
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("accepted none of 40"), "{err}");
    assert_outcomes_add_up(&v);
    assert_eq!(get_u64(&v, "counts.messages_attempted"), 40);
    assert_eq!(get_u64(&v, "counts.messages_tempfailed"), 40);
    assert_eq!(get_u64(&v, "reply_codes.rcpt.451"), 40);
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 0);
}

#[test]
fn smtp_sink_hard_rejections_of_the_dot_are_rejected_with_their_code() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = smtp_sink(&["-f", ".", "-B", "554 5.7.1 No thanks"]);
    let (code, v, err) = blast(
        dir.path(),
        &[&addr, "-n", "30", "-c", "3", "-k", "3", "--threads", "1"],
    );
    assert_eq!(code, 4, "{err}");
    assert_outcomes_add_up(&v);
    assert_eq!(get_u64(&v, "counts.messages_rejected"), 30);
    assert_eq!(get_u64(&v, "reply_codes.dot.554"), 30);
}

#[test]
fn pipelining_off_with_mixed_sizes_is_accepted_by_smtp_sink() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = smtp_sink(&[]);
    let (code, v, err) = blast(
        dir.path(),
        &[
            &addr,
            "-n",
            "50",
            "-c",
            "2",
            "-k",
            "5",
            "--pipelining",
            "off",
            "--size",
            "200..9000",
            "--threads",
            "1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 50);
}

#[test]
fn a_refused_connection_is_one_connection_error_and_its_messages_are_not_attempted() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    // 20 messages, 2 per session: 10 connections, each refused.
    let (code, v, err) = blast(
        dir.path(),
        &[&addr, "-n", "20", "-c", "2", "-k", "2", "--threads", "1"],
    );
    assert_eq!(code, 4, "{err}");
    assert_outcomes_add_up(&v);
    assert_eq!(get_u64(&v, "counts.messages_attempted"), 0);
    assert_eq!(get_u64(&v, "counts.connections_without_session"), 10);
    assert_eq!(get_u64(&v, "counts.connection_errors"), 10);
}

#[test]
fn a_failed_assertion_exits_99_with_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = smtp_sink(&[]);
    let (code, v, err) = blast(
        dir.path(),
        &[
            &addr,
            "-n",
            "20",
            "-c",
            "2",
            "--threads",
            "1",
            "--assert",
            "accepted >= 1000000",
            "--assert",
            "errors == 0",
        ],
    );
    assert_eq!(code, 99, "{err}");
    assert!(
        err.contains("FAIL") && err.contains("accepted >= 1000000"),
        "{err}"
    );
    assert_eq!(v["assertions"].as_array().unwrap().len(), 2);
}

#[test]
fn a_bad_flag_prints_one_line_naming_it() {
    let out = run(
        "smtpstorm",
        Command::new(bin()).args(["blast", "127.0.0.1:1", "--size", "huge"]),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--size"), "{err}");
}

#[test]
fn postfix_smtpd_delivers_every_message_we_count_as_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let pf = PostfixSmtpd::start();
    let (code, v, err) = blast(
        dir.path(),
        &[
            &pf.addr(),
            "-n",
            "500",
            "-c",
            "10",
            "-k",
            "5",
            "--threads",
            "2",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_outcomes_add_up(&v);
    let accepted = get_u64(&v, "counts.messages_accepted");
    assert_eq!(accepted, 500, "{}", v["counts"]);
    let delivered = pf.wait_delivered(500, Duration::from_secs(60));
    assert_eq!(delivered as u64, accepted);
    // BDAT (CHUNKING), which Postfix offers.
    let (code, v, err) = blast(
        dir.path(),
        &[
            &pf.addr(),
            "--bdat",
            "-n",
            "40",
            "-c",
            "4",
            "-k",
            "2",
            "--threads",
            "1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        get_u64(&v, "counts.messages_accepted"),
        40,
        "{}",
        v["counts"]
    );
    assert_eq!(get_u64(&v, "reply_codes.bdat.250"), 40);
    assert_eq!(pf.wait_delivered(540, Duration::from_secs(60)), 540);
    // The system's main.cf lists the private instance only while it runs.
    let etc = pf.config_dir().display().to_string();
    assert!(alternate_config_directories().contains(&etc));
    drop(pf);
    assert!(
        !alternate_config_directories().contains(&etc),
        "{etc} left in alternate_config_directories"
    );
}

#[test]
fn private_postfix_instances_started_together_each_remove_their_own_config_entry() {
    // Two at once (as two test binaries may): neither read-modify-write of
    // main.cf may lose the other's entry.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(PostfixSmtpd::start);
        let b = s.spawn(PostfixSmtpd::start);
        (a.join().unwrap(), b.join().unwrap())
    });
    let (da, db) = (
        a.config_dir().display().to_string(),
        b.config_dir().display().to_string(),
    );
    let listed = alternate_config_directories();
    assert!(listed.contains(&da) && listed.contains(&db), "{listed:?}");
    drop(a);
    let listed = alternate_config_directories();
    assert!(!listed.contains(&da) && listed.contains(&db), "{listed:?}");
    // A test that panics while its Postfix runs still removes the entry.
    let (tx, rx) = std::sync::mpsc::channel();
    let panicked = std::thread::spawn(move || {
        let pf = PostfixSmtpd::start();
        let dir = pf.config_dir().display().to_string();
        tx.send(dir.clone()).unwrap();
        panic!("a test fails while {dir} is listed");
    })
    .join();
    assert!(panicked.is_err());
    let dc = rx.recv().unwrap();
    drop(b);
    let listed = alternate_config_directories();
    assert!(
        !listed.iter().any(|d| *d == da || *d == db || *d == dc),
        "{listed:?}"
    );
}

#[test]
fn source_addresses_hgrm_and_hlog_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = smtp_sink(&[]);
    let hgrm = dir.path().join("m.hgrm");
    let hlog = dir.path().join("m.hlog");
    let (code, v, err) = blast(
        dir.path(),
        &[
            &addr,
            "-d",
            "2s",
            "-c",
            "4",
            "--threads",
            "2",
            "--source-ip",
            "127.0.0.2-127.0.0.5",
            "--abort-close",
            "--hgrm",
            hgrm.to_str().unwrap(),
            "--hlog",
            hlog.to_str().unwrap(),
            "--warmup",
            "500ms",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(get_u64(&v, "counts.messages_accepted") > 10);
    assert_outcomes_add_up(&v);
    assert!(
        (v["duration_secs"].as_f64().unwrap() - 2.0).abs() < 0.01,
        "{}",
        v["duration_secs"]
    );
    assert!(v["timeline"].as_array().unwrap().len() >= 2);
    let h = std::fs::read_to_string(&hgrm).unwrap();
    assert!(h.contains("Value") && h.contains("Percentile"), "{h}");
    let l = std::fs::read_to_string(&hlog).unwrap();
    assert!(l.contains("Tag=message,"), "{l}");
}

#[test]
fn ctrl_c_reports_what_was_measured_so_far() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = smtp_sink(&[]);
    let json = dir.path().join("int.json");
    // Without --quiet and with stderr not a terminal, blast prints one
    // `progress ...` line per second: the evidence that the run is under way.
    let mut p = Proc::spawn(
        "smtpstorm blast",
        Command::new(bin())
            .args([
                "blast",
                &addr,
                "-d",
                "60s",
                "-c",
                "4",
                "--threads",
                "1",
                "--json",
            ])
            .arg(&json)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped()),
    );
    let stderr = p.child.as_mut().unwrap().stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // Wait (bounded) for a progress line that counts at least one message.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let started = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let counted = line.starts_with("progress ")
                    && line
                        .split_once("total ")
                        .and_then(|(_, t)| t.split_whitespace().next())
                        .and_then(|n| n.parse::<u64>().ok())
                        .is_some_and(|n| n > 0);
                seen.push(line);
                if counted {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    assert!(
        started,
        "no progress line with messages within 20 s: {seen:#?}"
    );
    let _ = Command::new("kill")
        .arg("-INT")
        .arg(p.pid().to_string())
        .status();
    let status = p.wait(Duration::from_secs(20));
    let err = reader.join().unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let v = read_json(&json);
    assert!(get_u64(&v, "counts.messages_accepted") > 0);
    assert!(v["duration_secs"].as_f64().unwrap() < 30.0);
    assert_outcomes_add_up(&v);
}

#[test]
fn a_target_that_cannot_absorb_the_rate_is_a_valid_answer_with_the_achieved_rate() {
    let dir = tempfile::tempdir().unwrap();
    // smtp-sink waits 2 s before answering DATA: 1000 connections carry at
    // most 500 messages/s, so at 800/s messages soon wait for a connection.
    let (_sink, addr) = smtp_sink(&["-w", "2", "-m", "2000"]);
    let (code, v, err) = blast(
        dir.path(),
        &[
            &addr,
            "--rate",
            "800",
            "-d",
            "3s",
            "--threads",
            "1",
            "--timeout",
            "10s",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["valid"], serde_json::Value::Bool(true), "{}", v["invalid_reasons"]);
    let o = &v["open_loop"];
    assert_eq!(o["bottleneck"], "target", "{o}");
    assert_eq!(o["requested_per_sec"].as_f64(), Some(800.0), "{o}");
    let achieved = o["achieved_per_sec"].as_f64().unwrap();
    assert!(achieved < 760.0, "achieved {achieved}/s: the target held it back");
    assert!(get_u64(&v, "open_loop.messages_waited") > 0, "{o}");
    assert!(err.contains("the target could not absorb 800.0 messages/s"), "{err}");
    // Corrected from the intended time: the 2 s DATA delay and the wait
    // for a connection are in it.
    assert!(get_u64(&v, "latency.message.p99_us") > 2_000_000);
    assert_outcomes_add_up(&v);
}

#[test]
fn instances_split_the_work_and_the_sequence_space() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = smtp_sink(&[]);
    let mut total = 0;
    for i in 0..2 {
        let inst = format!("{i}/2");
        let (code, v, err) = blast(
            dir.path(),
            &[
                &addr,
                "-n",
                "101",
                "-c",
                "4",
                "--threads",
                "1",
                "--instance",
                &inst,
            ],
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(v["config"]["instance"], serde_json::Value::String(inst));
        total += get_u64(&v, "counts.messages_accepted");
    }
    assert_eq!(total, 101);
}

#[test]
fn a_regression_against_the_baseline_exits_99() {
    let dir = tempfile::tempdir().unwrap();
    let (_sink, addr) = smtp_sink(&[]);
    let (code, mut v, err) = blast(
        dir.path(),
        &[&addr, "-n", "50", "-c", "2", "--threads", "1"],
    );
    assert_eq!(code, 0, "{err}");
    // A baseline a thousand times faster than anything this run can do.
    let rate = v["rates"]["messages_per_sec"].as_f64().unwrap();
    v["rates"]["messages_per_sec"] = serde_json::json!(rate * 1000.0);
    let base = dir.path().join("baseline.json");
    std::fs::write(&base, serde_json::to_string(&v).unwrap()).unwrap();
    let (code, _, err) = blast(
        dir.path(),
        &[
            &addr,
            "-n",
            "50",
            "-c",
            "2",
            "--threads",
            "1",
            "--baseline",
            base.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 99, "{err}");
    assert!(err.contains("rate(messages) regressed"), "{err}");
}
