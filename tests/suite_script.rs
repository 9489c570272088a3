//! `scripts/test.sh` itself: its closing line and exit status must tell the
//! truth whatever cargo does. Each test copies the script into a scratch
//! tree (with a no-op `install-peers.sh`) and runs it with a fake `cargo`
//! first on `PATH` that logs its arguments and plays one scenario: a failing
//! test, a test binary that does not build, one that crashes, or all well.

use std::path::Path;
use std::process::Command;

/// What the fake `cargo test` prints and returns, per run (fuzz run first).
struct Run {
    output: &'static str,
    status: i32,
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// One line per cargo invocation: its arguments.
    calls: Vec<String>,
}

const OK: Run = Run {
    output: "running 3 tests\ntest a ... ok\n\ntest result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s\n",
    status: 0,
};

fn run_script(fuzz: Run, rest: Run) -> Outcome {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir_all(root.join("scripts")).unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test.sh");
    std::fs::copy(&script, root.join("scripts/test.sh")).unwrap();
    std::fs::write(root.join("scripts/install-peers.sh"), "exit 0\n").unwrap();
    // Two integration tests: the backend contract (which picks its own
    // backends) and one that runs the binary.
    std::fs::create_dir_all(root.join("tests")).unwrap();
    for t in ["backend_contract", "open_loop"] {
        std::fs::write(root.join(format!("tests/{t}.rs")), "").unwrap();
    }
    let log = root.join("cargo.log");
    for (name, run) in [("fuzz", &fuzz), ("rest", &rest)] {
        std::fs::write(root.join(format!("{name}.out")), run.output).unwrap();
        std::fs::write(root.join(format!("{name}.status")), run.status.to_string()).unwrap();
    }
    let cargo = format!(
        "#!/bin/sh\n\
         echo \"$* |io=$SMTPSTORM_IO\" >> {log}\n\
         case \"$1\" in build) exit 0 ;; esac\n\
         case \"$*\" in *--ignored*) run=fuzz ;; *) run=rest ;; esac\n\
         cat {root}/$run.out\n\
         exit $(cat {root}/$run.status)\n",
        log = log.display(),
        root = root.display()
    );
    let fake = root.join("bin/cargo");
    std::fs::write(&fake, cargo).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        root.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg(root.join("scripts/test.sh"))
        .env("PATH", path)
        .output()
        .unwrap();
    let calls = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        calls,
    }
}

fn test_calls(o: &Outcome) -> Vec<&String> {
    o.calls.iter().filter(|c| c.starts_with("test")).collect()
}

#[test]
fn a_failing_fuzz_run_does_not_stop_the_other_tests_and_the_suite_fails() {
    let o = run_script(
        Run {
            output: "test fuzz_x ... FAILED\n\ntest result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 9 filtered out; finished in 1.00s\n",
            status: 101,
        },
        OK,
    );
    let tests = test_calls(&o);
    assert_eq!(tests.len(), 3, "every cargo test run: {:?}", o.calls);
    assert!(
        tests.iter().all(|c| c.contains("--no-fail-fast")),
        "{tests:?}"
    );
    assert!(
        o.stdout.lines().any(|l| l == "suite: 6 passed, 1 failed"),
        "{}",
        o.stdout
    );
    assert_eq!(o.code, Some(1), "{}{}", o.stdout, o.stderr);
}

#[test]
fn a_test_binary_that_does_not_build_fails_the_suite_though_no_test_failed() {
    let o = run_script(
        OK,
        Run {
            output: "error[E0425]: cannot find value `x` in this scope\nerror: could not compile `smtpstorm` (test \"pair\") due to 1 previous error\n",
            status: 101,
        },
    );
    assert!(
        o.stdout.lines().any(|l| l == "suite: 3 passed, 0 failed"),
        "{}",
        o.stdout
    );
    assert!(
        o.stderr.contains("cargo failed (exit status 101)"),
        "{}",
        o.stderr
    );
    assert_eq!(o.code, Some(1));
}

#[test]
fn a_crashed_test_binary_fails_the_suite() {
    let o = run_script(
        OK,
        Run {
            output: "running 2 tests\nerror: test failed, to rerun pass `--test pair`\n\nCaused by:\n  process didn't exit successfully: `target/ci/deps/pair-0123` (signal: 11, SIGSEGV: invalid memory reference)\n",
            status: 101,
        },
    );
    assert_eq!(test_calls(&o).len(), 3);
    assert!(o.stderr.contains("without a failed test"), "{}", o.stderr);
    assert_eq!(o.code, Some(1));
}

#[test]
fn a_clean_run_exits_zero_with_the_total() {
    let o = run_script(OK, OK);
    assert_eq!(test_calls(&o).len(), 3);
    assert!(
        o.stdout.lines().any(|l| l == "suite: 9 passed, 0 failed"),
        "{}",
        o.stdout
    );
    assert_eq!(o.code, Some(0), "{}{}", o.stdout, o.stderr);
}

#[test]
fn the_integration_tests_run_once_per_kernel_socket_backend() {
    let o = run_script(OK, OK);
    let runs: Vec<&String> = test_calls(&o)
        .into_iter()
        .filter(|c| !c.contains("--ignored"))
        .collect();
    assert_eq!(runs.len(), 2, "{:?}", o.calls);
    assert!(runs[0].ends_with("|io=epoll") && runs[0].contains("--lib"), "{runs:?}");
    assert!(runs[1].ends_with("|io=uring") && runs[1].contains("--test open_loop"), "{runs:?}");
    assert!(!runs[1].contains("--lib"), "unit tests run once: {runs:?}");
    // The backend contract runs every backend itself: once, in the first pass.
    assert!(!runs[1].contains("backend_contract"), "{runs:?}");
}
