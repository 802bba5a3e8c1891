"""`bench/generation_latency.py`, `bench/lora_finetune.py`, `bench/finetune_batching.py` and
`bench/scoring_forward.py` run end to end with `--quick` (tiny models) and write their reports; figures
are checked for shape and sense, never for speed."""

from pathlib import Path
from typing import Any

import pytest

from tests.bench.conftest import run_quick


def run_bench(script: str, out: Path) -> dict[str, Any]:
    report = run_quick(script, out, timeout=300)
    for key in ("cpu", "cores", "torch", "date"):
        assert report["machine"][key]
    return report


@pytest.mark.slow
def test_generation_latency_quick(tmp_path: Path) -> None:
    report = run_bench("generation_latency.py", tmp_path)
    # the Llama baseline is matched to Seshu's size within one layer's worth of parameters
    assert abs(report["params"]["llama"] - report["params"]["seshu"]) / report["params"]["seshu"] < 0.25
    for name in ("seshu", "llama"):
        assert [(r["prompt"], r["batch"]) for r in report["rows"][name]] == [(16, 1), (64, 1), (64, 4)]
        assert all(r["ms_per_token"] > 0 and r["prefill_s"] > 0 for r in report["rows"][name])
    assert report["targets"][0]["what"].startswith("Seshu ms/token after 64 tokens")


@pytest.mark.slow
def test_lora_finetune_quick(tmp_path: Path) -> None:
    report = run_bench("lora_finetune.py", tmp_path)
    assert 0 < report["trainable"] < report["parameters"]
    assert report["trainable_share"] == pytest.approx(report["trainable"] / report["parameters"], abs=1e-5)
    assert 0 < report["bytes"]["adapter"] < report["bytes"]["full_checkpoint"]
    speed = report["tokens_per_s"]
    assert all(speed[name] > 0 for name in ("full", "lora", "lora_peft_layer", "frozen_base"))
    assert report["ceiling"] == pytest.approx(speed["frozen_base"] / speed["full"], abs=1e-3)


@pytest.mark.slow
def test_finetune_batching_quick(tmp_path: Path) -> None:
    report = run_bench("finetune_batching.py", tmp_path)
    shares = report["shares"]
    # grouped rows are hardly padded; random ones are, and the loss counts only part of the text
    assert shares["grouped"]["text"] > 0.9 > shares["random"]["text"]
    assert all(0 < share["labelled"] < share["text"] for share in shares.values())
    assert [len(widths) for widths in report["widths"].values()] == [report["steps"]] * 2
    assert all(value > 0 for value in report["text_tokens_per_s"].values())


@pytest.mark.slow
def test_scoring_forward_quick(tmp_path: Path) -> None:
    report = run_bench("scoring_forward.py", tmp_path)
    assert report["built"]  # the C loop builds wherever the suite runs (CI has a C compiler)
    assert [row["what"] for row in report["rows"]] == ["whole forward, L=64", "one layer's scan, L=64"]
    for row in report["rows"]:
        assert row["seconds"]["C loop"] > 0 and row["seconds"]["torch"] > 0 and row["speedup"] > 0
