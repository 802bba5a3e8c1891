"""Pretraining on a tiny Seshu: loss falls, a killed run resumes, continued pretraining, portability."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedem.config import validate
from fedem.model.scan import use_scan
from fedem.train.config import PretrainConfig
from fedem.train.pretrain import pretrain
from fedem.train.trainer import read_metrics
from tests.conftest import tiny_pretrain_data


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path, small_mono: Path) -> Path:
    out = tmp_path_factory.mktemp("pretrained")
    cfg = validate(PretrainConfig, tiny_pretrain_data(tiny_tokenizer_dir, small_mono, out, max_steps=40))
    pretrain(cfg)
    return out


def test_loss_falls_and_run_folder_is_complete(pretrained: Path) -> None:
    rows = read_metrics(pretrained)
    losses = [row["loss"] for row in rows if "loss" in row]

    assert losses[-1] < losses[0] - 0.5
    assert {"eval_en_bpb", "eval_hi_bpb", "eval_en_ppl", "eval_bpb"} <= {k for row in rows for k in row}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "fedem.json", "metrics.png"):
        assert (pretrained / name).is_file(), name
    assert not (pretrained / "training_args.bin").exists()
    provenance = json.loads((pretrained / "fedem.json").read_text())
    assert provenance["command"] == "pretrain" and provenance["config"]["train"]["max_steps"] == 40


def test_plain_transformers_loads_identical_logits(pretrained: Path, tmp_path: Path) -> None:
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    model = AutoModelForCausalLM.from_pretrained(pretrained).eval()
    with torch.no_grad():
        with use_scan("chunked"):  # transformers' own scan, as in a process without fedem
            expected = model(ids).logits
        with_fedem = model(ids).logits  # fedem's default scan: the same function, other rounding
    torch.testing.assert_close(with_fedem, expected, rtol=1e-5, atol=1e-5)
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(pretrained)!r}).eval()
        AutoTokenizer.from_pretrained({str(pretrained)!r})
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / "ids.pt")!r})).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        assert "fedem" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)

    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


CRASH = """
import os, signal, sys
from transformers import TrainerCallback
from fedem.config import validate
from fedem.train.config import PretrainConfig
from fedem.train.pretrain import pretrain

class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 14:  # after checkpoint-10 was written
            os.kill(os.getpid(), signal.SIGKILL)

pretrain(validate(PretrainConfig, {data!r}), callbacks=[Crash()])
"""


def test_killed_run_resumes_to_the_same_final_step(
    tiny_tokenizer_dir: Path, small_mono: Path, tmp_path: Path
) -> None:
    data = tiny_pretrain_data(tiny_tokenizer_dir, small_mono, tmp_path / "run", max_steps=20)
    crashed = subprocess.run([sys.executable, "-c", CRASH.format(data=data)], capture_output=True)
    assert crashed.returncode == -9
    assert (tmp_path / "run" / "checkpoint-10").is_dir()

    summary = pretrain(validate(PretrainConfig, data), resume=True)

    assert summary["steps"] == 20
    rows = read_metrics(tmp_path / "run")
    steps = [row["step"] for row in rows if "loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == 20  # every step logged once
    assert all(math.isfinite(row["loss"]) for row in rows if "loss" in row)


def test_continued_pretraining_starts_from_the_checkpoint(pretrained: Path, tmp_path: Path) -> None:
    text = tmp_path / "new.txt"
    text.write_text("\n".join([f"fresh text for continued pretraining, line {i}" for i in range(200)]))
    data = {
        "init_from": str(pretrained),
        "data": {"mono": str(text), "seq_len": 64},
        "train": {
            "max_steps": 4,
            "batch_size": 4,
            "warmup_steps": 0,
            "log_every": 2,
            "eval_every": 4,
            "save_every": 4,
        },
        "out": str(tmp_path / "cpt"),
    }

    summary = pretrain(validate(PretrainConfig, data))

    assert summary["steps"] == 4
    provenance = json.loads((tmp_path / "cpt" / "fedem.json").read_text())
    assert provenance["init_from_sha256"]
    before = AutoModelForCausalLM.from_pretrained(pretrained).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "cpt").state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
