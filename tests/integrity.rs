//! End-to-end integrity: `smtpstorm blast` against `smtpstorm sink --verify`
//! with faults injected (451 rejects, disconnects after DATA, delays). Every
//! message the blaster counts as accepted must be verified by the sink, none
//! corrupt, and the sink must not have accepted anything the blaster did not
//! count as accepted. The blaster's own totals must add up. Bounded in time.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, free_port, get_u64, read_json, run, wait_for_port, Proc};

#[test]
fn every_accepted_message_is_verified_by_the_sink_under_faults() {
    check(
        &[
            "rcpt:451:10%",
            "data:disconnect:5%",
            "mail:delay=1ms..5ms:20%",
        ],
        &[],
        true,
    );
}

#[test]
fn bdat_messages_with_disconnects_after_the_body_are_never_lost_or_doubled() {
    check(
        &["dot:disconnect421:10%", "data:disconnect:5%", "rcpt:451:5%"],
        &["--bdat", "--size", "100..4KiB"],
        false,
    );
}

#[test]
fn pipelined_sessions_with_disconnects_never_lose_an_accepted_message() {
    check(
        &["dot:disconnect421:15%", "mail:550:5%"],
        &["--pipelining", "on", "--size", "100..4KiB"],
        false,
    );
}

#[track_caller]
fn check(faults: &[&str], blast_extra: &[&str], expect_conn_errors: bool) {
    let dir = tempfile::tempdir().unwrap();
    let sink_json = dir.path().join("sink.json");
    let blast_json = dir.path().join("blast.json");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut sink = Proc::spawn(
        "sink",
        Command::new(bin())
            .args([
                "sink",
                "--threads",
                "2",
                "--quiet",
                "--verify",
                "--grace",
                "2s",
            ])
            .args(["--listen", &addr, "--seed", "7"])
            .args(faults.iter().flat_map(|f| ["--fault", f]))
            .arg("--json")
            .arg(&sink_json)
            .stdout(Stdio::null()),
    );
    wait_for_port(addr.parse().unwrap(), Duration::from_secs(10));
    let out = run(
        "blast",
        Command::new(bin())
            .args(["blast", &addr, "--messages", "2000", "-k", "5", "-c", "8"])
            .args(["--threads", "1", "--timeout", "2s", "--quiet"])
            // The faults fail far more than the default 1%: on purpose.
            .args(["--max-failed", "100%"])
            .args(blast_extra)
            .arg("--json")
            .arg(&blast_json),
        Duration::from_secs(20),
    );
    assert!(
        out.status.code() == Some(0),
        "blast exited {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    sink.terminate();
    assert!(sink.wait(Duration::from_secs(10)).success());
    let s = read_json(&sink_json);
    let b = read_json(&blast_json);
    let b_acc = get_u64(&b, "counts.messages_accepted");
    let outcomes: u64 = [
        "messages_accepted",
        "messages_tempfailed",
        "messages_rejected",
        "connection_errors",
        "timeouts",
        "protocol_errors",
    ]
    .iter()
    .map(|k| get_u64(&b, &format!("counts.{k}")))
    .sum();
    assert_eq!(get_u64(&b, "counts.messages_attempted"), 2000);
    assert_eq!(
        outcomes, 2000,
        "blast outcomes do not add up: {}",
        b["counts"]
    );
    assert!(
        get_u64(&b, "counts.messages_tempfailed") + get_u64(&b, "counts.messages_rejected") > 0,
        "no fault fired: {}",
        b["counts"]
    );
    if expect_conn_errors {
        assert!(
            get_u64(&b, "counts.connection_errors") > 0,
            "no disconnect: {}",
            b["counts"]
        );
    }
    assert_eq!(get_u64(&s, "counts.verify_corrupt"), 0);
    assert_eq!(
        b_acc,
        get_u64(&s, "counts.verify_ok"),
        "sink {} blast {}",
        s["counts"],
        b["counts"]
    );
    assert_eq!(b_acc, get_u64(&s, "counts.messages_accepted"));
}
