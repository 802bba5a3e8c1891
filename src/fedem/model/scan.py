"""The Mamba-2 selective scan paths, the switch between them, and fedem's default.

transformers' `Mamba2Mixer.forward` computes the SSM part of every layer by calling the module-level
function `transformers.models.mamba2.modeling_mamba2.mamba2_chunk_scan` (on CPU: the chunked SSD
algorithm in plain torch, whose autograd graph keeps a dozen activation-sized intermediates per layer).
Three drop-ins for it, by name in `SCANS`:
    "chunked"     transformers' own torch function, unwrapped from its kernel binding
    "ssd"         `ssd_scan`: the same chunked algorithm with a hand-written backward that saves only the
                  chunk-boundary states (`fedem.model.ssd`) — fedem's default, see below
    "sequential"  `sequential_scan`: one time step at a time, as the Mamba-2 paper writes the recurrence;
                  the readable reference the others are tested against
`use_scan` swaps one into the mixer for the duration of a `with` block.

The default. Importing this module installs `DEFAULT_SCAN` (`ssd_scan`; `FEDEM_SCAN=chunked` in the
environment keeps the stock one) process-wide. Every way fedem makes a model (`build_model`,
`load_model`) imports this module, so pretrain, finetune, evaluate, generate and the hub's worker all
train and run on it, and a `use_scan` block always finds it already installed.

The CUDA kernels. Where mamba-ssm and causal-conv1d are installed (`pip install 'fedem[cuda]'`),
transformers binds these module functions to their kernels, which take CUDA tensors only. fedem then
installs `ByDevice` dispatchers instead: CUDA tensors go to the kernels, every other tensor to fedem's
torch code — so one process can train on the GPU and still evaluate a copy on the CPU. On CUDA
tensors the training layer is then mamba-ssm's fused kernel whatever `use_scan` says. Without them
(or with `FEDEM_KERNELS=0`) fedem's torch code runs on every device. `KERNELS` says which.

Glossary (code name → Mamba-2 paper symbol, shape as passed to the scan):
    hidden_states  x      input per head channel                   (batch, length, heads, head_dim)
    dt             Δ      step size per head and position          (batch, length, heads)
    A              A      state decay, negative; scalar per head   (heads,)
    B              B      input → state projection, per group      (batch, length, groups, state)
    C              C      state → output projection, per group     (batch, length, groups, state)
    D              D      skip connection, scalar per head         (heads,)
    dt_bias        —      added to Δ before the softplus           (heads,)
    state          h      SSM state per head channel               (batch, heads, head_dim, state)
    chunk_size     Q      block length of the chunked (SSD) scan; the sequential scan ignores it
    groups         G      heads share B and C in G groups: head i reads group i // (heads / G)
    state_size     N      entries of B, C and of h per head channel (the last axis of B, C, h)
    head_dim       P      channels per head

The same import installs four more of fedem's functions in place of transformers' torch fallbacks
(behind a `ByDevice` where the kernels are installed):
    `split_conv1d_scan_combined`  a training layer between its projections as one autograd Function
                                  (`fedem.model.mixer`), taken only while `ssd_scan` is the scan
    `conv_step`                   one decoding step's convolution: a dot product per channel
    `state_step`                  one decoding step's state update on per-head Δ, A and D
    `conv_prompt`                 a prompt's convolution outside training, in the in_proj layout

The recurrence, per head and head channel, with Δ_t = clamp(softplus(dt_t + dt_bias), *dt_limit):
    h_t = exp(Δ_t · A) · h_{t-1} + Δ_t · B_t · x_t       (h_0 = initial_states, or 0)
    y_t = C_t · h_t + D · x_t
"""

import importlib
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN
from transformers.models.mamba2 import modeling_mamba2

from fedem.model.mixer import MixerCore, causal_conv
from fedem.model.ssd import chunked_scan

ScanFn = Callable[..., Any]
"""A scan with `mamba2_chunk_scan`'s signature: returns y, or (y, final state) if asked."""


def _kernels_installed() -> bool:
    """Whether mamba-ssm and causal-conv1d import — transformers' own test before it binds its Mamba-2
    functions to their CUDA kernels (`use_kernel_func_from_hub_with_fallback`)."""
    try:
        for package in ("mamba_ssm", "causal_conv1d"):
            importlib.import_module(package)
    except Exception:  # noqa: BLE001 — a broken build (ImportError, OSError, a CUDA error) is "not installed"
        return False
    return True


KERNELS: Final[bool] = os.environ.get("FEDEM_KERNELS", "1") != "0" and _kernels_installed()
"""Whether CUDA tensors run on mamba-ssm's and causal-conv1d's kernels (see the module docstring)."""

# transformers' torch code under its kernel wrappers (`functools.wraps` keeps it as `__wrapped__`):
# what the `chunked` scan and fedem's fallbacks call whatever the wrappers are bound to.
CHUNKED_SCAN: Final[ScanFn] = inspect.unwrap(modeling_mamba2.mamba2_chunk_scan)


def _refuse_unsupported(scan: str, kwargs: dict[str, Any]) -> None:
    """Packed sequences (`seq_idx`, `cu_seqlens`) and output gating (`z`) are refused, not ignored."""
    for name in ("z", "seq_idx", "cu_seqlens"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{scan} does not support `{name}`")


def _step_sizes(
    dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float]
) -> torch.Tensor:
    """Δ = clamp(softplus(dt + dt_bias), *dt_limit): (b, l, h), as `mamba2_chunk_scan` computes it."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    return torch.clamp(dt, min=dt_limit[0], max=dt_limit[1])


def sequential_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    **kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Mamba-2 scan as a loop over time; a drop-in for `mamba2_chunk_scan`.

    Shapes (b batch, l length, h heads, p head_dim, g groups, n state):
        hidden_states (b, l, h, p)   dt (b, l, h)   A (h,)   B, C (b, l, g, n)   D, dt_bias (h,)
        initial_states (b, h, p, n) or None
    Returns y (b, l, h, p), and with `return_final_states` also the state after the last step
    (b, h, p, n).

    `chunk_size` is accepted for the signature and ignored. The arithmetic runs in float32, or in
    float64 for float64 inputs (the stock scan always uses float32), so in float64 this is a
    higher-precision reference. Packed sequences (`seq_idx`, `cu_seqlens`) and output gating (`z`) are
    refused rather than ignored.
    """
    _refuse_unsupported("sequential_scan", kwargs)
    batch, _length, heads, head_dim = hidden_states.shape
    groups, state_size = B.shape[2], B.shape[3]
    dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    dt = _step_sizes(dt, dt_bias, dt_softplus, dt_limit).to(dtype)  # Δ: (b, l, h)

    x = hidden_states.to(dtype)
    # One B and C per head: (b, l, g, n) → (b, l, h, n).
    B = B.to(dtype).repeat_interleave(heads // groups, dim=2, output_size=heads)
    C = C.to(dtype).repeat_interleave(heads // groups, dim=2, output_size=heads)

    decay = torch.exp(dt * A.to(dtype))  # exp(Δ_t·A): (b, l, h)
    dt_x = dt[..., None] * x  # Δ_t·x_t: (b, l, h, p)

    if initial_states is None:
        h = x.new_zeros(batch, heads, head_dim, state_size)
    else:
        h = initial_states.to(dtype)
    # One step at a time. `unbind` + `stack` keep backward linear in the length; writing each step in place
    # into a preallocated output would make backward copy the whole output's gradient per step.
    ys = []
    for decay_t, dt_x_t, B_t, C_t in zip(
        decay.unbind(1), dt_x.unbind(1), B.unbind(1), C.unbind(1), strict=True
    ):
        # h_t = exp(Δ_t·A)·h_{t-1} + (Δ_t·x_t) ⊗ B_t: (b, h, p, n)
        h = decay_t[:, :, None, None] * h + dt_x_t[..., None] * B_t[:, :, None, :]
        # C_t·h_t, summing over the state: (b, h, p, n) @ (b, h, n, 1) → (b, h, p)
        ys.append((h @ C_t[..., None]).squeeze(-1))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape)  # (b, l, h, p)

    if D is not None:
        y = y + D[..., None] * x
    if return_final_states:
        return y, h
    return y


def ssd_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    **kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The chunked scan with a memory-lean backward (`fedem.model.ssd`); a drop-in for `mamba2_chunk_scan`.

    Same shapes, arguments and refusals as `sequential_scan`; computes in float32 (float64 for float64
    inputs). Δ and the D skip are left to autograd: they are elementwise on tensors the graph holds
    anyway, so only the scan itself needed a hand-written backward.
    """
    _refuse_unsupported("ssd_scan", kwargs)
    delta = _step_sizes(dt, dt_bias, dt_softplus, dt_limit)
    y, final = chunked_scan(hidden_states, delta, A, B, C, chunk_size, initial_states)
    if D is not None:
        y = y + D[..., None] * hidden_states
    if return_final_states:
        return y, final
    return y


SCANS: Final[dict[str, ScanFn]] = {"chunked": CHUNKED_SCAN, "ssd": ssd_scan, "sequential": sequential_scan}
"""The scan paths by name: transformers' chunked scan, the lean-backward chunked scan, the recurrence."""


def scan_named(name: str) -> ScanFn:
    """The `SCANS` entry called `name`; a ValueError naming the choices otherwise."""
    if name not in SCANS:
        raise ValueError(f"unknown scan {name!r}; choose from {', '.join(SCANS)}")
    return SCANS[name]


@contextmanager
def use_scan(scan: ScanFn | str) -> Iterator[ScanFn]:
    """Make every Mamba2Mixer in this process call `scan` (a function or a `SCANS` name) in the block.

    Patches the module global `modeling_mamba2.mamba2_chunk_scan` and puts back whatever was there on
    exit, also on an exception. The switch is process-wide, so it is not thread-safe; blocks nest.
    """
    fn = scan_named(scan) if isinstance(scan, str) else scan
    previous = modeling_mamba2.mamba2_chunk_scan
    modeling_mamba2.mamba2_chunk_scan = fn
    try:
        yield fn
    finally:
        modeling_mamba2.mamba2_chunk_scan = previous


# transformers' torch `causal_conv1d_update`, kept: `conv_step` hands it anything but a one-token step.
CONV_UPDATE: Final[ScanFn] = inspect.unwrap(modeling_mamba2.causal_conv1d_update)


def conv_step(
    hidden_states: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """The causal depthwise convolution of one decoding step; a drop-in for `causal_conv1d_update`.

    Shapes (b batch, c channels, k kernel width, s state width ≥ k):
        hidden_states (b, c, 1)   conv_state (b, c, s): the last s inputs, updated in place
        weight (c, k)   bias (c,)   → (b, c, 1)
    With one new position the output is one dot product per channel over the last k inputs.
    transformers' fallback runs `F.conv1d` on the (b, c, s + 1) window instead, which costs ~100 µs a
    call on a 2-core CPU — a fifth of seshu-small's time per generated token (bench/README.md).
    """
    if hidden_states.shape[-1] != 1:
        return CONV_UPDATE(hidden_states, conv_state, weight, bias, activation)
    window = torch.cat([conv_state, hidden_states], dim=-1).to(weight.dtype)  # (b, c, s + 1)
    conv_state.copy_(window[:, :, -conv_state.shape[-1] :])
    out = (window[:, :, -weight.shape[-1] :] * weight).sum(-1, keepdim=True)  # (b, c, 1)
    if bias is not None:
        out = out + bias[:, None]
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.to(hidden_states.dtype)


# transformers' torch `causal_conv1d_fn`, kept: `conv_prompt` hands it inputs that need a gradient.
CONV_PROMPT: Final[ScanFn] = inspect.unwrap(modeling_mamba2.causal_conv1d_fn)


def conv_prompt(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The causal depthwise convolution of a whole input outside training (evaluation, a generation
    prompt); a drop-in for `causal_conv1d_fn`.

    Shapes (b batch, c channels, l length, k kernel width): hidden_states (b, c, l), weight (c, k),
    bias (c,) → (b, c, l). In `Mamba2Mixer` hidden_states is a transposed view of the in_proj output
    (b, l, c), and the result is transposed straight back. transformers' fallback runs `F.conv1d` on
    it, which copies the view into (b, c, l) first; `fedem.model.mixer.causal_conv` works in the
    (b, l, c) layout as it is, and returns a transposed view of its contiguous (b, l, c) output:
    seshu-small's whole forward at batch 8 took 0.45 s instead of 0.475 at L=512, 3.06 s instead of
    3.64 at L=2048, on 2 cores. Like transformers' fallback it ignores `kwargs` (the kernel's
    `seq_idx`).

    It hands the call to that fallback whenever a `use_scan` block has installed a scan other than
    `ssd_scan`, so that "chunked" and "sequential" keep meaning transformers' own layer exactly, and
    for an input that needs a gradient: in training fedem's layer convolves inside `MixerCore`, and
    only an input that `MixerCore` declines gets here, to transformers' own layer.
    """
    fedem_layer = on_torch(modeling_mamba2.mamba2_chunk_scan) is ssd_scan
    if not fedem_layer or (hidden_states.requires_grad and torch.is_grad_enabled()):
        return CONV_PROMPT(hidden_states, weight, bias, activation, **kwargs)
    out = causal_conv(hidden_states.transpose(1, 2).to(weight.dtype), weight, bias)
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.to(hidden_states.dtype).transpose(1, 2)


# transformers' torch `selective_state_update`, kept: `state_step` hands it what it does not cover.
STATE_UPDATE: Final[ScanFn] = inspect.unwrap(modeling_mamba2.mamba2_selective_state_update)


def state_step(
    state: torch.Tensor,
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    **kwargs: Any,
) -> torch.Tensor:
    """One decoding step of the recurrence; a drop-in for transformers' `selective_state_update`.

    Shapes (b batch, h heads, p head_dim, g groups, n state), as `Mamba2Mixer` passes them:
        state (b, h, p, n), updated in place   hidden_states (b, h, p)   dt (b, h, p)   A (h, p, n)
        B, C (b, g, n)   D, dt_bias (h, p)   → y (b, h, p)
    Mamba-2's Δ, A, D and dt_bias are one number per head, which the mixer expands (stride 0) to these
    shapes; this works on the per-head numbers and lets the groups broadcast instead of copying B and
    C per head: ten tensor operations where the fallback takes about twenty, which is most of a
    step's cost at one token (bench/README.md). Anything else — Δ that varies along a head, a gate z —
    goes to transformers' function.
    """
    per_head = dt.stride(-1) == 0 and A.stride(-1) == A.stride(-2) == 0
    per_head = per_head and (D is None or D.stride(-1) == 0) and (dt_bias is None or dt_bias.stride(-1) == 0)
    if z is not None or not per_head or kwargs:
        fallback = {"D": D, "z": z, "dt_bias": dt_bias, "dt_softplus": dt_softplus, **kwargs}
        return STATE_UPDATE(state, hidden_states, dt, A, B, C, **fallback)
    batch, heads, head_dim = hidden_states.shape
    groups = B.shape[1]
    delta = dt[..., 0].float()  # Δ per head: (b, h)
    if dt_bias is not None:
        delta = delta + dt_bias[:, 0]
    if dt_softplus:
        delta = F.softplus(delta)
    by_group = state.view(batch, groups, heads // groups, head_dim, -1)  # (b, g, r, p, n)
    decay = torch.exp(delta * A[:, 0, 0]).view(batch, groups, -1, 1, 1)  # exp(Δ·A): (b, g, r, 1, 1)
    x_bar = (hidden_states * delta[..., None]).view(batch, groups, -1, head_dim, 1)  # Δ·x: (b, g, r, p, 1)
    by_group.mul_(decay).addcmul_(x_bar, B.view(batch, groups, 1, 1, -1).to(state.dtype))
    y = (state.view(batch, groups, -1, state.shape[-1]) @ C.view(batch, groups, -1, 1).to(state.dtype)).view(
        batch, heads, head_dim
    )  # C·h: (b, g, r·p, n) @ (b, g, n, 1)
    if D is not None:
        y = y.addcmul_(hidden_states, D)
    return y.to(hidden_states.dtype)


def split_conv1d_scan_combined(
    zxbcdt: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    initial_states: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    activation: str = "silu",
    rmsnorm_weight: torch.Tensor | None = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: torch.Tensor | None = None,
    outproj_bias: torch.Tensor | None = None,
    headdim: int | None = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
    **kwargs: Any,
) -> torch.Tensor | None:
    """A training mixer's whole layer after in_proj (`fedem.model.mixer`); a drop-in for transformers'
    `mamba2_split_conv1d_scan_combined`, the offer that `Mamba2Mixer.forward` makes while training.

    zxbcdt (b, l, I + K + H) → the layer's output (b, l, hidden): `MixerCore`, then the output
    projection through `F.linear`. Returns None, so that transformers runs its step-by-step torch path,
    for what the core does not cover (a start state, final states, packed sequences, another
    activation or norm order) and whenever a `use_scan` block has installed a scan other than `ssd_scan`
    — so "chunked" and "sequential" always mean transformers' own layer around that scan.
    """
    if (
        rmsnorm_weight is None
        or outproj_weight is None
        or initial_states is not None
        or return_final_states
        or activation != "silu"
        or norm_before_gate
        or any(kwargs.get(name) is not None for name in ("seq_idx", "cu_seqlens"))
        or on_torch(modeling_mamba2.mamba2_chunk_scan) is not ssd_scan
    ):
        return None
    out = MixerCore.apply(
        zxbcdt,
        conv1d_weight,
        conv1d_bias,
        dt_bias,
        A,
        D,
        rmsnorm_weight,
        rmsnorm_eps,
        chunk_size,
        ngroups,
        dt_limit,
    )
    return F.linear(out, outproj_weight, outproj_bias)


class ByDevice:
    """Calls `kernel` (transformers' function, bound to a CUDA kernel) when the first argument is a
    CUDA tensor, `torch_fn` (fedem's) otherwise; installed in place of the function when `KERNELS`."""

    def __init__(self, torch_fn: ScanFn, kernel: ScanFn) -> None:
        self.torch_fn, self.kernel = torch_fn, kernel

    def __call__(self, first: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return (self.kernel if first.is_cuda else self.torch_fn)(first, *args, **kwargs)


def on_torch(fn: ScanFn) -> ScanFn:
    """What `fn`, an installed function, runs on a CPU tensor."""
    return fn.torch_fn if isinstance(fn, ByDevice) else fn


DEFAULT_SCAN: Final[ScanFn] = scan_named(os.environ.get("FEDEM_SCAN", "ssd"))
"""The scan fedem installs at import (see the module docstring); `FEDEM_SCAN` names another."""

_INSTALLED: Final[list[tuple[str, ScanFn]]] = [
    ("mamba2_chunk_scan", DEFAULT_SCAN),
    ("causal_conv1d_update", conv_step),
    ("mamba2_selective_state_update", state_step),
    ("mamba2_split_conv1d_scan_combined", split_conv1d_scan_combined),
    ("causal_conv1d_fn", conv_prompt),
]
for _name, _fedem_fn in _INSTALLED:
    _kernel = getattr(modeling_mamba2, _name)
    setattr(modeling_mamba2, _name, ByDevice(_fedem_fn, _kernel) if KERNELS else _fedem_fn)
