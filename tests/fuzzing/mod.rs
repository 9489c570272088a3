//! Invariant checks for fuzzing the sans-IO core, shared by the bounded
//! stable-toolchain runs (`tests/fuzz_core.rs`, run by `scripts/test.sh`
//! with `--ignored fuzz_`) and the cargo-fuzz targets in `fuzz/`, which
//! include this directory with `#[path]`. None of it is in the library.
//!
//! Each target is one `check(data)` that panics when an invariant breaks:
//! [`server`] (the server session), [`data`] (the DATA scanner), [`wire`]
//! (command parsing) and [`reply`] (reply parsing). Every check asserts
//! properties, not only "no panic": results do not depend on how the input
//! is split, parsed values re-serialize to themselves, and the DATA rules
//! of DESIGN.md hold (outside `--bare-lf accept` a body ends only at
//! CRLF.CRLF, so one DATA is never two messages; `reject` never accepts a
//! body with a bare LF or CR).
//!
//! The stable runs go through [`run_cases`]: at least a minimum number of
//! cases whatever the time budget, and a failure if even that minimum does
//! not fit in a hard time limit.
#![allow(dead_code)]

pub mod data;
pub mod reply;
pub mod server;
pub mod wire;

use std::time::{Duration, Instant};

/// Tiny deterministic PRNG (xorshift64*): chunkings, verdicts, mutations.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0 | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    /// Uniform in `0..n` as a `usize`.
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
    /// Cut points splitting `len` bytes into chunks of 1..=max bytes.
    pub fn chunks(&mut self, len: usize, max: usize) -> Vec<usize> {
        let mut sizes = Vec::new();
        let mut left = len;
        while left > 0 {
            let n = (1 + self.index(max.max(1))).min(left);
            sizes.push(n);
            left -= n;
        }
        sizes
    }
}

/// Mutates `input` in place a few times: flip, insert, delete, splice a
/// token, or insert a run of one byte.
pub fn mutate(rng: &mut Rng, input: &mut Vec<u8>, tokens: &[&[u8]], keep_prefix: usize) {
    for _ in 0..rng.below(12) {
        let len = input.len();
        let at = keep_prefix + rng.index(len.saturating_sub(keep_prefix) + 1);
        let at = at.min(len);
        match rng.below(5) {
            0 => input.insert(at, rng.byte()),
            1 if at < len => {
                input.remove(at);
            }
            2 if at < len => input[at] ^= 1 << rng.below(8),
            3 if !tokens.is_empty() => {
                let t = tokens[rng.index(tokens.len())];
                input.splice(at..at, t.iter().copied());
            }
            _ => {
                let n = rng.index(1500);
                let b = [b'x', b'.', b'\n', b'\r', b' '][rng.index(5)];
                input.splice(at..at, std::iter::repeat_n(b, n));
            }
        }
    }
}

/// The fuzz time per target: `SMTPSTORM_FUZZ_SECS` (default 20).
pub fn budget() -> Duration {
    let secs = std::env::var("SMTPSTORM_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(20.0);
    Duration::from_secs_f64(secs.clamp(0.0, 86_400.0))
}

/// The seed of the stable runs: `SMTPSTORM_FUZZ_SEED` (default fixed).
pub fn seed() -> u64 {
    std::env::var("SMTPSTORM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_CAFE)
}

/// Each stable target runs at least this many cases, whatever the budget.
pub const MIN_CASES: u64 = 10_000;

/// Runs `case(i)` for i = 0, 1, ... until `budget` has passed and at least
/// `min` cases ran. Panics if `hard_limit` passes before `min` cases ran (a
/// machine too slow to fuzz at all fails, it does not pass with 0 cases).
/// Returns the number of cases run.
pub fn run_cases(
    name: &str,
    min: u64,
    budget: Duration,
    hard_limit: Duration,
    mut case: impl FnMut(u64),
) -> u64 {
    let t0 = Instant::now();
    let mut cases = 0u64;
    while cases < min || t0.elapsed() < budget {
        if cases < min && t0.elapsed() > hard_limit {
            panic!("{name}: only {cases} of at least {min} cases within {hard_limit:?}");
        }
        case(cases);
        cases += 1;
    }
    eprintln!(
        "{name}: {cases} cases in {:.1?}, no invariant broken",
        t0.elapsed()
    );
    cases
}
