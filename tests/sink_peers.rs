//! `smtpstorm sink` against real SMTP clients over loopback: Postfix
//! `smtp-source`, swaks, Python smtplib and `openssl s_client`. Each test
//! starts the sink binary on a free port with `--json`, runs the peer, and
//! checks the sink's counts against exactly what the peer sent. Every wait
//! is bounded.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    bin, free_port, get_u64, read_json, wait_for_open_fds, wait_for_port, Proc, PYTHON, SMTP_SOURCE,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// A sink child with its JSON report path.
struct Sink {
    proc: Proc,
    port: u16,
    tls_port: u16,
    json: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sink {
    fn start(extra: &[&str]) -> Sink {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("sink.json");
        let port = free_port();
        let tls_port = free_port();
        let mut cmd = Command::new(bin());
        cmd.args(["sink", "--threads", "2", "--quiet", "--grace", "3s"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--tls-listen", &format!("127.0.0.1:{tls_port}")])
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
            tls_port,
            json,
            _dir: dir,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Waits for the sink to exit by itself (`--exit-after-*`) and reads its report.
    #[track_caller]
    fn report(mut self) -> Value {
        let st = self.proc.wait(WAIT);
        assert!(st.success(), "sink exited with {st:?}");
        read_json(&self.json)
    }

    /// SIGTERM, then the report.
    #[track_caller]
    fn stop(self) -> Value {
        self.proc.terminate();
        self.report()
    }
}

/// The `wait_for_port` probe connects and closes without a word: a
/// connection without a session, not a session.
const PROBE_SESSIONS: u64 = 0;

#[track_caller]
fn run_ok(name: &str, cmd: &mut Command) -> String {
    let out = common::run(name, cmd, WAIT);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} failed: {text}");
    text
}

fn code(v: &Value, cmd: &str, code: &str) -> u64 {
    v["reply_codes"][cmd][code].as_u64().unwrap_or(0)
}

#[test]
fn smtp_source_many_sessions_are_all_counted() {
    let sink = Sink::start(&["--exit-after-messages", "500"]);
    run_ok(
        "smtp-source",
        Command::new(SMTP_SOURCE).args(["-s", "10", "-m", "500", "-c", &sink.addr()]),
    );
    let v = sink.report();
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 500);
    assert_eq!(get_u64(&v, "counts.messages_attempted"), 500);
    assert_eq!(get_u64(&v, "counts.sessions"), 500 + PROBE_SESSIONS);
    assert_eq!(get_u64(&v, "counts.recipients"), 500);
    assert_eq!(get_u64(&v, "counts.connection_errors"), 0);
    assert_eq!(code(&v, "dot", "250"), 500);
}

#[test]
fn smtp_source_several_messages_per_session_and_five_recipients() {
    let sink = Sink::start(&["--exit-after-messages", "200"]);
    // -d: several messages per session; 4 sessions of 50 messages.
    run_ok(
        "smtp-source",
        Command::new(SMTP_SOURCE).args([
            "-d",
            "-s",
            "4",
            "-m",
            "200",
            "-r",
            "5",
            "-c",
            &sink.addr(),
        ]),
    );
    let v = sink.report();
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 200);
    assert_eq!(get_u64(&v, "counts.recipients"), 1000);
    assert_eq!(code(&v, "rcpt", "250"), 1000);
    assert_eq!(code(&v, "dot", "250"), 200);
    // -d: each of the 4 sessions sends message after message.
    assert_eq!(get_u64(&v, "counts.sessions"), 4 + PROBE_SESSIONS);
}

#[test]
fn smtp_source_large_messages_are_counted_byte_for_byte() {
    let sink = Sink::start(&["--exit-after-messages", "20"]);
    run_ok(
        "smtp-source",
        Command::new(SMTP_SOURCE).args(["-s", "2", "-m", "20", "-l", "200000", "-c", &sink.addr()]),
    );
    let v = sink.report();
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 20);
    // smtp-source adds a few header lines to the 200000 body bytes.
    let bytes = get_u64(&v, "counts.bytes");
    assert!((20 * 200_000..20 * 201_000).contains(&bytes), "{bytes}");
}

/// The reply swaks printed to the message's final dot (`<-  ...` in
/// plaintext, `<~  ...` over TLS), and whether that dot went over TLS.
#[track_caller]
fn final_reply(transcript: &str) -> (String, bool) {
    let lines: Vec<&str> = transcript.lines().collect();
    let dot = lines
        .iter()
        .rposition(|l| *l == " -> ." || *l == " ~> .")
        .unwrap_or_else(|| panic!("no final dot in {transcript}"));
    let reply = lines.get(dot + 1).copied().unwrap_or_default();
    (reply.to_string(), lines[dot] == " ~> .")
}

fn swaks(sink: &Sink, extra: &[&str]) -> Command {
    let mut c = Command::new("swaks");
    c.args([
        "--to",
        "rcpt@example.com",
        "--from",
        "sender@example.com",
        "--timeout",
        "20",
    ]);
    c.args(extra);
    if !extra.contains(&"-s") {
        c.args(["-s", &sink.addr()]);
    }
    c
}

#[test]
fn swaks_starttls_implicit_tls_and_pipelining_are_accepted() {
    let sink = Sink::start(&["--exit-after-messages", "3"]);
    let t = run_ok("swaks --tls", &mut swaks(&sink, &["--tls"]));
    assert!(t.contains("<-  220 2.0.0 Ready to start TLS"), "{t}");
    assert_eq!(
        final_reply(&t),
        ("<~  250 2.0.0 Message accepted".to_string(), true),
        "{t}"
    );
    let tls_addr = format!("127.0.0.1:{}", sink.tls_port);
    let t = run_ok(
        "swaks --tlsc",
        &mut swaks(&sink, &["-s", &tls_addr, "--tlsc"]),
    );
    assert_eq!(
        final_reply(&t),
        ("<~  250 2.0.0 Message accepted".to_string(), true),
        "{t}"
    );
    let t = run_ok("swaks --pipeline", &mut swaks(&sink, &["--pipeline"]));
    assert_eq!(
        final_reply(&t),
        ("<-  250 2.0.0 Message accepted".to_string(), false),
        "{t}"
    );
    let v = sink.report();
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 3);
    assert_eq!(code(&v, "dot", "250"), 3);
    assert_eq!(get_u64(&v, "counts.tls_sessions"), 2);
    assert_eq!(get_u64(&v, "counts.sessions"), 3 + PROBE_SESSIONS);
    assert_eq!(code(&v, "starttls", "220"), 1);
}

#[test]
fn swaks_auth_plain_and_login_right_and_wrong_password() {
    let sink = Sink::start(&["--auth", "bob:secret", "--exit-after-sessions", "4"]);
    for mech in ["PLAIN", "LOGIN"] {
        let t = run_ok(
            mech,
            &mut swaks(&sink, &["-a", mech, "-au", "bob", "-ap", "secret"]),
        );
        assert!(
            t.lines()
                .any(|l| l == "<-  235 2.7.0 Authentication successful"),
            "{t}"
        );
        assert_eq!(final_reply(&t).0, "<-  250 2.0.0 Message accepted", "{t}");
    }
    for mech in ["PLAIN", "LOGIN"] {
        let out = common::run(
            mech,
            &mut swaks(&sink, &["-a", mech, "-au", "bob", "-ap", "nope"]),
            WAIT,
        );
        let t = String::from_utf8_lossy(&out.stdout).to_string();
        // swaks exits 28 when authentication fails.
        assert_eq!(out.status.code(), Some(28), "{t}");
        assert!(
            t.lines()
                .any(|l| l == "<** 535 5.7.8 Authentication credentials invalid"),
            "{t}"
        );
    }
    let v = sink.report();
    assert_eq!(code(&v, "auth", "235"), 2);
    assert_eq!(code(&v, "auth", "535"), 2);
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 2);
}

#[test]
fn smtplib_smtputf8_address_is_accepted_and_oversize_is_552() {
    let sink = Sink::start(&["--max-message-size", "10000", "--exit-after-sessions", "3"]);
    let script = format!(
        r#"
import smtplib, sys
port = {port}
s = smtplib.SMTP("127.0.0.1", port, timeout=20)
s.ehlo()
assert s.has_extn("smtputf8"), s.esmtp_features
r = s.sendmail("sénder@exämple.com", ["rcpt@exämple.com"], "Subject: hi\r\n\r\nbody\r\n".encode(), mail_options=["SMTPUTF8"])
assert r == {{}}, r
s.quit()
s = smtplib.SMTP("127.0.0.1", port, timeout=20)
try:
    s.sendmail("a@example.com", ["b@example.com"], b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 200)
    sys.exit("oversize accepted")
except smtplib.SMTPSenderRefused as e:
    assert e.smtp_code == 552, e
except smtplib.SMTPDataError as e:
    assert e.smtp_code == 552, e
s.quit()
# Without SIZE= the body is read to its end and then refused.
s = smtplib.SMTP("127.0.0.1", port, timeout=20)
s.ehlo()
s.mail("a@example.com")
s.rcpt("b@example.com")
code, _ = s.data(b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 200)
assert code == 552, code
s.quit()
print("ok")
"#,
        port = sink.port
    );
    let t = run_ok("python smtplib", Command::new(PYTHON).args(["-c", &script]));
    assert!(t.contains("ok"), "{t}");
    let v = sink.report();
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 1);
    assert_eq!(
        code(&v, "mail", "552") + code(&v, "dot", "552"),
        2,
        "{}",
        v["reply_codes"]
    );
    assert_eq!(code(&v, "dot", "552"), 1);
}

/// Lines a child writes on one pipe, each tagged with the pipe's name
/// (`None` at its end), read by a thread into `tx`.
fn forward_lines(
    name: &'static str,
    pipe: impl std::io::Read + Send + 'static,
    tx: std::sync::mpsc::Sender<(&'static str, Option<String>)>,
) {
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send((name, Some(line)));
        }
        let _ = tx.send((name, None));
    });
}

/// Waits (bounded) for a line from `pipe` that satisfies `want`; returns
/// that pipe's lines up to and including it.
#[track_caller]
fn lines_until(
    rx: &std::sync::mpsc::Receiver<(&'static str, Option<String>)>,
    pipe: &str,
    want: impl Fn(&str) -> bool,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((p, Some(line))) if p == pipe => {
                let done = want(&line);
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Ok((p, None)) if p == pipe => panic!("{pipe} ended after {seen:?}"),
            Ok(_) => {}
            Err(_) => panic!("nothing wanted on {pipe} within 20 s: {seen:?}"),
        }
    }
}

#[test]
fn openssl_s_client_starttls_handshake_then_ehlo_works() {
    let sink = Sink::start(&[]);
    // -brief: "CONNECTION ESTABLISHED" on stderr once the handshake is done;
    // -ign_eof: lines starting with Q or R are sent, not taken as commands.
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-starttls",
            "smtp",
            "-connect",
            &sink.addr(),
            "-brief",
            "-ign_eof",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    forward_lines("stdout", child.stdout.take().unwrap(), tx.clone());
    forward_lines("stderr", child.stderr.take().unwrap(), tx);
    let mut stdin = child.stdin.take().unwrap();
    let mut p = Proc {
        child: Some(child),
        name: "openssl".into(),
    };
    lines_until(&rx, "stderr", |l| l == "CONNECTION ESTABLISHED");
    {
        use std::io::Write;
        stdin.write_all(b"EHLO after.tls\r\n").unwrap();
        stdin.flush().unwrap();
    }
    // The EHLO reply over TLS, whole: it no longer offers STARTTLS.
    let ehlo = lines_until(&rx, "stdout", |l| l.starts_with("250 "));
    assert_eq!(
        ehlo.first().map(String::as_str),
        Some("250-smtpstorm.localhost"),
        "{ehlo:?}"
    );
    assert!(
        ehlo.iter()
            .all(|l| l.starts_with("250") && !l.contains("STARTTLS")),
        "{ehlo:?}"
    );
    {
        use std::io::Write;
        stdin.write_all(b"QUIT\r\n").unwrap();
        stdin.flush().unwrap();
    }
    let quit = lines_until(&rx, "stdout", |l| l.starts_with("221 "));
    assert_eq!(
        quit,
        vec!["221 2.0.0 smtpstorm.localhost closing connection"]
    );
    drop(stdin);
    assert!(p.wait(Duration::from_secs(20)).success());
    let v = sink.stop();
    assert_eq!(get_u64(&v, "counts.tls_sessions"), 1);
    assert_eq!(code(&v, "starttls", "220"), 1);
    // The EHLO after the handshake (openssl's own EHLO came before STARTTLS).
    assert_eq!(code(&v, "ehlo", "250"), 2);
    assert_eq!(code(&v, "quit", "221"), 1);
}

#[test]
fn sink_json_report_validates_against_the_schema() {
    let sink = Sink::start(&["--exit-after-messages", "20"]);
    run_ok(
        "smtp-source",
        Command::new(SMTP_SOURCE).args(["-s", "2", "-m", "20", "-c", &sink.addr()]),
    );
    let v = sink.report();
    let path = format!("{}/schemas/sink.schema.json", env!("CARGO_MANIFEST_DIR"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let validator = jsonschema::draft202012::new(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&v)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(v["role"], "sink");
}

/// utime + stime of `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn out_of_file_descriptors_does_not_spin_and_serving_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("sink.json");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "ulimit -n 48 && exec \"$0\" \"$@\""])
        .arg(bin())
        .args([
            "sink",
            "--threads",
            "1",
            "--quiet",
            "--no-starttls",
            "--listen",
            &addr,
        ])
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::null());
    let mut proc = Proc::spawn("smtpstorm sink (ulimit -n 48)", &mut cmd);
    wait_for_port(addr.parse().unwrap(), Duration::from_secs(20));
    // More connections than descriptors: the kernel completes them into
    // the backlog, accept(2) fails with EMFILE.
    let held: Vec<_> = (0..80)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    // Measure once the sink holds all 48 descriptors.
    wait_for_open_fds(proc.pid(), 48, Duration::from_secs(10));
    let t0 = cpu_ticks(proc.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(proc.pid()) - t0;
    assert!(
        used < 30,
        "sink used {used} ticks in 1 s while out of descriptors"
    );
    drop(held);
    // swaks waits (up to its timeout) in the backlog until descriptors are free.
    let t = run_ok("swaks after EMFILE", &mut {
        let mut c = Command::new("swaks");
        c.args(["--to", "r@example.com", "--timeout", "20", "-s", &addr]);
        c
    });
    assert_eq!(final_reply(&t).0, "<-  250 2.0.0 Message accepted", "{t}");
    proc.terminate();
    assert!(proc.wait(WAIT).success());
    let v = read_json(&json);
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 1);
}
