"""Seshu model sizes and the one place that decides Seshu's architecture.

Seshu *is* transformers' `Mamba2ForCausalLM`: a checkpoint is a plain HF folder that
`AutoModelForCausalLM.from_pretrained` loads without fedem installed. Mamba-2 was chosen over
Mamba-1 by measurement on a 2-core CPU (see docs/design.md): its stock chunked scan trains ~6× faster
than Mamba-1's best stock path with half the memory, and fedem's fast path (`fedem.model.scan`) ~120×
(bench/results/vs_llama.md).

Glossary (Mamba-2 paper → config field):
    D_model  hidden_size        width of the residual stream
    E        expand             inner width = E · D_model
    P        head_dim           channels per SSM head; heads H = E · D_model / P
    N        state_size         SSM state per head channel (B and C have N entries)
    G        n_groups           heads sharing one B/C projection
    Q        chunk_size         block length of the chunked (SSD) scan
"""

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import Mamba2Config, Mamba2ForCausalLM, PreTrainedTokenizerBase

import fedem.model.scan  # noqa: F401 — importing it installs fedem's default (fast) scan process-wide
from fedem.model.projection import tile_projections

ARCHITECTURE = Mamba2ForCausalLM

# LoRA targets that stay effective on every code path. On the CUDA fused kernel,
# `mamba_split_conv1d_scan_combined` reads `out_proj.weight` directly (a LoRA there would be bypassed)
# and peft refuses `out_proj`/`conv1d` on Mamba models; `in_proj` is always called as a module.
LORA_TARGETS = ("in_proj",)


class SeshuSize(BaseModel):
    """Shape of a Seshu model; the vocabulary size comes from the tokenizer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    state_size: int = Field(default=64, gt=0)
    head_dim: int = Field(default=64, gt=0)
    expand: int = Field(default=2, gt=0)
    n_groups: int = Field(default=1, gt=0)
    conv_kernel: int = Field(default=4, gt=1)
    # 64 measured fastest across lengths on a 2-core CPU (docs/design.md); the CUDA kernels prefer 256.
    chunk_size: int = Field(default=64, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "SeshuSize":
        inner = self.expand * self.hidden_size
        if inner % self.head_dim:
            raise ValueError(f"expand·hidden_size ({inner}) must be a multiple of head_dim ({self.head_dim})")
        if (inner // self.head_dim) % self.n_groups:
            raise ValueError("the number of heads must be a multiple of n_groups")
        return self

    @property
    def num_heads(self) -> int:
        return self.expand * self.hidden_size // self.head_dim


def seshu_config(size: SeshuSize, tokenizer: PreTrainedTokenizerBase) -> Mamba2Config:
    """The HF config for a Seshu of this size over this tokenizer's vocabulary."""
    return Mamba2Config(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_hidden_layers,
        state_size=size.state_size,
        head_dim=size.head_dim,
        num_heads=size.num_heads,
        expand=size.expand,
        n_groups=size.n_groups,
        conv_kernel=size.conv_kernel,
        chunk_size=size.chunk_size,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        # mamba_ssm's own init, N(0, 0.02), with out_proj scaled by 1/√layers in `build_model`. The
        # transformers default (0.1, no rescale) starts above the uniform loss: 10.57 vs 9.63 nats at
        # step 10 on seshu-small, 8.48 vs 8.33 at step 60 (docs/design.md).
        initializer_range=0.02,
        architectures=[ARCHITECTURE.__name__],
    )


def build_model(size: SeshuSize, tokenizer: PreTrainedTokenizerBase) -> Mamba2ForCausalLM:
    """A freshly initialised Seshu (seed torch first for reproducibility).

    The GPT-2-style 1/√layers scaling of each residual branch's output projection is applied here,
    once, and not through `rescale_prenorm_residual=True` in the config: transformers 5.23 re-applies
    that in-place division every time `from_pretrained` initialises a model, so a saved checkpoint
    would load with its out_proj weights shrunk. Each mixer's in_proj is a `TiledLinear`
    (`fedem.model.projection`): the same parameters, its product over whole BLAS tiles.
    """
    model = ARCHITECTURE(seshu_config(size, tokenizer))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mixer.out_proj.weight"):
                param.div_(math.sqrt(size.num_hidden_layers))
    tile_projections(model)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters counted once (tied input/output embeddings are one matrix)."""
    return sum(p.numel() for p in model.parameters())
