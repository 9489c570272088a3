//! `--size` distributions and `--scenario` profiles against the real
//! sink: the sizes, TLS and BDAT each profile asks for are what the sink
//! receives, in the shares the weights give.

mod common;
mod sinkproc;

use common::{assert_outcomes_add_up, blast, get_u64};
use sinkproc::Sink;

fn captured_sizes(dir: &std::path::Path) -> Vec<u64> {
    let mut out = Vec::new();
    for e in walk(dir) {
        out.push(std::fs::metadata(&e).unwrap().len());
    }
    out
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
}

#[test]
fn a_size_distribution_sends_each_size_in_its_share() {
    let cap = tempfile::tempdir().unwrap();
    let sink = Sink::start(&["--capture", cap.path().to_str().unwrap()]);
    let (code, v, err) = blast(
        sink.dir.path(),
        &[
            &sink.addr(),
            "--messages",
            "600",
            "-c",
            "4",
            "-k",
            "3",
            "--seed",
            "11",
            "--size",
            "2KiB:50%,8KiB:30%,64KiB:20%",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_outcomes_add_up(&v);
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 600);
    assert_eq!(v["config"]["size"], "2048:50%,8192:30%,65536:20%");
    let s = sink.stop();
    let sizes = captured_sizes(cap.path());
    assert_eq!(sizes.len(), 600, "every message captured");
    let mut n = [0u64; 3];
    for s in &sizes {
        match s {
            2048 => n[0] += 1,
            8192 => n[1] += 1,
            65536 => n[2] += 1,
            other => panic!("a message of {other} bytes, not one of the sizes"),
        }
    }
    // 600 draws: a share's standard deviation is at most 2.1 points.
    for (i, w) in [0.5, 0.3, 0.2].into_iter().enumerate() {
        let share = n[i] as f64 / 600.0;
        assert!((share - w).abs() < 0.07, "size {i}: {share} vs {w} ({n:?})");
    }
    let bytes = n[0] * 2048 + n[1] * 8192 + n[2] * 65536;
    assert_eq!(get_u64(&s, "counts.bytes"), bytes, "the sink's bytes");
    assert_eq!(get_u64(&v, "counts.bytes"), bytes, "the blaster's bytes");
}

#[test]
fn a_bad_size_distribution_names_size_and_the_form() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::run(
        "smtpstorm blast",
        std::process::Command::new(common::bin()).args([
            "blast",
            "127.0.0.1:1",
            "--size",
            "1KiB:50%,4KiB:40%",
        ]),
        std::time::Duration::from_secs(10),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--size") && err.contains("SIZE:WEIGHT%") && err.contains("sum to 90%"),
        "{err}"
    );
    drop(dir);
}

const MIX: &str = r#"
# Three plain sessions of small messages for one STARTTLS session of
# larger ones sent with BDAT.
[[profile]]
name = "plain"
weight = 3
size = "1KiB"
messages_per_session = 1

[[profile]]
name = "secure"
weight = 1
size = "4KiB"
tls = "starttls"
bdat = true
messages_per_session = 2
"#;

#[test]
fn a_three_to_one_scenario_splits_sessions_and_keeps_each_profiles_tls_and_size() {
    let sink = Sink::start(&[]);
    let file = sink.dir.path().join("mix.toml");
    std::fs::write(&file, MIX).unwrap();
    let (code, v, err) = blast(
        sink.dir.path(),
        &[
            &sink.addr(),
            "--sessions",
            "4000",
            "-c",
            "16",
            "--seed",
            "3",
            "--scenario",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_outcomes_add_up(&v);
    let p = |name: &str, k: &str| get_u64(&v, &format!("profiles.{name}.counts.{k}"));
    let (plain, secure) = (p("plain", "sessions"), p("secure", "sessions"));
    assert_eq!(plain + secure, 4000, "{}", v["profiles"]);
    assert_eq!(get_u64(&v, "counts.sessions"), 4000);
    let ratio = plain as f64 / secure as f64;
    assert!(
        (ratio / 3.0 - 1.0).abs() < 0.05,
        "3:1 within 5%: {plain}:{secure}"
    );
    // Each profile's TLS, messages per session and size.
    assert_eq!(p("plain", "tls_sessions"), 0);
    assert_eq!(p("secure", "tls_sessions"), secure);
    assert_eq!(p("plain", "messages_accepted"), plain);
    assert_eq!(p("secure", "messages_accepted"), 2 * secure);
    assert_eq!(p("plain", "bytes"), 1024 * plain);
    assert_eq!(p("secure", "bytes"), 4096 * 2 * secure);
    // BDAT for the secure profile only, DATA for the plain one.
    assert_eq!(get_u64(&v, "reply_codes.bdat.250"), 2 * secure);
    assert_eq!(get_u64(&v, "reply_codes.data.354"), plain);
    assert!(v["profiles"]["secure"]["latency"]["starttls"].is_object());
    assert!(v["profiles"]["plain"]["latency"].get("starttls").is_none());
    assert_eq!(v["config"]["scenario"]["profiles"][1]["tls"], "starttls");
    // The sink's counts agree.
    let s = sink.stop();
    assert_eq!(get_u64(&s, "counts.sessions"), 4000);
    assert_eq!(get_u64(&s, "counts.tls_sessions"), secure);
    assert_eq!(get_u64(&s, "counts.messages_accepted"), plain + 2 * secure);
    assert_eq!(get_u64(&s, "counts.bytes"), 1024 * plain + 8192 * secure);
}

#[test]
fn a_bad_scenario_file_names_the_file_the_line_and_what_was_expected() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[[profile]]\nname = \"a\"\nweight = 1\ntls = \"ssl\"\n",
    )
    .unwrap();
    let out = common::run(
        "smtpstorm blast",
        std::process::Command::new(common::bin())
            .args(["blast", "127.0.0.1:1", "--scenario"])
            .arg(&file),
        std::time::Duration::from_secs(10),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let want = format!("--scenario {}:4: ", file.display());
    assert!(err.contains(&want) && err.contains("starttls"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}
