"""Probes the three public ports of rr1_pair.sh (ALL3=1) once each, as perf/compare's
wait_functional does before a system's first workload."""
import os
import sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "lib"))
from common import wait_functional  # noqa: E402
print("probes:", wait_functional({"echo": 47001, "sink": 47011, "http": 47021}, timeout=15))
