//! Many client identities from one machine: XCLIENT and PROXY.
//!
//! - `sink --xclient` advertises XCLIENT with its attributes, so swaks sends
//!   it, and the sink judges the session by the claimed address (its
//!   greylist keys on it).
//! - `blast --xclient ATTR=TEMPLATE` claims one identity per session (the
//!   sink's greylist sees them all as new clients); against a server that
//!   does not offer XCLIENT every message fails with a clear reason.
//! - Against a private Postfix smtpd that trusts us
//!   (`smtpd_upstream_proxy_protocol = haproxy`, or
//!   `smtpd_authorized_xclient_hosts = 127.0.0.0/8`), `blast --proxy-source`
//!   and `blast --xclient` make its maillog show the claimed addresses.
//!
//! The Postfix tests remove the configuration directory they add to
//! `alternate_config_directories` when they end.

mod common;
mod sinkproc;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{assert_outcomes_add_up, bin, free_port, get_u64, read_json, run, PostfixSmtpd};
use sinkproc::{Client, Sink};

/// `swaks` to `addr` with `extra` flags; (exit code, transcript).
fn swaks(addr: &str, extra: &[&str]) -> (i32, String) {
    let out = run(
        "swaks",
        Command::new("swaks")
            .args([
                "--server",
                addr,
                "--from",
                "s@example.com",
                "--to",
                "r@example.com",
            ])
            .args(["--timeout", "10"])
            .args(extra),
        Duration::from_secs(30),
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// `smtpstorm blast ARGS --quiet --json FILE`: (exit code, report, stdout).
fn blast(dir: &Path, args: &[&str]) -> (i32, serde_json::Value, String) {
    let json = dir.join(format!("blast-{}.json", free_port()));
    let out = run(
        "smtpstorm blast",
        Command::new(bin())
            .arg("blast")
            .args(args)
            .args(["--quiet", "--threads", "1", "--timeout", "10s", "--json"])
            .arg(&json),
        Duration::from_secs(60),
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let code = out.status.code().unwrap_or(-1);
    assert!(json.exists(), "no JSON written (exit {code}): {text}");
    (code, read_json(&json), text)
}

#[test]
fn swaks_sends_xclient_to_the_sink_and_its_message_is_accepted() {
    let sink = Sink::start(&["--xclient"]);
    let (code, t) = swaks(
        &sink.addr(),
        &[
            "--xclient-addr",
            "192.0.2.7",
            "--xclient-name",
            "mx.example",
        ],
    );
    assert_eq!(code, 0, "{t}");
    assert!(
        t.contains("<-  250 XCLIENT NAME ADDR PORT PROTO HELO REVERSE_NAME LOGIN DESTADDR DESTPORT\n"),
        "XCLIENT advertised: {t}"
    );
    let after = t
        .split(" -> XCLIENT ADDR=192.0.2.7 NAME=mx.example\n")
        .nth(1)
        .unwrap_or_else(|| panic!("swaks sent no XCLIENT: {t}"));
    assert!(after.starts_with("<-  220 "), "XCLIENT answered 220: {t}");
    assert!(after.contains(" -> EHLO "), "EHLO again after XCLIENT: {t}");
    assert!(after.contains("<-  250 2.0.0 Message accepted"), "{t}");
    let v = sink.stop();
    assert_eq!(get_u64(&v, "reply_codes.xclient.220"), 1);
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 1);
}

#[test]
fn the_sink_greylists_by_the_address_xclient_claims() {
    // The first attempt of each (sender, recipient, client address) is 451.
    let sink = Sink::start(&["--xclient", "--fault", "rcpt:greylist=0s"]);
    let claim = ["--xclient-addr", "192.0.2.7"];
    let rcpt_code = |t: &str| -> u16 {
        let after = t
            .split(" -> RCPT TO:<r@example.com>\n")
            .nth(1)
            .unwrap_or("");
        after.get(4..7).and_then(|c| c.parse().ok()).unwrap_or(0)
    };
    let (_, t) = swaks(&sink.addr(), &[]);
    assert_eq!(rcpt_code(&t), 451, "first attempt from 127.0.0.1: {t}");
    let (code, t) = swaks(&sink.addr(), &[]);
    assert_eq!((code, rcpt_code(&t)), (0, 250), "retry from 127.0.0.1: {t}");
    // Same socket address, but a new client by its claim: greylisted anew.
    let (_, t) = swaks(&sink.addr(), &claim);
    assert_eq!(rcpt_code(&t), 451, "first attempt claiming 192.0.2.7: {t}");
    let (code, t) = swaks(&sink.addr(), &claim);
    assert_eq!(
        (code, rcpt_code(&t)),
        (0, 250),
        "retry claiming 192.0.2.7: {t}"
    );
    let v = sink.stop();
    assert_eq!(get_u64(&v, "reply_codes.rcpt.451"), 2);
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 2);
}

#[test]
fn blast_claims_one_xclient_identity_per_session() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&["--xclient", "--fault", "rcpt:greylist=0s"]);
    let fixed = ["--from", "a@example.com", "--to", "b@example.com"];
    // Without claims, six sessions are one client: only its first try is
    // greylisted.
    let mut args = vec![sink.addr()];
    args.extend(["-n", "6", "-c", "1"].map(String::from));
    args.extend(fixed.map(String::from));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_, v, _) = blast(dir.path(), &a);
    assert_eq!(
        get_u64(&v, "counts.messages_tempfailed"),
        1,
        "{}",
        v["counts"]
    );
    // With a claimed address per session, all six are new clients.
    let mut a = a.clone();
    a.extend([
        "--xclient",
        "ADDR=198.51.100.0/24",
        "--xclient",
        "NAME=client{n}.example",
    ]);
    let (_, v, out) = blast(dir.path(), &a);
    assert_outcomes_add_up(&v);
    assert_eq!(get_u64(&v, "counts.messages_tempfailed"), 6, "{out}");
    assert_eq!(v["config"]["xclient"][0], "ADDR=198.51.100.0/24");
    let s = sink.stop();
    assert_eq!(get_u64(&s, "reply_codes.xclient.220"), 6);
    assert_eq!(get_u64(&s, "reply_codes.rcpt.451"), 7);
}

#[test]
fn blast_xclient_against_a_server_without_it_fails_every_message_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&[]);
    let (_, v, out) = blast(
        dir.path(),
        &[
            &sink.addr(),
            "-n",
            "3",
            "-c",
            "1",
            "--xclient",
            "ADDR=198.51.100.7",
        ],
    );
    assert_outcomes_add_up(&v);
    assert_eq!(get_u64(&v, "counts.messages_attempted"), 3);
    assert_eq!(
        get_u64(&v, "counts.messages_rejected"),
        3,
        "{}",
        v["counts"]
    );
    assert!(out.contains("XCLIENT required but not offered"), "{out}");
    let s = sink.stop();
    assert_eq!(get_u64(&s, "counts.messages_attempted"), 0);
}

#[test]
fn bad_identity_flags_get_one_line_naming_the_flag() {
    for (args, flag, want) in [
        (
            &["--proxy", "v1", "--proxy-source", "198.51.100.0/33"][..],
            "--proxy-source",
            "expected an IP address, a range A-B or a CIDR block",
        ),
        (
            &["--xclient", "COLOR=red"][..],
            "--xclient",
            "expected ATTR=TEMPLATE",
        ),
        (
            &["--xclient", "NAME=c{i}"][..],
            "--xclient",
            "expected {n} or {instance}",
        ),
    ] {
        let out = run(
            "smtpstorm blast",
            Command::new(bin())
                .args(["blast", "127.0.0.1:9"])
                .args(args),
            Duration::from_secs(10),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        let first = err.lines().next().unwrap_or("");
        assert!(
            first.contains(flag) && first.contains(want),
            "{args:?}: first line {first:?} of {err}"
        );
    }
}

#[test]
fn proxy_source_without_proxy_is_refused_up_front() {
    let out = run(
        "smtpstorm blast",
        Command::new(bin()).args(["blast", "127.0.0.1:9", "--proxy-source", "198.51.100.0/24"]),
        Duration::from_secs(10),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err.trim_end(),
        "smtpstorm: the following required arguments were not provided: --proxy <VERSION>"
    );
}

// ---- against a private Postfix smtpd ----------------------------------------

/// A Postfix smtpd that also takes `extra` main.cf lines; on drop it is
/// stopped and its config directory leaves `alternate_config_directories`.
struct Postfix {
    pf: Option<PostfixSmtpd>,
    etc: PathBuf,
}

impl Postfix {
    fn start(extra: &str) -> Postfix {
        let pf = PostfixSmtpd::start_with(extra);
        let etc = pf.dir.path().join("etc");
        Postfix { pf: Some(pf), etc }
    }

    fn pf(&self) -> &PostfixSmtpd {
        self.pf.as_ref().unwrap()
    }

    fn maillog(&self) -> String {
        std::fs::read_to_string(self.pf().dir.path().join("maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        drop(self.pf.take());
        forget_config_dir(&self.etc);
    }
}

/// Removes `etc` from Postfix's `alternate_config_directories`.
fn forget_config_dir(etc: &Path) {
    let etc = etc.display().to_string();
    let Ok(cur) = Command::new("postconf")
        .args(["-h", "alternate_config_directories"])
        .output()
    else {
        return;
    };
    let cur = String::from_utf8_lossy(&cur.stdout).trim().to_string();
    let kept: Vec<&str> = cur
        .split([' ', ','])
        .filter(|d| !d.is_empty() && *d != etc)
        .collect();
    if kept.join(" ") != cur {
        let _ = Command::new("postconf")
            .arg("-e")
            .arg(format!("alternate_config_directories = {}", kept.join(" ")))
            .status();
    }
}

/// Distinct client addresses in the maillog's `client=NAME[ADDR]` lines
/// (one per message smtpd queued), with the names.
fn queued_clients(log: &str) -> BTreeSet<(String, String)> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split(": client=").nth(1)?;
            let (name, addr) = rest.split_once('[')?;
            let addr = addr.split(']').next()?;
            Some((name.to_string(), addr.to_string()))
        })
        .collect()
}

const TRUSTED_RANGE: &str = "mynetworks = 127.0.0.0/8 198.51.100.0/24\n";

#[test]
fn postfix_behind_haproxy_logs_the_sources_the_proxy_header_claims() {
    let dir = tempfile::tempdir().unwrap();
    let pf = Postfix::start(&format!(
        "{TRUSTED_RANGE}smtpd_upstream_proxy_protocol = haproxy\n"
    ));
    let addr = pf.pf().addr();
    for version in ["v1", "v2"] {
        let (code, v, out) = blast(
            dir.path(),
            &[
                &addr,
                "-n",
                "6",
                "-c",
                "2",
                "--proxy",
                version,
                "--proxy-source",
                "198.51.100.0/24",
            ],
        );
        assert_eq!(code, 0, "{out}");
        assert_eq!(get_u64(&v, "counts.messages_accepted"), 6, "{out}");
    }
    assert_eq!(pf.pf().wait_delivered(12, Duration::from_secs(60)), 12);
    let log = pf.maillog();
    let clients: BTreeSet<String> = queued_clients(&log).into_iter().map(|c| c.1).collect();
    // One thread, six sessions per run: .0 to .5, each claimed twice (v1, v2).
    let want: BTreeSet<String> = (0..6).map(|i| format!("198.51.100.{i}")).collect();
    assert_eq!(clients, want, "{log}");
    assert!(!log.contains("client=localhost[127.0.0.1]"), "{log}");
}

#[test]
fn postfix_trusting_xclient_logs_the_claimed_clients_and_advertises_what_the_sink_does() {
    let dir = tempfile::tempdir().unwrap();
    let pf = Postfix::start(&format!(
        "{TRUSTED_RANGE}smtpd_authorized_xclient_hosts = 127.0.0.0/8\n"
    ));
    let addr = pf.pf().addr();
    // Postfix's attribute list, as its EHLO reply states it.
    let mut c = Client::greeted(pf.pf().port);
    let ehlo = c.expect(b"EHLO probe.example\r\n", 250);
    c.expect(b"QUIT\r\n", 221);
    let postfix_attrs: BTreeSet<&str> = ehlo
        .split("\r\n")
        .find_map(|l| l.get(4..)?.strip_prefix("XCLIENT "))
        .unwrap_or_else(|| panic!("Postfix did not advertise XCLIENT: {ehlo}"))
        .split(' ')
        .collect();
    let sink_attrs: BTreeSet<&str> = smtpstorm::smtp::server::XCLIENT_ATTRIBUTES
        .into_iter()
        .collect();
    assert_eq!(
        sink_attrs, postfix_attrs,
        "the sink advertises what Postfix does"
    );

    let (code, v, out) = blast(
        dir.path(),
        &[
            &addr,
            "-n",
            "8",
            "-c",
            "2",
            "--xclient",
            "ADDR=198.51.100.0/24",
            "--xclient",
            "NAME=client{n}.example",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 8, "{out}");
    assert_eq!(pf.pf().wait_delivered(8, Duration::from_secs(60)), 8);
    let log = pf.maillog();
    let want: BTreeSet<(String, String)> = (0..8)
        .map(|i| (format!("client{i}.example"), format!("198.51.100.{i}")))
        .collect();
    assert_eq!(queued_clients(&log), want, "{log}");
}
