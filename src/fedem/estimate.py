"""Back-of-the-envelope compute, memory, time and cost for training a Seshu (`fedem estimate`).

Every number here is a published rule of thumb, not a measurement; docs/estimate.md cites each one.
The point is to know *before* renting a GPU whether a run takes an hour or a month and whether it fits.
"""

import argparse
import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from fedem.errors import UserError

_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text: str) -> int:
    """A positive whole count from "130M", "2.6B", "1e9" or "7,000" (decimal, so "2.6B" is exact)."""
    raw = text.strip().replace(",", "").replace("_", "")
    scale = _SUFFIXES.get(raw[-1:].upper(), 1)
    number = raw[:-1] if scale != 1 else raw
    try:
        value = Decimal(number) * scale
    except InvalidOperation:
        raise UserError(f"not a count: {text!r} (try 130M, 2.6B, 1e9 or 7,000)") from None
    if not value.is_finite() or value <= 0 or value != value.to_integral_value():
        raise UserError(f"not a positive whole count: {text!r}")
    return int(value)


@dataclass(frozen=True)
class Device:
    """Peak dense throughput at the training precision, memory, and an indicative on-demand price."""

    name: str
    peak_flops: float
    precision: str  # "bf16"/"fp16" = mixed precision with fp32 master weights; "fp32" = fp32 throughout
    memory_gib: float
    usd_per_hour: float
    utilisation: float  # a typical model-FLOPs utilisation, the default for --utilisation


# Peaks are dense (no 2:4 sparsity) tensor-core figures from the vendor datasheets: H100 SXM5 989 TFLOP/s
# bf16 (80 GB HBM3); A100 SXM4 312 TFLOP/s bf16 (80 GB); T4 65 TFLOP/s fp16 mixed precision (16 GB, no
# bf16). 0.4 MFU is what well-tuned LLM training reaches on A100/H100 (PaLM reports 46%, Megatron 30-50%).
# Prices: rough 2024-25 cloud on-demand rates per GPU; yours will differ. `cpu` is this project's
# 2-core machine (an Intel Xeon with AVX-512): ~395 GFLOP/s measured fp32 matmul (2048², 2 threads,
# torch 2.13), 23 GB (21 GiB) RAM; fp32, the precision fedem trains in on a CPU. Its 0.45 is calibrated
# on fedem's CPU path (docs/design.md, "The fast CPU path"): seshu-small at L=256, batch 8, vocabulary
# 16k, trains 3,094 tokens/s = 6·N·tokens/s at 0.46 of that peak with its training mixer compiled and the
# fused LM-head loss (0.38 uncompiled). ../shared/MEASUREMENTS.md's 165 GFLOP/s is an AMD EPYC (AVX2).
DEVICES: dict[str, Device] = {
    "h100": Device("h100", 989e12, "bf16", 80, 3.00, 0.4),
    "a100": Device("a100", 312e12, "bf16", 80, 1.50, 0.4),
    "t4": Device("t4", 65e12, "fp16", 16, 0.35, 0.4),
    "cpu": Device("cpu", 395e9, "fp32", 21, 0.0, 0.45),
}

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022, table 3: ~20 tokens per parameter
# Saved-for-backward values per token · channel · layer of a Mamba-2 block on transformers' torch chunked
# scan, measured with saved_tensors_hooks (fp32): 87 at d=768, N=128, Q=256; 52 at d=256, N=64, Q=64.
# Korthikanti et al. 2022 derive 17 (34 bytes) for a transformer block plus its attention term; the
# fused CUDA kernels (mamba_ssm) recompute more and store less, so treat this as an upper estimate.
ACTIVATION_VALUES = 85
ASPECT = 24  # hidden / layers assumed when neither is given (seshu-base: 768 / 32)


def get_device(name: str) -> Device:
    try:
        return DEVICES[name.lower()]
    except KeyError:
        raise UserError(f"unknown device {name!r}; known: {', '.join(DEVICES)}") from None


@dataclass(frozen=True)
class Shape:
    """The Mamba-2 shape the activation and LoRA estimates use; `assumed` when derived from params."""

    hidden: int
    layers: int
    state_size: int = 64
    head_dim: int = 64
    expand: int = 2
    n_groups: int = 1
    assumed: bool = False

    @property
    def in_proj_out(self) -> int:
        """Mamba-2 in_proj maps d → z, x (E·d each), B, C (G·N each) and dt (one per head)."""
        inner = self.expand * self.hidden
        return 2 * inner + 2 * self.n_groups * self.state_size + inner // self.head_dim


def derive_shape(
    params: int,
    hidden: int | None = None,
    layers: int | None = None,
    state_size: int = 64,
    head_dim: int = 64,
) -> Shape:
    """Fill in a missing hidden/layers from params ≈ 6·d²·L (a Mamba-2 layer with E=2 holds ~6d²:
    in_proj ~4d², out_proj 2d²; embeddings and SSM extras ignored), rounding d to a multiple of 64."""
    if hidden and layers:
        return Shape(hidden, layers, state_size, head_dim)
    if hidden is None and layers is None:
        hidden = max(64, round((params * ASPECT / 6) ** (1 / 3) / 64) * 64)
    if hidden is None:
        assert layers is not None
        hidden = max(64, round(math.sqrt(params / (6 * layers)) / 64) * 64)
    layers = layers or max(1, round(params / (6 * hidden**2)))
    return Shape(hidden, layers, state_size, head_dim, assumed=True)


def lora_params(shape: Shape, rank: int) -> int:
    """LoRA on in_proj (Seshu's only target): A is r×d_in and B is d_out×r in every layer (Hu et al. 2021)."""
    return shape.layers * rank * (shape.hidden + shape.in_proj_out)


@dataclass(frozen=True)
class Memory:
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def training_memory(params: int, trainable: int, fp32: bool, activations: int) -> Memory:
    """AdamW bytes (ZeRO, Rajbhandari et al. 2020): mixed precision keeps bf16 weights (2 B) + an fp32
    master copy (4 B), bf16 gradients (2 B) and two fp32 moments (8 B) — 16 B per trainable parameter.
    fp32 training: 4 + 4 + 8, also 16. Frozen parameters (LoRA's base) cost only their 2 or 4 B copy."""
    frozen = params - trainable
    if fp32:
        return Memory(4 * params, 4 * trainable, 8 * trainable, activations)
    return Memory(2 * frozen + 6 * trainable, 2 * trainable, 8 * trainable, activations)


@dataclass(frozen=True)
class Estimate:
    params: int
    tokens: int
    device: Device
    utilisation: float
    shape: Shape
    flops: float  # 6·N·D for full training; 4·N·D + 6·N_lora·D for LoRA
    memory: Memory
    lora_rank: int | None = None
    lora_trainable: int = 0
    full_memory: Memory | None = None  # full fine-tuning's, to compare with when LoRA is estimated

    @property
    def chinchilla_tokens(self) -> int:
        return CHINCHILLA_TOKENS_PER_PARAM * self.params

    @property
    def hours(self) -> float:
        return self.flops / (self.device.peak_flops * self.utilisation) / 3600

    @property
    def cost_usd(self) -> float:
        return self.hours * self.device.usd_per_hour


def estimate(
    params: int,
    tokens: int | None = None,
    device: str = "h100",
    lora_rank: int | None = None,
    utilisation: float | None = None,
    seq_len: int = 2048,
    batch: int = 8,
    hidden: int | None = None,
    layers: int | None = None,
    state_size: int = 64,
    head_dim: int = 64,
) -> Estimate:
    """Estimate one run: training from scratch, or a LoRA fine-tune when `lora_rank` is given."""
    dev = get_device(device)
    util = dev.utilisation if utilisation is None else utilisation
    if not 0 < util <= 1:
        raise UserError(f"utilisation must be in (0, 1], got {util}")
    if params <= 0 or (tokens is not None and tokens <= 0) or min(seq_len, batch) <= 0:
        raise UserError("params, tokens, seq-len and batch must be positive")
    if lora_rank is not None and lora_rank <= 0:
        raise UserError(f"LoRA rank must be positive, got {lora_rank}")
    tokens = tokens or CHINCHILLA_TOKENS_PER_PARAM * params
    shape = derive_shape(params, hidden, layers, state_size, head_dim)
    fp32 = dev.precision == "fp32"
    act = ACTIVATION_VALUES * (4 if fp32 else 2) * seq_len * batch * shape.hidden * shape.layers
    full = training_memory(params, params, fp32, act)
    if lora_rank is None:
        return Estimate(params, tokens, dev, util, shape, 6.0 * params * tokens, full)
    trainable = lora_params(shape, lora_rank)
    # Frozen weights need no weight gradient: forward 2ND + activation gradients 2ND; the adapter 6·N_lora·D.
    flops = 4.0 * params * tokens + 6.0 * trainable * tokens
    memory = training_memory(params + trainable, trainable, fp32, act)
    return Estimate(params, tokens, dev, util, shape, flops, memory, lora_rank, trainable, full)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _hours(h: float) -> str:
    return (
        f"{h * 3600:.0f} s"
        if h < 1 / 60
        else f"{h * 60:.1f} min"
        if h < 1
        else f"{h:.1f} h ({h / 24:.1f} days)"
    )


def summary(est: Estimate) -> dict[str, Any]:
    """A JSON-able summary in human units (what `fedem estimate` prints)."""
    s, m = est.shape, est.memory
    fits = m.total <= est.device.memory_gib * 2**30
    out: dict[str, Any] = {
        "params": est.params,
        "tokens": est.tokens,
        "chinchilla_tokens": est.chinchilla_tokens,
        "tokens_per_param": round(est.tokens / est.params, 2),
        "mode": f"LoRA r={est.lora_rank} on in_proj" if est.lora_rank else "full training",
        "flops": f"{est.flops:.2e} FLOPs",
        "shape": f"hidden {s.hidden}, layers {s.layers}, state {s.state_size}"
        + (" (assumed; pass --hidden/--layers)" if s.assumed else ""),
        "memory": {
            "weights": _gib(m.weights),
            "gradients": _gib(m.gradients),
            "optimizer": _gib(m.optimizer),
            "activations": _gib(m.activations),
            "total": _gib(m.total),
            "fits": f"yes, in {est.device.memory_gib:g} GiB" if fits else "no: lower --batch or shard",
        },
        "device": f"{est.device.name}, {est.device.peak_flops:.3g} FLOP/s peak {est.device.precision}",
        "utilisation": est.utilisation,
        "wall_clock": _hours(est.hours),
        "cost_usd": round(est.cost_usd, 2),
    }
    if est.full_memory is not None:
        saved = est.full_memory.total - m.total
        out["lora"] = {
            "trainable_params": est.lora_trainable,
            "trainable_fraction": f"{est.lora_trainable / est.params:.3%}",
            "memory_saving": f"{_gib(saved)} vs full fine-tuning ({saved / est.full_memory.total:.0%})",
            "flops_vs_full": f"{est.flops / (6.0 * est.params * est.tokens):.0%}",
        }
    return out


def add_estimate_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `fedem estimate`; counts are parsed in the handler so a bad one is a one-line UserError."""
    from fedem.cli import _add_common

    p = commands.add_parser("estimate", help="FLOPs, memory, wall-clock and cost of a training run")
    p.add_argument("--params", required=True, help="model size, e.g. 130M")
    p.add_argument("--tokens", help="training tokens, e.g. 2.6B (default: Chinchilla-optimal 20·params)")
    p.add_argument("--gpu", choices=sorted(DEVICES), default="h100", help="device (default h100)")
    p.add_argument("--lora-rank", type=int, help="estimate a LoRA fine-tune on in_proj at this rank")
    p.add_argument("--utilisation", type=float, help="model-FLOPs utilisation (default 0.4; cpu 0.45)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="sequences per micro-batch (activations)")
    p.add_argument("--hidden", type=int, help="hidden size (default: derived from --params)")
    p.add_argument("--layers", type=int, help="number of layers (default: derived from --params)")
    p.add_argument("--state-size", type=int, default=64, help="Mamba-2 state N (seshu-base: 128)")
    p.add_argument("--head-dim", type=int, default=64)
    _add_common(p)
    p.set_defaults(handler=cmd_estimate)


def cmd_estimate(args: argparse.Namespace) -> dict[str, Any]:
    est = estimate(
        parse_count(args.params),
        parse_count(args.tokens) if args.tokens else None,
        args.gpu,
        args.lora_rank,
        args.utilisation,
        args.seq_len,
        args.batch,
        args.hidden,
        args.layers,
        args.state_size,
        args.head_dim,
    )
    return summary(est)
