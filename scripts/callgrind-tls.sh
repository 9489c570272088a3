#!/usr/bin/env bash
# Instructions per session (callgrind, every thread of the measured process)
# in plaintext, with a full STARTTLS handshake, and resumed: the method of
# scripts/callgrind.sh (differential, N1 and N2 one-message sessions, so
# start-up cancels out), with TLS on. results/tls.md has the figures.
#
# Usage: scripts/callgrind-tls.sh ROLE BIN [MODE...]
#   ROLE  sink (the sink under callgrind, the blaster outside) or blast.
#   BIN   the smtpstorm binary (both sides).
#   MODE  plain, full, resumed (default: all three, in that order).
# Env: SESS_N1/SESS_N2 (default 100/600 sessions), SINK_ARGS and BLAST_ARGS
#      (extra flags, e.g. SINK_ARGS="--tls-suites TLS13_AES_256_GCM_SHA384").
# Prints one line per mode: "MODE IR_PER_SESSION". Loopback only; every run
# is bounded by its message count.
set -euo pipefail
role=${1:?usage: callgrind-tls.sh sink|blast BIN [MODE...]}
bin=${2:?usage: callgrind-tls.sh sink|blast BIN [MODE...]}
shift 2
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(plain full resumed)
read -r -a sink_extra <<<"${SINK_ARGS:-}"
read -r -a blast_extra <<<"${BLAST_ARGS:-}"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

free_port() {
  python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
}

wait_port() {
  for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "callgrind-tls.sh: nothing listens on $1" >&2
  return 1
}

total_ir() {
  callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !t { gsub(",", "", $1); t = $1 } END { print t }'
}

run() {
  local mode=$1 n=$2 port out tls=()
  case $mode in
    plain) ;;
    full) tls=(--starttls) ;;
    resumed) tls=(--starttls --tls-resume) ;;
    *) echo "callgrind-tls.sh: unknown mode $mode" >&2; exit 2 ;;
  esac
  port=$(free_port)
  out="$work/cg.$role.$mode.$n"
  if [ "$role" = sink ]; then
    valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" sink --threads 1 \
      --listen "127.0.0.1:$port" --exit-after-messages "$n" --quiet "${sink_extra[@]}" \
      >/dev/null 2>"$work/vg.log" &
    local vp=$!
    wait_port "$port"
    "$bin" blast "127.0.0.1:$port" -n "$n" -k 1 -c 1 --threads 1 --quiet --size 1KiB \
      "${tls[@]}" "${blast_extra[@]}" >/dev/null
    wait "$vp"
  else
    "$bin" sink --threads 1 --listen "127.0.0.1:$port" --quiet --duration 600s \
      "${sink_extra[@]}" >/dev/null 2>&1 &
    local sp=$!
    wait_port "$port"
    valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" blast "127.0.0.1:$port" \
      -n "$n" -k 1 -c 1 --threads 1 --quiet --size 1KiB "${tls[@]}" "${blast_extra[@]}" \
      >/dev/null 2>"$work/vg.log"
    kill "$sp" 2>/dev/null || true
    wait "$sp" 2>/dev/null || true
  fi
  if [ -n "${KEEP_DIR:-}" ]; then cp "$out" "$KEEP_DIR/"; fi
  total_ir "$out"
}

n1=${SESS_N1:-100}; n2=${SESS_N2:-600}
for mode in "${modes[@]}"; do
  a=$(run "$mode" "$n1")
  b=$(run "$mode" "$n2")
  echo "$mode $(( (b - a) / (n2 - n1) ))"
done
