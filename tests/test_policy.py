"""Federation policies, checked numerically on hand-built client updates (no model, no hub)."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest
import torch

from fedem.errors import UserError
from fedem.merge import combine
from fedem.policy import (
    POLICIES,
    AdapterRef,
    AdapterWeights,
    Aggregate,
    ClientUpdate,
    FedAvg,
    ParallelMerge,
    Policy,
    Relay,
    RoundPlan,
    delta_of,
    lora_factors,
    make_policy,
    project,
)
from fedem.policy.base import parallel_plan

HEAD = AdapterRef("seshu-hi", 3)
CLIENTS = ("asha", "bala", "chitra")
MODULES = ("backbone.layers.0.mixer.in_proj", "backbone.layers.1.mixer.in_proj")
SCALE = 2.0  # α/r = 8/4


def adapter(
    seed: int, rank: int = 4, out: int = 6, inp: int = 5, a: torch.Tensor | None = None
) -> AdapterWeights:
    """Random factors on MODULES; `a` (r, in) fixes every module's A (shared A ⇒ sums stay rank ≤ r)."""
    g = torch.Generator().manual_seed(seed)
    return AdapterWeights(
        {
            m: (
                a if a is not None else torch.randn(rank, inp, generator=g),
                torch.randn(out, rank, generator=g),
            )
            for m in MODULES
        },
        SCALE,
    )


def full_rank(deltas: dict[str, torch.Tensor]) -> AdapterWeights:
    """An adapter holding arbitrary ΔWs exactly: r = in, A = I (in, in), B = ΔW / scale (out, in)."""
    return AdapterWeights({m: (torch.eye(d.shape[1]), d / SCALE) for m, d in deltas.items()}, SCALE)


def update(client: str, result: AdapterWeights, n: int = 10, loss: float = 1.0) -> ClientUpdate:
    return ClientUpdate(client, HEAD, result, num_examples=n, metrics={"loss": loss})


def close(x: torch.Tensor, y: torch.Tensor, atol: float = 1e-5) -> bool:
    return torch.allclose(x.double(), y.double(), atol=atol, rtol=0)


# ── Relay ────────────────────────────────────────────────────────────────────────────────────────────────


def test_relay_plan_is_sequential_and_rotates() -> None:
    relay = Relay(steps_per_client=50)
    plans = [relay.configure(r, CLIENTS, HEAD) for r in range(4)]
    assert all(p.sequential for p in plans)
    assert [p.clients for p in plans] == [
        ("asha", "bala", "chitra"),
        ("bala", "chitra", "asha"),
        ("chitra", "asha", "bala"),
        ("asha", "bala", "chitra"),
    ]
    assert {(t.start, t.steps) for p in plans for t in p.tasks} == {(HEAD, 50)}


def test_relay_random_order_is_a_seeded_shuffle() -> None:
    relay = Relay(steps_per_client=5, order="random", seed=7)
    orders = [relay.configure(r, CLIENTS, HEAD).clients for r in range(12)]
    assert all(sorted(o) == sorted(CLIENTS) for o in orders)
    assert orders == [Relay(5, "random", 7).configure(r, CLIENTS, HEAD).clients for r in range(12)]
    assert len(set(orders)) > 1  # a fresh draw per round


def test_relay_aggregate_is_the_last_update_exactly() -> None:
    updates = [update(c, adapter(i)) for i, c in enumerate(("bala", "chitra", "asha"))]
    agg = Relay(steps_per_client=5).aggregate(1, adapter(99), updates)
    assert agg.adapter is updates[-1].result
    assert agg.contributors == ("bala", "chitra", "asha")
    assert dict(agg.weights) == {"asha": 1.0}
    assert agg.projection_error == 0.0


# ── FedAvg ───────────────────────────────────────────────────────────────────────────────────────────────


def test_fedavg_plan_is_parallel_from_the_head() -> None:
    plan = FedAvg(steps_per_client=20).configure(5, CLIENTS, HEAD)
    assert not plan.sequential
    assert plan.clients == CLIENTS
    assert all(t.start == HEAD and t.steps == 20 for t in plan.tasks)


def test_fedavg_is_the_example_weighted_mean_of_delta_w() -> None:
    shared_a = torch.randn(
        4, 5, generator=torch.Generator().manual_seed(0)
    )  # (r, in): the mean stays rank ≤ r
    counts = {"asha": 100, "bala": 300, "chitra": 600}
    updates = [update(c, adapter(i, a=shared_a), n=counts[c]) for i, c in enumerate(CLIENTS)]
    agg = FedAvg(steps_per_client=5).aggregate(0, None, updates)

    total = sum(counts.values())
    for m in MODULES:
        expected = sum(counts[u.client] / total * SCALE * u.result.factors[m][1] @ shared_a for u in updates)
        assert isinstance(expected, torch.Tensor)
        assert close(delta_of(agg.adapter)[m], expected)
    assert dict(agg.weights) == pytest.approx({"asha": 0.1, "bala": 0.3, "chitra": 0.6})
    assert agg.adapter.ranks == dict.fromkeys(MODULES, 4) and agg.adapter.scale == SCALE
    assert agg.projection_error < 1e-6


def test_fedavg_reports_the_projection_error_when_the_rank_grows() -> None:
    updates = [update(c, adapter(i, rank=2)) for i, c in enumerate(CLIENTS)]  # 3 · rank 2 > 2
    agg = FedAvg(steps_per_client=5).aggregate(0, None, updates)
    mean = {m: torch.stack([delta_of(u.result)[m] for u in updates]).mean(0) for m in MODULES}
    got = delta_of(agg.adapter)
    lost = sum(float((mean[m] - got[m]).square().sum()) for m in MODULES)
    total = sum(float(mean[m].square().sum()) for m in MODULES)
    assert agg.projection_error > 0.05
    assert agg.projection_error == pytest.approx((lost / total) ** 0.5, rel=1e-4)
    assert "projection lost" in agg.note


def test_fedavg_equals_parallel_merge_linear_weighted_by_examples() -> None:
    head = adapter(50)
    updates = [update(c, adapter(i), n=10 * (i + 1)) for i, c in enumerate(CLIENTS)]
    fedavg = FedAvg(steps_per_client=5).aggregate(0, head, updates)
    merged = ParallelMerge(5, "linear", weighting="examples").aggregate(0, head, updates)
    for m in MODULES:
        assert close(delta_of(fedavg.adapter)[m], delta_of(merged.adapter)[m], atol=1e-4)


def test_fedavg_refuses_updates_from_different_starts_and_no_examples() -> None:
    a, b = update("asha", adapter(1)), update("bala", adapter(2))
    stale = ClientUpdate("bala", AdapterRef("seshu-hi", 2), b.result, 10, {})
    with pytest.raises(ValueError, match="one head"):
        FedAvg(5).aggregate(0, None, [a, stale])
    with pytest.raises(ValueError, match="num_examples = 0"):
        FedAvg(5).aggregate(0, None, [update("asha", adapter(1), n=0), update("bala", adapter(2), n=0)])
    with pytest.raises(ValueError, match="does not match"):
        FedAvg(5).aggregate(0, None, [a, update("bala", adapter(2, rank=3))])
    with pytest.raises(ValueError, match="no client updates"):
        FedAvg(5).aggregate(0, None, [])


# ── ParallelMerge ────────────────────────────────────────────────────────────────────────────────────────


def test_parallel_merge_linear_is_head_plus_weighted_task_vectors() -> None:
    g = torch.Generator().manual_seed(1)
    head = {m: torch.randn(6, 4, generator=g) for m in MODULES}
    taus = [{m: torch.randn(6, 4, generator=g) for m in MODULES} for _ in CLIENTS]
    counts = (1, 1, 2)
    updates = [
        update(c, full_rank({m: head[m] + t[m] for m in MODULES}), n=n)
        for c, t, n in zip(CLIENTS, taus, counts, strict=True)
    ]
    agg = ParallelMerge(5, "task_arithmetic", weighting="examples").aggregate(0, full_rank(head), updates)
    w = [3 * n / 4 for n in counts]  # task_arithmetic's total weight n = 3, shared by examples
    assert list(agg.weights.values()) == pytest.approx(w)
    for m in MODULES:
        expected = head[m] + sum(wi * t[m] for wi, t in zip(w, taus, strict=True))
        assert isinstance(expected, torch.Tensor)
        assert close(delta_of(agg.adapter)[m], expected)
    assert agg.projection_error < 1e-6  # rank = in: every ΔW fits


def test_parallel_merge_ties_trims_and_elects_signs_by_hand() -> None:
    head = torch.ones(2, 2)
    tau1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])  # trimmed to the top 2: [[3, 0], [0, 2]]
    tau2 = torch.tensor([[-1.0, -2.0], [0.2, -4.0]])  # trimmed to the top 2: [[0, -2], [0, -4]]
    # Σ trimmed = [[3, -2], [0, -2]] → signs [[+, -], [+, -]]; (1, 0) has no agreeing entry → 0;
    # (1, 1): +2 disagrees with the elected −, only −4 stays.
    expected = head + torch.tensor([[3.0, -2.0], [0.0, -4.0]])
    m = MODULES[0]
    updates = [update("asha", full_rank({m: head + tau1})), update("bala", full_rank({m: head + tau2}))]
    agg = ParallelMerge(5, "ties", density=0.5).aggregate(0, full_rank({m: head}), updates)
    assert close(delta_of(agg.adapter)[m], expected)


def test_parallel_merge_ties_matches_fedem_merge_combine_on_task_vectors() -> None:
    g = torch.Generator().manual_seed(2)
    head = {m: torch.randn(7, 5, generator=g) for m in MODULES}
    taus = [{m: torch.randn(7, 5, generator=g) for m in MODULES} for _ in CLIENTS]
    updates = [
        update(c, full_rank({m: head[m] + t[m] for m in MODULES})) for c, t in zip(CLIENTS, taus, strict=True)
    ]
    agg = ParallelMerge(5, "ties", density=0.3).aggregate(0, full_rank(head), updates)
    for m in MODULES:
        expected = head[m] + combine([t[m] for t in taus], "ties", density=0.3)
        assert close(delta_of(agg.adapter)[m], expected)


def test_parallel_merge_from_a_fresh_head_merges_the_updates_themselves() -> None:
    g = torch.Generator().manual_seed(3)
    deltas = [{m: torch.randn(4, 3, generator=g) for m in MODULES} for _ in CLIENTS]
    updates = [update(c, full_rank(d)) for c, d in zip(CLIENTS, deltas, strict=True)]
    agg = ParallelMerge(5, "linear").aggregate(0, None, updates)
    for m in MODULES:
        assert close(delta_of(agg.adapter)[m], torch.stack([d[m] for d in deltas]).mean(0))


def test_parallel_merge_dare_is_deterministic_per_seed_and_round() -> None:
    updates = [update(c, adapter(i)) for i, c in enumerate(CLIENTS)]
    head = adapter(50)
    before = torch.random.get_rng_state()

    def run(seed: int, round: int) -> dict[str, torch.Tensor]:
        return delta_of(ParallelMerge(5, "dare_ties", 0.5, seed=seed).aggregate(round, head, updates).adapter)

    first, again, other_seed, other_round = run(0, 1), run(0, 1), run(1, 1), run(0, 2)
    assert all(torch.equal(first[m], again[m]) for m in MODULES)
    assert not all(torch.equal(first[m], other_seed[m]) for m in MODULES)
    assert not all(torch.equal(first[m], other_round[m]) for m in MODULES)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global generator is left alone


def test_parallel_merge_options_are_checked() -> None:
    assert ParallelMerge(5).density == 0.5  # ties' default density
    with pytest.raises(UserError, match="density"):
        ParallelMerge(5, "linear", density=0.5)
    with pytest.raises(UserError, match="unknown merge method"):
        ParallelMerge(5, "mean")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="steps_per_client"):
        ParallelMerge(0)


# ── projection ───────────────────────────────────────────────────────────────────────────────────────────


def test_lora_factors_is_the_best_rank_r_approximation() -> None:
    delta = torch.randn(8, 6, generator=torch.Generator().manual_seed(4))
    a, b, residual = lora_factors(delta, rank=2, scale=SCALE)
    assert a.shape == (2, 6) and b.shape == (8, 2)
    s = torch.linalg.svdvals(delta.double())
    assert residual == pytest.approx(float(s[2:].square().sum().sqrt()), rel=1e-6)
    assert float((delta - SCALE * b @ a).norm()) == pytest.approx(residual, rel=1e-5)
    assert torch.allclose(a.norm(dim=1), b.norm(dim=0), rtol=1e-5)  # √S on both sides


def test_lora_factors_pads_when_the_rank_exceeds_the_matrix() -> None:
    delta = torch.randn(3, 2, generator=torch.Generator().manual_seed(5))
    a, b, residual = lora_factors(delta, rank=4, scale=0.5)
    assert a.shape == (4, 2) and b.shape == (3, 4) and residual == pytest.approx(0, abs=1e-6)
    assert close(0.5 * b @ a, delta)
    zero = project({"m": torch.zeros(3, 2)}, {"m": 2}, 1.0)
    assert zero.relative_error == 0.0 and torch.count_nonzero(delta_of(zero.adapter)["m"]) == 0


# ── the interface ────────────────────────────────────────────────────────────────────────────────────────


def test_make_policy_builds_by_name_and_refuses_unknown_ones() -> None:
    assert make_policy("relay", steps_per_client=3) == Relay(3)
    assert make_policy("parallel-merge", steps_per_client=3, method="dare_linear", density=0.2, seed=1) == (
        ParallelMerge(3, "dare_linear", 0.2, 1)
    )
    assert {name: cls.name for name, cls in POLICIES.items()} == {name: name for name in POLICIES}
    with pytest.raises(UserError, match="unknown policy 'nope'; choose one of relay, parallel-merge, fedavg"):
        make_policy("nope")
    with pytest.raises(UserError, match="policy fedavg: .*method"):
        make_policy("fedavg", steps_per_client=3, method="ties")
    with pytest.raises(UserError, match="steps_per_client"):
        make_policy("relay")


def test_data_types_check_their_invariants() -> None:
    with pytest.raises(ValueError, match="A \\(r, in\\) and B \\(out, r\\)"):
        AdapterWeights({"m": (torch.zeros(2, 3), torch.zeros(4, 3))}, 1.0)
    with pytest.raises(ValueError, match="num_examples"):
        update("asha", adapter(0), n=-1)
    with pytest.raises(ValueError, match="each client"):
        Relay(1).configure(0, ["asha", "asha"], HEAD)
    factors = {"m": (torch.zeros(2, 3), torch.zeros(4, 2))}
    weights = AdapterWeights(factors, 1.0)
    factors.clear()
    assert list(weights.factors) == ["m"]  # a read-only copy
    assert Relay(1).accept({"bleu": 1.0}, {"bleu": 2.0})  # default: no veto


@dataclass(frozen=True)
class BestOnly(Policy):
    """A test-local policy: parallel round, the head becomes the update with the lowest loss."""

    name = "best-only"
    steps_per_client: int

    def configure(self, round: int, clients: Sequence[str], head: AdapterRef) -> RoundPlan:
        return parallel_plan(clients, head, self.steps_per_client)

    def aggregate(
        self, round: int, head: AdapterWeights | None, updates: Sequence[ClientUpdate]
    ) -> Aggregate:
        best = min(updates, key=lambda u: u.metrics["loss"])
        return Aggregate(best.result, (best.client,), {best.client: 1.0}, f"lowest loss: {best.client}")

    def accept(self, candidate_metrics: Mapping[str, float], reference_metrics: Mapping[str, float]) -> bool:
        return candidate_metrics["loss"] <= reference_metrics["loss"]


def test_a_new_policy_is_one_class(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(POLICIES, BestOnly.name, BestOnly)
    policy = make_policy("best-only", steps_per_client=2)
    plan = policy.configure(0, CLIENTS, HEAD)
    updates = [
        update(c, adapter(i), loss=loss)
        for i, (c, loss) in enumerate(zip(plan.clients, (3.0, 1.0, 2.0), strict=True))
    ]
    agg = policy.aggregate(0, None, updates)
    assert agg.contributors == ("bala",) and agg.adapter is updates[1].result
    assert policy.accept({"loss": 1.0}, {"loss": 1.5}) and not policy.accept({"loss": 2.0}, {"loss": 1.5})
