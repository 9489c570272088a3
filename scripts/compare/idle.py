#!/usr/bin/env python3
"""Idle-connection helper for the comparison suite: opens N connections to
127.0.0.1:PORT, reads each greeting, writes how many greeted to READY, then
holds them open until the file STOP exists (at most 60 s), and closes them.
Used to measure a sink's memory per idle connection. Source addresses are
spread over 127.0.1.1, 127.0.1.2, ... (20,000 connections each), so more
connections than one address has ephemeral ports can be held."""
import os
import resource
import socket
import sys
import time

port, n, ready, stop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
# Optional: the index of the first connection (several helpers share the
# work when one process may not hold them all).
first = int(sys.argv[5]) if len(sys.argv) > 5 else 0
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 1000)), hard))
socks, ok = [], 0
try:
    for i in range(first, first + n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # IP_BIND_ADDRESS_NO_PORT: the port is picked at connect, for the
        # whole 4-tuple, so ports still in TIME_WAIT towards an earlier
        # sink's port do not run the source address out of ports.
        s.setsockopt(socket.IPPROTO_IP, 24, 1)
        s.bind(("127.0.1.%d" % (1 + i // 20000), 0))
        s.settimeout(20)
        s.connect(("127.0.0.1", port))
        socks.append(s)
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
