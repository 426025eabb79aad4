#!/usr/bin/env python3
"""rr-1 through one warren server + client pair (io_uring, 2 shards each, default placement) on
loopback, several 4 s runs on fresh connections, printing per run p50/p90/p99/max, the halts
per second of each CPU (cpuidle state1 'haltpoll' usage), and each busy thread's CPU ticks and
last CPU. Knobs (environment):
  TUNING="k = v; k = v"  extra [server.tuning] and [client.tuning] lines
  ECHO_CPU=N             pin the echo backend to CPU N (taskset)
  LOAD_CPUS=a,b          pin the load generator of run i to CPU list[i % len]
  CHRT_IDLE=1            make every shard thread SCHED_IDLE for the whole run (chrt -i, root)
  HOG=0,1                a SCHED_OTHER busy loop pinned to each listed CPU during the runs
  CLIENT_TUNING="k = v"  extra [client.tuning] lines only (e.g. cores = [1, 0])
  WARREN_BIN=path        the warren binary (default target/release/warren)
usage: placement.py BASE_PORT RUNS  (needs target/release/{warren,warren-load})"""
import json, os, signal, subprocess, sys, time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
W = os.environ.get("WARREN_BIN") or os.path.join(REPO, "target/release/warren")
L = os.path.join(REPO, "target/release/warren-load")
TOKEN = "warren-perf-token-0123456789abcdef"
base, runs = int(sys.argv[1]), int(sys.argv[2])
d = f"/tmp/placement-{base}"
os.makedirs(d + "/state", exist_ok=True)
echo = base + 50
extra = "\n".join(x.strip() for x in os.environ.get("TUNING", "").split(";") if x.strip())
srv = (f'[server]\nbind_addr="127.0.0.1:{base}"\ntransport="tcp"\nstate_dir="{d}/state"\n'
       f'[server.clients.perf]\ntoken="{TOKEN}"\n')
cli = f'[client]\nserver_addr="127.0.0.1:{base}"\nname="perf"\ntoken="{TOKEN}"\ntransport="tcp"\n'
cextra = "\n".join(x.strip() for x in os.environ.get("CLIENT_TUNING", "").split(";") if x.strip())
if extra:
    srv += f"[server.tuning]\n{extra}\n"
if extra or cextra:
    cli += f"[client.tuning]\n{extra}\n{cextra}\n"
srv += f'[server.services.echo]\nbind_addr="127.0.0.1:{base + 2}"\n'
cli += f'[client.services.echo]\nlocal_addr="127.0.0.1:{echo}"\n'
open(d + "/s.toml", "w").write(srv)
open(d + "/c.toml", "w").write(cli)
procs = []


def sp(name, argv):
    p = subprocess.Popen(argv, stdout=open(f"{d}/{name}.log", "w"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    procs.append(p)
    return p


ecpu = os.environ.get("ECHO_CPU")
e = sp("echo", (["taskset", "-c", ecpu] if ecpu else []) + [L, "echo", "--listen", f"127.0.0.1:{echo}"])
s = sp("server", [W, "server", "-c", d + "/s.toml", "--backend", "uring"])
time.sleep(0.5)
c = sp("client", [W, "client", "-c", d + "/c.toml", "--backend", "uring"])
time.sleep(2)
if os.environ.get("CHRT_IDLE"):
    for p in (s, c):
        for t in os.listdir(f"/proc/{p.pid}/task"):
            if "-uring-" in open(f"/proc/{p.pid}/task/{t}/comm").read():
                subprocess.run(["chrt", "-i", "-p", "0", t], check=True)
hogs = [sp(f"hog{cpu}", ["taskset", "-c", cpu, "sh", "-c", "while :; do :; done"])
        for cpu in os.environ.get("HOG", "").split(",") if cpu]


def threads(pid):
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = open(f"/proc/{pid}/task/{t}/comm").read().strip()
            st = open(f"/proc/{pid}/task/{t}/stat").read()
            f = st[st.rindex(")") + 2:].split()
            out[f"{comm}:{t}"] = (int(f[11]) + int(f[12]), int(f[36]))
        except OSError:
            pass
    return out


def halts():
    # No cpuidle driver on some hosts (AMD EPYC VM of 2026-12-02 afternoon): report -1.
    try:
        return [int(open(f"/sys/devices/system/cpu/cpu{i}/cpuidle/state1/usage").read())
                for i in range(os.cpu_count())]
    except OSError:
        return [-1] * os.cpu_count()


print(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} TUNING={extra!r} CLIENT_TUNING={cextra!r} ECHO_CPU={ecpu} "
      f"LOAD_CPUS={os.environ.get('LOAD_CPUS')} CHRT_IDLE={os.environ.get('CHRT_IDLE')} HOG={os.environ.get('HOG')}")
lcpus = [x for x in os.environ.get("LOAD_CPUS", "").split(",") if x]
try:
    for i in range(runs):
        before = {n: threads(p.pid) for n, p in (("server", s), ("client", c), ("echo", e))}
        h0 = halts()
        lc = lcpus[i % len(lcpus)] if lcpus else None
        lp = subprocess.Popen((["taskset", "-c", lc] if lc else []) +
                              [L, "rr", "--target", f"127.0.0.1:{base + 2}", "--connections", "1",
                               "--duration-ms", "4000", "--warmup-ms", "500"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(2.5)
        lt = threads(lp.pid)
        out, _ = lp.communicate()
        h1 = halts()
        after = {n: threads(p.pid) for n, p in (("server", s), ("client", c), ("echo", e))}
        lat = json.loads(out.strip().splitlines()[-1])["latency_us"]
        print(f"run {i} load on {lc}: p50 {lat['p50']:.1f} p90 {lat['p90']:.1f} p99 {lat['p99']:.1f} "
              f"max {lat['max']:.0f} us; halts/s per CPU {[round((b - a) / 4.5) for a, b in zip(h0, h1)]}")
        for n in after:
            busy = [(k.split(':')[0], after[n][k][0] - before[n].get(k, (0, 0))[0], after[n][k][1])
                    for k in after[n] if after[n][k][0] - before[n].get(k, (0, 0))[0] > 0]
            print(f"    {n}: (thread, ticks, last cpu) {busy}")
        print(f"    load: (thread, last cpu) {[(k.split(':')[0], v[1]) for k, v in lt.items()]}")
finally:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait()
