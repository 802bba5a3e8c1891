"""FedAvg: every client trains from the same head; the new head is their ΔWs averaged by example count.

Glossary: see `fedem.policy.base`. Per module, with clients i = 1 … n:

    ΔW'      = Σᵢ (nᵢ / Σⱼ nⱼ) · ΔWᵢ                  (out, in)
    (A', B') = rank-r truncated SVD of ΔW' / scale     (r, in), (out, r)

Because the weights sum to 1 this equals ΔW_head + Σᵢ (nᵢ/Σn) τᵢ: the head's own ΔW needs no special case.

Averaging the factors instead — A' = Σ wᵢ Aᵢ, B' = Σ wᵢ Bᵢ, "FedAvg on LoRA parameters" — is not the average
of the updates: B'A' = Σᵢ Σⱼ wᵢ wⱼ Bᵢ Aⱼ has cross terms Bᵢ Aⱼ (i ≠ j) that no client trained. Here ΔW is
averaged exactly, then projected back to rank r; the projection loses whatever of the average lies beyond
rank r (the average of n rank-r updates can have rank up to n·r), and `Aggregate.projection_error` says
how much.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from fedem.errors import UserError
from fedem.merge import combine
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
)


def example_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """nᵢ / Σn per update, in order; refuses a round without a single example."""
    total = sum(u.num_examples for u in updates)
    if total == 0:
        raise ValueError("cannot weight by examples: every update reports num_examples = 0")
    return [u.num_examples / total for u in updates]


@dataclass(frozen=True)
class FedAvg(Policy):
    """All clients train `steps_per_client` steps from the head in parallel; ΔW is averaged by nᵢ."""

    name = "fedavg"

    steps_per_client: int

    def __post_init__(self) -> None:
        if self.steps_per_client < 1:
            raise UserError(f"steps_per_client must be ≥ 1, got {self.steps_per_client}")

    def configure(self, round: int, clients: Sequence[str], head: AdapterRef) -> RoundPlan:
        return parallel_plan(clients, head, self.steps_per_client)

    def aggregate(
        self, round: int, head: AdapterWeights | None, updates: Sequence[ClientUpdate]
    ) -> Aggregate:
        check_updates(updates, head, same_start=True)
        weights = example_weights(updates)
        deltas = [delta_of(u.result) for u in updates]  # per client: module → ΔWᵢ (out, in)
        mean = {name: combine([d[name] for d in deltas], "linear", weights) for name in deltas[0]}
        adapter, error = project(mean, updates[0].result.ranks, updates[0].result.scale)
        n = ", ".join(f"{u.client}={u.num_examples}" for u in updates)
        return Aggregate(
            adapter=adapter,
            contributors=tuple(u.client for u in updates),
            weights={u.client: w for u, w in zip(updates, weights, strict=True)},
            note=f"fedavg round {round}: ΔW averaged by examples ({n}); "
            f"rank-r projection lost {error:.2%} of it (relative Frobenius)",
            projection_error=error,
        )
