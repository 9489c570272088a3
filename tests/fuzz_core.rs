//! Stable-toolchain fuzzing of the sans-IO core: the server session, the
//! DATA scanner, command parsing and reply parsing, with the invariant
//! checks of `tests/fuzzing/` (shared with the cargo-fuzz targets in
//! `fuzz/`).
//!
//! The four `fuzz_` tests are `#[ignore]`d so a plain `cargo test` stays
//! quick; `scripts/test.sh` runs them with `--ignored fuzz_`. Each runs for
//! `SMTPSTORM_FUZZ_SECS` (default 20) and at least `MIN_CASES` cases
//! whatever the time; a failure prints the input, and the run is
//! deterministic for a given `SMTPSTORM_FUZZ_SEED`.

mod fuzzing;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use smtpstorm::smtp::BareLfPolicy;

use fuzzing::{budget, data, reply, run_cases, seed, server, wire, Rng, MIN_CASES};

/// Beyond the time budget, how long the minimum number of cases may take.
const HARD_LIMIT_EXTRA: Duration = Duration::from_secs(600);

/// Runs `check` on generated inputs; on a failure, panics with the input.
fn fuzz(name: &str, salt: u64, generate: fn(&mut Rng) -> Vec<u8>, check: fn(&[u8])) -> u64 {
    let seed = seed();
    let mut rng = Rng(seed ^ salt);
    let b = budget();
    run_cases(name, MIN_CASES, b, b + HARD_LIMIT_EXTRA, |i| {
        let input = generate(&mut rng);
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            panic!(
                "{name}: seed {seed} case {i} broke an invariant (message above); input: {:?}",
                String::from_utf8_lossy(&input)
            );
        }
    })
}

#[test]
#[ignore = "bounded fuzzing; scripts/test.sh runs it with --ignored fuzz_ (SMTPSTORM_FUZZ_SECS)"]
fn fuzz_server_session_keeps_its_invariants() {
    fuzz("server", 0x5e55, server::generate, server::check);
}

#[test]
#[ignore = "bounded fuzzing; scripts/test.sh runs it with --ignored fuzz_ (SMTPSTORM_FUZZ_SECS)"]
fn fuzz_data_scanner_matches_its_model_in_any_chunking() {
    fuzz("data", 0xda7a, data::generate, data::check);
}

#[test]
#[ignore = "bounded fuzzing; scripts/test.sh runs it with --ignored fuzz_ (SMTPSTORM_FUZZ_SECS)"]
fn fuzz_command_parser_round_trips_and_keeps_its_limits() {
    fuzz("wire", 0x3173, wire::generate, wire::check);
}

#[test]
#[ignore = "bounded fuzzing; scripts/test.sh runs it with --ignored fuzz_ (SMTPSTORM_FUZZ_SECS)"]
fn fuzz_reply_parser_is_split_invariant_and_round_trips() {
    fuzz("reply", 0x4e91, reply::generate, reply::check);
}

#[test]
fn a_zero_second_budget_still_runs_the_minimum_number_of_cases() {
    let mut n = 0;
    let ran = run_cases(
        "count",
        500,
        Duration::ZERO,
        Duration::from_secs(60),
        |_| n += 1,
    );
    assert_eq!((ran, n), (500, 500));
}

#[test]
#[should_panic(expected = "only")]
fn a_minimum_that_does_not_fit_the_hard_limit_fails() {
    run_cases(
        "slow",
        1_000_000,
        Duration::ZERO,
        Duration::from_millis(50),
        |_| std::thread::sleep(Duration::from_millis(1)),
    );
}

#[test]
fn every_check_passes_on_its_seed_inputs_under_every_configuration() {
    for sel in 0..=255u8 {
        for s in server::SEEDS {
            for seed in [0u8, 1] {
                let mut input = vec![sel, seed, 0, 0, 0];
                input.extend_from_slice(s);
                server::check(&input);
            }
        }
    }
    for sel in 0..3u8 {
        for t in data::TOKENS {
            let mut input = vec![sel, 7, 0, 0, 0];
            input.extend_from_slice(t);
            data::check(&input);
        }
    }
    for line in wire::SEEDS {
        wire::check(line);
    }
    let mut all = vec![9, 0, 0, 0];
    for l in reply::LINES {
        all.extend_from_slice(l);
        let mut one = vec![1, 0, 0, 0];
        one.extend_from_slice(l);
        reply::check(&one);
    }
    reply::check(&all);
}

/// A session as the smuggling check sees it: the 354 after `DATA`, then a
/// final reply to the body `at` bytes into `INPUT`.
fn run_with_dot_reply_at(at: usize, accepted_body: &[u8]) -> server::Run {
    use smtpstorm::smtp::server::ServerEvent::Reply;
    use smtpstorm::smtp::CommandKind::{Data, Dot};
    let body_start = INPUT.windows(6).position(|w| w == b"DATA\r\n").unwrap() + 6;
    server::Run {
        out: Vec::new(),
        events: vec![
            Reply {
                command: Data,
                code: 354,
            },
            Reply {
                command: Dot,
                code: 250,
            },
        ],
        fed_at: vec![body_start, at],
        accepted_data_bodies: vec![accepted_body.to_vec()],
    }
}

const INPUT: &[u8] =
    b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nhi\n.\nQUIT\r\n\r\n.\r\n";

fn after(needle: &[u8]) -> usize {
    INPUT
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
        + needle.len()
}

#[test]
#[should_panic(expected = "final reply 250 to a DATA body")]
fn the_smuggling_check_refuses_a_body_ended_at_lf_dot_lf_under_reject() {
    let run = run_with_dot_reply_at(after(b"hi\n.\n"), b"");
    server::check_data_ends(INPUT, &run, BareLfPolicy::Reject);
}

#[test]
fn the_smuggling_check_allows_lf_dot_lf_under_accept_and_crlf_dot_crlf_always() {
    let run = run_with_dot_reply_at(after(b"hi\n.\n"), b"hi\n");
    server::check_data_ends(INPUT, &run, BareLfPolicy::Accept);
    let run = run_with_dot_reply_at(INPUT.len(), b"");
    server::check_data_ends(INPUT, &run, BareLfPolicy::Reject);
}

#[test]
#[should_panic(expected = "accepted a body with a bare LF")]
fn the_bare_lf_check_refuses_an_accepted_body_with_a_bare_lf_under_reject() {
    let run = run_with_dot_reply_at(INPUT.len(), b"hi\n.\nQUIT\r\n\r\n");
    server::check_data_ends(INPUT, &run, BareLfPolicy::Reject);
}
