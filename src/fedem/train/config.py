"""Configs for `fedem pretrain` and `fedem finetune`.

Each field is a flag-like setting with a default that works on a 2-core CPU for the small model;
`configs/*.yaml` hold the named recipes. All models are frozen and reject unknown keys.
"""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedem.data.prompts import Direction
from fedem.languages import language
from fedem.model.seshu import LORA_TARGETS, SeshuSize


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainSettings(Strict):
    """The optimisation loop; mapped onto HF `TrainingArguments` in one place (train/trainer.py)."""

    max_steps: int = Field(default=1000, gt=0)
    batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    learning_rate: float = Field(default=3e-3, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup", "warmup_stable_decay"] = "cosine"
    warmup_steps: int = Field(default=50, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    log_every: int = Field(default=10, gt=0)
    eval_every: int = Field(default=100, gt=0)
    save_every: int = Field(default=200, gt=0)
    keep_checkpoints: int = Field(default=2, gt=0)
    seed: int = 0


class PretrainData(Strict):
    """Where the text comes from and how it is balanced and packed."""

    mono: Path = Path("data/mono")
    languages: list[str] | None = None
    temperature: float = Field(default=3.0, gt=0)
    seq_len: int = Field(default=256, gt=1)
    eval_lines: int = Field(default=32, gt=0, description="held-out lines per language per evaluation")

    @field_validator("languages")
    @classmethod
    def _known(cls, codes: list[str] | None) -> list[str] | None:
        for code in codes or []:
            language(code)
        return codes


class PretrainConfig(Strict):
    """`fedem pretrain`: from scratch (`model` + `tokenizer`) or continued (`init_from`)."""

    model: SeshuSize | None = None
    tokenizer: Path | None = None
    init_from: Path | None = None
    data: PretrainData = PretrainData()
    train: TrainSettings = TrainSettings()
    out: Path = Path("runs/pretrain")

    @model_validator(mode="after")
    def _source(self) -> "PretrainConfig":
        if self.init_from is None and (self.model is None or self.tokenizer is None):
            raise ValueError("pretraining from scratch needs `model` and `tokenizer` (or set `init_from`)")
        return self


class LoraSettings(Strict):
    r: int = Field(default=8, gt=0)
    alpha: int = Field(default=16, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = list(LORA_TARGETS)

    @field_validator("target_modules")
    @classmethod
    def _effective(cls, targets: list[str]) -> list[str]:
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad or not targets:
            raise ValueError(
                f"LoRA targets {bad or targets} are not allowed: only {list(LORA_TARGETS)} stays effective "
                "on both the CPU path and the CUDA kernels (out_proj/conv1d are bypassed or refused)"
            )
        return targets


class FinetuneConfig(Strict):
    """`fedem finetune`: a LoRA adapter for translation pairs or a language's text."""

    base: Path
    task: Literal["translate", "lm"] = "translate"
    pairs: Path | list[Path] | None = Field(
        default=None, description="en-<lang>.tsv file(s); each file's own eval_size rows are held out"
    )
    data: Path | None = None
    direction: Direction = "en-xx"
    lang: str | None = Field(
        default=None, description="the pairs' non-English language, when the file is not named en-<lang>.tsv"
    )
    init: Path | None = None
    rebase: bool = Field(
        default=False,
        description="allow `init` to come from another base release (the relay after a new release); "
        "its recorded base goes into fedem.json as `init_base_sha256`",
    )
    parent: str | None = Field(
        default=None, description="the identity of `init` on the hub (`repo@tag`), recorded in fedem.json"
    )
    max_length: int = Field(default=256, gt=8)
    eval_size: int = Field(default=64, ge=0, description="examples held out from the training data")
    group_by_length: bool = Field(
        default=True,
        description="batch rows of similar length together (HF's LengthGroupedSampler): rows are padded "
        "to the longest of their batch, and random batches of translation rows were half padding",
    )
    lora: LoraSettings = LoraSettings()
    train: TrainSettings = TrainSettings(learning_rate=2e-3, warmup_steps=10, weight_decay=0.0, max_steps=200)
    out: Path = Path("runs/adapter")

    @model_validator(mode="after")
    def _inputs(self) -> "FinetuneConfig":
        if self.task == "translate" and self.pairs is None:
            raise ValueError("task 'translate' needs `pairs` (an en-<lang>.tsv file)")
        if self.task == "lm" and self.data is None:
            raise ValueError("task 'lm' needs `data` (a text file or a folder of <lang>.txt)")
        if self.rebase and self.init is None:
            raise ValueError("`rebase` continues an adapter onto another base: it needs `init`")
        return self

    @field_validator("lang")
    @classmethod
    def _known_lang(cls, code: str | None) -> str | None:
        return language(code).code if code is not None else None
