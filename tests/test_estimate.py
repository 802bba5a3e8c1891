"""`fedem estimate`: count parsing, the cited formulas, and LoRA counts checked against a real peft model."""

import argparse

import pytest

from fedem.errors import UserError
from fedem.estimate import (
    DEVICES,
    Shape,
    add_estimate_parser,
    derive_shape,
    estimate,
    lora_params,
    parse_count,
    summary,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("130M", 130_000_000),
        ("2.6B", 2_600_000_000),
        ("1e9", 1_000_000_000),
        ("7,000", 7000),
        ("1.5k", 1500),
        ("2T", 2 * 10**12),
        (" 42 ", 42),
    ],
)
def test_parse_count(text: str, value: int) -> None:
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["", "abc", "M", "-5", "0", "1.5", "1e-3", "nan", "inf", "12X"])
def test_parse_count_rejects_nonsense(text: str) -> None:
    with pytest.raises(UserError):
        parse_count(text)


def test_flops_are_6nd_and_default_tokens_chinchilla() -> None:
    est = estimate(1000, 50, "h100", hidden=64, layers=2)
    assert est.flops == 6 * 1000 * 50
    assert est.chinchilla_tokens == 20_000
    assert estimate(130_000_000).tokens == 2_600_000_000  # tokens default to 20·N


def test_memory_is_16_bytes_per_param() -> None:
    for device in ("h100", "cpu"):
        m = estimate(10**6, device=device, hidden=64, layers=2).memory
        assert m.weights + m.gradients + m.optimizer == 16 * 10**6


def test_wall_clock_and_cost() -> None:
    est = estimate(10**8, 2 * 10**9, "a100", utilisation=0.5, hidden=512, layers=8)
    hours = 6 * 10**8 * 2 * 10**9 / (312e12 * 0.5) / 3600
    assert est.hours == pytest.approx(hours)
    assert est.cost_usd == pytest.approx(hours * DEVICES["a100"].usd_per_hour)
    assert estimate(10**6, device="cpu").utilisation == DEVICES["cpu"].utilisation


def test_bad_inputs() -> None:
    with pytest.raises(UserError, match="unknown device"):
        estimate(10**6, device="tpu")
    with pytest.raises(UserError):
        estimate(10**6, utilisation=1.5)
    with pytest.raises(UserError):
        estimate(10**6, lora_rank=0)


def test_derived_shape_is_close_to_seshu_base() -> None:
    shape = derive_shape(133_000_000)
    assert shape.assumed and 700 <= shape.hidden <= 900 and 25 <= shape.layers <= 40
    assert derive_shape(133_000_000, hidden=768).layers == 38  # 133M / (6·768²)
    assert not derive_shape(10**6, 64, 2).assumed


def test_lora_saves_memory_and_a_third_of_flops() -> None:
    full = estimate(133_000_000, hidden=768, layers=32, state_size=128)
    lora = estimate(133_000_000, hidden=768, layers=32, state_size=128, lora_rank=16)
    assert lora.memory.total < full.memory.total
    assert lora.memory.activations == full.memory.activations
    assert lora.flops == 4 * 133_000_000 * lora.tokens + 6 * lora.lora_trainable * lora.tokens
    assert lora.flops < full.flops


class _TokenizerStub:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 300


def test_lora_params_match_peft() -> None:
    from peft import LoraConfig, get_peft_model

    from fedem.model.seshu import SeshuSize, build_model

    size = SeshuSize(hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16)
    model = build_model(size, _TokenizerStub())  # type: ignore[arg-type]
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["in_proj"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_params(Shape(64, 2, state_size=16, head_dim=16), 8) == trainable
    est = estimate(10**6, hidden=64, layers=2, state_size=16, head_dim=16, lora_rank=8)
    assert est.lora_trainable == trainable


def test_cli_summary() -> None:
    parser = argparse.ArgumentParser()
    add_estimate_parser(parser.add_subparsers())
    args = parser.parse_args(["estimate", "--params", "130M", "--tokens", "2.6B", "--lora-rank", "16"])
    out = args.handler(args)
    assert out["flops"].endswith("FLOPs") and out["memory"]["total"].endswith("GiB")
    assert out["lora"]["trainable_params"] > 0
    assert "assumed" in out["shape"]
    bad = parser.parse_args(["estimate", "--params", "lots"])
    with pytest.raises(UserError):
        args.handler(bad)
    assert summary(estimate(10**6, hidden=64, layers=2))["mode"] == "full training"
