"""Screening a submitted adapter before it is evaluated: is it a well-formed LoRA adapter for its base?

A poisoned or broken submission — NaN weights, wrong shapes, an absurd norm, an adapter for another
base — is refused here with a reason a contributor can act on, before any model is loaded or scored.
The rules, in the order they are checked (docs/evaluation.md):

1. `adapter_config.json` parses, `peft_type` is `LORA`, `target_modules` ⊆ {`in_proj`}, 1 ≤ r ≤ 256,
   a finite positive `lora_alpha`, and no LoRA variant that changes the forward pass (DoRA, biases,
   `modules_to_save`, rank/alpha patterns, layer selection, …);
2. `adapter_model.safetensors` holds exactly the tensors the base implies — for every `in_proj` of
   the base's weights, `lora_A` of shape (r, in) and `lora_B` of shape (out, r) — in float32, float16
   or bfloat16, every value finite;
3. `fedem.json`'s `base_sha256`, when present, is the fingerprint of the base release it claims;
4. ‖ΔW‖ (the Frobenius norm over all modules of scale · B @ A) is at most `max_ratio` × the median
   ‖ΔW‖ of the adapter's accepted history (skipped with no history).

Everything here is a pure function of local folders (and the history's norms), so it is tested and
run without a hub.
"""

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from fedem.errors import UserError
from fedem.merge import ADAPTER_WEIGHTS, delta_weights, update_norm
from fedem.provenance import PROVENANCE_FILE, weights_fingerprint

ADAPTER_CONFIG = "adapter_config.json"
ALLOWED_TARGETS = frozenset({"in_proj"})
MAX_RANK = 256
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
PEFT_PREFIX = "base_model.model."
# LoRA options that change what the adapter computes beyond W + scale · B @ A on in_proj.
REFUSED_OPTIONS = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "alora_invocation_tokens",
    "layer_replication",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "fan_in_fan_out",
)


class ScreeningError(Exception):
    """A submission refused by screening; `reason` says why, for the contributor."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Screened:
    """What screening learnt about an adapter that passed."""

    rank: int
    tensors: int
    delta_norm: float
    history_median: float | None  # None: no accepted history to compare the norm with

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "tensors": self.tensors,
            "delta_norm": self.delta_norm,
            "history_median": self.history_median,
        }


def _few(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_config(adapter_dir: Path) -> int:
    """Rule 1: a plain LoRA adapter on `in_proj`; returns its rank r."""
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise ScreeningError(f"not a LoRA adapter: {ADAPTER_CONFIG} is missing")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ScreeningError(f"not a LoRA adapter: {ADAPTER_WEIGHTS} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ScreeningError(f"{ADAPTER_CONFIG} does not parse: {err}") from None
    if not isinstance(config, dict):
        raise ScreeningError(f"{ADAPTER_CONFIG} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise ScreeningError(f"peft_type is {config.get('peft_type')!r}, not 'LORA': only LoRA adapters")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]  # peft reads a string as one regex; only the plain name is allowed
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ScreeningError(f"target_modules must be a list of module names, not {targets!r}")
    outside = sorted(set(targets) - ALLOWED_TARGETS)
    if outside:
        raise ScreeningError(
            f"target_modules {outside} are not allowed: adapters may only target {sorted(ALLOWED_TARGETS)}"
        )
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise ScreeningError(f"LoRA rank r must be an integer in 1…{MAX_RANK}, not {rank!r}")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < math.inf:
        raise ScreeningError(f"lora_alpha must be a finite positive number, not {alpha!r}")
    used = [name for name in REFUSED_OPTIONS if config.get(name)]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r}")
    if used:
        raise ScreeningError(f"uses {', '.join(used)}: only plain LoRA (W + α/r · B @ A) is accepted")
    return rank


def expected_tensors(base_dir: Path, rank: int) -> dict[str, tuple[int, ...]]:
    """The adapter tensors the base implies, name → shape: for each `…in_proj.weight` (out, in) of the
    base's weights, `base_model.model.….in_proj.lora_A.weight` (r, in) and `….lora_B.weight` (out, r).

    Raises ValueError for a base whose weights and config.json disagree (the hub's problem)."""
    expected: dict[str, tuple[int, ...]] = {}
    for file in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():
                module, _, leaf = key.rpartition(".")
                if leaf != "weight" or module.rpartition(".")[2] not in ALLOWED_TARGETS:
                    continue
                shape = weights.get_slice(key).get_shape()
                if len(shape) != 2:
                    raise ValueError(f"base weight {key} has shape {shape}, not (out, in)")
                out_features, in_features = shape
                expected[f"{PEFT_PREFIX}{module}.lora_A.weight"] = (rank, in_features)
                expected[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (out_features, rank)
    if not expected:
        raise ValueError(f"the base in {base_dir} has no in_proj weights")
    config_path = base_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    layers = config.get("num_hidden_layers")
    if isinstance(layers, int) and len(expected) != 2 * layers:
        raise ValueError(f"the base has {len(expected) // 2} in_proj weights but {layers} layers")
    return expected


def check_tensors(adapter_dir: Path, expected: dict[str, tuple[int, ...]]) -> int:
    """Rule 2: exactly the expected names and shapes, a float dtype, finite values; returns the count."""
    path = adapter_dir / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as weights:
            names = sorted(weights.keys())
            unexpected = [n for n in names if n not in expected]
            missing = sorted(set(expected) - set(names))
            if unexpected:
                raise ScreeningError(
                    f"{ADAPTER_WEIGHTS} holds tensors the base does not imply: {_few(unexpected)}"
                )
            if missing:
                raise ScreeningError(f"{ADAPTER_WEIGHTS} lacks tensors the base implies: {_few(missing)}")
            for name in names:
                piece = weights.get_slice(name)
                shape = tuple(piece.get_shape())
                if shape != expected[name]:
                    raise ScreeningError(
                        f"{name} has shape {list(shape)}, but the base and r imply {list(expected[name])}"
                    )
                dtype = piece.get_dtype()
                if dtype not in FLOAT_DTYPES:
                    raise ScreeningError(
                        f"{name} is {dtype}; adapters must be {', '.join(FLOAT_DTYPES.values())}"
                    )
                tensor = weights.get_tensor(name)
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    raise ScreeningError(f"{name} holds {bad} non-finite value(s) (NaN or infinity)")
    except SafetensorError as err:
        raise ScreeningError(f"{ADAPTER_WEIGHTS} cannot be read: {err}") from None
    return len(names)


def check_base(adapter_dir: Path, base_dir: Path, base_label: str) -> None:
    """Rule 3: the base fingerprint recorded in `fedem.json` (if any) is the claimed base's."""
    path = adapter_dir / PROVENANCE_FILE
    if not path.is_file():
        return
    try:
        provenance = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ScreeningError(f"{PROVENANCE_FILE} does not parse: {err}") from None
    recorded = provenance.get("base_sha256") if isinstance(provenance, dict) else None
    if recorded is None:
        return
    actual = weights_fingerprint(base_dir)
    if recorded != actual:
        raise ScreeningError(
            f"trained on another base: {PROVENANCE_FILE} records base sha256 {str(recorded)[:12]}…, "
            f"but {base_label} is {actual[:12]}…"
        )


def delta_norm(adapter_dir: Path) -> float:
    """‖ΔW‖: the Frobenius norm of every module's scale · B @ A together."""
    try:
        deltas = delta_weights(adapter_dir)
    except UserError as err:
        raise ScreeningError(str(err)) from None
    return update_norm(deltas)


def check_norm(norm: float, history: Sequence[float], max_ratio: float) -> float | None:
    """Rule 4: `norm` ≤ `max_ratio` × median(history); returns the median (None: no usable history)."""
    if not math.isfinite(norm):
        raise ScreeningError(f"‖ΔW‖ is {norm}: not finite")
    usable = [h for h in history if math.isfinite(h) and h > 0]
    if not usable:
        return None
    median = statistics.median(usable)
    if norm > max_ratio * median:
        raise ScreeningError(
            f"‖ΔW‖ = {norm:.4g} is {norm / median:.1f}× the median ‖ΔW‖ of the adapter's "
            f"{len(usable)} accepted version(s) ({median:.4g}); the limit is {max_ratio:g}×"
        )
    return median


def screen(
    adapter_dir: Path,
    base_dir: Path,
    history: Sequence[float] = (),
    max_ratio: float = 10.0,
    base_label: str = "the base",
) -> Screened:
    """Every rule, in order; raises ScreeningError with the first failure's reason."""
    rank = check_config(adapter_dir)
    count = check_tensors(adapter_dir, expected_tensors(base_dir, rank))
    check_base(adapter_dir, base_dir, base_label)
    norm = delta_norm(adapter_dir)
    median = check_norm(norm, history, max_ratio)
    return Screened(rank=rank, tensors=count, delta_norm=norm, history_median=median)
