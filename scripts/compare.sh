#!/usr/bin/env bash
# The benchmark suite against Postfix (issue 6). On loopback, in interleaved
# rounds, it runs every pairing of {smtpstorm blast, Postfix smtp-source} x
# {smtpstorm sink, Postfix smtp-sink} for new sessions (1 KB), persistent
# sessions (100 messages) and 100 KB messages; then memory per idle
# connection (10,000 connections), sink thread scaling, and STARTTLS costs
# (full vs resumed handshakes vs plaintext, beside the public-key floor: the
# same operations timed alone with the same library, examples/tls_floor.rs).
# Writes results/compare.json, results/compare.svg and results/README.md.
#
# With --tls it runs only the STARTTLS costs and the floor (issue 21): the
# sink on CPU 0, the blaster on CPU 1, plaintext / full / resumed sessions
# interleaved, the load average beside each run. Writes results/tls.json and
# results/tls-compare.md.
#
# With --backends it runs instead epoll against io_uring (issue 11): the
# same workloads with `--io epoll` and `--io uring`, sink and blaster each,
# interleaved; system calls per message (`strace -c -f`, short runs); sink
# RSS per idle connection at 10,000 and 100,000 connections (where
# RLIMIT_NOFILE allows one process that many). Writes results/backends.json
# and its section of results/README.md.
#
# Usage: scripts/compare.sh [--quick] [--backends] [--tls] [--rounds N] [--tls-sessions N]
#                           [--bin PATH] [--out DIR] [--no-build]
#   --quick     about 2 minutes (default: at most about 10 minutes)
#   --backends  epoll against io_uring only (needs strace for system calls)
#   --tls       STARTTLS costs and the public-key floor only
#   --tls-sessions N  sessions per TLS run (default 1000; 200 with --quick)
#   --bin       smtpstorm binary (default: $CARGO_TARGET_DIR/release/smtpstorm, built here);
#               the floor binary is examples/tls_floor beside it
#   --no-build  do not run cargo build --release
#
# Needs root for installing Postfix when missing (scripts/install-peers.sh)
# and for smtp-sink -u nobody. The work is in scripts/compare/suite.py
# (measurement) and scripts/compare/report.py (JSON, SVG, README).
# Every process started is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=()
BACKENDS=()
TLS=()
ROUNDS=()
BIN=""
OUT=results
BUILD=1
ARGS="$*"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=(--quick) ;;
        --backends) BACKENDS=(--backends) ;;
        --tls) TLS=(--tls) ;;
        --tls-sessions) TLS+=(--tls-sessions "$2"); shift ;;
        --rounds) ROUNDS=(--rounds "$2"); shift ;;
        --bin) BIN=$2; BUILD=0; shift ;;
        --out) OUT=$2; shift ;;
        --no-build) BUILD=0 ;;
        -h|--help) sed -n '2,37p' "$0"; exit 0 ;;
        *) echo "compare.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

[ -x /usr/sbin/smtp-sink ] && [ -x /usr/sbin/smtp-source ] || bash scripts/install-peers.sh
if [ "$BUILD" = 1 ]; then
    cargo build --release --bin smtpstorm --example tls_floor >&2
fi
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/smtpstorm}
[ -x "$BIN" ] || { echo "compare.sh: no smtpstorm binary at $BIN" >&2; exit 2; }
"$BIN" --version >/dev/null 2>&1 && "$BIN" --version | grep -q smtpstorm \
    || { echo "compare.sh: $BIN does not answer --version (a stub?)" >&2; exit 2; }

# 10,000 (with --backends 100,000) idle connections on each side, plus the
# client runs; where the hard limit is lower, the largest size is skipped
# and the report says why.
ulimit -n 262144 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

SUITE_PID=""
cleanup() {
    if [ -n "$SUITE_PID" ]; then
        kill -TERM "$SUITE_PID" 2>/dev/null || true
        wait "$SUITE_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT INT TERM
python3 scripts/compare/suite.py --bin "$BIN" --out "$OUT" "${QUICK[@]}" "${BACKENDS[@]}" "${TLS[@]}" "${ROUNDS[@]}" \
    --command "scripts/compare.sh $ARGS" &
SUITE_PID=$!
wait "$SUITE_PID"
rc=$?
SUITE_PID=""
exit "$rc"
