"""Loading checkpoints and adapters with errors a user can act on.

Everything fedem writes is a plain HF folder, so loading is `from_pretrained`; this module only turns
the failures a user can cause (a wrong path, a truncated file, an adapter for another base) into one
clear line instead of a traceback from deep inside transformers.
"""

from pathlib import Path

import torch
from peft import PeftModel
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fedem.errors import UserError
from fedem.provenance import read_provenance, weights_fingerprint


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a checkpoint (or tokenizer) folder."""
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"{model_dir} holds no tokenizer (tokenizer.json missing)")
    return AutoTokenizer.from_pretrained(model_dir)


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A full checkpoint folder (config.json + *.safetensors) as a causal LM."""
    if not model_dir.is_dir():
        raise UserError(f"no such checkpoint folder: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a checkpoint: config.json missing")
    if not any(model_dir.glob("*.safetensors")):
        raise UserError(f"{model_dir} holds no *.safetensors weights")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load checkpoint {model_dir}: {first_line}") from None
    return model


def check_adapter_base(adapter_dir: Path, base_dir: Path) -> None:
    """Refuse an adapter whose recorded base fingerprint differs from `base_dir`'s weights."""
    recorded = read_provenance(adapter_dir).get("base_sha256")
    if recorded is None:
        return  # an adapter fedem did not write: nothing recorded to check against
    if recorded != weights_fingerprint(base_dir):
        raise UserError(
            f"adapter {adapter_dir} was trained on another base (sha256 {recorded[:12]}…), not on {base_dir}"
        )


def load_adapter(
    model: PreTrainedModel,
    adapter_dir: Path,
    base_dir: Path,
    trainable: bool = False,
    check_base: bool = True,
) -> PeftModel:
    """Wrap `model` with the LoRA adapter in `adapter_dir`, checking it belongs to `base_dir`.

    `trainable=True` is how a relayed adapter is continued: peft loads adapters frozen by default,
    and training a frozen adapter silently changes nothing. `check_base=False` is only for a
    deliberate rebase — continuing training on a new base release, which the caller records.
    """
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} is not a LoRA adapter: adapter_config.json missing")
    if check_base:
        check_adapter_base(adapter_dir, base_dir)
    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load adapter {adapter_dir}: {first_line}") from None
