//! `--junit FILE` on `blast`, `bench` and `merge`: every `--assert` and
//! `--baseline` check is a JUnit test case, and the file validates against
//! the JUnit XML schema CI servers read (`tests/data/junit.xsd`, checked by
//! Debian's python3-lxml, installed by `scripts/install-peers.sh`). The
//! validator is first shown a broken document, which it must refuse.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(90);

/// Validates `xml` against the schema and summarises it:
/// `{"valid": bool, "error": str, "tests": n, "failures": n,
///   "cases": [{"classname", "name", "failure": msg|null}], "properties": {name: value}}`.
const CHECK: &str = r#"
import json, sys
from lxml import etree
schema = etree.XMLSchema(etree.parse(sys.argv[1]))
doc = etree.parse(sys.argv[2])
valid = schema.validate(doc)
suite = doc.getroot().find('testsuite')
out = {"valid": valid, "error": str(schema.error_log.last_error) if not valid else ""}
if suite is not None:
    out["tests"] = int(suite.get("tests"))
    out["failures"] = int(suite.get("failures"))
    out["cases"] = [{"classname": c.get("classname"), "name": c.get("name"),
                     "failure": (c.find("failure").get("message") if c.find("failure") is not None else None)}
                    for c in suite.findall("testcase")]
    out["properties"] = {p.get("name"): p.get("value") for p in suite.find("properties")}
print(json.dumps(out))
"#;

fn check(xml: &Path) -> Value {
    let xsd = format!("{}/tests/data/junit.xsd", env!("CARGO_MANIFEST_DIR"));
    let out = run(
        "python3 lxml",
        Command::new(PYTHON).arg("-c").arg(CHECK).arg(&xsd).arg(xml),
        LIMIT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn smtpstorm(args: &[&str]) -> (i32, String) {
    let out = run("smtpstorm", Command::new(bin()).args(args), LIMIT);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[track_caller]
fn case<'a>(v: &'a Value, classname: &str, name: &str) -> &'a Value {
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["classname"] == classname && c["name"] == name)
        .unwrap_or_else(|| panic!("no test case {classname} / {name} in {v}"))
}

#[test]
fn bench_assertions_and_baseline_checks_are_schema_valid_junit_test_cases() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.json");
    let (code, err) = smtpstorm(&["bench", "--messages", "400", "--quiet", "--json", p(&base)]);
    assert_eq!(code, 0, "{err}");
    // A baseline whose rate no run here reaches and whose p99s any run
    // beats: the rate check fails, the latency checks pass, whatever the noise.
    let mut b = read_json(&base);
    b["rates"]["messages_per_sec"] =
        (b["rates"]["messages_per_sec"].as_f64().unwrap() * 1000.0).into();
    for phase in ["message", "session"] {
        let p99 = b["latency"][phase]["p99_us"].as_u64().unwrap();
        b["latency"][phase]["p99_us"] = (p99 * 1000 + 1_000_000).into();
    }
    std::fs::write(&base, b.to_string()).unwrap();

    let xml = dir.path().join("bench.xml");
    let (code, err) = smtpstorm(&[
        "bench",
        "--messages",
        "400",
        "--quiet",
        "--assert",
        "errors == 0",
        "--assert",
        "p99(message) < 1us",
        "--baseline",
        p(&base),
        "--max-regression",
        "10%",
        "--junit",
        p(&xml),
    ]);
    assert_eq!(code, 99, "{err}");
    let v = check(&xml);
    assert_eq!(v["valid"], true, "{v}");
    // 2 assertions, 3 baseline checks, validity, something accepted.
    assert_eq!(v["tests"], 7, "{v}");
    assert_eq!(v["failures"], 2, "{v}");
    assert_eq!(
        case(&v, "smtpstorm.assert", "errors == 0")["failure"],
        Value::Null
    );
    let failed = case(&v, "smtpstorm.assert", "p99(message) < 1us")["failure"]
        .as_str()
        .unwrap();
    assert!(
        failed.starts_with("measured ") && failed.ends_with("threshold < 1µs"),
        "{failed}"
    );
    let rate = case(
        &v,
        "smtpstorm.baseline",
        "rate(messages) no more than 10% worse than the baseline",
    );
    assert!(
        rate["failure"].as_str().unwrap().contains("% worse"),
        "{rate}"
    );
    for phase in ["message", "session"] {
        let c = case(
            &v,
            "smtpstorm.baseline",
            &format!("p99({phase}) no more than 10% worse than the baseline"),
        );
        assert_eq!(c["failure"], Value::Null, "{c}");
    }
    assert_eq!(
        case(&v, "smtpstorm.run", "the run is valid")["failure"],
        Value::Null
    );
    assert_eq!(v["properties"]["errors == 0: measured"], "0");
    assert_eq!(v["properties"]["p99(message) < 1us: threshold"], "< 1µs");

    // The validator refuses a document that breaks the schema.
    let text = std::fs::read_to_string(&xml).unwrap();
    let broken = dir.path().join("broken.xml");
    std::fs::write(&broken, text.replacen(" timestamp=\"", " started=\"", 1)).unwrap();
    let v = check(&broken);
    assert_eq!(v["valid"], false, "{v}");
}

#[test]
fn blast_and_merge_write_schema_valid_junit() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _sink = Proc::spawn(
        "smtpstorm sink",
        Command::new(bin()).args([
            "sink",
            "--listen",
            &addr,
            "--threads",
            "1",
            "--quiet",
            "--duration",
            "60s",
        ]),
    );
    wait_for_port(addr.parse::<SocketAddr>().unwrap(), Duration::from_secs(10));
    let (json, xml) = (dir.path().join("b.json"), dir.path().join("b.xml"));
    let (code, err) = smtpstorm(&[
        "blast",
        &addr,
        "-n",
        "200",
        "--quiet",
        "--assert",
        "accepted >= 200",
        "--json",
        p(&json),
        "--junit",
        p(&xml),
    ]);
    assert_eq!(code, 0, "{err}");
    let v = check(&xml);
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(
        (v["tests"].as_u64(), v["failures"].as_u64()),
        (Some(3), Some(0)),
        "{v}"
    );
    assert_eq!(v["properties"]["accepted >= 200: measured"], "200");

    let merged = dir.path().join("m.xml");
    let (code, err) = smtpstorm(&[
        "merge",
        p(&json),
        p(&json),
        "--assert",
        "accepted >= 1000",
        "--junit",
        p(&merged),
    ]);
    assert_eq!(code, 99, "{err}");
    let v = check(&merged);
    assert_eq!(v["valid"], true, "{v}");
    let c = case(&v, "smtpstorm.assert", "accepted >= 1000");
    assert_eq!(c["failure"], "measured 400, threshold >= 1000", "{c}");
}
