"""The benchmarks import each other by module name (`from machine import machine_info`), as they do
when run as scripts from `bench/`: put that folder on the path for the tests that load them."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BENCH = str(REPO / "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)


def run_quick(script: str, out: Path, *args: str, timeout: int = 600) -> dict[str, Any]:
    """`bench/<script> --quick --out OUT ARGS…` in a child process, as a person would run it; its JSON
    report, once it exited 0 and wrote its Markdown beside."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--quick", "--out", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stem = Path(script).stem
    assert (out / f"{stem}.md").is_file()
    report: dict[str, Any] = json.loads((out / f"{stem}.json").read_text(encoding="utf-8"))
    return report
