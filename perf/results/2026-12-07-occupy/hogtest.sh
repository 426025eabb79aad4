#!/bin/bash
# usage: hogtest.sh LABEL NICE|false|none : hogs pinned on cpu0 and cpu1 for 3 s during an rr-1 run
L=$1; M=$2
R=/work/main/perf/results/2026-12-07-rr1-layout/rr1_pair.sh
( sleep 4.2; setsid ./hog 0 3 > /tmp/s22/$L.h0 & setsid ./hog 1 3 > /tmp/s22/$L.h1; wait ) & H=$!
if [ "$M" = none ]; then sleep 8; echo "no tunnel"; 
elif [ "$M" = false ]; then MS=6000 WARM=500 SETSID=1 bash $R $L 'busy_poll_other_cores = false'
else SENV="WARREN_EXP_OCCUPY_NICE=$M" CENV="WARREN_EXP_OCCUPY_NICE=$M" MS=6000 WARM=500 SETSID=1 bash $R $L 'busy_poll_other_cores = "occupy"'; fi
wait $H
echo "$L $(cat /tmp/s22/$L.h0) $(cat /tmp/s22/$L.h1)"
