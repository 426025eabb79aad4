import os, sys, json, subprocess, time, signal
L="/work/main/target/release/warren-load"
BINS={"head":"/work/main/target/release/warren","max2":"/tmp/tgt-exp/release/warren"}
TOKEN="warren-perf-token-0123456789abcdef"
rounds=int(sys.argv[1]); wl=sys.argv[2]
echo=subprocess.Popen([L,"echo","--listen","127.0.0.1:24999"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL,start_new_session=True)
res={k:[] for k in BINS}
port=24000
try:
  for r in range(rounds):
    for name,b in BINS.items():
        port+=10; d=f"/tmp/cab/{name}-{port}"; os.makedirs(d+"/state",exist_ok=True)
        open(d+"/s.toml","w").write(f'[server]\nbind_addr="127.0.0.1:{port}"\ntransport="tcp"\nstate_dir="{d}/state"\n[server.clients.perf]\ntoken="{TOKEN}"\n[server.services.echo]\nbind_addr="127.0.0.1:{port+2}"\n')
        open(d+"/c.toml","w").write(f'[client]\nserver_addr="127.0.0.1:{port}"\nname="perf"\ntoken="{TOKEN}"\ntransport="tcp"\n[client.services.echo]\nlocal_addr="127.0.0.1:24999"\n')
        s=subprocess.Popen([b,"server","-c",d+"/s.toml","--backend","uring"],stdout=open(d+"/s.log","w"),stderr=subprocess.STDOUT,start_new_session=True)
        time.sleep(0.4)
        c=subprocess.Popen([b,"client","-c",d+"/c.toml","--backend","uring"],stdout=open(d+"/c.log","w"),stderr=subprocess.STDOUT,start_new_session=True)
        time.sleep(1.5)
        args=[L,"connrate","--target",f"127.0.0.1:{port+2}","--total","2000","--concurrency","16"] if wl=="connrate" else [L,"rr","--target",f"127.0.0.1:{port+2}","--duration-ms","3000","--warmup-ms","500"]
        out=subprocess.run(args,capture_output=True,text=True).stdout
        rep=json.loads(out.strip().splitlines()[-1])
        v=rep["rps"] if wl=="connrate" else (rep["latency_us"]["p50"],rep["latency_us"]["p99"])
        res[name].append(v); print(r,name,v,flush=True)
        for p in (c,s): p.send_signal(signal.SIGTERM)
        for p in (c,s): p.wait()
finally:
  echo.send_signal(signal.SIGTERM); echo.wait()
import statistics as st
for k,v in res.items():
    print(k, "median", st.median(v) if wl=="connrate" else (st.median(x[0] for x in v), st.median(x[1] for x in v)))
