//! `--io auto|epoll|uring` on the real binary: which backend ran (the
//! report's `config.io`), and what happens where io_uring is forbidden.
//!
//! "Forbidden" is made for real, for one process only: a seccomp filter
//! (installed by a few lines of Python through ctypes, then `exec`) makes
//! `io_uring_setup` fail with EPERM, as a container runtime's default
//! profile does. Nothing on the machine changes (no sysctl is touched).

mod common;

use std::process::{Command, Output};

use common::bin;

/// Runs `smtpstorm args…` with `io_uring_setup` answering EPERM.
fn without_io_uring(args: &[&str]) -> Output {
    const FILTER: &str = r#"
import ctypes, os, platform, struct, sys
arch = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}[platform.machine()]
NR_IO_URING_SETUP = 425  # the same number on every architecture
def stmt(code, k): return struct.pack("HBBI", code, 0, 0, k)
def jeq(k, jt, jf): return struct.pack("HBBI", 0x15, jt, jf, k)
ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1
prog = b"".join([
    stmt(0x20, 4), jeq(arch, 1, 0), stmt(0x06, ALLOW),
    stmt(0x20, 0), jeq(NR_IO_URING_SETUP, 0, 1), stmt(0x06, EPERM),
    stmt(0x06, ALLOW),
])
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0, "PR_SET_NO_NEW_PRIVS"
p = Prog(len(prog) // 8, prog)
assert libc.prctl(22, 2, ctypes.byref(p), 0, 0) == 0, "PR_SET_SECCOMP: %d" % ctypes.get_errno()
os.execv(sys.argv[1], sys.argv[1:])
"#;
    let out = Command::new("python3")
        .args(["-c", FILTER])
        .arg(bin())
        .args(args)
        .env_remove("SMTPSTORM_IO")
        .output()
        .expect("python3 runs");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("Traceback"),
        "the seccomp filter could not be installed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn config_io(json: &std::path::Path) -> String {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    v["config"]["io"].as_str().expect("config.io").to_string()
}

#[test]
fn io_uring_forbidden_by_seccomp_is_one_line_naming_eperm_with_exit_2() {
    let out = without_io_uring(&["bench", "--io", "uring", "-n", "10", "--quiet"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(lines[0].contains("--io uring"), "{err}");
    assert!(lines[0].contains("EPERM"), "names what is missing: {err}");
    assert!(lines[0].contains("use --io epoll"), "suggests epoll: {err}");
}

#[test]
fn auto_runs_epoll_where_io_uring_is_forbidden_and_uring_where_it_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let j = json.to_str().unwrap();
    let out = without_io_uring(&["bench", "--io", "auto", "-n", "20", "--quiet", "--json", j]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(config_io(&json), "epoll");
    // The same run where the kernel allows io_uring (this machine does).
    let out = Command::new(bin())
        .args(["bench", "--io", "auto", "-n", "20", "--quiet", "--json", j])
        .env_remove("SMTPSTORM_IO")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(config_io(&json), "uring");
}

#[test]
fn the_sink_asked_for_uring_under_seccomp_fails_the_same_way() {
    let out = without_io_uring(&[
        "sink",
        "--io",
        "uring",
        "--listen",
        "127.0.0.1:0",
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("EPERM") && err.contains("use --io epoll"),
        "{err}"
    );
}

/// Runs `smtpstorm args…` in a network namespace of its own (deleted when
/// it exits) whose loopback has only four ephemeral ports.
fn with_four_ports(args: &[&str]) -> Output {
    Command::new("unshare")
        .args([
            "-n",
            "sh",
            "-c",
            "ip link set lo up && echo '40000 40003' > /proc/sys/net/ipv4/ip_local_port_range \
             && exec \"$0\" \"$@\"",
        ])
        .arg(bin())
        .args(args)
        .output()
        .expect("unshare runs")
}

#[test]
fn running_out_of_ephemeral_ports_ends_the_run_with_the_source_ip_hint_on_each_backend() {
    for io in ["epoll", "uring"] {
        let out = with_four_ports(&["bench", "--io", io, "-c", "16", "-n", "200", "--quiet"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{io}: {err}");
        assert!(
            err.contains("address not available") && err.contains("--source-ip"),
            "{io}: {err}"
        );
    }
}
