#!/usr/bin/env python3
"""Window tuning on a long path: the client's sessions go through delay_proxy.py (DELAY_MS each
way), variants interleaved over ROUNDS rounds. Per round: a bulk transfer of BYTES up and down
through each variant (io_uring, plain TCP, defaults unless stated), and the same transfers
through the proxy with no tunnel ("path": what the delayed path itself carries).
Variants come from VARIANTS: ';'-separated 'label=binary[|tuning line...]'.
usage: wan_ab.py BASE_PORT ROUNDS DELAY_MS BYTES"""
import json, os, signal, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
L = os.path.join(REPO, "target/release/warren-load")
TOKEN = "warren-perf-token-0123456789abcdef"
base, rounds, delay_ms, size = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
variants = []
for v in os.environ["VARIANTS"].split(";"):
    label, rest = v.split("=", 1)
    parts = rest.split("|")
    variants.append((label, parts[0], "\n".join(p.strip() for p in parts[1:] if p.strip())))


def spawn(args, log=None):
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def proxy(listen, target):
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "delay_proxy.py"), str(listen), str(target),
                          delay_ms], stdout=subprocess.PIPE, text=True, start_new_session=True)
    p.stdout.readline()
    return p


def pair(port, binary, tuning, d):
    os.makedirs(d + "/state", exist_ok=True)
    srv = (f'[server]\nbind_addr="127.0.0.1:{port}"\ntransport="tcp"\nstate_dir="{d}/state"\n'
           f'[server.clients.perf]\ntoken="{TOKEN}"\n[server.tuning]\n{tuning}\n'
           f'[server.services.sink]\nbind_addr="127.0.0.1:{port + 2}"\n')
    cli = (f'[client]\nserver_addr="127.0.0.1:{port + 1}"\nname="perf"\ntoken="{TOKEN}"\ntransport="tcp"\n'
           f'[client.tuning]\n{tuning}\n[client.services.sink]\nlocal_addr="127.0.0.1:{port + 5}"\n')
    open(d + "/s.toml", "w").write(srv)
    open(d + "/c.toml", "w").write(cli)
    procs = [spawn([L, "-q", "sink", "--listen", f"127.0.0.1:{port + 5}"]), proxy(port + 1, port)]
    procs.append(spawn([binary, "server", "-c", d + "/s.toml", "--backend", "uring"], d + "/server.log"))
    time.sleep(0.5)
    procs.append(spawn([binary, "client", "-c", d + "/c.toml", "--backend", "uring"], d + "/client.log"))
    time.sleep(3)
    return procs


def load(*args):
    p = subprocess.run([L, "-q", *args], capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def stop(procs):
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait()


res = {}
print(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} delay {delay_ms} ms each way, {size} "
      f"variants={variants!r}", flush=True)
for r in range(rounds):
    # The path alone: sink behind the delay proxy.
    port = base + 90
    procs = [spawn([L, "-q", "sink", "--listen", f"127.0.0.1:{port + 5}"]), proxy(port + 1, port + 5)]
    time.sleep(0.5)
    try:
        row = {d: load("bulk", "--bytes", size, "--direction", d, "--target", f"127.0.0.1:{port + 1}")["mb_per_s"]
               for d in ("up", "down")}
    finally:
        stop(procs)
    res.setdefault("path", []).append(row)
    print(f"round {r + 1} path: up {row['up']:.1f} MB/s, down {row['down']:.1f} MB/s", flush=True)
    for i, (label, binary, tuning) in enumerate(variants):
        port = base + 20 * i
        procs = pair(port, binary, tuning, f"/tmp/wan-ab-{port}")
        try:
            row = {d: load("bulk", "--bytes", size, "--direction", d, "--target", f"127.0.0.1:{port + 2}")["mb_per_s"]
                   for d in ("up", "down")}
        finally:
            stop(procs)
        res.setdefault(label, []).append(row)
        print(f"round {r + 1} {label}: up {row['up']:.1f} MB/s, down {row['down']:.1f} MB/s", flush=True)
print("## medians")
for label, rows in res.items():
    print(f"{label}: up {statistics.median(x['up'] for x in rows):.1f} MB/s, "
          f"down {statistics.median(x['down'] for x in rows):.1f} MB/s")
