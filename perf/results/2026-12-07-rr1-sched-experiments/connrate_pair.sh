#!/bin/bash
# usage: connrate_pair.sh LABEL [extra tuning lines...]: rr1_pair.sh (../2026-12-07-rr1-layout/) with
# `warren-load connrate --total $TOTAL (20000) --concurrency 16` through the echo service instead
# of rr, printing conn/s. PREC=1 records `perf record -a -g` for 2 s of it (0.3 s in);
# PSTAT2=1 `perf stat -a` of context switches and io_uring_enter calls. SETSID, ALL3 and
# WARREN_BIN_DIR as in rr1_pair.sh. Output under /tmp/exp/LABEL.
set -e
SID=${SETSID:+setsid}
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
[server.services.sink]
bind_addr = "127.0.0.1:47011"
[server.services.http]
bind_addr = "127.0.0.1:47021"
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
[client.services.sink]
local_addr = "127.0.0.1:47012"
[client.services.http]
local_addr = "127.0.0.1:47022"
E2
$SID $W/warren-load -q echo --listen 127.0.0.1:47002 > $D/sink.log 2>&1 & SINK=$!
if [ -n "$ALL3" ]; then $W/warren-load -q sink --listen 127.0.0.1:47012 > /dev/null 2>&1 & S2=$!; $W/warren-load -q http --listen 127.0.0.1:47022 > /dev/null 2>&1 & S3=$!; fi
$SID $W/warren server -c $D/server.toml --backend ${BACKEND:-uring} > $D/server.log 2>&1 & SRV=$!
sleep 0.5
$SID $W/warren client -c $D/client.toml --backend ${BACKEND:-uring} > $D/client.log 2>&1 & CLI=$!
sleep 1.5
if [ -n "$ALL3" ]; then python3 "$(dirname "$0")/../2026-12-07-rr1-layout/probe3.py"; fi
if [ -n "$PSTAT" ]; then
  ( sleep 2; perf stat -x, -e "syscalls:sys_enter_*" -e context-switches -p $SRV -o $D/srv.stat -- sleep 1; perf stat -x, -e "syscalls:sys_enter_*" -e context-switches -p $CLI -o $D/cli.stat -- sleep 1 ) & SP=$!
fi
if [ -n "$SCHED" ]; then
  ( sleep 2; perf sched record -o $D/sched.data -- sleep 1 > /dev/null 2>&1 ) & SP=$!
fi
$W/warren-load -q connrate --target 127.0.0.1:47001 --total ${TOTAL:-20000} --concurrency 16 > $D/rr.json & LG=$!; if [ -n "$PREC" ]; then sleep 0.3; perf record -a -g -o $D/perf.data -- sleep 2 > /dev/null 2>&1; fi; if [ -n "$PSTAT2" ]; then sleep 0.3; perf stat -a -e context-switches,cpu-clock,syscalls:sys_enter_io_uring_enter -o $D/stat.txt -- sleep 2; fi; wait $LG
python3 -c "import json;j=json.load(open('$D/rr.json'));l=j['latency_us'];print('connrate', round(j['rps']), 'p50', l.get('p50'))"
[ -n "$SP" ] && wait $SP
kill $CLI $SRV $SINK $S2 $S3; wait 2>/dev/null
