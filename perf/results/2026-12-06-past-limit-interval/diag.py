import json, os, re, signal, subprocess, sys, time
sys.path.insert(0, "/work/main/perf/results/2026-12-06-window-minrtt")
L = "/work/main/target/release/warren-load"
TOKEN = "warren-perf-token-0123456789abcdef"
binary, port, n, direction = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tuning = sys.argv[5] if len(sys.argv) > 5 else ''
d = f"/tmp/diag/{port}"; os.makedirs(d + "/state", exist_ok=True)
open(d+"/s.toml","w").write(f'[server]\nbind_addr="127.0.0.1:{port}"\ntransport="tcp"\nstate_dir="{d}/state"\n[server.clients.perf]\ntoken="{TOKEN}"\n[server.tuning]\n{tuning}\n[server.services.sink]\nbind_addr="127.0.0.1:{port+2}"\n')
open(d+"/c.toml","w").write(f'[client]\nserver_addr="127.0.0.1:{port}"\nname="perf"\ntoken="{TOKEN}"\ntransport="tcp"\n[client.tuning]\n{tuning}\n[client.services.sink]\nlocal_addr="127.0.0.1:{port+5}"\n')
env = dict(os.environ, WARREN_DUMP_SHARDS="1", WARREN_LOG=os.environ.get("DLOG","warn"))
def spawn(a, log=None, env=None):
    return subprocess.Popen(a, stdout=open(log,"w") if log else subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True, env=env)
ps=[spawn([L,"-q","sink","--listen",f"127.0.0.1:{port+5}"])]
ps.append(spawn([binary,"server","-c",d+"/s.toml","--backend","uring"], d+"/server.log", env)); time.sleep(0.5)
ps.append(spawn([binary,"client","-c",d+"/c.toml","--backend","uring"], d+"/client.log", env)); time.sleep(2)
recv_log = d + ("/server.log" if direction == "down" else "/client.log")
def last():
    lines=[l for l in open(recv_log) if "DIAG" in l]
    return [int(x) for x in re.findall(r"\d+", lines[-1].split("DIAG")[1])] if lines else [0]*16
names="small core_no core_ok bufbefore pipe_no overflow sending_ext room short_take copy_switch hdr_recv frame_recv copy_recv pb_sum avail_sum left_sum".split()
try:
    prev=None
    time.sleep(2.5); prev=last()
    for i in range(n):
        p=subprocess.run([L,"-q","bulk","--bytes","1GiB","--direction",direction,"--target",f"127.0.0.1:{port+2}"],capture_output=True,text=True,check=True)
        mb=json.loads(p.stdout.strip().splitlines()[-1])["mb_per_s"]
        time.sleep(2.5); cur=last()
        delta={names[j]:cur[j]-prev[j] for j in range(len(names)) if cur[j]-prev[j]}
        print(f"{direction} {mb:.0f} MB/s {delta}", flush=True)
        prev=cur
finally:
    for p in ps: p.send_signal(signal.SIGTERM)
    for p in ps: p.wait()
