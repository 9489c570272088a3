#!/usr/bin/env bash
# Side-by-side comparison of `smtpstorm sink` and Postfix `smtp-sink` on
# loopback, driven by the same client (Postfix `smtp-source`), in alternating
# rounds. For each scenario it reports the sink's CPU time (utime+stime from
# /proc/PID/stat, read while the sink still runs) per session and per
# message, the client-side rates, and for idle connections the sink's RSS
# per connection. Ratios are ours/theirs, medians over rounds.
#
# Usage: scripts/compare.sh [--quick] [--bin PATH] [--out DIR] [--rounds N]
#   --quick   smaller runs, about 2 minutes in all (default: about 6 minutes)
#   --bin     the smtpstorm binary (default: target/release/smtpstorm)
#   --out     where to write sink-compare[-quick].{json,md} (default: results/)
#
# Needs: /usr/sbin/smtp-source, /usr/sbin/smtp-sink (Debian package
# postfix), python3. Run as root (smtp-sink is started with -u nobody).
# Everything is bounded: every client run has a timeout, every process
# started here is killed on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
QUICK=0
BIN=${CARGO_TARGET_DIR:-target}/release/smtpstorm
OUT=results
ROUNDS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --bin) BIN=$2; shift ;;
        --out) OUT=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "compare.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

SOURCE=/usr/sbin/smtp-source
PSINK=/usr/sbin/smtp-sink
for t in "$BIN" "$SOURCE" "$PSINK"; do
    [ -x "$t" ] || { echo "compare.sh: $t not found or not executable" >&2; exit 2; }
done
mkdir -p "$OUT"

if [ "$QUICK" = 1 ]; then
    : "${ROUNDS:=2}"; N_SESS=3000; N_PERS=10000; N_LARGE=1000; N_IDLE=10000
else
    : "${ROUNDS:=3}"; N_SESS=10000; N_PERS=50000; N_LARGE=4000; N_IDLE=10000
fi
CLIENT_TIMEOUT=120
# Both sinks run on one CPU (ours pinned with --cpus, smtp-sink with
# taskset) and the client on another, so neither sink shares its core
# with the client by the scheduler's whim.
SINK_CPU=0
CLIENT_CPU=$(( $(nproc) > 1 ? 1 : 0 ))
TCK=$(getconf CLK_TCK)
# Below the ephemeral range, so no client socket of an earlier scenario
# (10k idle connections, TIME_WAIT) can hold the port.
PORT_BASE=$((20000 + RANDOM % 10000))
RAW=$(mktemp)
PIDS=()

cleanup() {
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] && kill "$p" 2>/dev/null || true
    done
    rm -f "$RAW"
}
trap cleanup EXIT

# The file-descriptor limit must cover 10k idle connections on each side.
ulimit -n 30000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cpu_ticks() { # utime + stime of PID (all threads), in clock ticks
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}
rss_kib() {
    awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"
}
wait_port() {
    python3 - "$1" <<'EOF'
import socket, sys, time
port = int(sys.argv[1])
for _ in range(200):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=1)
        s.recv(512)
        s.close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit("nothing listening on port %d" % port)
EOF
}

start_sink() { # which port -> echoes PID
    local which=$1 port=$2
    if [ "$which" = ours ]; then
        "$BIN" sink --listen "127.0.0.1:$port" --cpus "$SINK_CPU" --no-starttls --quiet \
            --max-connections 100000 >/dev/null 2>&1 &
    else
        taskset -c "$SINK_CPU" "$PSINK" -u nobody -m 30000 "127.0.0.1:$port" 4096 >/dev/null 2>&1 &
    fi
    echo $!
}

# scenario name, client args..., messages, sessions
run_client_scenario() {
    local scen=$1 which=$2 port=$3 msgs=$4 sess=$5; shift 5
    local pid c0 c1 t0 t1
    pid=$(start_sink "$which" "$port"); PIDS+=("$pid")
    wait_port "$port"
    c0=$(cpu_ticks "$pid")
    t0=$(date +%s.%N)
    timeout "$CLIENT_TIMEOUT" taskset -c "$CLIENT_CPU" "$SOURCE" "$@" "127.0.0.1:$port" >/dev/null 2>&1 \
        || echo "compare.sh: smtp-source failed or timed out ($scen/$which)" >&2
    t1=$(date +%s.%N)
    sleep 0.2
    c1=$(cpu_ticks "$pid")
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    python3 -c "
c = ($c1 - $c0) / $TCK * 1e6; w = $t1 - $t0
print('\t'.join(map(str, ['$scen', '$which', c, c / $sess, c / $msgs, $msgs / w, $sess / w, 0])))" >>"$RAW"
}

run_idle() {
    local which=$1 port=$2 pid r0 r1 hpid ok=0
    pid=$(start_sink "$which" "$port"); PIDS+=("$pid")
    wait_port "$port"
    sleep 0.3
    r0=$(rss_kib "$pid")
    local ready stop
    ready=$(mktemp -u); stop=$(mktemp -u)
    # Open N connections, read each greeting, write how many greeted to
    # $ready, then hold them open until $stop exists (at most 60 s).
    python3 - "$port" "$N_IDLE" "$ready" "$stop" <<'EOF2' &
import os, resource, socket, sys, time
port, n, ready, stop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1000), hard))
socks, ok = [], 0
try:
    for i in range(n):
        socks.append(socket.create_connection(("127.0.0.1", port), timeout=20))
    for s in socks:
        if s.recv(512).startswith(b"220"):
            ok += 1
except OSError as e:
    print("idle helper:", e, file=sys.stderr)
with open(ready + ".tmp", "w") as f:
    f.write(str(ok))
os.rename(ready + ".tmp", ready)
t0 = time.time()
while not os.path.exists(stop) and time.time() - t0 < 60:
    time.sleep(0.05)
EOF2
    hpid=$!; PIDS+=("$hpid")
    for _ in $(seq 1 1200); do [ -f "$ready" ] && break; sleep 0.1; done
    [ -f "$ready" ] && ok=$(cat "$ready")
    sleep 0.5
    r1=$(rss_kib "$pid")
    touch "$stop"
    wait "$hpid" 2>/dev/null || true
    rm -f "$ready" "$stop"
    kill "$pid" 2>/dev/null || true
    python3 -c "
per = ($r1 - $r0) * 1024 / max($ok, 1)
print('\t'.join(map(str, ['idle', '$which', 0, 0, 0, 0, $ok, per])))" >>"$RAW"
}

echo "compare.sh: $ROUNDS rounds, quick=$QUICK, bin=$BIN" >&2
port=$PORT_BASE
for round in $(seq 1 "$ROUNDS"); do
    # Alternate who goes first in each round.
    if [ $((round % 2)) = 1 ]; then order="ours theirs"; else order="theirs ours"; fi
    for which in $order; do
        port=$((port + 1))
        run_client_scenario sessions "$which" "$port" "$N_SESS" "$N_SESS" -s 20 -m "$N_SESS" -l 1000
        port=$((port + 1))
        run_client_scenario persistent "$which" "$port" "$N_PERS" $((N_PERS / 100)) \
            -d -s $((N_PERS / 100)) -m "$N_PERS" -l 1000
        port=$((port + 1))
        run_client_scenario large "$which" "$port" "$N_LARGE" "$N_LARGE" -s 4 -m "$N_LARGE" -l 100000
        port=$((port + 1))
        # Informational: the same 100 KB messages over 4 persistent
        # sessions, which isolates the body cost from the session cost.
        run_client_scenario large_persistent "$which" "$port" "$N_LARGE" 4 \
            -d -s 4 -m "$N_LARGE" -l 100000
        port=$((port + 1))
        run_idle "$which" "$port"
    done
    echo "compare.sh: round $round done" >&2
done

python3 - "$RAW" "$OUT" "$QUICK" "$ROUNDS" <<'EOF'
import json, statistics, sys, time, platform, os
raw, out, quick, rounds = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
rows = [l.rstrip("\n").split("\t") for l in open(raw) if l.strip()]
data = {}
for scen, which, cpu, cpu_sess, cpu_msg, msg_rate, sess_rate, rss in rows:
    d = data.setdefault(scen, {}).setdefault(which, {k: [] for k in
        ["cpu_us", "cpu_us_per_session", "cpu_us_per_message", "messages_per_sec", "sessions_per_sec", "rss_bytes_per_connection"]})
    for k, v in zip(d.keys(), [cpu, cpu_sess, cpu_msg, msg_rate, sess_rate, rss]):
        d[k].append(float(v))
med = lambda xs: statistics.median(xs) if xs else None
targets = {"sessions": ("cpu_us_per_session", 0.8), "persistent": ("cpu_us_per_message", 0.8),
           "large": ("cpu_us_per_message", 0.25), "large_persistent": ("cpu_us_per_message", None),
           "idle": ("rss_bytes_per_connection", None)}
result = {"tool": "scripts/compare.sh", "quick": quick, "rounds": rounds,
          "generated_unix": time.time(), "host": platform.node(), "cores": os.cpu_count(),
          "kernel": platform.release(), "scenarios": {}}
lines = ["# smtpstorm sink vs Postfix smtp-sink (loopback, client: smtp-source)", "",
         f"quick={quick}, rounds={rounds}, {os.cpu_count()} cores, kernel {platform.release()}. "
         "Medians over rounds; ratio = ours / theirs (lower is better).", "",
         "| scenario | metric | ours | smtp-sink | ratio | target | met |", "|---|---|---|---|---|---|---|"]
for scen, (metric, target) in targets.items():
    if scen not in data:
        continue
    s = {w: {k: med(v) for k, v in d.items()} for w, d in data[scen].items()}
    ours, theirs = s.get("ours", {}).get(metric), s.get("theirs", {}).get(metric)
    ratio = ours / theirs if ours is not None and theirs else None
    if scen == "idle":
        met = ours is not None and ours <= 16 * 1024
        tgt = "<= 16 KiB/conn"
    elif target is None:
        met = None
        tgt = "(info)"
    else:
        met = ratio is not None and ratio <= target
        tgt = f"<= {target}x"
    result["scenarios"][scen] = {"metric": metric, "ours": s.get("ours"), "theirs": s.get("theirs"),
                                 "ratio": ratio, "target": tgt, "met": met, "raw": data[scen]}
    fmt = lambda x: "n/a" if x is None else f"{x:,.1f}"
    lines.append(f"| {scen} | {metric} | {fmt(ours)} | {fmt(theirs)} | {'n/a' if ratio is None else f'{ratio:.2f}'} | {tgt} | {'-' if met is None else 'yes' if met else 'NO'} |")
    if scen != "idle":
        lines.append(f"| {scen} | messages_per_sec | {fmt(s.get('ours', {}).get('messages_per_sec'))} | {fmt(s.get('theirs', {}).get('messages_per_sec'))} | | | |")
name = "sink-compare-quick" if quick else "sink-compare"
json.dump(result, open(os.path.join(out, name + ".json"), "w"), indent=2)
open(os.path.join(out, name + ".md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
