"""fedem's LoRA layer: the same outputs and gradients as peft's own, peft's path where it does not fuse,
and adapters that stay plain peft adapters."""

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from transformers import AutoModelForCausalLM

from fedem.model import lora as fused
from fedem.model.load import load_adapter
from fedem.model.lora import LoraLinear, with_fused_layers
from fedem.model.projection import MIN_ROWS
from fedem.model.seshu import LORA_TARGETS, build_model

from .conftest import TINY, TinyVocab, rel_err


class Projection(torch.nn.Module):
    """One Linear named like Seshu's LoRA target."""

    def __init__(self, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_proj = torch.nn.Linear(24, 40, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.in_proj(x)


class SameDraws(torch.nn.Module):
    """Dropout that zeroes the elements `fused.dropped_positions` picks from the same random state: the
    mask fedem's layer draws, so that peft's layer can be compared with it exactly."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = torch.ones(x.numel(), dtype=x.dtype)
        kept[fused.dropped_positions(x.numel(), self.p, x.device)] = 0
        return x * kept.view_as(x) / (1 - self.p)


def _pair(bias: bool, dropout: float, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same adapter (B random, so it contributes) through peft's layer and through fedem's, their
    dropout masks the same."""
    torch.manual_seed(0)
    base = Projection(bias, dtype)
    settings = {"r": 4, "lora_alpha": 12, "target_modules": ["in_proj"], "lora_dropout": dropout}
    stock = get_peft_model(copy.deepcopy(base), LoraConfig(**settings, init_lora_weights=False))
    ours = get_peft_model(copy.deepcopy(base), with_fused_layers(LoraConfig(**settings)))
    ours.load_state_dict(stock.state_dict())
    if dropout:
        stock.base_model.model.in_proj.lora_dropout["default"] = SameDraws(dropout)
    assert type(stock.base_model.model.in_proj) is PeftLoraLinear
    assert type(ours.base_model.model.in_proj) is LoraLinear
    return stock, ours


def _run(
    model: torch.nn.Module, x: torch.Tensor, grad_y: torch.Tensor, train_x: bool = True
) -> list[torch.Tensor]:
    """Output, ∂x (if `train_x`) and every trainable parameter's gradient, with dropout's mask drawn
    from seed 1. An x that needs no gradient is the first layer's input under a frozen embedding."""
    x = x.detach().clone().requires_grad_(train_x)
    torch.manual_seed(1)
    y = model(x)
    y.backward(grad_y)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    grad_x = [x.grad] if train_x else []
    assert all(g is not None for g in grad_x)
    return [y.detach(), *(g for g in grad_x + grads if g is not None)]


@contextmanager
def _counting() -> Iterator[list[int]]:
    """How many times the fused Function runs inside the block."""
    calls = [0]
    original = fused.LowRankLinear.apply

    def counted(*args: object) -> torch.Tensor:
        calls[0] += 1
        return original(*args)

    fused.LowRankLinear.apply = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        fused.LowRankLinear.apply = original  # type: ignore[method-assign]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("train_base", [False, True])
@pytest.mark.parametrize("train_x", [True, False])
def test_fused_layer_matches_peft(
    dtype: torch.dtype, tolerance: float, bias: bool, dropout: float, train_base: bool, train_x: bool
) -> None:
    stock, ours = _pair(bias, dropout, dtype)
    for model in (stock, ours):
        for name, param in model.named_parameters():
            if "base_layer" in name:
                param.requires_grad_(train_base)
    x = torch.randn(3, 7, 24, dtype=dtype)
    grad_y = torch.randn(3, 7, 40, dtype=dtype)

    with _counting() as calls:
        got = _run(ours, x, grad_y, train_x)
    expected = _run(stock, x, grad_y, train_x)

    assert calls[0] == 1
    assert len(got) == len(expected) == 3 + train_x + (1 + bias if train_base else 0)
    for actual, reference in zip(got, expected, strict=True):
        assert actual.shape == reference.shape
        assert rel_err(actual, reference) <= tolerance


@pytest.mark.parametrize("numel,p", [(3000, 0.05), (3000, 0.3), (3000, 0.9), (3, 0.05)])
def test_dropout_drops_each_element_independently_with_probability_p(numel: int, p: float) -> None:
    """As `nn.Dropout` does, drawn as gaps between drops: every element alike, the start and the end
    too, each call anew. With 3 elements the first draw falls short of the end once in ~140 calls
    and is extended."""
    draws = 300 if numel > 10 else 20_000
    torch.manual_seed(0)
    counts = torch.zeros(numel)
    for _ in range(draws):
        positions = fused.dropped_positions(numel, p, torch.device("cpu"))
        assert positions.dtype == torch.int64 and bool((positions.diff() > 0).all())
        assert positions.numel() == 0 or 0 <= int(positions[0]) <= int(positions[-1]) < numel
        counts[positions] += 1
    rate = counts / draws
    sigma = (p * (1 - p) / draws) ** 0.5  # of one element's rate
    assert abs(float(rate.mean()) - p) < 5 * sigma / numel**0.5
    if numel > 10:  # no place favoured, and per element a binomial spread
        tenths = rate.view(10, -1).mean(1)
        assert float((tenths - p).abs().max()) < 5 * sigma / (numel / 10) ** 0.5
        assert 0.8 < float(rate.var()) / sigma**2 < 1.2
    else:
        assert float((rate - p).abs().max()) < 5 * sigma


def test_peft_runs_what_the_layer_does_not_fuse() -> None:
    stock, ours = _pair(bias=True, dropout=0.0, dtype=torch.float32)
    base = ours.base_model.model.in_proj.get_base_layer()
    x = torch.randn(2, MIN_ROWS // 2, 24)  # as many rows as a prompt: fused, also without gradients
    one_token = x[:, -1:]  # a decoding step's: peft's own products cost less than joining the weights

    with _counting() as calls, torch.no_grad():
        plain = ours(x)
        torch.testing.assert_close(ours(one_token), stock(one_token))
        with ours.disable_adapter():
            assert torch.equal(ours(x), base(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(ours(x), stock(x))
        ours.merge_adapter()
        torch.testing.assert_close(ours(x), plain, rtol=1e-5, atol=1e-5)

    assert calls[0] == 1  # the plain call only


def test_seshu_adapter_is_a_plain_peft_adapter(tmp_path: Path) -> None:
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    torch.manual_seed(0)
    base = build_model(TINY, TinyVocab())  # type: ignore[arg-type]
    base.save_pretrained(base_dir)
    config = with_fused_layers(LoraConfig(r=4, target_modules=list(LORA_TARGETS), init_lora_weights=False))
    model = get_peft_model(base, config)
    layers = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
    assert len(layers) == TINY.num_hidden_layers and all(type(m) is LoraLinear for m in layers)
    model.save_pretrained(adapter_dir)
    ids = torch.randint(3, 97, (2, 20))
    with _counting() as calls:  # fused over the tiled in_proj (`fedem.model.projection`) too
        model(input_ids=ids, labels=ids).loss.backward()
    assert calls[0] == TINY.num_hidden_layers
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    assert "custom" not in (adapter_dir / "adapter_config.json").read_text()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir, base_dir)
    assert all(type(m) is PeftLoraLinear for m in plain.modules() if isinstance(m, PeftLoraLinear))
    assert all(type(m) is LoraLinear for m in ours.modules() if isinstance(m, PeftLoraLinear))
    with torch.no_grad():
        for loaded in (plain, ours):
            loaded.eval()
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
