//! `--tls-suites` and `--tls-groups` (issue 21, item 5) against a real
//! peer: `openssl s_client -ciphersuites/-groups` says which suite and group
//! it negotiated with the sink, and the sink's report counts the same pair
//! (`counts.tls_negotiated`); the blaster's flags are proven by what the
//! sink negotiated with it; a bad name is one line listing the valid ones.

mod common;
mod sinkproc;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, get_u64, openssl_starttls, read_json, Proc};
use sinkproc::Sink;

/// `openssl s_client -starttls smtp -brief EXTRA` (see
/// [`common::openssl_starttls`]).
fn s_client(addr: &str, extra: &[&str]) -> (bool, String) {
    let args: Vec<&str> = ["-brief"].into_iter().chain(extra.iter().copied()).collect();
    openssl_starttls(addr, &args)
}

/// The value of `key` in `-brief` output (`Ciphersuite: TLS_...`).
fn brief(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no `{key}` in s_client output: {text}"))
}

#[test]
fn the_sink_picks_the_cheapest_suite_from_openssls_offer_and_reports_what_was_negotiated() {
    let sink = Sink::start(&[]);
    // OpenSSL offers TLS_AES_256_GCM_SHA384 first; the sink's order (SHA-256
    // suites first) decides.
    let (ok, text) = s_client(&sink.addr(), &[]);
    assert!(ok && text.contains("221 "), "{text}");
    let suite = brief(&text, "Ciphersuite:");
    assert!(suite.ends_with("_SHA256"), "negotiated {suite}: {text}");
    // A client that offers only SHA-384 and P-384 still gets in.
    let (ok, text) = s_client(
        &sink.addr(),
        &[
            "-ciphersuites",
            "TLS_AES_256_GCM_SHA384",
            "-groups",
            "P-384",
        ],
    );
    assert!(ok && text.contains("221 "), "{text}");
    assert_eq!(brief(&text, "Ciphersuite:"), "TLS_AES_256_GCM_SHA384");
    assert!(
        brief(&text, "Server Temp Key:").contains("secp384r1"),
        "{text}"
    );
    let v = sink.stop();
    let neg = &v["counts"]["tls_negotiated"];
    let first = format!("{} X25519", suite.replacen("TLS_", "TLS13_", 1));
    assert_eq!(neg[first.as_str()], 1, "{neg}");
    assert_eq!(neg["TLS13_AES_256_GCM_SHA384 secp384r1"], 1, "{neg}");
    assert!(v["config"]["tls_suites"].is_null(), "{}", v["config"]);
}

#[test]
fn sink_tls_suites_and_groups_limit_what_a_real_client_can_negotiate() {
    let sink = Sink::start(&[
        "--tls-suites",
        "TLS13_CHACHA20_POLY1305_SHA256,TLS13_AES_256_GCM_SHA384",
        "--tls-groups",
        "secp256r1",
    ]);
    // OpenSSL prefers AES-256 and X25519; the sink takes ChaCha20 (its own
    // first) and P-256 (the only group it has, after a HelloRetryRequest).
    let (ok, text) = s_client(&sink.addr(), &[]);
    assert!(ok && text.contains("221 "), "{text}");
    assert_eq!(brief(&text, "Ciphersuite:"), "TLS_CHACHA20_POLY1305_SHA256");
    assert!(
        brief(&text, "Server Temp Key:").contains("prime256v1"),
        "{text}"
    );
    // A client offering only what the sink left out cannot complete.
    let (_, text) = s_client(&sink.addr(), &["-ciphersuites", "TLS_AES_128_GCM_SHA256"]);
    assert!(!text.contains("Ciphersuite:"), "{text}");
    let v = sink.stop();
    assert_eq!(get_u64(&v, "counts.tls_sessions"), 1, "{}", v["counts"]);
    let neg = &v["counts"]["tls_negotiated"];
    assert_eq!(neg["TLS13_CHACHA20_POLY1305_SHA256 secp256r1"], 1, "{neg}");
    assert_eq!(
        v["config"]["tls_suites"],
        serde_json::json!(["TLS13_CHACHA20_POLY1305_SHA256", "TLS13_AES_256_GCM_SHA384"])
    );
    assert_eq!(v["config"]["tls_groups"], serde_json::json!(["secp256r1"]));
}

#[test]
fn blast_tls_suites_and_groups_are_what_it_offers_and_both_reports_say_what_was_negotiated() {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("blast.json");
    let mut p = Proc::spawn(
        "smtpstorm blast",
        Command::new(bin())
            .args([
                "blast",
                &sink.addr(),
                "-n",
                "3",
                "-c",
                "1",
                "--threads",
                "1",
            ])
            .args(["--starttls", "--tls-suites", "TLS_AES_256_GCM_SHA384"])
            .args(["--tls-groups", "secp384r1,x25519", "--json"])
            .arg(&json)
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let out = p.wait_output(Duration::from_secs(30));
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("tls:")).unwrap_or("");
    assert_eq!(
        line, "tls: TLS13_AES_256_GCM_SHA384 secp384r1 (3); 0 of 3 resumed",
        "{text}"
    );
    let b = read_json(&json);
    assert_eq!(
        b["counts"]["tls_negotiated"]["TLS13_AES_256_GCM_SHA384 secp384r1"], 3,
        "{}",
        b["counts"]
    );
    assert_eq!(
        b["config"]["tls_suites"],
        serde_json::json!(["TLS13_AES_256_GCM_SHA384"])
    );
    let v = sink.stop();
    assert_eq!(
        v["counts"]["tls_negotiated"]["TLS13_AES_256_GCM_SHA384 secp384r1"], 3,
        "{}",
        v["counts"]
    );
}

#[test]
fn a_bad_suite_or_group_name_is_one_line_that_lists_the_valid_ones() {
    for (cmd, flag, bad, valid) in [
        (
            "sink",
            "--tls-suites",
            "RC4-MD5",
            "TLS13_AES_128_GCM_SHA256",
        ),
        ("blast", "--tls-groups", "x448", "X25519, secp256r1"),
    ] {
        let mut args = vec![cmd];
        if cmd == "blast" {
            args.push("127.0.0.1:1");
        }
        let out = Command::new(bin())
            .args(&args)
            .args([flag, bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(flag) && err.contains(bad) && err.contains(valid),
            "{err}"
        );
    }
}
