"""Decoding: greedy vs hand-rolled argmax, seeded sampling, beam search with Mamba-2's cache, streaming."""

import copy
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from fedem.errors import UserError
from fedem.generate import (
    DecodingConfig,
    decoding_config,
    generate,
    generate_ids,
    generation_config,
    load_for_inference,
)

PROMPT = "English: Where is the station?\nHindi:"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_for_inference(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def sharp(tiny) -> PreTrainedModel:
    """The tiny model with its mixer projections scaled up, so that its output depends on the prompt
    (a random init barely looks at its context) and beam search has real choices to reorder."""
    model = copy.deepcopy(tiny[0])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("in_proj.weight", "out_proj.weight")):
                param.mul_(2.0)
    return model


class Collector(TextStreamer):
    """A streamer that keeps what it would print."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.pieces: list[str] = []
        self.ended = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.pieces.append(text)
        self.ended = self.ended or stream_end


def test_greedy_equals_step_by_step_argmax(tiny, sharp) -> None:
    model, tokenizer = sharp, tiny[1]
    ids = tokenizer(PROMPT)["input_ids"]
    prompt_length = len(ids)
    with torch.no_grad():
        for _ in range(6):
            next_id = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(next_id)
            if next_id == tokenizer.eos_token_id:
                break
    expected = tokenizer.decode(ids[prompt_length:], skip_special_tokens=True)
    cfg = DecodingConfig(max_new_tokens=6)
    assert generate(model, tokenizer, PROMPT, cfg) == expected
    assert generate(model, tokenizer, PROMPT, cfg) == expected


def test_sampling_is_reproducible_with_a_seed(tiny) -> None:
    model, tokenizer = tiny
    cfg = DecodingConfig(strategy="sample", max_new_tokens=12, seed=7, temperature=1.5)
    first = generate(model, tokenizer, PROMPT, cfg)
    assert generate(model, tokenizer, PROMPT, cfg) == first
    other = generate(model, tokenizer, PROMPT, cfg.model_copy(update={"seed": 8}))
    assert other != first  # a near-uniform random model: 12 identical draws would be a broken seed


def test_generate_leaves_the_global_rng_alone(tiny) -> None:
    model, tokenizer = tiny
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(model, tokenizer, PROMPT, DecodingConfig(strategy="sample", max_new_tokens=4))
    assert torch.equal(torch.rand(3), expected)


def test_top_k_one_sampling_equals_greedy(tiny) -> None:
    model, tokenizer = tiny
    greedy = generate(model, tokenizer, PROMPT, DecodingConfig(max_new_tokens=10))
    sampled = generate(
        model, tokenizer, PROMPT, DecodingConfig(strategy="sample", top_k=1, max_new_tokens=10)
    )
    assert sampled == greedy


def test_beam_search_with_cache_equals_without(tiny, sharp) -> None:
    """Mamba-2's recurrent cache must be reordered with the beams; recomputing from scratch is the truth."""
    model, tokenizer = sharp, tiny[1]
    cfg = DecodingConfig(strategy="beam", num_beams=3, max_new_tokens=8)
    text = generate(model, tokenizer, PROMPT, cfg)
    assert isinstance(text, str) and text

    inputs = tokenizer(PROMPT, return_tensors="pt")
    cached = generation_config(cfg, tokenizer)
    uncached = generation_config(cfg, tokenizer)
    uncached.use_cache = False
    with torch.no_grad():
        assert torch.equal(generate_ids(model, inputs, cached), generate_ids(model, inputs, uncached))


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_streamer_receives_the_generated_text(tiny, strategy) -> None:
    model, tokenizer = tiny
    cfg = DecodingConfig(
        strategy=strategy, max_new_tokens=10, **({"num_beams": 2} if strategy == "beam" else {})
    )
    streamer = Collector(tokenizer)
    text = generate(model, tokenizer, PROMPT, cfg, streamer=streamer)
    assert "".join(streamer.pieces) == text
    assert streamer.ended


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"strategy": "beam", "num_beams": 1}, "num_beams ≥ 2"),
        ({"strategy": "sample", "temperature": 0.0}, "greater than 0"),
        ({"strategy": "sample", "top_p": 1.5}, "less than or equal to 1"),
        ({"strategy": "greedy", "top_k": 5}, "only apply to strategy 'sample'"),
        ({"strategy": "sample", "num_beams": 4}, "only applies to strategy 'beam'"),
        ({"strategy": "nucleus"}, "strategy"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"beams": 3}, "unknown decoding option"),
    ],
)
def test_invalid_decoding_options_are_user_errors(options, message) -> None:
    with pytest.raises(UserError, match=message):
        decoding_config(**options)
    with pytest.raises(ValidationError):
        DecodingConfig(**options)


def test_decoding_config_ignores_options_not_given() -> None:
    cfg = decoding_config(strategy="greedy", num_beams=None, top_k=None, temperature=None, max_new_tokens=5)
    assert cfg == DecodingConfig(max_new_tokens=5)
    beam = generation_config(decoding_config(strategy="beam", num_beams=3), tokenizer=_Specials())
    assert beam.num_beams == 3 and not beam.do_sample


class _Specials:
    eos_token_id, pad_token_id, bos_token_id = 2, 0, 1
