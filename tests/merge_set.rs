//! `smtpstorm merge` checks the set it is given (issue 22, item 5): the
//! instances 0..N-1 of one distributed run each exactly once, the same N,
//! the same run configuration (`config.config_digest`), starts within
//! `--max-skew`; each problem is named in one line, the exit code is 2
//! unless `--allow-partial`, and the merged report records what it found.
//! And a `--start-at` already past warns and is recorded.
//!
//! The inputs are real: three instances of one run (and a fourth, instance
//! 2 of a run with another total) blasted at a sink on 127.0.0.1, aligned
//! by `--start-at`; the broken sets are those files, copied or with one
//! field changed. Every run is bounded in messages and wall-clock time.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(90);

/// The reports of one run of 3 instances, and `other`: instance 2 of a run
/// of 31 messages instead of 30 (its own share is the same 10 messages).
struct Set {
    dir: PathBuf,
    files: Vec<PathBuf>,
    other: PathBuf,
    blast_stderr: Vec<String>,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs `smtpstorm ARGS`; returns (exit code, stdout, stderr).
#[track_caller]
fn smtpstorm(args: &[&str]) -> (i32, String, String) {
    let out = run("smtpstorm", Command::new(bin()).args(args), LIMIT);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A sink on a free loopback port (killed when dropped) and its address.
fn sink(seconds: u32) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let proc = Proc::spawn(
        "smtpstorm sink",
        Command::new(bin()).args([
            "sink",
            "--listen",
            &addr,
            "--threads",
            "1",
            "--quiet",
            "--duration",
            &format!("{seconds}s"),
        ]),
    );
    wait_for_port(addr.parse().unwrap(), Duration::from_secs(20));
    (proc, addr)
}

fn set() -> &'static Set {
    static SET: OnceLock<Set> = OnceLock::new();
    SET.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("merge_set-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (_sink, addr) = sink(60);
        // Far enough ahead that every process is waiting when it comes.
        let start_at = format!("{:.3}", unix_now() + 2.0);
        let runs: Vec<(String, &str, PathBuf)> = (0..3)
            .map(|i| (format!("{i}/3"), "30", dir.join(format!("blast-{i}.json"))))
            .chain([("2/3".to_string(), "31", dir.join("other-2.json"))])
            .collect();
        let handles: Vec<_> = runs
            .into_iter()
            .map(|(inst, messages, json)| {
                let (addr, start_at) = (addr.clone(), start_at.clone());
                std::thread::spawn(move || {
                    let (code, _, err) = smtpstorm(&[
                        "blast",
                        &addr,
                        "--instance",
                        &inst,
                        "--messages",
                        messages,
                        "-c",
                        "3",
                        "--threads",
                        "1",
                        "--start-at",
                        &start_at,
                        "--quiet",
                        "--json",
                        p(&json),
                    ]);
                    assert_eq!(code, 0, "blast {inst}: {err}");
                    (json, err)
                })
            })
            .collect();
        let mut done: Vec<(PathBuf, String)> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        let (other, _) = done.pop().unwrap();
        Set {
            dir,
            files: done.iter().map(|(f, _)| f.clone()).collect(),
            other,
            blast_stderr: done.into_iter().map(|(_, e)| e).collect(),
        }
    })
}

/// A copy of `from` named `name` in the set's directory, with `edit` applied.
fn variant(from: &Path, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let mut v = read_json(from);
    edit(&mut v);
    let to = set().dir.join(name);
    std::fs::write(&to, serde_json::to_string(&v).unwrap()).unwrap();
    to
}

/// `smtpstorm merge FILES... EXTRA... --json OUT`: (exit code, stdout,
/// stderr, the merged JSON if one was written).
fn merge(files: &[&Path], extra: &[&str], out: &str) -> (i32, String, String, Option<Value>) {
    let json = set().dir.join(out);
    let _ = std::fs::remove_file(&json);
    let mut args: Vec<&str> = vec!["merge"];
    args.extend(files.iter().map(|f| p(f)));
    args.extend(extra);
    args.extend(["--json", p(&json)]);
    let (code, stdout, stderr) = smtpstorm(&args);
    let v = json.exists().then(|| read_json(&json));
    (code, stdout, stderr, v)
}

/// The stderr lines of `merge` that contain `needle`.
fn lines_with<'a>(stderr: &'a str, needle: &str) -> Vec<&'a str> {
    stderr.lines().filter(|l| l.contains(needle)).collect()
}

#[track_caller]
fn assert_schema_valid(doc: &Value) {
    let path = format!("{}/schemas/blast.schema.json", env!("CARGO_MANIFEST_DIR"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let v = jsonschema::draft202012::new(&schema).unwrap();
    let errors: Vec<String> = v
        .iter_errors(doc)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(errors.is_empty(), "schema errors: {errors:#?}");
}

#[test]
fn a_complete_set_merges_and_the_report_says_it_was_complete() {
    let s = set();
    let files: Vec<&Path> = s.files.iter().map(PathBuf::as_path).collect();
    let (code, stdout, stderr, v) = merge(&files, &[], "complete.json");
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("merge:"), "no problem named: {stderr}");
    let v = v.expect("merged JSON written");
    assert_schema_valid(&v);
    let m = &v["merge"];
    assert_eq!(m["instances"], 3, "{m}");
    assert_eq!(
        (m["inputs"].as_u64(), m["merged"].as_u64()),
        (Some(3), Some(3)),
        "{m}"
    );
    assert_eq!(m["missing"], serde_json::json!([]), "{m}");
    assert_eq!(m["duplicates"], serde_json::json!([]), "{m}");
    assert_eq!(m["problems"], serde_json::json!([]), "{m}");
    assert_eq!(m["partial"], false, "{m}");
    assert!(m["start_skew_secs"].as_f64().unwrap() < 2.0, "{m}");
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 30);
    assert!(
        stdout.contains("merge: 3 reports, instances 0..2 of 3, each once, one configuration"),
        "{stdout}"
    );
    // The instances carry one digest; each started on time and said nothing.
    let parts: Vec<Value> = s.files.iter().map(|f| read_json(f)).collect();
    let digest = parts[0]["config"]["config_digest"].as_str().unwrap();
    assert_eq!(digest.len(), 16);
    for (part, err) in parts.iter().zip(&s.blast_stderr) {
        assert_eq!(part["config"]["config_digest"], digest);
        assert_eq!(part["config"]["start_late_secs"], 0.0, "{}", part["config"]);
        assert!(!err.contains("--start-at"), "{err}");
        assert_schema_valid(part);
    }
}

#[test]
fn a_missing_instance_exits_2_and_is_named_in_one_line() {
    let s = set();
    let (code, _, stderr, v) = merge(&[&s.files[0], &s.files[2]], &[], "missing.json");
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(
        lines_with(&stderr, "merge: instance"),
        vec!["smtpstorm: merge: instance 1/3 is missing"],
        "{stderr}"
    );
    assert!(v.is_none(), "nothing written without --allow-partial");
}

#[test]
fn a_doubled_instance_exits_2_and_both_files_are_named() {
    let s = set();
    let copy = variant(&s.files[1], "copy-1.json", |_| {});
    let (code, _, stderr, _) = merge(
        &[&s.files[0], &s.files[1], &copy, &s.files[2]],
        &[],
        "dup.json",
    );
    assert_eq!(code, 2, "{stderr}");
    let want = format!(
        "smtpstorm: merge: instance 1/3 is given twice: {} and {}; only {} added",
        p(&s.files[1]),
        p(&copy),
        p(&s.files[1])
    );
    assert_eq!(
        lines_with(&stderr, "merge: instance"),
        vec![want.as_str()],
        "{stderr}"
    );
}

#[test]
fn an_instance_of_another_n_exits_2_and_its_place_is_missing() {
    let s = set();
    let four = variant(&s.files[2], "of-four-2.json", |v| {
        v["config"]["instance"] = "2/4".into()
    });
    let (code, _, stderr, _) = merge(&[&s.files[0], &s.files[1], &four], &[], "n.json");
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(
        lines_with(&stderr, "merge: "),
        vec![
            format!("smtpstorm: merge: {} is instance 2/4, but the run has 3 instances; not added", p(&four)).as_str(),
            "smtpstorm: merge: instance 2/3 is missing",
            "smtpstorm: merge: not one complete run; nothing written (--allow-partial merges anyway)",
        ],
        "{stderr}"
    );
}

#[test]
fn another_run_configuration_exits_2_naming_what_differs() {
    let s = set();
    // A real instance of a run of 31 messages: its own share (10) and every
    // echoed key are those of the 30-message run; only the digest differs.
    let other = read_json(&s.other);
    assert_eq!(
        other["config"]["messages"],
        read_json(&s.files[2])["config"]["messages"]
    );
    let (code, _, stderr, _) = merge(&[&s.files[0], &s.files[1], &s.other], &[], "cfg.json");
    assert_eq!(code, 2, "{stderr}");
    let named = lines_with(&stderr, "ran another configuration");
    assert_eq!(named.len(), 1, "{stderr}");
    assert!(
        named[0].contains(p(&s.other)) && named[0].contains("config_digest"),
        "{stderr}"
    );
    // A setting that differs is named with both values.
    let bigger = variant(&s.files[2], "bigger-2.json", |v| {
        v["config"]["size_max"] = 4096.into()
    });
    let (code, _, stderr, _) = merge(&[&s.files[0], &s.files[1], &bigger], &[], "cfg2.json");
    assert_eq!(code, 2, "{stderr}");
    let named = lines_with(&stderr, "ran another configuration");
    assert_eq!(named.len(), 1, "{stderr}");
    let was = read_json(&s.files[0])["config"]["size_max"].clone();
    assert!(
        named[0].ends_with(&format!("size_max {was} vs 4096")),
        "{stderr}"
    );
}

#[test]
fn allow_partial_merges_what_is_there_and_records_what_is_missing() {
    let s = set();
    let (code, stdout, stderr, v) = merge(
        &[&s.files[0], &s.files[2]],
        &["--allow-partial"],
        "partial.json",
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        lines_with(&stderr, "merge: instance"),
        vec!["smtpstorm: merge: instance 1/3 is missing"]
    );
    let v = v.expect("merged JSON written");
    assert_schema_valid(&v);
    let m = &v["merge"];
    assert_eq!(m["partial"], true, "{m}");
    assert_eq!(m["missing"], serde_json::json!([1]), "{m}");
    assert_eq!(
        m["problems"],
        serde_json::json!(["instance 1/3 is missing"]),
        "{m}"
    );
    let sum: u64 = [0, 2]
        .iter()
        .map(|&i| get_u64(&read_json(&s.files[i]), "counts.messages_accepted"))
        .sum();
    assert_eq!(get_u64(&v, "counts.messages_accepted"), sum);
    assert!(
        stdout.contains("merge: PARTIAL, 2 of 2 reports added: instance 1/3 is missing"),
        "{stdout}"
    );
}

#[test]
fn starts_further_apart_than_max_skew_exit_2_naming_the_late_one() {
    let s = set();
    let late = variant(&s.files[2], "late-2.json", |v| {
        v["started_at_unix"] = (v["started_at_unix"].as_f64().unwrap() + 5.0).into()
    });
    let files = [s.files[0].as_path(), s.files[1].as_path(), late.as_path()];
    let (code, _, stderr, _) = merge(&files, &[], "skew.json");
    assert_eq!(code, 2, "{stderr}");
    let named = lines_with(&stderr, "start times differ by");
    assert_eq!(named.len(), 1, "{stderr}");
    assert!(
        named[0].contains("more than --max-skew 2 s: ")
            && named[0].contains(&format!("{} started", p(&late))),
        "{stderr}"
    );
    let (code, _, stderr, v) = merge(&files, &["--max-skew", "10s"], "skew-ok.json");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(v.unwrap()["merge"]["max_skew_secs"], 10.0);
}

#[test]
fn a_start_at_already_past_warns_once_and_the_report_records_how_late() {
    let (_sink, addr) = sink(30);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("late.json");
    let past = format!("{:.3}", unix_now() - 30.0);
    let (code, stdout, stderr) = smtpstorm(&[
        "blast",
        &addr,
        "--messages",
        "5",
        "-c",
        "1",
        "--threads",
        "1",
        "--start-at",
        &past,
        "--quiet",
        "--json",
        p(&json),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let warned = lines_with(&stderr, "--start-at");
    assert_eq!(warned.len(), 1, "{stderr}");
    assert!(
        warned[0].contains("passed") && warned[0].contains("config.start_late_secs"),
        "{stderr}"
    );
    let v = read_json(&json);
    assert_schema_valid(&v);
    let late = v["config"]["start_late_secs"].as_f64().unwrap();
    assert!((30.0..60.0).contains(&late), "{}", v["config"]);
    assert!(
        stdout.contains("after --start-at (it had already passed)"),
        "{stdout}"
    );
    // A run without --instance is an independent run: merged with another
    // it is not a set of instances, and nothing is missing.
    let merged = dir.path().join("m.json");
    let (code, _, stderr) = smtpstorm(&["merge", p(&json), p(&json), "--json", p(&merged)]);
    assert_eq!(code, 0, "{stderr}");
    let m = read_json(&merged);
    assert_eq!(m["merge"]["instances"], Value::Null);
    assert_eq!(m["merge"]["problems"], serde_json::json!([]));
}
