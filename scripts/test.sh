#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs the real peers (Postfix
# smtp-sink/smtp-source/smtpd, swaks, aiosmtpd, openssl), then runs unit,
# property, pair and integration tests, then the bounded stable-toolchain
# fuzz runs. Usage: scripts/test.sh   (env SMTPSTORM_FUZZ_SECS=N to change
# the fuzz time per target, default 20)
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
# Bounded fuzzing on the stable toolchain (each target runs SMTPSTORM_FUZZ_SECS).
export SMTPSTORM_FUZZ_SECS="${SMTPSTORM_FUZZ_SECS:-20}"
cargo test --profile ci --lib --bins --tests -- --ignored fuzz_ --test-threads 1 2>&1 | tee -a "$log"
# Everything else: unit, byte-script, property, pair and integration tests.
cargo test --profile ci --lib --bins --tests -- --test-threads 2 2>&1 | tee -a "$log"
# One closing line for the whole suite.
awk '/^test result:/ {
       for (i = 1; i <= NF; i++) {
         if ($(i) ~ /^passed;?$/) p += $(i-1)
         if ($(i) ~ /^failed;?$/) f += $(i-1)
       }
     }
     END { printf "suite: %d passed, %d failed\n", p, f; exit (f > 0) }' "$log"
