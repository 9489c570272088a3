//! Helpers shared by the integration tests: the binary under test, free
//! loopback ports, child processes that are killed when a test ends (even on
//! panic), waiting with bounds, and a private Postfix `smtpd` on loopback.
//!
//! Every wait here is bounded: a broken peer fails a test, it never hangs
//! the suite. All traffic goes to 127.0.0.1 / ::1, except in [`netns`]:
//! namespace pairs for in-process tests that need a wire (their traffic
//! stays in namespaces the test creates and deletes).
#![allow(dead_code)]

pub mod netns;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The smtpstorm binary: `SMTPSTORM_BIN` (the test script points it at the
/// release build) or the one cargo built for this test run.
pub fn bin() -> PathBuf {
    match std::env::var_os("SMTPSTORM_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_smtpstorm")),
    }
}

/// A loopback port free right now, for a server the test starts.
///
/// Not one the kernel picks (port 0): those come from the ephemeral range,
/// where two tests running at once could be handed the same port once the
/// first released it (the sink binds with SO_REUSEPORT, so both servers
/// would then share it and a test could reach the other's sink), and where
/// every outgoing connection of a load test takes its source port. So the
/// ports come from 10000..30000, below `ip_local_port_range` (32768..60999
/// here), each process walking its own stretch (chosen by its PID) and
/// handing each port out once; a port is given only if nothing holds it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LO: u32 = 10_000;
    const SPAN: u32 = 20_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = (std::process::id() % 200) * 100;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..SPAN {
        let port = (LO + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        let v4 = TcpListener::bind(("0.0.0.0", port)).is_ok();
        let v6 = || match TcpListener::bind(("::1", port)) {
            Ok(_) => true,
            Err(e) => e.kind() != std::io::ErrorKind::AddrInUse,
        };
        if v4 && v6() {
            return port;
        }
    }
    panic!("no free port in {LO}..{}", LO + SPAN);
}

/// Wait until something accepts TCP connections on `addr`.
#[track_caller]
pub fn wait_for_port(addr: SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            // A connect to a port of the ephemeral range that nothing
            // listens on yet can pick that same port as its source and
            // connect to itself (TCP simultaneous open): that is not the
            // server, and while it lasts the server cannot bind the port.
            Ok(s) if s.local_addr().ok() == Some(addr) => drop(s),
            Ok(_) => return,
            Err(_) => {}
        }
        if Instant::now() > deadline {
            panic!("nothing listening on {addr} after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until a socket listens on TCP `port` (any address), without
/// connecting to it: for servers where a probe connection would count.
#[track_caller]
pub fn wait_for_listen(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    let want = format!(":{port:04X}");
    loop {
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let text = std::fs::read_to_string(table).unwrap_or_default();
            // Fields: sl local_address rem_address st ...; st 0A = LISTEN.
            let listening = text.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
            });
            if listening {
                return;
            }
        }
        if Instant::now() > deadline {
            panic!("nothing listening on port {port} after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until process `pid` holds at least `n` open file descriptors (e.g.
/// all its `ulimit -n`: it is out of descriptors).
#[track_caller]
pub fn wait_for_open_fds(pid: u32, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0);
        if open >= n {
            return;
        }
        if Instant::now() > deadline {
            panic!("process {pid} holds {open} descriptors, not {n}, after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child: Some(child),
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Wait for exit within `within`; panics (after killing it) past that.
    #[track_caller]
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not exit within {within:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait and collect stdout/stderr (spawned with piped outputs).
    #[track_caller]
    pub fn wait_output(&mut self, within: Duration) -> Output {
        let status = self.wait(within);
        let child = self.child.as_mut().unwrap();
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_end(&mut stdout);
        }
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_end(&mut stderr);
        }
        Output {
            status,
            stdout,
            stderr,
        }
    }

    /// SIGTERM, so the process can write its report.
    pub fn terminate(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Run a command to completion within `within`, capturing its output.
#[track_caller]
pub fn run(name: &str, cmd: &mut Command, within: Duration) -> Output {
    let mut p = Proc::spawn(name, cmd.stdout(Stdio::piped()).stderr(Stdio::piped()));
    // Drain pipes in threads so a chatty child cannot block on a full pipe.
    let child = p.child.as_mut().unwrap();
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let status = p.wait(within);
    Output {
        status,
        stdout: t1.join().unwrap(),
        stderr: t2.join().unwrap(),
    }
}

/// Runs `smtpstorm blast ARGS --quiet --json FILE`; returns (exit code, JSON, stderr).
#[track_caller]
pub fn blast(dir: &Path, args: &[&str]) -> (i32, serde_json::Value, String) {
    let json = dir.join(format!("blast-{}.json", free_port()));
    let out = run(
        "smtpstorm blast",
        Command::new(bin())
            .arg("blast")
            .args(args)
            .arg("--quiet")
            .arg("--json")
            .arg(&json),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let code = out.status.code().unwrap_or(-1);
    assert!(json.exists(), "no JSON written (exit {code}): {stderr}");
    (code, read_json(&json), stderr)
}

/// Every attempted message has exactly one outcome, and every connection
/// without a session one error: the counts add up (blaster reports).
#[track_caller]
pub fn assert_outcomes_add_up(v: &serde_json::Value) {
    let c = |k: &str| get_u64(v, &format!("counts.{k}"));
    let no_session = v["counts"]["connections_without_session"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        c("messages_attempted") + no_session,
        c("messages_accepted")
            + c("messages_tempfailed")
            + c("messages_rejected")
            + c("connection_errors")
            + c("timeouts")
            + c("protocol_errors"),
        "outcomes add up: {}",
        v["counts"]
    );
}

/// Read a JSON file written by smtpstorm.
#[track_caller]
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON in {}: {e}", path.display()))
}

/// `v[a][b]...` as u64, panicking with the path when missing.
#[track_caller]
pub fn get_u64(v: &serde_json::Value, path: &str) -> u64 {
    let mut cur = v;
    for k in path.split('.') {
        cur = cur
            .get(k)
            .unwrap_or_else(|| panic!("missing `{path}` in {v}"));
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("`{path}` is not a u64: {cur}"))
}

/// The Python that has Debian's aiosmtpd (the machine's default python3 may
/// be another installation).
pub const PYTHON: &str = "/usr/bin/python3";

pub const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
pub const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";

/// A private Postfix `smtpd` on a loopback port that discards all mail,
/// following shared/notes/postfix-smtpd-on-loopback.md. Stopped on drop,
/// and its entry in the system's `alternate_config_directories` removed
/// again (also when the test panics).
pub struct PostfixSmtpd {
    pub port: u16,
    /// Dropped after `postfix stop` (see `Drop`), before the directory.
    entry: AltConfigEntry,
    pub dir: tempfile::TempDir,
}

impl PostfixSmtpd {
    pub fn start() -> PostfixSmtpd {
        Self::start_with("")
    }

    /// Like [`PostfixSmtpd::start`], with `extra_main_cf` (whole lines)
    /// appended to its `main.cf`.
    pub fn start_with(extra_main_cf: &str) -> PostfixSmtpd {
        let dir = tempfile::Builder::new()
            .prefix("smtpstorm-postfix")
            .tempdir()
            .unwrap();
        let port = free_port();
        let root = dir.path();
        let etc = root.join("etc");
        let data = root.join("data");
        let queue = root.join("queue");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&queue).unwrap();
        chmod(root, 0o755);
        let status = Command::new("chown")
            .args(["postfix"])
            .arg(&data)
            .status()
            .unwrap();
        assert!(status.success(), "chown postfix {}", data.display());
        let main_cf = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {q}\n\
             data_directory = {d}\n\
             maillog_file = {r}/maillog\n\
             maillog_file_prefixes = {r}\n\
             myhostname = postfix.smtpstorm.test\n\
             mydestination =\n\
             mynetworks = 127.0.0.0/8\n\
             inet_interfaces = loopback-only\n\
             inet_protocols = ipv4\n\
             smtpd_peername_lookup = no\n\
             smtp_dns_support_level = disabled\n\
             smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n\
             default_transport = discard\n\
             relay_transport = discard\n\
             local_transport = discard\n\
             alias_maps =\n\
             alias_database =\n\
             smtpd_client_connection_rate_limit = 0\n\
             smtpd_client_message_rate_limit = 0\n\
             default_process_limit = 100\n",
            q = queue.display(),
            d = data.display(),
            r = root.display()
        );
        // An extra setting replaces the default line of the same name: a
        // parameter given twice makes every Postfix process log a warning,
        // and postlogd, logging its own warning to itself, can deadlock the
        // instance (`postfix stop` then hangs).
        let mut lines: Vec<String> = main_cf.lines().map(str::to_string).collect();
        for extra in extra_main_cf.lines().filter(|l| l.contains('=')) {
            let key = extra.split('=').next().unwrap().trim();
            match lines
                .iter_mut()
                .find(|l| l.split('=').next().unwrap().trim() == key)
            {
                Some(l) => *l = extra.to_string(),
                None => lines.push(extra.to_string()),
            }
        }
        std::fs::write(etc.join("main.cf"), lines.join("\n") + "\n").unwrap();
        let master = std::fs::read_to_string("/etc/postfix/master.cf").expect("read master.cf");
        let mut out = String::new();
        for line in master.lines() {
            if line.starts_with("smtp ") && line.contains("inet") {
                out.push_str(&format!("127.0.0.1:{port} inet n - n - - smtpd\n"));
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        std::fs::write(etc.join("master.cf"), out).unwrap();
        // Postfix only accepts a config directory listed in the default
        // main.cf. From here on, a panic drops `pf`: Postfix is stopped and
        // the entry removed.
        let entry = AltConfigEntry::add(&etc);
        let pf = PostfixSmtpd { port, entry, dir };
        let st = Command::new("postfix")
            .arg("-c")
            .arg(&etc)
            .arg("start")
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "postfix start failed: {}{}",
            String::from_utf8_lossy(&st.stdout),
            String::from_utf8_lossy(&st.stderr)
        );
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(20),
        );
        pf
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The config directory this instance added to `alternate_config_directories`.
    pub fn config_dir(&self) -> &Path {
        &self.entry.dir
    }

    /// Messages the discard transport reported as delivered so far.
    pub fn delivered(&self) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("postfix/discard[") && l.contains("status=sent"))
            .count()
    }

    /// Wait until `n` deliveries are logged (the queue works asynchronously).
    pub fn wait_delivered(&self, n: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let d = self.delivered();
            if d >= n || Instant::now() > deadline {
                return d;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for PostfixSmtpd {
    fn drop(&mut self) {
        // Bounded: a Postfix that does not stop in 30 s has its master
        // killed (its pid file says which), so a test never hangs here.
        let stop = Command::new("postfix")
            .arg("-c")
            .arg(self.dir.path().join("etc"))
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Ok(mut child) = stop {
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
                let pid_file = self.dir.path().join("queue/pid/master.pid");
                if let Ok(pid) = std::fs::read_to_string(pid_file) {
                    let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
                }
            }
        }
        // Then `entry` drops: the directory leaves `alternate_config_directories`.
    }
}

/// The lock file serializing every read-modify-write of the system's
/// `alternate_config_directories` by these tests (several test binaries may
/// start private Postfix instances at the same time).
const MAIN_CF_LOCK: &str = "/tmp/smtpstorm-postfix-main-cf.lock";

/// The directories listed in the system's `alternate_config_directories`.
pub fn alternate_config_directories() -> Vec<String> {
    let cur = Command::new("postconf")
        .args(["-h", "alternate_config_directories"])
        .output()
        .expect("postconf");
    assert!(
        cur.status.success(),
        "postconf -h: {}",
        String::from_utf8_lossy(&cur.stderr)
    );
    String::from_utf8_lossy(&cur.stdout)
        .split([' ', ',', '\t', '\n'])
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect()
}

/// Rewrites `alternate_config_directories` (removed from main.cf when empty,
/// as it is on a fresh install). Call with the lock held.
fn set_alternate_config_directories(dirs: &[String]) {
    let st = if dirs.is_empty() {
        Command::new("postconf")
            .args(["-X", "alternate_config_directories"])
            .status()
    } else {
        Command::new("postconf")
            .arg("-e")
            .arg(format!("alternate_config_directories = {}", dirs.join(" ")))
            .status()
    };
    assert!(
        st.expect("postconf").success(),
        "postconf could not write main.cf"
    );
}

/// One entry in `alternate_config_directories`, removed on drop.
struct AltConfigEntry {
    dir: PathBuf,
}

impl AltConfigEntry {
    /// Adds `dir`; also drops entries of earlier test runs whose directory
    /// is gone (runs killed before they could clean up).
    fn add(dir: &Path) -> AltConfigEntry {
        let dir_s = dir.display().to_string();
        let _lock = FileLock::acquire(Path::new(MAIN_CF_LOCK), Duration::from_secs(60));
        let mut dirs = alternate_config_directories();
        dirs.retain(|d| !d.contains("/smtpstorm-postfix") || Path::new(d).exists());
        if !dirs.contains(&dir_s) {
            dirs.push(dir_s);
        }
        set_alternate_config_directories(&dirs);
        AltConfigEntry {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for AltConfigEntry {
    fn drop(&mut self) {
        let dir_s = self.dir.display().to_string();
        let _lock = FileLock::acquire(Path::new(MAIN_CF_LOCK), Duration::from_secs(60));
        let mut dirs = alternate_config_directories();
        let before = dirs.len();
        dirs.retain(|d| *d != dir_s);
        if dirs.len() != before {
            set_alternate_config_directories(&dirs);
        }
    }
}

/// An exclusive `flock(2)` on a file, held by a `flock(1)` child until this
/// value is dropped (the child waits on its stdin; closing it, also when
/// the test process dies, releases the lock).
pub struct FileLock {
    child: Child,
}

impl FileLock {
    #[track_caller]
    pub fn acquire(path: &Path, within: Duration) -> FileLock {
        use std::io::BufRead;
        let mut child = Command::new("flock")
            .arg("-w")
            .arg(within.as_secs().max(1).to_string())
            .arg(path)
            .args(["sh", "-c", "echo locked && read x"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("flock(1)");
        let mut line = String::new();
        let _ = std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        if line.trim() != "locked" {
            let _ = child.kill();
            let _ = child.wait();
            panic!("could not lock {} within {within:?}", path.display());
        }
        FileLock { child }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `openssl s_client -starttls smtp EXTRA` against `addr` that says QUIT once
/// TLS is up and waits for the server to close; returns (exit success,
/// stdout + stderr). Bounded: killed after 20 s.
#[track_caller]
pub fn openssl_starttls(addr: &str, extra: &[&str]) -> (bool, String) {
    use std::io::Write;
    let child = Command::new("openssl")
        .args(["s_client", "-connect", addr, "-starttls", "smtp", "-crlf"])
        .args(["-ign_eof", "-servername", "localhost"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    let mut p = Proc {
        child: Some(child),
        name: "openssl s_client".into(),
    };
    let mut stdin = p.child.as_mut().unwrap().stdin.take().unwrap();
    stdin.write_all(b"QUIT\n").unwrap();
    drop(stdin);
    let out = p.wait_output(Duration::from_secs(20));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}
