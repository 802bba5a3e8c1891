"""The SSD scan's C loop (`fedem.model.native`) against the step-by-step reference; `ChunkedScan` runs
on it in float32 and on torch code where it does not apply or cannot be built."""

import logging
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedem.model import native
from fedem.model.scan import sequential_scan
from fedem.model.ssd import ChunkedScan, Chunks, from_chunks, to_chunks
from tests.model.conftest import rel_err

# (batch, length, heads, head_dim, groups, state, chunk, initial state): lengths that are not whole
# chunks, several groups, one position (a decoding prefill), one row split over heads, a long row.
SHAPES = [
    (1, 37, 4, 8, 1, 16, 16, False),
    (2, 70, 4, 8, 2, 12, 16, True),
    (3, 130, 8, 16, 4, 8, 32, True),
    (1, 1, 2, 4, 1, 4, 8, True),
    (1, 200, 6, 8, 3, 8, 8, False),
    (2, 600, 10, 64, 1, 64, 64, True),
]


def inputs(batch: int, length: int, heads: int, head_dim: int, groups: int, state: int, initial: bool):
    g = torch.Generator().manual_seed(length * 31 + heads)
    x = torch.randn(batch, length, heads, head_dim, generator=g)
    # Steps large enough that decays underflow within a chunk, and small ones that keep the state long.
    delta = F.softplus(2 * torch.randn(batch, length, heads, generator=g) - 1)
    A = -torch.exp(torch.randn(heads, generator=g))
    B = torch.randn(batch, length, groups, state, generator=g)
    C = torch.randn(batch, length, groups, state, generator=g)
    h0 = torch.randn(batch, heads, head_dim, state, generator=g) if initial else None
    return x, delta, A, B, C, h0


def scan(x, delta, A, B, C, h0, chunk, keep_states=True):
    """`native.forward` on (b, l, …) inputs, chunked as `ChunkedScan` does it; y back as (b, l, h, p)."""
    assert native.usable(x, delta, A, B, C, h0, chunk), "the C loop does not run these inputs here"
    x_c, delta_c, B_c, C_c = (to_chunks(t, chunk) for t in (x, delta, B, C))
    y, states_in, final = native.forward(x_c, delta_c, A, B_c, C_c, h0, keep_states)
    return from_chunks(y, x.shape[1]), states_in, final


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-l{}-h{}p{}g{}n{}-q{}".format(*s))
def test_native_forward_matches_sequential_reference(shape: tuple[int, ...]) -> None:
    *sizes, chunk, initial = shape
    x, delta, A, B, C, h0 = inputs(*sizes, initial)
    y, states_in, final = scan(x, delta, A, B, C, h0, chunk)
    # The reference takes dt before the softplus; give it Δ itself (no softplus, no bias).
    double = [t.double() for t in (x, delta, A, B, C)]
    y_ref, final_ref = sequential_scan(
        double[0], double[1], double[2], double[3], double[4], chunk_size=chunk,
        initial_states=None if h0 is None else h0.double(), return_final_states=True,
    )  # fmt: skip
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(final, final_ref) <= 1e-5
    # The states entering each chunk are what the backward reads: the torch code's, to rounding.
    states_ref, _ = Chunks(*double, chunk).states_entering(None if h0 is None else h0.double())
    assert rel_err(states_in, states_ref) <= 1e-5
    # Where no backward follows it skips them, and nothing else changes.
    lean = scan(x, delta, A, B, C, h0, chunk, keep_states=False)
    assert lean[1] is None
    assert torch.equal(lean[0], y) and torch.equal(lean[2], final)


def test_chunked_scan_runs_on_it_in_float32_and_keeps_its_gradients() -> None:
    x, delta, A, B, C, h0 = inputs(2, 70, 4, 8, 2, 12, True)
    leaves = [t.requires_grad_() for t in (x, delta, A, B, C, h0)]
    y, final = ChunkedScan.apply(*leaves, 16)
    compiled = scan(*(t.detach() for t in leaves), 16)
    torch.testing.assert_close(y, compiled[0], rtol=0, atol=0)
    grads = torch.autograd.grad((y * y).sum() + final.sum(), leaves)

    doubles = [t.detach().double().requires_grad_() for t in leaves]
    y_ref, final_ref = ChunkedScan.apply(*doubles, 16)  # float64: the torch code throughout
    grads_ref = torch.autograd.grad((y_ref * y_ref).sum() + final_ref.sum(), doubles)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(grad, grad_ref) <= 1e-4


def test_declines_what_it_was_not_written_for(monkeypatch: pytest.MonkeyPatch) -> None:
    x, delta, A, B, C, h0 = inputs(1, 20, 2, 8, 1, 8, True)
    assert native.usable(x, delta, A, B, C, h0, 8)
    assert not native.usable(*(t.double() for t in (x, delta, A, B, C, h0)), 8)  # float64
    assert not native.usable(x[..., :6], delta, A, B, C, h0[:, :, :6], 8)  # head_dim 6
    assert not native.usable(x, delta, A, B, C, h0, 6)  # chunk 6
    assert not native.usable(x, delta, A, B, C, h0, 256)  # chunk above MAX_CHUNK
    monkeypatch.setenv("FEDEM_NATIVE", "0")
    assert not native.usable(x, delta, A, B, C, h0, 8)


def test_without_a_working_compiler_the_torch_code_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(native, "_compiler", lambda: "false")  # a "compiler" that always fails
    native._library.cache_clear()
    try:
        x, delta, A, B, C, h0 = inputs(1, 24, 2, 12, 1, 12, False)
        with caplog.at_level(logging.WARNING, logger="fedem.model.native"):
            assert not native.usable(x, delta, A, B, C, h0, 12)
            y, _ = ChunkedScan.apply(x, delta, A, B, C, h0, 12)
        assert "could not build" in caplog.text
        y_ref, _ = sequential_scan(x, delta, A, B, C, chunk_size=12, return_final_states=True)
        assert rel_err(y, y_ref) <= 1e-4
        assert not list(tmp_path.rglob("*.so"))  # no half-built library left behind
    finally:
        native._library.cache_clear()


def test_a_forked_child_runs_it_on_threads_of_its_own() -> None:
    """The parent's worker threads do not survive a fork; the child must not wait on them."""
    x, delta, A, B, C, h0 = inputs(4, 64, 4, 8, 1, 8, False)
    expected = scan(x, delta, A, B, C, h0, 16)  # starts the parent's pool
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover — the child reports through the pipe
        out = scan(x, delta, A, B, C, h0, 16)
        os.write(write, b"1" if torch.equal(out[0], expected[0]) else b"0")
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(child, 0)
    assert os.read(read, 1) == b"1" and status == 0
