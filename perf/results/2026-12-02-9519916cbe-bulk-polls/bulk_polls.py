#!/usr/bin/env python3
"""How many busy-poll syscalls a 1 GiB bulk-up transfer runs: one warren pair (io_uring, plain TCP,
2 shards each), `warren-load bulk --bytes 1GiB --direction up` through it into a sink, with
`perf stat` counting syscall tracepoints on both warren processes. Per tuning (environment
TUNINGS, ';'-separated variants of '|'-separated lines; default: the defaults and busy_poll_us = 0),
ROUNDS rounds interleaved. usage: bulk_polls.py BASE_PORT ROUNDS (target/release binaries)."""
import json, os, signal, subprocess, sys, time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
W = os.path.join(REPO, "target/release/warren")
L = os.path.join(REPO, "target/release/warren-load")
TOKEN = "warren-perf-token-0123456789abcdef"
SYSCALLS = ["sched_yield", "sched_setscheduler", "io_uring_enter", "splice", "sendto", "recvfrom"]
base, rounds = int(sys.argv[1]), int(sys.argv[2])
tunings = os.environ.get("TUNINGS", ";busy_poll_us = 0").split(";")


def pair(port, tuning, d):
    os.makedirs(d + "/state", exist_ok=True)
    t = "\n".join(x.strip() for x in tuning.split("|") if x.strip())
    srv = (f'[server]\nbind_addr="127.0.0.1:{port}"\ntransport="tcp"\nstate_dir="{d}/state"\n'
           f'[server.clients.perf]\ntoken="{TOKEN}"\n[server.tuning]\n{t}\n'
           f'[server.services.sink]\nbind_addr="127.0.0.1:{port + 2}"\n')
    cli = (f'[client]\nserver_addr="127.0.0.1:{port}"\nname="perf"\ntoken="{TOKEN}"\ntransport="tcp"\n'
           f'[client.tuning]\n{t}\n[client.services.sink]\nlocal_addr="127.0.0.1:{port + 5}"\n')
    open(d + "/s.toml", "w").write(srv)
    open(d + "/c.toml", "w").write(cli)
    sink = subprocess.Popen([L, "sink", "--listen", f"127.0.0.1:{port + 5}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    s = subprocess.Popen([W, "server", "-c", d + "/s.toml", "--backend", "uring"],
                         stdout=open(d + "/server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    time.sleep(0.5)
    c = subprocess.Popen([W, "client", "-c", d + "/c.toml", "--backend", "uring"],
                         stdout=open(d + "/client.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    time.sleep(2)
    return [sink, s, c]


print(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} tunings={tunings!r}")
for r in range(rounds):
    for i, tuning in enumerate(tunings):
        port = base + 20 * i
        d = f"/tmp/bulk-polls-{port}"
        procs = pair(port, tuning, d)
        try:
            out = os.path.join(d, "pst.txt")
            pst = subprocess.Popen(["perf", "stat", "-x,", "-o", out, "-e",
                                    ",".join("syscalls:sys_enter_" + x for x in SYSCALLS),
                                    "-p", f"{procs[1].pid},{procs[2].pid}"])
            time.sleep(0.5)
            lp = subprocess.run([L, "-q", "bulk", "--target", f"127.0.0.1:{port + 2}", "--streams", "1",
                                 "--bytes", "1GiB", "--direction", "up"], capture_output=True, text=True)
            pst.send_signal(signal.SIGINT)
            pst.wait()
            rep = json.loads(lp.stdout.strip().splitlines()[-1])
            counts = {}
            for ln in open(out):
                f = ln.strip().split(",")
                if len(f) > 2 and f[2].startswith("syscalls:sys_enter_"):
                    counts[f[2][len("syscalls:sys_enter_"):]] = int(float(f[0]))
            gb = rep["bytes"] / 1e9
            print(f"round {r + 1} tuning {tuning or '(defaults)'!r}: {rep['mb_per_s']:.0f} MB/s; syscalls per GB "
                  f"(server + client): {({k: round(v / gb) for k, v in counts.items()})}", flush=True)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait()
