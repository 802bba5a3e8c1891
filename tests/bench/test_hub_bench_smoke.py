"""`bench/hub_throughput.py --quick` runs end to end against a real `fedem hub serve` (no timing checks)."""

from pathlib import Path

from tests.bench.conftest import run_quick


def test_quick_run_writes_json_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "results"
    report = run_quick("hub_throughput.py", out, "--tmp", str(tmp_path), timeout=300)
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
