#!/bin/bash
# connrate_cpu.sh LABEL: an echo, a warren (or with SYSTEM=rathole, rathole 0.5.0 TCP) server and client, each under setsid, and `warren-load connrate --total 20000 --concurrency 16` through them; prints conn/s and the CPU ms of the load generator (getrusage of the child), the echo, the server and the client over the run. TUNING adds lines to both [*.tuning] tables (warren); TARGET=127.0.0.1:47202 goes to the echo directly. LOAD=rr64 runs perf/compare's rr-64 (64 connections, 1 s warm-up + 5 s) instead, printing round trips/s.
set -e
W=${WARREN_BIN_DIR:-/work/main/target/release}
L=$1; D=/tmp/exp/$L; rm -rf $D; mkdir -p $D
cat > $D/server.toml <<E2
[server]
bind_addr = "127.0.0.1:47200"
transport = "tcp"
state_dir = "$D/state"
[server.clients.perf]
token = "0123456789abcdef0123456789abcdef"
[server.tuning]
$TUNING
[server.services.echo]
bind_addr = "127.0.0.1:47201"
E2
cat > $D/client.toml <<E2
[client]
server_addr = "127.0.0.1:47200"
name = "perf"
token = "0123456789abcdef0123456789abcdef"
transport = "tcp"
[client.tuning]
$TUNING
[client.services.echo]
local_addr = "127.0.0.1:47202"
E2
cpu() { awk '{print ($14+$15)*10}' /proc/$1/stat; }
setsid $W/warren-load -q echo --listen 127.0.0.1:47202 > /dev/null 2>&1 & E=$!
if [ "$SYSTEM" = rathole ]; then
RH=/root/.cache/warren-perf-tools/bin/rathole
printf '[server]\nbind_addr = "127.0.0.1:47200"\ndefault_token = "tok"\n[server.transport]\ntype = "tcp"\n[server.services.echo]\nbind_addr = "127.0.0.1:47201"\n' > $D/rs.toml
printf '[client]\nremote_addr = "127.0.0.1:47200"\ndefault_token = "tok"\n[client.transport]\ntype = "tcp"\n[client.services.echo]\nlocal_addr = "127.0.0.1:47202"\n' > $D/rc.toml
RUST_LOG=warn setsid $RH --server $D/rs.toml > $D/server.log 2>&1 & SRV=$!
sleep 0.5
RUST_LOG=warn setsid $RH --client $D/rc.toml > $D/client.log 2>&1 & CLI=$!
else
setsid $W/warren server -c $D/server.toml --backend uring > $D/server.log 2>&1 & SRV=$!
sleep 0.5
setsid $W/warren client -c $D/client.toml --backend uring > $D/client.log 2>&1 & CLI=$!
fi
sleep 1.5
TARGET=${TARGET:-127.0.0.1:47201}
e0=$(cpu $E); s0=$(cpu $SRV); c0=$(cpu $CLI)
python3 - "$W" "$TARGET" "$D" <<'PY'
import resource, subprocess, sys, json
w, target, d = sys.argv[1:4]
import os
load = ["rr", "--size", "64", "--connections", "64", "--duration-ms", "5000", "--warmup-ms", "1000"] \
    if os.environ.get("LOAD") == "rr64" else ["connrate", "--total", "20000", "--concurrency", "16"]
r = subprocess.run([f"{w}/warren-load", "-q", *load, "--target", target], capture_output=True, text=True)
u = resource.getrusage(resource.RUSAGE_CHILDREN)
j = json.loads(r.stdout)
open(f"{d}/lg.txt", "w").write(f"{j['rps']:.0f} {(u.ru_utime + u.ru_stime) * 1000:.0f}\n")
PY
read rps lg < $D/lg.txt
echo "$L $([ "$LOAD" = rr64 ] && echo rt/s || echo conn/s) $rps loadgen_ms $lg echo_ms $(( $(cpu $E) - e0 )) server_ms $(( $(cpu $SRV) - s0 )) client_ms $(( $(cpu $CLI) - c0 ))"
kill $CLI $SRV $E; wait 2>/dev/null
