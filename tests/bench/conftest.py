"""The benchmarks import each other by module name (`from machine import machine_info`), as they do
when run as scripts from `bench/`: put that folder on the path for the tests that load them."""

import sys
from pathlib import Path

BENCH = str(Path(__file__).resolve().parents[2] / "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
