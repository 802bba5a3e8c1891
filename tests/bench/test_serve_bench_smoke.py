"""`bench/serve_latency.py --quick` runs end to end against a real server, tiny model (no timing checks)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "serve_latency.py"


def test_quick_run_writes_json_and_markdown(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--model", str(tiny_model_dir), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "serve_latency.json").read_text(encoding="utf-8"))
    assert (out / "serve_latency.md").read_text(encoding="utf-8").startswith("# Serve latency")

    assert report["settings"]["quick"] is True
    for key in ("cpu", "cores", "python", "torch", "date"):
        assert report["machine"][key]
    assert report["parameters"] > 0 and report["prompt_tokens"] > 0
    assert [level["streams"] for level in report["levels"]] == [1, 8]
    for level in report["levels"]:
        assert level["completion_tokens"] > 0
        assert 0 < level["ttft_s"]["min"] <= level["ttft_s"]["max"]
        assert level["aggregate_tokens_per_s"] > 0
