"""`bench/gpu.py` without a GPU: it refuses clearly, a failing job comes back as an error row, and its
report renders a results file (the committed H100 run) with failed and measured rows alike."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.bench.conftest import REPO

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


def test_refuses_without_a_gpu(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "bench/gpu.py needs a CUDA device"
    assert not list(tmp_path.iterdir())


def test_a_failing_job_is_an_error_row() -> None:
    import gpu

    job = {"kind": "train", "size": "small", "path": "llama", "length": 64, "batch": 1, "quick": True}
    assert gpu.child(job | {"warmup": 1, "steps": 1}) == {"error": "AssertionError: needs a CUDA device"}


def test_report_renders_measured_and_failed_rows() -> None:
    import gpu

    results = json.loads((REPO / "bench" / "results" / "gpu.json").read_text(encoding="utf-8"))
    text = gpu.report(results, results["machine"])
    assert text.startswith("# GPU: Seshu on mamba-ssm's kernels")
    rows = [line for line in text.splitlines() if line.startswith("| small | 512 |")]
    assert [row.split(" | ")[2] for row in rows] == ["llama", "kernels", "fedem"]
    assert "failed:" in rows[1] and "| 1.00× |" in rows[0]
    llama, fedem = rows[0], rows[2]
    assert f"{fedem_ratio(results):.2f}×" in fedem and llama != fedem


def fedem_ratio(results: dict) -> float:
    """Seshu's fedem path over the Llama at L=512 in `results`, as the report should print it."""
    by_path = {r["path"]: r for r in results["train"] if r["size"] == "small" and r["length"] == 512}
    return float(by_path["fedem"]["tokens_per_s"] / by_path["llama"]["tokens_per_s"])
