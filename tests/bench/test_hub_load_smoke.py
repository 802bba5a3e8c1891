"""`bench/hub_load.py --quick` runs end to end against a real `fedem hub serve` (no timing checks)."""

from pathlib import Path

from tests.bench.conftest import run_quick


def test_quick_load_run_checks_the_invariants_and_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results"
    report = run_quick("hub_load.py", out, "--tmp", str(tmp_path), timeout=300)
    assert (out / "hub_load.md").read_text(encoding="utf-8").startswith("# Hub under load")

    assert report["settings"]["quick"] is True and report["settings"]["database"] == "SQLite"
    for key in ("cpu", "cores", "python", "date"):
        assert report["machine"][key]
    assert report["errors"] == []
    assert report["invariants"]["ok"] is True
    assert report["invariants"]["versions"] == report["throughput"]["pushes"] > 0
    assert set(report["operations"]) >= {"lease", "pull", "push"}
    assert all(row["p99_ms"] >= row["p50_ms"] > 0 for row in report["operations"].values())
    assert list(tmp_path.iterdir()) == [out]  # the hub's folder is cleaned up
