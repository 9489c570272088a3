#!/usr/bin/env bash
# Soak test: open-loop load with injected faults on loopback for a long time,
# sampling RSS and open file descriptors of the sink and the blaster every
# second. Fails (exit 1) if, after warm-up, either process's memory or fd
# count grows past a small bound, or if any message is lost or corrupted
# (blaster accepted == sink accepted == sink verify_ok, verify_corrupt == 0).
#
# Usage: scripts/soak.sh [--duration SECS] [--rate MSG_PER_SEC] [--out DIR]
#                        [--rss-growth-kib N] [--fd-growth N]
#   defaults: 600 s, 300 msg/s, results/, 8192 KiB, 32 fds
# Binary: $SMTPSTORM_BIN, else target/release/smtpstorm, else target/debug.
# Writes DIR/soak-<stamp>.csv (t,sink_rss_kib,sink_fds,blast_rss_kib,blast_fds)
# and DIR/soak-<stamp>.md (parameters, counts, growth, verdict).
set -euo pipefail
cd "$(dirname "$0")/.."

duration=600
rate=300
out=results
rss_bound_kib=8192
fd_bound=32
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) duration="$2"; shift 2 ;;
        --rate) rate="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --rss-growth-kib) rss_bound_kib="$2"; shift 2 ;;
        --fd-growth) fd_bound="$2"; shift 2 ;;
        -h|--help) sed -n 2,13p "$0"; exit 0 ;;
        *) echo "soak.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

target_dir="${CARGO_TARGET_DIR:-target}"
bin="${SMTPSTORM_BIN:-}"
if [ -z "$bin" ]; then
    if [ -x "$target_dir/release/smtpstorm" ]; then bin="$target_dir/release/smtpstorm"
    else bin="$target_dir/debug/smtpstorm"; fi
fi
[ -x "$bin" ] || { echo "soak.sh: no binary at $bin (cargo build first)" >&2; exit 2; }

mkdir -p "$out"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
csv="$out/soak-$stamp.csv"
md="$out/soak-$stamp.md"
work="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
faults=(--fault rcpt:451:5% --fault data:disconnect:1% --fault dot:disconnect421:1%
        --fault mail:delay=1ms..5ms:10%)

sink_pid=""; blast_pid=""
cleanup() {
    [ -n "$blast_pid" ] && kill "$blast_pid" 2>/dev/null || true
    [ -n "$sink_pid" ] && kill "$sink_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$bin" sink --threads 1 --quiet --verify --listen "127.0.0.1:$port" --grace 5s \
    --command-timeout 10s --data-timeout 10s --seed 11 "${faults[@]}" \
    --json "$work/sink.json" >/dev/null &
sink_pid=$!
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done

"$bin" blast "127.0.0.1:$port" --threads 1 --rate "$rate" -c 64 -k 5 \
    --size 200..8KiB --duration "${duration}s" --timeout 5s --quiet --allow-invalid \
    --json "$work/blast.json" >"$work/blast.txt" 2>&1 &
blast_pid=$!

sample() { # pid -> "rss_kib fds"
    local rss fds
    rss="$(awk '/^VmRSS:/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0)"
    fds="$(ls "/proc/$1/fd" 2>/dev/null | wc -l)"
    echo "${rss:-0},${fds}"
}

echo "t_secs,sink_rss_kib,sink_fds,blast_rss_kib,blast_fds" >"$csv"
t=0
while kill -0 "$blast_pid" 2>/dev/null; do
    echo "$t,$(sample "$sink_pid"),$(sample "$blast_pid")" >>"$csv"
    sleep 1
    t=$((t + 1))
done
blast_rc=0; wait "$blast_pid" || blast_rc=$?
blast_pid=""
kill -TERM "$sink_pid"
sink_rc=0; wait "$sink_pid" || sink_rc=$?
sink_pid=""

python3 - "$csv" "$md" "$work/sink.json" "$work/blast.json" "$duration" "$rate" \
    "$rss_bound_kib" "$fd_bound" "$blast_rc" "$sink_rc" "$bin" <<'EOF'
import csv, json, sys
csv_path, md_path, sink_p, blast_p, duration, rate, rss_bound, fd_bound, brc, src, binp = sys.argv[1:]
rows = [r for r in csv.DictReader(open(csv_path)) if r["blast_fds"] != "0"]
sink_doc, blast_doc = json.load(open(sink_p)), json.load(open(blast_p))
s, b = sink_doc["counts"], blast_doc["counts"]
io = f"sink {sink_doc['config'].get('io', '?')}, blast {blast_doc['config'].get('io', '?')}"
rss_bound, fd_bound = int(rss_bound), int(fd_bound)
n = len(rows)
# Warm-up: the first 20% of the run (at least 10 s); the reference is the
# peak over the 10 samples that follow it, so steady-state noise is allowed.
warm = max(10, n // 5)
fails = []
growth = {}
if n < warm + 10:
    fails.append(f"too few samples ({n})")
else:
    for col in ["sink_rss_kib", "sink_fds", "blast_rss_kib", "blast_fds"]:
        ref = max(int(r[col]) for r in rows[warm:warm + 10])
        peak = max(int(r[col]) for r in rows[warm:])
        growth[col] = (ref, peak, peak - ref)
        bound = rss_bound if col.endswith("kib") else fd_bound
        if peak - ref > bound:
            fails.append(f"{col} grew {peak - ref} (from {ref} to {peak}) past {bound}")
outcomes = sum(b[k] for k in ["messages_accepted", "messages_tempfailed", "messages_rejected",
                              "connection_errors", "timeouts", "protocol_errors"])
if outcomes != b["messages_attempted"]:
    fails.append(f"blast outcomes {outcomes} != attempted {b['messages_attempted']}")
if b["messages_accepted"] != s["messages_accepted"]:
    fails.append(f"blast accepted {b['messages_accepted']} != sink accepted {s['messages_accepted']}")
if s["verify_ok"] != s["messages_accepted"] or s["verify_corrupt"] != 0:
    fails.append(f"sink verify_ok {s['verify_ok']} corrupt {s['verify_corrupt']}")
if brc not in ("0",) or src != "0":
    fails.append(f"exit codes: blast {brc}, sink {src}")
verdict = "PASS" if not fails else "FAIL"
with open(md_path, "w") as f:
    f.write(f"# Soak run: {verdict}\n\n")
    f.write(f"- binary: `{binp}`; backends: {io}; duration {duration} s; open loop {rate} msg/s, -c 64, -k 5, 200..8KiB\n")
    f.write("- sink faults: rcpt:451:5%, data:disconnect:1%, dot:disconnect421:1%, mail:delay=1ms..5ms:10%; --verify\n")
    f.write(f"- samples: {n} (1/s), warm-up {warm} s; bounds: RSS +{rss_bound} KiB, fds +{fd_bound}\n")
    f.write(f"- CSV: `{csv_path.split('/')[-1]}`\n\n")
    f.write("| series | after warm-up | peak | growth |\n|---|---|---|---|\n")
    for col, (ref, peak, g) in growth.items():
        f.write(f"| {col} | {ref} | {peak} | {g} |\n")
    f.write("\n| count | blast | sink |\n|---|---|---|\n")
    for k in ["messages_attempted", "messages_accepted", "messages_tempfailed", "messages_rejected",
              "connection_errors", "timeouts", "protocol_errors", "sessions", "verify_ok", "verify_corrupt"]:
        f.write(f"| {k} | {b.get(k, '')} | {s.get(k, '')} |\n")
    f.write("\n" + ("All checks passed.\n" if not fails else "Failures:\n" + "".join(f"- {x}\n" for x in fails)))
print(open(md_path).read())
sys.exit(0 if not fails else 1)
EOF
