//! Unix-domain sockets (issue 22, item 3): `sink --listen unix:/path`,
//! `blast unix:/path` and `probe unix:/path` on the kernel-socket backends
//! (the suite runs this file with `SMTPSTORM_IO=epoll` and again with
//! `uring`), against real peers:
//! - Postfix's `lmtp` client delivering to the sink over a unix socket
//!   (a private Postfix, `tests/common`), one LMTP reply per recipient;
//! - the blaster against a real Dovecot LMTP server over its unix socket
//!   (Debian `dovecot-lmtpd`, from `scripts/install-peers.sh`), configured
//!   here in a private directory with its own `base_dir`, mail location
//!   and a static userdb, run in the foreground and stopped by PID;
//! - `--io xdp` refuses a unix socket in one line.
//!
//! Every run is bounded (`--messages N`, wall-clock limits); nothing leaves
//! the machine (unix sockets, and Postfix's smtpd on 127.0.0.1).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

/// Whether a unix socket listens at `path`, read from `/proc/net/unix`
/// (a probe connection would count as a session).
fn unix_listening(path: &Path) -> bool {
    let want = path.to_str().unwrap();
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 is
    // __SO_ACCEPTCON: the socket listens.
    table.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8 && f[7] == want && f[3] == "00010000"
    })
}

/// Waits until a unix socket listens at `path`.
#[track_caller]
fn wait_for_unix_listen(path: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    let want = path.display();
    loop {
        if unix_listening(path) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nothing listens on {want} after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A private directory every user may traverse (Postfix and Dovecot drop
/// privileges).
fn open_dir(prefix: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    chmod(d.path(), 0o755);
    d
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `smtpstorm sink --listen unix:PATH ARGS --quiet --json JSON`.
fn sink_on(path: &Path, json: &Path, args: &[&str]) -> Proc {
    let mut c = Command::new(bin());
    c.arg("sink")
        .arg("--listen")
        .arg(format!("unix:{}", path.display()))
        .args(["--threads", "2", "--quiet", "--json"])
        .arg(json)
        .args(args);
    let p = Proc::spawn("smtpstorm sink", &mut c);
    wait_for_unix_listen(path, Duration::from_secs(20));
    p
}

#[test]
fn blaster_and_probe_reach_the_sink_over_a_unix_socket_and_its_file_goes_with_it() {
    let dir = open_dir("smtpstorm-unix");
    let sock = dir.path().join("sink.sock");
    let sink_json = dir.path().join("sink.json");
    let mut sink = sink_on(
        &sock,
        &sink_json,
        &["--lmtp", "--exit-after-messages", "60"],
    );
    let target = format!("unix:{}", sock.display());

    let probe = run(
        "smtpstorm probe",
        Command::new(bin()).args(["probe", &target]),
        LIMIT,
    );
    let text = String::from_utf8_lossy(&probe.stdout);
    // A probe speaks SMTP (EHLO): the LMTP sink refuses it with 500, but
    // the greeting came over the socket.
    assert!(text.contains(&format!("target        {target}")), "{text}");
    assert!(
        text.contains("banner        smtpstorm.localhost LMTP"),
        "{text}"
    );

    let (code, v, err) = blast(
        dir.path(),
        &[
            &target,
            "--lmtp",
            "--messages",
            "60",
            "--recipients",
            "3",
            "--connections",
            "4",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["config"]["target"], target.as_str());
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 60);
    assert_outcomes_add_up(&v);

    assert!(sink.wait(LIMIT).success());
    let s = read_json(&sink_json);
    assert_eq!(get_u64(&s, "counts.messages_accepted"), 60);
    assert_eq!(s["config"]["listen"][0], target.as_str());
    assert!(!sock.exists(), "the sink left its socket file behind");
}

#[test]
fn a_stopped_sink_removes_its_socket_and_a_stale_one_is_replaced() {
    let dir = open_dir("smtpstorm-unix");
    let sock = dir.path().join("sink.sock");
    // What a killed run leaves: a socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let json = dir.path().join("sink.json");
    let sink = sink_on(&sock, &json, &[]);
    sink.terminate();
    let mut sink = sink;
    assert!(sink.wait(LIMIT).success());
    assert!(!sock.exists(), "SIGTERM left the socket file behind");
    assert!(json.exists());
}

#[test]
fn xdp_refuses_a_unix_socket_in_one_line_naming_the_flag() {
    for args in [
        vec!["sink", "--io", "xdp", "--listen", "unix:/tmp/never.sock"],
        vec![
            "blast",
            "unix:/tmp/never.sock",
            "--io",
            "xdp",
            "--messages",
            "1",
        ],
    ] {
        let out = run(
            "smtpstorm",
            Command::new(bin()).args(&args).env_remove("SMTPSTORM_IO"),
            LIMIT,
        );
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains("--io xdp") && err.contains("unix:/tmp/never.sock"),
            "{err}"
        );
        assert!(err.contains("--io epoll or uring"), "{err}");
    }
    assert!(!Path::new("/tmp/never.sock").exists());
}

#[test]
fn postfix_lmtp_client_delivers_to_the_sink_over_a_unix_socket_one_reply_per_recipient() {
    // Postfix's lmtp runs chrooted in its queue directory, where an
    // absolute `unix:` path is read: the sink's socket lives there.
    let pf = PostfixSmtpd::start_with(
        "default_transport = lmtp:unix:/smtpstorm/lmtp.sock\n\
         relay_transport = lmtp:unix:/smtpstorm/lmtp.sock\n",
    );
    let sock_dir = pf.dir.path().join("queue/smtpstorm");
    std::fs::create_dir_all(&sock_dir).unwrap();
    chmod(&sock_dir, 0o755);
    let sock = sock_dir.join("lmtp.sock");
    let out = open_dir("smtpstorm-unix");
    let sink_json = out.path().join("sink.json");
    let mut sink = sink_on(&sock, &sink_json, &["--lmtp"]);

    // 20 messages of 3 recipients each into Postfix over SMTP...
    let (code, v, err) = blast(
        out.path(),
        &[
            &pf.addr(),
            "--messages",
            "20",
            "--recipients",
            "3",
            "--connections",
            "2",
            "--to",
            "rcpt{r}@smtpstorm.test",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 20);
    // ...each delivered by Postfix's lmtp client to the sink: one
    // `status=sent` per recipient, from the sink's per-recipient replies.
    let maillog = pf.dir.path().join("maillog");
    let sent = |log: &str| {
        log.lines()
            .filter(|l| l.contains("postfix/lmtp[") && l.contains("status=sent"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(&maillog).unwrap_or_default();
        let n = sent(&log);
        if n >= 60 {
            assert_eq!(n, 60, "{log}");
            assert!(
                log.contains(&sock_dir.join("lmtp.sock").display().to_string())
                    || log.contains("/smtpstorm/lmtp.sock"),
                "{log}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} of 60 recipients delivered over LMTP:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    sink.terminate();
    assert!(sink.wait(LIMIT).success());
    let s = read_json(&sink_json);
    assert_eq!(get_u64(&s, "counts.messages_accepted"), 20);
    assert_eq!(
        s["config"]["listen"][0],
        format!("unix:{}", sock.display()).as_str()
    );
    assert!(!sock.exists());
}

/// A private Dovecot with only its LMTP service, on a unix socket in its
/// own `base_dir`, delivering to Maildirs under its directory for any user
/// (static userdb); stopped by PID when dropped.
struct Dovecot {
    proc: Proc,
    dir: tempfile::TempDir,
}

impl Dovecot {
    fn start() -> Dovecot {
        let dir = open_dir("smtpstorm-dovecot");
        let d = dir.path();
        for sub in ["run", "state", "mail"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        // Mail is written as nobody.
        chmod(&d.join("mail"), 0o777);
        let conf = format!(
            "base_dir = {d}/run\n\
             state_dir = {d}/state\n\
             instance_name = smtpstorm-{pid}\n\
             log_path = {d}/dovecot.log\n\
             protocols = lmtp\n\
             ssl = no\n\
             hostname = dovecot.smtpstorm.test\n\
             postmaster_address = postmaster@smtpstorm.test\n\
             first_valid_uid = 1\n\
             mail_location = maildir:{d}/mail/%n\n\
             passdb {{\n  driver = static\n  args = nopassword=y\n}}\n\
             userdb {{\n  driver = static\n  args = uid=65534 gid=65534 home={d}/mail/%n\n}}\n\
             service lmtp {{\n  unix_listener lmtp {{\n    mode = 0666\n  }}\n}}\n",
            d = d.display(),
            pid = std::process::id(),
        );
        let conf_path = d.join("dovecot.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut c = Command::new("/usr/sbin/dovecot");
        c.arg("-F").arg("-c").arg(&conf_path);
        let proc = Proc::spawn("dovecot", &mut c);
        let mut dv = Dovecot { proc, dir };
        // Ready when its LMTP socket listens; a configuration it refuses
        // ends it at once: say why.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !unix_listening(&dv.socket()) {
            let child = dv.proc.child.as_mut().unwrap();
            if let Some(st) = child.try_wait().unwrap() {
                panic!("dovecot exited ({st}): {}", dv.log());
            }
            assert!(
                Instant::now() < deadline,
                "dovecot did not listen: {}",
                dv.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        dv
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("run/lmtp")
    }

    /// Messages in every user's Maildir (one file per recipient).
    fn delivered(&self) -> usize {
        let mut n = 0;
        let Ok(users) = std::fs::read_dir(self.dir.path().join("mail")) else {
            return 0;
        };
        for u in users.flatten() {
            for sub in ["new", "cur"] {
                if let Ok(files) = std::fs::read_dir(u.path().join(sub)) {
                    n += files.count();
                }
            }
        }
        n
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // SIGTERM to the master we started, then bounded wait (Proc's drop
        // kills it if it is still there).
        self.proc.terminate();
        let child = self.proc.child.as_mut().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn blaster_delivers_to_a_real_dovecot_lmtp_server_over_its_unix_socket() {
    let dv = Dovecot::start();
    let target = format!("unix:{}", dv.socket().display());
    let out = open_dir("smtpstorm-unix");
    let (code, v, err) = blast(
        out.path(),
        &[
            &target,
            "--lmtp",
            "--messages",
            "30",
            "--recipients",
            "2",
            "--connections",
            "3",
            "--to",
            "user{r}@smtpstorm.test",
        ],
    );
    assert_eq!(code, 0, "{err}\n{}", dv.log());
    assert_eq!(v["config"]["target"], target.as_str());
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 30, "{}", dv.log());
    assert_outcomes_add_up(&v);
    // Dovecot answered each recipient after DATA and stored each copy.
    assert_eq!(dv.delivered(), 60, "{}", dv.log());
}
