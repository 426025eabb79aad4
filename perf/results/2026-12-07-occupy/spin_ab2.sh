#!/bin/bash
S=/work/main/perf/results/2026-12-07-rr1-layout/rr1_pair.sh
sp() { setsid /tmp/s21/spinner "$@" > /dev/null 2>&1 & echo $!; }
T='cores = [0]\nbusy_poll_us = 0'
for r in $(seq 1 ${1:-3}); do
  P=$(sp 1 other 19 0); sleep 0.2; echo "r$r nopoll+spin-n19 $(SETSID=1 $S a$r "$T" 2>&1 | tail -1)"; kill $P
  P=$(sp 1 other 19 1); sleep 0.2; echo "r$r nopoll+spin-n19-yield $(SETSID=1 $S b$r "$T" 2>&1 | tail -1)"; kill $P
  P=$(sp 1 idle 0 1); sleep 0.2; echo "r$r nopoll+spin-idle-yield $(SETSID=1 $S c$r "$T" 2>&1 | tail -1)"; kill $P
  echo "r$r base-2shards $(SETSID=1 $S d$r 2>&1 | tail -1)"
done
