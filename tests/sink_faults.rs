//! `smtpstorm sink --fault`, `--capture` and `--verify` against Python
//! smtplib over loopback. The client counts what it saw; the sink's JSON
//! must agree exactly, and seeded fault rates must fall within a binomial
//! bound. Every wait is bounded.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, free_port, get_u64, read_json, wait_for_listen, wait_for_port, Proc, PYTHON};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

struct Sink {
    proc: Proc,
    port: u16,
    json: PathBuf,
    dir: tempfile::TempDir,
}

impl Sink {
    fn start(extra: &[&str]) -> Sink {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("sink.json");
        let port = free_port();
        let mut cmd = Command::new(bin());
        cmd.args(["sink", "--threads", "2", "--quiet", "--grace", "2s"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--json")
            .arg(&json)
            .args(extra)
            .stdout(Stdio::null());
        let proc = Proc::spawn("smtpstorm sink", &mut cmd);
        wait_for_port(
            format!("127.0.0.1:{port}").parse().unwrap(),
            Duration::from_secs(20),
        );
        Sink {
            proc,
            port,
            json,
            dir,
        }
    }

    #[track_caller]
    fn stop(mut self) -> (Value, tempfile::TempDir) {
        self.proc.terminate();
        let st = self.proc.wait(WAIT);
        assert!(st.success(), "sink exited with {st:?}");
        (read_json(&self.json), self.dir)
    }
}

/// Runs a Python script (with `PORT` defined) and returns the last stdout
/// line parsed as JSON.
#[track_caller]
fn python(port: u16, body: &str) -> Value {
    let script = format!("import smtplib, json, sys, time, hashlib\nPORT = {port}\n{body}");
    let out = common::run("python", Command::new(PYTHON).args(["-c", &script]), WAIT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("JSON on the last line")
}

fn code(v: &Value, cmd: &str, code: &str) -> u64 {
    v["reply_codes"][cmd][code].as_u64().unwrap_or(0)
}

#[test]
fn seeded_rcpt_451_rate_is_within_a_binomial_bound_and_counts_agree() {
    let sink = Sink::start(&["--fault", "rcpt:451:20%", "--seed", "42"]);
    let seen = python(
        sink.port,
        r#"
s = smtplib.SMTP("127.0.0.1", PORT, timeout=20)
ok = refused = 0
for i in range(1000):
    try:
        s.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nbody\r\n")
        ok += 1
    except smtplib.SMTPRecipientsRefused as e:
        assert list(e.recipients.values())[0][0] == 451, e
        refused += 1
        s.rset()
s.quit()
print(json.dumps({"ok": ok, "refused": refused}))
"#,
    );
    let (ok, refused) = (
        seen["ok"].as_u64().unwrap(),
        seen["refused"].as_u64().unwrap(),
    );
    assert_eq!(ok + refused, 1000);
    // n = 1000, p = 0.2: mean 200, sigma = 12.6; allow 5 sigma.
    assert!((137..=263).contains(&refused), "{refused} refusals");
    let (v, _) = sink.stop();
    assert_eq!(code(&v, "rcpt", "451"), refused);
    assert_eq!(get_u64(&v, "counts.messages_accepted"), ok);
}

#[test]
fn greylist_defers_the_first_attempt_and_accepts_a_retry_after_the_window() {
    let sink = Sink::start(&["--fault", "rcpt:greylist=1s"]);
    // Retry every 50 ms until accepted (bounded). Each attempt reports its
    // code and when it started and ended (monotonic, seconds).
    let seen = python(
        sink.port,
        r#"
def send():
    t0 = time.monotonic()
    s = smtplib.SMTP("127.0.0.1", PORT, timeout=20)
    try:
        s.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nbody\r\n")
        code = 250
    except smtplib.SMTPRecipientsRefused as e:
        code = list(e.recipients.values())[0][0]
    finally:
        s.quit()
    return [code, t0, time.monotonic()]
attempts = [send()]
while attempts[-1][0] != 250 and time.monotonic() - attempts[0][1] < 20:
    time.sleep(0.05)
    attempts.append(send())
print(json.dumps(attempts))
"#,
    );
    let window = 1.0;
    let attempts: Vec<(u64, f64, f64)> = seen
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a[0].as_u64().unwrap(),
                a[1].as_f64().unwrap(),
                a[2].as_f64().unwrap(),
            )
        })
        .collect();
    let (first_code, first_start, first_end) = attempts[0];
    assert_eq!(first_code, 451, "first attempt: {attempts:?}");
    let (last_code, _, last_end) = *attempts.last().unwrap();
    assert_eq!(last_code, 250, "never accepted: {attempts:?}");
    // The sink saw the first attempt somewhere in [first_start, first_end]
    // and each retry within its own [start, end]: a retry that ended less
    // than the window after the first began is certainly inside the window
    // (451), one that started the window after the first ended is certainly
    // past it (250).
    for &(code, start, end) in &attempts[1..] {
        if end - first_start < window {
            assert_eq!(code, 451, "accepted inside the window: {attempts:?}");
        }
        if start - first_end >= window {
            assert_eq!(code, 250, "deferred past the window: {attempts:?}");
        }
    }
    assert!(
        last_end - first_start >= window,
        "accepted {} s after the first attempt: {attempts:?}",
        last_end - first_start
    );
    let deferred = attempts.len() as u64 - 1;
    let (v, _) = sink.stop();
    assert_eq!(code(&v, "rcpt", "451"), deferred);
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 1);
}

#[test]
fn connect_rate_limit_answers_421_past_the_budget() {
    // One thread so the whole budget of 5/s is in one bucket.
    let dir_sink = {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("sink.json");
        let port = free_port();
        let mut cmd = Command::new(bin());
        cmd.args([
            "sink",
            "--threads",
            "1",
            "--quiet",
            "--fault",
            "connect:ratelimit=5",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::null());
        let proc = Proc::spawn("smtpstorm sink", &mut cmd);
        // No probe connection here (it would spend a token): wait for the
        // listening socket itself.
        wait_for_listen(port, Duration::from_secs(20));
        Sink {
            proc,
            port,
            json,
            dir,
        }
    };
    let seen = python(
        dir_sink.port,
        r#"
ok = limited = 0
t0 = time.time()
for i in range(20):
    try:
        s = smtplib.SMTP("127.0.0.1", PORT, timeout=20)
        s.quit()
        ok += 1
    except smtplib.SMTPConnectError as e:
        assert e.smtp_code == 421, e
        limited += 1
print(json.dumps({"ok": ok, "limited": limited, "secs": time.time() - t0}))
"#,
    );
    let ok = seen["ok"].as_u64().unwrap();
    let limited = seen["limited"].as_u64().unwrap();
    let secs = seen["secs"].as_f64().unwrap();
    assert_eq!(ok + limited, 20);
    assert!(limited > 0, "{seen}");
    // At most the bucket (5) plus the 5/s refill.
    assert!(ok >= 5, "the full bucket was not granted: {seen}");
    assert!((ok as f64) <= 5.0 + 5.0 * secs + 1.0, "{seen}");
    let (v, _) = dir_sink.stop();
    assert_eq!(code(&v, "connect", "421"), limited);
}

#[test]
fn data_disconnect_faults_are_counted_as_messages_ended_by_a_connection_error() {
    let sink = Sink::start(&["--fault", "data:disconnect:50%", "--seed", "7"]);
    let seen = python(
        sink.port,
        r#"
ok = dropped = 0
for i in range(40):
    s = smtplib.SMTP("127.0.0.1", PORT, timeout=20)
    try:
        s.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nbody\r\n")
        s.quit()
        ok += 1
    except smtplib.SMTPServerDisconnected:
        dropped += 1
print(json.dumps({"ok": ok, "dropped": dropped}))
"#,
    );
    let ok = seen["ok"].as_u64().unwrap();
    let dropped = seen["dropped"].as_u64().unwrap();
    assert_eq!(ok + dropped, 40);
    assert!(dropped > 0 && ok > 0, "{seen}");
    let (v, _) = sink.stop();
    assert_eq!(get_u64(&v, "counts.messages_accepted"), ok);
    // What the client saw: the connection closed (as the blaster counts it).
    assert_eq!(get_u64(&v, "counts.connection_errors"), dropped);
    assert_eq!(get_u64(&v, "counts.messages_tempfailed"), 0);
    assert_eq!(get_u64(&v, "counts.messages_attempted"), 40);
}

#[test]
fn capture_files_are_byte_identical_to_the_unstuffed_messages() {
    let capture = tempfile::tempdir().unwrap();
    let cap = capture.path().to_str().unwrap().to_string();
    let sink = Sink::start(&["--capture", &cap]);
    let bodies = [
        "Subject: one\r\n\r\nhello\r\n".to_string(),
        "Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nx\r\n".to_string(),
        format!(
            "Subject: big\r\n\r\n{}",
            format!("{}\r\n", "0123456789".repeat(10)).repeat(300)
        ),
    ];
    let list = serde_json::to_string(&bodies).unwrap();
    python(
        sink.port,
        &format!(
            r#"
bodies = json.loads({list:?})
s = smtplib.SMTP("127.0.0.1", PORT, timeout=20)
for b in bodies:
    s.sendmail("a@example.com", ["b@example.com"], b.encode())
s.quit()
print("{{}}")
"#
        ),
    );
    let (v, _) = sink.stop();
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 3);
    let mut got: Vec<Vec<u8>> = std::fs::read_dir(capture.path().join("new"))
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    got.sort();
    let mut want: Vec<Vec<u8>> = bodies.iter().map(|b| b.as_bytes().to_vec()).collect();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn verify_counts_intact_and_corrupt_digests() {
    let sink = Sink::start(&["--verify"]);
    python(
        sink.port,
        r#"
def msg(body, digest_of=None):
    d = hashlib.sha256((digest_of or body)).hexdigest()
    return b"Subject: v\r\nX-Smtpstorm-Digest: sha256=" + d.encode() + b"\r\n\r\n" + body
s = smtplib.SMTP("127.0.0.1", PORT, timeout=20)
s.sendmail("a@example.com", ["b@example.com"], msg(b"intact body\r\n"))
s.sendmail("a@example.com", ["b@example.com"], msg(b"intact body\r\n.dot\r\n"))
s.sendmail("a@example.com", ["b@example.com"], msg(b"changed body\r\n", b"original body\r\n"))
s.sendmail("a@example.com", ["b@example.com"], b"Subject: none\r\n\r\nno digest\r\n")
s.quit()
print("{}")
"#,
    );
    let (v, _) = sink.stop();
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 4);
    assert_eq!(get_u64(&v, "counts.verify_ok"), 2);
    assert_eq!(get_u64(&v, "counts.verify_corrupt"), 1);
}
