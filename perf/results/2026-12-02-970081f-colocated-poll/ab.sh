#!/bin/sh
# Interleaved rr-1 A/B: head (target/release/warren) against the experiment binary with
# WARREN_EXP_SKIP=1, ROUNDS rounds of a fresh pair with RUNS 4 s runs each (placement.py).
# usage: ab.sh EXP_BINARY ROUNDS RUNS
here=$(dirname "$0")
for r in $(seq 1 "$2"); do
  echo "## round $r head"
  python3 "$here/placement.py" 31000 "$3"
  echo "## round $r exp"
  WARREN_EXP_SKIP=1 WARREN_BIN="$1" python3 "$here/placement.py" 31100 "$3"
done
