"""peft's LoRA layer for a Linear, with its forward and backward as one autograd Function.

peft's `lora.Linear` computes `result + lora_B(lora_A(dropout(x))) * scaling`: on in_proj's output,
(batch·length, 1,418) floats at seshu-small's width, that is a scaled copy and a sum in forward and the
scaled copy again in backward — three passes over memory ~20× the size of the adapter's own products,
and autograd runs the thin rank-r matmuls as separate passes over the gradient. `LowRankLinear` folds
the adapter into the base matmul instead:

    forward     y  = [x | h] · [W | s·B]ᵀ + b           h = dropout(x) · Aᵀ     (T, r)
    backward    [∂x | t] = ∂y · [W | B]                   one pass over ∂y for both
                ∂dropout(x) = s · t · A,   ∂A = s · tᵀ · dropout(x),   ∂B = s · ∂yᵀ · h

with T positions, W (out, in), A (r, in), B (out, r), s = alpha / r. Where x needs no gradient (the
first layer's input under a frozen embedding), backward computes t = ∂y·B alone. Measured on in_proj
of seshu-small at batch 8, L=512, base frozen (2 cores, docs/design.md, "LoRA targets"): forward +
backward 37.6 → 27.1 ms on an Intel Xeon, against 21.9 ms for the frozen Linear alone; on an AMD EPYC
(AVX2), 101 ms through peft's layer and 61 ms through this one, the frozen Linear's 60 (∂B's product
in the layout below and whole BLAS tiles in forward took 25 ms off).

Dropout (peft's `nn.Dropout` before A, p = 0.05 in `fedem finetune`) draws one random number per
element of x: 10–15 ms at in_proj's (4096, 320) on an AMD EPYC, against 0.9 ms for x·Aᵀ, and with its
backward ~10% of a LoRA step of seshu-small. `dropped_positions` draws the same Bernoulli mask as the
gaps between dropped elements, ~p·numel numbers (3.3 ms there), and the layer zeroes those elements
of its copy of x and of the adapter's share of ∂x: a LoRA step with dropout 0.05 then took the time
of one without (0.999×, against 1.096× through `nn.Dropout`; docs/design.md, "LoRA dropout").

`LoraLinear` is peft's `lora.Linear` with that forward; everything else — adapter names, merging,
saving (the same `lora_A`/`lora_B` tensors, the same adapter_config.json), variants, dtype casting —
is peft's. It takes the fused path for the plain case (one active vanilla adapter, not merged, no
LoRA bias, `nn.Dropout` or none, no autocast, one dtype throughout) and hands any other to peft's own
forward, as it does a decoding step (fewer than `MIN_ROWS` rows, no gradients), where joining the
weights costs more than peft's three thin products (0.81 against 0.46 ms a layer at seshu-small's
in_proj, one new token of a batch of 8; merged, 0.20).
`with_fused_layers` registers it on a `LoraConfig` through peft's custom-module API; the registration
is not saved, so a saved adapter loads with plain peft.
"""

from typing import Any, cast

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from fedem.model.projection import TiledLinear, few_rows, tiled_product

Tensor = torch.Tensor


def dropped_positions(numel: int, p: float, device: torch.device) -> Tensor:
    """Flat indices (sorted) of the elements that dropout with probability `p` zeroes among `numel`.

    Each element is dropped independently with probability p, as by `nn.Dropout`, but the draw is of
    the gaps between successive drops, Geometric(p) on {1, 2, …}: ~p·numel random numbers rather than
    one per element. Gaps add up in float64, exact past float32's 2²⁴.
    """
    expected = numel * p
    draws = int(expected + 4 * (expected * (1 - p)) ** 0.5) + 1  # rarely too few: then draw again
    chunks, last = [], -1.0
    while last < numel:
        positions = torch.empty(draws, dtype=torch.float64, device=device).geometric_(p).cumsum_(0).add_(last)
        chunks.append(positions)
        last = float(positions[-1])
    positions = torch.cat(chunks).long()
    return positions[positions < numel]


class LowRankLinear(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(x_d·Aᵀ)·Bᵀ, x_d = x with the elements at `dropped` zeroed and the rest scaled
    by 1/(1 − p) (dropout; `dropped` None: x itself); see the module docstring.

    Shapes: x (…, in), weight (out, in), bias (out,) or None, lora_A (r, in), lora_B (out, r), dropped
    (D,) flat indices into x → (…, out). The product runs over whole BLAS tiles, as
    `fedem.model.projection.TiledProduct`'s, and the output is its view as there where `tiled`, else a
    contiguous copy, as a plain Linear's output (other models' code may `view` it). Gradients only for
    the inputs that need one (a frozen base gets none).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora_A: Tensor,
        lora_B: Tensor,
        scaling: float,
        dropped: Tensor | None,
        p: float,
        tiled: bool,
    ) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (T, in)
        if dropped is None:
            rows_d = rows
            h = rows @ lora_A.t()  # (T, r)
        else:
            rows_d = rows.clone(memory_format=torch.contiguous_format)
            rows_d.view(-1).index_fill_(0, dropped, 0)  # dropout's zeros; 1/(1 − p) is applied to h
            h = (rows_d @ lora_A.t()).div_(1 - p)
        y = tiled_product(torch.cat([rows, h], dim=1), (weight, lora_B * scaling), bias)
        y = y if tiled else y.contiguous()
        ctx.save_for_backward(rows, weight, lora_A, lora_B, h, rows_d, dropped)
        ctx.scaling, ctx.keep = scaling, 1 - p
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return y.unflatten(0, x.shape[:-1])

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        rows, weight, lora_A, lora_B, h, rows_d, dropped = ctx.saved_tensors
        need_x, need_weight, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        width = weight.shape[1]
        # The adapter's path scales by s, and by 1/(1 − p) the elements dropout kept.
        s = ctx.scaling if dropped is None else ctx.scaling / ctx.keep
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (T, out)
        if need_x:
            both = g @ torch.cat([weight, lora_B], dim=1)  # [∂x from the base | t]: (T, in + r)
            t = both[:, width:]
        else:  # the first layer under a frozen embedding: only the adapter's t, not the base's ∂x
            t = (lora_B.t() @ g.t()).t()
        grad_x = None
        if need_x:  # the adapter's share of ∂x joins the base's…
            grad_x = torch.addmm(both[:, :width], t, lora_A, alpha=s)
            if dropped is not None:  # …but where dropout zeroed x, the base's share alone
                in_both = dropped + (dropped // width) * (both.shape[1] - width)  # (i, j) in both
                grad_x.view(-1).index_copy_(0, dropped, both.view(-1)[in_both])
        return (
            None if grad_x is None else grad_x.view(ctx.x_shape),
            g.t() @ rows if need_weight else None,
            g.sum(0) if need_bias and ctx.has_bias else None,
            (t.t() @ rows_d).mul_(s) if need_A else None,
            # ∂Bᵀ = hᵀ·∂y, transposed back: MKL's (out, T)·(T, r) product, with the transposed ∂y,
            # ran at ~4 GFLOP/s on an AMD EPYC (30 ms at in_proj's (4096, 1418); this one 4 ms).
            (h.t() @ g).mul_(ctx.scaling).t() if need_B else None,
            None,
            None,
            None,
            None,
        )


class LoraLinear(PeftLoraLinear):
    """peft's `lora.Linear`, forward and backward fused by `LowRankLinear` in the plain case."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adapter = self._plain_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = cast(torch.nn.Linear, self.get_base_layer())  # `_plain_adapter` checked its type
        dropout = self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
        return LowRankLinear.apply(
            x,
            base.weight,
            base.bias,
            self.lora_A[adapter].weight,
            self.lora_B[adapter].weight,
            self.scaling[adapter],
            dropped_positions(x.numel(), p, x.device) if p > 0 else None,
            p,
            type(base) is TiledLinear,
        )

    def _plain_adapter(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The one active adapter if `LowRankLinear` computes exactly what peft would, else None."""
        active = [name for name in self.active_adapters if name in self.lora_A]
        if args or kwargs or self.disable_adapters or self.merged or len(active) != 1:
            return None
        if few_rows(x) and not torch.is_grad_enabled():
            return None  # a decoding step: peft's three thin products cost less than joining weights
        name = active[0]
        base = self.get_base_layer()
        weights = (base.weight, self.lora_A[name].weight, self.lora_B[name].weight)
        if (
            name in self.lora_variant
            or self.lora_B[name].bias is not None
            or type(self.lora_dropout[name]) not in (torch.nn.Identity, torch.nn.Dropout)
            or type(base) not in (torch.nn.Linear, TiledLinear)
            or torch.is_autocast_enabled(x.device.type)
            or any(w.dtype != x.dtype for w in weights)
        ):
            return None
        return name


def with_fused_layers(config: LoraConfig) -> LoraConfig:
    """`config`, with `LoraLinear` registered for the `nn.Linear` layers it targets."""
    config._register_custom_module({torch.nn.Linear: LoraLinear})
    return config
