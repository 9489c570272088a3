//! Every flag can also come from the environment (issue 22, item 4):
//! `--connections` is `SMTPSTORM_CONNECTIONS`, a switch takes `true`/`false`,
//! the command line wins over the environment, `--help` shows each name,
//! and a bad value from the environment is one line naming the variable.
//!
//! Runs the real binary: a sink on a free loopback port and a blaster
//! bounded by `--messages`; every process is bounded in time.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

/// `smtpstorm ARGS` with only `env` (and PATH) of the SMTPSTORM_ variables:
/// the test's own environment (SMTPSTORM_IO from the suite) stays out.
fn cmd(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(bin());
    c.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("SMTPSTORM_") && k != "SMTPSTORM_IO" {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied());
    c
}

#[test]
fn every_flag_of_every_command_names_its_environment_variable() {
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let Some(long) = a.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let want = smtpstorm::cli::shell::env_name(long);
            if long == "io" {
                assert_eq!(a.get_env().unwrap(), "SMTPSTORM_IO");
                continue;
            }
            if a.get_env().and_then(|e| e.to_str()) != Some(want.as_str()) {
                missing.push(format!("{path} --{long}"));
            }
        }
        for s in cmd.get_subcommands() {
            walk(s, &format!("{path} {}", s.get_name()), missing);
        }
    }
    // The definition with the variables is still a consistent one.
    smtpstorm::cli::shell::command().debug_assert();
    let mut missing = Vec::new();
    walk(&smtpstorm::cli::shell::command(), "smtpstorm", &mut missing);
    assert!(missing.is_empty(), "flags without a variable: {missing:?}");
}

#[test]
fn help_shows_the_variable_of_each_flag() {
    let out = run(
        "smtpstorm blast --help",
        &mut cmd(&["blast", "--help"], &[]),
        LIMIT,
    );
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for name in [
        "SMTPSTORM_CONNECTIONS",
        "SMTPSTORM_RATE",
        "SMTPSTORM_DURATION",
        "SMTPSTORM_STARTTLS",
    ] {
        assert!(
            help.contains(&format!("[env: {name}")),
            "{name} not in:\n{help}"
        );
    }
}

#[test]
fn a_bad_value_from_the_environment_is_one_line_naming_the_variable() {
    let out = run(
        "smtpstorm blast",
        &mut cmd(
            &["blast", "127.0.0.1:9", "--messages", "1"],
            &[("SMTPSTORM_RATE", "fast")],
        ),
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("--rate"), "{err}");
    assert!(err.contains("SMTPSTORM_RATE=fast"), "{err}");
    assert!(err.contains("expected a rate"), "{err}");

    // A switch takes a boolean word: anything else names the variable too.
    let out = run(
        "smtpstorm blast",
        &mut cmd(
            &["blast", "127.0.0.1:9", "--messages", "1"],
            &[("SMTPSTORM_QUIET", "maybe")],
        ),
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SMTPSTORM_QUIET=maybe"), "{err}");

    // The same bad value on the command line says nothing of the environment.
    let out = run(
        "smtpstorm blast",
        &mut cmd(
            &["blast", "127.0.0.1:9", "--rate", "fast"],
            &[("SMTPSTORM_RATE", "fast")],
        ),
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--rate") && !err.contains("SMTPSTORM_RATE"),
        "{err}"
    );
}

#[test]
fn flags_from_the_environment_run_a_sink_and_a_blaster_and_the_command_line_wins() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let sink_json = dir.path().join("sink.json");
    let mut sink = Proc::spawn(
        "smtpstorm sink",
        &mut cmd(
            &["sink"],
            &[
                ("SMTPSTORM_LISTEN", listen.as_str()),
                ("SMTPSTORM_THREADS", "1"),
                ("SMTPSTORM_EXIT_AFTER_MESSAGES", "40"),
                ("SMTPSTORM_DURATION", "1m"),
                ("SMTPSTORM_QUIET", "true"),
                ("SMTPSTORM_JSON", sink_json.to_str().unwrap()),
            ],
        ),
    );
    wait_for_listen(port, Duration::from_secs(10));
    let json = dir.path().join("blast.json");
    let out = run(
        "smtpstorm blast",
        &mut cmd(
            &["blast", &listen, "--connections", "2"],
            &[
                ("SMTPSTORM_CONNECTIONS", "7"),
                ("SMTPSTORM_MESSAGES", "40"),
                ("SMTPSTORM_THREADS", "1"),
                ("SMTPSTORM_QUIET", "1"),
                ("SMTPSTORM_JSON", json.to_str().unwrap()),
            ],
        ),
        LIMIT,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The summary's first lines say what ran (SMTPSTORM_THREADS: one thread).
    let text = String::from_utf8_lossy(&out.stdout);
    let ran = text.lines().nth(1).unwrap_or_default();
    assert!(
        ran.starts_with("ran: io ") && ran.contains(", 1 thread"),
        "{text}"
    );
    assert!(ran.contains(&format!("target {listen}")), "{text}");
    let v = read_json(&json);
    assert_eq!(
        get_u64(&v, "config.connections"),
        2,
        "the command line wins"
    );
    assert_eq!(get_u64(&v, "counts.messages_accepted"), 40);
    // The sink stopped by itself after SMTPSTORM_EXIT_AFTER_MESSAGES.
    assert!(sink.wait(Duration::from_secs(30)).success());
    let s = read_json(&sink_json);
    assert_eq!(get_u64(&s, "counts.messages_accepted"), 40);
}
