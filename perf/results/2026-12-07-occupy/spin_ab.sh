#!/bin/bash
# spin_ab.sh ROUNDS: rr-1 variants interleaved, SETSID=1
S=/work/main/perf/results/2026-12-07-rr1-layout/rr1_pair.sh
spin_on() { setsid nice -n 19 taskset -c $1 sh -c 'while :; do :; done' > /dev/null 2>&1 & echo $!; }
for r in $(seq 1 ${1:-3}); do
  echo "r$r base $(SETSID=1 $S b$r 2>&1 | tail -1)"
  echo "r$r core0 $(SETSID=1 $S c$r 'cores = [0]' 2>&1 | tail -1)"
  echo "r$r core0-nopoll $(SETSID=1 $S d$r 'cores = [0]\nbusy_poll_us = 0' 2>&1 | tail -1)"
  P=$(spin_on 1); sleep 0.2
  echo "r$r core0-nopoll+spin1 $(SETSID=1 $S e$r 'cores = [0]\nbusy_poll_us = 0' 2>&1 | tail -1)"
  echo "r$r core0-poll+spin1 $(SETSID=1 $S f$r 'cores = [0]' 2>&1 | tail -1)"
  kill $P; wait $P 2>/dev/null
done
