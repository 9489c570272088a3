//! `--io xdp` end to end, as root: two network namespaces joined by a veth
//! pair (one RX and one TX queue each), the sink in one and the blaster in
//! the other — sink on AF_XDP against a kernel blaster, the reverse, and
//! both on AF_XDP — with STARTTLS, pipelining, BDAT and faults; the counts
//! and `--verify` must add up exactly. Then the one-line errors (exit 2).
//!
//! The namespaces are made per test (`common::netns`) with names unique to
//! this process and test, and deleted by a Drop guard even when the test
//! fails. Only the
//! namespaces' own addresses (198.18.0.0/24, the benchmarking range) are
//! used. The veth ends keep their TX checksum offload on (the backend
//! accepts the partial checksums a veth hands over); GSO is limited to one
//! segment per packet on both ends (`gso_max_segs 1`), because a veth
//! passes a TSO packet of up to 64 KiB whole, and AF_XDP drops frames
//! larger than its 2 KiB UMEM frames.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::netns::{NsPair, A_IP};
use common::{bin, get_u64, read_json, Proc};

/// The sink runs in namespace `a`, the blaster in `b`.
const SINK_IP: std::net::Ipv4Addr = A_IP;
const PORT: u16 = 2525;

/// `ip netns exec NS smtpstorm ARGS…`
fn cmd(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(bin()).args(args);
    c
}

/// Which backend each side runs.
#[derive(Clone, Copy)]
enum Io {
    Kernel,
    Xdp,
    /// `--xdp-mode native` (a veth runs XDP in its driver too).
    XdpNative,
}

fn io_args(io: Io, iface: &str) -> Vec<String> {
    match io {
        Io::Kernel => vec!["--io".into(), "epoll".into()],
        Io::Xdp => vec![
            "--io".into(),
            "xdp".into(),
            "--xdp-iface".into(),
            iface.into(),
        ],
        Io::XdpNative => {
            let mut v = io_args(Io::Xdp, iface);
            v.extend(["--xdp-mode".into(), "native".into()]);
            v
        }
    }
}

/// Waits (bounded) until `path` contains `text`.
#[track_caller]
fn wait_for_text(path: &Path, text: &str, sink: &mut Proc, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(text)
        {
            return;
        }
        if let Some(st) = sink.child.as_mut().unwrap().try_wait().unwrap() {
            panic!(
                "sink exited {st}: {}",
                std::fs::read_to_string(path).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no `{text}` in {} after {within:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a sink (`sink_io`) and a blaster (`blast_io`) across a fresh pair;
/// returns both reports.
fn session(
    sink_io: Io,
    blast_io: Io,
    sink_extra: &[&str],
    blast_extra: &[&str],
) -> (serde_json::Value, serde_json::Value) {
    let pair = NsPair::new();
    let dir = tempfile::tempdir().unwrap();
    let sink_json = dir.path().join("sink.json");
    let blast_json = dir.path().join("blast.json");
    let sink_err = dir.path().join("sink.err");
    let listen = format!("{SINK_IP}:{PORT}");
    let mut sink_cmd = cmd(
        &pair.a,
        &["sink", "--threads", "1", "--verify", "--grace", "3s"],
    );
    sink_cmd
        .args(io_args(sink_io, &pair.ia))
        .args(["--listen", &listen, "--json"])
        .arg(&sink_json)
        .args(sink_extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&sink_err).unwrap());
    let mut sink = Proc::spawn("sink", &mut sink_cmd);
    wait_for_text(
        &sink_err,
        "listening on",
        &mut sink,
        Duration::from_secs(15),
    );
    let mut blast_cmd = cmd(&pair.b, &["blast", &listen, "--threads", "1", "--quiet"]);
    blast_cmd
        .args(io_args(blast_io, &pair.ib))
        // These runs inject faults and loss on purpose: they check counts,
        // not the failed-run verdict.
        .args(["--max-failed", "100%", "--max-outage", "0"])
        .args(blast_extra)
        .arg("--json")
        .arg(&blast_json);
    let out = common::run("blast", &mut blast_cmd, Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(0),
        "blast: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    sink.terminate();
    let st = sink.wait(Duration::from_secs(15));
    assert!(
        st.success(),
        "sink: {st}: {}",
        std::fs::read_to_string(&sink_err).unwrap_or_default()
    );
    let s = read_json(&sink_json);
    let b = read_json(&blast_json);
    (s, b)
}

/// Every attempted message has one outcome; every message the blaster
/// counts as accepted was accepted and verified by the sink, and nothing
/// more; both count the same sessions.
#[track_caller]
fn assert_exact(s: &serde_json::Value, b: &serde_json::Value, attempted: u64) {
    assert_messages_exact(s, b, attempted);
    assert_eq!(
        get_u64(s, "counts.sessions"),
        get_u64(b, "counts.sessions"),
        "sink {} blast {}",
        s["counts"],
        b["counts"]
    );
}

/// [`assert_exact`] without the sessions (under loss a connect may time
/// out after the sink saw its SYN, or before).
#[track_caller]
fn assert_messages_exact(s: &serde_json::Value, b: &serde_json::Value, attempted: u64) {
    let outcomes: u64 = [
        "messages_accepted",
        "messages_tempfailed",
        "messages_rejected",
        "connection_errors",
        "timeouts",
        "protocol_errors",
    ]
    .iter()
    .map(|k| get_u64(b, &format!("counts.{k}")))
    .sum();
    assert_eq!(
        get_u64(b, "counts.messages_attempted"),
        attempted,
        "{}",
        b["counts"]
    );
    assert_eq!(
        outcomes, attempted,
        "blast outcomes do not add up: {}",
        b["counts"]
    );
    let acc = get_u64(b, "counts.messages_accepted");
    assert!(acc > 0, "nothing accepted: {}", b["counts"]);
    assert_eq!(get_u64(s, "counts.verify_corrupt"), 0, "{}", s["counts"]);
    assert_eq!(
        get_u64(s, "counts.verify_ok"),
        acc,
        "sink {} blast {}",
        s["counts"],
        b["counts"]
    );
    assert_eq!(
        get_u64(s, "counts.messages_accepted"),
        acc,
        "sink {} blast {}",
        s["counts"],
        b["counts"]
    );
}

const FAULTS: [&str; 6] = [
    "--fault",
    "rcpt:451:10%",
    "--fault",
    "data:disconnect:3%",
    "--fault",
    "dot:disconnect421:3%",
];

#[test]
fn a_sink_on_xdp_counts_every_message_of_a_kernel_blaster_with_starttls_pipelining_and_faults() {
    let (s, b) = session(
        Io::Xdp,
        Io::Kernel,
        &FAULTS,
        &[
            "--messages",
            "3000",
            "-k",
            "3",
            "-c",
            "8",
            "--starttls",
            "--pipelining",
            "on",
            "--timeout",
            "5s",
        ],
    );
    assert_exact(&s, &b, 3000);
    assert_eq!(s["config"]["io"], "xdp");
    assert!(
        get_u64(&b, "counts.messages_tempfailed") > 0,
        "no fault fired: {}",
        b["counts"]
    );
    assert!(
        get_u64(&b, "counts.connection_errors") > 0,
        "no disconnect fired: {}",
        b["counts"]
    );
    assert_eq!(
        get_u64(&s, "counts.tls_sessions"),
        get_u64(&s, "counts.sessions"),
        "{}",
        s["counts"]
    );
}

#[test]
fn a_sink_in_native_xdp_mode_counts_every_message_with_starttls() {
    let (s, b) = session(
        Io::XdpNative,
        Io::Kernel,
        &[],
        &[
            "--messages",
            "1000",
            "-k",
            "2",
            "-c",
            "8",
            "--starttls",
            "--timeout",
            "5s",
        ],
    );
    assert_exact(&s, &b, 1000);
    assert_eq!(s["config"]["xdp"]["mode"], "native");
    assert_eq!(
        get_u64(&b, "counts.messages_accepted"),
        1000,
        "{}",
        b["counts"]
    );
}

#[test]
fn a_sink_on_xdp_takes_bdat_bodies_larger_than_its_socket_buffers() {
    let (s, b) = session(
        Io::Xdp,
        Io::Kernel,
        &[],
        &[
            "--messages",
            "600",
            "-k",
            "2",
            "-c",
            "16",
            "--bdat",
            "--size",
            "100..48KiB",
            "--timeout",
            "5s",
        ],
    );
    assert_exact(&s, &b, 600);
    assert_eq!(
        get_u64(&b, "counts.messages_accepted"),
        600,
        "{}",
        b["counts"]
    );
    assert!(get_u64(&s, "counts.bytes") > 600 * 100, "{}", s["counts"]);
}

#[test]
fn a_blaster_on_xdp_against_a_kernel_sink_adds_up_exactly_with_starttls_and_faults() {
    let (s, b) = session(
        Io::Kernel,
        Io::Xdp,
        &FAULTS,
        &[
            "--messages",
            "3000",
            "-k",
            "3",
            "-c",
            "8",
            "--starttls",
            "--timeout",
            "5s",
        ],
    );
    assert_exact(&s, &b, 3000);
    assert_eq!(b["config"]["io"], "xdp");
    assert_eq!(
        get_u64(&b, "counts.tls_sessions"),
        get_u64(&b, "counts.sessions"),
        "{}",
        b["counts"]
    );
}

#[test]
fn both_ends_on_xdp_add_up_exactly_with_pipelining_bdat_and_faults() {
    let mut faults = FAULTS.to_vec();
    // BDAT has no DATA or dot: disconnect at MAIL instead.
    faults.extend(["--fault", "mail:disconnect:2%"]);
    let (s, b) = session(
        Io::Xdp,
        Io::Xdp,
        &faults,
        &[
            "--messages",
            "3000",
            "-k",
            "3",
            "-c",
            "16",
            "--pipelining",
            "on",
            "--bdat",
            "--size",
            "100..8KiB",
            "--starttls",
            "--timeout",
            "5s",
        ],
    );
    assert_exact(&s, &b, 3000);
    assert!(
        get_u64(&b, "counts.connection_errors") > 0,
        "no disconnect fired: {}",
        b["counts"]
    );
}

#[test]
fn two_hundred_connections_at_once_span_several_shards_on_both_ends() {
    // 16 sockets per shard: 200 sessions in flight need at least 13
    // shards on each side, and listeners handed from shard to shard.
    let (s, b) = session(
        Io::Xdp,
        Io::Xdp,
        &[],
        &[
            "--messages",
            "6000",
            "-k",
            "2",
            "-c",
            "200",
            "--starttls",
            "--timeout",
            "10s",
        ],
    );
    assert_exact(&s, &b, 6000);
    assert_eq!(
        get_u64(&b, "counts.messages_accepted"),
        6000,
        "{}",
        b["counts"]
    );
}

/// 1% of frames lost each way and 2% of received frames reordered, on the
/// AF_XDP side (`--xdp-faults`: `tc netem` is not in this kernel, and
/// AF_XDP's copy-mode TX bypasses qdiscs anyway).
const LOSSY: [&str; 2] = ["--xdp-faults", "loss=1%,reorder=2%"];

/// Under loss and reordering TCP recovers every session: every message is
/// accepted and verified once, nothing times out or fails, and the AF_XDP
/// side (`side`, a report of a run with `--xdp-faults`) shows the faults
/// and the retransmissions they caused.
#[track_caller]
fn assert_recovered(s: &serde_json::Value, b: &serde_json::Value, side: &serde_json::Value) {
    assert_exact(s, b, 600);
    for k in [
        "timeouts",
        "connection_errors",
        "protocol_errors",
        "messages_tempfailed",
    ] {
        assert_eq!(get_u64(b, &format!("counts.{k}")), 0, "{}", b["counts"]);
    }
    assert_eq!(
        get_u64(b, "counts.messages_accepted"),
        600,
        "{}",
        b["counts"]
    );
    assert_eq!(side["config"]["xdp"]["faults"]["loss"], 0.01);
    assert_eq!(side["config"]["xdp"]["faults"]["reorder"], 0.02);
    let f = &side["xdp"]["faults"];
    for k in ["lost_rx", "lost_tx", "reordered"] {
        assert!(f[k].as_u64().unwrap() > 0, "no {k}: {f}");
    }
    // The lost segments were sent again: by us (smoltcp) or by the peer.
    let again =
        f["segments_resent"].as_u64().unwrap() + f["segments_received_again"].as_u64().unwrap();
    assert!(again > 0, "no retransmission: {f}");
    assert!(
        side["xdp"]["frames_rx"].as_u64().unwrap() > 0,
        "{}",
        side["xdp"]
    );
}

#[test]
fn a_sink_on_xdp_recovers_every_session_when_frames_are_lost_and_reordered() {
    let (s, b) = session(
        Io::Xdp,
        Io::Kernel,
        &LOSSY,
        &[
            "--messages",
            "600",
            "-k",
            "3",
            "-c",
            "16",
            "--starttls",
            "--pipelining",
            "on",
            "--size",
            "100..8KiB",
            "--timeout",
            "10s",
        ],
    );
    assert_recovered(&s, &b, &s);
    // The kernel blaster retransmitted what the sink's side lost on
    // receive; the sink's smoltcp what it lost on send.
    let f = &s["xdp"]["faults"];
    assert!(f["segments_received_again"].as_u64().unwrap() > 0, "{f}");
    assert!(f["segments_resent"].as_u64().unwrap() > 0, "{f}");
}

/// Both ends on smoltcp under the same faults: nothing is lost, doubled or
/// corrupted, the faults and retransmissions are counted on both sides,
/// but a few sessions may fail. Known shortfall: smoltcp against smoltcp
/// under 1% loss each way, 2% reordering and 1 ms delay loses about 1% of
/// its sessions to a refused or timed-out handshake (the same with the
/// code before issue 21; against the kernel's TCP every session recovers,
/// above), so this test does not assert that every session completes.
#[test]
fn both_ends_on_xdp_lose_double_and_corrupt_nothing_when_frames_are_lost_reordered_and_delayed() {
    let mut faults = LOSSY.to_vec();
    faults[1] = "loss=1%,reorder=2%,delay=1ms";
    let mut blast = vec![
        "--messages",
        "600",
        "-k",
        "3",
        "-c",
        "16",
        "--bdat",
        "--size",
        "100..8KiB",
        "--timeout",
        "10s",
    ];
    blast.extend(&faults);
    let (s, b) = session(Io::Xdp, Io::Xdp, &faults, &blast);
    let outcomes: u64 = [
        "messages_accepted",
        "messages_tempfailed",
        "messages_rejected",
        "connection_errors",
        "timeouts",
        "protocol_errors",
    ]
    .iter()
    .map(|k| get_u64(&b, &format!("counts.{k}")))
    .sum();
    let attempted = get_u64(&b, "counts.messages_attempted");
    let conns = get_u64(&b, "counts.connections_without_session");
    assert_eq!(outcomes, attempted + conns, "{}", b["counts"]);
    let acc = get_u64(&b, "counts.messages_accepted");
    assert!(acc >= 570, "fewer than 95% accepted: {}", b["counts"]);
    // What the blaster saw accepted the sink accepted and verified; a
    // message whose 250 was lost with its session is accepted only there.
    let sink_acc = get_u64(&s, "counts.messages_accepted");
    assert!(
        sink_acc >= acc,
        "sink {} blast {}",
        s["counts"],
        b["counts"]
    );
    assert_eq!(get_u64(&s, "counts.verify_ok"), sink_acc, "{}", s["counts"]);
    assert_eq!(get_u64(&s, "counts.verify_corrupt"), 0, "{}", s["counts"]);
    for r in [&s, &b] {
        assert_eq!(r["config"]["xdp"]["faults"]["delay_ms"], 1.0);
        let f = &r["xdp"]["faults"];
        for k in [
            "lost_rx",
            "lost_tx",
            "reordered",
            "delayed",
            "segments_resent",
        ] {
            assert!(f[k].as_u64().unwrap() > 0, "no {k}: {f}");
        }
    }
}

/// Without `--xdp-faults` nothing is injected, and the report says so.
#[test]
fn a_run_without_faults_reports_its_frames_and_no_faults() {
    let (s, b) = session(
        Io::Xdp,
        Io::Xdp,
        &[],
        &["--messages", "200", "-k", "2", "-c", "4", "--timeout", "5s"],
    );
    assert_exact(&s, &b, 200);
    for r in [&s, &b] {
        assert!(r["config"]["xdp"]["faults"].is_null(), "{}", r["config"]);
        assert!(r["xdp"]["faults"].is_null(), "{}", r["xdp"]);
        assert!(get_u64(r, "xdp.frames_rx") > 0 && get_u64(r, "xdp.frames_tx") > 0);
    }
}

/// Runs `smtpstorm ARGS` in namespace `ns` (through `pre`, e.g. setpriv).
fn run_in(ns: &str, pre: &[&str], args: &[&str]) -> Output {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .args(pre)
        .arg(bin())
        .args(args);
    common::run("smtpstorm", &mut c, Duration::from_secs(20))
}

#[track_caller]
fn assert_one_line_exit_2(out: &Output, expect: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(expect), "`{expect}` not in: {err}");
}

#[test]
fn xdp_refusals_are_one_line_and_exit_2() {
    let pair = NsPair::new();
    let listen = format!("{SINK_IP}:{PORT}");
    let base = [
        "sink",
        "--threads",
        "1",
        "--quiet",
        "--duration",
        "1s",
        "--io",
        "xdp",
    ];
    // No such interface.
    let mut a: Vec<&str> = base.to_vec();
    a.extend(["--xdp-iface", "nosuch0", "--listen", &listen]);
    assert_one_line_exit_2(
        &run_in(&pair.a, &[], &a),
        "--xdp-iface nosuch0: no such network interface",
    );
    // No interface named at all.
    let mut a: Vec<&str> = base.to_vec();
    a.extend(["--listen", &listen]);
    assert_one_line_exit_2(&run_in(&pair.a, &[], &a), "--io xdp needs --xdp-iface");
    // Root without its capabilities.
    let mut a: Vec<&str> = base.to_vec();
    a.extend(["--xdp-iface", &pair.ia, "--listen", &listen]);
    let nocaps = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"];
    assert_one_line_exit_2(&run_in(&pair.a, &nocaps, &a), "--io xdp needs root");
    // An address that is not the interface's.
    let mut a: Vec<&str> = base.to_vec();
    a.extend(["--xdp-iface", &pair.ia, "--listen", "127.0.0.1:2526"]);
    assert_one_line_exit_2(
        &run_in(&pair.a, &[], &a),
        "is not an address of --xdp-iface",
    );
    // A queue the interface does not have.
    let mut a: Vec<&str> = base.to_vec();
    a.extend([
        "--xdp-iface",
        &pair.ia,
        "--listen",
        &listen,
        "--xdp-queues",
        "3",
    ]);
    assert_one_line_exit_2(&run_in(&pair.a, &[], &a), "queue 3 does not exist");
    // Native mode on a veth works; zero-copy on a veth does not.
    let mut a: Vec<&str> = base.to_vec();
    a.extend([
        "--xdp-iface",
        &pair.ia,
        "--listen",
        &listen,
        "--xdp-zerocopy",
    ]);
    assert_one_line_exit_2(&run_in(&pair.a, &[], &a), "--xdp-zerocopy");
}

// ---- bench --io xdp ---------------------------------------------------------

/// The network-namespace inodes the threads of process `pid` are in.
fn thread_namespaces(pid: u32) -> std::collections::BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeSet::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(m) = std::fs::metadata(t.path().join("ns/net")) {
                out.insert(m.ino());
            }
        }
    }
    out
}

/// Whether any thread of any process is in one of `inodes`.
fn namespaces_in_use(inodes: &std::collections::BTreeSet<u64>) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(m) = std::fs::metadata(t.path().join("ns/net")) {
                if inodes.contains(&m.ino()) {
                    found.push(format!("{pid}/{}", t.file_name().to_string_lossy()));
                }
            }
        }
    }
    found
}

#[test]
fn bench_on_xdp_runs_both_ends_on_af_xdp_in_namespaces_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let mut c = Command::new(bin());
    c.args([
        "bench",
        "--io",
        "xdp",
        "--messages",
        "2000",
        "-k",
        "2",
        "-c",
        "8",
        "--verify",
        "--timeout",
        "5s",
        "--json",
    ])
    .arg(&json);
    let out = common::run("bench", &mut c, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "bench: {err}");
    assert!(
        err.contains("each on AF_XDP in its own network namespace"),
        "{err}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("verified 2000 ok / 0 corrupt"), "{text}");
    let b = read_json(&json);
    let s = read_json(&dir.path().join("bench.sink.json"));
    assert_exact(&s, &b, 2000);
    assert_eq!(
        get_u64(&b, "counts.messages_accepted"),
        2000,
        "{}",
        b["counts"]
    );
    for r in [&s, &b] {
        assert_eq!(r["config"]["io"], "xdp");
        assert!(get_u64(r, "xdp.frames_rx") > 0, "{}", r["xdp"]);
    }
    assert_eq!(s["config"]["xdp"]["iface"], "storm-a");
    assert_eq!(b["config"]["xdp"]["iface"], "storm-b");
}

#[test]
fn bench_on_xdp_interrupted_leaves_no_namespace_behind() {
    let dir = tempfile::tempdir().unwrap();
    let err_path = dir.path().join("bench.err");
    let mut c = Command::new(bin());
    c.args([
        "bench",
        "--io",
        "xdp",
        "--duration",
        "60s",
        "-c",
        "4",
        "--timeout",
        "5s",
        "--json",
    ])
    .arg(dir.path().join("bench.json"))
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&err_path).unwrap());
    let mut p = Proc::spawn("bench", &mut c);
    let pid = p.child.as_ref().unwrap().id();
    wait_for_text(
        &err_path,
        "smtpstorm bench: sink on",
        &mut p,
        Duration::from_secs(20),
    );
    // Its threads are in the two namespaces it made (the blaster's start
    // just after the line).
    let host = thread_namespaces(std::process::id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let made = loop {
        let mut made = thread_namespaces(pid);
        made.retain(|i| !host.contains(i));
        if made.len() == 2 || Instant::now() > deadline {
            break made;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(made.len(), 2, "namespaces of the bench's threads: {made:?}");
    // SAFETY: kill(2) of the child we spawned.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let st = p.wait(Duration::from_secs(20));
    assert!(st.code().is_some(), "bench: {st}");
    assert!(
        namespaces_in_use(&made).is_empty(),
        "left behind: {:?}",
        namespaces_in_use(&made)
    );
}

#[test]
fn bench_on_xdp_without_privileges_says_which_in_one_line() {
    let mut c = Command::new("setpriv");
    c.args(["--bounding-set=-all", "--inh-caps=-all"])
        .arg(bin())
        .args(["bench", "--io", "xdp", "--messages", "10"]);
    let out = common::run("bench", &mut c, Duration::from_secs(20));
    assert_one_line_exit_2(&out, "bench --io xdp needs root");
    assert_one_line_exit_2(&out, "CAP_SYS_ADMIN");
}

#[test]
fn bench_on_xdp_with_faults_applies_them_on_both_sides_and_compares_no_counts() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let mut c = Command::new(bin());
    c.args([
        "bench",
        "--io",
        "xdp",
        "--xdp-faults",
        "loss=1%,reorder=2%",
        "--messages",
        "600",
        "-k",
        "3",
        "-c",
        "8",
        "--timeout",
        "10s",
        "--max-failed",
        "100%",
        "--max-outage",
        "0",
        "--json",
    ])
    .arg(&json);
    let out = common::run("bench", &mut c, Duration::from_secs(90));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "bench: {err}");
    let b = read_json(&json);
    let s = read_json(&dir.path().join("bench.sink.json"));
    for r in [&s, &b] {
        assert_eq!(
            r["config"]["xdp"]["faults"]["loss"], 0.01,
            "{}",
            r["config"]
        );
        assert!(get_u64(r, "xdp.faults.lost_rx") > 0, "{}", r["xdp"]);
        assert!(get_u64(r, "xdp.faults.segments_resent") > 0, "{}", r["xdp"]);
    }
    assert!(
        get_u64(&b, "counts.messages_accepted") > 0,
        "{}",
        b["counts"]
    );
}
