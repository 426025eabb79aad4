#!/bin/bash
# usage: bulk10x_pair.sh LABEL [extra tuning lines...]: starts a sink, a warren server and client
# (io_uring, plain TCP, the given [*.tuning] lines) and runs perf/compare's bulk-10x through them
# REPS times (default 3), printing MB/s, tunnel CPU s/GB (utime+stime of both processes, from
# /proc/PID/stat in USER_HZ = 100 ticks) and context switches per GB (all threads of both).
set -e
W=${WARREN_BIN_DIR:-/work/main/target/release}
L=$1; shift
EXTRA="$*"
D=/tmp/exp/$L; rm -rf $D; mkdir -p $D
cat > $D/server.toml <<E2
[server]
bind_addr = "127.0.0.1:47000"
transport = "tcp"
state_dir = "$D/state"
[server.clients.perf]
token = "0123456789abcdef0123456789abcdef"
[server.tuning]
$(echo -e "$EXTRA")
[server.services.echo]
bind_addr = "127.0.0.1:47001"
E2
cat > $D/client.toml <<E2
[client]
server_addr = "127.0.0.1:47000"
name = "perf"
token = "0123456789abcdef0123456789abcdef"
transport = "tcp"
[client.tuning]
$(echo -e "$EXTRA")
[client.services.echo]
local_addr = "127.0.0.1:47002"
E2
$W/warren-load -q echo --listen 127.0.0.1:47002 > $D/sink.log 2>&1 & SINK=$!
$W/warren server -c $D/server.toml --backend ${BACKEND:-uring} > $D/server.log 2>&1 & SRV=$!
sleep 0.5
$W/warren client -c $D/client.toml --backend ${BACKEND:-uring} > $D/client.log 2>&1 & CLI=$!
sleep 1.5
if [ -n "$PSTAT" ]; then
  ( sleep 2; perf stat -x, -e "syscalls:sys_enter_*" -e context-switches -p $SRV -o $D/srv.stat -- sleep 1; perf stat -x, -e "syscalls:sys_enter_*" -e context-switches -p $CLI -o $D/cli.stat -- sleep 1 ) & SP=$!
fi
if [ -n "$SCHED" ]; then
  ( sleep 2; perf sched record -o $D/sched.data -- sleep 1 > /dev/null 2>&1 ) & SP=$!
fi
$W/warren-load -q rr --target 127.0.0.1:47001 --size 64 --connections 1 --duration-ms ${MS:-4000} --warmup-ms 500 > $D/rr.json
python3 -c "import json;j=json.load(open('$D/rr.json'));l=j['latency_us'];print('rr-1 p50',l.get('p50'),'p99',l.get('p99'),'rps',round(j['rps']))"
[ -n "$SP" ] && wait $SP
kill $CLI $SRV $SINK; wait 2>/dev/null
