#!/bin/bash
# usage: rr1_pair.sh LABEL [extra tuning lines...]: starts a warren-load echo, a warren server and
# client (io_uring, plain TCP, the given [*.tuning] lines; services echo, sink and http) and runs
# `warren-load rr --size 64 --connections 1` through the echo service, printing p50/p99/rps.
# Environment: MS / WARM the run's duration and warm-up in ms (4000 / 500); SETSID=1 starts the
# echo, the server and the client each under setsid (own session, own autogroup, as perf/compare
# and systemd do; without it all share this script's session); ALL3=1 also starts sink and http
# backends and probes the three public ports first (probe3.py, as perf/compare does); SCHED=1
# records `perf sched` for 1 s of the run, PSTAT=1 `perf stat` of syscalls for 1 s of each
# process, PREC=1 `perf record -a -g` for 2 s of it. LOAD=connrate runs `warren-load connrate
# --total $TOTAL (20000) --concurrency 16` instead of rr and prints conn/s (PREC then starts
# 0.3 s in). SX / CX add tuning lines to the server's / the client's table only; SENV / CENV are
# environment assignments (VAR=value ...) for the server / the client alone. THREADS=1 prints
# the CPU time and last CPU of every shard and keep-awake thread at the end. PRE_BULK=1 (with
# ALL3=1) first sends 10 x 100 MiB through the sink service, as perf/compare's bulk-10x runs
# before rr-1. PORT_BASE (47000) moves every port by the same offset; keep it outside
# net.ipv4.ip_local_port_range, or an outgoing connection can hold a port first. LGCPU=n pins the rr load generator to cpu n (taskset). Output under
# /tmp/exp/LABEL.
set -e
SID=${SETSID:+setsid}
W=${WARREN_BIN_DIR:-/work/main/target/release}
L=$1; shift
P=${PORT_BASE:-47000}
EXTRA="$*"
D=/tmp/exp/$L; rm -rf $D; mkdir -p $D
cat > $D/server.toml <<E2
[server]
bind_addr = "127.0.0.1:$((P))"
transport = "tcp"
state_dir = "$D/state"
[server.clients.perf]
token = "0123456789abcdef0123456789abcdef"
[server.tuning]
$(echo -e "$EXTRA\n$SX")
[server.services.echo]
bind_addr = "127.0.0.1:$((P+1))"
[server.services.sink]
bind_addr = "127.0.0.1:$((P+11))"
[server.services.http]
bind_addr = "127.0.0.1:$((P+21))"
E2
cat > $D/client.toml <<E2
[client]
server_addr = "127.0.0.1:$((P))"
name = "perf"
token = "0123456789abcdef0123456789abcdef"
transport = "tcp"
[client.tuning]
$(echo -e "$EXTRA\n$CX")
[client.services.echo]
local_addr = "127.0.0.1:$((P+2))"
[client.services.sink]
local_addr = "127.0.0.1:$((P+12))"
[client.services.http]
local_addr = "127.0.0.1:$((P+22))"
E2
$SID $W/warren-load -q echo --listen 127.0.0.1:$((P+2)) > $D/sink.log 2>&1 & SINK=$!
if [ -n "$ALL3" ]; then $W/warren-load -q sink --listen 127.0.0.1:$((P+12)) > /dev/null 2>&1 & S2=$!; $W/warren-load -q http --listen 127.0.0.1:$((P+22)) > /dev/null 2>&1 & S3=$!; fi
$SID env $SENV $W/warren server -c $D/server.toml --backend ${BACKEND:-uring} > $D/server.log 2>&1 & SRV=$!
sleep 0.5
$SID env $CENV $W/warren client -c $D/client.toml --backend ${BACKEND:-uring} > $D/client.log 2>&1 & CLI=$!
sleep 1.5
if [ -n "$ALL3" ]; then python3 "$(dirname "$0")/probe3.py" $P; fi
if [ -n "$PSTAT" ]; then
  ( sleep 2; perf stat -x, -e "syscalls:sys_enter_*" -e context-switches -p $SRV -o $D/srv.stat -- sleep 1; perf stat -x, -e "syscalls:sys_enter_*" -e context-switches -p $CLI -o $D/cli.stat -- sleep 1 ) & SP=$!
fi
if [ -n "$PREC" ]; then
  AT=2; [ "$LOAD" = connrate ] && AT=0.3
  ( sleep $AT; perf record -a -g -o $D/perf.data -- sleep 2 > /dev/null 2>&1 ) & SP=$!
fi
if [ -n "$SCHED" ]; then
  ( sleep ${SCHED_AT:-2}; perf sched record -o $D/sched.data -- sleep ${SCHED_SECS:-1} > /dev/null 2>&1 ) & SP=$!
fi
if [ "$LOAD" = connrate ]; then
  $W/warren-load -q connrate --target 127.0.0.1:$((P+1)) --total ${TOTAL:-20000} --concurrency 16 > $D/rr.json
  python3 -c "import json;j=json.load(open('$D/rr.json'));print('connrate', round(j['rps']), 'p50', (j['latency_us'] or {}).get('p50'), 'errors', j.get('errors'))" || true
else
  if [ -n "$PRE_BULK" ]; then $W/warren-load -q bulk --target 127.0.0.1:$((P+11)) --streams 10 --bytes 100MiB --direction up > /dev/null; fi
  ${LGCPU:+taskset -c $LGCPU} $W/warren-load -q rr --target 127.0.0.1:$((P+1)) --size 64 --connections 1 --duration-ms ${MS:-4000} --warmup-ms ${WARM:-500} > $D/rr.json
  python3 -c "import json;j=json.load(open('$D/rr.json'));l=j['latency_us'];print('rr-1 p50',l.get('p50'),'p99',l.get('p99'),'rps',round(j['rps']))"
fi
[ -n "$SP" ] && wait $SP
if [ -n "$THREADS" ]; then
  for p in $SRV $CLI; do for t in /proc/$p/task/*; do
    awk -v c="$(cat $t/comm)" '{print "  " c, "cpu_ms=" ($14+$15)*10, "last_cpu=" $39}' $t/stat; done; done | grep -E "uring|awake"
fi
kill $CLI $SRV $SINK $S2 $S3; wait 2>/dev/null
