"""`bench/serve_latency.py --quick` runs end to end against a real server, tiny model (no timing checks)."""

from pathlib import Path

from tests.bench.conftest import run_quick


def test_quick_run_writes_json_and_markdown(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "results"
    report = run_quick("serve_latency.py", out, "--model", str(tiny_model_dir), timeout=300)
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
