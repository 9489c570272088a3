#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs the real peers (Postfix
# smtp-sink/smtp-source/smtpd, swaks, aiosmtpd, openssl) and the output
# checkers (headless Chromium and chromedriver, python3-lxml,
# python3-prometheus-client, bash/zsh/fish, man and groff), then runs unit,
# property, pair and integration tests, then the bounded stable-toolchain
# fuzz runs. The integration tests run twice: on epoll and on io_uring.
# Usage: scripts/test.sh   (env SMTPSTORM_FUZZ_SECS=N to change
# the fuzz time per target, default 20; each target runs at least its
# minimum number of cases whatever the time)
#
# Every test binary runs even when another fails (`--no-fail-fast`). The
# closing line is `suite: N passed, M failed`; the exit status is non-zero
# if any test failed, or if cargo failed in a way no test result shows (a
# test binary that did not build or crashed).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-peers.sh

# Integration tests start many short sessions; give them file descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

export CARGO_TERM_COLOR=never
# Profile `ci` (Cargo.toml): optimized, no LTO, so every test binary links fast.
cargo build --profile ci --bin smtpstorm
# SMTPSTORM_BIN lets the integration tests drive the optimized binary.
export SMTPSTORM_BIN="$PWD/target/ci/smtpstorm"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Exit status of the cargo runs: a failure must not stop the next run.
cargo_status=0
# Bounded fuzzing on the stable toolchain (each target runs SMTPSTORM_FUZZ_SECS).
export SMTPSTORM_FUZZ_SECS="${SMTPSTORM_FUZZ_SECS:-20}"
cargo test --profile ci --no-fail-fast --lib --bins --tests -- --ignored fuzz_ --test-threads 1 2>&1 |
  tee -a "$log" || cargo_status=$?
# Everything else: unit, byte-script, property, pair and integration tests,
# the integration tests once per kernel-socket backend (`--io` reads
# SMTPSTORM_IO, so every test that runs the binary takes that backend).
# The backend contract (tests/backend_contract.rs) picks its backends
# itself (epoll, io_uring and xdp, the last in network namespaces, as
# root): it runs in the first pass only.
for io in epoll uring; do
  echo "suite: the tests with SMTPSTORM_IO=$io"
  if [ "$io" = epoll ]; then
    targets=(--lib --bins --tests)
  else
    targets=()
    for t in tests/*.rs; do
      t=$(basename "$t" .rs)
      [ "$t" = backend_contract ] || targets+=(--test "$t")
    done
  fi
  SMTPSTORM_IO=$io cargo test --profile ci --no-fail-fast "${targets[@]}" -- --test-threads 2 2>&1 |
    tee -a "$log" || cargo_status=$?
done
# One closing line for the whole suite (exit 1 if a test failed).
tests_status=0
awk '/^test result:/ {
       for (i = 1; i <= NF; i++) {
         if ($(i) ~ /^passed;?$/) p += $(i-1)
         if ($(i) ~ /^failed;?$/) f += $(i-1)
       }
     }
     END { printf "suite: %d passed, %d failed\n", p, f; exit (f > 0) }' "$log" || tests_status=1
if [ "$cargo_status" -ne 0 ] && [ "$tests_status" -eq 0 ]; then
  # No result line counts a failure, yet cargo failed: a test binary did
  # not build, or crashed before printing its result.
  echo "suite: cargo failed (exit status $cargo_status) without a failed test: a build error or a crashed test binary, see above" >&2
fi
if [ "$cargo_status" -ne 0 ] || [ "$tests_status" -ne 0 ]; then
  exit 1
fi
