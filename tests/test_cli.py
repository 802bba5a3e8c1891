"""The CLI's contract: user mistakes are one line on stderr and exit code 2, never a traceback."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedem.cli import main
from fedem.provenance import write_provenance


def _fails_cleanly(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("fedem: error: ") and expected in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_missing_file(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path) -> None:
    _fails_cleanly(
        capsys,
        [
            "finetune",
            "--base",
            str(tiny_model_dir),
            "--pairs",
            str(tmp_path / "nope.tsv"),
            "--out",
            str(tmp_path),
        ],
        "no such file",
    )


def test_unknown_language_code(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _fails_cleanly(
        capsys,
        ["pretrain", "--config", "configs/seshu-tiny.yaml", "--languages", "hi,xx", "--out", str(tmp_path)],
        "unknown language code 'xx'",
    )


def test_malformed_tsv_line(capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "en-hi.tsv"
    pairs.write_text("hello\tनमस्ते\nonly one field\n", encoding="utf-8")
    _fails_cleanly(
        capsys,
        ["finetune", "--base", str(tiny_model_dir), "--pairs", str(pairs), "--out", str(tmp_path / "a")],
        f"{pairs}:2:",
    )


def test_unknown_config_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _fails_cleanly(
        capsys, ["pretrain", "--config", "configs/seshu-tiny.yaml", "train.bogus=1"], "train.bogus"
    )


def test_adapter_for_another_base(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    write_provenance(adapter, "finetune", {}, base_sha256="0" * 64)
    _fails_cleanly(
        capsys,
        ["merge", "--base", str(tiny_model_dir), "--adapters", str(adapter), "--out", str(tmp_path / "m")],
        "trained on another base",
    )


def test_corrupt_checkpoint_exits_2_in_a_real_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    result = subprocess.run(
        [sys.executable, "-m", "fedem.cli", "generate", "--model", str(broken), "--prompt", "hi"],
        capture_output=True,
        text=True,
    )

    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("fedem: error: cannot load checkpoint")
    assert "Traceback" not in result.stderr
