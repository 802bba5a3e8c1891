"""One Mamba-2 mixer's training forward — convolution, scan, gate and norm — as one autograd Function.

While training, transformers' `Mamba2Mixer.forward` first offers the whole layer between its two
projections to `mamba2_split_conv1d_scan_combined` (mamba-ssm's fused CUDA kernel where installed)
and, when that returns None, runs its torch path step by step: a depthwise `F.conv1d` on a transposed
copy of the input, SiLU, the scan, the D skip and the gated RMSNorm, each kept by autograd for
backward. On a CPU that path spends more time on layout copies, the convolution's backward (mkldnn's
depthwise kernel) and activation storage than on arithmetic (docs/design.md, "The fast CPU path").

`split_conv1d_scan_combined` takes that offer on the CPU. `MixerCore` computes the same layer in the
input's own (batch, length, channels) layout — the convolution as k shifted multiply-adds, so there is
no transpose — and saves only its input and the scan's output; backward recomputes the convolution,
the activations, the chunk-boundary states and differentiates each step by hand, the scan through
`fedem.model.ssd`. The output projection stays an ordinary `F.linear` after it, so its weight's
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

from typing import Any

import torch
import torch.nn.functional as F

from fedem.model.ssd import Chunks, from_chunks, scan_backward, to_chunks

Tensor = torch.Tensor


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
    grad_out: Tensor, x: Tensor, weight: Tensor, need_weight: bool, grad_x: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """∂x (b, l, K) and, if asked, ∂weight (K, k) of `causal_conv` (∂bias is ∂out summed over b, l).

    ∂x is written into `grad_x` where given (a slice of a larger gradient), else into a new tensor.
    """
    taps = weight.shape[1]
    grad_x = torch.mul(grad_out, weight[:, -1], out=grad_x)
    for j in range(taps - 1):
        shift = taps - 1 - j
        grad_x[:, :-shift].addcmul_(grad_out[:, shift:], weight[:, j])
    if not need_weight:
        return grad_x, None
    grad_weight = torch.empty_like(weight)
    grad_weight[:, -1] = (grad_out * x).sum((0, 1))
    for j in range(taps - 1):
        shift = taps - 1 - j
        grad_weight[:, j] = (grad_out[:, shift:] * x[:, :-shift]).sum((0, 1))
    return grad_x, grad_weight


def _silu_backward(grad: Tensor, u: Tensor, out: Tensor | None = None) -> Tensor:
    """grad · d SiLU(u)/du, in one pass (ATen's fused kernel), into `out` where given."""
    if out is None:
        return torch.ops.aten.silu_backward(grad, u)
    return torch.ops.aten.silu_backward.grad_input(grad, u, grad_input=out)


class _Layer:
    """The mixer's quantities that forward and backward both compute from zxbcdt (see the glossary)."""

    def __init__(
        self,
        zxbcdt: Tensor,
        conv_weight: Tensor,
        conv_bias: Tensor | None,
        dt_bias: Tensor,
        dt_limit: tuple[float, float],
        heads: int,
        groups: int,
    ) -> None:
        dtype = torch.promote_types(zxbcdt.dtype, torch.float32)
        conv_dim = conv_weight.shape[0]
        self.inner = zxbcdt.shape[-1] - conv_dim - heads
        self.state = (conv_dim - self.inner) // (2 * groups)
        self.heads, self.groups = heads, groups
        z, xbc, dt = zxbcdt.to(dtype).split([self.inner, conv_dim, heads], dim=-1)
        self.z, self.xbc = z, xbc
        self.u = causal_conv(xbc, conv_weight.to(dtype), None if conv_bias is None else conv_bias.to(dtype))
        self.act = F.silu(self.u)  # x, B and C side by side
        self.dt_in = dt + dt_bias.to(dtype)
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


class MixerCore(torch.autograd.Function):
    """RMSNorm(y · SiLU(z)) of one Mamba-2 mixer from its in_proj output zxbcdt; see the module docstring.

    Shapes: zxbcdt (b, l, I + K + H), conv_weight (K, k), conv_bias (K,) or None, dt_bias, A, D (H,),
    norm_weight (I,) → (b, l, I). Computes in float32 (float64 for float64 input); gradients come back
    in each input's dtype, and only for the inputs that need one (a LoRA run skips the weights').
    Saved for backward: zxbcdt and y; everything else is recomputed from them.
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
    ) -> Tensor:
        heads = A.shape[0]
        layer = _Layer(zxbcdt, conv_weight, conv_bias, dt_bias, dt_limit, heads, groups)
        x, B, C = layer.x_b_c()
        chunks = Chunks(x, layer.delta, A, B, C, chunk_size)
        states_in, _ = chunks.states_entering(None)
        length = zxbcdt.shape[1]
        y = from_chunks(chunks.output(states_in), length) + D.to(x.dtype)[:, None] * x  # (b, l, H, P)
        y = y.flatten(-2)
        normed, _ = _gated_norm(y, layer.z, groups, eps)
        out = normed * norm_weight.to(y.dtype)
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, y)
        ctx.settings = (eps, chunk_size, groups, dt_limit)
        return out.to(zxbcdt.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, y = ctx.saved_tensors
        eps, chunk_size, groups, dt_limit = ctx.settings
        need = ctx.needs_input_grad
        heads, length = A.shape[0], zxbcdt.shape[1]
        layer = _Layer(zxbcdt, conv_weight, conv_bias, dt_bias, dt_limit, heads, groups)
        x, B, C = layer.x_b_c()
        grad_out = grad_out.to(y.dtype)

        # One ∂zxbcdt, filled part by part: ∂z, ∂xBC, ∂dt.
        inner, conv_dim = layer.inner, conv_weight.shape[0]
        grad_zxbcdt = torch.empty(zxbcdt.shape, dtype=y.dtype, device=y.device)
        grad_z, grad_xbc, grad_dt = grad_zxbcdt.split([inner, conv_dim, heads], dim=-1)

        # Gated RMSNorm: out = w · n̂, n̂ = g·r, g = y·SiLU(z), r = 1/rms(g) per group.
        normed, inv_rms = _gated_norm(y, layer.z, groups, eps)
        grad_norm_weight = (grad_out * normed).sum((0, 1)) if need[6] else None
        grad_normed = (grad_out * norm_weight.to(y.dtype)).unflatten(-1, (groups, -1))
        normed_g = normed.unflatten(-1, (groups, -1))
        projection = (grad_normed * normed_g).mean(-1, keepdim=True)
        grad_gated = grad_normed.sub_(normed_g.mul_(projection)).mul_(inv_rms).flatten(-2)
        grad_y = grad_gated * F.silu(layer.z)
        _silu_backward(grad_gated.mul_(y), layer.z, out=grad_z)

        # D skip and the scan.
        grad_y_heads = grad_y.unflatten(-1, (heads, -1))  # (b, l, H, P)
        grad_D = (grad_y_heads * x).sum((0, 1, 3)) if need[5] else None
        chunks = Chunks(x, layer.delta, A, B, C, chunk_size)
        states_in, _ = chunks.states_entering(None)  # recomputed (2 ms) rather than kept (8 MiB), at (8, 512)
        grad_x, grad_delta, grad_A, grad_B, grad_C, _ = scan_backward(
            chunks, states_in, to_chunks(grad_y_heads, chunk_size), None
        )
        grad_x = from_chunks(grad_x, length).addcmul_(D.to(x.dtype)[:, None], grad_y_heads)

        # Δ = clamp(softplus(dt + dt_bias)): clamp passes the gradient where it did not bite (as torch's).
        torch.mul(from_chunks(grad_delta, length), torch.sigmoid(layer.dt_in), out=grad_dt)
        low, high = dt_limit
        if low > 0.0 or high < float("inf"):
            soft = F.softplus(layer.dt_in)
            grad_dt.mul_((soft >= low) & (soft <= high))
        grad_dt_bias = grad_dt.sum((0, 1)) if need[3] else None

        # SiLU and the convolution.
        grad_act = torch.cat(
            [
                grad_x.flatten(-2),
                from_chunks(grad_B, length).flatten(-2),
                from_chunks(grad_C, length).flatten(-2),
            ],
            dim=-1,
        )
        grad_u = _silu_backward(grad_act, layer.u, out=grad_act)
        _, grad_conv_weight = causal_conv_backward(
            grad_u, layer.xbc, conv_weight.to(y.dtype), need[1], grad_x=grad_xbc
        )
        grad_conv_bias = grad_u.sum((0, 1)) if need[2] else None

        return (
            grad_zxbcdt.to(zxbcdt.dtype) if need[0] else None,
            None if grad_conv_weight is None else grad_conv_weight.to(conv_weight.dtype),
            None if grad_conv_bias is None else grad_conv_bias.to(conv_bias.dtype),
            None if grad_dt_bias is None else grad_dt_bias.to(dt_bias.dtype),
            grad_A.to(A.dtype) if need[4] else None,
            None if grad_D is None else grad_D.to(D.dtype),
            None if grad_norm_weight is None else grad_norm_weight.to(norm_weight.dtype),
            None,
            None,
            None,
            None,
        )
