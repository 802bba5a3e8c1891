"""The fused training mixer (`fedem.model.mixer`) equals the layer written with plain autograd ops —
forward and every gradient — and transformers' training forward goes through it only where it should."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mamba2 import modeling_mamba2

from fedem.model import mixer
from fedem.model.mixer import MixerCore, causal_conv, causal_conv_backward, tiles
from fedem.model.scan import sequential_scan, split_conv1d_scan_combined, use_scan
from fedem.model.seshu import build_model
from tests.model.conftest import TINY, TinyVocab, rel_err

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.mark.parametrize("length", [1, 3, 4, 29])
@pytest.mark.parametrize("taps", [2, 4])
def test_causal_conv_is_a_depthwise_conv1d(length: int, taps: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, length, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, taps, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64)
    grad_out = torch.randn(2, length, 6, dtype=torch.float64)
    expected = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=taps - 1, groups=6)[..., :length]
    expected = expected.transpose(1, 2)
    expected.backward(grad_out)
    assert rel_err(causal_conv(x, weight, bias), expected) < 1e-12
    grad_x, grad_weight = causal_conv_backward(grad_out, x.detach(), weight.detach(), need_weight=True)
    assert x.grad is not None and weight.grad is not None and grad_weight is not None
    assert rel_err(grad_x, x.grad) < 1e-12
    assert rel_err(grad_weight, weight.grad) < 1e-12


@dataclass(frozen=True)
class Case:
    batch: int
    length: int
    groups: int
    heads: int = 4
    head_dim: int = 8
    state: int = 6
    chunk: int = 8
    conv_bias: bool = True
    dt_limit: tuple[float, float] = (0.0, float("inf"))


CASES = [
    Case(batch=2, length=21, groups=1),
    Case(batch=1, length=16, groups=2, conv_bias=False),
    Case(batch=2, length=3, groups=4, heads=8, head_dim=4),
    Case(batch=2, length=30, groups=2, dt_limit=(0.05, 0.6)),
    Case(batch=5, length=6, groups=1),
]
# Tiles of 16 tokens, at chunk 8: two-chunk segments of one row for the longer cases (the state and the
# convolution's context cross from one segment to the next), several rows a tile for the short ones.
SMALL_TILES = 16


def test_tiles_stack_short_rows_and_cut_long_ones_at_chunk_boundaries() -> None:
    assert tiles(batch=2, length=30, chunk_size=8, tile_tokens=SMALL_TILES) == (
        1,
        2,
        32,
        [slice(0, 16), slice(16, 32)],
    )
    assert tiles(batch=5, length=6, chunk_size=8, tile_tokens=SMALL_TILES) == (2, 6, 8, [slice(0, 8)])
    assert tiles(batch=8, length=2048, chunk_size=64, tile_tokens=512) == (
        1,
        8,
        2048,
        [slice(0, 512), slice(512, 1024), slice(1024, 1536), slice(1536, 2048)],
    )
    assert tiles(batch=8, length=128, chunk_size=64, tile_tokens=512) == (4, 8, 128, [slice(0, 128)])
    assert tiles(batch=3, length=100, chunk_size=64, tile_tokens=512) == (3, 3, 128, [slice(0, 128)])
    assert tiles(batch=1, length=100, chunk_size=64, tile_tokens=32) == (
        1,
        1,
        128,
        [slice(0, 64), slice(64, 128)],
    )


def test_tiles_keep_the_shapes_to_compile_few() -> None:
    """Fine-tuning batches come in every length, and each new tile shape is a compile of its own."""
    shapes = set()
    for length in range(1, 2049):
        tiling = tiles(batch=8, length=length, chunk_size=64, tile_tokens=512)
        assert tiling.length >= length and tiling.length % 64 == 0
        assert tiling.batch >= 8 and tiling.batch % tiling.rows == 0
        shapes |= {(tiling.rows, segment.stop - segment.start) for segment in tiling.segments}
    assert len(shapes) == 8  # (8, 64), (4, 128), (2, 192), (2, 256), then one row of 320 … 512


def make_inputs(case: Case, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    torch.manual_seed(1)
    inner = case.heads * case.head_dim
    conv_dim = inner + 2 * case.groups * case.state

    def leaf(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, dtype=torch.float64) * scale + shift).to(dtype).requires_grad_()

    return {
        "zxbcdt": leaf(case.batch, case.length, inner + conv_dim + case.heads),
        "conv_weight": leaf(conv_dim, 4, scale=0.5),
        "conv_bias": leaf(conv_dim, scale=0.3) if case.conv_bias else None,
        "dt_bias": leaf(case.heads, scale=0.5, shift=-1.0),
        "A": (-torch.rand(case.heads, dtype=torch.float64) - 0.2).to(dtype).requires_grad_(),
        "D": leaf(case.heads),
        "norm_weight": leaf(inner, scale=0.2, shift=1.0),
    }


def reference_layer(case: Case, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight) -> torch.Tensor:
    """transformers' torch path, step by step in plain autograd ops, around the sequential scan."""
    inner = case.heads * case.head_dim
    conv_dim = conv_weight.shape[0]
    z, xbc, dt = zxbcdt.split([inner, conv_dim, case.heads], dim=-1)
    u = F.conv1d(xbc.transpose(1, 2), conv_weight[:, None], conv_bias, padding=3, groups=conv_dim)
    x, B, C = F.silu(u[..., : case.length].transpose(1, 2)).split(
        [inner, case.groups * case.state, case.groups * case.state], dim=-1
    )
    y = sequential_scan(
        x.unflatten(-1, (case.heads, -1)),
        dt,
        A,
        B.unflatten(-1, (case.groups, -1)),
        C.unflatten(-1, (case.groups, -1)),
        chunk_size=case.chunk,
        D=D,
        dt_bias=dt_bias,
        dt_softplus=True,
        dt_limit=case.dt_limit,
    )
    gated = (y.flatten(-2) * F.silu(z)).unflatten(-1, (case.groups, -1))
    normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-6)
    return normed.flatten(-2) * norm_weight


def run(
    case: Case, inputs: dict[str, torch.Tensor | None], fused: bool, tile_tokens: int = 1 << 16
) -> tuple[torch.Tensor, list]:
    for t in inputs.values():
        if t is not None:
            t.grad = None
    if fused:
        out = MixerCore.apply(*inputs.values(), 1e-6, case.chunk, case.groups, case.dt_limit, tile_tokens)
    else:
        out = reference_layer(case, *inputs.values())
    torch.manual_seed(2)
    out.backward(torch.randn(out.shape, dtype=torch.float64).to(out.dtype))
    return out.detach(), [None if t is None else t.grad for t in inputs.values()]


@pytest.mark.parametrize("tile_tokens", [1 << 16, SMALL_TILES], ids=["whole", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c.batch}l{c.length}g{c.groups}")
def test_mixer_core_matches_the_step_by_step_layer(case: Case, dtype: torch.dtype, tile_tokens: int) -> None:
    inputs = make_inputs(case, dtype)
    out, grads = run(case, inputs, fused=True, tile_tokens=tile_tokens)
    reference = {k: None if t is None else t.detach().double().requires_grad_() for k, t in inputs.items()}
    out_ref, grads_ref = run(case, reference, fused=False)
    assert out.dtype == dtype
    assert rel_err(out, out_ref) <= TOLERANCE[dtype]
    for name, grad, grad_ref in zip(inputs, grads, grads_ref, strict=True):
        if grad_ref is None:
            assert grad is None
            continue
        assert grad is not None and grad.dtype == dtype, name
        assert rel_err(grad, grad_ref) <= TOLERANCE[dtype], name


def test_only_the_gradients_asked_for_are_computed() -> None:
    """A LoRA run: only the in_proj output needs a gradient; the mixer's own weights are frozen."""
    case = CASES[0]
    inputs = make_inputs(case, torch.float64)
    for name, t in inputs.items():
        if name != "zxbcdt" and t is not None:
            t.requires_grad_(False)
    _, grads = run(case, inputs, fused=True)
    assert grads[0] is not None and all(g is None for g in grads[1:])
    _, all_grads = run(case, make_inputs(case, torch.float64), fused=True)
    assert rel_err(grads[0], all_grads[0]) < 1e-14


def test_the_compiled_mixer_matches_the_step_by_step_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile of the per-segment math (what training runs by default) on a case cut into two
    segments, so that both the first segment's graphs and the later segments' (entering state, context)
    are compiled; they must compile (no eager fallback) and agree with the reference."""
    forward = mixer._MaybeCompiled(mixer._segment_forward, enabled=True)
    backward = mixer._MaybeCompiled(mixer._segment_backward, enabled=True)
    monkeypatch.setattr(mixer, "_FORWARD", forward)
    monkeypatch.setattr(mixer, "_BACKWARD", backward)
    case = Case(batch=1, length=32, groups=2)
    inputs = make_inputs(case, torch.float32)
    out, grads = run(case, inputs, fused=True, tile_tokens=SMALL_TILES)
    assert forward.compiled is not None and backward.compiled is not None
    reference = {k: None if t is None else t.detach().double().requires_grad_() for k, t in inputs.items()}
    out_ref, grads_ref = run(case, reference, fused=False)
    assert rel_err(out, out_ref) <= TOLERANCE[torch.float32]
    for name, grad, grad_ref in zip(inputs, grads, grads_ref, strict=True):
        assert grad is not None and grad_ref is not None
        assert rel_err(grad, grad_ref) <= TOLERANCE[torch.float32], name


def test_a_failing_compiler_falls_back_to_the_same_math(caplog: pytest.LogCaptureFixture) -> None:
    def no_compiler(*args: object) -> None:
        raise RuntimeError("no C++ compiler found")

    forward = mixer._MaybeCompiled(mixer._segment_forward, enabled=False)
    forward.compiled = no_compiler
    case = CASES[0]
    inputs = {k: None if t is None else t.detach() for k, t in make_inputs(case, torch.float32).items()}
    weights = mixer._Weights(*list(inputs.values())[1:])
    settings = mixer._Settings(1e-6, case.chunk, case.groups, case.dt_limit)
    got = forward(inputs["zxbcdt"], 0, None, weights, settings)
    assert forward.compiled is None and "no C++ compiler found" in caplog.text
    expected = mixer._segment_forward(inputs["zxbcdt"], 0, None, weights, settings)
    assert len(got) == len(expected) == 4  # y, out, the state leaving, the states entering each chunk
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.fixture
def offers(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records each call transformers makes to the fused-layer hook, and whether fedem took it."""
    taken: list[bool] = []

    def spy(*args, **kwargs):
        out = split_conv1d_scan_combined(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(modeling_mamba2, "mamba2_split_conv1d_scan_combined", spy)
    return taken


def test_training_forward_takes_the_fused_layer(offers: list[bool]) -> None:
    torch.manual_seed(0)
    model = build_model(TINY, TinyVocab()).train()
    ids = torch.randint(3, 97, (2, 19))
    model(input_ids=ids, labels=ids).loss.backward()
    assert offers == [True, True]
    offers.clear()
    with use_scan("sequential"):  # another scan asked for: transformers' own layer around it
        model(input_ids=ids, labels=ids).loss.backward()
    assert offers == [False, False]
    offers.clear()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert offers == []  # transformers offers the fused layer only while training


def test_fused_layer_declines_what_it_does_not_cover() -> None:
    case = CASES[0]
    inputs = make_inputs(case, torch.float32)
    args = (
        inputs["zxbcdt"],
        inputs["conv_weight"],
        inputs["conv_bias"],
        inputs["dt_bias"],
        inputs["A"],
        inputs["D"],
    )
    weights = {"rmsnorm_weight": inputs["norm_weight"], "outproj_weight": torch.randn(5, 32)}
    out = split_conv1d_scan_combined(*args, chunk_size=8, ngroups=1, norm_before_gate=False, **weights)
    assert out is not None and out.shape == (2, 21, 5)
    assert (
        split_conv1d_scan_combined(*args, chunk_size=8, ngroups=1, norm_before_gate=True, **weights) is None
    )
    assert (
        split_conv1d_scan_combined(
            *args, chunk_size=8, norm_before_gate=False, return_final_states=True, **weights
        )
        is None
    )
    seq_idx = torch.zeros(2, 21, dtype=torch.int32)
    assert (
        split_conv1d_scan_combined(*args, chunk_size=8, norm_before_gate=False, seq_idx=seq_idx, **weights)
        is None
    )
