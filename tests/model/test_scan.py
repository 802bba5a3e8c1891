"""Every scan path agrees with the sequential reference, forward and all gradients; `use_scan` swaps
paths; fedem's lean-backward scan is installed by default and saves only inputs and chunk states."""

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mamba2 import modeling_mamba2

from fedem.model.scan import (
    CHUNKED_SCAN,
    CONV_PROMPT,
    CONV_UPDATE,
    DEFAULT_SCAN,
    KERNELS,
    SCANS,
    STATE_UPDATE,
    ByDevice,
    conv_prompt,
    conv_step,
    on_torch,
    sequential_scan,
    split_conv1d_scan_combined,
    ssd_scan,
    state_step,
    use_scan,
)
from fedem.model.seshu import build_model
from fedem.model.ssd import ChunkedScan
from tests.model.conftest import TINY, TinyVocab, rel_err

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
    dt_limit: tuple[float, float] = (0.0, float("inf"))


CASES = [
    Case(batch=1, length=37, groups=1, initial_states=False, skip=False),
    Case(batch=2, length=50, groups=2, initial_states=True, skip=True),
    Case(batch=2, length=32, groups=1, initial_states=True, skip=False),
    Case(batch=1, length=5, groups=2, initial_states=False, skip=True),
    Case(batch=2, length=70, groups=4, initial_states=True, skip=True, chunk=32),
    Case(batch=1, length=1, groups=1, initial_states=True, skip=True),  # one step: a generation prefill
    Case(batch=2, length=40, groups=3, initial_states=True, skip=True, heads=6, head_dim=4, state=5, chunk=8),
    Case(batch=2, length=45, groups=2, initial_states=False, skip=True, dt_limit=(0.05, 0.9)),
]


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
        dt_limit=case.dt_limit,
        return_final_states=True,
    )
    g = torch.Generator().manual_seed(1)
    w_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    w_final = torch.randn(final.shape, generator=g, dtype=torch.float64).to(final.dtype)
    loss = (y * w_y).sum() + (final * w_final).sum()
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return y, final, dict(zip(inputs, grads, strict=True))


def case_id(case: Case) -> str:
    limit = "-limit" if case.dt_limit[0] > 0 else ""
    return f"b{case.batch}-l{case.length}-h{case.heads}g{case.groups}-q{case.chunk}{limit}"


@pytest.mark.parametrize("scan", ["chunked", "ssd"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_scan_matches_sequential(scan: str, case: Case, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    inputs = make_inputs(case, dtype)
    y_ref, final_ref, grads_ref = run_scan(sequential_scan, case, inputs)
    y, final, grads = run_scan(SCANS[scan], case, inputs)

    assert y_ref.shape == y.shape == inputs["hidden_states"].shape
    assert final_ref.shape == final.shape == (case.batch, case.heads, case.head_dim, case.state)
    assert y_ref.dtype == dtype
    assert rel_err(y, y_ref) <= tol
    assert rel_err(final, final_ref) <= tol
    for name, grad_ref in grads_ref.items():
        assert grads[name].shape == grad_ref.shape, name
        assert rel_err(grads[name], grad_ref) <= tol, name


@pytest.mark.parametrize("scan", ["sequential", "ssd"])
def test_without_final_states_returns_output_only(scan: str) -> None:
    """The training path: only y is asked for, so backward gets no gradient for the final state."""
    case = CASES[1]
    inputs = make_inputs(case, torch.float64)
    y = SCANS[scan](**inputs, chunk_size=case.chunk, dt_softplus=True)
    assert isinstance(y, torch.Tensor)
    assert y.shape == inputs["hidden_states"].shape
    y_ref = sequential_scan(**inputs, chunk_size=case.chunk, dt_softplus=True)
    grads = torch.autograd.grad(y.square().sum(), list(inputs.values()))
    grads_ref = torch.autograd.grad(y_ref.square().sum(), list(inputs.values()))
    for name, grad, grad_ref in zip(inputs, grads, grads_ref, strict=True):
        assert rel_err(grad, grad_ref) <= 1e-10, name


def test_ssd_gradient_of_the_final_state_alone() -> None:
    """Backward with no gradient for y (only the final state used), against the reference."""
    case = CASES[6]
    inputs = make_inputs(case, torch.float64)
    kwargs = {"chunk_size": case.chunk, "dt_softplus": True, "return_final_states": True}
    _, final = ssd_scan(**inputs, **kwargs)
    _, final_ref = sequential_scan(**inputs, **kwargs)
    grads = torch.autograd.grad(final.sum(), list(inputs.values()), allow_unused=True)
    grads_ref = torch.autograd.grad(final_ref.sum(), list(inputs.values()), allow_unused=True)
    for name, grad, grad_ref in zip(inputs, grads, grads_ref, strict=True):
        if grad_ref is None:  # D only reaches y
            assert grad is None or float(grad.abs().max()) == 0.0, name
            continue
        assert rel_err(grad, grad_ref) <= 1e-10, name


def test_chunked_scan_gradcheck() -> None:
    """torch's finite-difference check of the hand-written backward, in float64, on a tiny shape."""
    g = torch.Generator().manual_seed(3)
    b, length, heads, head_dim, groups, state, chunk = 2, 7, 4, 3, 2, 5, 3

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = randn(b, length, heads, head_dim).requires_grad_()
    delta = F.softplus(randn(b, length, heads)).detach().requires_grad_()
    A = (-torch.exp(randn(heads))).requires_grad_()
    B = randn(b, length, groups, state).requires_grad_()
    C = randn(b, length, groups, state).requires_grad_()
    initial = randn(b, heads, head_dim, state).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *args: ChunkedScan.apply(*args, chunk), (x, delta, A, B, C, initial)
    )
    assert torch.autograd.gradcheck(lambda *args: ChunkedScan.apply(*args, None, chunk), (x, delta, A, B, C))


def test_bfloat16_inputs_get_gradients_in_their_dtype() -> None:
    case = CASES[1]
    inputs = make_inputs(case, torch.bfloat16)
    y, final = ssd_scan(**inputs, chunk_size=case.chunk, dt_softplus=True, return_final_states=True)
    assert y.dtype == final.dtype == torch.float32  # computed in float32, as the stock scan does
    grads = torch.autograd.grad(y.sum() + final.sum(), list(inputs.values()))
    assert all(grad.dtype == torch.bfloat16 for grad in grads)


def saved_bytes(scan: str, case: Case) -> int:
    """Bytes of distinct storages autograd keeps for backward from one scan call (inputs included)."""
    inputs = make_inputs(case, torch.float32)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        SCANS[scan](**inputs, chunk_size=case.chunk, dt_softplus=True)
    return sum(storages.values())


def test_ssd_keeps_only_inputs_and_chunk_states_for_backward() -> None:
    case = Case(batch=2, length=256, groups=1, initial_states=False, skip=True, head_dim=16, chunk=32)
    b, n, h, p = case.batch, case.length, case.heads, case.head_dim
    inputs = 4 * (b * n * h * p + b * n * h + 2 * b * n * case.groups * case.state + 4 * h)
    chunk_states = 4 * b * (n // case.chunk) * h * p * case.state
    ssd, chunked = saved_bytes("ssd", case), saved_bytes("chunked", case)
    step_sizes = 3 * 4 * b * n * h  # Δ's autograd chain: dt + dt_bias, its softplus, the clamped Δ
    assert ssd <= inputs + chunk_states + step_sizes
    assert ssd * 4 < chunked


@pytest.mark.parametrize("scan", ["sequential", "ssd"])
def test_scans_refuse_gating_and_packing(scan: str) -> None:
    case = CASES[0]
    inputs = make_inputs(case, torch.float32)
    with pytest.raises(ValueError, match="seq_idx"):
        SCANS[scan](**inputs, chunk_size=16, seq_idx=torch.zeros(1, case.length, dtype=torch.int32))


def test_scans_registry_and_default() -> None:
    assert SCANS["chunked"] is CHUNKED_SCAN
    assert CHUNKED_SCAN.__module__ == modeling_mamba2.__name__  # transformers' torch code, no kernel here
    assert SCANS["sequential"] is sequential_scan
    assert SCANS["ssd"] is ssd_scan
    assert DEFAULT_SCAN is SCANS[os.environ.get("FEDEM_SCAN", "ssd")]
    installed = {
        "mamba2_chunk_scan": DEFAULT_SCAN,
        "causal_conv1d_update": conv_step,
        "causal_conv1d_fn": conv_prompt,
        "mamba2_split_conv1d_scan_combined": split_conv1d_scan_combined,
        "mamba2_selective_state_update": state_step,
    }
    for name, fn in installed.items():
        assert on_torch(getattr(modeling_mamba2, name)) is fn
        assert isinstance(getattr(modeling_mamba2, name), ByDevice) is KERNELS  # kernels for CUDA tensors
    # The fallbacks are transformers' torch code itself, never its wrapper (which may hold a CUDA kernel).
    for fallback in (CHUNKED_SCAN, STATE_UPDATE, CONV_UPDATE, CONV_PROMPT):
        assert fallback.__module__ == modeling_mamba2.__name__ and not hasattr(fallback, "__wrapped__")


def test_by_device_sends_cpu_tensors_to_fedem_code() -> None:
    calls: list[tuple[str, tuple[object, ...], dict[str, object]]] = []
    dispatch = ByDevice(
        lambda x, *args, **kwargs: calls.append(("torch", args, kwargs)),
        lambda x, *args, **kwargs: calls.append(("kernel", args, kwargs)),
    )
    dispatch(torch.zeros(2), 3, chunk_size=4)
    assert calls == [("torch", (3,), {"chunk_size": 4})]


@pytest.mark.parametrize("state_width", [4, 6])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("activation", ["silu", None])
def test_conv_step_matches_transformers_decode_convolution(
    state_width: int, with_bias: bool, activation: str | None
) -> None:
    """The same output and the same updated convolution state as transformers' `causal_conv1d_update`,
    for one new position, over a few steps; longer inputs are handed to transformers' own function."""
    torch.manual_seed(0)
    batch, channels, kernel = 2, 24, 4
    weight, bias = torch.randn(channels, kernel), torch.randn(channels) if with_bias else None
    theirs = torch.randn(batch, channels, state_width)
    ours = theirs.clone()
    for _ in range(3):
        x = torch.randn(batch, channels, 1)
        expected = CONV_UPDATE(x, theirs, weight, bias, activation)
        step = conv_step(x, ours, weight, bias, activation)
        torch.testing.assert_close(step, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    several = torch.randn(batch, channels, 3)
    expected = CONV_UPDATE(several, theirs.clone(), weight, bias, activation)
    torch.testing.assert_close(conv_step(several, ours.clone(), weight, bias, activation), expected)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("activation", ["silu", None])
def test_conv_prompt_matches_transformers_convolution(with_bias: bool, activation: str | None) -> None:
    """The same output as transformers' `causal_conv1d_fn` on the mixer's transposed view of a
    (b, l, c) in_proj output, returned as a transposed view of a contiguous (b, l, c); an input that
    needs a gradient, or any call under another scan, goes to transformers' function."""
    torch.manual_seed(0)
    batch, length, channels, kernel = 2, 11, 24, 4
    projected = torch.randn(batch, length, channels + 5)  # the conv's channels and others, side by side
    hidden = projected[..., :channels].transpose(1, 2)  # (b, c, l), as Mamba2Mixer passes it
    weight, bias = torch.randn(channels, kernel), torch.randn(channels) if with_bias else None
    out, theirs = conv_prompt(hidden, weight, bias, activation), CONV_PROMPT(hidden, weight, bias, activation)
    torch.testing.assert_close(out, theirs, rtol=1e-6, atol=1e-6)
    assert out.transpose(1, 2).is_contiguous()

    trained = hidden.detach().requires_grad_()
    out = conv_prompt(trained, weight, bias, activation)
    assert out.grad_fn is not None
    torch.testing.assert_close(out, CONV_PROMPT(trained, weight, bias, activation), rtol=0, atol=0)
    with use_scan("chunked"):  # transformers' own layer, bit for bit
        torch.testing.assert_close(conv_prompt(hidden, weight, bias, activation), theirs, rtol=0, atol=0)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_skip", [True, False])
@pytest.mark.parametrize("softplus", [True, False])
def test_state_step_matches_transformers_decode_update(groups: int, with_skip: bool, softplus: bool) -> None:
    """The same output and the same updated SSM state as transformers' `selective_state_update`, with
    the per-head parameters expanded as `Mamba2Mixer` passes them, over a few steps; a gate or a Δ that
    varies along a head goes to transformers' function."""
    torch.manual_seed(0)
    batch, heads, head_dim, state = 2, 4, 8, 6
    A = (-torch.rand(heads))[:, None, None].expand(-1, head_dim, state)
    D = torch.randn(heads)[:, None].expand(-1, head_dim) if with_skip else None
    dt_bias = torch.randn(heads)[:, None].expand(-1, head_dim)
    theirs = torch.randn(batch, heads, head_dim, state)
    ours = theirs.clone()
    for _ in range(3):
        x = torch.randn(batch, heads, head_dim)
        dt = torch.randn(batch, heads, 1).expand(-1, -1, head_dim)
        B, C = torch.randn(batch, groups, state), torch.randn(batch, groups, state)
        args = (x, dt, A, B, C)
        expected = STATE_UPDATE(theirs, *args, D=D, dt_bias=dt_bias, dt_softplus=softplus)
        step = state_step(ours, *args, D=D, dt_bias=dt_bias, dt_softplus=softplus)
        torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    dt_per_channel = torch.randn(batch, heads, head_dim)
    expected = STATE_UPDATE(theirs.clone(), x, dt_per_channel, A, B, C, D=D, dt_bias=dt_bias)
    torch.testing.assert_close(
        state_step(ours.clone(), x, dt_per_channel, A, B, C, D=D, dt_bias=dt_bias), expected
    )
    z = torch.randn(batch, heads, head_dim)
    expected = STATE_UPDATE(theirs.clone(), *args, D=D, z=z, dt_bias=dt_bias)
    torch.testing.assert_close(state_step(ours.clone(), *args, D=D, z=z, dt_bias=dt_bias), expected)


def test_fedem_scan_environment_variable_picks_the_default() -> None:
    probe = (
        "from transformers.models.mamba2 import modeling_mamba2 as m; import fedem.model.seshu; "
        "print(m.mamba2_chunk_scan.__name__)"
    )
    env = {**os.environ, "FEDEM_SCAN": "chunked"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "mamba2_chunk_scan"


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
        assert modeling_mamba2.mamba2_chunk_scan is CHUNKED_SCAN
    assert modeling_mamba2.mamba2_chunk_scan is original

    with pytest.raises(ValueError, match="unknown scan"), use_scan("parallel"):
        pass
    assert modeling_mamba2.mamba2_chunk_scan is original


@pytest.mark.parametrize("scan", ["chunked", "ssd"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_model_logits_and_grads_agree(scan: str, training: bool) -> None:
    torch.manual_seed(0)
    model = build_model(TINY, TinyVocab())
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

    with use_scan(scan):
        logits, grads = forward()
    with use_scan(counting_scan):
        logits_seq, grads_seq = forward()
    assert len(calls) == TINY.num_hidden_layers
    assert rel_err(logits_seq, logits) <= 1e-4
    assert float((logits_seq - logits).abs().max()) <= 1e-4
    assert len(grads) == len(grads_seq) > 0
    for grad, grad_seq in zip(grads, grads_seq, strict=True):
        assert rel_err(grad_seq, grad) <= 1e-4
    assert on_torch(modeling_mamba2.mamba2_chunk_scan) is DEFAULT_SCAN


@pytest.mark.parametrize("scan", ["chunked", "ssd"])
def test_model_with_cache_agrees(scan: str) -> None:
    """The cached (generation) path asks the scan for its final state."""
    torch.manual_seed(0)
    model = build_model(TINY, TinyVocab()).eval()
    ids = torch.randint(3, 97, (1, 13))
    with torch.no_grad():
        with use_scan(scan):
            fast = model.generate(ids, max_new_tokens=4, do_sample=False)
        with use_scan("sequential"):
            seq = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(fast, seq)
