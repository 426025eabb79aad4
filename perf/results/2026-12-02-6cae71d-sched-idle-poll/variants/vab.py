import os, sys, json, subprocess, time, signal, statistics as st
L="/work/main/target/release/warren-load"; B="/tmp/tgt-exp/release/warren"
TOKEN="warren-perf-token-0123456789abcdef"
VARS={"head":{}, "sleepidle":{"EXP_SLEEP_IDLE":"1"}, "noprobe":{"EXP_NO_PROBE":"1"}, "both":{"EXP_SLEEP_IDLE":"1","EXP_NO_PROBE":"1"}, "chrt":"chrt"}
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
        out=subprocess.run([L,"rr","--target",f"127.0.0.1:{port+2}","--duration-ms","4000","--warmup-ms","500"],capture_output=True,text=True).stdout
        l=json.loads(out.strip().splitlines()[-1])["latency_us"]
        res[name].append((l["p50"],l["p99"])); print(r,name,round(l["p50"],1),round(l["p99"],1),flush=True)
        for p in (c,s): p.send_signal(signal.SIGTERM)
        for p in (c,s): p.wait()
finally:
  echo.send_signal(signal.SIGTERM); echo.wait()
for k,v in res.items():
    print(k.ljust(10),"p50 med",round(st.median(x[0] for x in v),1),"p99 med",round(st.median(x[1] for x in v),1), "p50s", sorted(round(x[0]) for x in v))
