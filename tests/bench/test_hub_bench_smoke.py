"""`bench/hub_throughput.py --quick` runs end to end against a real `fedem hub serve` (no timing checks)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "hub_throughput.py"


def test_quick_run_writes_json_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--tmp", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "hub_throughput.json").read_text(encoding="utf-8"))
    assert (out / "hub_throughput.md").read_text(encoding="utf-8").startswith("# Hub throughput")

    assert report["settings"]["quick"] is True
    for key in ("cpu", "cores", "python", "date", "tmp_filesystem"):
        assert report["machine"][key]
    assert report["leases"]["round_trips"] > 0 and report["leases"]["refused_409"] == 0
    assert report["lease_race"]["round_trips"] > 0  # one adapter for all: some win, the rest get 409
    small, big = report["transfers"]
    assert small["bytes"] < big["bytes"]
    for transfer in (small, big):
        assert set(transfer["mb_per_s"]) == {"sha256sum", "hashlib_1mib", "copy", "upload", "download"}
        assert all(rate > 0 for rate in transfer["mb_per_s"].values())
        assert transfer["hub_peak_rss_mib"] > 0
    assert set(report["goals"]) >= {"upload_met", "download_met", "memory_flat"}
    assert list(tmp_path.iterdir()) == [out]  # the hub's folder and the test files are cleaned up
