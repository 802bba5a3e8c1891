"""Parallel merge: every client trains from the same head; their task vectors are merged like `fedem merge`.

Glossary: see `fedem.policy.base` (and `fedem.merge` for the methods). Per module, with clients i = 1 … n:

    τᵢ  = ΔWᵢ − ΔW_head                               (out, in): what client i's training added
    ΔW' = ΔW_head + combine(τ₁ … τₙ; method, w, ρ)     (out, in)
    (A', B') = rank-r truncated SVD of ΔW' / scale     (r, in), (out, r)

`combine` is `fedem.merge.combine`, the same arithmetic as `fedem merge` (linear, task_arithmetic, ties,
dare_linear, dare_ties; peft's merge utils). The methods act on the task vectors, not on the adapters: TIES
trims and sign-elects what each donor *changed*, not the head they all share. Merging ΔW entries and then
projecting to rank r is lossy whenever the merged update has rank > r (TIES and DARE output is dense, of
nearly full rank); `Aggregate.projection_error` reports the loss.

Weights wᵢ: "uniform" uses `fedem merge`'s defaults (1/n for linear, 1 for the others); "examples" shares
that same total out in proportion to nᵢ (linear: nᵢ/Σn, which is FedAvg; the others: n·nᵢ/Σn, mean 1).
DARE's random drops come from (seed, round): the same on every run, a fresh draw each round; torch's global
generator is restored afterwards.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from fedem.errors import UserError
from fedem.merge import DENSITY_METHODS, METHODS, Method, check_density, combine, resolve_weights
from fedem.policy.base import (
    AdapterRef,
    AdapterWeights,
    Aggregate,
    ClientUpdate,
    Policy,
    RoundPlan,
    check_updates,
    delta_of,
    parallel_plan,
    project,
    round_seed,
)
from fedem.policy.fedavg import example_weights

Weighting = Literal["uniform", "examples"]
DEFAULT_DENSITY = 0.5  # for ties / dare_* when no density is given


@dataclass(frozen=True)
class ParallelMerge(Policy):
    """All clients train `steps_per_client` steps from the head in parallel; task vectors merge with `method`.

    `density` (fraction of each τᵢ's entries kept) applies to ties / dare_linear / dare_ties and defaults
    to 0.5 for them; it is refused for linear / task_arithmetic, as in `fedem merge`.
    """

    name = "parallel-merge"

    steps_per_client: int
    method: Method = "ties"
    density: float | None = None
    seed: int = 0
    weighting: Weighting = "uniform"

    def __post_init__(self) -> None:
        if self.steps_per_client < 1:
            raise UserError(f"steps_per_client must be ≥ 1, got {self.steps_per_client}")
        if self.method not in METHODS:
            raise UserError(f"unknown merge method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.weighting not in get_args(Weighting):
            raise UserError(f"unknown weighting {self.weighting!r}; choose one of {get_args(Weighting)}")
        if self.method in DENSITY_METHODS and self.density is None:
            object.__setattr__(self, "density", DEFAULT_DENSITY)
        check_density(self.method, self.density)

    def configure(self, round: int, clients: Sequence[str], head: AdapterRef) -> RoundPlan:
        return parallel_plan(clients, head, self.steps_per_client)

    def merge_weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        """wᵢ per update, in order (see the module docstring)."""
        defaults = resolve_weights(self.method, len(updates), None)
        if self.weighting == "uniform":
            return defaults
        return [sum(defaults) * share for share in example_weights(updates)]

    def aggregate(
        self, round: int, head: AdapterWeights | None, updates: Sequence[ClientUpdate]
    ) -> Aggregate:
        check_updates(updates, head, same_start=True)
        weights = self.merge_weights(updates)
        deltas = [delta_of(u.result) for u in updates]  # per client: module → ΔWᵢ (out, in)
        head_deltas = delta_of(head) if head is not None else None
        merged: dict[str, torch.Tensor] = {}
        # One seeded stream per round, walked in sorted module order: each module gets its own DARE mask.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(round_seed(self.seed, round))
            for name in sorted(deltas[0]):
                base = head_deltas[name] if head_deltas is not None else torch.zeros_like(deltas[0][name])
                taus = [d[name] - base for d in deltas]  # n × (out, in)
                merged[name] = base + combine(taus, self.method, weights, self.density)
        adapter, error = project(merged, updates[0].result.ranks, updates[0].result.scale)
        density = "" if self.density is None else f", density {self.density:g}"
        return Aggregate(
            adapter=adapter,
            contributors=tuple(u.client for u in updates),
            weights={u.client: w for u, w in zip(updates, weights, strict=True)},
            note=f"parallel-merge round {round}: {self.method} of {len(updates)} task vectors{density}, "
            f"{self.weighting} weights; rank-r projection lost {error:.2%} of ΔW (relative Frobenius)",
            projection_error=error,
        )
