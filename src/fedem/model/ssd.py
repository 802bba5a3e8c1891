"""The chunked Mamba-2 scan (SSD) with a hand-written backward that keeps only chunk-boundary states.

transformers' torch scan (`modeling_mamba2.mamba2_chunk_scan`) is the same chunked algorithm, but
autograd keeps every intermediate of it for backward: the (chunk × chunk) decay and score matrices and
the repeated B, C, each of a size (batch, length, heads, 64), a dozen of them per layer. That storage,
not arithmetic, is most of a Seshu's training memory. `ChunkedScan` saves its inputs and the state
entering each chunk — (batch, chunks, heads, head_dim, state), 1/chunk_size of the per-step states —
and its backward recomputes the rest one layer at a time.

While training, `fedem.model.mixer` runs `Chunks` and `scan_backward` per tile of a fixed shape
inside a `torch.compile`d function (docs/design.md); elsewhere (`ChunkedScan`) they run eagerly, since
a compile per new input shape (~1 min for the scan alone on 2 cores) does not pay for itself there —
and `ChunkedScan`'s forward runs as a compiled C loop (`fedem.model.native`) where that applies:
float32 on a CPU, which is every evaluation and generation prefill.

Glossary (as in `fedem.model.scan`, per head and head channel; shapes in the chunked layout):
    x      input                           (b, c, Q, h, p)     b batch, c chunks, Q chunk_size
    Δ      step size (after softplus)      (b, c, Q, h)        h heads, p head_dim
    A      decay rate, negative            (h,)
    B, C   input / output projections      (b, c, Q, g, n)     g groups (r = h/g heads each), n state
    x̄      Δ·x, the discretised input      (b, c, Q, h, p)
    s      cumulative log decay in a chunk (b, c, Q, h)        s_t = Σ_{u ≤ t in the chunk} Δ_u·A
    M      mixing exp(s_l − s_u)·C_l·B_u   (b, c, g, r, l, u)  l, u positions in a chunk; 0 for l < u
    H_in   state entering each chunk       (b, c, h, p, n)     H_in[:, 0] = initial state

Per chunk, positions l ≥ u, with the state entering the chunk H_in and leaving it H_out:
    y_l   = Σ_{u≤l} exp(s_l − s_u)·(C_l·B_u)·x̄_u  +  exp(s_l)·H_in·C_l             (diagonal + off)
    H_out = exp(s_Q)·H_in  +  Σ_u exp(s_Q − s_u)·x̄_u ⊗ B_u
The first sum is a lower-triangular (Q × Q) mixing — a batched matmul; the recurrence over H runs
once per chunk, not per step. Backward differentiates these two lines by hand (see `scan_backward`).
"""

from typing import Any

import torch
import torch.nn.functional as F

from fedem.model import native

Tensor = torch.Tensor


def to_chunks(t: Tensor, chunk_size: int) -> Tensor:
    """(b, l, …) → (b, c, Q, …), zero-padding the length to a multiple of Q.

    Zero padding is exact here: a padded step has Δ = 0, so it neither decays nor feeds the state.
    """
    pad = -t.shape[1] % chunk_size
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(t.shape[0], -1, chunk_size, *t.shape[2:])


def from_chunks(t: Tensor, length: int) -> Tensor:
    """(b, c, Q, …) → (b, length, …), dropping the padding."""
    return t.flatten(1, 2)[:, :length]


def _by_group(t: Tensor, groups: int) -> Tensor:
    """Split the head axis of (b, c, Q, h, …) into (g, r): heads of a group share B and C."""
    return t.unflatten(3, (groups, -1))


# The contractions that involve B, C or a state run as one matmul per chunk and group, on matrices taken
# from the chunked layout without a copy (for one group; with several, matmul copies the strided batch):
#   rows      (b, c, Q, g, r, p) ↔ (b·c, g, Q, r·p)   a row per position: x̄, ∂y and the like
#   mats      (b, c, Q, g, n)    → (b·c, g, Q, n)     B and C
#   state     (b, c, h, p, n)    ↔ (b·c, g, r·p, n)   H_in, G_out
# Only the within-chunk (Q × Q) mixing, which differs per head, goes through einsum per head.


def _rows(t: Tensor) -> Tensor:
    return t.flatten(-2).flatten(0, 1).transpose(1, 2)


def _from_rows(t: Tensor, batch: int, heads_per_group: int) -> Tensor:
    return t.transpose(1, 2).unflatten(-1, (heads_per_group, -1)).unflatten(0, (batch, -1))


def _mats(t: Tensor) -> Tensor:
    return t.flatten(0, 1).transpose(1, 2)


def _state_mats(t: Tensor, groups: int) -> Tensor:
    return t.flatten(0, 1).unflatten(1, (groups, -1)).flatten(2, 3)


def _from_state_mats(t: Tensor, batch: int, heads: int) -> Tensor:
    return t.unflatten(0, (batch, -1)).flatten(2, 3).unflatten(2, (heads, -1))


class Chunks:
    """The quantities of one forward pass that both directions use, in the chunked layout."""

    def __init__(self, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int) -> None:
        dtype = torch.promote_types(x.dtype, torch.float32)
        self.groups = B.shape[2]
        self.batch = x.shape[0]
        self.x = to_chunks(x.to(dtype), chunk_size)  # (b, c, Q, h, p)
        self.delta = to_chunks(delta.to(dtype), chunk_size)  # (b, c, Q, h)
        self.heads_per_group = self.x.shape[3] // self.groups
        self.A = A.to(dtype)  # (h,)
        self.B = to_chunks(B.to(dtype), chunk_size)  # (b, c, Q, g, n)
        self.C = to_chunks(C.to(dtype), chunk_size)  # (b, c, Q, g, n)
        self.B_mats, self.C_mats = _mats(self.B), _mats(self.C)  # (b·c, g, Q, n)
        self.s = torch.cumsum(self.delta * self.A, dim=2)  # (b, c, Q, h)
        self.x_bar = _by_group(self.x * self.delta[..., None], self.groups)  # (b, c, Q, g, r, p)
        # exp(s_l − s_u) for l ≥ u, 0 above the diagonal (masked before exp: s_l − s_u > 0 there).
        s_h = self.s.transpose(2, 3)  # (b, c, h, Q)
        causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
        log_decay = (s_h[..., :, None] - s_h[..., None, :]).masked_fill_(~causal, -torch.inf)
        self.decay = log_decay.exp_().unflatten(2, (self.groups, -1))  # (b, c, g, r, l, u)
        # C_l·B_u, shared by the heads of a group, times the decay: the mixing M (b, c, g, r, l, u).
        self.scores = (self.C_mats @ self.B_mats.transpose(-1, -2)).unflatten(0, (self.batch, -1))
        self.mixing = self.scores[:, :, :, None] * self.decay
        self.decay_in = _by_group(self.s.exp(), self.groups)[..., None]  # exp(s_l): (b, c, Q, g, r, 1)
        decay_out = (self.s[:, :, -1:] - self.s).exp()  # exp(s_Q − s_u)
        self.decay_out = _by_group(decay_out, self.groups)[..., None]  # (b, c, Q, g, r, 1)
        self.chunk_decay = self.s[:, :, -1].exp()[..., None, None]  # exp(s_Q): (b, c, h, 1, 1)

    def states_entering(self, initial: Tensor | None) -> tuple[Tensor, Tensor]:
        """H_in per chunk (b, c, h, p, n) and the final state (b, h, p, n): the one sequential part."""
        x_bar_out = self.x_bar * self.decay_out
        local = _rows(x_bar_out).transpose(-1, -2) @ self.B_mats  # Σ_u x̄_u ⊗ B_u: (b·c, g, r·p, n)
        local = _from_state_mats(local, self.batch, self.x.shape[3])  # (b, c, h, p, n)
        # Out of place, then stacked: written into slices of one buffer, the steps came out of
        # torch.compile as one expression per chunk that recomputed the whole chain before it.
        states = [local.new_zeros(local[:, 0].shape) if initial is None else initial.to(local.dtype)]
        for k in range(local.shape[1]):
            states.append(torch.addcmul(local[:, k], self.chunk_decay[:, k], states[-1]))
        return torch.stack(states[:-1], dim=1), states[-1]

    def output(self, states_in: Tensor) -> Tensor:
        """y (b, c, Q, h, p): the diagonal (within-chunk) plus the off-diagonal (entering state) term."""
        y_diag = torch.einsum("bcgrlu,bcugrp->bclgrp", self.mixing, self.x_bar)
        return torch.addcmul(y_diag, self.off_diagonal_raw(states_in), self.decay_in).flatten(3, 4)

    def off_diagonal_raw(self, states_in: Tensor) -> Tensor:
        """H_in·C_l, the off-diagonal term before its decay exp(s_l): (b, c, Q, g, r, p)."""
        h_in = _state_mats(states_in, self.groups)  # (b·c, g, r·p, n)
        return _from_rows(self.C_mats @ h_in.transpose(-1, -2), self.batch, self.heads_per_group)


def scan_backward(
    chunks: Chunks, states_in: Tensor, grad_y: Tensor, grad_final: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. x, Δ, A, B, C and the initial state, all in the chunked layout.

    Writing ∂ for the gradient of the loss, per chunk (G_out = ∂H_out, from later chunks):
        ∂H_in    = exp(s_Q)·G_out + Σ_l exp(s_l)·∂y_l ⊗ C_l                    (a reverse recurrence)
        ∂x̄_u    = Σ_{l≥u} M_lu·∂y_l + exp(s_Q − s_u)·G_out·B_u
        ∂M_lu    = ∂y_l·x̄_u,   ∂(C_l·B_u) = Σ_heads ∂M_lu·exp(s_l − s_u)   → ∂C, ∂B (diagonal)
        ∂C_l    += exp(s_l)·∂y_l·H_in,   ∂B_u += exp(s_Q − s_u)·x̄_u·G_out
        ∂s_l     = Σ_u ∂M_lu·M_lu − Σ_u ∂M_ul·M_ul  +  ∂y_l·y_off_l  −  e_l
                   with e_u = x̄_u·exp(s_Q − s_u)·G_out·B_u
        ∂s_Q    += exp(s_Q)·⟨G_out, H_in⟩ + Σ_u e_u
    then ∂a = reverse cumsum of ∂s within the chunk (s is a cumsum of a = Δ·A), and x̄ = Δ·x.
    """
    groups, batch, per_group = chunks.groups, chunks.batch, chunks.heads_per_group
    dy = _by_group(grad_y, groups)  # (b, c, Q, g, r, p)

    # The reverse recurrence over chunks for G_out (b, c, h, p, n) and the initial state's gradient.
    dy_in = dy * chunks.decay_in
    from_outputs = _rows(dy_in).transpose(-1, -2) @ chunks.C_mats  # (b·c, g, r·p, n)
    from_outputs = _from_state_mats(from_outputs, batch, chunks.x.shape[3])  # (b, c, h, p, n)
    # Stacked at the end, not written into slices: see `Chunks.states_entering`.
    grads = [from_outputs.new_zeros(from_outputs[:, 0].shape) if grad_final is None else grad_final]
    for k in range(from_outputs.shape[1] - 1, -1, -1):
        grads.append(torch.addcmul(from_outputs[:, k], chunks.chunk_decay[:, k], grads[-1]))
    grad_out, grad_initial = torch.stack(grads[-2::-1], dim=1), grads[-1]
    h_in, g_out = _state_mats(states_in, groups), _state_mats(grad_out, groups)  # (b·c, g, r·p, n)

    # Diagonal term.
    grad_x_bar = torch.einsum("bcgrlu,bclgrp->bcugrp", chunks.mixing, dy)
    grad_mixing = torch.einsum("bclgrp,bcugrp->bcgrlu", dy, chunks.x_bar)
    grad_scores = (grad_mixing * chunks.decay).sum(3)  # (b, c, g, l, u)
    grad_C = torch.einsum("bcglu,bcugn->bclgn", grad_scores, chunks.B)
    grad_B = torch.einsum("bcglu,bclgn->bcugn", grad_scores, chunks.C)
    weighted = grad_mixing.mul_(chunks.mixing)  # ∂M ⊙ M: (b, c, g, r, l, u)
    grad_s = (weighted.sum(-1) - weighted.sum(-2)).movedim(-1, 2)  # (b, c, Q, g, r)

    # Off-diagonal term: y_off_l = exp(s_l)·H_in·C_l, so ∂y_l·y_off_l = (exp(s_l)·∂y_l)·(H_in·C_l).
    grad_C += (_rows(dy_in) @ h_in).transpose(1, 2).unflatten(0, (batch, -1))
    grad_s += (dy_in * chunks.off_diagonal_raw(states_in)).sum(-1)

    # The state leaving the chunk: H_out = exp(s_Q)·H_in + Σ_u exp(s_Q − s_u)·x̄_u ⊗ B_u.
    x_bar_out = chunks.x_bar * chunks.decay_out
    g_out_b = _from_rows(chunks.B_mats @ g_out.transpose(-1, -2), batch, per_group)  # G_out·B_u
    grad_x_bar.addcmul_(g_out_b, chunks.decay_out)
    grad_B += (_rows(x_bar_out) @ g_out).transpose(1, 2).unflatten(0, (batch, -1))
    from_state = (x_bar_out * g_out_b).sum(-1)  # e_u: (b, c, Q, g, r)
    grad_s -= from_state
    through = (grad_out * states_in).sum((-2, -1)) * chunks.chunk_decay[..., 0, 0]  # exp(s_Q)·⟨G_out, H_in⟩
    grad_s[:, :, -1] += from_state.sum(2) + through.unflatten(2, (groups, -1))

    grad_s = grad_s.flatten(3, 4)  # (b, c, Q, h)
    grad_a = grad_s.flip(2).cumsum(2).flip(2)  # s = cumsum(a): ∂a_t = Σ_{l ≥ t} ∂s_l
    grad_x_bar = grad_x_bar.flatten(3, 4)  # (b, c, Q, h, p)
    grad_delta = grad_a * chunks.A + (grad_x_bar * chunks.x).sum(-1)
    grad_A = (grad_a * chunks.delta).sum((0, 1, 2))
    grad_x = grad_x_bar * chunks.delta[..., None]
    return grad_x, grad_delta, grad_A, grad_B, grad_C, grad_initial


class ChunkedScan(torch.autograd.Function):
    """y, final state = the Mamba-2 scan of (x, Δ, A, B, C) from `initial` (None: zeros).

    Shapes: x (b, l, h, p), Δ (b, l, h), A (h,), B and C (b, l, g, n), initial (b, h, p, n) or None.
    Computes in float32 (float64 for float64 inputs); gradients come back in each input's dtype.
    Saved for backward: the inputs (which the caller's graph holds anyway) and H_in (b, c, h, p, n).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        initial: Tensor | None,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor]:
        if native.usable(x, delta, A, B, C, initial, chunk_size):
            x_c, delta_c, B_c, C_c = (to_chunks(t, chunk_size) for t in (x, delta, B, C))
            keep = any(ctx.needs_input_grad)  # the chunk states, for a backward
            y_c, states_in, final = native.forward(x_c, delta_c, A, B_c, C_c, initial, keep)
            y = from_chunks(y_c, x.shape[1])
        else:
            chunks = Chunks(x, delta, A, B, C, chunk_size)
            states_in, final = chunks.states_entering(initial)
            y = from_chunks(chunks.output(states_in), x.shape[1])
        ctx.save_for_backward(x, delta, A, B, C, states_in)
        ctx.chunk_size = chunk_size
        ctx.has_initial = initial is not None
        ctx.initial_dtype = None if initial is None else initial.dtype
        return y, final

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor | None, grad_final: Tensor | None) -> tuple[Tensor | None, ...]:
        x, delta, A, B, C, states_in = ctx.saved_tensors
        length = x.shape[1]
        chunks = Chunks(x, delta, A, B, C, ctx.chunk_size)
        if grad_y is None:
            grad_y = x.new_zeros(x.shape, dtype=states_in.dtype)
        grad_y = to_chunks(grad_y.to(states_in.dtype), ctx.chunk_size)
        if grad_final is not None:
            grad_final = grad_final.to(states_in.dtype)
        grad_x, grad_delta, grad_A, grad_B, grad_C, grad_initial = scan_backward(
            chunks, states_in, grad_y, grad_final
        )
        return (
            from_chunks(grad_x, length).to(x.dtype),
            from_chunks(grad_delta, length).to(delta.dtype),
            grad_A.to(A.dtype),
            from_chunks(grad_B, length).to(B.dtype),
            from_chunks(grad_C, length).to(C.dtype),
            grad_initial.to(ctx.initial_dtype) if ctx.has_initial else None,
            None,
        )


def chunked_scan(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    initial: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`ChunkedScan.apply` with types: y (b, l, h, p) and the final state (b, h, p, n)."""
    y, final = ChunkedScan.apply(x, delta, A, B, C, initial, chunk_size)
    return y, final
