#!/usr/bin/env python3
"""A/B of warren binaries on bulk and rr-1: one warren pair per variant (io_uring, plain TCP,
2 shards each, a sink and an echo behind it), variants interleaved over ROUNDS rounds. Per run:
1 GiB bulk-up and 1 GiB bulk-down (each with `perf stat` counting syscalls of both warren
processes), bulk-10x (10 streams x 100 MiB up, as perf/compare's) and rr-1 (64 B, 5 s). Variants come from VARIANTS: ';'-separated 'label=binary[|tuning line...]'.
usage: bulk_ab.py BASE_PORT ROUNDS"""
import json, os, signal, statistics, subprocess, sys, time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
L = os.path.join(REPO, "target/release/warren-load")
TOKEN = "warren-perf-token-0123456789abcdef"
SYSCALLS = ["sched_yield", "sched_setscheduler", "io_uring_enter", "recvfrom"]
base, rounds = int(sys.argv[1]), int(sys.argv[2])
variants = []
for v in os.environ["VARIANTS"].split(";"):
    label, rest = v.split("=", 1)
    parts = rest.split("|")
    variants.append((label, parts[0], "\n".join(p.strip() for p in parts[1:] if p.strip())))


def spawn(args, log=None):
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def pair(port, binary, tuning, d):
    os.makedirs(d + "/state", exist_ok=True)
    srv = (f'[server]\nbind_addr="127.0.0.1:{port}"\ntransport="tcp"\nstate_dir="{d}/state"\n'
           f'[server.clients.perf]\ntoken="{TOKEN}"\n[server.tuning]\n{tuning}\n'
           f'[server.services.sink]\nbind_addr="127.0.0.1:{port + 2}"\n'
           f'[server.services.echo]\nbind_addr="127.0.0.1:{port + 3}"\n')
    cli = (f'[client]\nserver_addr="127.0.0.1:{port}"\nname="perf"\ntoken="{TOKEN}"\ntransport="tcp"\n'
           f'[client.tuning]\n{tuning}\n[client.services.sink]\nlocal_addr="127.0.0.1:{port + 5}"\n'
           f'[client.services.echo]\nlocal_addr="127.0.0.1:{port + 6}"\n')
    open(d + "/s.toml", "w").write(srv)
    open(d + "/c.toml", "w").write(cli)
    procs = [spawn([L, "-q", "sink", "--listen", f"127.0.0.1:{port + 5}"]),
             spawn([L, "-q", "echo", "--listen", f"127.0.0.1:{port + 6}"])]
    procs.append(spawn([binary, "server", "-c", d + "/s.toml", "--backend", "uring"], d + "/server.log"))
    time.sleep(0.5)
    procs.append(spawn([binary, "client", "-c", d + "/c.toml", "--backend", "uring"], d + "/client.log"))
    time.sleep(2)
    return procs


def load(*args):
    p = subprocess.run([L, "-q", *args], capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def counted(procs, out, *args):
    """One 1 GiB bulk run with `perf stat` on both warren processes: (report, syscalls per GB)."""
    pst = subprocess.Popen(["perf", "stat", "-x,", "-o", out, "-e",
                            ",".join("syscalls:sys_enter_" + x for x in SYSCALLS),
                            "-p", f"{procs[2].pid},{procs[3].pid}"])
    time.sleep(0.5)
    rep = load("bulk", "--bytes", "1GiB", *args)
    pst.send_signal(signal.SIGINT)
    pst.wait()
    counts = {}
    for ln in open(out):
        f = ln.strip().split(",")
        if len(f) > 2 and f[2].startswith("syscalls:sys_enter_"):
            counts[f[2][len("syscalls:sys_enter_"):]] = round(float(f[0]) / (rep["bytes"] / 1e9))
    return rep, counts


res = {label: {"up": [], "down": [], "ten": [], "p50": [], "p99": []} for label, _, _ in variants}
print(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} variants={variants!r}", flush=True)
for r in range(rounds):
    for i, (label, binary, tuning) in enumerate(variants):
        port = base + 20 * i
        d = f"/tmp/bulk-ab-{port}"
        procs = pair(port, binary, tuning, d)
        try:
            up, up_counts = counted(procs, d + "/pst-up.txt", "--direction", "up",
                                    "--target", f"127.0.0.1:{port + 2}")
            down, down_counts = counted(procs, d + "/pst-down.txt", "--direction", "down",
                                        "--target", f"127.0.0.1:{port + 2}")
            ten = load("bulk", "--streams", "10", "--bytes", "100MiB", "--direction", "up",
                       "--target", f"127.0.0.1:{port + 2}")
            rr = load("rr", "--target", f"127.0.0.1:{port + 3}", "--duration-ms", "5000")
            p50, p99 = rr["latency_us"]["p50"], rr["latency_us"]["p99"]
            x = res[label]
            x["up"].append(up["mb_per_s"]); x["down"].append(down["mb_per_s"]); x["ten"].append(ten["mb_per_s"])
            x["p50"].append(p50); x["p99"].append(p99)
            print(f"round {r + 1} {label}: bulk-up {up['mb_per_s']:.0f} MB/s, bulk-down {down['mb_per_s']:.0f} MB/s, "
                  f"bulk-10x {ten['mb_per_s']:.0f} MB/s, "
                  f"rr-1 p50 {p50:.1f} p99 {p99:.1f} us\n    syscalls/GB (server + client): up {up_counts}\n"
                  f"    down {down_counts}", flush=True)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait()
print("## medians")
for label, x in res.items():
    print(f"{label}: bulk-up {statistics.median(x['up']):.0f} MB/s, bulk-down {statistics.median(x['down']):.0f} MB/s, "
          f"bulk-10x {statistics.median(x['ten']):.0f} MB/s, "
          f"rr-1 p50 {statistics.median(x['p50']):.1f} us, p99 {statistics.median(x['p99']):.1f} us")
