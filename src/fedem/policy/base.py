"""The federation policy interface and the data it speaks: plans in, client updates in, one aggregate out.

Glossary (federated learning → here):
    client, donor   someone who trains the adapter on their own data; a plain string id here
    round           one pass of the federation: plan → clients train → aggregate → new head
    head            the current community adapter of a repo (`AdapterRef`; `None` version = fresh, ΔW = 0)
    A, B            LoRA factors of one module: A (r, in), B (out, r)
    r               LoRA rank (per module: `AdapterWeights.ranks`)
    scale           α/r (or α/√r for rsLoRA): ΔW = scale · B @ A
    ΔW              a module's full weight update, shape (out, in)
    τᵢ              client i's task vector ΔWᵢ − ΔW_head: what its round of training added
    nᵢ              client i's number of training examples (`ClientUpdate.num_examples`)

A policy is pure: frozen dataclasses in, frozen dataclasses out, no database, HTTP or disk. The hub drives
it from requests; `fedem simulate` drives the same object in a loop. Tensors stay on CPU.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

# ── data ─────────────────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class AdapterRef:
    """A version of an adapter repo on the hub; `version=None` is a fresh adapter (B = 0, so ΔW = 0)."""

    repo: str
    version: int | None

    def __post_init__(self) -> None:
        if not self.repo:
            raise ValueError("AdapterRef needs a repo name")
        if self.version is not None and self.version < 0:
            raise ValueError(f"adapter versions count from 0, got {self.version}")


@dataclass(frozen=True, eq=False)  # eq=False: `==` on tensors is elementwise, so compare by identity
class AdapterWeights:
    """An in-memory LoRA adapter: module name → (A (r, in), B (out, r)), and the scale α/r of all modules.

    Module names are the targeted `nn.Linear`s (e.g. `backbone.layers.0.mixer.in_proj`). The mapping is
    copied into a read-only view, so an aggregate cannot be changed through the dict it was built from.
    """

    factors: Mapping[str, tuple[Tensor, Tensor]]
    scale: float

    def __post_init__(self) -> None:
        if not self.factors:
            raise ValueError("an adapter needs at least one module")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"adapter scale must be finite and non-zero, got {self.scale}")
        for name, (a, b) in self.factors.items():
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"{name}: need A (r, in) and B (out, r), got A {tuple(a.shape)} and B {tuple(b.shape)}"
                )
            if a.device.type != "cpu" or b.device.type != "cpu":
                raise ValueError(f"{name}: keep adapter tensors on CPU (move them with .cpu())")
        object.__setattr__(self, "factors", MappingProxyType(dict(self.factors)))

    @property
    def ranks(self) -> dict[str, int]:
        """Module name → its rank r."""
        return {name: a.shape[0] for name, (a, _) in self.factors.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Module name → the shape (out, in) of its ΔW."""
        return {name: (b.shape[0], a.shape[1]) for name, (a, b) in self.factors.items()}


@dataclass(frozen=True)
class TrainTask:
    """What one donor is asked to do in a round: train `steps` optimizer steps starting from `start`."""

    client: str
    start: AdapterRef
    steps: int

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"a task needs at least one step, got {self.steps}")


@dataclass(frozen=True)
class RoundPlan:
    """One round's tasks. `sequential`: run them one after another, each from the previous task's result
    (only the first `start` is known in advance; the driver substitutes the rest). Otherwise all at once,
    each from its own `start` (the same head for the parallel policies here)."""

    tasks: tuple[TrainTask, ...]
    sequential: bool

    @property
    def clients(self) -> tuple[str, ...]:
        return tuple(task.client for task in self.tasks)


@dataclass(frozen=True)
class ClientUpdate:
    """What one donor sends back: the adapter it trained from `start`, on `num_examples` examples."""

    client: str
    start: AdapterRef
    result: AdapterWeights
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_examples < 0:
            raise ValueError(f"{self.client}: num_examples must be ≥ 0, got {self.num_examples}")
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))


@dataclass(frozen=True)
class Aggregate:
    """A round's outcome: the new head adapter, who contributed, with which weight, and how.

    `projection_error` is ‖ΔW − scale·B@A‖_F / ‖ΔW‖_F over all modules: how much of the aggregated update was
    lost squeezing it back into rank r (0 when no projection happened or the update fit exactly).
    """

    adapter: AdapterWeights
    contributors: tuple[str, ...]
    weights: Mapping[str, float]
    note: str
    projection_error: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", MappingProxyType(dict(self.weights)))


# ── the interface ────────────────────────────────────────────────────────────────────────────────────────


class Policy(ABC):
    """How a round is run: `configure` says who trains from what, `aggregate` folds their updates into the
    next head, and `accept` may veto a candidate head on its metrics (the hub's own gate runs regardless).

    Subclasses are frozen dataclasses of their options; a new policy is one such class plus an entry in
    `fedem.policy.POLICIES`. Rounds count from 0.
    """

    name: ClassVar[str]

    @abstractmethod
    def configure(self, round: int, clients: Sequence[str], head: AdapterRef) -> RoundPlan:
        """The tasks of round `round` for `clients`, starting from the repo's current `head`."""

    @abstractmethod
    def aggregate(
        self, round: int, head: AdapterWeights | None, updates: Sequence[ClientUpdate]
    ) -> Aggregate:
        """Fold the round's `updates` (in the order they were trained) into the next head. `head` holds the
        weights the round started from (`None`: a fresh adapter, ΔW_head = 0)."""

    def accept(self, candidate_metrics: Mapping[str, float], reference_metrics: Mapping[str, float]) -> bool:
        """Whether to publish a candidate head, given its metrics and the current head's. Default: yes."""
        return True


# ── helpers shared by the policies ───────────────────────────────────────────────────────────────────────


class LoraFactors(NamedTuple):
    """The rank-r factors of a ΔW and what they miss: ‖ΔW − scale · B @ A‖_F."""

    a: Tensor  # (r, in)
    b: Tensor  # (out, r)
    residual: float


class Projection(NamedTuple):
    """An adapter built from full ΔWs, and the relative Frobenius error of squeezing them into its ranks."""

    adapter: AdapterWeights
    relative_error: float


def delta_of(weights: AdapterWeights) -> dict[str, Tensor]:
    """Module name → ΔW = scale · B @ A, float32, shape (out, in)."""
    return {name: weights.scale * (b.float() @ a.float()) for name, (a, b) in weights.factors.items()}


def lora_factors(delta: Tensor, rank: int, scale: float) -> LoraFactors:
    """The best rank-`rank` factors of ΔW (Eckart–Young): B @ A = the truncated SVD of ΔW / scale.

    ΔW/scale = U S Vᵀ; keep the top r singular triplets and split √S to both sides, B = U_r √S_r (out, r) and
    A = √S_r V_rᵀ (r, in), so A and B have matching magnitudes. Exact when rank(ΔW) ≤ r, lossy otherwise:
    `residual` = scale · √(Σ_{i>r} sᵢ²). Fewer than r singular values (min(out, in) < r) are padded with
    zero rows/columns to keep the shapes of a rank-r adapter. Float64 inside, float32 out.
    """
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    out_dim, in_dim = delta.shape
    target = delta.double() / scale  # (out, in): the B @ A wanted
    u, s, vh = torch.linalg.svd(target, full_matrices=False)  # (out, k), (k,), (k, in); k = min(out, in)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()  # (keep,)
    b = torch.zeros(out_dim, rank, dtype=torch.float64)  # (out, r)
    a = torch.zeros(rank, in_dim, dtype=torch.float64)  # (r, in)
    b[:, :keep] = u[:, :keep] * root
    a[:keep] = root[:, None] * vh[:keep]
    residual = abs(scale) * float(s[keep:].square().sum().sqrt())
    return LoraFactors(a.float(), b.float(), residual)


def project(deltas: Mapping[str, Tensor], ranks: Mapping[str, int], scale: float) -> Projection:
    """Squeeze full ΔWs (module → (out, in)) into a LoRA adapter of the given per-module ranks and scale."""
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    lost = total = 0.0  # Σ residual², Σ ‖ΔW‖_F² over modules
    for name in sorted(deltas):
        a, b, residual = lora_factors(deltas[name], ranks[name], scale)
        factors[name] = (a, b)
        lost += residual**2
        total += float(deltas[name].double().square().sum())
    error = math.sqrt(lost / total) if total > 0 else 0.0
    return Projection(AdapterWeights(factors, scale), error)


def check_clients(clients: Sequence[str]) -> None:
    """A round needs clients, each once."""
    if not clients:
        raise ValueError("no clients to plan a round for")
    if len(set(clients)) != len(clients):
        raise ValueError(f"each client can take one task per round, got {list(clients)}")


def check_updates(updates: Sequence[ClientUpdate], head: AdapterWeights | None, same_start: bool) -> None:
    """Updates must exist, come one per client, and have the same modules, shapes, ranks and scale as each
    other and as the head; with `same_start`, all must have started from the same adapter version."""
    if not updates:
        raise ValueError("nothing to aggregate: no client updates")
    check_clients([u.client for u in updates])
    if same_start and len({u.start for u in updates}) > 1:
        starts = {u.client: u.start for u in updates}
        raise ValueError(f"a parallel round merges updates from one head; these started apart: {starts}")
    first = updates[0]
    shapes, ranks, scale = first.result.shapes, first.result.ranks, first.result.scale
    others = [(u.client, u.result) for u in updates[1:]] + ([("head", head)] if head is not None else [])
    for who, adapter in others:
        if adapter.shapes != shapes or adapter.ranks != ranks or not math.isclose(adapter.scale, scale):
            raise ValueError(
                f"{who}'s adapter does not match {first.client}'s (modules, shapes, ranks or scale differ)"
            )


def parallel_plan(clients: Sequence[str], head: AdapterRef, steps: int) -> RoundPlan:
    """Every client trains `steps` steps from the same `head`, all at once."""
    check_clients(clients)
    return RoundPlan(tuple(TrainTask(client, head, steps) for client in clients), sequential=False)


def round_seed(seed: int, round: int) -> int:
    """One seed per (policy seed, round): reproducible, and a new random draw every round."""
    return (seed * 1_000_003 + round) % 2**63
