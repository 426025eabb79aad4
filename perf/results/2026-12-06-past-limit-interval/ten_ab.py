"""Interleaved bulk-10x A/B: one pair per variant kept up, REPS runs each, alternating."""
import json, os, signal, statistics, subprocess, sys, time
sys.argv_saved = list(sys.argv)
L = "/work/main/target/release/warren-load"
TOKEN = "warren-perf-token-0123456789abcdef"
base, reps, workload = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
variants = [v.split("=", 1) for v in os.environ["VARIANTS"].split(";")]
def spawn(a, log=None):
    return subprocess.Popen(a, stdout=open(log, "w") if log else subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
procs, ports = [], {}
for i, (label, binary) in enumerate(variants):
    port = base + 20 * i; ports[label] = port
    d = f"/tmp/ten-ab-{port}"; os.makedirs(d + "/state", exist_ok=True)
    open(d+"/s.toml","w").write(f'[server]\nbind_addr="127.0.0.1:{port}"\ntransport="tcp"\nstate_dir="{d}/state"\n[server.clients.perf]\ntoken="{TOKEN}"\n[server.services.sink]\nbind_addr="127.0.0.1:{port+2}"\n[server.services.echo]\nbind_addr="127.0.0.1:{port+3}"\n')
    open(d+"/c.toml","w").write(f'[client]\nserver_addr="127.0.0.1:{port}"\nname="perf"\ntoken="{TOKEN}"\ntransport="tcp"\n[client.services.sink]\nlocal_addr="127.0.0.1:{port+5}"\n[client.services.echo]\nlocal_addr="127.0.0.1:{port+6}"\n')
    procs.append(spawn([L, "-q", "sink", "--listen", f"127.0.0.1:{port+5}"]))
    procs.append(spawn([L, "-q", "echo", "--listen", f"127.0.0.1:{port+6}"]))
    procs.append(spawn([binary, "server", "-c", d+"/s.toml", "--backend", "uring"], d+"/server.log")); time.sleep(0.5)
    procs.append(spawn([binary, "client", "-c", d+"/c.toml", "--backend", "uring"], d+"/client.log"))
time.sleep(2)
args = {"10x": ["--streams", "10", "--bytes", "100MiB", "--direction", "up"],
        "up": ["--bytes", "1GiB", "--direction", "up"], "down": ["--bytes", "1GiB", "--direction", "down"], "rr": []}[workload]
res = {l: [] for l, _ in variants}
print(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {workload} variants={variants}", flush=True)
try:
    for r in range(reps):
        order = variants if r % 2 == 0 else variants[::-1]
        for label, _ in order:
            if workload == "rr":
                p = subprocess.run([L, "-q", "rr", "--target", f"127.0.0.1:{ports[label]+3}", "--duration-ms", "3000"], capture_output=True, text=True, check=True)
                res[label].append(json.loads(p.stdout.strip().splitlines()[-1])["latency_us"]["p50"])
            else:
                p = subprocess.run([L, "-q", "bulk", *args, "--target", f"127.0.0.1:{ports[label]+2}"], capture_output=True, text=True, check=True)
                res[label].append(json.loads(p.stdout.strip().splitlines()[-1])["mb_per_s"])
        print(f"rep {r+1}: " + ", ".join(f"{l} {res[l][-1]:.0f}" for l, _ in variants), flush=True)
finally:
    for p in procs: p.send_signal(signal.SIGTERM)
    for p in procs: p.wait()
for l, _ in variants:
    print(f"{l}: median {statistics.median(res[l]):.1f} {'us p50' if workload == 'rr' else 'MB/s'} over {len(res[l])} (min {min(res[l]):.0f}, max {max(res[l]):.0f})")
