"""Federation policies: who trains what in a round, and how their updates become the next head adapter.

One small interface (`Policy`: configure / aggregate / accept, in the spirit of Flower's Strategy), one
class per policy, chosen by name from `POLICIES`. See docs/policies.md for the math of each and how to add
one. Policies are pure: the hub and `fedem simulate` drive the same objects.
"""

import inspect
from typing import Any

from fedem.errors import UserError
from fedem.policy.base import (
    AdapterRef,
    AdapterWeights,
    Aggregate,
    ClientUpdate,
    LoraFactors,
    Policy,
    Projection,
    RoundPlan,
    TrainTask,
    delta_of,
    lora_factors,
    project,
)
from fedem.policy.fedavg import FedAvg
from fedem.policy.parallel_merge import ParallelMerge
from fedem.policy.relay import Relay

POLICIES: dict[str, type[Policy]] = {"relay": Relay, "parallel-merge": ParallelMerge, "fedavg": FedAvg}


def make_policy(name: str, **options: Any) -> Policy:
    """The policy registered as `name` in `POLICIES`, built with `options` (its dataclass fields)."""
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as err:
        accepted = ", ".join(inspect.signature(cls).parameters)
        raise UserError(f"policy {name}: {err}; it takes {accepted}") from None
    return cls(**options)


__all__ = [
    "POLICIES",
    "AdapterRef",
    "AdapterWeights",
    "Aggregate",
    "ClientUpdate",
    "FedAvg",
    "LoraFactors",
    "ParallelMerge",
    "Policy",
    "Projection",
    "Relay",
    "RoundPlan",
    "TrainTask",
    "delta_of",
    "lora_factors",
    "make_policy",
    "project",
]
