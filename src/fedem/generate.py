"""Text generation from a checkpoint (optionally with a LoRA adapter): greedy, beam search or sampling.

`fedem generate` streams tokens to the terminal as they are produced. Beam search cannot stream:
transformers refuses a streamer when `num_beams > 1`, because the best beam is only known at the end.
For beam search the finished text is handed to the streamer in one piece, so the caller's code path
is the same for every strategy.

Beam search is correct with Mamba-2's recurrent cache in transformers 5.x: the cache is reordered with
the beams, and the result (tokens and beam scores) equals a run with `use_cache=False`, which
recomputes every step from the full sequence (checked in tests), so the cache stays on.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from fedem.errors import UserError
from fedem.model.load import load_adapter, load_model, load_tokenizer

Strategy = Literal["greedy", "beam", "sample"]

SAMPLING_FIELDS = ("top_k", "top_p", "temperature")


class DecodingConfig(BaseModel):
    """How to pick tokens. Options of another strategy are refused rather than silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Strategy = "greedy"
    num_beams: int = Field(default=4, ge=1, description="beams kept (beam search only)")
    top_k: int = Field(default=50, ge=0, description="sample among the k likeliest tokens; 0 = no limit")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus: smallest set with this mass")
    temperature: float = Field(default=1.0, gt=0.0, description="divide logits by this before sampling")
    max_new_tokens: int = Field(default=128, ge=1)
    repetition_penalty: float = Field(default=1.0, gt=0.0, description="1.0 = off (CTRL-style penalty)")
    seed: int = Field(default=0, ge=0, description="sampling seed; the same seed gives the same text")

    @model_validator(mode="after")
    def _options_fit_strategy(self) -> "DecodingConfig":
        given = self.model_fields_set
        if self.strategy == "beam" and self.num_beams < 2:
            raise ValueError("beam search needs num_beams ≥ 2 (num_beams=1 is greedy)")
        if self.strategy != "beam" and "num_beams" in given:
            raise ValueError(f"num_beams only applies to strategy 'beam', not {self.strategy!r}")
        misplaced = [name for name in SAMPLING_FIELDS if name in given]
        if self.strategy != "sample" and misplaced:
            raise ValueError(f"{', '.join(misplaced)} only apply to strategy 'sample', not {self.strategy!r}")
        return self


def decoding_config(**options: object) -> DecodingConfig:
    """A `DecodingConfig` from user options (None = not given); a bad value becomes one clear line."""
    given = {key: value for key, value in options.items() if value is not None}
    try:
        return DecodingConfig.model_validate(given)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown decoding option"
        raise UserError(f"{where}: {message}" if where else message) from None


def generation_config(cfg: DecodingConfig, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """The transformers `GenerationConfig` for `cfg`, stopping at the tokenizer's EOS."""
    common = {
        "max_new_tokens": cfg.max_new_tokens,
        "repetition_penalty": cfg.repetition_penalty,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if cfg.strategy == "beam":
        return GenerationConfig(do_sample=False, num_beams=cfg.num_beams, early_stopping=True, **common)
    if cfg.strategy == "sample":
        return GenerationConfig(
            do_sample=True, top_k=cfg.top_k, top_p=cfg.top_p, temperature=cfg.temperature, **common
        )
    return GenerationConfig(do_sample=False, num_beams=1, **common)


def generate_ids(
    model: PreTrainedModel,
    inputs: Mapping[str, torch.Tensor],
    config: GenerationConfig,
    streamer: BaseStreamer | None = None,
) -> torch.Tensor:
    """`model.generate` with a plain return type: prompt + new token ids, one row per input row.

    (transformers types `generate` loosely enough that mypy rejects every direct call.)
    """
    generator: Any = model
    output = generator.generate(**inputs, generation_config=config, streamer=streamer)
    return cast(torch.Tensor, output)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    cfg: DecodingConfig,
    streamer: BaseStreamer | None = None,
) -> str:
    """The continuation of `prompt` (special tokens dropped, leading space kept), streamed if asked.

    Sampling is seeded with `cfg.seed` inside a forked RNG, so the same seed gives the same text and
    the caller's global torch RNG is left as it was. With beam search the streamer gets the prompt and
    then the whole result at the end (see the module docstring).
    """
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    live = streamer if cfg.strategy != "beam" else None
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        output = generate_ids(model, inputs, generation_config(cfg, tokenizer), streamer=live)
    model.train(was_training)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    if streamer is not None and live is None:
        streamer.put(inputs["input_ids"].cpu())  # a skip_prompt streamer drops this first put
        streamer.put(new_tokens[None].cpu())
        streamer.end()
    return cast(str, tokenizer.decode(new_tokens, skip_special_tokens=True))


def load_for_inference(
    model_dir: Path, adapter: Path | None = None, device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer ready for evaluation or generation, on the GPU when there is one.

    An adapter is merged into the base weights (`merge_and_unload`): the outputs are the same as the
    wrapped model's, and every forward pass skips the LoRA side branch.
    """
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    if adapter is not None:
        model = cast(PreTrainedModel, load_adapter(model, adapter, model_dir).merge_and_unload())
    cast(torch.nn.Module, model).to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    model.eval()
    return model, tokenizer
