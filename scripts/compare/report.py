#!/usr/bin/env python3
"""Turns the raw runs of suite.py into results/compare.json, results/compare.svg
and results/README.md. Also usable alone to redraw from a JSON:
`python3 scripts/compare/report.py results/compare.json results/`.

Medians are over rounds; a ratio is ours / theirs computed within each round
(the two runs were back to back) and then the median over rounds. Runs that
exited non-zero or timed out are kept in the JSON but left out of medians.
Standard library only; the SVG is drawn by hand.
"""
import json
import os
import platform
import re
import statistics
import sys

SHAPES = ("new", "persistent", "large")
METRICS = ("sessions_per_s", "messages_per_s", "mb_per_s", "client_cpu_us_per_session",
           "client_cpu_us_per_message", "sink_cpu_us_per_session", "sink_cpu_us_per_message")


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def good(r):
    return r.get("exit") == 0 and not r.get("timed_out")


def machine():
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
    return dict(cpu_model=model, cores=os.cpu_count(), kernel=platform.release(),
                python=platform.python_version(), loadavg_at_end=load)


def paired_ratio(runs, shape, a, b, key):
    """Median over rounds of a[key]/b[key]; a and b are (client, sink)."""
    out = []
    for rnd in sorted({r["round"] for r in runs}):
        x = [r for r in runs if r["round"] == rnd and r["shape"] == shape and (r["client"], r["sink"]) == a]
        y = [r for r in runs if r["round"] == rnd and r["shape"] == shape and (r["client"], r["sink"]) == b]
        if x and y and y[0][key]:
            out.append(x[0][key] / y[0][key])
    return med(out), out


def build(runs, meta):
    mx = [r for r in runs if r["kind"] == "matrix" and good(r)]
    doc = dict(meta)
    doc["machine"] = machine()
    doc["failed_runs"] = sum(1 for r in runs if r["kind"] in ("matrix", "scaling", "tls") and not good(r))
    medians = {}
    for shape in SHAPES:
        for c in ("smtpstorm", "smtp-source"):
            for s in ("smtpstorm", "smtp-sink"):
                rs = [r for r in mx if r["shape"] == shape and r["client"] == c and r["sink"] == s]
                medians.setdefault(shape, {})[f"{c} -> {s}"] = {m: med([r[m] for r in rs]) for m in METRICS}
    doc["medians"] = medians
    pairings = {}
    # Sinks: same client, ours / theirs.
    for client in ("smtp-source", "smtpstorm"):
        key = f"sinks (client {client})"
        for shape in SHAPES:
            a, b = (client, "smtpstorm"), (client, "smtp-sink")
            pairings.setdefault(key, {})[shape] = {
                m: paired_ratio(mx, shape, a, b, m)[0] for m in
                ("sink_cpu_us_per_session", "sink_cpu_us_per_message", "messages_per_s")}
    # Generators: same sink, ours / theirs.
    for sink in ("smtpstorm", "smtp-sink"):
        key = f"generators (sink {sink})"
        for shape in SHAPES:
            a, b = ("smtpstorm", sink), ("smtp-source", sink)
            pairings.setdefault(key, {})[shape] = {
                m: paired_ratio(mx, shape, a, b, m)[0] for m in
                ("sessions_per_s", "messages_per_s", "client_cpu_us_per_session", "client_cpu_us_per_message")}
    doc["ratios"] = pairings
    idle = [r for r in runs if r["kind"] == "idle"]
    doc["idle"] = {s: dict(rss_bytes_per_connection=med([r["rss_bytes_per_connection"] for r in idle if r["sink"] == s]),
                           connections=med([r["connections"] for r in idle if r["sink"] == s]))
                   for s in ("smtpstorm", "smtp-sink")}
    sc = [r for r in runs if r["kind"] == "scaling" and good(r)]
    doc["scaling"] = [dict(sink_threads=t,
                           sessions_per_s=med([r["sessions_per_s"] for r in sc if r["sink_threads"] == t]),
                           sink_cpu_us_per_session=med([r["sink_cpu_us_per_session"] for r in sc if r["sink_threads"] == t]))
                      for t in sorted({r["sink_threads"] for r in sc})]
    doc["tls"] = tls_modes(runs)
    doc["tls_floor"] = tls_floor(runs)
    R = pairings
    ss, bl = "sinks (client smtp-source)", "sinks (client smtpstorm)"
    g, gp = "generators (sink smtpstorm)", "generators (sink smtp-sink)"
    idle_ours = doc["idle"]["smtpstorm"]["rss_bytes_per_connection"]
    t = [
        ("sink CPU/session, new sessions", R[ss]["new"]["sink_cpu_us_per_session"], R[bl]["new"]["sink_cpu_us_per_session"], "<=", 0.8),
        ("sink CPU/message, persistent", R[ss]["persistent"]["sink_cpu_us_per_message"], R[bl]["persistent"]["sink_cpu_us_per_message"], "<=", 0.8),
        ("sink CPU/message, 100 KB", R[ss]["large"]["sink_cpu_us_per_message"], R[bl]["large"]["sink_cpu_us_per_message"], "<=", 0.25),
        ("blast sessions/s vs smtp-source", R[g]["new"]["sessions_per_s"], R[gp]["new"]["sessions_per_s"], ">=", 1.8),
        ("blast CPU/session vs smtp-source", R[g]["new"]["client_cpu_us_per_session"], R[gp]["new"]["client_cpu_us_per_session"], "<=", 0.6),
        ("blast persistent messages/s vs smtp-source", R[g]["persistent"]["messages_per_s"], R[gp]["persistent"]["messages_per_s"], ">=", 1.5),
    ]
    targets = []
    for name, main, beside, op, lim in t:
        met = None if main is None else (main <= lim if op == "<=" else main >= lim)
        targets.append(dict(name=name, ratio=main, ratio_other_peer=beside, target=f"{op} {lim}x", met=met))
    targets.append(dict(name="sink memory per idle connection (bytes)", ratio=idle_ours,
                        ratio_other_peer=doc["idle"]["smtp-sink"]["rss_bytes_per_connection"],
                        target="<= 16384 B", met=None if idle_ours is None else idle_ours <= 16384))
    doc["targets"] = targets
    doc["runs"] = runs
    return doc


def fmt(x, nd=1):
    if x is None:
        return "n/a"
    return f"{x:,.{nd}f}"


def svg(doc):
    """A horizontal bar chart of the headline ratios (ours / theirs), with
    the target of each drawn as a tick and 1.0 as a dashed line."""
    rows = [(t["name"], t["ratio"], float(t["target"].split()[1].rstrip("x")), t["target"].startswith(">="))
            for t in doc["targets"] if "idle" not in t["name"] and t["ratio"] is not None]
    idle = doc["idle"]
    if idle["smtpstorm"]["rss_bytes_per_connection"] and idle["smtp-sink"]["rss_bytes_per_connection"]:
        rows.append(("memory per idle connection", idle["smtpstorm"]["rss_bytes_per_connection"]
                     / idle["smtp-sink"]["rss_bytes_per_connection"], 16384 / idle["smtp-sink"]["rss_bytes_per_connection"], False))
    w, left, bar, gap, top = 760, 300, 22, 12, 50
    h = top + len(rows) * (bar + gap) + 40
    # Log scale from 0.01x to 20x, bars grow from the 1.0 line: left means
    # smtpstorm uses less, right means it does more.
    import math
    lo, hi = math.log10(0.01), math.log10(20)
    sx = lambda v: left + (w - left - 50) * (math.log10(min(max(v, 0.01), 20)) - lo) / (hi - lo)
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         '<text x="10" y="20" font-size="15" font-weight="bold">smtpstorm / Postfix tool (ratio; bar colour: target met or not)</text>',
         '<text x="10" y="38" fill="#555">log scale; lower is better for CPU and memory, higher for rates; black tick = target</text>']
    for i, (name, v, lim, higher) in enumerate(rows):
        y = top + i * (bar + gap)
        ok = v >= lim if higher else v <= lim
        o.append(f'<text x="{left - 8}" y="{y + bar * 0.7}" text-anchor="end">{name}</text>')
        x0, x1 = sorted((sx(1), sx(v)))
        o.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 1):.1f}" height="{bar}" fill="{"#3a7" if ok else "#d54"}"/>')
        o.append(f'<text x="{max(sx(v), sx(1)) + 4:.1f}" y="{y + bar * 0.7}">{v:.2f}x</text>')
        o.append(f'<line x1="{sx(lim):.1f}" x2="{sx(lim):.1f}" y1="{y - 3}" y2="{y + bar + 3}" stroke="black" stroke-width="2"/>')
    y1 = top + len(rows) * (bar + gap)
    o.append(f'<line x1="{sx(1):.1f}" x2="{sx(1):.1f}" y1="{top - 5}" y2="{y1}" stroke="#888" stroke-dasharray="4 3"/>')
    o.append(f'<text x="{sx(1):.1f}" y="{y1 + 15}" text-anchor="middle" fill="#555">1.0</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def readme(doc):
    m = doc["machine"]
    L = ["# smtpstorm vs Postfix: benchmark results", "",
         "Produced by `scripts/compare.sh` (issue 6); regenerate with it, do not edit by hand. "
         "Raw runs: [compare.json](compare.json); chart: [compare.svg](compare.svg).", "",
         "![ratios](compare.svg)", "",
         "## Machine", "",
         f"- CPU: {m['cpu_model']}, {m['cores']} cores; kernel {m['kernel']}; load average at the end {' '.join(m['loadavg_at_end'])}",
         f"- Run: quick={doc['quick']}, {doc['rounds_run']} of {doc['rounds_planned']} interleaved rounds, "
         f"{doc['duration_s']:.0f} s, {doc['failed_runs']} failed runs (left out of medians)",
         f"- Sizes: {json.dumps(doc['sizes'])}",
         "- The machine is shared (2 cores): rounds interleave the tools "
         "(rotated order each round) and every figure is a median; per-round ratios in the JSON show the spread.",
         "- smtpstorm runs with its default backend, `--io auto`: io_uring where the kernel allows it "
         "(it does here), else epoll. epoll against io_uring is the section below.",
         "- CPU times are exact to the microsecond (a client's from wait4's rusage, a sink's from the "
         "scheduler's run time of its threads, /proc/PID/task/*/schedstat); what moves them is the machine, "
         "not the measurement. The split between user and system time is the kernel's tick sampling, rougher.",
         "", "## Targets (issue 6 / sink and blaster issues)", "",
         "Ratio = smtpstorm / Postfix tool. The main column is the pairing the target names "
         "(sinks driven by smtp-source; generators driving smtpstorm sink); the other peer is beside it "
         "(sinks driven by smtpstorm blast; generators driving Postfix smtp-sink).", "",
         "| target | measured | with the other peer | target | met |", "|---|---:|---:|---:|---|"]
    for t in doc["targets"]:
        nd = 0 if "idle" in t["name"] else 2
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        L.append(f"| {t['name']} | {fmt(t['ratio'], nd)} | {fmt(t['ratio_other_peer'], nd)} | {t['target']} | {met} |")
    R = doc["ratios"]
    per_round = paired_ratio([r for r in doc["runs"] if r["kind"] == "matrix" and good(r)], "new",
                             ("smtp-source", "smtpstorm"), ("smtp-source", "smtp-sink"), "sink_cpu_us_per_session")[1]
    L += ["", "Reading the targets:", "",
          "- A target whose median sits at its bound is met only at the edge: the per-round ratios of sink "
          "CPU/session (new sessions, smtp-source client) were "
          + ", ".join(f"{x:.2f}" for x in per_round) + "; rounds on this shared machine vary by tens of percent.",
          "- Rates of new sessions are bound by the client as much as by the sink: smtp-source drives either "
          f"sink at about the same rate (ratio {fmt(R['sinks (client smtp-source)']['new']['messages_per_s'], 2)}), "
          "so sink comparisons are made on CPU per session or per message, not on rates.",
          "- 100 KB messages: the blaster's CPU per message is close to smtp-source's "
          f"({fmt(R['generators (sink smtpstorm)']['large']['client_cpu_us_per_message'], 2)}x): copying the body "
          "dominates for both; there is no target for it.",
          "- Persistent sessions: smtpstorm blast pipelines 100 messages per session; smtp-source -d does not, "
          "so the persistent rate ratio measures pipelining as much as the implementation."]
    L += ["", "## All pairings (medians over rounds)", "",
          "Client and sink each run on one pinned CPU (sink on CPU 0, client on CPU 1). "
          "CPU µs are utime+stime from `/proc/PID/stat`. new = one 1 KB message per session, 20 in parallel; "
          "persistent = 100 messages of 1 KB per session, N/100 sessions in parallel "
          "(`smtpstorm blast -k 100` pipelines; `smtp-source -d` reuses the session but waits for every reply, "
          "it does not pipeline); large = one 100 KB message per session, 20 in parallel.", ""]
    for shape in SHAPES:
        L += [f"### {shape}", "",
              "| client -> sink | sessions/s | messages/s | MB/s | client µs/session | client µs/msg | sink µs/session | sink µs/msg |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for combo, v in doc["medians"][shape].items():
            L.append(f"| {combo} | " + " | ".join(fmt(v[k], 0 if "per_s" in k and k != "mb_per_s" else 1) for k in METRICS) + " |")
        L.append("")
    L += ["### Ratios (ours / theirs, median of per-round ratios)", "",
          "| pairing | shape | metric | ratio |", "|---|---|---|---:|"]
    for pairing, shapes in doc["ratios"].items():
        for shape, ms in shapes.items():
            for k, v in ms.items():
                # new sessions: per session; otherwise per message (equal
                # for one message per session, so one row is enough).
                if k.endswith("per_session" if shape != "new" else "per_message"):
                    continue
                if k == "sessions_per_s" and shape != "new" or k == "messages_per_s" and shape == "new" and pairing.startswith("gen"):
                    continue
                L.append(f"| {pairing} | {shape} | {k} | {fmt(v, 2)} |")
    L += ["", "## Idle connections (memory)", "",
          "Growth of the sink's RSS (/proc/PID/status VmRSS) while a helper holds the connections open after "
          "reading the greeting, divided by the connections; kernel socket memory is not counted for either sink.", "",
          "| sink | connections held | RSS bytes per connection |", "|---|---:|---:|"]
    for s, v in doc["idle"].items():
        L.append(f"| {s} | {fmt(v['connections'], 0)} | {fmt(v['rss_bytes_per_connection'], 0)} |")
    L += ["", "## Scaling: smtpstorm sink threads", "",
          "Driven by `smtpstorm blast` (new sessions, 40 in parallel, all CPUs). On a 2-core machine "
          "the client shares the cores with the sink, so the curve is bounded by the client as much as the sink.", "",
          "| sink threads | sessions/s | sink µs/session |", "|---:|---:|---:|"]
    for s in doc["scaling"]:
        L.append(f"| {s['sink_threads']} | {fmt(s['sessions_per_s'], 0)} | {fmt(s['sink_cpu_us_per_session'])} |")
    L += ["", "## TLS (STARTTLS), smtpstorm blast -> smtpstorm sink", "",
          "Postfix has no TLS load tool (smtp-source and smtp-sink do not speak STARTTLS), so TLS is "
          "compared with our own plaintext only. Both reports count completed handshakes "
          "(`counts.tls_sessions`) and resumed ones (`counts.tls_resumed`), so the resumed mode is "
          "confirmed from them, and what each handshake negotiated (`counts.tls_negotiated`). TLS 1.3 resumption "
          "still does an ECDHE exchange, so it saves only the certificate signature and verification. "
          "The *floor* rows are the public-key operations of one handshake timed alone with the same "
          "library (`examples/tls_floor.rs`, on the sink's CPU): a TLS row minus the plaintext row, "
          "minus the floor, is what TLS costs beyond its public-key crypto. Per-round values are in the JSON.", ""]
    L += tls_table(doc)
    cmds = []
    seen = set()
    for r in doc["runs"]:
        key = (r["kind"], r.get("shape"), r.get("client"), r.get("sink"), r.get("mode"), r.get("sink_threads"))
        if "command" in r:
            c = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", r["command"])
            c = re.sub(r"--json \S+", "--json FILE", c)
            c = re.sub(r"^\S*/smtpstorm ", "smtpstorm ", c)
            if c not in seen:
                seen.add(c)
                cmds.append(c)
    L += ["", "## Exact commands", "", "```", f"{doc['tool']}",
          "# sinks (ports vary per run):",
          "smtpstorm sink --listen 127.0.0.1:PORT --quiet --max-connections 100000 --cpus 0 --no-starttls",
          "smtpstorm sink --listen 127.0.0.1:PORT --quiet --max-connections 100000 --threads N  # scaling",
          "smtpstorm sink --listen 127.0.0.1:PORT --quiet --max-connections 100000 --cpus 0  # TLS (STARTTLS offered)",
          "taskset -c 0 /usr/sbin/smtp-sink -u nobody -m 30000 127.0.0.1:PORT 4096",
          "# clients:"] + cmds + [
          "# idle: scripts/compare/idle.py PORT 10000 READY STOP against a fresh sink; RSS from /proc/PID/status",
          "```", ""]
    return "\n".join(L)


# ---- epoll against io_uring (scripts/compare.sh --backends, issue 11) --------

def build_backends(runs, meta):
    """Medians and uring/epoll ratios of the `backends` runs: sinks compared
    with the same blaster, blasters with the same sink, paired per round."""
    bk = [r for r in runs if r["kind"] == "backends" and good(r)]
    doc = dict(meta)
    doc["machine"] = machine()
    doc["failed_runs"] = sum(1 for r in runs if r["kind"] == "backends" and not good(r))
    doc["medians"] = {shape: {f"blast {c} -> sink {s}": {m: med([r[m] for r in bk if r["shape"] == shape
                                                             and r["client"] == c and r["sink"] == s])
                                                      for m in METRICS}
                              for c in ("epoll", "uring") for s in ("epoll", "uring")}
                      for shape in SHAPES}
    ratios = {}
    for shape in SHAPES:
        for peer in ("epoll", "uring"):
            sink = paired_ratio(bk, shape, (peer, "uring"), (peer, "epoll"), "sink_cpu_us_per_message")
            blast = paired_ratio(bk, shape, ("uring", peer), ("epoll", peer), "client_cpu_us_per_message")
            ratios.setdefault(shape, {})[f"sink cpu/msg uring/epoll (blast {peer})"] = sink[0]
            ratios[shape][f"blast cpu/msg uring/epoll (sink {peer})"] = blast[0]
            ratios[shape][f"sink per-round (blast {peer})"] = sink[1]
            ratios[shape][f"blast per-round (sink {peer})"] = blast[1]
    doc["ratios"] = ratios
    doc["sys_share"] = {shape: {io: dict(
        sink=med([r.get("sink_sys_share") for r in bk if r["shape"] == shape and r["sink"] == io]),
        blast=med([r.get("client_sys_share") for r in bk if r["shape"] == shape and r["client"] == io]))
        for io in ("epoll", "uring")} for shape in SHAPES}
    doc["syscalls"] = [r for r in runs if r["kind"] == "syscalls"]
    ib = [r for r in runs if r["kind"] == "idle_backends"]
    doc["idle"] = []
    for n in sorted({r["connections_wanted"] for r in ib}):
        skipped = [r["skipped"] for r in ib if r["connections_wanted"] == n and "skipped" in r]
        for io in ("epoll", "uring"):
            rs = [r for r in ib if r["connections_wanted"] == n and r.get("io") == io]
            doc["idle"].append(dict(connections_wanted=n, io=io, skipped=skipped[0] if skipped else None,
                                    connections=med([r["connections"] for r in rs]),
                                    rss_bytes_per_connection=med([r["rss_bytes_per_connection"] for r in rs])))
    doc["runs"] = runs
    return doc


def backends_section(b):
    """The README section for a `backends.json` document."""
    m = b["machine"]
    R = b["ratios"]
    L = ["## epoll against io_uring (issue 11)", "",
         "Produced by `scripts/compare.sh --backends` (raw runs: [backends.json](backends.json)). "
         "The same smtpstorm binary with `--io epoll` and `--io uring`: every pairing of "
         "{blast epoll, blast uring} x {sink epoll, sink uring}, in interleaved rounds (order rotated each "
         "round), sink on CPU 0 and blaster on CPU 1. Ratio = uring / epoll, computed within a round and "
         "then the median over rounds; the sink is compared under the same blaster, the blaster against the "
         "same sink.", "",
         f"- Run: quick={b['quick']}, {b['rounds_run']} of {b['rounds_planned']} rounds, "
         f"{b['duration_s']:.0f} s, {b['failed_runs']} failed runs; kernel {m['kernel']}; "
         f"load average at the end {' '.join(m['loadavg_at_end'])}",
         f"- Sizes: {json.dumps(b['sizes'])}", ""]
    new = R["new"]["sink cpu/msg uring/epoll (blast epoll)"]
    pipe = R["persistent"]["sink cpu/msg uring/epoll (blast epoll)"]
    idle10 = [i for i in b["idle"] if i["connections_wanted"] == 10000 and i["io"] == "uring"]
    idle_uring = idle10[0]["rss_bytes_per_connection"] if idle10 else None
    t = [("sink CPU per pipelined message", pipe, R["persistent"]["sink cpu/msg uring/epoll (blast uring)"], "<= 0.8x",
          None if pipe is None else pipe <= 0.8),
         ("sink CPU per new session", new, R["new"]["sink cpu/msg uring/epoll (blast uring)"], "<= 0.95x",
          None if new is None else new <= 0.95),
         ("sink RSS per idle connection, 10,000 (bytes)", idle_uring, None, "<= 1024 B",
          None if idle_uring is None else idle_uring <= 1024)]
    L += ["| target | uring / epoll | with the other blaster | target | met |", "|---|---:|---:|---:|---|"]
    for name, v, other, target, met in t:
        nd = 0 if "bytes" in name else 2
        L.append(f"| {name} | {fmt(v, nd)} | {fmt(other, nd)} | {target} | "
                 f"{'n/a' if met is None else ('yes' if met else '**no**')} |")
    def quartiles(shape):
        v = sorted(x for x in (R[shape].get("sink per-round (blast epoll)") or []) if x is not None)
        return (v, statistics.quantiles(v, n=4)) if len(v) >= 4 else (v, None)

    def spread(shape):
        v, q = quartiles(shape)
        return "n/a" if q is None else f"{q[0]:.2f}-{q[2]:.2f} (all rounds {v[0]:.2f}-{v[-1]:.2f})"
    inside = [f"{name} ({bound})" for name, shape, bound in
              (("pipelined", "persistent", 0.8), ("new sessions", "new", 0.95))
              if quartiles(shape)[1] is not None
              and quartiles(shape)[1][0] <= bound <= quartiles(shape)[1][2]]
    L += ["", "How far one round's ratio is from another (per-round sink ratios, blast epoll; "
          f"interquartile range, then the extremes): pipelined {spread('persistent')}, "
          f"new sessions {spread('new')}."
          + (f" The bound of {', '.join(inside)} lies inside that range: whether it is met is "
             "decided by the machine's noise as much as by the code." if inside else "")]
    L += ["", "### CPU, uring / epoll (median of per-round ratios)", "",
          "| shape | sink (blast epoll) | sink (blast uring) | blast (sink epoll) | blast (sink uring) |",
          "|---|---:|---:|---:|---:|"]
    for shape in SHAPES:
        r = R[shape]
        L.append(f"| {shape} | {fmt(r['sink cpu/msg uring/epoll (blast epoll)'], 2)} | "
                 f"{fmt(r['sink cpu/msg uring/epoll (blast uring)'], 2)} | "
                 f"{fmt(r['blast cpu/msg uring/epoll (sink epoll)'], 2)} | "
                 f"{fmt(r['blast cpu/msg uring/epoll (sink uring)'], 2)} |")
    L += ["", "new = one 1 KB message per session (CPU per message = per session), 20 in parallel; "
          "persistent = 100 pipelined 1 KB messages per session; large = one 100 KB message per session.", ""]
    if b["quick"]:
        L += ["A `--quick` run is small: each figure rests on a few tens of milliseconds of CPU on a shared "
              "machine, so a ratio moves by 0.2 from one run to the next. Read the full run's figures, not these.", ""]
    S = b["sys_share"]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.0f}%"
    L += ["Where the time goes: the kernel's share of each side's CPU (stime / (utime + stime), medians):", "",
          "| shape | sink epoll | sink uring | blast epoll | blast uring |", "|---|---:|---:|---:|---:|"]
    for shape in SHAPES:
        L.append(f"| {shape} | {pct(S[shape]['epoll']['sink'])} | {pct(S[shape]['uring']['sink'])} | "
                 f"{pct(S[shape]['epoll']['blast'])} | {pct(S[shape]['uring']['blast'])} |")
    L += ["", "The kernel's TCP work dominates new sessions on both backends (handshake, socket setup and "
          "teardown, loopback delivery): io_uring removes system calls (table below), not that work, so "
          "new sessions can only gain the few percent the system calls cost. Pipelined and large messages "
          "are where fewer system calls and batched sends show. User-space instructions "
          "(callgrind, both backends): [callgrind-backends.md](callgrind-backends.md).", "",
          "### All pairings (medians)", "",
          "| shape | blast -> sink | messages/s | blast µs/msg | sink µs/msg |", "|---|---|---:|---:|---:|"]
    for shape in SHAPES:
        for combo, v in b["medians"][shape].items():
            L.append(f"| {shape} | {combo} | {fmt(v['messages_per_s'], 0)} | "
                     f"{fmt(v['client_cpu_us_per_message'])} | {fmt(v['sink_cpu_us_per_message'])} |")
    L += ["", "### System calls per message (`strace -c -f`, one short run each)", "",
          "| backend | shape | traced | calls/message | most frequent |", "|---|---|---|---:|---|"]
    for r in b["syscalls"]:
        top = ", ".join(f"{name} {calls}" for calls, name in r["top"][:4])
        L.append(f"| {r['io']} | {r['shape']} | {r['side']} | {fmt(r['calls_per_message'], 2)} | {top} |")
    L += ["", "### Sink memory per idle connection", "",
          "Growth of the sink's VmRSS while helpers hold the connections open after the greeting, "
          "divided by the connections (kernel socket memory is not counted).", "",
          "| connections | backend | held | RSS bytes per connection |", "|---:|---|---:|---:|"]
    for i in b["idle"]:
        if i["skipped"]:
            L.append(f"| {i['connections_wanted']:,} | {i['io']} | not run | {i['skipped']} |")
        else:
            L.append(f"| {i['connections_wanted']:,} | {i['io']} | {fmt(i['connections'], 0)} | "
                     f"{fmt(i['rss_bytes_per_connection'], 0)} |")
    L.append("")
    return L


BEGIN, END = "<!-- backends: scripts/compare.sh --backends -->", "<!-- /backends -->"


def backends_block(doc):
    return "\n".join([BEGIN, ""] + backends_section(doc) + [END, ""])


def backends_lines(out):
    path = os.path.join(out, "backends.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return ["", backends_block(json.load(f))]


def write_backends(doc, out):
    """Writes backends.json and puts its section in README.md: in place of
    the previous one, else at the end (the rest of the file is untouched)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "backends.json"), "w") as f:
        json.dump(doc, f, indent=1)
    path = os.path.join(out, "README.md")
    text = open(path).read() if os.path.exists(path) else ""
    block = backends_block(doc)
    if BEGIN in text and END in text:
        a = text.index(BEGIN)
        b = text.index(END) + len(END)
        text = text[:a] + block.rstrip("\n") + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(path, "w") as f:
        f.write(text)
    print(block)


def xdp_lines(out):
    """A pointer to the kernel-bypass results (scripts/xdp-bench.sh writes
    them apart, on a veth pair): kept whenever this file is regenerated."""
    if not os.path.exists(os.path.join(out, "xdp.md")):
        return []
    return ["", "## Kernel bypass (`--io xdp`)", "",
            "xdp against epoll on a veth pair, what this machine can and cannot show, and a callgrind "
            "breakdown of where the time goes: [xdp.md](xdp.md) (`scripts/xdp-bench.sh`).", ""]


def tls_modes(runs):
    """Median per STARTTLS mode of the good `tls` runs, with the suites and
    groups the blaster's reports counted and the load average seen."""
    tl = [r for r in runs if r["kind"] == "tls" and good(r)]
    out = {}
    for m in ("plaintext", "starttls_full", "starttls_resumed"):
        rs = [r for r in tl if r["mode"] == m]
        negotiated = {}
        for r in rs:
            for k, n in (r.get("blast_counts") or {}).get("tls_negotiated", {}).items():
                negotiated[k] = negotiated.get(k, 0) + n
        out[m] = dict(sessions_per_s=med([r["sessions_per_s"] for r in rs]),
                      sink_cpu_us_per_session=med([r["sink_cpu_us_per_session"] for r in rs]),
                      client_cpu_us_per_session=med([r["client_cpu_us_per_session"] for r in rs]),
                      negotiated=negotiated,
                      load1=med([r["load1"][0] for r in rs if "load1" in r]))
    return out


def tls_floor(runs):
    fl = [r for r in runs if r["kind"] == "tls_floor"]
    return fl[-1] if fl else None


def tls_table(doc):
    """The STARTTLS table: each mode, its ratio to plaintext, what it
    negotiated; then the public-key floor."""
    t = doc["tls"]
    plain = t["plaintext"]
    L = ["| mode | sessions/s | sink µs/session | × plaintext | client µs/session | × plaintext | negotiated | load |",
         "|---|---:|---:|---:|---:|---:|---|---:|"]
    for mode, v in t.items():
        def ratio(k):
            return fmt(v[k] / plain[k], 2) if v[k] and plain[k] else "-"
        neg = ", ".join(f"{k} ({n})" for k, n in sorted(v.get("negotiated", {}).items())) or "-"
        L.append(f"| {mode} | {fmt(v['sessions_per_s'], 0)} | {fmt(v['sink_cpu_us_per_session'])} | "
                 f"{ratio('sink_cpu_us_per_session')} | {fmt(v['client_cpu_us_per_session'])} | "
                 f"{ratio('client_cpu_us_per_session')} | {neg} | {fmt(v.get('load1'), 1)} |")
    full, res = t["starttls_full"], t["starttls_resumed"]
    for side, k in (("sink", "sink_cpu_us_per_session"), ("client", "client_cpu_us_per_session")):
        if full[k] and res[k]:
            L.append(f"| resumed vs full, {side} | | | {fmt(1 - res[k] / full[k], 3)} cheaper | | | | |")
    f = doc.get("tls_floor")
    if f and "error" not in f:
        L += ["", "Public-key floor per handshake (µs of CPU, the operations alone, same library):", "",
              "| side | full | resumed |", "|---|---:|---:|",
              f"| sink (X25519 + P-256 sign) | {fmt(f['sink_full_us'])} | {fmt(f['sink_resumed_us'])} |",
              f"| blaster (X25519 + P-256 verify) | {fmt(f['blast_full_us'])} | {fmt(f['blast_resumed_us'])} |",
              "",
              f"X25519 key generation and agreement {fmt(f['x25519_keygen_and_agree_us'])} µs, "
              f"P-256 sign {fmt(f['p256_sign_us'])} µs, verify {fmt(f['p256_verify_us'])} µs; "
              f"transcript hash per KiB: SHA-256 {fmt(f['sha256_per_kib_us'], 2)} µs, "
              f"SHA-384 {fmt(f['sha384_per_kib_us'], 2)} µs."]
    elif f:
        L += ["", f"Public-key floor: not measured ({f['error']})."]
    return L


def build_tls(runs, meta):
    """`scripts/compare.sh --tls`: the STARTTLS modes and the floor only."""
    doc = dict(meta)
    doc["host"] = dict(cores=os.cpu_count(), machine=platform.machine())
    doc["tls"] = tls_modes(runs)
    doc["tls_floor"] = tls_floor(runs)
    doc["runs"] = runs
    return doc


def write_tls(doc, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tls.json"), "w") as f:
        json.dump(doc, f, indent=1)
    cmds = sorted({re.sub(r"^\S*/smtpstorm\S* ", "smtpstorm ",
                          re.sub(r"--json \S+", "--json FILE",
                                 re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", r["command"])))
                   for r in doc["runs"] if "command" in r})
    text = "\n".join(["## STARTTLS costs (`scripts/compare.sh --tls`)", ""] + tls_table(doc) +
                      ["", "```", doc["tool"],
                       "smtpstorm sink --listen 127.0.0.1:PORT --quiet --max-connections 200000 --cpus 0"] +
                      cmds + ["```", ""])
    with open(os.path.join(out, "tls-compare.md"), "w") as f:
        f.write(text)
    print(text)


def write(doc, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out, "compare.svg"), "w") as f:
        f.write(svg(doc))
    text = readme(doc) + "\n".join(backends_lines(out) + xdp_lines(out))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    d = json.load(open(sys.argv[1]))
    write(d, sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(sys.argv[1]))
