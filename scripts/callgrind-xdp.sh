#!/usr/bin/env bash
# Instructions per session of the sink on --io xdp (callgrind), kernel blaster (epoll) outside, in a
# namespace pair (deleted on exit). Differential 500 -> 2500 one-message
# sessions, 4 in parallel (results/xdp.md). Prints "session IR".
# Usage: scripts/callgrind-xdp.sh BIN   (as root; env N1/N2 change the counts,
# KEEP=DIR keeps the two callgrind outputs there, for callgrind_annotate)
# Traffic stays inside the two namespaces it makes (198.18.0.0/24), which
# are deleted on exit; each run is bounded by its session count and timeouts.
set -uo pipefail
bin=$(realpath "$1")
n1=${N1:-500}; n2=${N2:-2500}
work=$(mktemp -d)
tag=$$
a=cg${tag}a b=cg${tag}b ia=cv${tag}a ib=cv${tag}b
cleanup() { ip netns del "$a" 2>/dev/null || true; ip netns del "$b" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ip netns add "$a"; ip netns add "$b"
ip link add "$ia" numrxqueues 1 numtxqueues 1 type veth peer name "$ib" numrxqueues 1 numtxqueues 1
ip link set "$ia" netns "$a"; ip link set "$ib" netns "$b"
ip -n "$a" addr add 198.18.0.1/24 dev "$ia"; ip -n "$b" addr add 198.18.0.2/24 dev "$ib"
for x in "$a:$ia" "$b:$ib"; do ns=${x%%:*} dev=${x##*:}
  ip -n "$ns" link set "$dev" gso_max_segs 1; ip -n "$ns" link set "$dev" up; ip -n "$ns" link set lo up; done
run() {
  local n=$1 out="$work/cg.$1"
  rm -f "$work/sink.err"
  ip netns exec "$a" valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" sink --io xdp --xdp-iface "$ia" \
    --threads 1 --listen 198.18.0.1:2525 --exit-after-sessions "$n" --grace 2s --no-starttls >/dev/null 2>"$work/sink.err" &
  local sp=$!
  for _ in $(seq 1 1200); do grep -q "listening on" "$work/sink.err" 2>/dev/null && break; sleep 0.05; done
  timeout 300 ip netns exec "$b" "$bin" blast 198.18.0.1:2525 --io epoll --threads 1 -n "$n" -k 1 -c 4 \
    --size 1KiB --timeout 5s --quiet >/dev/null 2>&1 || true
  local w=0
  while kill -0 "$sp" 2>/dev/null && [ $w -lt 1200 ]; do sleep 0.05; w=$((w+1)); done
  kill "$sp" 2>/dev/null || true; wait "$sp" 2>/dev/null || true
  callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }'
}
x=$(run "$n1"); y=$(run "$n2")
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP"; cp "$work/cg.$n1" "$work/cg.$n2" "$KEEP/"; fi
echo "xdp_sink_session $(( (y - x) / (n2 - n1) )) ($x $y)"
