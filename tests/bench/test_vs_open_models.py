"""`bench/vs_open_models.py` reuses a reference model's figures only when nothing they depend on
changed: the key over model file, lines, settings, versions and fedem's evaluation code."""

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import vs_open_models as bench  # bench/ is on the path (tests/bench/conftest.py)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def args(tmp_path: Path) -> argparse.Namespace:
    """The bench's settings over a copy of two languages' held-out lines and test pairs."""
    mono, pairs = tmp_path / "mono", tmp_path / "parallel"
    mono.mkdir()
    pairs.mkdir()
    for code in ("en", "hi"):
        shutil.copy(REPO / "data" / "mono" / f"{code}.valid.txt", mono)
    shutil.copy(REPO / "data" / "parallel" / "en-hi.test.tsv", pairs)
    return bench.parse_args(
        ["--mono", str(mono), "--pairs", str(pairs), "--max-lines", "4", "--max-pairs", "4"]
    )


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF weights")
    return path


def test_fedem_imports_follow_evaluate_through_the_package() -> None:
    files = {str(p.relative_to(bench.SOURCE)) for p in bench.fedem_imports("fedem.evaluate")}
    assert {"fedem/evaluate.py", "fedem/loss.py", "fedem/generate.py", "fedem/model/load.py"} <= files
    assert "fedem/model/mixer.py" in files  # indirect: load → seshu → mixer
    assert not any(name.startswith(("fedem/hub/", "fedem/client/", "fedem/sim/")) for name in files)


def test_reference_key_changes_with_each_input(args: argparse.Namespace, model: Path) -> None:
    key = bench.reference_key(model, args)
    assert bench.reference_key(model, args) == key  # deterministic

    changed: list[str] = []
    changed.append(bench.reference_key(model, argparse.Namespace(**{**vars(args), "max_lines": 3})))
    changed.append(bench.reference_key(model, argparse.Namespace(**{**vars(args), "translate_pairs": 9})))
    model.write_bytes(b"GGUF weights, requantised")
    changed.append(bench.reference_key(model, args))
    model.write_bytes(b"GGUF weights")
    held_out = args.mono / "hi.valid.txt"
    lines = held_out.read_text(encoding="utf-8").splitlines()
    held_out.write_text("\n".join(["एक नई पंक्ति", *lines[1:]]) + "\n", encoding="utf-8")
    changed.append(bench.reference_key(model, args))
    held_out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert bench.reference_key(model, args) == key  # the same inputs again: the same key
    assert len(set(changed)) == len(changed) and key not in changed

    # A line past --max-lines is not evaluated, so it does not change the key.
    held_out.write_text("\n".join([*lines[:4], "ignored", *lines[5:]]) + "\n", encoding="utf-8")
    assert bench.reference_key(model, args) == key


def _leaderboard(folder: Path, key: str) -> dict[str, Any]:
    entry = {"model": "m.gguf", "reference_key": key, "measured": {"date": "2026-11-25", "cpu": "AMD EPYC"}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "leaderboard.json").write_text(json.dumps({"models": {bench.SMOLLM2: entry}}), encoding="utf-8")
    return entry


def test_previous_figures_only_under_the_same_key(tmp_path: Path) -> None:
    assert bench.previous_figures(tmp_path, bench.SMOLLM2, "abc") is None  # no earlier run
    entry = _leaderboard(tmp_path, "abc")
    assert bench.previous_figures(tmp_path, bench.SMOLLM2, "abc") == entry
    assert bench.previous_figures(tmp_path, bench.SMOLLM2, "abd") is None
    assert bench.previous_figures(tmp_path, "Llama-small", "abc") is None


def test_reused_figures_are_footnoted_with_their_run() -> None:
    now = {"date": "2026-11-26", "cpu": "Intel Xeon"}
    report = {
        "machine": now,
        "models": {
            "Seshu-small": {"measured": now},
            bench.SMOLLM2: {"measured": {"date": "2026-11-25", "cpu": "AMD EPYC"}},
        },
    }
    note = "\n".join(bench.reused_note(report))
    assert bench.SMOLLM2 in note and "2026-11-25" in note and "AMD EPYC" in note
    report["models"][bench.SMOLLM2]["measured"] = now
    assert bench.reused_note(report) == []
