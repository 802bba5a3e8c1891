"""A Llama (Transformer) baseline matched to a Seshu size: same width, vocabulary and parameter count.

Comparing Seshu with "a Transformer" is only fair at equal size and equal data, so the baseline
shares what can be shared — the tokenizer, the residual width D_model, tied input/output embeddings,
the initialisation scale — and takes its depth from the parameter budget: the number of layers
whose total parameter count comes closest to the Seshu model's.

Glossary (→ `LlamaConfig` field):
    D_model  hidden_size          width of the residual stream (= Seshu's)
    D_ff     intermediate_size    SwiGLU width: ≈ 8/3 · D_model, rounded up to a multiple of 64
    H        num_attention_heads  D_model / 64 heads of 64 channels (at least one)
    L        num_hidden_layers    chosen to match the parameter count

Parameters are counted on the `meta` device, so no weights are allocated while searching.
"""

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from fedem.model.seshu import ARCHITECTURE, SeshuSize, count_parameters, seshu_config

HEAD_DIM = 64
FF_MULTIPLE = 64


def _llama_config(hidden_size: int, layers: int, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    intermediate = FF_MULTIPLE * math.ceil(8 * hidden_size / 3 / FF_MULTIPLE)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // HEAD_DIM),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.02,  # the same init scale as Seshu (model/seshu.py)
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        architectures=[LlamaForCausalLM.__name__],
    )


def _parameters_on_meta(config: LlamaConfig) -> int:
    with torch.device("meta"):
        return count_parameters(LlamaForCausalLM(config))


def matched_llama_config(size: SeshuSize, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The Llama config with Seshu's width and vocabulary whose parameter count is closest to Seshu's.

    A Llama's parameter count is linear in its depth (embeddings + L · one layer + final norm), so two
    counts — at L = 1 and L = 2 — give the layer size, and the best depth follows by rounding.
    """
    with torch.device("meta"):
        target = count_parameters(ARCHITECTURE(seshu_config(size, tokenizer)))
    one, two = (_parameters_on_meta(_llama_config(size.hidden_size, n, tokenizer)) for n in (1, 2))
    per_layer = two - one
    layers = max(1, round((target - (one - per_layer)) / per_layer))
    return _llama_config(size.hidden_size, layers, tokenizer)


def build_matched_llama(size: SeshuSize, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A freshly initialised Llama baseline for this Seshu size (seed torch first for reproducibility)."""
    return LlamaForCausalLM(matched_llama_config(size, tokenizer))
