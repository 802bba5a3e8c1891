"""LoRA fine-tuning: response-only loss, a portable adapter, `--init` continues a trainable adapter."""

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from fedem.config import validate
from fedem.data.packing import IGNORE_INDEX
from fedem.errors import UserError
from fedem.model.load import load_tokenizer
from fedem.model.lora import LoraLinear
from fedem.provenance import weights_fingerprint
from fedem.train.config import FinetuneConfig
from fedem.train.finetune import adapter_model, finetune, training_split, translation_rows


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "en-hi.tsv"
    lines = (data_dir / "parallel" / "en-hi.tsv").read_text(encoding="utf-8").splitlines()[:120]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _config(base: Path, pairs: Path, out: Path, **extra: object) -> FinetuneConfig:
    data = {
        "base": str(base),
        "pairs": str(pairs),
        "out": str(out),
        "eval_size": 8,
        "max_length": 96,
        "train": {
            "max_steps": 6,
            "batch_size": 4,
            "learning_rate": 5e-3,
            "warmup_steps": 0,
            "log_every": 2,
            "eval_every": 3,
            "save_every": 3,
        },
        **extra,
    }
    return validate(FinetuneConfig, data)


def test_loss_is_on_the_response_only(tiny_model_dir: Path, pairs: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    cfg = _config(tiny_model_dir, pairs, tmp_path, max_length=1024)

    input_ids, labels = translation_rows(cfg, tokenizer)[0]

    prompt_length = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    prompt = tokenizer.decode(input_ids[:prompt_length], skip_special_tokens=True)
    response = tokenizer.decode(labels[prompt_length:], skip_special_tokens=True)
    assert prompt.startswith("English: ") and prompt.endswith("\nHindi:")
    assert labels[prompt_length:] == input_ids[prompt_length:]
    assert labels[-1] == tokenizer.eos_token_id
    assert response.startswith(" ") and "\t" not in response


def test_adapter_is_saved_alone_and_loads_with_plain_peft(
    tiny_model_dir: Path, pairs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "adapter"

    summary = finetune(_config(tiny_model_dir, pairs, out))

    assert summary["steps"] == 6 and summary["trainable_parameters"] > 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "fedem.json").read_text())["base_sha256"] == weights_fingerprint(tiny_model_dir)
    script = textwrap.dedent(
        f"""
        import sys
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})
        model = PeftModel.from_pretrained(base, {str(out)!r})
        assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
        assert "fedem" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)


class PaddingShare(TrainerCallback):
    """Records the share of padded positions in the batches of the Trainer's training data loader."""

    share: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        masks = [batch["attention_mask"] for batch in kwargs["train_dataloader"]]
        self.share = sum(int((m == 0).sum()) for m in masks) / sum(m.numel() for m in masks)


def test_batches_hold_rows_of_similar_length(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """Rows are padded to the longest in their batch, so fine-tuning groups rows by length (HF's
    LengthGroupedSampler): far less padding than batches drawn at random from the same rows."""
    pairs = tmp_path / "en-hi.tsv"
    lines = (data_dir / "parallel" / "en-hi.tsv").read_text(encoding="utf-8").splitlines()[:800]
    pairs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = _config(tiny_model_dir, pairs, tmp_path / "adapter", max_length=1024)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 1})})
    lengths = [len(ids) for ids, _ in training_split(cfg, load_tokenizer(tiny_model_dir))[0].rows]
    random.Random(0).shuffle(lengths)
    size = cfg.train.batch_size
    batches = [lengths[start : start + size] for start in range(0, len(lengths), size)]
    random_share = 1 - sum(lengths) / sum(max(batch) * len(batch) for batch in batches)
    padding = PaddingShare()

    finetune(cfg, callbacks=[padding])

    assert padding.share is not None and random_share > 0.2
    assert padding.share < random_share / 4


def test_adapters_train_through_fedems_lora_layer(tiny_model_dir: Path, pairs: Path, tmp_path: Path) -> None:
    model = adapter_model(_config(tiny_model_dir, pairs, tmp_path))

    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert layers and all(type(m) is LoraLinear for m in layers)


def test_init_continues_and_changes_the_adapter(tiny_model_dir: Path, pairs: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    finetune(_config(tiny_model_dir, pairs, first))

    finetune(_config(tiny_model_dir, pairs, tmp_path / "second", init=str(first)))

    before = load_file(first / "adapter_model.safetensors")
    after = load_file(tmp_path / "second" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)


def test_ineffective_lora_targets_are_refused(tiny_model_dir: Path, pairs: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="out_proj"):
        _config(tiny_model_dir, pairs, tmp_path, lora={"target_modules": ["out_proj"]})
