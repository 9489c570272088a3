#!/usr/bin/env python3
"""The comparison suite behind scripts/compare.sh (issue 6).

Runs, on loopback, every pairing of {smtpstorm blast, Postfix smtp-source}
x {smtpstorm sink, Postfix smtp-sink} for three shapes (new sessions with one
1 KB message, persistent sessions with 100 messages, 100 KB messages), in
interleaved rounds (the four pairings in a rotated order each round), plus
idle-connection memory, sink thread scaling and STARTTLS costs. One run gives
both comparisons: sinks (same client, two sinks) and generators (same sink,
two clients). Rates are work / wall time of the client. CPU is measured to
the microsecond, not in 10 ms clock ticks: the client's from the rusage of
wait4 when it is reaped (user and system, all its threads), the sink's as a
delta, while it keeps running, of the run time the scheduler accounts to each
of its threads (/proc/PID/task/*/schedstat, nanoseconds); the sink's split
between user and system comes from /proc/PID/stat (ticks, so rougher).
Ratios are ours / theirs, computed within each round (the two runs were back
to back) and reported as the median over rounds.

Invariants: every process started here is killed in `finally` (and on
SIGTERM/SIGINT); every client run has a timeout; the suite stops starting new
rounds once its time budget is spent, and records how many rounds it ran.
Only the Python standard library is used.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

TICK = os.sysconf("SC_CLK_TCK")
PSINK = "/usr/sbin/smtp-sink"
PSOURCE = "/usr/sbin/smtp-source"
PROCS = []  # every Popen started here, killed at exit


T0 = time.monotonic()


def log(*a):
    print(f"compare: [{time.monotonic() - T0:5.0f}s]", *a, file=sys.stderr, flush=True)


def cpu_s(pid):
    """CPU time of PID's live threads, seconds, to the nanosecond (the
    scheduler's run time of each thread; a thread that exited is no longer
    counted, so use it for deltas over processes whose threads persist)."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


def cpu_split_s(pid):
    """(utime, stime) of PID (all threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def spawn(cmd, **kw):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    PROCS.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.kill()
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def kill_all():
    for p in PROCS:
        try:
            stop(p)
        except Exception:
            pass


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_greeting(port, secs=10):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(512).startswith(b"220"):
                    return True
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no SMTP greeting on port {port}")


class Suite:
    def __init__(self, a):
        self.a = a
        self.bin = a.bin
        self.sink_cpu = "0"
        self.client_cpu = "1" if os.cpu_count() > 1 else "0"
        self.work = tempfile.mkdtemp(prefix="smtpstorm-compare.")
        self.t_start = time.monotonic()
        self.runs = []

    def left_s(self):
        return self.a.budget_s - (time.monotonic() - self.t_start)

    # -- sinks -------------------------------------------------------------
    def start_sink(self, kind, threads=None, starttls=False, io=None, wrap=(), extra=()):
        port = free_port()
        if kind == "smtpstorm":
            cmd = list(wrap) + [self.bin, "sink", "--listen", f"127.0.0.1:{port}", "--quiet",
                                "--max-connections", "200000"] + list(extra)
            if io:
                cmd += ["--io", io]
            cmd += ["--threads", str(threads)] if threads else ["--cpus", self.sink_cpu]
            if not starttls:
                cmd.append("--no-starttls")
        else:
            cmd = ["taskset", "-c", self.sink_cpu, PSINK, "-u", "nobody", "-m", "30000",
                   f"127.0.0.1:{port}", "4096"]
        p = spawn(cmd)
        wait_greeting(port)
        return p, port

    # -- clients -----------------------------------------------------------
    def client_cmd(self, client, port, shape, n, conc, extra=(), cpus=None):
        size = 100000 if shape == "large" else 1000
        k = 100 if shape == "persistent" else 1
        if client == "smtpstorm":
            js = os.path.join(self.work, f"blast-{len(self.runs)}.json")
            cmd = [self.bin, "blast", f"127.0.0.1:{port}", "-n", str(n), "-c", str(conc),
                   "-k", str(k), "--size", str(size), "--quiet", "--json", js,
                   "--timeout", "30s"]
            cmd += ["--threads", str(cpus)] if isinstance(cpus, int) else ["--cpus", self.client_cpu]
            return cmd + list(extra), js
        # smtp-source: -d keeps the session for the next message, but it
        # waits for every reply (no pipelining).
        cmd = ["taskset", "-c", self.client_cpu, PSOURCE, "-s", str(conc), "-m", str(n),
               "-l", str(size)]
        if shape == "persistent":
            cmd.append("-d")
        return cmd + [f"127.0.0.1:{port}"], None

    def measure(self, cmd, sink, sessions, messages, size):
        """Run one client to completion; returns a dict of rates and CPU."""
        s0 = cpu_s(sink.pid)
        su0, ss0 = cpu_split_s(sink.pid)
        errf = tempfile.TemporaryFile()
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf)
        PROCS.append(p)
        deadline = t0 + self.a.client_timeout_s
        killed = False
        while True:
            # Reap it ourselves: wait4's rusage has its CPU time in µs.
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline and not killed:
                p.kill()
                killed = True
            time.sleep(0.002)
        wall = time.monotonic() - t0
        cu, cs = ru.ru_utime, ru.ru_stime
        ccpu = cu + cs
        time.sleep(0.1)  # let the sink finish the last QUITs
        scpu = cpu_s(sink.pid) - s0
        su1, ss1 = cpu_split_s(sink.pid)
        errf.seek(0)
        err = errf.read().decode(errors="replace")[-300:]
        return dict(wall_s=wall, exit=p.returncode, timed_out=killed, stderr=err,
                    sessions=sessions, messages=messages,
                    sessions_per_s=sessions / wall, messages_per_s=messages / wall,
                    mb_per_s=messages * size / wall / 1e6,
                    client_cpu_s=ccpu, sink_cpu_s=scpu,
                    client_cpu_us_per_session=ccpu * 1e6 / sessions,
                    client_cpu_us_per_message=ccpu * 1e6 / messages,
                    sink_cpu_us_per_session=scpu * 1e6 / sessions,
                    sink_cpu_us_per_message=scpu * 1e6 / messages,
                    # The kernel's share of each side's CPU (stime / total).
                    client_sys_share=cs / ccpu if ccpu else None,
                    sink_sys_share=(ss1 - ss0) / scpu if scpu else None)

    def blast_counts(self, js):
        try:
            with open(js) as f:
                return json.load(f)["counts"]
        except Exception as e:  # a missing report is recorded, not fatal
            return {"error": str(e)}

    # -- pairings ----------------------------------------------------------
    def interleaved(self, kind, combos, sinks, client_cmd, label):
        """Every (client, sink) pairing of `combos` on every shape, in
        rounds: the pairings' order rotates each round (and every other
        round runs reversed); no new round starts once the time budget runs
        low. `client_cmd(client, port, shape, n, conc)` gives the command and
        its JSON report (or None); `label(r)` the log line of a run. Stops
        the sinks at the end. Returns how many rounds ran."""
        a = self.a
        shapes = {"new": (a.n_new, 20), "persistent": (a.n_persistent, a.n_persistent // 100),
                  "large": (a.n_large, 20)}
        rounds_done = 0
        try:
            for rnd in range(a.rounds):
                if rnd >= 2 and self.left_s() < a.reserve_s:
                    log(f"time budget: stopping after {rnd} rounds")
                    break
                order = combos[rnd % 4:] + combos[:rnd % 4]
                if rnd % 2:
                    order.reverse()
                for shape, (n, conc) in shapes.items():
                    size = 100000 if shape == "large" else 1000
                    sessions = n // 100 if shape == "persistent" else n
                    for client, sink in order:
                        sp, port = sinks[sink]
                        cmd, js = client_cmd(client, port, shape, n, conc)
                        r = self.measure(cmd, sp, sessions, n, size)
                        r.update(kind=kind, round=rnd, shape=shape, client=client, sink=sink,
                                 concurrency=conc, size_bytes=size, command=" ".join(cmd))
                        if js:
                            r["blast_counts"] = self.blast_counts(js)
                        self.runs.append(r)
                        log(f"r{rnd} {shape:10s} " + label(r))
                rounds_done += 1
        finally:
            for p, _ in sinks.values():
                stop(p)
        return rounds_done

    def matrix(self):
        combos = [(c, s) for c in ("smtpstorm", "smtp-source") for s in ("smtpstorm", "smtp-sink")]
        sinks = {"smtpstorm": self.start_sink("smtpstorm"), "smtp-sink": self.start_sink("smtp-sink")}
        return self.interleaved(
            "matrix", combos, sinks, self.client_cmd,
            lambda r: (f"{r['client']:11s} -> {r['sink']:9s} "
                       f"{r['sessions_per_s']:8.0f} sess/s {r['messages_per_s']:8.0f} msg/s "
                       f"client {r['client_cpu_us_per_message']:7.1f} us/msg "
                       f"sink {r['sink_cpu_us_per_message']:7.1f} us/msg exit {r['exit']}"))

    # -- epoll against io_uring (issue 11) ---------------------------------
    def backends(self):
        """The same workloads on both backends, sink and blaster each, in
        interleaved rounds: every pairing of {blast --io epoll, --io uring}
        x {sink --io epoll, --io uring} per shape, order rotated per round."""
        combos = [(c, s) for c in ("epoll", "uring") for s in ("epoll", "uring")]
        sinks = {io: self.start_sink("smtpstorm", io=io) for io in ("epoll", "uring")}

        def blast(io, port, shape, n, conc):
            return self.client_cmd("smtpstorm", port, shape, n, conc, extra=["--io", io])
        return self.interleaved(
            "backends", combos, sinks, blast,
            lambda r: (f"blast {r['client']:5s} -> sink {r['sink']:5s} "
                       f"{r['messages_per_s']:8.0f} msg/s "
                       f"client {r['client_cpu_us_per_message']:7.1f} us/msg "
                       f"sink {r['sink_cpu_us_per_message']:7.1f} us/msg exit {r['exit']}"))

    def syscalls(self):
        """System calls per message, `strace -c -f` on a short run: the
        sink traced (it exits after the run's messages) with an untraced
        blaster, then the blaster traced against an untraced sink."""
        if not shutil.which("strace"):
            log("strace not found: no system-call counts")
            return
        shapes = {"new": (self.a.n_strace // 10, 20), "persistent": (self.a.n_strace, 10)}
        for io in ("epoll", "uring"):
            for shape, (n, conc) in shapes.items():
                sessions = n // 100 if shape == "persistent" else n
                for side in ("sink", "blast"):
                    out = os.path.join(self.work, f"strace-{io}-{shape}-{side}")
                    trace = ["strace", "-c", "-f", "-o", out]
                    if side == "sink":
                        sp, port = self.start_sink("smtpstorm", io=io, wrap=trace,
                                                   extra=["--exit-after-messages", str(n)])
                        cmd, _ = self.client_cmd("smtpstorm", port, shape, n, conc, extra=["--io", io])
                        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       timeout=self.a.client_timeout_s * 3)
                        try:
                            sp.wait(timeout=30)
                        except subprocess.TimeoutExpired:
                            sp.send_signal(signal.SIGINT)
                            sp.wait(timeout=10)
                    else:
                        sp, port = self.start_sink("smtpstorm", io=io)
                        cmd, _ = self.client_cmd("smtpstorm", port, shape, n, conc, extra=["--io", io])
                        subprocess.run(trace + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       timeout=self.a.client_timeout_s * 3)
                        stop(sp)
                    calls, top = strace_totals(out)
                    self.runs.append(dict(kind="syscalls", io=io, shape=shape, side=side,
                                          messages=n, sessions=sessions, calls=calls,
                                          calls_per_message=None if calls is None else calls / n,
                                          top=top))
                    log(f"strace {io:5s} {shape:10s} {side:5s} "
                        f"{(calls or 0) / n:6.2f} calls/msg (top: {top[:3]})")

    def idle_backends(self):
        """RSS per idle connection of the sink on each backend, at each
        size the process may hold (RLIMIT_NOFILE); helpers hold at most
        15,000 connections each, from source addresses across 127.0.1.x."""
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        for n in self.a.idle_sizes:
            if n + 200 > soft:
                self.runs.append(dict(kind="idle_backends", connections_wanted=n, skipped=
                                      f"RLIMIT_NOFILE is {soft} (hard {hard}): one sink process "
                                      f"cannot hold {n} connections here"))
                log(f"idle {n}: skipped, RLIMIT_NOFILE {soft}")
                continue
            for rnd in range(self.a.idle_rounds):
                for io in (("epoll", "uring") if rnd % 2 == 0 else ("uring", "epoll")):
                    p, port = self.start_sink("smtpstorm", io=io)
                    time.sleep(0.3)
                    r0 = rss_kib(p.pid)
                    helpers, readies, stopf = [], [], os.path.join(self.work, f"istop-{n}-{rnd}-{io}")
                    per = 15000
                    for first in range(0, n, per):
                        ready = os.path.join(self.work, f"iready-{n}-{rnd}-{io}-{first}")
                        readies.append(ready)
                        helpers.append(spawn([sys.executable, os.path.join(os.path.dirname(__file__), "idle.py"),
                                              str(port), str(min(per, n - first)), ready, stopf, str(first)]))
                    end = time.monotonic() + 120
                    while (not all(os.path.exists(r) for r in readies) and time.monotonic() < end
                           and all(h.poll() is None for h in helpers)):
                        time.sleep(0.1)
                    ok = sum(int(open(r).read()) for r in readies if os.path.exists(r))
                    time.sleep(0.5)
                    r1 = rss_kib(p.pid)
                    open(stopf, "w").close()
                    for h in helpers:
                        try:
                            h.wait(timeout=60)
                        except subprocess.TimeoutExpired:
                            stop(h)
                    stop(p)
                    self.runs.append(dict(kind="idle_backends", io=io, round=rnd, connections_wanted=n,
                                          connections=ok, rss_kib_before=r0, rss_kib_after=r1,
                                          rss_bytes_per_connection=(r1 - r0) * 1024 / ok if ok else None))
                    log(f"idle {io:5s} {ok} conns " + (f"{(r1 - r0) * 1024 / ok:7.0f} B/conn" if ok else "(none held)"))
                    time.sleep(1)

    def idle(self):
        rounds = 0
        for rnd in range(self.a.idle_rounds):
            if rnd >= 1 and self.left_s() < self.a.reserve_s * 0.6:
                break
            order = ["smtpstorm", "smtp-sink"] if rnd % 2 == 0 else ["smtp-sink", "smtpstorm"]
            for sink in order:
                p, port = self.start_sink(sink)
                time.sleep(0.3)
                r0 = rss_kib(p.pid)
                ready = os.path.join(self.work, f"idle-ready-{rnd}-{sink}")
                stopf = os.path.join(self.work, f"idle-stop-{rnd}-{sink}")
                h = spawn([sys.executable, os.path.join(os.path.dirname(__file__), "idle.py"),
                           str(port), str(self.a.n_idle), ready, stopf])
                end = time.monotonic() + 90
                while not os.path.exists(ready) and time.monotonic() < end and h.poll() is None:
                    time.sleep(0.1)
                ok = int(open(ready).read()) if os.path.exists(ready) else 0
                time.sleep(0.5)
                r1 = rss_kib(p.pid)
                open(stopf, "w").close()
                try:
                    h.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    stop(h)
                stop(p)
                per = (r1 - r0) * 1024 / max(ok, 1)
                self.runs.append(dict(kind="idle", round=rnd, sink=sink, connections=ok,
                                      rss_kib_before=r0, rss_kib_after=r1,
                                      rss_bytes_per_connection=per))
                log(f"idle r{rnd} {sink:9s} {ok} conns {per:9.0f} B/conn")
            rounds += 1
            time.sleep(1)  # let the 10k sockets leave the tables
        return rounds

    def scaling(self):
        ncpu = os.cpu_count()
        counts = list(range(1, ncpu + 1))
        for rnd in range(self.a.side_rounds):
            if rnd >= 1 and self.left_s() < self.a.reserve_s * 0.3:
                break
            for t in (counts if rnd % 2 == 0 else counts[::-1]):
                p, port = self.start_sink("smtpstorm", threads=t)
                try:
                    n = self.a.n_new
                    # The client gets every CPU too: on a small machine it
                    # shares them with the sink (recorded, not hidden).
                    cmd, js = self.client_cmd("smtpstorm", port, "new", n, 40, cpus=ncpu)
                    r = self.measure(cmd, p, n, n, 1000)
                    r.update(kind="scaling", round=rnd, sink_threads=t, command=" ".join(cmd),
                             blast_counts=self.blast_counts(js))
                    self.runs.append(r)
                    log(f"scaling r{rnd} threads={t} {r['sessions_per_s']:8.0f} sess/s "
                        f"sink {r['sink_cpu_us_per_session']:7.1f} us/sess")
                finally:
                    stop(p)

    def tls(self):
        modes = [("plaintext", []), ("starttls_full", ["--starttls"]),
                 ("starttls_resumed", ["--starttls", "--tls-resume"])]
        self.tls_floor()
        p, port = self.start_sink("smtpstorm", starttls=True)
        try:
            for rnd in range(self.a.side_rounds):
                if rnd >= 1 and self.left_s() < 30:
                    break
                for mode, extra in (modes if rnd % 2 == 0 else modes[::-1]):
                    n = self.a.n_tls
                    load0 = os.getloadavg()[0]
                    cmd, js = self.client_cmd("smtpstorm", port, "new", n, 20, extra=extra)
                    r = self.measure(cmd, p, n, n, 1000)
                    r.update(kind="tls", round=rnd, mode=mode, command=" ".join(cmd),
                             blast_counts=self.blast_counts(js),
                             load1=[load0, os.getloadavg()[0]])
                    self.runs.append(r)
                    log(f"tls r{rnd} {mode:17s} {r['sessions_per_s']:8.0f} sess/s "
                        f"sink {r['sink_cpu_us_per_session']:7.1f} us/sess "
                        f"client {r['client_cpu_us_per_session']:7.1f} us/sess exit {r['exit']} "
                        f"load {load0:.1f}")
        finally:
            stop(p)

    def tls_floor(self):
        """The public-key floor (examples/tls_floor.rs, the same library
        timed alone), run once on the sink's CPU; recorded as a run of
        kind tls_floor, or the reason it is missing."""
        floor = self.a.floor or os.path.join(os.path.dirname(self.bin), "examples", "tls_floor")
        r = dict(kind="tls_floor", command=f"taskset -c {self.sink_cpu} {floor}",
                 load1=os.getloadavg()[0])
        try:
            out = subprocess.run(["taskset", "-c", self.sink_cpu, floor], capture_output=True,
                                 text=True, timeout=120, check=True).stdout
            r.update(json.loads(out))
            log(f"tls floor: sink full {r['sink_full_us']:.1f} us, resumed "
                f"{r['sink_resumed_us']:.1f} us; blaster full {r['blast_full_us']:.1f} us")
        except Exception as e:  # recorded, not fatal
            r["error"] = f"{floor}: {e}"
            log(f"tls floor: {r['error']}")
        self.runs.append(r)


def strace_totals(path):
    """(total calls, [(calls, name) of the five most frequent]) from an
    `strace -c` summary."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return None, []
    total, rows = None, []
    for line in lines:
        f = line.split()
        if not f or not f[0][0].isdigit():
            continue
        # % time, seconds, usecs/call, calls, [errors], syscall
        try:
            calls = int(f[3])
        except (IndexError, ValueError):
            continue
        if f[-1] == "total":
            total = calls
        else:
            rows.append((calls, f[-1]))
    return total, sorted(rows, reverse=True)[:5]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", default="results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--command", default="scripts/compare.sh")
    ap.add_argument("--backends", action="store_true",
                    help="only epoll against io_uring (results/backends.json)")
    ap.add_argument("--tls", action="store_true",
                    help="only the STARTTLS costs and the public-key floor (results/tls.json)")
    ap.add_argument("--tls-sessions", type=int, help="sessions per TLS run")
    ap.add_argument("--floor", help="the tls_floor example binary "
                    "(default: examples/tls_floor beside --bin)")
    a = ap.parse_args()
    user_rounds = a.rounds
    if a.quick:
        a.rounds = a.rounds or 2
        a.n_new, a.n_persistent, a.n_large, a.n_idle, a.n_tls = 1000, 3000, 300, 10000, 200
        a.idle_rounds, a.side_rounds, a.budget_s, a.client_timeout_s = 1, 1, 100, 20
    else:
        a.rounds = a.rounds or 6
        a.n_new, a.n_persistent, a.n_large, a.n_idle, a.n_tls = 4000, 20000, 1500, 10000, 1000
        a.idle_rounds, a.side_rounds, a.budget_s, a.client_timeout_s = 3, 3, 540, 60
    # Rounds of the matrix stop when less than this is left for the rest.
    a.reserve_s = 45 if a.quick else 150
    a.n_strace = 2000 if a.quick else 20000
    a.idle_sizes = (10000, 100000)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if a.tls_sessions:
        a.n_tls = a.tls_sessions
    if a.tls and user_rounds:
        a.side_rounds = user_rounds
    s = Suite(a)
    t0 = time.time()
    if a.tls:
        try:
            s.tls()
        finally:
            kill_all()
            shutil.rmtree(s.work, ignore_errors=True)
        sys.path.insert(0, os.path.dirname(__file__))
        import report
        doc = report.build_tls(s.runs, dict(
            tool=a.command, quick=a.quick, started_unix=t0, duration_s=time.time() - t0,
            tls_sessions=a.n_tls, rounds=a.side_rounds))
        report.write_tls(doc, a.out)
        return
    if a.backends:
        try:
            rounds = s.backends()
            s.syscalls()
            s.idle_backends()
        finally:
            kill_all()
            shutil.rmtree(s.work, ignore_errors=True)
        sys.path.insert(0, os.path.dirname(__file__))
        import report
        doc = report.build_backends(s.runs, dict(
            tool=a.command, quick=a.quick, rounds_planned=a.rounds, rounds_run=rounds,
            started_unix=t0, duration_s=time.time() - t0,
            sizes=dict(new_sessions=a.n_new, persistent_messages=a.n_persistent,
                       large_messages=a.n_large, strace_messages=a.n_strace,
                       idle_connections=list(a.idle_sizes))))
        report.write_backends(doc, a.out)
        return
    try:
        rounds = s.matrix()
        s.idle()
        s.scaling()
        s.tls()
    finally:
        kill_all()
        shutil.rmtree(s.work, ignore_errors=True)
    sys.path.insert(0, os.path.dirname(__file__))
    import report
    doc = report.build(s.runs, dict(
        tool=a.command, quick=a.quick, rounds_planned=a.rounds, rounds_run=rounds,
        started_unix=t0, duration_s=time.time() - t0,
        sizes=dict(new_sessions=a.n_new, persistent_messages=a.n_persistent,
                   large_messages=a.n_large, idle_connections=a.n_idle, tls_sessions=a.n_tls)))
    report.write(doc, a.out)


if __name__ == "__main__":
    main()
