"""Relay: the donors of a round fine-tune the adapter one after another, each continuing the last one's.

Glossary: see `fedem.policy.base`. With clients c₀ … c_{n−1} and head adapter θ:

    round t, order o = rotate(c, t mod n) (or a seeded shuffle):  θ → train(o₀) → train(o₁) → … → θ'

There is no averaging: the new head is exactly the last donor's adapter, which carries every donor's
training in sequence (continuous relay fine-tuning). Rotating the order each round keeps any one donor's
data from always being trained last (and so weighing most in what the adapter remembers).
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from fedem.errors import UserError
from fedem.policy.base import (
    AdapterRef,
    AdapterWeights,
    Aggregate,
    ClientUpdate,
    Policy,
    RoundPlan,
    TrainTask,
    check_clients,
    check_updates,
    round_seed,
)

Order = Literal["round-robin", "random"]


@dataclass(frozen=True)
class Relay(Policy):
    """All clients train in sequence, `steps_per_client` steps each; the last donor's adapter is the head.

    order "round-robin": round t starts with clients[t mod n] and goes round the list, so the first (and
    last) donor changes every round. order "random": a shuffle drawn from (seed, round), the same on every
    run. Only the first task's `start` is the head; the driver starts each later task from the adapter the
    previous donor produced.
    """

    name = "relay"

    steps_per_client: int
    order: Order = "round-robin"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps_per_client < 1:
            raise UserError(f"steps_per_client must be ≥ 1, got {self.steps_per_client}")
        if self.order not in get_args(Order):
            raise UserError(f"unknown relay order {self.order!r}; choose one of {', '.join(get_args(Order))}")

    def configure(self, round: int, clients: Sequence[str], head: AdapterRef) -> RoundPlan:
        check_clients(clients)
        if self.order == "round-robin":
            first = round % len(clients)
            order = [*clients[first:], *clients[:first]]
        else:
            order = random.Random(round_seed(self.seed, round)).sample(list(clients), len(clients))
        return RoundPlan(tuple(TrainTask(c, head, self.steps_per_client) for c in order), sequential=True)

    def aggregate(
        self, round: int, head: AdapterWeights | None, updates: Sequence[ClientUpdate]
    ) -> Aggregate:
        """The last update's adapter, as is. `updates` must be in training order (the plan's order)."""
        check_updates(updates, head, same_start=False)
        last = updates[-1]
        order = " → ".join(u.client for u in updates)
        return Aggregate(
            adapter=last.result,
            contributors=tuple(u.client for u in updates),
            weights={last.client: 1.0},
            note=f"relay round {round}: {order}; the head is {last.client}'s adapter",
        )
