#!/bin/sh
here=/work/main/perf/results/2026-12-02-970081f-amd-host
for r in 1 2 3; do
  echo "## round $r auto (default)"; python3 "$here/placement.py" 31000 3
  echo "## round $r true"; TUNING="busy_poll_other_cores = true" python3 "$here/placement.py" 31100 3
  echo "## round $r false"; TUNING="busy_poll_other_cores = false" python3 "$here/placement.py" 31200 3
done
