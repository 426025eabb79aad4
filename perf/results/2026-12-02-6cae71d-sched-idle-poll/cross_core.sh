#!/bin/sh
# Direct rr-1 (no tunnel) with the load generator and the echo backend pinned to the same CPU or
# to different CPUs, with and without awake_spin (no CPU halts): the cost of a cross-core wake-up.
L=$(dirname "$0")/../../../target/release/warren-load
S=$(dirname "$0")/../../../target/release/awake_spin
date -u +%FT%TZ
taskset -c 0 "$L" echo --listen 127.0.0.1:29001 >/dev/null 2>&1 & E0=$!
taskset -c 1 "$L" echo --listen 127.0.0.1:29002 >/dev/null 2>&1 & E1=$!
sleep 0.3
rr() { taskset -c 0 "$L" rr --target 127.0.0.1:$1 --duration-ms 3000 --warmup-ms 300 2>/dev/null |
  python3 -c "import json,sys; l=json.load(sys.stdin)['latency_us']; print('$2', 'p50', round(l['p50'],1), 'p90', round(l['p90'],1), 'p99', round(l['p99'],1))"; }
for k in 1 2 3; do rr 29001 "same-core  (load 0, echo 0)"; rr 29002 "cross-core (load 0, echo 1)"; done
"$S" >/dev/null & SP=$!
sleep 0.3
for k in 1 2 3; do rr 29001 "same-core  + awake_spin"; rr 29002 "cross-core + awake_spin"; done
kill $SP $E0 $E1
wait 2>/dev/null
