"""Evaluation: bits-per-byte by hand, batching invariance, left-padded translation, reports, errors."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedem.data.corpus import load_mono
from fedem.errors import UserError
from fedem.evaluate import evaluate, markdown_report, newline_token_ids, score_lines, translate
from fedem.generate import load_for_inference
from fedem.model.load import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_for_inference(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def sharp(tiny) -> PreTrainedModel:
    """The tiny model with its mixer projections scaled up: a random init barely looks at its context
    (every prompt gets the same continuation), which would make batched-vs-single checks vacuous."""
    model = copy.deepcopy(tiny[0])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("in_proj.weight", "out_proj.weight")):
                param.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def hindi(data_dir: Path) -> list[str]:
    return load_mono(data_dir / "mono", split="valid", languages=["hi"])["hi"][:12]


def test_bits_per_byte_equals_hand_computation(tiny, hindi) -> None:
    model, tokenizer = tiny
    line = hindi[0]
    ids = [tokenizer.bos_token_id, *tokenizer(line, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    nll = -sum(log_probs[t, ids[t + 1]].item() for t in range(len(ids) - 1))
    expected_bpb = nll / math.log(2) / len(line.encode("utf-8"))

    score = score_lines(model, tokenizer, [line])
    assert score.tokens == len(ids) - 1
    assert score.bytes == len(line.encode("utf-8"))
    assert score.bits_per_byte == pytest.approx(expected_bpb, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_score_lines_does_not_depend_on_batching_or_order(tiny, hindi) -> None:
    model, tokenizer = tiny
    lines = [*hindi, "Where is the station?", "नमस्ते"]
    reference = score_lines(model, tokenizer, lines, batch_size=len(lines))
    for batch_size, order in [(1, lines), (4, lines), (5, lines[::-1])]:
        score = score_lines(model, tokenizer, order, batch_size=batch_size)
        assert (score.tokens, score.bytes) == (reference.tokens, reference.bytes)
        assert score.nll == pytest.approx(reference.nll, rel=1e-5)


def test_left_padding_is_exact_for_mamba2(tiny) -> None:
    """The fact `translate` relies on: a left-padded row scores like the same prompt alone."""
    model, tokenizer = tiny
    prompts = ["English: Hello\nHindi:", "English: Where is the railway station, please?\nTamil:"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    assert batch["attention_mask"][0, 0] == 0  # the short prompt really is padded
    with torch.no_grad():
        padded = model(**batch).logits[:, -1]
        for row, prompt in enumerate(prompts):
            alone = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
            torch.testing.assert_close(padded[row], alone, rtol=1e-4, atol=1e-4)


def test_translate_batched_equals_one_by_one(tiny, sharp) -> None:
    _, tokenizer = tiny
    sources = ["Hello.", "Where is the railway station, please?", "I like tea.", "Good morning, friends!"]
    batched = translate(sharp, tokenizer, sources, "en", "hi", max_new_tokens=8, batch_size=4)
    single = translate(sharp, tokenizer, sources, "en", "hi", max_new_tokens=8, batch_size=1)
    assert batched == single
    assert len(set(batched)) > 1  # the prompts really steer the output
    assert all("\n" not in text and text == text.strip() for text in batched)


@pytest.mark.parametrize("stop_token", ["<0x0A>", "</s>"])
def test_translate_stops_at_newline_or_eos(tiny, sharp, stop_token) -> None:
    """Force the stop token as the second generated token: one token of text, and no more steps."""
    _, tokenizer = tiny
    stop_id = tokenizer.convert_tokens_to_ids(stop_token)
    calls = []

    def force_stop(module, inputs, logits):
        calls.append(1)
        if len(calls) == 2:
            logits = logits.clone()
            logits[..., stop_id] = 1e4
        return logits

    free = translate(sharp, tokenizer, ["Hello."], "en", "hi", max_new_tokens=1)
    handle = sharp.lm_head.register_forward_hook(force_stop)
    try:
        stopped = translate(sharp, tokenizer, ["Hello."], "en", "hi", max_new_tokens=20)
    finally:
        handle.remove()
    assert stopped == free
    assert len(calls) == 2


def test_newline_tokens_are_stop_tokens(tiny) -> None:
    _, tokenizer = tiny
    ids = newline_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<0x0A>") in ids
    assert all("\n" in tokenizer.decode([i]) for i in ids)


def _run(model_dir: Path, data_dir: Path, out: Path) -> dict:
    return evaluate(
        model_dir,
        out,
        mono=data_dir / "mono",
        pairs=data_dir / "parallel",
        languages=["hi", "ta"],
        max_lines=10,
        max_pairs=3,
        max_new_tokens=8,
    )


def _without_speed(results: dict) -> dict:
    return {key: value for key, value in results.items() if key != "speed"}


def _markdown_without_speed(folder: Path) -> str:
    lines = (folder / "report.md").read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.startswith("- scoring speed:"))


def test_evaluate_writes_deterministic_reports(tiny_model_dir, data_dir, tmp_path) -> None:
    """Everything but the measured speed is identical between two runs."""
    first = _run(tiny_model_dir, data_dir, tmp_path / "a")
    second = _run(tiny_model_dir, data_dir, tmp_path / "b")
    assert _without_speed(first) == _without_speed(second)
    assert _markdown_without_speed(tmp_path / "a") == _markdown_without_speed(tmp_path / "b")

    report = json.loads((tmp_path / "a" / "report.json").read_text(encoding="utf-8"))
    assert report == first
    assert report["speed"]["device"] == "cpu" and report["speed"]["tokens_per_second"] > 0
    for code in ("hi", "ta"):
        entry = report["language_modelling"][code]
        assert entry["lines"] == 10 and entry["bpb"] > 0 and entry["perplexity"] > 1
    for key in ("en-hi", "en-ta"):
        entry = report["translation"][key]
        assert entry["pairs"] == 3 and 0 <= entry["chrf"] <= 100 and 0 <= entry["bleu"] <= 100
        assert "tok:13a" in entry["bleu_signature"]
    assert set(report["summary"]) == {"mean_bpb", "mean_flores_bpb", "mean_chrf", "mean_bleu"}
    assert list(report["flores"]) == ["en", "hi", "ta"]  # each side of the 3 test pairs
    assert report["flores"]["en"]["premium"] == 1.0 and report["flores"]["hi"]["lines"] == 3
    assert report["model_info"]["architecture"] == "Mamba2ForCausalLM"

    markdown = (tmp_path / "a" / "report.md").read_text(encoding="utf-8")
    assert markdown == markdown_report(first)
    assert "| model | hi | ta | mean |" in markdown and "| model | en-hi | en-ta | mean |" in markdown
    for heading in (
        "Bits per byte",
        "Perplexity",
        "Bits per byte on FLORES",
        "Tokenizer premium",
        "chrF",
        "BLEU",
    ):
        assert f"## {heading}" in markdown
    provenance = json.loads((tmp_path / "a" / "fedem.json").read_text(encoding="utf-8"))
    assert provenance["command"] == "evaluate" and provenance["config"]["max_pairs"] == 3


def test_evaluate_merges_an_adapter(tiny_model_dir, data_dir, tmp_path) -> None:
    torch.manual_seed(1)
    lora = LoraConfig(r=4, target_modules=["in_proj"], init_lora_weights=False)
    wrapped = get_peft_model(load_model(tiny_model_dir), lora)
    wrapped.save_pretrained(tmp_path / "adapter")
    _, tokenizer = load_for_inference(tiny_model_dir)
    lines = load_mono(data_dir / "mono", split="valid", languages=["hi"])["hi"][:5]
    unmerged = score_lines(wrapped, tokenizer, lines).bits_per_byte

    kwargs = {"mono": data_dir / "mono", "languages": ["hi"], "max_lines": 5}
    merged = evaluate(tiny_model_dir, None, adapter=tmp_path / "adapter", **kwargs)
    base = evaluate(tiny_model_dir, None, **kwargs)
    assert merged["language_modelling"]["hi"]["bpb"] == pytest.approx(unmerged, rel=1e-4)
    assert merged["language_modelling"]["hi"]["bpb"] != base["language_modelling"]["hi"]["bpb"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mono": Path("no/such/folder")}, "no such file or folder"),
        ({"mono": "DATA/mono", "languages": ["xx"]}, "unknown language code 'xx'"),
        ({"pairs": "DATA/parallel", "languages": ["hi"], "directions": ["hi-en"]}, "unknown direction"),
        ({"pairs": Path("no/such/folder")}, "no such folder"),
        ({"mono": "DATA/mono", "max_lines": 0}, "max_lines"),
        ({}, "nothing to evaluate"),
    ],
)
def test_evaluate_user_errors(tiny_model_dir, data_dir, tmp_path, kwargs, message) -> None:
    kwargs = {
        k: data_dir / v[5:] if isinstance(v, str) and v.startswith("DATA/") else v for k, v in kwargs.items()
    }
    with pytest.raises(UserError, match=message):
        evaluate(tiny_model_dir, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
