"""The Mamba-2 selective scan written as the plain recurrence, and a switch between scan paths.

transformers' `Mamba2Mixer.forward` computes the SSM part of every layer by calling the module-level
function `transformers.models.mamba2.modeling_mamba2.mamba2_chunk_scan` (on CPU: the chunked SSD
algorithm in plain torch). `sequential_scan` below computes the same thing one time step at a time,
the way the Mamba-2 paper writes the recurrence. It is the readable reference the chunked scan is
tested against, and the slow baseline the training-throughput benchmark compares the chunked scan to.
`use_scan` swaps either function into the mixer for the duration of a `with` block.

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

The recurrence, per head and head channel, with Δ_t = clamp(softplus(dt_t + dt_bias), *dt_limit):
    h_t = exp(Δ_t · A) · h_{t-1} + Δ_t · B_t · x_t       (h_0 = initial_states, or 0)
    y_t = C_t · h_t + D · x_t
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

import torch
import torch.nn.functional as F
from transformers.models.mamba2 import modeling_mamba2

ScanFn = Callable[..., Any]
"""A scan with `mamba2_chunk_scan`'s signature: returns y, or (y, final state) if asked."""

# The stock object (wrapped by transformers' `use_kernel_func_from_hub_with_fallback`), kept to restore.
CHUNKED_SCAN: Final[ScanFn] = modeling_mamba2.mamba2_chunk_scan


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
    for name in ("z", "seq_idx", "cu_seqlens"):
        if kwargs.get(name) is not None:
            raise ValueError(f"sequential_scan does not support `{name}`")
    batch, _length, heads, head_dim = hidden_states.shape
    groups, state_size = B.shape[2], B.shape[3]
    dtype = torch.promote_types(hidden_states.dtype, torch.float32)

    # Δ: (b, l, h)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1]).to(dtype)

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


SCANS: Final[dict[str, ScanFn]] = {"chunked": CHUNKED_SCAN, "sequential": sequential_scan}
"""The scan paths by name: transformers' chunked (SSD) scan, and the plain recurrence above."""


@contextmanager
def use_scan(scan: ScanFn | str) -> Iterator[ScanFn]:
    """Make every Mamba2Mixer in this process call `scan` (a function or a `SCANS` name) in the block.

    Patches the module global `modeling_mamba2.mamba2_chunk_scan` and puts back whatever was there on
    exit, also on an exception. The switch is process-wide, so it is not thread-safe; blocks nest.
    """
    if isinstance(scan, str):
        if scan not in SCANS:
            raise ValueError(f"unknown scan {scan!r}; choose from {', '.join(SCANS)}")
        scan = SCANS[scan]
    fn = scan
    previous = modeling_mamba2.mamba2_chunk_scan
    modeling_mamba2.mamba2_chunk_scan = fn
    try:
        yield fn
    finally:
        modeling_mamba2.mamba2_chunk_scan = previous
