"""in_proj over whole BLAS tiles: the Linear's outputs and gradients, a view with no copy, and
checkpoints that stay plain transformers checkpoints."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fedem.model.load import load_model
from fedem.model.projection import MIN_ROWS, TILE, TiledLinear, TiledProduct, tile_projections, whole_tiles
from fedem.model.seshu import build_model

from .conftest import TINY, TinyVocab, rel_err


def _linear_and_grads(
    fn: object, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grad_y: torch.Tensor
) -> list[torch.Tensor]:
    """fn(x, weight, bias) and the gradients of every input that needs one."""
    y = fn(x, weight, bias)  # type: ignore[operator]
    y.backward(grad_y)
    inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    assert all(t.grad is not None for t in inputs)
    return [y.detach(), *(t.grad for t in inputs if t.grad is not None)]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("out", [40, 48, 1418])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train", ["all", "x only", "weight only"])
def test_tiled_product_is_the_linear(
    dtype: torch.dtype, tolerance: float, out: int, bias: bool, train: str
) -> None:
    torch.manual_seed(0)
    x, weight = torch.randn(3, 11, 24, dtype=dtype), torch.randn(out, 24, dtype=dtype)
    b = torch.randn(out, dtype=dtype) if bias else None
    grad_y = torch.randn(3, 11, out, dtype=dtype)

    def leaves() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return (
            x.clone().requires_grad_(train != "weight only"),
            weight.clone().requires_grad_(train != "x only"),
            None if b is None else b.clone().requires_grad_(train != "x only"),
        )

    got = _linear_and_grads(TiledProduct.apply, *leaves(), grad_y)
    expected = _linear_and_grads(F.linear, *leaves(), grad_y)

    assert len(got) == len(expected)
    for actual, reference in zip(got, expected, strict=True):
        assert actual.shape == reference.shape
        assert rel_err(actual, reference) <= tolerance


def test_the_output_is_a_view_into_whole_tiles() -> None:
    layer = TiledLinear(24, 1418, bias=False)
    x = torch.randn(2, MIN_ROWS // 2, 24)
    y = layer(x)
    assert whole_tiles(1418) == 1424 and 1424 % TILE == 0
    assert y.shape == (*x.shape[:2], 1418)
    assert y.stride() == (x.shape[1] * 1424, 1424, 1)  # rows of the padded product, not a copy
    torch.testing.assert_close(y, F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
    # The Linear's own forward: nothing to pad, too few rows (one new token), or under autocast.
    assert TiledLinear(24, 1424, bias=False)(x).is_contiguous()
    assert layer(x[:, :1]).is_contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16 and layer(x).is_contiguous()


def test_seshu_checkpoints_stay_plain_mamba2(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(TINY, TinyVocab())  # type: ignore[arg-type]
    projections = [layer.mixer.in_proj for layer in model.backbone.layers]
    assert all(type(p) is TiledLinear for p in projections) and TINY.num_hidden_layers == len(projections)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(type(layer.mixer.in_proj) is torch.nn.Linear for layer in plain.backbone.layers)
    loaded = load_model(tmp_path)  # fedem's loader tiles them again
    assert all(type(layer.mixer.in_proj) is TiledLinear for layer in loaded.backbone.layers)
    assert plain.state_dict().keys() == model.state_dict().keys()

    ids = torch.randint(3, 97, (2, MIN_ROWS // 2 + 8))
    strided: list[bool] = []
    projections[0].register_forward_hook(lambda _m, _x, y: strided.append(not y.is_contiguous()))
    model.train(), plain.train()  # the training path: fedem's mixer on in_proj's strided output
    model(input_ids=ids, labels=ids).loss.backward()
    assert strided == [True]
    plain(input_ids=ids, labels=ids).loss.backward()
    for (name, ours), theirs in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert ours.grad is not None and theirs.grad is not None
        assert rel_err(ours.grad, theirs.grad) <= 1e-5, name
    model.eval(), plain.eval()
    with torch.no_grad():  # the generation path: transformers' own mixer code on the same view
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert strided == [True, True]


def test_other_models_are_left_alone() -> None:
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=72, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    before = {name: type(m) for name, m in model.named_modules()}
    tile_projections(model)
    assert {name: type(m) for name, m in model.named_modules()} == before
