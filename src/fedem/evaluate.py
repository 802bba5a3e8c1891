"""Evaluation: perplexity and bits-per-byte per language, chrF/BLEU on held-out translation pairs.

Bits-per-byte (bpb) is the headline metric because it compares across tokenizers and scripts:
a line's total negative log-likelihood in nats, divided by ln 2 and by the line's UTF-8 byte count.
Perplexity is per token, so it is only comparable between models that share a tokenizer.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class TextScore:
    """Summed likelihood of some text; `nll` in nats over `tokens` predicted tokens and `bytes` bytes."""

    nll: float
    tokens: int
    bytes: int

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.bytes)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)


@torch.no_grad()
def score_lines(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    lines: Sequence[str],
    batch_size: int = 16,
    max_length: int = 1024,
) -> TextScore:
    """Negative log-likelihood of each line given only BOS, summed over `lines`.

    Each line is scored on its own (as `[BOS] + tokens`, every text token predicted), so the result
    does not depend on batching or order. Lines longer than `max_length` tokens are truncated, and
    their byte count is that of the text the kept tokens cover.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in lines]
    rows = []
    byte_count = 0
    for line, ids in zip(lines, encoded, strict=True):
        kept = ids[: max_length - 1]
        rows.append([tokenizer.bos_token_id, *kept])
        covered = line if len(kept) == len(ids) else tokenizer.decode(kept)
        byte_count += len(covered.encode("utf-8"))
    rows.sort(key=len)  # similar lengths together: less padding per batch
    nll = 0.0
    tokens = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(map(len, batch))
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()  # (batch, width, vocab)
        targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        nll += losses.item()
        tokens += int((targets != -100).sum())
    model.train(was_training)
    return TextScore(nll=nll, tokens=tokens, bytes=byte_count)
