#!/bin/bash
# bulkpair.sh LABEL [tuning lines]: sink + warren server/client (setsid) + one bulk-up 1 GiB; prints MB/s and per-thread CPU (ms) of server and client
set -e
W=${WARREN_BIN_DIR:-/work/main/target/release}
L=$1; shift; EXTRA="$*"
D=/tmp/exp/$L; rm -rf $D; mkdir -p $D
cat > $D/server.toml <<E2
[server]
bind_addr = "127.0.0.1:47100"
transport = "tcp"
state_dir = "$D/state"
[server.clients.perf]
token = "0123456789abcdef0123456789abcdef"
[server.tuning]
$(echo -e "$EXTRA")
[server.services.sink]
bind_addr = "127.0.0.1:47111"
E2
cat > $D/client.toml <<E2
[client]
server_addr = "127.0.0.1:47100"
name = "perf"
token = "0123456789abcdef0123456789abcdef"
transport = "tcp"
[client.tuning]
$(echo -e "$EXTRA")
[client.services.sink]
local_addr = "127.0.0.1:47112"
E2
setsid $W/warren-load -q sink --listen 127.0.0.1:47112 > /dev/null 2>&1 & SINK=$!
setsid $W/warren server -c $D/server.toml --backend uring > $D/server.log 2>&1 & SRV=$!
sleep 0.5
setsid $W/warren client -c $D/client.toml --backend uring > $D/client.log 2>&1 & CLI=$!
sleep 1.5
$W/warren-load -q bulk --target 127.0.0.1:47111 --streams ${STREAMS:-1} --bytes ${BYTES:-1GiB} --direction up > $D/bulk.json
python3 -c "import json;j=json.load(open('$D/bulk.json'));print('MB/s', round(j['mb_per_s']))"
for p in $SRV $CLI; do for t in /proc/$p/task/*; do echo "$(cat $t/comm) $(awk '{print ($14+$15)*10 " ms"}' $t/stat)"; done | grep -v " 0 ms" | tr '\n' ';'; echo; done
kill $CLI $SRV $SINK; wait 2>/dev/null
