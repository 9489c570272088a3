#!/usr/bin/env python3
"""Idle-connection helper for the comparison suite: opens N connections to
127.0.0.1:PORT, reads each greeting, writes how many greeted to READY, then
holds them open until the file STOP exists (at most 60 s), and closes them.
Used to measure a sink's memory per idle connection."""
import os
import resource
import socket
import sys
import time

port, n, ready, stop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 1000)), hard))
socks, ok = [], 0
try:
    for _ in range(n):
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
for s in socks:
    s.close()
