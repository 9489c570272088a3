//! `smtpstorm blast` and `probe` against Python `aiosmtpd`: STARTTLS with a
//! self-signed certificate made by `openssl req`, AUTH PLAIN/LOGIN,
//! implicit TLS, and open-loop accuracy against a server that delays its
//! reply to the end of data. Bounded in messages and time; loopback only.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const SERVER_PY: &str = r#"
import asyncio, ssl, sys, time
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

port, cert, key, delay, countfile, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5], sys.argv[6]

class Handler:
    def __init__(self):
        self.n = 0
    async def handle_PROXY(self, server, session, envelope, proxy_data):
        return proxy_data is not None and proxy_data.valid
    async def handle_DATA(self, server, session, envelope):
        if delay > 0:
            await asyncio.sleep(delay)
        self.n += 1
        with open(countfile, "w") as f:
            f.write(str(self.n))
        return "250 2.0.0 OK"

def authenticator(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and auth_data.login == b"user" and auth_data.password == b"secret"
    return AuthResult(success=ok)

ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
kw = dict(authenticator=authenticator, auth_require_tls=False)
if mode == "starttls":
    kw["tls_context"] = ctx
elif mode == "proxy":
    kw["proxy_protocol_timeout"] = 5
elif mode == "implicit":
    kw["ssl_context"] = ctx
c = Controller(Handler(), hostname="127.0.0.1", port=port, ready_timeout=20, **kw)
c.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"#;

struct Aiosmtpd {
    _proc: Proc,
    addr: String,
    countfile: PathBuf,
}

impl Aiosmtpd {
    fn delivered(&self) -> u64 {
        std::fs::read_to_string(&self.countfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = run(
        "openssl req",
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=mx.smtpstorm.test",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

fn aiosmtpd(dir: &Path, mode: &str, delay_secs: f64) -> Aiosmtpd {
    let (cert, key) = self_signed(dir);
    let script = dir.join("server.py");
    std::fs::write(&script, SERVER_PY).unwrap();
    let port = free_port();
    let countfile = dir.join("count");
    let proc = Proc::spawn(
        "aiosmtpd",
        Command::new(PYTHON)
            .arg(&script)
            .arg(port.to_string())
            .arg(&cert)
            .arg(&key)
            .arg(delay_secs.to_string())
            .arg(&countfile)
            .arg(mode)
            .stdout(Stdio::null()),
    );
    let addr = format!("127.0.0.1:{port}");
    wait_for_port(addr.parse().unwrap(), Duration::from_secs(20));
    Aiosmtpd {
        _proc: proc,
        addr,
        countfile,
    }
}

#[test]
fn starttls_and_auth_plain_against_aiosmtpd() {
    let dir = tempfile::tempdir().unwrap();
    let srv = aiosmtpd(dir.path(), "starttls", 0.0);
    let (code, v, err) = blast(
        dir.path(),
        &[
            &srv.addr,
            "--starttls",
            "--auth",
            "user:secret",
            "-n",
            "60",
            "-c",
            "3",
            "-k",
            "3",
            "--threads",
            "1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        get_u64(&v, "counts.messages_accepted"),
        60,
        "{}",
        v["counts"]
    );
    assert_eq!(get_u64(&v, "counts.tls_sessions"), 20);
    assert_eq!(get_u64(&v, "latency.starttls.count"), 20);
    assert_eq!(get_u64(&v, "latency.auth.count"), 20);
    assert_eq!(get_u64(&v, "reply_codes.auth.235"), 20);
    assert_eq!(srv.delivered(), 60);
}

#[test]
fn auth_login_after_starttls_against_aiosmtpd() {
    let dir = tempfile::tempdir().unwrap();
    let srv = aiosmtpd(dir.path(), "starttls", 0.0);
    let (code, v, err) = blast(
        dir.path(),
        &[
            &srv.addr,
            "--starttls",
            "--auth",
            "user:secret",
            "--auth-mech",
            "login",
            "-n",
            "6",
            "-c",
            "2",
            "-k",
            "2",
            "--threads",
            "1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        get_u64(&v, "counts.messages_accepted"),
        6,
        "{}",
        v["counts"]
    );
    assert_eq!(get_u64(&v, "reply_codes.auth.235"), 3);
    assert_eq!(get_u64(&v, "reply_codes.auth.334"), 6);
    assert_eq!(srv.delivered(), 6);
}

#[test]
fn implicit_tls_with_session_resumption_against_aiosmtpd() {
    let dir = tempfile::tempdir().unwrap();
    let srv = aiosmtpd(dir.path(), "implicit", 0.0);
    let (code, v, err) = blast(
        dir.path(),
        &[
            &srv.addr,
            "--tls",
            "--tls-resume",
            "-n",
            "20",
            "-c",
            "2",
            "--threads",
            "1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        get_u64(&v, "counts.messages_accepted"),
        20,
        "{}",
        v["counts"]
    );
    assert_eq!(get_u64(&v, "counts.tls_sessions"), 20);
    assert_eq!(srv.delivered(), 20);
}

#[test]
fn open_loop_keeps_its_rate_and_corrected_latency_shows_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let srv = aiosmtpd(dir.path(), "plain", 0.02);
    let (code, v, err) = blast(
        dir.path(),
        &[
            &srv.addr,
            "--rate",
            "200",
            "-d",
            "5s",
            "-k",
            "5",
            "--threads",
            "2",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let rate = v["rates"]["messages_per_sec"].as_f64().unwrap();
    assert!(
        (rate - 200.0).abs() <= 4.0,
        "achieved {rate}/s, target 200/s: {}",
        v["counts"]
    );
    assert_eq!(v["valid"], Value::Bool(true), "{}", v["invalid_reasons"]);
    let p50 = get_u64(&v, "latency.message.p50_us");
    assert!(
        (20_000..500_000).contains(&p50),
        "message p50 {p50}µs should reflect the 20 ms delay"
    );
    let p50_raw = get_u64(&v, "latency_uncorrected.message.p50_us");
    assert!(p50 >= p50_raw, "corrected {p50} >= uncorrected {p50_raw}");
    assert!(v["schedule_lag"]["count"].as_u64().unwrap() >= 190);
    assert_eq!(srv.delivered(), get_u64(&v, "counts.messages_accepted"));
}

#[test]
fn probe_reports_banner_capabilities_tls_and_auth() {
    let dir = tempfile::tempdir().unwrap();
    let srv = aiosmtpd(dir.path(), "starttls", 0.0);
    let json = dir.path().join("probe.json");
    let out = run(
        "smtpstorm probe",
        Command::new(bin())
            .args([
                "probe",
                &srv.addr,
                "--starttls",
                "--auth",
                "user:secret",
                "--json",
            ])
            .arg(&json),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = read_json(&json);
    assert!(v["banner"].as_str().unwrap().len() > 3, "{v}");
    assert_eq!(v["starttls_offered"], Value::Bool(true));
    assert!(
        v["tls"]["protocol"].as_str().unwrap().starts_with("TLS"),
        "{v}"
    );
    assert!(
        v["tls"]["peer_subject"]
            .as_str()
            .unwrap()
            .contains("mx.smtpstorm.test"),
        "{v}"
    );
    assert!(v["tls"]["peer_not_after"].is_string());
    assert_eq!(v["auth_code"], 235);
    assert!(
        v["auth_mechanisms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "PLAIN"),
        "{v}"
    );
    assert!(v["phases_ms"]["starttls"].as_f64().is_some(), "{v}");
    assert!(
        text.contains("subject") && text.contains("banner"),
        "{text}"
    );
}

#[test]
fn proxy_headers_v1_and_v2_are_understood_by_aiosmtpd() {
    let dir = tempfile::tempdir().unwrap();
    let srv = aiosmtpd(dir.path(), "proxy", 0.0);
    for v in ["v1", "v2"] {
        let (code, j, err) = blast(
            dir.path(),
            &[
                &srv.addr,
                "--proxy",
                v,
                "-n",
                "10",
                "-c",
                "2",
                "--threads",
                "1",
            ],
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            get_u64(&j, "counts.messages_accepted"),
            10,
            "{v}: {}",
            j["counts"]
        );
    }
    assert_eq!(srv.delivered(), 20);
}
