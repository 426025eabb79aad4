#!/bin/bash
# chain.sh LABEL [conn_relay args]: sink <- relay B <- relay A, bulk-10x through A, REPS times
W=/work/main/target/release
L=$1; shift
D=/tmp/exp/chain-$L; rm -rf $D; mkdir -p $D
$W/warren-load -q sink --listen 127.0.0.1:48002 > $D/sink.log 2>&1 & SINK=$!
$W/conn_relay --listen 127.0.0.1:48001 --to 127.0.0.1:48002 "$@" > $D/b.log 2> $D/b.err & B=$!
$W/conn_relay --listen 127.0.0.1:48000 --to 127.0.0.1:48001 "$@" > $D/a.log 2> $D/a.err & A=$!
sleep 0.5
snap() { for p in $A $B; do awk '{print $14+$15}' /proc/$p/stat; done | paste -sd' '; }
for r in $(seq 1 ${REPS:-3}); do
X=$(snap)
if [ -n "$PERFP" ]; then perf stat -x, -e "syscalls:sys_enter_*" -e context-switches -e cpu-migrations -p $A -o $D/perf$r.txt & PP=$!; sleep 0.3; fi
$W/warren-load -q bulk --target 127.0.0.1:48000 --streams ${STREAMS:-10} --bytes ${BYTES:-100MiB} --direction up > $D/load$r.json
Y=$(snap)
if [ -n "$PERFP" ]; then kill -INT $PP; wait $PP || true; awk -F, '$1>0' $D/perf$r.txt | sort -t, -k1 -nr | head -8; fi
python3 - "$X" "$Y" $D/load$r.json <<'P'
import sys,json
a=list(map(float,sys.argv[1].split())); b=list(map(float,sys.argv[2].split()))
j=json.load(open(sys.argv[3])); mb=j.get("mb_per_s"); gb=j["bytes"]/1e9
print(f"MB/s {mb:8.0f}  cpu s/GB {((b[0]-a[0])+(b[1]-a[1]))/100/gb:.3f} (A {(b[0]-a[0])/100/gb:.3f} B {(b[1]-a[1])/100/gb:.3f})")
P
done
kill $A $B $SINK; wait 2>/dev/null
cat $D/a.err | head -3
