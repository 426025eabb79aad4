#!/usr/bin/env python3
"""Which process does what in the slow and the fast state of single-stream bulk: one warren pair
(target/release, io_uring, plain TCP, defaults, a sink behind it), RUNS transfers of 1 GiB in
DIRECTION, each with one `perf stat` per warren process counting syscalls. `ioctl` is FIONREAD,
which the session receive path calls when a splice into a stream's pipe would block while the
socket still has bytes. usage: bulk_states.py BASE_PORT RUNS DIRECTION"""
import json, os, signal, subprocess, sys, time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
W, L = (os.path.join(REPO, "target/release", b) for b in ("warren", "warren-load"))
TOKEN = "warren-perf-token-0123456789abcdef"
SYSCALLS = ["recvfrom", "splice", "sendto", "ioctl", "io_uring_enter", "sched_setscheduler"]
port, runs, direction = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
d = f"/tmp/bulk-states-{port}"
os.makedirs(d + "/state", exist_ok=True)
open(d + "/s.toml", "w").write(
    f'[server]\nbind_addr="127.0.0.1:{port}"\ntransport="tcp"\nstate_dir="{d}/state"\n'
    f'[server.clients.perf]\ntoken="{TOKEN}"\n[server.services.sink]\nbind_addr="127.0.0.1:{port + 2}"\n')
open(d + "/c.toml", "w").write(
    f'[client]\nserver_addr="127.0.0.1:{port}"\nname="perf"\ntoken="{TOKEN}"\ntransport="tcp"\n'
    f'[client.services.sink]\nlocal_addr="127.0.0.1:{port + 5}"\n')


def spawn(args, log):
    return subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


procs = [spawn([L, "-q", "sink", "--listen", f"127.0.0.1:{port + 5}"], d + "/sink.log"),
         spawn([W, "server", "-c", d + "/s.toml", "--backend", "uring"], d + "/server.log")]
time.sleep(0.5)
procs.append(spawn([W, "client", "-c", d + "/c.toml", "--backend", "uring"], d + "/client.log"))
time.sleep(2)
print(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} direction={direction}", flush=True)
try:
    for r in range(runs):
        stats = []
        for name, p in (("server", procs[1]), ("client", procs[2])):
            out = f"{d}/pst-{name}.txt"
            stats.append((name, out, subprocess.Popen(
                ["perf", "stat", "-x,", "-o", out, "-e", ",".join("syscalls:sys_enter_" + x for x in SYSCALLS),
                 "-p", str(p.pid)])))
        time.sleep(0.5)
        lp = subprocess.run([L, "-q", "bulk", "--target", f"127.0.0.1:{port + 2}", "--bytes", "1GiB",
                             "--direction", direction], capture_output=True, text=True, check=True)
        for _, _, s in stats:
            s.send_signal(signal.SIGINT)
        for _, _, s in stats:
            s.wait()
        rep = json.loads(lp.stdout.strip().splitlines()[-1])
        line = [f"run {r + 1}: {rep['mb_per_s']:.0f} MB/s"]
        for name, out, _ in stats:
            c = {}
            for ln in open(out):
                f = ln.strip().split(",")
                if len(f) > 2 and f[2].startswith("syscalls:sys_enter_"):
                    c[f[2][len("syscalls:sys_enter_"):]] = round(float(f[0]) / (rep["bytes"] / 1e9))
            line.append(f"{name} {c}")
        print("\n    ".join(line), flush=True)
finally:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait()
