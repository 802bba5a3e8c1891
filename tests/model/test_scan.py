"""The sequential reference scan agrees with transformers' chunked scan, and `use_scan` swaps it in."""

from dataclasses import dataclass

import pytest
import torch
from transformers.models.mamba2 import modeling_mamba2

from fedem.model.scan import CHUNKED_SCAN, SCANS, sequential_scan, use_scan
from fedem.model.seshu import SeshuSize, build_model

TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4}


@dataclass(frozen=True)
class Case:
    batch: int
    length: int
    groups: int
    initial_states: bool
    skip: bool  # with D
    heads: int = 4
    head_dim: int = 8
    state: int = 16
    chunk: int = 16


CASES = [
    Case(batch=1, length=37, groups=1, initial_states=False, skip=False),
    Case(batch=2, length=50, groups=2, initial_states=True, skip=True),
    Case(batch=2, length=32, groups=1, initial_states=True, skip=False),
    Case(batch=1, length=5, groups=2, initial_states=False, skip=True),
    Case(batch=2, length=70, groups=4, initial_states=True, skip=True, chunk=32),
]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error, in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def make_inputs(case: Case, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(hash(case) % 2**31)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    b, n, h = case.batch, case.length, case.heads
    inputs = {
        "hidden_states": randn(b, n, h, case.head_dim),
        "dt": randn(b, n, h),
        # A < 0 as in the model (A = -exp(A_log)), spread so that some heads forget fast.
        "A": -torch.exp(randn(h)),
        "B": randn(b, n, case.groups, case.state),
        "C": randn(b, n, case.groups, case.state),
        "dt_bias": randn(h) - 1.0,
    }
    if case.skip:
        inputs["D"] = randn(h)
    if case.initial_states:
        inputs["initial_states"] = randn(b, h, case.head_dim, case.state)
    return {name: t.requires_grad_() for name, t in inputs.items()}


def run_scan(fn, case: Case, inputs: dict[str, torch.Tensor]):
    """Output, final state and the gradient of a fixed random functional of both w.r.t. every input."""
    y, final = fn(
        **inputs,
        chunk_size=case.chunk,
        dt_softplus=True,
        dt_limit=(0.0, float("inf")),
        return_final_states=True,
    )
    g = torch.Generator().manual_seed(1)
    w_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    w_final = torch.randn(final.shape, generator=g, dtype=torch.float64).to(final.dtype)
    loss = (y * w_y).sum() + (final * w_final).sum()
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return y, final, dict(zip(inputs, grads, strict=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c.batch}-l{c.length}-g{c.groups}")
def test_sequential_matches_chunked(case: Case, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    inputs = make_inputs(case, dtype)
    y_ref, final_ref, grads_ref = run_scan(sequential_scan, case, inputs)
    y, final, grads = run_scan(CHUNKED_SCAN, case, inputs)

    assert y_ref.shape == y.shape == inputs["hidden_states"].shape
    assert final_ref.shape == final.shape == (case.batch, case.heads, case.head_dim, case.state)
    assert y_ref.dtype == dtype
    assert rel_err(y, y_ref) <= tol
    assert rel_err(final, final_ref) <= tol
    for name, grad_ref in grads_ref.items():
        assert grads[name].shape == grad_ref.shape, name
        assert rel_err(grads[name], grad_ref) <= tol, name


def test_sequential_without_final_states_returns_output_only() -> None:
    case = CASES[1]
    inputs = make_inputs(case, torch.float64)
    y = sequential_scan(**inputs, chunk_size=case.chunk, dt_softplus=True)
    assert isinstance(y, torch.Tensor)
    assert y.shape == inputs["hidden_states"].shape


def test_sequential_refuses_gating_and_packing() -> None:
    case = CASES[0]
    inputs = make_inputs(case, torch.float32)
    with pytest.raises(ValueError, match="seq_idx"):
        sequential_scan(**inputs, chunk_size=16, seq_idx=torch.zeros(1, case.length, dtype=torch.int32))


def test_scans_registry() -> None:
    assert SCANS["chunked"] is modeling_mamba2.mamba2_chunk_scan is CHUNKED_SCAN
    assert SCANS["sequential"] is sequential_scan


def test_use_scan_installs_and_restores() -> None:
    original = modeling_mamba2.mamba2_chunk_scan
    with use_scan("sequential") as fn:
        assert fn is sequential_scan
        assert modeling_mamba2.mamba2_chunk_scan is sequential_scan
    assert modeling_mamba2.mamba2_chunk_scan is original

    with pytest.raises(RuntimeError, match="boom"), use_scan(sequential_scan):
        raise RuntimeError("boom")
    assert modeling_mamba2.mamba2_chunk_scan is original

    with use_scan("sequential"), use_scan("chunked"):
        assert modeling_mamba2.mamba2_chunk_scan is original
    assert modeling_mamba2.mamba2_chunk_scan is original

    with pytest.raises(ValueError, match="unknown scan"), use_scan("parallel"):
        pass
    assert modeling_mamba2.mamba2_chunk_scan is original


class _Vocab:
    """Just enough of a tokenizer for `seshu_config`: a length and the special ids."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 97


TINY = SeshuSize(hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=8, n_groups=2, chunk_size=8)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_model_logits_and_grads_agree(training: bool) -> None:
    torch.manual_seed(0)
    model = build_model(TINY, _Vocab())
    model.train(training)
    ids = torch.randint(3, 97, (2, 21))

    def forward() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    calls = []

    def counting_scan(*args, **kwargs):
        calls.append(1)
        return sequential_scan(*args, **kwargs)

    logits, grads = forward()
    with use_scan(counting_scan):
        logits_seq, grads_seq = forward()
    assert len(calls) == TINY.num_hidden_layers
    assert rel_err(logits_seq, logits) <= 1e-4
    assert float((logits_seq - logits).abs().max()) <= 1e-4
    assert len(grads) == len(grads_seq) > 0
    for grad, grad_seq in zip(grads, grads_seq, strict=True):
        assert rel_err(grad_seq, grad) <= 1e-4
    assert modeling_mamba2.mamba2_chunk_scan is CHUNKED_SCAN


def test_model_with_cache_agrees() -> None:
    """The cached (generation) path asks the scan for its final state."""
    torch.manual_seed(0)
    model = build_model(TINY, _Vocab()).eval()
    ids = torch.randint(3, 97, (1, 13))
    with torch.no_grad():
        stock = model.generate(ids, max_new_tokens=4, do_sample=False)
        with use_scan("sequential"):
            seq = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(stock, seq)
