"""`fedem merge`: fold one or more LoRA adapters into their base model, exactly, as a full checkpoint.

Glossary (LoRA paper → peft → here):
    W        the base weight of a targeted nn.Linear, shape (out, in)
    A        `lora_A.weight`, shape (r, in)
    B        `lora_B.weight`, shape (out, r)
    r        the adapter's rank (per module if the adapter has a `rank_pattern`)
    α        `lora_alpha` (per module if `alpha_pattern`); scale = α/r, or α/√r with rsLoRA
    ΔW       an adapter's full weight update, scale · B @ A, shape (out, in): what the adapter adds to W
    w, λ     per-adapter weights of the merge
    density  fraction of ΔW entries TIES/DARE keep (TIES: largest magnitudes; DARE: random, rescaled)
    n        the number of adapters merged
    ‖ΔWᵢ‖    adapter i's norm: the Frobenius norm of all its ΔW together (as the hub's screening)
    c        a clipping bound: each ΔWᵢ is scaled by min(1, c / ‖ΔWᵢ‖) before combining
    β, k     trimmed mean: the fraction β of adapters cut from each end, k = ⌊β · n⌋ per entry

Every method combines the ΔWᵢ of the adapters entry by entry, never their A and B factors: a weighted
sum of B factors times a weighted sum of A factors has cross terms Bᵢ Aⱼ that belong to no adapter, and
trimming or dropping entries of A and B is not trimming or dropping entries of ΔW (see docs/merge.md).
The TIES/DARE arithmetic itself is peft's (`peft.utils.merge_utils`).

Robust aggregation, for adapters from contributors who may not all be honest (as Flower's FedMedian,
FedTrimmedAvg and update clipping): `median` and `trimmed_mean` combine entry by entry over the
adapters, so one adapter, however large its ΔW, cannot move an entry outside the range the others
span; `clip` bounds every adapter's norm, so none outweighs the rest, and works with every method.
"""

import logging
import math
import os
import shutil
import statistics
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast, get_args

import torch
from peft import LoraConfig
from peft.utils import merge_utils
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedem.errors import UserError
from fedem.model.load import check_adapter_base, load_model, load_tokenizer
from fedem.provenance import weights_fingerprint, write_provenance

log = logging.getLogger(__name__)

Method = Literal["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
METHODS: tuple[str, ...] = get_args(Method)
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
RobustMethod = Literal["median", "trimmed_mean"]
ROBUST_METHODS: tuple[str, ...] = get_args(RobustMethod)
MERGE_METHODS = METHODS + ROBUST_METHODS
Clip = float | Literal["median"] | None
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."

# name → f(stacked deltas, weights (n,), density); all of them reduce over the leading adapter axis.
_COMBINE: dict[str, Callable[[list[torch.Tensor], torch.Tensor, float], torch.Tensor]] = {
    "linear": lambda deltas, w, density: merge_utils.task_arithmetic(deltas, w),
    "task_arithmetic": lambda deltas, w, density: merge_utils.task_arithmetic(deltas, w),
    "ties": lambda deltas, w, density: merge_utils.ties(deltas, w, density, majority_sign_method="total"),
    "dare_linear": lambda deltas, w, density: merge_utils.dare_linear(deltas, w, density),
    "dare_ties": lambda deltas, w, density: merge_utils.dare_ties(deltas, w, density, "total"),
}


def _refuse_unsupported(adapter_dir: Path, config: LoraConfig) -> None:
    """Adapters whose effect is not `W + scale·B@A` on existing weights cannot be merged this way."""
    features = {
        "DoRA (use_dora)": config.use_dora,
        "QALoRA (use_qalora)": getattr(config, "use_qalora", False),
        "LoRA biases (lora_bias)": getattr(config, "lora_bias", False),
        "modules_to_save": config.modules_to_save,
        "trainable_token_indices": getattr(config, "trainable_token_indices", None),
        "target_parameters": getattr(config, "target_parameters", None),
        "aLoRA (alora_invocation_tokens)": getattr(config, "alora_invocation_tokens", None),
    }
    used = [name for name, value in features.items() if value]
    if used:
        raise UserError(
            f"cannot merge adapter {adapter_dir}: it uses {', '.join(used)}; only plain LoRA merges"
        )


def delta_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Each targeted base parameter name (`<module>.weight`) → the adapter's ΔW = scale · B @ A, float32."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} is not a LoRA adapter: adapter_config.json missing")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{adapter_dir} holds no {ADAPTER_WEIGHTS}")
    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except (ValueError, TypeError) as err:
        raise UserError(f"cannot read adapter config in {adapter_dir}: {err}") from None
    if not isinstance(config, LoraConfig):
        raise UserError(f"{adapter_dir} is a {config.peft_type} adapter, not LoRA; only LoRA merges")
    _refuse_unsupported(adapter_dir, config)

    try:
        tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read {adapter_dir / ADAPTER_WEIGHTS}: {err}") from None
    rank_pattern: dict[str, int] = config.rank_pattern or {}
    alpha_pattern: dict[str, float] = config.alpha_pattern or {}
    deltas: dict[str, torch.Tensor] = {}
    for key in sorted(tensors):
        if not (key.startswith(_PEFT_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight"))):
            raise UserError(f"cannot merge adapter {adapter_dir}: unsupported tensor {key}")
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(_PEFT_PREFIX) : -len(".lora_A.weight")]
        b_key = f"{_PEFT_PREFIX}{module}.lora_B.weight"
        if b_key not in tensors:
            raise UserError(f"cannot merge adapter {adapter_dir}: {b_key} missing")
        a = tensors[key].float()  # (r, in)
        b = tensors[b_key].float()  # (out, r)
        if a.dim() != 2 or b.dim() != 2:
            raise UserError(f"cannot merge adapter {adapter_dir}: {module} is not a linear layer")
        # Same lookup as peft's LoraModel._create_and_replace: pattern keys match module-name suffixes.
        r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), config.r)
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config.lora_alpha)
        if r != a.shape[0]:
            raise UserError(
                f"cannot merge adapter {adapter_dir}: {module} has rank {a.shape[0]}, config says {r}"
            )
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        delta = scale * (b @ a)  # (out, in)
        deltas[f"{module}.weight"] = delta.T if config.fan_in_fan_out else delta
    if not deltas:
        raise UserError(f"adapter {adapter_dir} holds no LoRA weights")
    return deltas


def resolve_weights(method: str, n: int, weights: list[float] | None) -> list[float]:
    """The per-adapter weights: given ones, or 1/n for `linear` (an average) and 1.0 for the others.
    `median` and `trimmed_mean` count each adapter once and take no weights."""
    if method in ROBUST_METHODS:
        if weights is not None:
            raise UserError(f"{method} takes no --weights: each adapter counts once")
        return [1.0] * n
    if weights is None:
        return [1.0 / n] * n if method == "linear" else [1.0] * n
    if len(weights) != n:
        raise UserError(f"{len(weights)} weights given for {n} adapters; give one weight per adapter")
    return [float(w) for w in weights]


def check_density(method: str, density: float | None) -> None:
    """TIES/DARE need a density in (0, 1]; the other methods have none (refused rather than ignored)."""
    if method not in DENSITY_METHODS:
        if density is not None:
            raise UserError(f"--density applies to {', '.join(DENSITY_METHODS)}, not to {method}")
        return
    if density is None:
        raise UserError(f"method {method} needs --density (fraction of ΔW entries to keep, in (0, 1])")
    if not 0.0 < density <= 1.0:
        raise UserError(f"density must be in (0, 1], got {density}")


def trimmed_count(method: str, n: int, trim: float | None) -> int:
    """k, the adapters cut from each end per entry: ⌊β · n⌋ for trimmed_mean (refused if 0 or if nothing
    would remain), ⌊(n − 1)/2⌋ for median (one or two middle values left); `trim` only for trimmed_mean."""
    if method != "trimmed_mean":
        if trim is not None:
            raise UserError(f"--trim applies to trimmed_mean, not to {method}")
        return (n - 1) // 2
    if trim is None or not 0.0 < trim < 0.5:
        raise UserError(f"trimmed_mean needs --trim in (0, 0.5): the fraction cut from each end, not {trim}")
    k = math.floor(trim * n)
    if k == 0:
        raise UserError(
            f"--trim {trim:g} of {n} adapters cuts none from either end (a plain mean); "
            f"use --trim ≥ {1 / n:.3g} or more adapters"
        )
    return k


def trimmed_mean(deltas: list[torch.Tensor], k: int) -> torch.Tensor:
    """Entry by entry: sort the n values, drop the k smallest and k largest, average the rest."""
    stacked = torch.stack(deltas)  # (n, out, in)
    kept = stacked.sort(dim=0).values[k : len(deltas) - k]  # (n − 2k, out, in)
    return kept.mean(dim=0)  # (out, in)


def update_norm(deltas: dict[str, torch.Tensor]) -> float:
    """‖ΔW‖: the Frobenius norm of all of an adapter's ΔW together (in float64, so it cannot overflow)."""
    return math.sqrt(sum(float(delta.double().pow(2).sum()) for delta in deltas.values()))


def clip_norms(
    per_adapter: list[dict[str, torch.Tensor]], clip: Clip
) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any] | None]:
    """Scale each adapter's ΔW by min(1, c / ‖ΔWᵢ‖), with c the given bound or the median ‖ΔWᵢ‖.

    The norm is over all of an adapter's modules at once, so clipping shrinks an adapter as a whole and
    keeps the direction of its update. Returns the clipped ΔWs and a report (None: no clipping)."""
    if clip is None:
        return per_adapter, None
    norms = [update_norm(deltas) for deltas in per_adapter]
    if clip == "median":
        bound = statistics.median(norms)
    elif isinstance(clip, float | int) and 0 < clip < math.inf:
        bound = float(clip)
    else:
        raise UserError(f"--clip is 'median' or a positive number, not {clip!r}")
    factors = [min(1.0, bound / norm) if norm > 0 else 1.0 for norm in norms]
    clipped = [
        {name: delta * factor for name, delta in deltas.items()} if factor < 1.0 else deltas
        for deltas, factor in zip(per_adapter, factors, strict=True)
    ]
    return clipped, {"bound": bound, "norms": norms, "factors": factors}


def combine(
    deltas: list[torch.Tensor],
    method: Method | RobustMethod,
    weights: list[float] | None = None,
    density: float | None = None,
    seed: int | None = None,
    trim: float | None = None,
) -> torch.Tensor:
    """Merge the ΔWᵢ of one parameter (all the same shape) into one ΔW of that shape.

    linear / task_arithmetic: Σ wᵢ ΔWᵢ. ties: trim each ΔWᵢ to its top-`density` magnitudes, elect each
    entry's sign by the sign of Σ trimmed ΔWᵢ, average the weighted entries that agree with it. dare_linear /
    dare_ties: drop entries at random (keep with probability `density`, rescale by 1/density), then sum as
    linear or sign-elect and average as ties. DARE draws from torch's global generator: seeded here with
    `seed` (restored afterwards) or, with `seed=None`, from whatever state the caller set up.
    median / trimmed_mean: per entry, the median of the n values, or their mean without the k = ⌊trim · n⌋
    smallest and k largest (unweighted).
    """
    if method not in MERGE_METHODS:
        raise UserError(f"unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}")
    if not deltas:
        raise UserError("nothing to merge: no adapters given")
    resolved = resolve_weights(method, len(deltas), weights)
    check_density(method, density)
    k = trimmed_count(method, len(deltas), trim)
    if method in ROBUST_METHODS:
        return trimmed_mean(deltas, k)
    w = torch.tensor(resolved, dtype=deltas[0].dtype)  # (n,)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[], enabled=seed is not None):
        # density 1 is a valid choice (no trimming/dropping); peft warns about it once per tensor.
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        if seed is not None:
            torch.manual_seed(seed)
        return _COMBINE[method](list(deltas), w, density if density is not None else 1.0)


def _card(summary: dict[str, Any]) -> str:
    """A model card in the HF format: YAML front matter, then the inputs and how they were merged."""
    adapters = "\n".join(
        f"| {i} | `{a['path']}` | `{a['sha256']}` | {w:g} |"
        for i, (a, w) in enumerate(zip(summary["adapters"], summary["weights"], strict=True), start=1)
    )
    density = "—" if summary["density"] is None else f"{summary['density']:g}"
    trim = "—" if summary["trim"] is None else f"{summary['trim']:g}"
    clipped = summary["clip"]
    clip = "—" if clipped is None else f"every adapter's ‖ΔW‖ to at most {clipped['bound']:.4g}"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- fedem
- seshu
- mamba2
- merge
- lora
- {summary["method"].replace("_", "-")}
---

# Merged Seshu checkpoint

Made by `fedem merge`: the full weight updates ΔW = scale · B @ A of {len(summary["adapters"])} LoRA
adapter(s), combined with **{summary["method"]}** and added to the base in float32.
Load it with `AutoModelForCausalLM.from_pretrained` (fedem is not needed).

## Inputs

Base: `{summary["base"]}` (weights sha256 `{summary["base_sha256"]}`)

| # | adapter | adapter sha256 | weight |
|---|---------|----------------|--------|
{adapters}

## Parameters

- method: `{summary["method"]}`
- weights: {", ".join(f"{w:g}" for w in summary["weights"])}
- density: {density}
- trim: {trim}
- norm clipping: {clip}
- seed: {summary["seed"]}
- merged parameters: {summary["parameters_changed"]}

See docs/merge.md in fedem for the formula of each method.
"""


def merge(
    base: Path,
    adapters: list[Path],
    method: str,
    out: Path,
    weights: list[float] | None = None,
    density: float | None = None,
    seed: int = 0,
    clip: Clip = None,
    trim: float | None = None,
) -> dict[str, Any]:
    """Merge `adapters` into `base` with `method` and write a full checkpoint to `out` (atomically).

    `clip` ("median" or a bound) clips every adapter's ‖ΔW‖ first; `trim` is trimmed_mean's β."""
    if method not in MERGE_METHODS:
        raise UserError(f"unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}")
    chosen = cast(Method | RobustMethod, method)
    if not adapters:
        raise UserError("nothing to merge: give at least one adapter")
    resolved = resolve_weights(method, len(adapters), weights)
    check_density(method, density)
    trimmed_count(method, len(adapters), trim)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose another --out")

    model = load_model(base, dtype=torch.float32)
    tokenizer = load_tokenizer(base)
    for adapter in adapters:
        check_adapter_base(adapter, base)
    per_adapter = [delta_weights(adapter) for adapter in adapters]
    names = sorted(per_adapter[0])
    params = dict(model.named_parameters())
    for adapter, deltas in zip(adapters, per_adapter, strict=True):
        if sorted(deltas) != names:
            raise UserError(
                f"adapters target different modules: {adapters[0]} and {adapter}; cannot merge them"
            )
        for name, delta in deltas.items():
            if name not in params:
                raise UserError(f"adapter {adapter} targets {name}, which the base {base} does not have")
            if delta.shape != params[name].shape:
                raise UserError(
                    f"adapter {adapter}: {name} has shape {tuple(delta.shape)}, "
                    f"the base's is {tuple(params[name].shape)}"
                )

    per_adapter, clipping = clip_norms(per_adapter, clip)
    if clipping is not None:
        log.info("clipped ‖ΔW‖ to %.4g: factors %s", clipping["bound"], clipping["factors"])
    log.info("merging %d adapter(s) into %s with %s, weights %s", len(adapters), base, method, resolved)
    # One seeded stream for the whole merge, walked in sorted name order: reproducible, and each layer
    # gets its own DARE mask (reseeding per tensor would repeat the same mask in every layer).
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            merged = combine([d[name] for d in per_adapter], chosen, weights, density, trim=trim)
            params[name].add_(merged.to(params[name].dtype))

    summary: dict[str, Any] = {
        "out": str(out),
        "base": str(base),
        "base_sha256": weights_fingerprint(base),
        "adapters": [{"path": str(a), "sha256": weights_fingerprint(a)} for a in adapters],
        "method": method,
        "weights": resolved,
        "density": density,
        "trim": trim,
        "clip": clipping,
        "seed": seed,
        "parameters_changed": len(names),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private (0700); the checkpoint is an ordinary folder
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_card(summary), encoding="utf-8")
        config = {k: summary[k] for k in ("base", "method", "weights", "density", "trim", "seed")}
        config["clip"] = clip
        config["adapters"] = [a["path"] for a in summary["adapters"]]
        write_provenance(
            tmp,
            "merge",
            config,
            base_sha256=summary["base_sha256"],
            adapters_sha256=[a["sha256"] for a in summary["adapters"]],
        )
        os.replace(tmp, out)  # atomic; replaces `out` only if it is an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote merged checkpoint to %s", out)
    return summary
