#!/bin/bash
# usage: slowtest.sh LABEL LGCPU ENV...: rr-1 with the load generator pinned; prints the layout
L=$1; C=$2; shift 2
R=/work/main/perf/results/2026-12-07-rr1-layout/rr1_pair.sh
out=$(SENV="$*" CENV="$*" LGCPU=$C THREADS=1 SETSID=1 MS=4000 bash $R $L 'busy_poll_other_cores = "occupy"')
rr=$(echo "$out" | grep rr-1)
# the server shard that carried the session: the uring thread with the most CPU
act=$(echo "$out" | grep server-uring | sort -t= -k2 -n -r | head -1 | sed -E 's/.*last_cpu=([0-9]+)/\1/')
lay=$([ "$act" = "$C" ] && echo together || echo apart)
echo "$L lg=cpu$C session=cpu$act $lay $rr"
