import os, sys, json, subprocess, time, signal, statistics as st
L="/work/main/target/release/warren-load"; B="/tmp/tgt-exp/release/warren"
TOKEN="warren-perf-token-0123456789abcdef"
# Variant sets (argv[3]): each compares head with one environment hook of the /tmp/tgt-exp build.
SETS={"nice19":{"EXP_AWAKE_NICE19":"1"}, "incpu":{"EXP_INCOMING_CPU":"1"}}
WL=sys.argv[2]
VARS={"head":{}, sys.argv[3]:SETS[sys.argv[3]]}
rounds=int(sys.argv[1])
echo=subprocess.Popen([L,"echo","--listen","127.0.0.1:25999"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL,start_new_session=True)
res={k:[] for k in VARS}; port=25000
try:
  for r in range(rounds):
    for name,envx in VARS.items():
        port+=10; d=f"/tmp/cab/v{name}-{port}"; os.makedirs(d+"/state",exist_ok=True)
        open(d+"/s.toml","w").write(f'[server]\nbind_addr="127.0.0.1:{port}"\ntransport="tcp"\nstate_dir="{d}/state"\n[server.clients.perf]\ntoken="{TOKEN}"\n[server.services.echo]\nbind_addr="127.0.0.1:{port+2}"\n')
        open(d+"/c.toml","w").write(f'[client]\nserver_addr="127.0.0.1:{port}"\nname="perf"\ntoken="{TOKEN}"\ntransport="tcp"\n[client.services.echo]\nlocal_addr="127.0.0.1:25999"\n')
        env=dict(os.environ); 
        if isinstance(envx,dict): env.update(envx)
        s=subprocess.Popen([B,"server","-c",d+"/s.toml","--backend","uring"],stdout=open(d+"/s.log","w"),stderr=subprocess.STDOUT,start_new_session=True,env=env)
        time.sleep(0.4)
        c=subprocess.Popen([B,"client","-c",d+"/c.toml","--backend","uring"],stdout=open(d+"/c.log","w"),stderr=subprocess.STDOUT,start_new_session=True,env=env)
        time.sleep(1.5)
        if envx=="chrt":
            for p in (s,c):
                for t in os.listdir(f"/proc/{p.pid}/task"):
                    if "-uring-" in open(f"/proc/{p.pid}/task/{t}/comm").read():
                        subprocess.run(["chrt","-i","-p","0",t],check=True)
        if WL=="rr1": a=[L,"rr","--target",f"127.0.0.1:{port+2}","--duration-ms","4000","--warmup-ms","500"]
        elif WL=="rr64": a=[L,"rr","--target",f"127.0.0.1:{port+2}","--connections","64","--duration-ms","3000","--warmup-ms","500"]
        else: a=[L,"connrate","--target",f"127.0.0.1:{port+2}","--total","2000","--concurrency","16"]
        out=subprocess.run(a,capture_output=True,text=True).stdout
        rep=json.loads(out.strip().splitlines()[-1]); l=rep["latency_us"]
        v=(l["p50"],l["p99"]) if WL=="rr1" else (rep["rps"],0)
        res[name].append(v); print(r,name,round(v[0],1),round(v[1],1),flush=True)
        for p in (c,s): p.send_signal(signal.SIGTERM)
        for p in (c,s): p.wait()
finally:
  echo.send_signal(signal.SIGTERM); echo.wait()
for k,v in res.items():
    print(WL, k.ljust(10),"med",round(st.median(x[0] for x in v),1),"p99 med",round(st.median(x[1] for x in v),1), "all", sorted(round(x[0]) for x in v))
