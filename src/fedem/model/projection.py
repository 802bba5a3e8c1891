"""A Mamba-2 mixer's in_proj, with its product computed over whole BLAS tiles.

in_proj is I + K + H wide: 2·640 + 128 + 10 = 1,418 columns at seshu-small. BLAS computes a product's
output in tiles of a fixed number of columns, and a width that is not a whole number of them leaves a
ragged last tile: MKL on an AMD EPYC (AVX2, 2 cores) took 41.7 ms for (4096, 328)·(328, 1418) and
24.4 ms with the weight padded by 6 zero rows to 1,424 (docs/design.md, "Whole BLAS tiles"). A
transformer avoids this by construction (Llama's SwiGLU width is rounded up to a multiple of 64);
Mamba's in_proj width is a sum of its parts, in mamba_ssm as in transformers.

`TiledProduct` multiplies by the weight padded with zero rows to a multiple of `TILE` and returns the
first `out` columns of the product: a view whose rows are `whole_tiles(out)` apart, so nothing is
copied (the mixer's compiled code reads it as it is). Backward needs no padding: ∂x = ∂y·W has W's
`in` columns, and ∂W = ∂yᵀ·x ran at full speed at 1,418 rows.

`TiledLinear` is an `nn.Linear` whose forward on a CPU is `TiledProduct`; its parameters, their names
and the saved checkpoint are the Linear's, so a Seshu checkpoint stays a plain `Mamba2ForCausalLM`.
`tile_projections` swaps it in for each mixer's in_proj of a model fedem builds or loads.
"""

from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

Tensor = torch.Tensor

TILE = 16
"""Output columns per BLAS tile that products are padded to: MKL's AVX2 and AVX-512 kernels use 8 or 16."""


def whole_tiles(columns: int) -> int:
    """`columns` rounded up to a multiple of `TILE`."""
    return -(-columns // TILE) * TILE


def tiled_product(rows: Tensor, blocks: tuple[Tensor, ...], bias: Tensor | None) -> Tensor:
    """rows·[W₁ | W₂ | …]ᵀ + bias, rows (T, in), the weight's column blocks Wₖ (out, inₖ) summing to
    `in` → (T, out): a view into the product by the blocks written side by side, once, into a buffer
    padded with zero rows to `whole_tiles(out)`."""
    out, width = blocks[0].shape[0], sum(block.shape[1] for block in blocks)
    wide = whole_tiles(out)
    padded = blocks[0].new_zeros(wide, width)
    start = 0
    for block in blocks:
        padded[:out, start : start + block.shape[1]] = block
        start += block.shape[1]
    if bias is None:
        return (rows @ padded.t())[:, :out]
    return torch.addmm(F.pad(bias, (0, wide - out)), rows, padded.t())[:, :out]


class TiledProduct(torch.autograd.Function):
    """x·Wᵀ + b, computed over whole tiles: x (…, in), weight (out, in), bias (out,) or None → a
    (…, out) view into a (T, whole_tiles(out)) product. Gradients only for the inputs that need one."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        rows = x.reshape(-1, weight.shape[1])  # (T, in)
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return tiled_product(rows, (weight,), bias).unflatten(0, x.shape[:-1])

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        rows, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (T, out)
        return (
            (g @ weight).view(ctx.x_shape) if need_x else None,
            g.t() @ rows if need_weight else None,
            g.sum(0) if need_bias and ctx.has_bias else None,
        )


MIN_ROWS = 256
"""Fewer input rows than this take the Linear's own product: `tiled_product` copies the weight into its
padded form on every call, which a training or prompt batch repays many times over and one new
token's product (a few rows) does not."""


def few_rows(x: Tensor) -> bool:
    """Whether `x` (…, in) has fewer than `MIN_ROWS` rows: too few to repay a padded weight's copy."""
    return x.numel() < MIN_ROWS * x.shape[-1]


class TiledLinear(torch.nn.Linear):
    """`nn.Linear` whose forward is `TiledProduct` for at least `MIN_ROWS` rows on a CPU where its width
    is not whole tiles; the Linear's own otherwise (and under autocast)."""

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_cpu or self.out_features % TILE == 0 or few_rows(x) or torch.is_autocast_enabled("cpu"):
            return super().forward(x)
        return TiledProduct.apply(x, self.weight, self.bias)


def tile_projections(model: torch.nn.Module) -> None:
    """Make each Mamba-2 mixer's plain `nn.Linear` in_proj in `model` a `TiledLinear`, in place.

    The module keeps its parameters, hooks and place: only its class changes, as
    `torch.nn.utils.parametrize` changes a module's class (TiledLinear adds no state). A model without
    Mamba-2 mixers is left as it is.
    """
    for module in model.modules():
        if isinstance(module, Mamba2Mixer) and type(module.in_proj) is torch.nn.Linear:
            module.in_proj.__class__ = TiledLinear
