#!/usr/bin/env python3
"""usage: ops_count.py WARREN_BINARY [TOTAL]: io_uring ops and syscalls per connect+echo+close.

Starts warren-tcp (perf/compare's config) with WARREN_BINARY, records the `io_uring:io_uring_submit_req`
and `raw_syscalls:sys_enter` tracepoints of its two processes with `perf record` during
`warren-load connrate --total TOTAL --concurrency 16`, and prints each thread group's count per
connection (opcode names; syscall numbers named for the common ones, x86_64).
"""
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, os.path.join(REPO, "perf", "lib"))
import common as C  # noqa: E402
import systems as S  # noqa: E402

C.raise_nofile()
TGT = os.path.join(REPO, "target", "release")
LOAD = os.path.join(TGT, "warren-load")
total = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
tmp = tempfile.mkdtemp()
backends = {"sink": 19201, "echo": 19202, "http": 19203}
bp = [C.Proc(f"b-{k}", [LOAD, k, "--listen", f"127.0.0.1:{p}"], tmp) for k, p in backends.items()]
C.wait_functional(backends, timeout=15, procs=bp)
ctx = {"tools": C.DEFAULT_TOOLS, "warren": sys.argv[1], "warren_mimalloc": None, "backends": backends, "tmp": tmp}
s = {x.name: x for x in S.all_systems(ctx)}["warren-tcp"]
s.start(19300)
data = os.path.join(tmp, "tp.data")
perf = subprocess.Popen(["perf", "record", "-e", "io_uring:io_uring_submit_req", "-e", "raw_syscalls:sys_enter",
                         "-p", ",".join(str(p) for p in s.pids()), "-o", data], stderr=subprocess.DEVNULL)
time.sleep(0.5)
out = subprocess.run([LOAD, "-q", "connrate", "--target", f"127.0.0.1:{s.public['echo']}", "--total", str(total),
                      "--concurrency", "16"], capture_output=True, text=True)
perf.send_signal(2)
perf.wait()
s.stop()
for p in bp:
    p.stop()
print(f"{sys.argv[1]}: {json.loads(out.stdout)['rps']:.0f} conn/s under perf record; per connection:")
names = {"24": "sched_yield", "3": "close", "41": "socket", "426": "io_uring_enter", "48": "shutdown",
         "54": "setsockopt", "52": "getpeername", "45": "recvfrom", "44": "sendto", "275": "splice"}
script = subprocess.run(["perf", "script", "-i", data, "-F", "comm,event,trace"], capture_output=True, text=True).stdout
n = collections.Counter()
for ln in script.splitlines():
    c = ln.split()[0][:6] if ln.split() else "?"
    m = re.search(r"opcode (\w+)", ln)
    if m:
        n[(c, "op", m.group(1))] += 1
        continue
    m = re.search(r"NR (\d+)", ln)
    if m:
        n[(c, "syscall", names.get(m.group(1), m.group(1)))] += 1
for k, v in sorted(n.items()):
    if v / total > 0.01:
        print(f"  {v / total:5.2f}  {k[0]} {k[1]} {k[2]}")
