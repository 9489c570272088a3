//! Odd server certificates with verification off, and real handshakes.
//!
//! The certificates are made by `openssl` at test time: an X.509 v1
//! certificate (`x509 -req` without extensions, the form of Node's
//! `smtp-server` default certificate) with an RSA key, a v1 one with a
//! P-256 key, and an expired v3 one (`openssl ca` with dates in 2020). The
//! sink serves them (`--tls-cert/--tls-key`, STARTTLS and implicit TLS) and
//! `blast --starttls`, `blast --tls` and `probe --starttls` must get through
//! without verification; with `--tls-verify` the v1 one fails with a message
//! that says why. In memory, rustls servers restricted to TLS 1.2 or 1.3
//! present a v1 certificate with its own key (the handshake completes) or
//! with another key of the same type (the client must refuse the
//! signature): skipping verification never skips the signature check.
//! Loopback only; every run bounded in messages and time.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{CertificateError, ClientConnection, ServerConfig, ServerConnection};
use smtpstorm::net::tls::{self, ClientVerify};

#[track_caller]
fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `-newkey` argument for a key type.
fn newkey(kind: &str) -> &'static [&'static str] {
    match kind {
        "rsa" => &["-newkey", "rsa:2048"],
        "ec" => &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        other => panic!("unknown key type {other}"),
    }
}

/// A key and a certificate signing request for `CN=cn`: `(key, csr)`.
fn key_and_csr(dir: &Path, name: &str, kind: &str, cn: &str) -> (PathBuf, PathBuf) {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let mut args = vec!["req", "-new", "-nodes"];
    args.extend_from_slice(newkey(kind));
    args.extend_from_slice(&["-keyout", &key, "-subj", cn, "-out", &csr]);
    openssl(dir, &args);
    (dir.join(key), dir.join(csr))
}

/// A self-signed X.509 **v1** certificate: `(cert, key)`. Checked to be v1.
fn v1_cert(dir: &Path, name: &str, kind: &str) -> (PathBuf, PathBuf) {
    let (key, csr) = key_and_csr(dir, name, kind, &format!("/CN={name}.v1.smtpstorm.test"));
    let cert = dir.join(format!("{name}.pem"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            csr.to_str().unwrap(),
            "-key",
            key.to_str().unwrap(),
            "-days",
            "30",
            "-out",
            cert.to_str().unwrap(),
        ],
    );
    let text = openssl(
        dir,
        &["x509", "-in", cert.to_str().unwrap(), "-noout", "-text"],
    );
    assert!(
        text.contains("Version: 1 (0x0)"),
        "not a v1 certificate:\n{text}"
    );
    (cert, key)
}

/// A self-signed v3 certificate valid only in January 2020: `(cert, key)`.
fn expired_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (key, csr) = key_and_csr(dir, "expired", "ec", "/CN=expired.smtpstorm.test");
    let ca = dir.join("ca");
    std::fs::create_dir_all(&ca).unwrap();
    std::fs::write(ca.join("index.txt"), "").unwrap();
    std::fs::write(ca.join("serial"), "01\n").unwrap();
    std::fs::write(
        ca.join("ca.cnf"),
        "[ca]\ndefault_ca = c\n[c]\ndatabase = index.txt\nnew_certs_dir = .\n\
         serial = serial\ndefault_md = sha256\npolicy = p\nunique_subject = no\n\
         [p]\ncommonName = supplied\n[ext]\nbasicConstraints = CA:FALSE\n\
         subjectAltName = DNS:expired.smtpstorm.test\n",
    )
    .unwrap();
    let cert = dir.join("expired.pem");
    openssl(
        &ca,
        &[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-selfsign",
            "-keyfile",
            key.to_str().unwrap(),
            "-in",
            csr.to_str().unwrap(),
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20200201000000Z",
            "-extensions",
            "ext",
            "-out",
            cert.to_str().unwrap(),
        ],
    );
    let text = openssl(
        dir,
        &["x509", "-in", cert.to_str().unwrap(), "-noout", "-text"],
    );
    assert!(
        text.contains("Version: 3 (0x2)"),
        "not a v3 certificate:\n{text}"
    );
    // -checkend 0 exits 1 for a certificate that has expired.
    let st = Command::new("openssl")
        .args(["x509", "-noout", "-checkend", "0", "-in"])
        .arg(&cert)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(!st.success(), "the certificate should have expired");
    (cert, key)
}

/// A sink serving `cert`/`key` for STARTTLS and implicit TLS.
struct Sink {
    _proc: Proc,
    plain: String,
    implicit: String,
}

impl Sink {
    fn start(cert: &Path, key: &Path) -> Sink {
        let (p, t) = (free_port(), free_port());
        let plain = format!("127.0.0.1:{p}");
        let implicit = format!("127.0.0.1:{t}");
        let proc = Proc::spawn(
            "smtpstorm sink",
            Command::new(bin())
                .args(["sink", "--threads", "1", "--quiet", "--grace", "1s"])
                .args(["--listen", &plain, "--tls-listen", &implicit])
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key)
                .stdout(Stdio::null()),
        );
        for a in [&plain, &implicit] {
            wait_for_port(a.parse().unwrap(), Duration::from_secs(10));
        }
        Sink {
            _proc: proc,
            plain,
            implicit,
        }
    }
}

/// `blast` with `args` (20 messages over 2 connections): every message
/// accepted, every session over TLS.
#[track_caller]
fn blast_accepts_all(dir: &Path, target: &str, args: &[&str]) {
    let mut all = vec![target, "-n", "20", "-c", "2", "--timeout", "10s"];
    all.extend_from_slice(args);
    let (code, v, stderr) = blast(dir, &all);
    assert_eq!(code, 0, "blast {all:?}: {stderr}");
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 20, "{all:?}: {v}");
    assert_eq!(get_u64(&v, "counts.tls_sessions"), 20, "{all:?}: {v}");
    assert_outcomes_add_up(&v);
}

#[track_caller]
fn probe_starttls_succeeds(target: &str, cn: &str) {
    let out = run(
        "smtpstorm probe",
        Command::new(bin()).args(["probe", target, "--starttls", "--timeout", "10s"]),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe --starttls {target}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("subject     CN={cn}")), "{text}");
    assert!(!text.contains("error"), "{text}");
}

#[test]
fn an_x509_v1_certificate_works_without_verification() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ["rsa", "ec"] {
        let (cert, key) = v1_cert(dir.path(), kind, kind);
        let sink = Sink::start(&cert, &key);
        blast_accepts_all(dir.path(), &sink.plain, &["--starttls"]);
        blast_accepts_all(dir.path(), &sink.implicit, &["--tls"]);
        probe_starttls_succeeds(&sink.plain, &format!("{kind}.v1.smtpstorm.test"));
    }
}

#[test]
fn an_expired_certificate_works_without_verification() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = expired_cert(dir.path());
    let sink = Sink::start(&cert, &key);
    blast_accepts_all(dir.path(), &sink.plain, &["--starttls"]);
    blast_accepts_all(dir.path(), &sink.implicit, &["--tls"]);
    probe_starttls_succeeds(&sink.plain, "expired.smtpstorm.test");
}

/// `blast ARGS` expecting every session to fail: the summary (stdout) with
/// the errors seen, and stderr.
fn blast_fails(dir: &Path, args: &[&str]) -> String {
    let json = dir.join(format!("fail-{}.json", free_port()));
    let out = run(
        "smtpstorm blast",
        Command::new(bin())
            .arg("blast")
            .args(args)
            .args(["-n", "2", "-c", "1", "--timeout", "10s", "--json"])
            .arg(&json),
        Duration::from_secs(30),
    );
    let v = read_json(&json);
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 0, "{args:?}: {v}");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn verification_refuses_v1_and_expired_certificates_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (v1, v1_key) = v1_cert(dir.path(), "rsa", "rsa");
    let sink = Sink::start(&v1, &v1_key);
    let ca = v1.to_str().unwrap();
    for (target, mode) in [(&sink.plain, "--starttls"), (&sink.implicit, "--tls")] {
        let text = blast_fails(dir.path(), &[target, mode, "--tls-verify", "--tls-ca", ca]);
        assert!(
            text.contains(
                "the server's certificate is X.509 version 1, which verification cannot check"
            ) && text.contains("without --tls-verify it is used unverified"),
            "{mode}: {text}"
        );
        assert!(!text.contains("OtherError"), "{text}");
    }
    drop(sink);
    let (expired, expired_key) = expired_cert(dir.path());
    let sink = Sink::start(&expired, &expired_key);
    let text = blast_fails(
        dir.path(),
        &[
            &sink.plain,
            "--starttls",
            "--tls-verify",
            "--tls-ca",
            expired.to_str().unwrap(),
        ],
    );
    assert!(text.contains("certificate expired"), "{text}");
}

#[test]
fn the_sink_refuses_a_key_that_is_not_its_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = v1_cert(dir.path(), "a", "rsa");
    let (_, other_key) = v1_cert(dir.path(), "b", "rsa");
    let out = run(
        "smtpstorm sink",
        Command::new(bin())
            .args(["sink", "--threads", "1", "--quiet", "--listen"])
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&other_key),
        Duration::from_secs(20),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("does not belong to the certificate") && err.contains("b.key"),
        "{err}"
    );
}

fn load(cert: &Path, key: &Path) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (
        vec![CertificateDer::from_pem_file(cert).unwrap()],
        PrivateKeyDer::from_pem_file(key).unwrap(),
    )
}

/// A rustls server for one protocol version presenting `chain` and signing
/// with `key`, which need not belong together.
fn server(
    version: &'static rustls::SupportedProtocolVersion,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> ServerConnection {
    let provider = tls::provider();
    let signer = provider.key_provider.load_private_key(key).unwrap();
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(CertifiedKey::new(
            chain, signer,
        ))));
    ServerConnection::new(Arc::new(config)).unwrap()
}

/// Moves bytes between the two until both finish the handshake or one
/// fails; the client's error is returned, a server error panics.
fn handshake(
    client: &mut ClientConnection,
    server: &mut ServerConnection,
) -> Result<(), rustls::Error> {
    for _ in 0..20 {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
            server.process_new_packets().expect("server side");
        }
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets()?;
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    panic!("the handshake did not finish in 20 flights");
}

#[test]
fn handshake_signatures_are_checked_against_the_v1_certificates_key_in_tls_1_2_and_1_3() {
    let dir = tempfile::tempdir().unwrap();
    let client_config = tls::client_config(&ClientVerify::Off, 0, &Default::default()).unwrap();
    for kind in ["rsa", "ec"] {
        let (cert, key) = v1_cert(dir.path(), kind, kind);
        let (_, other_key) = v1_cert(dir.path(), &format!("{kind}-other"), kind);
        for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let what = format!("{kind} {:?}", version.version);
            let name = tls::server_name("localhost").unwrap();
            // The certificate with its own key: the handshake completes.
            let (chain, k) = load(&cert, &key);
            let mut c = ClientConnection::new(Arc::clone(&client_config), name.clone()).unwrap();
            let mut s = server(version, chain, k);
            handshake(&mut c, &mut s).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(c.protocol_version(), Some(version.version), "{what}");
            // The same certificate signed for by another key: refused.
            let (chain, k) = load(&cert, &other_key);
            let mut c = ClientConnection::new(Arc::clone(&client_config), name).unwrap();
            let mut s = server(version, chain, k);
            let err = handshake(&mut c, &mut s).expect_err(&what);
            assert_eq!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::BadSignature),
                "{what}"
            );
        }
    }
}
