"""One Mamba-2 mixer's training forward — convolution, scan, gate and norm — as one autograd Function.

While training, transformers' `Mamba2Mixer.forward` first offers the whole layer between its two
projections to `mamba2_split_conv1d_scan_combined` (mamba-ssm's fused CUDA kernel where installed)
and, when that returns None, runs its torch path step by step: a depthwise `F.conv1d` on a transposed
copy of the input, SiLU, the scan, the D skip and the gated RMSNorm, each kept by autograd for
backward. On a CPU that path spends more time on layout copies, the convolution's backward (mkldnn's
depthwise kernel) and activation storage than on arithmetic (docs/design.md, "The fast CPU path").

`split_conv1d_scan_combined` takes that offer on the CPU. `MixerCore` computes the same layer in the
input's own (batch, length, channels) layout — the convolution as k shifted multiply-adds, so there is
no transpose — and saves its input, the scan's output and the states entering each chunk; backward
recomputes the convolution and the activations and differentiates each step by hand, the scan
through `fedem.model.ssd`. The output projection stays an ordinary `F.linear` after it, so its weight's
gradient, and a LoRA anywhere, go through autograd as before.

Glossary (shapes; b batch, l length, as in `fedem.model.scan`):
    zxbcdt   the in_proj output, split into z, xBC and dt            (b, l, I + K + H)
    z        the gate                                                (b, l, I)       I = inner = H·P
    xBC      the convolution's input: x, B and C side by side        (b, l, K)       K = I + 2·G·N
    u        the convolution's output, before SiLU                   (b, l, K)
    dt       the step size before the softplus                      (b, l, H)
    y        scan output plus the D skip, before the gate            (b, l, I)
    out      RMSNorm(y · SiLU(z)) per group of I/G channels, scaled  (b, l, I)
"""

import logging
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from fedem.model.ssd import Chunks, from_chunks, scan_backward, to_chunks

Tensor = torch.Tensor
log = logging.getLogger(__name__)

COMPILE = os.environ.get("FEDEM_COMPILE", "1") != "0"
"""Whether the mixer's per-segment math goes through `torch.compile` (`FEDEM_COMPILE=0`: eager)."""


def causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The depthwise causal convolution along the length: x (b, l, K), weight (K, k), bias (K,).

    out[t] = bias + Σ_j weight[:, j] · x[t − (k − 1 − j)], zero before the start; one multiply-add per
    tap on the whole tensor, contiguous output whatever the input's strides.
    """
    taps = weight.shape[1]
    out = x * weight[:, -1] if bias is None else torch.addcmul(bias, x, weight[:, -1])
    for j in range(taps - 1):
        shift = taps - 1 - j
        out[:, shift:].addcmul_(x[:, :-shift], weight[:, j])
    return out


def causal_conv_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, need_weight: bool
) -> tuple[Tensor, Tensor | None]:
    """∂x (b, l, K) and, if asked, ∂weight (K, k) of `causal_conv` (∂bias is ∂out summed over b, l)."""
    taps = weight.shape[1]
    grad_x = grad_out * weight[:, -1]
    for j in range(taps - 1):
        shift = taps - 1 - j
        grad_x[:, :-shift].addcmul_(grad_out[:, shift:], weight[:, j])
    if not need_weight:
        return grad_x, None
    columns = [
        (grad_out[:, taps - 1 - j :] * x[:, : x.shape[1] - (taps - 1 - j)]).sum((0, 1)) for j in range(taps)
    ]
    return grad_x, torch.stack(columns, dim=1)


# Rows and length are run in tiles of about this many tokens. Measured uncompiled on a 2-core CPU
# (docs/design.md): one layer's forward + backward costs ~23 µs a token at (8, 512) in one piece and
# ~18 µs in tiles of 512 tokens, whose intermediates (~1 MiB each) stay in a core's L2 cache instead
# of streaming from L3; ~27 vs ~23 µs at (8, 2048). Tiles of 256 or 1024 measured no better.
TILE_TOKENS = 512


class Tiling(NamedTuple):
    """How `MixerCore` runs a (batch, length) input: `rows` rows a tile, each row cut into `segments`,
    on the input zero-padded at the end to (`batch`, `length`)."""

    rows: int
    batch: int
    length: int
    segments: list[slice]


def tiles(batch: int, length: int, chunk_size: int, tile_tokens: int) -> Tiling:
    """Rows per tile, the padded shape, and the length segments that each tile is run in, in order.

    Sequences that fit are stacked up to `tile_tokens`; a longer one is cut into segments of whole
    chunks, so that the scan meets the same chunk boundaries as in one piece, and the state leaving one
    segment enters the next. Lengths are padded to whole chunks (whole segments for a long row) and
    the batch to whole tiles, so that every tile has one of a few shapes, whatever the batch's length:
    each new shape is a new compile. The padding is exact: the layer is causal and its rows
    independent, so positions appended at a row's end and rows appended to the batch change nothing
    before them, and their zero ∂out gives them zero gradients.
    """
    segment = max(chunk_size, tile_tokens // chunk_size * chunk_size)
    if length <= segment:
        padded = -(-length // chunk_size) * chunk_size
        rows = min(batch, max(1, tile_tokens // padded))
        return Tiling(rows, -(-batch // rows) * rows, padded, [slice(0, padded)])
    padded = -(-length // segment) * segment
    return Tiling(1, batch, padded, [slice(start, start + segment) for start in range(0, padded, segment)])


def _pad(t: Tensor, batch: int, length: int) -> Tensor:
    """(b, l, …) zero-padded at the end of both axes to (batch, length, …); t itself if it fits."""
    if t.shape[:2] == (batch, length):
        return t
    return F.pad(t, (0, 0, 0, length - t.shape[1], 0, batch - t.shape[0]))


def _crop(t: Tensor, batch: int, length: int) -> Tensor:
    """The first (batch, length) of (b, l, …): undoes `_pad`; t itself if nothing was padded."""
    return t if t.shape[:2] == (batch, length) else t[:batch, :length]


class _Layer:
    """The mixer's quantities that forward and backward both compute from zxbcdt (see the glossary),
    for one segment of some rows. `window` is the segment's zxbcdt and the `context` (≤ k − 1)
    positions before it, which only the convolution reads."""

    def __init__(
        self,
        window: Tensor,
        context: int,
        conv_weight: Tensor,
        conv_bias: Tensor | None,
        dt_bias: Tensor,
        dt_limit: tuple[float, float],
        heads: int,
        groups: int,
    ) -> None:
        dtype = torch.promote_types(window.dtype, torch.float32)
        conv_dim = conv_weight.shape[0]
        self.inner = window.shape[-1] - conv_dim - heads
        self.state = (conv_dim - self.inner) // (2 * groups)
        self.heads, self.groups = heads, groups
        z, xbc, dt = window.to(dtype).split([self.inner, conv_dim, heads], dim=-1)
        self.z = z[:, context:]
        self.xbc = xbc  # with the context
        conv = causal_conv(xbc, conv_weight.to(dtype), None if conv_bias is None else conv_bias.to(dtype))
        self.u = conv[:, context:]
        self.act = F.silu(self.u)  # x, B and C side by side
        self.dt_in = dt[:, context:] + dt_bias.to(dtype)
        self.delta = F.softplus(self.dt_in).clamp(*dt_limit)

    def x_b_c(self) -> tuple[Tensor, Tensor, Tensor]:
        """x (b, l, H, P), B and C (b, l, G, N): views into SiLU(u)."""
        x, B, C = self.act.split([self.inner, self.groups * self.state, self.groups * self.state], dim=-1)
        return (
            x.unflatten(-1, (self.heads, -1)),
            B.unflatten(-1, (self.groups, self.state)),
            C.unflatten(-1, (self.groups, self.state)),
        )


def _gated_norm(y: Tensor, z: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """n̂ = g / rms(g) per group, g = y · SiLU(z), and 1/rms; the norm's output is weight · n̂."""
    gated = (y * F.silu(z)).unflatten(-1, (groups, -1))  # (b, l, G, I/G)
    inv_rms = torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + eps)
    return (gated * inv_rms).flatten(-2), inv_rms


class _Weights(NamedTuple):
    """The mixer's own parameters, in MixerCore's argument order (after zxbcdt)."""

    conv_weight: Tensor
    conv_bias: Tensor | None
    dt_bias: Tensor
    A: Tensor
    D: Tensor
    norm_weight: Tensor


class _Settings(NamedTuple):
    eps: float
    chunk_size: int
    groups: int
    dt_limit: tuple[float, float]


def _segment_forward(
    window: Tensor, context: int, initial: Tensor | None, w: _Weights, cfg: _Settings
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y, out (see the glossary), the state leaving and the states entering each chunk (which backward
    reads), for one segment of some rows from the state entering it. `window` is the segment's zxbcdt
    and the `context` positions before it."""
    heads = w.A.shape[0]
    layer = _Layer(window, context, w.conv_weight, w.conv_bias, w.dt_bias, cfg.dt_limit, heads, cfg.groups)
    x, B, C = layer.x_b_c()
    chunks = Chunks(x, layer.delta, w.A, B, C, cfg.chunk_size)
    states_in, final = chunks.states_entering(initial)
    scanned = from_chunks(chunks.output(states_in), x.shape[1])  # (b, l, H, P)
    y = torch.addcmul(scanned, w.D.to(x.dtype)[:, None], x).flatten(-2)
    normed, _ = _gated_norm(y, layer.z, cfg.groups, cfg.eps)
    return y, normed.mul_(w.norm_weight.to(y.dtype)), final, states_in


def _segment_backward(
    grad_out: Tensor,
    window: Tensor,
    context: int,
    y: Tensor,
    states_in: Tensor,
    grad_final: Tensor | None,
    w: _Weights,
    cfg: _Settings,
    need: tuple[bool, ...],
    grad_segment: Tensor,
) -> tuple[Tensor, list[Tensor | None], Tensor]:
    """Backward through one segment of some rows, given ∂out, ∂(the state leaving it), and its y and
    states entering each chunk from forward.

    Writes the segment's ∂zxbcdt (∂z, ∂xBC, ∂dt side by side) into `grad_segment`, its place in the
    whole ∂zxbcdt: compiled, the last kernel stores there directly, where returning it to be copied in
    cost 3-7% more of a layer's backward at (8, 512), up to 5% at (2-4, 2048) (docs/design.md). Returns
    ∂xBC of the `context` positions before the segment, which belong to the segment before; the
    parameters' gradients from this segment (None where not needed); and ∂(the state entering it).
    """
    heads, groups, eps = w.A.shape[0], cfg.groups, cfg.eps
    layer = _Layer(window, context, w.conv_weight, w.conv_bias, w.dt_bias, cfg.dt_limit, heads, groups)
    x, B, C = layer.x_b_c()
    length = x.shape[1]
    grad_out = grad_out.to(y.dtype)

    # Gated RMSNorm: out = w · n̂, n̂ = g·r, g = y·SiLU(z), r = 1/rms(g) per group.
    normed, inv_rms = _gated_norm(y, layer.z, groups, eps)
    grad_norm_weight = (grad_out * normed).sum((0, 1)) if need[6] else None
    grad_normed = (grad_out * w.norm_weight.to(y.dtype)).unflatten(-1, (groups, -1))
    normed_g = normed.unflatten(-1, (groups, -1))
    projection = (grad_normed * normed_g).mean(-1, keepdim=True)
    grad_gated = grad_normed.sub_(normed_g.mul_(projection)).mul_(inv_rms).flatten(-2)
    grad_y = grad_gated * F.silu(layer.z)
    grad_z = torch.ops.aten.silu_backward(grad_gated.mul_(y), layer.z)  # one fused pass

    # D skip and the scan.
    grad_y_heads = grad_y.unflatten(-1, (heads, -1))  # (b, l, H, P)
    grad_D = (grad_y_heads * x).sum((0, 1, 3)) if need[5] else None
    chunks = Chunks(x, layer.delta, w.A, B, C, cfg.chunk_size)
    grad_x, grad_delta, grad_A, grad_B, grad_C, grad_initial = scan_backward(
        chunks, states_in, to_chunks(grad_y_heads, cfg.chunk_size), grad_final
    )
    grad_x = from_chunks(grad_x, length).addcmul_(w.D.to(x.dtype)[:, None], grad_y_heads)

    # Δ = clamp(softplus(dt + dt_bias)): clamp passes the gradient where it did not bite (as torch's).
    grad_dt = from_chunks(grad_delta, length) * torch.sigmoid(layer.dt_in)
    low, high = cfg.dt_limit
    if low > 0.0 or high < float("inf"):
        soft = F.softplus(layer.dt_in)
        grad_dt.mul_((soft >= low) & (soft <= high))
    grad_dt_bias = grad_dt.sum((0, 1)) if need[3] else None

    # SiLU and the convolution, whose input window starts `context` positions before the segment.
    grad_act = torch.cat(
        [
            grad_x.flatten(-2),
            from_chunks(grad_B, length).flatten(-2),
            from_chunks(grad_C, length).flatten(-2),
        ],
        dim=-1,
    )
    grad_u = torch.ops.aten.silu_backward(grad_act, layer.u)
    grad_conv_bias = grad_u.sum((0, 1)) if need[2] else None
    grad_xbc, grad_conv_weight = causal_conv_backward(
        F.pad(grad_u, (0, 0, context, 0)) if context else grad_u,
        layer.xbc,
        w.conv_weight.to(y.dtype),
        need[1],
    )
    grads = [
        grad_conv_weight,
        grad_conv_bias,
        grad_dt_bias,
        grad_A if need[4] else None,
        grad_D,
        grad_norm_weight,
    ]
    grad_segment.copy_(torch.cat([grad_z, grad_xbc[:, context:], grad_dt], dim=-1))
    return grad_xbc[:, :context], grads, grad_initial


def _window(zxbcdt: Tensor, segment: slice, taps: int) -> tuple[Tensor, int]:
    """A segment's zxbcdt with the positions before it that its convolution reads, and their number."""
    context = min(segment.start, taps - 1)
    return zxbcdt[:, segment.start - context : segment.stop], context


class _MaybeCompiled:
    """`fn` through `torch.compile` if `enabled` (default: `COMPILE`), eager from its first failure on.

    Compiling fuses the ~60 elementwise passes of a segment's forward and backward into a few loops:
    1.4× faster per tile, measured at (1, 512) on 2 cores (docs/design.md). Each tile shape compiles
    once (~10-20 s on 2 cores; later runs load the kernels from inductor's on-disk cache), and `tiles`
    pads to keep the shapes few: one for packed pretraining, one per chunk multiple up to a tile for
    fine-tuning batches of varying length, two or three for rows longer than a tile. That is more
    than dynamo's default of 8 recompiles per function, past which it would run the rest eagerly, so
    calls raise the limit to `RECOMPILES`. Inductor needs a C++ compiler; without one, or on any
    other failure, the layer runs eagerly, after one warning.
    """

    RECOMPILES = 32

    def __init__(self, fn: Callable[..., Any], enabled: bool = COMPILE) -> None:
        self.eager = fn
        # cpp_wrapper: the generated code calls its kernels and allocates its buffers from C++, not
        # Python (~40 of each a tile); one layer's forward + backward measured 3-4% faster at (8, 512)
        # and (8, 2048), for the same compile time (~20 s cold for a (1, 512) tile's two directions).
        # realize_reads_threshold 2 (inductor's default 4): a value read by two kernels is stored once
        # rather than recomputed in each; with the parameters' gradients (their reductions re-derived
        # the activations) 9-10% faster, without them (LoRA) the same.
        options: dict[str, str | int | bool | Callable[..., Any]] = {
            "cpp_wrapper": True,
            "realize_reads_threshold": 2,
        }
        self.compiled: Callable[..., Any] | None = (
            torch.compile(fn, dynamic=False, options=options) if enabled else None
        )

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None:
            try:
                with torch._dynamo.config.patch(recompile_limit=self.RECOMPILES):
                    return self.compiled(*args)
            except Exception as error:  # noqa: BLE001 — any compiler failure falls back to the same math
                first_line = (str(error).strip().splitlines() or [""])[0]  # compiler logs run long
                reason = f"{type(error).__name__}: {first_line}"
                log.warning(
                    "torch.compile failed for %s; running it eagerly (%s)", self.eager.__name__, reason
                )
                self.compiled = None
        return self.eager(*args)


_FORWARD = _MaybeCompiled(_segment_forward)
_BACKWARD = _MaybeCompiled(_segment_backward)


class MixerCore(torch.autograd.Function):
    """RMSNorm(y · SiLU(z)) of one Mamba-2 mixer from its in_proj output zxbcdt; see the module docstring.

    Shapes: zxbcdt (b, l, I + K + H), conv_weight (K, k), conv_bias (K,) or None, dt_bias, A, D (H,),
    norm_weight (I,) → (b, l, I). Computes in float32 (float64 for float64 input), in `tiles` of about
    `tile_tokens` tokens; gradients come back in each input's dtype, and only for the inputs that need
    one (a LoRA run skips the weights'). Saved for backward: zxbcdt (padded as `tiles` says) and, per
    tile and segment, y and the states entering each chunk (b, c, H, P, N: 1/4 of y's size at
    seshu-small's N = P = 64, Q = 64); everything else is recomputed from them.
    """

    @staticmethod
    def forward(
        ctx: Any,
        zxbcdt: Tensor,
        conv_weight: Tensor,
        conv_bias: Tensor | None,
        dt_bias: Tensor,
        A: Tensor,
        D: Tensor,
        norm_weight: Tensor,
        eps: float,
        chunk_size: int,
        groups: int,
        dt_limit: tuple[float, float],
        tile_tokens: int = TILE_TOKENS,
    ) -> Tensor:
        # The convolution reads one tap's weights for all channels at a time (`weight[:, j]`): stored
        # tap-major, that is a contiguous row, where the compiled loops otherwise gathered it with
        # 16 scalar loads per vector.
        tap_major = conv_weight.t().contiguous().t()
        w = _Weights(tap_major, conv_bias, dt_bias, A, D, norm_weight)
        cfg = _Settings(eps, chunk_size, groups, dt_limit)
        batch, length = zxbcdt.shape[:2]
        inner = norm_weight.shape[0]
        dtype = torch.promote_types(zxbcdt.dtype, torch.float32)
        if not zxbcdt.is_cpu:  # tiles keep a CPU core's working set in its L2 cache; a GPU takes it whole
            tile_tokens = max(tile_tokens, batch * length)
        tiling = tiles(batch, length, chunk_size, tile_tokens)
        padded = _pad(zxbcdt, tiling.batch, tiling.length)
        out = zxbcdt.new_empty((tiling.batch, tiling.length, inner), dtype=dtype)
        # Per tile and segment, in order: y and the states entering each chunk, kept as the compiled
        # code returns them (copying them into whole-batch buffers cost more than recomputing the
        # states, and the states' recomputation was ~4% of backward).
        kept: list[Tensor] = []
        for start in range(0, tiling.batch, tiling.rows):
            tile = slice(start, start + tiling.rows)
            state: Tensor | None = None  # entering the segment: none before the first
            for segment in tiling.segments:
                window, context = _window(padded[tile], segment, conv_weight.shape[1])
                y, out[tile, segment], state, chunk_states = _FORWARD(window, context, state, w, cfg)
                kept += [y, chunk_states]
        ctx.save_for_backward(padded, *w, *kept)
        ctx.settings = (cfg, tiling)
        return _crop(out, batch, length).to(zxbcdt.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        padded, *saved = ctx.saved_tensors
        w = _Weights(*saved[: len(_Weights._fields)])
        kept = saved[len(_Weights._fields) :]
        cfg, tiling = ctx.settings
        need = tuple(ctx.needs_input_grad)
        batch, length = grad_out.shape[:2]
        grad_out = _pad(grad_out, tiling.batch, tiling.length)
        segments = tiling.segments
        inner, conv_dim = w.norm_weight.shape[0], w.conv_weight.shape[0]
        grad_zxbcdt = torch.empty(padded.shape, dtype=kept[0].dtype, device=padded.device)
        grad_xbc = grad_zxbcdt[..., inner : inner + conv_dim]
        totals: list[Tensor | None] = [None] * len(w)
        for n, start in enumerate(range(0, tiling.batch, tiling.rows)):
            tile = slice(start, start + tiling.rows)
            grad_state: Tensor | None = None
            grad_context: Tensor | None = None  # ∂xBC of a segment's last positions, from the next one
            for k in reversed(range(len(segments))):
                segment = segments[k]
                window, context = _window(padded[tile], segment, w.conv_weight.shape[1])
                y, chunk_states = kept[2 * (n * len(segments) + k) : 2 * (n * len(segments) + k) + 2]
                grad_context_next, grads, grad_state = _BACKWARD(
                    grad_out[tile, segment],
                    window,
                    context,
                    y,
                    chunk_states,
                    grad_state,
                    w,
                    cfg,
                    need,
                    grad_zxbcdt[tile, segment],
                )
                if grad_context is not None:
                    grad_xbc[tile, segment.stop - grad_context.shape[1] : segment.stop] += grad_context
                grad_context = grad_context_next
                totals = [
                    t if g is None else g if t is None else t.add_(g)
                    for t, g in zip(totals, grads, strict=True)
                ]
        return (
            _crop(grad_zxbcdt, batch, length).to(padded.dtype) if need[0] else None,
            *(None if g is None or p is None else g.to(p.dtype) for g, p in zip(totals, w, strict=True)),
            None,
            None,
            None,
            None,
            None,
        )
