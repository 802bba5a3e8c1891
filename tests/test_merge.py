"""`fedem merge`: each method matches its formula, merged checkpoints behave like the adapters, refusals."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from fedem.cli import main
from fedem.errors import UserError
from fedem.merge import combine, delta_weights, merge
from fedem.provenance import read_provenance, weights_fingerprint, write_provenance

LAYERS = ("backbone.layers.0.mixer.in_proj.weight", "backbone.layers.1.mixer.in_proj.weight")
SENTENCES = [
    "The river runs past the old mill and into the sea.",
    "नदी पुरानी चक्की के पास से बहती है।",
    "ஆறு பழைய ஆலையைக் கடந்து கடலுக்குச் செல்கிறது.",
]


def make_adapter(base_dir: Path, out: Path, seed: int, base_sha256: str | None = None, **lora: Any) -> Path:
    """A saved LoRA adapter on `in_proj` with random A and (unlike peft's zero init) random non-zero B."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["in_proj"], **lora})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    peft_model.save_pretrained(out)
    write_provenance(out, "train-lora", {}, base_sha256=base_sha256 or weights_fingerprint(base_dir))
    return out


def expected_delta(adapter_dir: Path, scale: float = 8 / 4) -> dict[str, np.ndarray]:
    """ΔW = scale · B @ A per base parameter, straight from the saved tensors (independent of fedem)."""
    tensors = {k: v.double().numpy() for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    return {
        layer: scale
        * tensors[f"base_model.model.{layer[: -len('.weight')]}.lora_B.weight"]
        @ tensors[f"base_model.model.{layer[: -len('.weight')]}.lora_A.weight"]
        for layer in LAYERS
    }


def parameters(model_dir: Path) -> dict[str, np.ndarray]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {name: p.detach().double().numpy() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, root / f"adapter-{seed}", seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def linear_merged(
    tiny_model_dir: Path, adapters: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("merged") / "linear"
    merge(tiny_model_dir, adapters[:2], "linear", out, weights=[0.3, 0.7])
    return out


def test_delta_weights_is_scale_times_b_at_a(adapters: list[Path]) -> None:
    # Prepare
    expected = expected_delta(adapters[0])
    # Execute
    deltas = delta_weights(adapters[0])
    # Assert
    assert sorted(deltas) == list(LAYERS)
    for layer in LAYERS:
        np.testing.assert_allclose(deltas[layer].double().numpy(), expected[layer], atol=1e-5)


@pytest.mark.parametrize(
    ("lora", "scales"),
    [
        ({"use_rslora": True}, (8 / 2, 8 / 2)),  # α/√r
        (
            {"rank_pattern": {"layers.1.mixer.in_proj": 2}, "alpha_pattern": {"layers.0.mixer.in_proj": 3}},
            (3 / 4, 8 / 2),  # α/r with α=3 in layer 0, r=2 in layer 1
        ),
    ],
)
def test_delta_weights_matches_peft_scaling(
    tiny_model_dir: Path, tmp_path: Path, lora: dict, scales: tuple[float, float]
) -> None:
    # Prepare: peft's own get_delta_weight is the reference for rsLoRA and per-module rank/alpha
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=5, **lora)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    modules = dict(loaded.base_model.model.named_modules())
    # Execute
    deltas = delta_weights(adapter)
    # Assert
    for layer, scale in zip(LAYERS, scales, strict=True):
        module = modules[layer[: -len(".weight")]]
        assert module.scaling["default"] == pytest.approx(scale)
        torch.testing.assert_close(deltas[layer], module.get_delta_weight("default"), atol=1e-6, rtol=1e-5)


def test_linear_merge_adds_weighted_sum_of_deltas(
    tiny_model_dir: Path, adapters: list[Path], linear_merged: Path
) -> None:
    # Prepare
    base, merged = parameters(tiny_model_dir), parameters(linear_merged)
    d1, d2 = expected_delta(adapters[0]), expected_delta(adapters[1])
    # Assert: the targeted weights moved by 0.3 ΔW₁ + 0.7 ΔW₂, everything else is untouched
    for name, value in merged.items():
        if name in LAYERS:
            np.testing.assert_allclose(value - base[name], 0.3 * d1[name] + 0.7 * d2[name], atol=1e-5)
        else:
            np.testing.assert_array_equal(value, base[name])


def test_linear_defaults_to_average_and_task_arithmetic_to_sum(adapters: list[Path]) -> None:
    # Prepare
    deltas = [delta_weights(a)[LAYERS[0]] for a in adapters]
    expected = [expected_delta(a)[LAYERS[0]] for a in adapters]
    # Execute
    soup = combine(deltas, "linear")
    summed = combine(deltas, "task_arithmetic")
    scaled = combine(deltas, "task_arithmetic", weights=[1.0, -0.5, 2.0])
    # Assert
    np.testing.assert_allclose(soup.double().numpy(), sum(expected) / 3, atol=1e-5)
    np.testing.assert_allclose(summed.double().numpy(), sum(expected), atol=1e-5)
    np.testing.assert_allclose(
        scaled.double().numpy(), expected[0] - 0.5 * expected[1] + 2.0 * expected[2], atol=1e-5
    )


def test_ties_trims_elects_sign_and_averages_agreeing_entries() -> None:
    # Prepare: three 2×2 ΔW; density 0.5 keeps the 2 largest |entries| of each
    deltas = [
        torch.tensor([[4.0, -1.0], [2.0, -3.0]]),  # trimmed: [[4, 0], [0, -3]]
        torch.tensor([[-2.0, 5.0], [1.0, 0.5]]),  # trimmed: [[-2, 5], [0, 0]]
        torch.tensor([[3.0, -6.0], [-0.5, 1.0]]),  # trimmed: [[3, -6], [0, 0]]
    ]
    # sums of trimmed: [[5, -1], [0, -3]] → elected signs [[+, -], [+ (tie), -]]
    # agreeing entries: (0,0): 4, 3; (0,1): -6; (1,0): none; (1,1): -3
    # Execute
    plain = combine(deltas, "ties", density=0.5)
    weighted = combine(deltas, "ties", weights=[1.0, 0.5, 2.0], density=0.5)
    # Assert: mean over the agreeing entries only (weights applied after the sign election)
    torch.testing.assert_close(plain, torch.tensor([[3.5, -6.0], [0.0, -3.0]]))
    torch.testing.assert_close(weighted, torch.tensor([[(4.0 + 2 * 3.0) / 2, -12.0], [0.0, -3.0]]))


def test_ties_elects_sign_by_total_mass_not_by_count() -> None:
    # Prepare: two small positive entries against one large negative
    deltas = [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-5.0])]
    # Execute
    merged = combine(deltas, "ties", density=1.0)
    # Assert: Σ = -3 < 0, so the negative sign wins and only -5 survives
    torch.testing.assert_close(merged, torch.tensor([-5.0]))


def test_dare_at_density_one_equals_linear_and_ties(adapters: list[Path]) -> None:
    # Prepare
    deltas = [delta_weights(a)[LAYERS[1]] for a in adapters]
    weights = [0.2, 0.3, 0.5]
    # Execute / Assert
    torch.testing.assert_close(
        combine(deltas, "dare_linear", weights, density=1.0), combine(deltas, "linear", weights)
    )
    torch.testing.assert_close(
        combine(deltas, "dare_ties", weights, density=1.0), combine(deltas, "ties", weights, density=1.0)
    )


def test_dare_drops_at_random_rescales_and_is_seeded() -> None:
    # Prepare
    delta = torch.arange(1.0, 2001.0).reshape(40, 50)
    # Execute
    first = combine([delta], "dare_linear", density=0.25, seed=7)
    again = combine([delta], "dare_linear", density=0.25, seed=7)
    other = combine([delta], "dare_linear", density=0.25, seed=8)
    # Assert: every entry is dropped (0) or kept and rescaled by 1/density; same seed, same mask
    kept = first != 0
    torch.testing.assert_close(first[kept], delta[kept] / 0.25)
    assert 0.15 < kept.float().mean().item() < 0.35
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other)


def test_merged_checkpoint_gives_the_adapters_logits(
    tiny_model_dir: Path, tiny_tokenizer: PreTrainedTokenizerFast, adapters: list[Path], tmp_path: Path
) -> None:
    # Prepare
    batch = tiny_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters[0]
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # Execute
    merge(tiny_model_dir, [adapters[0]], "task_arithmetic", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        expected = with_adapter.eval()(**batch).logits
        actual = merged.eval()(**batch).logits
        untouched = base.eval()(**batch).logits
    # Assert: same logits as the adapter, and the adapter does change them
    assert (expected - untouched).abs().max() > 1e-3
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_merged_folder_loads_without_fedem(linear_merged: Path, tmp_path: Path) -> None:
    # Prepare
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = tokenizer('hello', return_tensors='pt').input_ids\n"
        "assert model(ids).logits.shape[-1] == model.config.vocab_size\n"
        "assert not any(name.split('.')[0] == 'fedem' for name in sys.modules)\n"
        "print(type(model).__name__)\n"
    )
    # Execute
    done = subprocess.run(
        [sys.executable, "-c", script, str(linear_merged)], cwd=tmp_path, capture_output=True, text=True
    )
    # Assert
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Mamba2ForCausalLM"


def test_model_card_and_provenance_list_the_inputs(
    tiny_model_dir: Path, adapters: list[Path], linear_merged: Path
) -> None:
    # Execute
    card = (linear_merged / "README.md").read_text(encoding="utf-8")
    provenance = read_provenance(linear_merged)
    # Assert
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert str(tiny_model_dir) in card and weights_fingerprint(tiny_model_dir) in card
    for adapter in adapters[:2]:
        assert str(adapter) in card and weights_fingerprint(adapter) in card
    assert "`linear`" in card and "0.3, 0.7" in card
    assert provenance["command"] == "merge"
    assert provenance["base_sha256"] == weights_fingerprint(tiny_model_dir)
    assert provenance["config"]["weights"] == [0.3, 0.7]
    assert not list(linear_merged.parent.glob(".*.tmp"))
    assert linear_merged.stat().st_mode & 0o777 == 0o755


def test_refuses_adapter_trained_on_another_base(
    tiny_model_dir: Path, adapters: list[Path], tmp_path: Path
) -> None:
    # Prepare
    foreign = make_adapter(tiny_model_dir, tmp_path / "foreign", seed=9, base_sha256="0" * 64)
    # Execute / Assert
    with pytest.raises(UserError, match="another base"):
        merge(tiny_model_dir, [adapters[0], foreign], "linear", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("method", "weights", "density", "message"),
    [
        ("linear", [0.5], None, "1 weights given for 2 adapters"),
        ("ties", None, None, "needs --density"),
        ("dare_linear", None, 0.0, r"density must be in \(0, 1\]"),
        ("slerp", None, None, "unknown merge method"),
        ("linear", None, 0.5, "--density applies to"),
    ],
)
def test_refuses_bad_parameters(
    tiny_model_dir: Path,
    adapters: list[Path],
    tmp_path: Path,
    method: str,
    weights: list[float] | None,
    density: float | None,
    message: str,
) -> None:
    with pytest.raises(UserError, match=message):
        merge(tiny_model_dir, adapters[:2], method, tmp_path / "out", weights=weights, density=density)


def test_refuses_dora_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", seed=4, use_dora=True)
    # Execute / Assert
    with pytest.raises(UserError, match="DoRA"):
        merge(tiny_model_dir, [dora], "linear", tmp_path / "out")


def test_refuses_non_empty_out_and_leaves_nothing_behind_on_failure(
    tiny_model_dir: Path, adapters: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr("fedem.merge.write_provenance", crash)
    # Execute / Assert
    with pytest.raises(UserError, match="not empty"):
        merge(tiny_model_dir, adapters[:1], "linear", occupied)
    with pytest.raises(RuntimeError, match="disk full"):
        merge(tiny_model_dir, adapters[:1], "linear", tmp_path / "crashed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]
    assert (occupied / "keep.txt").read_text() == "mine"


# --- robust aggregation: median, trimmed mean, norm clipping -------------------------------------------


def test_median_and_trimmed_mean_are_per_entry_order_statistics() -> None:
    # Prepare: five "adapters" of one 2×3 parameter
    deltas = [torch.randn(2, 3, generator=torch.Generator().manual_seed(seed)) for seed in range(5)]
    stacked = np.stack([d.numpy() for d in deltas])  # (5, 2, 3)
    values = np.sort(stacked, axis=0)
    # Execute / Assert: median as numpy's (even n: mean of the two middle values)
    torch.testing.assert_close(combine(deltas, "median"), torch.from_numpy(np.median(stacked, axis=0)))
    torch.testing.assert_close(
        combine(deltas[:4], "median"), torch.from_numpy(np.median(stacked[:4], axis=0))
    )
    # trim 0.2 of 5 cuts one from each end; 0.4 cuts two (the median)
    torch.testing.assert_close(
        combine(deltas, "trimmed_mean", trim=0.2), torch.from_numpy(values[1:4].mean(0))
    )
    torch.testing.assert_close(combine(deltas, "trimmed_mean", trim=0.4), combine(deltas, "median"))


@pytest.mark.parametrize(
    ("method", "weights", "trim", "message"),
    [
        ("trimmed_mean", None, None, r"needs --trim in \(0, 0.5\)"),
        ("trimmed_mean", None, 0.5, r"needs --trim in \(0, 0.5\)"),
        ("trimmed_mean", None, 0.2, "cuts none from either end"),
        ("median", [1.0, 2.0, 1.0], None, "takes no --weights"),
        ("linear", None, 0.2, "--trim applies to trimmed_mean"),
    ],
)
def test_robust_methods_refuse_bad_parameters(
    method: str, weights: list[float] | None, trim: float | None, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        combine([torch.zeros(2, 2)] * 3, method, weights, trim=trim)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def poisoned(adapters: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """adapters[0] with every lora_B scaled by 1000: a ΔW 1000× an honest one, otherwise well-formed."""
    out = tmp_path_factory.mktemp("poisoned") / "adapter"
    shutil.copytree(adapters[0], out)
    tensors = load_file(out / "adapter_model.safetensors")
    save_file(
        {k: v * 1000 if "lora_B" in k else v for k, v in tensors.items()}, out / "adapter_model.safetensors"
    )
    return out


def norm(deltas: dict[str, np.ndarray]) -> float:
    """‖ΔW‖ over all layers together."""
    return float(np.sqrt(sum((d**2).sum() for d in deltas.values())))


def merged_delta(tiny_model_dir: Path, merged: Path) -> dict[str, np.ndarray]:
    base, after = parameters(tiny_model_dir), parameters(merged)
    return {layer: after[layer] - base[layer] for layer in LAYERS}


def test_robust_merges_bound_a_poisoned_adapter(
    tiny_model_dir: Path, adapters: list[Path], poisoned: Path, tmp_path: Path
) -> None:
    # Prepare: three honest adapters and one whose ΔW is 1000× too large
    inputs = [*adapters, poisoned]
    honest = [expected_delta(a) for a in adapters]
    honest_norms = [norm(d) for d in honest]
    # Execute
    plain = merge(tiny_model_dir, inputs, "linear", tmp_path / "linear")
    median = merge(tiny_model_dir, inputs, "median", tmp_path / "median")
    trimmed = merge(tiny_model_dir, inputs, "trimmed_mean", tmp_path / "trimmed", trim=0.25)
    clipped = merge(tiny_model_dir, inputs, "linear", tmp_path / "clipped", clip="median")
    # Assert: the plain average is dragged ~250× away; median and trimmed mean stay inside the range the
    # honest adapters span, entry by entry; clipping shrinks the poisoned adapter to the median norm
    assert norm(merged_delta(tiny_model_dir, tmp_path / "linear")) > 100 * max(honest_norms)
    for name in ("median", "trimmed"):
        delta = merged_delta(tiny_model_dir, tmp_path / name)
        for layer in LAYERS:
            low = np.min([h[layer] for h in honest], axis=0)
            high = np.max([h[layer] for h in honest], axis=0)
            assert np.all(delta[layer] >= low - 1e-5) and np.all(delta[layer] <= high + 1e-5), name
    report = clipped["clip"]
    assert report["bound"] == pytest.approx(float(np.median(report["norms"])))
    assert report["norms"][3] == pytest.approx(1000 * report["norms"][0], rel=1e-4)
    assert report["factors"][3] == pytest.approx(report["bound"] / report["norms"][3])
    assert norm(merged_delta(tiny_model_dir, tmp_path / "clipped")) <= report["bound"] + 1e-4
    assert plain["clip"] is None and median["weights"] == [1.0] * 4 and trimmed["trim"] == 0.25


def test_cli_merges_robustly_and_records_how(
    tiny_model_dir: Path,
    adapters: list[Path],
    poisoned: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    args = ["merge", "--base", str(tiny_model_dir), "--adapters", *map(str, [*adapters, poisoned])]
    # Execute
    done = main(
        [
            *args,
            "--method",
            "trimmed_mean",
            "--trim",
            "0.25",
            "--clip",
            "2.5",
            "--out",
            str(tmp_path / "m"),
            "--json",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with pytest.raises(SystemExit) as refused:  # argparse: one line on stderr, exit status 2
        main([*args, "--method", "trimmed_mean", "--clip", "huge", "--out", str(tmp_path / "x")])
    # Assert
    assert done == 0 and summary["clip"]["bound"] == 2.5 and summary["trim"] == 0.25
    config = read_provenance(tmp_path / "m")["config"]
    assert config["clip"] == 2.5 and config["trim"] == 0.25 and config["method"] == "trimmed_mean"
    assert "norm clipping: every adapter's ‖ΔW‖ to at most 2.5" in (tmp_path / "m" / "README.md").read_text()
    assert refused.value.code == 2 and "'median' or a positive number" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
