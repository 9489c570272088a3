#!/usr/bin/env bash
# Side-by-side load generators: `smtpstorm blast` vs Postfix `smtp-source`,
# both driving the same sink (Postfix `smtp-sink` by default, or
# `smtpstorm sink` with SINK=smtpstorm), in alternating rounds of one run.
# Generator CPU time comes from /proc/PID/stat of the finished (not yet
# reaped) generator process; rates are work / wall time for both tools.
#
# Workloads:  new        one 1 KB message per session (connect, EHLO, MAIL,
#                        RCPT, DATA, QUIT), C sessions in parallel
#             persistent 100 messages per session (smtp-source -d)
#
# Usage: scripts/compare-blast.sh [--quick] [--rounds N] [--threads T]
#                                 [--concurrency C] [--out PREFIX]
# env:   SMTPSTORM_BIN (default target/release/smtpstorm), SINK=postfix|smtpstorm
# Output: PREFIX.json and PREFIX.md (default results/blast-compare-<sink>).
# Bounded: every generator run is killed after 120 s.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${SMTPSTORM_BIN:-target/release/smtpstorm}
SINK=${SINK:-postfix}
ROUNDS=5
THREADS=1
CONC=20
NEW_N=20000
PERSIST_N=100000
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) ROUNDS=3; NEW_N=5000; PERSIST_N=30000 ;;
        --rounds) ROUNDS=$2; shift ;;
        --threads) THREADS=$2; shift ;;
        --concurrency) CONC=$2; shift ;;
        --out) OUT=$2; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
OUT=${OUT:-results/blast-compare-$SINK}
[ -x "$BIN" ] || { echo "no smtpstorm binary at $BIN (cargo build --release)" >&2; exit 2; }
command -v smtp-source >/dev/null || [ -x /usr/sbin/smtp-source ] || { echo "smtp-source missing (apt-get install postfix)" >&2; exit 2; }
ulimit -n 65536 2>/dev/null || true

PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
ADDR=127.0.0.1:$PORT
WORK=$(mktemp -d /tmp/smtpstorm-compare.XXXXXX)
case "$SINK" in
    postfix) /usr/sbin/smtp-sink -u nobody "$ADDR" 4096 & ;;
    smtpstorm) "$BIN" sink --listen "$ADDR" --threads 1 --quiet & ;;
    *) echo "SINK must be postfix or smtpstorm" >&2; exit 2 ;;
esac
SINK_PID=$!
trap 'kill $SINK_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do
    python3 -c "import socket;socket.create_connection(('127.0.0.1',$PORT),0.2)" 2>/dev/null && break
    sleep 0.1
done

# measure LABEL ROUND WORKLOAD UNITS -- CMD...: one JSON line on stdout.
measure() {
    local label=$1 round=$2 workload=$3 units=$4; shift 5
    python3 - "$label" "$round" "$workload" "$units" "$SINK_PID" "$@" <<'PY'
import json, os, subprocess, sys, time
label, rnd, workload, units, sink_pid = sys.argv[1:6]
cmd = sys.argv[6:]
tick = os.sysconf("SC_CLK_TCK")
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick, int(f[11]) / tick, int(f[12]) / tick
s0 = cpu(sink_pid)[0]
t0 = time.monotonic()
p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
deadline = t0 + 120
while True:
    # Wait for exit without reaping, so /proc/PID/stat still has the totals.
    r = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if r is not None:
        break
    if time.monotonic() > deadline:
        p.kill()
    time.sleep(0.002)
wall = time.monotonic() - t0
total, user, sys_ = cpu(p.pid)
p.wait()
err = p.stderr.read().decode(errors="replace")[-300:]
print(json.dumps(dict(tool=label, round=int(rnd), workload=workload, units=int(units), wall_s=wall,
                      cpu_s=total, user_s=user, sys_s=sys_, sink_cpu_s=cpu(sink_pid)[0] - s0,
                      exit=p.returncode, stderr=err if p.returncode else "")))
PY
}

RAW=$WORK/raw.jsonl
: > "$RAW"
for r in $(seq 1 "$ROUNDS"); do
    for workload in new persistent; do
        if [ "$workload" = new ]; then N=$NEW_N; K=1; D=""; else N=$PERSIST_N; K=100; D="-d"; fi
        SS=(smtp-source "$r" "$workload" "$N" -- /usr/sbin/smtp-source $D -s "$CONC" -m "$N" -l 1024 "$ADDR")
        ST=(smtpstorm "$r" "$workload" "$N" -- "$BIN" blast "$ADDR" -n "$N" -c "$CONC" -k "$K" --size 1KB
            --threads "$THREADS" --quiet --json "$WORK/st-$workload-$r.json")
        # Alternate who goes first so drift in machine load hits both.
        if [ $((r % 2)) -eq 1 ]; then measure "${ST[@]}" >> "$RAW"; measure "${SS[@]}" >> "$RAW"
        else measure "${SS[@]}" >> "$RAW"; measure "${ST[@]}" >> "$RAW"; fi
        tail -n 2 "$RAW" | python3 -c '
import json, sys
for l in sys.stdin:
    d = json.loads(l)
    rate = d["units"] / d["wall_s"]
    cpu = d["cpu_s"] * 1e6 / d["units"]
    print("round %d %-10s %-11s %9.0f/s  cpu %7.1f us/unit  sink cpu %.2fs  exit %d %s" % (d["round"], d["workload"], d["tool"], rate, cpu, d["sink_cpu_s"], d["exit"], d["stderr"]), file=sys.stderr)'
    done
done

# Accepted counts from smtpstorm's own JSON, as a sanity check.
python3 - "$RAW" "$WORK" "$OUT" "$SINK" "$THREADS" "$CONC" <<'PY'
import glob, json, os, statistics, sys, platform
raw, work, out, sink, threads, conc = sys.argv[1:7]
rows = [json.loads(l) for l in open(raw)]
accepted = {}
for f in glob.glob(os.path.join(work, "st-*.json")):
    d = json.load(open(f))
    accepted[os.path.basename(f)] = d["counts"]["messages_accepted"]
def med(tool, wl, key):
    v = [r for r in rows if r["tool"] == tool and r["workload"] == wl and r["exit"] == 0]
    if not v:
        return None
    if key == "rate":
        return statistics.median(r["units"] / r["wall_s"] for r in v)
    return statistics.median(r["cpu_s"] * 1e6 / r["units"] for r in v)
def paired(wl, key):
    # Ratio within each round (the two tools ran back to back), then the
    # median over rounds: robust to load drifting between rounds.
    out = []
    for rnd in sorted({r["round"] for r in rows}):
        a = [r for r in rows if r["round"] == rnd and r["workload"] == wl and r["tool"] == "smtpstorm" and r["exit"] == 0]
        b = [r for r in rows if r["round"] == rnd and r["workload"] == wl and r["tool"] == "smtp-source" and r["exit"] == 0]
        if a and b:
            a, b = a[0], b[0]
            if key == "rate":
                out.append((a["units"] / a["wall_s"]) / (b["units"] / b["wall_s"]))
            elif b["cpu_s"] > 0:
                out.append((a["cpu_s"] / a["units"]) / (b["cpu_s"] / b["units"]))
    return (statistics.median(out) if out else None), out
summary = {}
for wl in ("new", "persistent"):
    s = {t: {"rate_per_sec": med(t, wl, "rate"), "cpu_us_per_unit": med(t, wl, "cpu")} for t in ("smtpstorm", "smtp-source")}
    a, b = s["smtpstorm"], s["smtp-source"]
    s["rate_ratio_of_medians"] = a["rate_per_sec"] / b["rate_per_sec"] if a["rate_per_sec"] and b["rate_per_sec"] else None
    s["cpu_ratio_of_medians"] = a["cpu_us_per_unit"] / b["cpu_us_per_unit"] if a["cpu_us_per_unit"] and b["cpu_us_per_unit"] else None
    s["rate_ratio"], s["rate_ratio_per_round"] = paired(wl, "rate")
    s["cpu_ratio"], s["cpu_ratio_per_round"] = paired(wl, "cpu")
    summary[wl] = s
targets = {"new": {"rate_ratio": ">= 1.8", "cpu_ratio": "<= 0.6"}, "persistent": {"rate_ratio": ">= 1.5"}}
met = {
    "new_rate": (summary["new"]["rate_ratio"] or 0) >= 1.8,
    "new_cpu": (summary["new"]["cpu_ratio"] or 9) <= 0.6,
    "persistent_rate": (summary["persistent"]["rate_ratio"] or 0) >= 1.5,
}
doc = dict(sink=sink, smtpstorm_threads=int(threads), concurrency=int(conc), host=platform.node(),
           cores=os.cpu_count(), summary=summary, targets=targets, met=met,
           smtpstorm_accepted=accepted, runs=rows)
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
json.dump(doc, open(out + ".json", "w"), indent=2)
with open(out + ".md", "w") as f:
    f.write(f"# smtpstorm blast vs Postfix smtp-source (sink: {sink})\n\n")
    f.write(f"{os.cpu_count()} cores, smtpstorm --threads {threads}, {conc} sessions in parallel, "
            f"1 KB messages; medians of {len(rows)//4} alternating rounds; rate = work / wall time; "
            f"CPU from /proc/PID/stat of each generator.\n\n")
    f.write("| workload | tool | rate (/s) | CPU per unit (µs) |\n|---|---|---:|---:|\n")
    for wl, unit in (("new", "sessions"), ("persistent", "messages")):
        for t in ("smtpstorm", "smtp-source"):
            s = summary[wl][t]
            f.write(f"| {wl} ({unit}) | {t} | {s['rate_per_sec'] or 0:.0f} | {s['cpu_us_per_unit'] or 0:.1f} |\n")
    f.write("\n| ratio (smtpstorm / smtp-source) | median of per-round ratios | ratio of medians | per round | target | met |\n|---|---:|---:|---|---:|---|\n")
    def row(name, wl, key, target, ok):
        s = summary[wl]
        per = " ".join(f"{x:.2f}" for x in s[key + "_per_round"])
        f.write(f"| {name} | {s[key] or 0:.2f} | {s[key + '_of_medians'] or 0:.2f} | {per} | {target} | {ok} |\n")
    row("new sessions/s", "new", "rate_ratio", "≥ 1.8", met["new_rate"])
    row("new CPU/session", "new", "cpu_ratio", "≤ 0.6", met["new_cpu"])
    row("persistent messages/s", "persistent", "rate_ratio", "≥ 1.5", met["persistent_rate"])
    row("persistent CPU/message", "persistent", "cpu_ratio", "–", "–")
    f.write("\nThe sink's own CPU time per run is in the JSON (`sink_cpu_s`): with a single-process "
            "smtp-sink on a shared 2-core machine, the new-session workload is largely bound by the sink.\n")
print(open(out + ".md").read())
PY
