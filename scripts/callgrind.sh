#!/usr/bin/env bash
# Instructions per pipelined message and per session, counted by
# `valgrind --tool=callgrind` (Ir of every thread of the measured process).
# Differential: the same workload with N1 and N2 units, so start-up and
# shutdown cancel out: (Ir(N2) - Ir(N1)) / (N2 - N1). Counts do not depend
# on machine load, so two binaries compare exactly (results/callgrind.md).
#
# Usage: scripts/callgrind.sh ROLE BIN [EXTRA BLAST ARGS...]
#   ROLE  blast: the blaster runs under callgrind, the sink outside;
#         sink:  the sink runs under callgrind, the blaster outside.
#   BIN   the smtpstorm binary to measure (the other side uses it too).
# Prints two lines: "pipelined_message IR" and "session IR".
# Env: PIPE_N1/PIPE_N2 (default 2000/20000 messages in one session),
#      SESS_N1/SESS_N2 (default 200/2000 one-message sessions).
# Traffic stays on 127.0.0.1; every run is bounded by its message count.
set -euo pipefail
role=${1:?usage: callgrind.sh blast|sink BIN [ARGS...]}
bin=${2:?usage: callgrind.sh blast|sink BIN [ARGS...]}
shift 2
extra=("$@")
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
  echo "callgrind.sh: nothing listens on $1" >&2
  return 1
}

total_ir() {
  callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }'
}

# One run: N messages, K per session, one thread and one connection.
run() {
  local n=$1 k=$2 port out
  port=$(free_port)
  out="$work/cg.$role.$n.$k"
  if [ "$role" = sink ]; then
    valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" sink --threads 1 \
      --listen "127.0.0.1:$port" --exit-after-messages "$n" --quiet --no-starttls \
      >/dev/null 2>"$work/vg.log" &
    local vp=$!
    # Readiness: the port accepts (one extra empty session in every run, so
    # it cancels out of the difference).
    wait_port "$port"
    "$bin" blast "127.0.0.1:$port" -n "$n" -k "$k" -c 1 --threads 1 --quiet \
      --size 1KiB "${extra[@]}" >/dev/null
    wait "$vp"
  else
    "$bin" sink --threads 1 --listen "127.0.0.1:$port" --quiet --no-starttls \
      --duration 600s >/dev/null 2>&1 &
    local sp=$!
    wait_port "$port"
    valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" blast "127.0.0.1:$port" \
      -n "$n" -k "$k" -c 1 --threads 1 --quiet --size 1KiB "${extra[@]}" \
      >/dev/null 2>"$work/vg.log"
    kill "$sp" 2>/dev/null || true
    wait "$sp" 2>/dev/null || true
  fi
  total_ir "$out"
}

per_unit() {
  local n1=$1 n2=$2 k1=$3 k2=$4 a b
  a=$(run "$n1" "$k1")
  b=$(run "$n2" "$k2")
  echo $(( (b - a) / (n2 - n1) ))
}

pn1=${PIPE_N1:-2000}; pn2=${PIPE_N2:-20000}
sn1=${SESS_N1:-200}; sn2=${SESS_N2:-2000}
echo "pipelined_message $(per_unit "$pn1" "$pn2" "$pn1" "$pn2")"
echo "session $(per_unit "$sn1" "$sn2" 1 1)"
