//! A `smtpstorm sink` child process and a raw line-oriented SMTP client,
//! shared by the sink tests that need real sockets (half-close, TLS counts,
//! XCLIENT). Every wait is bounded; all traffic stays on 127.0.0.1.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::{bin, free_port, read_json, Proc};
use serde_json::Value;

/// A sink on a free loopback port, one thread, writing its JSON on exit.
pub struct Sink {
    pub proc: Proc,
    pub port: u16,
    pub json: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Sink {
    /// `sink --threads 1 --quiet --listen 127.0.0.1:PORT --json FILE EXTRA...`
    pub fn start(extra: &[&str]) -> Sink {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("sink.json");
        let port = free_port();
        let mut cmd = Command::new(bin());
        cmd.args(["sink", "--threads", "1", "--grace", "1s"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--json")
            .arg(&json)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn("smtpstorm sink", &mut cmd);
        // Readiness is the sink's own "listening on" line, not a probe
        // connection (which would count as a session).
        let stderr = proc.child.as_mut().unwrap().stderr.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains("listening on") => break,
                Ok(_) => {}
                Err(e) => panic!("the sink did not say it was listening: {e}"),
            }
        }
        Sink {
            proc,
            port,
            json,
            dir,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGTERM, wait (bounded), and read the report.
    #[track_caller]
    pub fn stop(self) -> Value {
        self.proc.terminate();
        self.finish()
    }

    /// Wait (bounded) for the sink to exit by itself (`--exit-after-*`)
    /// and read the report.
    #[track_caller]
    pub fn finish(mut self) -> Value {
        let st = self.proc.wait(Duration::from_secs(15));
        assert!(st.success(), "sink exited with {st:?}");
        read_json(&self.json)
    }
}

/// A raw SMTP client over a blocking `TcpStream`.
pub struct Client {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
        Client { s, buf: Vec::new() }
    }

    /// Connected and greeted with 220.
    #[track_caller]
    pub fn greeted(port: u16) -> Client {
        let mut c = Client::connect(port);
        let r = c.reply();
        assert!(r.starts_with("220 "), "greeting: {r:?}");
        c
    }

    pub fn send(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b);
    }

    /// Shuts the write side (TCP FIN), keeps reading.
    pub fn half_close(&mut self) {
        let _ = self.s.shutdown(Shutdown::Write);
    }

    /// One whole reply (multi-line joined), `EOF` when closed, `TIMEOUT`
    /// when silent for the read timeout.
    pub fn reply(&mut self) -> String {
        let mut out = String::new();
        loop {
            while let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                let line = String::from_utf8_lossy(&line).to_string();
                out.push_str(&line);
                if line.len() < 4 || line.as_bytes()[3] != b'-' {
                    return out;
                }
            }
            let mut tmp = [0u8; 4096];
            match self.s.read(&mut tmp) {
                Ok(0) => return out + "EOF",
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return out + "TIMEOUT"
                }
                Err(_) => return out + "EOF",
            }
        }
    }

    /// Sends `cmd` and asserts the reply starts with `code`.
    #[track_caller]
    pub fn expect(&mut self, cmd: &[u8], code: u16) -> String {
        self.send(cmd);
        let r = self.reply();
        assert!(
            r.starts_with(&code.to_string()),
            "{:?} -> {r:?}, expected {code}",
            String::from_utf8_lossy(cmd)
        );
        r
    }

    /// Everything the server sends until it closes, if it closes within
    /// `within`; `None` if it is still open then.
    pub fn read_to_eof(&mut self, within: Duration) -> Option<String> {
        let t0 = Instant::now();
        let mut all = std::mem::take(&mut self.buf);
        let mut tmp = [0u8; 4096];
        self.s
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        while t0.elapsed() < within {
            match self.s.read(&mut tmp) {
                Ok(0) => return Some(String::from_utf8_lossy(&all).into_owned()),
                Ok(n) => all.extend_from_slice(&tmp[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return Some(String::from_utf8_lossy(&all).into_owned()),
            }
        }
        None
    }
}

/// One complete session with one accepted message, then QUIT.
#[track_caller]
pub fn normal_session(c: &mut Client) {
    c.expect(b"EHLO probe\r\n", 250);
    c.expect(b"MAIL FROM:<a@example.com>\r\n", 250);
    c.expect(b"RCPT TO:<b@example.com>\r\n", 250);
    c.expect(b"DATA\r\n", 354);
    c.expect(b"Subject: ok\r\n\r\nbody\r\n.\r\n", 250);
    c.expect(b"QUIT\r\n", 221);
}
