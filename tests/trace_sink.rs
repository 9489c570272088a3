//! `sink --trace` against what `blast` sends (issue 19, bad traces):
//! - a malformed, truncated or foreign trace header, or one only in the
//!   body, is counted as untraced and never as a delivery;
//! - a header section of 1,000 lines still has its trace found;
//! - `blast --trace` to `sink --trace --verify`: every accepted number is
//!   delivered once, the digest still verifies, and the sets match;
//! - without `--trace` neither report has a `trace` key.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, free_port, get_u64, read_json, Proc};

/// A sink with `args` on a free port that stops after `n` messages; returns
/// it, its port and where it writes its JSON.
fn sink(dir: &Path, n: u64, args: &[&str]) -> (Proc, u16, std::path::PathBuf) {
    let port = free_port();
    let json = dir.join(format!("sink-{port}.json"));
    let p = Proc::spawn(
        "smtpstorm sink",
        Command::new(bin())
            .arg("sink")
            .args(["--listen", &format!("127.0.0.1:{port}"), "--quiet"])
            .args(["--threads", "1", "--exit-after-messages", &n.to_string()])
            .args(["--duration", "60s"])
            .args(args)
            .arg("--json")
            .arg(&json)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    common::wait_for_listen(port, Duration::from_secs(10));
    (p, port, json)
}

fn finish(mut p: Proc, json: &Path) -> serde_json::Value {
    let st = p.wait(Duration::from_secs(60));
    assert!(st.success(), "sink exit {st:?}");
    read_json(json)
}

const STAMP: &str = "1795368985123456789";

#[test]
fn malformed_truncated_foreign_or_body_only_traces_are_untraced_never_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let bodies = [
        // Malformed: a bad run id; a missing time (truncated); an extra
        // field; another tool's header of the same name; only in the body.
        format!("X-Smtpstorm-Trace: 0123456789abcdeZ 1 {STAMP}\nSubject: a\n\nbody\n"),
        "X-Smtpstorm-Trace: 0123456789abcdef 1\nSubject: b\n\nbody\n".to_string(),
        format!("X-Smtpstorm-Trace: 0123456789abcdef 1 {STAMP} x\nSubject: c\n\nbody\n"),
        "X-Smtpstorm-Trace: sent by some other tool\nSubject: d\n\nbody\n".to_string(),
        format!("Subject: e\n\nX-Smtpstorm-Trace: 0123456789abcdef 1 {STAMP}\n"),
    ];
    let (p, port, json) = sink(dir.path(), 5 * 4, &["--trace"]);
    for (i, b) in bodies.iter().enumerate() {
        let f = dir.path().join(format!("bad{i}.eml"));
        std::fs::write(&f, b).unwrap();
        let (code, _, err) = common::blast(
            dir.path(),
            &[
                &format!("127.0.0.1:{port}"),
                "--body",
                f.to_str().unwrap(),
                "-n",
                "4",
                "-c",
                "1",
            ],
        );
        assert_eq!(code, 0, "{err}");
    }
    let v = finish(p, &json);
    assert_eq!(get_u64(&v, "trace.untraced"), 20, "{}", v["trace"]);
    assert!(v["trace"].get("runs").is_none(), "{}", v["trace"]);
}

#[test]
fn a_trace_after_a_thousand_header_lines_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut msg = String::new();
    for i in 0..1000 {
        msg.push_str(&format!("X-Filler-{i}: {}\n", "f".repeat(i % 60)));
    }
    // Folded, as an MTA may leave it.
    msg.push_str(&format!(
        "X-Smtpstorm-Trace: 00000000000000aa 7\n\t{STAMP}\n"
    ));
    msg.push_str("Subject: deep\n\nbody\n");
    let f = dir.path().join("deep.eml");
    std::fs::write(&f, msg).unwrap();
    let (p, port, json) = sink(dir.path(), 3, &["--trace"]);
    let (code, _, err) = common::blast(
        dir.path(),
        &[
            &format!("127.0.0.1:{port}"),
            "--body",
            f.to_str().unwrap(),
            "-n",
            "3",
            "-c",
            "1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v = finish(p, &json);
    let r = &v["trace"]["runs"][0];
    assert_eq!(r["run_id"], "00000000000000aa", "{}", v["trace"]);
    assert_eq!(get_u64(r, "messages"), 3);
    assert_eq!(get_u64(r, "delivered"), 1, "the same number three times");
    assert_eq!(get_u64(r, "duplicates"), 2);
    assert_eq!(get_u64(&v, "trace.untraced"), 0);
}

#[test]
fn traced_messages_verify_and_the_delivered_set_is_the_accepted_set() {
    let dir = tempfile::tempdir().unwrap();
    let (p, port, json) = sink(dir.path(), 40, &["--trace", "--verify"]);
    let (code, b, err) = common::blast(
        dir.path(),
        &[
            &format!("127.0.0.1:{port}"),
            "--trace",
            "--verify",
            "-n",
            "40",
            "-c",
            "4",
            "-k",
            "3",
            "--size",
            "300..20KiB",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let s = finish(p, &json);
    assert_eq!(get_u64(&s, "counts.verify_ok"), 40, "{}", s["counts"]);
    assert_eq!(get_u64(&b, "trace.accepted"), 40);
    let r = &s["trace"]["runs"][0];
    assert_eq!(r["run_id"], b["trace"]["run_id"]);
    assert_eq!(r["delivered_set"], b["trace"]["accepted_set"]);
    assert_eq!(get_u64(r, "duplicates"), 0);
    assert_eq!(get_u64(r, "delivery.count"), 40);
}

#[test]
fn without_trace_no_report_has_a_trace_section() {
    let dir = tempfile::tempdir().unwrap();
    let (p, port, json) = sink(dir.path(), 5, &[]);
    let (code, b, err) = common::blast(dir.path(), &[&format!("127.0.0.1:{port}"), "-n", "5"]);
    assert_eq!(code, 0, "{err}");
    let s = finish(p, &json);
    assert!(b.get("trace").is_none() && s.get("trace").is_none());
    assert!(b.get("e2e").is_none());
}
