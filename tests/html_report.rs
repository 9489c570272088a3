//! `smtpstorm report RUN.json --html OUT` in a real browser: headless
//! Chromium (Debian's `chromium` and `chromium-driver`, installed by
//! `scripts/install-peers.sh`) opens the page from disk through
//! ChromeDriver, spoken to in W3C WebDriver over plain HTTP on loopback
//! (no browser download, no Selenium). The test checks that every chart
//! rendered — each `<svg>` has a size and holds its data series (coloured
//! lines or bars with a non-empty box) — and that the console has no
//! errors; it first proves that the console check sees an error when there
//! is one.
//!
//! `SMTPSTORM_SCREENSHOT=FILE.png` keeps a full-page screenshot.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(90);

/// Chromium's flags for a root user on a machine without network (see the
/// machine notes): no sandbox, no GPU, no background connections.
const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1280,1000",
];

/// Reads one HTTP/1.1 response: `(status, body)`. ChromeDriver answers
/// with a Content-Length (written `Content-Length:250`, no space) and may
/// keep the connection open, so the body is read by its length.
fn read_response(s: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let split = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut buf).expect("an HTTP response");
        assert!(n > 0, "connection closed before the header ended");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a Content-Length");
    let mut body = raw[split + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut buf).expect("the HTTP body");
        assert!(n > 0, "connection closed inside the body");
        body.extend_from_slice(&buf[..n]);
    }
    body.truncate(len);
    (status, body)
}

/// One WebDriver command; returns its `value`, panicking on an error.
#[track_caller]
fn webdriver(port: u16, method: &str, path: &str, body: Option<Value>) -> Value {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    )
    .unwrap();
    let (status, body) = read_response(&mut s);
    let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "{method} {path}: not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    assert_eq!(status, 200, "{method} {path}: {v}");
    v["value"].clone()
}

/// A ChromeDriver with one headless Chromium session; both end on drop.
struct Browser {
    _driver: Proc,
    port: u16,
    session: String,
    /// Chromium's process id: killed on drop if the session could not end
    /// it (a browser outlives a killed ChromeDriver).
    browser_pid: Option<u64>,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let port = free_port();
        let driver = Proc::spawn(
            "chromedriver",
            Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(20),
        );
        let profile = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let v = webdriver(port, "POST", "/session", Some(caps));
        let session = v["sessionId"].as_str().expect("a session id").to_string();
        Browser {
            _driver: driver,
            port,
            session,
            browser_pid: v["capabilities"]["goog:processID"].as_u64(),
            _profile: profile,
        }
    }

    fn cmd(&self, method: &str, what: &str, body: Option<Value>) -> Value {
        webdriver(
            self.port,
            method,
            &format!("/session/{}{what}", self.session),
            body,
        )
    }

    fn open(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    fn script(&self, js: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": js, "args": []})),
        )
    }

    /// Console entries since the last call (ChromeDriver's log endpoint).
    fn console(&self) -> Vec<Value> {
        self.cmd("POST", "/se/log", Some(json!({"type": "browser"})))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// A screenshot of the whole page as PNG bytes.
    fn full_page_png(&self) -> Vec<u8> {
        let h = self
            .script("return document.documentElement.scrollHeight")
            .as_u64()
            .unwrap_or(1000);
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": 1280, "height": h.min(16_000) + 120})),
        );
        let b64 = self.cmd("GET", "/screenshot", None);
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| {
            webdriver(
                self.port,
                "DELETE",
                &format!("/session/{}", self.session),
                None,
            )
        });
        if let Some(pid) = self.browser_pid {
            if Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }
}

/// Every figure: id, promised series, size, coloured data elements drawn.
const INSPECT: &str = r#"
const coloured = (e) => {
  const c = e.getAttribute('stroke') && e.getAttribute('stroke') !== 'none'
    ? e.getAttribute('stroke') : e.getAttribute('fill');
  const m = /^#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(c || '');
  return !!m && !(m[1] === m[2] && m[2] === m[3]);
};
return {
  title: document.title,
  svgs: document.querySelectorAll('svg').length,
  failed: document.querySelectorAll('td.fail').length,
  figures: Array.from(document.querySelectorAll('figure.chart')).map(f => {
    const svg = f.querySelector('svg');
    const r = svg.getBoundingClientRect();
    const data = Array.from(svg.querySelectorAll('polyline, rect')).filter(e => {
      const b = e.getBBox();
      return coloured(e) && (b.width > 0 || b.height > 0);
    }).length;
    return {id: f.id, series: Number(f.dataset.series), width: r.width, height: r.height,
            data, texts: svg.querySelectorAll('text').length};
  }),
};
"#;

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

#[test]
fn every_chart_of_the_html_report_renders_in_chromium_without_console_errors() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    // An open-loop run with a failing and a passing assertion: every
    // section of the page has something to show.
    let (code, err) = smtpstorm(&[
        "bench",
        "--rate",
        "400",
        "--duration",
        "3s",
        "-c",
        "8",
        "--quiet",
        "--assert",
        "errors == 0",
        "--assert",
        "p99(message) < 1us",
        "--json",
        p(&json),
    ]);
    assert_eq!(code, 99, "the impossible assertion fails: {err}");
    let merged = dir.path().join("merged.json");
    let (code, err) = smtpstorm(&[
        "merge",
        p(&json),
        p(&json),
        "--assert",
        "p99(message) < 1us",
        "--json",
        p(&merged),
    ]);
    assert_eq!(code, 99, "{err}");

    let browser = Browser::start();
    // The console check sees an error when there is one.
    browser.open("data:text/html,<script>console.error('smtpstorm-probe')</script>");
    let probe = browser.console();
    assert!(
        probe.iter().any(|e| e["level"] == "SEVERE"
            && e["message"]
                .as_str()
                .unwrap_or("")
                .contains("smtpstorm-probe")),
        "the console log is read: {probe:?}"
    );

    for (name, source) in [("run", &json), ("merged", &merged)] {
        let html = dir.path().join(format!("{name}.html"));
        let (code, err) = smtpstorm(&["report", p(source), "--html", p(&html)]);
        assert_eq!(code, 0, "{err}");
        browser.open(&format!("file://{}", html.display()));
        let page = browser.script(INSPECT);
        assert!(
            page["title"]
                .as_str()
                .unwrap()
                .starts_with("smtpstorm blast report against 127.0.0.1:"),
            "{page}"
        );
        let figures = page["figures"].as_array().unwrap();
        let ids: Vec<&str> = figures.iter().map(|f| f["id"].as_str().unwrap()).collect();
        for want in [
            "chart-throughput",
            "chart-spectrum",
            "chart-outcomes",
            "chart-over-time-message",
            "chart-over-time-connect",
        ] {
            assert!(ids.contains(&want), "{name}: {want} missing from {ids:?}");
        }
        assert_eq!(
            page["svgs"].as_u64().unwrap() as usize,
            figures.len(),
            "{name}: every svg is a chart figure"
        );
        for f in figures {
            let series = f["series"].as_u64().unwrap();
            assert!(series >= 1, "{name}: {f}");
            assert!(
                f["width"].as_f64().unwrap() > 200.0 && f["height"].as_f64().unwrap() > 100.0,
                "{name}: the chart has a size: {f}"
            );
            assert!(
                f["data"].as_u64().unwrap() >= series,
                "{name}: every series is drawn: {f}"
            );
            assert!(
                f["texts"].as_u64().unwrap() >= 4,
                "{name}: axes are labelled: {f}"
            );
        }
        assert_eq!(page["failed"], 1, "{name}: one failed assertion is shown");
        let console = browser.console();
        let errors: Vec<_> = console
            .iter()
            .filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING")
            .collect();
        assert!(errors.is_empty(), "{name}: console: {errors:?}");
        if name == "run" {
            if let Some(keep) = std::env::var_os("SMTPSTORM_SCREENSHOT") {
                std::fs::write(keep, browser.full_page_png()).unwrap();
            }
        }
    }
}
