#!/usr/bin/env bash
# --io xdp against --io epoll on one veth pair between two network
# namespaces, interleaved rounds, medians (results/xdp.md, results/xdp-bench.json).
#
# Usage: scripts/xdp-bench.sh BIN [ROUNDS]   (as root)
#
# Per round, in rotated order, each case once with the measured side on xdp
# and once on epoll (the other side always on epoll, kernel TCP):
#   sink-new    the sink measured; one 1 KB message per session, 16 in parallel
#   blast-new   the blaster measured, against a kernel sink
#   sink-pipe   the sink measured; 100 pipelined messages per session
#   blast-pipe  the blaster measured; 100 pipelined messages per session
#   pair-new    both ends on the same backend (xdp<->xdp against
#               epoll<->epoll), one 1 KB message per session, 16 in parallel,
#               PAIR_N (20000) sessions; measured: the whole machine's busy
#               CPU from /proc/stat (both processes and all softirq work)
# Figures: sessions/s (the blaster's), CPU µs per session or per message of
# the measured process (utime+stime, from its own report), or of the whole
# machine for pair-new. Each process is pinned: sink on CPU 0, blaster on
# CPU 1. CASES="pair-new" (space-separated) runs only those cases.
#
# Only the namespaces' own addresses (198.18.0.0/24) carry traffic; the
# namespaces are deleted on exit. Every run is bounded by its message count
# and by `timeout`.
set -euo pipefail
bin=$(realpath "${1:?usage: xdp-bench.sh BIN [ROUNDS]}")
rounds=${2:-3}
new_n=${NEW_N:-40000}
pipe_n=${PIPE_N:-100000}
pair_n=${PAIR_N:-20000}
here=$(cd "$(dirname "$0")/.." && pwd)
out_json=${OUT_JSON:-$here/results/xdp-bench.json}
work=$(mktemp -d)
tag=$$
a=xb${tag}a b=xb${tag}b ia=xv${tag}a ib=xv${tag}b
cleanup() {
  ip netns del "$a" 2>/dev/null || true
  ip netns del "$b" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$a"
ip netns add "$b"
ip link add "$ia" numrxqueues 1 numtxqueues 1 type veth peer name "$ib" numrxqueues 1 numtxqueues 1
ip link set "$ia" netns "$a"
ip link set "$ib" netns "$b"
ip -n "$a" addr add 198.18.0.1/24 dev "$ia"
ip -n "$b" addr add 198.18.0.2/24 dev "$ib"
for x in "$a:$ia" "$b:$ib"; do
  ns=${x%%:*} dev=${x##*:}
  # A veth passes TSO packets whole; AF_XDP takes 2 KiB frames.
  ip -n "$ns" link set "$dev" gso_max_segs 1
  ip -n "$ns" link set "$dev" up
  ip -n "$ns" link set lo up
done

# run_case CASE IO ROUND: one run; appends a JSON line to $work/runs.jsonl.
run_case() {
  local case=$1 io=$2 round=$3
  local sink_io=(--io epoll) blast_io=(--io epoll)
  local measured
  case $case in
    sink-*) [ "$io" = xdp ] && sink_io=(--io xdp --xdp-iface "$ia"); measured=sink ;;
    blast-*) [ "$io" = xdp ] && blast_io=(--io xdp --xdp-iface "$ib"); measured=blast ;;
  esac
  case $case in
    pair-*)
      [ "$io" = xdp ] && sink_io=(--io xdp --xdp-iface "$ia") && blast_io=(--io xdp --xdp-iface "$ib")
      measured=machine ;;
  esac
  local load sessions
  case $case in
    pair-new) load=(--messages "$pair_n" -k 1 -c 16); sessions=$pair_n ;;
    *-new) load=(--messages "$new_n" -k 1 -c 16); sessions=$new_n ;;
    *-pipe) load=(--messages "$pipe_n" -k 100 -c 4 --pipelining on); sessions=$((pipe_n / 100)) ;;
  esac
  rm -f "$work/sink.json" "$work/blast.json" "$work/sink.err"
  ip netns exec "$a" "$bin" sink "${sink_io[@]}" --cpus 0 --listen 198.18.0.1:2525 \
    --exit-after-sessions "$sessions" --grace 2s --json "$work/sink.json" >/dev/null 2>"$work/sink.err" &
  local sink_pid=$!
  for _ in $(seq 1 500); do
    grep -q "listening on" "$work/sink.err" 2>/dev/null && break
    sleep 0.02
  done
  # Whole-machine busy jiffies (all CPUs: user..steal, minus idle and iowait).
  busy() { awk '/^cpu / { print $2+$3+$4+$7+$8+$9 }' /proc/stat; }
  local busy0; busy0=$(busy)
  timeout 120 ip netns exec "$b" "$bin" blast 198.18.0.1:2525 "${blast_io[@]}" --cpus 1 \
    "${load[@]}" --timeout 5s --quiet --json "$work/blast.json" >/dev/null 2>&1 || true
  # The sink ends itself after its sessions (bounded by timeout's 120 s too).
  local waited=0
  while kill -0 "$sink_pid" 2>/dev/null && [ $waited -lt 600 ]; do sleep 0.05; waited=$((waited + 1)); done
  kill "$sink_pid" 2>/dev/null || true
  wait "$sink_pid" 2>/dev/null || true
  local busy1; busy1=$(busy)
  python3 - "$case" "$io" "$round" "$measured" "$work" "$((busy1 - busy0))" "$(getconf CLK_TCK)" >>"$work/runs.jsonl" <<'EOF'
import json, sys
case, io, rnd, measured, work = sys.argv[1:6]
busy_jiffies, hz = int(sys.argv[6]), int(sys.argv[7])
try:
    s = json.load(open(f"{work}/sink.json")); b = json.load(open(f"{work}/blast.json"))
except Exception as e:
    print(json.dumps({"case": case, "io": io, "round": int(rnd), "failed": str(e)})); sys.exit()
if measured == "machine":
    # The machine's busy time from the blaster's start to the sink's end.
    n = max(1, b["counts"]["sessions"])
    print(json.dumps({
        "case": case, "io": io, "round": int(rnd),
        "sessions_per_sec": b["rates"]["sessions_per_sec"],
        "messages_per_sec": b["rates"]["messages_per_sec"],
        "cpu_us_per_session": busy_jiffies * 1e6 / hz / n,
        "cpu_us_per_message": busy_jiffies * 1e6 / hz / max(1, b["counts"]["messages_accepted"]),
        "user_us_per_session": None, "sys_us_per_session": None,
        "machine_busy_secs": busy_jiffies / hz,
        "accepted": b["counts"]["messages_accepted"],
        "attempted": b["counts"]["messages_attempted"],
        "sink_accepted": s["counts"]["messages_accepted"],
    }))
    sys.exit()
m = s if measured == "sink" else b
print(json.dumps({
    "case": case, "io": io, "round": int(rnd),
    "sessions_per_sec": b["rates"]["sessions_per_sec"],
    "messages_per_sec": b["rates"]["messages_per_sec"],
    "cpu_us_per_session": m["cpu"]["cpu_us_per_session"],
    "cpu_us_per_message": m["cpu"]["cpu_us_per_message"],
    "user_us_per_session": m["cpu"]["user_secs"] * 1e6 / max(1, m["counts"]["sessions"]),
    "sys_us_per_session": m["cpu"]["sys_secs"] * 1e6 / max(1, m["counts"]["sessions"]),
    "accepted": b["counts"]["messages_accepted"],
    "attempted": b["counts"]["messages_attempted"],
    "sink_accepted": s["counts"]["messages_accepted"],
}))
EOF
}

read -r -a cases <<<"${CASES:-sink-new blast-new sink-pipe blast-pipe pair-new}"
for r in $(seq 1 "$rounds"); do
  for i in "${!cases[@]}"; do
    c=${cases[$(((i + r) % ${#cases[@]}))]}
    # Alternate which backend goes first.
    if [ $((r % 2)) -eq 0 ]; then order=(xdp epoll); else order=(epoll xdp); fi
    for io in "${order[@]}"; do
      run_case "$c" "$io" "$r"
      tail -n 1 "$work/runs.jsonl" >&2
    done
  done
done

python3 - "$work/runs.jsonl" "$out_json" "$rounds" <<'EOF'
import json, statistics, sys, platform, os
runs = [json.loads(l) for l in open(sys.argv[1])]
out = {"rounds": int(sys.argv[3]), "kernel": platform.release(), "cpus": os.cpu_count(),
       "load_avg": os.getloadavg(), "runs": runs}
json.dump(out, open(sys.argv[2], "w"), indent=1)
ok = [r for r in runs if "failed" not in r]
def med(case, io, key):
    v = [r[key] for r in ok if r["case"] == case and r["io"] == io and r.get(key) is not None]
    return statistics.median(v) if v else float("nan")
print("| case | io | sessions/s | CPU µs/session | of it user | of it system | CPU µs/message |")
print("|---|---|---:|---:|---:|---:|---:|")
for case in ["sink-new", "blast-new", "sink-pipe", "blast-pipe", "pair-new"]:
    if not any(r["case"] == case for r in ok):
        continue
    for io in ["xdp", "epoll"]:
        print(f"| {case} | {io} | {med(case, io, 'sessions_per_sec'):.0f} | {med(case, io, 'cpu_us_per_session'):.1f} "
              f"| {med(case, io, 'user_us_per_session'):.1f} | {med(case, io, 'sys_us_per_session'):.1f} "
              f"| {med(case, io, 'cpu_us_per_message'):.1f} |")
for case in ["sink-new", "blast-new", "pair-new"]:
    if not any(r["case"] == case for r in ok):
        continue
    x, e = med(case, "xdp", "cpu_us_per_session"), med(case, "epoll", "cpu_us_per_session")
    print(f"\n{case}: sessions per CPU-second, xdp / epoll = {e / x:.2f}; CPU per session, xdp / epoll = {x / e:.2f}")
print(f"\nload average at the end: {os.getloadavg()}")
failed = [r for r in runs if "failed" in r]
print(f"\nfailed runs: {len(failed)}")
EOF
