"""LoRA adapters as in-memory `AdapterWeights` for the policies, and the adapter folders the
simulator writes and pushes (the same peft layout donors push).
"""

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from fedem.errors import UserError
from fedem.policy import AdapterWeights
from fedem.provenance import write_json_atomic, write_provenance

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
PUSHED = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "fedem.json")


def adapter_scale(config: dict[str, Any]) -> float:
    """α/r, or α/√r with rsLoRA; adapters with per-module ranks or alphas are refused."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError("the simulator needs one rank and alpha for all modules (no rank/alpha patterns)")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def load_weights(folder: Path) -> AdapterWeights:
    """A peft LoRA folder (adapter_model.safetensors + adapter_config.json) as `AdapterWeights`."""
    from safetensors.torch import load_file

    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    factors = {}
    for key, a in tensors.items():
        if key.startswith(PEFT_PREFIX) and key.endswith(".lora_A.weight"):
            module = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
            b = tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"]
            factors[module] = (a.float(), b.float())
    if not factors:
        raise UserError(f"{folder}: no LoRA factors in {ADAPTER_WEIGHTS}")
    return AdapterWeights(factors, adapter_scale(config))


def save_weights(
    weights: AdapterWeights, template: Path, out: Path, provenance: dict[str, Any], base_sha256: str
) -> Path:
    """Write `weights` as a peft adapter folder: the factors under peft's key names, the adapter
    config of `template` (same rank, alpha, targets), and fedem.json with the base's fingerprint."""
    from safetensors.torch import save_file

    template_scale = adapter_scale(json.loads((template / ADAPTER_CONFIG).read_text(encoding="utf-8")))
    if not math.isclose(template_scale, weights.scale):
        raise ValueError(f"scale {weights.scale} differs from the template's {template_scale}")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in sorted(weights.factors.items()):
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.float().contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    shutil.copyfile(template / ADAPTER_CONFIG, out / ADAPTER_CONFIG)
    write_provenance(out, "simulate", provenance, base_sha256=base_sha256)
    return out


def publish_adapter_config(folder: Path, base_ref: str) -> None:
    """Name the hub's base release in adapter_config.json instead of a local path (as donors do)."""
    path = folder / ADAPTER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    repo, _, tag = base_ref.partition("@")
    config.update(base_model_name_or_path=repo, revision=tag or None)
    write_json_atomic(path, config)
