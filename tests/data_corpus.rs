//! `blast --data PATH`: real messages built by Python's `email` package
//! (multipart with attachments, 8-bit text, 998-character lines, lines that
//! are or start with dots, LF and CRLF files, an mbox with `From ` lines in
//! a body) go through the real sink, and its `--capture` holds each one
//! byte for byte: the CRLF-normalized original, with `--verify` below one
//! added digest header line (which the sink verifies), over DATA and over
//! BDAT. Every run is bounded (`-n`), all traffic on 127.0.0.1.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(90);

/// Writes the corpus: DIR/corpus/*.eml (some with LF, some with CRLF line
/// ends) and DIR/corpus.mbox (the same messages, mbox-quoted).
const BUILD: &str = r#"
import sys, os, mailbox, email.policy
from email.message import EmailMessage
out = sys.argv[1]
os.makedirs(os.path.join(out, "corpus"))
msgs = []

m = EmailMessage()
m["From"] = "Alice <alice@example.test>"; m["To"] = "bob@example.test"
m["Subject"] = "multipart with attachments"; m["Message-ID"] = "<m1@example.test>"
m.set_content("See the attachments.\n.\n..two dots\n.leading dot\nFrom here on, a body line.\n")
m.add_attachment(bytes(range(256)) * 40, maintype="application", subtype="octet-stream", filename="blob.bin")
m.add_attachment("a,b\n1,2\n", subtype="csv", filename="t.csv")
msgs.append(m)

m = EmailMessage()
m["From"] = "Zoë <zoe@example.test>"; m["To"] = "bob@example.test"
m["Subject"] = "Grüße, 8-bit"; m["Message-ID"] = "<m2@example.test>"
m.set_content("Grüße aus Köln — naïve café, ✓ ünïcödé\n.\n", cte="8bit")
msgs.append(m)

m = EmailMessage()
m["From"] = "carol@example.test"; m["To"] = "bob@example.test"
m["Subject"] = "long lines"; m["Message-ID"] = "<m3@example.test>"
m.set_content("x" * 998 + "\n" + ("word " * 199).strip() + "\n.\n", cte="7bit")
msgs.append(m)

m = EmailMessage()
m["From"] = "dave@example.test"; m["To"] = "bob@example.test"
m["Subject"] = "html and text"; m["Message-ID"] = "<m4@example.test>"
m.set_content("plain part\n")
m.add_alternative("<p>html part</p>\n<p>.</p>\n", subtype="html")
msgs.append(m)

for i, m in enumerate(msgs):
    policy = email.policy.SMTP if i % 2 else email.policy.default
    with open(os.path.join(out, "corpus", "m%d.eml" % i), "wb") as f:
        f.write(m.as_bytes(policy=policy))
box = mailbox.mbox(os.path.join(out, "corpus.mbox"))
for m in msgs:
    box.add(m)
box.flush()
# What each mbox message is, as Python's mailbox reads it back, with the
# mbox's From-quoting undone (the quoting is transport, not content).
import re
os.makedirs(os.path.join(out, "mbox-expected"))
for k in box.keys():
    raw = re.sub(rb"(?m)^>(>*From )", rb"\1", box.get_bytes(k))
    with open(os.path.join(out, "mbox-expected", "%d.eml" % k), "wb") as f:
        f.write(raw)
"#;

/// `\n` not after `\r` becomes `\r\n`; a final CRLF is added if missing.
fn crlf(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut prev = 0;
    for &c in b {
        if c == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(c);
        prev = c;
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The captured messages (`DIR/new/*.eml`), contents only.
fn captured(dir: &Path) -> Vec<Vec<u8>> {
    files_of(&dir.join("new"))
}

struct Sink {
    proc: Proc,
    addr: String,
    capture: PathBuf,
    json: PathBuf,
}

fn sink(dir: &Path, name: &str, verify: bool) -> Sink {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let capture = dir.join(format!("{name}-capture"));
    let json = dir.join(format!("{name}-sink.json"));
    let mut cmd = Command::new(bin());
    cmd.args([
        "sink",
        "--listen",
        &addr,
        "--threads",
        "1",
        "--quiet",
        "--duration",
        "80s",
    ])
    .arg("--capture")
    .arg(&capture)
    .arg("--json")
    .arg(&json)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if verify {
        cmd.arg("--verify");
    }
    let proc = Proc::spawn("smtpstorm sink", &mut cmd);
    wait_for_port(addr.parse::<SocketAddr>().unwrap(), Duration::from_secs(10));
    Sink {
        proc,
        addr,
        capture,
        json,
    }
}

impl Sink {
    fn stop(mut self) -> serde_json::Value {
        self.proc.terminate();
        assert!(self.proc.wait(LIMIT).success());
        read_json(&self.json)
    }
}

/// The files of `dir`, sorted by name, read.
fn files_of(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn corpus(dir: &Path) -> (PathBuf, Vec<Vec<u8>>) {
    let out = run(
        "python3 email",
        Command::new(PYTHON).arg("-c").arg(BUILD).arg(dir),
        LIMIT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cdir = dir.join("corpus");
    let originals = files_of(&cdir);
    // The corpus exercises what it claims to.
    let all = originals.concat();
    assert!(
        originals
            .iter()
            .any(|m| !m.windows(2).any(|w| w == b"\r\n")),
        "an LF file"
    );
    assert!(
        originals.iter().any(|m| m.windows(2).any(|w| w == b"\r\n")),
        "a CRLF file"
    );
    assert!(
        all.windows(3).any(|w| w == b"\n.\n" || w == b"\n.\r"),
        "a lone dot line"
    );
    assert!(all.iter().any(|&b| b >= 0x80), "8-bit bytes");
    assert!(
        all.windows(998).any(|w| w.iter().all(|&b| b == b'x')),
        "a 998-byte line"
    );
    (cdir, originals)
}

/// Each captured message is digest line + one original (CRLF-normalized);
/// returns how often each original was seen.
#[track_caller]
fn match_captures(caps: &[Vec<u8>], originals: &[Vec<u8>], digest: bool) -> BTreeMap<usize, usize> {
    let want: Vec<Vec<u8>> = originals.iter().map(|o| crlf(o)).collect();
    let mut seen = BTreeMap::new();
    for cap in caps {
        let rest = if digest {
            let eol = cap.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
            let line = std::str::from_utf8(&cap[..eol]).unwrap();
            assert!(line.starts_with("X-Smtpstorm-Digest: sha256="), "{line}");
            assert_eq!(line.len(), "X-Smtpstorm-Digest: sha256=".len() + 64 + 2);
            &cap[eol..]
        } else {
            &cap[..]
        };
        let i = want
            .iter()
            .position(|w| w[..] == rest[..])
            .unwrap_or_else(|| {
                panic!(
                    "a captured message matches no original byte for byte:\n{}",
                    String::from_utf8_lossy(rest)
                )
            });
        *seen.entry(i).or_insert(0) += 1;
    }
    seen
}

fn blast(addr: &str, args: &[&str]) {
    let out = run(
        "smtpstorm blast",
        Command::new(bin())
            .args(["blast", addr, "--quiet"])
            .args(args),
        LIMIT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn real_messages_arrive_byte_for_byte_and_verified_over_data_and_bdat() {
    let dir = tempfile::tempdir().unwrap();
    let (cdir, originals) = corpus(dir.path());
    for (name, extra) in [("data", &[][..]), ("bdat", &["--bdat"][..])] {
        let s = sink(dir.path(), name, true);
        let mut args = vec![
            "--data",
            cdir.to_str().unwrap(),
            "--verify",
            "-n",
            "8",
            "-c",
            "2",
        ];
        args.extend_from_slice(extra);
        blast(&s.addr, &args);
        let caps = captured(&s.capture);
        let report = s.stop();
        assert_eq!(caps.len(), 8, "{name}");
        let seen = match_captures(&caps, &originals, true);
        assert_eq!(
            seen.values().copied().collect::<Vec<_>>(),
            vec![2; originals.len()],
            "{name}: round robin sends each message twice in 8"
        );
        assert_eq!(get_u64(&report, "counts.verify_ok"), 8, "{name}");
        assert_eq!(get_u64(&report, "counts.verify_corrupt"), 0, "{name}");
    }
}

#[test]
fn an_mbox_is_sent_as_given_and_shuffled_by_seed() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let originals = files_of(&dir.path().join("mbox-expected"));
    let mbox = dir.path().join("corpus.mbox");
    assert!(
        std::fs::read_to_string(&mbox)
            .unwrap()
            .contains("\n>From here on"),
        "the mbox quotes a From line in a body"
    );
    let s = sink(dir.path(), "mbox", false);
    blast(
        &s.addr,
        &[
            "--data",
            mbox.to_str().unwrap(),
            "--data-order",
            "shuffle",
            "--seed",
            "7",
            "-n",
            "4",
            "-c",
            "1",
        ],
    );
    let caps = captured(&s.capture);
    let report = s.stop();
    assert_eq!(get_u64(&report, "counts.messages_accepted"), 4);
    // Without --verify nothing is added: each capture is an original, and a
    // shuffled pass still sends every message once.
    let seen = match_captures(&caps, &originals, false);
    assert_eq!(seen.len(), originals.len(), "{seen:?}");
}

#[test]
fn bad_data_paths_are_one_clear_error_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let headers_only = dir.path().join("h.eml");
    std::fs::write(&headers_only, "Subject: nothing after me\n").unwrap();
    for (path, verify, want) in [
        (empty.clone(), false, "no message in it"),
        (dir.path().join("missing"), false, "cannot read --data"),
        (
            headers_only.clone(),
            true,
            "has no empty line between its header and body",
        ),
    ] {
        let mut cmd = Command::new(bin());
        cmd.args(["blast", "127.0.0.1:9", "-n", "1", "--quiet", "--data"])
            .arg(&path);
        if verify {
            cmd.arg("--verify");
        }
        let out = run("smtpstorm blast", &mut cmd, LIMIT);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(want) && err.trim().lines().count() == 1,
            "{err}"
        );
    }
}

/// An old-Mac file (CR line ends only) and one mixing CR, LF and CRLF are
/// normalized: every line end arrives as CRLF, and the sink (which refuses
/// bare CRs by default) accepts them byte for byte.
#[test]
fn bare_crs_in_data_files_are_sent_as_crlf_and_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let cdir = dir.path().join("cr");
    std::fs::create_dir(&cdir).unwrap();
    std::fs::write(
        cdir.join("a.eml"),
        b"Subject: old mac\r\rline one\rline two\r",
    )
    .unwrap();
    std::fs::write(
        cdir.join("b.eml"),
        b"Subject: mixed\r\n\nbinary\x01\rcr\nlf\r\ncrlf\r\r\nend",
    )
    .unwrap();
    let s = sink(dir.path(), "cr", false);
    blast(
        &s.addr,
        &["--data", cdir.to_str().unwrap(), "-n", "2", "-c", "1"],
    );
    let mut caps = captured(&s.capture);
    let report = s.stop();
    assert_eq!(get_u64(&report, "counts.messages_accepted"), 2, "{report}");
    assert_eq!(get_u64(&report, "counts.messages_rejected"), 0, "{report}");
    caps.sort();
    let mut want = vec![
        b"Subject: old mac\r\n\r\nline one\r\nline two\r\n".to_vec(),
        b"Subject: mixed\r\n\r\nbinary\x01\r\ncr\r\nlf\r\ncrlf\r\n\r\nend\r\n".to_vec(),
    ];
    want.sort();
    assert_eq!(caps, want);
}

/// A 0-byte `.eml` is refused the same way named directly or found in a
/// directory: one line naming the file, exit 2, before any connection.
#[test]
fn an_empty_eml_is_refused_alike_named_directly_or_inside_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cdir = dir.path().join("c");
    std::fs::create_dir(&cdir).unwrap();
    std::fs::write(cdir.join("a.eml"), "Subject: fine\n\nbody\n").unwrap();
    let empty = cdir.join("b.eml");
    std::fs::write(&empty, "").unwrap();
    let named = format!("--data {}: empty file (0 bytes)", empty.display());
    for path in [&cdir, &empty] {
        let out = run(
            "smtpstorm blast",
            Command::new(bin())
                .args(["blast", "127.0.0.1:9", "-n", "1", "--quiet", "--data"])
                .arg(path),
            LIMIT,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", path.display());
        assert!(
            err.contains(&named) && err.trim().lines().count() == 1,
            "{}: {err}",
            path.display()
        );
    }
}
