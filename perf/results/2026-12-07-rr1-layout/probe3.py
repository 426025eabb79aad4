"""Probes the three public ports of rr1_pair.sh (ALL3=1) once each, as perf/compare's
wait_functional does before a system's first workload."""
import os
import sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "lib"))
from common import wait_functional  # noqa: E402
P = int(sys.argv[1]) if len(sys.argv) > 1 else 47000
print("probes:", wait_functional({"echo": P + 1, "sink": P + 11, "http": P + 21}, timeout=15))
