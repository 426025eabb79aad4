#!/bin/sh
# rr-1 through one warren pair (placement.py), tuning variants interleaved: ROUNDS rounds, RUNS
# 4 s runs (fresh connections) per variant and round. usage: rr1_variants.sh ROUNDS RUNS
here=$(dirname "$0")
for r in $(seq 1 "$1"); do
  echo "## round $r default"; python3 "$here/placement.py" 31000 "$2"
  echo "## round $r ownpoll"; TUNING="busy_poll_other_cores = false" python3 "$here/placement.py" 31100 "$2"
  echo "## round $r otherpoll"; TUNING="busy_poll_sched_idle = false" python3 "$here/placement.py" 31200 "$2"
  echo "## round $r own+other"; TUNING="busy_poll_other_cores = false; busy_poll_sched_idle = false" python3 "$here/placement.py" 31300 "$2"
  echo "## round $r nopoll"; TUNING="busy_poll_us = 0" python3 "$here/placement.py" 31400 "$2"
  echo "## round $r spread"; CLIENT_TUNING="cores = [1, 0]" python3 "$here/placement.py" 31500 "$2"
  echo "## round $r spread+ownpoll"; TUNING="busy_poll_other_cores = false" CLIENT_TUNING="cores = [1, 0]" python3 "$here/placement.py" 31600 "$2"
done
