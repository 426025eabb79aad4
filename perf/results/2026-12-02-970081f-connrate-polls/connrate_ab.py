#!/usr/bin/env python3
"""Targeted connect+echo+close comparison (the script behind this folder's README).

usage: [WARREN_COUNT=1] connrate_ab.py SYSTEMS ROUNDS [TOTAL]
(copied from ../2026-12-01-7f6a333-connrate-targeted/, plus the optional syscall counts)
SYSTEMS: comma list of perf/compare system names (rathole, warren-tcp, warren-nopoll-tcp, ...),
plus `direct` and `relay` (conn_relay, 1 thread); `NAME@/path/to/warren` runs a warren system with
another binary. Per run: a fresh `warren-load echo` on a fresh port (so no TIME_WAIT from earlier
runs is in the way), the system started, `warren-load connrate --total TOTAL --concurrency 16`,
rounds interleaved. Prints per run: TCP segments / pure ACKs / interrupts / host context
switches per connection (nstat, /proc/interrupts, /proc/stat), per-thread user/sys CPU per
connection (/proc/PID/task/*/stat), and per system the medians of conn/s, tunnel CPU, echo CPU
and load generator CPU (us per connection). Uses target/release binaries of this checkout.
"""
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
names = sys.argv[1].split(",")
# WARREN_COUNT=1: count the tunnel's syscalls (perf stat tracepoints) in every run.
COUNT = os.environ.get("WARREN_COUNT") == "1"
SYSCALLS = ["sched_setscheduler", "sched_yield", "io_uring_enter", "socket", "close", "setsockopt"]
rounds = int(sys.argv[2])
total = sys.argv[3] if len(sys.argv) > 3 else "10000"
tmp = tempfile.mkdtemp()
port = [20000]


def nextport():
    port[0] += 10
    return port[0]


def counters():
    o = subprocess.run(["nstat", "-az", "TcpOutSegs", "TcpExtTCPPureAcks"], capture_output=True, text=True).stdout
    d = {ln.split()[0]: int(ln.split()[1]) for ln in o.splitlines() if ln and not ln.startswith("#")}
    for ln in open("/proc/interrupts"):
        f = ln.split()
        if f and f[0] in ("RES:", "CAL:"):
            d[f[0]] = sum(int(x) for x in f[1:3])
    d["ctxt"] = int(re.search(r"ctxt (\d+)", open("/proc/stat").read()).group(1))
    return d


def threads(pids):
    d = {}
    for p in pids:
        for t in os.listdir(f"/proc/{p}/task"):
            f = open(f"/proc/{p}/task/{t}/stat").read().rsplit(")", 1)[1].split()
            d[(p, t, open(f"/proc/{p}/task/{t}/comm").read().strip())] = (int(f[11]), int(f[12]))
    return d


bp = [C.Proc(f"b-{k}", [LOAD, k, "--listen", f"127.0.0.1:{p}"], tmp) for k, p in (("sink", 19991), ("http", 19993))]
C.wait_port("127.0.0.1", 19991, 10)
C.wait_port("127.0.0.1", 19993, 10)
res = {n: [] for n in names}
tk = os.sysconf("SC_CLK_TCK")
try:
    for r in range(rounds):
        for n in names:
            ep = nextport()
            echo = C.Proc("echo", [LOAD, "echo", "--listen", f"127.0.0.1:{ep}"], tmp)
            C.wait_port("127.0.0.1", ep, 10)
            ctx = {"tools": C.DEFAULT_TOOLS, "warren": os.path.join(TGT, "warren"), "warren_mimalloc": None,
                   "backends": {"sink": 19991, "echo": ep, "http": 19993}, "tmp": tmp}
            base = n.split("@")[0]
            if "@" in n:
                ctx["warren"] = n.split("@")[1]
            if base == "relay":
                rp = nextport()
                rel = C.Proc("relay", [os.path.join(TGT, "conn_relay"), "--listen", f"127.0.0.1:{rp}",
                                       "--to", f"127.0.0.1:{ep}"], tmp)
                C.wait_port("127.0.0.1", rp, 10)
                pids, target, stop = [rel.pid], rp, [rel]
            elif base == "direct":
                pids, target, stop = [], ep, []
            else:
                s = {x.name: x for x in S.all_systems(ctx)}[base]
                b = nextport()
                port[0] += 10
                s.start(b)
                pids, target, stop = s.pids(), s.public["echo"], [s]
            time.sleep(0.3)
            c0 = sum(C.proc_cpu_seconds(p) for p in pids)
            e0 = C.proc_cpu_seconds(echo.pid)
            t0, n0 = threads(pids + [echo.pid]), counters()
            pst = None
            if COUNT and pids:
                pst = subprocess.Popen(["perf", "stat", "-x,", "-o", os.path.join(tmp, "pst.txt"), "-e",
                                        ",".join("syscalls:sys_enter_" + x for x in SYSCALLS),
                                        "-p", ",".join(str(p) for p in pids)])
                time.sleep(0.5)
            out = subprocess.run(["/usr/bin/time", "-f", "LOADCPU %U %S", LOAD, "-q", "connrate", "--target",
                                  f"127.0.0.1:{target}", "--total", total, "--concurrency", "16"],
                                 capture_output=True, text=True)
            if pst:
                pst.send_signal(2)
                pst.wait()
            t1, n1 = threads(pids + [echo.pid]), counters()
            c1 = sum(C.proc_cpu_seconds(p) for p in pids)
            e1 = C.proc_cpu_seconds(echo.pid)
            import json
            rep = json.loads(out.stdout)
            q = rep["requests"]
            m = re.search(r"LOADCPU (\S+) (\S+)", out.stderr)
            lc = float(m.group(1)) + float(m.group(2))
            agg = {}
            for k in t1:
                if k in t0:
                    nm = ("echo:" if k[0] == echo.pid else "") + k[2]
                    a = agg.setdefault(nm, [0, 0])
                    a[0] += t1[k][0] - t0[k][0]
                    a[1] += t1[k][1] - t0[k][1]
            print(f"round {r + 1} {n}: {rep['rps']:.0f} conn/s; per connection:",
                  {k: round((n1[k] - n0[k]) / q, 2) for k in n1},
                  "user/sys us:", {k: (round(v[0] / tk / q * 1e6, 1), round(v[1] / tk / q * 1e6, 1))
                                   for k, v in agg.items() if v[0] + v[1] > 0}, flush=True)
            if pst:
                sc = {}
                for ln in open(os.path.join(tmp, "pst.txt")):
                    f = ln.strip().split(",")
                    if len(f) > 2 and f[2].startswith("syscalls:sys_enter_"):
                        sc[f[2][len("syscalls:sys_enter_"):]] = round(float(f[0]) / q, 2)
                print(f"  syscalls per connection (tunnel, perf stat; this run's rate is not counted): {sc}",
                      flush=True)
            for x in stop:
                x.stop()
            echo.stop()
            res[n].append((rep["rps"], (c1 - c0) / q * 1e6, (e1 - e0) / q * 1e6, lc / q * 1e6))
finally:
    for p in bp:
        p.stop()
print(f"\nmedians over {rounds} rounds, {total} connections per run (us per connection):")
for n, v in res.items():
    def med(i):
        return sorted(x[i] for x in v)[len(v) // 2]
    print(f"{n:55s} conn/s {med(0):7.0f}  tunnel {med(1):6.1f}  echo {med(2):5.1f}  load {med(3):5.1f}"
          f"  all conn/s {[int(x[0]) for x in v]}")
