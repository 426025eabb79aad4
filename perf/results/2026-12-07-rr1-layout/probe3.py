"""Probes the three public ports of rr1_pair.sh (ALL3=1) once each, as perf/compare's
wait_functional does before a system's first workload."""
import sys
sys.path.insert(0, "/work/main/perf/lib")
from common import wait_functional  # noqa: E402
print("probes:", wait_functional({"echo": 47001, "sink": 47011, "http": 47021}, timeout=15))
