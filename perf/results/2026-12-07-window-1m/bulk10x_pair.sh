#!/bin/bash
# usage: bulk10x_pair.sh LABEL [extra tuning lines...]: starts a sink, a warren server and client
# (io_uring, plain TCP, the given [*.tuning] lines) and runs perf/compare's bulk-10x through them
# REPS times (default 3), printing MB/s, tunnel CPU s/GB (utime+stime of both processes, from
# /proc/PID/stat in USER_HZ = 100 ticks) and context switches per GB (all threads of both).
# STREAMS / BYTES change the transfer (10 / 100MiB); SETSID=1 starts the sink, the server and
# the client each under setsid (own session and autogroup, as perf/compare does); THREADS=1
# prints the CPU ms of every busy server and client thread at the end.
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
[server.services.sink]
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
[client.services.sink]
local_addr = "127.0.0.1:47002"
E2
SID=${SETSID:+setsid}
$SID $W/warren-load -q sink --listen 127.0.0.1:47002 > $D/sink.log 2>&1 & SINK=$!
$SID $W/warren server -c $D/server.toml --backend ${BACKEND:-uring} > $D/server.log 2>&1 & SRV=$!
sleep 0.5
$SID $W/warren client -c $D/client.toml --backend ${BACKEND:-uring} > $D/client.log 2>&1 & CLI=$!
sleep 1.5
snap() { for p in $SRV $CLI; do awk '{print $14+$15}' /proc/$p/stat; grep -h ctxt_switches /proc/$p/task/*/status | awk '{s+=$2} END {print s}'; done | paste -sd' '; }
PERFP=${PERFP:-}
for r in $(seq 1 ${REPS:-3}); do
A=$(snap)
if [ -n "$PERFP" ]; then perf stat -x, -e "syscalls:sys_enter_*" -e context-switches -e cpu-migrations -p ${PERFPID:-$SRV} -o $D/perf$r.txt & PP=$!; sleep 0.2; fi
$W/warren-load -q bulk --target 127.0.0.1:47001 --streams ${STREAMS:-10} --bytes ${BYTES:-100MiB} --direction up > $D/load$r.json
if [ -n "$PERFP" ]; then kill -INT $PP; wait $PP || true; cat $D/perf$r.txt | grep -v "^#" | grep -v "^$"; fi
B=$(snap)
python3 - "$A" "$B" $D/load$r.json <<'P'
import sys,json
a=list(map(float,sys.argv[1].split())); b=list(map(float,sys.argv[2].split()))
j=json.load(open(sys.argv[3])); mb=j.get("mb_per_s"); gb=j["bytes"]/1e9
tick=100  # USER_HZ
cpu=((b[0]-a[0])+(b[2]-a[2]))/tick
cs=(b[1]-a[1])+(b[3]-a[3])
print(f"MB/s {mb:8.0f}  cpu s/GB {cpu/gb:.3f} (srv {(b[0]-a[0])/tick/gb:.3f} cli {(b[2]-a[2])/tick/gb:.3f})  ctxsw/GB {cs/gb:8.0f}")
P
done
if [ -n "$THREADS" ]; then
  for p in $SRV $CLI; do for t in /proc/$p/task/*; do echo "$(cat $t/comm) $(awk '{print ($14+$15)*10 " ms"}' $t/stat)"; done | grep -v " 0 ms" | tr '\n' ';'; echo; done
fi
kill $CLI $SRV $SINK; wait 2>/dev/null
